//! The one error enum of the S3EC codec and crypto.
//!
//! Why one enum: every failure here ends the same way for the mount (the object cannot be read
//! or written, EIO or EFBIG), and the variants only differ in the sentence the user reads.
//! Invariant: no message contains key material, plaintext, an encrypted data key or an
//! encryption-context value. Metadata key names are fixed strings from this module, never text
//! copied from the object; the only object text that can appear is an unknown algorithm
//! identifier, cut to a short printable form by [`shown`].

use super::envelope::{ContentSuite, WrapAlg};

/// Longest piece of an unknown algorithm identifier an error repeats.
const SHOWN_MAX: usize = 40;

/// An unknown identifier as an error shows it: printable ASCII only, at most [`SHOWN_MAX`]
/// characters, so a hostile value cannot flood a log line or inject control characters.
pub(crate) fn shown(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(SHOWN_MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if value.chars().count() > SHOWN_MAX {
        out.push('…');
    }
    out
}

/// Failure to read, check, unwrap, decrypt or encrypt an S3 Encryption Client object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3ecError {
    /// Keys that belong to different format versions are present together.
    #[error(
        "the S3EC metadata mixes keys of different format versions ({what}); \
         it was tampered with or written by a broken client"
    )]
    ConflictingKeys { what: &'static str },
    /// A key the detected format requires is absent.
    #[error("the S3EC metadata lacks {key}, which this format version requires")]
    MissingKey { key: &'static str },
    /// A key is present but its value cannot be what the format says.
    #[error("the S3EC metadata value of {key} is invalid: {what}")]
    InvalidValue {
        key: &'static str,
        what: &'static str,
    },
    /// The same key arrived twice (for example bare and with the `x-amz-meta-` prefix) with
    /// different values, so which one a reader uses would decide what it decrypts.
    #[error("the S3EC metadata key {key} appears twice with different values")]
    DuplicateKey { key: &'static str },
    /// The object carries the instruction-file marker: it is the sidecar of another object.
    #[error(
        "this object is an S3EC instruction file (it carries x-amz-crypto-instr-file), \
         the key sidecar of another object, not encrypted content"
    )]
    IsInstructionFile,
    /// The instruction file is not a JSON object of S3EC keys, or holds keys it must not.
    #[error("the S3EC instruction file is invalid: {what}")]
    InvalidInstructionFile { what: &'static str },
    /// `x-amz-cek-alg` / `x-amz-c` names an algorithm no S3EC version defines.
    #[error("the object uses the content algorithm {found:?}, which no S3 Encryption Client version defines")]
    UnknownContentAlgorithm { found: String },
    /// `x-amz-wrap-alg` / `x-amz-w` names a key wrap no S3EC version defines.
    #[error("the object's data key is wrapped with {found:?}, which no S3 Encryption Client version defines")]
    UnknownWrapAlgorithm { found: String },
    /// A recognised but unauthenticated legacy content algorithm (AES-CBC).
    #[error(
        "the object is encrypted with the legacy {suite} algorithm (S3EC format V1 or early V2), which has no \
         authentication; s3cryptfs does not decrypt it. Re-encrypt it with a current S3 Encryption Client"
    )]
    UnsupportedContent { suite: ContentSuite },
    /// A recognised key wrap this build does not unwrap (a legacy wrap).
    #[error("the object's data key is wrapped with {wrap}, which s3cryptfs does not support yet")]
    UnsupportedWrap { wrap: WrapAlg },
    /// The data key is wrapped differently from what the caller can unwrap.
    #[error("the object's data key is wrapped with {found}, not {expected}; {hint}")]
    WrongWrap {
        found: WrapAlg,
        expected: &'static str,
        hint: &'static str,
    },
    /// AES/GCM unwrap failed: wrong customer key, a changed wrapped key, or a changed content algorithm.
    #[error(
        "the object's data key did not unwrap: the customer key is not the one it was wrapped with, \
         or the wrapped key or its content algorithm was modified"
    )]
    KeyUnwrapFailed,
    /// RSA-OAEP-SHA1 unwrap failed: another RSA key, a changed wrapped key, or a pseudo data key
    /// whose length byte or content-algorithm suffix is not the one the metadata declares. One
    /// variant for all of these, so that errors are no padding oracle.
    #[error(
        "the object's data key could not be unwrapped with the RSA private key: the object was wrapped for \
         another RSA key, or the wrapped key or its content algorithm was modified"
    )]
    RsaUnwrapFailed,
    /// V3: the key commitment derived from the data key differs from `x-amz-d`.
    #[error(
        "the object's key commitment does not match its data key (x-amz-d or x-amz-i was modified, \
         or the data key belongs to another object); nothing was decrypted"
    )]
    CommitmentMismatch,
    /// The whole-object GCM tag did not verify: the content, tag, IV or key is not the one sealed.
    #[error(
        "the object failed authentication (its content, tag, IV or metadata was modified, it was truncated, \
         or its metadata belongs to another object); no byte of it may be used"
    )]
    AuthenticationFailed,
    /// The body is shorter than its 16-byte tag.
    #[error("the object is {len} bytes long, shorter than the 16-byte GCM tag every S3EC object ends with; it was truncated")]
    Truncated { len: u64 },
    /// More plaintext than one GCM message may carry.
    #[error(
        "{len} bytes exceed the {max}-byte limit of one AES-GCM message, which S3EC objects are"
    )]
    TooLarge { len: u64, max: u64 },
    /// The stored KMS encryption context, less the reserved keys, is not the one the reader expects.
    #[error(
        "the object's KMS encryption context does not match the expected one \
         (the AWS clients refuse it too unless given the same context)"
    )]
    EncryptionContextMismatch,
    /// A caller-supplied encryption context uses a key the S3EC reserves.
    #[error(
        "the encryption context key {key} is reserved for the S3 Encryption Client; remove it"
    )]
    ReservedContextKey { key: &'static str },
    /// The content algorithm bound into the encryption context is not the one in the metadata:
    /// metadata was rewritten to another version (downgrade).
    #[error(
        "the content algorithm bound into the object's KMS encryption context is not {expected}, the one its \
         metadata names; the metadata was rewritten (possible downgrade)"
    )]
    ContextAlgorithmMismatch { expected: &'static str },
    /// Encryption context or material description with non-ASCII text (S3 would RFC 2047-encode it
    /// and Python readers reject it).
    #[error("an encryption context or material description must be ASCII for S3EC objects")]
    NonAsciiContext,
    /// What came back as a data key is not 32 bytes.
    #[error("the data key is {len} bytes, but S3EC data keys are 32 bytes (AES-256)")]
    InvalidDataKey { len: usize },
    /// Chunk digests need a whole number of 16-byte GCM blocks per chunk.
    #[error("chunk digests need a positive multiple of 16 bytes per chunk, got {len}")]
    InvalidChunkLen { len: u64 },
    /// A chunk did not match its recorded digest.
    #[error("chunk {chunk} of the object does not match its recorded digest (modified since it was verified)")]
    ChunkDigestMismatch { chunk: u64 },
    /// A CTR position beyond what one GCM message can reach.
    #[error("offset {offset} is beyond the largest S3EC object")]
    OffsetOutOfRange { offset: u64 },
}
