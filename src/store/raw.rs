//! Raw S3 REST requests that object_store does not offer, signed by [`SignedClient`] with the store's credentials.
//!
//! Key rotation (`s3cryptfs rekey`) needs three things object_store cannot do: replace an object's first bytes while
//! keeping the rest of it, its metadata and its tags, conditional on the ETag it read (a PUT or a multipart upload
//! whose later parts are `UploadPartCopy`s of the object itself, completed with `If-Match`); a CopyObject whose source
//! and target carry *different* SSE-C keys (object_store sends one key for both); and reading every response header
//! of a GET (object_store keeps `x-amz-tagging-count`, the storage class and the raw metadata to itself).
//!
//! Nothing here retries beyond what [`SignedClient::send`] does for transient failures; every refusal comes back as a
//! [`StoreError`] the caller can act on (`Precondition` for a lost race, `NotFound`, `AccessDenied`, …).

use std::ops::Range;

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::error::StoreError;
use super::Transfer;
use crate::aws::{ApiError, ApiResponse, SignedClient};

/// object_store's path encoding for S3 URLs: everything but unreserved characters and `/`.
const PATH_ENCODE_SET: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');
/// Query values and tag keys/values: everything but unreserved characters.
const VALUE_ENCODE_SET: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Response headers a rewrite carries over to the new object, besides every `x-amz-meta-*`: what S3 would keep in a
/// CopyObject with `x-amz-metadata-directive: COPY`. Object-lock settings are not among them (S3 needs a checksum on
/// such writes, and retention cannot be shortened anyway).
const KEPT_HEADERS: [&str; 10] = [
    "content-type",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "expires",
    "x-amz-website-redirect-location",
    "x-amz-storage-class",
    "x-amz-server-side-encryption",
    "x-amz-server-side-encryption-aws-kms-key-id",
];

/// Objects up to this size get their first bytes replaced with one GET and one conditional PUT; larger ones with a
/// multipart upload whose first part (this long) is uploaded and whose other parts are copied server-side. 5 MiB is
/// S3's minimum for every part but the last, so the uploaded part cannot be shorter; and up to that size the PUT
/// moves no more bytes than the multipart upload would, in fewer requests.
pub(crate) const FIRST_PART_LEN: u64 = 5 << 20;
/// Bytes per UploadPartCopy: a copy inside S3 of 256 MiB takes seconds, well within the HTTP client's 30 s request
/// timeout, and 10,000 parts of it (S3's limit) cover 2.5 TiB; larger objects get larger parts.
const COPY_PART_LEN: u64 = 256 << 20;
/// S3's limit on the parts of one upload.
const MAX_PARTS: u64 = 10_000;
/// S3's limit on the object a single CopyObject copies.
pub(crate) const MAX_COPY_OBJECT_LEN: u64 = 5 << 30;

/// [`MAX_COPY_OBJECT_LEN`], or a smaller limit from `S3CRYPTFS_TEST_COPY_OBJECT_MAX` (bytes) so that the tests can
/// take the multipart route without copying 5 GiB.
fn copy_object_max() -> u64 {
    static MAX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("S3CRYPTFS_TEST_COPY_OBJECT_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(MAX_COPY_OBJECT_LEN, |v: u64| v.min(MAX_COPY_OBJECT_LEN))
    })
}

/// Signed access to one bucket's REST API.
#[derive(Debug, Clone)]
pub(crate) struct RawS3 {
    signed: SignedClient,
    bucket: String,
    /// `https://host/bucket` (path style) or `https://bucket.host`: object URLs are this plus `/` and the key.
    bucket_url: String,
}

/// The first bytes of an object and what its GET said about it.
pub(crate) struct Fetched {
    pub body: Bytes,
    /// The whole object's size (from `Content-Range`, or the body length for a whole-object answer).
    pub total: u64,
    pub headers: HeaderMap,
}

impl RawS3 {
    pub(crate) fn new(signed: SignedClient, bucket: String, bucket_url: String) -> Self {
        RawS3 { signed, bucket, bucket_url: bucket_url.trim_end_matches('/').to_string() }
    }

    fn object_url(&self, path: &str) -> String {
        format!("{}/{}", self.bucket_url, percent_encoding::utf8_percent_encode(path, PATH_ENCODE_SET))
    }

    /// `x-amz-copy-source` for an object of this bucket: `bucket/key`, the key URL-encoded.
    fn copy_source(&self, path: &str) -> String {
        format!("{}/{}", self.bucket, percent_encoding::utf8_percent_encode(path, PATH_ENCODE_SET))
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
        path: &str,
    ) -> Result<ApiResponse, StoreError> {
        let may_hide_errors = matches!(method, Method::PUT | Method::POST);
        let resp = self.signed.send("s3", method, url, headers, body).await.map_err(|e| api_error(e, path))?;
        // CopyObject, UploadPartCopy and CompleteMultipartUpload may answer 200 and put the error in the body. (Not
        // checked for GETs: their body is the object, whatever it holds.)
        if may_hide_errors && (resp.body.starts_with(b"<?xml") || resp.body.starts_with(b"<Error")) {
            let text = String::from_utf8_lossy(&resp.body);
            if text.contains("<Error>") {
                let code = xml_value(&text, "Code").unwrap_or_default();
                let message = xml_value(&text, "Message").unwrap_or_default();
                return Err(match code.as_str() {
                    "PreconditionFailed" | "ConditionalRequestConflict" => {
                        StoreError::Precondition { key: path.to_string() }
                    }
                    _ => StoreError::other(path, format!("S3 answered 200 with error {code}: {message}")),
                });
            }
        }
        Ok(resp)
    }

    /// GET bytes `range` of the object (clipped by the server at its end), only if its ETag is still `if_match`.
    pub(crate) async fn get(
        &self,
        path: &str,
        range: Range<u64>,
        if_match: &str,
        extra: &[(&str, String)],
    ) -> Result<Fetched, StoreError> {
        let mut headers = vec![
            ("range", format!("bytes={}-{}", range.start, range.end.saturating_sub(1))),
            ("if-match", if_match.to_string()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let resp = self.send(Method::GET, &self.object_url(path), &headers, Bytes::new(), path).await?;
        let header = |name: &str| resp.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let total = header("content-range")
            .and_then(|r| r.rsplit('/').next().and_then(|t| t.parse::<u64>().ok()))
            .unwrap_or(resp.body.len() as u64);
        Ok(Fetched { total, body: resp.body, headers: resp.headers })
    }

    /// The object's tags, in the order the server lists them.
    pub(crate) async fn tags(&self, path: &str) -> Result<Vec<(String, String)>, StoreError> {
        let url = format!("{}?tagging", self.object_url(path));
        let resp = self.send(Method::GET, &url, &[], Bytes::new(), path).await?;
        Ok(parse_tags(&String::from_utf8_lossy(&resp.body)))
    }

    /// A PUT of the whole object, only if its ETag is still `if_match`.
    pub(crate) async fn put(
        &self,
        path: &str,
        headers: &[(&str, String)],
        if_match: &str,
        body: Bytes,
    ) -> Result<ApiResponse, StoreError> {
        let mut all = headers.to_vec();
        all.push(("if-match", if_match.to_string()));
        self.send(Method::PUT, &self.object_url(path), &all, body, path).await
    }

    /// CreateMultipartUpload; returns the upload id.
    pub(crate) async fn create_multipart(&self, path: &str, headers: &[(&str, String)]) -> Result<String, StoreError> {
        let url = format!("{}?uploads", self.object_url(path));
        let resp = self.send(Method::POST, &url, headers, Bytes::new(), path).await?;
        xml_value(&String::from_utf8_lossy(&resp.body), "UploadId")
            .ok_or_else(|| StoreError::other(path, "CreateMultipartUpload answered without an UploadId"))
    }

    fn part_url(&self, path: &str, upload_id: &str, part: u32) -> String {
        format!(
            "{}?partNumber={part}&uploadId={}",
            self.object_url(path),
            percent_encoding::utf8_percent_encode(upload_id, VALUE_ENCODE_SET)
        )
    }

    /// UploadPart with `headers` (SSE-C needs its key on every part); returns the part's ETag.
    pub(crate) async fn upload_part(
        &self,
        path: &str,
        upload_id: &str,
        part: u32,
        body: Bytes,
        headers: &[(&str, String)],
    ) -> Result<String, StoreError> {
        let resp = self.send(Method::PUT, &self.part_url(path, upload_id, part), headers, body, path).await?;
        resp.headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| StoreError::other(path, "UploadPart answered without an ETag"))
    }

    /// UploadPartCopy of bytes `range` of the object itself, only if its ETag is still `if_match`; returns the
    /// part's ETag.
    pub(crate) async fn upload_part_copy(
        &self,
        path: &str,
        upload_id: &str,
        part: u32,
        range: Range<u64>,
        if_match: &str,
    ) -> Result<String, StoreError> {
        self.upload_part_copy_from(path, path, upload_id, part, range, if_match).await
    }

    /// UploadPartCopy of bytes `range` of `source` into an upload of `path`, only if the source's ETag is still
    /// `if_match`; returns the part's ETag.
    async fn upload_part_copy_from(
        &self,
        source: &str,
        path: &str,
        upload_id: &str,
        part: u32,
        range: Range<u64>,
        if_match: &str,
    ) -> Result<String, StoreError> {
        let headers = [
            ("x-amz-copy-source", self.copy_source(source)),
            ("x-amz-copy-source-range", format!("bytes={}-{}", range.start, range.end - 1)),
            ("x-amz-copy-source-if-match", if_match.to_string()),
        ];
        let resp = self.send(Method::PUT, &self.part_url(path, upload_id, part), &headers, Bytes::new(), path).await?;
        xml_value(&String::from_utf8_lossy(&resp.body), "ETag")
            .ok_or_else(|| StoreError::other(path, "UploadPartCopy answered without an ETag"))
    }

    /// CompleteMultipartUpload, only if the object is still what `expect` says (`If-Match` / `If-None-Match: *`).
    /// A lost race is [`StoreError::Precondition`], whether S3 says so with 412, with 409 ConditionalRequestConflict
    /// (a concurrent conditional write) or, for `If-Match` on a deleted object, with 404.
    pub(crate) async fn complete(
        &self,
        path: &str,
        upload_id: &str,
        parts: &[String],
        expect: &super::Expect,
    ) -> Result<ApiResponse, StoreError> {
        let url = format!(
            "{}?uploadId={}",
            self.object_url(path),
            percent_encoding::utf8_percent_encode(upload_id, VALUE_ENCODE_SET)
        );
        let mut body = String::from("<CompleteMultipartUpload>");
        for (i, etag) in parts.iter().enumerate() {
            body.push_str(&format!("<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>", i + 1, xml_escape(etag)));
        }
        body.push_str("</CompleteMultipartUpload>");
        let mut headers = vec![("content-type", "application/xml".to_string())];
        match expect {
            super::Expect::Any => {}
            super::Expect::Absent => headers.push(("if-none-match", "*".to_string())),
            super::Expect::Etag(etag) => headers.push(("if-match", etag.clone())),
        }
        match self.send(Method::POST, &url, &headers, Bytes::from(body), path).await {
            Err(StoreError::NotFound { key }) if matches!(expect, super::Expect::Etag(_)) => {
                Err(StoreError::Precondition { key })
            }
            other => other,
        }
    }

    /// AbortMultipartUpload. An upload S3 no longer knows (`NoSuchUpload`) counts as aborted.
    pub(crate) async fn abort(&self, path: &str, upload_id: &str) -> Result<(), StoreError> {
        let url = format!(
            "{}?uploadId={}",
            self.object_url(path),
            percent_encoding::utf8_percent_encode(upload_id, VALUE_ENCODE_SET)
        );
        match self.signed.send("s3", Method::DELETE, &url, &[], Bytes::new()).await {
            Ok(_) => Ok(()),
            // Completed, aborted or expired already: nothing is left to discard.
            Err(ApiError::Status { status: 404, code, .. }) if code.as_deref() == Some("NoSuchUpload") => Ok(()),
            Err(e) => Err(api_error(e, path)),
        }
    }

    /// Replaces the first `head.len()` bytes of the object at `path` if its ETag is still `etag`, keeping the rest of
    /// it, its metadata ([`kept_headers`]) and its tags; see [`FIRST_PART_LEN`] for the two ways. On failure after
    /// the multipart upload started it is aborted (a hard kill leaves it to the bucket's lifecycle rule).
    pub(crate) async fn replace_head(&self, path: &str, etag: &str, head: &[u8]) -> Result<Transfer, StoreError> {
        let mut cost = Transfer::default();
        let first = self.get(path, 0..FIRST_PART_LEN, etag, &[]).await?;
        cost.requests += 1;
        cost.bytes_down += first.body.len() as u64;
        if first.body.len() < head.len() {
            return Err(StoreError::invalid(format!("{path} is shorter than the {} bytes to replace", head.len())));
        }
        let mut kept = kept_headers(&first.headers);
        if tag_count(&first.headers) > 0 {
            let tags = self.tags(path).await?;
            cost.requests += 1;
            kept.push(("x-amz-tagging".into(), tagging_header(&tags)));
        }
        let headers: Vec<(&str, String)> = kept.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let mut part1 = first.body.to_vec();
        part1[..head.len()].copy_from_slice(head);
        let part1 = Bytes::from(part1);

        if first.total <= FIRST_PART_LEN {
            if first.body.len() as u64 != first.total {
                return Err(StoreError::other(path, "the GET returned fewer bytes than the object holds"));
            }
            cost.requests += 1;
            cost.bytes_up += part1.len() as u64;
            self.put(path, &headers, etag, part1).await?;
            return Ok(cost);
        }

        let upload_id = self.create_multipart(path, &headers).await?;
        cost.requests += 1;
        let result = self.fill_and_complete(path, &upload_id, part1, first.total, etag, &mut cost).await;
        if result.is_err() {
            cost.requests += 1;
            if let Err(e) = self.abort(path, &upload_id).await {
                tracing::warn!(path, error = %e, "could not abort the multipart upload; a lifecycle rule removes it");
            }
        }
        result.map(|()| cost)
    }

    /// Part 1 uploaded, the rest copied from the object itself, then completed with `If-Match`.
    async fn fill_and_complete(
        &self,
        path: &str,
        upload_id: &str,
        part1: Bytes,
        total: u64,
        etag: &str,
        cost: &mut Transfer,
    ) -> Result<(), StoreError> {
        let first_len = part1.len() as u64;
        cost.requests += 1;
        cost.bytes_up += first_len;
        let mut parts = vec![self.upload_part(path, upload_id, 1, part1, &[]).await?];
        let rest = total - first_len;
        let part_len = COPY_PART_LEN.max(rest.div_ceil(MAX_PARTS - 1));
        let mut start = first_len;
        while start < total {
            let end = (start + part_len).min(total);
            let number = u32::try_from(parts.len() + 1).expect("invariant broken: more than 10,000 parts");
            cost.requests += 1;
            parts.push(self.upload_part_copy(path, upload_id, number, start..end, etag).await?);
            start = end;
        }
        cost.requests += 1;
        self.complete(path, upload_id, &parts, &super::Expect::Etag(etag.to_string())).await?;
        Ok(())
    }

    /// A plain DeleteObject (`DELETE /key`), one request, where object_store sends a one-object DeleteObjects
    /// (`POST ?delete`). With `if_match`, only if the object is still the version with that ETag: S3 answers 412
    /// ([`StoreError::Precondition`]) when another version is there and 404 ([`StoreError::NotFound`]) when nothing is
    /// (AWS general purpose buckets since September 2025); servers without conditional deletes answer 501
    /// ([`StoreError::Unsupported`], LocalStack 4.14) and delete nothing then. Without `if_match` a missing object is
    /// not an error.
    pub(crate) async fn delete(&self, path: &str, if_match: Option<&str>) -> Result<(), StoreError> {
        let headers: Vec<(&str, String)> = if_match.map(|e| ("if-match", e.to_string())).into_iter().collect();
        match self.send(Method::DELETE, &self.object_url(path), &headers, Bytes::new(), path).await {
            Err(StoreError::NotFound { .. }) if if_match.is_none() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The response headers of a HEAD of the object.
    pub(crate) async fn head(&self, path: &str) -> Result<HeaderMap, StoreError> {
        Ok(self.send(Method::HEAD, &self.object_url(path), &[], Bytes::new(), path).await?.headers)
    }

    /// Copies `source` to `path` inside the store with `meta` as its whole user metadata (`x-amz-metadata-directive:
    /// REPLACE`), keeping the source's content headers, storage class, encryption and tags, only if the source's ETag
    /// is still what its HEAD said: no byte of content passes through the client. Up to 5 GiB one CopyObject; larger
    /// objects a multipart upload of UploadPartCopy parts. `path` may equal `source` (new metadata in place). With
    /// `if_match`, the source must still be the version with that ETag (whatever its HEAD says), or the result is
    /// [`StoreError::Precondition`] and nothing changed. Returns the new object's ETag and size.
    pub(crate) async fn copy_with_meta(
        &self,
        source: &str,
        path: &str,
        meta: &[(String, String)],
        if_match: Option<&str>,
    ) -> Result<(Option<String>, u64), StoreError> {
        let answer = self.head(source).await?;
        let header = |name: &str| answer.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = header("etag").ok_or_else(|| StoreError::other(source, "HEAD answered without an ETag"))?;
        if if_match.is_some_and(|wanted| wanted != etag) {
            // Changed since the caller decided: no request would succeed, so send none.
            return Err(StoreError::Precondition { key: source.to_string() });
        }
        let size: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut headers: Vec<(String, String)> =
            kept_headers(&answer).into_iter().filter(|(k, _)| !k.starts_with("x-amz-meta-")).collect();
        headers.extend(meta.iter().map(|(k, v)| (format!("x-amz-meta-{k}"), v.clone())));
        if size <= copy_object_max() {
            headers.push(("x-amz-copy-source".into(), self.copy_source(source)));
            headers.push(("x-amz-copy-source-if-match".into(), etag));
            headers.push(("x-amz-metadata-directive".into(), "REPLACE".into()));
            let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            let resp = self.send(Method::PUT, &self.object_url(path), &headers, Bytes::new(), path).await?;
            let new_etag = xml_value(&String::from_utf8_lossy(&resp.body), "ETag");
            return Ok((new_etag, size));
        }
        // Over 5 GiB: CreateMultipartUpload carries the headers CopyObject would have kept, tags included.
        if tag_count(&answer) > 0 {
            headers.push(("x-amz-tagging".into(), tagging_header(&self.tags(source).await?)));
        }
        let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let upload_id = self.create_multipart(path, &headers).await?;
        let result = async {
            let part_len = COPY_PART_LEN.max(size.div_ceil(MAX_PARTS));
            let mut parts = Vec::new();
            let mut start = 0;
            while start < size {
                let end = (start + part_len).min(size);
                let number = u32::try_from(parts.len() + 1).expect("invariant broken: more than 10,000 parts");
                    parts.push(self.upload_part_copy_from(source, path, &upload_id, number, start..end, &etag).await?);
                start = end;
            }
            // In place with `if_match`: the target is the source, and must still be that version when it is replaced.
            let expect = match if_match {
                Some(etag) if path == source => super::Expect::Etag(etag.to_string()),
                _ => super::Expect::Any,
            };
            let resp = self.complete(path, &upload_id, &parts, &expect).await?;
            Ok(xml_value(&String::from_utf8_lossy(&resp.body), "ETag"))
        }
        .await;
        if result.is_err() {
            if let Err(e) = self.abort(path, &upload_id).await {
                tracing::warn!(path, error = %e, "could not abort the multipart upload; a lifecycle rule removes it");
            }
        }
        result.map(|new_etag| (new_etag, size))
    }

    /// CopyObject of the object onto itself with `headers` (the caller adds directives and encryption headers),
    /// only if its ETag is still `if_match` (checked for the source and, where the server supports it, the target).
    pub(crate) async fn copy_onto_itself(
        &self,
        path: &str,
        headers: &[(&str, String)],
        if_match: &str,
    ) -> Result<ApiResponse, StoreError> {
        let mut all = vec![
            ("x-amz-copy-source", self.copy_source(path)),
            ("x-amz-copy-source-if-match", if_match.to_string()),
            ("if-match", if_match.to_string()),
        ];
        all.extend(headers.iter().map(|(k, v)| (*k, v.clone())));
        self.send(Method::PUT, &self.object_url(path), &all, Bytes::new(), path).await
    }
}

/// The headers a rewrite of an object must send so the new object keeps what the old one had (see [`KEPT_HEADERS`]),
/// from the old object's GET answer.
pub(crate) fn kept_headers(answer: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in answer {
        let name = name.as_str();
        if name.starts_with("x-amz-meta-") || KEPT_HEADERS.contains(&name) {
            if let Ok(v) = value.to_str() {
                out.push((name.to_string(), v.to_string()));
            }
        }
    }
    // Bucket Keys only apply to SSE-KMS; a server that reports it for another algorithm would refuse it back.
    if answer.get("x-amz-server-side-encryption").and_then(|v| v.to_str().ok()) == Some("aws:kms") {
        if let Some(v) = answer.get("x-amz-server-side-encryption-bucket-key-enabled").and_then(|v| v.to_str().ok()) {
            out.push(("x-amz-server-side-encryption-bucket-key-enabled".into(), v.to_string()));
        }
    }
    out
}

/// `x-amz-tagging` for a tag set: `k1=v1&k2=v2`, URL-encoded.
pub(crate) fn tagging_header(tags: &[(String, String)]) -> String {
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, VALUE_ENCODE_SET).to_string();
    tags.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

/// How many tags the GET answer says the object has (`x-amz-tagging-count`).
pub(crate) fn tag_count(answer: &HeaderMap) -> u32 {
    answer.get("x-amz-tagging-count").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn api_error(e: ApiError, path: &str) -> StoreError {
    let key = path.to_string();
    match &e {
        ApiError::Status { status: 412, .. } => StoreError::Precondition { key },
        // A conditional write that raced another one on the same key (S3 asks to retry; for us the race is lost).
        ApiError::Status { status: 409, code, .. } if code.as_deref() == Some("ConditionalRequestConflict") => {
            StoreError::Precondition { key }
        }
        ApiError::Status { status: 404, code, .. } if code.as_deref() == Some("NoSuchBucket") => {
            StoreError::MissingBucket { store: "this S3 store".into() }
        }
        ApiError::Status { status: 404, code, .. } if code.as_deref() != Some("NoSuchUpload") => {
            StoreError::NotFound { key }
        }
        ApiError::Status { status: 403, .. } => StoreError::AccessDenied { key, detail: e.to_string() },
        ApiError::Status { status: 501, .. } => StoreError::Unsupported { operation: e.to_string() },
        ApiError::TimedOut { after, .. } => {
            StoreError::TimedOut { key, after: *after, detail: "a signed S3 request".to_string() }
        }
        ApiError::Transport { detail, .. } => {
            StoreError::Unavailable { detail: detail.clone(), source: Some(Box::new(e)) }
        }
        _ => StoreError::other(key, e),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#x2B;", "+")
        .replace("&#43;", "+")
        .replace("&#x2F;", "/")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The text of the first `<name>` element of a small S3 answer.
pub(crate) fn xml_value(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml_unescape(&xml[start..end]))
}

/// Every `<Tag><Key>k</Key><Value>v</Value></Tag>` of a GetObjectTagging answer.
fn parse_tags(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<Tag>") {
        let after = &rest[at + "<Tag>".len()..];
        let end = after.find("</Tag>").unwrap_or(after.len());
        let tag = &after[..end];
        if let (Some(k), Some(v)) = (xml_value(tag, "Key"), xml_value(tag, "Value").or_else(|| Some(String::new()))) {
            out.push((k, v));
        }
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_through_the_answer_and_the_header() {
        let xml = r#"<?xml version="1.0"?><Tagging><TagSet><Tag><Key>team</Key><Value>a&amp;b</Value></Tag><Tag><Key>s3cryptfs-ssec-key-md5</Key><Value>cLyPS3KoaSFGi/joRB3OUQ==</Value></Tag></TagSet></Tagging>"#;
        let tags = parse_tags(xml);
        assert_eq!(
            tags,
            vec![("team".into(), "a&b".into()), ("s3cryptfs-ssec-key-md5".into(), "cLyPS3KoaSFGi/joRB3OUQ==".into())]
        );
        assert_eq!(tagging_header(&tags), "team=a%26b&s3cryptfs-ssec-key-md5=cLyPS3KoaSFGi%2FjoRB3OUQ%3D%3D");
        assert!(parse_tags("<Tagging><TagSet/></Tagging>").is_empty());
    }

    #[test]
    fn answers_are_read_and_only_kept_headers_carried_over() {
        let xml = "<CopyPartResult><LastModified>x</LastModified><ETag>&quot;abc&quot;</ETag></CopyPartResult>";
        assert_eq!(xml_value(xml, "ETag").as_deref(), Some("\"abc\""));
        let mut h = HeaderMap::new();
        h.insert("x-amz-meta-mode", "33188".parse().unwrap());
        h.insert("x-amz-meta-s3cryptfs-bind", "abc".parse().unwrap());
        h.insert("content-type", "application/octet-stream".parse().unwrap());
        h.insert("etag", "\"e\"".parse().unwrap());
        h.insert("x-amz-server-side-encryption", "AES256".parse().unwrap());
        h.insert("x-amz-server-side-encryption-bucket-key-enabled", "false".parse().unwrap());
        h.insert("x-amz-tagging-count", "2".parse().unwrap());
        let mut kept = kept_headers(&h);
        kept.sort();
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-amz-meta-mode", "x-amz-meta-s3cryptfs-bind", "x-amz-server-side-encryption"]);
        assert_eq!(tag_count(&h), 2);
    }

    #[test]
    fn status_codes_map_to_what_the_caller_acts_on() {
        let status = |status, code: &str| ApiError::Status {
            endpoint: "https://s3".into(),
            status,
            code: Some(code.into()),
            message: String::new(),
        };
        assert!(api_error(status(412, "PreconditionFailed"), "k").is_precondition());
        assert!(api_error(status(409, "ConditionalRequestConflict"), "k").is_precondition());
        assert!(!api_error(status(409, "BucketNotEmpty"), "k").is_precondition());
        assert!(api_error(status(404, "NoSuchKey"), "k").is_not_found());
        assert!(!api_error(status(404, "NoSuchUpload"), "k").is_not_found());
        assert!(matches!(api_error(status(403, "AccessDenied"), "k"), StoreError::AccessDenied { .. }));
    }
}
