//! Where keys come from: a key file, an inherited file descriptor, an environment variable, a systemd credential,
//! or the agent ([`load`]). Every source yields the same key-history text described in docs/FORMAT.md; parsing is
//! pure and lives in `crypto`, this module does the I/O and leaves nothing behind:
//! - a key file must be private to its owner (a key file others can read is refused: any local user could copy it);
//! - `key_fd=N` is read to the end and closed;
//! - `key_env=VAR` is removed from the environment and its bytes in the process's initial environment block are
//!   overwritten, because `/proc/PID/environ` shows that block, not the live environment;
//! - buffers that held key text are zeroized.
//!
//! The RSA private key of `rsa_key_file=` ([`load_rsa_key_file`]), which unwraps S3 Encryption Client data keys, is
//! read with the same checks as a key file.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::KeySource;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::crypto::s3ec::{RsaKeyError, RsaPrivateKey};
use crate::crypto::{Key256, KeyFileError, KeyHistory};

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} belongs to user {owner}, who could replace the key: it must belong to the mounting user or root")]
    ForeignOwner { path: PathBuf, owner: u32 },
    #[error("key file {path} is a directory, not a file: give the path of the key file itself (create one with `s3cryptfs keygen --output PATH`)")]
    IsDirectory { path: PathBuf },
    #[error("key file {path}: {source}")]
    Parse { path: PathBuf, source: KeyFileError },
    #[error("key file {path} is not text: it must hold base64 key lines (create one with `s3cryptfs keygen`)")]
    NotText { path: PathBuf },
    #[error("cannot write key file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("key_fd={fd}: {reason}")]
    Fd { fd: i32, reason: String },
    #[error("key_env={var}: {reason}")]
    Env { var: String, reason: String },
    #[error("key_credential={name}: {reason}")]
    Credential { name: String, reason: String },
    #[error("{origin}: {reason}")]
    Text { origin: String, reason: String },
    #[error("rsa_key_file {path} {source}")]
    Rsa { path: PathBuf, source: RsaKeyError },
}

/// Loads the key history from `source` (see the module docs for what each source leaves behind).
pub fn load(source: &KeySource) -> anyhow::Result<KeyHistory> {
    match source {
        KeySource::File(path) => Ok(load_key_file(path)?),
        KeySource::Fd(fd) => Ok(parse_text(&source.describe(), &read_fd(*fd)?)?),
        KeySource::Env(var) => Ok(parse_text(&source.describe(), &take_env(var)?)?),
        KeySource::Credential(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| KeyError::Credential {
                name: name.clone(),
                reason: "CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the systemd unit)".into(),
            })?;
            let path = Path::new(&dir).join(name);
            let bytes = Zeroizing::new(std::fs::read(&path).map_err(|e| KeyError::Credential {
                name: name.clone(),
                reason: format!("cannot read {}: {e}", path.display()),
            })?);
            Ok(parse_text(&source.describe(), &bytes)?)
        }
        KeySource::Agent { socket, name } => {
            let socket = socket.clone().unwrap_or_else(crate::agent::default_socket);
            crate::agent::fetch_key(&socket, name)
        }
    }
}

/// Locks the pages holding the customer keys in memory so they are never written to swap. Locks are per process
/// and not inherited across fork, so the serving process calls this itself. Returns false when the kernel refused
/// (RLIMIT_MEMLOCK); the caller logs that once.
pub fn lock_in_memory(keys: &KeyHistory) -> bool {
    let mut all = true;
    for key in keys.keys() {
        let bytes = key.as_bytes();
        // SAFETY: mlock only changes the residency of the pages spanning this live allocation; Linux rounds the
        // address down to a page boundary itself.
        let rc = unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) };
        all &= rc == 0;
    }
    all
}

fn parse_text(source: &str, bytes: &[u8]) -> Result<KeyHistory, KeyError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| KeyError::Text { origin: source.into(), reason: "not text: expected base64 key lines".into() })?;
    KeyHistory::parse(text).map_err(|e| KeyError::Text { origin: source.into(), reason: e.to_string() })
}

/// Reads descriptor `fd` to the end and closes it.
fn read_fd(fd: i32) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(KeyError::Fd { fd, reason: "no such open file descriptor (was it passed to the process?)".into() });
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process uses it: the user handed it to
    // us for this purpose. The File owns it from here and closes it when dropped.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(|e| KeyError::Fd { fd, reason: format!("cannot read: {e}") })?;
    Ok(bytes)
}

/// Takes VAR's value out of the environment, scrubbing the initial environment block it may live in.
fn take_env(var: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let cname = std::ffi::CString::new(var)
        .map_err(|_| KeyError::Env { var: var.into(), reason: "the name contains a NUL byte".into() })?;
    // SAFETY: getenv returns a pointer into the environment or NULL; this runs before any other thread exists (mount
    // and agent load keys before starting the runtime), so the environment does not change under us.
    let ptr = unsafe { libc::getenv(cname.as_ptr()) };
    if ptr.is_null() {
        return Err(KeyError::Env { var: var.into(), reason: "the variable is not set".into() });
    }
    // SAFETY: ptr is a NUL-terminated string owned by the environment (see above).
    let len = unsafe { libc::strlen(ptr) };
    let mut value = Zeroizing::new(vec![0u8; len]);
    // SAFETY: `len` bytes at ptr are readable (strlen just walked them) and `value` has room for them.
    unsafe {
        std::ptr::copy_nonoverlapping(ptr as *const u8, value.as_mut_ptr(), len);
        // Overwrite the value where it lives (for inherited variables, the initial block /proc/PID/environ shows).
        std::ptr::write_bytes(ptr, 0, len);
    }
    // SAFETY (edition 2021: remove_var is safe but not thread-safe): no other thread exists yet, see above.
    std::env::remove_var(var);
    Ok(value)
}

/// Reads and checks a key file.
pub fn load_key_file(path: &Path) -> Result<KeyHistory, KeyError> {
    let bytes = read_private_file(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::NotText { path: path.into() })?;
    KeyHistory::parse(text).map_err(|source| KeyError::Parse { path: path.into(), source })
}

/// Reads and checks the RSA private key file of `rsa_key_file=` (PEM, PKCS#8 or PKCS#1), with the checks of a key
/// file: a file others can read is refused.
pub fn load_rsa_key_file(path: &Path) -> Result<RsaPrivateKey, KeyError> {
    let bytes = read_private_file(path)?;
    RsaPrivateKey::from_pem(&bytes).map_err(|source| KeyError::Rsa { path: path.into(), source })
}

/// The bytes of a file that holds a secret, if it is a file that only its owner can read.
fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| KeyError::Read { path: path.into(), source };
    // One open, and every check on what was opened (fstat), then read through the same descriptor: a file swapped
    // for another between the check and the read is never read. O_NONBLOCK: a fifo planted at the path does not
    // hang the mount (it is then refused as not a regular file).
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    // Before the mode check: a directory's usual 755 would otherwise be reported as a key file others can read.
    if meta.is_dir() {
        return Err(KeyError::IsDirectory { path: path.into() });
    }
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.into(), mode });
    }
    // Owned by this user or root: another user who owns the file could replace the key (and then read everything
    // written under it).
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(KeyError::ForeignOwner { path: path.into(), owner: meta.uid() });
    }
    // Room for the whole file and the read that finds its end, so the buffer never moves (a move would leave a copy
    // of the key behind, unzeroized).
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 4096));
    file.read_to_end(&mut bytes).map_err(read_err)?;
    Ok(bytes)
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

    /// The checks are made on the file that is read: a fifo is refused without blocking, a file of another user
    /// (who could replace the key) is refused, a symlink to a private file of ours is followed.
    #[test]
    fn a_key_file_is_checked_through_the_descriptor_it_is_read_from() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = load_key_file(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        let p = dir.path().join("k");
        write_new_key_file(&p).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(load_key_file(&link).unwrap().fingerprints(), load_key_file(&p).unwrap().fingerprints());
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let err = load_key_file(&p).unwrap_err();
            assert!(matches!(err, KeyError::ForeignOwner { owner: 65534, .. }), "{err}");
            assert!(err.to_string().contains("belongs to user 65534"), "{err}");
        }
    }

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
    fn a_key_from_a_descriptor_is_read_and_the_descriptor_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new_key_file(&p).unwrap();
        let want = load_key_file(&p).unwrap().fingerprints();
        // A descriptor number far above the lowest free ones, which every open() of the other tests running in this
        // process takes first: closing it, checking it and asking for it again cannot touch another test's file (with
        // the file's own number, a test opening a directory in between got it, and had it closed under it).
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        let fd = (limit.rlim_cur.saturating_sub(1)).min(1000) as i32;
        let file = std::fs::File::open(&p).unwrap();
        // SAFETY: dup2 onto a number no other code of this process uses (see above).
        assert_eq!(unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), fd) }, fd);
        drop(file);
        let got = load(&KeySource::Fd(fd)).unwrap();
        assert_eq!(got.fingerprints(), want);
        // SAFETY: F_GETFD only inspects the descriptor table.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0, "the descriptor must be closed");
        let err = load(&KeySource::Fd(fd)).unwrap_err().to_string();
        assert!(err.contains("key_fd") && err.contains("no such open file descriptor"), "{err}");
    }

    #[test]
    fn a_key_from_the_environment_is_removed_from_it() {
        // A name no other test uses: the environment is process-wide.
        let var = "S3CRYPTFS_TEST_KEY_FROM_ENV";
        let key = Key256::generate();
        let line = crate::crypto::format_new_key(&key);
        std::env::set_var(var, line.trim());
        let got = load(&KeySource::Env(var.into())).unwrap();
        assert_eq!(got.fingerprints(), vec![key.fingerprint()]);
        assert!(std::env::var_os(var).is_none());
        let err = load(&KeySource::Env(var.into())).unwrap_err().to_string();
        assert!(err.contains("not set"), "{err}");
    }

    #[test]
    fn bad_key_text_names_the_source_and_not_the_text() {
        let var = "S3CRYPTFS_TEST_BAD_KEY_FROM_ENV";
        std::env::set_var(var, "NOT-A-KEY-SECRETISH");
        let err = load(&KeySource::Env(var.into())).unwrap_err().to_string();
        assert!(err.contains("key_env=") && !err.contains("SECRETISH"), "{err}");
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

    #[test]
    fn an_rsa_key_file_is_checked_like_a_key_file() {
        use aws_lc_rs::encoding::AsDer;
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rsa.pem");
        let key = aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = key.as_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(AsRef::<[u8]>::as_ref(&*der));
        std::fs::write(&p, format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_rsa_key_file(&p).unwrap().bits(), 2048);
        // Readable by others: refused, as a key file is, with what to do.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_rsa_key_file(&p).unwrap_err();
        assert!(matches!(err, KeyError::TooOpen { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600") && err.to_string().contains("rsa.pem"), "{err}");
        assert!(matches!(load_rsa_key_file(dir.path()), Err(KeyError::IsDirectory { .. })));
        // Not a PEM key: the message names the option and the file, and repeats nothing of the text.
        std::fs::write(&p, "SECRETISH not a key").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_rsa_key_file(&p).unwrap_err().to_string();
        assert!(err.starts_with("rsa_key_file ") && err.contains("no PEM private key") && !err.contains("SECRETISH"), "{err}");
    }

    /// Regression (issue 10.7c): a directory (mode 755 as usual) was reported as readable by group or others.
    #[test]
    fn a_directory_is_called_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o755, 0o700] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_key_file(dir.path()).unwrap_err();
            assert!(matches!(err, KeyError::IsDirectory { .. }), "{mode:o}: {err}");
        }
    }

    /// Regression (issue 10.7b): the OS error of an unreadable key file was printed twice, once in the message and
    /// once more as its source. The top-level printer (`error_chain`) shows it once.
    #[test]
    fn a_key_file_error_names_its_cause_once() {
        let err = load(&KeySource::File("/nonexistent/s3cryptfs.key".into())).unwrap_err();
        let line = crate::error_text::error_chain(&*err);
        assert_eq!(line.matches("No such file or directory").count(), 1, "{line}");
    }
}
