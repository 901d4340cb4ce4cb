//! Listing a directory this mount has not listed once its lookups have cost about what the listing would.
//!
//! Why: a lookup of a name in a directory whose names this mount does not know asks the store. A name of unknown
//! kind costs a probe of three requests (the object, a directory marker, one key under it as a prefix; `Fs::probe`),
//! a known file whose attributes went stale one HEAD. Tools that work through a directory by name without reading
//! it first pay that for every name: `cp -r` or `rsync` over an existing tree, `tar -x` over one, a script that
//! overwrites files it already knows the names of. One listing (a request per 1,000 names, plus the directory's
//! index, which gives the attributes of the files this mount or another wrote) answers all of those lookups from
//! memory, as after an `ls`; a listing less than `attr_ttl` old also spares the HEAD that a store without
//! conditional writes needs before each upload (`fs::precheck`).
//!
//! When: the listing's size is not known before it is taken, and a directory of a million names costs a thousand
//! requests, so a lookup here never pays for more than the lookups before it did. Each lookup that must probe a
//! name of unknown kind adds the probe's three requests to its directory's tally (a known name's lookup, one HEAD,
//! counts nothing: a `stat` of one file in a loop must not get its directory listed); once the tally reaches
//! [`FIRST_TRY`] requests, the directory is listed page by page up to one page per [`REQUESTS_PER_PAGE`] requests of
//! the tally. A listing that needs more, or takes longer than `attr_ttl` (it would be stale once merged), is given
//! up (what it took is lost), and the next try waits until the tally has doubled: the pages given up on stay within
//! what the lookups themselves cost, whatever the directory's size. Not while deletes under the directory wait to
//! be sent (each page would wait for them), nor with `attr_ttl` zero. Nor does a try list more names than
//! the inode table has room for in its share of the memory budget (`fs::trim`). A listing that completes is merged
//! as a readdir's would be, and from then on the directory's knowledge is renewed as any listed directory's is
//! (`Fs::relist_if_worth_it`, `fs::renew`). A directory of up to 1,000 names is listed at its second lookup.
//!
//! Only on stores that can list one page at a time (S3 and S3-compatible ones); on the local store a lookup is a
//! `stat`, cheaper than any listing. While the store is silent nothing is listed here: the lookup asks, and fails,
//! as before.

use std::collections::HashMap;
use std::time::Instant;

use super::{lock, DirEntry, Error, Fs, Relisting, Result};
use crate::store::{Listing, LIST_PAGE};

/// Requests a directory's lookups must have cost before it is listed: two probes of unknown names.
const FIRST_TRY: u64 = 6;
/// What the probe of a name of unknown kind costs: two HEADs and a one-key listing.
const PROBE_REQUESTS: u64 = 3;
/// Requests of lookups one listing page stands for: one page per probe. A page of 1,000 keys takes the store longer
/// than a HEAD, and is billed as a LIST, as the probe's own one-key listing is (on AWS a LIST costs 12.5 HEADs: a
/// probe and a page cost about the same).
const REQUESTS_PER_PAGE: u64 = 3;
/// Directories tallied at most; past that the tally starts again (a directory in use soon reaches its try again).
const MAX_TALLIES: usize = 10_000;

/// What a directory's lookups have cost since this mount last knew its names, and when its listing is tried.
#[derive(Clone, Copy, Debug)]
struct Tally {
    /// Requests the lookups sent (or are about to send).
    spent: u64,
    /// The tally at which the listing is tried next.
    next_try: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { spent: 0, next_try: FIRST_TRY }
    }
}

/// The per-directory tallies.
#[derive(Default)]
pub(super) struct Tallies(std::sync::Mutex<HashMap<u64, Tally>>);

impl Tallies {
    /// Adds `requests` to `dir`'s tally; returns the listing's page bound when it is time to try it.
    fn add(&self, dir: u64, requests: u64) -> Option<usize> {
        let mut map = lock(&self.0);
        if map.len() >= MAX_TALLIES && !map.contains_key(&dir) {
            map.clear();
        }
        let tally = map.entry(dir).or_default();
        tally.spent += requests;
        (tally.spent >= tally.next_try).then(|| usize::try_from(tally.spent / REQUESTS_PER_PAGE).unwrap_or(usize::MAX))
    }

    /// The try for `dir` did not end in knowing its names: the next waits until the tally has doubled.
    fn postpone(&self, dir: u64) {
        if let Some(tally) = lock(&self.0).get_mut(&dir) {
            tally.next_try = tally.spent.saturating_mul(2);
        }
    }

    /// `dir`'s names are known: its tally starts again from nothing.
    fn clear(&self, dir: u64) {
        lock(&self.0).remove(&dir);
    }
}

impl Fs {
    /// A lookup of `name` in `dir` is about to ask the store: counts what it will cost, and lists `dir` instead when
    /// the tally says so (see the module docs). Returns whether the table now knows `dir`'s names; the store's error
    /// when it did not answer the listing in time (noted as silent: the lookup should not wait for it once more).
    pub(super) async fn list_if_lookups_add_up(&self, dir: u64, name: &str) -> Result<bool> {
        if self.backend.heads_are_cheap()
            || !self.backend.lists_from_keys()
            || !self.batches_pay()
            || self.store_recently_silent()
        {
            return Ok(false);
        }
        {
            let table = lock(&self.table);
            // Only names of unknown kind count (a probe's three requests): a known name asks one HEAD, and the same
            // stale file asked about again and again (a `stat` in a loop) must not make its directory listed.
            if table.knows_names(dir, Instant::now()) || table.child(dir, name).is_some() {
                return Ok(false);
            }
        }
        // Not while deletes under the directory wait to be sent: each page would wait for them first.
        let Ok(path) = self.path_of(dir) else { return Ok(false) };
        let prefix = super::dir_prefix(&path);
        if self.deletes.pending_under(&prefix) {
            return Ok(false);
        }
        let Some(paid_for) = self.probing.add(dir, PROBE_REQUESTS) else { return Ok(false) };
        // Nor more names than the table has room for in its share of the memory budget: such a listing could not be
        // merged whole (nothing to answer from), and would be held in memory meanwhile.
        let room = self.table_room(0);
        let max_pages = paid_for.min(usize::try_from(room).unwrap_or(usize::MAX) / LIST_PAGE + 1);
        let Some(listing) = Relisting::start(&self.relisting, dir) else { return Ok(false) };
        let listed = self.list_dir_within(dir, &prefix, max_pages).await;
        drop(listing);
        let known = lock(&self.table).knows_names(dir, Instant::now());
        match listed {
            Ok(Some(entries)) if known => {
                tracing::debug!(dir, entries = entries.len(), "listed a directory whose lookups added up to it");
                self.probing.clear(dir);
                return Ok(true);
            }
            Ok(Some(_)) => {
                // Merged, but not every name found room in the table (the memory budget), or the last page came after
                // `attr_ttl`: nothing to answer from.
            }
            Ok(None) => {
                tracing::debug!(dir, max_pages, "the directory has more names than its lookups cost so far, or takes longer than attr_timeout to list; not listed");
            }
            Err(Error::Store { key, source }) if source.is_unreachable() => {
                self.probing.postpone(dir);
                self.note_silent_store(&key, &source);
                return Err(Error::Store { key, source });
            }
            Err(e) => {
                tracing::debug!(dir, error = %e, "listing the directory failed; asking about the name");
            }
        }
        self.probing.postpone(dir);
        Ok(false)
    }

    /// Lists `dir` a page at a time, at most `max_pages` of them, and merges the listing as [`Fs::list_dir`] does
    /// (without its metadata read-ahead). `None`: the directory has more pages than that, and nothing was merged.
    pub(super) async fn list_dir_within(
        &self,
        dir: u64,
        prefix: &str,
        max_pages: usize,
    ) -> Result<Option<Vec<DirEntry>>> {
        let window = self.listing_window(dir);
        let listed_at = window.at;
        let mut listing = Listing::default();
        let mut token: Option<String> = None;
        for _ in 0..max_pages {
            // A listing that takes longer than `attr_ttl` is known for no time at all once merged: given up. This also
            // bounds what the lookup waits.
            if listed_at.elapsed() >= self.config.attr_ttl {
                return Ok(None);
            }
            let page = self
                .backend
                .list_children_page(prefix, None, token.as_deref())
                .await
                .map_err(|e| Error::store(prefix, e))?;
            self.note_store_answers();
            listing.objects.extend(page.listing.objects);
            listing.prefixes.extend(page.listing.prefixes);
            match page.next {
                Some(next) => token = Some(next),
                None => {
                    let entries =
                        self.merge_listing(dir, prefix, listed_at, &listing, super::IndexRead::NotTried, false).await?;
                    return Ok(Some(entries));
                }
            }
        }
        Ok(None)
    }
}
