//! Staged content of files being written.
//!
//! S3 objects cannot be changed in place, and every upload of an encrypted object gets a fresh data key, so a file
//! opened for writing is staged whole as plaintext in a private local directory (0700, files 0600); writes at any
//! offset, appends and truncation are plain file operations there. `close()`/`fsync()` encrypt and upload the staged
//! file; only when the store confirms the upload is the state marked clean. A failed upload leaves the state dirty
//! and the staged file in place, so nothing is dropped silently.
//!
//! Concurrency: one `tokio::sync::Mutex` per inode serialises writes, truncation and upload of that file (an upload
//! must see one consistent version); different files never contend. The staged file is accessed with positioned
//! reads and writes (`pread`/`pwrite`) that hit the local page cache; they run inline on the async worker because
//! they are short and moving them to `spawn_blocking` would cost more than they do.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;

/// The private directory that holds staged plaintext.
#[derive(Debug)]
pub struct StagingDir {
    dir: PathBuf,
    counter: AtomicU64,
}

impl StagingDir {
    /// Creates a fresh private directory (0700) under `base`.
    pub fn create(base: &Path) -> std::io::Result<StagingDir> {
        std::fs::create_dir_all(base)?;
        let pid = std::process::id();
        for attempt in 0..100u32 {
            let dir = base.join(format!("s3cryptfs-staging-{pid}-{attempt}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(StagingDir { dir, counter: AtomicU64::new(0) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "could not create a fresh staging directory"))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A new empty staging file, readable only by us.
    pub fn new_file(&self) -> std::io::Result<(File, PathBuf)> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n}"));
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        Ok((file, path))
    }

    /// Removes the directory if nothing is left in it (a dirty file that could not be uploaded stays, and with it
    /// the directory).
    pub fn remove_if_empty(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

use std::os::unix::fs::DirBuilderExt;

/// What the next start needs to upload a staged file that this run could not, written beside the staged file as
/// `<staged>.pending`. It is written when the file first becomes dirty (so a daemon that is killed outright or
/// crashes leaves it too), rewritten when the file's attributes change and once more when shutdown begins (before
/// the final uploads, so a stop timeout that kills the daemon mid-upload still leaves it), and removed once the upload
/// succeeds. A rename uploads the file first, so the path in a record never goes stale.
///
/// The staged file itself is the authority for content: recovery uploads its whole length, and takes its mtime when
/// it was written after the record (otherwise the record's, which may have been set explicitly, e.g. by `touch -d`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    /// The store URL, so a staging directory shared by several mounts recovers each file into its own store.
    pub store: String,
    /// The file's path in the mount (its object key).
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds) since the epoch.
    pub mtime: (i64, u32),
    /// When the record was written (seconds since the epoch): a newer object in the store is not overwritten.
    pub written_at: i64,
}

/// The sidecar path of a staged file.
pub fn pending_path(staged: &Path) -> PathBuf {
    let mut name = staged.as_os_str().to_owned();
    name.push(".pending");
    PathBuf::from(name)
}

impl Pending {
    /// Writes the record atomically (temporary file, then rename), readable only by us. Not fsynced: like the staged
    /// data it describes, it survives the daemon's death, and a power loss only as far as the page cache was written.
    pub fn save(&self, staged: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let target = pending_path(staged);
        let mut tmp = target.clone().into_os_string();
        tmp.push(".tmp");
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &target)
    }

    pub fn load(sidecar: &Path) -> std::io::Result<Pending> {
        serde_json::from_slice(&std::fs::read(sidecar)?).map_err(std::io::Error::other)
    }
}

/// Staged files a previous run left for upload under `base`: `(staged file, record)` pairs from staging directories
/// whose process is gone.
pub fn leftovers(base: &Path) -> Vec<(PathBuf, Pending)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(base) else { return out };
    for dir in dirs.flatten() {
        let name = dir.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("s3cryptfs-staging-") else { continue };
        let pid: i32 = rest.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = pid > 0 && (pid as u32 == std::process::id() || unsafe { libc::kill(pid, 0) } == 0);
        if alive {
            continue;
        }
        let Ok(files) = std::fs::read_dir(dir.path()) else { continue };
        for f in files.flatten() {
            let sidecar = f.path();
            if sidecar.extension().is_none_or(|e| e != "pending") {
                continue;
            }
            let staged = sidecar.with_extension("");
            match Pending::load(&sidecar) {
                Ok(p) if staged.is_file() => out.push((staged, p)),
                Ok(_) => tracing::warn!(record = %sidecar.display(), "a recovery record without its staged file"),
                Err(e) => tracing::warn!(record = %sidecar.display(), error = %e, "unreadable recovery record"),
            }
        }
    }
    out
}

/// Staged content of one file.
pub struct Staged {
    pub file: File,
    pub path: PathBuf,
    /// Whether the file holds the object's full content (a file opened for writing is downloaded lazily, on the
    /// first write or truncate).
    pub loaded: bool,
    /// Changed since the last successful upload.
    pub dirty: bool,
    pub size: u64,
    /// A recovery record (see [`Pending`]) exists beside the staged file.
    pub recorded: bool,
}

impl Staged {
    /// A new state; a file created by this mount starts dirty (it must be uploaded even if nothing is written).
    pub fn new(file: File, path: PathBuf, loaded: bool, dirty: bool) -> Staged {
        crate::metrics::dirty_changed((false, 0), (dirty, 0));
        Staged { file, path, loaded, dirty, size: 0, recorded: false }
    }

    /// What this state counts in the dirty-files and dirty-bytes gauges. `dirty` and `size` change only through the
    /// methods below (and [`Staged::new`]), which report each change, so the gauges stay exact.
    fn share(&self) -> (bool, u64) {
        (self.dirty, self.size)
    }

    /// Changed (metadata only, say): upload on the next flush.
    pub fn mark_dirty(&mut self) {
        let before = self.share();
        self.dirty = true;
        crate::metrics::dirty_changed(before, self.share());
    }

    /// Uploaded, or no longer to be uploaded (unlinked while open): the recovery record goes too.
    pub fn mark_clean(&mut self) {
        let before = self.share();
        self.dirty = false;
        crate::metrics::dirty_changed(before, self.share());
        if self.recorded {
            let _ = std::fs::remove_file(pending_path(&self.path));
            self.recorded = false;
        }
    }

    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let before = self.share();
        self.file.write_all_at(data, offset)?;
        self.size = self.size.max(offset + data.len() as u64);
        self.dirty = true;
        crate::metrics::dirty_changed(before, self.share());
        Ok(())
    }

    pub fn truncate(&mut self, size: u64) -> std::io::Result<()> {
        let before = self.share();
        self.file.set_len(size)?;
        self.size = size;
        self.dirty = true;
        crate::metrics::dirty_changed(before, self.share());
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Forgotten by this process either way: it leaves the gauges even though dirty content stays on disk.
        crate::metrics::dirty_changed(self.share(), (false, 0));
        // Clean content needs no copy any more; dirty content is kept on disk for recovery and logged by the owner.
        if !self.dirty {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Per-inode write state shared by every handle of the inode. The mutex is also what orders an upload against a
/// rename or unlink of the same file: they take it (owned, so several can be held at once) for their whole duration.
pub type WriteState = Mutex<Staged>;
