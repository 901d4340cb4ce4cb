"""An independent raw S3 client (boto3) for the cross-checks in tests/sse.rs.

It proves that what the mount writes is ordinary S3 data in the chosen encryption mode, and that the mount reads
what a stock client wrote, without sharing a line of code with s3cryptfs.

    raw_s3.py put  BUCKET KEY SRC  [--sse AES256|aws:kms] [--kms-key ID] [--key-file F [--key-line N]]
    raw_s3.py get  BUCKET KEY DEST [--key-file F [--key-line N]]
    raw_s3.py head BUCKET KEY      [--key-file F [--key-line N]]   # prints the SSE fields as JSON
    raw_s3.py tags BUCKET KEY                                       # prints the object's tags as JSON

`--key-file` is an s3cryptfs key file (base64 keys, one per line); `--key-line` picks the Nth key (default 1) and
sends it as the SSE-C customer key. The endpoint is $S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT, trusted through
$S3CRYPTFS_TEST_CA_FILE. On an S3 error it prints the error code to stderr and exits 3.
"""

import argparse
import base64
import json
import os
import sys

import boto3
import botocore.exceptions


def customer_key(args):
    if not args.key_file:
        return {}
    with open(args.key_file) as f:
        lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    raw = base64.b64decode(lines[args.key_line - 1] + "==")
    # boto3 base64-encodes the key and adds its MD5 itself.
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": raw}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["put", "get", "head", "tags"])
    p.add_argument("bucket")
    p.add_argument("key")
    p.add_argument("file", nargs="?")
    p.add_argument("--sse")
    p.add_argument("--kms-key")
    p.add_argument("--key-file")
    p.add_argument("--key-line", type=int, default=1)
    args = p.parse_args()

    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT"],
        verify=os.environ["S3CRYPTFS_TEST_CA_FILE"],
        region_name="us-east-1",
    )
    extra = customer_key(args)
    try:
        if args.op == "put":
            if args.sse:
                extra["ServerSideEncryption"] = args.sse
            if args.kms_key:
                extra["SSEKMSKeyId"] = args.kms_key
            with open(args.file, "rb") as f:
                s3.put_object(Bucket=args.bucket, Key=args.key, Body=f.read(), **extra)
        elif args.op == "get":
            body = s3.get_object(Bucket=args.bucket, Key=args.key, **extra)["Body"].read()
            with open(args.file, "wb") as f:
                f.write(body)
        elif args.op == "tags":
            tags = s3.get_object_tagging(Bucket=args.bucket, Key=args.key)["TagSet"]
            print(json.dumps({t["Key"]: t["Value"] for t in tags}))
        else:
            h = s3.head_object(Bucket=args.bucket, Key=args.key, **extra)
            fields = ["ServerSideEncryption", "SSEKMSKeyId", "SSECustomerAlgorithm", "SSECustomerKeyMD5"]
            print(json.dumps({k: h.get(k) for k in fields}))
    except botocore.exceptions.ClientError as e:
        print(e.response.get("Error", {}).get("Code", "unknown"), file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
