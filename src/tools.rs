//! Offline tools: `s3cryptfs cat`, `ls` and `verify` read an encrypted store without mounting it.
//!
//! Why: an encrypted store must never be a trap. An operator without FUSE (a container, CI, a rescue shell) still
//! needs to get a file out or see what is there. Both tools drive the same filesystem core the mount serves
//! (`fs::Fs`, read-only), so they read every format the mount reads (own format versions 1–3, S3 Encryption Client
//! objects, plaintext modes) with the same checks: a chunk that fails authentication, a path binding that names
//! another object, a truncated or extended object are errors, never bytes.
//!
//! What a failed `cat` leaves behind:
//! - with `--output FILE` (or `-o FILE`): nothing. The bytes go to a temporary file beside FILE, which is renamed to
//!   FILE only once the last byte was authenticated, and removed otherwise;
//! - on standard output: the bytes before the failure have been written (the tool streams; a file may be larger
//!   than memory), so a failed run is signalled by its exit status (1) and a line on stderr that says how many bytes
//!   went out and that they are not the whole file. Scripts must check the status, as with any streaming decryptor
//!   (`gpg -d`, `age -d`, `rclone cat`).
//!
//! `verify` reads every file of a tree through the same core, in parallel, and throws the bytes away: a file that
//! reads to its end had every chunk, its path binding and its envelope authenticated. Failures are sorted into
//! kinds ([`Failure`]) from the core's typed errors.
//!
//! The core needs a write journal even read-only; the tools give it a private temporary directory that is removed
//! at exit, so nothing of theirs stays on disk.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::cache::PageCache;
use crate::cli::{CatArgs, LsArgs, ToolOptions, VerifyArgs};
use crate::config::MountConfig;
use crate::crypto::{Envelope, Header, HEADER_LEN};
use crate::fs::{FileKind, Fs, FsConfig, OpenMode, ROOT_INO};
use crate::object::{Codec, FormatHint, StoredFormat};
use crate::store::{Backend, ObjectKey};

/// Bytes asked of the core per read.
const READ_LEN: u32 = 1 << 20;

/// Page cache of a tool: it reads each byte once.
const TOOL_CACHE: u64 = 32 << 20;

/// A read-only core over the store, as a mount would have it, with what keeps it alive.
struct Core {
    fs: Arc<Fs>,
    backend: Arc<dyn Backend>,
    codec: Codec,
    rt: tokio::runtime::Runtime,
    _journal_dir: tempfile::TempDir,
}

/// Mount options as `config::split_options` gives them.
type Options = Vec<(String, Option<String>)>;

/// Splits the `-o` values into mount options and, for `cat`, the output file: a value with `=` or `,`, or a word
/// that is a mount option (`ro`), is options; a value with `/` or `.` in it names the output file. Any other word is
/// refused: a misspelt option (`-o require_commitmnet`) must not become a file of plaintext named after it.
fn split_o(values: &[String], store: &str) -> anyhow::Result<(Options, Vec<String>)> {
    let mut pairs = Vec::new();
    let mut files = Vec::new();
    for v in values {
        if v.contains(['=', ',']) {
            pairs.extend(crate::config::split_options(v));
        } else if v.contains(['/', '.']) {
            files.push(v.clone());
        } else {
            // Parsed alone, a word that is no option is refused as unknown; any other answer means it is one.
            let parsed =
                MountConfig::from_options(store.into(), PathBuf::from("/"), true, &crate::config::split_options(v));
            if matches!(parsed, Err(crate::config::ConfigError::UnknownOption(_))) {
                bail!("-o {v}: not an option; to name the output file use --output {v} (or -o ./{v})");
            }
            pairs.extend(crate::config::split_options(v));
        }
    }
    Ok((pairs, files))
}

/// `check_key`: refuse to start when the key does not open a sample object (cat, ls); verify checks every object
/// instead and reports a wrong key per object.
fn open_core(
    store: &str,
    opts: &ToolOptions,
    mut pairs: Vec<(String, Option<String>)>,
    check_key: bool,
) -> anyhow::Result<Core> {
    if let Some(mode) = &opts.mode {
        pairs.push(("mode".into(), Some(mode.clone())));
    }
    if let Some(file) = &opts.key_file {
        pairs.push(("key_file".into(), Some(file.clone())));
    }
    // Reading only, whatever the options say.
    pairs.push(("ro".into(), None));
    let config = MountConfig::from_options(store.to_string(), PathBuf::from("/"), true, &pairs)?;
    crate::daemon::harden_process()?;
    // Before any thread exists: key_env= edits the environment, which is only safe single-threaded.
    let keys = match &config.key_source {
        Some(source) => Some(Arc::new(crate::keys::load(source)?)),
        None => None,
    };
    if let Some(keys) = &keys {
        if !crate::keys::lock_in_memory(keys) {
            eprintln!("s3cryptfs: could not lock the keys in memory (RLIMIT_MEMLOCK); they may be written to swap");
        }
    }
    let rsa_key = match &config.rsa_key_file {
        Some(path) => Some(Arc::new(crate::keys::load_rsa_key_file(path)?)),
        None => None,
    };
    crate::rekey::init_logging(config.log_level.as_deref());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("s3cryptfs-tool").build()?;
    let codec = crate::run::codec_of(&config, keys.clone())?;
    let backend = rt.block_on(async {
        let backend = crate::run::open_store(&config, keys.as_ref()).await?;
        if check_key {
            crate::run::check_store(&config, &*backend, &codec).await?;
        } else if let Err(e) = backend.check_access().await {
            bail!("cannot use store {}: {}", config.store_url, crate::error_text::error_chain(&e));
        }
        anyhow::Ok(backend)
    })?;
    let journal_dir = tempfile::Builder::new().prefix("s3cryptfs-tool-").tempdir().context("a temporary directory")?;
    let aead = crate::run::aead_of(&config);
    let journal = rt
        .block_on(crate::journal::Journal::open(
            journal_dir.path(),
            &config.store_url,
            crate::journal::Keying::Local,
            aead,
        ))
        .map_err(|e| anyhow::anyhow!("the temporary journal: {e}"))?;
    let memory = crate::memory::MemoryBudget::new(TOOL_CACHE * 4);
    let fs = Fs::new(
        backend.clone(),
        codec.clone(),
        PageCache::with_memory(TOOL_CACHE, memory),
        Arc::new(journal),
        FsConfig {
            uid: config.uid,
            gid: config.gid,
            umask: config.umask,
            read_only: true,
            attr_ttl: config.attr_ttl,
            max_readahead: config.cache.max_readahead,
            s3ec: crate::read::s3ec::S3ecOptions { require_commitment: config.require_commitment, rsa_key },
        },
    );
    Ok(Core { fs: Arc::new(fs), backend, codec, rt, _journal_dir: journal_dir })
}

/// The node at `path` (components separated by `/`; empty or `/` is the root), with its attributes.
async fn resolve(fs: &Fs, path: &str) -> anyhow::Result<crate::fs::Attr> {
    let mut attr = fs.getattr(ROOT_INO).await.map_err(|e| anyhow::anyhow!("the store's root: {e}"))?;
    let mut walked = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if attr.kind != FileKind::Dir {
            bail!("{walked}: not a directory");
        }
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(part);
        attr = fs.lookup(attr.ino, OsStr::new(part)).await.map_err(|e| anyhow::anyhow!("{walked}: {e}"))?;
    }
    Ok(attr)
}

pub fn cat_command(args: CatArgs) -> anyhow::Result<()> {
    let (pairs, mut files) = split_o(&args.options, &args.store)?;
    if let Some(out) = &args.output {
        files.push(out.display().to_string());
    }
    if files.len() > 1 {
        bail!("more than one output file given ({}): name one", files.join(", "));
    }
    let output = files.pop().map(PathBuf::from);
    let core = open_core(&args.store, &args.tool, pairs, true)?;
    let fs = core.fs.clone();
    let path = args.path.clone();
    core.rt.block_on(until_interrupted(async move {
        let attr = resolve(&fs, &path).await?;
        match attr.kind {
            FileKind::File => {}
            FileKind::Dir => bail!("{path}: is a directory"),
            FileKind::Symlink => {
                let target = fs.readlink(attr.ino).await.map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
                bail!("{path}: is a symbolic link to {}; cat that path instead", String::from_utf8_lossy(&target))
            }
            other => bail!("{path}: is not a regular file ({other:?})"),
        }
        match &output {
            Some(file) => cat_to_file(&fs, attr.ino, &path, file).await,
            None => {
                let mut stdout = std::io::stdout().lock();
                let (sent, result) = copy_out(&fs, attr.ino, &mut stdout).await;
                let flushed = stdout.flush();
                match (result, flushed) {
                    (Ok(()), Ok(())) => Ok(()),
                    (Err(e), _) if sent == 0 => Err(e.context(format!("{path}: nothing was written"))),
                    (Err(e), _) => Err(e.context(format!(
                        "{path}: {sent} bytes were written to standard output before this; they are not the whole file"
                    ))),
                    (Ok(()), Err(e)) => Err(anyhow::Error::new(e).context("writing to standard output")),
                }
            }
        }
    }))
}

/// Writes the file into an unnamed temporary file (O_TMPFILE) in `file`'s directory, which gets a name only when
/// every byte was read and checked: a kill at any moment before leaves nothing (the kernel frees an unnamed file),
/// and an error removes it. The file is 0600: it holds plaintext.
async fn cat_to_file(fs: &Fs, ino: u64, path: &str, file: &Path) -> anyhow::Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp =
        tempfile::tempfile_in(dir).with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let (_, result) = copy_out(fs, ino, &mut tmp).await;
    result.with_context(|| format!("{path}: nothing was written to {}", file.display()))?;
    tmp.sync_all().with_context(|| format!("writing {}", file.display()))?;
    // Named under a temporary name first (linkat refuses an existing name), then renamed over `file`.
    let named = tempfile::Builder::new()
        .prefix(".s3cryptfs-cat-")
        .make_in(dir, |p| link_unnamed(&tmp, p))
        .with_context(|| format!("naming the output in {}", dir.display()))?;
    named
        .persist(file)
        .map_err(|e| anyhow::Error::new(e.error))
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// Gives the unnamed file `f` (from O_TMPFILE) the name `to`.
fn link_unnamed(f: &std::fs::File, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    let (cwd, follow) = (libc::AT_FDCWD, libc::AT_SYMLINK_FOLLOW);
    // SAFETY: both paths are valid NUL-terminated strings that live across the call.
    let rc = unsafe { libc::linkat(cwd, from.as_ptr(), cwd, to.as_ptr(), follow) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs a tool's work until it ends or SIGINT/SIGTERM arrives: then it stops with an error, so the normal exit path
/// removes the temporary journal (and an unfinished output file, which has no name yet).
async fn until_interrupted<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
    tokio::select! {
        r = work => r,
        _ = int.recv() => bail!("interrupted (SIGINT)"),
        _ = term.recv() => bail!("terminated (SIGTERM)"),
    }
}

/// Reads the file from its start to its end through the core into `out`: the bytes written, and how it ended.
async fn copy_out(fs: &Fs, ino: u64, out: &mut dyn Write) -> (u64, anyhow::Result<()>) {
    let fh = match fs.open(ino, OpenMode::default()).await {
        Ok(fh) => fh,
        Err(e) => return (0, Err(anyhow::anyhow!("{}", crate::error_text::error_chain(&e)))),
    };
    let mut at = 0u64;
    let result = loop {
        let bytes = match fs.read(fh, at, READ_LEN).await {
            Ok(b) => b,
            Err(e) => break Err(anyhow::anyhow!("{}", crate::error_text::error_chain(&e))),
        };
        if bytes.is_empty() {
            break Ok(());
        }
        if let Err(e) = out.write_all(&bytes) {
            break Err(anyhow::Error::new(e).context("writing the output"));
        }
        at += bytes.len() as u64;
    };
    let _ = fs.release(fh).await;
    // The core stops at the length it knows; a read that ends short of it is an error there, not here.
    (at, result)
}

pub fn ls_command(args: LsArgs) -> anyhow::Result<()> {
    let pairs = args.options.iter().flat_map(|o| crate::config::split_options(o)).collect();
    let core = open_core(&args.store, &args.tool, pairs, true)?;
    let (fs, backend, codec) = (core.fs.clone(), core.backend.clone(), core.codec.clone());
    let prefix = args.prefix.clone().unwrap_or_default();
    let recursive = args.recursive;
    let json = args.json;
    core.rt.block_on(until_interrupted(async move {
        let top = resolve(&fs, &prefix).await?;
        let base = prefix.trim_matches('/').to_string();
        let mut out = std::io::stdout().lock();
        if top.kind != FileKind::Dir {
            let kind = kind_of(&*backend, &codec, &base, &top).await;
            let target = match top.kind {
                FileKind::Symlink => fs.readlink(top.ino).await.ok().map(|t| String::from_utf8_lossy(&t).into_owned()),
                _ => None,
            };
            return print_entry(&mut out, json, &base, &top, &kind, target.as_deref());
        }
        let mut problems = 0usize;
        let mut dirs = vec![base];
        while let Some(dir) = dirs.pop() {
            let mut subdirs = Vec::new();
            for (path, _) in entries_of(&fs, &dir).await? {
                // Looked up by path and forgotten after: a big tree stays within the core's node table.
                let attr = match resolve(&fs, &path).await {
                    Ok(a) => a,
                    Err(err) => {
                        eprintln!("s3cryptfs ls: {err:#}");
                        problems += 1;
                        continue;
                    }
                };
                let kind = kind_of(&*backend, &codec, &path, &attr).await;
                let target = match attr.kind {
                    FileKind::Symlink => match fs.readlink(attr.ino).await {
                        Ok(t) => Some(String::from_utf8_lossy(&t).into_owned()),
                        Err(err) => {
                            eprintln!("s3cryptfs ls: {path}: {}", crate::error_text::error_chain(&err));
                            problems += 1;
                            Some("?".into())
                        }
                    },
                    _ => None,
                };
                print_entry(&mut out, json, &path, &attr, &kind, target.as_deref())?;
                fs.forget(attr.ino, 1);
                if recursive && attr.kind == FileKind::Dir {
                    subdirs.push(path);
                }
            }
            // Depth first, in name order.
            dirs.extend(subdirs.into_iter().rev());
        }
        out.flush()?;
        if problems > 0 {
            bail!("{problems} entries could not be read (see above)");
        }
        Ok(())
    }))
}

/// Why an object did not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// A chunk, the header, the version map or the path binding failed authentication, or the object was cut.
    Tampered,
    /// No key given opens it (another customer key, another KMS key, a key of another mode).
    WrongKey,
    /// Not an object of a client-side format this build reads.
    NotOurFormat,
    /// The store or KMS did not answer, or another error.
    Unreadable,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Tampered => "tampered",
            Failure::WrongKey => "wrong key",
            Failure::NotOurFormat => "not our format",
            Failure::Unreadable => "unreadable",
        }
    }

    /// The kind of a read error of the core.
    pub fn of(e: &crate::fs::Error) -> Failure {
        use crate::crypto::s3ec::S3ecError as X;
        use crate::crypto::CryptoError as C;
        use crate::fs::Error as E;
        use crate::read::s3ec::S3ecReadError as S;
        match e {
            E::Crypto { source, .. } => match source {
                C::UnknownKey { .. } | C::NeedsKms { .. } | C::NeedsCustomerKey { .. } => Failure::WrongKey,
                C::NotOurFormat | C::UnsupportedVersion { .. } | C::UnsupportedEnvelope { .. } => {
                    Failure::NotOurFormat
                }
                _ => Failure::Tampered,
            },
            E::NotOurFormat { .. } => Failure::NotOurFormat,
            E::Kms { source, .. } => Failure::of_kms(source),
            E::S3ec { source, .. } => match source {
                S::KmsRefused { .. } | S::NeedsKms | S::NeedsCustomerKey | S::NeedsRsaKey | S::NoKeyUnwraps { .. } => {
                    Failure::WrongKey
                }
                S::LegacyV1 | S::CommitmentRequired => Failure::NotOurFormat,
                S::Kms(k) => Failure::of_kms(k),
                S::MissingInstructionFile { .. } => Failure::Unreadable,
                S::Format(X::UnsupportedContent { .. } | X::UnsupportedWrap { .. }) => Failure::NotOurFormat,
                S::Format(_) => Failure::Tampered,
            },
            _ => Failure::Unreadable,
        }
    }

    /// KMS refusing a wrapped key: the blob was changed (tampered), or it is under a key this caller may not use.
    fn of_kms(e: &crate::kms::KmsError) -> Failure {
        use crate::kms::KmsError as K;
        match e {
            K::InvalidCiphertext { .. } => Failure::Tampered,
            K::Disabled { .. } | K::NotFound { .. } | K::AccessDenied { .. } | K::NoKeyId => Failure::WrongKey,
            _ => Failure::Unreadable,
        }
    }
}

/// Reads `ino` to its end and throws the bytes away: the bytes read, or why it stopped.
async fn read_through(fs: &Fs, ino: u64) -> (u64, Result<(), crate::fs::Error>) {
    let fh = match fs.open(ino, OpenMode::default()).await {
        Ok(fh) => fh,
        Err(e) => return (0, Err(e)),
    };
    let mut at = 0u64;
    let result = loop {
        match fs.read(fh, at, READ_LEN).await {
            Ok(b) if b.is_empty() => break Ok(()),
            Ok(b) => at += b.len() as u64,
            Err(e) => break Err(e),
        }
    };
    let _ = fs.release(fh).await;
    (at, result)
}

/// The entries of directory `dir` (a path), without `.` and `..`, as (path, kind). Looked up by path each time, so a
/// walk of a tree larger than the core's node table (which forgets what no one holds) still finds every directory.
async fn entries_of(fs: &Fs, dir: &str) -> anyhow::Result<Vec<(String, FileKind)>> {
    let attr = resolve(fs, dir).await?;
    let fh = fs.opendir(attr.ino).await.map_err(|e| anyhow::anyhow!("{dir}: {e}"))?;
    let entries = fs.readdir(fh);
    fs.releasedir(fh);
    let entries = entries.map_err(|e| anyhow::anyhow!("{dir}: {e}"))?;
    Ok(entries
        .iter()
        .filter(|e| e.name != "." && e.name != "..")
        .map(|e| (if dir.is_empty() { e.name.clone() } else { format!("{dir}/{}", e.name) }, e.kind))
        .collect())
}

/// Every file and symlink under `base` (depth first, in name order): what verify checks. Symlinks count because
/// their targets are object bodies, sealed like file content; special files are metadata only.
async fn checkable_under(fs: &Fs, base: &str, top: &crate::fs::Attr) -> anyhow::Result<Vec<(String, FileKind)>> {
    if top.kind != FileKind::Dir {
        return Ok(vec![(base.to_string(), top.kind)]);
    }
    let mut found = Vec::new();
    let mut dirs = vec![base.to_string()];
    while let Some(dir) = dirs.pop() {
        let mut subdirs = Vec::new();
        for (path, kind) in entries_of(fs, &dir).await? {
            match kind {
                FileKind::Dir => subdirs.push(path),
                FileKind::File | FileKind::Symlink => found.push((path, kind)),
                _ => {}
            }
        }
        dirs.extend(subdirs.into_iter().rev());
    }
    Ok(found)
}

/// Verifies one file or symlink: looked up by path, read to its end (or its target read), forgotten again.
async fn verify_one(fs: &Fs, backend: &dyn Backend, path: &str) -> (u64, Result<(), (Failure, String)>) {
    let attr = match resolve(fs, path).await {
        Ok(a) => a,
        Err(e) => return (0, Err((Failure::Unreadable, format!("{e:#}")))),
    };
    let (n, result) = match attr.kind {
        FileKind::Symlink => (0, fs.readlink(attr.ino).await.map(|_| ())),
        _ => read_through(fs, attr.ino).await,
    };
    fs.forget(attr.ino, 1);
    let Err(e) = result else { return (n, Ok(())) };
    let mut kind = Failure::of(&e);
    // A size no object of ours can have: cut short, or not ours at all? The header tells.
    if matches!(e, crate::fs::Error::NotOurFormat { .. }) {
        if let Ok(key) = ObjectKey::new(path) {
            if let Ok((head, _, _)) = backend.get_range(&key, 0..HEADER_LEN).await {
                if Header::decode(&head).is_ok() {
                    kind = Failure::Tampered;
                }
            }
        }
    }
    (n, Err((kind, crate::error_text::error_chain(&e))))
}

pub fn verify_command(args: VerifyArgs) -> anyhow::Result<()> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use std::io::IsTerminal;
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let pairs = args.options.iter().flat_map(|o| crate::config::split_options(o)).collect();
    let core = open_core(&args.store, &args.tool, pairs, false)?;
    let (fs, backend) = (core.fs.clone(), core.backend.clone());
    let prefix = args.prefix.clone().unwrap_or_default();
    let (json, jobs) = (args.json, args.jobs);
    let progress = !json && std::io::stderr().is_terminal();
    let failed = core.rt.block_on(until_interrupted(async move {
        let top = resolve(&fs, &prefix).await?;
        let files = checkable_under(&fs, prefix.trim_matches('/'), &top).await?;
        let total = files.len();
        let started = std::time::Instant::now();
        let mut last_line = started;
        let (mut checked, mut bytes) = (0usize, 0u64);
        let mut failures: Vec<(String, Failure, String)> = Vec::new();
        let mut pending = files.into_iter();
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < jobs {
                let Some((path, _)) = pending.next() else { break };
                let (fs, backend) = (fs.clone(), backend.clone());
                // A task each, so decryption runs on every core.
                running.push(tokio::spawn(async move {
                    let (n, r) = verify_one(&fs, &*backend, &path).await;
                    (path, n, r)
                }));
            }
            let Some(done) = running.next().await else { break };
            let (path, n, r) = done.map_err(|e| anyhow::anyhow!("a verify task failed: {e}"))?;
            checked += 1;
            bytes += n;
            if let Err((kind, detail)) = r {
                if !json {
                    eprintln!("{path}: {}: {detail}", kind.name());
                }
                failures.push((path, kind, detail));
            }
            if progress && last_line.elapsed() >= std::time::Duration::from_millis(500) {
                last_line = std::time::Instant::now();
                let mib = bytes as f64 / f64::from(1 << 20);
                eprint!("\rverify: {checked}/{total} objects, {mib:.1} MiB, {} failed ", failures.len());
            }
        }
        if progress {
            eprint!("\r\x1b[K");
        }
        failures.sort_by(|a, b| a.0.cmp(&b.0));
        let mut by_kind: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for f in &failures {
            *by_kind.entry(f.1.name()).or_default() += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        if json {
            let list: Vec<_> = failures
                .iter()
                .map(|(p, k, d)| serde_json::json!({"path": p, "kind": k.name(), "error": d}))
                .collect();
            let summary = serde_json::json!({
                "objects": checked,
                "bytes": bytes,
                "ok": checked - failures.len(),
                "failed": failures.len(),
                "failures_by_kind": by_kind,
                "failures": list,
                "seconds": seconds,
            });
            println!("{summary}");
        } else {
            let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
            println!(
                "verify: {checked} objects, {bytes} bytes checked in {seconds:.1} s: {} ok, {} failed{}",
                checked - failures.len(),
                failures.len(),
                if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
            );
        }
        anyhow::Ok(failures.len())
    }))?;
    if failed > 0 {
        // The summary said it all; the exit status is what scripts look at (the temporary journal goes first).
        drop(core);
        std::process::exit(1);
    }
    Ok(())
}

/// How the object of a file is stored, in a few words: `cse-c v2`, `cse-kms v3`, `s3ec v2 (kms+context)`, `plain`,
/// or why that is not known (`not ours`, `unreadable: …`). Directories and other nodes: `-`.
async fn kind_of(backend: &dyn Backend, codec: &Codec, path: &str, attr: &crate::fs::Attr) -> String {
    if attr.kind != FileKind::File {
        return "-".into();
    }
    if !codec.is_encrypted() {
        return "plain".into();
    }
    let Ok(key) = ObjectKey::new(path) else { return "unreadable: invalid key".into() };
    let meta = match backend.head(&key).await {
        Ok((_, meta)) => meta,
        Err(e) => return format!("unreadable: {e}"),
    };
    let hint = codec.format_hint(&meta);
    let beside = match (&hint, ObjectKey::new(crate::crypto::s3ec::instruction_file_key(key.as_str()))) {
        (FormatHint::AskInstructionFile, Ok(instruction)) => backend.head(&instruction).await.is_ok(),
        _ => false,
    };
    match hint {
        FormatHint::Known(StoredFormat::S3ec { .. }) => match crate::crypto::s3ec::detect(meta.extra.iter()) {
            Ok(crate::crypto::s3ec::Detection::Complete(env)) => format!("s3ec {} ({})", env.version(), env.wrap()),
            Ok(crate::crypto::s3ec::Detection::NeedsInstructionFile(_)) => "s3ec (instruction file)".into(),
            Err(e) => format!("s3ec, unreadable: {e}"),
        },
        // Metadata that names an instruction file: an S3EC object whose envelope lies beside it.
        FormatHint::AskInstructionFile if beside => "s3ec (instruction file)".into(),
        FormatHint::Known(StoredFormat::Own) | FormatHint::AskInstructionFile => {
            match backend.get_range(&key, 0..HEADER_LEN).await {
                Ok((bytes, _, _)) => match Header::decode(&bytes) {
                    Ok(h) => match h.envelope {
                        Envelope::CustomerKey { .. } => format!("cse-c v{}", h.version),
                        Envelope::Kms { .. } => format!("cse-kms v{}", h.version),
                    },
                    Err(_) => "not ours".into(),
                },
                Err(e) => format!("unreadable: {e}"),
            }
        }
    }
}

fn print_entry(
    out: &mut dyn Write,
    json: bool,
    path: &str,
    attr: &crate::fs::Attr,
    kind: &str,
    target: Option<&str>,
) -> anyhow::Result<()> {
    let mtime = attr.mtime.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if json {
        let line = serde_json::json!({
            "path": path,
            "type": match attr.kind {
                FileKind::Dir => "dir",
                FileKind::Symlink => "symlink",
                FileKind::File => "file",
                _ => "special",
            },
            "size": attr.size,
            "mode": format!("{:04o}", attr.perm),
            "uid": attr.uid,
            "gid": attr.gid,
            "mtime": mtime,
            "encryption": kind,
            "target": target,
        });
        writeln!(out, "{line}")?;
    } else {
        let t = match attr.kind {
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::File => '-',
            FileKind::Fifo => 'p',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
            FileKind::Socket => 's',
        };
        let (perm, when) = (mode_string(attr.perm), utc_minute(mtime));
        match target {
            Some(to) => writeln!(out, "{t}{perm} {:>12} {when} {kind:<16} {path} -> {to}", attr.size)?,
            None => writeln!(out, "{t}{perm} {:>12} {when} {kind:<16} {path}", attr.size)?,
        }
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM` (UTC) of seconds since the epoch (days to a civil date: H. Hinnant's algorithm).
fn utc_minute(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hour, minute) = (secs % 86_400 / 3600, secs % 3600 / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}")
}

/// `rwxr-x---` from permission bits, with setuid, setgid and sticky as ls(1) shows them (`s`/`S`, `t`/`T`).
fn mode_string(perm: u16) -> String {
    let mut s = String::with_capacity(9);
    for (shift, special, set, unset) in [(6u16, 0o4000u16, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
        let bits = (perm >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, perm & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o_values_are_options_or_the_output_file() {
        let vals = ["key_file=/k", "ro", "out.bin", "mode=cse-c,region=x", "./results"];
        let vals: Vec<String> = vals.iter().map(|s| s.to_string()).collect();
        let (pairs, files) = split_o(&vals, "file:///tmp/s").unwrap();
        let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["key_file", "ro", "mode", "region"]);
        assert_eq!(files, ["out.bin", "./results"]);
        let e = split_o(&["require_commitmnet".to_string()], "file:///tmp/s").unwrap_err().to_string();
        assert!(e.contains("not an option"), "{e}");
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
        assert_eq!(utc_minute(951_782_400 + 3661), "2000-02-29 01:01");
        assert_eq!(utc_minute(1_796_304_635), "2026-12-03 13:30");
    }

    #[test]
    fn modes_read_as_ls_shows_them() {
        assert_eq!(mode_string(0o754), "rwxr-xr--");
        assert_eq!(mode_string(0o600), "rw-------");
        assert_eq!(mode_string(0o4755), "rwsr-xr-x");
        assert_eq!(mode_string(0o2640), "rw-r-S---");
        assert_eq!(mode_string(0o1777), "rwxrwxrwt");
    }
}
