//! Known-answer vectors (S3EC.md §6.1, checked there against the official Python client), the
//! published GCM vectors through the streaming code, round trips, metadata detection, and the
//! tamper classes: every one must end in a typed error and never in plaintext.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::content::{new_object_aes_with, new_object_kms_with, v3_content_key};
use super::keys::TAG_LEN as TAG_LEN_KEY;
use super::keys::{
    CEK_ALG, INSTRUCTION_MARKER, IV, KEY_V1, KEY_V2, MATDESC, UNENCRYPTED_LEN, V3_COMMITMENT,
    V3_CONTENT, V3_CONTEXT, V3_KEY, V3_MATDESC, V3_MESSAGE_ID, V3_WRAP, WRAP_ALG,
};
use super::wrap::aes_gcm_wrap_with_iv;
use super::*;
use crate::crypto::aead::{self, AeadBackend};
use crate::crypto::secret::{DataKey, Key256};

// ---- helpers ----------------------------------------------------------------

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    assert!(s.len() % 2 == 0);
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Deterministic plaintext so failures are reproducible.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9).to_be_bytes()[5])
        .collect()
}

fn complete(metadata: &BTreeMap<String, String>) -> Envelope {
    match detect(metadata).unwrap() {
        Detection::Complete(envelope) => envelope,
        other => panic!("expected a complete envelope, got {other:?}"),
    }
}

fn pending(metadata: &BTreeMap<String, String>) -> PendingInstructionFile {
    match detect(metadata).unwrap() {
        Detection::NeedsInstructionFile(p) => p,
        other => panic!("expected an instruction-file object, got {other:?}"),
    }
}

/// Decrypt a body through the streaming decryptor in pieces of `piece` bytes.
fn stream_decrypt(
    key: &ContentKey,
    body: &[u8],
    piece: usize,
) -> Result<(Vec<u8>, StreamVerified), S3ecError> {
    let mut d = key.decryptor();
    let mut out = Vec::new();
    for part in body.chunks(piece.max(1)) {
        d.update(part, &mut out)?;
    }
    let verified = d.finish()?;
    assert_eq!(verified.plain_len(), out.len() as u64);
    Ok((out, verified))
}

// ---- §6.1 inputs and expected outputs ----------------------------------------

const DK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const IV_HEX: &str = "000102030405060708090a0b";
const IV_B64: &str = "AAECAwQFBgcICQoL";
const MID_HEX: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babb";
const MID_B64: &str = "oKGio6SlpqeoqaqrrK2ur7CxsrO0tba3uLm6uw==";
const V2_C: &str = "4705d80ed9c6e82ab57ed1c6e5b21a04f3a1f9b17ce8c5dd90c85338d9a2d26be1f7400953c218896cbb59c0bcbc6a71
                    be0e3ee836a5d95bb718bc84bc48475730fb08af0f32cc90e4abac63fb942cc108bdf7273a3009099592e8b1fc7b2b146b5ff753";
const V2_T: &str = "e2da2553b8d0203c72d9fc4ddd84a347";
const V3_DEK: &str = "a8e0c7c35a41d8aaf9ef82a872f31b9e996b7ff6318c3772987ee5470cf89946";
const V3_CK: &str = "c14b6f5ff01354a12d08225323f8bb6a482599d178c7bc3660be7a3b";
const V3_CK_B64: &str = "wUtvX/ATVKEtCCJTI/i7akglmdF4x7w2YL56Ow==";
const V3_C: &str = "ccab9438b540be41a8fdfd549c778bcd72c711084fe0b9c6df605fc043c74d22fddefd48856285f2079ce0f9158a451b
                    f9b87243a5a0876021c977d5a93b99febffceef88fc2e82c4b30d77b4808987ebbca83dc3e93d41484d7c0f73ea63ed3336ccd92";
const V3_T: &str = "224830cc3e0aeba83f9e36180caa9290";
const KEK: &str = "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f";
const WRAP_IV: &str = "b0b1b2b3b4b5b6b7b8b9babb";
const V2_EDK_B64: &str =
    "sLGys7S1tre4ubq7AwGChsVP7Z4z5y3z4ftCxK4ZljtQAMCI6996IJWt7I/5a4V+OlP9njG/E/pRIteb";
const V3_EDK_B64: &str =
    "sLGys7S1tre4ubq7AwGChsVP7Z4z5y3z4ftCxK4ZljtQAMCI6996IJWt7I+fVbJTGNdy8pRf17W8Gh4f";

fn vector_plaintext() -> Vec<u8> {
    (0..100u32).map(|i| (7 * i % 256) as u8).collect()
}

fn data_key() -> DataKey {
    DataKey::from_bytes(&unhex(DK).try_into().unwrap())
}

fn kek() -> Key256 {
    Key256::from_bytes(&unhex(KEK).try_into().unwrap())
}

fn body(c: &str, t: &str) -> Vec<u8> {
    let mut b = unhex(c);
    b.extend(unhex(t));
    b
}

/// The complete raw-AES V2 object of §6.1.
fn v2_vector_metadata() -> BTreeMap<String, String> {
    map(&[
        (KEY_V2, V2_EDK_B64),
        (WRAP_ALG, "AES/GCM"),
        (MATDESC, "{}"),
        (IV, IV_B64),
        (CEK_ALG, "AES/GCM/NoPadding"),
        (TAG_LEN_KEY, "128"),
    ])
}

/// The complete raw-AES V3 object of §6.1.
fn v3_vector_metadata() -> BTreeMap<String, String> {
    map(&[
        (V3_CONTENT, "115"),
        (V3_KEY, V3_EDK_B64),
        (V3_WRAP, "02"),
        (V3_MESSAGE_ID, MID_B64),
        (V3_COMMITMENT, V3_CK_B64),
    ])
}

fn vector_nonce(format: WriteFormat) -> [u8; MESSAGE_ID_LEN] {
    match format {
        WriteFormat::V3 => unhex(MID_HEX).try_into().unwrap(),
        WriteFormat::V2 => {
            let mut n = [0u8; MESSAGE_ID_LEN];
            n[..12].copy_from_slice(&unhex(IV_HEX));
            n
        }
    }
}

// ---- known answers ------------------------------------------------------------

#[test]
fn vector_inputs_encode_as_the_spec_shows() {
    assert_eq!(b64(&unhex(IV_HEX)), IV_B64);
    assert_eq!(b64(&unhex(MID_HEX)), MID_B64);
    assert_eq!(b64(&unhex(V3_CK)), V3_CK_B64);
    let p = vector_plaintext();
    assert_eq!(&p[..8], &unhex("00070e151c232a31")[..]);
    assert_eq!(&p[97..], &unhex("a7aeb5")[..]);
}

#[test]
fn v3_key_derivation_matches_the_vectors() {
    let mid: [u8; MESSAGE_ID_LEN] = unhex(MID_HEX).try_into().unwrap();
    assert_eq!(v3_commitment(&data_key(), &mid).to_vec(), unhex(V3_CK));
    assert_eq!(v3_content_key(&data_key(), &mid).to_vec(), unhex(V3_DEK));
}

#[test]
fn v2_content_matches_the_vector() {
    let obj = new_object_kms_with(
        WriteFormat::V2,
        &data_key(),
        vec![1, 2, 3],
        kms_context_for_write(&BTreeMap::new(), WriteFormat::V2).unwrap(),
        &vector_nonce(WriteFormat::V2),
    )
    .unwrap();
    assert_eq!(obj.envelope.to_metadata()[IV], IV_B64);
    let sealed = obj.sealer.encrypt(&vector_plaintext()).unwrap();
    assert_eq!(sealed, body(V2_C, V2_T));
}

#[test]
fn v3_content_matches_the_vector() {
    let obj = new_object_kms_with(
        WriteFormat::V3,
        &data_key(),
        vec![1, 2, 3],
        kms_context_for_write(&BTreeMap::new(), WriteFormat::V3).unwrap(),
        &vector_nonce(WriteFormat::V3),
    )
    .unwrap();
    let md = obj.envelope.to_metadata();
    assert_eq!(md[V3_MESSAGE_ID], MID_B64);
    assert_eq!(md[V3_COMMITMENT], V3_CK_B64);
    assert_eq!(md[V3_CONTENT], "115");
    let sealed = obj.sealer.encrypt(&vector_plaintext()).unwrap();
    assert_eq!(sealed, body(V3_C, V3_T));
    // The same bytes from the one-shot AEAD with the DEK, nonce 01×12 and AAD 00 73.
    let mut direct = Vec::new();
    aead::seal(
        AeadBackend::RustCrypto,
        &unhex(V3_DEK).try_into().unwrap(),
        &[1u8; 12],
        &[0x00, 0x73],
        &vector_plaintext(),
        &mut direct,
    );
    assert_eq!(direct, sealed);
}

#[test]
fn aes_gcm_wraps_match_the_vectors() {
    let iv: [u8; 12] = unhex(WRAP_IV).try_into().unwrap();
    let v2 = aes_gcm_wrap_with_iv(&kek(), &data_key(), ContentSuite::AesGcm, iv).unwrap();
    let v3 = aes_gcm_wrap_with_iv(&kek(), &data_key(), ContentSuite::AesGcmCommitting, iv).unwrap();
    assert_eq!(b64(&v2), V2_EDK_B64);
    assert_eq!(b64(&v3), V3_EDK_B64);
    assert_eq!(v2.len(), AES_GCM_WRAPPED_LEN);
    assert_eq!(
        aes_gcm_wrap_with_iv(&kek(), &data_key(), ContentSuite::AesCbc, iv),
        Err(S3ecError::UnsupportedContent {
            suite: ContentSuite::AesCbc
        })
    );
}

#[test]
fn complete_raw_aes_objects_of_the_spec_decrypt() {
    for (md, c, t, version) in [
        (v2_vector_metadata(), V2_C, V2_T, FormatVersion::V2),
        (v3_vector_metadata(), V3_C, V3_T, FormatVersion::V3),
    ] {
        let envelope = complete(&md);
        assert_eq!(envelope.version(), version);
        assert_eq!(envelope.wrap(), WrapAlg::AesGcm);
        assert_eq!(envelope.tag_len_bits(), Some(128));
        assert!(envelope.context().is_empty());
        let dk = aes_gcm_unwrap(&kek(), &envelope).unwrap();
        assert_eq!(dk.as_bytes(), data_key().as_bytes());
        for backend in [AeadBackend::AwsLc, AeadBackend::RustCrypto] {
            let key = ContentKey::for_decrypt(&envelope, &dk)
                .unwrap()
                .with_backend(backend);
            assert_eq!(key.decrypt(&body(c, t)).unwrap(), vector_plaintext());
        }
        let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
        for piece in [1, 5, 16, 17, 100, 116] {
            let (plain, _) = stream_decrypt(&key, &body(c, t), piece).unwrap();
            assert_eq!(plain, vector_plaintext(), "piece {piece}");
        }
        // Written back, the metadata is the spec's, key for key.
        assert_eq!(envelope.to_metadata(), md);
    }
}

#[test]
fn ctr_counter_of_the_spec_example_and_range_decryption() {
    let iv: [u8; 12] = unhex(IV_HEX).try_into().unwrap();
    assert_eq!(
        ctr_counter_block(&iv, 37).unwrap().to_vec(),
        unhex("000102030405060708090a0b 00000004")
    );
    assert_eq!(ctr_counter_block(&iv, 0).unwrap()[12..], [0, 0, 0, 2]);
    assert_eq!(ctr_counter_block(&iv, 15).unwrap()[12..], [0, 0, 0, 2]);
    assert_eq!(ctr_counter_block(&iv, 16).unwrap()[12..], [0, 0, 0, 3]);
    assert_eq!(
        ctr_counter_block(&V3_GCM_NONCE, 99).unwrap()[..12],
        [1u8; 12]
    );

    let p = vector_plaintext();
    for (md, c) in [(v2_vector_metadata(), V2_C), (v3_vector_metadata(), V3_C)] {
        let envelope = complete(&md);
        let key = ContentKey::for_decrypt(&envelope, &data_key()).unwrap();
        let c = unhex(c);
        let mut range = c[37..84].to_vec();
        key.apply_keystream_at(37, &mut range).unwrap();
        assert_eq!(range, &p[37..84]);
        // Every start and length over the 100 bytes.
        for start in 0..c.len() {
            for end in start..=c.len() {
                let mut buf = c[start..end].to_vec();
                key.apply_keystream_at(start as u64, &mut buf).unwrap();
                assert_eq!(buf, &p[start..end], "{start}..{end}");
            }
        }
    }
}

#[test]
fn ctr_offsets_stop_at_the_gcm_limit() {
    let iv = [9u8; 12];
    let last = ctr_counter_block(&iv, MAX_PLAINTEXT_LEN - 1).unwrap();
    assert_eq!(last[12..], u32::MAX.to_be_bytes());
    assert_eq!(
        ctr_counter_block(&iv, MAX_PLAINTEXT_LEN),
        Err(S3ecError::OffsetOutOfRange {
            offset: MAX_PLAINTEXT_LEN
        })
    );
    let key = ContentKey::for_decrypt(&complete(&v2_vector_metadata()), &data_key()).unwrap();
    let mut two = [0u8; 2];
    assert!(key
        .apply_keystream_at(MAX_PLAINTEXT_LEN - 2, &mut two)
        .is_ok());
    assert!(key
        .apply_keystream_at(MAX_PLAINTEXT_LEN - 1, &mut two)
        .is_err());
    assert!(key.apply_keystream_at(u64::MAX, &mut two).is_err());
}

/// McGrew & Viega test cases 13–16 (AES-256), the same as `aead.rs`, through the streaming code.
#[test]
fn streaming_gcm_matches_the_published_vectors() {
    let kats: [(&str, &str, &str, &str, &str, &str); 4] = [
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "",
            "",
            "",
            "530f8afbc74536b9a963b4f1c4cb738b",
        ),
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "",
            "00000000000000000000000000000000",
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        ),
        (
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
            "b094dac5d93471bdec1a502270e3cc6c",
        ),
        (
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            "76fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ];
    for (key, iv, aad, pt, ct, tag) in kats {
        let key: [u8; 32] = unhex(key).try_into().unwrap();
        let iv: [u8; 12] = unhex(iv).try_into().unwrap();
        let (aad, pt) = (unhex(aad), unhex(pt));
        let mut expected = unhex(ct);
        expected.extend(unhex(tag));
        for piece in [1, 3, 16, 17, 64] {
            let mut e = StreamEncryptor::new(&key, &iv, &aad);
            let mut out = vec![0xee]; // update appends, never overwrites
            for part in pt.chunks(piece) {
                e.update(part, &mut out).unwrap();
            }
            assert!(e.finish(&mut out).is_none());
            assert_eq!(&out[1..], &expected[..], "encrypt, piece {piece}");

            let mut d = StreamDecryptor::new(&key, &iv, &aad);
            let mut plain = Vec::new();
            for part in expected.chunks(piece) {
                d.update(part, &mut plain).unwrap();
            }
            d.finish().unwrap();
            assert_eq!(plain, pt, "decrypt, piece {piece}");
        }
    }
}

// ---- round trips and streaming ---------------------------------------------------------

fn fresh_object(format: WriteFormat, seed: u8) -> (NewObject, DataKey) {
    let dk = DataKey::from_bytes(&[seed; 32]);
    let mut nonce = [seed.wrapping_add(1); MESSAGE_ID_LEN];
    nonce[0] = seed;
    let obj = new_object_aes_with(
        format,
        &kek(),
        &BTreeMap::new(),
        &dk,
        &nonce,
        [seed.wrapping_add(2); 12],
    )
    .unwrap();
    (obj, dk)
}

#[test]
fn round_trips_v2_and_v3_with_aes_and_kms_wraps() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        for len in [0, 1, 15, 16, 17, 100, 4096, 65536 + 3] {
            let plaintext = pattern(len);
            // AES/GCM wrap, random everything.
            let obj = new_object_aes(format, &kek(), &map(&[("key-id", "7")])).unwrap();
            let md = obj.envelope.to_metadata();
            let sealed = obj.sealer.encrypt(&plaintext).unwrap();
            assert_eq!(sealed.len(), len + TAG_LEN);
            assert_eq!(plain_size(sealed.len() as u64).unwrap(), len as u64);
            let envelope = complete(&md);
            assert_eq!(envelope.version(), format.version());
            assert_eq!(envelope.context(), &map(&[("key-id", "7")]));
            let dk = aes_gcm_unwrap(&kek(), &envelope).unwrap();
            let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
            assert_eq!(key.decrypt(&sealed).unwrap(), plaintext);

            // KMS wrap: the caller's GenerateDataKey is simulated by a known key and blob.
            let dk = DataKey::from_bytes(&[0x42; 32]);
            let context = kms_context_for_write(&map(&[("tenant", "a")]), format).unwrap();
            let obj = new_object_kms(format, &dk, b"kms-blob".to_vec(), context.clone()).unwrap();
            let md = obj.envelope.to_metadata();
            let sealed = obj.sealer.encrypt(&plaintext).unwrap();
            let envelope = complete(&md);
            let request = kms_decrypt_request(&envelope, &map(&[("tenant", "a")])).unwrap();
            assert_eq!(request.ciphertext_blob, b"kms-blob");
            assert_eq!(request.encryption_context, context);
            let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
            assert_eq!(key.decrypt(&sealed).unwrap(), plaintext);
        }
    }
}

#[test]
fn fresh_objects_never_share_keys_or_nonces() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let a = new_object_aes(format, &kek(), &BTreeMap::new()).unwrap();
        let b = new_object_aes(format, &kek(), &BTreeMap::new()).unwrap();
        assert_ne!(a.envelope.content(), b.envelope.content());
        assert_ne!(
            a.envelope.encrypted_data_key(),
            b.envelope.encrypted_data_key()
        );
        assert_ne!(
            a.sealer.encrypt(b"same").unwrap(),
            b.sealer.encrypt(b"same").unwrap()
        );
    }
}

#[test]
fn streaming_equals_whole_for_many_splits() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 100, 1000, 65536 + 7] {
            let plaintext = pattern(len);
            let (obj, dk) = fresh_object(format, len as u8);
            let envelope = obj.envelope.clone();
            let whole = obj.sealer.encrypt(&plaintext).unwrap();
            for piece in [1, 3, 7, 16, 17, 64, 1000, len.max(1)] {
                if len > 5000 && piece < 64 {
                    continue; // enough coverage, keep the test fast
                }
                let (obj, _) = fresh_object(format, len as u8);
                let mut e = obj.sealer.encryptor();
                let mut streamed = Vec::new();
                for part in plaintext.chunks(piece) {
                    e.update(part, &mut streamed).unwrap();
                }
                assert_eq!(e.plain_len(), len as u64);
                e.finish(&mut streamed);
                assert_eq!(streamed, whole, "{format:?} len {len} piece {piece}");

                let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
                let (plain, verified) = stream_decrypt(&key, &whole, piece).unwrap();
                assert_eq!(plain, plaintext, "{format:?} len {len} piece {piece}");
                assert_eq!(verified.plain_len(), len as u64);
            }
        }
    }
}

proptest::proptest! {
    #[test]
    fn streaming_equals_whole_at_arbitrary_cuts(
        plaintext in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
        cuts in proptest::collection::vec(0usize..700, 0..8),
        v3 in proptest::bool::ANY,
    ) {
        let format = if v3 { WriteFormat::V3 } else { WriteFormat::V2 };
        let (obj, dk) = fresh_object(format, 9);
        let envelope = obj.envelope.clone();
        let whole = obj.sealer.encrypt(&plaintext).unwrap();
        let split = |data: &[u8]| -> Vec<Vec<u8>> {
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            points.sort_unstable();
            let mut parts = Vec::new();
            let mut last = 0;
            for p in points.into_iter().chain([data.len()]) {
                parts.push(data[last..p].to_vec());
                last = p;
            }
            parts
        };
        let (obj, _) = fresh_object(format, 9);
        let mut e = obj.sealer.encryptor();
        let mut streamed = Vec::new();
        for part in split(&plaintext) {
            e.update(&part, &mut streamed).unwrap();
        }
        e.finish(&mut streamed);
        proptest::prop_assert_eq!(&streamed, &whole);
        let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
        let mut d = key.decryptor();
        let mut plain = Vec::new();
        for part in split(&whole) {
            d.update(&part, &mut plain).unwrap();
        }
        d.finish().unwrap();
        proptest::prop_assert_eq!(plain, plaintext);
    }
}

#[test]
fn a_truncated_or_extended_stream_is_never_verified() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (obj, dk) = fresh_object(format, 3);
        let envelope = obj.envelope.clone();
        let whole = obj.sealer.encrypt(&pattern(100)).unwrap();
        let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
        for cut in 0..whole.len() {
            for piece in [1, 7, 200] {
                let err = stream_decrypt(&key, &whole[..cut], piece).unwrap_err();
                if cut < TAG_LEN {
                    assert_eq!(err, S3ecError::Truncated { len: cut as u64 });
                } else {
                    assert_eq!(err, S3ecError::AuthenticationFailed, "cut {cut}");
                }
            }
            assert!(key.decrypt(&whole[..cut]).is_err());
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert_eq!(
            stream_decrypt(&key, &longer, 9).unwrap_err(),
            S3ecError::AuthenticationFailed
        );
        assert_eq!(key.decrypt(&longer), Err(S3ecError::AuthenticationFailed));
    }
}

// ---- tamper classes -----------------------------------------------------------------

/// Every way of reading `body` under `envelope` with `dk` fails, with one of `allowed`.
fn assert_unreadable(envelope: &Envelope, dk: &DataKey, body: &[u8], allowed: &[S3ecError]) {
    let key = match ContentKey::for_decrypt(envelope, dk) {
        Ok(key) => key,
        Err(e) => {
            assert!(allowed.contains(&e), "unexpected {e:?}");
            return;
        }
    };
    let whole = key.decrypt(body).unwrap_err();
    assert!(allowed.contains(&whole), "unexpected {whole:?}");
    let streamed = stream_decrypt(&key, body, 13).unwrap_err();
    assert!(allowed.contains(&streamed), "unexpected {streamed:?}");
}

#[test]
fn any_flipped_body_byte_fails_authentication() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (obj, dk) = fresh_object(format, 5);
        let envelope = obj.envelope.clone();
        let whole = obj.sealer.encrypt(&pattern(70)).unwrap();
        for i in 0..whole.len() {
            for bit in [0x01, 0x80] {
                let mut bad = whole.clone();
                bad[i] ^= bit;
                assert_unreadable(&envelope, &dk, &bad, &[S3ecError::AuthenticationFailed]);
            }
        }
    }
}

#[test]
fn any_changed_iv_message_id_or_commitment_fails() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (obj, dk) = fresh_object(format, 6);
        let md = obj.envelope.to_metadata();
        let whole = obj.sealer.encrypt(&pattern(40)).unwrap();
        let fields: &[&str] = match format {
            WriteFormat::V2 => &[IV],
            WriteFormat::V3 => &[V3_MESSAGE_ID, V3_COMMITMENT],
        };
        for field in fields {
            let raw = BASE64.decode(&md[*field]).unwrap();
            for i in 0..raw.len() {
                let mut bad = raw.clone();
                bad[i] ^= 0x04;
                let mut tampered = md.clone();
                tampered.insert(field.to_string(), b64(&bad));
                let envelope = complete(&tampered);
                // The wrap does not cover the IV or message id, so the key still unwraps ...
                let dk2 = aes_gcm_unwrap(&kek(), &envelope).unwrap();
                assert_eq!(dk2.as_bytes(), dk.as_bytes());
                // ... and the content refuses: the tag (V2) or the commitment (V3).
                let expected = match format {
                    WriteFormat::V2 => S3ecError::AuthenticationFailed,
                    WriteFormat::V3 => S3ecError::CommitmentMismatch,
                };
                assert_unreadable(&envelope, &dk2, &whole, &[expected]);
            }
        }
    }
}

#[test]
fn any_changed_wrapped_key_byte_fails_to_unwrap() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (obj, _) = fresh_object(format, 7);
        let md = obj.envelope.to_metadata();
        let field = match format {
            WriteFormat::V2 => KEY_V2,
            WriteFormat::V3 => V3_KEY,
        };
        let raw = BASE64.decode(&md[field]).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x10;
            let mut tampered = md.clone();
            tampered.insert(field.to_string(), b64(&bad));
            assert_eq!(
                aes_gcm_unwrap(&kek(), &complete(&tampered)).unwrap_err(),
                S3ecError::KeyUnwrapFailed
            );
        }
        let mut short = md.clone();
        short.insert(field.to_string(), b64(&raw[..59]));
        assert_eq!(
            aes_gcm_unwrap(&kek(), &complete(&short)).unwrap_err(),
            S3ecError::KeyUnwrapFailed
        );
    }
}

#[test]
fn a_wrong_key_never_decrypts() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (obj, _) = fresh_object(format, 8);
        let envelope = obj.envelope.clone();
        let whole = obj.sealer.encrypt(&pattern(33)).unwrap();
        let other_kek = Key256::from_bytes(&[0x77; 32]);
        assert_eq!(
            aes_gcm_unwrap(&other_kek, &envelope).unwrap_err(),
            S3ecError::KeyUnwrapFailed
        );
        let wrong_dk = DataKey::from_bytes(&[0x55; 32]);
        let expected = match format {
            WriteFormat::V2 => S3ecError::AuthenticationFailed,
            WriteFormat::V3 => S3ecError::CommitmentMismatch,
        };
        assert_unreadable(&envelope, &wrong_dk, &whole, &[expected]);
    }
}

#[test]
fn a_swapped_envelope_never_decrypts_another_body() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (a, _) = fresh_object(format, 10);
        let (b, dk_b) = fresh_object(format, 11);
        let envelope_b = b.envelope.clone();
        let body_a = a.sealer.encrypt(&pattern(50)).unwrap();
        drop(b);
        // B's metadata on A's body: B's key is valid for B's envelope, but A's body fails.
        let dk = aes_gcm_unwrap(&kek(), &envelope_b).unwrap();
        assert_eq!(dk.as_bytes(), dk_b.as_bytes());
        assert_unreadable(
            &envelope_b,
            &dk,
            &body_a,
            &[S3ecError::AuthenticationFailed],
        );
    }
    // V3: another object's commitment or message id with this object's data key.
    let (a, dk_a) = fresh_object(WriteFormat::V3, 12);
    let (b, _) = fresh_object(WriteFormat::V3, 13);
    let (md_a, md_b) = (a.envelope.to_metadata(), b.envelope.to_metadata());
    for field in [V3_COMMITMENT, V3_MESSAGE_ID] {
        let mut mixed = md_a.clone();
        mixed.insert(field.to_string(), md_b[field].clone());
        assert_eq!(
            ContentKey::for_decrypt(&complete(&mixed), &dk_a).unwrap_err(),
            S3ecError::CommitmentMismatch
        );
    }
}

#[test]
fn a_rewritten_content_algorithm_fails_to_unwrap() {
    // V3 object's wrapped key presented as a V2 object (downgrade): the wrap AAD was "115".
    let (obj, _) = fresh_object(WriteFormat::V3, 14);
    let v3 = obj.envelope.to_metadata();
    let downgraded = map(&[
        (KEY_V2, v3[V3_KEY].as_str()),
        (IV, IV_B64),
        (CEK_ALG, "AES/GCM/NoPadding"),
        (WRAP_ALG, "AES/GCM"),
        (TAG_LEN_KEY, "128"),
    ]);
    assert_eq!(
        aes_gcm_unwrap(&kek(), &complete(&downgraded)).unwrap_err(),
        S3ecError::KeyUnwrapFailed
    );
    // And the other way round.
    let (obj, _) = fresh_object(WriteFormat::V2, 15);
    let v2 = obj.envelope.to_metadata();
    let mut upgraded = v3_vector_metadata();
    upgraded.insert(V3_KEY.to_string(), v2[KEY_V2].clone());
    assert_eq!(
        aes_gcm_unwrap(&kek(), &complete(&upgraded)).unwrap_err(),
        S3ecError::KeyUnwrapFailed
    );
}

#[test]
fn kms_context_checks_catch_changes_and_downgrades() {
    let user = map(&[("tenant", "a")]);
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let context = kms_context_for_write(&user, format).unwrap();
        assert_eq!(context[KMS_CONTEXT_CEK_ALG], format.suite().cek_alg());
        let obj = new_object_kms(format, &data_key(), vec![9; 20], context).unwrap();
        let md = obj.envelope.to_metadata();
        let context_key = match format {
            WriteFormat::V2 => MATDESC,
            WriteFormat::V3 => V3_CONTEXT,
        };
        let envelope = complete(&md);
        assert!(kms_decrypt_request(&envelope, &user).is_ok());
        // The reader expects another context, or none.
        for expected in [
            BTreeMap::new(),
            map(&[("tenant", "b")]),
            map(&[("tenant", "a"), ("x", "y")]),
        ] {
            assert_eq!(
                kms_decrypt_request(&envelope, &expected).unwrap_err(),
                S3ecError::EncryptionContextMismatch
            );
        }
        // The stored context was changed.
        let mut changed = md.clone();
        changed.insert(
            context_key.to_string(),
            format!(
                r#"{{"aws:x-amz-cek-alg":"{}","tenant":"b"}}"#,
                format.suite().cek_alg()
            ),
        );
        assert_eq!(
            kms_decrypt_request(&complete(&changed), &user).unwrap_err(),
            S3ecError::EncryptionContextMismatch
        );
        // The bound suite was changed, or removed.
        for stored in [
            r#"{"aws:x-amz-cek-alg":"AES/CBC/PKCS5Padding","tenant":"a"}"#,
            r#"{"tenant":"a"}"#,
        ] {
            let mut changed = md.clone();
            changed.insert(context_key.to_string(), stored.to_string());
            assert_eq!(
                kms_decrypt_request(&complete(&changed), &user).unwrap_err(),
                S3ecError::ContextAlgorithmMismatch {
                    expected: format.suite().cek_alg()
                }
            );
        }
        // The reader may not pass the reserved keys.
        for reserved in [KMS_CONTEXT_CEK_ALG, KMS_CONTEXT_CMK_ID] {
            let mut expected = user.clone();
            expected.insert(reserved.to_string(), "x".to_string());
            assert_eq!(
                kms_decrypt_request(&envelope, &expected).unwrap_err(),
                S3ecError::ReservedContextKey { key: reserved }
            );
        }
    }
    // A V3 KMS object rewritten as V2 keeps its context, which binds "115": refused before KMS.
    let context = kms_context_for_write(&BTreeMap::new(), WriteFormat::V3).unwrap();
    let obj = new_object_kms(WriteFormat::V3, &data_key(), vec![9; 20], context).unwrap();
    let v3 = obj.envelope.to_metadata();
    let downgraded = map(&[
        (KEY_V2, v3[V3_KEY].as_str()),
        (IV, IV_B64),
        (CEK_ALG, "AES/GCM/NoPadding"),
        (WRAP_ALG, "kms+context"),
        (TAG_LEN_KEY, "128"),
        (MATDESC, v3[V3_CONTEXT].as_str()),
    ]);
    assert_eq!(
        kms_decrypt_request(&complete(&downgraded), &BTreeMap::new()).unwrap_err(),
        S3ecError::ContextAlgorithmMismatch {
            expected: "AES/GCM/NoPadding"
        }
    );
}

#[test]
fn kms_context_for_write_refuses_reserved_keys_and_non_ascii() {
    for reserved in [KMS_CONTEXT_CEK_ALG, KMS_CONTEXT_CMK_ID] {
        assert_eq!(
            kms_context_for_write(&map(&[(reserved, "x")]), WriteFormat::V3),
            Err(S3ecError::ReservedContextKey { key: reserved })
        );
    }
    assert_eq!(
        kms_context_for_write(&map(&[("tenant", "é")]), WriteFormat::V3),
        Err(S3ecError::NonAsciiContext)
    );
    assert_eq!(
        kms_context_for_write(&BTreeMap::new(), WriteFormat::V2).unwrap(),
        map(&[(KMS_CONTEXT_CEK_ALG, "AES/GCM/NoPadding")])
    );
    // A context made for the other format, or by hand without the binding, is refused.
    let v2_context = kms_context_for_write(&BTreeMap::new(), WriteFormat::V2).unwrap();
    assert_eq!(
        new_object_kms(WriteFormat::V3, &data_key(), vec![1], v2_context).unwrap_err(),
        S3ecError::ContextAlgorithmMismatch { expected: "115" }
    );
    assert!(new_object_kms(WriteFormat::V3, &data_key(), vec![1], BTreeMap::new()).is_err());
    assert!(new_object_aes(WriteFormat::V3, &kek(), &map(&[("k", "ü")])).is_err());
}

#[test]
fn wrong_wrap_paths_name_the_right_one() {
    let context = kms_context_for_write(&BTreeMap::new(), WriteFormat::V3).unwrap();
    let kms = new_object_kms(WriteFormat::V3, &data_key(), vec![1], context).unwrap();
    assert!(matches!(
        aes_gcm_unwrap(&kek(), &kms.envelope),
        Err(S3ecError::WrongWrap {
            found: WrapAlg::KmsContext,
            ..
        })
    ));
    let aes = complete(&v3_vector_metadata());
    assert!(matches!(
        kms_decrypt_request(&aes, &BTreeMap::new()),
        Err(S3ecError::WrongWrap {
            found: WrapAlg::AesGcm,
            ..
        })
    ));
}

#[test]
fn kms_data_keys_must_be_32_bytes() {
    assert!(data_key_from_bytes(&[1; 32]).is_ok());
    for len in [0, 16, 31, 33] {
        assert_eq!(
            data_key_from_bytes(&vec![1; len]).unwrap_err(),
            S3ecError::InvalidDataKey { len }
        );
    }
}

// ---- metadata detection ----------------------------------------------------------------

#[test]
fn the_python_clients_kms_metadata_is_read() {
    // S3EC.md §1.7: what the official Python 4.0.0 client wrote (the KMS blobs are stand-ins).
    let v3 = map(&[
        (V3_CONTENT, "115"),
        (V3_WRAP, "12"),
        (V3_CONTEXT, r#"{"aws:x-amz-cek-alg": "115"}"#),
        (V3_KEY, "AQIDBAUGBwg="),
        (V3_COMMITMENT, "3NBxxSjyAaRKeukgHCM3IMy0oS7cAF8Enrk8Cw=="),
        (V3_MESSAGE_ID, "5enjbvajQaUuhWHRcXcjnwr43TKW4D4qXcU/Lw=="),
    ]);
    let envelope = complete(&v3);
    assert_eq!(envelope.version(), FormatVersion::V3);
    assert_eq!(envelope.suite(), ContentSuite::AesGcmCommitting);
    assert_eq!(envelope.wrap(), WrapAlg::KmsContext);
    let request = kms_decrypt_request(&envelope, &BTreeMap::new()).unwrap();
    assert_eq!(request.ciphertext_blob, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        request.encryption_context,
        map(&[(KMS_CONTEXT_CEK_ALG, "115")])
    );

    let v2 = map(&[
        (KEY_V2, "AQIDBAUGBwg="),
        (WRAP_ALG, "kms+context"),
        (CEK_ALG, "AES/GCM/NoPadding"),
        (IV, "PLPMlyM7n9ANiYS9"),
        (TAG_LEN_KEY, "128"),
        (MATDESC, r#"{"aws:x-amz-cek-alg": "AES/GCM/NoPadding"}"#),
    ]);
    let envelope = complete(&v2);
    assert_eq!(envelope.version(), FormatVersion::V2);
    assert_eq!(envelope.suite(), ContentSuite::AesGcm);
    assert!(kms_decrypt_request(&envelope, &BTreeMap::new()).is_ok());

    // With the user context {"tenant": "a"}, readers must be given it.
    let mut with_ec = v3.clone();
    with_ec.insert(
        V3_CONTEXT.to_string(),
        r#"{"tenant": "a", "aws:x-amz-cek-alg": "115"}"#.to_string(),
    );
    let envelope = complete(&with_ec);
    assert_eq!(
        kms_decrypt_request(&envelope, &BTreeMap::new()).unwrap_err(),
        S3ecError::EncryptionContextMismatch
    );
    assert!(kms_decrypt_request(&envelope, &map(&[("tenant", "a")])).is_ok());
}

#[test]
fn names_match_in_any_case_with_or_without_the_prefix() {
    let spelled: Vec<(String, String)> = v3_vector_metadata()
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| match i % 3 {
            0 => (k.to_uppercase(), v),
            1 => (format!("X-Amz-Meta-{k}"), v),
            _ => (k, v),
        })
        .chain([
            ("mode".to_string(), "33188".to_string()),
            ("x-amz-meta-uid".to_string(), "1000".to_string()),
        ])
        .collect();
    let envelope = match detect(spelled.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap() {
        Detection::Complete(e) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(envelope, complete(&v3_vector_metadata()));

    // The same key twice: harmless if equal, refused if not.
    let mut twice: Vec<(String, String)> = v3_vector_metadata().into_iter().collect();
    twice.push((format!("x-amz-meta-{V3_WRAP}"), "02".to_string()));
    assert!(detect(twice.clone()).is_ok());
    twice.push((V3_WRAP.to_uppercase(), "12".to_string()));
    assert_eq!(
        detect(twice).unwrap_err(),
        S3ecError::DuplicateKey { key: V3_WRAP }
    );
}

#[test]
fn keys_of_different_versions_together_are_refused() {
    let mut both_keys = v2_vector_metadata();
    both_keys.insert(V3_KEY.to_string(), V3_EDK_B64.to_string());
    let mut v1_and_v2 = v2_vector_metadata();
    v1_and_v2.insert(KEY_V1.to_string(), V3_EDK_B64.to_string());
    let mut v2_with_v3_content = v2_vector_metadata();
    v2_with_v3_content.insert(V3_CONTENT.to_string(), "115".to_string());
    let mut v3_with_v2_key = v3_vector_metadata();
    v3_with_v2_key.insert(CEK_ALG.to_string(), "AES/GCM/NoPadding".to_string());
    let mut v3_with_iv = v3_vector_metadata();
    v3_with_iv.insert(IV.to_string(), IV_B64.to_string());
    for md in [
        both_keys,
        v1_and_v2,
        v2_with_v3_content,
        v3_with_v2_key,
        v3_with_iv,
    ] {
        assert!(
            matches!(detect(&md), Err(S3ecError::ConflictingKeys { .. })),
            "{md:?}"
        );
    }
}

#[test]
fn v1_and_legacy_objects_are_recognised_not_decrypted() {
    let iv16 = b64(&[3u8; 16]);
    for (edk_len, wrap) in [(48, WrapAlg::LegacyAes), (256, WrapAlg::LegacyRsa)] {
        let md = map(&[
            (KEY_V1, b64(&vec![7u8; edk_len]).as_str()),
            (IV, iv16.as_str()),
            (MATDESC, "{}"),
            (UNENCRYPTED_LEN, "1234"),
        ]);
        let envelope = complete(&md);
        assert_eq!(envelope.version(), FormatVersion::V1);
        assert_eq!(envelope.suite(), ContentSuite::AesCbc);
        assert_eq!(envelope.wrap(), wrap);
        assert_eq!(envelope.tag_len_bits(), None);
        assert_eq!(envelope.unencrypted_content_length(), Some(1234));
        assert_eq!(
            ContentKey::for_decrypt(&envelope, &data_key()).unwrap_err(),
            S3ecError::UnsupportedContent {
                suite: ContentSuite::AesCbc
            }
        );
        assert_eq!(
            aes_gcm_unwrap(&kek(), &envelope).unwrap_err(),
            S3ecError::UnsupportedWrap { wrap }
        );
        assert_eq!(envelope.to_metadata(), md, "V1 metadata round trip");
    }
    // V1 KMS (legacy `kms`, CBC in the V2 layout) and V2 GCM under legacy wraps.
    let legacy = [
        ("kms", "AES/CBC/PKCS5Padding", 16, WrapAlg::LegacyKms),
        ("kms", "AES/GCM/NoPadding", 12, WrapAlg::LegacyKms),
        ("AESWrap", "AES/GCM/NoPadding", 12, WrapAlg::LegacyAesWrap),
        (
            "RSA/ECB/OAEPWithSHA-256AndMGF1Padding",
            "AES/GCM/NoPadding",
            12,
            WrapAlg::LegacyRsaOaepSha256,
        ),
        (
            "RSA-OAEP-SHA1",
            "AES/GCM/NoPadding",
            12,
            WrapAlg::RsaOaepSha1,
        ),
    ];
    for (wrap_name, cek, iv_len, wrap) in legacy {
        let mut md = map(&[
            (KEY_V2, "AQID"),
            (IV, b64(&vec![1u8; iv_len]).as_str()),
            (CEK_ALG, cek),
            (WRAP_ALG, wrap_name),
            (MATDESC, r#"{"kms_cmk_id":"alias/x"}"#),
        ]);
        if iv_len == 12 {
            md.insert(TAG_LEN_KEY.to_string(), "128".to_string());
        }
        let envelope = complete(&md);
        assert_eq!(envelope.wrap(), wrap);
        assert_eq!(envelope.to_metadata(), md);
        assert!(matches!(
            aes_gcm_unwrap(&kek(), &envelope),
            Err(S3ecError::UnsupportedWrap { .. }
                | S3ecError::WrongWrap { .. }
                | S3ecError::UnsupportedContent { .. })
        ));
        assert!(kms_decrypt_request(&envelope, &BTreeMap::new()).is_err());
    }
    // V3 RSA: recognised; not an AES/GCM wrap (rsa.rs unwraps it, with an RSA key).
    let mut rsa = v3_vector_metadata();
    rsa.insert(V3_WRAP.to_string(), "22".to_string());
    let envelope = complete(&rsa);
    assert_eq!(envelope.wrap(), WrapAlg::RsaOaepSha1);
    assert_eq!(
        aes_gcm_unwrap(&kek(), &envelope).unwrap_err(),
        S3ecError::UnsupportedWrap {
            wrap: WrapAlg::RsaOaepSha1
        }
    );
}

#[test]
fn malformed_values_are_typed_errors() {
    let with = |base: BTreeMap<String, String>, key: &str, value: Option<&str>| {
        let mut md = base;
        match value {
            Some(v) => md.insert(key.to_string(), v.to_string()),
            None => md.remove(key),
        };
        detect(&md).map(|_| ())
    };
    let v2 = v2_vector_metadata;
    let v3 = v3_vector_metadata;
    let cases: Vec<(Result<(), S3ecError>, S3ecError)> = vec![
        (
            with(v2(), CEK_ALG, Some("AES/XTS")),
            S3ecError::UnknownContentAlgorithm {
                found: "AES/XTS".into(),
            },
        ),
        (
            with(v3(), V3_CONTENT, Some("116")),
            S3ecError::UnknownContentAlgorithm {
                found: "116".into(),
            },
        ),
        (
            with(v2(), WRAP_ALG, Some("ROT13")),
            S3ecError::UnknownWrapAlgorithm {
                found: "ROT13".into(),
            },
        ),
        (
            with(v3(), V3_WRAP, Some("kms+context")),
            S3ecError::UnknownWrapAlgorithm {
                found: "kms+context".into(),
            },
        ),
        (
            with(v2(), WRAP_ALG, None),
            S3ecError::MissingKey { key: WRAP_ALG },
        ),
        (
            with(v2(), TAG_LEN_KEY, None),
            S3ecError::MissingKey { key: TAG_LEN_KEY },
        ),
        (
            with(v3(), V3_WRAP, None),
            S3ecError::MissingKey { key: V3_WRAP },
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, Err(want));
    }
    let invalid = |r: Result<(), S3ecError>, key: &str| match r {
        Err(S3ecError::InvalidValue { key: k, .. }) => assert_eq!(k, key),
        other => panic!("expected InvalidValue for {key}, got {other:?}"),
    };
    invalid(with(v2(), TAG_LEN_KEY, Some("96")), TAG_LEN_KEY);
    invalid(with(v2(), CEK_ALG, Some("115")), CEK_ALG);
    invalid(with(v2(), IV, Some(&b64(&[0u8; 16]))), IV);
    invalid(with(v2(), IV, Some("AAECAwQFBgcICQo")), IV); // unpadded
    invalid(with(v2(), KEY_V2, Some("")), KEY_V2);
    invalid(with(v2(), MATDESC, Some("not json")), MATDESC);
    invalid(with(v2(), MATDESC, Some(r#"["a"]"#)), MATDESC);
    invalid(with(v2(), MATDESC, Some(r#"{"a":1}"#)), MATDESC);
    invalid(with(v2(), MATDESC, Some(r#"{"a":"1","a":"2"}"#)), MATDESC);
    invalid(
        with(v2(), MATDESC, Some("=?UTF-8?B?eyJhIjoiw6kifQ==?=")),
        MATDESC,
    );
    invalid(with(v2(), UNENCRYPTED_LEN, Some("+5")), UNENCRYPTED_LEN);
    invalid(with(v3(), V3_MESSAGE_ID, Some(IV_B64)), V3_MESSAGE_ID);
    invalid(
        with(v3(), V3_COMMITMENT, Some(MID_B64.trim_end_matches('='))),
        V3_COMMITMENT,
    );
    // A V1 key with a GCM algorithm: only V2 has GCM.
    let mut v1_gcm = v2();
    let key = v1_gcm.remove(KEY_V2).unwrap();
    v1_gcm.insert(KEY_V1.to_string(), key);
    invalid(detect(&v1_gcm).map(|_| ()), CEK_ALG);
    // Escaped JSON text is decoded as JSON.
    let envelope = complete(&with_map(v3(), V3_MATDESC, r#"{"k\u0069d":"\u0031"}"#));
    assert_eq!(envelope.context(), &map(&[("kid", "1")]));
}

fn with_map(mut md: BTreeMap<String, String>, key: &str, value: &str) -> BTreeMap<String, String> {
    md.insert(key.to_string(), value.to_string());
    md
}

#[test]
fn incomplete_metadata_names_the_missing_key() {
    let mut no_iv = v2_vector_metadata();
    no_iv.remove(IV);
    assert_eq!(
        detect(&no_iv).unwrap_err(),
        S3ecError::MissingKey { key: IV }
    );
    let mut no_c = v3_vector_metadata();
    no_c.remove(V3_CONTENT);
    assert_eq!(
        detect(&no_c).unwrap_err(),
        S3ecError::MissingKey { key: V3_CONTENT }
    );
    let only_wrap = map(&[(WRAP_ALG, "AES/GCM")]);
    assert!(matches!(
        detect(&only_wrap),
        Err(S3ecError::ConflictingKeys { .. })
    ));
    let marker = map(&[(INSTRUCTION_MARKER, "")]);
    assert_eq!(detect(&marker).unwrap_err(), S3ecError::IsInstructionFile);
}

#[test]
fn an_unencrypted_object_asks_for_an_instruction_file() {
    let plain = map(&[("mode", "33188"), ("mtime", "1700000000")]);
    let p = pending(&plain);
    assert!(!p.is_v3());
    assert!(!p.object_has_s3ec_metadata());
    assert!(matches!(
        p.complete(b"{}"),
        Err(S3ecError::InvalidInstructionFile { .. })
    ));
    assert_eq!(instruction_file_key("a/b.txt"), "a/b.txt.instruction");
}

// ---- instruction files ---------------------------------------------------------------

#[test]
fn instruction_file_objects_round_trip() {
    for format in [WriteFormat::V2, WriteFormat::V3] {
        let (obj, dk) = fresh_object(format, 20);
        let original = obj.envelope.clone();
        let whole = obj.sealer.encrypt(&pattern(77)).unwrap();
        let (object_md, file) = original.to_instruction_file();
        match format {
            WriteFormat::V2 => assert!(object_md.is_empty()),
            WriteFormat::V3 => assert_eq!(
                object_md.keys().map(String::as_str).collect::<Vec<_>>(),
                [V3_CONTENT, V3_COMMITMENT, V3_MESSAGE_ID]
            ),
        }
        let p = pending(&object_md);
        assert_eq!(p.is_v3(), format == WriteFormat::V3);
        let envelope = p.complete(&file).unwrap();
        assert_eq!(envelope.source(), MetadataSource::InstructionFile);
        assert_eq!(envelope.to_metadata(), original.to_metadata());
        let dk2 = aes_gcm_unwrap(&kek(), &envelope).unwrap();
        assert_eq!(dk2.as_bytes(), dk.as_bytes());
        let key = ContentKey::for_decrypt(&envelope, &dk2).unwrap();
        assert_eq!(key.decrypt(&whole).unwrap(), pattern(77));
        assert_eq!(
            parse_instruction_file(&file).unwrap().len(),
            original.to_metadata().len() - object_md.len()
        );
    }
}

#[test]
fn bad_instruction_files_are_refused() {
    let (obj, _) = fresh_object(WriteFormat::V3, 21);
    let (object_md, file) = obj.envelope.to_instruction_file();
    let file: BTreeMap<String, String> = serde_json::from_slice(&file).unwrap();
    let p = pending(&object_md);
    let with = |key: &str, value: &str| {
        let mut f = file.clone();
        f.insert(key.to_string(), value.to_string());
        serde_json::to_vec(&f).unwrap()
    };
    for key in [
        V3_CONTENT,
        V3_COMMITMENT,
        V3_MESSAGE_ID,
        IV,
        CEK_ALG,
        "x-amz-meta-mode",
        "mode",
    ] {
        assert!(
            matches!(
                p.complete(&with(key, "1")),
                Err(S3ecError::InvalidInstructionFile { .. })
            ),
            "{key}"
        );
    }
    for body in [&b"not json"[..], b"[1,2]", b"\"x\"", br#"{"x-amz-w":2}"#] {
        assert!(matches!(
            p.complete(body),
            Err(S3ecError::InvalidInstructionFile { .. })
        ));
    }
    let duplicated = format!(
        r#"{{"x-amz-3":"{}","x-amz-w":"02","x-amz-w":"12"}}"#,
        file[V3_KEY]
    );
    assert_eq!(
        p.complete(duplicated.as_bytes()).unwrap_err(),
        S3ecError::DuplicateKey { key: V3_WRAP }
    );
    let mut no_key = file.clone();
    no_key.remove(V3_KEY);
    assert_eq!(
        p.complete(&serde_json::to_vec(&no_key).unwrap())
            .unwrap_err(),
        S3ecError::MissingKey { key: V3_KEY }
    );
    // V3 object metadata that also carries the instruction-file half.
    let mut mixed = object_md.clone();
    mixed.insert(V3_WRAP.to_string(), "02".to_string());
    assert!(matches!(
        detect(&mixed),
        Err(S3ecError::ConflictingKeys { .. })
    ));
    // A V1/V2 instruction file may not carry V3 keys.
    let (obj, _) = fresh_object(WriteFormat::V2, 22);
    let (object_md, file) = obj.envelope.to_instruction_file();
    let mut file: BTreeMap<String, String> = serde_json::from_slice(&file).unwrap();
    file.insert(V3_CONTENT.to_string(), "115".to_string());
    assert!(matches!(
        pending(&object_md).complete(&serde_json::to_vec(&file).unwrap()),
        Err(S3ecError::InvalidInstructionFile { .. })
    ));
}

#[test]
fn gos_instruction_file_with_json_numbers_is_read() {
    // The shape of Go's `TestEnvelope_UnmarshalJSON` "integer json numbers" case.
    let body = format!(
        r#"{{
  "x-amz-iv": "{IV_B64}",
  "x-amz-key-v2": "{V2_EDK_B64}",
  "x-amz-matdesc": "{{}}",
  "x-amz-wrap-alg": "AES/GCM",
  "x-amz-cek-alg": "AES/GCM/NoPadding",
  "x-amz-tag-len": 128,
  "x-amz-unencrypted-content-length": 100
}}"#
    );
    let envelope = pending(&BTreeMap::new()).complete(body.as_bytes()).unwrap();
    assert_eq!(envelope.unencrypted_content_length(), Some(100));
    let dk = aes_gcm_unwrap(&kek(), &envelope).unwrap();
    let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
    assert_eq!(key.decrypt(&body_v2()).unwrap(), vector_plaintext());
    // Numbers are accepted only where Go writes them.
    let bad = body.replace(r#""x-amz-wrap-alg": "AES/GCM""#, r#""x-amz-wrap-alg": 2"#);
    assert!(pending(&BTreeMap::new()).complete(bad.as_bytes()).is_err());
}

fn body_v2() -> Vec<u8> {
    body(V2_C, V2_T)
}

// ---- metadata written ------------------------------------------------------------------

#[test]
fn written_metadata_has_exactly_the_spec_keys() {
    let keys = |md: &BTreeMap<String, String>| md.keys().cloned().collect::<Vec<_>>();
    let (v2_aes, _) = fresh_object(WriteFormat::V2, 30);
    let md = v2_aes.envelope.to_metadata();
    assert_eq!(
        keys(&md),
        [CEK_ALG, IV, KEY_V2, MATDESC, TAG_LEN_KEY, WRAP_ALG]
    );
    assert_eq!(md[MATDESC], "{}");
    assert_eq!(md[WRAP_ALG], "AES/GCM");
    let (v3_aes, _) = fresh_object(WriteFormat::V3, 31);
    let md = v3_aes.envelope.to_metadata();
    assert_eq!(
        keys(&md),
        [V3_KEY, V3_CONTENT, V3_COMMITMENT, V3_MESSAGE_ID, V3_WRAP]
    );
    assert_eq!(md[V3_WRAP], "02");
    let context = kms_context_for_write(&map(&[("tenant", "a")]), WriteFormat::V3).unwrap();
    let v3_kms = new_object_kms(WriteFormat::V3, &data_key(), vec![1], context).unwrap();
    let md = v3_kms.envelope.to_metadata();
    assert_eq!(md[V3_WRAP], "12");
    assert_eq!(
        md[V3_CONTEXT],
        r#"{"aws:x-amz-cek-alg":"115","tenant":"a"}"#
    );
    assert!(!md.contains_key(V3_MATDESC));
    let with_matdesc = new_object_aes(WriteFormat::V3, &kek(), &map(&[("kid", "2")])).unwrap();
    assert_eq!(
        with_matdesc.envelope.to_metadata()[V3_MATDESC],
        r#"{"kid":"2"}"#
    );
    // Every value is printable ASCII, as the store requires.
    for md in [md, with_matdesc.envelope.to_metadata()] {
        assert!(md
            .values()
            .all(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b))));
    }
}

// ---- sizes and limits --------------------------------------------------------------------

#[test]
fn sizes_and_the_gcm_limit() {
    assert_eq!(plain_size(116).unwrap(), 100);
    assert_eq!(plain_size(16).unwrap(), 0);
    assert_eq!(plain_size(15), Err(S3ecError::Truncated { len: 15 }));
    assert_eq!(MAX_PLAINTEXT_LEN, 68_719_476_704);
    assert!(check_plaintext_len(MAX_PLAINTEXT_LEN).is_ok());
    assert_eq!(
        check_plaintext_len(MAX_PLAINTEXT_LEN + 1),
        Err(S3ecError::TooLarge {
            len: MAX_PLAINTEXT_LEN + 1,
            max: MAX_PLAINTEXT_LEN
        })
    );
    let (obj, _) = fresh_object(WriteFormat::V3, 40);
    let mut e = obj.sealer.encryptor();
    e.skip_for_test(MAX_PLAINTEXT_LEN - 10);
    let mut out = vec![1, 2, 3];
    assert_eq!(
        e.update(&[0; 11], &mut out),
        Err(S3ecError::TooLarge {
            len: MAX_PLAINTEXT_LEN + 1,
            max: MAX_PLAINTEXT_LEN
        })
    );
    assert_eq!(out, [1, 2, 3], "nothing is written past the limit");
    e.update(&[0; 10], &mut out).unwrap();
    assert_eq!(out.len(), 13);
}

// ---- chunk digests -------------------------------------------------------------------------

#[test]
fn chunk_digests_form_a_verified_index_for_random_reads() {
    let plaintext = pattern(1000);
    for over in [DigestOver::Ciphertext, DigestOver::Plaintext] {
        let spec = DigestSpec::new(64, over).unwrap();
        let (obj, dk) = fresh_object(WriteFormat::V3, 50);
        let envelope = obj.envelope.clone();
        let mut e = obj.sealer.encryptor().with_digests(spec);
        let mut whole = Vec::new();
        e.update(&plaintext, &mut whole).unwrap();
        let written = e.finish(&mut whole).unwrap();
        let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();

        let mut seen = None;
        for piece in [1, 13, 64, 100, 2000] {
            let mut d = key.decryptor().with_digests(spec);
            let mut out = Vec::new();
            for part in whole.chunks(piece) {
                d.update(part, &mut out).unwrap();
            }
            let digests = d.finish().unwrap().into_digests().unwrap();
            if let Some(seen) = &seen {
                assert_eq!(&digests, seen, "digests depend on the split");
            }
            seen = Some(digests);
        }
        let digests = seen.unwrap();
        assert_eq!(digests, written, "writer and reader agree");
        assert_eq!(digests.digests().len(), 16); // 15 × 64 + 40
        assert_eq!(digests.content_len(), 1000);
        assert_eq!(digests.chunk_range(15), Some(960..1000));
        assert_eq!(digests.chunk_range(16), None);

        // A random read of chunk 7: fetch, check, decrypt.
        let range = digests.chunk_range(7).unwrap();
        let (start, end) = (range.start as usize, range.end as usize);
        let mut chunk = whole[start..end].to_vec();
        match over {
            DigestOver::Ciphertext => {
                digests.verify(7, &chunk).unwrap();
                key.apply_keystream_at(range.start, &mut chunk).unwrap();
                assert_eq!(chunk, &plaintext[start..end]);
            }
            DigestOver::Plaintext => {
                key.apply_keystream_at(range.start, &mut chunk).unwrap();
                digests.verify(7, &chunk).unwrap();
            }
        }
        chunk[3] ^= 1;
        assert_eq!(
            digests.verify(7, &chunk),
            Err(S3ecError::ChunkDigestMismatch { chunk: 7 })
        );
        assert!(digests.verify(7, &chunk[1..]).is_err());
        assert!(digests.verify(16, &[]).is_err());
    }
    assert_eq!(
        DigestSpec::new(0, DigestOver::Ciphertext),
        Err(S3ecError::InvalidChunkLen { len: 0 })
    );
    assert!(DigestSpec::new(100, DigestOver::Ciphertext).is_err());
    assert_eq!(DigestSpec::default().chunk_len(), DEFAULT_DIGEST_CHUNK_LEN);
}

#[test]
fn digests_are_withheld_when_the_tag_fails_and_empty_objects_have_none() {
    let (obj, dk) = fresh_object(WriteFormat::V2, 51);
    let envelope = obj.envelope.clone();
    let mut whole = obj.sealer.encrypt(&pattern(300)).unwrap();
    whole[5] ^= 1;
    let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
    let mut d = key.decryptor().with_digests(DigestSpec::default());
    let mut out = Vec::new();
    d.update(&whole, &mut out).unwrap();
    assert_eq!(d.finish().unwrap_err(), S3ecError::AuthenticationFailed);

    let (obj, dk) = fresh_object(WriteFormat::V2, 52);
    let envelope = obj.envelope.clone();
    let empty = obj.sealer.encrypt(&[]).unwrap();
    assert_eq!(empty.len(), TAG_LEN);
    let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
    let mut d = key.decryptor().with_digests(DigestSpec::default());
    let mut out = Vec::new();
    d.update(&empty, &mut out).unwrap();
    let digests = d.finish().unwrap().into_digests().unwrap();
    assert!(digests.digests().is_empty());
    assert_eq!(digests.content_len(), 0);
}

// ---- secrets do not print ------------------------------------------------------------------

#[test]
fn debug_output_hides_keys() {
    let dk = DataKey::from_bytes(&[0xab; 32]);
    let obj = new_object_aes_with(
        WriteFormat::V2,
        &kek(),
        &BTreeMap::new(),
        &dk,
        &[0xcd; MESSAGE_ID_LEN],
        [0xef; 12],
    )
    .unwrap();
    let envelope = obj.envelope.clone();
    let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
    let texts = [
        format!("{obj:?}"),
        format!("{key:?}"),
        format!("{envelope:?}"),
        format!("{:?}", key.decryptor()),
        format!("{:?}", obj.sealer.encryptor()),
    ];
    for text in texts {
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("abab") && !lower.contains("171, 171"),
            "{text}"
        );
        assert!(
            !lower.contains("efef") && !lower.contains("239, 239"),
            "{text}"
        );
    }
}

/// `cargo test --release --lib crypto::s3ec -- --ignored --nocapture`
#[test]
#[ignore = "throughput print, not a correctness test"]
fn print_stream_throughput() {
    let (obj, dk) = fresh_object(WriteFormat::V3, 60);
    let envelope = obj.envelope.clone();
    let plaintext = vec![0x5a; 64 << 20];
    let started = std::time::Instant::now();
    let mut e = obj.sealer.encryptor();
    let mut body = Vec::with_capacity(plaintext.len() + TAG_LEN);
    for piece in plaintext.chunks(1 << 20) {
        e.update(piece, &mut body).unwrap();
    }
    e.finish(&mut body);
    let enc = started.elapsed();
    let key = ContentKey::for_decrypt(&envelope, &dk).unwrap();
    let started = std::time::Instant::now();
    let mut d = key.decryptor().with_digests(DigestSpec::default());
    let mut out = Vec::with_capacity(plaintext.len());
    for piece in body.chunks(1 << 20) {
        d.update(piece, &mut out).unwrap();
    }
    d.finish().unwrap();
    let dec = started.elapsed();
    let started = std::time::Instant::now();
    key.decrypt(&body).unwrap();
    let whole = started.elapsed();
    let mib = 64.0;
    println!(
        "stream encrypt {:.0} MiB/s, stream decrypt + SHA-256 digests {:.0} MiB/s, whole decrypt (aws-lc) {:.0} MiB/s",
        mib / enc.as_secs_f64(),
        mib / dec.as_secs_f64(),
        mib / whole.as_secs_f64()
    );
}

/// The mount hands keys and streams to other tasks and threads.
#[test]
fn keys_and_streams_can_move_between_threads() {
    fn send<T: Send>() {}
    fn shared<T: Send + Sync>() {}
    shared::<ContentKey>();
    shared::<Envelope>();
    shared::<ChunkDigests>();
    send::<NewObject>();
    send::<StreamDecryptor>();
    send::<StreamEncryptor>();
    send::<PendingInstructionFile>();
}
