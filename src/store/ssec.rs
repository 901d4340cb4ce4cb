//! SSE-C with a key history: which customer key opens which object.
//!
//! object_store fixes the SSE-C key per client, so the mount holds one client per key of the history; index 0 holds
//! the key that writes. The server only reveals which key encrypted an object when it is given that key (a HEAD
//! without the key is refused with 400, with the wrong one 403), so every object we write also carries the key's
//! MD5 (the same public fingerprint the server echoes) as the object tag [`KEY_MD5_TAG`]. GetObjectTagging needs no
//! SSE-C key, so a read that the first-choice key cannot open looks the key up by its tag instead of trying every
//! key in turn. The key that opened a path is remembered (bounded), so later requests go straight to it.
//!
//! Objects written by other tools carry no tag; for those alone the remaining keys are tried in order (logged), as
//! there is no other way to learn their key.
//!
//! Tagging costs one more permission on AWS (`s3:PutObjectTagging` to write, `s3:GetObjectTagging` to read old
//! objects); a CopyObject keeps the source's tags, so a rename keeps its key fingerprint.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use base64::Engine;
use md5::{Digest, Md5};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, TagSet};

use super::error::StoreError;
use super::ServerSideEncryption;
use crate::aws::SignedClient;
use crate::crypto::KeyHistory;

/// Object tag holding the base64 MD5 of the SSE-C key that encrypted the object.
pub const KEY_MD5_TAG: &str = "s3cryptfs-ssec-key-md5";

/// How many paths remember their key: a few hundred KiB at most, and a forgotten path costs one extra request.
const MEMO_ENTRIES: usize = 16_384;

/// The SSE-C clients of one mount, one per key of the history.
pub struct CustomerKeyStores {
    /// `(key MD5, client)`; index 0 writes.
    clients: Vec<(String, Arc<dyn ObjectStore>)>,
    tagging: SignedClient,
    /// `https://host/bucket` (path style) or `https://bucket.host`: object URLs are this plus `/` and the key.
    bucket_url: String,
    memo: Mutex<lru::LruCache<String, usize>>,
    /// The keys in base64, index as `clients`, for raw requests that carry two keys at once (a CopyObject from one
    /// key to another, see [`CustomerKeyStores::customer_key_headers`]). Each client holds the same text already.
    keys_b64: Vec<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for CustomerKeyStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let md5s: Vec<&str> = self.clients.iter().map(|(m, _)| m.as_str()).collect();
        f.debug_struct("CustomerKeyStores").field("key_md5s", &md5s).finish_non_exhaustive()
    }
}

/// The base64 MD5 of a key, as SSE-C headers carry it.
pub fn key_md5(key: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(key))
}

/// The customer keys a mount uses for SSE-C (compared by fingerprint, printed without material).
#[derive(Clone)]
pub struct CustomerKeys(pub Arc<KeyHistory>);

impl PartialEq for CustomerKeys {
    fn eq(&self, other: &Self) -> bool {
        self.0.fingerprints() == other.0.fingerprints()
    }
}

impl Eq for CustomerKeys {}

impl std::fmt::Debug for CustomerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the object's tag says about its key.
#[derive(Debug, PartialEq, Eq)]
pub enum TaggedKey {
    /// The key at this index of the history.
    Index(usize),
    /// A key that is not in the history (the MD5 the tag names).
    NotInHistory(String),
    /// No tag (written by another tool) or tagging could not be read.
    Unknown,
}

impl CustomerKeyStores {
    /// One client per key: `builder` is the configured S3 builder (credentials, endpoint, TLS), cloned per key.
    pub fn build(
        builder: &AmazonS3Builder,
        keys: &KeyHistory,
        tagging: SignedClient,
        bucket_url: String,
        limit: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let mut clients = Vec::with_capacity(keys.len());
        let mut keys_b64 = Vec::with_capacity(keys.len());
        for key in keys.keys() {
            let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_bytes()));
            let s3 = builder
                .clone()
                .with_ssec_encryption(b64.as_str())
                .build()
                .map_err(|e| StoreError::invalid(format!("cannot configure SSE-C: {e}")))?;
            // Every request bounded, as for the other modes (see `deadline.rs`).
            let s3 = super::deadline::Deadline::new(s3, limit);
            clients.push((key_md5(key.as_bytes()), Arc::new(s3) as Arc<dyn ObjectStore>));
            keys_b64.push(b64);
        }
        if clients.is_empty() {
            return Err(StoreError::invalid("mode=sse-c needs at least one key in the key file"));
        }
        let memo = lru::LruCache::new(NonZeroUsize::new(MEMO_ENTRIES).expect("invariant broken: zero memo size"));
        Ok(CustomerKeyStores { clients, tagging, bucket_url, memo: Mutex::new(memo), keys_b64 })
    }

    /// The client that writes, with what its answers must confirm.
    pub fn writer(&self) -> (Arc<dyn ObjectStore>, ServerSideEncryption) {
        self.client(0)
    }

    pub fn client(&self, index: usize) -> (Arc<dyn ObjectStore>, ServerSideEncryption) {
        let (md5, store) = &self.clients[index];
        (store.clone(), ServerSideEncryption::Customer { key_md5: md5.clone() })
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Always false: a mount has at least the writing key.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The key MD5 of key `index` (base64, as SSE-C headers and our tag carry it).
    pub fn key_md5_of(&self, index: usize) -> &str {
        &self.clients[index].0
    }

    /// The index of the key whose MD5 is `md5`, if the history has it.
    pub fn index_of_md5(&self, md5: &str) -> Option<usize> {
        self.clients.iter().position(|(m, _)| m == md5)
    }

    /// The three SSE-C request headers for key `index`: the target's (`x-amz-server-side-encryption-customer-*`),
    /// or with `copy_source` the source's of a copy (`x-amz-copy-source-server-side-encryption-customer-*`). The
    /// values hold the key: send them over https only (the constructor's caller checks that) and never log them.
    pub(crate) fn customer_key_headers(&self, index: usize, copy_source: bool) -> [(&'static str, String); 3] {
        let (alg, key, md5) = if copy_source {
            (
                "x-amz-copy-source-server-side-encryption-customer-algorithm",
                "x-amz-copy-source-server-side-encryption-customer-key",
                "x-amz-copy-source-server-side-encryption-customer-key-md5",
            )
        } else {
            (
                "x-amz-server-side-encryption-customer-algorithm",
                "x-amz-server-side-encryption-customer-key",
                "x-amz-server-side-encryption-customer-key-md5",
            )
        };
        [
            (alg, "AES256".to_string()),
            (key, self.keys_b64[index].as_str().to_string()),
            (md5, self.clients[index].0.clone()),
        ]
    }

    /// The tags every write carries.
    pub fn write_tags(&self) -> TagSet {
        let mut tags = TagSet::default();
        tags.push(KEY_MD5_TAG, &self.clients[0].0);
        tags
    }

    /// The key index to try first for `path`: the one that opened it last, else the writing key.
    pub fn first_choice(&self, path: &str) -> usize {
        self.memo.lock().expect("memo lock poisoned").get(path).copied().unwrap_or(0)
    }

    pub fn remember(&self, path: &str, index: usize) {
        self.memo.lock().expect("memo lock poisoned").put(path.to_string(), index);
    }

    pub fn forget(&self, path: &str) {
        self.memo.lock().expect("memo lock poisoned").pop(path);
    }

    /// Reads the object's tags (no SSE-C key needed) and finds its key in the history.
    pub async fn tagged_key(&self, path: &str) -> TaggedKey {
        let encoded = percent_encoding::utf8_percent_encode(path, PATH_ENCODE_SET);
        let url = format!("{}/{encoded}?tagging", self.bucket_url);
        let resp = match self.tagging.send("s3", http::Method::GET, &url, &[], bytes::Bytes::new()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(path, error = %e, "cannot read the object's tags to find its SSE-C key");
                return TaggedKey::Unknown;
            }
        };
        match tag_value(&String::from_utf8_lossy(&resp.body), KEY_MD5_TAG) {
            None => TaggedKey::Unknown,
            Some(md5) => match self.clients.iter().position(|(m, _)| *m == md5) {
                Some(i) => TaggedKey::Index(i),
                None => TaggedKey::NotInHistory(md5),
            },
        }
    }
}

/// object_store's path encoding for S3 URLs: everything but unreserved characters and `/`.
const PATH_ENCODE_SET: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// The value of tag `key` in a GetObjectTagging answer (`<Tag><Key>k</Key><Value>v</Value></Tag>`).
fn tag_value(xml: &str, key: &str) -> Option<String> {
    let needle = format!("<Key>{key}</Key>");
    let after = &xml[xml.find(&needle)? + needle.len()..];
    let start = after.find("<Value>")? + "<Value>".len();
    let end = after[start..].find("</Value>")? + start;
    // Tags are XML text: the MD5's base64 alphabet has no characters that need escaping, but decode the basics.
    Some(after[start..end].replace("&#x2B;", "+").replace("&#43;", "+").replace("&#x2F;", "/").replace("&amp;", "&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_md5_is_the_base64_digest_aws_expects() {
        // MD5 of 32 zero bytes, base64, as `openssl dgst -md5 -binary | base64` prints it.
        assert_eq!(key_md5(&[0u8; 32]), "cLyPS3KoaSFGi/joRB3OUQ==");
    }

    #[test]
    fn the_key_tag_is_found_among_others() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><Tagging><TagSet><Tag><Key>team</Key><Value>x</Value></Tag><Tag><Key>s3cryptfs-ssec-key-md5</Key><Value>cLyPS3KoaSFGi/joRB3OUQ==</Value></Tag></TagSet></Tagging>"#;
        assert_eq!(tag_value(xml, KEY_MD5_TAG).as_deref(), Some("cLyPS3KoaSFGi/joRB3OUQ=="));
        assert_eq!(tag_value("<Tagging><TagSet/></Tagging>", KEY_MD5_TAG), None);
    }
}
