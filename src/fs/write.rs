//! Write state of files being written: their staged content in the journal and what must happen to it.
//!
//! S3 objects cannot be changed in place, and every upload of an encrypted object gets a fresh data key, so a file
//! opened for writing is staged whole in the write journal (`crate::journal`: sealed in client-side modes and sse-c,
//! so no plaintext rests on disk); writes at any offset, appends and truncation are positioned operations there.
//! `close()`/`fsync()` encrypt and upload the staged content; only when the store confirms the upload is the state
//! marked clean. A failed upload leaves the state dirty and the staged file in place, so nothing is dropped silently.
//!
//! Each dirty file has a sealed record in the journal from the moment it becomes dirty until its upload succeeds, or
//! until it is unlinked or replaced by a rename (then the record goes at once, so the next start never resurrects it).
//! The record names the version of the object the content replaces ([`BaseVersion`]): every upload is conditional on
//! it, so neither a close nor a recovery silently overwrites a version someone else wrote meanwhile.
//!
//! A large existing object is the exception: it is staged only where it is written, and changed in place on close
//! (`fs::sparse`, `crate::inplace`).
//!
//! Concurrency: one `tokio::sync::Mutex` per inode serialises writes, truncation and upload of that file (an upload
//! must see one consistent version); different files never contend. Staged content is accessed with positioned reads
//! and writes that hit the local page cache; they run inline on the async worker because they are short and moving
//! them to `spawn_blocking` would cost more than they do.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::precheck::Precheck;
use super::sparse::Sparse;
use crate::journal::{BaseVersion, Journal, StagedFile};
use crate::upload::stream::Stream;

/// How much a streaming file grows between two looks at the free space under the journal (a `statvfs`).
const SPACE_CHECK_STEP: u64 = 1 << 20;

/// Staged content of one file.
pub struct Staged {
    journal: Arc<Journal>,
    /// The staged file's number in the journal.
    pub n: u64,
    pub file: StagedFile,
    /// Hex of the staged file's id (keys its sealed slots; recovery needs it).
    pub file_id: String,
    /// Whether the file holds the object's full content (a file opened for writing is downloaded lazily, on the
    /// first write or truncate).
    pub loaded: bool,
    /// Changed since the last successful upload.
    pub dirty: bool,
    pub size: u64,
    /// A recovery record exists for this content: true whenever its file may be on disk (set once it is written,
    /// cleared only once it is removed), which the drop relies on.
    pub recorded: bool,
    /// The version of the object this content replaces: the next upload is conditional on it.
    pub base: BaseVersion,
    /// Stamped into the next upload's metadata (see `journal::Record::upload_id`); renewed after each upload, and
    /// when the content or attributes change after an attempt whose outcome is unknown.
    pub upload_id: String,
    /// Stamps of earlier attempts since the last known upload whose outcome is unknown (a timeout: the store may
    /// have taken them). An object carrying one of these is a version this mount wrote, not someone else's.
    pub prior_ids: Vec<String>,
    /// An upload with `upload_id` was attempted and did not succeed (the store may still have taken it).
    pub attempted: bool,
    /// The record on disk no longer says what the next start must know (a new stamp): rewrite it.
    pub record_stale: bool,
    /// The content started empty (a new file, or truncated to nothing) and has only grown at its end since: it may
    /// be uploaded while it is written (`crate::upload::stream`).
    pub from_empty: bool,
    /// The multipart upload running while the file is written, if any. Anything that changes bytes it has sealed
    /// abandons it (the staged copy stays whole, so close() then uploads the file as before).
    pub stream: Option<Stream>,
    /// Plaintext bytes before this offset are no longer staged: the disk under the journal ran low while the file
    /// streamed, so the copy of what the store had taken was discarded. Those bytes cannot change or be read again
    /// here, there is no recovery record, and only the stream can still upload the file (0: the copy is whole).
    pub trimmed: u64,
    /// The stream of a trimmed file failed: its content is gone, and every operation on it fails with EIO.
    pub lost: bool,
    /// The staged size when the journal's free space was last looked at (see [`Staged::trim_if`]).
    space_checked: u64,
    /// A large existing object staged only where it was written (`fs::sparse`): `None` when the staged file holds
    /// the whole content.
    pub sparse: Option<Sparse>,
    /// The HEAD of the file's key sent when it was created or truncated by O_TRUNC, standing for its upload's
    /// condition on a server that ignores conditions (`fs::precheck`).
    pub precheck: Option<Precheck>,
}

fn lost_content() -> std::io::Error {
    std::io::Error::other("the file's upload failed after the disk under the write journal had run low and its staged copy was discarded; its content since it was opened is lost")
}

fn not_staged() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENOSPC)
}

/// Most stamps of unknown outcome remembered: past this many failed attempts of one file the oldest are dropped
/// (their versions, if they landed, then count as someone else's and recovery saves beside them).
const MAX_PRIOR_IDS: usize = 16;

impl Staged {
    /// A new empty staged file in `journal`; a file created by this mount starts dirty (it must be uploaded even if
    /// nothing is written).
    pub fn create(journal: &Arc<Journal>, loaded: bool, dirty: bool, base: BaseVersion) -> std::io::Result<Staged> {
        let (n, file, id) = journal.new_file()?;
        crate::metrics::dirty_changed((false, 0), (dirty, 0));
        Ok(Staged {
            journal: journal.clone(),
            n,
            file,
            file_id: crate::crypto::hex::hex(&id),
            loaded,
            dirty,
            size: 0,
            recorded: false,
            base,
            upload_id: crate::journal::new_upload_id(),
            prior_ids: Vec::new(),
            attempted: false,
            record_stale: false,
            from_empty: loaded,
            stream: None,
            trimmed: 0,
            lost: false,
            space_checked: 0,
            sparse: None,
            precheck: None,
        })
    }

    /// Where the staged content is on disk (for log lines).
    pub fn location(&self) -> std::path::PathBuf {
        self.journal.file_path(self.n)
    }

    /// What this state counts in the dirty-files and dirty-bytes gauges. `dirty` and `size` change only through the
    /// methods below (and [`Staged::create`]), which report each change, so the gauges stay exact.
    fn share(&self) -> (bool, u64) {
        (self.dirty, self.size)
    }

    /// An upload with the current stamp is about to be sent.
    pub fn note_attempt(&mut self) {
        self.attempted = true;
    }

    /// Whether `stamp` (from an object's metadata) is an upload of this content's history: the current attempt or an
    /// earlier one whose outcome was unknown.
    pub fn is_own_stamp(&self, stamp: &str) -> bool {
        self.upload_id == stamp || self.prior_ids.iter().any(|p| p == stamp)
    }

    /// The content or attributes change: after an attempt whose outcome is unknown, the next upload needs a stamp of
    /// its own (or a start that finds the old stamp in the store would take the old content for this one).
    fn changing(&mut self) {
        if self.attempted {
            self.prior_ids.push(std::mem::replace(&mut self.upload_id, crate::journal::new_upload_id()));
            if self.prior_ids.len() > MAX_PRIOR_IDS {
                self.prior_ids.remove(0);
            }
            self.attempted = false;
            self.record_stale = true;
        }
    }

    /// Gives up the running stream, if any, and streaming for this content unless it starts empty again.
    pub fn stop_streaming(&mut self) {
        if let Some(s) = self.stream.take() {
            tracing::debug!(staged = %self.location().display(), key = s.path(), "streaming upload abandoned; the file is uploaded whole at close");
            self.stream_ended(&s);
            s.abandon();
        }
        self.from_empty = false;
    }

    /// The stream `s` is taken off this content (to be completed or abandoned): the record, which names its upload
    /// (`journal::Record::multipart`), is rewritten without it at its next write (until then a start after a crash
    /// aborts an upload that is already gone, which is harmless).
    pub fn stream_ended(&mut self, s: &Stream) {
        if self.recorded && s.upload_id().is_some() {
            self.record_stale = true;
        }
    }

    /// Frees the staged copy of the bytes the stream's store has confirmed, once `low_on_space` says the disk under
    /// the journal is running low (asked once per [`SPACE_CHECK_STEP`] staged; once trimmed, at every confirmation).
    /// Drops the recovery record: from now on a crash loses the file, as the log line says once.
    ///
    /// Asked as the file grows, not only when the store confirms a part: a store that stalls for a moment lets the
    /// writer run on by up to the parts in flight (tens of MiB) with no confirmation, and a look taken at the last
    /// confirmation, when the disk was not low yet, let such a burst run a small journal disk out (ENOSPC to the
    /// writer; CI, tests/stream.rs on a 96 MiB disk).
    pub fn trim_if(&mut self, low_on_space: impl FnOnce() -> bool) {
        let Some(confirmed) = self.stream.as_ref().map(Stream::confirmed_plain) else { return };
        if confirmed <= self.trimmed {
            return;
        }
        if self.trimmed == 0 {
            if self.size < self.space_checked.saturating_add(SPACE_CHECK_STEP) {
                return;
            }
            self.space_checked = self.size;
            if !low_on_space() {
                return;
            }
        }
        match self.file.discard_below(confirmed) {
            Ok(()) => {
                if self.trimmed == 0 {
                    tracing::warn!(
                        staged = %self.location().display(),
                        key = self.stream.as_ref().map(Stream::path).unwrap_or_default(),
                        "the disk under the write journal is low: this file goes on streaming to the store without a local copy of what the store has taken; until close() completes its upload, a crash or a failed upload loses it"
                    );
                }
                self.trimmed = confirmed;
                self.drop_record();
            }
            Err(e) => tracing::debug!(staged = %self.location().display(), error = %e, "could not free staged space (no hole punching here); the copy stays"),
        }
    }

    /// The stream of a trimmed file failed: nothing can upload it any more. Its state stays (clean, unrecorded) so
    /// that every further operation on the open file fails instead of starting from an empty or older file.
    pub fn lose(&mut self) {
        self.stop_streaming();
        self.mark_clean();
        self.lost = true;
    }

    /// Changed (metadata only, say): upload on the next flush.
    pub fn mark_dirty(&mut self) {
        if let Some(s) = &mut self.stream {
            s.attrs_changed = true;
        }
        self.changing();
        let before = self.share();
        self.dirty = true;
        crate::metrics::dirty_changed(before, self.share());
    }

    /// Uploaded as version `etag`: the record goes, and the next upload replaces that version.
    pub fn mark_uploaded(&mut self, etag: Option<String>) {
        self.base = etag.map(BaseVersion::Etag).unwrap_or(BaseVersion::Any);
        self.upload_id = crate::journal::new_upload_id();
        self.prior_ids.clear();
        self.attempted = false;
        self.mark_clean();
        if self.trimmed > 0 {
            // The staged copy has holes: reads go to the store's version now, and a next write loads it again.
            self.loaded = false;
            if let Err(e) = self.reset() {
                tracing::warn!(staged = %self.location().display(), error = %e, "could not empty a staged file");
            }
            self.trimmed = 0;
            self.space_checked = 0;
        }
    }

    /// Nothing to upload any more (uploaded, or unlinked or replaced while open: POSIX says the data goes with the
    /// name): the record goes at once, so no later start uploads it. The content stays readable through open handles.
    pub fn mark_clean(&mut self) {
        self.stop_streaming();
        let before = self.share();
        self.dirty = false;
        crate::metrics::dirty_changed(before, self.share());
        self.drop_record();
    }

    /// Removes the recovery record (if any); the caller restores it with a new one if what it did fails.
    pub fn drop_record(&mut self) {
        if self.recorded {
            match self.journal.remove_record(self.n) {
                Ok(()) => self.recorded = false,
                Err(e) => tracing::error!(staged = %self.location().display(), error = %e, "could not remove a journal record"),
            }
        }
    }

    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if self.lost {
            return Err(lost_content());
        }
        if offset < self.trimmed {
            return Err(std::io::Error::other(
                "this part of the file was sent to the store and its staged copy discarded (the disk under the write journal is low); it can be read once close() has completed the upload",
            ));
        }
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = crate::iobuf::take((end - offset) as usize);
        buf.resize((end - offset) as usize, 0);
        self.file.read_exact_at(&mut buf, offset, self.size)?;
        Ok(buf)
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.lost {
            return Err(lost_content());
        }
        if self.trimmed > 0 {
            // Only what the stream has not sealed can still change (its staged copy is all there is).
            if self.stream.as_ref().is_none_or(|s| offset < s.sealed()) {
                return Err(not_staged());
            }
        } else if offset < self.size || self.stream.as_ref().is_some_and(|s| offset < s.sealed()) {
            // Not at the end: no longer a file written front to back.
            self.stop_streaming();
        }
        self.changing();
        let before = self.share();
        self.size = self.file.write_at(offset, data, self.size)?;
        self.dirty = true;
        crate::metrics::dirty_changed(before, self.share());
        Ok(())
    }

    pub fn truncate(&mut self, size: u64) -> std::io::Result<()> {
        if self.lost {
            return Err(lost_content());
        }
        if self.trimmed > 0 && size == 0 {
            // Everything goes: the stream and what it sent with it.
            self.stop_streaming();
            self.trimmed = 0;
            self.space_checked = 0;
        } else if self.trimmed > 0 {
            if self.stream.as_ref().is_none_or(|s| size <= s.sealed()) {
                return Err(not_staged());
            }
        } else if size < self.size {
            self.stop_streaming();
        }
        if size == 0 {
            // Empty again: what follows may be written front to back.
            self.from_empty = true;
        }
        self.changing();
        let before = self.share();
        self.file.set_len(size, self.size)?;
        self.size = size;
        if let Some(s) = &mut self.sparse {
            s.truncate(size);
            if s.valid_len == 0 {
                // Nothing of the base is left: the staged file is the whole content.
                self.sparse = None;
                self.record_stale = true;
            }
        }
        self.dirty = true;
        crate::metrics::dirty_changed(before, self.share());
        Ok(())
    }

    /// Empties the staged content without marking it dirty (before loading another version into it).
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.stop_streaming();
        let before = self.share();
        self.file.set_len(0, self.size)?;
        self.size = 0;
        self.sparse = None;
        crate::metrics::dirty_changed(before, self.share());
        Ok(())
    }

    /// Starts sparse staging of the base `sparse` describes: the staged file gets the base's length, all holes.
    pub fn start_sparse(&mut self, sparse: Sparse) -> std::io::Result<()> {
        self.file.set_len(sparse.base_len, self.size)?;
        self.set_loaded_size(sparse.base_len);
        self.sparse = Some(sparse);
        Ok(())
    }

    /// Sets the size after content was written with [`StagedFile::write_at`] directly (a download).
    pub fn set_loaded_size(&mut self, size: u64) {
        let before = self.share();
        self.size = size;
        crate::metrics::dirty_changed(before, self.share());
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Forgotten by this process either way: it leaves the gauges even though dirty content stays on disk.
        crate::metrics::dirty_changed(self.share(), (false, 0));
        // Clean content needs no copy any more; dirty content is kept for the next start and logged by the owner.
        if !self.dirty {
            // No record on disk (never written, or removed with the upload: `Staged::mark_clean`): only the data.
            let removed =
                if self.recorded { self.journal.remove_file(self.n) } else { self.journal.remove_data(self.n) };
            if let Err(e) = removed {
                tracing::warn!(staged = %self.location().display(), error = %e, "could not remove a staged file");
            }
        }
    }
}

/// Per-inode write state shared by every handle of the inode. The mutex is also what orders an upload against a
/// rename or unlink of the same file: they take it (owned, so several can be held at once) for their whole duration.
pub type WriteState = Mutex<Staged>;
