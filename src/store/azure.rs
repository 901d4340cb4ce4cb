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
//! - Requests are authorised by object_store's own `AzureAuthorizer` with the client's credential, as its own
//!   requests are: Shared Key (which signs the condition and metadata headers too), an Entra ID bearer token, or a
//!   SAS token. Blob URLs come from object_store as well (see [`Blocks`]).
//! - Block ids are a random number per upload and the block's index, so two uploads of one blob never mix blocks.
//!   When a commit wins, Azure drops every other uncommitted block of the blob; an abort sends nothing, and blocks
//!   of an upload that was given up or lost its race wait there until the next commit of the blob or a week.
//! - Put Block is retried on 5xx, 429 and lost answers (the same block sent again is the same block), the commit on
//!   5xx, 429 and failures to connect or to send. A commit can still have been applied without its answer arriving
//!   (a connection cut after the request, a 500 after the write), so a commit that was sent twice and conflicts, or
//!   whose answer was lost, asks Azure for the blob's committed block list: if it is exactly this upload's blocks
//!   (their ids are its own), the commit succeeded. Otherwise the failure stands, never a false success.
//! - An Azure customer-provided key (`AZURE_STORAGE_ENCRYPTION_KEY`) is refused at mount: these requests would not
//!   carry it.
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
use object_store::azure::{
    AzureAccessKey, AzureAuthorizer, AzureConfigKey, AzureCredential, AzureCredentialProvider, MicrosoftAzure,
    MicrosoftAzureBuilder,
};
use object_store::client::{HttpClient, HttpConnector, HttpErrorKind, HttpRequestBody, HttpResponse};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, RetryConfig,
    StaticCredentialProvider, UploadPart,
};

use super::conditional::UploadCondition;
use super::deadline::RequestTimedOut;
use super::error::StoreError;
use super::s3::{client_options_from, env_client_options, S3Options};

/// The name object_store's errors carry for this store.
const STORE: &str = "MicrosoftAzure";
/// The lifetime given to the URL-only client's signature, which is thrown away (see [`Blocks`]).
const SAS_LIFETIME: Duration = Duration::from_secs(60);
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
    let mut b = MicrosoftAzureBuilder::from_env();
    // The account an abfs[s]:// URL names wins over AZURE_STORAGE_ACCOUNT_NAME.
    if let Some(account) = account {
        b = b.with_account(account);
    }
    build_with(b, container, opts, env)
}

/// [`build`] from a builder the caller has configured (the tests: a client of their own).
fn build_with(
    b: MicrosoftAzureBuilder,
    container: &str,
    opts: &S3Options,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AzureStore, StoreError> {
    let mut b = b.with_container_name(container);
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_endpoint(endpoint.clone());
    }
    if b.get_config_value(&AzureConfigKey::EncryptionKey).is_some() {
        return Err(StoreError::invalid(
            "AZURE_STORAGE_ENCRYPTION_KEY (an Azure customer-provided key) is set: s3cryptfs does not send it; \
             unset it (the mount's own modes encrypt client-side)",
        ));
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
    // Truthy as object_store reads it ("1", "yes", "on"…).
    let truthy = |v: String| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y");
    let emulator = b.get_config_value(&AzureConfigKey::UseEmulator).is_some_and(truthy);
    // object_store's default account name for the emulator; elsewhere building the client fails without one.
    let account = b.get_config_value(&AzureConfigKey::AccountName).unwrap_or_else(|| "devstoreaccount1".into());
    // A credential that takes precedence over every other kind and is used only to build URLs, locally.
    let placeholder = AzureAccessKey::try_new(PLACEHOLDER_KEY).expect("invariant broken: the placeholder is base64");
    let placeholder: AzureCredentialProvider =
        Arc::new(StaticCredentialProvider::new(AzureCredential::AccessKey(placeholder)));
    // (The emulator branch of object_store's build looks at an access key before anything else, the other branch at
    // `with_credentials`: the placeholder is given both ways. Signing is never skipped there, or it would not sign.)
    let urls = b
        .clone()
        .with_credentials(placeholder)
        .with_access_key(PLACEHOLDER_KEY)
        .with_config(AzureConfigKey::SkipSignature, "false")
        .build()
        .map_err(failed)?;
    // AZURE_SKIP_SIGNATURE (a public container): object_store sends its requests unsigned, and so do these.
    let sign = !b.get_config_value(&AzureConfigKey::SkipSignature).is_some_and(truthy);
    let client = b.build().map_err(failed)?;
    // As object_store's own client: plain http where the mount or AZURE_ALLOW_HTTP allows it, or to the emulator.
    let http_options = if emulator { co.with_allow_http(true) } else { co };
    let http = object_store::client::ReqwestConnector::default()
        .connect(&http_options)
        .map_err(|e| StoreError::invalid(format!("cannot build the HTTP client for Azure Blob Storage: {e}")))?;
    Ok(AzureStore { blocks: Arc::new(Blocks { client, urls, account, sign, http, limit }) })
}

/// object_store's Azure client, with conditional uploads in parts of its own (see the module docs); everything else
/// is the client's.
#[derive(Clone)]
pub struct AzureStore {
    blocks: Arc<Blocks>,
}

/// Only the account and container: the client's own `Debug` shows its credential (an account key's bytes, a token).
impl fmt::Debug for AzureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AzureStore({})", self.blocks.client)
    }
}

impl fmt::Display for AzureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.blocks.client.fmt(f)
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
        self.blocks.client.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let Some(UploadCondition(mode)) = opts.extensions.get::<UploadCondition>().cloned() else {
            return self.blocks.client.put_multipart_opts(location, opts).await;
        };
        if let PutMode::Update(v) = &mode {
            if v.e_tag.is_none() {
                return Err(object_store::Error::NotSupported {
                    source: "a conditional Azure upload needs the ETag it replaces".into(),
                });
            }
        }
        let url = self.blocks.blob_url(location).await.map_err(|f| f.into_error("an upload", location, None))?;
        let mut nonce = [0u8; 16];
        crate::crypto::secret::fill_random(&mut nonce);
        Ok(Box::new(BlockUpload {
            blocks: self.blocks.clone(),
            path: location.clone(),
            url,
            nonce: u128::from_be_bytes(nonce),
            ids: Vec::new(),
            mode,
            attributes: opts.attributes,
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.blocks.client.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.blocks.client.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.blocks.client.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.blocks.client.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.blocks.client.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.blocks.client.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.blocks.client.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.blocks.client.rename_opts(from, to, options).await
    }
}

#[async_trait]
impl object_store::list::PaginatedListStore for AzureStore {
    async fn list_paginated(
        &self,
        prefix: Option<&str>,
        opts: object_store::list::PaginatedListOptions,
    ) -> object_store::Result<object_store::list::PaginatedListResult> {
        self.blocks.client.list_paginated(prefix, opts).await
    }
}

/// What the block requests need: the client (its credentials sign them, through object_store's `AzureAuthorizer`:
/// Shared Key, bearer token or SAS token, as its own requests are), a client of the same configuration whose only
/// credential is a placeholder key (its signed URLs, stripped of the signature, are blob URLs built exactly as
/// object_store builds them, without a request), the account name, an HTTP client, and the mount's timeout.
struct Blocks {
    client: MicrosoftAzure,
    urls: MicrosoftAzure,
    account: String,
    /// False with `AZURE_SKIP_SIGNATURE`: requests go unsigned, as object_store's own then do.
    sign: bool,
    http: HttpClient,
    limit: Duration,
}

/// As [`AzureStore`]'s: no credential.
impl fmt::Debug for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blocks({}, timeout {:?})", self.client, self.limit)
    }
}

/// Why a block request failed.
#[derive(Debug)]
enum Failure {
    Status { status: StatusCode, message: String },
    Transport(object_store::client::HttpError),
    Credentials(object_store::Error),
    TimedOut(RequestTimedOut),
    /// The request could not be made (a header value it cannot carry).
    Invalid(String),
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

/// A request to send: its method, what it is (for errors), its query (added to the blob's URL), headers and body.
struct Request<'a> {
    method: Method,
    what: &'static str,
    query: &'a [(&'a str, &'a str)],
    headers: &'a [(String, String)],
    body: PutPayload,
}

impl Blocks {
    /// `req` on `path`, within the mount's timeout, retries included (as `Deadline` bounds every other request).
    /// `repeatable`: the request may be sent again after an answer was lost (its effect is the same twice). The
    /// `bool` says whether it was sent more than once.
    async fn send(&self, url: &url::Url, req: &Request<'_>, repeatable: bool) -> (Result<HttpResponse, Failure>, bool) {
        let mut sent = 0;
        let attempts = async {
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << (2 * (attempt - 1)))).await;
                }
                sent += 1;
                let failure = match self.send_once(url, req).await {
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
                    Failure::Credentials(_) | Failure::TimedOut(_) | Failure::Invalid(_) => false,
                };
                if !again {
                    return Err(failure);
                }
                last = Some(failure);
            }
            Err(last.expect("invariant broken: the retry loop ran at least once"))
        };
        let result = match tokio::time::timeout(self.limit, attempts).await {
            Ok(result) => result,
            Err(_) => Err(Failure::TimedOut(RequestTimedOut { operation: req.what, limit: self.limit })),
        };
        (result, sent > 1)
    }

    /// The blob's URL as object_store builds it (from the URL-only client, locally: see [`Blocks`]).
    async fn blob_url(&self, path: &Path) -> Result<url::Url, Failure> {
        let mut url = self.urls.signed_url(Method::PUT, path, SAS_LIFETIME).await.map_err(Failure::Credentials)?;
        url.set_query(None);
        Ok(url)
    }

    async fn send_once(&self, url: &url::Url, r: &Request<'_>) -> Result<HttpResponse, Failure> {
        let mut url = url.clone();
        url.query_pairs_mut().extend_pairs(r.query);
        let mut req = http::Request::builder().method(r.method.clone()).uri(url.as_str());
        if r.method == Method::PUT {
            req = req.header("content-length", r.body.content_length().to_string());
        }
        for (name, value) in r.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let mut req = req
            .body(HttpRequestBody::from(r.body.clone()))
            .map_err(|e| Failure::Invalid(format!("{}: {e}", r.what)))?;
        if self.sign {
            let credential = self.client.credentials().get_credential().await.map_err(Failure::Credentials)?;
            AzureAuthorizer::new(&credential, &self.account).try_authorize(&mut req).map_err(Failure::Credentials)?;
        }
        let resp = self.http.execute(req).await.map_err(|e| Failure::Transport(redacted(e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let message = redact_sig(&body_text(resp, MAX_ERROR_BODY).await);
        Err(Failure::Status { status, message })
    }

    /// The ids of the blocks `path` is made of now and its ETag (Get Block List, an answer of at most `max_len` bytes
    /// read), or `None` if that cannot be had.
    async fn committed(&self, url: &url::Url, max_len: usize) -> Option<(Vec<String>, Option<String>)> {
        let req = Request {
            method: Method::GET,
            what: "the block list (Get Block List)",
            query: &[("comp", "blocklist"), ("blocklisttype", "committed")],
            headers: &[],
            body: PutPayload::new(),
        };
        let resp = self.send(url, &req, true).await.0.ok()?;
        let etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        let xml = body_text(resp, max_len).await;
        // Only a whole answer (a cut one could lack ids), and only the committed blocks' names.
        if xml.len() >= max_len || !xml.trim_end().ends_with("</BlockList>") {
            return None;
        }
        let committed = xml.split("<CommittedBlocks>").nth(1)?.split("</CommittedBlocks>").next()?;
        let ids = committed.split("<Name>").skip(1).filter_map(|b| b.split("</Name>").next()).map(str::to_string);
        Some((ids.collect(), etag))
    }
}

/// An answer's body as text, at most `max_len` bytes of it.
async fn body_text(resp: HttpResponse, max_len: usize) -> String {
    String::from_utf8_lossy(&super::read_capped(resp, max_len).await).into_owned()
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
            Failure::Invalid(text) => return E::Generic { store: STORE, source: text.into() },
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
    /// The blob's URL, without authorisation.
    url: url::Url,
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
        let (blocks, path, url) = (self.blocks.clone(), self.path.clone(), self.url.clone());
        async move {
            let what = "a block (Put Block)";
            let query = [("comp", "block"), ("blockid", id.as_str())];
            let req = Request { method: Method::PUT, what, query: &query, headers: &[], body: data };
            match blocks.send(&url, &req, true).await.0 {
                Ok(_) => Ok(()),
                Err(f) => Err(f.into_error(what, &path, None)),
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
        let req = Request { method: Method::PUT, what, query: &query, headers: &headers, body };
        let resp = match self.blocks.send(&self.url, &req, false).await {
            (Ok(resp), _) => resp,
            (Err(f), retried) => {
                // Sent, and its answer lost: the commit may have been applied.
                let unanswered = matches!(&f, Failure::Transport(e) if e.kind() != HttpErrorKind::Connect);
                let e = f.into_error(what, &self.path, Some(&self.mode));
                use object_store::Error as E;
                let conflict = matches!(e, E::Precondition { .. } | E::AlreadyExists { .. });
                // A commit sent again after its answer was lost (or after a 5xx that Azure had applied anyway)
                // conflicts with itself: the blob is then made of exactly this upload's blocks, whose ids are its own.
                // (Not for an upload without blocks: a blob written whole by Put Blob has no committed blocks either.)
                if !(retried && conflict || unanswered) || self.ids.is_empty() {
                    return Err(e);
                }
                let max_len = 4096 + 128 * self.ids.len();
                match self.blocks.committed(&self.url, max_len).await {
                    Some((ids, e_tag)) if ids == self.ids && e_tag.is_some() => {
                        tracing::debug!(path = %self.path, "a commit sent again had been applied the first time");
                        return Ok(PutResult { e_tag, version: None, extensions: Default::default() });
                    }
                    _ => return Err(e),
                }
            }
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
    use crate::store::{Backend, Expect, ObjectKey, ObjectStoreBackend, UserMeta};

    /// A TCP proxy in front of Azurite that passes everything on both ways, except the answer to the first request
    /// whose request line contains `lose`: that request reaches Azurite, and once Azurite has begun to answer, the
    /// connection is closed before any byte of the answer comes back.
    struct LosingProxy {
        addr: String,
        lost: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl LosingProxy {
        fn start(upstream: String, lose: &'static str) -> LosingProxy {
            use std::io::{BufRead, Read, Write};
            use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let lost = Arc::new(AtomicUsize::new(0));
            let (count, done) = (lost.clone(), Arc::new(AtomicBool::new(false)));
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                    let (swallow, answered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
                    let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                    let (quiet, heard) = (swallow.clone(), answered.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from_server.read(&mut buf) {
                            if n > 0 && quiet.load(Ordering::SeqCst) {
                                heard.store(true, Ordering::SeqCst);
                                continue;
                            }
                            if n == 0 || to_client.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to_client.shutdown(std::net::Shutdown::Both);
                    });
                    let (count, done) = (count.clone(), done.clone());
                    std::thread::spawn(move || {
                        let (mut server, mut client) = (server, std::io::BufReader::new(client));
                        loop {
                            let mut head = Vec::new();
                            while !head.ends_with(b"\r\n\r\n") {
                                match client.read_until(b'\n', &mut head) {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) => {}
                                }
                            }
                            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            let mut body = vec![0u8; len];
                            if client.read_exact(&mut body).is_err() {
                                return;
                            }
                            let first = text.lines().next().unwrap_or_default().to_string();
                            // The client sends a request only once the answer before it has come: nothing of an
                            // earlier answer is swallowed.
                            let lose_this = first.contains(lose) && !done.swap(true, Ordering::SeqCst);
                            if lose_this {
                                count.fetch_add(1, Ordering::SeqCst);
                                swallow.store(true, Ordering::SeqCst);
                            }
                            if server.write_all(&head).and_then(|_| server.write_all(&body)).is_err() {
                                return;
                            }
                            if lose_this {
                                // Azurite has applied the commit once its answer starts: only then is it cut off.
                                let since = std::time::Instant::now();
                                while !answered.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(20) {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                let _ = client.get_ref().shutdown(std::net::Shutdown::Both);
                                let _ = server.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                    });
                }
            });
            LosingProxy { addr, lost }
        }
    }

    /// `AZURE_STORAGE_USE_EMULATOR=1` means the emulator as `true` does (object_store reads "1", "yes", "on"…), and
    /// the block requests may then use plain http as object_store's own do: an upload in blocks to Azurite works.
    #[tokio::test]
    async fn the_emulator_named_by_any_truthy_value_takes_uploads_in_blocks() {
        let container = std::env::var("S3CRYPTFS_TEST_AZURE_CONTAINER")
            .expect("S3CRYPTFS_TEST_AZURE_CONTAINER is not set: run the tests with scripts/test.sh (starts Azurite)");
        let b = MicrosoftAzureBuilder::new().with_config(AzureConfigKey::UseEmulator, "1");
        let store = build_with(b, &container, &S3Options::default(), &|_| None).unwrap();
        let backend = ObjectStoreBackend::new(Arc::new(store), &format!("truthy-{}", std::process::id())).unwrap();
        let backend = backend.with_identifier_names().with_conditional_uploads();
        let k = ObjectKey::new("file").unwrap();
        let mut up = backend.put_multipart_expect(&k, &UserMeta::default(), &Expect::Absent).await.unwrap();
        up.put_part(Bytes::from_static(b"in blocks")).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(&backend.get(&k).await.unwrap().0[..], b"in blocks");
    }

    /// An Azure customer-provided key would not be on the block requests: the mount refuses it, naming it.
    #[test]
    fn a_customer_provided_key_is_refused() {
        let b = MicrosoftAzureBuilder::new()
            .with_account("a")
            .with_access_key("a2V5")
            .with_encryption_key("MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=");
        let refused = build_with(b, "c", &S3Options::default(), &|_| None);
        assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("AZURE_STORAGE_ENCRYPTION_KEY")), "{refused:?}");
    }

    /// Issue 13's review: a commit whose answer was lost is sent again, and the second try conflicts with the first
    /// (its `If-Match` names the version the first one replaced). The upload finds its own blocks committed and
    /// succeeds with the blob's ETag instead of reporting a lost race (which the filesystem would turn into EIO and
    /// a conflict copy of data that is in the store).
    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_is_found_applied() {
        let container = std::env::var("S3CRYPTFS_TEST_AZURE_CONTAINER")
            .expect("S3CRYPTFS_TEST_AZURE_CONTAINER is not set: run the tests with scripts/test.sh (starts Azurite)");
        let azurite = std::env::var("AZURITE_BLOB_STORAGE_URL").unwrap_or_else(|_| "http://127.0.0.1:10000".into());
        let proxy = LosingProxy::start(azurite.trim_start_matches("http://").to_string(), "comp=blocklist");
        // Azurite's published development account (not a secret), reached through the proxy.
        let key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
        let b = MicrosoftAzureBuilder::new().with_account("devstoreaccount1").with_access_key(key);
        let endpoint = format!("http://{}/devstoreaccount1", proxy.addr);
        let opts = S3Options { endpoint: Some(endpoint), ..S3Options::default() };
        let store = build_with(b, &container, &opts, &|_| None).unwrap();
        let prefix = format!("lost-answer-{}", std::process::id());
        let backend = ObjectStoreBackend::new(Arc::new(store), &prefix).unwrap();
        let backend = backend.with_identifier_names().with_conditional_uploads();
        let k = ObjectKey::new("file").unwrap();
        let meta = UserMeta { mode: Some(0o100644), ..UserMeta::default() };
        let v1 = backend.put_expect(&k, Bytes::from_static(b"v1"), &meta, &Expect::Absent).await.unwrap();
        let mut up = backend.put_multipart_expect(&k, &meta, &Expect::Etag(v1.etag.unwrap())).await.unwrap();
        up.put_part(Bytes::from(vec![7u8; 1000])).await.unwrap();
        up.put_part(Bytes::from(vec![8u8; 1000])).await.unwrap();
        let done = up.complete().await;
        assert_eq!(proxy.lost.load(std::sync::atomic::Ordering::SeqCst), 1, "the proxy lost no answer");
        let info = done.expect("the commit was applied the first time");
        let (body, now, _) = backend.get(&k).await.unwrap();
        assert!(body[..1000].iter().all(|&x| x == 7) && body[1000..].iter().all(|&x| x == 8) && body.len() == 2000);
        assert_eq!(now.etag, info.etag, "the ETag given is the blob's");
    }

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
