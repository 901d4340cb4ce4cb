//! Content encryption of S3EC objects: one AES-256-GCM message over the whole object.
//!
//! - V2 (suite 0x0072): key = the data key, nonce = the random `x-amz-iv`, no AAD.
//! - V3 (suite 0x0073): `PRK = HMAC-SHA512(key = message id, data key)`; the 28-byte key
//!   commitment is `HMAC-SHA512(PRK, 00 73 ‖ "COMMITKEY" ‖ 01)[..28]` and the content key (DEK)
//!   `HMAC-SHA512(PRK, 00 73 ‖ "DERIVEKEY" ‖ 01)[..32]` (single-block HKDF-SHA512); nonce = 01×12,
//!   AAD = the two bytes `00 73`.
//!
//! Why [`ContentKey`] and [`ContentSealer`] are different types: a key for reading must never
//! encrypt, because it comes with the object's own nonce (V3's nonce is even a constant), and GCM
//! under a repeated (key, nonce) leaks the XOR of plaintexts and lets anyone forge tags. So only
//! `new_object_*`, which draw a fresh data key and IV / message id, hand out a sealer, and the
//! sealer is consumed by the one encryption it allows.
//!
//! V3 order (S3EC.md §2.3, a MUST of the spec): derive the commitment, compare it with `x-amz-d` in
//! constant time, and only then derive the DEK. A data key that belongs to another object, or a
//! changed message id, fails here before any content is touched.

use std::collections::BTreeMap;

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use hmac::{Hmac, Mac};
use sha2::Sha512;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::super::aead::{AeadBackend, AeadKey, NONCE_LEN};
use super::super::secret::{fill_random, DataKey, Key256, KEY_LEN};
use super::envelope::{
    ContentParams, ContentSuite, Envelope, FormatVersion, WrapAlg, COMMITMENT_LEN, GCM_IV_LEN,
    MESSAGE_ID_LEN,
};
use super::error::S3ecError;
use super::stream::{StreamDecryptor, StreamEncryptor};
use super::wrap::{aes_gcm_wrap_with_iv, check_ascii, KMS_CONTEXT_CEK_ALG};

/// The GCM tag at the end of every S3EC object.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one GCM message: 2^39 − 256 bits = 2^36 − 32 bytes (NIST SP 800-38D).
/// Java checks it on PutObject and cumulatively over multipart parts; larger files are EFBIG.
pub const MAX_PLAINTEXT_LEN: u64 = (1 << 36) - 32;
/// The V3 GCM nonce: all bytes 0x01. Fixed, because every V3 object has its own DEK.
pub const V3_GCM_NONCE: [u8; NONCE_LEN] = [0x01; NONCE_LEN];
/// The V3 content AAD: the suite id 0x0073 as two raw bytes (not the string `"115"`, which is
/// the AES/GCM wrap AAD).
pub const V3_CONTENT_AAD: [u8; 2] = [0x00, 0x73];
/// HKDF info of the V3 content key: suite id ‖ "DERIVEKEY".
const DERIVE_KEY_INFO: &[u8; 11] = b"\x00\x73DERIVEKEY";
/// HKDF info of the V3 key commitment: suite id ‖ "COMMITKEY".
const COMMIT_KEY_INFO: &[u8; 11] = b"\x00\x73COMMITKEY";

type HmacSha512 = Hmac<Sha512>;

/// The format of a new object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WriteFormat {
    /// Suite 0x0072, for readers older than Java v3.6 / Go v3.2.
    V2,
    /// Suite 0x0073 with key commitment: what current clients write and require by default.
    #[default]
    V3,
}

impl WriteFormat {
    /// The content suite this format writes.
    pub const fn suite(self) -> ContentSuite {
        match self {
            WriteFormat::V2 => ContentSuite::AesGcm,
            WriteFormat::V3 => ContentSuite::AesGcmCommitting,
        }
    }

    /// The message format version this format writes.
    pub const fn version(self) -> FormatVersion {
        match self {
            WriteFormat::V2 => FormatVersion::V2,
            WriteFormat::V3 => FormatVersion::V3,
        }
    }
}

/// One HKDF-SHA512 output block (RFC 5869 with L ≤ 64): extract with `salt`, expand `info`.
fn hkdf_sha512_block(ikm: &[u8], salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 64]> {
    let mut extract =
        HmacSha512::new_from_slice(salt).expect("invariant broken: HMAC rejected a key length");
    extract.update(ikm);
    let mut prk = extract.finalize().into_bytes();
    let mut expand =
        HmacSha512::new_from_slice(&prk).expect("invariant broken: HMAC rejected a key length");
    prk.as_mut_slice().zeroize();
    expand.update(info);
    expand.update(&[0x01]);
    let mut okm = expand.finalize().into_bytes();
    let mut out = Zeroizing::new([0u8; 64]);
    out.copy_from_slice(&okm);
    okm.as_mut_slice().zeroize();
    out
}

/// A key in its own zeroizing heap allocation, copied there without a stack temporary.
fn boxed_key(bytes: &[u8; KEY_LEN]) -> Box<Zeroizing<[u8; KEY_LEN]>> {
    let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
    key.copy_from_slice(bytes);
    key
}

/// The V3 key commitment (`x-amz-d`) of a data key and message id.
pub fn v3_commitment(
    data_key: &DataKey,
    message_id: &[u8; MESSAGE_ID_LEN],
) -> [u8; COMMITMENT_LEN] {
    let okm = hkdf_sha512_block(data_key.as_bytes(), message_id, COMMIT_KEY_INFO);
    let mut commitment = [0u8; COMMITMENT_LEN];
    commitment.copy_from_slice(&okm[..COMMITMENT_LEN]);
    commitment
}

/// The V3 content key (DEK). Private: callers reach it only through the commitment check.
pub(super) fn v3_content_key(
    data_key: &DataKey,
    message_id: &[u8; MESSAGE_ID_LEN],
) -> Box<Zeroizing<[u8; KEY_LEN]>> {
    let okm = hkdf_sha512_block(data_key.as_bytes(), message_id, DERIVE_KEY_INFO);
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(&okm[..KEY_LEN]);
    let boxed = boxed_key(&key);
    key.zeroize();
    boxed
}

/// Plaintext size of a GCM object (V2 or V3) from its stored size: stored − 16.
pub fn plain_size(stored_len: u64) -> Result<u64, S3ecError> {
    stored_len
        .checked_sub(TAG_LEN as u64)
        .ok_or(S3ecError::Truncated { len: stored_len })
}

/// EFBIG check: `len` bytes of plaintext fit one GCM message.
pub fn check_plaintext_len(len: u64) -> Result<(), S3ecError> {
    if len > MAX_PLAINTEXT_LEN {
        return Err(S3ecError::TooLarge {
            len,
            max: MAX_PLAINTEXT_LEN,
        });
    }
    Ok(())
}

/// The AES-CTR counter block that encrypts the 16-byte block holding plaintext byte
/// `plain_offset` (S3EC.md §4): `nonce ‖ BE32(2 + offset / 16)`. GCM's first counter `J0 = nonce
/// ‖ 1` masks the tag, so content starts at 2. `nonce` is `x-amz-iv` (V2) or [`V3_GCM_NONCE`].
///
/// Decrypting with it is unauthenticated; see [`ContentKey::apply_keystream_at`].
pub fn ctr_counter_block(
    nonce: &[u8; NONCE_LEN],
    plain_offset: u64,
) -> Result<[u8; 16], S3ecError> {
    if plain_offset >= MAX_PLAINTEXT_LEN {
        return Err(S3ecError::OffsetOutOfRange {
            offset: plain_offset,
        });
    }
    // Below the limit the block index is < 2^32 − 2, so the counter fits 32 bits.
    let counter = u32::try_from(2 + plain_offset / 16)
        .expect("invariant broken: a counter below the GCM limit overflowed 32 bits");
    let mut block = [0u8; 16];
    block[..NONCE_LEN].copy_from_slice(nonce);
    block[NONCE_LEN..].copy_from_slice(&counter.to_be_bytes());
    Ok(block)
}

/// The key, nonce and AAD that decrypt one object's content. Holds a secret; `Debug` hides it.
pub struct ContentKey {
    suite: ContentSuite,
    key: Box<Zeroizing<[u8; KEY_LEN]>>,
    nonce: [u8; NONCE_LEN],
    backend: AeadBackend,
}

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentKey")
            .field("suite", &self.suite)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl ContentKey {
    /// The content key of `envelope` given its unwrapped data key.
    ///
    /// V3 verifies the key commitment first, in constant time ([`S3ecError::CommitmentMismatch`]);
    /// legacy CBC is refused ([`S3ecError::UnsupportedContent`]).
    pub fn for_decrypt(envelope: &Envelope, data_key: &DataKey) -> Result<ContentKey, S3ecError> {
        let (key, nonce) = match envelope.content() {
            ContentParams::Gcm { iv } => (boxed_key(data_key.as_bytes()), *iv),
            ContentParams::Committing {
                message_id,
                commitment,
            } => {
                let derived = v3_commitment(data_key, message_id);
                if !bool::from(derived.ct_eq(commitment)) {
                    return Err(S3ecError::CommitmentMismatch);
                }
                (v3_content_key(data_key, message_id), V3_GCM_NONCE)
            }
            ContentParams::LegacyCbc { .. } => {
                return Err(S3ecError::UnsupportedContent {
                    suite: ContentSuite::AesCbc,
                })
            }
        };
        Ok(ContentKey {
            suite: envelope.suite(),
            key,
            nonce,
            backend: AeadBackend::default(),
        })
    }

    /// Use `backend` for whole-buffer operations (output is identical either way).
    pub fn with_backend(mut self, backend: AeadBackend) -> ContentKey {
        self.backend = backend;
        self
    }

    /// The content suite (0x0072 or 0x0073).
    pub fn suite(&self) -> ContentSuite {
        self.suite
    }

    /// The GCM nonce: `x-amz-iv` for V2, [`V3_GCM_NONCE`] for V3.
    pub fn gcm_nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    fn aad(&self) -> &'static [u8] {
        match self.suite {
            ContentSuite::AesGcmCommitting => &V3_CONTENT_AAD,
            _ => &[],
        }
    }

    /// Decrypt a whole object body (`ciphertext ‖ tag`). Any change to the body or the V2 IV, a
    /// wrong data key, or another object's body is [`S3ecError::AuthenticationFailed`], and no
    /// plaintext is returned. (V3 message ids and data keys were already checked by
    /// [`ContentKey::for_decrypt`].)
    pub fn decrypt(&self, body: &[u8]) -> Result<Vec<u8>, S3ecError> {
        let len = plain_size(body.len() as u64)?;
        check_plaintext_len(len)?;
        let mut out = Vec::with_capacity(body.len() - TAG_LEN);
        AeadKey::new(self.backend, &self.key)
            .open(&self.nonce, self.aad(), body, &mut out)
            .map_err(|_| S3ecError::AuthenticationFailed)?;
        Ok(out)
    }

    /// A streaming decryptor for the body, fed in order; see [`StreamDecryptor`].
    pub fn decryptor(&self) -> StreamDecryptor {
        StreamDecryptor::new(&self.key, &self.nonce, self.aad())
    }

    /// AES-CTR over `buf`, which holds body bytes starting at `offset` (plaintext and ciphertext
    /// offsets are equal): decrypts ciphertext in place. **Unauthenticated**: only for bytes
    /// already checked against an authenticated chunk digest (issue 12 §7.2 B), or behind an
    /// explicit opt-in like Java's `enableLegacyUnauthenticatedModes`. V3 keys exist only after
    /// the commitment check, so that check holds for ranges too.
    pub fn apply_keystream_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), S3ecError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= MAX_PLAINTEXT_LEN)
            .ok_or(S3ecError::OffsetOutOfRange { offset })?;
        if buf.is_empty() {
            return Ok(());
        }
        debug_assert!(end > offset);
        let block = ctr_counter_block(&self.nonce, offset)?;
        let mut ctr = ctr::Ctr32BE::<Aes256>::new((&**self.key).into(), &block.into());
        ctr.seek(offset % 16);
        ctr.apply_keystream(buf);
        Ok(())
    }
}

/// Encrypts the content of one new object, once: consumed by [`ContentSealer::encrypt`] or
/// [`ContentSealer::encryptor`]. Only `new_object_*` make one, with a fresh key and nonce.
#[derive(Debug)]
pub struct ContentSealer(ContentKey);

impl ContentSealer {
    /// The content suite (0x0072 or 0x0073).
    pub fn suite(&self) -> ContentSuite {
        self.0.suite
    }

    /// Encrypt a whole buffer: returns the object body `ciphertext ‖ tag`. EFBIG above
    /// [`MAX_PLAINTEXT_LEN`].
    pub fn encrypt(self, plaintext: &[u8]) -> Result<Vec<u8>, S3ecError> {
        check_plaintext_len(plaintext.len() as u64)?;
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        AeadKey::new(self.0.backend, &self.0.key).seal(
            &self.0.nonce,
            self.0.aad(),
            plaintext,
            &mut out,
        );
        Ok(out)
    }

    /// The key that decrypts what this sealer encrypts, for a writer that indexes the object it just
    /// wrote (its chunk digests from [`StreamEncryptor::with_digests`]) so that reading it back needs
    /// no verification pass. The reverse (a sealer from a decrypting key) does not exist.
    pub fn decrypting_key(&self) -> ContentKey {
        // Copied straight into its zeroizing box: no unzeroized copy of the key on the stack.
        let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        key.copy_from_slice(&self.0.key[..]);
        ContentKey { suite: self.0.suite, key, nonce: self.0.nonce, backend: self.0.backend }
    }

    /// A streaming encryptor, for content fed in order (multipart parts); see
    /// [`StreamEncryptor`].
    pub fn encryptor(self) -> StreamEncryptor {
        StreamEncryptor::new(&self.0.key, &self.0.nonce, self.0.aad())
    }
}

/// A new object: the envelope whose [`Envelope::to_metadata`] goes on PutObject or
/// CreateMultipartUpload, and the sealer for its content.
#[derive(Debug)]
pub struct NewObject {
    pub envelope: Envelope,
    pub sealer: ContentSealer,
}

/// A new object wrapped under the customer key `kek` (`AES/GCM`): fresh data key, IV or message
/// id, and wrap IV. `material_description` (ASCII; `{}` for none) is stored unauthenticated and
/// is how Java picks the key among several; a key id there helps key rotation.
pub fn new_object_aes(
    format: WriteFormat,
    kek: &Key256,
    material_description: &BTreeMap<String, String>,
) -> Result<NewObject, S3ecError> {
    let mut nonce = [0u8; MESSAGE_ID_LEN];
    fresh_nonce(&mut nonce);
    let mut wrap_iv = [0u8; NONCE_LEN];
    fill_random(&mut wrap_iv);
    new_object_aes_with(
        format,
        kek,
        material_description,
        &DataKey::generate(),
        &nonce,
        wrap_iv,
    )
}

/// [`new_object_aes`] with every random input given, for known-answer tests. `nonce` is the
/// message id (V3) or starts with the IV (V2).
pub(crate) fn new_object_aes_with(
    format: WriteFormat,
    kek: &Key256,
    material_description: &BTreeMap<String, String>,
    data_key: &DataKey,
    nonce: &[u8; MESSAGE_ID_LEN],
    wrap_iv: [u8; NONCE_LEN],
) -> Result<NewObject, S3ecError> {
    check_ascii(material_description)?;
    let edk = aes_gcm_wrap_with_iv(kek, data_key, format.suite(), wrap_iv)?;
    Ok(assemble(
        format,
        WrapAlg::AesGcm,
        edk,
        material_description.clone(),
        data_key,
        nonce,
    ))
}

/// A new object whose data key came from KMS `GenerateDataKey` (`KeySpec=AES_256`) called with
/// `context` = [`super::kms_context_for_write`]`(…, format)`: `data_key` is its `Plaintext`,
/// `ciphertext_blob` its `CiphertextBlob`. The context is checked to bind this format's suite.
pub fn new_object_kms(
    format: WriteFormat,
    data_key: &DataKey,
    ciphertext_blob: Vec<u8>,
    context: BTreeMap<String, String>,
) -> Result<NewObject, S3ecError> {
    let mut nonce = [0u8; MESSAGE_ID_LEN];
    fresh_nonce(&mut nonce);
    new_object_kms_with(format, data_key, ciphertext_blob, context, &nonce)
}

/// [`new_object_kms`] with the IV or message id given, for known-answer tests.
pub(crate) fn new_object_kms_with(
    format: WriteFormat,
    data_key: &DataKey,
    ciphertext_blob: Vec<u8>,
    context: BTreeMap<String, String>,
    nonce: &[u8; MESSAGE_ID_LEN],
) -> Result<NewObject, S3ecError> {
    if context.get(KMS_CONTEXT_CEK_ALG).map(String::as_str) != Some(format.suite().cek_alg()) {
        return Err(S3ecError::ContextAlgorithmMismatch {
            expected: format.suite().cek_alg(),
        });
    }
    check_ascii(&context)?;
    if ciphertext_blob.is_empty() {
        return Err(S3ecError::InvalidValue {
            key: match format {
                WriteFormat::V2 => super::envelope::keys::KEY_V2,
                WriteFormat::V3 => super::envelope::keys::V3_KEY,
            },
            what: "the encrypted data key is empty",
        });
    }
    Ok(assemble(
        format,
        WrapAlg::KmsContext,
        ciphertext_blob,
        context,
        data_key,
        nonce,
    ))
}

/// Random bytes that are not all zero (S3EC writers SHOULD reject an all-zero IV/message id).
fn fresh_nonce(buf: &mut [u8]) {
    loop {
        fill_random(buf);
        if buf.iter().any(|b| *b != 0) {
            return;
        }
    }
}

fn assemble(
    format: WriteFormat,
    wrap: WrapAlg,
    encrypted_data_key: Vec<u8>,
    context: BTreeMap<String, String>,
    data_key: &DataKey,
    nonce: &[u8; MESSAGE_ID_LEN],
) -> NewObject {
    let (content, key, gcm_nonce) = match format {
        WriteFormat::V2 => {
            let mut iv = [0u8; GCM_IV_LEN];
            iv.copy_from_slice(&nonce[..GCM_IV_LEN]);
            (
                ContentParams::Gcm { iv },
                boxed_key(data_key.as_bytes()),
                iv,
            )
        }
        WriteFormat::V3 => (
            ContentParams::Committing {
                message_id: *nonce,
                commitment: v3_commitment(data_key, nonce),
            },
            v3_content_key(data_key, nonce),
            V3_GCM_NONCE,
        ),
    };
    let envelope =
        Envelope::for_write(format.version(), content, wrap, encrypted_data_key, context);
    NewObject {
        envelope,
        sealer: ContentSealer(ContentKey {
            suite: format.suite(),
            key,
            nonce: gcm_nonce,
            backend: AeadBackend::default(),
        }),
    }
}
