//! Directories and files the journal may trust, checked the way ssh's StrictModes checks `~/.ssh`.
//!
//! Why: recovery uploads whatever the journal says to the store, encrypted under the user's key. If another local
//! user could put a directory or a record where a start looks, they could make root's next mount write any content
//! to any path with any mode (a setuid-root file, say). So nothing is trusted by its path alone:
//! - the base directory is resolved once (symlinks in the configured path are followed then, as ssh does), then every
//!   component is opened from `/` with `O_NOFOLLOW`, and each must be owned by root or by us and not writable by
//!   group or others unless it is sticky (like `/tmp`, where others cannot rename what we own);
//! - the base itself, and every directory and file under it, must be ours and not writable by group or others;
//! - everything below the base is reached with `openat`/`mkdirat`/`unlinkat` relative to an open descriptor, with
//!   `O_NOFOLLOW`, so a symlink or a swapped directory planted after the check is never followed.
//!
//! Anything that fails a check is an error naming the path and the fix; the journal refuses to start on it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Why a journal directory or file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path} is owned by uid {owner}, not by uid {me} (who runs this mount): refusing to trust it; remove it, or choose another journal directory with -o staging_dir=DIR")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is writable by group or others (mode {mode:o}): refusing to trust it; run `chmod go-w {path}` or choose another journal directory with -o staging_dir=DIR")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} is a symbolic link or not a {expected}: refusing to trust it; remove it, or choose another journal directory with -o staging_dir=DIR")]
    WrongType { path: PathBuf, expected: &'static str },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path, source: io::Error) -> TrustError {
    if source.raw_os_error() == Some(libc::ELOOP) || source.raw_os_error() == Some(libc::ENOTDIR) {
        return TrustError::WrongType { path: path.to_path_buf(), expected: "directory" };
    }
    TrustError::Io { path: path.to_path_buf(), source }
}

fn cstr(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a plain file name: {name:?}")));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a file name with a NUL byte"))
}

fn fstat(fd: i32) -> io::Result<libc::stat> {
    // SAFETY: fstat writes into the zeroed struct we own; fd is an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The rule for the base and everything under it: ours, and not writable by anyone else.
fn check_ours(path: &Path, st: &libc::stat, dir: bool) -> Result<(), TrustError> {
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    if (dir && !is_dir) || (!dir && !is_file) {
        return Err(TrustError::WrongType { path: path.to_path_buf(), expected: if dir { "directory" } else { "regular file" } });
    }
    if st.st_uid != euid() {
        return Err(TrustError::NotOwned { path: path.to_path_buf(), owner: st.st_uid, me: euid() });
    }
    if st.st_mode & 0o022 != 0 {
        return Err(TrustError::Writable { path: path.to_path_buf(), mode: st.st_mode & 0o7777 });
    }
    // A file with several links could be changed through another name in a directory we do not control.
    if !dir && st.st_nlink > 1 {
        return Err(TrustError::WrongType { path: path.to_path_buf(), expected: "regular file with one link" });
    }
    Ok(())
}

/// The rule for the ancestors of the base: owned by root or us, and not writable by others unless sticky.
fn check_ancestor(path: &Path, st: &libc::stat) -> Result<(), TrustError> {
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(TrustError::WrongType { path: path.to_path_buf(), expected: "directory" });
    }
    if st.st_uid != 0 && st.st_uid != euid() {
        return Err(TrustError::NotOwned { path: path.to_path_buf(), owner: st.st_uid, me: euid() });
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & libc::S_ISVTX == 0 {
        return Err(TrustError::Writable { path: path.to_path_buf(), mode: st.st_mode & 0o7777 });
    }
    Ok(())
}

fn open_dir_at(parent: i32, name: &CString) -> io::Result<OwnedFd> {
    // SAFETY: openat with a valid descriptor and a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(parent, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir_at(parent: i32, name: &CString) -> io::Result<()> {
    // SAFETY: as for openat.
    if unsafe { libc::mkdirat(parent, name.as_ptr(), 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why [`Dir::unnamed_file`] could not make an unnamed file.
enum Unnamed {
    /// Unnamed files cannot be made here (no `O_TMPFILE` on the filesystem): a named file removed at once instead.
    Unusable,
    /// The call itself failed (the disk is full, no descriptor or memory left): the same would happen with a name.
    Failed(io::Error),
}

impl Unnamed {
    fn of(e: io::Error) -> Unnamed {
        // ENOENT is the directory gone, unless it is /proc that is missing.
        let no_proc = e.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self/fd").exists();
        match e.raw_os_error() {
            Some(
                libc::EEXIST
                | libc::ENOSPC
                | libc::EDQUOT
                | libc::EIO
                | libc::EROFS
                | libc::ENOENT
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM,
            ) if !no_proc => Unnamed::Failed(e),
            _ => Unnamed::Unusable,
        }
    }
}

/// An open directory that passed the checks.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens (creating it 0700 if missing, with any missing parents) the journal base `path` and checks it and its
    /// ancestors.
    pub fn open_base(path: &Path) -> Result<Dir, TrustError> {
        if !path.is_absolute() {
            return Err(TrustError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the journal directory must be an absolute path"),
            });
        }
        // Resolve the part that exists (as ssh resolves ~ before checking); the walk below then follows no links.
        let mut existing = path.to_path_buf();
        let mut missing = Vec::new();
        while std::fs::symlink_metadata(&existing).is_err() {
            match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
                (Some(n), Some(p)) => {
                    missing.push(n);
                    existing = p.to_path_buf();
                }
                _ => break,
            }
        }
        let mut full = std::fs::canonicalize(&existing).map_err(|e| io_err(&existing, e))?;
        for n in missing.iter().rev() {
            full.push(n);
        }
        let root = CString::new("/").map_err(|e| io_err(path, io::Error::other(e)))?;
        // SAFETY: as for openat.
        let fd = unsafe { libc::open(root.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io_err(Path::new("/"), io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by open.
        let mut cur = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut cur_path = PathBuf::from("/");
        check_ancestor(&cur_path, &fstat(cur.as_raw_fd()).map_err(|e| io_err(&cur_path, e))?)?;
        let comps: Vec<String> = full
            .components()
            .skip(1)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        for (i, comp) in comps.iter().enumerate() {
            cur_path.push(comp);
            let name = cstr(comp).map_err(|e| io_err(&cur_path, e))?;
            let next = match open_dir_at(cur.as_raw_fd(), &name) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match mkdir_at(cur.as_raw_fd(), &name) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(io_err(&cur_path, e)),
                    }
                    open_dir_at(cur.as_raw_fd(), &name).map_err(|e| io_err(&cur_path, e))?
                }
                Err(e) => return Err(io_err(&cur_path, e)),
            };
            let st = fstat(next.as_raw_fd()).map_err(|e| io_err(&cur_path, e))?;
            if i + 1 == comps.len() {
                check_ours(&cur_path, &st, true)?;
                if st.st_mode & 0o055 != 0 {
                    // Everything made under it is 0700 or 0600, so others can read no content; only names.
                    tracing::warn!(
                        path = %cur_path.display(),
                        mode = format!("{:o}", st.st_mode & 0o7777),
                        "other users can list this directory: they see the names in it (hashes of store URLs, \
                         run numbers), not their contents; `chmod 700` it to hide them"
                    );
                }
            } else {
                check_ancestor(&cur_path, &st)?;
            }
            cur = next;
        }
        Ok(Dir { fd: cur, path: cur_path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checked subdirectory `name`, created (0700) if `create`; `None` if it does not exist and not `create`.
    pub fn subdir(&self, name: &str, create: bool) -> Result<Option<Dir>, TrustError> {
        let path = self.path.join(name);
        let c = cstr(name).map_err(|e| io_err(&path, e))?;
        let fd = match open_dir_at(self.fd.as_raw_fd(), &c) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                match mkdir_at(self.fd.as_raw_fd(), &c) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(io_err(&path, e)),
                }
                open_dir_at(self.fd.as_raw_fd(), &c).map_err(|e| io_err(&path, e))?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(io_err(&path, e)),
        };
        check_ours(&path, &fstat(fd.as_raw_fd()).map_err(|e| io_err(&path, e))?, true)?;
        Ok(Some(Dir { fd, path }))
    }

    /// Creates the subdirectory `name` (0700), failing if it exists.
    pub fn create_subdir(&self, name: &str) -> Result<Dir, TrustError> {
        let path = self.path.join(name);
        let c = cstr(name).map_err(|e| io_err(&path, e))?;
        mkdir_at(self.fd.as_raw_fd(), &c).map_err(|e| io_err(&path, e))?;
        let fd = open_dir_at(self.fd.as_raw_fd(), &c).map_err(|e| io_err(&path, e))?;
        check_ours(&path, &fstat(fd.as_raw_fd()).map_err(|e| io_err(&path, e))?, true)?;
        Ok(Dir { fd, path })
    }

    fn open_raw(&self, name: &str, flags: i32) -> io::Result<File> {
        let c = cstr(name)?;
        // SAFETY: as for openat; 0o600 is only used with O_CREAT.
        let fd = unsafe {
            libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o600 as libc::c_uint)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by openat.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// A new file `name` (0600), read-write; fails if it exists.
    pub fn create_file(&self, name: &str) -> io::Result<File> {
        self.open_raw(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL)
    }

    /// A new file with no name in this directory (0600, read-write): scratch data that must not outlive this
    /// process goes with its last descriptor, at a crash too, and no other process can open it by a name. Where the
    /// filesystem has no unnamed files, a file made under a random name and removed at once (only a crash between
    /// the two calls leaves it behind).
    pub fn unnamed_file(&self) -> io::Result<File> {
        // SAFETY: a NUL-terminated "." relative to our descriptor; the mode is that of the file made.
        let fd = unsafe {
            libc::openat(self.fd.as_raw_fd(), c".".as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600)
        };
        if fd >= 0 {
            // SAFETY: fd was just returned by openat.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        if let Unnamed::Failed(e) = Unnamed::of(io::Error::last_os_error()) {
            return Err(e);
        }
        let mut salt = [0u8; 8];
        crate::crypto::secret::fill_random(&mut salt);
        let name = format!("scratch.{}.tmp", crate::crypto::hex::hex(&salt));
        let f = self.create_file(&name)?;
        self.remove(&name)?;
        Ok(f)
    }

    /// Opens the existing file `name` and checks it; `None` if it does not exist.
    pub fn open_file(&self, name: &str, write: bool) -> Result<Option<File>, TrustError> {
        let path = self.path.join(name);
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let f = match self.open_raw(name, flags | libc::O_NONBLOCK) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(TrustError::WrongType { path, expected: "regular file" })
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        check_ours(&path, &fstat(f.as_raw_fd()).map_err(|e| io_err(&path, e))?, false)?;
        Ok(Some(f))
    }

    /// Reads the whole checked file `name` (at most `max` bytes); `None` if it does not exist.
    pub fn read_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, TrustError> {
        use std::io::Read;
        let path = self.path.join(name);
        let Some(f) = self.open_file(name, false)? else { return Ok(None) };
        let mut buf = Vec::new();
        f.take(max + 1).read_to_end(&mut buf).map_err(|e| io_err(&path, e))?;
        if buf.len() as u64 > max {
            return Err(io_err(&path, io::Error::new(io::ErrorKind::InvalidData, format!("longer than {max} bytes"))));
        }
        Ok(Some(buf))
    }

    /// Writes `name` atomically (a temporary name, then rename over it), 0600. Not fsynced: see docs/FORMAT.md.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        // A leftover of a write that failed midway is removed only when it is there (one syscall less per record).
        let mut f = match self.create_file(&tmp) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.remove(&tmp)?;
                self.create_file(&tmp)?
            }
            other => other?,
        };
        f.write_all(bytes)?;
        drop(f);
        let (a, b) = (cstr(&tmp)?, cstr(name)?);
        // SAFETY: both names are NUL-terminated and relative to our descriptor.
        if unsafe { libc::renameat(self.fd.as_raw_fd(), a.as_ptr(), self.fd.as_raw_fd(), b.as_ptr()) } != 0 {
            let e = io::Error::last_os_error();
            let _ = self.remove(&tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Renames `from` to `to` unless `to` exists (then `AlreadyExists`, and `from` stays).
    pub fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
        let (a, b) = (cstr(from)?, cstr(to)?);
        // SAFETY: both names are NUL-terminated and relative to our descriptor.
        let r = unsafe {
            libc::renameat2(self.fd.as_raw_fd(), a.as_ptr(), self.fd.as_raw_fd(), b.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the file `name`; a missing file is not an error.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: as for renameat.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes the empty subdirectory `name`.
    pub fn remove_dir(&self, name: &str) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: as for renameat.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The names in the directory (without `.` and `..`).
    pub fn entries(&self) -> io::Result<Vec<String>> {
        // SAFETY: dup of our open descriptor; fdopendir takes ownership of the duplicate and closedir releases it.
        let dup = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        let dirp = unsafe { libc::fdopendir(dup) };
        if dirp.is_null() {
            let e = io::Error::last_os_error();
            unsafe { libc::close(dup) };
            return Err(e);
        }
        // Start from the beginning even if the descriptor was read before.
        unsafe { libc::rewinddir(dirp) };
        let mut out = Vec::new();
        loop {
            // SAFETY: readdir on a valid DIR*; the entry is copied before the next call.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                break;
            }
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            let name = name.to_string_lossy().into_owned();
            if name != "." && name != ".." {
                out.push(name);
            }
        }
        unsafe { libc::closedir(dirp) };
        Ok(out)
    }
}

/// Takes an exclusive `flock` on `file` without waiting; `false` if another open file description holds it.
pub fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn base_is_created_private_and_reopened() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("a/b/journal");
        let d = Dir::open_base(&base).unwrap();
        assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        let sub = d.subdir("s", true).unwrap().unwrap();
        sub.write_file("x", b"1").unwrap();
        assert_eq!(sub.read_file("x", 10).unwrap().unwrap(), b"1");
        assert_eq!(std::fs::metadata(base.join("s/x")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(sub.entries().unwrap(), vec!["x".to_string()]);
        assert!(sub.read_file("x", 0).is_err(), "length cap");
        // A temporary name left by a write that failed midway, or planted as a symlink, is replaced, never followed.
        std::fs::write(base.join("s/x.tmp"), b"stale").unwrap();
        sub.write_file("x", b"2").unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("s/x.tmp")).unwrap();
        sub.write_file("x", b"3").unwrap();
        assert_eq!(sub.read_file("x", 10).unwrap().unwrap(), b"3");
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert_eq!(sub.entries().unwrap(), vec!["x".to_string()]);
        Dir::open_base(&base).unwrap();
    }

    /// A base that already exists and that others may list is used (only names show in it) and named in a warning.
    #[test]
    fn a_base_others_can_list_is_named_in_a_warning() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let (private, listable) = (tmp.path().join("private"), tmp.path().join("listable"));
        std::fs::create_dir(&listable).unwrap();
        std::fs::set_permissions(&listable, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            Dir::open_base(&private).unwrap();
            assert!(lines.0.lock().unwrap().is_empty(), "a base made here is 0700: no warning");
            Dir::open_base(&listable).unwrap();
        });
        let logged = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("WARN") && logged.contains("other users can list"), "{logged}");
        assert!(logged.contains(&listable.display().to_string()) && logged.contains("755"), "{logged}");
    }

    #[test]
    fn writable_or_linked_entries_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("j");
        let d = Dir::open_base(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(Dir::open_base(&base), Err(TrustError::Writable { .. })));
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();

        // A symlinked subdirectory or file is never followed.
        std::os::unix::fs::symlink(tmp.path(), base.join("link")).unwrap();
        assert!(matches!(d.subdir("link", false), Err(TrustError::WrongType { .. })));
        std::os::unix::fs::symlink("/etc/hostname", base.join("flink")).unwrap();
        assert!(matches!(d.open_file("flink", false), Err(TrustError::WrongType { .. })));
        // A file others may write is refused.
        std::fs::write(base.join("w"), b"x").unwrap();
        std::fs::set_permissions(base.join("w"), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(d.open_file("w", false), Err(TrustError::Writable { .. })));
        // A hard link to a file elsewhere is refused.
        std::fs::write(tmp.path().join("outside"), b"x").unwrap();
        std::fs::hard_link(tmp.path().join("outside"), base.join("hl")).unwrap();
        assert!(d.open_file("hl", false).is_err());
        // A base that is a symlink at the last component is resolved first (as ssh does), then checked.
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("alias")).unwrap();
        assert_eq!(Dir::open_base(&tmp.path().join("alias")).unwrap().path(), real.as_path());
    }

    #[test]
    fn a_lock_is_exclusive_between_open_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dir::open_base(&tmp.path().join("j")).unwrap();
        let a = d.create_file("lock").unwrap();
        let b = d.open_file("lock", true).unwrap().unwrap();
        assert!(try_lock(&a).unwrap());
        assert!(!try_lock(&b).unwrap());
        drop(a);
        assert!(try_lock(&b).unwrap());
    }
}
