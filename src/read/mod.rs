//! The read path: page cache lookup, ranged GETs, read-ahead, authentication, cache fill.
//!
//! A [`Reader`] serves one open version of one object. A read is split into chunks (`object::Codec::chunk_range`);
//! chunks found in the [`PageCache`] are used as they are, missing runs of chunks are fetched with one ranged GET
//! each, opened (authenticated and decrypted) and put in the cache. The header is fetched with the first run when
//! that run starts at chunk 0 (the usual case) and on its own otherwise, and its path binding is checked before any
//! byte is returned, so a swapped object fails before it is read.
//!
//! Read-ahead: a reader whose reads follow each other doubles its window (from 256 KiB up to `max_readahead`, and
//! never beyond a quarter of what the page cache may hold right now, where prefetched pages wait to be read: so the
//! window never outgrows the cache and evicts its own pages) and fetches the chunks ahead in the background, in
//! segments of a quarter of that (1 to 8 MiB) so that several GETs run at once. Chunks being fetched are registered as
//! in flight in [`Fetches`], shared by every reader of the mount, and a read that needs one — through this handle or
//! another — waits for that fetch instead of asking again, until the fetch has kept that chunk ([`Progress`]; for
//! an S3EC object, whose pages come from a pass over the whole object, until the fetch ends). No lock is held
//! across a fetch: concurrent reads of one file, on one handle or many, reach the store together.
//!
//! Whole-object prefetch: an object read at random — reads that do not follow each other, over every handle of the
//! mount, one per [`WHOLE_OBJECT_BYTES_PER_SEEK`] of the object and at least [`SEEKS_FOR_RANDOM`] — is fetched whole
//! in the background, in read-ahead segments, as many at a time as a quarter of the memory budget holds (at most
//! [`WHOLE_OBJECT_IN_FLIGHT`]), and later reads are served locally: a random reader pays a few large GETs instead of
//! one small GET per read. A read meanwhile of a chunk the fetch has not got to starts the fetch's segment at that
//! chunk ([`Reader::start_segments_at_misses`]) rather than a GET of the chunk alone. Where it goes:
//! - into the page cache, when the object is small next to it (at most a quarter of what it may hold, and never more
//!   than [`WHOLE_OBJECT_MAX`]);
//! - else, with a disk cache (`-o cache_dir`, or else the mount's scratch), into the disk cache only (at most a
//!   quarter of its limit, and never more than [`WHOLE_OBJECT_MAX_ON_DISK`]): it is sealed there like any page, and
//!   the page cache keeps only what is read (it gives up only the room of the segments in flight meanwhile: one
//!   batch of pages each, see [`Reader::fetch_to_disk`]);
//! - else nowhere: a larger object read randomly costs one GET of the chunks each read needs, never more.
//!
//! The trigger grows with the object, so the bytes fetched stay in proportion to the reads made: at most
//! [`WHOLE_OBJECT_BYTES_PER_SEEK`] per random read that came before (a few reads of a large file fetch only what they
//! read). s3fs downloads a file whole on its first read, whatever its size. The fetch stops at its first segment that
//! fails or that the disk cache does not keep (a store that is down is not sent the rest, each waiting for its
//! deadline), when the handle that started it closes, and when the object is renamed; the count then starts over.
//! An object found whole in the disk cache at the end is not fetched whole again until a read misses there.
//!
//! Memory: every fetch reserves its buffers (the GET body and the pages decrypted from it; for a fetch into the disk
//! cache, one batch of pages, see [`Reader::fetch_to_disk`]) from the mount's
//! [`MemoryBudget`](crate::memory::MemoryBudget) before it is sent. A read's own fetch waits for room; read-ahead and
//! whole-object prefetch only take what is free, and stop where the budget ends (the reads then fetch what they need).
//!
//! A read that waited (nearly) a whole `timeout=` on a fetch in flight whose GET the store never answered (a frozen
//! or dead store, a hung connection) fails with that fetch's error; any other read whose fetch failed sends a GET of
//! its own ([`FetchEnd`]).
//!
//! Any authentication failure is returned as an error naming the object and chunk; no byte of a chunk that failed
//! is ever returned or cached.
//!
//! Objects of the AWS S3 Encryption Client ([`StoredFormat::S3ec`]) use the same pages, cache, read-ahead and
//! in-flight registry, but their pages come from [`s3ec`]: authenticated by a pass over the whole object first.

pub mod s3ec;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::OnceCell;

use crate::cache::page::PageBuf;
use crate::cache::disk::DiskCache;
use crate::cache::{ObjectId, PageCache};
use crate::crypto::diskcache::EntryId;
use crate::crypto::CHUNK_PLAIN_LEN;
use crate::fs::error::{Error, Result};
use crate::memory::Reservation;
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
/// The largest object fetched whole for a random reader, whatever the budget: 256 MiB takes about a second on a
/// fast link, and a random reader of anything larger is better served by the GETs its reads need.
pub const WHOLE_OBJECT_MAX: u64 = 256 << 20;
/// ... and its share of what the page cache may hold: a whole object may not push everything else out.
const WHOLE_OBJECT_SHARE_OF_CACHE: u64 = 4;
/// Seeks (reads not following the one before) after which a reader counts as random: one seek is often a single
/// look elsewhere (a trailer, an index), not a pattern.
const SEEKS_FOR_RANDOM: u32 = 2;
/// The largest object fetched whole into the disk cache for a random reader (when the mount has one): 4 GiB takes
/// about 15 s on a fast link, and the trigger asks 512 random reads of it first.
pub const WHOLE_OBJECT_MAX_ON_DISK: u64 = 4 << 30;
/// ... and its share of the disk cache's limit.
const WHOLE_OBJECT_SHARE_OF_DISK: u64 = 4;
/// An object is fetched whole once it was read at random once per this many bytes of it (see the module docs): a
/// 1 GiB file after 128 random reads, a 16 MiB one after [`SEEKS_FOR_RANDOM`]. 8 MiB rather than 4: on Garage, a
/// 256 MiB file read at random through a disk cache on a journaled ext4 served 2,000 reads in 1.04–1.06 s instead of
/// 1.12–1.14 s (3 alternating runs each), since 32 fewer reads each wait for a GET of their own first (more on a
/// slower link).
pub const WHOLE_OBJECT_BYTES_PER_SEEK: u64 = 8 << 20;
/// The longest run of pages read from the disk cache (or the scratch) without a blocking task
/// (`DiskCache::get_many_now`): a read of up to 256 KiB. Longer runs (read-ahead, whole-object segments) decrypt too
/// much to do it on an async thread.
const DISK_NOW_MAX_PAGES: usize = 4;
/// Pages a fetch into the disk cache opens before it seals and writes them ([`Reader::fetch_to_disk`]): 512 KiB, a
/// buffer below the allocator's mapping threshold (`memory::tune_allocator`), so it comes from the heap and is reused.
const DISK_BATCH_PAGES: usize = 8;
/// Segments a whole-object fetch has in flight at once.
const WHOLE_OBJECT_IN_FLIGHT: usize = 8;
/// Objects whose random reads [`Fetches`] follows at most, the least recently read forgotten first.
const RANDOM_TRACKED: usize = 4096;
/// Whole-object fetches in progress that a new object's count passes over when [`Fetches::random`] is full.
const WHOLE_FETCHES_KEPT: usize = 64;
/// In [`Fetches::random`]: the object is being fetched whole.
const FETCHING_WHOLE: u32 = u32::MAX;
/// ... or is whole in the disk cache (until a read misses there).
const FETCHED_WHOLE: u32 = u32::MAX - 1;

struct ReadState {
    next_offset: u64,
    window: u64,
    prefetched_until: u64,
}

/// A fetch in flight, which readers that need its chunks await.
type Fetch = Shared<BoxFuture<'static, FetchEnd>>;

/// How a fetch in flight ended, for the reads that waited on it.
#[derive(Clone)]
enum FetchEnd {
    /// It kept what it fetched, or failed in a way that a read's own GET may not: a body cut short or too slow for
    /// the deadline (the store did answer), a disk cache that did not keep a batch. Also every failed fetch of an
    /// S3EC object, whose pass does not tell when the store answered.
    Done,
    /// Its GET got no answer at all within the store's deadline (nor did it find a page in the disk cache): a frozen
    /// or dead store, or a hung connection. A read that waited on it (nearly) that long fails with this instead of
    /// sending a GET of its own into the same store, which would cost a second deadline (see [`Reader::pages`]).
    Unanswered(Arc<Unanswered>),
}

/// What a [`FetchEnd::Unanswered`] fetch failed with (a `StoreError::TimedOut`), and when.
struct Unanswered {
    key: String,
    after: std::time::Duration,
    detail: String,
    ended: std::time::Instant,
}

impl Unanswered {
    /// The fetch's error, for a read that waited on it.
    fn error(&self) -> Error {
        let source = crate::store::StoreError::TimedOut {
            key: self.key.clone(),
            after: self.after,
            detail: self.detail.clone(),
        };
        Error::store(&self.key, source)
    }
}

/// How far a fetch in flight has come: the chunks before this index (from the fetch's first) are in the page cache or
/// the disk cache, where the fetch keeps them. Its chunks come in order, so a read that needs one of the first of
/// them goes on as soon as that one is kept instead of when the last is: a segment is up to 8 MiB, streamed beside
/// up to 7 others, and waiting for all of it cost a random read during a whole-object fetch 26–168 ms on Garage
/// (and most of a second on a link of 100 MB/s).
///
/// Besides its value, a fetch's progress is told when the store has answered the fetch's GET ([`answered`]): that
/// changes its version, not its value.
type Progress = tokio::sync::watch::Sender<u64>;

/// Tells `progress` (when given) that the store answered the fetch's GET: its waiters see no new value (and wait on),
/// the fetch at its end sees that it was answered ([`FetchEnd`]).
fn answered(progress: Option<&Progress>) {
    if let Some(p) = progress {
        p.send_modify(|_| ());
    }
}

/// A chunk's fetch in flight: its end, and its [`Progress`].
#[derive(Clone)]
struct InFlight {
    fetch: Fetch,
    progress: tokio::sync::watch::Receiver<u64>,
}

/// Fetches in flight, by object version and chunk, shared by every reader of a mount: a chunk two handles (or a
/// handle's read and its read-ahead) need at once is fetched once.
pub struct Fetches {
    inflight: Mutex<HashMap<(ObjectId, u64), InFlight>>,
    /// Random reads counted per object, over every reader of it, or [`FETCHING_WHOLE`] or [`FETCHED_WHOLE`].
    random: Mutex<lru::LruCache<ObjectId, u32>>,
    /// The whole-object fetches running: where each keeps its chunks and its segments' length, which the segments
    /// that reads start meanwhile use too ([`Reader::start_segments_at_misses`]).
    whole: Mutex<HashMap<ObjectId, (Keep, u64)>>,
}

impl Default for Fetches {
    fn default() -> Self {
        let tracked = std::num::NonZeroUsize::new(RANDOM_TRACKED).expect("a positive constant");
        Fetches { inflight: Mutex::default(), random: Mutex::new(lru::LruCache::new(tracked)), whole: Mutex::default() }
    }
}

impl Fetches {
    /// Counts a random read of object `id`: `true` when that makes `needed` and the object is not being fetched
    /// whole nor whole in the disk cache, and from then on it is being fetched (until [`Fetches::whole_done`]).
    fn random_read(&self, id: &ObjectId, needed: u32) -> bool {
        let mut counts = lock(&self.random);
        // An object being fetched whole is not forgotten for a new one (a second fetch of it would start).
        if !counts.contains(id) && counts.len() == counts.cap().get() {
            for _ in 0..WHOLE_FETCHES_KEPT {
                match counts.peek_lru() {
                    Some((oldest, &FETCHING_WHOLE)) => {
                        let oldest = oldest.clone();
                        counts.promote(&oldest);
                    }
                    _ => break,
                }
            }
        }
        let n = counts.get_or_insert_mut(id.clone(), || 0);
        if *n >= FETCHED_WHOLE {
            return false;
        }
        *n += 1;
        if *n >= needed {
            *n = FETCHING_WHOLE;
            return true;
        }
        false
    }

    /// The whole-object fetch of `id` ended. With `whole_on_disk` (every page of it was in the disk cache at the
    /// end) it is not started again — each later scan of a large object for what is missing cost more than the reads
    /// it served — until a read misses there ([`Fetches::missed_on_disk`]). Otherwise its random reads are counted
    /// from zero again, and a later whole fetch gets only what is no longer kept.
    fn whole_done(&self, id: &ObjectId, whole_on_disk: bool) {
        lock(&self.whole).remove(id);
        let mut counts = lock(&self.random);
        if whole_on_disk {
            counts.put(id.clone(), FETCHED_WHOLE);
        } else if counts.peek(id) == Some(&FETCHING_WHOLE) {
            counts.pop(id);
        }
    }

    /// Whether `id` is being fetched whole (for tests).
    #[cfg(test)]
    fn fetching_whole(&self, id: &ObjectId) -> bool {
        lock(&self.random).peek(id) == Some(&FETCHING_WHOLE)
    }

    /// A read of `id` did not find every page it needed in the disk cache (evicted, damaged): if the object was whole
    /// there, its random reads are counted again.
    fn missed_on_disk(&self, id: &ObjectId) {
        let mut counts = lock(&self.random);
        if counts.peek(id) == Some(&FETCHED_WHOLE) {
            counts.pop(id);
        }
    }
}

/// Ends a whole-object fetch in [`Fetches`] however its task ends (a panic too): not whole on disk unless said.
struct WholeFetch {
    fetches: Arc<Fetches>,
    id: ObjectId,
    whole_on_disk: bool,
}

impl Drop for WholeFetch {
    fn drop(&mut self) {
        self.fetches.whole_done(&self.id, self.whole_on_disk);
    }
}

/// What [`Reader::start_fetch`] did.
enum Started {
    /// Every chunk asked for is kept or in flight already.
    Nothing,
    /// The memory for the fetch was not given.
    NoRoom,
    /// This fetch, in flight.
    Fetch(Fetch),
}

/// Where a fetch keeps the pages it brings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// The page cache (and the disk cache, when there is one and the budget has room to write it).
    Memory,
    /// The disk cache only, written before the fetch counts as done: a whole object larger than the page cache.
    Disk,
}

/// Bytes a fetch of `chunks` chunks into the page cache holds at its peak: the GET body and the pages decrypted from
/// it (a little more than the plaintext for the chunk overhead). Own-format objects are decrypted from the body as it
/// arrives and hold little of it, but S3EC objects and stores without a streamed body (the local store) hold it whole.
fn fetch_cost(chunks: u64) -> u64 {
    2 * chunks * (CHUNK_PLAIN_LEN + 64)
}

/// What every reader of a mount shares.
#[derive(Clone)]
pub struct ReadContext {
    pub backend: Arc<dyn Backend>,
    pub codec: Codec,
    pub cache: Arc<PageCache>,
    pub s3ec: Arc<S3ecReads>,
    pub fetches: Arc<Fetches>,
    /// The disk cache or the scratch, when the mount has one.
    pub disk: Option<Arc<DiskCache>>,
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
    /// An empty object of the own format: its header, binding and empty last chunk authenticated (`check_at_open`).
    empty_checked: OnceCell<()>,
    /// Set once the object was renamed under this reader (see `set_key`).
    moved: std::sync::atomic::AtomicBool,
    /// Set once the handle that reads through it closed ([`Reader::close`]).
    closed: AtomicBool,
    state: Mutex<ReadState>,
    fetches: Arc<Fetches>,
    disk: Option<Arc<DiskCache>>,
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
        let plain_size = match format {
            StoredFormat::Own => context.codec.plain_size(stored_size),
            StoredFormat::S3ec { .. } => crate::crypto::s3ec::plain_size(stored_size).ok(),
        }
        .ok_or_else(|| Error::NotOurFormat { key: key.clone(), size: stored_size })?;
        let etag_is_empty = etag.is_empty();
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
            empty_checked: OnceCell::new(),
            moved: std::sync::atomic::AtomicBool::new(false),
            closed: AtomicBool::new(false),
            state: Mutex::new(ReadState { next_offset: 0, window: INITIAL_WINDOW, prefetched_until: 0 }),
            fetches: context.fetches.clone(),
            // A version without an ETag has no identity that outlives this mount.
            disk: context.disk.clone().filter(|_| !etag_is_empty),
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
        // A rename elsewhere on the mount retargets every open reader: one whose key stays keeps its checks.
        let mut current = lock(&self.key);
        if *current != key {
            *current = key;
            self.moved.store(true, std::sync::atomic::Ordering::Relaxed);
        }
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

    /// The largest window now: `max_readahead`, within the share of what the page cache may hold now (see
    /// WINDOW_SHARE_OF_CACHE; it shrinks while uploads and fetches use the memory budget); at least one page.
    fn max_window(&self) -> u64 {
        self.max_readahead.min(self.cache.capacity() / WINDOW_SHARE_OF_CACHE).max(CHUNK_PLAIN_LEN)
    }

    /// Chunks per read-ahead GET: a quarter of the largest window, so that four or more GETs are in flight at once,
    /// within [MIN_SEGMENT_CHUNKS, MAX_SEGMENT_CHUNKS] (8 MiB GETs, eight in flight, with the default 64 MiB window).
    fn segment_chunks(&self) -> u64 {
        (self.max_window() / CHUNK_PLAIN_LEN / 4).clamp(MIN_SEGMENT_CHUNKS, MAX_SEGMENT_CHUNKS)
    }

    /// Where a random reader of this object would fetch it whole, if anywhere (see the module docs).
    fn whole_object_plan(&self) -> Option<Keep> {
        if self.max_readahead == 0 {
            return None;
        }
        if self.plain_size <= WHOLE_OBJECT_MAX.min(self.cache.capacity() / WHOLE_OBJECT_SHARE_OF_CACHE) {
            return Some(Keep::Memory);
        }
        let disk = self.disk.as_ref()?;
        // S3EC pages come from a verification pass that keeps them in memory (see `s3ec`).
        let fits = self.plain_size <= WHOLE_OBJECT_MAX_ON_DISK.min(disk.limit() / WHOLE_OBJECT_SHARE_OF_DISK);
        (fits && !self.format.is_s3ec()).then_some(Keep::Disk)
    }

    /// Random reads of this object after which it is fetched whole (see [`WHOLE_OBJECT_BYTES_PER_SEEK`]).
    fn random_reads_for_whole(&self) -> u32 {
        (self.plain_size / WHOLE_OBJECT_BYTES_PER_SEEK).clamp(SEEKS_FOR_RANDOM as u64, u32::MAX as u64 - 1) as u32
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
        if self.format.is_s3ec() {
            // The verification pass reserves its buffers (and may wait for room): before this read holds any, so no
            // read waits for memory while holding some.
            self.s3ec_verified().await?;
        }
        let end = (offset + len as u64).min(self.plain_size);
        let first = offset / CHUNK_PLAIN_LEN;
        let last = (end - 1) / CHUNK_PLAIN_LEN; // inclusive
        let chunk_total = self.page_count();

        let max_window = self.max_window();
        let (prefetch, seeked) = {
            let mut st = lock(&self.state);
            // The kernel issues read-ahead requests concurrently, so a sequential reader's requests arrive slightly
            // out of order: count a read as sequential when it lands within the current window of where the last
            // one ended, not only exactly there.
            let slack = st.window.max(1 << 20);
            let sequential = offset <= st.next_offset.saturating_add(slack) && offset.saturating_add(slack) >= st.next_offset;
            if sequential {
                st.window = (st.window * 2).min(max_window);
                st.next_offset = st.next_offset.max(end);
            } else {
                st.window = INITIAL_WINDOW.min(max_window);
                st.prefetched_until = 0;
                st.next_offset = end;
            }
            let prefetch = if sequential && self.max_readahead > 0 {
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
            };
            (prefetch, !sequential)
        };

        // Start the read-ahead before waiting for this read's own chunks, so both are in flight together.
        if let Some(range) = prefetch {
            let reached = self.spawn_prefetch(range.clone());
            if reached < range.end {
                // The memory budget ended the read-ahead early: the next sequential read tries again from there.
                let mut st = lock(&self.state);
                if st.prefetched_until == range.end {
                    st.prefetched_until = reached;
                }
            }
        }
        if seeked {
            if let Some(keep) = self.whole_object_plan() {
                if self.fetches.random_read(&self.object_id(), self.random_reads_for_whole()) {
                    let (key, size) = (self.key(), self.plain_size);
                    tracing::debug!(key = %key, size, ?keep, "random reads: fetching the whole object");
                    self.spawn_whole(keep);
                }
            }
        }
        let pages = self.pages(first..last + 1).await?;

        // The answer is a buffer of its own (up to 1 MiB, and the kernel sends up to 16 reads at once in the
        // background): counted too. Reserved once the pages are here, so a read never waits for room while holding
        // some (no read can then wait on another).
        let _out = self.cache.memory().reserve(end - offset).await;
        let mut out = crate::iobuf::take((end - offset) as usize);
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
                    if let Some(f) = lock(&self.fetches.inflight).get(&(id.clone(), index)).cloned() {
                        waits.push((index, f));
                    }
                }
            }
        }
        // Counted here, once per page a read asks for, rather than in the cache: the second look below would count
        // every miss twice.
        crate::metrics::cache_lookups(hits, pages.len() as u64 - hits);
        let waiting_since = std::time::Instant::now();
        self.start_segments_at_misses(&id, range.start, &pages, &mut waits);
        let mut unanswered: Vec<(u64, Arc<Unanswered>)> = Vec::new();
        for (index, InFlight { mut fetch, mut progress }) in waits {
            // Until the chunk is kept or the fetch ends (a progress whose fetch ended answers at once: then how the
            // fetch ended is a moment away).
            let kept = tokio::select! {
                biased;
                end = &mut fetch => Err(end),
                kept = progress.wait_for(|done| *done > index) => Ok(kept.is_ok()),
            };
            let end = match kept {
                Ok(true) => continue,
                Ok(false) => fetch.await,
                Err(end) => end,
            };
            if let FetchEnd::Unanswered(u) = end {
                unanswered.push((index, u));
            }
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
                // Waited (nearly) a whole deadline on a fetch of it that the store never answered (a frozen or dead
                // store): a GET of its own would wait as long again. A read that came to the fetch later asks itself.
                // Nearly: the kernel's next read joins a read-ahead a moment after its GET left.
                let waited_out = |(i, u): &&(u64, Arc<Unanswered>)| {
                    *i == index && u.ended.saturating_duration_since(waiting_since) >= u.after * 9 / 10
                };
                if let Some((_, u)) = unanswered.iter().find(waited_out) {
                    return Err(u.error());
                }
                match missing_runs.last_mut() {
                    Some(run) if run.end == index => run.end += 1,
                    _ => missing_runs.push(index..index + 1),
                }
            }
        }
        for run in missing_runs {
            // This read cannot go on without these bytes: wait for room in the budget rather than go over it.
            let _memory = self.cache.memory().reserve(fetch_cost(run.end - run.start)).await;
            let fetched = self.fetch(run.clone(), None).await?;
            for (j, page) in fetched.into_iter().enumerate() {
                pages[(run.start - range.start) as usize + j] = Some(page);
            }
        }
        Ok(pages.into_iter().map(|p| p.unwrap_or_default()).collect())
    }

    /// While the object is fetched whole, a chunk a read needs that is neither cached nor in flight (the whole fetch
    /// has not got there yet) starts a segment of that fetch at that chunk, which the read then waits for (only
    /// until its chunk is kept, see [`Progress`]), instead of a GET of the chunk alone: the whole fetch would fetch
    /// that chunk again later, and on Garage every GET reads and checks a whole block of the server's (1 MiB), so
    /// such GETs beside the fetch slowed it. The whole fetch skips what these segments keep or have in flight when
    /// it gets there. Pages of `first..` found (`pages`); the fetches to wait for go to `waits`. Within the memory
    /// budget only: without room, the read fetches its chunks itself.
    fn start_segments_at_misses(
        self: &Arc<Self>,
        id: &ObjectId,
        first: u64,
        pages: &[Option<Bytes>],
        waits: &mut Vec<(u64, InFlight)>,
    ) {
        // A handle that closed or moved on starts no more of the whole fetch (it stops at its next segment).
        let gone = self.closed.load(Ordering::Relaxed) || self.moved();
        if gone || pages.iter().all(Option::is_some) {
            return;
        }
        // Kept where the whole fetch keeps its chunks, and as long as its segments: the fetch then finds this one at
        // an end of its own and leaves it out (it skips kept and in-flight chunks at the ends of a segment, not inside
        // one). Ending instead where the fetch's segment would made one reader's run slower (more, shorter GETs).
        let Some((keep, segment)) = lock(&self.fetches.whole).get(id).copied() else { return };
        let total = self.page_count();
        for (i, page) in pages.iter().enumerate() {
            let index = first + i as u64;
            if page.is_some() || waits.iter().any(|(w, _)| *w == index) {
                continue;
            }
            let mut in_flight = lock(&self.fetches.inflight).get(&(id.clone(), index)).cloned();
            if in_flight.is_none() {
                // Kept (on disk: the read finds it there).
                if self.kept(id, index, keep, &lock(&self.fetches.inflight)) {
                    continue;
                }
                let end = (index + segment).min(total);
                let free = |bytes| self.cache.memory().try_reserve(bytes);
                if let Started::NoRoom = self.start_fetch(index..end, keep, free, None) {
                    return;
                }
                in_flight = lock(&self.fetches.inflight).get(&(id.clone(), index)).cloned();
            }
            // In flight now, by this read's segment (for the chunks after this one too) or another's.
            if let Some(f) = in_flight {
                waits.push((index, f));
            }
        }
    }

    /// Fetches chunks `range` in the background, in segments of [`Reader::segment_chunks`], skipping chunks cached or
    /// in flight. Each segment reserves its memory first and only if it is free: returns the chunk where the budget
    /// stopped it (`range.end` when it did not).
    fn spawn_prefetch(self: &Arc<Self>, range: Range<u64>) -> u64 {
        let segment = self.segment_chunks();
        let mut start = range.start;
        while start < range.end {
            let end = (start + segment).min(range.end);
            let memory = |bytes| self.cache.memory().try_reserve(bytes);
            if let Started::NoRoom = self.start_fetch(start..end, Keep::Memory, memory, None) {
                return start;
            }
            start = end;
        }
        range.end
    }

    /// Fetches the whole object in the background into `keep`, in segments of [`Reader::segment_chunks`], as many
    /// at a time as a quarter of the memory budget holds (1 to [`WHOLE_OBJECT_IN_FLIGHT`]), each taking its memory
    /// only when it is free; skips what is kept there already or in flight. Stops at the first segment that fails or
    /// is not kept, and once the handle reading through this reader is closed or the object moves.
    fn spawn_whole(self: &Arc<Self>, keep: Keep) {
        use futures::StreamExt;
        let reader = Arc::downgrade(self);
        let total = self.page_count();
        let segment = self.segment_chunks();
        let memory = self.cache.memory().clone();
        let in_flight = self.whole_in_flight(keep, segment);
        let failed = Arc::new(AtomicBool::new(false));
        lock(&self.fetches.whole).insert(self.object_id(), (keep, segment));
        let mut done = WholeFetch { fetches: self.fetches.clone(), id: self.object_id(), whole_on_disk: false };
        tokio::spawn(async move {
            let mut running = futures::stream::FuturesUnordered::new();
            let mut start = 0;
            loop {
                // A failed segment (a store that is down, frozen or changed the object, a full disk cache) ends it:
                // the reads that need the rest fetch it, each with its own deadline, and a later whole fetch may
                // start over.
                while running.len() < in_flight && start < total && !failed.load(Ordering::Relaxed) {
                    let alive = |r: &Arc<Reader>| !r.closed.load(Ordering::Relaxed) && !r.moved();
                    let Some(this) = reader.upgrade().filter(alive) else {
                        failed.store(true, Ordering::Relaxed);
                        break;
                    };
                    let end = (start + segment).min(total);
                    let free = |bytes| memory.try_reserve(bytes);
                    let started = match this.start_fetch(start..end, keep, free, Some(failed.clone())) {
                        Started::NoRoom => {
                            // Wait for room without holding the reader (or until one of ours ends), then start
                            // with the room granted.
                            let cost = this.fetch_cost_for(keep, end - start);
                            drop(this);
                            let released = memory.reserve(cost);
                            futures::pin_mut!(released);
                            let granted = if running.is_empty() {
                                released.await
                            } else {
                                futures::select_biased! {
                                    r = released.fuse() => r,
                                    _ = running.next() => continue,
                                }
                            };
                            let Some(this) = reader.upgrade().filter(alive) else {
                                failed.store(true, Ordering::Relaxed);
                                break;
                            };
                            this.start_fetch(start..end, keep, |_| Some(granted), Some(failed.clone()))
                        }
                        other => other,
                    };
                    if let Started::Fetch(f) = started {
                        running.push(f);
                    }
                    start = end;
                }
                if running.next().await.is_none() {
                    break;
                }
            }
            let complete = start >= total && !failed.load(Ordering::Relaxed);
            if let (true, Keep::Disk, Some(this)) = (complete, keep, reader.upgrade()) {
                done.whole_on_disk = this.whole_on_disk(total);
            }
            let (key, whole_on_disk) = (&done.id.key, done.whole_on_disk);
            tracing::debug!(key = %key, complete, whole_on_disk, "whole-object fetch ended");
        });
    }

    /// [`fetch_cost`] of a fetch of `chunks` chunks kept where `keep` says: into the disk cache, an own-format
    /// object's pages pass through one batch buffer ([`Reader::fetch_to_disk`]), so such a fetch holds what a fetch
    /// of one batch does, whatever its length — when the store hands the body over as it arrives; else it holds
    /// the whole body anyway.
    fn fetch_cost_for(&self, keep: Keep, chunks: u64) -> u64 {
        match keep {
            Keep::Disk if !self.format.is_s3ec() && self.backend.streams_bodies() => {
                fetch_cost(chunks.min(DISK_BATCH_PAGES as u64))
            }
            _ => fetch_cost(chunks),
        }
    }

    /// Segments of `segment` chunks a whole-object fetch has in flight: as many as a quarter of the memory budget
    /// holds, 1 to [`WHOLE_OBJECT_IN_FLIGHT`].
    fn whole_in_flight(&self, keep: Keep, segment: u64) -> usize {
        let fit = self.cache.memory().limit() / 4 / self.fetch_cost_for(keep, segment);
        fit.clamp(1, WHOLE_OBJECT_IN_FLIGHT as u64) as usize
    }

    /// Whether every page `0..total` of this object is in the disk cache, or in the page cache: the scratch does not
    /// take the pages reads fetched for themselves (`keep_on_disk`), and the whole fetch skips what is kept in
    /// memory, so without these a 1 GiB object was never found whole and its fetch started again every 128 reads
    /// (a scan of 16,384 pages each time). A page later evicted from memory misses on disk, and that starts the
    /// count again ([`Fetches::missed_on_disk`]).
    fn whole_on_disk(&self, total: u64) -> bool {
        let Some(disk) = &self.disk else { return false };
        let id = self.object_id();
        (0..total).all(|index| {
            disk.contains(&EntryId { key: &id.key, etag: &id.etag, index }) || self.cache.contains(&id, index)
        })
    }

    /// The handle reading through this reader closed, or moved on to a newer version: a whole-object fetch it
    /// started stops.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn moved(&self) -> bool {
        self.moved.load(Ordering::Relaxed)
    }

    /// Whether page `index` is kept where `keep` says (or being fetched): a fetch for it is not needed.
    fn kept(&self, id: &ObjectId, index: u64, keep: Keep, inflight: &HashMap<(ObjectId, u64), InFlight>) -> bool {
        if self.cache.contains(id, index) || inflight.contains_key(&(id.clone(), index)) {
            return true;
        }
        match (keep, &self.disk) {
            (Keep::Disk, Some(disk)) => disk.contains(&EntryId { key: &id.key, etag: &id.etag, index }),
            _ => false,
        }
    }

    /// Starts fetching chunks `range` in the background, less the leading and trailing ones kept or in flight, with
    /// the memory `reserve` gives for that many bytes held until done; registers them as in flight. Checked and
    /// registered under one lock, so two readers of the object never fetch the same chunk. A failure is logged,
    /// and noted in `failed` when given.
    fn start_fetch(
        self: &Arc<Self>,
        range: Range<u64>,
        keep: Keep,
        reserve: impl FnOnce(u64) -> Option<Reservation>,
        failed: Option<Arc<AtomicBool>>,
    ) -> Started {
        let id = self.object_id();
        let mut inflight = lock(&self.fetches.inflight);
        let missing = |i: &u64| !self.kept(&id, *i, keep, &inflight);
        let (Some(a), Some(b)) = (range.clone().find(missing), range.clone().rev().find(missing)) else {
            return Started::Nothing;
        };
        let Some(memory) = reserve(self.fetch_cost_for(keep, b + 1 - a)) else {
            return Started::NoRoom;
        };
        let this = Arc::clone(self);
        let run = a..b + 1;
        let key = id.clone();
        let (progress, progress_rx) = tokio::sync::watch::channel(a);
        // Whether the fetch was told anything (an answer, a page kept) by its end.
        let told = progress_rx.clone();
        let fut: Fetch = async move {
            let fetched = match keep {
                Keep::Memory => this.fetch(run.clone(), Some(&progress)).await.map(|_| true),
                Keep::Disk => this.fetch_to_disk(run.clone(), &progress).await,
            };
            let (ok, end) = match fetched {
                Ok(kept) => (kept, FetchEnd::Done),
                Err(e) => {
                    tracing::debug!(error = %e, "read-ahead failed; the read that needs these chunks will retry");
                    let nothing = !this.format.is_s3ec() && !told.has_changed().unwrap_or(true);
                    (false, unanswered(&e, nothing))
                }
            };
            if let (false, Some(failed)) = (ok, failed) {
                failed.store(true, Ordering::Relaxed);
            }
            drop(memory);
            let mut inflight = lock(&this.fetches.inflight);
            for i in run {
                inflight.remove(&(key.clone(), i));
            }
            end
        }
        .boxed()
        .shared();
        for i in a..b + 1 {
            inflight.insert((id.clone(), i), InFlight { fetch: fut.clone(), progress: progress_rx.clone() });
        }
        drop(inflight);
        tokio::spawn(fut.clone());
        Started::Fetch(fut)
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
                let mut oc = self.codec.open(header).await.map_err(|e| Error::codec(&key, e))?;
                oc.verify_binding(&key, meta.extra.get(BIND_META).map(String::as_str))
                    .map_err(|e| Error::crypto(&key, e))?;
                // Format 2: no chunk opens before the version map authenticates for this length.
                oc.attach_map(meta, self.plain_size).map_err(|e| Error::crypto(&key, e))?;
                Ok(Arc::new(oc))
            })
            .await
            .cloned()
    }

    /// Plaintext length of page `index`.
    fn page_len(&self, index: u64) -> usize {
        (self.plain_size - index * CHUNK_PLAIN_LEN).min(CHUNK_PLAIN_LEN) as usize
    }

    /// Chunks `run`: from the disk cache where it has them, the rest from the store ([`Reader::fetch_store`], which
    /// then keeps them in the disk cache too). Fills the page cache, and tells `progress` (when given) each chunk it
    /// has put there.
    async fn fetch(&self, run: Range<u64>, progress: Option<&Progress>) -> Result<Vec<Bytes>> {
        let Some(disk) = self.disk.clone() else { return self.fetch_store(run, progress).await };
        let id = self.object_id();
        let ids: Vec<(EntryId, usize)> =
            run.clone().map(|index| (EntryId { key: &id.key, etag: &id.etag, index }, self.page_len(index))).collect();
        let n = ids.len();
        // Pages of the disk cache that the system still holds in memory are read here (a miss is found here too),
        // for a run as short as a read's: a whole-object or read-ahead segment (up to 128 pages to decrypt) is not
        // worked through on an async thread. Else, with nothing of the run there (no slot to read), straight to the
        // store; else in a blocking task.
        let now = if n <= DISK_NOW_MAX_PAGES { disk.get_many_now(&ids) } else { None };
        let found = match now {
            Some(found) => found,
            None => {
                let names: Vec<EntryId> = ids.iter().map(|(id, _)| *id).collect();
                if !disk.contains_any(&names) {
                    crate::metrics::disk_cache_lookups(0, n as u64);
                    self.fetches.missed_on_disk(&id);
                    return self.fetch_store(run, progress).await;
                }
                let lens = ids.iter().map(|(_, len)| *len).collect();
                self.fetch_disk_blocking(&disk, &id, run.start, lens).await
            }
        };
        let hits = found.iter().filter(|p| p.is_some()).count() as u64;
        crate::metrics::disk_cache_lookups(hits, n as u64 - hits);
        if hits < n as u64 {
            self.fetches.missed_on_disk(&id);
        }
        let mut pages = Vec::with_capacity(n);
        let mut missing: Option<Range<u64>> = None;
        for (j, page) in found.into_iter().enumerate() {
            let index = run.start + j as u64;
            match page {
                Some(page) => {
                    if let Some(m) = missing.take() {
                        pages.extend(self.fetch_store(m, progress).await?);
                    }
                    self.cache.put(&id, index, page.clone());
                    pages.push(page);
                    if let Some(p) = progress {
                        p.send_replace(index + 1);
                    }
                }
                None => match &mut missing {
                    Some(m) => m.end = index + 1,
                    None => missing = Some(index..index + 1),
                },
            }
        }
        if let Some(m) = missing {
            pages.extend(self.fetch_store(m, progress).await?);
        }
        Ok(pages)
    }

    /// [`DiskCache::get_many`] of the pages `first..` (of lengths `lens`) of version `id` in a blocking task: each
    /// one found, or `None`.
    async fn fetch_disk_blocking(
        &self,
        disk: &Arc<DiskCache>,
        id: &ObjectId,
        first: u64,
        lens: Vec<usize>,
    ) -> Vec<Option<Bytes>> {
        let (disk, id, n) = (disk.clone(), id.clone(), lens.len());
        tokio::task::spawn_blocking(move || {
            let ids: Vec<(EntryId, usize)> = lens
                .iter()
                .enumerate()
                .map(|(j, &len)| (EntryId { key: &id.key, etag: &id.etag, index: first + j as u64 }, len))
                .collect();
            let mut found: Vec<Option<Bytes>> = vec![None; ids.len()];
            disk.get_many(&ids, |j, page| found[j] = Some(page));
            found
        })
        .await
        .unwrap_or_else(|_| vec![None; n])
    }

    /// Writes pages fetched from the store to the disk cache, in the background and only within the memory budget
    /// (a page that finds no room there is not cached).
    fn keep_on_disk(&self, id: &ObjectId, first: u64, pages: &[Bytes]) {
        let Some(disk) = self.disk.clone().filter(|d| d.keeps_every_read()) else { return };
        let bytes: u64 = pages.iter().map(|p| p.len() as u64).sum();
        let Some(memory) = self.cache.memory().try_reserve(bytes + CHUNK_PLAIN_LEN) else { return };
        let (id, pages) = (id.clone(), pages.to_vec());
        tokio::task::spawn_blocking(move || {
            for (j, page) in pages.iter().enumerate() {
                disk.put(&EntryId { key: &id.key, etag: &id.etag, index: first + j as u64 }, page);
            }
            drop(memory);
        });
    }

    /// Chunks `run` from the store, kept in the disk cache only (written before this returns), not in the page
    /// cache: a whole object larger than the page cache (see the module docs). Own format only.
    /// `false` when the disk cache did not keep every page (full, its disk below its reserve, gone): then it stops
    /// at the first batch not kept. Tells `progress` each batch it has kept.
    ///
    /// The pages pass through one buffer of [`DISK_BATCH_PAGES`], reused: each batch is opened there from the body,
    /// then sealed for the disk cache in place and written in a blocking task. A page buffer of its own for each
    /// page (a mapping, see `cache::page`) made and unmade 4,096 mappings for a 256 MiB object, a quarter of the
    /// daemon's time in a whole fetch, for pages that were dropped as soon as they were written.
    async fn fetch_to_disk(&self, run: Range<u64>, progress: &Progress) -> Result<bool> {
        let Some(disk) = self.disk.clone() else { return Ok(false) };
        // Never planned for S3EC objects (`whole_object_plan`): their pages come from a verification pass.
        if self.format.is_s3ec() {
            return Ok(false);
        }
        let id = self.object_id();
        let t0 = std::time::Instant::now();
        let mut chunks = self.get_chunks(&run, Some(progress)).await?;
        let mut batch = vec![0u8; DISK_BATCH_PAGES * CHUNK_PLAIN_LEN as usize];
        let mut first = run.start;
        while first < run.end {
            let lens: Vec<usize> =
                (first..run.end.min(first + DISK_BATCH_PAGES as u64)).map(|index| self.page_len(index)).collect();
            let mut at = 0;
            for (j, len) in lens.iter().enumerate() {
                chunks.open_next(self, first + j as u64, &mut batch[at..at + len]).await?;
                at += len;
            }
            let (disk, id, n) = (disk.clone(), id.clone(), lens.len() as u64);
            let written = tokio::task::spawn_blocking(move || {
                let mut at = 0;
                let mut kept = true;
                for (j, len) in lens.into_iter().enumerate() {
                    let entry = EntryId { key: &id.key, etag: &id.etag, index: first + j as u64 };
                    kept &= disk.put_in_place(&entry, &mut batch[at..at + len]);
                    at += len;
                }
                (batch, kept)
            })
            .await;
            // A disk cache that did not keep a batch (full, below its reserve, failing) would not keep the rest: the
            // body is dropped unread, and the whole fetch ends at this segment.
            let Ok((back, true)) = written else { return Ok(false) };
            (batch, first) = (back, first + n);
            progress.send_replace(first);
        }
        chunks.finish(&run, t0).await;
        Ok(true)
    }

    /// Fetches chunks `run` with one ranged GET, opens them and fills the page cache and (in the background, within
    /// the budget) the disk cache. S3EC objects come from their own pass ([`s3ec`]).
    async fn fetch_store(&self, run: Range<u64>, progress: Option<&Progress>) -> Result<Vec<Bytes>> {
        let id = self.object_id();
        if self.format.is_s3ec() {
            let first = run.start;
            let pages = self.s3ec_fetch(run).await?;
            self.keep_on_disk(&id, first, &pages);
            return Ok(pages);
        }
        let t0 = std::time::Instant::now();
        let mut chunks = self.get_chunks(&run, progress).await?;
        let mut pages = Vec::with_capacity((run.end - run.start) as usize);
        // Each chunk goes from the body straight into the page that keeps it: its nonce and tag aside, its
        // ciphertext into the page, decrypted there in place (one copy of every byte, into memory the cache keeps).
        for index in run.clone() {
            let mut page = PageBuf::for_len(self.page_len(index));
            chunks.open_next(self, index, page.as_mut_slice()).await?;
            let page = page.freeze();
            self.cache.put(&id, index, page.clone());
            pages.push(page);
            if let Some(p) = progress {
                p.send_replace(index + 1);
            }
        }
        chunks.finish(&run, t0).await;
        self.keep_on_disk(&id, run.start, &pages);
        Ok(pages)
    }

    /// Sends the ranged GET of chunks `run` of this version (with the header first when the object's codec is not
    /// known yet: then it is read and checked here) and returns its body, ready for [`Chunks::open_next`] of
    /// `run.start`; tells `progress` (when given) once the store has answered ([`answered`]). Own format only.
    async fn get_chunks(&self, run: &Range<u64>, progress: Option<&Progress>) -> Result<Chunks> {
        let key = self.key();
        let first = self.codec.chunk_range(run.start, self.plain_size);
        let last = self.codec.chunk_range(run.end - 1, self.plain_size);
        let with_header = run.start == 0 && self.object.get().is_none() && self.codec.header_len() > 0;
        let start = if with_header { 0 } else { first.start };
        let object_key = ObjectKey::new(key.as_str()).map_err(|e| Error::store(&key, e))?;
        let (stream, info, meta) =
            self.backend.get_range_stream(&object_key, start..last.end).await.map_err(|e| Error::store(&key, e))?;
        self.check_version(&key, &info)?;
        // Answered: whatever happens to the body now, the store is there.
        answered(progress);
        let mut body = Body { stream, piece: Bytes::new(), received: 0 };
        let want = last.end - start;
        let oc = if with_header {
            let mut header = vec![0u8; self.codec.header_len() as usize];
            body.fill_all(&mut header, &key, want).await?;
            self.object_codec(Some((&header, &meta))).await?
        } else {
            self.object_codec(None).await?
        };
        Ok(Chunks { body, key, want, oc })
    }
}

/// The body of one ranged GET of whole chunks, opened one chunk after the other into the caller's buffers.
struct Chunks {
    body: Body,
    key: String,
    /// Bytes the range asked for.
    want: u64,
    oc: Arc<ObjectCodec>,
}

impl Chunks {
    /// Opens the next chunk of the body, chunk `index` of `reader`'s object, into `page` (its plaintext length):
    /// its nonce and tag aside, its ciphertext into `page`, authenticated and decrypted there in place. On an error
    /// `page` holds no plaintext of it.
    async fn open_next(&mut self, reader: &Reader, index: u64, page: &mut [u8]) -> Result<()> {
        let (before_len, after_len) = self.oc.chunk_frame();
        let mut frame = ([0u8; FRAME_MAX], [0u8; FRAME_MAX]);
        let (body, key, want) = (&mut self.body, &self.key, self.want);
        body.fill_all(&mut frame.0[..before_len], key, want).await?;
        body.fill_all(page, key, want).await?;
        body.fill_all(&mut frame.1[..after_len], key, want).await?;
        self.oc
            .open_detached(index, reader.is_last(index), &frame.0[..before_len], page, &frame.1[..after_len])
            .map_err(|e| Error::crypto(key, e))
    }

    /// Reads the body to its end ([`Body::finish`]) and logs the fetch of chunks `run` begun at `t0`.
    async fn finish(mut self, run: &Range<u64>, t0: std::time::Instant) {
        self.body.finish().await;
        tracing::trace!(key = %self.key, chunks = ?run, bytes = self.body.received,
            ms = t0.elapsed().as_millis() as u64, "fetched");
    }
}

/// How a fetch that failed with `e` ended for the reads waiting on it: [`FetchEnd::Unanswered`] when it was the
/// store's deadline and the fetch had been told `nothing` (no answer, no page kept).
fn unanswered(e: &Error, nothing: bool) -> FetchEnd {
    match e {
        Error::Store { source: crate::store::StoreError::TimedOut { key, after, detail }, .. } if nothing => {
            let (key, after, detail, ended) = (key.clone(), *after, detail.clone(), std::time::Instant::now());
            FetchEnd::Unanswered(Arc::new(Unanswered { key, after, detail, ended }))
        }
        _ => FetchEnd::Done,
    }
}

/// Room for the bytes a stored chunk has around its plaintext-long middle (`ObjectCodec::chunk_frame`).
const FRAME_MAX: usize = 32;

/// A GET's body being read in pieces of the caller's choosing.
struct Body {
    stream: crate::store::BodyStream,
    /// What is left of the last piece the stream gave.
    piece: Bytes,
    /// Bytes taken from the stream so far.
    received: u64,
}

impl Body {
    /// Fills `dst` with the next bytes of the body: `false` if the body ended first.
    async fn fill(&mut self, dst: &mut [u8]) -> std::result::Result<bool, crate::store::StoreError> {
        use futures::StreamExt;
        let mut at = 0;
        while at < dst.len() {
            if self.piece.is_empty() {
                match self.stream.next().await {
                    Some(piece) => {
                        self.piece = piece?;
                        self.received += self.piece.len() as u64;
                        continue;
                    }
                    None => return Ok(false),
                }
            }
            let n = (dst.len() - at).min(self.piece.len());
            dst[at..at + n].copy_from_slice(&self.piece[..n]);
            bytes::Buf::advance(&mut self.piece, n);
            at += n;
        }
        Ok(true)
    }

    /// [`Body::fill`] for a range of `want` bytes of object `key`: an error if the body ends first (the object is
    /// shorter than its listed size: it was truncated or replaced since we looked).
    async fn fill_all(&mut self, dst: &mut [u8], key: &str, want: u64) -> Result<()> {
        if self.fill(dst).await.map_err(|e| Error::store(key, e))? {
            return Ok(());
        }
        use crate::crypto::{CryptoError, FormatError};
        let short = FormatError::TooShort { len: self.received, min: want };
        Err(Error::crypto(key, CryptoError::Format(short)))
    }

    /// Reads the body to its end once every byte wanted was taken, so the request completes (and its connection can
    /// serve the next one) rather than being cut off: what a server sends beyond the range asked for is read and
    /// dropped, up to [`CHUNK_PLAIN_LEN`] bytes, past which the body is dropped unread.
    async fn finish(&mut self) {
        use futures::StreamExt;
        let mut extra = self.piece.len() as u64;
        while extra <= CHUNK_PLAIN_LEN {
            match self.stream.next().await {
                Some(Ok(piece)) => extra += piece.len() as u64,
                Some(Err(_)) | None => return,
            }
        }
    }
}

#[cfg(test)]
mod body_tests;
#[cfg(test)]
mod format_v2_tests;
