//! The content of one staged file: random-access reads and writes over plaintext offsets, stored either as sealed
//! slots (client-side modes and sse-c: no plaintext on disk) or as the plaintext itself (modes that send plaintext to
//! the store anyway).
//!
//! Sealed layout (docs/FORMAT.md, "Staged files"): slot `i` holds plaintext `i * SLOT_PLAIN_LEN ..` and sits at
//! `i * SLOT_LEN`; only the last slot may be short, so the file's length gives the plaintext size. A slot that was
//! never written (a sparse extension) is all zero bytes and reads as zeros.
//!
//! Crash behaviour: every change is written through with positioned writes before the call returns, so a daemon
//! killed outright leaves what it acknowledged. Writes are ordered so that a kill between two of them leaves a
//! readable file: a partial last slot is first padded to full length, and only then are slots past it written. A
//! slot rewritten in place can still be torn by a kill in the middle of one `pwrite`; that slot then fails
//! authentication and recovery reports the file instead of uploading it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use zeroize::Zeroizing;

use crate::crypto::journal::{plain_len, stored_len, SlotCipher, SLOT_LEN, SLOT_OVERHEAD, SLOT_PLAIN_LEN};

/// Staged content of one file.
#[derive(Debug)]
pub enum StagedFile {
    Plain(File),
    Sealed { file: File, cipher: SlotCipher },
}

/// Largest scratch buffer a thread keeps between calls: a staged write or read comes in pieces of at most 1 MiB
/// (FUSE's largest write, the uploader's read span) plus slot overhead.
const SCRATCH_KEPT: usize = 2 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's empty scratch buffer, for sealed slots on their way to or from the disk (ciphertext
/// only). Why: a fresh megabyte per call was given back to the system on free and faulted in again on the next
/// call, which made sealed staging cost a quarter of the write speed of a fast store (measured).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = SCRATCH.take();
    buf.clear();
    let r = f(&mut buf);
    if buf.capacity() <= SCRATCH_KEPT {
        SCRATCH.set(buf);
    }
    r
}

fn tampered(index: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("staged data failed authentication at slot {index}: the journal file was damaged or tampered with"),
    )
}

impl StagedFile {
    /// The plaintext length the file holds now, from its length on disk.
    pub fn plain_len(&self) -> io::Result<u64> {
        match self {
            StagedFile::Plain(f) => Ok(f.metadata()?.len()),
            StagedFile::Sealed { file, .. } => {
                let stored = file.metadata()?.len();
                plain_len(stored).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("staged file is {stored} bytes, which no plaintext size gives (torn)"))
                })
            }
        }
    }

    /// The underlying file (for its metadata).
    pub fn file(&self) -> &File {
        match self {
            StagedFile::Plain(f) | StagedFile::Sealed { file: f, .. } => f,
        }
    }

    /// Plaintext of the whole slot `index` of a file of `size` bytes (empty past the end).
    fn read_slot(file: &File, cipher: &SlotCipher, index: u64, size: u64) -> io::Result<Vec<u8>> {
        let start = index * SLOT_PLAIN_LEN;
        if start >= size {
            return Ok(Vec::new());
        }
        let len = (size - start).min(SLOT_PLAIN_LEN);
        let mut stored = vec![0u8; stored_len(len) as usize];
        file.read_exact_at(&mut stored, index * SLOT_LEN)?;
        let mut out = Vec::with_capacity(len as usize);
        cipher.open(index, &stored, &mut out).map_err(|_| tampered(index))?;
        Ok(out)
    }

    /// Reads `buf.len()` bytes at `offset` of a file of `size` bytes (the caller keeps the size; reads past it fail).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, size: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the staged file"));
        }
        if buf.is_empty() {
            return Ok(());
        }
        match self {
            StagedFile::Plain(f) => f.read_exact_at(buf, offset),
            StagedFile::Sealed { file, cipher } => {
                let end = offset + buf.len() as u64;
                let first = offset / SLOT_PLAIN_LEN;
                let last = (end - 1) / SLOT_PLAIN_LEN;
                // One read for the whole span; whole slots decrypt straight into `buf`.
                let span_end = ((last + 1) * SLOT_LEN).min(stored_len(size));
                with_scratch(|stored| {
                    stored.resize((span_end - first * SLOT_LEN) as usize, 0);
                    file.read_exact_at(stored, first * SLOT_LEN)?;
                    for (i, slot) in stored.chunks(SLOT_LEN as usize).enumerate() {
                        let index = first + i as u64;
                        let slot_start = index * SLOT_PLAIN_LEN;
                        let slot_end = slot_start + (slot.len() as u64).saturating_sub(SLOT_OVERHEAD);
                        let (from, to) = (offset.max(slot_start), end.min(slot_end));
                        if to < from {
                            return Err(tampered(index));
                        }
                        let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                        if from == slot_start && to == slot_end {
                            cipher.open_to(index, slot, dst).map_err(|_| tampered(index))?;
                        } else {
                            let mut plain = Zeroizing::new(Vec::with_capacity(SLOT_PLAIN_LEN as usize));
                            cipher.open(index, slot, &mut plain).map_err(|_| tampered(index))?;
                            let skip = (from - slot_start) as usize;
                            dst.copy_from_slice(&plain[skip..skip + dst.len()]);
                        }
                    }
                    Ok(())
                })
            }
        }
    }

    /// Writes `data` at `offset` of a file of `size` bytes; returns the new size.
    pub fn write_at(&self, offset: u64, data: &[u8], size: u64) -> io::Result<u64> {
        let end = offset + data.len() as u64;
        let new_size = size.max(end);
        if data.is_empty() {
            return Ok(size);
        }
        match self {
            StagedFile::Plain(f) => f.write_all_at(data, offset)?,
            StagedFile::Sealed { file, cipher } => {
                let first = offset / SLOT_PLAIN_LEN;
                let last = (end - 1) / SLOT_PLAIN_LEN;
                // A short last slot before the written span becomes a full slot first (zero padded), so that the
                // file never has a short slot anywhere but at its end.
                if size % SLOT_PLAIN_LEN != 0 {
                    let old_last = size / SLOT_PLAIN_LEN;
                    if old_last < first {
                        let mut plain = Self::read_slot(file, cipher, old_last, size)?;
                        plain.resize(SLOT_PLAIN_LEN as usize, 0);
                        let mut out = Vec::with_capacity(SLOT_LEN as usize);
                        cipher.seal(old_last, &plain, &mut out);
                        file.write_all_at(&out, old_last * SLOT_LEN)?;
                    }
                }
                with_scratch(|out| {
                    out.reserve(((last - first + 1) * SLOT_LEN) as usize);
                    for index in first..=last {
                        let slot_start = index * SLOT_PLAIN_LEN;
                        let slot_len = (new_size - slot_start).min(SLOT_PLAIN_LEN);
                        let from = offset.max(slot_start);
                        let to = end.min(slot_start + slot_len);
                        let piece = &data[(from - offset) as usize..(to - offset) as usize];
                        if from == slot_start && to == slot_start + slot_len {
                            cipher.seal(index, piece, out);
                        } else {
                            let mut plain = Self::read_slot(file, cipher, index, size)?;
                            plain.resize(slot_len as usize, 0);
                            plain[(from - slot_start) as usize..(to - slot_start) as usize].copy_from_slice(piece);
                            cipher.seal(index, &plain, out);
                        }
                    }
                    file.write_all_at(out, first * SLOT_LEN)
                })?;
            }
        }
        Ok(new_size)
    }

    /// Sets the plaintext length of a file of `size` bytes to `new` (zeros when it grows).
    pub fn set_len(&self, new: u64, size: u64) -> io::Result<()> {
        match self {
            StagedFile::Plain(f) => f.set_len(new),
            StagedFile::Sealed { file, cipher } => {
                if new == size {
                    return Ok(());
                }
                // The slot that is partial at the boundary is re-sealed at its new length first.
                let boundary = new.min(size);
                if boundary % SLOT_PLAIN_LEN != 0 {
                    let index = boundary / SLOT_PLAIN_LEN;
                    let mut plain = Self::read_slot(file, cipher, index, size)?;
                    let slot_len = (new - index * SLOT_PLAIN_LEN).min(SLOT_PLAIN_LEN);
                    plain.resize(slot_len as usize, 0);
                    let mut out = Vec::with_capacity(SLOT_LEN as usize);
                    cipher.seal(index, &plain, &mut out);
                    file.write_all_at(&out, index * SLOT_LEN)?;
                }
                file.set_len(stored_len(new))
            }
        }
    }
}

impl StagedFile {
    /// Lets the page cache drop the staged bytes before plaintext offset `plain` once they are on disk: starts
    /// writing back what is dirty there and drops what is clean (`POSIX_FADV_DONTNEED`; the bytes stay in the
    /// file, a later read gets them from the disk). Called by a stream for what it has read, one part behind, so
    /// the part just read is dropped at the next call. Why: a 1 GiB file streamed through the journal otherwise
    /// holds 1 GiB of page cache until it is removed, every page of it newly allocated; on a VM whose free memory
    /// is handed back to the host, first touches made the staging copy the largest cost of a sequential write
    /// (perf: 43 % of the daemon's samples in `copy_folio_from_iter_atomic`), where pages given back here are
    /// taken again by the next writes. Advice only: a failure changes nothing and is ignored.
    pub fn uncache_below(&self, plain: u64) {
        let len = i64::try_from(self.stored_below(plain)).unwrap_or(i64::MAX);
        if len > 0 {
            let fd = std::os::fd::AsRawFd::as_raw_fd(self.file());
            // SAFETY: posix_fadvise on a descriptor this value owns, with plain integer arguments.
            unsafe { libc::posix_fadvise(fd, 0, len, libc::POSIX_FADV_DONTNEED) };
        }
    }

    /// Bytes of the file on disk that hold the plaintext before `plain`, rounded down to whole slots when sealed.
    fn stored_below(&self, plain: u64) -> u64 {
        match self {
            StagedFile::Plain(_) => plain,
            StagedFile::Sealed { .. } => (plain / SLOT_PLAIN_LEN).saturating_mul(SLOT_LEN),
        }
    }

    /// Frees the disk space of the plaintext before `plain` (rounded down to whole slots), keeping the file's
    /// length: for a file streamed to the store faster than the disk can hold it (`crate::upload::stream`). Reads of
    /// that range afterwards return zeros (plain) or fail authentication (sealed): the caller never reads it again.
    pub fn discard_below(&self, plain: u64) -> io::Result<()> {
        let (file, len) = (self.file(), self.stored_below(plain));
        if len == 0 {
            return Ok(());
        }
        let len = i64::try_from(len).map_err(io::Error::other)?;
        // SAFETY: fallocate on a descriptor this value owns, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::journal::{derive_journal_key, new_file_id};
    use crate::crypto::AeadBackend;
    use proptest::prelude::*;

    fn sealed() -> (tempfile::NamedTempFile, StagedFile) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let key = derive_journal_key(&[5; 32], "s", "r");
        let f = StagedFile::Sealed { file: tmp.reopen().unwrap(), cipher: SlotCipher::new(&key, AeadBackend::AwsLc, new_file_id()) };
        (tmp, f)
    }

    /// Dropping the cached pages of what was read keeps every byte: later reads (from the disk), and writes past
    /// and into the dropped range, read back as written, sealed and plain.
    #[test]
    fn uncached_bytes_read_back_from_the_disk() {
        let plain_tmp = tempfile::NamedTempFile::new().unwrap();
        let (_sealed_tmp, sealed_file) = sealed();
        for f in [StagedFile::Plain(plain_tmp.reopen().unwrap()), sealed_file] {
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let mut size = f.write_at(0, &data[..2_000_000], 0).unwrap();
            f.uncache_below(1_500_000);
            size = f.write_at(2_000_000, &data[2_000_000..], size).unwrap();
            f.uncache_below(3_000_000);
            let mut back = vec![0u8; data.len()];
            f.read_exact_at(&mut back, 0, size).unwrap();
            assert!(back == data, "content changed after the page cache dropped it");
            f.write_at(10, b"rewritten", size).unwrap();
            f.uncache_below(u64::MAX);
            f.read_exact_at(&mut back[..100], 0, size).unwrap();
            assert_eq!(&back[10..19], b"rewritten");
            assert_eq!(&back[..10], &data[..10]);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetLen(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..40_000, prop::collection::vec(any::<u8>(), 0..10_000)).prop_map(|(o, d)| Op::Write(o, d)),
            (0u64..40_000).prop_map(Op::SetLen),
        ]
    }

    proptest! {
        /// Any sequence of writes and truncations reads back as the same operations on a plain buffer, and the
        /// size survives a reopen (it is what recovery sees).
        #[test]
        fn sealed_file_matches_a_plain_model(
            ops in prop::collection::vec(op(), 1..25),
            reads in prop::collection::vec((any::<u64>(), 1u64..20_000), 0..8),
        ) {
            let (_tmp, f) = sealed();
            let mut model: Vec<u8> = Vec::new();
            let mut size = 0u64;
            for op in ops {
                match op {
                    Op::Write(o, d) => {
                        size = f.write_at(o, &d, size).unwrap();
                        let end = o as usize + d.len();
                        if !d.is_empty() {
                            if model.len() < end { model.resize(end, 0); }
                            model[o as usize..end].copy_from_slice(&d);
                        }
                    }
                    Op::SetLen(n) => {
                        f.set_len(n, size).unwrap();
                        size = n;
                        model.resize(n as usize, 0);
                    }
                }
                prop_assert_eq!(size, model.len() as u64);
                prop_assert_eq!(f.plain_len().unwrap(), size);
            }
            let mut buf = vec![0u8; size as usize];
            f.read_exact_at(&mut buf, 0, size).unwrap();
            prop_assert!(buf == model, "content differs");
            if size > 10 {
                let mut mid = vec![0u8; 7];
                f.read_exact_at(&mut mid, size / 2 - 3, size).unwrap();
                prop_assert_eq!(&mid[..], &model[(size / 2 - 3) as usize..(size / 2 + 4) as usize]);
            }
            // Reads of every shape: within one slot, across slot edges, starting or ending mid-slot.
            for (from, len) in reads {
                if size == 0 {
                    break;
                }
                let from = from % size;
                let len = (len % (size - from)).max(1);
                let mut got = vec![0u8; len as usize];
                f.read_exact_at(&mut got, from, size).unwrap();
                prop_assert!(got[..] == model[from as usize..(from + len) as usize], "read of {} at {}", len, from);
            }
        }
    }

    #[test]
    fn no_plaintext_reaches_the_disk_and_tampering_is_detected() {
        let (tmp, f) = sealed();
        let marker = b"PLAINTEXT-MARKER-0123456789".repeat(500);
        let size = f.write_at(100, &marker, 0).unwrap();
        let disk = std::fs::read(tmp.path()).unwrap();
        assert!(!disk.windows(16).any(|w| w == &marker[..16]), "plaintext found on disk");
        let mut bad = disk.clone();
        bad[SLOT_LEN as usize + 40] ^= 1;
        std::fs::write(tmp.path(), &bad).unwrap();
        let mut buf = vec![0u8; 10];
        f.read_exact_at(&mut buf, 10, size).expect("slot 0 is untouched");
        let mut buf = vec![0u8; 10];
        assert_eq!(
            f.read_exact_at(&mut buf, SLOT_PLAIN_LEN + 5, size).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn a_sparse_extension_writes_no_slots_in_between() {
        let (tmp, f) = sealed();
        let size = f.write_at(0, b"abc", 0).unwrap();
        let size = f.write_at(100 * SLOT_PLAIN_LEN, b"z", size).unwrap();
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(tmp.path()).unwrap().blocks();
        assert!(blocks < 64, "{blocks} blocks allocated for two slots");
        let mut buf = vec![1u8; 5];
        f.read_exact_at(&mut buf, 50 * SLOT_PLAIN_LEN, size).unwrap();
        assert_eq!(buf, vec![0u8; 5]);
        let mut buf = vec![0u8; 4];
        f.read_exact_at(&mut buf, 0, size).unwrap();
        assert_eq!(&buf, b"abc\0");
    }
}
