//! Per-object encryption context: wraps and unwraps the data key, seals and
//! opens chunks, and computes the path binding.
//!
//! Data flow in mode cse-c (envelope kind 1): on write, `ObjectCipher::create`
//! draws a fresh data key and file id, wraps the key under the history's
//! encrypting key and returns the header; the caller then seals each chunk
//! (`seal_chunk`) and uploads header || chunks. On read, `ObjectCipher::open`
//! parses the header, picks the KEK by fingerprint, unwraps the data key, and
//! the caller opens the chunks it fetched.
//!
//! Data flow in mode cse-kms (envelope kind 2), where KMS does the wrapping and
//! the calls to it happen outside this module (they are I/O):
//! - write: [`FileId::random`], then KMS `GenerateDataKey` with the encryption
//!   context [`kms_encryption_context`] of that file id, then
//!   [`ObjectCipher::create_kms`] with the plaintext key, the key id KMS
//!   reported and the `CiphertextBlob`, which lays out the header;
//! - read: [`Header::decode`] gives the key id, blob and file id; KMS `Decrypt`
//!   with the same encryption context gives the data key; then
//!   [`ObjectCipher::open_with_data_key`] builds the context from it.
//!
//! Each path refuses the other kind with an error that names the right mode
//! (`NeedsKms`, `NeedsCustomerKey`). Chunks, AADs and the path binding are the
//! same for both kinds: they depend only on the data key and the file id.
//!
//! What binds to what (docs/SECURITY.md has the threat model):
//! - kind 1: the wrap AAD covers header bytes 0..34 and the fingerprint, and
//!   the padding must be zero, so every header byte is authenticated;
//! - kind 2: the blob is authenticated by KMS, and its encryption context binds
//!   it to the file id, so a blob copied into another object's header does not
//!   decrypt; every other header byte is either checked to have its one legal
//!   value by `Header::decode`, or (the key id) cannot change which data key
//!   `Decrypt` returns (see `format.rs`);
//! - each chunk's AAD carries the file id, its index and whether it is the last
//!   chunk, so chunks cannot be modified, reordered, moved between objects, or
//!   dropped from the end;
//! - the path binding (kept by the caller in object metadata) ties the object
//!   to its path, so whole objects cannot be swapped.
//!
//! Format version 2 (`version.rs`) keeps all of this and adds one binding:
//! each chunk's AAD also names the version (upload) that sealed it, and the
//! object's metadata carries the version map, MAC'd under a key derived from the
//! data key over the file id and the plaintext length ([`ObjectCipher::seal_map`],
//! [`ObjectCipher::attach_map`]). A reader opens no chunk of a version-2 object
//! before its map authenticates, so chunks of an older version of the same
//! object, spliced in at the same index, fail even though the data key and file
//! id are the same.
//!
//! Format version 3 is version 2 with its own chunk AAD domain and an optional
//! map: an object without one was sealed whole by the version whose id is its
//! file id ([`ObjectCipher::attach_map`] supplies that one-run map). A writer
//! can therefore seal chunks before it knows the file's length (a streamed
//! upload) and the object can still be changed in place. Stripping the map of a
//! changed object makes every chunk the changes sealed fail; what is left that
//! opens is the first version whole, which is a rollback of the whole object,
//! as restoring its older bytes always was.
//!
//! Nonces are random per chunk (96 bits from the OS). Every object has its own
//! data key, so the birthday bound applies per object and per key, never
//! across the bucket; a rewritten chunk simply gets a new nonce.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::aead::{self, AeadBackend, AeadKey};
use super::error::CryptoError;
use super::format::{
    chunk_cipher_range, chunk_count, header_prefix, is_last_chunk, plain_size, Envelope, FileId,
    Header, CHUNK_CIPHER_LEN, CHUNK_OVERHEAD, CHUNK_PLAIN_LEN, CUSTOMER_KEY_ENVELOPE_LEN,
    ENVELOPE_CUSTOMER_KEY, FILE_ID_LEN, FORMAT_VERSION, FORMAT_VERSION_1, FORMAT_VERSION_2, FORMAT_VERSION_3,
    HEADER_FIXED_LEN, HEADER_LEN, NONCE_LEN, WRAPPED_KEY_LEN,
};
use super::version::{VersionId, VersionMap, MAP_TAG_LEN, MIN_MAP_LEN, VERSION_ID_LEN};
use super::keyfile::KeyHistory;
use super::secret::{fill_random, DataKey, Key256, KeyFingerprint};

/// Domain prefix of every chunk's AAD.
pub const CHUNK_AAD_DOMAIN: &[u8] = b"s3cf-chunk-v1";
/// Domain prefix of every chunk's AAD in format version 2.
pub const CHUNK_AAD_DOMAIN_V2: &[u8] = b"s3cf-chunk-v2";
/// Domain prefix of every chunk's AAD in format version 3 (same length as version 2's, so the same layout).
pub const CHUNK_AAD_DOMAIN_V3: &[u8] = b"s3cf-chunk-v3";
/// HMAC message used to derive the version-map key from the data key (format 2).
pub const MAP_KEY_DOMAIN: &[u8] = b"s3cf-map-key-v2";
/// Domain prefix of the version-map HMAC message (format 2).
pub const MAP_DOMAIN: &[u8] = b"s3cf-map-v2";
/// Domain prefix of the data-key wrap AAD.
pub const WRAP_AAD_DOMAIN: &[u8] = b"s3cf-wrap-v1";
/// HMAC message used to derive the binding key from the data key.
pub const BIND_KEY_DOMAIN: &[u8] = b"s3cf-bind-key-v1";
/// Domain prefix of the binding HMAC message.
pub const BIND_DOMAIN: &[u8] = b"s3cf-bind-v1";
/// The one key of the KMS encryption context. Part of the format: KMS
/// `Decrypt` succeeds only with the context `GenerateDataKey` was given.
pub const KMS_CONTEXT_FILE_ID: &str = "s3cryptfs:file-id";
/// Bytes of HMAC-SHA256 kept in a binding: 128 bits resists forgery, and 22
/// base64 characters fit comfortably in object metadata.
pub const BINDING_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

const CHUNK_AAD_LEN: usize = CHUNK_AAD_DOMAIN.len() + FILE_ID_LEN + 8 + 1;
const CHUNK_AAD_V2_LEN: usize = CHUNK_AAD_LEN + VERSION_ID_LEN;
const WRAP_AAD_LEN: usize = WRAP_AAD_DOMAIN.len() + HEADER_FIXED_LEN + 8;

/// The keys and identity of one object. Holds secrets; `Debug` hides them.
pub struct ObjectCipher {
    /// The header's format version: 1, or 2 or 3 (chunks carry their version id).
    version: u16,
    file_id: FileId,
    data_key: DataKey,
    chunk_key: AeadKey,
    bind_key: Zeroizing<[u8; 32]>,
    /// Authenticates the version map (format 2).
    map_key: Zeroizing<[u8; 32]>,
    /// Formats 2 and 3: the authenticated version map, once attached (format 3: or the implicit one-run map of
    /// the file id); no format-2 chunk opens without it.
    map: Option<VersionMap>,
    backend: AeadBackend,
}

impl std::fmt::Debug for ObjectCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCipher")
            .field("version", &self.version)
            .field("file_id", &self.file_id)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

fn chunk_aad(file_id: &FileId, index: u64, is_last: bool) -> [u8; CHUNK_AAD_LEN] {
    let mut aad = [0u8; CHUNK_AAD_LEN];
    let (domain, rest) = aad.split_at_mut(CHUNK_AAD_DOMAIN.len());
    domain.copy_from_slice(CHUNK_AAD_DOMAIN);
    rest[..FILE_ID_LEN].copy_from_slice(&file_id.0);
    rest[FILE_ID_LEN..FILE_ID_LEN + 8].copy_from_slice(&index.to_be_bytes());
    rest[FILE_ID_LEN + 8] = u8::from(is_last);
    aad
}

/// Formats 2 and 3: `"s3cf-chunk-v2" || file_id || index || is_last || version_id` (54 bytes; `-v3` in format 3).
fn chunk_aad_v2(
    format: u16,
    file_id: &FileId,
    index: u64,
    is_last: bool,
    version: &VersionId,
) -> [u8; CHUNK_AAD_V2_LEN] {
    let domain = match format {
        FORMAT_VERSION_2 => CHUNK_AAD_DOMAIN_V2,
        FORMAT_VERSION_3 => CHUNK_AAD_DOMAIN_V3,
        _ => unreachable!("invariant broken: a version id in a chunk of format {format}"),
    };
    let mut aad = [0u8; CHUNK_AAD_V2_LEN];
    aad[..CHUNK_AAD_LEN].copy_from_slice(&chunk_aad(file_id, index, is_last));
    aad[..domain.len()].copy_from_slice(domain);
    aad[CHUNK_AAD_LEN..].copy_from_slice(&version.0);
    aad
}

fn wrap_aad(prefix: &[u8], fingerprint: &KeyFingerprint) -> [u8; WRAP_AAD_LEN] {
    let mut aad = [0u8; WRAP_AAD_LEN];
    let d = WRAP_AAD_DOMAIN.len();
    aad[..d].copy_from_slice(WRAP_AAD_DOMAIN);
    aad[d..d + HEADER_FIXED_LEN].copy_from_slice(&prefix[..HEADER_FIXED_LEN]);
    aad[d + HEADER_FIXED_LEN..].copy_from_slice(&fingerprint.0);
    aad
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(key).expect("invariant broken: HMAC rejected a key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// The KMS encryption context for an object: `[("s3cryptfs:file-id", <file id
/// as 32 lower-case hex digits>)]`, in this order.
///
/// `GenerateDataKey` and `Decrypt` must both be called with exactly this
/// context. KMS authenticates it with the blob, so the data key is bound to
/// this object: a blob copied into another object's header (another file id)
/// does not decrypt. CloudTrail logs the context, so every KMS call names the
/// object it was for.
pub fn kms_encryption_context(file_id: &FileId) -> Vec<(&'static str, String)> {
    vec![(KMS_CONTEXT_FILE_ID, file_id.to_string())]
}

/// Wrap `data_key` under `kek` and lay out the header that carries it.
fn wrap_header(
    version: u16,
    kek: &Key256,
    backend: AeadBackend,
    file_id: &FileId,
    data_key: &DataKey,
    wrap_nonce: [u8; NONCE_LEN],
) -> [u8; HEADER_LEN as usize] {
    let fingerprint = kek.fingerprint();
    let prefix = header_prefix(
        version,
        file_id,
        ENVELOPE_CUSTOMER_KEY,
        CUSTOMER_KEY_ENVELOPE_LEN,
    );
    let mut wrapped = Vec::with_capacity(WRAPPED_KEY_LEN);
    aead::seal(
        backend,
        kek.as_bytes(),
        &wrap_nonce,
        &wrap_aad(&prefix, &fingerprint),
        data_key.as_bytes(),
        &mut wrapped,
    );
    let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
    wrapped_key.copy_from_slice(&wrapped);
    let header = Header {
        version,
        file_id: *file_id,
        envelope: Envelope::CustomerKey {
            fingerprint,
            wrap_nonce,
            wrapped_key,
        },
    }
    .encode()
    .expect("invariant broken: a customer-key envelope always fits the header");
    debug_assert_eq!(
        header[..HEADER_FIXED_LEN],
        prefix,
        "the wrap AAD must cover the stored prefix"
    );
    header
}

impl ObjectCipher {
    /// Start a new object: fresh random data key and file id, wrapped under
    /// `keys.encrypting_key()`. Returns the context and the header to store first.
    pub fn create(
        keys: &KeyHistory,
        backend: AeadBackend,
    ) -> (ObjectCipher, [u8; HEADER_LEN as usize]) {
        Self::create_version(FORMAT_VERSION, keys, backend)
    }

    /// [`ObjectCipher::create`] in format `version` (1, 2 or 3). A version-2 object
    /// is sealed with [`ObjectCipher::seal_chunk_in`] and needs its map stored
    /// beside it ([`ObjectCipher::seal_map`]).
    pub fn create_version(
        version: u16,
        keys: &KeyHistory,
        backend: AeadBackend,
    ) -> (ObjectCipher, [u8; HEADER_LEN as usize]) {
        let mut wrap_nonce = [0u8; NONCE_LEN];
        fill_random(&mut wrap_nonce);
        Self::create_with_version(
            version,
            keys.encrypting_key(),
            backend,
            DataKey::generate(),
            FileId::random(),
            wrap_nonce,
        )
    }

    /// Start a new object in mode cse-kms (envelope kind 2), second step.
    ///
    /// First the caller draws `file_id` ([`FileId::random`]) and calls KMS
    /// `GenerateDataKey` (256-bit key) with [`kms_encryption_context`]`(&file_id)`;
    /// then it passes here the plaintext key as `data_key`, the `KeyId` KMS
    /// reported and the `CiphertextBlob`. Returns the context and the header
    /// to store first.
    ///
    /// Fails with `InvalidKmsEnvelope` if `key_id` is empty, longer than
    /// [`super::format::MAX_KMS_KEY_ID_LEN`] or not printable ASCII, if `blob`
    /// is empty, or if both together do not fit the header.
    pub fn create_kms(
        file_id: FileId,
        data_key: DataKey,
        key_id: &str,
        blob: &[u8],
        backend: AeadBackend,
    ) -> Result<(ObjectCipher, [u8; HEADER_LEN as usize]), CryptoError> {
        Self::create_kms_version(FORMAT_VERSION, file_id, data_key, key_id, blob, backend)
    }

    /// [`ObjectCipher::create_kms`] in format `version` (1, 2 or 3).
    pub fn create_kms_version(
        version: u16,
        file_id: FileId,
        data_key: DataKey,
        key_id: &str,
        blob: &[u8],
        backend: AeadBackend,
    ) -> Result<(ObjectCipher, [u8; HEADER_LEN as usize]), CryptoError> {
        let header = Header {
            version,
            file_id,
            envelope: Envelope::Kms {
                key_id: key_id.to_owned(),
                blob: blob.to_vec(),
            },
        }
        .encode()?;
        Ok((Self::from_parts(version, file_id, data_key, backend), header))
    }

    /// Deterministic `create` for known-answer tests and fixtures.
    #[cfg(test)]
    pub(crate) fn create_with(
        kek: &Key256,
        backend: AeadBackend,
        data_key: DataKey,
        file_id: FileId,
        wrap_nonce: [u8; NONCE_LEN],
    ) -> (ObjectCipher, [u8; HEADER_LEN as usize]) {
        Self::create_with_version(FORMAT_VERSION_1, kek, backend, data_key, file_id, wrap_nonce)
    }

    /// Deterministic `create_version` for known-answer tests and fixtures.
    pub(crate) fn create_with_version(
        version: u16,
        kek: &Key256,
        backend: AeadBackend,
        data_key: DataKey,
        file_id: FileId,
        wrap_nonce: [u8; NONCE_LEN],
    ) -> (ObjectCipher, [u8; HEADER_LEN as usize]) {
        let header = wrap_header(version, kek, backend, &file_id, &data_key, wrap_nonce);
        (Self::from_parts(version, file_id, data_key, backend), header)
    }

    fn derive(data_key: &DataKey, domain: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut derived = hmac_sha256(data_key.as_bytes(), &[domain])
            .finalize()
            .into_bytes();
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&derived);
        derived.as_mut_slice().zeroize();
        key
    }

    fn from_parts(
        version: u16,
        file_id: FileId,
        data_key: DataKey,
        backend: AeadBackend,
    ) -> ObjectCipher {
        ObjectCipher {
            version,
            file_id,
            chunk_key: AeadKey::new(backend, data_key.as_bytes()),
            bind_key: Self::derive(&data_key, BIND_KEY_DOMAIN),
            map_key: Self::derive(&data_key, MAP_KEY_DOMAIN),
            map: None,
            data_key,
            backend,
        }
    }

    /// Parse `header` (the first [`HEADER_LEN`] bytes of the object; longer
    /// input is fine) and unwrap the data key with the matching key from `keys`.
    ///
    /// `UnknownKey` means the mount has the wrong key file; `KeyUnwrapFailed`
    /// means the right key was found but the header was tampered with;
    /// `NeedsKms` means the object was written in mode cse-kms.
    pub fn open(
        header: &[u8],
        keys: &KeyHistory,
        backend: AeadBackend,
    ) -> Result<ObjectCipher, CryptoError> {
        let decoded = Header::decode(header)?;
        match decoded.envelope {
            Envelope::CustomerKey {
                fingerprint,
                wrap_nonce,
                wrapped_key,
            } => {
                let kek = keys
                    .find(fingerprint)
                    .ok_or(CryptoError::UnknownKey { fingerprint })?;
                let mut raw = Zeroizing::new(Vec::with_capacity(WRAPPED_KEY_LEN));
                aead::open(
                    backend,
                    kek.as_bytes(),
                    &wrap_nonce,
                    &wrap_aad(header, &fingerprint),
                    &wrapped_key,
                    &mut raw,
                )
                .map_err(|_| CryptoError::KeyUnwrapFailed)?;
                let bytes: &[u8; 32] = raw
                    .as_slice()
                    .try_into()
                    .expect("invariant broken: an authenticated 48-byte wrap holds a 32-byte key");
                Ok(Self::from_parts(
                    decoded.version,
                    decoded.file_id,
                    DataKey::from_bytes(bytes),
                    backend,
                ))
            }
            Envelope::Kms { key_id, .. } => Err(CryptoError::NeedsKms { key_id }),
        }
    }

    /// Open an object of mode cse-kms (envelope kind 2) with the data key KMS
    /// `Decrypt` returned for the blob in `header` (called with
    /// [`kms_encryption_context`] of the header's file id). Re-parses `header`
    /// (the first [`HEADER_LEN`] bytes of the object; longer input is fine) and
    /// takes the file id from it.
    ///
    /// A kind-1 header is `NeedsCustomerKey`. A wrong `data_key` cannot be
    /// detected here (the format stores no key check value; KMS has already
    /// authenticated the blob): it surfaces as `AuthenticationFailed` on the
    /// first chunk opened, and as `ObjectSwapped` from the binding check.
    pub fn open_with_data_key(
        header: &[u8],
        data_key: DataKey,
        backend: AeadBackend,
    ) -> Result<ObjectCipher, CryptoError> {
        let decoded = Header::decode(header)?;
        match decoded.envelope {
            Envelope::Kms { .. } => Ok(Self::from_parts(
                decoded.version,
                decoded.file_id,
                data_key,
                backend,
            )),
            Envelope::CustomerKey { fingerprint, .. } => {
                Err(CryptoError::NeedsCustomerKey { fingerprint })
            }
        }
    }

    /// A new header for this object with the same file id and data key wrapped
    /// under `new_keys.encrypting_key()`: key rotation without re-encrypting content.
    ///
    /// Always writes envelope kind 1. On a context opened from a kind-2 header
    /// that turns the object into a cse-c object (the data key leaves KMS's
    /// control). To move a KMS object to another KMS key, `ReEncrypt` its blob
    /// (same encryption context) and encode a kind-2 [`Header`] with the same
    /// file id.
    pub fn rewrap(&self, new_keys: &KeyHistory) -> [u8; HEADER_LEN as usize] {
        let mut wrap_nonce = [0u8; NONCE_LEN];
        fill_random(&mut wrap_nonce);
        wrap_header(
            self.version,
            new_keys.encrypting_key(),
            self.backend,
            &self.file_id,
            &self.data_key,
            wrap_nonce,
        )
    }

    /// The object's random identifier.
    pub fn file_id(&self) -> FileId {
        self.file_id
    }

    /// The format version of the object's header (1, 2 or 3).
    pub fn format_version(&self) -> u16 {
        self.version
    }

    /// Formats 2 and 3: the version map attached by [`ObjectCipher::attach_map`] (format 3 without a stored map:
    /// the one-run map of the file id).
    pub fn version_map(&self) -> Option<&VersionMap> {
        self.map.as_ref()
    }

    /// HMAC-SHA256(map_key, `"s3cf-map-v2"` || file_id || plain_len (u64) || body).
    fn map_mac(&self, plain_len: u64, body: &[u8]) -> HmacSha256 {
        hmac_sha256(
            &self.map_key[..],
            &[MAP_DOMAIN, &self.file_id.0, &plain_len.to_be_bytes(), body],
        )
    }

    /// The stored form of `map` (format 2), for the object's metadata: base64
    /// (standard, no padding) of `body || tag`, where the body lists the runs and
    /// the tag is the first 16 bytes of the map MAC over the file id, the
    /// plaintext length and the body (docs/FORMAT.md).
    pub fn seal_map(&self, map: &VersionMap) -> String {
        let mut bytes = map.encode_body();
        let tag = self.map_mac(map.plain_len(), &bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..MAP_TAG_LEN]);
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, bytes)
    }

    /// Authenticates a stored map (see [`ObjectCipher::seal_map`]) for a file of
    /// `plain_len` bytes, in constant time, before parsing it.
    pub fn open_map(&self, stored: &str, plain_len: u64) -> Result<VersionMap, CryptoError> {
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD_NO_PAD, stored)
                .map_err(|_| CryptoError::VersionMapForged)?;
        if bytes.len() < MIN_MAP_LEN {
            return Err(CryptoError::VersionMapForged);
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAP_TAG_LEN);
        self.map_mac(plain_len, body)
            .verify_truncated_left(tag)
            .map_err(|_| CryptoError::VersionMapForged)?;
        VersionMap::decode_body(body, plain_len)
    }

    /// Makes the object readable: for formats 2 and 3, authenticates `stored`
    /// (the metadata value) for a file of `plain_len` bytes — the length the
    /// reader derived from the object's size — and keeps it for
    /// [`ObjectCipher::open_chunk`]. Format 3 without a stored map keeps the
    /// one-run map of its file id ([`ObjectCipher::implicit_version`]). Format 1
    /// needs no map and ignores one.
    pub fn attach_map(&mut self, stored: Option<&str>, plain_len: u64) -> Result<(), CryptoError> {
        match (self.version, stored) {
            (FORMAT_VERSION_1, _) => return Ok(()),
            (FORMAT_VERSION_3, None) => {
                self.map = Some(VersionMap::whole(plain_len, self.implicit_version()));
                return Ok(());
            }
            _ => {}
        }
        let stored = stored.ok_or(CryptoError::MissingVersionMap)?;
        self.map = Some(self.open_map(stored, plain_len)?);
        Ok(())
    }

    /// Format 3: the version id of every chunk of an object that has no map (one written whole, or streamed),
    /// which is its file id.
    pub fn implicit_version(&self) -> VersionId {
        VersionId(self.file_id.0)
    }

    /// Format 2, a new version this writer seals: keeps `map` (trusted, it is the
    /// writer's own) so that [`ObjectCipher::seal_chunk_as_mapped`] seals chunk `i`
    /// with the id the map gives it. A whole upload sets `VersionMap::whole`.
    pub fn set_map(&mut self, map: VersionMap) {
        assert_ne!(
            self.version, FORMAT_VERSION_1,
            "invariant broken: a version map set on a version-1 object"
        );
        self.map = Some(map);
    }

    /// Appends chunk `index` sealed as the object's format needs: version 1 as
    /// [`ObjectCipher::seal_chunk`], versions 2 and 3 with the id its map (set
    /// with [`ObjectCipher::set_map`]) gives the chunk; version 3 without a map
    /// with [`ObjectCipher::implicit_version`] (a new object written whole or
    /// streamed, whose length need not be known yet).
    ///
    /// # Panics
    /// On a version-2 object without a map covering `index` (a caller bug), and
    /// for the layout violations of [`ObjectCipher::seal_chunk`].
    pub fn seal_chunk_as_mapped(&self, index: u64, is_last: bool, plaintext: &[u8], out: &mut Vec<u8>) {
        if self.version == FORMAT_VERSION_1 {
            return self.seal_chunk(index, is_last, plaintext, out);
        }
        let version = match &self.map {
            None if self.version == FORMAT_VERSION_3 => Some(self.implicit_version()),
            map => map.as_ref().and_then(|m| m.version_of(index)),
        }
        .expect("invariant broken: a version-2 chunk sealed without a version map that covers it");
        self.seal_chunk_in(&version, index, is_last, plaintext, out);
    }

    /// The AEAD backend this context uses.
    pub fn backend(&self) -> AeadBackend {
        self.backend
    }

    /// Append chunk `index` (`nonce || ciphertext || tag`) to `out`, with a fresh random nonce.
    ///
    /// # Panics
    /// If the chunk breaks the layout every reader relies on: more than
    /// [`CHUNK_PLAIN_LEN`] bytes, a non-last chunk that is not full, or an empty
    /// last chunk after index 0. These are bugs in the caller, not bad input.
    /// A version-1 object only: a version-2 chunk needs its version id
    /// ([`ObjectCipher::seal_chunk_in`]); this panics on one, as a caller bug.
    pub fn seal_chunk(&self, index: u64, is_last: bool, plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        self.seal_chunk_with_nonce(index, is_last, plaintext, nonce, out);
    }

    /// Format 2: append chunk `index`, sealed by version `version` (the id of
    /// the upload writing it), with a fresh random nonce.
    ///
    /// # Panics
    /// On a version-1 object, and for the layout violations of [`ObjectCipher::seal_chunk`].
    pub fn seal_chunk_in(
        &self,
        version: &VersionId,
        index: u64,
        is_last: bool,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        self.seal_chunk_in_with_nonce(version, index, is_last, plaintext, nonce, out);
    }

    /// `seal_chunk_in` with a caller-chosen nonce, for known-answer tests and fixtures only.
    pub(crate) fn seal_chunk_in_with_nonce(
        &self,
        version: &VersionId,
        index: u64,
        is_last: bool,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
        out: &mut Vec<u8>,
    ) {
        assert_ne!(
            self.version, FORMAT_VERSION_1,
            "invariant broken: a version id sealed into a chunk of a version-1 object"
        );
        Self::check_chunk_layout(index, is_last, plaintext);
        out.reserve(plaintext.len() + CHUNK_OVERHEAD as usize);
        out.extend_from_slice(&nonce);
        self.chunk_key.seal(
            &nonce,
            &chunk_aad_v2(self.version, &self.file_id, index, is_last, version),
            plaintext,
            out,
        );
    }

    fn check_chunk_layout(index: u64, is_last: bool, plaintext: &[u8]) {
        let len = plaintext.len() as u64;
        assert!(
            len <= CHUNK_PLAIN_LEN,
            "invariant broken: chunk plaintext longer than CHUNK_PLAIN_LEN"
        );
        assert!(
            is_last || len == CHUNK_PLAIN_LEN,
            "invariant broken: only the last chunk may be short"
        );
        assert!(
            !is_last || index == 0 || len > 0,
            "invariant broken: only an empty file has an empty last chunk"
        );
    }

    /// `seal_chunk` with a caller-chosen nonce, for known-answer tests and fixtures only.
    pub(crate) fn seal_chunk_with_nonce(
        &self,
        index: u64,
        is_last: bool,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
        out: &mut Vec<u8>,
    ) {
        assert_eq!(
            self.version, FORMAT_VERSION_1,
            "invariant broken: a chunk of a version-2 object sealed without its version id"
        );
        Self::check_chunk_layout(index, is_last, plaintext);
        out.reserve(plaintext.len() + CHUNK_OVERHEAD as usize);
        out.extend_from_slice(&nonce);
        self.chunk_key.seal(
            &nonce,
            &chunk_aad(&self.file_id, index, is_last),
            plaintext,
            out,
        );
    }

    /// Authenticate chunk `index` and append its plaintext to `out`. On error
    /// `out` is unchanged. `is_last` must come from the object's size
    /// ([`super::format::is_last_chunk`]), which is what makes truncation detectable.
    ///
    /// Formats 2 and 3: the chunk is opened with the version id the attached map
    /// gives it (format 2: `MissingVersionMap` before [`ObjectCipher::attach_map`];
    /// format 3: the implicit version; a chunk past the map's end fails
    /// authentication).
    pub fn open_chunk(
        &self,
        index: u64,
        is_last: bool,
        chunk: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if chunk.len() < CHUNK_OVERHEAD as usize {
            return Err(CryptoError::TruncatedChunk {
                chunk: index,
                len: chunk.len(),
            });
        }
        if chunk.len() as u64 > CHUNK_CIPHER_LEN {
            return Err(CryptoError::Malformed {
                what: "a chunk is longer than 65564 bytes",
            });
        }
        let (nonce, sealed) = chunk.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce
            .try_into()
            .expect("invariant broken: split_at(NONCE_LEN)");
        let aad = self.chunk_aad_of(index, is_last)?;
        self.chunk_key
            .open(nonce, &aad, sealed, out)
            .map_err(|_| CryptoError::AuthenticationFailed { chunk: index })
    }

    /// [`ObjectCipher::open_chunk`] for a chunk whose parts the caller holds apart: the nonce (the chunk's first
    /// [`NONCE_LEN`] bytes), the ciphertext in `buf` (decrypted in place) and the tag (its last
    /// [`aead::TAG_LEN`] bytes).
    /// A reader fills the page it keeps straight from the response body this way, with no copy of the chunk in
    /// between. On error `buf` is all zeros: no unauthenticated byte is left in it.
    pub fn open_chunk_detached(
        &self,
        index: u64,
        is_last: bool,
        nonce: &[u8; NONCE_LEN],
        buf: &mut [u8],
        tag: &[u8; aead::TAG_LEN],
    ) -> Result<(), CryptoError> {
        if buf.len() as u64 > CHUNK_PLAIN_LEN {
            buf.fill(0);
            return Err(CryptoError::Malformed {
                what: "a chunk is longer than 65564 bytes",
            });
        }
        let aad = match self.chunk_aad_of(index, is_last) {
            Ok(aad) => aad,
            Err(e) => {
                buf.fill(0);
                return Err(e);
            }
        };
        self.chunk_key
            .open_detached(nonce, &aad, buf, tag)
            .map_err(|_| CryptoError::AuthenticationFailed { chunk: index })
    }

    /// The AAD chunk `index` was sealed with: format 1's, or the version id the attached map gives it (formats 2
    /// and 3, see [`ObjectCipher::open_chunk`]).
    fn chunk_aad_of(&self, index: u64, is_last: bool) -> Result<Vec<u8>, CryptoError> {
        if self.version == FORMAT_VERSION_1 {
            return Ok(chunk_aad(&self.file_id, index, is_last).to_vec());
        }
        let version = match &self.map {
            // Format 3 with no map attached: the implicit version. (A stored map the caller did not attach makes
            // the chunks other versions sealed fail, never opens wrong bytes.)
            None if self.version == FORMAT_VERSION_3 => self.implicit_version(),
            None => return Err(CryptoError::MissingVersionMap),
            Some(map) => map
                .version_of(index)
                .ok_or(CryptoError::AuthenticationFailed { chunk: index })?,
        };
        Ok(chunk_aad_v2(self.version, &self.file_id, index, is_last, &version).to_vec())
    }

    /// The path binding to store in the object's metadata: base64 (standard, no
    /// padding) of the first 16 bytes of
    /// HMAC-SHA256(bind_key, `"s3cf-bind-v1"` || file_id || path).
    pub fn binding(&self, path: &str) -> String {
        let tag = hmac_sha256(
            &self.bind_key[..],
            &[BIND_DOMAIN, &self.file_id.0, path.as_bytes()],
        )
        .finalize()
        .into_bytes();
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &tag[..BINDING_LEN],
        )
    }

    /// Check, in constant time, that `binding` was made for this object at `path`.
    pub fn verify_binding(&self, path: &str, binding: &str) -> Result<(), CryptoError> {
        let given =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD_NO_PAD, binding)
                .map_err(|_| CryptoError::ObjectSwapped)?;
        if given.len() != BINDING_LEN {
            return Err(CryptoError::ObjectSwapped);
        }
        hmac_sha256(
            &self.bind_key[..],
            &[BIND_DOMAIN, &self.file_id.0, path.as_bytes()],
        )
        .verify_truncated_left(&given)
        .map_err(|_| CryptoError::ObjectSwapped)
    }
}

/// Encrypt a whole object in memory (tests and small objects).
pub fn encrypt_object(keys: &KeyHistory, backend: AeadBackend, plaintext: &[u8]) -> Vec<u8> {
    let (cipher, header) = ObjectCipher::create(keys, backend);
    seal_all(&cipher, &header, plaintext, |_| None)
}

/// Shared by `encrypt_object` and the deterministic fixture builder.
fn seal_all(
    cipher: &ObjectCipher,
    header: &[u8; HEADER_LEN as usize],
    plaintext: &[u8],
    nonce_for: impl Fn(u64) -> Option<[u8; NONCE_LEN]>,
) -> Vec<u8> {
    let plain = plaintext.len() as u64;
    let mut out = Vec::with_capacity(super::format::cipher_size(plain) as usize);
    out.extend_from_slice(header);
    let mut chunks = plaintext.chunks(CHUNK_PLAIN_LEN as usize);
    for index in 0..chunk_count(plain) {
        let piece = chunks.next().unwrap_or(&[]); // the one empty chunk of an empty file
        let last = is_last_chunk(index, plain);
        match nonce_for(index) {
            Some(nonce) => cipher.seal_chunk_with_nonce(index, last, piece, nonce, &mut out),
            None => cipher.seal_chunk(index, last, piece, &mut out),
        }
    }
    out
}

/// Decrypt and authenticate a whole object in memory. The plaintext size, chunk
/// boundaries and last-chunk flag all follow from `bytes.len()`.
pub fn decrypt_object(
    keys: &KeyHistory,
    backend: AeadBackend,
    bytes: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    decrypt_object_with_map(keys, backend, bytes, None)
}

/// [`decrypt_object`] for an object of either format version: `map` is the
/// stored version map from its metadata (needed by format 2, ignored by 1).
pub fn decrypt_object_with_map(
    keys: &KeyHistory,
    backend: AeadBackend,
    bytes: &[u8],
    map: Option<&str>,
) -> Result<Vec<u8>, CryptoError> {
    let mut cipher = ObjectCipher::open(bytes, keys, backend)?;
    let plain = plain_size(bytes.len() as u64)?;
    cipher.attach_map(map, plain)?;
    let mut out = Vec::with_capacity(plain as usize);
    for index in 0..chunk_count(plain) {
        let range = chunk_cipher_range(index, plain);
        let chunk = &bytes[range.start as usize..range.end as usize];
        cipher.open_chunk(index, is_last_chunk(index, plain), chunk, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests_v2;
#[cfg(test)]
mod tests_v3;
