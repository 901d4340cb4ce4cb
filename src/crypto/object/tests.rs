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
    let mut v2 = object.clone();
    v2[8..10].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(
        decrypt(&keys, &v2),
        Err(CryptoError::UnsupportedVersion { found: 2 })
    );
    let mut kms = object.clone();
    kms[10] = 2;
    assert_eq!(
        decrypt(&keys, &kms),
        Err(CryptoError::UnsupportedEnvelope { kind: 2 })
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
