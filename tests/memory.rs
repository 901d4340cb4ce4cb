//! The memory budget (`-o max_memory=SIZE`, issue 13): a daemon that writes and reads back a file several times its
//! budget stays within the budget plus the fixed cost of the process (32 MiB: code, runtime, threads, TLS), measured
//! as its peak RSS (VmHWM) through a real mount.

mod common;

use std::io::{Read, Write};

use common::*;

/// VmHWM of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb << 10
}

fn streams_within_the_budget(store: &Store, env: &Env) {
    let budget: u64 = 96 << 20;
    let size = 320 << 20;
    let addr = free_metrics_addr();
    let m = Mount::start_with(env, store, "cse-c", &["max_memory=96M", &format!("metrics_addr={addr}")]);
    // Written in 1 MiB writes and read back in 1 MiB reads, twice: a file more than three times the budget.
    let block: Vec<u8> = pattern(1 << 20, 5);
    {
        let mut f = std::fs::File::create(m.path("big")).unwrap();
        for _ in 0..size >> 20 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    for pass in 0..2 {
        let mut f = std::fs::File::open(m.path("big")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, size, "pass {pass} read back the whole file");
    }
    let peak = peak_rss(m.pid());
    assert!(
        peak <= budget + (32 << 20),
        "peak RSS {} MiB with max_memory=96M (allowed: the budget + 32 MiB)",
        peak >> 20
    );
    // Every reservation ended with its buffer: none leaked (read-ahead still landing is waited for).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(&addr, "s3cryptfs_memory_reserved_bytes") > 0.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(metric(&addr, "s3cryptfs_memory_reserved_bytes"), 0.0, "memory still reserved with nothing in flight");
    // And the content is right: a page from the middle.
    let f = std::fs::File::open(m.path("big")).unwrap();
    let mut page = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut page, (size / 2 + 12_288) as u64).unwrap();
    assert_bytes(&page, &block[12_288..12_288 + 4096], "a page of the middle");
}

#[test]
fn local() {
    let env = Env::new();
    let store = Store::local(env.path());
    streams_within_the_budget(&store, &env);
}

#[test]
fn s3() {
    let env = Env::new();
    let store = Store::s3();
    streams_within_the_budget(&store, &env);
}
