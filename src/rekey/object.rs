//! One object of a rekey: decide from its header (or its SSE-C tag) whether it needs moving, then move it.
//!
//! The decision is pure ([`plan_header`]) so it is tested without a store. Moving goes through the store facade:
//! [`Backend::replace_head`] for client-side modes (the new header replaces the old one, conditional on the ETag the
//! header was read with) and [`Backend::move_to_writing_key`] for sse-c. A lost race (the object changed between the
//! read and the write) is retried from the read, a few times.

use crate::error_text::error_chain;
use bytes::Bytes;

use crate::crypto::{
    self, AeadBackend, CryptoError, Envelope, FileId, Header, KeyFingerprint, KeyHistory, ObjectCipher, HEADER_LEN,
};
use crate::kms::KmsClient;
use super::s3ec;
use crate::store::{Backend, ObjectInfo, Transfer};

/// Attempts per object when it keeps changing under us: a writer that rewrites the same file continuously wins, and
/// the object is reported as failed (a later run picks it up).
const ATTEMPTS: u32 = 3;

/// What the current writing key is, per mode.
pub(crate) enum Target {
    /// cse-c: kind-1 headers are re-wrapped under `keys.encrypting_key()`.
    CustomerKey { keys: std::sync::Arc<KeyHistory>, aead: AeadBackend },
    /// cse-kms: kind-2 blobs are moved to the KMS key `arn` with ReEncrypt.
    Kms { kms: std::sync::Arc<KmsClient>, arn: String },
    /// sse-c: objects are copied server-side onto themselves under the first key of the store's history.
    ServerSideCustomerKey,
}

/// Why an object was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Already under the writing key.
    Current,
    /// Not an s3cryptfs object (no header of ours, or a size our format cannot have).
    NotOurs,
    /// Another client-side mode's object (kind 1 in a cse-kms rekey or the reverse): rekey rotates within a mode.
    OtherKind,
    /// Deleted while we were at it: nothing left to move.
    Vanished,
    /// An S3 Encryption Client object rekey cannot move (see `s3ec.rs`), with the reason: it still needs the key it
    /// is wrapped under, so each is reported.
    S3ecLeft(&'static str),
}

/// The end of one attempt at an object.
#[derive(Debug)]
pub(crate) enum Step {
    Done(Outcome),
    /// It changed between the read and the write: read it again.
    Retry,
}

/// The result of one object.
#[derive(Debug)]
pub(crate) enum Outcome {
    Rekeyed,
    /// `--dry-run`: it would have been rekeyed.
    WouldRekey,
    Skipped(Skip),
    Failed(String),
}

/// What the header says must happen.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    Skip(Skip),
    /// cse-c: re-wrap the data key (currently under `from`) under the writing key.
    Rewrap { from: KeyFingerprint },
    /// cse-kms: re-encrypt `blob` from `key_id` to the target key, with `file_id`'s encryption context.
    ReEncrypt { file_id: FileId, key_id: String, blob: Vec<u8> },
}

/// Decides from the first [`HEADER_LEN`] bytes of an object. `Err` for a header that is ours but cannot be used
/// (damaged, a newer format version, or under a customer key the history lacks): those objects are failures, not
/// skips, because they need attention.
pub(crate) fn plan_header(target: &Target, head: &[u8]) -> Result<Plan, CryptoError> {
    let header = match Header::decode(head) {
        Ok(h) => h,
        Err(CryptoError::NotOurFormat) => return Ok(Plan::Skip(Skip::NotOurs)),
        Err(e) => return Err(e),
    };
    match (target, header.envelope) {
        (Target::CustomerKey { keys, .. }, Envelope::CustomerKey { fingerprint, .. }) => {
            if fingerprint == keys.encrypting_key().fingerprint() {
                Ok(Plan::Skip(Skip::Current))
            } else if keys.find(fingerprint).is_none() {
                Err(CryptoError::UnknownKey { fingerprint })
            } else {
                Ok(Plan::Rewrap { from: fingerprint })
            }
        }
        (Target::Kms { arn, .. }, Envelope::Kms { key_id, blob }) => {
            if key_id == *arn || crate::kms::names_key(&key_id, arn) == Some(true) {
                Ok(Plan::Skip(Skip::Current))
            } else {
                Ok(Plan::ReEncrypt { file_id: header.file_id, key_id, blob })
            }
        }
        (Target::CustomerKey { .. }, Envelope::Kms { .. }) | (Target::Kms { .. }, Envelope::CustomerKey { .. }) => {
            Ok(Plan::Skip(Skip::OtherKind))
        }
        (Target::ServerSideCustomerKey, _) => Ok(Plan::Skip(Skip::NotOurs)),
    }
}

/// The new header for `head` under the target key. The data key and file id stay, so the content and the path
/// binding stay valid; the result is checked before it is returned, so a header that would not open is never written.
async fn new_header(target: &Target, head: &[u8], plan: Plan, kms_calls: &mut u64) -> Result<Vec<u8>, String> {
    match (target, plan) {
        (Target::CustomerKey { keys, aead }, Plan::Rewrap { .. }) => {
            let cipher = ObjectCipher::open(head, keys, *aead).map_err(|e| e.to_string())?;
            let new = cipher.rewrap(keys);
            // Self-check: it opens with the history, under the writing key, as the same object.
            let reopened = ObjectCipher::open(&new, keys, *aead).map_err(|e| format!("the new header does not open: {e}"))?;
            let fingerprint = match Header::decode(&new).map(|h| h.envelope) {
                Ok(Envelope::CustomerKey { fingerprint, .. }) => fingerprint,
                other => return Err(format!("invariant broken: the rewrapped header decodes as {other:?}")),
            };
            if fingerprint != keys.encrypting_key().fingerprint() || reopened.file_id() != cipher.file_id() {
                return Err("invariant broken: the rewrapped header names another key or object".into());
            }
            Ok(new.to_vec())
        }
        (Target::Kms { kms, arn }, Plan::ReEncrypt { file_id, key_id, blob }) => {
            let context = crypto::kms_encryption_context(&file_id);
            *kms_calls += 1;
            let moved = kms.re_encrypt(&key_id, &blob, &context, arn).await.map_err(|e| {
                format!("{e} (ReEncrypt needs kms:ReEncryptFrom on {key_id} and kms:ReEncryptTo on {arn})")
            })?;
            // The format version stays: a version-2 object's chunks open only under a version-2 header.
            let version = Header::decode(head).map_err(|e| e.to_string())?.version;
            let new = Header { version, file_id, envelope: Envelope::Kms { key_id: moved.key_arn, blob: moved.blob } }
                .encode()
                .map_err(|e| format!("KMS returned a blob that does not fit the header: {e}"))?;
            match Header::decode(&new) {
                Ok(h) if h.file_id == file_id => Ok(new.to_vec()),
                other => Err(format!("invariant broken: the new KMS header decodes as {other:?}")),
            }
        }
        (_, plan) => Err(format!("invariant broken: plan {plan:?} does not belong to this mode")),
    }
}

/// Rekeys one object. Returns what happened, what it cost in store requests and bytes, and the KMS calls made.
pub(crate) async fn rekey_object(
    target: &Target,
    backend: &dyn Backend,
    info: &ObjectInfo,
    dry_run: bool,
) -> (Outcome, Transfer, u64) {
    let mut cost = Transfer::default();
    let mut kms_calls = 0;
    let outcome = match target {
        Target::ServerSideCustomerKey => rekey_server_side(backend, info, dry_run, &mut cost).await,
        _ => rekey_header(target, backend, info, dry_run, &mut cost, &mut kms_calls).await,
    };
    (outcome, cost, kms_calls)
}

async fn rekey_header(
    target: &Target,
    backend: &dyn Backend,
    info: &ObjectInfo,
    dry_run: bool,
    cost: &mut Transfer,
    kms_calls: &mut u64,
) -> Outcome {
    // Our objects have sizes our format can produce, and their header is read; any other object is read for its
    // metadata alone, which tells whether it is an S3 Encryption Client object (those have any size).
    let ours = crypto::plain_size(info.size).is_ok();
    for _ in 0..ATTEMPTS {
        let read = if ours {
            backend.get_range(&info.key, 0..HEADER_LEN).await
        } else {
            backend.head(&info.key).await.map(|(now, meta)| (Bytes::new(), now, meta))
        };
        let (head, now, meta) = match read {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Outcome::Skipped(Skip::Vanished),
            Err(e) => return Outcome::Failed(error_chain(&e)),
        };
        cost.requests += 1;
        cost.bytes_down += head.len() as u64;
        let step = match s3ec::found_in(&meta) {
            Some(found) => {
                s3ec::step(target, backend, &info.key, found, &meta, now.etag.as_deref(), dry_run, cost, kms_calls)
                    .await
            }
            None if !ours => Step::Done(Outcome::Skipped(Skip::NotOurs)),
            None => own_step(target, backend, info, &head, now.etag.as_deref(), dry_run, cost, kms_calls).await,
        };
        match step {
            Step::Done(outcome) => return outcome,
            Step::Retry => continue,
        }
    }
    Outcome::Failed(format!("it changed under us {ATTEMPTS} times in a row; run rekey again later"))
}

/// One attempt at an object of our own format whose first bytes `head` were read with ETag `etag`.
#[allow(clippy::too_many_arguments)]
async fn own_step(
    target: &Target,
    backend: &dyn Backend,
    info: &ObjectInfo,
    head: &[u8],
    etag: Option<&str>,
    dry_run: bool,
    cost: &mut Transfer,
    kms_calls: &mut u64,
) -> Step {
    let plan = match plan_header(target, head) {
        Ok(Plan::Skip(why)) => return Step::Done(Outcome::Skipped(why)),
        Ok(plan) => plan,
        Err(CryptoError::UnknownKey { fingerprint }) => {
            return Step::Done(Outcome::Failed(format!(
                "its data key is wrapped under key {fingerprint}, which is not in the key history: add that key \
                 below the new one"
            )))
        }
        Err(e) => return Step::Done(Outcome::Failed(format!("its header cannot be used: {e}"))),
    };
    if dry_run {
        // A customer-key header is unwrapped anyway (no I/O), so a damaged one shows up as a failure now.
        if let (Target::CustomerKey { keys, aead }, Plan::Rewrap { .. }) = (target, &plan) {
            if let Err(e) = ObjectCipher::open(head, keys, *aead) {
                return Step::Done(Outcome::Failed(format!("its header does not open: {e}")));
            }
        }
        return Step::Done(Outcome::WouldRekey);
    }
    let Some(etag) = etag else {
        return Step::Done(Outcome::Failed("the store reports no ETag for it, so it cannot be replaced safely".into()));
    };
    let new = match new_header(target, head, plan, kms_calls).await {
        Ok(h) => h,
        Err(e) => return Step::Done(Outcome::Failed(e)),
    };
    match backend.replace_head(&info.key, etag, Bytes::from(new)).await {
        Ok(spent) => {
            *cost += spent;
            Step::Done(Outcome::Rekeyed)
        }
        // Rewritten since we read its header: read it again (a writer may even have used the new key).
        Err(e) if e.is_precondition() => Step::Retry,
        Err(e) if e.is_not_found() => Step::Done(Outcome::Skipped(Skip::Vanished)),
        Err(e) => Step::Done(Outcome::Failed(error_chain(&e))),
    }
}

async fn rekey_server_side(backend: &dyn Backend, info: &ObjectInfo, dry_run: bool, cost: &mut Transfer) -> Outcome {
    let mut etag = info.etag.clone();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            // The listing's ETag is stale: ask again (the store picks the object's key for the HEAD itself).
            match backend.head(&info.key).await {
                Ok((now, _)) => etag = now.etag,
                Err(e) if e.is_not_found() => return Outcome::Skipped(Skip::Vanished),
                Err(e) => return Outcome::Failed(error_chain(&e)),
            }
            cost.requests += 1;
        }
        let of = match backend.customer_key_of(&info.key).await {
            Ok(of) => of,
            Err(e) if e.is_not_found() => return Outcome::Skipped(Skip::Vanished),
            Err(e) => return Outcome::Failed(error_chain(&e)),
        };
        *cost += of.cost;
        match of.index {
            Some(0) => return Outcome::Skipped(Skip::Current),
            Some(_) => {}
            None => {
                return Outcome::Failed(match &of.tagged_md5 {
                    Some(md5) => format!(
                        "it is encrypted with the SSE-C key whose MD5 is {md5}, which is not in the key history: add \
                         that key below the new one"
                    ),
                    None => "no key of the key history opens it with SSE-C (it has no key tag)".into(),
                })
            }
        }
        if dry_run {
            return Outcome::WouldRekey;
        }
        let Some(tag) = etag.as_deref() else {
            return Outcome::Failed("the store reports no ETag for it, so it cannot be copied safely".into());
        };
        match backend.move_to_writing_key(&info.key, &of, tag, info.size).await {
            Ok(spent) => {
                *cost += spent;
                return Outcome::Rekeyed;
            }
            Err(e) if e.is_precondition() => continue,
            Err(e) if e.is_not_found() => return Outcome::Skipped(Skip::Vanished),
            Err(e) => return Outcome::Failed(error_chain(&e)),
        }
    }
    Outcome::Failed(format!("it changed under us {ATTEMPTS} times in a row; run rekey again later"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{encrypt_object, Key256};

    fn history(keys: &[&Key256]) -> Arc<KeyHistory> {
        let text: String = keys.iter().map(|k| crypto::format_new_key(k).to_string()).collect();
        Arc::new(KeyHistory::parse(&text).unwrap())
    }

    fn copy(k: &Key256) -> Key256 {
        Key256::from_bytes(k.as_bytes())
    }

    #[test]
    fn customer_key_objects_are_rewrapped_only_when_not_on_the_first_key() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let old = encrypt_object(&history(&[&a]), AeadBackend::AwsLc, b"content");
        let target = Target::CustomerKey { keys: history(&[&b, &a]), aead: AeadBackend::AwsLc };
        assert_eq!(plan_header(&target, &old).unwrap(), Plan::Rewrap { from: a.fingerprint() });
        let new = encrypt_object(&history(&[&b]), AeadBackend::AwsLc, b"content");
        assert_eq!(plan_header(&target, &new).unwrap(), Plan::Skip(Skip::Current));
        assert_eq!(plan_header(&target, b"just some file").unwrap(), Plan::Skip(Skip::NotOurs));
        // A key the history lacks is a failure that names the key, not a skip.
        let stranger = encrypt_object(&history(&[&Key256::generate()]), AeadBackend::AwsLc, b"x");
        assert!(matches!(plan_header(&target, &stranger), Err(CryptoError::UnknownKey { .. })));
        // A damaged header is a failure too.
        let mut bad = old.clone();
        bad[8] = 0x7f;
        assert!(plan_header(&target, &bad).is_err());
    }

    #[tokio::test]
    async fn the_new_header_opens_with_the_new_key_alone_and_keeps_the_content() {
        let (a, b) = (Key256::generate(), Key256::generate());
        let old = encrypt_object(&history(&[&a]), AeadBackend::AwsLc, b"unchanged content");
        let target = Target::CustomerKey { keys: history(&[&b, &a]), aead: AeadBackend::AwsLc };
        let plan = plan_header(&target, &old).unwrap();
        let mut calls = 0;
        let head = new_header(&target, &old[..HEADER_LEN as usize], plan, &mut calls).await.unwrap();
        assert_eq!(calls, 0);
        let mut rekeyed = head.clone();
        rekeyed.extend_from_slice(&old[HEADER_LEN as usize..]);
        let only_b = history(&[&copy(&b)]);
        assert_eq!(crypto::decrypt_object(&only_b, AeadBackend::AwsLc, &rekeyed).unwrap(), b"unchanged content");
        assert_eq!(plan_header(&target, &rekeyed).unwrap(), Plan::Skip(Skip::Current));
        // Same object: same file id, so the path binding stays valid.
        let before = ObjectCipher::open(&old, &history(&[&a]), AeadBackend::AwsLc).unwrap();
        let after = ObjectCipher::open(&rekeyed, &only_b, AeadBackend::AwsLc).unwrap();
        assert_eq!(before.binding("dir/file"), after.binding("dir/file"));
    }

    #[test]
    fn kms_objects_move_unless_already_under_the_target_key() {
        let arn = "arn:aws:kms:us-east-1:000000000000:key/new".to_string();
        let header = |key_id: &str| {
            Header {
                version: crypto::FORMAT_VERSION,
                file_id: FileId([7; 16]),
                envelope: Envelope::Kms { key_id: key_id.into(), blob: vec![1, 2, 3] },
            }
            .encode()
            .unwrap()
        };
        // No KMS call happens in plan_header, so any client will do.
        let signed = crate::store::signed_client(&crate::store::S3Options::default()).unwrap();
        let kms = Arc::new(KmsClient::new(signed, "https://kms.invalid".into(), None));
        let target = Target::Kms { kms, arn: arn.clone() };
        assert_eq!(plan_header(&target, &header(&arn)).unwrap(), Plan::Skip(Skip::Current));
        assert_eq!(
            plan_header(&target, &header("arn:aws:kms:us-east-1:000000000000:key/old")).unwrap(),
            Plan::ReEncrypt {
                file_id: FileId([7; 16]),
                key_id: "arn:aws:kms:us-east-1:000000000000:key/old".into(),
                blob: vec![1, 2, 3]
            }
        );
        let cse_c = encrypt_object(&history(&[&Key256::generate()]), AeadBackend::AwsLc, b"x");
        assert_eq!(plan_header(&target, &cse_c).unwrap(), Plan::Skip(Skip::OtherKind));
    }
}
