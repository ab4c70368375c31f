#!/bin/sh
# spawn_mode = "oneshot": start the agent in a bubblewrap sandbox (pid, net,
# ipc, uts namespaces; host /usr read-only; a private tmpfs /tmp), wait until
# its socket listens, print the descriptor as one JSON line and exit.
# The sandbox gets its own session (setsid) and its output goes to a log,
# so it does not hold this step's stdout open.
set -eu
dir=$NOODLE_DIR
sock="$dir/agent.sock"
rm -f "$sock"
# A real interpreter, not a shim: its prefix is bound read-only.
py=$(readlink -f "${PYTHON:-/usr/bin/python3}")
prefix=$(dirname "$(dirname "$py")")
# The agent writes one byte to fd 3 once it listens (--ready-fd): a FIFO
# opened read-write here, so opening it never blocks.
rm -f "$dir/ready"; mkfifo -m 600 "$dir/ready"
exec 3<>"$dir/ready"
setsid bwrap \
    --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
    --ro-bind "$prefix" "$prefix" \
    --ro-bind "$NOODLE_AGENT" /opt/noodle/agent.py \
    --bind "$dir" /run/noodle \
    --proc /proc --dev /dev --tmpfs /tmp \
    --unshare-pid --unshare-net --unshare-ipc --unshare-uts --hostname noodle \
    -- "$py" -S /opt/noodle/agent.py --socket /run/noodle/agent.sock --ready-fd 3 \
    </dev/null >"$dir/sandbox.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/sandbox.pid"
if ! timeout 10 head -c1 <&3 >/dev/null; then
    echo "agent not ready after 10 s:" >&2; cat "$dir/sandbox.log" >&2; exit 1
fi
exec 3>&-
rm -f "$dir/ready"
printf '{"pid": %s, "socket": "%s"}\n' "$pid" "$sock"
