//! Pure cryptography: object format, envelope, AEAD chunks, secret types (no I/O).
pub mod aead;
pub mod error;
pub mod format;
pub mod keyfile;
pub mod secret;
