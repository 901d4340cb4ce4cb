//! Reading AWS S3 Encryption Client objects whose data key is wrapped with `RSA-OAEP-SHA1` (issue 12) through real
//! cse-c and cse-kms mounts given `-o rsa_key_file=PATH`, on the S3 test server.
//!
//! The objects and RSA keys come from tests/tools/s3ec_rsa.py, a writer built from the spec with Python's
//! `cryptography` (the official Python client 4.0.0 has no RSA keyring), so the Rust reader is checked against an
//! implementation it shares no code with. They must read byte-identical (V2 and V3, small and over one 8 MiB
//! verification-pass segment); without the option, with another RSA key, or with a tampered pseudo data key they must
//! fail with EIO and a log line naming the object; a key file others can read must stop the mount.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TOOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/s3ec_rsa.py");
const MIB: usize = 1 << 20;

/// Runs s3ec_rsa.py with the S3EC venv's python (it has `cryptography` and boto3); panics on failure.
#[track_caller]
fn tool(args: &[&str]) -> String {
    let python = std::env::var("S3CRYPTFS_TEST_S3EC_PYTHON").unwrap_or_else(|_| {
        panic!("S3CRYPTFS_TEST_S3EC_PYTHON is not set: run the tests with scripts/test.sh (scripts/s3ec-client.sh install)")
    });
    let out = Command::new(python).arg(TOOL).args(args).output().unwrap();
    assert!(out.status.success(), "s3ec_rsa.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A new RSA-2048 key: (PEM PKCS#8 path, PEM PKCS#1 path of the same key), both mode 0600.
fn rsa_keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (pkcs8, pkcs1) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-pkcs1.pem")));
    tool(&["keygen", "--out", pkcs8.to_str().unwrap(), "--pkcs1-out", pkcs1.to_str().unwrap()]);
    (pkcs8, pkcs1)
}

fn bucket_of(store: &Store) -> String {
    match store {
        Store::S3 { bucket, .. } => bucket.clone(),
        Store::Local { .. } | Store::Azure { .. } | Store::Gcs { .. } => {
            unreachable!("these tests run on the S3 test server")
        }
    }
}

/// Stores `plain` at `key` as a V`version` object RSA-wrapped for `rsa_key`, with `extra` tool options (tampering).
fn put(version: u8, rsa_key: &Path, bucket: &str, key: &str, plain: &[u8], extra: &[&str], dir: &Path) {
    let file = dir.join(format!("{key}.src"));
    fs::write(&file, plain).unwrap();
    let version = version.to_string();
    let mut args = vec!["put", "--version", &version, "--key-file", rsa_key.to_str().unwrap(), "--bucket", bucket];
    args.extend(["--key", key, "--file", file.to_str().unwrap()]);
    args.extend(extra);
    tool(&args);
}

fn rsa_option(path: &Path) -> String {
    format!("rsa_key_file={}", path.display())
}

#[track_caller]
fn assert_eio(r: std::io::Result<impl Sized>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(_) => panic!("{what}: read succeeded, want EIO"),
    }
}

/// The log lines that name `key`.
fn lines_naming<'a>(log: &'a str, key: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(&format!("object {key}:"))).collect()
}

/// Options for a cse-kms mount under a new KMS key, with KMS reached over HTTPS (as tests/s3ec.rs does).
fn kms_options() -> Vec<String> {
    let ep = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE");
    vec![format!("kms_key_id={}", kms_create_key()), format!("kms_endpoint={ep}"), format!("ca_file={ca}")]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn rsa_wrapped_v2_and_v3_objects_read_byte_identical_with_rsa_key_file() {
    let env = Env::new();
    let store = Store::s3();
    let bucket = bucket_of(&store);
    let dir = env.path();
    let (pem, pkcs1) = rsa_keygen(dir, "rsa");
    let cases: Vec<(String, Vec<u8>)> = [
        (2u8, "small", 6),
        (2, "page", 65_536 + 1),
        (2, "big", 9 * MIB + 3), // two verification-pass GETs
        (3, "small", 100_000),
        (3, "big", 8 * MIB + 1),
        (3, "empty", 0),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (version, name, len))| {
        let key = format!("v{version}-{name}");
        let plain = pattern(len, 100 + i as u64);
        put(version, &pem, &bucket, &key, &plain, &[], dir);
        (key, plain)
    })
    .collect();

    // cse-c with the PKCS#8 key.
    let m = Mount::start_with(&env, &store, "cse-c", &[&rsa_option(&pem)]);
    for (key, plain) in &cases {
        assert_eq!(fs::metadata(m.path(key)).unwrap().len(), plain.len() as u64, "{key}: stat shows the plaintext size");
        assert_bytes(fs::read(m.path(key)).unwrap(), plain, key);
    }
    let log = m.unmount();
    assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");

    // The same key as PEM PKCS#1, in a read-only cse-kms mount (which reads S3EC objects of any wrap it has keys for).
    let mut opts = kms_options();
    opts.extend(["ro".to_string(), rsa_option(&pkcs1)]);
    let m = Mount::start_with(&env, &store, "cse-kms", &refs(&opts));
    for (key, plain) in &cases {
        assert_bytes(fs::read(m.path(key)).unwrap(), plain, &format!("{key}, cse-kms with the PKCS#1 key"));
    }
    let log = m.unmount();
    assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
}

#[test]
fn without_the_right_rsa_key_or_with_a_tampered_pseudo_key_reads_give_eio_and_a_log_line() {
    let env = Env::new();
    let store = Store::s3();
    let bucket = bucket_of(&store);
    let dir = env.path();
    let (pem, _) = rsa_keygen(dir, "rsa");
    let (other, _) = rsa_keygen(dir, "other");
    let small = pattern(70_000, 1);
    let big = pattern(9 * MIB + 5, 2);
    put(2, &pem, &bucket, "v2", &small, &[], dir);
    put(3, &pem, &bucket, "v3", &small, &[], dir);
    put(3, &pem, &bucket, "v3-big", &big, &[], dir);
    // Tampered pseudo data keys, wrapped for the right key: the suffix of the other version (a V3 object that
    // claims the V2 suite inside its wrap, and the other way round), a wrong length byte.
    put(3, &pem, &bucket, "v3-with-v2-suffix", &small, &["--suffix", "AES/GCM/NoPadding"], dir);
    put(2, &pem, &bucket, "v2-with-v3-suffix", &small, &["--suffix", "115"], dir);
    put(3, &pem, &bucket, "v3-length-16", &small, &["--length-byte", "16"], dir);
    put(2, &pem, &bucket, "v2-length-31", &small, &["--length-byte", "31"], dir);
    // The legacy wrap names stay refused, even over a wrap the key could open.
    put(2, &pem, &bucket, "legacy-sha256", &small, &["--wrap-name", "RSA/ECB/OAEPWithSHA-256AndMGF1Padding"], dir);

    let rsa_objects = ["v2", "v3", "v3-big"];
    let tampered = ["v3-with-v2-suffix", "v2-with-v3-suffix", "v3-length-16", "v2-length-31"];
    let could_not_unwrap = "could not be unwrapped with the RSA private key";

    // No rsa_key_file: each RSA object fails and its line says which option reads it.
    let m = Mount::start(&env, &store, "cse-c");
    for key in rsa_objects {
        assert_eio(fs::read(m.path(key)), &format!("{key} without rsa_key_file"));
    }
    let log = m.unmount();
    for key in rsa_objects {
        let lines = lines_naming(&log, key);
        assert!(!lines.is_empty(), "no log line names {key}: {log}");
        assert!(lines.iter().all(|l| l.contains("RSA-OAEP-SHA1") && l.contains("-o rsa_key_file=")), "{key}: {lines:#?}");
    }

    // Another RSA key: EIO, "could not be unwrapped", and nothing more about why.
    let m = Mount::start_with(&env, &store, "cse-c", &[&rsa_option(&other)]);
    for key in rsa_objects {
        assert_eio(fs::read(m.path(key)), &format!("{key} with another RSA key"));
    }
    let log = m.unmount();
    for key in rsa_objects {
        let lines = lines_naming(&log, key);
        assert!(!lines.is_empty() && lines.iter().all(|l| l.contains(could_not_unwrap)), "{key}: {log}");
        assert!(!lines.iter().any(|l| l.to_lowercase().contains("padding")), "{key}: an unwrap error tells no padding detail: {lines:#?}");
    }

    // The right key: the good objects read, the tampered ones fail at the unwrap, the legacy name is refused by name.
    let m = Mount::start_with(&env, &store, "cse-c", &[&rsa_option(&pem)]);
    assert_bytes(fs::read(m.path("v2")).unwrap(), &small, "v2");
    assert_bytes(fs::read(m.path("v3-big")).unwrap(), &big, "v3-big");
    for key in tampered.iter().chain(&["legacy-sha256"]) {
        assert_eio(fs::read(m.path(key)), key);
    }
    let log = m.unmount();
    for key in tampered {
        let lines = lines_naming(&log, key);
        assert!(!lines.is_empty() && lines.iter().all(|l| l.contains(could_not_unwrap)), "{key}: {log}");
    }
    let lines = lines_naming(&log, "legacy-sha256");
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("RSA/ECB/OAEPWithSHA-256AndMGF1Padding")), "{log}");
    for key in ["v2", "v3-big"] {
        assert!(lines_naming(&log, key).is_empty(), "{key}: {log}");
    }
}

#[test]
fn an_rsa_key_file_that_others_can_read_or_that_holds_no_key_stops_the_mount() {
    let env = Env::new();
    let store = Store::s3();
    let dir = env.path();
    let (pem, _) = rsa_keygen(dir, "rsa");
    fs::set_permissions(&pem, fs::Permissions::from_mode(0o644)).unwrap();
    let at = dir.join("mnt-open");
    let err = Mount::try_start_at(&env, &store, "cse-c", &[&rsa_option(&pem)], at.clone()).err().expect("mount with a 0644 RSA key");
    assert!(err.contains(&format!("{} is readable by group or others", pem.display())) && err.contains("chmod 600"), "{err}");
    assert!(!is_mounted(&at), "nothing may stay mounted");

    // Private, but not a PEM private key.
    let junk = dir.join("junk.pem");
    fs::write(&junk, "not a key").unwrap();
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
    let err = Mount::try_start(&env, &store, "cse-c", &[&rsa_option(&junk)]).err().expect("mount with a junk RSA key");
    assert!(err.contains("rsa_key_file") && err.contains("no PEM private key"), "{err}");

    // Not an option of the server-side modes.
    fs::set_permissions(&pem, fs::Permissions::from_mode(0o600)).unwrap();
    let err = Mount::try_start(&env, &store, "sse-s3", &[&rsa_option(&pem)]).err().expect("sse-s3 with rsa_key_file");
    assert!(err.contains("rsa_key_file only applies to mode=cse-c and mode=cse-kms"), "{err}");
}
