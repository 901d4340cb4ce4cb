//! The read path of AWS S3 Encryption Client objects (issue 12): nothing is served before it is authenticated.
//!
//! An S3EC object is one AES-256-GCM message over the whole object with a single tag at its end (docs/FORMAT.md,
//! "S3 Encryption Client objects"), so no byte of it may reach an application before the whole object has been read
//! and the tag checked. A [`Reader`] of such an object therefore:
//!
//! 1. on its first read, makes one **verification pass** over the whole object, in order: GETs of [`PASS_SEGMENT`]
//!    bytes (one GET for an object up to that size, [`PASS_SEGMENTS_IN_FLIGHT`] at a time for a larger one), fed to a
//!    streaming GCM decryptor that also records the SHA-256 of every 64 KiB chunk of ciphertext. The data key is
//!    unwrapped from the metadata the first GET returned ([`content_key`]: KMS for `kms+context`, the key file's keys
//!    for `AES/GCM`, the `rsa_key_file=` key for `RSA-OAEP-SHA1`), V3 key commitments are checked before the key is used, and every GET must come from the same
//!    object version (size and ETag);
//! 2. once the tag verified, keeps the content key and the chunk digests as that object version's [`Verified`]
//!    index, shared by every reader of the version (key + ETag) through [`S3ecReads`], and puts the pages decrypted
//!    during the pass in the page cache when the object is at most half the cache (larger objects keep only the
//!    index: their plaintext would evict everything else);
//! 3. serves every later read from the page cache, or fetches the ciphertext range, checks each 64 KiB chunk against
//!    its digest, decrypts it with AES-CTR at its offset and caches it.
//!
//! Plaintext the decryptor produces during a pass is unverified until the tag checked out: it stays in the pass's
//! own buffer and is dropped if the pass fails. Every failure (tag, chunk digest, commitment, key unwrap, KMS
//! context, another version) is an [`Error`] naming the object, which the FUSE boundary logs once and maps to EIO
//! (ESTALE for another version); no byte of a failed object is returned or cached.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::StreamExt;
use lru::LruCache;
use tokio::sync::OnceCell;

use super::Reader;
use crate::cache::page::PageBuf;
use crate::cache::ObjectId;
use crate::crypto::s3ec::{
    self, ChunkDigests, ContentKey, Detection, DigestSpec, Envelope, FormatVersion, RsaPrivateKey, S3ecError,
    WrapAlg, KMS_CONTEXT_CEK_ALG, KMS_CONTEXT_CMK_ID,
};
use crate::crypto::CHUNK_PLAIN_LEN;
use crate::fs::error::{Error, Result};
use crate::kms::KmsError;
use crate::object::Codec;
use crate::store::{Backend, ObjectKey, UserMeta};

/// Bytes per GET of a verification pass, and the largest object fetched with one GET: 8 MiB, the size at which one
/// S3 request is near its best throughput (the upload's part size too). Objects up to this size cost one GET.
pub const PASS_SEGMENT: u64 = 8 << 20;
/// GETs of one pass in flight at once: four 8 MiB segments keep a fast link busy and bound a pass to about 32 MiB of
/// ciphertext in memory (the decryptor itself consumes them in order).
pub const PASS_SEGMENTS_IN_FLIGHT: usize = 4;
/// Object versions whose verified index is kept in memory for readers opened later.
const VERIFIED_ENTRIES: usize = 1024;
/// Bytes of chunk digests kept for those versions: 32 B per 64 KiB, so 64 MiB indexes 128 TiB of objects; the least
/// recently used versions go first, and need a new pass when read again.
const VERIFIED_DIGEST_BYTES: usize = 64 << 20;

// A digest chunk is a page of the page cache, so a page is checked and decrypted on its own.
const _: () = assert!(s3ec::DEFAULT_DIGEST_CHUNK_LEN == CHUNK_PLAIN_LEN);

/// How S3EC objects are read, from the mount options.
#[derive(Debug, Clone, Default)]
pub struct S3ecOptions {
    /// Refuse format V2 (no key commitment): `require_commitment`.
    pub require_commitment: bool,
    /// The private key of `rsa_key_file=`, for objects whose data key is wrapped with `RSA-OAEP-SHA1`.
    pub rsa_key: Option<Arc<RsaPrivateKey>>,
}

/// Why an S3EC object cannot be read. Each message names what to do; the object's key is added by [`Error::S3ec`].
#[derive(Debug, thiserror::Error)]
pub enum S3ecReadError {
    #[error("S3 Encryption Client object: {0}")]
    Format(#[from] S3ecError),
    #[error("S3 Encryption Client object: {0}")]
    Kms(#[from] KmsError),
    /// KMS refused the wrapped data key (`InvalidCiphertextException`, `IncorrectKeyException`).
    #[error(
        "S3 Encryption Client object whose wrapped data key KMS key {key_id} refused (the server said: {message}): \
         it was wrapped under another KMS key, or the wrapped key or the encryption context stored with it \
         (x-amz-t / x-amz-matdesc) was modified"
    )]
    KmsRefused { key_id: String, message: String },
    #[error(
        "S3 Encryption Client object in the legacy format V1 (AES-CBC, unauthenticated), which s3cryptfs does not \
         read; re-encrypt it with a current S3 Encryption Client"
    )]
    LegacyV1,
    #[error(
        "S3 Encryption Client object in format V2, which has no key commitment, refused because the mount has \
         require_commitment; re-encrypt it in format V3 or mount without require_commitment"
    )]
    CommitmentRequired,
    #[error(
        "S3 Encryption Client object whose data key is wrapped by KMS (kms+context); mount with mode=cse-kms to \
         read it"
    )]
    NeedsKms,
    #[error(
        "S3 Encryption Client object whose data key is wrapped under a customer key (AES/GCM); give the mount the \
         key file that holds that key (key_file=)"
    )]
    NeedsCustomerKey,
    #[error(
        "S3 Encryption Client object whose data key is wrapped under an RSA key (RSA-OAEP-SHA1); give the mount the \
         RSA private key it was wrapped for: add -o rsa_key_file=PATH (a PEM file only its owner can read)"
    )]
    NeedsRsaKey,
    #[error(
        "S3 Encryption Client object whose data key none of the {keys} key(s) of the key file unwraps: it was \
         wrapped under another key, or its wrapped key or content algorithm was modified"
    )]
    NoKeyUnwraps { keys: usize },
    #[error("S3 Encryption Client object whose envelope is in {instruction}, which does not exist")]
    MissingInstructionFile { instruction: String },
}

impl S3ecReadError {
    /// EACCES for a KMS denial the user can fix with permissions, EIO for everything else.
    pub fn errno(&self) -> i32 {
        match self {
            S3ecReadError::Kms(k) => k.errno(),
            _ => libc::EIO,
        }
    }
}

/// One verified object version: the content key and the authenticated chunk digests of its ciphertext.
pub struct Verified {
    content: ContentKey,
    digests: ChunkDigests,
}

type Slot = Arc<OnceCell<Arc<Verified>>>;

/// What the readers of one mount share for S3EC objects: the options, and the verified index of recently read
/// object versions, so that a file opened again (or by another process) needs no second pass.
///
/// Concurrency: one std `Mutex` around an LRU of slots, never held across an `.await`; a pass runs in its slot's
/// `OnceCell`, so concurrent first reads of the same version wait for one pass. A failed pass leaves nothing behind:
/// the next read tries again.
pub struct S3ecReads {
    options: S3ecOptions,
    verified: Mutex<LruCache<ObjectId, Slot>>,
}

impl S3ecReads {
    pub fn new(options: S3ecOptions) -> S3ecReads {
        let capacity = NonZeroUsize::new(VERIFIED_ENTRIES).expect("invariant broken: VERIFIED_ENTRIES is not zero");
        S3ecReads { options, verified: Mutex::new(LruCache::new(capacity)) }
    }

    pub fn options(&self) -> &S3ecOptions {
        &self.options
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<ObjectId, Slot>> {
        // Nothing the lock guards can be left half-updated in a way that matters for a cache.
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(&self, id: &ObjectId) -> Slot {
        let mut entries = self.lock();
        if let Some(slot) = entries.get(id) {
            return Arc::clone(slot);
        }
        let slot = Slot::default();
        entries.put(id.clone(), Arc::clone(&slot));
        slot
    }

    /// Records `verified` as the index of the object version `id` that this mount has just written (its content key
    /// and the digests of the ciphertext it sent), so that reading it back costs no verification pass: the digests
    /// are of the very bytes the store was given, which is what a pass would have authenticated.
    pub fn insert_written(&self, id: ObjectId, content: ContentKey, digests: ChunkDigests) {
        let slot = Slot::new(OnceCell::new_with(Some(Arc::new(Verified { content, digests }))));
        self.lock().put(id, slot);
        self.trim();
    }

    /// Drops `id`'s entry if it is still `slot` and empty (its pass failed).
    fn forget(&self, id: &ObjectId, slot: &Slot) {
        let mut entries = self.lock();
        if entries.peek(id).is_some_and(|s| Arc::ptr_eq(s, slot) && !s.initialized()) {
            entries.pop(id);
        }
    }

    /// Evicts the least recently used versions until the digests kept fit [`VERIFIED_DIGEST_BYTES`] (the most
    /// recent one always stays).
    fn trim(&self) {
        let mut entries = self.lock();
        let bytes = |s: &Slot| s.get().map_or(0, |v| v.digests.digests().len() * 32);
        let mut total: usize = entries.iter().map(|(_, s)| bytes(s)).sum();
        while total > VERIFIED_DIGEST_BYTES && entries.len() > 1 {
            match entries.pop_lru() {
                Some((_, s)) => total -= bytes(&s),
                None => break,
            }
        }
    }

    /// Entries kept (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The envelope of the object `key` whose metadata is `meta`: from the metadata, or completed from its instruction
/// file `KEY.instruction` (S3EC.md §1.5–1.6).
pub async fn envelope_of(backend: &dyn Backend, key: &str, meta: &UserMeta) -> Result<Envelope> {
    match s3ec::detect(meta.extra.iter()).map_err(|e| Error::s3ec(key, e.into()))? {
        Detection::Complete(envelope) => Ok(envelope),
        Detection::NeedsInstructionFile(pending) => {
            let instruction = s3ec::instruction_file_key(key);
            let ikey = ObjectKey::new(instruction.as_str()).map_err(|e| Error::store(&instruction, e))?;
            let body = match backend.get(&ikey).await {
                Ok((body, _, _)) => body,
                Err(e) if e.is_not_found() => {
                    return Err(Error::s3ec(key, S3ecReadError::MissingInstructionFile { instruction }))
                }
                Err(e) => return Err(Error::store(&instruction, e)),
            };
            pending.complete(&body).map_err(|e| Error::s3ec(key, e.into()))
        }
    }
}

/// The content key of an S3EC object: the data key unwrapped as its envelope says, then (V3) the key commitment
/// checked.
///
/// - `kms+context`: KMS Decrypt with the stored encryption context, after the checks of
///   [`s3ec::kms_decrypt_request`] (the context binds the content algorithm the metadata names). The mount accepts
///   whatever user context the object carries (KMS refuses a changed one); it names its own `kms_key_id` as `KeyId`
///   when it has one, so an object wrapped under another KMS key is refused as the AWS clients refuse it, and names
///   none on a read-only mount without one.
/// - `AES/GCM`: each key of the key file in turn (the material description is not used to choose).
/// - `RSA-OAEP-SHA1`: the private key of `rsa_key_file=` (the pseudo data key's suffix binds the content algorithm).
/// - the legacy wraps (PKCS#1 v1.5 `RSA`, `RSA/ECB/OAEPWithSHA-256AndMGF1Padding`, `kms`, `AESWrap`, `AES`): refused
///   with the wrap named; format V1: refused; format V2 under `require_commitment`: refused.
pub async fn content_key(
    codec: &Codec,
    options: &S3ecOptions,
    envelope: &Envelope,
) -> std::result::Result<ContentKey, S3ecReadError> {
    match envelope.version() {
        FormatVersion::V1 => return Err(S3ecReadError::LegacyV1),
        FormatVersion::V2 if options.require_commitment => return Err(S3ecReadError::CommitmentRequired),
        FormatVersion::V2 | FormatVersion::V3 => {}
    }
    let (keys, kms) = match codec {
        Codec::Cse { keys, kms, .. } => (keys.as_deref(), kms.as_deref()),
        Codec::Plain => (None, None),
    };
    let data_key = match envelope.wrap() {
        WrapAlg::KmsContext => {
            let kms = kms.ok_or(S3ecReadError::NeedsKms)?;
            let user_context: BTreeMap<String, String> = envelope
                .context()
                .iter()
                .filter(|(k, _)| *k != KMS_CONTEXT_CEK_ALG && *k != KMS_CONTEXT_CMK_ID)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let request = s3ec::kms_decrypt_request(envelope, &user_context)?;
            let context: Vec<(&str, String)> =
                request.encryption_context.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            kms.decrypt_as(kms.key_id(), &request.ciphertext_blob, &context).await.map_err(|e| match e {
                KmsError::InvalidCiphertext { key_id, message } => S3ecReadError::KmsRefused { key_id, message },
                other => S3ecReadError::Kms(other),
            })?
        }
        WrapAlg::AesGcm => {
            let keys = keys.ok_or(S3ecReadError::NeedsCustomerKey)?;
            let mut unwrapped = None;
            for kek in keys.keys() {
                match s3ec::aes_gcm_unwrap(kek, envelope) {
                    Ok(data_key) => {
                        unwrapped = Some(data_key);
                        break;
                    }
                    Err(S3ecError::KeyUnwrapFailed) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            unwrapped.ok_or(S3ecReadError::NoKeyUnwraps { keys: keys.len() })?
        }
        WrapAlg::RsaOaepSha1 => {
            let key = options.rsa_key.as_deref().ok_or(S3ecReadError::NeedsRsaKey)?;
            s3ec::rsa_oaep_unwrap(key, envelope)?
        }
        wrap => return Err(S3ecError::UnsupportedWrap { wrap }.into()),
    };
    Ok(ContentKey::for_decrypt(envelope, &data_key)?)
}

/// The GET ranges of a pass over `stored` bytes: consecutive [`PASS_SEGMENT`]s, the last one shorter.
fn pass_segments(stored: u64) -> Vec<Range<u64>> {
    (0..stored.div_ceil(PASS_SEGMENT)).map(|i| i * PASS_SEGMENT..((i + 1) * PASS_SEGMENT).min(stored)).collect()
}

impl Reader {
    /// At open: an encrypted object without content is checked now, since the kernel sends no read for an empty file
    /// and a tampered one would otherwise read as empty. An S3EC object's tag is verified; an own-format object's
    /// header, path binding, version map and empty last chunk are fetched (540 bytes) and authenticated, so any
    /// object cut to its first 540 bytes, or swapped for another's, is an error rather than an empty file. Nothing to
    /// do for objects with content (their reads check them) and plaintext modes.
    pub async fn check_at_open(&self) -> Result<()> {
        if self.plain_size != 0 {
            return Ok(());
        }
        if self.format.is_s3ec() {
            self.s3ec_verified().await?;
        } else if self.codec.is_encrypted() {
            self.empty_checked.get_or_try_init(|| async { self.fetch_store(0..1, None).await.map(|_| ()) }).await?;
        }
        Ok(())
    }

    /// The verified index of this reader's object version: this reader's, another reader's of the same version, or
    /// made now by a pass.
    pub(super) async fn s3ec_verified(&self) -> Result<Arc<Verified>> {
        self.verified
            .get_or_try_init(|| async {
                // Without an ETag two versions of the same size cannot be told apart: no sharing then.
                if self.etag.is_empty() {
                    return self.s3ec_pass().await.map(Arc::new);
                }
                let id = self.object_id();
                let slot = self.s3ec.slot(&id);
                match slot.get_or_try_init(|| async { self.s3ec_pass().await.map(Arc::new) }).await {
                    Ok(verified) => {
                        let verified = Arc::clone(verified);
                        self.s3ec.trim();
                        Ok(verified)
                    }
                    Err(e) => {
                        self.s3ec.forget(&id, &slot);
                        Err(e)
                    }
                }
            })
            .await
            .cloned()
    }

    /// The verification pass (see the module documentation).
    async fn s3ec_pass(&self) -> Result<Verified> {
        let key = self.key();
        let object = ObjectKey::new(key.as_str()).map_err(|e| Error::store(&key, e))?;
        let t0 = std::time::Instant::now();
        // The segments in flight and their plaintext, from the memory budget (src/memory); the plaintext kept for the
        // page cache only when it is small next to the cache and the budget has room for it beside the pass (it is
        // copied into pages at the end, so twice).
        let memory = self.cache.memory();
        let in_flight = self.stored_size.min(PASS_SEGMENT * PASS_SEGMENTS_IN_FLIGHT as u64);
        let _pass_memory = memory.reserve(in_flight + in_flight.min(PASS_SEGMENT)).await;
        let kept_memory = if self.plain_size <= self.cache.capacity() / 2 {
            memory.try_reserve(2 * self.plain_size)
        } else {
            None
        };
        let keep = kept_memory.is_some();
        let backend = &self.backend;
        let mut gets = futures::stream::iter(pass_segments(self.stored_size).into_iter().map(|range| {
            let object = object.clone();
            async move {
                let want = range.end - range.start;
                backend.get_range(&object, range).await.map(|got| (got, want))
            }
        }))
        .buffered(PASS_SEGMENTS_IN_FLIGHT);
        let mut state: Option<(ContentKey, s3ec::StreamDecryptor)> = None;
        let mut plain: Vec<u8> = Vec::with_capacity(if keep { self.plain_size as usize } else { 0 });
        while let Some(got) = gets.next().await {
            let ((bytes, info, meta), want) = got.map_err(|e| Error::store(&key, e))?;
            self.check_version(&key, &info)?;
            if bytes.len() as u64 != want {
                // Shorter than its size says: it changed while the pass was reading it.
                return Err(Error::Changed { key });
            }
            if state.is_none() {
                // The envelope comes with the first bytes, from the version the rest must belong to.
                let envelope = envelope_of(&**backend, &key, &meta).await?;
                let content = content_key(&self.codec, self.s3ec.options(), &envelope)
                    .await
                    .map_err(|e| Error::s3ec(&key, e))?;
                let decryptor = content.decryptor().with_digests(DigestSpec::default());
                state = Some((content, decryptor));
            }
            let (_, decryptor) = state.as_mut().expect("invariant broken: the decryptor was set just above");
            if !keep {
                plain.clear();
            }
            decryptor.update(&bytes, &mut plain).map_err(|e| Error::s3ec(&key, e.into()))?;
        }
        // A stored size below the tag length never gets a reader, so there was at least one segment.
        let (content, decryptor) = state.ok_or_else(|| Error::s3ec(&key, S3ecError::Truncated { len: 0 }.into()))?;
        let verified = decryptor.finish().map_err(|e| Error::s3ec(&key, e.into()))?;
        let digests = verified.into_digests().expect("invariant broken: the pass asked the decryptor for digests");
        tracing::debug!(key = %key, bytes = self.stored_size, ms = t0.elapsed().as_millis() as u64, cached = keep, "S3EC object verified");
        if keep {
            let id = self.object_id();
            for (index, page) in plain.chunks(CHUNK_PLAIN_LEN as usize).enumerate() {
                self.cache.put(&id, index as u64, PageBuf::copy_of(page).freeze());
            }
        }
        drop(kept_memory);
        Ok(Verified { content, digests })
    }

    /// Pages `run` of a verified S3EC object: from the cache (where the pass may have put them), else one ranged GET
    /// of their ciphertext, each chunk checked against its digest and decrypted.
    pub(super) async fn s3ec_fetch(&self, run: Range<u64>) -> Result<Vec<Bytes>> {
        let verified = self.s3ec_verified().await?;
        let key = self.key();
        let id = ObjectId { key: key.clone(), etag: self.etag.clone() };
        let cached: Vec<Bytes> = run.clone().map_while(|i| self.cache.get(&id, i)).collect();
        if cached.len() as u64 == run.end - run.start {
            return Ok(cached);
        }
        let start = run.start * CHUNK_PLAIN_LEN;
        let end = (run.end * CHUNK_PLAIN_LEN).min(self.plain_size);
        let object = ObjectKey::new(key.as_str()).map_err(|e| Error::store(&key, e))?;
        let (bytes, info, _) = self.backend.get_range(&object, start..end).await.map_err(|e| Error::store(&key, e))?;
        self.check_version(&key, &info)?;
        if bytes.len() as u64 != end - start {
            return Err(Error::Changed { key });
        }
        let mut pages = Vec::with_capacity((run.end - run.start) as usize);
        for index in run {
            let range = verified
                .digests
                .chunk_range(index)
                .ok_or_else(|| Error::s3ec(&key, S3ecError::ChunkDigestMismatch { chunk: index }.into()))?;
            let stored = &bytes[(range.start - start) as usize..(range.end - start) as usize];
            verified.digests.verify(index, stored).map_err(|e| Error::s3ec(&key, e.into()))?;
            let mut plain = PageBuf::copy_of(stored);
            verified
                .content
                .apply_keystream_at(range.start, plain.as_mut_slice())
                .map_err(|e| Error::s3ec(&key, e.into()))?;
            let page = plain.freeze();
            self.cache.put(&id, index, page.clone());
            pages.push(page);
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PageCache;
    use crate::crypto::s3ec::{new_object_aes, WriteFormat, INSTRUCTION_SUFFIX};
    use crate::crypto::{AeadBackend, Key256, KeyHistory};
    use crate::object::StoredFormat;
    use crate::read::{FetchEnd, Keep, ReadContext, Started};
    use crate::store::{ObjectStoreBackend, StoreError};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An in-memory store whose ranged GETs of content (not starting at 0) come back with one byte flipped while
    /// `corrupt` is set: a store that changes bytes under an unchanged ETag, after the pass verified them. While
    /// `unanswered` is set, its ranged GETs fail at once with a deadline's error, as a store that never answered.
    struct Corrupting {
        inner: ObjectStoreBackend,
        corrupt: AtomicBool,
        unanswered: AtomicBool,
    }

    #[async_trait]
    impl Backend for Corrupting {
        fn copies_parts(&self) -> bool {
            self.inner.copies_parts()
        }

        async fn head(&self, key: &ObjectKey) -> Result<(crate::store::ObjectInfo, UserMeta), StoreError> {
            self.inner.head(key).await
        }
        async fn get_range(
            &self,
            key: &ObjectKey,
            range: Range<u64>,
        ) -> Result<(Bytes, crate::store::ObjectInfo, UserMeta), StoreError> {
            if self.unanswered.load(Ordering::SeqCst) {
                let after = std::time::Duration::from_secs(1);
                return Err(StoreError::TimedOut { key: key.as_str().into(), after, detail: "GET (test)".into() });
            }
            let (bytes, info, meta) = self.inner.get_range(key, range).await?;
            if self.corrupt.load(Ordering::SeqCst) && !bytes.is_empty() {
                let mut v = bytes.to_vec();
                v[bytes.len() / 2] ^= 0x20;
                return Ok((Bytes::from(v), info, meta));
            }
            Ok((bytes, info, meta))
        }
        async fn get(&self, key: &ObjectKey) -> Result<(Bytes, crate::store::ObjectInfo, UserMeta), StoreError> {
            self.inner.get(key).await
        }
        async fn put_expect(
            &self,
            key: &ObjectKey,
            body: Bytes,
            meta: &UserMeta,
            expect: &crate::store::Expect,
        ) -> Result<crate::store::ObjectInfo, StoreError> {
            self.inner.put_expect(key, body, meta, expect).await
        }
        async fn put_multipart_expect(
            &self,
            key: &ObjectKey,
            meta: &UserMeta,
            expect: &crate::store::Expect,
        ) -> Result<Box<dyn crate::store::Upload>, StoreError> {
            self.inner.put_multipart_expect(key, meta, expect).await
        }
        async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
            self.inner.copy(from, to, meta).await
        }
        async fn update_meta(
            &self,
            key: &ObjectKey,
            meta: &UserMeta,
        ) -> Result<crate::store::ObjectInfo, StoreError> {
            self.inner.update_meta(key, meta).await
        }
        async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn list(&self, dir: &str, recursive: bool) -> Result<crate::store::Listing, StoreError> {
            self.inner.list(dir, recursive).await
        }
        async fn check_access(&self) -> Result<(), StoreError> {
            self.inner.check_access().await
        }
    }

    fn store() -> Arc<Corrupting> {
        let inner = ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap();
        Arc::new(Corrupting { inner, corrupt: AtomicBool::new(false), unanswered: AtomicBool::new(false) })
    }

    fn key_history(keys: &[&Key256]) -> Arc<KeyHistory> {
        let text: String = keys.iter().map(|k| crate::crypto::format_new_key(k).to_string()).collect();
        Arc::new(KeyHistory::parse(&text).unwrap())
    }

    fn context(backend: Arc<dyn Backend>, keys: Arc<KeyHistory>, cache: u64, options: S3ecOptions) -> ReadContext {
        ReadContext {
            backend,
            codec: Codec::Cse {
                keys: Some(keys),
                kms: None,
                aead: AeadBackend::default(),
                format: crate::config::FileFormat::Own,
            },
            cache: Arc::new(PageCache::new(cache)),
            s3ec: Arc::new(S3ecReads::new(options)),
            fetches: Arc::default(),
            disk: None,
        }
    }

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Writes `plain` as a raw-AES S3EC object under `kek` at `key`; returns the envelope metadata and the body.
    async fn put_s3ec(
        backend: &dyn Backend,
        key: &str,
        format: WriteFormat,
        kek: &Key256,
        plain: &[u8],
    ) -> (BTreeMap<String, String>, Vec<u8>) {
        let new = new_object_aes(format, kek, &BTreeMap::new()).unwrap();
        let body = new.sealer.encrypt(plain).unwrap();
        let metadata = new.envelope.to_metadata();
        put_raw(backend, key, &metadata, &body).await;
        (metadata, body)
    }

    async fn put_raw(backend: &dyn Backend, key: &str, metadata: &BTreeMap<String, String>, body: &[u8]) {
        let meta = UserMeta { extra: metadata.clone(), ..UserMeta::default() };
        backend.put(&ObjectKey::new(key).unwrap(), Bytes::copy_from_slice(body), &meta).await.unwrap();
    }

    async fn reader(ctx: &ReadContext, key: &str, format: StoredFormat) -> Arc<Reader> {
        let (info, _) = ctx.backend.head(&ObjectKey::new(key).unwrap()).await.unwrap();
        Reader::new(ctx, key.into(), info.etag.unwrap_or_default(), info.size, format, 1 << 20).unwrap()
    }

    async fn read_all(r: &Arc<Reader>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let piece = r.read(out.len() as u64, 1 << 20).await?;
            if piece.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&piece);
        }
    }

    const S3EC: StoredFormat = StoredFormat::S3ec { instruction_file: false };

    #[track_caller]
    fn s3ec_error(r: Result<Vec<u8>>) -> S3ecReadError {
        match r {
            Err(Error::S3ec { source, .. }) => source,
            Err(other) => panic!("want an S3EC error, got {other}"),
            Ok(bytes) => panic!("want an S3EC error, got {} bytes", bytes.len()),
        }
    }

    #[tokio::test]
    async fn raw_aes_objects_read_back_whole_and_at_random_offsets_with_any_key_of_the_history() {
        let (old, new) = (Key256::generate(), Key256::generate());
        let backend = store();
        // 0, 1, one page, a page and a byte, and past one pass segment (two GETs in the pass).
        let sizes = [0usize, 1, 65_536, 65_537, PASS_SEGMENT as usize + 100_003];
        for format in [WriteFormat::V2, WriteFormat::V3] {
            for (i, len) in sizes.into_iter().enumerate() {
                let key = format!("{format:?}-{len}");
                let plain = data(len, i as u64);
                // Wrapped under the older key: the history's second line.
                put_s3ec(&*backend, &key, format, &old, &plain).await;
                // A cache too small to keep the object: later reads go through the digest index.
                for cache in [64 << 20, 1 << 20] {
                    let ctx = context(backend.clone(), key_history(&[&new, &old]), cache, S3ecOptions::default());
                    let r = reader(&ctx, &key, S3EC).await;
                    assert_eq!(r.plain_size(), len as u64);
                    assert!(read_all(&r).await.unwrap() == plain, "{key}, cache {cache}");
                    let mut x = 7u64;
                    for _ in 0..50 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let off = if len == 0 { 0 } else { (x >> 11) % len as u64 };
                        let n = ((x >> 40) % 200_000) as usize;
                        let got = r.read(off, n).await.unwrap();
                        let end = (off as usize + n).min(len);
                        assert!(got == plain[(off as usize).min(len)..end], "{key} at {off}+{n}");
                    }
                    // A second reader of the same version shares the index: no second pass.
                    let again = reader(&ctx, &key, S3EC).await;
                    assert!(read_all(&again).await.unwrap() == plain);
                    assert_eq!(ctx.s3ec.len(), 1);
                }
            }
        }
    }

    /// An S3EC object's fetch that failed at the store's deadline ends `Done`, never `Unanswered`: its pages come
    /// from a GET that does not tell when the store answered, so the reads waiting on it ask again themselves rather
    /// than fail (`FetchEnd`). They then get the store's error, or their bytes once the store answers.
    #[tokio::test]
    async fn an_s3ec_fetch_the_store_did_not_answer_ends_done() {
        let kek = Key256::generate();
        let backend = store();
        let plain = data(3 << 20, 9);
        put_s3ec(&*backend, "big", WriteFormat::V3, &kek, &plain).await;
        // A cache of 1 MiB: after the pass, most chunks are fetched again when read.
        let ctx = context(backend.clone(), key_history(&[&kek]), 1 << 20, S3ecOptions::default());
        let r = reader(&ctx, "big", S3EC).await;
        assert!(r.read(0, 10).await.unwrap() == plain[..10], "the pass");
        backend.unanswered.store(true, Ordering::SeqCst);
        let free = |bytes| r.cache.memory().try_reserve(bytes);
        let Started::Fetch(fetch) = r.start_fetch(30..40, Keep::Memory, free, None) else { panic!("no fetch started") };
        assert!(matches!(fetch.await, FetchEnd::Done), "an S3EC fetch ended unanswered");
        let err = r.read(30 * CHUNK_PLAIN_LEN, 10).await.expect_err("a read while the store does not answer");
        assert!(format!("{err:?}").contains("TimedOut"), "{err:?}");
        backend.unanswered.store(false, Ordering::SeqCst);
        let at = 30 * CHUNK_PLAIN_LEN as usize;
        assert!(r.read(at as u64, 10).await.unwrap() == plain[at..at + 10], "a read once the store answers");
    }

    #[tokio::test]
    async fn tampered_objects_fail_and_nothing_is_returned() {
        let kek = Key256::generate();
        let backend = store();
        let keys = key_history(&[&kek]);
        let shared = context(backend.clone(), keys.clone(), 64 << 20, S3ecOptions::default());
        let ctx = || shared.clone();
        let plain = data(200_000, 1);
        for format in [WriteFormat::V2, WriteFormat::V3] {
            let (meta, body) = put_s3ec(&*backend, "a", format, &kek, &plain).await;
            let (other_meta, _) = put_s3ec(&*backend, "b", format, &kek, &data(200_000, 2)).await;
            let flipped = |at: usize| {
                let mut b = body.clone();
                b[at] ^= 1;
                b
            };
            // A ciphertext byte, the tag.
            for (what, bytes) in [("ciphertext", flipped(1234)), ("tag", flipped(body.len() - 1))] {
                put_raw(&*backend, "t", &meta, &bytes).await;
                let e = s3ec_error(read_all(&reader(&ctx(), "t", S3EC).await).await);
                assert!(matches!(e, S3ecReadError::Format(S3ecError::AuthenticationFailed)), "{format:?} {what}: {e}");
            }
            // Another object's envelope on this body.
            put_raw(&*backend, "t", &other_meta, &body).await;
            let e = s3ec_error(read_all(&reader(&ctx(), "t", S3EC).await).await);
            assert!(matches!(e, S3ecReadError::Format(S3ecError::AuthenticationFailed)), "{format:?} swapped: {e}");
            // Another key file.
            put_raw(&*backend, "t", &meta, &body).await;
            let other = context(backend.clone(), key_history(&[&Key256::generate()]), 1 << 20, S3ecOptions::default());
            let e = s3ec_error(read_all(&reader(&other, "t", S3EC).await).await);
            assert!(matches!(e, S3ecReadError::NoKeyUnwraps { keys: 1 }), "{format:?} wrong key: {e}");
        }
        // V3: another key commitment is refused before any decryption.
        let (mut meta, body) = put_s3ec(&*backend, "c", WriteFormat::V3, &kek, &plain).await;
        meta.insert("x-amz-d".into(), base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 28]));
        put_raw(&*backend, "c", &meta, &body).await;
        let e = s3ec_error(read_all(&reader(&ctx(), "c", S3EC).await).await);
        assert!(matches!(e, S3ecReadError::Format(S3ecError::CommitmentMismatch)), "{e}");
        // An empty object is still checked.
        let (meta, mut body) = put_s3ec(&*backend, "e", WriteFormat::V3, &kek, b"").await;
        body[3] ^= 1;
        put_raw(&*backend, "e", &meta, &body).await;
        let e = s3ec_error(read_all(&reader(&ctx(), "e", S3EC).await).await);
        assert!(matches!(e, S3ecReadError::Format(S3ecError::AuthenticationFailed)), "{e}");
        // A failed pass leaves no index and no page behind.
        assert_eq!(shared.s3ec.len(), 0);
        assert_eq!(shared.cache.stats().entries, 0);
    }

    #[tokio::test]
    async fn bytes_changed_after_the_pass_fail_their_chunk_digest() {
        let kek = Key256::generate();
        let backend = store();
        let plain = data(3 << 20, 5);
        put_s3ec(&*backend, "big", WriteFormat::V3, &kek, &plain).await;
        // No page cache: every read after the pass is a ranged GET checked against the index.
        let ctx = context(backend.clone(), key_history(&[&kek]), 0, S3ecOptions::default());
        let r = reader(&ctx, "big", S3EC).await;
        assert!(r.read(1 << 20, 4096).await.unwrap() == plain[1 << 20..(1 << 20) + 4096]);
        backend.corrupt.store(true, Ordering::SeqCst);
        match r.read(2 << 20, 4096).await {
            Err(Error::S3ec { source: S3ecReadError::Format(S3ecError::ChunkDigestMismatch { chunk }), key }) => {
                assert_eq!((chunk, key.as_str()), (32, "big"));
            }
            other => panic!("want a digest mismatch, got {:?}", other.map(|b| b.len())),
        }
    }

    #[tokio::test]
    async fn policy_refusals_and_instruction_files() {
        let kek = Key256::generate();
        let backend = store();
        let keys = key_history(&[&kek]);
        let plain = data(70_000, 9);
        put_s3ec(&*backend, "v2", WriteFormat::V2, &kek, &plain).await;
        put_s3ec(&*backend, "v3", WriteFormat::V3, &kek, &plain).await;
        let strict = context(backend.clone(), keys.clone(), 1 << 20, S3ecOptions { require_commitment: true, ..S3ecOptions::default() });
        let e = s3ec_error(read_all(&reader(&strict, "v2", S3EC).await).await);
        assert!(matches!(e, S3ecReadError::CommitmentRequired), "{e}");
        assert!(read_all(&reader(&strict, "v3", S3EC).await).await.unwrap() == plain);
        // A KMS-wrapped object in a mount without KMS says which mode reads it.
        let mut kms_meta = BTreeMap::new();
        kms_meta.insert("x-amz-c".to_string(), "115".to_string());
        let (meta, body) = put_s3ec(&*backend, "k", WriteFormat::V3, &kek, &plain).await;
        for (k, v) in &meta {
            kms_meta.insert(k.clone(), v.clone());
        }
        kms_meta.insert("x-amz-w".into(), "12".into());
        kms_meta.insert("x-amz-t".into(), r#"{"aws:x-amz-cek-alg":"115"}"#.into());
        put_raw(&*backend, "k", &kms_meta, &body).await;
        let ctx = context(backend.clone(), keys.clone(), 1 << 20, S3ecOptions::default());
        let e = s3ec_error(read_all(&reader(&ctx, "k", S3EC).await).await);
        assert!(matches!(e, S3ecReadError::NeedsKms), "{e}");
        // RSA without rsa_key_file= says which option reads it.
        let mut rsa = meta.clone();
        rsa.insert("x-amz-w".into(), "22".into());
        put_raw(&*backend, "r", &rsa, &body).await;
        let e = s3ec_error(read_all(&reader(&ctx, "r", S3EC).await).await);
        assert!(matches!(e, S3ecReadError::NeedsRsaKey), "{e}");
        assert!(e.to_string().contains("RSA-OAEP-SHA1") && e.to_string().contains("rsa_key_file="), "{e}");
        // A legacy RSA wrap is refused with the wrap named, key or no key.
        let mut legacy = meta.clone();
        legacy.remove("x-amz-w");
        legacy.remove("x-amz-3");
        legacy.remove("x-amz-c");
        legacy.remove("x-amz-d");
        legacy.remove("x-amz-i");
        legacy.extend([
            ("x-amz-key-v2".to_string(), "AQID".to_string()),
            ("x-amz-iv".to_string(), "AQEBAQEBAQEBAQEB".to_string()),
            ("x-amz-cek-alg".to_string(), "AES/GCM/NoPadding".to_string()),
            ("x-amz-tag-len".to_string(), "128".to_string()),
            ("x-amz-wrap-alg".to_string(), "RSA/ECB/OAEPWithSHA-256AndMGF1Padding".to_string()),
        ]);
        put_raw(&*backend, "legacy-rsa", &legacy, &body).await;
        let e = s3ec_error(read_all(&reader(&ctx, "legacy-rsa", S3EC).await).await);
        assert!(e.to_string().contains("RSA/ECB/OAEPWithSHA-256AndMGF1Padding"), "{e}");

        // Envelopes in instruction files: V3 (c/d/i on the object) and V2 (all of it in the file).
        for (format, key) in [(WriteFormat::V3, "i3"), (WriteFormat::V2, "i2")] {
            let new = new_object_aes(format, &kek, &BTreeMap::new()).unwrap();
            let body = new.sealer.encrypt(&plain).unwrap();
            let (object_meta, file) = new.envelope.to_instruction_file();
            put_raw(&*backend, key, &object_meta, &body).await;
            let instruction = format!("{key}{INSTRUCTION_SUFFIX}");
            let marker: BTreeMap<String, String> = [("x-amz-crypto-instr-file".to_string(), String::new())].into();
            let r = reader(&ctx, key, StoredFormat::S3ec { instruction_file: true }).await;
            // Missing at first.
            let e = s3ec_error(read_all(&r).await);
            assert!(matches!(&e, S3ecReadError::MissingInstructionFile { instruction: i } if *i == instruction), "{e}");
            put_raw(&*backend, &instruction, &marker, &file).await;
            assert!(read_all(&reader(&ctx, key, StoredFormat::S3ec { instruction_file: true }).await).await.unwrap() == plain);
            // The object's own metadata says how to tell it from an ordinary object.
            let (_, meta) = backend.head(&ObjectKey::new(key).unwrap()).await.unwrap();
            let (_, imeta) = backend.head(&ObjectKey::new(instruction.as_str()).unwrap()).await.unwrap();
            let expect = match format {
                WriteFormat::V3 => crate::object::FormatHint::Known(StoredFormat::S3ec { instruction_file: true }),
                WriteFormat::V2 => crate::object::FormatHint::AskInstructionFile,
            };
            assert_eq!(ctx.codec.format_hint(&meta), expect);
            assert_eq!(ctx.codec.format_hint(&imeta), crate::object::FormatHint::Known(StoredFormat::Own));
        }
    }

    #[test]
    fn a_pass_is_one_get_up_to_a_segment_then_whole_segments_in_order() {
        assert_eq!(pass_segments(16), vec![0..16]);
        assert_eq!(pass_segments(PASS_SEGMENT), vec![0..PASS_SEGMENT]);
        assert_eq!(pass_segments(PASS_SEGMENT + 1), vec![0..PASS_SEGMENT, PASS_SEGMENT..PASS_SEGMENT + 1]);
        let big = 5 * PASS_SEGMENT + 7;
        let segs = pass_segments(big);
        assert_eq!(segs.len(), 6);
        assert!(segs.windows(2).all(|w| w[0].end == w[1].start), "contiguous");
        assert_eq!((segs[0].start, segs[5].end), (0, big));
    }
}
