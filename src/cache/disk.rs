//! The disk cache (`-o cache_dir=DIR`): pages of objects kept on local disk, sealed, bounded, and reused after a
//! remount; and, for a mount without one, its scratch (below).
//!
//! Why: re-reading a large file after a remount, or a working set larger than memory, should not cost the store
//! requests again; and a cache must not be the place where plaintext of file contents rests on disk (rclone's,
//! s3fs's and mountpoint-s3's caches keep it in the clear) or grow past its limit.
//!
//! Where it sits: below the page cache. A read that misses the page cache looks here before it fetches from the
//! store, and (in a cache directory; the scratch takes only whole-object fetches) every page fetched from the store
//! is written here on the way back (in the background, within the
//! memory budget; a page that finds no room is simply not cached). Entries are keyed like the page cache, by the
//! object's key, its ETag and the page index, so a changed object is never served from its old pages.
//!
//! Layout (docs/FORMAT.md, "The disk cache", has the bytes):
//!
//! ```text
//! DIR/                  0700, ours (checked like the journal's base, see `journal::dir`)
//!   <store id>/         0700: one per store, as in the journal
//!     lock              flock(LOCK_EX) held by the mount using it: a second mount of the store refuses
//!     cache.json        which key sealed the entries (its check value; in cse-kms its KMS-wrapped root key)
//!     pages             the entries, one per slot of [`SLOT`] bytes (the rest of a slot is a hole)
//!     labels            one label per slot: which entry (a keyed hash of its identity, so object names do not
//!                       show), its length and when it was written; all zero for a free slot
//! ```
//!
//! Why slots in one file, not a file per entry (the layout up to 2026-12): every entry written was a new inode, and
//! on a filesystem where many files were removed shortly before, ext4 spends most of the time of such a create
//! walking recently freed inodes (perf put 60 % of the daemon's samples there during a cold fill). A slot is written
//! with one `pwritev` and read with one `preadv2` on a descriptor held open, with no path to walk, and the reads the
//! system's page cache holds are served without a blocking task (`get_many_now`), as from the scratch. The label is
//! written after its entry and cleared before the slot is freed, so a kill or a crash leaves at worst a slot whose
//! label names an entry that no longer opens there: a miss, like any damaged entry.
//!
//! Limits: entries are counted by the disk blocks they take (4 KiB each) and the total never exceeds the limit: room
//! is reserved (least recently used entries removed first) before an entry is written. When the filesystem under the
//! cache has less than 5 % (at most 1 GiB) free, entries are removed until it has, and nothing is written while it
//! cannot. The recency order lives in memory; a start orders what it finds by the order it was written in (its
//! label).
//!
//! The index in memory is counted in the memory budget (`max_memory`) too, so a large cache on disk cannot grow the
//! daemon past it: [`INDEX_BYTES_PER_ENTRY`] an entry, at most [`INDEX_SHARE_OF_BUDGET`] of the budget. A cache
//! directory reserves it a step at a time as the index grows ([`IndexMemory`]); an entry that would need more than
//! the budget gives replaces the least recently used one, and a start keeps only the newest entries the budget pays
//! for. The scratch reserves its whole index at mount (its entries all take a slot, so its limit says how many).
//!
//! The scratch: a mount without `cache_dir` still should not pay a GET per read for a file read at random that is too
//! large for memory (s3fs keeps a plaintext copy of every file it reads in its tmpdir). It gets one file with no name
//! in the write journal's run directory, in slots of [`SLOT`] bytes, entries sealed as above under a random key made
//! at mount; the index (name → slot) is in memory, counted in the memory budget. It takes only whole-object fetches
//! (`read`), nothing outlives the daemon, a kill included, and a slot that is evicted or dropped is punched out of
//! the file before it is given out again. An entry being written owns its slot until it is done, so no read meets a
//! half-written one. It shares its disk with the write journal, so it keeps free what the journal needs (a quarter
//! of the disk, at most 1 GiB, rather than 5 %) and gives room back when the journal finds the disk low.
//!
//! Damage: an entry that does not open (edited, truncated, planted, moved from another slot, labelled for another
//! page, sealed under another key) is logged, freed and counted as a miss: the page is fetched from the store. A
//! cache problem never fails a read. If the directory goes away while mounted (its `pages` file has no name left),
//! the index is emptied and the file's blocks are given back (logged once): lookups miss, nothing more is written,
//! reads go to the store.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::cache::page::PageBuf;
use crate::crypto::diskcache::{CacheKeys, EntryId, EntrySealer, ENTRY_HEAD, ENTRY_OVERHEAD};
use crate::crypto::aead::TAG_LEN;
use crate::crypto::hex::{hex, unhex};
use crate::crypto::{AeadBackend, CHUNK_PLAIN_LEN};
use crate::journal::dir::{try_lock, Dir, TrustError};
use crate::kms::{KmsClient, KmsError};
use crate::memory::{MemoryBudget, Reservation};

/// Entries are counted in blocks of this size (what a 64 KiB entry takes on ext4, xfs or btrfs).
const BLOCK: u64 = 4096;
/// The header file.
const HEADER: &str = "cache.json";
/// The lock file.
const LOCK: &str = "lock";
/// A cache directory's entries, in slots.
const PAGES: &str = "pages";
/// A cache directory's labels, one per slot.
const LABELS: &str = "labels";
/// 1: a file per entry (up to 2026-12); 2: slots (`pages`, `labels`).
const HEADER_VERSION: u32 = 2;
/// A label: magic, the order it was written in, the entry's length, its name.
const LABEL_LEN: usize = 48;
const LABEL_MAGIC: &[u8; 4] = b"dcl2";
/// Orders at or above this are not a label's (a counter from 1 never gets there): no start wraps its counter.
const MAX_ORDER: u64 = 1 << 62;
/// Labels read at a time by a start.
const LABELS_PER_READ: usize = 4096;
/// The KMS encryption-context entry that binds the cache's root key to its store.
const KMS_CONTEXT_CACHE: &str = "s3cryptfs:cache";
/// Damaged entries logged at warning level per mount; the rest are counted only.
const MAX_DAMAGE_LOGS: u64 = 20;
/// Default limit: this share of the free space at mount, at most [`DEFAULT_MAX`].
const DEFAULT_SHARE: u64 = 4;
const DEFAULT_MAX: u64 = 64 << 30;
/// The scratch's default limit, at most (with [`DEFAULT_SHARE`] of the free space): objects up to 1 GiB are then
/// fetched whole there for a random reader (a quarter of the limit, `read`), and its index takes about 15 MiB.
pub const SCRATCH_DEFAULT_MAX: u64 = 4 << 30;
/// Memory an entry of the index takes, at most (its name, the recency list's node, the hash table's share), counted
/// against `max_memory`.
const INDEX_BYTES_PER_ENTRY: u64 = 256;
/// The share of the memory budget the index may take: for the scratch the limit shrinks to fit, a cache directory
/// holds at most that many entries (253,952 with the default `max_memory=512M`, whose budget is 496 MiB: about
/// 15.5 GiB of full pages).
const INDEX_SHARE_OF_BUDGET: u64 = 8;
/// Entries of a cache directory's index paid for at once (1 MiB of the budget).
const INDEX_STEP: u64 = 4096;
/// A scratch slot: the largest entry (a 64 KiB page sealed), in whole blocks.
const SLOT: u64 = (CHUNK_PLAIN_LEN + ENTRY_OVERHEAD as u64).div_ceil(BLOCK) * BLOCK;

/// What [`DiskCache::evict_for`] found for an entry about to be written.
#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// Room made and reserved for it, under this reservation number ([`Kept::reservation`]).
    Made(u64),
    /// No room, even with the cache empty (or the disk below its reserve).
    None,
    /// The entry is there already, or being written by another read.
    Taken,
}

/// Why the disk cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error("cache_dir: {0}")]
    Trust(String),
    #[error("cache_dir {path} is in use by another mount of the same store: give each mount its own cache_dir")]
    InUse { path: PathBuf },
    #[error("cache_dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache_dir: getting the cache's key from KMS: {0}")]
    Kms(#[from] KmsError),
}

impl From<TrustError> for DiskCacheError {
    fn from(e: TrustError) -> Self {
        // The trust checks are the journal's, and so is their advice; here the option to change is cache_dir.
        DiskCacheError::Trust(
            e.to_string()
                .replace("journal directory with -o staging_dir=DIR", "cache directory with -o cache_dir=DIR")
                .replace("the journal directory", "the cache directory"),
        )
    }
}

/// Where the cache's root key comes from (see `crypto::diskcache`).
pub enum CacheKeying {
    /// The write journal's root: the customer key, or the plaintext modes' local journal key.
    Root(Zeroizing<[u8; 32]>),
    /// cse-kms: a KMS data key, generated once and kept wrapped in the header.
    Kms(Arc<KmsClient>),
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    check: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_blob: Option<String>,
}

/// An entry of the index.
struct Kept {
    /// Bytes counted for it.
    size: u64,
    /// Its slot, once written whole (an entry being written owns its slot until it is done, and has none here
    /// meanwhile).
    slot: Option<u64>,
    /// Which reservation made it: a writer finishes only the reservation it made, not one made for the same page
    /// after its own was evicted.
    reservation: u64,
}

struct State {
    /// Entry name → what is kept for it. Reserved before the entry is written.
    lru: LruCache<String, Kept>,
    used: u64,
    written: u64,
    evicted: u64,
    dropped: u64,
    reservations: u64,
    /// Slots no entry or writer holds, to be given out before new ones.
    free: Vec<u64>,
    /// Slots given out so far: the next new slot.
    next_slot: u64,
}

impl State {
    fn new() -> State {
        State {
            lru: LruCache::unbounded(),
            used: 0,
            written: 0,
            evicted: 0,
            dropped: 0,
            reservations: 0,
            free: Vec::new(),
            next_slot: 0,
        }
    }

    /// A slot for an entry about to be written.
    fn take_slot(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        })
    }
}

/// Where the entries are kept (in slots of [`SLOT`] bytes of [`DiskCache::file`] either way).
enum Place {
    /// A cache directory (`cache_dir=`): its `pages` file, with a label per slot in `labels`, reused by the next
    /// mount.
    Dir { dir: Dir, _lock: File, labels: File },
    /// The scratch (no `cache_dir=`): one unnamed file of the write journal's run directory (`at`), sealed under a
    /// key that exists only in this process, no labels. Nothing outlives the mount, a crash included; only
    /// whole-object fetches for random readers are kept there (see [`DiskCache::keeps_every_read`]).
    Scratch { at: PathBuf },
}

/// Counters for tests and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCacheStats {
    pub entries: usize,
    pub used: u64,
    pub written: u64,
    pub evicted: u64,
    pub dropped: u64,
}

/// What a cache directory's index holds of the memory budget: reserved a step ([`INDEX_STEP`] entries) at a time as
/// the index grows, never waiting (a reservation that does not fit now is not made: the entry then replaces another),
/// up to [`INDEX_SHARE_OF_BUDGET`] of the budget, and kept until the cache closes.
struct IndexMemory {
    memory: Arc<MemoryBudget>,
    steps: Mutex<Vec<Reservation>>,
    /// Entries the steps pay for. Only grows, under `steps`' lock.
    paid: AtomicU64,
    /// At most this many entries, whatever the budget has free.
    cap: u64,
}

impl IndexMemory {
    fn new(memory: &Arc<MemoryBudget>) -> IndexMemory {
        let cap = memory.limit() / INDEX_SHARE_OF_BUDGET / INDEX_BYTES_PER_ENTRY;
        IndexMemory { memory: Arc::clone(memory), steps: Mutex::new(Vec::new()), paid: AtomicU64::new(0), cap }
    }

    /// How many entries the index may hold, having paid (if the budget has it free now) for `entries`.
    fn pay_for(&self, entries: u64) -> u64 {
        let entries = entries.min(self.cap);
        let paid = self.paid.load(Ordering::Acquire);
        if paid >= entries {
            return paid;
        }
        let mut steps = lock(&self.steps);
        let mut paid = self.paid.load(Ordering::Acquire);
        while paid < entries {
            let step = INDEX_STEP.min(self.cap - paid);
            match self.memory.try_reserve(step * INDEX_BYTES_PER_ENTRY) {
                Some(r) => steps.push(r),
                None => break,
            }
            paid += step;
        }
        self.paid.store(paid, Ordering::Release);
        paid
    }
}

pub struct DiskCache {
    place: Place,
    /// The slots.
    file: File,
    /// The next label's place in the order entries were written (a cache directory).
    next_label: AtomicU64,
    /// The cache directory's files lost their names while mounted: the cache is closed.
    gone: AtomicBool,
    /// Every entry counts as a whole slot: the scratch (its limit says how many slots), and a cache directory on a
    /// filesystem that makes no holes (a freed slot keeps its blocks until it is written again).
    whole_slots: bool,
    /// The scratch's index, counted in the memory budget for as long as the mount lives.
    _index: Option<Reservation>,
    /// A cache directory's index, counted in the memory budget as it grows.
    index_memory: Option<IndexMemory>,
    keys: CacheKeys,
    sealer: EntrySealer,
    limit: u64,
    state: Mutex<State>,
    damage_logs: AtomicU64,
    io_warned: AtomicBool,
    /// Written bytes, evictions and drops already added to the metrics (which take deltas).
    reported: Mutex<(u64, u64, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an entry of `len` bytes is counted as.
fn counted(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

fn is_entry_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Opens the checked file `name` of `dir` for reading and writing, creating it (0600) if missing.
fn open_or_create(dir: &Dir, name: &str) -> Result<File, DiskCacheError> {
    let io_at = |source| DiskCacheError::Io { path: dir.path().join(name), source };
    match dir.open_file(name, true)? {
        Some(f) => Ok(f),
        None => match dir.create_file(name) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                dir.open_file(name, true)?.ok_or_else(|| io_at(io::Error::other("it vanished while it was opened")))
            }
            Err(e) => Err(io_at(e)),
        },
    }
}

/// Reads of `file` do not update its access time: a read without a blocking task (`get_many_now`) would otherwise
/// start a journal transaction on the filesystem now and then. Best effort (the daemon owns the file).
fn no_atime(file: &File) {
    // SAFETY: flags of an open descriptor; failure changes nothing.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NOATIME);
        }
    }
}

/// The entry a label names: the order it was written in, its name and its sealed length; `None` for a free slot or
/// a label that is not one.
fn read_label(label: &[u8]) -> Option<(u64, String, u64)> {
    let order = u64::from_be_bytes(label.get(4..12)?.try_into().ok()?);
    let len = u64::from(u32::from_be_bytes(label.get(12..16)?.try_into().ok()?));
    let plausible = label.starts_with(LABEL_MAGIC)
        && (1..MAX_ORDER).contains(&order)
        && (ENTRY_OVERHEAD as u64..=SLOT).contains(&len);
    plausible.then(|| hex(&label[16..LABEL_LEN]))
        .map(|name| (order, name, len))
}

/// Gives `len` bytes of `file` from `at` back to the filesystem (a hole). If the filesystem cannot make holes the
/// blocks stay allocated: the file still stays within the limit, since there every entry counts as a whole slot
/// ([`makes_holes`]) and freed slots are given out before new ones.
fn punch(file: &File, at: u64, len: u64) {
    let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a range of an open descriptor.
    unsafe { libc::fallocate(file.as_raw_fd(), flags, at as libc::off_t, len as libc::off_t) };
}

/// Whether the filesystem under `file` makes holes (`fallocate(PUNCH_HOLE)`), asked for a range past the file's end,
/// so that nothing in it changes.
fn makes_holes(file: &File) -> bool {
    let end = file.metadata().map_or(0, |m| m.len()).div_ceil(SLOT) * SLOT;
    let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a range of an open descriptor, past its end.
    unsafe { libc::fallocate(file.as_raw_fd(), flags, end as libc::off_t, BLOCK as libc::off_t) == 0 }
}

/// Free and total bytes of the filesystem holding `path`.
fn space(path: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

impl DiskCache {
    /// Opens (creating it if missing) the cache of `store` under `base`, bounded by `limit` bytes (default: a quarter
    /// of the free space there, at most 64 GiB) and by what its index may take of `memory`. Fails if another mount of
    /// the store uses it, or if a directory or file on the way fails the ownership checks.
    pub async fn open(
        base: &Path,
        store: &str,
        keying: CacheKeying,
        limit: Option<u64>,
        memory: &Arc<MemoryBudget>,
        aead: AeadBackend,
    ) -> Result<DiskCache, DiskCacheError> {
        let base_dir = Dir::open_base(base)?;
        let dir = base_dir.subdir(&crate::journal::store_dir_name(store), true)?.ok_or_else(|| DiskCacheError::Io {
            path: base.to_path_buf(),
            source: io::Error::other("the store's cache directory vanished while it was created"),
        })?;
        let io_at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DiskCacheError::Io { path, source }
        };
        let lock_file = open_or_create(&dir, LOCK)?;
        if !try_lock(&lock_file).map_err(io_at(dir.path()))? {
            return Err(DiskCacheError::InUse { path: dir.path().to_path_buf() });
        }
        let header: Option<Header> = match dir.read_file(HEADER, 64 << 10)? {
            Some(bytes) => match serde_json::from_slice::<Header>(&bytes) {
                Ok(h) if h.version == HEADER_VERSION => Some(h),
                _ => {
                    tracing::warn!(dir = %dir.path().display(), "the disk cache's header is unreadable or of another version; the cache starts empty");
                    None
                }
            },
            None => None,
        };
        let context = [(KMS_CONTEXT_CACHE, store.to_string())];
        let (root, kms_key_id, kms_blob) = match keying {
            CacheKeying::Root(root) => (root, None, None),
            CacheKeying::Kms(kms) => {
                let wrapped = header.as_ref().and_then(|h| Some((h.kms_key_id.clone()?, unhex(h.kms_blob.as_deref()?)?)));
                let kept = match wrapped {
                    Some((id, blob)) => match kms.decrypt(&id, &blob, &context).await {
                        Ok(dk) => Some((Zeroizing::new(*dk.as_bytes()), id, blob)),
                        Err(e) => {
                            tracing::warn!(error = %crate::error_text::error_chain(&e), "the disk cache's key could not be unwrapped; the cache starts empty");
                            None
                        }
                    },
                    None => None,
                };
                match kept {
                    Some((root, id, blob)) => (root, Some(id), Some(hex(&blob))),
                    None => {
                        let generated = kms.generate_data_key(&context).await?;
                        let root = Zeroizing::new(*generated.data_key.as_bytes());
                        (root, Some(generated.key_arn.clone()), Some(hex(&generated.blob)))
                    }
                }
            }
        };
        let keys = CacheKeys::derive(&root, store, aead);
        drop(root);
        let check = hex(&keys.check());
        let same_key = header.as_ref().is_some_and(|h| h.check == check);
        let limit = match limit {
            Some(l) => l,
            None => space(dir.path()).map_or(1 << 30, |(free, _)| (free / DEFAULT_SHARE).min(DEFAULT_MAX)),
        };
        let path = dir.path().to_path_buf();
        let text = serde_json::to_vec(&Header { version: HEADER_VERSION, check, kms_key_id, kms_blob })
            .map_err(|e| io_at(&path)(io::Error::other(e)))?;
        let (pages, labels) = (open_or_create(&dir, PAGES)?, open_or_create(&dir, LABELS)?);
        no_atime(&pages);
        let whole_slots = !makes_holes(&pages);
        if whole_slots {
            tracing::info!(dir = %path.display(), "the filesystem under cache_dir makes no holes: every page counts as a whole slot (68 KiB)");
        }
        let place = Place::Dir { dir, _lock: lock_file, labels };
        let mut cache = DiskCache::with_place(place, pages, keys, limit);
        cache.whole_slots = whole_slots;
        cache.index_memory = Some(IndexMemory::new(memory));
        if !same_key && header.is_some() {
            tracing::info!(dir = %path.display(), "the disk cache was sealed under another key; it starts empty");
        }
        cache.scan(same_key).map_err(io_at(&path))?;
        if let Some(dir) = cache.dir() {
            dir.write_file(HEADER, &text).map_err(io_at(&path))?;
        }
        cache.make_room(0);
        cache.report_delta();
        Ok(cache)
    }

    /// The scratch of a mount without a cache directory: `file`, a new unnamed file (made in `at`, the write
    /// journal's run directory), bounded by `limit` bytes (default: a quarter of the free space there, at most
    /// [`SCRATCH_DEFAULT_MAX`]) and by what its index may take of `memory` (an eighth of it, reserved now), its
    /// entries sealed under a random key that never leaves this process.
    pub fn scratch(
        file: File,
        at: &Path,
        store: &str,
        limit: Option<u64>,
        memory: &Arc<MemoryBudget>,
        aead: AeadBackend,
    ) -> DiskCache {
        let mut root = Zeroizing::new([0u8; 32]);
        crate::crypto::secret::fill_random(&mut root[..]);
        let keys = CacheKeys::derive(&root, store, aead);
        drop(root);
        no_atime(&file);
        let limit = limit
            .unwrap_or_else(|| space(at).map_or(1 << 30, |(free, _)| (free / DEFAULT_SHARE).min(SCRATCH_DEFAULT_MAX)));
        // Slots for the whole limit (a last one for its remainder), unless the index would outgrow its share.
        let entries = limit.div_ceil(SLOT).min(memory.limit() / INDEX_SHARE_OF_BUDGET / INDEX_BYTES_PER_ENTRY);
        let index = memory.try_reserve(entries * INDEX_BYTES_PER_ENTRY);
        let limit = if index.is_some() { limit.min(entries * SLOT) } else { 0 };
        let mut cache = DiskCache::with_place(Place::Scratch { at: at.to_path_buf() }, file, keys, limit);
        cache._index = index;
        cache.report_delta();
        cache
    }

    fn with_place(place: Place, file: File, keys: CacheKeys, limit: u64) -> DiskCache {
        DiskCache {
            file,
            next_label: AtomicU64::new(1),
            gone: AtomicBool::new(false),
            whole_slots: true,
            _index: None,
            index_memory: None,
            sealer: keys.sealer(),
            keys,
            limit,
            state: Mutex::new(State::new()),
            damage_logs: AtomicU64::new(0),
            io_warned: AtomicBool::new(false),
            reported: Mutex::new((0, 0, 0)),
            place,
        }
    }

    /// The cache directory, unless this is the scratch.
    fn dir(&self) -> Option<&Dir> {
        match &self.place {
            Place::Dir { dir, .. } => Some(dir),
            Place::Scratch { .. } => None,
        }
    }

    /// Whether every page read from the store is kept here (a cache directory), or only whole-object fetches for
    /// random readers (the scratch: a sequential reader would pay a disk write per page for pages it never reads
    /// again, and nothing here outlives the mount).
    pub fn keeps_every_read(&self) -> bool {
        matches!(self.place, Place::Dir { .. })
    }

    /// Takes stock of the entries left by earlier mounts (all dropped unless `keep`), oldest first in the recency
    /// order (the order their labels give); frees every slot no label names (what a dead daemon left half written)
    /// and the slots of the oldest entries past what the memory budget pays an index for; removes the files of the
    /// earlier layout (a file per entry).
    fn scan(&self, keep: bool) -> io::Result<()> {
        let Place::Dir { dir, labels, .. } = &self.place else { return Ok(()) };
        for name in dir.entries()? {
            if [LOCK, HEADER, PAGES, LABELS].contains(&name.as_str()) {
                continue;
            }
            if is_entry_name(&name) || name.ends_with(".tmp") {
                let _ = dir.remove(&name);
            } else {
                tracing::warn!(dir = %dir.path().display(), name, "a file that is not the disk cache's is in its directory; left alone");
            }
        }
        let slots = match keep {
            true => self.file.metadata()?.len().div_ceil(SLOT).min(labels.metadata()?.len() / LABEL_LEN as u64),
            false => 0,
        };
        // (order written, slot, name, length) of every slot labelled.
        let mut found = Vec::new();
        let mut buf = vec![0u8; LABELS_PER_READ * LABEL_LEN];
        let mut first = 0;
        while first < slots {
            let n = (slots - first).min(LABELS_PER_READ as u64) as usize;
            labels.read_exact_at(&mut buf[..n * LABEL_LEN], first * LABEL_LEN as u64)?;
            for (j, label) in buf[..n * LABEL_LEN].chunks_exact(LABEL_LEN).enumerate() {
                if let Some((order, name, len)) = read_label(label) {
                    found.push((order, first + j as u64, name, len));
                }
            }
            first += n as u64;
        }
        found.sort_unstable_by_key(|f| f.0);
        // A name labelled twice (an entry evicted, written again elsewhere, and a kill before the old slot's label
        // was cleared): the newest counts, the other slot is freed.
        let mut seen = std::collections::HashSet::new();
        let newest: Vec<bool> = found.iter().rev().map(|f| seen.insert(f.2.clone())).collect();
        let mut newest = newest.into_iter().rev();
        found.retain(|_| newest.next().unwrap_or(false));
        drop(seen);
        let paid = self.index_memory.as_ref().map_or(u64::MAX, |m| m.pay_for(found.len() as u64));
        let over = found.len().saturating_sub(usize::try_from(paid).unwrap_or(usize::MAX));
        found.drain(..over);
        if over > 0 {
            let (removed, kept) = (over, found.len());
            tracing::info!(dir = %dir.path().display(), removed, kept,
                "the disk cache had more entries than max_memory pays an index for; the oldest were removed");
        }
        // Both files end after the last slot kept; every other slot before it is freed: label cleared, blocks given
        // back, a run of free slots at a time.
        let end = found.iter().map(|f| f.1 + 1).max().unwrap_or(0);
        self.file.set_len(end * SLOT)?;
        labels.set_len(end * LABEL_LEN as u64)?;
        let mut held = vec![false; end as usize];
        for f in &found {
            held[f.1 as usize] = true;
        }
        let mut free = Vec::new();
        let mut slot = 0;
        while slot < end {
            if held[slot as usize] {
                slot += 1;
                continue;
            }
            let run = slot..(slot..end).find(|&s| held[s as usize]).unwrap_or(end);
            let zeros = vec![0u8; (run.end - run.start).min(LABELS_PER_READ as u64) as usize * LABEL_LEN];
            let mut at = run.start;
            while at < run.end {
                let n = (run.end - at).min(LABELS_PER_READ as u64);
                labels.write_all_at(&zeros[..n as usize * LABEL_LEN], at * LABEL_LEN as u64)?;
                at += n;
            }
            punch(&self.file, run.start * SLOT, (run.end - run.start) * SLOT);
            free.extend(run.clone());
            slot = run.end;
        }
        // Given out lowest first.
        free.reverse();
        let mut st = lock(&self.state);
        let mut order = 0;
        for (written, slot, name, len) in found {
            let size = if self.whole_slots { SLOT } else { counted(len) };
            st.used += size;
            st.reservations += 1;
            let reservation = st.reservations;
            st.lru.put(name, Kept { size, slot: Some(slot), reservation });
            order = written;
        }
        st.free = free;
        st.next_slot = end;
        self.next_label.store(order + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the label of `slot` (a cache directory's): `entry` (its name and length) written there, or none (all
    /// zero). Nothing for the scratch.
    fn label(&self, slot: u64, entry: Option<(&str, usize)>) -> io::Result<()> {
        let Place::Dir { labels, .. } = &self.place else { return Ok(()) };
        let mut label = [0u8; LABEL_LEN];
        if let Some((name, len)) = entry {
            let raw = unhex(name).filter(|r| r.len() == 32).ok_or_else(|| io::Error::other("not an entry name"))?;
            label[..4].copy_from_slice(LABEL_MAGIC);
            label[4..12].copy_from_slice(&self.next_label.fetch_add(1, Ordering::Relaxed).to_be_bytes());
            label[12..16].copy_from_slice(&(len as u32).to_be_bytes());
            label[16..].copy_from_slice(&raw);
        }
        labels.write_all_at(&label, slot * LABEL_LEN as u64)
    }

    /// Whether the cache is closed: its directory's `pages` file lost its name while mounted (checked now). The
    /// first to find it so empties the index and gives the file's blocks back.
    ///
    /// `gone` is set under the state's lock, and every writer looks at it there before it reserves room and when it
    /// commits its entry, so no entry is kept after the index was emptied. A writer already writing when the cache
    /// closed may still put blocks in the files; it empties them again when it finds the cache closed
    /// ([`Self::empty`]).
    fn closed(&self) -> bool {
        if self.gone.load(Ordering::Relaxed) {
            return true;
        }
        if !self.keeps_every_read() || !self.file.metadata().is_ok_and(|m| m.nlink() == 0) {
            return false;
        }
        {
            let mut st = lock(&self.state);
            if self.gone.swap(true, Ordering::Relaxed) {
                return true;
            }
            st.lru.clear();
            st.used = 0;
            st.free.clear();
        }
        tracing::warn!(dir = %self.path().display(), "the disk cache's directory was removed while mounted; the cache is closed, reads go to the store");
        self.empty();
        self.report_delta();
        true
    }

    /// Gives every block of a closed cache directory's files back to the disk.
    fn empty(&self) {
        let _ = self.file.set_len(0);
        if let Place::Dir { labels, .. } = &self.place {
            let _ = labels.set_len(0);
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The cache directory, or where the scratch was made.
    pub fn path(&self) -> &Path {
        match &self.place {
            Place::Dir { dir, .. } => dir.path(),
            Place::Scratch { at, .. } => at,
        }
    }

    pub fn stats(&self) -> DiskCacheStats {
        let st = lock(&self.state);
        let (used, written, evicted, dropped) = (st.used, st.written, st.evicted, st.dropped);
        DiskCacheStats { entries: st.lru.len(), used, written, evicted, dropped }
    }

    fn damaged(&self, name: &str, why: &str) {
        let n = self.damage_logs.fetch_add(1, Ordering::Relaxed);
        if n < MAX_DAMAGE_LOGS {
            tracing::warn!(dir = %self.path().display(), entry = name, why, "a disk cache entry is damaged or not ours; removed, the page is fetched from the store");
        } else if n == MAX_DAMAGE_LOGS {
            tracing::warn!(dir = %self.path().display(), "more damaged disk cache entries; no longer logged (see s3cryptfs_disk_cache_dropped_total)");
        }
    }

    fn io_failed(&self, what: &str, e: &io::Error) {
        if !self.io_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.path().display(), error = %e, what, "the disk cache cannot be written; reads go to the store (logged once)");
        }
    }

    /// Whether the cache has an entry for page `id` (not whether it still opens). No I/O; does not count as a use.
    pub fn contains(&self, id: &EntryId) -> bool {
        let name = self.keys.entry_name(id);
        lock(&self.state).lru.contains(&name)
    }

    /// Page `id` if the cache has it, exactly `len` bytes, appended to `out`. Blocking file I/O.
    pub fn get(&self, id: &EntryId, len: usize, out: &mut Vec<u8>) -> bool {
        let mut found = false;
        self.get_many(&[(*id, len)], |_, page| {
            out.extend_from_slice(&page);
            found = true;
        });
        found
    }

    /// Calls `hit(i, page)` for each page `pages[i]` (identity, length) the cache has, decrypted straight into a page
    /// buffer of its own. Blocking file I/O: every entry is opened and its read asked for ahead
    /// (`POSIX_FADV_WILLNEED`) before the first is read, so a run of pages no longer in the system's page cache is
    /// read from the disk in parallel, not one after the other.
    pub fn get_many(&self, pages: &[(EntryId, usize)], mut hit: impl FnMut(usize, Bytes)) {
        if self.closed() {
            return;
        }
        let names: Vec<String> = pages.iter().map(|(id, _)| self.keys.entry_name(id)).collect();
        let slots = self.slots_of(&names);
        for (slot, (_, len)) in slots.iter().zip(pages) {
            if let Some(slot) = slot {
                let (at, len) = ((slot * SLOT) as libc::off_t, (len + ENTRY_OVERHEAD) as libc::off_t);
                // SAFETY: advice on an open descriptor; failure only loses the read-ahead.
                unsafe { libc::posix_fadvise(self.file.as_raw_fd(), at, len, libc::POSIX_FADV_WILLNEED) };
            }
        }
        for (i, slot) in slots.into_iter().enumerate() {
            let Some(slot) = slot else { continue };
            let (id, len) = &pages[i];
            match self.read_slot(slot, id, *len, 0) {
                Ok(page) => hit(i, page),
                Err(e) => self.drop_entry(&names[i], &e.to_string(), Some(slot)),
            }
        }
    }

    /// [`DiskCache::get_many`] for a caller that must not block (an async task): only when the system's page cache
    /// holds every byte of the entries (read with `RWF_NOWAIT`). A read served this way
    /// is answered on the thread that took it from the kernel, with no hand-off to a blocking task and back, and its
    /// ciphertext is read straight into the page and decrypted there: 4,000 random 4 KiB reads served from the
    /// scratch took 0.22–0.26 s instead of 0.38–0.48 s (Garage, `cache_size=32M`, 3 alternating runs).
    /// `None` when any entry would block, did not read whole or does not open: the caller then asks
    /// [`DiskCache::get_many`] in a blocking task, which also drops what does not open. `Some` holds each page
    /// found; an entry missing (or still being written) is `None` in it.
    pub fn get_many_now(&self, pages: &[(EntryId, usize)]) -> Option<Vec<Option<Bytes>>> {
        if self.closed() {
            return Some(vec![None; pages.len()]);
        }
        let names: Vec<String> = pages.iter().map(|(id, _)| self.keys.entry_name(id)).collect();
        let mut found = Vec::with_capacity(pages.len());
        for (slot, (id, len)) in self.slots_of(&names).into_iter().zip(pages) {
            match slot {
                None => found.push(None),
                // A slot given to another page since the lookup does not open as this one.
                Some(slot) => found.push(Some(self.read_slot(slot, id, *len, libc::RWF_NOWAIT).ok()?)),
            }
        }
        Some(found)
    }

    /// The slot of each entry `names` (a use of each), `None` for one the scratch does not have or is still writing.
    fn slots_of(&self, names: &[String]) -> Vec<Option<u64>> {
        let mut st = lock(&self.state);
        names.iter().map(|n| st.lru.get(n).and_then(|k| k.slot)).collect()
    }

    /// The page `slot` holds for `id` (`len` bytes), read with `preadv2` `flags` in three pieces (head,
    /// ciphertext straight into the page, tag) and decrypted in place: no buffer for the entry, no copy of it. `Err`
    /// with why not: the read would block (`RWF_NOWAIT`), failed or came short, or the entry does not open as this
    /// page.
    fn read_slot(&self, slot: u64, id: &EntryId, len: usize, flags: libc::c_int) -> io::Result<Bytes> {
        let (mut head, mut tag) = ([0u8; ENTRY_HEAD], [0u8; TAG_LEN]);
        let mut page = PageBuf::for_len(len);
        read_pieces(&self.file, &mut [&mut head, page.as_mut_slice(), &mut tag], slot * SLOT, flags)?;
        self.keys
            .open_in_place(id, &head, page.as_mut_slice(), &tag)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it does not authenticate as this page"))?;
        Ok(page.freeze())
    }

    /// Whether any page of `pages` has an entry (not whether it still opens). No I/O; not a use.
    pub fn contains_any(&self, pages: &[EntryId]) -> bool {
        let names: Vec<String> = pages.iter().map(|id| self.keys.entry_name(id)).collect();
        let st = lock(&self.state);
        names.iter().any(|n| st.lru.contains(n))
    }

    /// Gives `slots` back: their labels cleared, their blocks to the filesystem (holes), then the slots to the next
    /// entries. Each slot is held by no entry and no writer by now, and is cleared before it can be given out again.
    /// Not under the state's lock: an eviction of thousands of slots does not hold up every lookup meanwhile.
    fn free_slots(&self, slots: &[u64]) {
        if slots.is_empty() {
            return;
        }
        if self.gone.load(Ordering::Relaxed) {
            self.empty();
            return;
        }
        for &slot in slots {
            // A label left by a failed write names an entry the slot no longer holds: a miss at the next start.
            let _ = self.label(slot, None);
            punch(&self.file, slot * SLOT, SLOT);
        }
        lock(&self.state).free.extend_from_slice(slots);
    }

    /// Drops a damaged entry: once, by the first of the reads that found it so (a read and the read-ahead may both
    /// have opened it); for the others it is gone from the index already, perhaps written anew, and left alone.
    fn drop_entry(&self, name: &str, why: &str, seen: Option<u64>) {
        let slot = {
            let mut st = lock(&self.state);
            // Only the entry whose slot was read: the slot may have been evicted and given to another page since, and
            // the name written again elsewhere.
            if st.lru.peek(name).is_none_or(|k| k.slot != seen) {
                return;
            }
            let Some(kept) = st.lru.pop(name) else { return };
            st.used -= kept.size;
            st.dropped += 1;
            kept.slot
        };
        self.free_slots(slot.as_slice());
        self.damaged(name, why);
        self.report_delta();
    }

    /// Keeps page `id`. Blocking file I/O. Skipped when the entry is there already (or being written) or cannot get
    /// room. `true` when the cache has the entry now (or another write of it is under way).
    pub fn put(&self, id: &EntryId, plain: &[u8]) -> bool {
        let name = self.keys.entry_name(id);
        lock(&self.state).lru.contains(&name) || self.put_named(&name, id, &mut plain.to_vec())
    }

    /// [`DiskCache::put`] of a page the caller no longer needs: it is encrypted where it is (into the scratch it is
    /// written from there, with no copy), so `page` holds ciphertext afterwards, unless the entry was there already.
    pub fn put_in_place(&self, id: &EntryId, page: &mut [u8]) -> bool {
        let name = self.keys.entry_name(id);
        lock(&self.state).lru.contains(&name) || self.put_named(&name, id, page)
    }

    /// [`DiskCache::put_in_place`] of the entry named `name` (`id`'s), not there a moment ago.
    fn put_named(&self, name: &str, id: &EntryId, page: &mut [u8]) -> bool {
        let sealed_len = page.len() + ENTRY_OVERHEAD;
        if sealed_len as u64 > SLOT || self.closed() {
            return false;
        }
        let size = if self.whole_slots { SLOT } else { counted(sealed_len as u64) };
        if size > self.limit {
            return false;
        }
        let reservation = match self.reserve(name, size) {
            Room::Taken => return true,
            Room::None => return false,
            Room::Made(reservation) => reservation,
        };
        let (head, tag) = self.keys.seal_in_place(&self.sealer, id, page);
        let slot = lock(&self.state).take_slot();
        // The label after the entry: a label names only an entry written whole (unless the disk itself lost it).
        let written = write_pieces(&self.file, [&head[..], page, &tag], slot * SLOT)
            .and_then(|()| self.label(slot, Some((name, sealed_len))));
        let mut st = lock(&self.state);
        if self.gone.load(Ordering::Relaxed) {
            drop(st);
            self.empty();
            return false;
        }
        // Still this write's own reservation (not evicted meanwhile, nor evicted and made again by another write).
        let ours = st.lru.peek(name).is_some_and(|k| k.reservation == reservation);
        match written {
            Ok(()) if ours => {
                st.written += sealed_len as u64;
                if let Some(kept) = st.lru.peek_mut(name) {
                    kept.slot = Some(slot);
                }
            }
            // Evicted while it was being written: the slot is ours alone, and goes now.
            Ok(()) => {
                let other = st.lru.contains(name);
                drop(st);
                self.free_slots(&[slot]);
                // Another write of the page made it again meanwhile: the cache has it (or will).
                return other;
            }
            Err(e) => {
                if ours {
                    st.lru.pop(name);
                    st.used -= size;
                }
                drop(st);
                self.free_slots(&[slot]);
                self.io_failed("writing an entry", &e);
                return false;
            }
        }
        drop(st);
        self.report_delta();
        true
    }

    /// Reserves `size` bytes for entry `name`, removing least recently used entries for room within the limit and
    /// on the disk.
    fn reserve(&self, name: &str, size: u64) -> Room {
        self.evict_for(size, Some(name))
    }

    /// Removes entries until the cache is within its limit and the disk has its reserve free (plus `extra`).
    fn make_room(&self, extra: u64) {
        self.evict_for(extra, None);
    }

    /// Removes entries until the disk has its reserve free again: for the write journal, when the disk they share
    /// runs low (blocking file I/O).
    pub fn give_room(&self) {
        self.make_room(0);
        self.report_delta();
    }

    /// Evicts least recently used entries until `size` more bytes fit within the limit and the disk's reserve; then,
    /// if `name` is given, reserves them for it ([`Room`] says which happened).
    fn evict_for(&self, size: u64, name: Option<&str>) -> Room {
        let low = self.low_space(size);
        // Entries the index may hold, one more included when an entry is to be added (paid for outside the state's
        // lock: a reservation may make the page cache shrink). It only grows, so holding the count under it at each
        // insert keeps the index within what is paid for.
        let allowed = match (&self.index_memory, name) {
            (Some(m), Some(_)) => {
                let len = lock(&self.state).lru.len() as u64;
                m.pay_for(len + 1)
            }
            _ => u64::MAX,
        };
        let mut slots = Vec::new();
        let made = {
            let mut st = lock(&self.state);
            if self.gone.load(Ordering::Relaxed) {
                return Room::None;
            }
            // Two reads of one page (a read and a whole-object fetch) may both get here: the first one writes it, and
            // the entry is counted once.
            if name.is_some_and(|n| st.lru.contains(n)) {
                return Room::Taken;
            }
            // Steps other writers paid for since count too (what is paid is never given back before the cache closes).
            let allowed = match &self.index_memory {
                Some(m) if name.is_some() => allowed.max(m.paid.load(Ordering::Acquire)),
                _ => allowed,
            };
            let mut need = (st.used + if name.is_some() { size } else { 0 }).saturating_sub(self.limit).max(low);
            while need > 0 || st.lru.len() as u64 >= allowed {
                let Some((_, kept)) = st.lru.pop_lru() else { break };
                st.used -= kept.size;
                st.evicted += 1;
                need = need.saturating_sub(kept.size);
                slots.extend(kept.slot);
            }
            match (need, name) {
                (0, Some(name)) if (st.lru.len() as u64) < allowed => {
                    st.used += size;
                    st.reservations += 1;
                    let reservation = st.reservations;
                    st.lru.put(name.to_string(), Kept { size, slot: None, reservation });
                    Room::Made(reservation)
                }
                (0, None) => Room::Made(0),
                _ => Room::None,
            }
        };
        self.free_slots(&slots);
        made
    }

    /// Bytes to free so that the disk keeps its reserve after `size` more are written: 5 % of it, at most 1 GiB;
    /// for the scratch, which shares its disk with the write journal, what the journal needs not to run low (a
    /// quarter of it, at most 1 GiB: `Journal::low_on_space`).
    fn low_space(&self, size: u64) -> u64 {
        let Some((free, total)) = space(self.path()) else { return 0 };
        let share = if self.keeps_every_read() { 20 } else { 4 };
        let reserve = (total / share).min(1 << 30);
        (reserve + size).saturating_sub(free)
    }

    /// Adds what was written, evicted and dropped since the last report to the metrics; returns those amounts.
    fn report_delta(&self) -> (u64, u64, u64) {
        // The counts are read under the report's lock: read before it, another writer's later counts could be
        // reported first, and these would then be less than the last reported.
        let mut last = lock(&self.reported);
        let (written, evicted, dropped, used) = {
            let st = lock(&self.state);
            (st.written, st.evicted, st.dropped, st.used)
        };
        let delta = (written - last.0, evicted - last.1, dropped - last.2);
        crate::metrics::disk_cache_changed(used, delta.0, delta.1, delta.2);
        *last = (written, evicted, dropped);
        delta
    }
}

/// Writes `bufs`, in order, to `file` at `at`: one `pwritev` (more only after a short write), every byte or an
/// error.
fn write_pieces(file: &File, bufs: [&[u8]; 3], at: u64) -> io::Result<()> {
    let want: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0;
    while done < want {
        // What is left of the three pieces after the `done` bytes written so far.
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 3];
        let (mut skip, mut count) = (done, 0);
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            iov[count] = libc::iovec { iov_base: b[skip..].as_ptr() as *mut libc::c_void, iov_len: b.len() - skip };
            (skip, count) = (0, count + 1);
        }
        let offset = (at + done as u64) as libc::off_t;
        // SAFETY: the first `count` iovecs cover what is left of the pieces, which outlive the call and are only
        // read; the descriptor is open.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count as libc::c_int, offset) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, format!("{done} of {want} bytes written"))),
            n => done += n as usize,
        }
    }
    Ok(())
}

/// Fills `bufs`, in order, from `file` at `at` with one `preadv2` of `flags`. With `RWF_NOWAIT` it answers only from
/// the system's page cache (`WouldBlock` when the data is not all there; EOPNOTSUPP on a filesystem that cannot
/// tell). Best effort, not a guarantee that the call never waits: on a miss the kernel may start the read-ahead of
/// those pages before it answers, and the call may meet an inode lock the filesystem holds briefly. A short read
/// (the file ends, or only part was in memory) is `UnexpectedEof`.
fn read_pieces(file: &File, bufs: &mut [&mut [u8]; 3], at: u64, flags: libc::c_int) -> io::Result<()> {
    let iov = bufs.each_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() });
    let want: usize = iov.iter().map(|v| v.iov_len).sum();
    loop {
        // SAFETY: the iovecs cover the three buffers, which outlive the call; the descriptor is open.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), iov.as_ptr(), 3, at as libc::off_t, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return match usize::try_from(n) {
            Ok(n) if n == want => Ok(()),
            _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{n} of {want} bytes read"))),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ROOT: [u8; 32] = [3; 32];
    const PAGE: usize = 64 << 10;

    async fn open(base: &Path, root: [u8; 32], limit: u64) -> Result<DiskCache, DiskCacheError> {
        let (keying, memory) = (CacheKeying::Root(Zeroizing::new(root)), MemoryBudget::unlimited());
        DiskCache::open(base, "s3://bucket/p", keying, Some(limit), &memory, AeadBackend::AwsLc).await
    }

    fn id(key: &str, index: u64) -> EntryId<'_> {
        EntryId { key, etag: "\"e1\"", index }
    }

    fn page(marker: u8) -> Vec<u8> {
        let mut p = b"PLAINTEXT-MARKER-".repeat(PAGE / 17 + 1);
        p.truncate(PAGE);
        p[0] = marker;
        p
    }

    fn get(c: &DiskCache, id: &EntryId) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        c.get(id, PAGE, &mut out).then_some(out)
    }

    /// The slot of page `id`'s entry.
    fn slot_of(c: &DiskCache, id: &EntryId) -> u64 {
        let name = c.keys.entry_name(id);
        lock(&c.state).lru.peek(&name).and_then(|k| k.slot).expect("no entry written for the page")
    }

    /// The cache directory's file `name` (`PAGES`, `LABELS`), opened anew to look at and change it.
    fn dir_file(c: &DiskCache, name: &str) -> File {
        File::options().read(true).write(true).open(c.path().join(name)).unwrap()
    }

    /// The slots a label names an entry for.
    fn labelled(c: &DiskCache) -> Vec<u64> {
        let labels = std::fs::read(c.path().join(LABELS)).unwrap();
        let slots = labels.chunks(LABEL_LEN).enumerate();
        slots.filter(|(_, l)| l.iter().any(|&b| b != 0)).map(|(i, _)| i as u64).collect()
    }

    /// Bytes the cache's files take on disk, as du counts them.
    fn on_disk(c: &DiskCache) -> u64 {
        std::fs::read_dir(c.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// A scratch in a new directory of `tmp` (made as the journal makes it), bounded by `limit`, with a second
    /// descriptor of its file for the test to look at and damage it.
    fn scratch(tmp: &Path, limit: u64) -> (DiskCache, File) {
        let dir = Dir::open_base(&tmp.join("run")).unwrap();
        let file = dir.unnamed_file().unwrap();
        let peek = file.try_clone().unwrap();
        let memory = MemoryBudget::unlimited();
        (DiskCache::scratch(file, dir.path(), "s3://bucket/p", Some(limit), &memory, AeadBackend::AwsLc), peek)
    }

    /// With no write under way, every slot given out is held by exactly one entry or is free: none lost, none
    /// shared.
    fn slots_accounted(c: &DiskCache) {
        let st = lock(&c.state);
        let mut all: Vec<u64> = st.lru.iter().filter_map(|(_, k)| k.slot).chain(st.free.iter().copied()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..st.next_slot).collect::<Vec<_>>(), "slots lost or shared");
    }

    fn contents(f: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut all = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut all, 0).unwrap();
        all
    }

    /// The scratch's index is counted in the memory budget for as long as the scratch lives, and takes at most an
    /// eighth of it: a budget too small for the index of the limit asked for shrinks the limit instead.
    #[test]
    fn the_scratch_s_index_is_counted_in_the_memory_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_base(&tmp.path().join("run")).unwrap();
        let memory = MemoryBudget::new(64 << 20);
        let make = |limit| {
            DiskCache::scratch(dir.unnamed_file().unwrap(), dir.path(), "s", Some(limit), &memory, AeadBackend::AwsLc)
        };
        let c = make(1 << 30);
        let entries = (1u64 << 30).div_ceil(SLOT);
        assert_eq!(memory.reserved(), entries * INDEX_BYTES_PER_ENTRY);
        assert_eq!(c.limit(), 1 << 30, "a limit whose index fits is kept");
        drop(c);
        assert_eq!(memory.reserved(), 0, "the index's reservation outlived the scratch");
        let c = make(16 << 30);
        assert_eq!(memory.reserved(), (64 << 20) / INDEX_SHARE_OF_BUDGET);
        assert_eq!(c.limit(), (64 << 20) / INDEX_SHARE_OF_BUDGET / INDEX_BYTES_PER_ENTRY * SLOT);
    }

    /// The scratch keeps pages in one file that has no name (the directory stays empty) and holds no plaintext; they
    /// come back byte for byte; it keeps only what whole-object fetches put there.
    #[tokio::test]
    async fn scratch_pages_come_back_from_a_file_without_a_name_or_plaintext() {
        let tmp = tempfile::tempdir().unwrap();
        let (c, peek) = scratch(tmp.path(), 16 << 20);
        assert!(!c.keeps_every_read());
        let mut short = page(9);
        short.truncate(1000);
        for i in 0..8 {
            assert!(c.put(&id("f", i), &page(i as u8)));
        }
        assert!(c.put(&id("g", 0), &short));
        for i in 0..8 {
            assert_eq!(get(&c, &id("f", i)), Some(page(i as u8)), "page {i}");
        }
        let mut out = Vec::new();
        assert!(c.get(&id("g", 0), 1000, &mut out));
        assert_eq!(out, short);
        assert_eq!(get(&c, &id("f", 8)), None);
        assert!(c.contains_any(&[id("h", 0), id("f", 3)]) && !c.contains_any(&[id("h", 0), id("f", 9)]));
        assert_eq!(std::fs::read_dir(c.path()).unwrap().count(), 0, "the scratch has a name");
        let all = contents(&peek);
        assert!(all.len() as u64 > 8 * SLOT, "{} bytes in the scratch for 9 entries", all.len());
        assert!(!all.windows(16).any(|w| w == b"PLAINTEXT-MARKER"), "plaintext in the scratch");
        assert_eq!(peek.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(c.stats().entries, 9);
    }

    /// The scratch's limit holds after every write, least recently used pages go first, their slots are reused
    /// rather than the file growing, and their blocks go back to the filesystem.
    #[tokio::test]
    async fn the_scratch_keeps_its_limit_reuses_slots_and_gives_blocks_back() {
        let tmp = tempfile::tempdir().unwrap();
        let limit = 8 * SLOT;
        let (c, peek) = scratch(tmp.path(), limit);
        for i in 0..40 {
            assert!(c.put(&id("f", i), &page(i as u8)), "entry {i}");
            assert!(get(&c, &id("f", 0)).is_some(), "the page read after every write was evicted at {i}");
            assert!(c.stats().used <= limit, "{:?} after entry {i}", c.stats());
            let allocated = peek.metadata().unwrap().blocks() * 512;
            assert!(allocated <= limit + SLOT, "{allocated} bytes allocated after entry {i} (limit {limit})");
            assert!(peek.metadata().unwrap().len() <= limit + SLOT, "the file grew past its slots at {i}");
        }
        assert_eq!(c.stats().entries as u64, limit / SLOT);
        assert!(c.stats().evicted >= 40 - 8);
        slots_accounted(&c);
        assert_eq!(get(&c, &id("f", 1)), None, "an old page that was not read again stayed");
        for i in 33..40 {
            assert_eq!(get(&c, &id("f", i)), Some(page(i as u8)), "a recent page, {i}");
        }
        // A page larger than a slot is not kept.
        assert!(!c.put(&id("big", 0), &vec![1u8; SLOT as usize]));
    }

    /// A slot changed on disk, or holding another page's entry (moved there), is a miss and is dropped: never
    /// another page's bytes, never a failed read.
    #[tokio::test]
    async fn a_damaged_or_moved_scratch_slot_is_a_miss_not_wrong_bytes() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let (c, peek) = scratch(tmp.path(), 16 << 20);
        for i in 0..3 {
            assert!(c.put(&id("f", i), &page(i as u8)));
        }
        let slot_of = |i: u64| lock(&c.state).lru.peek(&c.keys.entry_name(&id("f", i))).unwrap().slot.unwrap();
        let (s0, s1, s2) = (slot_of(0), slot_of(1), slot_of(2));
        // One bit of page 0 flipped.
        let mut b = [0u8; 1];
        peek.read_exact_at(&mut b, s0 * SLOT + 100).unwrap();
        peek.write_all_at(&[b[0] ^ 1], s0 * SLOT + 100).unwrap();
        // Page 2's entry copied over page 1's.
        let mut entry = vec![0u8; PAGE + ENTRY_OVERHEAD];
        peek.read_exact_at(&mut entry, s2 * SLOT).unwrap();
        peek.write_all_at(&entry, s1 * SLOT).unwrap();
        assert_eq!(get(&c, &id("f", 0)), None, "a damaged slot was served");
        assert_eq!(get(&c, &id("f", 1)), None, "a page moved from another slot was served");
        assert_eq!(get(&c, &id("f", 2)), Some(page(2)));
        let stats = c.stats();
        assert_eq!((stats.dropped, stats.entries), (2, 1), "{stats:?}");
        let allocated = peek.metadata().unwrap().blocks() * 512;
        assert!(allocated <= SLOT, "{allocated} bytes allocated for one entry left: dropped slots kept their blocks");
        // Both are written again, into freed slots.
        assert!(c.put(&id("f", 0), &page(0)) && c.put(&id("f", 1), &page(1)));
        assert_eq!(get(&c, &id("f", 0)), Some(page(0)));
        assert_eq!(get(&c, &id("f", 1)), Some(page(1)));
        assert!(peek.metadata().unwrap().len() <= 3 * SLOT, "freed slots were not reused");
        slots_accounted(&c);
    }

    /// Without a blocking task, the scratch serves the pages whose slots the system still holds in memory, the same
    /// bytes as the blocking path, and a page it does not have is a `None` in the answer. A slot the system has
    /// dropped from memory, and a damaged slot, give no answer at all: the caller goes to the blocking path, which
    /// reads the first from the disk and drops the second. A cache directory answers the same way.
    #[tokio::test]
    async fn pages_are_answered_without_blocking_only_from_memory() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let (c, peek) = scratch(tmp.path(), 16 << 20);
        for i in 0..3 {
            assert!(c.put(&id("f", i), &page(i as u8)));
        }
        let now = |ids: &[EntryId]| c.get_many_now(&ids.iter().map(|i| (*i, PAGE)).collect::<Vec<_>>());
        let found = now(&[id("f", 0), id("f", 9), id("f", 2)]).expect("pages just written are in memory");
        assert_eq!(found[0].as_deref(), Some(&page(0)[..]));
        assert_eq!(found[1], None, "a page the scratch does not have");
        assert_eq!(found[2].as_deref(), Some(&page(2)[..]));
        let slot_of = |i: u64| lock(&c.state).lru.peek(&c.keys.entry_name(&id("f", i))).unwrap().slot.unwrap();
        // Page 1's slot written to the disk and dropped from memory.
        let s1 = slot_of(1);
        peek.sync_data().unwrap();
        // SAFETY: advice on an open descriptor.
        let r = unsafe {
            libc::posix_fadvise(peek.as_raw_fd(), (s1 * SLOT) as i64, SLOT as i64, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(r, 0);
        assert_eq!(now(&[id("f", 1)]), None, "a slot read from the disk without a blocking task");
        assert_eq!(get(&c, &id("f", 1)), Some(page(1)), "the blocking path reads it from the disk");
        // One bit of page 0 flipped: no answer, and nothing dropped yet; the blocking path then drops it.
        let mut b = [0u8; 1];
        peek.read_exact_at(&mut b, slot_of(0) * SLOT + 100).unwrap();
        peek.write_all_at(&[b[0] ^ 1], slot_of(0) * SLOT + 100).unwrap();
        assert_eq!(now(&[id("f", 0), id("f", 2)]), None, "a damaged slot was answered");
        assert_eq!(c.stats().dropped, 0);
        assert_eq!(get(&c, &id("f", 0)), None);
        assert_eq!(c.stats().dropped, 1);
        assert_eq!(now(&[id("f", 0), id("f", 2)]).unwrap()[1].as_deref(), Some(&page(2)[..]));
        // A cache directory.
        let d = open(&tmp.path().join("dir"), ROOT, 16 << 20).await.unwrap();
        assert!(d.put(&id("f", 0), &page(0)));
        let found = d.get_many_now(&[(id("f", 0), PAGE), (id("f", 1), PAGE)]).expect("a page just written");
        assert_eq!((found[0].as_deref(), found[1].as_deref()), (Some(&page(0)[..]), None));
    }

    /// Writers and readers on several threads over a scratch of a few slots, so that slots are freed and given out
    /// again while other threads read them: every read gives the page asked for or nothing, never another's bytes.
    #[test]
    fn scratch_slots_reused_under_concurrent_reads_never_serve_another_page() {
        let tmp = tempfile::tempdir().unwrap();
        let (c, _peek) = scratch(tmp.path(), 4 * SLOT);
        slots_reused_under_concurrent_reads(&c);
    }

    /// The same in a cache directory, whose labels must name exactly the slots entries hold afterwards, and the same
    /// entries after a start.
    #[tokio::test]
    async fn cache_directory_slots_reused_under_concurrent_reads_never_serve_another_page() {
        let tmp = tempfile::tempdir().unwrap();
        let c = open(&tmp.path().join("c"), ROOT, 4 * SLOT).await.unwrap();
        slots_reused_under_concurrent_reads(&c);
        let held: Vec<(String, u64)> = {
            let st = lock(&c.state);
            let mut held: Vec<_> = st.lru.iter().map(|(n, k)| (n.clone(), k.slot.unwrap())).collect();
            held.sort_by_key(|h| h.1);
            held
        };
        assert_eq!(labelled(&c), held.iter().map(|h| h.1).collect::<Vec<_>>(), "labels and entries disagree");
        drop(c);
        let c = open(&tmp.path().join("c"), ROOT, 4 * SLOT).await.unwrap();
        let mut again: Vec<_> = lock(&c.state).lru.iter().map(|(n, k)| (n.clone(), k.slot.unwrap())).collect();
        again.sort_by_key(|h| h.1);
        assert_eq!(again, held, "a start found other entries than the cache held");
    }

    fn slots_reused_under_concurrent_reads(c: &DiskCache) {
        let (hits, misses) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (hits, misses) = (&hits, &misses);
                s.spawn(move || {
                    let mut x = t * 7 + 1;
                    for _ in 0..400 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let i = (x >> 33) % 12;
                        if x & 1 == 0 {
                            c.put(&id("f", i), &page(i as u8));
                        } else {
                            match get(c, &id("f", i)) {
                                Some(p) => {
                                    assert_eq!(p, page(i as u8), "page {i} came back as another's");
                                    hits.fetch_add(1, Ordering::Relaxed);
                                }
                                None => {
                                    misses.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                });
            }
        });
        assert!(hits.load(Ordering::Relaxed) > 0 && misses.load(Ordering::Relaxed) > 0);
        assert!(c.stats().used <= 4 * SLOT, "{:?}", c.stats());
        slots_accounted(c);
    }

    /// Writers on several threads report what they wrote at once: each report is what was written since the one
    /// before, never less than nothing (a report read from the counts before another one was made must not be
    /// subtracted from it: that wrapped the metric to about 2^64, or panicked in a debug build).
    #[tokio::test]
    async fn concurrent_reports_never_count_backwards() {
        let tmp = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(open(&tmp.path().join("cache"), ROOT, 64 << 20).await.unwrap());
        const WRITES: u64 = 200_000;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut most = 0;
                    for _ in 0..WRITES {
                        lock(&c.state).written += 1;
                        most = most.max(c.report_delta().0);
                    }
                    most
                })
            })
            .collect();
        for t in threads {
            let most = t.join().expect("a report panicked");
            assert!(most <= 4 * WRITES, "a report counted {most} bytes for {} written", 4 * WRITES);
        }
    }

    #[tokio::test]
    async fn pages_come_back_after_a_reopen_and_nothing_rests_in_plaintext() {
        // Long enough that random ciphertext never holds it by chance: a 3-byte name ("a/b") turned up in the 256 KiB
        // of sealed pages about once in 60 runs (CI, 2026-12-04).
        const NAME: &str = "confidential-directory/confidential-file";
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("cache");
        let c = open(&base, ROOT, 64 << 20).await.unwrap();
        for i in 0..4 {
            c.put(&id(NAME, i), &page(i as u8));
        }
        assert_eq!(get(&c, &id(NAME, 2)), Some(page(2)));
        assert_eq!(get(&c, &id(NAME, 9)), None);
        assert_eq!(get(&c, &EntryId { etag: "\"e2\"", ..id(NAME, 2) }), None, "another version");
        drop(c);
        let c = open(&base, ROOT, 64 << 20).await.unwrap();
        assert_eq!(c.stats().entries, 4);
        assert_eq!(get(&c, &id(NAME, 3)), Some(page(3)));
        for entry in std::fs::read_dir(c.path()).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"), "plaintext in {}", path.display());
            let named = bytes.windows(NAME.len()).any(|w| w == NAME.as_bytes());
            assert!(!named, "the object's name in {}", path.display());
        }
        assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
    }

    /// A cache directory's index counts in the memory budget as it grows, a step at a time, up to an eighth of it:
    /// past that (or when the budget has no room now) a new entry replaces the least recently used one, whatever
    /// room the disk has, and a start keeps only the newest entries (by their labels' order) the budget pays for.
    #[tokio::test]
    async fn a_cache_directory_s_index_counts_in_the_memory_budget_and_bounds_its_entries() {
        const SMALL: usize = 100;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("c");
        let budget_for = |entries: u64| MemoryBudget::new(entries * INDEX_BYTES_PER_ENTRY * INDEX_SHARE_OF_BUDGET);
        let open_with = |memory: Arc<MemoryBudget>| {
            let base = base.clone();
            async move {
                let keying = CacheKeying::Root(Zeroizing::new(ROOT));
                let aead = AeadBackend::AwsLc;
                DiskCache::open(&base, "s3://bucket/p", keying, Some(1 << 30), &memory, aead).await.unwrap()
            }
        };
        let has = |c: &DiskCache, i: u64| c.get(&id("f", i), SMALL, &mut Vec::new());
        let files = |c: &DiskCache| labelled(c).len();

        // An index of one full step and part of a second.
        let cap = INDEX_STEP + 904;
        let memory = budget_for(cap);
        let c = open_with(memory.clone()).await;
        assert_eq!(memory.reserved(), 0, "an empty index reserved memory");
        assert!(c.put(&id("f", 0), &[7; SMALL]));
        assert_eq!(memory.reserved(), INDEX_STEP * INDEX_BYTES_PER_ENTRY, "the first entry pays for one step");
        for i in 1..cap + 100 {
            assert!(c.put(&id("f", i), &[7; SMALL]), "entry {i} was not kept");
        }
        let stats = c.stats();
        assert_eq!((stats.entries as u64, stats.evicted), (cap, 100), "{stats:?}");
        assert_eq!(memory.reserved(), cap * INDEX_BYTES_PER_ENTRY, "the index took more than its share");
        assert_eq!(files(&c) as u64, cap);
        assert!(!has(&c, 99) && has(&c, 100) && has(&c, cap + 99), "not the least recently used entries went");
        // Which entries a start keeps is the order their labels give: the oldest survivor made the newest, the newest
        // entry made old.
        let set_order = |c: &DiskCache, i: u64, order: u64| {
            let at = slot_of(c, &id("f", i)) * LABEL_LEN as u64 + 4;
            dir_file(c, LABELS).write_all_at(&order.to_be_bytes(), at).unwrap();
        };
        set_order(&c, 100, 1 << 40);
        set_order(&c, cap + 98, 1 << 39);
        set_order(&c, cap + 99, 1);
        drop(c);
        assert_eq!(memory.reserved(), 0, "the index's reservation outlived the cache");

        // A start with a smaller budget keeps the newest entries it pays for and removes the others from the disk.
        let memory = budget_for(1000);
        let c = open_with(memory.clone()).await;
        assert_eq!((c.stats().entries, files(&c)), (1000, 1000));
        assert_eq!(memory.reserved(), 1000 * INDEX_BYTES_PER_ENTRY);
        assert!(has(&c, 100) && !has(&c, cap + 99), "the start did not keep the newest entries");
        assert!(has(&c, cap + 98));
        drop(c);

        // A budget busy with other reservations pays for no more steps: new entries replace old ones meanwhile, and
        // the index grows again once the budget has room.
        let memory = budget_for(cap);
        let busy = memory.try_reserve(memory.limit() - INDEX_STEP * INDEX_BYTES_PER_ENTRY).unwrap();
        let c = open_with(memory.clone()).await;
        assert_eq!(c.stats().entries, 1000);
        for i in 0..INDEX_STEP {
            assert!(c.put(&id("g", i), &[7; SMALL]));
        }
        assert_eq!(c.stats().entries as u64, INDEX_STEP, "{:?}", c.stats());
        drop(busy);
        assert!(c.put(&id("h", 0), &[7; SMALL]));
        assert_eq!(c.stats().entries as u64, INDEX_STEP + 1);
        assert_eq!(memory.reserved(), cap * INDEX_BYTES_PER_ENTRY);
    }

    #[tokio::test]
    async fn the_limit_holds_after_every_write_and_the_oldest_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let limit = 1 << 20;
        let c = open(&tmp.path().join("c"), ROOT, limit).await.unwrap();
        let per_entry = counted((PAGE + ENTRY_OVERHEAD) as u64);
        for i in 0..3 * limit / PAGE as u64 {
            c.put(&id("f", i), &page(0));
            // Read an early page now and then: it stays while later ones go.
            assert!(get(&c, &id("f", 0)).is_some(), "the page read after every write was evicted at {i}");
            assert!(c.stats().used <= limit, "{:?} after entry {i}", c.stats());
            assert!(on_disk(&c) <= limit + 2 * BLOCK, "{} bytes on disk after entry {i} (limit {limit})", on_disk(&c));
        }
        let stats = c.stats();
        assert_eq!(stats.entries as u64, limit / per_entry);
        assert!(stats.evicted > 0);
        assert_eq!(get(&c, &id("f", 1)), None, "an old page that was not read again stayed");
        assert!(get(&c, &id("f", 3 * limit / PAGE as u64 - 1)).is_some(), "the newest page is gone");
        // A smaller limit at the next start evicts down to it.
        drop(c);
        // Other tests of this process fork children (mount, curl): until one execs, it holds a copy of the lock's
        // descriptor, and the lock with it (seen once in CI as InUse). A few tries cover that moment.
        let mut tries = 0;
        let c = loop {
            match open(&tmp.path().join("c"), ROOT, limit / 2).await {
                Err(DiskCacheError::InUse { .. }) if tries < 50 => tries += 1,
                other => break other.unwrap(),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(c.stats().used <= limit / 2 && on_disk(&c) <= limit / 2 + 2 * BLOCK, "{:?}", c.stats());
    }

    #[tokio::test]
    async fn damaged_truncated_moved_and_planted_entries_are_dropped_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let c = open(&tmp.path().join("c"), ROOT, 64 << 20).await.unwrap();
        for i in 0..6 {
            c.put(&id("f", i), &page(i as u8));
        }
        let pages = dir_file(&c, PAGES);
        let at = |i: u64| slot_of(&c, &id("f", i)) * SLOT;
        let entry_of = |i: u64| {
            let mut bytes = vec![0u8; PAGE + ENTRY_OVERHEAD];
            pages.read_exact_at(&mut bytes, at(i)).unwrap();
            bytes
        };
        // Flipped byte; the end cut off (a hole); page 2's entry copied over page 3's; page 4's slot all hole.
        let mut bytes = entry_of(0);
        bytes[100] ^= 1;
        pages.write_all_at(&bytes, at(0)).unwrap();
        punch(&pages, at(1) + SLOT - 2 * BLOCK, 2 * BLOCK);
        pages.write_all_at(&entry_of(2), at(3)).unwrap();
        punch(&pages, at(4), SLOT);
        let slots: Vec<u64> = [0, 1, 3, 4].iter().map(|&i| slot_of(&c, &id("f", i))).collect();
        for i in [0, 1, 3, 4] {
            assert_eq!(get(&c, &id("f", i)), None, "entry {i} was served");
        }
        assert_eq!(get(&c, &id("f", 2)), Some(page(2)));
        assert_eq!(c.stats().dropped, 4);
        // Their slots are free, and no label names them any more.
        slots_accounted(&c);
        assert!(slots.iter().all(|s| lock(&c.state).free.contains(s)));
        assert!(labelled(&c).iter().all(|s| !slots.contains(s)), "a dropped entry's label is left");
        // A damaged entry two reads found at once (a read and the read-ahead) is dropped and counted once.
        let mut bytes = entry_of(5);
        bytes[100] ^= 1;
        pages.write_all_at(&bytes, at(5)).unwrap();
        let (name, slot) = (c.keys.entry_name(&id("f", 5)), slot_of(&c, &id("f", 5)));
        c.drop_entry(&name, "test: found damaged by the first read", Some(slot));
        c.drop_entry(&name, "test: found damaged by the second read", Some(slot));
        assert_eq!(c.stats().dropped, 5);
        slots_accounted(&c);
        // Put again, it is served again.
        c.put(&id("f", 0), &page(0));
        assert_eq!(get(&c, &id("f", 0)), Some(page(0)));
        // While unmounted: an entry planted in page 2's slot (sealed for it, but by someone without the key), and the
        // labels of pages 0 and 3 swapped (each slot then named for the other's page).
        let other = CacheKeys::derive(&[9; 32], "s3://bucket/p", AeadBackend::AwsLc);
        pages.write_all_at(&other.seal(&other.sealer(), &id("f", 2), &page(7)), at(2)).unwrap();
        c.put(&id("f", 3), &page(3));
        let labels = dir_file(&c, LABELS);
        let label_at = |i: u64| slot_of(&c, &id("f", i)) * LABEL_LEN as u64;
        let (mut l0, mut l3) = ([0u8; LABEL_LEN], [0u8; LABEL_LEN]);
        labels.read_exact_at(&mut l0, label_at(0)).unwrap();
        labels.read_exact_at(&mut l3, label_at(3)).unwrap();
        labels.write_all_at(&l3, label_at(0)).unwrap();
        labels.write_all_at(&l0, label_at(3)).unwrap();
        drop(c);
        let c = open(&tmp.path().join("c"), ROOT, 64 << 20).await.unwrap();
        assert_eq!(c.stats().entries, 3);
        for i in [0, 2, 3] {
            assert_eq!(get(&c, &id("f", i)), None, "entry {i} was served");
        }
        assert_eq!(c.stats().dropped, 3);
        slots_accounted(&c);
    }

    /// What a kill leaves in a cache directory: an entry written into a slot past the others with no label yet, and
    /// a slot whose label was cleared before its blocks were given back. A start frees both (the file ends after the
    /// last slot labelled), and keeps the others in the order they were written.
    #[tokio::test]
    async fn a_start_frees_the_slots_no_label_names_and_keeps_the_others_in_their_order() {
        let tmp = tempfile::tempdir().unwrap();
        let c = open(&tmp.path().join("c"), ROOT, 64 << 20).await.unwrap();
        for i in 0..5 {
            c.put(&id("f", i), &page(i as u8));
        }
        let slots: Vec<u64> = (0..5).map(|i| slot_of(&c, &id("f", i))).collect();
        assert_eq!(slots, [0, 1, 2, 3, 4]);
        let entry = c.keys.seal(&c.sealer, &id("f", 9), &page(9));
        dir_file(&c, PAGES).write_all_at(&entry, 6 * SLOT).unwrap();
        dir_file(&c, LABELS).write_all_at(&[0; LABEL_LEN], LABEL_LEN as u64).unwrap();
        let before = on_disk(&c);
        drop(c);
        let c = open(&tmp.path().join("c"), ROOT, 64 << 20).await.unwrap();
        assert_eq!(c.stats().entries, 4);
        assert_eq!(c.file.metadata().unwrap().len(), 5 * SLOT, "the file does not end after the last slot labelled");
        assert_eq!(on_disk(&c), before - 2 * counted((PAGE + ENTRY_OVERHEAD) as u64), "freed slots kept their blocks");
        assert_eq!(lock(&c.state).free, [1]);
        slots_accounted(&c);
        assert_eq!(get(&c, &id("f", 1)), None);
        assert_eq!(get(&c, &id("f", 9)), None);
        // The order of a start is the labels', not the slots': page 0's label made the newest, page 3's the oldest.
        // With room for four entries, the next put evicts page 3.
        let labels = dir_file(&c, LABELS);
        labels.write_all_at(&1000u64.to_be_bytes(), 4).unwrap();
        labels.write_all_at(&1u64.to_be_bytes(), 3 * LABEL_LEN as u64 + 4).unwrap();
        drop(c);
        let c = open(&tmp.path().join("c"), ROOT, 4 * counted((PAGE + ENTRY_OVERHEAD) as u64)).await.unwrap();
        assert_eq!(c.stats().entries, 4);
        assert!(c.put(&id("f", 1), &page(1)));
        let kept: Vec<bool> = (0..5).map(|i| get(&c, &id("f", i)).is_some()).collect();
        assert_eq!(kept, [true, true, true, false, true]);
        // A later start orders after the highest order found: page 1 (written last) is the newest, page 4 next.
        drop(c);
        let c = open(&tmp.path().join("c"), ROOT, 2 * counted((PAGE + ENTRY_OVERHEAD) as u64)).await.unwrap();
        let kept: Vec<bool> = (0..5).map(|i| get(&c, &id("f", i)).is_some()).collect();
        assert_eq!(kept, [true, true, false, false, false]);
    }

    /// On a filesystem that makes no holes a freed slot keeps its blocks until it is written again, so there every
    /// entry of a cache directory counts as a whole slot: small pages cannot take more of the disk than the limit.
    #[tokio::test]
    async fn without_holes_every_entry_counts_as_a_whole_slot() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(&tmp.path().join("c"), ROOT, 4 * SLOT).await.unwrap();
        assert!(!c.whole_slots, "the test's filesystem makes holes");
        c.put(&id("f", 0), &[7; 100]);
        assert_eq!(c.stats().used, BLOCK);
        c.whole_slots = true;
        for i in 1..10 {
            c.put(&id("f", i), &[7; 100]);
        }
        let stats = c.stats();
        assert_eq!((stats.entries, stats.used), (4, 4 * SLOT), "{stats:?}");
    }

    #[tokio::test]
    async fn a_second_mount_of_the_store_is_refused_and_another_key_starts_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("c");
        let c = open(&base, ROOT, 64 << 20).await.unwrap();
        c.put(&id("f", 0), &page(0));
        let e = open(&base, ROOT, 64 << 20).await.err().expect("a second open of a cache in use");
        assert!(matches!(e, DiskCacheError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("in use by another mount"), "{e}");
        // Another store may use the same cache_dir.
        let (keying, memory) = (CacheKeying::Root(Zeroizing::new(ROOT)), MemoryBudget::unlimited());
        DiskCache::open(&base, "s3://other", keying, Some(1 << 20), &memory, AeadBackend::AwsLc)
            .await
            .unwrap();
        drop(c);
        let c = open(&base, [4; 32], 64 << 20).await.unwrap();
        assert_eq!(c.stats().entries, 0, "entries sealed under another key were kept");
        assert_eq!(std::fs::read_dir(c.path()).unwrap().count(), 4, "only lock, cache.json, pages and labels are left");
        assert_eq!(on_disk(&c), BLOCK, "only cache.json takes room");
    }

    #[tokio::test]
    async fn a_directory_others_may_write_is_refused_with_the_option_to_change() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("c");
        drop(open(&base, ROOT, 1 << 20).await.unwrap());
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open(&base, ROOT, 1 << 20).await.err().expect("a world-writable cache_dir");
        assert!(e.to_string().contains("cache_dir") && e.to_string().contains("chmod go-w"), "{e}");
        assert!(!e.to_string().contains("staging_dir"), "{e}");
    }

    /// Unmounts a [`small_disk`] when dropped.
    struct Unmount(PathBuf, #[allow(dead_code)] tempfile::TempDir);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// A small filesystem of the test's own: a 40 MiB tmpfs (mounting it needs root, as the FUSE tests do).
    fn small_disk() -> (PathBuf, Unmount) {
        let tmp = tempfile::tempdir().unwrap();
        let fs = tmp.path().join("fs");
        std::fs::create_dir(&fs).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs"])
            .arg(&fs)
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs for the test (needs root)");
        (fs.clone(), Unmount(fs, tmp))
    }

    /// The scratch shares its disk with the write journal: it stops writing where the journal would start saving
    /// space (a quarter of the disk free), and when others fill the disk past that, `give_room` (what the journal
    /// asks when a file being written finds the disk low) frees it again, newest pages kept.
    #[tokio::test]
    async fn the_scratch_keeps_the_journal_s_reserve_free_and_gives_room_when_asked() {
        let (fs, _unmount) = small_disk();
        let (_, total) = space(&fs).unwrap();
        let reserve = total / 4;
        let (c, _peek) = scratch(&fs, 1 << 30);
        for i in 0..500 {
            c.put(&id("f", i), &page(0));
            let (free, _) = space(&fs).unwrap();
            assert!(free + SLOT >= reserve, "{free} bytes free after entry {i}, under the reserve of {reserve}");
        }
        let held = c.stats().used;
        assert!(held > 24 << 20, "the scratch kept less than it could: {:?}", c.stats());
        assert!(c.stats().evicted > 0, "500 pages fitted above the reserve: {:?}", c.stats());
        // Others take 8 MiB: the disk is under the reserve until the scratch gives room.
        std::fs::write(fs.join("ballast"), vec![1u8; 8 << 20]).unwrap();
        assert!(space(&fs).unwrap().0 < reserve);
        c.give_room();
        let (free, _) = space(&fs).unwrap();
        assert!(free >= reserve, "{free} bytes free after give_room, under the reserve of {reserve}");
        assert!(c.stats().used < held && c.stats().used > held - (10 << 20), "{:?} (held {held})", c.stats());
        assert!(get(&c, &id("f", 499)).is_some(), "the newest page is gone");
        slots_accounted(&c);
    }

    /// The filesystem under the cache runs low (someone else filled it): entries go so that 5 % of it stays free,
    /// whatever the cache's own limit.
    #[tokio::test]
    async fn a_disk_running_low_makes_the_cache_give_room() {
        let (fs, _unmount) = small_disk();
        let (_, total) = space(&fs).unwrap();
        let reserve = total / 20;
        // Others fill 30 of the 40 MiB.
        std::fs::write(fs.join("ballast"), vec![1u8; 30 << 20]).unwrap();
        let c = open(&fs.join("c"), ROOT, 1 << 30).await.unwrap();
        for i in 0..200 {
            c.put(&id("f", i), &page(0));
            let (free, _) = space(&fs).unwrap();
            assert!(free >= reserve, "{free} bytes free after entry {i}, under the reserve of {reserve}");
        }
        let stats = c.stats();
        assert!(stats.evicted > 0 && stats.used < 10 << 20, "{stats:?}");
        assert!(stats.used > 4 << 20, "the cache gave up more than it had to: {stats:?}");
        assert!(get(&c, &id("f", 199)).is_some(), "the newest page is gone");
        // Room comes back: the cache grows again.
        std::fs::remove_file(fs.join("ballast")).unwrap();
        for i in 200..500 {
            c.put(&id("f", i), &page(0));
        }
        assert!(c.stats().used > 20 << 20, "{:?}", c.stats());
    }

    #[tokio::test]
    async fn a_cache_directory_removed_while_mounted_only_misses() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("c");
        let c = open(&base, ROOT, 64 << 20).await.unwrap();
        c.put(&id("f", 0), &page(0));
        std::fs::remove_dir_all(&base).unwrap();
        // Found closed by a read without a blocking task too (pages the system holds in memory would serve it).
        assert_eq!(c.get_many_now(&[(id("f", 0), PAGE)]), Some(vec![None]));
        assert_eq!(c.file.metadata().unwrap().blocks(), 0);
        assert_eq!(get(&c, &id("f", 0)), None);
        assert!(!c.put(&id("f", 1), &page(1)));
        assert_eq!(get(&c, &id("f", 1)), None);
        assert!(!base.exists());
        // What the cache held is given back to the disk, not kept until the unmount.
        assert_eq!((c.stats().entries, c.stats().used), (0, 0));
        assert_eq!(c.file.metadata().unwrap().blocks(), 0);
    }
}
