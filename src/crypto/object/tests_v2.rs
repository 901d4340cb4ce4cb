//! Format version 2: objects changed in place under their data key. Round trips, the golden fixture, and the tamper
//! classes that version 2 exists for — a chunk of an older version (or of an upload that never completed) spliced
//! in at the same index, reordering, truncation and extension, and maps that are forged, stale or from another
//! object.

#![allow(clippy::single_range_in_vec_init)] // a list of one chunk range is what these calls mean

use super::*;
use crate::crypto::format::{chunk_plain_range, cipher_size, FORMAT_VERSION_2};
use crate::crypto::version::{must_rewrite, Run, VersionId, VersionMap};
use super::test_util::*;
use std::ops::Range;

/// A whole object: header, then every chunk sealed by the version `map` names for it.
fn seal_v2(cipher: &ObjectCipher, header: &[u8; 512], plain: &[u8], map: &VersionMap) -> Vec<u8> {
    let len = plain.len() as u64;
    let mut out = header.to_vec();
    for i in 0..chunk_count(len) {
        let r = chunk_plain_range(i, len);
        let v = map.version_of(i).unwrap();
        cipher.seal_chunk_in(&v, i, is_last_chunk(i, len), &plain[r.start as usize..r.end as usize], &mut out);
    }
    out
}

/// A new version the way an in-place upload makes it: the chunks in `rewritten` sealed again by `id` from
/// `new_plain`, every other chunk's stored bytes copied from `old` verbatim (what UploadPartCopy does).
fn update(
    cipher: &ObjectCipher,
    old: &[u8],
    old_map: &VersionMap,
    new_plain: &[u8],
    rewritten: &[Range<u64>],
    id: VersionId,
) -> (Vec<u8>, VersionMap) {
    let old_len = old_map.plain_len();
    let len = new_plain.len() as u64;
    let map = old_map.updated(len, rewritten, id).unwrap();
    let mut out = old[..512].to_vec();
    for i in 0..chunk_count(len) {
        if map.version_of(i) == Some(id) && rewritten.iter().any(|r| r.contains(&i)) {
            let r = chunk_plain_range(i, len);
            cipher.seal_chunk_in(&id, i, is_last_chunk(i, len), &new_plain[r.start as usize..r.end as usize], &mut out);
        } else {
            let r = chunk_cipher_range(i, old_len);
            out.extend_from_slice(&old[r.start as usize..r.end as usize]);
        }
    }
    (out, map)
}

/// Version A: 6 chunks (5 full and 100 bytes). Version B: one byte changed in chunk 2, the rest copied.
struct Story {
    keys: KeyHistory,
    cipher: ObjectCipher,
    a: Vec<u8>,
    a_plain: Vec<u8>,
    a_map: VersionMap,
    b: Vec<u8>,
    b_plain: Vec<u8>,
    b_map: VersionMap,
}

fn story() -> Story {
    let keys = history(7);
    let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_2, &keys, AeadBackend::AwsLc);
    let a_plain = pattern(5 * 65536 + 100, 0);
    let a_map = VersionMap::whole(a_plain.len() as u64, vid(0xa0));
    let a = seal_v2(&cipher, &header, &a_plain, &a_map);
    let mut b_plain = a_plain.clone();
    b_plain[2 * 65536 + 7] ^= 0xff;
    let (b, b_map) = update(&cipher, &a, &a_map, &b_plain, &[2..3], vid(0xb0));
    Story { keys, cipher, a, a_plain, a_map, b, b_plain, b_map }
}

#[test]
fn round_trips_on_both_backends_and_sizes() {
    let keys = history(3);
    for len in [0usize, 1, 65536, 65537, 3 * 65536 + 9] {
        for backend in BACKENDS {
            let (cipher, header) = ObjectCipher::create_version(FORMAT_VERSION_2, &keys, backend);
            let plain = pattern(len, 1);
            let map = VersionMap::whole(len as u64, VersionId::random());
            let object = seal_v2(&cipher, &header, &plain, &map);
            assert_eq!(object.len() as u64, cipher_size(len as u64), "same sizes as version 1");
            let stored = cipher.seal_map(&map);
            assert_eq!(decrypt(&keys, &object, Some(&stored)).unwrap(), plain, "{len}");
            assert_eq!(cipher.open_map(&stored, len as u64), Ok(map));
        }
    }
}

#[test]
fn a_version_2_object_opens_only_with_its_map() {
    let s = story();
    assert_eq!(decrypt(&s.keys, &s.b, None), Err(CryptoError::MissingVersionMap));
    let mut reader = ObjectCipher::open(&s.b, &s.keys, AeadBackend::AwsLc).unwrap();
    assert_eq!(reader.format_version(), 2);
    let mut out = Vec::new();
    assert_eq!(reader.open_chunk(0, false, &s.b[range_of(0, &s.b)], &mut out), Err(CryptoError::MissingVersionMap));
    reader.attach_map(Some(&s.cipher.seal_map(&s.b_map)), s.b_plain.len() as u64).unwrap();
    reader.open_chunk(0, false, &s.b[range_of(0, &s.b)], &mut out).unwrap();
    assert_eq!(out, s.a_plain[..65536]);
    // A version-1 object ignores a map (there is nothing for it to say).
    let v1 = encrypt_object(&s.keys, AeadBackend::AwsLc, b"v1");
    assert_eq!(decrypt(&s.keys, &v1, Some("junk")).unwrap(), b"v1");
}

#[test]
fn an_in_place_change_copies_the_untouched_chunks_byte_for_byte() {
    let s = story();
    assert_eq!(decrypt(&s.keys, &s.a, Some(&s.cipher.seal_map(&s.a_map))).unwrap(), s.a_plain);
    assert_eq!(decrypt(&s.keys, &s.b, Some(&s.cipher.seal_map(&s.b_map))).unwrap(), s.b_plain);
    for i in [0, 1, 3, 4, 5] {
        assert_eq!(s.a[range_of(i, &s.a)], s.b[range_of(i, &s.b)], "chunk {i} copied");
    }
    assert_ne!(s.a[range_of(2, &s.a)], s.b[range_of(2, &s.b)]);
    assert_eq!(s.b_map.runs(), &[
        Run { first: 0, version: vid(0xa0) },
        Run { first: 2, version: vid(0xb0) },
        Run { first: 3, version: vid(0xa0) },
    ]);
}

/// The attack version 2 exists for: same data key, same file id, same index — but the older version's chunk.
#[test]
fn an_older_versions_chunk_spliced_in_at_the_same_index_fails() {
    let s = story();
    let b_map = s.cipher.seal_map(&s.b_map);
    let mut spliced = s.b.clone();
    spliced[range_of(2, &s.b)].copy_from_slice(&s.a[range_of(2, &s.a)]);
    assert_eq!(decrypt(&s.keys, &spliced, Some(&b_map)), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
    // And the other way: the newer chunk in the older version, under the older map.
    let mut forward = s.a.clone();
    forward[range_of(2, &s.a)].copy_from_slice(&s.b[range_of(2, &s.b)]);
    let a_map = s.cipher.seal_map(&s.a_map);
    assert_eq!(decrypt(&s.keys, &forward, Some(&a_map)), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
    // The newer body under the older map (same length, so the map authenticates): the changed chunk fails.
    assert_eq!(decrypt(&s.keys, &s.b, Some(&a_map)), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
    // The older body under the newer map.
    assert_eq!(decrypt(&s.keys, &s.a, Some(&b_map)), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
}

/// A writer that lost a race (or crashed) leaves the parts of an upload that never completed, sealed under its own
/// version id; a provider that kept them cannot splice them into the version that won.
#[test]
fn a_chunk_of_an_upload_that_never_completed_fails() {
    let s = story();
    let mut loser_plain = s.a_plain.clone();
    loser_plain[2 * 65536] ^= 0x01;
    let (loser, _) = update(&s.cipher, &s.a, &s.a_map, &loser_plain, &[2..3], vid(0xc0));
    let mut spliced = s.b.clone();
    spliced[range_of(2, &s.b)].copy_from_slice(&loser[range_of(2, &loser)]);
    let b_map = s.cipher.seal_map(&s.b_map);
    assert_eq!(decrypt(&s.keys, &spliced, Some(&b_map)), Err(CryptoError::AuthenticationFailed { chunk: 2 }));
}

#[test]
fn reordered_chunks_fail() {
    let s = story();
    let b_map = s.cipher.seal_map(&s.b_map);
    let mut swapped = s.b.clone();
    let (r0, r1) = (range_of(0, &s.b), range_of(1, &s.b));
    swapped[r0.clone()].copy_from_slice(&s.b[r1.clone()]);
    swapped[r1].copy_from_slice(&s.b[r0]);
    assert_eq!(decrypt(&s.keys, &swapped, Some(&b_map)), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
    // Same version id on both sides of a run boundary does not help either: chunk 3 moved to 4.
    let mut moved = s.b.clone();
    let (r3, r4) = (range_of(3, &s.b), range_of(4, &s.b));
    moved[r4].copy_from_slice(&s.b[r3]);
    assert_eq!(decrypt(&s.keys, &moved, Some(&b_map)), Err(CryptoError::AuthenticationFailed { chunk: 4 }));
}

#[test]
fn truncation_and_extension_fail_the_map() {
    let s = story();
    let b_map = s.cipher.seal_map(&s.b_map);
    // Cut at a chunk boundary: a valid length, but not the one the map was sealed for.
    let cut = &s.b[..range_of(4, &s.b).end];
    assert_eq!(decrypt(&s.keys, cut, Some(&b_map)), Err(CryptoError::VersionMapForged));
    // Extended by a chunk from elsewhere in the object.
    let mut longer = s.b.clone();
    longer.extend_from_slice(&s.b[range_of(1, &s.b)]);
    let err = decrypt(&s.keys, &longer, Some(&b_map)).unwrap_err();
    assert!(matches!(err, CryptoError::VersionMapForged | CryptoError::Format(_)), "{err:?}");
    // A shorter version's own map with a longer version's body cut down to that length: the last chunk fails.
    let short_plain = s.b_plain[..3 * 65536 + 5].to_vec();
    let rewrite = must_rewrite(s.b_plain.len() as u64, short_plain.len() as u64);
    let (short, short_map) = update(&s.cipher, &s.b, &s.b_map, &short_plain, &[rewrite], vid(0xd0));
    let short_map = s.cipher.seal_map(&short_map);
    assert_eq!(decrypt(&s.keys, &short, Some(&short_map)).unwrap(), short_plain);
    let mut cut_b = s.b[..short.len()].to_vec();
    cut_b[range_of(3, &short)].copy_from_slice(&s.b[range_of(3, &s.b)][..range_of(3, &short).len()]);
    assert_eq!(decrypt(&s.keys, &cut_b, Some(&short_map)), Err(CryptoError::AuthenticationFailed { chunk: 3 }));
}

#[test]
fn forged_stale_and_foreign_maps_fail() {
    let s = story();
    let stored = s.cipher.seal_map(&s.b_map);
    let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD_NO_PAD, &stored).unwrap();
    let encode = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, b);
    for pos in 0..raw.len() {
        let mut bad = raw.clone();
        bad[pos] ^= 0x04;
        assert_eq!(decrypt(&s.keys, &s.b, Some(&encode(&bad))), Err(CryptoError::VersionMapForged), "byte {pos}");
    }
    for junk in ["", "!!!", &stored[..stored.len() - 2], &encode(&raw[..40])] {
        assert_eq!(decrypt(&s.keys, &s.b, Some(junk)), Err(CryptoError::VersionMapForged), "{junk:?}");
    }
    // The map of another object (another data key and file id), even one with the same runs and length.
    let (other, _) = ObjectCipher::create_version(FORMAT_VERSION_2, &s.keys, AeadBackend::AwsLc);
    assert_eq!(decrypt(&s.keys, &s.b, Some(&other.seal_map(&s.b_map))), Err(CryptoError::VersionMapForged));
    // A map that would give the changed chunk the old id is not something an attacker can make.
    let lie = VersionMap::whole(s.b_plain.len() as u64, vid(0xa0));
    let (stranger, _) = ObjectCipher::create_version(FORMAT_VERSION_2, &history(8), AeadBackend::AwsLc);
    assert_eq!(decrypt(&s.keys, &s.b, Some(&stranger.seal_map(&lie))), Err(CryptoError::VersionMapForged));
}

#[test]
fn the_version_field_is_authenticated() {
    let s = story();
    let b_map = s.cipher.seal_map(&s.b_map);
    // Kind 1: the wrap covers the version.
    let mut as_v1 = s.b.clone();
    as_v1[8..10].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(decrypt(&s.keys, &as_v1, Some(&b_map)), Err(CryptoError::KeyUnwrapFailed));
    // Kind 2: KMS does not see the header, but the chunk AAD domain differs between versions.
    let dk = [0x5a; 32];
    let (kms, header) = ObjectCipher::create_kms_version(
        FORMAT_VERSION_2, FileId::random(), DataKey::from_bytes(&dk), "arn:k", b"blob", AeadBackend::AwsLc,
    )
    .unwrap();
    let map = VersionMap::whole(10, vid(1));
    let object = seal_v2(&kms, &header, b"0123456789", &map);
    let open = |bytes: &[u8], map: Option<&str>| -> Result<Vec<u8>, CryptoError> {
        let mut c = ObjectCipher::open_with_data_key(bytes, DataKey::from_bytes(&dk), AeadBackend::AwsLc)?;
        c.attach_map(map, 10)?;
        let mut out = Vec::new();
        c.open_chunk(0, true, &bytes[512..], &mut out)?;
        Ok(out)
    };
    let stored = kms.seal_map(&map);
    assert_eq!(open(&object, Some(&stored)).unwrap(), b"0123456789");
    let mut relabelled = object.clone();
    relabelled[8..10].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(open(&relabelled, Some(&stored)), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
    // And a version-1 object relabelled as version 2.
    let (v1, h1) = ObjectCipher::create_kms(FileId::random(), DataKey::from_bytes(&dk), "arn:k", b"blob", AeadBackend::AwsLc).unwrap();
    let mut obj1 = h1.to_vec();
    v1.seal_chunk(0, true, b"0123456789", &mut obj1);
    obj1[8..10].copy_from_slice(&2u16.to_be_bytes());
    let relabelled_map = ObjectCipher::open_with_data_key(&obj1, DataKey::from_bytes(&dk), AeadBackend::AwsLc).unwrap().seal_map(&map);
    assert_eq!(open(&obj1, Some(&relabelled_map)), Err(CryptoError::AuthenticationFailed { chunk: 0 }));
}

#[test]
fn rewrap_keeps_the_version_and_the_map() {
    let s = story();
    let new_keys = history(9);
    let reader = ObjectCipher::open(&s.b, &s.keys, AeadBackend::AwsLc).unwrap();
    let mut rekeyed = reader.rewrap(&new_keys).to_vec();
    assert_eq!(rekeyed[8..10], [0, 2]);
    rekeyed.extend_from_slice(&s.b[512..]);
    let map = s.cipher.seal_map(&s.b_map);
    assert_eq!(decrypt(&new_keys, &rekeyed, Some(&map)).unwrap(), s.b_plain);
}

#[test]
#[should_panic(expected = "sealed without its version id")]
fn sealing_a_version_2_chunk_without_its_version_is_a_bug() {
    let (cipher, _) = ObjectCipher::create_version(FORMAT_VERSION_2, &history(1), AeadBackend::AwsLc);
    cipher.seal_chunk(0, true, b"x", &mut Vec::new());
}

#[test]
#[should_panic(expected = "version id sealed into a chunk of a version-1 object")]
fn sealing_a_version_id_into_a_version_1_chunk_is_a_bug() {
    let (cipher, _) = ObjectCipher::create(&history(1), AeadBackend::AwsLc);
    cipher.seal_chunk_in(&vid(1), 0, true, b"x", &mut Vec::new());
}

// ---- golden fixture ----------------------------------------------------------------------------------------------

const FIXED_VERSION: [u8; 16] = [0x66; 16];
const FIXED_OTHER_VERSION: [u8; 16] = [0x77; 16];
const GOLDEN_V2_PLAINTEXT: &[u8] = b"s3cryptfs golden fixture, format version 2\n";
const GOLDEN_V2: &str = include_str!("../testdata/v2-golden.hex");
/// The fixture's version map as stored in its metadata (`s3cryptfs-map`).
const GOLDEN_V2_MAP: &str = "AQAAAAAAAAABAAAAAAAAAABmZmZmZmZmZmZmZmZmZmZmfYYfvPFyiYdtguLRahi7vQ";
/// A three-run map of the same object for a 3 × 65536-byte file (0: 0x66…, 1: 0x77…, 2: 0x66…; 4 chunks sealed in
/// all), pinning the encoding of several runs.
const GOLDEN_V2_THREE_RUNS: &str = "AwAAAAAAAAAEAAAAAAAAAABmZmZmZmZmZmZmZmZmZmZmAAAAAAAAAAF3d3d3d3d3d3d3d3d3d3d3AAAAAAAAAAJmZmZmZmZmZmZmZmZmZmZmCs5Ep/3VKuThNXYGf8cShQ";

fn fixed_v2(backend: AeadBackend) -> (ObjectCipher, [u8; 512]) {
    ObjectCipher::create_with_version(
        FORMAT_VERSION_2,
        &Key256::from_bytes(&FIXED_KEK),
        backend,
        DataKey::from_bytes(&FIXED_DATA_KEY),
        FileId(FIXED_FILE_ID),
        FIXED_WRAP_NONCE,
    )
}

fn golden_v2(backend: AeadBackend) -> Vec<u8> {
    let (cipher, header) = fixed_v2(backend);
    let mut out = header.to_vec();
    cipher.seal_chunk_in_with_nonce(&VersionId(FIXED_VERSION), 0, true, GOLDEN_V2_PLAINTEXT, FIXED_CHUNK_NONCE, &mut out);
    out
}

fn three_runs() -> VersionMap {
    VersionMap::whole(3 * 65536, VersionId(FIXED_VERSION))
        .updated(3 * 65536, &[1..2], VersionId(FIXED_OTHER_VERSION))
        .unwrap()
}

#[test]
fn golden_v2_fixture_decrypts() {
    let fixture = unhex(&GOLDEN_V2.lines().filter(|l| !l.starts_with('#')).collect::<String>());
    let keys = KeyHistory::single(Key256::from_bytes(&FIXED_KEK));
    for backend in BACKENDS {
        assert_eq!(decrypt_object_with_map(&keys, backend, &fixture, Some(GOLDEN_V2_MAP)).unwrap(), GOLDEN_V2_PLAINTEXT);
        let (cipher, _) = fixed_v2(backend);
        let map = VersionMap::whole(GOLDEN_V2_PLAINTEXT.len() as u64, VersionId(FIXED_VERSION));
        assert_eq!(cipher.seal_map(&map), GOLDEN_V2_MAP, "format changed: bump FORMAT_VERSION");
        assert_eq!(cipher.seal_map(&three_runs()), GOLDEN_V2_THREE_RUNS, "format changed: bump FORMAT_VERSION");
        assert_eq!(cipher.open_map(GOLDEN_V2_THREE_RUNS, 3 * 65536), Ok(three_runs()));
        assert_eq!(hex(&golden_v2(backend)), hex(&fixture), "format changed: bump FORMAT_VERSION");
        // Header: version 1's bytes but the version field and the wrap it authenticates.
        assert_eq!(fixture[8..10], [0, 2]);
    }
}

#[test]
#[ignore = "prints the fixture; run when deliberately creating a new format version"]
fn print_golden_v2_fixture() {
    let (cipher, _) = fixed_v2(AeadBackend::AwsLc);
    let map = VersionMap::whole(GOLDEN_V2_PLAINTEXT.len() as u64, VersionId(FIXED_VERSION));
    println!("map: {}", cipher.seal_map(&map));
    println!("three runs: {}", cipher.seal_map(&three_runs()));
    for line in hex(&golden_v2(AeadBackend::AwsLc)).as_bytes().chunks(64) {
        println!("{}", std::str::from_utf8(line).unwrap());
    }
}
