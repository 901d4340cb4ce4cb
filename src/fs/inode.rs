//! The inode table: the kernel's view of names, numbers and attributes.
//!
//! Nodes link to their parent by number and hold only their own name, so an object's key is derived by walking up
//! (`path_of`), and renaming a directory is one update of one node: every descendant's key follows. The table is the
//! authority for what this mount created or changed until the store confirms it; attributes read from the store are
//! trusted for `attr_ttl` and then asked again.
//!
//! Directory link counts: `st_nlink` of a directory is 2 + its number of subdirectories (as on ext4) only while the
//! table is known to hold every subdirectory (a listing taken less than `attr_ttl` ago, or a directory this mount
//! made less than `attr_ttl` ago), and 1 otherwise. 1 is the "unknown" value of btrfs and network filesystems, which
//! gnulib's fts (find, du, chmod -R) and other tree walkers read as "do not use the link count"; a guess such as 2
//! would tell them a directory has no subdirectories and let them skip its entries. Counting needs no request: the
//! table keeps each directory's subdirectory children in a set, updated on every link and unlink, so mkdir, rmdir,
//! renames and names found by lookups keep an exact count while it is known.
//!
//! Names of a directory: while a listing of it (or this mount's mkdir of it) is less than `attr_ttl` old, the table
//! holds every name the directory has, so a lookup of a name it does not hold is answered "no such file" without
//! asking the store (see [`Names`]), and a file the listing showed unchanged exists (`Node::listed`). Whatever would
//! make the table lose a name while that holds ends it: dropping a still-linked node forgets its parent's names.
//!
//! Memory: the table keeps an estimate of what it takes ([`InodeTable::bytes`], [`NODE_BYTES`] per node plus its name
//! twice), which the filesystem reports to the daemon's memory budget (`crate::memory`), so the page cache shrinks as
//! the table grows. Past its share of the budget the table is trimmed: [`InodeTable::drop_unreferenced`] drops nodes
//! nobody refers to (a listing's entries the kernel never looked up), and [`InodeTable::forget_candidates`] names the
//! clean, closed files the kernel holds, oldest first, for the filesystem to ask the kernel to forget. Nothing dirty,
//! open or still needed for a path is ever dropped.
//!
//! Concurrency: the table lives behind one `std::sync::Mutex` held only for map operations (never across an await or
//! any I/O).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::write::WriteState;
use crate::object::StoredFormat;

pub const ROOT_INO: u64 = 1;

/// Estimated bytes one node takes beside its name (which is counted twice: in the node and in the name map): the
/// `Node` itself (about 260 bytes), its slots in the three maps that index it (with the maps' spare capacity: up to
/// half of a map is empty after it doubled), its ETag string, the allocator's overhead per allocation and the heap
/// left fragmented by the listing that made it. Measured as the daemon's RSS: 100,000 entries of 12-byte names,
/// listed and each stat-ed, took 87 MiB over the idle daemon's 10 MiB (about 890 bytes each, names included).
pub const NODE_BYTES: u64 = 870;

/// The inode number of a path: the first 8 bytes of its SHA-256 (see [`InodeTable::number_for`]).
fn path_number(path: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(path.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// What a node named `name` adds to [`InodeTable::bytes`].
fn node_bytes(name: &str) -> u64 {
    NODE_BYTES + 2 * name.len() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Special files: metadata-only objects (the type in the mode, the device number in `rdev`). The kernel serves
    /// their opens itself (a fifo's pipe, a device's driver); FUSE never sees their reads and writes.
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

impl FileKind {
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }

    /// The kind a full `st_mode` names; `None` for a type this filesystem does not store (0, or unknown bits).
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }

    /// Fifos, devices and sockets.
    pub fn is_special(self) -> bool {
        matches!(self, FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice | FileKind::Socket)
    }
}

/// Attributes the kernel sees.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub atime: SystemTime,
    pub nlink: u32,
    /// Device number of a character or block device (0 otherwise).
    pub rdev: u32,
}

/// What the store holds for a node, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub etag: String,
    pub stored_size: u64,
}

pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub atime: SystemTime,
    /// The stored version this node's attributes came from; `None` for a node this mount created and has not
    /// uploaded yet, and for directories that exist only as a prefix.
    pub remote: Option<Remote>,
    /// Whether the directory has a marker object (so its metadata is persisted).
    pub has_marker: bool,
    /// When the attributes were last confirmed from the store.
    pub validated: Option<Instant>,
    pub lookups: u64,
    pub open_handles: u32,
    /// Staged content of a file opened for writing. Shared by every handle of the inode.
    pub write: Option<Arc<WriteState>>,
    /// Symlink target once read.
    pub link_target: Option<Vec<u8>>,
    /// Removed from the namespace while still open: reads continue, nothing is uploaded.
    pub unlinked: bool,
    /// Device number of a character or block device (stored as `x-amz-meta-rdev`).
    pub rdev: u32,
    /// For a directory: until when the table holds all of its subdirectories, so `st_nlink` can count them (see the
    /// module docs). Set by a complete listing and by mkdir; `None` or past: unknown.
    pub subdirs_known_until: Option<Instant>,
    /// When a listing last showed this node's stored version unchanged since its metadata was read (the listing's
    /// start): the name existed then, with the kind the metadata said. `None` when no listing did.
    pub listed: Option<Instant>,
    /// For a file: the format of its stored object, as its metadata last said (an S3 Encryption Client object is read
    /// differently, and its file is 16 bytes shorter than the object).
    pub format: StoredFormat,
    /// For a file: which stored version its attributes describe, as a directory index entry names it (see
    /// `fs::dirindex`). `None`: not known (never read or written by this mount).
    pub seen: Option<super::dirindex::Seen>,
}

/// What the table knows about a directory's names as a whole: a listing of it, or its mkdir by this mount.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// Until when the table holds every name the directory has (`attr_ttl` after the listing was asked for).
    pub until: Instant,
    /// When the store was asked for the listing this knowledge comes from; `None` after this mount's mkdir, whose
    /// knowledge may come from older knowledge of the parent (it stands for no HEAD, see `fs::precheck`).
    pub asked: Option<Instant>,
    /// Entries the listing had (0 after a mkdir): what listing the directory again would fetch.
    pub entries: usize,
    /// Store requests this knowledge saved so far (lookups answered without asking): once it expires, listing the
    /// directory again is worth it when it saved at least what a listing costs.
    pub saved: u64,
}

impl Names {
    /// Requests a listing of the directory costs: one per page of 1,000 entries (S3's page size).
    pub fn listing_cost(&self) -> u64 {
        (self.entries as u64).div_ceil(1000).max(1)
    }
}

impl Node {
    /// The attributes, with `st_nlink` as [`InodeTable::attr`] computes it.
    pub(super) fn attr_with(&self, nlink: u32) -> Attr {
        Attr {
            ino: self.ino,
            kind: self.kind,
            size: self.size,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            ctime: self.ctime,
            atime: self.atime,
            nlink,
            rdev: self.rdev,
        }
    }

    /// The full st_mode (type bits and permissions), as stored in metadata.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | u32::from(self.perm)
    }
}

pub struct InodeTable {
    nodes: HashMap<u64, Node>,
    children: HashMap<(u64, String), u64>,
    /// The same links grouped by parent, so listing a directory's children does not scan the whole table.
    by_parent: HashMap<u64, HashSet<u64>>,
    /// The directory children among them (a subset of `by_parent`), so `st_nlink` is one lookup. Kept by inode number:
    /// an unlink removes the right entry whatever the node's kind has become since.
    subdirs: HashMap<u64, HashSet<u64>>,
    /// Directories whose names are all known (see [`Names`]), by inode number.
    names: HashMap<u64, Names>,
    next_ino: u64,
    /// Estimated memory of the nodes (see [`NODE_BYTES`]), retired ones included.
    bytes: u64,
    /// Directories whose index write is pending (see `Fs::index_touch`): a file of theirs that the kernel forgets
    /// before the write is kept in `retired` rather than lost, so the index still vouches for it. Without this, an
    /// unmount (the kernel forgets every node before the final index writes) or a memory trim would leave a
    /// just-written directory's index without the files created since its last write, each costing a HEAD on the next
    /// cold listing.
    retain_for: HashSet<u64>,
    /// Dropped nodes of those directories, by directory and name (at most [`MAX_RETIRED`] in all): what they knew of
    /// their file, for the index write only. A name that comes back, goes or moves takes its retired node with it.
    retired: HashMap<u64, HashMap<String, Node>>,
    retired_count: usize,
    /// Directories being listed: when each listing on its way began, and the names that went since the oldest began
    /// (unlinked, removed, renamed away, found gone), with when. A listing taken before a name went may still show
    /// it, and must not bring it back when it is merged (see [`InodeTable::went_while_listed`]).
    listings: HashMap<u64, Listings>,
}

/// The listings of one directory on their way, and the names that went meanwhile (see `InodeTable::listings`).
#[derive(Default)]
struct Listings {
    begun: Vec<Instant>,
    gone: HashMap<String, Instant>,
}

/// Retired nodes kept at most (see [`InodeTable::retire_children`]): past it a forgotten file costs a HEAD later.
pub const MAX_RETIRED: usize = 10_000;

/// Sets `buf` to the path of `name` in the directory at path `dir` (`""`: the root): a caller naming many children
/// of one directory reuses one buffer.
pub fn join_path(buf: &mut String, dir: &str, name: &str) {
    buf.clear();
    if !dir.is_empty() {
        buf.push_str(dir);
        buf.push('/');
    }
    buf.push_str(name);
}

impl InodeTable {
    pub fn new(mut root: Node) -> Self {
        root.ino = ROOT_INO;
        let bytes = node_bytes(&root.name);
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, root);
        InodeTable {
            nodes,
            children: HashMap::new(),
            by_parent: HashMap::new(),
            subdirs: HashMap::new(),
            names: HashMap::new(),
            next_ino: ROOT_INO + 1,
            bytes,
            retain_for: HashSet::new(),
            retired: HashMap::new(),
            retired_count: 0,
            listings: HashMap::new(),
        }
    }

    /// Files of directory `dir` forgotten from now on are retired rather than dropped whole (see `retain_for`).
    pub fn retire_children(&mut self, dir: u64) {
        self.retain_for.insert(dir);
    }

    /// `dir`'s index was written (or will not be): its retired nodes go.
    pub fn release_children(&mut self, dir: u64) {
        self.retain_for.remove(&dir);
        let Some(names) = self.retired.remove(&dir) else { return };
        for name in names.keys() {
            self.retired_count -= 1;
            self.bytes -= node_bytes(name);
        }
        // Kept for them alone, the directory's own node may go now.
        self.maybe_drop(dir);
    }

    /// The node this table held for `dir`/`name` until the kernel forgot it, while `dir`'s index write is pending.
    pub fn retired(&self, dir: u64, name: &str) -> Option<&Node> {
        self.retired.get(&dir)?.get(name)
    }

    /// The name `dir`/`name` got a new node, or went: what was retired for it describes something else now.
    fn unretire(&mut self, dir: u64, name: &str) {
        let Some(names) = self.retired.get_mut(&dir) else { return };
        if names.remove(name).is_some() {
            self.retired_count -= 1;
            self.bytes -= node_bytes(name);
            if names.is_empty() {
                self.retired.remove(&dir);
            }
        }
    }

    /// The attributes of a node as the kernel sees them.
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        self.attr_at(ino, Instant::now())
    }

    /// [`InodeTable::attr`] at time `now`.
    pub fn attr_at(&self, ino: u64, now: Instant) -> Option<Attr> {
        let node = self.nodes.get(&ino)?;
        Some(node.attr_with(self.nlink_at(node, now)))
    }

    /// `st_nlink`: 0 for a node unlinked while still open (fstat says so on any POSIX filesystem), 1 for other
    /// non-directories; for a directory 2 + its subdirectories while they are known (see the module docs), else 1.
    fn nlink_at(&self, node: &Node, now: Instant) -> u32 {
        if node.unlinked {
            return 0;
        }
        if node.kind != FileKind::Dir {
            return 1;
        }
        match node.subdirs_known_until {
            Some(until) if now < until => {
                let n = self.subdirs.get(&node.ino).map_or(0, HashSet::len);
                u32::try_from(n).unwrap_or(u32::MAX).saturating_add(2)
            }
            _ => 1,
        }
    }

    /// Records that the table now holds every subdirectory of `dir` (a complete listing was just merged into it, or
    /// this mount just made it), until `until`. The set is rebuilt from the children's current kinds, which a listing's
    /// metadata may have changed since they were linked.
    pub fn know_subdirs(&mut self, dir: u64, until: Instant) {
        let dirs: HashSet<u64> = self
            .by_parent
            .get(&dir)
            .map(|s| s.iter().copied().filter(|c| self.nodes.get(c).is_some_and(|n| n.kind == FileKind::Dir)).collect())
            .unwrap_or_default();
        if dirs.is_empty() {
            self.subdirs.remove(&dir);
        } else {
            self.subdirs.insert(dir, dirs);
        }
        if let Some(node) = self.nodes.get_mut(&dir) {
            node.subdirs_known_until = Some(until);
        }
    }

    /// Records that the table holds every name of `dir` until `until`: a listing of `entries` names, asked for at
    /// `asked`, was just merged into it (or, with 0 and `None`, this mount just made the directory).
    pub fn know_names(&mut self, dir: u64, until: Instant, entries: usize, asked: Option<Instant>) {
        if self.nodes.contains_key(&dir) {
            self.names.insert(dir, Names { until, asked, entries, saved: 0 });
        }
    }

    /// What is known about the names of `dir`, current or expired.
    pub fn names(&self, dir: u64) -> Option<Names> {
        self.names.get(&dir).copied()
    }

    /// Whether the table holds every name of `dir` at `now`.
    pub fn knows_names(&self, dir: u64, now: Instant) -> bool {
        self.names.get(&dir).is_some_and(|n| now < n.until)
    }

    /// Counts `requests` the knowledge of `dir`'s names just saved.
    pub fn note_saved(&mut self, dir: u64, requests: u64) {
        if let Some(n) = self.names.get_mut(&dir) {
            n.saved += requests;
        }
    }

    /// Forgets that the names of `dir` are all known (something this mount put in the store has no node).
    pub fn forget_names(&mut self, dir: u64) {
        self.names.remove(&dir);
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// Makes room for `additional` more nodes in one step. A listing inserts thousands at once, and growing the maps
    /// as they fill moves every node again at each doubling.
    pub fn reserve(&mut self, additional: usize) {
        self.nodes.reserve(additional);
        self.children.reserve(additional);
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&(parent, name.to_string())).copied()
    }

    /// Children of `parent` currently in the table.
    pub fn children_of(&self, parent: u64) -> Vec<u64> {
        self.by_parent.get(&parent).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Inserts a new node under `parent`/`name`, replacing (and detaching) whatever was there.
    pub fn insert(&mut self, node: Node) -> u64 {
        let path = self.child_path(node.parent, &node.name);
        self.insert_at(node, path.as_deref())
    }

    /// [`InodeTable::insert`] for a caller that has the node's path at hand (`None`: it has none, its directory is
    /// gone). A listing inserts thousands of nodes into one directory, and need not walk up to the root for each.
    pub fn insert_at(&mut self, mut node: Node, path: Option<&str>) -> u64 {
        debug_assert_eq!(path.map(str::to_string), self.child_path(node.parent, &node.name));
        let ino = self.number_for(path);
        node.ino = ino;
        let parent = node.parent;
        self.unretire(parent, &node.name);
        if let Some(old) = self.children.insert((parent, node.name.clone()), ino) {
            self.unlink_child(parent, old);
            self.detach_node(old);
        }
        self.link_child(parent, ino, node.kind);
        self.bytes += node_bytes(&node.name);
        self.nodes.insert(ino, node);
        ino
    }

    /// The inode number of a new node at `path`: derived from the path (the first 8 bytes of its SHA-256), so the
    /// same name gets the same number again after the kernel forgot the node and looked the name up anew (find, du,
    /// tar, rsync -H and git compare `st_ino`), and across remounts, with no memory per name. A number in use by
    /// another node (a hash collision, or the node a rename moved away from this path) is skipped to the next free
    /// one; 0 and the root's number are never used. Without a path (its directory is gone), a fresh number.
    fn number_for(&mut self, path: Option<&str>) -> u64 {
        let mut ino = match path {
            Some(path) => path_number(path),
            None => {
                self.next_ino += 1;
                self.next_ino
            }
        };
        while ino <= ROOT_INO || self.nodes.contains_key(&ino) {
            ino = ino.wrapping_add(1);
        }
        ino
    }

    /// The number a node for `name` in `parent` would get, without making one: what readdir reports for an entry of
    /// a listing the table has no room for (see `Fs::list_dir`). The lookup that follows gives the node the same
    /// number unless another node took it meanwhile.
    pub fn number_of(&self, parent: u64, name: &str) -> u64 {
        let mut ino = self.child_path(parent, name).map_or(ROOT_INO, |p| path_number(&p));
        while ino <= ROOT_INO || self.nodes.contains_key(&ino) {
            ino = ino.wrapping_add(1);
        }
        ino
    }

    /// Forgets that the table holds every name and every subdirectory of `dir`: a listing of it had more entries
    /// than the table had room for.
    pub fn forget_listing(&mut self, dir: u64) {
        self.names.remove(&dir);
        if let Some(node) = self.nodes.get_mut(&dir) {
            node.subdirs_known_until = None;
        }
    }

    /// A listing of `dir` begins at `at`: the names that go from then until it ends (merged, or given up) are noted
    /// ([`InodeTable::went_while_listed`]). Each call is paired with an [`InodeTable::end_listing`] of the same `at`.
    pub fn begin_listing(&mut self, dir: u64, at: Instant) {
        self.listings.entry(dir).or_default().begun.push(at);
    }

    /// The listing of `dir` begun at `at` was merged or given up. The names that went before every listing still on
    /// its way began are forgotten (all of them with the last one), so their number stays bounded by what goes
    /// while listings overlap, however long they keep overlapping.
    pub fn end_listing(&mut self, dir: u64, at: Instant) {
        let Some(l) = self.listings.get_mut(&dir) else { return };
        if let Some(i) = l.begun.iter().position(|b| *b == at) {
            l.begun.swap_remove(i);
        }
        match l.begun.iter().min() {
            None => {
                self.listings.remove(&dir);
            }
            Some(&oldest) => l.gone.retain(|_, went| *went >= oldest),
        }
    }

    /// Whether `dir`/`name` went from this table after a listing of `dir` begun at `since` was asked for: the listing
    /// may have been taken before, and its entry for the name is not to be trusted.
    pub fn went_while_listed(&self, dir: u64, name: &str, since: Instant) -> bool {
        self.listings.get(&dir).and_then(|l| l.gone.get(name)).is_some_and(|went| *went >= since)
    }

    fn note_gone(&mut self, dir: u64, name: &str) {
        if let Some(l) = self.listings.get_mut(&dir) {
            l.gone.insert(name.to_string(), Instant::now());
        }
    }

    /// Removes the name → inode link; the node itself stays while the kernel or a handle still refers to it.
    pub fn detach(&mut self, parent: u64, name: &str) -> Option<u64> {
        self.unretire(parent, name);
        self.note_gone(parent, name);
        let ino = self.children.remove(&(parent, name.to_string()))?;
        self.unlink_child(parent, ino);
        self.detach_node(ino);
        Some(ino)
    }

    fn detach_node(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.unlinked = true;
        }
        self.maybe_drop(ino);
    }

    fn link_child(&mut self, parent: u64, ino: u64, kind: FileKind) {
        self.by_parent.entry(parent).or_default().insert(ino);
        if kind == FileKind::Dir {
            self.subdirs.entry(parent).or_default().insert(ino);
        }
    }

    fn unlink_child(&mut self, parent: u64, ino: u64) {
        for map in [&mut self.by_parent, &mut self.subdirs] {
            if let Some(set) = map.get_mut(&parent) {
                set.remove(&ino);
                if set.is_empty() {
                    map.remove(&parent);
                }
            }
        }
    }

    /// Moves a node to a new parent and name (rename). The target name must have been detached first.
    pub fn relink(&mut self, ino: u64, new_parent: u64, new_name: &str) {
        if let Some((parent, name)) = self.nodes.get(&ino).map(|n| (n.parent, n.name.clone())) {
            self.unretire(parent, &name);
            self.unretire(new_parent, new_name);
            self.note_gone(parent, &name);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            let old = (node.parent, node.name.clone());
            let kind = node.kind;
            node.parent = new_parent;
            node.name = new_name.to_string();
            self.bytes = self.bytes + node_bytes(new_name) - node_bytes(&old.1);
            if self.children.get(&old) == Some(&ino) {
                self.children.remove(&old);
                self.unlink_child(old.0, ino);
            }
            self.children.insert((new_parent, new_name.to_string()), ino);
            self.link_child(new_parent, ino, kind);
        }
    }

    /// Forgets kernel references; drops the node when nothing refers to it any more.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.maybe_drop(ino);
    }

    /// Drops a node nobody refers to: no kernel lookups, no open handles, no staged data, no children.
    pub fn maybe_drop(&mut self, ino: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.nodes.get(&ino) else { return };
        if node.lookups > 0 || node.open_handles > 0 || node.write.is_some() {
            return;
        }
        let has_children = self.by_parent.get(&ino).is_some_and(|s| !s.is_empty()) || self.retired.contains_key(&ino);
        if node.kind == FileKind::Dir && has_children {
            return;
        }
        let key = (node.parent, node.name.clone());
        let kind = node.kind;
        let linked = self.children.get(&key) == Some(&ino);
        let retire = linked
            && kind != FileKind::Dir
            && node.validated.is_some()
            && self.retain_for.contains(&key.0)
            && self.retired_count < MAX_RETIRED;
        if linked {
            // Still linked but unreferenced: keep it if it carries state the store does not have yet.
            if node.remote.is_none() && !node.unlinked {
                return;
            }
            self.children.remove(&key);
            self.unlink_child(key.0, ino);
            // The name still exists in the store, and the table no longer holds it: the parent's names (and, for a
            // directory, its subdirectory count) are no longer all known.
            self.names.remove(&key.0);
            if kind == FileKind::Dir {
                if let Some(parent) = self.nodes.get_mut(&key.0) {
                    parent.subdirs_known_until = None;
                }
            }
        }
        match self.nodes.remove(&ino) {
            Some(node) if retire && !node.unlinked => {
                if let Some(old) = self.retired.entry(key.0).or_default().insert(key.1, node) {
                    self.bytes -= node_bytes(&old.name);
                } else {
                    self.retired_count += 1;
                }
            }
            Some(node) => self.bytes -= node_bytes(&node.name),
            None => {}
        }
        self.by_parent.remove(&ino);
        self.subdirs.remove(&ino);
        self.names.remove(&ino);
        self.retain_for.remove(&ino);
    }

    /// Estimated memory of the table, in bytes (see [`NODE_BYTES`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Drops nodes nobody refers to (no kernel lookup, no handle, nothing staged; see [`InodeTable::maybe_drop`])
    /// until the table's estimate is at most `target` bytes: the entries of listings that the kernel never looked
    /// up. Files go first, then directories left without children. Their directories' names are no longer all known
    /// then (a lookup asks the store again). Returns how many were dropped.
    pub fn drop_unreferenced(&mut self, target: u64) -> usize {
        let unreferenced = |n: &Node| n.ino != ROOT_INO && n.lookups == 0 && n.open_handles == 0 && n.write.is_none();
        let mut dropped = 0;
        for dirs in [false, true] {
            let candidates: Vec<u64> = self
                .nodes
                .values()
                .filter(|n| unreferenced(n) && (n.kind == FileKind::Dir) == dirs)
                .map(|n| n.ino)
                .collect();
            for ino in candidates {
                if self.bytes <= target {
                    return dropped;
                }
                let before = self.nodes.len();
                self.maybe_drop(ino);
                dropped += before - self.nodes.len();
            }
        }
        dropped
    }

    /// Up to `n` files (parent, name) the kernel holds but nothing else needs — no open handle, nothing staged, a
    /// stored version known — whose attributes were confirmed longest ago: once the kernel forgets them (asked by
    /// the filesystem), they are dropped like any forgotten node.
    pub fn forget_candidates(&self, n: usize) -> Vec<(u64, String)> {
        let mut found: Vec<(Option<Instant>, u64, &str)> = self
            .nodes
            .values()
            .filter(|c| {
                c.ino != ROOT_INO
                    && c.kind != FileKind::Dir
                    && c.lookups > 0
                    && c.open_handles == 0
                    && c.write.is_none()
                    && c.remote.is_some()
                    && !c.unlinked
            })
            .map(|c| (c.validated, c.parent, c.name.as_str()))
            .collect();
        if found.len() > n {
            found.select_nth_unstable_by_key(n, |c| c.0);
            found.truncate(n);
        }
        found.into_iter().map(|(_, parent, name)| (parent, name.to_string())).collect()
    }

    /// The path of a node relative to the mount root ("" for the root), or `None` if an ancestor is gone.
    pub fn path_of(&self, ino: u64) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let node = self.nodes.get(&cur)?;
            parts.push(node.name.as_str());
            cur = node.parent;
            if parts.len() > 4096 {
                return None; // a cycle would be a broken invariant; refuse rather than loop
            }
        }
        parts.reverse();
        Some(parts.join("/"))
    }

    /// Path of `name` inside directory `parent`.
    pub fn child_path(&self, parent: u64, name: &str) -> Option<String> {
        let mut path = String::new();
        join_path(&mut path, &self.path_of(parent)?, name);
        Some(path)
    }

    /// Inodes that hold staged write state.
    pub fn with_write_state(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.write.is_some()).map(|n| n.ino).collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn node(parent: u64, name: &str, kind: FileKind) -> Node {
        let now = SystemTime::now();
        Node {
            ino: 0,
            parent,
            name: name.into(),
            kind,
            size: 0,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: now,
            ctime: now,
            atime: now,
            remote: Some(Remote { etag: "e".into(), stored_size: 0 }),
            has_marker: true,
            validated: None,
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
        }
    }

    #[test]
    fn paths_follow_renames_of_ancestors() {
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let a = t.insert(node(ROOT_INO, "a", FileKind::Dir));
        let b = t.insert(node(a, "b", FileKind::Dir));
        let f = t.insert(node(b, "f", FileKind::File));
        assert_eq!(t.path_of(f).as_deref(), Some("a/b/f"));
        t.relink(a, ROOT_INO, "z");
        assert_eq!(t.path_of(f).as_deref(), Some("z/b/f"));
        assert_eq!(t.child(ROOT_INO, "a"), None);
        assert_eq!(t.child(ROOT_INO, "z"), Some(a));
        assert_eq!(t.children_of(ROOT_INO), vec![a]);
        t.relink(f, ROOT_INO, "top");
        assert!(t.children_of(b).is_empty());
        let mut top = t.children_of(ROOT_INO);
        top.sort();
        let mut want = vec![a, f];
        want.sort();
        assert_eq!(top, want);
    }

    #[test]
    fn numbers_come_from_paths_and_skip_numbers_in_use() {
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let a = t.insert(node(ROOT_INO, "a", FileKind::File));
        t.forget(a, 1);
        assert!(t.get(a).is_none(), "dropped");
        assert_eq!(t.insert(node(ROOT_INO, "a", FileKind::File)), a, "the same name gets the same number again");
        // While the old node is still referenced, a new node at that name gets another number.
        t.get_mut(a).unwrap().lookups = 1;
        let b = t.insert(node(ROOT_INO, "a", FileKind::File));
        assert_ne!(a, b);
        assert!(a > ROOT_INO && b > ROOT_INO);
    }

    #[test]
    fn replacing_a_name_detaches_the_old_node_and_forget_drops_it() {
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let old = t.insert(node(ROOT_INO, "x", FileKind::File));
        let new = t.insert(node(ROOT_INO, "x", FileKind::File));
        assert_eq!(t.child(ROOT_INO, "x"), Some(new));
        assert!(t.get(old).is_some_and(|n| n.unlinked), "still referenced by the kernel");
        t.forget(old, 1);
        assert!(t.get(old).is_none());
        assert_eq!(t.children_of(ROOT_INO), vec![new]);
    }

    fn nlink(t: &InodeTable, ino: u64, now: Instant) -> u32 {
        t.attr_at(ino, now).expect("node exists").nlink
    }

    #[test]
    fn a_directory_links_are_unknown_until_its_subdirectories_are_known() {
        let now = Instant::now();
        let until = now + Duration::from_secs(1);
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        assert_eq!(nlink(&t, ROOT_INO, now), 1, "the root before any listing");
        let d = t.insert(node(ROOT_INO, "d", FileKind::Dir));
        t.insert(node(d, "a", FileKind::Dir));
        t.insert(node(d, "f", FileKind::File));
        t.insert(node(d, "s", FileKind::Symlink));
        assert_eq!(nlink(&t, d, now), 1, "found by lookups, never listed: unknown, not 2 + a guess");
        t.know_subdirs(d, until);
        assert_eq!(nlink(&t, d, now), 3, "one subdirectory; files and symlinks do not count");
        assert_eq!(nlink(&t, d, until), 1, "the knowledge expires with the listing's attr_ttl");
        assert_eq!(nlink(&t, d, until + Duration::from_secs(60)), 1);
        t.know_subdirs(ROOT_INO, until);
        assert_eq!(nlink(&t, ROOT_INO, now), 3, "the root once listed");
        assert_eq!(nlink(&t, t.child(d, "f").unwrap(), now), 1);
    }

    #[test]
    fn mkdir_rmdir_and_renames_keep_a_known_count_exact() {
        let now = Instant::now();
        let until = now + Duration::from_secs(1);
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let known_dir = |t: &mut InodeTable, parent, name: &str| {
            let mut n = node(parent, name, FileKind::Dir);
            n.subdirs_known_until = Some(until); // as mkdir makes it
            t.insert(n)
        };
        let d = known_dir(&mut t, ROOT_INO, "d");
        let e = known_dir(&mut t, ROOT_INO, "e");
        assert_eq!(nlink(&t, d, now), 2, "a new directory");
        let a = known_dir(&mut t, d, "a");
        known_dir(&mut t, d, "b");
        t.insert(node(d, "file", FileKind::File));
        assert_eq!(nlink(&t, d, now), 4);
        // rmdir d/b
        t.detach(d, "b");
        assert_eq!(nlink(&t, d, now), 3);
        // rename d/a → e/a: out of one parent, into the other
        t.relink(a, e, "a");
        assert_eq!((nlink(&t, d, now), nlink(&t, e, now)), (2, 3));
        // rename within a parent
        t.relink(a, e, "a2");
        assert_eq!(nlink(&t, e, now), 3);
        // rename over an existing empty directory: the target is detached first, then the source moves in
        let c = known_dir(&mut t, e, "c");
        assert_eq!(nlink(&t, e, now), 4);
        t.detach(e, "c");
        t.relink(a, e, "c");
        assert_eq!(nlink(&t, e, now), 3, "one directory replaced another");
        assert!(t.get(c).is_some_and(|n| n.unlinked));
        assert_eq!(nlink(&t, c, now), 0, "the replaced directory has no names left");
        // a file renamed over a file, and a file moved between directories: no change
        let f = t.insert(node(e, "f", FileKind::File));
        t.detach(e, "f");
        t.relink(t.child(d, "file").unwrap(), e, "f");
        assert!(t.get(f).is_some_and(|n| n.unlinked));
        assert_eq!((nlink(&t, d, now), nlink(&t, e, now)), (2, 3));
        // a lookup that finds a subdirectory this mount did not make counts it; one that finds a name is now a
        // file instead of a directory drops it
        t.insert(node(d, "found", FileKind::Dir));
        assert_eq!(nlink(&t, d, now), 3);
        t.insert(node(d, "found", FileKind::File));
        assert_eq!(nlink(&t, d, now), 2);
    }

    #[test]
    fn a_count_rebuilt_by_a_listing_follows_kinds_changed_since_linking() {
        let now = Instant::now();
        let until = now + Duration::from_secs(1);
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let d = t.insert(node(ROOT_INO, "d", FileKind::Dir));
        // Listed as an object, then its metadata said directory (an s3fs-style directory object).
        let x = t.insert(node(d, "x", FileKind::File));
        t.get_mut(x).unwrap().kind = FileKind::Dir;
        t.know_subdirs(d, until);
        assert_eq!(nlink(&t, d, now), 3);
        t.detach(d, "x");
        assert_eq!(nlink(&t, d, now), 2, "removed by inode number whatever its kind was when linked");
    }

    #[test]
    fn a_dropped_directory_takes_its_count_along() {
        let now = Instant::now();
        let until = now + Duration::from_secs(1);
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let d = t.insert(node(ROOT_INO, "d", FileKind::Dir));
        t.insert(node(d, "sub", FileKind::Dir));
        t.detach(d, "sub");
        t.detach(ROOT_INO, "d");
        t.forget(d, 1);
        assert!(t.get(d).is_none());
        assert!(t.subdirs.is_empty() && t.by_parent.is_empty(), "no sets left behind for dropped nodes");
        // The same path gets the same number again; the new directory starts with nothing known.
        let again = t.insert(node(ROOT_INO, "d", FileKind::Dir));
        assert_eq!(again, d);
        assert_eq!(nlink(&t, again, now), 1);
        t.know_subdirs(again, until);
        assert_eq!(nlink(&t, again, now), 2);
    }

    #[test]
    fn the_estimate_follows_inserts_renames_and_drops_and_trimming_spares_what_is_in_use() {
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let empty = t.bytes();
        let d = t.insert(node(ROOT_INO, "d", FileKind::Dir));
        let mut listed = Vec::new();
        for i in 0..10 {
            let mut n = node(d, &format!("f{i}"), FileKind::File);
            n.lookups = 0; // as a listing makes them
            listed.push(t.insert(n));
        }
        let looked_up = t.insert(node(d, "kernel", FileKind::File));
        let mut open = node(d, "open", FileKind::File);
        (open.lookups, open.open_handles) = (0, 1);
        let open = t.insert(open);
        assert_eq!(t.bytes(), empty + node_bytes("d") + 10 * node_bytes("f0") + node_bytes("kernel") + node_bytes("open"));
        t.relink(looked_up, d, "kernel-renamed");
        assert_eq!(t.bytes(), empty + node_bytes("d") + 10 * node_bytes("f0") + node_bytes("kernel-renamed") + node_bytes("open"));
        let dropped = t.drop_unreferenced(0);
        assert_eq!(dropped, 10, "only the listing's entries nobody looked up");
        assert!(listed.iter().all(|i| t.get(*i).is_none()));
        assert!(t.get(looked_up).is_some() && t.get(open).is_some() && t.get(d).is_some());
        assert_eq!(t.bytes(), empty + node_bytes("d") + node_bytes("kernel-renamed") + node_bytes("open"));
        assert_eq!(t.forget_candidates(5), vec![(d, "kernel-renamed".to_string())], "not the open file, not a directory");
        t.forget(looked_up, 1);
        t.get_mut(open).unwrap().open_handles = 0;
        t.maybe_drop(open);
        t.forget(d, 1);
        assert_eq!(t.bytes(), empty, "back to the root alone");
    }

    #[test]
    fn a_directory_with_children_is_kept_until_they_go() {
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        let d = t.insert(node(ROOT_INO, "d", FileKind::Dir));
        let f = t.insert(node(d, "f", FileKind::File));
        t.forget(d, 1);
        assert!(t.get(d).is_some(), "has a child");
        t.detach(d, "f");
        t.forget(f, 1);
        t.maybe_drop(d);
        assert!(t.get(d).is_none());
    }

    /// The names that go from a directory being listed are kept for the listings that began before they went, and no
    /// longer: not past the last listing, and not while listings keep overlapping, begun one after the other.
    #[test]
    fn names_gone_while_listed_are_kept_only_for_the_listings_begun_before() {
        let mut t = InodeTable::new(node(ROOT_INO, "", FileKind::Dir));
        for name in ["a", "b", "c"] {
            t.insert(node(ROOT_INO, name, FileKind::File));
        }
        let tick = || {
            std::thread::sleep(Duration::from_millis(2));
            Instant::now()
        };
        t.detach(ROOT_INO, "a"); // no listing on its way: nothing noted
        let first = tick();
        t.begin_listing(ROOT_INO, first);
        tick();
        t.detach(ROOT_INO, "b");
        let second = tick();
        t.begin_listing(ROOT_INO, second);
        tick();
        let c = t.child(ROOT_INO, "c").unwrap();
        t.relink(c, ROOT_INO, "c2");
        assert!(!t.went_while_listed(ROOT_INO, "a", first), "went before any listing began");
        assert!(t.went_while_listed(ROOT_INO, "b", first) && t.went_while_listed(ROOT_INO, "c", first));
        assert!(!t.went_while_listed(ROOT_INO, "b", second), "went before the second listing began");
        assert!(t.went_while_listed(ROOT_INO, "c", second), "renamed away");
        assert!(!t.went_while_listed(ROOT_INO, "c2", second));
        t.end_listing(ROOT_INO, first);
        assert_eq!(t.listings[&ROOT_INO].gone.len(), 1, "b is forgotten with the first listing");
        let third = tick();
        t.begin_listing(ROOT_INO, third);
        t.end_listing(ROOT_INO, second);
        assert!(t.listings[&ROOT_INO].gone.is_empty(), "c went before the third listing, the oldest on its way, began");
        t.end_listing(ROOT_INO, third);
        assert!(t.listings.is_empty());
    }
}
