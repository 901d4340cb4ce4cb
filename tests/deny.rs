//! Access denied by the store, against a server that checks credentials and policies.
//!
//! LocalStack accepts any key, so these tests use moto with authentication on (`scripts/moto-server.sh`, started by
//! `scripts/test.sh`; its address and an admin key come from `S3CRYPTFS_TEST_MOTO_*`). With the admin key each test
//! makes its own bucket and IAM users. moto checks the access key id, the SigV4 signature and the user's IAM policies
//! (not bucket policies). What must hold:
//! - refused credentials (unknown key id, wrong secret) and credentials without permission are each one line at mount
//!   that says access was denied, names the store and what to check, with exit status 1, never the secret, and nothing
//!   left mounted;
//! - a mount whose policy allows reading but not writing serves reads, and a write fails with EACCES at close (the
//!   upload happens there) with one log line naming the object and the refusal.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The moto server and its admin key.
struct Moto {
    endpoint: String,
    admin: Creds,
}

#[derive(Clone)]
struct Creds {
    key_id: String,
    secret: String,
}

fn moto() -> Moto {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run the tests with scripts/test.sh, which starts the moto server \
                 (scripts/moto-server.sh) that checks credentials"
            )
        })
    };
    Moto {
        endpoint: var("S3CRYPTFS_TEST_MOTO_ENDPOINT"),
        admin: Creds {
            key_id: var("S3CRYPTFS_TEST_MOTO_ADMIN_KEY_ID"),
            secret: var("S3CRYPTFS_TEST_MOTO_ADMIN_SECRET"),
        },
    }
}

impl Moto {
    /// A request signed with the admin key; returns the HTTP status and the body. The key goes to curl on stdin, not
    /// on its command line.
    fn signed(&self, service: &str, args: &[&str]) -> (u16, String) {
        let mut child = Command::new("curl")
            .args(["-s", "-S", "-K", "-", "--aws-sigv4", &format!("aws:amz:us-east-1:{service}")])
            // moto checks S3 signatures with botocore's S3SigV4Auth, which needs this header; curl does not add it.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-w", "\n%{http_code}"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl must be installed");
        let config = format!("user = \"{}:{}\"\n", self.admin.key_id, self.admin.secret);
        child.stdin.take().unwrap().write_all(config.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// An IAM Query API call with the admin key; returns the XML answer.
    fn iam(&self, action: &str, params: &[(&str, &str)]) -> String {
        let mut args = vec!["-X".to_string(), "POST".into(), format!("{}/", self.endpoint)];
        for (k, v) in [("Action", action), ("Version", "2010-05-08")].iter().chain(params) {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = self.signed("iam", &args);
        assert_eq!(code, 200, "IAM {action}: {body}");
        body
    }

    fn s3(&self, method: &str, path: &str) -> (u16, String) {
        let url = format!("{}/{path}", self.endpoint);
        // -X HEAD would make curl wait for a body that never comes: -I asks for the headers only.
        let method: &[&str] = if method == "HEAD" { &["-I"] } else { &["-X", method] };
        self.signed("s3", &[method, &[url.as_str()]].concat())
    }

    /// A fresh bucket.
    fn bucket(&self) -> String {
        let bucket = unique("deny").to_lowercase();
        let (code, body) = self.s3("PUT", &bucket);
        assert_eq!(code, 200, "creating bucket {bucket}: {body}");
        bucket
    }

    /// A new IAM user with an access key and, if given, one inline policy allowing `actions` on `bucket`.
    fn user(&self, bucket: &str, actions: &[&str]) -> Creds {
        let name = unique("user");
        self.iam("CreateUser", &[("UserName", &name)]);
        if !actions.is_empty() {
            let policy = serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": actions,
                    "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")],
                }],
            });
            let policy = policy.to_string();
            self.iam("PutUserPolicy", &[("UserName", &name), ("PolicyName", "test"), ("PolicyDocument", &policy)]);
        }
        let xml = self.iam("CreateAccessKey", &[("UserName", &name)]);
        Creds { key_id: xml_field(&xml, "AccessKeyId"), secret: xml_field(&xml, "SecretAccessKey") }
    }
}

fn xml_field(xml: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = xml.find(&open).unwrap_or_else(|| panic!("no <{name}> in {xml}")) + open.len();
    let len = xml[start..].find(&format!("</{name}>")).unwrap_or_else(|| panic!("no </{name}> in {xml}"));
    xml[start..start + len].to_string()
}

/// `s3cryptfs mount` with only these credentials: no other AWS_* variables, no profile files, and no instance
/// metadata service to fall back on.
fn mount_command(env: &Env, moto: &Moto, creds: &Creds, foreground: bool, store: &str, mnt: &Path) -> Command {
    let home = env.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let opts = format!(
        "key_file={},endpoint={},region=us-east-1,staging_dir={}",
        env.key_file.display(),
        moto.endpoint,
        env.path().join("staging").display()
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("mount");
    if foreground {
        cmd.arg("-f");
    }
    cmd.args(["-o", &opts, store]).arg(mnt).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", &home)
        .env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ACCESS_KEY_ID", &creds.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &creds.secret);
    cmd
}

/// Runs `s3cryptfs mount STORE MNT` as a user would (in the background) and expects it to fail with one line on
/// stderr, nothing on stdout, exit status 1, nothing mounted; returns the line.
fn denied_mount(env: &Env, moto: &Moto, creds: &Creds, store: &str) -> String {
    let mnt = env.path().join(unique("mnt"));
    fs::create_dir_all(&mnt).unwrap();
    let out = mount_command(env, moto, creds, false, store, &mnt).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if is_mounted(&mnt) {
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
        panic!("the mount succeeded although access is denied: {err}");
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.trim().lines().count(), 1, "expected a one-line error, got: {err}");
    assert!(!err.contains(&creds.secret), "the secret key must never be shown: {err}");
    assert!(fs::read_dir(&mnt).unwrap().next().is_none(), "the mountpoint is left as it was");
    let line = err.trim().to_string();
    assert!(line.contains(&format!("access to {store} was denied at {}", moto.endpoint)), "{line}");
    line
}

#[test]
fn refused_credentials_at_mount_are_one_clear_line() {
    let moto = moto();
    let env = Env::new();
    let bucket = moto.bucket();
    let store = format!("s3://{bucket}/pre");

    // A key id the server does not know.
    let unknown =
        Creds { key_id: "AKIAUNKNOWNUNKNOWN00".into(), secret: "not-a-secret-of-any-key-0123456789abcdef".into() };
    let e = denied_mount(&env, &moto, &unknown, &store);
    assert!(e.contains("InvalidAccessKeyId") && e.contains("AWS_ACCESS_KEY_ID"), "{e}");

    // A known key id with the wrong secret: the signature does not match.
    let user = moto.user(&bucket, &["s3:*"]);
    // Its last character changed: to 'x', or to 'y' when it is an 'x' (replaced by 'x', it would be the secret).
    let (head, last) = user.secret.split_at(user.secret.len() - 1);
    let wrong = Creds { key_id: user.key_id.clone(), secret: format!("{head}{}", if last == "x" { "y" } else { "x" }) };
    assert_ne!(wrong.secret, user.secret);
    let e = denied_mount(&env, &moto, &wrong, &store);
    assert!(e.contains("SignatureDoesNotMatch") && e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
    assert!(!e.contains(&user.secret), "{e}");
}

#[test]
fn credentials_without_permission_are_one_clear_line_at_mount() {
    let moto = moto();
    let env = Env::new();
    let bucket = moto.bucket();
    let store = format!("s3://{bucket}/pre");
    // A valid user without any policy: authenticated, allowed nothing.
    let nobody = moto.user(&bucket, &[]);
    let e = denied_mount(&env, &moto, &nobody, &store);
    assert!(e.contains("AccessDenied") && e.contains("IAM policy") && e.contains("bucket policy"), "{e}");
    // Allowed to read objects but not to list the bucket: the mount cannot work and says so the same way.
    let no_list = moto.user(&bucket, &["s3:GetObject", "s3:PutObject"]);
    let e = denied_mount(&env, &moto, &no_list, &store);
    assert!(e.contains("AccessDenied") && e.contains("s3:ListBucket"), "{e}");
}

/// close(2) of a file, with its error (drop() of a `File` ignores it).
fn close(f: fs::File) -> std::io::Result<()> {
    // SAFETY: the descriptor is owned and closed once.
    if unsafe { libc::close(f.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn writes_the_policy_does_not_allow_fail_with_eacces_and_one_log_line() {
    let moto = moto();
    let env = Env::new();
    let bucket = moto.bucket();
    let store = format!("s3://{bucket}/pre");
    let mount = |creds: &Creds| {
        let dir: PathBuf = env.path().join(unique("mnt"));
        fs::create_dir_all(&dir).unwrap();
        let log = env.path().join(format!("{}.log", unique("mount")));
        let child = mount_command(&env, &moto, creds, true, &store, &dir)
            .env("RUST_LOG", "s3cryptfs=info,warn")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Mount::adopt(dir, child, log).unwrap_or_else(|e| panic!("mount failed: {e}"))
    };

    // A user allowed everything on the bucket writes a file: signatures from the mount are accepted.
    let writer = moto.user(&bucket, &["s3:*"]);
    let m = mount(&writer);
    fs::write(m.path("f"), b"written with write access").unwrap();
    m.unmount();

    // A user allowed to list and read, not to write.
    let reader = moto.user(&bucket, &["s3:ListBucket", "s3:GetObject"]);
    let m = mount(&reader);
    let mut text = String::new();
    fs::File::open(m.path("f")).unwrap().read_to_string(&mut text).unwrap();
    assert_eq!(text, "written with write access", "reads are allowed");

    // A new file: open and write go to the staging file; the upload at close is refused.
    let mut f = fs::File::create(m.path("new")).unwrap();
    f.write_all(b"not allowed").unwrap();
    let e = close(f).expect_err("close must report the refused upload");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    // Overwriting through fsync: the same.
    let mut f = fs::OpenOptions::new().write(true).truncate(true).open(m.path("f")).unwrap();
    f.write_all(b"also not allowed").unwrap();
    let e = f.sync_all().expect_err("fsync must report the refused upload");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    drop(f);
    let e = fs::create_dir(m.path("d")).expect_err("mkdir writes a directory marker");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    // A delete is refused inside a 200 answer of DeleteObjects: still EACCES, not EIO.
    let e = fs::remove_file(m.path("f")).expect_err("delete is not allowed");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");

    // One log line per refusal, naming the object and the cause; no raw XML answer split over lines.
    let log = m.log_text();
    let flush_failed = |l: &&str| l.contains("request failed") && l.contains("op=\"flush\"");
    assert!(
        log.lines()
            .filter(flush_failed)
            .any(|l| l.contains("object new") && l.contains("was denied") && l.contains("AccessDenied")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.contains("op=\"unlink\"") && l.contains("was denied")), "{log}");
    assert!(!log.contains("<?xml") && !log.contains("<Error>"), "{log}");
    assert!(!log.contains(&reader.secret) && !log.contains(&writer.secret), "no secret in the log: {log}");

    // Nothing the reader wrote reached the store: the staged data is kept, and the daemon says so when it stops.
    let (code, _) = moto.s3("HEAD", &format!("{bucket}/pre/new"));
    assert_eq!(code, 404, "the refused upload left no object");
    let (status, log) = m.unmount_with_status();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("could not be uploaded") && log.contains("next start"), "{log}");
}
