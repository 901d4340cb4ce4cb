//! Delete intents appended to a log, not written one file each.
//!
//! Why: an unlink that is sent to the store later (`fs::deletes`) must first leave a sealed intent in the journal, so
//! that a daemon killed before the delete is sent does not bring the file back. One file per intent cost the daemon
//! two inode allocations and two frees per unlink (a temporary name, a rename, then the removal); on ext4 after many
//! deletes, finding a free inode (`find_inode_bit`, `recently_deleted`) was half of the daemon's CPU in an `rm -r` of
//! 2,000 files. Here an intent is one `pwrite` at the end of an open segment file, and its settling another of 12
//! bytes (or a truncation to zero once nothing in the segment is pending).
//!
//! A segment (`<s>.dlog`, docs/FORMAT.md "Delete intent log") is a sequence of entries `n (u64 LE) || len (u32 LE)
//! || bytes[len]`: `len > 0` is intent `n`, sealed exactly as an intent file would be (the AAD names `"<n>.del"`, so
//! an entry cannot be moved to another number, nor a record pass for an intent); `len == 0` marks intent `n` settled.
//! Entries are appended under one lock by one process, so only the last can be torn (a kill in the middle of its
//! `pwrite`): a reader stops there, and that intent's unlink had not returned. A failed append is cut off again
//! before the lock is released.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::{Dir, RunDir, TrustError, MAX_META_FILE};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A segment's file name ends so.
pub(super) const SEGMENT_SUFFIX: &str = ".dlog";
/// The live log starts a new segment past this size while intents in it are still pending (one that has none left
/// is cut back to zero instead), so a store that stays unreachable does not grow one file without end.
const ROTATE_AT: u64 = 1 << 20;
/// Largest segment a start reads: far above what [`ROTATE_AT`] lets one grow to, so a planted file cannot exhaust
/// memory.
const MAX_SEGMENT: u64 = 16 << 20;
/// `n` and `len`.
const ENTRY_HEAD: usize = 12;

pub(super) fn segment_name(s: u64) -> String {
    format!("{s}{SEGMENT_SUFFIX}")
}

/// Intent `n`'s entry (`sealed` not empty), or the mark that it is settled (`sealed` empty).
fn entry(n: u64, sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENTRY_HEAD + sealed.len());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    out.extend_from_slice(sealed);
    out
}

/// What a segment holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Parsed {
    /// The intents not marked settled, in the order written (the first of a number that appears twice).
    pub pending: Vec<(u64, Vec<u8>)>,
    /// The last entry is incomplete (or longer than any intent): everything from it on was ignored.
    pub torn: bool,
    /// Bytes up to the end of the last complete entry.
    pub valid: u64,
}

/// Reads a segment's entries. Pure: the sealed bytes are opened by the caller.
pub(super) fn parse(bytes: &[u8]) -> Parsed {
    let (mut intents, mut settled, mut seen) = (Vec::new(), HashSet::new(), HashSet::new());
    let mut rest = bytes;
    let mut torn = false;
    while !rest.is_empty() {
        if rest.len() < ENTRY_HEAD {
            torn = true;
            break;
        }
        let n = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(rest[8..ENTRY_HEAD].try_into().expect("4 bytes")) as usize;
        if len as u64 > MAX_META_FILE || rest.len() - ENTRY_HEAD < len {
            torn = true;
            break;
        }
        if len == 0 {
            settled.insert(n);
        } else if seen.insert(n) {
            intents.push((n, rest[ENTRY_HEAD..ENTRY_HEAD + len].to_vec()));
        }
        rest = &rest[ENTRY_HEAD + len..];
    }
    intents.retain(|(n, _)| !settled.contains(n));
    Parsed { pending: intents, torn, valid: (bytes.len() - rest.len()) as u64 }
}

/// One open segment: where the next entry goes, and how many of its intents are not settled yet.
#[derive(Debug)]
struct Segment {
    s: u64,
    file: File,
    len: u64,
    pending: usize,
}

impl Segment {
    /// Appends `bytes`; a failed write is cut off again, so the next entry does not follow a torn one.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Err(e) = self.file.write_all_at(bytes, self.len) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Intent `n` is settled: marked so, or, when it was the last one pending and `cut`, the whole segment cut to
    /// nothing (a live run's, which numbers its intents anew). Returns whether nothing in it is pending any more.
    fn settle(&mut self, n: u64, cut: bool) -> io::Result<bool> {
        self.pending = self.pending.saturating_sub(1);
        if self.pending == 0 && cut && self.file.set_len(0).is_ok() {
            self.len = 0;
            return Ok(true);
        }
        self.append(&entry(n, &[]))?;
        Ok(self.pending == 0)
    }
}

/// This run's log: the segment being appended to, older ones with intents still pending, and which holds which.
#[derive(Debug, Default)]
pub(super) struct Log {
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    active: Option<Segment>,
    older: HashMap<u64, Segment>,
    /// Intent number → the segment holding it.
    owner: HashMap<u64, u64>,
}

impl Log {
    /// Appends intent `n` (sealed), starting a segment numbered `next_segment()` when there is none or the current one
    /// is full.
    pub fn append(&self, dir: &Dir, n: u64, sealed: &[u8], next_segment: impl FnOnce() -> u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.active.as_ref().is_some_and(|a| a.len >= ROTATE_AT) {
            let full = st.active.take().expect("checked");
            st.older.insert(full.s, full);
        }
        if st.active.is_none() {
            let s = next_segment();
            let file = dir.create_file(&segment_name(s))?;
            st.active = Some(Segment { s, file, len: 0, pending: 0 });
        }
        let active = st.active.as_mut().expect("just set");
        active.append(&entry(n, sealed))?;
        active.pending += 1;
        let s = active.s;
        st.owner.insert(n, s);
        Ok(())
    }

    /// Intent `n` is settled. An older segment goes once nothing in it is pending.
    pub fn settle(&self, dir: &Dir, n: u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        let Some(s) = st.owner.remove(&n) else { return Ok(()) };
        if let Some(active) = st.active.as_mut().filter(|a| a.s == s) {
            return active.settle(n, true).map(drop);
        }
        let Some(seg) = st.older.get_mut(&s) else { return Ok(()) };
        let result = seg.settle(n, false);
        if seg.pending == 0 {
            st.older.remove(&s);
            return dir.remove(&segment_name(s));
        }
        result.map(drop)
    }

    /// At the end of the run: removes the current segment if nothing in it is pending. Segments with pending intents
    /// stay for the next start.
    pub fn close(&self, dir: &Dir) {
        let mut st = lock(&self.state);
        if st.active.as_ref().is_some_and(|a| a.pending == 0) {
            let seg = st.active.take().expect("checked");
            let _ = dir.remove(&segment_name(seg.s));
        }
    }
}

/// A dead run's segment being settled by the start that took it over.
pub(super) struct TakenSegment {
    run: Arc<RunDir>,
    seg: Mutex<Segment>,
    /// Entries that failed authentication: the segment then stays, as a refused intent file does.
    refused: bool,
}

impl TakenSegment {
    /// Opens (checked) and reads segment `name` of a dead run, for appending its settle marks: a torn last entry is
    /// cut off first, so that the marks follow the last complete one (a reader stops at a torn entry). Returns what
    /// it holds, the file, and its length.
    pub fn open(run: &RunDir, name: &str) -> Result<Option<(Parsed, File, u64)>, TrustError> {
        let path = run.dir.path().join(name);
        let Some(mut f) = run.dir.open_file(name, true)? else { return Ok(None) };
        let mut bytes = Vec::new();
        let read = (&mut f).take(MAX_SEGMENT + 1).read_to_end(&mut bytes);
        read.map_err(|e| TrustError::Io { path: path.clone(), source: e })?;
        if bytes.len() as u64 > MAX_SEGMENT {
            let e = io::Error::new(io::ErrorKind::InvalidData, format!("longer than {MAX_SEGMENT} bytes"));
            return Err(TrustError::Io { path, source: e });
        }
        let parsed = parse(&bytes);
        if parsed.torn {
            f.set_len(parsed.valid).map_err(|e| TrustError::Io { path, source: e })?;
        }
        let len = parsed.valid;
        Ok(Some((parsed, f, len)))
    }

    /// Tracks `pending` authentic intents of segment `s` (read from `file`, `len` bytes long).
    pub fn new(run: Arc<RunDir>, s: u64, file: File, len: u64, pending: usize, refused: bool) -> Arc<TakenSegment> {
        Arc::new(TakenSegment { run, seg: Mutex::new(Segment { s, file, len, pending }), refused })
    }

    /// Intent `n` of this segment is settled; the segment goes once none is pending (unless some were refused: it
    /// stays, with this one marked).
    pub fn settle(&self, n: u64) {
        let mut seg = lock(&self.seg);
        let name = segment_name(seg.s);
        if seg.pending <= 1 && !self.refused {
            seg.pending = 0;
            if let Err(e) = self.run.dir.remove(&name) {
                tracing::error!(log = %self.run.dir.path().join(&name).display(), error = %e, "could not remove a settled delete intent log");
            }
            return;
        }
        if let Err(e) = seg.settle(n, false) {
            tracing::error!(log = %self.run.dir.path().join(&name).display(), error = %e, "could not mark a delete intent settled; the next start checks it again");
        }
    }
}

/// The intents in a run directory's segments not marked settled, without opening them (for tests that look at the
/// journal from outside).
#[cfg(test)]
pub(crate) fn pending_on_disk(run: &std::path::Path) -> usize {
    std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(SEGMENT_SUFFIX))
        .map(|e| parse(&std::fs::read(e.path()).unwrap_or_default()).pending.len())
        .sum()
}
