//! An unmount that returns when the data is safe: `s3cryptfs unmount DIR` and the umount(8) helper
//! (`umount.fuse.s3cryptfs`).
//!
//! Why: the kernel ends a FUSE mount at once, and `fusermount3 -u` or a plain `umount` return while the daemon is
//! still uploading what was left dirty (a release that arrived with the unmount, an upload that failed at close and
//! is retried at exit). A script that unmounts and then reads the bucket, powers off or starts another mount would
//! race those uploads. So each daemon keeps a small state file per mountpoint, holding an `flock` on it from mount to
//! exit and writing its state into it (`serving`, `finishing`, `done` with the count of files it could not upload).
//! The unmount opens that file, unmounts, waits for the lock (the daemon's exit, kill -9 included) and reports what
//! the daemon wrote last.
//!
//! The state file is `<dir>/<sha256(mountpoint)[..16] hex>.state` in a directory of the mount owner's: root's is
//! `/run/s3cryptfs`, a user's `/run/user/UID/s3cryptfs` (or `~/.local/state/s3cryptfs/mounts` without a runtime
//! directory). Both sides find it from the mountpoint and the owner's uid (mountinfo's `user_id=` for a mount made
//! through fusermount3), not from the environment, so root's `umount` finds a user's daemon. The directory and file
//! must belong to that uid and not be writable by others, and are opened without following symlinks; what another
//! user could plant there can at worst make an unmount wait for nothing or report a wrong state, and is refused.
//! The file holds no secret (a pid, the mountpoint, a state).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// The state directory of `uid` (see the module docs).
fn state_dir(uid: u32) -> Option<PathBuf> {
    if uid == 0 {
        return Some(PathBuf::from("/run/s3cryptfs"));
    }
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    if runtime.is_dir() {
        return Some(runtime.join("s3cryptfs"));
    }
    home_of(uid).map(|h| h.join(".local/state/s3cryptfs/mounts"))
}

/// The home directory of `uid` from the password database.
fn home_of(uid: u32) -> Option<PathBuf> {
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: zeroed passwd is a valid out-parameter; getpwuid_r writes at most buf.len() bytes into buf.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if r != 0 || out.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir points into buf, NUL-terminated by getpwuid_r.
    let dir = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
}

fn file_name(mountpoint: &Path) -> String {
    let digest = Sha256::digest(mountpoint.as_os_str().as_bytes());
    format!("{}.state", crate::crypto::hex::hex(&digest[..16]))
}

/// Refuses what `uid` does not own or others may write (a planted file or directory).
fn check_owned(path: &Path, md: &std::fs::Metadata, uid: u32) -> io::Result<()> {
    if md.uid() != uid || md.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not owned by uid {uid} or is writable by others: refused",
            path.display()
        )));
    }
    Ok(())
}

fn open_nofollow(path: &Path, flags: i32) -> io::Result<File> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in a path"))?;
    // SAFETY: a valid NUL-terminated path; the descriptor is owned by the File.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn flock(file: &File, op: i32) -> io::Result<bool> {
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The daemon's side: the state file of its mountpoint, locked for the life of the process.
#[derive(Debug)]
pub struct MountState {
    file: File,
    pid: u32,
    mountpoint: PathBuf,
}

impl MountState {
    /// Creates (or reuses) and locks the state file of `mountpoint` (canonical) for this process's uid.
    pub fn create(mountpoint: &Path) -> io::Result<MountState> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let dir = state_dir(uid).ok_or_else(|| io::Error::other("no state directory (no home directory for this uid)"))?;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        check_owned(&dir, &std::fs::symlink_metadata(&dir)?, uid)?;
        let path = dir.join(file_name(mountpoint));
        let file = open_nofollow(&path, libc::O_RDWR | libc::O_CREAT)?;
        let md = file.metadata()?;
        check_owned(&path, &md, uid)?;
        if !md.is_file() || md.nlink() != 1 {
            return Err(io::Error::other(format!("{} is not a plain file: refused", path.display())));
        }
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)? {
            // WouldBlock: the caller tells a finishing daemon (its mount gone) from a live one.
            let held = format!("{} is held by another daemon of this mountpoint", path.display());
            return Err(io::Error::new(io::ErrorKind::WouldBlock, held));
        }
        let state = MountState { file, pid: std::process::id(), mountpoint: mountpoint.to_path_buf() };
        state.set("serving", 0)?;
        Ok(state)
    }

    /// Records the daemon's state (`serving`, `finishing`, `done`) and how many files it could not upload.
    pub fn set(&self, state: &str, left: usize) -> io::Result<()> {
        let text = format!("pid={}\nmountpoint={}\nstate={state}\nleft={left}\n", self.pid, self.mountpoint.display());
        let mut f = &self.file;
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(text.as_bytes())
    }
}

/// What a daemon last wrote into its state file.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reported {
    pid: Option<u32>,
    state: String,
    left: usize,
}

fn parse(text: &str) -> Reported {
    let mut r = Reported::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("pid", v)) => r.pid = v.parse().ok(),
            Some(("state", v)) => r.state = v.to_string(),
            Some(("left", v)) => r.left = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    r
}

/// The mountinfo line of the mount at `dir`: (fstype, owner uid).
fn mount_of(dir: &Path) -> io::Result<Option<(String, u32)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = dir.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || unescape(fields[4]).as_slice() != want {
            continue;
        }
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let fstype = fields.get(dash + 1).copied().unwrap_or("").to_string();
        let superopts = fields.get(dash + 3).copied().unwrap_or("");
        let uid = superopts.split(',').find_map(|o| o.strip_prefix("user_id=")).and_then(|v| v.parse().ok()).unwrap_or(0);
        found = Some((fstype, uid)); // the last one is the top of a stack of mounts
    }
    Ok(found)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// How `unmount` ends the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// umount2(0): refused with EBUSY while files are open.
    Normal,
    /// MNT_DETACH: detached now, ended when the last open file closes; does not wait for the daemon.
    Lazy,
}

/// Unmounts the s3cryptfs mount at `dir` and, unless lazy, waits up to `wait` for its daemon to finish its uploads.
/// Fails (non-zero exit) if the mount is not ours, is busy, or the daemon reports files it could not upload.
pub fn unmount(dir: &Path, how: How, wait: Option<Duration>) -> anyhow::Result<()> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let Some((fstype, owner)) = mount_of(&dir).context("reading /proc/self/mountinfo")? else {
        bail!("{} is not a mountpoint", dir.display());
    };
    if fstype != "fuse.s3cryptfs" {
        bail!("{} is a {fstype} mount, not an s3cryptfs one", dir.display());
    }
    // Opened before the unmount, so a daemon that exits at once is still seen to have finished.
    let state = state_dir(owner).map(|d| d.join(file_name(&dir))).and_then(|p| {
        let f = open_nofollow(&p, libc::O_RDONLY).ok()?;
        let md = f.metadata().ok()?;
        match check_owned(&p, &md, owner) {
            Ok(()) if md.is_file() => Some(f),
            Ok(()) => None,
            Err(e) => {
                eprintln!("s3cryptfs: {e}");
                None
            }
        }
    });
    end_mount(&dir, how)?;
    if how == How::Lazy {
        return Ok(());
    }
    let Some(mut state) = state else {
        eprintln!(
            "s3cryptfs: unmounted {}; its daemon left no state file, so this cannot wait for its final uploads",
            dir.display()
        );
        return Ok(());
    };
    let started = Instant::now();
    let mut told = false;
    loop {
        if flock(&state, libc::LOCK_SH | libc::LOCK_NB)? {
            break;
        }
        if !told && started.elapsed() > Duration::from_secs(2) {
            eprintln!("s3cryptfs: {} unmounted; waiting for its daemon to finish uploading", dir.display());
            told = true;
        }
        if wait.is_some_and(|w| started.elapsed() > w) {
            bail!(
                "{} is unmounted but its daemon is still uploading after {} s; data not yet uploaded stays in its \
                 write journal, and the daemon or the next start uploads it",
                dir.display(),
                started.elapsed().as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut text = String::new();
    state.rewind()?;
    state.read_to_string(&mut text)?;
    let r = parse(&text);
    match (r.state.as_str(), r.left) {
        ("done", 0) => Ok(()),
        ("done", n) => bail!(
            "{} is unmounted, but {n} file(s) could not be uploaded; they stay in the write journal and the next start \
             of this store uploads them (see the daemon's log)",
            dir.display()
        ),
        _ => bail!(
            "{} is unmounted, but its daemon{} ended without finishing (killed?); what it had not uploaded stays in \
             its write journal and the next start of this store uploads it",
            dir.display(),
            r.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
    }
}

/// How long an unmount refused as busy is tried again before it is reported. Some holds on a mount last a moment: a
/// path walk in progress (a `stat` through it, or the daemon's own check that it serves, made right after it
/// mounted: an unmount sent just as the mount appeared was refused as busy, seen in CI), and a file just closed,
/// until the daemon has answered the RELEASE the kernel sends after close() returned. Files held open outlast this,
/// and are reported.
const BUSY_FOR: Duration = Duration::from_secs(2);

/// umount2 as root (our own kernel mount or a user's), fusermount3 for a user's own mount; refused as busy for
/// [`BUSY_FOR`], it tries again every 20 ms.
fn end_mount(dir: &Path, how: How) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        match try_end_mount(dir, how)? {
            Ended::Yes => return Ok(()),
            Ended::Busy(_) if t0.elapsed() < BUSY_FOR => std::thread::sleep(Duration::from_millis(20)),
            Ended::Busy(why) => bail!("{why}"),
        }
    }
}

/// What one try of [`end_mount`] did.
enum Ended {
    Yes,
    /// Refused as busy, for this reason.
    Busy(String),
}

fn try_end_mount(dir: &Path, how: How) -> anyhow::Result<Ended> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = CString::new(dir.as_os_str().as_bytes()).context("NUL in the mountpoint")?;
        let flags = if how == How::Lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                let why = "is busy: files are open on it (close them, or unmount lazily with -l)";
                return Ok(Ended::Busy(format!("{} {why}", dir.display())));
            }
            return Err(e).with_context(|| format!("unmounting {}", dir.display()));
        }
        return Ok(Ended::Yes);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if how == How::Lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(dir).output().context("running fusermount3")?;
    if !out.status.success() {
        let why = format!("fusermount3 -u {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
        if why.contains("busy") {
            return Ok(Ended::Busy(why));
        }
        bail!("{why}");
    }
    Ok(Ended::Yes)
}

/// The umount(8) helper convention: `umount.fuse.s3cryptfs DIR [-flnrv] [-N NS] [-t TYPE]`. `-l` unmounts lazily;
/// the other flags change nothing here (`-f` is taken as a normal unmount: a FUSE mount is forced by aborting its
/// connection, which would lose uploads).
pub fn from_umount_helper(args: &[String]) -> anyhow::Result<()> {
    let mut dir = None;
    let mut how = How::Normal;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-N" | "-t" => {
                it.next();
            }
            s if s.starts_with('-') => {
                if s.contains('l') {
                    how = How::Lazy;
                }
            }
            s if dir.is_none() => dir = Some(PathBuf::from(s)),
            s => bail!("unexpected argument {s:?}"),
        }
    }
    let dir = dir.context("usage: umount.fuse.s3cryptfs DIR [-l]")?;
    unmount(&dir, how, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape(r"/mnt/x\04"), br"/mnt/x\04");
    }

    #[test]
    fn the_state_a_daemon_wrote_is_read_back() {
        let r = parse("pid=12\nmountpoint=/mnt/x\nstate=done\nleft=3\n");
        assert_eq!(r, Reported { pid: Some(12), state: "done".into(), left: 3 });
        assert_eq!(parse("").state, "");
    }

    #[test]
    fn state_files_are_named_by_mountpoint() {
        assert_ne!(file_name(Path::new("/mnt/a")), file_name(Path::new("/mnt/b")));
        assert_eq!(file_name(Path::new("/mnt/a")).len(), 32 + ".state".len());
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A state file (or directory) planted by another user, or left writable by others, is refused: an unmount
    /// would otherwise trust what that user writes into it.
    #[test]
    fn a_planted_or_shared_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        std::fs::write(&p, b"state=done\nleft=0\n").unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_owned(&p, &std::fs::metadata(&p).unwrap(), me).is_ok());
        assert!(check_owned(&p, &std::fs::metadata(&p).unwrap(), me + 1).is_err(), "another owner");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o622)).unwrap();
        assert!(check_owned(&p, &std::fs::metadata(&p).unwrap(), me).is_err(), "writable by others");
        // A symlink in its place is not followed.
        let link = dir.path().join("y.state");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let err = open_nofollow(&link, libc::O_RDONLY).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
