//! Streaming upload of a file written front to back: its multipart upload runs while the application still writes.
//!
//! A whole-file upload at close (see [`super::upload`]) makes a 1 GiB copy wait twice: once while the data is staged,
//! once while it is sent. A [`Stream`] overlaps the two. Once a file that started empty has grown past
//! [`STREAM_FROM`], the filesystem opens a multipart upload for it and, after each write, seals and sends every part
//! whose chunks can no longer change the object's layout: a chunk is sealed only when bytes follow it, so it is
//! never the last one (whose flag the format authenticates, docs/FORMAT.md). close() then seals and sends only the
//! tail and completes the upload.
//!
//! Nothing about durability changes: the staged copy in the write journal stays complete until the upload is
//! confirmed, so a stream that cannot go on (a write or truncate into what was already sealed, a rename, a failed
//! part, another stamp) is simply abandoned (its upload aborted) and close() uploads the file whole, as before. The
//! object becomes visible only at completion, conditional on the same version an ordinary upload would expect, so a
//! crash in the middle leaves an incomplete multipart upload (invisible) and the journal record, from which the next
//! start uploads the file whole. The record names the upload ([`Stream::upload_id`]: S3's UploadId) from just after
//! it is created until the stream ends, and that start aborts it; only a crash between CreateMultipartUpload and the
//! record's rewrite leaves it to the store's lifecycle rules (`AbortIncompleteMultipartUpload`). A record may still
//! name an upload that was completed or aborted since (it is rewritten at the next write or close): aborting it
//! again is harmless.
//!
//! Memory: no buffer outlives a part except the carry of one chunk cut across a part boundary; each part reserves
//! its buffer from the memory budget (src/memory) only while it is filled and sent, so an idle stream holds almost
//! nothing, and at most [`PARTS_IN_FLIGHT`] parts per stream travel at once (a writer faster than the store waits).
//! A part's buffer is then kept as one of the budget's spares (at most two in the process, counted, given up to any
//! reservation that needs the room, and freed when no stream runs), for the next part of any stream.
//!
//! The object is format version 3 like a whole upload: its chunks are sealed with the implicit version id (the file
//! id), which is known before the length is, so a streamed file can later be changed in place.
//!
//! The object's metadata is fixed when the upload starts, so it carries no `mtime`: the store's LastModified (the
//! completion) stands in for it. The filesystem re-reads the attributes after completion, and replaces the metadata
//! conditionally when they were changed explicitly meanwhile (chmod, chown, utimens on the open file).

use bytes::Bytes;
use futures::StreamExt;

use super::{part_result, Source, PARTS_IN_FLIGHT, PART_BUFFER, PART_SIZE};
use crate::crypto::CHUNK_PLAIN_LEN;
use crate::fs::error::{Error, Result};
use crate::memory::Reservation;
use crate::object::{Codec, ObjectCodec};
use crate::object::MAP_META;
use crate::read::BIND_META;
use crate::store::{Backend, Expect, ObjectInfo, ObjectKey, StoreError, Upload, UserMeta};

/// A file is streamed once it holds this many bytes: two parts, so that streaming pays off (one part's tail is all
/// close() waits for) and the small files that are most of a tree keep their single PUT.
pub const STREAM_FROM: u64 = 2 * PART_SIZE as u64;

/// Plaintext read from the staged file at once while sealing.
const READ_SPAN: usize = 1 << 20;

/// A part on its way: it answers with its number.
type PartTask = tokio::task::JoinHandle<(u64, std::result::Result<(), StoreError>)>;

/// The reservation of a part on its way, shared by its body and its task: whichever is done with the part first
/// (see [`PartBody`]) takes it.
type PartMemory = std::sync::Arc<std::sync::Mutex<Option<Reservation>>>;

/// A part's buffer as the body of its upload request. When the store's client lets go of it before the part's
/// answer (the usual case: the request has sent it), it is kept with its reservation as a spare of the memory budget,
/// still counted, for the next part of any stream (`memory::MemoryBudget::take_spare`): a fresh buffer of
/// [`PART_BUFFER`] is a mapping of its own, every page of which the sealing faults in again (those faults, and the
/// unmapping, were 15 % of the daemon's CPU time in a 256 MiB cse-c write on Garage: 0.76-0.79 s without spares,
/// 0.62-0.67 s with them, 4 alternating runs each). A store that holds the body longer (until the upload completes)
/// does not hold the reservation: the part's task ends it at the answer, as without spares, and the buffer is then
/// freed with the body.
struct PartBody {
    buf: Vec<u8>,
    memory: PartMemory,
}

impl AsRef<[u8]> for PartBody {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PartBody {
    fn drop(&mut self) {
        let memory = self.memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        // Only whole part buffers (not the final carry's).
        if let Some(memory) = memory.filter(|_| self.buf.capacity() >= PART_BUFFER) {
            memory.keep_with(std::mem::take(&mut self.buf));
        }
    }
}

/// A multipart upload of a file that is still being written.
pub struct Stream {
    path: String,
    oc: ObjectCodec,
    /// In a mutex only to make the stream `Sync` (write state is shared across tasks); every access has `&mut self`.
    upload: std::sync::Mutex<Option<Box<dyn Upload>>>,
    /// The upload stamp in the object's metadata (`fs::UPLOAD_META`).
    stamp: String,
    /// The store's id of the multipart upload ([`Upload::upload_id`]), which the journal record keeps while the
    /// stream runs so that a start after a kill can abort it.
    upload_id: Option<String>,
    expect: Expect,
    /// Stored bytes of one full chunk.
    chunk_stored: usize,
    /// The next chunk to seal; every chunk before it is sealed and sent or in `carry`.
    next_chunk: u64,
    /// Sealed bytes past the end of the last part sent (the header before the first part; then less than a chunk).
    carry: Vec<u8>,
    /// Length of the object header at the start of the first part.
    header_len: usize,
    in_flight: futures::stream::FuturesUnordered<PartTask>,
    /// Parts handed to the store so far, and which of them it has confirmed (by number).
    parts_sent: u64,
    confirmed: std::collections::BTreeSet<u64>,
    /// Parts 0.. this (exclusive) are all confirmed.
    confirmed_prefix: u64,
    /// Attributes were set explicitly while the stream ran: the metadata sent at its start is out of date.
    pub attrs_changed: bool,
    /// Part buffers are kept for the next parts while a stream runs (`memory::MemoryBudget::use_spares`).
    _spares: crate::memory::SpareUse,
    _counted: crate::metrics::UploadInFlight,
}

/// Most parts a stream has sent past its confirmed prefix (see [`Stream::wait_for_room`]): what travels, and two
/// parts of slack for completions out of order. The staged copy a low disk keeps is at most this many parts, the
/// one being filled, and the writes since.
const UNCONFIRMED_PARTS: u64 = PARTS_IN_FLIGHT as u64 + 2;

impl Stream {
    /// Opens the multipart upload of `path` with `meta` (its `mtime` dropped: see the module notes) and the upload
    /// `stamp`, conditional on `expect`. `None` where streaming does not apply: `format=s3ec`, whose single GCM
    /// message is sealed by the whole-file path.
    pub async fn start(
        backend: &dyn Backend,
        codec: &Codec,
        path: &str,
        mut meta: UserMeta,
        stamp: (&str, String),
        expect: Expect,
    ) -> Result<Option<Stream>> {
        if codec.s3ec_write_format().is_some() {
            return Ok(None);
        }
        let key = ObjectKey::new(path).map_err(|e| Error::store(path, e))?;
        let (oc, header) = codec.create_file().await.map_err(|e| Error::codec(path, e))?;
        match oc.binding(path) {
            Some(b) => meta.extra.insert(BIND_META.to_string(), b),
            None => meta.extra.remove(BIND_META),
        };
        meta.extra.remove(MAP_META); // a new object (format 3): no version map until it is changed in place
        meta.mtime = None;
        meta.extra.insert(stamp.0.to_string(), stamp.1.clone());
        let upload = backend.put_multipart_expect(&key, &meta, &expect).await.map_err(|e| Error::store(path, e))?;
        let upload_id = upload.upload_id();
        let chunk_stored = (codec.stored_size(2 * CHUNK_PLAIN_LEN) - codec.stored_size(CHUNK_PLAIN_LEN)) as usize;
        Ok(Some(Stream {
            path: path.to_string(),
            oc,
            upload: std::sync::Mutex::new(Some(upload)),
            stamp: stamp.1,
            upload_id,
            expect,
            chunk_stored,
            next_chunk: 0,
            header_len: header.len(),
            carry: header,
            in_flight: futures::stream::FuturesUnordered::new(),
            parts_sent: 0,
            confirmed: std::collections::BTreeSet::new(),
            confirmed_prefix: 0,
            attrs_changed: false,
            _spares: crate::memory::process().use_spares(),
            _counted: crate::metrics::UploadInFlight::start(),
        }))
    }

    /// The path the upload goes to (its key and the path binding in its metadata).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The upload stamp its metadata carries.
    pub fn stamp(&self) -> &str {
        &self.stamp
    }

    /// The store's id of the multipart upload, if it has one (S3's UploadId, the local store's staged file).
    pub fn upload_id(&self) -> Option<&str> {
        self.upload_id.as_deref()
    }

    /// What the upload completes on.
    pub fn expect(&self) -> &Expect {
        &self.expect
    }

    /// Plaintext bytes sealed so far: bytes before this offset must not change any more.
    pub fn sealed(&self) -> u64 {
        self.next_chunk * CHUNK_PLAIN_LEN
    }

    /// Plaintext bytes the store has confirmed: every chunk before this offset is in parts the store has taken, so
    /// the staged copy of them is needed only if the stream is given up.
    pub fn confirmed_plain(&self) -> u64 {
        let stored = self.confirmed_prefix * PART_SIZE as u64;
        let chunks = stored.saturating_sub(self.header_len as u64) / self.chunk_stored as u64;
        chunks.min(self.next_chunk) * CHUNK_PLAIN_LEN
    }

    /// Seals and sends every full part that a file of `size` bytes (read from `src`) allows without sealing its
    /// last chunk. Waits while [`PARTS_IN_FLIGHT`] parts travel. An error means a part failed: abandon the stream.
    pub async fn advance(&mut self, src: &dyn Source, size: u64) -> Result<()> {
        self.reap()?;
        // Chunks before the one holding the file's last byte are not the last chunk, whatever comes later.
        let sealable = size.saturating_sub(1) / CHUNK_PLAIN_LEN;
        loop {
            let room = PART_SIZE.saturating_sub(self.carry.len());
            let needed = room.div_ceil(self.chunk_stored) as u64;
            if sealable < self.next_chunk + needed {
                return Ok(());
            }
            self.send_part(src, size, self.next_chunk + needed, false).await?;
        }
    }

    /// Seals the rest of a file of `size` bytes, sends it, and completes the upload: the object is visible once
    /// this returns `Ok`. On any error the upload is aborted. `size` must be above [`Stream::sealed`].
    pub async fn finish(mut self, codec: &Codec, src: &dyn Source, size: u64) -> Result<ObjectInfo> {
        let result = async {
            debug_assert!(size > self.sealed(), "finishing a stream below what it sealed");
            let chunks = codec.chunk_count(size);
            while self.next_chunk < chunks {
                self.send_part(src, size, chunks, true).await?;
            }
            if !self.carry.is_empty() {
                self.send_carry().await?;
            }
            while let Some(r) = self.in_flight.next().await {
                self.arrived(r)?;
            }
            Ok(())
        }
        .await;
        let upload = self.take_upload().expect("a stream completes once");
        match result {
            Ok(()) => upload.complete().await.map_err(|e| Error::store(&self.path, e)),
            Err(e) => {
                abort(&self.path, upload).await;
                Err(e)
            }
        }
    }

    /// Gives the stream up: the parts sent are discarded (in the background; the object never changed).
    pub fn abandon(mut self) {
        self.abandon_now();
    }

    fn abandon_now(&mut self) {
        let Some(upload) = self.take_upload() else { return };
        let path = self.path.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { abort(&path, upload).await });
            }
            // No runtime (a test dropping state after its runtime): the store's lifecycle rules clean up.
            Err(_) => tracing::debug!(key = %path, "an abandoned multipart upload was left to the store to expire"),
        }
    }

    fn take_upload(&mut self) -> Option<Box<dyn Upload>> {
        self.upload.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Collects the parts that have arrived; the first failure ends the stream.
    fn reap(&mut self) -> Result<()> {
        while let Some(Some(r)) = futures::FutureExt::now_or_never(self.in_flight.next()) {
            self.arrived(r)?;
        }
        Ok(())
    }

    /// Notes a part's answer; a failure (or a panicked task) ends the stream.
    fn arrived(&mut self, r: std::result::Result<(u64, std::result::Result<(), StoreError>), tokio::task::JoinError>) -> Result<()> {
        let (n, sent) = match r {
            Ok((n, sent)) => (n, Ok(sent)),
            Err(join) => (u64::MAX, Err(join)),
        };
        part_result(&self.path, sent)?;
        self.confirmed.insert(n);
        while self.confirmed.remove(&self.confirmed_prefix) {
            self.confirmed_prefix += 1;
        }
        Ok(())
    }

    /// Waits until another part may go: fewer than [`PARTS_IN_FLIGHT`] travel, and fewer than
    /// [`UNCONFIRMED_PARTS`] have been sent past the confirmed prefix. Parts complete in any order, so without the
    /// second bound one part that lags would let the writer run on while the confirmed prefix (the staged copy the
    /// journal may free when its disk runs low, `Staged::trim_if`) stood still, and the writer, not the store, would
    /// run that disk out (ENOSPC): a writer faster than the store waits for it instead.
    async fn wait_for_room(&mut self) -> Result<()> {
        while self.in_flight.len() >= PARTS_IN_FLIGHT || self.parts_sent - self.confirmed_prefix >= UNCONFIRMED_PARTS {
            match self.in_flight.next().await {
                Some(r) => self.arrived(r)?,
                // Nothing travels: every part sent has arrived, so the prefix is all of them.
                None => break,
            }
        }
        Ok(())
    }

    /// Fills one part from the carry and the chunks up to `until` (exclusive; with `at_end`, `until` is the file's
    /// chunk count and its last chunk is sealed as the last), and sends it (at most PART_SIZE stored bytes; what is sealed past that is carried).
    async fn send_part(&mut self, src: &dyn Source, size: u64, until: u64, at_end: bool) -> Result<()> {
        self.wait_for_room().await?;
        let budget = crate::memory::process();
        let (mut part, memory) = match budget.take_spare(PART_BUFFER) {
            Some(spare) => spare,
            // Reserved only now, while nothing else of this stream is held (no reservation waits on another).
            None => (Vec::with_capacity(PART_BUFFER), budget.reserve(PART_BUFFER as u64).await),
        };
        part.append(&mut self.carry);
        let mut plain = vec![0u8; READ_SPAN];
        while self.next_chunk < until && part.len() < PART_SIZE {
            // A span of whole chunks, read at once (the staged file decrypts its slots per read).
            let want_chunks = ((PART_SIZE - part.len()).div_ceil(self.chunk_stored) as u64)
                .min(until - self.next_chunk)
                .min(READ_SPAN as u64 / CHUNK_PLAIN_LEN)
                .max(1);
            let start = self.next_chunk * CHUNK_PLAIN_LEN;
            let end = ((self.next_chunk + want_chunks) * CHUNK_PLAIN_LEN).min(size);
            let span = &mut plain[..(end - start) as usize];
            src.read_exact_at(span, start).map_err(|e| Error::staging(&self.path, e))?;
            for piece in span.chunks(CHUNK_PLAIN_LEN as usize) {
                let last = at_end && self.next_chunk + 1 == until;
                self.oc.seal(self.next_chunk, last, piece, &mut part);
                self.next_chunk += 1;
            }
        }
        if part.len() > PART_SIZE {
            self.carry.extend_from_slice(&part[PART_SIZE..]);
            part.truncate(PART_SIZE);
        }
        self.put(part, memory);
        src.read_below(self.next_chunk * CHUNK_PLAIN_LEN);
        Ok(())
    }

    /// Sends what is carried as the final part.
    async fn send_carry(&mut self) -> Result<()> {
        self.wait_for_room().await?;
        let memory = crate::memory::process().reserve(self.carry.len() as u64).await;
        let part = std::mem::take(&mut self.carry);
        self.put(part, memory);
        Ok(())
    }

    fn put(&mut self, part: Vec<u8>, memory: Reservation) {
        let memory = PartMemory::new(std::sync::Mutex::new(Some(memory)));
        let body = PartBody { buf: part, memory: memory.clone() };
        let send = self
            .upload
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
            .expect("parts only before completion")
            .put_part(Bytes::from_owner(body));
        let n = self.parts_sent;
        self.parts_sent += 1;
        self.in_flight.push(tokio::spawn(async move {
            let sent = send.await;
            drop(memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
            (n, sent)
        }));
    }
}

async fn abort(path: &str, upload: Box<dyn Upload>) {
    if let Err(e) = upload.abort().await {
        tracing::warn!(key = path, error = %e, "could not abort an abandoned multipart upload (the store's lifecycle rules remove it)");
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.abandon_now();
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
