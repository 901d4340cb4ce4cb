//! Mode cse-kms through a real mount: every object's data key comes from the test server's KMS (LocalStack, over
//! HTTPS with the test CA), the header carries the wrapped key (envelope kind 2), and the key's state in KMS decides
//! whether files can be read. Also the mixed-mode rule: a cse-kms mount given a key file reads cse-c objects too.

mod common;

use std::fs;
use std::io::Write;

use common::*;

/// Options for a cse-kms mount under `key_id`, with KMS reached over HTTPS.
fn kms_options(key_id: &str) -> Vec<String> {
    let ep = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE");
    vec![format!("kms_key_id={key_id}"), format!("kms_endpoint={ep}"), format!("ca_file={ca}")]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The stored bytes of `key`.
fn raw(store: &Store, key: &str) -> Vec<u8> {
    store.raw_objects().into_iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{key} not stored")).1
}

/// A cse-kms mount. The harness also passes the environment's key file (it does for every mode but none), which
/// lets the mount read cse-c objects; new objects still get KMS data keys.
fn mount_kms(env: &Env, store: &Store, opts: &[&str]) -> Mount {
    Mount::start_with(env, store, "cse-kms", opts)
}

#[test]
fn cse_kms_round_trip_and_the_key_state_decides_reads() {
    let env = Env::new();
    let store = Store::s3();
    let key_id = kms_create_key();
    let opts = kms_options(&key_id);
    let big = pattern((9 << 20) + 77, 3); // multipart
    {
        let m = mount_kms(&env, &store, &refs(&opts));
        fs::write(m.path("small"), b"wrapped by KMS").unwrap();
        fs::write(m.path("big"), &big).unwrap();
        fs::write(m.path("later"), b"read after the key comes back").unwrap();
        fs::rename(m.path("small"), m.path("renamed")).unwrap();
        let f = fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
        f.set_len(100_000).unwrap();
        f.sync_all().unwrap();
    }
    // Stored form: our header with envelope kind 2 naming the key, and no plaintext.
    for key in ["renamed", "big"] {
        let bytes = raw(&store, key);
        assert_eq!(&bytes[..8], b"s3cryptf", "{key}");
        assert_eq!(bytes[10], 2, "{key}: envelope kind");
        assert!(contains(&bytes[..512], key_id.as_bytes()), "{key}: the header names the KMS key");
        assert!(!contains(&bytes, b"wrapped by KMS"), "{key}: plaintext stored");
    }
    assert!(!contains(&raw(&store, "big"), &big[..4096]), "big: plaintext stored");

    let m = mount_kms(&env, &store, &refs(&opts));
    assert_bytes(fs::read(m.path("renamed")).unwrap(), b"wrapped by KMS", "renamed after remount");
    assert_bytes(fs::read(m.path("big")).unwrap(), &big[..100_000], "truncated big after remount");

    // Disable the key: a file whose data key this mount has not unwrapped yet cannot be read, cleanly.
    kms_admin("DisableKey", &format!("{{\"KeyId\": \"{key_id}\"}}"));
    let err = fs::read(m.path("later")).expect_err("reading under a disabled key must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Writing needs a new data key, which a disabled key cannot give.
    let mut f = fs::File::create(m.path("new-while-disabled")).unwrap();
    f.write_all(b"x").unwrap();
    let err = f.sync_all().expect_err("fsync under a disabled key must fail");
    assert!(matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::EACCES)), "{err}");
    drop(f);
    fs::remove_file(m.path("new-while-disabled")).unwrap();

    // Enable it again: the same mount reads the file.
    kms_admin("EnableKey", &format!("{{\"KeyId\": \"{key_id}\"}}"));
    assert_bytes(fs::read(m.path("later")).unwrap(), b"read after the key comes back", "after EnableKey");
    let log = m.unmount();
    assert!(log.contains("later") && log.contains(&key_id) && log.contains("disabled"), "the log names the object, key and cause: {log}");
}

#[test]
fn a_mount_reads_both_client_side_modes_it_has_keys_for() {
    let env = Env::new();
    let store = Store::local(env.path());
    let key_id = kms_create_key();
    let opts = kms_options(&key_id);
    {
        let m = Mount::start(&env, &store, "cse-c");
        fs::write(m.path("by-cse-c"), b"customer key").unwrap();
    }
    {
        // The harness passes the environment's key file: cse-kms then reads cse-c objects too.
        let m = mount_kms(&env, &store, &refs(&opts));
        assert_bytes(fs::read(m.path("by-cse-c")).unwrap(), b"customer key", "cse-c object in a cse-kms mount");
        fs::write(m.path("by-cse-kms"), b"kms key").unwrap();
        // Rewriting an old object re-encrypts it in the mount's mode.
        fs::OpenOptions::new().append(true).open(m.path("by-cse-c")).unwrap().write_all(b"+").unwrap();
    }
    assert_eq!(raw(&store, "by-cse-kms")[10], 2);
    assert_eq!(raw(&store, "by-cse-c")[10], 2, "rewritten under KMS");

    // A cse-c mount has no KMS: the KMS object fails with EIO and the log says which mode reads it.
    let m = Mount::start(&env, &store, "cse-c");
    let err = fs::read(m.path("by-cse-kms")).expect_err("cse-c cannot unwrap a KMS data key");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let log = m.unmount();
    assert!(log.contains("by-cse-kms") && log.contains("mode=cse-kms"), "{log}");
}

#[test]
fn cse_kms_errors_are_clear() {
    let env = Env::new();
    let store = Store::local(env.path());
    // A key that does not exist: refused at mount (the write journal's key comes from it), one line naming it.
    let missing = "11111111-2222-3333-4444-555555555555";
    let opts = kms_options(missing);
    let err = match Mount::try_start(&env, &store, "cse-kms", &refs(&opts)) {
        Ok(_) => panic!("mounted with a KMS key that does not exist"),
        Err(e) => e,
    };
    let log = err.split("before mounting: ").nth(1).unwrap_or(&err).trim().to_string();
    assert!(log.contains(missing) && log.contains("does not exist"), "{log}");
    assert_eq!(log.lines().count(), 1, "{log}");
    // Read-only, the mount makes no data keys and does not ask.
    let mut ro = opts.clone();
    ro.push("ro".into());
    drop(mount_kms(&env, &store, &refs(&ro)));

    // cse-kms without a key for new files is refused at the command line, naming the option.
    let err = match Mount::try_start(&env, &store, "cse-kms", &[]) {
        Ok(_) => panic!("cse-kms mounted without kms_key_id"),
        Err(e) => e,
    };
    assert!(err.contains("kms_key_id"), "{err}");
}

#[test]
fn a_disabled_kms_key_is_refused_at_mount_with_the_key_named() {
    let env = Env::new();
    let store = Store::local(env.path());
    let key_id = kms_create_key();
    let opts = kms_options(&key_id);
    {
        let m = mount_kms(&env, &store, &refs(&opts));
        fs::write(m.path("f"), b"x").unwrap();
    }
    kms_admin("DisableKey", &format!("{{\"KeyId\": \"{key_id}\"}}"));
    let err = match Mount::try_start(&env, &store, "cse-kms", &refs(&opts)) {
        Ok(_) => panic!("mounted although the store's KMS key is disabled"),
        Err(e) => e,
    };
    assert!(err.contains(&key_id) && err.contains("disabled"), "{err}");
    kms_admin("EnableKey", &format!("{{\"KeyId\": \"{key_id}\"}}"));
    let m = mount_kms(&env, &store, &refs(&opts));
    assert_bytes(fs::read(m.path("f")).unwrap(), b"x", "after EnableKey");
}

/// Regression (issue 10.7g): with a wrong or unreachable KMS endpoint a cse-kms mount came up and then failed every
/// write with EIO. It must refuse to mount, naming the endpoint and what failed there.
#[test]
fn a_wrong_kms_endpoint_is_refused_at_mount() {
    let env = Env::new();
    let store = Store::local(env.path());
    // Nothing listens on port 1: connection refused.
    let refused = "http://127.0.0.1:1";
    // A web server that is not KMS: answers every request with an HTML 404.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 65536];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let body = "<html><body>Not Found</body></html>";
            let _ = write!(conn, "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    for (endpoint, want) in [(refused, "connection refused"), (web.as_str(), "does not answer like a KMS endpoint")] {
        let opts = ["kms_key_id=alias/any".to_string(), format!("kms_endpoint={endpoint}")];
        let err = match Mount::try_start(&env, &store, "cse-kms", &refs(&opts)) {
            Ok(_) => panic!("mounted with kms_endpoint={endpoint}"),
            Err(e) => e,
        };
        assert!(err.contains(endpoint) && err.contains(want), "{endpoint}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
