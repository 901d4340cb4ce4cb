//! The read path over objects in format version 2 (objects changed in place, `crypto::version`): a reader verifies
//! the version map from the metadata before it opens any chunk, so content is byte-exact when the map and body
//! belong together and reading fails (EIO) when a chunk of an older version was spliced in or the map is missing or
//! stale. No writer produces version 2 yet; this is what lets readers come first.

#![allow(clippy::single_range_in_vec_init)] // a list of one chunk range is what these calls mean

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::crypto::format::{chunk_cipher_range, chunk_count, chunk_plain_range, is_last_chunk, FORMAT_VERSION_2};
use crate::crypto::version::{VersionId, VersionMap};
use crate::crypto::{AeadBackend, CryptoError, Key256, KeyHistory, ObjectCipher};
use crate::object::{StoredFormat, MAP_META};
use crate::store::{Expect, ObjectStoreBackend};

const PATH: &str = "dir/big";

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(0x9e37_79b9).to_be_bytes()[5] ^ salt).collect()
}

/// Chunks of `plain`: those in `rewritten` sealed by `id`, the others copied from `old` (or all sealed by `id`).
fn build(cipher: &ObjectCipher, header: &[u8], plain: &[u8], old: Option<(&[u8], u64)>, rewritten: &[u64], id: VersionId) -> Vec<u8> {
    let len = plain.len() as u64;
    let mut out = header.to_vec();
    for i in 0..chunk_count(len) {
        match old {
            Some((old, old_len)) if !rewritten.contains(&i) => {
                let r = chunk_cipher_range(i, old_len);
                out.extend_from_slice(&old[r.start as usize..r.end as usize]);
            }
            _ => {
                let r = chunk_plain_range(i, len);
                cipher.seal_chunk_in(&id, i, is_last_chunk(i, len), &plain[r.start as usize..r.end as usize], &mut out);
            }
        }
    }
    out
}

struct Setup {
    context: ReadContext,
    store: Arc<ObjectStoreBackend>,
    cipher: ObjectCipher,
    a: Vec<u8>,
    a_map: VersionMap,
    b: Vec<u8>,
    b_plain: Vec<u8>,
    b_map: VersionMap,
}

/// Version A of a 5-chunk file, and version B with one byte of chunk 2 changed and every other chunk copied.
fn setup() -> Setup {
    let keys = Arc::new(KeyHistory::single(Key256::generate()));
    let store = Arc::new(ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap());
    let codec = Codec::Cse { keys: Some(keys.clone()), kms: None, aead: AeadBackend::default(), format: crate::config::FileFormat::Own };
    let context = ReadContext {
        backend: store.clone(),
        codec,
        cache: Arc::new(PageCache::new(8 << 20)),
        s3ec: Arc::new(S3ecReads::new(Default::default())),
        fetches: Arc::default(),
        disk: None,
    };
    let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_2, &keys, AeadBackend::default());
    let a_plain = pattern(4 * 65536 + 777, 0);
    let a_map = VersionMap::whole(a_plain.len() as u64, VersionId::random());
    let a = build(&cipher, &header, &a_plain, None, &[], a_map.version_of(0).unwrap());
    let mut b_plain = a_plain.clone();
    b_plain[2 * 65536 + 100] ^= 0x5a;
    let b_id = VersionId::random();
    let b_map = a_map.updated(b_plain.len() as u64, &[2..3], b_id).unwrap();
    let b = build(&cipher, &header, &b_plain, Some((&a, a_plain.len() as u64)), &[2], b_id);
    Setup { context, store, cipher, a, a_map, b, b_plain, b_map }
}

/// Stores `body` at PATH with a binding and, when given, `map`; a reader of what was stored.
async fn stored(s: &Setup, body: &[u8], map: Option<&VersionMap>) -> Arc<Reader> {
    let mut meta = UserMeta::default();
    meta.extra.insert(BIND_META.to_string(), s.cipher.binding(PATH));
    if let Some(map) = map {
        meta.extra.insert(MAP_META.to_string(), s.cipher.seal_map(map));
    }
    let key = ObjectKey::new(PATH).unwrap();
    let info = s.store.put_expect(&key, Bytes::from(body.to_vec()), &meta, &Expect::Any).await.unwrap();
    Reader::new(&s.context, PATH.to_string(), info.etag.unwrap_or_default(), info.size, StoredFormat::Own, 1 << 20).unwrap()
}

fn is_auth_failure(e: &Error, chunk: u64) -> bool {
    format!("{e:?}").contains(&format!("{:?}", CryptoError::AuthenticationFailed { chunk }))
}

#[tokio::test]
async fn a_version_2_object_reads_byte_exact() {
    let s = setup();
    let reader = stored(&s, &s.b, Some(&s.b_map)).await;
    assert_eq!(reader.plain_size(), s.b_plain.len() as u64);
    let all = reader.read(0, s.b_plain.len() + 10).await.unwrap();
    assert!(all == s.b_plain, "whole file");
    let mid = reader.read(2 * 65536 + 90, 20).await.unwrap();
    assert_eq!(mid, s.b_plain[2 * 65536 + 90..2 * 65536 + 110]);
}

#[tokio::test]
async fn an_older_versions_chunk_spliced_in_is_refused_by_the_reader() {
    let s = setup();
    let mut spliced = s.b.clone();
    let r = chunk_cipher_range(2, s.b_plain.len() as u64);
    let (start, end) = (r.start as usize, r.end as usize);
    spliced[start..end].copy_from_slice(&s.a[start..end]);
    let reader = stored(&s, &spliced, Some(&s.b_map)).await;
    let err = reader.read(2 * 65536, 10).await.unwrap_err();
    assert!(is_auth_failure(&err, 2), "{err:?}");
    assert_eq!(err.errno(), libc::EIO);
    // Untouched chunks still read.
    assert_eq!(reader.read(0, 10).await.unwrap(), s.b_plain[..10]);
}

#[tokio::test]
async fn a_missing_or_stale_map_is_refused_by_the_reader() {
    let s = setup();
    let reader = stored(&s, &s.b, None).await;
    let err = reader.read(0, 10).await.unwrap_err();
    assert!(format!("{err:?}").contains("MissingVersionMap"), "{err:?}");
    assert_eq!(err.errno(), libc::EIO);
    // The older version's map (same length, so it authenticates) with the newer body: the changed chunk fails.
    let reader = stored(&s, &s.b, Some(&s.a_map)).await;
    assert_eq!(reader.read(0, 10).await.unwrap(), s.b_plain[..10]);
    let err = reader.read(2 * 65536, 10).await.unwrap_err();
    assert!(is_auth_failure(&err, 2), "{err:?}");
}
