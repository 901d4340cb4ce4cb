//! The disk cache (`cache_dir`, issue 14) through a real mount, on the local store and on S3: a warm re-read after a
//! remount costs no GET (counted through the metrics endpoint), a changed object is not served from its old pages,
//! the limit holds after every file, damaged entries are fetched again (never EIO, never wrong bytes), no plaintext
//! rests in the cache, and a second mount of the store with the same cache_dir is refused.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;

const MARKER: &[u8] = b"DISK-CACHE-PLAINTEXT-MARKER";

fn gets(addr: &str) -> f64 {
    let text = scrape(addr);
    ["get", "get_range"]
        .iter()
        .map(|k| series_value(&text, &format!("s3cryptfs_store_requests_total{{kind=\"{k}\",outcome=\"ok\"}}")))
        .sum()
}

fn cached_mount(env: &Env, store: &Store, mode: &str, cache: &Path, extra: &[&str]) -> (Mount, String) {
    let addr = free_metrics_addr();
    let mut opts = vec![format!("cache_dir={}", cache.display()), format!("metrics_addr={addr}")];
    opts.extend(extra.iter().map(|s| s.to_string()));
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    (Mount::start_with(env, store, mode, &opts), addr)
}

/// A slot of a cache directory's `pages` file, and a label of its `labels` file (docs/FORMAT.md, "The disk cache").
const SLOT: u64 = 69_632;
const LABEL: usize = 48;
/// A full page's entry: 64 KiB and its magic, salt, nonce and tag.
const ENTRY: usize = 65_536 + 52;

/// The slots of the cache (every store's) that a label names an entry for, each as its `pages` file and slot; and the
/// bytes the cache's files take on disk as du counts them.
fn entries(cache: &Path) -> (Vec<(std::path::PathBuf, u64)>, u64) {
    let mut slots = Vec::new();
    for labels in walkdir(cache).into_iter().filter(|p| p.file_name().is_some_and(|n| n == "labels")) {
        let bytes = std::fs::read(&labels).unwrap();
        let pages = labels.with_file_name("pages");
        let named = bytes.chunks(LABEL).enumerate().filter(|(_, l)| l.iter().any(|&b| b != 0));
        slots.extend(named.map(|(i, _)| (pages.clone(), i as u64)));
    }
    let bytes = walkdir(cache)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum();
    (slots, bytes)
}

/// Writes `data` to `name` through a mount of its own, then reads it through a mount with the disk cache and waits
/// until the cache has written every page (they reach the disk in the background, after the read returns).
/// The write and the read are not on one mount: until the kernel's RELEASE of the writer reaches the daemon (it may
/// come after `close` returned, later still on a loaded machine), a read there is served from the staged copy and
/// never reaches the store or the disk cache.
fn write_into_cache(env: &Env, store: &Store, cache: &Path, name: &str, data: &[u8]) {
    {
        let m = Mount::start(env, store, "cse-c");
        std::fs::write(m.path(name), data).unwrap();
    }
    let (m, addr) = cached_mount(env, store, "cse-c", cache, &[]);
    assert_bytes(std::fs::read(m.path(name)).unwrap(), data, "the read that fills the disk cache");
    assert!(
        wait_until(std::time::Duration::from_secs(20), || metric(&addr, "s3cryptfs_disk_cache_written_bytes_total")
            >= data.len() as f64),
        "the pages of {name} were not all written to the disk cache"
    );
}

fn marked(len: usize, seed: u64) -> Vec<u8> {
    let mut data = pattern(len, seed);
    for at in (0..len.saturating_sub(MARKER.len())).step_by(4096) {
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    data
}

fn warm_reread_costs_no_get(store: &Store, mode: &str, extra: &[&str]) {
    let env = Env::new();
    let cache = env.path().join("cache");
    let plain = marked(20 << 20, 1);
    {
        let m = Mount::start_with(&env, store, mode, extra);
        std::fs::write(m.path("big"), &plain).unwrap();
    }
    {
        let (m, addr) = cached_mount(&env, store, mode, &cache, extra);
        assert_bytes(std::fs::read(m.path("big")).unwrap(), &plain, "cold read");
        assert!(gets(&addr) > 0.0, "a cold read made no GET");
        // The pages reach the disk in the background.
        assert!(
            wait_until(std::time::Duration::from_secs(20), || metric(&addr, "s3cryptfs_disk_cache_written_bytes_total")
                >= plain.len() as f64),
            "the pages were not all written to the disk cache"
        );
    }
    let (m, addr) = cached_mount(&env, store, mode, &cache, extra);
    std::fs::metadata(m.path("big")).unwrap();
    let before = gets(&addr);
    assert_bytes(std::fs::read(m.path("big")).unwrap(), &plain, "warm read after a remount");
    assert_eq!(gets(&addr) - before, 0.0, "a warm re-read after a remount made GET requests");
    // 20 MiB is 320 pages, every one from the disk (a page a read and the read-ahead both wanted may be read twice).
    assert_eq!(metric(&addr, "s3cryptfs_disk_cache_misses_total"), 0.0, "a page missed the disk cache");
    assert!(metric(&addr, "s3cryptfs_disk_cache_hits_total") >= 320.0, "fewer pages than the file's from the disk");
    let (slots, _) = entries(&cache);
    assert_eq!(slots.len(), 320);
    let files: Vec<_> = walkdir(&cache).into_iter().filter(|p| p.is_file()).collect();
    for f in &files {
        assert!(!contains(&std::fs::read(f).unwrap(), MARKER), "plaintext in the disk cache: {}", f.display());
    }
    let mode_of = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode_of(&cache), 0o700);
    assert!(files.iter().all(|f| mode_of(f) == 0o600), "a file of the cache readable by others: {files:?}");
}

#[test]
fn warm_reread_after_remount_makes_no_get_local_cse_c() {
    let env = Env::new();
    warm_reread_costs_no_get(&Store::local(env.path()), "cse-c", &[]);
}

#[test]
fn warm_reread_after_remount_makes_no_get_local_none() {
    let env = Env::new();
    warm_reread_costs_no_get(&Store::local(env.path()), "none", &[]);
}

#[test]
fn warm_reread_after_remount_makes_no_get_s3_cse_c() {
    warm_reread_costs_no_get(&Store::s3(), "cse-c", &[]);
}

#[test]
fn warm_reread_after_remount_makes_no_get_s3_none() {
    warm_reread_costs_no_get(&Store::s3(), "none", &[]);
}

/// cse-kms: the cache's root key is a KMS data key kept wrapped in cache.json; the next mount unwraps it and reads.
#[test]
fn warm_reread_after_remount_makes_no_get_s3_cse_kms() {
    let ep = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE");
    let opts = [format!("kms_key_id={}", kms_create_key()), format!("kms_endpoint={ep}"), format!("ca_file={ca}")];
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    warm_reread_costs_no_get(&Store::s3(), "cse-kms", &opts);
}

/// Another mount rewrites the file while the cache holds the old version's pages: the next read gets the new bytes.
fn changed_objects_are_not_served_stale(store: &Store) {
    let env = Env::new();
    let cache = env.path().join("cache");
    let old = pattern(3 << 20, 1);
    let new = pattern(3 << 20, 2);
    write_into_cache(&env, store, &cache, "f", &old);
    let (_, used) = entries(&cache);
    {
        let other = Mount::start(&env, store, "cse-c");
        std::fs::write(other.path("f"), &new).unwrap();
    }
    let (m, addr) = cached_mount(&env, store, "cse-c", &cache, &[]);
    assert_bytes(std::fs::read(m.path("f")).unwrap(), &new, "read after another mount rewrote the file");
    assert!(gets(&addr) > 0.0);
    // While mounted: the other mount rewrites it again, and after the attribute timeout this one reads the new bytes.
    let newer = pattern(3 << 20, 3);
    {
        let other = Mount::start(&env, store, "cse-c");
        std::fs::write(other.path("f"), &newer).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_bytes(std::fs::read(m.path("f")).unwrap(), &newer, "read of a file rewritten while mounted");
    assert!(used > 0);
}

#[test]
fn changed_objects_are_not_served_stale_local() {
    let env = Env::new();
    changed_objects_are_not_served_stale(&Store::local(env.path()));
}

#[test]
fn changed_objects_are_not_served_stale_s3() {
    changed_objects_are_not_served_stale(&Store::s3());
}

/// Files of three times the limit, each read once: the cache never takes more than its limit on disk.
fn limit_holds(store: &Store) {
    let env = Env::new();
    let cache = env.path().join("cache");
    let limit = 4u64 << 20;
    let file = pattern(1 << 20, 9);
    // Written through a mount of their own: read where they were written, they could be served from the staged
    // copies (see `write_into_cache`).
    {
        let m = Mount::start(&env, store, "cse-c");
        for i in 0..12 {
            std::fs::write(m.path(&format!("f{i}")), &file).unwrap();
        }
    }
    let (m, addr) = cached_mount(&env, store, "cse-c", &cache, &["cache_disk_size=4M"]);
    for i in 0..12 {
        let name = format!("f{i}");
        assert_bytes(std::fs::read(m.path(&name)).unwrap(), &file, &name);
        // Look at the disk while this file's pages are written in the background, and after. The header and the
        // labels add a block each.
        for _ in 0..10 {
            let (_, bytes) = entries(&cache);
            assert!(bytes <= limit + 2 * 4096, "{bytes} bytes on disk after {name} (limit {limit})");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let written = metric(&addr, "s3cryptfs_disk_cache_written_bytes_total");
    assert!(written >= 6.0 * (1 << 20) as f64, "only {written} bytes written to the disk cache for 12 MiB read");
    let (_, bytes) = entries(&cache);
    assert!(bytes > limit / 2, "the cache holds only {bytes} bytes after 12 MiB went through it");
    assert!(metric(&addr, "s3cryptfs_disk_cache_evictions_total") > 0.0);
    assert!(metric(&addr, "s3cryptfs_disk_cache_bytes") <= limit as f64);
}

#[test]
fn limit_holds_local() {
    let env = Env::new();
    limit_holds(&Store::local(env.path()));
}

#[test]
fn limit_holds_s3() {
    limit_holds(&Store::s3());
}

/// Entries edited, cut short or swapped while unmounted: the read returns the right bytes, fetched from the store.
fn damaged_entries_are_refetched(store: &Store) {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let cache = env.path().join("cache");
    let plain = pattern(4 << 20, 5);
    write_into_cache(&env, store, &cache, "f", &plain);
    let (slots, _) = entries(&cache);
    assert_eq!(slots.len(), 64);
    let pages = std::fs::OpenOptions::new().read(true).write(true).open(&slots[0].0).unwrap();
    let entry_at = |slot: u64| {
        let mut bytes = vec![0u8; ENTRY];
        pages.read_exact_at(&mut bytes, slot * SLOT).unwrap();
        bytes
    };
    for (i, &(_, slot)) in slots.iter().enumerate() {
        let mut bytes = entry_at(slot);
        match i % 4 {
            0 => bytes[200] ^= 0x40,
            1 => bytes[ENTRY / 2..].fill(0),
            2 => bytes = entry_at(slots[(i + 1) % slots.len()].1),
            _ => continue,
        }
        pages.write_all_at(&bytes, slot * SLOT).unwrap();
    }
    let (m, addr) = cached_mount(&env, store, "cse-c", &cache, &[]);
    assert_bytes(std::fs::read(m.path("f")).unwrap(), &plain, "read over damaged cache entries");
    assert_eq!(metric(&addr, "s3cryptfs_disk_cache_dropped_total"), 48.0);
    assert_eq!(metric(&addr, "s3cryptfs_disk_cache_hits_total"), 16.0);
    assert!(gets(&addr) > 0.0);
    assert!(m.log_text().contains("disk cache entry is damaged"), "{}", m.log_text());
}

#[test]
fn damaged_entries_are_refetched_local() {
    let env = Env::new();
    damaged_entries_are_refetched(&Store::local(env.path()));
}

#[test]
fn damaged_entries_are_refetched_s3() {
    damaged_entries_are_refetched(&Store::s3());
}

/// Daemons killed outright (SIGKILL) while they write pages to the disk cache: a read returns before its pages reach
/// the disk, so a kill right after reading a file the cache does not hold yet lands among those background writes
/// (each round reads a file of its own; how much was on the disk at each kill is printed). The next start removes
/// what was left half written, never serves a torn entry (it would fail authentication and be fetched again), and
/// every byte read is right; the cache then fills up and serves a re-read without the store.
fn a_kill_during_cache_writes_loses_nothing(store: &Store) {
    let env = Env::new();
    let cache = env.path().join("cache");
    let files: Vec<Vec<u8>> = (0..3).map(|i| marked(16 << 20, 9 + i)).collect();
    {
        let m = Mount::start_with(&env, store, "cse-c", &[]);
        for (i, plain) in files.iter().enumerate() {
            std::fs::write(m.path(&format!("f{i}")), plain).unwrap();
        }
    }
    for (i, plain) in files.iter().enumerate() {
        let (m, addr) = cached_mount(&env, store, "cse-c", &cache, &[]);
        assert_bytes(std::fs::read(m.path(&format!("f{i}"))).unwrap(), plain, &format!("f{i} before its kill"));
        let written = metric(&addr, "s3cryptfs_disk_cache_written_bytes_total");
        m.kill();
        eprintln!("kill {i}: {written} of {} bytes were on the disk", plain.len());
    }
    let (m, _) = cached_mount(&env, store, "cse-c", &cache, &[]);
    // Slots a kill left written but not labelled (or labelled no more) take no room after a start: the `pages` file
    // holds the labelled entries (a full page each, 17 blocks) and no more (but a few blocks of the filesystem's own
    // for a file of many extents).
    let (slots, _) = entries(&cache);
    let pages = walkdir(&cache).into_iter().filter(|p| p.file_name().is_some_and(|n| n == "pages"));
    let bytes: u64 = pages.map(|p| std::fs::metadata(p).unwrap().blocks() * 512).sum();
    let entries_room = slots.len() as u64 * SLOT + 4 * 4096;
    assert!(bytes <= entries_room, "{bytes} bytes of pages on disk for {} entries after a start", slots.len());
    for (i, plain) in files.iter().enumerate() {
        assert_bytes(std::fs::read(m.path(&format!("f{i}"))).unwrap(), plain, &format!("f{i} after the kills"));
    }
    assert!(
        wait_until(std::time::Duration::from_secs(20), || entries(&cache).0.len() == 768),
        "the cache did not fill up: {} entries",
        entries(&cache).0.len()
    );
    drop(m);
    let (m, addr) = cached_mount(&env, store, "cse-c", &cache, &[]);
    for i in 0..files.len() {
        std::fs::metadata(m.path(&format!("f{i}"))).unwrap();
    }
    let before = gets(&addr);
    for (i, plain) in files.iter().enumerate() {
        assert_bytes(std::fs::read(m.path(&format!("f{i}"))).unwrap(), plain, &format!("f{i} warm"));
    }
    assert_eq!(gets(&addr) - before, 0.0, "a warm re-read after the kills made GET requests");
}

#[test]
fn a_kill_during_cache_writes_loses_nothing_local() {
    let env = Env::new();
    a_kill_during_cache_writes_loses_nothing(&Store::local(env.path()));
}

#[test]
fn a_kill_during_cache_writes_loses_nothing_s3() {
    a_kill_during_cache_writes_loses_nothing(&Store::s3());
}

/// A file renamed, replaced and unlinked on this mount while it is read from the disk cache: a descriptor opened
/// before keeps reading the version it opened (POSIX; the unlink stages it first), a read by name sees one version
/// whole or nothing (ENOENT between the rename and the new file), never pages of two versions, and the next mount
/// reads the last version from the cache and the store.
fn renames_and_unlinks_racing_cached_reads(store: &Store) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let cache = env.path().join("cache");
    let versions: Vec<Vec<u8>> = (0..3).map(|i| pattern(6 << 20, 30 + i)).collect();
    write_into_cache(&env, store, &cache, "f", &versions[0]);
    let (m, addr) = cached_mount(&env, store, "cse-c", &cache, &[]);
    let held = std::fs::File::open(m.path("f")).unwrap();
    let mut head = vec![0u8; 4096];
    held.read_exact_at(&mut head, 0).unwrap();
    assert!(metric(&addr, "s3cryptfs_disk_cache_hits_total") > 0.0, "the first read did not come from the disk cache");
    let stop = AtomicBool::new(false);
    let whole_reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut whole = 0;
            while !stop.load(Ordering::Relaxed) {
                match std::fs::read(m.path("f")) {
                    Ok(got) => {
                        let v = versions.iter().position(|v| *v == got);
                        assert!(v.is_some(), "a read of f ({} bytes) is no version whole", got.len());
                        whole += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("a read of f: {e}"),
                }
            }
            whole
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        // New versions are written aside and renamed into place, so `f` is always one version whole (a reader may
        // see a file being written half written, on any filesystem).
        std::fs::rename(m.path("f"), m.path("g")).unwrap();
        std::fs::write(m.path("n"), &versions[1]).unwrap();
        std::fs::rename(m.path("n"), m.path("f")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::remove_file(m.path("g")).unwrap();
        std::fs::write(m.path("n"), &versions[2]).unwrap();
        std::fs::rename(m.path("n"), m.path("f")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(whole_reads > 0, "the reader never read f whole");
    let mut all = vec![0u8; versions[0].len()];
    held.read_exact_at(&mut all, 0).unwrap();
    assert_bytes(&all, &versions[0], "the descriptor opened before the rename and the unlink");
    assert_eq!(held.metadata().unwrap().nlink(), 0, "the held file is unlinked");
    drop(held);
    drop(m);
    let (m, _) = cached_mount(&env, store, "cse-c", &cache, &[]);
    assert_bytes(std::fs::read(m.path("f")).unwrap(), &versions[2], "f after a remount");
    assert!(!m.path("g").exists() && !m.path("n").exists(), "a renamed or unlinked name came back");
}

#[test]
fn renames_and_unlinks_racing_cached_reads_local() {
    let env = Env::new();
    renames_and_unlinks_racing_cached_reads(&Store::local(env.path()));
}

#[test]
fn renames_and_unlinks_racing_cached_reads_s3() {
    renames_and_unlinks_racing_cached_reads(&Store::s3());
}

#[test]
fn a_second_mount_with_the_same_cache_dir_is_refused_and_a_cache_dir_others_may_write_too() {
    let env = Env::new();
    let store = Store::local(env.path());
    let cache = env.path().join("cache");
    let (first, _) = cached_mount(&env, &store, "cse-c", &cache, &[]);
    let opt = format!("cache_dir={}", cache.display());
    let e = Mount::try_start(&env, &store, "cse-c", &[&opt]).err().expect("a second mount on the same cache_dir");
    assert!(e.contains("in use by another mount"), "{e}");
    std::fs::write(first.path("f"), b"still works").unwrap();
    drop(first);
    let open = env.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let opt = format!("cache_dir={}", open.display());
    let e = Mount::try_start(&env, &store, "cse-c", &[&opt]).err().expect("a world-writable cache_dir");
    assert!(e.contains("cache_dir") && e.contains("writable by group or others"), "{e}");
    // Inside the local store's directory its entries would show as files of the mount.
    let Store::Local { dir } = &store else { unreachable!() };
    let opt = format!("cache_dir={}", dir.join("cache").display());
    let e = Mount::try_start(&env, &store, "cse-c", &[&opt]).err().expect("a cache_dir inside the store");
    assert!(e.contains("inside the store's directory"), "{e}");
}
