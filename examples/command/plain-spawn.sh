#!/bin/sh
# spawn_mode = "process": this script *is* the instance. It starts the agent
# as a plain process (no sandbox), prints the readiness line the kind waits
# for (a JSON object, merged into the descriptor), then waits on the agent,
# so that the kind's default terminate (TERM to this process group) ends both.
set -eu
sock="$NOODLE_DIR/agent.sock"
rm -f "$sock"
rm -f "$NOODLE_DIR/ready"; mkfifo -m 600 "$NOODLE_DIR/ready"
exec 3<>"$NOODLE_DIR/ready"  # read-write: opening a FIFO so never blocks
"${PYTHON:-python3}" -S "$NOODLE_AGENT" --socket "$sock" --ready-fd 3 &
agent=$!
trap 'kill "$agent" 2>/dev/null; exit 0' TERM INT
# The agent writes one byte to fd 3 once it listens.
timeout 10 head -c1 <&3 >/dev/null || { echo "agent not ready after 10 s" >&2; exit 1; }
exec 3>&-
rm -f "$NOODLE_DIR/ready"
printf '{"socket": "%s", "agent_pid": %s}\n' "$sock" "$agent"
wait "$agent"
