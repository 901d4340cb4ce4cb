//! Listing a large directory in parallel.
//!
//! S3 returns a listing 1,000 keys per request, each request naming the token the one before returned, so a
//! directory of N entries costs N/1,000 round trips one after the other. The directory's index (`fs::dirindex`)
//! names its files in key order. With those names the key space is cut into ranges of about a page each —
//! (start, k1], (k1, k2], …, (kn, end) — and all of them are listed at once, each from `start-after` its lower bound
//! and paged on until past its upper bound. Whatever changed since the index was written, the ranges together cover
//! every key exactly once: the index only decides where the cuts are, never what is listed. A stale index makes a
//! range longer (more pages in it), not wrong.
//!
//! The index is read at the same time as the first page, which is also the first range's first page: a directory
//! that fits one page waits for nothing more than before, and the GET of the index that `dirindex::apply_index`
//! would send after the listing is this one. Its writer also names the cuts in its metadata ([`CUTS_META`]), so the
//! other ranges start when the GET's headers are in, not after its whole body (~90 bytes per file).
//!
//! A directory whose last listing showed no index, or whose files all have fresh attributes (nothing to read the
//! index for), is listed page after page without it, as stores that cannot start a listing at a key (everything but
//! S3-compatible ones) always are.

use std::sync::Arc;

use super::dirindex::{self, Entry, IndexRead};
use super::{lock, FileKind, Fs};
use crate::store::{Backend, Listing, StoreError, UserMeta};

/// Names per range: a page (1,000 keys) less room for the directory's marker, its index and a few newcomers.
const RANGE_NAMES: usize = 990;
/// Listing requests of one directory in flight at once, at most.
const PAGES_IN_FLIGHT: usize = 8;

impl Fs {
    /// Directory `dir`'s listing (its key prefix: `prefix`) and what it got of the directory's index, which it reads
    /// on the way when `with_index` and worth it.
    pub(super) async fn list_children(
        &self,
        dir: u64,
        prefix: &str,
        with_index: bool,
    ) -> Result<(Listing, IndexRead), StoreError> {
        if !with_index || !self.backend.lists_from_keys() || !self.index_reads() || !self.index_worth_reading(dir) {
            return Ok((self.backend.list(prefix, false).await?, IndexRead::NotTried));
        }
        // Every range in a task of its own: its requests go out, and its pages are parsed, while this task opens
        // the index and the other ranges run.
        let slots = Arc::new(tokio::sync::Semaphore::new(PAGES_IN_FLIGHT));
        // The first range starts before its end is known (the first cut, from the index): told when it is.
        let (first_until, until_rx) = tokio::sync::watch::channel(None);
        let first = tokio::spawn(range(self.backend.clone(), slots.clone(), prefix.to_string(), None, until_rx));
        let start = |cuts: Vec<String>| -> Vec<RangeTask> {
            first_until.send_replace(Some(cuts.first().cloned()));
            (0..cuts.len())
                .map(|i| {
                    let until = tokio::sync::watch::channel(Some(cuts.get(i + 1).cloned())).1;
                    let after = Some(cuts[i].clone());
                    tokio::spawn(range(self.backend.clone(), slots.clone(), prefix.to_string(), after, until))
                })
                .collect()
        };
        // The cuts come with the index's headers (an index written by this version) or else from its entries.
        let key = dirindex::index_key(prefix.trim_end_matches('/'));
        let mut ranges = None;
        let entries = self.read_index_seeing(&key, |meta| ranges = cuts_from_meta(prefix, meta).map(start)).await;
        let ranges = match ranges {
            Some(started) => started,
            None => start(entries.as_deref().map(|e| cuts(prefix, e)).unwrap_or_default()),
        };
        let mut listing = joined(first).await?;
        for r in ranges {
            let part = joined(r).await?;
            listing.objects.extend(part.objects);
            listing.prefixes.extend(part.prefixes);
        }
        Ok((listing, entries.map_or(IndexRead::Unusable, IndexRead::Read)))
    }

    /// Whether listing `dir` now should read its index on the way: not when its last listing showed none, nor when
    /// every file of it this mount knows has fresh attributes (then `apply_index` would not read it either).
    fn index_worth_reading(&self, dir: u64) -> bool {
        if self.index_absent(dir) {
            return false;
        }
        let table = lock(&self.table);
        let children = table.children_of(dir);
        children.is_empty()
            || children.iter().any(|&c| {
                table.get(c).is_some_and(|n| n.kind != FileKind::Dir && n.write.is_none() && !self.fresh(n))
            })
    }
}

/// The upper bounds of all ranges but the last: the key (under `prefix`) of every `RANGE_NAMES`th name of the
/// index, in order. None when the names are not strictly ascending (an index not written by this code): one range.
fn cuts(prefix: &str, entries: &[Entry]) -> Vec<String> {
    if !cuttable(entries) {
        return Vec::new();
    }
    cut_names(entries, RANGE_NAMES).map(|n| format!("{prefix}{n}")).collect()
}

/// Whether `entries` can place cuts: names strictly ascending and none with a `/` (it could split a subdirectory's
/// prefix between two ranges).
fn cuttable(entries: &[Entry]) -> bool {
    !entries.windows(2).any(|w| w[0].name >= w[1].name) && !entries.iter().any(|e| e.name.contains('/'))
}

/// Every `step`th name of `entries` (which are [`cuttable`]).
fn cut_names(entries: &[Entry], step: usize) -> impl Iterator<Item = &str> {
    entries.iter().skip(step - 1).step_by(step).map(|e| e.name.as_str())
}

/// The index's metadata field that names its cuts, so that a reader can start every range as soon as the index's
/// headers are in instead of after its whole body (~90 bytes per file): the names, percent-encoded, joined by `/`.
/// Like the index's cuts, they only decide where ranges meet, never what is listed: a wrong or forged list costs
/// requests (at most [`MAX_CUTS`] + 1 ranges), not names.
pub(super) const CUTS_META: &str = "s3cryptfs-cuts";
/// Bytes the cuts may take in the index's metadata: S3 allows 2 KiB for all of it (the rest is the mode and, in the
/// client-side modes, the path binding). Cuts that would not fit are taken every 2, 4, … pages.
const CUTS_META_MAX: usize = 1024;
/// Cuts read from an index's metadata, at most; more and the field is ignored.
const MAX_CUTS: usize = 128;
/// Bytes of a name kept as they are in [`CUTS_META`]; every other byte is `%XX` (so never `/`).
const NAME_AS_IS: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// [`CUTS_META`]'s value for an index of `entries`: every `RANGE_NAMES`th name, or every 2nd, 4th, … such name if
/// that is what fits. None when there is nothing to cut (one page) or no spacing fits.
pub(super) fn cuts_meta(entries: &[Entry]) -> Option<String> {
    if !cuttable(entries) {
        return None;
    }
    let mut step = RANGE_NAMES;
    while step <= entries.len() {
        let names: Vec<String> = cut_names(entries, step)
            .map(|n| percent_encoding::utf8_percent_encode(n, NAME_AS_IS).to_string())
            .collect();
        if names.is_empty() {
            return None;
        }
        let value = names.join("/");
        if value.len() <= CUTS_META_MAX && names.len() <= MAX_CUTS {
            return Some(value);
        }
        step *= 2;
    }
    None
}

/// The cuts (keys under `prefix`) an index's metadata names; None when it names none, or names them in any form
/// [`cuts_meta`] does not write (not strictly ascending, a `/` or bad UTF-8 in a name, too many).
fn cuts_from_meta(prefix: &str, meta: &UserMeta) -> Option<Vec<String>> {
    let value = meta.extra.get(CUTS_META)?;
    let mut cuts: Vec<String> = Vec::new();
    for part in value.split('/') {
        let name = percent_encoding::percent_decode_str(part).decode_utf8().ok()?;
        if name.is_empty() || name.contains('/') || cuts.len() == MAX_CUTS {
            return None;
        }
        let key = format!("{prefix}{name}");
        if cuts.last().is_some_and(|last| *last >= key) {
            return None;
        }
        cuts.push(key);
    }
    Some(cuts)
}

/// The range (`after`, `until`] of the directory at `prefix` (`after` `None`: from the start, `until` `None`: to the
/// end), page after page until past `until`; the entries past it are left out (the next range has them). `until`
/// comes through a channel: the first range starts before it is known, and waits for it after its first page
/// (`Some`: known; a channel closed before is an unbounded range).
async fn range(
    backend: Arc<dyn Backend>,
    slots: Arc<tokio::sync::Semaphore>,
    prefix: String,
    after: Option<String>,
    mut until: tokio::sync::watch::Receiver<Option<Option<String>>>,
) -> Result<Listing, StoreError> {
    let mut page = {
        let _slot = slots.acquire().await;
        backend.list_children_page(&prefix, after.as_deref(), None).await?
    };
    let until = match until.wait_for(Option::is_some).await {
        Ok(known) => known.clone().flatten(),
        Err(_) => None,
    };
    let mut out = Listing::default();
    loop {
        let past = |k: &str| until.as_deref().is_some_and(|u| k > u);
        let passed = page.listing.objects.iter().any(|o| past(o.key.as_str()))
            || page.listing.prefixes.iter().any(|p| past(p.as_str()));
        out.objects.extend(page.listing.objects.into_iter().filter(|o| !past(o.key.as_str())));
        out.prefixes.extend(page.listing.prefixes.into_iter().filter(|p| !past(p.as_str())));
        let next = match page.next {
            Some(token) if !passed => token,
            _ => return Ok(out),
        };
        let _slot = slots.acquire().await;
        page = backend.list_children_page(&prefix, None, Some(&next)).await?;
    }
}

/// A range task's result; a panic in it is passed on.
async fn joined(task: RangeTask) -> Result<Listing, StoreError> {
    match task.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => {
            Err(StoreError::Unavailable { detail: "the listing was cancelled (shutting down)".into(), source: None })
        }
    }
}

type RangeTask = tokio::task::JoinHandle<Result<Listing, StoreError>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::dirindex::Identity;

    fn entry(name: &str) -> Entry {
        Entry {
            name: name.into(),
            identity: Identity { etag: String::new(), size: 0, modified: 0 },
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            rdev: 0,
            format: Default::default(),
            target: Vec::new(),
        }
    }

    #[test]
    fn cuts_fall_on_every_990th_name_and_only_on_an_ordered_index() {
        let mut names: Vec<String> = (0..2500).map(|i| format!("f{i:05}")).collect();
        names.sort();
        let entries: Vec<Entry> = names.iter().map(|n| entry(n)).collect();
        assert_eq!(cuts("d/", &entries), vec!["d/f00989".to_string(), "d/f01979".to_string()]);
        assert_eq!(cuts("", &entries[..1980]), vec!["f00989".to_string(), "f01979".to_string()]);
        assert!(cuts("d/", &entries[..989]).is_empty(), "one page: no cut");
        let mut shuffled = entries.clone();
        shuffled.swap(10, 2000);
        assert!(cuts("d/", &shuffled).is_empty(), "names out of order: one range");
        let mut twice = entries.clone();
        twice[5].name = twice[4].name.clone();
        assert!(cuts("d/", &twice).is_empty(), "a name twice: one range");
        let mut nested = entries;
        nested[3].name = "f00002/x".into();
        assert!(cuts("d/", &nested).is_empty(), "a name with a slash: one range");
        assert_eq!(cuts_meta(&nested), None);
    }

    fn meta_with(cuts: &str) -> UserMeta {
        let mut meta = UserMeta::default();
        meta.extra.insert(CUTS_META.into(), cuts.into());
        meta
    }

    #[test]
    fn the_cuts_in_an_index_metadata_are_the_index_cuts_and_fit_its_room() {
        let names: Vec<String> = (0..2500).map(|i| format!("f {i:05} é/")).map(|n| n.replace('/', "%")).collect();
        let entries: Vec<Entry> = names.iter().map(|n| entry(n)).collect();
        let value = cuts_meta(&entries).unwrap();
        assert!(value.bytes().all(|b| b.is_ascii_graphic()), "not a header value: {value}");
        assert_eq!(cuts_from_meta("d/", &meta_with(&value)).unwrap(), cuts("d/", &entries));
        assert_eq!(cuts_meta(&entries[..989]), None, "one page: no cut");
        // Long names: every second (fourth, …) cut, whatever fits.
        let long: Vec<Entry> = (0..40_000).map(|i| entry(&format!("{i:06}{}", "x".repeat(90)))).collect();
        let value = cuts_meta(&long).unwrap();
        assert!(value.len() <= CUTS_META_MAX, "{} bytes", value.len());
        let got = cuts_from_meta("", &meta_with(&value)).unwrap();
        assert_eq!(got, cut_names(&long, RANGE_NAMES * 4).map(String::from).collect::<Vec<_>>());
        // A name too long for the room: no cuts at all.
        let huge: Vec<Entry> = (0..2000).map(|i| entry(&format!("{i:04}{}", "é".repeat(200)))).collect();
        assert_eq!(cuts_meta(&huge), None);
    }

    #[test]
    fn cuts_in_a_form_not_written_here_are_ignored() {
        assert_eq!(cuts_from_meta("d/", &meta_with("a/b%20c")).unwrap(), vec!["d/a".to_string(), "d/b c".into()]);
        let too_many = (0..=MAX_CUTS).map(|i| format!("{i:04}")).collect::<Vec<_>>().join("/");
        for forged in ["b/a", "a/a", "a//b", "", "a/%ff", "a/b%2Fc", &too_many] {
            assert_eq!(cuts_from_meta("d/", &meta_with(forged)), None, "accepted {forged:?}");
        }
        assert_eq!(cuts_from_meta("d/", &UserMeta::default()), None);
    }
}
