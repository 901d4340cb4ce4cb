//! The agent as a process: hardening, memory locking, daemonizing and logging.
//!
//! Order, as for mounts (see `run.rs`): everything that can fail because of what the user typed (the socket path, an
//! agent already running) happens before the fork, so the error reaches the terminal. The socket is bound and
//! listening before the fork; the child then builds its runtime and writes "ready" to a pipe the parent waits on, so
//! `s3cryptfs agent` returns only once the agent serves. The fork happens before any thread exists.
//!
//! Memory: a process holding keys must not be dumped (core files, ptrace by other processes of the user) and should
//! not have its key pages swapped out. Dumping is disabled first thing. For locking: with CAP_IPC_LOCK (root), or with
//! an unlimited RLIMIT_MEMLOCK, all memory is locked (`mlockall` with `MCL_ONFAULT`, which locks pages as they are touched and
//! costs only the resident set). Under a finite limit (8 MiB by default for users) whole-process locking is not
//! attempted: `MCL_FUTURE` would turn every allocation past the limit into a failed `mmap` and abort the agent.
//! Instead each key's page is locked when the key is added, with one warning if that fails.
//!
//! The logging setup mirrors `run.rs` (stderr in the foreground, syslog in the background); those helpers are
//! private there.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

use super::server::{self, ServerConfig};
use super::socket::{self, Bound};
use crate::crypto::KeyHistory;

/// Runs the agent on `socket`: in the foreground (logging to stderr) or as a daemon (logging to syslog).
pub(super) fn run_agent(socket_path: &Path, foreground: bool) -> anyhow::Result<()> {
    crate::daemon::harden_process()?;
    if foreground {
        init_logging(LogTarget::Stderr);
        let bound = socket::bind(socket_path)?;
        return serve_until_stopped(bound, None);
    }
    let bound = socket::bind(socket_path)?;
    let mut fds = [0; 2];
    // SAFETY: pipe() writes two descriptors into the array we own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        bound.file.remove();
        return Err(e).context("creating the readiness pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (the runtime is built in the child), so fork is safe.
    match unsafe { libc::fork() } {
        -1 => {
            let e = std::io::Error::last_os_error();
            bound.file.remove();
            Err(e).context("fork")
        }
        0 => {
            drop(read_end);
            // SAFETY: setsid and chdir have no memory-safety preconditions; the path is a valid C string. The agent
            // leaves the terminal's session and does not keep the starting directory busy.
            unsafe {
                libc::setsid();
                libc::chdir(c"/".as_ptr());
            }
            crate::daemon::detach_stdio(false);
            init_logging(LogTarget::Syslog);
            let mut ready = std::fs::File::from(write_end);
            match serve_until_stopped(bound, Some(&mut ready)) {
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
            // Our copy of the listening socket; the child keeps its own. The file stays.
            drop(bound.listener);
            crate::daemon::wait_until_ready(read_end, "the agent process")
        }
    }
}

/// Builds the runtime and serves until `stop` or SIGTERM/SIGINT. Removes the socket file on every way out.
fn serve_until_stopped(bound: Bound, ready: Option<&mut std::fs::File>) -> anyhow::Result<()> {
    // After the fork: memory locks are not inherited by a child.
    lock_memory();
    let file = bound.file.clone();
    if bound.replaced_stale {
        tracing::info!(socket = %file.path().display(), "removed a stale socket left by an agent that did not stop cleanly");
    }
    let result = (|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the agent's runtime")?;
        rt.block_on(async move {
            bound.listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(bound.listener)?;
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
            tracing::info!(socket = %file.path().display(), pid = std::process::id(), "key agent listening");
            if let Some(r) = ready {
                writeln!(r, "ready")?;
            }
            let shutdown = async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            };
            server::serve(listener, ServerConfig::for_current_user(Some(file.clone())), shutdown).await?;
            tracing::info!("key agent stopped");
            anyhow::Ok(())
        })
    })();
    if result.is_err() {
        bound.file.remove();
    }
    result
}

/// Set when whole-process locking is not in place, so each key's page is locked as it is added.
static LOCK_KEY_PAGES: AtomicBool = AtomicBool::new(false);
/// The one warning about a key page that could not be locked has been logged.
static KEY_PAGE_WARNED: AtomicBool = AtomicBool::new(false);

/// Locks the process's memory where that cannot break later allocations; otherwise arranges for key pages to be
/// locked one by one (see the module docs).
fn lock_memory() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    let unlimited = rc == 0 && limit.rlim_cur == libc::RLIM_INFINITY;
    if unlimited || has_cap_ipc_lock() {
        // SAFETY: mlockall has no memory-safety preconditions.
        if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } == 0 {
            tracing::info!("all of the agent's memory is locked (never swapped out)");
            return;
        }
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lock the agent's memory; locking only the pages that hold keys"
        );
    } else {
        tracing::info!(
            memlock_limit_bytes = limit.rlim_cur,
            "RLIMIT_MEMLOCK is finite: locking only the pages that hold keys, not the whole process"
        );
    }
    LOCK_KEY_PAGES.store(true, Ordering::Relaxed);
}

/// Whether this process may lock memory beyond RLIMIT_MEMLOCK (CAP_IPC_LOCK, bit 14 of the effective set; root
/// usually has it, root in a restricted container may not).
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Locks the memory pages that hold `history`'s keys, when whole-process locking is not in place. Pages stay locked
/// after the key is dropped (they may hold other keys; a page is at most 4 KiB of the limit).
pub(super) fn lock_key_pages(history: &KeyHistory) {
    if !LOCK_KEY_PAGES.load(Ordering::Relaxed) {
        return;
    }
    if !crate::keys::lock_in_memory(history) && !KEY_PAGE_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lock a key's memory page (RLIMIT_MEMLOCK reached?): keys may be swapped out"
        );
    }
}

enum LogTarget {
    Stderr,
    Syslog,
}

/// `RUST_LOG`, or `info`: the agent logs little (start, stop, keys added and removed by name, refused clients), and
/// those lines are the audit trail.
fn init_logging(target: LogTarget) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match target {
        // Under systemd (a user unit running `s3cryptfs agent -f`) stderr is the journal: priorities, no timestamps.
        LogTarget::Stderr if crate::daemon::under_journald() => {
            builder.with_ansi(false).without_time().with_writer(crate::daemon::JournalWriter).try_init()
        }
        LogTarget::Stderr => {
            // SAFETY: isatty has no preconditions. Colours only for a person watching, not in captured logs.
            let terminal = unsafe { libc::isatty(2) } == 1;
            builder.with_ansi(terminal).with_writer(std::io::stderr).try_init()
        }
        LogTarget::Syslog => {
            // SAFETY: the identity string is 'static and NUL-terminated, as openlog requires.
            unsafe { libc::openlog(c"s3cryptfs-agent".as_ptr(), libc::LOG_PID, libc::LOG_AUTHPRIV) };
            builder.with_ansi(false).without_time().with_writer(crate::daemon::SyslogWriter).try_init()
        }
    };
}

