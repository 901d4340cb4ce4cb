//! Data-key wrapping for S3EC objects, the pure part: AES/GCM with a customer key, and the
//! encryption contexts and checks around KMS (the KMS calls themselves are the caller's I/O).
//!
//! Why each wrap binds the content suite: metadata is not authenticated, so an attacker could
//! rewrite a V3 object's keys as V2 (no commitment) or swap the suite name. Every wrap therefore
//! authenticates the suite name (S3EC.md §3.5): the AES/GCM wrap takes it as AAD, and a KMS
//! encryption context carries it as `aws:x-amz-cek-alg`, which KMS authenticates and
//! [`kms_decrypt_request`] compares with the metadata before any KMS call.
//!
//! RSA-OAEP-SHA1 is unwrapped in `rsa.rs` (its suffix binds the suite); the legacy wraps are
//! recognised by the codec and refused here with [`S3ecError::UnsupportedWrap`].

use std::collections::BTreeMap;

use super::super::aead::{self, AeadBackend, NONCE_LEN, TAG_LEN};
use super::super::secret::{fill_random, DataKey, Key256, KEY_LEN};
use super::content::WriteFormat;
use super::envelope::{ContentSuite, Envelope, FormatVersion, WrapAlg};
use super::error::S3ecError;

/// The reserved encryption-context key that carries the content suite name.
pub const KMS_CONTEXT_CEK_ALG: &str = "aws:x-amz-cek-alg";
/// The reserved encryption-context key of legacy `kms` wraps (`{"kms_cmk_id": "<key id>"}`).
pub const KMS_CONTEXT_CMK_ID: &str = "kms_cmk_id";
/// Length of an AES/GCM-wrapped data key: `IV (12) ‖ ciphertext (32) ‖ tag (16)`.
pub const AES_GCM_WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// Wrap `data_key` under the customer key `kek` for content suite `suite`, with a fresh random
/// IV: the `x-amz-key-v2` / `x-amz-3` bytes of an `AES/GCM` wrap.
pub fn aes_gcm_wrap(
    kek: &Key256,
    data_key: &DataKey,
    suite: ContentSuite,
) -> Result<Vec<u8>, S3ecError> {
    let mut iv = [0u8; NONCE_LEN];
    fill_random(&mut iv);
    aes_gcm_wrap_with_iv(kek, data_key, suite, iv)
}

/// [`aes_gcm_wrap`] with a given IV, for known-answer tests.
pub(crate) fn aes_gcm_wrap_with_iv(
    kek: &Key256,
    data_key: &DataKey,
    suite: ContentSuite,
    iv: [u8; NONCE_LEN],
) -> Result<Vec<u8>, S3ecError> {
    if suite == ContentSuite::AesCbc {
        return Err(S3ecError::UnsupportedContent { suite });
    }
    let mut out = Vec::with_capacity(AES_GCM_WRAPPED_LEN);
    out.extend_from_slice(&iv);
    aead::seal(
        AeadBackend::default(),
        kek.as_bytes(),
        &iv,
        suite.cek_alg().as_bytes(),
        data_key.as_bytes(),
        &mut out,
    );
    Ok(out)
}

/// Unwrap the data key of an `AES/GCM`-wrapped envelope with the customer key `kek`.
///
/// The AAD is the name of the suite the metadata declares, so a rewritten `x-amz-cek-alg` /
/// `x-amz-c` fails here as [`S3ecError::KeyUnwrapFailed`], like a wrong key or a modified
/// wrapped key. The material description is not authenticated; it only helps pick the key.
pub fn aes_gcm_unwrap(kek: &Key256, envelope: &Envelope) -> Result<DataKey, S3ecError> {
    match envelope.wrap() {
        WrapAlg::AesGcm => {}
        found if found.is_kms() => {
            return Err(S3ecError::WrongWrap {
                found,
                expected: "AES/GCM",
                hint: "it needs KMS (kms_decrypt_request), not a customer key",
            })
        }
        found => return Err(S3ecError::UnsupportedWrap { wrap: found }),
    }
    let suite = envelope.suite();
    if suite == ContentSuite::AesCbc {
        return Err(S3ecError::UnsupportedContent { suite });
    }
    let edk = envelope.encrypted_data_key();
    if edk.len() != AES_GCM_WRAPPED_LEN {
        // .NET also allows 16- and 24-byte data keys; S3EC's suites are all AES-256.
        return Err(S3ecError::KeyUnwrapFailed);
    }
    let (iv, sealed) = edk.split_at(NONCE_LEN);
    let iv: [u8; NONCE_LEN] = iv
        .try_into()
        .expect("invariant broken: split_at gave a wrong IV length");
    let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(KEY_LEN));
    aead::open(
        AeadBackend::default(),
        kek.as_bytes(),
        &iv,
        suite.cek_alg().as_bytes(),
        sealed,
        &mut plain,
    )
    .map_err(|_| S3ecError::KeyUnwrapFailed)?;
    data_key_from_bytes(&plain)
}

/// The encryption context for KMS `GenerateDataKey` when writing: `user_context` plus
/// `aws:x-amz-cek-alg` = `AES/GCM/NoPadding` (V2) or `115` (V3). Store the result as it is; the
/// envelope writes it to `x-amz-matdesc` / `x-amz-t`.
///
/// Refuses the reserved keys (`aws:x-amz-cek-alg` as Java does, `kms_cmk_id` as PHP does: readers
/// strip it before comparing, so it would never match) and non-ASCII text, which S3 would mangle
/// (S3EC.md §1.1). Keep `user_context` empty for objects AWS clients must read without being told
/// the context: Java and Python refuse stored keys they were not given (§3.1).
pub fn kms_context_for_write(
    user_context: &BTreeMap<String, String>,
    format: WriteFormat,
) -> Result<BTreeMap<String, String>, S3ecError> {
    for reserved in [KMS_CONTEXT_CEK_ALG, KMS_CONTEXT_CMK_ID] {
        if user_context.contains_key(reserved) {
            return Err(S3ecError::ReservedContextKey { key: reserved });
        }
    }
    check_ascii(user_context)?;
    let mut context = user_context.clone();
    context.insert(
        KMS_CONTEXT_CEK_ALG.to_owned(),
        format.suite().cek_alg().to_owned(),
    );
    Ok(context)
}

/// What to send to KMS `Decrypt` for a `kms+context` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsDecryptRequest {
    /// `CiphertextBlob`: the encrypted data key.
    pub ciphertext_blob: Vec<u8>,
    /// `EncryptionContext`: the stored context, verbatim (KMS authenticates it).
    pub encryption_context: BTreeMap<String, String>,
}

/// Check a `kms+context` envelope and build its KMS `Decrypt` request.
///
/// `expected_context` is the context the reader expects beyond the reserved keys (`{}` by
/// default, as in Java and Python). Checks, before any KMS call:
/// - the wrap is `kms+context` (legacy `kms` has no suite binding and is refused);
/// - `expected_context` uses no reserved key;
/// - the stored context without `aws:x-amz-cek-alg` and `kms_cmk_id` equals `expected_context`
///   (Java and Python always check this);
/// - the stored `aws:x-amz-cek-alg` names the suite the metadata declares (Go checks this;
///   without it a V3 object rewritten as V2 would decrypt without its commitment).
///
/// KMS then refuses the blob unless the context is exactly the one it was generated with.
pub fn kms_decrypt_request(
    envelope: &Envelope,
    expected_context: &BTreeMap<String, String>,
) -> Result<KmsDecryptRequest, S3ecError> {
    match envelope.wrap() {
        WrapAlg::KmsContext => {}
        found @ WrapAlg::AesGcm => {
            return Err(S3ecError::WrongWrap {
                found,
                expected: "kms+context",
                hint: "it needs the customer key it was wrapped with (aes_gcm_unwrap), not KMS",
            })
        }
        found => return Err(S3ecError::UnsupportedWrap { wrap: found }),
    }
    let suite = envelope.suite();
    if suite == ContentSuite::AesCbc {
        return Err(S3ecError::UnsupportedContent { suite });
    }
    for reserved in [KMS_CONTEXT_CEK_ALG, KMS_CONTEXT_CMK_ID] {
        if expected_context.contains_key(reserved) {
            return Err(S3ecError::ReservedContextKey { key: reserved });
        }
    }
    let stored = envelope.context();
    let user_part = stored
        .iter()
        .filter(|(k, _)| *k != KMS_CONTEXT_CEK_ALG && *k != KMS_CONTEXT_CMK_ID);
    if !user_part.eq(expected_context.iter()) {
        return Err(S3ecError::EncryptionContextMismatch);
    }
    if stored.get(KMS_CONTEXT_CEK_ALG).map(String::as_str) != Some(suite.cek_alg()) {
        return Err(S3ecError::ContextAlgorithmMismatch {
            expected: suite.cek_alg(),
        });
    }
    debug_assert!(envelope.version() != FormatVersion::V1);
    Ok(KmsDecryptRequest {
        ciphertext_blob: envelope.encrypted_data_key().to_vec(),
        encryption_context: stored.clone(),
    })
}

/// The data key from KMS `GenerateDataKey` / `Decrypt` `Plaintext`, which must be 32 bytes.
pub fn data_key_from_bytes(plaintext: &[u8]) -> Result<DataKey, S3ecError> {
    let bytes: &[u8; KEY_LEN] = plaintext
        .try_into()
        .map_err(|_| S3ecError::InvalidDataKey {
            len: plaintext.len(),
        })?;
    Ok(DataKey::from_bytes(bytes))
}

/// ASCII only in a context or material description (S3EC.md §1.1: S3 RFC 2047-encodes anything
/// else, and the Python client refuses it).
pub(crate) fn check_ascii(map: &BTreeMap<String, String>) -> Result<(), S3ecError> {
    if map.iter().all(|(k, v)| k.is_ascii() && v.is_ascii()) {
        Ok(())
    } else {
        Err(S3ecError::NonAsciiContext)
    }
}
