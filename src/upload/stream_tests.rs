//! Streams over an in-memory store: the object a stream makes is the file, byte for byte, in parts of the usual
//! sizes, whatever the sizes of the writes that fed it; an abandoned stream leaves nothing behind.

use std::sync::Arc;

use super::*;
use crate::crypto::{AeadBackend, Key256, KeyHistory};
use crate::store::ObjectStoreBackend;
use crate::upload::tests::Recording;
use crate::upload::Memory;

fn cse() -> Codec {
    Codec::Cse {
        keys: Some(Arc::new(KeyHistory::single(Key256::generate()))),
        kms: None,
        aead: AeadBackend::default(),
        format: crate::config::FileFormat::Own,
    }
}

fn recording() -> Recording {
    let inner = ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap();
    Recording { inner, parts: Arc::default(), hold_first: None }
}

fn file(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i * 31 % 253) as u8).collect()
}

/// Decrypts object `key` with `codec` (own format or plaintext).
async fn read_back(backend: &dyn Backend, codec: &Codec, key: &str, size: u64) -> Vec<u8> {
    let (body, _, meta) = backend.get(&ObjectKey::new(key).unwrap()).await.unwrap();
    assert_eq!(body.len() as u64, codec.stored_size(size));
    let header_len = codec.header_len() as usize;
    let mut oc = codec.open(&body[..header_len]).await.unwrap();
    // Whole uploads and streams are format version 3 with no version map (the implicit version: the file id).
    oc.attach_map(&meta, size).unwrap();
    if let Some(binding) = meta.extra.get(BIND_META) {
        oc.verify_binding(key, Some(binding)).unwrap();
    }
    let mut got = Vec::with_capacity(size as usize);
    let chunks = codec.chunk_count(size);
    for index in 0..chunks {
        let range = codec.chunk_range(index, size);
        oc.open(index, index + 1 == chunks, &body[range.start as usize..range.end as usize], &mut got).unwrap();
    }
    got
}

/// Feeds `plain` to a stream in writes of `step` bytes, advancing after each, then finishes it.
async fn stream_in_steps(backend: &Recording, codec: &Codec, plain: &[u8], step: usize) -> ObjectInfo {
    let meta = UserMeta { mode: Some(0o100640), mtime: Some((1, 2)), ..UserMeta::default() };
    let mut stream = Stream::start(backend, codec, "dir/f", meta, ("stamp", "s1".into()), Expect::Absent)
        .await
        .unwrap()
        .expect("streams in the own format");
    let mut written = 0;
    while written < plain.len() {
        written = (written + step).min(plain.len());
        stream.advance(&Memory(&plain[..written]), written as u64).await.unwrap();
        // Sealed bytes never include the chunk holding the last byte written.
        assert!(stream.sealed() < written as u64);
    }
    stream.finish(codec, &Memory(plain), plain.len() as u64).await.unwrap()
}

#[tokio::test]
async fn a_streamed_object_is_the_file_in_exact_parts() {
    for codec in [cse(), Codec::Plain] {
        for (size, step) in [
            (3 * PART_SIZE as u64 + 12_345, 128 << 10),
            (2 * PART_SIZE as u64, 1 << 20),
            (5 * PART_SIZE as u64 - 1, 100_003),
            (STREAM_FROM + CHUNK_PLAIN_LEN, 7 << 20),
        ] {
            let backend = recording();
            let plain = file(size);
            let info = stream_in_steps(&backend, &codec, &plain, step).await;
            assert_eq!(info.size, codec.stored_size(size));
            let parts = backend.parts.lock().unwrap().clone();
            assert_eq!(parts.iter().map(|&p| p as u64).sum::<u64>(), codec.stored_size(size), "{parts:?}");
            let (last, whole) = parts.split_last().unwrap();
            assert!(whole.iter().all(|&p| p == PART_SIZE), "size {size} step {step}: {parts:?}");
            assert!(*last > 0 && *last <= PART_SIZE, "{parts:?}");
            let got = read_back(&backend, &codec, "dir/f", size).await;
            assert!(got == plain, "size {size} step {step}: the object is the file");
            let (_, meta) = backend.head(&ObjectKey::new("dir/f").unwrap()).await.unwrap();
            assert_eq!(meta.mode, Some(0o100640));
            assert_eq!(meta.mtime, None, "a stream's metadata carries no mtime");
            assert_eq!(meta.extra.get("stamp").map(String::as_str), Some("s1"));
        }
    }
}

/// Parts go out while the file is written: after 5 parts' worth of writes at least 3 parts were sent (the chunk
/// holding the last byte and up to a part in flight stay behind), and nothing is visible before finish.
#[tokio::test]
async fn parts_are_sent_while_writing_and_nothing_shows_before_finish() {
    let backend = recording();
    let codec = cse();
    let plain = file(5 * PART_SIZE as u64);
    let mut stream = Stream::start(&backend, &codec, "f", UserMeta::default(), ("stamp", "x".into()), Expect::Absent)
        .await
        .unwrap()
        .unwrap();
    stream.advance(&Memory(&plain), plain.len() as u64).await.unwrap();
    assert!(backend.parts.lock().unwrap().len() >= 4, "{:?}", backend.parts.lock().unwrap());
    assert!(backend.head(&ObjectKey::new("f").unwrap()).await.unwrap_err().is_not_found());
    stream.finish(&codec, &Memory(&plain), plain.len() as u64).await.unwrap();
    assert_eq!(read_back(&backend, &codec, "f", plain.len() as u64).await, plain);
}

/// A stream given up (or dropped) publishes nothing, and a later whole upload is unaffected.
#[tokio::test]
async fn an_abandoned_stream_leaves_nothing() {
    let backend = recording();
    let codec = cse();
    let plain = file(3 * PART_SIZE as u64);
    let mut stream = Stream::start(&backend, &codec, "f", UserMeta::default(), ("stamp", "x".into()), Expect::Absent)
        .await
        .unwrap()
        .unwrap();
    stream.advance(&Memory(&plain), plain.len() as u64).await.unwrap();
    stream.abandon();
    tokio::task::yield_now().await;
    assert!(backend.head(&ObjectKey::new("f").unwrap()).await.unwrap_err().is_not_found());
    crate::upload::upload(&backend, &codec, "f", &Memory(&plain), plain.len() as u64, UserMeta::default(), &Expect::Absent, None)
        .await
        .unwrap();
    assert_eq!(read_back(&backend, &codec, "f", plain.len() as u64).await, plain);
}

/// Completion is conditional like any upload: a stream expecting no object fails if one appeared meanwhile, and
/// the object there stays.
#[tokio::test]
async fn a_stream_loses_a_race_without_overwriting() {
    let backend = recording();
    let codec = Codec::Plain;
    let plain = file(3 * PART_SIZE as u64);
    let mut stream = Stream::start(&backend, &codec, "f", UserMeta::default(), ("stamp", "x".into()), Expect::Absent)
        .await
        .unwrap()
        .unwrap();
    stream.advance(&Memory(&plain), plain.len() as u64).await.unwrap();
    let other = Bytes::from_static(b"someone else");
    backend.put_expect(&ObjectKey::new("f").unwrap(), other.clone(), &UserMeta::default(), &Expect::Any).await.unwrap();
    let err = stream.finish(&codec, &Memory(&plain), plain.len() as u64).await.unwrap_err();
    assert!(matches!(&err, Error::Store { source, .. } if matches!(source, StoreError::Precondition { .. })), "{err:?}");
    let (body, _, _) = backend.get(&ObjectKey::new("f").unwrap()).await.unwrap();
    assert_eq!(body, other);
}

/// A part that lags (here the first, held until released) holds the writer back once UNCONFIRMED_PARTS parts are out
/// past the confirmed prefix, though fewer than PARTS_IN_FLIGHT travel: the staged copy a low disk must keep does
/// not grow behind one slow part. Released, the stream goes on and the object is the file.
#[tokio::test]
async fn a_lagging_part_holds_the_writer_back() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let backend = Recording { hold_first: Some(gate.clone()), ..recording() };
    let codec = cse();
    let plain = file(16 * PART_SIZE as u64 + 5);
    let meta = UserMeta { mode: Some(0o100640), ..UserMeta::default() };
    let mut stream = Stream::start(&backend, &codec, "dir/f", meta, ("stamp", "s1".into()), Expect::Absent)
        .await
        .unwrap()
        .expect("streams in the own format");
    let size = plain.len() as u64;
    let advanced = tokio::time::timeout(std::time::Duration::from_secs(2), stream.advance(&Memory(&plain), size)).await;
    assert!(advanced.is_err(), "the writer ran on past a part that lagged");
    assert_eq!(backend.parts.lock().unwrap().len() as u64, UNCONFIRMED_PARTS, "parts sent while the first lagged");
    assert_eq!(stream.confirmed_plain(), 0);
    gate.notify_one();
    stream.advance(&Memory(&plain), size).await.unwrap();
    let info = stream.finish(&codec, &Memory(&plain), size).await.unwrap();
    assert_eq!(info.size, codec.stored_size(size));
    assert_eq!(read_back(&backend, &codec, "dir/f", size).await, plain);
}
