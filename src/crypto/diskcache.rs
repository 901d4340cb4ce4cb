//! The disk cache's cryptography: key derivation, entry names and sealed entries.
//!
//! Why the cache is encrypted in every mode: it holds pages of file content on local disk, where another local user,
//! a stolen disk or a backup could read them, and the promise is that no plaintext of file contents rests on local
//! disk. Why it seals the plaintext page under a key of its own rather than keeping the chunk as the store sent it:
//! one format for every mode (in `none` and the SSE modes the store sends plaintext), for objects of the AWS S3
//! Encryption Client too (whose chunks carry no tag of their own), no object header or metadata needed to read a
//! cached page back, and a damaged entry is recognised by the cache itself, so it is dropped and fetched again
//! instead of failing the read as a tampered object would.
//!
//! Pure like the rest of `crypto`: keys and bytes in, bytes out. docs/FORMAT.md ("The disk cache") has the byte
//! table; the I/O lives in `crate::cache::disk`.
//!
//! Keys, from a root key (what the write journal's key comes from: the customer key in cse-c and sse-c, the
//! journal's local key file in the plaintext modes, a KMS data key kept wrapped in the cache directory in cse-kms):
//! - cache key  = HMAC-SHA256(root, `"s3cryptfs-cache-key-v1" 0x00 store`)
//! - name key   = HMAC-SHA256(root, `"s3cryptfs-cache-names-v1" 0x00 store`)
//! - check      = HMAC-SHA256(cache key, `"s3cryptfs-cache-check-v1"`)[..16], kept in the cache's header so a start
//!   with another key recognises the entries as not its own (and empties the cache) without trying them one by one
//! - entry name = hex(HMAC-SHA256(name key, identity)): an object's key and ETag do not show in the directory
//! - run key    = HMAC-SHA256(cache key, `"s3cryptfs-cache-run-v1" salt`), salt 16 random bytes per mount
//!
//! Nonces: every mount seals under its own run key with a counter from 1, so a nonce never repeats under a key
//! however many entries a cache sees over its life. The salt is in each entry, so any later mount opens it.

use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroizing;

use super::journal::hmac;
use super::aead::{AeadBackend, AeadFailed, AeadKey, NONCE_LEN, TAG_LEN};
use super::secret::{fill_random, KEY_LEN};

/// The first bytes of every entry.
pub const ENTRY_MAGIC: &[u8; 8] = b"s3cfsdc1";
/// Length of a mount's salt.
pub const SALT_LEN: usize = 16;
/// Bytes an entry adds to its page: magic, salt, nonce, tag.
pub const ENTRY_OVERHEAD: usize = ENTRY_MAGIC.len() + SALT_LEN + NONCE_LEN + TAG_LEN;
/// What comes before an entry's ciphertext: magic, salt, nonce.
pub const ENTRY_HEAD: usize = ENTRY_MAGIC.len() + SALT_LEN + NONCE_LEN;
/// Length of the check value.
pub const CHECK_LEN: usize = 16;

const KEY_DOMAIN: &[u8] = b"s3cryptfs-cache-key-v1";
const NAME_DOMAIN: &[u8] = b"s3cryptfs-cache-names-v1";
const CHECK_DOMAIN: &[u8] = b"s3cryptfs-cache-check-v1";
const RUN_DOMAIN: &[u8] = b"s3cryptfs-cache-run-v1";
const ENTRY_DOMAIN: &[u8] = b"s3cryptfs-cache-entry-v1";

/// What one entry holds: page `index` of the version `etag` of the object at `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryId<'a> {
    pub key: &'a str,
    pub etag: &'a str,
    pub index: u64,
}

impl EntryId<'_> {
    /// The identity as bytes with each field's length in front, so that no two identities share an encoding.
    fn encode(&self, domain: &[u8], store: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(domain.len() + store.len() + self.key.len() + self.etag.len() + 20);
        out.extend_from_slice(domain);
        for part in [store.as_bytes(), self.key.as_bytes(), self.etag.as_bytes()] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&self.index.to_be_bytes());
        out
    }
}

/// The keys of one store's cache under one root key.
pub struct CacheKeys {
    store: String,
    aead: AeadBackend,
    key: Zeroizing<[u8; KEY_LEN]>,
    names: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for CacheKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKeys([redacted])")
    }
}

impl CacheKeys {
    pub fn derive(root: &[u8; KEY_LEN], store: &str, aead: AeadBackend) -> CacheKeys {
        CacheKeys {
            store: store.to_string(),
            aead,
            key: hmac(root, &[KEY_DOMAIN, &[0], store.as_bytes()]),
            names: hmac(root, &[NAME_DOMAIN, &[0], store.as_bytes()]),
        }
    }

    /// The value kept in the cache's header that says which key sealed its entries, without revealing the key.
    pub fn check(&self) -> [u8; CHECK_LEN] {
        let k = hmac(&self.key[..], &[CHECK_DOMAIN]);
        let mut out = [0u8; CHECK_LEN];
        out.copy_from_slice(&k[..CHECK_LEN]);
        out
    }

    /// The file name of an entry: 64 hex digits.
    pub fn entry_name(&self, id: &EntryId) -> String {
        super::hex::hex(&hmac(&self.names[..], &[&id.encode(b"", &self.store)])[..])
    }

    /// A sealer for one mount: a fresh salt, so its nonces never meet another mount's.
    pub fn sealer(&self) -> EntrySealer {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt);
        EntrySealer { key: self.run_key(&salt), salt, counter: AtomicU64::new(1) }
    }

    fn run_key(&self, salt: &[u8; SALT_LEN]) -> AeadKey {
        AeadKey::new(self.aead, &hmac(&self.key[..], &[RUN_DOMAIN, salt]))
    }

    /// The page an entry sealed for `id` holds, written to `dst` (the caller's page buffer: no copy), if it is
    /// exactly `dst.len()` bytes. A damaged, truncated, moved or foreign entry fails, and `dst` is then all zeros.
    pub fn open_to(&self, id: &EntryId, stored: &[u8], dst: &mut [u8]) -> Result<(), AeadFailed> {
        if stored.len() != dst.len() + ENTRY_OVERHEAD || !stored.starts_with(ENTRY_MAGIC) {
            dst.fill(0);
            return Err(AeadFailed);
        }
        let (head, rest) = stored.split_at(ENTRY_HEAD);
        let (ciphertext, tag) = rest.split_at(dst.len());
        dst.copy_from_slice(ciphertext);
        self.open_in_place(id, head, dst, tag)
    }

    /// [`CacheKeys::open_to`] of an entry read in three pieces (a scattered read): its `head`
    /// ([`ENTRY_HEAD`] bytes), its ciphertext in `body`, decrypted there in place, and its `tag`. On failure `body`
    /// is all zeros.
    pub fn open_in_place(&self, id: &EntryId, head: &[u8], body: &mut [u8], tag: &[u8]) -> Result<(), AeadFailed> {
        if head.len() != ENTRY_HEAD || !head.starts_with(ENTRY_MAGIC) || tag.len() != TAG_LEN {
            body.fill(0);
            return Err(AeadFailed);
        }
        let (salt, nonce) = head[ENTRY_MAGIC.len()..].split_at(SALT_LEN);
        let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| AeadFailed)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| AeadFailed)?;
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| AeadFailed)?;
        self.run_key(&salt).open_detached(&nonce, &id.encode(ENTRY_DOMAIN, &self.store), body, tag)
    }

    /// The entry for `id` holding `plain`, sealed by `sealer` (which must come from these keys), whole: what the
    /// tests plant and take apart. The cache itself seals in place ([`CacheKeys::seal_in_place`]).
    #[cfg(test)]
    pub fn seal(&self, sealer: &EntrySealer, id: &EntryId, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plain.len() + ENTRY_OVERHEAD];
        let (head_out, rest) = out.split_at_mut(ENTRY_HEAD);
        let (body, tag_out) = rest.split_at_mut(plain.len());
        body.copy_from_slice(plain);
        let (head, tag) = self.seal_in_place(sealer, id, body);
        head_out.copy_from_slice(&head);
        tag_out.copy_from_slice(&tag);
        out
    }

    /// [`CacheKeys::seal`] in three pieces, the page encrypted where it is (no copy): the entry is `head`, `page`
    /// (now its ciphertext), `tag`, in that order.
    pub fn seal_in_place(
        &self,
        sealer: &EntrySealer,
        id: &EntryId,
        page: &mut [u8],
    ) -> ([u8; ENTRY_HEAD], [u8; TAG_LEN]) {
        let n = sealer.counter.fetch_add(1, Ordering::Relaxed);
        let mut head = [0u8; ENTRY_HEAD];
        let (magic, rest) = head.split_at_mut(ENTRY_MAGIC.len());
        let (salt, nonce) = rest.split_at_mut(SALT_LEN);
        magic.copy_from_slice(ENTRY_MAGIC);
        salt.copy_from_slice(&sealer.salt);
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().expect("the head's last NONCE_LEN bytes");
        let tag = sealer.key.seal_detached(&nonce, &id.encode(ENTRY_DOMAIN, &self.store), page);
        (head, tag)
    }
}

/// One mount's entry key and nonce counter (see the module docs).
pub struct EntrySealer {
    key: AeadKey,
    salt: [u8; SALT_LEN],
    counter: AtomicU64,
}

impl std::fmt::Debug for EntrySealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntrySealer([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: [u8; 32] = [7; 32];

    fn id(index: u64) -> EntryId<'static> {
        EntryId { key: "dir/file", etag: "\"abc\"", index }
    }

    #[test]
    fn an_entry_opens_for_its_own_identity_only() {
        let keys = CacheKeys::derive(&ROOT, "s3://b/p", AeadBackend::AwsLc);
        let page = vec![0x5a; 1000];
        let sealed = keys.seal(&keys.sealer(), &id(3), &page);
        assert_eq!(sealed.len(), page.len() + ENTRY_OVERHEAD);
        assert!(!sealed.windows(16).any(|w| w == &page[..16]), "the page shows in the entry");
        let mut out = vec![0u8; 1000];
        keys.open_to(&id(3), &sealed, &mut out).unwrap();
        assert_eq!(out, page);
        // A later mount (another sealer) opens it too.
        let again = CacheKeys::derive(&ROOT, "s3://b/p", AeadBackend::RustCrypto);
        out.fill(0);
        again.open_to(&id(3), &sealed, &mut out).unwrap();
        assert_eq!(out, page);

        let fails = |keys: &CacheKeys, id: EntryId, len: usize, stored: &[u8]| {
            let mut out = vec![7u8; len];
            let r = keys.open_to(&id, stored, &mut out);
            assert!(out.iter().all(|&b| b == 0), "a failed open left bytes behind");
            r.is_err()
        };
        assert!(fails(&keys, id(4), 1000, &sealed), "moved to another page");
        assert!(fails(&keys, EntryId { etag: "\"abd\"", ..id(3) }, 1000, &sealed), "another version");
        assert!(fails(&keys, EntryId { key: "dir/other", ..id(3) }, 1000, &sealed), "another object");
        assert!(fails(&keys, id(3), 999, &sealed), "another length");
        assert!(fails(&keys, id(3), 999, &sealed[..sealed.len() - 1]), "truncated");
        let other_store = CacheKeys::derive(&ROOT, "s3://b/q", AeadBackend::AwsLc);
        assert!(fails(&other_store, id(3), 1000, &sealed), "another store");
        let other_root = CacheKeys::derive(&[8; 32], "s3://b/p", AeadBackend::AwsLc);
        assert!(fails(&other_root, id(3), 1000, &sealed), "another key");
        for at in [0, 8, 8 + SALT_LEN, 8 + SALT_LEN + NONCE_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(fails(&keys, id(3), 1000, &bad), "byte {at} flipped");
        }
    }

    #[test]
    fn names_and_checks_depend_on_key_store_and_identity() {
        let keys = CacheKeys::derive(&ROOT, "s3://b", AeadBackend::AwsLc);
        let name = keys.entry_name(&id(0));
        assert_eq!(name.len(), 64);
        assert_eq!(name, CacheKeys::derive(&ROOT, "s3://b", AeadBackend::AwsLc).entry_name(&id(0)));
        assert_ne!(name, keys.entry_name(&id(1)));
        assert_ne!(name, CacheKeys::derive(&[1; 32], "s3://b", AeadBackend::AwsLc).entry_name(&id(0)));
        assert_ne!(name, CacheKeys::derive(&ROOT, "s3://c", AeadBackend::AwsLc).entry_name(&id(0)));
        // Field boundaries count: "ab" + "c" is not "a" + "bc".
        let a = EntryId { key: "ab", etag: "c", index: 0 };
        let b = EntryId { key: "a", etag: "bc", index: 0 };
        assert_ne!(keys.entry_name(&a), keys.entry_name(&b));
        assert_eq!(keys.check(), CacheKeys::derive(&ROOT, "s3://b", AeadBackend::AwsLc).check());
        assert_ne!(keys.check(), CacheKeys::derive(&[1; 32], "s3://b", AeadBackend::AwsLc).check());
    }

    #[test]
    fn nonces_count_up_within_a_mount_and_salts_differ_between_mounts() {
        let keys = CacheKeys::derive(&ROOT, "s", AeadBackend::AwsLc);
        let s1 = keys.sealer();
        let a = keys.seal(&s1, &id(0), b"x");
        let b = keys.seal(&s1, &id(0), b"x");
        let nonce = |e: &[u8]| e[8 + SALT_LEN..8 + SALT_LEN + NONCE_LEN].to_vec();
        assert_ne!(nonce(&a), nonce(&b));
        assert_eq!(a[8..8 + SALT_LEN], b[8..8 + SALT_LEN]);
        let c = keys.seal(&keys.sealer(), &id(0), b"x");
        assert_ne!(a[8..8 + SALT_LEN], c[8..8 + SALT_LEN], "two mounts drew the same salt");
    }
}
