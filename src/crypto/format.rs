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
//! This module only parses and lays out bytes; wrapping and unwrapping the data
//! key is `object.rs`'s job.

use std::fmt;
use std::ops::Range;

use super::error::{CryptoError, FormatError};
use super::secret::{write_hex, KeyFingerprint, FINGERPRINT_LEN};

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
/// Bumped on any change to the bytes this module or `object.rs` produce.
pub const FORMAT_VERSION: u16 = 1;
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
/// Largest plaintext the size functions accept: 4 EiB, far beyond any store,
/// chosen so that `cipher_size` can never overflow a `u64`.
pub const MAX_PLAIN_LEN: u64 = 1 << 62;
/// Smallest valid object: a header and one empty chunk.
pub const MIN_CIPHER_LEN: u64 = HEADER_LEN + CHUNK_OVERHEAD;

/// Envelope kind byte: data key wrapped with a customer key (mode cse-c).
pub const ENVELOPE_CUSTOMER_KEY: u8 = 1;
/// Envelope kind byte reserved for a KMS-wrapped data key.
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
    // Kind 2 goes here: `Kms { key_id_len, key_id, ciphertext_blob }`, up to
    // MAX_ENVELOPE_LEN bytes (see docs/FORMAT.md). Until then decode returns
    // `UnsupportedEnvelope { kind: 2 }`.
}

impl Envelope {
    /// The kind byte stored at header offset 10.
    pub fn kind(&self) -> u8 {
        match self {
            Envelope::CustomerKey { .. } => ENVELOPE_CUSTOMER_KEY,
        }
    }

    /// Encoded length, stored at header offset 32.
    pub fn encoded_len(&self) -> usize {
        match self {
            Envelope::CustomerKey { .. } => CUSTOMER_KEY_ENVELOPE_LEN,
        }
    }

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
        }
    }
}

/// A decoded version-1 header.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Header {
    pub file_id: FileId,
    pub envelope: Envelope,
}

/// Header bytes 0..34: everything before the envelope. The data-key wrap
/// authenticates exactly these bytes, so they can only be built one way.
pub(crate) fn header_prefix(
    file_id: &FileId,
    kind: u8,
    envelope_len: usize,
) -> [u8; HEADER_FIXED_LEN] {
    let mut p = [0u8; HEADER_FIXED_LEN];
    p[..OFF_VERSION].copy_from_slice(&MAGIC);
    p[OFF_VERSION..OFF_KIND].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
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
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let env_len = self.envelope.encoded_len();
        let mut h = [0u8; HEADER_LEN as usize];
        h[..HEADER_FIXED_LEN].copy_from_slice(&header_prefix(
            &self.file_id,
            self.envelope.kind(),
            env_len,
        ));
        self.envelope
            .encode_into(&mut h[HEADER_FIXED_LEN..HEADER_FIXED_LEN + env_len]);
        h
    }

    /// Parse the first [`HEADER_LEN`] bytes of `bytes` (longer input is fine:
    /// callers may pass a whole small object).
    ///
    /// Checks run from the most general to the most specific, so a foreign file
    /// reports `NotOurFormat` and a newer one `UnsupportedVersion`, never `Malformed`.
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
        if version != FORMAT_VERSION {
            return Err(CryptoError::UnsupportedVersion { found: version });
        }
        let Some(h) = bytes.get(..HEADER_LEN as usize) else {
            return Err(CryptoError::Malformed {
                what: "the header is truncated",
            });
        };
        let kind = h[OFF_KIND];
        if kind != ENVELOPE_CUSTOMER_KEY {
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
        if env_len != CUSTOMER_KEY_ENVELOPE_LEN {
            return Err(CryptoError::Malformed {
                what: "the envelope length is wrong for its kind",
            });
        }
        let env_end = HEADER_FIXED_LEN + env_len;
        if h[env_end..].iter().any(|&b| b != 0) {
            return Err(CryptoError::Malformed {
                what: "the header padding is not zero",
            });
        }
        let mut file_id = [0u8; FILE_ID_LEN];
        file_id.copy_from_slice(&h[OFF_FILE_ID..OFF_ENVELOPE_LEN]);
        let env = &h[HEADER_FIXED_LEN..env_end];
        let mut fingerprint = [0u8; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(&env[..FINGERPRINT_LEN]);
        let mut wrap_nonce = [0u8; NONCE_LEN];
        wrap_nonce.copy_from_slice(&env[FINGERPRINT_LEN..FINGERPRINT_LEN + NONCE_LEN]);
        let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
        wrapped_key.copy_from_slice(&env[FINGERPRINT_LEN + NONCE_LEN..]);
        Ok(Header {
            file_id: FileId(file_id),
            envelope: Envelope::CustomerKey {
                fingerprint: KeyFingerprint(fingerprint),
                wrap_nonce,
                wrapped_key,
            },
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
