#!/usr/bin/env python3
"""Create a blob container on Azurite (or any Azure blob endpoint in path style) with a Shared Key signature.

Usage: azurite_container.py BLOB_URL ACCOUNT BASE64_KEY CONTAINER
  BLOB_URL  e.g. http://127.0.0.1:10000 (the account name is added to the path, as Azurite expects)

Only the Python standard library: the test harness needs no Azure SDK. An existing container is fine (exit 0).
"""
import base64
import hashlib
import hmac
import sys
import urllib.error
import urllib.request
from email.utils import formatdate


def main() -> int:
    url, account, key, container = sys.argv[1:5]
    version = "2021-08-06"
    date = formatdate(usegmt=True)
    headers = {"x-ms-date": date, "x-ms-version": version, "Content-Length": "0"}
    canonical_headers = f"x-ms-date:{date}\nx-ms-version:{version}\n"
    # Path-style (emulator) resource: /account/account/container, then the query parameters, one per line.
    resource = f"/{account}/{account}/{container}\nrestype:container"
    to_sign = "PUT\n\n\n\n\n\n\n\n\n\n\n\n" + canonical_headers + resource
    sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
    headers["Authorization"] = f"SharedKey {account}:{sig}"
    req = urllib.request.Request(f"{url}/{account}/{container}?restype=container", method="PUT", headers=headers)
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        if e.code == 409:  # ContainerAlreadyExists
            return 0
        print(f"creating container {container}: HTTP {e.code}: {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
