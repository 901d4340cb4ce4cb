//! The agent's socket file: created so that no other user can ever connect to it, removed only if it is still ours.
//!
//! Creation order matters: the parent directory is made 0700 if missing; under an exclusive `flock` on that directory
//! (so two agents starting at once cannot both decide the path is free), an existing socket is probed — one that
//! answers means an agent is running and we refuse, one that refuses connections is stale and is removed — and the new
//! socket is bound, chmod'ed to 0600, and only then put in the listening state. Before `listen` every `connect` is
//! refused, so there is no moment when the socket accepts connections under looser permissions (and no process-wide
//! `umask` change, which would race with other threads).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::AgentError;

/// Pending connections the kernel queues before `accept`; the agent accepts immediately, this only absorbs bursts.
const LISTEN_BACKLOG: libc::c_int = 128;

/// How long a start waits for the directory's lock: another agent holds it only while it binds (milliseconds). In
/// a directory other users can open (`--socket /tmp/…`), one of them could hold it for ever; the start then fails
/// instead of hanging.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An exclusive `flock` on `dir`, tried every 20 ms until `wait` has passed (then EWOULDBLOCK, named). The lock is
/// released when `dir` is closed (at the end of [`bind`]: the listener is listening by then, so a later starter sees
/// it answer).
fn lock_dir(dir: &std::fs::File, wait: std::time::Duration) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            let why = format!("another process has held a lock on the directory for {} s", wait.as_secs());
            return Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, why));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The socket file an agent created, identified by device and inode so that `remove` never deletes a file someone
/// else has since put at the path.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if the path still names the file this agent created.
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A listening agent socket.
pub(super) struct Bound {
    pub listener: UnixListener,
    pub file: SocketFile,
    /// A stale socket (nothing listening) was removed first.
    pub replaced_stale: bool,
}

/// Creates the agent's listening socket at `path` (see the module docs for the steps).
pub(super) fn bind(path: &Path) -> Result<Bound, AgentError> {
    let bind_err = |source| AgentError::Bind { socket: path.into(), source };
    // Absolute, so that removing it at exit works after the daemon has changed directory to /.
    let path = std::path::absolute(path).map_err(bind_err)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("/"),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| AgentError::SocketDir { dir: dir.clone(), source })?;
    }
    let dir_handle = std::fs::File::open(&dir).map_err(|source| AgentError::SocketDir { dir: dir.clone(), source })?;
    lock_dir(&dir_handle, LOCK_WAIT).map_err(|source| AgentError::SocketDir { dir: dir.clone(), source })?;

    let mut replaced_stale = false;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(&path) {
            Ok(_) => {
                let pid = super::client::ping(&path).map_or_else(|_| "unknown".to_string(), |p| p.to_string());
                return Err(AgentError::AlreadyRunning { socket: path, pid });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(&path).map_err(|source| AgentError::Bind { socket: path.clone(), source })?;
                replaced_stale = true;
            }
            Err(source) => return Err(AgentError::Bind { socket: path, source }),
        },
        Ok(_) => return Err(AgentError::NotASocket { socket: path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(AgentError::Bind { socket: path, source }),
    }

    let fd = bind_private(&path).map_err(|source| AgentError::Bind { socket: path.clone(), source })?;
    let meta = std::fs::symlink_metadata(&path).map_err(|source| AgentError::Bind { socket: path.clone(), source })?;
    drop(dir_handle);
    Ok(Bound {
        listener: UnixListener::from(fd),
        file: SocketFile { path, dev: meta.dev(), ino: meta.ino() },
        replaced_stale,
    })
}

/// socket + bind + chmod 0600 + listen, by hand because std's `UnixListener::bind` listens at once.
fn bind_private(path: &Path) -> std::io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("invariant broken: AF_UNIX fits sa_family_t");
    // The kernel's limit (108 bytes with the terminating NUL): a longer path would be silently truncated.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a socket path must be shorter than {} bytes", addr.sun_path.len()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len).expect("invariant broken: a sockaddr_un length fits socklen_t");
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    if unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // By path: fchmod on a socket descriptor does not change the file's mode.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: listen on the socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another user holding a lock on a shared socket directory (`flock /tmp sleep inf`) makes a start fail after
    /// a bounded wait instead of hanging; once the lock goes, it is taken.
    #[test]
    fn a_lock_held_on_the_directory_is_waited_for_a_bounded_time() {
        let tmp = tempfile::tempdir().unwrap();
        let holder = std::fs::File::open(tmp.path()).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
        let ours = std::fs::File::open(tmp.path()).unwrap();
        let started = std::time::Instant::now();
        let err = lock_dir(&ours, std::time::Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("held a lock"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        drop(holder);
        lock_dir(&ours, std::time::Duration::from_millis(200)).unwrap();
    }

    #[test]
    fn creates_a_private_directory_and_a_0600_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/agent.sock");
        let bound = bind(&path).unwrap();
        assert!(!bound.replaced_stale);
        assert_eq!(std::fs::metadata(tmp.path().join("a/b")).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(tmp.path().join("a")).unwrap().mode() & 0o777, 0o700);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        UnixStream::connect(&path).expect("the socket listens");
        bound.file.remove();
        assert!(!path.exists());
    }

    #[test]
    fn replaces_a_stale_socket_and_refuses_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        drop(UnixListener::bind(&path).unwrap()); // the file stays, nothing listens
        let bound = bind(&path).unwrap();
        assert!(bound.replaced_stale);
        UnixStream::connect(&path).expect("the new socket listens");

        let file = tmp.path().join("plain");
        std::fs::write(&file, b"not a socket").unwrap();
        assert!(matches!(bind(&file), Err(AgentError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    }

    #[test]
    fn remove_leaves_a_file_that_replaced_the_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        let bound = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        bound.file.remove();
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[test]
    fn refuses_a_path_longer_than_sun_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x".repeat(120));
        assert!(matches!(bind(&path), Err(AgentError::Bind { .. })));
    }
}
