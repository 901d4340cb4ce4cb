//! The command line, exactly as the user writes it.
//!
//! `-o a=1,b` options (fstab style) and the equivalent `--a 1 --b` long flags end up as one list of `(name, value)`
//! pairs in the order given, which `config::MountConfig::from_options` validates. The raw key is deliberately not a
//! flag: it would be visible to every user in /proc/PID/cmdline.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "s3cryptfs", version, about = "Mount an S3 bucket or a local store as an encrypted directory")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new key file (mode 0600): one line, base64 of 32 random bytes.
    Keygen {
        /// Where to write the key; refuses to overwrite. Without it the key goes to standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Mount STORE (file:///dir, s3://bucket[/prefix], gs://bucket[/prefix], az://container[/prefix]) at MOUNTPOINT.
    Mount(Box<MountArgs>),
    /// Run the key agent (holds named keys in memory, serves them to mounts of the same user over a Unix socket),
    /// or control a running one (`agent lock`, `agent stop`).
    Agent(AgentArgs),
    /// Manage the keys held by the agent: add, list (names and fingerprints only), remove.
    Key(KeyArgs),
    /// Move every object of STORE to the current writing key (the first key of the key file, or kms_key_id=)
    /// without re-encrypting content: cse-c and cse-kms re-wrap each object's data key, sse-c copies each object
    /// server-side from its old key to the new one. Resumable: objects already on the new key are skipped.
    Rekey(RekeyArgs),
    /// Decrypt one file of STORE to standard output (or to --output FILE) without mounting: every byte is
    /// authenticated before it is written; a failure exits with status 1 (with --output nothing is left behind).
    Cat(CatArgs),
    /// List files of STORE under PREFIX without mounting: plaintext names, type and mode, size, mtime and how each
    /// object is encrypted.
    Ls(LsArgs),
    /// Authenticate every object under PREFIX completely (every chunk, the path binding, the envelope) without
    /// mounting, in parallel; a summary of failures by kind (tampered, wrong key, not our format, unreadable).
    /// Exits 1 if any object failed.
    Verify(VerifyArgs),
    /// Unmount DIR and wait until its daemon has uploaded everything still pending (plain `fusermount3 -u` returns
    /// before that). Exits non-zero if the mount is busy or data could not be uploaded (it then stays in the write
    /// journal for the next start).
    Unmount {
        /// The mountpoint.
        dir: PathBuf,
        /// Detach now and let the mount end when its last open file closes; does not wait for uploads.
        #[arg(long, short = 'l')]
        lazy: bool,
        /// Give up waiting after this many seconds (the daemon goes on uploading). Default: wait until it is done.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

/// The `mount.fuse.s3cryptfs` / `mount.s3cryptfs` calling convention of mount(8) and fstab:
/// `SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`, turned into `s3cryptfs mount -o OPTIONS SPEC DIR`.
///
/// `-s` (sloppy), `-n` (no mtab), `-v` (verbose), `-t` and `-N` change nothing here; `-f` (fake) means "do
/// everything but mount", so it returns `None` (nothing to do). The mount goes to the background once it serves, as
/// mount(8) expects of a helper.
pub fn from_mount_helper(args: &[String]) -> Result<Option<Cli>, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options.push(it.next().ok_or("-o needs the options")?.clone()),
            "-t" | "-N" => {
                it.next().ok_or_else(|| format!("{a} needs a value"))?;
            }
            s if s.starts_with("-o") && s.len() > 2 => options.push(s[2..].to_string()),
            s if s.starts_with('-') && s.len() > 1 && s[1..].chars().all(|c| "sfnvwr".contains(c)) => {
                fake |= s.contains('f');
                if s.contains('r') {
                    options.push("ro".into());
                }
            }
            s if s.starts_with('-') => return Err(format!("unknown flag {s} from mount(8)")),
            _ => positional.push(a.clone()),
        }
    }
    let [spec, dir] = positional.as_slice() else {
        return Err("usage: mount.s3cryptfs STORE MOUNTPOINT [-o OPTIONS]".into());
    };
    if fake {
        return Ok(None);
    }
    let mut argv = vec!["s3cryptfs".to_string(), "mount".to_string()];
    for o in options {
        argv.push("-o".into());
        argv.push(o);
    }
    argv.push(spec.clone());
    argv.push(dir.clone());
    Cli::try_parse_from(argv).map(Some).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Socket path (default: $XDG_RUNTIME_DIR/s3cryptfs/agent.sock, or /run/s3cryptfs/agent.sock for root).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Stay in the foreground (logs to stderr).
    #[arg(short = 'f', long)]
    pub foreground: bool,
    #[command(subcommand)]
    pub action: Option<AgentAction>,
}

#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Drop and zeroize every key the agent holds; the agent keeps running.
    Lock,
    /// Stop the agent (its keys are zeroized).
    Stop,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Socket path of the agent (default as for `s3cryptfs agent`).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Add (or replace) key NAME: a key file's content (a key history), read from standard input (no echo on a
    /// terminal) or from --from-file.
    Add {
        name: String,
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// List key names with their fingerprints (never key material).
    List,
    /// Remove key NAME (zeroized in the agent).
    Remove { name: String },
}

#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// Mount-style options naming the mode and keys (mode=, key_file=/key_fd=/key_env=/agent=…, kms_key_id=,
    /// endpoint=, region=, ca_file=, kms_endpoint=, timeout=). May be repeated.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Only count what would be done.
    #[arg(long)]
    pub dry_run: bool,
    /// Objects processed at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    pub store: String,
}

/// What the offline tools (`cat`, `ls`) share with `mount`: the mode and key options.
#[derive(Debug, Args)]
pub struct ToolOptions {
    #[arg(long, value_name = "MODE", help = "Same as -o mode=MODE")]
    pub mode: Option<String>,
    #[arg(long, value_name = "PATH", help = "Same as -o key_file=PATH")]
    pub key_file: Option<String>,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    /// Mount-style options naming the mode, keys and store (mode=, key_file=/key_fd=/key_env=/key_credential=/agent…,
    /// kms_key_id=, kms_endpoint=, endpoint=, region=, ca_file=, rsa_key_file=, timeout=). May be repeated. A value
    /// that is not an option (no `=`, not an option word) names the output file, as --output.
    #[arg(short = 'o', value_name = "OPTS|FILE")]
    pub options: Vec<String>,
    /// Write the file here instead of standard output; it appears only once every byte was authenticated.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub tool: ToolOptions,
    /// The store, as for mount (file:///dir, s3://bucket[/prefix], gs://bucket[/prefix], az://container[/prefix]).
    pub store: String,
    /// The file's path inside the store (as it shows in a mount).
    pub path: String,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Mount-style options naming the mode, keys and store (as for cat). May be repeated.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// List the whole tree under PREFIX.
    #[arg(long, short = 'R')]
    pub recursive: bool,
    /// One JSON object per line (path, type, size, mode, uid, gid, mtime, encryption).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tool: ToolOptions,
    /// The store, as for mount.
    pub store: String,
    /// A directory (or file) inside the store; the root without it.
    pub prefix: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Mount-style options naming the mode, keys and store (as for cat). May be repeated.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Objects read at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Print one JSON summary (counts, failures by kind, each failure) on standard output instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tool: ToolOptions,
    /// The store, as for mount.
    pub store: String,
    /// A directory (or file) inside the store; the whole store without it.
    pub prefix: Option<String>,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Stay in the foreground (logs to stderr); without it the command returns once the mount is ready.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Comma-separated mount options (mode=, key_file=, key_fd=, key_env=, key_credential=, agent[=SOCKET],
    /// key_name=, kms_key_id=, kms_endpoint=, bucket_key=, endpoint=, region=,
    /// ca_file=, allow_other, ro, uid=, gid=, umask=, cache_size=, max_memory=, attr_timeout=, timeout=, staging_dir=,
    /// log_level=, log_file=, require_commitment, rsa_key_file=). May be repeated.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    #[arg(long, value_name = "MODE", help = "Same as -o mode=MODE (cse-c, cse-kms, sse-c, sse-s3, sse-kms or none)")]
    pub mode: Option<String>,
    #[arg(long, value_name = "PATH", help = "Same as -o key_file=PATH")]
    pub key_file: Option<String>,
    #[arg(long, value_name = "N", help = "Same as -o key_fd=N (read the key from this inherited descriptor)")]
    pub key_fd: Option<String>,
    #[arg(long, value_name = "VAR", help = "Same as -o key_env=VAR (read the key from this environment variable)")]
    pub key_env: Option<String>,
    #[arg(long, value_name = "NAME", help = "Same as -o key_credential=NAME ($CREDENTIALS_DIRECTORY/NAME)")]
    pub key_credential: Option<String>,
    #[arg(
        long,
        value_name = "PATH",
        help = "Same as -o rsa_key_file=PATH: RSA private key (PEM) for S3 Encryption Client objects wrapped with \
                RSA-OAEP-SHA1 (modes cse-c, cse-kms)"
    )]
    pub rsa_key_file: Option<String>,
    #[arg(long, value_name = "KEY", help = "Same as -o kms_key_id=KEY (key id, ARN or alias/NAME; modes sse-kms, cse-kms)")]
    pub kms_key_id: Option<String>,
    #[arg(long, value_name = "URL", help = "Same as -o kms_endpoint=URL (mode cse-kms)")]
    pub kms_endpoint: Option<String>,
    #[arg(long, value_name = "BOOL", help = "Same as -o bucket_key=true|false (mode sse-kms)")]
    pub bucket_key: Option<String>,
    #[arg(long, value_name = "URL", help = "Same as -o endpoint=URL")]
    pub endpoint: Option<String>,
    #[arg(long, value_name = "NAME", help = "Same as -o region=NAME")]
    pub region: Option<String>,
    #[arg(long, value_name = "PATH", help = "Same as -o ca_file=PATH")]
    pub ca_file: Option<String>,
    #[arg(long, help = "Same as -o allow_other")]
    pub allow_other: bool,
    #[arg(long, help = "Same as -o ro")]
    pub ro: bool,
    #[arg(
        long,
        help = "Same as -o require_commitment: refuse S3 Encryption Client objects in format V2 (no key commitment)"
    )]
    pub require_commitment: bool,
    #[arg(long, value_name = "ID", help = "Same as -o uid=ID")]
    pub uid: Option<String>,
    #[arg(long, value_name = "ID", help = "Same as -o gid=ID")]
    pub gid: Option<String>,
    #[arg(long, value_name = "OCTAL", help = "Same as -o umask=OCTAL")]
    pub umask: Option<String>,
    #[arg(long, value_name = "SIZE", help = "Same as -o cache_size=SIZE (K/M/G suffixes)")]
    pub cache_size: Option<String>,
    #[arg(long, value_name = "SECONDS", help = "Same as -o attr_timeout=SECONDS")]
    pub attr_timeout: Option<String>,
    #[arg(
        long,
        value_name = "SECONDS",
        help = "Same as -o timeout=SECONDS: longest wait for one store or KMS request, retries included, before the \
                operation fails with EIO (default 30)"
    )]
    pub timeout: Option<String>,
    #[arg(long, value_name = "DIR", help = "Same as -o staging_dir=DIR")]
    pub staging_dir: Option<String>,
    #[arg(long, value_name = "LEVEL", help = "Same as -o log_level=LEVEL (error, warn, info, debug, trace)")]
    pub log_level: Option<String>,
    #[arg(long, value_name = "PATH", help = "Same as -o log_file=PATH")]
    pub log_file: Option<String>,
    #[arg(long, value_name = "ADDR", help = "Same as -o metrics_addr=ADDR (serve Prometheus metrics, e.g. 127.0.0.1:9464)")]
    pub metrics_addr: Option<String>,
    pub store: String,
    pub mountpoint: PathBuf,
}

impl MountArgs {
    /// All options as `(name, value)` pairs: `-o` items first, then long flags.
    pub fn option_pairs(&self) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        for o in &self.options {
            out.extend(crate::config::split_options(o));
        }
        let valued = [
            ("mode", &self.mode),
            ("key_file", &self.key_file),
            ("key_fd", &self.key_fd),
            ("key_env", &self.key_env),
            ("key_credential", &self.key_credential),
            ("rsa_key_file", &self.rsa_key_file),
            ("kms_key_id", &self.kms_key_id),
            ("kms_endpoint", &self.kms_endpoint),
            ("bucket_key", &self.bucket_key),
            ("endpoint", &self.endpoint),
            ("region", &self.region),
            ("ca_file", &self.ca_file),
            ("uid", &self.uid),
            ("gid", &self.gid),
            ("umask", &self.umask),
            ("cache_size", &self.cache_size),
            ("attr_timeout", &self.attr_timeout),
            ("timeout", &self.timeout),
            ("staging_dir", &self.staging_dir),
            ("log_level", &self.log_level),
            ("log_file", &self.log_file),
            ("metrics_addr", &self.metrics_addr),
        ];
        for (name, v) in valued {
            if let Some(v) = v {
                out.push((name.to_string(), Some(v.clone())));
            }
        }
        if self.allow_other {
            out.push(("allow_other".into(), None));
        }
        if self.require_commitment {
            out.push(("require_commitment".into(), None));
        }
        if self.ro {
            out.push(("ro".into(), None));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_flags_merge_in_order() {
        let cli = Cli::try_parse_from([
            "s3cryptfs", "mount", "-f", "-o", "mode=none,ro", "-o", "uid=5", "--cache-size", "1M", "file:///x", "/mnt",
        ])
        .unwrap();
        let Command::Mount(m) = cli.command else { panic!("expected mount") };
        assert!(m.foreground);
        let pairs = m.option_pairs();
        assert_eq!(pairs[0], ("mode".to_string(), Some("none".to_string())));
        assert_eq!(pairs[1], ("ro".to_string(), None));
        assert_eq!(pairs[2], ("uid".to_string(), Some("5".to_string())));
        assert_eq!(pairs[3], ("cache_size".to_string(), Some("1M".to_string())));
    }

    #[test]
    fn mount_helper_arguments_become_a_background_mount() {
        let args: Vec<String> =
            ["s3://b/p", "/mnt/x", "-n", "-o", "rw,_netdev,key_file=/k", "-t", "fuse.s3cryptfs"].map(String::from).into();
        let Some(cli) = from_mount_helper(&args).unwrap() else { panic!("not fake") };
        let Command::Mount(m) = cli.command else { panic!("expected mount") };
        assert!(!m.foreground, "a helper must return once the mount serves");
        assert_eq!((m.store.as_str(), m.mountpoint.to_str().unwrap()), ("s3://b/p", "/mnt/x"));
        assert!(m.option_pairs().contains(&("key_file".to_string(), Some("/k".to_string()))));
        let fake: Vec<String> = ["s3://b", "/mnt/x", "-f"].map(String::from).into();
        assert!(from_mount_helper(&fake).unwrap().is_none());
        let ro: Vec<String> = ["s3://b", "/mnt/x", "-r"].map(String::from).into();
        let Some(Cli { command: Command::Mount(m) }) = from_mount_helper(&ro).unwrap() else { panic!() };
        assert!(m.option_pairs().contains(&("ro".to_string(), None)));
        assert!(from_mount_helper(&["s3://b".to_string()]).is_err());
        assert!(from_mount_helper(&["s3://b", "/m", "--bogus"].map(String::from)).is_err());
    }

    #[test]
    fn the_rsa_key_file_flag_is_the_option() {
        let cli = Cli::try_parse_from(["s3cryptfs", "mount", "--rsa-key-file", "/r.pem", "file:///x", "/mnt"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("expected mount") };
        assert_eq!(m.option_pairs(), [("rsa_key_file".to_string(), Some("/r.pem".to_string()))]);
    }

    #[test]
    fn raw_key_flag_does_not_exist() {
        assert!(Cli::try_parse_from(["s3cryptfs", "mount", "--key", "abc", "file:///x", "/mnt"]).is_err());
    }
}
