//! The key agent: holds named keys in memory and serves them over a Unix socket to processes of the same user.
//!
//! A *key* here is a key history (the content of a key file: base64 keys, the first one encrypts) under a name.
//! `s3cryptfs agent` runs the daemon; `s3cryptfs key add|list|remove` and `s3cryptfs agent lock|stop` are clients;
//! a mount with `agent=SOCKET,key_name=NAME` calls [`fetch_key`] once at start and keeps the history it got.
//!
//! Layout and data flow:
//! - [`protocol`]: the versioned wire format (4-byte length + JSON), pure; byte tables in docs/AGENT.md.
//! - [`server`]: the daemon's accept loop and request handling, given an already-bound listener and a shutdown
//!   future, so tests run it in-process on a temporary socket.
//! - `socket`: creating the socket file safely (private directory, mode 0600 before `listen`, stale sockets, a
//!   running agent), and removing it on exit.
//! - [`client`]: blocking client calls (no runtime needed, so a mount can call them before or inside its runtime).
//! - `process`: what makes the process fit to hold keys — no core dumps, not dumpable, locked memory — plus
//!   daemonizing and logging.
//! - `tty`: reading a key from a terminal with echo off.
//!
//! Invariants: key material only ever lives in [`KeyHistory`]/`Key256` values or in wiped (`Zeroizing`) buffers of a
//! fixed size; it is never logged, never put in an error, never passed on argv or in the environment. Only the
//! agent's own uid and root are served (checked per connection with SO_PEERCRED), and clients in turn only talk to
//! an agent running as their own uid or root.

pub mod client;
mod process;
pub mod protocol;
pub mod server;
mod socket;
mod tty;

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::cli::{AgentAction, AgentArgs, KeyAction, KeyArgs};
use crate::crypto::{KeyFileError, KeyHistory};
use protocol::{ErrorCode, ProtocolError};

pub use socket::SocketFile;

/// Everything that can go wrong starting, running or talking to the agent. Each message is one sentence saying what
/// to do; none contains key material.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("no key agent is listening on {}: start one with `s3cryptfs agent`", socket.display())]
    NotRunning { socket: PathBuf },
    #[error("cannot connect to the key agent at {}: {source}", socket.display())]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error(
        "the process listening on {} runs as uid {uid}, which is neither you nor root: refusing to exchange keys with it",
        socket.display()
    )]
    Untrusted { socket: PathBuf, uid: u32 },
    #[error("talking to the key agent at {}: {source}", socket.display())]
    Protocol { socket: PathBuf, source: ProtocolError },
    #[error("the key agent at {} did not answer in time", socket.display())]
    Timeout { socket: PathBuf },
    #[error("the key agent at {} closed the connection without replying", socket.display())]
    NoReply { socket: PathBuf },
    #[error("key agent at {}: {message}", socket.display())]
    Agent { socket: PathBuf, code: ErrorCode, message: String },
    #[error(
        "a key agent is already running on {} (pid {pid}): stop it with `s3cryptfs agent stop`, or pass another --socket",
        socket.display()
    )]
    AlreadyRunning { socket: PathBuf, pid: String },
    #[error("{} exists and is not a socket: remove it or pass another --socket", socket.display())]
    NotASocket { socket: PathBuf },
    #[error("cannot create the directory {} for the agent socket: {source} (set XDG_RUNTIME_DIR or pass --socket)", dir.display())]
    SocketDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot create the agent socket {}: {source}", socket.display())]
    Bind { socket: PathBuf, source: std::io::Error },
    #[error(transparent)]
    KeyFile(#[from] crate::keys::KeyError),
    #[error("the key read from standard input is not a key file: {0}")]
    KeyText(KeyFileError),
    #[error(
        "the key read from standard input is longer than {max} bytes: a key file holds base64 lines of 44 characters"
    )]
    KeyTextTooLong { max: usize },
    #[error("the key read from standard input is not text: paste the base64 lines of a key file")]
    KeyTextNotUtf8,
    #[error("reading the key from standard input: {0}")]
    Stdin(std::io::Error),
    #[error("the key agent at {} sent an invalid key history for '{name}': {source}", socket.display())]
    BadHistory { socket: PathBuf, name: String, source: KeyFileError },
    #[error("invalid key name '{name}': {source}")]
    Name { name: String, source: ProtocolError },
}

impl AgentError {
    /// The agent's error code, when the agent answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `s3cryptfs agent [-f] [--socket PATH]` runs the agent; `agent lock` and `agent stop` control a running one.
pub fn agent_command(args: AgentArgs) -> anyhow::Result<()> {
    let socket = args.socket.unwrap_or_else(default_socket);
    match args.action {
        None => process::run_agent(&socket, args.foreground),
        Some(AgentAction::Lock) => {
            let dropped = client::lock(&socket)?;
            eprintln!("the agent dropped {dropped} key{}; it keeps running", plural(dropped));
            Ok(())
        }
        Some(AgentAction::Stop) => {
            client::stop(&socket)?;
            eprintln!("the agent on {} stopped", socket.display());
            Ok(())
        }
    }
}

/// `s3cryptfs key add|list|remove`.
pub fn key_command(args: KeyArgs) -> anyhow::Result<()> {
    let socket = args.socket.unwrap_or_else(default_socket);
    match args.action {
        KeyAction::Add { name, from_file } => {
            protocol::check_name(&name).map_err(|source| AgentError::Name { name: name.clone(), source })?;
            // Before reading the key: no one should paste a key only to learn that no (trusted) agent is there.
            client::ping(&socket)?;
            let history = match from_file {
                Some(path) => crate::keys::load_key_file(&path).map_err(AgentError::from)?,
                None => tty::read_key_history()?,
            };
            let replaced = client::add(&socket, &name, &history)?;
            eprintln!(
                "{} key '{name}' ({} key{}: {})",
                if replaced { "replaced" } else { "added" },
                history.len(),
                plural(history.len()),
                history.fingerprints().iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
            );
            Ok(())
        }
        KeyAction::List => {
            let entries = client::list(&socket)?;
            if entries.is_empty() {
                eprintln!("the agent holds no keys");
            }
            let width = entries.iter().map(|e| e.name.chars().count()).max().unwrap_or(0);
            let mut out = std::io::stdout().lock();
            for e in &entries {
                let n = e.fingerprints.len();
                writeln!(out, "{:<width$}  {n} key{}  {}", e.name, plural(n), e.fingerprints.join(" "))?;
            }
            Ok(())
        }
        KeyAction::Remove { name } => {
            protocol::check_name(&name).map_err(|source| AgentError::Name { name: name.clone(), source })?;
            client::remove(&socket, &name)?;
            eprintln!("removed key '{name}'");
            Ok(())
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Fetches key `name` (a key history) from the agent listening on `socket`.
///
/// Fails with a sentence naming the socket and what to do when no agent listens there, the agent does not hold the
/// name, or the listener is not the caller's uid or root. The error is an [`AgentError`] (downcast it for
/// [`AgentError::code`]: `NoSuchKey`, or `Locked` after `agent lock`).
pub fn fetch_key(socket: &Path, name: &str) -> anyhow::Result<KeyHistory> {
    Ok(client::fetch(socket, name)?)
}

/// The default socket path: $XDG_RUNTIME_DIR/s3cryptfs/agent.sock, or /run/s3cryptfs/agent.sock for root.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("s3cryptfs/agent.sock"),
        _ => PathBuf::from("/run/s3cryptfs/agent.sock"),
    }
}
