//! Write conditions looked up ahead of the upload, on servers that ignore them.
//!
//! Every upload is conditional on the version it replaces ("nothing there" for a new file; docs/SEMANTICS.md). Where
//! the server ignores conditional headers (Garage), the store backend checks the condition itself with a HEAD just
//! before the PUT (or the multipart completion), which puts a whole round trip in front of every close(): on Garage
//! about a sixth of what a small file costs. A file this mount creates (or opens with O_TRUNC, as `cp` over a file
//! does) sends that HEAD then instead, while the application is still writing. The file's next upload takes its
//! answer ([`Precheck::answer`], waited for if still on its way, so it always saw the store before that upload
//! began) and runs with it ([`crate::store::with_prechecked`]): the backend's check lets it stand for its own HEAD
//! if the check comes within 0.5 s of that HEAD being sent, and judges it exactly as its own HEAD (another version
//! found refuses the upload). The upload still carries its condition header. No answer, another path, or a later
//! check asks as before. A name whose delete is still to be sent gets no HEAD ahead (the upload waits for that
//! delete, then asks the store itself).
//!
//! What changes is only the moment in which another writer can still be overwritten on such a server: from that HEAD
//! to the write, which was a round trip and is now at most 0.5 s. Servers that check conditions never get here
//! ([`Backend::conditions_checked_by_head`] is false for them).
//!
//! A file created in a directory whose every name this mount knows from a listing asked for less than 0.5 s before
//! sends no HEAD ahead: that listing already answered the create's lookup (the name is not there), and it stands
//! for a HEAD sent when the listing was asked for ([`Precheck::known_absent`]), under the same 0.5 s bound counted
//! from then (a close later than that asks at the upload). What this mount's own mkdir knows stands for none: it may
//! come from older knowledge of the parent. Past 0.5 s, the next create in a small directory in use lists it again
//! first (`Fs::renew_names_for_creates`), waiting at most a second for that. A burst of creates (`cp -r`, an
//! unpacked archive) then costs one PUT per file instead of a HEAD and a PUT: 2,000 files of 4 KiB on Garage sent
//! 2 HEADs and about 10 listings instead of 2,002 HEADs.

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::store::{Backend, ObjectKey, Prechecked, StoreError, PRECHECK_TRUSTED};

/// A HEAD of a file's key sent ahead of its upload: what the store held there (an ETag, or nothing).
pub struct Precheck {
    path: String,
    sent: Instant,
    /// `None`: nothing there, known without asking ([`Precheck::known_absent`]).
    answer: Option<JoinHandle<Result<Option<String>, StoreError>>>,
}

impl Precheck {
    /// Sends the HEAD of `path` in the background where the store's write conditions are checked with one; `None`
    /// elsewhere (nothing to gain), for a name that is no key, or when `pending_delete` (see the module notes).
    pub fn send(
        backend: &Arc<dyn Backend>,
        path: &str,
        pending_delete: impl FnOnce(&ObjectKey) -> bool,
    ) -> Option<Precheck> {
        if !backend.conditions_checked_by_head() {
            return None;
        }
        let key = ObjectKey::new(path).ok()?;
        if pending_delete(&key) {
            return None;
        }
        let backend = backend.clone();
        let sent = Instant::now();
        let answer = tokio::spawn(async move {
            match backend.head(&key).await {
                Ok((info, _)) => Ok(Some(info.etag.unwrap_or_default())),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        });
        Some(Precheck { path: path.to_string(), sent, answer: Some(answer) })
    }

    /// Where the store's write conditions are checked with a HEAD: "nothing at `path`", known without asking from
    /// the mount's knowledge of every name of its directory, which was asked for at `asked` and has no such name (see
    /// the module notes). `None` when that knowledge is older than [`PRECHECK_TRUSTED`] (it could not stand), for a
    /// name that is no key, or when `pending_delete`: then [`Precheck::send`] asks.
    pub fn known_absent(
        backend: &Arc<dyn Backend>,
        path: &str,
        asked: Instant,
        pending_delete: impl FnOnce(&ObjectKey) -> bool,
    ) -> Option<Precheck> {
        if !backend.conditions_checked_by_head() || asked.elapsed() >= PRECHECK_TRUSTED {
            return None;
        }
        if pending_delete(&ObjectKey::new(path).ok()?) {
            return None;
        }
        Some(Precheck { path: path.to_string(), sent: asked, answer: None })
    }

    /// The answer, for an upload of `path` about to start: `None` for another path, a HEAD that failed, or one not
    /// answered within [`PRECHECK_TRUSTED`] of its sending (waiting longer is pointless: such an answer could not
    /// stand, and a hung store would otherwise cost the upload this wait and then its own HEAD's).
    pub async fn answer(mut self, path: &str) -> Option<Prechecked> {
        if self.path != path {
            return None;
        }
        let found = match &mut self.answer {
            None => None,
            Some(answer) => {
                let deadline = tokio::time::Instant::from_std(self.sent + PRECHECK_TRUSTED);
                tokio::time::timeout_at(deadline, answer).await.ok()?.ok()?.ok()?
            }
        };
        Some(Prechecked { key: self.path.clone(), sent: self.sent, found })
    }
}

impl Drop for Precheck {
    /// An answer nobody will read is not waited for (a finished one: nothing happens).
    fn drop(&mut self) {
        if let Some(answer) = &self.answer {
            answer.abort();
        }
    }
}
