//! The key agent: holds named keys in memory and serves them over a Unix socket to processes of the same user.
//! (Skeleton: the commands are wired; the agent itself is being written.)

use crate::cli::{AgentArgs, KeyArgs};

pub fn agent_command(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("`s3cryptfs agent` is not available yet")
}

pub fn key_command(_args: KeyArgs) -> anyhow::Result<()> {
    anyhow::bail!("`s3cryptfs key` is not available yet")
}

/// Fetches key `name` (a key history) from the agent listening on `socket`.
pub fn fetch_key(_socket: &std::path::Path, _name: &str) -> anyhow::Result<crate::crypto::KeyHistory> {
    anyhow::bail!("the key agent is not available yet")
}

/// The default socket path: $XDG_RUNTIME_DIR/s3cryptfs/agent.sock, or /run/s3cryptfs/agent.sock for root.
pub fn default_socket() -> std::path::PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => std::path::PathBuf::from(d).join("s3cryptfs/agent.sock"),
        _ => std::path::PathBuf::from("/run/s3cryptfs/agent.sock"),
    }
}
