//! `az://container[/prefix]` (or `abfss://container@account.dfs.core.windows.net[/prefix]`): Azure Blob Storage
//! through object_store's Azure client.
//!
//! Why a store of its own kind: teams that keep data in more than one cloud want the same encrypted directory on
//! each. Everything above the `ObjectStore` (the backend, the filesystem, the formats) is shared with S3; only the
//! client differs. Settings come from the standard `AZURE_*` environment variables as object_store reads them
//! (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, the service principal and
//! managed identity variables, `AZURE_STORAGE_USE_EMULATOR` with `AZURITE_BLOB_STORAGE_URL` for Azurite), and the
//! mount options that mean the same as for S3: `endpoint=` (the blob service URL), `ca_file=`, `timeout=`.
//! Server-side encryption modes are S3 features and are refused before this is reached (`run::open_store`).
//!
//! Attributes go into blob metadata (`x-ms-meta-*`), conditional writes use `If-Match` / `If-None-Match`, which
//! Azure honours; nothing here touches the network until a request is made.
//!
//! Uploads in parts ([`AzureStore`]): object_store sends a blob's blocks (Put Block) and commits them (Put Block List)
//! only unconditionally. Every upload of a file is conditional (`If-None-Match: *` for a new file, `If-Match` on the
//! version it replaces), so they used to be collected in memory and sent as one conditional PUT: a 1 GiB file cost
//! the daemon 1 GiB of memory whatever `max_memory` said, and a file larger than memory could not be written. Here
//! the blocks go out as they come, and the commit carries the condition; Azure checks it atomically when it commits.
//! - Requests carry object_store's own authorisation in a form that leaves the headers free: with an account key, a
//!   service SAS that object_store signs (`Signer::signed_url`, never logged: it is a credential); with a SAS token,
//!   that token; with Entra ID, the bearer token.
//! - Block ids are a random number per upload and the block's index, so two uploads of one blob never mix blocks.
//!   When a commit wins, Azure drops every other uncommitted block of the blob (an abort therefore sends nothing;
//!   Azure also drops uncommitted blocks after a week).
//! - Put Block is retried on 5xx, 429 and lost answers (the same block sent again is the same block); the commit
//!   only when it surely did not arrive or Azure said 429/5xx, as a conditional write that was applied would
//!   otherwise conflict with itself.
//! - Ranges of the object are not copied into an upload (Put Block From URL: Azurite, the emulator the tests run
//!   against, does not have it), so a large file changed in place is rewritten whole, as on GCS.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::FutureExt;
use http::{Method, StatusCode};
use object_store::azure::{AzureConfigKey, AzureCredential, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::client::{HttpClient, HttpConnector, HttpErrorKind, HttpRequestBody, HttpResponse};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, RetryConfig, UploadPart,
};

use super::conditional::UploadCondition;
use super::deadline::RequestTimedOut;
use super::error::StoreError;
use super::s3::{client_options_from, env_client_options, S3Options};

/// The name object_store's errors carry for this store.
const STORE: &str = "MicrosoftAzure";
/// The REST API version the block requests ask for (object_store's).
const API_VERSION: &str = "2023-11-03";
/// How long a SAS made for one request is valid: it is used at once, this only covers clock skew and retries.
const SAS_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Attempts per request for answers that may pass (5xx, 429, a broken connection).
const ATTEMPTS: u32 = 3;
/// Bytes of an error answer kept for its message.
const MAX_ERROR_BODY: usize = 16 << 10;
/// A placeholder account key (base64): the URL-only client signs with it, and what it signs is never sent.
const PLACEHOLDER_KEY: &str = "dXJsLW9ubHk=";

/// The Azure store for `container`, configured from the environment and `opts`.
pub(super) fn build(
    container: &str,
    account: Option<&str>,
    opts: &S3Options,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AzureStore, StoreError> {
    let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container);
    // The account an abfs[s]:// URL names wins over AZURE_STORAGE_ACCOUNT_NAME.
    if let Some(account) = account {
        b = b.with_account(account);
    }
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_endpoint(endpoint.clone());
    }
    // Emulator mode (AZURE_STORAGE_USE_EMULATOR) allows plain http on its own: object_store's build() sets it.
    let allow_http = opts.allow_http || opts.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    // `with_client_options` replaces the client settings `from_env` read: carry the AZURE_* ones over.
    let parse = |k: &str| match k.parse::<AzureConfigKey>() {
        Ok(AzureConfigKey::Client(ck)) => Some(ck),
        _ => None,
    };
    let co = env_client_options("AZURE_", &parse, env);
    let limit: Duration = opts.request_timeout();
    let retry = RetryConfig { retry_timeout: limit, ..RetryConfig::default() };
    let co = client_options_from(co, allow_http, opts.ca_file.as_ref(), limit)?;
    let b = b.with_retry(retry).with_client_options(co.clone());
    let failed = |e: object_store::Error| {
        StoreError::invalid(format!("cannot configure Azure Blob Storage access for {container}: {e}"))
    };
    let urls = b.clone().with_access_key(PLACEHOLDER_KEY).build().map_err(failed)?;
    // As object_store's own client: plain http where the mount allows it, or to the emulator.
    let emulator = b.get_config_value(&AzureConfigKey::UseEmulator).is_some_and(|v| v == "true");
    let client = b.build().map_err(failed)?;
    let http = object_store::client::ReqwestConnector::default()
        .connect(&co.with_allow_http(allow_http || emulator))
        .map_err(|e| StoreError::invalid(format!("cannot build the HTTP client for Azure Blob Storage: {e}")))?;
    Ok(AzureStore { client: client.clone(), blocks: Arc::new(Blocks { client, urls, http, limit }) })
}

/// object_store's Azure client, with conditional uploads in parts of its own (see the module docs); everything else
/// is the client's.
#[derive(Debug, Clone)]
pub struct AzureStore {
    client: MicrosoftAzure,
    blocks: Arc<Blocks>,
}

impl fmt::Display for AzureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.client.fmt(f)
    }
}

#[async_trait]
impl ObjectStore for AzureStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.client.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let Some(UploadCondition(mode)) = opts.extensions.get::<UploadCondition>().cloned() else {
            return self.client.put_multipart_opts(location, opts).await;
        };
        if let PutMode::Update(v) = &mode {
            if v.e_tag.is_none() {
                return Err(object_store::Error::NotSupported {
                    source: "a conditional Azure upload needs the ETag it replaces".into(),
                });
            }
        }
        let mut nonce = [0u8; 16];
        crate::crypto::secret::fill_random(&mut nonce);
        Ok(Box::new(BlockUpload {
            blocks: self.blocks.clone(),
            path: location.clone(),
            nonce: u128::from_be_bytes(nonce),
            ids: Vec::new(),
            mode,
            attributes: opts.attributes,
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.client.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.client.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.client.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.client.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.client.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.client.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.client.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.client.rename_opts(from, to, options).await
    }
}

#[async_trait]
impl object_store::list::PaginatedListStore for AzureStore {
    async fn list_paginated(
        &self,
        prefix: Option<&str>,
        opts: object_store::list::PaginatedListOptions,
    ) -> object_store::Result<object_store::list::PaginatedListResult> {
        self.client.list_paginated(prefix, opts).await
    }
}

/// What the block requests need: the client (its credentials sign them), a client of the same configuration whose
/// key is a placeholder (its signed URLs, stripped of the signature, are blob URLs built exactly as object_store
/// builds them), an HTTP client, and the mount's timeout.
#[derive(Debug)]
struct Blocks {
    client: MicrosoftAzure,
    urls: MicrosoftAzure,
    http: HttpClient,
    limit: Duration,
}

/// Why a block request failed.
#[derive(Debug)]
enum Failure {
    Status { status: StatusCode, message: String },
    Transport(object_store::client::HttpError),
    Credentials(object_store::Error),
    TimedOut(RequestTimedOut),
}

/// A failed request's text, for the error chain ("status code: 5xx" is how `object::map_err` tells a server that kept
/// failing from a refusal).
#[derive(Debug, thiserror::Error)]
#[error("Azure answered {what} with status code: {status}: {message}")]
struct StatusError {
    what: &'static str,
    status: u16,
    message: String,
}

impl Blocks {
    /// The URL of `path` with this request's authorisation in its query, and the bearer token if that is how.
    async fn authorised(&self, path: &Path) -> Result<(url::Url, Option<String>), Failure> {
        let credential = self.client.credentials().get_credential().await.map_err(Failure::Credentials)?;
        if let AzureCredential::AccessKey(_) = credential.as_ref() {
            let url = self.client.signed_url(Method::PUT, path, SAS_LIFETIME).await.map_err(Failure::Credentials)?;
            return Ok((url, None));
        }
        let mut url = self.urls.signed_url(Method::PUT, path, SAS_LIFETIME).await.map_err(Failure::Credentials)?;
        url.set_query(None);
        match credential.as_ref() {
            AzureCredential::SASToken(pairs) => {
                url.query_pairs_mut().extend_pairs(pairs);
                Ok((url, None))
            }
            AzureCredential::BearerToken(token) => Ok((url, Some(format!("Bearer {token}")))),
            // A credential kind newer than this code: say so rather than send an unsigned write.
            #[allow(unreachable_patterns)]
            _ => Err(Failure::Credentials(object_store::Error::NotSupported {
                source: "this Azure credential cannot sign block uploads".into(),
            })),
        }
    }

    /// A PUT of `path` with `query` added, `headers` and `body`, within the mount's timeout, retries included (as
    /// `Deadline` bounds every other request). `repeatable`: the request may be sent again after an answer was lost
    /// (its effect is the same twice).
    async fn put(
        &self,
        what: &'static str,
        path: &Path,
        query: &[(&str, &str)],
        headers: &[(String, String)],
        body: PutPayload,
        repeatable: bool,
    ) -> Result<HttpResponse, Failure> {
        let attempts = async {
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << (2 * (attempt - 1)))).await;
                }
                let failure = match self.put_once(path, query, headers, body.clone()).await {
                    Ok(resp) => return Ok(resp),
                    Err(f) => f,
                };
                let again = match &failure {
                    Failure::Status { status, .. } => {
                        status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
                    }
                    Failure::Transport(e) => {
                        repeatable || matches!(e.kind(), HttpErrorKind::Connect | HttpErrorKind::Request)
                    }
                    Failure::Credentials(_) | Failure::TimedOut(_) => false,
                };
                if !again {
                    return Err(failure);
                }
                last = Some(failure);
            }
            Err(last.expect("invariant broken: the retry loop ran at least once"))
        };
        match tokio::time::timeout(self.limit, attempts).await {
            Ok(result) => result,
            Err(_) => Err(Failure::TimedOut(RequestTimedOut { operation: what, limit: self.limit })),
        }
    }

    async fn put_once(
        &self,
        path: &Path,
        query: &[(&str, &str)],
        headers: &[(String, String)],
        body: PutPayload,
    ) -> Result<HttpResponse, Failure> {
        let (mut url, bearer) = self.authorised(path).await?;
        url.query_pairs_mut().extend_pairs(query);
        let mut req = http::Request::builder()
            .method(Method::PUT)
            .uri(url.as_str())
            .header("x-ms-version", API_VERSION)
            .header("content-length", body.content_length().to_string());
        if let Some(bearer) = bearer {
            req = req.header("authorization", bearer);
        }
        for (name, value) in headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let req = req
            .body(HttpRequestBody::from(body))
            .map_err(|e| Failure::Transport(object_store::client::HttpError::new(HttpErrorKind::Request, e)))?;
        let resp = self.http.execute(req).await.map_err(|e| Failure::Transport(redacted(e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // An error body is short; a hostile endpoint's endless one is cut off.
        let mut text = Vec::new();
        let mut body = resp.into_body().bytes_stream();
        while let Some(piece) = futures::StreamExt::next(&mut body).await {
            match piece {
                Ok(piece) if text.len() < MAX_ERROR_BODY => text.extend_from_slice(&piece),
                _ => break,
            }
        }
        let message = redact_sig(&String::from_utf8_lossy(&text[..text.len().min(MAX_ERROR_BODY)]));
        Err(Failure::Status { status, message })
    }
}

impl Failure {
    /// The object_store error for this failure of `what` on `path`, in a commit made with `mode` (`None`: a block).
    fn into_error(self, what: &'static str, path: &Path, mode: Option<&PutMode>) -> object_store::Error {
        use object_store::Error as E;
        let path = path.to_string();
        let (status, message) = match self {
            Failure::Transport(e) => return E::Generic { store: STORE, source: Box::new(e) },
            Failure::Credentials(e) => return E::Unauthenticated { path, source: Box::new(e) },
            Failure::TimedOut(t) => return E::Generic { store: STORE, source: Box::new(t) },
            Failure::Status { status, message } => (status, message),
        };
        let lost = |message: &str| {
            // The commit's blocks are gone: another upload of the blob committed first (Azure then drops every other
            // uncommitted block). The object is no longer what this upload expected.
            mode.is_some() && message.contains("InvalidBlockList")
        };
        let source = Box::new(StatusError { what, status: status.as_u16(), message });
        match (status, mode) {
            (StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT, Some(PutMode::Create)) => {
                E::AlreadyExists { path, source }
            }
            (StatusCode::PRECONDITION_FAILED, _) => E::Precondition { path, source },
            // If-Match on a blob that is not there.
            (StatusCode::NOT_FOUND, Some(PutMode::Update(_))) if !source.message.contains("ContainerNotFound") => {
                E::Precondition { path, source }
            }
            (StatusCode::BAD_REQUEST, Some(_)) if lost(&source.message) => E::Precondition { path, source },
            (StatusCode::NOT_FOUND, _) => E::NotFound { path, source },
            (StatusCode::UNAUTHORIZED, _) => E::Unauthenticated { path, source },
            (StatusCode::FORBIDDEN, _) => E::PermissionDenied { path, source },
            _ => E::Generic { store: STORE, source },
        }
    }
}

/// One conditional upload in blocks (see the module docs).
#[derive(Debug)]
struct BlockUpload {
    blocks: Arc<Blocks>,
    path: Path,
    /// Random per upload: the first half of every block id.
    nonce: u128,
    /// The block ids so far, base64, in the blob's order.
    ids: Vec<String>,
    mode: PutMode,
    attributes: Attributes,
}

#[async_trait]
impl MultipartUpload for BlockUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        // Every id of a blob must have the same length: 32 + 10 characters before base64.
        let id = BASE64.encode(format!("{:032x}{:010}", self.nonce, self.ids.len()));
        self.ids.push(id.clone());
        let (blocks, path) = (self.blocks.clone(), self.path.clone());
        async move {
            let query = [("comp", "block"), ("blockid", id.as_str())];
            match blocks.put("a block (Put Block)", &path, &query, &[], data, true).await {
                Ok(_) => Ok(()),
                Err(f) => Err(f.into_error("a block (Put Block)", &path, None)),
            }
        }
        .boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>");
        for id in &self.ids {
            xml.push_str("<Latest>");
            xml.push_str(id);
            xml.push_str("</Latest>");
        }
        xml.push_str("</BlockList>");
        let mut headers = attribute_headers(&self.attributes);
        match &self.mode {
            PutMode::Overwrite => {}
            PutMode::Create => headers.push(("if-none-match".into(), "*".into())),
            PutMode::Update(v) => headers.push(("if-match".into(), v.e_tag.clone().unwrap_or_default())),
        }
        let what = "the commit of an upload (Put Block List)";
        let query = [("comp", "blocklist")];
        let body = PutPayload::from(Bytes::from(xml));
        let resp = match self.blocks.put(what, &self.path, &query, &headers, body, false).await {
            Ok(resp) => resp,
            Err(f) => return Err(f.into_error(what, &self.path, Some(&self.mode))),
        };
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(PutResult { e_tag: header("etag"), version: header("x-ms-version-id"), extensions: Default::default() })
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        // Nothing is visible before the commit; Azure drops the blocks (see the module docs).
        Ok(())
    }
}

/// An error's text, for a redacted copy of it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Redacted(String);

/// `e` with its text redacted ([`redact_sig`]; reqwest's errors name the URL, and the URL carries the SAS), of the same
/// kind, so that retries and `object::map_err` treat it as they would the original.
fn redacted(e: object_store::client::HttpError) -> object_store::client::HttpError {
    let mut text = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(err) = cur {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&err.to_string());
        cur = err.source();
    }
    object_store::client::HttpError::new(e.kind(), Redacted(redact_sig(&text)))
}

/// `text` with the value of every `sig=` (a SAS signature: whoever has it may write the blob until it expires) cut out.
fn redact_sig(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("sig=") {
        out.push_str(&rest[..at + 4]);
        out.push_str("REDACTED");
        let value = &rest[at + 4..];
        let end = value.find(|c: char| matches!(c, '&' | ')' | '"' | '\'' | '<') || c.is_whitespace());
        rest = &value[end.unwrap_or(value.len())..];
    }
    out.push_str(rest);
    out
}

/// The request headers Put Block List sets the blob's metadata and properties with.
fn attribute_headers(attributes: &Attributes) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for (attribute, value) in attributes {
        let name = match attribute {
            Attribute::Metadata(name) => format!("x-ms-meta-{name}"),
            Attribute::ContentType => "x-ms-blob-content-type".into(),
            Attribute::CacheControl => "x-ms-blob-cache-control".into(),
            Attribute::ContentDisposition => "x-ms-blob-content-disposition".into(),
            Attribute::ContentEncoding => "x-ms-blob-content-encoding".into(),
            Attribute::ContentLanguage => "x-ms-blob-content-language".into(),
            Attribute::StorageClass => "x-ms-access-tier".into(),
            #[allow(unreachable_patterns)]
            _ => continue,
        };
        headers.push((name, value.as_ref().to_string()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sas_signature_never_reaches_an_error() {
        let url = "http://127.0.0.1:10000/a/c/b?sv=2021-08-06&sp=w&sig=c2VjcmV0%2Bc2lnbmF0dXJl&comp=block";
        let cases = [
            (
                format!("error sending request for url ({url})"),
                "(http://127.0.0.1:10000/a/c/b?sv=2021-08-06&sp=w&sig=REDACTED&comp=block)",
            ),
            (format!("{url} sig=second"), "sig=REDACTED&comp=block sig=REDACTED"),
            ("no signature here".to_string(), "no signature here"),
            ("ends with sig=".to_string(), "ends with sig=REDACTED"),
        ];
        for (text, expected) in cases {
            let got = redact_sig(&text);
            assert!(got.ends_with(expected), "{text:?} became {got:?}");
            assert!(!got.contains("c2VjcmV0") && !got.contains("second"), "{got:?}");
        }
        let e = object_store::client::HttpError::new(
            HttpErrorKind::Timeout,
            std::io::Error::other(format!("error sending request for url ({url})")),
        );
        let r = redacted(e);
        assert_eq!(r.kind(), HttpErrorKind::Timeout);
        let chain = format!("{r}: {}", std::error::Error::source(&r).map(|s| s.to_string()).unwrap_or_default());
        assert!(!chain.contains("c2VjcmV0") && chain.contains("sig=REDACTED"), "{chain}");
    }
}
