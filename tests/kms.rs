//! The KMS client against the real KMS API of the test server (LocalStack, on the S3 port): GenerateDataKey/Decrypt
//! round trips, the data-key cache, the encryption context binding, key states and errno mapping, plain http and
//! https with a private CA.
//!
//! Needs the server: `scripts/test.sh`, or `eval "$(scripts/s3-server.sh env)"` after `scripts/s3-server.sh start`.
//! Without it the tests fail with a message saying so; they never skip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use s3cryptfs::aws::SignedClient;
use s3cryptfs::kms::{KmsClient, KmsError};
use s3cryptfs::store::{signed_client, S3Options};

fn env(name: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        panic!(
            "{name} is not set: start the test server (scripts/s3-server.sh start) and eval its env, or run \
             scripts/test.sh"
        )
    })
}

/// A signing client with the test server's credentials. Refuses to run without `AWS_ACCESS_KEY_ID`: the credential
/// chain would otherwise wait on the EC2 metadata endpoint.
fn signed(ca_file: Option<String>) -> SignedClient {
    env("AWS_ACCESS_KEY_ID");
    signed_client(&S3Options { ca_file: ca_file.map(Into::into), ..Default::default() }).expect("signed client")
}

fn http_endpoint() -> String {
    env("S3CRYPTFS_TEST_KMS_ENDPOINT")
}

fn client(key_id: Option<&str>) -> KmsClient {
    KmsClient::new(signed(None), http_endpoint(), key_id.map(str::to_string))
}

/// A raw KMS call for test setup (CreateKey, DisableKey…); panics on failure.
async fn admin(action: &str, body: serde_json::Value) -> serde_json::Value {
    let headers = [
        ("X-Amz-Target", format!("TrentService.{action}")),
        ("Content-Type", "application/x-amz-json-1.1".to_string()),
    ];
    let resp = signed(None)
        .send("kms", http::Method::POST, &format!("{}/", http_endpoint()), &headers, Bytes::from(body.to_string()))
        .await
        .unwrap_or_else(|e| panic!("KMS {action} failed: {e}"));
    serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null)
}

/// A new enabled symmetric key; its key id (not the ARN).
async fn create_key() -> String {
    let answer = admin("CreateKey", serde_json::json!({"Description": "s3cryptfs tests/kms.rs"})).await;
    answer["KeyMetadata"]["KeyId"].as_str().expect("CreateKey answers with a KeyId").to_string()
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// An encryption context like the filesystem's: a file id unique to this call.
fn context() -> Vec<(&'static str, String)> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    vec![("s3cryptfs:file-id", format!("{:x}{:04x}{n:04x}", t, std::process::id() & 0xffff))]
}

#[tokio::test]
async fn generated_key_decrypts_to_the_same_bytes_and_is_cached() {
    let key_id = create_key().await;
    let writer = client(Some(&key_id));
    let ctx = context();
    let generated = writer.generate_data_key(&ctx).await.expect("GenerateDataKey");
    assert!(generated.key_arn.starts_with("arn:") && generated.key_arn.ends_with(&key_id), "{}", generated.key_arn);
    assert!(!generated.blob.is_empty());
    assert_eq!(writer.kms_calls(), 1);
    eprintln!("CiphertextBlob {} bytes, key ARN {} bytes", generated.blob.len(), generated.key_arn.len());

    // Reading back what this client just wrote costs no KMS call, by key id or by ARN.
    let again = writer.decrypt(&key_id, &generated.blob, &ctx).await.expect("cached decrypt");
    assert_eq!(again.as_bytes(), generated.data_key.as_bytes());
    let again = writer.decrypt(&generated.key_arn, &generated.blob, &ctx).await.expect("cached decrypt by ARN");
    assert_eq!(again.as_bytes(), generated.data_key.as_bytes());
    assert_eq!(writer.kms_calls(), 1, "reading back a key just generated must not call KMS");

    // A fresh client (another mount) asks KMS once, then serves the same object from its cache.
    let reader = client(None);
    let k1 = reader.decrypt(&generated.key_arn, &generated.blob, &ctx).await.expect("Decrypt");
    assert_eq!(k1.as_bytes(), generated.data_key.as_bytes(), "KMS unwraps to the generated key");
    assert_eq!(reader.kms_calls(), 1);
    let k2 = reader.decrypt(&generated.key_arn, &generated.blob, &ctx).await.expect("Decrypt again");
    assert_eq!(k2.as_bytes(), generated.data_key.as_bytes());
    assert_eq!(reader.kms_calls(), 1, "the second decrypt of one object is served from the cache");
}

#[tokio::test]
async fn concurrent_decrypts_of_one_blob_share_one_call() {
    let key_id = create_key().await;
    let ctx = context();
    let generated = client(Some(&key_id)).generate_data_key(&ctx).await.expect("GenerateDataKey");
    let reader = Arc::new(client(None));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (reader, blob, ctx, key_id) = (reader.clone(), generated.blob.clone(), ctx.clone(), key_id.clone());
            tokio::spawn(async move { reader.decrypt(&key_id, &blob, &ctx).await.map(|k| *k.as_bytes()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(&t.await.unwrap().expect("Decrypt"), generated.data_key.as_bytes());
    }
    assert_eq!(reader.kms_calls(), 1, "eight concurrent readers of one object wait for one KMS call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decrypts_share_one_call_on_a_multi_threaded_runtime() {
    let key_id = create_key().await;
    let ctx = context();
    let generated = client(Some(&key_id)).generate_data_key(&ctx).await.expect("GenerateDataKey");
    let reader = Arc::new(client(None));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (reader, blob, ctx, key_id) = (reader.clone(), generated.blob.clone(), ctx.clone(), key_id.clone());
            tokio::spawn(async move { reader.decrypt(&key_id, &blob, &ctx).await.map(|k| *k.as_bytes()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(&t.await.unwrap().expect("Decrypt"), generated.data_key.as_bytes());
    }
    assert_eq!(reader.kms_calls(), 1);
}

#[tokio::test]
async fn another_file_id_or_another_key_is_refused_as_invalid_ciphertext() {
    let key_id = create_key().await;
    let other_key = create_key().await;
    let ctx = context();
    let writer = client(Some(&key_id));
    let generated = writer.generate_data_key(&ctx).await.expect("GenerateDataKey");

    // The same client has the key cached for `ctx`, but the cache must not answer for another context.
    let swapped = context();
    let err = writer.decrypt(&key_id, &generated.blob, &swapped).await.expect_err("another file id must fail");
    assert!(matches!(err, KmsError::InvalidCiphertext { key_id: ref k, .. } if k == &key_id), "{err:?}");
    assert!(err.to_string().contains(&key_id) && err.to_string().contains("tampered"), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(writer.kms_calls(), 2, "the wrong context went to KMS");

    // The header names a different key than the one that wrapped the blob.
    let err = client(None).decrypt(&other_key, &generated.blob, &ctx).await.expect_err("wrong key id must fail");
    assert!(matches!(err, KmsError::InvalidCiphertext { .. }), "{err:?}");
    assert!(err.to_string().contains(&other_key), "{err}");

    // A flipped bit in the blob.
    let mut tampered = generated.blob.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let err = client(None).decrypt(&key_id, &tampered, &ctx).await.expect_err("tampered blob must fail");
    assert!(matches!(err, KmsError::InvalidCiphertext { .. }), "{err:?}");

    // Failures are not cached: the right context still works on the client that saw them.
    let reader = client(None);
    assert!(reader.decrypt(&key_id, &generated.blob, &swapped).await.is_err());
    let k = reader.decrypt(&key_id, &generated.blob, &ctx).await.expect("right context");
    assert_eq!(k.as_bytes(), generated.data_key.as_bytes());
}

#[tokio::test]
async fn a_disabled_key_fails_clearly_and_works_again_once_enabled() {
    let key_id = create_key().await;
    let ctx = context();
    let writer = client(Some(&key_id));
    let generated = writer.generate_data_key(&ctx).await.expect("GenerateDataKey");

    admin("DisableKey", serde_json::json!({"KeyId": key_id})).await;
    let err = client(None).decrypt(&key_id, &generated.blob, &ctx).await.expect_err("disabled key");
    assert!(matches!(err, KmsError::Disabled { key_id: ref k, .. } if k == &key_id), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&key_id) && msg.contains("disabled"), "{msg}");
    assert_eq!(err.errno(), libc::EIO);
    let err = writer.generate_data_key(&context()).await.expect_err("no new keys under a disabled key");
    assert!(matches!(err, KmsError::Disabled { .. }), "{err:?}");
    // Keys this client already holds stay usable until evicted (documented in src/kms.rs).
    assert!(writer.decrypt(&key_id, &generated.blob, &ctx).await.is_ok());

    admin("EnableKey", serde_json::json!({"KeyId": key_id})).await;
    let k = client(None).decrypt(&key_id, &generated.blob, &ctx).await.expect("enabled again");
    assert_eq!(k.as_bytes(), generated.data_key.as_bytes());
}

#[tokio::test]
async fn a_key_pending_deletion_is_reported_as_disabled() {
    let key_id = create_key().await;
    let ctx = context();
    let generated = client(Some(&key_id)).generate_data_key(&ctx).await.expect("GenerateDataKey");
    admin("ScheduleKeyDeletion", serde_json::json!({"KeyId": key_id, "PendingWindowInDays": 7})).await;
    let err = client(None).decrypt(&key_id, &generated.blob, &ctx).await.expect_err("pending deletion");
    assert!(matches!(err, KmsError::Disabled { .. }), "{err:?}");
    assert!(err.to_string().contains(&key_id), "{err}");
    admin("CancelKeyDeletion", serde_json::json!({"KeyId": key_id})).await;
}

#[tokio::test]
async fn an_unknown_key_is_not_found() {
    let missing = "00000000-0000-4000-8000-000000000000";
    let err = client(Some(missing)).generate_data_key(&context()).await.expect_err("unknown key");
    assert!(matches!(err, KmsError::NotFound { key_id: ref k, .. } if k == missing), "{err:?}");
    assert!(err.to_string().contains(missing), "{err}");
    assert_eq!(err.errno(), libc::EIO);

    let key_id = create_key().await;
    let ctx = context();
    let generated = client(Some(&key_id)).generate_data_key(&ctx).await.expect("GenerateDataKey");
    let err = client(None).decrypt(missing, &generated.blob, &ctx).await.expect_err("unknown key");
    assert!(matches!(err, KmsError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn without_a_key_id_generate_fails_without_calling_kms() {
    let c = client(None);
    let err = c.generate_data_key(&context()).await.expect_err("no key id");
    assert!(matches!(err, KmsError::NoKeyId), "{err:?}");
    assert!(err.to_string().contains("kms_key_id="), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(c.kms_calls(), 0);
}

#[test]
fn errno_is_eacces_for_denials_and_eio_otherwise() {
    let k = || "k".to_string();
    let m = || "m".to_string();
    assert_eq!(KmsError::AccessDenied { key_id: k(), message: m() }.errno(), libc::EACCES);
    for e in [
        KmsError::Disabled { key_id: k(), message: m() },
        KmsError::NotFound { key_id: k(), message: m() },
        KmsError::InvalidCiphertext { key_id: k(), message: m() },
        KmsError::NoKeyId,
        KmsError::Unavailable { key_id: k(), detail: m() },
        KmsError::Other { key_id: k(), code: "X".into(), message: m() },
    ] {
        assert_eq!(e.errno(), libc::EIO, "{e:?}");
    }
}

#[tokio::test]
async fn https_with_the_private_ca_works_and_without_it_is_unavailable() {
    let https = env("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT");
    let ca = env("S3CRYPTFS_TEST_CA_FILE");
    let key_id = create_key().await;
    let ctx = context();
    let c = KmsClient::new(signed(Some(ca)), https.clone(), Some(key_id.clone()));
    let generated = c.generate_data_key(&ctx).await.expect("GenerateDataKey over https");
    let k = KmsClient::new(signed(Some(env("S3CRYPTFS_TEST_CA_FILE"))), https.clone(), None)
        .decrypt(&key_id, &generated.blob, &ctx)
        .await
        .expect("Decrypt over https");
    assert_eq!(k.as_bytes(), generated.data_key.as_bytes());

    // The server's certificate is signed by the test CA only: without it TLS fails, after the retries.
    let untrusted = KmsClient::new(signed(None), https.clone(), Some(key_id.clone()));
    let err = untrusted.generate_data_key(&ctx).await.expect_err("untrusted certificate");
    assert!(matches!(err, KmsError::Unavailable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&key_id) && msg.contains("127.0.0.1"), "{msg}");
}
