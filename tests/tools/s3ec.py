"""A small CLI over the official AWS S3 Encryption Client for Python (amazon-s3-encryption-client-python 4.0.0), for
the S3EC interoperability tests (issue 12): objects written here are what a real S3EC user would store, and objects
that s3cryptfs writes in S3EC format must read back here.

    s3ec.py put  --version {2,3} --wrap kms --kms-key-id ID [--context k=v ...] --bucket B --key K --file PATH
                 [--multipart-threshold BYTES] [--part-size BYTES]
    s3ec.py get  --bucket B --key K --out PATH [--kms-key-id ID] [--context k=v ...]
                 [--commitment-policy POLICY]
    s3ec.py meta --bucket B --key K

put   encrypts PATH with the official client and stores it. --version 3 (the client's default) writes the key-committing
      suite 115 (ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY); --version 2 writes AES/GCM/NoPadding (suite 0x0072), which the
      client only allows with the commitment policy FORBID_ENCRYPT_ALLOW_DECRYPT. A file of at least
      --multipart-threshold bytes (default: the client's 8 MiB) goes up as a multipart upload in parts of --part-size
      bytes (default: the client's 8 MiB; at least 5 MiB), through the client's upload_file. --context adds user
      encryption context (ASCII only: the client refuses anything else). --wrap: kms is the only wrapping this client
      has (no raw AES or RSA keyring in 4.0.0). Prints {"bucket", "key", "version", "size", "multipart"} as JSON.
get   decrypts the object into PATH ("-" = stdout). The plaintext is written to PATH.tmp and renamed, so a refused
      object leaves no PATH behind. --context must repeat the user encryption context of the put exactly (the client
      compares it with the stored one). Without --kms-key-id, KMS Decrypt is called without a KeyId (KMS finds the
      key from the ciphertext blob); with it, the client passes it to Decrypt as usual. --commitment-policy defaults
      to REQUIRE_ENCRYPT_ALLOW_DECRYPT, which reads V2 and V3; the client's own default, REQUIRE_ENCRYPT_REQUIRE_DECRYPT,
      refuses V2 objects. Prints {"bucket", "key", "size"} as JSON.
meta  HEAD with plain boto3 (no S3EC hooks): prints {"metadata": {user metadata, x-amz-meta- prefix stripped, as S3
      returns it}, "content_length", "etag", "checksum": {ChecksumCRC32 etc., ChecksumType, if the server keeps one}}.

Endpoint: $S3CRYPTFS_TEST_S3_ENDPOINT for S3 and $S3CRYPTFS_TEST_KMS_ENDPOINT for KMS (default: the S3 one), path-style
addressing; credentials from $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY (default test/test, what LocalStack
accepts), region $AWS_REGION (default us-east-1). Both come from the file scripts/s3-server.sh writes.

Exit status: 0 ok; 2 usage; 3 the S3 Encryption Client refused or failed (decryption, authentication, wrong
encryption context, commitment policy...): "S3EncryptionClientError: <message>" on stderr; 4 the server answered with
an S3/KMS error: "<Code>: <message>" on stderr (for get, also when the client wrapped that error).

Quirks of the official client 4.0.0 (boto3/botocore 1.44.8) against LocalStack 4.14.0, all checked here (also listed
in scripts/s3ec-client.sh):
  * It never builds its own SDK clients: custom endpoints work by handing it boto3 clients made with endpoint_url, one
    for S3 and one for KMS (no KMS endpoint setting of its own). Path-style addressing is set on the S3 client
    explicitly; with http://127.0.0.1:PORT and http://localhost:PORT botocore 1.44 already picks path style by itself,
    but an endpoint given by another host name would turn into BUCKET.host.
  * It registers event hooks on the boto3 S3 client it wraps (PutObject encrypts, GetObject decrypts, also in the
    instruction-file GET), so raw reads (meta) use a separate, unhooked client.
  * Checksums need no setting: botocore's default flexible checksum (x-amz-checksum-crc32 on PutObject and UploadPart)
    is computed after the client's before-call hook, i.e. over the ciphertext, and so is the signed payload hash.
    LocalStack checks it (a wrong CRC32 gets BadDigest) and keeps CRC32/FULL_OBJECT for a PUT. CreateMultipartUpload
    goes out without ChecksumAlgorithm although the parts carry CRC32; LocalStack then gives the completed object its
    own CRC64NVME/FULL_OBJECT checksum. GET sends x-amz-checksum-mode: ENABLED and botocore checks the ciphertext's
    CRC32 before the hook decrypts. (Whether AWS itself accepts CRC32 parts in such an upload was not checked here.)
  * Reading V2 needs a commitment policy other than the default REQUIRE_ENCRYPT_REQUIRE_DECRYPT (which refuses with
    "cannot decrypt non-key-committing object"); writing V2 needs FORBID_ENCRYPT_ALLOW_DECRYPT (any other policy makes
    S3EncryptionClientConfig raise). FORBID_ENCRYPT_ALLOW_DECRYPT still reads V3.
  * KmsKeyring requires a key id and passes it as KeyId to KMS Decrypt; a different key there gives
    IncorrectKeyException. LocalStack's KMS decrypts without KeyId too (this tool's get without --kms-key-id).
  * A get must pass the put's user encryption context exactly (none if none); anything else is refused before KMS
    is called. A user context key "aws:x-amz-cek-alg" is silently overwritten by put, but refused by get.
  * Non-ASCII encryption context is refused by put (S3 would RFC-2047-encode it in the metadata).
  * A get of an object without S3EC metadata looks for KEY.instruction and fails with the misleading
    "Instruction file body is empty for key: KEY.instruction" (it is absent, not empty).
  * put_object and upload_part hold the whole body or part in memory; get (enable_delayed_authentication=False) reads
    and authenticates the whole object before it returns plaintext. upload_file picks multipart at size >= threshold
    and refuses parts under 5 MiB.
  * LocalStack's KMS CiphertextBlob is the 36-character key id in ASCII followed by 80 bytes (116 in all); AWS's is
    opaque and of another length: do not assert an EDK length or shape taken from either.
"""

import argparse
import http.client
import json
import os
import sys

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from s3_encryption import S3EncryptionClient, S3EncryptionClientConfig
from s3_encryption.exceptions import S3EncryptionClientError
from s3_encryption.materials.kms_keyring import KmsKeyring
from s3_encryption.materials.materials import AlgorithmSuite, CommitmentPolicy

SUITES = {
    "2": (AlgorithmSuite.ALG_AES_256_GCM_IV12_TAG16_NO_KDF, CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT),
    "3": (AlgorithmSuite.ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT),
}


def session():
    return boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def s3_client(sess):
    ep = os.environ.get("S3CRYPTFS_TEST_S3_ENDPOINT")
    if not ep:
        sys.exit("s3ec.py: S3CRYPTFS_TEST_S3_ENDPOINT is not set (source ~/.cache/s3cryptfs-test/server.env)")
    # Retries off: a test wants the first answer, not a replay of an encrypted PUT.
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    return sess.client("s3", endpoint_url=ep, config=cfg)


def kms_client(sess):
    ep = os.environ.get("S3CRYPTFS_TEST_KMS_ENDPOINT") or os.environ.get("S3CRYPTFS_TEST_S3_ENDPOINT")
    return sess.client("kms", endpoint_url=ep, config=Config(retries={"max_attempts": 1}))


class KmsWithoutKeyId:
    """A KMS client whose Decrypt leaves out KeyId when the keyring has none: KMS then takes the key from the
    ciphertext blob (symmetric keys). Everything else goes to the real client."""

    def __init__(self, kms):
        self._kms = kms

    def __getattr__(self, name):
        return getattr(self._kms, name)

    def decrypt(self, **kwargs):
        if kwargs.get("KeyId") is None:
            kwargs.pop("KeyId", None)
        return self._kms.decrypt(**kwargs)


def context(pairs):
    ec = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise SystemExit(f"s3ec.py: --context wants k=v, got {p!r}")
        ec[k] = v
    return ec


def encryption_client(sess, key_id, suite, policy):
    kms = kms_client(sess)
    if key_id is None:
        kms = KmsWithoutKeyId(kms)
    keyring = KmsKeyring(kms, key_id)
    cfg = S3EncryptionClientConfig(keyring=keyring, encryption_algorithm=suite, commitment_policy=policy)
    return S3EncryptionClient(s3_client(sess), cfg)


def cmd_put(a):
    suite, policy = SUITES[a.version]
    sess = session()
    client = encryption_client(sess, a.kms_key_id, suite, policy)
    ec = context(a.context)
    extra = {"EncryptionContext": ec} if ec else {}
    size = os.path.getsize(a.file)
    threshold = a.multipart_threshold
    client.upload_file(a.file, a.bucket, a.key, multipart_threshold=threshold, multipart_chunksize=a.part_size, **extra)
    multipart = size >= (threshold if threshold is not None else 8 * 1024 * 1024)
    print(json.dumps({"bucket": a.bucket, "key": a.key, "version": int(a.version), "size": size, "multipart": multipart}))


def transport_error(e):
    """Whether `e` (or what caused it) is the connection breaking mid-body, as LocalStack's streaming responses
    sometimes do under load ("Connection broken: IncompleteRead"): the server's glitch, not a verdict on the object."""
    if "Connection broken" in str(e):  # the client's wrapping may keep only the message
        return True
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (botocore.exceptions.ResponseStreamingError, botocore.exceptions.ConnectionError,
                          http.client.IncompleteRead, urllib3.exceptions.ProtocolError)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def cmd_get(a):
    # A file output can be fetched again after a broken connection (nothing of the failed attempt is kept); stdout
    # cannot (part of it went out).
    attempts = 1 if a.out == "-" else 3
    for attempt in range(1, attempts + 1):
        try:
            return get_once(a)
        except Exception as e:
            if attempt == attempts or not transport_error(e):
                raise
            print(f"s3ec.py: get attempt {attempt} broke off ({e}); again", file=sys.stderr)


def get_once(a):
    sess = session()
    policy = CommitmentPolicy[a.commitment_policy]
    # The encryption algorithm only matters for writing; it must agree with the policy.
    suite = SUITES["2" if policy == CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT else "3"][0]
    client = encryption_client(sess, a.kms_key_id, suite, policy)
    ec = context(a.context)
    extra = {"EncryptionContext": ec} if ec else {}
    resp = client.get_object(Bucket=a.bucket, Key=a.key, **extra)
    body = resp["Body"]
    size = 0
    if a.out == "-":
        out = sys.stdout.buffer
        for chunk in iter(lambda: body.read(1 << 20), b""):
            out.write(chunk)
            size += len(chunk)
        out.flush()
    else:
        tmp = a.out + ".tmp"
        try:
            with open(tmp, "wb") as f:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    f.write(chunk)
                    size += len(chunk)
            os.replace(tmp, a.out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    info = {"bucket": a.bucket, "key": a.key, "size": size}
    print(json.dumps(info), file=sys.stderr if a.out == "-" else sys.stdout)


def cmd_meta(a):
    raw = s3_client(session())
    h = raw.head_object(Bucket=a.bucket, Key=a.key, ChecksumMode="ENABLED")
    checksum = {k: v for k, v in h.items() if k.startswith("Checksum") and k != "ChecksumMode"}
    out = {"metadata": h.get("Metadata", {}), "content_length": h["ContentLength"], "etag": h.get("ETag"),
           "checksum": checksum}
    print(json.dumps(out, sort_keys=True))


def main():
    p = argparse.ArgumentParser(prog="s3ec.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="op", required=True)

    put = sub.add_parser("put", help="encrypt a file with the official client and store it")
    put.add_argument("--version", choices=["2", "3"], required=True, help="S3EC message format")
    put.add_argument("--wrap", choices=["kms"], default="kms", help="key wrapping (kms+context; the only one here)")
    put.add_argument("--kms-key-id", required=True)
    put.add_argument("--context", action="append", metavar="K=V", help="user encryption context (repeatable)")
    put.add_argument("--bucket", required=True)
    put.add_argument("--key", required=True)
    put.add_argument("--file", required=True)
    put.add_argument("--multipart-threshold", type=int, metavar="BYTES", help="multipart from this size on (8 MiB)")
    put.add_argument("--part-size", type=int, metavar="BYTES", help="multipart part size (8 MiB; at least 5 MiB)")
    put.set_defaults(fn=cmd_put)

    get = sub.add_parser("get", help="read and decrypt an object with the official client")
    get.add_argument("--bucket", required=True)
    get.add_argument("--key", required=True)
    get.add_argument("--out", required=True, help='plaintext file ("-" = stdout)')
    get.add_argument("--kms-key-id")
    get.add_argument("--context", action="append", metavar="K=V", help="expected user encryption context")
    get.add_argument("--commitment-policy", default="REQUIRE_ENCRYPT_ALLOW_DECRYPT",
                     choices=[c.name for c in CommitmentPolicy])
    get.set_defaults(fn=cmd_get)

    meta = sub.add_parser("meta", help="raw HEAD with plain boto3: user metadata, length, ETag, checksum")
    meta.add_argument("--bucket", required=True)
    meta.add_argument("--key", required=True)
    meta.set_defaults(fn=cmd_meta)

    a = p.parse_args()
    try:
        a.fn(a)
    except S3EncryptionClientError as e:
        cause = e.__cause__
        if isinstance(cause, botocore.exceptions.ClientError):
            err = cause.response.get("Error", {})
            print(f"{err.get('Code', '?')}: {err.get('Message', '')}", file=sys.stderr)
            sys.exit(4)
        print(f"S3EncryptionClientError: {e}", file=sys.stderr)
        sys.exit(3)
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        print(f"{err.get('Code', '?')}: {err.get('Message', '')}", file=sys.stderr)
        sys.exit(4)


if __name__ == "__main__":
    main()
