//! The offline tools `s3cryptfs cat`, `ls` and `verify` (issue 15) against the local store and the S3 test server:
//! files written through a real mount come out byte-exact without mounting, in cse-c, cse-kms and from the AWS S3
//! Encryption Client; tampered, truncated, swapped and foreign objects are an error with exit status 1, never bytes
//! passed off as the file (with --output nothing is left behind); `ls` shows plaintext names, sizes, modes and how
//! each object is encrypted.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// `s3cryptfs SUBCOMMAND -o OPTS STORE ARGS…` with the mode, the environment's key and the store's options.
fn tool(env: &Env, store: &Store, mode: &str, extra: &[&str], sub: &str, args: &[&str]) -> Output {
    let mut opts = vec![format!("mode={mode}")];
    if mode == "cse-c" && !extra.iter().any(|o| o.starts_with("key_")) {
        opts.push(format!("key_file={}", env.key_file.display()));
    }
    opts.extend(store.extra_options());
    opts.extend(extra.iter().map(|s| s.to_string()));
    Command::new(BIN).arg(sub).args(["-o", &opts.join(",")]).arg(store.url()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> Vec<u8> {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), stderr(&o));
    o.stdout
}

#[track_caller]
fn fails(o: &Output, why: &str) {
    assert_eq!(o.status.code(), Some(1), "expected a failure ({why}); stderr: {}", stderr(o));
    assert!(stderr(o).contains(why), "stderr does not say {why:?}: {}", stderr(o));
}

/// Files of every kind through a mount, then `cat` (stdout, --output, -o FILE) and `ls` (-R, --json) without one.
fn cat_ls_and_verify_read_what_the_mount_wrote(env: &Env, store: &Store) {
    let big = pattern(3 * (1 << 20) + 123, 7);
    {
        let m = Mount::start(env, store, "cse-c");
        std::fs::create_dir(m.path("d")).unwrap();
        std::fs::write(m.path("d/f"), &big).unwrap();
        std::fs::write(m.path("small"), b"hello\n").unwrap();
        std::fs::set_permissions(m.path("small"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(m.path("empty"), b"").unwrap();
        std::os::unix::fs::symlink("d/f", m.path("link")).unwrap();
    }
    assert_bytes(ok(tool(env, store, "cse-c", &[], "cat", &["d/f"])), &big, "cat to stdout");
    assert_eq!(ok(tool(env, store, "cse-c", &[], "cat", &["/small"])), b"hello\n");
    assert_eq!(ok(tool(env, store, "cse-c", &[], "cat", &["empty"])), b"");
    let out = env.path().join("out.bin");
    ok(tool(env, store, "cse-c", &[], "cat", &["d/f", "--output", out.to_str().unwrap()]));
    assert_bytes(std::fs::read(&out).unwrap(), &big, "cat --output");
    let out2 = env.path().join("out2");
    ok(tool(env, store, "cse-c", &[], "cat", &["small", "-o", out2.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out2).unwrap(), b"hello\n", "cat -o FILE");

    fails(&tool(env, store, "cse-c", &[], "cat", &["d"]), "is a directory");
    fails(&tool(env, store, "cse-c", &[], "cat", &["link"]), "symbolic link to d/f");
    fails(&tool(env, store, "cse-c", &[], "cat", &["nope"]), "no such file");

    let text = String::from_utf8(ok(tool(env, store, "cse-c", &[], "ls", &["-R"]))).unwrap();
    let line = |name: &str| {
        let mine =
            |l: &&str| (l.ends_with(&format!(" {name}")) && !l.contains(" -> ")) || l.contains(&format!(" {name} -> "));
        text.lines().find(mine).unwrap_or_else(|| panic!("no line for {name} in:\n{text}"))
    };
    assert!(line("d/f").starts_with("-rw-r--r--") && line("d/f").contains(" 3145851 "), "{text}");
    assert!(line("d/f").contains("cse-c v"), "{text}");
    assert!(line("small").starts_with("-rw-r-----") && line("small").contains(" 6 "), "{text}");
    assert!(line("d").starts_with("d"), "{text}");
    assert!(line("link").starts_with("l") && line("link").ends_with("link -> d/f"), "{text}");
    assert_eq!(text.lines().count(), 5, "{text}");
    // Without -R: the top level only; with a prefix: that directory.
    let top = String::from_utf8(ok(tool(env, store, "cse-c", &[], "ls", &[]))).unwrap();
    assert_eq!(top.lines().count(), 4, "{top}");
    let json = String::from_utf8(ok(tool(env, store, "cse-c", &[], "ls", &["--json", "d"]))).unwrap();
    let entry: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(entry["path"], "d/f");
    assert_eq!(entry["size"], big.len() as u64);
    assert_eq!(entry["mode"], "0644");
    assert_eq!(entry["type"], "file");
    assert!(entry["encryption"].as_str().unwrap().starts_with("cse-c v"), "{json}");
    let o = tool(env, store, "cse-c", &[], "verify", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("4 objects, 3145857 bytes"), "{out}"); // 3 files and a symlink

    // A foreign object (plain bytes put by another client): cat refuses it, ls says so.
    store.put_foreign("foreign", b"not encrypted at all\n");
    let o = tool(env, store, "cse-c", &[], "cat", &["foreign"]);
    fails(&o, "not a valid size for an encrypted object");
    assert!(o.stdout.is_empty());
    let text = String::from_utf8(ok(tool(env, store, "cse-c", &[], "ls", &[]))).unwrap();
    assert!(text.lines().any(|l| l.ends_with(" foreign") && l.contains("not ours")), "{text}");

    // Another key: refused at the start, nothing written.
    let other = env.path().join("other.key");
    assert!(Command::new(BIN).args(["keygen", "--output"]).arg(&other).status().unwrap().success());
    let o = tool(env, store, "cse-c", &[&format!("key_file={}", other.display())], "cat", &["small"]);
    fails(&o, "does not hold the key");
    assert!(o.stdout.is_empty());
}
both!(cat_ls_and_verify_read_what_the_mount_wrote);

/// The local store, whose objects a test can edit in place with their metadata kept.
fn local_with(files: &[(&str, &[u8])]) -> (Env, Store) {
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    for (name, bytes) in files {
        std::fs::write(m.path(name), bytes).unwrap();
    }
    drop(m);
    (env, store)
}

fn edit(store: &Store, key: &str, change: impl FnOnce(&mut Vec<u8>)) {
    let Store::Local { dir } = store else { unreachable!() };
    let mut bytes = std::fs::read(dir.join(key)).unwrap();
    change(&mut bytes);
    store.put_raw(key, bytes);
}

/// No file appears at --output, and no temporary file stays beside it.
#[track_caller]
fn nothing_left(dir: &Path, out: &Path) {
    assert!(!out.exists(), "{} exists after a failed cat", out.display());
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".s3cryptfs-cat-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Every tamper class of the format tests: a flipped byte mid-file, a cut-off last chunk, a dropped middle chunk,
/// two chunks swapped, and another file's object moved over this one (the path binding). stdout gets at most the
/// bytes before the damage, and the exit status and stderr say the output is not the whole file.
#[test]
fn cat_refuses_tampered_objects_and_leaves_no_output_file() {
    const CHUNK: usize = 65536 + 28;
    const HEADER: usize = 512;
    let a = pattern(10 * 65536 + 99, 1);
    let b = pattern(10 * 65536 + 99, 2);
    type Tamper = fn(&mut Vec<u8>);
    let cases: [(&str, Tamper, &str); 6] = [
        // Cut to the length of an empty file (header + an empty last chunk): not an empty file.
        ("emptied", |v| v.truncate(HEADER + 28), "failed authentication"),
        ("flipped", |v| v[HEADER + 5 * CHUNK + 100] ^= 1, "failed authentication"),
        ("cut", |v| v.truncate(v.len() - 120), "not a valid size"),
        ("cut at a chunk boundary", |v| v.truncate(HEADER + 10 * CHUNK), "failed authentication"),
        ("dropped", |v| drop(v.drain(HEADER + 3 * CHUNK..HEADER + 4 * CHUNK)), "failed authentication"),
        (
            "swapped",
            |v| {
                let (x, y) = (HEADER + 2 * CHUNK, HEADER + 6 * CHUNK);
                let first = v[x..x + CHUNK].to_vec();
                let second = v[y..y + CHUNK].to_vec();
                v[x..x + CHUNK].copy_from_slice(&second);
                v[y..y + CHUNK].copy_from_slice(&first);
            },
            "failed authentication",
        ),
    ];
    for (name, tamper, why) in cases {
        let (env, store) = local_with(&[("a", &a)]);
        edit(&store, "a", tamper);
        let o = tool(&env, &store, "cse-c", &[], "cat", &["a"]);
        fails(&o, why);
        assert!(o.stdout.len() < a.len(), "{name}: the whole length came out");
        assert_eq!(&o.stdout[..], &a[..o.stdout.len()], "{name}: bytes before the damage are the file's");
        if !o.stdout.is_empty() {
            assert!(stderr(&o).contains("not the whole file"), "{name}: {}", stderr(&o));
        }
        let out = env.path().join("out");
        fails(&tool(&env, &store, "cse-c", &[], "cat", &["a", "--output", out.to_str().unwrap()]), why);
        nothing_left(env.path(), &out);
    }
    // Swapped objects: b's object (with its metadata) moved over a's name.
    let (env, store) = local_with(&[("a", &a), ("b", &b)]);
    let Store::Local { dir } = &store else { unreachable!() };
    std::fs::rename(dir.join("b"), dir.join("a")).unwrap();
    let o = tool(&env, &store, "cse-c", &[], "cat", &["a"]);
    assert_eq!(o.status.code(), Some(1), "b's object under a's name was read: {}", stderr(&o));
    assert!(o.stdout.is_empty(), "bytes of a moved object came out");
}

/// cse-kms (LocalStack's KMS) and an object of the AWS S3 Encryption Client (V2, kms+context, written by the
/// official Python client): both come out exact, and ls names their kinds.
#[test]
fn cat_and_ls_read_cse_kms_and_s3ec_objects() {
    let env = Env::new();
    let store = Store::s3();
    let kms = kms_create_key();
    let ep = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE");
    let opts = [format!("kms_key_id={kms}"), format!("kms_endpoint={ep}"), format!("ca_file={ca}")];
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let mine = pattern(2 * (1 << 20) + 5, 3);
    {
        let m = Mount::start_with(&env, &store, "cse-kms", &opts);
        std::fs::write(m.path("mine"), &mine).unwrap();
    }
    let theirs = pattern(700_000, 4);
    let Store::S3 { bucket, .. } = &store else { unreachable!() };
    let src = env.path().join("theirs.src");
    std::fs::write(&src, &theirs).unwrap();
    s3ec_tool_ok(&[
        "put", "--version", "2", "--wrap", "kms", "--kms-key-id", &kms, "--bucket", bucket, "--key", "theirs",
        "--file", src.to_str().unwrap(),
    ]);
    assert_bytes(ok(tool(&env, &store, "cse-kms", &opts, "cat", &["mine"])), &mine, "cse-kms object");
    assert_bytes(ok(tool(&env, &store, "cse-kms", &opts, "cat", &["theirs"])), &theirs, "S3EC V2 object");
    let text = String::from_utf8(ok(tool(&env, &store, "cse-kms", &opts, "ls", &[]))).unwrap();
    let line = |name: &str| text.lines().find(|l| l.ends_with(&format!(" {name}"))).unwrap_or_else(|| panic!("{text}"));
    assert!(line("mine").contains("cse-kms v") && line("mine").contains(&format!(" {} ", mine.len())), "{text}");
    assert!(line("theirs").contains("s3ec") && line("theirs").contains(&format!(" {} ", theirs.len())), "{text}");
}

/// `verify` over a store holding one object of every failure kind among healthy ones: the JSON summary counts each
/// kind, lists exactly the damaged paths, and the exit status is 1; the healthy subtree alone verifies with 0.
#[test]
fn verify_finds_every_tamper_class_and_sorts_failures_by_kind() {
    const CHUNK: usize = 65536 + 28;
    const HEADER: usize = 512;
    let env = Env::new();
    let store = Store::local(env.path());
    let Store::Local { dir } = &store else { unreachable!() };
    // An object under another key, written first by a mount that has only that key.
    let other = env.path().join("other.key");
    assert!(Command::new(BIN).args(["keygen", "--output"]).arg(&other).status().unwrap().success());
    let data = pattern(10 * 65536 + 99, 1);
    {
        let m = Mount::start_with(&env, &store, "cse-c", &[&format!("key_file={}", other.display())]);
        std::fs::write(m.path("otherkey"), &data).unwrap();
    }
    // Everything else with the environment's key first and the other one below it (a rotation in progress).
    let both = env.path().join("both.key");
    let mut lines = std::fs::read(&env.key_file).unwrap();
    lines.extend(std::fs::read(&other).unwrap());
    std::fs::write(&both, lines).unwrap();
    std::fs::set_permissions(&both, std::fs::Permissions::from_mode(0o600)).unwrap();
    let names = [
        "flipped", "cut", "cut-short", "emptied", "dropped", "swapped", "header", "moved", "target", "ok1", "sub/ok2",
        "sub/ok3",
    ];
    {
        let m = Mount::start_with(&env, &store, "cse-c", &[&format!("key_file={}", both.display())]);
        std::fs::create_dir(m.path("sub")).unwrap();
        for (i, name) in names.iter().enumerate() {
            std::fs::write(m.path(name), pattern(data.len(), i as u64)).unwrap();
        }
        std::os::unix::fs::symlink("sub/ok2", m.path("sym")).unwrap();
        std::os::unix::fs::symlink("ok1", m.path("sub/goodsym")).unwrap();
    }
    edit(&store, "flipped", |v| v[HEADER + 5 * CHUNK + 100] ^= 1);
    edit(&store, "cut", |v| v.truncate(HEADER + 10 * CHUNK));
    edit(&store, "cut-short", |v| v.truncate(v.len() - 120)); // a size no object of ours has
    edit(&store, "emptied", |v| v.truncate(HEADER + 28));
    edit(&store, "sym", |v| *v.last_mut().unwrap() ^= 1); // a symlink's target is a sealed body too
    edit(&store, "dropped", |v| drop(v.drain(HEADER + 3 * CHUNK..HEADER + 4 * CHUNK)));
    edit(&store, "swapped", |v| {
        let (x, y) = (HEADER + 2 * CHUNK, HEADER + 6 * CHUNK);
        let first = v[x..x + CHUNK].to_vec();
        let second = v[y..y + CHUNK].to_vec();
        v[x..x + CHUNK].copy_from_slice(&second);
        v[y..y + CHUNK].copy_from_slice(&first);
    });
    edit(&store, "header", |v| v[60] ^= 0x80); // inside the wrapped data key
    std::fs::rename(dir.join("moved"), dir.join("target")).unwrap();
    std::fs::write(dir.join("foreign"), b"plain bytes from another client").unwrap();

    let o = tool(&env, &store, "cse-c", &[], "verify", &["--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let kinds = &summary["failures_by_kind"];
    assert_eq!(kinds["tampered"], 9, "{summary}");
    assert_eq!(kinds["wrong key"], 1, "{summary}");
    assert_eq!(kinds["not our format"], 1, "{summary}");
    assert_eq!(summary["ok"], 4, "{summary}");
    assert_eq!(summary["objects"], 15, "{summary}");
    let failures = summary["failures"].as_array().unwrap();
    let failed: Vec<&str> = failures.iter().map(|f| f["path"].as_str().unwrap()).collect();
    let want = [
        "cut", "cut-short", "dropped", "emptied", "flipped", "foreign", "header", "otherkey", "swapped", "sym",
        "target",
    ];
    assert_eq!(failed, want);
    let kind_of = |p: &str| failures.iter().find(|f| f["path"] == p).unwrap()["kind"].clone();
    assert_eq!(kind_of("otherkey"), "wrong key");
    assert_eq!(kind_of("foreign"), "not our format");
    assert_eq!(kind_of("target"), "tampered");
    assert_eq!(kind_of("cut-short"), "tampered", "a cut object of ours is not a foreign one");

    // Text: one line per failure on stderr, the summary on stdout.
    let o = tool(&env, &store, "cse-c", &[], "verify", &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("15 objects") && out.contains("4 ok, 11 failed"), "{out}");
    assert_eq!(stderr(&o).lines().filter(|l| l.contains(": tampered: ")).count(), 9, "{}", stderr(&o));
    // The healthy subtree, and the key history that opens the other key's object too.
    let o = tool(&env, &store, "cse-c", &[], "verify", &["sub"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("3 objects"), "{out}"); // two files and a symlink
    let o = tool(&env, &store, "cse-c", &[&format!("key_file={}", both.display())], "verify", &["--json", "otherkey"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A large file changed in place holds chunks of two versions and a version map in its metadata (FORMAT.md, format
/// versions 2 and 3). `verify` accepts it as written and refuses each way an editor of the bucket could mix the
/// versions: the older version's chunk spliced back in, the map removed (the chunk sealed by the change then
/// claims the first version), and a map byte changed.
#[test]
fn verify_refuses_a_changed_file_whose_versions_are_mixed_or_whose_map_is_forged() {
    const MIB: usize = 1 << 20;
    const CHUNK: usize = 65536 + 28;
    const HEADER: usize = 512;
    let env = Env::new();
    let store = Store::local(env.path());
    let Store::Local { dir } = &store else { unreachable!() };
    let chunk = 300usize;
    {
        let m = Mount::start(&env, &store, "cse-c");
        std::fs::write(m.path("big"), pattern(40 * MIB, 5)).unwrap();
    }
    let old = std::fs::read(dir.join("big")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let m = Mount::start(&env, &store, "cse-c");
        let f = std::fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
        f.write_all_at(b"new", (chunk * 65536 + 10) as u64).unwrap();
    }
    let new = std::fs::read(dir.join("big")).unwrap();
    assert_eq!(old[..HEADER], new[..HEADER], "changed in place: the same header, so the same data key");
    let meta = get_meta_xattr(&dir.join("big"));
    let map_line = meta.lines().find(|l| l.contains("map=")).unwrap_or_else(|| panic!("no version map: {meta}"));
    let verify = || tool(&env, &store, "cse-c", &[], "verify", &["--json", "big"]);
    let tampered = |what: &str| {
        let o = verify();
        assert_eq!(o.status.code(), Some(1), "{what}: verified: {}", stderr(&o));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["failures_by_kind"]["tampered"], 1, "{what}: {summary}");
    };
    assert!(verify().status.success(), "the changed file as written: {}", stderr(&verify()));

    let at = HEADER + chunk * CHUNK;
    let mut spliced = new.clone();
    spliced[at..at + CHUNK].copy_from_slice(&old[at..at + CHUNK]);
    assert_ne!(spliced, new, "the changed chunk was sealed again");
    store.put_raw("big", spliced);
    tampered("the older version's chunk spliced in");
    store.put_raw("big", new);
    assert!(verify().status.success(), "restored: {}", stderr(&verify()));

    let without: String = meta.lines().filter(|l| *l != map_line).map(|l| format!("{l}\n")).collect();
    set_meta_xattr(&dir.join("big"), &without);
    tampered("the version map removed");

    let (name, value) = map_line.split_once('=').unwrap();
    let mut v = value.as_bytes().to_vec();
    v[20] = if v[20] == b'A' { b'B' } else { b'A' };
    let forged = meta.replace(map_line, &format!("{name}={}", String::from_utf8(v).unwrap()));
    set_meta_xattr(&dir.join("big"), &forged);
    tampered("a byte of the version map changed");
    set_meta_xattr(&dir.join("big"), &meta);
    assert!(verify().status.success(), "restored: {}", stderr(&verify()));
}

/// The local store's metadata of one object (the `user.s3cryptfs.meta` xattr, `name=value` lines).
fn get_meta_xattr(path: &Path) -> String {
    let c = c_path(path);
    let mut buf = vec![0u8; 8192];
    // SAFETY: both pointers are valid for the lengths given; the strings are NUL-terminated.
    let n = unsafe { libc::getxattr(c.as_ptr(), META_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "getxattr: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    String::from_utf8(buf).unwrap()
}

fn set_meta_xattr(path: &Path, text: &str) {
    let c = c_path(path);
    // SAFETY: both pointers are valid for the lengths given; the strings are NUL-terminated.
    let r = unsafe { libc::setxattr(c.as_ptr(), META_XATTR.as_ptr(), text.as_ptr().cast(), text.len(), 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

const META_XATTR: &std::ffi::CStr = c"user.s3cryptfs.meta";

fn c_path(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// The Data Lake form of an Azure URL, `abfss://container@account.dfs.core.windows.net/prefix`, names the same
/// objects as `az://container/prefix` for the account it names (Azurite's `devstoreaccount1` here), and another
/// account is asked for instead of the environment's (Azurite refuses it).
#[test]
fn an_abfss_url_names_the_container_and_its_account() {
    let env = Env::new();
    let store = Store::azure();
    let Store::Azure { container, prefix } = &store else { unreachable!() };
    let data = pattern(300_000, 9);
    {
        let m = Mount::start(&env, &store, "cse-c");
        std::fs::write(m.path("f"), &data).unwrap();
    }
    let cat = |account: &str| {
        let url = format!("abfss://{container}@{account}.dfs.core.windows.net/{prefix}");
        let opts = format!("mode=cse-c,key_file={},timeout=10", env.key_file.display());
        Command::new(BIN).args(["cat", "-o", &opts, &url, "f"]).output().unwrap()
    };
    assert_bytes(ok(cat("devstoreaccount1")), &data, "f through the abfss:// URL");
    let o = cat("otheraccount1");
    assert_eq!(o.status.code(), Some(1), "another account read the file: {}", stderr(&o));
    assert!(o.stdout.is_empty());
}
