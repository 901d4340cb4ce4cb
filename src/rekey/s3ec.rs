//! One AWS S3 Encryption Client (S3EC) object of a rekey (issue 12): re-wrap its data key under the current writing
//! key by replacing its metadata, without touching its content.
//!
//! An S3EC object keeps its wrapped data key in user metadata (`x-amz-key-v2` in format V2, `x-amz-3` in V3; see the
//! project's S3EC.md), so moving it to another key is a metadata-only change: on S3 one CopyObject of the object onto
//! itself with the new metadata (`Backend::update_meta_if`), no content through the client. The data key stays the
//! same, so the content, the IV or message id and the V3 key commitment (which binds the data key, not its wrap)
//! stay valid, and the official clients read the object as before.
//!
//! What moves, per mode:
//! - **cse-c**: `AES/GCM`-wrapped objects whose data key unwraps with a key of the history other than the first get
//!   it re-wrapped under the first key, with a fresh wrap IV and the same AAD (the content suite's name). One that
//!   unwraps with the first key is current. V3 objects must pass their key-commitment check first: one that does not
//!   was tampered with and is a failure, left alone.
//! - **cse-kms**: `kms+context` objects have their blob moved to `kms_key_id` with KMS `ReEncrypt`, under the
//!   encryption context stored in the object (checked as the clients check it, `kms_decrypt_request`). S3EC blobs do
//!   not say which KMS key wrapped them, so one `Decrypt` without `KeyId` asks KMS first (`KmsClient::key_of`; the
//!   data key it returns is dropped): under the target already, the object is current; otherwise `ReEncrypt` from
//!   that key. So every run costs one KMS call per current S3EC KMS object and two per moved one, and rekey needs
//!   `kms:Decrypt` on the old keys for them (unlike for our own format, whose header names the key).
//! - The other wrap's objects (kms+context in cse-c, AES/GCM in cse-kms) are another mode's, as for our own format.
//!
//! Left alone and reported ([`Skip::S3ecLeft`], one line per object on stderr, since they still need the key they are
//! wrapped under): format V1, legacy AES-CBC content, `RSA-OAEP-SHA1` and the legacy wraps (s3cryptfs reads none of
//! them), and objects whose envelope is in an instruction file (`KEY.instruction`): rotating those would mean
//! rewriting the instruction file, which rekey does not do (yet); the Java client's `ReEncryptInstructionFile` can.
//! A V1/V2 instruction-file object whose own metadata holds no S3EC key at all is indistinguishable from a foreign
//! object without reading its instruction file, and counts as one. Instruction files themselves are not objects of
//! ours either.
//!
//! Only the wrapped data key's value changes in the metadata; every other entry (the other S3EC keys exactly as the
//! writer formatted them, the POSIX attributes s3cryptfs keeps beside them) is written back as read. The new metadata
//! is read back with `detect` before it is written and must give the same envelope with the new wrapped key.
//!
//! The replacement is conditional on the ETag the decision was made on, so an object rewritten in between (a new
//! ETag) is read again, not clobbered. What the ETag cannot show is a concurrent *metadata-only* change (a chmod
//! through a mount): S3 keeps the ETag across a metadata replacement, so such a change made between our read and
//! our write is lost, while the rekeyed envelope stays correct (see docs/ROTATION.md).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::object::{Outcome, Skip, Step, Target};
use crate::crypto::s3ec::{
    self, keys, ContentKey, Detection, Envelope, FormatVersion, S3ecError, WrapAlg, KMS_CONTEXT_CEK_ALG,
    KMS_CONTEXT_CMK_ID, META_PREFIX,
};
use crate::crypto::DataKey;
use crate::error_text::error_chain;
use crate::store::{Backend, ObjectKey, Transfer, UserMeta};

/// What an object's metadata says about S3EC.
#[derive(Debug)]
pub(crate) enum Found {
    /// A complete envelope in the object's own metadata.
    Envelope(Envelope),
    /// S3EC keys in the object, the rest of the envelope in its instruction file.
    InInstructionFile,
    /// The object is itself an instruction file (the sidecar of another object).
    Sidecar,
    /// S3EC keys that do not form an envelope.
    Broken(S3ecError),
}

/// `None` for an object without S3EC metadata (ours, or foreign); the same test a mount makes
/// (`Codec::format_hint`).
pub(crate) fn found_in(meta: &UserMeta) -> Option<Found> {
    match s3ec::detect(meta.extra.iter()) {
        Ok(Detection::Complete(envelope)) => Some(Found::Envelope(envelope)),
        Ok(Detection::NeedsInstructionFile(pending)) if pending.object_has_s3ec_metadata() => {
            Some(Found::InInstructionFile)
        }
        Ok(Detection::NeedsInstructionFile(_)) => None,
        Err(S3ecError::IsInstructionFile) => Some(Found::Sidecar),
        Err(e) => Some(Found::Broken(e)),
    }
}

/// What must happen to an S3EC object.
#[derive(Debug)]
pub(crate) enum S3ecPlan {
    Skip(Skip),
    /// cse-c: the data key (unwrapped with a key of the history other than the first) gets wrapped under the writing
    /// key.
    Rewrap { data_key: DataKey },
    /// cse-kms: ReEncrypt the blob to the target with this (stored, checked) encryption context.
    ReEncrypt { blob: Vec<u8>, context: Vec<(String, String)> },
}

/// Decides from the envelope alone (cse-c unwraps locally; cse-kms needs KMS to know more). `Err` for an object of
/// this mode that needs attention (a key the history lacks, a failed check): a failure, not a skip.
pub(crate) fn plan(target: &Target, envelope: &Envelope) -> Result<S3ecPlan, String> {
    if envelope.version() == FormatVersion::V1 {
        return Ok(S3ecPlan::Skip(Skip::S3ecLeft("S3EC format V1 (legacy AES-CBC), which s3cryptfs neither reads nor re-wraps")));
    }
    if envelope.suite() == s3ec::ContentSuite::AesCbc {
        return Ok(S3ecPlan::Skip(Skip::S3ecLeft("legacy AES-CBC content, which s3cryptfs neither reads nor re-wraps")));
    }
    match (envelope.wrap(), target) {
        (WrapAlg::AesGcm, Target::CustomerKey { keys, .. }) => {
            let mut found = None;
            for (index, kek) in keys.keys().enumerate() {
                match s3ec::aes_gcm_unwrap(kek, envelope) {
                    Ok(data_key) => {
                        found = Some((index, data_key));
                        break;
                    }
                    Err(S3ecError::KeyUnwrapFailed) => continue,
                    Err(e) => return Err(format!("its S3EC data key cannot be unwrapped: {e}")),
                }
            }
            let Some((from, data_key)) = found else {
                return Err(format!(
                    "no key of the key history ({} key(s)) unwraps its S3EC data key (AES/GCM wrap): add the key it is \
                     wrapped under below the new one, or it was tampered with",
                    keys.len()
                ));
            };
            // V3: the commitment must match the data key, or the object was tampered with (and reads fail anyway).
            ContentKey::for_decrypt(envelope, &data_key).map_err(|e| format!("it does not pass the S3EC checks: {e}"))?;
            if from == 0 {
                Ok(S3ecPlan::Skip(Skip::Current))
            } else {
                Ok(S3ecPlan::Rewrap { data_key })
            }
        }
        (WrapAlg::KmsContext, Target::Kms { .. }) => {
            // The reader's check with the user part of the stored context as the expected one (what a mount does):
            // the stored `aws:x-amz-cek-alg` must name the suite the metadata declares.
            let user_context = envelope
                .context()
                .iter()
                .filter(|(k, _)| *k != KMS_CONTEXT_CEK_ALG && *k != KMS_CONTEXT_CMK_ID)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let request = s3ec::kms_decrypt_request(envelope, &user_context)
                .map_err(|e| format!("it does not pass the S3EC checks: {e}"))?;
            Ok(S3ecPlan::ReEncrypt { blob: request.ciphertext_blob, context: request.encryption_context.into_iter().collect() })
        }
        (WrapAlg::AesGcm, Target::Kms { .. }) | (WrapAlg::KmsContext, Target::CustomerKey { .. }) => {
            Ok(S3ecPlan::Skip(Skip::OtherKind))
        }
        (WrapAlg::RsaOaepSha1, _) => {
            Ok(S3ecPlan::Skip(Skip::S3ecLeft("its S3EC data key is wrapped with RSA-OAEP-SHA1, which rekey does not re-wrap")))
        }
        (_, Target::ServerSideCustomerKey) => Ok(S3ecPlan::Skip(Skip::NotOurs)),
        _ => Ok(S3ecPlan::Skip(Skip::S3ecLeft("its S3EC data key has a legacy wrap, which s3cryptfs neither reads nor re-wraps"))),
    }
}

/// `meta` with the wrapped data key of `envelope` replaced by `new_edk` and nothing else changed, checked by reading
/// it back: it must give `envelope` with the new wrapped key.
pub(crate) fn rewrapped_metadata(meta: &UserMeta, envelope: &Envelope, new_edk: &[u8]) -> Result<UserMeta, String> {
    let name = match envelope.version() {
        FormatVersion::V2 => keys::KEY_V2,
        FormatVersion::V3 => keys::V3_KEY,
        FormatVersion::V1 => return Err("invariant broken: re-wrapping a V1 object".into()),
    };
    // The names as stored (detect matches any case, with or without the x-amz-meta- prefix, and accepts a repeat
    // with the same value): replace every spelling, so no stale copy is left to disagree.
    let stored: Vec<String> = meta
        .extra
        .keys()
        .filter(|k| {
            let lower = k.to_ascii_lowercase();
            lower.strip_prefix(META_PREFIX).unwrap_or(&lower) == name
        })
        .cloned()
        .collect();
    if stored.is_empty() {
        return Err(format!("invariant broken: the metadata has no {name} to replace"));
    }
    let mut new = meta.clone();
    for k in stored {
        new.extra.insert(k, BASE64.encode(new_edk));
    }
    let want = envelope.with_encrypted_data_key(new_edk.to_vec());
    match s3ec::detect(new.extra.iter()) {
        Ok(Detection::Complete(got)) if got == want => Ok(new),
        other => Err(format!("invariant broken: the re-wrapped metadata reads back as {other:?}")),
    }
}

/// One attempt at an S3EC object whose metadata (read with ETag `etag`) gave `found`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn step(
    target: &Target,
    backend: &dyn Backend,
    key: &ObjectKey,
    found: Found,
    meta: &UserMeta,
    etag: Option<&str>,
    dry_run: bool,
    cost: &mut Transfer,
    kms_calls: &mut u64,
) -> Step {
    let envelope = match found {
        Found::Envelope(envelope) => envelope,
        Found::InInstructionFile => {
            return Step::Done(Outcome::Skipped(Skip::S3ecLeft(
                "an S3EC object whose wrapped data key is in its instruction file, which rekey does not rewrite",
            )))
        }
        Found::Sidecar => return Step::Done(Outcome::Skipped(Skip::NotOurs)),
        Found::Broken(e) => return Step::Done(Outcome::Failed(format!("its S3EC metadata cannot be used: {e}"))),
    };
    let new_edk = match plan(target, &envelope) {
        Ok(S3ecPlan::Skip(why)) => return Step::Done(Outcome::Skipped(why)),
        Err(why) => return Step::Done(Outcome::Failed(why)),
        Ok(S3ecPlan::Rewrap { .. }) if dry_run => return Step::Done(Outcome::WouldRekey),
        Ok(S3ecPlan::Rewrap { data_key, .. }) => match rewrap(target, &envelope, &data_key) {
            Ok(edk) => edk,
            Err(why) => return Step::Done(Outcome::Failed(why)),
        },
        Ok(S3ecPlan::ReEncrypt { blob, context }) => {
            let Target::Kms { kms, arn } = target else {
                return Step::Done(Outcome::Failed("invariant broken: a ReEncrypt plan outside cse-kms".into()));
            };
            let context: Vec<(&str, String)> = context.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            // S3EC blobs do not name their KMS key: ask KMS which one it is.
            *kms_calls += 1;
            let source = match kms.key_of(&blob, &context).await {
                Ok(source) => source,
                Err(e) => {
                    return Step::Done(Outcome::Failed(format!(
                        "{e} (finding the KMS key of its S3EC data key needs kms:Decrypt on that key)"
                    )))
                }
            };
            if source == *arn || crate::kms::names_key(&source, arn) == Some(true) {
                return Step::Done(Outcome::Skipped(Skip::Current));
            }
            if dry_run {
                return Step::Done(Outcome::WouldRekey);
            }
            *kms_calls += 1;
            let moved = match kms.re_encrypt(&source, &blob, &context, arn).await {
                Ok(moved) => moved,
                Err(e) => {
                    return Step::Done(Outcome::Failed(format!(
                        "{e} (ReEncrypt needs kms:ReEncryptFrom on {source} and kms:ReEncryptTo on {arn})"
                    )))
                }
            };
            moved.blob
        }
    };
    let Some(etag) = etag else {
        return Step::Done(Outcome::Failed("the store reports no ETag for it, so it cannot be replaced safely".into()));
    };
    let new_meta = match rewrapped_metadata(meta, &envelope, &new_edk) {
        Ok(m) => m,
        Err(why) => return Step::Done(Outcome::Failed(why)),
    };
    match backend.update_meta_if(key, &new_meta, etag).await {
        Ok((_, spent)) => {
            *cost += spent;
            Step::Done(Outcome::Rekeyed)
        }
        // Changed since we read it: read it again.
        Err(e) if e.is_precondition() => Step::Retry,
        Err(e) if e.is_not_found() => Step::Done(Outcome::Skipped(Skip::Vanished)),
        Err(e) => Step::Done(Outcome::Failed(error_chain(&e))),
    }
}

/// cse-c: `data_key` wrapped under the writing key with a fresh IV, checked to unwrap back to it.
fn rewrap(target: &Target, envelope: &Envelope, data_key: &DataKey) -> Result<Vec<u8>, String> {
    let Target::CustomerKey { keys, .. } = target else {
        return Err("invariant broken: a re-wrap plan outside cse-c".into());
    };
    let kek = keys.encrypting_key();
    let edk = s3ec::aes_gcm_wrap(kek, data_key, envelope.suite()).map_err(|e| e.to_string())?;
    let unwrapped = s3ec::aes_gcm_unwrap(kek, &envelope.with_encrypted_data_key(edk.clone()))
        .map_err(|e| format!("invariant broken: the new wrap does not open: {e}"))?;
    if unwrapped.as_bytes() != data_key.as_bytes() {
        return Err("invariant broken: the new wrap holds another data key".into());
    }
    Ok(edk)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::crypto::s3ec::{new_object_aes, WriteFormat};
    use crate::crypto::{AeadBackend, Key256, KeyHistory};
    use crate::store::{Expect, Listing, ObjectInfo, ObjectStoreBackend, StoreError, Upload};

    fn history(keys: &[&Key256]) -> Arc<KeyHistory> {
        let text: String = keys.iter().map(|k| crate::crypto::format_new_key(k).to_string()).collect();
        Arc::new(KeyHistory::parse(&text).unwrap())
    }

    fn cse_c(keys: &[&Key256]) -> Target {
        Target::CustomerKey { keys: history(keys), aead: AeadBackend::AwsLc }
    }

    /// An S3EC object under `kek`: its metadata (with s3cryptfs's POSIX attributes beside the S3EC keys) and body.
    fn object(format: WriteFormat, kek: &Key256, plain: &[u8]) -> (UserMeta, Bytes) {
        let new = new_object_aes(format, kek, &BTreeMap::new()).unwrap();
        let body = new.sealer.encrypt(plain).unwrap();
        let meta = UserMeta {
            mode: Some(0o100640),
            uid: Some(1234),
            gid: Some(5678),
            mtime: Some((1_700_000_000, 5)),
            extra: new.envelope.to_metadata(),
        };
        (meta, Bytes::from(body))
    }

    fn envelope_of(meta: &UserMeta) -> Envelope {
        match found_in(meta) {
            Some(Found::Envelope(e)) => e,
            other => panic!("not a complete S3EC envelope: {other:?}"),
        }
    }

    /// What the pure core reads with `keys`: unwrap with any key of the history, check, decrypt.
    fn read(meta: &UserMeta, body: &[u8], keys: &[&Key256]) -> Result<Vec<u8>, S3ecError> {
        let envelope = envelope_of(meta);
        let data_key = keys
            .iter()
            .find_map(|k| s3ec::aes_gcm_unwrap(k, &envelope).ok())
            .ok_or(S3ecError::KeyUnwrapFailed)?;
        ContentKey::for_decrypt(&envelope, &data_key)?.decrypt(body)
    }

    #[test]
    fn aes_objects_are_rewrapped_only_when_under_an_older_key_of_the_history() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let target = cse_c(&[&b, &a]);
        for format in [WriteFormat::V2, WriteFormat::V3] {
            let (old, _) = object(format, &a, b"x");
            assert!(matches!(plan(&target, &envelope_of(&old)), Ok(S3ecPlan::Rewrap { .. })), "{format:?}");
            let (new, _) = object(format, &b, b"x");
            assert!(matches!(plan(&target, &envelope_of(&new)), Ok(S3ecPlan::Skip(Skip::Current))), "{format:?}");
            let (stranger, _) = object(format, &Key256::generate(), b"x");
            let err = plan(&target, &envelope_of(&stranger)).unwrap_err();
            assert!(err.contains("no key of the key history (2 key(s))"), "{err}");
        }
    }

    #[test]
    fn other_wraps_and_formats_are_skipped_or_refused_with_a_reason() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let target = cse_c(&[&b, &a]);
        let (v3, _) = object(WriteFormat::V3, &a, b"x");
        // RSA-OAEP-SHA1 (x-amz-w 22): left alone, with the reason.
        let mut rsa = v3.clone();
        rsa.extra.insert(keys::V3_WRAP.into(), "22".into());
        match plan(&target, &envelope_of(&rsa)) {
            Ok(S3ecPlan::Skip(Skip::S3ecLeft(why))) => assert!(why.contains("RSA-OAEP-SHA1"), "{why}"),
            other => panic!("RSA: {other:?}"),
        }
        // Format V1 (legacy kms wrap, CBC).
        let mut v1 = UserMeta::default();
        v1.extra.insert(keys::KEY_V1.into(), BASE64.encode([1u8; 48]));
        v1.extra.insert(keys::IV.into(), BASE64.encode([2u8; 16]));
        v1.extra.insert(keys::MATDESC.into(), r#"{"kms_cmk_id":"k"}"#.into());
        match plan(&target, &envelope_of(&v1)) {
            Ok(S3ecPlan::Skip(Skip::S3ecLeft(why))) => assert!(why.contains("V1"), "{why}"),
            other => panic!("V1: {other:?}"),
        }
        // A kms+context object is cse-kms's.
        let mut kms = v3.clone();
        kms.extra.insert(keys::V3_WRAP.into(), "12".into());
        kms.extra.insert(keys::V3_CONTEXT.into(), r#"{"aws:x-amz-cek-alg": "115"}"#.into());
        assert!(matches!(plan(&target, &envelope_of(&kms)), Ok(S3ecPlan::Skip(Skip::OtherKind))));
        // A V3 object whose commitment was replaced: a failure, not re-wrapped.
        let mut tampered = v3.clone();
        tampered.extra.insert(keys::V3_COMMITMENT.into(), BASE64.encode([0u8; 28]));
        let err = plan(&target, &envelope_of(&tampered)).unwrap_err();
        assert!(err.contains("commitment"), "{err}");
        // Instruction-file objects, instruction files and broken metadata.
        let new = new_object_aes(WriteFormat::V3, &a, &BTreeMap::new()).unwrap();
        let (object_part, _) = new.envelope.to_instruction_file();
        let split = UserMeta { extra: object_part, ..UserMeta::default() };
        assert!(matches!(found_in(&split), Some(Found::InInstructionFile)));
        let sidecar = UserMeta { extra: [(keys::INSTRUCTION_MARKER.to_string(), String::new())].into(), ..UserMeta::default() };
        assert!(matches!(found_in(&sidecar), Some(Found::Sidecar)));
        let mut broken = v3.clone();
        broken.extra.remove(keys::V3_MESSAGE_ID);
        assert!(matches!(found_in(&broken), Some(Found::Broken(_))));
        // Our own objects (POSIX attributes and a binding only) are not S3EC objects.
        let own = UserMeta { mode: Some(0o100644), extra: [("s3cryptfs-bind".to_string(), "x".to_string())].into(), ..UserMeta::default() };
        assert!(found_in(&own).is_none());
    }

    #[test]
    fn the_rewrapped_metadata_changes_only_the_wrapped_key_and_reads_with_the_new_key_alone() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let target = cse_c(&[&b, &a]);
        let plain = vec![7u8; 70_000];
        for format in [WriteFormat::V2, WriteFormat::V3] {
            let (meta, body) = object(format, &a, &plain);
            let envelope = envelope_of(&meta);
            let Ok(S3ecPlan::Rewrap { data_key }) = plan(&target, &envelope) else { panic!("{format:?}") };
            let edk = rewrap(&target, &envelope, &data_key).unwrap();
            let new = rewrapped_metadata(&meta, &envelope, &edk).unwrap();
            let name = if format == WriteFormat::V2 { keys::KEY_V2 } else { keys::V3_KEY };
            let mut want = meta.clone();
            want.extra.insert(name.into(), BASE64.encode(&edk));
            assert_eq!(new, want, "{format:?}: only the wrapped data key changes");
            assert_ne!(new.extra[name], meta.extra[name]);
            assert_eq!(read(&new, &body, &[&b]).unwrap(), plain, "{format:?}: reads with the new key alone");
            assert!(read(&new, &body, &[&a]).is_err(), "{format:?}: the old key no longer unwraps it");
            assert!(matches!(plan(&target, &envelope_of(&new)), Ok(S3ecPlan::Skip(Skip::Current))));
        }
    }

    /// A store that rewrites the object (as a concurrent writer would) right before the first conditional metadata
    /// replacement reaches it.
    struct Racing {
        inner: ObjectStoreBackend,
        key: ObjectKey,
        rewrite: (Bytes, UserMeta),
        raced: AtomicBool,
    }

    #[async_trait]
    impl Backend for Racing {
        fn copies_parts(&self) -> bool {
            self.inner.copies_parts()
        }

        async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
            self.inner.head(key).await
        }
        async fn get_range(
            &self,
            key: &ObjectKey,
            range: std::ops::Range<u64>,
        ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            self.inner.get_range(key, range).await
        }
        async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            self.inner.get(key).await
        }
        async fn put_expect(
            &self,
            key: &ObjectKey,
            body: Bytes,
            meta: &UserMeta,
            expect: &Expect,
        ) -> Result<ObjectInfo, StoreError> {
            self.inner.put_expect(key, body, meta, expect).await
        }
        async fn put_multipart_expect(
            &self,
            key: &ObjectKey,
            meta: &UserMeta,
            expect: &Expect,
        ) -> Result<Box<dyn Upload>, StoreError> {
            self.inner.put_multipart_expect(key, meta, expect).await
        }
        async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
            self.inner.copy(from, to, meta).await
        }
        async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
            self.inner.update_meta(key, meta).await
        }
        async fn update_meta_if(
            &self,
            key: &ObjectKey,
            meta: &UserMeta,
            etag: &str,
        ) -> Result<(ObjectInfo, Transfer), StoreError> {
            if key == &self.key && !self.raced.swap(true, Ordering::SeqCst) {
                let (body, m) = &self.rewrite;
                self.inner.put(key, body.clone(), m).await?;
            }
            self.inner.update_meta_if(key, meta, etag).await
        }
        async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
            self.inner.list(dir, recursive).await
        }
        async fn check_access(&self) -> Result<(), StoreError> {
            self.inner.check_access().await
        }
    }

    fn memory() -> ObjectStoreBackend {
        ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "").unwrap()
    }

    #[tokio::test]
    async fn rekey_moves_an_s3ec_object_by_its_metadata_and_a_second_run_skips_it() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let target = cse_c(&[&b, &a]);
        let store = memory();
        let plain = vec![3u8; 100_003];
        let mut want = BTreeMap::new();
        for (name, format) in [("v2", WriteFormat::V2), ("dir/v3", WriteFormat::V3)] {
            let (meta, body) = object(format, &a, &plain);
            let key = ObjectKey::new(name).unwrap();
            let info = store.put(&key, body.clone(), &meta).await.unwrap();
            // A dry run decides, and changes nothing.
            let (outcome, _, _) = super::super::object::rekey_object(&target, &store, &info, true).await;
            assert!(matches!(outcome, Outcome::WouldRekey), "{name}: {outcome:?}");
            assert_eq!(store.get(&key).await.unwrap().2, meta, "{name}: a dry run writes nothing");

            let (outcome, cost, kms) = super::super::object::rekey_object(&target, &store, &info, false).await;
            assert!(matches!(outcome, Outcome::Rekeyed), "{name}: {outcome:?}");
            assert_eq!((cost.requests, kms), (3, 0), "{name}: a read, then a GET and a conditional PUT (InMemory)");
            let (now_body, now_info, now_meta) = store.get(&key).await.unwrap();
            assert_eq!(now_body, body, "{name}: the content is untouched");
            assert_eq!((now_meta.mode, now_meta.uid, now_meta.gid, now_meta.mtime), (meta.mode, meta.uid, meta.gid, meta.mtime));
            assert_eq!(read(&now_meta, &now_body, &[&b]).unwrap(), plain, "{name}: reads with the new key alone");
            let (outcome, _, _) = super::super::object::rekey_object(&target, &store, &now_info, false).await;
            assert!(matches!(outcome, Outcome::Skipped(Skip::Current)), "{name}: {outcome:?}");
            want.insert(name, now_meta);
        }
        // A cse-kms rekey leaves them alone without a KMS call.
        let signed = crate::store::signed_client(&crate::store::S3Options::default()).unwrap();
        let kms = Arc::new(crate::kms::KmsClient::new(signed, "https://kms.invalid".into(), None));
        let to_kms = Target::Kms { kms, arn: "arn:aws:kms:us-east-1:000000000000:key/k".into() };
        let info = store.head(&ObjectKey::new("v2").unwrap()).await.unwrap().0;
        let (outcome, _, calls) = super::super::object::rekey_object(&to_kms, &store, &info, false).await;
        assert!(matches!(outcome, Outcome::Skipped(Skip::OtherKind)) && calls == 0, "{outcome:?}");
    }

    #[tokio::test]
    async fn a_rewrite_between_the_decision_and_the_write_is_not_clobbered() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let target = cse_c(&[&b, &a]);
        let key = ObjectKey::new("raced").unwrap();
        let (old_meta, old_body) = object(WriteFormat::V3, &a, b"before");
        for (case, writer_key) in [("the writer used the new key", &b), ("the writer used the old key", &a)] {
            // The concurrent writer's version: other content, its own data key.
            let (meta, body) = object(WriteFormat::V3, writer_key, b"the writer's content");
            let store = Racing { inner: memory(), key: key.clone(), rewrite: (body.clone(), meta), raced: AtomicBool::new(false) };
            let info = store.put(&key, old_body.clone(), &old_meta).await.unwrap();
            let (outcome, _, _) = super::super::object::rekey_object(&target, &store, &info, false).await;
            let (now_body, _, now_meta) = store.get(&key).await.unwrap();
            assert_eq!(now_body, body, "{case}: the writer's content stays");
            assert_eq!(read(&now_meta, &now_body, &[&b]).unwrap(), b"the writer's content", "{case}");
            // Read again after the lost race: already current, or moved in turn.
            let expected = if std::ptr::eq(writer_key, &b) { "Skipped(Current)" } else { "Rekeyed" };
            assert_eq!(format!("{outcome:?}"), expected, "{case}");
        }
    }
}
