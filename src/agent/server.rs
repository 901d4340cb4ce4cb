//! The agent server: accepts connections on an already-bound socket and answers requests from the keys it holds.
//!
//! Concurrency: the daemon runs this on a current-thread runtime (traffic is a handful of tiny requests; one thread
//! keeps the process small, which matters for locking its memory). Each connection is a task in a `JoinSet`, at
//! most [`ServerConfig::max_connections`] at once (further connections wait in the kernel's backlog), so at most
//! that many frame buffers of [`MAX_BODY_LEN`](protocol::MAX_BODY_LEN) exist. The keys sit behind a `std::sync::Mutex` that is never held
//! across an `.await`: every operation is a short in-memory step, including encoding a reply that contains keys.
//!
//! Per connection: the peer's credentials (SO_PEERCRED) are checked first; a uid that is not allowed gets one error
//! reply, a log line with its uid and pid, and the connection is closed. Then requests are answered in turn. Each
//! frame must arrive within [`ServerConfig::read_timeout`] (so a silent client cannot hold a slot), a malformed
//! request gets an error reply and the connection stays usable, an oversized length prefix gets an error reply and
//! the connection is closed (its body is never read, so the stream cannot be resynchronised).
//!
//! Shutdown: on `stop` the handler drops (zeroizes) every key and removes the socket file *before* replying, so a
//! client that has its reply knows both have happened; then the accept loop ends. The caller's shutdown future (the
//! daemon's SIGTERM/SIGINT) ends it the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use super::protocol::{self, EncodedKeys, ErrorCode, ListEntry, ProtocolError, Reply, Request};
use super::SocketFile;
use crate::crypto::KeyHistory;

/// How a server behaves; [`ServerConfig::for_current_user`] is what the daemon uses.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Peers whose uid is listed are served; everyone else is refused and logged.
    pub allowed_uids: Vec<u32>,
    /// Longest wait for one complete request frame (also the longest a connection may sit idle between requests).
    pub read_timeout: Duration,
    /// Longest wait for a reply to be written to a client that does not read.
    pub write_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// The socket file to remove on `stop` and shutdown; `None` when the caller manages the path.
    pub socket_file: Option<SocketFile>,
}

impl ServerConfig {
    /// Serves this process's effective uid and root; 10 s timeouts (a real client sends its request right after
    /// connecting, so anything slower is a stuck or hostile client); 64 connections (4 MiB of frame buffers at most).
    pub fn for_current_user(socket_file: Option<SocketFile>) -> ServerConfig {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let mut allowed_uids = vec![me, 0];
        allowed_uids.dedup();
        ServerConfig {
            allowed_uids,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
            socket_file,
        }
    }
}

/// The keys the agent holds.
#[derive(Default)]
struct Keyring {
    keys: BTreeMap<String, KeyHistory>,
    /// Names dropped by `lock` and not added or removed since, so that a fetch can say why the key is missing.
    locked: BTreeSet<String>,
}

impl Keyring {
    /// Drops every key (each `Key256` zeroizes itself on drop); returns how many names there were.
    fn drop_all(&mut self) -> usize {
        let n = self.keys.len();
        let names: Vec<String> = self.keys.keys().cloned().collect();
        self.keys.clear();
        self.locked.extend(names);
        n
    }
}

struct Shared {
    ring: Mutex<Keyring>,
    config: ServerConfig,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn ring(&self) -> MutexGuard<'_, Keyring> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters (each operation is
        // one insert or removal), so keep serving.
        self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What answering one request produced.
struct Outcome {
    frame: Zeroizing<Vec<u8>>,
    stop: bool,
}

/// Serves `listener` until `shutdown` completes or a client sends `stop`. On return every key has been dropped and the
/// configured socket file removed.
pub async fn serve(
    listener: UnixListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let max = config.max_connections.max(1);
    let shared = Arc::new(Shared { ring: Mutex::new(Keyring::default()), config, stop });
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = stopped.wait_for(|s| *s) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept(), if tasks.len() < max => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(handle(shared.clone(), stream));
                }
                Err(e) => {
                    // Out of descriptors or memory: wait a little instead of spinning on the same error.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.shutdown().await;
    shared.ring().drop_all();
    if let Some(f) = &shared.config.socket_file {
        f.remove();
    }
    Ok(())
}

async fn handle(shared: Arc<Shared>, mut stream: UnixStream) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a client's credentials; closing the connection");
            return;
        }
    };
    let (uid, pid) = (cred.uid(), cred.pid());
    let cfg = &shared.config;
    if !cfg.allowed_uids.contains(&uid) {
        tracing::warn!(uid, pid = pid.unwrap_or(-1), "refused a client of another user");
        let reply = Reply::error(ErrorCode::Refused, "refused: this agent serves only its own user and root");
        if let Ok(frame) = protocol::encode_reply(&reply) {
            let _ = send(&mut stream, &frame, cfg.write_timeout).await;
        }
        let _ = stream.shutdown().await;
        return;
    }
    loop {
        let body = match tokio::time::timeout(cfg.read_timeout, protocol::read_frame_async(&mut stream)).await {
            Err(_) => {
                tracing::debug!(uid, pid, "no complete request in time; closing the connection");
                let reply =
                    Reply::error(ErrorCode::Timeout, "no complete request arrived in time; closing the connection");
                if let Ok(frame) = protocol::encode_reply(&reply) {
                    let _ = send(&mut stream, &frame, cfg.write_timeout).await;
                }
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(body))) => body,
            Ok(Err(e @ (ProtocolError::Truncated | ProtocolError::Io(_)))) => {
                tracing::debug!(uid, pid, error = %e, "connection ended in the middle of a request");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(uid, pid, error = %e, "bad request frame");
                let reply = Reply::error(e.code(), e.to_string());
                if let Ok(frame) = protocol::encode_reply(&reply) {
                    if send(&mut stream, &frame, cfg.write_timeout).await.is_err() {
                        return;
                    }
                }
                if e.stream_usable() {
                    continue;
                }
                return;
            }
        };
        let outcome = match protocol::parse_request(&body) {
            Ok(req) => execute(&shared, req, pid),
            Err(e) => {
                tracing::debug!(uid, pid, error = %e, "bad request");
                Outcome { frame: reply_frame(&Reply::error(e.code(), e.to_string())), stop: false }
            }
        };
        drop(body);
        let sent = send(&mut stream, &outcome.frame, cfg.write_timeout).await;
        if outcome.stop {
            let _ = shared.stop.send(true);
            return;
        }
        if sent.is_err() {
            return;
        }
    }
}

async fn send(stream: &mut UnixStream, frame: &[u8], limit: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(limit, stream.write_all(frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Encodes a reply. Only a reply built from keys could exceed the frame limit (a history of over a thousand keys,
/// which `add` would have refused), so an encoding failure becomes an error reply.
fn reply_frame(reply: &Reply<'_>) -> Zeroizing<Vec<u8>> {
    protocol::encode_reply(reply).unwrap_or_else(|e| {
        let fallback = Reply::error(ErrorCode::Other, format!("cannot encode the reply: {e}"));
        protocol::encode_reply(&fallback).expect("invariant broken: a short error reply always encodes")
    })
}

fn execute(shared: &Shared, req: Request<'_>, pid: Option<i32>) -> Outcome {
    let pid = pid.unwrap_or(-1);
    let reply = |r: Reply<'_>| Outcome { frame: reply_frame(&r), stop: false };
    match req {
        Request::Ping => {
            let mut r = Reply::ok();
            r.pid = Some(std::process::id());
            reply(r)
        }
        Request::Get { name } => {
            let ring = shared.ring();
            match ring.keys.get(name.as_ref()) {
                Some(history) => {
                    tracing::debug!(name = %name, pid, "key fetched");
                    let encoded = EncodedKeys::new(history);
                    let mut r = Reply::ok();
                    r.keys = Some(encoded.texts());
                    reply(r)
                }
                None => reply(missing(&ring, &name)),
            }
        }
        Request::Add { name, keys } => {
            let history = match protocol::history_from_texts(&keys) {
                Ok(h) => h,
                Err(e) => {
                    return reply(Reply::error(
                        ErrorCode::BadRequest,
                        format!("the keys sent for '{name}' are not a valid key history: {e}"),
                    ))
                }
            };
            // Refuse what could not be sent back: `get` must be able to return every key added.
            let encoded = EncodedKeys::new(&history);
            let mut probe = Reply::ok();
            probe.keys = Some(encoded.texts());
            if let Err(e) = protocol::encode_reply(&probe) {
                return reply(Reply::error(
                    ErrorCode::TooLarge,
                    format!("the key history for '{name}' is too long: {e}"),
                ));
            }
            drop(probe);
            drop(encoded);
            super::process::lock_key_pages(&history);
            let fingerprints = fingerprints(&history).join(" ");
            let n = history.len();
            let mut ring = shared.ring();
            ring.locked.remove(name.as_ref());
            let replaced = ring.keys.insert(name.to_string(), history).is_some();
            drop(ring);
            tracing::info!(name = %name, keys = n, fingerprints = %fingerprints, replaced, pid, "key added");
            let mut r = Reply::ok();
            r.replaced = Some(replaced);
            reply(r)
        }
        Request::List => {
            let ring = shared.ring();
            let entries = ring
                .keys
                .iter()
                .map(|(name, h)| ListEntry { name: name.clone(), fingerprints: fingerprints(h) })
                .collect();
            let mut r = Reply::ok();
            r.entries = Some(entries);
            reply(r)
        }
        Request::Remove { name } => {
            let mut ring = shared.ring();
            match ring.keys.remove(name.as_ref()) {
                Some(history) => {
                    drop(history);
                    drop(ring);
                    tracing::info!(name = %name, pid, "key removed");
                    reply(Reply::ok())
                }
                None => reply(missing(&ring, &name)),
            }
        }
        Request::Lock => {
            let dropped = shared.ring().drop_all();
            tracing::info!(dropped, pid, "locked: every key dropped");
            let mut r = Reply::ok();
            r.dropped = Some(dropped);
            reply(r)
        }
        Request::Stop => {
            let dropped = shared.ring().drop_all();
            if let Some(f) = &shared.config.socket_file {
                f.remove();
            }
            tracing::info!(dropped, pid, "stop requested: every key dropped, socket removed");
            Outcome { frame: reply_frame(&Reply::ok()), stop: true }
        }
    }
}

/// The error reply for a name the agent does not hold, saying whether `lock` dropped it.
fn missing(ring: &Keyring, name: &str) -> Reply<'static> {
    if ring.locked.contains(name) {
        Reply::error(
            ErrorCode::Locked,
            format!(
                "the agent was locked (`s3cryptfs agent lock`) and no longer holds key '{name}'; add it again with \
                 `s3cryptfs key add {name}`"
            ),
        )
    } else {
        Reply::error(
            ErrorCode::NoSuchKey,
            format!("the agent holds no key named '{name}'; add it with `s3cryptfs key add {name}`"),
        )
    }
}

fn fingerprints(h: &KeyHistory) -> Vec<String> {
    h.fingerprints().iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::client::{self, Client};
    use crate::crypto::Key256;
    use std::path::PathBuf;

    /// A server on a temporary socket in this process, run on its own runtime thread.
    struct TestServer {
        _dir: tempfile::TempDir,
        path: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    }

    impl TestServer {
        fn start(config: impl FnOnce(&mut ServerConfig)) -> TestServer {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.sock");
            let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            std_listener.set_nonblocking(true).unwrap();
            let mut cfg = ServerConfig::for_current_user(None);
            config(&mut cfg);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let listener = UnixListener::from_std(std_listener)?;
                    serve(listener, cfg, async {
                        let _ = rx.await;
                    })
                    .await
                })
            });
            TestServer { _dir: dir, path, stop: Some(tx), thread: Some(thread) }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn history(n: u8) -> KeyHistory {
        let text: String = (0..n).map(|_| crate::crypto::format_new_key(&Key256::generate()).to_string()).collect();
        KeyHistory::parse(&text).unwrap()
    }

    #[test]
    fn add_get_list_remove_lock() {
        let s = TestServer::start(|_| {});
        let h = history(2);
        assert!(!client::add(&s.path, "work", &h).unwrap());
        assert!(client::add(&s.path, "work", &h).unwrap(), "second add replaces");
        client::add(&s.path, "home", &history(1)).unwrap();
        assert_eq!(client::fetch(&s.path, "work").unwrap().fingerprints(), h.fingerprints());
        let list = client::list(&s.path).unwrap();
        assert_eq!(list.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["home", "work"]);
        assert_eq!(list[1].fingerprints, fingerprints(&h));

        client::remove(&s.path, "home").unwrap();
        let err = client::fetch(&s.path, "home").unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NoSuchKey));
        assert!(err.to_string().contains("s3cryptfs key add home"), "{err}");
        assert_eq!(client::remove(&s.path, "home").unwrap_err().code(), Some(ErrorCode::NoSuchKey));

        assert_eq!(client::lock(&s.path).unwrap(), 1);
        let err = client::fetch(&s.path, "work").unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Locked), "{err}");
        assert!(client::list(&s.path).unwrap().is_empty());
        // Adding again after a lock works and clears the "locked" state of that name.
        client::add(&s.path, "work", &h).unwrap();
        assert_eq!(client::fetch(&s.path, "work").unwrap().len(), 2);
    }

    #[test]
    fn a_connection_serves_several_requests_and_survives_bad_ones() {
        let s = TestServer::start(|_| {});
        let mut c = Client::connect(&s.path).unwrap();
        let body = c.call(&Request::Ping).unwrap();
        assert_eq!(c.expect_ok(&body).unwrap().pid, Some(std::process::id()));
        let body = c.call(&Request::Get { name: "nope".into() }).unwrap();
        assert_eq!(c.expect_ok(&body).unwrap_err().code(), Some(ErrorCode::NoSuchKey));
        let body = c.call(&Request::List).unwrap();
        assert!(c.expect_ok(&body).unwrap().entries.unwrap().is_empty());
    }

    #[test]
    fn an_add_that_is_not_a_key_history_is_refused() {
        use protocol::KeyText;
        let s = TestServer::start(|_| {});
        let mut c = Client::connect(&s.path).unwrap();
        let k = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        for keys in [vec![], vec![KeyText(k), KeyText(k)], vec![KeyText("#AQEB")], vec![KeyText("AQEB")]] {
            let body = c.call(&Request::Add { name: "x".into(), keys }).unwrap();
            let err = c.expect_ok(&body).unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::BadRequest));
            assert!(!err.to_string().contains("AQEB"), "{err}");
        }
        assert!(client::list(&s.path).unwrap().is_empty());
    }

    #[test]
    fn a_silent_client_is_timed_out_and_others_are_still_served() {
        use std::io::Read;
        let s = TestServer::start(|c| c.read_timeout = Duration::from_millis(300));
        let mut silent = std::os::unix::net::UnixStream::connect(&s.path).unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Served while the silent one waits.
        client::ping(&s.path).unwrap();
        let body = protocol::read_frame(&mut silent).unwrap().expect("a timeout reply");
        let reply = protocol::parse_reply(&body).unwrap();
        assert_eq!(reply.code, Some(ErrorCode::Timeout));
        let mut rest = Vec::new();
        assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0, "then the connection is closed");
        client::ping(&s.path).unwrap();
    }

    #[test]
    fn a_uid_that_is_not_allowed_is_refused() {
        // The tests may run as root, which the daemon always serves; here the allowed list excludes us.
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let s = TestServer::start(|c| c.allowed_uids = vec![me.wrapping_add(12345)]);
        let err = client::list(&s.path).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Refused), "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[test]
    fn at_most_max_connections_are_served_at_once() {
        let s = TestServer::start(|c| {
            c.max_connections = 1;
            c.read_timeout = Duration::from_millis(500);
        });
        let started = std::time::Instant::now();
        let _holder = std::os::unix::net::UnixStream::connect(&s.path).unwrap();
        // Waits in the backlog until the holder's slot times out, then is served.
        client::ping(&s.path).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400), "served before the slot was free");
    }

    #[test]
    fn stop_drops_keys_removes_the_socket_file_and_ends_serve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let bound = crate::agent::socket::bind(&path).unwrap();
        bound.listener.set_nonblocking(true).unwrap();
        let file = bound.file.clone();
        let cfg = ServerConfig::for_current_user(Some(file));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = UnixListener::from_std(bound.listener)?;
                serve(listener, cfg, std::future::pending()).await
            })
        });
        client::add(&path, "k", &history(1)).unwrap();
        client::stop(&path).unwrap();
        assert!(!path.exists(), "socket removed before stop returns");
        thread.join().unwrap().unwrap();
    }
}
