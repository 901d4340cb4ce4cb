//! The filesystem semantics, as async methods that return `Result<T, fs::Error>`.
//!
//! This is where POSIX meets object storage: names become keys (`path` = key under the mount prefix, directories are
//! prefixes with an optional marker), open files get a [`Reader`] or staged write state, and close/fsync decide when
//! an upload happens. `fuse.rs` only translates kernel requests into calls here, so every behaviour can be tested by
//! calling these methods directly.
//!
//! Consistency model (see docs/SEMANTICS.md): what this mount does is visible to it at once; what the store says is
//! trusted for `attr_ttl`, after which names and attributes are asked again. When asking again finds the store silent
//! (a request timed out or could not connect), what is known is served stale rather than the syscall failing or
//! waiting, and for [`SILENT_STORE_GRACE`] known names are not asked about at all (see [`Fs::note_silent_store`]).

mod deletes;
pub mod dirindex;
mod gate;
pub mod error;
pub mod inode;
mod listing;
pub mod precheck;
mod probing;
mod renew;
pub mod sparse;
pub mod trim;
pub mod write;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use self::error::{Error, Result};
pub use self::inode::{Attr, FileKind, ROOT_INO};
use self::dirindex::IndexRead;
use self::inode::{InodeTable, Node, Remote};
use self::deletes::LaterDeletes;
use self::gate::is_under as gate_is_under;
use self::write::{Staged, WriteState};
use tokio::sync::OwnedMutexGuard;
use crate::cache::PageCache;
use crate::crypto::s3ec::{instruction_file_key, INSTRUCTION_SUFFIX};
use crate::object::{Codec, FormatHint, StoredFormat};
use crate::read::s3ec::{S3ecOptions, S3ecReads};
use crate::read::{Fetches, ReadContext, Reader, BIND_META};
use crate::journal::{BaseVersion, Journal};
use crate::store::{Backend, Expect, Listing, ObjectInfo, ObjectKey, StoreError, UserMeta};

/// Longest name a directory entry may have (as on ext4), and so the longest key component we create.
const NAME_MAX: usize = 255;
/// Stale entries of a listing whose metadata readdir fetches at once; past this, a scan's stats fetch it in batches.
const MAX_PREFETCH: usize = 10_000;
/// Files whose metadata one read-ahead batch of a scan fetches ([`Fs::prefetch_from`]): 8 round trips of 32 HEADs,
/// which the `stat` that starts it waits for.
const PREFETCH_BATCH: usize = 256;
/// After pages renewing a directory's files took `attr_ttl` or longer [`SLOW_PAGES_OFF`] times in a row, renewals
/// are not sent for this long ([`Fs::renewals_pay`]).
const RENEWALS_OFF_FOR: Duration = Duration::from_secs(60);
/// Renewal pages in a row that took `attr_ttl` or longer before renewals stop: two, so that one page delayed (a
/// loaded server, a retry) does not.
const SLOW_PAGES_OFF: u32 = 2;
/// How often a name whose node the memory trim dropped between its resolve and its use is resolved again before the
/// request gives up (EBUSY; see [`Fs::resolve_then`]). A trim runs at most every 100 ms.
const RESOLVE_ATTEMPTS: u32 = 8;
/// How often a rename moves an object that another writer keeps replacing before it gives up (`rename_object`).
const MOVE_ATTEMPTS: u32 = 3;
/// The largest directory, in listing pages of 1,000 entries, that a burst of creates lists again to go on without a
/// HEAD per file ([`Fs::renew_names_for_creates`]): two requests, where a larger listing would take longer than the
/// HEADs it saves.
const RENEW_FOR_CREATES_PAGES: u64 = 2;
/// How long a create waits for that listing (a listing of two pages takes milliseconds on a store that answers).
const RENEW_FOR_CREATES_WAIT: Duration = Duration::from_secs(1);

/// A directory in [`Fs::relisting`] for as long as this lives: taken out again however the listing ends (an error,
/// a timeout that drops it, a panic).
struct Relisting<'a> {
    set: &'a Mutex<std::collections::HashSet<u64>>,
    dir: u64,
}

impl<'a> Relisting<'a> {
    /// `None` when `dir` is being listed again already. The guard is made only once the set's lock is released, and
    /// only when `dir` went in: one made and dropped at once (`then_some` builds its value whatever the condition)
    /// would take the lock it is still under in its `drop` (a deadlock of every thread that lists), and would take
    /// the other listing's entry out besides.
    fn start(set: &'a Mutex<std::collections::HashSet<u64>>, dir: u64) -> Option<Relisting<'a>> {
        let inserted = lock(set).insert(dir);
        inserted.then(|| Relisting { set, dir })
    }
}

impl Drop for Relisting<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.dir);
    }
}
/// The position of "no object" in a listing's merge rows (a name known only as a prefix or a directory marker).
const NO_OBJECT: u32 = u32::MAX;
/// Chunk of a file downloaded at a time when staging it for writing.
const STAGE_READ: usize = 8 << 20;
/// After a refresh found the store silent, how long known names and attributes are served from memory without asking
/// again. Each ask costs up to the mount's `timeout=` while the store stays silent, so without this every `stat` of an
/// expired name would pay it; 10 s lets a dead store cost one such wait every 10 s, and a store that is back be noticed
/// within 10 s.
const SILENT_STORE_GRACE: Duration = Duration::from_secs(10);

/// Settings of the filesystem layer, derived from the mount configuration.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
    pub read_only: bool,
    pub attr_ttl: Duration,
    pub max_readahead: u64,
    /// How AWS S3 Encryption Client objects are read (client-side modes).
    pub s3ec: S3ecOptions,
}

/// Who is asking (for ownership of new files and chown rules).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Attribute changes requested by setattr.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// What the table alone says of a name (see [`Fs::resolve_in`]).
enum Resolved {
    /// It exists: this node.
    Known(u64),
    /// It does not exist (the table holds every name of the directory).
    Missing,
    /// The store must be asked; the node the table has for the name, if any.
    Ask(Option<u64>),
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

enum Handle {
    File { ino: u64, reader: Option<Arc<Reader>>, append: bool, writable: bool },
    /// A directory's listing as opendir took it, and its estimated memory (see `fs::trim`).
    Dir { entries: Arc<Vec<DirEntry>>, bytes: u64 },
}

/// Whether an open asked for writing, truncation or appending (from the open(2) flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
    pub append: bool,
}

impl OpenMode {
    pub fn from_flags(flags: i32) -> OpenMode {
        let acc = flags & libc::O_ACCMODE;
        OpenMode {
            write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            truncate: flags & libc::O_TRUNC != 0,
            append: flags & libc::O_APPEND != 0,
        }
    }
}

/// Tests only: what [`Fs`]'s `after_resolve` runs on the table.
#[cfg(test)]
type TableHook = Box<dyn Fn(&mut InodeTable) + Send + Sync>;

pub struct Fs {
    /// The store, through [`LaterDeletes`]: `deletes` is the same object.
    backend: Arc<dyn Backend>,
    /// Deletes sent after the unlink returned (see `fs::deletes`).
    deletes: Arc<LaterDeletes>,
    codec: Codec,
    cache: Arc<PageCache>,
    /// The verified indexes of S3EC objects, shared by their readers.
    s3ec: Arc<S3ecReads>,
    /// Fetches in flight, shared by the readers of every open file.
    fetches: Arc<Fetches>,
    /// The disk cache (`cache_dir`), below the page cache.
    disk: Option<Arc<crate::cache::disk::DiskCache>>,
    journal: Arc<Journal>,
    config: FsConfig,
    table: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// The process that opened each writable handle (see [`Fs::flush_by`]).
    openers: Mutex<HashMap<u64, u32>>,
    next_fh: AtomicU64,
    /// How many times renames have pointed open descriptors at new keys (`retarget_readers`): a read that failed
    /// during a move reads again only if this changed meanwhile.
    retargets: AtomicU64,
    /// Names found missing in the store, and when: lets create() skip asking again right after the kernel's lookup.
    negative: Mutex<HashMap<(u64, String), Instant>>,
    /// When a refresh last found the store silent (timed out, unreachable); `None` once it answers again.
    silent_since: Mutex<Option<Instant>>,
    /// Directories being listed again because their names' knowledge expired while in use (see
    /// [`Fs::relist_if_worth_it`]): one listing at a time per directory.
    relisting: Mutex<std::collections::HashSet<u64>>,
    /// What probes of names of unknown kind cost, per directory whose names this mount does not know: it is listed
    /// once they add up to what listing it costs (see `fs::probing`).
    probing: probing::Tallies,
    /// Directories whose listed entries' metadata is being fetched (see [`Fs::prefetch_from`]).
    prefetching: Mutex<std::collections::HashSet<u64>>,
    /// Directories a page of whose listing is being listed to renew their files (see `fs::renew`): one at a time each.
    renewing: Mutex<std::collections::HashSet<u64>>,
    /// Renewal pages in a row that arrived stale, and until when renewals are not worth sending (see
    /// [`Fs::renewals_pay`]).
    slow_pages: Mutex<(u32, Option<Instant>)>,
    /// Per-directory attribute indexes: which directories wait for an index write (see `dirindex`).
    index: dirindex::DirIndexes,
    /// Estimated bytes of the listings held by open directory handles (see `fs::trim`).
    held_listings: AtomicU64,
    /// How the kernel is asked to forget names when the table outgrows its share of the memory budget.
    forgetter: std::sync::OnceLock<trim::NameForgetter>,
    /// When the table was last trimmed to the memory budget (see `fs::trim`).
    last_trim: Mutex<Option<Instant>>,
    /// Keeps changes out of a directory while it is being moved (see `fs::gate`).
    gate: gate::TreeGate,
    /// Held by a directory rename from before it enters the gate until it ends (see `Fs::rename`).
    dir_moves: tokio::sync::Mutex<()>,
    /// Tests only: runs on the table between [`Fs::resolve`] and the lock that uses its answer in
    /// [`Fs::resolve_then`], where a trim may drop the node (see there).
    #[cfg(test)]
    after_resolve: Mutex<Option<TableHook>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The object key of a file path. Paths come from validated names, so a refusal means a reserved name.
fn key(path: &str) -> Result<ObjectKey> {
    ObjectKey::new(path).map_err(|_| Error::InvalidName)
}

/// A listing of a directory on its way (`Fs::listing_window`): ends it in the table when dropped, whatever became of
/// the listing.
struct ListingWindow<'a> {
    table: &'a Mutex<InodeTable>,
    dir: u64,
    /// When the listing began: the merge's `listed_at`.
    at: Instant,
}

impl Drop for ListingWindow<'_> {
    fn drop(&mut self) {
        lock(self.table).end_listing(self.dir, self.at);
    }
}

/// The prefix of a directory path's children: `path/`, or nothing for the root.
fn dir_prefix(path: &str) -> String {
    if path.is_empty() { String::new() } else { format!("{path}/") }
}

/// The marker key of a directory path.
fn dir_key(path: &str) -> Result<ObjectKey> {
    ObjectKey::new(format!("{path}/")).map_err(|_| Error::InvalidName)
}

fn to_secs_nanos(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            // Before the epoch: floor to whole seconds with a positive nanosecond part.
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

/// Whether `node`'s times are what this mount saw (a node it read from the store, made, or changed), not the
/// placeholders of a node a listing just named.
fn knows_times(node: &Node) -> bool {
    node.seen.is_some() || node.validated.is_some()
}

/// A node's times after the store described a version of it other than the one this mount knew (`known`:
/// [`knows_times`] before it did). The mtime is the stored one (metadata, else LastModified); the ctime is not
/// stored: LastModified says when the object or its metadata last changed, never before the mtime. What this mount
/// saw happen to a node it knew (a chmod, a rename) may be later than the store's whole seconds say, and stays: a
/// ctime never goes back while the node is in memory. Likewise a directory's mtime: entries made or removed here
/// change it in memory only (its marker is not rewritten for each).
fn take_store_times(node: &mut Node, known: bool, mtime: SystemTime, last_modified: SystemTime) {
    let ctime = mtime.max(last_modified);
    node.mtime = if known && node.kind == FileKind::Dir { node.mtime.max(mtime) } else { mtime };
    node.ctime = if known { node.ctime.max(ctime).max(node.mtime) } else { ctime };
}

fn from_secs_nanos(secs: i64, nanos: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

/// Why a name cannot be created (docs/SEMANTICS.md, "Directory index").
const RESERVED_NAME: &str = "the name .s3cryptfs-index is reserved for s3cryptfs's directory index";

fn check_name(name: &OsStr) -> Result<String> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    let s = std::str::from_utf8(bytes).map_err(|_| Error::InvalidName)?;
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        return Err(Error::InvalidName);
    }
    if s == dirindex::INDEX_NAME {
        return Err(Error::NotPermitted(RESERVED_NAME));
    }
    Ok(s.to_string())
}

impl Fs {
    pub fn new(
        backend: Arc<dyn Backend>,
        codec: Codec,
        cache: Arc<PageCache>,
        journal: Arc<Journal>,
        config: FsConfig,
    ) -> Fs {
        let now = SystemTime::now();
        let root = Node {
            ino: ROOT_INO,
            parent: ROOT_INO,
            name: String::new(),
            kind: FileKind::Dir,
            size: 0,
            perm: (0o777 & !config.umask) as u16,
            uid: config.uid,
            gid: config.gid,
            mtime: now,
            ctime: now,
            atime: now,
            remote: None,
            has_marker: false,
            validated: Some(Instant::now()),
            lookups: 1,
            open_handles: 0,
            write: None,
            link_target: None,
            unlinked: false,
            rdev: 0,
            subdirs_known_until: None,
            listed: None,
            seen: None,
            format: StoredFormat::Own,
        };
        let deletes = Arc::new(LaterDeletes::new(backend));
        Fs {
            backend: deletes.clone(),
            deletes,
            codec,
            cache,
            s3ec: Arc::new(S3ecReads::new(config.s3ec.clone())),
            fetches: Arc::default(),
            disk: None,
            journal,
            config,
            table: Mutex::new(InodeTable::new(root)),
            handles: Mutex::new(HashMap::new()),
            openers: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            retargets: AtomicU64::new(0),
            negative: Mutex::new(HashMap::new()),
            silent_since: Mutex::new(None),
            relisting: Mutex::new(std::collections::HashSet::new()),
            probing: probing::Tallies::default(),
            prefetching: Mutex::new(std::collections::HashSet::new()),
            renewing: Mutex::new(std::collections::HashSet::new()),
            slow_pages: Mutex::new((0, None)),
            index: dirindex::DirIndexes::default(),
            held_listings: AtomicU64::new(0),
            forgetter: std::sync::OnceLock::new(),
            last_trim: Mutex::new(None),
            gate: gate::TreeGate::default(),
            dir_moves: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            after_resolve: Mutex::new(None),
        }
    }

    /// Reads look in `disk` after the page cache and before the store, and keep what they fetch there.
    pub fn with_disk_cache(mut self, disk: Arc<crate::cache::disk::DiskCache>) -> Fs {
        self.disk = Some(disk);
        self
    }

    pub fn disk_cache(&self) -> Option<&crate::cache::disk::DiskCache> {
        self.disk.as_deref()
    }

    /// Whether the disk under the journal is running low (`Journal::low_on_space`) once the scratch, which shares
    /// it and only saves reads, has given back what it can there.
    fn journal_low_on_space(&self) -> bool {
        self.journal.low_on_space() && (!self.scratch_gave_room() || self.journal.low_on_space())
    }

    /// Asks the scratch, if the mount has one holding anything, to give back its room on the journal's disk (down to
    /// its reserve: `DiskCache::give_room`); whether it was asked.
    fn scratch_gave_room(&self) -> bool {
        match self.disk.as_deref().filter(|d| !d.keeps_every_read() && d.stats().used > 0) {
            Some(scratch) => {
                scratch.give_room();
                true
            }
            None => false,
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    /// This run's journal directory (for log lines).
    pub fn journal_dir(&self) -> &std::path::Path {
        self.journal.run_path()
    }

    fn fresh(&self, node: &Node) -> bool {
        self.fresh_at(node, Instant::now())
    }

    /// [`Fs::fresh`] at time `now`.
    fn fresh_at(&self, node: &Node, now: Instant) -> bool {
        node.write.is_some()
            || node.validated.is_some_and(|t| now.saturating_duration_since(t) < self.config.attr_ttl)
            || (node.remote.is_none() && node.kind != FileKind::Dir && node.validated.is_some())
    }

    /// Whether a `stat` of one file fetches the attributes of the next ones with it (a read-ahead of HEADs,
    /// [`Fs::prefetch_from`]; a renewal by a page of the listing, [`Fs::renew_page`]). Not with `attr_ttl` zero: what
    /// the batch brings is stale at once, the stat asks again with a HEAD, and so does the stat of each next file,
    /// after a batch of its own: `ls -l` of 2,000 files with `attr_timeout=0` took 126 s and 9,767 requests (a page
    /// of 1,000 names or 256 HEADs per file). Each stat is then one HEAD.
    fn batches_pay(&self) -> bool {
        !self.config.attr_ttl.is_zero()
    }

    /// [`Fs::batches_pay`], for renewals: a page's attributes count from when it was asked, so a store slower than
    /// `attr_ttl` makes every page arrive stale, and renewals stop for [`RENEWALS_OFF_FOR`] after
    /// [`SLOW_PAGES_OFF`] such pages in a row (HEADs date their answers from their arrival: they are not affected).
    fn renewals_pay(&self) -> bool {
        self.batches_pay() && lock(&self.slow_pages).1.is_none_or(|t| Instant::now() >= t)
    }

    /// A renewal page asked for at `asked` has come back.
    fn renewal_done(&self, asked: Instant) {
        let took = asked.elapsed();
        let mut slow = lock(&self.slow_pages);
        if took < self.config.attr_ttl {
            slow.0 = 0;
            return;
        }
        slow.0 += 1;
        if slow.0 >= SLOW_PAGES_OFF {
            let ttl = self.config.attr_ttl;
            tracing::debug!(?took, ?ttl, "renewal pages arrive stale: each stat asks on its own for a while");
            *slow = (0, Some(Instant::now() + RENEWALS_OFF_FOR));
        }
    }

    /// A reader for one stored version of the object at `path`.
    fn reader(
        &self,
        path: String,
        etag: String,
        stored_size: u64,
        format: StoredFormat,
        readahead: u64,
    ) -> Result<Arc<Reader>> {
        let context = ReadContext {
            backend: self.backend.clone(),
            codec: self.codec.clone(),
            cache: self.cache.clone(),
            s3ec: self.s3ec.clone(),
            fetches: self.fetches.clone(),
            disk: self.disk.clone(),
        };
        Reader::new(&context, path, etag, stored_size, format, readahead)
    }

    /// The format of the object at `path` whose metadata is `meta`. In the client-side modes an object that carries
    /// neither a path binding nor S3EC keys costs one more HEAD, of `PATH.instruction`: S3EC objects of format V2 can
    /// keep their whole envelope there. (A store error there counts as "no instruction file": reading the object then
    /// fails as not in our format, and the next look asks again.)
    async fn format_of(&self, path: &str, meta: &UserMeta) -> StoredFormat {
        match self.codec.format_hint(meta) {
            FormatHint::Known(format) => format,
            FormatHint::AskInstructionFile => {
                let Ok(instruction) = ObjectKey::new(instruction_file_key(path)) else { return StoredFormat::Own };
                match self.backend.head(&instruction).await {
                    Ok(_) => StoredFormat::S3ec { instruction_file: true },
                    Err(_) => StoredFormat::Own,
                }
            }
        }
    }

    fn default_perm(&self, kind: FileKind) -> u16 {
        match kind {
            FileKind::Dir => (0o777 & !self.config.umask) as u16,
            FileKind::File | FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice | FileKind::Socket => {
                (0o666 & !self.config.umask) as u16
            }
            FileKind::Symlink => 0o777,
        }
    }

    fn blank_node(&self, parent: u64, name: &str, kind: FileKind) -> Node {
        let now = SystemTime::now();
        Node {
            ino: 0,
            parent,
            name: name.to_string(),
            kind,
            size: 0,
            perm: self.default_perm(kind),
            uid: self.config.uid,
            gid: self.config.gid,
            mtime: now,
            ctime: now,
            atime: now,
            remote: None,
            has_marker: false,
            validated: None,
            lookups: 0,
            open_handles: 0,
            write: None,
            link_target: None,
            unlinked: false,
            rdev: 0,
            subdirs_known_until: None,
            listed: None,
            seen: None,
            format: StoredFormat::Own,
        }
    }

    /// Applies what the store says about an object (in `format`, see [`Fs::format_of`]) to a node (unless the node
    /// has local changes).
    fn apply_remote(&self, node: &mut Node, info: &ObjectInfo, meta: &UserMeta, format: StoredFormat) {
        if node.write.is_some() {
            return;
        }
        let known = knows_times(node);
        let before = (node.remote.clone(), node.perm, node.uid, node.gid, node.mtime);
        let kind = match meta.mode.and_then(FileKind::from_mode) {
            Some(k) if k != FileKind::File => k,
            _ if node.kind == FileKind::Dir => FileKind::Dir,
            _ => FileKind::File,
        };
        node.rdev = if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
            meta.extra.get(RDEV_META).and_then(|v| v.parse().ok()).unwrap_or(0)
        } else {
            0
        };
        let new_remote =
            Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size };
        if node.remote.as_ref() != Some(&new_remote) {
            node.link_target = None;
        }
        node.kind = kind;
        if kind != FileKind::Dir {
            node.format = format;
            node.size = self.codec.plain_size_of(format, info.size).unwrap_or(info.size);
            node.remote = Some(new_remote);
        }
        node.perm = meta.mode.map(|m| (m & 0o7777) as u16).unwrap_or_else(|| self.default_perm(kind));
        node.uid = meta.uid.unwrap_or(self.config.uid);
        node.gid = meta.gid.unwrap_or(self.config.gid);
        let mtime = meta.mtime.map(|(s, n)| from_secs_nanos(s, n)).unwrap_or(info.last_modified);
        // The version this mount knew, attributes and all (the store's LastModified may be its own chmod's): the
        // times it has stand.
        let same = before == (node.remote.clone(), node.perm, node.uid, node.gid, mtime);
        if !(known && same && kind != FileKind::Dir) {
            take_store_times(node, known, mtime, info.last_modified);
        }
        node.validated = Some(Instant::now());
        node.seen = Some(dirindex::Seen::Store(dirindex::secs(info.last_modified)));
    }

    /// `apply_remote` for a node whose write state is being loaded (nothing local to protect yet).
    fn apply_remote_even_if_staged(&self, node: &mut Node, info: &ObjectInfo, meta: &UserMeta, format: StoredFormat) {
        let ws = node.write.take();
        self.apply_remote(node, info, meta, format);
        node.write = ws;
    }

    fn meta_of(node: &Node) -> UserMeta {
        let mut extra = BTreeMap::new();
        if matches!(node.kind, FileKind::CharDevice | FileKind::BlockDevice) {
            extra.insert(RDEV_META.to_string(), node.rdev.to_string());
        }
        UserMeta {
            mode: Some(node.mode()),
            uid: Some(node.uid),
            gid: Some(node.gid),
            mtime: Some(to_secs_nanos(node.mtime)),
            extra,
        }
    }

    fn path_of(&self, ino: u64) -> Result<String> {
        lock(&self.table).path_of(ino).ok_or(Error::NotFound)
    }

    fn child_path(&self, parent: u64, name: &str) -> Result<String> {
        let table = lock(&self.table);
        match table.get(parent) {
            Some(n) if n.kind == FileKind::Dir => {}
            Some(_) => return Err(Error::NotDir),
            None => return Err(Error::NotFound),
        }
        table.child_path(parent, name).ok_or(Error::NotFound)
    }

    /// EFBIG for a file larger than the mount's format can store (`format=s3ec`: one GCM message of about 64 GiB), at
    /// the write or truncate that would make it so: nothing is staged, and nothing half-written reaches the store.
    fn check_file_size(&self, path: &str, size: u64) -> Result<()> {
        let max = self.codec.max_file_size();
        if size > max {
            return Err(Error::TooLarge { key: path.to_string(), size, max });
        }
        Ok(())
    }

    /// ENAMETOOLONG for a path the store cannot hold (S3 keys are at most 1,024 bytes; see `Backend::max_path_len`).
    fn check_path_len(&self, path: &str, dir: bool) -> Result<()> {
        if path.len() > self.backend.max_path_len(dir) {
            return Err(Error::NameTooLong);
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.config.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Asks the store about a name: the object itself, its directory marker, and whether anything lives under it as a
    /// prefix. The three requests go out together, so a lookup costs one round trip.
    #[allow(clippy::type_complexity)]
    async fn probe(
        &self,
        path: &str,
    ) -> Result<(Option<(ObjectInfo, UserMeta)>, Option<(Option<(ObjectInfo, UserMeta)>, bool)>)> {
        let file_key = key(path)?;
        let marker_key = dir_key(path)?;
        let prefix = format!("{path}/");
        // A marker alone says "directory" (it shadows a file of the same name): the prefix listing, the slowest of the
        // three, is then not waited for (dropping it cancels it).
        let children = self.backend.has_children(&prefix);
        tokio::pin!(children);
        let heads = async { tokio::join!(self.backend.head(&file_key), self.backend.head(&marker_key)) };
        tokio::pin!(heads);
        let mut listed = None;
        let (file, marker) = loop {
            tokio::select! {
                found = &mut children, if listed.is_none() => listed = Some(found),
                both = &mut heads => break both,
            }
        };
        let children = match (&marker, listed) {
            (Ok(_), _) => Ok(true),
            (Err(_), Some(found)) => found,
            (Err(_), None) => children.await,
        };
        let file = match file {
            Ok(f) => Some(f),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(Error::store(path, e)),
        };
        let dir = match marker {
            Ok(m) => Some((Some(m), true)),
            Err(e) if e.is_not_found() => match children {
                Ok(true) => Some((None, false)),
                Ok(false) => None,
                Err(e) => return Err(Error::store(&prefix, e)),
            },
            Err(e) => return Err(Error::store(&prefix, e)),
        };
        Ok((file, dir))
    }

    /// Remembers that `name` was just found missing, so the create() the kernel sends next need not ask again.
    fn remember_missing(&self, parent: u64, name: &str) {
        let mut neg = lock(&self.negative);
        if neg.len() > 10_000 {
            neg.clear();
        }
        neg.insert((parent, name.to_string()), Instant::now());
    }

    /// Whether `name` was found missing within `attr_ttl` (consumes the memo).
    fn recently_missing(&self, parent: u64, name: &str) -> bool {
        lock(&self.negative)
            .remove(&(parent, name.to_string()))
            .is_some_and(|t| t.elapsed() < self.config.attr_ttl)
    }

    /// Checks that `name` may be created in `parent` and is free; returns it with its path.
    async fn new_name(&self, parent: u64, name: &OsStr) -> Result<(String, String)> {
        self.check_writable()?;
        let name = check_name(name)?;
        let path = self.child_path(parent, &name)?;
        match self.resolve_for_create(parent, &name).await {
            Ok(_) => Err(Error::Exists),
            Err(Error::NotFound) => Ok((name, path)),
            Err(e) => Err(e),
        }
    }

    /// Resolves a name that is about to be created: NotFound means free to create.
    async fn resolve_for_create(&self, parent: u64, name: &str) -> Result<u64> {
        // A name whose delete has not reached the store yet: the new file's journal record says "nothing was there"
        // (`BaseVersion::Absent`), which a crash before the delete would make a lie (recovery would find the old
        // object and keep the new content beside it), and another mount would see the old file under the new one.
        self.settle_delete(&self.child_path(parent, name)?).await;
        let known = lock(&self.table).child(parent, name).is_some();
        if !known && self.recently_missing(parent, name) {
            return Err(Error::NotFound);
        }
        self.resolve(parent, name).await
    }

    /// Answers a lookup of `name` in `parent` from the table when what it knows is recent enough: the node's
    /// attributes are fresh; or a listing less than `attr_ttl` old showed the file unchanged since its metadata was
    /// read (it exists, with that kind; its attributes may be older, see [`Fs::lookup_entry`]); or the table holds
    /// every name of `parent` (a listing or this mount's mkdir less than `attr_ttl` ago) and not this one. `None`:
    /// ask the store.
    fn resolve_from_memory(&self, parent: u64, name: &str) -> Option<Result<u64>> {
        match self.resolve_in(&mut lock(&self.table), parent, name, Instant::now()) {
            Resolved::Known(ino) => Some(Ok(ino)),
            Resolved::Missing => Some(Err(Error::NotFound)),
            Resolved::Ask(_) => None,
        }
    }

    /// [`Fs::resolve_from_memory`] in a locked `table` at time `now`; when the store must be asked, with the node the
    /// table holds for the name, if any.
    fn resolve_in(&self, table: &mut InodeTable, parent: u64, name: &str, now: Instant) -> Resolved {
        match table.child(parent, name) {
            Some(ino) => {
                let Some(node) = table.get(ino) else { return Resolved::Ask(Some(ino)) };
                // A directory whose own listing, less than attr_ttl old, showed entries exists: the kernel's
                // revalidation of it while a scan of it runs (`ls -l`, `find` past the dentry's timeout) costs no
                // probe. Its attributes are those of its marker as last read.
                if node.kind == FileKind::Dir && table.names(ino).is_some_and(|n| now < n.until && n.entries > 0) {
                    return Resolved::Known(ino);
                }
                if self.fresh_at(node, now) {
                    // A listed directory in use: worth listing again once its knowledge expires (a fresh node of a
                    // listing got its attributes from the listing's index or metadata read-ahead).
                    if node.listed.is_some() || node.kind != FileKind::Dir && table.names(parent).is_some() {
                        table.note_saved(parent, 1);
                    }
                    return Resolved::Known(ino);
                }
                if self.recently_listed_at(node, now) {
                    table.note_saved(parent, 1); // the HEAD a stale node would cost
                    return Resolved::Known(ino);
                }
                Resolved::Ask(Some(ino))
            }
            None if table.knows_names(parent, now) => {
                table.note_saved(parent, 3); // the three requests of a probe
                Resolved::Missing
            }
            None => Resolved::Ask(None),
        }
    }

    /// A lookup in `parent` must ask the store because the knowledge of its names expired: if that knowledge was in
    /// use (it saved at least what a listing costs), list the directory again instead (without fetching metadata), so
    /// `rm -r`, `cp -r` or a loop of creates keeps costing one listing per `attr_ttl` rather than a HEAD or a probe
    /// per name. A directory no longer in use costs at most one listing more than it saved: the new knowledge starts
    /// from nothing saved. Returns whether it listed.
    async fn relist_if_worth_it(&self, parent: u64) -> bool {
        let worth = {
            let table = lock(&self.table);
            let now = Instant::now();
            table.names(parent).is_some_and(|n| now >= n.until && n.saved >= n.listing_cost())
        };
        if !worth {
            return false;
        }
        let Some(relisting) = Relisting::start(&self.relisting, parent) else { return false };
        let listed = self.list_dir(parent, false).await;
        drop(relisting);
        match listed {
            Ok(_) => true,
            Err(e) => {
                if let Error::Store { key, source } = &e {
                    if source.is_unreachable() {
                        self.note_silent_store(key, source);
                    }
                }
                tracing::debug!(dir = parent, error = %e, "listing the directory again failed; asking about the name");
                false
            }
        }
    }

    /// [`Fs::resolve`], then `use_node` on the node found, under the table's lock. `resolve` releases that lock before
    /// it returns, and a node nobody refers to yet (a listing's entry, a node just read from the store, a kernel's
    /// node replaced after a change of kind elsewhere) may be trimmed in between (`fs::trim`, while the table is over
    /// its share of the memory budget). `use_node` says so with `None`, and the name is resolved again: a name that
    /// exists is never answered ENOENT for that. After [`RESOLVE_ATTEMPTS`] such losses, EBUSY.
    async fn resolve_then<T>(
        &self,
        parent: u64,
        name: &str,
        use_node: impl Fn(&mut InodeTable, u64) -> Option<Result<T>>,
    ) -> Result<T> {
        for _ in 0..RESOLVE_ATTEMPTS {
            let ino = self.resolve(parent, name).await?;
            #[cfg(test)]
            if let Some(hook) = lock(&self.after_resolve).as_ref() {
                hook(&mut lock(&self.table));
            }
            if let Some(answer) = use_node(&mut lock(&self.table), ino) {
                return answer;
            }
        }
        Err(Error::Busy("the name's node was trimmed from memory each time it was found"))
    }

    /// [`Fs::resolve`] with the node's attributes, read under the lock that found it still there (see
    /// [`Fs::resolve_then`]).
    async fn resolve_attr(&self, parent: u64, name: &str) -> Result<(u64, Attr)> {
        self.resolve_then(parent, name, |table, ino| table.attr(ino).map(|a| Ok((ino, a)))).await
    }

    /// Resolves `name` in `parent`, from the table when it knows enough (see [`Fs::resolve_from_memory`]), else from
    /// the store. Does not count a lookup.
    async fn resolve(&self, parent: u64, name: &str) -> Result<u64> {
        let path = self.child_path(parent, name)?;
        if let Some(answer) = self.resolve_from_memory(parent, name) {
            return answer;
        }
        // A file whose attributes this mount read, in a directory it listed (a scan past `attr_ttl`): one page of the
        // listing from this name on renews it and the names after it (see `fs::renew`).
        if !self.store_recently_silent() && self.renewable(parent, name) && self.renew_page(parent, name).await {
            if let Some(answer) = self.resolve_from_memory(parent, name) {
                return answer;
            }
        }
        // Listing again helps a name it may show missing, a node whose metadata was read (the listing confirms its
        // version), or any file of a directory with an index (applied again); not the never-read files of an
        // unindexed directory, which the read-ahead below serves.
        let relist_helps = {
            let table = lock(&self.table);
            table.child(parent, name).and_then(|c| table.get(c)).is_none_or(|n| n.validated.is_some())
        } || self.index_applied(parent);
        if !self.store_recently_silent() && relist_helps && self.relist_if_worth_it(parent).await {
            if let Some(answer) = self.resolve_from_memory(parent, name) {
                return answer;
            }
        }
        // A file of a listed directory: read the metadata of it and of the next ones in listing order at once, as the
        // stat of each entry that `ls -l`, `find -ls` or a loop over readdir does next will ask for them.
        if !self.store_recently_silent() && self.listed_file(parent, name) && self.prefetch_from(parent, name).await {
            if let Some(answer) = self.resolve_from_memory(parent, name) {
                return answer;
            }
        }
        // Asking the store about names here has cost about what listing the directory would: list it instead (and
        // read a listed file's metadata ahead as above).
        match self.list_if_lookups_add_up(parent, name).await {
            Ok(true) => {
                if let Some(answer) = self.resolve_from_memory(parent, name) {
                    return answer;
                }
                if self.listed_file(parent, name) && self.prefetch_from(parent, name).await {
                    if let Some(answer) = self.resolve_from_memory(parent, name) {
                        return answer;
                    }
                }
            }
            Ok(false) => {}
            // The store did not answer the listing: an unknown name fails as its probe would have, without waiting
            // for that too; a known one is served from memory below, as after a silent HEAD.
            Err(e) => {
                if lock(&self.table).child(parent, name).is_none() {
                    return Err(e);
                }
            }
        }
        let existing = {
            let table = lock(&self.table);
            table.child(parent, name).and_then(|ino| table.get(ino).map(|n| (ino, n.kind, self.fresh(n))))
        };
        if let Some((ino, _, true)) = existing {
            return Ok(ino);
        }
        // Known but expired, and the store was just found silent: answer from memory without waiting on it again.
        if let Some((ino, _, false)) = existing {
            if self.store_recently_silent() {
                tracing::debug!(path, "store silent: serving the known name from memory");
                return Ok(ino);
            }
        }
        // A stale directory with a marker: the marker alone says it exists (a directory shadows a file of the same
        // name), one HEAD instead of the probe's three requests, of which the prefix listing is the slow one.
        if let Some((ino, FileKind::Dir, false)) = existing {
            let has_marker = lock(&self.table).get(ino).is_some_and(|n| n.has_marker);
            if has_marker {
                match self.backend.head(&dir_key(&path)?).await {
                    Ok((info, meta)) => {
                        self.note_store_answers();
                        if let Some(node) = lock(&self.table).get_mut(ino).filter(|n| n.kind == FileKind::Dir) {
                            self.apply_remote(node, &info, &meta, StoredFormat::Own);
                            return Ok(ino);
                        }
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) if e.is_unreachable() => {
                        self.note_silent_store(&path, &e);
                        return Ok(ino);
                    }
                    Err(e) => return Err(Error::store(&path, e)),
                }
            }
        }
        // A stale node of known kind: ask about that kind first (one request in the common case).
        if let Some((ino, _, false)) = existing.filter(|(_, k, _)| *k != FileKind::Dir) {
            match self.backend.head(&key(&path)?).await {
                Ok((info, meta)) => {
                    self.note_store_answers();
                    let format = self.format_of(&path, &meta).await;
                    if let Some(node) = lock(&self.table).get_mut(ino) {
                        self.apply_remote(node, &info, &meta, format);
                    }
                    self.index_learned(parent);
                    // A directory of the same name shadows the file; that case is caught by readdir and the full probe
                    // below on the next expiry, which is accepted as the price of one request per lookup.
                    return Ok(ino);
                }
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_unreachable() => {
                    self.note_silent_store(&path, &e);
                    return Ok(ino);
                }
                Err(e) => return Err(Error::store(&path, e)),
            }
        }
        let (file, dir) = match self.probe(&path).await {
            Ok(found) => found,
            // A known name (a directory, or a file whose HEAD said missing) outlives a silent store too.
            Err(Error::Store { source, .. }) if source.is_unreachable() && existing.is_some() => {
                self.note_silent_store(&path, &source);
                return existing.map(|(ino, _, _)| ino).ok_or(Error::NotFound);
            }
            Err(e) => return Err(e),
        };
        self.note_store_answers();
        let file_format = match &file {
            Some((_, meta)) => self.format_of(&path, meta).await,
            None => StoredFormat::Own,
        };
        let mut table = lock(&self.table);
        // Re-check under the lock: the node may have been created locally meanwhile.
        let current = table.child(parent, name);
        // A file with unsaved local data keeps its name, whatever the store shows meanwhile.
        if let Some(ino) = current.filter(|c| table.get(*c).is_some_and(|n| n.write.is_some())) {
            return Ok(ino);
        }
        if let Some((marker, has_marker)) = dir {
            let ino = match current {
                Some(ino) if table.get(ino).is_some_and(|n| n.kind == FileKind::Dir) => ino,
                _ => table.insert(self.blank_node(parent, name, FileKind::Dir)),
            };
            if let Some(node) = table.get_mut(ino) {
                node.has_marker = has_marker;
                match &marker {
                    Some((info, meta)) => self.apply_remote(node, info, meta, StoredFormat::Own),
                    None => node.validated = Some(Instant::now()),
                }
            }
            return Ok(ino);
        }
        if let Some((info, meta)) = file {
            let ino = match current {
                Some(ino) if table.get(ino).is_some_and(|n| n.kind != FileKind::Dir) => ino,
                _ => table.insert(self.blank_node(parent, name, FileKind::File)),
            };
            if let Some(node) = table.get_mut(ino) {
                self.apply_remote(node, &info, &meta, file_format);
            }
            return Ok(ino);
        }
        // Not in the store. A node this mount created and has not uploaded yet still exists.
        if let Some(ino) = current {
            if table.get(ino).is_some_and(|n| n.write.is_some() || (n.remote.is_none() && n.kind != FileKind::Dir)) {
                return Ok(ino);
            }
            table.detach(parent, name);
        }
        drop(table);
        self.remember_missing(parent, name);
        Err(Error::NotFound)
    }

    fn attr_of(&self, ino: u64) -> Result<Attr> {
        lock(&self.table).attr(ino).ok_or(Error::NotFound)
    }

    // ----- namespace -----

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        self.lookup_entry(parent, name).await.map(|(attr, _)| attr)
    }

    /// A lookup, with how long the kernel may keep its answer: `attr_ttl`, or zero when the node exists for certain
    /// (a listing showed it less than `attr_ttl` ago) but its attributes are older than that. The kernel then asks
    /// GETATTR before it shows them (`stat`, permission checks), which reads them from the store, while an `unlink`,
    /// `rename` or `open` of the name, which need only the node, cost no request. So attributes changed by another
    /// mount show within `attr_ttl` as before, and `rm -r` pays no HEAD per file.
    pub async fn lookup_entry(&self, parent: u64, name: &OsStr) -> Result<(Attr, Duration)> {
        // Half way through a move of the directory, its old prefix lacks what has moved (see `fs::gate`).
        let _op = self.enter(&[parent]).await;
        let name = match check_name(name) {
            // The directory index is no file: not there for a lookup, refused (EPERM) for a create.
            Err(Error::NotPermitted(RESERVED_NAME)) => return Err(Error::NotFound),
            other => other?,
        };
        let answer = self
            .resolve_then(parent, &name, |table, ino| {
                let node = table.get_mut(ino)?;
                node.lookups += 1;
                let fresh = self.fresh(node) || self.store_recently_silent();
                let ttl = if fresh { self.config.attr_ttl } else { Duration::ZERO };
                Some(table.attr(ino).map(|a| (a, ttl)).ok_or(Error::NotFound))
            })
            .await?;
        self.account();
        Ok(answer)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.table).forget(ino, n);
        self.account();
    }

    /// The lookups a READDIRPLUS answer stands for, of `entries` the directory's listing just showed, in order:
    /// answered from memory only, never the store, so a directory read costs what its listing cost. Each counts a
    /// lookup as [`Fs::lookup_entry`] does (the kernel links every entry it is sent and forgets it later), and says so
    /// in the third field of its answer. The time to keep it is `lookup_entry`'s for a name memory knows, zero for one
    /// memory alone cannot vouch for, so the kernel asks (LOOKUP) before it uses those attributes, as without
    /// READDIRPLUS. An entry the table holds no node for (no room for it, see `list_dir`, or trimmed since) gets
    /// placeholder attributes under the number its node will get, with a zero time and no lookup counted (there is no
    /// node to count it on; a FORGET of it is a no-op). `None`: the name is gone since the listing was taken, and is
    /// not shown.
    ///
    /// All under one lock of the table and one reading of the clock (a reply holds hundreds of entries): `add` gets
    /// each entry's position in `entries`, its name and its answer, and says whether the reply is full; then that
    /// entry's lookup is taken back and no further entry is looked up. Returns how many entries were handled (all
    /// but the one that did not fit).
    pub fn lookup_listed_each(
        &self,
        parent: u64,
        entries: &[DirEntry],
        mut add: impl FnMut(usize, &str, Option<(Attr, Duration, bool)>) -> bool,
    ) -> usize {
        let silent = self.store_recently_silent();
        let now = Instant::now();
        let mut table = lock(&self.table);
        for (i, listed) in entries.iter().enumerate() {
            let found = self.lookup_listed_in(&mut table, parent, listed, silent, now);
            let counted = found.as_ref().and_then(|(a, _, counted)| counted.then_some(a.ino));
            if add(i, &listed.name, found) {
                if let Some(node) = counted.and_then(|ino| table.get_mut(ino)) {
                    node.lookups = node.lookups.saturating_sub(1);
                }
                return i;
            }
        }
        entries.len()
    }

    fn lookup_listed_in(
        &self,
        table: &mut InodeTable,
        parent: u64,
        listed: &DirEntry,
        silent: bool,
        now: Instant,
    ) -> Option<(Attr, Duration, bool)> {
        let name = listed.name.as_str();
        let (ino, vouched) = match self.resolve_in(table, parent, name, now) {
            Resolved::Known(ino) => (ino, true),
            Resolved::Missing => return None,
            Resolved::Ask(Some(ino)) => (ino, false),
            Resolved::Ask(None) => {
                let mut node = self.blank_node(parent, name, listed.kind);
                node.ino = listed.ino;
                return Some((node.attr_with(1), Duration::ZERO, false));
            }
        };
        let attr = table.attr_at(ino, now)?;
        let node = table.get_mut(ino)?;
        node.lookups += 1;
        let ttl = if vouched && (self.fresh_at(node, now) || silent) { self.config.attr_ttl } else { Duration::ZERO };
        Some((attr, ttl, true))
    }

    /// The attributes memory holds for `ino` (for the "." and ".." entries of a directory read), without asking.
    pub fn attr_in_memory(&self, ino: u64) -> Option<Attr> {
        lock(&self.table).attr(ino)
    }

    /// Brings the memory accounting up to date after [`Fs::lookup_listed_each`].
    pub fn lookups_done(&self) {
        self.account();
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr> {
        let (stale_file, path, listed_in) = {
            let table = lock(&self.table);
            let node = table.get(ino).ok_or(Error::NotFound)?;
            let stale = node.kind != FileKind::Dir && !self.fresh(node) && node.remote.is_some();
            let listed_in = (stale && self.recently_listed(node)).then(|| (node.parent, node.name.clone()));
            (stale, if stale { table.path_of(ino) } else { None }, listed_in)
        };
        if let (true, Some(path)) = (stale_file, path) {
            // Half way through a move above it, the old prefix lacks what has moved: a page of it would drop those
            // names (see `fs::gate`). Wait for the move, then ask at the new name.
            self.gate.settled(ino, || lock(&self.table)).await;
            let path = self.path_of(ino).unwrap_or(path);
            if self.store_recently_silent() {
                tracing::debug!(path, "store silent: serving known attributes from memory");
                return self.attr_of(ino);
            }
            if self.index_reads() {
                // Attributes this mount read, of a file in a directory it listed: renewed with the next ones' by a
                // page of the listing (see `fs::renew`). Not when a listing less than `attr_ttl` old showed the name
                // with another LastModified (a metadata change by another writer): its HEAD below reads what changed.
                let in_dir = lock(&self.table).get(ino).map(|n| (n.parent, n.name.clone()));
                let renew = in_dir.filter(|(dir, name)| listed_in.is_none() && self.renewable(*dir, name));
                if let Some((dir, name)) = renew {
                    if self.renew_page(dir, &name).await && lock(&self.table).get(ino).is_some_and(|n| self.fresh(n)) {
                        return self.attr_of(ino);
                    }
                    if self.store_recently_silent() {
                        return self.attr_of(ino); // the page found the store silent: do not wait for it again
                    }
                }
            } else if let Some((dir, name)) = listed_in {
                // The attributes of a listing's entry: fetch them with the next entries' (see `Fs::prefetch_from`).
                self.prefetch_from(dir, &name).await;
                if lock(&self.table).get(ino).is_some_and(|n| self.fresh(n)) || self.store_recently_silent() {
                    return self.attr_of(ino);
                }
            }
            match self.backend.head(&key(&path)?).await {
                Ok((info, meta)) => {
                    self.note_store_answers();
                    let format = self.format_of(&path, &meta).await;
                    let parent = {
                        let mut table = lock(&self.table);
                        table.get_mut(ino).map(|node| {
                            self.apply_remote(node, &info, &meta, format);
                            node.parent
                        })
                    };
                    if let Some(dir) = parent {
                        self.index_learned(dir);
                    }
                }
                // Gone from the store (another writer deleted it): keep answering from what we know; a lookup will
                // notice, and open handles keep working on their version.
                Err(e) if e.is_not_found() => {}
                // The store does not answer: what we know is better than an error or a wait.
                Err(e) if e.is_unreachable() => self.note_silent_store(&path, &e),
                Err(e) => return Err(Error::store(&path, e)),
            }
        }
        self.attr_of(ino)
    }

    /// A refresh of `path` found the store silent (`e` timed out or could not connect): from now on, for
    /// [`SILENT_STORE_GRACE`], known names and attributes are served from memory without asking. Logged once per
    /// outage at warn (each stale answer at debug), so a dead store does not flood the log.
    fn note_silent_store(&self, path: &str, e: &StoreError) {
        let first = lock(&self.silent_since).replace(Instant::now()).is_none();
        if first {
            tracing::warn!(
                path,
                error = %crate::error_text::error_chain(e),
                "the store does not answer: serving names and attributes already known from memory (stale) until it does"
            );
        } else {
            tracing::debug!(path, "store still silent: serving what is known from memory");
        }
    }

    /// A refresh got an answer: the store is back, if it was silent.
    fn note_store_answers(&self) {
        if lock(&self.silent_since).take().is_some() {
            tracing::info!("the store answers again");
        }
    }

    /// Whether a refresh found the store silent within the last [`SILENT_STORE_GRACE`].
    fn store_recently_silent(&self) -> bool {
        lock(&self.silent_since).is_some_and(|t| t.elapsed() < SILENT_STORE_GRACE)
    }

    /// Enters the tree gate for an operation on `inos` (see `fs::gate`): public entry points that change names or
    /// content call this first, and resolve their paths after it.
    async fn enter(&self, inos: &[u64]) -> gate::Entered<'_> {
        self.gate.enter(inos, || lock(&self.table)).await
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        let _op = self.enter(&[parent]).await;
        self.mkdir_in(parent, name, mode, caller).await
    }

    async fn mkdir_in(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        // The name was free when checked, so the new directory has no subdirectories: its link count is known (2)
        // for as long as a listing taken now would be trusted.
        let known_until = Instant::now() + self.config.attr_ttl;
        let (name, path) = self.new_name(parent, name).await?;
        self.check_path_len(&path, true)?;
        let mut node = self.blank_node(parent, &name, FileKind::Dir);
        let (gid, setgid) = self.group_for(parent, caller);
        node.perm = ((mode & 0o7777) | if setgid { libc::S_ISGID } else { 0 }) as u16;
        node.uid = caller.uid;
        node.gid = gid;
        let meta = Self::meta_of(&node);
        self.backend.put(&dir_key(&path)?, Bytes::new(), &meta).await.map_err(|e| Error::store(format!("{path}/"), e))?;
        node.has_marker = true;
        node.subdirs_known_until = Some(known_until);
        let attr = self.link_new(parent, node);
        // And it has no names at all: creates in it need not ask the store whether a name is free.
        lock(&self.table).know_names(attr.ino, known_until, 0, None);
        Ok(attr)
    }

    /// Puts a node this mount just created in the store into the table, counted as one kernel lookup (the entry
    /// the reply hands to the kernel), and updates the parent's times.
    fn link_new(&self, parent: u64, mut node: Node) -> Attr {
        node.validated = Some(Instant::now());
        node.lookups = 1;
        let file = node.kind != FileKind::Dir;
        if file {
            node.seen = Some(dirindex::Seen::Wrote(dirindex::now_secs()));
        }
        let attr = {
            let mut table = lock(&self.table);
            let ino = table.insert(node);
            self.touch_dir(&mut table, parent);
            table.attr(ino).unwrap_or_else(|| unreachable!("node {ino} was inserted under the same lock"))
        };
        if file {
            self.index_touch(parent);
        }
        attr
    }

    /// The group of a node created in `parent` by `caller`, and whether a new directory gets the set-group-ID bit:
    /// as on local filesystems, a directory with that bit hands its group to everything made in it, and the bit to
    /// its new subdirectories (shared group directories rely on it); elsewhere the creator's group. The kernel has
    /// already dropped the bit from the mode of a file whose creator is not in that group.
    fn group_for(&self, parent: u64, caller: Caller) -> (u32, bool) {
        match lock(&self.table).get(parent) {
            Some(dir) if u32::from(dir.perm) & libc::S_ISGID != 0 => (dir.gid, true),
            _ => (caller.gid, false),
        }
    }

    fn touch_dir(&self, table: &mut InodeTable, dir: u64) {
        if let Some(node) = table.get_mut(dir) {
            let now = SystemTime::now();
            node.mtime = now;
            node.ctime = now;
        }
    }

    /// mknod(2): fifos, character and block devices and sockets become metadata-only objects (an empty body; in
    /// client-side modes the same sealed empty object as an empty file, so every object stays in one format); a
    /// regular file (Linux sends `mknod(S_IFREG)` for some creates) becomes an empty file.
    pub async fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, caller: Caller) -> Result<Attr> {
        let _op = self.enter(&[parent]).await;
        self.mknod_in(parent, name, mode, rdev, caller).await
    }

    async fn mknod_in(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, caller: Caller) -> Result<Attr> {
        let kind = FileKind::from_mode(mode).ok_or(Error::InvalidArgument("unknown file type"))?;
        if matches!(kind, FileKind::Dir | FileKind::Symlink) {
            return Err(Error::InvalidArgument("mknod cannot make directories or symbolic links"));
        }
        let (name, path) = self.new_name(parent, name).await?;
        self.check_path_len(&path, false)?;
        let mut node = self.blank_node(parent, &name, kind);
        node.perm = (mode & 0o7777) as u16;
        node.uid = caller.uid;
        node.gid = self.group_for(parent, caller).0;
        if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
            node.rdev = rdev;
        }
        let info = self.put_small(&path, &[], Self::meta_of(&node)).await?;
        node.remote = Some(Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size });
        node.format = self.codec.written_format();
        Ok(self.link_new(parent, node))
    }

    pub async fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> Result<Attr> {
        let _op = self.enter(&[parent]).await;
        self.symlink_in(parent, name, target, caller).await
    }

    async fn symlink_in(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> Result<Attr> {
        let (name, path) = self.new_name(parent, name).await?;
        self.check_path_len(&path, false)?;
        let target = target.as_bytes().to_vec();
        let mut node = self.blank_node(parent, &name, FileKind::Symlink);
        node.uid = caller.uid;
        node.gid = self.group_for(parent, caller).0;
        node.size = target.len() as u64;
        let info = self.put_small(&path, &target, Self::meta_of(&node)).await?;
        node.remote = Some(Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size });
        node.format = self.codec.written_format();
        node.link_target = Some(target);
        Ok(self.link_new(parent, node))
    }

    /// Encrypts and stores a small object held in memory (symlink targets).
    async fn put_small(&self, path: &str, content: &[u8], meta: UserMeta) -> Result<ObjectInfo> {
        // new_name() checked the name is free; a racing creator elsewhere makes this fail rather than be overwritten.
        crate::upload::upload(
            &*self.backend,
            &self.codec,
            path,
            &crate::upload::Memory(content),
            content.len() as u64,
            meta,
            &Expect::Absent,
            Some(&self.s3ec),
        )
            .await
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _op = self.enter(&[ino]).await; // its object may be half way through a move (see `fs::gate`)
        // The target this mount knows, or else the version of the object it is read from.
        type Version = Option<(Remote, StoredFormat)>;
        let known = || -> Result<Result<Vec<u8>, Version>> {
            let table = lock(&self.table);
            let node = table.get(ino).ok_or(Error::NotFound)?;
            if node.kind != FileKind::Symlink {
                return Err(Error::InvalidArgument("not a symbolic link"));
            }
            Ok(node.link_target.clone().ok_or_else(|| node.remote.clone().map(|r| (r, node.format))))
        };
        if let Ok(target) = known()? {
            return Ok(target);
        }
        // After a rename here the version known may be gone (the copy's new ETag): as for open.
        self.learn_version_if_stale(ino, FileKind::Symlink).await?;
        let (remote, format) = match known()? {
            Ok(target) => return Ok(target),
            Err(remote) => remote.ok_or(Error::NotFound)?,
        };
        let path = self.path_of(ino)?;
        let reader = self.reader(path, remote.etag, remote.stored_size, format, 0)?;
        let target = reader.read(0, reader.plain_size() as usize).await?;
        if let Some(node) = lock(&self.table).get_mut(ino) {
            node.link_target = Some(target.clone());
        }
        Ok(target)
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let _op = self.enter(&[parent]).await;
        self.unlink_in(parent, name).await
    }

    async fn unlink_in(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let name = check_name(name)?;
        let path = self.child_path(parent, &name)?;
        // A file this mount knows (looked up or listed, even with expired attributes), that no handle has open and that
        // has nothing staged, needs no lookup: the delete, conditional on the version known where the store can check
        // (S3), is the only request. Where another writer replaced or deleted the object since, the store refuses and
        // the unlink goes the way it always went: the name looked up anew, then deleted. See docs/SEMANTICS.md.
        let known = {
            let table = lock(&self.table);
            table.child(parent, &name).and_then(|ino| {
                let n = table.get(ino)?;
                let idle = n.kind != FileKind::Dir && n.write.is_none() && n.open_handles == 0;
                n.remote.as_ref().filter(|_| idle).map(|r| (ino, r.etag.clone()))
            })
        };
        // The delete itself is sent after unlink returns, batched with the others of a burst (`rm -r`): see
        // `fs::deletes` for what this mount and the store see meanwhile, and what a crash before it is sent leaves.
        if let Some((ino, etag)) = known.filter(|(ino, etag)| {
            !etag.is_empty() && !self.is_open(*ino) && !self.has_instruction_file(*ino)
        }) {
            // The intent goes in the journal first, so a daemon killed before the delete is sent does not bring the
            // file back: the next start sends it. If it cannot be written, the delete is sent now instead.
            let intent = crate::journal::DeleteIntent { path: path.clone(), etag: etag.clone() };
            match self.journal.save_delete(&intent) {
                Ok(n) => {
                    let journal = self.journal.clone();
                    self.deletes.delete_later(&key(&path)?, Some(etag), Some(Box::new(move |settled| {
                        if settled {
                            journal.remove_delete(n);
                        }
                    })));
                    return self.unlinked(parent, &name, &path, ino).await;
                }
                Err(e) => {
                    tracing::warn!(key = %path, error = %e, "could not write the delete intent to the journal; deleting now");
                    match self.backend.delete_if(&key(&path)?, &etag).await {
                        Ok(()) => return self.unlinked(parent, &name, &path, ino).await,
                        Err(e) if e.is_precondition() || e.is_not_found() => {}
                        Err(e) => return Err(Error::store(&path, e)),
                    }
                }
            }
        }
        let (ino, attr) = self.resolve_attr(parent, &name).await?;
        let kind = attr.kind;
        if kind == FileKind::Dir {
            return Err(Error::IsDir);
        }
        // Open and not staged yet: stage it now, while the store still has it, so reads and writes through the open
        // descriptors keep working on the file's content after the name is gone (POSIX: the file lives on until its
        // last descriptor closes). A reader that only had its object to read from would get ENOENT.
        if self.is_open(ino) {
            self.stage_whole(ino).await?;
        }
        // Wait for an upload of this file in flight (a concurrent close), and keep later ones out until the node is
        // marked unlinked: otherwise the upload could land after the delete and bring the file back.
        let mut guards = self.lock_states(vec![ino]).await;
        // The journal forgets the file before the store does: a crash in between leaves the file in the store with its
        // last uploaded content (the unlink did not happen), never a record that would bring it back after the delete.
        for (_, staged) in guards.iter_mut() {
            staged.drop_record();
        }
        if let Err(e) = self.backend.delete(&key(&path)?).await {
            for (g_ino, staged) in guards.iter_mut() {
                self.keep_record(*g_ino, staged, true);
            }
            return Err(Error::store(&path, e));
        }
        for (_, staged) in guards.iter_mut() {
            staged.mark_clean(); // deleted while open: POSIX says the data goes with it
        }
        // The guards are held until the name is detached (the node marked unlinked), so no upload lands after this.
        self.unlinked(parent, &name, &path, ino).await
    }

    /// What follows the delete of a file's object: its cached pages and S3EC instruction file go, and the name leaves
    /// the table.
    async fn unlinked(&self, parent: u64, name: &str, path: &str, ino: u64) -> Result<()> {
        self.cache.invalidate_key(path);
        if self.has_instruction_file(ino) {
            // Part of the object (S3EC clients delete it with the object too); left behind it would show up.
            let instruction = instruction_file_key(path);
            let deleted = match key(&instruction) {
                Ok(k) => self.backend.delete(&k).await,
                Err(_) => Ok(()),
            };
            if let Err(e) = deleted {
                tracing::warn!(key = %path, instruction, error = %crate::error_text::error_chain(&e), "the object was deleted, but not its S3EC instruction file");
            }
        }
        let mut table = lock(&self.table);
        table.detach(parent, name);
        self.touch_dir(&mut table, parent);
        drop(table);
        self.index_touch(parent);
        Ok(())
    }

    /// Lists a directory's direct children from the store, merged with what this mount has created but not uploaded.
    /// With `prefetch`, the metadata of entries whose attributes are not fresh is fetched too (see
    /// [`Fs::prefetch_metadata`]); a listing taken only to renew the knowledge of names skips it.
    async fn list_dir(&self, ino: u64, prefetch: bool) -> Result<Vec<DirEntry>> {
        let path = self.path_of(ino)?;
        let prefix = dir_prefix(&path);
        // The listing shows the directory as it was when asked (or later): its subdirectories are known as of now.
        let window = self.listing_window(ino);
        let listed_at = window.at;
        let (listing, index) = self.list_children(ino, &prefix, prefetch).await.map_err(|e| Error::store(&prefix, e))?;
        self.merge_listing(ino, &prefix, listed_at, &listing, index, prefetch).await
    }

    /// The second half of [`Fs::list_dir`]: merges `listing`, `ino`'s whole listing (from `prefix`) as asked for at
    /// `listed_at`, into the table, applies the directory's index (`index`: what the listing got of it) and, with
    /// `prefetch`, fetches the metadata the index did not give.
    async fn merge_listing(
        &self,
        ino: u64,
        prefix: &str,
        listed_at: Instant,
        listing: &Listing,
        index: IndexRead,
        prefetch: bool,
    ) -> Result<Vec<DirEntry>> {
        // Name (borrowed from the listing), kind, and the position of its object in the listing, sorted by name: no
        // copies, which for a large listing would double what it takes while it is merged; a sorted vector of 24-byte
        // rows rather than a map (a third of the memory for 100,000 names).
        let mut found: Vec<(&str, FileKind, u32)> = Vec::with_capacity(listing.objects.len() + listing.prefixes.len());
        for p in &listing.prefixes {
            let rest = p.as_str().strip_prefix(prefix).unwrap_or(p.as_str()).trim_end_matches('/');
            if !rest.is_empty() && !rest.contains('/') && check_name(OsStr::new(rest)).is_ok() {
                found.push((rest, FileKind::Dir, NO_OBJECT));
            }
        }
        let mut overflow = false;
        for (position, o) in listing.objects.iter().enumerate() {
            let rest = o.key.as_str().strip_prefix(prefix).unwrap_or(o.key.as_str());
            if rest.is_empty() {
                continue; // the directory's own marker
            }
            if let Some(dir) = rest.strip_suffix('/') {
                if !dir.contains('/') && check_name(OsStr::new(dir)).is_ok() {
                    found.push((dir, FileKind::Dir, NO_OBJECT));
                }
                continue;
            }
            if rest.contains('/') || check_name(OsStr::new(rest)).is_err() {
                continue;
            }
            // Past 4 billion objects in one listing: not shown, and the directory not taken as fully listed.
            let Some(position) = u32::try_from(position).ok().filter(|&p| p != NO_OBJECT) else {
                overflow = true;
                continue;
            };
            found.push((rest, FileKind::File, position));
        }
        // A name that is both a directory (a prefix or a marker) and a file is shown as the directory.
        found.sort_unstable_by(|a, b| a.0.cmp(b.0).then_with(|| (a.1 != FileKind::Dir).cmp(&(b.1 != FileKind::Dir))));
        found.dedup_by(|later, first| later.0 == first.0);
        // While the listing is merged, it takes memory the table would otherwise grow into: its objects, and the
        // rows above. Counted against the table's room below, so that a large listing makes the table take fewer
        // new nodes rather than the daemon go past its budget for the time of the merge.
        let merging = trim::merge_bytes(listing, found.len());
        // New nodes only while the table has room in its share of the memory budget (see `fs::trim`): the entries
        // past that are reported with the number their node will get, and looked up from the store when used.
        let mut room = self.table_room(merging);
        let mut complete = !overflow;
        let mut entries = {
            let mut table = lock(&self.table);
            let mut entries = Vec::with_capacity(found.len());
            table.reserve(found.len().min(usize::try_from(room).unwrap_or(usize::MAX)));
            // The directory's path as of now (it may have moved while it was listed), for the new nodes' numbers.
            let dir_path = table.path_of(ino);
            let mut child_path = String::new();
            for (name, kind, position) in found {
                let info = listing.objects.get(position as usize);
                let name = name.to_string();
                let existing = table.child(ino, &name).filter(|&child| {
                    table.get(child).is_some_and(|n| {
                        // Same kind, or a file with unsaved local data, which a listing must never replace.
                        (n.kind == FileKind::Dir) == (kind == FileKind::Dir) || n.write.is_some()
                    })
                });
                // Gone from the table since the listing was asked for (unlinked, removed or renamed away by this mount,
                // or found gone by a lookup): the listing may be older than that, and says nothing sure of the name.
                let went = table.went_while_listed(ino, &name, listed_at);
                let ino = match existing {
                    Some(child) => child,
                    // With no node now, the name is left out, and the directory's names are not taken as all known:
                    // a lookup of it asks the store (it may have come back since, here or in another mount).
                    None if went => {
                        complete = false;
                        continue;
                    }
                    None if room > 0 => {
                        room -= 1;
                        let path = dir_path.as_deref().map(|dir| {
                            inode::join_path(&mut child_path, dir, &name);
                            child_path.as_str()
                        });
                        table.insert_at(self.blank_node(ino, &name, kind), path)
                    }
                    None => {
                        complete = false;
                        entries.push(DirEntry { ino: table.number_of(ino, &name), name, kind });
                        continue;
                    }
                };
                let mut kind = kind;
                if let Some(node) = table.get_mut(ino) {
                    if let (Some(info), None) = (info, &node.write) {
                        let remote =
                            Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size };
                        if node.remote.as_ref() != Some(&remote) {
                            self.note_listed_change(node, info);
                        } else if node.validated.is_some() {
                            // The version whose metadata was read is still there: the name exists, with that kind.
                            node.listed = Some(listed_at);
                            // And its attributes, when its whole identity is the one they were read for (see
                            // `fs::renew`): confirmed as of the listing, with no index to read for them.
                            if self.index_reads() && dirindex::vouches(node, &dirindex::Identity::of(info)) {
                                node.validated = node.validated.max(Some(listed_at));
                            }
                        }
                    }
                    kind = node.kind;
                }
                entries.push(DirEntry { ino, name, kind });
            }
            // Children created here and not yet in the store (a listed name's node has the listed entry's number).
            // The entries so far are sorted by name, as `found` was.
            let listed = entries.len();
            for child in table.children_of(ino) {
                if let Some(n) = table.get(child) {
                    let is_listed = || {
                        entries[..listed]
                            .binary_search_by(|e| e.name.as_str().cmp(n.name.as_str()))
                            .is_ok_and(|i| entries[i].ino == child)
                    };
                    if !n.unlinked && (n.write.is_some() || n.remote.is_none()) && !is_listed() {
                        if n.kind == FileKind::Dir && !n.has_marker {
                            continue;
                        }
                        entries.push(DirEntry { ino: child, name: n.name.clone(), kind: n.kind });
                    }
                }
            }
            entries
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        // The directory's index first, whenever it has one and some listed file needs attributes (one GET): what it
        // vouches for needs no HEAD, and a listing taken again while a scan stats the directory renews them all.
        self.apply_index(ino, prefix, listing, index).await;
        if prefetch {
            self.prefetch_metadata(&entries).await;
        }
        // The metadata tells symlinks from files; report what is known now (d_type is used by find and ls).
        {
            let mut table = lock(&self.table);
            for e in entries.iter_mut() {
                if let Some(n) = table.get(e.ino) {
                    e.kind = n.kind;
                }
            }
            // The instruction file of an S3EC object beside it is part of that object, not a file of its own: hidden
            // from listings (a lookup by name still finds it). See docs/SEMANTICS.md.
            let s3ec_objects: std::collections::HashSet<String> = entries
                .iter()
                .filter(|e| table.get(e.ino).is_some_and(|n| n.kind == FileKind::File && n.format.is_s3ec()))
                .map(|e| e.name.clone())
                .collect();
            if !s3ec_objects.is_empty() {
                entries.retain(|e| {
                    e.kind != FileKind::File
                        || !e.name.strip_suffix(INSTRUCTION_SUFFIX).is_some_and(|object| s3ec_objects.contains(object))
                });
            }
            if complete {
                // Every listed name is in the table now, and every subdirectory made or found since under the table's
                // lock: the table holds all subdirectories (and perhaps stale ones: a count never too low).
                table.know_subdirs(ino, listed_at + self.config.attr_ttl);
                // Likewise every name: the listing's, and whatever this mount made or found since under the same lock.
                table.know_names(ino, listed_at + self.config.attr_ttl, entries.len(), Some(listed_at));
            } else {
                table.forget_listing(ino);
            }
        }
        self.account();
        Ok(entries)
    }

    /// Notes the names of directory `dir` that go until the guard is dropped, once the listing begun now is merged
    /// (see [`InodeTable::went_while_listed`]).
    fn listing_window(&self, dir: u64) -> ListingWindow<'_> {
        let at = Instant::now();
        lock(&self.table).begin_listing(dir, at);
        ListingWindow { table: &self.table, dir, at }
    }

    /// How many more nodes the table has room for in its share of the memory budget (see `fs::trim`), with `merging`
    /// bytes taken meanwhile by a listing being merged.
    fn table_room(&self, merging: u64) -> u64 {
        let memory = self.cache.memory();
        memory.metadata_share().saturating_sub(memory.metadata()).saturating_sub(merging) / inode::NODE_BYTES
    }

    /// A listing shows another stored version of the file `node` than the one it knows (or its first): take the size
    /// now, and let the next lookup fetch its metadata.
    fn note_listed_change(&self, node: &mut Node, info: &ObjectInfo) {
        node.size = self.codec.plain_size_of(node.format, info.size).unwrap_or(info.size);
        node.remote = Some(Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size });
        node.validated = None;
        node.listed = None;
        node.link_target = None;
        if node.kind == FileKind::File {
            node.mtime = info.last_modified;
        }
    }

    /// Whether a listing less than `attr_ttl` old showed the node's stored version unchanged since its metadata was
    /// read: it exists, with the kind it has, whatever the age of its other attributes.
    fn recently_listed(&self, node: &Node) -> bool {
        self.recently_listed_at(node, Instant::now())
    }

    /// [`Fs::recently_listed`] at time `now`.
    fn recently_listed_at(&self, node: &Node, now: Instant) -> bool {
        node.kind != FileKind::Dir
            && node.write.is_none()
            && node.remote.is_some()
            && node.listed.is_some_and(|t| now.saturating_duration_since(t) < self.config.attr_ttl)
    }

    /// Fetches the metadata (mode, owner, mtime, symlink or not) of listed files whose attributes are not fresh,
    /// many at a time, so the `stat` of every entry that `ls -l` or `find` does next needs no request of its own.
    /// S3 listings carry no user metadata, so without this each entry would cost one sequential HEAD.
    ///
    /// Entries the listing showed unchanged since their metadata was read are left for later: their kind is known (so
    /// `d_type` is right), and `rm -r` or `find -type f` never asks for the rest. The GETATTR of one fetches it
    /// with the next ones ([`Fs::prefetch_from`]), so `ls -l` costs what it did.
    async fn prefetch_metadata(&self, entries: &[DirEntry]) {
        // With `attr_ttl` zero the attributes are stale at once: only the files never read are fetched, for their
        // kind (a symlink, a FIFO, that d_type and `find -type` see), not again at each readdir.
        let types_only = !self.batches_pay();
        let stale: Vec<(u64, String)> = {
            let table = lock(&self.table);
            entries
                .iter()
                .filter(|e| e.kind != FileKind::Dir)
                .filter_map(|e| {
                    let n = table.get(e.ino)?;
                    let wanted = !self.fresh(n)
                        && n.remote.is_some()
                        && !self.recently_listed(n)
                        && (!types_only || n.validated.is_none());
                    wanted.then(|| Some((e.ino, table.path_of(e.ino)?)))?
                })
                .collect()
        };
        self.fetch_metadata(stale).await;
    }

    /// Whether `name` in `dir` is a file a listing of `dir` showed and whose attributes are stale: what
    /// [`Fs::prefetch_from`] serves.
    fn listed_file(&self, dir: u64, name: &str) -> bool {
        let table = lock(&self.table);
        table.names(dir).is_some()
            && table.child(dir, name).and_then(|c| table.get(c)).is_some_and(|n| {
                n.kind != FileKind::Dir && n.write.is_none() && n.remote.is_some() && !self.fresh(n)
            })
    }

    /// Metadata read-ahead for the entries of a listed directory: HEADs the stale files of `dir` from `name` on, in
    /// listing order (by name, the order readdir gives), [`PREFETCH_BATCH`] at most, 32 at a time. `ls -l`, `find
    /// -ls` and a loop of `stat` over readdir ask for the entries in that order, so a directory of any size costs
    /// one round trip per 32 entries instead of one per entry, and a `stat` of one entry costs at most one batch.
    /// A batch of [`Fs::prefetch_metadata`] at readdir, when the directory had more stale entries than it fetches,
    /// comes to the same. One batch per directory at a time; returns false when one was running (the caller asks for
    /// its own node).
    async fn prefetch_from(&self, dir: u64, name: &str) -> bool {
        if !self.batches_pay() || !lock(&self.prefetching).insert(dir) {
            return false;
        }
        let batch: Vec<(u64, String)> = {
            let table = lock(&self.table);
            let mut stale: Vec<(&str, u64)> = table
                .children_of(dir)
                .into_iter()
                .filter_map(|c| {
                    let n = table.get(c)?;
                    let wanted = n.kind != FileKind::Dir
                        && n.write.is_none()
                        && n.remote.is_some()
                        && !n.unlinked
                        && !self.fresh(n)
                        && n.name.as_str() >= name;
                    wanted.then_some((n.name.as_str(), c))
                })
                .collect();
            if stale.len() > PREFETCH_BATCH {
                stale.select_nth_unstable(PREFETCH_BATCH);
                stale.truncate(PREFETCH_BATCH);
            }
            stale.into_iter().filter_map(|(_, c)| Some((c, table.path_of(c)?))).collect()
        };
        self.head_all(batch).await;
        lock(&self.prefetching).remove(&dir);
        true
    }

    /// At readdir: HEADs `stale` files (inode, path), unless there are more than [`MAX_PREFETCH`]: a listing that
    /// large is probably a scan that will not stat them all (`find -name`, `ls`), and one that does is served by
    /// [`Fs::prefetch_from`] as it goes.
    async fn fetch_metadata(&self, stale: Vec<(u64, String)>) {
        if stale.len() <= MAX_PREFETCH {
            self.head_all(stale).await;
        }
    }

    /// HEADs `stale` files (inode, path), 32 at a time, and applies what the store says.
    async fn head_all(&self, stale: Vec<(u64, String)>) {
        use futures::StreamExt;
        /// Concurrent HEADs: enough to hide latency, few enough not to look like a flood to the store.
        const CONCURRENCY: usize = 32;
        if stale.is_empty() {
            return;
        }
        let results: Vec<_> = futures::stream::iter(stale)
            .map(|(ino, path)| async move {
                let r = match key(&path) {
                    Ok(k) => match self.backend.head(&k).await {
                        Ok((info, meta)) => Some((self.format_of(&path, &meta).await, info, meta)),
                        // What comes next (the lookup's own HEAD) serves known names from memory instead of
                        // waiting for the store again.
                        Err(e) if e.is_unreachable() => {
                            self.note_silent_store(&path, &e);
                            None
                        }
                        Err(_) => None,
                    },
                    Err(_) => None,
                };
                (ino, r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut parents = std::collections::HashSet::new();
        {
            let mut table = lock(&self.table);
            for (ino, r) in results {
                if let (Some((format, info, meta)), Some(node)) = (r, table.get_mut(ino)) {
                    self.apply_remote(node, &info, &meta, format);
                    parents.insert(node.parent);
                }
            }
        }
        for dir in parents {
            self.index_learned(dir);
        }
    }

    pub async fn opendir(&self, ino: u64) -> Result<u64> {
        let _op = self.enter(&[ino]).await; // a listing half way through a move misses what has moved (`fs::gate`)
        if self.attr_of(ino)?.kind != FileKind::Dir {
            return Err(Error::NotDir);
        }
        let entries = Arc::new(self.list_dir(ino, true).await?);
        let bytes = trim::listing_bytes(&entries);
        self.held_listings.fetch_add(bytes, Ordering::AcqRel);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Handle::Dir { entries, bytes });
        self.account();
        Ok(fh)
    }

    /// Entries from position `offset` on (0 = first real entry; "." and ".." are added by the adapter).
    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::Dir { entries, .. }) => Ok(entries.clone()),
            _ => Err(Error::BadHandle),
        }
    }

    pub fn releasedir(&self, fh: u64) {
        if let Some(Handle::Dir { bytes, .. }) = lock(&self.handles).remove(&fh) {
            self.held_listings.fetch_sub(bytes, Ordering::AcqRel);
            self.account();
        }
    }

    /// Waits until an unlink of `path` whose delete is pending has reached the store (at once if none is).
    async fn settle_delete(&self, path: &str) {
        if let Ok(k) = key(path) {
            self.deletes.settle_key(&k).await;
        }
    }

    /// fsync of a directory: returns once the store has every unlink of a name under it (other directory changes
    /// are sent as they happen).
    pub async fn fsyncdir(&self, ino: u64) -> Result<()> {
        let path = self.path_of(ino)?;
        self.deletes.settle(&dir_prefix(&path)).await;
        Ok(())
    }

    pub fn parent_of(&self, ino: u64) -> u64 {
        lock(&self.table).get(ino).map(|n| n.parent).unwrap_or(ROOT_INO)
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let _op = self.enter(&[parent]).await;
        self.rmdir_in(parent, name).await
    }

    async fn rmdir_in(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let name = check_name(name)?;
        let path = self.child_path(parent, &name)?;
        let (ino, attr) = self.resolve_attr(parent, &name).await?;
        if attr.kind != FileKind::Dir {
            return Err(Error::NotDir);
        }
        let has_index = self.ensure_empty(ino, &path).await?;
        // The index first: left behind it would keep a directory without a marker in listings.
        self.remove_index(ino, &path, has_index).await.map_err(|e| Error::store(dirindex::index_key(&path), e))?;
        self.backend.delete(&dir_key(&path)?).await.map_err(|e| Error::store(format!("{path}/"), e))?;
        let mut table = lock(&self.table);
        table.detach(parent, &name);
        self.touch_dir(&mut table, parent);
        Ok(())
    }

    /// ENOTEMPTY unless the directory at `path` has no entries; returns whether it has an index object (no entry).
    async fn ensure_empty(&self, ino: u64, path: &str) -> Result<bool> {
        let pending = {
            let table = lock(&self.table);
            table.children_of(ino).into_iter().any(|c| {
                table.get(c).is_some_and(|n| !n.unlinked && (n.write.is_some() || (n.remote.is_none() && n.kind != FileKind::Dir)))
            })
        };
        if pending {
            return Err(Error::NotEmpty);
        }
        let prefix = format!("{path}/");
        let listing = self.backend.list(&prefix, false).await.map_err(|e| Error::store(&prefix, e))?;
        // The directory's own index is no entry of it, nor is the reserved prefix under its name, where a mount of
        // this directory may have left its probe of the store's conditional writes when killed during it
        // (`Backend::probe_conditional_writes`): removed here, or the directory would stay in listings.
        let reserved = format!("{prefix}{}/", dirindex::INDEX_NAME);
        let is_reserved = |p: &ObjectKey| p.as_str().trim_end_matches('/') == reserved.trim_end_matches('/');
        let others = listing.objects.iter().any(|o| o.key.as_str() != prefix && !dirindex::is_index_key(o.key.as_str()))
            || listing.prefixes.iter().any(|p| !is_reserved(p));
        if others {
            return Err(Error::NotEmpty);
        }
        if listing.prefixes.iter().any(is_reserved) {
            let left = self.backend.list(&reserved, true).await.map_err(|e| Error::store(&reserved, e))?;
            for o in &left.objects {
                self.backend.delete(&o.key).await.map_err(|e| Error::store(o.key.as_str(), e))?;
            }
        }
        Ok(listing.objects.iter().any(|o| dirindex::is_index_key(o.key.as_str())))
    }

    /// rename(2), for files, symlinks and whole directories. `noreplace` is RENAME_NOREPLACE.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> Result<()> {
        // A directory move waits for the operations under it that entered the gate, and a rename is one: two moves
        // crossing (X into Y/ and Y into X/ at once) would each wait for the other. Directory moves take `dir_moves`
        // before they enter, so only one is ever inside. A name not known here may be a directory: it takes it too,
        // and a move that finds a directory without it tries again with it.
        let mut serial = None;
        loop {
            let maybe_dir = {
                let table = lock(&self.table);
                let known = name.to_str().and_then(|n| table.child(parent, n)).and_then(|i| table.get(i));
                known.is_none_or(|n| n.kind == FileKind::Dir)
            };
            if maybe_dir && serial.is_none() {
                serial = Some(self.dir_moves.lock().await);
            }
            let _op = self.enter(&[parent, new_parent]).await;
            if self.rename_in(parent, name, new_parent, new_name, noreplace, serial.is_some()).await? {
                return Ok(());
            }
        }
    }

    /// [`Fs::rename`] inside the gate. `Ok(false)`: the source is a directory and `serial` (holding `dir_moves`) is
    /// not set; nothing was done.
    async fn rename_in(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
        serial: bool,
    ) -> Result<bool> {
        self.check_writable()?;
        let name = check_name(name)?;
        let new_name = check_name(new_name)?;
        let from = self.child_path(parent, &name)?;
        let to = self.child_path(new_parent, &new_name)?;
        let (ino, attr) = self.resolve_attr(parent, &name).await?;
        if from == to {
            return Ok(true);
        }
        let kind = attr.kind;
        if kind == FileKind::Dir && !serial {
            return Ok(false);
        }
        self.settle_delete(&to).await; // as for a create (see `resolve_for_create`)
        let target = match self.resolve_attr(new_parent, &new_name).await {
            Ok((t, tattr)) => Some((t, tattr.kind)),
            Err(Error::NotFound) => None,
            Err(e) => return Err(e),
        };
        self.check_path_len(&to, kind == FileKind::Dir)?;
        if let Some((t, tkind)) = target {
            if noreplace {
                return Err(Error::Exists);
            }
            match (kind == FileKind::Dir, tkind == FileKind::Dir) {
                (false, true) => return Err(Error::IsDir),
                (true, false) => return Err(Error::NotDir),
                (true, true) => {
                    self.ensure_empty(t, &to).await?;
                }
                (false, false) => {}
            }
        }
        let target = target.map(|(t, _)| t);
        // Nothing may change under a directory, or look it up, until the table has it at its new name (see
        // `fs::gate`). Into itself is refused first: the move would wait for this very operation, which entered at
        // the new parent. A file's own move too: reads through its descriptors that find the old key gone wait for
        // the new one, and changes of the file wait (they waited for its write state before).
        if kind == FileKind::Dir && (new_parent == ino || gate_is_under(&lock(&self.table), new_parent, ino)) {
            return Err(Error::InvalidArgument("cannot move a directory into itself"));
        }
        let _moving = self.gate.begin_move(ino, || lock(&self.table)).await;
        // An open target keeps its content for its descriptors (see unlink).
        if let Some(t) = target.filter(|t| self.is_open(*t)) {
            self.stage_whole(t).await?;
        }
        // Hold the write state of every file involved (the source or everything under it, and the target) for the
        // whole move: uploads in flight finish first, and none can start under the old name meanwhile. A file open
        // for writing that has no state yet gets one first, so that its first write waits for the move too.
        self.hold_open_writers(ino, kind)?;
        let mut involved = if kind == FileKind::Dir { self.staged_under(ino) } else { vec![ino] };
        involved.extend(target);
        let mut guards = self.lock_states(involved).await;
        for (g_ino, staged) in guards.iter_mut() {
            if Some(*g_ino) != target {
                self.flush_locked(*g_ino, staged).await?;
            }
        }
        // A target file open with unsaved writes is replaced: the journal forgets it first, so a crash during or after
        // the move never uploads its old content over what replaced it. Restored if the move fails.
        for (g_ino, staged) in guards.iter_mut() {
            if Some(*g_ino) == target {
                staged.drop_record();
            }
        }
        // Until this returns (the table updated): see `index_write_lock`.
        let _index_writes = if kind == FileKind::Dir { Some(self.index_write_lock().await) } else { None };
        let moved = self.move_objects(ino, kind, &from, &to, target.is_some()).await;
        if let Err(e) = moved {
            for (g_ino, staged) in guards.iter_mut() {
                if Some(*g_ino) == target {
                    self.keep_record(*g_ino, staged, true);
                }
            }
            return Err(e);
        }
        for (g_ino, staged) in guards.iter_mut() {
            if Some(*g_ino) == target {
                staged.mark_clean();
            }
        }
        {
            let mut table = lock(&self.table);
            table.detach(new_parent, &new_name);
            table.relink(ino, new_parent, &new_name);
            if let Some(node) = table.get_mut(ino) {
                node.ctime = SystemTime::now();
                // The copy may carry a new ETag: ask the store before trusting the old one.
                if node.kind != FileKind::Dir {
                    node.validated = None;
                }
            }
            // So may every copy under a moved directory (S3 keeps a single-part object's ETag through a copy; a
            // multipart object's and Azure's ETags change).
            if kind == FileKind::Dir {
                for c in files_under(&table, ino) {
                    if let Some(node) = table.get_mut(c) {
                        node.validated = None;
                    }
                }
            }
            self.touch_dir(&mut table, parent);
            self.touch_dir(&mut table, new_parent);
        }
        if kind != FileKind::Dir {
            self.index_touch(parent);
            self.index_touch(new_parent);
        }
        // Files open for writing that moved: their next upload replaces the moved object, whose ETag the copy may
        // have changed.
        for (g_ino, staged) in guards.iter_mut() {
            if Some(*g_ino) != target && staged.loaded && staged.base != BaseVersion::Absent {
                let moved_to = lock(&self.table).path_of(*g_ino);
                if let Some(p) = moved_to {
                    if let Ok((info, _)) = self.backend.head(&key(&p)?).await {
                        // A sparse file's base moved with it: same bytes, maybe a new ETag.
                        if let (Some(s), Some(etag)) = (&mut staged.sparse, &info.etag) {
                            if info.size == s.stored_size {
                                s.etag = etag.clone();
                                s.drop_readers();
                                s.record_stale = true;
                            }
                        }
                        staged.base = info.etag.map(BaseVersion::Etag).unwrap_or(BaseVersion::Any);
                    }
                }
            } else if Some(*g_ino) != target && !staged.loaded {
                // Held unloaded (see `hold_open_writers`): while the state stays, the node counts as fresh and
                // nothing asks the store again, so the version the copy made is learnt here. A reader opened at the
                // new name would otherwise ask for the old ETag and fail until the writer closed.
                let moved_to = lock(&self.table).path_of(*g_ino);
                if let Some(p) = moved_to {
                    if let Ok((info, meta)) = self.backend.head(&key(&p)?).await {
                        let format = self.format_of(&p, &meta).await;
                        if let Some(n) = lock(&self.table).get_mut(*g_ino) {
                            self.apply_remote_even_if_staged(n, &info, &meta, format);
                        }
                    }
                }
            }
        }
        drop(guards);
        self.retarget_readers();
        Ok(true)
    }

    /// The store side of a rename: one object, or every object under a directory.
    async fn move_objects(&self, ino: u64, kind: FileKind, from: &str, to: &str, replaces: bool) -> Result<()> {
        if kind == FileKind::Dir {
            if to.starts_with(&format!("{from}/")) {
                return Err(Error::InvalidArgument("cannot move a directory into itself"));
            }
            if replaces {
                self.backend.delete(&dir_key(to)?).await.map_err(|e| Error::store(format!("{to}/"), e))?;
            }
            let src_prefix = format!("{from}/");
            let listing = self.backend.list(&src_prefix, true).await.map_err(|e| Error::store(&src_prefix, e))?;
            // Markers last, so that a crash half way leaves the source directory visible with what remains in it.
            let (mut markers, objects): (Vec<_>, Vec<_>) =
                listing.objects.into_iter().partition(|o| o.key.as_str().ends_with('/'));
            // Deepest first: a marker moves once what is under it has moved.
            markers.sort_by_key(|o| std::cmp::Reverse(o.key.as_str().len()));
            // Every new key must fit before anything moves (a half-moved tree is worse than a refusal).
            for o in objects.iter().chain(markers.iter()) {
                let rest = &o.key.as_str()[src_prefix.len()..];
                let dst = format!("{to}/{rest}");
                self.check_path_len(dst.trim_end_matches('/'), o.key.as_str().ends_with('/'))?;
            }
            for o in objects.iter().chain(markers.iter()) {
                let rest = &o.key.as_str()[src_prefix.len()..];
                let dst = format!("{to}/{rest}");
                if o.key.as_str().ends_with('/') {
                    self.backend
                        .rename(&o.key, &key(&dst)?, None)
                        .await
                        .map_err(|e| Error::store(o.key.as_str(), e))?;
                } else {
                    self.rename_object(o.key.as_str(), &dst).await?;
                }
            }
        } else {
            let uploaded = lock(&self.table).get(ino).is_some_and(|n| n.remote.is_some());
            if uploaded {
                self.rename_object(from, to).await?;
                // An S3EC object's instruction file moves with it (a directory's listing above moves it anyway).
                if self.has_instruction_file(ino) {
                    let (from_i, to_i) = (instruction_file_key(from), instruction_file_key(to));
                    match self.backend.rename(&key(&from_i)?, &key(&to_i)?, None).await {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(Error::store(&from_i, e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves one object, re-binding it to its new path when it is encrypted. The version its HEAD found is the one
    /// moved ([`Backend::rename_if`]): an upload of `from` by another writer that lands during the move stays under
    /// the old name (logged), and one that lands before the copy makes the move start again from its HEAD.
    async fn rename_object(&self, from: &str, to: &str) -> Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.rename_object_once(from, to).await {
                Err(Error::Store { source, .. }) if source.is_precondition() && attempts < MOVE_ATTEMPTS => {
                    tracing::debug!(key = %from, "the object changed before it was copied; moving it again");
                }
                other => return other,
            }
        }
    }

    async fn rename_object_once(&self, from: &str, to: &str) -> Result<()> {
        let from_key = key(from)?;
        let to_key = key(to)?;
        let (info, mut meta) = self.backend.head(&from_key).await.map_err(|e| Error::store(from, e))?;
        if self.codec.is_encrypted() && meta.extra.contains_key(BIND_META) {
            let (header, _, _) = self
                .backend
                .get_range(&from_key, 0..self.codec.header_len())
                .await
                .map_err(|e| Error::store(from, e))?;
            let oc = self.codec.open(&header).await.map_err(|e| Error::codec(from, e))?;
            // Refuse to re-bind an object that was not bound to where we found it: that would launder a swap.
            oc.verify_binding(from, meta.extra.get(BIND_META).map(String::as_str))
                .map_err(|e| Error::crypto(from, e))?;
            if let Some(b) = oc.binding(to) {
                meta.extra.insert(BIND_META.to_string(), b);
            }
            self.move_version(&from_key, &to_key, Some(&meta), info.etag.as_deref()).await?;
        } else {
            self.move_version(&from_key, &to_key, None, info.etag.as_deref()).await?;
        }
        self.cache.invalidate_key(from);
        self.cache.invalidate_key(to);
        Ok(())
    }

    /// The store side of [`Fs::rename_object`]: the version `etag` names where the HEAD gave one.
    async fn move_version(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
        etag: Option<&str>,
    ) -> Result<()> {
        let Some(etag) = etag else {
            return self.backend.rename(from, to, meta).await.map_err(|e| Error::store(from.as_str(), e));
        };
        let deleted = self.backend.rename_if(from, to, meta, etag).await.map_err(|e| Error::store(from.as_str(), e))?;
        if !deleted {
            tracing::warn!(key = %from, to = %to, "another writer stored this name while it was being moved: its version stays under the old name");
        }
        Ok(())
    }

    /// Whether `ino` is an S3EC object whose envelope (or part of it) is in its instruction file.
    fn has_instruction_file(&self, ino: u64) -> bool {
        lock(&self.table).get(ino).is_some_and(|n| n.format == StoredFormat::S3ec { instruction_file: true })
    }

    fn retarget_readers(&self) {
        self.retargets.fetch_add(1, Ordering::AcqRel);
        let handles = lock(&self.handles);
        let table = lock(&self.table);
        for h in handles.values() {
            if let Handle::File { ino, reader: Some(r), .. } = h {
                if let Some(p) = table.path_of(*ino) {
                    r.set_key(p);
                }
            }
        }
    }

    // ----- attributes -----

    pub async fn setattr(&self, ino: u64, changes: SetAttr, fh: Option<u64>, caller: Caller) -> Result<Attr> {
        let _op = self.enter(&[ino]).await;
        self.setattr_in(ino, changes, fh, caller).await
    }

    async fn setattr_in(&self, ino: u64, changes: SetAttr, fh: Option<u64>, caller: Caller) -> Result<Attr> {
        let wants_change = changes.mode.is_some()
            || changes.uid.is_some()
            || changes.gid.is_some()
            || changes.size.is_some()
            || changes.mtime.is_some();
        if wants_change {
            self.check_writable()?;
        }
        let (kind, owner) = {
            let table = lock(&self.table);
            let n = table.get(ino).ok_or(Error::NotFound)?;
            (n.kind, n.uid)
        };
        // chown rules (the kernel's default_permissions leaves them to us): only root gives a file away; the owner may
        // change the group.
        if let Some(uid) = changes.uid {
            if caller.uid != 0 && uid != owner {
                return Err(Error::NotPermitted("only root can change a file's owner"));
            }
        }
        if changes.gid.is_some() && caller.uid != 0 && caller.uid != owner {
            return Err(Error::NotPermitted("only the owner or root can change a file's group"));
        }
        // A change by path has no handle; count one for its duration so that no concurrent release drops the write
        // state it works on (a chmod that marked an orphaned state dirty returned success, sent nothing to the store,
        // and left a journal record that the next start uploaded over newer attributes).
        let _pin = (fh.is_none() && wants_change).then(|| self.pin(ino));
        if let Some(size) = changes.size {
            if kind == FileKind::Dir {
                return Err(Error::IsDir);
            }
            let path = self.path_of(ino).unwrap_or_default();
            self.check_file_size(&path, size)?;
            {
                let mut staged = self.stage(ino).await?;
                staged.truncate(size).map_err(|e| Error::staging(&path, e))?;
                if let Some(node) = lock(&self.table).get_mut(ino) {
                    node.size = size;
                    node.mtime = SystemTime::now();
                    node.ctime = node.mtime;
                }
                self.keep_record(ino, &mut staged, false);
            }
        }
        let meta_changed = changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() || changes.mtime.is_some();
        {
            let mut table = lock(&self.table);
            let node = table.get_mut(ino).ok_or(Error::NotFound)?;
            if let Some(mode) = changes.mode {
                node.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = changes.uid {
                node.uid = uid;
            }
            if let Some(gid) = changes.gid {
                node.gid = gid;
            }
            if let Some(m) = changes.mtime {
                node.mtime = m;
            }
            if let Some(a) = changes.atime {
                node.atime = a;
            }
            if meta_changed {
                node.ctime = SystemTime::now();
            }
        }
        // Persist. A truncate by path (no handle) is uploaded now, since no close will follow.
        let ws = lock(&self.table).get(ino).and_then(|n| n.write.clone());
        let loaded = match &ws {
            Some(ws) => ws.lock().await.loaded,
            None => false,
        };
        if let (Some(ws), true) = (ws, loaded) {
            // A staged file carries its attributes with its next upload; one lock for the change and the upload.
            let mut staged = ws.lock().await;
            if meta_changed {
                staged.mark_dirty();
                self.keep_record(ino, &mut staged, true);
            }
            if fh.is_none() {
                self.flush_locked(ino, &mut staged).await?;
            }
        } else if meta_changed {
            self.persist_meta(ino, kind).await?;
        }
        self.attr_of(ino)
    }

    async fn persist_meta(&self, ino: u64, kind: FileKind) -> Result<()> {
        if ino == ROOT_INO {
            return Ok(()); // the mount root has no object; its attributes last for the mount
        }
        let path = self.path_of(ino)?;
        let (node_meta, has_marker) = {
            let table = lock(&self.table);
            let n = table.get(ino).ok_or(Error::NotFound)?;
            (Self::meta_of(n), n.has_marker)
        };
        if kind == FileKind::Dir {
            let key = dir_key(&path)?;
            let res = if has_marker {
                self.backend.update_meta(&key, &node_meta).await
            } else {
                self.backend.put(&key, Bytes::new(), &node_meta).await
            };
            res.map_err(|e| Error::store(format!("{path}/"), e))?;
            if let Some(n) = lock(&self.table).get_mut(ino) {
                n.has_marker = true;
            }
            return Ok(());
        }
        let info = self.replace_attrs(&key(&path)?, &path, &node_meta).await?;
        let parent = lock(&self.table).get_mut(ino).map(|n| {
            n.remote = Some(Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size });
            n.validated = Some(Instant::now());
            n.seen = Some(dirindex::Seen::Wrote(dirindex::now_secs()));
            n.parent
        });
        if let Some(dir) = parent {
            self.index_touch(dir);
        }
        // The replacement is a copy onto itself, with a new ETag on S3 for a multipart object: the open descriptors'
        // readers, pinned to the old one, would fail every read they have not cached (`Changed`, EIO). A file open
        // for writing between syncs (its staged copy not loaded) reads through them too (review of 2a105d2).
        self.refresh_readers(ino, &path, &info);
        Ok(())
    }

    /// Puts `attrs` (mode, owner, group, mtime) into the object's metadata and keeps the rest of it (binding, chunk
    /// map, upload stamp…) as the version it goes onto has it: the replacement is conditional on the version the HEAD
    /// read that metadata from, read again if another writer replaced the object in between. (A replacement checked
    /// against a version read later put one version's binding and map onto another's content: unreadable for good in
    /// the client-side modes.) Returns the object as it is now.
    async fn replace_attrs(&self, key: &ObjectKey, path: &str, attrs: &UserMeta) -> Result<ObjectInfo> {
        /// Reads of a version another writer keeps replacing, before the change fails with the precondition.
        const TRIES: usize = 4;
        let mut tries = 0;
        loop {
            tries += 1;
            let (now, mut meta) = self.backend.head(key).await.map_err(|e| Error::store(path, e))?;
            meta.mode = attrs.mode;
            meta.uid = attrs.uid;
            meta.gid = attrs.gid;
            meta.mtime = attrs.mtime;
            let Some(etag) = now.etag else {
                // A store that names no versions cannot be asked for one.
                return self.backend.update_meta(key, &meta).await.map_err(|e| Error::store(path, e));
            };
            match self.backend.update_meta_if(key, &meta, &etag).await {
                Ok((info, _)) => return Ok(info),
                Err(e) if e.is_precondition() && tries < TRIES => {
                    tracing::debug!(key = %path, "replaced while its attributes were set; reading it again");
                }
                Err(StoreError::Unsupported { .. }) => {
                    return self.backend.update_meta(key, &meta).await.map_err(|e| Error::store(path, e));
                }
                Err(e) => return Err(Error::store(path, e)),
            }
        }
    }

    /// Counts an open handle on `ino` until the guard drops.
    fn pin(&self, ino: u64) -> Pin<'_> {
        if let Some(n) = lock(&self.table).get_mut(ino) {
            n.open_handles += 1;
        }
        Pin { fs: self, ino }
    }

    pub fn statfs(&self) -> StatFs {
        // Object stores have no fixed capacity; report a large, constant one so tools that check free space proceed.
        StatFs { blocks: 1 << 40, bfree: 1 << 40, files: 1 << 32, ffree: 1 << 32, bsize: 4096, namelen: NAME_MAX as u32 }
    }

    // ----- files -----

    /// The write state of a file, created and loaded (downloaded and decrypted) if needed.
    /// [`Fs::stage`], and then the rest of a sparsely staged file fetched (`fs::sparse`): for a file whose object is
    /// about to go (unlink, or a rename onto it) while descriptors still use it, so that they keep reading all of it
    /// from the journal.
    async fn stage_whole(&self, ino: u64) -> Result<()> {
        let mut staged = self.stage(ino).await?;
        if staged.sparse.is_some() {
            let path = self.path_of(ino)?;
            self.unsparse(&path, &mut staged).await?;
            self.keep_record(ino, &mut staged, false);
        }
        Ok(())
    }

    /// Returns the state locked, loaded: the caller changes it before any upload can run. Handed back unlocked, a
    /// flush (another descriptor's close or fsync) could upload it and mark it unloaded before the caller locked it
    /// again (after an in-place update, or a whole upload of a large file: `flush_locked`), and a write then landed
    /// in a copy that the next stage empties: success to the writer, and the bytes gone (review of 2a105d2).
    async fn stage(&self, ino: u64) -> Result<tokio::sync::OwnedMutexGuard<Staged>> {
        // An unlinked file still open has no path; it can only be staged already (loaded), which needs none.
        let known_path = self.path_of(ino).ok();
        let path = known_path.clone().unwrap_or_default();
        let (ws, remote) = {
            let mut table = lock(&self.table);
            let node = table.get_mut(ino).ok_or(Error::NotFound)?;
            if node.kind != FileKind::File {
                return Err(Error::IsDir);
            }
            let ws = match &node.write {
                Some(ws) => ws.clone(),
                None => {
                    // Not in the store (created here and not uploaded): the upload must not replace anything.
                    let staged = Staged::create(&self.journal, node.remote.is_none(), false, BaseVersion::Absent)
                        .map_err(|e| Error::staging(&path, e))?;
                    let ws = Arc::new(tokio::sync::Mutex::new(staged));
                    node.write = Some(ws.clone());
                    ws
                }
            };
            (ws, node.remote.clone())
        };
        let mut staged = ws.lock_owned().await;
        // A rename holds the state of every file it moves (`hold_open_writers`): waited for here, the file may have
        // a new name now, which the HEAD and the download below must ask for.
        let known_path = self.path_of(ino).ok();
        let path = known_path.clone().unwrap_or_default();
        if !staged.loaded {
            staged.reset().map_err(|e| Error::staging(&path, e))?;
            if let Some(mut remote) = remote {
                let path = known_path.ok_or(Error::NotFound)?;
                // About to rewrite the whole object from this copy: make sure it is the version in the store now,
                // whatever the attribute cache says, or another writer's update would be silently overwritten.
                let (info, meta) = self.backend.head(&key(&path)?).await.map_err(|e| Error::store(&path, e))?;
                let format = self.format_of(&path, &meta).await;
                let current = Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size };
                let known_format = lock(&self.table).get(ino).map(|n| n.format);
                if current != remote || known_format != Some(format) {
                    if let Some(n) = lock(&self.table).get_mut(ino) {
                        n.remote = Some(current.clone());
                        self.apply_remote_even_if_staged(n, &info, &meta, format);
                    }
                    remote = current;
                }
                // A large object of the own format is staged only where it is written (`fs::sparse`).
                if let Some(sparse) = self.sparse_base(&info, format) {
                    staged.base = BaseVersion::Etag(sparse.etag.clone());
                    staged.start_sparse(sparse).map_err(|e| Error::staging(&path, e))?;
                    staged.loaded = true;
                    return Ok(staged);
                }
                let mut base = info.etag.clone();
                let size = match self.download_into(&path, &remote, format, &staged.file).await {
                    // Replaced in the store since we looked (another writer): stage the version there now.
                    Err(Error::Changed { .. }) => {
                        let (info, meta) = self.backend.head(&key(&path)?).await.map_err(|e| Error::store(&path, e))?;
                        let format = self.format_of(&path, &meta).await;
                        let fresh = Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size };
                        if let Some(n) = lock(&self.table).get_mut(ino) {
                            n.remote = Some(fresh.clone());
                            self.apply_remote_even_if_staged(n, &info, &meta, format);
                        }
                        base = info.etag.clone();
                        staged.reset().map_err(|e| Error::staging(&path, e))?;
                        self.download_into(&path, &fresh, format, &staged.file).await?
                    }
                    other => other?,
                };
                staged.set_loaded_size(size);
                staged.base = base.map(BaseVersion::Etag).unwrap_or(BaseVersion::Any);
            } else {
                staged.base = BaseVersion::Absent;
            }
            staged.loaded = true;
            staged.from_empty = staged.size == 0;
        }
        Ok(staged)
    }

    /// Downloads and decrypts one stored version of `path` into a staging file; returns its plaintext size. An S3EC
    /// object is authenticated whole before its first byte is staged (see `read::s3ec`).
    async fn download_into(
        &self,
        path: &str,
        remote: &Remote,
        format: StoredFormat,
        file: &crate::journal::StagedFile,
    ) -> Result<u64> {
        let reader = self.reader(path.to_string(), remote.etag.clone(), remote.stored_size, format, 0)?;
        reader.check_at_open().await?;
        let mut offset = 0u64;
        while offset < reader.plain_size() {
            let data = reader.read(offset, STAGE_READ).await?;
            if data.is_empty() {
                break;
            }
            file.write_at(offset, &data, offset).map_err(|e| Error::staging(path, e))?;
            offset += data.len() as u64;
        }
        Ok(offset)
    }

    /// Before a reader is pinned to the version `ino` (of kind `kind`, nothing staged) is known by: when that version
    /// is not vouched for (`fresh`), typically after a rename here whose copy gave the object a new ETag (Azure, GCS,
    /// S3 multipart), learn the version in the store. Gone: nothing changes; a read that needs the store reports it.
    async fn learn_version_if_stale(&self, ino: u64, kind: FileKind) -> Result<()> {
        let stale = {
            let table = lock(&self.table);
            table
                .get(ino)
                .filter(|n| n.kind == kind && n.write.is_none() && n.remote.is_some() && !self.fresh(n))
                .and_then(|_| table.path_of(ino))
        };
        let Some(path) = stale else { return Ok(()) };
        match self.backend.head(&key(&path)?).await {
            Ok((info, meta)) => {
                let format = self.format_of(&path, &meta).await;
                if let Some(n) = lock(&self.table).get_mut(ino) {
                    self.apply_remote(n, &info, &meta, format);
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(Error::store(&path, e)),
        }
    }

    pub async fn open(&self, ino: u64, mode: OpenMode) -> Result<u64> {
        let _op = self.enter(&[ino]).await;
        self.open_in(ino, mode).await
    }

    async fn open_in(&self, ino: u64, mode: OpenMode) -> Result<u64> {
        if mode.write {
            self.check_writable()?;
        }
        // The kernel may open a name it did not look up again (its entry is still cached), after a rename here whose
        // copy gave the object a new ETag.
        self.learn_version_if_stale(ino, FileKind::File).await?;
        // Count the handle before any await: a concurrent release of another handle must not see the inode as
        // unused and drop the write state this open is about to use.
        let remote = {
            let mut table = lock(&self.table);
            let node = table.get_mut(ino).ok_or(Error::NotFound)?;
            match node.kind {
                FileKind::Dir => return Err(Error::IsDir),
                FileKind::Symlink => return Err(Error::InvalidArgument("cannot open a symbolic link")),
                // The kernel opens fifos, devices and sockets itself; a request here would be a kernel surprise.
                FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice | FileKind::Socket => {
                    return Err(Error::InvalidArgument("special files are opened by the kernel"))
                }
                FileKind::File => {}
            }
            node.open_handles += 1;
            node.remote.clone().map(|r| (r, node.format))
        };
        let result = async {
            let path = self.path_of(ino)?;
            let truncate = mode.write && mode.truncate;
            // With O_TRUNC the stored content is never read through this handle, so a reader (which fails for an
            // object not in our format) is neither needed nor allowed to abort the open after truncation.
            let reader = match remote {
                Some((r, format)) if !truncate => {
                    let reader = self.reader(path, r.etag, r.stored_size, format, self.config.max_readahead)?;
                    reader.check_at_open().await?;
                    Some(reader)
                }
                _ => None,
            };
            if truncate {
                self.truncate_staged(ino).await?;
            }
            Ok(reader)
        }
        .await;
        let reader = match result {
            Ok(r) => r,
            Err(e) => {
                let mut table = lock(&self.table);
                if let Some(n) = table.get_mut(ino) {
                    n.open_handles = n.open_handles.saturating_sub(1);
                }
                return Err(e);
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Handle::File { ino, reader, append: mode.append, writable: mode.write });
        Ok(fh)
    }

    /// O_TRUNC: the file's content is replaced by nothing, without downloading it.
    async fn truncate_staged(&self, ino: u64) -> Result<()> {
        let path = self.path_of(ino)?;
        // The content is replaced without being read, so the version replaced is the one this mount knows — unless
        // what it knows is not fresh (a rename's copy, say, may carry a new ETag): then ask, or the upload would
        // take this mount's own older view for another writer's change.
        let stale = lock(&self.table).get(ino).is_some_and(|n| n.write.is_none() && n.remote.is_some() && !self.fresh(n));
        if stale {
            match self.backend.head(&key(&path)?).await {
                Ok((info, meta)) => {
                    let format = self.format_of(&path, &meta).await;
                    if let Some(n) = lock(&self.table).get_mut(ino) {
                        self.apply_remote(n, &info, &meta, format);
                    }
                }
                Err(e) if e.is_not_found() => {
                    if let Some(n) = lock(&self.table).get_mut(ino) {
                        n.remote = None; // gone meanwhile: the upload creates it
                    }
                }
                Err(e) => return Err(Error::store(&path, e)),
            }
        }
        let ws = {
            let mut table = lock(&self.table);
            let node = table.get_mut(ino).ok_or(Error::NotFound)?;
            match &node.write {
                Some(ws) => ws.clone(),
                None => {
                    let base = match &node.remote {
                        Some(r) if !r.etag.is_empty() => BaseVersion::Etag(r.etag.clone()),
                        Some(_) => BaseVersion::Any,
                        None => BaseVersion::Absent,
                    };
                    let staged = Staged::create(&self.journal, true, false, base).map_err(|e| Error::staging(&path, e))?;
                    let ws = Arc::new(tokio::sync::Mutex::new(staged));
                    node.write = Some(ws.clone());
                    ws
                }
            }
        };
        let mut staged = ws.lock().await;
        if !staged.loaded {
            // Opened for writing before and never loaded: replace what the store has now, as this mount knows it.
            staged.base = lock(&self.table)
                .get(ino)
                .and_then(|n| n.remote.as_ref().map(|r| r.etag.clone()))
                .filter(|e| !e.is_empty())
                .map(BaseVersion::Etag)
                .unwrap_or(BaseVersion::Any);
        }
        // As for a new file: where the server ignores conditions, the upload's HEAD goes now (one sent earlier and
        // not used is dropped: it could only be older).
        staged.precheck = precheck::Precheck::send(&self.backend, &path, |k| self.deletes.is_pending(k));
        staged.truncate(0).map_err(|e| Error::staging(&path, e))?;
        staged.loaded = true;
        staged.from_empty = true;
        if let Some(n) = lock(&self.table).get_mut(ino) {
            n.size = 0;
            n.mtime = SystemTime::now();
            n.ctime = n.mtime;
        }
        self.keep_record(ino, &mut staged, false);
        Ok(())
    }

    /// When the store was asked for the listing from which this mount knows every name of `dir`, if that knowledge
    /// is current and `name` is not among them (read together, under one lock: a listing merged meanwhile that shows
    /// the name does not lend its time to a create that did not see it). Knowledge from this mount's mkdir has no
    /// such time.
    fn names_asked_at(&self, dir: u64, name: &str) -> Option<Instant> {
        let table = lock(&self.table);
        let names = table.names(dir).filter(|n| Instant::now() < n.until)?;
        if table.child(dir, name).is_some() {
            return None;
        }
        names.asked
    }

    /// Creates in a directory whose names this mount knows send no HEAD ahead of their upload while that knowledge
    /// is fresher than [`crate::store::PRECHECK_TRUSTED`] (`fs::precheck`). Once it is older (but still current), a
    /// directory of at most [`RENEW_FOR_CREATES_PAGES`] listing pages whose knowledge is in use is listed again now:
    /// a request or two standing for the HEADs of the next 0.5 s of creates. Only where the store checks write
    /// conditions with a HEAD.
    async fn renew_names_for_creates(&self, dir: u64) {
        if !self.backend.conditions_checked_by_head() || self.store_recently_silent() {
            return;
        }
        let worth = {
            let table = lock(&self.table);
            let now = Instant::now();
            table.names(dir).is_some_and(|n| {
                now < n.until
                    && n.asked.is_none_or(|a| now.duration_since(a) >= crate::store::PRECHECK_TRUSTED)
                    && n.listing_cost() <= RENEW_FOR_CREATES_PAGES
                    && n.saved >= n.listing_cost()
            })
        };
        if !worth {
            return;
        }
        // Not while deletes under the directory wait to be sent: the listing would wait for them (it settles them
        // first), where the create needs only its own name's.
        let Ok(path) = self.path_of(dir) else { return };
        let prefix = dir_prefix(&path);
        if self.deletes.pending_under(&prefix) {
            return;
        }
        let Some(_relisting) = Relisting::start(&self.relisting, dir) else { return };
        // A create that answered from memory before must not wait on a store that does not answer: past
        // RENEW_FOR_CREATES_WAIT the listing is dropped (nothing is merged before it has come whole), the store is
        // taken as silent (creates then skip this for SILENT_STORE_GRACE), and the create asks with a HEAD ahead.
        match tokio::time::timeout(RENEW_FOR_CREATES_WAIT, self.list_dir(dir, false)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(dir, error = %e, "listing the directory again for its creates failed"),
            Err(_) => {
                let detail = "a listing of the directory, for its creates".to_string();
                let e = StoreError::TimedOut { key: prefix.clone(), after: RENEW_FOR_CREATES_WAIT, detail };
                self.note_silent_store(&prefix, &e);
            }
        }
    }

    pub async fn create(&self, parent: u64, name: &OsStr, mode: u32, flags: i32, caller: Caller) -> Result<(Attr, u64)> {
        let _op = self.enter(&[parent]).await;
        self.create_in(parent, name, mode, flags, caller).await
    }

    async fn create_in(&self, parent: u64, name: &OsStr, mode: u32, flags: i32, caller: Caller) -> Result<(Attr, u64)> {
        self.check_writable()?;
        let name = check_name(name)?;
        let path = self.child_path(parent, &name)?;
        self.renew_names_for_creates(parent).await;
        let mut attempts = 1;
        loop {
            match self.resolve_for_create(parent, &name).await {
                Ok(ino) => {
                    if flags & libc::O_EXCL != 0 {
                        return Err(Error::Exists);
                    }
                    // Opened by create() after all (a racing creator): behave as open. A node nobody held yet may be
                    // trimmed before the open holds it (see `resolve_then`): then the name is resolved again.
                    let fh = match self.open_in(ino, OpenMode::from_flags(flags)).await {
                        Err(Error::NotFound) if attempts < RESOLVE_ATTEMPTS && lock(&self.table).get(ino).is_none() => {
                            attempts += 1;
                            continue;
                        }
                        opened => opened?,
                    };
                    let mut table = lock(&self.table);
                    let node = table.get_mut(ino).ok_or(Error::NotFound)?;
                    node.lookups += 1;
                    return Ok((table.attr(ino).ok_or(Error::NotFound)?, fh));
                }
                Err(Error::NotFound) => break,
                Err(e) => return Err(e),
            }
        }
        // Refused now, not at the upload of close(), which shells ignore.
        self.check_path_len(&path, false)?;
        // Known from the directory's names when they are fresh enough; else sent before the journal's work, so the
        // answer is usually in when the file is closed.
        let known = self.names_asked_at(parent, &name).and_then(|asked| {
            precheck::Precheck::known_absent(&self.backend, &path, asked, |k| self.deletes.is_pending(k))
        });
        let precheck = known.or_else(|| precheck::Precheck::send(&self.backend, &path, |k| self.deletes.is_pending(k)));
        let mut staged =
            Staged::create(&self.journal, true, true, BaseVersion::Absent).map_err(|e| Error::staging(&name, e))?;
        staged.precheck = precheck;
        let mut node = self.blank_node(parent, &name, FileKind::File);
        node.perm = (mode & 0o7777) as u16;
        node.uid = caller.uid;
        node.gid = self.group_for(parent, caller).0;
        node.validated = Some(Instant::now());
        node.lookups = 1;
        node.open_handles = 1;
        let ws = Arc::new(tokio::sync::Mutex::new(staged));
        node.write = Some(ws.clone());
        let mode = OpenMode::from_flags(flags);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let attr = {
            let mut table = lock(&self.table);
            let ino = table.insert(node);
            self.touch_dir(&mut table, parent);
            table.attr(ino).ok_or(Error::NotFound)?
        };
        self.keep_record(attr.ino, &mut *ws.lock().await, false);
        lock(&self.handles).insert(
            fh,
            Handle::File { ino: attr.ino, reader: None, append: mode.append, writable: true },
        );
        Ok((attr, fh))
    }

    /// Whether some handle has `ino` open, for reading or writing.
    fn is_open(&self, ino: u64) -> bool {
        lock(&self.handles).values().any(|h| matches!(h, Handle::File { ino: i, .. } if *i == ino))
    }

    fn file_handle(&self, fh: u64) -> Result<(u64, Option<Arc<Reader>>, bool, bool)> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::File { ino, reader, append, writable }) => Ok((*ino, reader.clone(), *append, *writable)),
            _ => Err(Error::BadHandle),
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (ino, _, _, _) = self.file_handle(fh)?;
        let ws = lock(&self.table).get(ino).and_then(|n| n.write.clone());
        if let Some(ws) = ws {
            let mut staged = ws.lock().await;
            if staged.loaded {
                let key = self.path_of(ino).unwrap_or_default();
                if staged.sparse.is_some() {
                    return self.read_sparse(&key, &mut staged, offset, size as usize).await;
                }
                return staged.read_at(offset, size as usize).map_err(|e| Error::staging(key, e));
            }
        }
        // The handle's reader is taken only now: an upload of this file that finished while this read waited for the
        // staged copy has pointed the handle at the version it stored (`refresh_readers`).
        let Some(reader) = self.file_handle(fh)?.1 else { return Ok(Vec::new()) };
        let retargets = self.retargets.load(Ordering::Acquire);
        match reader.read(offset, size as usize).await {
            // This mount may still have replaced the object between the two (another handle's writes, uploaded while
            // this GET was on its way): the handle then names the new version, which is read instead. A change by
            // another writer leaves the handle where it was and stays an error.
            Err(e @ Error::Changed { .. }) => match self.file_handle(fh)?.1 {
                Some(now) if now.etag() != reader.etag() => now.read(offset, size as usize).await,
                _ => Err(e),
            },
            // A rename of the file, or of a directory above it, may have moved the object away while this read asked
            // for it: once no move covers the file, if a move pointed descriptors at new keys meanwhile, read again.
            Err(e) if matches!(&e, Error::NotFound | Error::Store { source: StoreError::NotFound { .. }, .. }) => {
                self.gate.settled(ino, || lock(&self.table)).await;
                match self.file_handle(fh)?.1 {
                    Some(now) if self.retargets.load(Ordering::Acquire) != retargets => {
                        now.read(offset, size as usize).await
                    }
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let (ino, _, _, _) = self.file_handle(fh)?;
        let _op = self.enter(&[ino]).await;
        self.write_in(fh, offset, data).await
    }

    async fn write_in(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let (ino, _, append, writable) = self.file_handle(fh)?;
        if !writable {
            return Err(Error::BadHandle);
        }
        let mut staged = self.stage(ino).await?;
        // Read under the lock: a rename of the file (which holds it) may have ended while this write waited.
        let path = self.path_of(ino).unwrap_or_default();
        let offset = if append { staged.size } else { offset };
        let end = offset.saturating_add(data.len() as u64);
        self.check_file_size(&path, end)?;
        self.sparse_before_write(&path, &mut staged, offset, end).await?;
        let written = match staged.write_at(offset, data) {
            // The disk under the journal is full: the scratch, which shares it and only saves reads, gives its room
            // back, and the write is tried once more (it writes the same bytes at the same place).
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && self.scratch_gave_room() => {
                staged.write_at(offset, data)
            }
            other => other,
        };
        written.map_err(|e| Error::staging(&path, e))?;
        self.sparse_after_write(&path, &mut staged, offset, end).await?;
        if let Some(n) = lock(&self.table).get_mut(ino) {
            n.size = staged.size;
            n.mtime = SystemTime::now();
            n.ctime = n.mtime;
        }
        // After the attributes, so a first record carries this write's mtime.
        self.keep_record(ino, &mut staged, false);
        self.stream_ahead(ino, &mut staged, &path).await?;
        Ok(data.len() as u32)
    }

    /// Uploads what a file written front to back already holds while it is being written (`upload::stream`): starts
    /// its multipart upload once it is large enough, then sends each part as soon as it is complete. Never fails the
    /// write: a stream that cannot go on is abandoned, and close() uploads the file whole as it always could —
    /// unless the journal's disk ran low and the staged copy of what the store took is gone (see
    /// [`Staged::trim_if`]): then the file is lost and the write fails with EIO.
    async fn stream_ahead(&self, ino: u64, staged: &mut Staged, path: &str) -> Result<()> {
        if staged.stream.is_none() {
            if !staged.from_empty
                || !staged.loaded
                || !staged.dirty
                || staged.size < crate::upload::stream::STREAM_FROM
            {
                return Ok(());
            }
            let meta = {
                let table = lock(&self.table);
                match table.get(ino) {
                    Some(n) if !n.unlinked && table.path_of(ino).as_deref() == Some(path) => Self::meta_of(n),
                    _ => return Ok(()),
                }
            };
            let stamp = (UPLOAD_META, staged.upload_id.clone());
            let expect = expect_of(&staged.base);
            match crate::upload::stream::Stream::start(&*self.backend, &self.codec, path, meta, stamp, expect).await {
                Ok(Some(stream)) => {
                    // The record names the upload now, before any part is sent, so a start after a kill aborts it.
                    let named = stream.upload_id().is_some();
                    staged.stream = Some(stream);
                    if named {
                        staged.record_stale = true;
                        self.keep_record(ino, staged, false);
                    }
                }
                Ok(None) => {
                    staged.from_empty = false;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(key = %path, error = %crate::error_text::error_chain(&e), "could not start a streaming upload; the file is uploaded at close");
                    staged.from_empty = false;
                    return Ok(());
                }
            }
        }
        let Some(stream) = staged.stream.as_mut() else { return Ok(()) };
        if staged.trimmed == 0 && (stream.path() != path || stream.stamp() != staged.upload_id) {
            staged.stop_streaming();
            return Ok(());
        }
        let src = crate::upload::StagedSource { file: &staged.file, size: staged.size };
        match stream.advance(&src, staged.size).await {
            Ok(()) => {
                staged.trim_if(|| self.journal_low_on_space());
                Ok(())
            }
            Err(e) if staged.trimmed > 0 => Err(self.lose_stream(staged, path, e)),
            Err(e) => {
                tracing::info!(key = %path, error = %crate::error_text::error_chain(&e), "a streaming upload failed; the file is uploaded whole at close");
                staged.stop_streaming();
                Ok(())
            }
        }
    }

    /// Uploads a file's staged content if it changed; returns once the store has it.
    pub async fn flush_node(&self, ino: u64) -> Result<()> {
        let Some(ws) = lock(&self.table).get(ino).and_then(|n| n.write.clone()) else { return Ok(()) };
        let mut staged = ws.lock().await;
        self.flush_locked(ino, &mut staged).await
    }

    /// The upload itself, with the file's write state already locked by the caller. The path and the unlinked flag
    /// are read under that lock, so a rename or unlink (which take the same lock) is entirely before or after it.
    async fn flush_locked(&self, ino: u64, staged: &mut Staged) -> Result<()> {
        if staged.lost {
            let path = self.path_of(ino).unwrap_or_default();
            return Err(Error::staging(path, std::io::Error::other("the file's content was lost (see the log)")));
        }
        if !staged.dirty || !staged.loaded {
            // Nothing changed here, or only opened for writing and never written: the store's copy is current.
            return Ok(());
        }
        let (path, meta, unlinked) = {
            let table = lock(&self.table);
            let n = table.get(ino).ok_or(Error::NotFound)?;
            (table.path_of(ino), Self::meta_of(n), n.unlinked)
        };
        if unlinked {
            staged.mark_clean(); // deleted while open: POSIX says the data goes with it
            return Ok(());
        }
        let path = path.ok_or(Error::NotFound)?;
        let mut meta = meta;
        // The record must name the stamp this upload carries before it is sent (a stale one after a change).
        self.keep_record(ino, staged, false);
        meta.extra.insert(UPLOAD_META.to_string(), staged.upload_id.clone());
        // A sparse staged file is changed in place where it can be; else it is filled in and uploaded whole.
        let mut in_place = None;
        // An earlier update of this content whose answer was lost may have become the base since: one more try.
        let mut may_rebase = true;
        while staged.sparse.is_some() {
            staged.note_attempt();
            let failed = match self.flush_sparse(&path, staged, &meta).await {
                Ok(Some(info)) => {
                    in_place = Some(info);
                    break;
                }
                Ok(None) => match self.unsparse(&path, staged).await {
                    Ok(()) => {
                        self.keep_record(ino, staged, false);
                        break;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            match self.sparse_failed(ino, staged, &path, failed, may_rebase).await? {
                Some(info) => {
                    in_place = Some(info);
                    break;
                }
                None => {
                    may_rebase = false;
                    self.keep_record(ino, staged, false);
                }
            }
        }
        let mut expect = expect_of(&staged.base);
        // A streaming upload of this content finishes here if it still can (same path, stamp and expectation, and
        // nothing it sealed changed since); otherwise it is abandoned and the file goes whole. (A sparse staged file
        // never streams: it did not start empty.)
        let mut stream = staged.stream.take();
        let mut precheck = staged.precheck.take();
        if let Some(s) = &stream {
            staged.stream_ended(s);
        }
        let mut streamed = None;
        let info = if let Some(info) = in_place { info } else { loop {
            staged.note_attempt();
            let src = crate::upload::StagedSource { file: &staged.file, size: staged.size };
            let result = match stream.take() {
                Some(s)
                    if s.path() == path
                        && s.stamp() == staged.upload_id
                        && *s.expect() == expect
                        && staged.size > s.sealed() =>
                {
                    streamed = Some(s.attrs_changed);
                    s.finish(&self.codec, &src, staged.size).await
                }
                other => {
                    drop(other); // abandons it
                    streamed = None;
                    if staged.trimmed > 0 {
                        let e = Error::staging(&path, std::io::Error::other("the stream could not be completed"));
                        return Err(self.lose_stream(staged, &path, e));
                    }
                    // Where the server ignores conditions, the HEAD sent ahead may stand for the upload's own.
                    let answer = match precheck.take() {
                        Some(p) => p.answer(&path).await,
                        None => None,
                    };
                    let upload = crate::upload::upload(
                        &*self.backend,
                        &self.codec,
                        &path,
                        &src,
                        staged.size,
                        meta.clone(),
                        &expect,
                        Some(&self.s3ec),
                    );
                    crate::store::with_prechecked(answer, upload).await
                }
            };
            match result {
                Ok(info) => break info,
                Err(e) if staged.trimmed > 0 => return Err(self.lose_stream(staged, &path, e)),
                Err(e) if is_lost_race(&e, &expect) => {
                    // An earlier attempt that timed out may have landed after all: that version is ours to replace.
                    match self.own_version(&path, |stamp| staged.is_own_stamp(stamp)).await {
                        Some(etag) if expect != Expect::Etag(etag.clone()) => {
                            tracing::info!(key = %path, "an upload that timed out earlier had reached the store; replacing it");
                            expect = Expect::Etag(etag);
                        }
                        _ => return Err(self.save_conflict(ino, staged, &path, meta).await),
                    }
                }
                Err(e) => return Err(e),
            }
        } };
        let info = match streamed {
            Some(attrs_changed) => self.after_stream(ino, staged, &path, info, meta, attrs_changed).await?,
            None => info,
        };
        staged.mark_uploaded(info.etag.clone());
        if staged.sparse.take().is_some() {
            // Changed in place: the staged file holds only some chunks of the version just stored, so the next
            // write stages again from that version (a later fsync must not patch the old base).
            staged.loaded = false;
        } else if streamed.is_none()
            && self.backend.copies_parts()
            && self.sparse_base(&info, self.codec.written_format()).is_some()
        {
            // Uploaded whole, and large enough to be changed in place from now on: the next write stages sparsely
            // from the version just stored too. Kept loaded, every later fsync or close of this open file sent the
            // whole file again: once a file open for long (a database, a log synced as it grows) had been
            // rewritten whole (its version map full, most of it changed, or a new file that grew large), each
            // later sync of a few bytes moved all of it. Not after a stream: its `info` comes from a HEAD after the
            // completion, which could show another writer's version, and the staged copy is the one sure copy of ours.
            staged.loaded = false;
        }
        self.cache.invalidate_key(&path);
        let (had_instruction_file, parent) = {
            let mut table = lock(&self.table);
            match table.get_mut(ino) {
                Some(n) => {
                    let had = n.format == StoredFormat::S3ec { instruction_file: true };
                    n.remote = Some(Remote { etag: info.etag.clone().unwrap_or_default(), stored_size: info.size });
                    // Written in the mount's format, whatever it was read in (an S3EC object is rewritten too).
                    n.format = self.codec.written_format();
                    n.validated = Some(Instant::now());
                    n.seen = Some(dirindex::Seen::Wrote(dirindex::now_secs()));
                    (had, Some(n.parent))
                }
                None => (false, None),
            }
        };
        if let Some(dir) = parent {
            self.index_touch(dir);
        }
        if had_instruction_file {
            // The new object carries its whole envelope in its metadata: the old instruction file describes nothing
            // now, and beside an object in the own format it would show up as a file of its own.
            let instruction = instruction_file_key(&path);
            if let Err(e) = match key(&instruction) {
                Ok(k) => self.backend.delete(&k).await,
                Err(_) => Ok(()),
            } {
                tracing::warn!(key = %path, instruction, error = %crate::error_text::error_chain(&e), "the file was rewritten, but its old S3EC instruction file could not be deleted");
            }
        }
        self.refresh_readers(ino, &path, &info);
        Ok(())
    }

    /// The stream of a file whose staged copy was trimmed failed (`e`): the content is gone. Logged as an error;
    /// the open file fails every further operation (see [`Staged::lose`]).
    fn lose_stream(&self, staged: &mut Staged, path: &str, e: Error) -> Error {
        tracing::error!(key = %path, error = %crate::error_text::error_chain(&e), "the upload of a file streamed without a local copy (the disk under the write journal was low) failed: what was written to it since it was opened is lost");
        staged.lose();
        Error::staging(path, std::io::Error::other("upload failed with no staged copy left"))
    }

    /// A streamed upload has completed: its metadata was fixed when it started, without `mtime`. When attributes
    /// were set explicitly since (chmod, chown, utimens on the open file), the metadata is replaced, conditional on
    /// the version just written; either way the attributes are read back, so this mount shows the mtime the store
    /// gives (the completion) as every other reader will. Returns the object as it is now.
    async fn after_stream(
        &self,
        ino: u64,
        staged: &mut Staged,
        path: &str,
        info: ObjectInfo,
        meta: UserMeta,
        attrs_changed: bool,
    ) -> Result<ObjectInfo> {
        let k = key(path)?;
        if attrs_changed {
            let etag = info.etag.clone().unwrap_or_default();
            let (_, mut stored) = self.backend.head(&k).await.map_err(|e| Error::store(path, e))?;
            stored.mode = meta.mode;
            stored.uid = meta.uid;
            stored.gid = meta.gid;
            stored.mtime = meta.mtime;
            if let Err(e) = self.backend.update_meta_if(&k, &stored, &etag).await {
                // The content is in the store; its attributes are not: the next flush sends the file again.
                tracing::warn!(key = %path, error = %crate::error_text::error_chain(&e), "a streamed file's attributes could not be set; it is uploaded again");
                staged.mark_uploaded(info.etag.clone());
                staged.mark_dirty();
                self.keep_record(ino, staged, true);
                return Err(Error::store(path, e));
            }
        }
        let (now, stored) = self.backend.head(&k).await.map_err(|e| Error::store(path, e))?;
        if let Some(n) = lock(&self.table).get_mut(ino) {
            let format = self.codec.written_format();
            self.apply_remote_even_if_staged(n, &now, &stored, format);
        }
        Ok(now)
    }

    /// Points every open handle of `ino` at the version just uploaded, so readers on this mount see their own
    /// mount's writes (a reader otherwise refuses a version other than the one it opened).
    fn refresh_readers(&self, ino: u64, path: &str, info: &ObjectInfo) {
        let mut handles = lock(&self.handles);
        for h in handles.values_mut() {
            if let Handle::File { ino: i, reader, .. } = h {
                if *i == ino {
                    if let Some(old) = reader.take() {
                        old.close();
                    }
                    *reader = self
                        .reader(
                            path.to_string(),
                            info.etag.clone().unwrap_or_default(),
                            info.size,
                            self.codec.written_format(),
                            self.config.max_readahead,
                        )
                        .ok();
                }
            }
        }
    }

    /// Another writer replaced the object after this mount staged it (the conditional upload was refused): the staged
    /// content goes beside it as `PATH.s3cryptfs-conflict-TIME` instead, the caller gets [`Error::Conflict`] (EIO), and
    /// the file's next write starts from the version now in the store. Nothing is overwritten and nothing is lost.
    async fn save_conflict(&self, ino: u64, staged: &mut Staged, path: &str, meta: UserMeta) -> Error {
        let (secs, _) = to_secs_nanos(SystemTime::now());
        let src = crate::upload::StagedSource { file: &staged.file, size: staged.size };
        let mut copy = format!("{path}.s3cryptfs-conflict-{secs}");
        let mut result = Err(Error::NotFound);
        for attempt in 0..10 {
            if attempt > 0 {
                copy = format!("{path}.s3cryptfs-conflict-{secs}-{attempt}");
            }
            result = crate::upload::upload(
                &*self.backend,
                &self.codec,
                &copy,
                &src,
                staged.size,
                meta.clone(),
                &Expect::Absent,
                Some(&self.s3ec),
            )
            .await;
            match &result {
                Err(e) if is_lost_race(e, &Expect::Absent) => continue,
                _ => break,
            }
        }
        match result {
            Ok(_) => {
                tracing::warn!(key = %path, copy = %copy, "the object was replaced by another writer since this mount staged it; this mount's version was saved beside it instead of overwriting it");
                staged.mark_clean();
                // The next write loads the version in the store now.
                staged.loaded = false;
                let mut table = lock(&self.table);
                let parent = table.get(ino).map(|n| n.parent);
                if let Some(n) = table.get_mut(ino) {
                    n.validated = None;
                }
                // The copy is a name in the directory the table does not hold.
                if let Some(parent) = parent {
                    table.forget_names(parent);
                }
                Error::Conflict { key: path.to_string(), copy }
            }
            // Could not save the copy either: the data stays staged (dirty, recorded) for a later close or start.
            Err(e) => e,
        }
    }

    /// Locks the write state of every given inode that has one, in inode order (so two renames cannot deadlock).
    async fn lock_states(&self, mut inos: Vec<u64>) -> Vec<(u64, OwnedMutexGuard<Staged>)> {
        inos.sort_unstable();
        inos.dedup();
        let states: Vec<(u64, Arc<WriteState>)> = {
            let table = lock(&self.table);
            inos.iter().filter_map(|i| table.get(*i).and_then(|n| n.write.clone()).map(|w| (*i, w))).collect()
        };
        let mut guards = Vec::with_capacity(states.len());
        for (ino, ws) in states {
            guards.push((ino, ws.lock_owned().await));
        }
        guards
    }

    /// Gives each file open for writing at `ino` (a file) or under it (a directory) that has no write state yet an
    /// empty, unloaded one, as its first write would, so that a rename's [`Fs::lock_states`] holds it too. Without
    /// it, a write arriving during the move staged and uploaded the file under its old name; landing between the
    /// move's copy and its delete, the upload was deleted with the old name and the new name kept the old content.
    /// (A descriptor opened for writing after this, or a file created under a directory being moved, is not held:
    /// docs/SEMANTICS.md, "Rename".)
    fn hold_open_writers(&self, ino: u64, kind: FileKind) -> Result<()> {
        let writers: std::collections::HashSet<u64> = lock(&self.handles)
            .values()
            .filter_map(|h| match h {
                Handle::File { ino, writable: true, .. } => Some(*ino),
                _ => None,
            })
            .collect();
        if writers.is_empty() {
            return Ok(());
        }
        let mut table = lock(&self.table);
        let files = if kind == FileKind::Dir { files_under(&table, ino) } else { vec![ino] };
        for f in files.into_iter().filter(|f| writers.contains(f)) {
            let Some(node) = table.get_mut(f) else { continue };
            if node.kind != FileKind::File || node.write.is_some() {
                continue;
            }
            let staged = Staged::create(&self.journal, node.remote.is_none(), false, BaseVersion::Absent)
                .map_err(|e| Error::staging(node.name.as_str(), e))?;
            node.write = Some(Arc::new(tokio::sync::Mutex::new(staged)));
        }
        Ok(())
    }

    /// Every file inode under directory `dir` that has write state.
    fn staged_under(&self, dir: u64) -> Vec<u64> {
        let table = lock(&self.table);
        files_under(&table, dir).into_iter().filter(|c| table.get(*c).is_some_and(|n| n.write.is_some())).collect()
    }

    pub async fn flush(&self, fh: u64) -> Result<()> {
        let (ino, _, _, writable) = self.file_handle(fh)?;
        if writable {
            self.flush_node(ino).await?;
        }
        Ok(())
    }

    /// Records which process opened handle `fh` (the FUSE adapter calls this after open and create).
    pub fn note_opener(&self, fh: u64, pid: u32) {
        lock(&self.openers).insert(fh, pid);
    }

    /// FLUSH from process `pid`. The kernel sends FLUSH for every close of every descriptor sharing the open file,
    /// including the close-on-exec copies a forked child drops when it runs another program (any `system()`,
    /// `Command::new` or shell pipeline in a multi-threaded writer). Uploading on those would send half-written
    /// files to the store in the middle of a write, so a flush from a process other than the opener is answered
    /// without uploading; the opener's own close, fsync and the final release still upload, so nothing is lost.
    pub async fn flush_by(&self, fh: u64, pid: u32) -> Result<()> {
        let opener = lock(&self.openers).get(&fh).copied();
        match opener {
            Some(o) if o != pid && pid != 0 => Ok(()),
            _ => self.flush(fh).await,
        }
    }

    pub async fn fsync(&self, fh: u64) -> Result<()> {
        let (ino, _, _, _) = self.file_handle(fh)?;
        self.flush_node(ino).await
    }

    pub async fn release(&self, fh: u64) -> Result<()> {
        lock(&self.openers).remove(&fh);
        let Some(handle) = lock(&self.handles).remove(&fh) else { return Err(Error::BadHandle) };
        let Handle::File { ino, writable, reader, .. } = handle else { return Ok(()) };
        if let Some(r) = reader {
            r.close();
        }
        // The kernel sends RELEASE after close() returned, so it can arrive after the same file was opened for
        // writing again: while another handle still writes it, that handle's close, fsync or release uploads, and
        // this late release must not publish what it is in the middle of writing (nor make its fsync find the file
        // clean and miss a conflict with another mount). Its own close (FLUSH) already uploaded what it wrote.
        let other_writer = lock(&self.handles)
            .values()
            .any(|h| matches!(h, Handle::File { ino: i, writable: true, .. } if *i == ino));
        let result = if writable && !other_writer { self.flush_node(ino).await } else { Ok(()) };
        let last = {
            let mut table = lock(&self.table);
            match table.get_mut(ino) {
                Some(n) => {
                    n.open_handles = n.open_handles.saturating_sub(1);
                    n.open_handles == 0
                }
                None => false,
            }
        };
        if last {
            let ws = lock(&self.table).get(ino).and_then(|n| n.write.clone());
            if let Some(ws) = ws {
                let staged = ws.lock().await;
                if staged.dirty {
                    tracing::error!(
                        key = %self.path_of(ino).unwrap_or_default(),
                        staged = %staged.location().display(),
                        "upload failed after the last close; the data stays staged in this file and is uploaded by the next start"
                    );
                } else {
                    drop(staged);
                    let mut table = lock(&self.table);
                    if let Some(n) = table.get_mut(ino) {
                        // Re-check under the lock: an open may have started using this state meanwhile.
                        if n.open_handles == 0 && n.write.as_ref().is_some_and(|w| Arc::ptr_eq(w, &ws)) {
                            n.write = None;
                        }
                    }
                    table.maybe_drop(ino);
                }
            } else {
                lock(&self.table).maybe_drop(ino);
            }
        }
        result
    }

    /// Uploads everything still dirty (unmount), including state whose last close failed to upload. Returns the
    /// paths that could not be uploaded; their content stays in the write journal for the next start.
    pub async fn flush_all(&self) -> Vec<(String, Error)> {
        self.deletes.settle("").await;
        let inos = lock(&self.table).with_write_state();
        let mut failed = Vec::new();
        for ino in inos {
            if let Err(e) = self.flush_node(ino).await {
                failed.push((self.path_of(ino).unwrap_or_default(), e));
            }
        }
        // Then the directory indexes those uploads and earlier changes marked.
        self.flush_indexes(true).await;
        failed
    }

    /// The mount has ended (the final uploads follow): see `Journal::stop_serving`.
    pub fn stop_serving(&self) {
        self.journal.stop_serving();
    }

    /// At a clean stop: removes this run's journal directory if nothing in it is left to upload.
    pub fn shutdown(&self) {
        self.journal.close();
    }

    /// Makes sure a dirty staged file has an up-to-date recovery record (see `journal::Record`): written when it first
    /// becomes dirty, rewritten when `refresh` says its attributes changed. The caller holds the file's write state.
    /// A record that cannot be written is logged; the write itself goes on (the data is staged either way).
    fn keep_record(&self, ino: u64, staged: &mut Staged, refresh: bool) -> bool {
        if staged.trimmed > 0 {
            return false; // no longer recoverable (see `Staged::trim_if`)
        }
        let sparse_stale = staged.sparse.as_ref().is_some_and(|s| s.record_stale);
        if !staged.dirty || !staged.loaded || (staged.recorded && !refresh && !staged.record_stale && !sparse_stale) {
            return staged.recorded;
        }
        let (path, meta, unlinked) = {
            let table = lock(&self.table);
            let Some(n) = table.get(ino) else { return false };
            (table.path_of(ino), Self::meta_of(n), n.unlinked)
        };
        let (Some(path), false) = (path, unlinked) else { return false };
        let record = crate::journal::Record {
            path: path.clone(),
            mode: meta.mode.unwrap_or(0o100644),
            uid: meta.uid.unwrap_or(0),
            gid: meta.gid.unwrap_or(0),
            mtime: meta.mtime.unwrap_or((0, 0)),
            // A sparse file is a patch of its base: the record says which chunks it holds.
            base: match &staged.sparse {
                Some(s) => BaseVersion::Patch(s.to_patch()),
                None => staged.base.clone(),
            },
            upload_id: staged.upload_id.clone(),
            prior_ids: staged.prior_ids.clone(),
            file_id: staged.file_id.clone(),
            written_at: to_secs_nanos(SystemTime::now()),
            // The stream's own key: after a rename the upload is still where it started.
            multipart: staged.stream.as_ref().and_then(|s| {
                s.upload_id().map(|id| crate::journal::OpenUpload { key: s.path().to_string(), id: id.to_string() })
            }),
        };
        match self.journal.save_record(staged.n, &record) {
            Ok(()) => {
                staged.recorded = true;
                staged.record_stale = false;
                if let Some(s) = &mut staged.sparse {
                    s.record_stale = false;
                }
            }
            Err(e) => tracing::error!(key = %path, error = %e, "could not write the recovery record for staged data"),
        }
        staged.recorded
    }

    /// Refreshes the recovery record of every staged file that still has to be uploaded, with its attributes as they
    /// are now, before the final uploads of a shutdown. Returns the number of records.
    pub async fn record_pending(&self) -> usize {
        let inos = lock(&self.table).with_write_state();
        let mut written = 0;
        for ino in inos {
            let Some(ws) = lock(&self.table).get(ino).and_then(|n| n.write.clone()) else { continue };
            let mut staged = ws.lock().await;
            if self.keep_record(ino, &mut staged, true) {
                written += 1;
            }
        }
        written
    }

    /// Uploads what dead runs of this store left in the journal (see `crate::journal`). Each upload is conditional
    /// on the version the record says the content replaces; if the object changed since, the data goes to
    /// `PATH.s3cryptfs-recovered-TIME` beside it instead. An upload that already happened before the crash (the
    /// object carries the record's upload stamp) is not repeated, so a kill during recovery loses and duplicates
    /// nothing. Returns (recovered, failed); every file is logged by path.
    pub async fn recover(&self) -> (usize, usize) {
        let (mut ok, mut failed) = (0, 0);
        let staged = self.journal.take_over().await;
        // Deletes first: an unlink a dead run acknowledged and may not have sent (see `fs::deletes`).
        for left in self.journal.take_deletes() {
            self.recover_delete(left).await;
        }
        for left in staged {
            match self.recover_one(&left).await {
                Ok(target) => {
                    ok += 1;
                    if target != left.record.path {
                        tracing::warn!(key = %left.record.path, saved_as = %target, "data a previous run left staged was saved beside the object: the object changed in the store after it was staged");
                    } else {
                        tracing::warn!(key = %target, "uploaded data a previous run left staged");
                    }
                    left.done();
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!(key = %left.record.path, staged = %left.location().display(), error = %e, "could not upload data a previous run left staged; it stays for the next start");
                }
            }
        }
        (ok, failed)
    }

    /// Sends the delete of a file a dead run unlinked, while the object is still the version unlinked
    /// (`deletes::delete_if_still`). A store that does not answer keeps the intent for the next start.
    async fn recover_delete(&self, left: crate::journal::LeftoverDelete) {
        let path = left.intent.path.clone();
        let Ok(k) = key(&path) else { return left.done() };
        match deletes::delete_if_still(&*self.backend, &k, &left.intent.etag).await {
            Ok(resent) => {
                match resent {
                    deletes::Resent::Deleted => {
                        tracing::warn!(key = %path, "deleted a file a previous run unlinked and had not deleted yet")
                    }
                    deletes::Resent::Replaced => tracing::warn!(
                        key = %path,
                        "a previous run's unlink was not sent, and the object was replaced since: kept"
                    ),
                    deletes::Resent::Gone => {}
                }
                self.cache.invalidate_key(&path);
                left.done();
            }
            Err(e) => tracing::error!(key = %path, error = %crate::error_text::error_chain(&e), "could not send the delete of a file a previous run unlinked; kept for the next start"),
        }
    }

    async fn recover_one(&self, left: &crate::journal::Leftover) -> Result<String> {
        let record = &left.record;
        if let Some(open) = &record.multipart {
            self.abort_left_open(open).await;
        }
        let size = left.file.plain_len().map_err(|e| Error::staging(&record.path, e))?;
        // The staged content is the authority, and for mtime too when it was written after the record.
        let staged_time = left.file.file().metadata().and_then(|m| m.modified()).ok();
        let mtime = match (staged_time, left.record_mtime) {
            (Some(st), Some(rt)) if st > rt => to_secs_nanos(st),
            _ => record.mtime,
        };
        let mut meta = UserMeta {
            mode: Some(record.mode),
            uid: Some(record.uid),
            gid: Some(record.gid),
            mtime: Some(mtime),
            extra: BTreeMap::new(),
        };
        meta.extra.insert(UPLOAD_META.to_string(), record.upload_id.clone());
        if let BaseVersion::Patch(patch) = &record.base {
            return self.recover_patch(left, patch, meta).await;
        }
        let src = crate::upload::StagedSource { file: &left.file, size };
        let mut target = record.path.clone();
        let mut expect = expect_of(&record.base);
        // A name the store can never hold (a journal from before the length check, a store with a longer prefix now):
        // retried at every start it would fail forever, so it goes to lost+found under a short name, logged once.
        let unfit = if key(&record.path).is_err() {
            Some("it is not a valid object name")
        } else if self.check_path_len(&record.path, false).is_err() {
            Some("it is longer than the store's key limit")
        } else {
            None
        };
        if let Some(reason) = unfit {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(record.path.as_bytes());
            let short = crate::crypto::hex::hex(&digest[..8]);
            target = format!("{LOST_AND_FOUND}/s3cryptfs-{}-{short}", record.written_at.0);
            expect = Expect::Absent;
            tracing::error!(key = %record.path, reason, saved_as = %target, "staged data a previous run left cannot be uploaded under its name; saving it under lost+found");
        }
        for attempt in 0..10u32 {
            if self.already_uploaded(&target, &record.upload_id).await {
                return Ok(target);
            }
            match crate::upload::upload(
                &*self.backend,
                &self.codec,
                &target,
                &src,
                size,
                meta.clone(),
                &expect,
                Some(&self.s3ec),
            )
            .await
            {
                Ok(_) => return Ok(target),
                Err(e) if is_lost_race(&e, &expect) => {
                    // An older upload of this content's history that timed out but landed: ours to replace.
                    if unfit.is_some() {
                        // Another try of this very copy that landed before a crash carries our stamp (checked above);
                        // anything else there is not ours: a numbered name beside it.
                        target = format!("{LOST_AND_FOUND}/s3cryptfs-{}-{attempt}-{}", record.written_at.0, record.upload_id);
                        expect = Expect::Absent;
                        continue;
                    }
                    if target == record.path {
                        let own = |stamp: &str| record.prior_ids.iter().any(|p| p == stamp);
                        if let Some(etag) = self.own_version(&target, own).await {
                            if expect != Expect::Etag(etag.clone()) {
                                expect = Expect::Etag(etag);
                                continue;
                            }
                        }
                    }
                    let (secs, _) = record.written_at;
                    target = if attempt == 0 {
                        format!("{}.s3cryptfs-recovered-{secs}", record.path)
                    } else {
                        format!("{}.s3cryptfs-recovered-{secs}-{attempt}", record.path)
                    };
                    expect = Expect::Absent;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::store(&record.path, StoreError::Precondition { key: target }))
    }

    /// Aborts the multipart upload of a stream a dead run left open (the staged file is uploaded whole instead), so
    /// that its parts do not stay in the store, invisible and billed. Best effort: a failure is logged and the
    /// store's lifecycle rules remain the fallback; the record, while it stays, makes the next start try again.
    async fn abort_left_open(&self, open: &crate::journal::OpenUpload) {
        let result = match ObjectKey::new(open.key.as_str()) {
            Ok(k) => self.backend.abort_multipart(&k, &open.id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                tracing::info!(key = %open.key, "aborted the multipart upload a previous run left open while streaming")
            }
            Err(e) => tracing::warn!(
                key = %open.key,
                error = %crate::error_text::error_chain(&e),
                "could not abort the multipart upload a previous run left open while streaming \
                 (the store's lifecycle rules remove it)"
            ),
        }
    }

    /// The ETag of the object at `path` if its upload stamp is one `own` recognises (a version this mount wrote).
    async fn own_version(&self, path: &str, own: impl Fn(&str) -> bool) -> Option<String> {
        let k = key(path).ok()?;
        let (info, meta) = self.backend.head(&k).await.ok()?;
        let stamp = meta.extra.get(UPLOAD_META)?;
        if own(stamp) {
            info.etag
        } else {
            None
        }
    }

    /// Whether the object at `path` is the upload stamped `upload_id` (it happened before a crash).
    async fn already_uploaded(&self, path: &str, upload_id: &str) -> bool {
        let Ok(k) = key(path) else { return false };
        match self.backend.head(&k).await {
            Ok((_, meta)) => meta.extra.get(UPLOAD_META).is_some_and(|v| v == upload_id),
            Err(_) => false,
        }
    }
}

/// Where recovery saves staged data whose own name the store cannot hold.
pub const LOST_AND_FOUND: &str = "lost+found";

/// The metadata field of a device's number (`x-amz-meta-rdev`, as s3fs writes it).
pub const RDEV_META: &str = "rdev";

/// The metadata field that carries an upload's journal stamp (`journal::Record::upload_id`).
pub const UPLOAD_META: &str = "s3cryptfs-upload";

/// The store condition for replacing `base`.
fn expect_of(base: &BaseVersion) -> Expect {
    match base {
        BaseVersion::Absent => Expect::Absent,
        BaseVersion::Etag(e) => Expect::Etag(e.clone()),
        BaseVersion::Any => Expect::Any,
        BaseVersion::Patch(p) => Expect::Etag(p.etag.clone()),
    }
}

/// Whether an upload failed because the store no longer holds what it expected: a precondition failure, or (for an
/// expected version) the object being gone, which S3 reports as not found.
fn is_lost_race(e: &Error, expect: &Expect) -> bool {
    match e {
        Error::Store { source, .. } => source.is_precondition(),
        Error::NotFound => matches!(expect, Expect::Etag(_)),
        _ => false,
    }
}

/// An open-handle count held by an operation that has no handle of its own (see [`Fs::pin`]).
struct Pin<'a> {
    fs: &'a Fs,
    ino: u64,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut table = lock(&self.fs.table);
        if let Some(n) = table.get_mut(self.ino) {
            n.open_handles = n.open_handles.saturating_sub(1);
            // Last user and nothing left to upload: the staged copy is no longer needed.
            if n.open_handles == 0 {
                if let Some(ws) = &n.write {
                    if ws.try_lock().is_ok_and(|st| !st.dirty) {
                        n.write = None;
                    }
                }
            }
        }
        table.maybe_drop(self.ino);
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Fs>();
    let _ = StoreError::is_not_found;
}

/// Every node under directory `dir` (at any depth) that is not a directory.
fn files_under(table: &InodeTable, dir: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for c in table.children_of(d) {
            match table.get(c) {
                Some(n) if n.kind == FileKind::Dir => stack.push(c),
                Some(_) => out.push(c),
                None => {}
            }
        }
    }
    out
}
