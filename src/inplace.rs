//! Planning an in-place update of a large object: which byte ranges of the new version are copied inside the store
//! from the old one, and which are uploaded.
//!
//! Why a plan of its own: S3 cannot change an object, but a multipart upload may take some parts from the object
//! it replaces (`store::Upload::copy_part`, UploadPartCopy) and only the parts around a change over the network. So
//! changing one byte of a 1 GiB file can move about 5 MiB each way instead of 1 GiB. The rules that make such a
//! plan valid are all arithmetic, so they live here, pure and tested exhaustively:
//!
//! - both versions lay out chunk `i` at the same stored offset (the own format: `512 + i * 65564`; plaintext modes:
//!   `i * 65536`), so an untouched chunk is copied to where it already is;
//! - a chunk the change touches ("dirty") is sealed again (format versions 2 and 3, `crypto::version`: the new
//!   version's id); in the encrypted layout so is every chunk whose length or last-chunk flag the new length changes
//!   ([`crate::crypto::version::must_rewrite`]), which this plan adds itself;
//! - every part but the last is at least [`MIN_PART_LEN`] (S3's rule) and a copied part at most
//!   [`MAX_COPY_PART_LEN`]: so a clean stretch shorter than the minimum between two changes is uploaded too (its old
//!   bytes are fetched raw, and re-sent unchanged), and an uploaded stretch shorter than the minimum grows into its
//!   clean neighbour;
//! - uploaded parts are cut near [`TARGET_UPLOAD_PART_LEN`] (8 MiB, as whole uploads are), never below the minimum.
//!
//! The result bounds what moves: the uploaded bytes are the dirty chunks plus at most the padding that brings a
//! stretch to the minimum; the fetched bytes are the old bytes inside uploaded parts. For one changed byte that is
//! one part of 5 MiB each way; the tests check the bound (16 MiB) for a change, an append and a shrink of a
//! 1 GiB file. Objects below [`MIN_IN_PLACE_LEN`] are not worth a plan (whole-file rewrite, as today).
//!
//! [`update`] carries a plan out against a store: copies, fetches the old bytes of the uploaded parts raw (checked
//! against the old ETag), seals the dirty chunks under the old data key with a fresh version id (each once, even
//! when it straddles two parts), and completes the upload on the old ETag, with the new version map in the
//! metadata. Anything it cannot do in place (a small object, a version-1 object, a full map, a store without
//! copies) it reports as [`Fallback`] before anything is visible, and the caller rewrites the file whole.
//!
//! The mount uses it through `fs::sparse`: a large file opened for writing is staged only where it is written (the
//! base version and the staged chunks in its journal record), and its close calls [`update`] (docs/FORMAT.md,
//! "Format version 2"; docs/SEMANTICS.md, "Reading and writing").

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use futures::FutureExt;
use tokio::task::JoinSet;

use crate::crypto::version::VersionId;
use crate::crypto::{self, CryptoError, ObjectCipher, CHUNK_PLAIN_LEN};
use crate::object::{BIND_META, MAP_META};
use crate::store::{Backend, Expect, ObjectInfo, ObjectKey, StoreError, UserMeta};
use crate::upload::Source;

/// S3's smallest part, except the last.
pub const MIN_PART_LEN: u64 = 5 << 20;
/// S3's largest part, copied or uploaded.
pub const MAX_COPY_PART_LEN: u64 = 5 << 30;
/// Copied stretches are cut into parts of about this size (more for very large objects, see [`copy_target`]), so
/// the copies run side by side: a server copies a part by reading and hashing it (Garage at ~130 MiB/s per request
/// here), so one 1 GiB copy takes as long as the part's bytes take one core.
pub const TARGET_COPY_PART_LEN: u64 = 64 << 20;
/// Copies of an update in flight at once. Besides them at most one uploaded part travels, so an update holds at most
/// one part body in memory besides the one being built.
pub const PARTS_IN_FLIGHT: usize = 4;
/// Uploaded stretches are cut into parts of about this size, as whole uploads are (`upload::PART_SIZE`).
pub const TARGET_UPLOAD_PART_LEN: u64 = 8 << 20;
/// S3's most parts per upload.
pub const MAX_PARTS: usize = 10_000;
/// Below this stored size an object is rewritten whole: two minimum parts, the smallest object a plan can keep a
/// copied part of while it uploads another (and the fixed cost, a HEAD, the map and several requests, would
/// dominate). It was 32 MiB until 2026-12-07: a 16 MiB cse-c file then downloaded whole at its first write and
/// uploaded whole at close, 0.18–0.21 s for one changed byte and 0.23 s for a 4 KiB append against s3fs's 0.11 s and
/// 0.08 s (which copies the untouched parts too); changed in place, 0.08–0.10 s and 0.08 s (Garage, by hand, 3 runs).
pub const MIN_IN_PLACE_LEN: u64 = 10 << 20;

/// How chunks sit in the stored object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Modes none and sse-*: the object is the file.
    Plain,
    /// The own format (cse-c, cse-kms): a 512-byte header, then sealed chunks.
    Encrypted,
}

impl Layout {
    fn stored_size(self, plain: u64) -> u64 {
        match self {
            Layout::Plain => plain,
            Layout::Encrypted => crypto::cipher_size(plain),
        }
    }

    fn chunk_count(self, plain: u64) -> u64 {
        match self {
            Layout::Plain => plain.div_ceil(CHUNK_PLAIN_LEN),
            Layout::Encrypted => crypto::chunk_count(plain),
        }
    }

    /// Stored bytes of chunks `chunks` of a file of `plain` bytes.
    fn stored_range(self, chunks: Range<u64>, plain: u64) -> Range<u64> {
        match self {
            Layout::Plain => (chunks.start * CHUNK_PLAIN_LEN).min(plain)..(chunks.end * CHUNK_PLAIN_LEN).min(plain),
            Layout::Encrypted => {
                crypto::chunk_cipher_range(chunks.start, plain).start..crypto::chunk_cipher_range(chunks.end - 1, plain).end
            }
        }
    }

    /// Chunks that differ because the length changes, whatever was written.
    fn forced(self, old: u64, new: u64) -> Range<u64> {
        match self {
            // The bytes past the old end are new; a shrink only cuts (no chunk carries a last flag).
            Layout::Plain if old == new => 0..0,
            Layout::Plain => (old.min(new) / CHUNK_PLAIN_LEN)..self.chunk_count(new).max(old.min(new) / CHUNK_PLAIN_LEN),
            Layout::Encrypted => crypto::version::must_rewrite(old, new),
        }
    }
}

/// One part of the new version, as a range of its stored bytes (the same offsets in the old version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Copied inside the store from the old version.
    Copy(Range<u64>),
    /// Sent: the dirty chunks sealed again, the other bytes of the range fetched raw from the old version.
    Upload(Range<u64>),
}

/// A plan and what it moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub parts: Vec<Part>,
    /// Chunks (of the new version) to seal again, sorted and disjoint.
    pub dirty: Vec<Range<u64>>,
    /// Bytes sent: the uploaded parts.
    pub upload_bytes: u64,
    /// Old bytes fetched raw to fill the uploaded parts (their bytes inside the old object and outside dirty chunks),
    /// at most: the caller also reads the old plaintext of partly written chunks, which lie inside these parts.
    pub fetch_bytes: u64,
}

/// Why an object is rewritten whole instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoPlan {
    /// Smaller than [`MIN_IN_PLACE_LEN`] (old or new version).
    TooSmall,
    /// The plan would need more than [`MAX_PARTS`] parts.
    TooManyParts,
    /// The uploads would be most of the object anyway.
    NotWorthIt,
}

/// The parts of a new version of `new_len` bytes made from the old version of `old_len` bytes, in which chunks
/// `dirty` (of the new version) were written. The chunks the length change forces are added.
pub fn plan(layout: Layout, old_len: u64, new_len: u64, dirty: &[Range<u64>]) -> Result<Plan, NoPlan> {
    let old_stored = layout.stored_size(old_len);
    let new_stored = layout.stored_size(new_len);
    if old_stored < MIN_IN_PLACE_LEN || new_stored < MIN_IN_PLACE_LEN {
        return Err(NoPlan::TooSmall);
    }
    let count = layout.chunk_count(new_len);
    // Dirty chunks: given and forced, clipped to the new file, merged.
    let mut chunks: Vec<Range<u64>> = dirty.iter().cloned().chain([layout.forced(old_len, new_len)]).collect();
    chunks.retain(|r| r.start < r.end.min(count));
    for r in &mut chunks {
        r.end = r.end.min(count);
    }
    chunks.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in chunks {
        match merged.last_mut() {
            Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    // Stored stretches: dirty (uploaded) or clean (copied), in order over the new object.
    let mut stretches: Vec<(bool, Range<u64>)> = Vec::new();
    let mut at = 0;
    for r in &merged {
        let s = layout.stored_range(r.clone(), new_len);
        if s.start > at {
            stretches.push((false, at..s.start));
        }
        stretches.push((true, s.start.max(at)..s.end));
        at = s.end;
    }
    if at < new_stored {
        stretches.push((false, at..new_stored));
    }
    // Clean bytes must exist in the old object at the same offset (they do, unless the caller left an extension
    // out of `dirty`: then upload them, which fetches nothing).
    let mut fixed: Vec<(bool, Range<u64>)> = Vec::new();
    for (dirty, r) in stretches {
        if !dirty && r.end > old_stored {
            if r.start < old_stored {
                fixed.push((false, r.start..old_stored));
            }
            fixed.push((true, r.start.max(old_stored)..r.end));
        } else {
            fixed.push((dirty, r));
        }
    }
    let stretches = normalise(fixed);
    let clean: Vec<u64> = stretches.iter().filter(|(dirty, _)| !dirty).map(|(_, r)| r.end - r.start).collect();
    let mut copy_counts = copy_counts(&clean, copy_target(new_stored)).into_iter();
    let mut parts = Vec::new();
    for (dirty, r) in &stretches {
        let len = r.end - r.start;
        // As many parts as the target size asks, but none below the minimum (the last stretch's only part aside).
        let n = if *dirty {
            len.div_ceil(TARGET_UPLOAD_PART_LEN).min(most_parts(len))
        } else {
            copy_counts.next().expect("invariant broken: one count per clean stretch")
        };
        let mut start = r.start;
        for k in 1..=n {
            // Evenly: no part longer than `len / n` rounded up (the cuts above are chosen by that length).
            let end = r.start + u64::try_from(u128::from(len) * u128::from(k) / u128::from(n)).unwrap_or(len);
            parts.push(if *dirty { Part::Upload(start..end) } else { Part::Copy(start..end) });
            start = end;
        }
    }
    if parts.len() > MAX_PARTS {
        return Err(NoPlan::TooManyParts);
    }
    let dirty_stored: Vec<Range<u64>> = merged.iter().map(|r| layout.stored_range(r.clone(), new_len)).collect();
    let mut upload_bytes = 0;
    let mut fetch_bytes = 0;
    for p in &parts {
        if let Part::Upload(r) = p {
            upload_bytes += r.end - r.start;
            let inside_old = r.start.min(old_stored)..r.end.min(old_stored);
            let resealed: u64 = dirty_stored
                .iter()
                .map(|d| inside_old.end.min(d.end).saturating_sub(inside_old.start.max(d.start)))
                .sum();
            fetch_bytes += (inside_old.end - inside_old.start) - resealed;
        }
    }
    if upload_bytes > new_stored / 2 {
        return Err(NoPlan::NotWorthIt);
    }
    Ok(Plan { parts, dirty: merged, upload_bytes, fetch_bytes })
}

/// The most parts a stretch of `len` bytes may be cut into: none below the minimum, one at least.
fn most_parts(len: u64) -> u64 {
    (len / MIN_PART_LEN).max(1)
}

/// How many parts each clean stretch (`lens`, in order) is cut into, the stretch cut evenly.
///
/// The copies run [`PARTS_IN_FLIGHT`] at a time and the server copies each at a rate per request, so an update ends
/// with its last round of copies: five equal copies take two rounds where four of a quarter more each take one, and
/// the fifth runs alone (on a server that copies a request on one core, with the others idle). So the count aims at
/// a whole number of rounds (the minimum part size may leave it short of one), and the parts are the smallest that
/// fit in them, so that they are alike whatever the stretches' lengths (a change in the middle of a 256 MiB file:
/// four copies of ~63 MiB, not three on each side). Of the few fewest rounds that can hold parts of at most the
/// target plus [`MIN_PART_LEN`] (and at most [`MAX_COPY_PART_LEN`]), the one that ends first (its rounds × its
/// longest part), or within 5 % of it with fewer requests. Where none can (many short stretches), the rounds the
/// target's own cuts need.
fn copy_counts(lens: &[u64], target: u64) -> Vec<u64> {
    let round = PARTS_IN_FLIGHT as u64;
    let counts = |part: u64| lens.iter().map(move |&len| len.div_ceil(part).min(most_parts(len)));
    let count = |part: u64| counts(part).sum::<u64>();
    // The smallest part length in [MIN_PART_LEN, most] at which the stretches take at most `n` parts.
    let fit = |n: u64, most: u64| {
        if count(most) > n {
            return None;
        }
        let (mut lo, mut hi) = (MIN_PART_LEN, most);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if count(mid) <= n {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(hi)
    };
    // When the copies cut at `part` would end: their rounds times the longest of them.
    let ends = |part: u64| {
        let longest = counts(part).zip(lens).map(|(n, &len)| len.div_ceil(n)).max().unwrap_or(0);
        u128::from(count(part).div_ceil(round)) * u128::from(longest)
    };
    let most = (target + MIN_PART_LEN).min(MAX_COPY_PART_LEN);
    let fewest = lens.iter().sum::<u64>().div_ceil(most).div_ceil(round).max(1);
    let choices: Vec<u64> = (fewest..fewest + 3).filter_map(|rounds| fit(rounds * round, most)).collect();
    let best = choices.iter().map(|&part| ends(part)).min();
    let part = choices
        .iter()
        .find(|&&part| best.is_some_and(|b| ends(part) * 100 <= b * 105))
        .copied()
        .or_else(|| fit(count(target).next_multiple_of(round), target))
        .unwrap_or(target);
    counts(part).collect()
}

/// The size copied parts of an object of `stored` bytes are cut near: [`TARGET_COPY_PART_LEN`], or larger where that
/// would take more than a quarter of [`MAX_PARTS`] (so uploaded parts keep the rest), never above what S3 copies.
fn copy_target(stored: u64) -> u64 {
    stored.div_ceil(MAX_PARTS as u64 / 4).clamp(TARGET_COPY_PART_LEN, MAX_COPY_PART_LEN)
}

/// Why an update is not done in place (nothing was made visible; rewrite the file whole).
#[derive(Debug)]
pub enum Fallback {
    NoPlan(NoPlan),
    /// The object is in format version 1 (or its cipher has no version map): chunks cannot be told apart by version.
    FormatVersion1,
    /// The version map is full, or the data key has sealed its share of chunks.
    Map(CryptoError),
    /// The store cannot copy parts (see `Upload::copy_part`).
    CopyUnsupported,
}

/// The old version an update replaces.
pub struct Base<'a> {
    /// Its ETag: every copy and fetch, and the completion, are conditional on it.
    pub etag: &'a str,
    /// Its plaintext length.
    pub plain_len: u64,
    /// Encrypted layout: the old object's cipher with its version map attached (`ObjectCipher::attach_map`).
    pub cipher: Option<&'a ObjectCipher>,
}

/// Stores a new version of `new_len` bytes at `path` in place of `base`, in which chunks `dirty` changed; `src`
/// gives the new plaintext of (at least) every chunk that is sealed again, `meta` the new attributes. `Ok(Err(_))`:
/// not done, nothing visible, rewrite whole. `Err(e)`: a store error; a precondition or not-found error means the
/// object is no longer `base` (another writer), as for a whole upload.
#[allow(clippy::too_many_arguments)]
pub async fn update(
    backend: &dyn Backend,
    layout: Layout,
    path: &str,
    base: &Base<'_>,
    src: &dyn Source,
    new_len: u64,
    dirty: &[Range<u64>],
    mut meta: UserMeta,
) -> Result<Result<ObjectInfo, Fallback>, StoreError> {
    let plan = match plan(layout, base.plain_len, new_len, dirty) {
        Ok(p) => p,
        Err(why) => return Ok(Err(Fallback::NoPlan(why))),
    };
    let version = VersionId::random();
    let cipher = match layout {
        Layout::Plain => None,
        Layout::Encrypted => {
            let Some((cipher, map)) = base.cipher.and_then(|c| c.version_map().map(|m| (c, m))) else {
                return Ok(Err(Fallback::FormatVersion1));
            };
            let new_map = match map.updated(new_len, &plan.dirty, version) {
                Ok(m) => m,
                Err(e) => return Ok(Err(Fallback::Map(e))),
            };
            meta.extra.insert(MAP_META.to_string(), cipher.seal_map(&new_map));
            meta.extra.insert(BIND_META.to_string(), cipher.binding(path));
            Some(cipher)
        }
    };
    let key = ObjectKey::new(path)?;
    let old_stored = layout.stored_size(base.plain_len);
    let mut upload = backend.put_multipart_expect(&key, &meta, &Expect::Etag(base.etag.to_string())).await?;
    // A store that cannot copy (SSE-C, GCS, Azure) is known before a part is fetched or sent.
    if !upload.copies_parts() {
        if let Err(e) = upload.abort().await {
            tracing::warn!(key = path, error = %e, "could not abort an in-place update the store cannot copy parts for");
        }
        return Ok(Err(Fallback::CopyUnsupported));
    }
    let mut sealed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    // Parts are sent side by side (their places are fixed when they are asked for); an uploaded part waits until the
    // one before it has gone, so only one part body is held in flight. It does not take a copy's turn: the copies
    // are cut for PARTS_IN_FLIGHT at once (`copy_counts`), and one of them waiting for an upload would end a round
    // late. Each part is a task of its own, so that the copies already asked for go out and run while the next
    // uploaded part is built (its old bytes fetched); the set cancels those still running when it is dropped.
    let mut in_flight: JoinSet<PartAnswer> = JoinSet::new();
    let (mut uploading, mut copying) = (false, 0);
    let result: Result<Result<(), Fallback>, StoreError> = async {
        for part in &plan.parts {
            let is_upload = matches!(part, Part::Upload(_));
            while if is_upload { uploading } else { copying >= PARTS_IN_FLIGHT } {
                match joined(path, in_flight.join_next().await) {
                    Some(answer) => {
                        let (was_upload, r) = answer?;
                        if was_upload {
                            uploading = false;
                        } else {
                            copying -= 1;
                        }
                        if let Err(f) = part_done(r)? {
                            return Ok(Err(f));
                        }
                    }
                    None => break,
                }
            }
            let sent: futures::future::BoxFuture<'static, Result<(), StoreError>> = match part {
                Part::Copy(r) => upload.copy_part(r.clone(), base.etag),
                Part::Upload(r) => {
                    let (dirty, r) = (&plan.dirty, r.clone());
                    // The part's body and the old bytes fetched into it while it is built; then only the body,
                    // held until the store has the part (one uploaded part at a time: src/memory).
                    let mut memory = crate::memory::process().reserve(2 * (r.end - r.start)).await;
                    let body = build_part(
                        backend, &key, layout, cipher, &version, base, old_stored, src, new_len, dirty, r, &mut sealed,
                    )
                    .await?;
                    memory.shrink_to(body.len() as u64);
                    let sent = upload.put_part(body);
                    Box::pin(async move {
                        let r = sent.await;
                        drop(memory);
                        r
                    })
                }
            };
            if is_upload {
                uploading = true;
            } else {
                copying += 1;
            }
            in_flight.spawn(sent.map(move |r| (is_upload, r)));
        }
        while let Some(answer) = joined(path, in_flight.join_next().await) {
            if let Err(f) = part_done(answer?.1)? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }
    .await;
    // Parts still in flight after a failure are cancelled, and have stopped, before the upload is aborted.
    in_flight.shutdown().await;
    if let Ok(Ok(())) = result {
        return upload.complete().await.map(Ok);
    }
    if let Err(e) = upload.abort().await {
        tracing::warn!(key = path, error = %e, "could not abort a failed in-place update");
    }
    match result {
        Ok(Err(fallback)) => Ok(Err(fallback)),
        Err(e) => Err(e),
        Ok(Ok(())) => unreachable!("invariant broken: a finished plan was completed above"),
    }
}

type PartAnswer = (bool, Result<(), StoreError>);

/// A part task's answer (whether it was an upload, and its result). A task that panicked or was cancelled (the
/// runtime shutting down) is an error that ends the update, which is then aborted, as a whole upload's part task's
/// is (`upload::part_result`).
fn joined(path: &str, r: Option<Result<PartAnswer, tokio::task::JoinError>>) -> Option<Result<PartAnswer, StoreError>> {
    r.map(|r| r.map_err(|e| StoreError::other(path, e)))
}

/// A part's answer: a copy the store cannot make means "rewrite whole"; any other error ends the update.
fn part_done(r: Result<(), StoreError>) -> Result<Result<(), Fallback>, StoreError> {
    match r {
        Err(StoreError::Unsupported { .. }) => Ok(Err(Fallback::CopyUnsupported)),
        other => other.map(Ok),
    }
}

/// The bytes of uploaded part `r`: the old bytes fetched raw, with every dirty chunk overlapping it sealed again
/// (a chunk across a part boundary is sealed once and kept in `sealed` for the next part).
#[allow(clippy::too_many_arguments)]
async fn build_part(
    backend: &dyn Backend,
    key: &ObjectKey,
    layout: Layout,
    cipher: Option<&ObjectCipher>,
    version: &VersionId,
    base: &Base<'_>,
    old_stored: u64,
    src: &dyn Source,
    new_len: u64,
    dirty: &[Range<u64>],
    r: Range<u64>,
    sealed: &mut BTreeMap<u64, Vec<u8>>,
) -> Result<Bytes, StoreError> {
    let mut body = vec![0u8; (r.end - r.start) as usize];
    let old_end = r.end.min(old_stored);
    if r.start < old_end {
        let (bytes, info, _) = backend.get_range(key, r.start..old_end).await?;
        if info.etag.as_deref() != Some(base.etag) {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        if bytes.len() as u64 != old_end - r.start {
            return Err(StoreError::Precondition { key: key.to_string() });
        }
        body[..bytes.len()].copy_from_slice(&bytes);
    }
    for d in dirty {
        for i in d.clone() {
            let stored = layout.stored_range(i..i + 1, new_len);
            if stored.end <= r.start || stored.start >= r.end {
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = sealed.entry(i) {
                let plain_range = crypto::chunk_plain_range(i, new_len);
                let mut plain = vec![0u8; (plain_range.end - plain_range.start) as usize];
                src.read_exact_at(&mut plain, plain_range.start).map_err(|e| StoreError::other(key.as_str(), e))?;
                let bytes = match cipher {
                    Some(c) => {
                        let mut out = Vec::with_capacity(plain.len() + crypto::CHUNK_OVERHEAD as usize);
                        c.seal_chunk_in(version, i, crypto::is_last_chunk(i, new_len), &plain, &mut out);
                        out
                    }
                    None => plain,
                };
                slot.insert(bytes);
            }
            let bytes = &sealed[&i];
            let from = stored.start.max(r.start);
            let to = stored.end.min(r.end);
            body[(from - r.start) as usize..(to - r.start) as usize]
                .copy_from_slice(&bytes[(from - stored.start) as usize..(to - stored.start) as usize]);
        }
    }
    // Chunks wholly before this part's end are done with.
    sealed.retain(|&i, _| layout.stored_range(i..i + 1, new_len).end > r.end);
    Ok(Bytes::from(body))
}

/// Makes every stretch but the last at least [`MIN_PART_LEN`], left to right: a short clean stretch before the end is
/// uploaded instead; a short (dirty) stretch takes bytes from the one after it — all of it when that one is dirty,
/// or when the rest of a clean one would be short and is not the last. Neighbours of one kind merge. By induction
/// only the last stretch can stay short, which S3 allows.
fn normalise(stretches: Vec<(bool, Range<u64>)>) -> Vec<(bool, Range<u64>)> {
    fn push(out: &mut Vec<(bool, Range<u64>)>, dirty: bool, r: Range<u64>) {
        if r.start == r.end {
            return;
        }
        match out.last_mut() {
            Some((d, last)) if *d == dirty && last.end == r.start => last.end = r.end,
            _ => out.push((dirty, r)),
        }
    }
    let mut out: Vec<(bool, Range<u64>)> = Vec::new();
    let n = stretches.len();
    for (k, (dirty, mut r)) in stretches.into_iter().enumerate() {
        let is_final = k + 1 == n;
        let dirty = dirty || (!is_final && r.end - r.start < MIN_PART_LEN);
        let short_by = out.last().map_or(0, |(_, last)| MIN_PART_LEN.saturating_sub(last.end - last.start));
        if short_by > 0 {
            // Only a dirty stretch is ever left short before the end: the taken bytes are uploaded with it.
            let len = r.end - r.start;
            let rest = len.saturating_sub(short_by);
            let take = if dirty || rest == 0 || (rest < MIN_PART_LEN && !is_final) { len } else { short_by };
            push(&mut out, true, r.start..r.start + take);
            r.start += take;
        }
        push(&mut out, dirty, r);
    }
    debug_assert!(
        out.iter().take(out.len().saturating_sub(1)).all(|(_, r)| r.end - r.start >= MIN_PART_LEN),
        "invariant broken: a part plan with a short stretch before the last: {out:?}"
    );
    out
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // a list of one chunk range is what these calls mean
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const C: u64 = CHUNK_PLAIN_LEN;

    /// Every rule a plan must keep, whatever it is.
    fn check(layout: Layout, old_len: u64, new_len: u64, dirty: &[Range<u64>], plan: &Plan) {
        let old_stored = layout.stored_size(old_len);
        let new_stored = layout.stored_size(new_len);
        let mut at = 0;
        for (k, p) in plan.parts.iter().enumerate() {
            let r = match p {
                Part::Copy(r) | Part::Upload(r) => r.clone(),
            };
            assert_eq!(r.start, at, "parts tile the object: {:?}", plan.parts);
            assert!(r.start < r.end, "no empty part");
            if k + 1 < plan.parts.len() {
                assert!(r.end - r.start >= MIN_PART_LEN, "part {k} is {} bytes: {:?}", r.end - r.start, plan.parts);
            }
            assert!(r.end - r.start <= MAX_COPY_PART_LEN);
            if let Part::Copy(r) = p {
                assert!(r.end <= old_stored, "a copy lies inside the old object");
                assert!(r.end - r.start <= copy_target(new_stored) + MIN_PART_LEN, "copies are cut: {:?}", plan.parts);
                for d in &plan.dirty {
                    let s = layout.stored_range(d.clone(), new_len);
                    assert!(r.end <= s.start || r.start >= s.end, "copy {r:?} overlaps dirty {s:?}");
                }
            }
            at = r.end;
        }
        assert_eq!(at, new_stored, "parts end at the new size");
        for d in dirty.iter().chain([&layout.forced(old_len, new_len)]) {
            let count = layout.chunk_count(new_len);
            for i in d.start..d.end.min(count) {
                assert!(plan.dirty.iter().any(|r| r.contains(&i)), "chunk {i} is sealed again");
            }
        }
    }

    #[test]
    fn one_byte_in_the_middle_of_1_gib_moves_one_part_each_way() {
        for layout in [Layout::Encrypted, Layout::Plain] {
            let dirty = [8000..8001];
            let p = plan(layout, GIB, GIB, &dirty).unwrap();
            check(layout, GIB, GIB, &dirty, &p);
            assert_eq!(p.upload_bytes, MIN_PART_LEN, "{layout:?}: {:?}", p.parts);
            assert!(p.fetch_bytes <= MIN_PART_LEN);
            let uploads = p.parts.iter().filter(|p| matches!(p, Part::Upload(_))).count();
            assert_eq!(uploads, 1, "{:?}", p.parts);
            // The copies around it are cut near the target size, so they can run side by side.
            // (1 GiB of 64 MiB parts, and a short one on either side of the change at most).
            assert!((1 + 16..=1 + 18).contains(&p.parts.len()), "{:?}", p.parts);
            assert!(p.upload_bytes <= 16 * MIB && p.fetch_bytes <= 16 * MIB);
        }
    }

    #[test]
    fn appends_and_shrinks_of_1_gib_stay_within_16_mib() {
        for layout in [Layout::Encrypted, Layout::Plain] {
            // A 4 KiB append, a 1-byte shrink, a cut to half, a change in the first and the last chunk.
            for (new_len, dirty) in [
                (GIB + 4096, vec![]),
                (GIB - 1, vec![]),
                (GIB / 2 + 17, vec![]),
                (GIB, vec![0..1]),
                (GIB, vec![16383..16384]),
                (GIB, vec![100..101, 5000..5002, 9000..9001]),
            ] {
                let p = plan(layout, GIB, new_len, &dirty).unwrap();
                check(layout, GIB, new_len, &dirty, &p);
                assert!(p.upload_bytes <= 16 * MIB, "{layout:?} {new_len} {dirty:?}: {:?}", p.parts);
                assert!(p.fetch_bytes <= 16 * MIB, "{layout:?} {new_len} {dirty:?}: {:?}", p.parts);
            }
        }
    }

    #[test]
    fn no_copy_is_longer_than_its_bound_when_the_cut_is_not_exact() {
        // Clean stretches of 5-10 GiB whose best cut lands on the longest part allowed (found by a scan of sizes):
        // the bytes a stretch does not divide into are spread over its parts, not all added to its last one.
        for chunks in [79_534, 119_182, 119_261, 158_909] {
            for layout in [Layout::Encrypted, Layout::Plain] {
                let len = chunks * C;
                for (new_len, dirty) in [(len + 4096, vec![]), (len, vec![chunks - 1..chunks]), (len, vec![0..1])] {
                    let p = plan(layout, len, new_len, &dirty).unwrap();
                    check(layout, len, new_len, &dirty, &p);
                }
            }
        }
    }

    /// When the last copy of `plan` ends, its copies sent in order PARTS_IN_FLIGHT at a time, each taking as long
    /// as it is long; and the copied bytes.
    fn copy_schedule(plan: &Plan) -> (u64, u64) {
        let mut slots = [0u64; PARTS_IN_FLIGHT];
        let mut copied = 0;
        for p in &plan.parts {
            if let Part::Copy(r) = p {
                let first_free = slots.iter_mut().min().unwrap();
                *first_free += r.end - r.start;
                copied += r.end - r.start;
            }
        }
        (slots.into_iter().max().unwrap(), copied)
    }

    #[test]
    fn the_copies_around_a_change_end_together() {
        // A change anywhere in a large file: its copies end close to when a perfect split among the copies in
        // flight would (a fifth copy waiting for a second round does not).
        for layout in [Layout::Encrypted, Layout::Plain] {
            for len in [256 * MIB, GIB, 3 * GIB + 12345] {
                for tenth in 1..10 {
                    let chunk = layout.chunk_count(len) * tenth / 10;
                    let dirty = [chunk..chunk + 1];
                    let p = plan(layout, len, len, &dirty).unwrap();
                    check(layout, len, len, &dirty, &p);
                    let (ends, copied) = copy_schedule(&p);
                    let perfect = copied.div_ceil(PARTS_IN_FLIGHT as u64);
                    let what = format!("{layout:?} {len} at {tenth}/10: {ends} for {perfect}: {:?}", p.parts);
                    assert!(ends * 100 <= perfect * 112, "{what}");
                }
            }
        }
        // The middle of 256 MiB and an append to it (the benchmark's change_1b and append_4k): one round of four
        // copies in both layouts.
        for layout in [Layout::Encrypted, Layout::Plain] {
            for (new_len, dirty) in [(256 * MIB, 2048..2049), (256 * MIB + 4096, 4096..4097)] {
                let p = plan(layout, 256 * MIB, new_len, &[dirty]).unwrap();
                let copies = p.parts.iter().filter(|p| matches!(p, Part::Copy(_))).count();
                assert_eq!(copies, PARTS_IN_FLIGHT, "{layout:?}: {:?}", p.parts);
            }
        }
    }

    #[test]
    fn small_objects_and_rewrites_of_most_of_the_file_are_not_planned() {
        assert_eq!(plan(Layout::Encrypted, 9 * MIB, 9 * MIB, &[0..1]), Err(NoPlan::TooSmall));
        assert_eq!(plan(Layout::Plain, GIB, 9 * MIB, &[]), Err(NoPlan::TooSmall));
        // The smallest object planned: one changed byte moves at most a minimum part, the rest is copied.
        let p = plan(Layout::Plain, 10 * MIB, 10 * MIB, &[100..101]).unwrap();
        assert!(p.upload_bytes <= MIN_PART_LEN && p.parts.len() == 2, "{:?}", p.parts);
        assert_eq!(plan(Layout::Plain, 64 * MIB, 64 * MIB, &[0..1000]), Err(NoPlan::NotWorthIt));
    }

    proptest! {
        #[test]
        fn plans_keep_every_rule(
            encrypted in any::<bool>(),
            old in 8 * MIB..300 * MIB, delta in -(40 * MIB as i64)..40 * MIB as i64,
            marks in proptest::collection::vec((0..5000u64, 1..200u64), 0..6),
        ) {
            let layout = if encrypted { Layout::Encrypted } else { Layout::Plain };
            let new = old.saturating_add_signed(delta);
            let dirty: Vec<Range<u64>> = marks.iter().map(|&(s, l)| s..s + l).collect();
            match plan(layout, old, new, &dirty) {
                Ok(p) => {
                    check(layout, old, new, &dirty, &p);
                    // What moves is the dirty data plus at most a minimum part of padding per stretch.
                    let dirty_chunks: u64 = p.dirty.iter().map(|r| r.end - r.start).sum();
                    let stretches = p.dirty.len() as u64 + 1;
                    prop_assert!(p.upload_bytes <= dirty_chunks * (C + 28) + stretches * 3 * MIN_PART_LEN, "{:?}", p);
                }
                Err(NoPlan::TooSmall) => prop_assert!(layout.stored_size(new) < MIN_IN_PLACE_LEN || layout.stored_size(old) < MIN_IN_PLACE_LEN),
                Err(_) => {}
            }
        }
    }
}

/// [`update`] against a store that counts what crosses the network, with the new version read back through the
/// read path and compared with a model of the file.
#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // a list of one chunk range is what these calls mean
mod update_tests;
