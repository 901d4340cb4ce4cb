#!/usr/bin/env bash
# Runs public filesystem test suites against a fresh s3cryptfs mount: pjdfstest (POSIX syscall semantics), fsx
# (random reads, writes and truncates checked against an in-memory copy) and fsstress (four processes of random
# namespace and data operations at once; then the tree, with every file's checksum, must be the same after a
# remount). None is in this repository nor on the package registries CI installs from, so this is not part of
# scripts/test.sh: bring their sources yourself (pjd/pjdfstest; xfstests' ltp/fsx.c and ltp/fsstress.c, which build
# alone with a small global.h) and build them first. docs/SEMANTICS.md ("Checked against public test suites") has
# the last results and what is expected to fail.
#
#   scripts/suites.sh pjdfstest STORE_URL [MODE] [DIRS...]   # PJDFSTEST=/path/to/pjdfstest (built; has tests/)
#   scripts/suites.sh fsx STORE_URL [MODE] [FSX ARGS...]     # FSX=/path/to/fsx (the binary)
#   scripts/suites.sh fsstress STORE_URL [MODE] [SEED]       # FSSTRESS=/path/to/fsstress (the binary)
#
# STORE_URL: file:///abs/dir, s3://bucket[/prefix] (endpoint from S3CRYPTFS_SUITE_ENDPOINT, credentials from the
# AWS_* variables), az://…, gs://… (the emulators' variables as scripts/azurite.sh and scripts/gcs.sh print them).
# MODE: any mount mode, cse-c by default (for cse-c and sse-c a key is made in the work directory); more mount options
# (kms_key_id=, ca_file=…) in S3CRYPTFS_SUITE_OPTS.
# Work directory: S3CRYPTFS_SUITE_DIR (default /tmp/s3cryptfs-suites). Must run as root (pjdfstest changes owners).
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: scripts/suites.sh pjdfstest|fsx STORE_URL [MODE] [...]}
url=${2:?a store URL}
mode=${3:-cse-c}
shift $(( $# < 3 ? $# : 3 ))
work=${S3CRYPTFS_SUITE_DIR:-/tmp/s3cryptfs-suites}
bin=${S3CRYPTFS_BIN:-$PWD/target/release/s3cryptfs}
[ -x "$bin" ] || cargo build --release --quiet --bin s3cryptfs

if mountpoint -q "$work/mnt" 2>/dev/null; then "$bin" unmount "$work/mnt"; fi
rm -rf "$work/mnt" "$work/staging"
mkdir -p "$work/mnt"
opts="mode=$mode,staging_dir=$work/staging,allow_other"
if [ "$mode" = cse-c ] || [ "$mode" = sse-c ]; then
  [ -f "$work/key" ] || "$bin" keygen --output "$work/key"
  opts="$opts,key_file=$work/key"
fi
[ -n "${S3CRYPTFS_SUITE_ENDPOINT:-}" ] && opts="$opts,endpoint=$S3CRYPTFS_SUITE_ENDPOINT"
[ -n "${S3CRYPTFS_SUITE_OPTS:-}" ] && opts="$opts,$S3CRYPTFS_SUITE_OPTS"

daemon=
mount_fs() {
  "$bin" mount -f -o "$opts" "$url" "$work/mnt" >> "$work/daemon.log" 2>&1 &
  daemon=$!
  for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
  if ! mountpoint -q "$work/mnt"; then
    echo "suites: the mount did not come up:" >&2
    cat "$work/daemon.log" >&2
    exit 1
  fi
}
unmount_fs() {
  cd /
  "$bin" unmount "$work/mnt" || true
  wait "$daemon" || echo "suites: the daemon exited with status $?" >&2
  daemon=
}
finish() {
  [ -z "$daemon" ] || unmount_fs
  grep -E " (WARN|ERROR) " "$work/daemon.log" | head -20 || true
}
trap finish EXIT
: > "$work/daemon.log"
mount_fs
chmod 755 "$work/mnt"
mkdir -p "$work/mnt/run"
cd "$work/mnt/run"

status=0
case $suite in
  pjdfstest)
    root=${PJDFSTEST:?set PJDFSTEST to a built pjdfstest tree}
    dirs=("$@")
    [ ${#dirs[@]} -gt 0 ] || dirs=(chmod chown ftruncate link mkdir mkfifo mknod open posix_fallocate rename rmdir
      symlink truncate unlink utimensat)
    paths=()
    for d in "${dirs[@]}"; do paths+=("$root/tests/$d"); done
    prove -r "${paths[@]}" > "$work/prove.out" 2>&1 || status=$?
    grep -E "Wstat|Failed tests|^Files=|^Result" "$work/prove.out" || true
    echo "suites: full output in $work/prove.out"
    ;;
  fsx)
    fsx=${FSX:?set FSX to the fsx binary}
    # Plain reads, writes and truncates: no mmap, no fallocate modes (the mount has neither).
    args=("$@")
    [ ${#args[@]} -gt 0 ] || args=(-N 3000 -S 1 -c 10 -l 20000000 -o 2000000)
    "$fsx" -R -W -F -K -H -z -C -I "${args[@]}" -P "$work" testfile > "$work/fsx.out" 2>&1 || status=$?
    tail -3 "$work/fsx.out"
    ;;
  fsstress)
    fsstress=${FSSTRESS:?set FSSTRESS to the fsstress binary}
    # Operations a mount without hard links, xattrs, mmap, fallocate modes or direct I/O has.
    ops=(creat=4 mkdir=2 rmdir=1 unlink=1 rename=2 symlink=2 readlink=1 chown=3 truncate=2 write=4 writev=4 read=2
      readv=1 fsync=1 fdatasync=1 getdents=1 stat=2)
    flags=()
    for o in "${ops[@]}"; do flags+=(-f "$o"); done
    "$fsstress" -d "$work/mnt/run/dir" -p 4 -n 2000 -s "${1:-1}" -z "${flags[@]}" > "$work/fsstress.out" 2>&1 \
      || status=$?
    echo "suites: fsstress exit status $status"
    # What the mount shows, then what a new mount of the same store shows: names, types, sizes, modes, owners,
    # symlink targets and every file's MD5.
    snapshot() {
      (cd "$work/mnt/run" && find dir -printf '%p %s %y %m %U %G %l\n' | sort \
        && find dir -type f -print0 | sort -z | xargs -0 -r md5sum) > "$1"
    }
    snapshot "$work/before"
    unmount_fs
    mount_fs
    snapshot "$work/after"
    if diff "$work/before" "$work/after" > "$work/remount.diff"; then
      echo "suites: $(grep -c . "$work/before") lines of the tree, the same after a remount"
    else
      echo "suites: the tree changed across a remount (see $work/remount.diff):"
      head -20 "$work/remount.diff"
      status=1
    fi
    ;;
  *)
    echo "suites: unknown suite $suite (pjdfstest, fsx or fsstress)" >&2
    status=2
    ;;
esac
exit $status
