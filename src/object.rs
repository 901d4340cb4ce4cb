//! How the bytes of one stored object relate to the bytes of the file it holds, per encryption mode.
//!
//! The read and write paths ask this module three questions: how large is the file, given the stored size (so a
//! listing needs no request per object); which stored byte range holds a file chunk; and how to seal or open one
//! chunk. In mode `none` a "chunk" is just a 64 KiB slice of the object, so the read path and the page cache work the
//! same way in both modes.
//!
//! In the client-side modes an object can also be in the format of the AWS S3 Encryption Client (issue 12): its
//! metadata says so ([`Codec::format_hint`]), it is 16 bytes longer than its file, and `read::s3ec` reads it.

use std::ops::Range;
use std::sync::Arc;

use crate::config::FileFormat;
use crate::crypto::s3ec::{self, Detection, NewObject, S3ecError, WriteFormat};
use crate::crypto::{self, AeadBackend, CryptoError, Envelope, Header, KeyHistory, ObjectCipher, CHUNK_PLAIN_LEN};
use crate::kms::{KmsClient, KmsError};
use crate::store::UserMeta;

/// Metadata key (`x-amz-meta-s3cryptfs-bind`) holding an encrypted object's path binding.
pub const BIND_META: &str = "s3cryptfs-bind";
/// Metadata key (`x-amz-meta-s3cryptfs-map`) holding the version map of an object in format version 2, or 3
/// after its first in-place change (see `crypto::version`): which upload sealed each chunk. A copy or rename keeps it, since it names no path.
pub const MAP_META: &str = "s3cryptfs-map";

/// Which format a stored object is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoredFormat {
    /// What the mount's codec reads and writes: its own format (plaintext in the server-side modes).
    #[default]
    Own,
    /// An object of the AWS S3 Encryption Client (format V2 or V3, or one this mount refuses): one AES-GCM message
    /// over the whole object, 16 bytes longer than the file. `instruction_file`: its envelope, or the key-wrap half
    /// of it, is in the object `KEY.instruction` beside it.
    S3ec { instruction_file: bool },
}

impl StoredFormat {
    pub fn is_s3ec(self) -> bool {
        matches!(self, StoredFormat::S3ec { .. })
    }
}

/// What an object's metadata alone tells about its format ([`Codec::format_hint`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatHint {
    Known(StoredFormat),
    /// Neither a path binding nor any S3EC key: an object written by another tool, or an S3EC object of format V1/V2
    /// whose whole envelope is in `KEY.instruction`. Only whether that file exists tells them apart.
    AskInstructionFile,
}

/// The encryption mode of a mount, with what it needs to work.
///
/// Client-side encryption reads every object it has keys for: the header says whether a customer key (kind 1) or
/// KMS (kind 2) wraps the data key, so a cse-kms mount given a key file too reads objects written in either mode.
/// New objects use KMS when a KMS client is present (mode cse-kms), else the key history's first key (cse-c), in
/// the mount's `format`: its own, or the S3 Encryption Client's (`format=s3ec`).
#[derive(Clone)]
pub enum Codec {
    Plain,
    Cse { keys: Option<Arc<KeyHistory>>, kms: Option<Arc<KmsClient>>, aead: AeadBackend, format: FileFormat },
}

/// Why an object's keys could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("S3 Encryption Client object: {0}")]
    S3ec(#[from] S3ecError),
}

/// Per-object state: nothing for plaintext, the unwrapped data key for client-side encryption.
pub enum ObjectCodec {
    Plain,
    Cse(ObjectCipher),
}

impl Codec {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Codec::Cse { .. })
    }

    /// The format of an object from its metadata. Only the client-side modes recognise S3EC objects; the server-side
    /// modes show every object as its bytes are. Metadata with S3EC keys that do not form an envelope still counts as
    /// S3EC, so that reading it fails with the reason, not as "not our format". An S3EC instruction file (it carries
    /// `x-amz-crypto-instr-file`) is an ordinary object.
    pub fn format_hint(&self, meta: &UserMeta) -> FormatHint {
        if !self.is_encrypted() {
            return FormatHint::Known(StoredFormat::Own);
        }
        let s3ec = |instruction_file| FormatHint::Known(StoredFormat::S3ec { instruction_file });
        match s3ec::detect(meta.extra.iter()) {
            Ok(Detection::Complete(_)) => s3ec(false),
            Ok(Detection::NeedsInstructionFile(pending)) if pending.object_has_s3ec_metadata() => s3ec(true),
            Ok(Detection::NeedsInstructionFile(_)) if meta.extra.contains_key(BIND_META) => {
                FormatHint::Known(StoredFormat::Own)
            }
            Ok(Detection::NeedsInstructionFile(_)) => FormatHint::AskInstructionFile,
            Err(S3ecError::IsInstructionFile) => FormatHint::Known(StoredFormat::Own),
            Err(_) => s3ec(false),
        }
    }

    /// The S3 Encryption Client format new objects are written in, if the mount writes that format (`format=s3ec`).
    pub fn s3ec_write_format(&self) -> Option<WriteFormat> {
        match self {
            Codec::Cse { format: FileFormat::S3ec(v), .. } => Some(*v),
            _ => None,
        }
    }

    /// The format of every object this mount writes.
    pub fn written_format(&self) -> StoredFormat {
        match self.s3ec_write_format() {
            Some(_) => StoredFormat::S3ec { instruction_file: false },
            None => StoredFormat::Own,
        }
    }

    /// The largest file this mount can store: the GCM message limit (about 64 GiB) in `format=s3ec`, where a whole
    /// object is one message; no limit of ours in the own format (each 64 KiB chunk is its own message).
    pub fn max_file_size(&self) -> u64 {
        match self.s3ec_write_format() {
            Some(_) => s3ec::MAX_PLAINTEXT_LEN,
            None => u64::MAX,
        }
    }

    /// A fresh S3 Encryption Client envelope and content sealer for a new object in `format`: a new data key from KMS
    /// `GenerateDataKey` (`kms+context`, the context holding only the content suite, so every AWS client reads it
    /// without being told a context) in cse-kms, or wrapped with the key file's first key (`AES/GCM`) in cse-c.
    pub async fn create_s3ec(&self, format: WriteFormat) -> Result<NewObject, CodecError> {
        let no_context = std::collections::BTreeMap::new();
        match self {
            Codec::Plain => unreachable!("invariant broken: format=s3ec without client-side encryption"),
            Codec::Cse { kms: Some(kms), .. } => {
                let context = s3ec::kms_context_for_write(&no_context, format)?;
                let pairs: Vec<(&str, String)> = context.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                let generated = kms.generate_data_key(&pairs).await?;
                Ok(s3ec::new_object_kms(format, &generated.data_key, generated.blob, context)?)
            }
            Codec::Cse { keys: Some(keys), .. } => Ok(s3ec::new_object_aes(format, keys.encrypting_key(), &no_context)?),
            Codec::Cse { keys: None, kms: None, .. } => {
                unreachable!("invariant broken: client-side encryption configured without any key")
            }
        }
    }

    /// File size of an object in `format` for a stored size (see [`Codec::plain_size`]).
    pub fn plain_size_of(&self, format: StoredFormat, stored: u64) -> Option<u64> {
        match format {
            StoredFormat::Own => self.plain_size(stored),
            StoredFormat::S3ec { .. } => s3ec::plain_size(stored).ok(),
        }
    }

    /// Bytes at the start of an object that precede chunk 0.
    pub fn header_len(&self) -> u64 {
        match self {
            Codec::Plain => 0,
            Codec::Cse { .. } => crypto::HEADER_LEN,
        }
    }

    /// File size for a stored size. `None` when the stored size is impossible for this mode (an object that is not
    /// in our format): callers show the stored size and reading such an object fails.
    pub fn plain_size(&self, stored: u64) -> Option<u64> {
        match self {
            Codec::Plain => Some(stored),
            Codec::Cse { .. } => crypto::plain_size(stored).ok(),
        }
    }

    pub fn stored_size(&self, plain: u64) -> u64 {
        match self {
            Codec::Plain => plain,
            Codec::Cse { .. } => crypto::cipher_size(plain),
        }
    }

    /// Number of chunks in a file of `plain` bytes (at least one when encrypted: see docs/FORMAT.md).
    pub fn chunk_count(&self, plain: u64) -> u64 {
        match self {
            Codec::Plain => plain.div_ceil(CHUNK_PLAIN_LEN),
            Codec::Cse { .. } => crypto::chunk_count(plain),
        }
    }

    /// Stored byte range of chunk `index` of a file of `plain` bytes.
    pub fn chunk_range(&self, index: u64, plain: u64) -> Range<u64> {
        match self {
            Codec::Plain => {
                let start = index * CHUNK_PLAIN_LEN;
                start..(start + CHUNK_PLAIN_LEN).min(plain)
            }
            Codec::Cse { .. } => crypto::chunk_cipher_range(index, plain),
        }
    }

    /// A fresh per-object codec for a new upload, with the header to write first. In cse-kms this is one KMS
    /// GenerateDataKey call, with the new file id in the encryption context. Format version 1: for objects never
    /// changed in place (directory indexes); files are written with [`Codec::create_file`].
    pub async fn create(&self) -> Result<(ObjectCodec, Vec<u8>), CodecError> {
        self.create_in(crypto::FORMAT_VERSION_1).await
    }

    /// [`Codec::create`] for a file, uploaded whole or streamed, in format version 3 (client-side modes), so that
    /// it can later be changed in place (`crate::inplace`): every chunk is sealed with the implicit version id (the
    /// file id), so the length need not be known yet and the object carries no version map (`MAP_META`) until it
    /// is first changed in place.
    pub async fn create_file(&self) -> Result<(ObjectCodec, Vec<u8>), CodecError> {
        self.create_in(crypto::FORMAT_VERSION_3).await
    }

    async fn create_in(&self, version: u16) -> Result<(ObjectCodec, Vec<u8>), CodecError> {
        match self {
            Codec::Plain => Ok((ObjectCodec::Plain, Vec::new())),
            Codec::Cse { kms: Some(kms), aead, .. } => {
                let file_id = crypto::FileId::random();
                let generated = kms.generate_data_key(&crypto::kms_encryption_context(&file_id)).await?;
                let (cipher, header) = ObjectCipher::create_kms_version(
                    version,
                    file_id,
                    generated.data_key,
                    &generated.key_arn,
                    &generated.blob,
                    *aead,
                )?;
                Ok((ObjectCodec::Cse(cipher), header.to_vec()))
            }
            Codec::Cse { keys: Some(keys), aead, .. } => {
                let (cipher, header) = ObjectCipher::create_version(version, keys, *aead);
                Ok((ObjectCodec::Cse(cipher), header.to_vec()))
            }
            Codec::Cse { keys: None, kms: None, .. } => {
                unreachable!("invariant broken: client-side encryption configured without any key")
            }
        }
    }

    /// The per-object codec of an existing object, from its header bytes. A KMS-wrapped data key costs one KMS
    /// Decrypt call the first time (the KMS client caches it).
    pub async fn open(&self, header: &[u8]) -> Result<ObjectCodec, CodecError> {
        let Codec::Cse { keys, kms, aead, .. } = self else { return Ok(ObjectCodec::Plain) };
        let decoded = Header::decode(header)?;
        match decoded.envelope {
            Envelope::CustomerKey { fingerprint, .. } => match keys {
                Some(keys) => Ok(ObjectCodec::Cse(ObjectCipher::open(header, keys, *aead)?)),
                None => Err(CryptoError::NeedsCustomerKey { fingerprint }.into()),
            },
            Envelope::Kms { key_id, blob } => match kms {
                Some(kms) => {
                    let context = crypto::kms_encryption_context(&decoded.file_id);
                    let data_key = kms.decrypt(&key_id, &blob, &context).await?;
                    Ok(ObjectCodec::Cse(ObjectCipher::open_with_data_key(header, data_key, *aead)?))
                }
                None => Err(CryptoError::NeedsKms { key_id }.into()),
            },
        }
    }
}

impl ObjectCodec {
    /// Appends the stored form of chunk `index` to `out`.
    pub fn seal(&self, index: u64, is_last: bool, plain: &[u8], out: &mut Vec<u8>) {
        match self {
            ObjectCodec::Plain => out.extend_from_slice(plain),
            ObjectCodec::Cse(c) => c.seal_chunk_as_mapped(index, is_last, plain, out),
        }
    }

    /// Appends the plaintext of stored chunk `index` to `out`, authenticating it.
    pub fn open(&self, index: u64, is_last: bool, stored: &[u8], out: &mut Vec<u8>) -> Result<(), crypto::CryptoError> {
        match self {
            ObjectCodec::Plain => {
                out.extend_from_slice(stored);
                Ok(())
            }
            ObjectCodec::Cse(c) => c.open_chunk(index, is_last, stored, out),
        }
    }

    /// How a stored chunk frames its plaintext-long middle: the bytes before it and after it (the nonce and the tag
    /// in client-side modes, none in plaintext ones). See [`ObjectCodec::open_detached`].
    pub fn chunk_frame(&self) -> (usize, usize) {
        match self {
            ObjectCodec::Plain => (0, 0),
            ObjectCodec::Cse(_) => (crypto::NONCE_LEN, crypto::TAG_LEN),
        }
    }

    /// [`ObjectCodec::open`] for a chunk held in parts: `before` and `after` as [`ObjectCodec::chunk_frame`] gives
    /// their lengths, and the middle in `buf`, turned into the plaintext in place (all zeros if it does not
    /// authenticate). The reader fills its pages from the response body this way, without a copy in between.
    pub fn open_detached(
        &self,
        index: u64,
        is_last: bool,
        before: &[u8],
        buf: &mut [u8],
        after: &[u8],
    ) -> Result<(), crypto::CryptoError> {
        match self {
            ObjectCodec::Plain => Ok(()),
            ObjectCodec::Cse(c) => match (before.try_into(), after.try_into()) {
                (Ok(nonce), Ok(tag)) => c.open_chunk_detached(index, is_last, nonce, buf, tag),
                _ => {
                    buf.fill(0);
                    let len = before.len() + buf.len() + after.len();
                    Err(crypto::CryptoError::TruncatedChunk { chunk: index, len })
                }
            },
        }
    }

    /// The path binding to store in the object's metadata (see docs/FORMAT.md), if this mode has one.
    pub fn binding(&self, path: &str) -> Option<String> {
        match self {
            ObjectCodec::Plain => None,
            ObjectCodec::Cse(c) => Some(c.binding(path)),
        }
    }

    /// Makes a format-2 object's chunks openable: authenticates the version map from its metadata (`MAP_META`)
    /// for a file of `plain_len` bytes, the length its stored size gives. Nothing to do for plaintext or format 1.
    pub fn attach_map(&mut self, meta: &UserMeta, plain_len: u64) -> Result<(), crypto::CryptoError> {
        match self {
            ObjectCodec::Plain => Ok(()),
            ObjectCodec::Cse(c) => c.attach_map(meta.extra.get(MAP_META).map(String::as_str), plain_len),
        }
    }

    pub fn verify_binding(&self, path: &str, binding: Option<&str>) -> Result<(), crypto::CryptoError> {
        match self {
            ObjectCodec::Plain => Ok(()),
            ObjectCodec::Cse(c) => match binding {
                Some(b) => c.verify_binding(path, b),
                None => Err(crypto::CryptoError::ObjectSwapped),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::s3ec::{new_object_aes, WriteFormat};
    use crate::crypto::Key256;
    use std::collections::BTreeMap;

    fn meta(pairs: &BTreeMap<String, String>) -> UserMeta {
        UserMeta { extra: pairs.clone(), mode: Some(0o100644), ..UserMeta::default() }
    }

    fn cse() -> Codec {
        Codec::Cse {
            keys: Some(Arc::new(KeyHistory::single(Key256::generate()))),
            kms: None,
            aead: AeadBackend::default(),
            format: FileFormat::Own,
        }
    }

    #[test]
    fn the_format_comes_from_the_metadata_in_client_side_modes_only() {
        let kek = Key256::generate();
        let v2 = new_object_aes(WriteFormat::V2, &kek, &BTreeMap::new()).unwrap().envelope.to_metadata();
        let v3 = new_object_aes(WriteFormat::V3, &kek, &BTreeMap::new()).unwrap().envelope;
        let s3ec = |instruction_file| FormatHint::Known(StoredFormat::S3ec { instruction_file });
        let own = FormatHint::Known(StoredFormat::Own);
        assert_eq!(cse().format_hint(&meta(&v2)), s3ec(false));
        assert_eq!(cse().format_hint(&meta(&v3.to_metadata())), s3ec(false));
        assert_eq!(cse().format_hint(&meta(&v3.to_instruction_file().0)), s3ec(true));
        // Our own objects carry a path binding; objects with neither may keep a V2 envelope in KEY.instruction.
        let bound: BTreeMap<String, String> = [(BIND_META.to_string(), "x".to_string())].into();
        assert_eq!(cse().format_hint(&meta(&bound)), own);
        assert_eq!(cse().format_hint(&meta(&BTreeMap::new())), FormatHint::AskInstructionFile);
        // An instruction file is an ordinary object; S3EC keys that make no envelope still read as S3EC (and fail).
        let marker: BTreeMap<String, String> = [("x-amz-crypto-instr-file".to_string(), String::new())].into();
        assert_eq!(cse().format_hint(&meta(&marker)), own);
        let mut broken = v2.clone();
        broken.remove("x-amz-iv");
        assert_eq!(cse().format_hint(&meta(&broken)), s3ec(false));
        // Mode none and the server-side modes show every object as its bytes.
        assert_eq!(Codec::Plain.format_hint(&meta(&v2)), own);
        assert_eq!(Codec::Plain.format_hint(&meta(&BTreeMap::new())), own);
        // Sizes: stored - 16 for S3EC.
        assert_eq!(cse().plain_size_of(StoredFormat::S3ec { instruction_file: false }, 116), Some(100));
        assert_eq!(cse().plain_size_of(StoredFormat::S3ec { instruction_file: true }, 15), None);
        assert_eq!(cse().plain_size_of(StoredFormat::Own, 528), cse().plain_size(528));
    }
}
