//! The typed S3EC envelope and its metadata, as written: key names, algorithm identifiers,
//! [`Envelope`] and [`Envelope::to_metadata`]. Reading metadata back is `detect.rs`.
//!
//! Why a typed envelope: the content parameters are one enum whose variant is the suite (an IV
//! for 0x0072, message id and commitment for 0x0073, a CBC IV for legacy 0x0070), so a V3 object
//! without a commitment or a V2 object with a 28-byte IV cannot be represented, and every later
//! step matches on what the object really is. Nothing here is secret: the data key is wrapped.
//!
//! What is written follows the Java client (S3EC.md §1.3/§1.4): V2 writes all seven keys
//! (`x-amz-matdesc` is `{}` when empty), V3 writes `x-amz-t` / `x-amz-m` only when non-empty, JSON
//! maps are compact with sorted keys, binary values standard base64 with padding.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::error::{shown, S3ecError};

/// The S3EC metadata key names (S3EC.md §1.2–1.4), without the `x-amz-meta-` prefix.
pub mod keys {
    /// V1 encrypted data key.
    pub const KEY_V1: &str = "x-amz-key";
    /// V2 encrypted data key.
    pub const KEY_V2: &str = "x-amz-key-v2";
    /// V1/V2 content IV (12 bytes for GCM, 16 for CBC).
    pub const IV: &str = "x-amz-iv";
    /// V1/V2 content algorithm (`AES/GCM/NoPadding`, legacy `AES/CBC/PKCS5Padding`).
    pub const CEK_ALG: &str = "x-amz-cek-alg";
    /// V1/V2 key wrap algorithm.
    pub const WRAP_ALG: &str = "x-amz-wrap-alg";
    /// V1/V2 material description, or the full KMS encryption context for KMS wraps.
    pub const MATDESC: &str = "x-amz-matdesc";
    /// V2 GCM tag length in bits; always `128`.
    pub const TAG_LEN: &str = "x-amz-tag-len";
    /// Optional plaintext length (written by Go and .NET only).
    pub const UNENCRYPTED_LEN: &str = "x-amz-unencrypted-content-length";
    /// The marker an instruction file carries in its own metadata (value `""`).
    pub const INSTRUCTION_MARKER: &str = "x-amz-crypto-instr-file";
    /// V3 content algorithm; always `115` (suite 0x0073).
    pub const V3_CONTENT: &str = "x-amz-c";
    /// V3 encrypted data key.
    pub const V3_KEY: &str = "x-amz-3";
    /// V3 key wrap algorithm, compressed: `02`, `12`, `22`.
    pub const V3_WRAP: &str = "x-amz-w";
    /// V3 KMS encryption context (JSON).
    pub const V3_CONTEXT: &str = "x-amz-t";
    /// V3 material description for AES/RSA wraps (JSON, omitted when empty).
    pub const V3_MATDESC: &str = "x-amz-m";
    /// V3 key commitment, 28 bytes.
    pub const V3_COMMITMENT: &str = "x-amz-d";
    /// V3 message id, 28 bytes: the HKDF salt (not the GCM IV).
    pub const V3_MESSAGE_ID: &str = "x-amz-i";
}

use keys::*;

/// The prefix S3 puts before every user metadata name on the wire.
pub const META_PREFIX: &str = "x-amz-meta-";
/// Suffix of the instruction file next to an object (`DEFAULT_INSTRUCTION_FILE_SUFFIX` in Java).
pub const INSTRUCTION_SUFFIX: &str = ".instruction";

/// Length of a V2 GCM IV.
pub const GCM_IV_LEN: usize = 12;
/// Length of a legacy CBC IV.
pub const CBC_IV_LEN: usize = 16;
/// Length of a V3 message id (HKDF salt).
pub const MESSAGE_ID_LEN: usize = 28;
/// Length of a V3 key commitment.
pub const COMMITMENT_LEN: usize = 28;
/// The only GCM tag length S3EC uses (Java rejects any other `x-amz-tag-len`).
pub const TAG_LEN_BITS: u32 = 128;

/// Every key of the S3EC key set (S3EC.md §1.2–1.4), the only keys an instruction file may hold.
pub(super) const ALL_KEYS: [&str; 16] = [
    KEY_V1,
    KEY_V2,
    IV,
    CEK_ALG,
    WRAP_ALG,
    MATDESC,
    TAG_LEN,
    UNENCRYPTED_LEN,
    INSTRUCTION_MARKER,
    V3_CONTENT,
    V3_KEY,
    V3_WRAP,
    V3_CONTEXT,
    V3_MATDESC,
    V3_COMMITMENT,
    V3_MESSAGE_ID,
];
/// Keys only V1/V2 objects have.
pub(super) const V12_KEYS: [&str; 7] = [KEY_V1, KEY_V2, IV, CEK_ALG, WRAP_ALG, MATDESC, TAG_LEN];
/// Keys only V3 objects have.
pub(super) const V3_KEYS: [&str; 7] = [
    V3_CONTENT,
    V3_KEY,
    V3_WRAP,
    V3_CONTEXT,
    V3_MATDESC,
    V3_COMMITMENT,
    V3_MESSAGE_ID,
];
/// V3 keys that always stay in object metadata, even with an instruction file.
pub(super) const V3_OBJECT_KEYS: [&str; 3] = [V3_CONTENT, V3_COMMITMENT, V3_MESSAGE_ID];
/// V3 keys that move to the instruction file when one is used.
pub(super) const V3_FILE_KEYS: [&str; 4] = [V3_KEY, V3_WRAP, V3_CONTEXT, V3_MATDESC];

/// The V3 `x-amz-c` value: suite 0x0073 in decimal.
pub(super) const V3_CONTENT_VALUE: &str = "115";

/// The instruction file of `object_key`: `<key>.instruction`.
pub fn instruction_file_key(object_key: &str) -> String {
    format!("{object_key}{INSTRUCTION_SUFFIX}")
}

/// Message format version: what is in the object, not which library version wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormatVersion {
    /// Legacy (`x-amz-key`), always AES-CBC: recognised and reported, never decrypted.
    V1,
    /// `x-amz-key-v2`: AES-GCM under the data key with a random IV, no AAD.
    V2,
    /// Compressed keys (`x-amz-c` …): key-committing suite 0x0073.
    V3,
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FormatVersion::V1 => "V1",
            FormatVersion::V2 => "V2",
            FormatVersion::V3 => "V3",
        })
    }
}

/// The content algorithm suite (S3EC.md §2.1). The CTR suites 0x0071/0x0074 are not listed: they
/// are how ranges of 0x0072/0x0073 objects are read, never what an object declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentSuite {
    /// 0x0070 `AES/CBC/PKCS5Padding`: legacy, unauthenticated; never decrypted here.
    AesCbc,
    /// 0x0072 `AES/GCM/NoPadding`: the V2 format.
    AesGcm,
    /// 0x0073 AES-256-GCM with HKDF-SHA512 key derivation and key commitment: the V3 format.
    AesGcmCommitting,
}

impl ContentSuite {
    /// The algorithm suite id.
    pub const fn id(self) -> u16 {
        match self {
            ContentSuite::AesCbc => 0x0070,
            ContentSuite::AesGcm => 0x0072,
            ContentSuite::AesGcmCommitting => 0x0073,
        }
    }

    /// The suite's name as S3EC binds it into key wraps: the value of `aws:x-amz-cek-alg` in a
    /// KMS encryption context, the AAD of an AES/GCM wrap, the suffix of an RSA pseudo-key. Also
    /// the `x-amz-cek-alg` / `x-amz-c` metadata value.
    pub const fn cek_alg(self) -> &'static str {
        match self {
            ContentSuite::AesCbc => "AES/CBC/PKCS5Padding",
            ContentSuite::AesGcm => "AES/GCM/NoPadding",
            ContentSuite::AesGcmCommitting => V3_CONTENT_VALUE,
        }
    }
}

impl fmt::Display for ContentSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (suite 0x{:04x})", self.cek_alg(), self.id())
    }
}

/// How the data key is wrapped (S3EC.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrapAlg {
    /// `kms+context` / `12`: KMS with an encryption context that binds the content suite.
    KmsContext,
    /// `AES/GCM` / `02`: a customer AES key; the AAD is the content suite's name.
    AesGcm,
    /// `RSA-OAEP-SHA1` / `22`: recognised, not supported yet.
    RsaOaepSha1,
    /// Legacy `kms` (no suite binding).
    LegacyKms,
    /// Legacy `AESWrap` (RFC 3394).
    LegacyAesWrap,
    /// Legacy V1 AES/ECB, inferred when no wrap algorithm is stored and the key is ≤ 48 bytes.
    LegacyAes,
    /// Legacy V1 RSA PKCS#1 v1.5, inferred when no wrap algorithm is stored and the key is longer.
    LegacyRsa,
    /// Legacy `RSA/ECB/OAEPWithSHA-256AndMGF1Padding`.
    LegacyRsaOaepSha256,
}

impl WrapAlg {
    /// The V1/V2 `x-amz-wrap-alg` value (`AES`/`RSA` for the two inferred legacy wraps, which are
    /// never stored).
    pub const fn name(self) -> &'static str {
        match self {
            WrapAlg::KmsContext => "kms+context",
            WrapAlg::AesGcm => "AES/GCM",
            WrapAlg::RsaOaepSha1 => "RSA-OAEP-SHA1",
            WrapAlg::LegacyKms => "kms",
            WrapAlg::LegacyAesWrap => "AESWrap",
            WrapAlg::LegacyAes => "AES",
            WrapAlg::LegacyRsa => "RSA",
            WrapAlg::LegacyRsaOaepSha256 => "RSA/ECB/OAEPWithSHA-256AndMGF1Padding",
        }
    }

    /// The compressed V3 `x-amz-w` value; legacy wraps have none.
    pub const fn v3_code(self) -> Option<&'static str> {
        match self {
            WrapAlg::AesGcm => Some("02"),
            WrapAlg::KmsContext => Some("12"),
            WrapAlg::RsaOaepSha1 => Some("22"),
            _ => None,
        }
    }

    /// KMS wraps store an encryption context; the others a material description.
    pub const fn is_kms(self) -> bool {
        matches!(self, WrapAlg::KmsContext | WrapAlg::LegacyKms)
    }

    /// Wraps that exist only for reading old objects.
    pub const fn is_legacy(self) -> bool {
        self.v3_code().is_none()
    }

    /// Legacy wraps that no metadata names: they follow from the key length.
    const fn is_inferred(self) -> bool {
        matches!(self, WrapAlg::LegacyAes | WrapAlg::LegacyRsa)
    }

    pub(super) fn from_v12(value: &str) -> Result<WrapAlg, S3ecError> {
        Ok(match value {
            "kms+context" => WrapAlg::KmsContext,
            "AES/GCM" => WrapAlg::AesGcm,
            "RSA-OAEP-SHA1" => WrapAlg::RsaOaepSha1,
            "kms" => WrapAlg::LegacyKms,
            "AESWrap" => WrapAlg::LegacyAesWrap,
            "RSA/ECB/OAEPWithSHA-256AndMGF1Padding" => WrapAlg::LegacyRsaOaepSha256,
            other => {
                return Err(S3ecError::UnknownWrapAlgorithm {
                    found: shown(other),
                })
            }
        })
    }

    pub(super) fn from_v3(value: &str) -> Result<WrapAlg, S3ecError> {
        Ok(match value {
            "02" => WrapAlg::AesGcm,
            "12" => WrapAlg::KmsContext,
            "22" => WrapAlg::RsaOaepSha1,
            other => {
                return Err(S3ecError::UnknownWrapAlgorithm {
                    found: shown(other),
                })
            }
        })
    }
}

impl fmt::Display for WrapAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The per-object content parameters; the variant is the content suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentParams {
    /// Suite 0x0072: the random 12-byte GCM IV of `x-amz-iv`.
    Gcm { iv: [u8; GCM_IV_LEN] },
    /// Suite 0x0073: message id (`x-amz-i`, the HKDF salt) and key commitment (`x-amz-d`).
    Committing {
        message_id: [u8; MESSAGE_ID_LEN],
        commitment: [u8; COMMITMENT_LEN],
    },
    /// Suite 0x0070: the 16-byte CBC IV.
    LegacyCbc { iv: [u8; CBC_IV_LEN] },
}

impl ContentParams {
    /// The suite these parameters belong to.
    pub const fn suite(&self) -> ContentSuite {
        match self {
            ContentParams::Gcm { .. } => ContentSuite::AesGcm,
            ContentParams::Committing { .. } => ContentSuite::AesGcmCommitting,
            ContentParams::LegacyCbc { .. } => ContentSuite::AesCbc,
        }
    }

    /// The bytes that make this encryption unique under its data key: the IV, or the V3
    /// message id. Part of a cache key for a data key, beside the object key and ETag.
    pub fn nonce_bytes(&self) -> &[u8] {
        match self {
            ContentParams::Gcm { iv } => iv,
            ContentParams::Committing { message_id, .. } => message_id,
            ContentParams::LegacyCbc { iv } => iv,
        }
    }
}

/// Where the wrap half of an envelope was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataSource {
    /// All of it came from the object's user metadata.
    ObjectMetadata,
    /// The wrap half (V1/V2: everything) came from `<key>.instruction`.
    InstructionFile,
}

/// Everything an S3EC object says about how it is encrypted. Not secret: the data key in it is
/// wrapped. Built by [`detect`](super::detect) and
/// [`complete`](super::PendingInstructionFile::complete) when reading and by `new_object_*` when
/// writing; the variant of [`ContentParams`] always matches the version.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    pub(super) version: FormatVersion,
    pub(super) content: ContentParams,
    pub(super) wrap: WrapAlg,
    pub(super) encrypted_data_key: Vec<u8>,
    pub(super) context: BTreeMap<String, String>,
    pub(super) unencrypted_content_length: Option<u64>,
    pub(super) source: MetadataSource,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("version", &self.version)
            .field("suite", &self.content.suite())
            .field("wrap", &self.wrap)
            .field("encrypted_data_key_len", &self.encrypted_data_key.len())
            .field("context_keys", &self.context.keys().collect::<Vec<_>>())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// An envelope for a new object (`new_object_*` are the callers that uphold the invariants).
    pub(crate) fn for_write(
        version: FormatVersion,
        content: ContentParams,
        wrap: WrapAlg,
        encrypted_data_key: Vec<u8>,
        context: BTreeMap<String, String>,
    ) -> Envelope {
        debug_assert!(matches!(
            (version, &content),
            (FormatVersion::V2, ContentParams::Gcm { .. })
                | (FormatVersion::V3, ContentParams::Committing { .. })
        ));
        Envelope {
            version,
            content,
            wrap,
            encrypted_data_key,
            context,
            unencrypted_content_length: None,
            source: MetadataSource::ObjectMetadata,
        }
    }

    /// The same envelope with another wrapped data key: what re-wrapping (key rotation) makes of it. Everything else
    /// (content parameters, wrap algorithm, context, where it was read from) stays, so the content, the IV or
    /// message id and the V3 key commitment stay valid as long as the new wrap holds the same data key.
    pub fn with_encrypted_data_key(&self, encrypted_data_key: Vec<u8>) -> Envelope {
        Envelope { encrypted_data_key, ..self.clone() }
    }

    /// The message format version.
    pub fn version(&self) -> FormatVersion {
        self.version
    }

    /// The content algorithm suite.
    pub fn suite(&self) -> ContentSuite {
        self.content.suite()
    }

    /// IV, or message id and commitment.
    pub fn content(&self) -> &ContentParams {
        &self.content
    }

    /// How the data key is wrapped.
    pub fn wrap(&self) -> WrapAlg {
        self.wrap
    }

    /// The wrapped data key (`x-amz-key-v2` / `x-amz-3`): a KMS ciphertext blob, or
    /// `IV ‖ ciphertext ‖ tag` of an AES/GCM wrap.
    pub fn encrypted_data_key(&self) -> &[u8] {
        &self.encrypted_data_key
    }

    /// The KMS encryption context (KMS wraps) or the material description (others), `{}` when
    /// absent.
    pub fn context(&self) -> &BTreeMap<String, String> {
        &self.context
    }

    /// GCM tag length in bits (always 128), or `None` for unauthenticated CBC.
    pub fn tag_len_bits(&self) -> Option<u32> {
        match self.content {
            ContentParams::LegacyCbc { .. } => None,
            _ => Some(TAG_LEN_BITS),
        }
    }

    /// `x-amz-unencrypted-content-length`, when the writer stored it (Go and .NET do). Not
    /// authenticated: the size of a GCM object follows from its length (`plain_size`).
    pub fn unencrypted_content_length(&self) -> Option<u64> {
        self.unencrypted_content_length
    }

    /// Whether the wrap half came from an instruction file.
    pub fn source(&self) -> MetadataSource {
        self.source
    }

    /// The S3EC user metadata of this envelope (names without `x-amz-meta-`), exactly the keys
    /// of S3EC.md §1.3/§1.4: V2 writes all seven (`x-amz-matdesc` `{}` when empty, tag length
    /// 128); V3 writes `x-amz-t` / `x-amz-m` only when non-empty, as Java does. JSON maps are
    /// compact with sorted keys. Goes on PutObject or CreateMultipartUpload.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |key: &str, value: String| {
            m.insert(key.to_owned(), value);
        };
        match self.version {
            FormatVersion::V1 | FormatVersion::V2 => {
                let key = if self.version == FormatVersion::V2 {
                    KEY_V2
                } else {
                    KEY_V1
                };
                put(key, BASE64.encode(&self.encrypted_data_key));
                put(IV, BASE64.encode(self.content.nonce_bytes()));
                match self.content {
                    ContentParams::Gcm { .. } => {
                        put(CEK_ALG, ContentSuite::AesGcm.cek_alg().to_owned());
                        put(TAG_LEN, TAG_LEN_BITS.to_string());
                    }
                    ContentParams::LegacyCbc { .. } if self.version == FormatVersion::V2 => {
                        put(CEK_ALG, ContentSuite::AesCbc.cek_alg().to_owned());
                    }
                    _ => {}
                }
                if !self.wrap.is_inferred() {
                    put(WRAP_ALG, self.wrap.name().to_owned());
                }
                put(MATDESC, json_map(&self.context));
            }
            FormatVersion::V3 => {
                put(V3_CONTENT, V3_CONTENT_VALUE.to_owned());
                put(V3_KEY, BASE64.encode(&self.encrypted_data_key));
                let code = self
                    .wrap
                    .v3_code()
                    .expect("invariant broken: a V3 envelope with a legacy wrap");
                put(V3_WRAP, code.to_owned());
                if let ContentParams::Committing {
                    message_id,
                    commitment,
                } = &self.content
                {
                    put(V3_MESSAGE_ID, BASE64.encode(message_id));
                    put(V3_COMMITMENT, BASE64.encode(commitment));
                }
                if !self.context.is_empty() {
                    let key = if self.wrap.is_kms() {
                        V3_CONTEXT
                    } else {
                        V3_MATDESC
                    };
                    put(key, json_map(&self.context));
                }
            }
        }
        if let Some(len) = self.unencrypted_content_length {
            put(UNENCRYPTED_LEN, len.to_string());
        }
        m
    }

    /// The same envelope split for instruction-file mode: the object metadata (V3: `x-amz-c`,
    /// `x-amz-d`, `x-amz-i`; V1/V2: nothing) and the JSON body of `<key>.instruction`. The
    /// instruction file itself must carry the metadata [`INSTRUCTION_MARKER`]`: ""`.
    pub fn to_instruction_file(&self) -> (BTreeMap<String, String>, Vec<u8>) {
        let mut file = self.to_metadata();
        let mut object = BTreeMap::new();
        if self.version == FormatVersion::V3 {
            for key in V3_OBJECT_KEYS.iter().chain([&UNENCRYPTED_LEN]) {
                if let Some((k, v)) = file.remove_entry(*key) {
                    object.insert(k, v);
                }
            }
        }
        let body =
            serde_json::to_vec(&file).expect("invariant broken: a string map failed to serialize");
        (object, body)
    }
}

/// Compact JSON of a string map (sorted keys, as BTreeMap iterates).
pub(super) fn json_map(map: &BTreeMap<String, String>) -> String {
    serde_json::to_string(map).expect("invariant broken: a string map failed to serialize")
}
