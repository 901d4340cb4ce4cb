# server-common.sh — what scripts/s3-server.sh and scripts/moto-server.sh share: messages, timing, the install
# stamp and lock, and stopping a server started with setsid. Sourced, not run. The caller sets SERVER_NAME, TEST_HOME,
# LOCK_FILE, PID_FILE, PIP_PACKAGES and CONSTRAINTS first.

log() { echo "$SERVER_NAME: $*" >&2; }
die() { echo "$SERVER_NAME: ERROR: $*" >&2; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

install_stamp() {
    # Changes whenever the package list or the pinned versions change.
    { printf '%s\n' "${PIP_PACKAGES[@]}"; cat "$CONSTRAINTS"; } | sha256sum | cut -d' ' -f1
}

with_lock() {
    # Serialize venv (and certificate) creation between concurrent runs sharing $TEST_HOME; one lock for all servers.
    mkdir -p "$TEST_HOME"
    if command -v flock >/dev/null 2>&1; then
        ( flock -w 600 9 || die "timed out waiting for $LOCK_FILE"; "$@" ) 9>"$LOCK_FILE"
    else
        "$@"
    fi
}

read_pid() { [[ -s "$PID_FILE" ]] && cat "$PID_FILE" || true; }
pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Stops the server in $PID_FILE: SIGTERM to its process group (it was started with setsid), SIGKILL after 5 s.
# Removes the pid file; the caller removes its other state.
stop_server() {
    local pid; pid="$(read_pid)"
    if ! pid_alive "$pid"; then
        rm -f "$PID_FILE"; log "not running"; return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then
        log "pid $pid still alive 5 s after SIGTERM: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 20); do pid_alive "$pid" || break; sleep 0.1; done
    fi
    pid_alive "$pid" && die "could not stop pid $pid"
    rm -f "$PID_FILE"
    log "stopped (pid $pid)"
}
