//! Random reads through a real mount (issue 13): concurrent readers of one file reach the store together instead of
//! queueing behind each other, a small file read randomly is fetched whole once, and a large one read randomly costs
//! one chunk per read, never the file, where there is no disk cache or scratch; a medium one goes whole into the
//! disk cache (or the scratch, without one), and a kill, an unlink or another mount's replacement of the file during
//! that loses nothing and mixes no versions (a frozen store during it: tests/frozen.rs). Everything is counted
//! through the metrics endpoint; nothing is timed.

mod common;

use std::os::unix::fs::FileExt;

use common::reads::*;
use common::*;

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
    // A small cache and no scratch, so the file is not prefetched whole: every read goes to the store.
    let opts = [&format!("metrics_addr={addr}"), "cache_size=8M", "scratch_size=0"];
    let m = Mount::start_with(&env, &store, "cse-c", &opts);
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

/// A file small next to the cache, read at random, is fetched whole once in a few large GETs and then served from
/// memory; a file too large for that, read at random on a mount without a disk cache or scratch, costs one chunk per
/// read — never the file.
fn small_file_fetched_whole_large_file_chunk_by_chunk(env: &Env, store: &Store) {
    let small = pattern(6 << 20, 21);
    let large = pattern(24 << 20, 22);
    {
        let m = Mount::start(env, store, "cse-c");
        std::fs::write(m.path("small"), &small).unwrap();
        std::fs::write(m.path("large"), &large).unwrap();
    }
    let addr = free_metrics_addr();
    // 32 MiB of cache: files up to 8 MiB are fetched whole, the 24 MiB one is not.
    let opts = [&format!("metrics_addr={addr}"), "cache_size=32M", "scratch_size=0"];
    let m = Mount::start_with(env, store, "cse-c", &opts);
    let gets = "s3cryptfs_store_requests_total{kind=\"get_range\",outcome=\"ok\"}";
    let bytes = "s3cryptfs_store_read_bytes_total";

    let f = std::fs::File::open(m.path("small")).unwrap();
    pread_pages(&f, &small, offsets(1, 3, small.len() as u64));
    let fetched = wait_for(&addr, bytes, small.len() as f64);
    assert!(fetched >= small.len() as f64, "three random reads did not fetch the 6 MiB file whole: {fetched} bytes");
    let (gets_before, bytes_before) = (metric(&addr, gets), metric(&addr, bytes));
    // Every page of it, in a scattered order: all from memory.
    pread_pages(&f, &small, scattered_pages(small.len()));
    assert_eq!(metric(&addr, gets), gets_before, "reads of a file fetched whole went to the store");
    assert_eq!(metric(&addr, bytes), bytes_before);
    // Whole, in a few large GETs: not one per 64 KiB chunk (96 of them).
    assert!(gets_before <= 12.0, "fetching 6 MiB whole took {gets_before} GETs");
    assert!(bytes_before < 1.1 * small.len() as f64, "6 MiB fetched as {bytes_before} bytes");

    let f = std::fs::File::open(m.path("large")).unwrap();
    let reads = 40;
    pread_pages(&f, &large, offsets(2, reads, large.len() as u64));
    // Anything started in the background lands before counting.
    wait_idle(&addr);
    let fetched = metric(&addr, bytes) - bytes_before;
    assert!(
        fetched <= (reads as f64) * 2.0 * 65_600.0,
        "{reads} random 4 KiB reads of a 24 MiB file fetched {fetched} bytes: more than a chunk or two per read"
    );
}

local_and_s3!(small_file_fetched_whole_large_file_chunk_by_chunk);

/// A file too large for the page cache's share, read at random through a mount with a disk cache: the first random
/// reads fetch only what they read; once there is one per 8 MiB of the file (counted over every handle of it) it
/// is fetched whole into the disk cache, not into memory, and every later read is served locally.
fn medium_file_fetched_whole_into_the_disk_cache(env: &Env, store: &Store) {
    let plain = write_medium(env, store, 23);
    let size = plain.len();
    let addr = free_metrics_addr();
    let m = mount_with_disk_cache(env, store, &env.path().join("dcache"), &addr, &[]);
    let bytes = "s3cryptfs_store_read_bytes_total";

    // 48 MiB asks for 6 random reads: five, spread over two handles (each read far from the one before on its
    // handle, or from 0 for its first).
    let (first, second) =
        (std::fs::File::open(m.path("medium")).unwrap(), std::fs::File::open(m.path("medium")).unwrap());
    pread_pages(&first, &plain, MEDIUM_READS[..3].iter().copied());
    pread_pages(&second, &plain, MEDIUM_READS[3..5].iter().copied());
    wait_idle(&addr);
    let fetched = metric(&addr, bytes);
    assert!(fetched <= 5.0 * 2.0 * 65_600.0, "5 random reads of a 48 MiB file fetched {fetched} bytes");

    // The sixth: the file is fetched whole, into the disk cache.
    pread_pages(&second, &plain, MEDIUM_READS[5..].iter().copied());
    let fetched = wait_for(&addr, bytes, size as f64);
    assert!(fetched >= size as f64, "six random reads did not fetch the 48 MiB file whole: {fetched} bytes");
    let on_disk = wait_for(&addr, "s3cryptfs_disk_cache_written_bytes_total", size as f64);
    assert!(on_disk >= size as f64, "the file fetched whole is not in the disk cache: {on_disk} bytes written there");
    wait_idle(&addr);
    let in_memory = metric(&addr, "s3cryptfs_cache_bytes");
    assert!(in_memory <= (4 << 20) as f64, "the file fetched whole went to the page cache: {in_memory} bytes there");
    assert!(fetched < 1.1 * size as f64, "48 MiB fetched as {fetched} bytes");

    let what = "reads of a file fetched whole into the disk cache went to the store";
    every_page_served_locally(&addr, &first, &plain, what);
    assert!(metric(&addr, "s3cryptfs_disk_cache_hits_total") > 0.0);
}

local_and_s3!(medium_file_fetched_whole_into_the_disk_cache);

/// The daemon's scratch: the unnamed file it holds open in the staging directory under `staging`, read through its
/// descriptor in /proc (the tests run as root; the daemon is not dumpable, so no other user could), if it has one.
fn scratch_of(pid: u32, staging: &std::path::Path) -> Option<(String, Vec<u8>)> {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let fd = fd.ok()?.path();
        let Ok(target) = std::fs::read_link(&fd) else { continue };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with(&*staging.to_string_lossy()) && target.ends_with("(deleted)") {
            return Some((target, std::fs::read(&fd).ok()?));
        }
    }
    None
}

/// Regular files under `dir` and their sizes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let file = |p: std::path::PathBuf| {
        let m = std::fs::symlink_metadata(&p).ok().filter(|m| m.is_file())?;
        Some((p, m.len()))
    };
    walkdir(dir).into_iter().filter_map(file).collect()
}

/// Without `cache_dir`, a file too large for the page cache's share, read at random, is fetched whole into the
/// scratch and later reads are served locally, as with a disk cache. The scratch is one file with no name in the
/// staging directory, sealed (no page of the file in it), and nothing of it is left once the daemon is gone,
/// killed (SIGKILL) in the middle of such a fetch included; the next mount reads every byte right.
fn medium_file_fetched_whole_into_the_scratch(env: &Env, store: &Store) {
    let plain = write_medium(env, store, 37);
    // Written through a mount of its own: read where it was written, it could be served from its staged copy.
    let seq = pattern(12 << 20, 38);
    {
        let m = Mount::start(env, store, "cse-c");
        std::fs::write(m.path("seq"), &seq).unwrap();
    }
    let size = plain.len();
    let staging = env.path().join("staging");
    let addr = free_metrics_addr();
    // A limit of its own, so the test does not depend on the free space of the disk it runs on (a quarter of it).
    let opts = [&format!("metrics_addr={addr}"), "cache_size=32M", "scratch_size=256M"];
    let m = Mount::start_with(env, store, "cse-c", &opts);
    let bytes = "s3cryptfs_store_read_bytes_total";
    // A sequential reader leaves the scratch alone (in a cache directory every page fetched goes there too).
    assert_bytes(std::fs::read(m.path("seq")).unwrap(), &seq, "a file read in order");
    wait_idle(&addr);
    let written = metric(&addr, "s3cryptfs_disk_cache_written_bytes_total");
    assert_eq!(written, 0.0, "a sequential read wrote to the scratch");
    let (read_before, memory_before) = (metric(&addr, bytes), metric(&addr, "s3cryptfs_cache_bytes"));
    let f = std::fs::File::open(m.path("medium")).unwrap();
    pread_pages(&f, &plain, MEDIUM_READS.into_iter());
    let fetched = wait_for(&addr, bytes, read_before + size as f64) - read_before;
    assert!(fetched >= size as f64, "six random reads did not fetch the 48 MiB file whole: {fetched} bytes");
    let kept = wait_for(&addr, "s3cryptfs_disk_cache_written_bytes_total", size as f64);
    assert!(kept >= size as f64, "the file fetched whole is not in the scratch: {kept} bytes written there");
    wait_idle(&addr);
    let fetched = metric(&addr, bytes) - read_before;
    assert!(fetched < 1.1 * size as f64, "48 MiB fetched as {fetched} bytes");
    let in_memory = metric(&addr, "s3cryptfs_cache_bytes") - memory_before;
    assert!(in_memory <= (4 << 20) as f64, "the file fetched whole went to the page cache: {in_memory} bytes more");
    every_page_served_locally(&addr, &f, &plain, "reads of a file fetched whole into the scratch went to the store");

    let (target, sealed) = scratch_of(m.pid(), &staging).expect("the daemon holds no unnamed file in staging");
    assert!(sealed.len() >= size, "{target}: {} bytes for a 48 MiB file", sealed.len());
    // 32 bytes at every MiB of the file, looked for at every offset of the scratch (by their first 8 first).
    let marks: std::collections::HashMap<[u8; 8], usize> =
        (0..size).step_by(1 << 20).map(|at| (plain[at..at + 8].try_into().unwrap(), at)).collect();
    for (i, w) in sealed.windows(32).enumerate() {
        if let Some(&at) = marks.get(&w[..8]) {
            assert!(w != &plain[at..at + 32], "plaintext of offset {at} at {i} of {target}");
        }
    }
    let big: Vec<_> = files_under(&staging).into_iter().filter(|(_, len)| *len >= 1 << 20).collect();
    assert!(big.is_empty(), "the scratch has a name in the staging directory: {big:?}");
    drop(f);
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");

    // A kill in the middle of the next such fetch leaves nothing behind either. (The scratch has no name, so this
    // guards against a change that gives it one.)
    let start = || {
        let addr = free_metrics_addr();
        let opts = [&format!("metrics_addr={addr}"), "cache_size=32M", "scratch_size=256M"];
        (Mount::start_with(env, store, "cse-c", &opts), addr)
    };
    let (m, _, f, on_disk) = whole_fetch_under_way_retrying(&plain, "the kill", start, || {});
    m.kill();
    drop(f);
    eprintln!("killed with {on_disk} of {size} bytes in the scratch");
    let left: u64 = files_under(&staging).iter().map(|(_, len)| len).sum();
    assert!(left < 1 << 20, "{left} bytes left in the staging directory by a daemon killed mid-fetch");
    let m = Mount::start(env, store, "cse-c");
    let f = std::fs::File::open(m.path("medium")).unwrap();
    pread_pages(&f, &plain, scattered_pages(size).step_by(7));
    assert_bytes(std::fs::read(m.path("medium")).unwrap(), &plain, "the file after the kill");
}

local_and_s3!(medium_file_fetched_whole_into_the_scratch);

/// The scratch shares the journal's disk, and gives its room back when a file being written needs it: a file
/// fetched whole into the scratch holds ~9.6 MiB of a 64 MiB staging disk, and a 58 MiB file written backwards (so
/// it is staged whole, not streamed) then fits only if the scratch makes room. It does, and both files read back
/// right.
fn a_full_disk_takes_the_scratch_s_room_for_a_file_being_written(env: &Env, store: &Store) {
    let disk = SmallDisk::mount(env, 64);
    let small = pattern(9 << 20, 39);
    {
        let m = Mount::start(env, store, "cse-c");
        std::fs::write(m.path("small"), &small).unwrap();
    }
    let addr = free_metrics_addr();
    // 8 MiB of page cache (whole files up to 2 MiB go to memory), 40 MiB of scratch (up to 10 MiB go there).
    let opts = [&format!("metrics_addr={addr}"), "cache_size=8M", "scratch_size=40M"];
    let m = Mount::start_with(env, store, "cse-c", &opts);
    let f = std::fs::File::open(m.path("small")).unwrap();
    pread_pages(&f, &small, [5 << 20, 1 << 20, 7 << 20].into_iter());
    let held = wait_for(&addr, "s3cryptfs_disk_cache_bytes", small.len() as f64);
    assert!(held >= small.len() as f64, "the 9 MiB file did not go whole into the scratch: {held} bytes there");
    wait_idle(&addr);

    let big = pattern(58 << 20, 40);
    let g = std::fs::File::create(m.path("big")).unwrap();
    for at in (0..big.len()).step_by(1 << 20).rev() {
        let end = (at + (1 << 20)).min(big.len());
        g.write_all_at(&big[at..end], at as u64).unwrap_or_else(|e| panic!("writing at {at} of 58 MiB: {e}"));
    }
    g.sync_all().unwrap();
    drop(g);
    let evicted = metric(&addr, "s3cryptfs_disk_cache_evictions_total");
    assert!(evicted > 0.0, "the write fitted without the scratch's room: the test proves nothing");
    assert_bytes(std::fs::read(m.path("big")).unwrap(), &big, "the file written on the full disk");
    pread_pages(&f, &small, scattered_pages(small.len()).step_by(5));
    drop(f);
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
    drop(disk);
}

local_and_s3!(a_full_disk_takes_the_scratch_s_room_for_a_file_being_written);

/// A daemon killed (SIGKILL) while it fetches a file whole into the disk cache for a random reader: the next mount
/// over the same cache leaves nothing half written there, serves every byte right (an entry appears only once written
/// whole, and one that does not authenticate is fetched again), fetches what is missing whole on the same pattern,
/// and then serves every page without the store. How much was on the disk at the kill is printed: the kill comes as
/// soon as the fetch has put its first pages there, and the test fails if the fetch had ended by then.
fn a_kill_during_a_whole_fetch_loses_nothing(env: &Env, store: &Store) {
    let plain = write_medium(env, store, 25);
    let size = plain.len();
    let cache = env.path().join("dcache");

    let start = || {
        let addr = free_metrics_addr();
        (mount_with_disk_cache(env, store, &cache, &addr, &[]), addr)
    };
    let reset = || std::fs::remove_dir_all(&cache).unwrap();
    let (m, _, f, on_disk) = whole_fetch_under_way_retrying(&plain, "the kill", start, reset);
    m.kill();
    drop(f);
    eprintln!("killed with {on_disk} of {size} bytes written to the disk cache");

    let addr = free_metrics_addr();
    let m = mount_with_disk_cache(env, store, &cache, &addr, &[]);
    let tmp: Vec<_> = walkdir(&cache).into_iter().filter(|p| p.to_string_lossy().ends_with(".tmp")).collect();
    assert!(tmp.is_empty(), "half-written entries outlived a start: {tmp:?}");
    let f = std::fs::File::open(m.path("medium")).unwrap();
    pread_pages(&f, &plain, MEDIUM_READS.into_iter());
    let cached = disk_cache_settled(&addr, size);
    assert!(cached >= size as f64, "the whole fetch after the kill did not complete the disk cache: {cached} bytes");
    every_page_served_locally(&addr, &f, &plain, "reads after the whole fetch went to the store");
}

local_and_s3!(a_kill_during_a_whole_fetch_loses_nothing);

/// A file unlinked while it is fetched whole into the disk cache for a reader that keeps it open: the descriptor keeps
/// reading the version it opened, every byte right; the name is gone from the mount and its object from the store;
/// and a new file of that name is read as itself, never from the old version's cache entries. (An unlink of an open
/// file first stages it whole, so the fetch has mostly landed by the time the object goes: the test prints how much.
/// The next test makes the object change under the fetch; that a fetch stops at its first failed segment is
/// tests/frozen.rs's and the read unit tests' to show.)
fn an_unlink_during_a_whole_fetch_keeps_the_open_file_whole(env: &Env, store: &Store) {
    let plain = write_medium(env, store, 29);
    let addr = free_metrics_addr();
    let m = mount_with_disk_cache(env, store, &env.path().join("dcache"), &addr, &[]);
    let (f, on_disk) = whole_fetch_under_way(&m, &addr, &plain, "the unlink");
    std::fs::remove_file(m.path("medium")).unwrap();
    let written = metric(&addr, "s3cryptfs_disk_cache_written_bytes_total");
    eprintln!("unlinked with {on_disk} bytes written to the disk cache ({written} once the unlink returned)");
    assert!(!m.path("medium").exists(), "the name outlived its unlink");
    let stored: Vec<String> = store.raw_objects().into_iter().map(|(k, _)| k).collect();
    assert!(!stored.iter().any(|k| k.ends_with("medium")), "the object outlived the unlink: {stored:?}");

    pread_pages(&f, &plain, scattered_pages(plain.len()));
    drop(f);

    let newer = pattern(3 << 20, 30);
    std::fs::write(m.path("medium"), &newer).unwrap();
    let g = std::fs::File::open(m.path("medium")).unwrap();
    pread_pages(&g, &newer, offsets(3, 40, newer.len() as u64));
    assert_bytes(std::fs::read(m.path("medium")).unwrap(), &newer, "a new file of the unlinked name");
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
}

local_and_s3!(an_unlink_during_a_whole_fetch_keeps_the_open_file_whole);

/// Another mount replaces a file while this one fetches it whole into the disk cache for a reader that keeps it open:
/// that descriptor gets the bytes of the version it opened or ESTALE (docs/SEMANTICS.md), never a byte of the new
/// version nor a mix; and a new open reads the new version whole, never from the old version's cache entries. The new
/// version is small, so that the replacement (a server-side copy) lands while the fetch is still going.
fn a_file_replaced_during_a_whole_fetch_is_never_mixed(env: &Env, store: &Store) {
    let plain = write_medium(env, store, 33);
    let newer = pattern((3 << 20) + 12_345, 34);
    let other = Mount::start(env, store, "cse-c");
    std::fs::write(other.path("medium.new"), &newer).unwrap();
    let addr = free_metrics_addr();
    let m = mount_with_disk_cache(env, store, &env.path().join("dcache"), &addr, &[]);
    let (f, on_disk) = whole_fetch_under_way(&m, &addr, &plain, "the replacement");
    std::fs::rename(other.path("medium.new"), other.path("medium")).unwrap();
    let written = metric(&addr, "s3cryptfs_disk_cache_written_bytes_total");
    eprintln!("replaced with {on_disk} bytes written to the disk cache ({written} once the rename returned)");

    let (mut served, mut stale) = (0, 0);
    let mut buf = vec![0u8; 4096];
    // One page in 8, scattered (a read that fails asks the store each time: every page would take a minute).
    for at in scattered_pages(plain.len()).step_by(8) {
        match f.read_exact_at(&mut buf, at) {
            Ok(()) => {
                assert_bytes(&buf, &plain[at as usize..at as usize + 4096], "a page of the version opened");
                served += 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => stale += 1,
            Err(e) => panic!("a read at {at} of a file replaced under it: {e}"),
        }
    }
    eprintln!("{served} pages of the version opened served, {stale} ESTALE");
    drop(f);

    // Past the attribute timeout (1 s), a new open sees the new version.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let g = std::fs::File::open(m.path("medium")).unwrap();
    pread_pages(&g, &newer, offsets(5, 40, newer.len() as u64));
    assert_bytes(std::fs::read(m.path("medium")).unwrap(), &newer, "the new version after the replacement");
    drop(g);
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
    other.unmount();
}

local_and_s3!(a_file_replaced_during_a_whole_fetch_is_never_mixed);
