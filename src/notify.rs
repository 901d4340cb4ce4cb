//! systemd's readiness protocol (`sd_notify`), for `Type=notify` units: `READY=1` once the mountpoint answers,
//! `STOPPING=1` when shutdown begins, `STATUS=` lines for `systemctl status`.
//!
//! The protocol is one datagram per message to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract
//! name when it starts with `@`). Twenty lines of our own instead of a crate; without `$NOTIFY_SOCKET` every call is
//! a no-op, so the same binary runs under systemd, from a shell and from fstab.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`) to the service manager. Returns whether a manager was told; failures are logged
/// at debug level only, because a missing manager is the normal case.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &target)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "could not notify the service manager");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // The variable is process-wide; this is the only test that sets it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1"));
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1"), "no manager, no message");
    }
}
