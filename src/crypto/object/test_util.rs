//! What the format version 2 and 3 tests share: keys, patterns, hex, both-backend decryption, chunk ranges and
//! the fixed values of the golden fixtures.

use super::*;
use crate::crypto::version::VersionId;
use std::ops::Range;

pub const BACKENDS: [AeadBackend; 2] = [AeadBackend::AwsLc, AeadBackend::RustCrypto];

pub fn history(byte: u8) -> KeyHistory {
    KeyHistory::single(Key256::from_bytes(&[byte; 32]))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

pub fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(0x9e37_79b9).to_be_bytes()[5] ^ salt).collect()
}

pub fn vid(b: u8) -> VersionId {
    VersionId([b; 16])
}

/// Decrypts with both AEAD backends, which must agree.
pub fn decrypt(keys: &KeyHistory, object: &[u8], map: Option<&str>) -> Result<Vec<u8>, CryptoError> {
    let aws = decrypt_object_with_map(keys, AeadBackend::AwsLc, object, map);
    assert_eq!(aws, decrypt_object_with_map(keys, AeadBackend::RustCrypto, object, map), "backends disagree");
    aws
}

/// Where chunk `index` lies in `object`.
pub fn range_of(index: u64, object: &[u8]) -> Range<usize> {
    let r = chunk_cipher_range(index, plain_size(object.len() as u64).unwrap());
    r.start as usize..r.end as usize
}

pub const FIXED_KEK: [u8; 32] = [0x11; 32];
pub const FIXED_DATA_KEY: [u8; 32] = [0x22; 32];
pub const FIXED_FILE_ID: [u8; 16] = [0x33; 16];
pub const FIXED_WRAP_NONCE: [u8; 12] = [0x44; 12];
pub const FIXED_CHUNK_NONCE: [u8; 12] = [0x55; 12];
