#!/usr/bin/env python3
"""Smoke test of the local S3 + KMS test server with a real client (boto3).

Run by `scripts/s3-server.sh check` with the venv's python and server.env sourced.
Exercises, over plain HTTP and over HTTPS (verified against S3CRYPTFS_TEST_CA_FILE):
bucket create, PUT with user metadata (x-amz-meta-mode), HEAD, ranged GET, multipart
upload, copy (metadata preserved), list with delimiter, delete; then KMS CreateKey,
GenerateDataKey and Decrypt (with an encryption context) on the same port.
Exit status 0 only if every check passed.
"""
import os
import sys
import time
import uuid

import boto3
from botocore.config import Config


def fail(msg):
    print(f"s3_smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def client(service, endpoint, verify):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        verify=verify,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def s3_checks(label, endpoint, verify):
    t0 = time.monotonic()
    s3 = client("s3", endpoint, verify)
    bucket = f"smoke-{label}-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)

    # PUT with user metadata, HEAD returns it.
    body = bytes(range(256)) * 64  # 16 KiB
    s3.put_object(Bucket=bucket, Key="dir/a.bin", Body=body, Metadata={"mode": "100644"})
    head = s3.head_object(Bucket=bucket, Key="dir/a.bin")
    check(head["ContentLength"] == len(body), f"{label}: HEAD length {head['ContentLength']}")
    check(head["Metadata"].get("mode") == "100644", f"{label}: metadata not returned: {head['Metadata']}")

    # Ranged GET.
    r = s3.get_object(Bucket=bucket, Key="dir/a.bin", Range="bytes=100-1123")
    got = r["Body"].read()
    check(got == body[100:1124], f"{label}: ranged GET returned {len(got)} bytes, wrong content")
    check(r["ContentRange"] == f"bytes 100-1123/{len(body)}", f"{label}: Content-Range {r.get('ContentRange')}")

    # Multipart upload: 2 parts (first >= 5 MiB as S3 requires), then read back.
    part1 = b"\x01" * (5 * 1024 * 1024)
    part2 = b"\x02" * 12345
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="dir/big.bin", Metadata={"mode": "100600"})
    uid = mpu["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key="dir/big.bin", UploadId=uid, PartNumber=1, Body=part1)["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key="dir/big.bin", UploadId=uid, PartNumber=2, Body=part2)["ETag"]
    s3.complete_multipart_upload(
        Bucket=bucket, Key="dir/big.bin", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]},
    )
    big = s3.get_object(Bucket=bucket, Key="dir/big.bin")
    data = big["Body"].read()
    check(data == part1 + part2, f"{label}: multipart object mismatch ({len(data)} bytes)")
    check(big["Metadata"].get("mode") == "100600", f"{label}: multipart metadata {big['Metadata']}")
    tail = s3.get_object(Bucket=bucket, Key="dir/big.bin", Range=f"bytes={len(part1) - 2}-{len(part1) + 1}")["Body"].read()
    check(tail == b"\x01\x01\x02\x02", f"{label}: ranged GET across part boundary {tail!r}")

    # Copy keeps metadata (MetadataDirective COPY is the default).
    s3.copy_object(Bucket=bucket, Key="dir/sub/b.bin", CopySource={"Bucket": bucket, "Key": "dir/a.bin"})
    cp = s3.get_object(Bucket=bucket, Key="dir/sub/b.bin")
    check(cp["Body"].read() == body, f"{label}: copy content mismatch")
    check(cp["Metadata"].get("mode") == "100644", f"{label}: copy lost metadata {cp['Metadata']}")
    s3.put_object(Bucket=bucket, Key="top.txt", Body=b"x")

    # List with delimiter.
    ls = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    keys = [o["Key"] for o in ls.get("Contents", [])]
    prefixes = [p["Prefix"] for p in ls.get("CommonPrefixes", [])]
    check(keys == ["top.txt"] and prefixes == ["dir/"], f"{label}: list / -> keys={keys} prefixes={prefixes}")
    ls = s3.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
    keys = [o["Key"] for o in ls.get("Contents", [])]
    prefixes = [p["Prefix"] for p in ls.get("CommonPrefixes", [])]
    check(keys == ["dir/a.bin", "dir/big.bin"] and prefixes == ["dir/sub/"],
          f"{label}: list dir/ -> keys={keys} prefixes={prefixes}")

    # Clean up.
    for k in ["dir/a.bin", "dir/big.bin", "dir/sub/b.bin", "top.txt"]:
        s3.delete_object(Bucket=bucket, Key=k)
    s3.delete_bucket(Bucket=bucket)
    print(f"s3_smoke: S3 over {label} ok ({endpoint}, {time.monotonic() - t0:.2f}s)")


def kms_checks(label, endpoint, verify):
    kms = client("kms", endpoint, verify)
    key_id = kms.create_key(Description="s3cryptfs smoke test")["KeyMetadata"]["KeyId"]
    ctx = {"s3cryptfs": "smoke"}
    dk = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx)
    check(len(dk["Plaintext"]) == 32, f"kms {label}: data key length {len(dk['Plaintext'])}")
    dec = kms.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx)
    check(dec["Plaintext"] == dk["Plaintext"], f"kms {label}: Decrypt did not return the data key")
    try:
        kms.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext={"s3cryptfs": "other"})
        fail(f"kms {label}: Decrypt with the wrong encryption context succeeded")
    except kms.exceptions.InvalidCiphertextException:
        pass
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    print(f"s3_smoke: KMS over {label} ok (CreateKey, GenerateDataKey, Decrypt, context checked)")


def main():
    http = os.environ.get("S3CRYPTFS_TEST_S3_ENDPOINT")
    https = os.environ.get("S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT")
    ca = os.environ.get("S3CRYPTFS_TEST_CA_FILE")
    check(http and https and ca, "S3CRYPTFS_TEST_S3_ENDPOINT / _HTTPS_ENDPOINT / CA_FILE not set (source server.env)")
    s3_checks("http", http, True)
    s3_checks("https", https, ca)
    kms_checks("http", http, True)
    kms_checks("https", https, ca)
    # A client that does NOT trust the CA must be refused: proves verification is really on.
    try:
        client("s3", https, True).list_buckets()
        fail("https with the system trust store succeeded: TLS verification is not in effect")
    except Exception as e:  # botocore.exceptions.SSLError
        check("SSL" in type(e).__name__ or "certificate" in str(e).lower(),
              f"unexpected error without CA: {type(e).__name__}: {e}")
    print("s3_smoke: all checks passed")


if __name__ == "__main__":
    main()
