//! [`Backend`] over an ordinary directory (`file:///abs/dir`), for use without S3 and in tests.
//!
//! Layout under the root:
//! - the object `a/b/c` is the regular file `<root>/a/b/c`;
//! - the marker `a/b/` is the directory `<root>/a/b`: it exists exactly when the directory does,
//!   so every parent of a file is an (implicit) marker, unlike S3;
//! - metadata is one extended attribute, `user.s3cryptfs.meta`, holding `name=value` lines with
//!   the same names S3 uses (see `meta.rs`); on directories it holds the marker's metadata;
//! - `<root>/.s3cryptfs-tmp/` (mode 0700) stages writes and is never listed. Stale files left
//!   there by a crash are harmless and may be deleted while no mount uses the root, except
//!   `rename-*.intent` (below), which the next open of the store completes. The staged file of a
//!   multipart upload (`.put-<hex>`) is its upload id: the next start removes the one of a stream
//!   a killed daemon left, which its journal names (`Backend::abort_multipart`).
//!
//! A rename that changes the object's metadata (a new path binding) is two steps, the new xattr and
//! the rename(2), and a crash between them would leave the object under its old name with metadata
//! that names the new one (a reader then sees a swap: EIO). So the old metadata is first written to
//! `.s3cryptfs-tmp/rename-<inode>.intent` (fsynced), and removed once the rename is on disk; the
//! whole sequence holds the write lock. Opening the store (under the same lock) puts the old
//! metadata back on any source still at its old name with the inode the intent names, as if the
//! rename had not started, and removes the intent.
//!
//! Objects are reached one name at a time: the root is opened once, when the store is, and kept open; every call
//! walks from that descriptor with `openat` and acts relative to the directory it ends in (see `dirfd.rs`). No whole
//! path is handed to the kernel, so how long a key may be does not depend on how long the root's own path is: each
//! name is at most NAME_MAX (255 bytes; a longer one is [`StoreError::NameTooLong`]), and the mount creates paths of
//! up to [`LOCAL_MAX_PATH_LEN`] bytes. A lookup of a key whose directories are missing is `NotFound`, however long.
//!
//! Writes are atomic: the body goes to a temp file, gets its xattr, is fsynced and renamed into
//! place, then the parent directory is fsynced. The etag is derived from (inode, size, mtime
//! in ns); a rewrite always gets a new inode, because the temp file is created while the old
//! file still exists, so the etag changes even within one timestamp tick.
//!
//! Conditional writes ([`Expect`]) are emulated, as atomically as the filesystem allows:
//! - [`Expect::Absent`] publishes with a no-replace rename (`renameat2(RENAME_NOREPLACE)`, or link + unlink where the
//!   filesystem lacks it), so the kernel refuses it if anything appeared at the path: atomic against every writer.
//! - [`Expect::Etag`] compares the current file's etag and renames over it while holding the store's write lock: an
//!   in-process mutex plus an `flock` on `.s3cryptfs-tmp/write.lock`, so two mounts (processes) of the same
//!   directory are serialised too. Every publishing write (put, copy, upload, rename, delete, header rewrite) takes
//!   that lock for its final step. What remains: a program that changes the directory *without* the lock (another
//!   tool, an editor, an older s3cryptfs) can replace the file between the check and the rename, and that change is
//!   then overwritten; and `flock` does not serialise clients of a network filesystem on different hosts.
//!
//! Keys are validated by [`ObjectKey`] (no `..`, no leading `/`, no NUL), and no name below the root is followed
//! through a symlink: every directory on the way is opened with `O_DIRECTORY | O_NOFOLLOW` and the final name with
//! `O_NOFOLLOW`, so a symlink planted anywhere under the root reads as a missing object and a write through it fails.
//! The root's own path is resolved once, symlinks in it followed, when the store is opened; moving the root
//! directory while mounted does not redirect the store. All system calls run under `spawn_blocking`.

use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::dirfd::{self, fstat, Dir, Kind, Stat, NAME_MAX};
use super::error::StoreError;
use super::meta;
use super::{
    check_dir, sort_listing, Backend, Expect, Listing, ObjectInfo, ObjectKey, Upload, UserMeta,
    LOCAL_TMP_DIR,
};

/// The longest path (key without a trailing `/`) the mount creates on the local store.
///
/// Not PATH_MAX: objects are reached name by name (see the module docs), and programs inside the mount can nest
/// deeper than one path system call could name (with `openat`, or `cd` step by step), so the kernel sets no limit
/// that the mount needs to match. The bound is there for what holds a whole path elsewhere: a journal record
/// (docs/FORMAT.md) carries the path JSON-escaped, up to twice its length, and is read back only up to 64 KiB, so a
/// path must stay well under 32 KiB. 16 KiB is four times PATH_MAX and leaves the record room to spare.
pub const LOCAL_MAX_PATH_LEN: usize = 16 << 10;

/// The one xattr holding an object's metadata.
const XATTR_META: &CStr = c"user.s3cryptfs.meta";
/// Written once at construction to learn whether the filesystem takes user xattrs at all.
const XATTR_PROBE: &CStr = c"user.s3cryptfs.probe";
/// First guess for the xattr buffer; metadata is capped at 2 KiB of names and values, so one
/// page almost always suffices and ERANGE handles the rest.
const XATTR_BUF_LEN: usize = 4096;
/// The lock file in the staging directory that serialises the final step of every write (see the module docs).
const WRITE_LOCK_FILE: &CStr = c"write.lock";
/// Mode of directories the store creates, as `mkdir -p` (the umask applies).
const DIR_MODE: libc::mode_t = 0o777;
/// Mode of staged files (they become the objects): private, as the staging directory.
const STAGED_MODE: libc::mode_t = 0o600;
/// Draws of a random staged-file name before giving up; each clash is a 2^-64 chance, so more than one means
/// something else is wrong.
const STAGED_NAME_TRIES: usize = 8;

/// A directory holding objects as files; cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The canonical root path, for messages: objects are reached through `root_dir`.
    root: PathBuf,
    /// The root, open for the life of the store: every walk starts here.
    root_dir: Dir,
    /// The staging directory; shared with the staged files, which remove themselves from it when dropped.
    tmp: Arc<Dir>,
    /// The open lock file: the mutex serialises this process's threads (an `flock` is held per open file, so it
    /// would not), the `flock` on it other processes.
    write_lock: Mutex<File>,
}

/// Holds the store's write lock (see the module docs) until dropped.
struct WriteLock<'a> {
    file: MutexGuard<'a, File>,
}

impl Drop for WriteLock<'_> {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor the guard keeps open; unlocking cannot fail on a valid descriptor.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// A file being written in the staging directory, under a random name; removed when dropped, unless
/// [`Staged::published`] says it was moved into place.
struct Staged {
    file: File,
    name: StagedName,
}

struct StagedName {
    dir: Arc<Dir>,
    name: CString,
    /// Still in the staging directory, so ours to remove.
    staged: bool,
}

impl Drop for StagedName {
    fn drop(&mut self) {
        if self.staged {
            let _ = self.dir.unlink(&self.name);
        }
    }
}

impl Staged {
    /// A new empty file in `dir`, created exclusively (`O_EXCL`): a name that is taken, by another mount or a file
    /// a crash left behind, is drawn again.
    fn new(dir: &Arc<Dir>) -> io::Result<Staged> {
        for _ in 0..STAGED_NAME_TRIES {
            let name = CString::new(format!(".put-{:016x}", rand::random::<u64>()))
                .expect("invariant broken: a hex name holds no NUL");
            match dir.open_file(&name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, STAGED_MODE) {
                Ok(file) => {
                    return Ok(Staged { file, name: StagedName { dir: Arc::clone(dir), name, staged: true } })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free name for a staged file"))
    }

    /// The staged file's name in the staging directory.
    fn name(&self) -> &CStr {
        &self.name.name
    }

    /// The file was renamed into place: nothing to remove any more.
    fn published(self) -> File {
        let Staged { file, mut name } = self;
        name.staged = false;
        file
    }

    /// Removes the staged file now, saying if that failed (a drop removes it too, silently).
    fn discard(self) -> io::Result<()> {
        let Staged { file, mut name } = self;
        drop(file);
        name.staged = false;
        name.dir.unlink(&name.name)
    }
}

impl LocalBackend {
    /// Open the store rooted at `root`, which must exist. Creates the staging directory and
    /// fails with [`StoreError::XattrUnsupported`] if the filesystem lacks user xattrs.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let given = root.as_ref();
        let root = fs::canonicalize(given).map_err(|e| {
            StoreError::invalid(format!(
                "the local store directory {} cannot be opened ({e}); create it first",
                given.display()
            ))
        })?;
        let root_dir = Dir::open_path(&root).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR) => {
                StoreError::invalid(format!("the local store path {} is not a directory", root.display()))
            }
            _ => StoreError::invalid(format!("the local store directory {} cannot be opened ({e})", root.display())),
        })?;
        let tmp_name = dirfd::name(LOCAL_TMP_DIR).map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        match root_dir.mkdir(&tmp_name, 0o700) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e, LOCAL_TMP_DIR)),
        }
        let tmp = Arc::new(root_dir.open_dir(&tmp_name).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR) => StoreError::invalid(format!(
                "{} is not a directory; the local store stages its writes there, so move it away",
                root.join(LOCAL_TMP_DIR).display()
            )),
            _ => io_err(e, LOCAL_TMP_DIR),
        })?);
        let probe = Staged::new(&tmp).map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        match set_xattr(&probe.file, XATTR_PROBE, b"1") {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                return Err(StoreError::XattrUnsupported { root });
            }
            Err(e) => return Err(io_err(e, LOCAL_TMP_DIR)),
        }
        drop(probe);
        let write_lock = tmp
            .open_file(WRITE_LOCK_FILE, libc::O_RDWR | libc::O_CREAT, 0o600)
            .map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        let inner = Inner { root, root_dir, tmp, write_lock: Mutex::new(write_lock) };
        inner.finish_intents()?;
        Ok(LocalBackend { inner: Arc::new(inner) })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn run<T, F>(&self, key: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::other(key, e))?
    }
}

/// The names of `key`'s path, each one checked against NAME_MAX.
fn names_of(key: &ObjectKey) -> Result<Vec<CString>, StoreError> {
    key.trimmed().split('/').map(|c| dirfd::name(c).map_err(|e| io_err(e, key.as_str()))).collect()
}

impl Inner {
    /// Opens the directory `names` below the root, one name at a time, never through a symlink. With `create`,
    /// missing directories are made on the way (as `mkdir -p`).
    fn walk(&self, names: &[CString], create: bool) -> io::Result<Dir> {
        let mut dir = self.root_dir.reopen()?;
        for name in names {
            dir = match dir.open_dir(name) {
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    match dir.mkdir(name, DIR_MODE) {
                        Ok(()) => {}
                        // Made by someone else meanwhile: as good.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    dir.open_dir(name)?
                }
                opened => opened?,
            };
        }
        Ok(dir)
    }

    /// The directory holding `key`'s file (or, for a marker, its directory) and that entry's name in it. For a
    /// lookup (`create` false) a missing directory on the way, or anything else in its place, is `NotFound`; for a
    /// write the missing ones are made and a file in the way is a clear error.
    fn locate(&self, key: &ObjectKey, create: bool) -> Result<(Dir, CString), StoreError> {
        let mut names = names_of(key)?;
        let leaf = names.pop().expect("invariant broken: a valid key has at least one name");
        let dir = self.walk(&names, create).map_err(|e| {
            if create {
                conflict_or_io(e, key)
            } else {
                io_err(e, key.as_str())
            }
        })?;
        Ok((dir, leaf))
    }

    /// Takes the store's write lock (in-process mutex, then `flock`); blocks until both are free.
    fn lock(&self, key: &ObjectKey) -> Result<WriteLock<'_>, StoreError> {
        // A panic while holding the mutex left no state behind it to repair: the file is all it guards.
        let file = self.write_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            // SAFETY: flock on the lock file's open descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(WriteLock { file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err(e, key.as_str()));
            }
        }
    }

    /// Open an existing object: a regular file for plain keys, a directory for markers.
    /// Anything else at that path (the other kind, a symlink) means the object does not exist.
    fn open(&self, key: &ObjectKey) -> Result<(File, Stat), StoreError> {
        let (dir, leaf) = self.locate(key, false)?;
        open_in(&dir, &leaf, key)
    }

    fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        let (file, st) = self.open(key)?;
        let meta = read_meta(&file, key)?;
        Ok((info_of(key, &st), meta))
    }

    fn read(
        &self,
        key: &ObjectKey,
        range: Option<Range<u64>>,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let (file, st) = self.open(key)?;
        let meta = read_meta(&file, key)?;
        let info = info_of(key, &st);
        if key.is_dir_marker() {
            return Ok((Bytes::new(), info, meta));
        }
        let range = range.unwrap_or(0..info.size);
        let end = range.end.min(info.size);
        if range.start >= end {
            return Ok((Bytes::new(), info, meta));
        }
        let len = usize::try_from(end - range.start)
            .map_err(|_| StoreError::invalid(format!("range {range:?} is too large for memory")))?;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let n = file
                .read_at(&mut buf[filled..], range.start + filled as u64)
                .map_err(|e| io_err(e, key.as_str()))?;
            if n == 0 {
                // Truncated by someone else since the fstat: return what exists.
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok((Bytes::from(buf), info, meta))
    }

    fn staging_file(&self, key: &ObjectKey) -> Result<Staged, StoreError> {
        Staged::new(&self.tmp).map_err(|e| io_err(e, key.as_str()))
    }

    /// fsync, move the staged file to `key`'s path if `expect` holds (see the module docs), make the rename durable.
    fn publish(&self, key: &ObjectKey, staged: Staged, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        staged.file.sync_all().map_err(|e| io_err(e, key.as_str()))?;
        let (dir, leaf) = self.locate(key, true)?;
        let dir_in_the_way = || {
            StoreError::invalid(format!("cannot store {key}: a directory of that name exists in the local store"))
        };
        let moved = {
            let _lock = self.lock(key)?;
            match expect {
                Expect::Any => self.tmp.rename(staged.name(), &dir, &leaf),
                Expect::Absent => self.tmp.rename_noreplace(staged.name(), &dir, &leaf),
                Expect::Etag(want) => {
                    if etag_at(&dir, &leaf, key)?.as_deref() != Some(want.as_str()) {
                        return Err(StoreError::Precondition { key: key.to_string() });
                    }
                    self.tmp.rename(staged.name(), &dir, &leaf)
                }
            }
        };
        moved.map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) if *expect == Expect::Absent && !is_dir_at(&dir, &leaf) => {
                StoreError::Precondition { key: key.to_string() }
            }
            Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => dir_in_the_way(),
            _ => io_err(e, key.as_str()),
        })?;
        let file = staged.published();
        dir.sync().map_err(|e| io_err(e, key.as_str()))?;
        let st = fstat(&file).map_err(|e| io_err(e, key.as_str()))?;
        Ok(info_of(key, &st))
    }

    fn put(&self, key: &ObjectKey, body: &[u8], encoded: &str, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        if key.is_dir_marker() {
            if !body.is_empty() {
                return Err(StoreError::invalid(format!(
                    "directory marker {key} cannot have content"
                )));
            }
            return self.put_marker(key, encoded, expect);
        }
        let staged = self.staging_file(key)?;
        (&staged.file)
            .write_all(body)
            .map_err(|e| io_err(e, key.as_str()))?;
        set_xattr(&staged.file, XATTR_META, encoded.as_bytes())
            .map_err(|e| io_err(e, key.as_str()))?;
        self.publish(key, staged, expect)
    }

    /// A marker is its directory: created if missing, its xattr set, under the write lock so that `expect` is
    /// checked against the directory as it is while the metadata is written.
    fn put_marker(&self, key: &ObjectKey, encoded: &str, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        let (parent, leaf) = self.locate(key, true)?;
        let lock = self.lock(key)?;
        let precondition = || StoreError::Precondition { key: key.to_string() };
        match (expect, parent.mkdir(&leaf, DIR_MODE)) {
            (Expect::Etag(_), Ok(())) => {
                // It was not there, so it was not the version asked for: undo (it is empty, just made).
                let _ = parent.rmdir(&leaf);
                return Err(precondition());
            }
            (_, Ok(())) => {}
            (_, Err(e)) if e.kind() == io::ErrorKind::AlreadyExists && is_dir_at(&parent, &leaf) => match expect {
                Expect::Any => {}
                Expect::Absent => return Err(precondition()),
                Expect::Etag(want) => {
                    let (_, st) = open_in(&parent, &leaf, key)?;
                    if info_of(key, &st).etag.as_deref() != Some(want.as_str()) {
                        return Err(precondition());
                    }
                }
            },
            (_, Err(e)) => return Err(conflict_or_io(e, key)),
        }
        let (dir, _) = open_in(&parent, &leaf, key)?;
        set_xattr(&dir, XATTR_META, encoded.as_bytes()).map_err(|e| io_err(e, key.as_str()))?;
        drop(lock);
        dir.sync_all().map_err(|e| io_err(e, key.as_str()))?;
        parent.sync().map_err(|e| io_err(e, key.as_str()))?;
        let st = fstat(&dir).map_err(|e| io_err(e, key.as_str()))?;
        Ok(info_of(key, &st))
    }

    fn copy(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        encoded: Option<&str>,
    ) -> Result<(), StoreError> {
        let (mut src, _) = self.open(from)?;
        let encoded = match encoded {
            Some(e) => e.to_owned(),
            None => raw_meta(&src, from)?,
        };
        if to.is_dir_marker() {
            self.put_marker(to, &encoded, &Expect::Any)?;
            return Ok(());
        }
        let mut staged = self.staging_file(to)?;
        // std::io::copy uses copy_file_range on Linux, so big objects are not pulled through us.
        io::copy(&mut src, &mut staged.file).map_err(|e| io_err(e, from.as_str()))?;
        set_xattr(&staged.file, XATTR_META, encoded.as_bytes())
            .map_err(|e| io_err(e, to.as_str()))?;
        self.publish(to, staged, &Expect::Any)?;
        Ok(())
    }

    fn rename(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        encoded: Option<&str>,
    ) -> Result<(), StoreError> {
        if from.is_dir_marker() {
            return self.rename_marker(from, to, encoded);
        }
        let (src_dir, src_leaf) = self.locate(from, false)?;
        let (dst_dir, dst_leaf) = self.locate(to, true)?;
        let lock = self.lock(from)?;
        let (src, st) = open_in(&src_dir, &src_leaf, from)?;
        // Set the new metadata before the rename so the object never appears under its new name
        // with stale metadata; the intent undoes it if a crash comes before the rename (module docs).
        let intent = match encoded {
            Some(e) => {
                let old = get_xattr(&src, XATTR_META).map_err(|e| io_err(e, from.as_str()))?.unwrap_or_default();
                let intent = self.write_intent(from, st.ino, &old)?;
                if let Err(err) = set_xattr(&src, XATTR_META, e.as_bytes()) {
                    let _ = self.tmp.unlink(&intent);
                    return Err(io_err(err, from.as_str()));
                }
                Some(intent)
            }
            None => None,
        };
        drop(src);
        let renamed = src_dir.rename(&src_leaf, &dst_dir, &dst_leaf).and_then(|()| dst_dir.sync()).and_then(|()| src_dir.sync());
        if let Some(intent) = &intent {
            if renamed.is_err() {
                // Not renamed: the old metadata goes back now (the intent would do it at the next open).
                self.undo_intent(intent);
            }
            let _ = self.tmp.unlink(intent);
        }
        drop(lock);
        renamed.map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => StoreError::invalid(
                format!("cannot rename {from} to {to}: a directory of that name exists in the local store"),
            ),
            _ => io_err(e, from.as_str()),
        })
    }

    /// Writes (and fsyncs) the intent of renaming `from` (inode `ino`, metadata `old`): see the module docs.
    fn write_intent(&self, from: &ObjectKey, ino: u64, old: &[u8]) -> Result<CString, StoreError> {
        let name = CString::new(format!("rename-{ino:016x}.intent")).expect("invariant broken: a hex name holds no NUL");
        let body = serde_json::to_vec(&Intent { ino, from: from.as_str().to_string(), old: crate::crypto::hex::hex(old) })
            .map_err(|e| StoreError::invalid(format!("rename intent: {e}")))?;
        let tmp_name = CString::new(format!("rename-{ino:016x}.intent.new")).expect("invariant broken: a hex name holds no NUL");
        let write = || -> io::Result<()> {
            let mut f = self.tmp.open_file(&tmp_name, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o600)?;
            f.write_all(&body)?;
            f.sync_all()?;
            self.tmp.rename(&tmp_name, &self.tmp, &name)?;
            self.tmp.sync()
        };
        write().map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        Ok(name)
    }

    /// Puts back the metadata an intent saved, if its source is still at its old name (same inode).
    fn undo_intent(&self, name: &CStr) -> bool {
        let Ok(mut f) = self.tmp.open_file(name, libc::O_RDONLY, 0) else { return false };
        let mut body = Vec::new();
        if f.read_to_end(&mut body).is_err() {
            return false;
        }
        let Ok(intent) = serde_json::from_slice::<Intent>(&body) else {
            tracing::warn!(intent = ?name, "unreadable rename intent in the local store; removed");
            return false;
        };
        let (Ok(key), Some(old)) = (ObjectKey::new(intent.from.clone()), crate::crypto::hex::unhex(&intent.old)) else { return false };
        let Ok((dir, leaf)) = self.locate(&key, false) else { return false };
        let Ok((src, st)) = open_in(&dir, &leaf, &key) else { return false };
        if st.ino != intent.ino {
            return false; // renamed after all, and something else took the name since
        }
        let restored = set_xattr(&src, XATTR_META, &old).and_then(|()| src.sync_all());
        match restored {
            Ok(()) => {
                tracing::warn!(key = %intent.from, "a rename was interrupted before it happened; the file keeps its name and its metadata");
                true
            }
            Err(e) => {
                tracing::error!(key = %intent.from, error = %e, "could not undo an interrupted rename's metadata");
                false
            }
        }
    }

    /// At open: completes what crashed renames left (see the module docs), under the write lock.
    fn finish_intents(&self) -> Result<(), StoreError> {
        let what = ObjectKey::new("rename-intents").expect("invariant broken: a valid key");
        let _lock = self.lock(&what)?;
        let names = self.tmp.names().map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        for name in names {
            let text = name.to_string_lossy();
            if text.starts_with("rename-") && text.ends_with(".intent.new") {
                let _ = self.tmp.unlink(&name); // never completed: the rename had not started
            } else if text.starts_with("rename-") && text.ends_with(".intent") {
                self.undo_intent(&name);
                let _ = self.tmp.unlink(&name);
            }
        }
        Ok(())
    }

    /// A marker rename moves only the marker, like on S3: the caller moves the entries first,
    /// then the (by then empty) marker. A non-empty source is refused rather than moving the
    /// subtree behind the caller's back.
    fn rename_marker(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        encoded: Option<&str>,
    ) -> Result<(), StoreError> {
        let (parent, leaf) = self.locate(from, false)?;
        let (src, _) = open_in(&parent, &leaf, from)?;
        let encoded = match encoded {
            Some(e) => e.to_owned(),
            None => raw_meta(&src, from)?,
        };
        drop(src);
        if from == to {
            self.put_marker(to, &encoded, &Expect::Any)?;
            return Ok(());
        }
        let empty = parent
            .open_dir(&leaf)
            .and_then(|d| d.is_empty())
            .map_err(|e| io_err(e, from.as_str()))?;
        if !empty {
            return Err(StoreError::NotEmpty {
                key: from.to_string(),
            });
        }
        self.put_marker(to, &encoded, &Expect::Any)?;
        self.delete(from)
    }

    fn update_meta(&self, key: &ObjectKey, encoded: &str) -> Result<ObjectInfo, StoreError> {
        let (file, st) = self.open(key)?;
        set_xattr(&file, XATTR_META, encoded.as_bytes()).map_err(|e| io_err(e, key.as_str()))?;
        file.sync_all().map_err(|e| io_err(e, key.as_str()))?;
        Ok(info_of(key, &st))
    }

    /// [`Backend::update_meta_if`]: the ETag is checked on the descriptor whose attribute is rewritten, under the
    /// write lock, so a file replaced by a concurrent writer (a new inode, published under the lock) is never touched.
    fn update_meta_if(
        &self,
        key: &ObjectKey,
        encoded: &str,
        etag: &str,
    ) -> Result<(ObjectInfo, super::Transfer), StoreError> {
        let _lock = self.lock(key)?;
        let (file, st) = self.open(key)?;
        let info = info_of(key, &st);
        if info.etag.as_deref() != Some(etag) {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        set_xattr(&file, XATTR_META, encoded.as_bytes()).map_err(|e| io_err(e, key.as_str()))?;
        file.sync_all().map_err(|e| io_err(e, key.as_str()))?;
        // The ETag does not cover the metadata attribute: the one checked is still the object's.
        Ok((info, super::Transfer { requests: 0, bytes_down: 0, bytes_up: encoded.len() as u64 }))
    }

    /// Writes `head` over the first bytes of the file in place, if the file is still the version `etag` names.
    ///
    /// Why in place rather than staged and renamed like every other write: the rest of the file stays as it is, so
    /// copying it would only cost time. It is still safe against concurrent writers: they never modify a file in
    /// place (they publish a new inode by rename), and the ETag is checked on the very descriptor written to, so a
    /// replaced file is never touched. A head that fits in one 512-byte sector (an object header) is written by the
    /// device in one piece, so a crash leaves the old or the new bytes; a reader that reads those bytes at the very
    /// moment of the write may see a mix and fail that one read (the next read succeeds).
    fn replace_head(&self, key: &ObjectKey, etag: &str, head: &[u8]) -> Result<super::Transfer, StoreError> {
        let _lock = self.lock(key)?;
        let (dir, leaf) = self.locate(key, false)?;
        let file = dir.open_file(&leaf, libc::O_RDWR, 0).map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => StoreError::NotFound { key: key.to_string() },
            _ => io_err(e, key.as_str()),
        })?;
        let st = fstat(&file).map_err(|e| io_err(e, key.as_str()))?;
        if st.kind != Kind::File {
            return Err(StoreError::NotFound { key: key.to_string() });
        }
        if info_of(key, &st).etag.as_deref() != Some(etag) {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        if st.size < head.len() as u64 {
            return Err(StoreError::invalid(format!("{key} is shorter than the {} bytes to replace", head.len())));
        }
        file.write_all_at(head, 0).map_err(|e| io_err(e, key.as_str()))?;
        file.sync_data().map_err(|e| io_err(e, key.as_str()))?;
        Ok(super::Transfer { requests: 0, bytes_down: 0, bytes_up: head.len() as u64 })
    }

    /// Appends bytes `range` of the object at `key` to `out` if the object is still the version `etag` (the local
    /// form of UploadPartCopy), under the key's write lock so no writer changes it meanwhile.
    fn copy_range_into(&self, key: &ObjectKey, range: Range<u64>, etag: &str, mut out: &File) -> Result<(), StoreError> {
        /// Copied through a buffer of this size: large enough to cost few system calls.
        const COPY_BUF_LEN: u64 = 1 << 20;
        let _lock = self.lock(key)?;
        let (dir, leaf) = self.locate(key, false)?;
        let file = dir.open_file(&leaf, libc::O_RDONLY, 0).map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => StoreError::NotFound { key: key.to_string() },
            _ if is_missing(&e) => StoreError::NotFound { key: key.to_string() },
            _ => io_err(e, key.as_str()),
        })?;
        let st = fstat(&file).map_err(|e| io_err(e, key.as_str()))?;
        if st.kind != Kind::File {
            return Err(StoreError::NotFound { key: key.to_string() });
        }
        if info_of(key, &st).etag.as_deref() != Some(etag) {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        if range.start >= range.end || range.end > st.size {
            return Err(StoreError::invalid(format!("{key}: bytes {range:?} are not a range of its {} bytes", st.size)));
        }
        let mut buf = vec![0u8; (range.end - range.start).min(COPY_BUF_LEN) as usize];
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(COPY_BUF_LEN) as usize;
            file.read_exact_at(&mut buf[..n], at).map_err(|e| io_err(e, key.as_str()))?;
            out.write_all(&buf[..n]).map_err(|e| io_err(e, key.as_str()))?;
            at += n as u64;
        }
        Ok(())
    }

    fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let (dir, leaf) = match self.locate(key, false) {
            Ok(found) => found,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let st = match dir.stat(&leaf) {
            Ok(st) => st,
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(io_err(e, key.as_str())),
        };
        let lock = self.lock(key)?;
        let result = if key.is_dir_marker() {
            if st.kind != Kind::Dir {
                return Ok(());
            }
            dir.rmdir(&leaf)
        } else {
            if st.kind != Kind::File {
                return Ok(());
            }
            dir.unlink(&leaf)
        };
        drop(lock);
        match result {
            Ok(()) => dir.sync().map_err(|e| io_err(e, key.as_str())),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                Err(StoreError::NotEmpty {
                    key: key.to_string(),
                })
            }
            Err(e) => Err(io_err(e, key.as_str())),
        }
    }

    /// [`Backend::delete_if`]: the file is checked and removed under the store's write lock, so no publishing write
    /// of this store comes between the check and the removal.
    fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        let missing = || StoreError::NotFound { key: key.to_string() };
        let _lock = self.lock(key)?;
        let (dir, leaf) = self.locate(key, false)?;
        let st = match dir.stat(&leaf) {
            Ok(st) if st.kind == Kind::File && !key.is_dir_marker() => st,
            Ok(_) => return Err(missing()),
            Err(e) if is_missing(&e) => return Err(missing()),
            Err(e) => return Err(io_err(e, key.as_str())),
        };
        if info_of(key, &st).etag.as_deref() != Some(etag) {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        match dir.unlink(&leaf) {
            Ok(()) => dir.sync().map_err(|e| io_err(e, key.as_str())),
            Err(e) if is_missing(&e) => Err(missing()),
            Err(e) => Err(io_err(e, key.as_str())),
        }
    }

    /// Walks the tree with one open directory per level still being listed (a sibling waits for its turn as its
    /// parent's descriptor and its name), so a wide tree does not hold a descriptor per directory.
    fn list(&self, dir: Option<&ObjectKey>, recursive: bool) -> Result<Listing, StoreError> {
        let mut out = Listing::default();
        let dir_str = dir.map(ObjectKey::as_str).unwrap_or("");
        let start = match dir {
            Some(d) => {
                let opened = self
                    .locate(d, false)
                    .and_then(|(parent, leaf)| parent.open_dir(&leaf).map_err(|e| io_err(e, d.as_str())));
                let start = match opened {
                    Ok(start) => start,
                    // A missing directory (or a file where a directory was asked for) lists as
                    // empty, as a prefix without objects does on S3.
                    Err(StoreError::NotFound { .. }) => return Ok(out),
                    Err(e) => return Err(e),
                };
                if recursive {
                    let st = start.stat_self().map_err(|e| io_err(e, dir_str))?;
                    out.objects.push(info_of(d, &st));
                }
                start
            }
            None => self.root_dir.reopen().map_err(|e| io_err(e, ""))?,
        };
        let mut pending = Vec::new();
        list_entries(dir_str, Rc::new(start), recursive, &mut out, &mut pending)?;
        while let Some((rel, parent, name)) = pending.pop() {
            let sub = match parent.open_dir(&name) {
                Ok(sub) => sub,
                // Removed (or replaced) while we walked: nothing left to list there.
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(io_err(e, &rel)),
            };
            drop(parent);
            list_entries(&rel, Rc::new(sub), recursive, &mut out, &mut pending)?;
        }
        sort_listing(&mut out);
        Ok(out)
    }

    fn check_access(&self) -> Result<(), StoreError> {
        self.root_dir.reopen().map_err(|e| io_err(e, ""))?;
        let probe = Staged::new(&self.tmp).map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        probe.discard().map_err(|e| io_err(e, LOCAL_TMP_DIR))
    }
}

/// A subdirectory still to be listed: its key (`a/b/`), its parent and its name there.
type PendingDir = (String, Rc<Dir>, CString);

/// Adds the entries of `dir` (whose key is `rel`, `""` for the root) to `out`; in a recursive listing its
/// subdirectories go to `pending`.
fn list_entries(
    rel: &str,
    dir: Rc<Dir>,
    recursive: bool,
    out: &mut Listing,
    pending: &mut Vec<PendingDir>,
) -> Result<(), StoreError> {
    let names = match dir.names() {
        Ok(names) => names,
        Err(e) if is_missing(&e) => return Ok(()),
        Err(e) => return Err(io_err(e, rel)),
    };
    for name in names {
        let Ok(text) = name.to_str() else {
            tracing::warn!(dir = rel, name = %name.to_string_lossy(), "skipping a file whose name is not UTF-8");
            continue;
        };
        if rel.is_empty() && text == LOCAL_TMP_DIR {
            continue;
        }
        let st = match dir.stat(&name) {
            Ok(st) => st,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(io_err(e, rel)),
        };
        let key_str = match st.kind {
            Kind::Dir => format!("{rel}{text}/"),
            Kind::File => format!("{rel}{text}"),
            // Symlinks, sockets and devices are not objects.
            Kind::Other => continue,
        };
        let key = match ObjectKey::new(key_str) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "skipping a file that is not a valid object key");
                continue;
            }
        };
        match st.kind {
            Kind::Dir if recursive => {
                out.objects.push(info_of(&key, &st));
                pending.push((key.as_str().to_owned(), Rc::clone(&dir), name));
            }
            Kind::Dir => out.prefixes.push(key),
            _ => out.objects.push(info_of(&key, &st)),
        }
    }
    Ok(())
}

/// Opens `leaf` in `dir` for reading as the object `key`: a regular file for plain keys, a directory for markers.
/// Anything else there (the other kind, a symlink, a device) means the object does not exist.
fn open_in(dir: &Dir, leaf: &CStr, key: &ObjectKey) -> Result<(File, Stat), StoreError> {
    let file = dir.open_file(leaf, libc::O_RDONLY, 0).map_err(|e| io_err(e, key.as_str()))?;
    let st = fstat(&file).map_err(|e| io_err(e, key.as_str()))?;
    let right_kind = if key.is_dir_marker() {
        st.kind == Kind::Dir
    } else {
        st.kind == Kind::File
    };
    if !right_kind {
        return Err(StoreError::NotFound {
            key: key.to_string(),
        });
    }
    Ok((file, st))
}

/// The etag of the regular file `leaf` in `dir` now, `None` if there is none.
fn etag_at(dir: &Dir, leaf: &CStr, key: &ObjectKey) -> Result<Option<String>, StoreError> {
    match dir.stat(leaf) {
        Ok(st) if st.kind == Kind::File => Ok(info_of(key, &st).etag),
        Ok(_) => Ok(None),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(io_err(e, key.as_str())),
    }
}

fn is_dir_at(dir: &Dir, leaf: &CStr) -> bool {
    matches!(dir.stat(leaf), Ok(st) if st.kind == Kind::Dir)
}

#[async_trait]
impl Backend for LocalBackend {
    fn copies_parts(&self) -> bool {
        true
    }

    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        let k = key.clone();
        self.run(key.as_str(), move |s| s.head(&k)).await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let k = key.clone();
        self.run(key.as_str(), move |s| s.read(&k, Some(range)))
            .await
    }

    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let k = key.clone();
        self.run(key.as_str(), move |s| s.read(&k, None)).await
    }

    async fn put_expect(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<ObjectInfo, StoreError> {
        let encoded = meta::to_lines(&meta::encode(meta)?);
        let (k, expect) = (key.clone(), expect.clone());
        self.run(key.as_str(), move |s| s.put(&k, &body, &encoded, &expect))
            .await
    }

    async fn put_multipart_expect(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<Box<dyn Upload>, StoreError> {
        if key.is_dir_marker() {
            return Err(StoreError::invalid(format!(
                "directory marker {key} cannot be uploaded in parts"
            )));
        }
        let encoded = meta::to_lines(&meta::encode(meta)?);
        let k = key.clone();
        let file = self.run(key.as_str(), move |s| s.staging_file(&k)).await?;
        Ok(Box::new(LocalUpload {
            backend: self.clone(),
            key: key.clone(),
            encoded,
            expect: expect.clone(),
            file: Some(file),
        }))
    }

    /// Removes the staged file of a multipart upload a crash left in the staging directory (the id is its name, as
    /// [`Staged::new`] draws it; anything else is refused). Already gone (completed, or removed) is success.
    async fn abort_multipart(&self, key: &ObjectKey, upload_id: &str) -> Result<(), StoreError> {
        let hex = upload_id.strip_prefix(".put-").unwrap_or_default();
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::invalid(format!("{upload_id:?} names no multipart upload of {key} here")));
        }
        let name = CString::new(upload_id).expect("invariant broken: a checked hex name holds no NUL");
        let k = key.clone();
        self.run(key.as_str(), move |s| match s.tmp.unlink(&name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(e, k.as_str())),
        })
        .await
    }

    async fn copy(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
    ) -> Result<(), StoreError> {
        check_same_kind(from, to)?;
        let encoded = encode_opt(meta)?;
        let (f, t) = (from.clone(), to.clone());
        self.run(from.as_str(), move |s| s.copy(&f, &t, encoded.as_deref()))
            .await
    }

    async fn rename(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
    ) -> Result<(), StoreError> {
        check_same_kind(from, to)?;
        let encoded = encode_opt(meta)?;
        let (f, t) = (from.clone(), to.clone());
        self.run(from.as_str(), move |s| s.rename(&f, &t, encoded.as_deref()))
            .await
    }

    /// A rename here is one step under the store's lock: there is no moment between a copy and a delete.
    async fn rename_if(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
        etag: &str,
    ) -> Result<bool, StoreError> {
        let _ = etag;
        self.rename(from, to, meta).await.map(|()| true)
    }

    async fn update_meta(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
    ) -> Result<ObjectInfo, StoreError> {
        let encoded = meta::to_lines(&meta::encode(meta)?);
        let k = key.clone();
        self.run(key.as_str(), move |s| s.update_meta(&k, &encoded))
            .await
    }

    async fn update_meta_if(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        etag: &str,
    ) -> Result<(ObjectInfo, super::Transfer), StoreError> {
        let encoded = meta::to_lines(&meta::encode(meta)?);
        let (k, etag) = (key.clone(), etag.to_string());
        self.run(key.as_str(), move |s| s.update_meta_if(&k, &encoded, &etag)).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let k = key.clone();
        self.run(key.as_str(), move |s| s.delete(&k)).await
    }

    async fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        let (k, etag) = (key.clone(), etag.to_string());
        self.run(key.as_str(), move |s| s.delete_if(&k, &etag)).await
    }

    /// The condition is checked under the store's write lock.
    fn deletes_are_conditional(&self) -> bool {
        true
    }

    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
        let d = check_dir(dir)?;
        self.run(dir, move |s| s.list(d.as_ref(), recursive)).await
    }

    async fn check_access(&self) -> Result<(), StoreError> {
        self.run("", |s| s.check_access()).await
    }

    fn max_path_len(&self, _dir: bool) -> usize {
        // Not PATH_MAX less the root: objects are reached name by name (see LOCAL_MAX_PATH_LEN for the bound).
        LOCAL_MAX_PATH_LEN
    }

    fn heads_are_cheap(&self) -> bool {
        true // a stat and a getxattr: no directory index needed (see fs::dirindex)
    }

    async fn replace_head(&self, key: &ObjectKey, etag: &str, head: Bytes) -> Result<super::Transfer, StoreError> {
        if key.is_dir_marker() {
            return Err(StoreError::invalid(format!("directory marker {key} has no content to replace")));
        }
        let (k, etag) = (key.clone(), etag.to_string());
        self.run(key.as_str(), move |s| s.replace_head(&k, &etag, &head)).await
    }
}

/// The xattr form of optional new metadata (None: keep what the object has).
fn encode_opt(meta: Option<&UserMeta>) -> Result<Option<String>, StoreError> {
    meta.map(|m| meta::encode(m).map(|map| meta::to_lines(&map))).transpose()
}

/// A multipart upload: parts are appended to one staged file, published on `complete`.
struct LocalUpload {
    backend: LocalBackend,
    key: ObjectKey,
    encoded: String,
    /// Checked when the staged file is published.
    expect: Expect,
    /// `None` once a part failed to write; the staged file was dropped (and deleted) then.
    file: Option<Staged>,
}

impl LocalUpload {
    fn take_file(&mut self) -> Result<Staged, StoreError> {
        self.file.take().ok_or_else(|| {
            StoreError::invalid(format!(
                "upload of {} cannot continue after an earlier part failed",
                self.key
            ))
        })
    }
}

#[async_trait]
impl Upload for LocalUpload {
    fn copies_parts(&self) -> bool {
        true
    }

    /// The staged file's name: what [`Backend::abort_multipart`] removes after a crash.
    fn upload_id(&self) -> Option<String> {
        self.file.as_ref().map(|f| f.name().to_string_lossy().into_owned())
    }

    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        // A local append is a page-cache copy: done right here, in order, so the returned future is already
        // complete and part order needs no bookkeeping.
        let result = self.take_file().and_then(|staged| {
            (&staged.file).write_all(&part).map_err(|e| io_err(e, self.key.as_str()))?;
            self.file = Some(staged);
            Ok(())
        });
        Box::pin(futures::future::ready(result))
    }

    fn copy_part(&mut self, range: Range<u64>, etag: &str) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        // Like put_part: a page-cache copy, done here and in order.
        let result = self.take_file().and_then(|staged| {
            self.backend.inner.copy_range_into(&self.key, range, etag, &staged.file)?;
            self.file = Some(staged);
            Ok(())
        });
        Box::pin(futures::future::ready(result))
    }

    async fn complete(mut self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        let file = self.take_file()?;
        let (key, encoded) = (self.key.clone(), std::mem::take(&mut self.encoded));
        let expect = self.expect.clone();
        self.backend
            .run(self.key.as_str(), move |s| {
                set_xattr(&file.file, XATTR_META, encoded.as_bytes())
                    .map_err(|e| io_err(e, key.as_str()))?;
                s.publish(&key, file, &expect)
            })
            .await
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StoreError> {
        if let Some(file) = self.file.take() {
            let key = self.key.clone();
            self.backend
                .run(self.key.as_str(), move |_| {
                    file.discard().map_err(|e| io_err(e, key.as_str()))
                })
                .await?;
        }
        Ok(())
    }
}

fn check_same_kind(from: &ObjectKey, to: &ObjectKey) -> Result<(), StoreError> {
    if from.is_dir_marker() == to.is_dir_marker() {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "cannot copy or rename {from} to {to}: one is a directory marker and the other is not"
        )))
    }
}

fn info_of(key: &ObjectKey, st: &Stat) -> ObjectInfo {
    let size = st.size;
    let mtime_ns = i128::from(st.mtime.0) * 1_000_000_000 + i128::from(st.mtime.1);
    ObjectInfo {
        key: key.clone(),
        size,
        etag: Some(format!("{:x}-{:x}-{:x}", st.ino, size, mtime_ns)),
        last_modified: st.modified(),
    }
}

/// The stored metadata text as is, so copies carry it over byte for byte (even fields written
/// by hand that would not pass `meta::encode`'s checks).
/// A rename in progress (see the module docs): the source's inode, key and metadata before the rename.
#[derive(serde::Serialize, serde::Deserialize)]
struct Intent {
    ino: u64,
    from: String,
    /// Hex of the metadata attribute's bytes.
    old: String,
}

fn raw_meta(file: &File, key: &ObjectKey) -> Result<String, StoreError> {
    let raw = get_xattr(file, XATTR_META).map_err(|e| io_err(e, key.as_str()))?;
    Ok(raw
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default())
}

fn read_meta(file: &File, key: &ObjectKey) -> Result<UserMeta, StoreError> {
    match get_xattr(file, XATTR_META).map_err(|e| io_err(e, key.as_str()))? {
        // Files put there by hand have no metadata; that is not an error.
        None => Ok(UserMeta::default()),
        Some(raw) => {
            let text = String::from_utf8_lossy(&raw);
            Ok(meta::from_lines(&text))
        }
    }
}

/// A file where a directory is needed: S3 allows `a` and `a/b` side by side, a directory
/// cannot, so say so instead of a bare errno.
fn conflict_or_io(e: io::Error, key: &ObjectKey) -> StoreError {
    match e.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTDIR) => StoreError::invalid(format!(
            "cannot store {key}: a file is in the way of one of its directories in the local store"
        )),
        _ => io_err(e, key.as_str()),
    }
}

/// Nothing, or nothing we follow, at a name: ENOTDIR is a file (or a symlink, with `O_DIRECTORY | O_NOFOLLOW`)
/// where a directory was looked for, ELOOP a symlink opened with `O_NOFOLLOW`.
fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP))
}

fn io_err(e: io::Error, key: &str) -> StoreError {
    if is_missing(&e) {
        return StoreError::NotFound {
            key: key.to_owned(),
        };
    }
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => StoreError::AccessDenied {
            key: key.to_owned(),
            detail: e.to_string(),
        },
        // Only a single name can be too long: whole paths are never handed to the kernel.
        Some(libc::ENAMETOOLONG) => StoreError::NameTooLong { key: key.to_owned(), max: NAME_MAX },
        None if e.kind() == io::ErrorKind::InvalidInput => StoreError::invalid(format!("key {key:?}: {e}")),
        _ => StoreError::other(key, e),
    }
}

fn set_xattr(file: &File, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call, `name` is NUL-terminated, and
    // `value` points to `value.len()` readable bytes.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `Ok(None)` when the attribute is absent.
fn get_xattr(file: &File, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; XATTR_BUF_LEN];
    // A few rounds: the value may grow between the size query and the read.
    for _ in 0..3 {
        // SAFETY: the fd is open, `name` is NUL-terminated, `buf` has `buf.len()` writable bytes.
        let n = unsafe {
            libc::fgetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) => {
                // SAFETY: a size query with a null buffer and length 0 writes nothing.
                let need = unsafe {
                    libc::fgetxattr(file.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0)
                };
                if need < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf.resize(need as usize, 0);
            }
            _ => return Err(err),
        }
    }
    Err(io::Error::other(
        "extended attribute kept changing size while being read",
    ))
}

#[cfg(test)]
pub(crate) fn raw_meta_for_test(path: &Path) -> Option<String> {
    let file = File::open(path).ok()?;
    get_xattr(&file, XATTR_META)
        .ok()?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

#[cfg(test)]
mod intent_tests {
    use super::*;

    /// A crash between writing a rename's new metadata and the rename itself: the state that leaves on disk is made
    /// by hand (intent written, new metadata set, no rename), then the store is opened again. The source must have
    /// its old metadata back (it used to keep the new one: a path binding that named the target, so EIO as a swap),
    /// and the intent must be gone.
    #[test]
    fn a_rename_interrupted_before_the_rename_is_undone_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::new(dir.path()).unwrap();
        let from = ObjectKey::new("a/f").unwrap();
        store.inner.put(&from, b"content", "s3cryptfs-bind=for-a-f\n", &Expect::Any).unwrap();
        let (d, leaf) = store.inner.locate(&from, false).unwrap();
        let (file, st) = open_in(&d, &leaf, &from).unwrap();
        let old = get_xattr(&file, XATTR_META).unwrap().unwrap();
        store.inner.write_intent(&from, st.ino, &old).unwrap();
        set_xattr(&file, XATTR_META, b"s3cryptfs-bind=for-b-g\n").unwrap();
        drop((file, store));

        let store = LocalBackend::new(dir.path()).unwrap();
        let (file, _) = open_in(&d, &leaf, &from).unwrap();
        assert_eq!(get_xattr(&file, XATTR_META).unwrap().unwrap(), old);
        let left: Vec<_> = store.inner.tmp.names().unwrap().into_iter().filter(|n| n.to_string_lossy().contains("intent")).collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// An intent whose rename did happen (the crash came after it) changes nothing: the target keeps its new
    /// metadata, and a new file that took the old name since is not touched (another inode).
    #[test]
    fn an_intent_of_a_completed_rename_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::new(dir.path()).unwrap();
        let (from, to) = (ObjectKey::new("f").unwrap(), ObjectKey::new("g").unwrap());
        store.inner.put(&from, b"one", "m=old\n", &Expect::Any).unwrap();
        let (d, leaf) = store.inner.locate(&from, false).unwrap();
        let (file, st) = open_in(&d, &leaf, &from).unwrap();
        store.inner.write_intent(&from, st.ino, b"m=old\n").unwrap();
        drop(file);
        // The rename (without its own intent handling) and a new file under the old name.
        store.inner.rename(&from, &to, None).unwrap();
        store.inner.update_meta(&to, "m=new\n").unwrap();
        store.inner.put(&from, b"two", "m=newcomer\n", &Expect::Absent).unwrap();
        drop(store);

        let store = LocalBackend::new(dir.path()).unwrap();
        let meta = |k: &ObjectKey| {
            let (d, leaf) = store.inner.locate(k, false).unwrap();
            let (f, _) = open_in(&d, &leaf, k).unwrap();
            get_xattr(&f, XATTR_META).unwrap().unwrap()
        };
        assert_eq!(meta(&to), b"m=new\n");
        assert_eq!(meta(&from), b"m=newcomer\n");
    }
}
