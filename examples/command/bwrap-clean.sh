#!/bin/sh
# clean DIR: works with no descriptor (after a crash): the pid file left by
# spawn names the sandbox; it is only killed if that pid is still a bwrap,
# so a reused pid is left alone.
set -u
dir=$1
if [ -f "$dir/sandbox.pid" ]; then
    pid=$(cat "$dir/sandbox.pid")
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = bwrap ]; then
        "$(dirname "$0")/bwrap-terminate.sh" "$pid"
    fi
fi
rm -rf "$dir"
