//! The inode table and the listings held for open directories inside the daemon's memory budget (`max_memory`).
//!
//! What the filesystem keeps for names (not data) is estimated — [`inode::NODE_BYTES`](super::inode::NODE_BYTES) per
//! node plus its name, [`ENTRY_BYTES`] per entry of a listing held by an open directory handle plus its name,
//! [`NEGATIVE_BYTES`] per remembered missing name — and reported to the budget after every change of the table
//! ([`Fs::account`]). The budget takes it from the page cache's share first; past [`METADATA_SHARE`] of the budget the
//! table is trimmed ([`Fs::trim`]) down to three quarters of that share:
//!
//! 1. nodes nobody refers to are dropped: entries of listings that the kernel never looked up (`ls` without `-l`,
//!    `find -name`), whose directory then no longer counts as fully known (a lookup there asks the store);
//! 2. if that is not enough, the kernel is asked to forget names it holds for clean, closed files, oldest attributes
//!    first (`FUSE_NOTIFY_INVAL_ENTRY`); the kernel answers with FORGET for the ones no process uses, and those nodes
//!    go like any forgotten node. A name the kernel forgot costs a lookup when used again, nothing else.
//!
//! Never dropped: a node with staged data, an open handle, children in the table, or one this mount created and has
//! not stored yet; the listing of an open directory handle (it is what readdir answers from); the root.
//!
//! [`METADATA_SHARE`]: crate::memory::METADATA_SHARE

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{lock, DirEntry, Fs};
use crate::store::{Listing, ObjectInfo, ObjectKey};

/// Estimated bytes of one entry of a listing held by an open directory handle, beside its name: the `DirEntry`
/// (inode, name string, kind: 40 bytes) and the allocator's overhead for the name.
pub const ENTRY_BYTES: u64 = 56;
/// Estimated bytes of one remembered missing name (the negative-lookup memo, at most 10,000 names), beside its name.
pub const NEGATIVE_BYTES: u64 = 96;
/// Least time between two trims: a trim walks the whole table, and the kernel's FORGETs for the names it was asked
/// to forget arrive asynchronously, so until they do the table stays over its share and asking again would only name
/// the same nodes. Meanwhile the table grows by at most what 100 ms of lookups add (a few thousand nodes).
const TRIM_INTERVAL: Duration = Duration::from_millis(100);

/// Asks the kernel to forget one name (parent inode, name): `FUSE_NOTIFY_INVAL_ENTRY`, set by `run` from the FUSE
/// session. Called on a thread of its own, never on the FUSE loop.
pub type NameForgetter = Arc<dyn Fn(u64, &OsStr) + Send + Sync>;

/// Estimated memory of a listing held by a directory handle.
pub fn listing_bytes(entries: &[DirEntry]) -> u64 {
    entries.iter().map(|e| ENTRY_BYTES + e.name.len() as u64).sum()
}

/// Estimated memory of a listing from the store while [`Fs::list_dir`] merges it: each object's record, key and ETag
/// (with the allocator's overhead for the two strings), each prefix, and one merge row per name.
pub fn merge_bytes(listing: &Listing, rows: usize) -> u64 {
    const STRING_OVERHEAD: usize = 16;
    let objects: usize = listing
        .objects
        .iter()
        .map(|o| {
            std::mem::size_of::<ObjectInfo>()
                + o.key.as_str().len()
                + o.etag.as_ref().map_or(0, |e| e.len())
                + 2 * STRING_OVERHEAD
        })
        .sum();
    let prefixes: usize =
        listing.prefixes.iter().map(|p| std::mem::size_of::<ObjectKey>() + p.as_str().len() + STRING_OVERHEAD).sum();
    (objects + prefixes + rows * MERGE_ROW_BYTES) as u64
}

/// One row of [`Fs::list_dir`]'s merge: a borrowed name, a kind, a position.
const MERGE_ROW_BYTES: usize = 24;

impl Fs {
    /// Sets how the kernel is asked to forget names (once; later calls are ignored). Without it, trimming only
    /// drops nodes nobody refers to.
    pub fn set_name_forgetter(&self, forget: NameForgetter) {
        let _ = self.forgetter.set(forget);
    }

    /// The estimate of what the table, the held listings and the negative memo take now.
    pub fn metadata_bytes(&self) -> u64 {
        let table = lock(&self.table).bytes();
        let negative: u64 = lock(&self.negative).keys().map(|(_, name)| NEGATIVE_BYTES + name.len() as u64).sum();
        table + self.held_listings.load(Ordering::Acquire) + negative
    }

    /// Reports the metadata estimate to the memory budget, and trims the table if it is over its share.
    pub(super) fn account(&self) {
        let table = lock(&self.table).bytes();
        // The negative memo is bounded (10,000 names) and small: counted by its length, without walking it.
        let negative = lock(&self.negative).len() as u64 * (NEGATIVE_BYTES + 16);
        let total = table + self.held_listings.load(Ordering::Acquire) + negative;
        if self.cache.memory().set_metadata(total) {
            self.trim();
        }
    }

    /// Brings the table back under three quarters of its share of the budget (see the module docs).
    fn trim(&self) {
        {
            let mut last = lock(&self.last_trim);
            if last.is_some_and(|t| t.elapsed() < TRIM_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let memory = self.cache.memory();
        let target = memory.metadata_share() / 4 * 3;
        let others = memory.metadata().saturating_sub(lock(&self.table).bytes());
        let table_target = target.saturating_sub(others);
        let (dropped, left, candidates) = {
            let mut table = lock(&self.table);
            let dropped = table.drop_unreferenced(table_target);
            let left = table.bytes();
            let candidates = if left > table_target && self.forgetter.get().is_some() {
                let n = (left - table_target).div_ceil(super::inode::NODE_BYTES) as usize;
                table.forget_candidates(n)
            } else {
                Vec::new()
            };
            (dropped, left, candidates)
        };
        if dropped > 0 || !candidates.is_empty() {
            tracing::debug!(dropped, asked_to_forget = candidates.len(), table_bytes = left, "trimmed the inode table to the memory budget");
        }
        memory.set_metadata(left + others);
        if candidates.is_empty() {
            return;
        }
        // The kernel takes the directory's lock to drop a name, which a lookup in flight there holds until this
        // daemon answers it: never on the FUSE loop or a runtime worker.
        let Some(forget) = self.forgetter.get().cloned() else { return };
        let spawned = std::thread::Builder::new().name("forget-names".into()).spawn(move || {
            for (parent, name) in candidates {
                forget(parent, OsStr::new(&name));
            }
        });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "could not start a thread to ask the kernel to forget names");
        }
    }
}
