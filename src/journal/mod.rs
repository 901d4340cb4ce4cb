//! The write journal: where files being written are staged until the store has them, and what a start does with
//! what a dead daemon left there.
//!
//! Why a journal and not a temporary directory: a staged file is the only copy of data the user was told is
//! written, so the code that runs after a crash decides whether it is lost, resurrected over newer data, or planted
//! by someone else. docs/FORMAT.md ("The write journal") has the layout and byte formats and docs/SEMANTICS.md the
//! promises; in short:
//!
//! ```text
//! BASE/                      0700, ours            (-o staging_dir=, default /var/lib/s3cryptfs/journal for root,
//!   <store id>/              0700, ours             $XDG_STATE_HOME/s3cryptfs/journal or ~/.local/state/… for users)
//!     journal.key            plaintext modes only: the root key of their records
//!     <run id>/              one per daemon run
//!       serving              flock(LOCK_EX) held from the start until the FUSE session ends (then: finishing)
//!       lock                 flock(LOCK_EX) held by the live daemon for its whole life
//!       journal              header: how the journal key is found (customer key fingerprint, KMS blob, local key)
//!       <n>.dat              staged content: sealed slots (cse-c, cse-kms, sse-c) or plaintext (none, sse-s3, sse-kms)
//!       <n>.rec              sealed record: path, attributes, the version it replaces, the upload stamp (and the
//!                            store's id of a multipart upload streaming it, for the next start to abort)
//!       <s>.dlog             sealed delete intents, appended (`delete_log`): an unlinked file's path and the version
//!                            it had, kept until the store has answered the delete sent after the unlink returned
//!                            (`fs::deletes`); `<n>.del`, one file per intent, from versions before the log
//! ```
//!
//! Liveness is the `flock`, not a pid: a zombie or a reused pid cannot hide a dead journal, and a live daemon's
//! journal is never taken over. A daemon whose mount has ended but which is still uploading (`fusermount3 -u`
//! returns before that) holds `lock` but no longer `serving`: a start of the same store waits for it to finish (up
//! to [`FINISH_WAIT`]) instead of skipping its journal and mounting over uploads still in flight. A start takes over
//! every other run directory of its store whose lock is free: it
//! authenticates each record (a record that does not open under the journal key is refused and logged, never
//! obeyed), hands the pairs to the filesystem for a conditional upload, removes staged files no record refers to,
//! and removes the run directory once it is empty. Every directory and file is checked like ssh's StrictModes
//! (see `dir`).
//!
//! Durability: records and staged data are written through to the page cache before a call returns but not fsynced,
//! so they survive the daemon's death (kill -9, a crash, the OOM killer), and a power loss only as far as the kernel
//! had written back. A file the user fsyncs is uploaded by that fsync.

mod delete_log;
pub mod dir;
#[cfg(test)]
pub(crate) use delete_log::pending_on_disk as pending_intents_on_disk;
pub mod file;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::crypto::journal::{self as jcrypto, SlotCipher, CHECK_LEN, FILE_ID_LEN};
use crate::crypto::{AeadBackend, JournalKey, KeyHistory};
use crate::kms::{KmsClient, KmsError};

pub use dir::{Dir, TrustError};
pub use file::StagedFile;

/// Journal header format version.
const HEADER_VERSION: u32 = 1;
/// Longest header or record read back: far above any real one, low enough that a planted file cannot exhaust memory.
const MAX_META_FILE: u64 = 64 << 10;
/// How long a start waits for a daemon of the same store that is finishing its final uploads (its mount has ended).
pub const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// The lock file held while a run serves (see the module docs).
const SERVING: &str = "serving";
/// The KMS encryption-context entry that binds a journal's data key to its run.
pub const KMS_CONTEXT_JOURNAL: &str = "s3cryptfs:journal";

/// How a journal's root key is found.
#[derive(Clone)]
pub enum Keying {
    /// Modes that send plaintext to the store (none, sse-s3, sse-kms): staged data is plaintext and records are
    /// sealed under a random key kept in the store's journal directory.
    Local,
    /// cse-c and sse-c: derived from the customer key (the history's first key for a new journal).
    Customer(Arc<KeyHistory>),
    /// cse-kms: a data key from KMS GenerateDataKey, kept wrapped in the header.
    Kms(Arc<KmsClient>),
}

/// Why the journal cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("getting a journal key from KMS: {0}")]
    Kms(#[from] KmsError),
}

/// The version of the object a staged file replaces: uploads are conditional on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseVersion {
    /// Nothing was at the path (a new file).
    Absent,
    /// The object with this ETag.
    Etag(String),
    /// Unknown (the store gives no ETag): the upload is unconditional.
    Any,
    /// The staged file holds only some chunks of the file: the rest is the object with the patch's ETag
    /// (`fs::sparse`). Only a record says this (a running mount keeps the state beside `Etag`); a start that does
    /// not know this variant refuses the record instead of uploading a file of holes.
    Patch(Patch),
}

/// A sparse staged file (`fs::sparse`): what it is a patch of, and which chunks it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// The base version's ETag: the update is conditional on it.
    pub etag: String,
    /// The base version's stored size.
    pub stored_size: u64,
    /// The base version's plaintext length.
    pub base_len: u64,
    /// Bytes of the base still part of the file: past it, chunks that are not staged read as zeros.
    pub valid_len: u64,
    /// The staged chunks (64 KiB each), as `[first, end)` ranges, sorted and disjoint.
    pub chunks: Vec<(u64, u64)>,
}

/// What the next start needs to upload a staged file: sealed into `<n>.rec` beside `<n>.dat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The file's path in the mount (its object key).
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds) since the epoch.
    pub mtime: (i64, u32),
    /// The version the staged content replaces.
    pub base: BaseVersion,
    /// Stamped into the metadata of the upload that publishes this content, so a recovery that finds it there
    /// knows the upload happened before the crash and does not repeat it.
    pub upload_id: String,
    /// Stamps of earlier uploads of this content whose outcome was unknown (timed out): an object carrying one is a
    /// version this mount wrote, so replacing it loses nobody's update.
    #[serde(default)]
    pub prior_ids: Vec<String>,
    /// The staged file's id (hex), which keys its slots; empty for plaintext journals.
    pub file_id: String,
    /// When the record was written (seconds, nanoseconds since the epoch).
    pub written_at: (i64, u32),
    /// The multipart upload of a stream in flight (`upload::stream`): left open in the store by a daemon that died,
    /// so the start that takes the record over aborts it. Absent from records of older versions and of files not
    /// streaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<OpenUpload>,
}

/// A multipart upload the store may hold open (see [`Record::multipart`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenUpload {
    /// Its object key (the path the stream started at; a rename since ends the stream, not the record).
    pub key: String,
    /// The store's id of the upload (S3's UploadId; the local store's staged file name).
    pub id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    store: String,
    run: String,
    /// "local", "customer" or "kms".
    keying: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_blob: Option<String>,
    /// Hex of the check value of the journal key (see `crypto::journal`).
    check: String,
}

pub(crate) use crate::crypto::hex::{hex, unhex};

/// A fresh random upload stamp.
pub fn new_upload_id() -> String {
    hex(&jcrypto::new_file_id())
}

/// The directory name of a store's journals: not the URL itself (it may be long or hold `/`), a hash of it.
pub(crate) fn store_dir_name(store: &str) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(store.as_bytes())[..16])
}

fn data_name(n: u64) -> String {
    format!("{n}.dat")
}

fn record_name(n: u64) -> String {
    format!("{n}.rec")
}

fn delete_name(n: u64) -> String {
    format!("{n}.del")
}

/// A delete that an unlink promised and the store may not have received yet: sealed into an entry of the delete
/// intent log (`delete_log`), or into `<n>.del` by versions before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteIntent {
    /// The unlinked file's path in the mount (its object key).
    pub path: String,
    /// The ETag of the version unlinked: a start deletes the object only while it is still that version.
    pub etag: String,
}

/// The directory of one run, held (its lock taken) by whoever has it open.
#[derive(Debug)]
struct RunDir {
    dir: Dir,
    name: String,
    parent: Arc<Dir>,
    _lock: File,
    /// This run's `serving` lock, dropped when its mount ends (only ours, never a taken-over run's).
    serving: std::sync::Mutex<Option<File>>,
}

impl RunDir {
    /// Removes the run directory if nothing but its lock and header is left (a clean stop, or a recovery that
    /// uploaded everything).
    fn remove_if_done(&self) -> bool {
        let Ok(entries) = self.dir.entries() else { return false };
        if entries.iter().any(|e| e != "lock" && e != "journal" && e != SERVING) {
            return false;
        }
        let _ = self.dir.remove(SERVING);
        let _ = self.dir.remove("journal");
        let _ = self.dir.remove("lock");
        self.parent.remove_dir(&self.name).is_ok()
    }
}

/// What looking at another run's directory found.
enum Taken {
    /// Dead and taken over: the staged files its records ask to upload.
    Done(Vec<Leftover>),
    /// Mounted, or starting: not ours.
    Live,
    /// Its mount has ended and it is still uploading: wait for it.
    Finishing,
}

/// The journal of this daemon run.
pub struct Journal {
    store: String,
    aead: AeadBackend,
    keying: Keying,
    key: JournalKey,
    run_id: String,
    run: RunDir,
    store_dir: Arc<Dir>,
    counter: AtomicU64,
    /// Delete intents of dead runs found by [`Journal::take_over`], for [`Journal::take_deletes`].
    taken_deletes: std::sync::Mutex<Vec<LeftoverDelete>>,
    /// This run's delete intents.
    deletes: delete_log::Log,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("run", &self.run.dir.path()).finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens the base (checked), creates this run's directory, takes its lock and writes its header. In cse-kms this
    /// costs one GenerateDataKey.
    pub async fn open(base: &Path, store: &str, keying: Keying, aead: AeadBackend) -> Result<Journal, JournalError> {
        let base = Dir::open_base(base)?;
        let store_dir = Arc::new(base.subdir(&store_dir_name(store), true)?.ok_or_else(|| JournalError::Io {
            path: base.path().to_path_buf(),
            source: io::Error::other("the store's journal directory vanished while it was created"),
        })?);
        let run_id = hex(&jcrypto::new_file_id());
        let (root, mut header) = Self::new_root(&store_dir, store, &run_id, &keying).await?;
        let key = jcrypto::derive_journal_key(&root, store, &run_id);
        header.check = hex(&jcrypto::journal_check(&key));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| JournalError::Io { path: p, source }
        };
        let dir = store_dir.create_subdir(&run_id)?;
        // `serving` first, and appearing only once locked (a temporary name, then a rename), so that no start ever
        // sees this run's `serving` free while it runs.
        let serving_tmp = format!("{SERVING}.tmp");
        let serving = dir.create_file(&serving_tmp).map_err(io(dir.path()))?;
        if !dir::try_lock(&serving).map_err(io(dir.path()))? {
            return Err(JournalError::Io { path: dir.path().to_path_buf(), source: io::Error::other("a new journal is locked by someone else") });
        }
        dir.rename_noreplace(&serving_tmp, SERVING).map_err(io(dir.path()))?;
        let lock = dir.create_file("lock").map_err(io(dir.path()))?;
        if !dir::try_lock(&lock).map_err(io(dir.path()))? {
            return Err(JournalError::Io { path: dir.path().to_path_buf(), source: io::Error::other("a new journal is locked by someone else") });
        }
        let text = serde_json::to_vec(&header).map_err(|e| JournalError::Io { path: dir.path().to_path_buf(), source: io::Error::other(e) })?;
        dir.write_file("journal", &text).map_err(io(dir.path()))?;
        let serving = std::sync::Mutex::new(Some(serving));
        let run = RunDir { dir, name: run_id.clone(), parent: store_dir.clone(), _lock: lock, serving };
        Ok(Journal {
            store: store.to_string(),
            aead,
            keying,
            key,
            run_id,
            run,
            store_dir,
            counter: AtomicU64::new(0),
            taken_deletes: Default::default(),
            deletes: Default::default(),
        })
    }

    async fn new_root(
        store_dir: &Dir,
        store: &str,
        run_id: &str,
        keying: &Keying,
    ) -> Result<(zeroize::Zeroizing<[u8; 32]>, Header), JournalError> {
        let mut header = Header {
            version: HEADER_VERSION,
            store: store.to_string(),
            run: run_id.to_string(),
            keying: String::new(),
            fingerprint: None,
            kms_key_id: None,
            kms_blob: None,
            check: String::new(),
        };
        let mut root = zeroize::Zeroizing::new([0u8; 32]);
        match keying {
            Keying::Local => {
                header.keying = "local".into();
                let local = Self::local_key(store_dir, true)?.ok_or_else(|| JournalError::Io {
                    path: store_dir.path().join("journal.key"),
                    source: io::Error::other("missing"),
                })?;
                root.copy_from_slice(&local[..]);
            }
            Keying::Customer(keys) => {
                header.keying = "customer".into();
                let k = keys.encrypting_key();
                header.fingerprint = Some(k.fingerprint().to_string());
                root.copy_from_slice(k.as_bytes());
            }
            Keying::Kms(kms) => {
                header.keying = "kms".into();
                let generated = kms.generate_data_key(&[(KMS_CONTEXT_JOURNAL, run_id.to_string())]).await?;
                header.kms_key_id = Some(generated.key_arn.clone());
                header.kms_blob = Some(hex(&generated.blob));
                root.copy_from_slice(generated.data_key.as_bytes());
            }
        }
        Ok((root, header))
    }

    /// The root key the disk cache derives its keys from (`cache::disk`): the customer key (cse-c, sse-c) or the
    /// local journal key (plaintext modes), so a later mount of the store opens the cache again. `None` in cse-kms,
    /// whose journal keys are per run: the cache keeps a KMS-wrapped key of its own.
    pub fn cache_root(&self) -> Result<Option<zeroize::Zeroizing<[u8; 32]>>, JournalError> {
        match &self.keying {
            Keying::Local => Self::local_key(&self.store_dir, true),
            Keying::Customer(keys) => Ok(Some(zeroize::Zeroizing::new(*keys.encrypting_key().as_bytes()))),
            Keying::Kms(_) => Ok(None),
        }
    }

    /// The plaintext modes' record key, created on first use.
    fn local_key(store_dir: &Dir, create: bool) -> Result<Option<zeroize::Zeroizing<[u8; 32]>>, JournalError> {
        let path = store_dir.path().join("journal.key");
        let io = |source| JournalError::Io { path: path.clone(), source };
        if let Some(bytes) = store_dir.read_file("journal.key", 32)? {
            let bytes = zeroize::Zeroizing::new(bytes);
            let mut k = zeroize::Zeroizing::new([0u8; 32]);
            if bytes.len() != 32 {
                return Err(io(io::Error::new(io::ErrorKind::InvalidData, "not a 32-byte key")));
            }
            k.copy_from_slice(&bytes);
            return Ok(Some(k));
        }
        if !create {
            return Ok(None);
        }
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        crate::crypto::secret::fill_random(&mut k[..]);
        let tmp = format!("journal.key.{}", hex(&jcrypto::new_file_id()[..4]));
        {
            use std::io::Write;
            let mut f = store_dir.create_file(&tmp).map_err(io)?;
            f.write_all(&k[..]).map_err(io)?;
        }
        // Into place without replacing: a concurrent start that won the race keeps its key, and we read it.
        match store_dir.rename_noreplace(&tmp, "journal.key") {
            Ok(()) => Ok(Some(k)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = store_dir.remove(&tmp);
                Self::local_key(store_dir, false)
            }
            Err(e) => {
                let _ = store_dir.remove(&tmp);
                Err(io(e))
            }
        }
    }

    /// Whether the disk under the journal is running out of space: less than a quarter of it, or less than 1 GiB,
    /// is free to this user. Files streamed to the store then stop keeping a local copy of what the store has taken.
    /// An unknown answer is "no": the journal then behaves as it always did.
    pub fn low_on_space(&self) -> bool {
        let Ok(path) = std::ffi::CString::new(self.run_path().as_os_str().as_encoded_bytes()) else { return false };
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a statvfs value to fill.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return false;
        }
        let unit = st.f_frsize as u64;
        let free = st.f_bavail as u64 * unit;
        let total = st.f_blocks as u64 * unit;
        free < (1u64 << 30).min(total / 4)
    }

    /// A new unnamed file in this run's directory ([`Dir::unnamed_file`]): the disk cache's scratch.
    pub fn scratch_file(&self) -> io::Result<File> {
        self.run.dir.unnamed_file()
    }

    /// Where this run's files are (for log lines).
    pub fn run_path(&self) -> &Path {
        self.run.dir.path()
    }

    /// Whether staged content is sealed (no plaintext on disk).
    pub fn is_sealed(&self) -> bool {
        !matches!(self.keying, Keying::Local)
    }

    /// A new empty staged file and its number.
    pub fn new_file(&self) -> io::Result<(u64, StagedFile, [u8; FILE_ID_LEN])> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let file = self.run.dir.create_file(&data_name(n))?;
        let id = jcrypto::new_file_id();
        let staged = if self.is_sealed() {
            StagedFile::Sealed { file, cipher: SlotCipher::new(&self.key, self.aead, id) }
        } else {
            StagedFile::Plain(file)
        };
        Ok((n, staged, id))
    }

    /// Writes (or replaces) the sealed record of staged file `n`.
    pub fn save_record(&self, n: u64, record: &Record) -> io::Result<()> {
        let name = record_name(n);
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(record).map_err(io::Error::other)?);
        let sealed = jcrypto::seal_record(&self.key, self.aead, &self.store, &self.run_id, &name, &plain);
        self.run.dir.write_file(&name, &sealed)
    }

    /// Appends a sealed delete intent to the run's log and returns its number, for [`Journal::remove_delete`] once
    /// the store has it.
    pub fn save_delete(&self, intent: &DeleteIntent) -> io::Result<u64> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(intent).map_err(io::Error::other)?);
        let sealed = jcrypto::seal_record(&self.key, self.aead, &self.store, &self.run_id, &delete_name(n), &plain);
        self.deletes.append(&self.run.dir, n, &sealed, || self.counter.fetch_add(1, Ordering::Relaxed))?;
        Ok(n)
    }

    /// The store has answered the delete of intent `n`.
    pub fn remove_delete(&self, n: u64) {
        if let Err(e) = self.deletes.settle(&self.run.dir, n) {
            tracing::error!(journal = %self.run.dir.path().display(), error = %e, "could not mark a finished delete intent settled; the next start checks it again");
        }
    }

    /// The delete intents of the runs [`Journal::take_over`] took over (once: a second call returns nothing).
    pub fn take_deletes(&self) -> Vec<LeftoverDelete> {
        std::mem::take(&mut *self.taken_deletes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Removes the record of staged file `n`: it is no longer to be uploaded by anyone.
    pub fn remove_record(&self, n: u64) -> io::Result<()> {
        self.run.dir.remove(&record_name(n))
    }

    /// Removes staged file `n` and its record.
    pub fn remove_file(&self, n: u64) -> io::Result<()> {
        self.run.dir.remove(&record_name(n))?;
        self.remove_data(n)
    }

    /// Removes staged file `n`, whose record is gone already (one syscall less per uploaded file than
    /// [`Journal::remove_file`]).
    pub fn remove_data(&self, n: u64) -> io::Result<()> {
        self.run.dir.remove(&data_name(n))
    }

    /// The on-disk path of staged file `n` (for log lines only).
    pub fn file_path(&self, n: u64) -> PathBuf {
        self.run.dir.path().join(data_name(n))
    }

    /// The mount has ended: from now on a start of this store waits for this run to finish (see the module docs)
    /// instead of taking it for a live mount.
    pub fn stop_serving(&self) {
        self.run.serving.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// At a clean stop: removes this run's directory if nothing is left to upload (dropping the journal does the
    /// same). Returns whether it did.
    pub fn close(&self) -> bool {
        self.deletes.close(&self.run.dir);
        self.run.remove_if_done()
    }

    /// Takes over every other journal of this store whose daemon is gone (its lock is free): returns the staged
    /// files their records ask to upload, after removing what no record refers to. Journals that cannot be opened
    /// (another key, a forged header) are logged and left alone; so are records that fail authentication.
    pub async fn take_over(&self) -> Vec<Leftover> {
        let mut out = Vec::new();
        let runs = match self.store_dir.entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(dir = %self.store_dir.path().display(), error = %e, "cannot list the store's journals");
                return out;
            }
        };
        for name in runs {
            if name.starts_with("journal.key.") {
                // A key file a start was writing when it died (it is renamed into place at once otherwise). One
                // younger than a minute may be a concurrent start's, about to be renamed: left alone.
                let stale = std::fs::symlink_metadata(self.store_dir.path().join(&name))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(60));
                if stale {
                    let _ = self.store_dir.remove(&name);
                }
                continue;
            }
            if name == self.run_id || name == "journal.key" {
                continue;
            }
            match self.take_over_finished(&name).await {
                Ok(mut found) => out.append(&mut found),
                Err(e) => tracing::error!(journal = %self.store_dir.path().join(&name).display(), error = %e, "journal left alone"),
            }
        }
        out
    }

    /// [`Self::take_over_run`], after waiting (up to [`FINISH_WAIT`]) for a run that is finishing its uploads.
    async fn take_over_finished(&self, name: &str) -> Result<Vec<Leftover>, JournalError> {
        let started = std::time::Instant::now();
        let mut logged = false;
        let mut extended = None;
        loop {
            match self.take_over_run(name).await? {
                Taken::Done(found) => return Ok(found),
                Taken::Live => return Ok(Vec::new()),
                Taken::Finishing if started.elapsed() >= FINISH_WAIT => {
                    tracing::warn!(
                        journal = %self.store_dir.path().join(name).display(),
                        waited_secs = FINISH_WAIT.as_secs(),
                        "a previous daemon of this store is still finishing its uploads; mounting without waiting longer (what it cannot upload, the next start does)"
                    );
                    return Ok(Vec::new());
                }
                Taken::Finishing => {
                    if !logged {
                        tracing::warn!(journal = %self.store_dir.path().join(name).display(), "a previous daemon of this store is finishing its uploads (its mount has ended); waiting for it before mounting");
                        logged = true;
                    }
                    // Under systemd (Type=notify) the wait must not run into TimeoutStartSec: extend it as we go.
                    if extended.is_none_or(|t: std::time::Instant| t.elapsed() >= std::time::Duration::from_secs(10)) {
                        extended = Some(std::time::Instant::now());
                        crate::notify::notify("EXTEND_TIMEOUT_USEC=20000000\nSTATUS=waiting for a previous daemon of this store to finish its uploads");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn take_over_run(&self, name: &str) -> Result<Taken, JournalError> {
        let path = self.store_dir.path().join(name);
        let ioe = |source| JournalError::Io { path: path.clone(), source };
        let Some(dir) = self.store_dir.subdir(name, false)? else { return Ok(Taken::Done(Vec::new())) };
        // A run whose `serving` is held is mounted (or starting): never touched. One without the file is either
        // from before `serving` existed or died before creating it; its `lock` decides.
        let serving = match dir.open_file(SERVING, true)? {
            Some(f) if !dir::try_lock(&f).map_err(ioe)? => return Ok(Taken::Live),
            other => other.is_some(),
        };
        let lock = match dir.open_file("lock", true)? {
            Some(f) => f,
            // A start that died before creating its lock: nothing in it was ever acknowledged under a record.
            None => dir.create_file("lock").map_err(ioe)?,
        };
        if !dir::try_lock(&lock).map_err(ioe)? {
            // Alive: finishing if it has stopped serving, else (no `serving` file) taken for a live mount.
            return Ok(if serving { Taken::Finishing } else { Taken::Live });
        }
        let serving = std::sync::Mutex::new(None);
        let run = Arc::new(RunDir { dir, name: name.to_string(), parent: self.store_dir.clone(), _lock: lock, serving });
        let header = match run.dir.read_file("journal", MAX_META_FILE)? {
            Some(h) => h,
            None => {
                // Died before its header: no record can have been sealed. Remove what is there.
                Self::remove_orphans(&run, &BTreeSet::new());
                return Ok(Taken::Done(Vec::new()));
            }
        };
        let header: Header = serde_json::from_slice(&header)
            .map_err(|e| ioe(io::Error::new(io::ErrorKind::InvalidData, format!("unreadable header: {e}"))))?;
        if header.version != HEADER_VERSION {
            return Err(ioe(io::Error::other(format!("journal format {} is not one this s3cryptfs knows", header.version))));
        }
        if header.store != self.store || header.run != name {
            return Err(ioe(io::Error::other("its header names another store or journal: refused")));
        }
        let (key, sealed) = self.key_of(&header, &path).await?;
        let check = unhex(&header.check).unwrap_or_default();
        if check.len() != CHECK_LEN || check != jcrypto::journal_check(&key) {
            return Err(ioe(io::Error::other("its header does not match the key it names (forged or damaged): refused")));
        }
        let entries = run.dir.entries().map_err(ioe)?;
        let mut out = Vec::new();
        let mut kept = BTreeSet::new();
        for e in &entries {
            let Some(n) = e.strip_suffix(".del").and_then(|n| n.parse::<u64>().ok()) else { continue };
            let del_name = delete_name(n);
            let intent = match run.dir.read_file(&del_name, MAX_META_FILE) {
                Ok(Some(bytes)) => jcrypto::open_record(&key, self.aead, &self.store, name, &del_name, &bytes)
                    .ok()
                    .and_then(|plain| serde_json::from_slice::<DeleteIntent>(&plain).ok()),
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(intent = %run.dir.path().join(&del_name).display(), error = %e, "delete intent not trusted; left alone");
                    continue;
                }
            };
            match intent {
                Some(intent) => self
                    .taken_deletes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(LeftoverDelete { intent, n, from: IntentFrom::File(run.clone()) }),
                None => tracing::error!(
                    intent = %run.dir.path().join(&del_name).display(),
                    "delete intent fails authentication (forged or damaged): refused, nothing is deleted for it"
                ),
            }
        }
        for e in &entries {
            if e.strip_suffix(delete_log::SEGMENT_SUFFIX).and_then(|s| s.parse::<u64>().ok()).is_some() {
                self.take_segment(&run, &key, e);
            }
        }
        for e in &entries {
            let Some(n) = e.strip_suffix(".rec").and_then(|n| n.parse::<u64>().ok()) else { continue };
            let rec_name = record_name(n);
            let record = match run.dir.read_file(&rec_name, MAX_META_FILE) {
                Ok(Some(bytes)) => jcrypto::open_record(&key, self.aead, &self.store, name, &rec_name, &bytes)
                    .ok()
                    .and_then(|plain| serde_json::from_slice::<Record>(&plain).ok()),
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(record = %run.dir.path().join(&rec_name).display(), error = %e, "journal record not trusted; left alone");
                    kept.insert(n);
                    continue;
                }
            };
            let Some(record) = record else {
                tracing::error!(
                    record = %run.dir.path().join(&rec_name).display(),
                    "journal record fails authentication (forged or damaged): refused, nothing of it is uploaded"
                );
                kept.insert(n);
                continue;
            };
            let data = match run.dir.open_file(&data_name(n), false) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    tracing::warn!(key = %record.path, record = %run.dir.path().join(&rec_name).display(), "journal record without its staged data; removed");
                    let _ = run.dir.remove(&rec_name);
                    continue;
                }
                Err(e) => {
                    tracing::error!(key = %record.path, error = %e, "staged data not trusted; left alone");
                    kept.insert(n);
                    continue;
                }
            };
            let file = if sealed {
                let id = unhex(&record.file_id).and_then(|v| <[u8; FILE_ID_LEN]>::try_from(v).ok());
                let Some(id) = id else {
                    tracing::error!(key = %record.path, "journal record has no valid file id; left alone");
                    kept.insert(n);
                    continue;
                };
                StagedFile::Sealed { file: data, cipher: SlotCipher::new(&key, self.aead, id) }
            } else {
                StagedFile::Plain(data)
            };
            let record_mtime = std::fs::symlink_metadata(run.dir.path().join(&rec_name)).and_then(|m| m.modified()).ok();
            kept.insert(n);
            out.push(Leftover { record, file, record_mtime, n, run: run.clone() });
        }
        Self::remove_orphans(&run, &kept);
        Ok(Taken::Done(out))
    }

    /// Hands over the authentic pending intents of a dead run's delete log segment `name`.
    fn take_segment(&self, run: &Arc<RunDir>, key: &JournalKey, name: &str) {
        let path = run.dir.path().join(name);
        let (parsed, file, len) = match delete_log::TakenSegment::open(run, name) {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => return tracing::error!(log = %path.display(), error = %e, "delete intent log not trusted; left alone"),
        };
        if parsed.torn {
            tracing::warn!(log = %path.display(), "the last entry of a delete intent log is incomplete (its daemon died writing it, before its unlink returned): ignored");
        }
        let mut intents = Vec::new();
        let mut refused = false;
        for (n, sealed) in parsed.pending {
            let intent = jcrypto::open_record(key, self.aead, &self.store, &run.name, &delete_name(n), &sealed)
                .ok()
                .and_then(|plain| serde_json::from_slice::<DeleteIntent>(&plain).ok());
            match intent {
                Some(intent) => intents.push((n, intent)),
                None => {
                    refused = true;
                    tracing::error!(log = %path.display(), intent = n, "delete intent fails authentication (forged or damaged): refused, nothing is deleted for it");
                }
            }
        }
        if intents.is_empty() && !refused {
            let _ = run.dir.remove(name);
            return;
        }
        let Some(s) = name.strip_suffix(delete_log::SEGMENT_SUFFIX).and_then(|s| s.parse().ok()) else { return };
        let seg = delete_log::TakenSegment::new(run.clone(), s, file, len, intents.len(), refused);
        let mut taken = self.taken_deletes.lock().unwrap_or_else(|e| e.into_inner());
        for (n, intent) in intents {
            taken.push(LeftoverDelete { intent, n, from: IntentFrom::Log(seg.clone()) });
        }
    }

    /// The key of another run's journal, from its header; and whether its staged data is sealed.
    async fn key_of(&self, header: &Header, path: &Path) -> Result<(JournalKey, bool), JournalError> {
        let refuse = |why: String| JournalError::Io { path: path.to_path_buf(), source: io::Error::other(why) };
        let mut root = zeroize::Zeroizing::new([0u8; 32]);
        let sealed = match (header.keying.as_str(), &self.keying) {
            ("local", _) => {
                let k = Self::local_key(&self.store_dir, false)?.ok_or_else(|| refuse("its record key (journal.key) is missing".into()))?;
                root.copy_from_slice(&k[..]);
                false
            }
            ("customer", Keying::Customer(keys)) => {
                let fp = header.fingerprint.clone().unwrap_or_default();
                let key = keys
                    .keys()
                    .find(|k| k.fingerprint().to_string() == fp)
                    .ok_or_else(|| refuse(format!("it was written under customer key {fp}, which this mount's key file does not have; mount with that key to recover it")))?;
                root.copy_from_slice(key.as_bytes());
                true
            }
            ("kms", Keying::Kms(kms)) => {
                let key_id = header.kms_key_id.clone().unwrap_or_default();
                let blob = unhex(header.kms_blob.as_deref().unwrap_or("")).ok_or_else(|| refuse("its KMS blob is not hex".into()))?;
                let dk = kms.decrypt(&key_id, &blob, &[(KMS_CONTEXT_JOURNAL, header.run.clone())]).await?;
                root.copy_from_slice(dk.as_bytes());
                true
            }
            (other, _) => {
                return Err(refuse(format!(
                    "it was written by a mount whose journal key is of kind '{other}', which this mount does not have; mount the store with the mode and key it was written with to recover it"
                )))
            }
        };
        Ok((jcrypto::derive_journal_key(&root, &self.store, &header.run), sealed))
    }

    /// Removes staged data and temporary files of a taken-over run that no kept record refers to.
    fn remove_orphans(run: &RunDir, kept: &BTreeSet<u64>) {
        let Ok(entries) = run.dir.entries() else { return };
        for e in entries {
            if e == "lock" || e == "journal" {
                continue;
            }
            if e.ends_with(".tmp") {
                let _ = run.dir.remove(&e);
                continue;
            }
            if let Some(n) = e.strip_suffix(".dat").and_then(|n| n.parse::<u64>().ok()) {
                if !kept.contains(&n) {
                    match run.dir.remove(&e) {
                        Ok(()) => tracing::warn!(file = %run.dir.path().join(&e).display(), "removed staged data of a dead daemon that no record refers to (never to be uploaded: deleted, replaced or already uploaded)"),
                        Err(err) => tracing::error!(file = %run.dir.path().join(&e).display(), error = %err, "could not remove orphan staged data"),
                    }
                }
            }
        }
    }
}

/// A staged file a dead daemon's journal asks to upload. Dropping it without [`Leftover::done`] keeps it for the
/// next start; the run directory goes once nothing is left in it.
pub struct Leftover {
    pub record: Record,
    pub file: StagedFile,
    /// When the record was last written: staged data written after it carries its own mtime.
    pub record_mtime: Option<SystemTime>,
    n: u64,
    run: Arc<RunDir>,
}

impl std::fmt::Debug for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leftover").field("path", &self.record.path).field("staged", &self.location()).finish()
    }
}

impl Leftover {
    /// Where the staged data is (for log lines).
    pub fn location(&self) -> PathBuf {
        self.run.dir.path().join(data_name(self.n))
    }

    /// The data is in the store (or deliberately dropped): remove the record, then the data.
    pub fn done(self) {
        if let Err(e) = self.run.dir.remove(&record_name(self.n)) {
            tracing::error!(record = %self.run.dir.path().join(record_name(self.n)).display(), error = %e, "could not remove a finished journal record");
            return;
        }
        let _ = self.run.dir.remove(&data_name(self.n));
    }
}

/// A delete a dead daemon's journal says an unlink promised. Dropping it without [`LeftoverDelete::done`] keeps it
/// for the next start.
pub struct LeftoverDelete {
    pub intent: DeleteIntent,
    n: u64,
    from: IntentFrom,
}

/// Where a dead run kept an intent.
enum IntentFrom {
    /// `<n>.del` (versions before the log).
    File(Arc<RunDir>),
    /// A segment of its log.
    Log(Arc<delete_log::TakenSegment>),
}

impl std::fmt::Debug for LeftoverDelete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeftoverDelete").field("path", &self.intent.path).finish()
    }
}

impl LeftoverDelete {
    /// The delete is settled (done, or deliberately not done): forget the intent.
    pub fn done(self) {
        match &self.from {
            IntentFrom::File(run) => {
                if let Err(e) = run.dir.remove(&delete_name(self.n)) {
                    tracing::error!(intent = %run.dir.path().join(delete_name(self.n)).display(), error = %e, "could not remove a finished delete intent");
                }
            }
            IntentFrom::Log(seg) => seg.settle(self.n),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Before the run directory's own drop, which keeps the run while anything but its lock and header is there.
        self.deletes.close(&self.run.dir);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Whoever held it last (this run at its end, or a start that took it over and handled its leftovers)
        // removes it when nothing is left to upload. A daemon killed outright runs no drop: its run stays.
        self.remove_if_done();
    }
}

/// The journal base to use when none is configured: private, and surviving a reboot (never /tmp or /var/tmp).
pub fn default_base() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    base_for(euid, std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"), || {
        // No HOME (a bare service): the passwd entry's.
        // SAFETY: getpwuid returns a pointer into static storage or NULL; we copy the string at once.
        unsafe {
            let pw = libc::getpwuid(euid);
            if pw.is_null() || (*pw).pw_dir.is_null() {
                PathBuf::from("/")
            } else {
                PathBuf::from(std::ffi::CStr::from_ptr((*pw).pw_dir).to_string_lossy().into_owned())
            }
        }
    })
}

/// [`default_base`] for user `euid` with these `XDG_STATE_HOME` and `HOME` values (relative ones are ignored, as the
/// XDG specification says) and this passwd home directory.
fn base_for(
    euid: u32,
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    passwd_home: impl FnOnce() -> PathBuf,
) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/s3cryptfs/journal");
    }
    if let Some(d) = xdg_state_home.filter(|d| Path::new(d).is_absolute()) {
        return PathBuf::from(d).join("s3cryptfs/journal");
    }
    let home = home.map(PathBuf::from).filter(|h| h.is_absolute()).unwrap_or_else(passwd_home);
    home.join(".local/state/s3cryptfs/journal")
}

#[cfg(test)]
mod tests;
