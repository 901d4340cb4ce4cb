//! Signed requests to AWS APIs that object_store does not cover: KMS (cse-kms) and a few S3 calls (object tagging
//! for sse-c key selection).
//!
//! We reuse object_store's parts rather than add the AWS SDK: its HTTP client (same TLS roots, proxy and CA options as
//! the store), its credential chain (env, profile bridge, web identity, IMDS — the same chain as the store, as users
//! expect) and its exported SigV4 signer, `AwsAuthorizer`. That keeps one TLS stack and one credential story.
//!
//! Transient failures (transport errors, 5xx, throttling) are retried a few times with backoff; everything else is
//! returned to the caller as an [`ApiError`] that carries the service's own error code and message, so log lines can
//! say what the server said. The whole of one [`SignedClient::send`], retries included, is bounded by the client's
//! deadline (the mount's `timeout=`), so a frozen KMS or S3 endpoint fails the operation with
//! [`ApiError::TimedOut`] instead of holding it for the retries' sum of attempt timeouts.

use std::time::Duration;

use crate::error_text::error_chain;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{HttpClient, HttpRequest, HttpRequestBody};

/// Why a signed request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("cannot get AWS credentials: {0}")]
    Credentials(String),
    #[error("cannot reach {endpoint}: {detail}")]
    Transport { endpoint: String, detail: String },
    /// No answer within the client's deadline (retries included).
    #[error("{endpoint} did not answer within {} s (mount option timeout=)", after.as_secs_f64())]
    TimedOut { endpoint: String, after: Duration },
    /// The service answered with an error status; `code` is its error type (`DisabledException`, `AccessDenied`…).
    #[error("{endpoint} answered {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Status { endpoint: String, status: u16, code: Option<String>, message: String },
}

impl ApiError {
    /// The service's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful answer.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One HTTP client, credential provider and region, signing for any AWS service.
#[derive(Debug, Clone)]
pub struct SignedClient {
    http: HttpClient,
    credentials: AwsCredentialProvider,
    region: String,
    /// Bound on one `send`, retries included.
    deadline: Duration,
}

/// Attempts per request: the first try plus two retries (100 ms, then 400 ms later).
const ATTEMPTS: u32 = 3;

impl SignedClient {
    pub fn new(http: HttpClient, credentials: AwsCredentialProvider, region: impl Into<String>) -> Self {
        SignedClient { http, credentials, region: region.into(), deadline: crate::store::DEFAULT_REQUEST_TIMEOUT }
    }

    /// The same client with `send` bounded by `deadline`, retries included.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Sends a request signed for `service`, retrying transient failures. Non-2xx answers become
    /// [`ApiError::Status`] with the code and message parsed from a JSON (`__type`, `message`) or XML (`<Code>`,
    /// `<Message>`) error body.
    pub async fn send(
        &self,
        service: &str,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<ApiResponse, ApiError> {
        let endpoint = url.split('?').next().unwrap_or(url).to_string();
        match tokio::time::timeout(self.deadline, self.send_with_retries(service, method, url, headers, body, &endpoint))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(ApiError::TimedOut { endpoint, after: self.deadline }),
        }
    }

    async fn send_with_retries(
        &self,
        service: &str,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
        endpoint: &str,
    ) -> Result<ApiResponse, ApiError> {
        let endpoint = endpoint.to_string();
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << (2 * (attempt - 1)))).await;
            }
            let req = self.signed(service, method.clone(), url, headers, body.clone()).await?;
            let resp = match self.http.execute(req).await {
                Ok(r) => r,
                Err(e) => {
                    last = Some(ApiError::Transport { endpoint: endpoint.clone(), detail: error_chain(&e) });
                    continue;
                }
            };
            let (parts, body) = resp.into_parts();
            let bytes = match body.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    last = Some(ApiError::Transport { endpoint: endpoint.clone(), detail: error_chain(&e) });
                    continue;
                }
            };
            if parts.status.is_success() {
                return Ok(ApiResponse { status: parts.status, headers: parts.headers, body: bytes });
            }
            let (code, message) = parse_error(&bytes);
            let err = ApiError::Status { endpoint: endpoint.clone(), status: parts.status.as_u16(), code, message };
            let transient = parts.status.is_server_error()
                || parts.status == StatusCode::TOO_MANY_REQUESTS
                || err.code().is_some_and(|c| c.contains("Throttl") || c == "SlowDown");
            if !transient {
                return Err(err);
            }
            last = Some(err);
        }
        Err(last.expect("invariant broken: the retry loop ran at least once"))
    }

    async fn signed(
        &self,
        service: &str,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<HttpRequest, ApiError> {
        let credential =
            self.credentials.get_credential().await.map_err(|e| ApiError::Credentials(error_chain(&e)))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(url)
            .body(HttpRequestBody::from(body))
            .map_err(|e| ApiError::Transport { endpoint: url.to_string(), detail: e.to_string() })?;
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| ApiError::Transport { endpoint: url.to_string(), detail: e.to_string() })?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|e| ApiError::Transport { endpoint: url.to_string(), detail: e.to_string() })?;
            // An SSE-C key (and the copy source's): kept out of any debug print of the request, as object_store does.
            value.set_sensitive(name.as_str().contains("customer-key"));
            req.headers_mut().insert(name, value);
        }
        // S3 over TLS: the transport already delivers the body as sent, so the signature does not hash it
        // (`UNSIGNED-PAYLOAD`, as the AWS SDKs do over HTTPS): SHA-256 over every uploaded part was an eighth of the
        // daemon's CPU samples in a cse-c write. Over plain http, and for KMS (whose SigV4 has no unsigned payload),
        // the signature still covers the body.
        let unsigned = service == "s3" && url.starts_with("https://");
        AwsAuthorizer::new(&credential, service, &self.region)
            .with_sign_payload(!unsigned)
            .try_authorize(&mut req, None)
            .map_err(|e| ApiError::Credentials(format!("cannot sign the request: {}", error_chain(&e))))?;
        Ok(req)
    }
}

/// `(code, message)` from an AWS error body: JSON protocols (KMS) use `__type` and `message`/`Message`, the S3 REST
/// protocol uses XML `<Code>` and `<Message>`.
fn parse_error(body: &[u8]) -> (Option<String>, String) {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let code = json.get("__type").and_then(|v| v.as_str()).map(|t| {
            // `__type` may be namespaced: `com.amazon.coral.service#DisabledException`.
            t.rsplit('#').next().unwrap_or(t).to_string()
        });
        let message = json
            .get("message")
            .or_else(|| json.get("Message"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        return (code, message);
    }
    let text = String::from_utf8_lossy(body);
    let message = xml_tag(&text, "Message").unwrap_or_else(|| text.chars().take(200).collect());
    (xml_tag(&text, "Code"), message)
}

/// The text of the first `<name>…</name>` element in an XML error body (no nesting, no entities: S3's error bodies
/// need neither).
pub(crate) fn xml_tag(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    Some(text[start..end].to_string())
}

/// Whether `requested` (KMS key id, key ARN, alias name or alias ARN, as written by the user or an object header)
/// names the key whose ARN an answer carries (KMS answers, and S3's SSE-KMS echo). `None` when that cannot be told
/// without asking KMS: aliases.
pub fn names_kms_key(requested: &str, answered: &str) -> Option<bool> {
    if requested.starts_with("alias/") || requested.contains(":alias/") {
        return None;
    }
    if requested.starts_with("arn:") && answered.starts_with("arn:") {
        return Some(requested == answered);
    }
    let id = |s: &'_ str| s.rsplit('/').next().unwrap_or(s).to_string();
    Some(id(requested) == id(answered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_never_answers_costs_one_deadline() {
        use object_store::client::HttpConnector;
        // Listening but never accepting: the kernel completes the connection, nothing answers (a frozen server).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let options = object_store::ClientOptions::new().with_allow_http(true);
        let http = object_store::client::ReqwestConnector::default().connect(&options).unwrap();
        let credentials = std::sync::Arc::new(object_store::StaticCredentialProvider::new(
            object_store::aws::AwsCredential { key_id: "k".into(), secret_key: "s".into(), token: None },
        ));
        let limit = Duration::from_millis(300);
        let client = SignedClient::new(http, credentials, "us-east-1").with_deadline(limit);
        let start = std::time::Instant::now();
        let err = client.send("kms", Method::POST, &url, &[], Bytes::new()).await.unwrap_err();
        assert!(matches!(err, ApiError::TimedOut { after, .. } if after == limit), "{err}");
        assert!(err.to_string().contains("timeout="), "{err}");
        assert!(start.elapsed() < limit + Duration::from_secs(2), "{:?}", start.elapsed());
    }

    /// S3 requests over TLS do not hash their body into the signature (the transport protects it); over plain http,
    /// and KMS requests everywhere, the signature covers the body's SHA-256.
    #[tokio::test]
    async fn only_s3_over_tls_leaves_the_payload_unsigned() {
        use object_store::client::HttpConnector;
        let options = object_store::ClientOptions::new().with_allow_http(true);
        let http = object_store::client::ReqwestConnector::default().connect(&options).unwrap();
        let credentials = std::sync::Arc::new(object_store::StaticCredentialProvider::new(
            object_store::aws::AwsCredential { key_id: "k".into(), secret_key: "s".into(), token: None },
        ));
        let client = SignedClient::new(http, credentials, "us-east-1");
        let body = Bytes::from_static(b"part body");
        let digest = |req: &HttpRequest| req.headers()["x-amz-content-sha256"].to_str().unwrap().to_string();
        let sha = {
            use sha2::Digest;
            crate::crypto::hex::hex(&sha2::Sha256::digest(&body))
        };
        for (service, url, want) in [
            ("s3", "https://s3.example/b/k", "UNSIGNED-PAYLOAD".to_string()),
            ("s3", "http://127.0.0.1:9000/b/k", sha.clone()),
            ("kms", "https://kms.example/", sha.clone()),
        ] {
            let req = client.signed(service, Method::PUT, url, &[], body.clone()).await.unwrap();
            assert_eq!(digest(&req), want, "{service} {url}");
        }
    }

    #[test]
    fn error_bodies_of_both_protocols_are_understood() {
        let (code, msg) =
            parse_error(br#"{"__type":"com.amazon.coral#DisabledException","message":"key is disabled"}"#);
        assert_eq!(code.as_deref(), Some("DisabledException"));
        assert_eq!(msg, "key is disabled");
        let (code, msg) = parse_error(b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>");
        assert_eq!(code.as_deref(), Some("AccessDenied"));
        assert_eq!(msg, "Access Denied");
        let (code, msg) = parse_error(b"gateway timeout");
        assert_eq!(code, None);
        assert_eq!(msg, "gateway timeout");
    }
}
