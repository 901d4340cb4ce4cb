//! Format version 3: version 2 whose map is optional, so a file can be sealed before its length is known (a streamed
//! upload) and still be changed in place. Round trips without a map, in-place changes of such an object, what
//! stripping, forging or moving a map gets an attacker (never wrong bytes: at most the first version whole, which
//! is what restoring an older object always gave), relabelling between versions, and the golden fixture.

#![allow(clippy::single_range_in_vec_init)] // a list of one chunk range is what these calls mean

use super::*;
use crate::crypto::format::{chunk_plain_range, cipher_size, FORMAT_VERSION_2, FORMAT_VERSION_3};
use crate::crypto::version::{Run, VersionId, VersionMap};
use super::test_util::*;

/// A new object the way a whole or streamed upload writes it: no map set, every chunk sealed as mapped.
fn seal_new(cipher: &ObjectCipher, header: &[u8; 512], plain: &[u8]) -> Vec<u8> {
    let len = plain.len() as u64;
    let mut out = header.to_vec();
    for i in 0..chunk_count(len) {
        let r = chunk_plain_range(i, len);
        cipher.seal_chunk_as_mapped(i, is_last_chunk(i, len), &plain[r.start as usize..r.end as usize], &mut out);
    }
    out
}

/// Version A: a new object of 6 chunks (5 full and 100 bytes), no map. Version B: one byte changed in chunk 2 by an
/// in-place update (chunk 2 sealed again under id B, the rest copied), with the map that says so.
struct Story {
    keys: KeyHistory,
    cipher: ObjectCipher,
    a: Vec<u8>,
    a_plain: Vec<u8>,
    b: Vec<u8>,
    b_plain: Vec<u8>,
    b_map: VersionMap,
}

fn story() -> Story {
    let keys = history(7);
    let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_3, &keys, AeadBackend::AwsLc);
    let a_plain = pattern(5 * 65536 + 100, 0);
    let a = seal_new(&cipher, &header, &a_plain);
    // The updater opens the base as any reader does: no stored map, so the implicit one.
    let mut base = ObjectCipher::open(&a, &keys, AeadBackend::AwsLc).unwrap();
    base.attach_map(None, a_plain.len() as u64).unwrap();
    let a_map = base.version_map().unwrap().clone();
    let mut b_plain = a_plain.clone();
    b_plain[2 * 65536 + 7] ^= 0xff;
    let b_map = a_map.updated(b_plain.len() as u64, &[2..3], vid(0xb0)).unwrap();
    let mut b = a[..512].to_vec();
    for i in 0..chunk_count(b_plain.len() as u64) {
        if i == 2 {
            let r = chunk_plain_range(i, b_plain.len() as u64);
            base.seal_chunk_in(&vid(0xb0), i, false, &b_plain[r.start as usize..r.end as usize], &mut b);
        } else {
            b.extend_from_slice(&a[range_of(i, &a)]);
        }
    }
    Story { keys, cipher, a, a_plain, b, b_plain, b_map }
}

#[test]
fn a_new_version_3_object_needs_no_map_on_both_backends_and_sizes() {
    let keys = history(3);
    for len in [0usize, 1, 65536, 65537, 3 * 65536 + 9] {
        for backend in BACKENDS {
            let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_3, &keys, backend);
            assert_eq!(header[8..10], [0, 3]);
            let plain = pattern(len, 1);
            let object = seal_new(&cipher, &header, &plain);
            assert_eq!(object.len() as u64, cipher_size(len as u64), "same sizes as version 1");
            assert_eq!(decrypt(&keys, &object, None).unwrap(), plain, "{len}");
            // Its implicit map, sealed and stored, says the same thing.
            let implicit = VersionMap::whole(len as u64, cipher.implicit_version());
            assert_eq!(decrypt(&keys, &object, Some(&cipher.seal_map(&implicit))).unwrap(), plain, "{len}");
        }
    }
}

#[test]
fn the_implicit_version_is_the_file_id_and_counts_every_chunk_as_sealed() {
    let s = story();
    let mut reader = ObjectCipher::open(&s.a, &s.keys, AeadBackend::AwsLc).unwrap();
    assert_eq!(reader.format_version(), 3);
    reader.attach_map(None, s.a_plain.len() as u64).unwrap();
    let map = reader.version_map().unwrap();
    assert_eq!(map.runs(), &[Run { first: 0, version: VersionId(s.cipher.file_id().0) }]);
    assert_eq!(map, &VersionMap::whole(s.a_plain.len() as u64, VersionId(s.cipher.file_id().0)));
}

#[test]
fn a_version_3_object_changes_in_place_and_its_map_is_then_required() {
    let s = story();
    let b_map = s.cipher.seal_map(&s.b_map);
    assert_eq!(decrypt(&s.keys, &s.a, None).unwrap(), s.a_plain);
    assert_eq!(decrypt(&s.keys, &s.b, Some(&b_map)).unwrap(), s.b_plain);
    for i in [0, 1, 3, 4, 5] {
        assert_eq!(s.a[range_of(i, &s.a)], s.b[range_of(i, &s.b)], "chunk {i} copied");
    }
    // The map stripped: the chunk the change sealed fails; nothing opens as wrong bytes.
    assert_eq!(decrypt(&s.keys, &s.b, None), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
    // A second change on top of the first keeps working from the stored map.
    let mut reader = ObjectCipher::open(&s.b, &s.keys, AeadBackend::AwsLc).unwrap();
    reader.attach_map(Some(&b_map), s.b_plain.len() as u64).unwrap();
    assert_eq!(reader.version_map(), Some(&s.b_map));
}

/// What an attacker who can edit the bucket gets from the optional map: the older chunk spliced back with the map
/// stripped is the first version, whole and exact (a rollback of the whole object, which restoring its older bytes
/// always was, docs/SECURITY.md); a mix of versions never opens.
#[test]
fn stripping_the_map_and_splicing_older_chunks_gives_at_most_the_first_version_whole() {
    let s = story();
    let b_map = s.cipher.seal_map(&s.b_map);
    let mut spliced = s.b.clone();
    spliced[range_of(2, &s.b)].copy_from_slice(&s.a[range_of(2, &s.a)]);
    assert_eq!(decrypt(&s.keys, &spliced, Some(&b_map)), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
    assert_eq!(decrypt(&s.keys, &spliced, None).unwrap(), s.a_plain, "the first version, byte for byte");
    // The newer chunk in the first version without a map fails.
    let mut forward = s.a.clone();
    forward[range_of(2, &s.a)].copy_from_slice(&s.b[range_of(2, &s.b)]);
    assert_eq!(decrypt(&s.keys, &forward, None), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
    // A map cannot be made without the data key: another object's map for the same runs does not verify.
    let (other, _) = ObjectCipher::create_version(FORMAT_VERSION_3, &s.keys, AeadBackend::AwsLc);
    assert_eq!(decrypt(&s.keys, &s.b, Some(&other.seal_map(&s.b_map))), Err(CryptoError::VersionMapForged));
    // Truncation and reordering fail without a map, as in version 1.
    let cut = &s.a[..range_of(4, &s.a).end];
    assert_eq!(decrypt(&s.keys, cut, None), Err(CryptoError::AuthenticationFailed { chunk: 4 }));
    let mut swapped = s.a.clone();
    let (r0, r1) = (range_of(0, &s.a), range_of(1, &s.a));
    swapped[r0.clone()].copy_from_slice(&s.a[r1.clone()]);
    swapped[r1].copy_from_slice(&s.a[r0]);
    assert_eq!(decrypt(&s.keys, &swapped, None), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
}

#[test]
fn relabelling_between_versions_2_and_3_fails() {
    // Kind 1: the wrap covers the version field.
    let s = story();
    let mut as_v2 = s.a.clone();
    as_v2[8..10].copy_from_slice(&2u16.to_be_bytes());
    let implicit = s.cipher.seal_map(&VersionMap::whole(s.a_plain.len() as u64, s.cipher.implicit_version()));
    assert_eq!(decrypt(&s.keys, &as_v2, Some(&implicit)), Err(CryptoError::KeyUnwrapFailed));
    // Kind 2: KMS does not see the header, but the chunk AAD domains of the two versions differ.
    let dk = [0x5a; 32];
    let open = |bytes: &[u8], map: Option<&str>| -> Result<Vec<u8>, CryptoError> {
        let mut c = ObjectCipher::open_with_data_key(bytes, DataKey::from_bytes(&dk), AeadBackend::AwsLc)?;
        c.attach_map(map, 10)?;
        let mut out = Vec::new();
        c.open_chunk(0, true, &bytes[512..], &mut out)?;
        Ok(out)
    };
    let file_id = FileId::random();
    let (v3, h3) = ObjectCipher::create_kms_version(
        FORMAT_VERSION_3, file_id, DataKey::from_bytes(&dk), "arn:k", b"blob", AeadBackend::AwsLc,
    )
    .unwrap();
    let obj3 = seal_new(&v3, &h3, b"0123456789");
    assert_eq!(open(&obj3, None).unwrap(), b"0123456789");
    let implicit = v3.seal_map(&VersionMap::whole(10, v3.implicit_version()));
    let mut relabelled = obj3.clone();
    relabelled[8..10].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(open(&relabelled, Some(&implicit)), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
    // A version-2 object (same key, file id and version id) relabelled as version 3.
    let (mut v2, h2) = ObjectCipher::create_kms_version(
        FORMAT_VERSION_2, file_id, DataKey::from_bytes(&dk), "arn:k", b"blob", AeadBackend::AwsLc,
    )
    .unwrap();
    v2.set_map(VersionMap::whole(10, VersionId(file_id.0)));
    let mut obj2 = h2.to_vec();
    v2.seal_chunk_as_mapped(0, true, b"0123456789", &mut obj2);
    assert_eq!(open(&obj2, Some(&implicit)).unwrap(), b"0123456789");
    obj2[8..10].copy_from_slice(&3u16.to_be_bytes());
    assert_eq!(open(&obj2, None), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
    assert_eq!(open(&obj2, Some(&implicit)), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
}

#[test]
fn rewrap_keeps_version_3() {
    let s = story();
    let new_keys = history(9);
    let reader = ObjectCipher::open(&s.a, &s.keys, AeadBackend::AwsLc).unwrap();
    let mut rekeyed = reader.rewrap(&new_keys).to_vec();
    assert_eq!(rekeyed[8..10], [0, 3]);
    rekeyed.extend_from_slice(&s.a[512..]);
    assert_eq!(decrypt(&new_keys, &rekeyed, None).unwrap(), s.a_plain);
}

// ---- golden fixture ----------------------------------------------------------------------------------------------

const GOLDEN_V3_PLAINTEXT: &[u8] = b"s3cryptfs golden fixture, format version 3\n";
const GOLDEN_V3: &str = include_str!("../testdata/v3-golden.hex");

fn golden_v3(backend: AeadBackend) -> Vec<u8> {
    let (cipher, header) = ObjectCipher::create_with_version(
        FORMAT_VERSION_3,
        &Key256::from_bytes(&FIXED_KEK),
        backend,
        DataKey::from_bytes(&FIXED_DATA_KEY),
        FileId(FIXED_FILE_ID),
        FIXED_WRAP_NONCE,
    );
    let mut out = header.to_vec();
    cipher.seal_chunk_in_with_nonce(&cipher.implicit_version(), 0, true, GOLDEN_V3_PLAINTEXT, FIXED_CHUNK_NONCE, &mut out);
    out
}

#[test]
fn golden_v3_fixture_decrypts() {
    let fixture = unhex(&GOLDEN_V3.lines().filter(|l| !l.starts_with('#')).collect::<String>());
    let keys = KeyHistory::single(Key256::from_bytes(&FIXED_KEK));
    for backend in BACKENDS {
        assert_eq!(decrypt_object_with_map(&keys, backend, &fixture, None).unwrap(), GOLDEN_V3_PLAINTEXT);
        assert_eq!(hex(&golden_v3(backend)), hex(&fixture), "format changed: bump FORMAT_VERSION");
        assert_eq!(fixture[8..10], [0, 3]);
    }
}

#[test]
#[ignore = "prints the fixture; run when deliberately creating a new format version"]
fn print_golden_v3_fixture() {
    for line in hex(&golden_v3(AeadBackend::AwsLc)).as_bytes().chunks(64) {
        println!("{}", std::str::from_utf8(line).unwrap());
    }
}
