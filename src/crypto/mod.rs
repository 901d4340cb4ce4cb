//! Pure cryptography: object format, envelope, AEAD chunks, secret types (no I/O).
//!
//! Why it is pure: everything here is a function of bytes and keys, so the
//! format can be tested exhaustively (round trips, golden fixtures, tampering)
//! without a store, a mount or a runtime. The read and write paths call in; this
//! module never calls out.
//!
//! An object is `header (512 bytes) || chunk_0 || … || chunk_{n-1}`:
//! - [`format`](mod@format): constants, header layout, plaintext/ciphertext offset maths;
//! - [`object`]: [`ObjectCipher`], the per-object context that unwraps the data
//!   key and seals/opens chunks and path bindings;
//! - [`aead`]: AES-256-GCM with two byte-identical backends;
//! - [`diskcache`]: keys, names and sealed entries of the disk cache (issue 14);
//! - [`secret`]: key newtypes that zeroize and never print;
//! - [`keyfile`]: the customer key history;
//! - [`error`]: the error enums;
//! - [`version`]: the version map of formats 2 and 3 (which upload sealed each chunk), for objects changed in place;
//! - [`s3ec`]: objects of the AWS S3 Encryption Client (formats V2 and V3), a foreign format
//!   read and written for interoperability (issue 12).
//!
//! docs/FORMAT.md has the byte tables and docs/SECURITY.md the threat model.
//! Two envelopes carry the data key: kind 1, wrapped here under a customer key
//! (mode cse-c), and kind 2, a KMS ciphertext blob (mode cse-kms). For kind 2
//! this module only lays out and parses the header, names the KMS encryption
//! context and builds the cipher from a data key; the KMS calls are async I/O
//! and live in the caller.

pub mod aead;
pub mod diskcache;
pub mod error;
pub mod format;
pub mod hex;
pub mod journal;
pub mod keyfile;
pub mod object;
pub mod s3ec;
pub mod secret;
pub mod version;

pub use aead::AeadBackend;
pub use error::{CryptoError, FormatError, KeyFileError};
pub use format::{
    chunk_cipher_range, chunk_count, chunk_plain_len, chunk_plain_range, chunks_for_range,
    cipher_size, is_last_chunk, plain_size, Envelope, FileId, Header, CHUNK_CIPHER_LEN,
    CHUNK_OVERHEAD, CHUNK_PLAIN_LEN, FORMAT_VERSION, FORMAT_VERSION_1, FORMAT_VERSION_2, FORMAT_VERSION_3, HEADER_LEN, MAGIC, MAX_KMS_KEY_ID_LEN,
    NONCE_LEN, TAG_LEN,
};
pub use keyfile::{format_new_key, KeyHistory};
pub use object::{
    decrypt_object, decrypt_object_with_map, encrypt_object, kms_encryption_context, ObjectCipher, KMS_CONTEXT_FILE_ID,
};
pub use secret::{DataKey, JournalKey, Key256, KeyFingerprint};
