//! The key agent through the real binary: `s3cryptfs agent`, `key add|list|remove`, `agent lock|stop`, raw protocol
//! abuse, peer credentials, and what the agent process exposes through /proc.
//!
//! Each test starts its own agent on a socket in its own temporary directory. Tests that run a client or the agent as
//! another user (`nobody`, through `setpriv`) need root, as the test suite runs; without root they fail saying so.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s3cryptfs::crypto::KeyHistory;

const BIN: &str = env!("CARGO_BIN_EXE_s3cryptfs");
const NOBODY: u32 = 65534;
const MAX_BODY_LEN: u32 = 64 * 1024;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(15)
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test runs a process as `nobody` and must run as root");
}

/// Runs `s3cryptfs ARGS` with `stdin` and returns its output.
fn s3cryptfs(args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_as(None, args, stdin)
}

/// Runs `s3cryptfs ARGS`, as user `uid` (through setpriv) when given.
fn run_as(uid: Option<u32>, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into(), BIN.into()]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("spawning s3cryptfs");
    if let Some(input) = stdin {
        // A command that fails before reading its input closes the pipe early; that is its answer, not an error.
        if let Err(e) = child.stdin.take().unwrap().write_all(input) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing to s3cryptfs: {e}");
        }
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn assert_ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed ({}): {}", out.status, text(out));
    text(out)
}

fn assert_fails(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "command should have failed with exit code 1: {}", text(out));
    text(out)
}

/// A new key file (mode 0600) holding `n` fresh keys, and its key lines.
fn key_file(dir: &Path, name: &str, n: usize) -> (PathBuf, Vec<String>) {
    let mut lines = Vec::new();
    for _ in 0..n {
        let out = s3cryptfs(&["keygen"], None);
        lines.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    let path = dir.join(name);
    std::fs::write(&path, format!("# test key {name}\n{}\n", lines.join("\n"))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, lines)
}

fn fingerprints(lines: &[String]) -> Vec<String> {
    KeyHistory::parse(&lines.join("\n")).unwrap().fingerprints().iter().map(ToString::to_string).collect()
}

/// Asserts that no key line (nor a recognisable part of one) appears in `haystack`.
fn assert_no_material(what: &str, haystack: &str, lines: &[String]) {
    for line in lines {
        assert!(!haystack.contains(line.as_str()), "{what} contains a key: {haystack}");
        assert!(!haystack.contains(&line[..16]), "{what} contains part of a key: {haystack}");
    }
}

/// A frame: 4-byte big-endian length, then the body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads one reply frame as JSON; `None` when the agent closed the connection.
fn read_reply(s: &mut UnixStream) -> Option<serde_json::Value> {
    let mut prefix = [0u8; 4];
    match s.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("reading a reply: {e}"),
    }
    let len = u32::from_be_bytes(prefix);
    assert!(len <= MAX_BODY_LEN, "reply longer than the protocol allows: {len}");
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).unwrap();
    Some(serde_json::from_slice(&body).expect("a reply is JSON"))
}

fn exchange(s: &mut UnixStream, body: &[u8]) -> serde_json::Value {
    s.write_all(&frame(body)).unwrap();
    read_reply(s).expect("a reply")
}

fn assert_error(reply: &serde_json::Value, code: &str) {
    assert_eq!(reply["v"], 1, "{reply}");
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{reply}");
}

/// The agent's pid if it answers a ping on `socket` now.
fn ping(socket: &Path) -> Option<u64> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(&frame(br#"{"v":1,"op":"ping"}"#)).ok()?;
    let reply = read_reply(&mut s)?;
    reply["pid"].as_u64()
}

fn proc_file(pid: u32, name: &str) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/{name}")).unwrap()
}

fn proc_status_field(pid: u32, field: &str) -> String {
    let status = String::from_utf8(proc_file(pid, "status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in status"))
        .trim()
        .to_string()
}

/// An `s3cryptfs agent -f` child with its stderr (the log) collected.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Agent {
    fn start(socket: &Path) -> Agent {
        Agent::start_as(None, socket)
    }

    fn start_as(uid: Option<u32>, socket: &Path) -> Agent {
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into(), BIN.into()]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(["agent", "-f", "--socket"])
            .arg(socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the agent");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut agent = Agent { child, socket: socket.into(), log };
        let end = deadline();
        while ping(socket).is_none() {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("the agent exited ({status}) before answering: {}", agent.log());
            }
            assert!(Instant::now() < end, "the agent did not answer on {}: {}", socket.display(), agent.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).to_string()
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let end = deadline();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < end, "the agent's log never said '{needle}': {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the agent to exit and returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let end = deadline();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < end, "the agent did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn keys_added_from_a_file_and_from_stdin_are_listed_fetched_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (file_a, lines_a) = key_file(tmp.path(), "a", 1);
    let (file_b, lines_b) = key_file(tmp.path(), "b", 2);
    let all: Vec<String> = lines_a.iter().chain(&lines_b).cloned().collect();
    let socket = tmp.path().join("agent.sock");
    let agent = Agent::start(&socket);
    let s = agent.socket();

    let out =
        assert_ok(&s3cryptfs(&["key", "add", "alpha", "--from-file", file_a.to_str().unwrap(), "--socket", s], None));
    assert!(out.contains("added key 'alpha'"), "{out}");
    assert_no_material("key add output", &out, &all);
    // From standard input (a pipe): the whole key file, comments included.
    let piped = std::fs::read(&file_b).unwrap();
    let out = assert_ok(&s3cryptfs(&["key", "add", "beta", "--socket", s], Some(&piped)));
    assert!(out.contains(&format!("added key 'beta' (2 keys: {})", fingerprints(&lines_b).join(" "))), "{out}");

    let list = s3cryptfs(&["key", "list", "--socket", s], None);
    let stdout = String::from_utf8(list.stdout.clone()).unwrap();
    assert_ok(&list);
    let rows: Vec<Vec<&str>> = stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    let fa = fingerprints(&lines_a);
    let fb = fingerprints(&lines_b);
    assert_eq!(
        rows,
        vec![vec!["alpha", "1", "key", fa[0].as_str()], vec!["beta", "2", "keys", fb[0].as_str(), fb[1].as_str()]]
    );
    assert_no_material("key list output", &text(&list), &all);

    // A mount's view: the library call returns the same history, in order.
    let b = s3cryptfs::agent::fetch_key(&socket, "beta").unwrap();
    assert_eq!(b.fingerprints().iter().map(ToString::to_string).collect::<Vec<_>>(), fb);
    let a = s3cryptfs::agent::fetch_key(&socket, "alpha").unwrap();
    assert_eq!(a.encrypting_key().fingerprint().to_string(), fa[0]);

    // The agent's argv, environment and log never held the keys; core dumps are off.
    let pid = agent.pid();
    for name in ["cmdline", "environ"] {
        assert_no_material(name, &String::from_utf8_lossy(&proc_file(pid, name)), &all);
    }
    assert_no_material("the agent's log", &agent.log(), &all);
    let limits = String::from_utf8(proc_file(pid, "limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().collect::<Vec<_>>()[4..6], ["0", "0"], "{core}");
    // Running as root, the agent locks all of its memory.
    let locked_kb: u64 = proc_status_field(pid, "VmLck").trim_end_matches(" kB").trim().parse().unwrap();
    assert!(locked_kb > 0, "VmLck is 0: the agent's memory is not locked");

    assert_ok(&s3cryptfs(&["key", "remove", "alpha", "--socket", s], None));
    let err = s3cryptfs::agent::fetch_key(&socket, "alpha").unwrap_err().to_string();
    assert!(err.contains("no key named 'alpha'") && err.contains("s3cryptfs key add alpha"), "{err}");
    let out = assert_fails(&s3cryptfs(&["key", "remove", "alpha", "--socket", s], None));
    assert!(out.contains("no key named 'alpha'"), "{out}");
    let list = assert_ok(&s3cryptfs(&["key", "list", "--socket", s], None));
    assert!(!list.contains("alpha") && list.contains("beta"), "{list}");
}

#[test]
fn key_add_refuses_open_key_files_bad_text_and_bad_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, lines) = key_file(tmp.path(), "k", 1);
    let agent = Agent::start(&tmp.path().join("agent.sock"));
    let s = agent.socket();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out =
        assert_fails(&s3cryptfs(&["key", "add", "k", "--from-file", file.to_str().unwrap(), "--socket", s], None));
    assert!(out.contains("chmod 600"), "{out}");

    // Not a key: refused before anything is sent, without echoing the text.
    let bad = format!("{}!\n", &lines[0][..30]);
    let out = assert_fails(&s3cryptfs(&["key", "add", "k", "--socket", s], Some(bad.as_bytes())));
    assert!(out.contains("line 1") && out.contains("base64"), "{out}");
    assert!(!out.contains(&lines[0][..16]), "{out}");
    let out = assert_fails(&s3cryptfs(&["key", "add", "k", "--socket", s], Some(b"")));
    assert!(out.contains("contains no key"), "{out}");

    let out = assert_fails(&s3cryptfs(&["key", "add", "two words", "--socket", s], Some(lines[0].as_bytes())));
    assert!(out.contains("invalid key name"), "{out}");
    let list = s3cryptfs(&["key", "list", "--socket", s], None);
    assert_ok(&list);
    assert!(list.stdout.is_empty(), "nothing was added: {}", text(&list));
}

#[test]
fn lock_drops_every_key_and_the_agent_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = key_file(tmp.path(), "k", 1);
    let socket = tmp.path().join("agent.sock");
    let agent = Agent::start(&socket);
    let s = agent.socket();
    for name in ["one", "two"] {
        assert_ok(&s3cryptfs(&["key", "add", name, "--from-file", file.to_str().unwrap(), "--socket", s], None));
    }
    let out = assert_ok(&s3cryptfs(&["agent", "lock", "--socket", s], None));
    assert!(out.contains("dropped 2 keys"), "{out}");

    let err = s3cryptfs::agent::fetch_key(&socket, "one").unwrap_err();
    let code = err.downcast_ref::<s3cryptfs::agent::AgentError>().and_then(|e| e.code());
    assert_eq!(code, Some(s3cryptfs::agent::protocol::ErrorCode::Locked), "{err:#}");
    let shown = format!("{err:#}");
    assert!(shown.contains("locked") && shown.contains("s3cryptfs key add one"), "{shown}");
    let list = s3cryptfs(&["key", "list", "--socket", s], None);
    assert!(assert_ok(&list).contains("holds no keys") && list.stdout.is_empty());

    // Still running: keys can be added again.
    assert_ok(&s3cryptfs(&["key", "add", "one", "--from-file", file.to_str().unwrap(), "--socket", s], None));
    assert_eq!(s3cryptfs::agent::fetch_key(&socket, "one").unwrap().len(), 1);
    assert!(agent.log().contains("locked: every key dropped"));
}

#[test]
fn stop_exits_zero_and_removes_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = key_file(tmp.path(), "k", 1);
    let socket = tmp.path().join("agent.sock");
    let mut agent = Agent::start(&socket);
    let s = agent.socket().to_string();
    assert_ok(&s3cryptfs(&["key", "add", "k", "--from-file", file.to_str().unwrap(), "--socket", &s], None));
    let out = assert_ok(&s3cryptfs(&["agent", "stop", "--socket", &s], None));
    assert!(out.contains("stopped"), "{out}");
    // No polling: `agent stop` returns after the socket is gone.
    assert!(!socket.exists(), "the socket is still there after `agent stop`");
    assert_eq!(agent.wait_exit(), Some(0), "{}", agent.log());
    let out = assert_fails(&s3cryptfs(&["key", "list", "--socket", &s], None));
    assert!(out.contains("no key agent is listening") && out.contains("s3cryptfs agent"), "{out}");
    let err = s3cryptfs::agent::fetch_key(&socket, "k").unwrap_err().to_string();
    assert!(err.contains("no key agent is listening"), "{err}");
}

#[test]
fn malformed_and_oversized_requests_get_errors_and_the_agent_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = key_file(tmp.path(), "k", 1);
    let socket = tmp.path().join("agent.sock");
    let agent = Agent::start(&socket);
    assert_ok(&s3cryptfs(
        &["key", "add", "k", "--from-file", file.to_str().unwrap(), "--socket", agent.socket()],
        None,
    ));

    // Oversized lengths: an error reply, then the connection is closed; the body is never read.
    for len in [MAX_BODY_LEN + 1, u32::MAX] {
        let mut s = connect(&socket);
        s.write_all(&len.to_be_bytes()).unwrap();
        let reply = read_reply(&mut s).expect("an error reply");
        assert_error(&reply, "too_large");
        assert!(read_reply(&mut s).is_none(), "the connection must be closed after an oversized length");
    }

    // Bad requests on one connection: each gets an error reply and the connection keeps working.
    let mut s = connect(&socket);
    let cases: &[(&[u8], &str)] = &[
        (b"{not json", "bad_request"),
        (b"\xff\xfe\x00garbage", "bad_request"),
        (b"[]", "bad_request"),
        (br#"{"op":"list"}"#, "bad_request"),
        (br#"{"v":2,"op":"list"}"#, "unsupported_version"),
        (br#"{"v":1,"op":"fly"}"#, "unknown_op"),
        (br#"{"v":1,"op":"get"}"#, "bad_request"),
        (br#"{"v":1,"op":"get","name":42}"#, "bad_request"),
        (br#"{"v":1,"op":"add","name":"x","keys":["not base64!"]}"#, "bad_request"),
        (br#"{"v":1,"op":"add","name":"x","keys":["AQID"]}"#, "bad_request"),
        (br#"{"v":1,"op":"get","name":"missing"}"#, "no_such_key"),
    ];
    for (body, code) in cases {
        assert_error(&exchange(&mut s, body), code);
    }
    s.write_all(&[0, 0, 0, 0]).unwrap();
    assert_error(&read_reply(&mut s).unwrap(), "bad_request");
    let reply = exchange(&mut s, br#"{"v":1,"op":"list"}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["entries"][0]["name"], "k", "{reply}");

    // A client that stops in the middle of a frame, and one that sends half a prefix.
    let mut cut = connect(&socket);
    cut.write_all(&frame(br#"{"v":1,"op":"list"}"#)[..10]).unwrap();
    drop(cut);
    let mut half = connect(&socket);
    half.write_all(&[0, 0]).unwrap();
    drop(half);

    // Still serving, with its keys.
    assert!(ping(&socket).is_some());
    assert_eq!(s3cryptfs::agent::fetch_key(&socket, "k").unwrap().len(), 1);
    let list = assert_ok(&s3cryptfs(&["key", "list", "--socket", agent.socket()], None));
    assert!(list.starts_with("k  1 key"), "{list}");
}

/// A raw client (run as another user): sends `get k`, prints everything the agent sends until it closes.
const RAW_GET: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect("SOCKET")
body = b'{"v":1,"op":"get","name":"k"}'
try:
    s.sendall(struct.pack(">I", len(body)) + body)
except OSError:
    pass
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
sys.stdout.buffer.write(data)
"#;

#[test]
fn a_client_of_another_uid_is_refused_and_logged() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (file, lines) = key_file(tmp.path(), "k", 1);
    // nobody must be able to reach the socket's directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp.path().join("agent.sock");
    let agent = Agent::start(&socket);
    let s = agent.socket();
    assert_ok(&s3cryptfs(&["key", "add", "k", "--from-file", file.to_str().unwrap(), "--socket", s], None));

    // The socket is 0600: the kernel refuses nobody's connect.
    let out = assert_fails(&run_as(Some(NOBODY), &["key", "list", "--socket", s], None));
    assert!(out.contains("Permission denied"), "{out}");

    // Simulate a misconfigured socket: now only SO_PEERCRED stands between nobody and the keys.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [&["key", "list", "--socket", s][..], &["key", "add", "x", "--socket", s][..]] {
        let stdin = lines[0].clone();
        let out = assert_fails(&run_as(Some(NOBODY), args, Some(stdin.as_bytes())));
        assert!(out.contains("refused"), "{out}");
        assert!(!out.contains(&lines[0][..16]), "{out}");
    }
    // A raw `get` as nobody gets the refusal and nothing else.
    let script = RAW_GET.replace("SOCKET", s);
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .expect(
            "/usr/bin/python3 is needed for the raw client (the system Python: one a user other than root can run)",
        );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = &out.stdout[4..];
    let reply: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_error(&reply, "refused");
    assert_eq!(out.stdout.len(), 4 + body.len(), "only the refusal is sent");
    assert_no_material("a refused client's reply", &String::from_utf8_lossy(&out.stdout), &lines);

    let log = agent.wait_log("refused a client of another user");
    assert!(log.contains(&format!("uid={NOBODY}")) && log.contains("pid="), "{log}");
    // Root and the owner are still served.
    assert_eq!(s3cryptfs::agent::fetch_key(&socket, "k").unwrap().len(), 1);
}

#[test]
fn an_agent_of_another_user_is_not_dumpable_locks_key_pages_and_is_not_trusted() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = tmp.path().join("nobody");
    std::fs::create_dir(&home).unwrap();
    let (file, lines) = key_file(&home, "k", 1);
    for p in [&home, &file] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let socket = home.join("agent.sock");
    let agent = Agent::start_as(Some(NOBODY), &socket);
    let pid = agent.pid();
    // The agent is nobody's process (setpriv execs it in place)...
    assert_eq!(proc_status_field(pid, "Uid").split_whitespace().next(), Some("65534"));
    // ...but not dumpable: the kernel then gives its /proc files to root. Compare with an ordinary process of nobody.
    let mut control = Command::new("setpriv")
        .args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups", "sleep", "30"])
        .spawn()
        .unwrap();
    let end = deadline();
    // setpriv runs as root until it has switched user and exec'd sleep.
    while !String::from_utf8_lossy(&proc_file(control.id(), "cmdline")).starts_with("sleep") {
        assert!(Instant::now() < end, "setpriv did not exec sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
    let control_owner = std::fs::metadata(format!("/proc/{}/status", control.id())).unwrap().uid();
    let _ = control.kill();
    let _ = control.wait();
    assert_eq!(control_owner, NOBODY, "an ordinary process of nobody owns its /proc files");
    assert_eq!(std::fs::metadata(format!("/proc/{pid}/status")).unwrap().uid(), 0, "the agent is dumpable");

    // Under nobody's finite RLIMIT_MEMLOCK the agent locks the pages of its keys only.
    agent.wait_log("RLIMIT_MEMLOCK is finite");
    let locked_before: u64 = proc_status_field(pid, "VmLck").trim_end_matches(" kB").trim().parse().unwrap();
    assert_ok(&run_as(
        Some(NOBODY),
        &["key", "add", "k", "--from-file", file.to_str().unwrap(), "--socket", agent.socket()],
        None,
    ));
    let locked_after: u64 = proc_status_field(pid, "VmLck").trim_end_matches(" kB").trim().parse().unwrap();
    assert!(locked_after > locked_before, "no key page locked: VmLck {locked_before} → {locked_after} kB");
    assert!(!agent.log().contains("cannot lock a key's memory page"), "{}", agent.log());

    // root's client will not take keys from an agent run by another user.
    let out = assert_fails(&s3cryptfs(&["key", "list", "--socket", agent.socket()], None));
    assert!(out.contains("runs as uid 65534, which is neither you nor root"), "{out}");
    assert!(s3cryptfs::agent::fetch_key(&socket, "k").is_err());
    let list = assert_ok(&run_as(Some(NOBODY), &["key", "list", "--socket", agent.socket()], None));
    assert!(list.starts_with("k  1 key"), "{list}");
    for name in ["cmdline", "environ"] {
        assert_no_material(name, &String::from_utf8_lossy(&proc_file(pid, name)), &lines);
    }
}

#[test]
fn background_agent_serves_when_the_command_returns_and_refuses_a_second_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run/s3cryptfs");
    let socket = dir.join("agent.sock");
    let s = socket.to_str().unwrap();
    let out = s3cryptfs(&["agent", "--socket", s], None);
    assert_ok(&out);
    // No polling: the agent answers as soon as the command has returned.
    let pid = ping(&socket).expect("the background agent answers");
    struct Stop(PathBuf, u64);
    impl Drop for Stop {
        fn drop(&mut self) {
            if ping(&self.0).is_some() {
                // SAFETY: kill has no memory-safety preconditions; the pid is the agent this test started.
                unsafe { libc::kill(i32::try_from(self.1).unwrap(), libc::SIGKILL) };
            }
        }
    }
    let guard = Stop(socket.clone(), pid);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "socket directory");
    assert_eq!(std::fs::symlink_metadata(&socket).unwrap().mode() & 0o777, 0o600, "socket");
    let cmdline = String::from_utf8_lossy(&proc_file(u32::try_from(pid).unwrap(), "cmdline")).to_string();
    assert!(cmdline.contains("agent"), "{cmdline}");

    for args in [&["agent", "--socket", s][..], &["agent", "-f", "--socket", s][..]] {
        let out = assert_fails(&s3cryptfs(args, None));
        assert!(out.contains("already running") && out.contains(&format!("pid {pid}")), "{out}");
    }
    assert_eq!(ping(&socket), Some(pid), "the running agent is untouched");

    assert_ok(&s3cryptfs(&["agent", "stop", "--socket", s], None));
    assert!(!socket.exists());
    drop(guard);
    // The daemon is not our child: wait until it is gone (or a zombie awaiting its new parent).
    let end = deadline();
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Err(_) => break,
            Ok(st) if st.lines().any(|l| l.starts_with("State:") && l.contains('Z')) => break,
            Ok(_) => assert!(Instant::now() < end, "the background agent did not exit"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stale_socket_is_replaced_and_other_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // left behind, nobody listening
    let mut agent = Agent::start(&socket);
    agent.wait_log("removed a stale socket");
    assert_ok(&s3cryptfs(&["agent", "stop", "--socket", agent.socket()], None));
    assert_eq!(agent.wait_exit(), Some(0));

    let plain = tmp.path().join("plain");
    std::fs::write(&plain, b"data").unwrap();
    let out = assert_fails(&s3cryptfs(&["agent", "-f", "--socket", plain.to_str().unwrap()], None));
    assert!(out.contains("is not a socket"), "{out}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"data");
}

#[test]
fn key_add_reads_a_terminal_without_echo_and_restores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, lines) = key_file(tmp.path(), "k", 2);
    let socket = tmp.path().join("agent.sock");
    let agent = Agent::start(&socket);

    let (mut master_fd, mut slave_fd) = (0, 0);
    // SAFETY: openpty writes two descriptors; the other arguments may be null.
    let rc = unsafe {
        libc::openpty(&mut master_fd, &mut slave_fd, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master_fd), OwnedFd::from_raw_fd(slave_fd)) };
    let echo_on = |fd: &OwnedFd| {
        // SAFETY: termios is plain data; tcgetattr fills it from a valid descriptor.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag & libc::ECHO != 0
    };
    assert!(echo_on(&slave));

    let child = Command::new(BIN)
        .args(["key", "add", "typed", "--socket", agent.socket()])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = deadline();
    while echo_on(&slave) {
        assert!(Instant::now() < end, "key add never switched echo off");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut term = std::fs::File::from(master);
    term.write_all(format!("{}\n{}\n\x04", lines[0], lines[1]).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let shown = assert_ok(&out);
    assert!(shown.contains("Ctrl-D") && shown.contains("added key 'typed'"), "{shown}");
    assert!(echo_on(&slave), "echo was not restored");

    // Whatever the terminal displayed: nothing of the key.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(term.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut displayed = Vec::new();
    let _ = term.read_to_end(&mut displayed);
    assert_no_material("the terminal", &String::from_utf8_lossy(&displayed), &lines);
    assert_no_material("key add output", &shown, &lines);
    assert_eq!(s3cryptfs::agent::fetch_key(&socket, "typed").unwrap().fingerprints().len(), 2);
}

#[test]
fn under_journald_the_agent_logs_priorities_without_timestamps_or_colours() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    let log = tmp.path().join("journal.log");
    let stderr = std::fs::File::create(&log).unwrap();
    // systemd names the stream it connected to stderr as DEVICE:INODE.
    let meta = stderr.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args(["agent", "-f", "--socket"])
        .arg(&socket)
        .env("RUST_LOG", "info")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let end = deadline();
    while ping(&socket).is_none() {
        assert!(child.try_wait().unwrap().is_none() && Instant::now() < end, "{}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ok(&s3cryptfs(&["agent", "stop", "--socket", socket.to_str().unwrap()], None));
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.trim().is_empty(), "the agent logged nothing");
    for line in text.lines() {
        assert!(line.starts_with('<') && line.as_bytes().get(2) == Some(&b'>'), "no <N> priority: {line}");
        assert!(!line.contains("Z "), "no timestamp under the journal: {line}");
    }
    assert!(!text.contains('\u{1b}'), "no ANSI colours in the journal: {text}");
    assert!(text.lines().any(|l| l.starts_with("<6>")), "info lines are <6>: {text}");
}
