//! The one AEAD primitive of the format, AES-256-GCM, behind two interchangeable backends.
//!
//! Why two backends: aws-lc-rs (C, assembly-optimised, FIPS lineage) is expected
//! to be fastest; the pure-Rust `aes-gcm` crate builds everywhere without a C
//! toolchain. Both must produce byte-identical output, which the known-answer
//! tests below check against the published GCM vectors. The choice between them
//! is made by an end-to-end benchmark elsewhere; [`AeadBackend::default`] is aws-lc.
//!
//! Data flow: [`AeadKey`] is the prepared (key-scheduled) form used per object;
//! the free [`seal`]/[`open`] functions prepare a key per call and exist for
//! one-shot uses (data-key wrapping) and tests. Output layout is always
//! `ciphertext || tag`; the nonce is the caller's business.
//!
//! Secrets: the `aes-gcm` key schedule is zeroed on drop (its `zeroize`
//! feature); aws-lc frees its context with `OPENSSL_free`, which cleanses memory.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// AES-GCM nonce length used by the format (the GCM-native 96 bits).
pub const NONCE_LEN: usize = 12;
/// AES-GCM authentication tag length (full 128 bits, never truncated).
pub const TAG_LEN: usize = 16;

/// Which AES-256-GCM implementation to use. Output is identical either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum AeadBackend {
    /// aws-lc-rs (C/assembly).
    #[default]
    AwsLc,
    /// The pure-Rust `aes-gcm` crate.
    RustCrypto,
}

/// Authentication failed: the ciphertext, tag, nonce, AAD or key is not the one sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("AES-GCM authentication failed")]
pub struct AeadFailed;

enum Inner {
    AwsLc(LessSafeKey),
    // Boxed: the key schedule is large and this enum is moved around.
    RustCrypto(Box<Aes256Gcm>),
}

/// A key prepared for repeated AES-256-GCM use by one backend.
pub struct AeadKey {
    inner: Inner,
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey([redacted])")
    }
}

impl AeadKey {
    /// Run the key schedule for `backend`.
    pub fn new(backend: AeadBackend, key: &[u8; 32]) -> Self {
        let inner = match backend {
            AeadBackend::AwsLc => Inner::AwsLc(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key)
                    .expect("invariant broken: aws-lc rejected a 32-byte AES-256 key"),
            )),
            AeadBackend::RustCrypto => Inner::RustCrypto(Box::new(
                Aes256Gcm::new_from_slice(key)
                    .expect("invariant broken: aes-gcm rejected a 32-byte AES-256 key"),
            )),
        };
        Self { inner }
    }

    /// Append `ciphertext || tag` of `plaintext` to `out`.
    ///
    /// # Panics
    /// If `plaintext` exceeds GCM's 64 GiB message limit (chunks are 64 KiB).
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self.seal_detached(nonce, aad, &mut out[start..]);
        out.extend_from_slice(&tag);
    }

    /// Encrypt `buf` in place and return its tag (the caller's buffer: no allocation, no copy).
    ///
    /// # Panics
    /// If `buf` exceeds GCM's 64 GiB message limit (chunks are 64 KiB).
    pub fn seal_detached(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let mut t = [0u8; TAG_LEN];
        match &self.inner {
            Inner::AwsLc(key) => {
                let tag = key
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
                    .expect("invariant broken: aws-lc refused to seal a message under the GCM limit");
                t.copy_from_slice(tag.as_ref());
            }
            Inner::RustCrypto(cipher) => {
                let tag = cipher
                    .encrypt_inout_detached(&(*nonce).into(), aad, buf.into())
                    .expect("invariant broken: aes-gcm refused to seal a message under the GCM limit");
                t.copy_from_slice(&tag);
            }
        }
        t
    }

    /// Authenticate `ciphertext || tag` and append the plaintext to `out`.
    ///
    /// On failure `out` is left exactly as it was: unauthenticated plaintext is
    /// wiped and never handed back.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AeadFailed> {
        let ct_len = ciphertext_and_tag
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(AeadFailed)?;
        let start = out.len();
        out.extend_from_slice(&ciphertext_and_tag[..ct_len]);
        let result = self.open_in_place(nonce, aad, &ciphertext_and_tag[ct_len..], &mut out[start..]);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// Authenticate `ciphertext || tag` and write the plaintext to `dst`, which must be exactly as long as the
    /// ciphertext (the caller's buffer: no allocation). On failure `dst` is all zeros.
    pub fn open_to(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
        dst: &mut [u8],
    ) -> Result<(), AeadFailed> {
        if ciphertext_and_tag.len() != dst.len() + TAG_LEN {
            dst.fill(0);
            return Err(AeadFailed);
        }
        let (ciphertext, tag) = ciphertext_and_tag.split_at(dst.len());
        dst.copy_from_slice(ciphertext);
        self.open_in_place(nonce, aad, tag, dst)
    }

    /// Authenticate the ciphertext in `buf` with its detached `tag` and decrypt it in place. On failure `buf` is
    /// all zeros.
    pub fn open_detached(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadFailed> {
        self.open_in_place(nonce, aad, tag, buf)
    }

    /// Decrypts `buf` in place if `tag` authenticates it; otherwise zeroes it.
    fn open_in_place(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], tag: &[u8], buf: &mut [u8]) -> Result<(), AeadFailed> {
        let result = match &self.inner {
            Inner::AwsLc(key) => key
                .open_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), tag, buf)
                .map(|_| ())
                .map_err(|_| AeadFailed),
            Inner::RustCrypto(cipher) => match aes_gcm::aead::Tag::<Aes256Gcm>::try_from(tag) {
                Ok(tag) => cipher
                    .decrypt_inout_detached(&(*nonce).into(), aad, buf.into(), &tag)
                    .map_err(|_| AeadFailed),
                Err(_) => Err(AeadFailed),
            },
        };
        if result.is_err() {
            buf.fill(0);
        }
        result
    }
}

/// One-shot seal: append `ciphertext || tag` to `out`. See [`AeadKey::seal`].
pub fn seal(
    backend: AeadBackend,
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) {
    AeadKey::new(backend, key).seal(nonce, aad, plaintext, out);
}

/// One-shot open: append the plaintext to `out`. See [`AeadKey::open`].
pub fn open(
    backend: AeadBackend,
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), AeadFailed> {
    AeadKey::new(backend, key).open(nonce, aad, ciphertext_and_tag, out)
}

/// Seal `chunks` chunks of `chunk_len` bytes and return the elapsed time.
///
/// For benchmarks that want the raw AEAD cost without the format around it;
/// the backend decision itself is made end to end elsewhere.
pub fn time_seal(backend: AeadBackend, chunk_len: usize, chunks: usize) -> std::time::Duration {
    let key = AeadKey::new(backend, &[7u8; 32]);
    let plaintext = vec![0x5au8; chunk_len];
    let mut out = Vec::with_capacity(chunk_len + TAG_LEN);
    let started = std::time::Instant::now();
    for i in 0..chunks {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        out.clear();
        key.seal(&nonce, b"bench", &plaintext, &mut out);
        std::hint::black_box(&out);
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKENDS: [AeadBackend; 2] = [AeadBackend::AwsLc, AeadBackend::RustCrypto];

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    struct Kat {
        name: &'static str,
        key: &'static str,
        iv: &'static str,
        aad: &'static str,
        pt: &'static str,
        ct: &'static str,
        tag: &'static str,
    }

    // McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 13-16 (AES-256).
    const KATS: &[Kat] = &[
        Kat {
            name: "GCM test case 13",
            key: "0000000000000000000000000000000000000000000000000000000000000000",
            iv: "000000000000000000000000",
            aad: "",
            pt: "",
            ct: "",
            tag: "530f8afbc74536b9a963b4f1c4cb738b",
        },
        Kat {
            name: "GCM test case 14",
            key: "0000000000000000000000000000000000000000000000000000000000000000",
            iv: "000000000000000000000000",
            aad: "",
            pt: "00000000000000000000000000000000",
            ct: "cea7403d4d606b6e074ec5d3baf39d18",
            tag: "d0d1c8a799996bf0265b98b5d48ab919",
        },
        Kat {
            name: "GCM test case 15",
            key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            iv: "cafebabefacedbaddecaf888",
            aad: "",
            pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
                 1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
            ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
                 8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
            tag: "b094dac5d93471bdec1a502270e3cc6c",
        },
        Kat {
            name: "GCM test case 16",
            key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            iv: "cafebabefacedbaddecaf888",
            aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
                 1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
            ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
                 8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            tag: "76fc6ece0f4e1768cddf8853bb2d551b",
        },
    ];

    #[test]
    fn known_answers_on_both_backends() {
        for kat in KATS {
            let key: [u8; 32] = unhex(kat.key).try_into().unwrap();
            let iv: [u8; 12] = unhex(kat.iv).try_into().unwrap();
            let (aad, pt) = (unhex(kat.aad), unhex(kat.pt));
            let mut expected = unhex(kat.ct);
            expected.extend(unhex(kat.tag));
            for backend in BACKENDS {
                let mut sealed = vec![0xee]; // seal must append, not overwrite
                seal(backend, &key, &iv, &aad, &pt, &mut sealed);
                assert_eq!(
                    &sealed[1..],
                    &expected[..],
                    "{} seal on {backend:?}",
                    kat.name
                );
                let mut opened = vec![0xee];
                open(backend, &key, &iv, &aad, &expected, &mut opened).unwrap();
                assert_eq!(&opened[1..], &pt[..], "{} open on {backend:?}", kat.name);
            }
        }
    }

    #[test]
    fn failed_open_leaves_output_untouched_on_both_backends() {
        let key = [3u8; 32];
        let nonce = [4u8; 12];
        for backend in BACKENDS {
            let mut sealed = Vec::new();
            seal(
                backend,
                &key,
                &nonce,
                b"aad",
                b"secret plaintext",
                &mut sealed,
            );
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x01;
                let mut out = b"prefix".to_vec();
                assert_eq!(
                    open(backend, &key, &nonce, b"aad", &bad, &mut out),
                    Err(AeadFailed)
                );
                assert_eq!(out, b"prefix");
            }
            let mut out = Vec::new();
            assert_eq!(
                open(backend, &key, &nonce, b"aaD", &sealed, &mut out),
                Err(AeadFailed)
            );
            assert_eq!(
                open(backend, &key, &[5u8; 12], b"aad", &sealed, &mut out),
                Err(AeadFailed)
            );
            assert_eq!(
                open(backend, &[9u8; 32], &nonce, b"aad", &sealed, &mut out),
                Err(AeadFailed)
            );
            assert_eq!(
                open(backend, &key, &nonce, b"aad", &sealed[..15], &mut out),
                Err(AeadFailed)
            );
            assert!(out.is_empty());
        }
    }

    proptest::proptest! {
        #[test]
        fn backends_are_byte_identical(
            key in proptest::array::uniform32(proptest::num::u8::ANY),
            nonce in proptest::array::uniform12(proptest::num::u8::ANY),
            aad in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            pt in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            seal(AeadBackend::AwsLc, &key, &nonce, &aad, &pt, &mut a);
            seal(AeadBackend::RustCrypto, &key, &nonce, &aad, &pt, &mut b);
            proptest::prop_assert_eq!(&a, &b);
            let mut back = Vec::new();
            open(AeadBackend::RustCrypto, &key, &nonce, &aad, &a, &mut back).unwrap();
            proptest::prop_assert_eq!(back, pt);
        }
    }

    /// `cargo test --release --lib crypto::aead -- --ignored --nocapture`
    #[test]
    #[ignore = "throughput print, not a correctness test"]
    fn print_seal_throughput() {
        for backend in BACKENDS {
            let chunks = 2048; // 128 MiB
            let elapsed = time_seal(backend, 65536, chunks);
            let mib = (chunks * 65536) as f64 / (1024.0 * 1024.0);
            println!("{backend:?}: {:.0} MiB/s", mib / elapsed.as_secs_f64());
        }
    }
}
