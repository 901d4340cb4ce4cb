//! Test harness: real stores and real FUSE mounts of the built `s3cryptfs` binary.
//!
//! Two stores: a local directory (always available) and the S3-compatible server that `scripts/test.sh` starts
//! (its address comes from `S3CRYPTFS_TEST_S3_ENDPOINT`). A test that needs the server and does not find it fails
//! with a message saying how to run it; it never skips silently.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;

pub mod reads;

pub const BIN: &str = env!("CARGO_BIN_EXE_s3cryptfs");

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{n}-{}", std::process::id(), t % 1_000_000_000)
}

/// Where a mount keeps its objects.
#[derive(Clone)]
pub enum Store {
    Local { dir: PathBuf },
    S3 { endpoint: String, bucket: String },
    /// A fresh prefix in the Azurite container of scripts/azurite.sh (`AZURE_STORAGE_USE_EMULATOR` in the env).
    Azure { container: String, prefix: String },
    /// A fresh prefix in a bucket of scripts/gcs.sh's fake-gcs-server (`STORAGE_EMULATOR_HOST` in the env), or of
    /// another emulator at `endpoint` (mounted with `endpoint=`; tests/frozen.rs starts one of its own).
    Gcs { bucket: String, prefix: String, endpoint: Option<String> },
}

pub fn s3_endpoint() -> String {
    std::env::var("S3CRYPTFS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "S3CRYPTFS_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts the S3 test server"
        )
    })
}

impl Store {
    pub fn local(tmp: &Path) -> Store {
        let dir = tmp.join("store");
        std::fs::create_dir_all(&dir).unwrap();
        Store::Local { dir }
    }

    /// A fresh bucket on the test server.
    pub fn s3() -> Store {
        let endpoint = s3_endpoint();
        let bucket = unique("t").to_lowercase();
        let status = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-X", "PUT", &format!("{endpoint}/{bucket}")])
            .status()
            .expect("curl must be installed to create test buckets");
        assert!(status.success(), "could not create bucket {bucket} at {endpoint}");
        Store::S3 { endpoint, bucket }
    }

    /// The store `kind` names (`local`: a directory in `env`; `s3`, `azure`, `gcs`: the shared test servers), for
    /// `on_stores!`.
    pub fn named(kind: &str, env: &Env) -> Store {
        match kind {
            "local" => Store::local(env.path()),
            "s3" => Store::s3(),
            "azure" => Store::azure(),
            "gcs" => Store::gcs(),
            other => panic!("no test store is called {other}"),
        }
    }

    /// A fresh prefix in the Azure test container (scripts/azurite.sh, started by scripts/test.sh).
    pub fn azure() -> Store {
        let container = std::env::var("S3CRYPTFS_TEST_AZURE_CONTAINER").unwrap_or_else(|_| {
            panic!("S3CRYPTFS_TEST_AZURE_CONTAINER is not set: run the tests with scripts/test.sh (it starts Azurite)")
        });
        Store::Azure { container, prefix: unique("t").to_lowercase() }
    }

    /// A fresh bucket (with a prefix in it) on the GCS emulator (scripts/gcs.sh, started by scripts/test.sh): one per
    /// test, because fake-gcs-server's writes slow down with the number of objects in their bucket.
    pub fn gcs() -> Store {
        Store::gcs_at(None)
    }

    /// [`Store::gcs`] on the emulator at `endpoint` (`None`: the shared one).
    pub fn gcs_at(endpoint: Option<String>) -> Store {
        let bucket = unique("t").to_lowercase();
        let body = format!("{{\"name\":\"{bucket}\"}}");
        let url = format!("{}/storage/v1/b", endpoint.clone().unwrap_or_else(gcs_host));
        gcs_curl(&["-sf", "-o", "/dev/null", "-X", "POST", "-H", "content-type: application/json", "-d", &body, &url]);
        Store::Gcs { bucket, prefix: "p".into(), endpoint }
    }

    pub fn url(&self) -> String {
        match self {
            Store::Local { dir } => format!("file://{}", dir.display()),
            Store::S3 { bucket, .. } => format!("s3://{bucket}"),
            Store::Azure { container, prefix } => format!("az://{container}/{prefix}"),
            Store::Gcs { bucket, prefix, .. } => format!("gs://{bucket}/{prefix}"),
        }
    }

    pub fn extra_options(&self) -> Vec<String> {
        match self {
            Store::Local { .. } => vec![],
            Store::S3 { endpoint, .. } => vec![format!("endpoint={endpoint}"), "region=us-east-1".into()],
            Store::Gcs { endpoint: Some(endpoint), .. } => vec![format!("endpoint={endpoint}")],
            Store::Azure { .. } | Store::Gcs { .. } => vec![],
        }
    }

    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        match self {
            Store::Local { dir } => Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap()),
            Store::S3 { endpoint, bucket } => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_endpoint(endpoint)
                    .with_bucket_name(bucket)
                    .with_region("us-east-1")
                    .with_allow_http(true)
                    .with_virtual_hosted_style_request(false)
                    .build()
                    .unwrap(),
            ),
            Store::Azure { container, prefix } => Arc::new(object_store::prefix::PrefixStore::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_use_emulator(true)
                    .build()
                    .unwrap(),
                prefix.as_str(),
            )),
            // The mount's own GCS client is not public, and a test that read the store through it would agree with
            // it: GCS tests look at the store with curl (`gcs_*`).
            Store::Gcs { .. } => panic!("no object_store client for GCS in the tests: use raw_objects / put_foreign"),
        }
    }

    /// Every stored object's key and raw bytes (what an attacker with read access to the store sees).
    pub fn raw_objects(&self) -> Vec<(String, Vec<u8>)> {
        match self {
            Store::Local { dir } => {
                let mut out = Vec::new();
                walk(dir, dir, &mut out);
                out
            }
            Store::Gcs { bucket, prefix, endpoint } => gcs_list(endpoint, bucket, prefix)
                .into_iter()
                .map(|name| {
                    let bytes = gcs_curl(&["-sf", &format!("{}?alt=media", gcs_object_url(endpoint, bucket, &name))]);
                    (name[prefix.len() + 1..].to_string(), bytes)
                })
                .collect(),
            Store::S3 { .. } | Store::Azure { .. } => {
                let store = self.object_store();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    use futures::TryStreamExt;
                    use object_store::ObjectStoreExt;
                    let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
                    let mut out = Vec::new();
                    for m in metas {
                        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
                        out.push((m.location.to_string(), bytes.to_vec()));
                    }
                    out
                })
            }
        }
    }

    /// The multipart uploads the store holds open (invisible to listings, and billed on S3), as (key, upload id).
    /// S3: ListMultipartUploads (one page of up to 1,000, which a test never reaches). The local store: the staged
    /// files of its uploads in `.s3cryptfs-tmp` (`.put-<hex>`, also what a PUT in flight stages; the key is not
    /// known there, so it is empty). `None` on Azure: its uploads are uncommitted blocks of a blob, which the service
    /// drops after a week and no listing shows.
    pub fn multipart_uploads(&self) -> Option<Vec<(String, String)>> {
        Some(match self {
            Store::Local { dir } => std::fs::read_dir(dir.join(".s3cryptfs-tmp"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(".put-"))
                .map(|name| (String::new(), name))
                .collect(),
            Store::S3 { endpoint, bucket } => {
                // Unsigned, as the bucket was created: the test server accepts it.
                let out = Command::new("curl").args(["-sf", &format!("{endpoint}/{bucket}?uploads")]).output().unwrap();
                assert!(out.status.success(), "ListMultipartUploads failed: {}", String::from_utf8_lossy(&out.stderr));
                let text = String::from_utf8_lossy(&out.stdout);
                let field = |upload: &str, name: &str| {
                    let from = upload.find(&format!("<{name}>")).map(|i| i + name.len() + 2);
                    let to = upload.find(&format!("</{name}>"));
                    match (from, to) {
                        (Some(from), Some(to)) if from <= to => upload[from..to].to_string(),
                        _ => panic!("no {name} in an <Upload> of: {text}"),
                    }
                };
                text.split("<Upload>").skip(1).map(|u| (field(u, "Key"), field(u, "UploadId"))).collect()
            }
            Store::Azure { .. } => return None,
            // A resumable upload session is not listed anywhere; GCS drops unfinished ones after a week.
            Store::Gcs { .. } => return None,
        })
    }

    /// Stores `bytes` at `key` as another client would: no metadata of ours.
    pub fn put_foreign(&self, key: &str, bytes: &[u8]) {
        match self {
            Store::Local { dir } => std::fs::write(dir.join(key), bytes).unwrap(),
            Store::Gcs { bucket, prefix, endpoint } => {
                let body = std::env::temp_dir().join(unique("gcs-put"));
                std::fs::write(&body, bytes).unwrap();
                let url = format!(
                    "{}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={}",
                    endpoint.clone().unwrap_or_else(gcs_host),
                    gcs_encode(&format!("{prefix}/{key}"))
                );
                let data = format!("@{}", body.display());
                gcs_curl(&["-sf", "-o", "/dev/null", "-X", "POST", "--data-binary", &data, &url]);
                std::fs::remove_file(body).unwrap();
            }
            Store::S3 { .. } | Store::Azure { .. } => {
                let store = self.object_store();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    use object_store::ObjectStoreExt;
                    store.put(&object_store::path::Path::from(key), bytes.to_vec().into()).await.unwrap();
                });
            }
        }
    }

    /// Overwrites one stored object's raw bytes (to simulate tampering).
    pub fn put_raw(&self, key: &str, bytes: Vec<u8>) {
        match self {
            Store::Local { dir } => {
                let p = dir.join(key);
                // Keep the extended attributes (metadata) as they are: rewrite the content in place.
                std::fs::write(&p, bytes).unwrap();
            }
            Store::S3 { .. } | Store::Azure { .. } | Store::Gcs { .. } => {
                panic!("put_raw on an object store would drop metadata; tamper tests use the local store")
            }
        }
    }
}

/// The GCS emulator's URL (scripts/gcs.sh).
fn gcs_host() -> String {
    std::env::var("STORAGE_EMULATOR_HOST").expect("STORAGE_EMULATOR_HOST is not set: run the tests with test.sh")
}

/// A GCS object name as one URL path segment or query value.
fn gcs_encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn gcs_object_url(endpoint: &Option<String>, bucket: &str, name: &str) -> String {
    let host = endpoint.clone().unwrap_or_else(gcs_host);
    format!("{host}/storage/v1/b/{bucket}/o/{}", gcs_encode(name))
}

/// curl's stdout; it must succeed.
fn gcs_curl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl").args(args).output().expect("curl must be installed");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Every object name under `prefix/` in the GCS test bucket, through the JSON API's listing, page by page.
fn gcs_list(endpoint: &Option<String>, bucket: &str, prefix: &str) -> Vec<String> {
    let host = endpoint.clone().unwrap_or_else(gcs_host);
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let mut url = format!("{host}/storage/v1/b/{bucket}/o?prefix={}", gcs_encode(&format!("{prefix}/")));
        if !token.is_empty() {
            url.push_str(&format!("&pageToken={}", gcs_encode(&token)));
        }
        let page: serde_json::Value = serde_json::from_slice(&gcs_curl(&["-sf", &url])).unwrap();
        for item in page["items"].as_array().into_iter().flatten() {
            names.push(item["name"].as_str().unwrap().to_string());
        }
        match page["nextPageToken"].as_str() {
            Some(t) => token = t.to_string(),
            None => return names,
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        } else {
            let key = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            out.push((key, std::fs::read(&p).unwrap()));
        }
    }
}

/// A test's private workspace: a temp dir with a key file.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub key_file: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new().prefix("s3cryptfs-test").tempdir().unwrap();
        let key_file = tmp.path().join("key");
        let out = Command::new(BIN).args(["keygen", "--output"]).arg(&key_file).output().unwrap();
        assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        Env { tmp, key_file }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
}

/// A running `s3cryptfs mount -f` process and its mountpoint. Dropping it unmounts and waits for the process.
pub struct Mount {
    pub dir: PathBuf,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Mount {
    pub fn start(env: &Env, store: &Store, mode: &str) -> Mount {
        Self::start_with(env, store, mode, &[])
    }

    pub fn start_with(env: &Env, store: &Store, mode: &str, extra: &[&str]) -> Mount {
        Self::try_start(env, store, mode, extra).unwrap_or_else(|e| panic!("mount failed: {e}"))
    }

    pub fn try_start(env: &Env, store: &Store, mode: &str, extra: &[&str]) -> Result<Mount, String> {
        Self::try_start_at(env, store, mode, extra, env.path().join(unique("mnt")))
    }

    /// [`Mount::try_start`] at a given mountpoint (created if missing).
    pub fn try_start_at(env: &Env, store: &Store, mode: &str, extra: &[&str], dir: PathBuf) -> Result<Mount, String> {
        // A dead mount left there by a killed daemon fails stat (ENOTCONN): the start replaces it.
        let previous = mountinfo_line(&dir);
        if previous.is_none() {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut opts = vec![format!("mode={mode}"), format!("staging_dir={}", env.path().join("staging").display())];
        // The environment's key file, unless the test names its own key source.
        let own_source = extra.iter().any(|o| o.starts_with("key_") || o.starts_with("agent"));
        if mode != "none" && !own_source {
            opts.push(format!("key_file={}", env.key_file.display()));
        }
        opts.extend(store.extra_options());
        opts.extend(extra.iter().map(|s| s.to_string()));
        let log = env.path().join(format!("{}.log", unique("mount")));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["mount", "-f", "-o", &opts.join(",")])
            .arg(store.url())
            .arg(&dir)
            // S3CRYPTFS_TEST_LOG: another filter for the mounts' logs (a failing test shows them), e.g. debug.
            .env("RUST_LOG", std::env::var("S3CRYPTFS_TEST_LOG").unwrap_or_else(|_| "s3cryptfs=info,warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        Mount::adopt_replacing(dir, child, log, previous)
    }

    /// Waits until a daemon the test started itself (`mount -f … DIR`, stderr to `log`) serves DIR.
    pub fn adopt(dir: PathBuf, child: std::process::Child, log: PathBuf) -> Result<Mount, String> {
        Self::adopt_replacing(dir, child, log, None)
    }

    /// [`Mount::adopt`] where a mount (`previous`, its mountinfo line) was already there, left by a daemon that was
    /// killed: waits for a new mount that answers.
    fn adopt_replacing(dir: PathBuf, mut child: Child, log: PathBuf, previous: Option<String>) -> Result<Mount, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A replaced mount can look the same in mountinfo (the kernel reuses its id) and answer stat from the
            // kernel's attribute cache, so the new daemon's own word ("mounted", logged at info) is what counts.
            let line = mountinfo_line(&dir);
            let ready = match &previous {
                None => line.is_some(),
                Some(_) => line.is_some() && std::fs::read_to_string(&log).unwrap_or_default().contains(" mounted "),
            };
            if ready {
                return Ok(Mount { dir, child: Some(child), log });
            }
            if let Some(status) = child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("s3cryptfs exited with {status} before mounting: {text}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("mount did not appear within 30 s (mountinfo: {line:?}): {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is running").id()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon outright (SIGKILL, as a crash or the OOM killer would), then detaches its dead mount.
    pub fn kill(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
        }
        self.log_text()
    }

    /// Sends SIGKILL and returns at once, without reaping: the daemon stays a zombie (its pid still exists) until the
    /// returned child is waited for, and its dead mount stays attached. This is the moment a restart by systemd
    /// happens in.
    pub fn kill_unreaped(mut self) -> (Child, String) {
        let child = self.child.take().expect("the daemon is running");
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        (child, self.log_text())
    }

    /// Unmounts (as `fusermount3 -u` does) and waits for the daemon to exit; returns its log.
    pub fn unmount(mut self) -> String {
        self.stop();
        self.log_text()
    }

    /// Unmounts and waits for the daemon like [`Mount::unmount`], but returns its exit status instead of asserting
    /// success (for tests of a daemon that must exit with an error), and its log.
    pub fn unmount_with_status(mut self) -> (std::process::ExitStatus, String) {
        let status = self.stop_status().expect("the daemon is running");
        (status, self.log_text())
    }

    fn stop(&mut self) {
        if let Some(status) = self.stop_status() {
            assert!(status.success(), "s3cryptfs exited with {status}: {}", self.log_text());
        }
    }

    fn stop_status(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let mut out = Command::new("fusermount3").arg("-u").arg(&self.dir).output();
        // Files the test has just closed keep the mount busy until the daemon has answered their RELEASE, which
        // the kernel sends after close() returned: a moment for those before asking the daemon to detach.
        for _ in 0..20 {
            match &out {
                Ok(o) if !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("busy") => {
                    std::thread::sleep(Duration::from_millis(100));
                    out = Command::new("fusermount3").arg("-u").arg(&self.dir).output();
                }
                _ => break,
            }
        }
        let ok = out.as_ref().map(|o| o.status.success()).unwrap_or(false);
        if !ok {
            if let Ok(o) = &out {
                eprintln!("fusermount3 -u {}: {}", self.dir.display(), String::from_utf8_lossy(&o.stderr).trim());
            }
            // Busy or already gone: ask the daemon itself, then force a lazy unmount.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
                panic!("s3cryptfs did not exit after unmount: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(mut child) = self.child.take() {
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("--- s3cryptfs log ---\n{}", self.log_text());
            }
        } else {
            self.stop();
        }
    }
}

/// `s3cryptfs mount -f -o OPTS STORE DIR` with its log (stderr) going to `log`, for tests that run the daemon
/// themselves; add environment and spawn.
pub fn daemon_command(opts: &str, store: impl AsRef<std::ffi::OsStr>, dir: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["mount", "-f", "-o", opts])
        .arg(store)
        .arg(dir)
        .stdin(Stdio::null())
        // Not the test's stdout: a daemon a failed test leaves behind would hold the pipe of whoever reads it.
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// A daemon started with [`daemon_command`] that is unmounted (lazily) and killed if the test panics before it has
/// waited for it.
pub struct Reaped {
    pub child: Child,
    dir: PathBuf,
}

impl Reaped {
    pub fn new(child: Child, dir: &Path) -> Reaped {
        Reaped { child, dir: dir.to_path_buf() }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits until the daemon `child` (started with [`daemon_command`]) has mounted `dir`; fails with its log if it
/// exits first or 30 s pass.
pub fn wait_mounted(dir: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(dir) {
        let exited = child.try_wait().unwrap();
        assert!(Instant::now() < deadline && exited.is_none(), "{exited:?}: {}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_mounted(dir: &Path) -> bool {
    mountinfo_line(dir).is_some()
}

/// The /proc/self/mountinfo line of the topmost mount at `dir`, if any.
pub fn mountinfo_line(dir: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.to_string_lossy();
    mounts.lines().rfind(|l| l.split(' ').nth(4) == Some(&*d)).map(str::to_string)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sh(cmd: &str, cwd: &Path) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).current_dir(cwd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Whether `needle` occurs anywhere in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Compares two byte strings without printing megabytes on failure: lengths and the first differing offset.
#[track_caller]
pub fn assert_bytes(got: impl AsRef<[u8]>, want: impl AsRef<[u8]>, what: &str) {
    let (got, want) = (got.as_ref(), want.as_ref());
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!("{what}: got {} bytes, want {} bytes, first difference at offset {first}", got.len(), want.len());
    }
}

/// Calls the KMS JSON API of the test server (LocalStack serves KMS on the S3 port; it checks no signatures) and
/// returns the raw JSON answer.
pub fn kms_admin(action: &str, body: &str) -> String {
    let ep = std::env::var("S3CRYPTFS_TEST_KMS_ENDPOINT").expect("S3CRYPTFS_TEST_KMS_ENDPOINT (scripts/test.sh)");
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

/// A string field of a flat JSON answer.
pub fn json_field(json: &str, field: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v.pointer(field).or_else(|| v.get(field)).and_then(|f| f.as_str()).unwrap_or_else(|| panic!("no {field} in {json}")).to_string()
}

/// A new KMS key on the test server; returns its key id.
pub fn kms_create_key() -> String {
    json_field(&kms_admin("CreateKey", "{}"), "/KeyMetadata/KeyId")
}

/// Every file (not directory) under `dir`, recursively; empty if `dir` does not exist.
#[allow(dead_code)]
pub fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walkdir(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Leaves `name` (`mib` MiB of `byte`) dirty in the mount at `dir` with no descriptor open, so that its upload
/// happens at the unmount: the shell that opens the file closes its descriptor first (a FLUSH with nothing written),
/// then a child writes through the inherited one and exits; its close is a FLUSH from another process, which does not
/// upload (see `Fs::flush_by`), so the upload is the release's or the unmount's.
pub fn leave_dirty_at_unmount(dir: &Path, name: &str, mib: usize, byte: u8) {
    let script = format!(
        "exec 3>{name}; (sleep 0.2; head -c {mib}M /dev/zero | tr '\\000' '\\{byte:03o}' >&3) & exec 3>&-; wait"
    );
    let out = Command::new("sh").arg("-c").arg(&script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A port nobody listens on right now, as `127.0.0.1:PORT` for `-o metrics_addr=`. Taken below the kernel's
/// ephemeral range (`ip_local_port_range`): a port bound and released inside it (port 0) could be taken in between as
/// the local port of any outgoing connection, and the tests' clients make thousands; the mount then failed with
/// "Address already in use" (seen once in CI). Each port is handed out once per test process, from a start spread by
/// the process id, and only if it can be bound now.
pub fn free_metrics_addr() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const FIRST: u64 = 12_000; // above the test servers' fixed ports
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u64 = range.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(32_768);
    if low > FIRST + 1_000 {
        let span = low - FIRST;
        let start = u64::from(std::process::id()) * 211 % span;
        for _ in 0..span {
            let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return format!("127.0.0.1:{port}");
            }
        }
    }
    format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
}

/// Polls `done` every 50 ms until it holds or `limit` has passed; whether it held. For what a mount does in the
/// background (uploads, index writes), observed through its metrics or the store.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The body of `GET http://addr/metrics`.
pub fn scrape(addr: &str) -> String {
    let out = Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]).output().unwrap();
    assert!(out.status.success(), "GET http://{addr}/metrics failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The value of one series (`name` or `name{labels}` exactly as rendered); 0 when it is absent (not yet counted).
pub fn series_value(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// One series' value, scraped now.
pub fn metric(addr: &str, series: &str) -> f64 {
    series_value(&scrape(addr), series)
}

/// Runs tests/tools/s3ec.py, the CLI over the official S3 Encryption Client: (exit status, stdout, stderr).
pub fn s3ec_tool(args: &[&str]) -> (i32, String, String) {
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/s3ec.py");
    let python = std::env::var("S3CRYPTFS_TEST_S3EC_PYTHON").unwrap_or_else(|_| {
        panic!("S3CRYPTFS_TEST_S3EC_PYTHON is not set: run the tests with scripts/test.sh (scripts/s3ec-client.sh install)")
    });
    let out = Command::new(python).arg(tool).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    (out.status.code().unwrap_or_else(|| panic!("s3ec.py {args:?} killed: {stderr}")), stdout, stderr)
}

/// [`s3ec_tool`], which must succeed: its stdout.
#[track_caller]
pub fn s3ec_tool_ok(args: &[&str]) -> String {
    let (code, stdout, stderr) = s3ec_tool(args);
    assert_eq!(code, 0, "s3ec.py {args:?}: {stderr}");
    stdout
}

/// Runs test body `$name(&Env, &Store)` as `$name::<store>` for each store named (`local`, `s3`, `azure`, `gcs`: see
/// [`Store::named`]), each test with an `Env` of its own.
#[allow(unused_macros)]
macro_rules! on_stores {
    ($name:ident: $($store:ident),+) => {
        mod $name {
            use super::*;
            $(
                #[test]
                fn $store() {
                    let env = Env::new();
                    let store = Store::named(stringify!($store), &env);
                    super::$name(&env, &store);
                }
            )+
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_stores;

/// Runs test body `$name(&Env, &Store)` on every store: as `$name::local` (the local store), `$name::s3` (the S3
/// server), `$name::azure` (Azurite) and `$name::gcs` (fake-gcs-server). The name is from the time there were two.
#[allow(unused_macros)] // not every test crate runs a body on both stores
macro_rules! both {
    ($name:ident) => {
        crate::common::on_stores!($name: local, s3, azure, gcs);
    };
}
#[allow(unused_imports)] // not every test crate runs a body on both stores
pub(crate) use both;

/// Runs test body `$name(&Env, &Store)` as `$name::local` and `$name::s3` only: for bodies that move tens of MiB
/// through the disk cache, which the Azure and GCS emulators would only make slower without testing more.
#[allow(unused_macros)]
macro_rules! local_and_s3 {
    ($name:ident) => {
        crate::common::on_stores!($name: local, s3);
    };
}
#[allow(unused_imports)]
pub(crate) use local_and_s3;

/// A tmpfs of `mib` MiB at the environment's staging directory (the journal's disk), unmounted on drop.
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub fn mount(env: &Env, mib: u64) -> SmallDisk {
        let dir = env.path().join("staging");
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "this test mounts a small tmpfs (it needs root): {}", String::from_utf8_lossy(&out.stderr));
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
