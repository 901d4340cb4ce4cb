//! [`Backend`] over an ordinary directory (`file:///abs/dir`), for use without S3 and in tests.
//!
//! Layout under the root:
//! - the object `a/b/c` is the regular file `<root>/a/b/c`;
//! - the marker `a/b/` is the directory `<root>/a/b`: it exists exactly when the directory does,
//!   so every parent of a file is an (implicit) marker, unlike S3;
//! - metadata is one extended attribute, `user.s3cryptfs.meta`, holding `name=value` lines with
//!   the same names S3 uses (see `meta.rs`); on directories it holds the marker's metadata;
//! - `<root>/.s3cryptfs-tmp/` (mode 0700) stages writes and is never listed. Stale files left
//!   there by a crash are harmless and may be deleted while no mount uses the root.
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
//! Keys are validated by [`ObjectKey`] (no `..`, no leading `/`, no NUL), and the final path
//! component is opened with `O_NOFOLLOW`; the root itself is trusted not to contain symlinks
//! planted in intermediate directories. All std::fs calls run under `spawn_blocking`.

use std::ffi::CStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use tempfile::NamedTempFile;

use super::error::StoreError;
use super::meta;
use super::{
    check_dir, sort_listing, Backend, Expect, Listing, ObjectInfo, ObjectKey, Upload, UserMeta,
    LOCAL_TMP_DIR,
};

/// The one xattr holding an object's metadata.
const XATTR_META: &CStr = c"user.s3cryptfs.meta";
/// Written once at construction to learn whether the filesystem takes user xattrs at all.
const XATTR_PROBE: &CStr = c"user.s3cryptfs.probe";
/// First guess for the xattr buffer; metadata is capped at 2 KiB of names and values, so one
/// page almost always suffices and ERANGE handles the rest.
const XATTR_BUF_LEN: usize = 4096;
/// The lock file in the staging directory that serialises the final step of every write (see the module docs).
const WRITE_LOCK_FILE: &str = "write.lock";

/// A directory holding objects as files; cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    tmp: PathBuf,
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
        if !root.is_dir() {
            return Err(StoreError::invalid(format!(
                "the local store path {} is not a directory",
                root.display()
            )));
        }
        let tmp = root.join(LOCAL_TMP_DIR);
        match fs::DirBuilder::new().mode(0o700).create(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tmp.is_dir() => {}
            Err(e) => return Err(io_err(e, LOCAL_TMP_DIR)),
        }
        let probe = NamedTempFile::new_in(&tmp).map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        match set_xattr(probe.as_file(), XATTR_PROBE, b"1") {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                return Err(StoreError::XattrUnsupported { root });
            }
            Err(e) => return Err(io_err(e, LOCAL_TMP_DIR)),
        }
        let write_lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(tmp.join(WRITE_LOCK_FILE))
            .map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        Ok(LocalBackend {
            inner: Arc::new(Inner { root, tmp, write_lock: Mutex::new(write_lock) }),
        })
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

impl Inner {
    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.trimmed())
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

    /// The etag of the regular file at `key`'s path now, `None` if there is none.
    fn current_etag(&self, key: &ObjectKey) -> Result<Option<String>, StoreError> {
        match fs::symlink_metadata(self.path(key)) {
            Ok(md) if md.is_file() => Ok(info_of(key, &md).etag),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(io_err(e, key.as_str())),
        }
    }

    /// Open an existing object: a regular file for plain keys, a directory for markers.
    /// Anything else at that path (the other kind, a symlink) means the object does not exist.
    fn open(&self, key: &ObjectKey) -> Result<(File, Metadata), StoreError> {
        let path = self.path(key);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => StoreError::NotFound {
                    key: key.to_string(),
                },
                _ => io_err(e, key.as_str()),
            })?;
        let md = file.metadata().map_err(|e| io_err(e, key.as_str()))?;
        let right_kind = if key.is_dir_marker() {
            md.is_dir()
        } else {
            md.is_file()
        };
        if !right_kind {
            return Err(StoreError::NotFound {
                key: key.to_string(),
            });
        }
        Ok((file, md))
    }

    fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        let (file, md) = self.open(key)?;
        let meta = read_meta(&file, key)?;
        Ok((info_of(key, &md), meta))
    }

    fn read(
        &self,
        key: &ObjectKey,
        range: Option<Range<u64>>,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let (file, md) = self.open(key)?;
        let meta = read_meta(&file, key)?;
        let info = info_of(key, &md);
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

    fn staging_file(&self, key: &ObjectKey) -> Result<NamedTempFile, StoreError> {
        tempfile::Builder::new()
            .prefix(".put-")
            .tempfile_in(&self.tmp)
            .map_err(|e| io_err(e, key.as_str()))
    }

    /// fsync, move the staged file to `key`'s path if `expect` holds (see the module docs), make the rename durable.
    fn publish(&self, key: &ObjectKey, staged: NamedTempFile, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        let path = self.path(key);
        staged
            .as_file()
            .sync_all()
            .map_err(|e| io_err(e, key.as_str()))?;
        mkdir_parents(&path, key)?;
        let dir_in_the_way = || {
            StoreError::invalid(format!("cannot store {key}: a directory of that name exists in the local store"))
        };
        let persisted = {
            let _lock = self.lock(key)?;
            match expect {
                Expect::Any => staged.persist(&path),
                Expect::Absent => staged.persist_noclobber(&path),
                Expect::Etag(want) => {
                    if self.current_etag(key)?.as_deref() != Some(want.as_str()) {
                        return Err(StoreError::Precondition { key: key.to_string() });
                    }
                    staged.persist(&path)
                }
            }
        };
        let file = persisted.map_err(|e| match e.error.raw_os_error() {
            Some(libc::EEXIST) if *expect == Expect::Absent && !path.is_dir() => {
                StoreError::Precondition { key: key.to_string() }
            }
            Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => dir_in_the_way(),
            _ => io_err(e.error, key.as_str()),
        })?;
        sync_parent(&path, key)?;
        let md = file.metadata().map_err(|e| io_err(e, key.as_str()))?;
        Ok(info_of(key, &md))
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
        let mut staged = self.staging_file(key)?;
        staged
            .write_all(body)
            .map_err(|e| io_err(e, key.as_str()))?;
        set_xattr(staged.as_file(), XATTR_META, encoded.as_bytes())
            .map_err(|e| io_err(e, key.as_str()))?;
        self.publish(key, staged, expect)
    }

    /// A marker is its directory: created if missing, its xattr set, under the write lock so that `expect` is
    /// checked against the directory as it is while the metadata is written.
    fn put_marker(&self, key: &ObjectKey, encoded: &str, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        let path = self.path(key);
        mkdir_parents(&path, key)?;
        let lock = self.lock(key)?;
        let precondition = || StoreError::Precondition { key: key.to_string() };
        match (expect, fs::create_dir(&path)) {
            (Expect::Etag(_), Ok(())) => {
                // It was not there, so it was not the version asked for: undo (it is empty, just made).
                let _ = fs::remove_dir(&path);
                return Err(precondition());
            }
            (_, Ok(())) => {}
            (_, Err(e)) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => match expect {
                Expect::Any => {}
                Expect::Absent => return Err(precondition()),
                Expect::Etag(want) => {
                    let (_, md) = self.open(key)?;
                    if info_of(key, &md).etag.as_deref() != Some(want.as_str()) {
                        return Err(precondition());
                    }
                }
            },
            (_, Err(e)) => return Err(conflict_or_io(e, key)),
        }
        let (dir, _) = self.open(key)?;
        set_xattr(&dir, XATTR_META, encoded.as_bytes()).map_err(|e| io_err(e, key.as_str()))?;
        drop(lock);
        dir.sync_all().map_err(|e| io_err(e, key.as_str()))?;
        sync_parent(&path, key)?;
        let md = dir.metadata().map_err(|e| io_err(e, key.as_str()))?;
        Ok(info_of(key, &md))
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
        io::copy(&mut src, staged.as_file_mut()).map_err(|e| io_err(e, from.as_str()))?;
        set_xattr(staged.as_file(), XATTR_META, encoded.as_bytes())
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
        let (src, _) = self.open(from)?;
        // Set the new metadata before the rename so the object never appears under its new name
        // with stale metadata; a crash in between leaves the old name with the new metadata.
        if let Some(e) = encoded {
            set_xattr(&src, XATTR_META, e.as_bytes()).map_err(|e| io_err(e, from.as_str()))?;
        }
        drop(src);
        let (src_path, dst_path) = (self.path(from), self.path(to));
        mkdir_parents(&dst_path, to)?;
        let lock = self.lock(from)?;
        let renamed = fs::rename(&src_path, &dst_path);
        drop(lock);
        renamed.map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => StoreError::invalid(
                format!("cannot rename {from} to {to}: a directory of that name exists in the local store"),
            ),
            _ => io_err(e, from.as_str()),
        })?;
        sync_parent(&dst_path, to)?;
        sync_parent(&src_path, from)
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
        let (src, _) = self.open(from)?;
        let encoded = match encoded {
            Some(e) => e.to_owned(),
            None => raw_meta(&src, from)?,
        };
        drop(src);
        if from == to {
            self.put_marker(to, &encoded, &Expect::Any)?;
            return Ok(());
        }
        let src_path = self.path(from);
        let has_entries = fs::read_dir(&src_path)
            .map_err(|e| io_err(e, from.as_str()))?
            .next()
            .is_some();
        if has_entries {
            return Err(StoreError::NotEmpty {
                key: from.to_string(),
            });
        }
        self.put_marker(to, &encoded, &Expect::Any)?;
        self.delete(from)
    }

    fn update_meta(&self, key: &ObjectKey, encoded: &str) -> Result<ObjectInfo, StoreError> {
        let (file, md) = self.open(key)?;
        set_xattr(&file, XATTR_META, encoded.as_bytes()).map_err(|e| io_err(e, key.as_str()))?;
        file.sync_all().map_err(|e| io_err(e, key.as_str()))?;
        Ok(info_of(key, &md))
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.path(key))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EISDIR) => StoreError::NotFound { key: key.to_string() },
                _ => io_err(e, key.as_str()),
            })?;
        let md = file.metadata().map_err(|e| io_err(e, key.as_str()))?;
        if !md.is_file() {
            return Err(StoreError::NotFound { key: key.to_string() });
        }
        if info_of(key, &md).etag.as_deref() != Some(etag) {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        if md.len() < head.len() as u64 {
            return Err(StoreError::invalid(format!("{key} is shorter than the {} bytes to replace", head.len())));
        }
        file.write_all_at(head, 0).map_err(|e| io_err(e, key.as_str()))?;
        file.sync_data().map_err(|e| io_err(e, key.as_str()))?;
        Ok(super::Transfer { requests: 0, bytes_down: 0, bytes_up: head.len() as u64 })
    }

    fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path(key);
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(io_err(e, key.as_str())),
        };
        let lock = self.lock(key)?;
        let result = if key.is_dir_marker() {
            if !md.is_dir() {
                return Ok(());
            }
            fs::remove_dir(&path)
        } else {
            if !md.is_file() {
                return Ok(());
            }
            fs::remove_file(&path)
        };
        drop(lock);
        match result {
            Ok(()) => sync_parent(&path, key),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                Err(StoreError::NotEmpty {
                    key: key.to_string(),
                })
            }
            Err(e) => Err(io_err(e, key.as_str())),
        }
    }

    fn list(&self, dir: Option<&ObjectKey>, recursive: bool) -> Result<Listing, StoreError> {
        let mut out = Listing::default();
        let dir_str = dir.map(ObjectKey::as_str).unwrap_or("");
        let start = match dir {
            Some(d) => {
                match fs::symlink_metadata(self.path(d)) {
                    Ok(md) if md.is_dir() => {
                        if recursive {
                            out.objects.push(info_of(d, &md));
                        }
                    }
                    // A missing directory (or a file where a directory was asked for) lists as
                    // empty, as a prefix without objects does on S3.
                    Ok(_) => return Ok(out),
                    Err(e) if is_missing(&e) => return Ok(out),
                    Err(e) => return Err(io_err(e, dir_str)),
                }
                self.path(d)
            }
            None => self.root.clone(),
        };
        let mut pending = vec![(dir_str.to_owned(), start)];
        while let Some((rel, path)) = pending.pop() {
            let entries = match fs::read_dir(&path) {
                Ok(it) => it,
                // Removed while we walked: nothing left to list there.
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(io_err(e, &rel)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_err(e, &rel))?;
                let Ok(name) = entry.file_name().into_string() else {
                    tracing::warn!(dir = %path.display(), "skipping a file whose name is not UTF-8");
                    continue;
                };
                if rel.is_empty() && name == LOCAL_TMP_DIR {
                    continue;
                }
                let md = match entry.metadata() {
                    Ok(md) => md,
                    Err(e) if is_missing(&e) => continue,
                    Err(e) => return Err(io_err(e, &rel)),
                };
                let key_str = if md.is_dir() {
                    format!("{rel}{name}/")
                } else if md.is_file() {
                    format!("{rel}{name}")
                } else {
                    // Symlinks, sockets and devices are not objects.
                    continue;
                };
                let key = match ObjectKey::new(key_str) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping a file that is not a valid object key");
                        continue;
                    }
                };
                if md.is_dir() {
                    if recursive {
                        out.objects.push(info_of(&key, &md));
                        pending.push((key.as_str().to_owned(), entry.path()));
                    } else {
                        out.prefixes.push(key);
                    }
                } else {
                    out.objects.push(info_of(&key, &md));
                }
            }
        }
        sort_listing(&mut out);
        Ok(out)
    }

    fn check_access(&self) -> Result<(), StoreError> {
        fs::read_dir(&self.root).map_err(|e| io_err(e, ""))?;
        let probe = NamedTempFile::new_in(&self.tmp).map_err(|e| io_err(e, LOCAL_TMP_DIR))?;
        drop(probe);
        Ok(())
    }
}

#[async_trait]
impl Backend for LocalBackend {
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

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let k = key.clone();
        self.run(key.as_str(), move |s| s.delete(&k)).await
    }

    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
        let d = check_dir(dir)?;
        self.run(dir, move |s| s.list(d.as_ref(), recursive)).await
    }

    async fn check_access(&self) -> Result<(), StoreError> {
        self.run("", |s| s.check_access()).await
    }

    fn max_path_len(&self, _dir: bool) -> usize {
        // Objects are reached by whole paths under the root: PATH_MAX (with its NUL) less the root and a '/'.
        (libc::PATH_MAX as usize - 1).saturating_sub(self.inner.root.as_os_str().len() + 1)
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
    file: Option<NamedTempFile>,
}

impl LocalUpload {
    fn take_file(&mut self) -> Result<NamedTempFile, StoreError> {
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
    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        // A local append is a page-cache copy: done right here, in order, so the returned future is already
        // complete and part order needs no bookkeeping.
        let result = self.take_file().and_then(|mut file| {
            file.write_all(&part).map_err(|e| io_err(e, self.key.as_str()))?;
            self.file = Some(file);
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
                set_xattr(file.as_file(), XATTR_META, encoded.as_bytes())
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
                    file.close().map_err(|e| io_err(e, key.as_str()))
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

fn info_of(key: &ObjectKey, md: &Metadata) -> ObjectInfo {
    let size = if md.is_dir() { 0 } else { md.len() };
    let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
    ObjectInfo {
        key: key.clone(),
        size,
        etag: Some(format!("{:x}-{:x}-{:x}", md.ino(), size, mtime_ns)),
        last_modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// The stored metadata text as is, so copies carry it over byte for byte (even fields written
/// by hand that would not pass `meta::encode`'s checks).
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

fn mkdir_parents(path: &Path, key: &ObjectKey) -> Result<(), StoreError> {
    match path.parent() {
        Some(parent) => fs::create_dir_all(parent).map_err(|e| conflict_or_io(e, key)),
        None => Ok(()),
    }
}

/// Durably record a create/rename/unlink in `path`'s directory.
fn sync_parent(path: &Path, key: &ObjectKey) -> Result<(), StoreError> {
    match path.parent() {
        Some(parent) => File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(e, key.as_str())),
        None => Ok(()),
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

fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
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
        Some(libc::ENAMETOOLONG) => {
            StoreError::invalid(format!("key {key:?} is too long for the local filesystem"))
        }
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
