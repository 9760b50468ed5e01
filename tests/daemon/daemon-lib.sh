# Helpers for daemon tests: start cowtreed and wait for its pid file (written once every
# socket listens), stop it through QMP, talk QMP from python.
CT_D="$COWTREE_BUILD/cowtreed"

start_daemon() { # start_daemon ARGS...
    rm -f "$T/pid"
    "$CT_D" --socket "$T/qmp.sock" --nbd-unix "$T/nbd.sock" --pidfile "$T/pid" "$@" \
        >"$T/daemon.log" 2>&1 &
    DAEMON_PID=$!
    # The pid file appears when the daemon is ready; stop waiting if the daemon died.
    while [ ! -f "$T/pid" ]; do
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log"; die "cowtreed failed to start"; }
        sleep 0.05
    done
}

stop_daemon() {
    python3 "$COWTREE_TOP/tests/daemon/qmp.py" "$T/qmp.sock" '{"execute":"quit"}' >/dev/null
    wait "$DAEMON_PID" || die "cowtreed exited with an error: $(cat "$T/daemon.log")"
}

nbd_uri() { echo "nbd+unix:///$1?socket=$T/nbd.sock"; }
