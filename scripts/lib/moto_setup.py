#!/usr/bin/env python3
"""Makes a freshly started moto server check credentials, and proves that it does.

Run by `scripts/moto-server.sh start` with the moto venv's python:  moto_setup.py ENDPOINT OUT_FILE

moto starts with authentication off (INITIAL_NO_AUTH_ACTION_COUNT unset = infinite). While it is off this script
creates the IAM user `s3cryptfs-admin` with an allow-everything inline policy and an access key; then it turns
authentication on for every later request (POST /moto-api/reset-auth with 0) and checks what the tests rely on:

  unknown access key id        -> 403 InvalidAccessKeyId
  known key, wrong secret      -> 403 SignatureDoesNotMatch
  IAM user without any policy  -> 403 AccessDenied
  the admin key                -> 200 (create and list a bucket)

OUT_FILE gets two shell lines: export S3CRYPTFS_TEST_MOTO_ADMIN_KEY_ID='…' and …_ADMIN_SECRET='…'.
Exit status 0 only if every check passed.
"""
import json
import sys
import urllib.request
import uuid

import boto3
import botocore.exceptions
from botocore.config import Config

ADMIN = "s3cryptfs-admin"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def fail(msg):
    print(f"moto_setup: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def client(endpoint, service, key, secret):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )


def expect_error(what, code, call):
    try:
        call()
    except botocore.exceptions.ClientError as e:
        got = (e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"])
        if got != (403, code):
            fail(f"{what}: expected 403 {code}, got {got[0]} {got[1]}")
        return
    fail(f"{what}: expected 403 {code}, but the request succeeded (is authentication off?)")


def main():
    endpoint, out_file = sys.argv[1], sys.argv[2]
    # Authentication is still off: any key creates the admin.
    iam = client(endpoint, "iam", "setup", "setup")
    iam.create_user(UserName=ADMIN)
    iam.put_user_policy(UserName=ADMIN, PolicyName="allow-all", PolicyDocument=json.dumps(ALLOW_ALL))
    key = iam.create_access_key(UserName=ADMIN)["AccessKey"]
    admin = (key["AccessKeyId"], key["SecretAccessKey"])

    # From now on every request is authenticated and authorized.
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status != 200:
            fail(f"POST /moto-api/reset-auth answered {resp.status}")

    bucket = f"setup-{uuid.uuid4().hex[:12]}"
    s3 = client(endpoint, "s3", *admin)
    s3.create_bucket(Bucket=bucket)
    s3.list_objects_v2(Bucket=bucket)
    expect_error("unknown key", "InvalidAccessKeyId",
                 lambda: client(endpoint, "s3", "AKIAUNKNOWNUNKNOWN00", "x").list_objects_v2(Bucket=bucket))
    expect_error("wrong secret", "SignatureDoesNotMatch",
                 lambda: client(endpoint, "s3", admin[0], "not-the-secret").list_objects_v2(Bucket=bucket))
    iam = client(endpoint, "iam", *admin)
    iam.create_user(UserName="setup-nobody")
    nobody = iam.create_access_key(UserName="setup-nobody")["AccessKey"]
    expect_error("user without a policy", "AccessDenied",
                 lambda: client(endpoint, "s3", nobody["AccessKeyId"], nobody["SecretAccessKey"])
                 .list_objects_v2(Bucket=bucket))
    s3.delete_bucket(Bucket=bucket)

    with open(out_file, "w") as f:
        # moto's keys are [A-Z0-9] and base64 characters: single quotes are safe.
        f.write(f"export S3CRYPTFS_TEST_MOTO_ADMIN_KEY_ID='{admin[0]}'\n"
                f"export S3CRYPTFS_TEST_MOTO_ADMIN_SECRET='{admin[1]}'\n")


if __name__ == "__main__":
    main()
