//! Key sources of `mount` through the real binary: key_file, key_fd, key_env, key_credential and the agent each unlock
//! the same store, and the key given by each never shows in the running daemon's /proc/PID/cmdline or /proc/PID/environ.

mod common;

use std::fs;
use std::process::{Command, Stdio};

use common::*;

/// The base64 key text of the environment's key file (what must never leak).
fn key_text(env: &Env) -> String {
    fs::read_to_string(&env.key_file).unwrap().trim().to_string()
}

/// Starts `s3cryptfs mount -f` through `sh -c 'exec …'` so that shell redirections (`3<file`) reach the daemon,
/// which keeps the shell's pid.
fn mount_via_shell(env: &Env, store: &Store, opts: &str, redirect: &str, vars: &[(&str, &str)]) -> Mount {
    let dir = env.path().join(unique("mnt"));
    fs::create_dir_all(&dir).unwrap();
    let log = env.path().join(format!("{}.log", unique("mount")));
    let staging = env.path().join("staging");
    let script = format!(
        "exec \"$0\" mount -f -o 'mode=cse-c,staging_dir={},{opts}' '{}' '{}' {redirect}",
        staging.display(),
        store.url(),
        dir.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&script).arg(BIN);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let child = cmd
        .env("RUST_LOG", "s3cryptfs=info,warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Mount::adopt(dir, child, log).unwrap_or_else(|e| panic!("mount failed: {e}"))
}

/// Reads a /proc file of `pid` as bytes.
fn proc_bytes(pid: u32, file: &str) -> Vec<u8> {
    fs::read(format!("/proc/{pid}/{file}")).unwrap()
}

fn assert_no_key_in_proc(m: &Mount, key: &str, what: &str) {
    assert!(!m.log_text().contains(&key[..16]), "{what}: the key shows in the log");
    for file in ["cmdline", "environ"] {
        let bytes = proc_bytes(m.pid(), file);
        assert!(!contains(&bytes, key.as_bytes()), "{what}: the key shows in /proc/PID/{file}");
        // A prefix is enough to be a leak too (someone scrubbing only the end would leave most of it).
        assert!(!contains(&bytes, &key.as_bytes()[..16]), "{what}: part of the key shows in /proc/PID/{file}");
    }
}

fn write_and_read(m: &Mount, name: &str) {
    fs::write(m.path(name), name.as_bytes()).unwrap();
    assert_bytes(fs::read(m.path(name)).unwrap(), name.as_bytes(), name);
}

#[test]
fn every_key_source_unlocks_the_store_and_leaves_no_key_in_proc() {
    let env = Env::new();
    let store = Store::local(env.path());
    let key = key_text(&env);

    // key_file (the reference: its path may show, never its content).
    let m = mount_via_shell(&env, &store, &format!("key_file={}", env.key_file.display()), "", &[]);
    write_and_read(&m, "via-file");
    assert_no_key_in_proc(&m, &key, "key_file");
    drop(m);

    // key_fd: descriptor 3 opened by the shell on the key file, read and closed by the daemon.
    let m = mount_via_shell(&env, &store, "key_fd=3", &format!("3<'{}'", env.key_file.display()), &[]);
    assert_bytes(fs::read(m.path("via-file")).unwrap(), b"via-file", "key_fd reads what key_file wrote");
    write_and_read(&m, "via-fd");
    assert_no_key_in_proc(&m, &key, "key_fd");
    // Closed after reading: no descriptor of the daemon still points at the key file (3 itself may be reused).
    for fd in fs::read_dir(format!("/proc/{}/fd", m.pid())).unwrap() {
        let target = fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert_ne!(target, env.key_file, "the key file is still open in the daemon");
    }
    drop(m);

    // key_env: the variable is removed and its value scrubbed from the initial environment block.
    let m = mount_via_shell(&env, &store, "key_env=S3CF_TEST_KEY", "", &[("S3CF_TEST_KEY", &key)]);
    assert_bytes(fs::read(m.path("via-fd")).unwrap(), b"via-fd", "key_env reads what key_fd wrote");
    write_and_read(&m, "via-env");
    assert_no_key_in_proc(&m, &key, "key_env");
    drop(m);

    // key_credential: systemd's credential directory.
    let creds = env.path().join("credentials");
    fs::create_dir_all(&creds).unwrap();
    fs::copy(&env.key_file, creds.join("s3cryptfs-key")).unwrap();
    let creds_dir = creds.to_str().unwrap().to_string();
    let m = mount_via_shell(&env, &store, "key_credential=s3cryptfs-key", "", &[("CREDENTIALS_DIRECTORY", &creds_dir)]);
    assert_bytes(fs::read(m.path("via-env")).unwrap(), b"via-env", "key_credential reads what key_env wrote");
    assert_no_key_in_proc(&m, &key, "key_credential");
    drop(m);
}

#[test]
fn bad_key_sources_fail_before_mounting_with_one_clear_line() {
    let env = Env::new();
    let store = Store::local(env.path());
    let cases: &[(&str, &str)] = &[
        ("key_fd=7", "no such open file descriptor"),
        ("key_env=S3CF_UNSET_VARIABLE", "not set"),
        ("key_credential=missing", "CREDENTIALS_DIRECTORY"),
        ("key=c2VjcmV0", "key_fd=N"),
    ];
    for (opt, want) in cases {
        let err = match Mount::try_start(&env, &store, "cse-c", &[opt]) {
            Ok(_) => panic!("{opt}: mounted"),
            Err(e) => e,
        };
        assert!(err.contains(want), "{opt}: {err}");
        assert!(!err.contains("c2VjcmV0"), "{opt}: the refused key is echoed: {err}");
    }
    // Key files: each error once (issue 10.7b: the cause was printed a second time after the message that quotes it),
    // and a directory called a directory (10.7c: it was "readable by group or others").
    let garbage = env.path().join("garbage.key");
    fs::write(&garbage, "not a key\n").unwrap();
    fs::set_permissions(&garbage, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let dir = env.path().join("key-dir");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let missing = env.path().join("missing.key");
    let cases: &[(&std::path::Path, &str)] =
        &[(&missing, "No such file or directory"), (&garbage, "not valid base64"), (&dir, "is a directory")];
    for (path, want) in cases {
        let opt = format!("key_file={}", path.display());
        let err = match Mount::try_start(&env, &store, "cse-c", &[&opt]) {
            Ok(_) => panic!("{opt}: mounted"),
            Err(e) => e,
        };
        assert_eq!(err.matches(want).count(), 1, "{opt}: {err}");
        assert!(!err.contains("readable by group"), "{opt}: {err}");
    }

    let both = format!("key_file={}", env.key_file.display());
    let err = match Mount::try_start(&env, &store, "cse-c", &[&both, "key_env=X"]) {
        Ok(_) => panic!("two key sources mounted"),
        Err(e) => e,
    };
    assert!(err.contains("two key sources"), "{err}");
}

#[test]
fn a_key_from_the_agent_unlocks_the_store_and_the_mount_outlives_the_agent() {
    let env = Env::new();
    let store = Store::local(env.path());
    let key = key_text(&env);
    let socket = env.path().join("agent.sock");
    let mut agent = Command::new(BIN)
        .args(["agent", "-f", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let add = Command::new(BIN)
        .args(["key", "add", "work", "--socket"])
        .arg(&socket)
        .arg("--from-file")
        .arg(&env.key_file)
        .output()
        .unwrap();
    assert!(add.status.success(), "key add: {}", String::from_utf8_lossy(&add.stderr));

    let opt = format!("agent={},key_name=work", socket.display());
    let m = Mount::start_with(&env, &store, "cse-c", &[&opt]);
    write_and_read(&m, "via-agent");
    assert_no_key_in_proc(&m, &key, "agent");
    // A name the agent does not hold fails before mounting, with the agent's reason.
    let err = match Mount::try_start(&env, &store, "cse-c", &[&format!("agent={},key_name=other", socket.display())]) {
        Ok(_) => panic!("mounted with a key name the agent lacks"),
        Err(e) => e,
    };
    assert!(err.contains("other"), "{err}");

    // The mount keeps its copy: stopping the agent does not stop it.
    let stop = Command::new(BIN).args(["agent", "stop", "--socket"]).arg(&socket).output().unwrap();
    assert!(stop.status.success(), "agent stop: {}", String::from_utf8_lossy(&stop.stderr));
    assert!(agent.wait().unwrap().success());
    write_and_read(&m, "after-agent-stopped");
    drop(m);
    // And the key file reads what the agent's key wrote.
    let m = Mount::start(&env, &store, "cse-c");
    assert_bytes(fs::read(m.path("after-agent-stopped")).unwrap(), b"after-agent-stopped", "same key");
}
