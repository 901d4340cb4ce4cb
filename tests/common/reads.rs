//! Helpers for the tests of random reads and whole-object fetches (tests/random_reads.rs, tests/frozen.rs): pages
//! read and checked against their pattern, a medium file that is fetched whole into a disk cache, and polls of the
//! metrics for what a background fetch does (it has no event a test could wait on).

use std::os::unix::fs::FileExt;

use super::*;

/// Reads a 4 KiB page at each offset and checks it against `plain`.
pub fn pread_pages(f: &std::fs::File, plain: &[u8], offsets: impl Iterator<Item = u64>) {
    let mut buf = vec![0u8; 4096];
    for off in offsets {
        f.read_exact_at(&mut buf, off).unwrap();
        assert_bytes(&buf, &plain[off as usize..off as usize + 4096], "4 KiB page");
    }
}

/// 4 KiB-aligned offsets spread over `len` bytes, a different sequence per `seed`, each in a different 64 KiB chunk
/// than the one before (so no read is served by its predecessor's chunk).
pub fn offsets(seed: u64, count: usize, len: u64) -> impl Iterator<Item = u64> {
    let pages = len / 4096;
    (0..count as u64).map(move |i| ((seed * 7_919 + i * 104_729) % (pages - 1)) * 4096)
}

/// Polls `series` until it reaches `want` or a generous deadline passes (then the caller's assertion tells what
/// happened): a background fetch has no event a test could wait on.
pub fn wait_for(addr: &str, series: &str, want: f64) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = metric(addr, series);
        if v >= want || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Polls until no store request is in flight (or a generous deadline passes).
pub fn wait_idle(addr: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(addr, "s3cryptfs_store_requests_in_flight") > 0.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Six offsets, each 2 MiB or more from the one before and from 0 (far outside what counts as sequential), in a
/// 48 MiB file: as many random reads as that file asks for before it is fetched whole (one per 8 MiB).
pub const MEDIUM_READS: [u64; 6] = [41 << 20, 17 << 19, 51 << 19, 65 << 19, 5 << 20, 17 << 20];

/// A 48 MiB file of `seed`'s pattern, written through a mount as "medium".
pub fn write_medium(env: &Env, store: &Store, seed: u64) -> Vec<u8> {
    let plain = pattern(48 << 20, seed);
    let m = Mount::start(env, store, "cse-c");
    std::fs::write(m.path("medium"), &plain).unwrap();
    plain
}

/// A cse-c mount with 32 MiB of page cache (whole objects up to 8 MiB go there) and 256 MiB of disk cache in `cache`
/// (whole objects up to 64 MiB go there), its metrics on `addr`, and the `extra` options.
pub fn mount_with_disk_cache(env: &Env, store: &Store, cache: &std::path::Path, addr: &str, extra: &[&str]) -> Mount {
    let dir = format!("cache_dir={}", cache.display());
    let mut opts = vec![format!("metrics_addr={addr}"), "cache_size=32M".into(), dir, "cache_disk_size=256M".into()];
    opts.extend(extra.iter().map(|o| o.to_string()));
    Mount::start_with(env, store, "cse-c", &opts.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Reads every page of `plain` through `f` in a scattered order and checks that none came from the store.
pub fn every_page_served_locally(addr: &str, f: &std::fs::File, plain: &[u8], what: &str) {
    let gets = "s3cryptfs_store_requests_total{kind=\"get_range\",outcome=\"ok\"}";
    let gets_before = metric(addr, gets);
    pread_pages(f, plain, scattered_pages(plain.len()));
    assert_eq!(metric(addr, gets), gets_before, "{what}");
}

/// The offset of every 4 KiB page of a file of `len` bytes, once each, in a scattered order.
pub fn scattered_pages(len: usize) -> impl Iterator<Item = u64> {
    let pages = len as u64 / 4096;
    (0..pages).map(move |i| (i * 397 % pages) * 4096)
}

/// Opens "medium" (of content `plain`) on `m`, reads it at [`MEDIUM_READS`] so that it is fetched whole into the disk
/// cache, and waits until that fetch is landing ([`whole_fetch_landing`]); fails if it had already ended, as then
/// nothing `before` names (the event the caller brings next) could meet the fetch. Gives the descriptor and the
/// bytes written to the disk cache by then.
pub fn whole_fetch_under_way(m: &Mount, addr: &str, plain: &[u8], before: &str) -> (std::fs::File, f64) {
    let f = std::fs::File::open(m.path("medium")).unwrap();
    pread_pages(&f, plain, MEDIUM_READS.into_iter());
    let on_disk = whole_fetch_landing(addr);
    assert!(on_disk < plain.len() as f64, "the whole fetch had ended before {before}: {on_disk} bytes");
    (f, on_disk)
}

/// [`whole_fetch_under_way`] on a mount that `start` makes (with its metrics address), tried up to three times. On a
/// fast store (the local one, on a machine that is busy otherwise) the fetch can end before the poll sees it
/// landing; then the mount is unmounted, `reset` undoes what it left (empties the disk cache) and a new one is tried.
/// Fails only if every try finds the fetch ended, as then nothing could meet it.
pub fn whole_fetch_under_way_retrying(
    plain: &[u8],
    before: &str,
    mut start: impl FnMut() -> (Mount, String),
    mut reset: impl FnMut(),
) -> (Mount, String, std::fs::File, f64) {
    for attempt in 1..=3 {
        let (m, addr) = start();
        let f = std::fs::File::open(m.path("medium")).unwrap();
        pread_pages(&f, plain, MEDIUM_READS.into_iter());
        let on_disk = whole_fetch_landing(&addr);
        if on_disk < plain.len() as f64 {
            return (m, addr, f, on_disk);
        }
        eprintln!("try {attempt}: the whole fetch had ended before {before} ({on_disk} bytes); trying again");
        drop(f);
        let log = m.unmount();
        assert!(!log.contains("panicked"), "{log}");
        reset();
    }
    panic!("the whole fetch had ended before {before} in each of three tries");
}

/// Waits (polling every 2 ms, at most 30 s) until a whole fetch started by [`MEDIUM_READS`] is landing in the disk
/// cache (past 1 MiB written there, as the reads' own six chunks make less) and returns the bytes written by then;
/// fails if it never does.
pub fn whole_fetch_landing(addr: &str) -> f64 {
    let written = "s3cryptfs_disk_cache_written_bytes_total";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut on_disk = metric(addr, written);
    while on_disk < (1 << 20) as f64 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
        on_disk = metric(addr, written);
    }
    assert!(on_disk >= (1 << 20) as f64, "no whole fetch reached the disk cache: {on_disk} bytes written there");
    on_disk
}

/// Waits until the disk cache holds at least `size` bytes and its writes have stopped (the gauge stopped moving),
/// with no store request in flight; returns the bytes there.
pub fn disk_cache_settled(addr: &str, size: usize) -> f64 {
    let mut cached = wait_for(addr, "s3cryptfs_disk_cache_bytes", size as f64);
    if cached < size as f64 {
        return cached;
    }
    wait_idle(addr);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = metric(addr, "s3cryptfs_disk_cache_bytes");
        if now == cached {
            return cached;
        }
        cached = now;
    }
}
