//! Sparse staging: a large existing object opened for writing is staged only where it is written, and changed in
//! place on close (`crate::inplace`) instead of being downloaded and uploaded whole.
//!
//! Why: staging a file whole costs its whole size each way for every change (1 byte of 1 GiB moved 2 GiB). A
//! [`Sparse`] state records which 64 KiB chunks the staged file holds ("present"); the file's content is the staged
//! file's bytes in present chunks and the base object's bytes elsewhere. Invariants:
//!
//! - the staged file has the file's logical length; chunks that are not present are holes in it (zeros);
//! - bytes of a chunk that is not present come from the base version (the object with ETag `etag`, pinned: a reader
//!   refuses another version) below `valid_len`, and are zeros at and past it. `valid_len` is the base length cut by
//!   every truncation since, so a truncate down and up again reads zeros, as POSIX wants, without fetching anything;
//! - a write that covers part of a chunk that is not present first copies that chunk's base bytes into the staged file
//!   (read-modify-write; the base is authenticated by the read path), so a present chunk is always complete;
//! - every present chunk is sealed again by the update (present = dirty); the planner adds the chunks the length
//!   change forces, and those are filled from the base just before the update.
//!
//! Where the update cannot be done in place (a small change plan, a version-1 object, a store without part copies,
//! SSE-C), the rest of the base is filled in and the file is uploaded whole, as before: correctness never depends on
//! the fast path. If the base is replaced by another writer before the update lands, its other bytes are gone (S3
//! keeps no old versions here): the changed chunks stay in the journal, the caller gets EIO, nothing is overwritten
//! (docs/SEMANTICS.md, "Large files changed in place").
//!
//! The journal record of a sparse staged file says so ([`crate::journal::BaseVersion::Patch`]): base ETag, lengths
//! and the present chunks. The next start applies it only while the object is still that version.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use super::write::Staged;
use super::{is_lost_race, key, Error, Fs, Result, UPLOAD_META};
use crate::crypto::{ObjectCipher, CHUNK_PLAIN_LEN};
use crate::inplace::Layout;
use crate::journal::{BaseVersion, Patch, StagedFile};
use crate::object::{ObjectCodec, StoredFormat, BIND_META};
use crate::read::Reader;
use crate::store::{Expect, ObjectInfo, StoreError, UserMeta};

/// Bytes read from the base at a time when filling the staged file.
const FILL_READ: u64 = 8 << 20;

/// Whether `e`, from a read of the base or an update conditional on it, says the base is no longer the object.
fn base_moved(e: &Error) -> bool {
    match e {
        Error::Changed { .. } => true,
        Error::Store { source, .. } => source.is_precondition() || source.is_not_found(),
        _ => false,
    }
}

/// What a sparse staged file holds, against which base version.
pub struct Sparse {
    /// The base version: every fetch, copy and the update are conditional on it.
    pub etag: String,
    /// Its stored size.
    pub stored_size: u64,
    /// Its plaintext length.
    pub base_len: u64,
    /// Bytes of the base still part of the file (see the module docs).
    pub valid_len: u64,
    present: BTreeSet<u64>,
    /// Changed since the journal record last described it.
    pub record_stale: bool,
    /// Readers of the base, pinned to `etag` (made on first use; closed and dropped when the object moves or this
    /// state goes): for reads of the open file, with read-ahead, and for the fills a write needs, without
    /// ([`Use`]).
    readers: [Option<Arc<Reader>>; 2],
}

/// What a reader of the base is for ([`Fs::sparse_reader`]).
#[derive(Clone, Copy)]
enum Use {
    /// Reads of the open file, and filling the whole file in: the mount's read-ahead, and the whole-object fetch of
    /// a random reader.
    Read,
    /// The chunks a write covers in part: only what is asked. Through the reader of [`Use::Read`], each fill
    /// counted as a read: 1 MiB writes not aligned to chunks (a fill every 1 MiB) looked sequential and had the
    /// base read ahead, chunks the writes then replaced; 32 one-byte writes at random in a 256 MiB file had it
    /// fetched whole.
    Fill,
}

impl Drop for Sparse {
    fn drop(&mut self) {
        self.drop_readers();
    }
}

impl Sparse {
    pub fn new(etag: String, stored_size: u64, base_len: u64) -> Sparse {
        let (present, readers) = (BTreeSet::new(), [None, None]);
        Sparse { etag, stored_size, base_len, valid_len: base_len, present, record_stale: true, readers }
    }

    pub fn is_present(&self, chunk: u64) -> bool {
        self.present.contains(&chunk)
    }

    pub fn present_count(&self) -> u64 {
        self.present.len() as u64
    }

    pub fn mark_present(&mut self, chunks: Range<u64>) {
        for c in chunks {
            self.record_stale |= self.present.insert(c);
        }
    }

    /// The file was cut (or grown) to `size` bytes: chunks wholly past it go, the base counts up to it at most.
    pub fn truncate(&mut self, size: u64) {
        let keep = size.div_ceil(CHUNK_PLAIN_LEN);
        let before = (self.present.len(), self.valid_len);
        self.present.retain(|&c| c < keep);
        self.valid_len = self.valid_len.min(size);
        self.record_stale |= before != (self.present.len(), self.valid_len);
    }

    /// The plaintext bytes of chunk `chunk` that come from the base in a file of `size` bytes (empty if none).
    pub fn base_part(&self, chunk: u64, size: u64) -> Range<u64> {
        let start = chunk * CHUNK_PLAIN_LEN;
        let end = (start + CHUNK_PLAIN_LEN).min(self.valid_len).min(size);
        start..end.max(start)
    }

    /// Chunks a write of bytes `offset..end` (into a file of `size` bytes before it) must fill from the base first:
    /// touched, not present, holding base bytes the write does not overwrite.
    pub fn to_fill_for_write(&self, offset: u64, end: u64, size: u64) -> Vec<u64> {
        if offset >= end {
            return Vec::new();
        }
        (offset / CHUNK_PLAIN_LEN..=(end - 1) / CHUNK_PLAIN_LEN)
            .filter(|&c| !self.is_present(c))
            .filter(|&c| {
                let base = self.base_part(c, size);
                base.start < base.end && !(offset <= base.start && end >= base.end)
            })
            .collect()
    }

    /// Chunks among `chunks` that are not present and hold base bytes in a file of `size` bytes.
    pub fn missing(&self, chunks: Range<u64>, size: u64) -> Vec<u64> {
        chunks.filter(|&c| !self.is_present(c) && !self.base_part(c, size).is_empty()).collect()
    }

    /// The present chunks as sorted, disjoint ranges (what the update seals again).
    pub fn dirty(&self) -> Vec<Range<u64>> {
        runs(self.present.iter().copied())
    }

    /// The chunks of a file of `size` bytes that may differ from the base, as sorted, disjoint ranges (what the
    /// update seals again): the present ones, and those a truncation below the base's end turned into zeros (a cut
    /// followed by a growth: bytes `valid_len..` of the base are gone, so every chunk holding some is sealed again).
    pub fn changed(&self, size: u64) -> Vec<Range<u64>> {
        let cut_end = self.base_len.min(size);
        let cut = if self.valid_len < cut_end {
            self.valid_len / CHUNK_PLAIN_LEN..cut_end.div_ceil(CHUNK_PLAIN_LEN)
        } else {
            0..0
        };
        runs(self.present.iter().copied().filter(|c| !cut.contains(c)).chain(cut.clone()).collect::<BTreeSet<u64>>())
    }

    /// The object at the key is now `etag`, a version this content's own earlier update made (one whose answer was
    /// lost). That version is the base from now on: it is the old base with this state's present chunks at their
    /// contents of then and the truncations up to then applied; since then chunks were only added to `present` and
    /// `valid_len` only fell, so a chunk that is not present holds the same bytes below `valid_len` in both bases,
    /// and every chunk that may differ from the new base is still present or cut.
    pub fn rebase(&mut self, etag: String, stored_size: u64, base_len: u64) {
        self.etag = etag;
        self.stored_size = stored_size;
        self.base_len = base_len;
        self.valid_len = self.valid_len.min(base_len);
        self.drop_readers();
        self.record_stale = true;
    }

    /// Forgets the readers of the base (it moved, or this state goes), closed first: a whole-object fetch one of
    /// them started stops at its next segment, instead of running on while its segments hold the reader.
    pub fn drop_readers(&mut self) {
        for r in self.readers.iter_mut().filter_map(Option::take) {
            r.close();
        }
    }

    /// The journal's form of this state.
    pub fn to_patch(&self) -> Patch {
        Patch {
            etag: self.etag.clone(),
            stored_size: self.stored_size,
            base_len: self.base_len,
            valid_len: self.valid_len,
            chunks: self.dirty().into_iter().map(|r| (r.start, r.end)).collect(),
        }
    }

    /// The state a journal record describes.
    pub fn from_patch(p: &Patch) -> Sparse {
        let mut s = Sparse::new(p.etag.clone(), p.stored_size, p.base_len);
        s.valid_len = p.valid_len.min(p.base_len);
        for &(a, b) in &p.chunks {
            s.mark_present(a..b.max(a));
        }
        s
    }
}

/// Sorted indices as ranges of consecutive ones.
pub fn runs(indices: impl IntoIterator<Item = u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some(r) if r.end == i => r.end += 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Where each piece of a read of a sparse file comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The staged file.
    Staged(Range<u64>),
    /// The base object.
    Base(Range<u64>),
    /// Zeros (past `valid_len` in a chunk that is not present).
    Zeros(Range<u64>),
}

impl Sparse {
    /// The pieces of bytes `offset..end` of a file of `size` bytes, in order (`end` at most `size`).
    pub fn pieces(&self, offset: u64, end: u64, size: u64) -> Vec<Piece> {
        let end = end.min(size);
        let mut out: Vec<Piece> = Vec::new();
        let mut push = |p: Piece| {
            let merged = match (out.last_mut(), &p) {
                (Some(Piece::Staged(a)), Piece::Staged(b))
                | (Some(Piece::Base(a)), Piece::Base(b))
                | (Some(Piece::Zeros(a)), Piece::Zeros(b))
                    if a.end == b.start =>
                {
                    a.end = b.end;
                    true
                }
                _ => false,
            };
            if !merged {
                out.push(p);
            }
        };
        let mut at = offset;
        while at < end {
            let c = at / CHUNK_PLAIN_LEN;
            let chunk_end = ((c + 1) * CHUNK_PLAIN_LEN).min(end);
            if self.is_present(c) {
                push(Piece::Staged(at..chunk_end));
            } else {
                let base_end = self.valid_len.clamp(at, chunk_end);
                if at < base_end {
                    push(Piece::Base(at..base_end));
                }
                if base_end < chunk_end {
                    push(Piece::Zeros(base_end..chunk_end));
                }
            }
            at = chunk_end;
        }
        out
    }
}

/// Reads bytes `range` of the base through `reader` (whole: the read path may answer in pieces).
pub async fn read_base(reader: &Arc<Reader>, range: Range<u64>, path: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    while (out.len() as u64) < range.end - range.start {
        let at = range.start + out.len() as u64;
        let want = (range.end - at).min(FILL_READ) as usize;
        let data = reader.read(at, want).await?;
        if data.is_empty() {
            return Err(Error::Changed { key: path.to_string() });
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// Copies the base bytes of chunks `chunks` (sorted) into `file` (a file of `size` bytes) through `reader`, one GET
/// per run of consecutive chunks (cut at [`FILL_READ`]); marks them present.
pub async fn fill(
    sparse: &mut Sparse,
    reader: &Arc<Reader>,
    file: &StagedFile,
    size: u64,
    chunks: &[u64],
    path: &str,
) -> Result<()> {
    for run in runs(chunks.iter().copied()) {
        let first = sparse.base_part(run.start, size);
        let last = sparse.base_part(run.end - 1, size);
        let bytes = first.start..last.end.max(first.start);
        let mut at = bytes.start;
        while at < bytes.end {
            let to = (at + FILL_READ).min(bytes.end);
            let data = read_base(reader, at..to, path).await?;
            file.write_at(at, &data, size).map_err(|e| Error::staging(path, e))?;
            at = to;
        }
        sparse.mark_present(run);
    }
    Ok(())
}

/// Most runs of staged chunks a sparse file keeps: past this many separate changes the journal record grows large
/// and the version map (32 runs, `crypto::version::MAX_RUNS`) could not describe the update anyway, so the file is
/// filled in and staged whole.
pub const MAX_SPARSE_RUNS: usize = 64;

impl Fs {
    /// Whether the first write to the object at `path` (as a HEAD just found it) stages it sparsely: a large object
    /// of the own format in a mount that writes the own format. `None`: stage it whole, as before. The metadata does
    /// not tell format version 1 (never changed in place: its chunks cannot be told apart by version) from version 3
    /// without a map; a version-1 base is found when its header is read, and close rewrites it whole
    /// (`inplace::Fallback::FormatVersion1`).
    pub(super) fn sparse_base(&self, info: &ObjectInfo, format: StoredFormat) -> Option<Sparse> {
        if format != StoredFormat::Own || self.codec.s3ec_write_format().is_some() {
            return None;
        }
        if info.size < crate::inplace::MIN_IN_PLACE_LEN {
            return None;
        }
        let etag = info.etag.clone().filter(|e| !e.is_empty())?;
        let plain_len = self.codec.plain_size(info.size)?;
        Some(Sparse::new(etag, info.size, plain_len))
    }

    /// The reader of the base of a sparse state for `purpose`, pinned to its ETag. Reads of the open file get the
    /// mount's read-ahead: a file read through after a write into it (`rsync --inplace`, a database, a patched
    /// image) streams as a file open only for reading does. Without it every read of the base was a GET of its own:
    /// a 64 MiB cse-c file read in 1 MiB reads after a 1-byte write came at 31–39 MiB/s instead of 240–295
    /// (Garage). Pages it fetches ahead are base pages under the base's ETag, of use to any reader of that version.
    /// The fills a write needs get none ([`Use::Fill`]).
    fn sparse_reader(&self, path: &str, sparse: &mut Sparse, purpose: Use) -> Result<Arc<Reader>> {
        let (slot, readahead) = match purpose {
            Use::Read => (0, self.config.max_readahead),
            Use::Fill => (1, 0),
        };
        if let Some(r) = &sparse.readers[slot] {
            return Ok(r.clone());
        }
        let r = self.reader(path.to_string(), sparse.etag.clone(), sparse.stored_size, StoredFormat::Own, readahead)?;
        sparse.readers[slot] = Some(r.clone());
        Ok(r)
    }

    /// A read of an open sparse file: staged chunks from the journal, the rest from the base (or zeros).
    pub(super) async fn read_sparse(&self, path: &str, staged: &mut Staged, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self.read_sparse_once(path, staged, offset, len).await {
            Err(e) if base_moved(&e) && self.rebase_onto_own(path, staged).await => {
                self.read_sparse_once(path, staged, offset, len).await
            }
            other => other,
        }
    }

    async fn read_sparse_once(&self, path: &str, staged: &mut Staged, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = staged.size;
        let end = offset.saturating_add(len as u64).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let Some(sparse) = staged.sparse.as_mut() else {
            return staged.read_at(offset, len).map_err(|e| Error::staging(path, e));
        };
        let mut out = Vec::with_capacity((end - offset) as usize);
        for piece in sparse.pieces(offset, end, size) {
            match piece {
                Piece::Staged(r) => {
                    let mut buf = vec![0u8; (r.end - r.start) as usize];
                    staged.file.read_exact_at(&mut buf, r.start, size).map_err(|e| Error::staging(path, e))?;
                    out.extend_from_slice(&buf);
                }
                Piece::Base(r) => {
                    let reader = self.sparse_reader(path, sparse, Use::Read)?;
                    out.extend_from_slice(&read_base(&reader, r, path).await?);
                }
                Piece::Zeros(r) => out.resize(out.len() + (r.end - r.start) as usize, 0),
            }
        }
        Ok(out)
    }

    /// Before a write of bytes `offset..end`: the chunks it covers partly get their base bytes first.
    pub(super) async fn sparse_before_write(&self, path: &str, staged: &mut Staged, offset: u64, end: u64) -> Result<()> {
        match self.fill_for_write(path, staged, offset, end).await {
            Err(e) if base_moved(&e) && self.rebase_onto_own(path, staged).await => {
                self.fill_for_write(path, staged, offset, end).await
            }
            other => other,
        }
    }

    async fn fill_for_write(&self, path: &str, staged: &mut Staged, offset: u64, end: u64) -> Result<()> {
        let size = staged.size;
        let Some(sparse) = staged.sparse.as_mut() else { return Ok(()) };
        let chunks = sparse.to_fill_for_write(offset, end, size);
        if !chunks.is_empty() {
            let reader = self.sparse_reader(path, sparse, Use::Fill)?;
            fill(sparse, &reader, &staged.file, size, &chunks, path).await?;
        }
        Ok(())
    }

    /// After a write of bytes `offset..end`: its chunks are staged. Past [`MAX_SPARSE_RUNS`] separate changes the
    /// file is staged whole.
    pub(super) async fn sparse_after_write(&self, path: &str, staged: &mut Staged, offset: u64, end: u64) -> Result<()> {
        let Some(sparse) = staged.sparse.as_mut() else { return Ok(()) };
        if offset < end {
            sparse.mark_present(offset / CHUNK_PLAIN_LEN..(end - 1) / CHUNK_PLAIN_LEN + 1);
        }
        if sparse.dirty().len() > MAX_SPARSE_RUNS {
            tracing::debug!(key = path, "many separate changes: staging the file whole");
            self.unsparse(path, staged).await?;
        }
        Ok(())
    }

    /// Fills every chunk still in the base into the staged file, which then holds the whole content.
    pub(super) async fn unsparse(&self, path: &str, staged: &mut Staged) -> Result<()> {
        match self.fill_all(path, staged).await {
            Err(e) if base_moved(&e) && self.rebase_onto_own(path, staged).await => self.fill_all(path, staged).await,
            other => other,
        }
    }

    async fn fill_all(&self, path: &str, staged: &mut Staged) -> Result<()> {
        let size = staged.size;
        let Some(sparse) = staged.sparse.as_mut() else { return Ok(()) };
        let missing = sparse.missing(0..size.div_ceil(CHUNK_PLAIN_LEN), size);
        if !missing.is_empty() {
            let reader = self.sparse_reader(path, sparse, Use::Read)?;
            fill(sparse, &reader, &staged.file, size, &missing, path).await?;
        }
        staged.sparse = None;
        staged.record_stale = true;
        Ok(())
    }

    /// Uploads a sparse staged file in place (`crate::inplace::update`, conditional on the base). `Ok(None)`: it
    /// cannot be done in place (nothing was made visible): the caller fills the file in and uploads it whole.
    pub(super) async fn flush_sparse(&self, path: &str, staged: &mut Staged, meta: &UserMeta) -> Result<Option<ObjectInfo>> {
        let size = staged.size;
        let layout = if self.codec.is_encrypted() { Layout::Encrypted } else { Layout::Plain };
        let Some(sparse) = staged.sparse.as_mut() else { return Ok(None) };
        if !self.backend.copies_parts() {
            // S3 with SSE-C, GCS, Azure: known without starting an upload that could only be aborted.
            tracing::debug!(key = path, "not changed in place (the store cannot copy parts): uploading the file whole");
            return Ok(None);
        }
        let plan = match crate::inplace::plan(layout, sparse.base_len, size, &sparse.changed(size)) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(key = path, ?why, "not changed in place: uploading the file whole");
                return Ok(None);
            }
        };
        // The chunks the length change forces (the old or new last chunk) are sealed again too: fill them.
        let forced: Vec<u64> = plan.dirty.iter().flat_map(|r| sparse.missing(r.clone(), size)).collect();
        if !forced.is_empty() {
            let reader = self.sparse_reader(path, sparse, Use::Fill)?;
            fill(sparse, &reader, &staged.file, size, &forced, path).await?;
        }
        let cipher = match layout {
            Layout::Plain => None,
            Layout::Encrypted => Some(self.base_cipher(path, &sparse.etag, sparse.base_len).await?),
        };
        let base = crate::inplace::Base { etag: &sparse.etag, plain_len: sparse.base_len, cipher: cipher.as_ref() };
        let src = crate::upload::StagedSource { file: &staged.file, size };
        let _in_flight = crate::metrics::UploadInFlight::start();
        let done = crate::inplace::update(&*self.backend, layout, path, &base, &src, size, &plan.dirty, meta.clone())
            .await
            .map_err(|e| Error::store(path, e))?;
        match done {
            Ok(info) => {
                tracing::debug!(key = path, uploaded = plan.upload_bytes, "changed in place");
                Ok(Some(info))
            }
            Err(why) => {
                tracing::debug!(key = path, ?why, "not changed in place: uploading the file whole");
                Ok(None)
            }
        }
    }

    /// The cipher of the base version of `path` (its header, checked to be version `etag`), with its version map.
    async fn base_cipher(&self, path: &str, etag: &str, plain_len: u64) -> Result<ObjectCipher> {
        let k = key(path)?;
        let (header, info, meta) =
            self.backend.get_range(&k, 0..crate::crypto::HEADER_LEN).await.map_err(|e| Error::store(path, e))?;
        if info.etag.as_deref() != Some(etag) {
            return Err(Error::store(path, StoreError::Precondition { key: path.to_string() }));
        }
        let mut oc = self.codec.open(&header).await.map_err(|e| Error::codec(path, e))?;
        oc.verify_binding(path, meta.extra.get(BIND_META).map(String::as_str))
            .map_err(|e| Error::codec(path, e.into()))?;
        oc.attach_map(&meta, plain_len).map_err(|e| Error::codec(path, e.into()))?;
        match oc {
            ObjectCodec::Cse(c) => Ok(c),
            ObjectCodec::Plain => unreachable!("invariant broken: the encrypted layout with a plaintext codec"),
        }
    }

    /// An in-place update failed with `e`: what is at `path` now decides. Our own update (it carries this upload's
    /// stamp: the answer was lost) is success (`Some`). An earlier update of this content whose answer was lost (it
    /// carries a stamp of `prior_ids`: the file changed again after a failed flush) becomes the base, if `may_rebase`,
    /// and `None` asks the caller to try again against it. The base still there is a passing failure (the file stays
    /// staged and dirty for the next flush); anything else is another writer's version, and the changes cannot be
    /// merged.
    pub(super) async fn sparse_failed(
        &self,
        ino: u64,
        staged: &mut Staged,
        path: &str,
        e: Error,
        may_rebase: bool,
    ) -> Result<Option<ObjectInfo>> {
        let base = staged.sparse.as_ref().map(|s| s.etag.clone());
        match self.backend.head(&key(path)?).await {
            Ok((info, meta)) if meta.extra.get(UPLOAD_META).is_some_and(|s| *s == staged.upload_id) => Ok(Some(info)),
            Ok((info, _)) if info.etag.is_some() && info.etag == base => Err(e),
            Ok((info, meta)) if meta.extra.get(UPLOAD_META).is_some_and(|s| staged.is_own_stamp(s)) => {
                if !may_rebase {
                    return Err(e);
                }
                if self.rebase_onto(path, staged, &info) {
                    return Ok(None);
                }
                // Carries our stamp but cannot be a base (no ETag, not a length our format makes): not a version we
                // can apply the changes to, and it would fail every flush the same way.
                Err(self.patch_conflict(ino, staged, path))
            }
            Err(h) if !h.is_not_found() => Err(e),
            _ => Err(self.patch_conflict(ino, staged, path)),
        }
    }

    /// A read of the base found it gone: if the object at `path` is now a version this content's own earlier update
    /// made (see [`Sparse::rebase`]), that version becomes the base, and the caller tries once more. Any other
    /// version, or a store that does not answer, leaves the state as it was (false).
    async fn rebase_onto_own(&self, path: &str, staged: &mut Staged) -> bool {
        let Ok(k) = key(path) else { return false };
        match self.backend.head(&k).await {
            Ok((info, meta)) if meta.extra.get(UPLOAD_META).is_some_and(|s| staged.is_own_stamp(s)) => {
                self.rebase_onto(path, staged, &info)
            }
            _ => false,
        }
    }

    /// Makes `info`, a version of this content's own history, the base of the sparse state (false if it cannot).
    fn rebase_onto(&self, path: &str, staged: &mut Staged, info: &ObjectInfo) -> bool {
        let Some(sparse) = staged.sparse.as_mut() else { return false };
        let Some(etag) = info.etag.clone().filter(|e| !e.is_empty() && *e != sparse.etag) else { return false };
        let Some(plain_len) = self.codec.plain_size(info.size) else { return false };
        tracing::info!(
            key = path,
            "an earlier in-place update of this file whose answer was lost had reached the store; \
             the changes since apply to it"
        );
        sparse.rebase(etag.clone(), info.size, plain_len);
        staged.base = BaseVersion::Etag(etag);
        staged.record_stale = true;
        true
    }

    /// Another writer replaced the base of a sparse staged file: its changes stay in the journal (dirty and
    /// recorded, so a person can find them and no start uploads them over the new version), the file's next write
    /// starts from the version in the store now, and the caller gets EIO.
    fn patch_conflict(&self, ino: u64, staged: &mut Staged, path: &str) -> Error {
        let kept = staged.location().display().to_string();
        tracing::error!(key = %path, kept = %kept, "the object was replaced by another writer while this mount was changing it in place; the changed chunks cannot be merged into the new version and stay in the write journal");
        match Staged::create(&self.journal, false, false, BaseVersion::Absent) {
            Ok(fresh) => drop(std::mem::replace(staged, fresh)),
            Err(e) => return Error::staging(path, e),
        }
        let mut table = super::lock(&self.table);
        if let Some(n) = table.get_mut(ino) {
            n.validated = None;
        }
        Error::PatchConflict { key: path.to_string(), kept }
    }

    /// Recovery of a sparse staged file a dead run left (`patch`): applied in place, or filled in and uploaded whole,
    /// only while the object is still the base version; otherwise kept, with an error naming it (the caller logs it
    /// and leaves the data for a person or the next start). Never writes into the dead run's file (its slot nonces
    /// are a counter this process does not have): the staged chunks are copied into a file of this run first.
    pub(super) async fn recover_patch(&self, left: &crate::journal::Leftover, patch: &Patch, meta: UserMeta) -> Result<String> {
        let record = &left.record;
        let path = record.path.clone();
        let k = key(&path)?;
        self.check_path_len(&path, false)?;
        if self.already_uploaded(&path, &record.upload_id).await {
            return Ok(path);
        }
        let kept = || Error::PatchConflict { key: path.clone(), kept: left.location().display().to_string() };
        let mut sparse = Sparse::from_patch(patch);
        match self.backend.head(&k).await {
            Ok((info, _)) if info.etag.as_deref() == Some(patch.etag.as_str()) && info.size == patch.stored_size => {}
            // An earlier update of this content whose answer was lost (the file changed again after it): the
            // changes apply to it, as they would have in the dead run (see `Sparse::rebase`).
            Ok((info, meta))
                if meta.extra.get(UPLOAD_META).is_some_and(|s| record.prior_ids.iter().any(|p| p == s))
                    && info.etag.as_deref().is_some_and(|e| !e.is_empty())
                    && self.codec.plain_size(info.size).is_some() =>
            {
                let plain_len = self.codec.plain_size(info.size).unwrap_or_default();
                sparse.rebase(info.etag.clone().unwrap_or_default(), info.size, plain_len);
            }
            Ok(_) => return Err(kept()),
            Err(e) if e.is_not_found() => return Err(kept()),
            Err(e) => return Err(Error::store(&path, e)),
        }
        let base_etag = sparse.etag.clone();
        let size = left.file.plain_len().map_err(|e| Error::staging(&path, e))?;
        let mut staged = Staged::create(&self.journal, true, false, BaseVersion::Etag(base_etag.clone()))
            .map_err(|e| Error::staging(&path, e))?;
        staged.file.set_len(size, 0).map_err(|e| Error::staging(&path, e))?;
        staged.set_loaded_size(size);
        for r in sparse.dirty() {
            let mut at = r.start * CHUNK_PLAIN_LEN;
            let end = (r.end * CHUNK_PLAIN_LEN).min(size);
            while at < end {
                let to = (at + FILL_READ).min(end);
                let mut buf = vec![0u8; (to - at) as usize];
                left.file.read_exact_at(&mut buf, at, size).map_err(|e| Error::staging(&path, e))?;
                staged.file.write_at(at, &buf, size).map_err(|e| Error::staging(&path, e))?;
                at = to;
            }
        }
        staged.sparse = Some(sparse);
        match self.flush_sparse(&path, &mut staged, &meta).await {
            Ok(Some(_)) => return Ok(path),
            Ok(None) => {}
            Err(e) => {
                return match self.backend.head(&k).await {
                    Ok((_, m)) if m.extra.get(UPLOAD_META) == Some(&record.upload_id) => Ok(path),
                    Ok((info, _)) if info.etag.as_deref() == Some(base_etag.as_str()) => Err(e),
                    Err(h) if !h.is_not_found() => Err(e),
                    _ => Err(kept()),
                };
            }
        }
        self.unsparse(&path, &mut staged).await.map_err(|e| match e {
            Error::Changed { .. } => kept(),
            e => e,
        })?;
        let src = crate::upload::StagedSource { file: &staged.file, size };
        let expect = Expect::Etag(base_etag);
        match crate::upload::upload(&*self.backend, &self.codec, &path, &src, size, meta, &expect, Some(&self.s3ec)).await {
            Ok(_) => Ok(path),
            Err(e) if is_lost_race(&e, &expect) => Err(kept()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // a list of one range is what these calls mean
mod tests {
    use super::*;
    const C: u64 = CHUNK_PLAIN_LEN;

    #[test]
    fn reads_take_present_chunks_from_the_staging_file_and_the_rest_from_the_base_or_zeros() {
        let mut s = Sparse::new("e".into(), 0, 10 * C);
        s.mark_present(2..3);
        assert_eq!(s.pieces(C + 5, 3 * C + 1, 10 * C), vec![Piece::Base(C + 5..2 * C), Piece::Staged(2 * C..3 * C), Piece::Base(3 * C..3 * C + 1)]);
        // Cut to 4.5 chunks, grown to 8: the base counts up to the cut, zeros after.
        s.truncate(4 * C + C / 2);
        assert_eq!(s.pieces(4 * C, 8 * C, 8 * C), vec![Piece::Base(4 * C..4 * C + C / 2), Piece::Zeros(4 * C + C / 2..8 * C)]);
        // Cut to 4.5 chunks and grown to 8: chunk 4 (base, then zeros) and the base's chunks past it differ.
        assert_eq!(s.changed(8 * C), vec![2..3, 4..8]);
        assert_eq!(s.changed(4 * C + C / 2), vec![2..3], "a cut alone: the planner handles the new last chunk");
        s.truncate(C);
        assert_eq!(s.dirty(), Vec::<Range<u64>>::new(), "chunks past a cut go");
        assert_eq!(s.valid_len, C);
    }

    #[test]
    fn a_write_fills_only_chunks_it_covers_partly() {
        let mut s = Sparse::new("e".into(), 0, 10 * C);
        assert_eq!(s.to_fill_for_write(C + 1, C + 2, 10 * C), vec![1]);
        assert_eq!(s.to_fill_for_write(C, 3 * C, 10 * C), Vec::<u64>::new(), "whole chunks need no base bytes");
        assert_eq!(s.to_fill_for_write(C - 1, 3 * C + 1, 10 * C), vec![0, 3]);
        s.mark_present(0..1);
        assert_eq!(s.to_fill_for_write(C - 1, 3 * C + 1, 10 * C), vec![3]);
        // Past the base (an append): the old last chunk is filled when the write lands in it, nothing past it.
        let s = Sparse::new("e".into(), 0, 10 * C + 7);
        assert_eq!(s.to_fill_for_write(10 * C + 7, 10 * C + 9, 10 * C + 7), vec![10]);
        assert_eq!(s.to_fill_for_write(11 * C, 11 * C + 9, 10 * C + 7), Vec::<u64>::new());
        assert_eq!(s.to_fill_for_write(10 * C + 3, 10 * C + 9, 10 * C + 7), vec![10]);
        assert_eq!(s.to_fill_for_write(12 * C, 12 * C + 9, 10 * C + 7), Vec::<u64>::new());
    }

    #[test]
    fn the_journal_form_round_trips() {
        let mut s = Sparse::new("\"abc\"".into(), 123, 10 * C);
        s.mark_present(1..3);
        s.mark_present(7..8);
        s.truncate(9 * C + 5);
        let back = Sparse::from_patch(&s.to_patch());
        assert_eq!(back.dirty(), vec![1..3, 7..8]);
        assert_eq!((back.valid_len, back.base_len, back.stored_size, back.etag.as_str()), (9 * C + 5, 10 * C, 123, "\"abc\""));
    }
}
