//! Server-side encryption (SSE-S3, SSE-KMS, SSE-C): asking for it, and checking that the server did it.
//!
//! object_store sends the request headers (`x-amz-server-side-encryption`, `-aws-kms-key-id`, `-bucket-key-enabled`)
//! but returns no response headers. A server that silently ignores the request (several S3-compatible servers do)
//! would then look exactly like one that encrypted. So every S3 request goes through [`EchoConnector`], a thin
//! wrapper around object_store's own HTTP client that copies the SSE response headers into the response's
//! extensions as an [`SseEcho`]; object_store hands those extensions back with each `PutResult`, and the backend
//! refuses a write whose echo does not confirm what was asked ([`ServerSideEncryption::verify`]).

use async_trait::async_trait;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;

/// What the mount asks the server to do with each object it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// SSE-S3: `x-amz-server-side-encryption: AES256`, keys held by the storage service.
    S3,
    /// SSE-KMS: `aws:kms` under `key_id` (a key id, an ARN or `alias/NAME`; `None` = the account's default
    /// `aws/s3` key), optionally with an S3 Bucket Key.
    Kms { key_id: Option<String>, bucket_key: Option<bool> },
    /// SSE-C: the customer's key goes with every request; the server must answer with the key's MD5 (base64), which
    /// names the key without revealing it.
    Customer { key_md5: String },
}

/// The SSE headers of one response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEcho {
    pub algorithm: Option<String>,
    pub kms_key_id: Option<String>,
    /// SSE-C: `x-amz-server-side-encryption-customer-algorithm` and `-customer-key-MD5`.
    pub customer_algorithm: Option<String>,
    pub customer_key_md5: Option<String>,
}

impl ServerSideEncryption {
    /// Checks a write's response. `Err` says, in words, what the server answered instead.
    pub fn verify(&self, echo: Option<&SseEcho>) -> Result<(), String> {
        let echo = echo.cloned().unwrap_or_default();
        let algorithm = echo.algorithm.as_deref();
        match self {
            ServerSideEncryption::Customer { key_md5 } => {
                match (echo.customer_algorithm.as_deref(), echo.customer_key_md5.as_deref()) {
                    (Some("AES256"), Some(md5)) if md5 == key_md5 => Ok(()),
                    (Some("AES256"), Some(md5)) => {
                        Err(format!("the server used the SSE-C key with MD5 {md5}, not ours ({key_md5})"))
                    }
                    (Some(other), _) => Err(format!("the server answered SSE-C algorithm {other:?}, not AES256")),
                    (None, _) => Err("the server did not confirm SSE-C (no x-amz-server-side-encryption-customer-\
                                      algorithm in its answer): it may not support customer keys"
                        .into()),
                }
            }
            ServerSideEncryption::S3 => match algorithm {
                Some("AES256") => Ok(()),
                Some(other) => Err(format!("the server answered server-side encryption {other:?}, not AES256")),
                None => Err("the server did not confirm server-side encryption (no x-amz-server-side-encryption \
                             in its answer): it may not support SSE-S3"
                    .into()),
            },
            ServerSideEncryption::Kms { key_id, .. } => {
                match algorithm {
                    Some("aws:kms") | Some("aws:kms:dsse") => {}
                    Some(other) => {
                        return Err(format!("the server answered server-side encryption {other:?}, not aws:kms"))
                    }
                    None => {
                        return Err("the server did not confirm SSE-KMS (no x-amz-server-side-encryption in its \
                                    answer): it may not support SSE-KMS"
                            .into())
                    }
                }
                // The answer names the key by ARN. A requested key id or ARN must match it; an alias cannot be
                // compared without asking KMS, so only the algorithm is checked then.
                match (key_id.as_deref(), echo.kms_key_id.as_deref()) {
                    (Some(want), Some(got)) if crate::aws::names_kms_key(want, got) == Some(false) => {
                        Err(format!("the server encrypted under KMS key {got}, not the requested {want}"))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// object_store's reqwest connector, with every response's SSE headers recorded (see the module docs).
#[derive(Debug, Default)]
pub struct EchoConnector;

impl HttpConnector for EchoConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(EchoService { inner }))
    }
}

#[derive(Debug)]
struct EchoService {
    inner: HttpClient,
}

fn header(resp: &HttpResponse, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[async_trait]
impl HttpService for EchoService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let mut resp = self.inner.execute(req).await?;
        let echo = SseEcho {
            algorithm: header(&resp, "x-amz-server-side-encryption"),
            kms_key_id: header(&resp, "x-amz-server-side-encryption-aws-kms-key-id"),
            customer_algorithm: header(&resp, "x-amz-server-side-encryption-customer-algorithm"),
            customer_key_md5: header(&resp, "x-amz-server-side-encryption-customer-key-md5"),
        };
        resp.extensions_mut().insert(echo);
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(alg: Option<&str>, key: Option<&str>) -> SseEcho {
        SseEcho { algorithm: alg.map(Into::into), kms_key_id: key.map(Into::into), ..SseEcho::default() }
    }

    #[test]
    fn sse_c_needs_the_algorithm_and_our_key_md5_in_the_answer() {
        let ours = ServerSideEncryption::Customer { key_md5: "bWQ1LW9mLW91ci1rZXk=".into() };
        let answer = |alg: Option<&str>, md5: Option<&str>| SseEcho {
            customer_algorithm: alg.map(Into::into),
            customer_key_md5: md5.map(Into::into),
            ..SseEcho::default()
        };
        assert!(ours.verify(Some(&answer(Some("AES256"), Some("bWQ1LW9mLW91ci1rZXk=")))).is_ok());
        // A server that ignores SSE-C headers answers with neither.
        assert!(ours.verify(None).unwrap_err().contains("did not confirm SSE-C"));
        assert!(ours.verify(Some(&answer(None, None))).is_err());
        let err = ours.verify(Some(&answer(Some("AES256"), Some("b3RoZXI=")))).unwrap_err();
        assert!(err.contains("b3RoZXI="), "{err}");
        // Plain SSE-S3 in the answer is not SSE-C.
        let s3 = SseEcho { algorithm: Some("AES256".into()), ..SseEcho::default() };
        assert!(ours.verify(Some(&s3)).is_err());
    }

    #[test]
    fn a_server_that_ignores_the_request_is_refused() {
        assert!(ServerSideEncryption::S3.verify(None).is_err());
        assert!(ServerSideEncryption::S3.verify(Some(&echo(None, None))).is_err());
        let kms = ServerSideEncryption::Kms { key_id: None, bucket_key: None };
        assert!(kms.verify(Some(&echo(None, None))).unwrap_err().contains("did not confirm"));
    }

    #[test]
    fn the_right_algorithm_is_accepted_and_the_wrong_one_named() {
        assert!(ServerSideEncryption::S3.verify(Some(&echo(Some("AES256"), None))).is_ok());
        let err = ServerSideEncryption::S3.verify(Some(&echo(Some("aws:kms"), None))).unwrap_err();
        assert!(err.contains("aws:kms"), "{err}");
        let kms = ServerSideEncryption::Kms { key_id: None, bucket_key: None };
        assert!(kms.verify(Some(&echo(Some("aws:kms"), Some("arn:aws:kms:r:1:key/abc")))).is_ok());
        assert!(kms.verify(Some(&echo(Some("AES256"), None))).is_err());
    }

    #[test]
    fn kms_key_ids_are_compared_by_id_whatever_form_was_given() {
        let arn = "arn:aws:kms:us-east-1:000000000000:key/1234abcd";
        for want in ["1234abcd", arn] {
            let kms = ServerSideEncryption::Kms { key_id: Some(want.into()), bucket_key: None };
            assert!(kms.verify(Some(&echo(Some("aws:kms"), Some(arn)))).is_ok(), "{want}");
            let other = "arn:aws:kms:us-east-1:000000000000:key/ffff";
            let err = kms.verify(Some(&echo(Some("aws:kms"), Some(other)))).unwrap_err();
            assert!(err.contains("ffff"), "{err}");
        }
        // An alias resolves inside KMS: only the algorithm can be checked.
        let alias = ServerSideEncryption::Kms { key_id: Some("alias/data".into()), bucket_key: None };
        assert!(alias.verify(Some(&echo(Some("aws:kms"), Some(arn)))).is_ok());
    }
}
