//! The tooling around the official AWS S3 Encryption Client (issue 12): tests/tools/s3ec.py, run with the venv of
//! scripts/s3ec-client.sh (`$S3CRYPTFS_TEST_S3EC_PYTHON`), against the S3 + KMS test server. These tests exercise no
//! s3cryptfs code: they pin down that the official client round-trips V2 and V3 objects here, that the objects carry
//! the metadata of S3EC.md §1.3/§1.4 (what s3cryptfs will have to read and write), and that the tool reports the
//! client's refusals (wrong encryption context, commitment policy, tampering) as exit status 3 and S3/KMS errors as 4.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use base64::Engine;
use common::*;

const MIB: usize = 1 << 20;


fn new_bucket() -> (String, String) {
    match Store::s3() {
        Store::S3 { endpoint, bucket } => (endpoint, bucket),
        Store::Local { .. } | Store::Azure { .. } | Store::Gcs { .. } => unreachable!(),
    }
}

/// Incompressible test data (xorshift), different per seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn context_args(ctx: &[(&str, &str)]) -> Vec<String> {
    ctx.iter().flat_map(|(k, v)| ["--context".to_string(), format!("{k}={v}")]).collect()
}

/// Puts `file` with the official client, as V`version`, in 5 MiB parts from 5 MiB on.
fn put(version: u8, kms_key: &str, ctx: &[(&str, &str)], bucket: &str, key: &str, file: &Path) {
    let version = version.to_string();
    let threshold = (5 * MIB).to_string();
    let mut args = vec!["put", "--version", &version, "--wrap", "kms", "--kms-key-id", kms_key, "--bucket", bucket];
    args.extend(["--key", key, "--file", file.to_str().unwrap(), "--multipart-threshold", &threshold]);
    args.extend(["--part-size", &threshold]);
    let ctx = context_args(ctx);
    args.extend(ctx.iter().map(String::as_str));
    s3ec_tool_ok(&args);
}

/// Gets `key` with the official client into `out`: Ok(plaintext) or Err((exit status, stderr)).
fn get(bucket: &str, key: &str, out: &Path, extra: &[&str]) -> Result<Vec<u8>, (i32, String)> {
    let mut args = vec!["get", "--bucket", bucket, "--key", key, "--out", out.to_str().unwrap()];
    args.extend(extra);
    match s3ec_tool(&args) {
        (0, _, _) => Ok(std::fs::read(out).unwrap()),
        (code, _, stderr) => {
            assert!(!out.exists(), "a refused get left {} behind", out.display());
            assert!(!Path::new(&format!("{}.tmp", out.display())).exists(), "a refused get left its .tmp behind");
            Err((code, stderr))
        }
    }
}

fn meta(bucket: &str, key: &str) -> serde_json::Value {
    serde_json::from_str(&s3ec_tool_ok(&["meta", "--bucket", bucket, "--key", key])).unwrap()
}

fn user_metadata(m: &serde_json::Value) -> BTreeMap<String, String> {
    m["metadata"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
}

fn b64_len(v: &str) -> usize {
    base64::engine::general_purpose::STANDARD.decode(v).unwrap_or_else(|e| panic!("not standard base64 ({e}): {v}")).len()
}

/// The stored KMS encryption context (x-amz-matdesc / x-amz-t) must be the user context plus the reserved key.
#[track_caller]
fn assert_stored_context(json: &str, ctx: &[(&str, &str)], cek_alg: &str) {
    let got: BTreeMap<String, String> = serde_json::from_str(json).unwrap();
    let mut want: BTreeMap<String, String> = ctx.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.insert("aws:x-amz-cek-alg".into(), cek_alg.into());
    assert_eq!(got, want, "stored encryption context {json}");
}

/// empty, small, 100 KB with an encryption context, 11 MiB + 7 in three parts: put, check the raw metadata, get back.
/// A round-trip case: name, plaintext length, encryption context.
type Case<'a> = (&'a str, usize, &'a [(&'a str, &'a str)]);

fn round_trip(version: u8) {
    let tmp = tempfile::tempdir().unwrap();
    let (_, bucket) = new_bucket();
    let kms_key = kms_create_key();
    let ctx = [("tenant", "a"), ("app", "s3cryptfs")];
    let cases: [Case; 4] =
        [("empty", 0, &[]), ("small", 6, &[]), ("ctx", 100_000, &ctx), ("mpu", 11 * MIB + 7, &[])];
    for (i, (name, len, ctx)) in cases.into_iter().enumerate() {
        let what = format!("V{version} {name}");
        let plain = data(len, i as u64 + 10 * version as u64);
        let src = tmp.path().join(name);
        std::fs::write(&src, &plain).unwrap();
        put(version, &kms_key, ctx, &bucket, name, &src);

        let m = meta(&bucket, name);
        assert_eq!(m["content_length"].as_u64(), Some(len as u64 + 16), "{what}: ciphertext = plaintext + 16-byte tag");
        let etag = m["etag"].as_str().unwrap();
        assert_eq!(etag.ends_with("-3\""), name == "mpu", "{what}: ETag {etag} (multipart in 3 parts only for mpu)");
        let md = user_metadata(&m);
        let keys: Vec<&str> = md.keys().map(String::as_str).collect();
        if version == 2 {
            assert_eq!(keys, ["x-amz-cek-alg", "x-amz-iv", "x-amz-key-v2", "x-amz-matdesc", "x-amz-tag-len", "x-amz-wrap-alg"], "{what}");
            assert_eq!(md["x-amz-cek-alg"], "AES/GCM/NoPadding", "{what}");
            assert_eq!(md["x-amz-wrap-alg"], "kms+context", "{what}");
            assert_eq!(md["x-amz-tag-len"], "128", "{what}");
            assert_eq!(b64_len(&md["x-amz-iv"]), 12, "{what}: x-amz-iv");
            assert!(b64_len(&md["x-amz-key-v2"]) > 32, "{what}: x-amz-key-v2 is a KMS ciphertext blob");
            assert_stored_context(&md["x-amz-matdesc"], ctx, "AES/GCM/NoPadding");
        } else {
            assert_eq!(keys, ["x-amz-3", "x-amz-c", "x-amz-d", "x-amz-i", "x-amz-t", "x-amz-w"], "{what}");
            assert_eq!(md["x-amz-c"], "115", "{what}");
            assert_eq!(md["x-amz-w"], "12", "{what}");
            assert_eq!(b64_len(&md["x-amz-d"]), 28, "{what}: x-amz-d (key commitment)");
            assert_eq!(b64_len(&md["x-amz-i"]), 28, "{what}: x-amz-i (message id)");
            assert!(b64_len(&md["x-amz-3"]) > 32, "{what}: x-amz-3 is a KMS ciphertext blob");
            assert_stored_context(&md["x-amz-t"], ctx, "115");
        }

        let ctx_args = context_args(ctx);
        let mut with_key: Vec<&str> = vec!["--kms-key-id", &kms_key];
        with_key.extend(ctx_args.iter().map(String::as_str));
        let got = get(&bucket, name, &tmp.path().join(format!("{name}.out")), &with_key).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_bytes(&got, &plain, &what);
        // Without a key id KMS finds the key from the blob.
        let without: Vec<&str> = ctx_args.iter().map(String::as_str).collect();
        let got = get(&bucket, name, &tmp.path().join(format!("{name}.out2")), &without).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_bytes(&got, &plain, &format!("{what}, no key id"));
    }
}

#[test]
fn v2_round_trip_and_metadata() {
    round_trip(2);
}

#[test]
fn v3_round_trip_and_metadata() {
    round_trip(3);
}

/// Re-uploads `key` with plain curl: the same user metadata except `replace`, and the body changed by `flip`.
fn tamper(endpoint: &str, bucket: &str, key: &str, dir: &Path, replace: Option<(&str, &str)>, flip: bool) {
    let file = dir.join(format!("{key}.raw"));
    let url = format!("{endpoint}/{bucket}/{key}");
    assert!(Command::new("curl").args(["-sf", "-o"]).arg(&file).arg(&url).status().unwrap().success());
    if flip {
        let mut body = std::fs::read(&file).unwrap();
        let last = body.len() - 1;
        body[last] ^= 1; // in the GCM tag
        std::fs::write(&file, body).unwrap();
    }
    let mut md = user_metadata(&meta(bucket, key));
    if let Some((k, v)) = replace {
        md.insert(k.into(), v.into());
    }
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "-o", "/dev/null", "-X", "PUT", "--data-binary"]).arg(format!("@{}", file.display()));
    for (k, v) in &md {
        cmd.args(["-H", &format!("x-amz-meta-{k}: {v}")]);
    }
    assert!(cmd.arg(&url).status().unwrap().success(), "re-upload of {key}");
}

#[test]
fn refusals_are_exit_3_and_server_errors_exit_4() {
    let tmp = tempfile::tempdir().unwrap();
    let (endpoint, bucket) = new_bucket();
    let kms_key = kms_create_key();
    let src = tmp.path().join("src");
    std::fs::write(&src, data(1000, 7)).unwrap();
    let ctx = [("tenant", "a")];
    for v in [2, 3] {
        put(v, &kms_key, &ctx, &bucket, &format!("v{v}"), &src);
        put(v, &kms_key, &ctx, &bucket, &format!("v{v}-tag"), &src);
    }
    put(3, &kms_key, &ctx, &bucket, "v3-commit", &src);
    let out = tmp.path().join("out");
    let refused = |key: &str, extra: &[&str], why: &str| {
        let r = get(&bucket, key, &out, extra);
        match r {
            Err((3, msg)) => assert!(msg.starts_with("S3EncryptionClientError: "), "{key} ({why}): {msg}"),
            other => panic!("{key} ({why}): want exit 3, got {:?}", other.map(|b| b.len())),
        }
    };
    for key in ["v2", "v3"] {
        get(&bucket, key, &out, &["--context", "tenant=a"]).unwrap();
        std::fs::remove_file(&out).unwrap();
        refused(key, &[], "no encryption context");
        refused(key, &["--context", "tenant=b"], "wrong encryption context");
        refused(key, &["--context", "tenant=a", "--context", "x=y"], "extra encryption context");
    }
    // The client's default policy refuses the non-committing V2 format, and reads V3.
    let strict = ["--context", "tenant=a", "--commitment-policy", "REQUIRE_ENCRYPT_REQUIRE_DECRYPT"];
    refused("v2", &strict, "V2 under REQUIRE_ENCRYPT_REQUIRE_DECRYPT");
    get(&bucket, "v3", &out, &strict).unwrap();
    std::fs::remove_file(&out).unwrap();

    // Tampering: a flipped tag bit (V2 and V3), another key commitment (V3).
    for key in ["v2-tag", "v3-tag"] {
        tamper(&endpoint, &bucket, key, tmp.path(), None, true);
        refused(key, &["--context", "tenant=a"], "flipped tag bit");
    }
    let other_commitment = base64::engine::general_purpose::STANDARD.encode([0u8; 28]);
    tamper(&endpoint, &bucket, "v3-commit", tmp.path(), Some(("x-amz-d", &other_commitment)), false);
    refused("v3-commit", &["--context", "tenant=a"], "another key commitment");

    // Server errors: no such key (S3), another KMS key (KMS).
    match get(&bucket, "absent", &out, &[]) {
        Err((4, msg)) => assert!(msg.starts_with("NoSuchKey"), "{msg}"),
        other => panic!("absent key: want exit 4, got {:?}", other.map(|b| b.len())),
    }
    let other_key = kms_create_key();
    match get(&bucket, "v3", &out, &["--context", "tenant=a", "--kms-key-id", &other_key]) {
        Err((4, msg)) => assert!(msg.starts_with("IncorrectKeyException"), "{msg}"),
        other => panic!("another KMS key: want exit 4, got {:?}", other.map(|b| b.len())),
    }
}
