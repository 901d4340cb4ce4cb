//! Paths longer than PATH_MAX through a real mount of the local store (issue 11).
//!
//! The local store used to reach objects by whole paths under its root, so a tree deeper than PATH_MAX (4,096 bytes,
//! root included) could not be stored, and looking up a missing name down there failed with EINVAL. Programs reach
//! such depths with directory-relative calls, which is what these tests do: every call here is `openat`, `mkdirat`,
//! `fstatat` or `renameat` on a directory descriptor, never a long path (and never `chdir`, which is process-wide
//! while tests run in parallel).

mod common;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use common::*;

/// Levels of 255-byte directories: 18 × 256 bytes of path, well past PATH_MAX on their own.
const LEVELS: usize = 18;
const NAME_MAX: usize = 255;

fn c(name: &str) -> CString {
    CString::new(name).unwrap()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_path(path: &Path) -> OwnedFd {
    let p = c(path.to_str().unwrap());
    // SAFETY: a NUL-terminated path.
    owned(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) }).unwrap()
}

fn open_dir_at(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    let n = c(name);
    // SAFETY: a valid descriptor and a NUL-terminated name.
    owned(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) })
}

fn mkdir_at(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let n = c(name);
    // SAFETY: a valid descriptor and a NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), 0o755) })
}

fn open_file_at(dir: &OwnedFd, name: &str, flags: libc::c_int) -> io::Result<File> {
    let n = c(name);
    // SAFETY: a valid descriptor and a NUL-terminated name; the mode is read only with O_CREAT.
    let fd = owned(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags | libc::O_CLOEXEC, 0o644 as libc::c_uint) })?;
    Ok(File::from(fd))
}

fn stat_at(dir: &OwnedFd, name: &str) -> io::Result<libc::stat> {
    let n = c(name);
    // SAFETY: all-zero bytes are a valid `stat`, which the call fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, a NUL-terminated name and a `stat` we own.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), n.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn rename_at(dir: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    let (a, b) = (c(from), c(to));
    // SAFETY: a valid descriptor and NUL-terminated names.
    check(unsafe { libc::renameat(dir.as_raw_fd(), a.as_ptr(), dir.as_raw_fd(), b.as_ptr()) })
}

/// The entries of `dir` (without `.` and `..`), sorted.
fn list_at(dir: &OwnedFd) -> Vec<String> {
    let own = open_dir_at(dir, ".").unwrap();
    // SAFETY: on success the stream owns the descriptor (closedir closes it).
    let dirp = unsafe { libc::fdopendir(own.as_raw_fd()) };
    assert!(!dirp.is_null(), "fdopendir: {}", io::Error::last_os_error());
    std::mem::forget(own);
    let mut out = Vec::new();
    loop {
        // SAFETY: a stream opened above; the name is copied before the next call.
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_str().unwrap().to_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    // SAFETY: closed once.
    unsafe { libc::closedir(dirp) };
    out.sort();
    out
}

fn level_names() -> Vec<String> {
    (0..LEVELS).map(|i| format!("{i:02}{}", "d".repeat(NAME_MAX - 2))).collect()
}

/// Opens the deepest directory under `top`, one name at a time.
fn walk(top: &Path, names: &[String]) -> OwnedFd {
    let mut dir = open_path(top);
    for n in names {
        dir = open_dir_at(&dir, n).unwrap_or_else(|e| panic!("openat {}…: {e}", &n[..4]));
    }
    dir
}

fn read_at(dir: &OwnedFd, name: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    open_file_at(dir, name, libc::O_RDONLY).unwrap().read_to_end(&mut buf).unwrap();
    buf
}

fn errno(r: io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn deep_tree(mode: &str) {
    let env = Env::new();
    let store = Store::local(env.path());
    let Store::Local { dir: store_dir } = &store else { unreachable!() };
    let names = level_names();
    let rel_len = names.iter().map(|n| n.len() + 1).sum::<usize>() - 1;
    assert!(rel_len > 4096 && rel_len + store_dir.as_os_str().len() > 4096);
    let data = pattern(300_000, 11);
    let moved = "m".repeat(NAME_MAX);

    let m = Mount::start(&env, &store, mode);
    {
        let mut dir = open_path(&m.dir);
        for (i, n) in names.iter().enumerate() {
            mkdir_at(&dir, n).unwrap_or_else(|e| panic!("mkdir at level {i}: {e}"));
            dir = open_dir_at(&dir, n).unwrap();
        }
        // A missing name at that depth is ENOENT (it was EINVAL), for a lookup and for an open.
        assert_eq!(errno(stat_at(&dir, "missing")), Some(libc::ENOENT));
        assert_eq!(errno(stat_at(&dir, &"x".repeat(NAME_MAX))), Some(libc::ENOENT));
        assert_eq!(errno(open_dir_at(&dir, "missing-dir")), Some(libc::ENOENT));

        let mut f = open_file_at(&dir, "file", libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert_bytes(read_at(&dir, "file"), &data, "read back at the bottom");
        let st = stat_at(&dir, "file").unwrap();
        assert_eq!((st.st_size as usize, st.st_mode & libc::S_IFMT), (data.len(), libc::S_IFREG));
        assert_eq!(list_at(&dir), ["file"]);

        rename_at(&dir, "file", &moved).unwrap();
        assert_eq!(errno(stat_at(&dir, "file")), Some(libc::ENOENT));
        assert_bytes(read_at(&dir, &moved), &data, "read after the rename");

        // Names: 255 bytes work, 256 are ENAMETOOLONG, at any depth.
        mkdir_at(&dir, &"z".repeat(NAME_MAX)).unwrap();
        let too_long = "y".repeat(NAME_MAX + 1);
        assert_eq!(errno(mkdir_at(&dir, &too_long)), Some(libc::ENAMETOOLONG));
        assert_eq!(errno(open_file_at(&dir, &too_long, libc::O_CREAT | libc::O_WRONLY)), Some(libc::ENAMETOOLONG));
        assert_eq!(errno(stat_at(&dir, &too_long)), Some(libc::ENAMETOOLONG));
        assert_eq!(errno(rename_at(&dir, &moved, &too_long)), Some(libc::ENAMETOOLONG));
        assert_eq!(list_at(&dir), [moved.clone(), "z".repeat(NAME_MAX)]);
    }
    let log = m.unmount();
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");

    // The store holds the tree at full depth, its path longer than PATH_MAX.
    let bottom = walk(store_dir, &names);
    assert!(stat_at(&bottom, &moved).unwrap().st_size as usize >= data.len());
    if mode == "none" {
        assert_bytes(read_at(&bottom, &moved), &data, "the object in the store");
    }
    drop(bottom);

    // A fresh mount finds everything again by lookups from the top.
    let m = Mount::start(&env, &store, mode);
    {
        let dir = walk(&m.dir, &names);
        assert_eq!(list_at(&dir), [moved.clone(), "z".repeat(NAME_MAX)]);
        assert_bytes(read_at(&dir, &moved), &data, "read after a remount");
        assert_eq!(stat_at(&dir, &moved).unwrap().st_size as usize, data.len());
        assert_eq!(errno(stat_at(&dir, "missing")), Some(libc::ENOENT));
    }
    let log = m.unmount();
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
}

#[test]
fn deep_tree_none() {
    deep_tree("none");
}

#[test]
fn deep_tree_cse_c() {
    deep_tree("cse-c");
}
