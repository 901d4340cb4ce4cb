//! The inode table: the kernel's view of names, numbers and attributes.
//!
//! Nodes link to their parent by number and hold only their own name, so an object's key is derived by walking up
//! (`path_of`), and renaming a directory is one update of one node: every descendant's key follows. The table is the
//! authority for what this mount created or changed until the store confirms it; attributes read from the store are
//! trusted for `attr_ttl` and then asked again.
//!
//! Concurrency: the table lives behind one `std::sync::Mutex` held only for map operations (never across an await or
//! any I/O).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::write::WriteState;

pub const ROOT_INO: u64 = 1;

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
}

impl Node {
    pub fn attr(&self) -> Attr {
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
            // An unlinked file still open has no name left (fstat says 0, as on any POSIX filesystem).
            nlink: match (self.kind, self.unlinked) {
                (_, true) => 0,
                (FileKind::Dir, false) => 2,
                _ => 1,
            },
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
    next_ino: u64,
}

impl InodeTable {
    pub fn new(root: Node) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, root);
        InodeTable { nodes, children: HashMap::new(), by_parent: HashMap::new(), next_ino: ROOT_INO + 1 }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&(parent, name.to_string())).copied()
    }

    /// Children of `parent` currently in the table.
    pub fn children_of(&self, parent: u64) -> Vec<u64> {
        self.by_parent.get(&parent).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Inserts a new node under `parent`/`name`, replacing (and detaching) whatever was there.
    pub fn insert(&mut self, mut node: Node) -> u64 {
        let ino = self.number_for(node.parent, &node.name);
        node.ino = ino;
        let parent = node.parent;
        if let Some(old) = self.children.insert((parent, node.name.clone()), ino) {
            self.unlink_child(parent, old);
            self.detach_node(old);
        }
        self.by_parent.entry(parent).or_default().insert(ino);
        self.nodes.insert(ino, node);
        ino
    }

    /// The inode number of a new node for `name` in `parent`: derived from its path (the first 8 bytes of its
    /// SHA-256), so the same name gets the same number again after the kernel forgot the node and looked the name up
    /// anew (find, du, tar, rsync -H and git compare `st_ino`), and across remounts, with no memory per name. A number
    /// in use by another node (a hash collision, or the node a rename moved away from this path) is skipped to the
    /// next free one; 0 and the root's number are never used.
    fn number_for(&mut self, parent: u64, name: &str) -> u64 {
        use sha2::{Digest, Sha256};
        let mut ino = match self.child_path(parent, name) {
            Some(path) => {
                let digest = Sha256::digest(path.as_bytes());
                u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
            }
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

    /// Removes the name → inode link; the node itself stays while the kernel or a handle still refers to it.
    pub fn detach(&mut self, parent: u64, name: &str) -> Option<u64> {
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

    fn unlink_child(&mut self, parent: u64, ino: u64) {
        if let Some(set) = self.by_parent.get_mut(&parent) {
            set.remove(&ino);
            if set.is_empty() {
                self.by_parent.remove(&parent);
            }
        }
    }

    /// Moves a node to a new parent and name (rename). The target name must have been detached first.
    pub fn relink(&mut self, ino: u64, new_parent: u64, new_name: &str) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let old = (node.parent, node.name.clone());
            node.parent = new_parent;
            node.name = new_name.to_string();
            if self.children.get(&old) == Some(&ino) {
                self.children.remove(&old);
                self.unlink_child(old.0, ino);
            }
            self.children.insert((new_parent, new_name.to_string()), ino);
            self.by_parent.entry(new_parent).or_default().insert(ino);
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
        if node.kind == FileKind::Dir && self.by_parent.get(&ino).is_some_and(|s| !s.is_empty()) {
            return;
        }
        let key = (node.parent, node.name.clone());
        if self.children.get(&key) == Some(&ino) {
            // Still linked but unreferenced: keep it if it carries state the store does not have yet.
            if node.remote.is_none() && !node.unlinked {
                return;
            }
            self.children.remove(&key);
            self.unlink_child(key.0, ino);
        }
        self.nodes.remove(&ino);
        self.by_parent.remove(&ino);
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
        let p = self.path_of(parent)?;
        Some(if p.is_empty() { name.to_string() } else { format!("{p}/{name}") })
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
}
