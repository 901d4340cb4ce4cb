//! Format version 2: which version of an object each chunk was sealed in (the version map), so an object can be
//! changed in place without a new data key.
//!
//! Why: changing one byte of a large object should re-upload one part, not the whole object, and copy the untouched
//! ciphertext ranges server-side (S3 UploadPartCopy). The copied chunks keep their data key and file id, so in
//! format version 1 a chunk of an *older* version of the same object, spliced in at the same index, would
//! authenticate in the newer one. Version 2 closes that: every upload draws a random [`VersionId`]; each chunk it
//! seals carries that id in its AAD; and the object's metadata carries the [`VersionMap`] — which id each run of
//! chunks has, and the plaintext length — authenticated with a key derived from the data key over the file id.
//! A reader verifies the map before opening any chunk and opens chunk `i` with the id the map gives it, so an older
//! chunk (another id), a chunk of an aborted upload (another id), a map of another object (another key and file id)
//! or of another length all fail. docs/FORMAT.md has the byte tables and docs/SECURITY.md the threat model.
//!
//! Invariant the writers keep: a (chunk index, version id) pair is sealed at most once with a given plaintext and
//! last-chunk flag, because every upload attempt draws a fresh id. A chunk carried over into a new version keeps
//! its id and its exact bytes; [`VersionMap::updated`] refuses to carry over a chunk whose plaintext length or
//! last-chunk flag the new length changes ([`must_rewrite`] names them).
//!
//! This module is pure layout: encoding, decoding and the update rule. The MAC that authenticates a map is
//! `object.rs`'s (it needs the data key).

use std::ops::Range;

use super::error::CryptoError;
use super::format::{chunk_count, chunk_plain_len, is_last_chunk};
use super::secret::fill_random;

/// Length of a version id: 128 random bits, so two uploads of one object never draw the same id (a collision
/// would let the chunks of one be accepted in the other).
pub const VERSION_ID_LEN: usize = 16;
/// One run as stored: its first chunk index (u64) and its version id.
pub const RUN_LEN: usize = 8 + VERSION_ID_LEN;
/// Most runs a map holds. The map lives in object metadata, which S3 limits to 2 KiB in all (keys and values):
/// 32 runs are 9 + 32 × 24 + 16 = 793 bytes, 1,058 characters of base64, which leaves about 1 KiB for the other
/// fields. A change that would need more runs rewrites the whole object under a fresh data key instead.
pub const MAX_RUNS: usize = 32;
/// Bytes of HMAC-SHA256 kept as the map's tag (128 bits, like the path binding).
pub const MAP_TAG_LEN: usize = 16;
/// Bytes before the runs: the run count (u8) and the sealed-chunk count (u64).
pub const MAP_FIXED_LEN: usize = 1 + 8;
/// Smallest encoded map: the fixed fields, one run and the tag.
pub const MIN_MAP_LEN: usize = MAP_FIXED_LEN + RUN_LEN + MAP_TAG_LEN;
/// Most chunks ever sealed under one data key, over all versions of an object: the 2^32 invocations NIST SP
/// 800-38D allows AES-GCM with random 96-bit nonces. Version 1 seals each chunk once per data key; in-place changes
/// seal more under the same key, so the map counts them, and a change that would pass this rewrites the whole
/// object under a fresh data key instead.
pub const MAX_SEALED_CHUNKS: u64 = 1 << 32;

/// The random identifier of one version (one upload) of an object, bound into the AAD of every chunk it sealed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionId(pub [u8; VERSION_ID_LEN]);

impl VersionId {
    /// A fresh id from the OS random source: one per upload attempt.
    pub fn random() -> VersionId {
        let mut id = [0u8; VERSION_ID_LEN];
        fill_random(&mut id);
        VersionId(id)
    }
}

impl std::fmt::Debug for VersionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VersionId(")?;
        super::secret::write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

/// Chunks `first..` (up to the next run's first chunk, or the end of the file) were sealed by version `version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub version: VersionId,
}

/// Which version sealed each chunk of a file of `plain_len` bytes. Always canonical: the first run starts at chunk
/// 0, runs start at strictly increasing chunks inside the file, and neighbours have different ids, so one map has
/// exactly one encoding (no byte of it escapes the checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionMap {
    plain_len: u64,
    /// Chunks sealed under this object's data key so far, by every version (see [`MAX_SEALED_CHUNKS`]).
    sealed: u64,
    runs: Vec<Run>,
}

/// The chunks a change of length from `old_len` to `new_len` forces to be sealed again, whether written or not:
/// from the old or the new last chunk, whichever comes first, to the new end (their plaintext length or their
/// last-chunk flag changes). Empty when the length stays.
pub fn must_rewrite(old_len: u64, new_len: u64) -> Range<u64> {
    let new_count = chunk_count(new_len);
    if old_len == new_len {
        return new_count..new_count;
    }
    let old_last = chunk_count(old_len) - 1;
    let new_last = new_count - 1;
    old_last.min(new_last)..new_count
}

impl VersionMap {
    /// A file of `plain_len` bytes sealed whole by `version` (a new object).
    pub fn whole(plain_len: u64, version: VersionId) -> VersionMap {
        VersionMap { plain_len, sealed: chunk_count(plain_len), runs: vec![Run { first: 0, version }] }
    }

    /// Chunks sealed under the object's data key by all its versions so far.
    pub fn sealed(&self) -> u64 {
        self.sealed
    }

    /// The plaintext length the map was made for.
    pub fn plain_len(&self) -> u64 {
        self.plain_len
    }

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The version that sealed chunk `index`; `None` past the last chunk.
    pub fn version_of(&self, index: u64) -> Option<VersionId> {
        if index >= chunk_count(self.plain_len) {
            return None;
        }
        // Runs are sorted and the first starts at 0, so the last run starting at or before `index` holds it.
        let at = self.runs.partition_point(|r| r.first <= index);
        Some(self.runs[at - 1].version)
    }

    /// The map of a new version of `new_len` bytes in which the chunks in `rewritten` were sealed again by `version`
    /// and every other chunk is carried over unchanged from this one.
    ///
    /// Fails with `MustRewrite` when a carried-over chunk would not be valid in the new version (it lies past this
    /// version's end, or the length change alters its plaintext length or last-chunk flag: see [`must_rewrite`]),
    /// and with `VersionMapFull` when the result needs more than [`MAX_RUNS`] runs (the caller then rewrites the
    /// whole object under a fresh data key), as it does with `DataKeyExhausted` when the chunks sealed under the
    /// data key would pass [`MAX_SEALED_CHUNKS`].
    pub fn updated(&self, new_len: u64, rewritten: &[Range<u64>], version: VersionId) -> Result<VersionMap, CryptoError> {
        let count = chunk_count(new_len);
        let old_count = chunk_count(self.plain_len);
        let mut marks: Vec<Range<u64>> =
            rewritten.iter().filter(|r| r.start < r.end).map(|r| r.start.min(count)..r.end.min(count)).collect();
        marks.sort_by_key(|r| r.start);
        let mut newly_sealed = 0u64;
        let mut covered = 0u64;
        for r in &marks {
            let start = r.start.max(covered);
            if r.end > start {
                newly_sealed += r.end - start;
                covered = r.end;
            }
        }
        let sealed = self.sealed.saturating_add(newly_sealed);
        if sealed > MAX_SEALED_CHUNKS {
            return Err(CryptoError::DataKeyExhausted { sealed });
        }
        let is_new = |i: u64| marks.iter().any(|r| r.contains(&i));
        let mut runs: Vec<Run> = Vec::new();
        let push = |first: u64, v: VersionId, runs: &mut Vec<Run>| {
            if runs.last().is_none_or(|r| r.version != v) {
                runs.push(Run { first, version: v });
            }
        };
        // Walk the boundaries where the answer can change: run starts and the edges of the rewritten ranges.
        let mut edges: Vec<u64> = self.runs.iter().map(|r| r.first).filter(|&f| f < count).collect();
        for r in &marks {
            edges.push(r.start);
            edges.push(r.end);
        }
        edges.push(0);
        edges.push(old_count.min(count));
        edges.retain(|&e| e < count);
        edges.sort_unstable();
        edges.dedup();
        for (k, &start) in edges.iter().enumerate() {
            let end = edges.get(k + 1).copied().unwrap_or(count);
            if is_new(start) {
                push(start, version, &mut runs);
                continue;
            }
            // Carried over: every chunk of start..end must be the same chunk in both versions.
            for i in [start, end - 1] {
                let same = i < old_count
                    && chunk_plain_len(i, self.plain_len) == chunk_plain_len(i, new_len)
                    && is_last_chunk(i, self.plain_len) == is_last_chunk(i, new_len);
                if !same {
                    return Err(CryptoError::MustRewrite { chunk: i });
                }
            }
            let v = self.version_of(start).expect("invariant broken: a carried-over chunk lies inside the old file");
            push(start, v, &mut runs);
        }
        if runs.len() > MAX_RUNS {
            return Err(CryptoError::VersionMapFull { runs: runs.len() });
        }
        Ok(VersionMap { plain_len: new_len, sealed, runs })
    }

    /// `count (u8) || sealed (u64) || run_0 || … ` with `run = first_chunk (u64) || version_id (16)`: the bytes
    /// the tag covers (after the domain, file id and length) and that precede it in the stored map.
    pub(crate) fn encode_body(&self) -> Vec<u8> {
        let count = u8::try_from(self.runs.len()).expect("invariant broken: a version map holds at most MAX_RUNS runs");
        let mut out = Vec::with_capacity(MAP_FIXED_LEN + self.runs.len() * RUN_LEN);
        out.push(count);
        out.extend_from_slice(&self.sealed.to_be_bytes());
        for r in &self.runs {
            out.extend_from_slice(&r.first.to_be_bytes());
            out.extend_from_slice(&r.version.0);
        }
        out
    }

    /// Parses a body (already authenticated by the caller) for a file of `plain_len` bytes, accepting only the
    /// canonical form.
    pub(crate) fn decode_body(body: &[u8], plain_len: u64) -> Result<VersionMap, CryptoError> {
        let malformed = |what| Err(CryptoError::Malformed { what });
        let Some((&count, rest)) = body.split_first() else { return malformed("the version map is empty") };
        let count = usize::from(count);
        if count == 0 || count > MAX_RUNS {
            return malformed("the version map has no runs or more than 32");
        }
        if rest.len() != 8 + count * RUN_LEN {
            return malformed("the version map's length does not match its run count");
        }
        let (sealed, rest) = rest.split_at(8);
        let sealed = u64::from_be_bytes(sealed.try_into().expect("invariant broken: split_at(8)"));
        let chunks = chunk_count(plain_len);
        if sealed < chunks || sealed > MAX_SEALED_CHUNKS {
            return malformed("the version map's sealed-chunk count is impossible for its length");
        }
        let mut runs: Vec<Run> = Vec::with_capacity(count);
        for raw in rest.chunks(RUN_LEN) {
            let first = u64::from_be_bytes(raw[..8].try_into().expect("invariant broken: chunks(RUN_LEN)"));
            let mut id = [0u8; VERSION_ID_LEN];
            id.copy_from_slice(&raw[8..]);
            let run = Run { first, version: VersionId(id) };
            let ok = match runs.last() {
                None => first == 0,
                Some(prev) => first > prev.first && first < chunks && prev.version != run.version,
            };
            if !ok {
                return malformed("the version map's runs are not in canonical order");
            }
            runs.push(run);
        }
        Ok(VersionMap { plain_len, sealed, runs })
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // a list of one chunk range is what these calls mean
mod tests {
    use super::*;
    use crate::crypto::CHUNK_PLAIN_LEN;
    use proptest::prelude::*;

    fn id(b: u8) -> VersionId {
        VersionId([b; VERSION_ID_LEN])
    }

    const C: u64 = CHUNK_PLAIN_LEN;

    #[test]
    fn sizes_match_format_md() {
        assert_eq!(RUN_LEN, 24);
        assert_eq!(MIN_MAP_LEN, 49);
        assert_eq!(MAP_FIXED_LEN + MAX_RUNS * RUN_LEN + MAP_TAG_LEN, 793);
    }

    #[test]
    fn a_middle_change_splits_one_run_into_three() {
        let m = VersionMap::whole(100 * C, id(1));
        let n = m.updated(100 * C, &[40..41], id(2)).unwrap();
        assert_eq!(n.runs(), &[Run { first: 0, version: id(1) }, Run { first: 40, version: id(2) }, Run { first: 41, version: id(1) }]);
        assert_eq!(n.version_of(39), Some(id(1)));
        assert_eq!(n.version_of(40), Some(id(2)));
        assert_eq!(n.version_of(99), Some(id(1)));
        assert_eq!(n.version_of(100), None);
        // Rewriting the same chunk again replaces the middle run; neighbours with equal ids merge.
        let o = n.updated(100 * C, &[40..41], id(1)).unwrap();
        assert_eq!(o.runs(), VersionMap::whole(100 * C, id(1)).runs());
        assert_eq!(o.sealed(), 102);
    }

    #[test]
    fn length_changes_force_the_last_chunks() {
        assert_eq!(must_rewrite(100 * C, 100 * C), 100..100);
        assert_eq!(must_rewrite(100 * C, 100 * C + 1), 99..101); // append: old last chunk and the new one
        assert_eq!(must_rewrite(100 * C + 5, 100 * C + 9), 100..101); // append inside the last chunk
        assert_eq!(must_rewrite(100 * C, 50 * C + 1), 50..51); // shrink: the new last chunk
        assert_eq!(must_rewrite(100 * C, 50 * C), 49..50);
        assert_eq!(must_rewrite(5, 0), 0..1);
        let m = VersionMap::whole(100 * C, id(1));
        // An append that does not seal the old last chunk again is refused.
        assert_eq!(m.updated(100 * C + 1, &[100..101], id(2)), Err(CryptoError::MustRewrite { chunk: 99 }));
        let n = m.updated(100 * C + 1, &[99..101], id(2)).unwrap();
        assert_eq!(n.runs(), &[Run { first: 0, version: id(1) }, Run { first: 99, version: id(2) }]);
        // A shrink must seal the new last chunk; chunks past the end vanish.
        assert_eq!(m.updated(50 * C + 1, &[], id(2)), Err(CryptoError::MustRewrite { chunk: 50 }));
        let s = n.updated(50 * C + 1, &[50..51], id(3)).unwrap();
        assert_eq!(s.runs(), &[Run { first: 0, version: id(1) }, Run { first: 50, version: id(3) }]);
        // Extension past a gap: every new chunk must be sealed.
        assert_eq!(m.updated(200 * C, &[99..150], id(2)), Err(CryptoError::MustRewrite { chunk: 150 }));
    }

    #[test]
    fn the_data_key_wears_out_after_2_to_the_32_sealed_chunks() {
        let mut m = VersionMap::whole(100 * C, id(1));
        m.sealed = MAX_SEALED_CHUNKS - 2;
        let n = m.updated(100 * C, &[5..6, 5..7], id(2)).unwrap();
        assert_eq!(n.sealed(), MAX_SEALED_CHUNKS, "overlapping ranges count once");
        assert_eq!(n.updated(100 * C, &[5..6], id(3)), Err(CryptoError::DataKeyExhausted { sealed: MAX_SEALED_CHUNKS + 1 }));
    }

    #[test]
    fn too_many_runs_is_refused() {
        let mut m = VersionMap::whole(1000 * C, id(0));
        for k in 0..15u8 {
            let at = u64::from(k) * 10 + 5;
            m = m.updated(1000 * C, &[at..at + 1], id(k + 1)).unwrap();
        }
        assert_eq!(m.runs().len(), 31);
        assert_eq!(m.updated(1000 * C, &[500..501], id(99)), Err(CryptoError::VersionMapFull { runs: 33 }));
    }

    #[test]
    fn bodies_round_trip_and_only_canonical_ones_decode() {
        let m = VersionMap::whole(100 * C, id(1)).updated(100 * C, &[3..7, 50..60], id(2)).unwrap();
        let body = m.encode_body();
        assert_eq!(body.len(), MAP_FIXED_LEN + 5 * RUN_LEN);
        assert_eq!(m.sealed(), 100 + 4 + 10);
        assert_eq!(VersionMap::decode_body(&body, 100 * C), Ok(m.clone()));
        let bad = |b: &[u8]| VersionMap::decode_body(b, 100 * C).is_err();
        assert!(bad(&[]));
        assert!(bad(&body[..body.len() - 1]));
        let mut zero_count = body.clone();
        zero_count[0] = 0;
        assert!(bad(&zero_count));
        let mut not_from_zero = body.clone();
        not_from_zero[8] = 1;
        assert!(bad(&not_from_zero));
        // A run past the end of a shorter file, and two neighbours with one id.
        assert!(VersionMap::decode_body(&body, 55 * C).is_err());
        let mut few_sealed = body.clone();
        few_sealed[1..9].copy_from_slice(&99u64.to_be_bytes());
        assert!(bad(&few_sealed));
        let same = VersionMap { plain_len: 100 * C, sealed: 100, runs: vec![Run { first: 0, version: id(1) }, Run { first: 5, version: id(1) }] };
        assert!(bad(&same.encode_body()));
    }

    proptest! {
        /// Whatever is rewritten, the new map gives the new id to exactly the rewritten chunks and the old id to
        /// every other, and it round-trips through its encoding.
        #[test]
        fn updated_maps_say_who_sealed_each_chunk(
            old in 0..40u64, new in 0..40u64, tail_old in 0..3u64, tail_new in 0..3u64,
            marks in proptest::collection::vec((0..45u64, 1..6u64), 0..5),
        ) {
            let old_len = old * C + tail_old * 1000;
            let new_len = new * C + tail_new * 1000;
            let base = VersionMap::whole(old_len, id(1)).updated(old_len, &[(old / 2)..(old / 2 + 1)], id(7)).unwrap();
            let mut rewritten: Vec<Range<u64>> = marks.iter().map(|&(s, l)| s..s + l).collect();
            rewritten.push(must_rewrite(old_len, new_len));
            let count = chunk_count(new_len);
            let old_count = chunk_count(old_len);
            // Everything past the old end must be rewritten too.
            rewritten.push(old_count.min(count)..count);
            let m = base.updated(new_len, &rewritten, id(9)).unwrap();
            for i in 0..count {
                let is_new = rewritten.iter().any(|r| r.contains(&i));
                let expect = if is_new { id(9) } else { base.version_of(i).unwrap() };
                prop_assert_eq!(m.version_of(i), Some(expect), "chunk {}", i);
            }
            prop_assert_eq!(m.version_of(count), None);
            prop_assert_eq!(VersionMap::decode_body(&m.encode_body(), new_len), Ok(m));
        }
    }
}
