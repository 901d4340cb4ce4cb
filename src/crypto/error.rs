//! Error types of the crypto core, one enum per concern.
//!
//! Why three enums: size arithmetic ([`FormatError`]) is used by the read path
//! before any key is loaded, key-file parsing ([`KeyFileError`]) happens once at
//! mount time, and [`CryptoError`] covers everything that touches ciphertext.
//! Invariant for all of them: no message ever contains key material or the text
//! of a key-file line, so they are safe to log and to show to users.

use super::secret::KeyFingerprint;

/// A ciphertext length that no plaintext length maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than a header plus one empty chunk, so it cannot be ours.
    #[error(
        "the object is {len} bytes long, shorter than the {min}-byte minimum of an s3cryptfs object; \
         it was truncated or is not an encrypted object"
    )]
    TooShort { len: u64, min: u64 },
    /// The bytes after the last full chunk cannot form a valid final chunk.
    #[error(
        "the object is {len} bytes long, which no plaintext size encrypts to \
         (its final chunk would be {remainder} bytes); it was truncated or extended"
    )]
    InvalidLength { len: u64, remainder: u64 },
}

/// A problem in the key file. Errors name the line, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The line is not base64 in the standard alphabet.
    #[error(
        "line {line} of the key file is not valid base64; each key line must be the base64 \
         encoding of 32 random bytes (create one with `s3cryptfs keygen`)"
    )]
    InvalidBase64 { line: usize },
    /// The line decodes, but not to a 256-bit key.
    #[error(
        "line {line} of the key file decodes to {len} bytes, but a key must be exactly 32 bytes \
         (create one with `s3cryptfs keygen`)"
    )]
    WrongLength { line: usize, len: usize },
    /// The same key appears twice, which would make key lookup ambiguous.
    #[error(
        "line {line} of the key file repeats the key on line {first_line}; remove one of them"
    )]
    DuplicateKey { line: usize, first_line: usize },
    /// Only blanks and comments.
    #[error("the key file contains no key; add one (create it with `s3cryptfs keygen`)")]
    NoKeys,
}

/// Failure to open or authenticate an encrypted object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The bytes do not start with the s3cryptfs magic.
    #[error("the object is not in s3cryptfs format (wrong magic bytes); it was not written by s3cryptfs")]
    NotOurFormat,
    /// Written by a newer (or unknown) format version.
    #[error("the object uses format version {found}, which this s3cryptfs does not support; upgrade s3cryptfs")]
    UnsupportedVersion { found: u16 },
    /// The data key is wrapped in a way this build does not know (a kind newer than 2).
    #[error(
        "the object's data key uses envelope kind {kind}, which this s3cryptfs does not support; upgrade s3cryptfs"
    )]
    UnsupportedEnvelope { kind: u8 },
    /// A kind-2 (KMS) object met on the customer-key path. The key id is a
    /// public KMS key ARN, not key material.
    #[error("the object's data key is wrapped by KMS key {key_id}; mount with mode=cse-kms")]
    NeedsKms { key_id: String },
    /// A kind-1 (customer key) object met on the KMS path.
    #[error(
        "the object's data key is wrapped by a customer key (fingerprint {fingerprint}), not by KMS; \
         mount with mode=cse-c and the key file that contains that key"
    )]
    NeedsCustomerKey { fingerprint: KeyFingerprint },
    /// What KMS returned cannot be stored in a header (writing only; a reader
    /// meeting the same problem reports `Malformed`).
    #[error(
        "the KMS data key cannot be stored in the object header: {what}; \
         the KMS endpoint returned a key id or ciphertext blob unlike AWS KMS's"
    )]
    InvalidKmsEnvelope { what: &'static str },
    /// The header is structurally invalid.
    #[error("the object header is malformed: {what}")]
    Malformed { what: &'static str },
    /// No key in the history has this fingerprint: the mount uses the wrong key file.
    #[error(
        "the object was encrypted with a key (fingerprint {fingerprint}) that is not in the key file; \
         mount with the key file that contains it"
    )]
    UnknownKey { fingerprint: KeyFingerprint },
    /// The key matched by fingerprint did not unwrap the data key.
    #[error(
        "the object header failed authentication: its data key could not be unwrapped \
         (the header or its wrapped key was modified)"
    )]
    KeyUnwrapFailed,
    /// A chunk failed authentication: modified, reordered, moved, or truncated.
    #[error("chunk {chunk} of the object failed authentication (modified, moved, reordered or truncated)")]
    AuthenticationFailed { chunk: u64 },
    /// A chunk is too short to even hold its nonce and tag.
    #[error("chunk {chunk} of the object is {len} bytes, too short to be a chunk; the object was truncated")]
    TruncatedChunk { chunk: u64, len: usize },
    /// The object is stored at a path it was not written for.
    #[error("the object does not belong at this path (its path binding does not match); it was swapped or copied")]
    ObjectSwapped,
    /// A format-2 object without the version map its chunks need (the metadata
    /// field was removed, or the object was copied without its metadata).
    #[error(
        "the object is in format version 2 but its metadata has no version map; \
         it was copied without its metadata or the map was removed"
    )]
    MissingVersionMap,
    /// A format-2 version map that does not authenticate for this object and length.
    #[error(
        "the object's version map failed authentication (modified, taken from another object or \
         another version, or the object was truncated or extended)"
    )]
    VersionMapForged,
    /// Writing: a chunk carried over into a new version would not be valid there
    /// (a bug in the caller, which must seal it again).
    #[error("chunk {chunk} must be sealed again in the new version (its length or last-chunk flag changes)")]
    MustRewrite { chunk: u64 },
    /// Writing: the new version map would need more runs than the metadata has room for.
    #[error("the version map would need {runs} runs, more than the 32 it can hold; rewrite the whole object")]
    VersionMapFull { runs: usize },
    /// Writing: the chunks sealed under the object's data key would pass the
    /// 2^32 that random GCM nonces allow.
    #[error("{sealed} chunks would have been sealed under this object's data key, more than 2^32; rewrite the whole object")]
    DataKeyExhausted { sealed: u64 },
    /// The object length is impossible for this format.
    #[error(transparent)]
    Format(#[from] FormatError),
}
