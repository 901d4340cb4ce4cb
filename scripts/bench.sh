#!/usr/bin/env bash
# Benchmark: one command measures, in one run against one S3 server, a raw object_store client, s3cryptfs through a
# real FUSE mount in each mode of BENCH_MODES, and — when installed — s3fs and rclone mount (crypt remote) as peers.
# Every figure is the median of BENCH_RUNS runs (default 3); the table gives each figure, its ratio to the raw client
# and, for s3cryptfs, its ratio to the best peer. Ratios are "times as good": above 1 is faster (or less memory) than
# the reference, below 1 slower.
#
#   scripts/bench.sh                                  # default sizes: 1 GiB file, 2,000 files of 4 KiB, 2,000 reads
#   BENCH_MIB=64 BENCH_FILES=200 BENCH_READS=200 BENCH_RUNS=1 scripts/bench.sh   # a quick run
#   BENCH_MODES="none cse-c cse-kms sse-c" scripts/bench.sh   # s3cryptfs modes (default: none cse-c)
#   BENCH_PEERS=s3fs scripts/bench.sh                 # peers to try (default: s3fs rclone; each only if installed)
#   BENCH_ENDPOINT=http://127.0.0.1:3900 scripts/bench.sh     # any S3 endpoint instead of the LocalStack test server
#   BENCH_OPTS=aead=aes-gcm scripts/bench.sh          # extra s3cryptfs mount options (here: the RustCrypto AEAD)
#   BENCH_BIN=/path/to/old/s3cryptfs scripts/bench.sh # the same run with another build (A/B)
#   BENCH_S3EC=0 scripts/bench.sh                     # skip the S3 Encryption Client comparison (default: run it)
#   BENCH_MODES= BENCH_PEERS= BENCH_RAW=0 scripts/bench.sh    # only the S3EC comparison
#
# Server. Without BENCH_ENDPOINT: the LocalStack test server of scripts/s3-server.sh, started if it is not running
# (and stopped at the end only if this script started it). With BENCH_ENDPOINT=URL: that endpoint, path-style, with
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN if set) and AWS_REGION (default us-east-1) from the
# environment; the credentials must be allowed to create and delete buckets (every system and run gets a bucket of
# its own, emptied and deleted after the run). There cse-kms needs BENCH_KMS_KEY_ID (and BENCH_KMS_ENDPOINT unless
# AWS KMS), sse-c needs an https endpoint (BENCH_CA_FILE for a private CA), and the S3EC comparison is off (it needs
# LocalStack's KMS). LocalStack is slow and its speed is uneven; Garage is faster and closer to a real server:
# docs/BENCHMARK.md sets one up.
#
# Workloads (each on a fresh mount, so neither the kernel's page cache nor the daemon's holds the data; "raw" is what
# the raw client does instead):
#   seq_write   write BENCH_MIB MiB (default 1024) in 1 MiB writes, fsync, close     raw: multipart upload, 8 MiB parts
#   seq_read    read it back in 1 MiB reads                                          raw: one GET
#   peak_rss    VmHWM of the daemon (s3cryptfs, s3fs, rclone) after seq_read         raw: the raw client's own VmHWM
#   rand_read   BENCH_READS (2,000) preads of 4 KiB at random 4 KiB-aligned offsets of the file, one reader (ops/s)
#                                                                                    raw: one ranged GET per read
#   rand_read8  the same reads split over 8 concurrent readers, each its own fd      raw: 8 tasks, one client
#               (s3cryptfs with its default options: since 2026-12-05 a file read at random is fetched whole into
#               the mount's scratch beside the journal; before, without cache_dir, each read was a GET)
#   small_create  create BENCH_FILES (2,000) files of 4 KiB in one directory         raw: one PUT each
#   small_list  readdir + lstat of each (what `ls -l` does, in-process)              raw: paged LIST
#   small_read  read each file (after small_list, on the same mount)                 raw: one GET each
#   small_overwrite  rewrite each of those files whole with new bytes (open O_TRUNC, write, close), as cp or
#               rsync --inplace over an existing tree does                           raw: one PUT each
#   ls_l        `ls -l` of the directory                                             raw: paged LIST
#   rm_r        `rm -r` of the directory                                             raw: LIST + batch DeleteObjects
#                                                                                         (1,000 keys per request)
#   stat_dir1   cold mount, then readdir of a directory of BENCH_DIR_ENTRIES (30,000) files of 16 bytes and an lstat of
#               each in readdir order (what os.stat over os.listdir does); the first mount after the directory was
#               filled: in mode none the files are PUT by the raw client (fast; no directory index yet, so every
#               file's metadata is read by HEAD), in the other modes and for peers written through a mount with 16
#               writers (dir_fill; s3cryptfs writes the index then)                     raw: paged LIST of the prefix
#   stat_dir    the same on the next fresh mount (s3cryptfs: the index is there)     raw: paged LIST of the prefix
#   find_ls     `find DIR -ls` of that directory, cold                               raw: paged LIST of the prefix
#   dir_fill    filling that directory (not a workload of the issue: setup, shown for reference)
#                                                                                    raw: PUTs, 16 in flight
#   change_1b   open the large file for writing, change 1 byte in its middle, close  raw: none
#   append_4k   open it with O_APPEND, append 4 KiB, close                           raw: none
#   patch_read  open it read-write, change 1 byte near its start, read it all through that descriptor (1 MiB
#               reads), close: rsync --inplace, a database, an image patcher           raw: none
# Writing workloads are timed until the data is in the store: s3cryptfs and s3fs upload before close returns; rclone
# uploads after close, so its timings include waiting until its log has said "Copied" for each file written.
#
# Peers. s3fs (Debian package s3fs): default options plus url=, use_path_request_style, endpoint=REGION and a 0600
# passwd file, tmpdir= (where it keeps a temporary copy of each open file); no local cache (use_cache off, its
# default). rclone (Debian package rclone): an s3 remote (provider Other) under a crypt remote (standard file-name
# encryption, password set with `rclone obscure`), mounted with
# --vfs-cache-mode writes: `off` and `minimal` refuse to change a byte in the middle of an existing file or to append
# to it; `full` would also keep what is read in its disk cache, which is not what the other systems do.
# --vfs-write-back 0s starts each upload at close instead of 5 s later. Each mount gets a fresh cache directory.
# Only what is installed runs (`command -v`); BENCH_PEERS= runs none.
#
# The S3EC comparison (best of 3 each): a V3 object of BENCH_MIB MiB written by the official Python client
# (scripts/s3ec-client.sh; upload_file in 8 MiB parts), next to `cp` of the same file into a cse-kms mount with
# -o format=s3ec (timed to the end of `s3cryptfs unmount`, so every byte is in the store); then that object read
# back cold by the official client's get_object and by `cat` through a fresh cse-kms mount. The official client
# must read what the mount wrote, and the mount what the client wrote, byte for byte.
#
# The disk cache (issue 14): per mode, a cold read with an empty -o cache_dir (disk_cold), then a read after a
# remount served from it (disk_warm); gocryptfs on the same local disk (Debian package gocryptfs), when installed,
# is the local reference for disk_warm; and the random reads of rand_read with an empty cache_dir (rand_read_disk),
# where the file is fetched whole into the cache once the reads show the pattern (src/read), next to s3fs's
# rand_read (s3fs keeps a temporary copy of the file on disk). BENCH_DISK=0 skips it.
#
# Other knobs: BENCH_FS=0 skips every workload but the disk cache's (with BENCH_DISK=1); BENCH_RAW=0 skips the raw
# client; BENCH_TIMEOUT (default 1800) bounds each workload in seconds; a
# workload that fails or times out shows as "fail" in the table and the run goes on. BENCH_CACHE_DIR=DIR puts every
# system's local files (s3cryptfs's write journal and disk caches, s3fs's temporary copies, rclone's cache, gocryptfs)
# in a fresh directory under DIR (yours, not writable by others), to measure the filesystem they would live on
# (default: the work directory in /tmp; see docs/BENCHMARK.md on an ext4 without a journal).
set -euo pipefail
# Relative to where the script was started from, before it moves to the repository.
if [ -n "${BENCH_CACHE_DIR:-}" ]; then
  [ -d "$BENCH_CACHE_DIR" ] || { echo "bench: BENCH_CACHE_DIR=$BENCH_CACHE_DIR is not a directory" >&2; exit 2; }
  BENCH_CACHE_DIR=$(realpath -- "$BENCH_CACHE_DIR")
fi
cd "$(dirname "$0")/.."
MIB=${BENCH_MIB:-1024}
FILES=${BENCH_FILES:-2000}
DIR_ENTRIES=${BENCH_DIR_ENTRIES:-30000}   # 0 skips the large-directory workloads
READS=${BENCH_READS:-2000}
RUNS=${BENCH_RUNS:-3}
TIMEOUT=${BENCH_TIMEOUT:-1800}
EXTRA_OPTS=${BENCH_OPTS:-}
read -r -a MODES <<< "${BENCH_MODES-none cse-c}"
PEERS=()
for p in ${BENCH_PEERS-s3fs rclone}; do
  if command -v "$p" >/dev/null; then PEERS+=("$p"); else echo "bench: $p is not installed, left out" >&2; fi
done

# shellcheck source=/dev/null
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --quiet --bin s3cryptfs --example bench
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BENCH_BIN:-$TARGET/release/s3cryptfs}   # BENCH_BIN: another build, for A/B runs
BENCH=$TARGET/release/examples/bench

started=0
if [ -n "${BENCH_ENDPOINT:-}" ]; then
  : "${AWS_ACCESS_KEY_ID:?BENCH_ENDPOINT needs AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY:?BENCH_ENDPOINT needs AWS_SECRET_ACCESS_KEY}"
  export AWS_REGION=${AWS_REGION:-us-east-1}
  EP=${BENCH_ENDPOINT%/}
  # A server on loopback that does not set TCP_NODELAY (Garage) meets the client's delayed ACKs: docs/BENCHMARK.md.
  case $EP in
    *://127.0.0.1:*|*://localhost:*)
      if ! ip route show table local 127.0.0.1 2>/dev/null | grep -q quickack; then
        echo "bench: note: the loopback route has no quickack; a server without TCP_NODELAY (Garage) then adds up" \
          "to 40 ms to requests at random (docs/BENCHMARK.md)" >&2
      fi ;;
  esac
  HTTPS_EP=$EP
  CA_FILE=${BENCH_CA_FILE:-}
  SERVER="$EP"
  KMS_KEY=${BENCH_KMS_KEY_ID:-}
  KMS_EP=${BENCH_KMS_ENDPOINT:-}
  S3EC=${BENCH_S3EC:-0}
  if [ "$S3EC" = 1 ]; then echo "bench: the S3EC comparison needs the LocalStack test server (its KMS)" >&2; exit 2; fi
  for mode in "${MODES[@]}"; do
    if [ "$mode" = cse-kms ] && [ -z "$KMS_KEY" ]; then echo "bench: mode cse-kms needs BENCH_KMS_KEY_ID" >&2; exit 2; fi
  done
else
  if ! bash scripts/s3-server.sh status >/dev/null 2>&1; then
    bash scripts/s3-server.sh start >/dev/null
    started=1
  fi
  eval "$(bash scripts/s3-server.sh env)"
  EP=$S3CRYPTFS_TEST_S3_ENDPOINT
  # SSE-C needs https: the same server over TLS.
  HTTPS_EP=$S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT
  CA_FILE=$S3CRYPTFS_TEST_CA_FILE
  SERVER="${S3CRYPTFS_TEST_SERVER:-localstack} at $EP"
  # cse-kms: a key in the test server's KMS (LocalStack serves KMS on the S3 port).
  KMS_EP=$EP
  KMS_KEY=$(curl -sf -X POST "$EP" -H "X-Amz-Target: TrentService.CreateKey" \
    -H "Content-Type: application/x-amz-json-1.1" \
    -H "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0" \
    -d '{}' | sed -n 's/.*"KeyId": *"\([^"]*\)".*/\1/p')
  S3EC=${BENCH_S3EC:-1}
fi
REGION=${AWS_REGION:-us-east-1}
WORK=$(mktemp -d /tmp/s3cryptfs-bench.XXXXXX)
# Where the systems keep their local files (BENCH_CACHE_DIR, set below once cleanup is armed).
LOCAL=$WORK
MNT=$WORK/mnt
mkdir -p "$MNT"
$BIN keygen --output "$WORK/key" 2>/dev/null
DAEMON=""     # PID of the mounted file system's process (started here, in the foreground, in the background)

cleanup() {
  if mountpoint -q "$MNT"; then fusermount3 -u "$MNT" || fusermount3 -uz "$MNT" || true; fi
  if [ -n "$DAEMON" ]; then kill "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; fi
  # gocryptfs's mount, if a run died while it was up: removing through it would delete its files and then fail.
  if mountpoint -q "$LOCAL/gocryptfs/plain"; then fusermount3 -u "$LOCAL/gocryptfs/plain" || true; fi
  rm -rf "$WORK" "$LOCAL" || true
  if [ "$started" = 1 ]; then bash scripts/s3-server.sh stop >/dev/null || true; fi
}
trap cleanup EXIT
# A directory of its own under BENCH_CACHE_DIR (made absolute above: cache_dir= takes no other path).
if [ -n "${BENCH_CACHE_DIR:-}" ]; then LOCAL=$(mktemp -d "$BENCH_CACHE_DIR/s3cryptfs-bench.XXXXXX"); fi

# curl with SigV4 (any server; LocalStack ignores the signature).
s3curl() {
  local token=()
  if [ -n "${AWS_SESSION_TOKEN:-}" ]; then token=(-H "x-amz-security-token: $AWS_SESSION_TOKEN"); fi
  # Garage (and AWS) want x-amz-content-sha256, which curl does not send by itself.
  curl -sS -f --aws-sigv4 "aws:amz:$REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "${token[@]}" "$@"
}

new_bucket() {
  local b body=()
  b="bench-$(date +%s%N)"
  if [ "$REGION" != us-east-1 ]; then
    body=(--data "<CreateBucketConfiguration><LocationConstraint>$REGION</LocationConstraint></CreateBucketConfiguration>")
  fi
  # (Command substitution does not inherit set -e: a failure must exit explicitly.)
  if [ -n "${BENCH_ENDPOINT:-}" ]; then
    s3curl -o /dev/null -X PUT "${body[@]}" "$EP/$b" || { echo "bench: could not create bucket $b at $EP" >&2; exit 1; }
  else
    # LocalStack, unsigned as before: after a SigV4-signed CreateBucket its GETs of the S3EC comparison's objects
    # broke off (IncompleteRead) in 3 runs of 3 here, unsigned in none of 2 (cause not found).
    curl -sf -o /dev/null -X PUT "$EP/$b" || { echo "bench: could not create bucket $b at $EP" >&2; exit 1; }
  fi
  echo "$b"
}

# Empties and deletes a bucket of this run (best effort: a leftover bucket is reported, not fatal).
drop_bucket() {
  $BENCH raw "$EP" "$1" clear 0 >/dev/null 2>&1 || echo "bench: could not empty bucket $1" >&2
  # Keys the raw client's listing cannot name (s3fs's directory markers end in "/") go one DELETE at a time.
  local k left i
  for i in 1 2 3; do
    left=$(s3curl "$EP/$1?list-type=2" | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g') || break
    [ -n "$left" ] || break
    for k in $left; do s3curl -o /dev/null -X DELETE "$EP/$1/$k" || true; done
  done
  s3curl -o /dev/null -X DELETE "$EP/$1" || echo "bench: could not delete bucket $1" >&2
}

# s3cryptfs mount options for a mode.
s3cryptfs_opts() {
  local mode=$1 opts="mode=$1,region=$REGION,staging_dir=$LOCAL/staging"
  case $mode in
    cse-c) opts="$opts,endpoint=$EP,key_file=$WORK/key" ;;
    cse-kms)
      opts="$opts,endpoint=$EP,kms_key_id=$KMS_KEY"
      if [ -n "$KMS_EP" ]; then opts="$opts,kms_endpoint=$KMS_EP"; fi ;;
    sse-c)
      opts="$opts,endpoint=$HTTPS_EP,key_file=$WORK/key"
      if [ -n "$CA_FILE" ]; then opts="$opts,ca_file=$CA_FILE"; fi ;;
    *) opts="$opts,endpoint=$EP" ;;
  esac
  if [ -n "$EXTRA_OPTS" ]; then opts="$opts,$EXTRA_OPTS"; fi
  if [ -n "${FS_MORE:-}" ]; then opts="$opts,$FS_MORE"; fi   # per workload (the disk cache's)
  echo "$opts"
}

# s3cryptfs mounted the way users run it (the command returns once the mount is ready); used by the S3EC comparison.
mount_it() {
  local mode=$1 b=$2 more=${3:-} opts
  opts=$(s3cryptfs_opts "$mode")
  if [ -n "$more" ]; then opts="$opts,$more"; fi
  $BIN mount -o "$opts" "s3://$b" "$MNT"
}

# Peers' configuration. s3fs: a passwd file, mode 0600. rclone: an s3 remote and a crypt remote over the bucket
# (written per bucket).
if [ "${#PEERS[@]}" -gt 0 ]; then
  (umask 077; echo "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" > "$WORK/s3fs.passwd")
  if command -v rclone >/dev/null; then RCLONE_PASS=$(rclone obscure "$(head -c 24 /dev/urandom | base64)"); fi
  # Waits until rclone has uploaded the N files just written (N is the argument): its log (-v) says "Copied" once
  # per upload, and each mount writes in one workload only. (Its remote control's vfs/stats is no use here: right
  # after close it showed an empty upload queue while the upload started a second later.)
  cat > "$WORK/rclone-settle" <<SETTLE
#!/bin/sh
while [ "\$(grep -c ': Copied (' "$WORK/daemon.log")" -lt "\$1" ]; do sleep 0.05; done
SETTLE
  chmod +x "$WORK/rclone-settle"
fi
rclone_conf() {
  local session=""
  if [ -n "${AWS_SESSION_TOKEN:-}" ]; then session="session_token = $AWS_SESSION_TOKEN"; fi
  (umask 077; cat > "$WORK/rclone.conf" <<CONF
[bs3]
type = s3
provider = Other
env_auth = false
access_key_id = $AWS_ACCESS_KEY_ID
secret_access_key = $AWS_SECRET_ACCESS_KEY
$session
endpoint = $EP
region = $REGION
force_path_style = true
no_check_bucket = true

[bcrypt]
type = crypt
remote = bs3:$1
password = $RCLONE_PASS
CONF
  )
}

# Mounts system $1 (an s3cryptfs mode, s3fs or rclone) on bucket $2, in the foreground of a background process whose
# PID is DAEMON, and waits for the mount.
fs_mount() {
  local sys=$1 b=$2
  rm -rf "$LOCAL/cache"
  # A fresh journal per mount, except where a workload needs the last one's (KEEP_JOURNAL: in modes none, sse-s3
  # and sse-kms the disk cache's key comes from the journal's local key, so a new journal empties the cache).
  if [ -z "${KEEP_JOURNAL:-}" ]; then rm -rf "$LOCAL/staging"; fi
  mkdir -p "$LOCAL/cache"
  case $sys in
    s3fs)
      s3fs "$b" "$MNT" -f \
        -o "passwd_file=$WORK/s3fs.passwd,url=$EP,use_path_request_style,endpoint=$REGION,tmpdir=$LOCAL" \
        >"$WORK/daemon.log" 2>&1 & ;;
    rclone)
      rclone_conf "$b"
      # rclone's AWS SDK refuses to start when AWS_CA_BUNDLE is set ("unsupported transport"): it gets the CA, if
      # any, through its own --ca-cert.
      env -u AWS_CA_BUNDLE rclone mount --config "$WORK/rclone.conf" bcrypt: "$MNT" --vfs-cache-mode writes \
        --vfs-write-back 0s --cache-dir "$LOCAL/cache" -v \
        ${CA_FILE:+--ca-cert "$CA_FILE"} >"$WORK/daemon.log" 2>&1 & ;;
    *)
      $BIN mount -f -o "$(s3cryptfs_opts "$sys")" "s3://$b" "$MNT" >"$WORK/daemon.log" 2>&1 & ;;
  esac
  DAEMON=$!
  for _ in $(seq 300); do
    if mountpoint -q "$MNT"; then return 0; fi
    if ! kill -0 "$DAEMON" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "bench: $sys did not mount s3://$b on $MNT:" >&2
  tail -20 "$WORK/daemon.log" >&2
  exit 1
}

fs_unmount() {
  for _ in $(seq 50); do
    if fusermount3 -u "$MNT" 2>/dev/null; then break; fi
    sleep 0.2     # EBUSY for a moment after the benchmark process exits
  done
  if mountpoint -q "$MNT"; then fusermount3 -uz "$MNT"; fi
  # The daemon exits after the unmount; wait for it so the next mount starts clean.
  for _ in $(seq 300); do
    if ! kill -0 "$DAEMON" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if kill -0 "$DAEMON" 2>/dev/null; then
    echo "bench: the daemon of the last mount did not exit after the unmount; killed" >&2
    kill "$DAEMON"
  fi
  wait "$DAEMON" || true
  DAEMON=""
}

# R[system,workload,run] = seconds (peak_rss: MiB), or "fail".
declare -A R

# Runs one workload command and records what it prints; on failure or timeout records "fail" for NAMES.
record() {
  local sys=$1 run=$2 names=$3 out name secs bytes
  shift 3
  if out=$(timeout "$TIMEOUT" "$@" 2>"$WORK/bench.err"); then
    while read -r name secs bytes; do
      # RENAME: record a sequential or random read under another workload's name (the disk cache's).
      if [ -n "${RENAME:-}" ] && { [ "$name" = seq_read ] || [ "$name" = rand_read ]; }; then name=$RENAME; fi
      if [ "$name" = peak_rss ]; then
        R[$sys,$name,$run]=$(awk -v b="$bytes" 'BEGIN{printf "%.1f", b/1048576}')
      elif [ -n "$name" ]; then
        R[$sys,$name,$run]=$secs
      fi
    done <<< "$out"
  else
    echo "bench: $sys run $run: $* failed:" >&2
    tail -5 "$WORK/bench.err" >&2
    for name in $names; do R[$sys,$name,$run]=fail; done
  fi
}

run_raw() {
  local run=$1 b
  b=$(new_bucket)
  record raw "$run" seq_write "$BENCH" raw "$EP" "$b" write "$MIB"
  record raw "$run" "seq_read peak_rss" "$BENCH" raw "$EP" "$b" read "$MIB"
  record raw "$run" rand_read "$BENCH" raw "$EP" "$b" randr "$MIB" "$READS" 1
  record raw "$run" rand_read8 "$BENCH" raw "$EP" "$b" randr "$MIB" "$READS" 8
  record raw "$run" small_create "$BENCH" raw "$EP" "$b" smallw "$FILES"
  record raw "$run" "small_list small_read" "$BENCH" raw "$EP" "$b" smallr "$FILES"
  record raw "$run" small_overwrite "$BENCH" raw "$EP" "$b" smallo "$FILES"
  record raw "$run" ls_l "$BENCH" raw "$EP" "$b" lsl "$FILES"
  record raw "$run" rm_r "$BENCH" raw "$EP" "$b" rmr "$FILES"
  if [ "$DIR_ENTRIES" -gt 0 ]; then
    record raw "$run" dir_fill "$BENCH" raw "$EP" "$b" dirw "$DIR_ENTRIES"
    for name in stat_dir1 stat_dir find_ls; do
      record raw "$run" "$name" "$BENCH" raw "$EP" "$b" dirlist "$DIR_ENTRIES"
      R[raw,$name,$run]=${R[raw,stat_dir,$run]}
    done
  fi
  drop_bucket "$b"
}

# The large directory (stat_dir1, stat_dir, find_ls) in a bucket of its own.
run_dir() {
  local sys=$1 run=$2 b
  b=$(new_bucket)
  if [ "$sys" = none ]; then
    record "$sys" "$run" dir_fill "$BENCH" raw "$EP" "$b" dirw "$DIR_ENTRIES"
  else
    fs_workload "$sys" "$run" "$b" dir_fill dirw "$DIR_ENTRIES"
  fi
  fs_workload "$sys" "$run" "$b" stat_dir dirstat "$DIR_ENTRIES"
  R[$sys,stat_dir1,$run]=${R[$sys,stat_dir,$run]}
  fs_workload "$sys" "$run" "$b" stat_dir dirstat "$DIR_ENTRIES"
  fs_workload "$sys" "$run" "$b" find_ls dirfind "$DIR_ENTRIES"
  drop_bucket "$b"
}

# One workload on a fresh mount of system $1.
fs_workload() {
  local sys=$1 run=$2 b=$3 names=$4 kb
  shift 4
  fs_mount "$sys" "$b"
  record "$sys" "$run" "$names" "$BENCH" fs "$MNT" "$@"
  if [ "$1" = read ] && [ -z "${RENAME:-}" ]; then
    # Peak RSS of the daemon since the mount: the sequential read is all it did.
    kb=$(awk '/^VmHWM:/{print $2}' "/proc/$DAEMON/status" 2>/dev/null || echo "")
    if [ -n "$kb" ]; then R[$sys,peak_rss,$run]=$(awk -v k="$kb" 'BEGIN{printf "%.1f", k/1024}'); fi
  fi
  fs_unmount
}

run_fs() {
  local sys=$1 run=$2 b
  b=$(new_bucket)
  if [ "$sys" = rclone ]; then export BENCH_SETTLE=$WORK/rclone-settle; else unset BENCH_SETTLE; fi
  fs_workload "$sys" "$run" "$b" seq_write write "$MIB"
  fs_workload "$sys" "$run" "$b" seq_read read "$MIB"
  fs_workload "$sys" "$run" "$b" rand_read randr "$MIB" "$READS" 1
  fs_workload "$sys" "$run" "$b" rand_read8 randr "$MIB" "$READS" 8
  fs_workload "$sys" "$run" "$b" small_create smallw "$FILES"
  fs_workload "$sys" "$run" "$b" "small_list small_read" smallr "$FILES"
  fs_workload "$sys" "$run" "$b" small_overwrite smallo "$FILES"
  fs_workload "$sys" "$run" "$b" ls_l lsl "$FILES"
  fs_workload "$sys" "$run" "$b" rm_r rmr "$FILES"
  fs_workload "$sys" "$run" "$b" change_1b poke "$MIB"
  fs_workload "$sys" "$run" "$b" append_4k append "$MIB"
  fs_workload "$sys" "$run" "$b" patch_read patchr "$MIB"
  drop_bucket "$b"
  if [ "$DIR_ENTRIES" -gt 0 ]; then run_dir "$sys" "$run"; fi
  unset BENCH_SETTLE
}

SYSTEMS=()
if [ "${BENCH_RAW:-1}" = 1 ]; then SYSTEMS+=(raw); fi
SYSTEMS+=("${MODES[@]}" "${PEERS[@]}")
# Runs interleave the systems (run 1 of each, then run 2 of each, ...), so a drift of the server's speed over the
# benchmark spreads over all of them instead of landing on one.
if [ "${BENCH_FS:-1}" != 1 ]; then SYSTEMS=(); fi
# The floor of ls_l: `ls -l` of the same files in a directory on local disk (ls's own work: getdents, a statx per
# file, sorting and formatting 2,000 lines), which the raw client's LIST does not include and every mount's does.
run_local_ls() {
  local run=$1 d=$WORK/local-ls
  if [ ! -d "$d/small" ]; then mkdir -p "$d" && "$BENCH" fs "$d" smallw "$FILES" > /dev/null; fi
  record local "$run" ls_l "$BENCH" fs "$d" lsl "$FILES"
}

for run in $(seq "$RUNS"); do
  for sys in "${SYSTEMS[@]}"; do
    echo "bench: run $run/$RUNS: $sys" >&2
    if [ "$sys" = raw ]; then run_raw "$run"; else run_fs "$sys" "$run"; fi
  done
  if [ "${#SYSTEMS[@]}" -gt 0 ]; then run_local_ls "$run"; fi
done

# The disk cache (-o cache_dir): for each mode, the file read cold through a mount with an empty cache_dir (which
# fills it), then read again after a remount (served by the cache); gocryptfs on the same local disk, written then
# read after a remount, is the local reference. Nothing drops the system's page cache in between, for either.
run_disk() {
  local run=$1 mode b g=$LOCAL/gocryptfs
  for mode in "${MODES[@]}"; do
    echo "bench: run $run/$RUNS: disk cache, $mode" >&2
    b=$(new_bucket)
    fs_workload "$mode" "$run" "$b" seq_write write "$MIB"
    rm -rf "$LOCAL/dcache"
    export FS_MORE="cache_dir=$LOCAL/dcache,cache_disk_size=$((MIB * 2 + 64))M"
    RENAME=disk_cold fs_workload "$mode" "$run" "$b" disk_cold read "$MIB"
    RENAME=disk_warm KEEP_JOURNAL=1 fs_workload "$mode" "$run" "$b" disk_warm read "$MIB"
    # Random reads with an empty cache_dir of the default size: the file is fetched whole into it once the reads
    # show the pattern (if it is at most a quarter of the cache's limit).
    rm -rf "$LOCAL/dcache"
    export FS_MORE="cache_dir=$LOCAL/dcache"
    RENAME=rand_read_disk fs_workload "$mode" "$run" "$b" rand_read_disk randr "$MIB" "$READS" 1
    unset FS_MORE
    rm -rf "$LOCAL/dcache"
    drop_bucket "$b"
  done
  if command -v gocryptfs >/dev/null; then
    echo "bench: run $run/$RUNS: gocryptfs on local disk" >&2
    rm -rf "$g"
    mkdir -p "$g/cipher" "$g/plain"
    head -c 32 /dev/urandom | base64 > "$g/pass"
    gocryptfs -q -init -passfile "$g/pass" "$g/cipher" >/dev/null 2>&1
    gocryptfs -q -passfile "$g/pass" "$g/cipher" "$g/plain" 2>/dev/null
    "$BENCH" fs "$g/plain" write "$MIB" >/dev/null
    fusermount3 -u "$g/plain"
    gocryptfs -q -passfile "$g/pass" "$g/cipher" "$g/plain" 2>/dev/null
    RENAME=disk_warm record gocryptfs "$run" disk_warm "$BENCH" fs "$g/plain" read "$MIB"
    fusermount3 -u "$g/plain"
    rm -rf "$g"
  fi
}
DISK=${BENCH_DISK:-1}
if [ "$DISK" = 1 ] && [ "${#MODES[@]}" -gt 0 ]; then
  for run in $(seq "$RUNS"); do run_disk "$run"; done
fi

seconds() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'
}

# Best of three runs of a command.
best3() {
  local best="" t
  for _ in 1 2 3; do
    t=$(seconds "$@")
    if [ -z "$best" ] || awk -v a="$t" -v b="$best" 'BEGIN{exit !(a<b)}'; then best=$t; fi
  done
  echo "$best"
}

run_s3ec() {
  local b py tool=tests/tools/s3ec.py
  bash scripts/s3ec-client.sh install >/dev/null
  eval "$(bash scripts/s3ec-client.sh env)"
  py=$S3CRYPTFS_TEST_S3EC_PYTHON
  b=$(new_bucket)
  head -c "$((MIB << 20))" /dev/urandom > "$WORK/s3ec.in"
  S3EC_PUT=$(best3 "$py" "$tool" put --version 3 --wrap kms --kms-key-id "$KMS_KEY" --bucket "$b" --key big \
    --file "$WORK/s3ec.in" --multipart-threshold $((8 << 20)) --part-size $((8 << 20)))
  write_through_mount() {
    mount_it cse-kms "$b" format=s3ec
    cp "$WORK/s3ec.in" "$MNT/written"
    $BIN unmount "$MNT"
  }
  S3EC_WRITE=$(best3 write_through_mount)
  "$py" "$tool" get --bucket "$b" --key written --out "$WORK/s3ec.out" --kms-key-id "$KMS_KEY" >/dev/null
  cmp -s "$WORK/s3ec.in" "$WORK/s3ec.out" || { echo "bench: the official client read other bytes from the mount's object" >&2; exit 1; }
  S3EC_GET=$(best3 "$py" "$tool" get --bucket "$b" --key big --out "$WORK/s3ec.out" --kms-key-id "$KMS_KEY")
  cmp -s "$WORK/s3ec.in" "$WORK/s3ec.out" || { echo "bench: the official client read back other bytes" >&2; exit 1; }
  rm -f "$WORK/s3ec.out"
  read_through_mount() {
    mount_it cse-kms "$b"
    cat "$MNT/big"
    $BIN unmount "$MNT"
  }
  S3EC_READ=$(best3 read_through_mount)
  mount_it cse-kms "$b"
  cmp -s "$WORK/s3ec.in" "$MNT/big" || { echo "bench: the mount read back other bytes" >&2; exit 1; }
  $BIN unmount "$MNT"
  rm -f "$WORK/s3ec.in"
}
if [ "$S3EC" = 1 ]; then run_s3ec; fi

# Median of the runs of system $1 in workload $2: empty if not measured, "fail" if a run failed.
median() {
  local run
  for run in $(seq "$RUNS"); do echo "${R[$1,$2,$run]:-}"; done | awk '
    $0 == "" { next }
    $0 == "fail" { fail = 1; next }
    { v[n++] = $0 + 0 }
    END {
      if (fail) { print "fail"; exit }
      if (n == 0) exit
      for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
      if (n % 2) print v[int(n / 2)]; else print (v[n / 2 - 1] + v[n / 2]) / 2
    }'
}

unit_of() {
  case $1 in
    seq_write|seq_read) echo MiB/s ;;
    rand_read*) echo ops/s ;;
    peak_rss) echo MiB ;;
    *) echo s ;;
  esac
}

# The figure shown for workload $1 from its median $2 (seconds, or MiB for peak_rss).
figure() {
  case $2 in ""|fail) echo "$2"; return ;; esac
  case $(unit_of "$1") in
    MiB/s) awk -v m="$MIB" -v s="$2" 'BEGIN{print m / s}' ;;
    ops/s) awk -v n="$READS" -v s="$2" 'BEGIN{print n / s}' ;;
    *) echo "$2" ;;
  esac
}

show() {
  case $1 in
    "") echo - ;;
    fail) echo fail ;;
    *) awk -v v="$1" -v u="$2" 'BEGIN{
         if (u == "s") printf (v < 1 ? "%.3f" : v < 10 ? "%.2f" : "%.1f"), v
         else printf (v < 100 ? "%.1f" : "%.0f"), v }' ;;
  esac
}

# How many times as good figure $1 is as reference $2 (above 1: faster, or less memory).
ratio() {
  case "$1,$2" in ,*|*,|fail,*|*,fail) echo ""; return ;; esac
  case $3 in
    MiB/s|ops/s) awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b }' ;;
    *) awk -v a="$1" -v b="$2" 'BEGIN{ if (a > 0) printf "%.2f", b / a }' ;;
  esac
}

# 1 if figure $1 is better than figure $2 in unit $3.
better() {
  case $3 in
    MiB/s|ops/s) awk -v a="$1" -v b="$2" 'BEGIN{ exit !(a > b) }' ;;
    *) awk -v a="$1" -v b="$2" 'BEGIN{ exit !(a < b) }' ;;
  esac
}

print_table() {
  local name unit sys best v line
  declare -A F
  printf '\n%-15s %-6s' workload unit
  for sys in "${SYSTEMS[@]}"; do printf ' %9s' "$sys"; done
  echo
  for name in seq_write seq_read peak_rss rand_read rand_read8 small_create small_list small_read small_overwrite \
              ls_l rm_r \
              change_1b append_4k patch_read stat_dir1 stat_dir find_ls dir_fill; do
    unit=$(unit_of "$name")
    for sys in "${SYSTEMS[@]}"; do F[$sys]=$(figure "$name" "$(median "$sys" "$name")"); done
    printf '%-15s %-6s' "$name" "$unit"
    for sys in "${SYSTEMS[@]}"; do printf ' %9s' "$(show "${F[$sys]}" "$unit")"; done
    echo
    if [ -n "${F[raw]:-}" ] && [ "${F[raw]}" != fail ]; then
      printf '%-22s' "  x raw"
      for sys in "${SYSTEMS[@]}"; do printf ' %9s' "$(ratio "${F[$sys]}" "${F[raw]}" "$unit")"; done
      echo
    fi
    best=""
    for sys in "${PEERS[@]}"; do
      v=${F[$sys]}
      case $v in ""|fail) continue ;; esac
      if [ -z "$best" ] || better "$v" "${F[$best]}" "$unit"; then best=$sys; fi
    done
    if [ -n "$best" ] && [ "${#MODES[@]}" -gt 0 ]; then
      line=$(printf '%-22s' "  x $best (peer)")
      for sys in "${SYSTEMS[@]}"; do
        case " ${MODES[*]} " in
          *" $sys "*) line+=$(printf ' %9s' "$(ratio "${F[$sys]}" "${F[$best]}" "$unit")") ;;
          *) line+=$(printf ' %9s' "") ;;
        esac
      done
      echo "${line%"${line##*[! ]}"}"
    fi
  done
  echo
  echo "Medians of $RUNS run(s) on $SERVER; $MIB MiB file, $FILES files of 4 KiB, $READS random 4 KiB reads,"
  echo "a directory of $DIR_ENTRIES files of 16 bytes (stat_dir1, stat_dir, find_ls; raw: one paged LIST of it)."
  echo "x: times as good as the reference (above 1: faster, or less memory; below 1: slower, or more); \"x PEER (peer)\""
  echo "compares each s3cryptfs mode with the best peer in that workload."
  echo "Each workload on a fresh mount (cold). raw = object_store: seq_write multipart upload (8 MiB parts), seq_read"
  echo "one GET, rand_read one ranged GET per read (rand_read8: 8 concurrent), small_* one PUT/GET per file and one paged"
  echo "LIST, ls_l paged LIST, rm_r LIST + batch DeleteObjects (1,000 keys per request); change_1b, append_4k and"
  echo "patch_read have no raw equivalent. peak_rss: VmHWM of the daemon after seq_read (raw: of the raw client"
  echo "process)."
  if [ -n "${R[local,ls_l,1]:-}" ]; then
    echo "ls_l's floor: \`ls -l\` of the same $FILES files on local disk took $(show "$(figure ls_l "$(median local ls_l)")" s) s"
    echo "(ls's own work, in every mount's ls_l and not in the raw LIST)."
  fi
  if [ "${#PEERS[@]}" -gt 0 ]; then
    echo "Peers: ${PEERS[*]} (s3fs: default options, no use_cache; rclone: crypt over s3, --vfs-cache-mode writes,"
    echo "timed until its uploads finish)."
  fi
}
if [ "${#SYSTEMS[@]}" -gt 0 ]; then print_table; fi
if [ "$DISK" = 1 ] && [ "${#MODES[@]}" -gt 0 ]; then
  echo
  echo "Disk cache (-o cache_dir), $MIB MiB read sequentially, medians of $RUNS run(s), MiB/s:"
  gw=$(figure seq_read "$(median gocryptfs disk_warm)")
  for mode in "${MODES[@]}"; do
    cold=$(figure seq_read "$(median "$mode" disk_cold)")
    warm=$(figure seq_read "$(median "$mode" disk_warm)")
    printf '  %-8s cold (empty cache) %8s   warm after a remount %8s' "$mode" "$(show "$cold" MiB/s)" "$(show "$warm" MiB/s)"
    if [ -n "$gw" ] && [ "$gw" != fail ]; then printf '   (%s x gocryptfs)' "$(ratio "$warm" "$gw" MiB/s)"; fi
    echo
  done
  if [ -n "$gw" ]; then printf '  gocryptfs on the same local disk, read after a remount: %s\n' "$(show "$gw" MiB/s)"; fi
  echo "$READS random 4 KiB reads, one reader, cold (empty cache_dir), ops/s:"
  sr=""
  if [ -n "${R[s3fs,rand_read,1]:-}" ]; then sr=$(figure rand_read "$(median s3fs rand_read)"); fi
  for mode in "${MODES[@]}"; do
    v=$(figure rand_read "$(median "$mode" rand_read_disk)")
    printf '  %-8s %8s' "$mode" "$(show "$v" ops/s)"
    if [ -n "$sr" ] && [ "$sr" != fail ]; then
      printf '   (%s x s3fs, which keeps a temporary copy on disk)' "$(ratio "$v" "$sr" ops/s)"
    fi
    echo
  done
fi
if [ "$S3EC" = 1 ]; then
  echo
  echo "S3 Encryption Client V3 object of $MIB MiB (kms+context), best of 3; a ratio above 1 means slower:"
  printf '%-40s %8s s\n' "official client put (upload_file)" "$S3EC_PUT"
  printf '%-40s %8s s   (%s x the official client)\n' "cp into a cse-kms mount, format=s3ec" "$S3EC_WRITE" \
    "$(awk -v a="$S3EC_WRITE" -v b="$S3EC_PUT" 'BEGIN{printf "%.2f", a/b}')"
  printf '%-40s %8s s\n' "official client get_object, cold" "$S3EC_GET"
  printf '%-40s %8s s   (%s x the official client)\n' "cat through a cse-kms mount, cold" "$S3EC_READ" \
    "$(awk -v a="$S3EC_READ" -v b="$S3EC_GET" 'BEGIN{printf "%.2f", a/b}')"
fi
