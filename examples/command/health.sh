#!/bin/sh
# health SOCKET: exit 0 when the agent answers a ping.
exec "${PYTHON:-python3}" -S -c '
import socket, struct, sys, json
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
body = json.dumps({"op": "ping"}).encode(); s.sendall(struct.pack(">I", len(body)) + body)
n = struct.unpack(">I", s.recv(4))[0]; sys.exit(0 if json.loads(s.recv(n)).get("ok") else 1)
' "$1"
