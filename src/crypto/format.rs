//! The on-store layout of an encrypted object: constants, the 512-byte header,
//! and the offset arithmetic between plaintext and ciphertext.
//!
//! Layout (docs/FORMAT.md has the byte tables):
//! `object = header (512) || chunk_0 || … || chunk_{n-1}`, with
//! `n = max(1, ceil(plain / 65536))` and `chunk = nonce (12) || ciphertext || tag (16)`.
//! Every chunk is full except the last, which holds 0..=65536 bytes; it is empty
//! only when the whole file is empty. That single rule makes the mapping between
//! plaintext and ciphertext sizes a bijection, which [`plain_size`] relies on to
//! reject truncated or extended objects before any decryption.
//!
//! The header carries the data key in an envelope whose kind byte says how it
//! is protected:
//! - kind 1 ([`Envelope::CustomerKey`], mode cse-c): AES-256-GCM under a key
//!   from the key file, with header bytes 0..34 as AAD, so the wrap
//!   authenticates every header byte;
//! - kind 2 ([`Envelope::Kms`], mode cse-kms): the `CiphertextBlob` of a KMS
//!   `GenerateDataKey` call and the id of the KMS key that made it. This module
//!   checks its structure; only KMS can authenticate it (see below).
//!
//! Header integrity for kind 2. Every prefix field except the file id has one
//! legal value that [`Header::decode`] checks (magic, version, kind, chunk size,
//! flags), the envelope length must equal `2 + K + 2 + B` exactly, and the
//! padding must be zero, so these bytes cannot change without an error. The
//! file id is bound twice: the KMS encryption context names it (a blob copied
//! into another object's header does not decrypt there), and every chunk AAD
//! contains it. The blob is authenticated by KMS itself. The key id is not
//! authenticated, but a symmetric KMS blob records the key that made it, so a
//! changed key id can only make `Decrypt` fail (when it is passed as `KeyId`)
//! or be ignored; it can never select another data key.
//!
//! This module only parses and lays out bytes; wrapping and unwrapping the data
//! key is `object.rs`'s job, and KMS calls happen outside `crypto` altogether.

use std::fmt;
use std::ops::Range;

use super::error::{CryptoError, FormatError};
use super::secret::{fill_random, write_hex, KeyFingerprint, FINGERPRINT_LEN};

pub use super::aead::{NONCE_LEN, TAG_LEN};

/// Plaintext bytes per chunk: large enough that the 28-byte overhead is 0.04%,
/// small enough that a random read decrypts little it does not need.
pub const CHUNK_PLAIN_LEN: u64 = 1 << CHUNK_SIZE_LOG2;
/// log2 of [`CHUNK_PLAIN_LEN`], as stored in the header.
pub const CHUNK_SIZE_LOG2: u8 = 16;
/// Per-chunk overhead: the random nonce in front and the GCM tag behind.
pub const CHUNK_OVERHEAD: u64 = (NONCE_LEN + TAG_LEN) as u64;
/// Stored size of a full chunk.
pub const CHUNK_CIPHER_LEN: u64 = CHUNK_PLAIN_LEN + CHUNK_OVERHEAD;
/// Header size: fixed, so chunk offsets never depend on the envelope, and
/// generous, so a KMS ciphertext blob fits without a format change.
pub const HEADER_LEN: u64 = 512;
/// Bumped on any change to the bytes this module or `object.rs` produce. This is
/// the version new objects are written in; readers accept every version in
/// [`SUPPORTED_VERSIONS`].
pub const FORMAT_VERSION: u16 = FORMAT_VERSION_1;
/// Version 1: one data key and file id per object, chunks bound to their index.
pub const FORMAT_VERSION_1: u16 = 1;
/// Version 2: the same header layout; chunks also carry the id of the version
/// (upload) that sealed them, and the object's metadata an authenticated map of
/// those ids, so an object can be changed in place under its data key
/// (`version.rs`). Written by mounts between the in-place writer and version 3; read forever.
pub const FORMAT_VERSION_2: u16 = 2;
/// Version 3: version 2 in which the version map is optional: without one, every chunk was sealed by the version
/// whose id is the file id. A file can then be written before its length is known (a streamed upload, whose
/// metadata is fixed when it starts) and still be changed in place later. What files are written in.
pub const FORMAT_VERSION_3: u16 = 3;
/// The versions [`Header::decode`] accepts.
pub const SUPPORTED_VERSIONS: [u16; 3] = [FORMAT_VERSION_1, FORMAT_VERSION_2, FORMAT_VERSION_3];
/// First 8 bytes of every object.
pub const MAGIC: [u8; 8] = *b"s3cryptf";
/// Length of the random per-object file id.
pub const FILE_ID_LEN: usize = 16;
/// Bytes of the header before the envelope (magic … envelope length).
pub const HEADER_FIXED_LEN: usize = 34;
/// Largest envelope the header can carry.
pub const MAX_ENVELOPE_LEN: usize = HEADER_LEN as usize - HEADER_FIXED_LEN;
/// Length of a wrapped data key: 32 bytes of ciphertext and a 16-byte tag.
pub const WRAPPED_KEY_LEN: usize = 32 + TAG_LEN;
/// Length of a customer-key envelope: fingerprint || wrap nonce || wrapped key.
pub const CUSTOMER_KEY_ENVELOPE_LEN: usize = FINGERPRINT_LEN + NONCE_LEN + WRAPPED_KEY_LEN;
/// Bytes of a KMS envelope besides its two fields: the two u16 lengths.
pub const KMS_ENVELOPE_FIXED_LEN: usize = 2 + 2;
/// Longest KMS key id a kind-2 envelope may carry. What KMS reports is a key
/// ARN, about 75 bytes in the commercial partition and under 128 in any other;
/// 255 leaves room for every ARN and still leaves 219 bytes for the blob, more
/// than the 184 bytes of an AWS KMS blob for a 256-bit data key.
pub const MAX_KMS_KEY_ID_LEN: usize = 255;
/// Largest plaintext the size functions accept: 4 EiB, far beyond any store,
/// chosen so that `cipher_size` can never overflow a `u64`.
pub const MAX_PLAIN_LEN: u64 = 1 << 62;
/// Smallest valid object: a header and one empty chunk.
pub const MIN_CIPHER_LEN: u64 = HEADER_LEN + CHUNK_OVERHEAD;

/// Envelope kind byte: data key wrapped with a customer key (mode cse-c).
pub const ENVELOPE_CUSTOMER_KEY: u8 = 1;
/// Envelope kind byte: data key from KMS, stored as its ciphertext blob (mode cse-kms).
pub const ENVELOPE_KMS: u8 = 2;

// Header field offsets (big-endian integers).
const OFF_VERSION: usize = 8;
const OFF_KIND: usize = 10;
const OFF_CHUNK_LOG2: usize = 11;
const OFF_FLAGS: usize = 12;
const OFF_FILE_ID: usize = 16;
const OFF_ENVELOPE_LEN: usize = 32;

/// Random per-object identifier, bound into every chunk's AAD and the path binding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub [u8; FILE_ID_LEN]);

impl FileId {
    /// A fresh random file id from the OS random source. Mode cse-kms needs it
    /// before the data key exists, because the KMS encryption context names it.
    pub fn random() -> FileId {
        let mut id = [0u8; FILE_ID_LEN];
        fill_random(&mut id);
        FileId(id)
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileId(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// How the object's data key is protected. Nothing here is secret: the data
/// key only ever appears wrapped.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Envelope {
    /// Kind 1 (cse-c): AES-256-GCM under a customer key chosen by fingerprint.
    CustomerKey {
        /// Which key in the history wrapped the data key.
        fingerprint: KeyFingerprint,
        /// Random nonce of the wrap.
        wrap_nonce: [u8; NONCE_LEN],
        /// Encrypted data key followed by its tag.
        wrapped_key: [u8; WRAPPED_KEY_LEN],
    },
    /// Kind 2 (cse-kms): encoded as `key_id_len (u16) || key_id || blob_len (u16) || blob`.
    /// [`Header::encode`] rejects values that [`Header::decode`] would not accept.
    Kms {
        /// The KMS key that made the blob, as KMS reported it (a key ARN):
        /// 1..=[`MAX_KMS_KEY_ID_LEN`] bytes of printable ASCII without spaces.
        key_id: String,
        /// The KMS `CiphertextBlob` of the data key; not empty, and with the key
        /// id it must fit [`MAX_ENVELOPE_LEN`].
        blob: Vec<u8>,
    },
}

/// Why a KMS key id and blob cannot form a kind-2 envelope, or `Ok`. One
/// function for both directions, so the writer never produces a header the
/// reader rejects.
fn check_kms_fields(key_id: &[u8], blob_len: usize) -> Result<(), &'static str> {
    if key_id.is_empty() {
        return Err("the KMS key id is empty");
    }
    if key_id.len() > MAX_KMS_KEY_ID_LEN {
        return Err("the KMS key id is longer than 255 bytes");
    }
    // An ARN is printable ASCII; anything else is damage, and would also be
    // unsafe to show in an error message.
    if !key_id.iter().all(u8::is_ascii_graphic) {
        return Err("the KMS key id is not printable ASCII");
    }
    if blob_len == 0 {
        return Err("the KMS ciphertext blob is empty");
    }
    if KMS_ENVELOPE_FIXED_LEN + key_id.len() + blob_len > MAX_ENVELOPE_LEN {
        return Err("the KMS key id and ciphertext blob do not fit in the 478-byte envelope");
    }
    Ok(())
}

/// Split a kind-2 envelope (exactly `envelope length` bytes) into key id and
/// blob, checking only that the two lengths add up to the envelope length.
fn split_kms_envelope(env: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    let read_len = |at: usize| {
        env.get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    let key_id_len =
        read_len(0).ok_or("the KMS envelope is too short to hold its key id length")?;
    let key_id_end = 2 + key_id_len;
    let blob_len =
        read_len(key_id_end).ok_or("the KMS key id length runs past the end of the envelope")?;
    let blob_start = key_id_end + 2;
    if blob_start + blob_len != env.len() {
        return Err("the envelope length does not match the KMS key id and blob lengths");
    }
    Ok((&env[2..key_id_end], &env[blob_start..]))
}

impl Envelope {
    /// The kind byte stored at header offset 10.
    pub fn kind(&self) -> u8 {
        match self {
            Envelope::CustomerKey { .. } => ENVELOPE_CUSTOMER_KEY,
            Envelope::Kms { .. } => ENVELOPE_KMS,
        }
    }

    /// Encoded length, stored at header offset 32. For kind 2 it may exceed
    /// [`MAX_ENVELOPE_LEN`]; [`Header::encode`] then refuses.
    pub fn encoded_len(&self) -> usize {
        match self {
            Envelope::CustomerKey { .. } => CUSTOMER_KEY_ENVELOPE_LEN,
            Envelope::Kms { key_id, blob } => KMS_ENVELOPE_FIXED_LEN + key_id.len() + blob.len(),
        }
    }

    /// Whether this envelope can be stored and read back.
    fn check(&self) -> Result<(), CryptoError> {
        match self {
            Envelope::CustomerKey { .. } => Ok(()),
            Envelope::Kms { key_id, blob } => check_kms_fields(key_id.as_bytes(), blob.len())
                .map_err(|what| CryptoError::InvalidKmsEnvelope { what }),
        }
    }

    /// Write the envelope into `out`, which is exactly `encoded_len()` bytes.
    /// Only called after `check`.
    fn encode_into(&self, out: &mut [u8]) {
        match self {
            Envelope::CustomerKey {
                fingerprint,
                wrap_nonce,
                wrapped_key,
            } => {
                out[..FINGERPRINT_LEN].copy_from_slice(&fingerprint.0);
                out[FINGERPRINT_LEN..FINGERPRINT_LEN + NONCE_LEN].copy_from_slice(wrap_nonce);
                out[FINGERPRINT_LEN + NONCE_LEN..CUSTOMER_KEY_ENVELOPE_LEN]
                    .copy_from_slice(wrapped_key);
            }
            Envelope::Kms { key_id, blob } => {
                let u16_len = |len: usize| {
                    u16::try_from(len)
                        .expect("invariant broken: KMS field length not checked before encoding")
                        .to_be_bytes()
                };
                let (k, b) = (key_id.len(), blob.len());
                out[..2].copy_from_slice(&u16_len(k));
                out[2..2 + k].copy_from_slice(key_id.as_bytes());
                out[2 + k..4 + k].copy_from_slice(&u16_len(b));
                out[4 + k..4 + k + b].copy_from_slice(blob);
            }
        }
    }
}

/// A decoded header (version 1, 2 or 3: the layout is the same).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Header {
    /// [`FORMAT_VERSION_1`], [`FORMAT_VERSION_2`] or [`FORMAT_VERSION_3`]; a rewrap or KMS re-encrypt
    /// must keep it, or the chunks no longer open.
    pub version: u16,
    pub file_id: FileId,
    pub envelope: Envelope,
}

/// Header bytes 0..34: everything before the envelope. The kind-1 data-key
/// wrap authenticates exactly these bytes, so they can only be built one way.
pub(crate) fn header_prefix(
    version: u16,
    file_id: &FileId,
    kind: u8,
    envelope_len: usize,
) -> [u8; HEADER_FIXED_LEN] {
    let mut p = [0u8; HEADER_FIXED_LEN];
    p[..OFF_VERSION].copy_from_slice(&MAGIC);
    assert!(
        SUPPORTED_VERSIONS.contains(&version),
        "invariant broken: writing a header of an unknown format version"
    );
    p[OFF_VERSION..OFF_KIND].copy_from_slice(&version.to_be_bytes());
    p[OFF_KIND] = kind;
    p[OFF_CHUNK_LOG2] = CHUNK_SIZE_LOG2;
    // Flags (12..16) stay zero: no flags are defined in version 1.
    p[OFF_FILE_ID..OFF_ENVELOPE_LEN].copy_from_slice(&file_id.0);
    let len =
        u16::try_from(envelope_len).expect("invariant broken: envelope longer than the header");
    p[OFF_ENVELOPE_LEN..HEADER_FIXED_LEN].copy_from_slice(&len.to_be_bytes());
    p
}

impl Header {
    /// The exact 512 bytes stored at the start of the object.
    ///
    /// Fails only for a kind-2 envelope that [`Header::decode`] would reject
    /// (empty, too long or non-ASCII key id, empty blob, or more than
    /// [`MAX_ENVELOPE_LEN`] bytes in all), with `InvalidKmsEnvelope`. A kind-1
    /// envelope always fits.
    ///
    /// # Panics
    /// If `version` is not one of [`SUPPORTED_VERSIONS`] (a bug in the caller).
    pub fn encode(&self) -> Result<[u8; HEADER_LEN as usize], CryptoError> {
        self.envelope.check()?;
        let env_len = self.envelope.encoded_len();
        let mut h = [0u8; HEADER_LEN as usize];
        h[..HEADER_FIXED_LEN].copy_from_slice(&header_prefix(
            self.version,
            &self.file_id,
            self.envelope.kind(),
            env_len,
        ));
        self.envelope
            .encode_into(&mut h[HEADER_FIXED_LEN..HEADER_FIXED_LEN + env_len]);
        Ok(h)
    }

    /// Parse the first [`HEADER_LEN`] bytes of `bytes` (longer input is fine:
    /// callers may pass a whole small object).
    ///
    /// Checks run from the most general to the most specific, so a foreign file
    /// reports `NotOurFormat` and a newer one `UnsupportedVersion`, never `Malformed`:
    /// magic, version, envelope kind (`UnsupportedEnvelope` for kinds other than
    /// 1 and 2), then as `Malformed`: chunk size, flags, envelope length (exactly
    /// 68 for kind 1; at most 478, split exactly as `2 + K + 2 + B`, for kind 2),
    /// zero padding, and last the kind-2 field contents (non-empty printable
    /// ASCII key id of at most [`MAX_KMS_KEY_ID_LEN`] bytes, non-empty blob).
    ///
    /// Decoding authenticates nothing: for kind 1 the unwrap does that, for
    /// kind 2 KMS `Decrypt` and the chunk AADs do (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<Header, CryptoError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(CryptoError::NotOurFormat);
        }
        if bytes.len() < OFF_KIND {
            return Err(CryptoError::Malformed {
                what: "the header is truncated",
            });
        }
        let version = u16::from_be_bytes([bytes[OFF_VERSION], bytes[OFF_VERSION + 1]]);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(CryptoError::UnsupportedVersion { found: version });
        }
        let Some(h) = bytes.get(..HEADER_LEN as usize) else {
            return Err(CryptoError::Malformed {
                what: "the header is truncated",
            });
        };
        let kind = h[OFF_KIND];
        if kind != ENVELOPE_CUSTOMER_KEY && kind != ENVELOPE_KMS {
            return Err(CryptoError::UnsupportedEnvelope { kind });
        }
        if h[OFF_CHUNK_LOG2] != CHUNK_SIZE_LOG2 {
            return Err(CryptoError::Malformed {
                what: "the chunk size is not 64 KiB",
            });
        }
        if h[OFF_FLAGS..OFF_FILE_ID] != [0; 4] {
            return Err(CryptoError::Malformed {
                what: "unknown header flags are set",
            });
        }
        let env_len = usize::from(u16::from_be_bytes([
            h[OFF_ENVELOPE_LEN],
            h[OFF_ENVELOPE_LEN + 1],
        ]));
        if kind == ENVELOPE_CUSTOMER_KEY && env_len != CUSTOMER_KEY_ENVELOPE_LEN {
            return Err(CryptoError::Malformed {
                what: "the envelope length is wrong for its kind",
            });
        }
        if env_len > MAX_ENVELOPE_LEN {
            return Err(CryptoError::Malformed {
                what: "the envelope length is larger than the 478 bytes the header has room for",
            });
        }
        let env_end = HEADER_FIXED_LEN + env_len;
        let env = &h[HEADER_FIXED_LEN..env_end];
        // Structure (the KMS field lengths) before padding before content, so
        // the error names the first thing that is wrong.
        let kms_parts = if kind == ENVELOPE_KMS {
            Some(split_kms_envelope(env).map_err(|what| CryptoError::Malformed { what })?)
        } else {
            None
        };
        if h[env_end..].iter().any(|&b| b != 0) {
            return Err(CryptoError::Malformed {
                what: "the header padding is not zero",
            });
        }
        let mut file_id = [0u8; FILE_ID_LEN];
        file_id.copy_from_slice(&h[OFF_FILE_ID..OFF_ENVELOPE_LEN]);
        let envelope = match kms_parts {
            Some((key_id, blob)) => {
                check_kms_fields(key_id, blob.len())
                    .map_err(|what| CryptoError::Malformed { what })?;
                Envelope::Kms {
                    // Checked to be ASCII, so each byte is one char.
                    key_id: key_id.iter().copied().map(char::from).collect(),
                    blob: blob.to_vec(),
                }
            }
            None => {
                let mut fingerprint = [0u8; FINGERPRINT_LEN];
                fingerprint.copy_from_slice(&env[..FINGERPRINT_LEN]);
                let mut wrap_nonce = [0u8; NONCE_LEN];
                wrap_nonce.copy_from_slice(&env[FINGERPRINT_LEN..FINGERPRINT_LEN + NONCE_LEN]);
                let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
                wrapped_key.copy_from_slice(&env[FINGERPRINT_LEN + NONCE_LEN..]);
                Envelope::CustomerKey {
                    fingerprint: KeyFingerprint(fingerprint),
                    wrap_nonce,
                    wrapped_key,
                }
            }
        };
        Ok(Header {
            version,
            file_id: FileId(file_id),
            envelope,
        })
    }
}

/// Number of chunks of a file of `plain` bytes: at least one, so that an empty
/// file still ends in an authenticated "last" chunk and cannot be faked by
/// truncating a longer object to its header.
pub fn chunk_count(plain: u64) -> u64 {
    plain.div_ceil(CHUNK_PLAIN_LEN).max(1)
}

/// Stored object size for a plaintext of `plain` bytes.
///
/// # Panics
/// If `plain > MAX_PLAIN_LEN` (4 EiB), which no caller can legitimately pass.
pub fn cipher_size(plain: u64) -> u64 {
    assert!(
        plain <= MAX_PLAIN_LEN,
        "invariant broken: plaintext size beyond MAX_PLAIN_LEN"
    );
    HEADER_LEN + plain + chunk_count(plain) * CHUNK_OVERHEAD
}

/// Plaintext size of a stored object of `cipher` bytes; the exact inverse of
/// [`cipher_size`], and an error for every length `cipher_size` cannot produce.
pub fn plain_size(cipher: u64) -> Result<u64, FormatError> {
    if cipher < MIN_CIPHER_LEN {
        return Err(FormatError::TooShort {
            len: cipher,
            min: MIN_CIPHER_LEN,
        });
    }
    let body = cipher - HEADER_LEN;
    let full = body / CHUNK_CIPHER_LEN;
    let remainder = body % CHUNK_CIPHER_LEN;
    // A final chunk needs its 28 bytes of overhead, and may be empty only if it
    // is the only chunk (otherwise the previous full chunk would have been last).
    let valid = match remainder {
        0 => true, // full >= 1 because body >= CHUNK_OVERHEAD > 0
        r if r < CHUNK_OVERHEAD => false,
        r if r == CHUNK_OVERHEAD => full == 0,
        _ => true,
    };
    let plain = full * CHUNK_PLAIN_LEN + remainder.saturating_sub(CHUNK_OVERHEAD);
    if !valid || plain > MAX_PLAIN_LEN {
        return Err(FormatError::InvalidLength {
            len: cipher,
            remainder,
        });
    }
    Ok(plain)
}

/// Plaintext bytes in chunk `index` of a `plain`-byte file; 0 past the end.
pub fn chunk_plain_len(index: u64, plain: u64) -> u64 {
    let last = chunk_count(plain) - 1;
    match index.cmp(&last) {
        std::cmp::Ordering::Less => CHUNK_PLAIN_LEN,
        std::cmp::Ordering::Equal => plain - last * CHUNK_PLAIN_LEN,
        std::cmp::Ordering::Greater => 0,
    }
}

/// Byte range of chunk `index` inside the stored object of a `plain`-byte file.
/// Past the last chunk it is the empty range at the end of the object.
pub fn chunk_cipher_range(index: u64, plain: u64) -> Range<u64> {
    if index >= chunk_count(plain) {
        let end = cipher_size(plain);
        return end..end;
    }
    let start = HEADER_LEN + index * CHUNK_CIPHER_LEN;
    start..start + chunk_plain_len(index, plain) + CHUNK_OVERHEAD
}

/// Byte range of chunk `index` in the plaintext of a `plain`-byte file.
pub fn chunk_plain_range(index: u64, plain: u64) -> Range<u64> {
    let start = index.saturating_mul(CHUNK_PLAIN_LEN).min(plain);
    start..start + chunk_plain_len(index, plain)
}

/// Whether chunk `index` is the last chunk of a `plain`-byte file (goes into its AAD).
pub fn is_last_chunk(index: u64, plain: u64) -> bool {
    index == chunk_count(plain) - 1
}

/// Indexes of the chunks holding plaintext bytes `[offset, offset + len)`,
/// clipped to the file. Empty when the clipped range is empty.
pub fn chunks_for_range(offset: u64, len: u64, plain: u64) -> Range<u64> {
    let end = offset.saturating_add(len).min(plain);
    let first = (offset / CHUNK_PLAIN_LEN).min(chunk_count(plain));
    if offset >= end {
        return first..first;
    }
    first..end.div_ceil(CHUNK_PLAIN_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants_match_the_spec() {
        assert_eq!(CHUNK_PLAIN_LEN, 65536);
        assert_eq!(CHUNK_OVERHEAD, 28);
        assert_eq!(CHUNK_CIPHER_LEN, 65564);
        assert_eq!(CUSTOMER_KEY_ENVELOPE_LEN, 68);
        assert_eq!(MAX_ENVELOPE_LEN, 478);
        assert_eq!(MIN_CIPHER_LEN, 540);
    }

    #[test]
    fn worked_size_examples_from_format_md() {
        for (plain, cipher) in [
            (0, 540),
            (1, 541),
            (65535, 66075),
            (65536, 66076),
            (65537, 66105),
            (1 << 20, 1_049_536),
            (1 << 30, 1_074_201_088),
        ] {
            assert_eq!(cipher_size(plain), cipher, "plain {plain}");
            assert_eq!(plain_size(cipher), Ok(plain), "cipher {cipher}");
        }
    }

    #[test]
    fn impossible_lengths_are_rejected() {
        for len in [0, 511, 512, 539] {
            assert_eq!(
                plain_size(len),
                Err(FormatError::TooShort { len, min: 540 })
            );
        }
        // One full chunk then 1..=28 stray bytes: an empty or partial trailing chunk.
        for extra in 1..=28 {
            let len = 512 + 65564 + extra;
            assert_eq!(
                plain_size(len),
                Err(FormatError::InvalidLength {
                    len,
                    remainder: extra
                })
            );
        }
        assert!(plain_size(512 + 65564 + 29).is_ok());
    }

    #[test]
    fn chunk_ranges_for_small_files() {
        assert_eq!(chunk_count(0), 1);
        assert_eq!(chunk_cipher_range(0, 0), 512..540);
        assert_eq!(chunk_cipher_range(1, 0), 540..540);
        assert_eq!(chunk_cipher_range(0, 65537), 512..512 + 65564);
        assert_eq!(chunk_cipher_range(1, 65537), 512 + 65564..512 + 65564 + 29);
        assert_eq!(chunk_plain_len(1, 65537), 1);
        assert_eq!(chunks_for_range(0, 0, 100), 0..0);
        assert_eq!(chunks_for_range(65535, 2, 200_000), 0..2);
        assert_eq!(chunks_for_range(65536, 65536, 200_000), 1..2);
        assert_eq!(chunks_for_range(100, 10, 50), 0..0);
        assert_eq!(chunks_for_range(0, u64::MAX, 65537), 0..2);
    }

    #[test]
    fn extreme_indexes_do_not_overflow() {
        assert_eq!(chunk_plain_len(u64::MAX, 10), 0);
        assert_eq!(chunk_plain_range(u64::MAX, 10), 10..10);
        assert_eq!(chunk_cipher_range(u64::MAX, 10), 550..550);
        assert!(!is_last_chunk(u64::MAX, 10));
        assert_eq!(chunks_for_range(u64::MAX, u64::MAX, 10), 1..1);
    }

    // ---- envelope kind 2 (KMS) ------------------------------------------------

    /// A key ARN as KMS reports it: 75 bytes, the worked example in FORMAT.md.
    const ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    /// The size of an AWS KMS blob for a 256-bit data key.
    const AWS_BLOB_LEN: usize = 184;

    fn kms_header(key_id: &str, blob: Vec<u8>) -> Header {
        Header {
            version: FORMAT_VERSION,
            file_id: FileId([0x33; FILE_ID_LEN]),
            envelope: Envelope::Kms {
                key_id: key_id.to_owned(),
                blob,
            },
        }
    }

    /// A kind-2 header with `env` as envelope and `env_len` in the length
    /// field, whatever they say, for building malformed headers.
    fn raw_kms_header(env_len: usize, env: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[..HEADER_FIXED_LEN].copy_from_slice(&header_prefix(
            FORMAT_VERSION,
            &FileId([0x33; FILE_ID_LEN]),
            ENVELOPE_KMS,
            env_len,
        ));
        h[HEADER_FIXED_LEN..HEADER_FIXED_LEN + env.len()].copy_from_slice(env);
        h
    }

    /// `key_id_len || key_id || blob_len || blob` with the given (possibly lying) lengths.
    fn kms_env(key_id_len: u16, key_id: &[u8], blob_len: u16, blob: &[u8]) -> Vec<u8> {
        let mut e = key_id_len.to_be_bytes().to_vec();
        e.extend_from_slice(key_id);
        e.extend_from_slice(&blob_len.to_be_bytes());
        e.extend_from_slice(blob);
        e
    }

    fn malformed(what: &'static str) -> Result<Header, CryptoError> {
        Err(CryptoError::Malformed { what })
    }

    #[test]
    fn kms_worked_size_example_from_format_md() {
        assert_eq!(ARN.len(), 75);
        let header = kms_header(ARN, vec![0xb1; AWS_BLOB_LEN]);
        assert_eq!(header.envelope.encoded_len(), 263);
        let h = header.encode().unwrap();
        assert_eq!(h[10], 2, "kind");
        assert_eq!(h[32..34], [0x01, 0x07], "envelope length 263");
        assert_eq!(h[34..36], [0x00, 0x4b], "key id length 75");
        assert_eq!(&h[36..111], ARN.as_bytes());
        assert_eq!(h[111..113], [0x00, 0xb8], "blob length 184");
        assert!(h[113..297].iter().all(|&b| b == 0xb1), "blob");
        assert!(h[297..].iter().all(|&b| b == 0), "215 bytes of padding");
        assert_eq!(Header::decode(&h), Ok(header));
        // The largest blob that fits beside this ARN, and the longest key id's.
        assert_eq!(MAX_ENVELOPE_LEN - KMS_ENVELOPE_FIXED_LEN - ARN.len(), 399);
        assert_eq!(
            MAX_ENVELOPE_LEN - KMS_ENVELOPE_FIXED_LEN - MAX_KMS_KEY_ID_LEN,
            219
        );
    }

    #[test]
    fn kms_envelopes_at_the_size_limits() {
        let longest_id = "k".repeat(MAX_KMS_KEY_ID_LEN);
        // Exactly 478 bytes: fits, and the header has no padding at all.
        let full = kms_header(&longest_id, vec![0xff; 219]);
        let h = full.encode().unwrap();
        assert_eq!(h[32..34], 478u16.to_be_bytes());
        assert_eq!(h[511], 0xff);
        assert_eq!(Header::decode(&h), Ok(full));
        // Shortest possible: one-byte key id and blob.
        let tiny = kms_header("k", vec![0]);
        assert_eq!(Header::decode(&tiny.encode().unwrap()), Ok(tiny));
    }

    #[test]
    fn encode_rejects_kms_envelopes_that_decode_would_reject() {
        let cases: [(&str, usize, &str); 8] = [
            ("", 10, "the KMS key id is empty"),
            (&ARN[..0], 0, "the KMS key id is empty"),
            ("caf\u{e9}", 10, "the KMS key id is not printable ASCII"),
            ("alias/my key", 10, "the KMS key id is not printable ASCII"),
            ("key\n", 10, "the KMS key id is not printable ASCII"),
            (ARN, 0, "the KMS ciphertext blob is empty"),
            (
                ARN,
                400,
                "the KMS key id and ciphertext blob do not fit in the 478-byte envelope",
            ),
            (
                ARN,
                70_000, // beyond u16: must be refused before any length is narrowed
                "the KMS key id and ciphertext blob do not fit in the 478-byte envelope",
            ),
        ];
        for (key_id, blob_len, what) in cases {
            assert_eq!(
                kms_header(key_id, vec![1; blob_len]).encode(),
                Err(CryptoError::InvalidKmsEnvelope { what }),
                "{key_id:?} {blob_len}"
            );
        }
        assert_eq!(
            kms_header(&"k".repeat(MAX_KMS_KEY_ID_LEN + 1), vec![1; 10]).encode(),
            Err(CryptoError::InvalidKmsEnvelope {
                what: "the KMS key id is longer than 255 bytes"
            })
        );
        assert_eq!(
            kms_header(&"k".repeat(MAX_KMS_KEY_ID_LEN), vec![1; 220]).encode(),
            Err(CryptoError::InvalidKmsEnvelope {
                what: "the KMS key id and ciphertext blob do not fit in the 478-byte envelope"
            })
        );
        // The error is a sentence a user can act on.
        let err = kms_header(ARN, vec![1; 400]).encode().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the KMS data key cannot be stored"),
            "{err}"
        );
    }

    #[test]
    fn malformed_kms_headers_name_the_problem() {
        let blob = [0xb1u8; 20];
        let good = kms_env(75, ARN.as_bytes(), 20, &blob);
        assert_eq!(good.len(), 99);
        assert!(Header::decode(&raw_kms_header(99, &good)).is_ok());

        // Envelope length field against the header and the inner lengths.
        assert_eq!(
            Header::decode(&raw_kms_header(479, &good)),
            malformed("the envelope length is larger than the 478 bytes the header has room for")
        );
        assert_eq!(
            Header::decode(&raw_kms_header(u16::MAX.into(), &good)),
            malformed("the envelope length is larger than the 478 bytes the header has room for")
        );
        for env_len in [0, 1] {
            assert_eq!(
                Header::decode(&raw_kms_header(env_len, &good)),
                malformed("the KMS envelope is too short to hold its key id length"),
                "{env_len}"
            );
        }
        for env_len in [2, 77, 78] {
            assert_eq!(
                Header::decode(&raw_kms_header(env_len, &good)),
                malformed("the KMS key id length runs past the end of the envelope"),
                "{env_len}"
            );
        }
        let mismatch = "the envelope length does not match the KMS key id and blob lengths";
        for env_len in [79, 98, 100, 478] {
            assert_eq!(
                Header::decode(&raw_kms_header(env_len, &good)),
                malformed(mismatch),
                "{env_len}"
            );
        }
        for (k, b) in [(74, 20), (76, 20), (75, 19), (75, 21), (0, 20), (75, 0)] {
            assert_eq!(
                Header::decode(&raw_kms_header(99, &kms_env(k, ARN.as_bytes(), b, &blob))),
                malformed(mismatch),
                "k {k} b {b}"
            );
        }

        // Consistent lengths, bad content.
        assert_eq!(
            Header::decode(&raw_kms_header(24, &kms_env(0, b"", 20, &blob))),
            malformed("the KMS key id is empty")
        );
        assert_eq!(
            Header::decode(&raw_kms_header(79, &kms_env(75, ARN.as_bytes(), 0, b""))),
            malformed("the KMS ciphertext blob is empty")
        );
        for bad_id in [&b"caf\xc3\xa9"[..], b"a b", b"a\x00b", b"a\x7fb", b"\xff"] {
            let env = kms_env(bad_id.len() as u16, bad_id, 20, &blob);
            assert_eq!(
                Header::decode(&raw_kms_header(env.len(), &env)),
                malformed("the KMS key id is not printable ASCII"),
                "{bad_id:?}"
            );
        }
        let long_id = [b'k'; MAX_KMS_KEY_ID_LEN + 1];
        let env = kms_env(256, &long_id, 20, &blob);
        assert_eq!(
            Header::decode(&raw_kms_header(env.len(), &env)),
            malformed("the KMS key id is longer than 255 bytes")
        );

        // Padding: right after the envelope and at the very end.
        for pos in [HEADER_FIXED_LEN + 99, 511] {
            let mut h = raw_kms_header(99, &good);
            h[pos] = 1;
            assert_eq!(
                Header::decode(&h),
                malformed("the header padding is not zero"),
                "{pos}"
            );
        }
        // Structure is reported before content: a padding byte does not hide a
        // length mismatch, and an empty key id does not hide dirty padding.
        let mut h = raw_kms_header(98, &good);
        h[511] = 1;
        assert_eq!(Header::decode(&h), malformed(mismatch));
        let mut h = raw_kms_header(24, &kms_env(0, b"", 20, &blob));
        h[511] = 1;
        assert_eq!(
            Header::decode(&h),
            malformed("the header padding is not zero")
        );
    }

    #[test]
    fn general_checks_come_before_kms_specific_ones() {
        let env = kms_env(0, b"", 0, b""); // every KMS check would fail
        let mut h = raw_kms_header(4, &env);
        h[8..10].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(
            Header::decode(&h),
            Err(CryptoError::UnsupportedVersion { found: 4 })
        );
        h[..8].copy_from_slice(b"S3CRYPTF");
        assert_eq!(Header::decode(&h), Err(CryptoError::NotOurFormat));
        let mut h = raw_kms_header(4, &env);
        h[10] = 3;
        assert_eq!(
            Header::decode(&h),
            Err(CryptoError::UnsupportedEnvelope { kind: 3 })
        );
        let mut h = raw_kms_header(4, &env);
        h[15] = 1;
        assert_eq!(
            Header::decode(&h),
            malformed("unknown header flags are set")
        );
        // A truncated kind-2 header.
        let h = raw_kms_header(99, &kms_env(75, ARN.as_bytes(), 20, &[1; 20]));
        assert_eq!(
            Header::decode(&h[..300]),
            malformed("the header is truncated")
        );
    }

    #[test]
    fn file_ids_are_random() {
        let (a, b) = (FileId::random(), FileId::random());
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
    }

    /// Printable ASCII without space, 1..=255 bytes, and a blob that fits beside it.
    fn kms_fields() -> impl Strategy<Value = (String, Vec<u8>)> {
        (1..=MAX_KMS_KEY_ID_LEN).prop_flat_map(|k| {
            (
                proptest::collection::vec(0x21u8..=0x7e, k)
                    .prop_map(|b| b.into_iter().map(char::from).collect::<String>()),
                proptest::collection::vec(
                    any::<u8>(),
                    1..=MAX_ENVELOPE_LEN - KMS_ENVELOPE_FIXED_LEN - k,
                ),
            )
        })
    }

    fn sizes() -> impl Strategy<Value = u64> {
        // Mix small values, values near chunk boundaries and huge values.
        prop_oneof![
            0..300_000u64,
            (0..1_000_000u64, -2i64..=2)
                .prop_map(|(k, d)| (k * CHUNK_PLAIN_LEN).saturating_add_signed(d)),
            0..=MAX_PLAIN_LEN,
        ]
    }

    proptest! {
        #[test]
        fn plain_size_inverts_cipher_size(plain in sizes()) {
            prop_assert_eq!(plain_size(cipher_size(plain)), Ok(plain));
        }

        #[test]
        fn plain_size_accepts_only_the_image_of_cipher_size(cipher in 0..3_000_000u64) {
            match plain_size(cipher) {
                Ok(p) => prop_assert_eq!(cipher_size(p), cipher),
                Err(_) => {
                    // No plaintext size near the estimate maps here.
                    let guess = cipher.saturating_sub(HEADER_LEN) * CHUNK_PLAIN_LEN / CHUNK_CIPHER_LEN;
                    for p in guess.saturating_sub(2)..guess + 2 {
                        prop_assert_ne!(cipher_size(p), cipher);
                    }
                }
            }
        }

        #[test]
        fn chunks_tile_the_object_exactly(plain in prop_oneof![0..1_000_000u64, sizes().prop_map(|s| s % (64 * CHUNK_PLAIN_LEN))]) {
            let count = chunk_count(plain);
            let mut cipher_at = HEADER_LEN;
            let mut plain_at = 0;
            for i in 0..count {
                let r = chunk_cipher_range(i, plain);
                prop_assert_eq!(r.start, cipher_at);
                prop_assert!(r.end - r.start >= CHUNK_OVERHEAD);
                prop_assert!(r.end - r.start <= CHUNK_CIPHER_LEN);
                if i + 1 < count {
                    prop_assert_eq!(r.end - r.start, CHUNK_CIPHER_LEN);
                }
                prop_assert_eq!(r.end - r.start - CHUNK_OVERHEAD, chunk_plain_len(i, plain));
                let pr = chunk_plain_range(i, plain);
                prop_assert_eq!(pr.start, plain_at);
                prop_assert_eq!(pr.end - pr.start, chunk_plain_len(i, plain));
                prop_assert_eq!(is_last_chunk(i, plain), i + 1 == count);
                cipher_at = r.end;
                plain_at = pr.end;
            }
            prop_assert_eq!(cipher_at, cipher_size(plain));
            prop_assert_eq!(plain_at, plain);
            prop_assert!(chunk_cipher_range(count, plain).is_empty());
            // Only an empty file has an empty last chunk.
            prop_assert_eq!(chunk_plain_len(count - 1, plain) == 0, plain == 0);
        }

        #[test]
        fn kms_headers_that_fit_round_trip((key_id, blob) in kms_fields(), id in any::<[u8; 16]>()) {
            let header = Header {
                version: FORMAT_VERSION,
                file_id: FileId(id),
                envelope: Envelope::Kms { key_id: key_id.clone(), blob: blob.clone() },
            };
            let bytes = header.encode().unwrap();
            let env_end = HEADER_FIXED_LEN + KMS_ENVELOPE_FIXED_LEN + key_id.len() + blob.len();
            prop_assert_eq!(&bytes[36..36 + key_id.len()], key_id.as_bytes());
            prop_assert!(bytes[env_end..].iter().all(|&b| b == 0));
            prop_assert_eq!(Header::decode(&bytes), Ok(header));
        }

        #[test]
        fn kms_fields_that_do_not_fit_are_refused(
            key_id in "[!-~]{1,255}", blob_len in 0..1000usize,
        ) {
            let result = kms_header(&key_id, vec![7; blob_len]).encode();
            let fits = blob_len >= 1 && KMS_ENVELOPE_FIXED_LEN + key_id.len() + blob_len <= MAX_ENVELOPE_LEN;
            prop_assert_eq!(result.is_ok(), fits);
        }

        /// Whatever a kind-2 header's envelope bytes and length field hold,
        /// decode does not panic, and what it accepts is exactly what encode
        /// writes (one encoding per header, so no byte escapes the checks).
        /// `shape` 0: all random; 1: consistent lengths; 2: also a key id of ASCII 0x20..=0x7f.
        #[test]
        fn kms_decode_accepts_only_canonical_headers(
            mut env in proptest::collection::vec(any::<u8>(), 0..=MAX_ENVELOPE_LEN),
            k in any::<u16>(), env_len in 0..600usize, shape in 0..3u8, pad_at in 0..2000usize,
        ) {
            let env_len = if shape > 0 && env.len() >= 4 {
                let k = usize::from(k) % (env.len() - 3);
                let at = 2 + k;
                env[..2].copy_from_slice(&u16::try_from(k).unwrap().to_be_bytes());
                let blob_len = u16::try_from(env.len() - at - 2).unwrap();
                env[at..at + 2].copy_from_slice(&blob_len.to_be_bytes());
                if shape == 2 {
                    // Mostly printable, with the odd space or DEL that must be refused.
                    for c in &mut env[2..at] {
                        *c = 0x20 + *c % 96;
                    }
                }
                env.len()
            } else {
                env_len
            };
            let mut bytes = raw_kms_header(env_len, &env);
            // Now and then a stray byte anywhere in the header.
            if let Some(byte) = bytes.get_mut(pad_at) {
                *byte ^= 0x01;
            }
            if let Ok(header) = Header::decode(&bytes) {
                prop_assert_eq!(header.encode().unwrap().to_vec(), bytes);
            }
        }

        #[test]
        fn chunks_for_range_covers_exactly_the_requested_bytes(
            plain in 0..1_000_000u64, offset in 0..1_100_000u64, len in 0..300_000u64,
        ) {
            let chunks = chunks_for_range(offset, len, plain);
            let end = (offset + len).min(plain);
            if offset >= end {
                prop_assert!(chunks.is_empty());
            } else {
                // The chunks cover the range, and dropping either end chunk would not.
                let first = chunk_plain_range(chunks.start, plain);
                let last = chunk_plain_range(chunks.end - 1, plain);
                prop_assert!(first.start <= offset && offset < first.end);
                prop_assert!(last.start < end && end <= last.end);
                prop_assert!(chunks.end <= chunk_count(plain));
            }
        }
    }
}
