//! `-o metrics_addr=`: a real mount serves Prometheus metrics, and they follow what the mount did.
//!
//! Each test runs on the local directory store and on the S3 test server (scripts/test.sh starts it). Series names
//! are those documented in `src/metrics.rs`.

mod common;

use std::fs;
use std::process::Command;

use common::*;

fn requests(text: &str, kind: &str, outcome: &str) -> f64 {
    series_value(text, &format!("s3cryptfs_store_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"))
}

fn metrics_follow_reads_writes_and_errors(env: &Env, store: &Store) {
    let small = pattern(200_000, 1);
    let big = pattern((9 << 20) + 5, 2);
    // The files read are written by an earlier mount: a file this mount wrote can be read from its staged copy
    // until the kernel's (asynchronous) RELEASE of the writing handle arrives, so it may not reach the store.
    let earlier = Mount::start(env, store, "cse-c");
    fs::write(earlier.path("small-r"), &small).unwrap();
    fs::write(earlier.path("big-r"), &big).unwrap();
    earlier.unmount();
    let addr = free_metrics_addr();
    let m = Mount::start_with(env, store, "cse-c", &[&format!("metrics_addr={addr}")]);

    let text = scrape(&addr);
    for help in ["s3cryptfs_fs_written_bytes_total", "s3cryptfs_dirty_bytes", "s3cryptfs_store_requests_total"] {
        assert!(text.contains(&format!("# HELP {help} ")), "no HELP for {help}:\n{text}");
    }
    assert_eq!(requests(&text, "check_access", "ok"), 1.0, "{text}");

    // Writes: one small file (one PUT) and one past the 8 MiB part size (a multipart upload of two parts).
    fs::write(m.path("small"), &small).unwrap();
    fs::write(m.path("big"), &big).unwrap();
    assert_bytes(fs::read(m.path("big-r")).unwrap(), &big, "big");
    assert_bytes(fs::read(m.path("small-r")).unwrap(), &small, "small");
    let first = scrape(&addr);
    // Every open drops the kernel's cached pages (no FOPEN_KEEP_CACHE), so this read reaches the mount again and is
    // served from its page cache: 200,000 bytes are four 64 KiB pages.
    assert_bytes(fs::read(m.path("small-r")).unwrap(), &small, "small, again");
    let text = scrape(&addr);
    let hits = series_value(&text, "s3cryptfs_cache_hits_total") - series_value(&first, "s3cryptfs_cache_hits_total");
    assert!(hits >= 4.0, "the re-read found {hits} pages in the cache:\n{text}");
    assert_eq!(
        series_value(&text, "s3cryptfs_cache_misses_total"),
        series_value(&first, "s3cryptfs_cache_misses_total"),
        "the re-read missed the cache"
    );
    assert!(series_value(&first, "s3cryptfs_cache_misses_total") >= 1.0, "the first reads were all hits:\n{first}");
    assert!(series_value(&text, "s3cryptfs_cache_bytes") >= small.len() as f64, "{text}");

    let plain = (small.len() + big.len()) as f64;
    assert_eq!(series_value(&text, "s3cryptfs_fs_written_bytes_total"), plain, "{text}");
    assert!(series_value(&text, "s3cryptfs_fs_read_bytes_total") >= plain + small.len() as f64, "{text}");
    // Ciphertext: every byte plus headers and tags went out, and came back at least once.
    assert!(series_value(&text, "s3cryptfs_store_written_bytes_total") > plain, "{text}");
    assert!(series_value(&text, "s3cryptfs_store_read_bytes_total") > plain, "{text}");

    assert!(requests(&text, "put", "ok") >= 1.0, "{text}");
    // Exactly one upload of two parts: FLUSHes from other processes (children of parallel tests closing inherited
    // descriptors at exec) must not upload the file mid-write, which they once did.
    assert_eq!(requests(&text, "multipart_create", "ok"), 1.0, "{text}");
    assert_eq!(requests(&text, "multipart_part", "ok"), 2.0, "{text}");
    assert_eq!(requests(&text, "multipart_complete", "ok"), 1.0, "{text}");
    assert!(requests(&text, "get_range", "ok") >= 2.0, "{text}");
    assert_eq!(
        series_value(&text, "s3cryptfs_store_request_duration_seconds_count{kind=\"multipart_part\"}"),
        requests(&text, "multipart_part", "ok"),
        "every part has a latency sample:\n{text}"
    );
    // Closed files are uploaded: nothing is left staged or uploading.
    assert_eq!(series_value(&text, "s3cryptfs_dirty_files"), 0.0, "{text}");
    assert_eq!(series_value(&text, "s3cryptfs_dirty_bytes"), 0.0, "{text}");
    assert_eq!(series_value(&text, "s3cryptfs_uploads_in_flight"), 0.0, "{text}");

    // A failing operation is counted by its errno.
    let rmdir_errors = "s3cryptfs_fuse_errors_total{op=\"rmdir\",errno=\"ENOTEMPTY\"}";
    assert_eq!(series_value(&text, rmdir_errors), 0.0);
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"x").unwrap();
    let err = fs::remove_dir(m.path("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    let text = scrape(&addr);
    assert_eq!(series_value(&text, rmdir_errors), 1.0, "{text}");

    // Only /metrics is served.
    let out = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{addr}/")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // A second mount asking for the same address fails before mounting, and says why.
    let err = Mount::try_start(env, store, "cse-c", &[&format!("metrics_addr={addr}")])
        .err()
        .expect("a second mount on the same metrics address must fail");
    assert!(err.contains(&format!("metrics_addr={addr}")), "{err}");
    m.unmount();
}
both!(metrics_follow_reads_writes_and_errors);


/// All requests of one kind, whatever their outcome.
fn all_requests(text: &str, kind: &str) -> f64 {
    let prefix = format!("s3cryptfs_store_requests_total{{kind=\"{kind}\",");
    text.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// What happened between two scrapes, for the kinds a namespace operation uses.
fn delta(before: &str, after: &str) -> String {
    ["head", "has_children", "list", "put", "delete"]
        .iter()
        .map(|k| format!("{k}={}", all_requests(after, k) - all_requests(before, k)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Issue 13: files created in a directory this mount made cost their upload and no lookup (the mount knows the
/// directory's names), and `rm -r` of them after their attributes expired costs at most one delete each and no HEAD
/// (the lookups the kernel sends before each unlink are answered from rm's own listing of the directory). The deletes
/// go out behind the unlinks (`fs::deletes`): one conditional delete each where the store checks them (the local
/// store), DeleteObjects batches where it cannot (LocalStack). rmdir waits for them, so when `rm -r` returns the store
/// holds nothing of the directory.
fn creates_and_rm_r_ask_nothing_the_mount_knows(env: &Env, store: &Store) {
    const FILES: usize = 40;
    let addr = free_metrics_addr();
    let m = Mount::start_with(env, store, "cse-c", &[&format!("metrics_addr={addr}")]);
    fs::create_dir(m.path("d")).unwrap();
    let before = scrape(&addr);
    for i in 0..FILES {
        fs::write(m.path(&format!("d/f{i}")), pattern(4096, i as u64)).unwrap();
    }
    let after = scrape(&addr);
    let what = delta(&before, &after);
    assert_eq!(all_requests(&after, "put") - all_requests(&before, "put"), FILES as f64, "{what}");
    // Before: a HEAD of the name, a HEAD of its marker and a one-page LIST per file. Now at most the lookups of `d`
    // itself and a listing of it per second (attr_timeout), however long the creates take on a loaded machine.
    let lookups = all_requests(&after, "head") + all_requests(&after, "has_children")
        - all_requests(&before, "head")
        - all_requests(&before, "has_children");
    assert!(lookups < FILES as f64 / 2.0, "lookups before the uploads: {what}");

    std::thread::sleep(std::time::Duration::from_millis(1500)); // every attribute expired
    let before = scrape(&addr);
    sh("rm -r d", &m.dir);
    let after = scrape(&addr);
    let what = delta(&before, &after);
    assert!(!m.path("d").exists());
    let deletes = all_requests(&after, "delete") - all_requests(&before, "delete");
    // The directory's index (written a second after the creates, see src/fs/dirindex.rs; none on the local store) is
    // one more object to delete.
    let index = if matches!(store, Store::S3 { .. }) { 1.0 } else { 0.0 };
    match store {
        Store::S3 { .. } if std::env::var("S3CRYPTFS_TEST_SERVER").is_ok_and(|s| s == "localstack") => {
            // The mount's probe learned that LocalStack refuses If-Match on deletes: they go in batches.
            assert!(deletes < FILES as f64 / 2.0, "deletes not batched: {what}")
        }
        // object_store has no conditional delete on Azure: the deletes are unconditional, so they go in batches.
        Store::Azure { .. } => assert!(deletes < FILES as f64 / 2.0, "deletes not batched: {what}"),
        // Unconditional on GCS too, and batched as the deletes queue up; but each object is one DELETE there in any
        // case (no batch API), the emulator answers fast and the batches stay small: at most one per object.
        Store::Gcs { .. } => assert!(deletes <= FILES as f64 + 2.0, "{what}"),
        _ => assert_eq!(deletes, FILES as f64 + 1.0 + index, "{what}"),
    }
    // Only the lookups of `d` itself may HEAD (its marker, and a file of the same name that is not there), before rm
    // reads it and, past attr_timeout on a loaded machine, again for the rmdir.
    assert!(all_requests(&after, "head") - all_requests(&before, "head") <= 4.0, "HEADs during rm -r: {what}");
    let left: Vec<String> =
        store.raw_objects().into_iter().map(|(k, _)| k).filter(|k| k.starts_with("d/") || k.contains("/d/")).collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
}

/// Issue 13, docs/SEMANTICS.md: an unlink removes the name whatever version another mount put there since this mount
/// last looked, as it did before. Mount a lists the directory, b replaces the file, a removes it: a's lookup is
/// answered from its listing, and the unlink is one delete where the store cannot check the version (LocalStack), or a
/// refused conditional delete and an unconditional one where it can (the local store, S3), with no lookup: the
/// deletes go out after the unlink returned (`fs::deletes`).
fn an_unlink_removes_a_file_another_mount_replaced(env: &Env, store: &Store) {
    let addr = free_metrics_addr();
    // A long attr_timeout, so the steps after a's listing stay within it on a loaded machine.
    let a = Mount::start_with(env, store, "cse-c", &[&format!("metrics_addr={addr}"), "attr_timeout=3"]);
    let b = Mount::start(env, store, "cse-c");
    fs::write(a.path("f"), b"written by a").unwrap();
    assert_eq!(fs::read(b.path("f")).unwrap(), b"written by a");
    std::thread::sleep(std::time::Duration::from_millis(3500)); // a's knowledge of f expired
    let before = scrape(&addr);
    assert_eq!(fs::read_dir(&a.dir).unwrap().count(), 1);
    fs::write(b.path("f"), b"replaced by b").unwrap();
    fs::remove_file(a.path("f")).unwrap();
    fs::File::open(&a.dir).unwrap().sync_all().unwrap(); // fsyncdir: the delete has reached the store
    assert!(store.raw_objects().iter().all(|(k, _)| k != "f" && !k.ends_with("/f")), "left in the store after fsyncdir");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = scrape(&addr);
    let what = delta(&before, &after);
    assert!(!b.path("f").exists(), "b still sees f");
    assert!(store.raw_objects().iter().all(|(k, _)| k != "f" && !k.ends_with("/f")), "left in the store");
    let (heads, deletes) = (all_requests(&after, "head") - all_requests(&before, "head"),
        all_requests(&after, "delete") - all_requests(&before, "delete"));
    let refused = requests(&after, "delete", "precondition") - requests(&before, "delete", "precondition");
    match store {
        Store::S3 { .. } if std::env::var("S3CRYPTFS_TEST_SERVER").is_ok_and(|s| s == "localstack") => {
            assert_eq!((heads, deletes), (0.0, 1.0), "{what}")
        }
        // Azure (and GCS): no conditional delete there, so one unconditional delete, as on LocalStack.
        Store::Azure { .. } | Store::Gcs { .. } => assert_eq!((heads, deletes, refused), (0.0, 1.0, 0.0), "{what}"),
        _ => assert_eq!((heads, deletes, refused), (0.0, 2.0, 1.0), "{what}"),
    }
}

both!(creates_and_rm_r_ask_nothing_the_mount_knows);
both!(an_unlink_removes_a_file_another_mount_replaced);
