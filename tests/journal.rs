//! The write journal through real mounts: what a crash leaves and what the next start does with it, who may own the
//! journal, and conditional uploads between two mounts of one store.
//!
//! Each test reproduces a way data was lost or planted before the journal existed (issue 10) and fails on that code.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

/// Staged data and records left in the journal under `env`'s staging directory.
fn journal_files(env: &Env) -> Vec<String> {
    walkdir(&env.path().join("staging"))
        .into_iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".dat") || n.ends_with(".rec"))
        .collect()
}

#[test]
fn a_file_renamed_onto_a_dirty_open_file_is_not_overwritten_after_a_crash() {
    for s3 in [false, true] {
        let env = Env::new();
        let store = if s3 { Store::s3() } else { Store::local(env.path()) };
        let m = Mount::start(&env, &store, "cse-c");
        fs::write(m.path("a"), b"a, first version").unwrap();
        let mut open = fs::OpenOptions::new().write(true).open(m.path("a")).unwrap();
        open.write_all(b"A, unsaved rewrite").unwrap();
        fs::write(m.path("b"), b"b, the newer content that replaces a").unwrap();
        fs::rename(m.path("b"), m.path("a")).unwrap();
        m.kill();
        drop(open);

        let m = Mount::start(&env, &store, "cse-c");
        assert_bytes(fs::read(m.path("a")).unwrap(), b"b, the newer content that replaces a", "a after restart");
        assert_eq!(names(&m.dir), vec!["a".to_string()], "nothing resurrected or recovered beside it ({})", store.url());
        let text = m.unmount();
        assert!(!text.contains("previous run left staged"), "{text}");
        assert!(journal_files(&env).is_empty(), "{:?}", journal_files(&env));
    }
}

/// The journal's disk is full when files are unlinked: their delete intents cannot be written, so each delete is
/// sent at once instead (the object is gone when `rm` returns) and nothing else is lost. Once there is room again,
/// unlinks are journaled as before (the failed appends left the log usable), and a daemon killed right after them
/// leaves exactly the files it did not unlink.
#[test]
fn unlinks_on_a_full_journal_disk_delete_at_once_and_the_log_works_again_after() {
    let env = Env::new();
    let store = Store::s3();
    let disk = SmallDisk::mount(&env, 8);
    let m = Mount::start(&env, &store, "cse-c");
    for i in 0..12 {
        fs::write(m.path(&format!("f{i:02}")), format!("file {i}")).unwrap();
    }
    let stored = |store: &Store| {
        let mut keys: Vec<String> =
            store.raw_objects().into_iter().map(|(k, _)| k).filter(|k| k.starts_with('f')).collect();
        keys.sort();
        keys
    };
    let from = |first: usize| (first..12).map(|i| format!("f{i:02}")).collect::<Vec<_>>();
    assert_eq!(stored(&store), from(0));
    // Fill the disk, beside the journal's own directory.
    let filler = env.path().join("staging/filler");
    let dd = Command::new("dd").args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"]).output().unwrap();
    assert!(!dd.status.success(), "dd did not fill the disk: {}", String::from_utf8_lossy(&dd.stderr));
    sh("rm f00 f01 f02 f03", &m.dir);
    assert_eq!(stored(&store), from(4), "the deletes were not sent when rm returned");
    fs::remove_file(&filler).unwrap();
    sh("rm f04 f05 f06", &m.dir);
    let log = m.kill();
    let unjournaled = log.matches("could not write the delete intent to the journal").count();
    assert_eq!(unjournaled, 4, "only the unlinks on the full disk go unjournaled:\n{log}");

    let m = Mount::start(&env, &store, "cse-c");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while stored(&store) != from(7) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stored(&store), from(7), "the store after the restart");
    assert_eq!(names(&m.dir), from(7));
    for i in 7..12 {
        assert_bytes(fs::read(m.path(&format!("f{i:02}"))).unwrap(), format!("file {i}").as_bytes(), "a kept file");
    }
    m.unmount();
    drop(disk);
}

#[test]
fn a_file_unlinked_while_open_does_not_come_back_after_a_crash() {
    for s3 in [false, true] {
        let env = Env::new();
        let store = if s3 { Store::s3() } else { Store::local(env.path()) };
        let m = Mount::start(&env, &store, "cse-c");
        fs::write(m.path("kept"), b"kept").unwrap();
        let mut f = fs::File::create(m.path("gone")).unwrap();
        f.write_all(b"written, then unlinked while open").unwrap();
        fs::remove_file(m.path("gone")).unwrap();
        // Also one that was in the store before: opened, written, unlinked.
        fs::write(m.path("gone2"), b"stored").unwrap();
        let mut g = fs::OpenOptions::new().append(true).open(m.path("gone2")).unwrap();
        g.write_all(b" and appended").unwrap();
        fs::remove_file(m.path("gone2")).unwrap();
        m.kill();
        drop((f, g));

        let m = Mount::start(&env, &store, "cse-c");
        assert_eq!(names(&m.dir), vec!["kept".to_string()], "{}", store.url());
        drop(m);
        assert!(journal_files(&env).is_empty(), "{:?}", journal_files(&env));
    }
}

#[test]
fn a_restart_while_the_killed_daemon_is_a_zombie_recovers_at_once() {
    let env = Env::new();
    let store = Store::local(env.path());
    let dir = env.path().join("mnt-zombie");
    let m = Mount::try_start_at(&env, &store, "cse-c", &[], dir.clone()).unwrap();
    let mut f = fs::File::create(m.path("in-flight")).unwrap();
    f.write_all(b"written before the kill").unwrap();
    let (mut zombie, _) = m.kill_unreaped();
    // Until reaped the pid exists; the restart happens now, at the same mountpoint (as Restart=on-failure does).
    let m = Mount::try_start_at(&env, &store, "cse-c", &[], dir.clone())
        .unwrap_or_else(|e| panic!("restart in the zombie window: {e}"));
    assert!(fs::read(format!("/proc/{}/stat", zombie.id())).is_ok(), "the killed daemon is still unreaped");
    assert_bytes(fs::read(m.path("in-flight")).unwrap(), b"written before the kill", "recovered in the zombie window");
    drop(f);
    let text = m.unmount();
    assert!(text.contains("uploaded data a previous run left staged"), "{text}");
    zombie.wait().unwrap();
}

#[test]
fn no_staged_data_outlives_a_crash_and_nothing_in_the_journal_is_plaintext() {
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    let marker = b"PLAINTEXT-MARKER-fsynced-and-still-open";
    let mut f = fs::File::create(m.path("synced")).unwrap();
    f.write_all(marker).unwrap();
    f.sync_all().unwrap(); // uploaded: its record goes, its staged copy stays while open
    let mut g = fs::File::create(m.path("dirty")).unwrap();
    g.write_all(marker).unwrap();
    for p in walkdir(&env.path().join("staging")) {
        let bytes = fs::read(&p).unwrap();
        assert!(!contains(&bytes, marker), "plaintext at rest in {}", p.display());
    }
    m.kill();
    drop((f, g));
    let m = Mount::start(&env, &store, "cse-c");
    assert_bytes(fs::read(m.path("synced")).unwrap(), marker, "synced");
    assert_bytes(fs::read(m.path("dirty")).unwrap(), marker, "dirty");
    let text = m.log_text();
    assert!(text.contains("no record refers to"), "the orphan's removal is logged: {text}");
    drop(m);
    assert!(journal_files(&env).is_empty(), "{:?}", journal_files(&env));
}

/// Runs `cmd` through `sh -c` as uid/gid 65534 (nobody).
fn as_nobody(cmd: &str) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", cmd])
        .output()
        .expect("setpriv (util-linux) must be installed");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_journal_planted_by_another_user_is_refused() {
    let env = Env::new();
    let store = Store::local(env.path());
    // Another local user creates the journal base first (as they could under /var/tmp), with a fake run inside.
    let base = Path::new("/tmp").join(unique("planted"));
    let fake_run = base.join("00000000000000000000000000000000").join("11111111111111111111111111111111");
    as_nobody(&format!(
        "mkdir -p {run} && echo '{{\"version\":1}}' > {run}/journal && echo planted > {run}/0.dat && echo '{{\"path\":\"evil\",\"mode\":35309}}' > {run}/0.rec",
        run = fake_run.display()
    ));
    let err = Mount::try_start(&env, &store, "cse-c", &[&format!("staging_dir={}", base.display())])
        .err()
        .expect("a journal owned by another user must be refused");
    assert!(err.contains("owned by uid 65534") && err.contains(&base.display().to_string()), "{err}");
    let log = err.split("before mounting: ").nth(1).unwrap_or(&err);
    assert_eq!(log.trim().lines().count(), 1, "one line: {log}");

    // The base is ours, but a directory inside was given to another user: refused too.
    let ours = env.path().join("journal-ours");
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("staging_dir={}", ours.display())]);
    drop(m);
    let store_dir = fs::read_dir(&ours).unwrap().next().unwrap().unwrap().path();
    std::os::unix::fs::chown(&store_dir, Some(65534), Some(65534)).unwrap();
    let err = Mount::try_start(&env, &store, "cse-c", &[&format!("staging_dir={}", ours.display())]).err().expect("refused");
    assert!(err.contains("owned by uid 65534"), "{err}");
    std::os::unix::fs::chown(&store_dir, Some(0), Some(0)).unwrap();
    // Writable by others: refused.
    fs::set_permissions(&store_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let err = Mount::try_start(&env, &store, "cse-c", &[&format!("staging_dir={}", ours.display())]).err().expect("refused");
    assert!(err.contains("writable by group or others"), "{err}");
    fs::set_permissions(&store_dir, fs::Permissions::from_mode(0o700)).unwrap();

    // Records forged by someone who got write access (owned right, but not sealed under the key) are refused and
    // logged, and nothing of them reaches the store.
    let run = store_dir.join("22222222222222222222222222222222");
    fs::create_dir(&run).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(run.join("journal"), br#"{"version":1,"store":"x","run":"22222222222222222222222222222222","keying":"local","check":"00"}"#).unwrap();
    fs::write(run.join("0.rec"), br#"{"path":"evil","mode":35309,"uid":0,"gid":0}"#).unwrap();
    fs::write(run.join("0.dat"), b"#!/bin/sh\nplanted\n").unwrap();
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("staging_dir={}", ours.display())]);
    assert!(names(&m.dir).is_empty(), "nothing planted reaches the store: {:?}", names(&m.dir));
    let text = m.unmount();
    assert!(text.contains("journal left alone") || text.contains("refused"), "{text}");
    let _ = fs::remove_dir_all(&base);
}

#[test]
fn a_close_does_not_overwrite_what_another_mount_wrote_meanwhile() {
    for s3 in [false, true] {
        let env = Env::new();
        let store = if s3 { Store::s3() } else { Store::local(env.path()) };
        let a = Mount::start(&env, &store, "cse-c");
        let b = Mount::start(&env, &store, "cse-c");
        fs::write(a.path("f"), b"version 1").unwrap();
        let mut open = fs::OpenOptions::new().write(true).truncate(true).open(a.path("f")).unwrap();
        open.write_all(b"A's rewrite").unwrap();
        std::thread::sleep(Duration::from_millis(1200)); // past attr_timeout, so b sees f
        fs::write(b.path("f"), b"B's version, written while A had it open").unwrap();
        let err = open.sync_all().expect_err("A's upload must not replace B's version");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        drop(open);
        std::thread::sleep(Duration::from_millis(1200));
        assert_bytes(fs::read(b.path("f")).unwrap(), b"B's version, written while A had it open", "f");
        let list = names(&b.dir);
        let copies: Vec<_> = list.iter().filter(|n| n.starts_with("f.s3cryptfs-conflict-")).collect();
        assert_eq!(copies.len(), 1, "{list:?} ({})", store.url());
        assert_bytes(fs::read(b.path(copies[0])).unwrap(), b"A's rewrite", "A's version beside it");
        let text = a.unmount();
        assert!(text.contains("replaced by another writer"), "{text}");
        drop(b);
    }
}

#[test]
fn recovery_does_not_overwrite_what_another_mount_wrote_after_the_crash() {
    let env = Env::new();
    let store = Store::s3();
    let a = Mount::start(&env, &store, "cse-c");
    fs::write(a.path("f"), b"version 1").unwrap();
    let mut open = fs::OpenOptions::new().append(true).open(a.path("f")).unwrap();
    open.write_all(b", A's unsaved append").unwrap();
    a.kill();
    drop(open);
    // Another mount (with its own journal) writes f before A's next start.
    let other = Env::new();
    fs::copy(&env.key_file, &other.key_file).unwrap();
    let b = Mount::start(&other, &store, "cse-c");
    fs::write(b.path("f"), b"B's version").unwrap();
    drop(b);
    let a = Mount::start(&env, &store, "cse-c");
    assert_bytes(fs::read(a.path("f")).unwrap(), b"B's version", "f keeps the newer version");
    let list = names(&a.dir);
    let rec: Vec<_> = list.iter().filter(|n| n.starts_with("f.s3cryptfs-recovered-")).collect();
    assert_eq!(rec.len(), 1, "{list:?}");
    assert_bytes(fs::read(a.path(rec[0])).unwrap(), b"version 1, A's unsaved append", "A's data beside it");
    drop(a);
}

#[test]
fn a_kill_during_recovery_loses_and_duplicates_nothing() {
    let env = Env::new();
    let store = Store::s3();
    let dir = env.path().join("mnt-recovery");
    let m = Mount::try_start_at(&env, &store, "cse-c", &[], dir.clone()).unwrap();
    let data = pattern(40 << 20, 7); // a multipart upload: recovery takes long enough to be interrupted
    let mut f = fs::File::create(m.path("big")).unwrap();
    f.write_all(&data).unwrap();
    let mut g = fs::File::create(m.path("small")).unwrap();
    g.write_all(b"small, never closed").unwrap();
    let (mut zombie, _) = m.kill_unreaped();
    zombie.wait().unwrap();
    drop((f, g));
    let opts = format!(
        "mode=cse-c,key_file={},staging_dir={},{}",
        env.key_file.display(),
        env.path().join("staging").display(),
        store.extra_options().join(",")
    );
    // Starts killed at different moments of their recovery.
    let mut interrupted = 0;
    for (i, delay_ms) in [150u64, 400, 800].into_iter().enumerate() {
        let log = env.path().join(format!("interrupted-{i}.log"));
        let mut child = daemon_command(&opts, store.url(), &dir, &log).env("RUST_LOG", "s3cryptfs=info").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let text = fs::read_to_string(&log).unwrap();
        eprintln!("start killed after {delay_ms} ms: {text}");
        if !text.contains(" mounted ") {
            interrupted += 1;
        }
    }
    assert!(interrupted > 0, "no start was killed before it finished recovering: the test tested nothing");
    let m = Mount::try_start_at(&env, &store, "cse-c", &[], dir.clone()).unwrap();
    assert_eq!(names(&m.dir), vec!["big".to_string(), "small".to_string()], "no duplicates or recovered copies");
    assert_bytes(fs::read(m.path("big")).unwrap(), &data, "big");
    assert_bytes(fs::read(m.path("small")).unwrap(), b"small, never closed", "small");
    drop(m);
    assert!(journal_files(&env).is_empty(), "{:?}", journal_files(&env));
}

/// cse-kms (the journal key is a KMS data key) and sse-c (derived from the customer key sent to S3): staged data is
/// sealed, and a start after kill -9 unwraps the dead run's key and recovers it.
#[test]
fn kms_and_sse_c_journals_are_sealed_and_recovered() {
    let ep = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE");
    let key_id = kms_create_key();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("cse-kms", vec![format!("kms_key_id={key_id}"), format!("kms_endpoint={ep}"), format!("ca_file={ca}")]),
        ("sse-c", vec![format!("endpoint={ep}"), format!("ca_file={ca}")]),
    ];
    for (mode, opts) in cases {
        let env = Env::new();
        let store = Store::s3();
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        let marker = format!("PLAINTEXT-MARKER-{mode}-staged");
        let m = Mount::start_with(&env, &store, mode, &opts);
        let mut f = fs::File::create(m.path("open")).unwrap();
        f.write_all(marker.as_bytes()).unwrap();
        for p in walkdir(&env.path().join("staging")) {
            assert!(!contains(&fs::read(&p).unwrap(), marker.as_bytes()), "{mode}: plaintext at rest in {}", p.display());
        }
        m.kill();
        drop(f);
        let m = Mount::start_with(&env, &store, mode, &opts);
        assert_bytes(fs::read(m.path("open")).unwrap(), marker.as_bytes(), mode);
        let text = m.unmount();
        assert!(text.contains("uploaded data a previous run left staged"), "{mode}: {text}");
        assert!(journal_files(&env).is_empty(), "{mode}: {:?}", journal_files(&env));
    }
}
