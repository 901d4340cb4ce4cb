#!/usr/bin/env bash
# moto-server.sh — an S3 server on 127.0.0.1 that checks credentials, for the access-denied tests.
#
# LocalStack (scripts/s3-server.sh) accepts any key and any signature, so "access denied" cannot be tested
# against it. moto 5.2.5 in server mode can authenticate: with authentication on it rejects an unknown access
# key id (403 InvalidAccessKeyId), checks the SigV4 signature (403 SignatureDoesNotMatch) and evaluates the
# IAM user's policies (403 AccessDenied). It does not evaluate bucket policies, and ignores SSE-C.
#
# Usage:
#   scripts/moto-server.sh install   # create/refresh the venv only (idempotent)
#   scripts/moto-server.sh start     # install if needed, start in the background, wait until it answers,
#                                    # create the admin user, turn authentication on, prove it is on
#                                    # (scripts/lib/moto_setup.py), write the env file
#   scripts/moto-server.sh env       # print the env of the server on $S3CRYPTFS_MOTO_PORT
#                                    # (eval "$(scripts/moto-server.sh env)")
#   scripts/moto-server.sh status    # exit 0 if running and answering
#   scripts/moto-server.sh stop      # SIGTERM, wait 5 s, SIGKILL
#
# Environment:
#   S3CRYPTFS_TEST_HOME     cache + state dir (default ~/.cache/s3cryptfs-test), shared with s3-server.sh: venv,
#                           and per port $TEST_HOME/run/PORT/{moto.pid,moto.log,moto.env}
#   S3CRYPTFS_MOTO_PORT     port (default 5000)
#   S3CRYPTFS_MOTO_START_TIMEOUT  seconds to wait for the server to answer (default 60)
#
# The env file exports (no AWS_* variables: those belong to the LocalStack server):
#   S3CRYPTFS_TEST_MOTO_ENDPOINT=http://127.0.0.1:PORT
#   S3CRYPTFS_TEST_MOTO_ADMIN_KEY_ID / S3CRYPTFS_TEST_MOTO_ADMIN_SECRET: an IAM user allowed everything, for
#     tests to create their own buckets, users, keys and policies (IAM and S3 on the same port; region us-east-1)
#
# Measured on the 2-core Debian 12 machine (2026-11-23):
#   first install (venv + pip, pip cache empty: PIP_NO_CACHE_DIR=1)   22-24 s (82 s while cargo built on both cores);
#                                                                      about 60 packages, all wheels: nothing is compiled
#   later runs: install is skipped (stamp file in the venv)            <0.1 s
#   start (launch -> answering -> admin made, auth on, checked)        1.1-2.4 s
#   stop: SIGTERM ends it at once
#
# Things found while setting it up:
#   * INITIAL_NO_AUTH_ACTION_COUNT=N lets the first N actions through unauthenticated; POST /moto-api/reset-auth
#     with a number sets the same count at run time (and restarts counting). The body must be sent as text/plain:
#     a form-encoded body reaches moto empty and it answers 500.
#   * moto verifies S3 signatures with botocore's S3SigV4Auth, which needs the x-amz-content-sha256 header:
#     `curl --aws-sigv4` does not send it by itself, so add -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD'.
#   * Debian 12's python3 (3.11) is fine for moto (LocalStack needs 3.12+).
set -euo pipefail

MOTO_VERSION=5.2.5
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$SCRIPT_DIR/lib/moto-constraints.txt"
SETUP="$SCRIPT_DIR/lib/moto_setup.py"

TEST_HOME="${S3CRYPTFS_TEST_HOME:-$HOME/.cache/s3cryptfs-test}"
PORT="${S3CRYPTFS_MOTO_PORT:-5000}"
START_TIMEOUT="${S3CRYPTFS_MOTO_START_TIMEOUT:-60}"
VENV="$TEST_HOME/venv-moto-$MOTO_VERSION"
RUN_DIR="$TEST_HOME/run/$PORT"         # per port: several servers (worktrees, sessions) can coexist
PID_FILE="$RUN_DIR/moto.pid"
LOG_FILE="$RUN_DIR/moto.log"
ENV_FILE="$RUN_DIR/moto.env"
LOCK_FILE="$TEST_HOME/.install.lock"

PIP_PACKAGES=("moto[server,s3,iam]==$MOTO_VERSION" boto3)

SERVER_NAME=moto-server
# shellcheck source=lib/server-common.sh
. "$SCRIPT_DIR/lib/server-common.sh"

# --- install ---------------------------------------------------------------------------------------

find_python() {
    # moto 5.2 needs Python >= 3.9 with venv + ensurepip (Debian: the python3-venv package).
    local cand
    for cand in /usr/bin/python3 "$(command -v python3 2>/dev/null || true)" \
                "$(command -v python3.13 2>/dev/null || true)" "$(command -v python3.12 2>/dev/null || true)"; do
        [[ -n "$cand" && -x "$cand" ]] || continue
        if "$cand" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

cmd_install() {
    local stamp; stamp="$(install_stamp)"
    if [[ -x "$VENV/bin/moto_server" && -f "$VENV/.s3cryptfs-installed" ]] \
        && [[ "$(cat "$VENV/.s3cryptfs-installed")" == "$stamp" ]] \
        && "$VENV/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
        return 0
    fi
    local py; py="$(find_python)" || die "moto $MOTO_VERSION needs Python >= 3.9 with venv and ensurepip, and none was found
  (on Debian: apt-get install -y python3 python3-venv)."
    local t0; t0="$(now)"
    log "installing moto $MOTO_VERSION into $VENV (with $py; takes about 20 s)"
    mkdir -p "$TEST_HOME"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "could not create venv with $py"
    local pip_log="$TEST_HOME/pip-install-moto.log"
    if ! "$VENV/bin/pip" install --disable-pip-version-check --no-input -q -c "$CONSTRAINTS" \
            "${PIP_PACKAGES[@]}" >"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    "$VENV/bin/python" -c 'import moto.server, boto3' || die "venv $VENV was installed but moto/boto3 do not import"
    echo "$stamp" > "$VENV/.s3cryptfs-installed"
    log "installed in $(elapsed "$t0") s"
}

# --- run -------------------------------------------------------------------------------------------

# moto's own API answers 200 once the server is up; it is not an authenticated action.
answering() { curl -sf --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/moto-api/" 2>/dev/null; }

cmd_start() {
    command -v curl >/dev/null 2>&1 || die "curl not found (apt-get install -y curl)"
    with_lock cmd_install
    mkdir -p "$RUN_DIR"
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && answering && [[ -s "$ENV_FILE" ]]; then
        log "already running (pid $pid) on 127.0.0.1:$PORT"; return 0
    fi
    if pid_alive "$pid"; then
        log "pid $pid from $PID_FILE is alive but not usable: stopping it first"
        cmd_stop
    fi
    rm -f "$PID_FILE" "$ENV_FILE"
    if curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; then
        die "port $PORT on 127.0.0.1 is already in use by another process (set S3CRYPTFS_MOTO_PORT)"
    fi

    local t0; t0="$(now)"
    # Authentication starts off (no INITIAL_NO_AUTH_ACTION_COUNT) so that moto_setup.py can create the admin user;
    # it turns authentication on before anything else can use the server.
    # setsid: own process group, not tied to the caller's terminal; stdin from /dev/null.
    env -u INITIAL_NO_AUTH_ACTION_COUNT setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" \
        >"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"

    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    until answering; do
        if ! pid_alive "$pid"; then
            tail -n 40 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "moto exited during start (log above; full log: $LOG_FILE)"
        fi
        if (( $(date +%s) >= deadline )); then
            tail -n 40 "$LOG_FILE" >&2 || true
            cmd_stop || true
            die "moto not answering on 127.0.0.1:$PORT after ${START_TIMEOUT}s (log above; full log: $LOG_FILE)"
        fi
        sleep 0.2
    done
    local keys="$RUN_DIR/moto-admin.tmp.$$"
    if ! (umask 077; "$VENV/bin/python" "$SETUP" "http://127.0.0.1:$PORT" "$keys"); then
        rm -f "$keys"
        cmd_stop || true
        die "moto started but does not enforce authentication as the tests need (see above)"
    fi
    local tmp="$ENV_FILE.tmp.$$"
    (
        umask 077   # it holds the admin key of this test server
        {
            echo "# Written by scripts/moto-server.sh start ($(date -u +%Y-%m-%dT%H:%M:%SZ)): moto $MOTO_VERSION, pid $pid, authentication on"
            echo "export S3CRYPTFS_TEST_MOTO_ENDPOINT=http://127.0.0.1:$PORT"
            cat "$keys"
        } > "$tmp"
    )
    rm -f "$keys"
    mv "$tmp" "$ENV_FILE"
    log "moto $MOTO_VERSION up on 127.0.0.1:$PORT (pid $pid) in $(elapsed "$t0") s, authentication on; env: $ENV_FILE"
}

cmd_stop() {
    stop_server
    rm -f "$ENV_FILE"
}

cmd_status() {
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && answering; then
        echo "running: moto $MOTO_VERSION pid $pid on 127.0.0.1:$PORT (env: $ENV_FILE)"; return 0
    fi
    if pid_alive "$pid"; then echo "unhealthy: pid $pid alive but /moto-api/ does not answer"; return 1; fi
    echo "not running"; return 1
}

cmd_env() {
    [[ -s "$ENV_FILE" ]] || die "no $ENV_FILE: run scripts/moto-server.sh start first"
    cat "$ENV_FILE"
}

case "${1:-}" in
    install) with_lock cmd_install; log "venv ready: $VENV" ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
