//! Extended attributes are not stored, and the kernel must learn that once (issue 13): answered with ENOTSUP, it
//! asked again before every WRITE (security.capability), one FUSE round trip per write; ENOSYS makes it remember.
//! Applications still get EOPNOTSUPP. Counted through the metrics endpoint's FUSE error series. No ioctl is
//! supported either: applications get ENOTTY, and the log stays quiet.

mod common;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::*;

fn xattr_requests(addr: &str, op: &str) -> f64 {
    metric(addr, &format!("s3cryptfs_fuse_errors_total{{op=\"{op}\",errno=\"ENOSYS\"}}"))
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn the_kernel_asks_for_extended_attributes_once_and_applications_get_eopnotsupp() {
    let env = Env::new();
    let store = Store::local(env.path());
    let addr = free_metrics_addr();
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let file = m.path("f");
    let mut f = std::fs::File::create(&file).unwrap();
    for i in 0..200u32 {
        f.write_all(&[i as u8; 4096]).unwrap();
    }
    drop(f);
    let name = CString::new("user.test").unwrap();
    for _ in 0..3 {
        let got = unsafe { libc::getxattr(c_path(&file).as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        assert_eq!(got, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EOPNOTSUPP), "getxattr");
        let set = unsafe { libc::setxattr(c_path(&file).as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(set, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EOPNOTSUPP), "setxattr");
    }
    // 200 writes and 3 explicit calls of each: the kernel asked the daemon once per operation, then remembered.
    assert_eq!(xattr_requests(&addr, "getxattr"), 1.0, "GETXATTR requests");
    assert_eq!(xattr_requests(&addr, "setxattr"), 1.0, "SETXATTR requests");
    assert_eq!(std::fs::read(&file).unwrap().len(), 200 * 4096);
}

/// `isatty()` of a file on the mount (an ioctl, TCGETS, which Python's open() sends for every file) answers ENOTTY, as
/// on a local disk, and logs nothing: fuser's default logged a WARN of six lines per call.
#[test]
fn an_ioctl_is_enotty_and_logs_nothing() {
    let env = Env::new();
    let store = Store::local(env.path());
    let addr = free_metrics_addr();
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("metrics_addr={addr}")]);
    std::fs::write(m.path("f"), b"data").unwrap();
    for _ in 0..3 {
        let f = std::fs::File::open(m.path("f")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        assert_eq!(unsafe { libc::isatty(fd) }, 0);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOTTY), "isatty");
    }
    let ioctls = metric(&addr, "s3cryptfs_fuse_errors_total{op=\"ioctl\",errno=\"ENOTTY\"}");
    assert_eq!(ioctls, 3.0, "the daemon answered each ioctl");
    let log = m.log_text();
    assert!(!log.contains("Not Implemented"), "the log:\n{log}");
}
