//! The kernel mount, done by us when we are root, so that the mount table says `fuse.s3cryptfs`.
//!
//! fuser's own mount(2) always passes the type `fuse` and drops the subtype (only its fusermount3 route forwards it),
//! so `findmnt`, `df -t`, fstab matching and systemd's mount units would see a generic FUSE mount. As root we open
//! `/dev/fuse`, call mount(2) with type `fuse.s3cryptfs` ourselves and hand the descriptor to
//! `fuser::Session::from_fd`; the unmount is then ours too. Without root (or when mount(2) says EPERM, e.g. in a
//! user namespace) fuser mounts through fusermount3, which sets the subtype itself.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What the kernel mount needs to know.
pub struct MountSpec<'a> {
    pub mountpoint: &'a Path,
    /// The mount's source column (`findmnt -o SOURCE`): the store URL.
    pub source: &'a str,
    /// Filesystem subtype: the type becomes `fuse.<subtype>`.
    pub subtype: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
}

/// A mount we made; `unmount` ends it (the FUSE loop then sees ENODEV and returns).
#[derive(Debug)]
pub struct OwnMount {
    mountpoint: PathBuf,
}

/// Mounts `/dev/fuse` at the mountpoint with type `fuse.<subtype>`. `Ok(None)` means "not permitted here, let fuser
/// mount through fusermount3"; other failures are errors.
pub fn mount(spec: &MountSpec<'_>) -> io::Result<Option<(OwnedFd, OwnMount)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let root_mode = std::fs::metadata(spec.mountpoint)?.permissions().mode();
    let dev = CString::new("/dev/fuse").expect("no NUL");
    // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={raw},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions");
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NODEV | libc::MS_NOSUID;
    if spec.read_only {
        flags |= libc::MS_RDONLY;
    }
    let to_c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a mount argument"));
    let source = to_c(spec.source.as_bytes())?;
    let target = to_c(spec.mountpoint.as_os_str().as_bytes())?;
    let fstype = to_c(format!("fuse.{}", spec.subtype).as_bytes())?;
    let data = to_c(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast())
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some((fd, OwnMount { mountpoint: spec.mountpoint.to_path_buf() })))
}

impl OwnMount {
    /// A plain umount2: EBUSY while files are open, like fuser's unmount.
    pub fn unmount(&self) -> io::Result<()> {
        let target = CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the mountpoint"))?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // Already gone (someone ran umount first): nothing left to do.
        if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        Err(e)
    }
}
