//! Renewing what this mount knows about the files of a directory, one page of its listing at a time.
//!
//! Attributes are trusted for `attr_ttl` (docs/SEMANTICS.md, "Consistency between mounts"). A scan of a directory
//! that takes longer than that (`ls -l`, `find -ls`, a `stat` of each name over readdir: 30,000 names take
//! seconds) outlives what its listing told, and each name it reaches afterwards must be confirmed from the store
//! again. Before, that cost a listing of the whole directory (and a GET of its index) per `attr_ttl`, each page of
//! which was as old as the listing when it came back, or a HEAD per file. Here the lookup (or GETATTR) of a file
//! whose attributes this mount read lists one page of the directory from that name on: one request confirms the
//! name and up to [`LIST_PAGE`](crate::store::LIST_PAGE) names after it, in the order readdir gave them, so a scan
//! costs one request per 1,000 entries whatever its speed.
//!
//! What a page renews, per file it shows:
//! - the same identity (ETag, size, LastModified) as the version whose attributes the node holds: the attributes,
//!   under exactly the rule directory index entries are trusted by (`dirindex::vouches`; a metadata-only change
//!   keeps the ETag but not LastModified). The page's request time becomes their confirmation time;
//! - the same ETag and size, another LastModified: only that the name exists (as a full listing does); a GETATTR
//!   then reads the attributes as before;
//! - another version: the node takes its size and forgets its attributes, as after a full listing.
//!
//! Files in the key range the page covers that it does not show are gone: their names are dropped, and their lookup
//! asks the store as before (a listing, or the probe of a name whose kind is unknown). Only on stores with directory indexes (S3): on the local store a metadata change keeps the file's
//! identity (an extended attribute changes, not mtime), and a HEAD there is a stat anyway.

use std::time::Instant;

use super::dirindex::{vouches, Identity};
use super::inode::{FileKind, Remote};
use super::{lock, Fs};

impl Fs {
    /// Whether the lookup of `name` in `dir` is served by [`Fs::renew_page`]: a file whose attributes this mount
    /// read, stale now, in a directory this mount listed (a one-off `stat` elsewhere costs a HEAD, which is cheaper
    /// than a LIST).
    pub(super) fn renewable(&self, dir: u64, name: &str) -> bool {
        if !self.index_reads() || !self.renewals_pay() {
            return false;
        }
        let table = lock(&self.table);
        let listed = table.names(dir).is_some();
        table.child(dir, name).and_then(|c| table.get(c)).is_some_and(|n| {
                (listed || n.listed.is_some())
                    && n.kind != FileKind::Dir
                    && n.write.is_none()
                    && !n.unlinked
                    && n.remote.is_some()
                    && n.validated.is_some()
                    && !self.fresh(n)
            })
    }

    /// Lists one page of `dir` from `name` on and renews what it shows (see the module docs). False when no page was
    /// listed: one is being listed for `dir` already (the caller asks about its own name), or the store failed (the
    /// caller's own request will say how).
    pub(super) async fn renew_page(&self, dir: u64, name: &str) -> bool {
        if !lock(&self.renewing).insert(dir) {
            return false;
        }
        let renewed = self.renew_page_from(dir, name).await;
        lock(&self.renewing).remove(&dir);
        renewed
    }

    async fn renew_page_from(&self, dir: u64, name: &str) -> bool {
        let (prefix, start_after) = {
            let table = lock(&self.table);
            let Some(path) = table.path_of(dir) else { return false };
            let prefix = super::dir_prefix(&path);
            // The page starts after the greatest name below `name` the table knows (S3's start-after excludes its
            // key), so it shows `name` first unless names this mount does not know came between.
            let before = table
                .children_of(dir)
                .into_iter()
                .filter_map(|c| table.get(c))
                .map(|n| n.name.as_str())
                .filter(|n| *n < name)
                .max()
                .map(|b| format!("{prefix}{b}"));
            let start_after = before.unwrap_or_else(|| prefix.clone());
            (prefix, start_after)
        };
        // Deletes under the directory waiting to be sent go first (the listing would wait for them anyway): what is
        // timed from `asked` on is the page alone (see `Fs::renewal_done`).
        self.deletes.settle(&prefix).await;
        let asked = Instant::now();
        let page = match self.backend.list_page(&prefix, &start_after).await {
            Ok(page) => page,
            Err(e) => {
                if e.is_unreachable() {
                    // The lookup or GETATTR then serves what it knows from memory, without asking again.
                    self.note_silent_store(&prefix, &e);
                }
                tracing::debug!(dir = prefix, error = %e, "listing a page of the directory failed; asking about the name");
                return false;
            }
        };
        self.note_store_answers();
        self.renewal_done(asked);
        let (mut renewed, mut changed) = (0usize, 0usize);
        {
            let mut table = lock(&self.table);
            let mut shown = std::collections::HashSet::new();
            for o in &page.objects {
                let Some(rest) = o.key.as_str().strip_prefix(prefix.as_str()) else { continue };
                if rest.is_empty() || rest.contains('/') {
                    continue;
                }
                shown.insert(rest);
                let Some(node) = table.child(dir, rest).and_then(|c| table.get_mut(c)) else { continue };
                if node.kind == FileKind::Dir || node.write.is_some() || node.unlinked {
                    continue;
                }
                let id = Identity::of(o);
                if node.remote.as_ref() != Some(&Remote { etag: id.etag.clone(), stored_size: id.size }) {
                    self.note_listed_change(node, o);
                    changed += 1;
                    continue;
                }
                if node.validated.is_none() {
                    continue;
                }
                node.listed = Some(node.listed.map_or(asked, |t| t.max(asked)));
                if vouches(node, &id) {
                    node.validated = Some(node.validated.map_or(asked, |t| t.max(asked)));
                    renewed += 1;
                }
            }
            // Files of the range the page covers that it does not show are gone (deleted by another writer; perhaps
            // a directory now): their names are dropped, and a lookup asks the store what is there now.
            let end = if page.complete { None } else { page.objects.last().map(|o| o.key.as_str()) };
            let gone: Vec<String> = table
                .children_of(dir)
                .into_iter()
                .filter_map(|c| table.get(c))
                .filter(|n| {
                    let key = format!("{prefix}{}", n.name);
                    n.kind != FileKind::Dir
                        && n.write.is_none()
                        && n.remote.is_some()
                        && !n.unlinked
                        && key > start_after
                        && end.is_none_or(|end| key.as_str() <= end)
                        && !shown.contains(n.name.as_str())
                })
                .map(|n| n.name.clone())
                .collect();
            for name in &gone {
                table.detach(dir, name);
            }
            changed += gone.len();
        }
        tracing::trace!(dir = prefix, shown = page.objects.len(), renewed, changed, "renewed a page of the directory");
        true
    }
}
