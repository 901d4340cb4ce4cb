//! Large files changed in place through a real mount (issue 13): a byte written into the middle of, an append to and
//! a truncate of a large cse-c file move a few MiB each way, not the file; the result is byte-exact through a fresh
//! mount; a chunk of the older version spliced into the newer one fails authentication; a change staged and not
//! flushed when the daemon is killed is applied by the next start.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::*;

/// Writes a file whole but not front to back (its last byte first), so it is uploaded whole at close, not streamed
/// while written (both write format version 3; the streamed case has its own test below).
fn write_unstreamed(path: &std::path::Path, content: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    let last = content.len() - 1;
    f.write_all_at(&content[last..], last as u64).unwrap();
    f.write_all_at(&content[..last], 0).unwrap();
}

/// Writes "big" with `write_unstreamed` through a mount of its own, which is then unmounted. The changes a test then
/// makes go through another mount: on the mount that wrote the file, a writer opening it before the kernel's RELEASE
/// of the first writer reaches the daemon (it may come after `close` returned) finds the whole file still staged,
/// and the file is then uploaded whole again rather than changed in place.
fn write_base(env: &Env, store: &Store, content: &[u8]) {
    let m = Mount::start(env, store, "cse-c");
    write_unstreamed(&m.path("big"), content);
    m.unmount();
}

const MIB: usize = 1 << 20;
/// The bound on what one small change may move in each direction.
const BOUND: f64 = 16.0 * MIB as f64;
const READ: &str = "s3cryptfs_store_read_bytes_total";
const WRITTEN: &str = "s3cryptfs_store_written_bytes_total";

/// (bytes fetched, bytes sent) since the last call.
struct Moved {
    addr: String,
    last: (f64, f64),
}

impl Moved {
    fn new(addr: &str) -> Moved {
        let mut m = Moved { addr: addr.to_string(), last: (0.0, 0.0) };
        m.take();
        m
    }
    fn take(&mut self) -> (f64, f64) {
        let text = scrape(&self.addr);
        let now = (series_value(&text, READ), series_value(&text, WRITTEN));
        let d = (now.0 - self.last.0, now.1 - self.last.1);
        self.last = now;
        d
    }
}

#[test]
fn a_byte_an_append_and_a_truncate_of_a_large_cse_c_file_move_little_and_read_back_exact_on_s3() {
    let env = Env::new();
    let store = Store::s3();
    let addr = free_metrics_addr();
    let mut model = pattern(64 * MIB + 12_345, 13);
    write_base(&env, &store, &model);
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let mut moved = Moved::new(&addr);

    // One byte in the middle.
    let f = fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
    f.write_at(b"X", 40 * MIB as u64 + 5).unwrap();
    drop(f);
    model[40 * MIB + 5] = b'X';
    let (down, up) = moved.take();
    assert!(down <= BOUND && up <= BOUND, "1 byte: {down} bytes fetched, {up} sent");

    // 4 KiB appended.
    let mut f = fs::OpenOptions::new().append(true).open(m.path("big")).unwrap();
    let tail = pattern(4096, 14);
    f.write_all(&tail).unwrap();
    drop(f);
    model.extend_from_slice(&tail);
    let (down, up) = moved.take();
    assert!(down <= BOUND && up <= BOUND, "append: {down} bytes fetched, {up} sent");

    // Cut by 100,000 bytes (an open handle, then by path), then read the open file across a chunk it did not touch.
    let f = fs::OpenOptions::new().read(true).write(true).open(m.path("big")).unwrap();
    f.set_len(model.len() as u64 - 100_000).unwrap();
    model.truncate(model.len() - 100_000);
    let mut buf = vec![0u8; 200_000];
    f.read_exact_at(&mut buf, 10 * MIB as u64 - 7).unwrap();
    assert_bytes(&buf, &model[10 * MIB - 7..10 * MIB - 7 + 200_000], "read of the open file");
    drop(f);
    let (down, up) = moved.take();
    assert!(down <= BOUND && up <= BOUND, "truncate: {down} bytes fetched, {up} sent");

    m.unmount();
    let m = Mount::start(&env, &store, "cse-c");
    assert_bytes(fs::read(m.path("big")).unwrap(), &model, "read back through a fresh mount");
    m.unmount();
}

/// A file written front to back is uploaded while it is written (tests/stream.rs), before its length is known; format
/// version 3 seals it under the implicit version id, so its first change is made in place too, not a whole rewrite
/// (which moved the whole file each way when streamed files were version 1).
#[test]
fn a_byte_changed_in_a_streamed_large_cse_c_file_moves_little_and_reads_back_exact_on_s3() {
    let env = Env::new();
    let store = Store::s3();
    let addr = free_metrics_addr();
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let mut model = pattern(48 * MIB + 777, 21);
    // Streamed: parts travel while the file is still open (tests/stream.rs checks the rest of streaming).
    let parts = || metric(&addr, "s3cryptfs_store_requests_total{kind=\"multipart_part\",outcome=\"ok\"}");
    let mut f = fs::File::create(m.path("big")).unwrap();
    for piece in model.chunks(MIB) {
        f.write_all(piece).unwrap();
    }
    let streamed = wait_until(std::time::Duration::from_secs(60), || parts() >= 3.0);
    assert!(streamed, "parts were sent before close: the file streamed");
    drop(f);
    // Changed through another mount (see `write_base`).
    m.unmount();
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("metrics_addr={addr}")]);
    let mut moved = Moved::new(&addr);

    let f = fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
    f.write_at(b"Y", 30 * MIB as u64 + 3).unwrap();
    drop(f);
    model[30 * MIB + 3] = b'Y';
    let (down, up) = moved.take();
    assert!(down <= BOUND && up <= BOUND, "1 byte: {down} bytes fetched, {up} sent");

    m.unmount();
    let m = Mount::start(&env, &store, "cse-c");
    assert_bytes(fs::read(m.path("big")).unwrap(), &model, "read back through a fresh mount");
    m.unmount();
}

/// The copied chunks keep the data key, so the version ids are what keeps an older version's chunk out: spliced
/// into the newer object at its own place, it fails authentication (EIO), while the rest of the file reads.
#[test]
fn a_chunk_of_the_older_version_spliced_into_the_newer_one_fails_authentication() {
    let env = Env::new();
    let store = Store::local(env.path());
    let model = pattern(40 * MIB, 21);
    write_base(&env, &store, &model);
    let m = Mount::start(&env, &store, "cse-c");
    let raw = |store: &Store| store.raw_objects().into_iter().find(|(k, _)| k == "big").unwrap().1;
    let old = raw(&store);
    let chunk = 300usize;
    let f = fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
    f.write_at(b"new", (chunk * 65536 + 10) as u64).unwrap();
    drop(f);
    m.unmount();
    let mut new = raw(&store);
    assert_eq!(old[..512], new[..512], "changed in place: same header, so same data key and file id");
    let at = 512 + chunk * 65564;
    assert_ne!(old[at..at + 65564], new[at..at + 65564], "the changed chunk was sealed again");
    new[at..at + 65564].copy_from_slice(&old[at..at + 65564]);
    store.put_raw("big", new);

    let m = Mount::start(&env, &store, "cse-c");
    let f = fs::File::open(m.path("big")).unwrap();
    let mut buf = vec![0u8; 100];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_bytes(&buf, &model[..100], "an untouched chunk still reads");
    let err = f.read_exact_at(&mut buf, (chunk * 65536) as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "the old chunk is refused: {err}");
    drop(f);
    m.unmount();
}

/// A byte written into a large file, staged sparsely and not flushed, when the daemon is killed: the next start
/// applies it (the object is still the base) and the file reads byte-exact. At 40 MiB and just above the in-place
/// threshold (`inplace::MIN_IN_PLACE_LEN`, 10 MiB); the smaller file is also read through after the write, so the
/// kill finds the base's read-ahead under way too.
#[test]
fn a_byte_staged_in_a_large_file_when_the_daemon_is_killed_is_applied_by_the_next_start() {
    let env = Env::new();
    let store = Store::s3();
    for (len, at, seed) in [(40 * MIB + 3, 33 * MIB, 31), (12 * MIB + 5, 11 * MIB + 7, 32)] {
        let mut model = pattern(len, seed);
        write_base(&env, &store, &model);
        let m = Mount::start(&env, &store, "cse-c");
        let f = fs::OpenOptions::new().read(true).write(true).open(m.path("big")).unwrap();
        f.write_at(b"K", at as u64).unwrap();
        model[at] = b'K';
        if len < 16 * MIB {
            let mut head = vec![0u8; 3 * MIB];
            f.read_exact_at(&mut head, 0).unwrap();
            assert_bytes(&head, &model[..3 * MIB], "a read of the open file");
        }
        m.kill();
        drop(f);
        let m = Mount::start(&env, &store, "cse-c");
        assert_bytes(fs::read(m.path("big")).unwrap(), &model, &format!("{len} bytes, after recovery"));
        let text = m.unmount();
        assert!(text.contains("uploaded data a previous run left staged"), "{text}");
    }
}
