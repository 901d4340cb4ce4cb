//! `gs://bucket[/prefix]`: Google Cloud Storage through its JSON API, with a client of our own.
//!
//! Why not object_store's GCS client: it speaks GCS's XML API, and no emulator that installs here serves that API
//! (fake-gcs-server answers its uploads with `400 invalid uploadType`; gcp-storage-emulator drops metadata and
//! preconditions), so nothing could test it. The JSON API is what fake-gcs-server serves and what Google's own client
//! libraries use, so this client is tested against the same protocol it sends in production. It implements
//! `object_store::ObjectStore` (and `PaginatedListStore`), so everything above it is shared with S3 and Azure.
//!
//! How GCS's model maps onto object_store's:
//! - An object's *generation* (a number that changes on every write of its content) is its `e_tag` and `version`.
//!   Conditional writes are `ifGenerationMatch` (`0`: nothing there yet), which GCS checks atomically; GCS's own ETag
//!   is not used because its JSON API takes no `If-Match`.
//! - User metadata is the object resource's `metadata` map. Reads of content are the one request of the XML API
//!   (`GET /bucket/object`, same token): the JSON API's media download need not carry the metadata (Google's Go
//!   client documents that it does not), the XML API's answer does, in `x-goog-meta-*`, so a ranged read stays one
//!   request. They send `x-goog-if-generation-match`, and the answer's `x-goog-generation` is checked again here
//!   (fake-gcs-server ignores the condition on reads), so a read never mixes two versions of an object; a ranged
//!   answer must be the range asked for (GCS ignores ranges of objects it decompresses).
//! - Uploads in parts are a resumable upload: GCS takes its chunks in order and in multiples of 256 KiB, so each part
//!   waits for the one before it and carries any unaligned tail over to the next; the upload finishes with the tail.
//!   Each chunk's request is bounded by the mount's timeout from when it is sent, not from when its part was handed
//!   over (`Deadline::with_serial_parts`); a chunk GCS kept only part of is sent on from where its 308 says.
//! - Writes are not repeated after a lost answer (only when they surely did not arrive, or GCS said 429/5xx): a
//!   conditional write that was applied would otherwise report a conflict with itself.
//! - Copies are `rewriteTo` (repeated until GCS says done, which matters for large objects between storage classes).
//!
//! Credentials are object_store's GCS chain (`GOOGLE_APPLICATION_CREDENTIALS`, `GOOGLE_SERVICE_ACCOUNT[_KEY]`,
//! application default credentials, the metadata server) as bearer tokens. `STORAGE_EMULATOR_HOST` (the variable
//! Google's client libraries read) points at an emulator and sends no token. `endpoint=`, `ca_file=` and `timeout=`
//! mean what they mean for S3. Nothing here touches the network until a request is made.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use http::{HeaderMap, Method, StatusCode};
use object_store::client::{HttpClient, HttpConnector, HttpError, HttpRequestBody, HttpResponse};
use object_store::gcp::GcpCredentialProvider;
use object_store::list::{PaginatedListOptions, PaginatedListResult, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, CopyMode, CopyOptions, GetOptions, GetRange, GetResult,
    GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use serde::Deserialize;

use super::conditional::UploadCondition;
use super::error::StoreError;
use super::s3::{client_options_from, S3Options};

/// The name object_store's errors carry for this store.
const STORE: &str = "GCS";
/// GCS's own endpoint.
const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
/// A resumable upload's chunks (all but the last) must be multiples of this.
const CHUNK_ALIGN: usize = 256 << 10;
/// Attempts per request for answers that may pass (5xx, 429, a broken connection).
const ATTEMPTS: u32 = 3;
/// Objects per listing page: GCS's maximum (and default).
const LIST_PAGE: usize = 1000;
/// Bytes of an error answer kept for its message.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Deletes sent at once by `delete_stream`.
const DELETES_IN_FLIGHT: usize = 10;
/// Everything but unreserved characters: object names in URL paths (including `/`) and query values.
const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, ENCODE).to_string()
}

/// The GCS client for `bucket`, configured from the environment and `opts`.
pub(super) fn build(
    bucket: &str,
    opts: &S3Options,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GcsStore, StoreError> {
    let emulator = env("STORAGE_EMULATOR_HOST").map(|h| {
        if h.starts_with("http://") || h.starts_with("https://") {
            h
        } else {
            format!("http://{h}")
        }
    });
    let base = opts
        .endpoint
        .clone()
        .or_else(|| emulator.clone())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let base = base.trim_end_matches('/').to_string();
    let allow_http = opts.allow_http || base.starts_with("http://");
    let limit: Duration = opts.request_timeout();
    let co = client_options_from(
        object_store::ClientOptions::new(),
        allow_http,
        opts.ca_file.as_ref(),
        limit,
    )?;
    let http = object_store::client::ReqwestConnector::default()
        .connect(&co)
        .map_err(|e| StoreError::invalid(format!("cannot build the HTTP client for GCS: {e}")))?;
    let auth = if emulator.is_some() {
        None
    } else {
        // object_store's builder resolves the credential chain; building it contacts nothing.
        let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(co)
            .build()
            .map_err(|e| {
                StoreError::invalid(format!(
                    "cannot configure Google Cloud Storage access for {bucket}: {e}"
                ))
            })?;
        Some(gcs.credentials().clone())
    };
    Ok(GcsStore {
        inner: Arc::new(Inner {
            http,
            base,
            bucket: bucket.to_string(),
            auth,
            page: LIST_PAGE,
            limit,
        }),
    })
}

/// An `ObjectStore` over one GCS bucket's JSON API.
#[derive(Clone)]
pub struct GcsStore {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpClient,
    /// `https://storage.googleapis.com` or the emulator's / `endpoint=`'s URL, without a trailing `/`.
    base: String,
    bucket: String,
    /// `None`: an emulator, no token.
    auth: Option<GcpCredentialProvider>,
    /// Objects per listing page ([`LIST_PAGE`]; smaller in tests, so that they follow page tokens).
    page: usize,
    /// The mount's request timeout, for the chunks of a resumable upload (see `ResumableUpload::put_part`).
    limit: Duration,
}

impl fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcsStore({} at {})", self.inner.bucket, self.inner.base)
    }
}

impl fmt::Display for GcsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GoogleCloudStorage({})", self.inner.bucket)
    }
}

/// Why a request failed, before it is given an object's name.
#[derive(Debug)]
enum Failure {
    /// GCS answered with this status; `message` is its error text.
    Status { status: StatusCode, message: String },
    /// No answer (connect, timeout, broken body): kept whole so `object::map_err` sees the `HttpError`.
    Transport(HttpError),
    /// No token could be had.
    Credentials(object_store::Error),
}

/// A failed request's text, for the error chain; the status is spelled as object_store spells it ("status code: 5xx"
/// is how `object::map_err` tells a server that kept failing from a refusal).
#[derive(Debug, thiserror::Error)]
#[error("GCS answered {what} with status code: {status}: {message}")]
struct StatusError {
    what: String,
    status: u16,
    message: String,
}

impl Failure {
    /// A 404 that can only be the bucket's (an upload or a listing names no existing object), or that GCS says is the
    /// bucket's, spelled "NoSuchBucket" as S3 spells it, so that `object::map_err` makes it a missing bucket rather
    /// than a missing object (which a write would turn into ENOENT).
    fn bucket_404(self, bucket: &str, surely: bool) -> Self {
        match self {
            Failure::Status {
                status: StatusCode::NOT_FOUND,
                message,
            } if surely || message.contains("bucket does not exist") => Failure::Status {
                status: StatusCode::NOT_FOUND,
                message: format!("NoSuchBucket: GCS bucket {bucket} not found ({message})"),
            },
            f => f,
        }
    }

    /// The object_store error for this failure of `what` on `path`.
    fn into_error(self, what: &str, path: &str) -> object_store::Error {
        use object_store::Error as E;
        let (status, message) = match self {
            Failure::Transport(e) => {
                return E::Generic {
                    store: STORE,
                    source: Box::new(e),
                }
            }
            Failure::Credentials(e) => {
                return E::Unauthenticated {
                    path: path.to_string(),
                    source: Box::new(e),
                };
            }
            Failure::Status { status, message } => (status, message),
        };
        let source = Box::new(StatusError {
            what: what.to_string(),
            status: status.as_u16(),
            message,
        });
        let path = path.to_string();
        match status {
            StatusCode::NOT_FOUND => E::NotFound { path, source },
            StatusCode::PRECONDITION_FAILED => E::Precondition { path, source },
            StatusCode::NOT_MODIFIED => E::NotModified { path, source },
            StatusCode::UNAUTHORIZED => E::Unauthenticated { path, source },
            StatusCode::FORBIDDEN => E::PermissionDenied { path, source },
            _ => E::Generic {
                store: STORE,
                source,
            },
        }
    }
}

/// GCS's JSON error body: `{"error": {"code": 404, "message": "..."}}`.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => b.error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string(),
    }
}

/// A number GCS sends as a JSON string (`"size": "11"`), or as a number.
fn de_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        S(String),
        N(u64),
    }
    match Num::deserialize(d)? {
        Num::N(n) => Ok(n),
        Num::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// The fields of an object resource this client uses.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Object {
    name: String,
    #[serde(deserialize_with = "de_u64", default)]
    size: u64,
    #[serde(deserialize_with = "de_u64")]
    generation: u64,
    updated: Option<DateTime<Utc>>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    content_type: Option<String>,
    cache_control: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    content_language: Option<String>,
}

impl Object {
    fn meta(&self) -> object_store::Result<ObjectMeta> {
        Ok(ObjectMeta {
            location: Path::parse(&self.name)?,
            last_modified: self.updated.unwrap_or_else(Utc::now),
            size: self.size,
            e_tag: Some(etag(self.generation)),
            version: Some(self.generation.to_string()),
        })
    }

    fn attributes(&self) -> Attributes {
        let mut attrs = Attributes::new();
        for (k, v) in &self.metadata {
            attrs.insert(Attribute::Metadata(k.clone().into()), v.clone().into());
        }
        let fields = [
            (Attribute::ContentType, &self.content_type),
            (Attribute::CacheControl, &self.cache_control),
            (Attribute::ContentDisposition, &self.content_disposition),
            (Attribute::ContentEncoding, &self.content_encoding),
            (Attribute::ContentLanguage, &self.content_language),
        ];
        for (attr, value) in fields {
            if let Some(v) = value {
                attrs.insert(attr, v.clone().into());
            }
        }
        attrs
    }

    fn put_result(&self) -> PutResult {
        let version = Some(self.generation.to_string());
        PutResult {
            e_tag: Some(etag(self.generation)),
            version,
            extensions: Default::default(),
        }
    }
}

/// One page of an object listing.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct Listing {
    #[serde(default)]
    items: Vec<Object>,
    #[serde(default)]
    prefixes: Vec<String>,
    next_page_token: Option<String>,
}

impl Listing {
    /// The page's objects after `start` (exclusive: GCS's `startOffset` is inclusive). A name that is not a usable
    /// path (`a//b`, written by another tool) is skipped with a warning, not allowed to fail the whole listing.
    fn objects(&self, start: Option<&str>) -> Vec<ObjectMeta> {
        let after = |o: &&Object| start.is_none_or(|s| o.name.as_str() > s);
        self.items
            .iter()
            .filter(after)
            .filter_map(|o| skip_bad(&o.name, o.meta()))
            .collect()
    }

    /// The page's common prefixes, as paths (the same skipping).
    fn dirs(&self) -> Vec<Path> {
        self.prefixes
            .iter()
            .filter_map(|p| skip_bad(p, Path::parse(p.trim_end_matches('/')).map_err(Into::into)))
            .collect()
    }
}

fn skip_bad<T>(name: &str, parsed: object_store::Result<T>) -> Option<T> {
    parsed.map_err(|e| tracing::warn!(name, error = %e, "skipping a GCS object whose name is not a usable path")).ok()
}

/// `attributes` as the JSON of an object resource (`name` added by the caller).
fn resource(attributes: &Attributes) -> serde_json::Map<String, serde_json::Value> {
    let mut res = serde_json::Map::new();
    let mut metadata = serde_json::Map::new();
    for (attr, value) in attributes {
        let v = serde_json::Value::String(AsRef::<str>::as_ref(value).to_string());
        let field = match attr {
            Attribute::Metadata(name) => {
                metadata.insert(name.to_string(), v);
                continue;
            }
            Attribute::ContentType => "contentType",
            Attribute::CacheControl => "cacheControl",
            Attribute::ContentDisposition => "contentDisposition",
            Attribute::ContentEncoding => "contentEncoding",
            Attribute::ContentLanguage => "contentLanguage",
            // Storage class and the like have no GCS equivalent we set.
            _ => continue,
        };
        res.insert(field.to_string(), v);
    }
    if !metadata.is_empty() {
        res.insert("metadata".into(), serde_json::Value::Object(metadata));
    }
    res
}

/// A generation as an ETag, quoted as HTTP quotes ETags (S3 and Azure answer writes with quoted ones, and the
/// backend compares a write's ETag with a listing's).
fn etag(generation: u64) -> String {
    format!("\"{generation}\"")
}

/// The generation a write in `mode` must find (`0`: no object), or `None` for an overwrite.
fn required_generation(mode: &PutMode, path: &Path) -> object_store::Result<Option<u64>> {
    match mode {
        PutMode::Overwrite => Ok(None),
        PutMode::Create => Ok(Some(0)),
        PutMode::Update(v) => {
            generation_of(v.version.as_ref().or(v.e_tag.as_ref()), path).map(Some)
        }
    }
}

/// The generation a write or read must find, from an object_store version (`None`: no condition).
fn generation_of(tag: Option<&String>, path: &Path) -> object_store::Result<u64> {
    tag.and_then(|t| t.trim_matches('"').parse().ok())
        .ok_or_else(|| object_store::Error::Precondition {
            path: path.to_string(),
            source: format!("{tag:?} is not a GCS generation").into(),
        })
}

impl Inner {
    fn object_url(&self, path: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base,
            enc(&self.bucket),
            enc(path)
        )
    }

    /// The XML API's URL of an object (path-style; `/` kept, every segment encoded).
    fn xml_object_url(&self, path: &str) -> String {
        let segments: Vec<String> = path.split('/').map(enc).collect();
        format!("{}/{}/{}", self.base, enc(&self.bucket), segments.join("/"))
    }

    fn bucket_url(&self) -> String {
        format!("{}/storage/v1/b/{}/o", self.base, enc(&self.bucket))
    }

    fn upload_url(&self) -> String {
        format!("{}/upload/storage/v1/b/{}/o", self.base, enc(&self.bucket))
    }

    /// Sends one request, retrying what may pass on a second try, and returns a success with its body unread or a
    /// failure with GCS's error message. A 308 is a success only for a resumable chunk (a request with a
    /// `content-range`), where it means "send more".
    ///
    /// Reads, listings and deletes are retried after any transport failure, 429 or 5xx. Writes (POST, PUT) only
    /// when they surely did not arrive (no connection, request not sent) or GCS said 429/5xx: a write whose answer
    /// was lost may have been applied, and repeating a conditional one would then report a conflict with itself.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<HttpResponse, Failure> {
        use object_store::client::HttpErrorKind;
        let idempotent = matches!(method, Method::GET | Method::HEAD | Method::DELETE);
        let chunk = headers.iter().any(|(name, _)| *name == "content-range");
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << (2 * (attempt - 1)))).await;
            }
            let mut req = http::Request::builder().method(method.clone()).uri(url);
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            if let Some(auth) = &self.auth {
                let token = auth.get_credential().await.map_err(Failure::Credentials)?;
                req = req.header("authorization", format!("Bearer {}", token.bearer));
            }
            let req = req
                .body(HttpRequestBody::from(body.clone()))
                .map_err(|e| Failure::Transport(HttpError::new(HttpErrorKind::Request, e)))?;
            let resp = match self.http.execute(req).await {
                Ok(r) => r,
                Err(e) => {
                    let unsent =
                        matches!(e.kind(), HttpErrorKind::Connect | HttpErrorKind::Request);
                    if !(idempotent || unsent) {
                        return Err(Failure::Transport(e));
                    }
                    last = Some(Failure::Transport(e));
                    continue;
                }
            };
            let status = resp.status();
            if status.is_success() || (chunk && status == StatusCode::PERMANENT_REDIRECT) {
                return Ok(resp);
            }
            let text = super::read_capped(resp, MAX_ERROR_BODY).await;
            let failure = Failure::Status {
                status,
                message: error_message(&text),
            };
            if !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS) {
                return Err(failure);
            }
            last = Some(failure);
        }
        Err(last.expect("invariant broken: the retry loop ran at least once"))
    }

    /// A request whose answer is an object resource.
    async fn send_for_object(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Object, Failure> {
        let resp = self.send(method, url, headers, body).await?;
        json(resp).await
    }

    async fn metadata(&self, path: &Path, generation: Option<u64>) -> object_store::Result<Object> {
        let mut url = self.object_url(path.as_ref());
        if let Some(g) = generation {
            url.push_str(&format!("?ifGenerationMatch={g}"));
        }
        self.send_for_object(Method::GET, &url, &[], Bytes::new())
            .await
            .map_err(|f| {
                f.bucket_404(&self.bucket, false)
                    .into_error("a metadata request", path.as_ref())
            })
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: bool,
        start: Option<&str>,
        max: Option<usize>,
        token: Option<&str>,
    ) -> object_store::Result<Listing> {
        let mut url = format!("{}?prefix={}", self.bucket_url(), enc(prefix));
        if delimiter {
            url.push_str("&delimiter=%2F");
        }
        if let Some(start) = start {
            url.push_str(&format!("&startOffset={}", enc(start)));
        }
        url.push_str(&format!(
            "&maxResults={}",
            max.unwrap_or(self.page).min(self.page)
        ));
        if let Some(token) = token {
            url.push_str(&format!("&pageToken={}", enc(token)));
        }
        let resp = self.send(Method::GET, &url, &[], Bytes::new()).await;
        let listing: Result<Listing, Failure> = match resp {
            Ok(resp) => json(resp).await,
            Err(e) => Err(e),
        };
        listing.map_err(|f| {
            f.bucket_404(&self.bucket, true)
                .into_error("a listing", prefix)
        })
    }

    /// Every object under `prefix` (`p/` form or empty) from `start` on (exclusive), page by page.
    fn list_stream(
        self: Arc<Self>,
        prefix: String,
        start: Option<String>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        stream::try_unfold((Some(None::<String>), self), move |(token, inner)| {
            let (prefix, start) = (prefix.clone(), start.clone());
            async move {
                let Some(token) = token else {
                    return Ok::<_, object_store::Error>(None);
                };
                let page = inner
                    .list_page(&prefix, false, start.as_deref(), None, token.as_deref())
                    .await?;
                let metas: Vec<object_store::Result<ObjectMeta>> =
                    page.objects(start.as_deref()).into_iter().map(Ok).collect();
                let next = page.next_page_token.map(Some);
                Ok(Some((stream::iter(metas), (next, inner))))
            }
        })
        .try_flatten()
        .boxed()
    }

    async fn delete(&self, path: &Path) -> object_store::Result<()> {
        let sent = self
            .send(
                Method::DELETE,
                &self.object_url(path.as_ref()),
                &[],
                Bytes::new(),
            )
            .await;
        match sent.map_err(|f| f.bucket_404(&self.bucket, false)) {
            // Deleting a missing object succeeds; a missing bucket does not.
            Ok(_) => Ok(()),
            Err(Failure::Status {
                status: StatusCode::NOT_FOUND,
                message,
            }) if !message.starts_with("NoSuchBucket") => Ok(()),
            Err(f) => Err(f.into_error("a delete", path.as_ref())),
        }
    }
}

/// A response's body as JSON.
async fn json<T: serde::de::DeserializeOwned>(resp: HttpResponse) -> Result<T, Failure> {
    let status = resp.status();
    let body = resp.into_body().bytes().await.map_err(Failure::Transport)?;
    serde_json::from_slice(&body).map_err(|e| Failure::Status {
        status: if status.is_success() {
            StatusCode::BAD_GATEWAY
        } else {
            status
        },
        message: format!(
            "an answer that is not the JSON expected ({e}): {}",
            error_message(&body)
        ),
    })
}

/// `(name, value)` of a header, as text.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A `multipart/related` body: the object resource as JSON, then the content.
fn multipart_related(resource: &serde_json::Value, payload: &PutPayload) -> (String, Bytes) {
    let boundary = format!("s3cryptfs-{:032x}", rand::random::<u128>());
    let mut body = BytesMut::with_capacity(payload.content_length() + 512);
    body.extend_from_slice(
        format!("--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(resource.to_string().as_bytes());
    body.extend_from_slice(
        format!("\r\n--{boundary}\r\ncontent-type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    for part in payload.iter() {
        body.extend_from_slice(part);
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/related; boundary={boundary}"),
        body.freeze(),
    )
}

#[async_trait]
impl ObjectStore for GcsStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let mut url = format!("{}?uploadType=multipart", self.inner.upload_url());
        if let Some(g) = required_generation(&opts.mode, location)? {
            url.push_str(&format!("&ifGenerationMatch={g}"));
        }
        let mut res = resource(&opts.attributes);
        res.insert("name".into(), location.as_ref().into());
        let (content_type, body) = multipart_related(&serde_json::Value::Object(res), &payload);
        match self
            .inner
            .send_for_object(Method::POST, &url, &[("content-type", content_type)], body)
            .await
        {
            Ok(o) => Ok(o.put_result()),
            Err(Failure::Status {
                status: StatusCode::PRECONDITION_FAILED,
                message,
            }) if opts.mode == PutMode::Create => Err(object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: message.into(),
            }),
            Err(f) => Err(f
                .bucket_404(&self.inner.bucket, true)
                .into_error("an upload", location.as_ref())),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let mut url = format!(
            "{}?uploadType=resumable&name={}",
            self.inner.upload_url(),
            enc(location.as_ref())
        );
        let must_be = match opts.extensions.get::<UploadCondition>() {
            Some(UploadCondition(mode)) => required_generation(mode, location)?,
            None => None,
        };
        if let Some(g) = must_be {
            // GCS checks it when the upload completes (see `ResumableUpload::complete`).
            url.push_str(&format!("&ifGenerationMatch={g}"));
        }
        let res = serde_json::Value::Object(resource(&opts.attributes));
        let headers = [(
            "content-type",
            "application/json; charset=UTF-8".to_string(),
        )];
        let resp = self
            .inner
            .send(Method::POST, &url, &headers, Bytes::from(res.to_string()))
            .await
            .map_err(|f| {
                f.bucket_404(&self.inner.bucket, true)
                    .into_error("starting an upload", location.as_ref())
            })?;
        // The session URL gets the token with every chunk: it must be the endpoint's own, not a host an answer names.
        let origin = |u: &str| u.split('/').take(3).collect::<Vec<_>>().join("/");
        let session = header(resp.headers(), "location").map(str::to_string);
        let Some(session) = session.filter(|s| origin(s) == origin(&self.inner.base)) else {
            return Err(object_store::Error::Generic {
                store: STORE,
                source: format!(
                    "GCS started a resumable upload without a session URL at {}",
                    self.inner.base
                )
                .into(),
            });
        };
        let done: Shared<BoxFuture<'static, Result<(), String>>> =
            futures::future::ready(Ok(())).boxed().shared();
        Ok(Box::new(ResumableUpload {
            inner: self.inner.clone(),
            path: location.clone(),
            session: Arc::new(session),
            carry: BytesMut::new(),
            sent: 0,
            last: done,
            must_be,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let inner = &self.inner;
        let must_be = match &options.if_match {
            Some(tag) if tag != "*" => Some(generation_of(Some(tag), location)?),
            _ => None,
        };
        if options.head {
            let o = inner.metadata(location, must_be).await?;
            let meta = o.meta()?;
            options.check_preconditions(&meta)?;
            return Ok(GetResult {
                payload: GetResultPayload::Stream(stream::empty().boxed()),
                range: 0..0,
                attributes: o.attributes(),
                meta,
                extensions: Default::default(),
            });
        }
        // The XML API's GET: the JSON API's media download need not carry the object's metadata (Google's Go client
        // says it does not), the XML API's always does, in `x-goog-meta-*`. Same token, same generation.
        let mut url = inner.xml_object_url(location.as_ref());
        if let Some(v) = &options.version {
            url.push_str(&format!("?generation={}", enc(v)));
        }
        let mut headers = Vec::new();
        if let Some(g) = must_be {
            headers.push(("x-goog-if-generation-match", g.to_string()));
        }
        if let Some(range) = &options.range {
            let spec = match range {
                GetRange::Bounded(r) if r.start >= r.end => {
                    return Err(object_store::Error::Generic {
                        store: STORE,
                        source: format!("an empty range {r:?} of {location}").into(),
                    });
                }
                GetRange::Bounded(r) => format!("bytes={}-{}", r.start, r.end - 1),
                GetRange::Offset(o) => format!("bytes={o}-"),
                GetRange::Suffix(n) => format!("bytes=-{n}"),
            };
            headers.push(("range", spec));
        }
        let resp = inner
            .send(Method::GET, &url, &headers, Bytes::new())
            .await
            .map_err(|f| {
                f.bucket_404(&inner.bucket, false)
                    .into_error("a read", location.as_ref())
            })?;
        let h = resp.headers();
        let bad = |what: String| object_store::Error::Generic {
            store: STORE,
            source: what.into(),
        };
        let generation: u64 = header(h, "x-goog-generation")
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| {
                bad(format!(
                    "a read of {location} was answered without x-goog-generation"
                ))
            })?;
        let number = |name: &str| header(h, name).and_then(|l| l.parse::<u64>().ok());
        let (range, size) = match (
            &options.range,
            header(h, "content-range").and_then(parse_content_range),
        ) {
            (Some(asked), Some((range, size))) => {
                // The bytes must start where they were asked for (a suffix starts where the object's end says).
                let start = match asked {
                    GetRange::Bounded(r) => r.start,
                    GetRange::Offset(o) => *o,
                    GetRange::Suffix(n) => size.saturating_sub(*n),
                };
                if range.start != start
                    || number("content-length").is_some_and(|l| l != range.end - range.start)
                {
                    return Err(bad(format!(
                        "a read of {location} got bytes {range:?} for {asked:?}"
                    )));
                }
                (range, size)
            }
            // GCS ignores a range when it decompresses an object stored with Content-Encoding: gzip.
            (Some(asked), None) => {
                return Err(bad(format!(
                    "a read of {location} got the whole object for the range {asked:?}"
                )));
            }
            (None, _) => {
                let size = number("content-length")
                    .or_else(|| number("x-goog-stored-content-length"))
                    .ok_or_else(|| {
                        bad(format!(
                            "a read of {location} was answered without its length"
                        ))
                    })?;
                (0..size, size)
            }
        };
        let last_modified = header(h, "last-modified")
            .and_then(|t| DateTime::parse_from_rfc2822(t).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
        let mut attributes = Attributes::new();
        for (name, value) in h {
            let (Some(key), Ok(value)) =
                (name.as_str().strip_prefix("x-goog-meta-"), value.to_str())
            else {
                continue;
            };
            attributes.insert(
                Attribute::Metadata(key.to_string().into()),
                AttributeValue::from(value.to_string()),
            );
        }
        if let Some(ct) = header(h, "content-type") {
            attributes.insert(Attribute::ContentType, ct.to_string().into());
        }
        let meta = ObjectMeta {
            location: location.clone(),
            last_modified,
            size,
            e_tag: Some(etag(generation)),
            version: Some(generation.to_string()),
        };
        // fake-gcs-server ignores the generation condition on reads: check what came back.
        options.check_preconditions(&meta)?;
        let body = resp
            .into_body()
            .bytes_stream()
            .map_err(|e| object_store::Error::Generic {
                store: STORE,
                source: Box::new(e),
            })
            .boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(body),
            meta,
            range,
            attributes,
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = self.inner.clone();
        locations
            .map(move |p| {
                let inner = inner.clone();
                async move {
                    let p = p?;
                    inner.delete(&p).await?;
                    Ok(p)
                }
            })
            .buffered(DELETES_IN_FLIGHT)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.clone().list_stream(dir_prefix(prefix), None)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner
            .clone()
            .list_stream(dir_prefix(prefix), Some(offset.to_string()))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let prefix = dir_prefix(prefix);
        let mut result = ListResult {
            common_prefixes: Vec::new(),
            objects: Vec::new(),
            extensions: Default::default(),
        };
        let mut token = None;
        loop {
            let page = self
                .inner
                .list_page(&prefix, true, None, None, token.as_deref())
                .await?;
            result.objects.extend(page.objects(None));
            result.common_prefixes.extend(page.dirs());
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(result),
            }
        }
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let inner = &self.inner;
        let mut base = format!(
            "{}/rewriteTo/b/{}/o/{}",
            inner.object_url(from.as_ref()),
            enc(&inner.bucket),
            enc(to.as_ref())
        );
        if options.mode == CopyMode::Create {
            base.push_str("?ifGenerationMatch=0");
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Rewrite {
            done: bool,
            rewrite_token: Option<String>,
        }
        let mut token: Option<String> = None;
        loop {
            let url = match &token {
                None => base.clone(),
                Some(t) => format!(
                    "{base}{}rewriteToken={}",
                    if base.contains('?') { '&' } else { '?' },
                    enc(t)
                ),
            };
            let headers = [("content-type", "application/json".to_string())];
            let resp = match inner
                .send(Method::POST, &url, &headers, Bytes::from_static(b"{}"))
                .await
            {
                Ok(resp) => json::<Rewrite>(resp).await,
                Err(f) => Err(f),
            };
            let rewrite = match resp {
                Ok(r) => r,
                Err(Failure::Status {
                    status: StatusCode::PRECONDITION_FAILED,
                    message,
                }) if options.mode == CopyMode::Create => {
                    return Err(object_store::Error::AlreadyExists {
                        path: to.to_string(),
                        source: message.into(),
                    });
                }
                Err(f) => return Err(f.into_error("a copy", from.as_ref())),
            };
            if rewrite.done {
                return Ok(());
            }
            token = rewrite.rewrite_token;
            if token.is_none() {
                return Err(object_store::Error::Generic {
                    store: STORE,
                    source: "GCS answered an unfinished rewrite without a rewriteToken".into(),
                });
            }
        }
    }
}

#[async_trait]
impl PaginatedListStore for GcsStore {
    async fn list_paginated(
        &self,
        prefix: Option<&str>,
        opts: PaginatedListOptions,
    ) -> object_store::Result<PaginatedListResult> {
        let prefix = prefix.unwrap_or("");
        let delimiter = match opts.delimiter.as_deref() {
            None => false,
            Some("/") => true,
            Some(d) => {
                return Err(object_store::Error::NotSupported {
                    source: format!("GCS lists by '/' only, not {d:?}").into(),
                })
            }
        };
        let start = opts.offset.as_deref();
        let page = self
            .inner
            .list_page(
                prefix,
                delimiter,
                start,
                opts.max_keys,
                opts.page_token.as_deref(),
            )
            .await?;
        let objects = page.objects(start);
        let common_prefixes = page.dirs();
        Ok(PaginatedListResult {
            result: ListResult {
                common_prefixes,
                objects,
                extensions: Default::default(),
            },
            page_token: page.next_page_token,
        })
    }
}

/// object_store's listing prefix: a path is a directory, so `a/b` lists `a/b/…`.
fn dir_prefix(prefix: Option<&Path>) -> String {
    match prefix.map(|p| p.as_ref()).filter(|p| !p.is_empty()) {
        Some(p) => format!("{p}/"),
        None => String::new(),
    }
}

/// `bytes A-B/SIZE` → (A..B+1, SIZE).
fn parse_content_range(value: &str) -> Option<(std::ops::Range<u64>, u64)> {
    let (range, size) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b, size): (u64, u64, u64) = (a.parse().ok()?, b.parse().ok()?, size.parse().ok()?);
    (a <= b).then_some((a..b + 1, size))
}

/// `text` without the upload session's URL: its `upload_id` lets anyone who reads it finish the upload with other
/// bytes, and transport errors quote the URL they failed on (reqwest's do), which would put it in the log.
fn redact(text: &str, session: &str) -> String {
    text.replace(session, "<the upload session's URL>")
}

/// A resumable upload: parts go out in order, in multiples of [`CHUNK_ALIGN`].
struct ResumableUpload {
    inner: Arc<Inner>,
    path: Path,
    session: Arc<String>,
    /// What the last part left over (less than [`CHUNK_ALIGN`]): it goes out first with the next part, or at the end.
    carry: BytesMut,
    /// Bytes handed to chunks so far (the offset of `carry`).
    sent: u64,
    /// The last chunk's outcome; each chunk waits for the one before it.
    last: Shared<BoxFuture<'static, Result<(), String>>>,
    /// The generation the object must have when the upload completes (`0`: none), from [`UploadCondition`].
    must_be: Option<u64>,
}

impl fmt::Debug for ResumableUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResumableUpload({} at {})", self.path, self.sent)
    }
}

impl ResumableUpload {
    /// PUT `chunk` at `offset`; `total` is the object's size when this is the last chunk. A chunk GCS kept only part
    /// of (its 308 names what it has, `Range: bytes=0-N`) is sent on from there, as GCS asks.
    async fn put_chunk(
        inner: &Inner,
        session: &str,
        chunk: Bytes,
        offset: u64,
        total: Option<u64>,
    ) -> Result<HttpResponse, Failure> {
        let total_text = total.map_or_else(|| "*".to_string(), |t| t.to_string());
        let end = offset + chunk.len() as u64;
        let mut at = offset;
        for _ in 0..ATTEMPTS {
            let range = if at == end {
                format!("bytes */{total_text}")
            } else {
                format!("bytes {at}-{}/{total_text}", end - 1)
            };
            let body = chunk.slice((at - offset) as usize..);
            let resp = inner
                .send(Method::PUT, session, &[("content-range", range)], body)
                .await?;
            if resp.status() != StatusCode::PERMANENT_REDIRECT || total.is_some() {
                return Ok(resp);
            }
            let kept = header(resp.headers(), "range")
                .and_then(|r| r.strip_prefix("bytes=0-"))
                .and_then(|n| n.parse::<u64>().ok())
                .map_or(0, |n| n + 1);
            if kept >= end {
                return Ok(resp);
            }
            if kept < at {
                break;
            }
            at = kept;
        }
        Err(Failure::Status {
            status: StatusCode::BAD_GATEWAY,
            message: format!("GCS kept no more than part of the upload chunk at {offset}"),
        })
    }
}

#[async_trait]
impl MultipartUpload for ResumableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        for part in data.iter() {
            self.carry.extend_from_slice(part);
        }
        let aligned = self.carry.len() - self.carry.len() % CHUNK_ALIGN;
        let chunk = self.carry.split_to(aligned).freeze();
        let offset = self.sent;
        self.sent += aligned as u64;
        let (inner, session, before, path) = (
            self.inner.clone(),
            self.session.clone(),
            self.last.clone(),
            self.path.to_string(),
        );
        let this = async move {
            before.await?;
            if chunk.is_empty() {
                return Ok(());
            }
            // Bounded here rather than by `Deadline` (`with_serial_parts`): the wait for the chunks before this one
            // is not this request's time.
            let sent = tokio::time::timeout(
                inner.limit,
                Self::put_chunk(&inner, &session, chunk, offset, None),
            )
            .await;
            let Ok(sent) = sent else {
                let timed_out = super::deadline::RequestTimedOut {
                    operation: "UploadPart",
                    limit: inner.limit,
                };
                return Err(format!("an upload chunk of {path}: {timed_out}"));
            };
            match sent {
                Ok(resp) if resp.status() == StatusCode::PERMANENT_REDIRECT => Ok(()),
                Ok(resp) => Err(format!(
                    "GCS finished the upload of {path} early (status {})",
                    resp.status()
                )),
                Err(f) => Err(redact(
                    &f.into_error("an upload chunk", &path).to_string(),
                    &session,
                )),
            }
        }
        .boxed()
        .shared();
        self.last = this.clone();
        async move {
            this.await.map_err(|e| object_store::Error::Generic {
                store: STORE,
                source: e.into(),
            })
        }
        .boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let path = self.path.to_string();
        let chained = |e: String| object_store::Error::Generic {
            store: STORE,
            source: e.into(),
        };
        self.last.clone().await.map_err(chained)?;
        if let Some(g) = self.must_be {
            // GCS checks `ifGenerationMatch` atomically when the last chunk arrives; fake-gcs-server ignores it on
            // resumable uploads, so it is also checked here first (as on servers that ignore conditions, a writer
            // racing this very moment is then caught by GCS alone).
            let found = match self.inner.metadata(&self.path, None).await {
                Ok(o) => o.generation,
                Err(object_store::Error::NotFound { .. }) => 0,
                Err(e) => return Err(e),
            };
            if found != g {
                let _ = self.abort().await;
                let source = format!("generation {found}, not {g}").into();
                return Err(match g {
                    0 => object_store::Error::AlreadyExists { path, source },
                    _ => object_store::Error::Precondition { path, source },
                });
            }
        }
        let tail = std::mem::take(&mut self.carry).freeze();
        let total = self.sent + tail.len() as u64;
        let resp =
            match Self::put_chunk(&self.inner, &self.session, tail, self.sent, Some(total)).await {
                Ok(resp) => resp,
                // The session's 404 or 410 (expired, cancelled) is no missing object: no ENOENT for a file written.
                Err(Failure::Status { status, message })
                    if status == StatusCode::NOT_FOUND || status == StatusCode::GONE =>
                {
                    return Err(chained(format!(
                        "the upload session of {path} is gone ({status}: {message})"
                    )));
                }
                Err(f) => {
                    let text = redact(
                        &f.into_error("finishing an upload", &path).to_string(),
                        &self.session,
                    );
                    return Err(chained(text));
                }
            };
        if resp.status() == StatusCode::PERMANENT_REDIRECT {
            return Err(chained(format!(
                "GCS did not finish the upload of {path} at {total} bytes"
            )));
        }
        let object: Object = json(resp).await.map_err(|f| {
            chained(redact(
                &f.into_error("finishing an upload", &path).to_string(),
                &self.session,
            ))
        })?;
        Ok(object.put_result())
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        // GCS answers a cancelled session with 499; any answer means it is gone or will expire within a week.
        let _ = self
            .inner
            .send(Method::DELETE, &self.session, &[], Bytes::new())
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_and_prefixes() {
        assert_eq!(parse_content_range("bytes 2-6/11"), Some((2..7, 11)));
        assert_eq!(parse_content_range("bytes 6-2/11"), None);
        assert_eq!(parse_content_range("bytes */11"), None);
        assert_eq!(dir_prefix(None), "");
        assert_eq!(dir_prefix(Some(&Path::from("a/b"))), "a/b/");
        assert_eq!(enc("a/b c+é"), "a%2Fb%20c%2B%C3%A9");
    }

    #[test]
    fn resources_and_errors() {
        let json = r#"{"name":"a/b","size":"11","generation":"17","metadata":{"mode":"644"},"contentType":"x/y"}"#;
        let o: Object = serde_json::from_str(json).unwrap();
        assert_eq!((o.size, o.generation), (11, 17));
        let meta = o.meta().unwrap();
        assert_eq!((meta.e_tag.as_deref(), meta.size), (Some("\"17\""), 11));
        let attrs = o.attributes();
        assert_eq!(
            attrs
                .get(&Attribute::Metadata("mode".into()))
                .map(|v| v.as_ref()),
            Some("644")
        );
        let back = resource(&attrs);
        assert_eq!(back["metadata"]["mode"], "644");
        assert_eq!(back["contentType"], "x/y");
        assert_eq!(
            error_message(br#"{"error":{"code":412,"message":"Precondition failed"}}"#),
            "Precondition failed"
        );
        let e = Failure::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "busy".into(),
        }
        .into_error("a read", "k");
        assert!(e.to_string().contains("status code: 503"), "{e}");
        assert!(generation_of(Some(&"\"abc\"".to_string()), &Path::from("k")).is_err());
        assert_eq!(
            generation_of(Some(&"42".to_string()), &Path::from("k")).unwrap(),
            42
        );
    }

    /// Listings follow page tokens (pages of 3 here) in all three forms, and a listing from an offset starts after it.
    #[tokio::test]
    async fn listings_follow_page_tokens() {
        use object_store::ObjectStoreExt;
        let bucket = std::env::var("S3CRYPTFS_TEST_GCS_BUCKET")
            .expect("S3CRYPTFS_TEST_GCS_BUCKET is not set: run the tests with scripts/test.sh");
        let env = |k: &str| std::env::var(k).ok();
        let store = build(&bucket, &S3Options::default(), &env).unwrap();
        let store = GcsStore {
            inner: Arc::new(Inner {
                page: 3,
                ..Arc::into_inner(store.inner).unwrap()
            }),
        };
        let root = format!("pages-{}-{}", std::process::id(), rand::random::<u32>());
        let files: Vec<String> = (0..7).map(|i| format!("{root}/f{i}")).collect();
        let dirs: Vec<String> = (0..4).map(|i| format!("{root}/d{i}/x")).collect();
        for name in files.iter().chain(&dirs) {
            store
                .put(&Path::from(name.as_str()), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        let names = |metas: Vec<ObjectMeta>| {
            metas
                .into_iter()
                .map(|m| m.location.to_string())
                .collect::<Vec<_>>()
        };
        let mut all = names(
            store
                .list(Some(&Path::from(root.as_str())))
                .try_collect()
                .await
                .unwrap(),
        );
        all.sort();
        let mut want: Vec<String> = files.iter().chain(&dirs).cloned().collect();
        want.sort();
        assert_eq!(all, want);
        let listed = store
            .list_with_delimiter(Some(&Path::from(root.as_str())))
            .await
            .unwrap();
        assert_eq!(names(listed.objects), files);
        let prefixes: Vec<String> = listed
            .common_prefixes
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            prefixes,
            (0..4).map(|i| format!("{root}/d{i}")).collect::<Vec<_>>()
        );
        let from = Path::from(format!("{root}/f2"));
        let after = names(
            store
                .list_with_offset(Some(&Path::from(root.as_str())), &from)
                .try_collect()
                .await
                .unwrap(),
        );
        assert_eq!(after, files[3..]);
    }

    #[test]
    fn errors_do_not_quote_the_upload_session() {
        let session = "https://storage.googleapis.com/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=SECRET";
        let text = format!("error sending request for url ({session}): connection reset");
        let out = redact(&text, session);
        assert!(
            !out.contains("SECRET") && out.contains("<the upload session's URL>"),
            "{out}"
        );
    }

    #[test]
    fn a_multipart_body_frames_the_resource_and_the_content() {
        let payload: PutPayload = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")]
            .into_iter()
            .collect();
        let (ct, body) = multipart_related(&serde_json::json!({"name": "k"}), &payload);
        let boundary = ct.strip_prefix("multipart/related; boundary=").unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let parts: Vec<&str> = text.split(&format!("--{boundary}")).collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert!(parts[1].ends_with("\r\n\r\n{\"name\":\"k\"}\r\n"), "{text}");
        assert!(parts[2].ends_with("\r\n\r\nhello world\r\n"), "{text}");
        assert_eq!(parts[3], "--\r\n");
    }
}
