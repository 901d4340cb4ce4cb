#!/usr/bin/env bash
# Installs s3cryptfs where a Linux system expects it (run as root, from the repository):
#   /usr/local/bin/s3cryptfs                      the binary (built with cargo --release if needed)
#   /sbin/mount.fuse.s3cryptfs -> the binary      so `mount -t fuse.s3cryptfs` and fstab lines work
#   /sbin/mount.s3cryptfs      -> the binary      the same for `mount -t s3cryptfs`
#   /sbin/umount.fuse.s3cryptfs -> the binary     so `umount` returns only once pending uploads are done
#   /etc/systemd/system/s3cryptfs@.service        one mount per /etc/s3cryptfs/NAME.conf (see the unit)
#   /etc/s3cryptfs/                               0700, for NAME.conf and NAME.key
#   /usr/local/share/doc/s3cryptfs/               README and docs
#
#   PREFIX=/usr/local DESTDIR=/tmp/pkg scripts/install.sh     # staged install (packaging)
#   scripts/install.sh --uninstall                            # removes the files above (not /etc/s3cryptfs)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
BIN="$DESTDIR$PREFIX/bin/s3cryptfs"
UNIT="$DESTDIR/etc/systemd/system/s3cryptfs@.service"
HELPERS=("$DESTDIR/sbin/mount.fuse.s3cryptfs" "$DESTDIR/sbin/mount.s3cryptfs" "$DESTDIR/sbin/umount.fuse.s3cryptfs")
DOC="$DESTDIR$PREFIX/share/doc/s3cryptfs"

if [[ "${1:-}" == "--uninstall" ]]; then
    rm -f "$BIN" "$UNIT" "${HELPERS[@]}"
    rm -rf "$DOC"
    [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
    echo "removed s3cryptfs (kept /etc/s3cryptfs)"
    exit 0
fi

if [[ ! -x target/release/s3cryptfs ]]; then
    [[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
    cargo build --release --locked --bin s3cryptfs
fi
install -D -m 0755 target/release/s3cryptfs "$BIN"
mkdir -p "$DESTDIR/sbin"
for h in "${HELPERS[@]}"; do ln -sfn "$PREFIX/bin/s3cryptfs" "$h"; done
sed "s#/usr/local/bin/s3cryptfs#$PREFIX/bin/s3cryptfs#g" 'scripts/systemd/s3cryptfs@.service' | install -D -m 0644 /dev/stdin "$UNIT"
install -d -m 0700 "$DESTDIR/etc/s3cryptfs"
install -D -m 0644 README.md "$DOC/README.md"
for f in docs/*.md; do install -D -m 0644 "$f" "$DOC/$(basename "$f")"; done
[[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
echo "installed: $BIN, ${HELPERS[*]}, $UNIT"
