#!/usr/bin/env bash
# Benchmark: s3cryptfs through a real FUSE mount against the S3 test server, next to a raw object_store client on
# the same server, in each mode of BENCH_MODES. Prints seconds per workload and the ratio to the raw client.
#
#   scripts/bench.sh                                  # 1 GiB sequential file, 2,000 files of 4 KiB
#   BENCH_MODES="none cse-c" scripts/bench.sh         # modes to run (default: none cse-c cse-kms sse-c)
#   BENCH_MIB=256 BENCH_FILES=500 scripts/bench.sh    # a smaller run
#   BENCH_OPTS=aead=aes-gcm scripts/bench.sh          # extra mount options (here: the RustCrypto AEAD)
#   BENCH_BIN=/path/to/old/s3cryptfs scripts/bench.sh # the same run with another build (A/B)
#   BENCH_S3EC=0 scripts/bench.sh                     # skip the S3 Encryption Client comparison (default: run it)
#   BENCH_MODES= BENCH_RAW=0 scripts/bench.sh         # only the S3EC comparison
#
# The S3EC comparison (best of 3 each): a V3 object of BENCH_MIB MiB written by the official Python client
# (scripts/s3ec-client.sh; upload_file in 8 MiB parts), next to `cp` of the same file into a cse-kms mount with
# -o format=s3ec (timed to the end of `s3cryptfs unmount`, so every byte is in the store); then that object read
# back cold by the official client's get_object and by `cat` through a fresh cse-kms mount. The official client
# must read what the mount wrote, and the mount what the client wrote, byte for byte.
#
# Each phase runs on a fresh mount, so neither the kernel's page cache nor ours holds the data it reads.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${BENCH_MIB:-1024}
FILES=${BENCH_FILES:-2000}
EXTRA_OPTS=${BENCH_OPTS:-}
read -r -a MODES <<< "${BENCH_MODES-none cse-c cse-kms sse-c}"

[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --quiet --bin s3cryptfs --example bench
BIN=${BENCH_BIN:-target/release/s3cryptfs}   # BENCH_BIN: another build, for A/B runs
BENCH=target/release/examples/bench

started=0
if ! bash scripts/s3-server.sh status >/dev/null 2>&1; then
  bash scripts/s3-server.sh start >/dev/null
  started=1
fi
eval "$(bash scripts/s3-server.sh env)"
EP=$S3CRYPTFS_TEST_S3_ENDPOINT
WORK=$(mktemp -d /tmp/s3cryptfs-bench.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
$BIN keygen --output "$WORK/key" 2>/dev/null
# cse-kms: a key in the test server's KMS (LocalStack serves KMS on the S3 port).
KMS_KEY=$(curl -sf -X POST "$EP" -H "X-Amz-Target: TrentService.CreateKey" \
  -H "Content-Type: application/x-amz-json-1.1" \
  -H "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0" \
  -d '{}' | sed -n 's/.*"KeyId": *"\([^"]*\)".*/\1/p')

cleanup() {
  if mountpoint -q "$MNT"; then fusermount3 -u "$MNT" || fusermount3 -uz "$MNT" || true; fi
  rm -rf "$WORK"
  if [ "$started" = 1 ]; then bash scripts/s3-server.sh stop >/dev/null || true; fi
}
trap cleanup EXIT

new_bucket() {
  local b
  b="bench-$(date +%s%N)"
  curl -sf -o /dev/null -X PUT "$EP/$b"
  echo "$b"
}

declare -A T
PHASES=("write $MIB" "read $MIB" "smallw $FILES" "smallr $FILES")

run_raw() {
  local b w name secs bytes
  b=$(new_bucket)
  for w in "${PHASES[@]}"; do
    # shellcheck disable=SC2086
    while read -r name secs bytes; do T[raw,$name]=$secs; done < <($BENCH raw "$EP" "$b" $w)
  done
}

mount_it() {
  local mode=$1 b=$2 more=${3:-}
  local opts="mode=$mode,region=us-east-1,staging_dir=$WORK/staging"
  case $mode in
    none) opts="$opts,endpoint=$EP" ;;
    cse-c) opts="$opts,endpoint=$EP,key_file=$WORK/key" ;;
    cse-kms) opts="$opts,endpoint=$EP,kms_key_id=$KMS_KEY,kms_endpoint=$EP" ;;
    # SSE-C needs https: the same server over TLS.
    sse-c) opts="$opts,endpoint=$S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT,ca_file=$S3CRYPTFS_TEST_CA_FILE,key_file=$WORK/key" ;;
    *) opts="$opts,endpoint=$EP" ;;
  esac
  if [ -n "$EXTRA_OPTS" ]; then opts="$opts,$EXTRA_OPTS"; fi
  if [ -n "$more" ]; then opts="$opts,$more"; fi
  $BIN mount -o "$opts" "s3://$b" "$MNT"
}

run_mode() {
  local mode=$1 b w name secs bytes
  b=$(new_bucket)
  for w in "${PHASES[@]}"; do
    mount_it "$mode" "$b"
    # shellcheck disable=SC2086
    while read -r name secs bytes; do T[$mode,$name]=$secs; done < <($BENCH fs "$MNT" $w)
    fusermount3 -u "$MNT"
    # The daemon exits after the unmount; wait for it so the next mount starts clean.
    for _ in $(seq 50); do pgrep -f "s3cryptfs mount .* $MNT" >/dev/null || break; sleep 0.1; done
  done
}

if [ "${BENCH_RAW:-1}" = 1 ]; then run_raw; fi
for mode in "${MODES[@]}"; do run_mode "$mode"; done

# Seconds a command takes (wall clock, 2 decimals).
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
if [ "${BENCH_S3EC:-1}" = 1 ]; then run_s3ec; fi

if [ "${BENCH_RAW:-1}" = 1 ]; then
  printf '\n%-14s %10s' workload raw_s
  for mode in "${MODES[@]}"; do printf ' %10s' "${mode}_s"; done
  for mode in "${MODES[@]}"; do printf ' %10s' "$mode/raw"; done
  echo
  for name in seq_write seq_read small_create small_list small_read; do
    r=${T[raw,$name]}
    printf '%-14s %10s' "$name" "$r"
    for mode in "${MODES[@]}"; do printf ' %10s' "${T[$mode,$name]}"; done
    for mode in "${MODES[@]}"; do
      printf ' %10s' "$(awk -v a="${T[$mode,$name]}" -v b="$r" 'BEGIN{printf "%.2f", a/b}')"
    done
    echo
  done
  echo
  echo "seq_* move $MIB MiB (raw: $(awk -v m="$MIB" -v s="${T[raw,seq_write]}" 'BEGIN{printf "%.0f", m/s}') MiB/s up," \
    "$(awk -v m="$MIB" -v s="${T[raw,seq_read]}" 'BEGIN{printf "%.0f", m/s}') MiB/s down); small_* use $FILES files of 4 KiB;"
  echo "small_list = readdir + stat of every file on a fresh mount (ls -l); raw small_list = one paged LIST."
  echo "server: ${S3CRYPTFS_TEST_SERVER:-?} at $EP (raw client over http; sse-c over https); a ratio above 1 means"
  echo "slower than the raw client."
fi
if [ "${BENCH_S3EC:-1}" = 1 ]; then
  echo
  echo "S3 Encryption Client V3 object of $MIB MiB (kms+context), best of 3; a ratio above 1 means slower:"
  printf '%-40s %8s s\n' "official client put (upload_file)" "$S3EC_PUT"
  printf '%-40s %8s s   (%s x the official client)\n' "cp into a cse-kms mount, format=s3ec" "$S3EC_WRITE" \
    "$(awk -v a="$S3EC_WRITE" -v b="$S3EC_PUT" 'BEGIN{printf "%.2f", a/b}')"
  printf '%-40s %8s s\n' "official client get_object, cold" "$S3EC_GET"
  printf '%-40s %8s s   (%s x the official client)\n' "cat through a cse-kms mount, cold" "$S3EC_READ" \
    "$(awk -v a="$S3EC_READ" -v b="$S3EC_GET" 'BEGIN{printf "%.2f", a/b}')"
fi
