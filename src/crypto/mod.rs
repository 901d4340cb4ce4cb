//! Pure cryptography: object format, envelope, AEAD chunks, secret types (no I/O).
