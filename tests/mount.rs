//! Integration tests through a real FUSE mount, against the local store, the S3 test server and Azurite.
//!
//! Each behaviour is one function taking a store; the `both!` macro runs it on a local directory store, on a fresh
//! bucket of the S3-compatible server and on a fresh prefix of the Azurite container started by scripts/test.sh.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use common::*;

const SIZES: &[usize] = &[0, 1, 65535, 65536, 65537, 3 * 65536 + 5, (9 << 20) + 17];

fn write_read_sizes(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    for (i, &size) in SIZES.iter().enumerate() {
        let data = pattern(size, i as u64);
        fs::write(m.path(&format!("f{size}")), &data).unwrap();
        assert_bytes(fs::read(m.path(&format!("f{size}"))).unwrap(), &data, "m.path(&format!('f{size}'))");
        assert_eq!(fs::metadata(m.path(&format!("f{size}"))).unwrap().len(), size as u64);
    }
    drop(m);
    // What reached the store is encrypted: no 32-byte window of any plaintext appears in any object.
    let raw = store.raw_objects();
    assert!(raw.len() >= SIZES.len());
    for (i, &size) in SIZES.iter().enumerate() {
        if size >= 32 {
            let data = pattern(size, i as u64);
            for (key, bytes) in &raw {
                for probe in [&data[..32], &data[size / 2 - 16..size / 2 + 16]] {
                    assert!(!contains(bytes, probe), "plaintext of f{size} found in stored object {key}");
                }
            }
        }
    }
    // And after a remount everything reads back the same.
    let m = Mount::start(env, store, "cse-c");
    for (i, &size) in SIZES.iter().enumerate() {
        assert_bytes(fs::read(m.path(&format!("f{size}"))).unwrap(), pattern(size, i as u64), "m.path(&format!('f{size}'))");
    }
}
both!(write_read_sizes);

fn plaintext_mode_stores_plaintext(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "none");
    let data = pattern(100_000, 7);
    fs::write(m.path("plain"), &data).unwrap();
    assert_bytes(fs::read(m.path("plain")).unwrap(), &data, "m.path('plain')");
    drop(m);
    let raw = store.raw_objects();
    let (_, bytes) = raw.iter().find(|(k, _)| k.ends_with("plain")).expect("object stored");
    assert_eq!(bytes, &data);
}
both!(plaintext_mode_stores_plaintext);

fn random_write_append_truncate(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    let p = m.path("rw");
    let mut model = pattern(200_000, 1);
    fs::write(&p, &model).unwrap();
    {
        let mut f = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        for (off, len) in [(0usize, 10usize), (65530, 20), (131072, 5), (199_990, 30)] {
            let chunk = pattern(len, off as u64);
            f.seek(SeekFrom::Start(off as u64)).unwrap();
            f.write_all(&chunk).unwrap();
            if model.len() < off + len {
                model.resize(off + len, 0);
            }
            model[off..off + len].copy_from_slice(&chunk);
        }
        // Read through the same handle sees the writes before close.
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_bytes(&back, &model, "read back through the writing handle");
        f.sync_all().unwrap();
    }
    assert_bytes(fs::read(&p).unwrap(), &model, "&p");
    // Append.
    {
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"appended").unwrap();
        model.extend_from_slice(b"appended");
    }
    assert_bytes(fs::read(&p).unwrap(), &model, "&p");
    // Truncate: shrink, grow (zero filled), by path and by handle.
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(70_000).unwrap();
    drop(f);
    model.truncate(70_000);
    assert_bytes(fs::read(&p).unwrap(), &model, "&p");
    let status = std::process::Command::new("truncate").args(["-s", "150000"]).arg(&p).status().unwrap();
    assert!(status.success());
    model.resize(150_000, 0);
    assert_bytes(fs::read(&p).unwrap(), &model, "&p");
    // O_TRUNC overwrite.
    fs::write(&p, b"short").unwrap();
    assert_bytes(fs::read(&p).unwrap(), b"short", "&p");
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    assert_bytes(fs::read(m.path("rw")).unwrap(), b"short", "m.path('rw')");
}
both!(random_write_append_truncate);

fn directories_and_renames(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir(m.path("d/sub")).unwrap();
    fs::create_dir(m.path("empty")).unwrap();
    fs::write(m.path("d/a"), b"A").unwrap();
    fs::write(m.path("d/sub/b"), b"B").unwrap();
    assert_eq!(fs::create_dir(m.path("d")).unwrap_err().raw_os_error(), Some(libc::EEXIST));
    assert_eq!(fs::remove_dir(m.path("d")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    // Rename a file, replacing an existing one.
    fs::write(m.path("d/c"), b"old").unwrap();
    fs::rename(m.path("d/a"), m.path("d/c")).unwrap();
    assert_bytes(fs::read(m.path("d/c")).unwrap(), b"A", "m.path('d/c')");
    assert!(!m.path("d/a").exists());
    // Rename a whole directory tree. Its files were read before (their ETags known): a copy may give a file a new
    // ETag (a multipart object's on S3, any on Azure), which must not make it unreadable under its new name (ESTALE).
    let big = pattern(9 << 20, 7);
    fs::write(m.path("d/big"), &big).unwrap();
    assert_bytes(fs::read(m.path("d/big")).unwrap(), &big, "d/big");
    fs::rename(m.path("d"), m.path("moved")).unwrap();
    assert!(!m.path("d").exists());
    assert_bytes(fs::read(m.path("moved/c")).unwrap(), b"A", "m.path('moved/c')");
    assert_bytes(fs::read(m.path("moved/big")).unwrap(), &big, "moved/big");
    assert_bytes(fs::read(m.path("moved/sub/b")).unwrap(), b"B", "m.path('moved/sub/b')");
    // A directory onto an empty directory replaces it; onto a non-empty one fails.
    fs::create_dir(m.path("full")).unwrap();
    fs::write(m.path("full/x"), b"x").unwrap();
    assert_eq!(fs::rename(m.path("moved"), m.path("full")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    fs::rename(m.path("moved"), m.path("empty")).unwrap();
    assert_bytes(fs::read(m.path("empty/sub/b")).unwrap(), b"B", "m.path('empty/sub/b')");
    // File over directory and directory over file.
    assert_eq!(fs::rename(m.path("empty/c"), m.path("full")).unwrap_err().raw_os_error(), Some(libc::EISDIR));
    assert_eq!(fs::rename(m.path("full"), m.path("empty/c")).unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
    // Empty directories persist, and everything survives a remount.
    fs::create_dir(m.path("lonely")).unwrap();
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    assert!(m.path("lonely").is_dir());
    assert_bytes(fs::read(m.path("empty/c")).unwrap(), b"A", "m.path('empty/c')");
    assert_bytes(fs::read(m.path("empty/sub/b")).unwrap(), b"B", "m.path('empty/sub/b')");
    assert!(!m.path("moved").exists());
    let mut names: Vec<String> =
        fs::read_dir(m.path("")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["empty", "full", "lonely"]);
    fs::remove_file(m.path("full/x")).unwrap();
    fs::remove_dir(m.path("full")).unwrap();
    fs::remove_dir(m.path("lonely")).unwrap();
    assert!(!m.path("full").exists());
}
both!(directories_and_renames);

fn metadata_persists(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    fs::write(m.path("f"), b"data").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.path("f"), Some(1234), Some(5678)).unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 123_456_789);
    let f = fs::File::options().write(true).open(m.path("f")).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("f", m.path("link")).unwrap();
    std::os::unix::fs::symlink("../some/where/else", m.path("d/dangling")).unwrap();
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(md.modified().unwrap(), mtime);
    assert_bytes(fs::read(m.path("f")).unwrap(), b"data", "m.path('f')");
    assert_eq!(fs::metadata(m.path("d")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(fs::read_link(m.path("link")).unwrap().to_str(), Some("f"));
    assert_bytes(fs::read(m.path("link")).unwrap(), b"data", "m.path('link')");
    assert_eq!(fs::read_link(m.path("d/dangling")).unwrap().to_str(), Some("../some/where/else"));
    assert!(fs::symlink_metadata(m.path("link")).unwrap().file_type().is_symlink());
    // readdir's d_type (what find -type l uses) says symlink too, on a fresh mount.
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    let kinds: std::collections::BTreeMap<String, bool> = fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), e.file_type().unwrap().is_symlink())
        })
        .collect();
    assert_eq!(kinds.get("link"), Some(&true), "{kinds:?}");
    assert_eq!(kinds.get("f"), Some(&false), "{kinds:?}");
    // Unsupported kinds fail with a clear errno.
    assert_eq!(fs::hard_link(m.path("f"), m.path("hard")).unwrap_err().raw_os_error(), Some(libc::EPERM));
    let (blocks, namemax) = statvfs(&m.dir);
    assert!(blocks > 0);
    assert_eq!(namemax, 255);
}
both!(metadata_persists);

fn statvfs(p: &std::path::Path) -> (u64, u64) {
    let c = std::ffi::CString::new(p.as_os_str().to_str().unwrap()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    (s.f_blocks as u64, s.f_namemax as u64)
}

fn ordinary_tools(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    let src = env.path().join("src");
    fs::create_dir_all(src.join("deep/er")).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("deep/er/f{i}")), pattern(1000 * i + 1, i as u64)).unwrap();
    }
    fs::write(src.join("big"), pattern(3 << 20, 99)).unwrap();
    let expected = sh("find . -type f | sort | xargs sha256sum", &src);
    sh(&format!("cp -r {}/. {}/copy", src.display(), m.dir.display()), env.path());
    let got = sh("find . -type f | sort | xargs sha256sum", &m.path("copy"));
    assert_eq!(got, expected);
    sh("mv copy/deep moved && ls -l moved/er >/dev/null && rm -r moved", &m.dir);
    assert!(!m.path("moved").exists());
    assert!(!m.path("copy/deep").exists());
    let ls = sh("ls -l copy", &m.dir);
    assert!(ls.contains("big"), "{ls}");
}
both!(ordinary_tools);

fn many_entries(env: &Env, store: &Store) {
    // Thousands of entries: three S3 listing pages (1,000 keys each).
    let m = Mount::start(env, store, "none");
    fs::create_dir(m.path("many")).unwrap();
    let n = 2500;
    for i in 0..n {
        fs::write(m.path(&format!("many/{i:05}")), b"").unwrap();
    }
    drop(m);
    let m = Mount::start(env, store, "none");
    let names: std::collections::BTreeSet<String> =
        fs::read_dir(m.path("many")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), n);
    assert!(names.contains("00000") && names.contains(&format!("{:05}", n - 1)));
}
both!(many_entries);

fn wrong_key_and_foreign_objects(env: &Env, store: &Store) {
    let m = Mount::start(env, store, "cse-c");
    fs::write(m.path("secret"), b"top secret content").unwrap();
    drop(m);
    // A different key: the mount refuses to start and says why.
    let other = Env::new();
    let other_key = other.key_file.clone();
    let env2 = Env { tmp: tempfile::tempdir().unwrap(), key_file: other_key };
    let err = match Mount::try_start(&env2, store, "cse-c", &[]) {
        Ok(_) => panic!("mount with the wrong key succeeded"),
        Err(e) => e,
    };
    assert!(err.contains("key"), "unclear error: {err}");
    drop(other);
    // An object not in our format (written by another tool, here through a plaintext mount) lists but reads as EIO.
    let m = Mount::start(env, store, "none");
    fs::write(m.path("foreign"), pattern(70_000, 3)).unwrap();
    drop(m);
    let m = Mount::start(env, store, "cse-c");
    assert!(m.path("foreign").exists());
    let err = fs::read(m.path("foreign")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_bytes(fs::read(m.path("secret")).unwrap(), b"top secret content", "m.path('secret')");
    let log = m.unmount();
    assert!(log.contains("foreign"), "the log names the object: {log}");
}
both!(wrong_key_and_foreign_objects);

#[test]
fn tampered_objects_give_eio_and_a_log_line() {
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    let data = pattern(200_000, 5);
    fs::write(m.path("victim"), &data).unwrap();
    fs::write(m.path("other"), pattern(200_000, 6)).unwrap();
    drop(m);
    let Store::Local { dir } = &store else { unreachable!() };
    let original = fs::read(dir.join("victim")).unwrap();

    let check = |what: &str, bytes: Vec<u8>| {
        store.put_raw("victim", bytes);
        let m = Mount::start(&env, &store, "cse-c");
        let err = fs::read(m.path("victim")).expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{what}");
        let log = m.unmount();
        assert!(log.contains("victim"), "{what}: log does not name the object: {log}");
    };
    let mut flipped = original.clone();
    flipped[512 + 70_000] ^= 1;
    check("bit flip in a chunk", flipped);
    check("truncated at a chunk boundary", original[..512 + 65564].to_vec());
    let mut swapped = original.clone();
    let (a, b) = (512..512 + 65564, 512 + 65564..512 + 2 * 65564);
    let first = original[a.clone()].to_vec();
    swapped[a.clone()].copy_from_slice(&original[b.clone()]);
    swapped[b].copy_from_slice(&first);
    check("two chunks swapped", swapped);
    // Whole object swap: the other file's bytes at this key (its binding names "other").
    check("object swapped", fs::read(dir.join("other")).unwrap());
    // Restored, it reads again: the failures were about the bytes, not the mount.
    store.put_raw("victim", original);
    let m = Mount::start(&env, &store, "cse-c");
    assert_bytes(fs::read(m.path("victim")).unwrap(), &data, "m.path('victim')");
    // A ranged read of an intact chunk of a file whose other chunk is damaged still works, and the damaged one fails.
    drop(m);
    let mut flipped = fs::read(dir.join("victim")).unwrap();
    flipped[512 + 65564 + 100] ^= 0x80;
    store.put_raw("victim", flipped);
    let m = Mount::start(&env, &store, "cse-c");
    let mut f = fs::File::open(m.path("victim")).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact(&mut first).unwrap();
    assert_bytes(&first, &data[..4096], "intact first chunk");
    f.seek(SeekFrom::Start(70_000)).unwrap();
    let mut buf = vec![0u8; 100];
    assert_eq!(f.read(&mut buf).unwrap_err().raw_os_error(), Some(libc::EIO));
}

#[test]
fn the_journal_is_private_sealed_and_emptied() {
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    let marker = b"PLAINTEXT-MARKER-staged-not-yet-uploaded";
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(m.path("x")).unwrap();
    f.write_all(marker).unwrap();
    let journal = env.path().join("staging");
    assert_eq!(fs::metadata(&journal).unwrap().mode() & 0o777, 0o700);
    let files = walkdir(&journal);
    let staged: Vec<_> = files.iter().filter(|p| p.extension().is_some_and(|e| e == "dat")).collect();
    assert_eq!(staged.len(), 1, "{files:?}");
    assert_eq!(fs::metadata(staged[0].parent().unwrap()).unwrap().mode() & 0o777, 0o700);
    for p in &files {
        assert_eq!(fs::metadata(p).unwrap().mode() & 0o077, 0, "{} is private", p.display());
        let bytes = fs::read(p).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker), "plaintext in {}", p.display());
        assert!(!String::from_utf8_lossy(&bytes).contains("\"path\""), "a record in clear: {}", p.display());
    }
    drop(f);
    drop(m);
    let left = walkdir(&journal);
    assert!(left.is_empty(), "journal files left behind after a clean stop: {left:?}");
}

#[test]
fn a_reader_sees_writes_made_through_the_same_mount() {
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    fs::write(m.path("f"), pattern(100_000, 1)).unwrap();
    let mut reader = fs::File::open(m.path("f")).unwrap();
    let new = pattern(150_000, 2);
    fs::write(m.path("f"), &new).unwrap();
    // The kernel may keep the old size for the attribute timeout; read what is there through the old handle.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut got = Vec::new();
    reader.read_to_end(&mut got).unwrap();
    assert_bytes(&got, &new, "read through a handle opened before the overwrite");
}

#[test]
fn a_reader_refuses_a_version_written_by_another_mount() {
    let env = Env::new();
    let store = Store::local(env.path());
    let a = Mount::start(&env, &store, "cse-c");
    let b = Mount::start(&env, &store, "cse-c");
    // Large enough that the chunks read below are far beyond any read-ahead of the first read (cached chunks of
    // the opened version may legitimately still be served).
    let old = pattern(48 << 20, 1);
    fs::write(a.path("f"), &old).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut reader = fs::File::open(a.path("f")).unwrap();
    let mut first = vec![0u8; 1000];
    reader.read_exact(&mut first).unwrap();
    assert_bytes(&first, &old[..1000], "first bytes before the change");
    // Another mount replaces the object: the open handle must not mix versions.
    fs::write(b.path("f"), pattern(400_000, 9)).unwrap();
    reader.seek(SeekFrom::Start(45 << 20)).unwrap();
    let mut buf = vec![0u8; 1000];
    let err = reader.read_exact(&mut buf).expect_err("read of a replaced object must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE));
    drop(reader);
    // Opened again after the attribute timeout, the new version reads in full.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_bytes(fs::read(a.path("f")).unwrap(), pattern(400_000, 9), "reopened");
}

#[test]
fn unlink_during_a_slow_close_does_not_bring_the_file_back() {
    // A large file's close takes a while (encrypt + upload); an rm racing with it must win for good.
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    let path = m.path("big");
    let (about_to_close, closing) = std::sync::mpsc::channel();
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut f = fs::File::create(&path).unwrap();
            for i in 0..64 {
                f.write_all(&pattern(1 << 20, i)).unwrap();
            }
            about_to_close.send(()).unwrap();
            drop(f); // close → encrypt and upload 64 MiB, which takes a while
        })
    };
    closing.recv().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The rm runs while the close is (very likely) still uploading.
    fs::remove_file(&path).unwrap();
    writer.join().unwrap();
    drop(m);
    let m = Mount::start(&env, &store, "cse-c");
    assert!(!m.path("big").exists(), "the unlinked file came back");
}

#[test]
fn https_endpoint_with_a_private_ca() {
    let env = Env::new();
    let store = Store::s3();
    let https = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT")
        .expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT is not set: run the tests with scripts/test.sh");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE is not set");
    let Store::S3 { bucket, .. } = &store else { unreachable!() };
    let https_store = Store::S3 { endpoint: https.clone(), bucket: bucket.clone() };
    // Without the CA the server's certificate is not trusted: the mount refuses to start, and says why.
    let err = match Mount::try_start(&env, &https_store, "cse-c", &[]) {
        Ok(_) => panic!("mount trusted a certificate from an unknown CA"),
        Err(e) => e,
    };
    assert!(err.to_lowercase().contains("certificate") || err.to_lowercase().contains("tls"), "unclear error: {err}");
    // With ca_file it works end to end over TLS.
    let m = Mount::start_with(&env, &https_store, "cse-c", &[&format!("ca_file={ca}")]);
    let data = pattern(200_000, 4);
    fs::write(m.path("tls"), &data).unwrap();
    drop(m);
    let m = Mount::start_with(&env, &https_store, "cse-c", &[&format!("ca_file={ca}")]);
    assert_bytes(fs::read(m.path("tls")).unwrap(), &data, "over https");
}

#[test]
fn writing_a_file_another_mount_just_replaced_starts_from_the_new_version() {
    let env = Env::new();
    let store = Store::local(env.path());
    let a = Mount::start_with(&env, &store, "cse-c", &["attr_timeout=30"]);
    let b = Mount::start(&env, &store, "cse-c");
    fs::write(a.path("f"), b"version one").unwrap();
    assert_bytes(fs::read(a.path("f")).unwrap(), b"version one", "a reads its own write");
    fs::write(b.path("f"), b"version two, longer").unwrap();
    // Mount a still trusts its (30 s) attributes of version one, but the append must extend version two.
    {
        let mut f = fs::OpenOptions::new().append(true).open(a.path("f")).unwrap();
        f.write_all(b" + appended").unwrap();
        f.sync_all().unwrap();
    }
    drop(a);
    // Mount b sees the other mount's change once its attribute timeout (1 s) has passed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_bytes(fs::read(b.path("f")).unwrap(), b"version two, longer + appended", "after the append");
}

/// A forked child that runs another program closes its inherited copy of every descriptor (close-on-exec), and the
/// kernel sends FLUSH for each such close. Those must not upload a half-written file; the writer's own close does.
#[test]
fn a_child_process_closing_inherited_descriptors_does_not_upload_a_half_written_file() {
    use std::io::Write;
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    let stored_len = || store.raw_objects().into_iter().find(|(k, _)| k == "growing").map(|(_, b)| b.len());
    let mut f = fs::File::create(m.path("growing")).unwrap();
    let at_create = stored_len();
    f.write_all(&pattern(100_000, 7)).unwrap();
    let status = std::process::Command::new("true").status().unwrap();
    assert!(status.success());
    assert_eq!(stored_len(), at_create, "a child's exec-time close uploaded the file mid-write");
    f.write_all(b"tail").unwrap();
    drop(f);
    let mut want = pattern(100_000, 7);
    want.extend_from_slice(b"tail");
    assert_eq!(stored_len(), Some(s3cryptfs::crypto::cipher_size(want.len() as u64) as usize), "the writer's close uploads");
    assert_bytes(fs::read(m.path("growing")).unwrap(), &want, "content");
}

/// FUSE names the thread that sent a request; the mount compares processes. A file opened on one thread of a
/// writer and closed on another (the main thread, or a thread that is not) is uploaded by that close, as a close on
/// the opening thread would be. A duplicate of the descriptor stays open meanwhile, so the upload seen is the
/// close's (FLUSH), not the final release's, which comes after close() has returned.
#[test]
fn a_file_opened_on_one_thread_and_closed_on_another_is_uploaded_by_that_close() {
    use std::io::Write;
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    let stored_len = |name: &str| store.raw_objects().into_iter().find(|(k, _)| k == name).map(|(_, b)| b.len());
    let want = pattern(70_000, 3);
    let full = Some(s3cryptfs::crypto::cipher_size(want.len() as u64) as usize);
    // Opened (and written) on a thread that is not the main one, closed on the main thread.
    let (path, data) = (m.path("from_thread"), want.clone());
    let f = std::thread::spawn(move || {
        let mut f = fs::File::create(path).unwrap();
        f.write_all(&data).unwrap();
        f
    })
    .join()
    .unwrap();
    let kept = f.try_clone().unwrap();
    drop(f);
    assert_eq!(stored_len("from_thread"), full, "closed on the main thread, opened on another");
    drop(kept);
    // Opened on the main thread, closed on another thread.
    let mut f = fs::File::create(m.path("to_thread")).unwrap();
    f.write_all(&want).unwrap();
    let kept = f.try_clone().unwrap();
    std::thread::spawn(move || drop(f)).join().unwrap();
    assert_eq!(stored_len("to_thread"), full, "closed on another thread, opened on the main one");
    drop(kept);
    assert_bytes(fs::read(m.path("from_thread")).unwrap(), &want, "content");
    assert_bytes(fs::read(m.path("to_thread")).unwrap(), &want, "content");
}

#[test]
fn inode_numbers_survive_the_kernel_forgetting_them_and_unlinked_open_files_have_no_links() {
    let env = Env::new();
    let store = Store::local(env.path());
    let m = Mount::start(&env, &store, "cse-c");
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/a"), b"x").unwrap();
    fs::write(m.path("b"), b"y").unwrap();
    let before: Vec<u64> = ["d", "d/a", "b"].iter().map(|p| fs::metadata(m.path(p)).unwrap().ino()).collect();
    // Make the kernel forget the inodes (it sends FORGET), so the next stat looks the names up again.
    let forgotten = |m: &Mount| {
        fs::write("/proc/sys/vm/drop_caches", b"2").expect("dropping caches needs root (scripts/test.sh runs as root)");
        std::thread::sleep(std::time::Duration::from_millis(100));
        ["d", "d/a", "b"].iter().map(|p| fs::metadata(m.path(p)).unwrap().ino()).collect::<Vec<u64>>()
    };
    assert_eq!(forgotten(&m), before, "st_ino after the kernel forgot the inodes");
    let text = m.unmount();
    // And across a remount.
    let m = Mount::start(&env, &store, "cse-c");
    assert_eq!(forgotten(&m), before, "st_ino after a remount: {text}");
    // fstat of an open file whose name is gone: no links.
    let f = fs::File::open(m.path("b")).unwrap();
    fs::remove_file(m.path("b")).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    drop(m);
}

#[test]
fn names_whose_s3_key_would_pass_1024_bytes_are_refused_at_once() {
    let env = Env::new();
    let store = Store::s3();
    let m = Mount::start(&env, &store, "cse-c");
    // Directories down to a path of 953 bytes.
    let dirs = ["a".repeat(200), "b".repeat(255), "c".repeat(255), "d".repeat(240)];
    let mut dir = m.dir.clone();
    let mut rel = String::new();
    for d in &dirs {
        dir.push(d);
        rel = if rel.is_empty() { d.clone() } else { format!("{rel}/{d}") };
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir at {} bytes: {e}", rel.len()));
    }
    assert_eq!(rel.len(), 953);
    // A directory whose marker key (`PATH/.s3cryptfs-dir`) would pass the limit: 953 + 1 + 60 + 15 > 1,024.
    let e = fs::create_dir(dir.join("x".repeat(60))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "mkdir: {e}");
    // A file at exactly 1,024 bytes works; at 1,025 create fails at once (not at close, which shells ignore).
    let ok = dir.join("f".repeat(1024 - 953 - 1));
    fs::write(&ok, b"at the limit").unwrap();
    let e = fs::File::create(dir.join("g".repeat(1024 - 953))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "create: {e}");
    let e = std::os::unix::fs::symlink("t", dir.join("s".repeat(1024 - 953))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "symlink: {e}");
    let e = fs::rename(&ok, dir.join("h".repeat(1024 - 953))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "rename: {e}");
    // A directory rename whose own name fits but that would push a file under it past the limit moves nothing.
    let e = fs::rename(m.path(&dirs[0]), m.path(&"a".repeat(250))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "directory rename: {e}");
    assert_bytes(fs::read(&ok).unwrap(), b"at the limit", "still there");
    let text = m.unmount();
    assert!(!text.contains("could not upload"), "{text}");
    let keys: Vec<String> = store.raw_objects().into_iter().map(|(k, _)| k).collect();
    assert!(keys.iter().all(|k| k.len() <= 1024), "{keys:?}");
    assert!(keys.iter().any(|k| k.len() == 1024), "the file at the limit is stored: {keys:?}");
    assert!(keys.iter().all(|k| !k.starts_with(&"a".repeat(250))), "nothing moved: {keys:?}");
}

#[test]
fn fifos_devices_and_sockets_are_created_kept_and_moved_like_files() {
    use std::ffi::CString;
    use std::os::unix::fs::FileTypeExt;
    for (s3, mode) in [(false, "cse-c"), (true, "none"), (true, "cse-c")] {
        let env = Env::new();
        let store = if s3 { Store::s3() } else { Store::local(env.path()) };
        let ctx = format!("{} {mode}", store.url());
        let m = Mount::start(&env, &store, mode);
        let c = |name: &str| CString::new(m.path(name).to_str().unwrap()).unwrap();
        // SAFETY: plain libc calls with valid NUL-terminated paths.
        unsafe {
            assert_eq!(libc::mkfifo(c("fifo").as_ptr(), 0o640), 0, "{ctx}: mkfifo: {}", std::io::Error::last_os_error());
            assert_eq!(libc::mknod(c("null").as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)), 0, "{ctx}: mknod c");
            assert_eq!(libc::mknod(c("loop").as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 9)), 0, "{ctx}: mknod b");
            assert_eq!(libc::mknod(c("plain").as_ptr(), libc::S_IFREG | 0o644, 0), 0, "{ctx}: mknod S_IFREG");
        }
        let sock = std::os::unix::net::UnixListener::bind(m.path("sock")).unwrap_or_else(|e| panic!("{ctx}: bind: {e}"));
        drop(sock);
        let check = |m: &Mount, fifo: &str| {
            let md = |n: &str| fs::symlink_metadata(m.path(n)).unwrap_or_else(|e| panic!("{ctx}: stat {n}: {e}"));
            assert!(md(fifo).file_type().is_fifo(), "{ctx}");
            assert_eq!(md(fifo).mode() & 0o7777, 0o640, "{ctx}");
            assert!(md("null").file_type().is_char_device(), "{ctx}");
            assert_eq!(md("null").rdev(), libc::makedev(1, 3), "{ctx}");
            assert!(md("loop").file_type().is_block_device(), "{ctx}");
            assert_eq!(md("loop").rdev(), libc::makedev(7, 9), "{ctx}");
            assert!(md("plain").file_type().is_file() && md("plain").len() == 0, "{ctx}");
            assert!(md("sock").file_type().is_socket(), "{ctx}");
        };
        check(&m, "fifo");
        // The kernel serves the fifo itself.
        let mut p = fs::OpenOptions::new().read(true).write(true).open(m.path("fifo")).unwrap();
        p.write_all(b"through the pipe").unwrap();
        let mut buf = [0u8; 16];
        p.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"through the pipe");
        drop(p);
        // chmod, chown, rename over another special file, unlink.
        fs::set_permissions(m.path("null"), fs::Permissions::from_mode(0o620)).unwrap();
        std::os::unix::fs::chown(m.path("loop"), Some(12), Some(34)).unwrap();
        fs::rename(m.path("fifo"), m.path("pipe")).unwrap();
        fs::write(m.path("victim"), b"replaced by a fifo").unwrap();
        fs::rename(m.path("pipe"), m.path("victim")).unwrap();
        fs::rename(m.path("victim"), m.path("pipe")).unwrap();
        fs::remove_file(m.path("sock")).unwrap();
        std::os::unix::net::UnixListener::bind(m.path("sock")).unwrap();
        let text = m.unmount();
        // Everything survives a remount.
        let m = Mount::start(&env, &store, mode);
        check(&m, "pipe");
        assert_eq!(fs::symlink_metadata(m.path("null")).unwrap().mode() & 0o7777, 0o620, "{ctx}: {text}");
        let l = fs::symlink_metadata(m.path("loop")).unwrap();
        assert_eq!((l.uid(), l.gid()), (12, 34), "{ctx}");
        let mut names: Vec<String> = fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["loop", "null", "pipe", "plain", "sock"], "{ctx}");
        drop(m);
    }
}

/// Server-side encryption is an S3 feature: mount and rekey refuse those modes on another store in one line that names
/// it, before touching anything.
#[test]
fn server_side_modes_are_refused_off_s3() {
    let env = Env::new();
    let mnt = env.path().join("mnt-sse");
    fs::create_dir_all(&mnt).unwrap();
    let local = Store::local(env.path()).url();
    let cases = [
        ("sse-s3", "az://somecontainer/p"),
        ("sse-kms", "az://somecontainer"),
        ("sse-kms", "gs://somebucket/p"),
        ("sse-s3", local.as_str()),
    ];
    for (mode, url) in cases {
        let out = std::process::Command::new(BIN)
            .args(["mount", "-f", "-o", &format!("mode={mode}"), url])
            .arg(&mnt)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let kind = match &url[..5] {
            "az://" => "Azure Blob Storage",
            "gs://" => "Google Cloud Storage",
            _ => "the local store",
        };
        assert!(!out.status.success(), "{mode} on {url} was accepted");
        let line = format!("mode={mode} is S3 server-side encryption, which {kind} does not offer");
        assert!(err.contains(&line), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let out = std::process::Command::new(BIN)
        .args(["rekey", "-o", &format!("mode=sse-c,key_file={}", env.key_file.display()), "az://somecontainer/p"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("which Azure Blob Storage does not offer"), "{err}");
}
