//! From a mount URL to a ready [`Backend`]: `s3://bucket[/prefix]` or `file:///abs/dir`.
//!
//! S3 settings come from, in order of precedence: [`S3Options`] (mount options), the standard
//! `AWS_*` environment variables (object_store's `from_env`), then the AWS shared config files
//! (see `profile.rs`), which are consulted only when `AWS_ACCESS_KEY_ID` is absent. Nothing here
//! touches the network: `check_access` does that at mount.
//!
//! object_store's `with_client_options` replaces every client option set before it (including
//! those `from_env` read, like `AWS_ALLOW_HTTP` or `AWS_PROXY_URL`), so the client options are
//! assembled once, env included, and applied in one call.
//!
//! Every request is bounded by [`S3Options::timeout`], retries included: object_store's attempt timeout and retry
//! budget are set from it, and each client is wrapped in a [`Deadline`] that cuts whatever is left (see
//! `deadline.rs`). The signed client for KMS and raw S3 requests gets the same limit.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::HttpConnector;
use object_store::{Certificate, ClientConfigKey, ClientOptions, RetryConfig};

use super::deadline::Deadline;

use super::error::StoreError;
use super::local::LocalBackend;
use super::object::ObjectStoreBackend;
use super::profile::load_profile;
use super::Backend;

/// Mount options that shape the S3 client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Custom endpoint (`https://host:port`); implies path-style requests.
    pub endpoint: Option<String>,
    /// Overrides `AWS_REGION` and the profile's region.
    pub region: Option<String>,
    /// Server-side encryption to request on every write, and to verify in every write's answer.
    pub sse: Option<super::ServerSideEncryption>,
    /// Extra PEM CA bundle to trust (for self-signed test servers or private CAs).
    pub ca_file: Option<PathBuf>,
    /// Permit plain http; implied when the endpoint starts with `http://`.
    pub allow_http: bool,
    /// SSE-C: the customer keys (the first writes). Requires https.
    pub customer_keys: Option<super::CustomerKeys>,
    /// Longest time one request may take, its retries included; `None`: [`DEFAULT_REQUEST_TIMEOUT`].
    pub timeout: Option<Duration>,
}

/// The request bound when [`S3Options::timeout`] is not set: object_store's own per-attempt default, now applied to
/// the whole request (see `config::MountConfig::store_timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How much later than the request's deadline one attempt's own timeout (reqwest's) fires: it is only the backstop,
/// and the deadline firing first gives the error that names `timeout=`.
const ATTEMPT_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// Longest wait for a TCP (and TLS) connection: a server that is up accepts in milliseconds, and an unreachable one
/// should fail fast enough that a retry still fits into the request's budget.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl S3Options {
    pub(super) fn request_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }
}

/// A parsed mount URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `s3://bucket/prefix`: `prefix` has no leading or trailing `/` (empty for the bucket root).
    S3 { bucket: String, prefix: String },
    /// `file:///abs/dir`.
    Local { root: PathBuf },
    /// `az://container/prefix` (or `azure://`, or `abfs[s]://container[@account.dfs.core.windows.net]/prefix`):
    /// Azure Blob Storage, see `azure.rs`. `account`: the storage account the URL names (else the environment's).
    Azure { container: String, account: Option<String>, prefix: String },
    /// `gs://bucket/prefix` (or `gcs://`): Google Cloud Storage through its JSON API, see `gcs.rs`.
    Gcs { bucket: String, prefix: String },
}

impl StoreUrl {
    /// Parse without touching the network or the filesystem.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // Bucket naming rules (3-63 chars of a-z, 0-9, '.', '-'), relaxed on length
            // because S3-compatible servers differ.
            let bucket_ok = !bucket.is_empty()
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
            if !bucket_ok {
                return Err(StoreError::invalid(format!(
                    "{url:?} has no valid bucket name; write s3://bucket or s3://bucket/prefix"
                )));
            }
            let prefix = prefix_of(url, prefix)?;
            return Ok(StoreUrl::S3 { bucket: bucket.to_owned(), prefix });
        }
        let abfs = url.strip_prefix("abfs://").or_else(|| url.strip_prefix("abfss://"));
        if let Some(rest) = url.strip_prefix("az://").or_else(|| url.strip_prefix("azure://")).or(abfs) {
            let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // abfs[s]://container@account.dfs.core.windows.net (the Data Lake form; the blob host is accepted too).
            let (container, account) = match authority.split_once('@') {
                Some((container, host)) if abfs.is_some() => {
                    let account = [".dfs.core.windows.net", ".blob.core.windows.net"]
                        .iter()
                        .find_map(|suffix| host.strip_suffix(suffix))
                        .filter(|a| {
                            (3..=24).contains(&a.len())
                                && a.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                        });
                    let Some(account) = account else {
                        return Err(StoreError::invalid(format!(
                            "{url:?} does not name a storage account as ACCOUNT.dfs.core.windows.net (3-24 of a-z, \
                             0-9); write abfss://container@account.dfs.core.windows.net[/prefix] or \
                             az://container[/prefix]"
                        )));
                    };
                    (container, Some(account.to_owned()))
                }
                _ => (authority, None),
            };
            // Container naming rules: 3-63 characters of a-z, 0-9 and '-', starting with a letter or digit.
            let container_ok = (3..=63).contains(&container.len())
                && container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !container.starts_with('-');
            if !container_ok {
                return Err(StoreError::invalid(format!(
                    "{url:?} has no valid container name (3-63 of a-z, 0-9, '-'); write az://container[/prefix]"
                )));
            }
            let prefix = prefix_of(url, prefix)?;
            return Ok(StoreUrl::Azure { container: container.to_owned(), account, prefix });
        }
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(StoreError::invalid(format!(
                    "{url:?} must name an absolute local directory, as in file:///srv/store"
                )));
            }
            return Ok(StoreUrl::Local {
                root: PathBuf::from(rest),
            });
        }
        if let Some(rest) = url.strip_prefix("gs://").or_else(|| url.strip_prefix("gcs://")) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // Bucket naming rules: 3-63 characters (up to 222 with dots) of a-z, 0-9, '-', '_' and '.', starting and
            // ending with a letter or digit.
            let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            let bucket_ok = (3..=222).contains(&bucket.len())
                && (bucket.len() <= 63 || bucket.contains('.'))
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
                && edge_ok(bucket.as_bytes().first())
                && edge_ok(bucket.as_bytes().last());
            if !bucket_ok {
                return Err(StoreError::invalid(format!(
                    "{url:?} has no valid bucket name (3-63 of a-z, 0-9, '-', '_', '.'); write gs://bucket[/prefix]"
                )));
            }
            let prefix = prefix_of(url, prefix)?;
            return Ok(StoreUrl::Gcs { bucket: bucket.to_owned(), prefix });
        }
        Err(StoreError::invalid(format!(
            "{url:?} is not a supported store URL; use s3://bucket[/prefix], gs://bucket[/prefix], \
             az://container[/prefix] or file:///abs/dir"
        )))
    }

    /// The kind of store, for messages ("S3", "Azure Blob Storage", "the local store").
    pub fn kind(&self) -> &'static str {
        match self {
            StoreUrl::S3 { .. } => "S3",
            StoreUrl::Azure { .. } => "Azure Blob Storage",
            StoreUrl::Gcs { .. } => "Google Cloud Storage",
            StoreUrl::Local { .. } => "the local store",
        }
    }
}

/// The key prefix part of a bucket or container URL, checked: no leading or trailing `/`, a usable key.
fn prefix_of(url: &str, prefix: &str) -> Result<String, StoreError> {
    let prefix = prefix.trim_matches('/');
    if prefix.contains(['?', '#']) {
        return Err(StoreError::invalid(format!(
            "{url:?} must not contain '?' or '#'; put options in mount options instead"
        )));
    }
    if !prefix.is_empty() {
        super::ObjectKey::new(prefix)
            .map_err(|e| StoreError::invalid(format!("the prefix of {url:?} is not usable: {e}")))?;
    }
    Ok(prefix.to_owned())
}

/// Build the backend for `url`. S3 stores are configured but not contacted; local stores are
/// opened (and their xattr support probed).
pub fn from_url(url: &str, opts: &S3Options) -> Result<(Arc<dyn Backend>, StoreUrl), StoreError> {
    let parsed = StoreUrl::parse(url)?;
    let backend: Arc<dyn Backend> = match &parsed {
        StoreUrl::Local { root } => Arc::new(LocalBackend::new(root)?),
        StoreUrl::Azure { container, account, prefix } => {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let client = super::azure::build(container, account.as_deref(), opts, &env)?;
            let store = Arc::new(Deadline::new(client, opts.request_timeout()));
            let pages: Arc<dyn object_store::list::PaginatedListStore> = store.clone();
            Arc::new(
                ObjectStoreBackend::new(store, prefix)?
                    .with_pages(pages)
                    .with_identifier_names()
                    .with_conditional_uploads(),
            )
        }
        StoreUrl::Gcs { bucket, prefix } => {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let client = super::gcs::build(bucket, opts, &env)?;
            let store = Arc::new(Deadline::new(client, opts.request_timeout()).with_serial_parts());
            let pages: Arc<dyn object_store::list::PaginatedListStore> = store.clone();
            Arc::new(ObjectStoreBackend::new(store, prefix)?.with_pages(pages).with_conditional_uploads())
        }
        StoreUrl::S3 { bucket, prefix } => {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let builder = s3_builder(bucket, opts, &env)?;
            // For the requests object_store cannot send (key rotation); building it contacts nothing.
            let raw = super::raw::RawS3::new(signed_client(opts)?, bucket.clone(), bucket_url(&builder));
            if let Some(keys) = &opts.customer_keys {
                let stores = customer_key_stores(&builder, opts, &keys.0)?;
                let (writer, _) = stores.writer();
                Arc::new(ObjectStoreBackend::new(writer, prefix)?.with_customer_keys(stores).with_raw_s3(raw))
            } else {
                let s3 = builder.build().map_err(|e| {
                    StoreError::invalid(format!("cannot configure S3 access for {url}: {e}"))
                })?;
                let s3 = Arc::new(Deadline::new(s3, opts.request_timeout()));
                let pages: Arc<dyn object_store::list::PaginatedListStore> = s3.clone();
                Arc::new(
                    ObjectStoreBackend::new(s3, prefix)?.with_sse(opts.sse.clone()).with_raw_s3(raw).with_pages(pages),
                )
            }
        }
    };
    Ok((backend, parsed))
}

/// The SSE-C clients, after checking that the key will only travel over https.
fn customer_key_stores(
    builder: &AmazonS3Builder,
    opts: &S3Options,
    keys: &crate::crypto::KeyHistory,
) -> Result<super::CustomerKeyStores, StoreError> {
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let plain = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    if plain || opts.allow_http {
        return Err(StoreError::invalid(format!(
            "mode=sse-c sends the key with every request, so it needs https; the endpoint {} is plain http \
             (AWS refuses SSE-C over http): use an https:// endpoint",
            endpoint.as_deref().unwrap_or("(AWS_ALLOW_HTTP)")
        )));
    }
    super::CustomerKeyStores::build(builder, keys, signed_client(opts)?, bucket_url(builder), opts.request_timeout())
}

/// The URL the bucket's objects live under (`https://host/bucket` or `https://bucket.host`), by the same rules as
/// object_store's builder, so raw signed requests address the same objects as the store.
fn bucket_url(builder: &AmazonS3Builder) -> String {
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let region = builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .unwrap_or_else(|| "us-east-1".to_string());
    let bucket = builder.get_config_value(&AmazonS3ConfigKey::Bucket).unwrap_or_default();
    let virtual_hosted = builder
        .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
        .is_some_and(|v| v == "true");
    match (endpoint, virtual_hosted) {
        (Some(e), true) => e.trim_end_matches('/').to_string(),
        (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
        (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    }
}

/// A signing client for AWS APIs object_store does not cover (KMS, S3 object tagging), with the same credential
/// chain, region, TLS options and CA file as the store built from `opts`. Nothing is contacted here.
pub fn signed_client(opts: &S3Options) -> Result<crate::aws::SignedClient, StoreError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    // The bucket name only satisfies the builder: the credential provider does not depend on it.
    let builder = s3_builder("s3cryptfs-credentials", opts, &env)?;
    let region = builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .unwrap_or_else(|| "us-east-1".to_string());
    let s3 = builder
        .build()
        .map_err(|e| StoreError::invalid(format!("cannot configure AWS access: {e}")))?;
    let http = object_store::client::ReqwestConnector::default()
        .connect(&client_options(&env, true, opts.ca_file.as_ref(), opts.request_timeout())?)
        .map_err(|e| StoreError::invalid(format!("cannot build the HTTP client: {e}")))?;
    Ok(crate::aws::SignedClient::new(http, s3.credentials().clone(), region).with_deadline(opts.request_timeout()))
}

/// The S3 builder for `bucket`, with `env` standing in for the process environment where we
/// read it ourselves (object_store's `from_env` still reads the real one).
fn s3_builder(
    bucket: &str,
    opts: &S3Options,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AmazonS3Builder, StoreError> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);

    if env("AWS_ACCESS_KEY_ID").is_none() {
        let profile = load_profile(env)?;
        if let (Some(id), Some(secret)) = (profile.access_key_id, profile.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = profile.session_token {
                b = b.with_token(token);
            }
        }
        if opts.region.is_none()
            && env("AWS_REGION").is_none()
            && env("AWS_DEFAULT_REGION").is_none()
        {
            if let Some(region) = profile.region {
                b = b.with_region(region);
            }
        }
    }
    if let Some(region) = &opts.region {
        b = b.with_region(region);
    }
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_endpoint(endpoint);
    }
    let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
    if endpoint.is_some() {
        // Custom servers (LocalStack, Garage, MinIO) rarely have wildcard DNS for buckets.
        b = b.with_virtual_hosted_style_request(false);
    }
    let allow_http = opts.allow_http
        || endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
    // Over TLS the transport already delivers the body as sent, so the signature does not hash it
    // (`x-amz-content-sha256: UNSIGNED-PAYLOAD`, as the AWS SDKs do over HTTPS): SHA-256 over every uploaded byte was
    // a sixth of the daemon's CPU samples in a 1 GiB cse-c write. Over plain http the signature still covers the body.
    if endpoint.as_deref().is_none_or(|e| e.starts_with("https://")) {
        b = b.with_unsigned_payload(true);
    }
    // object_store does not export the encryption config key type; its string name parses to it.
    let sse_key = || -> Result<AmazonS3ConfigKey, StoreError> {
        "aws_server_side_encryption"
            .parse::<AmazonS3ConfigKey>()
            .map_err(|e| StoreError::invalid(format!("object_store lacks the SSE setting: {e}")))
    };
    match &opts.sse {
        // SSE-C keys come through `customer_keys`, one client per key.
        None | Some(super::ServerSideEncryption::Customer { .. }) => {}
        Some(super::ServerSideEncryption::S3) => {
            b = b.with_config(sse_key()?, "AES256");
        }
        Some(super::ServerSideEncryption::Kms { key_id, bucket_key }) => {
            b = match key_id {
                Some(k) => b.with_sse_kms_encryption(k),
                None => b.with_config(sse_key()?, "aws:kms"),
            };
            if let Some(enabled) = bucket_key {
                b = b.with_bucket_key(*enabled);
            }
        }
    }
    // Responses go through the echo connector so the SSE headers of every answer can be checked.
    b = b.with_http_connector(super::sse::EchoConnector);
    let limit = opts.request_timeout();
    // Retries only while the request's budget lasts; the `Deadline` wrapper enforces it for the last attempt too.
    let retry = RetryConfig { retry_timeout: limit, ..RetryConfig::default() };
    Ok(b.with_retry(retry).with_client_options(client_options(env, allow_http, opts.ca_file.as_ref(), limit)?))
}

/// Client options from the environment plus ours, built once (see the module docs).
pub(super) fn client_options(
    env: &dyn Fn(&str) -> Option<String>,
    allow_http: bool,
    ca_file: Option<&PathBuf>,
    timeout: Duration,
) -> Result<ClientOptions, StoreError> {
    let parse = |k: &str| match AmazonS3ConfigKey::from_str(k) {
        Ok(AmazonS3ConfigKey::Client(ck)) => Some(ck),
        _ => None,
    };
    client_options_from(env_client_options("AWS_", &parse, env), allow_http, ca_file, timeout)
}

/// The HTTP client settings among the environment variables starting with `prefix` (`parse` knows their names).
pub(super) fn env_client_options(
    prefix: &str,
    parse: &dyn Fn(&str) -> Option<ClientConfigKey>,
    env: &dyn Fn(&str) -> Option<String>,
) -> ClientOptions {
    let mut co = ClientOptions::new();
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if let (true, Some(ck), Some(value)) = (key.starts_with(prefix), parse(&key.to_ascii_lowercase()), env(key)) {
            co = co.with_config(ck, value);
        }
    }
    co
}

/// [`client_options`] from the client settings of another provider's environment (`AZURE_*`).
pub(super) fn client_options_from(
    mut co: ClientOptions,
    allow_http: bool,
    ca_file: Option<&PathBuf>,
    timeout: Duration,
) -> Result<ClientOptions, StoreError> {
    // After the environment: the mount option (or its default) wins over AWS_TIMEOUT / AWS_CONNECT_TIMEOUT.
    co = co.with_timeout(timeout + ATTEMPT_TIMEOUT_MARGIN).with_connect_timeout(timeout.min(CONNECT_TIMEOUT));
    if allow_http {
        co = co.with_allow_http(true);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            StoreError::invalid(format!("cannot read the CA file {} ({e})", path.display()))
        })?;
        let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
            StoreError::invalid(format!(
                "the CA file {} is not valid PEM ({e})",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(StoreError::invalid(format!(
                "the CA file {} contains no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            co = co.with_root_certificate(cert);
        }
    }
    Ok(co)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_and_file_urls() {
        assert_eq!(
            StoreUrl::parse("s3://bucket/some/prefix/").unwrap(),
            StoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://my.bucket-1").unwrap(),
            StoreUrl::S3 {
                bucket: "my.bucket-1".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            StoreUrl::parse("file:///srv/store").unwrap(),
            StoreUrl::Local {
                root: PathBuf::from("/srv/store")
            }
        );
        for bad in [
            "s3://",
            "s3:///prefix",
            "s3://Bucket/x",
            "s3://b/a/../c",
            "s3://b/x?y",
            "file://rel/dir",
            "http://b",
            "bucket",
        ] {
            assert!(
                matches!(StoreUrl::parse(bad), Err(StoreError::InvalidInput { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_gcs_urls() {
        let gcs = |bucket: &str, prefix: &str| StoreUrl::Gcs { bucket: bucket.into(), prefix: prefix.into() };
        assert_eq!(StoreUrl::parse("gs://my_bucket-1/a/b/").unwrap(), gcs("my_bucket-1", "a/b"));
        assert_eq!(StoreUrl::parse("gcs://b.example.com").unwrap(), gcs("b.example.com", ""));
        assert_eq!(StoreUrl::parse("gs://abc").unwrap().kind(), "Google Cloud Storage");
        let long = format!("gs://{}", "a".repeat(64));
        for bad in ["gs://", "gs://ab", "gs://-abc", "gs://abc-", "gs://Abc", "gs://a b", &long, "gs://abc/x/../y"] {
            assert!(matches!(StoreUrl::parse(bad), Err(StoreError::InvalidInput { .. })), "{bad}");
        }
    }

    #[test]
    fn parses_azure_urls() {
        let azure = |container: &str, account: Option<&str>, prefix: &str| StoreUrl::Azure {
            container: container.into(),
            account: account.map(Into::into),
            prefix: prefix.into(),
        };
        assert_eq!(StoreUrl::parse("az://my-container/a/b/").unwrap(), azure("my-container", None, "a/b"));
        assert_eq!(StoreUrl::parse("azure://c01").unwrap(), azure("c01", None, ""));
        assert_eq!(
            StoreUrl::parse("abfss://data@acct01.dfs.core.windows.net/x/y").unwrap(),
            azure("data", Some("acct01"), "x/y")
        );
        let blob_host = StoreUrl::parse("abfs://data@acct01.blob.core.windows.net").unwrap();
        assert_eq!(blob_host, azure("data", Some("acct01"), ""));
        assert_eq!(StoreUrl::parse("abfs://data/p").unwrap(), azure("data", None, "p"));
        assert_eq!(StoreUrl::parse("az://c01").unwrap().kind(), "Azure Blob Storage");
        for bad in [
            "az://",
            "az://ab",
            "az://-abc",
            "az://Abc",
            "az://a_b_c",
            "az://abc/x/../y",
            "az://abc/x#y",
            "az://data@acct01.dfs.core.windows.net",
            "abfss://data@acct01.example.com/x",
            "abfss://data@Acct.dfs.core.windows.net",
            "abfss://data@ab.dfs.core.windows.net",
            "abfss://@acct01.dfs.core.windows.net",
        ] {
            assert!(matches!(StoreUrl::parse(bad), Err(StoreError::InvalidInput { .. })), "{bad}");
        }
    }

    #[test]
    fn from_url_builds_an_s3_backend_without_connecting() {
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            ..S3Options::default()
        };
        let (_backend, parsed) = from_url("s3://bucket/some/prefix/", &opts).unwrap();
        assert_eq!(
            parsed,
            StoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );

        // The http endpoint turned allow_http on and path-style on.
        let env = |_: &str| None;
        let b = s3_builder("bucket", &opts, &env).unwrap();
        assert_eq!(
            b.get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
                .as_deref(),
            Some("false")
        );
        assert_eq!(
            b.get_config_value(&AmazonS3ConfigKey::Client(
                object_store::ClientConfigKey::AllowHttp
            ))
            .as_deref(),
            Some("true")
        );
        assert_eq!(
            b.get_config_value(&AmazonS3ConfigKey::Region).as_deref(),
            Some("us-east-1")
        );

        // timeout= sets the attempt timeout (a second after the request's own deadline) and caps the connect timeout.
        let client = |b: &AmazonS3Builder, k| b.get_config_value(&AmazonS3ConfigKey::Client(k));
        let short = S3Options { timeout: Some(Duration::from_secs(3)), ..opts.clone() };
        let b = s3_builder("bucket", &short, &env).unwrap();
        assert_eq!(client(&b, object_store::ClientConfigKey::Timeout).as_deref(), Some("4s"));
        assert_eq!(client(&b, object_store::ClientConfigKey::ConnectTimeout).as_deref(), Some("3s"));
        let b = s3_builder("bucket", &opts, &env).unwrap();
        assert_eq!(client(&b, object_store::ClientConfigKey::Timeout).as_deref(), Some("31s"));
        assert_eq!(client(&b, object_store::ClientConfigKey::ConnectTimeout).as_deref(), Some("5s"));
    }

    #[test]
    fn profile_files_feed_the_builder_when_env_lacks_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("c"),
            "[p]\naws_access_key_id = AKIDP\naws_secret_access_key = sp\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("f"), "[profile p]\nregion = eu-north-1\n").unwrap();
        let (c, f) = (dir.path().join("c"), dir.path().join("f"));
        let env = |k: &str| match k {
            "AWS_PROFILE" => Some("p".to_owned()),
            "AWS_SHARED_CREDENTIALS_FILE" => Some(c.to_str()?.to_owned()),
            "AWS_CONFIG_FILE" => Some(f.to_str()?.to_owned()),
            _ => None,
        };
        let b = s3_builder("bucket", &S3Options::default(), &env).unwrap();
        assert_eq!(
            b.get_config_value(&AmazonS3ConfigKey::AccessKeyId)
                .as_deref(),
            Some("AKIDP")
        );
        assert_eq!(
            b.get_config_value(&AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-north-1")
        );
        // https endpoint: no plain http.
        let opts = S3Options {
            endpoint: Some("https://s3.example".into()),
            ..S3Options::default()
        };
        let b = s3_builder("bucket", &opts, &env).unwrap();
        assert_ne!(
            b.get_config_value(&AmazonS3ConfigKey::Client(
                object_store::ClientConfigKey::AllowHttp
            ))
            .as_deref(),
            Some("true")
        );
    }

    #[tokio::test]
    async fn from_url_opens_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let (backend, parsed) = from_url(&url, &S3Options::default()).unwrap();
        assert_eq!(
            parsed,
            StoreUrl::Local {
                root: dir.path().to_path_buf()
            }
        );
        let k = super::super::ObjectKey::new("a/b").unwrap();
        backend
            .put(&k, bytes::Bytes::from_static(b"x"), &Default::default())
            .await
            .unwrap();
        assert!(dir.path().join("a/b").is_file());
        assert!(from_url("file:///nonexistent/s3cryptfs", &S3Options::default()).is_err());
    }

    #[test]
    fn sse_c_is_refused_over_plain_http_and_accepted_over_https() {
        let keys = super::super::CustomerKeys(Arc::new(crate::crypto::KeyHistory::single(
            crate::crypto::Key256::generate(),
        )));
        let http = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            customer_keys: Some(keys.clone()),
            ..S3Options::default()
        };
        let err = from_url("s3://bucket", &http).err().expect("sse-c over http must be refused");
        assert!(err.to_string().contains("https"), "{err}");
        let allow = S3Options { endpoint: None, allow_http: true, ..http.clone() };
        assert!(from_url("s3://bucket", &allow).is_err(), "AWS_ALLOW_HTTP must not let the key travel in clear");
        let https = S3Options { endpoint: Some("https://127.0.0.1:9".into()), ..http };
        assert!(from_url("s3://bucket", &https).is_ok());
    }

    #[test]
    fn ca_file_problems_are_reported() {
        let missing = S3Options {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..S3Options::default()
        };
        assert!(matches!(
            from_url("s3://b", &missing),
            Err(StoreError::InvalidInput { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let opts = S3Options {
            ca_file: Some(junk),
            ..S3Options::default()
        };
        let err = from_url("s3://b", &opts).err().unwrap();
        assert!(err.to_string().contains("CA file"), "{err}");
    }
}
