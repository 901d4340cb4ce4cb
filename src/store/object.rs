//! [`Backend`] over any `object_store::ObjectStore`: S3 in production, `InMemory` in tests.
//!
//! Keys live under an optional mount prefix (`s3://bucket/some/prefix` → `some/prefix/<key>`).
//! Metadata travels as `Attribute::Metadata(name)`, which the S3 client sends as
//! `x-amz-meta-<name>`; it comes back from `get_opts` (object_store's plain `head()` drops it), so
//! `head` is `get_opts` with `head: true`.
//!
//! Directory markers: object_store's `Path` cannot end in `/` (it strips the slash, so `a/b/`
//! would collide with the file `a/b`), so the marker `a/b/` is stored as the empty object
//! `a/b/.s3cryptfs-dir`. Directories still show up as common prefixes for s3fs and the console,
//! but s3fs-style `a/b/` marker objects written by other tools are not seen as markers (they
//! list as an object `a/b` when listing recursively). A raw signed request would lift this.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, UpdateVersion,
};

use super::error::{chain_text, StoreError};
use super::meta;
use super::{
    check_dir, sort_listing, Backend, Expect, Listing, ObjectInfo, ObjectKey, Page, Upload, UserMeta, LIST_PAGE,
    MARKER_FILE,
};

/// An object store plus the mount prefix all keys live under.
#[derive(Debug, Clone)]
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    /// Server-side encryption every write must be confirmed with (see `sse`).
    sse: Option<super::ServerSideEncryption>,
    /// SSE-C: one client per customer key, and which one opens which object (see `ssec`). `store` and `sse` are
    /// then the writing key's.
    ssec: Option<Arc<super::CustomerKeyStores>>,
    /// Mount prefix without slashes at either end; empty for the bucket root.
    prefix: String,
    /// Signed REST access to the same bucket, for what object_store cannot send (see `raw`); S3 stores only.
    raw: Option<super::raw::RawS3>,
    /// Set once the server answered a conditional delete with 501 (LocalStack): deletes are plain from then on.
    conditional_delete_unsupported: Arc<AtomicBool>,
    /// Set when [`Backend::probe_conditional_writes`] found that the server ignores `If-None-Match` / `If-Match` on
    /// writes (Garage): every conditional write then checks its condition with a HEAD first (see `head_check`).
    conditions_ignored: Arc<AtomicBool>,
    /// HEADs `head_check` sent for a write (not answered by one sent ahead; for tests and diagnostics).
    condition_heads: Arc<AtomicU64>,
    /// The same store's paginated listing (S3 without SSE-C): one page of a directory with a delimiter and a start
    /// ([`Backend::list_page`]). Without it a page is listed without a delimiter.
    pages: Option<Pages>,
    /// Metadata names as identifiers (Azure: letters, digits and `_` only; see `meta::to_identifier`).
    identifier_names: bool,
    /// The store takes an upload's condition in its multipart options (`conditional::UploadCondition`), so conditional
    /// uploads in parts stream instead of being collected in memory (`conditional::BufferedUpload`).
    conditional_uploads: bool,
}

/// Where [`Backend::probe_conditional_writes`] puts its short-lived object: a "directory" under the reserved name of
/// the directory index, which listings never show.
const PROBE_DIR: &str = ".s3cryptfs-index";

/// [`ObjectStoreBackend::with_pages`]'s listing client (which has no `Debug` of its own).
#[derive(Clone)]
struct Pages(Arc<dyn object_store::list::PaginatedListStore>);

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pages")
    }
}

/// The client that served a request, with what its answers must confirm.
struct Keyed {
    store: Arc<dyn ObjectStore>,
    sse: Option<super::ServerSideEncryption>,
    index: usize,
}

/// Appended to "access denied" on writes in mode sse-c.
const SSE_C_BLOCKED_HINT: &str = "with sse-c this also happens when the bucket blocks SSE-C, which new AWS buckets do \
     by default since April 2026: the bucket owner must allow SSE-C in the bucket's default encryption settings";

impl ObjectStoreBackend {
    /// Wrap `store`; `prefix` (e.g. `some/prefix` or `some/prefix/`, or `""`) is prepended to
    /// every key.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Result<Self, StoreError> {
        let prefix = prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            Path::parse(&prefix).map_err(|e| {
                StoreError::invalid(format!("invalid bucket prefix {prefix:?}: {e}"))
            })?;
        }
        Ok(ObjectStoreBackend {
            store,
            sse: None,
            ssec: None,
            prefix,
            raw: None,
            conditional_delete_unsupported: Arc::new(AtomicBool::new(false)),
            conditions_ignored: Arc::new(AtomicBool::new(false)),
            condition_heads: Arc::default(),
            pages: None,
            identifier_names: false,
            conditional_uploads: false,
        })
    }

    /// Stores metadata names as identifiers (Azure Blob Storage refuses `-` and `.` in them).
    pub(crate) fn with_identifier_names(mut self) -> Self {
        self.identifier_names = true;
        self
    }

    /// Sends conditional uploads in parts through the store with their condition (see `conditional_uploads`).
    pub(crate) fn with_conditional_uploads(mut self) -> Self {
        self.conditional_uploads = true;
        self
    }

    /// Lists single pages through `pages`, the same store's paginated listing (see [`Backend::list_page`]).
    pub(crate) fn with_pages(mut self, pages: Arc<dyn object_store::list::PaginatedListStore>) -> Self {
        self.pages = Some(Pages(pages));
        self
    }

    /// Signed REST access to the bucket behind `store`, for the requests object_store cannot send (header rewrites
    /// and SSE-C re-encryption in `rekey`). Without it those fall back to GET + PUT or are unsupported.
    pub(crate) fn with_raw_s3(mut self, raw: super::raw::RawS3) -> Self {
        self.raw = Some(raw);
        self
    }

    /// `replace_head` through object_store: GET the whole object (if its ETag is still `etag`) and PUT it back with
    /// the new first bytes, every attribute it had, and `If-Match`.
    async fn replace_head_by_put(
        &self,
        key: &ObjectKey,
        path: &Path,
        etag: &str,
        head: Bytes,
    ) -> Result<super::Transfer, StoreError> {
        let opts = GetOptions { if_match: Some(etag.to_string()), ..GetOptions::default() };
        let res = self.store.get_opts(path, opts).await.map_err(|e| map_err(e, key.as_str()))?;
        let version = UpdateVersion { e_tag: res.meta.e_tag.clone(), version: res.meta.version.clone() };
        let attributes = res.attributes.clone();
        let body = res.bytes().await.map_err(|e| map_err(e, key.as_str()))?;
        if body.len() < head.len() {
            return Err(StoreError::invalid(format!("{key} is shorter than the {} bytes to replace", head.len())));
        }
        let mut new = body.to_vec();
        new[..head.len()].copy_from_slice(&head);
        let size = new.len() as u64;
        let opts = PutOptions { mode: PutMode::Update(version), attributes, ..PutOptions::default() };
        let res = self
            .store
            .put_opts(path, PutPayload::from(new), opts)
            .await
            .map_err(|e| self.write_error(e, key))?;
        self.check_sse(key, &res.extensions)?;
        Ok(super::Transfer { requests: 2, bytes_down: size, bytes_up: size })
    }

    /// SSE-C with a key history: writes use the first key, reads the key that encrypted the object.
    pub fn with_customer_keys(mut self, stores: super::CustomerKeyStores) -> Self {
        let (store, sse) = stores.writer();
        self.store = store;
        self.sse = Some(sse);
        self.ssec = Some(Arc::new(stores));
        self
    }

    /// Runs `op` with the client whose SSE-C key opens `path` (see `ssec`); without SSE-C, with the only client.
    async fn keyed<T, F, Fut>(&self, key: &ObjectKey, path: &Path, op: F) -> Result<(T, Keyed), StoreError>
    where
        F: Fn(Arc<dyn ObjectStore>) -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let Some(ssec) = &self.ssec else {
            let t = op(self.store.clone()).await.map_err(|e| map_err(e, key.as_str()))?;
            return Ok((t, Keyed { store: self.store.clone(), sse: self.sse.clone(), index: 0 }));
        };
        let p = path.as_ref();
        let first = ssec.first_choice(p);
        let (store, sse) = ssec.client(first);
        let err = match op(store.clone()).await {
            Ok(t) => return Ok((t, Keyed { store, sse: Some(sse), index: first })),
            Err(e @ object_store::Error::NotFound { .. }) => return Err(map_err(e, key.as_str())),
            Err(e) => e,
        };
        let candidates: Vec<usize> = match ssec.tagged_key(p).await {
            super::TaggedKey::Index(i) if i == first => return Err(map_err(err, key.as_str())),
            super::TaggedKey::Index(i) => vec![i],
            super::TaggedKey::NotInHistory(md5) => {
                return Err(StoreError::WrongKey {
                    key: key.to_string(),
                    detail: format!(
                        "it is encrypted with the SSE-C key whose MD5 is {md5}, which is not in the key file \
                         (the server said: {})",
                        chain_text(&err)
                    ),
                })
            }
            // Written by another tool: no fingerprint to go by, so the other keys are tried in order.
            super::TaggedKey::Unknown => {
                let rest: Vec<usize> = (0..ssec.len()).filter(|&i| i != first).collect();
                if !rest.is_empty() {
                    tracing::info!(key = key.as_str(), "object has no SSE-C key tag; trying the other keys of the key file");
                }
                rest
            }
        };
        for i in candidates {
            let (store, sse) = ssec.client(i);
            if let Ok(t) = op(store.clone()).await {
                ssec.remember(p, i);
                return Ok((t, Keyed { store, sse: Some(sse), index: i }));
            }
        }
        Err(match map_err(err, key.as_str()) {
            StoreError::AccessDenied { detail, .. } => StoreError::WrongKey {
                key: key.to_string(),
                detail: format!("no key in the key file opens it with SSE-C, or access is denied ({detail})"),
            },
            StoreError::Other { source, .. } => StoreError::WrongKey {
                key: key.to_string(),
                detail: format!(
                    "no key in the key file opens it with SSE-C, or it is not SSE-C encrypted ({})",
                    chain_text(source.as_ref())
                ),
            },
            other => other,
        })
    }

    /// Adds the SSE-C hint to a refused write.
    fn write_error(&self, e: object_store::Error, key: &ObjectKey) -> StoreError {
        match (map_err(e, key.as_str()), &self.ssec) {
            (StoreError::AccessDenied { key, detail }, Some(_)) => {
                StoreError::AccessDenied { key, detail: format!("{detail}; {SSE_C_BLOCKED_HINT}") }
            }
            (other, _) => other,
        }
    }

    /// Refuse every write whose response does not confirm `sse` (the store must have been built with
    /// `sse::EchoConnector` so that responses carry an `SseEcho`).
    pub fn with_sse(mut self, sse: Option<super::ServerSideEncryption>) -> Self {
        self.sse = sse;
        self
    }

    fn check_sse(&self, key: &ObjectKey, ext: &object_store::Extensions) -> Result<(), StoreError> {
        match &self.sse {
            None => Ok(()),
            Some(sse) => sse.verify(ext.get::<super::SseEcho>()).map_err(|detail| {
                StoreError::EncryptionNotConfirmed { key: key.to_string(), detail }
            }),
        }
    }

    /// Store path of `key`; markers map to their stand-in file.
    fn path(&self, key: &ObjectKey) -> Result<Path, StoreError> {
        let rel = if key.is_dir_marker() {
            format!("{}{MARKER_FILE}", key.as_str())
        } else {
            key.as_str().to_owned()
        };
        self.join(&rel)
    }

    /// Store path of a listing directory (`""` or `a/b/`).
    fn dir_path(&self, dir: &str) -> Result<Path, StoreError> {
        self.join(dir.trim_end_matches('/'))
    }

    /// A non-recursive listing's result as the direct children of `dir_key` (`None`: the mount root): objects
    /// (not the directory's own marker) and subdirectories as `a/b/` keys, unsorted.
    fn children(&self, dir_key: Option<&ObjectKey>, res: &object_store::ListResult) -> Listing {
        let mut out = Listing::default();
        for m in &res.objects {
            match self.key_of(&m.location) {
                // The listed directory's own marker is not one of its children.
                Some(k) if Some(&k) == dir_key => {}
                Some(k) => out.objects.push(Self::info(&k, m)),
                None => {}
            }
        }
        for p in &res.common_prefixes {
            if let Some(k) = self.key_of(p) {
                if let Ok(marker) = ObjectKey::new(format!("{}/", k.as_str())) {
                    out.prefixes.push(marker);
                }
            }
        }
        out
    }

    fn join(&self, rel: &str) -> Result<Path, StoreError> {
        let full = match (self.prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{rel}", self.prefix),
        };
        Path::parse(&full)
            .map_err(|e| StoreError::invalid(format!("key {rel:?} is not a valid store path: {e}")))
    }

    /// Inverse of [`Self::path`]. `None` for paths outside the prefix, the root marker, and
    /// names that are not valid keys (written by other tools), which listings skip.
    fn key_of(&self, path: &Path) -> Option<ObjectKey> {
        let full = path.as_ref();
        let rel = if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?
        };
        let rel = match rel.strip_suffix(MARKER_FILE) {
            Some("") => return None,
            Some(dir) if dir.ends_with('/') => dir,
            _ => rel,
        };
        match ObjectKey::new(rel) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(path = full, error = %e, "skipping object whose name is not a valid key");
                None
            }
        }
    }

    /// One object's info, its ETag in the quoted form HTTP headers carry: Azure lists ETags bare (`0x8D..`) but
    /// answers a HEAD or a write with `"0x8D.."`, and a listing's ETag must compare equal to a HEAD's for the
    /// directory index and the listing-validated lookups to trust it (S3 quotes both already).
    fn info(key: &ObjectKey, m: &ObjectMeta) -> ObjectInfo {
        let etag = m.e_tag.as_ref().map(|e| {
            if e.starts_with('"') || e.starts_with("W/") {
                e.clone()
            } else {
                format!("\"{e}\"")
            }
        });
        ObjectInfo { key: key.clone(), size: m.size, etag, last_modified: m.last_modified.into() }
    }

    async fn get_opts(
        &self,
        key: &ObjectKey,
        opts: GetOptions,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let head = opts.head;
        let (res, info, meta) = self.get_result(key, opts).await?;
        let body = if head {
            Bytes::new()
        } else {
            res.bytes().await.map_err(|e| map_err(e, key.as_str()))?
        };
        Ok((body, info, meta))
    }

    /// The answer to a GET (or HEAD) before its body is read, checked for SSE-C.
    async fn get_result(
        &self,
        key: &ObjectKey,
        opts: GetOptions,
    ) -> Result<(object_store::GetResult, ObjectInfo, UserMeta), StoreError> {
        let path = self.path(key)?;
        let (res, keyed) = self
            .keyed(key, &path, |store| {
                let (path, opts) = (path.clone(), opts.clone());
                async move { store.get_opts(&path, opts).await }
            })
            .await?;
        // With SSE-C the answer must say the server decrypted with the key we sent.
        if let Some(sse @ super::ServerSideEncryption::Customer { .. }) = &keyed.sse {
            sse.verify(res.extensions.get::<super::SseEcho>()).map_err(|detail| {
                StoreError::EncryptionNotConfirmed { key: key.to_string(), detail }
            })?;
        }
        let info = Self::info(key, &res.meta);
        let meta = attrs_to_meta(&res.attributes, self.identifier_names);
        Ok((res, info, meta))
    }

    /// On S3 without a mount-level SSE mode: a CopyObject with new metadata (see [`super::raw::RawS3::copy_with_meta`])
    /// instead of a download and re-upload. `None` means "not here, do it the other way": no raw access (other
    /// stores), an SSE mode (whose headers the copy would have to carry), or a server without CopyObject.
    async fn copy_server_side(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: &UserMeta,
        if_match: Option<&str>,
    ) -> Option<Result<ObjectInfo, StoreError>> {
        let raw = self.raw.as_ref()?;
        if self.sse.is_some() || self.ssec.is_some() || from.is_dir_marker() {
            return None;
        }
        let copied = async {
            let pairs: Vec<(String, String)> = meta::encode(meta)?.into_iter().collect();
            let (src, dst) = (self.path(from)?, self.path(to)?);
            let (etag, size) = raw.copy_with_meta(src.as_ref(), dst.as_ref(), &pairs, if_match).await?;
            Ok(ObjectInfo { key: to.clone(), size, etag, last_modified: SystemTime::now() })
        };
        match copied.await {
            Err(StoreError::Unsupported { .. }) => None,
            other => Some(other),
        }
    }

    /// A multipart upload whose completion is conditional, or any one on S3 (see `conditional.rs`): raw S3 requests
    /// where the store is S3, parts collected in memory for one conditional PUT elsewhere.
    async fn put_multipart_conditional(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<Box<dyn Upload>, StoreError> {
        use super::conditional::{sse_headers, BufferedUpload, RawUpload};
        let Some(raw) = &self.raw else {
            return Ok(Box::new(BufferedUpload {
                backend: self.clone(),
                key: key.clone(),
                meta: meta.clone(),
                expect: expect.clone(),
                body: bytes::BytesMut::new(),
                copies: Vec::new(),
            }));
        };
        let path = self.path(key)?;
        let sse = sse_headers(self.sse.as_ref(), self.ssec.as_deref());
        let mut headers: Vec<(String, String)> =
            meta::encode(meta)?.into_iter().map(|(k, v)| (format!("x-amz-meta-{k}"), v)).collect();
        if let Some(ssec) = &self.ssec {
            let tags: Vec<(String, String)> = vec![(super::KEY_MD5_TAG.to_string(), ssec.key_md5_of(0).to_string())];
            headers.push(("x-amz-tagging".into(), super::raw::tagging_header(&tags)));
        }
        let mut all: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        all.extend(sse.iter().cloned());
        let created = raw.create_multipart(path.as_ref(), &all).await;
        for (_, v) in all.iter_mut() {
            zeroize::Zeroize::zeroize(v);
        }
        let upload_id = created.map_err(|e| match (e, &self.ssec) {
            (StoreError::AccessDenied { key, detail }, Some(_)) => {
                StoreError::AccessDenied { key, detail: format!("{detail}; {SSE_C_BLOCKED_HINT}") }
            }
            (other, _) => other,
        })?;
        if let Some(ssec) = &self.ssec {
            ssec.remember(path.as_ref(), 0);
        }
        let part_headers = if self.ssec.is_some() { sse } else { Vec::new() };
        Ok(Box::new(RawUpload {
            raw: raw.clone(),
            path: path.as_ref().to_string(),
            key: key.clone(),
            upload_id,
            expect: expect.clone(),
            part_headers: Arc::new(part_headers),
            sse: self.sse.clone(),
            head_after: self.ssec.as_ref().map(|_| (self.store.clone(), path.clone())),
            check_first: self.conditions_ignored.load(Ordering::Relaxed).then(|| self.clone()),
            parts: Arc::default(),
            size: 0,
        }))
    }

    pub(crate) async fn put_with(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
        mode: PutMode,
    ) -> Result<ObjectInfo, StoreError> {
        let path = self.path(key)?;
        let size = body.len() as u64;
        if self.conditions_ignored.load(Ordering::Relaxed) {
            self.head_check(key, &mode).await?;
        }
        let opts = PutOptions {
            mode,
            attributes: meta_to_attrs(meta, self.identifier_names)?,
            tags: self.ssec.as_ref().map(|s| s.write_tags()).unwrap_or_default(),
            ..PutOptions::default()
        };
        let res = self
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
            .map_err(|e| self.write_error(e, key))?;
        self.check_sse(key, &res.extensions)?;
        if let Some(ssec) = &self.ssec {
            ssec.remember(path.as_ref(), 0);
        }
        Ok(ObjectInfo {
            key: key.clone(),
            size,
            etag: res.e_tag,
            last_modified: SystemTime::now(),
        })
    }

    /// On a server that ignores write conditions: checks `mode`'s condition with a HEAD, as
    /// [`StoreError::Precondition`] when the object is not what the write expects. The server itself cannot hold the
    /// condition until the write lands, so a writer racing the moment between the HEAD and the write can still be
    /// overwritten (docs/SEMANTICS.md); every other change made since the version was read is caught.
    pub(crate) async fn head_check(&self, key: &ObjectKey, mode: &PutMode) -> Result<(), StoreError> {
        let want = match mode {
            PutMode::Overwrite => return Ok(()),
            PutMode::Create => None,
            PutMode::Update(v) => Some(v.e_tag.clone().unwrap_or_default()),
        };
        // A HEAD sent ahead of this write less than 0.5 s ago stands for this one (`fs::precheck`).
        let found = match super::prechecked_for(key.as_str()) {
            Some(found) => found,
            None => {
                self.condition_heads.fetch_add(1, Ordering::Relaxed);
                match Backend::head(self, key).await {
                    Ok((info, _)) => Some(info.etag.unwrap_or_default()),
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(e),
                }
            }
        };
        if found == want {
            Ok(())
        } else {
            Err(StoreError::Precondition { key: key.to_string() })
        }
    }

    /// How many HEADs conditional writes have sent for themselves (not answered by a HEAD sent ahead).
    pub fn condition_heads(&self) -> u64 {
        self.condition_heads.load(Ordering::Relaxed)
    }

    /// Whether the server checks `If-Match` on DeleteObject, found with a DELETE of the probe object `key` under an
    /// ETag it does not have: a 412 says it checks; a 501 that it refuses the header (LocalStack 4.14); a success that
    /// removed the object that it ignores the header (Garage 2.5). Where it does not check, every delete is
    /// unconditional anyway, so the write-behind deletes go out as DeleteObjects batches of up to 1,000 keys instead
    /// of one request each (`rm -r` of 2,000 files on Garage sent 2,002 DELETEs). Anything unclear leaves deletes
    /// conditional, which costs requests but never removes a version this mount did not know of where it could not.
    async fn probe_conditional_deletes(&self, key: &ObjectKey) {
        let (Some(raw), Ok(path)) = (&self.raw, self.path(key)) else { return };
        let ignored = match raw.delete(path.as_ref(), Some("\"s3cryptfs-probe\"")).await {
            Err(StoreError::Precondition { .. }) => false,
            Err(StoreError::Unsupported { .. }) => true,
            Ok(()) => matches!(Backend::head(self, key).await, Err(e) if e.is_not_found()),
            Err(_) => false,
        };
        if ignored && !self.conditional_delete_unsupported.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "the store does not check conditional deletes (If-Match on DeleteObject): deletes are \
                 unconditional and go out in batches"
            );
        }
    }

    /// Tests: as if the probe had found the server ignoring write conditions.
    #[cfg(test)]
    pub(crate) fn assume_conditions_ignored(&self) {
        self.conditions_ignored.store(true, Ordering::Relaxed);
    }

    /// Whether [`Backend::probe_conditional_writes`] found the server ignoring write conditions.
    pub fn conditions_ignored(&self) -> bool {
        self.conditions_ignored.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Backend for ObjectStoreBackend {
    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let (_, info, meta) = self.get_opts(key, opts).await?;
        Ok((info, meta))
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let (mut body, info, meta) = self.get_range_stream(key, range.clone()).await?;
        let len = range.end.min(info.size).saturating_sub(range.start);
        let mut bytes = Vec::with_capacity(len as usize);
        while let Some(piece) = body.next().await {
            let piece = piece?;
            if bytes.is_empty() && piece.len() as u64 == len {
                return Ok((piece, info, meta)); // one piece (small objects): no copy
            }
            bytes.extend_from_slice(&piece);
        }
        Ok((bytes.into(), info, meta))
    }

    async fn get_range_stream(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(super::BodyStream, ObjectInfo, UserMeta), StoreError> {
        let empty = || -> super::BodyStream { Box::pin(futures::stream::empty()) };
        if range.start >= range.end {
            let (info, meta) = self.head(key).await?;
            return Ok((empty(), info, meta));
        }
        let opts = GetOptions { range: Some(range.clone().into()), ..GetOptions::default() };
        match self.get_result(key, opts).await {
            Ok((res, info, meta)) => Ok((body_of(res, key), info, meta)),
            // As in get_range: a range starting at or past the end is clipped, not an error.
            Err(e @ StoreError::Other { .. }) => {
                let (info, meta) = self.head(key).await?;
                if range.start >= info.size {
                    Ok((empty(), info, meta))
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        self.get_opts(key, GetOptions::default()).await
    }

    async fn get_stream(&self, key: &ObjectKey) -> Result<(super::BodyStream, ObjectInfo, UserMeta), StoreError> {
        let (res, info, meta) = self.get_result(key, GetOptions::default()).await?;
        Ok((body_of(res, key), info, meta))
    }

    async fn put_expect(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<ObjectInfo, StoreError> {
        if key.is_dir_marker() && !body.is_empty() {
            return Err(StoreError::invalid(format!(
                "directory marker {key} cannot have content"
            )));
        }
        self.put_with(key, body, meta, super::conditional::put_mode(expect)).await
    }

    async fn put_multipart_expect(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<Box<dyn Upload>, StoreError> {
        if key.is_dir_marker() {
            return Err(StoreError::invalid(format!(
                "directory marker {key} cannot be uploaded in parts"
            )));
        }
        // On S3 every multipart upload is made of raw requests, whatever it expects: its upload id is then known
        // (`Upload::upload_id`), so a start can abort what a killed daemon left open (object_store hides it).
        if (*expect != Expect::Any && !self.conditional_uploads) || self.raw.is_some() {
            return self.put_multipart_conditional(key, meta, expect).await;
        }
        let path = self.path(key)?;
        let mut opts = PutMultipartOptions {
            attributes: meta_to_attrs(meta, self.identifier_names)?,
            tags: self.ssec.as_ref().map(|s| s.write_tags()).unwrap_or_default(),
            ..PutMultipartOptions::default()
        };
        if self.conditional_uploads {
            opts.extensions.insert(super::conditional::UploadCondition(super::conditional::put_mode(expect)));
        }
        let inner = self
            .store
            .put_multipart_opts(&path, opts)
            .await
            .map_err(|e| self.write_error(e, key))?;
        if let Some(ssec) = &self.ssec {
            ssec.remember(path.as_ref(), 0);
        }
        Ok(Box::new(ObjectStoreUpload {
            sse: self.sse.clone(),
            head_after: self.ssec.as_ref().map(|_| (self.store.clone(), path)),
            inner,
            key: key.clone(),
            size: 0,
        }))
    }

    /// S3: AbortMultipartUpload (`NoSuchUpload` is success). Elsewhere no upload of this backend names an id.
    async fn abort_multipart(&self, key: &ObjectKey, upload_id: &str) -> Result<(), StoreError> {
        let Some(raw) = &self.raw else {
            let operation = format!("aborting a multipart upload of {key} by its id");
            return Err(StoreError::Unsupported { operation });
        };
        raw.abort(self.path(key)?.as_ref(), upload_id).await
    }

    async fn copy(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
    ) -> Result<(), StoreError> {
        check_same_kind(from, to)?;
        match meta {
            // S3 CopyObject keeps the source metadata (directive COPY), which is what we want.
            None => {
                let (src, dst) = (self.path(from)?, self.path(to)?);
                // With SSE-C the copy is made with the source's key (source and target headers carry the same
                // key), so the target stays readable with the key that opened the source.
                let ((), keyed) = self
                    .keyed(from, &src, |store| {
                        let (src, dst) = (src.clone(), dst.clone());
                        async move { store.copy(&src, &dst).await }
                    })
                    .await?;
                if let Some(ssec) = &self.ssec {
                    ssec.remember(dst.as_ref(), keyed.index);
                }
                if let Some(sse) = &keyed.sse {
                    // object_store's copy returns no response headers: check the copy's encryption with a HEAD.
                    let opts = GetOptions { head: true, ..GetOptions::default() };
                    let res = keyed.store.get_opts(&dst, opts).await.map_err(|e| map_err(e, to.as_str()))?;
                    sse.verify(res.extensions.get::<super::SseEcho>()).map_err(|detail| {
                        StoreError::EncryptionNotConfirmed { key: to.to_string(), detail }
                    })?;
                }
                Ok(())
            }
            Some(meta) => {
                if let Some(copied) = self.copy_server_side(from, to, meta, None).await {
                    return copied.map(|_| ());
                }
                let (body, _, _) = self.get(from).await?;
                self.put_with(to, body, meta, PutMode::Overwrite)
                    .await
                    .map(|_| ())
            }
        }
    }

    async fn rename(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
    ) -> Result<(), StoreError> {
        check_same_kind(from, to)?;
        match meta {
            // object_store's rename is native where the store has one (InMemory) and copy +
            // delete on S3.
            // With server-side encryption the copy must be checked, which our `copy` does.
            None if self.sse.is_some() => {
                self.copy(from, to, None).await?;
                self.delete(from).await
            }
            None => {
                let (src, dst) = (self.path(from)?, self.path(to)?);
                self.store
                    .rename(&src, &dst)
                    .await
                    .map_err(|e| map_err(e, from.as_str()))
            }
            Some(meta) => {
                self.copy(from, to, Some(meta)).await?;
                self.delete(from).await
            }
        }
    }

    async fn rename_if(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
        etag: &str,
    ) -> Result<bool, StoreError> {
        check_same_kind(from, to)?;
        // With new metadata, on S3 without an SSE mode: a CopyObject conditional on the version.
        let copied = match meta {
            Some(meta) => self.copy_server_side(from, to, meta, Some(etag)).await,
            None => None,
        };
        match copied {
            Some(copied) => copied.map(|_| ())?,
            None => self.copy(from, to, meta).await?,
        }
        super::delete_moved(self, from, etag).await
    }

    async fn update_meta(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
    ) -> Result<ObjectInfo, StoreError> {
        if let Some(copied) = self.copy_server_side(key, key, meta, None).await {
            return copied;
        }
        // Elsewhere GET + PUT. The PUT is conditional on the etag we read so a concurrent rewrite of the content is
        // not silently reverted; stores without conditional put get a plain PUT.
        let path = self.path(key)?;
        let (res, _) = self
            .keyed(key, &path, |store| {
                let path = path.clone();
                async move { store.get_opts(&path, GetOptions::default()).await }
            })
            .await?;
        let version = UpdateVersion {
            e_tag: res.meta.e_tag.clone(),
            version: res.meta.version.clone(),
        };
        let body = res.bytes().await.map_err(|e| map_err(e, key.as_str()))?;
        if version.e_tag.is_none() {
            return self.put_with(key, body, meta, PutMode::Overwrite).await;
        }
        match self
            .put_with(key, body.clone(), meta, PutMode::Update(version))
            .await
        {
            Err(StoreError::Unsupported { .. }) => {
                self.put_with(key, body, meta, PutMode::Overwrite).await
            }
            other => other,
        }
    }

    async fn update_meta_if(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        etag: &str,
    ) -> Result<(ObjectInfo, super::Transfer), StoreError> {
        if self.raw.is_some() && self.sse.is_none() && self.ssec.is_none() && !key.is_dir_marker() {
            if let Some(copied) = self.copy_server_side(key, key, meta, Some(etag)).await {
                // A HEAD (for the headers to keep) and the CopyObject.
                return copied.map(|info| (info, super::Transfer { requests: 2, bytes_down: 0, bytes_up: 0 }));
            }
        }
        // Elsewhere (InMemory, a mount-level SSE mode, a server without CopyObject): a GET of that version and a PUT
        // conditional on it, so the content passes through this client once each way.
        let path = self.path(key)?;
        let got = self
            .keyed(key, &path, |store| {
                let path = path.clone();
                let opts = GetOptions { if_match: Some(etag.to_string()), ..GetOptions::default() };
                async move { store.get_opts(&path, opts).await }
            })
            .await;
        let (res, _) = match got {
            // Azure (Azurite at least) answers a conditional GET of a missing blob with 412: say which it was.
            Err(e) if e.is_precondition() => match Backend::head(self, key).await {
                Err(missing) if missing.is_not_found() => return Err(missing),
                _ => return Err(e),
            },
            other => other?,
        };
        let version = UpdateVersion { e_tag: res.meta.e_tag.clone(), version: res.meta.version.clone() };
        let body = res.bytes().await.map_err(|e| map_err(e, key.as_str()))?;
        let size = body.len() as u64;
        let info = self.put_with(key, body, meta, PutMode::Update(version)).await?;
        Ok((info, super::Transfer { requests: 2, bytes_down: size, bytes_up: size }))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path(key)?;
        if let Some(ssec) = &self.ssec {
            ssec.forget(path.as_ref());
        }
        // On S3 a plain DELETE: object_store sends a one-object DeleteObjects (`POST ?delete`), which costs the
        // server more (an XML body to parse and answer) and hides a refusal inside a 200 answer.
        if let Some(raw) = &self.raw {
            return raw.delete(path.as_ref(), None).await;
        }
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err(e, key.as_str())),
        }
    }

    async fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        let Some(raw) = &self.raw else { return self.delete(key).await };
        if self.conditional_delete_unsupported.load(Ordering::Relaxed) {
            return self.delete(key).await;
        }
        let path = self.path(key)?;
        if let Some(ssec) = &self.ssec {
            ssec.forget(path.as_ref());
        }
        match raw.delete(path.as_ref(), Some(etag)).await {
            // Nothing was deleted: the server does not know the header. Remembered, so every later delete is one
            // request again.
            Err(StoreError::Unsupported { .. }) => {
                if !self.conditional_delete_unsupported.swap(true, Ordering::Relaxed) {
                    tracing::info!("the store does not support conditional deletes (If-Match on DeleteObject): deletes are unconditional");
                }
                self.delete(key).await
            }
            other => other,
        }
    }

    /// object_store's bulk delete: on S3 one DeleteObjects request per 1,000 keys.
    async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        let mut paths = Vec::with_capacity(keys.len());
        for k in keys {
            let path = self.path(k)?;
            if let Some(ssec) = &self.ssec {
                ssec.forget(path.as_ref());
            }
            paths.push(Ok(path));
        }
        let first = keys.first().map(|k| k.as_str().to_string()).unwrap_or_default();
        let mut results = self.store.delete_stream(futures::stream::iter(paths).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err(e, &first)),
            }
        }
        Ok(())
    }

    /// Once the start-up probe found the server ignoring a condition (or could not tell).
    fn conditions_checked_by_head(&self) -> bool {
        self.conditions_ignored()
    }

    /// S3 through our own requests, until the server showed it ignores `If-Match` on DeleteObject.
    fn deletes_are_conditional(&self) -> bool {
        self.raw.is_some() && !self.conditional_delete_unsupported.load(Ordering::Relaxed)
    }

    async fn has_children(&self, dir: &str) -> Result<bool, StoreError> {
        check_dir(dir)?;
        let base = self.dir_path(dir)?;
        let prefix = if base.as_ref().is_empty() { None } else { Some(&base) };
        if let Some(pages) = &self.pages {
            // One LIST request for one key: as fast for a directory of a million files as for one of two.
            let opts = object_store::list::PaginatedListOptions { max_keys: Some(1), ..Default::default() };
            let list_prefix = prefix.map(|p| format!("{p}/"));
            let got = pages.0.list_paginated(list_prefix.as_deref(), opts).await.map_err(|e| map_err(e, dir))?;
            return Ok(!got.result.objects.is_empty() || !got.result.common_prefixes.is_empty());
        }
        // The first page is enough: one LIST request however large the directory is.
        let mut stream = self.store.list(prefix);
        match stream.try_next().await.map_err(|e| map_err(e, dir))? {
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    async fn list_page(&self, dir: &str, start_after: &str) -> Result<Page, StoreError> {
        check_dir(dir)?;
        let base = self.dir_path(dir)?;
        let prefix = if base.as_ref().is_empty() { None } else { Some(&base) };
        if let Some(pages) = &self.pages {
            // One ListObjectsV2 request: delimiter `/` (subdirectories come as prefixes, left out here), start-after.
            let opts = object_store::list::PaginatedListOptions {
                offset: match start_after.trim_end_matches('/') {
                    "" if self.prefix.is_empty() => None,
                    after => Some(self.join(after)?.to_string()),
                },
                delimiter: Some("/".into()),
                max_keys: Some(LIST_PAGE),
                ..Default::default()
            };
            let list_prefix = prefix.map(|p| format!("{p}/"));
            let got = pages.0.list_paginated(list_prefix.as_deref(), opts).await.map_err(|e| map_err(e, dir))?;
            let mut page = Page { objects: Vec::new(), complete: got.page_token.is_none() };
            for m in &got.result.objects {
                if let Some(k) = self.key_of(&m.location) {
                    page.objects.push(Self::info(&k, m));
                }
            }
            page.objects.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
            return Ok(page);
        }
        // Without a delimiter: object_store sends `start-after` only then. The stream asks for its next page only
        // once this one is taken whole, so stopping at LIST_PAGE objects sends one request.
        let mut stream = match start_after.trim_end_matches('/') {
            "" => self.store.list(prefix),
            after => self.store.list_with_offset(prefix, &self.join(after)?),
        };
        let mut page = Page::default();
        let mut seen = 0;
        while seen < LIST_PAGE {
            match stream.try_next().await.map_err(|e| map_err(e, dir))? {
                Some(m) => {
                    seen += 1;
                    if let Some(k) = self.key_of(&m.location) {
                        page.objects.push(Self::info(&k, &m));
                    }
                }
                None => {
                    page.complete = true;
                    break;
                }
            }
        }
        // Markers map to their directory's key (`a/b/.s3cryptfs-dir` to `a/b/`), which sorts differently.
        page.objects.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
        Ok(page)
    }

    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
        let dir_key = check_dir(dir)?;
        let base = self.dir_path(dir)?;
        let prefix = if base.as_ref().is_empty() {
            None
        } else {
            Some(&base)
        };
        let mut out = Listing::default();
        if recursive {
            let metas: Vec<ObjectMeta> = self
                .store
                .list(prefix)
                .try_collect()
                .await
                .map_err(|e| map_err(e, dir))?;
            for m in &metas {
                if let Some(k) = self.key_of(&m.location) {
                    out.objects.push(Self::info(&k, m));
                }
            }
        } else {
            let res = self
                .store
                .list_with_delimiter(prefix)
                .await
                .map_err(|e| map_err(e, dir))?;
            out = self.children(dir_key.as_ref(), &res);
        }
        sort_listing(&mut out);
        Ok(out)
    }

    fn lists_from_keys(&self) -> bool {
        self.pages.is_some()
    }

    fn streams_bodies(&self) -> bool {
        true
    }

    fn copies_parts(&self) -> bool {
        // As `put_multipart_expect` picks the upload for an ETag condition: raw S3 requests copy unless each part
        // needs the SSE-C key (`RawUpload`); a store without conditional uploads collects the object in memory and
        // copies by reading (`BufferedUpload`); object_store's own uploads (GCS, Azure) do not copy.
        match &self.raw {
            Some(_) => self.ssec.is_none(),
            None => !self.conditional_uploads,
        }
    }

    async fn list_children_page(
        &self,
        dir: &str,
        after: Option<&str>,
        token: Option<&str>,
    ) -> Result<super::ChildPage, StoreError> {
        let Some(pages) = &self.pages else {
            return Err(StoreError::Unsupported { operation: format!("listing {dir} from a key") });
        };
        let dir_key = check_dir(dir)?;
        let base = self.dir_path(dir)?;
        // One ListObjectsV2 request: delimiter `/`, `start-after` the full key of `after`, or the continuation token.
        let opts = object_store::list::PaginatedListOptions {
            offset: after.map(|a| self.join(a)).transpose()?.map(|p| p.to_string()),
            page_token: token.map(str::to_string),
            delimiter: Some("/".into()),
            max_keys: Some(LIST_PAGE),
            ..Default::default()
        };
        let list_prefix = (!base.as_ref().is_empty()).then(|| format!("{base}/"));
        let got = pages.0.list_paginated(list_prefix.as_deref(), opts).await.map_err(|e| map_err(e, dir))?;
        let mut listing = self.children(dir_key.as_ref(), &got.result);
        sort_listing(&mut listing);
        Ok(super::ChildPage { listing, next: got.page_token })
    }

    async fn replace_head(&self, key: &ObjectKey, etag: &str, head: Bytes) -> Result<super::Transfer, StoreError> {
        if key.is_dir_marker() {
            return Err(StoreError::invalid(format!("directory marker {key} has no content to replace")));
        }
        if self.ssec.is_some() {
            // Every request would need the object's own SSE-C key; sse-c objects have no header of ours anyway.
            return Err(StoreError::Unsupported { operation: format!("replacing the first bytes of SSE-C object {key}") });
        }
        let path = self.path(key)?;
        match &self.raw {
            // The raw requests carry no SSE settings of their own: with a mount-level SSE mode the PUT path applies
            // and checks it. Client-side modes (the ones with headers to replace) have none.
            Some(raw) if self.sse.is_none() => raw.replace_head(path.as_ref(), etag, &head).await,
            _ => self.replace_head_by_put(key, &path, etag, head).await,
        }
    }

    async fn customer_key_of(&self, key: &ObjectKey) -> Result<super::CustomerKeyOf, StoreError> {
        let (Some(ssec), Some(raw)) = (&self.ssec, &self.raw) else {
            return Err(StoreError::Unsupported { operation: format!("finding the SSE-C key of {key} without mode=sse-c") });
        };
        let path = self.path(key)?;
        let mut of = super::CustomerKeyOf { tags: raw.tags(path.as_ref()).await?, ..Default::default() };
        of.cost.requests += 1;
        of.tagged_md5 = of.tags.iter().find(|(k, _)| k == super::KEY_MD5_TAG).map(|(_, v)| v.clone());
        if let Some(md5) = &of.tagged_md5 {
            of.index = ssec.index_of_md5(md5);
            return Ok(of);
        }
        // Written by another tool: the server only tells which key opens it by accepting that key.
        for i in 0..ssec.len() {
            let (store, _) = ssec.client(i);
            of.cost.requests += 1;
            match store.get_opts(&path, GetOptions { head: true, ..GetOptions::default() }).await {
                Ok(_) => {
                    of.index = Some(i);
                    return Ok(of);
                }
                Err(e @ object_store::Error::NotFound { .. }) => return Err(map_err(e, key.as_str())),
                Err(_) => continue,
            }
        }
        Ok(of)
    }

    async fn move_to_writing_key(
        &self,
        key: &ObjectKey,
        of: &super::CustomerKeyOf,
        etag: &str,
        size: u64,
    ) -> Result<super::Transfer, StoreError> {
        use zeroize::Zeroize;
        let (Some(ssec), Some(raw)) = (&self.ssec, &self.raw) else {
            return Err(StoreError::Unsupported { operation: format!("re-encrypting {key} without mode=sse-c") });
        };
        let Some(from) = of.index else {
            return Err(StoreError::WrongKey {
                key: key.to_string(),
                detail: "no key of the key file opens it with SSE-C, so it cannot be re-encrypted".into(),
            });
        };
        if size > super::raw::MAX_COPY_OBJECT_LEN {
            return Err(StoreError::Unsupported {
                operation: format!(
                    "re-encrypting {key} ({size} bytes) server-side: CopyObject copies at most 5 GiB; copy the file \
                     through a mount whose key file starts with the new key instead (cp FILE FILE.new && mv FILE.new FILE)"
                ),
            });
        }
        let path = self.path(key)?;
        let writer_md5 = ssec.key_md5_of(0).to_string();
        // Keep the object's other tags; the key-MD5 tag names the new key.
        let mut tags: Vec<(String, String)> =
            of.tags.iter().filter(|(k, _)| k != super::KEY_MD5_TAG).cloned().collect();
        tags.push((super::KEY_MD5_TAG.to_string(), writer_md5.clone()));
        let mut headers: Vec<(&str, String)> = vec![
            ("x-amz-metadata-directive", "COPY".to_string()),
            ("x-amz-tagging-directive", "REPLACE".to_string()),
            ("x-amz-tagging", super::raw::tagging_header(&tags)),
        ];
        headers.extend(ssec.customer_key_headers(from, true));
        headers.extend(ssec.customer_key_headers(0, false));
        let result = raw.copy_onto_itself(path.as_ref(), &headers, etag).await;
        for (_, value) in headers.iter_mut() {
            value.zeroize();
        }
        let resp = result.map_err(|e| match e {
            StoreError::AccessDenied { key, detail } => {
                StoreError::AccessDenied { key, detail: format!("{detail}; {SSE_C_BLOCKED_HINT}") }
            }
            other => other,
        })?;
        let header = |name: &str| resp.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let echo = super::SseEcho {
            customer_algorithm: header("x-amz-server-side-encryption-customer-algorithm"),
            customer_key_md5: header("x-amz-server-side-encryption-customer-key-md5"),
            ..super::SseEcho::default()
        };
        super::ServerSideEncryption::Customer { key_md5: writer_md5 }
            .verify(Some(&echo))
            .map_err(|detail| StoreError::EncryptionNotConfirmed { key: key.to_string(), detail })?;
        ssec.remember(path.as_ref(), 0);
        Ok(super::Transfer { requests: 1, bytes_down: 0, bytes_up: 0 })
    }

    fn max_path_len(&self, dir: bool) -> usize {
        /// S3's limit on a key, in bytes of UTF-8.
        const S3_MAX_KEY: usize = 1024;
        let prefix = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        let marker = if dir { 1 + super::MARKER_FILE.len() } else { 0 };
        S3_MAX_KEY.saturating_sub(prefix + marker)
    }

    async fn probe_conditional_writes(&self) -> Result<(), StoreError> {
        // Only S3 servers differ here (object_store's other stores and the local store hold conditions).
        if self.raw.is_none() {
            return Ok(());
        }
        // Under the reserved index name, so no mount lists it for the moment it exists.
        let key = ObjectKey::new(format!("{PROBE_DIR}/probe-{:016x}", rand::random::<u64>()).as_str())?;
        let empty = UserMeta::default();
        let held = |r: Result<ObjectInfo, StoreError>| match r {
            Ok(_) => Ok(false),
            Err(StoreError::Precondition { .. }) => Ok(true),
            Err(e) => Err(e),
        };
        let outcome: Result<bool, StoreError> = async {
            self.put_with(&key, Bytes::new(), &empty, PutMode::Create).await?;
            let none_match = held(self.put_with(&key, Bytes::new(), &empty, PutMode::Create).await)?;
            let bogus = PutMode::Update(UpdateVersion { e_tag: Some("\"s3cryptfs-probe\"".into()), version: None });
            let if_match = held(self.put_with(&key, Bytes::new(), &empty, bogus).await)?;
            Ok(none_match && if_match)
        }
        .await;
        if outcome.is_ok() {
            self.probe_conditional_deletes(&key).await;
        }
        // Whatever happened (a write that timed out may still have landed).
        match Backend::delete(self, &key).await {
            Err(e) if !e.is_not_found() => tracing::warn!(
                key = %key,
                error = %crate::error_text::error_chain(&e),
                "could not remove the probe object of conditional writes"
            ),
            _ => {}
        }
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                self.conditions_ignored.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "the store ignores conditional writes (If-None-Match / If-Match): each upload checks the object \
                     with a HEAD first, so only a writer racing that moment can be overwritten"
                );
            }
            // Unclear (a refused or failed write): the HEAD check costs a request per upload, a wrong guess the
            // other way would cost another writer's data.
            Err(e) => {
                self.conditions_ignored.store(true, Ordering::Relaxed);
                tracing::warn!(
                    error = %crate::error_text::error_chain(&e),
                    "could not find out whether the store holds conditional writes (a probe write failed): each \
                     upload checks the object with a HEAD first"
                );
            }
        }
        Ok(())
    }

    async fn check_access(&self) -> Result<(), StoreError> {
        let base = self.dir_path("")?;
        let prefix = if base.as_ref().is_empty() {
            None
        } else {
            Some(&base)
        };
        // One page of a listing: needs the bucket to exist and list permission, costs one request.
        let mut stream = self.store.list(prefix);
        match stream.try_next().await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::MissingBucket {
                store: self.store.to_string(),
            }),
            Err(e) => Err(map_err(e, &self.prefix)),
        }
    }
}

/// Copying a marker onto a file key (or back) would change what the object means.
fn check_same_kind(from: &ObjectKey, to: &ObjectKey) -> Result<(), StoreError> {
    if from.is_dir_marker() == to.is_dir_marker() {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "cannot copy or rename {from} to {to}: one is a directory marker and the other is not"
        )))
    }
}

struct ObjectStoreUpload {
    sse: Option<super::ServerSideEncryption>,
    /// SSE-C: CompleteMultipartUpload does not echo the customer-key headers (UploadPart does, but object_store
    /// keeps part answers to itself), so the finished object is checked with a HEAD under the key.
    head_after: Option<(Arc<dyn ObjectStore>, Path)>,
    inner: Box<dyn MultipartUpload>,
    key: ObjectKey,
    size: u64,
}

#[async_trait]
impl Upload for ObjectStoreUpload {
    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        let len = part.len() as u64;
        // object_store numbers the part now and returns a 'static future, so parts can be in flight together.
        let fut = self.inner.put_part(PutPayload::from(part));
        self.size += len;
        let key = self.key.clone();
        Box::pin(async move { fut.await.map_err(|e| map_err(e, key.as_str())) })
    }

    async fn complete(mut self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        let res = self
            .inner
            .complete()
            .await
            .map_err(|e| map_err(e, self.key.as_str()))?;
        if let Some(sse) = &self.sse {
            let echo = match &self.head_after {
                None => res.extensions.get::<super::SseEcho>().cloned(),
                Some((store, path)) => {
                    let opts = GetOptions { head: true, ..GetOptions::default() };
                    let head = store.get_opts(path, opts).await.map_err(|e| map_err(e, self.key.as_str()))?;
                    head.extensions.get::<super::SseEcho>().cloned()
                }
            };
            sse.verify(echo.as_ref()).map_err(|detail| StoreError::EncryptionNotConfirmed {
                key: self.key.to_string(),
                detail,
            })?;
        }
        Ok(ObjectInfo {
            key: self.key.clone(),
            size: self.size,
            etag: res.e_tag,
            last_modified: SystemTime::now(),
        })
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StoreError> {
        self.inner
            .abort()
            .await
            .map_err(|e| map_err(e, self.key.as_str()))
    }
}

fn meta_to_attrs(meta: &UserMeta, identifiers: bool) -> Result<Attributes, StoreError> {
    let map = meta::encode(meta)?;
    let mut attrs = Attributes::with_capacity(map.len());
    for (name, value) in map {
        let name = if identifiers { meta::to_identifier(&name) } else { name };
        attrs.insert(Attribute::Metadata(name.into()), AttributeValue::from(value));
    }
    Ok(attrs)
}

/// A GET's body as it arrives, its errors in our terms.
fn body_of(res: object_store::GetResult, key: &ObjectKey) -> super::BodyStream {
    let name = key.to_string();
    Box::pin(res.into_stream().map(move |piece| piece.map_err(|e| map_err(e, &name))))
}

fn attrs_to_meta(attrs: &Attributes, identifiers: bool) -> UserMeta {
    let names: Vec<(String, &str)> = attrs
        .iter()
        .filter_map(|(k, v)| match k {
            Attribute::Metadata(name) if identifiers => meta::from_identifier(name).map(|n| (n, v.as_ref())),
            Attribute::Metadata(name) => Some((name.to_string(), v.as_ref())),
            _ => None,
        })
        .collect();
    meta::decode(names.iter().map(|(n, v)| (n.as_str(), *v)))
}

/// Map an object_store error onto what the filesystem can act on, keeping the source.
pub(crate) fn map_err(e: object_store::Error, key: &str) -> StoreError {
    use object_store::Error as E;
    match e {
        // S3 answers 404 for a missing bucket too; that is not a missing object (a deleted bucket must not turn every
        // write into ENOENT), and the answer's body says which.
        E::NotFound { .. } if chain_text(&e).contains("NoSuchBucket") => {
            StoreError::MissingBucket { store: "this store".into() }
        }
        E::NotFound { .. } => StoreError::NotFound {
            key: key.to_owned(),
        },
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => StoreError::AccessDenied {
            key: key.to_owned(),
            detail: chain_text(&e),
        },
        E::Precondition { .. } | E::AlreadyExists { .. } | E::NotModified { .. } => {
            StoreError::Precondition {
                key: key.to_owned(),
            }
        }
        E::NotImplemented { .. } | E::NotSupported { .. } => StoreError::Unsupported {
            operation: chain_text(&e),
        },
        E::InvalidPath { .. } => StoreError::invalid(chain_text(&e)),
        // A delete goes through DeleteObjects, which answers 200 and reports each key's failure in the body;
        // object_store passes that on as a generic error whose text ends in "(code: AccessDenied)". A refusal is
        // still a refusal.
        E::Generic { .. } if chain_text(&e).contains("(code: AccessDenied)") => StoreError::AccessDenied {
            key: key.to_owned(),
            detail: chain_text(&e),
        },
        // A request that outlived the mount's timeout (see `deadline.rs`) says so; other transport failures are
        // "unavailable".
        e => match (super::deadline::timed_out(&e).cloned(), transport_failure(&e)) {
            (Some(t), _) => StoreError::TimedOut { key: key.to_owned(), after: t.limit, detail: t.operation.to_owned() },
            (None, Some(detail)) => StoreError::Unavailable {
                detail,
                source: Some(Box::new(e)),
            },
            (None, None) => StoreError::other(key, e),
        },
    }
}

/// Decide whether `e` means "could not talk to the store" rather than "the store said no".
fn transport_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            let what = match h.kind() {
                HttpErrorKind::Connect => "could not connect",
                HttpErrorKind::Timeout => "request timed out",
                HttpErrorKind::Interrupted => "connection interrupted",
                HttpErrorKind::Request => "request could not be sent",
                _ => return None,
            };
            return Some(what.to_owned());
        }
        cur = err.source();
    }
    // object_store's RetryError (which carries the status) is crate-private, so the only way
    // to see a 5xx that outlived the retries is its message.
    let text = e.to_string();
    if text.contains("status code: 5") {
        return Some("server error after retries".to_owned());
    }
    None
}
