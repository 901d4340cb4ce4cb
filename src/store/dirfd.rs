//! Directory-relative system calls for the local store (`local.rs`): every call names one path component relative to
//! an open directory, never a whole path.
//!
//! Why: a whole path must fit in PATH_MAX (4,096 bytes with its NUL), so a store reached by `root.join(key)` could
//! not hold, or even look up, an object whose root and key together were longer, and how deep the tree could go
//! depended on where the root happened to live. Walking one name at a time, a path is limited only by NAME_MAX per
//! name. It also makes following symlinks a decision: every directory is opened with `O_NOFOLLOW`, stats use
//! `AT_SYMLINK_NOFOLLOW`, and callers add `O_NOFOLLOW` to files, so nothing below the root is ever reached through
//! a symlink.
//!
//! Small safe wrappers over libc: each returns `io::Result` with the errno as is; nothing here knows about objects.
//! Names passed in are single components (no `/`, no NUL): the caller builds them with [`name`].

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest name one directory entry can have on Linux (`NAME_MAX`, without the NUL).
pub(super) const NAME_MAX: usize = 255;

/// One path component as the system calls take it. A name longer than [`NAME_MAX`] fails with ENAMETOOLONG, as the
/// kernel would fail it; an empty name, `.`, `..` or one holding `/` or NUL (which a valid object key never has) with
/// `InvalidInput`.
pub(super) fn name(component: &str) -> io::Result<CString> {
    if component.len() > NAME_MAX {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    if component.is_empty() || component == "." || component == ".." || component.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a single path component: {component:?}")));
    }
    CString::new(component).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes ownership of a descriptor a system call just returned (or its error).
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the local store needs of a `stat`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stat {
    pub kind: Kind,
    pub ino: u64,
    /// Bytes; 0 for anything but a regular file.
    pub size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    /// Symlinks, devices, FIFOs, sockets: never objects.
    Other,
}

impl Stat {
    fn from_raw(st: &libc::stat) -> Stat {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            _ => Kind::Other,
        };
        Stat {
            kind,
            ino: st.st_ino,
            size: if kind == Kind::File { u64::try_from(st.st_size).unwrap_or(0) } else { 0 },
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }

    pub fn modified(&self) -> SystemTime {
        let (secs, nanos) = self.mtime;
        let nanos = Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + nanos
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
        }
    }
}

/// `fstat` of an open file or directory.
pub(super) fn fstat(fd: impl AsFd) -> io::Result<Stat> {
    // SAFETY: all-zero bytes are a valid `stat`, which the call overwrites.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a `stat` we own.
    check(unsafe { libc::fstat(fd.as_fd().as_raw_fd(), &mut st) })?;
    Ok(Stat::from_raw(&st))
}

/// An open directory (`O_RDONLY | O_DIRECTORY`), the base of the calls that name entries in it.
#[derive(Debug)]
pub(super) struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens the directory at `path`, following symlinks in it: only for a root the caller chose.
    pub fn open_path(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = owned(unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
        Ok(Dir { fd })
    }

    /// The directory `name` in this one, not through a symlink (a symlink there fails with ENOTDIR).
    pub fn open_dir(&self, name: &CStr) -> io::Result<Dir> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and a NUL-terminated name; the result is checked.
        let fd = owned(unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags) })?;
        Ok(Dir { fd })
    }

    /// This directory opened again: a new open file description, so reading its entries does not move the offset
    /// of one shared with other threads.
    pub fn reopen(&self) -> io::Result<Dir> {
        self.open_dir(c".")
    }

    /// `openat(name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`: a symlink at `name` fails with ELOOP.
    pub fn open_file(&self, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and a NUL-terminated name; `mode` is read only with O_CREAT.
        let fd = owned(unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags, libc::c_uint::from(mode)) })?;
        Ok(File::from(fd))
    }

    pub fn mkdir(&self, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode) })
    }

    /// `fstatat` of the entry `name` itself (a symlink is reported as one, not followed).
    pub fn stat(&self, name: &CStr) -> io::Result<Stat> {
        // SAFETY: all-zero bytes are a valid `stat`, which the call overwrites.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid directory descriptor, a NUL-terminated name and a `stat` we own.
        check(unsafe {
            libc::fstatat(self.fd.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW)
        })?;
        Ok(Stat::from_raw(&st))
    }

    /// Moves `name` here to `to_name` in `to`, replacing what is there (as `rename(2)`).
    pub fn rename(&self, name: &CStr, to: &Dir, to_name: &CStr) -> io::Result<()> {
        // SAFETY: valid directory descriptors and NUL-terminated names.
        check(unsafe { libc::renameat(self.fd.as_raw_fd(), name.as_ptr(), to.fd.as_raw_fd(), to_name.as_ptr()) })
    }

    /// Moves `name` here to `to_name` in `to` unless something exists there (then EEXIST and nothing moved):
    /// `renameat2(RENAME_NOREPLACE)`, or where the filesystem lacks it (EINVAL) a hard link, which fails the same
    /// way, then the unlink of `name`. Either way the check and the move are one step for the kernel.
    pub fn rename_noreplace(&self, name: &CStr, to: &Dir, to_name: &CStr) -> io::Result<()> {
        // SAFETY: valid directory descriptors and NUL-terminated names.
        let rc = unsafe {
            libc::renameat2(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                to.fd.as_raw_fd(),
                to_name.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        match check(rc) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
                // SAFETY: as above; flags 0: `name` is not followed if it is a symlink.
                check(unsafe {
                    libc::linkat(self.fd.as_raw_fd(), name.as_ptr(), to.fd.as_raw_fd(), to_name.as_ptr(), 0)
                })?;
                self.unlink(name)
            }
            other => other,
        }
    }

    pub fn unlink(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) })
    }

    pub fn rmdir(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
    }

    /// Makes the entries of this directory (a create, rename or unlink in it) durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync of a valid descriptor.
        check(unsafe { libc::fsync(self.fd.as_raw_fd()) })
    }

    pub fn stat_self(&self) -> io::Result<Stat> {
        fstat(&self.fd)
    }

    /// The names of the entries, without `.` and `..`, in the order the filesystem gives them.
    pub fn names(&self) -> io::Result<Vec<CString>> {
        let mut out = Vec::new();
        self.read_entries(|name| {
            out.push(name.to_owned());
            true
        })?;
        Ok(out)
    }

    /// Whether the directory has no entries besides `.` and `..` (reads no further than the first).
    pub fn is_empty(&self) -> io::Result<bool> {
        let mut empty = true;
        self.read_entries(|_| {
            empty = false;
            false
        })?;
        Ok(empty)
    }

    /// Calls `each` with the entries' names (not `.` and `..`) until it returns false or the entries end.
    fn read_entries(&self, mut each: impl FnMut(&CStr) -> bool) -> io::Result<()> {
        let own = self.reopen()?;
        // SAFETY: a valid descriptor; on success the stream owns it (closedir closes it), on failure it stays ours.
        let dirp = unsafe { libc::fdopendir(own.fd.as_raw_fd()) };
        if dirp.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(own);
        let stream = DirStream(dirp);
        loop {
            // readdir signals the end and an error alike with NULL; only errno tells them apart.
            // SAFETY: errno is this thread's; readdir's contract is to clear it before the call.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: a stream opened above and not closed yet.
            let ent = unsafe { libc::readdir(stream.0) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                return if e.raw_os_error().unwrap_or(0) == 0 { Ok(()) } else { Err(e) };
            }
            // SAFETY: `d_name` is NUL-terminated and valid until the next readdir on this stream, which is after
            // `each` returns.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if name != c"." && name != c".." && !each(name) {
                return Ok(());
            }
        }
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A `DIR*` closed when dropped.
struct DirStream(*mut libc::DIR);

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: the stream came from fdopendir and is closed exactly once, here.
        unsafe { libc::closedir(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components_of_at_most_name_max_bytes() {
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert_eq!(name(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert_eq!(name(&"x".repeat(NAME_MAX + 1)).unwrap_err().raw_os_error(), Some(libc::ENAMETOOLONG));
        for good in ["a", "...", &"x".repeat(NAME_MAX), "ünï"] {
            assert_eq!(name(good).unwrap().to_bytes(), good.as_bytes());
        }
    }

    #[test]
    fn symlinks_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("d", tmp.path().join("ld")).unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("lf")).unwrap();
        let root = Dir::open_path(tmp.path()).unwrap();
        root.open_dir(c"d").unwrap();
        assert_eq!(root.open_dir(c"ld").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(root.open_file(c"lf", libc::O_RDONLY, 0).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(root.stat(c"lf").unwrap().kind, Kind::Other);
        let mut names: Vec<_> = root.names().unwrap().into_iter().map(|n| n.into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["d", "f", "ld", "lf"]);
    }

    #[test]
    fn rename_noreplace_refuses_an_existing_target_and_moves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), b"a").unwrap();
        std::fs::write(tmp.path().join("b"), b"b").unwrap();
        let root = Dir::open_path(tmp.path()).unwrap();
        let e = root.rename_noreplace(c"a", &root, c"b").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(tmp.path().join("a")).unwrap(), b"a");
        root.rename_noreplace(c"a", &root, c"c").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("c")).unwrap(), b"a");
        assert!(!tmp.path().join("a").exists());
    }
}
