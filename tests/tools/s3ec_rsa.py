"""S3 Encryption Client objects whose data key is wrapped with RSA-OAEP-SHA1, built straight from the spec (the
project's S3EC.md §2.2, §2.3 and §3.3) with the `cryptography` package, for tests/s3ec_rsa.rs (issue 12).

The official Python client 4.0.0 has no RSA keyring, so this is the independent writer: it shares no code with
s3cryptfs, and what it stores is what Java's or .NET's RsaKeyring would store.

    s3ec_rsa.py keygen --out PEM [--pkcs1-out PEM]
    s3ec_rsa.py put    --version {2,3} --key-file PEM --bucket B --key K --file PATH
                       [--length-byte N] [--suffix TEXT] [--wrap-name NAME]

keygen  writes a new RSA-2048 private key as PEM PKCS#8 ("PRIVATE KEY") to --out, and the same key as PEM PKCS#1
        ("RSA PRIVATE KEY") to --pkcs1-out if given; both files are created with mode 0600.
put     encrypts PATH as one S3EC object and stores it with one PutObject (plain boto3; the envelope in user metadata):
        a random 32-byte data key DK;
        V2: AES-256-GCM under DK, random 12-byte IV, no AAD; metadata x-amz-key-v2, x-amz-iv, x-amz-cek-alg
            AES/GCM/NoPadding, x-amz-wrap-alg RSA-OAEP-SHA1, x-amz-matdesc {}, x-amz-tag-len 128;
        V3: message id MID = 28 random bytes; DEK = HKDF-SHA512(DK, salt MID, info 00 73 "DERIVEKEY", 32 bytes),
            commitment = HKDF-SHA512(DK, salt MID, info 00 73 "COMMITKEY", 28 bytes); AES-256-GCM under DEK with
            nonce 01 x 12 and AAD 00 73; metadata x-amz-c 115, x-amz-3, x-amz-w 22, x-amz-d, x-amz-i;
        the wrapped key is RSA-OAEP (SHA-1, MGF1-SHA1, no label) under the public half of --key-file over the pseudo
        data key  len(DK) (1 byte) || DK || UTF-8(cek-alg: "AES/GCM/NoPadding" for V2, "115" for V3).
        Tampering, for the tests that must fail: --length-byte N writes N as the length byte (DK stays 32 bytes),
        --suffix TEXT puts TEXT after DK instead of the version's cek-alg, --wrap-name NAME stores NAME as the V2
        x-amz-wrap-alg (the content is still wrapped with RSA-OAEP-SHA1). Prints {"bucket", "key", "version", "size"}.

Endpoint: $S3CRYPTFS_TEST_S3_ENDPOINT, path-style addressing; credentials from $AWS_ACCESS_KEY_ID /
$AWS_SECRET_ACCESS_KEY (default test/test), region $AWS_REGION (default us-east-1): the env file scripts/s3-server.sh
writes. Run with $S3CRYPTFS_TEST_S3EC_PYTHON (scripts/s3ec-client.sh: its venv has cryptography and boto3).

Exit status: 0 ok; 2 usage; 4 the server answered with an S3 error ("<Code>: <message>" on stderr).
"""

import argparse
import base64
import json
import os
import sys

import boto3
import botocore.exceptions
from botocore.config import Config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CEK_ALG = {"2": b"AES/GCM/NoPadding", "3": b"115"}
SUITE_ID = b"\x00\x73"  # suite 0x0073, the V3 content suite
V3_NONCE = b"\x01" * 12


def b64(data):
    return base64.b64encode(data).decode("ascii")


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def cmd_keygen(a):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    none = serialization.NoEncryption()
    write_private(a.out, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none))
    if a.pkcs1_out:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, none)
        write_private(a.pkcs1_out, pem)


def hkdf_sha512(dk, salt, label, length):
    return HKDF(algorithm=hashes.SHA512(), length=length, salt=salt, info=SUITE_ID + label).derive(dk)


def cmd_put(a):
    with open(a.key_file, "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    with open(a.file, "rb") as f:
        plain = f.read()
    dk = os.urandom(32)
    length_byte = 32 if a.length_byte is None else a.length_byte
    suffix = CEK_ALG[a.version] if a.suffix is None else a.suffix.encode("utf-8")
    pseudo = bytes([length_byte]) + dk + suffix
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    edk = private.public_key().encrypt(pseudo, oaep)
    if a.version == "2":
        iv = os.urandom(12)
        body = AESGCM(dk).encrypt(iv, plain, None)
        meta = {
            "x-amz-key-v2": b64(edk),
            "x-amz-iv": b64(iv),
            "x-amz-cek-alg": "AES/GCM/NoPadding",
            "x-amz-wrap-alg": a.wrap_name or "RSA-OAEP-SHA1",
            "x-amz-matdesc": "{}",
            "x-amz-tag-len": "128",
        }
    else:
        if a.wrap_name:
            sys.exit("s3ec_rsa.py: --wrap-name is for V2 (V3 has no legacy wrap names)")
        mid = os.urandom(28)
        dek = hkdf_sha512(dk, mid, b"DERIVEKEY", 32)
        commitment = hkdf_sha512(dk, mid, b"COMMITKEY", 28)
        body = AESGCM(dek).encrypt(V3_NONCE, plain, SUITE_ID)
        meta = {"x-amz-c": "115", "x-amz-3": b64(edk), "x-amz-w": "22", "x-amz-d": b64(commitment), "x-amz-i": b64(mid)}
    assert len(body) == len(plain) + 16
    s3_client().put_object(Bucket=a.bucket, Key=a.key, Body=body, Metadata=meta)
    print(json.dumps({"bucket": a.bucket, "key": a.key, "version": int(a.version), "size": len(plain)}))


def s3_client():
    ep = os.environ.get("S3CRYPTFS_TEST_S3_ENDPOINT")
    if not ep:
        sys.exit("s3ec_rsa.py: S3CRYPTFS_TEST_S3_ENDPOINT is not set (source ~/.cache/s3cryptfs-test/server.env)")
    sess = boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    return sess.client("s3", endpoint_url=ep, config=cfg)


def main():
    p = argparse.ArgumentParser(prog="s3ec_rsa.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="op", required=True)

    keygen = sub.add_parser("keygen", help="a new RSA-2048 private key, PEM PKCS#8 (and PKCS#1), mode 0600")
    keygen.add_argument("--out", required=True)
    keygen.add_argument("--pkcs1-out")
    keygen.set_defaults(fn=cmd_keygen)

    put = sub.add_parser("put", help="store a file as an RSA-OAEP-SHA1-wrapped S3EC object")
    put.add_argument("--version", choices=["2", "3"], required=True, help="S3EC message format")
    put.add_argument("--key-file", required=True, help="PEM private key whose public half wraps the data key")
    put.add_argument("--bucket", required=True)
    put.add_argument("--key", required=True)
    put.add_argument("--file", required=True)
    put.add_argument("--length-byte", type=int, choices=range(256), metavar="N", help="tamper: the length byte")
    put.add_argument("--suffix", help="tamper: the pseudo key's suffix instead of the version's cek-alg")
    put.add_argument("--wrap-name", help="tamper (V2): the x-amz-wrap-alg stored")
    put.set_defaults(fn=cmd_put)

    a = p.parse_args()
    try:
        a.fn(a)
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        print(f"{err.get('Code', '?')}: {err.get('Message', '')}", file=sys.stderr)
        sys.exit(4)


if __name__ == "__main__":
    main()
