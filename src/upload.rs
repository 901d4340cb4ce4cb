//! The write path: encrypt a staged file and upload it as one object.
//!
//! Each upload creates a fresh per-object codec (for cse-c a new data key and file id, so no nonce or key is ever
//! reused across versions of a file; format version 3, whose new objects need no version map, so the file can later
//! be changed in place by `crate::inplace`), seals the staged plaintext chunk by chunk and sends it either as one PUT
//! (small objects) or as a multipart upload of `PART_SIZE` parts. The object's path binding is written into its
//! metadata with the rest of the POSIX attributes. Every upload is conditional on what it expects to replace
//! ([`Expect`]: nothing, or one version by ETag); the store refuses it with `Precondition` otherwise, and nothing
//! changes. Nothing here decides *when* to upload; the filesystem does that on close and fsync.

use bytes::Bytes;

use crate::cache::ObjectId;
use crate::crypto::s3ec::{self, ChunkDigests, ContentKey, DigestSpec, WriteFormat};
use crate::read::s3ec::S3ecReads;
use crate::crypto::CHUNK_PLAIN_LEN;
use crate::fs::error::{Error, Result};
use crate::object::{Codec, CodecError, MAP_META};
use crate::read::BIND_META;
use crate::journal::StagedFile;
use crate::store::{Backend, Expect, ObjectInfo, ObjectKey, UserMeta};

pub mod stream;

/// Where the plaintext of an upload comes from: a staged file, or bytes in memory.
pub trait Source: Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;

    /// The uploader has read everything before plaintext offset `plain` and will not come back for it unless the
    /// upload starts over: a source on disk may let the page cache write it back and drop it. By default nothing.
    fn read_below(&self, _plain: u64) {}
}

/// A staged file of `size` bytes.
pub struct StagedSource<'a> {
    pub file: &'a StagedFile,
    pub size: u64,
}

impl Source for StagedSource<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset, self.size)
    }

    fn read_below(&self, plain: u64) {
        self.file.uncache_below(plain);
    }
}

/// Bytes in memory (small objects such as symlink targets, which never touch the disk).
pub struct Memory<'a>(pub &'a [u8]);

impl Source for Memory<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let piece = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(piece);
        Ok(())
    }
}

/// Multipart part size. S3 needs at least 5 MiB per part except the last; 8 MiB parts keep a 1 GiB file at 128 parts
/// (of the 10,000 allowed, so files up to ~78 GiB) with modest memory per upload.
pub const PART_SIZE: usize = 8 << 20;

/// Parts sent at once per upload: four 8 MiB parts keep a fast link busy while bounding memory per upload to
/// about 40 MiB of ciphertext.
pub const PARTS_IN_FLIGHT: usize = 4;

/// The buffer of one part: the part and up to two chunks sealed past its end (cut off into the next part).
const PART_BUFFER: usize = PART_SIZE + CHUNK_PLAIN_LEN as usize * 2;

/// Encrypts `size` bytes of `src` and stores them at `path` (the key relative to the mount root, which the binding
/// names), provided the store holds what `expect` says. The format is the mount's: its own, or the S3 Encryption
/// Client's (`format=s3ec`, see [`upload_s3ec`]; the new object's verified index goes to `index` when given).
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    backend: &dyn Backend,
    codec: &Codec,
    path: &str,
    src: &dyn Source,
    size: u64,
    mut meta: UserMeta,
    expect: &Expect,
    index: Option<&S3ecReads>,
) -> Result<ObjectInfo> {
    if let Some(format) = codec.s3ec_write_format() {
        return upload_s3ec(backend, codec, format, path, src, size, meta, expect, index).await;
    }
    let _in_flight = crate::metrics::UploadInFlight::start();
    let key = ObjectKey::new(path).map_err(|e| Error::store(path, e))?;
    // Format version 3 in the client-side modes, so the file can later be changed in place (`crate::inplace`); a
    // new object has no version map (an old one's must not be carried over).
    let (oc, header) = codec.create_file().await.map_err(|e| Error::codec(path, e))?;
    meta.extra.remove(MAP_META);
    match oc.binding(path) {
        Some(b) => {
            meta.extra.insert(BIND_META.to_string(), b);
        }
        None => {
            meta.extra.remove(BIND_META);
        }
    }
    let chunks = codec.chunk_count(size);
    let total = codec.stored_size(size);
    let mut plain = vec![0u8; CHUNK_PLAIN_LEN as usize];
    let mut buf: Vec<u8> = Vec::with_capacity((total as usize).min(PART_SIZE + CHUNK_PLAIN_LEN as usize * 2));
    buf.extend_from_slice(&header);

    let read_chunk = |index: u64, plain: &mut Vec<u8>| -> Result<usize> {
        let start = index * CHUNK_PLAIN_LEN;
        let len = (size - start.min(size)).min(CHUNK_PLAIN_LEN) as usize;
        src.read_exact_at(&mut plain[..len], start).map_err(|e| Error::staging(path, e))?;
        Ok(len)
    };

    if total as usize <= PART_SIZE {
        // The sealed object, held until the store has it (src/memory).
        let _memory = crate::memory::process().reserve(total + CHUNK_PLAIN_LEN).await;
        for index in 0..chunks {
            let len = read_chunk(index, &mut plain)?;
            oc.seal(index, index + 1 == chunks, &plain[..len], &mut buf);
        }
        return backend.put_expect(&key, Bytes::from(buf), &meta, expect).await.map_err(|e| Error::store(path, e));
    }

    // Parts of exactly PART_SIZE stored bytes (the last one excepted), chunks cut across part boundaries: servers
    // that store in 8 MiB blocks (Garage) then need no extra block per part for the chunk overhead.
    let mut index = 0u64;
    let mut carry: Vec<u8> = Vec::with_capacity(CHUNK_PLAIN_LEN as usize * 2);
    send_multipart(backend, &key, path, &meta, expect, |part| {
        part.clear();
        if index == 0 {
            part.extend_from_slice(&header);
        }
        part.append(&mut carry);
        while index < chunks && part.len() < PART_SIZE {
            let len = read_chunk(index, &mut plain)?;
            oc.seal(index, index + 1 == chunks, &plain[..len], part);
            index += 1;
        }
        if part.len() > PART_SIZE {
            carry.extend_from_slice(&part[PART_SIZE..]);
            part.truncate(PART_SIZE);
        }
        Ok(index == chunks && carry.is_empty())
    })
    .await
}

/// [`upload`] in the format of the AWS S3 Encryption Client (`format=s3ec`, issue 12): the envelope (wrapped data key,
/// IV or message id, V3 commitment) goes into the object's metadata, and the whole file is one AES-256-GCM message,
/// `ciphertext ‖ tag`, with no path binding (docs/FORMAT.md). A file larger than one GCM message can hold is refused
/// with EFBIG before anything is sent. Large files are one message across the parts of a multipart upload: encrypted
/// in order, each part sent (in parallel with the next ones being encrypted) once it is sealed, the tag at the end of
/// the last part. The encryptor also records the chunk digests of the ciphertext it produces: once the store has the
/// object they become its verified index in `index`, so this mount reads it back without a verification pass.
#[allow(clippy::too_many_arguments)]
async fn upload_s3ec(
    backend: &dyn Backend,
    codec: &Codec,
    format: WriteFormat,
    path: &str,
    src: &dyn Source,
    size: u64,
    mut meta: UserMeta,
    expect: &Expect,
    index: Option<&S3ecReads>,
) -> Result<ObjectInfo> {
    if size > s3ec::MAX_PLAINTEXT_LEN {
        return Err(Error::TooLarge { key: path.to_string(), size, max: s3ec::MAX_PLAINTEXT_LEN });
    }
    let _in_flight = crate::metrics::UploadInFlight::start();
    let key = ObjectKey::new(path).map_err(|e| Error::store(path, e))?;
    let new = codec.create_s3ec(format).await.map_err(|e| Error::codec(path, e))?;
    meta.extra.remove(BIND_META);
    meta.extra.remove(MAP_META);
    meta.extra.extend(new.envelope.to_metadata());
    let content = new.sealer.decrypting_key();
    let mut encryptor = new.sealer.encryptor().with_digests(DigestSpec::default());
    let s3ec_err = |e| Error::codec(path, CodecError::S3ec(e));
    let total = size + s3ec::TAG_LEN as u64;

    if total as usize <= PART_SIZE {
        // The plaintext and the sealed body, held until the store has it (src/memory).
        let _memory = crate::memory::process().reserve(size + total).await;
        let mut plain = vec![0u8; size as usize];
        src.read_exact_at(&mut plain, 0).map_err(|e| Error::staging(path, e))?;
        let mut body = Vec::with_capacity(total as usize);
        encryptor.update(&plain, &mut body).map_err(s3ec_err)?;
        let digests = encryptor.finish(&mut body);
        let info =
            backend.put_expect(&key, Bytes::from(body), &meta, expect).await.map_err(|e| Error::store(path, e))?;
        return Ok(remember_written(index, path, info, content, digests));
    }

    // Read and sealed 64 KiB at a time into the part (whose buffer send_multipart reserves): no buffer of this upload
    // outlives a part, so no upload holds memory while it waits for more.
    let mut plain = vec![0u8; CHUNK_PLAIN_LEN as usize];
    let mut offset = 0u64;
    let mut encryptor = Some(encryptor);
    let mut digests = None;
    let info = send_multipart(backend, &key, path, &meta, expect, |part| {
        part.clear();
        let part_end = offset + (size - offset).min(PART_SIZE as u64);
        let enc = encryptor.as_mut().expect("no part after the last");
        while offset < part_end {
            let len = (part_end - offset).min(CHUNK_PLAIN_LEN) as usize;
            src.read_exact_at(&mut plain[..len], offset).map_err(|e| Error::staging(path, e))?;
            enc.update(&plain[..len], part).map_err(s3ec_err)?;
            offset += len as u64;
        }
        if offset < size {
            return Ok(false);
        }
        digests = encryptor.take().expect("the last part once").finish(part);
        Ok(true)
    })
    .await?;
    Ok(remember_written(index, path, info, content, digests))
}

/// Gives `index` the verified index of the S3EC object version just stored (when the store named it by an ETag).
fn remember_written(
    index: Option<&S3ecReads>,
    path: &str,
    info: ObjectInfo,
    content: ContentKey,
    digests: Option<ChunkDigests>,
) -> ObjectInfo {
    if let (Some(index), Some(etag), Some(digests)) = (index, &info.etag, digests) {
        index.insert_written(ObjectId { key: path.to_string(), etag: etag.clone() }, content, digests);
    }
    info
}

/// A multipart upload of the parts `next_part` fills in order (into the buffer it is given, emptied first; it says
/// whether that was the last part). Each part is sent as soon as it is filled, while the next one is being filled; at
/// most [`PARTS_IN_FLIGHT`] at once. On any error the upload is aborted, so no part of it becomes visible.
async fn send_multipart(
    backend: &dyn Backend,
    key: &ObjectKey,
    path: &str,
    meta: &UserMeta,
    expect: &Expect,
    mut next_part: impl FnMut(&mut Vec<u8>) -> Result<bool>,
) -> Result<ObjectInfo> {
    use futures::StreamExt;
    let mut upload = backend.put_multipart_expect(key, meta, expect).await.map_err(|e| Error::store(path, e))?;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let result: Result<()> = async {
        loop {
            // Each part's buffer is reserved from the memory budget until the store has the part; waiting here
            // (while the parts in flight finish) is what bounds the memory of many uploads at once.
            let memory = crate::memory::process().reserve(PART_BUFFER as u64).await;
            let mut part = Vec::with_capacity(PART_BUFFER);
            let last = next_part(&mut part)?;
            // Spawned, so the part travels while the next one is being sealed.
            let send = upload.put_part(Bytes::from(part));
            in_flight.push(tokio::spawn(async move {
                let sent = send.await;
                drop(memory);
                sent
            }));
            // Bounded: at most PARTS_IN_FLIGHT parts (and so that many part buffers) at once.
            while in_flight.len() >= PARTS_IN_FLIGHT || (last && !in_flight.is_empty()) {
                if let Some(r) = in_flight.next().await {
                    part_result(path, r)?;
                }
            }
            if last {
                return Ok(());
            }
        }
    }
    .await;
    // On error, parts still in flight are abandoned (their tasks finish on their own); abort discards them.
    drop(in_flight);
    match result {
        Ok(()) => upload.complete().await.map_err(|e| Error::store(path, e)),
        Err(e) => {
            if let Err(abort) = upload.abort().await {
                tracing::warn!(key = path, error = %abort, "could not abort a failed multipart upload");
            }
            Err(e)
        }
    }
}

fn part_result(
    path: &str,
    r: std::result::Result<std::result::Result<(), crate::store::StoreError>, tokio::task::JoinError>,
) -> Result<()> {
    match r {
        Ok(r) => r.map_err(|e| Error::store(path, e)),
        Err(join) => Err(Error::staging(path, std::io::Error::other(format!("part upload task failed: {join}")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AeadBackend, Key256, KeyHistory};
    use crate::store::{Listing, ObjectStoreBackend, StoreError, Upload};
    use async_trait::async_trait;
    use std::sync::{Arc, Mutex};

    /// An in-memory store that records the size of every multipart part it is sent; with `hold_first`, the first
    /// part of each upload is answered only once that is notified (a part that lags behind the ones after it).
    pub(crate) struct Recording {
        pub(crate) inner: ObjectStoreBackend,
        pub(crate) parts: Arc<Mutex<Vec<usize>>>,
        pub(crate) hold_first: Option<Arc<tokio::sync::Notify>>,
    }

    struct RecordingUpload {
        inner: Box<dyn Upload>,
        parts: Arc<Mutex<Vec<usize>>>,
        hold_first: Option<Arc<tokio::sync::Notify>>,
    }

    #[async_trait]
    impl Upload for RecordingUpload {
        fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
            let first = {
                let mut parts = self.parts.lock().unwrap();
                parts.push(part.len());
                parts.len() == 1
            };
            let sent = self.inner.put_part(part);
            match self.hold_first.clone().filter(|_| first) {
                Some(gate) => Box::pin(async move {
                    gate.notified().await;
                    sent.await
                }),
                None => sent,
            }
        }
        async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError> {
            self.inner.complete().await
        }
        async fn abort(self: Box<Self>) -> Result<(), StoreError> {
            self.inner.abort().await
        }
    }

    #[async_trait]
    impl Backend for Recording {
        fn copies_parts(&self) -> bool {
            self.inner.copies_parts()
        }

        async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
            self.inner.head(key).await
        }
        async fn get_range(
            &self,
            key: &ObjectKey,
            range: std::ops::Range<u64>,
        ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            self.inner.get_range(key, range).await
        }
        async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            self.inner.get(key).await
        }
        async fn put_expect(
            &self,
            key: &ObjectKey,
            body: Bytes,
            meta: &UserMeta,
            expect: &Expect,
        ) -> Result<ObjectInfo, StoreError> {
            self.inner.put_expect(key, body, meta, expect).await
        }
        async fn put_multipart_expect(
            &self,
            key: &ObjectKey,
            meta: &UserMeta,
            expect: &Expect,
        ) -> Result<Box<dyn Upload>, StoreError> {
            let inner = self.inner.put_multipart_expect(key, meta, expect).await?;
            Ok(Box::new(RecordingUpload {
                inner,
                parts: Arc::clone(&self.parts),
                hold_first: self.hold_first.clone(),
            }))
        }
        async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
            self.inner.copy(from, to, meta).await
        }
        async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
            self.inner.update_meta(key, meta).await
        }
        async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
            self.inner.list(dir, recursive).await
        }
        async fn check_access(&self) -> Result<(), StoreError> {
            self.inner.check_access().await
        }
    }

    /// Multipart parts of the own format are exactly PART_SIZE stored bytes but the last, whatever the chunk
    /// overhead, and the object they make decrypts to the file (chunks cut across part boundaries rejoin).
    #[tokio::test]
    async fn own_format_parts_are_exact_multiples_of_the_part_size() {
        let inner = ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap();
        let backend = Recording { inner, parts: Arc::default(), hold_first: None };
        let keys = Arc::new(KeyHistory::single(Key256::generate()));
        let codec = Codec::Cse {
            keys: Some(keys),
            kms: None,
            aead: AeadBackend::default(),
            format: crate::config::FileFormat::Own,
        };
        let size = 3 * PART_SIZE as u64 + 12_345;
        let plain: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let meta = UserMeta::default();
        let info = upload(&backend, &codec, "f", &Memory(&plain), size, meta, &Expect::Any, None).await.unwrap();
        let parts = backend.parts.lock().unwrap().clone();
        let stored = codec.stored_size(size);
        assert_eq!(info.size, stored);
        assert_eq!(parts.iter().map(|&p| p as u64).sum::<u64>(), stored, "{parts:?}");
        let (last, whole) = parts.split_last().unwrap();
        assert!(whole.iter().all(|&p| p == PART_SIZE), "{parts:?}");
        assert!(*last <= PART_SIZE && *last > 0, "{parts:?}");

        let (body, _, meta) = backend.get(&ObjectKey::new("f").unwrap()).await.unwrap();
        let header_len = codec.header_len() as usize;
        let mut oc = codec.open(&body[..header_len]).await.unwrap();
        // Format version 2: the chunks open only with the version map the upload stored beside them.
        oc.attach_map(&meta, size).unwrap();
        let mut got = Vec::with_capacity(plain.len());
        let chunks = codec.chunk_count(size);
        for index in 0..chunks {
            let range = codec.chunk_range(index, size);
            oc.open(index, index + 1 == chunks, &body[range.start as usize..range.end as usize], &mut got).unwrap();
        }
        assert!(got == plain, "the parts rejoin to the file");
    }
}
