#!/usr/bin/env bash
# Quick start on a fresh Debian 12 machine: install FUSE, build s3cryptfs, make a key, mount the embedded local store,
# write a file through the mount, read it back, and show that what reached the store is encrypted.
#
#   scripts/quickstart.sh            # works in /tmp/s3cryptfs-demo (override with DEMO_DIR=...)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-/tmp/s3cryptfs-demo}

if ! command -v fusermount3 >/dev/null; then
  echo "== installing fuse3 (needs root)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
fi
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
echo "== building (release)"
cargo build --release --quiet --bin s3cryptfs
BIN=$PWD/target/release/s3cryptfs

if mountpoint -q "$DEMO/mnt" 2>/dev/null; then $BIN unmount "$DEMO/mnt"; fi
rm -rf "$DEMO"
mkdir -p "$DEMO/store" "$DEMO/mnt"
echo "== key: $DEMO/key"
$BIN keygen --output "$DEMO/key"
echo "== mounting file://$DEMO/store at $DEMO/mnt (mode cse-c)"
$BIN mount -o "mode=cse-c,key_file=$DEMO/key" "file://$DEMO/store" "$DEMO/mnt"
echo "hello from s3cryptfs, $(date -u +%FT%TZ)" > "$DEMO/mnt/hello.txt"
echo "== read back through the mount:"
cat "$DEMO/mnt/hello.txt"
ls -l "$DEMO/mnt"
echo "== the stored object (first bytes; the header starts with the magic 's3cryptf', the rest is ciphertext):"
od -A d -c "$DEMO/store/hello.txt" | head -4
if grep -q "hello from s3cryptfs" "$DEMO/store/hello.txt"; then
  echo "ERROR: plaintext found in the store" >&2
  exit 1
fi
echo "== plaintext does not appear in the stored object"
$BIN unmount "$DEMO/mnt"   # returns once everything written is in the store
echo "== unmounted. Mount again with:"
echo "   $BIN mount -o key_file=$DEMO/key file://$DEMO/store $DEMO/mnt"
