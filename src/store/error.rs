//! The one error type of the store facade.
//!
//! Callers (the filesystem) branch on *what happened* — missing object, denied, changed under us,
//! unreachable — and never on which backend produced it, so every backend maps its native errors
//! (object_store errors, errno values) into these variants. The original error stays reachable
//! through `source()` wherever a variant carries one, so logs show the full chain.

use std::error::Error as StdError;
use std::path::PathBuf;

/// Boxed source error kept in the chain.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong when talking to object storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The object (or directory marker) does not exist.
    #[error("object {key:?} does not exist")]
    NotFound { key: String },

    /// Credentials were missing, invalid or lacked permission.
    #[error(
        "access to {key:?} was denied ({detail}); check the credentials and the bucket policy"
    )]
    AccessDenied { key: String, detail: String },

    /// A conditional write lost a race: the object changed (or appeared) since it was read.
    #[error("object {key:?} was changed by someone else during the update; retry the operation")]
    Precondition { key: String },

    /// A directory marker cannot be removed because entries still live under it.
    #[error("directory {key:?} is not empty; remove its entries first")]
    NotEmpty { key: String },

    /// The store could not be reached (connection refused, DNS, timeouts, server errors after
    /// retries).
    #[error("the object store is unreachable ({detail}); check the endpoint and the network")]
    Unavailable {
        detail: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The store did not answer one request within the mount's `timeout=` (retries included): a frozen or
    /// unreachable server, or a link too slow for the transfer.
    #[error("the object store did not answer a request for {key:?} within {} s ({detail}); check the endpoint and the network, or raise -o timeout= on a slow link", after.as_secs_f64())]
    TimedOut {
        key: String,
        after: std::time::Duration,
        detail: String,
    },

    /// The request itself was malformed: bad key, bad URL, bad metadata, bad option.
    #[error("{detail}")]
    InvalidInput { detail: String },

    /// A name (one path component) of the key is longer than the store can hold: the local store's filesystem takes
    /// at most `max` bytes per name (NAME_MAX).
    #[error("a name in {key:?} is longer than the {max} bytes the store allows per name; use a shorter name")]
    NameTooLong { key: String, max: usize },

    /// The bucket named in the URL does not exist (or is invisible to these credentials).
    #[error("the bucket of {store} does not exist or is not visible with these credentials; create it or fix the URL")]
    MissingBucket { store: String },

    /// The backing directory of a `file://` store cannot hold user extended attributes.
    #[error("the filesystem holding {root:?} does not support user extended attributes, which the local store needs for object metadata; use a directory on ext4, xfs, btrfs or tmpfs (Linux >= 6.6)")]
    XattrUnsupported { root: PathBuf },

    /// The server did not confirm the server-side encryption the mount asked for; the write is not trusted.
    #[error("object {key:?}: {detail}")]
    EncryptionNotConfirmed { key: String, detail: String },

    /// The object is encrypted under a server-side customer key (SSE-C) the mount does not hold.
    #[error("object {key:?}: {detail}")]
    WrongKey { key: String, detail: String },

    /// The backend cannot do this operation at all.
    #[error("the object store does not support {operation}")]
    Unsupported { operation: String },

    /// Anything else, with the original error as source.
    #[error("object store operation on {key:?} failed")]
    Other {
        key: String,
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// True when the object (or marker) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// True when the store did not answer at all (timed out or unreachable), as opposed to answering "no": what the
    /// filesystem may paper over with what it already knows.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::TimedOut { .. } | StoreError::Unavailable { .. })
    }

    /// True when a conditional write lost a race.
    pub fn is_precondition(&self) -> bool {
        matches!(self, StoreError::Precondition { .. })
    }

    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        StoreError::InvalidInput {
            detail: detail.into(),
        }
    }

    pub(crate) fn other(key: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Other {
            key: key.into(),
            source: source.into(),
        }
    }
}

/// Flatten a source chain into one line, for the `detail` fields that are shown to users.
pub(crate) fn chain_text(err: &(dyn StdError + 'static)) -> String {
    condense_s3_error_body(&crate::error_text::error_chain(err))
}

/// S3 answers an error with an XML body (`<?xml …?>` on a line of its own, then `<Error><Code>AccessDenied</Code>
/// <Message>Access Denied</Message><RequestId>…</RequestId><HostId>…</HostId></Error>`), and object_store puts that
/// body into its message as it came. Keep the code and the message, drop the rest: a detail is one line that a log line
/// or an error sentence can carry.
pub(crate) fn condense_s3_error_body(text: &str) -> String {
    use crate::aws::xml_tag;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<Error>") {
        let Some(len) = rest[start..].find("</Error>") else { break };
        let body = &rest[start..start + len];
        let mut head = rest[..start].trim_end();
        if let Some(decl) = head.rfind("<?xml") {
            if head[decl..].trim_end().ends_with("?>") {
                head = head[..decl].trim_end();
            }
        }
        out.push_str(head);
        match (xml_tag(body, "Code"), xml_tag(body, "Message")) {
            (Some(code), Some(message)) => out.push_str(&format!(" {}: {}", code.trim(), message.trim())),
            (Some(code), None) => out.push_str(&format!(" {}", code.trim())),
            _ => out.push_str(" (an S3 error without a code)"),
        }
        rest = &rest[start + len + "</Error>".len()..];
    }
    out.push_str(rest);
    out.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}
