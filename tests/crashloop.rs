//! Crash loop: random file operations through a real mount, the daemon killed with SIGKILL at a random moment,
//! restarted at once (while the killed daemon is still an unreaped zombie), and the result checked against a model.
//!
//! Invariants checked after every restart:
//! - every file reads back as the model says: what every acknowledged write, truncate, rename, unlink, fsync and
//!   close left (acknowledged writes to files still open when the daemon died included: the journal has them);
//! - for the one operation the kill interrupted, each name it touches is as before it, as after it, or (a rename
//!   onto, or an unlink of, a file with unsaved writes) as the store last had it — never anything else;
//! - no unlinked or replaced file comes back, and no `.s3cryptfs-recovered-` or `-conflict-` copy appears (one writer);
//! - no byte of the plaintext marker every write carries is anywhere under the journal.
//!
//! `S3CRYPTFS_CRASH_ROUNDS` (default 20) rounds per store; `S3CRYPTFS_CRASH_SEED` replays a run (the seed is printed).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MARKER: &[u8] = b"PLAINTEXT-MARKER-crashloop:";
const NAMES: [&str; 6] = ["f0", "f1", "f2", "f3", "f4", "f5"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn content(&mut self) -> Vec<u8> {
        let len = [0, 5, 100, 4095, 4096, 4097, 9000, 70_000][self.below(8) as usize] + self.below(50) as usize;
        let mut v = MARKER.to_vec();
        v.extend_from_slice(format!("{:016x}:", self.next()).as_bytes());
        while v.len() < len {
            v.push(b'a' + (self.next() % 26) as u8);
        }
        v
    }
}

/// What the mount should show: names to file identities, each identity's content, and what the store last got for
/// each name (what a replaced or unlinked file with unsaved writes falls back to if the kill lands mid-operation).
#[derive(Clone, Default, Debug)]
struct Model {
    names: BTreeMap<String, u64>,
    content: BTreeMap<u64, Vec<u8>>,
    stored: BTreeMap<String, Vec<u8>>,
    next_id: u64,
}

impl Model {
    fn current(&self, name: &str) -> Option<&Vec<u8>> {
        self.names.get(name).and_then(|id| self.content.get(id))
    }
    fn name_of(&self, id: u64) -> Option<String> {
        self.names.iter().find(|(_, i)| **i == id).map(|(n, _)| n.clone())
    }
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

fn close_checked(f: fs::File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: we own fd (just taken from the File).
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One random operation; returns the names it touches. `model` is updated as if it succeeded; `partial` gets the
/// contents a name may also have if the operation is interrupted half way (it takes several system calls).
fn step(
    rng: &mut Rng,
    dir: &Path,
    model: &mut Model,
    handles: &mut Vec<(u64, fs::File)>,
    partial: &mut Vec<Vec<u8>>,
    desc: &mut String,
) -> (Vec<String>, std::io::Result<()>) {
    let name = NAMES[rng.below(NAMES.len() as u64) as usize].to_string();
    let p = dir.join(&name);
    let exists = model.names.contains_key(&name);
    match rng.below(10) {
        // Whole-file write, optionally fsynced, closed.
        0 | 1 => {
            let c = rng.content();
            let sync = rng.below(2) == 0;
            *desc = format!("write {name} ({} bytes, fsync {sync})", c.len());
            let id = match model.names.get(&name) {
                Some(id) => *id,
                None => {
                    let id = model.new_id();
                    model.names.insert(name.clone(), id);
                    id
                }
            };
            model.content.insert(id, c.clone());
            model.stored.insert(name.clone(), c.clone());
            // Killed between the truncating open and the write, the file is recovered empty.
            partial.push(Vec::new());
            let r = (|| {
                use std::io::Write;
                let mut f = fs::File::create(&p)?;
                f.write_all(&c)?;
                if sync {
                    f.sync_all()?;
                }
                close_checked(f)
            })();
            (vec![name], r)
        }
        // Open and keep open (created if missing).
        2 if handles.len() < 3 => {
            let id = match model.names.get(&name) {
                Some(id) => *id,
                None => {
                    let id = model.new_id();
                    model.names.insert(name.clone(), id);
                    model.content.insert(id, Vec::new());
                    id
                }
            };
            *desc = format!("open {name}");
            match fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p) {
                Ok(f) => {
                    handles.push((id, f));
                    (vec![name], Ok(()))
                }
                Err(e) => (vec![name], Err(e)),
            }
        }
        // Write through an open handle (unsaved until closed or fsynced).
        3 | 4 if !handles.is_empty() => {
            let h = rng.below(handles.len() as u64) as usize;
            let id = handles[h].0;
            let len = model.content.get(&id).map_or(0, |c| c.len()) as u64;
            let off = if rng.below(3) == 0 { len } else { rng.below(len + 1) };
            let data = rng.content();
            *desc = format!("pwrite handle {h} (id {id}) at {off}, {} bytes", data.len());
            let c = model.content.entry(id).or_default();
            let end = off as usize + data.len();
            if c.len() < end {
                c.resize(end, 0);
            }
            c[off as usize..end].copy_from_slice(&data);
            let touched = model.name_of(id).into_iter().collect();
            (touched, handles[h].1.write_all_at(&data, off))
        }
        // Truncate through a handle.
        5 if !handles.is_empty() => {
            let h = rng.below(handles.len() as u64) as usize;
            let id = handles[h].0;
            let n = rng.below(model.content.get(&id).map_or(0, |c| c.len()) as u64 + 5000);
            *desc = format!("truncate handle {h} (id {id}) to {n}");
            model.content.entry(id).or_default().resize(n as usize, 0);
            let touched = model.name_of(id).into_iter().collect();
            (touched, handles[h].1.set_len(n))
        }
        // fsync or close a handle: uploads it.
        6 if !handles.is_empty() => {
            let h = rng.below(handles.len() as u64) as usize;
            let id = handles[h].0;
            let touched: Vec<String> = model.name_of(id).into_iter().collect();
            if let Some(n) = touched.first() {
                let c = model.content.get(&id).cloned().unwrap_or_default();
                model.stored.insert(n.clone(), c);
            }
            *desc = format!("fsync/close handle {h} (id {id}, {touched:?})");
            let r = if rng.below(2) == 0 {
                handles[h].1.sync_all()
            } else {
                let (_, f) = handles.remove(h);
                close_checked(f)
            };
            (touched, r)
        }
        // Rename onto another name (which may be open with unsaved writes).
        7 if exists => {
            let to = NAMES[rng.below(NAMES.len() as u64) as usize].to_string();
            if to == name {
                return (vec![], Ok(()));
            }
            *desc = format!("rename {name} {to}");
            let id = model.names.remove(&name).unwrap_or_default();
            model.names.insert(to.clone(), id);
            // The source is uploaded before it moves.
            let c = model.content.get(&id).cloned().unwrap_or_default();
            model.stored.remove(&name);
            model.stored.insert(to.clone(), c);
            (vec![name, to.clone()], fs::rename(&p, dir.join(&to)))
        }
        // Unlink (which may be open with unsaved writes).
        8 if exists => {
            *desc = format!("unlink {name}");
            model.names.remove(&name);
            model.stored.remove(&name);
            (vec![name], fs::remove_file(&p))
        }
        // chmod by path: a file with unsaved writes is uploaded at once.
        9 if exists => {
            use std::os::unix::fs::PermissionsExt;
            let id = model.names[&name];
            model.stored.insert(name.clone(), model.content.get(&id).cloned().unwrap_or_default());
            let mode = [0o600, 0o640, 0o644][rng.below(3) as usize];
            *desc = format!("chmod {name} {mode:o}");
            (vec![name], fs::set_permissions(&p, fs::Permissions::from_mode(mode)))
        }
        _ => (vec![], Ok(())),
    }
}

/// Whether every byte of `got` is the byte of `a` or of `b` at that offset (zero past their end), and its length lies
/// between theirs: what a write or truncate that was cut short may leave.
fn mixed(got: &[u8], a: Option<&Vec<u8>>, b: Option<&Vec<u8>>) -> bool {
    let (a, b) = (a.map_or(&[][..], |v| &v[..]), b.map_or(&[][..], |v| &v[..]));
    let (lo, hi) = (a.len().min(b.len()), a.len().max(b.len()));
    got.len() >= lo
        && got.len() <= hi
        && got.iter().enumerate().all(|(i, g)| a.get(i).copied().unwrap_or(0) == *g || b.get(i).copied().unwrap_or(0) == *g)
}

/// What the mount shows now: every visible name and its content.
/// A name that reads EIO is returned in the second list (none may: the caller fails on any).
fn observe(dir: &Path) -> (BTreeMap<String, Vec<u8>>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut unreadable = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        match fs::read(e.path()) {
            Ok(c) => {
                out.insert(name, c);
            }
            Err(err) if err.raw_os_error() == Some(libc::EIO) => unreadable.push(name),
            Err(err) => panic!("reading {}: {err}", e.path().display()),
        }
    }
    (out, unreadable)
}

fn run(store: &Store, env: &Env, seed: u64, rounds: u64) {
    let mut rng = Rng(seed | 1);
    let dir = env.path().join("mnt-crash");
    let mut m = Mount::try_start_at(env, store, "cse-c", &[], dir.clone()).unwrap();
    let mut model = Model::default();
    for round in 0..rounds {
        let ctx = format!("seed {seed}, round {round}, store {}", store.url());
        let killed = Arc::new(AtomicBool::new(false));
        let pid = m.pid() as i32;
        let delay = Duration::from_millis(20 + rng.below(400));
        let killer = {
            let killed = killed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                killed.store(true, Ordering::SeqCst);
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            })
        };
        let mut handles: Vec<(u64, fs::File)> = Vec::new();
        let mut before;
        let touched: Vec<String>;
        let mut partial = Vec::new();
        let mut desc = String::new();
        let mut ops: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            before = model.clone();
            partial.clear();
            desc.clear();
            let (names, r) = step(&mut rng, &dir, &mut model, &mut handles, &mut partial, &mut desc);
            if !desc.is_empty() {
                ops.push(desc.clone());
            }
            match r {
                Ok(()) => {}
                Err(e) => {
                    assert!(killed.load(Ordering::SeqCst), "{ctx}: {e} before the daemon was killed, in {ops:?}\n{}", m.log_text());
                    touched = names;
                    break;
                }
            }
            assert!(Instant::now() < deadline, "{ctx}: the daemon was not killed");
        }
        killer.join().unwrap();
        let (mut zombie, _) = m.kill_unreaped();
        drop(handles);
        // No plaintext in the dead run's journal.
        for p in walkdir(&env.path().join("staging")) {
            let bytes = fs::read(&p).unwrap_or_default();
            assert!(!contains(&bytes, MARKER), "{ctx}: plaintext at rest in {}", p.display());
        }
        m = Mount::try_start_at(env, store, "cse-c", &[], dir.clone()).unwrap_or_else(|e| panic!("{ctx}: restart: {e}"));
        zombie.wait().unwrap();
        let (seen, unreadable) = observe(&dir);
        // Nothing may read EIO: an interrupted local rename is undone by the next open of the store (its intent).
        assert!(unreadable.is_empty(), "{ctx}: {unreadable:?} read EIO\n{}", m.log_text());
        for name in seen.keys() {
            assert!(
                !name.contains(".s3cryptfs-recovered-") && !name.contains(".s3cryptfs-conflict-"),
                "{ctx}: unexpected copy {name}\n{}",
                m.log_text()
            );
            assert!(NAMES.contains(&name.as_str()), "{ctx}: unknown name {name}");
        }
        let last = ops.last().cloned().unwrap_or_default();
        let in_place = ["pwrite", "truncate", "write "].iter().any(|p| last.starts_with(p));
        for name in NAMES {
            if unreadable.iter().any(|u| u == name) {
                continue;
            }
            let got = seen.get(name);
            let after = model.current(name);
            let ok = if touched.iter().any(|t| t == name) {
                got == after
                    || got == before.current(name)
                    || got == before.stored.get(name)
                    || got.is_some_and(|g| partial.contains(g))
                    // A write or truncate cut short lands in whole 4 KiB slots: each byte is old or new.
                    || (in_place && got.is_some_and(|g| mixed(g, before.current(name), after)))
            } else {
                got == after
            };
            assert!(
                ok,
                "{ctx}: {name} is {:?}, expected {:?} (interrupted op touched {touched:?}; before: {:?}, stored before: {:?}); ops {ops:?}\n{}",
                got.map(|g| String::from_utf8_lossy(&g[..g.len().min(60)]).to_string()),
                after.map(|g| String::from_utf8_lossy(&g[..g.len().min(60)]).to_string()),
                before.current(name).map(|g| String::from_utf8_lossy(&g[..g.len().min(60)]).to_string()),
                before.stored.get(name).map(|g| String::from_utf8_lossy(&g[..g.len().min(60)]).to_string()),
                m.log_text()
            );
        }
        // The next round starts from what is there.
        model = Model::default();
        for (name, c) in seen {
            let id = model.new_id();
            model.names.insert(name.clone(), id);
            model.content.insert(id, c.clone());
            model.stored.insert(name, c);
        }
    }
    let text = m.unmount();
    assert!(!text.contains("fails authentication"), "{text}");
}

fn params() -> (u64, u64) {
    let seed = std::env::var("S3CRYPTFS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let rounds = std::env::var("S3CRYPTFS_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    eprintln!("crash loop: S3CRYPTFS_CRASH_SEED={seed} S3CRYPTFS_CRASH_ROUNDS={rounds}");
    (seed, rounds)
}

#[test]
fn crash_loop_on_the_local_store() {
    let (seed, rounds) = params();
    let env = Env::new();
    run(&Store::local(env.path()), &env, seed, rounds);
}

#[test]
fn crash_loop_on_s3() {
    let (seed, rounds) = params();
    let env = Env::new();
    run(&Store::s3(), &env, seed.wrapping_add(1), rounds);
}
