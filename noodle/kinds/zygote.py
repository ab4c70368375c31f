"""The warm template of the ``process`` kind.

Started once per pool by ``ProcessKind.setup()`` with a clean ``exec`` (so
no instance ever inherits the supervisor's segment mapping or queue
descriptors), it imports the configured modules and then forks one
instance per request::

    spawn worker --[fork {slot, dir, ...}]--> zygote --fork--> instance
                 <--[{pid, start}]---------         (setsid, limits,
                                                     agent on dir/instance.sock)

The listening socket is bound here before the fork, so the instance is
connectable the moment the reply leaves. SIGCHLD is ignored so the kernel
reaps instances that die while the zygote lives; if the zygote dies they
are reparented to the supervisor, a child subreaper, which reaps them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import resource
import signal
import socket
import sys
from typing import Any

from noodle import agent
from noodle.procs import start_time

_RLIMITS = {"as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC, "cpu": resource.RLIMIT_CPU}


def _become_instance(req: dict[str, Any], listener: socket.socket) -> None:
    """In the forked child: drop to the requested identity and serve."""
    os.setsid()  # its own process group: terminate kills the group
    with contextlib.suppress(ImportError):
        from setproctitle import setproctitle

        setproctitle(f"noodle instance {req.get('pool', '')} {req.get('slot', '')}")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    slot_dir = str(req["dir"])
    with open(os.path.join(slot_dir, "instance.pid"), "w") as f:
        f.write(f"{os.getpid()} {start_time(os.getpid())}\n")
    for name, value in (req.get("rlimits") or {}).items():
        if value:
            resource.setrlimit(_RLIMITS[name], (int(value), int(value)))
    cwd = req.get("cwd") or slot_dir
    os.makedirs(cwd, exist_ok=True)
    gid, uid = req.get("gid"), req.get("uid")
    if gid is not None:
        os.setgroups([])
        os.setgid(int(gid))
    if uid is not None:
        os.setuid(int(uid))
    os.chdir(cwd)
    agent.serve_socket(listener)


def _serve_one(conn: socket.socket) -> None:
    with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
        req = agent.read_frame(rfile)
        if req is None:
            return
        if req.get("op") == "ping":
            agent.write_frame(wfile, {"ok": True, "pid": os.getpid()})
            return
        sock_path = str(req["socket"])
        listener = agent.listen_unix(sock_path)
        uid, sock_gid = req.get("uid"), req.get("sock_gid")
        # the lease holder (owner or the pool's group) connects; nobody else
        os.chown(sock_path, -1 if uid is None else int(uid), -1 if sock_gid is None else int(sock_gid))
        os.chmod(sock_path, 0o660)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                conn.close()
                _become_instance(req, listener)
            except BaseException:  # noqa: BLE001 - the child must never return into the zygote loop
                code = 1
            os._exit(code)
        listener.close()
        agent.write_frame(wfile, {"ok": True, "pid": pid, "start": start_time(pid)})


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="pool-noodle process-kind zygote")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--preload", default="", help="comma-separated modules to import before forking")
    parser.add_argument("--title", default="")
    parser.add_argument("--parent", type=int, default=0, help="exit when this pid (the supervisor) dies")
    args = parser.parse_args(argv)
    if args.parent:
        # die with the supervisor: a restarted one cannot know this zygote
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != args.parent:
            return 1
    if args.title:
        with contextlib.suppress(ImportError):
            from setproctitle import setproctitle

            setproctitle(args.title)
    for mod in filter(None, args.preload.split(",")):
        importlib.import_module(mod)
    # what every Executor task unpickles with: imported once here, not per instance
    with contextlib.suppress(ImportError):
        importlib.import_module("cloudpickle")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us
    server = agent.listen_unix(args.socket)
    os.chmod(args.socket, 0o600)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = server.accept()
        try:
            _serve_one(conn)
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the template
            sys.stderr.write(f"zygote: request failed: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
