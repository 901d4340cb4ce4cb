//! Write conditions looked up ahead of the upload, on servers that ignore them.
//!
//! Every upload is conditional on the version it replaces ("nothing there" for a new file; docs/SEMANTICS.md). Where
//! the server ignores conditional headers (Garage), the store backend checks the condition itself with a HEAD just
//! before the PUT (or the multipart completion), which puts a whole round trip in front of every close(): on Garage
//! about a sixth of what a small file costs. A file this mount creates (or opens with O_TRUNC, as `cp` over a file
//! does) sends that HEAD then instead, while the application is still writing ([`Backend::head_ahead`]); the
//! backend lets its answer stand for the upload's check if the upload comes within 0.5 s of it, once. The upload
//! still carries its condition, and whatever that answer does not confirm (another version found, no answer, a later
//! upload) is checked as before, so a conflict is still found and this mount's data saved beside.
//!
//! What changes is only the moment in which another writer can still be overwritten on such a server: from that HEAD
//! to the write, which was a round trip and is now at most 0.5 s more. Servers that check conditions never get here
//! ([`Backend::conditions_checked_by_head`] is false for them).

use std::sync::Arc;

use crate::store::{Backend, ObjectKey};

/// Sends the HEAD of `path` ahead of its upload, in the background, where the store checks write conditions with
/// one; nothing elsewhere or for a name that is no key.
pub fn send(backend: &Arc<dyn Backend>, path: &str) {
    if !backend.conditions_checked_by_head() {
        return;
    }
    let Ok(key) = ObjectKey::new(path) else { return };
    let backend = backend.clone();
    tokio::spawn(async move { backend.head_ahead(&key).await });
}
