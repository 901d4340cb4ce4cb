//! Facade over object storage: the only way the filesystem reads, writes and lists objects.
//!
//! It knows nothing of FUSE or cryptography: it moves opaque bytes plus a small metadata map
//! ([`UserMeta`]) under keys relative to the mount prefix ([`ObjectKey`]). Two backends implement
//! [`Backend`], both used as `Arc<dyn Backend>`:
//!
//! - [`ObjectStoreBackend`] over any `object_store::ObjectStore` — S3 and Azure through object_store's clients,
//!   Google Cloud Storage through our own JSON-API client (`gcs.rs`), `InMemory` in tests. Metadata travels as
//!   `x-amz-meta-*` headers with s3fs-compatible names (each provider's user metadata elsewhere).
//! - [`LocalBackend`] for `file:///dir` — objects are plain files, metadata is one extended
//!   attribute, directory markers are real directories.
//!
//! Build one from a mount URL with [`from_url`].
//!
//! Invariants shared by both backends (the conformance tests in `tests.rs` run one body against
//! both):
//! - A key ending in `/` is a *directory marker*; it has size 0 and carries the directory's
//!   metadata. Non-recursive listings show directories as `prefixes`; recursive listings return
//!   the markers as objects (including the listed directory's own) so a caller can move or
//!   delete a tree.
//! - Deleting a missing key succeeds; reading one fails with [`StoreError::NotFound`].
//! - Writes can be conditional ([`Expect`]: nothing at the key, or still the version with this ETag); a mismatch is
//!   [`StoreError::Precondition`] and changes nothing. S3 checks the condition itself; the local store emulates it
//!   (see `local.rs` for what that can and cannot exclude).
//! - `ObjectInfo::etag` changes whenever the content is rewritten, so caches keyed by
//!   (key, etag) never serve stale data.
//!
//! Where the backends differ (documented on each): the local store has implicit markers for
//! every parent directory of a file (a directory exists once it has a file) and refuses to
//! remove a non-empty marker; S3 only has the markers that were written and never refuses.

mod azure;
mod conditional;
mod deadline;
mod dirfd;
mod error;
mod gcs;
mod local;
mod meta;
mod object;
mod profile;
mod raw;
mod s3;
mod sse;
mod ssec;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use error::{BoxError, StoreError};
pub use local::{LocalBackend, LOCAL_MAX_PATH_LEN};
pub use object::ObjectStoreBackend;
pub use profile::{load_profile, parse_profile, ProfileSettings};
pub use s3::{from_url, signed_client, S3Options, StoreUrl, DEFAULT_REQUEST_TIMEOUT};
pub use sse::{ServerSideEncryption, SseEcho};
pub use ssec::{key_md5, CustomerKeyStores, CustomerKeys, TaggedKey, KEY_MD5_TAG};

/// Names no key segment may use, because the backends use them internally: the local store's
/// staging directory and the object-store file standing in for a directory marker.
pub(crate) const LOCAL_TMP_DIR: &str = ".s3cryptfs-tmp";
pub(crate) const MARKER_FILE: &str = ".s3cryptfs-dir";

/// A key relative to the mount prefix: `/`-separated, never starting with `/`, no empty, `.` or
/// `..` segments, no control characters; a trailing `/` marks a directory marker.
///
/// Validated on construction so neither backend can be led outside its root or prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Validate `key`. Fails with [`StoreError::InvalidInput`] for the empty key, a leading `/`,
    /// empty/`.`/`..` segments, control characters (including NUL) and reserved names.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        check_key(&key)?;
        Ok(ObjectKey(key))
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for directory markers (`a/b/`).
    pub fn is_dir_marker(&self) -> bool {
        self.0.ends_with('/')
    }

    /// The key without a trailing `/`: the path of the file or directory it names.
    pub(crate) fn trimmed(&self) -> &str {
        self.0.strip_suffix('/').unwrap_or(&self.0)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ObjectKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |why: &str| {
        Err(StoreError::invalid(format!(
            "invalid object key {key:?}: {why}"
        )))
    };
    if key.is_empty() {
        return bad("it is empty");
    }
    if key.starts_with('/') {
        return bad("it starts with '/'");
    }
    let body = key.strip_suffix('/').unwrap_or(key);
    for seg in body.split('/') {
        if seg.is_empty() {
            return bad("it has an empty segment");
        }
        if seg == "." || seg == ".." {
            return bad("'.' and '..' segments are not allowed");
        }
        if seg.chars().any(|c| c.is_control()) {
            return bad("control characters are not allowed");
        }
        if seg == LOCAL_TMP_DIR || seg == MARKER_FILE {
            return bad("the name is reserved by s3cryptfs");
        }
    }
    Ok(())
}

/// Validate a listing directory: `""` (the root) or a marker key such as `a/b/`.
pub(crate) fn check_dir(dir: &str) -> Result<Option<ObjectKey>, StoreError> {
    if dir.is_empty() {
        return Ok(None);
    }
    let key = ObjectKey::new(dir)?;
    if !key.is_dir_marker() {
        return Err(StoreError::invalid(format!(
            "listing directory {dir:?} must be empty or end with '/'"
        )));
    }
    Ok(Some(key))
}

/// What a listing or a head tells about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: ObjectKey,
    /// Size of the whole object in bytes (0 for markers).
    pub size: u64,
    /// Changes whenever the content is rewritten; `None` only if the store gives none.
    pub etag: Option<String>,
    /// Store-side modification time. After `put` it is the client clock at completion, because
    /// S3's PUT response carries no date worth a second round trip.
    pub last_modified: SystemTime,
}

/// POSIX attributes and extra fields kept beside each object; see `meta.rs` for the wire names.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct UserMeta {
    /// Full `st_mode` including the file type bits, as s3fs writes it.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// (seconds since the epoch, nanoseconds < 1e9).
    pub mtime: Option<(i64, u32)>,
    /// Further fields, stored as `x-amz-meta-<name>`: lower-case names, printable ASCII values.
    pub extra: BTreeMap<String, String>,
}

/// What a HEAD sent ahead of a write found at the write's key (an ETag, or nothing), and when it was sent
/// (`fs::precheck`).
#[derive(Clone, Debug)]
pub struct Prechecked {
    pub key: String,
    pub sent: std::time::Instant,
    pub found: Option<String>,
}

/// How long a [`Prechecked`] answer stands for a write's condition, counted from when its HEAD was sent to the moment
/// the write is checked (just before the PUT or the multipart completion).
pub const PRECHECK_TRUSTED: std::time::Duration = std::time::Duration::from_millis(500);

tokio::task_local! {
    static PRECHECKED: Prechecked;
}

/// Runs `write` (one upload) with `answer` standing, where a backend checks write conditions with a HEAD, for that
/// HEAD if the check of its key comes within [`PRECHECK_TRUSTED`] of `answer.sent`. The write still carries its
/// condition. Only this task sees it: the write's own check, never another's.
pub async fn with_prechecked<F: std::future::Future>(answer: Option<Prechecked>, write: F) -> F::Output {
    match answer {
        Some(a) => PRECHECKED.scope(a, write).await,
        None => write.await,
    }
}

/// What a HEAD sent ahead found at `key`, if one stands for this task's write of it now.
pub(crate) fn prechecked_for(key: &str) -> Option<Option<String>> {
    PRECHECKED
        .try_with(|p| (p.key == key && p.sent.elapsed() <= PRECHECK_TRUSTED).then(|| p.found.clone()))
        .ok()
        .flatten()
}

/// What a write expects to find at its key (a conditional write); a mismatch is StoreError::Precondition and nothing changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Unconditional.
    Any,
    /// Nothing may exist at the key (S3: If-None-Match: *).
    Absent,
    /// The object must still be the version with this ETag (S3: If-Match).
    Etag(String),
}

/// Result of [`Backend::list`]; both vectors are sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    /// Sub-directories (`a/b/`), only in non-recursive listings.
    pub prefixes: Vec<ObjectKey>,
}

/// Result of [`Backend::list_page`]: one request's worth of a directory's listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Objects under the directory (in its subdirectories too: the page is not split at `/`) whose keys come after
    /// the page's start, in key order; markers as `a/b/` keys.
    pub objects: Vec<ObjectInfo>,
    /// Whether the page reaches the end of the directory; if not, it covers keys up to its last object's only.
    pub complete: bool,
}

/// Result of [`Backend::list_children_page`]: one request's worth of a directory's non-recursive listing.
#[derive(Clone, Debug, Default)]
pub struct ChildPage {
    /// Direct children, as [`Backend::list`] gives them, in key order.
    pub listing: Listing,
    /// The token that asks for the next page; `None`: this page reaches the end of the directory.
    pub next: Option<String>,
}

/// Objects in one page of a listing: what one ListObjectsV2 request returns at most (S3's `max-keys` default).
pub const LIST_PAGE: usize = 1000;

/// A GET's body as it arrives, piece by piece (see [`Backend::get_range_stream`]).
pub type BodyStream = futures::stream::BoxStream<'static, Result<Bytes, StoreError>>;

/// The delete that ends a [`Backend::rename_if`] once `from` is copied: conditional on the version `etag` moved.
/// `Ok(false)` when another version was there by then: what another writer stored meanwhile stays. Nothing there
/// (deleted meanwhile, or by an earlier try of this very delete) is `Ok(true)`: nothing stays under the old name.
pub async fn delete_moved<B: Backend + ?Sized>(backend: &B, from: &ObjectKey, etag: &str) -> Result<bool, StoreError> {
    match backend.delete_if(from, etag).await {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(true),
        Err(e) if e.is_precondition() => Ok(false),
        Err(e) => Err(e),
    }
}

/// The storage operations the filesystem needs. All keys are relative to the mount prefix.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Size, etag and metadata of one object; [`StoreError::NotFound`] if it is missing.
    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError>;

    /// Bytes `range` of the object, clipped at its end (a range starting at or past the end
    /// yields empty bytes). `ObjectInfo::size` is the whole object's size.
    async fn get_range(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError>;

    /// [`Backend::get_range`] with the body as it arrives instead of collected into one buffer: a reader that
    /// decrypts or copies it anyway saves a copy of every byte (and the faults of a fresh multi-MiB buffer). The
    /// stream may end early if the object is shorter than asked for, and its pieces may fail (a broken connection, a
    /// deadline). By default, `get_range`'s bytes as one piece.
    async fn get_range_stream(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        let (bytes, info, meta) = self.get_range(key, range).await?;
        Ok((Box::pin(futures::stream::once(async move { Ok(bytes) })), info, meta))
    }

    /// Whether [`Backend::get_range_stream`] hands the body over in pieces as the connection delivers them (the
    /// object_store backends: S3, GCS, Azure), rather than the default's one piece collected whole (the local store):
    /// a reader that consumes the pieces as they come then holds little of the body at a time.
    fn streams_bodies(&self) -> bool {
        false
    }

    /// Whether the multipart uploads that [`Backend::put_multipart_expect`] makes with an ETag condition can copy
    /// parts ([`Upload::copies_parts`]): whether a large file can be changed in place (`crate::inplace`) here at all.
    /// Known from the store's kind and settings, so that a caller asks before it starts an upload that would only be
    /// aborted (S3 with SSE-C, GCS, Azure cannot).
    fn copies_parts(&self) -> bool {
        false
    }

    /// The whole object.
    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError>;

    /// [`Backend::get`] answered as soon as its headers arrive, the body following as it arrives: a reader can act
    /// on the object's metadata while the body is on its way (a directory's index names where its listing can be
    /// cut before its entries arrive, `fs::listing`). By default, `get`'s bytes as one piece.
    async fn get_stream(&self, key: &ObjectKey) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        let (bytes, info, meta) = self.get(key).await?;
        Ok((Box::pin(futures::stream::once(async move { Ok(bytes) })), info, meta))
    }

    /// Create or replace the object atomically (readers see the old or the new one, never a mix):
    /// [`Backend::put_expect`] with [`Expect::Any`].
    async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
    ) -> Result<ObjectInfo, StoreError> {
        self.put_expect(key, body, meta, &Expect::Any).await
    }

    /// Create or replace the object atomically, provided the key holds what `expect` says; otherwise
    /// [`StoreError::Precondition`] and nothing changed. An [`Expect::Etag`] whose object is gone is a precondition
    /// failure too (as S3's If-Match), not `NotFound`.
    async fn put_expect(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<ObjectInfo, StoreError>;

    /// Start a multipart upload: [`Backend::put_multipart_expect`] with [`Expect::Any`].
    async fn put_multipart(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
    ) -> Result<Box<dyn Upload>, StoreError> {
        self.put_multipart_expect(key, meta, &Expect::Any).await
    }

    /// Start a multipart upload; nothing is visible until [`Upload::complete`]. On S3 every part
    /// except the last must be at least 5 MiB. `expect` is checked by `complete` (S3: CompleteMultipartUpload with
    /// If-Match / If-None-Match), which fails with [`StoreError::Precondition`] and publishes nothing on a mismatch;
    /// the parts are discarded then (the caller need not abort).
    async fn put_multipart_expect(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<Box<dyn Upload>, StoreError>;

    /// Discard the parts of the multipart upload `upload_id` ([`Upload::upload_id`]) of `key` that a process which
    /// died before completing or aborting it left open: how a start cleans up after a daemon killed mid-stream. An
    /// upload that no longer exists (completed, aborted, expired) is not an error. S3: AbortMultipartUpload. The
    /// local store: its staged file is removed. The default says the backend cannot (it names no upload ids).
    async fn abort_multipart(&self, key: &ObjectKey, upload_id: &str) -> Result<(), StoreError> {
        let _ = upload_id;
        Err(StoreError::Unsupported { operation: format!("aborting a multipart upload of {key} by its id") })
    }

    /// Copy `from` to `to`; `meta: None` keeps the source metadata.
    async fn copy(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
    ) -> Result<(), StoreError>;

    /// Move `from` to `to`. The default is copy then delete (not atomic: after a crash both may
    /// exist); backends with a native rename override it.
    async fn rename(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
    ) -> Result<(), StoreError> {
        self.copy(from, to, meta).await?;
        self.delete(from).await
    }

    /// [`Backend::rename`] of the version `etag` names, where a rename is a copy and a delete (S3): the delete of
    /// `from` is conditional on that version ([`Backend::delete_if`]), so another writer's upload of `from` that lands
    /// between the copy and the delete stays, under the old name (a store that ignores conditional deletes removes
    /// it, as [`Backend::rename`] does). On S3 without an SSE mode, with `meta`, the copy is conditional too
    /// ([`StoreError::Precondition`], nothing moved, when `from` is no longer that version); elsewhere the copy takes
    /// whatever version is there. Returns false when another version stayed under the old name. The default is that
    /// copy and [`delete_moved`]; a store whose rename is one step (the local store) has no such moment and renames.
    async fn rename_if(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
        etag: &str,
    ) -> Result<bool, StoreError> {
        self.copy(from, to, meta).await?;
        delete_moved(self, from, etag).await
    }

    /// Replace the metadata, keeping the content.
    async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta)
        -> Result<ObjectInfo, StoreError>;

    /// Replace the metadata, keeping the content, provided the object is still the version `etag` names; otherwise
    /// [`StoreError::Precondition`] and nothing changed. A missing object is [`StoreError::NotFound`]. Key rotation
    /// (`rekey`) uses it to swap the wrapped data key of an S3 Encryption Client object, which lives in its metadata.
    ///
    /// S3: a HEAD (for the content headers to keep) and a CopyObject onto itself with `x-amz-metadata-directive:
    /// REPLACE` and `x-amz-copy-source-if-match`, so no content passes through the client; tags are kept. Elsewhere a
    /// GET of that version and a PUT conditional on it. Local store: the metadata attribute is rewritten under the
    /// store's write lock after the ETag check on the very file it is written to.
    ///
    /// What the ETag cannot show: a metadata-only change. S3 keeps an object's ETag (the MD5 of its content) across a
    /// metadata replacement, and the local store's ETag ignores its metadata attribute, so a concurrent metadata-only
    /// change (a chmod through a mount) between the caller's read and this call is not detected, and is overwritten.
    /// Returns the object as it is now (its ETag may change: S3 gives a copy of a multipart object a new one) and
    /// what it cost. The default says the backend cannot (test doubles that have no use for it).
    async fn update_meta_if(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        etag: &str,
    ) -> Result<(ObjectInfo, Transfer), StoreError> {
        let _ = (meta, etag);
        Err(StoreError::Unsupported { operation: format!("replacing the metadata of {key} conditionally") })
    }

    /// Remove the object; a missing key is not an error.
    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError>;

    /// Remove the object only if it is still the version `etag` names: [`StoreError::Precondition`] if another
    /// version is there, [`StoreError::NotFound`] if nothing is, and nothing changed in either case. One request
    /// where the store checks the condition itself (S3's DeleteObject with `If-Match`; the local store checks under
    /// its write lock). A store that cannot make a delete conditional (LocalStack answers 501, object_store's
    /// `InMemory` has no such call) removes the object unconditionally, as [`Backend::delete`]: the default. Callers
    /// use it to learn cheaply that what they are deleting is what they know, not as a lock.
    async fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        let _ = etag;
        self.delete(key).await
    }

    /// Remove every object of `keys` (missing ones are not an error), in as few requests as the store allows:
    /// S3's DeleteObjects takes up to 1,000 keys (callers send at most that many). Unconditional, like
    /// [`Backend::delete`]. An error means some of the keys may be gone and others not; deleting them again one by one
    /// is safe. The default deletes one by one.
    async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        for k in keys {
            self.delete(k).await?;
        }
        Ok(())
    }

    /// Whether [`Backend::delete_if`] is checked by the store (as far as known now): false once a store has shown it
    /// ignores the condition, and for stores that never check it (the default).
    fn deletes_are_conditional(&self) -> bool {
        false
    }

    /// List `dir` (`""` or `a/b/`). Non-recursive: direct children as objects and
    /// sub-directories as prefixes, all pages. Recursive: every object under `dir`, markers
    /// included, prefixes empty. A missing directory lists as empty.
    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError>;

    /// One request's worth of `dir`'s listing (`""` or `a/b/`): the objects under it, in its subdirectories too,
    /// whose keys come after `start_after` (a key under `dir`, or `dir` itself for the first page), in key order, at
    /// most [`LIST_PAGE`]: on S3 one ListObjectsV2 request with `start-after`, however large the directory is. The
    /// default lists the whole directory (one page, complete).
    async fn list_page(&self, dir: &str, start_after: &str) -> Result<Page, StoreError> {
        let l = self.list(dir, true).await?;
        let objects = l.objects.into_iter().filter(|o| o.key.as_str() > start_after).collect();
        Ok(Page { objects, complete: true })
    }

    /// One request's worth of `dir`'s non-recursive listing (the listing [`Backend::list`] returns whole): direct
    /// children whose keys (relative to the mount root) come after `after` (`None`: from the start) — or, given a
    /// `token` from a page before, the page after that one. A caller that knows a large directory's names lists
    /// ranges of it in parallel with this (`fs::listing`). Only where [`Backend::lists_from_keys`] says the store can
    /// start a listing at a key (S3 and S3-compatible servers); elsewhere `Unsupported`.
    async fn list_children_page(
        &self,
        dir: &str,
        after: Option<&str>,
        token: Option<&str>,
    ) -> Result<ChildPage, StoreError> {
        let _ = (after, token);
        Err(StoreError::Unsupported { operation: format!("listing {dir} from a key") })
    }

    /// Whether [`Backend::list_children_page`] can start a listing at a key (S3-compatible stores: true).
    fn lists_from_keys(&self) -> bool {
        false
    }

    /// Whether any object (a marker included) exists under `dir` (`a/b/`): how a directory without a marker of its
    /// own is recognised. Backends should answer with one small request, not a full listing.
    async fn has_children(&self, dir: &str) -> Result<bool, StoreError> {
        let l = self.list(dir, false).await?;
        Ok(!l.objects.is_empty() || !l.prefixes.is_empty())
    }

    /// Whether this store's write conditions are checked with a HEAD just before each conditional write because the
    /// server ignores them (found by [`Backend::probe_conditional_writes`]); callers may then send that HEAD sooner
    /// and let its answer stand for the write's own check ([`with_prechecked`], `fs::precheck`). False for stores
    /// that hold conditions themselves (the default).
    fn conditions_checked_by_head(&self) -> bool {
        false
    }

    /// Finds out once, at a read-write mount, whether the server holds write conditions (`If-None-Match: *`,
    /// `If-Match`); where it does not (or the probe cannot tell), the backend checks them with a HEAD before each
    /// conditional write from then on. It also finds out whether the server checks `If-Match` on a delete; where it
    /// does not, deletes go out in batches ([`Backend::deletes_are_conditional`] turns false). Five or six requests
    /// on a short-lived object. Stores that always hold them do nothing.
    async fn probe_conditional_writes(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A cheap request proving the bucket/directory exists and the credentials work; run at
    /// mount so a misconfiguration fails fast with a clear message.
    async fn check_access(&self) -> Result<(), StoreError>;

    /// The longest path (a key relative to the mount prefix, without a trailing `/`) this store can hold for a file,
    /// or for a directory when `dir` (whose marker may add to the key): names longer than this are refused up front
    /// with ENAMETOOLONG rather than failing at upload. S3: 1,024 bytes less the prefix (and the marker's name);
    /// the local store: [`LOCAL_MAX_PATH_LEN`], whatever its root.
    fn max_path_len(&self, dir: bool) -> usize {
        let _ = dir;
        usize::MAX
    }

    /// Whether a HEAD costs about what a `stat` does (the local store: a stat and a getxattr on the local disk), so
    /// keeping objects' metadata in per-directory index objects (`fs::dirindex`) would cost more than it saves.
    fn heads_are_cheap(&self) -> bool {
        false
    }

    /// Replace the first `head.len()` bytes of the object with `head`, keeping the rest of its content, its metadata
    /// and (on S3) its tags, provided it is still the version `etag` names; otherwise
    /// [`StoreError::Precondition`] and nothing changed. Key rotation (`rekey`) uses it to swap an object's header.
    ///
    /// S3: one conditional PUT (objects up to 5 MiB) or one multipart upload completed with `If-Match` whose first
    /// part is uploaded and whose other parts are server-side copies of the object itself, so readers see the old or
    /// the new object, never a mix. Local store: the bytes are written in place (see `LocalBackend`). The default
    /// says the backend cannot.
    async fn replace_head(&self, key: &ObjectKey, etag: &str, head: Bytes) -> Result<Transfer, StoreError> {
        let _ = (etag, head);
        Err(StoreError::Unsupported { operation: format!("replacing the first bytes of {key} in place") })
    }

    /// SSE-C: which key of the history encrypts the object, found by its key-MD5 tag (no key needed) or, for an
    /// object without one, by trying each key with a HEAD. Only S3 backends in mode sse-c can answer.
    async fn customer_key_of(&self, key: &ObjectKey) -> Result<CustomerKeyOf, StoreError> {
        Err(StoreError::Unsupported { operation: format!("finding the SSE-C key of {key} (needs mode=sse-c on S3)") })
    }

    /// SSE-C: re-encrypt the object server-side under the writing key (the first of the history), keeping its
    /// content, metadata and other tags and replacing its key-MD5 tag: one CopyObject onto itself with the old key as
    /// copy-source key, conditional on `etag`. At most 5 GiB (CopyObject's limit). `of` comes from
    /// [`Backend::customer_key_of`].
    async fn move_to_writing_key(
        &self,
        key: &ObjectKey,
        of: &CustomerKeyOf,
        etag: &str,
        size: u64,
    ) -> Result<Transfer, StoreError> {
        let _ = (of, etag, size);
        Err(StoreError::Unsupported { operation: format!("re-encrypting {key} under another SSE-C key") })
    }
}

/// What one maintenance operation cost: requests sent to the store and body bytes moved through this client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub requests: u64,
    /// Bytes downloaded (response bodies).
    pub bytes_down: u64,
    /// Bytes uploaded (request bodies; for the local store, bytes written).
    pub bytes_up: u64,
}

impl std::ops::AddAssign for Transfer {
    fn add_assign(&mut self, other: Transfer) {
        self.requests += other.requests;
        self.bytes_down += other.bytes_down;
        self.bytes_up += other.bytes_up;
    }
}

/// Which SSE-C key of the history encrypts an object ([`Backend::customer_key_of`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerKeyOf {
    /// Index in the key history (0 = the writing key); `None` when no key of the history opens it.
    pub index: Option<usize>,
    /// The key MD5 the object's tag names, if it has the tag.
    pub tagged_md5: Option<String>,
    /// All the object's tags, so a re-encryption can keep the others.
    pub tags: Vec<(String, String)>,
    /// What finding out cost.
    pub cost: Transfer,
}

/// An upload in progress. Dropping it without `complete` or `abort` leaves no visible object
/// (on S3 the parts linger until a lifecycle rule removes them: prefer `abort`).
#[async_trait]
pub trait Upload: Send {
    /// The store's name of this upload, for [`Backend::abort_multipart`] after a crash: S3's UploadId, the local
    /// store's staged file. `None` when the store holds nothing until `complete` (parts kept in memory) or the id is
    /// not known (object_store's own uploads, which S3 never uses).
    fn upload_id(&self) -> Option<String> {
        None
    }
    /// Append the next part. The part's place is fixed when this is called; the returned future sends it, and
    /// several such futures may run at once (the caller bounds how many) before `complete`.
    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>>;
    /// Whether [`Upload::copy_part`] may copy (`false`: it always answers [`StoreError::Unsupported`]), so that a
    /// caller that cannot do without copies gives up before it sends anything.
    fn copies_parts(&self) -> bool {
        false
    }
    /// Append the next part as bytes `range` of the object at this upload's own key, copied inside the store (S3
    /// UploadPartCopy; the local store copies the file range), only if that object is still the version `etag`:
    /// otherwise [`StoreError::Precondition`] (or `NotFound` when it is gone; a server may also call the range
    /// invalid when the object was replaced by a shorter one, as LocalStack does, so a caller that sees an error
    /// asks the store what is there now before it retries). This is how a large object changed
    /// in place keeps its untouched ranges without moving them over the network. As with `put_part`, every part
    /// but the last must be at least 5 MiB on S3, and the part's place is fixed when this is called. A store that
    /// cannot copy answers [`StoreError::Unsupported`] and the upload is unchanged (the caller then sends those
    /// bytes with `put_part`, or gives up the in-place update).
    fn copy_part(&mut self, range: Range<u64>, etag: &str) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        let _ = (range, etag);
        Box::pin(futures::future::ready(Err(StoreError::Unsupported {
            operation: "copying a range of the object into a multipart upload".into(),
        })))
    }
    /// Publish the object made of all parts.
    async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError>;
    /// Discard all parts.
    async fn abort(self: Box<Self>) -> Result<(), StoreError>;
}

/// The body of an HTTP answer, at most `max_len` bytes of it: error answers are short, and a hostile endpoint's
/// endless one is cut off (the raw requests of `gcs.rs` and `azure.rs`).
pub(crate) async fn read_capped(resp: object_store::client::HttpResponse, max_len: usize) -> Vec<u8> {
    use futures::StreamExt;
    let mut text = Vec::new();
    let mut body = resp.into_body().bytes_stream();
    while let Some(piece) = body.next().await {
        match piece {
            Ok(piece) if text.len() < max_len => text.extend_from_slice(&piece),
            _ => break,
        }
    }
    text.truncate(max_len);
    text
}

/// Sort a listing so both backends return the same order.
pub(crate) fn sort_listing(l: &mut Listing) {
    l.objects.sort_by(|a, b| a.key.cmp(&b.key));
    l.prefixes.sort();
    l.prefixes.dedup();
}
