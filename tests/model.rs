//! Random-operation model test: the same random sequence of file operations runs through a real s3cryptfs mount
//! and on a plain temporary directory; every result (data or errno) must agree. The seed is printed on failure and
//! `S3CRYPTFS_MODEL_SEED=N` replays it; `S3CRYPTFS_MODEL_OPS` sets the length (default 10,000).

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn errno<T>(r: std::io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Names used by the test: a small set so operations collide often (overwrite, rename onto, rmdir non-empty).
const NAMES: &[&str] = &["a", "b", "c", "d", "e"];

fn random_path(rng: &mut Rng) -> String {
    let depth = rng.below(3);
    let mut parts = Vec::new();
    for _ in 0..=depth {
        parts.push(NAMES[rng.below(NAMES.len() as u64) as usize]);
    }
    parts.join("/")
}

fn tree(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                out.push((rel, None));
                walk(root, &p, out);
            } else {
                out.push((rel, Some(fs::read(&p).unwrap())));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

fn step(rng: &mut Rng, real: &Path, model: &Path, log: &mut Vec<String>) -> Result<(), String> {
    let p = random_path(rng);
    let (r, m): (PathBuf, PathBuf) = (real.join(&p), model.join(&p));
    let op = rng.below(100);
    macro_rules! same {
        ($desc:expr, $f:expr) => {{
            let a = errno($f(&r));
            let b = errno($f(&m));
            log.push(format!("{} {p}", $desc));
            match (&a, &b) {
                (Ok(x), Ok(y)) if x == y => {}
                (Err(x), Err(y)) if x == y => {}
                _ => return Err(format!("{} {p}: mount gave {:?}, model gave {:?}", $desc, a, b)),
            }
        }};
    }
    match op {
        0..=24 => {
            let off = rng.below(200_000);
            let len = rng.below(70_000) as usize;
            let data = pattern(len, rng.next());
            same!(format!("write {off}+{len}"), |path: &Path| -> std::io::Result<()> {
                let mut f = fs::OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
                f.seek(SeekFrom::Start(off))?;
                f.write_all(&data)?;
                Ok(())
            });
        }
        25..=34 => {
            let data = pattern(rng.below(100_000) as usize, rng.next());
            same!("overwrite", |path: &Path| fs::write(path, &data));
        }
        35..=39 => {
            let data = pattern(rng.below(5000) as usize, rng.next());
            same!("append", |path: &Path| -> std::io::Result<()> {
                let mut f = fs::OpenOptions::new().append(true).open(path)?;
                f.write_all(&data)
            });
        }
        40..=54 => {
            let off = rng.below(250_000);
            let len = rng.below(140_000) as usize;
            same!(format!("read {off}+{len}"), |path: &Path| -> std::io::Result<Vec<u8>> {
                let mut f = fs::File::open(path)?;
                f.seek(SeekFrom::Start(off))?;
                let mut buf = vec![0u8; len];
                let mut got = 0;
                loop {
                    let n = f.read(&mut buf[got..])?;
                    if n == 0 || got + n == len {
                        got += n;
                        break;
                    }
                    got += n;
                }
                buf.truncate(got);
                Ok(buf)
            });
        }
        55..=61 => {
            let size = rng.below(200_000);
            same!(format!("truncate {size}"), |path: &Path| -> std::io::Result<()> {
                fs::OpenOptions::new().write(true).open(path)?.set_len(size)
            });
        }
        62..=69 => {
            let q = random_path(rng);
            let (rq, mq) = (real.join(&q), model.join(&q));
            let a = errno(fs::rename(&r, &rq));
            let b = errno(fs::rename(&m, &mq));
            log.push(format!("rename {p} {q}"));
            if a != b {
                return Err(format!("rename {p} -> {q}: mount gave {a:?}, model gave {b:?}"));
            }
        }
        70..=77 => same!("unlink", |path: &Path| fs::remove_file(path)),
        78..=87 => same!("mkdir", |path: &Path| fs::create_dir(path)),
        88..=93 => same!("rmdir", |path: &Path| fs::remove_dir(path)),
        94..=96 => same!("stat", |path: &Path| -> std::io::Result<(bool, u64)> {
            let md = fs::metadata(path)?;
            Ok((md.is_dir(), if md.is_dir() { 0 } else { md.len() }))
        }),
        _ => same!("readdir", |path: &Path| -> std::io::Result<Vec<String>> {
            let mut v: Vec<String> =
                fs::read_dir(path)?.map(|e| e.map(|e| e.file_name().to_string_lossy().to_string())).collect::<Result<_, _>>()?;
            v.sort();
            Ok(v)
        }),
    }
    Ok(())
}

type Tree = Vec<(String, Option<Vec<u8>>)>;

/// Which paths differ between the mount's tree and the model's (names and sizes, not contents).
fn tree_diff(mount: &Tree, model: &Tree) -> String {
    let show = |t: &Tree| -> std::collections::BTreeMap<String, String> {
        t.iter()
            .map(|(p, c)| (p.clone(), c.as_ref().map(|c| format!("{} bytes", c.len())).unwrap_or_else(|| "dir".into())))
            .collect()
    };
    let (a, b) = (show(mount), show(model));
    let mut out = Vec::new();
    for (p, v) in &a {
        match b.get(p) {
            None => out.push(format!("only in mount: {p} ({v})")),
            Some(w) if w != v => out.push(format!("{p}: mount {v}, model {w}")),
            Some(_) => {
                let (x, y) = (mount.iter().find(|e| &e.0 == p), model.iter().find(|e| &e.0 == p));
                if x != y {
                    out.push(format!("{p}: same size, different content"));
                }
            }
        }
    }
    for (p, w) in &b {
        if !a.contains_key(p) {
            out.push(format!("only in model: {p} ({w})"));
        }
    }
    out.join("; ")
}

#[test]
fn random_operations_match_a_plain_directory() {
    let seed: u64 = std::env::var("S3CRYPTFS_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let ops: usize = std::env::var("S3CRYPTFS_MODEL_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let env = Env::new();
    let store = Store::local(env.path());
    let model = env.path().join("model");
    fs::create_dir(&model).unwrap();
    let mut m = Mount::start(&env, &store, "cse-c");
    let mut rng = Rng(seed);
    let mut log = Vec::new();
    for i in 0..ops {
        if let Err(e) = step(&mut rng, &m.dir, &model, &mut log) {
            let tail = log.iter().rev().take(15).rev().cloned().collect::<Vec<_>>().join("\n  ");
            panic!("model test failed at op {i} (replay with S3CRYPTFS_MODEL_SEED={seed} S3CRYPTFS_MODEL_OPS={ops}): {e}\nlast ops:\n  {tail}");
        }
        // Now and then, compare the whole tree, and once in the middle remount to check persistence.
        if i % 500 == 499 {
            let (a, b) = (tree(&m.dir), tree(&model));
            assert!(a == b, "trees differ after op {i} (S3CRYPTFS_MODEL_SEED={seed}): {}", tree_diff(&a, &b));
        }
        if i == ops / 2 {
            drop(m);
            m = Mount::start(&env, &store, "cse-c");
        }
    }
    let (a, b) = (tree(&m.dir), tree(&model));
    assert!(a == b, "final trees differ (S3CRYPTFS_MODEL_SEED={seed}): {}", tree_diff(&a, &b));
    eprintln!("model test: {ops} operations, seed {seed}");
}
