//! Reading S3EC metadata: from an object's user metadata (and its instruction file) to a typed
//! [`Envelope`].
//!
//! Why so strict: nothing in an S3EC object's metadata is authenticated by the content tag, and
//! each client resolves odd combinations differently (Java reads V1/V2 from the instruction file
//! alone, Python lets object metadata override it). Any combination on which two readers could
//! disagree is therefore refused rather than resolved, so an attacker who can rewrite metadata
//! cannot make s3cryptfs decrypt something a reference client would not.
//!
//! Detection follows S3EC.md §1.5 (Java's `ContentMetadataDecodingStrategy.decode`) plus the
//! hardening of the Python client:
//! 1. more than one of `x-amz-key`, `x-amz-key-v2`, `x-amz-3` → error;
//! 2. `x-amz-iv` and (`x-amz-key` or `x-amz-key-v2`) → V1/V2 from object metadata (no V3 key may
//!    be present);
//! 3. `x-amz-3`, `x-amz-d`, `x-amz-i`, `x-amz-c` → V3 from object metadata (no V1/V2 key);
//! 4. `x-amz-c`, `x-amz-d`, `x-amz-i` without `x-amz-3` → V3 whose wrap half is in
//!    `<key>.instruction`, which must not repeat c/d/i;
//! 5. otherwise every S3EC key must come from a V1/V2 instruction file, and the object itself may
//!    carry none (an ordinary unencrypted object lands here too: its instruction file is missing).
//!
//! Metadata names are matched case-insensitively, with or without the `x-amz-meta-` prefix (as Go
//! does); unrelated names (s3cryptfs's own `mode`, `uid`, …) are ignored. Instruction-file keys
//! must be exact, and unrelated keys there are refused (as Python does).

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use super::envelope::keys::*;
use super::envelope::{
    ContentParams, ContentSuite, Envelope, FormatVersion, MetadataSource, WrapAlg, ALL_KEYS,
    META_PREFIX, V12_KEYS, V3_CONTENT_VALUE, V3_FILE_KEYS, V3_KEYS, V3_OBJECT_KEYS,
};
use super::error::{shown, S3ecError};

/// The result of reading an object's metadata.
#[derive(Debug)]
pub enum Detection {
    /// The envelope is complete.
    Complete(Envelope),
    /// Fetch `<key>.instruction` ([`instruction_file_key`](super::instruction_file_key)) and call
    /// [`PendingInstructionFile::complete`] with its body.
    NeedsInstructionFile(PendingInstructionFile),
}

/// An object whose envelope (or its wrap half) is in an instruction file.
#[derive(Debug, Clone)]
pub struct PendingInstructionFile {
    object: Meta,
    v3: bool,
}

impl PendingInstructionFile {
    /// V3 (the object holds c/d/i) rather than V1/V2 (everything is in the file).
    pub fn is_v3(&self) -> bool {
        self.v3
    }

    /// False when the object carries no S3EC key at all: then it is most likely an ordinary
    /// unencrypted object, and a missing instruction file means exactly that.
    pub fn object_has_s3ec_metadata(&self) -> bool {
        !self.object.0.is_empty()
    }

    /// Complete the envelope from the instruction file's body.
    pub fn complete(&self, instruction_body: &[u8]) -> Result<Envelope, S3ecError> {
        let mut file = parse_instruction_file_meta(instruction_body)?;
        if self.v3 {
            if file.has_any(&V3_OBJECT_KEYS) {
                return Err(S3ecError::InvalidInstructionFile {
                    what: "it holds x-amz-c, x-amz-d or x-amz-i, which a V3 object keeps in its own metadata",
                });
            }
            if file.has_any(&V12_KEYS) {
                return Err(S3ecError::InvalidInstructionFile {
                    what: "it holds V1/V2 keys, but the object is V3",
                });
            }
            for key in V3_OBJECT_KEYS.into_iter().chain([UNENCRYPTED_LEN]) {
                file.merge_from(&self.object, key)?;
            }
            parse_v3(&file, MetadataSource::InstructionFile)
        } else {
            if file.has_any(&V3_KEYS) {
                return Err(S3ecError::InvalidInstructionFile {
                    what: "it holds V3 keys, but the object's metadata has no V3 content keys",
                });
            }
            check_single_data_key(&file)?;
            if !(file.has(IV) && (file.has(KEY_V1) || file.has(KEY_V2))) {
                return Err(S3ecError::InvalidInstructionFile {
                    what: "it lacks x-amz-iv or the encrypted data key (x-amz-key / x-amz-key-v2)",
                });
            }
            file.merge_from(&self.object, UNENCRYPTED_LEN)?;
            parse_v12(&file, MetadataSource::InstructionFile)
        }
    }
}

/// Read an object's user metadata (names without `x-amz-meta-`, as the store hands them over;
/// the prefixed form and any case are accepted too).
///
/// V1 objects are recognised and returned as such; decrypting them is refused later.
pub fn detect<I, K, V>(metadata: I) -> Result<Detection, S3ecError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let md = Meta::from_object_metadata(metadata)?;
    if md.has(INSTRUCTION_MARKER) {
        return Err(S3ecError::IsInstructionFile);
    }
    check_single_data_key(&md)?;
    if md.has(IV) && (md.has(KEY_V1) || md.has(KEY_V2)) {
        if md.has_any(&V3_KEYS) {
            return Err(S3ecError::ConflictingKeys {
                what: "V1/V2 keys together with V3 keys",
            });
        }
        return parse_v12(&md, MetadataSource::ObjectMetadata).map(Detection::Complete);
    }
    if md.has(V3_KEY) && md.has_all(&V3_OBJECT_KEYS) {
        if md.has_any(&V12_KEYS) {
            return Err(S3ecError::ConflictingKeys {
                what: "V3 keys together with V1/V2 keys",
            });
        }
        return parse_v3(&md, MetadataSource::ObjectMetadata).map(Detection::Complete);
    }
    if md.has_all(&V3_OBJECT_KEYS) {
        if md.has_any(&V12_KEYS) {
            return Err(S3ecError::ConflictingKeys {
                what: "V3 keys together with V1/V2 keys",
            });
        }
        // Java takes these from the instruction file, Python lets the object's copy win: refuse
        // rather than pick one.
        if md.has_any(&V3_FILE_KEYS) {
            return Err(S3ecError::ConflictingKeys {
                what: "x-amz-w, x-amz-t or x-amz-m in object metadata, but x-amz-3 in the instruction file",
            });
        }
        return Ok(Detection::NeedsInstructionFile(PendingInstructionFile {
            object: md,
            v3: true,
        }));
    }
    // Everything must come from a V1/V2 instruction file, so the object may hold no S3EC key but
    // the optional plaintext length. Name the first missing key of what it seems to be.
    for key in [KEY_V1, KEY_V2] {
        if md.has(key) {
            return Err(S3ecError::MissingKey { key: IV });
        }
    }
    if md.has_any(&V3_KEYS) {
        let missing = [V3_CONTENT, V3_COMMITMENT, V3_MESSAGE_ID]
            .into_iter()
            .find(|key| !md.has(key))
            .unwrap_or(V3_KEY);
        return Err(S3ecError::MissingKey { key: missing });
    }
    if md.has_any(&V12_KEYS) {
        return Err(S3ecError::ConflictingKeys {
            what: "V1/V2 content keys in the object metadata but no encrypted data key",
        });
    }
    Ok(Detection::NeedsInstructionFile(PendingInstructionFile {
        object: md,
        v3: false,
    }))
}

/// Parse an instruction file's body: a JSON object of S3EC keys to strings (the tag length and
/// plaintext length may be JSON numbers, as Go writes them). Keys outside the S3EC key set,
/// repeated keys and other value types are refused.
pub fn parse_instruction_file(body: &[u8]) -> Result<BTreeMap<String, String>, S3ecError> {
    Ok(parse_instruction_file_meta(body)?
        .0
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect())
}

fn parse_instruction_file_meta(body: &[u8]) -> Result<Meta, S3ecError> {
    let entries: StrictMap =
        serde_json::from_slice(body).map_err(|_| S3ecError::InvalidInstructionFile {
            what: "it is not a JSON object",
        })?;
    let mut meta = Meta::default();
    for (name, value) in entries.0 {
        let key =
            ALL_KEYS
                .into_iter()
                .find(|k| *k == name)
                .ok_or(S3ecError::InvalidInstructionFile {
                    what: "it holds a key outside the S3EC key set",
                })?;
        let value = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n)
                if (key == TAG_LEN || key == UNENCRYPTED_LEN) && n.is_u64() =>
            {
                n.to_string()
            }
            _ => {
                return Err(S3ecError::InvalidInstructionFile {
                    what: "a value is not a JSON string",
                })
            }
        };
        if meta.0.insert(key, value).is_some() {
            return Err(S3ecError::DuplicateKey { key });
        }
    }
    Ok(meta)
}

/// Exactly one encrypted data key key.
fn check_single_data_key(md: &Meta) -> Result<(), S3ecError> {
    if [KEY_V1, KEY_V2, V3_KEY]
        .iter()
        .filter(|k| md.has(k))
        .count()
        > 1
    {
        return Err(S3ecError::ConflictingKeys {
            what: "more than one of x-amz-key, x-amz-key-v2 and x-amz-3",
        });
    }
    Ok(())
}

fn parse_v12(m: &Meta, source: MetadataSource) -> Result<Envelope, S3ecError> {
    let (version, key_name) = if m.has(KEY_V2) {
        (FormatVersion::V2, KEY_V2)
    } else {
        (FormatVersion::V1, KEY_V1)
    };
    let encrypted_data_key = decode_key(m, key_name)?;
    // Java reads an absent algorithm as CBC; the suite-115 name exists only in V3.
    let suite = match m.get(CEK_ALG) {
        None => ContentSuite::AesCbc,
        Some(v) if v == ContentSuite::AesCbc.cek_alg() => ContentSuite::AesCbc,
        Some(v) if v == ContentSuite::AesGcm.cek_alg() => ContentSuite::AesGcm,
        Some(v) if v == V3_CONTENT_VALUE => {
            return Err(S3ecError::InvalidValue {
                key: CEK_ALG,
                what: "suite 115 exists only in the V3 format (x-amz-c)",
            })
        }
        Some(other) => {
            return Err(S3ecError::UnknownContentAlgorithm {
                found: shown(other),
            })
        }
    };
    if version == FormatVersion::V1 && suite != ContentSuite::AesCbc {
        return Err(S3ecError::InvalidValue {
            key: CEK_ALG,
            what: "V1 objects (x-amz-key) are always AES-CBC",
        });
    }
    let iv = decode(IV, m.require(IV)?)?;
    let content = match suite {
        ContentSuite::AesGcm => {
            if m.require(TAG_LEN)? != "128" {
                return Err(S3ecError::InvalidValue {
                    key: TAG_LEN,
                    what: "S3EC GCM tags are always 128 bits",
                });
            }
            ContentParams::Gcm {
                iv: fixed(IV, iv, "a GCM IV is 12 bytes")?,
            }
        }
        _ => ContentParams::LegacyCbc {
            iv: fixed(IV, iv, "a CBC IV is 16 bytes")?,
        },
    };
    let wrap = match m.get(WRAP_ALG) {
        Some(name) => WrapAlg::from_v12(name)?,
        // Java's rule for V1 objects: an AES-wrapped 32-byte key is at most 48 bytes.
        None if suite == ContentSuite::AesCbc && encrypted_data_key.len() > 48 => {
            WrapAlg::LegacyRsa
        }
        None if suite == ContentSuite::AesCbc => WrapAlg::LegacyAes,
        None => return Err(S3ecError::MissingKey { key: WRAP_ALG }),
    };
    Ok(Envelope {
        version,
        content,
        wrap,
        encrypted_data_key,
        context: parse_json_map(MATDESC, m.get(MATDESC).unwrap_or("{}"))?,
        unencrypted_content_length: unencrypted_len(m)?,
        source,
    })
}

fn parse_v3(m: &Meta, source: MetadataSource) -> Result<Envelope, S3ecError> {
    let content = m.require(V3_CONTENT)?;
    if content != V3_CONTENT_VALUE {
        return Err(S3ecError::UnknownContentAlgorithm {
            found: shown(content),
        });
    }
    let encrypted_data_key = decode_key(m, V3_KEY)?;
    let wrap = WrapAlg::from_v3(m.require(V3_WRAP)?)?;
    // Java reads only the map that belongs to the wrap and ignores the other one.
    let context_key = if wrap.is_kms() {
        V3_CONTEXT
    } else {
        V3_MATDESC
    };
    let context = parse_json_map(context_key, m.get(context_key).unwrap_or("{}"))?;
    let message_id = fixed(
        V3_MESSAGE_ID,
        decode(V3_MESSAGE_ID, m.require(V3_MESSAGE_ID)?)?,
        "a message id is 28 bytes",
    )?;
    let commitment = fixed(
        V3_COMMITMENT,
        decode(V3_COMMITMENT, m.require(V3_COMMITMENT)?)?,
        "a key commitment is 28 bytes",
    )?;
    Ok(Envelope {
        version: FormatVersion::V3,
        content: ContentParams::Committing {
            message_id,
            commitment,
        },
        wrap,
        encrypted_data_key,
        context,
        unencrypted_content_length: unencrypted_len(m)?,
        source,
    })
}

fn decode_key(m: &Meta, key: &'static str) -> Result<Vec<u8>, S3ecError> {
    let bytes = decode(key, m.require(key)?)?;
    if bytes.is_empty() {
        return Err(S3ecError::InvalidValue {
            key,
            what: "the encrypted data key is empty",
        });
    }
    Ok(bytes)
}

fn decode(key: &'static str, value: &str) -> Result<Vec<u8>, S3ecError> {
    BASE64.decode(value).map_err(|_| S3ecError::InvalidValue {
        key,
        what: "not standard base64 with padding",
    })
}

fn fixed<const N: usize>(
    key: &'static str,
    bytes: Vec<u8>,
    what: &'static str,
) -> Result<[u8; N], S3ecError> {
    bytes
        .try_into()
        .map_err(|_| S3ecError::InvalidValue { key, what })
}

fn unencrypted_len(m: &Meta) -> Result<Option<u64>, S3ecError> {
    m.get(UNENCRYPTED_LEN)
        .map(|v| {
            // Decimal digits only: `u64::from_str` would also take a leading '+'.
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(S3ecError::InvalidValue {
                    key: UNENCRYPTED_LEN,
                    what: "not a decimal number",
                });
            }
            v.parse().map_err(|_| S3ecError::InvalidValue {
                key: UNENCRYPTED_LEN,
                what: "not a decimal number",
            })
        })
        .transpose()
}

/// Parse a JSON object of strings (material description or encryption context).
fn parse_json_map(key: &'static str, value: &str) -> Result<BTreeMap<String, String>, S3ecError> {
    let invalid = |what| S3ecError::InvalidValue { key, what };
    if value.starts_with("=?") {
        // S3 RFC 2047-encodes metadata values with non-ASCII text (S3EC.md §1.1).
        return Err(invalid(
            "it is RFC 2047-encoded non-ASCII text, which s3cryptfs does not decode",
        ));
    }
    let entries: StrictMap =
        serde_json::from_str(value).map_err(|_| invalid("not a JSON object"))?;
    let mut map = BTreeMap::new();
    for (k, v) in entries.0 {
        let serde_json::Value::String(v) = v else {
            return Err(invalid("a value is not a JSON string"));
        };
        if map.insert(k, v).is_some() {
            return Err(invalid("a JSON key appears twice"));
        }
    }
    Ok(map)
}

/// A JSON object read entry by entry, so repeated keys are seen instead of silently collapsed
/// (readers that keep the first and readers that keep the last would otherwise disagree).
struct StrictMap(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for StrictMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = StrictMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictMap, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = access.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(StrictMap(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// S3EC keys of one metadata map, by canonical name; everything else is dropped.
#[derive(Debug, Clone, Default)]
struct Meta(BTreeMap<&'static str, String>);

impl Meta {
    fn from_object_metadata<I, K, V>(pairs: I) -> Result<Meta, S3ecError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut meta = Meta::default();
        for (name, value) in pairs {
            let lower = name.as_ref().to_ascii_lowercase();
            let bare = lower.strip_prefix(META_PREFIX).unwrap_or(&lower);
            let Some(key) = ALL_KEYS.into_iter().find(|k| *k == bare) else {
                continue;
            };
            let value = value.as_ref();
            match meta.0.get(key) {
                Some(old) if old != value => return Err(S3ecError::DuplicateKey { key }),
                Some(_) => {}
                None => {
                    meta.0.insert(key, value.to_owned());
                }
            }
        }
        Ok(meta)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn require(&self, key: &'static str) -> Result<&str, S3ecError> {
        self.get(key).ok_or(S3ecError::MissingKey { key })
    }

    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn has_all(&self, keys: &[&str]) -> bool {
        keys.iter().all(|k| self.has(k))
    }

    fn has_any(&self, keys: &[&str]) -> bool {
        keys.iter().any(|k| self.has(k))
    }

    /// Take `key` from the object's metadata into an instruction file's; a different value on
    /// both sides is refused rather than one of them picked.
    fn merge_from(&mut self, object: &Meta, key: &'static str) -> Result<(), S3ecError> {
        if let Some(value) = object.get(key) {
            if self.get(key).is_some_and(|v| v != value) {
                return Err(S3ecError::DuplicateKey { key });
            }
            self.0.insert(key, value.to_owned());
        }
        Ok(())
    }
}
