//! The disk cache (`-o cache_dir=DIR`): pages of objects kept on local disk, sealed, bounded, and reused after a
//! remount.
//!
//! Why: re-reading a large file after a remount, or a working set larger than memory, should not cost the store
//! requests again; and a cache must not be the place where plaintext of file contents rests on disk (rclone's,
//! s3fs's and mountpoint-s3's caches keep it in the clear) or grow past its limit.
//!
//! Where it sits: below the page cache. A read that misses the page cache looks here before it fetches from the
//! store, and every page fetched from the store is written here on the way back (in the background, within the
//! memory budget; a page that finds no room is simply not cached). Entries are keyed like the page cache, by the
//! object's key, its ETag and the page index, so a changed object is never served from its old pages.
//!
//! Layout (docs/FORMAT.md, "The disk cache", has the entry bytes):
//!
//! ```text
//! DIR/                  0700, ours (checked like the journal's base, see `journal::dir`)
//!   <store id>/         0700: one per store, as in the journal
//!     lock              flock(LOCK_EX) held by the mount using it: a second mount of the store refuses
//!     cache.json        which key sealed the entries (its check value; in cse-kms its KMS-wrapped root key)
//!     <64 hex>          one entry per page: a keyed hash of its identity, so object names do not show
//!     <64 hex>.tmp      an entry being written where the filesystem has no unnamed files (`Dir::write_new`;
//!                       removed by the next start if the daemon died)
//! ```
//!
//! Limits: entries are counted by the disk blocks they take (4 KiB each) and the total never exceeds the limit: room
//! is reserved (least recently used entries removed first) before an entry is written. When the filesystem under the
//! cache has less than 5 % (at most 1 GiB) free, entries are removed until it has, and nothing is written while it
//! cannot. The recency order lives in memory; a start orders what it finds by modification time.
//!
//! Damage: an entry that does not open (edited, truncated, planted, moved from another page, sealed under another
//! key, not ours, a symlink) is logged, removed and counted as a miss: the page is fetched from the store. A cache
//! problem never fails a read. If the directory goes away while mounted, lookups miss and writes fail quietly
//! (logged once): reads go to the store.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::cache::page::PageBuf;
use crate::crypto::diskcache::{CacheKeys, EntryId, EntrySealer, ENTRY_OVERHEAD};
use crate::crypto::hex::{hex, unhex};
use crate::crypto::AeadBackend;
use crate::journal::dir::{try_lock, Dir, TrustError};
use crate::kms::{KmsClient, KmsError};

/// Entries are counted in blocks of this size (what a 64 KiB entry takes on ext4, xfs or btrfs).
const BLOCK: u64 = 4096;
/// The header file.
const HEADER: &str = "cache.json";
/// The lock file.
const LOCK: &str = "lock";
const HEADER_VERSION: u32 = 1;
/// The KMS encryption-context entry that binds the cache's root key to its store.
const KMS_CONTEXT_CACHE: &str = "s3cryptfs:cache";
/// Damaged entries logged at warning level per mount; the rest are counted only.
const MAX_DAMAGE_LOGS: u64 = 20;
/// Default limit: this share of the free space at mount, at most [`DEFAULT_MAX`].
const DEFAULT_SHARE: u64 = 4;
const DEFAULT_MAX: u64 = 64 << 30;

/// What [`DiskCache::evict_for`] found for an entry about to be written.
#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// Room made and reserved for it.
    Made,
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

struct State {
    /// Entry name → bytes counted for it. Reserved before the entry is written.
    lru: LruCache<String, u64>,
    used: u64,
    written: u64,
    evicted: u64,
    dropped: u64,
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

pub struct DiskCache {
    dir: Dir,
    _lock: File,
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
    /// of the free space there, at most 64 GiB). Fails if another mount of the store uses it, or if a directory or
    /// file on the way fails the ownership checks.
    pub async fn open(
        base: &Path,
        store: &str,
        keying: CacheKeying,
        limit: Option<u64>,
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
        let lock_file = match dir.open_file(LOCK, true)? {
            Some(f) => f,
            None => match dir.create_file(LOCK) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    dir.open_file(LOCK, true)?.ok_or_else(|| io_at(dir.path())(io::Error::other("lock vanished")))?
                }
                Err(e) => return Err(io_at(dir.path())(e)),
            },
        };
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
        let cache = DiskCache {
            sealer: keys.sealer(),
            keys,
            limit,
            state: Mutex::new(State { lru: LruCache::unbounded(), used: 0, written: 0, evicted: 0, dropped: 0 }),
            damage_logs: AtomicU64::new(0),
            io_warned: AtomicBool::new(false),
            reported: Mutex::new((0, 0, 0)),
            _lock: lock_file,
            dir,
        };
        if !same_key && header.is_some() {
            tracing::info!(dir = %cache.dir.path().display(), "the disk cache was sealed under another key; it starts empty");
        }
        cache.scan(same_key).map_err(io_at(cache.dir.path()))?;
        let text = serde_json::to_vec(&Header { version: HEADER_VERSION, check, kms_key_id, kms_blob })
            .map_err(|e| io_at(cache.dir.path())(io::Error::other(e)))?;
        cache.dir.write_file(HEADER, &text).map_err(io_at(cache.dir.path()))?;
        cache.make_room(0);
        cache.report_delta();
        Ok(cache)
    }

    /// Takes stock of the entries left by earlier mounts (all removed unless `keep`), oldest first in the recency
    /// order; removes what a dead daemon left half written and anything that is not ours.
    fn scan(&self, keep: bool) -> io::Result<()> {
        let mut found = Vec::new();
        for name in self.dir.entries()? {
            if name == LOCK || name == HEADER {
                continue;
            }
            if !keep || !is_entry_name(&name) {
                if is_entry_name(&name) || name.ends_with(".tmp") {
                    let _ = self.dir.remove(&name);
                } else {
                    tracing::warn!(dir = %self.dir.path().display(), name, "a file that is not a cache entry is in the disk cache's directory; left alone");
                }
                continue;
            }
            match self.dir.open_file(&name, false) {
                Ok(Some(f)) => {
                    let meta = f.metadata()?;
                    found.push((meta.mtime(), meta.mtime_nsec(), name, counted(meta.len())));
                }
                Ok(None) => {}
                Err(e) => {
                    self.damaged(&name, &e.to_string());
                    let _ = self.dir.remove(&name);
                }
            }
        }
        found.sort();
        let mut st = lock(&self.state);
        for (_, _, name, size) in found {
            st.used += size;
            st.lru.put(name, size);
        }
        Ok(())
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn stats(&self) -> DiskCacheStats {
        let st = lock(&self.state);
        let (used, written, evicted, dropped) = (st.used, st.written, st.evicted, st.dropped);
        DiskCacheStats { entries: st.lru.len(), used, written, evicted, dropped }
    }

    fn damaged(&self, name: &str, why: &str) {
        let n = self.damage_logs.fetch_add(1, Ordering::Relaxed);
        if n < MAX_DAMAGE_LOGS {
            tracing::warn!(dir = %self.dir.path().display(), entry = name, why, "a disk cache entry is damaged or not ours; removed, the page is fetched from the store");
        } else if n == MAX_DAMAGE_LOGS {
            tracing::warn!(dir = %self.dir.path().display(), "more damaged disk cache entries; no longer logged (see s3cryptfs_disk_cache_dropped_total)");
        }
    }

    fn io_failed(&self, what: &str, e: &io::Error) {
        if !self.io_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.dir.path().display(), error = %e, what, "the disk cache cannot be written; reads go to the store (logged once)");
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
        let names: Vec<String> = pages.iter().map(|(id, _)| self.keys.entry_name(id)).collect();
        let known: Vec<bool> = {
            let mut st = lock(&self.state);
            names.iter().map(|n| st.lru.get(n).is_some()).collect()
        };
        let files: Vec<Option<File>> = names
            .iter()
            .zip(known)
            .map(|(name, known)| {
                if !known {
                    return None;
                }
                match self.dir.open_file(name, false) {
                    Ok(Some(f)) => {
                        // SAFETY: advice on an open descriptor; failure only loses the read-ahead.
                        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
                        Some(f)
                    }
                    // Being written, or the directory is gone.
                    Ok(None) => None,
                    Err(e) => {
                        self.drop_entry(name, &e.to_string());
                        None
                    }
                }
            })
            .collect();
        let mut stored = Vec::new();
        for (i, file) in files.into_iter().enumerate() {
            let Some(file) = file else { continue };
            let (id, len) = &pages[i];
            stored.clear();
            // Room for the whole entry and the byte that shows it is longer: read in one call, and one more that
            // finds the end (from empty, `read_to_end` probes and grows the buffer in several).
            stored.reserve(len + ENTRY_OVERHEAD + 1);
            if let Err(e) = file.take((len + ENTRY_OVERHEAD + 1) as u64).read_to_end(&mut stored) {
                self.drop_entry(&names[i], &e.to_string());
                continue;
            }
            let mut page = PageBuf::for_len(*len);
            if self.keys.open_to(id, &stored, page.as_mut_slice()).is_err() {
                self.drop_entry(&names[i], "it does not authenticate as this page");
                continue;
            }
            hit(i, page.freeze());
        }
    }

    /// Drops a damaged entry: once, by the first of the reads that found it so (a read and the read-ahead may both
    /// have opened it); for the others it is gone from the index already, perhaps written anew, and left alone.
    fn drop_entry(&self, name: &str, why: &str) {
        {
            let mut st = lock(&self.state);
            let Some(size) = st.lru.pop(name) else { return };
            st.used -= size;
            st.dropped += 1;
        }
        self.damaged(name, why);
        let _ = self.dir.remove(name);
        self.report_delta();
    }

    /// Keeps page `id`. Blocking file I/O. Skipped when the entry is there already (or being written) or cannot get
    /// room. `true` when the cache has the entry now (or another write of it is under way).
    pub fn put(&self, id: &EntryId, plain: &[u8]) -> bool {
        let name = self.keys.entry_name(id);
        if lock(&self.state).lru.contains(&name) {
            return true;
        }
        let sealed = self.keys.seal(&self.sealer, id, plain);
        let size = counted(sealed.len() as u64);
        if size > self.limit {
            return false;
        }
        match self.reserve(&name, size) {
            Room::Taken => return true,
            Room::None => return false,
            Room::Made => {}
        }
        let written = match self.dir.write_new(&name, &sealed) {
            // Written meanwhile by another read of the same page.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        };
        let mut st = lock(&self.state);
        match written {
            Ok(()) if st.lru.contains(&name) => st.written += sealed.len() as u64,
            // Evicted by another writer while it was being written: its file may have been removed before ours
            // landed, so ours goes now.
            Ok(()) => {
                drop(st);
                let _ = self.dir.remove(&name);
                return false;
            }
            Err(e) => {
                if st.lru.pop(&name).is_some() {
                    st.used -= size;
                }
                drop(st);
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

    /// Evicts least recently used entries until `size` more bytes fit within the limit and the disk's reserve; then,
    /// if `name` is given, reserves them for it ([`Room`] says which happened).
    fn evict_for(&self, size: u64, name: Option<&str>) -> Room {
        let low = self.low_space(size);
        let mut victims = Vec::new();
        let fits = {
            let mut st = lock(&self.state);
            // Two reads of one page (a read and a whole-object fetch) may both get here: the first one writes it, and
            // the entry is counted once.
            if name.is_some_and(|n| st.lru.contains(n)) {
                return Room::Taken;
            }
            let mut need = (st.used + if name.is_some() { size } else { 0 }).saturating_sub(self.limit).max(low);
            while need > 0 {
                let Some((victim, vsize)) = st.lru.pop_lru() else { break };
                st.used -= vsize;
                st.evicted += 1;
                need = need.saturating_sub(vsize);
                victims.push(victim);
            }
            if let (0, Some(name)) = (need, name) {
                st.used += size;
                st.lru.put(name.to_string(), size);
            }
            need == 0
        };
        for v in &victims {
            let _ = self.dir.remove(v);
        }
        if fits {
            Room::Made
        } else {
            Room::None
        }
    }

    /// Bytes to free so that the disk keeps its reserve (5 % of it, at most 1 GiB) after `size` more are written.
    fn low_space(&self, size: u64) -> u64 {
        let Some((free, total)) = space(self.dir.path()) else { return 0 };
        let reserve = (total / 20).min(1 << 30);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ROOT: [u8; 32] = [3; 32];
    const PAGE: usize = 64 << 10;

    async fn open(base: &Path, root: [u8; 32], limit: u64) -> Result<DiskCache, DiskCacheError> {
        DiskCache::open(base, "s3://bucket/p", CacheKeying::Root(Zeroizing::new(root)), Some(limit), AeadBackend::AwsLc)
            .await
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

    /// Bytes the cache's files take on disk, as du counts them.
    fn on_disk(c: &DiskCache) -> u64 {
        std::fs::read_dir(c.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum()
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
        let c = open(&tmp.path().join("c"), ROOT, limit / 2).await.unwrap();
        assert!(c.stats().used <= limit / 2 && on_disk(&c) <= limit / 2 + 2 * BLOCK, "{:?}", c.stats());
    }

    #[tokio::test]
    async fn damaged_truncated_moved_and_planted_entries_are_dropped_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let c = open(&tmp.path().join("c"), ROOT, 64 << 20).await.unwrap();
        for i in 0..5 {
            c.put(&id("f", i), &page(i as u8));
        }
        let file = |i: u64| c.path().join(c.keys.entry_name(&id("f", i)));
        // Flipped byte, truncated, page 2 copied over page 3, page 4 replaced by a symlink.
        let mut bytes = std::fs::read(file(0)).unwrap();
        bytes[100] ^= 1;
        std::fs::write(file(0), &bytes).unwrap();
        let bytes = std::fs::read(file(1)).unwrap();
        std::fs::write(file(1), &bytes[..bytes.len() - 10]).unwrap();
        std::fs::copy(file(2), file(3)).unwrap();
        std::fs::remove_file(file(4)).unwrap();
        std::os::unix::fs::symlink(file(2), file(4)).unwrap();
        for i in [0, 1, 3, 4] {
            assert_eq!(get(&c, &id("f", i)), None, "entry {i} was served");
            assert!(std::fs::symlink_metadata(file(i)).is_err(), "entry {i} was not removed");
        }
        assert_eq!(get(&c, &id("f", 2)), Some(page(2)));
        assert_eq!(c.stats().dropped, 4);
        // A damaged entry two reads found at once (a read and the read-ahead) is dropped and counted once.
        c.put(&id("f", 5), &page(5));
        let mut bytes = std::fs::read(file(5)).unwrap();
        bytes[100] ^= 1;
        std::fs::write(file(5), &bytes).unwrap();
        let name = c.keys.entry_name(&id("f", 5));
        c.drop_entry(&name, "test: found damaged by the first read");
        c.drop_entry(&name, "test: found damaged by the second read");
        assert_eq!(c.stats().dropped, 5);
        // Put again, it is served again.
        c.put(&id("f", 0), &page(0));
        assert_eq!(get(&c, &id("f", 0)), Some(page(0)));
        // An entry planted while unmounted (named for a page, but sealed by someone without the key) is dropped too.
        let planted = file(2);
        drop(c);
        let other = CacheKeys::derive(&[9; 32], "s3://bucket/p", AeadBackend::AwsLc);
        std::fs::write(&planted, other.seal(&other.sealer(), &id("f", 2), &page(7))).unwrap();
        let c = open(&tmp.path().join("c"), ROOT, 64 << 20).await.unwrap();
        assert_eq!(get(&c, &id("f", 2)), None);
        assert_eq!(c.stats().dropped, 1);
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
        DiskCache::open(&base, "s3://other", CacheKeying::Root(Zeroizing::new(ROOT)), Some(1 << 20), AeadBackend::AwsLc)
            .await
            .unwrap();
        drop(c);
        let c = open(&base, [4; 32], 64 << 20).await.unwrap();
        assert_eq!(c.stats().entries, 0, "entries sealed under another key were kept");
        assert_eq!(std::fs::read_dir(c.path()).unwrap().count(), 2, "only lock and cache.json are left");
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

    /// The filesystem under the cache runs low (someone else filled it): entries go so that 5 % of it stays free,
    /// whatever the cache's own limit.
    #[tokio::test]
    async fn a_disk_running_low_makes_the_cache_give_room() {
        // A small filesystem of the test's own: a 40 MiB tmpfs (mounting it needs root, as the FUSE tests do).
        let tmp = tempfile::tempdir().unwrap();
        let fs = tmp.path().join("fs");
        std::fs::create_dir(&fs).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs"])
            .arg(&fs)
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs for the test (needs root)");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(fs.clone());
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
        assert_eq!(get(&c, &id("f", 0)), None);
        c.put(&id("f", 1), &page(1));
        assert_eq!(get(&c, &id("f", 1)), None);
        assert!(!base.exists());
    }
}
