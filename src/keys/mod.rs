//! Where keys come from.
//!
//! For now one source: a key file (`key_file=PATH`), holding the key history described in docs/FORMAT.md. The file
//! must be private to its owner; a key file others can read is refused, because the whole point of client-side
//! encryption is lost if any local user can copy the key. Parsing is pure and lives in `crypto`; this module does
//! the I/O and the permission check.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use zeroize::Zeroizing;

use crate::crypto::{Key256, KeyFileError, KeyHistory};

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path}: {source}")]
    Parse { path: PathBuf, source: KeyFileError },
    #[error("key file {path} is not text: it must hold base64 key lines (create one with `s3cryptfs keygen`)")]
    NotText { path: PathBuf },
    #[error("cannot write key file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Reads and checks a key file.
pub fn load_key_file(path: &Path) -> Result<KeyHistory, KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.into(), mode });
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read { path: path.into(), source })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::NotText { path: path.into() })?;
    KeyHistory::parse(text).map_err(|source| KeyError::Parse { path: path.into(), source })
}

/// Writes a new random key to `path` (created 0600; an existing file is never overwritten).
pub fn write_new_key_file(path: &Path) -> Result<(), KeyError> {
    use std::io::Write;
    let key = Key256::generate();
    let line = crate::crypto::format_new_key(&key);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| KeyError::Write { path: path.into(), source })?;
    f.write_all(line.as_bytes()).and_then(|_| f.sync_all()).map_err(|source| KeyError::Write { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_writes_a_private_loadable_key_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new_key_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let h = load_key_file(&p).unwrap();
        assert_eq!(h.len(), 1);
        assert!(matches!(write_new_key_file(&p), Err(KeyError::Write { .. })));
    }

    #[test]
    fn refuses_a_key_file_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new_key_file(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key_file(&p).unwrap_err();
        assert!(matches!(err, KeyError::TooOpen { .. }));
        assert!(err.to_string().contains("chmod 600"));
    }
}
