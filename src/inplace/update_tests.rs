use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::cache::PageCache;
use crate::crypto::format::{FORMAT_VERSION_2, FORMAT_VERSION_3};
use crate::crypto::version::VersionMap;
use crate::crypto::{AeadBackend, Key256, KeyHistory};
use crate::object::{Codec, StoredFormat};
use crate::read::s3ec::S3ecReads;
use crate::read::{ReadContext, Reader};
use crate::store::{Listing, ObjectStoreBackend, Upload};
use crate::upload::Memory;

const MIB: u64 = 1 << 20;
const PATH: &str = "big";

/// Counts the bytes the store sends (GET bodies) and receives (parts), and the parts it copies itself.
#[derive(Default)]
struct Counts {
    down: AtomicU64,
    up: AtomicU64,
    copies: AtomicU64,
}

struct Counting {
    inner: Arc<dyn Backend>,
    counts: Arc<Counts>,
    /// While set, an update's requests wait at it.
    gate: Mutex<Option<Arc<Gate>>>,
    /// While set, an update's copies panic.
    panic_copies: AtomicBool,
    /// While set, uploads say they cannot copy parts (as on SSE-C, GCS, Azure).
    no_copies: AtomicBool,
}

impl Counting {
    fn gate(&self) -> Option<Arc<Gate>> {
        self.gate.lock().unwrap().clone()
    }
}

struct CountingUpload {
    inner: Box<dyn Upload>,
    counts: Arc<Counts>,
    gate: Option<Arc<Gate>>,
    panic_copies: bool,
    no_copies: bool,
}

/// Holds an update's parts until a whole round of them travels at once: `copies` copies and the uploaded part
/// running. The fetch of the uploaded part's old bytes waits until the `before_upload` copies asked before it
/// run. An update that sends fewer at once, or only sends its copies once the upload is built, never gets past it.
struct Gate {
    before_upload: u64,
    copies: u64,
    running: AtomicU64,
    upload: AtomicBool,
}

impl Gate {
    async fn until(&self, ready: impl Fn(&Gate) -> bool) {
        while !ready(self) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn round_in_flight(&self) -> bool {
        self.running.load(Ordering::SeqCst) >= self.copies && self.upload.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Upload for CountingUpload {
    fn copies_parts(&self) -> bool {
        !self.no_copies && self.inner.copies_parts()
    }
    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        self.counts.up.fetch_add(part.len() as u64, Ordering::Relaxed);
        let (gate, sent) = (self.gate.clone(), self.inner.put_part(part));
        Box::pin(async move {
            if let Some(g) = gate {
                g.upload.store(true, Ordering::SeqCst);
                g.until(Gate::round_in_flight).await;
            }
            sent.await
        })
    }
    fn copy_part(&mut self, range: Range<u64>, etag: &str) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        if self.no_copies {
            let operation = "copying a part (the test store's uploads cannot)".into();
            return Box::pin(futures::future::ready(Err(StoreError::Unsupported { operation })));
        }
        self.counts.copies.fetch_add(1, Ordering::Relaxed);
        let (gate, sent) = (self.gate.clone(), self.inner.copy_part(range, etag));
        let panics = self.panic_copies;
        Box::pin(async move {
            assert!(!panics, "a copy's task panics (test)");
            if let Some(g) = gate {
                g.running.fetch_add(1, Ordering::SeqCst);
                g.until(Gate::round_in_flight).await;
            }
            sent.await
        })
    }
    async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        self.inner.complete().await
    }
    async fn abort(self: Box<Self>) -> Result<(), StoreError> {
        self.inner.abort().await
    }
}

#[async_trait]
impl Backend for Counting {
    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        self.inner.head(key).await
    }
    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        if let Some(g) = self.gate() {
            g.until(|g| g.running.load(Ordering::SeqCst) >= g.before_upload).await;
        }
        let r = self.inner.get_range(key, range).await?;
        self.counts.down.fetch_add(r.0.len() as u64, Ordering::Relaxed);
        Ok(r)
    }
    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let r = self.inner.get(key).await?;
        self.counts.down.fetch_add(r.0.len() as u64, Ordering::Relaxed);
        Ok(r)
    }
    async fn put_expect(&self, key: &ObjectKey, body: Bytes, meta: &UserMeta, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        self.counts.up.fetch_add(body.len() as u64, Ordering::Relaxed);
        self.inner.put_expect(key, body, meta, expect).await
    }
    async fn put_multipart_expect(&self, key: &ObjectKey, meta: &UserMeta, expect: &Expect) -> Result<Box<dyn Upload>, StoreError> {
        let inner = self.inner.put_multipart_expect(key, meta, expect).await?;
        let panic_copies = self.panic_copies.load(Ordering::SeqCst);
        let no_copies = self.no_copies.load(Ordering::SeqCst);
        let counts = Arc::clone(&self.counts);
        Ok(Box::new(CountingUpload { inner, counts, gate: self.gate(), panic_copies, no_copies }))
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

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(0x9e37_79b9).to_be_bytes()[5]).collect()
}

struct World {
    store: Arc<Counting>,
    counts: Arc<Counts>,
    codec: Codec,
    layout: Layout,
    keys: Arc<KeyHistory>,
    /// The format version `put_whole` writes when encrypted: 2 (with a one-run map) or 3 (no map).
    version: u16,
}

impl World {
    fn new(encrypted: bool) -> World {
        World::over(Arc::new(ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap()), encrypted)
    }

    fn over(inner: Arc<dyn Backend>, encrypted: bool) -> World {
        let counts = Arc::new(Counts::default());
        let keys = Arc::new(KeyHistory::single(Key256::generate()));
        let codec = if encrypted {
            Codec::Cse { keys: Some(keys.clone()), kms: None, aead: AeadBackend::default(), format: crate::config::FileFormat::Own }
        } else {
            Codec::Plain
        };
        let layout = if encrypted { Layout::Encrypted } else { Layout::Plain };
        let (gate, panic_copies, no_copies) = (Mutex::default(), AtomicBool::default(), AtomicBool::default());
        let store = Arc::new(Counting { inner, counts: counts.clone(), gate, panic_copies, no_copies });
        World { store, counts, codec, layout, keys, version: FORMAT_VERSION_2 }
    }

    /// An encrypted world whose base objects are format version 3 without a map, as whole and streamed uploads
    /// write them now.
    fn v3() -> World {
        World { version: FORMAT_VERSION_3, ..World::new(true) }
    }

    /// Stores `plain` whole (format version `self.version` when encrypted); returns its ETag.
    async fn put_whole(&self, plain: &[u8]) -> String {
        let mut meta = UserMeta::default();
        let body = match self.layout {
            Layout::Plain => plain.to_vec(),
            Layout::Encrypted if self.version == FORMAT_VERSION_3 => {
                let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_3, &self.keys, AeadBackend::default());
                let len = plain.len() as u64;
                let mut out = header.to_vec();
                for i in 0..crypto::chunk_count(len) {
                    let r = crypto::chunk_plain_range(i, len);
                    cipher.seal_chunk_as_mapped(i, crypto::is_last_chunk(i, len), &plain[r.start as usize..r.end as usize], &mut out);
                }
                meta.extra.insert(BIND_META.to_string(), cipher.binding(PATH));
                out
            }
            Layout::Encrypted => {
                let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_2, &self.keys, AeadBackend::default());
                let len = plain.len() as u64;
                let map = VersionMap::whole(len, VersionId::random());
                let mut out = header.to_vec();
                for i in 0..crypto::chunk_count(len) {
                    let r = crypto::chunk_plain_range(i, len);
                    let v = map.version_of(i).unwrap();
                    cipher.seal_chunk_in(&v, i, crypto::is_last_chunk(i, len), &plain[r.start as usize..r.end as usize], &mut out);
                }
                meta.extra.insert(MAP_META.to_string(), cipher.seal_map(&map));
                meta.extra.insert(BIND_META.to_string(), cipher.binding(PATH));
                out
            }
        };
        let info = self.store.inner.put_expect(&ObjectKey::new(PATH).unwrap(), Bytes::from(body), &meta, &Expect::Any).await.unwrap();
        info.etag.unwrap()
    }

    /// The old object's cipher with its map attached, as a writer opening it would have it.
    /// A 40 MiB file put whole, and its content with one byte changed (in chunk 16): (the base's ETag, its cipher,
    /// the changed content).
    async fn one_byte_changed(&self) -> (String, Option<ObjectCipher>, Vec<u8>) {
        let mut content = pattern(40 * MIB as usize);
        let etag = self.put_whole(&content).await;
        let cipher = self.base_cipher(content.len() as u64).await;
        content[1 << 20] ^= 1;
        (etag, cipher, content)
    }

    async fn base_cipher(&self, plain_len: u64) -> Option<ObjectCipher> {
        let Layout::Encrypted = self.layout else { return None };
        let (header, _, meta) = self.store.inner.get_range(&ObjectKey::new(PATH).unwrap(), 0..512).await.unwrap();
        let mut c = ObjectCipher::open(&header, &self.keys, AeadBackend::default()).unwrap();
        c.attach_map(meta.extra.get(MAP_META).map(String::as_str), plain_len).unwrap();
        Some(c)
    }

    /// The whole file as the read path sees it now.
    async fn read_back(&self) -> Vec<u8> {
        let context = ReadContext {
            backend: Arc::new(Counting {
                inner: self.store.inner.clone(),
                counts: Arc::default(),
                gate: Mutex::default(),
                panic_copies: AtomicBool::default(),
                no_copies: AtomicBool::default(),
            }),
            codec: self.codec.clone(),
            cache: Arc::new(PageCache::new(64 * MIB)),
            s3ec: Arc::new(S3ecReads::new(Default::default())),
            fetches: Arc::default(),
            disk: None,
        };
        let (info, _) = self.store.inner.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
        let reader = Reader::new(&context, PATH.into(), info.etag.unwrap(), info.size, StoredFormat::Own, 8 * MIB).unwrap();
        let mut out = Vec::new();
        loop {
            let piece = reader.read(out.len() as u64, 4 << 20).await.unwrap();
            if piece.is_empty() {
                break out;
            }
            out.extend_from_slice(&piece);
        }
    }

    fn take_counts(&self) -> (u64, u64, u64) {
        (
            self.counts.down.swap(0, Ordering::Relaxed),
            self.counts.up.swap(0, Ordering::Relaxed),
            self.counts.copies.swap(0, Ordering::Relaxed),
        )
    }
}

/// Applies `change` to the model, updates the object in place with the chunks it touched, and checks the content
/// and what moved.
async fn change(w: &World, model: &mut Vec<u8>, etag: &str, edit: impl FnOnce(&mut Vec<u8>) -> Vec<Range<u64>>) -> String {
    let old_len = model.len() as u64;
    let dirty = edit(model);
    let cipher = w.base_cipher(old_len).await;
    let base = Base { etag, plain_len: old_len, cipher: cipher.as_ref() };
    w.take_counts();
    let info = update(&*w.store, w.layout, PATH, &base, &Memory(model), model.len() as u64, &dirty, UserMeta::default())
        .await
        .unwrap()
        .unwrap();
    let (down, up, copies) = w.take_counts();
    // The bound; a one-chunk change measures 5 MiB each way (one minimum part), an append or a shrink
    // about the bytes it adds.
    assert!(down <= 16 * MIB && up <= 16 * MIB, "{:?}: {down} bytes fetched, {up} sent", w.layout);
    if dirty.len() == 1 && dirty[0].end - dirty[0].start == 1 && old_len == model.len() as u64 {
        assert_eq!(up, MIN_PART_LEN, "{:?}: one changed chunk is one minimum part", w.layout);
    }
    assert!(copies >= 1, "untouched ranges are copied in the store");
    assert!(w.read_back().await == *model, "{:?}: the new version reads as the model", w.layout);
    info.etag.unwrap()
}

fn chunk_of(offset: u64) -> Range<u64> {
    offset / CHUNK_PLAIN_LEN..offset / CHUNK_PLAIN_LEN + 1
}

#[tokio::test]
async fn a_byte_an_append_and_a_shrink_of_a_64_mib_file_move_little_and_read_back_exact() {
    for w in [World::v3(), World::new(true), World::new(false)] {
        let mut model = pattern(64 * MIB as usize + 12_345);
        let mut etag = w.put_whole(&model).await;
        // One byte in the middle, then one across two chunks near the start, then an append, then a shrink.
        etag = change(&w, &mut model, &etag, |m| {
            m[40 << 20] ^= 0xff;
            vec![chunk_of(40 << 20)]
        })
        .await;
        etag = change(&w, &mut model, &etag, |m| {
            let at = (3 << 16) - 2;
            m[at..at + 4].copy_from_slice(b"XYZW");
            vec![chunk_of(at as u64), chunk_of(at as u64 + 3)]
        })
        .await;
        etag = change(&w, &mut model, &etag, |m| {
            let at = m.len() as u64;
            m.extend_from_slice(&[7u8; 100_000]);
            vec![chunk_of(at).start..chunk_of(at + 99_999).end]
        })
        .await;
        change(&w, &mut model, &etag, |m| {
            m.truncate(50 * MIB as usize + 3);
            vec![]
        })
        .await;
        // The map carries one run per change at most; the version ids keep older chunks out (crypto tests).
    }
}

#[tokio::test]
async fn the_copies_travel_while_the_upload_is_built_and_beside_it() {
    for w in [World::v3(), World::new(false)] {
        let mut model = pattern(64 * MIB as usize);
        let etag = w.put_whole(&model).await;
        let at = 32 << 20;
        let dirty = vec![chunk_of(at as u64)];
        let len = model.len() as u64;
        let p = plan(w.layout, len, len, &dirty).unwrap();
        let is_copy = |p: &&Part| matches!(p, Part::Copy(_));
        let copies = p.parts.iter().filter(is_copy).count() as u64;
        let before_upload = p.parts.iter().take_while(is_copy).count() as u64;
        assert_eq!(copies, PARTS_IN_FLIGHT as u64, "{:?}", p.parts);
        assert!(before_upload >= 1 && before_upload < copies, "{:?}", p.parts);
        let gate = Gate { before_upload, copies, running: AtomicU64::new(0), upload: AtomicBool::new(false) };
        *w.store.gate.lock().unwrap() = Some(Arc::new(gate));
        let changed = tokio::time::timeout(
            Duration::from_secs(30),
            change(&w, &mut model, &etag, |m| {
                m[at] ^= 0xff;
                dirty.clone()
            }),
        )
        .await;
        *w.store.gate.lock().unwrap() = None;
        let layout = w.layout;
        changed.unwrap_or_else(|_| panic!("{layout:?}: the copies and the upload were never in flight at once"));
    }
}

#[tokio::test]
async fn an_update_of_a_version_another_writer_replaced_fails_and_changes_nothing() {
    for encrypted in [true, false] {
        let w = World::new(encrypted);
        let (etag, cipher, mine) = w.one_byte_changed().await;
        let theirs = w.put_whole(&pattern(40 * MIB as usize + 1)).await;
        let base = Base { etag: &etag, plain_len: mine.len() as u64, cipher: cipher.as_ref() };
        let result = update(&*w.store, w.layout, PATH, &base, &Memory(&mine), mine.len() as u64, &[16..17], UserMeta::default()).await;
        assert!(result.as_ref().is_err_and(|e| e.is_precondition()), "{:?}", result.map(|r| r.is_ok()));
        let (info, _) = w.store.inner.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
        assert_eq!(info.etag.as_deref(), Some(theirs.as_str()), "the other writer's version stays");
    }
}

#[tokio::test]
async fn a_part_task_that_panics_ends_the_update_with_an_error_and_changes_nothing() {
    for encrypted in [true, false] {
        let w = World::new(encrypted);
        let (etag, cipher, mine) = w.one_byte_changed().await;
        let base = Base { etag: &etag, plain_len: mine.len() as u64, cipher: cipher.as_ref() };
        w.store.panic_copies.store(true, Ordering::SeqCst);
        let (len, dirty) = (mine.len() as u64, [16..17]);
        let result = update(&*w.store, w.layout, PATH, &base, &Memory(&mine), len, &dirty, UserMeta::default()).await;
        assert!(result.is_err(), "{:?}", result.map(|r| r.is_ok()));
        let (info, _) = w.store.inner.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
        assert_eq!(info.etag.as_deref(), Some(etag.as_str()), "the old version stays");
    }
}

/// A store whose uploads cannot copy parts (SSE-C, GCS, Azure) says so when the update's upload is made: the update
/// falls back before it fetches or sends a byte of a part, and the old version stays.
#[tokio::test]
async fn a_store_that_cannot_copy_parts_is_given_up_before_anything_moves() {
    for encrypted in [true, false] {
        let w = World::new(encrypted);
        let (etag, cipher, mine) = w.one_byte_changed().await;
        let base = Base { etag: &etag, plain_len: mine.len() as u64, cipher: cipher.as_ref() };
        w.store.no_copies.store(true, Ordering::SeqCst);
        let moved = || (w.counts.down.load(Ordering::SeqCst), w.counts.up.load(Ordering::SeqCst));
        let before = moved();
        let (len, dirty) = (mine.len() as u64, [16..17]);
        let r = update(&*w.store, w.layout, PATH, &base, &Memory(&mine), len, &dirty, UserMeta::default()).await;
        assert!(matches!(r, Ok(Err(Fallback::CopyUnsupported))), "encrypted {encrypted}");
        assert_eq!(moved(), before, "bytes moved for an update the store cannot copy parts for");
        let (info, _) = w.store.inner.head(&ObjectKey::new(PATH).unwrap()).await.unwrap();
        assert_eq!(info.etag.as_deref(), Some(etag.as_str()), "the old version stays");
    }
}

#[tokio::test]
async fn what_cannot_be_done_in_place_falls_back_before_anything_is_visible() {
    let w = World::new(true);
    let small = pattern(9 * MIB as usize);
    let etag = w.put_whole(&small).await;
    let cipher = w.base_cipher(small.len() as u64).await;
    let base = Base { etag: &etag, plain_len: small.len() as u64, cipher: cipher.as_ref() };
    let r = update(&*w.store, w.layout, PATH, &base, &Memory(&small), small.len() as u64, &[1..2], UserMeta::default()).await.unwrap();
    assert!(matches!(r, Err(Fallback::NoPlan(NoPlan::TooSmall))));
    // A version-1 object: its chunks carry no version, so they cannot be mixed with new ones.
    let big = pattern(40 * MIB as usize);
    let v1 = crate::crypto::encrypt_object(&w.keys, AeadBackend::default(), &big);
    let info = w.store.inner.put_expect(&ObjectKey::new(PATH).unwrap(), Bytes::from(v1), &UserMeta::default(), &Expect::Any).await.unwrap();
    let etag = info.etag.unwrap();
    let (header, _, _) = w.store.inner.get_range(&ObjectKey::new(PATH).unwrap(), 0..512).await.unwrap();
    let c1 = ObjectCipher::open(&header, &w.keys, AeadBackend::default()).unwrap();
    let base = Base { etag: &etag, plain_len: big.len() as u64, cipher: Some(&c1) };
    let r = update(&*w.store, w.layout, PATH, &base, &Memory(&big), big.len() as u64, &[1..2], UserMeta::default()).await.unwrap();
    assert!(matches!(r, Err(Fallback::FormatVersion1)));
    assert_eq!(w.store.inner.head(&ObjectKey::new(PATH).unwrap()).await.unwrap().0.etag, Some(etag));
}

/// The same changes against the S3 server: copies are UploadPartCopy with `x-amz-copy-source-if-match`, the parts
/// S3's size rules, the completion conditional on the old ETag.
#[tokio::test]
async fn in_place_updates_on_s3() {
    let endpoint = std::env::var("S3CRYPTFS_TEST_S3_ENDPOINT")
        .expect("S3CRYPTFS_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts the S3 server");
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
    let bucket = format!("in-place-{}-{nanos}", std::process::id());
    let status = std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-X", "PUT", &format!("{endpoint}/{bucket}")])
        .status()
        .expect("curl");
    assert!(status.success(), "could not create bucket {bucket} at {endpoint}");
    let opts = crate::store::S3Options {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        allow_http: true,
        ..Default::default()
    };
    for encrypted in [true, false] {
        let (backend, _) = crate::store::from_url(&format!("s3://{bucket}/{encrypted}"), &opts).unwrap();
        let w = World::over(backend, encrypted);
        let mut model = pattern(40 * MIB as usize + 999);
        let etag = w.put_whole(&model).await;
        let etag = change(&w, &mut model, &etag, |m| {
            m[20 << 20] ^= 0x01;
            vec![chunk_of(20 << 20)]
        })
        .await;
        change(&w, &mut model, &etag, |m| {
            let at = m.len() as u64;
            m.extend_from_slice(b"appended");
            vec![chunk_of(at)]
        })
        .await;
    }
}
