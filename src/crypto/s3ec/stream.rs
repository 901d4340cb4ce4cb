//! Streaming AES-256-GCM for whole-object S3EC bodies, and per-chunk digests.
//!
//! Why it is built from parts: an S3EC object is one GCM message of up to 64 GiB, and neither
//! aws-lc-rs nor the `aes-gcm` crate decrypts GCM incrementally (both want the whole message and
//! its tag at once). GCM is AES-CTR plus GHASH, so this module runs the two itself (`aes` + `ctr`,
//! `ghash`, the crates `aes-gcm` is built from): counter blocks start at `J0 + 1 = nonce ‖
//! 00000002`, GHASH covers `AAD ‖ pad ‖ C ‖ pad ‖ len(AAD)·8 ‖ len(C)·8`, and the tag is
//! `E(K, J0) ⊕ GHASH`. Tests check it against the published GCM vectors, the one-shot AEAD and
//! the S3EC vectors for every split of the input.
//!
//! The decryptor cannot know where the body ends, so it holds back the last 16 bytes it has
//! seen (the tag, once the stream ends). Plaintext it hands out before [`StreamDecryptor::finish`]
//! returns `Ok` is **unverified**: a caller must keep it away from readers (the mount writes it to
//! its cache and serves it only after `finish`), and discard it if `finish` fails. A truncated
//! stream fails `finish`: its last 16 bytes are not the tag of what came before.
//!
//! Chunk digests (issue 12 §7.2 B): while it streams, the decryptor can record SHA-256 of every
//! `chunk_len` bytes of ciphertext (or plaintext). [`StreamVerified::digests`] hands them out only
//! after the tag verified, so they form an authenticated index: a later random read fetches a
//! chunk, checks it with [`ChunkDigests::verify`] and decrypts it with CTR
//! (`ContentKey::apply_keystream_at`) without reading the whole object again.

use std::ops::Range;

use aes::Aes256;
use ctr::cipher::{BlockCipherEncrypt, KeyInit, KeyIvInit, StreamCipher};
use ghash::universal_hash::UniversalHash;
use ghash::GHash;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::super::aead::NONCE_LEN;
use super::super::secret::KEY_LEN;
use super::content::{MAX_PLAINTEXT_LEN, TAG_LEN};
use super::error::S3ecError;

/// GCM and AES block size.
const BLOCK: usize = 16;

/// Default digest chunk: 64 KiB, the same granularity as s3cryptfs's own chunks; 32 bytes of
/// SHA-256 per chunk is 0.05 % of the object.
pub const DEFAULT_DIGEST_CHUNK_LEN: u64 = 64 * 1024;

/// The GCM state of one message being encrypted or decrypted in order.
struct Gcm {
    ctr: ctr::Ctr32BE<Aes256>,
    ghash: GHash,
    tag_mask: Zeroizing<[u8; BLOCK]>,
    /// Ciphertext not yet hashed: GHASH takes whole blocks, the input comes in any sizes.
    pending: [u8; BLOCK],
    pending_len: usize,
    aad_len: u64,
    text_len: u64,
}

impl Gcm {
    fn new(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], aad: &[u8]) -> Gcm {
        let aes = Aes256::new(key.into());
        let mut h = ghash::Key::default();
        aes.encrypt_block(&mut h);
        let mut ghash = GHash::new(&h);
        h.as_mut_slice().zeroize();
        ghash.update_padded(aad);

        let mut j0 = [0u8; BLOCK];
        j0[..NONCE_LEN].copy_from_slice(nonce);
        j0[BLOCK - 1] = 1;
        let mut mask = ghash::Block::from(j0);
        aes.encrypt_block(&mut mask);
        let mut tag_mask = Zeroizing::new([0u8; BLOCK]);
        tag_mask.copy_from_slice(&mask);
        mask.as_mut_slice().zeroize();

        let mut first = j0;
        first[BLOCK - 1] = 2; // inc32(J0): the first content block
        Gcm {
            ctr: ctr::Ctr32BE::<Aes256>::new(key.into(), &first.into()),
            ghash,
            tag_mask,
            pending: [0u8; BLOCK],
            pending_len: 0,
            aad_len: aad.len() as u64,
            text_len: 0,
        }
    }

    /// Refuse before `more` bytes would take the message past the GCM limit (where the 32-bit
    /// counter would wrap onto the tag mask).
    fn check_room(&self, more: usize) -> Result<(), S3ecError> {
        let len = self.text_len.saturating_add(more as u64);
        if len > MAX_PLAINTEXT_LEN {
            return Err(S3ecError::TooLarge {
                len,
                max: MAX_PLAINTEXT_LEN,
            });
        }
        Ok(())
    }

    /// Feed ciphertext to GHASH.
    fn hash(&mut self, mut data: &[u8]) {
        self.text_len += data.len() as u64;
        if self.pending_len > 0 {
            let take = (BLOCK - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < BLOCK {
                return;
            }
            self.ghash.update_padded(&self.pending);
            self.pending_len = 0;
        }
        let whole = data.len() - data.len() % BLOCK;
        self.ghash.update_padded(&data[..whole]);
        let rest = &data[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn keystream(&mut self, buf: &mut [u8]) {
        self.ctr.apply_keystream(buf);
    }

    fn tag(self) -> Zeroizing<[u8; BLOCK]> {
        let Gcm {
            mut ghash,
            tag_mask,
            pending,
            pending_len,
            aad_len,
            text_len,
            ..
        } = self;
        ghash.update_padded(&pending[..pending_len]);
        let mut lengths = [0u8; BLOCK];
        lengths[..8].copy_from_slice(&(aad_len * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(text_len * 8).to_be_bytes());
        ghash.update_padded(&lengths);
        let mut s = ghash.finalize();
        let mut tag = Zeroizing::new([0u8; BLOCK]);
        for ((t, s), m) in tag.iter_mut().zip(s.iter()).zip(tag_mask.iter()) {
            *t = s ^ m;
        }
        s.as_mut_slice().zeroize();
        tag
    }
}

/// What chunk digests cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestOver {
    /// The stored bytes: check a fetched range before decrypting it.
    Ciphertext,
    /// The decrypted bytes: check plaintext pages read back from a cache.
    Plaintext,
}

/// How to cut the body into digested chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DigestSpec {
    chunk_len: u64,
    over: DigestOver,
}

impl DigestSpec {
    /// Chunks of `chunk_len` bytes (a positive multiple of 16, so every chunk starts on a CTR
    /// block and decrypts on its own), digests over `over`.
    pub fn new(chunk_len: u64, over: DigestOver) -> Result<DigestSpec, S3ecError> {
        if chunk_len == 0 || chunk_len % BLOCK as u64 != 0 {
            return Err(S3ecError::InvalidChunkLen { len: chunk_len });
        }
        Ok(DigestSpec { chunk_len, over })
    }

    /// Bytes per chunk (the last chunk may be shorter).
    pub fn chunk_len(&self) -> u64 {
        self.chunk_len
    }

    /// What the digests cover.
    pub fn over(&self) -> DigestOver {
        self.over
    }
}

impl Default for DigestSpec {
    /// 64 KiB of ciphertext.
    fn default() -> Self {
        DigestSpec {
            chunk_len: DEFAULT_DIGEST_CHUNK_LEN,
            over: DigestOver::Ciphertext,
        }
    }
}

/// SHA-256 of every chunk of one object's content (ciphertext without the tag, or plaintext; the
/// two have the same length and offsets). An empty object has no chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkDigests {
    spec: DigestSpec,
    content_len: u64,
    digests: Vec<[u8; 32]>,
}

impl ChunkDigests {
    /// How the content was cut.
    pub fn spec(&self) -> DigestSpec {
        self.spec
    }

    /// The plaintext length (= the body length without the tag).
    pub fn content_len(&self) -> u64 {
        self.content_len
    }

    /// One SHA-256 per chunk, in order.
    pub fn digests(&self) -> &[[u8; 32]] {
        &self.digests
    }

    /// Byte range of chunk `chunk` in the content (and in the body), if it exists.
    pub fn chunk_range(&self, chunk: u64) -> Option<Range<u64>> {
        if chunk >= self.digests.len() as u64 {
            return None;
        }
        let start = chunk * self.spec.chunk_len;
        Some(start..(start + self.spec.chunk_len).min(self.content_len))
    }

    /// Check that `bytes` are exactly chunk `chunk` as it was when the digests were made.
    pub fn verify(&self, chunk: u64, bytes: &[u8]) -> Result<(), S3ecError> {
        let matches = self.chunk_range(chunk).is_some_and(|range| {
            range.end - range.start == bytes.len() as u64
                && Sha256::digest(bytes).as_slice() == self.digests[chunk as usize]
        });
        if matches {
            Ok(())
        } else {
            Err(S3ecError::ChunkDigestMismatch { chunk })
        }
    }
}

/// Cuts a byte stream into chunks and hashes each.
struct Digester {
    spec: DigestSpec,
    current: Sha256,
    filled: u64,
    total: u64,
    digests: Vec<[u8; 32]>,
}

impl Digester {
    fn new(spec: DigestSpec) -> Digester {
        Digester {
            spec,
            current: Sha256::new(),
            filled: 0,
            total: 0,
            digests: Vec::new(),
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.spec.chunk_len - self.filled;
            let take = usize::try_from(room).map_or(data.len(), |room| room.min(data.len()));
            self.current.update(&data[..take]);
            self.filled += take as u64;
            self.total += take as u64;
            data = &data[take..];
            if self.filled == self.spec.chunk_len {
                self.digests.push(self.current.finalize_reset().into());
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> ChunkDigests {
        if self.filled > 0 {
            self.digests.push(self.current.finalize().into());
        }
        ChunkDigests {
            spec: self.spec,
            content_len: self.total,
            digests: self.digests,
        }
    }
}

/// Decrypts an object body (`ciphertext ‖ tag`) fed in order in pieces of any size.
///
/// Everything [`update`](Self::update) appends is unverified until [`finish`](Self::finish)
/// returns `Ok`; see the module documentation.
pub struct StreamDecryptor {
    gcm: Gcm,
    /// The last bytes seen: the tag, if the stream ends here.
    held: [u8; TAG_LEN],
    held_len: usize,
    digester: Option<Digester>,
}

impl std::fmt::Debug for StreamDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecryptor")
            .field("content_bytes", &self.gcm.text_len)
            .finish_non_exhaustive()
    }
}

impl StreamDecryptor {
    pub(crate) fn new(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], aad: &[u8]) -> Self {
        StreamDecryptor {
            gcm: Gcm::new(key, nonce, aad),
            held: [0u8; TAG_LEN],
            held_len: 0,
            digester: None,
        }
    }

    /// Also record chunk digests, handed out by [`StreamVerified::digests`].
    pub fn with_digests(mut self, spec: DigestSpec) -> Self {
        self.digester = Some(Digester::new(spec));
        self
    }

    /// Feed the next `body` bytes; append the plaintext they complete to `unverified_plaintext`
    /// (lagging 16 bytes behind the input). Fails only when the body would exceed the GCM limit.
    pub fn update(
        &mut self,
        body: &[u8],
        unverified_plaintext: &mut Vec<u8>,
    ) -> Result<(), S3ecError> {
        let total = self.held_len + body.len();
        if total <= TAG_LEN {
            self.held[self.held_len..total].copy_from_slice(body);
            self.held_len = total;
            return Ok(());
        }
        let release = total - TAG_LEN;
        self.gcm.check_room(release)?;
        let held = self.held;
        let from_held = release.min(self.held_len);
        let from_body = release - from_held;
        unverified_plaintext.reserve(release);
        self.release(&held[..from_held], unverified_plaintext);
        self.release(&body[..from_body], unverified_plaintext);
        let kept = &held[from_held..self.held_len];
        self.held[..kept.len()].copy_from_slice(kept);
        self.held[kept.len()..].copy_from_slice(&body[from_body..]);
        self.held_len = TAG_LEN;
        Ok(())
    }

    fn release(&mut self, ciphertext: &[u8], out: &mut Vec<u8>) {
        if ciphertext.is_empty() {
            return;
        }
        self.gcm.hash(ciphertext);
        if let Some(d) = self
            .digester
            .as_mut()
            .filter(|d| d.spec.over == DigestOver::Ciphertext)
        {
            d.feed(ciphertext);
        }
        let start = out.len();
        out.extend_from_slice(ciphertext);
        self.gcm.keystream(&mut out[start..]);
        if let Some(d) = self
            .digester
            .as_mut()
            .filter(|d| d.spec.over == DigestOver::Plaintext)
        {
            d.feed(&out[start..]);
        }
    }

    /// Body bytes fed so far.
    pub fn bytes_in(&self) -> u64 {
        self.gcm.text_len + self.held_len as u64
    }

    /// End of the body: check the tag. `Ok` means every byte `update` produced is authentic and
    /// complete; any error means none of it may be used.
    pub fn finish(self) -> Result<StreamVerified, S3ecError> {
        if self.held_len < TAG_LEN {
            return Err(S3ecError::Truncated {
                len: self.bytes_in(),
            });
        }
        let plain_len = self.gcm.text_len;
        let expected = self.gcm.tag();
        if !bool::from(expected.ct_eq(&self.held)) {
            return Err(S3ecError::AuthenticationFailed);
        }
        Ok(StreamVerified {
            plain_len,
            digests: self.digester.map(Digester::finish),
        })
    }
}

/// The report of a body whose tag verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamVerified {
    plain_len: u64,
    digests: Option<ChunkDigests>,
}

impl StreamVerified {
    /// Plaintext bytes produced.
    pub fn plain_len(&self) -> u64 {
        self.plain_len
    }

    /// The chunk digests, if they were asked for: now an authenticated index.
    pub fn digests(&self) -> Option<&ChunkDigests> {
        self.digests.as_ref()
    }

    /// The chunk digests, by value.
    pub fn into_digests(self) -> Option<ChunkDigests> {
        self.digests
    }
}

/// Encrypts content fed in order (for example part by part of a multipart upload) into the
/// object body: every `update` appends exactly as many ciphertext bytes as it was given
/// plaintext, and [`finish`](Self::finish) appends the 16-byte tag, which ends the last part.
pub struct StreamEncryptor {
    gcm: Gcm,
    digester: Option<Digester>,
}

impl std::fmt::Debug for StreamEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncryptor")
            .field("content_bytes", &self.gcm.text_len)
            .finish_non_exhaustive()
    }
}

impl StreamEncryptor {
    pub(crate) fn new(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], aad: &[u8]) -> Self {
        StreamEncryptor {
            gcm: Gcm::new(key, nonce, aad),
            digester: None,
        }
    }

    /// Also record chunk digests of what is written (an index for the object's first read).
    pub fn with_digests(mut self, spec: DigestSpec) -> Self {
        self.digester = Some(Digester::new(spec));
        self
    }

    /// Encrypt the next `plaintext` bytes, appending the ciphertext to `out`. EFBIG (and nothing
    /// appended) when the content would pass [`MAX_PLAINTEXT_LEN`].
    pub fn update(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), S3ecError> {
        self.gcm.check_room(plaintext.len())?;
        if let Some(d) = self
            .digester
            .as_mut()
            .filter(|d| d.spec.over == DigestOver::Plaintext)
        {
            d.feed(plaintext);
        }
        let start = out.len();
        out.extend_from_slice(plaintext);
        self.gcm.keystream(&mut out[start..]);
        self.gcm.hash(&out[start..]);
        if let Some(d) = self
            .digester
            .as_mut()
            .filter(|d| d.spec.over == DigestOver::Ciphertext)
        {
            d.feed(&out[start..]);
        }
        Ok(())
    }

    /// Plaintext bytes encrypted so far.
    pub fn plain_len(&self) -> u64 {
        self.gcm.text_len
    }

    /// Append the tag; returns the chunk digests if asked for.
    pub fn finish(self, out: &mut Vec<u8>) -> Option<ChunkDigests> {
        out.extend_from_slice(&self.gcm.tag()[..]);
        self.digester.map(Digester::finish)
    }

    /// Pretend `len` bytes were already encrypted, to test the size limit without 64 GiB.
    #[cfg(test)]
    pub(crate) fn skip_for_test(&mut self, len: u64) {
        self.gcm.text_len = len;
    }
}
