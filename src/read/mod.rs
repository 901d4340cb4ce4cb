//! The read path: page cache lookup, ranged GETs, read-ahead, authentication, cache fill.
//!
//! A [`Reader`] serves one open version of one object. A read is split into chunks (`object::Codec::chunk_range`);
//! chunks found in the [`PageCache`] are used as they are, missing runs of chunks are fetched with one ranged GET
//! each, opened (authenticated and decrypted) and put in the cache. The header is fetched with the first run when
//! that run starts at chunk 0 (the usual case) and on its own otherwise, and its path binding is checked before any
//! byte is returned, so a swapped object fails before it is read.
//!
//! Read-ahead: a reader whose reads follow each other doubles its window (from 256 KiB up to `max_readahead`, and
//! never beyond a quarter of the page cache, where prefetched pages wait to be read) and fetches the chunks ahead in
//! the background, in segments of a quarter of that (1 to 8 MiB) so that several GETs run at once. Chunks being
//! fetched are registered as in flight, and a read that needs one waits for that fetch instead of asking again.
//!
//! Any authentication failure is returned as an error naming the object and chunk; no byte of a chunk that failed
//! is ever returned or cached.
//!
//! Objects of the AWS S3 Encryption Client ([`StoredFormat::S3ec`]) use the same pages, cache, read-ahead and
//! in-flight registry, but their pages come from [`s3ec`]: authenticated by a pass over the whole object first.

pub mod s3ec;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::OnceCell;

use crate::cache::{ObjectId, PageCache};
use crate::crypto::CHUNK_PLAIN_LEN;
use crate::fs::error::{Error, Result};
use crate::object::{Codec, ObjectCodec, StoredFormat};
use crate::store::{Backend, ObjectKey, UserMeta};

use self::s3ec::{S3ecReads, Verified};

pub use crate::object::BIND_META;

/// Chunks per background GET, at most: 8 MiB, a size at which S3 throughput per request is at its best (the raw
/// client's default part size too).
const MAX_SEGMENT_CHUNKS: u64 = 128;
/// ... and at least: 1 MiB, below which requests cost more than they carry.
const MIN_SEGMENT_CHUNKS: u64 = 16;
/// A reader's window is at most this share of the page cache: prefetched pages wait in the cache until they are
/// read, and a window as large as the cache evicted its own pages before the reader got to them (with
/// `cache_size=32M` a 1 GiB read fetched every byte twice, in 3,932 GETs).
const WINDOW_SHARE_OF_CACHE: u64 = 4;
/// The window a sequential reader starts with.
const INITIAL_WINDOW: u64 = 256 << 10;

struct ReadState {
    next_offset: u64,
    window: u64,
    prefetched_until: u64,
}

/// What every reader of a mount shares.
#[derive(Clone)]
pub struct ReadContext {
    pub backend: Arc<dyn Backend>,
    pub codec: Codec,
    pub cache: Arc<PageCache>,
    pub s3ec: Arc<S3ecReads>,
}

pub struct Reader {
    backend: Arc<dyn Backend>,
    codec: Codec,
    cache: Arc<PageCache>,
    s3ec: Arc<S3ecReads>,
    format: StoredFormat,
    key: Mutex<String>,
    etag: String,
    plain_size: u64,
    stored_size: u64,
    max_readahead: u64,
    object: OnceCell<Arc<ObjectCodec>>,
    /// S3EC objects: the verified index, once a pass (this reader's or another's) made it.
    verified: OnceCell<Arc<Verified>>,
    /// Set once the object was renamed under this reader (see `set_key`).
    moved: std::sync::atomic::AtomicBool,
    state: Mutex<ReadState>,
    inflight: Mutex<HashMap<u64, Shared<BoxFuture<'static, ()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reader {
    /// A reader of the version `etag` (`stored_size` bytes, in `format`) of the object at `key`.
    pub fn new(
        context: &ReadContext,
        key: String,
        etag: String,
        stored_size: u64,
        format: StoredFormat,
        max_readahead: u64,
    ) -> Result<Arc<Reader>> {
        // The window the budget leaves (see WINDOW_SHARE_OF_CACHE); at least one page.
        let max_readahead = max_readahead.min(context.cache.budget() / WINDOW_SHARE_OF_CACHE).max(CHUNK_PLAIN_LEN);
        let plain_size = match format {
            StoredFormat::Own => context.codec.plain_size(stored_size),
            StoredFormat::S3ec { .. } => crate::crypto::s3ec::plain_size(stored_size).ok(),
        }
        .ok_or_else(|| Error::NotOurFormat { key: key.clone(), size: stored_size })?;
        Ok(Arc::new(Reader {
            backend: context.backend.clone(),
            codec: context.codec.clone(),
            cache: context.cache.clone(),
            s3ec: context.s3ec.clone(),
            format,
            key: Mutex::new(key),
            etag,
            plain_size,
            stored_size,
            max_readahead,
            object: OnceCell::new(),
            verified: OnceCell::new(),
            moved: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(ReadState { next_offset: 0, window: INITIAL_WINDOW, prefetched_until: 0 }),
            inflight: Mutex::new(HashMap::new()),
        }))
    }

    pub fn plain_size(&self) -> u64 {
        self.plain_size
    }

    pub fn stored_size(&self) -> u64 {
        self.stored_size
    }

    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// The object moved (rename): later fetches use the new key and check the binding against it. The copy may
    /// carry a new ETag (S3 gives a re-uploaded multipart object a different one), so from now on only the size is
    /// compared; the content is still authenticated chunk by chunk in cse-c mode.
    pub fn set_key(&self, key: String) {
        *lock(&self.key) = key;
        self.moved.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Refuses bytes from another version of the object than the one opened: a reader must never mix versions or
    /// serve a newer version cut to the old length.
    fn check_version(&self, key: &str, info: &crate::store::ObjectInfo) -> Result<()> {
        let etag_changed = !self.moved.load(std::sync::atomic::Ordering::Relaxed)
            && !self.etag.is_empty()
            && info.etag.as_deref().is_some_and(|e| e != self.etag);
        if info.size != self.stored_size || etag_changed {
            return Err(Error::Changed { key: key.to_string() });
        }
        Ok(())
    }

    fn key(&self) -> String {
        lock(&self.key).clone()
    }

    fn object_id(&self) -> ObjectId {
        ObjectId { key: self.key(), etag: self.etag.clone() }
    }

    fn is_last(&self, index: u64) -> bool {
        index + 1 == self.codec.chunk_count(self.plain_size)
    }

    /// Chunks per read-ahead GET: a quarter of the largest window, so that four or more GETs are in flight at once,
    /// within [MIN_SEGMENT_CHUNKS, MAX_SEGMENT_CHUNKS] (8 MiB GETs, eight in flight, with the default 64 MiB window).
    fn segment_chunks(&self) -> u64 {
        (self.max_readahead / CHUNK_PLAIN_LEN / 4).clamp(MIN_SEGMENT_CHUNKS, MAX_SEGMENT_CHUNKS)
    }

    /// Pages of the file: chunks of the own format, 64 KiB slices of an S3EC object.
    fn page_count(&self) -> u64 {
        match self.format {
            StoredFormat::Own => self.codec.chunk_count(self.plain_size),
            StoredFormat::S3ec { .. } => self.plain_size.div_ceil(CHUNK_PLAIN_LEN),
        }
    }

    /// Reads up to `len` bytes at `offset`.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>> {
        tracing::trace!(offset, len, "read");
        // An empty S3EC object is still a tag to check: no "empty" answer for one that was tampered with.
        self.check_at_open().await?;
        if offset >= self.plain_size || len == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + len as u64).min(self.plain_size);
        let first = offset / CHUNK_PLAIN_LEN;
        let last = (end - 1) / CHUNK_PLAIN_LEN; // inclusive
        let chunk_total = self.page_count();

        let prefetch = {
            let mut st = lock(&self.state);
            // The kernel issues read-ahead requests concurrently, so a sequential reader's requests arrive slightly
            // out of order: count a read as sequential when it lands within the current window of where the last
            // one ended, not only exactly there.
            let slack = st.window.max(1 << 20);
            let sequential = offset <= st.next_offset.saturating_add(slack) && offset.saturating_add(slack) >= st.next_offset;
            if sequential {
                st.window = (st.window * 2).min(self.max_readahead.max(CHUNK_PLAIN_LEN));
                st.next_offset = st.next_offset.max(end);
            } else {
                st.window = INITIAL_WINDOW.min(self.max_readahead.max(CHUNK_PLAIN_LEN));
                st.prefetched_until = 0;
                st.next_offset = end;
            }
            if sequential && self.max_readahead > 0 {
                let ahead_end = (last + 1 + st.window / CHUNK_PLAIN_LEN).min(chunk_total);
                let from = st.prefetched_until.max(last + 1);
                // Top the window up a whole segment at a time: topping it up by the size of every read would turn
                // into one small GET per read.
                if from < ahead_end && (ahead_end - from >= self.segment_chunks() || ahead_end == chunk_total) {
                    st.prefetched_until = ahead_end;
                    Some(from..ahead_end)
                } else {
                    None
                }
            } else {
                None
            }
        };

        // Start the read-ahead before waiting for this read's own chunks, so both are in flight together.
        if let Some(range) = prefetch {
            self.spawn_prefetch(range);
        }
        let pages = self.pages(first..last + 1).await?;

        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, page) in pages.iter().enumerate() {
            let index = first + i as u64;
            let page_start = index * CHUNK_PLAIN_LEN;
            let from = offset.saturating_sub(page_start) as usize;
            let to = ((end - page_start) as usize).min(page.len());
            if from < to {
                out.extend_from_slice(&page[from..to]);
            }
        }
        Ok(out)
    }

    /// The plaintext of chunks `range`, from the cache, from fetches in flight, or fetched now.
    async fn pages(self: &Arc<Self>, range: Range<u64>) -> Result<Vec<Bytes>> {
        let id = self.object_id();
        let mut pages: Vec<Option<Bytes>> = Vec::with_capacity((range.end - range.start) as usize);
        let mut waits = Vec::new();
        let mut hits = 0;
        for index in range.clone() {
            match self.cache.get(&id, index) {
                Some(p) => {
                    hits += 1;
                    pages.push(Some(p));
                }
                None => {
                    pages.push(None);
                    if let Some(f) = lock(&self.inflight).get(&index).cloned() {
                        waits.push(f);
                    }
                }
            }
        }
        // Counted here, once per page a read asks for, rather than in the cache: the second look below would count
        // every miss twice.
        crate::metrics::cache_lookups(hits, pages.len() as u64 - hits);
        for w in waits {
            w.await;
        }
        // Collect what is still missing (a fetch in flight may have failed, or the cache evicted its pages) and fetch
        // it in contiguous runs.
        let mut missing_runs: Vec<Range<u64>> = Vec::new();
        for (i, slot) in pages.iter_mut().enumerate() {
            let index = range.start + i as u64;
            if slot.is_none() {
                *slot = self.cache.get(&id, index);
            }
            if slot.is_none() {
                match missing_runs.last_mut() {
                    Some(run) if run.end == index => run.end += 1,
                    _ => missing_runs.push(index..index + 1),
                }
            }
        }
        for run in missing_runs {
            let fetched = self.fetch(run.clone()).await?;
            for (j, page) in fetched.into_iter().enumerate() {
                pages[(run.start - range.start) as usize + j] = Some(page);
            }
        }
        Ok(pages.into_iter().map(|p| p.unwrap_or_default()).collect())
    }

    fn spawn_prefetch(self: &Arc<Self>, range: Range<u64>) {
        let id = self.object_id();
        let mut start = range.start;
        while start < range.end {
            let end = (start + self.segment_chunks()).min(range.end);
            // Skip the leading chunks already cached or in flight.
            let seg: Vec<u64> = (start..end)
                .filter(|i| !self.cache.contains(&id, *i) && !lock(&self.inflight).contains_key(i))
                .collect();
            if let (Some(&a), Some(&b)) = (seg.first(), seg.last()) {
                let this = Arc::clone(self);
                let run = a..b + 1;
                let fut: Shared<BoxFuture<'static, ()>> = async move {
                    if let Err(e) = this.fetch(run.clone()).await {
                        tracing::debug!(error = %e, "read-ahead failed; the read that needs these chunks will retry");
                    }
                    let mut inflight = lock(&this.inflight);
                    for i in run {
                        inflight.remove(&i);
                    }
                }
                .boxed()
                .shared();
                {
                    let mut inflight = lock(&self.inflight);
                    for i in a..b + 1 {
                        inflight.insert(i, fut.clone());
                    }
                }
                tokio::spawn(fut);
            }
            start = end;
        }
    }

    /// The per-object codec, reading and checking the header if this is the first need of it.
    async fn object_codec(&self, prefetched: Option<(&[u8], &UserMeta)>) -> Result<Arc<ObjectCodec>> {
        let key = self.key();
        self.object
            .get_or_try_init(|| async {
                let header_len = self.codec.header_len();
                let owned;
                let (header, meta): (&[u8], &UserMeta) = match prefetched {
                    Some(p) => p,
                    None if header_len == 0 => {
                        owned = (Bytes::new(), UserMeta::default());
                        (&owned.0[..], &owned.1)
                    }
                    None => {
                        let (bytes, info, meta) = self
                            .backend
                            .get_range(&ObjectKey::new(key.as_str()).map_err(|e| Error::store(&key, e))?, 0..header_len)
                            .await
                            .map_err(|e| Error::store(&key, e))?;
                        self.check_version(&key, &info)?;
                        owned = (bytes, meta);
                        (&owned.0[..], &owned.1)
                    }
                };
                let oc = self.codec.open(header).await.map_err(|e| Error::codec(&key, e))?;
                oc.verify_binding(&key, meta.extra.get(BIND_META).map(String::as_str))
                    .map_err(|e| Error::crypto(&key, e))?;
                Ok(Arc::new(oc))
            })
            .await
            .cloned()
    }

    /// Fetches chunks `run` with one ranged GET, opens them and fills the cache.
    async fn fetch(&self, run: Range<u64>) -> Result<Vec<Bytes>> {
        if self.format.is_s3ec() {
            return self.s3ec_fetch(run).await;
        }
        let key = self.key();
        let first = self.codec.chunk_range(run.start, self.plain_size);
        let last = self.codec.chunk_range(run.end - 1, self.plain_size);
        let with_header = run.start == 0 && self.object.get().is_none() && self.codec.header_len() > 0;
        let start = if with_header { 0 } else { first.start };
        let t0 = std::time::Instant::now();
        let (bytes, _info, meta) = self
            .backend
            .get_range(&ObjectKey::new(key.as_str()).map_err(|e| Error::store(&key, e))?, start..last.end)
            .await
            .map_err(|e| Error::store(&key, e))?;
        tracing::trace!(key = %key, chunks = ?run, bytes = bytes.len(), ms = t0.elapsed().as_millis() as u64, "fetched");
        self.check_version(&key, &_info)?;
        if (bytes.len() as u64) < last.end - start {
            // The object is shorter than its listed size: it was truncated or replaced since we looked.
            return Err(Error::crypto(&key, crate::crypto::CryptoError::Format(crate::crypto::FormatError::TooShort { len: bytes.len() as u64, min: last.end - start })));
        }
        let oc = if with_header {
            let hl = self.codec.header_len() as usize;
            self.object_codec(Some((&bytes[..hl], &meta))).await?
        } else {
            self.object_codec(None).await?
        };
        let id = ObjectId { key: key.clone(), etag: self.etag.clone() };
        let mut pages = Vec::with_capacity((run.end - run.start) as usize);
        for index in run {
            let r = self.codec.chunk_range(index, self.plain_size);
            let stored = &bytes[(r.start - start) as usize..(r.end - start) as usize];
            let mut plain = Vec::with_capacity(CHUNK_PLAIN_LEN as usize);
            if let Err(e) = oc.open(index, self.is_last(index), stored, &mut plain) {
                return Err(Error::crypto(&key, e));
            }
            let page = Bytes::from(plain);
            self.cache.put(&id, index, page.clone());
            pages.push(page);
        }
        Ok(pages)
    }
}
