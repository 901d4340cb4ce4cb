//! The write path: encrypt a staged file and upload it as one object.
//!
//! Each upload creates a fresh per-object codec (for cse-c a new data key and file id, so no nonce or key is ever
//! reused across versions of a file), seals the staged plaintext chunk by chunk and sends it either as one PUT
//! (small objects) or as a multipart upload of `PART_SIZE` parts. The object's path binding is written into its
//! metadata with the rest of the POSIX attributes. Every upload is conditional on what it expects to replace
//! ([`Expect`]: nothing, or one version by ETag); the store refuses it with `Precondition` otherwise, and nothing
//! changes. Nothing here decides *when* to upload; the filesystem does that on close and fsync.

use bytes::Bytes;

use crate::crypto::CHUNK_PLAIN_LEN;
use crate::fs::error::{Error, Result};
use crate::object::Codec;
use crate::read::BIND_META;
use crate::journal::StagedFile;
use crate::store::{Backend, Expect, ObjectInfo, ObjectKey, UserMeta};

/// Where the plaintext of an upload comes from: a staged file, or bytes in memory.
pub trait Source: Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
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

/// Encrypts `size` bytes of `src` and stores them at `path` (the key relative to the mount root, which the binding
/// names), provided the store holds what `expect` says.
pub async fn upload(
    backend: &dyn Backend,
    codec: &Codec,
    path: &str,
    src: &dyn Source,
    size: u64,
    mut meta: UserMeta,
    expect: &Expect,
) -> Result<ObjectInfo> {
    let _in_flight = crate::metrics::UploadInFlight::start();
    let key = ObjectKey::new(path).map_err(|e| Error::store(path, e))?;
    let (oc, header) = codec.create().await.map_err(|e| Error::codec(path, e))?;
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
        for index in 0..chunks {
            let len = read_chunk(index, &mut plain)?;
            oc.seal(index, index + 1 == chunks, &plain[..len], &mut buf);
        }
        return backend.put_expect(&key, Bytes::from(buf), &meta, expect).await.map_err(|e| Error::store(path, e));
    }

    let mut upload = backend.put_multipart_expect(&key, &meta, expect).await.map_err(|e| Error::store(path, e))?;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let result: Result<()> = async {
        use futures::StreamExt;
        for index in 0..chunks {
            let len = read_chunk(index, &mut plain)?;
            oc.seal(index, index + 1 == chunks, &plain[..len], &mut buf);
            if buf.len() >= PART_SIZE {
                let part = std::mem::replace(&mut buf, Vec::with_capacity(PART_SIZE + CHUNK_PLAIN_LEN as usize * 2));
                // Spawned, so the part travels while the next one is being sealed.
                in_flight.push(tokio::spawn(upload.put_part(Bytes::from(part))));
                // Bounded: at most PARTS_IN_FLIGHT parts (and so that many part buffers) at once.
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    if let Some(r) = in_flight.next().await {
                        part_result(path, r)?;
                    }
                }
            }
        }
        if !buf.is_empty() {
            in_flight.push(tokio::spawn(upload.put_part(Bytes::from(std::mem::take(&mut buf)))));
        }
        while let Some(r) = in_flight.next().await {
            part_result(path, r)?;
        }
        Ok(())
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
