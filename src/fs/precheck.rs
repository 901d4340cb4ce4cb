//! Write conditions looked up ahead of the upload, on servers that ignore them.
//!
//! Every upload is conditional on the version it replaces ("nothing there" for a new file; docs/SEMANTICS.md). Where
//! the server ignores conditional headers (Garage), the store backend checks the condition itself with a HEAD just
//! before the PUT, which puts a whole round trip in front of every close(): on Garage about a sixth of what a small
//! file costs. A file this mount creates (or opens with O_TRUNC, as `cp` over a file does) sends that HEAD then
//! instead, while the application is still writing; its upload goes without a HEAD of its own when the answer
//! confirmed the condition and was asked less than [`TRUSTED_FOR`] before. Anything else (the answer disagrees or
//! failed, it is older, the file was renamed meanwhile) leaves the upload to check as before, so a conflict is still
//! found and this mount's data saved beside.
//!
//! What changes is only the moment in which another writer can still be overwritten on such a server: from that HEAD
//! to the write, which was a round trip and is now at most [`TRUSTED_FOR`] more. Servers that check conditions never
//! get here ([`Backend::conditions_checked_by_head`] is false for them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::store::{Backend, Expect, ObjectKey, StoreError};

/// How long the answer of a HEAD sent ahead stands for the condition of an upload. Small files written by `cp`,
/// `tar`, `rsync` or an editor's save are closed well within it; a file kept open longer is checked at its upload.
pub const TRUSTED_FOR: Duration = Duration::from_millis(500);

/// A HEAD of a file's key sent ahead of its upload: what the store held there (an ETag, or nothing).
pub struct Precheck {
    path: String,
    sent: Instant,
    answer: JoinHandle<Result<Option<String>, StoreError>>,
}

impl Precheck {
    /// Sends the HEAD of `path` in the background where the store's write conditions are checked with one; `None`
    /// elsewhere (nothing to gain) or for a name that is no key.
    pub fn send(backend: &Arc<dyn Backend>, path: &str) -> Option<Precheck> {
        if !backend.conditions_checked_by_head() {
            return None;
        }
        let key = ObjectKey::new(path).ok()?;
        let backend = backend.clone();
        let sent = Instant::now();
        let answer = tokio::spawn(async move {
            match backend.head(&key).await {
                Ok((info, _)) => Ok(Some(info.etag.unwrap_or_default())),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        });
        Some(Precheck { path: path.to_string(), sent, answer })
    }

    /// The condition an upload of `path` expecting `expect` must still have checked: [`Expect::Any`] when this HEAD
    /// found exactly what it expects, for that path, less than [`TRUSTED_FOR`] ago; otherwise `expect` itself.
    pub async fn condition_left(mut self, path: &str, expect: &Expect) -> Expect {
        if self.path != path || *expect == Expect::Any || self.sent.elapsed() > TRUSTED_FOR {
            return expect.clone();
        }
        let found = match (&mut self.answer).await {
            Ok(Ok(found)) => found,
            _ => return expect.clone(),
        };
        let confirmed = match (expect, &found) {
            (Expect::Absent, None) => true,
            (Expect::Etag(want), Some(etag)) => want == etag,
            _ => false,
        };
        if confirmed && self.sent.elapsed() <= TRUSTED_FOR {
            Expect::Any
        } else {
            expect.clone()
        }
    }
}

impl Drop for Precheck {
    /// An answer nobody will read is not waited for (a finished one: nothing happens).
    fn drop(&mut self) {
        self.answer.abort();
    }
}
