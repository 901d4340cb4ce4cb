//! Benchmark workloads, run the same way through a mounted directory (`fs DIR`) and with a raw object_store client
//! against the same server (`raw ENDPOINT BUCKET`), so scripts/bench.sh can print ratios. The mounted directory may
//! be s3cryptfs or a peer (s3fs, rclone mount): nothing here knows which.
//!
//! Workloads: sequential write of one large file, sequential read of it, random 4 KiB reads over it (one reader or
//! several concurrent ones), a 1-byte change in its middle and an append to it; many small files (create, list with
//! metadata, read back, `ls -l`, `rm -r`). Output: one line per workload, `name seconds bytes`.
//!
//! The raw client does the nearest equivalent: a multipart upload, one GET, one ranged GET per random read, a paged
//! LIST for the listings, LIST + batch DeleteObjects (1,000 keys per request, object_store's `delete_stream`) for
//! `rm -r`. A change in place or an append has no single raw equivalent and is not measured there. `read` on the raw
//! client also prints `peak_rss 0 BYTES`, the process's own VmHWM, to set next to the mounts' daemons.
//!
//! `BENCH_SETTLE`, when set, is a shell command run with the number of files written as its argument after each
//! writing workload closes its files and before its clock stops: for a mount that uploads after close (rclone's VFS cache), it waits until the uploads are done, so every
//! system is timed to the same point — the data is in the store.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as OsPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

const BLOCK: usize = 1 << 20;
/// Size of one random read and of the append: a page, what a database or an index lookup reads.
const SMALL: usize = 4096;
/// Content of each file of the large directory (dirw, dirstat): small, so the listing and the metadata dominate.
const DIR_BODY: &[u8] = b"0123456789abcdef";
/// Writers filling the large directory at once: a 30,000-entry directory takes minutes with one.
const DIR_WRITERS: usize = 16;

/// Name of entry `i` of the large directory.
fn dir_entry(i: usize) -> String {
    format!("e{i:06}")
}

/// Offsets of the random reads of reader `r`: 4 KiB-aligned, uniform over the file, the same for every system.
/// `BENCH_SEED` (default 0) picks another sequence, for runs over a mount that earlier runs have warmed.
fn random_offsets(r: usize, count: usize, file_len: u64) -> Vec<u64> {
    let pages = file_len / SMALL as u64;
    let seed: u64 = std::env::var("BENCH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut x = (r as u64 + 1 + seed * 1_000).wrapping_mul(0x2545F4914F6CDD1D) | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % pages) * SMALL as u64
        })
        .collect()
}

/// Reads per reader: `total` split as evenly as possible over `readers`.
fn share(total: usize, readers: usize, r: usize) -> usize {
    total / readers + usize::from(r < total % readers)
}

/// Waits until the mount under test has stored the `files` files just written (see `BENCH_SETTLE` in the module
/// docs); the command gets the count as its argument.
fn settle(files: usize) {
    if let Ok(cmd) = std::env::var("BENCH_SETTLE") {
        if !cmd.is_empty() {
            let cmd = format!("{cmd} {files}");
            let ok = std::process::Command::new("sh").arg("-c").arg(&cmd).status().unwrap().success();
            assert!(ok, "BENCH_SETTLE command failed: {cmd}");
        }
    }
}

fn vm_hwm_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Runs a command (ls, rm) on the mount and returns its standard output; fails the benchmark if it fails.
fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// This process's seed for the data it writes: new content in every run and every process. A store that keeps
/// blocks by their content (Garage does) stores a block it already has for nearly nothing, which favoured whoever
/// writes the same bytes every run (the raw client, mode none, s3fs) over whoever writes new ciphertext every time
/// (cse-c, rclone crypt): on Garage it took a fifth less server CPU to write the same 256 MiB again.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
    })
}

/// `len` bytes of this process's data for stream `i`: block `i` of the large file, or small file `i - BLOCK` (the
/// large file has far fewer than BLOCK blocks, so no two streams share content).
///
/// Eight bytes per step of the generator. Until 2026-12-06 it made one byte per step: 3.5 ms per MiB, 0.9 s of a
/// 256 MiB seq_write's 2 s. A mount's writer makes each block and then waits in `write()` for it, one after the
/// other, while the raw client's uploads run beside its making of the next block, so the generator's time counted
/// in full against every mount and hardly against the raw client.
fn data(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64 ^ seed()).wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn data_block(i: usize) -> Vec<u8> {
    data(i, BLOCK)
}

fn report(name: &str, start: Instant, bytes: u64) {
    println!("{name} {:.3} {bytes}", start.elapsed().as_secs_f64());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench fs DIR WORKLOAD N [READS READERS]  |  bench raw ENDPOINT BUCKET WORKLOAD N [READS READERS]\n\
                 WORKLOAD N: write|read|poke|patchr|append MIB, smallw|smallr|lsl|rmr|dirw|dirstat|dirfind FILES, randr MIB READS READERS; \
                 raw also: dirlist FILES, clear 0 (delete every object of the bucket)";
    let (rest, fs) = match args.get(1).map(String::as_str) {
        Some("fs") if args.len() >= 5 => (&args[3..], true),
        Some("raw") if args.len() >= 6 => (&args[4..], false),
        _ => panic!("{usage}"),
    };
    let what = rest[0].as_str();
    let n: usize = rest[1].parse().expect(usage);
    let (reads, readers) = if what == "randr" {
        (rest.get(2).expect(usage).parse().expect(usage), rest.get(3).expect(usage).parse().expect(usage))
    } else {
        (0, 1)
    };
    if fs {
        fs_bench(&args[2], what, n, reads, readers)
    } else {
        raw_bench(&args[2], &args[3], what, n, reads, readers)
    }
}

fn rand_name(readers: usize) -> String {
    if readers == 1 { "rand_read".into() } else { format!("rand_read{readers}") }
}

fn fs_bench(dir: &str, what: &str, n: usize, reads: usize, readers: usize) {
    let dir = std::path::Path::new(dir);
    match what {
        "write" => {
            let t = Instant::now();
            let mut f = std::fs::File::create(dir.join("big")).unwrap();
            for i in 0..n {
                f.write_all(&data_block(i)).unwrap();
            }
            f.sync_all().unwrap();
            drop(f);
            settle(1);
            report("seq_write", t, (n * BLOCK) as u64);
        }
        "read" => {
            let t = Instant::now();
            let mut f = std::fs::File::open(dir.join("big")).unwrap();
            let mut buf = vec![0u8; BLOCK];
            let mut total = 0u64;
            loop {
                let k = f.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                total += k as u64;
            }
            assert_eq!(total, (n * BLOCK) as u64, "file size");
            report("seq_read", t, total);
        }
        "smallw" => {
            let d = dir.join("small");
            std::fs::create_dir_all(&d).unwrap();
            let bodies: Vec<Vec<u8>> = (0..n).map(|i| data(BLOCK + i, 4096)).collect();
            let t = Instant::now();
            for (i, body) in bodies.iter().enumerate() {
                std::fs::write(d.join(format!("f{i:05}")), body).unwrap();
            }
            settle(n);
            report("small_create", t, (n * 4096) as u64);
        }
        "smallr" => {
            let d = dir.join("small");
            let t = Instant::now();
            let mut count = 0;
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                assert_eq!(md.len(), 4096);
                count += 1;
            }
            assert_eq!(count, n);
            report("small_list", t, 0);
            let t = Instant::now();
            for i in 0..n {
                let b = std::fs::read(d.join(format!("f{i:05}"))).unwrap();
                assert_eq!(b.len(), 4096);
            }
            report("small_read", t, (n * 4096) as u64);
        }
        "smallo" => {
            // Every file of small_create rewritten whole with new bytes, as `cp` or `rsync --inplace` over an existing
            // tree does (open with O_TRUNC, write, close), on a cold mount.
            let d = dir.join("small");
            let bodies: Vec<Vec<u8>> = (0..n).map(|i| data(BLOCK + n + i, 4096)).collect();
            let t = Instant::now();
            for (i, body) in bodies.iter().enumerate() {
                std::fs::write(d.join(format!("f{i:05}")), body).unwrap();
            }
            settle(n);
            report("small_overwrite", t, (n * 4096) as u64);
            assert!(std::fs::read(d.join("f00000")).unwrap() == bodies[0], "the first file did not read back");
        }
        "randr" => {
            // Each reader opens the file itself (its own descriptor, like separate processes) and preads 4 KiB pages.
            let path = dir.join("big");
            let len = (n * BLOCK) as u64;
            let t = Instant::now();
            std::thread::scope(|s| {
                for r in 0..readers {
                    let path = &path;
                    s.spawn(move || {
                        let f = std::fs::File::open(path).unwrap();
                        let mut buf = vec![0u8; SMALL];
                        for off in random_offsets(r, share(reads, readers, r), len) {
                            f.read_exact_at(&mut buf, off).unwrap();
                        }
                    });
                }
            });
            report(&rand_name(readers), t, (reads * SMALL) as u64);
        }
        "poke" => {
            // One byte changed in the middle of the large file, timed from open to close (and settle).
            let len = (n * BLOCK) as u64;
            let t = Instant::now();
            let f = std::fs::OpenOptions::new().write(true).open(dir.join("big")).unwrap();
            f.write_all_at(&[0x5a], len / 2).unwrap();
            drop(f);
            settle(1);
            report("change_1b", t, 1);
            let mut b = [0u8; 1];
            std::fs::File::open(dir.join("big")).unwrap().read_exact_at(&mut b, len / 2).unwrap();
            assert_eq!(b[0], 0x5a, "the changed byte did not read back");
        }
        "patchr" => {
            // One byte changed at the start of the large file, then the file read through the same descriptor
            // (1 MiB reads) and closed: what rsync --inplace, a database or an image patcher does. Timed from open
            // to close (and settle).
            let t = Instant::now();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("big")).unwrap();
            let len = f.metadata().unwrap().len();
            assert!(len >= (n * BLOCK) as u64, "the large file is {len} bytes");
            f.write_all_at(&[0xa5], 1).unwrap();
            let (mut buf, mut at) = (vec![0u8; 1 << 20], 0u64);
            while at < len {
                let got = f.read_at(&mut buf, at).unwrap();
                assert!(got > 0, "the file ended at {at} of {len}");
                if at == 0 {
                    assert_eq!(buf[1], 0xa5, "the changed byte did not read back");
                }
                at += got as u64;
            }
            drop(f);
            settle(1);
            report("patch_read", t, len);
        }
        "append" => {
            let len = std::fs::metadata(dir.join("big")).unwrap().len();
            let t = Instant::now();
            let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("big")).unwrap();
            f.write_all(&[9u8; SMALL]).unwrap();
            drop(f);
            settle(1);
            report("append_4k", t, SMALL as u64);
            let now = std::fs::metadata(dir.join("big")).unwrap().len();
            assert_eq!(now, len + SMALL as u64, "file size after the append");
        }
        "dirw" => {
            // A large directory: N files of 16 bytes, written by DIR_WRITERS threads at once (setup for dirstat).
            let d = dir.join("dir");
            std::fs::create_dir_all(&d).unwrap();
            let t = Instant::now();
            std::thread::scope(|s| {
                for w in 0..DIR_WRITERS {
                    let d = &d;
                    s.spawn(move || {
                        for i in (w..n).step_by(DIR_WRITERS) {
                            std::fs::write(d.join(dir_entry(i)), DIR_BODY).unwrap();
                        }
                    });
                }
            });
            settle(n);
            report("dir_fill", t, (n * DIR_BODY.len()) as u64);
        }
        "dirstat" => {
            // What `os.stat` over `os.listdir` does: read the whole directory, then lstat every entry in that order.
            let d = dir.join("dir");
            let t = Instant::now();
            let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
            for name in &names {
                let md = std::fs::symlink_metadata(d.join(name)).unwrap();
                assert_eq!(md.len(), DIR_BODY.len() as u64);
            }
            assert_eq!(names.len(), n, "entries listed");
            report("stat_dir", t, 0);
        }
        "dirfind" => {
            // `find DIR -ls`: readdir and an lstat per entry, interleaved as find does them.
            let d = dir.join("dir");
            let t = Instant::now();
            let out = run("find", &[d.as_os_str(), "-ls".as_ref()]);
            report("find_ls", t, 0);
            assert_eq!(out.iter().filter(|&&c| c == b'\n').count(), n + 1, "find -ls lines");
        }
        "lsl" => {
            let d = dir.join("small");
            let t = Instant::now();
            let out = run("ls", &["-l".as_ref(), d.as_os_str()]);
            report("ls_l", t, 0);
            // `total N` and one line per file.
            assert_eq!(out.iter().filter(|&&c| c == b'\n').count(), n + 1, "ls -l lines");
        }
        "rmr" => {
            let d = dir.join("small");
            let t = Instant::now();
            run("rm", &["-r".as_ref(), d.as_os_str()]);
            report("rm_r", t, 0);
            assert!(!d.exists(), "the directory is still there after rm -r");
        }
        _ => panic!("unknown workload {what}"),
    }
}

fn raw_bench(endpoint: &str, bucket: &str, what: &str, n: usize, reads: usize, readers: usize) {
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
    let store = Arc::new(store);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let big = OsPath::from("raw/big");
        match what {
            "write" => {
                let t = Instant::now();
                let upload = store.put_multipart(&big).await.unwrap();
                let mut w = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
                for i in 0..n {
                    w.wait_for_capacity(4).await.unwrap();
                    w.write(&data_block(i));
                }
                w.finish().await.unwrap();
                report("seq_write", t, (n * BLOCK) as u64);
            }
            "read" => {
                let t = Instant::now();
                let mut stream = store.get(&big).await.unwrap().into_stream();
                let mut total = 0u64;
                while let Some(b) = stream.try_next().await.unwrap() {
                    total += b.len() as u64;
                }
                assert_eq!(total, (n * BLOCK) as u64);
                report("seq_read", t, total);
                println!("peak_rss 0 {}", vm_hwm_bytes());
            }
            "smallw" => {
                let bodies: Vec<Bytes> = (0..n).map(|i| Bytes::from(data(BLOCK + i, 4096))).collect();
                let t = Instant::now();
                for (i, body) in bodies.into_iter().enumerate() {
                    store.put(&OsPath::from(format!("raw/small/f{i:05}")), body.into()).await.unwrap();
                }
                report("small_create", t, (n * 4096) as u64);
            }
            "smallo" => {
                let bodies: Vec<Bytes> = (0..n).map(|i| Bytes::from(data(BLOCK + n + i, 4096))).collect();
                let t = Instant::now();
                for (i, body) in bodies.into_iter().enumerate() {
                    store.put(&OsPath::from(format!("raw/small/f{i:05}")), body.into()).await.unwrap();
                }
                report("small_overwrite", t, (n * 4096) as u64);
            }
            "smallr" => {
                let t = Instant::now();
                let listed: Vec<_> = store.list(Some(&OsPath::from("raw/small"))).try_collect().await.unwrap();
                assert_eq!(listed.len(), n);
                report("small_list", t, 0);
                let t = Instant::now();
                for i in 0..n {
                    let b = store.get(&OsPath::from(format!("raw/small/f{i:05}"))).await.unwrap().bytes().await.unwrap();
                    assert_eq!(b.len(), 4096);
                }
                report("small_read", t, (n * 4096) as u64);
            }
            "randr" => {
                // One ranged GET per read; `readers` tasks at once on one client (one connection pool).
                let len = (n * BLOCK) as u64;
                let t = Instant::now();
                let tasks: Vec<_> = (0..readers)
                    .map(|r| {
                        let store = Arc::clone(&store);
                        let big = big.clone();
                        tokio::spawn(async move {
                            for off in random_offsets(r, share(reads, readers, r), len) {
                                let b = store.get_range(&big, off..off + SMALL as u64).await.unwrap();
                                assert_eq!(b.len(), SMALL);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                report(&rand_name(readers), t, (reads * SMALL) as u64);
            }
            "dirw" => {
                // The directory of dirstat written directly: N objects of 16 bytes, DIR_WRITERS PUTs in flight.
                let t = Instant::now();
                futures::stream::iter(0..n)
                    .map(|i| {
                        let store = Arc::clone(&store);
                        async move {
                            let key = OsPath::from(format!("dir/{}", dir_entry(i)));
                            store.put(&key, Bytes::from_static(DIR_BODY).into()).await.unwrap();
                        }
                    })
                    .buffer_unordered(DIR_WRITERS)
                    .collect::<Vec<()>>()
                    .await;
                report("dir_fill", t, (n * DIR_BODY.len()) as u64);
            }
            "dirlist" => {
                // The reference of stat_dir: one paged LIST of the directory's prefix (what a mount cannot beat).
                let t = Instant::now();
                let listed: Vec<_> = store.list(Some(&OsPath::from("dir"))).try_collect().await.unwrap();
                report("stat_dir", t, 0);
                assert!(listed.len() >= n, "objects listed");
            }
            "lsl" => {
                let t = Instant::now();
                let listed: Vec<_> = store.list(Some(&OsPath::from("raw/small"))).try_collect().await.unwrap();
                report("ls_l", t, 0);
                assert_eq!(listed.len(), n);
            }
            "rmr" => {
                let t = Instant::now();
                let deleted = delete_prefix(&store, Some(OsPath::from("raw/small"))).await;
                report("rm_r", t, 0);
                assert_eq!(deleted, n);
            }
            "clear" => {
                delete_prefix(&store, None).await;
            }
            _ => panic!("unknown workload {what}"),
        }
    });
}

/// LIST of `prefix`, then batch DeleteObjects of what it found (object_store sends 1,000 keys per request).
async fn delete_prefix(store: &Arc<object_store::aws::AmazonS3>, prefix: Option<OsPath>) -> usize {
    let locations = store.list(prefix.as_ref()).map_ok(|m| m.location).boxed();
    let deleted: Vec<_> = store.delete_stream(locations).try_collect().await.unwrap();
    deleted.len()
}
