//! The daemon's memory budget (`-o max_memory=SIZE`): one number that bounds the buffers of every data path.
//!
//! Two kinds of users share the budget:
//!
//! - **Reservations**: buffers that exist for the duration of one operation — a GET body and the pages decrypted from
//!   it while a fetch runs (foreground or read-ahead), the parts of a multipart upload being sealed and sent, the
//!   buffers of an S3EC verification pass. A [`Reservation`] is taken before the buffer is allocated and given back
//!   when it is dropped, which is when the buffer is (unless both are kept as a spare, below).
//! - **The page cache**, which takes what the reservations leave: its capacity is `min(cache_size, limit -
//!   reserved)`, and every reservation that would push `reserved + cached` over the limit makes the cache evict first
//!   ([`Reclaim`]). The cache never blocks a reservation; it only shrinks.
//!
//! - **Metadata**: what the filesystem keeps for names rather than data — the inode table, the listings held for open
//!   directory handles, the negative-lookup memo. It lives as long as the kernel refers to the names, so it is no
//!   reservation: the filesystem estimates it (a fixed cost per node and entry plus its name, see `fs::inode`) and
//!   reports the total ([`MemoryBudget::set_metadata`]). It may take up to [`METADATA_SHARE`] of the budget; past that
//!   the filesystem trims its table (drops nodes nobody refers to, asks the kernel to forget names it holds but does
//!   not use) rather than take more, so reservations always keep the rest.
//!
//! - **Spares**: buffers of a size a data path allocates over and over (upload parts, 8 MiB), kept after use
//!   ([`Reservation::keep_with`]) with their bytes still reserved, for the next use ([`MemoryBudget::take_spare`]): a
//!   fresh buffer that large is a mapping of its own, every page of which is faulted in again as it is filled. At
//!   most [`MAX_SPARES`], and only while some user says they are worth keeping ([`MemoryBudget::use_spares`]: a
//!   streamed upload running); they go when the last user does, so the page cache has its room back once no stream
//!   runs. They are the first thing a reservation that does not fit takes back, and keeping one wakes the
//!   reservations waiting for room, so a kept buffer never makes anything wait.
//!
//! So `reserved + metadata + cached <= limit` holds at every moment except the instant between a reservation (or a
//! growth of the metadata) and the eviction it causes. A reservation that cannot be met waits ([`MemoryBudget::reserve`]) until other reservations end — every
//! reservation is transient (a fetch, a part upload), and spares give way, so waiting always ends; read-ahead never
//! waits ([`MemoryBudget::try_reserve`]): it shrinks its window to what is free, and a read that needs the bytes
//! fetches them itself. A single reservation larger than what the metadata leaves of the budget is cut to that, so
//! it still runs (alone).
//!
//! What the budget does not count: the daemon's code, the tokio runtime and its threads, TLS state, transient
//! listings while they are merged into the table, and the allocator's own overhead. A daemon sets [`UNCOUNTED`] of its `max_memory` aside for them, and the rest —
//! the mapped code, about 12 MiB for an idle daemon — is why the target is "peak RSS ≤ max_memory + 32 MiB" (README,
//! `max_memory`). Modelled on mountpoint-s3's `MemoryLimiter` (reserve for uploads, try-reserve for
//! prefetch, the cache sized by what is left).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use tokio::sync::Notify;

/// The part of `max_memory` set aside for what no reservation counts: the allocator's slack between the bytes in
/// use and the pages it holds (about 10 MiB measured with a 96 MiB budget), request buffers in fuser and hyper, the
/// transient copies of a listing. Measured (320 MiB written then read twice, `max_memory=96M`, local store): peak RSS 118–133 MiB when
/// the whole 96 MiB went to counted buffers, of which 9 MiB are the mapped binary and libraries and ~4 MiB the idle
/// heap.
pub const UNCOUNTED: u64 = 16 << 20;

/// The part of the budget the metadata (inode table, held listings) may take before the filesystem trims it, as a
/// fraction: an eighth (6 MiB of `max_memory=64M`, 62 MiB of the default 512M). The rest stays for reservations and
/// the page cache, so a fetch or an upload part always fits whatever the number of names the kernel holds, and for
/// what no estimate counts: a listing while it is merged into the table (100,000 entries: about 20 MiB for a moment)
/// and the heap that leaves fragmented. Measured with `max_memory=64M`, `stat` of each of 100,000 entries and then
/// `ls -l` of them (tests/memory.rs), peak RSS: 69 and 75 MiB with half, 63 and 68 MiB with a quarter.
pub const METADATA_SHARE: (u64, u64) = (1, 8);

/// Something that holds memory it can give up at once: the page cache.
pub trait Reclaim: Send + Sync {
    /// Shrinks to at most `bytes`; returns how many bytes it freed.
    fn shrink_to(&self, bytes: u64) -> u64;
}

/// The budget shared by one daemon's data paths.
pub struct MemoryBudget {
    limit: u64,
    reserved: AtomicU64,
    /// Bytes of metadata as the filesystem last reported them (see the module docs); counted up to
    /// [`MemoryBudget::metadata_share`].
    metadata: AtomicU64,
    /// Woken whenever a reservation ends, for the reservations waiting for room.
    released: Notify,
    cache: OnceLock<Weak<dyn Reclaim>>,
    /// Buffers kept for reuse, each with the bytes reserved for it (counted in `reserved`), and their users.
    spares: Mutex<Spares>,
}

#[derive(Default)]
struct Spares {
    kept: Vec<(Vec<u8>, u64)>,
    /// [`SpareUse`] guards alive: nothing is kept while there are none.
    users: usize,
}

/// Spares are worth keeping while this lives ([`MemoryBudget::use_spares`]); the last one to go gives them up.
#[must_use = "spares are kept only while this lives"]
pub struct SpareUse {
    budget: Arc<MemoryBudget>,
}

impl Drop for SpareUse {
    fn drop(&mut self) {
        let freed = {
            let mut spares = self.budget.spares.lock().unwrap_or_else(PoisonError::into_inner);
            spares.users -= 1;
            if spares.users == 0 { std::mem::take(&mut spares.kept) } else { Vec::new() }
        };
        self.budget.free_spares(freed);
    }
}

/// Buffers a budget keeps for reuse at most (see the module docs): two upload parts.
pub const MAX_SPARES: usize = 2;

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.limit)
            .field("reserved", &self.reserved())
            .field("metadata", &self.metadata())
            .finish()
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            reserved: AtomicU64::new(0),
            metadata: AtomicU64::new(0),
            released: Notify::new(),
            cache: OnceLock::new(),
            spares: Mutex::new(Spares::default()),
        })
    }

    /// The budget of a daemon mounted with `max_memory` bytes: what is left for the counted buffers once
    /// [`UNCOUNTED`] is set aside.
    pub fn for_daemon(max_memory: u64) -> Arc<MemoryBudget> {
        MemoryBudget::new(max_memory.saturating_sub(UNCOUNTED).max(UNCOUNTED))
    }

    /// No limit: what tests and library users without a mount get.
    pub fn unlimited() -> Arc<MemoryBudget> {
        MemoryBudget::new(u64::MAX)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held by reservations now.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// What the reservations and the metadata leave: the page cache's share right now.
    pub fn unreserved(&self) -> u64 {
        self.for_reservations().saturating_sub(self.reserved())
    }

    /// The most the metadata may take before the filesystem trims it ([`METADATA_SHARE`] of the limit).
    pub fn metadata_share(&self) -> u64 {
        self.limit / METADATA_SHARE.1 * METADATA_SHARE.0
    }

    /// Bytes of metadata as last reported.
    pub fn metadata(&self) -> u64 {
        self.metadata.load(Ordering::Acquire)
    }

    /// The part of the limit the metadata leaves to reservations and the page cache: never less than what
    /// [`METADATA_SHARE`] keeps for them.
    fn for_reservations(&self) -> u64 {
        self.limit - self.metadata().min(self.metadata_share())
    }

    /// Records the filesystem's metadata estimate. Growth makes the page cache shrink (as a reservation does); a
    /// drop wakes reservations waiting for room. Returns whether the metadata is over its share, which the caller
    /// answers by trimming.
    pub fn set_metadata(&self, bytes: u64) -> bool {
        let before = self.metadata.swap(bytes, Ordering::AcqRel);
        crate::metrics::memory_metadata(bytes);
        if bytes > before {
            self.make_room();
        } else if bytes < before {
            self.released.notify_waiters();
        }
        bytes > self.metadata_share()
    }

    /// Registers the cache that gives memory back when reservations need it (once; later calls are ignored).
    pub fn set_cache(&self, cache: Weak<dyn Reclaim>) {
        let _ = self.cache.set(cache);
    }

    /// `bytes` now if they fit beside the other reservations, else `None`: for work that can do with less (read-ahead).
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let limit = self.for_reservations();
        let bytes = bytes.min(limit);
        let mut now = self.reserved.load(Ordering::Acquire);
        loop {
            if now.saturating_add(bytes) > limit {
                // Kept buffers are given up before anything has to do with less (or wait).
                if !self.give_up_spares() {
                    return None;
                }
                now = self.reserved.load(Ordering::Acquire);
                continue;
            }
            match self.reserved.compare_exchange_weak(now, now + bytes, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => now = actual,
            }
        }
        crate::metrics::memory_reserved(bytes as i64);
        self.make_room();
        Some(Reservation { budget: Arc::clone(self), bytes })
    }

    /// `bytes`, waiting for other reservations to end if they do not fit now: for work that cannot do with less (the
    /// fetch a read waits on, an upload part).
    pub async fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        loop {
            // Registered before the attempt, so a release between the attempt and the wait is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(r) = self.try_reserve(bytes) {
                return r;
            }
            released.await;
        }
    }

    /// Makes the cache fit beside the reservations, and the memory it frees available to the buffers about to be
    /// allocated for them (see [`return_freed_memory`]).
    fn make_room(&self) {
        if let Some(cache) = self.cache.get().and_then(Weak::upgrade) {
            if cache.shrink_to(self.unreserved()) >= RETURN_FREED_AT {
                return_freed_memory();
            }
        }
    }

    /// A buffer kept by [`Reservation::keep_with`] with room for at least `capacity` bytes, emptied, and the
    /// reservation that counts it; `None` when none is kept.
    pub fn take_spare(self: &Arc<Self>, capacity: usize) -> Option<(Vec<u8>, Reservation)> {
        let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        let at = spares.kept.iter().position(|(buf, _)| buf.capacity() >= capacity)?;
        let (mut buf, bytes) = spares.kept.swap_remove(at);
        drop(spares);
        buf.clear();
        crate::metrics::memory_spare(-(bytes as i64));
        crate::metrics::memory_reserved(bytes as i64);
        Some((buf, Reservation { budget: Arc::clone(self), bytes }))
    }

    /// Spares are kept while the guard returned lives (and any other): for a user that will want them again soon.
    pub fn use_spares(self: &Arc<Self>) -> SpareUse {
        self.spares.lock().unwrap_or_else(PoisonError::into_inner).users += 1;
        SpareUse { budget: Arc::clone(self) }
    }

    /// Frees the kept buffers and their reservations: whether there were any.
    fn give_up_spares(&self) -> bool {
        let kept = std::mem::take(&mut self.spares.lock().unwrap_or_else(PoisonError::into_inner).kept);
        self.free_spares(kept)
    }

    /// Frees `kept` (spares taken out of the list) and their reservations: whether there were any.
    fn free_spares(&self, kept: Vec<(Vec<u8>, u64)>) -> bool {
        let bytes: u64 = kept.iter().map(|(_, bytes)| bytes).sum();
        drop(kept);
        if bytes > 0 {
            self.reserved.fetch_sub(bytes, Ordering::AcqRel);
            crate::metrics::memory_spare(-(bytes as i64));
            self.released.notify_waiters();
        }
        bytes > 0
    }

    fn release(&self, bytes: u64) {
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
        crate::metrics::memory_reserved(-(bytes as i64));
        self.released.notify_waiters();
    }
}

/// Bytes of the budget held until dropped.
#[must_use = "the memory is reserved only while this lives"]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what this holds past `bytes`, when its use needs less from now on (a part built from old bytes
    /// and new, sent while only its body is held), waking the reservations that wait for room.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget.release(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("bytes", &self.bytes).finish()
    }
}

impl Reservation {
    /// Keeps `buf`, which these bytes were reserved for, as a spare of the budget (see the module docs), its bytes
    /// still reserved; frees both instead when no [`SpareUse`] lives, when the budget keeps [`MAX_SPARES`] already,
    /// or when `buf` is larger than this reservation counts. Wakes the reservations waiting for room either way
    /// (they take a spare's room by giving it up). No zeroing: a spare holds what the store was sent (ciphertext in
    /// the client-side modes), in this process's memory only, until the next use overwrites it.
    pub fn keep_with(mut self, buf: Vec<u8>) {
        if buf.capacity() as u64 > self.bytes {
            return;
        }
        let mut spares = self.budget.spares.lock().unwrap_or_else(PoisonError::into_inner);
        if spares.users > 0 && spares.kept.len() < MAX_SPARES {
            spares.kept.push((buf, self.bytes));
            drop(spares);
            // Still in `reserved` (the limit counts it), shown as a spare rather than as a buffer in flight.
            crate::metrics::memory_reserved(-(self.bytes as i64));
            crate::metrics::memory_spare(self.bytes as i64);
            self.bytes = 0;
            self.budget.released.notify_waiters();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
        }
    }
}

/// Freed bytes worth handing back to the system at once: a 64 KiB page evicted to make room for the next one is
/// reused by it, a read-ahead segment's worth (1 MiB or more) is not.
const RETURN_FREED_AT: u64 = 1 << 20;

/// Returns the free space inside malloc's heaps to the system (glibc's `malloc_trim`). Pages the cache evicts to make
/// room for a reservation are freed into the heap, while the buffers the reservation is for are allocated by mmap
/// (see [`tune_allocator`]): without this the heap would keep the cache's peak resident while the buffers add to it,
/// and the RSS would reach the peak of the cache plus the peak of the reservations instead of the peak of their sum.
/// Measured (512 MiB read, `max_memory=96M`): peak RSS 107–126 MiB over four runs without, 102–106 MiB over three
/// with, at the same speed.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of malloc's own heaps; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes glibc's malloc give freed buffers back instead of keeping them, so the budget bounds the RSS and not only
/// the live bytes. Measured reading 512 MiB with `max_memory=96M` (peak RSS, idle daemon 13 MiB): 153 MiB with
/// glibc's defaults, 150 MiB with 2 arenas, 125 MiB with a fixed mmap threshold, 104 MiB with both. By default glibc
/// raises its mmap threshold to the size of the largest block freed (up to 32 MiB), so after the first multi-MiB GET
/// body every later one comes from the heap arenas, whose freed space is rarely returned; and it keeps up to 8 arenas
/// per core, one per thread that allocates, each holding its own free space. A fixed threshold sends GET bodies and
/// upload parts (1 MiB and more) to mmap, freed to the system at once; two arenas bound the rest. The threshold is
/// 1 MiB rather than glibc's initial 128 KiB so that the HTTP client's receive buffers (up to ~400 KiB) come from
/// the heap and are reused: at 128 KiB each was a fresh mapping, faulted in page by page by the socket read that
/// filled it (10 % of the daemon's samples in a 1 GiB sequential read; its system time went from 1.2–1.7 s to
/// 0.7–0.9 s per GiB with 1 MiB, and the memory tests' peaks stayed where they were).
/// Called once, before the runtime starts its threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Blocks from this size up are mapped on their own (and unmapped when freed).
        const MMAP_THRESHOLD: libc::c_int = 1 << 20;
        /// Arenas: two, for two threads allocating at once without waiting on each other's lock.
        const ARENA_MAX: libc::c_int = 2;
        // SAFETY: mallopt only sets allocator parameters; it is called before other threads exist.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1 };
        if !ok {
            tracing::warn!("could not tune malloc (mallopt): memory use may exceed max_memory by more than usual");
        }
    }
}

/// The budget of this process, for the paths that have no handle of their own to it (the upload functions, called
/// from many places): set once by `run` before the mount serves, unlimited until then (tests, library use).
static PROCESS: OnceLock<Arc<MemoryBudget>> = OnceLock::new();

/// Makes `budget` the process's budget (once; returns false if one was set already).
pub fn install(budget: Arc<MemoryBudget>) -> bool {
    PROCESS.set(budget).is_ok()
}

/// The process's budget (unlimited unless [`install`]ed).
pub fn process() -> &'static Arc<MemoryBudget> {
    PROCESS.get_or_init(MemoryBudget::unlimited)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// `budget.reserve(bytes)` in a task of its own: the bytes it got, once it has them.
    fn waiting_reserve(budget: &Arc<MemoryBudget>, bytes: u64) -> tokio::task::JoinHandle<u64> {
        let budget = Arc::clone(budget);
        tokio::spawn(async move { budget.reserve(bytes).await.bytes() })
    }

    /// A cache that records how far it was asked to shrink.
    struct Shrinks(Mutex<Vec<u64>>);

    impl Reclaim for Shrinks {
        fn shrink_to(&self, bytes: u64) -> u64 {
            self.0.lock().unwrap().push(bytes);
            0
        }
    }

    #[test]
    fn try_reserve_refuses_what_does_not_fit_and_release_gives_it_back() {
        let budget = MemoryBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        assert_eq!(budget.reserved(), 60);
        assert!(budget.try_reserve(41).is_none(), "60 + 41 > 100");
        let b = budget.try_reserve(40).unwrap();
        assert_eq!(budget.unreserved(), 0);
        drop(a);
        assert_eq!(budget.reserved(), 40);
        drop(b);
        assert_eq!(budget.reserved(), 0);
    }

    #[tokio::test]
    async fn a_shrunk_reservation_gives_back_the_rest_to_one_waiting_for_it() {
        let budget = MemoryBudget::new(100);
        let mut held = budget.try_reserve(80).unwrap();
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(50).await.bytes() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "80 + 50 > 100");
        held.shrink_to(30);
        held.shrink_to(60); // never grows
        assert_eq!(held.bytes(), 30);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!((got, budget.reserved()), (50, 30), "the waiting one got its room; it has dropped it since");
        drop(held);
        assert_eq!(budget.reserved(), 0);
    }

    #[test]
    fn a_reservation_larger_than_the_budget_is_cut_to_it() {
        let budget = MemoryBudget::new(100);
        let r = budget.try_reserve(1_000).unwrap();
        assert_eq!(r.bytes(), 100);
        assert!(budget.try_reserve(1).is_none());
    }

    #[test]
    fn every_reservation_shrinks_the_cache_to_what_is_left() {
        let budget = MemoryBudget::new(100);
        let cache = Arc::new(Shrinks(Mutex::new(Vec::new())));
        let weak: Weak<dyn Reclaim> = Arc::downgrade(&(cache.clone() as Arc<dyn Reclaim>));
        budget.set_cache(weak);
        let _a = budget.try_reserve(30).unwrap();
        let _b = budget.try_reserve(50).unwrap();
        assert_eq!(*cache.0.lock().unwrap(), vec![70, 20]);
    }

    #[test]
    fn metadata_takes_from_the_cache_and_reservations_up_to_its_share() {
        let budget = MemoryBudget::new(100);
        let cache = Arc::new(Shrinks(Mutex::new(Vec::new())));
        let weak: Weak<dyn Reclaim> = Arc::downgrade(&(cache.clone() as Arc<dyn Reclaim>));
        budget.set_cache(weak);
        assert!(!budget.set_metadata(10), "10 of 100 is within the share (12)");
        assert_eq!(budget.unreserved(), 90);
        assert_eq!(*cache.0.lock().unwrap(), vec![90], "growth shrinks the cache");
        assert!(budget.try_reserve(91).is_some_and(|r| r.bytes() == 90), "cut to what the metadata leaves");
        assert!(budget.set_metadata(80), "over the share: the caller must trim");
        assert_eq!(budget.unreserved(), 88, "counted only up to its share: the rest stays for data");
        let r = budget.try_reserve(88).unwrap();
        assert!(budget.try_reserve(1).is_none());
        drop(r);
        budget.set_metadata(0);
        assert_eq!(budget.unreserved(), 100);
    }

    #[tokio::test]
    async fn a_reservation_waiting_for_room_gets_it_when_the_metadata_shrinks() {
        let budget = MemoryBudget::new(100);
        budget.set_metadata(12);
        let held = budget.try_reserve(78).unwrap();
        let waiter = waiting_reserve(&budget, 20);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "12 + 78 + 20 > 100");
        budget.set_metadata(2);
        assert_eq!(waiter.await.unwrap(), 20);
        drop(held);
    }

    #[tokio::test]
    async fn reserve_waits_until_another_reservation_ends() {
        let budget = MemoryBudget::new(100);
        let held = budget.try_reserve(80).unwrap();
        let waiter = waiting_reserve(&budget, 50);
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "50 more do not fit beside 80 of 100");
        drop(held);
        assert_eq!(waiter.await.unwrap(), 50);
        assert_eq!(budget.reserved(), 0, "the waiter's reservation ended with its task");
    }

    #[tokio::test]
    async fn many_waiters_all_get_their_turn_and_the_limit_always_holds() {
        let budget = MemoryBudget::new(100);
        let peak = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (budget, peak) = (budget.clone(), peak.clone());
                tokio::spawn(async move {
                    let r = budget.reserve(10 + i % 40).await;
                    peak.fetch_max(budget.reserved(), Ordering::Relaxed);
                    tokio::task::yield_now().await;
                    drop(r);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 100);
        assert_eq!(budget.reserved(), 0);
    }

    /// A buffer kept after use comes back for the next use with its bytes counted all along; at most MAX_SPARES are
    /// kept; and a reservation that does not fit takes the spares back rather than do with less or wait.
    #[tokio::test]
    async fn spares_stay_counted_come_back_and_give_way_to_any_reservation() {
        let budget = MemoryBudget::new(1000);
        // Nothing is kept while no user wants spares.
        budget.try_reserve(300).unwrap().keep_with(Vec::with_capacity(300));
        assert_eq!(budget.reserved(), 0, "a spare kept with no user");
        let user = budget.use_spares();
        let (r, mut buf) = (budget.try_reserve(300).unwrap(), Vec::with_capacity(300));
        buf.extend_from_slice(b"part");
        let at = buf.as_ptr();
        r.keep_with(buf);
        assert_eq!(budget.reserved(), 300, "a spare stays counted");
        assert!(budget.take_spare(301).is_none(), "no spare that large");
        let (buf, r) = budget.take_spare(300).expect("the spare");
        assert!(buf.is_empty() && buf.capacity() >= 300 && buf.as_ptr() == at && r.bytes() == 300);
        assert_eq!(budget.reserved(), 300);
        r.keep_with(buf);
        // A buffer larger than its reservation counts is not kept; nor more than MAX_SPARES.
        budget.try_reserve(100).unwrap().keep_with(Vec::with_capacity(200));
        assert_eq!(budget.reserved(), 300);
        for _ in 0..MAX_SPARES {
            budget.try_reserve(100).unwrap().keep_with(Vec::with_capacity(100));
        }
        assert_eq!(budget.reserved(), 300 + 100 * (MAX_SPARES as u64 - 1), "a spare past the most kept was freed");
        // 800 do not fit beside the spares: they go, and the reservation is whole.
        let big = budget.try_reserve(800).expect("the spares give way");
        assert_eq!((big.bytes(), budget.reserved()), (800, 800));
        assert!(budget.take_spare(1).is_none(), "spares given up");
        budget.try_reserve(200).unwrap().keep_with(Vec::with_capacity(200));
        // A reservation waiting for room is not kept waiting by a spare either.
        let waiter = waiting_reserve(&budget, 150);
        assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap(), 150);
        drop(big);
        assert_eq!(budget.reserved(), 0);

        // A reservation that waited before a buffer became a spare is woken by it, and takes its room.
        let held = budget.try_reserve(900).unwrap();
        let waiter = waiting_reserve(&budget, 500);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "500 more do not fit beside 900 of 1000");
        held.keep_with(Vec::with_capacity(900));
        assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap(), 500);
        // The last user gone, the spares go: the room is the page cache's again.
        budget.try_reserve(300).unwrap().keep_with(Vec::with_capacity(300));
        let other = budget.use_spares();
        drop(user);
        assert_eq!(budget.reserved(), 300, "spares given up while a user remained");
        drop(other);
        assert_eq!(budget.reserved(), 0, "spares outlived their last user");
    }
}
