//! The validated configuration the rest of the code reads.
//!
//! `cli` turns what the user typed (`-o` options, long flags) into a list of `(name, value)` pairs; this module turns
//! those pairs into a [`MountConfig`] and is the only place that knows option names, defaults and their reasons.
//! Every error names the option and says what is wrong with it in one sentence.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// How object content is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionMode {
    /// Plaintext objects, for comparison and for data that needs no protection.
    None,
    /// Client-side AES-256-GCM; each object's data key is wrapped with the customer's key (docs/FORMAT.md).
    CseC,
    /// Server-side encryption with keys held by the storage service (`x-amz-server-side-encryption: AES256`).
    SseS3,
    /// Server-side encryption under a KMS key (`aws:kms`, `kms_key_id=`).
    SseKms,
    /// Server-side encryption with the customer's key, sent with every request (HTTPS only; `key_file=`).
    SseC,
    /// Client-side AES-256-GCM; each object's data key comes from KMS GenerateDataKey under `kms_key_id=`.
    CseKms,
}

impl EncryptionMode {
    pub fn name(self) -> &'static str {
        match self {
            EncryptionMode::None => "none",
            EncryptionMode::CseC => "cse-c",
            EncryptionMode::SseS3 => "sse-s3",
            EncryptionMode::SseKms => "sse-kms",
            EncryptionMode::SseC => "sse-c",
            EncryptionMode::CseKms => "cse-kms",
        }
    }

    /// Whether the server encrypts (an S3 feature: other stores refuse these modes).
    pub fn is_server_side(self) -> bool {
        matches!(self, EncryptionMode::SseS3 | EncryptionMode::SseKms | EncryptionMode::SseC)
    }
}

/// The format new and rewritten files are stored in (`format=`, client-side modes only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileFormat {
    /// s3cryptfs's own chunked format (docs/FORMAT.md): every 64 KiB page authenticated on its own, objects bound to
    /// their path.
    #[default]
    Own,
    /// The AWS S3 Encryption Client's format (`format=s3ec`), readable by every AWS SDK's encryption client: V3
    /// (key-committing) by default, V2 with `s3ec_version=2` for SDKs older than Java 3.6 / Go 3.2.
    S3ec(crate::crypto::s3ec::WriteFormat),
}

/// Where the customer key history comes from (`-o` options; never the key itself on the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `key_file=PATH`: a key file private to its owner.
    File(PathBuf),
    /// `key_fd=N`: read from an inherited file descriptor, which is then closed.
    Fd(i32),
    /// `key_env=VAR`: read from the environment variable VAR, which is then removed from the environment.
    Env(String),
    /// `key_credential=NAME`: systemd's `$CREDENTIALS_DIRECTORY/NAME` (LoadCredential=).
    Credential(String),
    /// `agent[=SOCKET],key_name=NAME`: fetched from `s3cryptfs agent` (default socket when SOCKET is omitted).
    Agent { socket: Option<PathBuf>, name: String },
}

impl KeySource {
    /// The option that selected it, for messages.
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("key_file={}", p.display()),
            KeySource::Fd(n) => format!("key_fd={n}"),
            KeySource::Env(v) => format!("key_env={v}"),
            KeySource::Credential(c) => format!("key_credential={c}"),
            KeySource::Agent { name, .. } => format!("agent key {name}"),
        }
    }
}

/// Which AES-GCM implementation seals chunks. Both produce identical bytes; see the benchmark in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AeadChoice {
    #[default]
    AwsLc,
    RustCrypto,
}

/// Page cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Plaintext bytes of decrypted chunks kept in memory. 256 MiB holds 4,096 chunks of 64 KiB: enough for several
    /// large sequential readers with read-ahead, small next to a machine that runs a FUSE daemon.
    pub memory_bytes: u64,
    /// Largest read-ahead window for a sequential reader: 64 MiB is eight 8 MiB GETs in flight, which keeps a
    /// 2 Gbit/s link busy even at 200 ms per request. Readers use at most a quarter of what the cache may hold
    /// (src/read).
    pub max_readahead: u64,
    /// `max_memory`: the budget of every data buffer of the daemon (src/memory): the page cache, fetches in flight
    /// (read-ahead included), upload parts, S3EC buffers. The page cache holds `min(memory_bytes, what the rest
    /// leaves)`. `None`: [`CacheConfig::max_memory`] decides.
    pub max_memory: Option<u64>,
    /// `cache_dir`: where the disk cache lives (src/cache/disk.rs); `None`: no disk cache.
    pub disk_dir: Option<PathBuf>,
    /// `cache_disk_size`: its limit; `None`: a quarter of the free space there at mount, at most 64 GiB.
    pub disk_bytes: Option<u64>,
    /// `scratch_size`: without `cache_dir`, the limit of the sealed scratch that takes objects fetched whole for a
    /// random reader (src/cache/disk.rs); `Some(0)`: no scratch; `None`: a quarter of the free space under the
    /// journal at mount, at most 4 GiB.
    pub scratch_bytes: Option<u64>,
}

/// What `max_memory` adds to `cache_size` when it is not given: room for the largest read-ahead (64 MiB window, twice
/// over for GET bodies and their decrypted pages) and three uploads at once (five 8 MiB parts each), so the default
/// changes nothing for a mount that fits in `cache_size` and bounds the rest. 512 MiB with the default cache.
pub const DEFAULT_MEMORY_BEYOND_CACHE: u64 = 256 << 20;
/// The smallest `max_memory`: one upload (five 8 MiB parts) and a read's fetches must fit, with room for a cache.
pub const MIN_MAX_MEMORY: u64 = 64 << 20;

impl CacheConfig {
    /// The memory budget in force: `max_memory` when given, else `cache_size` + [`DEFAULT_MEMORY_BEYOND_CACHE`].
    pub fn max_memory(&self) -> u64 {
        self.max_memory.unwrap_or(self.memory_bytes.saturating_add(DEFAULT_MEMORY_BEYOND_CACHE))
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: 256 << 20,
            max_readahead: 64 << 20,
            max_memory: None,
            disk_dir: None,
            disk_bytes: None,
            scratch_bytes: None,
        }
    }
}

/// Everything `mount` needs, validated.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub store_url: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub mode: EncryptionMode,
    /// Where the key history comes from (required for cse-c and sse-c; optional for cse-kms to read cse-c objects).
    pub key_source: Option<KeySource>,
    /// RSA private key (PEM) that unwraps the data keys of AWS S3 Encryption Client objects wrapped with
    /// `RSA-OAEP-SHA1` (`rsa_key_file=PATH`; cse-c and cse-kms; read only). Private to its owner, like a key file.
    pub rsa_key_file: Option<PathBuf>,
    /// KMS key for sse-kms (None: the account's default aws/s3 key) and for new objects in cse-kms: a key id, a key
    /// ARN or `alias/NAME`.
    pub kms_key_id: Option<String>,
    /// KMS endpoint for cse-kms (default: AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, then the region's KMS).
    pub kms_endpoint: Option<String>,
    /// S3 Bucket Key for sse-kms (fewer KMS calls); None leaves the bucket's default.
    pub bucket_key: Option<bool>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub allow_other: bool,
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
    pub cache: CacheConfig,
    /// How long the kernel and our inode table trust attributes and names before asking the store again. One second,
    /// as mountpoint-s3 does: short enough that another writer's change shows up promptly, long enough that `ls -l`
    /// or a build does not repeat every request.
    pub attr_ttl: Duration,
    /// Longest time one store request (S3 or KMS) may take, its retries included, before the operation that needs it
    /// fails with EIO (`timeout=SECONDS`). 30 s, object_store's own per-attempt default: a part of 8 MiB still moves
    /// at about 300 KiB/s, while a frozen server costs a syscall half a minute instead of object_store's retry budget
    /// (three minutes, spent several times over by one syscall).
    pub store_timeout: Duration,
    /// The write journal's base (`staging_dir=`; created 0700). Default: `journal::default_base`, /var/lib for root,
    /// the XDG state directory for users.
    pub staging_dir: Option<PathBuf>,
    pub aead: AeadChoice,
    pub log_level: Option<String>,
    /// Log to this file instead of stderr (foreground) or syslog (background).
    pub log_file: Option<PathBuf>,
    /// SIGHUP re-reads the log level (same syntax as log_level=) from this file.
    pub log_level_file: Option<PathBuf>,
    /// Mount over a directory that has entries (they are hidden while mounted); refused by default.
    pub nonempty: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (`metrics_addr=127.0.0.1:PORT`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Refuse S3 Encryption Client objects in message format V2, which has no key commitment
    /// (`require_commitment`; cse-c and cse-kms). Off by default, as the AWS clients' commitment policy
    /// `REQUIRE_ENCRYPT_ALLOW_DECRYPT`: buckets written by older SDKs hold V2 objects.
    pub require_commitment: bool,
    /// The format of new and rewritten files (`format=own|s3ec`, `s3ec_version=2|3`).
    pub format: FileFormat,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown mount option '{0}' (see `s3cryptfs mount --help` for the list)")]
    UnknownOption(String),
    #[error("mount option '{name}' needs a value, as in {name}=VALUE")]
    MissingValue { name: String },
    #[error("mount option '{name}' takes no value")]
    UnexpectedValue { name: String },
    #[error("mount option '{name}': {reason}")]
    Invalid { name: String, reason: String },
    #[error("mount option 'key' is refused: a key on the command line is readable by every user through /proc; use key_file=PATH, key_fd=N, key_env=VAR, key_credential=NAME or agent,key_name=NAME instead")]
    RawKeyRefused,
    #[error("mode={0} needs a key: add -o key_file=PATH (create one with `s3cryptfs keygen --output PATH`), or key_fd=, key_env=, key_credential=, agent,key_name=")]
    KeyRequired(&'static str),
    #[error("two key sources given ({0} and {1}); give exactly one")]
    TwoKeySources(String, String),
}

/// Records the key source, refusing a second one.
fn set_source(slot: &mut Option<KeySource>, source: KeySource) -> Result<(), ConfigError> {
    match slot {
        Some(existing) if *existing != source => Err(ConfigError::TwoKeySources(existing.describe(), source.describe())),
        _ => {
            *slot = Some(source);
            Ok(())
        }
    }
}

/// Parses a size such as `512`, `64K`, `256M`, `2G` (binary multiples; `KiB`/`MB` spellings accepted).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Default of [`MountConfig::store_timeout`] (see there for why).
pub const DEFAULT_STORE_TIMEOUT: Duration = crate::store::DEFAULT_REQUEST_TIMEOUT;

/// A store timeout in seconds: positive, finite, and at most a day (beyond that it bounds nothing).
fn parse_timeout(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0 && secs <= 86_400.0).then(|| Duration::from_secs_f64(secs))
}

/// The log levels `log_level=` and `log_level_file=` accept.
pub const LOG_LEVELS: &str = "error, warn, info, debug, trace";

/// A log level as the user wrote it → the level `tracing` knows (`warning` → `warn`, any case). Anything else is
/// refused: handed to the log filter as it is, a word that is not a level reads as the name of a module to log, which
/// silences every other message (tamper and upload errors included).
pub fn parse_log_level(text: &str) -> Result<&'static str, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "error" => Ok("error"),
        "warn" | "warning" => Ok("warn"),
        "info" => Ok("info"),
        "debug" => Ok("debug"),
        "trace" => Ok("trace"),
        _ => Err(format!("'{}' is not a log level; use one of {LOG_LEVELS}", text.trim())),
    }
}

fn parse_octal(name: &str, value: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(value, 8)
        .ok()
        .filter(|v| *v <= 0o7777)
        .ok_or_else(|| ConfigError::Invalid { name: name.into(), reason: format!("'{value}' is not an octal mode") })
}

fn parse_id(name: &str, value: &str) -> Result<u32, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::Invalid { name: name.into(), reason: format!("'{value}' is not a numeric id") })
}

fn parse_bool(name: &str, value: Option<&str>) -> Result<bool, ConfigError> {
    match value {
        None | Some("true") | Some("yes") | Some("1") | Some("on") => Ok(true),
        Some("false") | Some("no") | Some("0") | Some("off") => Ok(false),
        Some(v) => Err(ConfigError::Invalid { name: name.into(), reason: format!("'{v}' is not true or false") }),
    }
}

/// Splits a `-o` string (`a=1,b,c=x`) into pairs. Values cannot contain commas (as in fstab).
pub fn split_options(opts: &str) -> Vec<(String, Option<String>)> {
    // `key-file` and `key_file` are the same option; `x-systemd.*` names keep their dashes.
    let norm = |k: &str| if k.starts_with("x-") { k.to_string() } else { k.replace('-', "_") };
    opts.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (norm(k.trim()), Some(v.trim().to_string())),
            None => (norm(item), None),
        })
        .collect()
}

impl MountConfig {
    /// Builds the configuration from the store, mountpoint and option pairs, in the order given (later wins).
    pub fn from_options(
        store_url: String,
        mountpoint: PathBuf,
        foreground: bool,
        options: &[(String, Option<String>)],
    ) -> Result<MountConfig, ConfigError> {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut cfg = MountConfig {
            store_url,
            mountpoint,
            foreground,
            mode: EncryptionMode::CseC,
            key_source: None,
            rsa_key_file: None,
            kms_endpoint: None,
            kms_key_id: None,
            bucket_key: None,
            endpoint: None,
            region: None,
            ca_file: None,
            allow_other: false,
            read_only: false,
            uid,
            gid,
            umask: 0o022,
            cache: CacheConfig::default(),
            attr_ttl: Duration::from_secs(1),
            store_timeout: DEFAULT_STORE_TIMEOUT,
            staging_dir: None,
            aead: AeadChoice::default(),
            log_level: None,
            log_file: None,
            metrics_addr: None,
            nonempty: false,
            log_level_file: None,
            require_commitment: false,
            format: FileFormat::Own,
        };
        let mut s3ec_version: Option<crate::crypto::s3ec::WriteFormat> = None;
        let mut agent_socket: Option<Option<PathBuf>> = None;
        let mut key_name: Option<String> = None;
        for (name, value) in options {
            let name = name.as_str();
            let need = || value.clone().ok_or_else(|| ConfigError::MissingValue { name: name.into() });
            let no_value = || match value {
                Some(_) => Err(ConfigError::UnexpectedValue { name: name.into() }),
                None => Ok(()),
            };
            match name {
                "mode" => {
                    cfg.mode = match need()?.as_str() {
                        "cse-c" | "cse_c" => EncryptionMode::CseC,
                        "none" => EncryptionMode::None,
                        "sse-s3" | "sse_s3" => EncryptionMode::SseS3,
                        "sse-kms" | "sse_kms" => EncryptionMode::SseKms,
                        "sse-c" | "sse_c" => EncryptionMode::SseC,
                        "cse-kms" | "cse_kms" => EncryptionMode::CseKms,
                        other => {
                            return Err(ConfigError::Invalid {
                                name: name.into(),
                                reason: format!(
                                    "'{other}' is not a mode this version supports \
                                     (cse-c, cse-kms, sse-s3, sse-kms, sse-c, none)"
                                ),
                            })
                        }
                    }
                }
                "key" => return Err(ConfigError::RawKeyRefused),
                "key_file" => set_source(&mut cfg.key_source, KeySource::File(PathBuf::from(need()?)))?,
                "rsa_key_file" => cfg.rsa_key_file = Some(PathBuf::from(need()?)),
                "key_fd" => {
                    let v = need()?;
                    let fd = v.parse::<i32>().ok().filter(|n| *n >= 0).ok_or_else(|| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not a file descriptor number"),
                    })?;
                    set_source(&mut cfg.key_source, KeySource::Fd(fd))?
                }
                "key_env" => set_source(&mut cfg.key_source, KeySource::Env(need()?))?,
                "key_credential" => {
                    let v = need()?;
                    if v.contains('/') || v == "." || v == ".." {
                        return Err(ConfigError::Invalid {
                            name: name.into(),
                            reason: format!("'{v}' must be a credential name, not a path"),
                        });
                    }
                    set_source(&mut cfg.key_source, KeySource::Credential(v))?
                }
                "agent" => agent_socket = Some(value.clone().map(PathBuf::from)),
                "key_name" => key_name = Some(need()?),
                "kms_key_id" => cfg.kms_key_id = Some(need()?),
                "kms_endpoint" => {
                    let v = need()?;
                    if !(v.starts_with("http://") || v.starts_with("https://")) {
                        return Err(ConfigError::Invalid {
                            name: name.into(),
                            reason: format!("'{v}' must start with http:// or https://"),
                        });
                    }
                    cfg.kms_endpoint = Some(v)
                }
                "bucket_key" => cfg.bucket_key = Some(parse_bool(name, value.as_deref())?),
                "require_commitment" => cfg.require_commitment = parse_bool(name, value.as_deref())?,
                "format" => {
                    cfg.format = match need()?.as_str() {
                        "own" | "s3cryptfs" => FileFormat::Own,
                        "s3ec" => FileFormat::S3ec(crate::crypto::s3ec::WriteFormat::V3),
                        other => {
                            return Err(ConfigError::Invalid {
                                name: name.into(),
                                reason: format!("'{other}' is not a format: use own (the default) or s3ec"),
                            })
                        }
                    }
                }
                "s3ec_version" => {
                    s3ec_version = Some(match need()?.as_str() {
                        "2" => crate::crypto::s3ec::WriteFormat::V2,
                        "3" => crate::crypto::s3ec::WriteFormat::V3,
                        other => {
                            return Err(ConfigError::Invalid {
                                name: name.into(),
                                reason: format!("'{other}' is not an S3 Encryption Client format this mount writes: use 3 (the default) or 2"),
                            })
                        }
                    })
                }
                "endpoint" => {
                    let v = need()?;
                    if !(v.starts_with("http://") || v.starts_with("https://")) {
                        return Err(ConfigError::Invalid {
                            name: name.into(),
                            reason: format!("'{v}' must start with http:// or https://"),
                        });
                    }
                    cfg.endpoint = Some(v)
                }
                "region" => cfg.region = Some(need()?),
                "ca_file" => cfg.ca_file = Some(PathBuf::from(need()?)),
                "allow_other" => cfg.allow_other = parse_bool(name, value.as_deref())?,
                "nonempty" => {
                    no_value()?;
                    cfg.nonempty = true
                }
                "ro" => {
                    no_value()?;
                    cfg.read_only = true
                }
                "rw" => {
                    no_value()?;
                    cfg.read_only = false
                }
                "uid" => cfg.uid = parse_id(name, &need()?)?,
                "gid" => cfg.gid = parse_id(name, &need()?)?,
                "umask" => cfg.umask = parse_octal(name, &need()?)?,
                "cache_size" => {
                    let v = need()?;
                    cfg.cache.memory_bytes = parse_size(&v).ok_or_else(|| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not a size such as 512M or 2G"),
                    })?
                }
                "cache_dir" => {
                    let v = PathBuf::from(need()?);
                    if !v.is_absolute() {
                        return Err(ConfigError::Invalid {
                            name: name.into(),
                            reason: format!("'{}' is not an absolute path", v.display()),
                        });
                    }
                    cfg.cache.disk_dir = Some(v)
                }
                "cache_disk_size" => {
                    let v = need()?;
                    let bytes = parse_size(&v).ok_or_else(|| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not a size such as 512M or 20G"),
                    })?;
                    if bytes < 1 << 20 {
                        let reason = format!("{v} is too small: give at least 1M");
                        return Err(ConfigError::Invalid { name: name.into(), reason });
                    }
                    cfg.cache.disk_bytes = Some(bytes)
                }
                "scratch_size" => {
                    let v = need()?;
                    let bytes = parse_size(&v).ok_or_else(|| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not a size such as 4G, or 0 for no scratch"),
                    })?;
                    if bytes != 0 && bytes < 1 << 20 {
                        let reason = format!("{v} is too small: give at least 1M, or 0 for no scratch");
                        return Err(ConfigError::Invalid { name: name.into(), reason });
                    }
                    cfg.cache.scratch_bytes = Some(bytes)
                }
                "max_memory" => {
                    let v = need()?;
                    let bytes = parse_size(&v).ok_or_else(|| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not a size such as 512M or 2G"),
                    })?;
                    if bytes < MIN_MAX_MEMORY {
                        return Err(ConfigError::Invalid {
                            name: name.into(),
                            reason: format!(
                                "{v} is too small: an upload alone needs about 40M; give at least {}M",
                                MIN_MAX_MEMORY >> 20
                            ),
                        });
                    }
                    cfg.cache.max_memory = Some(bytes)
                }
                "attr_timeout" => {
                    let v = need()?;
                    let secs: f64 = v.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0).ok_or_else(|| {
                        ConfigError::Invalid { name: name.into(), reason: format!("'{v}' is not a number of seconds") }
                    })?;
                    cfg.attr_ttl = Duration::from_secs_f64(secs)
                }
                "timeout" => {
                    let v = need()?;
                    cfg.store_timeout = parse_timeout(&v).ok_or_else(|| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not a positive number of seconds, as in timeout=30"),
                    })?
                }
                "staging_dir" | "journal_dir" => cfg.staging_dir = Some(PathBuf::from(need()?)),
                "aead" => {
                    cfg.aead = match need()?.as_str() {
                        "aws-lc" | "aws_lc" => AeadChoice::AwsLc,
                        "aes-gcm" | "aes_gcm" | "rustcrypto" => AeadChoice::RustCrypto,
                        other => {
                            return Err(ConfigError::Invalid {
                                name: name.into(),
                                reason: format!("'{other}' is not aws-lc or aes-gcm"),
                            })
                        }
                    }
                }
                "log_level" => {
                    let level = parse_log_level(&need()?).map_err(|reason| ConfigError::Invalid { name: name.into(), reason })?;
                    cfg.log_level = Some(level.to_string())
                }
                "log_file" => cfg.log_file = Some(PathBuf::from(need()?)),
                "log_level_file" => cfg.log_level_file = Some(PathBuf::from(need()?)),
                "metrics_addr" => {
                    let v = need()?;
                    cfg.metrics_addr = Some(v.parse().map_err(|_| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("'{v}' is not an address such as 127.0.0.1:9464"),
                    })?)
                }
                // Accepted so that `-o` lines written for other FUSE filesystems and mount(8) keep working; they
                // change nothing here.
                "default_permissions" | "defaults" | "nodev" | "nosuid" | "noatime" | "relatime" | "exec" | "noexec" | "suid"
                | "dev" | "atime" | "_netdev" | "nofail" | "noauto" | "auto" | "user" | "users" | "nouser" => {}
                _ if name.starts_with("x-systemd.") || name.starts_with("x-") => {}
                _ => return Err(ConfigError::UnknownOption(name.into())),
            }
        }
        match (agent_socket, key_name) {
            (Some(socket), Some(name)) => set_source(&mut cfg.key_source, KeySource::Agent { socket, name })?,
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    name: "agent".into(),
                    reason: "agent needs key_name=NAME (the name given to `s3cryptfs key add`)".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    name: "key_name".into(),
                    reason: "key_name only applies with agent (as in -o agent,key_name=NAME)".into(),
                })
            }
            (None, None) => {}
        }
        if matches!(cfg.mode, EncryptionMode::CseC | EncryptionMode::SseC) && cfg.key_source.is_none() {
            return Err(ConfigError::KeyRequired(cfg.mode.name()));
        }
        if !matches!(cfg.mode, EncryptionMode::SseKms | EncryptionMode::CseKms) && cfg.kms_key_id.is_some() {
            return Err(ConfigError::Invalid {
                name: "kms_key_id".into(),
                reason: "kms_key_id only applies to mode=sse-kms and mode=cse-kms".into(),
            });
        }
        if !matches!(cfg.mode, EncryptionMode::CseC | EncryptionMode::CseKms) && cfg.rsa_key_file.is_some() {
            return Err(ConfigError::Invalid {
                name: "rsa_key_file".into(),
                reason: format!(
                    "rsa_key_file only applies to mode=cse-c and mode=cse-kms, which read S3 Encryption Client \
                     objects (mode={} does not)",
                    cfg.mode.name()
                ),
            });
        }
        if !matches!(cfg.mode, EncryptionMode::CseC | EncryptionMode::CseKms) && cfg.require_commitment {
            return Err(ConfigError::Invalid {
                name: "require_commitment".into(),
                reason: "require_commitment only applies to mode=cse-c and mode=cse-kms, which read S3 Encryption \
                         Client objects"
                    .into(),
            });
        }
        if let Some(version) = s3ec_version {
            match cfg.format {
                FileFormat::S3ec(_) => cfg.format = FileFormat::S3ec(version),
                FileFormat::Own => {
                    return Err(ConfigError::Invalid {
                        name: "s3ec_version".into(),
                        reason: "s3ec_version only applies with format=s3ec".into(),
                    })
                }
            }
        }
        if cfg.format != FileFormat::Own && !matches!(cfg.mode, EncryptionMode::CseC | EncryptionMode::CseKms) {
            return Err(ConfigError::Invalid {
                name: "format".into(),
                reason: format!(
                    "format=s3ec is a client-side format: it needs mode=cse-c or mode=cse-kms (mode={} stores the \
                     bytes as they are)",
                    cfg.mode.name()
                ),
            });
        }
        if cfg.format == FileFormat::S3ec(crate::crypto::s3ec::WriteFormat::V2) && cfg.require_commitment {
            return Err(ConfigError::Invalid {
                name: "s3ec_version".into(),
                reason: "s3ec_version=2 writes objects without key commitment, which require_commitment refuses to \
                         read: drop one of the two"
                    .into(),
            });
        }
        if cfg.mode != EncryptionMode::SseKms && cfg.bucket_key.is_some() {
            return Err(ConfigError::Invalid {
                name: "bucket_key".into(),
                reason: "bucket_key only applies to mode=sse-kms".into(),
            });
        }
        if cfg.mode != EncryptionMode::CseKms && cfg.kms_endpoint.is_some() {
            return Err(ConfigError::Invalid {
                name: "kms_endpoint".into(),
                reason: "kms_endpoint only applies to mode=cse-kms (in sse-kms the S3 service calls KMS)".into(),
            });
        }
        if cfg.mode == EncryptionMode::CseKms && cfg.kms_key_id.is_none() && !cfg.read_only {
            return Err(ConfigError::Invalid {
                name: "kms_key_id".into(),
                reason: "mode=cse-kms needs the KMS key that makes each object's data key: add -o kms_key_id=ID, \
                         ARN or alias/NAME (or mount with ro to only read)"
                    .into(),
            });
        }
        if cfg.cache.disk_bytes.is_some() && cfg.cache.disk_dir.is_none() {
            return Err(ConfigError::Invalid {
                name: "cache_disk_size".into(),
                reason: "cache_disk_size bounds the disk cache, which needs cache_dir=DIR".into(),
            });
        }
        if cfg.cache.scratch_bytes.is_some() && cfg.cache.disk_dir.is_some() {
            return Err(ConfigError::Invalid {
                name: "scratch_size".into(),
                reason: "scratch_size bounds the scratch of a mount without cache_dir; with cache_dir the disk cache \
                         takes what the scratch would (bound it with cache_disk_size)"
                    .into(),
            });
        }
        if cfg.cache.disk_dir.is_some() && cfg.mode == EncryptionMode::CseKms && cfg.kms_key_id.is_none() {
            return Err(ConfigError::Invalid {
                name: "cache_dir".into(),
                reason: "in mode=cse-kms the disk cache's own key is made by the KMS key: add -o kms_key_id=ID".into(),
            });
        }
        // The key travels in a header of every request; AWS refuses that over plain http, local servers do not, so
        // the rule is enforced here (the store repeats it for endpoints that come from the environment).
        if cfg.mode == EncryptionMode::SseC && cfg.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
            return Err(ConfigError::Invalid {
                name: "endpoint".into(),
                reason: "mode=sse-c sends the key with every request, so it needs an https:// endpoint \
                         (AWS refuses SSE-C over plain http)"
                    .into(),
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(opts: &str) -> Result<MountConfig, ConfigError> {
        MountConfig::from_options("file:///tmp/x".into(), "/mnt".into(), true, &split_options(opts))
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999999T"), None);
    }

    #[test]
    fn parses_the_documented_options() {
        let c = cfg("mode=cse-c,key_file=/k,endpoint=https://h:1,region=eu-west-1,ca_file=/ca.pem,allow_other,ro,uid=7,gid=8,umask=027,cache_size=64M").unwrap();
        assert_eq!(c.mode, EncryptionMode::CseC);
        assert_eq!(c.key_source, Some(KeySource::File("/k".into())));
        assert_eq!(c.endpoint.as_deref(), Some("https://h:1"));
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert!(c.allow_other && c.read_only);
        assert_eq!((c.uid, c.gid, c.umask), (7, 8, 0o027));
        assert_eq!(c.cache.memory_bytes, 64 << 20);
        assert_eq!(c.cache.max_memory(), (64 << 20) + DEFAULT_MEMORY_BEYOND_CACHE, "default: cache_size + 256M");
        assert_eq!(cfg("mode=none,max_memory=96M").unwrap().cache.max_memory(), 96 << 20);
        let c = cfg("mode=none,cache_dir=/var/cache/s3,cache_disk_size=20G").unwrap();
        let want = (Some(std::path::Path::new("/var/cache/s3")), Some(20 << 30));
        assert_eq!((c.cache.disk_dir.as_deref(), c.cache.disk_bytes), want);
        assert_eq!(cfg("mode=none").unwrap().cache.disk_dir, None, "no disk cache unless asked");
        assert_eq!(cfg("mode=none").unwrap().cache.scratch_bytes, None, "the scratch's default limit");
        assert_eq!(cfg("mode=none,scratch_size=0").unwrap().cache.scratch_bytes, Some(0));
        assert_eq!(cfg("mode=none,scratch_size=2G").unwrap().cache.scratch_bytes, Some(2 << 30));
    }

    #[test]
    fn disk_cache_options_are_checked() {
        for (opts, says) in [
            ("mode=none,cache_dir=rel/dir", "absolute"),
            ("mode=none,cache_dir=/c,cache_disk_size=lots", "cache_disk_size"),
            ("mode=none,cache_dir=/c,cache_disk_size=100K", "at least 1M"),
            ("mode=none,cache_disk_size=1G", "needs cache_dir"),
            ("mode=cse-kms,ro,cache_dir=/c", "kms_key_id"),
            ("mode=none,scratch_size=lots", "scratch_size"),
            ("mode=none,scratch_size=100K", "at least 1M"),
            ("mode=none,cache_dir=/c,scratch_size=1G", "with cache_dir"),
        ] {
            let e = cfg(opts).unwrap_err().to_string();
            assert!(e.contains(says), "{opts}: {e}");
        }
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(cfg("mode=none,bogus=1").unwrap_err(), ConfigError::UnknownOption("bogus".into()));
        assert!(cfg("mode=none,umask=99").unwrap_err().to_string().contains("umask"));
        assert!(cfg("mode=none,cache_size=lots").unwrap_err().to_string().contains("cache_size"));
        assert!(cfg("mode=none,max_memory=lots").unwrap_err().to_string().contains("max_memory"));
        assert!(cfg("mode=none,max_memory=16M").unwrap_err().to_string().contains("at least 64M"));
        assert_eq!(cfg("mode=none,uid").unwrap_err(), ConfigError::MissingValue { name: "uid".into() });
        assert_eq!(cfg("mode=none,ro=1").unwrap_err(), ConfigError::UnexpectedValue { name: "ro".into() });
        assert_eq!(cfg("mode=none,key=abc").unwrap_err(), ConfigError::RawKeyRefused);
        assert_eq!(cfg("mode=cse-c").unwrap_err(), ConfigError::KeyRequired("cse-c"));
        assert_eq!(cfg("mode=sse-c").unwrap_err(), ConfigError::KeyRequired("sse-c"));
        assert!(cfg("mode=sse-x,key_file=/k").unwrap_err().to_string().contains("sse-x"));
    }

    /// Regression (issue 10.7a): `log_level=warning` or `=loud` used to be accepted and silenced every message.
    #[test]
    fn log_level_takes_only_levels() {
        assert_eq!(cfg("mode=none,log_level=debug").unwrap().log_level.as_deref(), Some("debug"));
        assert_eq!(cfg("mode=none,log_level=warning").unwrap().log_level.as_deref(), Some("warn"));
        assert_eq!(cfg("mode=none,log_level=INFO").unwrap().log_level.as_deref(), Some("info"));
        for bad in ["loud", "s3cryptfs=debug", "off"] {
            let err = cfg(&format!("mode=none,log_level={bad}")).unwrap_err().to_string();
            assert!(err.contains("log_level") && err.contains(LOG_LEVELS), "{bad}: {err}");
        }
    }

    #[test]
    fn each_mode_takes_only_its_own_key_options() {
        assert!(cfg("mode=sse-kms,kms_key_id=k,bucket_key=true").is_ok());
        assert!(cfg("mode=cse-kms,kms_key_id=alias/data,kms_endpoint=https://kms.example").is_ok());
        // cse-kms reads cse-c objects too when it is also given a key file.
        assert!(cfg("mode=cse-kms,kms_key_id=k,key_file=/k").is_ok());
        assert!(cfg("mode=cse-kms,ro").is_ok(), "a read-only mount needs no key for new objects");
        let err = cfg("mode=cse-kms").unwrap_err().to_string();
        assert!(err.contains("kms_key_id"), "{err}");
        assert!(cfg("mode=cse-c,key_file=/k,kms_key_id=k").unwrap_err().to_string().contains("kms_key_id"));
        assert!(cfg("mode=cse-kms,kms_key_id=k,bucket_key=true").unwrap_err().to_string().contains("bucket_key"));
        assert!(!cfg("mode=cse-c,key_file=/k").unwrap().require_commitment, "V2 S3EC objects are read by default");
        {
            use crate::crypto::s3ec::WriteFormat;
            assert_eq!(cfg("mode=cse-c,key_file=/k").unwrap().format, FileFormat::Own);
            assert_eq!(cfg("mode=cse-c,key_file=/k,format=own").unwrap().format, FileFormat::Own);
            assert_eq!(cfg("mode=cse-c,key_file=/k,format=s3ec").unwrap().format, FileFormat::S3ec(WriteFormat::V3));
            assert_eq!(
                cfg("mode=cse-kms,kms_key_id=k,s3ec_version=2,format=s3ec").unwrap().format,
                FileFormat::S3ec(WriteFormat::V2)
            );
            assert_eq!(
                cfg("mode=cse-kms,kms_key_id=k,format=s3ec,s3ec_version=3,require_commitment").unwrap().format,
                FileFormat::S3ec(WriteFormat::V3)
            );
            for (opts, names) in [
                ("mode=none,format=s3ec", ["format", "cse-c"]),
                ("mode=sse-s3,format=s3ec", ["format", "sse-s3"]),
                ("mode=cse-c,key_file=/k,s3ec_version=3", ["s3ec_version", "format=s3ec"]),
                ("mode=cse-c,key_file=/k,format=s3ec,s3ec_version=1", ["s3ec_version", "'1'"]),
                ("mode=cse-c,key_file=/k,format=gcm", ["format", "'gcm'"]),
                ("mode=cse-c,key_file=/k,format=s3ec,s3ec_version=2,require_commitment", ["s3ec_version", "require_commitment"]),
            ] {
                let err = cfg(opts).unwrap_err().to_string();
                assert!(names.iter().all(|n| err.contains(n)), "{opts}: {err}");
            }
        }
        assert!(cfg("mode=cse-c,key_file=/k,require_commitment").unwrap().require_commitment);
        assert!(cfg("mode=cse-kms,kms_key_id=k,require_commitment=true").unwrap().require_commitment);
        assert!(!cfg("mode=cse-kms,kms_key_id=k,require_commitment=false").unwrap().require_commitment);
        for other in ["mode=none", "mode=sse-s3", "mode=sse-kms"] {
            let err = cfg(&format!("{other},require_commitment")).unwrap_err().to_string();
            assert!(err.contains("require_commitment") && err.contains("cse-c"), "{err}");
        }
        assert!(cfg("mode=sse-kms,kms_endpoint=https://k").unwrap_err().to_string().contains("kms_endpoint"));
        assert!(cfg("mode=cse-kms,kms_key_id=k,kms_endpoint=kms.local").is_err());
    }

    #[test]
    fn sse_c_refuses_plain_http() {
        let err = cfg("mode=sse-c,key_file=/k,endpoint=http://127.0.0.1:9000").unwrap_err().to_string();
        assert!(err.contains("https://"), "{err}");
        assert!(cfg("mode=sse-c,key_file=/k,endpoint=https://127.0.0.1:9000").is_ok());
        assert_eq!(cfg("mode=sse_c,key_file=/k").unwrap().mode, EncryptionMode::SseC);
    }

    #[test]
    fn every_key_source_parses_and_only_one_is_allowed() {
        assert_eq!(cfg("key_fd=3").unwrap().key_source, Some(KeySource::Fd(3)));
        assert_eq!(cfg("key_env=S3CF_KEY").unwrap().key_source, Some(KeySource::Env("S3CF_KEY".into())));
        assert_eq!(cfg("key_credential=data").unwrap().key_source, Some(KeySource::Credential("data".into())));
        assert_eq!(
            cfg("agent,key_name=work").unwrap().key_source,
            Some(KeySource::Agent { socket: None, name: "work".into() })
        );
        assert_eq!(
            cfg("agent=/run/a.sock,key_name=work").unwrap().key_source,
            Some(KeySource::Agent { socket: Some("/run/a.sock".into()), name: "work".into() })
        );
        assert!(matches!(cfg("key_file=/k,key_env=X"), Err(ConfigError::TwoKeySources(..))));
        assert!(cfg("key_fd=-1").unwrap_err().to_string().contains("key_fd"));
        assert!(cfg("key_credential=../x").unwrap_err().to_string().contains("credential name"));
        assert!(cfg("agent").unwrap_err().to_string().contains("key_name"));
        assert!(cfg("key_name=x").unwrap_err().to_string().contains("agent"));
        // The same source twice (fstab plus a flag) is fine.
        assert!(cfg("key_file=/k,key_file=/k").is_ok());
    }

    #[test]
    fn rsa_key_file_is_for_the_client_side_modes_only() {
        assert_eq!(cfg("mode=cse-c,key_file=/k,rsa_key_file=/r.pem").unwrap().rsa_key_file, Some("/r.pem".into()));
        assert_eq!(cfg("mode=cse-kms,ro,rsa_key_file=/r.pem").unwrap().rsa_key_file, Some("/r.pem".into()));
        assert_eq!(cfg("mode=cse-c,key_file=/k").unwrap().rsa_key_file, None);
        // It is no customer key: cse-c still needs one.
        assert_eq!(cfg("mode=cse-c,rsa_key_file=/r.pem").unwrap_err(), ConfigError::KeyRequired("cse-c"));
        for other in ["mode=none", "mode=sse-s3", "mode=sse-kms", "mode=sse-c,key_file=/k"] {
            let err = cfg(&format!("{other},rsa_key_file=/r.pem")).unwrap_err().to_string();
            assert!(err.contains("rsa_key_file") && err.contains("cse-c") && !err.contains('\n'), "{err}");
        }
        assert_eq!(cfg("mode=cse-c,key_file=/k,rsa_key_file").unwrap_err(), ConfigError::MissingValue { name: "rsa_key_file".into() });
    }

    #[test]
    fn store_timeout_is_a_positive_number_of_seconds() {
        assert_eq!(cfg("mode=none").unwrap().store_timeout, DEFAULT_STORE_TIMEOUT);
        assert_eq!(cfg("mode=none,timeout=3").unwrap().store_timeout, Duration::from_secs(3));
        assert_eq!(cfg("mode=none,timeout=0.5").unwrap().store_timeout, Duration::from_millis(500));
        for bad in ["0", "-1", "abc", "inf", "NaN", "1e9", ""] {
            let err = cfg(&format!("mode=none,timeout={bad}")).unwrap_err().to_string();
            assert!(err.contains("timeout") && err.contains("positive number of seconds"), "{bad}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        assert_eq!(cfg("mode=none,timeout").unwrap_err(), ConfigError::MissingValue { name: "timeout".into() });
    }

    #[test]
    fn metrics_address_is_checked() {
        assert_eq!(cfg("mode=none,metrics_addr=127.0.0.1:9464").unwrap().metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(cfg("mode=none,metrics_addr=localhost").unwrap_err().to_string().contains("metrics_addr"));
    }

    #[test]
    fn raw_key_error_never_echoes_the_key() {
        let msg = cfg("mode=none,key=SECRETSECRET").unwrap_err().to_string();
        assert!(!msg.contains("SECRETSECRET"));
    }

    #[test]
    fn mount_helper_options_are_accepted() {
        assert!(cfg("mode=none,_netdev,nofail,x-systemd.automount,noatime").is_ok());
    }
}
