//! Conformance tests: one body run against every backend, so the filesystem can rely on the
//! contract in `mod.rs` whichever store is mounted; then each backend's own guarantees.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload};

use super::*;

fn key(s: &str) -> ObjectKey {
    ObjectKey::new(s).unwrap()
}

fn keys(objects: &[ObjectInfo]) -> Vec<&str> {
    objects.iter().map(|o| o.key.as_str()).collect()
}

fn file_meta(tag: &str) -> UserMeta {
    let mut extra = BTreeMap::new();
    extra.insert("s3cryptfs-bind".to_owned(), format!("bind-{tag}"));
    UserMeta {
        mode: Some(0o100644),
        uid: Some(1000),
        gid: Some(1001),
        mtime: Some((1_700_000_000, 987_654_321)),
        extra,
    }
}

fn dir_meta() -> UserMeta {
    UserMeta {
        mode: Some(0o040750),
        uid: Some(7),
        gid: Some(8),
        mtime: Some((1_600_000_000, 1)),
        extra: BTreeMap::new(),
    }
}

/// The behaviour every backend must share.
async fn conformance(b: &dyn Backend) {
    // --- put / get / get_range / head with full metadata
    let m1 = file_meta("one");
    b.put(&key("dir/"), Bytes::new(), &dir_meta())
        .await
        .unwrap();
    let info = b
        .put(&key("dir/file1"), Bytes::from_static(b"hello world"), &m1)
        .await
        .unwrap();
    assert_eq!(info.size, 11);
    assert!(info.etag.is_some());

    let (hinfo, hmeta) = b.head(&key("dir/file1")).await.unwrap();
    assert_eq!(hinfo.size, 11);
    assert_eq!(hinfo.key, key("dir/file1"));
    assert_eq!(
        hinfo.etag, info.etag,
        "head must report the etag put returned"
    );
    assert_eq!(hmeta, m1);

    let (body, ginfo, gmeta) = b.get(&key("dir/file1")).await.unwrap();
    assert_eq!(&body[..], b"hello world");
    assert_eq!(ginfo.size, 11);
    assert_eq!(gmeta, m1);

    let (part, rinfo, rmeta) = b.get_range(&key("dir/file1"), 0..5).await.unwrap();
    assert_eq!(&part[..], b"hello");
    assert_eq!(rinfo.size, 11, "ranged get reports the whole object's size");
    assert_eq!(rmeta, m1);
    let (tail, _, _) = b.get_range(&key("dir/file1"), 6..100).await.unwrap();
    assert_eq!(&tail[..], b"world");
    for past_end in [11..20, 50..60, 3..3] {
        let (empty, i, _) = b
            .get_range(&key("dir/file1"), past_end.clone())
            .await
            .unwrap();
        assert!(empty.is_empty(), "{past_end:?}");
        assert_eq!(i.size, 11);
    }
    let (dm_info, dm_meta) = b.head(&key("dir/")).await.unwrap();
    assert_eq!(dm_info.size, 0);
    assert_eq!(dm_meta, dir_meta());
    let (dm_body, _, _) = b.get(&key("dir/")).await.unwrap();
    assert!(dm_body.is_empty());

    // An empty object is an object, and reading it is fine.
    b.put(&key("dir/empty"), Bytes::new(), &UserMeta::default())
        .await
        .unwrap();
    let (e, ei, em) = b.get_range(&key("dir/empty"), 0..10).await.unwrap();
    assert!(e.is_empty());
    assert_eq!(ei.size, 0);
    assert_eq!(em, UserMeta::default());
    b.delete(&key("dir/empty")).await.unwrap();

    // --- NotFound
    for missing in ["nope", "dir/nope", "nodir/"] {
        let err = b.head(&key(missing)).await.unwrap_err();
        assert!(err.is_not_found(), "{missing}: {err:?}");
    }
    assert!(b.get(&key("nope")).await.unwrap_err().is_not_found());
    assert!(b
        .get_range(&key("nope"), 0..1)
        .await
        .unwrap_err()
        .is_not_found());
    // A file key does not find a marker of the same name, nor the other way round.
    assert!(b.head(&key("dir")).await.unwrap_err().is_not_found());
    assert!(b.head(&key("dir/file1/")).await.unwrap_err().is_not_found());

    // --- listing
    b.put(&key("dir/sub/"), Bytes::new(), &dir_meta())
        .await
        .unwrap();
    b.put(
        &key("dir/sub/deep"),
        Bytes::from_static(b"d"),
        &file_meta("deep"),
    )
    .await
    .unwrap();
    b.put(&key("top"), Bytes::from_static(b"t"), &file_meta("top"))
        .await
        .unwrap();

    let root = b.list("", false).await.unwrap();
    assert_eq!(keys(&root.objects), ["top"]);
    assert_eq!(root.prefixes, [key("dir/")]);

    let dir = b.list("dir/", false).await.unwrap();
    assert_eq!(keys(&dir.objects), ["dir/file1"]);
    assert_eq!(dir.objects[0].size, 11);
    assert_eq!(dir.objects[0].etag, info.etag);
    assert_eq!(dir.prefixes, [key("dir/sub/")]);

    let rec = b.list("dir/", true).await.unwrap();
    assert_eq!(
        keys(&rec.objects),
        ["dir/", "dir/file1", "dir/sub/", "dir/sub/deep"]
    );
    assert!(rec.prefixes.is_empty());
    assert!(rec
        .objects
        .iter()
        .filter(|o| o.key.is_dir_marker())
        .all(|o| o.size == 0));

    let all = b.list("", true).await.unwrap();
    assert_eq!(
        keys(&all.objects),
        ["dir/", "dir/file1", "dir/sub/", "dir/sub/deep", "top"]
    );

    assert_eq!(b.list("nodir/", false).await.unwrap(), Listing::default());
    assert_eq!(b.list("nodir/", true).await.unwrap(), Listing::default());
    assert!(matches!(
        b.list("dir", false).await,
        Err(StoreError::InvalidInput { .. })
    ));
    assert!(matches!(
        b.list("../", false).await,
        Err(StoreError::InvalidInput { .. })
    ));

    // --- copy keeps or replaces metadata
    let m2 = file_meta("two");
    b.copy(&key("dir/file1"), &key("dir/copy1"), None)
        .await
        .unwrap();
    let (c1, _, c1m) = b.get(&key("dir/copy1")).await.unwrap();
    assert_eq!((&c1[..], &c1m), (&b"hello world"[..], &m1));
    b.copy(&key("dir/file1"), &key("dir/copy2"), Some(&m2))
        .await
        .unwrap();
    let (c2, _, c2m) = b.get(&key("dir/copy2")).await.unwrap();
    assert_eq!((&c2[..], &c2m), (&b"hello world"[..], &m2));
    assert_eq!(
        b.head(&key("dir/file1")).await.unwrap().1,
        m1,
        "copy must not touch the source"
    );
    assert!(b
        .copy(&key("nope"), &key("dir/x"), None)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(matches!(
        b.copy(&key("dir/file1"), &key("dir/x/"), None).await,
        Err(StoreError::InvalidInput { .. })
    ));

    // --- rename, with and without new metadata
    b.rename(&key("dir/copy1"), &key("other/moved"), None)
        .await
        .unwrap();
    assert!(b.head(&key("dir/copy1")).await.unwrap_err().is_not_found());
    let (mv, _, mvm) = b.get(&key("other/moved")).await.unwrap();
    assert_eq!((&mv[..], &mvm), (&b"hello world"[..], &m1));
    b.rename(&key("other/moved"), &key("other/moved2"), Some(&m2))
        .await
        .unwrap();
    assert!(b
        .head(&key("other/moved"))
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(b.head(&key("other/moved2")).await.unwrap().1, m2);
    assert!(b
        .rename(&key("nope"), &key("x"), None)
        .await
        .unwrap_err()
        .is_not_found());

    // An (empty) marker renames on its own.
    b.put(&key("mk/"), Bytes::new(), &dir_meta()).await.unwrap();
    b.rename(&key("mk/"), &key("mk2/"), None).await.unwrap();
    assert!(b.head(&key("mk/")).await.unwrap_err().is_not_found());
    assert_eq!(b.head(&key("mk2/")).await.unwrap().1, dir_meta());

    // --- update_meta replaces metadata, keeps content
    let m3 = UserMeta {
        mode: Some(0o100600),
        mtime: Some((-1, 5)),
        ..UserMeta::default()
    };
    let upd = b.update_meta(&key("dir/file1"), &m3).await.unwrap();
    assert_eq!(upd.size, 11);
    let (u, ui, um) = b.get(&key("dir/file1")).await.unwrap();
    assert_eq!((&u[..], &um), (&b"hello world"[..], &m3));
    assert_eq!(
        ui.etag, upd.etag,
        "update_meta reports the object's current etag"
    );
    assert!(b
        .update_meta(&key("dir/x"), &m3)
        .await
        .unwrap_err()
        .is_not_found());
    b.update_meta(&key("mk2/"), &m3).await.unwrap();
    assert_eq!(b.head(&key("mk2/")).await.unwrap().1, m3);

    // --- bad metadata is refused before anything is written
    let mut bad = UserMeta::default();
    bad.extra.insert("Bad Name".into(), "v".into());
    assert!(matches!(
        b.put(&key("bad"), Bytes::new(), &bad).await,
        Err(StoreError::InvalidInput { .. })
    ));
    assert!(b.head(&key("bad")).await.unwrap_err().is_not_found());

    // --- delete
    b.delete(&key("nothing/here")).await.unwrap();
    b.delete(&key("nothing/")).await.unwrap();
    b.delete(&key("other/moved2")).await.unwrap();
    assert!(b
        .head(&key("other/moved2"))
        .await
        .unwrap_err()
        .is_not_found());
    b.delete(&key("other/moved2")).await.unwrap();

    // --- multipart: 3 parts, then an aborted upload leaves nothing
    let mut up = b.put_multipart(&key("big/obj"), &m2).await.unwrap();
    for p in [&b"part-one|"[..], b"part-two|", b"part-three"] {
        up.put_part(Bytes::copy_from_slice(p)).await.unwrap();
    }
    let done = up.complete().await.unwrap();
    assert_eq!(done.size, 28);
    let (whole, wi, wm) = b.get(&key("big/obj")).await.unwrap();
    assert_eq!(&whole[..], b"part-one|part-two|part-three");
    assert_eq!((wi.size, wm), (28, m2.clone()));
    let (mid, _, _) = b.get_range(&key("big/obj"), 5..12).await.unwrap();
    assert_eq!(&mid[..], b"one|par");

    let mut up = b.put_multipart(&key("big/aborted"), &m2).await.unwrap();
    up.put_part(Bytes::from_static(b"zzz")).await.unwrap();
    up.abort().await.unwrap();
    assert!(b
        .head(&key("big/aborted"))
        .await
        .unwrap_err()
        .is_not_found());
    assert!(matches!(
        b.put_multipart(&key("big/"), &m2).await,
        Err(StoreError::InvalidInput { .. })
    ));

    b.check_access().await.unwrap();
}

fn memory_backend(prefix: &str) -> (Arc<InMemory>, ObjectStoreBackend) {
    let mem = Arc::new(InMemory::new());
    let b = ObjectStoreBackend::new(mem.clone(), prefix).unwrap();
    (mem, b)
}

#[tokio::test]
async fn conformance_in_memory() {
    let (_, b) = memory_backend("");
    conformance(&b).await;
}

#[tokio::test]
async fn conformance_in_memory_with_prefix() {
    let (mem, b) = memory_backend("/some/prefix/");
    let shared: Arc<dyn Backend> = Arc::new(b);
    conformance(shared.as_ref()).await;
    // Everything landed under the prefix, and nothing outside it.
    let all: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(mem.list(None))
        .await
        .unwrap();
    assert!(!all.is_empty());
    assert!(all
        .iter()
        .all(|m| m.location.as_ref().starts_with("some/prefix/")));
}

#[tokio::test]
async fn conformance_local() {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path()).unwrap());
    conformance(b.as_ref()).await;
}

#[tokio::test]
async fn object_store_uses_s3fs_names_and_reads_s3fs_objects() {
    let (mem, b) = memory_backend("p");
    b.put(&key("a/f"), Bytes::from_static(b"x"), &file_meta("n"))
        .await
        .unwrap();
    b.put(&key("a/"), Bytes::new(), &dir_meta()).await.unwrap();
    let raw = mem
        .get_opts(&Path::from("p/a/f"), Default::default())
        .await
        .unwrap();
    let attr = |n: &'static str| {
        raw.attributes
            .get(&Attribute::Metadata(n.into()))
            .map(|v| v.as_ref().to_owned())
    };
    assert_eq!(attr("mode").as_deref(), Some("33188"));
    assert_eq!(attr("uid").as_deref(), Some("1000"));
    assert_eq!(attr("gid").as_deref(), Some("1001"));
    assert_eq!(attr("mtime").as_deref(), Some("1700000000"));
    assert_eq!(attr("s3cryptfs-mtime-ns").as_deref(), Some("987654321"));
    assert_eq!(attr("s3cryptfs-bind").as_deref(), Some("bind-n"));
    // The marker is the stand-in object inside the directory.
    mem.head(&Path::from("p/a/.s3cryptfs-dir")).await.unwrap();

    // An object written by s3fs: integer mtime, no nanoseconds, upper-case header from a
    // store that does not lower-case.
    let mut attrs = Attributes::new();
    attrs.insert(Attribute::Metadata("mode".into()), "33261".into());
    attrs.insert(Attribute::Metadata("mtime".into()), "1500000000".into());
    attrs.insert(Attribute::Metadata("X-Other".into()), "kept".into());
    let opts = PutOptions {
        attributes: attrs,
        ..Default::default()
    };
    mem.put_opts(&Path::from("p/s3fs"), PutPayload::from_static(b"abc"), opts)
        .await
        .unwrap();
    let (_, m) = b.head(&key("s3fs")).await.unwrap();
    assert_eq!(m.mode, Some(0o100755));
    assert_eq!(m.mtime, Some((1_500_000_000, 0)));
    assert_eq!(m.extra.get("x-other").map(String::as_str), Some("kept"));

    // Objects outside the prefix or with names that are not keys are not listed.
    mem.put(&Path::from("elsewhere"), PutPayload::from_static(b"e"))
        .await
        .unwrap();
    mem.put(
        &Path::from("p/.s3cryptfs-tmp"),
        PutPayload::from_static(b"e"),
    )
    .await
    .unwrap();
    let l = b.list("", true).await.unwrap();
    assert_eq!(keys(&l.objects), ["a/", "a/f", "s3fs"]);
}

#[test]
fn object_store_errors_map_to_actionable_variants() {
    use object_store::client::{HttpError, HttpErrorKind};
    use object_store::Error as E;
    let boxed = || -> BoxError { "inner".into() };
    let m = |e| object::map_err(e, "k");
    assert!(m(E::NotFound {
        path: "k".into(),
        source: boxed()
    })
    .is_not_found());
    let no_bucket = "Client error with status 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>";
    assert!(matches!(
        m(E::NotFound { path: "k".into(), source: no_bucket.into() }),
        StoreError::MissingBucket { .. }
    ));
    assert!(matches!(
        m(E::PermissionDenied {
            path: "k".into(),
            source: boxed()
        }),
        StoreError::AccessDenied { .. }
    ));
    assert!(matches!(
        m(E::Unauthenticated {
            path: "k".into(),
            source: boxed()
        }),
        StoreError::AccessDenied { .. }
    ));
    assert!(m(E::Precondition {
        path: "k".into(),
        source: boxed()
    })
    .is_precondition());
    assert!(matches!(
        m(E::NotImplemented {
            operation: "x".into(),
            implementer: "y".into()
        }),
        StoreError::Unsupported { .. }
    ));
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let e = m(E::Generic {
        store: "S3",
        source: Box::new(HttpError::new(HttpErrorKind::Connect, refused)),
    });
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "the source chain is kept"
    );
    let e = m(E::Generic {
        store: "S3",
        source: boxed(),
    });
    assert!(matches!(e, StoreError::Other { .. }));
    assert!(std::error::Error::source(&e).is_some());
    // DeleteObjects reports a refused key inside a 200 answer; this is object_store's text for it
    // (aws::client::Error::DeleteFailed).
    let e = m(E::Generic {
        store: "S3",
        source: "DeleteObjects request failed for key pre/f: Access Denied (code: AccessDenied)".into(),
    });
    assert!(matches!(e, StoreError::AccessDenied { .. }), "{e:?}");
}

#[test]
fn s3_error_bodies_become_one_line_with_code_and_message() {
    // As object_store shows a 403 from S3 (moto's and AWS's bodies have this shape).
    let raw = "Error performing PUT http://127.0.0.1:5090/b/pre/f in 3ms - Server returned non-2xx status code: \
               403 Forbidden: <?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error><Code>AccessDenied</Code>\
               <Message>Access Denied</Message><RequestId>n5A5</RequestId><HostId>9Gjj=</HostId></Error>";
    assert_eq!(
        error::condense_s3_error_body(raw),
        "Error performing PUT http://127.0.0.1:5090/b/pre/f in 3ms - Server returned non-2xx status code: \
         403 Forbidden: AccessDenied: Access Denied"
    );
    let no_message = "status 403: <Error><Code>SignatureDoesNotMatch</Code></Error>";
    assert_eq!(error::condense_s3_error_body(no_message), "status 403: SignatureDoesNotMatch");
    // Text without an XML body is only joined onto one line.
    assert_eq!(error::condense_s3_error_body("a\n  b\r\nc"), "a b c");
    assert_eq!(error::condense_s3_error_body("<Error> never closed"), "<Error> never closed");
}

#[test]
fn keys_that_could_escape_are_rejected() {
    for bad in [
        "",
        "/abs",
        "../x",
        "a/../../b",
        "a/./b",
        "a//b",
        "a\0b",
        "a\nb",
        ".s3cryptfs-tmp/x",
        "a/.s3cryptfs-dir",
        "//",
    ] {
        assert!(
            matches!(ObjectKey::new(bad), Err(StoreError::InvalidInput { .. })),
            "{bad:?}"
        );
    }
    for good in [
        "a",
        "a/b",
        "a/b/",
        "..a",
        "a..",
        "name with spaces",
        "ünïcode/ok/",
    ] {
        ObjectKey::new(good).unwrap();
    }
}

#[tokio::test]
async fn local_stores_files_xattrs_and_hides_staging() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    b.put(&key("d/f"), Bytes::from_static(b"body"), &file_meta("x"))
        .await
        .unwrap();
    let root = b.root().to_path_buf();
    assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"body");
    let raw = local::raw_meta_for_test(&root.join("d/f")).unwrap();
    assert!(
        raw.contains("mode=33188\n") && raw.contains("s3cryptfs-bind=bind-x\n"),
        "{raw}"
    );

    // Staging directory: private, empty after puts and aborted uploads, never listed.
    let tmp = root.join(LOCAL_TMP_DIR);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&tmp).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut up = b
        .put_multipart(&key("d/up"), &UserMeta::default())
        .await
        .unwrap();
    up.put_part(Bytes::from_static(b"p")).await.unwrap();
    // Besides staged files, the directory holds the write lock (see local.rs).
    let staged = || {
        std::fs::read_dir(&tmp).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "write.lock").count()
    };
    assert_eq!(staged(), 1, "the part is staged");
    up.abort().await.unwrap();
    assert_eq!(staged(), 0);
    let all = b.list("", true).await.unwrap();
    assert_eq!(keys(&all.objects), ["d/", "d/f"]);
    assert_eq!(b.list("", false).await.unwrap().prefixes, [key("d/")]);

    // A file dropped in by hand is an object without metadata; symlinks are not objects.
    std::fs::write(root.join("d/manual"), b"m").unwrap();
    assert_eq!(
        b.head(&key("d/manual")).await.unwrap().1,
        UserMeta::default()
    );
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"s").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("d/link")).unwrap();
    assert!(b.head(&key("d/link")).await.unwrap_err().is_not_found());
    assert!(b.get(&key("d/link")).await.unwrap_err().is_not_found());
    assert_eq!(
        keys(&b.list("d/", false).await.unwrap().objects),
        ["d/f", "d/manual"]
    );
}

#[tokio::test]
async fn local_etag_changes_on_rewrite_of_same_size() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    let first = b
        .put(&key("f"), Bytes::from_static(b"aaaa"), &UserMeta::default())
        .await
        .unwrap();
    let second = b
        .put(&key("f"), Bytes::from_static(b"bbbb"), &UserMeta::default())
        .await
        .unwrap();
    assert_ne!(first.etag, second.etag);
    assert_eq!(b.head(&key("f")).await.unwrap().0.etag, second.etag);
    let (body, _, _) = b.get(&key("f")).await.unwrap();
    assert_eq!(&body[..], b"bbbb");
}

#[tokio::test]
async fn local_refuses_to_remove_non_empty_markers() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    b.put(&key("d/f"), Bytes::from_static(b"x"), &UserMeta::default())
        .await
        .unwrap();
    // Every parent of a file is an implicit marker locally.
    b.head(&key("d/")).await.unwrap();
    assert!(matches!(
        b.delete(&key("d/")).await,
        Err(StoreError::NotEmpty { .. })
    ));
    assert!(matches!(
        b.rename(&key("d/"), &key("e/"), None).await,
        Err(StoreError::NotEmpty { .. })
    ));
    assert!(
        b.head(&key("e/")).await.unwrap_err().is_not_found(),
        "a refused rename creates nothing"
    );
    b.delete(&key("d/f")).await.unwrap();
    b.delete(&key("d/")).await.unwrap();
    assert!(b.head(&key("d/")).await.unwrap_err().is_not_found());
    assert!(!dir.path().join("d").exists());

    // A file in the way of a directory is a clear input error, not an errno.
    b.put(
        &key("plain"),
        Bytes::from_static(b"x"),
        &UserMeta::default(),
    )
    .await
    .unwrap();
    let err = b
        .put(&key("plain/child"), Bytes::new(), &UserMeta::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput { .. }), "{err:?}");
}

#[test]
fn local_backend_needs_an_existing_directory() {
    let err = LocalBackend::new("/nonexistent/s3cryptfs-store").unwrap_err();
    assert!(err.to_string().contains("create it first"), "{err}");
    let file = tempfile::NamedTempFile::new().unwrap();
    assert!(matches!(
        LocalBackend::new(file.path()),
        Err(StoreError::InvalidInput { .. })
    ));
}

/// A directory whose own path is about `len` bytes (nested 200-byte names under a temp dir), as a store root.
fn long_root(tmp: &std::path::Path, len: usize) -> std::path::PathBuf {
    let mut root = tmp.to_path_buf();
    let mut i = 0;
    while root.as_os_str().len() + 201 <= len {
        root.push(format!("{i:02}{}", "r".repeat(198)));
        i += 1;
    }
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A key of `parts` names of `name_len` bytes each, under `top`.
fn long_key(top: &str, parts: usize, name_len: usize, leaf: &str) -> String {
    let mut k = top.to_owned();
    for i in 0..parts {
        k.push_str(&format!("/{i:02}{}", "n".repeat(name_len - 2)));
    }
    format!("{k}/{leaf}")
}

/// Regression (issue 11): objects were reached by whole paths, so root + key had to fit in PATH_MAX (4,096 bytes):
/// with a long root, a deep key could not be written, and a lookup of a missing one failed with InvalidInput (EINVAL
/// through the mount) instead of NotFound. Every operation now walks name by name from the open root.
#[tokio::test]
async fn local_keys_work_whatever_the_length_of_root_plus_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = long_root(tmp.path(), 3000);
    assert!(root.as_os_str().len() > 2800, "{}", root.display());
    let b = LocalBackend::new(&root).unwrap();
    assert_eq!(b.max_path_len(false), LOCAL_MAX_PATH_LEN, "the limit does not depend on the root");
    assert_eq!(b.max_path_len(true), LOCAL_MAX_PATH_LEN);

    let k = key(&long_key("deep", 10, 200, "file"));
    assert!(k.as_str().len() > 2000 && root.as_os_str().len() + k.as_str().len() > 4096);
    let dir = format!("{}/", k.as_str().rsplit_once('/').unwrap().0);

    // A missing deep key: NotFound, and its directory lists as empty.
    assert!(b.head(&k).await.unwrap_err().is_not_found());
    assert!(b.get(&k).await.unwrap_err().is_not_found());
    assert!(b.head(&key(&dir)).await.unwrap_err().is_not_found());
    assert_eq!(b.list(&dir, false).await.unwrap(), Listing::default());
    assert_eq!(b.list(&dir, true).await.unwrap(), Listing::default());
    b.delete(&k).await.unwrap();

    // put (conditional and not), head, get, get_range.
    let info = b.put_expect(&k, Bytes::from_static(b"deep body"), &file_meta("d"), &Expect::Absent).await.unwrap();
    assert!(b.put_expect(&k, Bytes::new(), &file_meta("d"), &Expect::Absent).await.unwrap_err().is_precondition());
    let (hinfo, hmeta) = b.head(&k).await.unwrap();
    assert_eq!((hinfo.size, hinfo.etag.clone(), hmeta), (9, info.etag.clone(), file_meta("d")));
    assert_eq!(&b.get(&k).await.unwrap().0[..], b"deep body");
    assert_eq!(&b.get_range(&k, 5..9).await.unwrap().0[..], b"body");
    let info = b
        .put_expect(&k, Bytes::from_static(b"deep body 2"), &file_meta("d"), &Expect::Etag(info.etag.unwrap()))
        .await
        .unwrap();

    // Its directory: a marker with metadata, listed from above and from itself.
    b.put(&key(&dir), Bytes::new(), &dir_meta()).await.unwrap();
    assert_eq!(b.head(&key(&dir)).await.unwrap().1, dir_meta());
    let here = b.list(&dir, false).await.unwrap();
    assert_eq!(keys(&here.objects), [k.as_str()]);
    let all = b.list("deep/", true).await.unwrap();
    assert_eq!(all.objects.len(), 12, "deep/, ten directories, the file: {:?}", keys(&all.objects));
    assert!(all.objects.iter().any(|o| o.key == k && o.etag == info.etag));
    assert!(b.has_children("deep/").await.unwrap());

    // update_meta, copy, rename (to another deep directory), multipart upload, replace_head, delete.
    b.update_meta(&k, &file_meta("u")).await.unwrap();
    assert_eq!(b.head(&k).await.unwrap().1, file_meta("u"));
    let copy = key(&long_key("other", 10, 200, "copy"));
    b.copy(&k, &copy, None).await.unwrap();
    assert_eq!(b.get(&copy).await.unwrap().1.size, 11);
    assert_eq!(b.head(&copy).await.unwrap().1, file_meta("u"));
    let moved = key(&long_key("other", 10, 200, "moved"));
    b.rename(&k, &moved, Some(&file_meta("m"))).await.unwrap();
    assert!(b.head(&k).await.unwrap_err().is_not_found());
    let (minfo, mmeta) = b.head(&moved).await.unwrap();
    assert_eq!(mmeta, file_meta("m"));
    let mut up = b.put_multipart(&k, &file_meta("p")).await.unwrap();
    up.put_part(Bytes::from_static(b"part one, ")).await.unwrap();
    up.put_part(Bytes::from_static(b"part two")).await.unwrap();
    up.complete().await.unwrap();
    assert_eq!(&b.get(&k).await.unwrap().0[..], b"part one, part two");
    b.replace_head(&moved, minfo.etag.as_deref().unwrap(), Bytes::from_static(b"DEEP")).await.unwrap();
    assert_eq!(&b.get(&moved).await.unwrap().0[..], b"DEEP body 2");
    let sub = key(&format!("{dir}sub/"));
    b.put(&sub, Bytes::new(), &dir_meta()).await.unwrap();
    b.rename(&sub, &key(&format!("{dir}sub2/")), None).await.unwrap();
    assert_eq!(b.head(&key(&format!("{dir}sub2/"))).await.unwrap().1, dir_meta());
    for gone in [k.clone(), moved, copy, key(&format!("{dir}sub2/"))] {
        b.delete(&gone).await.unwrap();
        assert!(b.head(&gone).await.unwrap_err().is_not_found());
    }
    assert!(b.list(&dir, false).await.unwrap().objects.is_empty());
    b.check_access().await.unwrap();
}

/// Names are at most NAME_MAX (255) bytes: one byte more is refused up front with a clear error (ENAMETOOLONG
/// through the mount), at any depth and for any operation.
#[tokio::test]
async fn local_names_longer_than_255_bytes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(tmp.path()).unwrap();
    let ok = key(&format!("d/{}", "x".repeat(255)));
    b.put(&ok, Bytes::from_static(b"x"), &UserMeta::default()).await.unwrap();
    assert_eq!(b.head(&ok).await.unwrap().0.size, 1);
    for long in [format!("d/{}", "y".repeat(256)), format!("{}/f", "z".repeat(256)), format!("d/{}/", "w".repeat(256))]
    {
        let k = key(&long);
        let err = b.put(&k, Bytes::new(), &UserMeta::default()).await.unwrap_err();
        assert!(matches!(err, StoreError::NameTooLong { max: 255, .. }), "{long}: {err:?}");
        assert!(err.to_string().contains("255 bytes"), "{err}");
        let err = b.head(&k).await.unwrap_err();
        assert!(matches!(err, StoreError::NameTooLong { .. }), "{long}: {err:?}");
        assert!(matches!(b.rename(&ok, &key(long.trim_end_matches('/')), None).await, Err(StoreError::NameTooLong { .. })));
    }
    assert_eq!(b.head(&ok).await.unwrap().0.size, 1, "a refused rename moves nothing");
}

/// No name below the root is followed through a symlink, not only the last one: a symlinked directory reads as
/// missing and cannot be written through.
#[tokio::test]
async fn local_symlinked_directories_are_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("sub")).unwrap();
    std::fs::write(outside.path().join("sub/secret"), b"s").unwrap();
    let b = LocalBackend::new(tmp.path()).unwrap();
    b.put(&key("d/f"), Bytes::from_static(b"x"), &UserMeta::default()).await.unwrap();
    std::os::unix::fs::symlink(outside.path(), tmp.path().join("d/link")).unwrap();
    for missing in ["d/link/sub/secret", "d/link/sub/", "d/link/"] {
        assert!(b.head(&key(missing)).await.unwrap_err().is_not_found(), "{missing}");
    }
    assert_eq!(b.list("d/link/", true).await.unwrap(), Listing::default());
    assert_eq!(keys(&b.list("", true).await.unwrap().objects), ["d/", "d/f"]);
    let err = b.put(&key("d/link/sub/planted"), Bytes::new(), &UserMeta::default()).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput { .. }), "{err:?}");
    b.delete(&key("d/link/sub/secret")).await.unwrap();
    assert!(outside.path().join("sub/secret").exists(), "nothing outside the root is touched");
    assert!(!outside.path().join("sub/planted").exists());
}

/// `replace_head` (key rotation): only the first bytes change, metadata stays, and only the version read is replaced.
async fn replace_head_contract(b: &dyn Backend) {
    let k = key("r/obj");
    let body: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let info = b.put(&k, Bytes::from(body.clone()), &file_meta("r")).await.unwrap();
    let etag = info.etag.clone().unwrap();

    let err = b.replace_head(&k, "\"not-the-etag\"", Bytes::from_static(b"NEW")).await.unwrap_err();
    assert!(err.is_precondition(), "a stale etag must not write: {err}");
    assert_bytes_eq(&b.get(&k).await.unwrap().0, &body);

    b.replace_head(&k, &etag, Bytes::from(vec![0xAA; 512])).await.unwrap();
    let (now, got, meta) = b.get(&k).await.unwrap();
    assert_eq!(&now[..512], &[0xAA; 512][..]);
    assert_bytes_eq(&now[512..], &body[512..]);
    assert_eq!(got.size, 2000);
    assert_eq!(meta, file_meta("r"), "metadata (binding included) is kept");
    assert_ne!(got.etag.as_deref(), Some(etag.as_str()), "the etag changes, so caches see a new version");
    // The old etag no longer matches: a second writer that read before us loses.
    assert!(b.replace_head(&k, &etag, Bytes::from_static(b"late")).await.unwrap_err().is_precondition());

    let short = key("r/short");
    let info = b.put(&short, Bytes::from_static(b"tiny"), &UserMeta::default()).await.unwrap();
    assert!(b.replace_head(&short, info.etag.as_deref().unwrap(), Bytes::from(vec![1; 512])).await.is_err());
    let missing = b.replace_head(&key("r/missing"), &etag, Bytes::from_static(b"x")).await.unwrap_err();
    assert!(missing.is_not_found() || missing.is_precondition(), "{missing}");
    assert!(b.replace_head(&key("r/"), &etag, Bytes::from_static(b"x")).await.is_err());
}

fn assert_bytes_eq(got: &[u8], want: &[u8]) {
    assert!(got == want, "bytes differ: {} vs {} bytes", got.len(), want.len());
}

#[tokio::test]
async fn replace_head_in_memory() {
    let (_, b) = memory_backend("pre");
    replace_head_contract(&b).await;
}

#[tokio::test]
async fn replace_head_local_writes_in_place_and_keeps_the_xattr() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    replace_head_contract(&b).await;
    let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let path = dir.path().join("r/obj");
    let before = ino(&path);
    let (info, _) = b.head(&key("r/obj")).await.unwrap();
    b.replace_head(&key("r/obj"), info.etag.as_deref().unwrap(), Bytes::from_static(b"in place"))
        .await
        .unwrap();
    assert_eq!(ino(&path), before, "the file is written in place, not replaced");
    assert!(super::local::raw_meta_for_test(&path).unwrap().contains("s3cryptfs-bind=bind-r"));
}

#[tokio::test]
async fn customer_key_operations_need_sse_c_on_s3() {
    let (_, b) = memory_backend("");
    b.put(&key("f"), Bytes::from_static(b"x"), &UserMeta::default()).await.unwrap();
    assert!(matches!(b.customer_key_of(&key("f")).await, Err(StoreError::Unsupported { .. })));
    let of = CustomerKeyOf { index: Some(1), ..CustomerKeyOf::default() };
    assert!(matches!(b.move_to_writing_key(&key("f"), &of, "\"e\"", 1).await, Err(StoreError::Unsupported { .. })));
    let dir = tempfile::tempdir().unwrap();
    let local = LocalBackend::new(dir.path()).unwrap();
    assert!(matches!(local.customer_key_of(&key("f")).await, Err(StoreError::Unsupported { .. })));
}

/// Conditional writes ([`Expect`]): `Absent` only creates, `Etag` only replaces the version it names, and a mismatch
/// is `Precondition` with the object left as it was; single PUTs and multipart uploads (two parts over S3's 5 MiB
/// minimum) alike. Keys live under `dir` so one bucket can host several runs.
async fn conditional_contract(b: &dyn Backend, dir: &str) {
    let k = key(&format!("{dir}obj"));
    let precondition = |what: &str, r: Result<ObjectInfo, StoreError>| match r {
        Err(e) if e.is_precondition() => {}
        other => panic!("{what}: expected a precondition failure, got {other:?}"),
    };

    // --- single PUT
    let first = b.put_expect(&k, Bytes::from_static(b"first"), &file_meta("1"), &Expect::Absent).await.unwrap();
    let first_etag = first.etag.clone().expect("etag");
    precondition("absent on an existing key", b.put_expect(&k, Bytes::from_static(b"other"), &file_meta("x"), &Expect::Absent).await);
    let (body, info, meta) = b.get(&k).await.unwrap();
    assert_eq!((&body[..], info.etag.as_deref(), meta), (&b"first"[..], Some(first_etag.as_str()), file_meta("1")));

    let second = b
        .put_expect(&k, Bytes::from_static(b"second"), &file_meta("2"), &Expect::Etag(first_etag.clone()))
        .await
        .unwrap();
    let second_etag = second.etag.clone().expect("etag");
    assert_ne!(second_etag, first_etag);
    precondition(
        "a stale etag",
        b.put_expect(&k, Bytes::from_static(b"late"), &file_meta("x"), &Expect::Etag(first_etag.clone())).await,
    );
    let (body, info, meta) = b.get(&k).await.unwrap();
    assert_eq!((&body[..], info.etag.as_deref(), meta), (&b"second"[..], Some(second_etag.as_str()), file_meta("2")));

    let gone = key(&format!("{dir}gone"));
    precondition(
        "an etag on a missing key",
        b.put_expect(&gone, Bytes::from_static(b"x"), &file_meta("x"), &Expect::Etag(second_etag.clone())).await,
    );
    assert!(b.head(&gone).await.unwrap_err().is_not_found(), "a failed conditional write creates nothing");
    // Unconditional writes still replace whatever is there.
    b.put_expect(&k, Bytes::from_static(b"third"), &file_meta("3"), &Expect::Any).await.unwrap();
    assert_eq!(&b.get(&k).await.unwrap().0[..], b"third");

    // --- metadata alone, conditional on the etag: a stale etag changes nothing, the current one keeps the content
    let third_etag = b.head(&k).await.unwrap().0.etag.expect("etag");
    let refused = b.update_meta_if(&k, &file_meta("4"), &first_etag).await;
    assert!(refused.as_ref().is_err_and(StoreError::is_precondition), "update_meta_if with a stale etag: {refused:?}");
    assert_eq!(b.head(&k).await.unwrap().1, file_meta("3"), "a refused update_meta_if changes nothing");
    b.update_meta_if(&k, &file_meta("4"), &third_etag).await.unwrap();
    let (body, _, meta) = b.get(&k).await.unwrap();
    assert_eq!((&body[..], meta), (&b"third"[..], file_meta("4")));
    let missing = b.update_meta_if(&gone, &file_meta("4"), &third_etag).await;
    assert!(missing.as_ref().is_err_and(StoreError::is_not_found), "update_meta_if of a missing key: {missing:?}");

    // --- multipart: two parts of just over 5 MiB
    const PART: usize = (5 << 20) + 1;
    async fn upload(b: &dyn Backend, k: &ObjectKey, fill: u8, tag: &str, expect: &Expect) -> Result<ObjectInfo, StoreError> {
        let mut up = b.put_multipart_expect(k, &file_meta(tag), expect).await?;
        let p1 = up.put_part(Bytes::from(vec![fill; PART]));
        let p2 = up.put_part(Bytes::from(vec![fill.wrapping_add(1); PART]));
        p1.await?;
        p2.await?;
        up.complete().await
    }
    let check = |got: (Bytes, ObjectInfo, UserMeta), fill: u8, tag: &str, etag: &str| {
        let (body, info, meta) = got;
        assert_eq!(body.len(), 2 * PART);
        assert!(body[..PART].iter().all(|&x| x == fill) && body[PART..].iter().all(|&x| x == fill.wrapping_add(1)));
        assert_eq!(info.etag.as_deref(), Some(etag));
        assert_eq!(meta, file_meta(tag));
    };
    let big = key(&format!("{dir}big"));
    let m1 = upload(b, &big, 1, "m1", &Expect::Absent).await.unwrap();
    assert_eq!(m1.size, 2 * PART as u64);
    let m1_etag = m1.etag.clone().expect("etag");
    check(b.get(&big).await.unwrap(), 1, "m1", &m1_etag);
    precondition("multipart absent on an existing key", upload(b, &big, 7, "x", &Expect::Absent).await);
    check(b.get(&big).await.unwrap(), 1, "m1", &m1_etag);

    let m2 = upload(b, &big, 3, "m2", &Expect::Etag(m1_etag.clone())).await.unwrap();
    let m2_etag = m2.etag.clone().expect("etag");
    assert_ne!(m2_etag, m1_etag);
    check(b.get(&big).await.unwrap(), 3, "m2", &m2_etag);
    precondition("multipart with a stale etag", upload(b, &big, 9, "x", &Expect::Etag(m1_etag)).await);
    check(b.get(&big).await.unwrap(), 3, "m2", &m2_etag);
    // New metadata on a multipart object (S3: copied onto itself by the server).
    b.update_meta_if(&big, &file_meta("m3"), &m2_etag).await.unwrap();
    let (body, _, meta) = b.get(&big).await.unwrap();
    assert!(body.len() == 2 * PART && body[..PART].iter().all(|&x| x == 3) && body[PART..].iter().all(|&x| x == 4));
    assert_eq!(meta, file_meta("m3"));
    let gone = key(&format!("{dir}big-gone"));
    precondition("multipart etag on a missing key", upload(b, &gone, 5, "x", &Expect::Etag(m2_etag)).await);
    assert!(b.head(&gone).await.unwrap_err().is_not_found());

    // --- directory markers: a second mkdir of the same directory loses
    let marker = key(&format!("{dir}sub/"));
    b.put_expect(&marker, Bytes::new(), &dir_meta(), &Expect::Absent).await.unwrap();
    precondition("absent on an existing marker", b.put_expect(&marker, Bytes::new(), &file_meta("x"), &Expect::Absent).await);
    assert_eq!(b.head(&marker).await.unwrap().1, dir_meta(), "the marker keeps its metadata");
}

/// `Upload::copy_part` (issue 13, objects changed in place): a new version made of ranges copied from the current
/// one and new parts, conditional on its ETag; a copy from a version that was replaced meanwhile fails and changes
/// nothing.
async fn copy_part_contract(b: &dyn Backend, dir: &str) {
    assert!(b.copies_parts(), "a store that copies parts says it cannot: its large files are rewritten whole");
    const PART: u64 = (5 << 20) + 1;
    let k = key(&format!("{dir}in-place"));
    let old: Vec<u8> = (0..3 * PART).map(|i| (i % 251) as u8).collect();
    let mut up = b.put_multipart_expect(&k, &file_meta("v1"), &Expect::Absent).await.unwrap();
    for piece in old.chunks(PART as usize) {
        up.put_part(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    let v1 = up.complete().await.unwrap().etag.expect("etag");

    // Keep the first and last thirds, replace the middle one.
    let mut up = b.put_multipart_expect(&k, &file_meta("v2"), &Expect::Etag(v1.clone())).await.unwrap();
    assert!(up.copies_parts(), "an upload that copies parts says it does not");
    let first = up.copy_part(0..PART, &v1);
    let middle = up.put_part(Bytes::from(vec![9u8; PART as usize]));
    let last = up.copy_part(2 * PART..3 * PART, &v1);
    first.await.unwrap();
    middle.await.unwrap();
    last.await.unwrap();
    let v2 = up.complete().await.unwrap();
    assert_eq!(v2.size, 3 * PART);
    let (body, info, meta) = b.get(&k).await.unwrap();
    assert_eq!((info.etag.as_ref(), meta), (v2.etag.as_ref(), file_meta("v2")));
    let mut expected = old.clone();
    expected[PART as usize..2 * PART as usize].fill(9);
    assert!(body[..] == expected[..], "copied ranges and the new part rejoin");

    // A copy from a version someone replaced after the upload began: refused, and the object stays theirs.
    let v2 = v2.etag.expect("etag");
    let mut up = b.put_multipart_expect(&k, &file_meta("late"), &Expect::Etag(v2.clone())).await.unwrap();
    // As large as before, so the range is still valid and only the condition can refuse it.
    let theirs = Bytes::from(vec![7u8; 3 * PART as usize]);
    b.put(&k, theirs.clone(), &file_meta("other")).await.unwrap();
    let copied = up.copy_part(0..PART, &v2).await;
    let result = match copied {
        Ok(()) => up.complete().await.map(|_| ()),
        Err(e) => {
            up.abort().await.unwrap();
            Err(e)
        }
    };
    assert!(result.as_ref().is_err_and(|e| e.is_precondition() || e.is_not_found()), "{result:?}");
    assert!(b.get(&k).await.unwrap().0 == theirs, "the other writer's version stays");
}

#[tokio::test]
async fn copy_part_in_memory() {
    let b = ObjectStoreBackend::new(Arc::new(InMemory::new()), "pre").unwrap();
    copy_part_contract(&b, "").await;
}

#[tokio::test]
async fn copy_part_local() {
    let tmp = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(tmp.path()).unwrap();
    copy_part_contract(&b, "").await;
}

#[tokio::test]
async fn copy_part_s3() {
    let endpoint = std::env::var("S3CRYPTFS_TEST_S3_ENDPOINT")
        .expect("S3CRYPTFS_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts the S3 server");
    let bucket = format!("copy-part-{}-{}", std::process::id(), nanos_now());
    let status = std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-X", "PUT", &format!("{endpoint}/{bucket}")])
        .status()
        .expect("curl");
    assert!(status.success(), "could not create bucket {bucket} at {endpoint}");
    let plain = S3Options {
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        allow_http: true,
        ..S3Options::default()
    };
    let sse_s3 = S3Options { sse: Some(ServerSideEncryption::S3), ..plain.clone() };
    for (name, opts) in [("plain", plain), ("sse-s3", sse_s3)] {
        let (b, _) = from_url(&format!("s3://{bucket}"), &opts).unwrap();
        copy_part_contract(b.as_ref(), &format!("{name}/")).await;
    }
}

/// `delete_if`: the current version's ETag deletes the object. Where the store checks the condition (`checks`:
/// Some(true)), a stale ETag is a precondition failure and a missing object not found, and nothing changes; where it
/// cannot (Some(false): InMemory, LocalStack's 501), it deletes as `delete` does; None accepts either (an S3 server
/// may or may not have conditional deletes).
async fn delete_if_contract(b: &dyn Backend, dir: &str, checks: Option<bool>) {
    let k = ObjectKey::new(format!("{dir}delete-if")).unwrap();
    let first = b.put(&k, Bytes::from_static(b"one"), &UserMeta::default()).await.unwrap();
    let second = b.put(&k, Bytes::from_static(b"two!"), &UserMeta::default()).await.unwrap();
    let (stale, current) = (first.etag.unwrap(), second.etag.unwrap());
    assert_ne!(stale, current);
    match (b.delete_if(&k, &stale).await, checks) {
        (Err(e), Some(true) | None) if e.is_precondition() => {
            assert_eq!(b.head(&k).await.unwrap().0.etag.as_deref(), Some(current.as_str()), "refused, yet changed");
            b.delete_if(&k, &current).await.unwrap();
            assert!(b.head(&k).await.unwrap_err().is_not_found());
            let gone = b.delete_if(&k, &current).await.unwrap_err();
            assert!(gone.is_not_found(), "{gone:?}");
        }
        (Ok(()), Some(false) | None) => {
            assert!(b.head(&k).await.unwrap_err().is_not_found());
            b.delete_if(&k, &current).await.unwrap();
        }
        (other, checks) => panic!("delete_if with a stale ETag answered {other:?} (checks: {checks:?})"),
    }
    // A plain delete of a missing key is still no error.
    b.delete(&k).await.unwrap();
}

/// [`Backend::rename_if`] with new metadata (as a client-side mode's rename gives: the new path binding): the version
/// named moves with it, and the old name goes. With a stale ETag (another writer's upload of the name landed after
/// the caller's HEAD), where the copy is conditional (`copy_checked`: S3 with no SSE mode, and only with new
/// metadata) nothing moves and the caller learns it (precondition: the filesystem starts the move again from a new
/// HEAD); elsewhere whatever version is there is moved, and never a mix of the two.
async fn rename_if_contract(b: &dyn Backend, dir: &str, copy_checked: bool) {
    let from = key(&format!("{dir}rename-from"));
    let to = key(&format!("{dir}rename-to"));
    let first = b.put(&from, Bytes::from_static(b"one"), &file_meta("r1")).await.unwrap();
    let stale = first.etag.expect("etag");
    let second = b.put(&from, Bytes::from_static(b"two!"), &file_meta("r2")).await.unwrap();
    let current = second.etag.expect("etag");
    let moved = b.rename_if(&from, &to, Some(&file_meta("moved")), &stale).await;
    if copy_checked {
        assert!(moved.as_ref().is_err_and(StoreError::is_precondition), "rename_if with a stale etag: {moved:?}");
        assert!(b.head(&to).await.unwrap_err().is_not_found(), "a refused rename_if copied");
        let (body, info, meta) = b.get(&from).await.unwrap();
        assert_eq!((&body[..], info.etag.as_deref(), meta), (&b"two!"[..], Some(current.as_str()), file_meta("r2")));
    } else {
        moved.unwrap();
        let (body, _, meta) = b.get(&to).await.unwrap();
        assert_eq!((&body[..], meta), (&b"two!"[..], file_meta("moved")), "the version there is what moves");
        b.delete(&to).await.unwrap();
        if b.head(&from).await.is_err() {
            // The old name went too (a store whose delete does not check the version): put it back for the rest.
            b.put(&from, Bytes::from_static(b"two!"), &file_meta("r2")).await.unwrap();
        }
    }
    let current = b.head(&from).await.unwrap().0.etag.expect("etag");
    assert!(b.rename_if(&from, &to, Some(&file_meta("moved")), &current).await.unwrap(), "nothing stayed behind");
    assert!(b.head(&from).await.unwrap_err().is_not_found(), "the old name is gone");
    let (body, _, meta) = b.get(&to).await.unwrap();
    assert_eq!((&body[..], meta), (&b"two!"[..], file_meta("moved")));
    b.delete(&to).await.unwrap();
}

#[tokio::test]
async fn conditional_writes_in_memory() {
    let (_, b) = memory_backend("pre");
    conditional_contract(&b, "").await;
    delete_if_contract(&b, "", Some(false)).await;
    rename_if_contract(&b, "", false).await;
}

/// An object store that ignores write conditions, as Garage does: every PUT overwrites.
#[derive(Debug, Default)]
struct IgnoresConditions(InMemory);

impl std::fmt::Display for IgnoresConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IgnoresConditions")
    }
}

#[async_trait::async_trait]
impl ObjectStore for IgnoresConditions {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        opts.mode = object_store::PutMode::Overwrite;
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

/// Issue 10: on a server that ignores write conditions (Garage) the backend, told so by the mount's probe, checks
/// each condition with a HEAD first; the same contract as a server that holds them then passes. Without the check
/// a write expecting "nothing there" overwrites what is there.
#[tokio::test]
async fn conditions_a_server_ignores_are_checked_with_a_head() {
    let b = ObjectStoreBackend::new(Arc::new(IgnoresConditions::default()), "").unwrap();
    let k = key("taken");
    b.put_expect(&k, Bytes::from_static(b"theirs"), &file_meta("1"), &Expect::Absent).await.unwrap();
    b.put_expect(&k, Bytes::from_static(b"lost update"), &file_meta("2"), &Expect::Absent)
        .await
        .expect("the wrapper is meant to ignore conditions, like Garage");
    b.assume_conditions_ignored();
    assert!(b.conditions_ignored());
    let r = b.put_expect(&k, Bytes::from_static(b"late"), &file_meta("3"), &Expect::Absent).await;
    assert!(matches!(r, Err(StoreError::Precondition { .. })), "{r:?}");
    conditional_contract(&b, "d/").await;
}

/// A server that answers every S3 write and ignores every condition, as Garage 2.5 does on PUT and DELETE: PUT
/// stores (ETag `"n"`), HEAD answers what is stored, DELETE removes it whatever `If-Match` says. HTTP/1.1 on
/// 127.0.0.1, bodies by Content-Length, no signature checks. Returns the endpoint.
async fn serve_ignoring_conditions() -> String {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let objects: Arc<std::sync::Mutex<BTreeMap<String, (usize, u32)>>> = Arc::default();
    tokio::spawn(async move {
        let mut version = 0u32;
        while let Ok((socket, _)) = listener.accept().await {
            let objects = objects.clone();
            version += 1000;
            tokio::spawn(async move {
                let mut version = version;
                let mut conn = BufReader::new(socket);
                loop {
                    let mut line = String::new();
                    if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or(""));
                    let path = target.split('?').next().unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        conn.read_line(&mut h).await.unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    conn.read_exact(&mut body).await.unwrap();
                    let date = "Thu, 01 Jan 2026 00:00:00 GMT";
                    let answer = {
                        let mut objects = objects.lock().unwrap();
                        match method.as_str() {
                            "PUT" => {
                                version += 1;
                                objects.insert(path, (len, version));
                                format!("HTTP/1.1 200 OK\r\nETag: \"{version}\"\r\nContent-Length: 0\r\n\r\n")
                            }
                            "HEAD" => match objects.get(&path) {
                                Some((len, v)) => format!(
                                    "HTTP/1.1 200 OK\r\nETag: \"{v}\"\r\nContent-Length: {len}\r\n\
                                     Last-Modified: {date}\r\n\r\n"
                                ),
                                None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                            },
                            "DELETE" => {
                                objects.remove(&path);
                                "HTTP/1.1 204 No Content\r\n\r\n".to_string()
                            }
                            _ => "HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n".to_string(),
                        }
                    };
                    if conn.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    endpoint
}

/// A server that ignores conditions on PUT and DELETE (Garage): the probe finds both out, so conditional writes are
/// checked with a HEAD first and the write-behind deletes go out as batches (each one conditional before, one
/// request per file). Needs the test credentials in the environment (scripts/test.sh), as every S3 test.
#[tokio::test]
async fn the_probe_finds_a_server_that_ignores_conditional_deletes() {
    let endpoint = serve_ignoring_conditions().await;
    let opts = S3Options {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        allow_http: true,
        timeout: Some(std::time::Duration::from_secs(10)),
        ..S3Options::default()
    };
    let (b, _) = from_url("s3://ignores/pre", &opts).unwrap();
    assert!(b.deletes_are_conditional());
    b.probe_conditional_writes().await.unwrap();
    assert!(!b.deletes_are_conditional(), "the probe's DELETE with a wrong If-Match removed the object, unnoticed");
    let k = key("f");
    b.put_expect(&k, Bytes::from_static(b"x"), &UserMeta::default(), &Expect::Absent).await.unwrap();
    let r = b.put_expect(&k, Bytes::from_static(b"y"), &UserMeta::default(), &Expect::Absent).await;
    assert!(matches!(r, Err(StoreError::Precondition { .. })), "conditions not checked with a HEAD: {r:?}");
}

#[tokio::test]
async fn conditional_writes_local() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    conditional_contract(&b, "").await;
    delete_if_contract(&b, "", Some(true)).await;
    rename_if_contract(&b, "", false).await;
}

/// Two handles on one local directory stand for two mounts (processes) of it: their conditional writes are
/// serialised by the lock file, so of many racing `Absent` writers exactly one wins, and of many writers holding the
/// same etag exactly one replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_conditional_writes_race_with_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let stores = [LocalBackend::new(dir.path()).unwrap(), LocalBackend::new(dir.path()).unwrap()];
    for round in 0..5 {
        let k = key(&format!("race/{round}"));
        let writes = (0..8).map(|i| {
            let (b, k) = (stores[i % 2].clone(), k.clone());
            tokio::spawn(async move { b.put_expect(&k, Bytes::from(vec![i as u8; 64]), &file_meta("r"), &Expect::Absent).await })
        });
        let results = futures::future::join_all(writes).await;
        let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(|r| r.as_ref().map_or_else(StoreError::is_precondition, |_| true)), "{results:?}");
        let etag = stores[0].head(&k).await.unwrap().0.etag.unwrap();
        let writes = (0..8).map(|i| {
            let (b, k, etag) = (stores[i % 2].clone(), k.clone(), etag.clone());
            tokio::spawn(async move { b.put_expect(&k, Bytes::from(vec![i as u8; 64]), &file_meta("r"), &Expect::Etag(etag)).await })
        });
        let results = futures::future::join_all(writes).await;
        let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(|r| r.as_ref().map_or_else(StoreError::is_precondition, |_| true)), "{results:?}");
    }
}

/// The real S3 server of `scripts/test.sh` (LocalStack, which checks conditional PUTs and completions), plain and with
/// each server-side encryption mode, since those take other request paths. Fails without the server, as the
/// integration tests do.
#[tokio::test]
async fn conditional_writes_s3() {
    let endpoint = std::env::var("S3CRYPTFS_TEST_S3_ENDPOINT")
        .expect("S3CRYPTFS_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts the S3 server");
    let bucket = format!("cond-{}-{}", std::process::id(), nanos_now());
    let status = std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-X", "PUT", &format!("{endpoint}/{bucket}")])
        .status()
        .expect("curl");
    assert!(status.success(), "could not create bucket {bucket} at {endpoint}");
    let plain = S3Options {
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        allow_http: true,
        ..S3Options::default()
    };
    let sse_s3 = S3Options { sse: Some(ServerSideEncryption::S3), ..plain.clone() };
    let sse_kms = S3Options { sse: Some(ServerSideEncryption::Kms { key_id: None, bucket_key: None }), ..plain.clone() };
    let https = std::env::var("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT").expect("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT (scripts/test.sh)");
    let ca = std::env::var("S3CRYPTFS_TEST_CA_FILE").expect("S3CRYPTFS_TEST_CA_FILE (scripts/test.sh)");
    let keys = crate::crypto::KeyHistory::parse("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n").unwrap();
    let sse_c = S3Options {
        endpoint: Some(https),
        region: Some("us-east-1".into()),
        ca_file: Some(ca.into()),
        customer_keys: Some(CustomerKeys(Arc::new(keys))),
        ..S3Options::default()
    };
    // The mount's probe finds out whether the server checks conditional deletes: LocalStack answers 501, so the
    // write-behind deletes go in batches from the first one on.
    let (b, _) = from_url(&format!("s3://{bucket}/probe"), &plain).unwrap();
    assert!(b.deletes_are_conditional(), "an S3 store starts out sending conditional deletes");
    b.probe_conditional_writes().await.unwrap();
    if std::env::var("S3CRYPTFS_TEST_SERVER").is_ok_and(|s| s == "localstack") {
        assert!(!b.deletes_are_conditional(), "the probe did not notice LocalStack's 501 on a conditional delete");
    }
    assert!(b.list("", true).await.unwrap().objects.is_empty(), "the probe left an object behind");
    let sse_c_copy = sse_c.clone();
    for (name, opts) in [("plain", plain), ("sse-s3", sse_s3), ("sse-kms", sse_kms), ("sse-c", sse_c)] {
        let (b, _) = from_url(&format!("s3://{bucket}"), &opts).unwrap();
        conditional_contract(b.as_ref(), &format!("{name}/")).await;
        // LocalStack 4.14 answers a conditional delete with 501; AWS checks it (since September 2025).
        let localstack = std::env::var("S3CRYPTFS_TEST_SERVER").is_ok_and(|s| s == "localstack");
        delete_if_contract(b.as_ref(), &format!("{name}/"), if localstack { Some(false) } else { None }).await;
        rename_if_contract(b.as_ref(), &format!("{name}/"), name == "plain").await;
    }
    // SSE-C: a copied part would need the source's customer-key headers as well as the part's; not sent, so refused.
    let (b, _) = from_url(&format!("s3://{bucket}"), &sse_c_copy).unwrap();
    copy_part_is_refused(b.as_ref()).await;
}

/// A fresh prefix in the Azurite container of scripts/azurite.sh (started by scripts/test.sh), through `from_url`.
fn azure_backend(what: &str) -> Arc<dyn Backend> {
    let container = std::env::var("S3CRYPTFS_TEST_AZURE_CONTAINER")
        .expect("S3CRYPTFS_TEST_AZURE_CONTAINER is not set: run the tests with scripts/test.sh, which starts Azurite");
    let url = format!("az://{container}/{what}-{}-{}", std::process::id(), nanos_now());
    from_url(&url, &S3Options::default()).unwrap().0
}

#[tokio::test]
async fn conformance_azure() {
    conformance(azure_backend("conformance").as_ref()).await;
}

/// Two conditional uploads of one blob, their blocks sent in turn (`azure.rs`: ids of their own, blocks committed by
/// the block list): whichever commits first wins whole, the other fails as a lost race, for a new file as for a
/// replacement, and no block of the loser is in the blob.
#[tokio::test]
async fn racing_uploads_in_blocks_azure() {
    let b = azure_backend("race");
    let k = key("raced");
    let v1 = b.put_expect(&k, Bytes::from_static(b"v1"), &file_meta("v1"), &Expect::Absent).await.unwrap();
    let v1 = v1.etag.expect("etag");
    let gone = key("created");
    for (k, expect) in [(&k, Expect::Etag(v1)), (&gone, Expect::Absent)] {
        let mut loser = b.put_multipart_expect(k, &file_meta("loser"), &expect).await.unwrap();
        let mut winner = b.put_multipart_expect(k, &file_meta("winner"), &expect).await.unwrap();
        for fill in 0..3u8 {
            // The loser's block after the winner's: with shared ids it would replace the winner's.
            winner.put_part(Bytes::from(vec![fill + 10; 1000])).await.unwrap();
            loser.put_part(Bytes::from(vec![fill; 1000])).await.unwrap();
        }
        let won = winner.complete().await.unwrap();
        let lost = loser.complete().await;
        assert!(lost.as_ref().is_err_and(StoreError::is_precondition), "{k}: the second commit: {lost:?}");
        let (body, info, meta) = b.get(k).await.unwrap();
        let expected: Vec<u8> = (10..13u8).flat_map(|f| vec![f; 1000]).collect();
        assert!(body[..] == expected[..], "{k}: the blob ({} bytes) is not the winner's bytes", body.len());
        assert_eq!((info.etag, meta), (won.etag, file_meta("winner")), "{k}");
    }
}

/// Block requests are signed over the blob's URL as object_store escapes it: names with spaces, `#`, `?`, `%`, `&`,
/// `=`, quotes and non-ASCII letters go up in blocks, conditionally, and read back whole with their metadata.
#[tokio::test]
async fn uploads_in_blocks_of_names_that_need_escaping_azure() {
    let b = azure_backend("names");
    for name in ["d ir+ü/x#y?z%25&w=1.bin", "q'uo\"te;€.bin"] {
        let k = key(name);
        let mut up = b.put_multipart_expect(&k, &file_meta("n"), &Expect::Absent).await.unwrap();
        up.put_part(Bytes::from(vec![1u8; 3000])).await.unwrap();
        up.put_part(Bytes::from(vec![2u8; 3000])).await.unwrap();
        let info = up.complete().await.unwrap();
        let (body, got, meta) = b.get(&k).await.unwrap();
        assert!(body.len() == 6000 && body[..3000].iter().all(|&x| x == 1) && body[3000..].iter().all(|&x| x == 2));
        assert_eq!((got.etag, meta), (info.etag, file_meta("n")), "{name}");
    }
}

/// Azure has Put Block From URL, but Azurite (what the tests run against) does not: `copy_part` is refused as on GCS
/// (see `azure.rs`), and a large file changed in place is rewritten whole.
#[tokio::test]
async fn copy_part_is_refused_azure() {
    copy_part_is_refused(azure_backend("copy-part").as_ref()).await;
}

#[tokio::test]
async fn conditional_writes_azure() {
    let b = azure_backend("cond");
    conditional_contract(b.as_ref(), "").await;
    // object_store has no conditional delete on Azure: delete_if deletes as delete does.
    delete_if_contract(b.as_ref(), "", Some(false)).await;
}

/// A fresh prefix in the bucket of the GCS emulator of scripts/gcs.sh (fake-gcs-server, started by scripts/test.sh;
/// `STORAGE_EMULATOR_HOST` in the env), through `from_url`.
fn gcs_backend(what: &str) -> Arc<dyn Backend> {
    let bucket = std::env::var("S3CRYPTFS_TEST_GCS_BUCKET")
        .expect("S3CRYPTFS_TEST_GCS_BUCKET is not set: run the tests with scripts/test.sh (it starts fake-gcs-server)");
    let url = format!("gs://{bucket}/{what}-{}-{}", std::process::id(), nanos_now());
    from_url(&url, &S3Options::default()).unwrap().0
}

#[tokio::test]
async fn conformance_gcs() {
    conformance(gcs_backend("conformance").as_ref()).await;
}

/// GCS copies whole objects only (`rewriteTo`, `compose`), never a range of one into an upload: `copy_part` says so,
/// which makes an in-place update rewrite the file whole (`inplace::Fallback::CopyUnsupported`), and the upload can
/// still be given up without a trace.
#[tokio::test]
async fn copy_part_is_refused_gcs() {
    copy_part_is_refused(gcs_backend("copy-part").as_ref()).await;
}

async fn copy_part_is_refused(b: &dyn Backend) {
    assert!(!b.copies_parts(), "a store that cannot copy parts says it can: in-place updates start for nothing");
    let k = key("in-place");
    let v1 = b.put_expect(&k, Bytes::from_static(b"v1 bytes"), &file_meta("v1"), &Expect::Absent).await.unwrap();
    let v1 = v1.etag.expect("etag");
    let mut up = b.put_multipart_expect(&k, &file_meta("v2"), &Expect::Etag(v1.clone())).await.unwrap();
    assert!(!up.copies_parts(), "an upload that cannot copy parts says it can: in-place updates start for nothing");
    let copied = up.copy_part(0..4, &v1).await;
    assert!(matches!(copied, Err(StoreError::Unsupported { .. })), "{copied:?}");
    up.abort().await.unwrap();
    let (body, info, meta) = b.get(&k).await.unwrap();
    assert_eq!((&body[..], info.etag, meta), (&b"v1 bytes"[..], Some(v1), file_meta("v1")));
}

#[tokio::test]
async fn conditional_writes_gcs() {
    let b = gcs_backend("cond");
    conditional_contract(b.as_ref(), "").await;
    // No conditional delete through object_store: delete_if deletes as delete does.
    delete_if_contract(b.as_ref(), "", Some(false)).await;
}

/// Uploads in parts go out as one resumable upload whose chunks must be multiples of 256 KiB: parts of odd sizes,
/// parts smaller than a chunk, an empty part and no parts at all all make the object they add up to.
#[tokio::test]
async fn parts_of_any_size_make_one_object_gcs() {
    let b = gcs_backend("parts");
    let meta = UserMeta::default();
    let sizes: [&[usize]; 4] = [&[], &[1], &[300_000, 5, 0, 262_144, 700_000], &[262_144, 262_144]];
    for (i, parts) in sizes.iter().enumerate() {
        let k = key(&format!("f{i}"));
        let mut up = b.put_multipart(&k, &meta).await.unwrap();
        let mut want = Vec::new();
        for (j, len) in parts.iter().enumerate() {
            let part: Vec<u8> = (0..*len).map(|n| (n * 7 + j * 13 + i) as u8).collect();
            want.extend_from_slice(&part);
            up.put_part(Bytes::from(part)).await.unwrap();
        }
        let info = up.complete().await.unwrap();
        assert_eq!(info.size, want.len() as u64, "{parts:?}");
        let (got, head, _) = b.get(&k).await.unwrap();
        assert_eq!(got.len(), want.len(), "{parts:?}");
        assert!(got[..] == want[..], "{parts:?}: content differs");
        assert_eq!(head.etag, info.etag, "{parts:?}: a read's ETag is not the upload's");
    }
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000
}

/// Regression (issue 10.7e): after the bucket was deleted, S3's 404 NoSuchBucket became "object not found", so an
/// upload failed with ENOENT (and no log line). Every write path must say the bucket is missing instead.
#[tokio::test]
async fn a_missing_bucket_is_not_a_missing_object_s3() {
    let endpoint = std::env::var("S3CRYPTFS_TEST_S3_ENDPOINT")
        .expect("S3CRYPTFS_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts the S3 server");
    let opts = S3Options {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        allow_http: true,
        ..S3Options::default()
    };
    let (b, _) = from_url(&format!("s3://never-created-{}-{}", std::process::id(), nanos_now()), &opts).unwrap();
    let missing_bucket = |what: &str, e: StoreError| {
        assert!(matches!(e, StoreError::MissingBucket { .. }), "{what}: {e:?}");
    };
    let k = key("f");
    missing_bucket("put", b.put(&k, Bytes::from_static(b"x"), &UserMeta::default()).await.unwrap_err());
    missing_bucket("get", b.get(&k).await.unwrap_err());
    for expect in [Expect::Any, Expect::Absent] {
        match b.put_multipart_expect(&k, &UserMeta::default(), &expect).await {
            Err(e) => missing_bucket("multipart create", e),
            Ok(mut up) => {
                let part = up.put_part(Bytes::from_static(b"x")).await;
                let e = match part {
                    Err(e) => e,
                    Ok(()) => up.complete().await.unwrap_err(),
                };
                missing_bucket("multipart", e);
            }
        }
    }
}

/// Issue 13 (`fs::precheck`): where the backend checks conditions with a HEAD, an answer from a HEAD sent ahead
/// stands for that check within `PRECHECK_TRUSTED` of its sending, judged at the check; what it found decides as the
/// backend's own HEAD would; and the write still carries its condition, so a server that holds conditions (here the
/// in-memory store, the backend told otherwise, as after a probe that could not tell) refuses a creator that came
/// after the HEAD.
#[tokio::test]
async fn an_answer_from_ahead_stands_for_the_check_within_its_time_and_the_condition_is_still_sent() {
    let b = ObjectStoreBackend::new(Arc::new(InMemory::new()), "").unwrap();
    b.assume_conditions_ignored();
    let absent = |k: &str| Prechecked { key: k.into(), sent: std::time::Instant::now(), found: None };
    let k = key("new");
    with_prechecked(
        Some(absent("new")),
        b.put_expect(&k, Bytes::from_static(b"mine"), &file_meta("1"), &Expect::Absent),
    )
    .await
    .unwrap();
    assert_eq!(b.condition_heads(), 0, "the answer stood for the HEAD");

    // Another key's answer stands for nothing; an answer past its time neither.
    let other = key("other");
    with_prechecked(
        Some(absent("new")),
        b.put_expect(&other, Bytes::from_static(b"x"), &file_meta("2"), &Expect::Absent),
    )
    .await
    .unwrap();
    assert_eq!(b.condition_heads(), 1);
    let sent = std::time::Instant::now() - PRECHECK_TRUSTED - std::time::Duration::from_millis(1);
    let old = Prechecked { sent, ..absent("late") };
    with_prechecked(
        Some(old),
        b.put_expect(&key("late"), Bytes::from_static(b"x"), &file_meta("3"), &Expect::Absent),
    )
    .await
    .unwrap();
    assert_eq!(b.condition_heads(), 2);

    // Found a version: a write expecting nothing is refused without asking.
    let found = Prechecked { found: Some("\"v\"".into()), ..absent("fresh") };
    let r = with_prechecked(
        Some(found),
        b.put_expect(&key("fresh"), Bytes::from_static(b"x"), &file_meta("4"), &Expect::Absent),
    )
    .await;
    assert!(matches!(r, Err(StoreError::Precondition { .. })), "{r:?}");
    assert_eq!(b.condition_heads(), 2);

    // "Nothing there" when asked, but a creator came since: the condition the write carries stops it.
    let race = key("race");
    b.put(&race, Bytes::from_static(b"theirs"), &file_meta("5")).await.unwrap();
    let r = with_prechecked(
        Some(absent("race")),
        b.put_expect(&race, Bytes::from_static(b"mine"), &file_meta("6"), &Expect::Absent),
    )
    .await;
    assert!(matches!(r, Err(StoreError::Precondition { .. })), "{r:?}");
    assert_eq!(&b.get(&race).await.unwrap().0[..], b"theirs");
}
