//! Benchmark workloads, run the same way through a mounted directory (`fs DIR`) and with a raw object_store client
//! against the same server (`raw ENDPOINT BUCKET`), so scripts/bench.sh can print ratios.
//!
//! Workloads: sequential write of one large file, sequential read of it, and many small files (create, list with
//! metadata like `ls -l`, read back). Output: one line per workload, `name seconds bytes`.

use std::io::{Read, Write};
use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as OsPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

const BLOCK: usize = 1 << 20;

fn data_block(i: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn report(name: &str, start: Instant, bytes: u64) {
    println!("{name} {:.3} {bytes}", start.elapsed().as_secs_f64());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench fs DIR write|read|smallw|smallr MIB|FILES  |  bench raw ENDPOINT BUCKET write|read|smallw|smallr MIB|FILES";
    match args.get(1).map(String::as_str) {
        Some("fs") => fs_bench(&args[2], &args[3], args[4].parse().expect(usage)),
        Some("raw") => raw_bench(&args[2], &args[3], &args[4], args[5].parse().expect(usage)),
        _ => panic!("{usage}"),
    }
}

fn fs_bench(dir: &str, what: &str, n: usize) {
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
            let body = vec![7u8; 4096];
            let t = Instant::now();
            for i in 0..n {
                std::fs::write(d.join(format!("f{i:05}")), &body).unwrap();
            }
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
        _ => panic!("unknown workload {what}"),
    }
}

fn raw_bench(endpoint: &str, bucket: &str, what: &str, n: usize) {
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
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
            }
            "smallw" => {
                let body = Bytes::from(vec![7u8; 4096]);
                let t = Instant::now();
                for i in 0..n {
                    store.put(&OsPath::from(format!("raw/small/f{i:05}")), body.clone().into()).await.unwrap();
                }
                report("small_create", t, (n * 4096) as u64);
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
            _ => panic!("unknown workload {what}"),
        }
    });
}
