//! Server-side encryption modes (sse-s3, sse-kms) through a real mount against the S3 test server, checked with a
//! raw client: the server must report the encryption on every object, and a raw client reads what the mount wrote.

mod common;

use std::fs;
use std::process::Command;

use common::*;

fn endpoint(store: &Store) -> (String, String) {
    match store {
        Store::S3 { endpoint, bucket } => (endpoint.clone(), bucket.clone()),
        Store::Local { .. } => unreachable!("S3 only"),
    }
}

/// The response headers of a raw HEAD of `key`, lower-cased.
fn head_headers(store: &Store, key: &str) -> String {
    let (ep, bucket) = endpoint(store);
    let out = Command::new("curl").args(["-sf", "-I", &format!("{ep}/{bucket}/{key}")]).output().unwrap();
    assert!(out.status.success(), "HEAD {key} failed");
    String::from_utf8_lossy(&out.stdout).to_lowercase()
}

/// Calls the KMS JSON API of the test server (it serves KMS on the S3 port) and returns the raw JSON answer.
fn kms(store: &Store, action: &str, body: &str) -> String {
    let (ep, _) = endpoint(store);
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", &ep, "-H", &format!("X-Amz-Target: TrentService.{action}")])
        .args(["-H", "Content-Type: application/x-amz-json-1.1", "-H"])
        .arg("Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0")
        .args(["-d", body])
        .output()
        .unwrap();
    assert!(out.status.success(), "KMS {action} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json_field(json: &str, field: &str) -> String {
    let pat = format!("\"{field}\": \"");
    let pat2 = format!("\"{field}\":\"");
    let start = json.find(&pat).map(|i| i + pat.len()).or_else(|| json.find(&pat2).map(|i| i + pat2.len()));
    let start = start.unwrap_or_else(|| panic!("no {field} in {json}"));
    json[start..].split('"').next().unwrap().to_string()
}

fn round_trip(env: &Env, store: &Store, mode: &str, extra: &[&str]) -> Vec<u8> {
    let m = Mount::start_with(env, store, mode, extra);
    let big = pattern((9 << 20) + 5, 1); // multipart
    fs::write(m.path("small"), b"server-side").unwrap();
    fs::write(m.path("big"), &big).unwrap();
    fs::rename(m.path("small"), m.path("renamed")).unwrap();
    drop(m);
    let m = Mount::start_with(env, store, mode, extra);
    assert_bytes(fs::read(m.path("renamed")).unwrap(), b"server-side", "renamed after remount");
    assert_bytes(fs::read(m.path("big")).unwrap(), &big, "big after remount");
    big
}

#[test]
fn sse_s3_is_requested_confirmed_and_readable_by_a_raw_client() {
    let env = Env::new();
    let store = Store::s3();
    let big = round_trip(&env, &store, "sse-s3", &[]);
    for key in ["renamed", "big"] {
        let h = head_headers(&store, key);
        assert!(h.contains("x-amz-server-side-encryption: aes256"), "{key}: {h}");
    }
    let raw = store.raw_objects();
    let (_, bytes) = raw.iter().find(|(k, _)| k == "big").expect("big stored");
    assert_bytes(bytes, &big, "raw client reads what the mount wrote");
}

#[test]
fn sse_kms_uses_the_requested_key_and_fails_cleanly_when_it_is_disabled() {
    let env = Env::new();
    let store = Store::s3();
    let key_id = json_field(&kms(&store, "CreateKey", "{}"), "KeyId");
    let opt = format!("kms_key_id={key_id}");
    round_trip(&env, &store, "sse-kms", &[&opt, "bucket_key=false"]);
    for key in ["renamed", "big"] {
        let h = head_headers(&store, key);
        assert!(h.contains("x-amz-server-side-encryption: aws:kms"), "{key}: {h}");
        assert!(h.contains(&key_id.to_lowercase()), "{key} not under {key_id}: {h}");
    }
    // A disabled key: writes fail (the close reports it) and nothing is silently stored unencrypted.
    kms(&store, "DisableKey", &format!("{{\"KeyId\": \"{key_id}\"}}"));
    let m = Mount::start_with(&env, &store, "sse-kms", &[&opt]);
    // std's fs::write ignores errors of close(); fsync reports the failed upload.
    let err = {
        use std::io::Write;
        let mut f = fs::File::create(m.path("after-disable")).unwrap();
        f.write_all(b"x").unwrap();
        f.sync_all().expect_err("fsync under a disabled key must fail")
    };
    assert!(matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::EACCES)), "{err}");
    // The data stays staged (a later fsync or close would retry); discarding the file lets the mount stop cleanly.
    fs::remove_file(m.path("after-disable")).unwrap();
    let log = m.unmount();
    assert!(log.contains("after-disable"), "the log names the object: {log}");
    assert!(log.contains(&key_id) && log.to_lowercase().contains("disabled"), "the log names the key and the cause: {log}");
}

#[test]
fn server_side_modes_refuse_the_local_store() {
    let env = Env::new();
    let store = Store::local(env.path());
    let err = match Mount::try_start(&env, &store, "sse-s3", &[]) {
        Ok(_) => panic!("sse-s3 mounted a local store"),
        Err(e) => e,
    };
    assert!(err.contains("only an S3 store"), "{err}");
}
