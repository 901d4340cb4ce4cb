//! The thin `fuser::Filesystem` adapter: trace, call `fs`, reply or errno — nothing else.
//!
//! fuser calls these methods on its loop thread(s). Each request's work is polled once right there (`run`): most
//! requests — a lookup or stat answered from memory, a write into the staged file, a read the page cache holds — are
//! done by then and replied to without a hand-over to another thread, which would cost two context switches, more
//! than such a request's own work. One that has to wait (for the store, a lock, a download) is handed to the tokio
//! runtime together with its reply (every `Reply*` is `Send`), so the loop goes straight back to the kernel and
//! reads and writes of different files proceed in parallel. Errors are logged here, once, with the operation and the
//! object; expected ones (ENOENT on lookup and the like) are not logged.

use std::ffi::OsStr;
use std::path::Path;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::fs::{Attr, Caller, Error, FileKind, Fs, OpenMode, SetAttr};

/// A copy of one write's data, in a buffer of `crate::iobuf` that goes back there when dropped.
struct WriteBuf(Vec<u8>);

impl WriteBuf {
    fn copy_of(data: &[u8]) -> WriteBuf {
        let mut buf = crate::iobuf::take(data.len());
        buf.extend_from_slice(data);
        WriteBuf(buf)
    }
}

impl std::ops::Deref for WriteBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        crate::iobuf::give(std::mem::take(&mut self.0));
    }
}

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
    ttl: Duration,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle) -> Self {
        let ttl = fs.config().attr_ttl;
        FuseAdapter { fs, rt, ttl }
    }

    /// Does one request's `work`: polled once on this loop thread, within the runtime's context; if it is not done,
    /// the runtime takes it over. The first poll's waker does nothing, and needs not: the runtime polls a task it
    /// is given at once, and every future registers the waker of its latest poll.
    fn run<F: Future<Output = ()> + Send + 'static>(&self, work: F) {
        let mut work = Box::pin(work);
        let _context = self.rt.enter();
        let mut cx = Context::from_waker(Waker::noop());
        if work.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(work);
        }
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Socket => FileType::Socket,
    }
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 65536,
        flags: 0,
    }
}

fn errno(op: &'static str, e: &Error) -> Errno {
    let errno = e.errno();
    crate::metrics::fuse_error(op, errno);
    if !e.is_expected() {
        // The fs error already names the object key; the chain adds the causes.
        tracing::error!(op, error = %crate::error_text::error_chain(e), "request failed");
    }
    Errno::from_i32(errno)
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// How the filesystem asks the kernel to forget a name (`FUSE_NOTIFY_INVAL_ENTRY`; see `fs::trim`). A name the kernel
/// does not hold (any more) is no error worth more than a trace.
pub fn name_forgetter(notifier: fuser::Notifier) -> crate::fs::trim::NameForgetter {
    Arc::new(move |parent, name| {
        if let Err(e) = notifier.inval_entry(INodeNo(parent), name) {
            tracing::trace!(parent, ?name, error = %e, "the kernel did not forget a name");
        }
    })
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open() instead of as a separate truncate, so opening for overwrite never downloads.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        // A directory read carries each entry's attributes (READDIRPLUS, every time: not READDIRPLUS_AUTO, which
        // uses it for the first batch only, while `ls -l` reads every batch before its first stat). The listing just
        // read them, so `ls -l` and `find -ls` need no LOOKUP per name afterwards.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {}

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::metrics::fuse_lookup();
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.run(async move {
            match fs.lookup_entry(parent.0, &name).await {
                Ok((a, ttl)) => reply.entry(&ttl, &to_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        self.run(async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&ttl, &to_attr(&a)),
                Err(e) => reply.error(errno("getattr", &e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, ttl, who) = (self.fs.clone(), self.ttl, caller(req));
        let changes = SetAttr { mode, uid, gid, size, atime: atime.map(time), mtime: mtime.map(time) };
        self.run(async move {
            match fs.setattr(ino.0, changes, fh.map(|f| f.0), who).await {
                Ok(a) => reply.attr(&ttl, &to_attr(&a)),
                Err(e) => reply.error(errno("setattr", &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno("readlink", &e)),
            }
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (fs, ttl, name, who) = (self.fs.clone(), self.ttl, name.to_owned(), caller(req));
        self.run(async move {
            match fs.mkdir(parent.0, &name, mode & !umask, who).await {
                Ok(a) => reply.entry(&ttl, &to_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mkdir", &e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.run(async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.run(async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            }
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (fs, ttl, who) = (self.fs.clone(), self.ttl, caller(req));
        let (name, target) = (link_name.to_owned(), target.as_os_str().to_owned());
        self.run(async move {
            match fs.symlink(parent.0, &name, &target, who).await {
                Ok(a) => reply.entry(&ttl, &to_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("symlink", &e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (fs, name, newname) = (self.fs.clone(), name.to_owned(), newname.to_owned());
        self.run(async move {
            match fs.rename(parent.0, &name, newparent.0, &newname, noreplace).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rename", &e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, pid) = (self.fs.clone(), process_of(req.pid()));
        self.run(async move {
            match fs.open(ino.0, OpenMode::from_flags(flags.0)).await {
                Ok(fh) => {
                    fs.note_opener(fh, pid);
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.read(fh.0, offset, size).await {
                Ok(d) => {
                    crate::metrics::fs_read(d.len());
                    reply.data(&d);
                    crate::iobuf::give(d);
                }
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (fs, data) = (self.fs.clone(), WriteBuf::copy_of(data));
        self.run(async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => {
                    crate::metrics::fs_written(n as usize);
                    reply.written(n)
                }
                Err(e) => reply.error(errno("write", &e)),
            }
        });
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let (fs, pid) = (self.fs.clone(), process_of(req.pid()));
        self.run(async move {
            match fs.flush_by(fh.0, pid).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.release(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            }
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.fsync(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsync", &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno("opendir", &e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs.readdir(fh.0) {
            Ok(e) => e,
            Err(e) => {
                reply.error(errno("readdir", &e));
                return;
            }
        };
        // Offsets: 1 = ".", 2 = "..", 3.. = entries; each entry carries the offset of the one after it.
        let parent = self.fs.parent_of(ino.0);
        let mut pos = offset;
        while pos < 2 + entries.len() as u64 {
            let full = match pos {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(parent), 2, FileType::Directory, ".."),
                n => {
                    let e = &entries[(n - 2) as usize];
                    reply.add(INodeNo(e.ino), n + 1, kind(e.kind), &e.name)
                }
            };
            if full {
                break;
            }
            pos += 1;
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let entries = match self.fs.readdir(fh.0) {
            Ok(e) => e,
            Err(e) => {
                reply.error(errno("readdirplus", &e));
                return;
            }
        };
        // Offsets as in `readdir`. Each named entry counts a lookup, taken back if it did not fit
        // (`Fs::lookup_listed_each`). The kernel links no node for "." and "..": their attributes give only inode
        // numbers.
        // An entry gone since the listing is not shown, as a readdir after its removal would not show it.
        let parent = self.fs.parent_of(ino.0);
        let mut pos = offset;
        while pos < 2 {
            let dir = if pos == 0 { ino.0 } else { parent };
            if let Some(a) = self.fs.attr_in_memory(dir) {
                let name = if pos == 0 { "." } else { ".." };
                if reply.add(INodeNo(a.ino), pos + 1, name, &Duration::ZERO, &to_attr(&a), Generation(0)) {
                    reply.ok();
                    return;
                }
            }
            pos += 1;
        }
        if let Some(rest) = entries.get((pos - 2) as usize..) {
            let first = pos;
            self.fs.lookup_listed_each(ino.0, rest, |i, name, found| {
                let Some((a, ttl, _)) = found else { return false };
                reply.add(INodeNo(a.ino), first + i as u64 + 1, name, &ttl, &to_attr(&a), Generation(0))
            });
        }
        self.fs.lookups_done();
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.fsyncdir(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsyncdir", &e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fs, ttl, name, who, pid) = (self.fs.clone(), self.ttl, name.to_owned(), caller(req), process_of(req.pid()));
        if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        self.run(async move {
            match fs.create(parent.0, &name, mode & !umask, flags, who).await {
                Ok((a, fh)) => {
                    fs.note_opener(fh, pid);
                    reply.created(&ttl, &to_attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }

    // No ioctl is supported: ENOTTY, as a file on ext4 answers a terminal's ioctl. Python's open() and isatty() send
    // one (TCGETS) for every file they open, and the kernel does not remember an ioctl's ENOSYS, so fuser's default
    // (ENOSYS and a warning) wrote a six-line WARN to the log per file opened. Counted as FUSE errors in the metrics.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        crate::metrics::fuse_error("ioctl", libc::ENOTTY);
        reply.error(Errno::ENOTTY);
    }

    // Extended attributes are not stored. ENOSYS, not ENOTSUP: only ENOSYS makes the kernel remember that the
    // operation is unimplemented (it then answers EOPNOTSUPP, the same errno as ENOTSUP, itself); with ENOTSUP it
    // asks again for every WRITE (security.capability), one round trip per write. Counted as FUSE errors, so the
    // metrics show that it asked once.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        crate::metrics::fuse_error("getxattr", libc::ENOSYS);
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        crate::metrics::fuse_error("listxattr", libc::ENOSYS);
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        crate::metrics::fuse_error("setxattr", libc::ENOSYS);
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        crate::metrics::fuse_error("removexattr", libc::ENOSYS);
        reply.error(Errno::ENOSYS);
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let (fs, ttl, name, who) = (self.fs.clone(), self.ttl, name.to_owned(), caller(req));
        // The type bits pass through; the umask applies to the permissions only.
        let mode = (mode & libc::S_IFMT) | (mode & 0o7777 & !umask);
        self.run(async move {
            match fs.mknod(parent.0, &name, mode, rdev, who).await {
                Ok(a) => reply.entry(&ttl, &to_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mknod", &e)),
            }
        });
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        // Objects cannot share content under two keys; hard links are not supported.
        reply.error(Errno::EPERM);
    }
}

/// The process (thread group) of the thread `tid` that sent a request: FUSE reports the calling thread, and a
/// multi-threaded writer may open on one thread and close on another. Falls back to `tid` if /proc cannot say.
/// Paid on every open, create and close, so the common case is one syscall: `tgkill(tid, tid, 0)` sends nothing and
/// finds the thread only if it leads its own group (EPERM, another user's process, still means found). Any other
/// thread costs one read of the head of `/proc/TID/status`: its `Tgid:` line comes fourth, after `Name:` (at most
/// 64 bytes even with every character escaped), `Umask:` and `State:`.
fn process_of(tid: u32) -> u32 {
    use std::io::Read;
    if leads_its_group(tid) {
        return tid;
    }
    let mut head = [0u8; 512];
    let n = std::fs::File::open(format!("/proc/{tid}/status")).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    tgid_in(&head[..n]).unwrap_or(tid)
}

/// Whether thread `tid` exists and is its process's main thread (its thread id is the process id).
fn leads_its_group(tid: u32) -> bool {
    let Ok(id) = libc::pid_t::try_from(tid) else { return false };
    if id <= 0 {
        return false;
    }
    // SAFETY: signal 0 is never delivered; the call only looks the thread up and checks permission.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, id, id, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The `Tgid:` of the head of a `/proc/TID/status`.
fn tgid_in(head: &[u8]) -> Option<u32> {
    let valid = std::str::from_utf8(head).map_or_else(|e| e.valid_up_to(), str::len);
    let text = std::str::from_utf8(&head[..valid]).unwrap_or("");
    // Whole lines only: the read may have cut the last one.
    let text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    text.lines().find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_of_a_thread_is_its_thread_group() {
        // Asked about a thread other than the process's main one, while that thread runs.
        let (tid, process) = std::thread::spawn(|| {
            let tid = unsafe { libc::gettid() } as u32;
            (tid, process_of(tid))
        })
        .join()
        .unwrap();
        assert_ne!(tid, std::process::id());
        assert_eq!(process, std::process::id());
        // The main thread leads its group, another thread does not, and neither does a thread that is gone.
        assert!(leads_its_group(std::process::id()));
        assert!(!std::thread::spawn(|| leads_its_group(unsafe { libc::gettid() } as u32)).join().unwrap());
        assert!(!leads_its_group(u32::MAX - 1));
        assert!(!leads_its_group(0));
        // A line cut at the end of the read is not taken for a whole one; no Tgid line gives None.
        assert_eq!(tgid_in(b"Name:\tx\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\nNgid:\t0\n"), Some(42));
        assert_eq!(tgid_in(b"Name:\tx\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4"), None);
        assert_eq!(tgid_in(b"Name:\tx\nUmask:\t0022\n"), None);
        // A thread that does not exist (any more) is its own process.
        assert_eq!(process_of(u32::MAX - 1), u32::MAX - 1);
    }
}
