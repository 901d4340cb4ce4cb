//! Objects of the AWS S3 Encryption Client (S3EC), message formats V2 and V3: pure crypto, no I/O.
//!
//! Why: issue 12. Buckets written by the official S3 Encryption Clients (Java, Go, .NET, Python,
//! …) should be readable through a mount, and s3cryptfs should be able to write objects those
//! clients read. The format is theirs, not ours: one AES-256-GCM message over the whole object
//! (`ciphertext ‖ 16-byte tag`, no header), with the wrapped data key and the IV or message id in
//! user metadata or an instruction file. The spec followed here is the project's S3EC.md (cited
//! as §n); docs/FORMAT.md has the tables and docs/SECURITY.md what this format does not protect.
//!
//! Reading an object:
//! 1. [`detect`] its metadata → [`Detection::Complete`], or [`Detection::NeedsInstructionFile`]:
//!    GET [`instruction_file_key`] and [`PendingInstructionFile::complete`] with its body.
//! 2. Unwrap the data key: [`aes_gcm_unwrap`] with a customer key, [`rsa_oaep_unwrap`] with an RSA
//!    private key ([`RsaPrivateKey::from_pem`]), or KMS `Decrypt` with what
//!    [`kms_decrypt_request`] returns (after its checks), then [`data_key_from_bytes`].
//! 3. [`ContentKey::for_decrypt`] (V3: the key commitment is compared in constant time before the
//!    content key exists), then [`ContentKey::decrypt`] for a whole buffer or
//!    [`ContentKey::decryptor`] for a stream, which can record [`ChunkDigests`].
//!
//! Writing an object: [`new_object_aes`], or [`kms_context_for_write`] → KMS `GenerateDataKey` →
//! [`new_object_kms`]; put [`Envelope::to_metadata`] on PutObject / CreateMultipartUpload; encrypt
//! with the [`ContentSealer`] once ([`ContentSealer::encrypt`] or [`ContentSealer::encryptor`]).
//!
//! Invariants:
//! - nothing is reported as verified before the whole-object tag checked out;
//! - the content suite is read from `x-amz-cek-alg` / `x-amz-c` and must match the suite the key
//!   wrap authenticates (§3.5), so metadata cannot downgrade V3 to V2;
//! - legacy formats (V1, CBC, legacy wraps, among them PKCS#1 v1.5 `RSA` and
//!   `RSA/ECB/OAEPWithSHA-256AndMGF1Padding`) are recognised and refused with an error that
//!   names them, never decrypted; `RSA-OAEP-SHA1` wraps are read, never written;
//! - a key that decrypts cannot encrypt ([`ContentKey`] vs [`ContentSealer`]).

mod content;
mod detect;
mod envelope;
mod error;
mod rsa;
mod stream;
mod wrap;

#[cfg(test)]
mod tests;

pub use content::{
    check_plaintext_len, ctr_counter_block, new_object_aes, new_object_kms, plain_size,
    v3_commitment, ContentKey, ContentSealer, NewObject, WriteFormat, MAX_PLAINTEXT_LEN, TAG_LEN,
    V3_CONTENT_AAD, V3_GCM_NONCE,
};
pub use detect::{detect, parse_instruction_file, Detection, PendingInstructionFile};
pub use envelope::{
    instruction_file_key, keys, ContentParams, ContentSuite, Envelope, FormatVersion,
    MetadataSource, WrapAlg, CBC_IV_LEN, COMMITMENT_LEN, GCM_IV_LEN, INSTRUCTION_SUFFIX,
    MESSAGE_ID_LEN, META_PREFIX, TAG_LEN_BITS,
};
pub use error::S3ecError;
pub use rsa::{rsa_oaep_unwrap, RsaKeyError, RsaPrivateKey};
pub use stream::{
    ChunkDigests, DigestOver, DigestSpec, StreamDecryptor, StreamEncryptor, StreamVerified,
    DEFAULT_DIGEST_CHUNK_LEN,
};
pub use wrap::{
    aes_gcm_unwrap, aes_gcm_wrap, data_key_from_bytes, kms_context_for_write, kms_decrypt_request,
    KmsDecryptRequest, AES_GCM_WRAPPED_LEN, KMS_CONTEXT_CEK_ALG, KMS_CONTEXT_CMK_ID,
};
