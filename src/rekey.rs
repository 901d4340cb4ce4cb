//! `s3cryptfs rekey`: move every object of a store to the current writing key without re-encrypting content.
//!
//! What "the current writing key" is depends on the mode (`-o mode=`, parsed as for `mount`):
//! - **cse-c**: the first key of the key history. Each object whose header (envelope kind 1) names another key's
//!   fingerprint gets its data key re-wrapped under the first key (`ObjectCipher::open` with the history, then
//!   `rewrap`); only the 512-byte header changes.
//! - **cse-kms**: the KMS key `kms_key_id=`. Each kind-2 object under another KMS key gets its blob moved with KMS
//!   `ReEncrypt` (same encryption context; the plaintext data key never leaves KMS) and a new header with the same
//!   file id.
//! - **sse-c**: the first key of the key history. Each object whose key-MD5 tag names another key is copied
//!   server-side onto itself with the old key as copy-source key and the new one as target.
//!
//! - **AWS S3 Encryption Client objects** (formats V2 and V3, issue 12) in cse-c (`AES/GCM` wraps) and cse-kms
//!   (`kms+context` wraps): their wrapped data key lives in user metadata, so they are moved by replacing that one
//!   metadata value (one server-side CopyObject on S3, no content through the client; see `rekey/s3ec.rs`, which
//!   also lists what is left alone and why).
//!
//! Rekey rotates within a mode: objects of another mode (kind 1 in a cse-kms rekey, kind 2 in a cse-c one) and
//! objects that are not ours are counted as skipped. Nothing is decrypted or re-encrypted by the client, and the data
//! keys stay the same, so path bindings (which depend on data key and path) stay valid and need no change.
//!
//! Invariants, and how they hold:
//! - **No object is ever unreadable with the old-plus-new key history.** Each object is replaced whole and atomically
//!   (one PUT, CompleteMultipartUpload or CopyObject on S3; one sector-sized in-place write, or one metadata attribute,
//!   on the local store), and
//!   before and after the replacement one key of the history opens it. The new header is opened in memory before it
//!   is written.
//! - **A concurrent writer is never clobbered.** Every replacement is conditional on the ETag the decision was made
//!   on (`If-Match`, `x-amz-copy-source-if-match`, or the local store's ETag check on the descriptor it writes); a
//!   lost race re-reads the object. (For S3EC objects, whose metadata is replaced, a concurrent change of metadata
//!   alone keeps the ETag and is not seen: see `rekey/s3ec.rs`.)
//! - **Resumable.** Objects already under the writing key are skipped after one small read (the header, or the SSE-C
//!   tag), so an interrupted run is finished by running the same command again. The first Ctrl-C (SIGINT/SIGTERM)
//!   lets the objects in flight finish and stops; a second one exits at once, which is just as safe (an unfinished
//!   multipart upload is invisible and removed by the bucket's lifecycle rule).
//!
//! Concurrency: one task drives up to `--jobs` objects at once (`FuturesUnordered`); every object's work is I/O
//! (store, KMS), the little CPU work (one key unwrap and wrap) does not need threads of its own. Progress goes to
//! stderr at most once a second.
//!
//! Test hook (undocumented in `--help`, documented in docs/ROTATION.md): `S3CRYPTFS_REKEY_TEST_SIGNAL=SIG:N`, with SIG
//! `INT` or `KILL`, makes the process send itself that signal right after its N-th rekeyed object, so tests can
//! interrupt a run at a known point (a graceful Ctrl-C, or a crash).

mod object;
mod progress;
mod s3ec;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::cli::RekeyArgs;
use crate::config::{AeadChoice, EncryptionMode, MountConfig};
use crate::crypto::{AeadBackend, KeyHistory};
use crate::store::{Backend, ObjectInfo, S3Options};
use object::{Outcome, Skip, Target};
use progress::Stats;

/// Environment variable of the test hook (see the module docs).
const TEST_SIGNAL_ENV: &str = "S3CRYPTFS_REKEY_TEST_SIGNAL";

/// How often the progress line is printed, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub fn rekey_command(args: RekeyArgs) -> anyhow::Result<()> {
    let mut pairs = Vec::new();
    for o in &args.options {
        pairs.extend(crate::config::split_options(o));
    }
    let config = MountConfig::from_options(args.store.clone(), PathBuf::from("/"), true, &pairs)?;
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if !matches!(config.mode, EncryptionMode::CseC | EncryptionMode::CseKms | EncryptionMode::SseC) {
        bail!(
            "rekey applies to cse-c, cse-kms and sse-c, not mode={}: the other modes have no key of ours to rotate",
            config.mode.name()
        );
    }
    harden_process();
    // Before the runtime starts any thread: key_env= edits the environment, which is only safe single-threaded.
    let keys = load_keys(&config)?;
    if let Some(keys) = &keys {
        if !crate::keys::lock_in_memory(keys) {
            tracing::warn!("could not lock the keys in memory (RLIMIT_MEMLOCK); they may be written to swap");
        }
    }
    init_logging(config.log_level.as_deref());
    let test_signal = test_signal()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("s3cryptfs-rekey").build()?;
    rt.block_on(rekey(config, keys, args.jobs, args.dry_run, test_signal))
}

/// The key history of the mode: cse-c and sse-c rotate to its first key; cse-kms needs none.
fn load_keys(config: &MountConfig) -> anyhow::Result<Option<Arc<KeyHistory>>> {
    match (config.mode, &config.key_source) {
        (EncryptionMode::CseC | EncryptionMode::SseC, Some(source)) => Ok(Some(Arc::new(crate::keys::load(source)?))),
        (EncryptionMode::CseC | EncryptionMode::SseC, None) => {
            bail!("mode={} needs the key history (new key first, old keys below): add -o key_file=PATH", config.mode.name())
        }
        _ => Ok(None),
    }
}

async fn rekey(
    config: MountConfig,
    keys: Option<Arc<KeyHistory>>,
    jobs: usize,
    dry_run: bool,
    test_signal: Option<(i32, u64)>,
) -> anyhow::Result<()> {
    let backend = open_store(&config, keys.as_ref())?;
    backend.check_access().await.with_context(|| format!("cannot use store {}", config.store_url))?;
    let target = target(&config, keys).await?;
    // Signals are caught from here on, so even a Ctrl-C during the listing stops cleanly.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    let listing = backend.list("", true).await.with_context(|| format!("listing {}", config.store_url))?;
    // Directory markers have no content, so no header: only sse-c has something to move for them (on S3 they are
    // empty objects encrypted like any other).
    let with_markers = config.mode == EncryptionMode::SseC;
    let objects: Vec<ObjectInfo> =
        listing.objects.into_iter().filter(|o| with_markers || !o.key.is_dir_marker()).collect();
    let started = Instant::now();
    let mut stats = Stats::new(objects.len() as u64);
    let mut pending = objects.iter();
    let mut in_flight = FuturesUnordered::new();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        while !stopping && in_flight.len() < jobs {
            let Some(info) = pending.next() else { break };
            let (target, backend) = (&target, &*backend);
            in_flight.push(async move { (info, object::rekey_object(target, backend, info, dry_run).await) });
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            Some((info, (outcome, cost, kms_calls))) = in_flight.next() => {
                match &outcome {
                    Outcome::Failed(why) => eprintln!("rekey: failed {}: {why}", info.key),
                    Outcome::Skipped(Skip::S3ecLeft(why)) => {
                        eprintln!("rekey: left {} as it is (it still needs the key it is wrapped under): {why}", info.key)
                    }
                    _ => {}
                }
                stats.record(&outcome, cost, kms_calls);
                if let (Outcome::Rekeyed, Some((signal, after))) = (&outcome, test_signal) {
                    if stats.rekeyed == after {
                        // SAFETY: raise() sends a signal to this process; no memory is involved.
                        unsafe { libc::raise(signal) };
                    }
                }
            }
            _ = ticker.tick() => eprintln!("{}", stats.progress_line(started.elapsed())),
            _ = interrupt.recv() => stopping = stop_or_exit(stopping, in_flight.len()),
            _ = terminate.recv() => stopping = stop_or_exit(stopping, in_flight.len()),
        }
    }
    for line in stats.summary(started.elapsed(), dry_run) {
        eprintln!("{line}");
    }
    if stopping {
        bail!(
            "interrupted after {} of {} objects; run the same command again to continue (objects already on the new \
             key are skipped)",
            stats.done(),
            stats.total
        );
    }
    if stats.failed > 0 {
        bail!(
            "{} object(s) {} (each is named above with the cause); fix that and run the same command again (objects \
             already on the new key are skipped)",
            stats.failed,
            if dry_run { "would fail" } else { "could not be rekeyed" }
        );
    }
    Ok(())
}

/// First signal: stop starting objects and let the ones in flight finish. Second: exit now (still safe: every
/// replacement is atomic).
fn stop_or_exit(already_stopping: bool, in_flight: usize) -> bool {
    if already_stopping {
        eprintln!("rekey: stopped at once; objects in flight were left as they were (each is old or new, never mixed)");
        std::process::exit(130);
    }
    eprintln!("rekey: interrupted: finishing the {in_flight} object(s) in flight (interrupt again to stop at once)");
    true
}

/// What to move objects to, checked before anything is touched.
async fn target(config: &MountConfig, keys: Option<Arc<KeyHistory>>) -> anyhow::Result<Target> {
    let aead = match config.aead {
        AeadChoice::AwsLc => AeadBackend::AwsLc,
        AeadChoice::RustCrypto => AeadBackend::RustCrypto,
    };
    match config.mode {
        EncryptionMode::CseC => {
            let keys = keys.context("mode=cse-c needs the key history")?;
            Ok(Target::CustomerKey { keys, aead })
        }
        EncryptionMode::SseC => Ok(Target::ServerSideCustomerKey),
        EncryptionMode::CseKms => {
            let Some(wanted) = config.kms_key_id.clone() else {
                bail!("rekey in mode=cse-kms needs the KMS key to move objects to: add -o kms_key_id=KEY")
            };
            let opts = S3Options {
                region: config.region.clone(),
                ca_file: config.ca_file.clone(),
                timeout: Some(config.store_timeout),
                ..S3Options::default()
            };
            let signed = crate::store::signed_client(&opts).context("setting up KMS access")?;
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let endpoint = crate::kms::resolve_endpoint(config.kms_endpoint.as_deref(), &env, signed.region());
            let kms = Arc::new(crate::kms::KmsClient::new(signed, endpoint, Some(wanted.clone())));
            // Resolves an alias to the key's ARN (headers store ARNs) and fails now if the key cannot take objects.
            let key = kms.describe_key(&wanted).await.with_context(|| format!("looking up KMS key {wanted}"))?;
            if !key.enabled {
                bail!("KMS key {wanted} ({}) is {}: enable it before moving objects to it", key.arn, key.state);
            }
            Ok(Target::Kms { kms, arn: key.arn })
        }
        other => bail!("rekey applies to cse-c, cse-kms and sse-c, not mode={}", other.name()),
    }
}

/// The store named by the URL, as a mount of this mode would open it (but a missing local directory is an error,
/// not created: there would be nothing to rekey).
fn open_store(config: &MountConfig, keys: Option<&Arc<KeyHistory>>) -> anyhow::Result<Arc<dyn Backend>> {
    let url = &config.store_url;
    crate::run::check_mode_fits_store(config)?;
    if let Some(path) = url.strip_prefix("file://") {
        if !std::path::Path::new(path).is_dir() {
            bail!("the local store directory {path} does not exist");
        }
    }
    let customer_keys = match (config.mode, keys) {
        (EncryptionMode::SseC, Some(keys)) => Some(crate::store::CustomerKeys(keys.clone())),
        _ => None,
    };
    let opts = S3Options {
        customer_keys,
        endpoint: config.endpoint.clone(),
        region: config.region.clone(),
        ca_file: config.ca_file.clone(),
        allow_http: config.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"))
            || std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| e.starts_with("http://")),
        timeout: Some(config.store_timeout),
        ..S3Options::default()
    };
    let (backend, _) = crate::store::from_url(url, &opts).with_context(|| format!("store {url}"))?;
    Ok(backend)
}

/// `S3CRYPTFS_REKEY_TEST_SIGNAL=INT:N` or `KILL:N` (see the module docs).
fn test_signal() -> anyhow::Result<Option<(i32, u64)>> {
    let Ok(value) = std::env::var(TEST_SIGNAL_ENV) else { return Ok(None) };
    let parsed = value.split_once(':').and_then(|(sig, n)| {
        let sig = match sig {
            "INT" => libc::SIGINT,
            "KILL" => libc::SIGKILL,
            _ => return None,
        };
        Some((sig, n.parse::<u64>().ok().filter(|n| *n > 0)?))
    });
    match parsed {
        Some(p) => Ok(Some(p)),
        None => bail!("{TEST_SIGNAL_ENV}={value:?}: expected INT:N or KILL:N with N at least 1"),
    }
}

pub(crate) fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = level
        .and_then(|l| EnvFilter::try_new(l).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).try_init();
}

/// No core dumps and no ptrace by other users: this process holds keys.
fn harden_process() {
    // SAFETY: setrlimit/prctl with valid arguments have no memory-safety preconditions.
    unsafe {
        let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}
