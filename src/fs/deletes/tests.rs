//! Write-behind deletes over an in-memory store whose deletes can be held back, as a slow store holds them: what the
//! layer answers meanwhile, what waits for them, and how a burst is sent.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::store::ObjectStoreBackend;

/// An in-memory store whose deletes wait while `held` is set, and which logs the deletes it answers.
struct Gated {
    inner: ObjectStoreBackend,
    held: tokio::sync::watch::Sender<bool>,
    /// Whether `delete_if` checks its condition (S3) or not (LocalStack).
    conditional: bool,
    log: std::sync::Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Deletes land, and their answer is lost (a timeout).
    lose_answers: AtomicBool,
    /// Deletes time out without landing.
    drop_deletes: AtomicBool,
}

impl Gated {
    fn new(conditional: bool) -> Arc<Gated> {
        let inner = ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap();
        Arc::new(Gated {
            inner,
            held: tokio::sync::watch::channel(false).0,
            conditional,
            log: Default::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            lose_answers: AtomicBool::new(false),
            drop_deletes: AtomicBool::new(false),
        })
    }

    async fn gate(&self, what: String) {
        self.log.lock().unwrap().push(what);
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(n, Ordering::SeqCst);
        let mut rx = self.held.subscribe();
        let _ = rx.wait_for(|held| !held).await;
        // Let the other deletes of a burst arrive before this one finishes, as they would at a real store.
        tokio::task::yield_now().await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

#[async_trait]
impl Backend for Gated {
    fn copies_parts(&self) -> bool {
        self.inner.copies_parts()
    }

    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        self.inner.head(key).await
    }
    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.inner.get_range(key, range).await
    }
    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.inner.get(key).await
    }
    async fn put_expect(&self, key: &ObjectKey, body: Bytes, meta: &UserMeta, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        self.inner.put_expect(key, body, meta, expect).await
    }
    async fn put_multipart_expect(&self, key: &ObjectKey, meta: &UserMeta, expect: &Expect) -> Result<Box<dyn Upload>, StoreError> {
        self.inner.put_multipart_expect(key, meta, expect).await
    }
    async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
        self.inner.copy(from, to, meta).await
    }
    async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
        self.inner.update_meta(key, meta).await
    }
    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.gate(format!("delete {key}")).await;
        self.inner.delete(key).await?;
        if self.lose_answers.load(Ordering::SeqCst) {
            let after = Duration::from_secs(3);
            return Err(StoreError::TimedOut { key: key.to_string(), after, detail: "test".into() });
        }
        Ok(())
    }
    async fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        self.gate(format!("delete_if {key}")).await;
        if self.drop_deletes.load(Ordering::SeqCst) {
            let after = Duration::from_secs(3);
            return Err(StoreError::TimedOut { key: key.to_string(), after, detail: "test".into() });
        }
        if !self.conditional {
            return self.inner.delete(key).await;
        }
        match self.inner.head(key).await {
            Ok((info, _)) if info.etag.as_deref() == Some(etag) => self.inner.delete(key).await,
            Ok(_) => Err(StoreError::Precondition { key: key.to_string() }),
            Err(e) => Err(e),
        }
    }
    async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        self.gate(format!("delete_many {}", keys.len())).await;
        self.inner.delete_many(keys).await
    }
    fn deletes_are_conditional(&self) -> bool {
        self.conditional
    }
    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
        self.inner.list(dir, recursive).await
    }
    async fn check_access(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn k(s: &str) -> ObjectKey {
    ObjectKey::new(s).unwrap()
}

async fn put(store: &Gated, key: &str, body: &'static [u8]) -> String {
    store.inner.put(&k(key), Bytes::from_static(body), &UserMeta::default()).await.unwrap().etag.unwrap()
}

/// Whether `f` is still waiting after the other tasks had time to run.
async fn still_waiting<T>(f: &mut (impl std::future::Future<Output = T> + Unpin)) -> bool {
    tokio::time::timeout(Duration::from_millis(50), f).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_delete_reads_as_done_and_a_listing_waits_for_it() {
    let store = Gated::new(true);
    let etag = put(&store, "d/a", b"a").await;
    put(&store, "d/b", b"b").await;
    put(&store, "e/c", b"c").await;
    let layer = LaterDeletes::new(store.clone());
    store.held.send_replace(true);
    layer.delete_later(&k("d/a"), Some(etag), None);

    assert!(layer.head(&k("d/a")).await.unwrap_err().is_not_found());
    assert!(layer.get(&k("d/a")).await.unwrap_err().is_not_found());
    assert!(layer.copy(&k("d/a"), &k("d/z"), None).await.unwrap_err().is_not_found());
    assert!(store.inner.head(&k("d/a")).await.is_ok(), "held: not deleted yet");
    // Another directory does not wait.
    assert_eq!(layer.list("e/", false).await.unwrap().objects.len(), 1);
    let mut listing = Box::pin(layer.list("d/", false));
    assert!(still_waiting(&mut listing).await, "the listing of d/ must wait for the delete under it");
    let mut root = Box::pin(layer.has_children(""));
    assert!(still_waiting(&mut root).await);
    assert_eq!(layer.pending(), 1);

    store.held.send_replace(false);
    let names: Vec<String> = listing.await.unwrap().objects.iter().map(|o| o.key.to_string()).collect();
    assert_eq!(names, ["d/b"]);
    assert!(root.await.unwrap());
    assert_eq!(layer.pending(), 0);
    assert!(store.inner.head(&k("d/a")).await.unwrap_err().is_not_found());
}

/// The ordering promise: a write of a key whose delete is pending waits for the delete, so the delete can never land
/// after the new object and remove it (an unconditional delete would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_a_key_being_deleted_lands_after_the_delete() {
    for conditional in [true, false] {
        let store = Gated::new(conditional);
        let etag = put(&store, "f", b"old").await;
        put(&store, "g", b"source").await;
        let layer = Arc::new(LaterDeletes::new(store.clone()));
        for (i, write) in ["put", "copy", "multipart"].into_iter().enumerate() {
            store.held.send_replace(true);
            layer.delete_later(&k("f"), Some(etag.clone()).filter(|_| i == 0), None);
            let l = layer.clone();
            let mut w = Box::pin(async move {
                match write {
                    "put" => l.put(&k("f"), Bytes::from_static(b"new"), &UserMeta::default()).await.map(|_| ()),
                    "copy" => l.copy(&k("g"), &k("f"), None).await,
                    _ => {
                        let mut up = l.put_multipart(&k("f"), &UserMeta::default()).await?;
                        up.put_part(Bytes::from_static(b"new")).await?;
                        up.complete().await.map(|_| ())
                    }
                }
            });
            assert!(still_waiting(&mut w).await, "{write}: must wait for the delete");
            store.held.send_replace(false);
            w.await.unwrap();
            let (body, _, _) = store.inner.get(&k("f")).await.unwrap();
            assert!(body == "new" || body == "source", "{write}, conditional {conditional}: the new object survives");
        }
    }
}

/// A delete whose answer was lost keeps its intent (the caller is told nothing), until a write of the same key lands:
/// then the object is that write's version, and the intent, which a next start would send, is settled. A write that
/// fails settles nothing, nor does a write of another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_the_key_settles_a_delete_whose_answer_was_lost() {
    let store = Gated::new(false);
    store.lose_answers.store(true, Ordering::SeqCst);
    put(&store, "g", b"source").await;
    let layer = Arc::new(LaterDeletes::new(store.clone()));
    for write in ["put", "copy", "multipart", "update_meta"] {
        put(&store, "f", b"old").await;
        let (tx, rx) = std::sync::mpsc::channel();
        layer.delete_later(&k("f"), None, Some(Box::new(move |settled| tx.send(settled).unwrap())));
        layer.settle_key(&k("f")).await;
        assert!(store.inner.head(&k("f")).await.unwrap_err().is_not_found(), "{write}: the delete landed");
        assert!(rx.try_recv().is_err(), "{write}: unanswered, the intent stays");
        let expect = Expect::Etag("\"no\"".into());
        let refused = layer.put_expect(&k("f"), Bytes::from_static(b"x"), &UserMeta::default(), &expect).await;
        assert!(refused.is_err(), "{write}: nothing there to match");
        layer.put(&k("other"), Bytes::from_static(b"x"), &UserMeta::default()).await.unwrap();
        assert!(rx.try_recv().is_err(), "{write}: a failed write, or one of another key, settles nothing");
        match write {
            "put" => layer.put(&k("f"), Bytes::from_static(b"new"), &UserMeta::default()).await.map(|_| ()).unwrap(),
            "copy" => layer.copy(&k("g"), &k("f"), None).await.unwrap(),
            "multipart" => {
                let mut up = layer.put_multipart(&k("f"), &UserMeta::default()).await.unwrap();
                up.put_part(Bytes::from_static(b"new")).await.unwrap();
                up.complete().await.unwrap();
            }
            _ => {
                store.inner.put(&k("f"), Bytes::from_static(b"theirs"), &UserMeta::default()).await.unwrap();
                layer.update_meta(&k("f"), &UserMeta { mode: Some(0o100600), ..Default::default() }).await.unwrap();
            }
        }
        assert_eq!(rx.try_recv(), Ok(true), "{write}: written again, the intent is settled");
    }
}

/// A delete the store neither carried out nor answered: the file shows again. A create of the name (a write that
/// expects nothing there) sends the delete again first, so it does not find the unlinked file; an edit of the file
/// that showed again (a write conditional on the unlinked version) replaces it, and nothing is deleted before it.
/// Either settles the intent once it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_delete_is_sent_again_by_a_create_and_not_by_an_edit() {
    let store = Gated::new(true);
    let layer = LaterDeletes::new(store.clone());
    for (case, body) in [("create", "new"), ("edit", "edited")] {
        let etag = put(&store, "f", b"old").await;
        store.drop_deletes.store(true, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        layer.delete_later(&k("f"), Some(etag.clone()), Some(Box::new(move |settled| tx.send(settled).unwrap())));
        layer.settle_key(&k("f")).await;
        store.drop_deletes.store(false, Ordering::SeqCst);
        assert!(store.inner.head(&k("f")).await.is_ok(), "{case}: the delete was not carried out");
        assert!(rx.try_recv().is_err(), "{case}: unanswered, the intent stays");
        let expect = if case == "create" { Expect::Absent } else { Expect::Etag(etag.clone()) };
        let wrote = layer.put_expect(&k("f"), Bytes::from(body), &UserMeta::default(), &expect).await;
        wrote.unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(store.inner.get(&k("f")).await.unwrap().0, body, "{case}");
        assert_eq!(rx.try_recv(), Ok(true), "{case}: the intent is settled");
    }
}

/// A burst of deletes goes out together: a few DeleteObjects where the store cannot check conditions, concurrent
/// conditional deletes (bounded) where it can; a replaced object is deleted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_batched_or_sent_concurrently() {
    let store = Gated::new(false);
    let mut keys = Vec::new();
    for i in 0..50 {
        keys.push((format!("d/{i}"), put(&store, &format!("d/{i}"), b"x").await));
    }
    let layer = LaterDeletes::new(store.clone());
    store.held.send_replace(true);
    for (key, etag) in &keys {
        layer.delete_later(&k(key), Some(etag.clone()), None);
    }
    store.held.send_replace(false);
    layer.settle("").await;
    let log = store.take_log();
    // The worker may start a batch (up to BATCHES_IN_FLIGHT) before the burst is over; the store holds them all, so
    // the rest of the burst waits for a slot and goes in one more.
    assert!(log.len() <= BATCHES_IN_FLIGHT + 1 && log.iter().any(|l| l.starts_with("delete_many")), "{log:?}");
    let keys_sent: usize =
        log.iter().map(|l| l.strip_prefix("delete_many ").map_or(1, |n| n.parse::<usize>().unwrap())).sum();
    assert_eq!(keys_sent, 50, "each key once: {log:?}");
    assert!(store.inner.list("", true).await.unwrap().objects.is_empty());

    let store = Gated::new(true);
    let mut keys = Vec::new();
    for i in 0..100 {
        keys.push((format!("d/{i}"), put(&store, &format!("d/{i}"), b"x").await));
    }
    put(&store, "d/0", b"replaced by another writer").await;
    let layer = LaterDeletes::new(store.clone());
    // Held while the burst arrives, so that the bound is reached however the threads are scheduled.
    store.held.send_replace(true);
    for (key, etag) in &keys {
        layer.delete_later(&k(key), Some(etag.clone()), None);
    }
    for _ in 0..400 {
        if store.in_flight.load(Ordering::SeqCst) >= CONCURRENT_DELETES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.held.send_replace(false);
    layer.settle("d/").await;
    let log = store.take_log();
    assert_eq!(log.iter().filter(|l| l.starts_with("delete_if")).count(), 100, "{log:?}");
    assert_eq!(log.iter().filter(|l| l.starts_with("delete ")).count(), 1, "the replaced one, unconditionally");
    let max = store.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(max, CONCURRENT_DELETES, "in flight at once");
    assert!(store.inner.list("", true).await.unwrap().objects.is_empty());
}

/// Where deletes go in batches, keys that arrive while a batch is in flight start the next one at once, up to
/// `BATCHES_IN_FLIGHT`: the last delete of a burst waits for one round trip, not for every batch before it. Keys that
/// arrive while all are busy wait, and then go together.
/// (One thread: a wave is queued whole before the worker runs.)
#[tokio::test]
async fn batches_go_out_concurrently_as_keys_arrive() {
    let store = Gated::new(false);
    let layer = LaterDeletes::new(store.clone());
    store.held.send_replace(true);
    let waves = BATCHES_IN_FLIGHT + 2;
    let mut keys = Vec::new();
    for wave in 0..waves {
        for i in 0..10 {
            let key = format!("d/{wave}-{i}");
            let etag = put(&store, &key, b"x").await;
            keys.push((wave, key, etag));
        }
    }
    for wave in 0..waves {
        for (_, key, etag) in keys.iter().filter(|(w, _, _)| *w == wave) {
            layer.delete_later(&k(key), Some(etag.clone()), None);
        }
        // Until the worker has taken this wave (or cannot: all slots busy).
        for _ in 0..200 {
            if store.in_flight.load(Ordering::SeqCst) > wave.min(BATCHES_IN_FLIGHT - 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(store.in_flight.load(Ordering::SeqCst), BATCHES_IN_FLIGHT, "one batch per wave, up to the bound");
    let mut settled = Box::pin(layer.settle(""));
    assert!(still_waiting(&mut settled).await);
    store.held.send_replace(false);
    settled.await;
    let log = store.take_log();
    assert_eq!(log.len(), BATCHES_IN_FLIGHT + 1, "the waves that found every slot busy went together: {log:?}");
    assert!(log.iter().all(|l| l.starts_with("delete_many")), "{log:?}");
    assert_eq!(store.max_in_flight.load(Ordering::SeqCst), BATCHES_IN_FLIGHT);
    assert!(store.inner.list("", true).await.unwrap().objects.is_empty());
}

/// A delete the store refuses leaves the key pending no longer: the name shows again (the store's truth), and nothing
/// waits forever.
#[tokio::test]
async fn a_failed_delete_is_logged_and_releases_its_waiters() {
    struct Refusing(ObjectStoreBackend, AtomicBool);
    #[async_trait]
    impl Backend for Refusing {
        async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
            self.0.head(key).await
        }
        async fn get_range(&self, key: &ObjectKey, r: Range<u64>) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            self.0.get_range(key, r).await
        }
        async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            self.0.get(key).await
        }
        async fn put_expect(&self, key: &ObjectKey, b: Bytes, m: &UserMeta, e: &Expect) -> Result<ObjectInfo, StoreError> {
            self.0.put_expect(key, b, m, e).await
        }
        async fn put_multipart_expect(&self, key: &ObjectKey, m: &UserMeta, e: &Expect) -> Result<Box<dyn Upload>, StoreError> {
            self.0.put_multipart_expect(key, m, e).await
        }
        async fn copy(&self, from: &ObjectKey, to: &ObjectKey, m: Option<&UserMeta>) -> Result<(), StoreError> {
            self.0.copy(from, to, m).await
        }
        async fn update_meta(&self, key: &ObjectKey, m: &UserMeta) -> Result<ObjectInfo, StoreError> {
            self.0.update_meta(key, m).await
        }
        async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
            self.1.store(true, Ordering::SeqCst);
            Err(StoreError::AccessDenied { key: key.to_string(), detail: "test".into() })
        }
        async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
            self.0.list(dir, recursive).await
        }
        async fn check_access(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }
    let inner = ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap();
    inner.put(&k("a"), Bytes::from_static(b"a"), &UserMeta::default()).await.unwrap();
    let store = Arc::new(Refusing(inner, AtomicBool::new(false)));
    let layer = LaterDeletes::new(store.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    layer.delete_later(&k("a"), None, Some(Box::new(move |settled| tx.send(settled).unwrap())));
    let listing = layer.list("", false).await.unwrap();
    assert!(store.1.load(Ordering::SeqCst), "the delete was tried before the listing");
    assert_eq!(listing.objects.len(), 1, "refused: still there, and shown");
    assert!(layer.head(&k("a")).await.is_ok());
    assert_eq!(rx.try_recv(), Ok(true), "answered (refused): the intent is settled");
}
