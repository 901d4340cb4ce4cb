//! A frozen store (the S3 server stopped with SIGSTOP: connections are accepted by the kernel, nothing answers) must
//! not freeze the mount: with `-o timeout=T`, every syscall that needs the store returns within a few T, names and
//! attributes already known are served from memory, and nothing written is lost once the server answers again.
//!
//! Freezing the shared test server would stall every test running beside this one, so this test starts a LocalStack of
//! its own on a free port with `scripts/s3-server.sh` (same venv and certificates as the shared one; about 2 s) and
//! freezes only that. A guard sends SIGCONT on every exit path, then the server is stopped. One test kills its server
//! instead (a dead store) and starts another on the same port; two freeze a GCS emulator and an Azurite of their own
//! (scripts/gcs.sh, scripts/azurite.sh) under a streaming writer. One puts a proxy in front of the shared server that
//! hangs only some requests (the later ranges of a parallel listing), a partial freeze no signal to the server can
//! make.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// The mount's `timeout=` in seconds.
const TIMEOUT_SECS: u64 = 3;
/// What each syscall is allowed while the store is frozen: the requirement is "about twice the timeout"; four times
/// leaves room for a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(4 * TIMEOUT_SECS);

/// A LocalStack of this test's own, started and stopped by scripts/s3-server.sh.
struct PrivateServer {
    port: u16,
    pid: i32,
    endpoint: String,
    /// `$S3CRYPTFS_TEST_HOME/server.env` as it was before our start overwrote it ("the last server started"), put
    /// back afterwards so that it keeps naming the shared server.
    saved_env: Option<(PathBuf, Vec<u8>)>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-server.sh")
}

fn test_home() -> PathBuf {
    std::env::var_os("S3CRYPTFS_TEST_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/s3cryptfs-test")
    })
}

impl PrivateServer {
    fn start() -> PrivateServer {
        // A port nobody listens on right now (the script refuses a busy one).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env_file = test_home().join("server.env");
        let saved_env = fs::read(&env_file).ok().map(|b| (env_file, b));
        let out = Command::new(script()).arg("start").env("S3CRYPTFS_S3_PORT", port.to_string()).output().unwrap();
        let pid_file = test_home().join(format!("run/{port}/localstack.pid"));
        let pid = fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        let server = PrivateServer { port, pid, endpoint: format!("http://127.0.0.1:{port}"), saved_env };
        assert!(
            out.status.success() && pid > 0,
            "could not start a private LocalStack on port {port} (scripts/s3-server.sh start: {}; pid file {}): {}",
            out.status,
            pid_file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    /// A fresh bucket on this server. Creating it also wakes LocalStack's S3 service, whose first request takes
    /// seconds (longer than the mount's timeout).
    fn bucket(&self) -> Store {
        let bucket = unique("frozen").to_lowercase();
        let status = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "60", "-X", "PUT", &format!("{}/{bucket}", self.endpoint)])
            .status()
            .unwrap();
        assert!(status.success(), "could not create bucket {bucket} at {}", self.endpoint);
        Store::S3 { endpoint: self.endpoint.clone(), bucket }
    }

    /// Stops every process of the server (it was started with setsid: its pid is its process group) until the guard
    /// is dropped.
    fn freeze(&self) -> Frozen {
        signal_group(self.pid, libc::SIGSTOP);
        Frozen { pid: self.pid, since: Instant::now() }
    }
}

impl PrivateServer {
    /// Kills every process of the server (SIGKILL): connections are refused from now on, and its state is gone.
    fn kill(&self) {
        signal_group(self.pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        while unsafe { libc::kill(self.pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new server on the same port after [`PrivateServer::kill`], with `store`'s bucket created again (empty: this
    /// LocalStack keeps nothing across a restart).
    fn restart(&mut self, store: &Store) {
        let _ = Command::new(script()).arg("stop").env("S3CRYPTFS_S3_PORT", self.port.to_string()).status();
        let out = Command::new(script()).arg("start").env("S3CRYPTFS_S3_PORT", self.port.to_string()).output().unwrap();
        assert!(out.status.success(), "restart on port {}: {}", self.port, String::from_utf8_lossy(&out.stderr));
        let pid_file = test_home().join(format!("run/{}/localstack.pid", self.port));
        self.pid = fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        let Store::S3 { bucket, .. } = store else { panic!("a private server's store is S3") };
        let status = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "60", "-X", "PUT", &format!("{}/{bucket}", self.endpoint)])
            .status()
            .unwrap();
        assert!(status.success(), "could not create bucket {bucket} again");
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        signal_group(self.pid, libc::SIGCONT);
        let _ = Command::new(script()).arg("stop").env("S3CRYPTFS_S3_PORT", self.port.to_string()).status();
        if let Some((path, bytes)) = &self.saved_env {
            let _ = fs::write(path, bytes);
        }
    }
}

fn signal_group(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        unsafe {
            if libc::kill(-pid, sig) != 0 {
                libc::kill(pid, sig);
            }
        }
    }
}

/// SIGCONT on drop, so that a failing assertion never leaves the server stopped.
struct Frozen {
    pid: i32,
    since: Instant,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_group(self.pid, libc::SIGCONT);
        eprintln!("store was frozen for {:.1} s", self.since.elapsed().as_secs_f64());
    }
}

/// Runs `op` on a thread of its own and waits at most [`BOUND`] for it: a syscall stuck in the kernel cannot be
/// interrupted, so waiting on a channel is how the test fails in time instead of hanging with the syscall.
fn within<T: Send + 'static>(what: &str, op: impl FnOnce() -> T + Send + 'static) -> T {
    within_bound(what, BOUND, op)
}

/// [`within`], for a syscall allowed `bound`.
fn within_bound<T: Send + 'static>(what: &str, bound: Duration, op: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    match rx.recv_timeout(bound) {
        Ok(v) => {
            eprintln!("{what}: returned after {:.2} s", start.elapsed().as_secs_f64());
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked (see above)"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "{what} did not return within {} s while the store was frozen (mount option timeout={TIMEOUT_SECS})",
            bound.as_secs()
        ),
    }
}

/// Writes `data` to `file` 1 MiB at a time, each write [`within`] the bound and successful (`when`: the store's
/// state, for the message); gives the file back.
fn write_within(mut file: fs::File, data: &[u8], when: &str) -> fs::File {
    for (i, piece) in data.chunks(MIB).enumerate() {
        let piece = piece.to_vec();
        let (back, written) = within(&format!("streaming write {i}"), move || {
            let r = file.write_all(&piece);
            (file, r)
        });
        written.unwrap_or_else(|e| panic!("streaming write {i} {when}: {e}"));
        file = back;
    }
    file
}

fn errno_of<T>(r: &std::io::Result<T>) -> Option<i32> {
    r.as_ref().err().map(|e| e.raw_os_error().unwrap_or(-1))
}

#[test]
fn a_frozen_store_bounds_every_syscall_serves_known_names_and_loses_nothing() {
    let server = PrivateServer::start();
    let env = Env::new();
    let store = server.bucket();
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let opts = [timeout.as_str()];

    // Before the freeze: files in the store, then a fresh mount (empty caches) that knows some names and has a file
    // open for writing.
    let before = pattern(200_000, 1);
    let uncached = pattern(300_000, 2);
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    fs::write(m.path("before.bin"), &before).unwrap();
    fs::write(m.path("uncached.bin"), &uncached).unwrap();
    fs::write(m.path("known.txt"), b"known").unwrap();
    m.unmount();

    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    assert_eq!(fs::metadata(m.path("known.txt")).unwrap().len(), 5);
    assert_eq!(fs::metadata(m.path("before.bin")).unwrap().len(), before.len() as u64);
    // Open, nothing read yet: a read() while frozen has to ask the store.
    let unopened = fs::File::open(m.path("uncached.bin")).unwrap();
    let mut staged = fs::File::create(m.path("staged.bin")).unwrap();
    let first = pattern(100_000, 3);
    let second = pattern(150_000, 4);
    staged.write_all(&first).unwrap();
    // Past attr_timeout (1 s): the kernel asks the daemon again, and the daemon's own knowledge has expired too.
    std::thread::sleep(Duration::from_millis(1500));

    let frozen = server.freeze();
    let dir = m.dir.clone();

    // write + close of a file open for writing: the upload cannot finish; close must say so in time.
    let during = second.clone();
    let closed = within("write + close", move || {
        staged.write_all(&during)?;
        let fd = staged.into_raw_fd();
        // SAFETY: `fd` was just taken out of the File, so it is closed exactly once, here.
        let rc = unsafe { libc::close(fd) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    });
    eprintln!("close while frozen: {closed:?}");

    // stat of a known name: answered from memory, successfully.
    let d = dir.clone();
    let known = within("stat of a known name", move || fs::metadata(d.join("known.txt")));
    assert_eq!(known.as_ref().map(|m| m.len()).ok(), Some(5), "stat of a known name while frozen: {known:?}");

    // read of a file whose content was never fetched: needs the store, fails in time.
    let read = within("read of an uncached file", move || {
        let mut f = unopened;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).map(|_| bytes)
    });
    eprintln!("read while frozen: {:?}", errno_of(&read));
    if let Ok(bytes) = &read {
        assert_bytes(bytes, &uncached, "uncached.bin read while frozen");
    }

    // create of a new name: needs the store to know the name is free.
    let d = dir.clone();
    let created = within("create", move || fs::File::create(d.join("new.txt")).map(drop));
    eprintln!("create while frozen: {:?}", errno_of(&created));

    // A second stat of the known name is served at once.
    let d = dir.clone();
    let start = Instant::now();
    within("stat of a known name, again", move || fs::metadata(d.join("known.txt"))).unwrap();
    assert!(start.elapsed() < BOUND);
    drop(frozen);

    // The store answers again: what was written before and during the freeze is all there, first through this mount
    // (the staged file reads back from staging), then after an unmount (which uploads it) through a fresh one.
    let mut want = first.clone();
    want.extend_from_slice(&second);
    assert_bytes(fs::read(m.path("staged.bin")).unwrap(), &want, "staged.bin after the freeze");
    assert_bytes(fs::read(m.path("uncached.bin")).unwrap(), &uncached, "uncached.bin after the freeze");
    let log = m.unmount();
    eprintln!("--- log of the mount that saw the freeze ---\n{log}");
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    assert_bytes(fs::read(m.path("staged.bin")).unwrap(), &want, "staged.bin after a remount");
    assert_bytes(fs::read(m.path("before.bin")).unwrap(), &before, "before.bin after a remount");
    assert_bytes(fs::read(m.path("uncached.bin")).unwrap(), &uncached, "uncached.bin after a remount");
    assert_eq!(fs::read(m.path("known.txt")).unwrap(), b"known");
    m.unmount();
}

/// Creates `name` on `m` and writes `head` to it in 1 MiB writes, so that a stream's parts are on their way; the file
/// stays open for the rest.
fn start_stream(m: &Mount, name: &str, head: &[u8]) -> fs::File {
    let mut file = fs::File::create(m.path(name)).unwrap();
    for piece in head.chunks(MIB) {
        file.write_all(piece).unwrap();
    }
    file
}

/// close(2) of `file`, with its result (dropping a File ignores it).
fn close_reporting(file: fs::File) -> std::io::Result<()> {
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just taken out of the File, so it is closed exactly once, here.
    let rc = unsafe { libc::close(fd) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

const MIB: usize = 1 << 20;

/// The two upload paths of issue 13 meet a frozen store: a file streaming its parts while it is written, and a large
/// file changed in place. Every write still returns in time (and succeeds: the bytes are in the write journal, the
/// stream is abandoned), close fails in time, and once the store answers again both files are whole and exact,
/// through the same mount and after a remount.
#[test]
fn a_frozen_store_bounds_a_streaming_writer_and_an_in_place_change_and_loses_nothing() {
    use std::os::unix::fs::FileExt;
    let server = PrivateServer::start();
    let env = Env::new();
    let store = server.bucket();
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let opts = [timeout.as_str()];
    let m = Mount::start_with(&env, &store, "cse-c", &opts);

    // A large file (streamed when written, so format version 3), open with one chunk already changed in place.
    let mut big = pattern(40 * MIB, 5);
    fs::write(m.path("big.bin"), &big).unwrap();
    let changed = fs::OpenOptions::new().write(true).open(m.path("big.bin")).unwrap();
    let first = pattern(65536, 7);
    changed.write_all_at(&first, 10 * MIB as u64).unwrap();
    big[10 * MIB..10 * MIB + 65536].copy_from_slice(&first);
    // A new file streaming: 24 MiB written, so parts are on their way.
    let streamed = pattern(40 * MIB, 6);
    let file = start_stream(&m, "stream.bin", &streamed[..24 * MIB]);

    let frozen = server.freeze();
    let file = write_within(file, &streamed[24 * MIB..], "while frozen");
    let closed = within("close of the streamed file", move || close_reporting(file));
    eprintln!("close of the streamed file while frozen: {closed:?}");
    let second = pattern(65536, 8);
    big[20 * MIB..20 * MIB + 65536].copy_from_slice(&second);
    let changed_closed = within("an aligned chunk written into the large file, then close", move || {
        changed.write_all_at(&second, 20 * MIB as u64)?;
        close_reporting(changed)
    });
    eprintln!("write + close of the large file while frozen: {changed_closed:?}");
    drop(frozen);

    assert_bytes(fs::read(m.path("stream.bin")).unwrap(), &streamed, "stream.bin after the freeze");
    assert_bytes(fs::read(m.path("big.bin")).unwrap(), &big, "big.bin after the freeze");
    let log = m.unmount();
    eprintln!("--- log of the mount that saw the freeze ---\n{log}");
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    assert_bytes(fs::read(m.path("stream.bin")).unwrap(), &streamed, "stream.bin after a remount");
    assert_bytes(fs::read(m.path("big.bin")).unwrap(), &big, "big.bin after a remount");
    m.unmount();
}

/// A store that freezes while a large file open for writing is read through (issue 13: the bytes a write did not
/// replace come from the stored version, read ahead as for a reader): every read returns within the bound, with the
/// right bytes (the write over the stored version) or EIO, never others. Once the store answers again, the open file
/// reads whole and exact through the same descriptor (a read-ahead cut short by the freeze left nothing wrong
/// behind), its close changes it in place (the stored header, with the data key, stays), and a remount reads the
/// same.
#[test]
fn a_frozen_store_during_the_read_ahead_of_a_file_open_for_writing_bounds_every_read_and_loses_nothing() {
    use std::os::unix::fs::FileExt;
    let server = PrivateServer::start();
    let env = Env::new();
    let store = server.bucket();
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let opts = [timeout.as_str()];
    let mut big = pattern(40 * MIB, 12);
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    fs::write(m.path("big.bin"), &big).unwrap();
    m.unmount();
    let header = || {
        let objects = store.raw_objects();
        let (_, bytes) = objects.into_iter().find(|(k, _)| k == "big.bin").expect("big.bin is stored");
        bytes[..512].to_vec()
    };
    let stored_header = header();
    // A fresh mount: nothing of the file in its caches, or in the kernel's.
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    let file = fs::OpenOptions::new().read(true).write(true).open(m.path("big.bin")).unwrap();
    file.write_all_at(b"changed", 3).unwrap();
    big[3..10].copy_from_slice(b"changed");
    // Read through the first 4 MiB: the read-ahead of the stored version is under way.
    let mut buf = vec![0u8; MIB];
    for i in 0..4 {
        file.read_exact_at(&mut buf, (i * MIB) as u64).unwrap();
        assert_bytes(&buf, &big[i * MIB..(i + 1) * MIB], "a read of the open file before the freeze");
    }

    let frozen = server.freeze();
    let file = std::sync::Arc::new(file);
    let mut served = 0;
    // A read may take four deadlines here, one more than the bound allows (11.9 s seen): it waits on a read-ahead
    // GET the store answered before it froze, whose body then stalls (a hung body, unlike a GET never answered, is
    // no reason not to ask again: `read::FetchEnd`), sends its own, and the kernel asks for the page once more.
    let bound = BOUND + Duration::from_secs(2 * TIMEOUT_SECS);
    for at in [4 * MIB, 5 * MIB + 4096, 12 * MIB, 30 * MIB + 8192] {
        let f = file.clone();
        let got = within_bound(&format!("a read of the open file at {at} while frozen"), bound, move || {
            let mut buf = vec![0u8; 65536];
            f.read_exact_at(&mut buf, at as u64).map(|_| buf)
        });
        match got {
            Ok(bytes) => {
                assert_bytes(&bytes, &big[at..at + 65536], "a read of the open file while frozen");
                served += 1;
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "a read at {at} while frozen: {e}"),
        }
    }
    eprintln!("{served} of 4 reads served while frozen");
    drop(frozen);

    let mut all = vec![0u8; big.len()];
    file.read_exact_at(&mut all, 0).unwrap();
    assert_bytes(&all, &big, "the open file read whole after the freeze");
    let file = std::sync::Arc::try_unwrap(file).expect("the test's only handle");
    close_reporting(file).unwrap();
    assert_bytes(fs::read(m.path("big.bin")).unwrap(), &big, "big.bin after close");
    assert!(header() == stored_header, "the close rewrote the file whole instead of changing it in place");
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    assert_bytes(fs::read(m.path("big.bin")).unwrap(), &big, "big.bin after a remount");
    m.unmount();
}

/// A store that dies (the server killed: connections refused) while a file streams: the remaining writes succeed in
/// time (into the write journal), close fails in time, the unmount does not hang, and the next start, with a store
/// that answers again, uploads the file whole and exact.
#[test]
fn a_dead_store_under_a_streaming_writer_loses_nothing() {
    let mut server = PrivateServer::start();
    let env = Env::new();
    let store = server.bucket();
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let opts = [timeout.as_str()];
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    let streamed = pattern(40 * MIB, 9);
    let file = start_stream(&m, "stream.bin", &streamed[..24 * MIB]);

    server.kill();
    let file = write_within(file, &streamed[24 * MIB..], "with the store dead");
    let closed = within("close of the streamed file", move || close_reporting(file));
    assert!(closed.is_err(), "close cannot succeed with the store dead");
    let start = Instant::now();
    let (status, log) = m.unmount_with_status();
    eprintln!("unmount with the store dead: {status} after {:.1} s\n{log}", start.elapsed().as_secs_f64());
    // The daemon says what it could not upload, and exits with an error so that a service manager notices.
    assert!(!status.success() && log.contains("data left in the write journal key=stream.bin"), "{status}\n{log}");

    server.restart(&store);
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
    assert_bytes(fs::read(m.path("stream.bin")).unwrap(), &streamed, "stream.bin after the store came back");
    m.unmount();
}

/// An emulator of this test's own on a free port (scripts/gcs.sh: fake-gcs-server, about 0.2 s; scripts/azurite.sh:
/// Azurite, about 1 s), to freeze: GCS and Azure uploads in parts are requests of the mount's own, bounded their own
/// way (GCS: one chunk after another, `Deadline::with_serial_parts`; Azure: blocks, `store/azure.rs`), so their frozen
/// stores are cases of their own.
struct PrivateEmulator {
    /// The script under scripts/.
    script: &'static str,
    /// The script's variable for the port.
    port_var: &'static str,
    port: u16,
    pid: i32,
}

impl PrivateEmulator {
    fn script(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(self.script)
    }

    /// Starts `scripts/{script}` on a free port; `name` is its server's name in its run directory and pid file.
    fn start(script: &'static str, name: &'static str, port_var: &'static str) -> PrivateEmulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = PrivateEmulator { script, port_var, port, pid: 0 };
        let out = Command::new(server.script()).arg("start").env(port_var, port.to_string()).output().unwrap();
        let pid_file = test_home().join(format!("run/{name}-{port}/{name}.pid"));
        server.pid = fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && server.pid > 0, "scripts/{script} start on {port}: {err}");
        server
    }

    fn gcs() -> PrivateEmulator {
        Self::start("gcs.sh", "fake-gcs", "S3CRYPTFS_GCS_PORT")
    }

    fn azurite() -> PrivateEmulator {
        Self::start("azurite.sh", "azurite", "S3CRYPTFS_AZURITE_PORT")
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn freeze(&self) -> Frozen {
        signal_group(self.pid, libc::SIGSTOP);
        Frozen { pid: self.pid, since: Instant::now() }
    }
}

impl Drop for PrivateEmulator {
    fn drop(&mut self) {
        if self.pid > 0 {
            signal_group(self.pid, libc::SIGCONT);
        }
        let _ = Command::new(self.script()).arg("stop").env(self.port_var, self.port.to_string()).status();
    }
}

/// A frozen emulator under a file streaming its parts (mounted by `mount`; `replaces`: the file exists first, so its
/// upload is a conditional replacement): the writes after the freeze return in time, close fails in time, and once the
/// emulator answers again the file is whole and exact, through the same mount and after a remount.
fn a_stream_across_a_freeze(server: &PrivateEmulator, mount: impl Fn() -> Mount, replaces: bool) {
    let m = mount();
    if replaces {
        fs::write(m.path("stream.bin"), pattern(3 * MIB, 11)).unwrap();
    }
    let streamed = pattern(40 * MIB, 10);
    let file = start_stream(&m, "stream.bin", &streamed[..24 * MIB]);

    let frozen = server.freeze();
    let file = write_within(file, &streamed[24 * MIB..], "while frozen");
    let closed = within("close of the streamed file", move || close_reporting(file));
    assert!(closed.is_err(), "close cannot succeed with the store frozen");
    drop(frozen);

    assert_bytes(fs::read(m.path("stream.bin")).unwrap(), &streamed, "stream.bin after the freeze");
    m.unmount();
    let m = mount();
    assert_bytes(fs::read(m.path("stream.bin")).unwrap(), &streamed, "stream.bin after a remount");
    m.unmount();
}

/// [`a_stream_across_a_freeze`] on GCS: one resumable upload.
#[test]
fn a_frozen_gcs_store_bounds_a_streaming_writer_and_loses_nothing() {
    let server = PrivateEmulator::gcs();
    let env = Env::new();
    let store = Store::gcs_at(Some(server.endpoint()));
    let timeout = format!("timeout={TIMEOUT_SECS}");
    a_stream_across_a_freeze(&server, || Mount::start_with(&env, &store, "cse-c", &[timeout.as_str()]), false);
}

/// A cse-c mount of `prefix` in the test container of `server` (an Azurite of the test's own): object_store finds the
/// emulator through `AZURITE_BLOB_STORAGE_URL`, which names the shared one in this process's environment.
fn mount_private_azurite(server: &PrivateEmulator, env: &Env, prefix: &str) -> Mount {
    let dir = env.path().join(unique("mnt"));
    fs::create_dir_all(&dir).unwrap();
    let staging = env.path().join("staging");
    let opts = format!(
        "mode=cse-c,staging_dir={},key_file={},timeout={TIMEOUT_SECS}",
        staging.display(),
        env.key_file.display()
    );
    let log = env.path().join(format!("{}.log", unique("mount")));
    let child = Command::new(BIN)
        .args(["mount", "-f", "-o", &opts, &format!("az://s3cryptfs-test/{prefix}")])
        .arg(&dir)
        .env("AZURE_STORAGE_USE_EMULATOR", "true")
        .env("AZURITE_BLOB_STORAGE_URL", server.endpoint())
        .env("RUST_LOG", std::env::var("S3CRYPTFS_TEST_LOG").unwrap_or_else(|_| "s3cryptfs=info,warn".into()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Mount::adopt(dir, child, log).unwrap()
}

/// [`a_stream_across_a_freeze`] on Azure: blocks, committed with `If-Match` on the version replaced.
#[test]
fn a_frozen_azure_store_bounds_a_streaming_writer_and_loses_nothing() {
    let server = PrivateEmulator::azurite();
    let env = Env::new();
    let prefix = unique("frozen").to_lowercase();
    a_stream_across_a_freeze(&server, || mount_private_azurite(&server, &env, &prefix), true);
}

/// Issue 14: with the store frozen, a file whose pages are in the disk cache is read in full through a descriptor
/// opened before the freeze, within the bound: the disk cache stands in for the store (this mount has read nothing
/// yet, so every page comes from the disk), and nothing in the read path waits for the store.
#[test]
fn a_frozen_store_still_serves_what_the_disk_cache_holds() {
    let server = PrivateServer::start();
    let env = Env::new();
    let store = server.bucket();
    let cache = env.path().join("cache");
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let cache_dir = format!("cache_dir={}", cache.display());
    let plain = pattern(24 << 20, 7);
    {
        let m = Mount::start_with(&env, &store, "cse-c", &[timeout.as_str()]);
        fs::write(m.path("big"), &plain).unwrap();
    }
    {
        let addr = free_metrics_addr();
        let metrics = format!("metrics_addr={addr}");
        let m = Mount::start_with(&env, &store, "cse-c", &[timeout.as_str(), cache_dir.as_str(), metrics.as_str()]);
        assert_bytes(fs::read(m.path("big")).unwrap(), &plain, "cold read");
        assert!(
            wait_until(Duration::from_secs(20), || metric(&addr, "s3cryptfs_disk_cache_written_bytes_total")
                >= plain.len() as f64),
            "the pages did not reach the disk cache"
        );
    }
    let m = Mount::start_with(&env, &store, "cse-c", &[timeout.as_str(), cache_dir.as_str()]);
    let file = fs::File::open(m.path("big")).unwrap();
    let frozen = server.freeze();
    let got = within("a read of a file the disk cache holds", move || {
        use std::io::Read;
        let mut file = file;
        let mut got = Vec::new();
        file.read_to_end(&mut got).map(|_| got)
    });
    drop(frozen);
    assert_bytes(got.expect("read while the store was frozen"), &plain, "read from the disk cache while frozen");
}

/// A store that freezes while a file is fetched whole into the disk cache for a random reader (issue 13): every read
/// returns within the bound, with the right bytes or EIO, never others; the fetch gives up at its segments' deadline
/// instead of sending the rest of the file, segment after segment, into the frozen store; and once the store answers
/// again, the same random reads fetch what is missing whole, and then every page is served from the disk cache:
/// what the freeze cut short left nothing wrong there.
#[test]
fn a_frozen_store_during_a_whole_fetch_bounds_every_read_and_leaves_the_disk_cache_sound() {
    use common::reads::*;
    use std::os::unix::fs::FileExt;
    let server = PrivateServer::start();
    let env = Env::new();
    let store = server.bucket();
    let plain = write_medium(&env, &store, 31);
    let addr = free_metrics_addr();
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let opts = [timeout.as_str(), "max_memory=64M"];
    let m = mount_with_disk_cache(&env, &store, &env.path().join("dcache"), &addr, &opts);
    // Frozen as soon as the read that starts the whole fetch has returned: waiting first until the fetch was seen
    // landing in the disk cache once left it time to finish on a loaded machine (50.4 MB written at the first look).
    let file = fs::File::open(m.path("medium")).unwrap();
    pread_pages(&file, &plain, MEDIUM_READS.into_iter());
    let frozen = server.freeze();
    let in_flight = || metric(&addr, "s3cryptfs_store_requests_in_flight");
    assert!(wait_until(Duration::from_secs(1), || in_flight() > 0.0), "no whole fetch was under way at the freeze");
    let on_disk = metric(&addr, "s3cryptfs_disk_cache_written_bytes_total");
    assert!(on_disk < plain.len() as f64, "the whole fetch had ended before the freeze: {on_disk} bytes");
    eprintln!("frozen with {on_disk} of {} bytes written to the disk cache", plain.len());

    // The fetch's segments in flight end at their deadline, and no later one is sent: with 64 MiB of memory, eight
    // 2 MiB segments travel at once, so a fetch that went on would keep the store busy for several timeouts more
    // (sampled every 50 ms: a segment in flight for a whole timeout cannot be missed). Right after the freeze a
    // segment may still complete from what was on its way, and the fetch rightly sends the next: no request is in
    // flight for a moment, then some are (seen in CI). Those fail a timeout later at most, and from the first
    // failure on nothing new may be sent: so the check starts two timeouts after the freeze.
    std::thread::sleep(Duration::from_secs(2 * TIMEOUT_SECS + 1));
    let limit = Duration::from_secs(TIMEOUT_SECS);
    let late = 3 * TIMEOUT_SECS + 1;
    assert!(wait_until(limit, || in_flight() == 0.0), "requests still in flight {late} s into the freeze");
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(2 * TIMEOUT_SECS) {
        assert_eq!(in_flight(), 0.0, "a request was sent into the frozen store after the fetch's had failed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Pages across the file, far apart: the first may be on the disk already, the last ones likely not (each of
    // those takes up to two timeouts: the read's own GET, then the kernel's retry of the page).
    let file = std::sync::Arc::new(file);
    let mut served = 0;
    for at in [0u64, 24 << 20, (47 << 20) + 8192] {
        let f = file.clone();
        let got = within(&format!("a read at {at} while frozen"), move || {
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, at).map(|_| buf)
        });
        match got {
            Ok(bytes) => {
                assert_bytes(&bytes, &plain[at as usize..at as usize + 4096], "a page read while frozen");
                served += 1;
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "a read at {at} while frozen: {e}"),
        }
    }
    eprintln!("{served} of 3 reads served while frozen");
    drop(frozen);

    // Six more random reads, of pages not read before (a page the kernel has cached would not reach the mount), each
    // 2 MiB or more from the one before: whatever the reads above counted, the sixth at the latest starts a new whole
    // fetch.
    pread_pages(&file, &plain, [11u64, 41, 79, 113, 159, 177].into_iter().map(|quarter_mib| quarter_mib << 18));
    let cached = disk_cache_settled(&addr, plain.len());
    let log = m.log_text();
    let size = plain.len() as f64;
    assert!(cached >= size, "the whole fetch after the freeze did not complete the disk cache: {cached}\n{log}");
    every_page_served_locally(&addr, &file, &plain, "reads after the freeze and the whole fetch went to the store");
    drop(file);
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
}

/// A TCP proxy in front of the shared S3 server that passes every request on, except the ones its [`Hold`] picks
/// while `stall` is set: the case where some requests hang and others are answered, which freezing the whole
/// server never produces.
struct StallingProxy {
    endpoint: String,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Which requests a [`StallingProxy`] holds, and how.
#[derive(Clone)]
enum Hold {
    /// A listing that starts after a key or continues from a token (`start-after=`, `continuation-token=`: the
    /// second and later ranges of a parallel listing, `fs::listing`) is never passed on or answered. So the store
    /// answers a directory's index and its first page, and hangs on the rest.
    LaterRanges,
    /// A GET whose request line contains this text is answered with the server's status line and headers, and then
    /// no body: the headers have promised one, the bytes never come.
    BodyOf(&'static str),
}

impl StallingProxy {
    fn start(upstream: &str, hold: Hold) -> StallingProxy {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stall = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stall.clone(), stalled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let (s, n, hold, upstream) = (s.clone(), n.clone(), hold.clone(), upstream.clone());
                let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
                std::thread::spawn(move || Self::forward_requests(client, server, &upstream, &hold, &s, &n));
            }
        });
        StallingProxy { endpoint, stall, stalled }
    }

    /// Passes the client's requests (head, then a `Content-Length` body) to the server one by one, until one is to
    /// be held: then the connection is held until `stall` is cleared, and closed.
    fn forward_requests(
        client: std::net::TcpStream,
        mut server: std::net::TcpStream,
        upstream: &str,
        hold: &Hold,
        stall: &std::sync::atomic::AtomicBool,
        stalled: &std::sync::atomic::AtomicUsize,
    ) {
        use std::io::{BufRead, Read};
        use std::sync::atomic::Ordering;
        let mut client = std::io::BufReader::new(client);
        loop {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                match client.read_until(b'\n', &mut head) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            let text = String::from_utf8_lossy(&head).to_string();
            let first = text.lines().next().unwrap_or_default().to_string();
            let held = stall.load(Ordering::SeqCst)
                && match hold {
                    Hold::LaterRanges => first.contains("start-after=") || first.contains("continuation-token="),
                    Hold::BodyOf(text) => first.starts_with("GET ") && first.contains(text),
                };
            if held {
                stalled.fetch_add(1, Ordering::SeqCst);
                if let Hold::BodyOf(_) = hold {
                    // The request goes to the server on a connection of its own; only its answer's head comes back.
                    let answer_head = Self::head_of_answer(upstream, &head);
                    if client.get_mut().write_all(&answer_head).is_err() {
                        return;
                    }
                }
                while stall.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = client.get_ref().shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
                return;
            }
            let length = text
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if server.write_all(&head).is_err()
                || std::io::copy(&mut (&mut client).take(length), &mut server).map_or(true, |n| n != length)
            {
                return;
            }
        }
    }

    /// Sends the request `head` (a GET: no body) to the server on a new connection and returns its answer's status
    /// line and headers, up to and including the blank line, without any byte of the body.
    fn head_of_answer(upstream: &str, head: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut server = std::net::TcpStream::connect(upstream).unwrap();
        server.write_all(head).unwrap();
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            server.read_exact(&mut byte).expect("the server answers the held GET");
            answer.push(byte[0]);
        }
        let status = String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string();
        assert!(status.starts_with("HTTP/1.1 200"), "the held GET was answered {status}");
        answer
    }
}

/// Directory `d` of `files` files (`f1`… each holding its number; then `more` runs in the mount's root), written by a
/// mount in `mode` straight to the shared S3 server; then a mount in `mode` with `timeout=` through a
/// [`StallingProxy`] that holds `hold`, which has looked `d` up. Returns the store, the proxy and that mount.
fn behind_a_proxy(env: &Env, mode: &str, files: usize, more: &str, hold: Hold) -> (Store, StallingProxy, Mount) {
    let store = Store::s3();
    let a = Mount::start(env, &store, mode);
    fs::create_dir(a.path("d")).unwrap();
    sh(&format!("for i in $(seq 1 {files}); do echo $i > d/f$i; done; {more}"), &a.dir);
    a.unmount();
    let Store::S3 { endpoint, bucket } = &store else { panic!("Store::s3 is S3") };
    let proxy = StallingProxy::start(endpoint, hold);
    let through = Store::S3 { endpoint: proxy.endpoint.clone(), bucket: bucket.clone() };
    let timeout = format!("timeout={TIMEOUT_SECS}");
    let m = Mount::start_with(env, &through, mode, &[timeout.as_str()]);
    fs::metadata(m.path("d")).unwrap();
    (store, proxy, m)
}

/// A directory of 1,000 files is listed in two ranges (its index names more than 990). With the store answering the
/// index and the first range but never the second, a cold `ls` returns an error within the bound, and once the
/// store answers again the same mount lists every name: the range that finished is not taken for the whole
/// directory, and nothing stays stuck.
#[test]
fn a_listing_whose_later_ranges_hang_fails_in_time_and_lists_in_full_afterwards() {
    const FILES: usize = 1000;
    let env = Env::new();
    let (_, proxy, m) = behind_a_proxy(&env, "none", FILES, "", Hold::LaterRanges);
    let d = m.path("d");
    let listed = within("ls of a directory whose second range hangs", move || {
        fs::read_dir(&d).and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect::<Result<Vec<_>, _>>())
    });
    let stalled = proxy.stalled.load(std::sync::atomic::Ordering::SeqCst);
    assert!(stalled > 0, "no listing from a key was sent: the directory was not listed in ranges");
    let count = listed.as_ref().map(Vec::len);
    assert!(listed.is_err(), "a listing that never got its second range succeeded with {count:?} names");
    eprintln!("ls while a range hung: {:?} ({stalled} requests held)", errno_of(&listed));

    proxy.stall.store(false, std::sync::atomic::Ordering::SeqCst);
    let d = m.path("d");
    let mut names: Vec<String> = within("ls once the store answers", move || {
        fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    });
    names.sort();
    let mut want: Vec<String> = (1..=FILES).map(|i| format!("f{i}")).collect();
    want.sort();
    assert_eq!(names, want, "the listing after the hang");
    assert_eq!(fs::read(m.path("d/f1000")).unwrap(), b"1000\n");
    m.unmount();
}

/// A directory's index whose GET is answered with headers and then no body (a store that hangs mid-answer): a cold
/// `readdir` returns within the bound, the listing started from the headers' cut names goes on, the index is given
/// up when its body misses the deadline (once: it is not read again for the attributes, which used to cost a second
/// `timeout=`), and the attributes come from the objects instead (as for a directory without an index). Every name
/// is listed with its size and mode and the files read back; the index itself is not harmed, and a mount that
/// reaches the store directly lists from it.
#[test]
fn an_index_whose_body_hangs_after_its_headers_is_given_up_in_time_and_every_file_is_listed() {
    const FILES: usize = 1200;
    let env = Env::new();
    let (store, proxy, m) = behind_a_proxy(&env, "cse-c", FILES, "chmod 600 d/f7", Hold::BodyOf(".s3cryptfs-index"));
    let d = m.path("d");
    let names = within("readdir of a directory whose index body hangs", move || {
        fs::read_dir(&d).and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>())
    });
    // Once: the listing reads the index on the way, and what came of that is not asked for again.
    let held = proxy.stalled.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(held, 1, "GETs of the directory's index held while it was read");
    let mut listed: Vec<(String, u64, u32)> = names
        .expect("readdir while the index body hung")
        .iter()
        .map(|p| {
            let md = fs::symlink_metadata(p).unwrap();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            (name, md.len(), md.permissions().mode() & 0o777)
        })
        .collect();
    listed.sort();
    let mut want: Vec<(String, u64, u32)> = (1..=FILES)
        .map(|i| (format!("f{i}"), format!("{i}\n").len() as u64, if i == 7 { 0o600 } else { 0o644 }))
        .collect();
    want.sort();
    assert_eq!(listed.len(), want.len(), "names listed while the index body hung");
    assert_eq!(listed, want, "names, sizes and modes listed while the index body hung");
    assert_eq!(fs::read(m.path("d/f1200")).unwrap(), b"1200\n");
    proxy.stall.store(false, std::sync::atomic::Ordering::SeqCst);
    let log = m.unmount();
    eprintln!("{}", log.lines().filter(|l| l.contains("index")).take(5).collect::<Vec<_>>().join("\n"));

    // The index itself was not harmed: a mount through the store directly lists the directory from it.
    let b = Mount::start(&env, &store, "cse-c");
    let count = fs::read_dir(b.path("d")).unwrap().count();
    assert_eq!(count, FILES);
    assert_eq!(fs::metadata(b.path("d/f7")).unwrap().permissions().mode() & 0o777, 0o600);
    b.unmount();
}
