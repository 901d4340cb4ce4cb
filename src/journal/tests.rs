//! The journal on its own: takeover, liveness by lock, forged records, orphans.

use super::*;
use crate::crypto::Key256;

const STORE: &str = "file:///srv/objects";

fn customer() -> Keying {
    Keying::Customer(Arc::new(KeyHistory::single(Key256::from_bytes(&[9; 32]))))
}

fn record(path: &str, file_id: &[u8; FILE_ID_LEN]) -> Record {
    Record {
        path: path.into(),
        mode: 0o100640,
        uid: 1,
        gid: 2,
        mtime: (3, 4),
        base: BaseVersion::Absent,
        upload_id: new_upload_id(),
        prior_ids: Vec::new(),
        file_id: hex(file_id),
        written_at: (5, 6),
        multipart: None,
    }
}

async fn journal(base: &Path, keying: Keying) -> Journal {
    Journal::open(base, STORE, keying, AeadBackend::AwsLc).await.unwrap()
}

fn read_all(f: &StagedFile) -> Vec<u8> {
    let n = f.plain_len().unwrap();
    let mut buf = vec![0u8; n as usize];
    f.read_exact_at(&mut buf, 0, n).unwrap();
    buf
}

#[tokio::test]
async fn a_dead_runs_records_are_taken_over_and_a_live_ones_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let (n, f, id) = a.new_file().unwrap();
    f.write_at(0, b"hello journal", 0).unwrap();
    let rec = record("dir/file", &id);
    a.save_record(n, &rec).unwrap();
    // An orphan: staged data with no record (fsynced and uploaded, or unlinked).
    let (_m, g, _) = a.new_file().unwrap();
    g.write_at(0, b"orphan", 0).unwrap();

    let b = journal(&base, customer()).await;
    assert!(b.take_over().await.is_empty(), "a live daemon's journal is never taken over");

    let a_run = a.run_path().to_path_buf();
    drop(a); // the lock goes with the process (here: with the open file)
    let left = b.take_over().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].record, rec);
    assert_eq!(read_all(&left[0].file), b"hello journal");
    assert!(!a_run.join("1.dat").exists(), "the orphan is removed");
    // Not done: the next start sees it again.
    drop(left);
    let again = b.take_over().await;
    assert_eq!(again.len(), 1);
    for l in again {
        l.done();
    }
    assert!(!a_run.exists(), "an emptied run directory goes");
    assert!(b.take_over().await.is_empty());
}

#[tokio::test]
async fn staged_content_is_sealed_under_a_customer_key_and_plain_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = b"PLAINTEXT-MARKER-OF-A-TEST";
    for (keying, sealed) in [(customer(), true), (Keying::Local, false)] {
        let j = journal(&tmp.path().join(format!("j{sealed}")), keying).await;
        let (n, f, id) = j.new_file().unwrap();
        f.write_at(0, marker, 0).unwrap();
        j.save_record(n, &record("secret-name", &id)).unwrap();
        let disk = std::fs::read(j.file_path(n)).unwrap();
        assert_eq!(disk.windows(marker.len()).any(|w| w == marker), !sealed);
        let rec = std::fs::read(j.run_path().join(format!("{n}.rec"))).unwrap();
        assert!(!rec.windows(11).any(|w| w == b"secret-name"), "records are sealed in every mode");
    }
}

#[tokio::test]
async fn forged_and_moved_records_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let (n, f, id) = a.new_file().unwrap();
    f.write_at(0, b"one", 0).unwrap();
    a.save_record(n, &record("one", &id)).unwrap();
    let (m, g, id2) = a.new_file().unwrap();
    g.write_at(0, b"two", 0).unwrap();
    a.save_record(m, &record("two", &id2)).unwrap();
    let run = a.run_path().to_path_buf();
    drop(a);
    // Record 0 replaced by record 1's bytes (a swap), a planted plain JSON record, and a planted run directory with a
    // header of its own.
    std::fs::copy(run.join("1.rec"), run.join("0.rec")).unwrap();
    std::fs::write(run.join("7.rec"), serde_json::to_vec(&record("planted", &id)).unwrap()).unwrap();
    std::fs::write(run.join("7.dat"), b"planted").unwrap();
    let fake = run.parent().unwrap().join("00112233445566778899aabbccddeeff");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("journal"), std::fs::read(run.join("journal")).unwrap()).unwrap();
    std::fs::copy(run.join("1.rec"), fake.join("0.rec")).unwrap();
    std::fs::copy(run.join("1.dat"), fake.join("0.dat")).unwrap();

    let b = journal(&base, customer()).await;
    let left = b.take_over().await;
    let paths: Vec<_> = left.iter().map(|l| l.record.path.clone()).collect();
    assert_eq!(paths, vec!["two".to_string()], "only the authentic record at its own name");
    assert!(run.join("0.rec").exists() && run.join("7.rec").exists(), "refused records are left for inspection");
}

#[tokio::test]
async fn another_key_leaves_the_journal_for_a_mount_that_has_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let (n, f, id) = a.new_file().unwrap();
    f.write_at(0, b"x", 0).unwrap();
    a.save_record(n, &record("x", &id)).unwrap();
    drop(a);
    let other = Keying::Customer(Arc::new(KeyHistory::single(Key256::from_bytes(&[1; 32]))));
    let b = journal(&base, other).await;
    assert!(b.take_over().await.is_empty());
    drop(b);
    let plain = journal(&base, Keying::Local).await;
    assert!(plain.take_over().await.is_empty());
    drop(plain);
    let c = journal(&base, customer()).await;
    assert_eq!(c.take_over().await.len(), 1, "still there for the right key");
}

#[tokio::test]
async fn a_base_owned_by_another_user_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (to give a directory to another uid); scripts/test.sh runs as root");
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    std::fs::create_dir(&base).unwrap();
    std::os::unix::fs::chown(&base, Some(65534), Some(65534)).unwrap();
    let err = Journal::open(&base, STORE, Keying::Local, AeadBackend::AwsLc).await.unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
}

/// Issue 11 (unmount ordering): a run whose mount has ended but which is still uploading is waited for, then taken
/// over; a run that serves is skipped at once.
#[tokio::test]
async fn a_finishing_run_is_waited_for_and_a_serving_one_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let (n, f, id) = a.new_file().unwrap();
    f.write_at(0, b"left by a finishing run", 0).unwrap();
    a.save_record(n, &record("finishing", &id)).unwrap();

    // Serving: skipped without waiting.
    let b = journal(&base, customer()).await;
    let started = std::time::Instant::now();
    assert!(b.take_over().await.is_empty());
    assert!(started.elapsed() < std::time::Duration::from_secs(1));

    // Finishing: the start waits until the run's daemon is gone, then takes over what it left.
    a.stop_serving();
    let exit = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        drop(a); // the daemon exits with its record still there (its final upload failed)
    });
    let started = std::time::Instant::now();
    let found = b.take_over().await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(400), "did not wait for the finishing run");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].record.path, "finishing");
    assert_eq!(read_all(&found[0].file), b"left by a finishing run");
    exit.await.unwrap();
}

/// The longest path the local store lets the mount create (`store::LOCAL_MAX_PATH_LEN`) still fits in a record that
/// is read back, even when JSON doubles every byte of it (`"` becomes `\"`): otherwise a crash would lose the staged
/// writes of such a file.
#[tokio::test]
async fn a_record_of_the_longest_path_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    for keying in [customer(), Keying::Local] {
        let a = journal(&base, keying.clone()).await;
        let (n, f, id) = a.new_file().unwrap();
        f.write_at(0, b"deep", 0).unwrap();
        let rec = record(&"\"".repeat(crate::store::LOCAL_MAX_PATH_LEN), &id);
        a.save_record(n, &rec).unwrap();
        drop(a);
        let b = journal(&base, keying).await;
        let left = b.take_over().await;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].record, rec);
        for l in left {
            l.done();
        }
    }
}

/// A key file a start was writing when it died (`journal.key.XXXX`) is removed by a later start once it is older
/// than a minute; a young one (a concurrent start's) is left alone.
#[tokio::test]
async fn a_dead_starts_half_written_key_file_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, Keying::Local).await;
    let store_dir = a.run_path().parent().unwrap().to_path_buf();
    let old = store_dir.join("journal.key.deadbeef");
    let young = store_dir.join("journal.key.0badcafe");
    for p in [&old, &young] {
        std::fs::write(p, [0u8; 7]).unwrap();
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(past).unwrap();
    assert!(a.take_over().await.is_empty());
    assert!(!old.exists(), "a stale half-written key file stays");
    assert!(young.exists(), "a concurrent start's key file was removed");
}

fn intent(p: &str) -> DeleteIntent {
    DeleteIntent { path: p.into(), etag: "\"e\"".into() }
}

/// The delete intent log segments of a run directory, by name.
fn segments(run: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".dlog"))
        .collect();
    out.sort();
    out
}

/// One entry of a segment, as docs/FORMAT.md lays it out.
fn log_entry(n: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Delete intents (write-behind deletes, appended to `<s>.dlog`) are obeyed only when authentic and under their own
/// number: a plain JSON intent planted by someone who can write the journal, a record's sealed bytes entered as an
/// intent, and an intent renumbered are refused and left; the authentic one is handed over once, and once settled
/// no later start sees it again.
#[tokio::test]
async fn only_authentic_delete_intents_are_handed_over() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    a.save_delete(&intent("real")).unwrap();
    let m = a.save_delete(&intent("moved")).unwrap();
    let (r, f, id) = a.new_file().unwrap();
    f.write_at(0, b"x", 0).unwrap();
    a.save_record(r, &record("rec", &id)).unwrap();
    let run = a.run_path().to_path_buf();
    drop(a);
    let [seg] = segments(&run).try_into().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // The second entry (the moved one) starts after the first; renumber it in place.
    let first_len = 12 + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    assert_eq!(u64::from_le_bytes(bytes[first_len..first_len + 8].try_into().unwrap()), m);
    bytes[first_len..first_len + 8].copy_from_slice(&92u64.to_le_bytes());
    bytes.extend(log_entry(90, &serde_json::to_vec(&intent("planted")).unwrap()));
    bytes.extend(log_entry(91, &std::fs::read(run.join(format!("{r}.rec"))).unwrap()));
    std::fs::write(&seg, &bytes).unwrap();

    let b = journal(&base, customer()).await;
    let staged = b.take_over().await;
    assert_eq!(staged.len(), 1, "the staged record is untouched by intents");
    let deletes = b.take_deletes();
    let paths: Vec<_> = deletes.iter().map(|d| d.intent.path.clone()).collect();
    assert_eq!(paths, vec!["real".to_string()], "only the authentic intent under its own number");
    assert!(b.take_deletes().is_empty(), "handed over once");
    for d in deletes {
        d.done();
    }
    drop(staged);
    drop(b);
    let after = std::fs::read(&seg).unwrap();
    assert!(after.starts_with(&bytes), "refused intents are left as they were");
    assert_eq!(crate::journal::pending_intents_on_disk(&run), 3, "the authentic one is marked settled");

    let c = journal(&base, customer()).await;
    assert_eq!(c.take_over().await.len(), 1);
    assert!(c.take_deletes().is_empty(), "a settled intent is not handed over again");
}

/// Intent files (`<n>.del`) that a version before the log left are still obeyed, under the same rules.
#[tokio::test]
async fn intent_files_of_an_older_version_are_still_obeyed() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let seal = |n: u64, i: &DeleteIntent| {
        let plain = serde_json::to_vec(i).unwrap();
        jcrypto::seal_record(&a.key, a.aead, &a.store, &a.run_id, &format!("{n}.del"), &plain)
    };
    let run = a.run_path().to_path_buf();
    std::fs::write(run.join("7.del"), seal(7, &intent("old"))).unwrap();
    std::fs::write(run.join("8.del"), seal(9, &intent("renamed"))).unwrap();
    drop(a);
    let b = journal(&base, customer()).await;
    assert!(b.take_over().await.is_empty());
    let deletes = b.take_deletes();
    assert_eq!(deletes.iter().map(|d| d.intent.path.as_str()).collect::<Vec<_>>(), ["old"]);
    for d in deletes {
        d.done();
    }
    assert!(!run.join("7.del").exists(), "done removes it");
    assert!(run.join("8.del").exists(), "a refused one is left");
}

/// A live run's log: an intent settled is marked (or the segment cut to nothing when it was the last pending), a
/// full segment with pending intents makes way for a new one and goes once they are settled, and a clean close
/// leaves nothing. A dead run's log: what was settled is not handed over, a torn last entry (a kill in the middle of
/// its write) is ignored, and a start that settles only some leaves the rest for the next.
#[tokio::test]
async fn the_log_settles_rotates_and_survives_a_torn_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let run = a.run_path().to_path_buf();
    let n = a.save_delete(&intent("one")).unwrap();
    assert_eq!(crate::journal::pending_intents_on_disk(&run), 1);
    a.remove_delete(n);
    let [seg] = segments(&run).try_into().unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 0, "nothing pending: cut to nothing");

    // Rotation: the first intent stays pending while a megabyte of others comes and goes.
    let kept = a.save_delete(&intent("kept")).unwrap();
    let mut settled = 0;
    while segments(&run).len() < 2 {
        let n = a.save_delete(&intent("churn")).unwrap();
        a.remove_delete(n);
        settled += 1;
        assert!(settled < 100_000, "never rotated");
    }
    assert_eq!(crate::journal::pending_intents_on_disk(&run), 1);
    let later = a.save_delete(&intent("later")).unwrap();
    a.remove_delete(kept);
    assert_eq!(segments(&run).len(), 1, "the full segment goes once nothing in it is pending");
    a.remove_delete(later);
    assert!(a.close(), "a clean close leaves nothing");
    drop(a);
    assert!(!run.exists());

    let a = journal(&base, customer()).await;
    let run = a.run_path().to_path_buf();
    for p in ["x", "y", "z"] {
        a.save_delete(&intent(p)).unwrap();
    }
    let gone = a.save_delete(&intent("settled")).unwrap();
    a.remove_delete(gone);
    drop(a);
    let [seg] = segments(&run).try_into().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &log_entry(99, &[7; 200])[..100]).unwrap();
    drop(f);

    let b = journal(&base, customer()).await;
    assert!(b.take_over().await.is_empty());
    let mut deletes = b.take_deletes();
    assert_eq!(deletes.iter().map(|d| d.intent.path.as_str()).collect::<Vec<_>>(), ["x", "y", "z"]);
    deletes.remove(1).done();
    drop(deletes);
    drop(b);
    let c = journal(&base, customer()).await;
    assert!(c.take_over().await.is_empty());
    let deletes = c.take_deletes();
    assert_eq!(deletes.iter().map(|d| d.intent.path.as_str()).collect::<Vec<_>>(), ["x", "z"]);
    for d in deletes {
        d.done();
    }
    assert!(!seg.exists(), "settled: the segment goes");
    drop(c);
    assert!(!run.exists(), "and with it the run");
}

/// A record keeps the multipart upload of a stream in flight for the start that takes it over, and a record written
/// by a version without that field (its JSON as that version wrote it) still opens, naming none.
#[tokio::test]
async fn a_record_names_its_open_upload_and_an_older_record_still_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("j");
    let a = journal(&base, customer()).await;
    let (n, f, id) = a.new_file().unwrap();
    f.write_at(0, b"streaming", 0).unwrap();
    let mut streaming = record("big", &id);
    streaming.multipart = Some(OpenUpload { key: "big".into(), id: "VXBsb2FkIElE.2~x".into() });
    a.save_record(n, &streaming).unwrap();

    let (m, g, gid) = a.new_file().unwrap();
    g.write_at(0, b"older", 0).unwrap();
    let older = serde_json::json!({
        "path": "old", "mode": 0o100640, "uid": 1, "gid": 2, "mtime": [3, 4], "base": "absent",
        "upload_id": "00112233445566778899aabbccddeeff", "prior_ids": [], "file_id": hex(&gid), "written_at": [5, 6],
    });
    let name = record_name(m);
    let plain = serde_json::to_vec(&older).unwrap();
    a.run.dir.write_file(&name, &jcrypto::seal_record(&a.key, a.aead, &a.store, &a.run_id, &name, &plain)).unwrap();
    // A record without an open upload is written as before the field existed.
    assert!(!String::from_utf8(serde_json::to_vec(&record("x", &gid)).unwrap()).unwrap().contains("multipart"));

    let b = journal(&base, customer()).await;
    drop(a);
    let mut left = b.take_over().await;
    left.sort_by(|x, y| x.record.path.cmp(&y.record.path));
    let paths: Vec<&str> = left.iter().map(|l| l.record.path.as_str()).collect();
    assert_eq!(paths, ["big", "old"]);
    assert_eq!(left[0].record, streaming);
    assert_eq!(left[1].record.multipart, None);
    assert_eq!(left[1].record.upload_id, "00112233445566778899aabbccddeeff");
    assert_eq!(read_all(&left[1].file), b"older");
}

/// Issue 10: the default journal base is private and survives a reboot: /var/lib for root, the XDG state directory
/// (or ~/.local/state) for users; never /tmp or /var/tmp, and never a relative path from the environment.
#[test]
fn the_default_base_is_private_and_persistent() {
    let os = |s: &str| Some(std::ffi::OsString::from(s));
    let passwd = || PathBuf::from("/home/pw");
    let (user, pw) = ("/home/u/.local/state/s3cryptfs/journal", "/home/pw/.local/state/s3cryptfs/journal");
    assert_eq!(super::base_for(0, os("/x"), os("/root"), passwd), PathBuf::from("/var/lib/s3cryptfs/journal"));
    assert_eq!(super::base_for(1000, os("/st"), os("/home/u"), passwd), PathBuf::from("/st/s3cryptfs/journal"));
    assert_eq!(super::base_for(1000, None, os("/home/u"), passwd), PathBuf::from(user));
    assert_eq!(super::base_for(1000, os("rel"), os("/home/u"), passwd), PathBuf::from(user));
    assert_eq!(super::base_for(1000, None, None, passwd), PathBuf::from(pw));
    assert_eq!(super::base_for(1000, None, os("relative"), passwd), PathBuf::from(pw));
    // This process (root in CI, a user elsewhere): never a temporary directory.
    let here = super::default_base();
    assert!(here.is_absolute() && !here.starts_with("/tmp") && !here.starts_with("/var/tmp"), "{}", here.display());
}
