//! The `RSA-OAEP-SHA1` key wrap of S3EC objects (S3EC.md §3.3), the pure part: the private key
//! from PEM text, and the unwrap. Reading the key file is the caller's I/O (`keys`).
//!
//! The wrapped key is RSA-OAEP (SHA-1, MGF1-SHA1, empty label) over a *pseudo data key*:
//!
//! ```text
//! len(DK) (1 byte, 0x20) ‖ DK (32 bytes) ‖ UTF-8(cek-alg: "AES/GCM/NoPadding" (V2) | "115" (V3))
//! ```
//!
//! Why the suffix is checked: metadata is not authenticated, and the suffix is what binds the
//! wrap to the content suite (§3.5). It is compared with the name of the suite the metadata
//! declares, so an object rewritten from V3 to V2 (dropping the key commitment) is refused here.
//! The length byte must be 32: S3EC content is AES-256-GCM, so the 16- and 24-byte data keys the
//! Java reader lets through could not decrypt anything. The length byte and the suffix are
//! compared in constant time; the plaintext length, which OAEP decryption reveals anyway, first.
//!
//! Every failure after the RSA operation (wrong key, changed wrapped key, bad padding, wrong
//! length byte, wrong suffix) is the same [`S3ecError::RsaUnwrapFailed`], so an error tells an
//! attacker who can submit objects nothing about the padding (no Bleichenbacher/Manger oracle;
//! aws-lc checks OAEP padding in constant time and returns one error for all of it).
//!
//! Key formats: PEM `PRIVATE KEY` (PKCS#8) and `RSA PRIVATE KEY` (PKCS#1), unencrypted, RSA 2048
//! to 8192 bits (aws-lc's range). Encrypted PEM is refused with a hint; the file's permissions
//! protect the key, as they protect the key file.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA1_MGF1SHA1};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::super::secret::{DataKey, KEY_LEN};
use super::envelope::{ContentSuite, Envelope, WrapAlg};
use super::error::S3ecError;
use super::wrap::data_key_from_bytes;

/// The length byte of every pseudo data key s3cryptfs accepts: an AES-256 data key.
const PSEUDO_KEY_LEN_BYTE: u8 = KEY_LEN as u8;

/// An RSA private key that unwraps `RSA-OAEP-SHA1` data keys. The key material lives in aws-lc,
/// which clears it when the key is dropped; `Debug` prints nothing of it.
pub struct RsaPrivateKey(OaepPrivateDecryptingKey);

impl fmt::Debug for RsaPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaPrivateKey({} bits, [redacted])", self.bits())
    }
}

/// Why a PEM text is not a usable RSA private key. No message repeats any of the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RsaKeyError {
    /// No `PRIVATE KEY` / `RSA PRIVATE KEY` PEM block.
    #[error(
        "holds no PEM private key (a -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY----- block); \
         convert a DER key with `openssl pkey -inform DER -in KEY -out KEY.pem`"
    )]
    NoPrivateKey,
    /// An encrypted PEM (PKCS#8 `ENCRYPTED PRIVATE KEY`, or a legacy `Proc-Type: 4,ENCRYPTED` block).
    #[error(
        "holds an encrypted private key, which s3cryptfs cannot use; write it unencrypted and keep it private \
         with file permissions: `openssl pkey -in KEY -out PLAIN.pem && chmod 600 PLAIN.pem`"
    )]
    Encrypted,
    /// The PEM block is not valid base64, or has no end line.
    #[error("holds a damaged PEM block ({what})")]
    BadPem { what: &'static str },
    /// aws-lc did not accept the DER inside.
    #[error("holds no RSA private key of 2048 to 8192 bits that aws-lc accepts ({why})")]
    Rejected { why: String },
}

impl RsaPrivateKey {
    /// The key in `pem`: the first `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY` (PKCS#1) block;
    /// other blocks (a certificate beside it, say) are skipped.
    pub fn from_pem(pem: &[u8]) -> Result<RsaPrivateKey, RsaKeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| RsaKeyError::NoPrivateKey)?;
        let (label, der) = private_key_block(text)?;
        let key = match label {
            Label::Pkcs8 => PrivateDecryptingKey::from_pkcs8(&der),
            Label::Pkcs1 => {
                // aws-lc parses PKCS#1 only as a key pair; its PKCS#8 form (a buffer aws-lc
                // zeroizes) then makes the decrypting key.
                let pair = KeyPair::from_der(&der)
                    .map_err(|e| RsaKeyError::Rejected { why: e.to_string() })?;
                let pkcs8 = pair
                    .as_der()
                    .map_err(|e| RsaKeyError::Rejected { why: e.to_string() })?;
                PrivateDecryptingKey::from_pkcs8(AsRef::<[u8]>::as_ref(&*pkcs8))
            }
        }
        .map_err(|e| RsaKeyError::Rejected { why: e.to_string() })?;
        let oaep = OaepPrivateDecryptingKey::new(key)
            .map_err(|e| RsaKeyError::Rejected { why: e.to_string() })?;
        Ok(RsaPrivateKey(oaep))
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.0.key_size_bits()
    }

    /// The key from PKCS#8 DER, for tests that generate keys.
    #[cfg(test)]
    pub(crate) fn from_pkcs8_der(der: &[u8]) -> RsaPrivateKey {
        RsaPrivateKey(
            OaepPrivateDecryptingKey::new(PrivateDecryptingKey::from_pkcs8(der).unwrap()).unwrap(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Pkcs8,
    Pkcs1,
}

/// The label and DER bytes of the first private-key PEM block of `text`.
fn private_key_block(text: &str) -> Result<(Label, Zeroizing<Vec<u8>>), RsaKeyError> {
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let kind = match label {
            "PRIVATE KEY" => Label::Pkcs8,
            "RSA PRIVATE KEY" => Label::Pkcs1,
            "ENCRYPTED PRIVATE KEY" => return Err(RsaKeyError::Encrypted),
            _ => continue, // a certificate, parameters, a public key: not what we look for
        };
        let end = format!("-----END {label}-----");
        let mut body = Zeroizing::new(String::new());
        let mut ended = false;
        for line in lines.by_ref() {
            if line == end {
                ended = true;
                break;
            }
            // RFC 1421 headers only appear in legacy encrypted PKCS#1 blocks.
            if line.starts_with("Proc-Type:") && line.contains("ENCRYPTED") {
                return Err(RsaKeyError::Encrypted);
            }
            if line.contains(':') {
                continue;
            }
            body.push_str(line);
        }
        if !ended {
            return Err(RsaKeyError::BadPem {
                what: "no END line",
            });
        }
        let der =
            Zeroizing::new(
                BASE64
                    .decode(body.as_bytes())
                    .map_err(|_| RsaKeyError::BadPem {
                        what: "invalid base64",
                    })?,
            );
        return Ok((kind, der));
    }
    Err(RsaKeyError::NoPrivateKey)
}

/// Unwrap the data key of an `RSA-OAEP-SHA1`-wrapped envelope with the RSA private key `key`.
///
/// Checks the pseudo data key against the suite the metadata declares (see the module
/// documentation); a V3 object then still needs [`ContentKey::for_decrypt`](super::ContentKey)
/// for its key commitment.
pub fn rsa_oaep_unwrap(key: &RsaPrivateKey, envelope: &Envelope) -> Result<DataKey, S3ecError> {
    match envelope.wrap() {
        WrapAlg::RsaOaepSha1 => {}
        found @ WrapAlg::KmsContext => {
            return Err(S3ecError::WrongWrap {
                found,
                expected: "RSA-OAEP-SHA1",
                hint: "it needs KMS (kms_decrypt_request), not an RSA key",
            })
        }
        found @ WrapAlg::AesGcm => {
            return Err(S3ecError::WrongWrap {
                found,
                expected: "RSA-OAEP-SHA1",
                hint:
                    "it needs the customer key it was wrapped with (aes_gcm_unwrap), not an RSA key",
            })
        }
        found => return Err(S3ecError::UnsupportedWrap { wrap: found }),
    }
    let suite = envelope.suite();
    if suite == ContentSuite::AesCbc {
        return Err(S3ecError::UnsupportedContent { suite });
    }
    let mut out = Zeroizing::new(vec![0u8; key.0.min_output_size()]);
    let plain = key
        .0
        .decrypt(
            &OAEP_SHA1_MGF1SHA1,
            envelope.encrypted_data_key(),
            &mut out,
            None,
        )
        .map_err(|_| S3ecError::RsaUnwrapFailed)?;
    data_key_from_pseudo_key(plain, suite)
}

/// The data key in a decrypted pseudo data key, if its length byte is 32 and its suffix names
/// `suite`.
fn data_key_from_pseudo_key(plain: &[u8], suite: ContentSuite) -> Result<DataKey, S3ecError> {
    let suffix = suite.cek_alg().as_bytes();
    if plain.len() != 1 + KEY_LEN + suffix.len() {
        return Err(S3ecError::RsaUnwrapFailed);
    }
    let (len_byte, rest) = plain.split_at(1);
    let (data_key, found_suffix) = rest.split_at(KEY_LEN);
    let ok = len_byte[0].ct_eq(&PSEUDO_KEY_LEN_BYTE) & found_suffix.ct_eq(suffix);
    if !bool::from(ok) {
        return Err(S3ecError::RsaUnwrapFailed);
    }
    data_key_from_bytes(data_key)
}

/// The pseudo data key of `data_key` for `suite`: what RSA-OAEP encrypts.
#[cfg(test)]
pub(crate) fn pseudo_data_key(data_key: &DataKey, suite: ContentSuite) -> Zeroizing<Vec<u8>> {
    let mut p = Zeroizing::new(Vec::with_capacity(1 + KEY_LEN + suite.cek_alg().len()));
    p.push(PSEUDO_KEY_LEN_BYTE);
    p.extend_from_slice(data_key.as_bytes());
    p.extend_from_slice(suite.cek_alg().as_bytes());
    p
}

/// RSA-OAEP-SHA1 encryption of `plaintext` under the public half of `key`: the writer's side, for
/// tests (s3cryptfs does not write RSA-wrapped objects).
#[cfg(test)]
pub(crate) fn rsa_oaep_encrypt_for_test(key: &PrivateDecryptingKey, plaintext: &[u8]) -> Vec<u8> {
    use aws_lc_rs::rsa::OaepPublicEncryptingKey;
    let public = OaepPublicEncryptingKey::new(key.public_key()).unwrap();
    let mut out = vec![0u8; public.ciphertext_size()];
    let n = public
        .encrypt(&OAEP_SHA1_MGF1SHA1, plaintext, &mut out, None)
        .unwrap()
        .len();
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    use aws_lc_rs::rsa::KeySize;

    use super::super::content::new_object_aes_with;
    use super::super::keys::{KEY_V2, V3_KEY, V3_WRAP, WRAP_ALG};
    use super::super::{
        detect, ContentKey, Detection, WriteFormat, COMMITMENT_LEN, MESSAGE_ID_LEN,
    };
    use super::*;
    use crate::crypto::secret::Key256;

    /// Two RSA-2048 keys, generated once (a key takes tens of milliseconds).
    fn keys() -> &'static (PrivateDecryptingKey, PrivateDecryptingKey) {
        static KEYS: OnceLock<(PrivateDecryptingKey, PrivateDecryptingKey)> = OnceLock::new();
        KEYS.get_or_init(|| {
            (
                PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap(),
                PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap(),
            )
        })
    }

    fn pkcs8(key: &PrivateDecryptingKey) -> Vec<u8> {
        let der = key.as_der().unwrap();
        AsRef::<[u8]>::as_ref(&*der).to_vec()
    }

    fn unwrap_key(key: &PrivateDecryptingKey) -> RsaPrivateKey {
        RsaPrivateKey::from_pkcs8_der(&pkcs8(key))
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = BASE64.encode(der);
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            body.join("\n")
        )
    }

    /// One DER TLV at the start of `der`: (tag, contents, rest).
    fn tlv(der: &[u8]) -> (u8, &[u8], &[u8]) {
        let (tag, first) = (der[0], der[1] as usize);
        let (len, head) = match first {
            n if n < 0x80 => (n, 2),
            0x81 => (der[2] as usize, 3),
            0x82 => ((der[2] as usize) << 8 | der[3] as usize, 4),
            other => panic!("DER length form {other:#x}"),
        };
        (tag, &der[head..head + len], &der[head + len..])
    }

    /// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo`: its third field, an OCTET STRING.
    fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
        let (tag, info, _) = tlv(pkcs8);
        assert_eq!(tag, 0x30);
        let (_, _, rest) = tlv(info); // version
        let (_, _, rest) = tlv(rest); // algorithm
        let (tag, key, _) = tlv(rest);
        assert_eq!(tag, 0x04);
        key.to_vec()
    }

    /// `plain` sealed as an S3EC object of `format` whose data key `dk` is RSA-OAEP-wrapped under `key`
    /// with `pseudo` as the pseudo data key (the right one unless a test says otherwise):
    /// (metadata, body).
    fn rsa_object(
        format: WriteFormat,
        key: &PrivateDecryptingKey,
        dk: &DataKey,
        pseudo: &[u8],
        plain: &[u8],
    ) -> (BTreeMap<String, String>, Vec<u8>) {
        // The content half of an AES/GCM-wrapped object is the same for every wrap; the wrap half is replaced.
        let obj = new_object_aes_with(
            format,
            &Key256::from_bytes(&[9; 32]),
            &BTreeMap::new(),
            dk,
            &[7; MESSAGE_ID_LEN],
            [8; 12],
        )
        .unwrap();
        let body = obj.sealer.encrypt(plain).unwrap();
        let mut md = obj.envelope.to_metadata();
        let edk = BASE64.encode(rsa_oaep_encrypt_for_test(key, pseudo));
        match format {
            WriteFormat::V2 => {
                md.insert(KEY_V2.into(), edk);
                md.insert(WRAP_ALG.into(), "RSA-OAEP-SHA1".into());
            }
            WriteFormat::V3 => {
                md.insert(V3_KEY.into(), edk);
                md.insert(V3_WRAP.into(), "22".into());
            }
        }
        (md, body)
    }

    fn envelope(md: &BTreeMap<String, String>) -> Envelope {
        match detect(md).unwrap() {
            Detection::Complete(e) => e,
            other => panic!("{other:?}"),
        }
    }

    fn suite_of(format: WriteFormat) -> ContentSuite {
        format.suite()
    }

    #[test]
    fn v2_and_v3_objects_unwrap_and_decrypt() {
        let (key, _) = keys();
        for format in [WriteFormat::V2, WriteFormat::V3] {
            let dk = DataKey::from_bytes(&[0x5c; 32]);
            let plain = b"RSA-wrapped S3EC content".repeat(100);
            let (md, body) = rsa_object(
                format,
                key,
                &dk,
                &pseudo_data_key(&dk, suite_of(format)),
                &plain,
            );
            let envelope = envelope(&md);
            assert_eq!(envelope.wrap(), WrapAlg::RsaOaepSha1);
            let got = rsa_oaep_unwrap(&unwrap_key(key), &envelope).unwrap();
            assert_eq!(got.as_bytes(), dk.as_bytes(), "{format:?}");
            let content = ContentKey::for_decrypt(&envelope, &got).unwrap();
            assert_eq!(content.decrypt(&body).unwrap(), plain, "{format:?}");
        }
    }

    #[test]
    fn the_pseudo_key_has_the_layout_of_the_spec() {
        let dk = DataKey::from_bytes(&[0xab; 32]);
        let v2 = pseudo_data_key(&dk, ContentSuite::AesGcm);
        assert_eq!(v2.len(), 1 + 32 + 17);
        assert_eq!(
            (v2[0], &v2[1..33], &v2[33..]),
            (0x20, &[0xab; 32][..], &b"AES/GCM/NoPadding"[..])
        );
        let v3 = pseudo_data_key(&dk, ContentSuite::AesGcmCommitting);
        assert_eq!((v3.len(), v3[0], &v3[33..]), (36, 0x20, &b"115"[..]));
    }

    #[test]
    fn a_wrong_length_byte_fails() {
        let (key, _) = keys();
        let dk = DataKey::from_bytes(&[0x11; 32]);
        for format in [WriteFormat::V2, WriteFormat::V3] {
            let suffix = suite_of(format).cek_alg().as_bytes();
            // 0x1f, 0x21, 0x00 and 0xff before a 32-byte key; 16 before a 16-byte key (AES-128 data keys, which the
            // Java reader lets through, cannot decrypt AES-256-GCM content) and 24 before a 24-byte one.
            let mut cases: Vec<Vec<u8>> = [0x1f, 0x21, 0x00, 0xff]
                .iter()
                .map(|&b| [&[b][..], dk.as_bytes(), suffix].concat())
                .collect();
            cases.push([&[16u8][..], &[0x11; 16], suffix].concat());
            cases.push([&[24u8][..], &[0x11; 24], suffix].concat());
            for pseudo in cases {
                let (md, _) = rsa_object(format, key, &dk, &pseudo, b"x");
                assert_eq!(
                    rsa_oaep_unwrap(&unwrap_key(key), &envelope(&md)).unwrap_err(),
                    S3ecError::RsaUnwrapFailed,
                    "{format:?}, length byte {}",
                    pseudo[0]
                );
            }
        }
    }

    #[test]
    fn a_suffix_of_the_other_version_fails() {
        let (key, _) = keys();
        let dk = DataKey::from_bytes(&[0x22; 32]);
        // A V3 object whose pseudo key names the V2 suite, and the other way round.
        for (format, other) in [
            (WriteFormat::V3, ContentSuite::AesGcm),
            (WriteFormat::V2, ContentSuite::AesGcmCommitting),
        ] {
            let (md, _) = rsa_object(format, key, &dk, &pseudo_data_key(&dk, other), b"x");
            assert_eq!(
                rsa_oaep_unwrap(&unwrap_key(key), &envelope(&md)).unwrap_err(),
                S3ecError::RsaUnwrapFailed,
                "{format:?}"
            );
        }
        // Same length, one byte off, and an empty or longer suffix.
        for suffix in [&b"AES/GCM/NoPaddinG"[..], b"116", b"", b"115 "] {
            let pseudo = [&[32u8][..], dk.as_bytes(), suffix].concat();
            let format = if suffix.len() == 17 {
                WriteFormat::V2
            } else {
                WriteFormat::V3
            };
            let (md, _) = rsa_object(format, key, &dk, &pseudo, b"x");
            assert_eq!(
                rsa_oaep_unwrap(&unwrap_key(key), &envelope(&md)).unwrap_err(),
                S3ecError::RsaUnwrapFailed
            );
        }
    }

    /// A V3 object whose metadata is rewritten as V2 (the commitment dropped) is refused at the unwrap: its pseudo
    /// key names suite 115.
    #[test]
    fn a_v3_object_relabelled_v2_fails() {
        let (key, _) = keys();
        let dk = DataKey::from_bytes(&[0x33; 32]);
        let (v3, _) = rsa_object(
            WriteFormat::V3,
            key,
            &dk,
            &pseudo_data_key(&dk, ContentSuite::AesGcmCommitting),
            b"x",
        );
        let v2: BTreeMap<String, String> = [
            (KEY_V2.to_string(), v3[V3_KEY].clone()),
            (WRAP_ALG.to_string(), "RSA-OAEP-SHA1".to_string()),
            ("x-amz-cek-alg".to_string(), "AES/GCM/NoPadding".to_string()),
            ("x-amz-iv".to_string(), BASE64.encode([1u8; 12])),
            ("x-amz-tag-len".to_string(), "128".to_string()),
        ]
        .into();
        assert_eq!(
            rsa_oaep_unwrap(&unwrap_key(key), &envelope(&v2)).unwrap_err(),
            S3ecError::RsaUnwrapFailed
        );
    }

    #[test]
    fn a_wrong_key_or_a_changed_wrapped_key_fails() {
        let (key, other) = keys();
        let dk = DataKey::from_bytes(&[0x44; 32]);
        for format in [WriteFormat::V2, WriteFormat::V3] {
            let (md, _) = rsa_object(
                format,
                key,
                &dk,
                &pseudo_data_key(&dk, suite_of(format)),
                b"x",
            );
            let e = envelope(&md);
            assert_eq!(
                rsa_oaep_unwrap(&unwrap_key(other), &e).unwrap_err(),
                S3ecError::RsaUnwrapFailed
            );
            let edk = e.encrypted_data_key().to_vec();
            for changed in [
                {
                    let mut b = edk.clone();
                    b[100] ^= 1;
                    b
                },
                edk[..edk.len() - 1].to_vec(),
                [&edk[..], &[0]].concat(),
                Vec::new(),
            ] {
                let e = e.with_encrypted_data_key(changed);
                assert_eq!(
                    rsa_oaep_unwrap(&unwrap_key(key), &e).unwrap_err(),
                    S3ecError::RsaUnwrapFailed
                );
            }
        }
    }

    /// The unwrap does not replace the V3 key commitment: a changed x-amz-d still fails before any content.
    #[test]
    fn the_v3_commitment_is_still_checked() {
        let (key, _) = keys();
        let dk = DataKey::from_bytes(&[0x55; 32]);
        let (mut md, _) = rsa_object(
            WriteFormat::V3,
            key,
            &dk,
            &pseudo_data_key(&dk, ContentSuite::AesGcmCommitting),
            b"x",
        );
        md.insert("x-amz-d".into(), BASE64.encode([0u8; COMMITMENT_LEN]));
        let e = envelope(&md);
        let got = rsa_oaep_unwrap(&unwrap_key(key), &e).unwrap();
        assert_eq!(
            ContentKey::for_decrypt(&e, &got).err(),
            Some(S3ecError::CommitmentMismatch)
        );
    }

    #[test]
    fn other_wraps_are_not_unwrapped_with_an_rsa_key() {
        let (key, _) = keys();
        let dk = DataKey::from_bytes(&[0x66; 32]);
        let (mut md, _) = rsa_object(
            WriteFormat::V2,
            key,
            &dk,
            &pseudo_data_key(&dk, ContentSuite::AesGcm),
            b"x",
        );
        for (wrap, want) in [
            ("AES/GCM", WrapAlg::AesGcm),
            ("kms+context", WrapAlg::KmsContext),
            (
                "RSA/ECB/OAEPWithSHA-256AndMGF1Padding",
                WrapAlg::LegacyRsaOaepSha256,
            ),
        ] {
            md.insert(WRAP_ALG.into(), wrap.into());
            let err = rsa_oaep_unwrap(&unwrap_key(key), &envelope(&md)).unwrap_err();
            match want {
                WrapAlg::LegacyRsaOaepSha256 => {
                    assert_eq!(err, S3ecError::UnsupportedWrap { wrap: want })
                }
                _ => assert!(
                    matches!(err, S3ecError::WrongWrap { found, .. } if found == want),
                    "{err}"
                ),
            }
        }
    }

    #[test]
    fn pem_keys_in_pkcs8_and_pkcs1_load() {
        let (key, _) = keys();
        let der = pkcs8(key);
        let dk = DataKey::from_bytes(&[0x77; 32]);
        let (md, _) = rsa_object(
            WriteFormat::V3,
            key,
            &dk,
            &pseudo_data_key(&dk, ContentSuite::AesGcmCommitting),
            b"x",
        );
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        for text in [
            pem("PRIVATE KEY", &der),
            pem("RSA PRIVATE KEY", &pkcs1_of(&der)),
            pem("PRIVATE KEY", &der).replace('\n', "\r\n"),
            format!("{cert}{}", pem("PRIVATE KEY", &der)),
        ] {
            let loaded = RsaPrivateKey::from_pem(text.as_bytes()).unwrap();
            assert_eq!(loaded.bits(), 2048);
            assert_eq!(
                rsa_oaep_unwrap(&loaded, &envelope(&md)).unwrap().as_bytes(),
                dk.as_bytes()
            );
            let shown = format!("{loaded:?}");
            assert!(shown.contains("redacted") && shown.len() < 60, "{shown}");
        }
    }

    #[test]
    fn unusable_pem_texts_are_refused_with_a_reason() {
        let (key, _) = keys();
        let der = pkcs8(key);
        let good = pem("PRIVATE KEY", &der);
        let cases: Vec<(String, RsaKeyError)> = vec![
            (String::new(), RsaKeyError::NoPrivateKey),
            (BASE64.encode(&der), RsaKeyError::NoPrivateKey),
            (pem("PUBLIC KEY", &der), RsaKeyError::NoPrivateKey),
            (pem("ENCRYPTED PRIVATE KEY", &der), RsaKeyError::Encrypted),
            (
                good.replace("-----BEGIN RSA", "").replace(
                    "-----BEGIN PRIVATE KEY-----\n",
                    "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n",
                ).replace("-----END PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----"),
                RsaKeyError::Encrypted,
            ),
            (good.replace("-----END PRIVATE KEY-----\n", ""), RsaKeyError::BadPem { what: "no END line" }),
            (good.replacen('M', "*", 1), RsaKeyError::BadPem { what: "invalid base64" }),
        ];
        for (text, want) in cases {
            assert_eq!(
                RsaPrivateKey::from_pem(text.as_bytes()).unwrap_err(),
                want,
                "{text}"
            );
        }
        // DER that is not an RSA private key (a PKCS#1 body under the PKCS#8 label, the other way round, a
        // truncated key).
        for text in [
            pem("PRIVATE KEY", &pkcs1_of(&der)),
            pem("RSA PRIVATE KEY", &der),
            pem("PRIVATE KEY", &der[..600]),
        ] {
            let err = RsaPrivateKey::from_pem(text.as_bytes()).unwrap_err();
            assert!(matches!(err, RsaKeyError::Rejected { .. }), "{err}");
        }
        assert_eq!(
            RsaPrivateKey::from_pem(&[0xff, 0xfe]).unwrap_err(),
            RsaKeyError::NoPrivateKey
        );
    }
}
