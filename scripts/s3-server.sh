#!/usr/bin/env bash
# s3-server.sh — a real S3-compatible server (and KMS API) on 127.0.0.1 for the tests.
#
# Server: LocalStack 4.14.0 in host mode (no Docker), S3 + KMS on ONE port, HTTP and HTTPS on that
# same port. See shared/TESTING.md for how it differs from AWS (no SigV4 check, SSE-C over http, ...).
#
# Usage:
#   scripts/s3-server.sh install   # create/refresh the venv only (idempotent)
#   scripts/s3-server.sh start     # install if needed, start in the background, wait until healthy,
#                                  # write $S3CRYPTFS_TEST_HOME/server.env
#   scripts/s3-server.sh env       # print the env of the server on $S3CRYPTFS_S3_PORT
#                                  # (eval "$(scripts/s3-server.sh env)")
#   scripts/s3-server.sh status    # exit 0 if running and healthy
#   scripts/s3-server.sh check     # boto3 smoke test: S3 (http + https) and KMS (scripts/lib/s3_smoke.py)
#   scripts/s3-server.sh stop      # SIGTERM, wait 5 s, SIGKILL
#
# Environment:
#   S3CRYPTFS_TEST_HOME   cache + state dir (default ~/.cache/s3cryptfs-test): venv, TLS certs, pid, log
#   S3CRYPTFS_S3_PORT     port (default 4566); pid, log and env are kept per port in $TEST_HOME/run/PORT/,
#                         and $TEST_HOME/server.env is a copy of the env of the last server started
#   S3CRYPTFS_S3_START_TIMEOUT  seconds to wait for health (default 90)
#
# server.env exports: AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
#   S3CRYPTFS_TEST_S3_ENDPOINT=http://127.0.0.1:PORT  S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT=https://127.0.0.1:PORT
#   S3CRYPTFS_TEST_CA_FILE=<CA cert (PEM) that signed the server's certificate; valid for 127.0.0.1 and localhost>
#   S3CRYPTFS_TEST_KMS_ENDPOINT=http://127.0.0.1:PORT (same port), S3CRYPTFS_TEST_SERVER=localstack
#
# Measured on the 2-core Debian 12 machine (2026-11-23):
#   first install (venv + pip, pip cache empty: PIP_NO_CACHE_DIR=1)  58-64 s   (pip cache warm: ~37-46 s)
#   later runs: install is skipped (stamp file in the venv)            <0.1 s
#   start (launch -> /_localstack/health s3+kms ok)                    0.9-1.4 s (first start adds ~0.1 s of openssl)
#   check (boto3 smoke test; the first S3 request of a fresh server takes ~3 s, lazy service load) 3-5 s
#   stop: SIGTERM usually ends it in ~0.2-1.5 s; 1 time in ~6 it ignored SIGTERM -> SIGKILL after 5 s
#
# Things found while setting it up (workarounds applied below):
#   * The machine has /.dockerenv, so LocalStack believes it runs in its container and writes to
#     /var/lib/localstack and /tmp/localstack. OVERRIDE_IN_DOCKER=0 + FILESYSTEM_ROOT keep everything
#     under $S3CRYPTFS_TEST_HOME.
#   * LocalStack's own self-signed certificate is broken for 127.0.0.1: its SAN list lacks a comma
#     ("DNS:localhost.localstack.cloudIP:127.0.0.1"), so curl and openssl reject https://127.0.0.1 (checked;
#     rustls checks IP SANs the same way). Our CA is checked to work with object_store/rustls.
#     We make our own little CA + server certificate with openssl and hand it over with
#     CUSTOM_SSL_CERT_PATH; the CA cert is S3CRYPTFS_TEST_CA_FILE.
#   * It tries to download a "test certificate" from the internet at start: SKIP_SSL_CERT_DOWNLOAD=1.
#   * GATEWAY_SERVER=hypercorn is needed, the default server ignores the host and binds 0.0.0.0.
set -euo pipefail

LOCALSTACK_VERSION=4.14.0
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$SCRIPT_DIR/lib/localstack-constraints.txt"
SMOKE="$SCRIPT_DIR/lib/s3_smoke.py"

TEST_HOME="${S3CRYPTFS_TEST_HOME:-$HOME/.cache/s3cryptfs-test}"
PORT="${S3CRYPTFS_S3_PORT:-4566}"
START_TIMEOUT="${S3CRYPTFS_S3_START_TIMEOUT:-90}"
VENV="$TEST_HOME/venv-localstack-$LOCALSTACK_VERSION"
FS_ROOT="$TEST_HOME/localstack-fs"      # LocalStack's FILESYSTEM_ROOT (its "volume")
TLS_DIR="$TEST_HOME/tls"
RUN_DIR="$TEST_HOME/run/$PORT"         # per port: several servers (worktrees, sessions) can coexist
PID_FILE="$RUN_DIR/localstack.pid"
LOG_FILE="$RUN_DIR/localstack.log"
PORT_ENV_FILE="$RUN_DIR/server.env"
ENV_FILE="$TEST_HOME/server.env"        # copy of the last started server's env
LOCK_FILE="$TEST_HOME/.install.lock"

PIP_PACKAGES=("localstack-core[runtime]==$LOCALSTACK_VERSION" 'cbor2<6' 'pyopenssl<24.3' 'cryptography<44'
              service_identity boto3)

SERVER_NAME=s3-server
# shellcheck source=lib/server-common.sh
. "$SCRIPT_DIR/lib/server-common.sh"

# --- install ---------------------------------------------------------------------------------------

find_python() {
    # LocalStack 4.14 needs Python >= 3.12; Debian 12's python3 is 3.11. pyenv has 3.13/3.12 here.
    local roots=() r v cand
    if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)"); fi
    roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
    for v in 3.13 3.12; do
        for r in "${roots[@]}"; do
            for cand in $(ls -d "$r"/versions/"$v".* 2>/dev/null | sort -rV); do
                if [[ -x "$cand/bin/python$v" ]]; then echo "$cand/bin/python$v"; return 0; fi
            done
        done
        cand="$(command -v "python$v" 2>/dev/null || true)"
        if [[ -n "$cand" ]] && "$cand" -c 'import venv, ensurepip' 2>/dev/null; then echo "$cand"; return 0; fi
    done
    return 1
}

cmd_install() {
    local stamp; stamp="$(install_stamp)"
    if [[ -x "$VENV/bin/python" && -f "$VENV/.s3cryptfs-installed" ]] \
        && [[ "$(cat "$VENV/.s3cryptfs-installed")" == "$stamp" ]] \
        && "$VENV/bin/python" -c 'import localstack.runtime.main, boto3' 2>/dev/null; then
        return 0
    fi
    local py; py="$(find_python)" || die "LocalStack $LOCALSTACK_VERSION needs Python 3.13 or 3.12 and none was found.
  Looked in: \$(pyenv root)/versions/3.1[32].*, ${PYENV_ROOT:-$HOME/.pyenv}/versions, and python3.13/python3.12 on PATH.
  Debian 12's python3 (3.11) is too old. Install one with pyenv (pyenv install 3.13) and retry."
    local t0; t0="$(now)"
    log "installing LocalStack $LOCALSTACK_VERSION + boto3 into $VENV (with $py; takes about a minute)"
    mkdir -p "$TEST_HOME"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "could not create venv with $py"
    local pip_log="$TEST_HOME/pip-install.log"
    if ! "$VENV/bin/pip" install --disable-pip-version-check --no-input -q -c "$CONSTRAINTS" \
            "${PIP_PACKAGES[@]}" >"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    "$VENV/bin/python" -c 'import localstack.runtime.main, boto3' \
        || die "venv $VENV was installed but localstack/boto3 do not import"
    echo "$stamp" > "$VENV/.s3cryptfs-installed"
    log "installed in $(elapsed "$t0") s"
}

# --- TLS -------------------------------------------------------------------------------------------

ensure_certs() {
    # A test CA and a server certificate for 127.0.0.1 / ::1 / localhost, made once and reused.
    # server.pem = key + server cert + CA cert, the layout CUSTOM_SSL_CERT_PATH expects.
    command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install -y openssl)"
    if [[ -s "$TLS_DIR/server.pem" && -s "$TLS_DIR/ca.pem" ]] \
        && openssl x509 -in "$TLS_DIR/server.crt" -noout -checkend $((30 * 86400)) >/dev/null 2>&1 \
        && openssl verify -CAfile "$TLS_DIR/ca.pem" "$TLS_DIR/server.crt" >/dev/null 2>&1; then
        return 0
    fi
    log "making a test CA and server certificate in $TLS_DIR"
    rm -rf "$TLS_DIR"; mkdir -p "$TLS_DIR"
    (
        cd "$TLS_DIR"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650 \
            -subj "/CN=s3cryptfs test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            >/dev/null 2>&1
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj "/CN=localhost" >/dev/null 2>&1
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost" > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
            -extfile server.ext -out server.crt >/dev/null 2>&1
        cat server.key server.crt ca.pem > server.pem
        rm -f server.csr ca.srl
    ) || die "openssl failed to make the test certificates in $TLS_DIR"
}

# --- run -------------------------------------------------------------------------------------------

# Prints nothing; exit 0 when /_localstack/health says s3 and kms are available/running.
healthy() {
    local body
    body="$(curl -sf --max-time 2 "http://127.0.0.1:$PORT/_localstack/health" 2>/dev/null)" || return 1
    "$VENV/bin/python" -c '
import json, sys
s = json.loads(sys.argv[1]).get("services", {})
sys.exit(0 if all(s.get(n) in ("available", "running") for n in ("s3", "kms")) else 1)' "$body" 2>/dev/null
}

write_env() {
    local tmp="$PORT_ENV_FILE.tmp.$$"
    cat > "$tmp" <<EOF
# Written by scripts/s3-server.sh start ($(date -u +%Y-%m-%dT%H:%M:%SZ)): LocalStack $LOCALSTACK_VERSION, pid $(read_pid)
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export S3CRYPTFS_TEST_SERVER=localstack
export S3CRYPTFS_TEST_S3_ENDPOINT=http://127.0.0.1:$PORT
export S3CRYPTFS_TEST_S3_HTTPS_ENDPOINT=https://127.0.0.1:$PORT
export S3CRYPTFS_TEST_KMS_ENDPOINT=http://127.0.0.1:$PORT
export S3CRYPTFS_TEST_CA_FILE=$TLS_DIR/ca.pem
# boto3 comes with LocalStack: tests use it as the independent raw S3 client.
export S3CRYPTFS_TEST_PYTHON=$VENV/bin/python
EOF
    cp "$tmp" "$ENV_FILE.tmp.$$" && mv "$ENV_FILE.tmp.$$" "$ENV_FILE"
    mv "$tmp" "$PORT_ENV_FILE"
}

verify_tls() {
    # The CA file must really validate the server for the IP address 127.0.0.1.
    curl -sf --max-time 5 --cacert "$TLS_DIR/ca.pem" "https://127.0.0.1:$PORT/_localstack/health" >/dev/null \
        || die "https://127.0.0.1:$PORT does not validate with $TLS_DIR/ca.pem (curl --cacert failed)"
}

cmd_start() {
    command -v curl >/dev/null 2>&1 || die "curl not found (apt-get install -y curl)"
    with_lock cmd_install
    with_lock ensure_certs
    mkdir -p "$RUN_DIR" "$FS_ROOT"
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && healthy; then
        log "already running (pid $pid) on 127.0.0.1:$PORT"
        write_env; return 0
    fi
    if pid_alive "$pid"; then
        log "pid $pid from $PID_FILE is alive but not healthy: stopping it first"
        cmd_stop
    fi
    rm -f "$PID_FILE"
    if curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; then
        die "port $PORT on 127.0.0.1 is already in use by another process (set S3CRYPTFS_S3_PORT)"
    fi

    local t0; t0="$(now)"
    # setsid: own process group, not tied to the caller's terminal; stdin from /dev/null.
    env OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$FS_ROOT" LOCALSTACK_VOLUME_DIR="$FS_ROOT" \
        CUSTOM_SSL_CERT_PATH="$TLS_DIR/server.pem" SKIP_SSL_CERT_DOWNLOAD=1 \
        DISABLE_EVENTS=1 DNS_ADDRESS=0 GATEWAY_SERVER=hypercorn GATEWAY_LISTEN="127.0.0.1:$PORT" \
        LOCALSTACK_HOST="127.0.0.1:$PORT" SERVICES=s3,kms S3_SKIP_KMS_KEY_VALIDATION=0 \
        setsid "$VENV/bin/python" -m localstack.runtime.main >"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"

    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    until healthy; do
        if ! pid_alive "$pid"; then
            tail -n 40 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "LocalStack exited during start (log above; full log: $LOG_FILE)"
        fi
        if (( $(date +%s) >= deadline )); then
            tail -n 40 "$LOG_FILE" >&2 || true
            cmd_stop || true
            die "LocalStack not healthy (s3+kms) on 127.0.0.1:$PORT after ${START_TIMEOUT}s (log above; full log: $LOG_FILE)"
        fi
        sleep 0.2
    done
    verify_tls
    write_env
    log "LocalStack $LOCALSTACK_VERSION up on 127.0.0.1:$PORT (pid $pid) in $(elapsed "$t0") s; env: $ENV_FILE"
}

cmd_stop() {
    stop_server
}

cmd_status() {
    local pid; pid="$(read_pid)"
    if pid_alive "$pid" && [[ -x "$VENV/bin/python" ]] && healthy; then
        echo "running: LocalStack $LOCALSTACK_VERSION pid $pid on 127.0.0.1:$PORT (env: $ENV_FILE)"; return 0
    fi
    if pid_alive "$pid"; then echo "unhealthy: pid $pid alive but /_localstack/health not ok"; return 1; fi
    echo "not running"; return 1
}

cmd_env() {
    [[ -s "$PORT_ENV_FILE" ]] || die "no $PORT_ENV_FILE: run scripts/s3-server.sh start first"
    cat "$PORT_ENV_FILE"
}

cmd_check() {
    cmd_status >/dev/null || die "server not running: scripts/s3-server.sh start"
    # shellcheck disable=SC1090
    ( source "$PORT_ENV_FILE" && "$VENV/bin/python" "$SMOKE" )
}

case "${1:-}" in
    install) with_lock cmd_install; log "venv ready: $VENV" ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    check) cmd_check ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
