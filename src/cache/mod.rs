//! Page caches keyed by object identity.
//!
//! Decrypted chunks are kept in memory so that re-reading a file, or reading it in small pieces, does not fetch and
//! authenticate the same chunk twice. Entries are keyed by [`ObjectId`] (key *and* ETag) plus the chunk index, so a
//! changed object (new ETag) can never be served from pages of its previous version: stale pages simply stop being
//! looked up and age out of the LRU.
//!
//! The budget is in bytes of plaintext, not in entries, because chunks at the end of a file are short and the user
//! sets `cache_size` as memory. The cache also lives inside the daemon's [`MemoryBudget`] (`max_memory`): it holds at
//! most `min(cache_size, what the budget's reservations leave)`, and shrinks at once when a reservation needs room
//! (it is the budget's [`Reclaim`]er).
//!
//! Pages are made with [`page::PageBuf`]: mapped one by one outside malloc's heaps, so an evicted page is given back
//! to the system when it goes, and the daemon's RSS follows the bytes the cache counts (see [`page`]).

pub mod disk;
pub mod page;

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use lru::LruCache;

use crate::memory::{MemoryBudget, Reclaim};

/// The identity of one version of one object: a new upload gets a new ETag and so a new identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectId {
    pub key: String,
    pub etag: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PageKey {
    object: ObjectId,
    index: u64,
}

/// Byte-bounded LRU of decrypted chunks.
///
/// Concurrency: one `std::sync::Mutex` around the LRU. Critical sections are a hash lookup and a pointer move (no
/// I/O, no decryption under the lock), so contention stays negligible next to network reads.
pub struct PageCache {
    inner: Mutex<Inner>,
    budget: u64,
    memory: Arc<MemoryBudget>,
}

struct Inner {
    lru: LruCache<PageKey, Bytes>,
    bytes: u64,
    hits: u64,
    misses: u64,
}

/// Counters for tests (the metrics gauges and counters are in `crate::metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: usize,
}

impl PageCache {
    /// A cache that holds at most `budget` bytes of page data, outside any memory budget. A budget of 0 disables
    /// caching.
    pub fn new(budget: u64) -> Self {
        PageCache::in_budget(budget, MemoryBudget::unlimited())
    }

    fn in_budget(budget: u64, memory: Arc<MemoryBudget>) -> Self {
        PageCache {
            inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0, hits: 0, misses: 0 }),
            budget,
            memory,
        }
    }

    /// A cache of at most `budget` bytes that takes only what `memory`'s reservations leave, and gives it back when
    /// they need it.
    pub fn with_memory(budget: u64, memory: Arc<MemoryBudget>) -> Arc<PageCache> {
        let cache = Arc::new(PageCache::in_budget(budget, memory.clone()));
        let weak: Weak<dyn Reclaim> = Arc::downgrade(&(cache.clone() as Arc<dyn Reclaim>));
        memory.set_cache(weak);
        cache
    }

    /// The most page bytes the cache holds (`cache_size`).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The most page bytes it may hold right now: `cache_size`, or less while reservations use the memory budget.
    pub fn capacity(&self) -> u64 {
        self.budget.min(self.memory.unreserved())
    }

    /// The memory budget the cache lives in, which the read path reserves its buffers from.
    pub fn memory(&self) -> &Arc<MemoryBudget> {
        &self.memory
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the LRU half-updated in a way that matters (worst case a
        // byte count drifts), so recover from poisoning instead of propagating the panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, object: &ObjectId, index: u64) -> Option<Bytes> {
        let mut inner = self.lock();
        let key = PageKey { object: object.clone(), index };
        match inner.lru.get(&key) {
            Some(page) => {
                let page = page.clone();
                inner.hits += 1;
                Some(page)
            }
            None => {
                inner.misses += 1;
                None
            }
        }
    }

    /// Whether a page is present, without counting a hit or a miss and without touching its recency.
    pub fn contains(&self, object: &ObjectId, index: u64) -> bool {
        let inner = self.lock();
        inner.lru.contains(&PageKey { object: object.clone(), index })
    }

    pub fn put(&self, object: &ObjectId, index: u64, page: Bytes) {
        let len = page.len() as u64;
        let capacity = self.capacity();
        if len > capacity {
            return;
        }
        let mut inner = self.lock();
        let before = inner.bytes;
        if let Some(old) = inner.lru.put(PageKey { object: object.clone(), index }, page) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        let evicted = Self::evict_to(&mut inner, capacity);
        let delta = inner.bytes as i64 - before as i64;
        drop(inner);
        crate::metrics::cache_changed(delta, evicted);
    }

    /// Drops least recently used pages until at most `bytes` are held; returns how many went.
    fn evict_to(inner: &mut Inner, bytes: u64) -> u64 {
        let mut evicted = 0;
        while inner.bytes > bytes {
            match inner.lru.pop_lru() {
                Some((_, page)) => {
                    inner.bytes -= page.len() as u64;
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }

    /// Drops every page of every version of `key` (after a delete or overwrite through this mount).
    pub fn invalidate_key(&self, key: &str) {
        let mut inner = self.lock();
        let stale: Vec<PageKey> =
            inner.lru.iter().filter(|(k, _)| k.object.key == key).map(|(k, _)| k.clone()).collect();
        let before = inner.bytes;
        for k in stale {
            if let Some(page) = inner.lru.pop(&k) {
                inner.bytes -= page.len() as u64;
            }
        }
        let delta = inner.bytes as i64 - before as i64;
        drop(inner);
        crate::metrics::cache_changed(delta, 0);
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats { hits: inner.hits, misses: inner.misses, bytes: inner.bytes, entries: inner.lru.len() }
    }
}

impl Reclaim for PageCache {
    fn shrink_to(&self, bytes: u64) -> u64 {
        let mut inner = self.lock();
        if inner.bytes <= bytes {
            return 0;
        }
        let before = inner.bytes;
        let evicted = Self::evict_to(&mut inner, bytes);
        let freed = before - inner.bytes;
        drop(inner);
        crate::metrics::cache_changed(-(freed as i64), evicted);
        freed
    }
}

impl Drop for PageCache {
    fn drop(&mut self) {
        // The metrics gauge sums the deltas of every cache in the process; take this one's bytes out of it.
        let bytes = self.lock().bytes;
        crate::metrics::cache_changed(-(bytes as i64), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: &str, etag: &str) -> ObjectId {
        ObjectId { key: key.into(), etag: etag.into() }
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let cache = PageCache::new(10);
        let a = id("a", "1");
        cache.put(&a, 0, Bytes::from_static(b"0123"));
        cache.put(&a, 1, Bytes::from_static(b"4567"));
        assert!(cache.get(&a, 0).is_some()); // page 1 is now least recent
        cache.put(&a, 2, Bytes::from_static(b"89ab"));
        assert!(cache.contains(&a, 0));
        assert!(!cache.contains(&a, 1));
        assert!(cache.contains(&a, 2));
        assert_eq!(cache.stats().bytes, 8);
    }

    #[test]
    fn new_etag_never_sees_old_pages() {
        let cache = PageCache::new(1 << 20);
        cache.put(&id("k", "v1"), 0, Bytes::from_static(b"old"));
        assert_eq!(cache.get(&id("k", "v2"), 0), None);
        assert_eq!(cache.get(&id("k", "v1"), 0), Some(Bytes::from_static(b"old")));
    }

    #[test]
    fn oversized_page_and_zero_budget_are_not_cached() {
        let cache = PageCache::new(0);
        cache.put(&id("k", "e"), 0, Bytes::from_static(b"x"));
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn invalidate_key_drops_all_versions() {
        let cache = PageCache::new(100);
        cache.put(&id("k", "1"), 0, Bytes::from_static(b"a"));
        cache.put(&id("k", "2"), 3, Bytes::from_static(b"b"));
        cache.put(&id("other", "1"), 0, Bytes::from_static(b"c"));
        cache.invalidate_key("k");
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.stats().bytes, 1);
    }

    #[test]
    fn reservations_shrink_the_cache_and_it_grows_back_into_what_they_leave() {
        let memory = MemoryBudget::new(10);
        let cache = PageCache::with_memory(8, memory.clone());
        let a = id("a", "1");
        for i in 0..4 {
            cache.put(&a, i, Bytes::from_static(b"01"));
        }
        assert_eq!(cache.stats().bytes, 8, "cache_size is the cap while the budget is free");
        let r = memory.try_reserve(5).unwrap();
        assert_eq!(cache.stats().bytes, 4, "shrunk to 10 - 5 at once, least recent pages first");
        assert!(!cache.contains(&a, 0) && !cache.contains(&a, 1) && cache.contains(&a, 3));
        cache.put(&a, 4, Bytes::from_static(b"01"));
        assert_eq!(cache.stats().bytes, 4, "a new page stays within what the reservation leaves");
        drop(r);
        cache.put(&a, 5, Bytes::from_static(b"01"));
        assert_eq!(cache.stats().bytes, 6, "and grows back once it ends");
        assert_eq!(cache.capacity(), 8);
    }

    #[test]
    fn replacing_a_page_keeps_byte_count_exact() {
        let cache = PageCache::new(100);
        cache.put(&id("k", "1"), 0, Bytes::from_static(b"abc"));
        cache.put(&id("k", "1"), 0, Bytes::from_static(b"abcdef"));
        assert_eq!(cache.stats().bytes, 6);
    }
}
