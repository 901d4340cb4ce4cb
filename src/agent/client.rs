//! Blocking client calls to the agent.
//!
//! Blocking std I/O on purpose: a mount calls [`fetch`] while it sets itself up, possibly from inside its tokio
//! runtime, where starting a second runtime would panic; the exchanges are one small frame each way.
//!
//! Before anything is sent, the listener's credentials are checked (SO_PEERCRED): keys are only given to, or taken
//! from, an agent running as the caller's uid or as root. A socket path under someone else's control therefore cannot
//! collect keys from `key add` or hand a mount a key of its choosing.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use super::protocol::{self, EncodedKeys, ListEntry, ProtocolError, Reply, Request};
use super::AgentError;
use crate::crypto::KeyHistory;

/// How long a client waits for the agent to accept a request or answer it. The agent answers from memory, so only a
/// stuck agent takes this long.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to the agent.
pub struct Client {
    stream: UnixStream,
    socket: PathBuf,
}

impl Client {
    /// Connects and checks that the agent runs as this process's effective uid or as root.
    pub fn connect(socket: &Path) -> Result<Client, AgentError> {
        let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                AgentError::NotRunning { socket: socket.into() }
            }
            _ => AgentError::Connect { socket: socket.into(), source },
        })?;
        let uid = peer_uid(&stream).map_err(|source| AgentError::Connect { socket: socket.into(), source })?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if uid != me && uid != 0 {
            return Err(AgentError::Untrusted { socket: socket.into(), uid });
        }
        let timeouts =
            stream.set_read_timeout(Some(CLIENT_TIMEOUT)).and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)));
        timeouts.map_err(|source| AgentError::Connect { socket: socket.into(), source })?;
        Ok(Client { stream, socket: socket.into() })
    }

    /// Sends one request and returns the reply's body; parse it with [`Client::expect_ok`] (the reply borrows from
    /// the body, which is wiped when dropped).
    pub fn call(&mut self, req: &Request<'_>) -> Result<Zeroizing<Vec<u8>>, AgentError> {
        let frame = encode(&self.socket, protocol::encode_request(req))?;
        let written = self.stream.write_all(&frame);
        // Read the reply even if the write failed: an agent that refuses us replies first and closes, and its reply is
        // still waiting in our receive queue.
        match protocol::read_frame(&mut self.stream) {
            Ok(Some(body)) => Ok(body),
            Ok(None) => Err(match written {
                Err(e) => self.io_error(e),
                Ok(()) => AgentError::NoReply { socket: self.socket.clone() },
            }),
            Err(ProtocolError::Io(e)) => Err(self.io_error(e)),
            Err(source) => Err(AgentError::Protocol { socket: self.socket.clone(), source }),
        }
    }

    /// Parses a reply body, turning an error reply into [`AgentError::Agent`].
    pub fn expect_ok<'a>(&self, body: &'a [u8]) -> Result<Reply<'a>, AgentError> {
        let reply = protocol::parse_reply(body)
            .map_err(|source| AgentError::Protocol { socket: self.socket.clone(), source })?;
        if reply.ok {
            return Ok(reply);
        }
        Err(AgentError::Agent {
            socket: self.socket.clone(),
            code: reply.code.unwrap_or(protocol::ErrorCode::Other),
            message: reply.error.as_deref().unwrap_or("the agent refused the request without saying why").to_string(),
        })
    }

    fn io_error(&self, e: std::io::Error) -> AgentError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                AgentError::Timeout { socket: self.socket.clone() }
            }
            _ => AgentError::Protocol { socket: self.socket.clone(), source: ProtocolError::Io(e) },
        }
    }

    /// Waits until the agent closes the connection (it does once it has finished stopping).
    fn wait_closed(mut self) -> Result<(), AgentError> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }
}

fn encode<T>(socket: &Path, r: Result<T, ProtocolError>) -> Result<T, AgentError> {
    r.map_err(|source| AgentError::Protocol { socket: socket.into(), source })
}

/// The effective uid of the process at the other end of `stream`, from SO_PEERCRED (recorded by the kernel when the
/// listener called `listen`, so the peer cannot fake it).
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).expect("invariant broken: a ucred is 12 bytes");
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is a valid ucred; the descriptor is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether an agent answers on `socket`, and its pid.
pub fn ping(socket: &Path) -> Result<u32, AgentError> {
    let mut c = Client::connect(socket)?;
    let body = c.call(&Request::Ping)?;
    let reply = c.expect_ok(&body)?;
    Ok(reply.pid.unwrap_or(0))
}

/// The key history stored under `name`.
pub fn fetch(socket: &Path, name: &str) -> Result<KeyHistory, AgentError> {
    protocol::check_name(name).map_err(|source| AgentError::Name { name: name.into(), source })?;
    let mut c = Client::connect(socket)?;
    let body = c.call(&Request::Get { name: name.into() })?;
    let reply = c.expect_ok(&body)?;
    let texts = reply.keys.unwrap_or_default();
    protocol::history_from_texts(&texts).map_err(|source| AgentError::BadHistory {
        socket: socket.into(),
        name: name.into(),
        source,
    })
}

/// Stores `history` under `name`; true when it replaced a key of that name.
pub fn add(socket: &Path, name: &str, history: &KeyHistory) -> Result<bool, AgentError> {
    protocol::check_name(name).map_err(|source| AgentError::Name { name: name.into(), source })?;
    let mut c = Client::connect(socket)?;
    let encoded = EncodedKeys::new(history);
    let body = c.call(&Request::Add { name: name.into(), keys: encoded.texts() })?;
    Ok(c.expect_ok(&body)?.replaced.unwrap_or(false))
}

/// Names and fingerprints of the keys the agent holds, sorted by name.
pub fn list(socket: &Path) -> Result<Vec<ListEntry>, AgentError> {
    let mut c = Client::connect(socket)?;
    let body = c.call(&Request::List)?;
    Ok(c.expect_ok(&body)?.entries.unwrap_or_default())
}

/// Drops key `name` in the agent.
pub fn remove(socket: &Path, name: &str) -> Result<(), AgentError> {
    protocol::check_name(name).map_err(|source| AgentError::Name { name: name.into(), source })?;
    let mut c = Client::connect(socket)?;
    let body = c.call(&Request::Remove { name: name.into() })?;
    c.expect_ok(&body)?;
    Ok(())
}

/// Drops every key in the agent; returns how many names were dropped.
pub fn lock(socket: &Path) -> Result<usize, AgentError> {
    let mut c = Client::connect(socket)?;
    let body = c.call(&Request::Lock)?;
    Ok(c.expect_ok(&body)?.dropped.unwrap_or(0))
}

/// Stops the agent. Returns once the agent has zeroized its keys, removed its socket and closed the connection.
pub fn stop(socket: &Path) -> Result<(), AgentError> {
    let mut c = Client::connect(socket)?;
    let body = c.call(&Request::Stop)?;
    c.expect_ok(&body)?;
    c.wait_closed()
}
