#!/usr/bin/env bash
# azurite.sh — an Azure Blob Storage emulator on 127.0.0.1 for the az:// store tests (Azurite, from npm).
#
# Usage:
#   scripts/azurite.sh install   # npm install of the pinned Azurite into $TEST_HOME (idempotent)
#   scripts/azurite.sh start     # install if needed, start the blob service in the background, wait until it
#                                # answers, create the test container, write the env file
#   scripts/azurite.sh env       # print the env of the running emulator (eval "$(scripts/azurite.sh env)")
#   scripts/azurite.sh status    # exit 0 if running and answering
#   scripts/azurite.sh stop      # SIGTERM, wait 5 s, SIGKILL; its data directory is removed
#
# Environment:
#   S3CRYPTFS_TEST_HOME        cache + state dir (default ~/.cache/s3cryptfs-test), shared with the other servers
#   S3CRYPTFS_AZURITE_PORT     blob service port (default 10000)
#
# The env file exports AZURE_STORAGE_USE_EMULATOR=true and AZURITE_BLOB_STORAGE_URL (object_store then uses
# Azurite's well-known account devstoreaccount1 and its published key), plus S3CRYPTFS_TEST_AZURE_CONTAINER: a
# container made at start (tests use a fresh prefix in it each). Containers are created with a Shared Key
# request signed by scripts/lib/azurite_container.py (Python standard library only): object_store does not create
# containers, and Azurite refuses unsigned requests.
#
# Measured on the 2-core Debian 12 machine (2026-12-03): npm install of Azurite 3.35.0 41 s (374 packages, no
# native builds), start about 1 s. Needs Node.js (Debian: nodejs npm; any Node >= 18).
set -euo pipefail

AZURITE_VERSION=3.35.0
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEST_HOME="${S3CRYPTFS_TEST_HOME:-$HOME/.cache/s3cryptfs-test}"
PORT="${S3CRYPTFS_AZURITE_PORT:-10000}"
PREFIX_DIR="$TEST_HOME/azurite-$AZURITE_VERSION"
RUN_DIR="$TEST_HOME/run/azurite-$PORT"
PID_FILE="$RUN_DIR/azurite.pid"
LOG_FILE="$RUN_DIR/azurite.log"
ENV_FILE="$RUN_DIR/azurite.env"
DATA_DIR="$RUN_DIR/data"
LOCK_FILE="$TEST_HOME/.install.lock"
ACCOUNT=devstoreaccount1
# Azurite's published development key (not a secret: the same in every Azurite).
ACCOUNT_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
CONTAINER=s3cryptfs-test

SERVER_NAME=azurite
PIP_PACKAGES=("azurite@$AZURITE_VERSION")
CONSTRAINTS=/dev/null
# shellcheck source=lib/server-common.sh
. "$SCRIPT_DIR/lib/server-common.sh"

BIN="$PREFIX_DIR/node_modules/.bin/azurite-blob"

cmd_install() {
    if [[ -x "$BIN" ]]; then return 0; fi
    command -v npm >/dev/null 2>&1 || die "npm not found: Azurite needs Node.js and npm (Debian: apt-get install -y nodejs npm)"
    local t0; t0="$(now)"
    log "installing Azurite $AZURITE_VERSION into $PREFIX_DIR (npm; takes about 40 s)"
    rm -rf "$PREFIX_DIR.tmp"
    mkdir -p "$PREFIX_DIR.tmp"
    if ! npm install --prefix "$PREFIX_DIR.tmp" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" \
            >"$TEST_HOME/npm-install-azurite.log" 2>&1; then
        tail -n 30 "$TEST_HOME/npm-install-azurite.log" >&2
        die "npm install failed (full log: $TEST_HOME/npm-install-azurite.log)"
    fi
    rm -rf "$PREFIX_DIR"
    mv "$PREFIX_DIR.tmp" "$PREFIX_DIR"
    [[ -x "$BIN" ]] || die "Azurite installed but $BIN is missing"
    log "installed in $(elapsed "$t0") s"
}

# Any answer (Azurite says 400 to a bare GET of /) means the service is up.
answering() { curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; }

cmd_start() {
    command -v curl >/dev/null 2>&1 || die "curl not found (apt-get install -y curl)"
    command -v python3 >/dev/null 2>&1 || die "python3 not found (apt-get install -y python3)"
    with_lock cmd_install
    mkdir -p "$RUN_DIR"
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && answering && [[ -s "$ENV_FILE" ]]; then
        log "already running (pid $pid) on 127.0.0.1:$PORT"; return 0
    fi
    if pid_alive "$pid"; then cmd_stop; fi
    rm -f "$PID_FILE" "$ENV_FILE"
    if answering; then die "port $PORT on 127.0.0.1 is already in use by another process (set S3CRYPTFS_AZURITE_PORT)"; fi
    local t0; t0="$(now)"
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR"
    # --inMemoryPersistence would lose nothing we need, but large test files would then sit in the emulator's heap.
    setsid "$BIN" --blobHost 127.0.0.1 --blobPort "$PORT" --location "$DATA_DIR" --skipApiVersionCheck --silent \
        >"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"
    local deadline=$(( $(date +%s) + 60 ))
    until answering; do
        if ! pid_alive "$pid"; then
            tail -n 40 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "Azurite exited during start (log above)"
        fi
        (( $(date +%s) < deadline )) || { cmd_stop || true; die "Azurite not answering on 127.0.0.1:$PORT after 60 s"; }
        sleep 0.2
    done
    python3 "$SCRIPT_DIR/lib/azurite_container.py" "http://127.0.0.1:$PORT" "$ACCOUNT" "$ACCOUNT_KEY" "$CONTAINER" \
        || { cmd_stop || true; die "could not create the test container"; }
    {
        echo "# Written by scripts/azurite.sh start ($(date -u +%Y-%m-%dT%H:%M:%SZ)): Azurite $AZURITE_VERSION, pid $pid"
        echo "export AZURE_STORAGE_USE_EMULATOR=true"
        echo "export AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:$PORT"
        echo "export S3CRYPTFS_TEST_AZURE_CONTAINER=$CONTAINER"
    } > "$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    log "Azurite $AZURITE_VERSION up on 127.0.0.1:$PORT (pid $pid) in $(elapsed "$t0") s; env: $ENV_FILE"
}

cmd_stop() {
    stop_server
    rm -rf "$ENV_FILE" "$DATA_DIR"
}

cmd_status() {
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && answering; then echo "running: Azurite pid $pid on 127.0.0.1:$PORT"; return 0; fi
    echo "not running"; return 1
}

cmd_env() {
    [[ -s "$ENV_FILE" ]] || die "no $ENV_FILE: run scripts/azurite.sh start first"
    cat "$ENV_FILE"
}

case "${1:-}" in
    install) with_lock cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
