#!/usr/bin/env python3
"""Independent re-implementation of s3cryptfs formats v1, v2 and v3 (docs/FORMAT.md),
written from the spec, not the Rust code. It rebuilds the golden fixtures from the
fixed inputs used in src/crypto/object/tests.rs and tests_v2.rs and compares them
with v1-golden.hex (envelope kind 1), v1-kms-golden.hex (envelope kind 2) and
v2-golden.hex (format 2, with its version maps) and v3-golden.hex (format 3, no map),
so the documentation, the
fixtures and the Rust code are checked against each other.

Needs the `cryptography` package. Run: python3 src/crypto/testdata/independent_check.py
"""
import base64, hashlib, hmac, os, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEK, DATA_KEY = b"\x11" * 32, b"\x22" * 32
FILE_ID, WRAP_NONCE, CHUNK_NONCE = b"\x33" * 16, b"\x44" * 12, b"\x55" * 12
PLAINTEXT = b"s3cryptfs golden fixture, format version 1\n"
PATH = "photos/2024/cat.jpg"

fingerprint = hashlib.sha256(b"s3cryptfs-key-fingerprint-v1" + KEK).digest()[:8]
prefix = b"s3cryptf" + struct.pack(">HBBI", 1, 1, 16, 0) + FILE_ID + struct.pack(">H", 68)
assert len(prefix) == 34
wrapped = AESGCM(KEK).encrypt(WRAP_NONCE, DATA_KEY, b"s3cf-wrap-v1" + prefix + fingerprint)
header = (prefix + fingerprint + WRAP_NONCE + wrapped).ljust(512, b"\0")

# One chunk: index 0, last.
aad = b"s3cf-chunk-v1" + FILE_ID + struct.pack(">Q", 0) + b"\x01"
obj = header + CHUNK_NONCE + AESGCM(DATA_KEY).encrypt(CHUNK_NONCE, PLAINTEXT, aad)

bind_key = hmac.new(DATA_KEY, b"s3cf-bind-key-v1", hashlib.sha256).digest()
tag = hmac.new(bind_key, b"s3cf-bind-v1" + FILE_ID + PATH.encode(), hashlib.sha256).digest()[:16]
binding = base64.b64encode(tag).decode().rstrip("=")

# Envelope kind 2 (KMS): same data key, file id and chunk, so the same chunk bytes and binding.
KMS_KEY_ID = b"arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KMS_BLOB = bytes(i ^ 0xA5 for i in range(184))  # a stand-in; the data key is given, not decrypted
kms_env = struct.pack(">H", len(KMS_KEY_ID)) + KMS_KEY_ID + struct.pack(">H", len(KMS_BLOB)) + KMS_BLOB
assert len(kms_env) == 263
kms_prefix = b"s3cryptf" + struct.pack(">HBBI", 1, 2, 16, 0) + FILE_ID + struct.pack(">H", len(kms_env))
kms_header = (kms_prefix + kms_env).ljust(512, b"\0")
kms_obj = kms_header + obj[512:]
print("KMS encryption context:", {"s3cryptfs:file-id": FILE_ID.hex()})

# Format 2: the same header with version 2 (so another wrap), the version id in each chunk's AAD, and the
# version map that the object's metadata carries, MAC'd under a key derived from the data key.
VERSION_A, VERSION_B = b"\x66" * 16, b"\x77" * 16
PLAINTEXT_V2 = b"s3cryptfs golden fixture, format version 2\n"
prefix2 = b"s3cryptf" + struct.pack(">HBBI", 2, 1, 16, 0) + FILE_ID + struct.pack(">H", 68)
wrapped2 = AESGCM(KEK).encrypt(WRAP_NONCE, DATA_KEY, b"s3cf-wrap-v1" + prefix2 + fingerprint)
header2 = (prefix2 + fingerprint + WRAP_NONCE + wrapped2).ljust(512, b"\0")
aad2 = b"s3cf-chunk-v2" + FILE_ID + struct.pack(">Q", 0) + b"\x01" + VERSION_A
assert len(aad2) == 54
obj2 = header2 + CHUNK_NONCE + AESGCM(DATA_KEY).encrypt(CHUNK_NONCE, PLAINTEXT_V2, aad2)
map_key = hmac.new(DATA_KEY, b"s3cf-map-key-v2", hashlib.sha256).digest()

def version_map(plain_len, sealed, runs):
    body = bytes([len(runs)]) + struct.pack(">Q", sealed) + b"".join(struct.pack(">Q", first) + vid for first, vid in runs)
    tag = hmac.new(map_key, b"s3cf-map-v2" + FILE_ID + struct.pack(">Q", plain_len) + body, hashlib.sha256).digest()[:16]
    return base64.b64encode(body + tag).decode().rstrip("=")

map_one = version_map(len(PLAINTEXT_V2), 1, [(0, VERSION_A)])
map_three = version_map(3 * 65536, 4, [(0, VERSION_A), (1, VERSION_B), (2, VERSION_A)])
print("v2 map:", map_one)
print("v2 three-run map:", map_three)

# Format 3: version 2's layout with version 3 in the header (another wrap) and its own chunk AAD domain; a new
# object has no map, and its chunks name the implicit version id, which is the file id.
PLAINTEXT_V3 = b"s3cryptfs golden fixture, format version 3\n"
prefix3 = b"s3cryptf" + struct.pack(">HBBI", 3, 1, 16, 0) + FILE_ID + struct.pack(">H", 68)
wrapped3 = AESGCM(KEK).encrypt(WRAP_NONCE, DATA_KEY, b"s3cf-wrap-v1" + prefix3 + fingerprint)
header3 = (prefix3 + fingerprint + WRAP_NONCE + wrapped3).ljust(512, b"\0")
aad3 = b"s3cf-chunk-v3" + FILE_ID + struct.pack(">Q", 0) + b"\x01" + FILE_ID
assert len(aad3) == 54
obj3 = header3 + CHUNK_NONCE + AESGCM(DATA_KEY).encrypt(CHUNK_NONCE, PLAINTEXT_V3, aad3)
if "--print-v3" in sys.argv:
    print("v3 fixture:", obj3.hex())

here = os.path.dirname(os.path.abspath(__file__))
ok = True
tests_v2 = open(os.path.join(here, "..", "object", "tests_v2.rs")).read()
for what, value in [("GOLDEN_V2_MAP", map_one), ("GOLDEN_V2_THREE_RUNS", map_three)]:
    pinned = f'const {what}: &str = "{value}";' in tests_v2
    print(what, "matches tests_v2.rs:", pinned)
    ok = ok and pinned
for name, expected in [("v1-golden.hex", obj), ("v1-kms-golden.hex", kms_obj), ("v2-golden.hex", obj2), ("v3-golden.hex", obj3)]:
    text = open(os.path.join(here, name)).read()
    fixture = bytes.fromhex("".join(l for l in text.splitlines() if not l.startswith("#")))
    print(name, "matches:", fixture == expected)
    ok = ok and fixture == expected
print("fingerprint of KEK:", fingerprint.hex())
print("binding:", binding)
sys.exit(0 if ok else 1)
