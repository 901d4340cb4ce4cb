//! Round trips, format pinning, golden fixture and the tamper classes for `ObjectCipher`.

use super::*;
use crate::crypto::error::FormatError;
use crate::crypto::format::{cipher_size, CHUNK_PLAIN_LEN};

const BACKENDS: [AeadBackend; 2] = [AeadBackend::AwsLc, AeadBackend::RustCrypto];

fn history(byte: u8) -> KeyHistory {
    KeyHistory::single(Key256::from_bytes(&[byte; 32]))
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    assert!(s.len() % 2 == 0);
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic plaintext so failures are reproducible.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9).to_be_bytes()[5])
        .collect()
}

// ---- round trips ----------------------------------------------------------

#[test]
fn round_trips_at_chunk_boundaries_on_both_backends() {
    let keys = history(1);
    for len in [0, 1, 65535, 65536, 65537, 3 * 65536, 3 * 65536 + 5] {
        let plaintext = pattern(len);
        for enc in BACKENDS {
            let object = encrypt_object(&keys, enc, &plaintext);
            assert_eq!(object.len() as u64, cipher_size(len as u64), "len {len}");
            for dec in BACKENDS {
                assert_eq!(
                    decrypt_object(&keys, dec, &object).unwrap(),
                    plaintext,
                    "len {len} {enc:?}->{dec:?}"
                );
            }
        }
    }
}

#[test]
fn each_object_gets_a_fresh_file_id_data_key_and_nonces() {
    let keys = history(1);
    let a = encrypt_object(&keys, AeadBackend::default(), b"same");
    let b = encrypt_object(&keys, AeadBackend::default(), b"same");
    assert_ne!(a[16..32], b[16..32], "file id");
    assert_ne!(a[512..], b[512..], "chunk");
}

#[test]
fn chunk_context_round_trips_with_the_same_file_id() {
    let keys = history(7);
    let (writer, header) = ObjectCipher::create(&keys, AeadBackend::AwsLc);
    let reader = ObjectCipher::open(&header, &keys, AeadBackend::RustCrypto).unwrap();
    assert_eq!(writer.file_id(), reader.file_id());
    let mut chunk = Vec::new();
    writer.seal_chunk(4, false, &pattern(65536), &mut chunk);
    assert_eq!(chunk.len() as u64, CHUNK_CIPHER_LEN);
    let mut out = b"keep".to_vec();
    reader.open_chunk(4, false, &chunk, &mut out).unwrap();
    assert_eq!(out[4..], pattern(65536)[..]);
    assert!(!format!("{reader:?}").contains("data_key"));
}

#[test]
#[should_panic(expected = "only the last chunk may be short")]
fn sealing_a_short_middle_chunk_is_a_bug() {
    let (c, _) = ObjectCipher::create(&history(1), AeadBackend::AwsLc);
    c.seal_chunk(0, false, b"short", &mut Vec::new());
}

#[test]
#[should_panic(expected = "longer than CHUNK_PLAIN_LEN")]
fn sealing_an_oversized_chunk_is_a_bug() {
    let (c, _) = ObjectCipher::create(&history(1), AeadBackend::AwsLc);
    c.seal_chunk(
        0,
        true,
        &vec![0; CHUNK_PLAIN_LEN as usize + 1],
        &mut Vec::new(),
    );
}

#[test]
#[should_panic(expected = "only an empty file has an empty last chunk")]
fn sealing_an_empty_trailing_chunk_is_a_bug() {
    let (c, _) = ObjectCipher::create(&history(1), AeadBackend::AwsLc);
    c.seal_chunk(1, true, b"", &mut Vec::new());
}

// ---- key rotation -----------------------------------------------------------

#[test]
fn rewrap_rotates_the_kek_without_touching_chunks() {
    let old = history(1);
    let plaintext = pattern(2 * 65536 + 9);
    let object = encrypt_object(&old, AeadBackend::AwsLc, &plaintext);
    let cipher = ObjectCipher::open(&object, &old, AeadBackend::AwsLc).unwrap();

    let new = KeyHistory::parse(concat!(
        "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n", // new key, 32 x 0x02
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n", // old key, 32 x 0x01
    ))
    .unwrap();
    let new_header = cipher.rewrap(&new);
    assert_eq!(new_header[16..32], object[16..32], "same file id");
    assert_ne!(new_header[..], object[..512]);

    let mut rotated = new_header.to_vec();
    rotated.extend_from_slice(&object[512..]);
    // Readable with only the new key; the old header is not.
    let only_new = history(2);
    for backend in BACKENDS {
        assert_eq!(
            decrypt_object(&only_new, backend, &rotated).unwrap(),
            plaintext
        );
    }
    assert_eq!(
        decrypt_object(&only_new, AeadBackend::AwsLc, &object),
        Err(CryptoError::UnknownKey {
            fingerprint: Key256::from_bytes(&[1; 32]).fingerprint()
        })
    );
    // The binding depends on the data key and file id only, so it survives rotation.
    let rotated_cipher = ObjectCipher::open(&rotated, &only_new, AeadBackend::AwsLc).unwrap();
    assert_eq!(rotated_cipher.binding("a/b"), cipher.binding("a/b"));
}

// ---- format pinning and golden fixture -------------------------------------------

const FIXED_KEK: [u8; 32] = [0x11; 32];
const FIXED_DATA_KEY: [u8; 32] = [0x22; 32];
const FIXED_FILE_ID: [u8; 16] = [0x33; 16];
const FIXED_WRAP_NONCE: [u8; 12] = [0x44; 12];
const FIXED_CHUNK_NONCE: [u8; 12] = [0x55; 12];
const GOLDEN_PLAINTEXT: &[u8] = b"s3cryptfs golden fixture, format version 1\n";
const GOLDEN_PATH: &str = "photos/2024/cat.jpg";

fn fixed_cipher(backend: AeadBackend) -> (ObjectCipher, [u8; 512]) {
    ObjectCipher::create_with(
        &Key256::from_bytes(&FIXED_KEK),
        backend,
        DataKey::from_bytes(&FIXED_DATA_KEY),
        FileId(FIXED_FILE_ID),
        FIXED_WRAP_NONCE,
    )
}

/// Header from fixed inputs. Bytes 0..102 carry data; 102..512 must be zero.
const PINNED_HEADER_HEX: &str = concat!(
    "7333637279707466",                 // magic "s3cryptf"
    "0001",                             // version 1
    "01",                               // envelope kind 1 (customer key)
    "10",                               // chunk size log2 = 16
    "00000000",                         // flags
    "33333333333333333333333333333333", // file id
    "0044",                             // envelope length 68
    "678bb5420bbacd73",                 // KEK fingerprint
    "444444444444444444444444",         // wrap nonce
    "ee676a4c681a0615cbb2bdbf0ac855cebae8ee199a2f1df5f571c3411ee908fe", // wrapped data key (32)
    "4c68f33758a5d7188a91aae442ba97ed", // wrap tag (16)
);

#[test]
fn header_bytes_are_pinned() {
    for backend in BACKENDS {
        let (_, header) = fixed_cipher(backend);
        let mut expected = unhex(PINNED_HEADER_HEX);
        expected.resize(512, 0);
        assert_eq!(
            hex(&header),
            hex(&expected),
            "format changed: bump FORMAT_VERSION ({backend:?})"
        );
    }
}

fn golden_object(backend: AeadBackend) -> Vec<u8> {
    let (cipher, header) = fixed_cipher(backend);
    seal_all(&cipher, &header, GOLDEN_PLAINTEXT, |_| {
        Some(FIXED_CHUNK_NONCE)
    })
}

const GOLDEN_V1: &str = include_str!("../testdata/v1-golden.hex");
const GOLDEN_BINDING: &str = "J8OvVQ7Hm1K168HCgheYMA";

#[test]
fn golden_v1_fixture_still_decrypts() {
    let fixture = unhex(
        GOLDEN_V1
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<String>()
            .as_str(),
    );
    let keys = KeyHistory::single(Key256::from_bytes(&FIXED_KEK));
    for backend in BACKENDS {
        assert_eq!(
            decrypt_object(&keys, backend, &fixture).unwrap(),
            GOLDEN_PLAINTEXT
        );
        let cipher = ObjectCipher::open(&fixture, &keys, backend).unwrap();
        assert_eq!(cipher.verify_binding(GOLDEN_PATH, GOLDEN_BINDING), Ok(()));
        assert_eq!(
            cipher.binding(GOLDEN_PATH),
            GOLDEN_BINDING,
            "format changed: bump FORMAT_VERSION"
        );
        // The writer still produces exactly these bytes from the same inputs.
        assert_eq!(
            hex(&golden_object(backend)),
            hex(&fixture),
            "format changed: bump FORMAT_VERSION"
        );
    }
}

#[test]
#[ignore = "prints the fixture; run when deliberately creating a new format version"]
fn print_golden_fixture() {
    let (cipher, header) = fixed_cipher(AeadBackend::AwsLc);
    println!("header: {}", hex(&header[..102]));
    println!("binding: {}", cipher.binding(GOLDEN_PATH));
    for line in hex(&golden_object(AeadBackend::AwsLc))
        .as_bytes()
        .chunks(64)
    {
        println!("{}", std::str::from_utf8(line).unwrap());
    }
}

// ---- tampering -------------------------------------------------------------

/// A 4-chunk object (3 full + 5 bytes) and its keys.
fn victim() -> (KeyHistory, Vec<u8>, Vec<u8>) {
    let keys = history(9);
    let plaintext = pattern(3 * 65536 + 5);
    let object = encrypt_object(&keys, AeadBackend::AwsLc, &plaintext);
    (keys, plaintext, object)
}

fn chunk_range(index: u64, object: &[u8]) -> std::ops::Range<usize> {
    let r = chunk_cipher_range(index, plain_size(object.len() as u64).unwrap());
    r.start as usize..r.end as usize
}

fn decrypt(keys: &KeyHistory, object: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let aws = decrypt_object(keys, AeadBackend::AwsLc, object);
    assert_eq!(
        aws,
        decrypt_object(keys, AeadBackend::RustCrypto, object),
        "backends disagree"
    );
    aws
}

#[test]
fn victim_is_intact() {
    let (keys, plaintext, object) = victim();
    assert_eq!(decrypt(&keys, &object).unwrap(), plaintext);
}

#[test]
fn bit_flips_in_chunks_fail_that_chunk() {
    let (keys, _, object) = victim();
    for (index, offset_in_chunk) in [(0, 0), (1, 11), (1, 12), (2, 40_000), (3, 12), (3, 32)] {
        let mut bad = object.clone();
        bad[chunk_range(index, &object).start + offset_in_chunk] ^= 0x10;
        assert_eq!(
            decrypt(&keys, &bad),
            Err(CryptoError::AuthenticationFailed { chunk: index }),
            "{index}/{offset_in_chunk}"
        );
    }
}

#[test]
fn bit_flips_in_the_header_fail_with_the_field_specific_error() {
    let keys = history(1);
    let object = encrypt_object(&keys, AeadBackend::AwsLc, b"header flip");
    for pos in 0..512 {
        for bit in [0x01u8, 0x80] {
            let mut bad = object.clone();
            bad[pos] ^= bit;
            let got = decrypt(&keys, &bad).unwrap_err();
            let ok = match pos {
                0..=7 => got == CryptoError::NotOurFormat,
                8..=9 => matches!(got, CryptoError::UnsupportedVersion { .. }),
                10 => matches!(got, CryptoError::UnsupportedEnvelope { .. }),
                11..=15 | 32..=33 | 102.. => matches!(got, CryptoError::Malformed { .. }),
                34..=41 => matches!(got, CryptoError::UnknownKey { .. }),
                // file id, wrap nonce, wrapped key, tag
                _ => got == CryptoError::KeyUnwrapFailed,
            };
            assert!(ok, "byte {pos} bit {bit:#x}: {got:?}");
        }
    }
}

#[test]
fn truncation_at_a_chunk_boundary_fails_the_new_last_chunk() {
    let (keys, _, object) = victim();
    for keep in [3, 2, 1] {
        let cut = &object[..chunk_range(keep - 1, &object).end];
        assert_eq!(
            decrypt(&keys, cut),
            Err(CryptoError::AuthenticationFailed { chunk: keep - 1 }),
            "keep {keep}"
        );
    }
    // All chunks dropped: not even an empty file.
    assert_eq!(
        decrypt(&keys, &object[..512]),
        Err(CryptoError::Format(FormatError::TooShort {
            len: 512,
            min: 540
        }))
    );
}

#[test]
fn truncation_inside_a_chunk_is_detected() {
    let (keys, _, object) = victim();
    let n = object.len();
    // Last chunk (33 bytes) loses one byte: still a plausible length, fails authentication.
    assert_eq!(
        decrypt(&keys, &object[..n - 1]),
        Err(CryptoError::AuthenticationFailed { chunk: 3 })
    );
    // ... loses ten: a length no plaintext encrypts to.
    assert_eq!(
        decrypt(&keys, &object[..n - 10]),
        Err(CryptoError::Format(FormatError::InvalidLength {
            len: n as u64 - 10,
            remainder: 23
        }))
    );
    // Cut in the middle of full chunk 2.
    let mid = chunk_range(2, &object).start + 30_000;
    assert_eq!(
        decrypt(&keys, &object[..mid]),
        Err(CryptoError::AuthenticationFailed { chunk: 2 })
    );
    // A chunk handed over short by a ranged read.
    let cipher = ObjectCipher::open(&object, &keys, AeadBackend::AwsLc).unwrap();
    let r = chunk_range(1, &object);
    assert_eq!(
        cipher.open_chunk(1, false, &object[r.start..r.start + 27], &mut Vec::new()),
        Err(CryptoError::TruncatedChunk { chunk: 1, len: 27 })
    );
    // Header itself truncated.
    assert_eq!(
        decrypt(&keys, &object[..300]),
        Err(CryptoError::Malformed {
            what: "the header is truncated"
        })
    );
}

#[test]
fn extension_is_detected() {
    let (keys, _, object) = victim();
    let mut longer = object.clone();
    longer.extend_from_slice(&[0u8; 40]);
    assert_eq!(
        decrypt(&keys, &longer),
        Err(CryptoError::AuthenticationFailed { chunk: 3 })
    );
}

#[test]
fn reordered_chunks_fail() {
    let (keys, _, object) = victim();
    let (r0, r1) = (chunk_range(0, &object), chunk_range(1, &object));
    let mut bad = object[..512].to_vec();
    bad.extend_from_slice(&object[r1.clone()]);
    bad.extend_from_slice(&object[r0]);
    bad.extend_from_slice(&object[r1.end..]);
    assert_eq!(bad.len(), object.len());
    assert_eq!(
        decrypt(&keys, &bad),
        Err(CryptoError::AuthenticationFailed { chunk: 0 })
    );
}

#[test]
fn chunk_moved_from_another_object_fails() {
    let (keys, _, object) = victim();
    let other = encrypt_object(&keys, AeadBackend::AwsLc, &pattern(3 * 65536 + 5));
    let r = chunk_range(1, &object);
    let mut bad = object.clone();
    bad[r.clone()].copy_from_slice(&other[r]);
    assert_eq!(
        decrypt(&keys, &bad),
        Err(CryptoError::AuthenticationFailed { chunk: 1 })
    );
}

#[test]
fn swapped_headers_fail_at_chunk_zero() {
    let (keys, _, object) = victim();
    let other = encrypt_object(&keys, AeadBackend::AwsLc, &pattern(3 * 65536 + 5));
    let mut bad = other[..512].to_vec();
    bad.extend_from_slice(&object[512..]);
    assert_eq!(
        decrypt(&keys, &bad),
        Err(CryptoError::AuthenticationFailed { chunk: 0 })
    );
}

#[test]
fn replaced_wrapped_key_fails_to_unwrap() {
    let (keys, _, object) = victim();
    let other = encrypt_object(&keys, AeadBackend::AwsLc, b"other");
    // Wrapped key alone (54..102), and nonce plus wrapped key (42..102).
    for field in [54..102, 42..102] {
        let mut bad = object.clone();
        bad[field.clone()].copy_from_slice(&other[field.clone()]);
        assert_eq!(
            decrypt(&keys, &bad),
            Err(CryptoError::KeyUnwrapFailed),
            "{field:?}"
        );
    }
}

#[test]
fn wrong_key_history_is_unknown_key() {
    let (_, _, object) = victim();
    let expected = Key256::from_bytes(&[9; 32]).fingerprint();
    let err = decrypt(&history(8), &object).unwrap_err();
    assert_eq!(
        err,
        CryptoError::UnknownKey {
            fingerprint: expected
        }
    );
    assert!(err.to_string().contains(&expected.to_string()));
}

#[test]
fn object_swap_is_caught_by_the_binding() {
    let keys = history(1);
    let (a, header_a) = ObjectCipher::create(&keys, AeadBackend::AwsLc);
    let (b, _) = ObjectCipher::create(&keys, AeadBackend::AwsLc);
    let binding_a = a.binding("dir/a.txt");
    assert_eq!(binding_a.len(), 22);
    let reopened = ObjectCipher::open(&header_a, &keys, AeadBackend::RustCrypto).unwrap();
    assert_eq!(reopened.verify_binding("dir/a.txt", &binding_a), Ok(()));
    // A's object (with its binding) copied to another path.
    assert_eq!(
        a.verify_binding("dir/b.txt", &binding_a),
        Err(CryptoError::ObjectSwapped)
    );
    // B's object put at A's path with A's metadata.
    assert_eq!(
        b.verify_binding("dir/a.txt", &binding_a),
        Err(CryptoError::ObjectSwapped)
    );
    // Garbage, padded, truncated or lengthened bindings.
    for bad in [
        "",
        "!!!",
        "AAAAAAAAAAAAAAAAAAAAAA",
        &binding_a[..21],
        &format!("{binding_a}=="),
        &format!("{binding_a}AAAA"),
    ] {
        assert_eq!(
            a.verify_binding("dir/a.txt", bad),
            Err(CryptoError::ObjectSwapped),
            "{bad:?}"
        );
    }
}

#[test]
fn foreign_bytes_are_not_our_format() {
    let keys = history(1);
    for bytes in [
        &b""[..],
        b"s3crypt",
        b"hello, world",
        &[0u8; 4096],
        b"S3CRYPTF\0\x01",
    ] {
        assert_eq!(decrypt(&keys, bytes), Err(CryptoError::NotOurFormat));
    }
}

#[test]
fn unsupported_version_and_envelope_are_named() {
    let keys = history(1);
    let object = encrypt_object(&keys, AeadBackend::AwsLc, b"x");
    let mut v4 = object.clone();
    v4[8..10].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(
        decrypt(&keys, &v4),
        Err(CryptoError::UnsupportedVersion { found: 4 })
    );
    // Versions 2 and 3 are known now: relabelling a version-1 header breaks the
    // wrap, which authenticates the version field.
    for known in [2u16, 3] {
        let mut relabelled = object.clone();
        relabelled[8..10].copy_from_slice(&known.to_be_bytes());
        assert_eq!(decrypt(&keys, &relabelled), Err(CryptoError::KeyUnwrapFailed));
    }
    let mut kind3 = object.clone();
    kind3[10] = 3;
    assert_eq!(
        decrypt(&keys, &kind3),
        Err(CryptoError::UnsupportedEnvelope { kind: 3 })
    );
    // Kind 2 is known now: a kind-1 envelope relabelled as kind 2 does not
    // parse as a KMS envelope (its first bytes are a fingerprint, not lengths).
    let mut relabelled = object.clone();
    relabelled[10] = 2;
    assert!(
        matches!(
            decrypt(&keys, &relabelled),
            Err(CryptoError::Malformed { .. })
        ),
        "{:?}",
        decrypt(&keys, &relabelled)
    );
}

#[test]
fn errors_never_show_key_bytes() {
    let (_, _, object) = victim();
    let err = decrypt(&history(8), &object).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("0909") && !shown.contains("CQkJ"),
        "{shown}"
    );
}

// ---- envelope kind 2 (KMS) ----------------------------------------------------

/// What KMS reports as `KeyId`: a key ARN, 75 bytes.
const FIXED_KMS_KEY_ID: &str =
    "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

/// A stand-in for a KMS `CiphertextBlob` (184 bytes, like AWS's for a 256-bit
/// key): crypto never looks inside it, KMS does.
fn fixed_kms_blob() -> Vec<u8> {
    (0..184u8).map(|i| i ^ 0xa5).collect()
}

fn fixed_kms_cipher(backend: AeadBackend) -> (ObjectCipher, [u8; 512]) {
    ObjectCipher::create_kms(
        FileId(FIXED_FILE_ID),
        DataKey::from_bytes(&FIXED_DATA_KEY),
        FIXED_KMS_KEY_ID,
        &fixed_kms_blob(),
        backend,
    )
    .unwrap()
}

/// Whole-object decryption the way a cse-kms reader does it, with the data key
/// "KMS Decrypt" returned.
fn decrypt_kms(
    data_key: &[u8; 32],
    backend: AeadBackend,
    bytes: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let cipher = ObjectCipher::open_with_data_key(bytes, DataKey::from_bytes(data_key), backend)?;
    let plain = plain_size(bytes.len() as u64)?;
    let mut out = Vec::new();
    for index in 0..chunk_count(plain) {
        let range = chunk_cipher_range(index, plain);
        let chunk = &bytes[range.start as usize..range.end as usize];
        cipher.open_chunk(index, is_last_chunk(index, plain), chunk, &mut out)?;
    }
    Ok(out)
}

#[test]
fn kms_round_trip_create_decode_open_on_both_backends() {
    let data_key = [0x5a; 32];
    let blob = fixed_kms_blob();
    for len in [0, 1, 65536, 65537, 2 * 65536 + 9] {
        let plaintext = pattern(len);
        for enc in BACKENDS {
            let file_id = FileId::random();
            let (writer, header) = ObjectCipher::create_kms(
                file_id,
                DataKey::from_bytes(&data_key),
                FIXED_KMS_KEY_ID,
                &blob,
                enc,
            )
            .unwrap();
            assert_eq!(writer.file_id(), file_id);
            // What a reader sees before calling KMS Decrypt.
            assert_eq!(
                Header::decode(&header),
                Ok(Header {
                    version: 1,
                    file_id,
                    envelope: Envelope::Kms {
                        key_id: FIXED_KMS_KEY_ID.to_owned(),
                        blob: blob.clone(),
                    },
                })
            );
            let object = seal_all(&writer, &header, &plaintext, |_| None);
            assert_eq!(object.len() as u64, cipher_size(len as u64), "len {len}");
            for dec in BACKENDS {
                assert_eq!(
                    decrypt_kms(&data_key, dec, &object).unwrap(),
                    plaintext,
                    "len {len} {enc:?}->{dec:?}"
                );
                let reader =
                    ObjectCipher::open_with_data_key(&object, DataKey::from_bytes(&data_key), dec)
                        .unwrap();
                assert_eq!(reader.file_id(), file_id);
                let binding = writer.binding("dir/f");
                assert_eq!(reader.verify_binding("dir/f", &binding), Ok(()));
            }
        }
    }
}

/// Header from fixed inputs: ARN 75 bytes and blob 184 bytes make a 263-byte
/// envelope (the worked example in FORMAT.md); bytes 297..512 must be zero.
const PINNED_KMS_HEADER_HEX: &str = concat!(
    "7333637279707466",                 // magic "s3cryptf"
    "0001",                             // version 1
    "02",                               // envelope kind 2 (KMS)
    "10",                               // chunk size log2 = 16
    "00000000",                         // flags
    "33333333333333333333333333333333", // file id
    "0107",                             // envelope length 263
    "004b",                             // key id length 75
    // key id "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    "61726e3a6177733a6b6d733a65752d776573742d313a3131313132323232333333333a6b65792f",
    "31323334616263642d313261622d333463642d353665662d313233343536373839306162",
    "00b8", // blob length 184
    // blob: byte i = i ^ 0xa5
    "a5a4a7a6a1a0a3a2adacafaea9a8abaab5b4b7b6b1b0b3b2bdbcbfbeb9b8bbba",
    "85848786818083828d8c8f8e89888b8a95949796919093929d9c9f9e99989b9a",
    "e5e4e7e6e1e0e3e2edecefeee9e8ebeaf5f4f7f6f1f0f3f2fdfcfffef9f8fbfa",
    "c5c4c7c6c1c0c3c2cdcccfcec9c8cbcad5d4d7d6d1d0d3d2dddcdfded9d8dbda",
    "25242726212023222d2c2f2e29282b2a35343736313033323d3c3f3e39383b3a",
    "05040706010003020d0c0f0e09080b0a1514171611101312",
);

#[test]
fn kms_header_bytes_are_pinned() {
    for backend in BACKENDS {
        let (_, header) = fixed_kms_cipher(backend);
        let mut expected = unhex(PINNED_KMS_HEADER_HEX);
        assert_eq!(expected.len(), 297);
        expected.resize(512, 0);
        assert_eq!(
            hex(&header),
            hex(&expected),
            "format changed: bump FORMAT_VERSION ({backend:?})"
        );
    }
}

const GOLDEN_V1_KMS: &str = include_str!("../testdata/v1-kms-golden.hex");

#[test]
fn golden_v1_kms_fixture_still_decrypts() {
    let fixture = unhex(
        GOLDEN_V1_KMS
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<String>()
            .as_str(),
    );
    assert_eq!(
        Header::decode(&fixture).unwrap().envelope,
        Envelope::Kms {
            key_id: FIXED_KMS_KEY_ID.to_owned(),
            blob: fixed_kms_blob(),
        }
    );
    for backend in BACKENDS {
        assert_eq!(
            decrypt_kms(&FIXED_DATA_KEY, backend, &fixture).unwrap(),
            GOLDEN_PLAINTEXT
        );
        let cipher = ObjectCipher::open_with_data_key(
            &fixture,
            DataKey::from_bytes(&FIXED_DATA_KEY),
            backend,
        )
        .unwrap();
        // Chunks and binding depend on data key and file id only, not on the
        // envelope kind: the same binding as the kind-1 golden object.
        assert_eq!(cipher.verify_binding(GOLDEN_PATH, GOLDEN_BINDING), Ok(()));
        // The writer still produces exactly these bytes from the same inputs.
        let (cipher, header) = fixed_kms_cipher(backend);
        let written = seal_all(&cipher, &header, GOLDEN_PLAINTEXT, |_| {
            Some(FIXED_CHUNK_NONCE)
        });
        assert_eq!(
            hex(&written),
            hex(&fixture),
            "format changed: bump FORMAT_VERSION"
        );
        // Same chunk bytes as the kind-1 golden object.
        assert_eq!(written[512..], golden_object(backend)[512..]);
    }
}

#[test]
fn kms_encryption_context_names_the_file_id_in_lower_case_hex() {
    assert_eq!(
        kms_encryption_context(&FileId(FIXED_FILE_ID)),
        vec![("s3cryptfs:file-id", "33".repeat(16))]
    );
    let id = FileId([
        0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03, 0x0a, 0x0b, 0x0c, 0x0d, 0xf0, 0xe1, 0xd2,
        0xc3,
    ]);
    assert_eq!(
        kms_encryption_context(&id),
        vec![(
            KMS_CONTEXT_FILE_ID,
            "deadbeef000102030a0b0c0df0e1d2c3".to_owned()
        )]
    );
}

#[test]
fn customer_key_open_of_a_kms_object_says_mount_with_cse_kms() {
    let (_, header) = fixed_kms_cipher(AeadBackend::AwsLc);
    let err = ObjectCipher::open(&header, &history(1), AeadBackend::AwsLc).unwrap_err();
    assert_eq!(
        err,
        CryptoError::NeedsKms {
            key_id: FIXED_KMS_KEY_ID.to_owned()
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "the object's data key is wrapped by KMS key {FIXED_KMS_KEY_ID}; mount with mode=cse-kms"
        )
    );
}

#[test]
fn kms_open_of_a_customer_key_object_says_mount_with_cse_c() {
    let (_, header) = fixed_cipher(AeadBackend::AwsLc);
    let err = ObjectCipher::open_with_data_key(
        &header,
        DataKey::from_bytes(&FIXED_DATA_KEY),
        AeadBackend::AwsLc,
    )
    .unwrap_err();
    let fingerprint = Key256::from_bytes(&FIXED_KEK).fingerprint();
    assert_eq!(err, CryptoError::NeedsCustomerKey { fingerprint });
    let shown = err.to_string();
    assert!(
        shown.contains("mode=cse-c") && shown.contains("678bb5420bbacd73"),
        "{shown}"
    );
    // Foreign bytes are still reported as such on the KMS path.
    assert_eq!(
        ObjectCipher::open_with_data_key(
            b"hello",
            DataKey::from_bytes(&[0; 32]),
            AeadBackend::AwsLc
        )
        .unwrap_err(),
        CryptoError::NotOurFormat
    );
}

#[test]
fn wrong_data_key_fails_at_the_first_chunk() {
    let (writer, header) = fixed_kms_cipher(AeadBackend::AwsLc);
    let object = seal_all(&writer, &header, &pattern(65537), |_| None);
    let mut wrong = FIXED_DATA_KEY;
    wrong[31] ^= 1;
    for backend in BACKENDS {
        assert_eq!(
            decrypt_kms(&wrong, backend, &object),
            Err(CryptoError::AuthenticationFailed { chunk: 0 })
        );
        let reader =
            ObjectCipher::open_with_data_key(&object, DataKey::from_bytes(&wrong), backend)
                .unwrap();
        let r = chunk_range(1, &object);
        assert_eq!(
            reader.open_chunk(1, true, &object[r], &mut Vec::new()),
            Err(CryptoError::AuthenticationFailed { chunk: 1 })
        );
        assert_eq!(
            reader.verify_binding("p", &writer.binding("p")),
            Err(CryptoError::ObjectSwapped)
        );
    }
    // The right key still works on the same bytes.
    assert_eq!(
        decrypt_kms(&FIXED_DATA_KEY, AeadBackend::AwsLc, &object).unwrap(),
        pattern(65537)
    );
}

#[test]
fn create_kms_refuses_what_a_reader_would_reject() {
    let blob = fixed_kms_blob();
    let cases: [(&str, &[u8], &str); 5] = [
        ("", &blob, "the KMS key id is empty"),
        (
            "arn:aws:kms:eu-west-1:1:key/\u{e9}",
            &blob,
            "the KMS key id is not printable ASCII",
        ),
        (
            &FIXED_KMS_KEY_ID[..40],
            &[],
            "the KMS ciphertext blob is empty",
        ),
        (
            &FIXED_KMS_KEY_ID[..40],
            &[1; 435],
            "the KMS key id and ciphertext blob do not fit in the 478-byte envelope",
        ),
        (
            "alias/with space",
            &blob,
            "the KMS key id is not printable ASCII",
        ),
    ];
    for (key_id, blob, what) in cases {
        let result = ObjectCipher::create_kms(
            FileId::random(),
            DataKey::generate(),
            key_id,
            blob,
            AeadBackend::AwsLc,
        );
        assert_eq!(
            result.map(|(_, header)| header).unwrap_err(),
            CryptoError::InvalidKmsEnvelope { what },
            "{key_id:?} {}",
            blob.len()
        );
    }
    // 40 + 434 + 4 = 478 exactly still fits.
    assert!(ObjectCipher::create_kms(
        FileId::random(),
        DataKey::generate(),
        &FIXED_KMS_KEY_ID[..40],
        &[1; 434],
        AeadBackend::AwsLc
    )
    .is_ok());
}

/// A 4-chunk cse-kms object and its data key.
fn kms_victim(data_key: &[u8; 32]) -> Vec<u8> {
    let (writer, header) = ObjectCipher::create_kms(
        FileId::random(),
        DataKey::from_bytes(data_key),
        FIXED_KMS_KEY_ID,
        &fixed_kms_blob(),
        AeadBackend::AwsLc,
    )
    .unwrap();
    seal_all(&writer, &header, &pattern(3 * 65536 + 5), |_| None)
}

#[test]
fn kms_header_of_another_object_fails_at_chunk_zero_even_with_the_same_data_key() {
    // Worst case for the file-id binding: both objects share key id, blob and
    // data key, so only the file id in the chunk AADs tells them apart.
    let key = [0x42; 32];
    let (a, b) = (kms_victim(&key), kms_victim(&key));
    assert_ne!(a[16..32], b[16..32]);
    let mut bad = b[..512].to_vec();
    bad.extend_from_slice(&a[512..]);
    assert_eq!(
        decrypt_kms(&key, AeadBackend::AwsLc, &bad),
        Err(CryptoError::AuthenticationFailed { chunk: 0 })
    );
}

/// Every bit flip in a kind-2 header is either an error here, or a change in
/// exactly the field KMS authenticates or ignores (key id, blob), which the
/// reader then hands to KMS Decrypt. Nothing else can change silently.
#[test]
fn bit_flips_in_a_kms_header_are_caught_here_or_reach_kms() {
    let key = [0x42; 32];
    let object = kms_victim(&key);
    let original = Header::decode(&object).unwrap();
    let Envelope::Kms { key_id, blob } = &original.envelope else {
        panic!("not a KMS header");
    };
    let key_id_at = 36..36 + key_id.len();
    let blob_at = key_id_at.end + 2..key_id_at.end + 2 + blob.len();
    assert_eq!(blob_at.end, 297);
    for pos in 0..512 {
        for bit in [0x01u8, 0x80] {
            let mut bad = object.clone();
            bad[pos] ^= bit;
            let decoded = Header::decode(&bad);
            let ok = match pos {
                0..=7 => decoded == Err(CryptoError::NotOurFormat),
                8..=9 => matches!(decoded, Err(CryptoError::UnsupportedVersion { .. })),
                10 => matches!(decoded, Err(CryptoError::UnsupportedEnvelope { .. })),
                // The file id decodes, and then the chunk AADs reject the chunks
                // (KMS would already have refused the blob under the new context).
                16..=31 => {
                    decoded.as_ref().map(|h| h.file_id) != Ok(original.file_id)
                        && decrypt_kms(&key, AeadBackend::AwsLc, &bad)
                            == Err(CryptoError::AuthenticationFailed { chunk: 0 })
                }
                p if key_id_at.contains(&p) && bit == 0x01 => match &decoded {
                    // Still printable: a different key id goes to KMS.
                    Ok(h) => {
                        h.file_id == original.file_id
                            && matches!(&h.envelope, Envelope::Kms { key_id: k, blob: b }
                                if k != key_id && b == blob)
                    }
                    Err(e) => matches!(e, CryptoError::Malformed { .. }),
                },
                p if blob_at.contains(&p) => {
                    decoded.as_ref().map(|h| h.file_id) == Ok(original.file_id)
                        && matches!(decoded.as_ref().map(|h| &h.envelope),
                            Ok(Envelope::Kms { key_id: k, blob: b }) if k == key_id && b != blob)
                }
                // Prefix bytes with one legal value, the three lengths, a key id
                // byte made non-ASCII, and the padding.
                _ => matches!(decoded, Err(CryptoError::Malformed { .. })),
            };
            assert!(ok, "byte {pos} bit {bit:#x}: {decoded:?}");
        }
    }
}

// ---- chunks opened in parts (the reader's path) ----------------------------

#[test]
fn a_chunk_opened_in_parts_is_the_chunk_opened_whole_and_every_tamper_fails_and_wipes() {
    let keys = history(3);
    for backend in BACKENDS {
        for version in [FORMAT_VERSION_1, FORMAT_VERSION_3] {
            let (cipher, _) = ObjectCipher::create_version(version, &keys, backend);
            let plain = pattern(40_000);
            let mut sealed = Vec::new();
            match version {
                FORMAT_VERSION_1 => cipher.seal_chunk(2, true, &plain, &mut sealed),
                _ => cipher.seal_chunk_in(&cipher.implicit_version(), 2, true, &plain, &mut sealed),
            }
            let parts = |chunk: &[u8]| {
                let (nonce, rest) = chunk.split_at(NONCE_LEN);
                let (body, tag) = rest.split_at(rest.len() - aead::TAG_LEN);
                (<[u8; NONCE_LEN]>::try_from(nonce).unwrap(), body.to_vec(), <[u8; 16]>::try_from(tag).unwrap())
            };
            let (nonce, mut buf, tag) = parts(&sealed);
            cipher.open_chunk_detached(2, true, &nonce, &mut buf, &tag).unwrap();
            let mut whole = Vec::new();
            cipher.open_chunk(2, true, &sealed, &mut whole).unwrap();
            assert!(buf == plain && whole == plain, "{backend:?} v{version}");
            // A flipped byte anywhere, another index, or a last chunk presented as not last: refused, buffer zeroed.
            for at in [0, 11, 12, 5000, sealed.len() - 1] {
                let mut bad = sealed.clone();
                bad[at] ^= 0x40;
                let (nonce, mut buf, tag) = parts(&bad);
                let err = cipher.open_chunk_detached(2, true, &nonce, &mut buf, &tag).unwrap_err();
                assert!(matches!(err, CryptoError::AuthenticationFailed { chunk: 2 }), "byte {at}: {err:?}");
                assert!(buf.iter().all(|&b| b == 0), "byte {at}: unauthenticated bytes left in the buffer");
            }
            for (index, last) in [(1, true), (2, false)] {
                let (nonce, mut buf, tag) = parts(&sealed);
                assert!(cipher.open_chunk_detached(index, last, &nonce, &mut buf, &tag).is_err(), "{index} {last}");
                assert!(buf.iter().all(|&b| b == 0));
            }
        }
    }
}
