//! Streaming uploads through a real mount: a file written front to back is sent while it is written, and every way a
//! stream can end early (a write behind it, attributes set on the open file, a rename, an unlink, a kill) still
//! leaves exactly the file the application wrote, or nothing where POSIX says nothing.
//!
//! Each test runs on the local directory store and on the S3 test server (scripts/test.sh starts it).

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use common::*;

const MIB: usize = 1 << 20;

fn requests(text: &str, kind: &str) -> f64 {
    series_value(text, &format!("s3cryptfs_store_requests_total{{kind=\"{kind}\",outcome=\"ok\"}}"))
}

/// Writes `data` in 1 MiB writes to an open file.
fn write_in_mib(f: &mut fs::File, data: &[u8]) {
    for piece in data.chunks(MIB) {
        f.write_all(piece).unwrap();
    }
}

/// Polls the metrics until `kind` requests reach `at_least` (parts travel in the background).
fn wait_for(addr: &str, kind: &str, at_least: f64) -> String {
    wait_until(Duration::from_secs(60), || requests(&scrape(addr), kind) >= at_least);
    scrape(addr)
}

/// Whether the store holds an object at `key` (read with the raw client, not the mount).
fn stored(store: &Store, key: &str) -> bool {
    store.raw_objects().iter().any(|(k, _)| k == key)
}

fn parts_travel_while_the_file_is_written(env: &Env, store: &Store) {
    let addr = free_metrics_addr();
    let m = Mount::start_with(env, store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let data = pattern(40 * MIB + 4321, 7);
    let before = SystemTime::now() - Duration::from_secs(2);
    let mut f = fs::File::create(m.path("big")).unwrap();
    write_in_mib(&mut f, &data);
    // Still open: at least three of the five 8 MiB parts have been sent, and no object is visible yet.
    let text = wait_for(&addr, "multipart_part", 3.0);
    assert!(requests(&text, "multipart_part") >= 3.0, "parts sent before close:\n{text}");
    assert_eq!(requests(&text, "multipart_create"), 1.0, "{text}");
    assert!(!stored(store, "big"), "the object is visible before close");
    drop(f);
    let text = scrape(&addr);
    assert_eq!(requests(&text, "multipart_create"), 1.0, "the file was sent once:\n{text}");
    assert_eq!(requests(&text, "multipart_complete"), 1.0, "{text}");
    assert_eq!(requests(&text, "multipart_part"), 6.0, "40 MiB of ciphertext is five full parts and a tail:\n{text}");
    assert_eq!(requests(&text, "multipart_abort"), 0.0, "{text}");
    assert_eq!(requests(&text, "put"), 0.0, "{text}");
    let mtime = fs::metadata(m.path("big")).unwrap().modified().unwrap();
    assert_bytes(fs::read(m.path("big")).unwrap(), &data, "big on the writing mount");
    drop(m);

    let m = Mount::start(env, store, "cse-c");
    let meta = fs::metadata(m.path("big")).unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644 & !0o022);
    // The mtime is the store's (the completion), the same on both mounts, and not before the writes.
    assert_eq!(meta.modified().unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
               mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
    assert!(meta.modified().unwrap() >= before, "{:?} < {before:?}", meta.modified());
    assert_bytes(fs::read(m.path("big")).unwrap(), &data, "big on a fresh mount");
}
both!(parts_travel_while_the_file_is_written);

fn a_write_behind_the_stream_sends_the_file_whole(env: &Env, store: &Store) {
    let addr = free_metrics_addr();
    let m = Mount::start_with(env, store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let mut data = pattern(30 * MIB, 3);
    let mut f = fs::File::create(m.path("patched")).unwrap();
    write_in_mib(&mut f, &data);
    wait_for(&addr, "multipart_part", 2.0);
    // A header patched at the start once the body is written (as archivers and media muxers do).
    f.write_all_at(b"HEADER", 0).unwrap();
    data[..6].copy_from_slice(b"HEADER");
    f.write_all(b"tail").unwrap();
    data.extend_from_slice(b"tail");
    drop(f);
    let text = wait_for(&addr, "multipart_abort", 1.0);
    assert_eq!(requests(&text, "multipart_abort"), 1.0, "the stream was given up:\n{text}");
    assert_eq!(requests(&text, "multipart_complete"), 1.0, "{text}");
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    assert_bytes(fs::read(m.path("patched")).unwrap(), &data, "patched");
}
both!(a_write_behind_the_stream_sends_the_file_whole);

fn attributes_set_on_the_open_file_are_kept(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    let data = pattern(20 * MIB + 1, 4);
    let mut f = fs::File::create(m.path("kept")).unwrap();
    write_in_mib(&mut f, &data);
    // What cp -p does before it closes the copy.
    let when = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    f.set_times(fs::FileTimes::new().set_modified(when).set_accessed(when)).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o600)).unwrap();
    drop(f);
    let check = |m: &Mount, what: &str| {
        let meta = fs::metadata(m.path("kept")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{what}");
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_600_000_000, 123_456_789), "{what}");
        assert_eq!(meta.len(), data.len() as u64, "{what}");
    };
    check(&m, "writing mount");
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    check(&m, "fresh mount");
    assert_bytes(fs::read(m.path("kept")).unwrap(), &data, "kept");
}
both!(attributes_set_on_the_open_file_are_kept);

fn renamed_or_unlinked_while_streaming(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    let data = pattern(24 * MIB, 5);
    let mut f = fs::File::create(m.path("first")).unwrap();
    write_in_mib(&mut f, &data[..20 * MIB]);
    fs::rename(m.path("first"), m.path("second")).unwrap();
    write_in_mib(&mut f, &data[20 * MIB..]);
    drop(f);

    let mut g = fs::File::create(m.path("doomed")).unwrap();
    write_in_mib(&mut g, &data);
    fs::remove_file(m.path("doomed")).unwrap();
    g.write_all(b"more").unwrap();
    drop(g);
    drop(m);

    let m = Mount::start(env, store, "cse-c");
    let mut names: Vec<String> =
        fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["second".to_string()]);
    assert_bytes(fs::read(m.path("second")).unwrap(), &data, "second");
    drop(m);
    let keys: Vec<String> = store.raw_objects().into_iter().map(|(k, _)| k).filter(|k| !k.contains(".s3cryptfs-")).collect();
    assert_eq!(keys, vec!["second".to_string()], "nothing else reached the store");
}
both!(renamed_or_unlinked_while_streaming);

/// A daemon killed in the middle of a stream: the journal still holds the whole file, and the next start uploads it.
/// The multipart upload the stream had open does not stay behind in the store (invisible, and billed on S3): the
/// journal record names it, and the start aborts it.
fn a_kill_in_the_middle_of_a_stream_loses_nothing_staged(env: &Env, store: &Store) {
    let addr = free_metrics_addr();
    let m = Mount::start_with(env, store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let data = pattern(32 * MIB + 17, 6);
    let mut f = fs::File::create(m.path("interrupted")).unwrap();
    write_in_mib(&mut f, &data);
    wait_for(&addr, "multipart_part", 2.0);
    m.kill();
    drop(f);
    if let Some(open) = store.multipart_uploads() {
        assert_eq!(open.len(), 1, "the killed stream's upload is open");
    }
    let m = Mount::start(env, store, "cse-c");
    assert_bytes(fs::read(m.path("interrupted")).unwrap(), &data, "interrupted, after the restart");
    if let Some(open) = store.multipart_uploads() {
        assert_eq!(open, Vec::<(String, String)>::new(), "no multipart upload is left open");
    }
}
both!(a_kill_in_the_middle_of_a_stream_loses_nothing_staged);

/// The journal's disk holds 96 MiB; a 200 MiB file streams through it: once the disk runs low, the staged copy of
/// what the store has taken is freed. A write into what was already sent then fails with ENOSPC instead of
/// corrupting anything, and the file is stored as written.
fn a_file_larger_than_the_journal_disk_streams(env: &Env, store: &Store) {
    let disk = SmallDisk::mount(env, 96);
    let m = Mount::start(env, store, "cse-c");
    let data = pattern(200 * MIB + 99, 8);
    let mut f = fs::File::create(m.path("huge")).unwrap();
    write_in_mib(&mut f, &data);
    let err = f.write_all_at(b"too late", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    f.sync_all().unwrap();
    drop(f);
    assert!(m.log_text().contains("the disk under the write journal is low"), "{}", m.log_text());
    // Read back through the writing mount (the store's version now) and a fresh one.
    assert_bytes(fs::read(m.path("huge")).unwrap(), &data, "huge on the writing mount");
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    assert_bytes(fs::read(m.path("huge")).unwrap(), &data, "huge on a fresh mount");
    drop(m);
    drop(disk);
}
both!(a_file_larger_than_the_journal_disk_streams);
