//! Write-behind deletes: `unlink` of a file this mount knows returns once the name is gone here, and the store's
//! delete follows in the background, batched.
//!
//! Why: `rm -r` unlinks one name at a time and waits for each, so with a delete per unlink its speed is one store round
//! trip per file (2,000 files cost 2,000 sequential DELETEs). Deferred, the deletes of a burst go out together: as
//! concurrent conditional DELETEs where the store checks `If-Match` (S3), or as DeleteObjects batches of up to 1,000
//! keys where it cannot (then every delete is unconditional anyway, so a batch loses nothing).
//!
//! The promise stays that of a local filesystem with a write-back cache (docs/SEMANTICS.md, "Unlink"):
//! - Everything that asks the store through this layer sees a pending delete as done: a HEAD or GET of the key is
//!   `NotFound`, a copy from it too. So this mount never brings the name back, whatever path it takes.
//! - Anything that would write the key (a PUT, a multipart upload, a copy or rename onto it, a metadata change) waits
//!   until the delete has reached the store first, so a delete can never land after, and remove, a newer object.
//! - A listing or emptiness check of a directory waits for the pending deletes under it: `rmdir` after `rm` of every
//!   file sees the store as it will be, and `readdir` never shows a name that is already gone.
//! - `fsyncdir`, unmount and a clean stop wait for all of them ([`LaterDeletes::settle`]).
//! - The filesystem writes a delete intent into the write journal before it calls [`LaterDeletes::delete_later`]
//!   and forgets it when the store has answered, so a daemon killed before the delete is sent does not bring the
//!   file back: the next start sends it (`Fs::recover`), provided the object is still the version unlinked. An intent
//!   whose delete the store did not answer at all (timed out, unreachable) is kept for the next start too.
//! - A delete the store did not answer may have landed or not. Its intent stays for the next start, until a write
//!   of the same key through this layer lands (a new file under the name, a rename onto it, a metadata change):
//!   the object is then that write's version, which the start must not remove, and where the ETag is the content's
//!   MD5 (modes none and sse-s3) a file written again with the same bytes would look like the version unlinked.
//!   Such a write first sends the delete again (conditional on the version unlinked, as the start would), so a file
//!   created under the name does not find the unlinked one still there.
//! - A delete whose condition fails (another writer replaced the object since this mount knew it) is sent again
//!   unconditionally: `unlink` removes the name, whatever version is behind it (as the synchronous path does after a
//!   new lookup). A delete the store refuses for another reason is logged as an error naming the file, which then
//!   stays in the store.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::store::{
    Backend, BodyStream, CustomerKeyOf, Expect, Listing, ObjectInfo, ObjectKey, Page, StoreError, Transfer, Upload,
    UserMeta,
};

/// Most conditional deletes in flight at once (one request each).
const CONCURRENT_DELETES: usize = 32;
/// Most keys in one DeleteObjects request (S3's limit).
const BATCH_KEYS: usize = 1000;
/// Most DeleteObjects requests in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// A [`Backend`] whose deletes can be deferred ([`LaterDeletes::delete_later`]); every other operation goes to the
/// inner backend, after the pending deletes it depends on (see the module docs).
pub struct LaterDeletes {
    inner: Arc<dyn Backend>,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever pending deletes complete.
    settled: tokio::sync::Notify,
    /// Woken when keys are queued while the worker runs.
    queued: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Key → the delete to send. Sorted, for prefix queries.
    pending: BTreeMap<String, Pending>,
    /// Keys of `pending` no worker has taken yet, in the order they were deleted.
    queued: Vec<String>,
    /// Whether a worker task is running (it exits when `queued` is empty).
    working: bool,
    /// Key → the intents of deletes the store did not answer (timed out: it may have taken them or not). A later
    /// write of the key through this layer settles them: the object is then that write's version, which the
    /// intent's delete, sent by the next start, must not remove (it would, in modes whose ETag is the content's
    /// MD5, if the new content is the same as the unlinked one).
    /// Each with the version the delete named.
    unanswered: BTreeMap<String, Vec<(Option<String>, Answered)>>,
}

/// A delete not yet answered by the store.
struct Pending {
    /// The version known when the file was unlinked (`None`: delete whatever is there).
    etag: Option<String>,
    /// Run once the delete is over, with whether it is settled: true when the store answered (whatever it answered:
    /// the caller forgets its journal intent), false when it did not answer at all (timed out, unreachable: the
    /// intent stays for the next start to send).
    answered: Option<Answered>,
}

/// See [`Pending::answered`].
pub type Answered = Box<dyn FnOnce(bool) + Send>;

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LaterDeletes {
    pub fn new(inner: Arc<dyn Backend>) -> LaterDeletes {
        LaterDeletes {
            inner,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                settled: tokio::sync::Notify::new(),
                queued: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Remove `key` soon: from now on this layer answers as if it were gone. `etag` is the version the caller knows
    /// (the delete is conditional on it where the store can check). Must be called inside a tokio runtime.
    /// `answered` runs once the store has answered.
    pub fn delete_later(&self, key: &ObjectKey, etag: Option<String>, answered: Option<Answered>) {
        let spawn = {
            let mut s = lock(&self.shared.state);
            let earlier = s.pending.insert(key.as_str().to_string(), Pending { etag, answered });
            match earlier {
                // Not possible through the filesystem (a name being deleted is not found, so not unlinked again),
                // but an earlier promise is kept: its intent is settled by the delete now queued.
                Some(Pending { answered: Some(f), .. }) => f(true),
                Some(_) => {}
                None => s.queued.push(key.as_str().to_string()),
            }
            !std::mem::replace(&mut s.working, true)
        };
        if spawn {
            tokio::spawn(work(self.inner.clone(), self.shared.clone()));
        } else {
            self.shared.queued.notify_one();
        }
    }

    /// Deletes not yet confirmed by the store.
    #[cfg(test)]
    fn pending(&self) -> usize {
        lock(&self.shared.state).pending.len()
    }

    /// Whether a delete of a key starting with `prefix` (`""`: any) waits to be answered by the store.
    pub fn pending_under(&self, prefix: &str) -> bool {
        let state = lock(&self.shared.state);
        state.pending.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// Waits until every pending delete of a key starting with `prefix` (`""`: all) has been answered by the store.
    pub async fn settle(&self, prefix: &str) {
        self.wait(|s| s.pending.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))).await
    }

    /// Waits until a pending delete of `key` has been answered by the store (at once if there is none).
    pub async fn settle_key(&self, key: &ObjectKey) {
        self.wait(|s| s.pending.contains_key(key.as_str())).await
    }

    async fn wait(&self, busy: impl Fn(&State) -> bool) {
        loop {
            let notified = self.shared.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !busy(&lock(&self.shared.state)) {
                return;
            }
            notified.await;
        }
    }

    /// Whether a delete of `key` is still to be sent.
    pub(super) fn is_pending(&self, key: &ObjectKey) -> bool {
        lock(&self.shared.state).pending.contains_key(key.as_str())
    }

    /// Before a write of `key`: its pending delete is answered first. A write that creates the key (`creates`: it
    /// expects nothing there) also sends again a delete of it the store did not answer, as the next start would send
    /// it (only while the object is still the version unlinked): without it a file created under the name of one
    /// unlinked while the store was silent would find the old file still there, and be saved beside it as a conflict
    /// copy. Any other write replaces what is there (one conditional on the unlinked version edits that file, which
    /// showed again): nothing is deleted first, and the write settles the intents once it lands.
    async fn before_write(&self, key: &ObjectKey, creates: bool) {
        self.settle_key(key).await;
        if !creates {
            return;
        }
        let taken = lock(&self.shared.state).unanswered.remove(key.as_str()).unwrap_or_default();
        let mut kept = Vec::new();
        for (etag, f) in taken {
            let Some(unlinked) = etag.clone() else {
                kept.push((etag, f));
                continue;
            };
            // Another writer's version since is kept, as the next start would keep it.
            match delete_if_still(&*self.inner, key, &unlinked).await {
                Ok(_) => f(true),
                Err(e) => {
                    let error = crate::error_text::error_chain(&e);
                    tracing::debug!(key = key.as_str(), %error, "the delete of an unlinked file is still not answered");
                    kept.push((etag, f));
                }
            }
        }
        if !kept.is_empty() {
            lock(&self.shared.state).unanswered.entry(key.as_str().to_string()).or_default().extend(kept);
        }
    }

    /// A write of `key` has landed: the intents of its unanswered deletes are settled (see `State::unanswered`).
    fn written(&self, key: &ObjectKey) {
        written(&self.shared, key.as_str());
    }

    /// `result` of a write of `key`, noted (see [`LaterDeletes::written`]).
    fn after_write<T>(&self, key: &ObjectKey, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_ok() {
            self.written(key);
        }
        result
    }

    fn gone(&self, key: &ObjectKey) -> Result<(), StoreError> {
        if self.is_pending(key) {
            return Err(StoreError::NotFound { key: key.as_str().to_string() });
        }
        Ok(())
    }
}

/// What [`delete_if_still`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Resent {
    /// The object was still the version unlinked, and is deleted.
    Deleted,
    /// Nothing was there (any more).
    Gone,
    /// Another version is there, and stays.
    Replaced,
}

/// Sends a delete of `key` that an unlink promised and the store may not have received, only while the object is
/// still the version unlinked (`etag`): one another writer put there since stays. Where the store cannot check the
/// condition itself, the HEAD checks it first (a writer racing that window is the residual case, as for any
/// unconditional delete). Used by a write that creates the key (`LaterDeletes::before_write`) and by the next start
/// (`Fs::recover`).
pub async fn delete_if_still(store: &dyn Backend, key: &ObjectKey, etag: &str) -> Result<Resent, StoreError> {
    match store.head(key).await {
        Err(e) if e.is_not_found() => Ok(Resent::Gone),
        Err(e) => Err(e),
        Ok((info, _)) if info.etag.as_deref() != Some(etag) => Ok(Resent::Replaced),
        Ok(_) => match store.delete_if(key, etag).await {
            Ok(()) => Ok(Resent::Deleted),
            Err(e) if e.is_not_found() => Ok(Resent::Gone),
            Err(e) if e.is_precondition() => Ok(Resent::Replaced),
            Err(e) => Err(e),
        },
    }
}

fn written(shared: &Shared, key: &str) {
    let settled = lock(&shared.state).unanswered.remove(key).unwrap_or_default();
    if !settled.is_empty() {
        tracing::debug!(key, "written again since an unanswered delete: its intent is settled");
    }
    for (_, f) in settled {
        f(true);
    }
}

/// A multipart upload through [`LaterDeletes`]: its completion is a write of its key.
struct Noted {
    inner: Box<dyn Upload>,
    shared: Arc<Shared>,
    key: String,
}

#[async_trait]
impl Upload for Noted {
    fn upload_id(&self) -> Option<String> {
        self.inner.upload_id()
    }
    fn copies_parts(&self) -> bool {
        self.inner.copies_parts()
    }
    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        self.inner.put_part(part)
    }
    fn copy_part(&mut self, r: Range<u64>, etag: &str) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        self.inner.copy_part(r, etag)
    }
    async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        let info = self.inner.complete().await?;
        written(&self.shared, &self.key);
        Ok(info)
    }
    async fn abort(self: Box<Self>) -> Result<(), StoreError> {
        self.inner.abort().await
    }
}

/// The worker: sends what is queued until nothing is, then exits (the next `delete_later` starts another). Where the
/// store checks conditions, each key is one request, up to [`CONCURRENT_DELETES`] at once; elsewhere what is queued
/// goes in DeleteObjects batches, up to [`BATCHES_IN_FLIGHT`] at once, a new one starting as soon as keys arrive
/// and a slot is free. So the last delete of a burst waits for one round trip, not for every batch before it.
async fn work(inner: Arc<dyn Backend>, shared: Arc<Shared>) {
    use futures::stream::FuturesUnordered;
    let conditional = inner.deletes_are_conditional();
    let limit = if conditional { CONCURRENT_DELETES } else { BATCHES_IN_FLIGHT };
    let mut flight = FuturesUnordered::new();
    loop {
        while flight.len() < limit {
            let batch: Vec<(String, Option<String>)> = {
                let mut s = lock(&shared.state);
                let take = if conditional { 1 } else { BATCH_KEYS }.min(s.queued.len());
                if take == 0 {
                    if flight.is_empty() {
                        s.working = false;
                        return;
                    }
                    break;
                }
                let keys: Vec<String> = s.queued.drain(..take).collect();
                keys.into_iter().map(|k| {
                    let etag = s.pending.get(&k).and_then(|p| p.etag.clone());
                    (k, etag)
                }).collect()
            };
            flight.push(send_batch(inner.clone(), batch));
        }
        // A slot is free or keys are waiting for one: whichever comes first.
        let outcome = if flight.len() < limit {
            tokio::select! {
                outcome = flight.next() => outcome,
                _ = shared.queued.notified() => continue,
            }
        } else {
            flight.next().await
        };
        let Some(keys) = outcome else { continue };
        let answered: Vec<Answered> = {
            let mut s = lock(&shared.state);
            let mut now = Vec::new();
            for (k, settled) in keys {
                let Some(Pending { etag, answered: Some(f) }) = s.pending.remove(&k) else { continue };
                if settled {
                    now.push(f);
                } else {
                    s.unanswered.entry(k).or_default().push((etag, f));
                }
            }
            now
        };
        for f in answered {
            f(true);
        }
        shared.settled.notify_waiters();
    }
}

/// Sends one key's delete (`batch` of one) or a DeleteObjects batch (falling back to one by one if the store
/// refuses it); returns each key with whether the store answered.
async fn send_batch(inner: Arc<dyn Backend>, batch: Vec<(String, Option<String>)>) -> Vec<(String, bool)> {
    if let [(k, etag)] = batch.as_slice() {
        return vec![(k.clone(), send_one(&*inner, k, etag.as_deref()).await)];
    }
    let keys: Vec<ObjectKey> = batch.iter().filter_map(|(k, _)| ObjectKey::new(k.as_str()).ok()).collect();
    let mut outcome: Vec<(String, bool)> = batch.iter().map(|(k, _)| (k.clone(), true)).collect();
    if let Err(e) = inner.delete_many(&keys).await {
        tracing::debug!(keys = keys.len(), error = %crate::error_text::error_chain(&e), "a batch delete failed; deleting one by one");
        for ((k, etag), out) in batch.iter().zip(outcome.iter_mut()) {
            out.1 = send_one(&*inner, k, etag.as_deref()).await;
        }
    }
    outcome
}

/// One delete, conditional on `etag` where given; a failed condition deletes what is there instead (see the module
/// docs). Failures are logged: the caller's unlink has returned long ago. Returns whether the store answered (false:
/// it timed out or could not be reached, and the delete is for the next start to send).
async fn send_one(inner: &dyn Backend, key: &str, etag: Option<&str>) -> bool {
    let Ok(k) = ObjectKey::new(key) else { return true };
    let result = match etag {
        Some(etag) => match inner.delete_if(&k, etag).await {
            Err(e) if e.is_precondition() => {
                tracing::debug!(key, "replaced in the store since this mount knew it; deleting the newer version");
                inner.delete(&k).await
            }
            other => other,
        },
        None => inner.delete(&k).await,
    };
    match result {
        Ok(()) => true,
        Err(e) if e.is_not_found() => true,
        Err(e) if e.is_unreachable() => {
            tracing::error!(key, error = %crate::error_text::error_chain(&e), "the store did not answer the delete of an unlinked file: it shows again until a later start of this store sends it (the intent is in the journal)");
            false
        }
        Err(e) => {
            tracing::error!(key, error = %crate::error_text::error_chain(&e), "an unlinked file could not be deleted from the store: it is still there and will show again");
            true
        }
    }
}

#[async_trait]
impl Backend for LaterDeletes {
    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        self.gone(key)?;
        self.inner.head(key).await
    }

    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.gone(key)?;
        self.inner.get_range(key, range).await
    }

    async fn get_range_stream(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        self.gone(key)?;
        self.inner.get_range_stream(key, range).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.gone(key)?;
        self.inner.get(key).await
    }

    async fn get_stream(&self, key: &ObjectKey) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        self.gone(key)?;
        self.inner.get_stream(key).await
    }

    async fn put(&self, key: &ObjectKey, body: Bytes, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
        self.before_write(key, false).await;
        let result = self.inner.put(key, body, meta).await;
        self.after_write(key, result)
    }

    async fn put_expect(&self, key: &ObjectKey, body: Bytes, meta: &UserMeta, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        self.before_write(key, *expect == Expect::Absent).await;
        let result = self.inner.put_expect(key, body, meta, expect).await;
        self.after_write(key, result)
    }

    async fn put_multipart(&self, key: &ObjectKey, meta: &UserMeta) -> Result<Box<dyn Upload>, StoreError> {
        self.before_write(key, false).await;
        let inner = self.inner.put_multipart(key, meta).await?;
        Ok(Box::new(Noted { inner, shared: self.shared.clone(), key: key.as_str().to_string() }))
    }

    async fn put_multipart_expect(&self, key: &ObjectKey, meta: &UserMeta, expect: &Expect) -> Result<Box<dyn Upload>, StoreError> {
        self.before_write(key, *expect == Expect::Absent).await;
        let inner = self.inner.put_multipart_expect(key, meta, expect).await?;
        Ok(Box::new(Noted { inner, shared: self.shared.clone(), key: key.as_str().to_string() }))
    }

    /// Not a write to the key (no object changes): nothing to settle first.
    async fn abort_multipart(&self, key: &ObjectKey, upload_id: &str) -> Result<(), StoreError> {
        self.inner.abort_multipart(key, upload_id).await
    }

    async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
        self.gone(from)?;
        self.before_write(to, false).await;
        let result = self.inner.copy(from, to, meta).await;
        self.after_write(to, result)
    }

    async fn rename(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
        self.gone(from)?;
        self.before_write(to, false).await;
        let result = self.inner.rename(from, to, meta).await;
        self.after_write(to, result)
    }

    async fn rename_if(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
        etag: &str,
    ) -> Result<bool, StoreError> {
        self.gone(from)?;
        self.before_write(to, false).await;
        let result = self.inner.rename_if(from, to, meta, etag).await;
        self.after_write(to, result)
    }

    async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
        self.gone(key)?;
        let result = self.inner.update_meta(key, meta).await;
        self.after_write(key, result)
    }

    async fn update_meta_if(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        etag: &str,
    ) -> Result<(ObjectInfo, Transfer), StoreError> {
        self.gone(key)?;
        let result = self.inner.update_meta_if(key, meta, etag).await;
        self.after_write(key, result)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.settle_key(key).await;
        self.inner.delete(key).await
    }

    async fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        self.settle_key(key).await;
        self.inner.delete_if(key, etag).await
    }

    async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        for k in keys {
            self.settle_key(k).await;
        }
        self.inner.delete_many(keys).await
    }

    fn deletes_are_conditional(&self) -> bool {
        self.inner.deletes_are_conditional()
    }

    fn conditions_checked_by_head(&self) -> bool {
        self.inner.conditions_checked_by_head()
    }

    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
        self.settle(dir).await;
        self.inner.list(dir, recursive).await
    }

    async fn list_page(&self, dir: &str, start_after: &str) -> Result<Page, StoreError> {
        self.settle(dir).await;
        self.inner.list_page(dir, start_after).await
    }

    fn lists_from_keys(&self) -> bool {
        self.inner.lists_from_keys()
    }

    fn streams_bodies(&self) -> bool {
        self.inner.streams_bodies()
    }

    fn copies_parts(&self) -> bool {
        self.inner.copies_parts()
    }

    async fn list_children_page(
        &self,
        dir: &str,
        after: Option<&str>,
        token: Option<&str>,
    ) -> Result<crate::store::ChildPage, StoreError> {
        self.settle(dir).await;
        self.inner.list_children_page(dir, after, token).await
    }

    async fn has_children(&self, dir: &str) -> Result<bool, StoreError> {
        self.settle(dir).await;
        self.inner.has_children(dir).await
    }

    async fn check_access(&self) -> Result<(), StoreError> {
        self.inner.check_access().await
    }
    async fn probe_conditional_writes(&self) -> Result<(), StoreError> {
        self.inner.probe_conditional_writes().await
    }

    fn max_path_len(&self, dir: bool) -> usize {
        self.inner.max_path_len(dir)
    }

    fn heads_are_cheap(&self) -> bool {
        self.inner.heads_are_cheap()
    }

    async fn replace_head(&self, key: &ObjectKey, etag: &str, head: Bytes) -> Result<Transfer, StoreError> {
        self.gone(key)?;
        let result = self.inner.replace_head(key, etag, head).await;
        self.after_write(key, result)
    }

    async fn customer_key_of(&self, key: &ObjectKey) -> Result<CustomerKeyOf, StoreError> {
        self.gone(key)?;
        self.inner.customer_key_of(key).await
    }

    async fn move_to_writing_key(&self, key: &ObjectKey, of: &CustomerKeyOf, etag: &str, size: u64) -> Result<Transfer, StoreError> {
        self.gone(key)?;
        let result = self.inner.move_to_writing_key(key, of, etag, size).await;
        self.after_write(key, result)
    }
}

#[cfg(test)]
mod tests;
