//! Random reads through a real mount (issue 13): concurrent readers of one file reach the store together instead of
//! queueing behind each other, a small file read randomly is fetched whole once, and a large one read randomly costs
//! one chunk per read, never the file. Everything is counted through the metrics endpoint; nothing is timed.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

/// Reads a 4 KiB page at each offset and checks it against `plain`.
fn pread_pages(f: &std::fs::File, plain: &[u8], offsets: impl Iterator<Item = u64>) {
    let mut buf = vec![0u8; 4096];
    for off in offsets {
        f.read_exact_at(&mut buf, off).unwrap();
        assert_bytes(&buf, &plain[off as usize..off as usize + 4096], "4 KiB page");
    }
}

/// 4 KiB-aligned offsets spread over `len` bytes, a different sequence per `seed`, each in a different 64 KiB chunk
/// than the one before (so no read is served by its predecessor's chunk).
fn offsets(seed: u64, count: usize, len: u64) -> impl Iterator<Item = u64> {
    let pages = len / 4096;
    (0..count as u64).map(move |i| ((seed * 7_919 + i * 104_729) % (pages - 1)) * 4096)
}

/// Eight readers, each with its own descriptor, read random pages of one file at once: the store sees eight reads in
/// flight together (a lock held across a fetch, or one queue of reads per file, would show one).
#[test]
fn eight_readers_have_eight_reads_in_flight() {
    let env = Env::new();
    let store = Store::s3();
    let size = 32 << 20;
    let plain = pattern(size, 11);
    {
        let m = Mount::start(&env, &store, "cse-c");
        std::fs::write(m.path("big"), &plain).unwrap();
    }
    let addr = free_metrics_addr();
    // A small cache, so the file is far too large to be prefetched whole: every read goes to the store.
    let m = Mount::start_with(&env, &store, "cse-c", &[&format!("metrics_addr={addr}"), "cache_size=8M"]);
    std::thread::scope(|s| {
        for r in 0..8u64 {
            let (path, plain) = (m.path("big"), &plain);
            s.spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                pread_pages(&f, plain, offsets(r + 1, 40, size as u64));
            });
        }
    });
    let most = metric(&addr, "s3cryptfs_store_gets_in_flight_max");
    assert!(most >= 8.0, "at most {most} reads were in flight at once with 8 concurrent readers");
}
