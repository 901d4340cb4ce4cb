//! Server-side encryption modes (sse-s3, sse-kms, sse-c) through a real mount against the S3 test server, checked
//! with raw clients (curl, and boto3 through tests/tools/raw_s3.py): the server must report the encryption on every
//! object, a raw client reads what the mount wrote, and the mount reads what a raw client wrote.

mod common;

use std::fs;
use std::process::Command;

use common::*;

fn endpoint(store: &Store) -> (String, String) {
    match store {
        Store::S3 { endpoint, bucket } => (endpoint.clone(), bucket.clone()),
        Store::Local { .. } | Store::Azure { .. } | Store::Gcs { .. } => unreachable!("S3 only"),
    }
}

/// The response headers of a raw HEAD of `key`, lower-cased.
fn head_headers(store: &Store, key: &str) -> String {
    let (ep, bucket) = endpoint(store);
    let out = Command::new("curl").args(["-sf", "-I", &format!("{ep}/{bucket}/{key}")]).output().unwrap();
    assert!(out.status.success(), "HEAD {key} failed");
    String::from_utf8_lossy(&out.stdout).to_lowercase()
}

/// Write (small and multipart), rename, truncate and append, then check everything after a remount. Returns the
/// final content of "big".
fn round_trip(env: &Env, store: &Store, mode: &str, extra: &[&str]) -> Vec<u8> {
    let m = Mount::start_with(env, store, mode, extra);
    let big = pattern((9 << 20) + 5, 1); // multipart
    fs::write(m.path("small"), b"server-side").unwrap();
    fs::write(m.path("big"), &big).unwrap();
    fs::rename(m.path("small"), m.path("renamed")).unwrap();
    let f = fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
    f.set_len(5 << 20).unwrap(); // re-uploaded as one PUT
    f.sync_all().unwrap();
    drop(f);
    let mut f = fs::OpenOptions::new().append(true).open(m.path("renamed")).unwrap();
    std::io::Write::write_all(&mut f, b"+more").unwrap();
    f.sync_all().unwrap();
    drop(f);
    drop(m);
    let m = Mount::start_with(env, store, mode, extra);
    assert_bytes(fs::read(m.path("renamed")).unwrap(), b"server-side+more", "renamed and appended, after remount");
    assert_bytes(fs::read(m.path("big")).unwrap(), &big[..5 << 20], "big truncated, after remount");
    big[..5 << 20].to_vec()
}

/// A file written by boto3 with `sse_args` is read through a mount in `mode`.
fn mount_reads_what_boto3_wrote(env: &Env, store: &Store, mode: &str, extra: &[&str], sse_args: &[&str]) {
    let (_, bucket) = endpoint(store);
    let src = env.path().join("boto3-upload");
    fs::write(&src, b"written by boto3").unwrap();
    let mut args = vec!["put", &bucket, "from-boto3", src.to_str().unwrap()];
    args.extend_from_slice(sse_args);
    boto3(&args).unwrap();
    let m = Mount::start_with(env, store, mode, extra);
    assert_bytes(fs::read(m.path("from-boto3")).unwrap(), b"written by boto3", "the mount reads boto3's object");
}

/// boto3 reads "big" as the mount wrote it (`sse_args` as needed: the SSE-C key).
fn boto3_reads_what_the_mount_wrote(env: &Env, store: &Store, want: &[u8], sse_args: &[&str]) {
    let (_, bucket) = endpoint(store);
    let out = env.path().join("boto3-download");
    let mut args = vec!["get", &bucket, "big", out.to_str().unwrap()];
    args.extend_from_slice(sse_args);
    boto3(&args).unwrap();
    assert_bytes(fs::read(&out).unwrap(), want, "boto3 reads what the mount wrote");
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
    boto3_reads_what_the_mount_wrote(&env, &store, &big, &[]);
    mount_reads_what_boto3_wrote(&env, &store, "sse-s3", &[], &["--sse", "AES256"]);
    let h = head_headers(&store, "from-boto3");
    assert!(h.contains("x-amz-server-side-encryption: aes256"), "{h}");
}

#[test]
fn sse_kms_uses_the_requested_key_and_fails_cleanly_when_it_is_disabled() {
    let env = Env::new();
    let store = Store::s3();
    let key_id = kms_create_key();
    let opt = format!("kms_key_id={key_id}");
    let big = round_trip(&env, &store, "sse-kms", &[&opt, "bucket_key=false"]);
    for key in ["renamed", "big"] {
        let h = head_headers(&store, key);
        assert!(h.contains("x-amz-server-side-encryption: aws:kms"), "{key}: {h}");
        assert!(h.contains(&key_id.to_lowercase()), "{key} not under {key_id}: {h}");
    }
    boto3_reads_what_the_mount_wrote(&env, &store, &big, &[]);
    mount_reads_what_boto3_wrote(&env, &store, "sse-kms", &[&opt], &["--sse", "aws:kms", "--kms-key", &key_id]);
    // A disabled key: writes fail (the close reports it) and nothing is silently stored unencrypted.
    kms_admin("DisableKey", &format!("{{\"KeyId\": \"{key_id}\"}}"));
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
    assert!(err.contains("mode=sse-s3 is S3 server-side encryption, which the local store does not offer"), "{err}");
}

/// Mount options for the test server over HTTPS (sse-c refuses plain http).
fn https_options() -> Vec<String> {
    let ep = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT (scripts/test.sh)");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE (scripts/test.sh)");
    vec![format!("endpoint={ep}"), format!("ca_file={ca}")]
}

/// Runs tests/tools/raw_s3.py (boto3): `Ok(stdout)` or `Err(the S3 error code)`.
fn boto3(args: &[&str]) -> Result<String, String> {
    let python = std::env::var("S3CRYPTFS_TEST_PYTHON").expect("S3CRYPTFS_TEST_PYTHON (scripts/test.sh)");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/raw_s3.py");
    let out = Command::new(python).arg(script).args(args).output().unwrap();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).to_string()),
        Some(3) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        _ => panic!("raw_s3.py {args:?} crashed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The base64 MD5 of the key on line `line` of a key file, as SSE-C headers carry it.
fn key_md5(key_file: &std::path::Path, line: usize) -> String {
    use base64::Engine;
    let text = fs::read_to_string(key_file).unwrap();
    let b64 = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).nth(line - 1).unwrap();
    let key = base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64.trim().trim_end_matches('=')).unwrap();
    s3cryptfs::store::key_md5(&key)
}

/// A key file whose first (writing) line is a new key and whose second line is `old`'s key.
fn rotated_key_file(env: &Env) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let fresh = env.path().join("fresh-key");
    let out = Command::new(env!("CARGO_BIN_EXE_s3cryptfs")).args(["keygen", "--output"]).arg(&fresh).output().unwrap();
    assert!(out.status.success());
    let path = env.path().join("rotated-key");
    let text = format!("{}\n{}", fs::read_to_string(&fresh).unwrap(), fs::read_to_string(&env.key_file).unwrap());
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn errno_of(r: std::io::Result<Vec<u8>>) -> i32 {
    r.expect_err("the read must fail").raw_os_error().unwrap_or(0)
}

#[test]
fn sse_c_round_trips_over_https_and_agrees_with_a_raw_client() {
    let env = Env::new();
    let store = Store::s3();
    let (_, bucket) = endpoint(&store);
    let https = https_options();
    let opts: Vec<&str> = https.iter().map(String::as_str).collect();
    let key_file = env.key_file.to_str().unwrap().to_string();

    let big = round_trip(&env, &store, "sse-c", &opts);
    let m = Mount::start_with(&env, &store, "sse-c", &opts);
    // boto3 with the key: the server reports SSE-C under our key, and the content is the plaintext.
    let md5 = key_md5(&env.key_file, 1);
    for key in ["renamed", "big"] {
        let head = boto3(&["head", &bucket, key, "--key-file", &key_file]).unwrap();
        assert!(head.contains("\"SSECustomerAlgorithm\": \"AES256\""), "{key}: {head}");
        assert!(head.contains(&md5), "{key} is not under our key ({md5}): {head}");
    }
    boto3_reads_what_the_mount_wrote(&env, &store, &big, &["--key-file", &key_file]);
    let out = env.path().join("raw-download");
    // Without the key, or with another key, the server refuses.
    let code = boto3(&["get", &bucket, "renamed", out.to_str().unwrap()]).unwrap_err();
    assert!(code.contains("400") || code.contains("InvalidRequest") || code.contains("BadRequest"), "{code}");
    let other = rotated_key_file(&env); // its first line is a key the object was not written with
    let code = boto3(&["get", &bucket, "renamed", out.to_str().unwrap(), "--key-file", other.to_str().unwrap()]).unwrap_err();
    assert!(code.contains("403") || code.contains("AccessDenied") || code.contains("Forbidden"), "{code}");

    drop(m);
    mount_reads_what_boto3_wrote(&env, &store, "sse-c", &opts, &["--key-file", &key_file]);

    // An object under a key the key file lacks (written by boto3, so without our tag): reading it fails cleanly
    // (EIO or EACCES) and the log names it.
    let src = env.path().join("other-key-upload");
    fs::write(&src, b"someone else's key").unwrap();
    boto3(&["put", &bucket, "sub/other-key", src.to_str().unwrap(), "--key-file", other.to_str().unwrap()]).unwrap();
    let m = Mount::start_with(&env, &store, "sse-c", &opts);
    let errno = errno_of(fs::read(m.path("sub/other-key")));
    assert!(errno == libc::EIO || errno == libc::EACCES, "errno {errno}");
    let log = m.unmount();
    assert!(log.contains("sub/other-key") && log.contains("no key in the key file opens it"), "{log}");

    // Another key file only: the mount is refused, naming the key (by MD5) the objects need.
    let stranger = Env::new();
    let err = match Mount::try_start(&stranger, &store, "sse-c", &opts) {
        Ok(_) => panic!("mounted with a key file that opens nothing"),
        Err(e) => e,
    };
    assert!(err.contains(&md5) && err.contains("not in the key file") && err.contains("key_file"), "{err}");
}

#[test]
fn sse_c_reads_pick_the_key_from_the_history_and_write_with_the_first() {
    let env = Env::new();
    let store = Store::s3();
    let (_, bucket) = endpoint(&store);
    let https = https_options();
    let mut opts: Vec<&str> = https.iter().map(String::as_str).collect();
    let old_key_file = env.key_file.to_str().unwrap().to_string();

    let m = Mount::start_with(&env, &store, "sse-c", &opts);
    fs::write(m.path("old"), b"under the old key").unwrap();
    drop(m);
    // An object a raw client wrote under the old key: it has no key tag.
    let src = env.path().join("raw-upload");
    fs::write(&src, b"untagged, old key").unwrap();
    boto3(&["put", &bucket, "untagged", src.to_str().unwrap(), "--key-file", &old_key_file]).unwrap();

    let rotated = rotated_key_file(&env);
    let key_opt = format!("key_file={}", rotated.display());
    opts.push(&key_opt);
    let m = Mount::start_with(&env, &store, "sse-c", &opts);
    assert_bytes(fs::read(m.path("old")).unwrap(), b"under the old key", "old object through the history");
    assert_bytes(fs::read(m.path("untagged")).unwrap(), b"untagged, old key", "untagged object through the history");
    fs::write(m.path("new"), b"under the new key").unwrap();
    fs::rename(m.path("old"), m.path("old-renamed")).unwrap();
    assert_bytes(fs::read(m.path("old-renamed")).unwrap(), b"under the old key", "renamed old object");
    let log = m.unmount();
    // The tagged object was opened by its tag; only the untagged one needed the other keys tried.
    assert!(log.contains("no SSE-C key tag") && log.contains("untagged"), "{log}");
    assert_eq!(log.matches("no SSE-C key tag").count(), 1, "{log}");

    let new_md5 = key_md5(&rotated, 1);
    let old_md5 = key_md5(&rotated, 2);
    let tags = boto3(&["tags", &bucket, "old-renamed"]).unwrap();
    assert!(tags.contains(&format!("\"s3cryptfs-ssec-key-md5\": \"{old_md5}\"")), "{tags}");
    let head = boto3(&["head", &bucket, "new", "--key-file", rotated.to_str().unwrap()]).unwrap();
    assert!(head.contains(&new_md5), "new objects use the first key: {head}");
    // A rename is a server-side copy with the source's key: the object stays readable with the old key.
    let head = boto3(&["head", &bucket, "old-renamed", "--key-file", &old_key_file]).unwrap();
    assert!(head.contains(&old_md5), "{head}");
}

#[test]
fn sse_c_refuses_plain_http() {
    let env = Env::new();
    let store = Store::s3();
    // The test store's own endpoint option is http://.
    let err = match Mount::try_start(&env, &store, "sse-c", &[]) {
        Ok(_) => panic!("sse-c mounted over plain http"),
        Err(e) => e,
    };
    assert!(err.contains("https"), "{err}");
}

/// chmod, touch and rename of objects another tool wrote (mode=none) are server-side copies with new metadata: the
/// content type and tags the object had survive (a download and re-upload would lose both), and so does the content.
/// A small limit on single CopyObjects sends the larger object down the multipart (UploadPartCopy) route.
#[test]
fn metadata_changes_and_renames_copy_server_side_keeping_content_type_and_tags() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let store = Store::s3();
    let (ep, bucket) = endpoint(&store);
    let small = b"hello, tags".to_vec();
    let big = pattern(12 << 20, 7);
    let src = env.path().join("big-src");
    fs::write(&src, &big).unwrap();
    for (key, body, ctype, tag) in [("doc.txt", "-d@-", "text/plain", "team=docs"), ("big.bin", "", "application/x-test", "team=big")] {
        let mut cmd = Command::new("curl");
        cmd.args(["-sf", "-X", "PUT", "-H", &format!("Content-Type: {ctype}"), "-H", &format!("x-amz-tagging: {tag}")]);
        if body.is_empty() {
            cmd.arg("--data-binary").arg(format!("@{}", src.display()));
        } else {
            cmd.args(["--data-binary", std::str::from_utf8(&small).unwrap()]);
        }
        assert!(cmd.arg(format!("{ep}/{bucket}/{key}")).status().unwrap().success(), "PUT {key}");
    }
    let dir = env.path().join("mnt-copy");
    fs::create_dir_all(&dir).unwrap();
    let log = env.path().join("copy.log");
    let mut opts = vec!["mode=none".to_string()];
    opts.extend(store.extra_options());
    let child = daemon_command(&opts.join(","), store.url(), &dir, &log)
        .env("S3CRYPTFS_TEST_COPY_OBJECT_MAX", (8u64 << 20).to_string())
        .spawn()
        .unwrap();
    let m = Mount::adopt(dir, child, log).unwrap();
    fs::set_permissions(m.path("doc.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(m.path("big.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::rename(m.path("doc.txt"), m.path("moved.txt")).unwrap();
    fs::rename(m.path("big.bin"), m.path("big-moved.bin")).unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(978_307_200);
    fs::File::options().write(true).open(m.path("big-moved.bin")).unwrap().set_modified(old).unwrap();
    assert_bytes(fs::read(m.path("moved.txt")).unwrap(), &small, "small after chmod and rename");
    assert_bytes(fs::read(m.path("big-moved.bin")).unwrap(), &big, "big after chmod, rename and touch");
    drop(m);

    for (key, ctype, mode, tag) in
        [("moved.txt", "text/plain", 0o100600u32, "docs"), ("big-moved.bin", "application/x-test", 0o100640, "big")]
    {
        let h = head_headers(&store, key);
        assert!(h.contains(&format!("content-type: {ctype}")), "{key} kept its content type: {h}");
        assert!(h.contains(&format!("x-amz-meta-mode: {mode}")), "{key} carries the new mode: {h}");
        assert!(h.contains("x-amz-tagging-count: 1"), "{key} kept its tag: {h}");
        let out = Command::new("curl").args(["-sf", &format!("{ep}/{bucket}/{key}?tagging")]).output().unwrap();
        let tags = String::from_utf8_lossy(&out.stdout);
        assert!(tags.contains("<Key>team</Key>") && tags.contains(&format!("<Value>{tag}</Value>")), "{key}: {tags}");
    }
    assert!(head_headers(&store, "big-moved.bin").contains("x-amz-meta-mtime: 978307200"), "the touch reached the store");
    for gone in ["doc.txt", "big.bin"] {
        let st = Command::new("curl").args(["-sf", "-I", &format!("{ep}/{bucket}/{gone}")]).status().unwrap();
        assert!(!st.success(), "{gone} is gone after the rename");
    }
    let m = Mount::start(&env, &store, "none");
    assert_bytes(fs::read(m.path("big-moved.bin")).unwrap(), &big, "big after remount");
    assert_eq!(fs::metadata(m.path("big-moved.bin")).unwrap().modified().unwrap(), old);
}
