//! The write journal's cryptography: key derivation, sealed records and the slots of staged files.
//!
//! Why the journal is encrypted: a file being written is staged whole on local disk until it is uploaded, and after
//! a crash it stays there until the next start uploads it. In the client-side modes (and sse-c) no byte of file
//! content may rest on local disk in plaintext, so staged content is sealed slot by slot, and the recovery records
//! that say where it belongs are sealed too, so that a planted or edited record is refused rather than obeyed.
//!
//! Pure like the rest of `crypto`: keys and bytes in, bytes out. docs/FORMAT.md ("The write journal") has the byte
//! tables; the I/O lives in `crate::journal`.
//!
//! Keys, from the root key (a customer key, a KMS data key, or a journal's local key file):
//! - journal key   = HMAC-SHA256(root, `"s3cryptfs-journal-key-v1" 0x00 store 0x00 run_id`)
//! - check value   = HMAC-SHA256(journal key, `"s3cryptfs-journal-check-v1"`)[..16], kept in the journal's header so
//!   the right root key is recognised without trying to open records with a wrong one
//! - file key      = HMAC-SHA256(journal key, `"s3cryptfs-journal-file-v1" file_id`), one per staged file
//!
//! Nonces: a record gets 96 random bits (records are rewritten a handful of times). A staged file's slots get a
//! per-file counter that starts at 1: every staged file has a fresh random `file_id`, so its key is used by one
//! process only and a counter never repeats under it. The all-zero nonce is never used; a slot whose nonce is all
//! zero is a hole (never written: a sparse extension of the file) and reads as zeros.

use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::aead::{AeadBackend, AeadFailed, AeadKey, NONCE_LEN, TAG_LEN};
use super::secret::{fill_random, JournalKey, KEY_LEN};

/// Plaintext bytes per slot of a staged file. A page: aligned 4 KiB writes (the common case for editors, databases
/// and `dd`) rewrite whole slots without reading them first, and a small random write re-seals only 4 KiB.
pub const SLOT_PLAIN_LEN: u64 = 4096;
/// Bytes a slot adds to its plaintext: its nonce and its tag.
pub const SLOT_OVERHEAD: u64 = (NONCE_LEN + TAG_LEN) as u64;
/// Stored length of a full slot.
pub const SLOT_LEN: u64 = SLOT_PLAIN_LEN + SLOT_OVERHEAD;
/// Length of a staged file's random identifier.
pub const FILE_ID_LEN: usize = 16;
/// Length of a journal's check value.
pub const CHECK_LEN: usize = 16;

const KEY_DOMAIN: &[u8] = b"s3cryptfs-journal-key-v1";
const CHECK_DOMAIN: &[u8] = b"s3cryptfs-journal-check-v1";
const FILE_DOMAIN: &[u8] = b"s3cryptfs-journal-file-v1";
const RECORD_DOMAIN: &[u8] = b"s3cryptfs-journal-record-v1";
const SLOT_DOMAIN: &[u8] = b"s3cryptfs-journal-slot-v1";
/// A slot's additional data: domain, file id, slot index (big-endian u64).
const SLOT_AAD_LEN: usize = SLOT_DOMAIN.len() + FILE_ID_LEN + 8;

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of the concatenated `parts` (also the disk cache's key derivation, `crypto::diskcache`).
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("invariant broken: HMAC rejected a key length");
    for p in parts {
        mac.update(p);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// The key of journal `run_id` of `store` under `root`.
pub fn derive_journal_key(root: &[u8; KEY_LEN], store: &str, run_id: &str) -> JournalKey {
    let k = hmac(root, &[KEY_DOMAIN, &[0], store.as_bytes(), &[0], run_id.as_bytes()]);
    JournalKey::from_bytes(&k)
}

/// The check value that identifies a journal key without revealing it.
pub fn journal_check(key: &JournalKey) -> [u8; CHECK_LEN] {
    let k = hmac(key.as_bytes(), &[CHECK_DOMAIN]);
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&k[..CHECK_LEN]);
    out
}

fn record_aad(store: &str, run_id: &str, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(RECORD_DOMAIN.len() + store.len() + run_id.len() + name.len() + 3);
    for (i, part) in [RECORD_DOMAIN, store.as_bytes(), run_id.as_bytes(), name.as_bytes()].iter().enumerate() {
        if i > 0 {
            aad.push(0);
        }
        aad.extend_from_slice(part);
    }
    aad
}

/// Seals a record: `nonce (12) || ciphertext || tag (16)`, bound to its store, its journal and its own name (so a
/// record moved to another name, journal or store fails to open).
pub fn seal_record(key: &JournalKey, aead: AeadBackend, store: &str, run_id: &str, name: &str, plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    AeadKey::new(aead, key.as_bytes()).seal(&nonce, &record_aad(store, run_id, name), plain, &mut out);
    out
}

/// Opens a record sealed by [`seal_record`] with the same store, journal and name.
pub fn open_record(
    key: &JournalKey,
    aead: AeadBackend,
    store: &str,
    run_id: &str,
    name: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AeadFailed> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(AeadFailed);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| AeadFailed)?;
    let mut out = Zeroizing::new(Vec::with_capacity(body.len()));
    AeadKey::new(aead, key.as_bytes()).open(&nonce, &record_aad(store, run_id, name), body, &mut out)?;
    Ok(out)
}

/// A fresh random staged-file identifier.
pub fn new_file_id() -> [u8; FILE_ID_LEN] {
    let mut id = [0u8; FILE_ID_LEN];
    fill_random(&mut id);
    id
}

/// Seals and opens the slots of one staged file.
///
/// Slot `i` holds plaintext bytes `i * SLOT_PLAIN_LEN ..` and is stored at `i * SLOT_LEN` as
/// `nonce (12) || ciphertext || tag (16)`, authenticated with the file id and `i`, so slots cannot be moved within a
/// file or between files. Every slot but the last holds `SLOT_PLAIN_LEN` bytes; the last one's length follows from
/// the file's length (see [`plain_len`]).
pub struct SlotCipher {
    key: AeadKey,
    file_id: [u8; FILE_ID_LEN],
    counter: AtomicU64,
}

impl std::fmt::Debug for SlotCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotCipher([redacted])")
    }
}

impl SlotCipher {
    pub fn new(journal: &JournalKey, aead: AeadBackend, file_id: [u8; FILE_ID_LEN]) -> SlotCipher {
        let k = hmac(journal.as_bytes(), &[FILE_DOMAIN, &file_id]);
        SlotCipher { key: AeadKey::new(aead, &k), file_id, counter: AtomicU64::new(1) }
    }

    pub fn file_id(&self) -> &[u8; FILE_ID_LEN] {
        &self.file_id
    }

    fn aad(&self, index: u64) -> [u8; SLOT_AAD_LEN] {
        const D: usize = SLOT_DOMAIN.len();
        let mut aad = [0u8; SLOT_AAD_LEN];
        aad[..D].copy_from_slice(SLOT_DOMAIN);
        aad[D..D + FILE_ID_LEN].copy_from_slice(&self.file_id);
        aad[D + FILE_ID_LEN..].copy_from_slice(&index.to_be_bytes());
        aad
    }

    /// Appends the stored form of slot `index` holding `plain` (at most `SLOT_PLAIN_LEN` bytes) to `out`.
    pub fn seal(&self, index: u64, plain: &[u8], out: &mut Vec<u8>) {
        debug_assert!(plain.len() as u64 <= SLOT_PLAIN_LEN);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&nonce);
        self.key.seal(&nonce, &self.aad(index), plain, out);
    }

    /// Appends the plaintext of stored slot `index` to `out`. A hole (all-zero nonce) reads as zeros.
    pub fn open(&self, index: u64, stored: &[u8], out: &mut Vec<u8>) -> Result<(), AeadFailed> {
        if (stored.len() as u64) < SLOT_OVERHEAD {
            return Err(AeadFailed);
        }
        let (nonce, body) = stored.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| AeadFailed)?;
        if nonce == [0u8; NONCE_LEN] {
            // A hole is all zeros, tag included: anything else under a zero nonce was written there by someone else.
            if body.iter().any(|&b| b != 0) {
                return Err(AeadFailed);
            }
            out.resize(out.len() + body.len() - TAG_LEN, 0);
            return Ok(());
        }
        self.key.open(&nonce, &self.aad(index), body, out)
    }

    /// Writes the plaintext of stored slot `index` to `dst`, which must be as long as the slot's plaintext (no
    /// allocation). A hole reads as zeros; on failure `dst` is all zeros.
    pub fn open_to(&self, index: u64, stored: &[u8], dst: &mut [u8]) -> Result<(), AeadFailed> {
        if stored.len() != dst.len() + SLOT_OVERHEAD as usize {
            dst.fill(0);
            return Err(AeadFailed);
        }
        let (nonce, body) = stored.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| AeadFailed)?;
        if nonce == [0u8; NONCE_LEN] {
            dst.fill(0);
            // As in `open`: a hole is all zeros.
            return if body.iter().any(|&b| b != 0) { Err(AeadFailed) } else { Ok(()) };
        }
        self.key.open_to(&nonce, &self.aad(index), body, dst)
    }
}

/// Stored length of a staged file holding `plain` bytes.
pub fn stored_len(plain: u64) -> u64 {
    if plain == 0 {
        return 0;
    }
    let slots = plain.div_ceil(SLOT_PLAIN_LEN);
    plain + slots * SLOT_OVERHEAD
}

/// Plaintext length of a staged file whose stored length is `stored`; `None` if no plaintext length gives it (a
/// torn or truncated file).
pub fn plain_len(stored: u64) -> Option<u64> {
    if stored == 0 {
        return Some(0);
    }
    let full = stored / SLOT_LEN;
    let rest = stored % SLOT_LEN;
    match rest {
        0 => Some(full * SLOT_PLAIN_LEN),
        r if r > SLOT_OVERHEAD => Some(full * SLOT_PLAIN_LEN + (r - SLOT_OVERHEAD)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> JournalKey {
        derive_journal_key(&[7u8; 32], "s3://b/p", "0123")
    }

    #[test]
    fn records_open_only_where_they_were_sealed() {
        let k = key();
        let sealed = seal_record(&k, AeadBackend::AwsLc, "s3://b/p", "0123", "5", b"record");
        assert_eq!(&open_record(&k, AeadBackend::RustCrypto, "s3://b/p", "0123", "5", &sealed).unwrap()[..], b"record");
        assert!(open_record(&k, AeadBackend::AwsLc, "s3://b/q", "0123", "5", &sealed).is_err(), "other store");
        assert!(open_record(&k, AeadBackend::AwsLc, "s3://b/p", "0124", "5", &sealed).is_err(), "other journal");
        assert!(open_record(&k, AeadBackend::AwsLc, "s3://b/p", "0123", "6", &sealed).is_err(), "other name");
        let other = derive_journal_key(&[8u8; 32], "s3://b/p", "0123");
        assert!(open_record(&other, AeadBackend::AwsLc, "s3://b/p", "0123", "5", &sealed).is_err(), "other key");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open_record(&k, AeadBackend::AwsLc, "s3://b/p", "0123", "5", &bad).is_err(), "bit flip at {i}");
        }
        assert!(open_record(&k, AeadBackend::AwsLc, "s3://b/p", "0123", "5", &sealed[..27]).is_err());
    }

    #[test]
    fn journal_keys_differ_by_store_run_and_root() {
        let a = journal_check(&derive_journal_key(&[1; 32], "s3://b", "r1"));
        assert_ne!(a, journal_check(&derive_journal_key(&[1; 32], "s3://c", "r1")));
        assert_ne!(a, journal_check(&derive_journal_key(&[1; 32], "s3://b", "r2")));
        assert_ne!(a, journal_check(&derive_journal_key(&[2; 32], "s3://b", "r1")));
        assert_eq!(a, journal_check(&derive_journal_key(&[1; 32], "s3://b", "r1")));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            journal_check(&derive_journal_key(&[1; 32], "ab", "c")),
            journal_check(&derive_journal_key(&[1; 32], "a", "bc"))
        );
    }

    #[test]
    fn slots_round_trip_and_refuse_moves_and_flips() {
        let k = key();
        let c = SlotCipher::new(&k, AeadBackend::AwsLc, [3; FILE_ID_LEN]);
        let mut s = Vec::new();
        c.seal(4, b"hello", &mut s);
        assert_eq!(s.len() as u64, 5 + SLOT_OVERHEAD);
        let mut out = Vec::new();
        c.open(4, &s, &mut out).unwrap();
        assert_eq!(out, b"hello");
        assert!(c.open(5, &s, &mut Vec::new()).is_err(), "moved to another index");
        let other = SlotCipher::new(&k, AeadBackend::AwsLc, [4; FILE_ID_LEN]);
        assert!(other.open(4, &s, &mut Vec::new()).is_err(), "moved to another file");
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x80;
            assert!(c.open(4, &bad, &mut Vec::new()).is_err(), "bit flip at {i}");
        }
        // Fresh nonces: sealing the same slot twice never gives the same bytes.
        let mut s2 = Vec::new();
        c.seal(4, b"hello", &mut s2);
        assert_ne!(s, s2);
        // Straight into the caller's buffer: the same plaintext, the same refusals.
        let mut dst = [0u8; 5];
        c.open_to(4, &s, &mut dst).unwrap();
        assert_eq!(&dst, b"hello");
        assert!(c.open_to(5, &s, &mut dst).is_err() && dst == [0; 5], "moved, or not wiped");
        assert!(c.open_to(4, &s, &mut [0u8; 4]).is_err(), "wrong length");
        let mut bad = s.clone();
        bad[20] ^= 1;
        assert!(c.open_to(4, &bad, &mut dst).is_err());
        // A hole reads as zeros.
        let hole = vec![0u8; 10 + SLOT_OVERHEAD as usize];
        let mut out = Vec::new();
        c.open(9, &hole, &mut out).unwrap();
        assert_eq!(out, vec![0u8; 10]);
        // A zero nonce over anything but zeros is no hole: someone wrote it, and it fails.
        let mut forged = hole.clone();
        forged[NONCE_LEN + 3] = 1;
        assert!(c.open(9, &forged, &mut Vec::new()).is_err(), "a forged hole was accepted");
        assert!(c.open_to(9, &forged, &mut [0u8; 10]).is_err(), "a forged hole was accepted by open_to");
    }

    #[test]
    fn stored_and_plain_lengths_are_inverse() {
        for plain in [0, 1, 4095, 4096, 4097, 8192, 1 << 20, (1 << 20) + 3] {
            assert_eq!(plain_len(stored_len(plain)), Some(plain), "{plain}");
        }
        assert_eq!(stored_len(4096), SLOT_LEN);
        assert_eq!(stored_len(1), 1 + SLOT_OVERHEAD);
        // A slot cut inside its overhead is no valid length.
        assert_eq!(plain_len(SLOT_LEN + 5), None);
        assert_eq!(plain_len(SLOT_OVERHEAD), None);
    }
}
