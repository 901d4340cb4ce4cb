//! Conditional multipart uploads ([`Expect::Absent`], [`Expect::Etag`]) for [`super::ObjectStoreBackend`], and every
//! multipart upload on S3.
//!
//! object_store 0.14 sends single PUTs conditionally (`PutMode::Create` → `If-None-Match: *`, `PutMode::Update` →
//! `If-Match`), but its multipart uploads always complete unconditionally and hide their upload id and part ETags,
//! so a conditional multipart upload cannot go through it, and neither can one that a start must be able to abort
//! after a crash (the journal keeps the id of a stream in flight: `upload::stream`):
//!
//! - On S3 ([`RawUpload`], unconditional ones too) the upload is made with raw signed requests (`raw.rs`):
//!   CreateMultipartUpload with the object's metadata, tags and SSE request headers; UploadPart (with the SSE-C key
//!   where the mount uses one); CompleteMultipartUpload with `If-Match` / `If-None-Match: *` (or neither, for
//!   [`Expect::Any`]). The completion's answer is checked for the
//!   server-side encryption asked for, like every other write; a lost race aborts the upload, so no parts linger.
//! - GCS and Azure take the condition in their own uploads in parts ([`UploadCondition`]; `gcs.rs`, `azure.rs`).
//! - Elsewhere (`InMemory` in tests) [`BufferedUpload`] keeps the parts in memory and writes them with one
//!   conditional PUT at `complete`. That costs the object's size in memory, which is fine for tests; no store a mount
//!   can name takes this path.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use object_store::{PutMode, UpdateVersion};

use super::error::StoreError;
use super::raw::{xml_value, RawS3};
use super::{CustomerKeyStores, Expect, ObjectInfo, ObjectKey, ServerSideEncryption, SseEcho, Upload};

/// object_store's put mode for `expect`.
pub(crate) fn put_mode(expect: &Expect) -> PutMode {
    match expect {
        Expect::Any => PutMode::Overwrite,
        Expect::Absent => PutMode::Create,
        Expect::Etag(etag) => PutMode::Update(UpdateVersion { e_tag: Some(etag.clone()), version: None }),
    }
}

/// The condition a multipart upload must meet when it completes, for the stores whose own client takes it (GCS,
/// Azure: `ObjectStoreBackend::with_conditional_uploads`). object_store's `PutMultipartOptions` has no put mode, so the
/// backend passes it in the options' extensions; without it an upload in parts overwrites whatever is there.
#[derive(Clone, Debug)]
pub(crate) struct UploadCondition(pub(crate) PutMode);

/// The SSE request headers object_store would send on CreateMultipartUpload for `sse` (and for SSE-C on every
/// UploadPart). The SSE-C values hold the key: never log them.
pub(crate) fn sse_headers(
    sse: Option<&ServerSideEncryption>,
    ssec: Option<&CustomerKeyStores>,
) -> Vec<(&'static str, String)> {
    match (sse, ssec) {
        (_, Some(ssec)) => ssec.customer_key_headers(0, false).to_vec(),
        (Some(ServerSideEncryption::S3), None) => vec![("x-amz-server-side-encryption", "AES256".into())],
        (Some(ServerSideEncryption::Kms { key_id, bucket_key }), None) => {
            let mut h = vec![("x-amz-server-side-encryption", "aws:kms".to_string())];
            if let Some(id) = key_id {
                h.push(("x-amz-server-side-encryption-aws-kms-key-id", id.clone()));
            }
            if let Some(b) = bucket_key {
                h.push(("x-amz-server-side-encryption-bucket-key-enabled", b.to_string()));
            }
            h
        }
        // A customer key without its key stores cannot be sent; the backend never builds that.
        (Some(ServerSideEncryption::Customer { .. }), None) | (None, None) => Vec::new(),
    }
}

/// A conditional multipart upload made of raw S3 requests (see the module docs).
pub(crate) struct RawUpload {
    pub(crate) raw: RawS3,
    /// The store path (prefix included).
    pub(crate) path: String,
    pub(crate) key: ObjectKey,
    pub(crate) upload_id: String,
    pub(crate) expect: Expect,
    /// Sent with every part: the SSE-C key, or nothing.
    pub(crate) part_headers: Arc<Vec<(&'static str, String)>>,
    /// What the completion must confirm.
    pub(crate) sse: Option<ServerSideEncryption>,
    /// SSE-C: CompleteMultipartUpload does not echo the customer key, so the finished object is checked with a
    /// HEAD under the key (as object_store's path does).
    pub(crate) head_after: Option<(Arc<dyn object_store::ObjectStore>, object_store::path::Path)>,
    /// A server that ignores the completion's condition: it is checked with a HEAD through this backend first.
    pub(crate) check_first: Option<super::ObjectStoreBackend>,
    /// Part ETags by part number − 1; `None` while a part is in flight (or failed).
    pub(crate) parts: Arc<Mutex<Vec<Option<String>>>>,
    pub(crate) size: u64,
}

impl Drop for RawUpload {
    fn drop(&mut self) {
        // Zeroize the SSE-C key copies once no part future holds them any more.
        if let Some(headers) = Arc::get_mut(&mut self.part_headers) {
            for (_, v) in headers.iter_mut() {
                zeroize::Zeroize::zeroize(v);
            }
        }
    }
}

impl RawUpload {
    async fn abort_quietly(&self) {
        if let Err(e) = self.raw.abort(&self.path, &self.upload_id).await {
            tracing::warn!(key = self.key.as_str(), error = %e, "could not abort the multipart upload; a lifecycle rule removes it");
        }
    }

    async fn finish(&self) -> Result<ObjectInfo, StoreError> {
        let parts: Vec<String> = {
            let parts = self.parts.lock().expect("invariant broken: part list lock poisoned");
            parts.iter().cloned().collect::<Option<Vec<_>>>().ok_or_else(|| {
                StoreError::invalid(format!("upload of {} cannot complete: a part was not uploaded", self.key))
            })?
        };
        let parts = if parts.is_empty() {
            // S3 refuses a completion without parts: an empty object is one empty part.
            vec![self.raw.upload_part(&self.path, &self.upload_id, 1, Bytes::new(), &self.part_headers).await?]
        } else {
            parts
        };
        if let Some(backend) = &self.check_first {
            if let Err(e) = backend.head_check(&self.key, &put_mode(&self.expect)).await {
                // Nothing was completed, so the parts go whatever the check's failure was (`complete` aborts after a
                // precondition failure itself).
                if !matches!(e, StoreError::Precondition { .. }) {
                    self.abort_quietly().await;
                }
                return Err(e);
            }
        }
        let resp = self.raw.complete(&self.path, &self.upload_id, &parts, &self.expect).await?;
        if let Some(sse) = &self.sse {
            let echo = match &self.head_after {
                Some((store, path)) => {
                    let opts = object_store::GetOptions { head: true, ..Default::default() };
                    let head = store.get_opts(path, opts).await.map_err(|e| super::object::map_err(e, self.key.as_str()))?;
                    head.extensions.get::<SseEcho>().cloned()
                }
                None => {
                    let header = |name: &str| resp.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                    Some(SseEcho {
                        algorithm: header("x-amz-server-side-encryption"),
                        kms_key_id: header("x-amz-server-side-encryption-aws-kms-key-id"),
                        customer_algorithm: header("x-amz-server-side-encryption-customer-algorithm"),
                        customer_key_md5: header("x-amz-server-side-encryption-customer-key-md5"),
                    })
                }
            };
            sse.verify(echo.as_ref())
                .map_err(|detail| StoreError::EncryptionNotConfirmed { key: self.key.to_string(), detail })?;
        }
        Ok(ObjectInfo {
            key: self.key.clone(),
            size: self.size,
            etag: xml_value(&String::from_utf8_lossy(&resp.body), "ETag"),
            last_modified: SystemTime::now(),
        })
    }
}

#[async_trait]
impl Upload for RawUpload {
    fn upload_id(&self) -> Option<String> {
        Some(self.upload_id.clone())
    }

    fn copies_parts(&self) -> bool {
        self.part_headers.is_empty()
    }

    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        let index = {
            let mut parts = self.parts.lock().expect("invariant broken: part list lock poisoned");
            parts.push(None);
            parts.len()
        };
        self.size += part.len() as u64;
        let (raw, path, id) = (self.raw.clone(), self.path.clone(), self.upload_id.clone());
        let (parts, headers) = (Arc::clone(&self.parts), Arc::clone(&self.part_headers));
        Box::pin(async move {
            let number = u32::try_from(index)
                .map_err(|_| StoreError::invalid(format!("upload of {path} has more parts than S3 allows")))?;
            let etag = raw.upload_part(&path, &id, number, part, &headers).await?;
            parts.lock().expect("invariant broken: part list lock poisoned")[index - 1] = Some(etag);
            Ok(())
        })
    }

    fn copy_part(&mut self, range: std::ops::Range<u64>, etag: &str) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        if !self.part_headers.is_empty() {
            // SSE-C: the copy would need the source's customer-key headers as well as the part's; not sent here.
            return Box::pin(futures::future::ready(Err(StoreError::Unsupported {
                operation: "copying a range of an SSE-C object into a multipart upload".into(),
            })));
        }
        if range.start >= range.end {
            return Box::pin(futures::future::ready(Err(StoreError::invalid(format!(
                "upload of {}: an empty range cannot be copied as a part",
                self.key
            )))));
        }
        let index = {
            let mut parts = self.parts.lock().expect("invariant broken: part list lock poisoned");
            parts.push(None);
            parts.len()
        };
        self.size += range.end - range.start;
        let (raw, path, id, etag) = (self.raw.clone(), self.path.clone(), self.upload_id.clone(), etag.to_string());
        let parts = Arc::clone(&self.parts);
        Box::pin(async move {
            let number = u32::try_from(index)
                .map_err(|_| StoreError::invalid(format!("upload of {path} has more parts than S3 allows")))?;
            let part_etag = raw.upload_part_copy(&path, &id, number, range, &etag).await?;
            parts.lock().expect("invariant broken: part list lock poisoned")[index - 1] = Some(part_etag);
            Ok(())
        })
    }

    async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        let result = self.finish().await;
        if matches!(result, Err(StoreError::Precondition { .. })) {
            // The caller cannot abort a consumed upload: do it here so the parts do not linger until a lifecycle rule.
            self.abort_quietly().await;
        }
        result
    }

    async fn abort(self: Box<Self>) -> Result<(), StoreError> {
        self.raw.abort(&self.path, &self.upload_id).await
    }
}

/// A conditional multipart upload for stores without raw S3 access: the parts are collected in memory and written
/// with one conditional PUT at `complete` (see the module docs).
pub(crate) struct BufferedUpload {
    pub(crate) backend: super::ObjectStoreBackend,
    pub(crate) key: ObjectKey,
    pub(crate) meta: super::UserMeta,
    pub(crate) expect: Expect,
    pub(crate) body: BytesMut,
    /// Copied parts (`copy_part`): where in `body` they go, the range of the object, and the ETag it must still
    /// have; filled in at `complete`.
    pub(crate) copies: Vec<(usize, std::ops::Range<u64>, String)>,
}

#[async_trait]
impl Upload for BufferedUpload {
    fn copies_parts(&self) -> bool {
        true
    }

    fn put_part(&mut self, part: Bytes) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        self.body.extend_from_slice(&part);
        Box::pin(futures::future::ready(Ok(())))
    }

    fn copy_part(&mut self, range: std::ops::Range<u64>, etag: &str) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        // The part's place is kept now; its bytes are read (and the version checked) at `complete`.
        let at = self.body.len();
        self.body.resize(at + (range.end.saturating_sub(range.start)) as usize, 0);
        self.copies.push((at, range, etag.to_string()));
        Box::pin(futures::future::ready(Ok(())))
    }

    async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        let BufferedUpload { backend, key, meta, expect, mut body, copies } = *self;
        for (at, range, etag) in copies {
            let (bytes, info, _) = super::Backend::get_range(&backend, &key, range.clone()).await?;
            if info.etag.as_deref() != Some(etag.as_str()) {
                return Err(StoreError::Precondition { key: key.to_string() });
            }
            if bytes.len() as u64 != range.end - range.start {
                return Err(StoreError::invalid(format!("{key}: the range to copy runs past the end of the object")));
            }
            body[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        backend.put_with(&key, body.freeze(), &meta, put_mode(&expect)).await
    }

    async fn abort(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}
