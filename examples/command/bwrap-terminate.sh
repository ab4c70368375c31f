#!/bin/sh
# terminate PID: kill the sandbox's session (bwrap and, with it, its pid
# namespace) and wait until it is gone.
set -u
pid=$1
kill -s KILL -- "-$pid" 2>/dev/null || kill -s KILL "$pid" 2>/dev/null || true
i=0
while kill -0 "$pid" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    i=$((i + 1)); [ "$i" -lt 2000 ] || { echo "pid $pid survived SIGKILL" >&2; exit 1; }
    sleep 0.005
done
