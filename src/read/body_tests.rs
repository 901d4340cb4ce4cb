//! The read path fills pages straight from a GET's body as it arrives (`Reader::fetch_store`): whatever sizes the
//! pieces of the body come in, the plaintext is byte-exact; a body that ends early or fails part way is an error;
//! a tampered chunk fails; and no page of a chunk that did not arrive whole and authenticate is ever cached. A
//! whole-object fetch stops on failure, close and rename, and asks for nothing after.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::*;
use crate::crypto::format::{chunk_count, chunk_plain_range, is_last_chunk};
use crate::crypto::{AeadBackend, Key256, KeyHistory, ObjectCipher};
use crate::store::{BodyStream, Expect, Listing, ObjectInfo, ObjectStoreBackend, StoreError, Upload};

const PATH: &str = "dir/f";

/// A progress nobody watches, for a fetch called directly.
fn progress() -> Progress {
    tokio::sync::watch::channel(0).0
}

/// How [`Pieces`] hands out a body.
#[derive(Clone, Copy)]
enum Shape {
    /// In pieces of these sizes, over and over.
    Sizes(&'static [usize]),
    /// Whole up to this many bytes, then the stream ends.
    EndsAfter(usize),
    /// Whole up to this many bytes, then a failed piece.
    FailsAfter(usize),
    /// Bodies of more than two chunks (a whole fetch's segments) fail after this many bytes, as a request's
    /// deadline cuts a body that a slow disk stopped reading; the GET of a read's own chunk comes whole.
    SegmentsFailAfter(usize),
    /// Bodies of more than two chunks come whole up to this many bytes, then the rest only once
    /// [`Pieces::stall`] gives a permit: a segment streaming slowly. Shorter bodies come whole.
    SegmentsStallAfter(usize),
    /// Bodies of more than two chunks come whole up to this many bytes, then nothing more for [`DEADLINE`], then
    /// fail as a request's deadline cuts them (`StoreError::TimedOut`): a store that froze while it answered, or a
    /// link too slow for them. Shorter bodies come whole.
    SegmentsTimeOutAfter(usize),
    /// GETs of more than two chunks get no answer for [`DEADLINE`], then fail as a request's deadline cuts them: a
    /// store that froze. Shorter ones are answered.
    SegmentsUnanswered,
}

/// The deadline of [`Shape::SegmentsTimeOutAfter`] and [`Shape::SegmentsUnanswered`] GETs.
const DEADLINE: std::time::Duration = std::time::Duration::from_millis(1000);

/// The store, with `get_range_stream` bodies cut into the pieces `shape` says.
struct Pieces {
    inner: Arc<ObjectStoreBackend>,
    shape: std::sync::Mutex<Shape>,
    /// The ranges of the streamed GETs asked for, in order.
    asked: std::sync::Mutex<Vec<Range<u64>>>,
    /// When set, each streamed GET answers only once it takes a permit: a store that holds its answers.
    gate: std::sync::Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// What `streams_bodies` answers (a store that hands the body over whole, like the local store, when false).
    streams: std::sync::atomic::AtomicBool,
    /// Where [`Shape::SegmentsStallAfter`] bodies wait.
    stall: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Backend for Pieces {
    fn streams_bodies(&self) -> bool {
        self.streams.load(Ordering::Relaxed)
    }
    async fn head(&self, key: &ObjectKey) -> std::result::Result<(ObjectInfo, UserMeta), StoreError> {
        self.inner.head(key).await
    }
    async fn get_range(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> std::result::Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.inner.get_range(key, range).await
    }
    async fn get_range_stream(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> std::result::Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        self.asked.lock().unwrap().push(range.clone());
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        let unanswered = matches!(*self.shape.lock().unwrap(), Shape::SegmentsUnanswered);
        if unanswered && range.end - range.start > 2 * 65536 + 4096 {
            tokio::time::sleep(DEADLINE).await;
            return Err(StoreError::TimedOut { key: PATH.into(), after: DEADLINE, detail: "GET (test)".into() });
        }
        let (body, info, meta) = self.inner.get_range(key, range).await?;
        let mut pieces: Vec<std::result::Result<Bytes, StoreError>> = Vec::new();
        match *self.shape.lock().unwrap() {
            Shape::Sizes(sizes) => {
                let mut at = 0;
                for &n in sizes.iter().cycle() {
                    if at >= body.len() {
                        break;
                    }
                    let end = (at + n).min(body.len());
                    pieces.push(Ok(body.slice(at..end)));
                    at = end;
                }
            }
            Shape::EndsAfter(n) => pieces.push(Ok(body.slice(..n.min(body.len())))),
            Shape::SegmentsFailAfter(_) | Shape::SegmentsStallAfter(_) | Shape::SegmentsTimeOutAfter(_)
                if body.len() <= 2 * 65536 + 4096 =>
            {
                pieces.push(Ok(body))
            }
            Shape::SegmentsUnanswered => pieces.push(Ok(body)),
            Shape::SegmentsTimeOutAfter(n) => {
                let head = body.slice(..n.min(body.len()));
                let detail = "GET (test)".to_string();
                let cut = async move {
                    tokio::time::sleep(DEADLINE).await;
                    Err(StoreError::TimedOut { key: PATH.into(), after: DEADLINE, detail })
                };
                let stream = futures::stream::iter([Ok(head)]).chain(futures::stream::once(cut));
                return Ok((stream.boxed(), info, meta));
            }
            Shape::SegmentsStallAfter(n) => {
                let (head, rest) = (body.slice(..n.min(body.len())), body.slice(n.min(body.len())..));
                let stall = self.stall.clone();
                let rest = async move {
                    stall.acquire().await.unwrap().forget();
                    Ok(rest)
                };
                let stream = futures::stream::iter([Ok(head)]).chain(futures::stream::once(rest));
                return Ok((stream.boxed(), info, meta));
            }
            Shape::FailsAfter(n) | Shape::SegmentsFailAfter(n) => {
                pieces.push(Ok(body.slice(..n.min(body.len()))));
                pieces.push(Err(StoreError::Unavailable { detail: "connection reset (test)".into(), source: None }));
            }
        }
        Ok((futures::stream::iter(pieces).boxed(), info, meta))
    }
    async fn get(&self, key: &ObjectKey) -> std::result::Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.inner.get(key).await
    }
    async fn put_expect(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
        expect: &Expect,
    ) -> std::result::Result<ObjectInfo, StoreError> {
        self.inner.put_expect(key, body, meta, expect).await
    }
    async fn put_multipart_expect(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        expect: &Expect,
    ) -> std::result::Result<Box<dyn Upload>, StoreError> {
        self.inner.put_multipart_expect(key, meta, expect).await
    }
    async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> std::result::Result<(), StoreError> {
        self.inner.copy(from, to, meta).await
    }
    async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta) -> std::result::Result<ObjectInfo, StoreError> {
        self.inner.update_meta(key, meta).await
    }
    async fn delete(&self, key: &ObjectKey) -> std::result::Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn list(&self, dir: &str, recursive: bool) -> std::result::Result<Listing, StoreError> {
        self.inner.list(dir, recursive).await
    }
    async fn check_access(&self) -> std::result::Result<(), StoreError> {
        self.inner.check_access().await
    }
}

/// `reader.read(at, len)` in a task of its own.
fn spawn_read(reader: &Arc<Reader>, at: u64, len: usize) -> tokio::task::JoinHandle<Result<Vec<u8>>> {
    let reader = reader.clone();
    tokio::spawn(async move { reader.read(at, len).await })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(0x9e37_79b9).to_be_bytes()[5]).collect()
}

struct Setup {
    context: ReadContext,
    pieces: Arc<Pieces>,
    plain: Vec<u8>,
    stored: Vec<u8>,
}

/// A file of 4 chunks and a bit, stored in own format (`encrypted`) or as plaintext (mode none), at PATH.
async fn setup(encrypted: bool) -> Setup {
    setup_with(encrypted, 4 * 65536 + 1234, Arc::new(PageCache::new(8 << 20))).await
}

/// A file of `len` bytes, as [`setup`] says, read through `cache`.
async fn setup_with(encrypted: bool, len: usize, cache: Arc<PageCache>) -> Setup {
    let inner = Arc::new(ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap());
    let shape = std::sync::Mutex::new(Shape::Sizes(&[1 << 20]));
    let streams = true.into();
    let stall = Arc::new(tokio::sync::Semaphore::new(0));
    let pieces =
        Arc::new(Pieces { inner, shape, asked: Default::default(), gate: Default::default(), streams, stall });
    let plain = pattern(len);
    let len = plain.len() as u64;
    let mut meta = UserMeta::default();
    let (codec, stored) = if encrypted {
        let keys = Arc::new(KeyHistory::single(Key256::generate()));
        let (cipher, header) = ObjectCipher::create(&keys, AeadBackend::default());
        let mut out = header.to_vec();
        for i in 0..chunk_count(len) {
            let r = chunk_plain_range(i, len);
            cipher.seal_chunk(i, is_last_chunk(i, len), &plain[r.start as usize..r.end as usize], &mut out);
        }
        meta.extra.insert(BIND_META.to_string(), cipher.binding(PATH));
        let codec = Codec::Cse { keys: Some(keys), kms: None, aead: AeadBackend::default(), format: Default::default() };
        (codec, out)
    } else {
        (Codec::Plain, plain.clone())
    };
    pieces.put_expect(&ObjectKey::new(PATH).unwrap(), Bytes::from(stored.clone()), &meta, &Expect::Any).await.unwrap();
    let context = ReadContext {
        backend: pieces.clone(),
        codec,
        cache,
        s3ec: Arc::new(S3ecReads::new(Default::default())),
        fetches: Arc::default(),
        disk: None,
    };
    Setup { context, pieces, plain, stored }
}

impl Setup {
    /// A fresh reader (read-ahead off: one GET per read, of the chunks the read needs) over an empty cache.
    async fn reader(&self, shape: Shape) -> Arc<Reader> {
        *self.pieces.shape.lock().unwrap() = shape;
        self.context.cache.invalidate_key(PATH);
        let (info, _) = self.pieces.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
        Reader::new(&self.context, PATH.into(), info.etag.unwrap_or_default(), info.size, StoredFormat::Own, 0).unwrap()
    }

    /// Waits until a whole-object fetch has asked for its first segment (a GET from chunk 0 of more than two
    /// chunks); fails if it has not `within` that time.
    async fn whole_fetch_asked(&self, within: std::time::Duration) {
        let t0 = std::time::Instant::now();
        while !self.pieces.asked.lock().unwrap().iter().any(|r| r.start == 0 && r.end - r.start > 2 * 65536) {
            assert!(t0.elapsed() < within, "the whole fetch did not ask for its first segment within {within:?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn cached(&self, reader: &Reader) -> Vec<u64> {
        let id = reader.object_id();
        (0..chunk_count(self.plain.len() as u64)).filter(|&i| self.context.cache.contains(&id, i)).collect()
    }
}

#[tokio::test]
async fn pages_are_byte_exact_whatever_the_pieces_of_the_body() {
    for encrypted in [true, false] {
        let s = setup(encrypted).await;
        for sizes in [&[1usize][..], &[7, 13, 4096], &[12, 65536, 16, 3], &[65564], &[100_000, 1], &[1 << 20]] {
            let reader = s.reader(Shape::Sizes(sizes)).await;
            let all = reader.read(0, s.plain.len() + 10).await.unwrap();
            assert!(all == s.plain, "whole file, encrypted {encrypted}, pieces {sizes:?}");
            // A read starting past chunk 0 (no header in the body).
            let reader = s.reader(Shape::Sizes(sizes)).await;
            let tail = reader.read(2 * 65536 + 5, 70_000).await.unwrap();
            assert!(tail == s.plain[2 * 65536 + 5..2 * 65536 + 5 + 70_000], "tail, pieces {sizes:?}");
        }
    }
}

#[tokio::test]
async fn a_body_that_ends_early_or_fails_is_an_error_and_caches_only_whole_chunks() {
    for encrypted in [true, false] {
        let s = setup(encrypted).await;
        let header = if encrypted { crate::crypto::HEADER_LEN as usize } else { 0 };
        let chunk = if encrypted { 65536 + 28 } else { 65536 };
        // Cut inside the header, inside chunk 0, and inside chunk 2 (chunks 0 and 1 whole).
        for n in [100, header + 5000, header + 2 * chunk + 12 + 10] {
            for shape in [Shape::EndsAfter(n), Shape::FailsAfter(n)] {
                let reader = s.reader(shape).await;
                let err = reader.read(0, s.plain.len()).await.unwrap_err();
                assert_eq!(err.errno(), libc::EIO, "{err:?}");
                let whole: Vec<u64> = (0..n.saturating_sub(header) as u64 / chunk as u64).collect();
                assert_eq!(s.cached(&reader), whole, "only chunks that arrived whole are cached (cut at {n})");
                // The same reader reads everything once the store answers whole again.
                *s.pieces.shape.lock().unwrap() = Shape::Sizes(&[4096]);
                assert!(reader.read(0, s.plain.len()).await.unwrap() == s.plain, "after the cut at {n}");
            }
        }
    }
}

#[tokio::test]
async fn a_tampered_chunk_in_a_streamed_body_fails_and_is_not_cached() {
    let s = setup(true).await;
    let header = crate::crypto::HEADER_LEN as usize;
    let chunk = 65536 + 28;
    // A flipped byte in the ciphertext of chunk 1, in its nonce, and in its tag: each fails chunk 1.
    for at in [header + chunk + 12 + 300, header + chunk + 3, header + 2 * chunk - 1] {
        let mut tampered = s.stored.clone();
        tampered[at] ^= 1;
        let key = ObjectKey::new(PATH).unwrap();
        let meta = s.pieces.head(&key).await.unwrap().1;
        s.pieces.put_expect(&key, Bytes::from(tampered), &meta, &Expect::Any).await.unwrap();
        let reader = s.reader(Shape::Sizes(&[5000, 3])).await;
        let err = reader.read(0, 3 * 65536).await.unwrap_err();
        assert!(format!("{err:?}").contains("AuthenticationFailed { chunk: 1 }"), "{err:?}");
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(s.cached(&reader), vec![0], "chunk 0 authenticated and is cached; chunk 1 is not");
    }
}

/// A file of 120 chunks read under a 32 MiB memory budget (a cache in it keeps objects up to 8 MiB whole, and a
/// few segments of a whole-object fetch travel at once), and a reader of it that fetches it whole after two random
/// reads.
async fn whole_fetch_setup() -> (Setup, Arc<Reader>) {
    let memory = crate::memory::MemoryBudget::new(32 << 20);
    let s = setup_with(false, 120 * 65536, PageCache::with_memory(256 << 20, memory)).await;
    whole_fetch_reader(s).await
}

/// [`whole_fetch_setup`] with a file of 240 chunks, a page cache of 4 MiB and a scratch in `tmp`: the object is
/// fetched whole into the scratch ([`Keep::Disk`]), in batches ([`Reader::fetch_to_disk`]).
async fn whole_fetch_setup_on_disk(tmp: &std::path::Path) -> (Setup, Arc<Reader>, Arc<DiskCache>) {
    let memory = crate::memory::MemoryBudget::new(32 << 20);
    let mut s = setup_with(false, 240 * 65536, PageCache::with_memory(4 << 20, memory)).await;
    let disk = with_disk(&mut s, tmp, false, 64 << 20).await;
    let (s, reader) = whole_fetch_reader(s).await;
    assert_eq!(reader.whole_object_plan(), Some(Keep::Disk));
    (s, reader, disk)
}

async fn whole_fetch_reader(s: Setup) -> (Setup, Arc<Reader>) {
    let (info, _) = s.pieces.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
    let reader =
        Reader::new(&s.context, PATH.into(), info.etag.unwrap_or_default(), info.size, StoredFormat::Own, 1 << 20)
            .unwrap();
    assert_eq!(reader.random_reads_for_whole(), 2);
    (s, reader)
}

/// A whole-object fetch (random reads, src/read docs) stops at its first failed segment instead of asking for every
/// other one: a store that is down or frozen would otherwise be sent every segment of the object, each waiting for
/// its deadline while holding memory.
#[tokio::test]
async fn a_whole_object_fetch_stops_at_its_first_failed_segment() {
    let (s, reader) = whole_fetch_setup().await;
    // The segments the fetch sends before any answer: fewer than the object's, or the test shows nothing.
    let first_batch = reader.whole_in_flight(Keep::Memory, reader.segment_chunks()) as u64 * reader.segment_chunks();
    assert!(first_batch < 80, "the first batch ({first_batch} chunks) would cover the object");
    // A random read, then the store fails every GET: the second starts the whole fetch, whose segments all fail.
    let at = 100 * 65536 + 10;
    assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
    *s.pieces.shape.lock().unwrap() = Shape::FailsAfter(0);
    assert_eq!(reader.read(20 * 65536, 4096).await.unwrap_err().errno(), libc::EIO);
    // The fetch ends (and its count starts over) once its segments failed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lock(&s.context.fetches.random).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let left: Vec<u32> = lock(&s.context.fetches.random).iter().map(|(_, n)| *n).collect();
    let asked = s.pieces.asked.lock().unwrap().clone();
    assert!(left.is_empty(), "the whole-object fetch did not end: {left:?}, asked {asked:?}");
    assert!(asked.iter().any(|r| r.start == 0), "the whole-object fetch never started: {asked:?}");
    let reads = [100 * 65536, 20 * 65536];
    let later = asked.iter().filter(|r| r.start >= first_batch * 65536 && !reads.contains(&r.start)).count();
    assert_eq!(later, 0, "segments after the failed ones were asked for: {asked:?}");
}

/// A whole-object fetch started by the reader of a handle that is closed (or moved on to a newer version) asks for
/// nothing: nobody would read what it brings.
#[tokio::test]
async fn a_whole_object_fetch_of_a_closed_reader_asks_for_nothing() {
    let s = setup_with(false, 64 * 65536, Arc::new(PageCache::new(64 << 20))).await;
    let (info, _) = s.pieces.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
    let reader =
        Reader::new(&s.context, PATH.into(), info.etag.unwrap_or_default(), info.size, StoredFormat::Own, 1 << 20)
            .unwrap();
    assert_eq!(reader.random_reads_for_whole(), 2);
    assert!(reader.read(50 * 65536, 4096).await.unwrap() == s.plain[50 * 65536..50 * 65536 + 4096]);
    reader.close();
    // The second random read starts the whole fetch, which stops before its first segment.
    assert!(reader.read(10 * 65536, 4096).await.unwrap() == s.plain[10 * 65536..10 * 65536 + 4096]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lock(&s.context.fetches.random).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(lock(&s.context.fetches.random).is_empty(), "the whole-object fetch did not end");
    let asked = s.pieces.asked.lock().unwrap().clone();
    assert_eq!(asked, [50 * 65536..51 * 65536, 10 * 65536..11 * 65536], "only the reads' own chunks");
}

/// A whole-object fetch whose handle closes, or whose file is renamed, while its first segments are in flight sends
/// no further segment once those answer: the check runs before every segment, not only the first. The same into
/// the scratch, whose batches land whole and byte-exact under the name the fetch started with.
#[tokio::test]
async fn a_whole_object_fetch_stops_when_its_handle_closes_or_its_file_moves_mid_way() {
    for (rename, to_disk) in [(false, true), (true, true), (false, false), (true, false)] {
        let tmp = tempfile::tempdir().unwrap();
        let (s, reader, disk) = if to_disk {
            let (s, reader, disk) = whole_fetch_setup_on_disk(tmp.path()).await;
            (s, reader, Some(disk))
        } else {
            let (s, reader) = whole_fetch_setup().await;
            (s, reader, None)
        };
        let keep = if to_disk { Keep::Disk } else { Keep::Memory };
        let total = reader.page_count();
        let segment = reader.segment_chunks();
        let first_batch = reader.whole_in_flight(keep, segment) as u64 * segment;
        assert!(first_batch < total * 2 / 3, "the first batch ({first_batch} chunks) would cover the object");
        let at = 100 * 65536 + 10;
        assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
        // From now on the store holds its answers: the second random read starts the whole fetch, whose first
        // segments (and the read itself) wait.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *s.pieces.gate.lock().unwrap() = Some(gate.clone());
        let read = tokio::spawn({
            let reader = reader.clone();
            async move { reader.read(20 * 65536, 4096).await }
        });
        // (The read may have started a segment at its chunk before the fetch sent its first ones, which then leave
        // that out: the last of them ends where it would, but may start later.)
        let end_of_batch = first_batch * 65536;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !s.pieces.asked.lock().unwrap().iter().any(|r| r.end == end_of_batch) {
            assert!(std::time::Instant::now() < deadline, "the first batch was never sent");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if rename {
            let (from, to) = (ObjectKey::new(PATH).unwrap(), ObjectKey::new("dir/g").unwrap());
            s.pieces.copy(&from, &to, None).await.unwrap();
            reader.set_key("dir/g".into());
        } else {
            reader.close();
        }
        gate.add_permits(1 << 20);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("the read waiting on the fetch never returned")
            .unwrap()
            .unwrap();
        assert!(got == s.plain[20 * 65536..20 * 65536 + 4096], "the read waiting on the fetch (rename {rename})");
        // The whole fetch, and a segment the read may have started at its chunk before the fetch sent its own.
        while !lock(&s.context.fetches.random).is_empty() || !lock(&s.context.fetches.inflight).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the whole-object fetch did not end (rename {rename})");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let asked = s.pieces.asked.lock().unwrap().clone();
        let reads = [100 * 65536, 20 * 65536];
        let later = asked.iter().filter(|r| r.start >= first_batch * 65536 && !reads.contains(&r.start)).count();
        assert_eq!(later, 0, "segments were asked for after the handle closed (rename {rename}): {asked:?}");
        if let Some(disk) = disk {
            // The segments that were in flight landed whole and byte-exact, under the name they were fetched by
            // (the version's ETag keys them: nothing of another object can be read back as this one's).
            let etag = reader.object_id().etag;
            let old = Reader::new(&s.context, PATH.into(), etag, reader.plain_size, StoredFormat::Own, 0).unwrap();
            let found = on_disk(&disk, &old, 0..total);
            for (index, page) in found.iter().enumerate() {
                if let Some(page) = page {
                    assert!(page[..] == s.plain[index * 65536..(index + 1) * 65536], "page {index} (rename {rename})");
                }
            }
            let missing: Vec<usize> = (0..first_batch as usize).filter(|&i| found[i].is_none()).collect();
            assert!(missing.is_empty(), "pages of the segments in flight not kept: {missing:?} (rename {rename})");
            assert!(s.cached(&old).len() <= 2, "a fetch into the scratch filled the page cache (rename {rename})");
        }
    }
}

/// A read waiting on a whole fetch into the scratch whose segment is cut short (as the request's deadline cuts a body
/// when the disk under the scratch is too slow to take it) gets its bytes from a GET of its own, not an error; the
/// scratch keeps only the batches that landed whole, byte-exact, and the fetch ends.
#[tokio::test]
async fn a_read_waiting_on_a_whole_fetch_into_the_scratch_cut_short_fetches_its_page_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, reader, disk) = whole_fetch_setup_on_disk(tmp.path()).await;
    let segment = reader.segment_chunks();
    // The page read below lies in the first segment, in a batch that the cut leaves unfinished.
    let (cut_after_pages, page) = (DISK_BATCH_PAGES as u64 + 2, DISK_BATCH_PAGES as u64 + 4);
    assert!(segment > page + 1, "a segment of {segment} chunks does not hold page {page} and another batch");
    let at = 100 * 65536 + 10;
    assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
    // The store now holds its answers, and cuts the whole fetch's segments after 10 pages.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *s.pieces.gate.lock().unwrap() = Some(gate.clone());
    *s.pieces.shape.lock().unwrap() = Shape::SegmentsFailAfter((cut_after_pages * 65536) as usize);
    let read_at = |at: u64| spawn_read(&reader, at, 4096);
    // The second random read starts the whole fetch.
    let starter = read_at(200 * 65536);
    s.whole_fetch_asked(std::time::Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // A read of a page of that segment waits on it (it is in flight), then the store answers.
    let waiting = read_at(page * 65536 + 100);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !s.pieces.asked.lock().unwrap().iter().any(|r| r.start == page * 65536),
        "the read did not wait on the segment in flight"
    );
    gate.add_permits(1 << 20);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the read waiting on the cut segment never returned")
        .unwrap()
        .expect("the read waiting on the cut segment failed");
    assert!(got == s.plain[(page * 65536 + 100) as usize..(page * 65536 + 100 + 4096) as usize]);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), starter).await.unwrap().unwrap().unwrap();
    assert!(got == s.plain[200 * 65536..200 * 65536 + 4096]);
    let asked = s.pieces.asked.lock().unwrap().clone();
    assert!(asked.iter().any(|r| r.start == page * 65536 && r.end - r.start <= 65536), "no GET of its own: {asked:?}");
    // The fetch ended at the cut.
    while !lock(&s.context.fetches.random).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the whole-object fetch did not end");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The first batch of the first segment landed whole; nothing of the batch the cut left unfinished is kept, and
    // whatever is kept is byte-exact.
    let found = on_disk(&disk, &reader, 0..reader.page_count());
    for (index, p) in found.iter().enumerate() {
        if let Some(p) = p {
            assert!(p[..] == s.plain[index * 65536..(index + 1) * 65536], "page {index}");
        }
    }
    assert!(found[..DISK_BATCH_PAGES].iter().all(Option::is_some), "the batch before the cut was not kept");
    let cut = DISK_BATCH_PAGES..(2 * DISK_BATCH_PAGES).min(segment as usize);
    assert!(found[cut.clone()].iter().all(Option::is_none), "pages of the batch cut short were kept: {cut:?}");
}

/// A read that needs a chunk of a segment in flight goes on once the fetch has kept that chunk, not when it has kept
/// the whole segment: a segment is up to 8 MiB, streamed beside up to 7 others, and a random read during a whole
/// fetch waited for all of it.
#[tokio::test]
async fn a_read_waiting_on_a_segment_in_flight_goes_on_once_its_chunk_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, reader, disk) = whole_fetch_setup_on_disk(tmp.path()).await;
    let segment = reader.segment_chunks();
    // Every segment's body stalls after its first batch, which has the page read below.
    let (stall_after_pages, page) = (DISK_BATCH_PAGES as u64, 3);
    assert!(segment > stall_after_pages, "a segment of {segment} chunks does not stall part way");
    let at = 100 * 65536 + 10;
    assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
    *s.pieces.shape.lock().unwrap() = Shape::SegmentsStallAfter((stall_after_pages * 65536) as usize);
    let read_at = |at: u64| spawn_read(&reader, at, 4096);
    // The second random read starts the whole fetch.
    let starter = read_at(200 * 65536);
    s.whole_fetch_asked(std::time::Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The read of a page of the first batch returns while the segment is still stalled, from what the fetch kept.
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), read_at(page * 65536 + 100))
        .await
        .expect("the read waited for the whole segment, not for its chunk")
        .unwrap()
        .unwrap();
    assert!(got == s.plain[(page * 65536 + 100) as usize..(page * 65536 + 100 + 4096) as usize]);
    let asked = s.pieces.asked.lock().unwrap().clone();
    assert!(!asked.iter().any(|r| r.start == page * 65536), "the read asked the store itself: {asked:?}");
    let next = stall_after_pages;
    assert!(on_disk(&disk, &reader, next..next + 1)[0].is_none(), "the segment did not stall: the test shows nothing");
    // The store goes on; the starter gets its bytes, and the object is whole in the scratch, byte-exact.
    s.pieces.stall.add_permits(1 << 20);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), starter).await.unwrap().unwrap().unwrap();
    assert!(got == s.plain[200 * 65536..200 * 65536 + 4096]);
    while lock(&s.context.fetches.random).peek(&reader.object_id()) != Some(&FETCHED_WHOLE) {
        assert!(std::time::Instant::now() < deadline, "the whole-object fetch did not end whole");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let found = on_disk(&disk, &reader, 0..reader.page_count());
    for (index, p) in found.iter().enumerate() {
        assert!(p.as_deref() == Some(&s.plain[index * 65536..(index + 1) * 65536]), "page {index}");
    }
}

/// [`a_read_waiting_on_a_segment_in_flight_goes_on_once_its_chunk_is_kept`] for a fetch that keeps its chunks in
/// the page cache (an object small next to it), chunk by chunk.
#[tokio::test]
async fn a_read_waiting_on_a_segment_kept_in_memory_goes_on_once_its_chunk_is_there() {
    let (s, reader) = whole_fetch_setup().await;
    assert_eq!(reader.whole_object_plan(), Some(Keep::Memory));
    let segment = reader.segment_chunks();
    let (stall_after_pages, page) = (4, 3);
    assert!(segment > stall_after_pages, "a segment of {segment} chunks does not stall part way");
    let at = 100 * 65536 + 10;
    assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
    // The store holds its answers until the read below waits on the first segment (else the fetch could have put
    // that chunk in the cache before the read asks), then streams each segment's first 4 chunks and stalls.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *s.pieces.gate.lock().unwrap() = Some(gate.clone());
    *s.pieces.shape.lock().unwrap() = Shape::SegmentsStallAfter((stall_after_pages * 65536) as usize);
    let read_at = |at: u64| spawn_read(&reader, at, 4096);
    let starter = read_at(60 * 65536);
    s.whole_fetch_asked(std::time::Duration::from_secs(10)).await;
    let waiting = read_at(page * 65536 + 100);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!reader.cache.contains(&reader.object_id(), page), "the chunk came before the read waited for it");
    gate.add_permits(1 << 20);
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("the read waited for the whole segment, not for its chunk")
        .unwrap()
        .unwrap();
    assert!(got == s.plain[(page * 65536 + 100) as usize..(page * 65536 + 100 + 4096) as usize]);
    let asked = s.pieces.asked.lock().unwrap().clone();
    assert!(!asked.iter().any(|r| r.start == page * 65536), "the read asked the store itself: {asked:?}");
    let id = reader.object_id();
    assert!(!reader.cache.contains(&id, stall_after_pages), "the segment did not stall: the test shows nothing");
    s.pieces.stall.add_permits(1 << 20);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), starter).await.unwrap().unwrap().unwrap();
    assert!(got == s.plain[60 * 65536..60 * 65536 + 4096]);
}

/// During a whole-object fetch, a read of a chunk the fetch has not got to starts a segment of it at that chunk and
/// waits for that chunk only, instead of a GET of the chunk alone that the fetch would repeat; the fetch then
/// skips what those segments brought, and the object ends up whole on disk, byte-exact.
#[tokio::test]
async fn a_read_ahead_of_a_whole_fetch_starts_its_segment_at_the_chunk_it_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, reader, disk) = whole_fetch_setup_on_disk(tmp.path()).await;
    let (segment, total) = (reader.segment_chunks(), reader.page_count());
    let first_sent = reader.whole_in_flight(Keep::Disk, segment) as u64 * segment;
    assert!(first_sent <= 150, "the fetch's first segments ({first_sent} chunks) reach the chunks read below");
    let at = 100 * 65536 + 10;
    assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
    // Every segment stalls after its first batch: a read returns only if its chunk was in a first batch.
    *s.pieces.shape.lock().unwrap() = Shape::SegmentsStallAfter(DISK_BATCH_PAGES * 65536);
    // The second random read starts the whole fetch, and its own chunk (200) is past the fetch's first segments;
    // so are the next reads' (none following the one before, which would make it a sequential reader with a
    // read-ahead of its own): one of 4 chunks (170–173), and one near the end (230).
    for (page, chunks) in [(200, 1), (170, 4), (230, 1)] {
        let (at, len) = (page * 65536 + 7, (chunks - 1) * 65536 + 4096);
        let read = spawn_read(&reader, at, len as usize);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| panic!("the read of chunk {page} did not return"))
            .unwrap()
            .unwrap();
        assert!(got == s.plain[at as usize..(at + len) as usize], "chunk {page}");
        // Its segment is as long as the whole fetch's.
        let asked = s.pieces.asked.lock().unwrap().clone();
        let end = (page + segment).min(total) * 65536;
        assert!(asked.contains(&(page * 65536..end)), "no segment from chunk {page}: {asked:?}");
    }
    // A read of 10 chunks (150–159) starts its segment at 150, whose first batch holds 8 of them: it waits for the
    // other 2 in that segment too, rather than asking for them itself once its first chunk is kept.
    let (at, len) = (150 * 65536 + 7, 9 * 65536 + 4096);
    let across = spawn_read(&reader, at, len);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!across.is_finished(), "the read of chunks 150-159 returned while its last two were stalled");
    // The store goes on; once every fetch has ended, the object is whole in the scratch, byte-exact, and no chunk
    // was asked for twice by the fetches (the reads' own GETs aside).
    s.pieces.stall.add_permits(1 << 20);
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), across).await.unwrap().unwrap().unwrap();
    assert!(got == s.plain[at as usize..at as usize + len], "chunks 150-159");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.context.fetches.fetching_whole(&reader.object_id()) || !lock(&s.context.fetches.inflight).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the fetches did not end");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let found = on_disk(&disk, &reader, 0..total);
    for (index, p) in found.iter().enumerate() {
        assert!(p.as_deref() == Some(&s.plain[index * 65536..(index + 1) * 65536]), "page {index}");
    }
    // Every chunk asked for once, the reads' included (but the first read's, from before the whole fetch).
    let asked = s.pieces.asked.lock().unwrap().clone();
    let mut count = vec![0; total as usize];
    for r in asked.iter().filter(|r| r.start != 100 * 65536) {
        (r.start / 65536..r.end.div_ceil(65536)).for_each(|c| count[c as usize] += 1);
    }
    count[100] = 1;
    assert!(count.iter().all(|&n| n == 1), "chunks fetched twice or never: {asked:?}");
}

/// A store that does not answer for a whole deadline (frozen, dead): a read that waited that long on a segment it
/// started fails with the deadline's error (EIO) instead of a GET of its own, which would wait as long again; so
/// does one that came to the segment a moment after its GET left (within the tenth of slack). A read that came to
/// such a segment half a deadline later asks for its chunks itself, and so does one whose segment the store
/// answered before the deadline cut it, whether or not a batch of it was kept (a slow link or a hung body, not a
/// dead store).
#[tokio::test]
async fn a_read_that_waited_a_whole_deadline_on_an_unanswered_segment_does_not_ask_again() {
    let read_at = |reader: &Arc<Reader>, page: u64, chunks: u64| {
        spawn_read(reader, page * 65536 + 100, ((chunks - 1) * 65536 + 4096) as usize)
    };
    let batch = DISK_BATCH_PAGES as u64;
    // The second random read (of chunk 200) starts the whole fetch, then a segment at its own chunk, past the
    // fetch's first segments. Then another read: of chunk 5, in the fetch's first segment, at once or half a
    // deadline later; or of chunks from 150, which starts a segment at 150 at once. The chunks each GETs itself, if
    // any (the store answers GETs of up to 2 chunks); `None`: it fails as the starter does, asking for nothing.
    let answered_with = |kept: u64| Shape::SegmentsTimeOutAfter((kept * 65536) as usize);
    let cases = [
        (Shape::SegmentsUnanswered, None, (5, 1), true, Some(5..6)),
        (Shape::SegmentsUnanswered, None, (5, 1), false, None),
        (answered_with(0), Some(200..201), (150, 2), false, Some(150..152)),
        (answered_with(3), Some(200..201), (150, 2), false, Some(150..152)),
        (answered_with(batch), None, (150, 10), false, Some(150 + batch..160)),
    ];
    for (shape, starter_own, (page, chunks), late, joined_own) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (s, reader, _disk) = whole_fetch_setup_on_disk(tmp.path()).await;
        let segment = reader.segment_chunks();
        let first_sent = reader.whole_in_flight(Keep::Disk, segment) as u64 * segment;
        assert!(segment > batch + 2 && first_sent <= 150, "segments of {segment}, {first_sent} chunks sent first");
        let at = 100 * 65536 + 10;
        assert!(reader.read(at, 4096).await.unwrap() == s.plain[at as usize..at as usize + 4096]);
        let unanswered = matches!(shape, Shape::SegmentsUnanswered);
        *s.pieces.shape.lock().unwrap() = shape;
        let t0 = std::time::Instant::now();
        let starter = read_at(&reader, 200, 1);
        s.whole_fetch_asked(std::time::Duration::from_secs(10)).await;
        if late {
            tokio::time::sleep(DEADLINE / 2).await;
        }
        let joined = read_at(&reader, page, chunks);
        let starter = tokio::time::timeout(3 * DEADLINE, starter).await.expect("the starter hung").unwrap();
        let joined = tokio::time::timeout(3 * DEADLINE, joined).await.expect("the later read hung").unwrap();
        let asked = s.pieces.asked.lock().unwrap().clone();
        let own_gets = |own: Range<u64>| asked.contains(&(own.start * 65536..own.end * 65536));
        let single = |r: &Range<u64>| r.start == 200 * 65536 && r.end - r.start <= 65536;
        if unanswered {
            let err = starter.expect_err("the starter's segment was never answered");
            assert_eq!(err.errno(), libc::EIO, "{err:?}");
            assert!(format!("{err:?}").contains("TimedOut"), "{err:?}");
            assert!(t0.elapsed() >= DEADLINE, "the starter failed before its segment's deadline");
            assert!(!asked.iter().any(single), "the starter asked again after a whole deadline: {asked:?}");
        } else {
            let got = starter.unwrap_or_else(|e| panic!("the starter failed: {e:?}"));
            assert!(got == s.plain[200 * 65536 + 100..200 * 65536 + 4196]);
            match starter_own {
                Some(own) => assert!(own_gets(own), "the starter did not ask for its chunk itself: {asked:?}"),
                None => assert!(!asked.iter().any(single), "the starter asked for a kept chunk: {asked:?}"),
            }
        }
        let Some(own) = joined_own else {
            let err = joined.expect_err("a read that waited on the unanswered segment from its start");
            assert!(format!("{err:?}").contains("TimedOut"), "{err:?}");
            let own = page * 65536..(page + chunks) * 65536;
            assert!(!asked.iter().any(|r| r.start < own.end && own.start < r.end && r.end - r.start <= 2 * 65536),
                "the read of {page} asked again after waiting out the deadline: {asked:?}");
            continue;
        };
        let got = joined.unwrap_or_else(|e| panic!("the read of chunks from {page} failed: {e:?}"));
        let from = (page * 65536 + 100) as usize;
        assert!(got == s.plain[from..from + got.len()] && got.len() as u64 == (chunks - 1) * 65536 + 4096);
        assert!(own_gets(own.clone()), "the read of {page} did not ask for {own:?} itself: {asked:?}");
    }
}

/// A fetch ends unanswered for the reads waiting on it ([`FetchEnd`]) only when the store did not answer its GET
/// before the deadline: not when it answered and its body was cut, whether some chunks came or none, and whether the
/// fetch keeps its chunks in the page cache (`Reader::fetch_store`) or in the scratch (`Reader::fetch_to_disk`).
#[tokio::test]
async fn a_fetch_ends_unanswered_only_when_its_get_got_no_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, reader, _disk) = whole_fetch_setup_on_disk(tmp.path()).await;
    let mut first = 0;
    for keep in [Keep::Memory, Keep::Disk] {
        let cut_after = |chunks: usize| Shape::SegmentsTimeOutAfter(chunks * 65536);
        for (shape, unanswered) in [(Shape::SegmentsUnanswered, true), (cut_after(0), false), (cut_after(3), false)] {
            *s.pieces.shape.lock().unwrap() = shape;
            // 16 chunks no fetch before asked for.
            let free = |bytes| reader.cache.memory().try_reserve(bytes);
            let Started::Fetch(fetch) = reader.start_fetch(first..first + 16, keep, free, None) else {
                panic!("no fetch of chunks from {first} started")
            };
            let end = tokio::time::timeout(3 * DEADLINE, fetch).await.expect("the fetch hung");
            let ended_unanswered = matches!(end, FetchEnd::Unanswered(_));
            assert_eq!(ended_unanswered, unanswered, "{keep:?}, chunks from {first}, unanswered: {unanswered}");
            first += 16;
        }
    }
    // An encrypted object's first fetch reads its header from the body first: a body cut inside the header was
    // still answered.
    let s = setup_with(true, 40 * 65536, Arc::new(PageCache::new(8 << 20))).await;
    let reader = s.reader(Shape::SegmentsTimeOutAfter(10)).await;
    let free = |bytes| reader.cache.memory().try_reserve(bytes);
    let Started::Fetch(fetch) = reader.start_fetch(0..16, Keep::Memory, free, None) else { panic!("no fetch") };
    let end = tokio::time::timeout(3 * DEADLINE, fetch).await.expect("the fetch hung");
    assert!(matches!(end, FetchEnd::Done), "a body cut inside the header ended the fetch unanswered");
}

/// A disk cache for `s` in a new directory of `tmp`, bounded by `limit`: a cache directory, or else a scratch (an
/// unnamed file). Fetches of `s.context` keep pages there.
async fn with_disk(s: &mut Setup, tmp: &std::path::Path, dir: bool, limit: u64) -> Arc<DiskCache> {
    let base = tmp.join(if dir { "cache" } else { "run" });
    let disk = if dir {
        let root = zeroize::Zeroizing::new([7u8; 32]);
        let keying = crate::cache::disk::CacheKeying::Root(root);
        let memory = crate::memory::MemoryBudget::unlimited();
        DiskCache::open(&base, "s3://bucket/p", keying, Some(limit), &memory, AeadBackend::default()).await.unwrap()
    } else {
        let dir = crate::journal::dir::Dir::open_base(&base).unwrap();
        let memory = crate::memory::MemoryBudget::unlimited();
        let file = dir.unnamed_file().unwrap();
        DiskCache::scratch(file, dir.path(), "s3://bucket/p", Some(limit), &memory, AeadBackend::default())
    };
    let disk = Arc::new(disk);
    s.context.disk = Some(disk.clone());
    disk
}

/// Pages `run` of `reader`'s object as the disk cache holds them (`None` where it has none).
fn on_disk(disk: &DiskCache, reader: &Reader, run: Range<u64>) -> Vec<Option<Bytes>> {
    let id = reader.object_id();
    let pages: Vec<(EntryId, usize)> =
        run.map(|index| (EntryId { key: &id.key, etag: &id.etag, index }, reader.page_len(index))).collect();
    let mut found = vec![None; pages.len()];
    disk.get_many(&pages, |j, page| found[j] = Some(page));
    found
}

/// A fetch into the disk cache (a whole object larger than the page cache) opens its pages in one batch buffer,
/// reused, and seals them there: every page lands byte-exact, whatever the pieces of the body, across batch
/// boundaries, with a short last page, from chunk 0 (the header in the body) or from the middle (the header read on
/// its own first), in a scratch or a cache directory; none goes to the page cache. A disk cache that keeps nothing
/// makes the fetch answer `false`.
#[tokio::test]
async fn pages_fetched_into_the_disk_cache_are_byte_exact_across_batches() {
    let len = 21 * 65536 + 1234; // 22 pages: batches of 8, 8 and 6, the last page short
    for encrypted in [true, false] {
        for (dir, sizes) in [(false, &[1 << 20][..]), (false, &[7, 13, 4096]), (true, &[65564, 100_000])] {
            for run in [0..22, 3..17] {
                let tmp = tempfile::tempdir().unwrap();
                let mut s = setup_with(encrypted, len, Arc::new(PageCache::new(8 << 20))).await;
                let disk = with_disk(&mut s, tmp.path(), dir, 64 << 20).await;
                let reader = s.reader(Shape::Sizes(sizes)).await;
                assert_eq!(reader.page_count(), 22);
                let what = format!("encrypted {encrypted}, cache dir {dir}, pieces {sizes:?}, run {run:?}");
                assert!(reader.fetch_to_disk(run.clone(), &progress()).await.unwrap(), "not kept: {what}");
                let found = on_disk(&disk, &reader, 0..22);
                for (index, page) in found.into_iter().enumerate() {
                    let want = &s.plain[index * 65536..((index + 1) * 65536).min(len)];
                    match page {
                        Some(page) => assert!(page == want, "page {index}, {what}"),
                        None => assert!(!run.contains(&(index as u64)), "page {index} missing, {what}"),
                    }
                }
                assert!(s.cached(&reader).is_empty(), "pages fetched into the disk cache went to the page cache");
            }
        }
        // What such a fetch reserves from the memory budget: one batch, whatever its length — unless the store hands
        // the body over whole.
        let s = setup_with(encrypted, len, Arc::new(PageCache::new(8 << 20))).await;
        let reader = s.reader(Shape::Sizes(&[1 << 20])).await;
        assert_eq!(reader.fetch_cost_for(Keep::Disk, 128), fetch_cost(DISK_BATCH_PAGES as u64));
        assert_eq!(reader.fetch_cost_for(Keep::Memory, 128), fetch_cost(128));
        s.pieces.streams.store(false, Ordering::Relaxed);
        assert_eq!(reader.fetch_cost_for(Keep::Disk, 128), fetch_cost(128), "a body held whole, reserved as one");
        // A scratch too small for one entry keeps nothing.
        let tmp = tempfile::tempdir().unwrap();
        let mut s = setup_with(encrypted, len, Arc::new(PageCache::new(8 << 20))).await;
        let disk = with_disk(&mut s, tmp.path(), false, 1000).await;
        let reader = s.reader(Shape::Sizes(&[1 << 20])).await;
        let kept = reader.fetch_to_disk(0..22, &progress()).await.unwrap();
        assert!(!kept, "a disk cache that kept nothing counted as kept");
        assert!(on_disk(&disk, &reader, 0..22).iter().all(Option::is_none));
    }
}

/// A fetch into the disk cache whose body fails, or whose chunk 9 was tampered with, in the second batch: the fetch is
/// an error, the batch opened whole before it stays (it authenticated), nothing of the batch it cut short is kept.
#[tokio::test]
async fn a_fetch_into_the_disk_cache_cut_short_keeps_only_whole_batches() {
    let (header, chunk) = (crate::crypto::HEADER_LEN as usize, 65536 + 28);
    for tamper in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = setup_with(true, 21 * 65536 + 1234, Arc::new(PageCache::new(8 << 20))).await;
        let disk = with_disk(&mut s, tmp.path(), false, 64 << 20).await;
        let shape = if tamper {
            let mut tampered = s.stored.clone();
            tampered[header + 9 * chunk + 12 + 300] ^= 1;
            let key = ObjectKey::new(PATH).unwrap();
            let meta = s.pieces.head(&key).await.unwrap().1;
            s.pieces.put_expect(&key, Bytes::from(tampered), &meta, &Expect::Any).await.unwrap();
            Shape::Sizes(&[5000, 3])
        } else {
            // The header and 10 whole chunks, then a failed piece.
            Shape::FailsAfter(header + 10 * chunk)
        };
        let reader = s.reader(shape).await;
        let err = reader.fetch_to_disk(0..reader.page_count(), &progress()).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err:?}");
        if tamper {
            assert!(format!("{err:?}").contains("AuthenticationFailed { chunk: 9 }"), "{err:?}");
        }
        let found = on_disk(&disk, &reader, 0..reader.page_count());
        let kept: Vec<u64> = (0..found.len() as u64).filter(|&i| found[i as usize].is_some()).collect();
        assert_eq!(kept, (0..DISK_BATCH_PAGES as u64).collect::<Vec<_>>(), "pages kept, tampered {tamper}");
        for (index, page) in found.iter().enumerate().take(DISK_BATCH_PAGES) {
            let want = &s.plain[index * 65536..(index + 1) * 65536];
            assert!(page.as_deref() == Some(want), "page {index}, tampered {tamper}");
        }
    }
}
