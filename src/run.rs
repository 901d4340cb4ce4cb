//! Wiring: build the store, keys, cache and filesystem; mount; wait for a signal or an unmount; shut down cleanly.
//!
//! Order matters. Everything that can fail because of what the user typed (options, key file, mountpoint) is checked
//! before forking into the background, so the error reaches the terminal. Then the process forks (before any thread
//! exists: a forked multi-threaded process is not safe to continue), the child builds the tokio runtime, checks the
//! store, mounts, and only then tells the waiting parent "ready" through a pipe; a failure after the fork travels
//! through the same pipe and becomes the parent's error message and exit code.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

use crate::cache::PageCache;
use crate::cli::{Cli, Command, MountArgs};
use crate::config::{AeadChoice, EncryptionMode, MountConfig};
use crate::crypto::{AeadBackend, KeyHistory};
use crate::fs::{Fs, FsConfig};
use crate::object::{Codec, CodecError};
use crate::store::{Backend, LocalBackend, S3Options};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { output } => keygen(output.as_deref()),
        Command::Mount(args) => mount(*args),
        Command::Agent(args) => crate::agent::agent_command(args),
        Command::Key(args) => crate::agent::key_command(args),
        Command::Rekey(args) => crate::rekey::rekey_command(args),
        Command::Cat(args) => crate::tools::cat_command(args),
        Command::Ls(args) => crate::tools::ls_command(args),
        Command::Verify(args) => crate::tools::verify_command(args),
        Command::Unmount { dir, lazy, timeout } => crate::unmount::unmount(
            &dir,
            if lazy { crate::unmount::How::Lazy } else { crate::unmount::How::Normal },
            timeout.map(std::time::Duration::from_secs),
        ),
    }
}

fn keygen(output: Option<&Path>) -> anyhow::Result<()> {
    match output {
        Some(path) => {
            crate::keys::write_new_key_file(path)?;
            eprintln!("wrote a new key to {} (mode 0600); keep a copy somewhere safe: without it the data is lost", path.display());
        }
        None => {
            let key = crate::crypto::Key256::generate();
            let line = crate::crypto::format_new_key(&key);
            std::io::stdout().write_all(line.as_bytes())?;
        }
    }
    Ok(())
}

/// Where log lines go: stderr in the foreground; a file with `log_file=`; otherwise syslog (the journal under systemd),
/// because a background daemon has no terminal.
enum LogTarget<'a> {
    Stderr,
    File(&'a Path),
    Syslog,
}

/// What SIGHUP can change after start: the log filter, and the log file (reopened, for logrotate).
struct LogReload {
    filter: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
    file: Option<(PathBuf, Arc<std::sync::Mutex<std::fs::File>>)>,
}

static LOG_RELOAD: std::sync::OnceLock<LogReload> = std::sync::OnceLock::new();

/// Opens `log_file=` for appending; a new file is created 0600, since log lines name files and objects. An existing
/// file keeps its mode (an administrator may have made it group-readable on purpose), but must be one we may trust:
/// see [`check_own_file`]. The last component is not followed if it is a symlink, so a symlink planted in a shared
/// log directory cannot make the daemon append to a file of someone else's choosing.
fn open_log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening log_file {} (a symlink is refused)", path.display()))?;
    check_own_file(&file, path, "log_file")?;
    Ok(file)
}

/// A file the daemon writes its log to or reads its log level from: a regular file owned by the daemon's user or by
/// root, which no other user may write (or a device of root's, such as /dev/null). Another user's file would let
/// them read what is logged (file names) or turn the level up to `trace`.
fn check_own_file(file: &std::fs::File, path: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata().with_context(|| format!("{what} {}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.file_type().is_char_device() && meta.uid() == 0 {
        return Ok(());
    }
    if !meta.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    if meta.uid() != me && meta.uid() != 0 {
        bail!("{what} {} belongs to uid {}, neither this user ({me}) nor root", path.display(), meta.uid());
    }
    if meta.mode() & 0o002 != 0 {
        bail!("{what} {} is writable by every user (mode {:o})", path.display(), meta.mode() & 0o7777);
    }
    Ok(())
}

fn log_filter(level: Option<&str>) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    use tracing_subscriber::EnvFilter;
    Ok(match level {
        Some(l) => {
            let level = crate::config::parse_log_level(l).map_err(|e| anyhow!("log level: {e}"))?;
            EnvFilter::try_new(level).map_err(|e| anyhow!("log level '{level}': {e}"))?
        }
        // fuser logs an expected "Unmount failed" when the kernel already unmounted us; keep it quiet by default.
        // And "Failed to send FUSE reply" (fuser::reply): the kernel no longer waits for that request. fuser answers
        // every FUSE_INTERRUPT (sent when an application blocked in a request gets a signal) with ENOSYS, and when
        // the interrupted request was answered first, that answer finds nothing (ENOENT); after an unmount, ENODEV.
        // Nothing is lost either way, so it is no error to report; log_level=debug or RUST_LOG still show it.
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,fuser=error,fuser::reply=off"))
        }
    })
}

/// A writer over the shared log file, which SIGHUP may swap for a freshly opened one.
#[derive(Clone)]
struct SharedFile(Arc<std::sync::Mutex<std::fs::File>>);

impl Write for SharedFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("log file lock poisoned"))?.write(data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().map_err(|_| std::io::Error::other("log file lock poisoned"))?.flush()
    }
}

fn init_logging(level: Option<&str>, target: LogTarget) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter(level)?);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let mut file = None;
    let _ = match target {
        // Under systemd stderr is the journal: no colours, no timestamps (the journal has its own), and a `<N>`
        // syslog priority in front of each line so the journal records the level.
        LogTarget::Stderr if crate::daemon::under_journald() => {
            registry.with(fmt.with_ansi(false).without_time().with_writer(crate::daemon::JournalWriter)).try_init()
        }
        LogTarget::Stderr => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            registry.with(fmt.with_ansi(ansi).with_writer(std::io::stderr)).try_init()
        }
        LogTarget::File(path) => {
            let shared = Arc::new(std::sync::Mutex::new(open_log_file(path)?));
            file = Some((path.to_path_buf(), shared.clone()));
            let writer = move || SharedFile(shared.clone());
            registry.with(fmt.with_ansi(false).with_writer(writer)).try_init()
        }
        LogTarget::Syslog => {
            // SAFETY: the identity string is 'static and NUL-terminated, as openlog requires.
            unsafe { libc::openlog(c"s3cryptfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            registry.with(fmt.with_ansi(false).without_time().with_writer(crate::daemon::SyslogWriter)).try_init()
        }
    };
    let _ = LOG_RELOAD.set(LogReload { filter: handle, file });
    Ok(())
}

/// The text of `log_level_file=` (a level is a word: at most 4 KiB is read), from a file [`check_own_file`] trusts;
/// a symlink or a fifo is refused without blocking.
fn read_log_level_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening log_level_file {} (a symlink is refused)", path.display()))?;
    check_own_file(&file, path, "log_level_file")?;
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).with_context(|| format!("reading {}", path.display()))?;
    Ok(text)
}

/// SIGHUP: reopen the log file (so logrotate can move it away) and re-read the log level from `log_level_file=`.
fn reload_logging(config: &MountConfig) {
    let Some(reload) = LOG_RELOAD.get() else { return };
    if let Some((path, shared)) = &reload.file {
        match open_log_file(path) {
            Ok(fresh) => {
                if let Ok(mut f) = shared.lock() {
                    *f = fresh;
                }
            }
            Err(e) => tracing::warn!(error = %e, "SIGHUP: could not reopen the log file; still writing to the old one"),
        }
    }
    let Some(path) = &config.log_level_file else {
        tracing::info!("SIGHUP: log file reopened (no log_level_file= to re-read the level from)");
        return;
    };
    let level = match read_log_level_file(path) {
        Ok(text) => text.trim().to_string(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "SIGHUP: cannot read log_level_file; level unchanged");
            return;
        }
    };
    match log_filter(Some(&level)) {
        Ok(filter) => match reload.filter.reload(filter) {
            Ok(()) => tracing::warn!(level = %level, "SIGHUP: log level changed"),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: could not change the log level"),
        },
        Err(e) => tracing::warn!(error = %e, "SIGHUP: log_level_file holds an invalid level; level unchanged"),
    }
}

fn mount(args: MountArgs) -> anyhow::Result<()> {
    let config = MountConfig::from_options(
        args.store.clone(),
        args.mountpoint.clone(),
        args.foreground,
        &args.option_pairs(),
    )?;
    crate::daemon::harden_process()?;
    crate::daemon::raise_open_file_limit();
    // Before any thread exists: key_env scrubs the environment, which is only safe single-threaded.
    let keys = match &config.key_source {
        Some(source) => Some(Arc::new(crate::keys::load(source)?)),
        None => None,
    };
    // Read here too, before the process detaches: a relative path still means what the user meant, and a refused key
    // file is reported on the terminal.
    let rsa_key = match &config.rsa_key_file {
        Some(path) => Some(Arc::new(crate::keys::load_rsa_key_file(path)?)),
        None => None,
    };
    check_mountpoint(&config.mountpoint, &config.store_url, config.nonempty)?;
    crate::store::StoreUrl::parse(&config.store_url).map_err(|e| anyhow::anyhow!("store '{}': {e}", config.store_url))?;

    if config.foreground {
        let target = match &config.log_file {
            Some(p) => LogTarget::File(p),
            None => LogTarget::Stderr,
        };
        init_logging(config.log_level.as_deref(), target)?;
        return serve(config, keys, rsa_key, None);
    }

    let mut fds = [0; 2];
    // SAFETY: pipe() writes two descriptors into the array we own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the readiness pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (the runtime is built after this point), so fork is safe.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no preconditions; it detaches us from the terminal's session.
            unsafe { libc::setsid() };
            crate::daemon::detach_stdio(false);
            let target = match &config.log_file {
                Some(p) => LogTarget::File(p),
                None => LogTarget::Syslog,
            };
            if let Err(e) = init_logging(config.log_level.as_deref(), target) {
                let mut ready = std::fs::File::from(write_end);
                let _ = writeln!(ready, "{}", crate::error_text::error_chain(&*e));
                std::process::exit(1);
            }
            let mut ready = std::fs::File::from(write_end);
            match serve(config, keys, rsa_key, Some(&mut ready)) {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    let _ = writeln!(ready, "{}", crate::error_text::error_chain(&*e));
                    tracing::error!("{}", crate::error_text::error_chain(&*e));
                    std::process::exit(1)
                }
            }
        }
        _child => {
            drop(write_end);
            crate::daemon::wait_until_ready(read_end, "the mount process")
        }
    }
}

/// One sentence for the mount-time store check: what is wrong and what to do, instead of a chain of HTTP errors.
fn explain_store_error(config: &MountConfig, detail: &str) -> String {
    let url = &config.store_url;
    if matches!(crate::store::StoreUrl::parse(url), Ok(crate::store::StoreUrl::Azure { .. })) {
        return explain_azure_error(url, config.endpoint.as_deref(), config.ca_file.as_deref(), detail);
    }
    if matches!(crate::store::StoreUrl::parse(url), Ok(crate::store::StoreUrl::Gcs { .. })) {
        let emulator = std::env::var("STORAGE_EMULATOR_HOST").ok();
        let endpoint = config.endpoint.as_deref().or(emulator.as_deref());
        return explain_gcs_error(url, endpoint, config.ca_file.as_deref(), detail);
    }
    let endpoint = config.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).unwrap_or_else(|| "AWS".into());
    let has = |needle: &str| detail.contains(needle);
    // Without keys in the environment or profile files object_store asks the EC2 instance metadata service for a
    // role's credentials; off EC2 that request fails, and that failure means "no credentials".
    let imds_failed = has("169.254.169.254") || has("/latest/api/token") || has("/latest/meta-data/iam");
    if imds_failed || has("MissingCredentials") || has("credential") && has("not found") {
        format!("no S3 credentials found for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials")
    } else if has("UnknownIssuer") || has("certificate") || has("InvalidCertificate") {
        explain_tls_error(&endpoint, config.ca_file.as_deref(), detail)
    } else if has("NoSuchBucket") {
        format!("the bucket of {url} does not exist at {endpoint}: create it first or check the name")
    } else if has("InvalidAccessKeyId") {
        // The key id itself was refused: a typo, a deleted key, or credentials meant for another endpoint/account.
        format!("access to {url} was denied at {endpoint}: the access key id is unknown there (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID or the profile's credentials")
    } else if has("SignatureDoesNotMatch") {
        // The key id is known but our signature does not match: the secret belongs to another key.
        format!("access to {url} was denied at {endpoint}: the secret key does not match the access key id (SignatureDoesNotMatch); check AWS_SECRET_ACCESS_KEY or the profile's credentials")
    } else if has("AccessDenied") {
        // Authenticated, but no policy allows the listing the mount starts with.
        format!("access to {url} was denied at {endpoint}: the credentials are valid but not allowed to list it (AccessDenied); check the IAM policy of the user or role (s3:ListBucket) and the bucket policy")
    } else if has("403 Forbidden") {
        format!("access to {url} was denied at {endpoint}: check the credentials and the bucket policy ({})", last_line(detail))
    } else if has("Connection refused") || has("tcp connect error") || has("dns error") || has("unreachable") {
        format!("cannot connect to {endpoint} for {url}: check endpoint= and the network ({})", last_line(detail))
    } else {
        format!("cannot use store {url}: {}", last_line(detail))
    }
}

/// [`explain_store_error`] for Azure Blob Storage, whose failures the S3 sentences (AWS keys, buckets, IAM) would
/// misname. Azure's answers are XML with a `<Code>`, which names the cause better than the body's first line.
fn explain_azure_error(url: &str, endpoint: Option<&str>, ca_file: Option<&Path>, detail: &str) -> String {
    let has = |needle: &str| detail.contains(needle);
    let code = detail
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.trim());
    let why = code.map_or_else(|| last_line(detail), str::to_string);
    let auth = [
        "AuthenticationFailed",
        "AuthorizationFailure",
        "InvalidAuthenticationInfo",
        "AuthorizationPermissionMismatch",
    ];
    let refused = has("Account must be specified") || has("credential") || has("403 Forbidden");
    if refused || code.is_some_and(|c| auth.contains(&c)) {
        format!(
            "access to {url} was refused: check the storage account and its credentials (AZURE_STORAGE_ACCOUNT_NAME \
             with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_KEY, a service principal, or \
             AZURE_STORAGE_USE_EMULATOR=true for Azurite) ({why})"
        )
    } else if matches!(code, Some("ContainerNotFound" | "ResourceNotFound")) {
        format!(
            "the container of {url} was not found in its storage account: create it first, or check the container \
             and account names ({why})"
        )
    } else if has("UnknownIssuer") || has("certificate") || has("InvalidCertificate") {
        explain_tls_error(endpoint.unwrap_or("Azure Blob Storage"), ca_file, detail)
    } else if has("Connection refused") || has("tcp connect error") || has("dns error") || has("unreachable") {
        let to = endpoint.unwrap_or("Azure Blob Storage");
        format!(
            "cannot connect to {to} for {url}: check endpoint= (AZURITE_BLOB_STORAGE_URL for Azurite) and the \
             network ({why})"
        )
    } else {
        format!("cannot use store {url}: {why}")
    }
}

/// [`explain_store_error`] for Google Cloud Storage: its credentials and its "bucket" are not AWS's. The GCS client
/// (`store/gcs.rs`) spells a refusal "status code: 401/403", a listing's 404 "NoSuchBucket".
fn explain_gcs_error(url: &str, endpoint: Option<&str>, ca_file: Option<&Path>, detail: &str) -> String {
    let has = |needle: &str| detail.contains(needle);
    let why = last_line(detail);
    let to = endpoint.unwrap_or("Google Cloud Storage");
    let refused = has("status code: 401") || has("status code: 403") || has("authentication credentials");
    if has("NoSuchBucket") || has("does not exist") {
        format!("the bucket of {url} was not found at {to}: create it first or check the name ({why})")
    } else if refused || has("credential") || has("token") {
        format!(
            "access to {url} was refused: check the credentials (GOOGLE_APPLICATION_CREDENTIALS or \
             GOOGLE_SERVICE_ACCOUNT naming a service account key file, or application default credentials; \
             STORAGE_EMULATOR_HOST for an emulator) and the bucket's IAM permissions ({why})"
        )
    } else if has("UnknownIssuer") || has("certificate") || has("InvalidCertificate") {
        explain_tls_error(to, ca_file, detail)
    } else if has("Connection refused") || has("tcp connect error") || has("dns error") || has("unreachable") {
        format!("cannot connect to {to} for {url}: check endpoint= (or STORAGE_EMULATOR_HOST) and the network ({why})")
    } else {
        format!("cannot use store {url}: {why}")
    }
}

/// A refused TLS certificate, by cause, because the remedy differs: a certificate from an unknown CA needs `ca_file=`
/// (or the right one, if it is given); a certificate for another host name needs the name it was issued for in the
/// endpoint, which no `ca_file=` changes.
fn explain_tls_error(endpoint: &str, ca_file: Option<&Path>, detail: &str) -> String {
    // rustls: `certificate not valid for name "127.0.0.1"; certificate is only valid for DnsName("s3.example")`.
    if let Some(at) = detail.find("not valid for name").or_else(|| detail.find("NotValidForName")) {
        let what: String = detail[at..].split(": ").next().unwrap_or_default().chars().take(200).collect();
        return format!(
            "the TLS certificate of {endpoint} was issued for another host name ({what}): use a name the certificate              is valid for in endpoint= (or get a certificate for this one); ca_file= does not change this"
        );
    }
    if detail.contains("UnknownIssuer") || detail.contains("unknown issuer") {
        return match ca_file {
            Some(ca) => format!(
                "the TLS certificate of {endpoint} is not signed by a CA in ca_file={} nor by a system CA: check that                  the file holds the PEM certificate of the CA that issued the server's certificate",
                ca.display()
            ),
            None => format!(
                "the TLS certificate of {endpoint} is not trusted: for a private CA add -o ca_file=PATH (the CA's PEM file)"
            ),
        };
    }
    let what = detail
        .find("invalid peer certificate")
        .map(|at| detail[at..].split(": ").nth(1).unwrap_or_default().chars().take(200).collect::<String>())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| last_line(detail));
    format!("the TLS certificate of {endpoint} was refused ({what}): check the server's certificate (and the clock)")
}

/// The innermost cause of an error chain printed with `{:#}`: the part after the last ": ".
fn last_line(detail: &str) -> String {
    let tail = detail.rsplit(": ").next().unwrap_or(detail).trim();
    tail.lines().next().unwrap_or(tail).chars().take(200).collect()
}

/// Ends the mount on a signal: ours (root) or fuser's (fusermount3).
enum Unmounter {
    Own(crate::kmount::OwnMount),
    Fuser(fuser::SessionUnmounter),
}

impl Unmounter {
    fn unmount(&mut self) -> std::io::Result<()> {
        match self {
            Unmounter::Own(m) => m.unmount(),
            Unmounter::Fuser(u) => u.unmount(),
        }
    }
}

/// umount2(MNT_DETACH) as root, `fusermount3 -u -z` otherwise.
fn lazy_unmount(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(path).status();
}

/// Waits until the mountpoint is our filesystem and answers (its device differs from its parent's).
fn wait_until_serving(mountpoint: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let parent = mountpoint.parent().unwrap_or(Path::new("/"));
    let parent_dev = std::fs::metadata(parent).map(|m| m.dev()).ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match std::fs::metadata(mountpoint) {
            Ok(m) if Some(m.dev()) != parent_dev => return Ok(()),
            Ok(_) | Err(_) if std::time::Instant::now() > deadline => {
                bail!("the mount at {} did not start answering within 30 s", mountpoint.display())
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Checks the mountpoint and FUSE itself before anything else, so each problem gets one sentence saying what to do.
///
/// A dead mount (its daemon is gone) of this same store, as a crash or SIGKILL leaves, is detached and replaced, so
/// that a restart (systemd's Restart=on-failure, or by hand) comes back without manual cleanup; a dead mount of
/// anything else is an error.
fn check_mountpoint(path: &Path, store_url: &str, nonempty: bool) -> anyhow::Result<()> {
    let shown = path.display();
    let mut meta = std::fs::metadata(path);
    let ours = || mount_at(path).is_some_and(|(fstype, source)| fstype == "fuse.s3cryptfs" && source == store_url);
    // A mount of this store that still answers may belong to a daemon that was just killed and is still exiting (a
    // restart right after kill -9, as Restart=on-failure does): give it a moment to die before calling it busy.
    if meta.is_ok() && is_mountpoint(path) && ours() {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < until && meta.is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            meta = std::fs::metadata(path);
        }
    }
    // ENOTCONN: a FUSE mount whose daemon died is still attached there (ECONNABORTED while the kernel is still
    // tearing the connection down, right after the daemon was killed).
    let is_dead = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED));
    let dead = meta.as_ref().is_err_and(is_dead);
    if dead && ours() {
        // Logging starts later; this goes where the early errors go (the terminal, or the journal under systemd).
        eprintln!("s3cryptfs: replacing the dead mount a previous run of {store_url} left at {shown} (its daemon is gone)");
        lazy_unmount(path);
        meta = std::fs::metadata(path);
    }
    let meta = match meta {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {shown} does not exist: create it first (mkdir -p {shown})")
        }
        Err(e) if is_dead(&e) => bail!(
            "mountpoint {shown} is a dead FUSE mount (its daemon is gone): run `fusermount3 -u {shown}` (or `umount -l`) first"
        ),
        Err(e) => bail!("mountpoint {shown}: {e}"),
    };
    if !meta.is_dir() {
        bail!("mountpoint {shown} is not a directory");
    }
    if is_mountpoint(path) {
        bail!("mountpoint {shown} is already mounted (busy): unmount it first, or pick another directory");
    }
    if !nonempty {
        let mut entries = std::fs::read_dir(path).map_err(|e| anyhow!("mountpoint {shown}: {e}"))?;
        if entries.next().is_some() {
            bail!(
                "mountpoint {shown} is not empty: the mount would hide its files; use an empty directory, or add -o nonempty"
            );
        }
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is not available: /dev/fuse is missing (load the module with `modprobe fuse`, or give the container the device)");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && find_in_path("fusermount3").is_none() {
        bail!("FUSE is not available to non-root users: fusermount3 is missing (install the fuse3 package)");
    }
    Ok(())
}

/// The state file of `mountpoint`, locked (see `crate::unmount`). Held by another daemon while the mountpoint is not
/// mounted, it is a daemon whose mount just ended (`fusermount3 -u` returns before the daemon has noticed) and that
/// is uploading what was written last. Its journal may still say it is serving for a moment, which recovery would
/// take for another live mount of the store and not wait for: this start would then serve the versions from before
/// those uploads. So wait for it here, as recovery waits for a finishing run (up to `journal::FINISH_WAIT`). Held
/// while the mountpoint is mounted (a mount stacked on a live one): not waited for.
fn mount_state(mountpoint: &Path) -> Option<crate::unmount::MountState> {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let started = std::time::Instant::now();
    let mut logged = false;
    let mut extended: Option<std::time::Instant> = None;
    loop {
        match crate::unmount::MountState::create(&canonical) {
            Ok(s) => return Some(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && !is_mountpoint(mountpoint)
                    && started.elapsed() < crate::journal::FINISH_WAIT =>
            {
                if !logged {
                    tracing::warn!(mountpoint = %mountpoint.display(), "the previous daemon of this mountpoint is finishing its uploads (its mount has ended); waiting for it before mounting");
                    logged = true;
                }
                // Under systemd (Type=notify) the wait must not run into TimeoutStartSec.
                if extended.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
                    extended = Some(std::time::Instant::now());
                    crate::notify::notify("EXTEND_TIMEOUT_USEC=20000000\nSTATUS=waiting for the previous daemon of this mountpoint");
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                tracing::warn!(error = %e, "no unmount state file: `s3cryptfs unmount` cannot wait for this mount's final uploads");
                return None;
            }
        }
    }
}

/// True when `path` is the mountpoint of a mounted filesystem (per /proc/self/mountinfo).
fn is_mountpoint(path: &Path) -> bool {
    let Ok(canonical) = std::fs::canonicalize(path) else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = mountinfo_escape(&canonical.to_string_lossy());
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// The type and source of the topmost mount at `path`, per /proc/self/mountinfo. Works on a dead mount, which
/// cannot be canonicalised (stat fails), so the path is made absolute without touching it.
fn mount_at(path: &Path) -> Option<(String, String)> {
    let absolute = std::path::absolute(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountinfo_escape(&absolute.to_string_lossy());
    let line = info.lines().rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))?;
    // After the " - " separator: type, source, super options.
    let mut rest = line.split(" - ").nth(1)?.split(' ');
    Some((mountinfo_unescape(rest.next()?), mountinfo_unescape(rest.next()?)))
}

/// Mountinfo fields escape space, tab, newline and backslash as \ooo.
fn mountinfo_escape(s: &str) -> String {
    s.replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012")
}

fn mountinfo_unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The write journal's base directory: `staging_dir=`, else private and surviving a reboot (see `journal`).
/// `path` with its existing part resolved (symlinks, `..`) and the missing rest appended as given.
fn resolved(path: &std::path::Path) -> PathBuf {
    let mut base = path.to_path_buf();
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(&base).is_err() {
        match (base.file_name().map(|n| n.to_os_string()), base.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n);
                base = p.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&base).unwrap_or(base);
    for n in rest.iter().rev() {
        out.push(n);
    }
    out
}

fn journal_base(config: &MountConfig) -> PathBuf {
    config.staging_dir.clone().unwrap_or_else(crate::journal::default_base)
}

/// How the journal's key is found: from the customer key where there is one (cse-c, sse-c), from KMS in cse-kms, and
/// a local key in the modes that send plaintext to the store anyway.
fn journal_keying(mode: EncryptionMode, keys: Option<&Arc<KeyHistory>>, codec: &Codec) -> anyhow::Result<crate::journal::Keying> {
    use crate::journal::Keying;
    Ok(match (mode, codec, keys) {
        (EncryptionMode::CseKms, Codec::Cse { kms: Some(kms), .. }, _) => Keying::Kms(kms.clone()),
        (EncryptionMode::CseC | EncryptionMode::SseC, _, Some(keys)) => Keying::Customer(keys.clone()),
        (EncryptionMode::CseC | EncryptionMode::SseC | EncryptionMode::CseKms, _, _) => {
            bail!("invariant broken: mode {} without its key at journal setup", mode.name())
        }
        (EncryptionMode::None | EncryptionMode::SseS3 | EncryptionMode::SseKms, _, _) => Keying::Local,
    })
}

/// Refuses a server-side encryption mode on a store that is not S3 (the modes are S3 features), with one line naming
/// the store.
pub(crate) fn check_mode_fits_store(config: &MountConfig) -> anyhow::Result<()> {
    let url = &config.store_url;
    let parsed = crate::store::StoreUrl::parse(url).with_context(|| format!("store {url}"))?;
    if config.mode.is_server_side() && !matches!(parsed, crate::store::StoreUrl::S3 { .. }) {
        bail!(
            "mode={} is S3 server-side encryption, which {} does not offer: use an s3:// store, or mode=cse-c or \
             cse-kms (client-side) for {url}",
            config.mode.name(),
            parsed.kind()
        );
    }
    Ok(())
}

/// Opens the store named by the URL.
pub async fn open_store(config: &MountConfig, keys: Option<&Arc<KeyHistory>>) -> anyhow::Result<Arc<dyn Backend>> {
    let url = &config.store_url;
    check_mode_fits_store(config)?;
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("store '{url}': a local store needs an absolute path, as in file:///srv/objects");
        }
        std::fs::create_dir_all(path).with_context(|| format!("creating the local store directory {path}"))?;
        let backend = LocalBackend::new(Path::new(path)).with_context(|| format!("local store {path}"))?;
        return Ok(Arc::new(backend));
    }
    let sse = match config.mode {
        EncryptionMode::SseS3 => Some(crate::store::ServerSideEncryption::S3),
        EncryptionMode::SseKms => Some(crate::store::ServerSideEncryption::Kms {
            key_id: config.kms_key_id.clone(),
            bucket_key: config.bucket_key,
        }),
        EncryptionMode::None | EncryptionMode::CseC | EncryptionMode::CseKms | EncryptionMode::SseC => None,
    };
    let customer_keys = match (config.mode, keys) {
        (EncryptionMode::SseC, Some(keys)) => Some(crate::store::CustomerKeys(keys.clone())),
        (EncryptionMode::SseC, None) => bail!("mode=sse-c needs key_file=PATH"),
        _ => None,
    };
    let opts = S3Options {
        sse,
        customer_keys,
        endpoint: config.endpoint.clone(),
        region: config.region.clone(),
        ca_file: config.ca_file.clone(),
        allow_http: config.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"))
            || std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| e.starts_with("http://")),
        timeout: Some(config.store_timeout),
    };
    let (backend, _) = crate::store::from_url(url, &opts).with_context(|| format!("store {url}"))?;
    Ok(backend)
}

/// The AEAD implementation `aead=` chose.
pub(crate) fn aead_of(config: &MountConfig) -> AeadBackend {
    match config.aead {
        AeadChoice::AwsLc => AeadBackend::AwsLc,
        AeadChoice::RustCrypto => AeadBackend::RustCrypto,
    }
}

/// How the mode turns files into objects and back.
pub(crate) fn codec_of(config: &MountConfig, keys: Option<Arc<KeyHistory>>) -> anyhow::Result<Codec> {
    let (aead, format) = (aead_of(config), config.format);
    Ok(match (config.mode, keys) {
        // Server-side modes store the bytes as they are: the server encrypts them.
        (EncryptionMode::None | EncryptionMode::SseS3 | EncryptionMode::SseKms | EncryptionMode::SseC, _) => {
            Codec::Plain
        }
        // cse-kms reads cse-c objects too when it is given a key file.
        (EncryptionMode::CseKms, keys) => Codec::Cse { keys, kms: Some(kms_client(config)?), aead, format },
        (EncryptionMode::CseC, Some(keys)) => Codec::Cse { keys: Some(keys), kms: None, aead, format },
        (EncryptionMode::CseC, None) => bail!("mode=cse-c needs key_file=PATH"),
    })
}

/// The checks a start makes before it serves: the store answers (with one sentence on what to fix when it does
/// not), the key opens what the store holds, and the KMS key can be used.
pub(crate) async fn check_store(config: &MountConfig, backend: &dyn Backend, codec: &Codec) -> anyhow::Result<()> {
    if let Err(e) = backend.check_access().await {
        bail!("{}", explain_store_error(config, &crate::error_text::error_chain(&e)));
    }
    check_key(backend, codec, config.mode).await?;
    check_kms(codec, config.read_only).await
}

/// If the store already holds encrypted objects, checks that the key history can open one, so a wrong key is an
/// error at mount time rather than EIO later.
async fn check_key(backend: &dyn Backend, codec: &Codec, mode: EncryptionMode) -> anyhow::Result<()> {
    if mode == EncryptionMode::SseC {
        return check_customer_key(backend).await;
    }
    let Codec::Cse { .. } = codec else { return Ok(()) };
    let listing = backend.list("", false).await?;
    // A directory index is no witness: a cache another mount (of another mode, say) may have sealed; it is ignored and
    // rebuilt when it cannot be opened (see fs::dirindex).
    let is_file = |o: &&crate::store::ObjectInfo| !o.key.as_str().ends_with('/') && !crate::fs::dirindex::is_index_key(o.key.as_str());
    let Some(sample) = listing.objects.iter().filter(is_file).find(|o| codec.plain_size(o.size).is_some())
    else {
        return Ok(());
    };
    let (header, _, _) = backend.get_range(&sample.key, 0..codec.header_len()).await?;
    match codec.open(&header).await {
        Ok(_) => Ok(()),
        Err(CodecError::Crypto(crate::crypto::CryptoError::UnknownKey { fingerprint })) => bail!(
            "the key file does not hold the key that encrypted {} (its key fingerprint is {}): check key_file",
            sample.key.as_str(),
            fingerprint
        ),
        // The KMS key exists but cannot be used (disabled, denied, missing, KMS unreachable): say so now.
        Err(CodecError::Kms(e)) if !matches!(e, crate::kms::KmsError::InvalidCiphertext { .. }) => {
            bail!("cannot open {} with KMS: {e}", sample.key.as_str())
        }
        // Not ours, damaged, or in the other client-side mode: that object will fail on its own when read; it says
        // nothing about the keys of this mount.
        Err(_) => Ok(()),
    }
}

/// cse-kms with a key for new files: one GenerateDataKey at mount, the request every write starts with, so a wrong
/// or unreachable KMS endpoint or an unusable key is refused now rather than failing every write with EIO later (an
/// empty bucket gives `check_key` nothing to try). Read-only mounts generate no keys and skip it.
async fn check_kms(codec: &Codec, read_only: bool) -> anyhow::Result<()> {
    let Codec::Cse { kms: Some(kms), .. } = codec else { return Ok(()) };
    let Some(key_id) = kms.key_id() else { return Ok(()) };
    if read_only {
        return Ok(());
    }
    let context = crate::crypto::kms_encryption_context(&crate::crypto::FileId::random());
    match kms.generate_data_key(&context).await {
        Ok(_) => Ok(()),
        Err(e) => bail!("{}", explain_kms_error(kms.endpoint(), key_id, &e)),
    }
}

/// One sentence for a KMS check that failed at mount: which endpoint, what went wrong there, what to check.
fn explain_kms_error(endpoint: &str, key_id: &str, e: &crate::kms::KmsError) -> String {
    use crate::kms::KmsError;
    let check = "check kms_endpoint= (or AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL), the region and the network";
    let not_kms = |what: &str| format!("{endpoint} does not answer like a KMS endpoint ({what}); {check}");
    match e {
        KmsError::Unavailable { detail, .. } => {
            let has = |needle: &str| detail.contains(needle);
            if let Some(status) = status_without_kms_code(detail) {
                return not_kms(&format!("HTTP {status} without a KMS error type"));
            }
            let what = if has("Connection refused") {
                "connection refused".to_string()
            } else if has("timed out") || has("Timeout") || has("deadline has elapsed") {
                "timed out".to_string()
            } else if has("dns error") || has("failed to lookup address") {
                "its host name does not resolve".to_string()
            } else if has("certificate") || has("UnknownIssuer") {
                format!("its TLS certificate was refused ({}); for a private CA add -o ca_file=PATH", last_line(detail))
            } else if has("cannot get AWS credentials") {
                return format!("cannot use KMS at {endpoint} for kms_key_id={key_id}: no AWS credentials ({})", last_line(detail));
            } else {
                detail.lines().next().unwrap_or_default().chars().take(200).collect()
            };
            format!("cannot use KMS at {endpoint} for kms_key_id={key_id}: {what}; {check}")
        }
        // An answer that is no KMS answer at all: an HTTP status without a KMS error type, or a body that is not KMS
        // JSON (a web server, an S3 endpoint, a proxy's error page).
        KmsError::Other { code, .. } if code.starts_with("HTTP ") => {
            not_kms(&format!("{code} without a KMS error type"))
        }
        KmsError::Other { code, message, .. } if code == "MalformedResponse" => not_kms(message),
        // Disabled, missing or denied key: the message says what KMS said and what to do.
        other => format!("KMS at {endpoint}: {other}"),
    }
}

/// The status of an error answer that carried no KMS error type (`… answered 501: <html>…`, where a KMS error reads
/// `… answered 500 KMSInternalException: …`): the server is not KMS.
fn status_without_kms_code(detail: &str) -> Option<&str> {
    let rest = &detail[detail.find(" answered ")? + " answered ".len()..];
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    (digits == 3 && rest[digits..].starts_with(':')).then(|| &rest[..digits])
}

/// sse-c: a HEAD of one top-level object must succeed with a key of the key file, so a wrong key file is refused at
/// mount (the store finds the object's key by its tag, see `store::ssec`).
async fn check_customer_key(backend: &dyn Backend) -> anyhow::Result<()> {
    let listing = backend.list("", false).await?;
    let Some(sample) =
        listing.objects.iter().find(|o| !o.key.is_dir_marker() && !crate::fs::dirindex::is_index_key(o.key.as_str()))
    else {
        return Ok(());
    };
    match backend.head(&sample.key).await {
        Err(e @ crate::store::StoreError::WrongKey { .. }) => bail!("{e}: check key_file"),
        _ => Ok(()),
    }
}

/// The KMS client of a cse-kms mount: the store's credential chain and CA file, the KMS endpoint by AWS rules.
fn kms_client(config: &MountConfig) -> anyhow::Result<Arc<crate::kms::KmsClient>> {
    let opts = S3Options {
        region: config.region.clone(),
        ca_file: config.ca_file.clone(),
        timeout: Some(config.store_timeout),
        ..S3Options::default()
    };
    let signed = crate::store::signed_client(&opts).context("setting up KMS access")?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let endpoint = crate::kms::resolve_endpoint(config.kms_endpoint.as_deref(), &env, signed.region());
    Ok(Arc::new(crate::kms::KmsClient::new(signed, endpoint, config.kms_key_id.clone())))
}

fn serve(
    config: MountConfig,
    keys: Option<Arc<KeyHistory>>,
    rsa_key: Option<Arc<crate::crypto::s3ec::RsaPrivateKey>>,
    ready: Option<&mut std::fs::File>,
) -> anyhow::Result<()> {
    if let Some(keys) = &keys {
        if !crate::keys::lock_in_memory(keys) {
            tracing::warn!("could not lock the key pages in memory (RLIMIT_MEMLOCK): keys could reach swap");
        }
    }
    crate::memory::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("s3cryptfs").build()?;
    // Signal handlers before anything is mounted: a SIGTERM during start-up (a quick `systemctl stop`, a test) then
    // shuts down cleanly instead of killing the process with its mount left dead. Signals that arrive before the wait
    // below are kept by the streams.
    let (mut term, mut int, mut hup) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        anyhow::Ok((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?))
    })?;
    let aead = aead_of(&config);
    let codec = codec_of(&config, keys.clone())?;
    let backend = rt.block_on(async {
        let mut backend = open_store(&config, keys.as_ref()).await?;
        if let Some(addr) = config.metrics_addr {
            crate::metrics::install(addr)?;
            backend = Arc::new(crate::metrics::MeteredBackend::new(backend));
        }
        check_store(&config, &*backend, &codec).await?;
        if !config.read_only {
            if let Err(e) = backend.probe_conditional_writes().await {
                bail!("{}", explain_store_error(&config, &crate::error_text::error_chain(&e)));
            }
        }
        anyhow::Ok(backend)
    })?;
    // A read-only mount stages nothing and uploads nothing (not even what a dead run left: a read-write start of
    // the store does that), so its journal needs no key of the store's.
    let keying = if config.read_only {
        crate::journal::Keying::Local
    } else {
        journal_keying(config.mode, keys.as_ref(), &codec)?
    };
    let journal = rt
        .block_on(crate::journal::Journal::open(&journal_base(&config), &config.store_url, keying, aead))
        .map_err(|e| match e {
            // KMS errors already say what to check (the key, the region, the endpoint).
            crate::journal::JournalError::Kms(k) => anyhow::anyhow!("{k}"),
            other => anyhow::anyhow!("the write journal: {other}"),
        })?;
    // One budget for the whole daemon: the page cache takes what the reservations of the read and write paths leave
    // (src/memory). Installed for the process, so the upload path finds it too.
    let memory = crate::memory::MemoryBudget::for_daemon(config.cache.max_memory());
    crate::memory::install(memory.clone());
    let disk_cache = match &config.cache.disk_dir {
        None if config.cache.scratch_bytes == Some(0) => None,
        // A random reader of a file too large for memory has it fetched whole into a sealed unnamed file beside the
        // journal's, gone with the mount (src/cache/disk.rs).
        None => match journal.scratch_file() {
            Ok(file) => {
                let at = journal.run_path();
                let limit = config.cache.scratch_bytes;
                let scratch = crate::cache::disk::DiskCache::scratch(file, at, &config.store_url, limit, &memory, aead);
                tracing::info!(dir = %at.display(), limit = scratch.limit(), "scratch for random reads");
                Some(Arc::new(scratch))
            }
            Err(e) => {
                tracing::warn!(dir = %journal.run_path().display(), error = %e, "no scratch for random reads");
                None
            }
        },
        Some(dir) => {
            use crate::cache::disk::{CacheKeying, DiskCache};
            // The journal's key source (even for a read-only mount, whose journal needs none): the customer key, a
            // KMS key, or in the plaintext modes the journal's local key, so a later mount opens the cache again.
            let keying = match journal_keying(config.mode, keys.as_ref(), &codec)? {
                crate::journal::Keying::Customer(k) => {
                    CacheKeying::Root(zeroize::Zeroizing::new(*k.encrypting_key().as_bytes()))
                }
                crate::journal::Keying::Kms(kms) => CacheKeying::Kms(kms),
                crate::journal::Keying::Local => match journal.cache_root() {
                    Ok(Some(root)) => CacheKeying::Root(root),
                    Ok(None) => bail!("cache_dir: the write journal has no local key for the disk cache"),
                    Err(e) => bail!("cache_dir: the write journal's local key: {e}"),
                },
            };
            // In a local store's directory the entries would show as files of the mount.
            if let Some(root) = config.store_url.strip_prefix("file://") {
                if let Ok(root) = std::fs::canonicalize(root) {
                    if resolved(dir).starts_with(&root) {
                        bail!(
                            "cache_dir {} is inside the store's directory {}: its entries would show as files in the \
                             mount; choose a directory outside it",
                            dir.display(),
                            root.display()
                        );
                    }
                }
            }
            let limit = config.cache.disk_bytes;
            let cache = rt.block_on(DiskCache::open(dir, &config.store_url, keying, limit, &memory, aead))?;
            let stats = cache.stats();
            let (dir, limit) = (cache.path().display(), cache.limit());
            tracing::info!(dir = %dir, limit, entries = stats.entries, bytes = stats.used, "disk cache");
            Some(Arc::new(cache))
        }
    };
    let fs = Fs::new(
        backend,
        codec,
        PageCache::with_memory(config.cache.memory_bytes, memory),
        Arc::new(journal),
        FsConfig {
            uid: config.uid,
            gid: config.gid,
            umask: config.umask,
            read_only: config.read_only,
            attr_ttl: config.attr_ttl,
            max_readahead: config.cache.max_readahead,
            s3ec: crate::read::s3ec::S3ecOptions { require_commitment: config.require_commitment, rsa_key },
        },
    );
    let fs = Arc::new(match disk_cache {
        Some(disk) => fs.with_disk_cache(disk),
        None => fs,
    });

    // Data a previous run could not upload (stop timeout, store down) goes up before this mount serves.
    // What `s3cryptfs unmount` and umount(8) wait on (see crate::unmount); a mount without it still works. Taken
    // before recovery: see `mount_state`.
    let state = mount_state(&config.mountpoint);
    if !config.read_only {
        let (recovered, unrecovered) = rt.block_on(fs.recover());
        if recovered + unrecovered > 0 {
            tracing::warn!(recovered, unrecovered, "staged data from a previous run");
        }
    }

    // Directory indexes this mount's changes mark are written in the background, once each directory is quiet.
    rt.block_on(async { fs.start_index_writer() });

    let set_state = |what: &str, left: usize| {
        if let Some(s) = &state {
            if let Err(e) = s.set(what, left) {
                tracing::warn!(error = %e, "could not update the unmount state file");
            }
        }
    };

    let mut fuse_config = fuser::Config::default();
    fuse_config.acl = if config.allow_other { fuser::SessionACL::All } else { fuser::SessionACL::Owner };
    fuse_config.n_threads = Some(2);
    fuse_config.clone_fd = true;
    let adapter = crate::fuse::FuseAdapter::new(fs.clone(), rt.handle().clone());
    let mounting = || format!("mounting at {}", config.mountpoint.display());
    // As root we mount ourselves so the type is `fuse.s3cryptfs` (see kmount); otherwise fuser uses fusermount3.
    let own = crate::kmount::mount(&crate::kmount::MountSpec {
        mountpoint: &config.mountpoint,
        source: &config.store_url,
        subtype: "s3cryptfs",
        read_only: config.read_only,
        allow_other: config.allow_other,
    })
    .with_context(mounting)?;
    // The unmounter can end the mount while the loop runs on its own thread (Session::spawn would move fuser's mount
    // out of reach), and the loop ending tells us of an external unmount.
    let (session, mut unmounter) = match own {
        Some((fd, own)) => {
            let session = match fuser::Session::from_fd(adapter, fd, fuse_config.acl, fuse_config) {
                Ok(s) => s,
                Err(e) => {
                    lazy_unmount(&config.mountpoint);
                    return Err(e).with_context(mounting);
                }
            };
            (session, Unmounter::Own(own))
        }
        None => {
            let mut options = vec![
                fuser::MountOption::FSName(config.store_url.clone()),
                fuser::MountOption::Subtype("s3cryptfs".into()),
                fuser::MountOption::DefaultPermissions,
                fuser::MountOption::NoDev,
                fuser::MountOption::NoSuid,
            ];
            if config.read_only {
                options.push(fuser::MountOption::RO);
            }
            fuse_config.mount_options = options;
            let mut session = fuser::Session::new(adapter, &config.mountpoint, &fuse_config).with_context(mounting)?;
            let unmounter = Unmounter::Fuser(session.unmount_callable());
            (session, unmounter)
        }
    };
    // The inode table asks the kernel to forget names when it outgrows its share of max_memory (fs::trim).
    fs.set_name_forgetter(crate::fuse::name_forgetter(session.notifier()));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let loop_thread = std::thread::Builder::new()
        .name("fuse-loop".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(r);
        })
        .context("starting the FUSE session")?;
    // Ready means serving: a stat of the mountpoint goes through the kernel to the loop thread and back.
    wait_until_serving(&config.mountpoint)?;
    tracing::info!(store = %config.store_url, mountpoint = %config.mountpoint.display(), mode = config.mode.name(), "mounted");
    if let Some(r) = ready {
        writeln!(r, "ready")?;
    }
    crate::notify::notify(&format!("READY=1\nSTATUS=serving {} at {}", config.store_url, config.mountpoint.display()));

    // Wait for a signal or for the kernel to end the session (fusermount -u / umount).
    let signalled = rt.block_on(async {
        let mut done_rx = done_rx;
        loop {
            tokio::select! {
                r = &mut done_rx => {
                    if let Ok(Err(e)) = r {
                        tracing::warn!(error = %e, "the FUSE session ended with an error");
                    }
                    return anyhow::Ok(false);
                }
                _ = term.recv() => return anyhow::Ok(true),
                _ = int.recv() => return anyhow::Ok(true),
                _ = hup.recv() => reload_logging(&config),
            }
        }
    })?;
    // On a signal: unmount first, so that nothing can write after the final flush. If files are still open the
    // unmount is refused (EBUSY); then flush what has been written, detach the mount lazily, flush once more for
    // writes that raced with the detach, and exit without waiting for the open descriptors, which will see ENOTCONN.
    crate::notify::notify("STOPPING=1\nSTATUS=flushing and unmounting");
    // From here a start of this store waits for us instead of taking our journal for a live mount's.
    fs.stop_serving();
    set_state("finishing", 0);
    // Before the final uploads: if they cannot finish (the stop timeout kills us, the store is down), the next start
    // finds these records and uploads the staged data.
    rt.block_on(fs.record_pending());
    let mut failed = Vec::new();
    let mut wait_for_loop = true;
    if signalled {
        tracing::info!("signal received: flushing and unmounting");
        let mut unmounted = unmounter.unmount();
        // A process that has just closed its files may still have their RELEASE on its way here (the kernel sends
        // it after close() returned): a moment for those before the mount counts as busy.
        for _ in 0..10 {
            match &unmounted {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    unmounted = unmounter.unmount();
                }
                _ => break,
            }
        }
        if let Err(e) = unmounted {
            tracing::warn!(error = %e, "unmount refused (files still open); flushing, then detaching the mount lazily");
            let _ = rt.block_on(fs.flush_all());
            lazy_unmount(&config.mountpoint);
            wait_for_loop = false;
        }
    }
    failed.extend(rt.block_on(fs.flush_all()));
    for (path, e) in &failed {
        tracing::error!(key = %path, error = %e, "could not upload before exit; data left in the write journal");
    }
    if wait_for_loop && loop_thread.join().is_err() {
        tracing::error!("the FUSE loop thread panicked");
    }
    fs.shutdown();
    drop(rt);
    set_state("done", failed.len());
    if !failed.is_empty() {
        bail!(
            "{} file(s) could not be uploaded; they remain in {} and the next start of this mount uploads them",
            failed.len(),
            fs.journal_dir().display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Azure failures are told in Azure's terms, never as missing AWS keys or buckets.
    #[test]
    fn gcs_store_failures_name_gcs_causes() {
        let url = "gs://data/p";
        let text = explain_gcs_error(url, None, None, "NotFound: NoSuchBucket: GCS bucket data not found (Not Found)");
        assert!(text.starts_with("the bucket of gs://data/p was not found at Google Cloud Storage"), "{text}");
        let denied = "PermissionDenied: GCS answered a listing with status code: 403: caller does not have access";
        let text = explain_gcs_error(url, None, None, denied);
        assert!(text.contains("was refused") && text.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{text}");
        assert!(!text.contains("AWS") && !text.contains("S3"), "{text}");
        let refused = "error sending request: tcp connect error: Connection refused";
        let text = explain_gcs_error(url, Some("http://127.0.0.1:1"), None, refused);
        assert!(text.starts_with("cannot connect to http://127.0.0.1:1 for gs://data/p"), "{text}");
        assert_eq!(explain_gcs_error(url, None, None, "odd: thing"), "cannot use store gs://data/p: thing");
    }

    #[test]
    fn azure_store_failures_name_azure_causes() {
        let url = "az://data/p";
        let xml = |code: &str| {
            format!("Azure error: <?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>credential not found")
        };
        let text = explain_azure_error(url, None, None, &xml("AuthenticationFailed"));
        assert!(text.starts_with("access to az://data/p was refused"), "{text}");
        assert!(text.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{text}");
        assert!(text.ends_with("(AuthenticationFailed)"), "{text}");
        let text = explain_azure_error(url, None, None, "Generic MicrosoftAzure error: Account must be specified");
        assert!(text.contains("AZURE_STORAGE_ACCOUNT_NAME") && !text.contains("AWS"), "{text}");
        let missing = xml("ContainerNotFound").replace("credential not found", "gone");
        let text = explain_azure_error(url, None, None, &missing);
        assert!(text.contains("container of az://data/p was not found"), "{text}");
        let ep = Some("http://127.0.0.1:1");
        let text = explain_azure_error(url, ep, None, "error sending request: tcp connect error: Connection refused");
        assert!(text.starts_with("cannot connect to http://127.0.0.1:1 for az://data/p"), "{text}");
        let text = explain_azure_error(url, None, None, "something else: odd");
        assert_eq!(text, "cannot use store az://data/p: odd");
    }

    /// Regression (issue 10.7f): the log file was created 0644, readable by every local user.
    #[test]
    fn a_new_log_file_is_private_and_an_existing_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = dir.path().join("new.log");
        open_log_file(&new).unwrap();
        assert_eq!(mode(&new), 0o600);
        let shared = dir.path().join("shared.log");
        std::fs::write(&shared, b"old line\n").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        writeln!(open_log_file(&shared).unwrap(), "new line").unwrap();
        assert_eq!(mode(&shared), 0o640);
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "old line\nnew line\n");
    }

    /// Regression (issue 10.7g): a cse-kms mount with a wrong or unreachable KMS endpoint mounted and then failed
    /// every write with EIO. The mount now asks KMS once (`check_kms`) and refuses with a sentence naming the endpoint
    /// and what failed. The details are what the KMS client reported against each kind of wrong endpoint here.
    #[test]
    fn kms_failures_at_mount_name_the_endpoint_and_the_cause() {
        use crate::kms::KmsError;
        let ep = "http://127.0.0.1:1";
        let unavailable = |detail: &str| KmsError::Unavailable { key_id: "alias/x".into(), detail: detail.into() };
        let cases = [
            (unavailable("cannot reach http://127.0.0.1:1/: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)"), "connection refused"),
            (unavailable("cannot reach http://127.0.0.1:1/: error sending request: operation timed out"), "timed out"),
            (unavailable("cannot reach http://x.invalid/: error sending request: client error (Connect): dns error: failed to lookup address information"), "does not resolve"),
            (unavailable("http://127.0.0.1:1/ answered 501: <html><p>Unsupported method ('POST')</p>"), "does not answer like a KMS endpoint (HTTP 501"),
            (KmsError::Other { key_id: "alias/x".into(), code: "HTTP 404".into(), message: "<html>".into() }, "does not answer like a KMS endpoint (HTTP 404"),
            (KmsError::Other { key_id: "alias/x".into(), code: "MalformedResponse".into(), message: "the GenerateDataKey answer cannot be used: expected value".into() }, "does not answer like a KMS endpoint (the GenerateDataKey"),
            (unavailable("http://127.0.0.1:1/ answered 500 KMSInternalException: boom"), "KMSInternalException"),
            (KmsError::Disabled { key_id: "alias/x".into(), message: "off".into() }, "is disabled"),
        ];
        for (e, want) in cases {
            let text = explain_kms_error(ep, "alias/x", &e);
            assert!(text.contains(ep) && text.contains(want), "{e:?}: {text}");
            assert!(!text.contains("<html>") && !text.contains('\n'), "{text}");
        }
    }

    /// Regression (issue 10.7d): a certificate for another host name was reported as "not trusted: add -o ca_file",
    /// even with ca_file= given. The details are what rustls said through object_store here.
    #[test]
    fn tls_errors_are_told_apart() {
        let ep = "https://127.0.0.1:48443";
        let mismatch = "the object store is unreachable (could not connect): error sending request: client error                         (Connect): invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate                         is only valid for DnsName(\"wrong.example\")";
        let unknown = "the object store is unreachable (could not connect): error sending request: client error                        (Connect): invalid peer certificate: UnknownIssuer";
        let expired = "could not connect: client error (Connect): invalid peer certificate: certificate expired:                        verification time 1 (UNIX), but certificate is not valid after 0 (UNIX)";
        let ca = Path::new("/etc/ca.pem");
        for ca_file in [None, Some(ca)] {
            let text = explain_tls_error(ep, ca_file, mismatch);
            assert!(text.contains("another host name") && text.contains("wrong.example"), "{text}");
            assert!(!text.contains("add -o ca_file"), "{text}");
        }
        let text = explain_tls_error(ep, None, unknown);
        assert!(text.contains("not trusted") && text.contains("add -o ca_file"), "{text}");
        let text = explain_tls_error(ep, Some(ca), unknown);
        assert!(text.contains("not signed by a CA in ca_file=/etc/ca.pem") && !text.contains("add -o"), "{text}");
        let text = explain_tls_error(ep, None, expired);
        assert!(text.contains("certificate expired") && !text.contains("ca_file"), "{text}");
    }

    /// Regression (issue 10.7a): the level SIGHUP reads from log_level_file= goes through `log_filter`; a word that
    /// is not a level must be refused there (so the reload keeps the current level and warns), not become a filter
    /// that silences everything.
    #[test]
    fn the_log_filter_takes_only_levels() {
        assert!(log_filter(Some("warning")).unwrap().to_string().contains("warn"));
        for bad in ["loud", "warnings", "s3cryptfs=debug"] {
            let err = log_filter(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("error, warn, info, debug, trace"), "{bad}: {err}");
        }
    }

    /// Another user who can write the directory of `log_file=` or `log_level_file=` (a shared /var/log, /tmp) cannot
    /// point them elsewhere with a symlink, read the log through a file of theirs, or block a SIGHUP with a fifo.
    #[test]
    fn log_files_another_user_could_plant_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("own.log");
        open_log_file(&own).unwrap();
        assert_eq!(std::fs::metadata(&own).unwrap().permissions().mode() & 0o777, 0o600);
        open_log_file(&own).expect("an existing file of ours is reopened");
        std::fs::write(dir.path().join("level"), "debug\n").unwrap();
        assert_eq!(read_log_level_file(&dir.path().join("level")).unwrap().trim(), "debug");

        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_log_file(&link).is_err(), "a symlinked log_file was followed");
        assert!(read_log_level_file(&link).is_err(), "a symlinked log_level_file was followed");
        assert_eq!(std::fs::read(&target).unwrap(), b"");

        let open = dir.path().join("open.log");
        std::fs::write(&open, "").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = open_log_file(&open).unwrap_err().to_string();
        assert!(err.contains("writable by every user"), "{err}");

        open_log_file(Path::new("/dev/null")).expect("a device of root's, such as /dev/null");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read_log_level_file(&fifo).is_err(), "a fifo was read as log_level_file");

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = dir.path().join("theirs.log");
            std::fs::write(&theirs, "").unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = open_log_file(&theirs).unwrap_err().to_string();
            assert!(err.contains("belongs to uid 65534"), "{err}");
        }
    }

    #[test]
    fn mountinfo_escaping_round_trips_the_bytes_the_kernel_escapes() {
        let path = "/mnt/a dir\twith\\odd\nnames";
        let escaped = mountinfo_escape(path);
        assert_eq!(escaped, "/mnt/a\\040dir\\011with\\134odd\\012names");
        assert!(!escaped.contains(' '), "a mountinfo field has no spaces");
        assert_eq!(mountinfo_unescape(&escaped), path);
    }
}
