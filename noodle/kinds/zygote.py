"""The warm template of the ``process`` kind.

Started once per pool by ``ProcessKind.setup()`` with a clean ``exec`` (so
no instance ever inherits the supervisor's segment mapping or queue
descriptors), it imports the configured modules and then forks one
instance per request::

    spawn worker --[fork {slot, dir, ...}]--> zygote --fork--> instance
                 <--[{pid}]----------------         (setsid, limits,
                                                     agent on dir/instance.sock)

The listening socket is bound here before the fork, so the instance is
connectable the moment the reply leaves. SIGCHLD is ignored so the kernel
reaps instances that die while the zygote lives; if the zygote dies they
are reparented to the supervisor, a child subreaper, which reaps them.
"""

from __future__ import annotations

import _socket
import contextlib
import gc
import importlib
import importlib.util
import io
import os
import resource
import signal
import socket
import sys
from types import ModuleType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from noodle import agent
    from noodle.host import proc
else:

    def _sibling(name: str) -> ModuleType:
        """A module of the ``noodle`` package loaded by its path. Importing
        it through the package would run ``noodle/__init__`` (the client,
        asyncio, msgpack, the C core): every fork copies the page tables of
        all the template holds, and each instance would carry it too."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *name.split("."))
        spec = importlib.util.spec_from_file_location(f"_noodle_zygote_{name.replace('.', '_')}", path + ".py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod

    agent, proc = _sibling("agent"), _sibling("host.proc")

start_time = proc.start_time

_setproctitle: Callable[[str], None] | None
try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # optional: instances keep the zygote's title
    _setproctitle = None

_RLIMITS = {"as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC, "cpu": resource.RLIMIT_CPU}


def _become_instance(req: dict[str, Any], listener: _socket.socket) -> None:
    """In the forked child: drop to the requested identity, warm up, serve.

    It leaves the zygote's session only once warm. Until then it is part
    of the pool's refill work, which the scheduler (with autogroups, one
    per session) weighs as one group however many instances are warming;
    from ``setsid()`` on it is a group of its own, as the executor that
    will call it is, so refilling behind a lease does not crowd out the
    lease's own calls. ``terminate`` kills the group it then leads (and
    the process alone, if it is killed before)."""
    if _setproctitle is not None:
        _setproctitle(f"noodle instance {req.get('pool', '')} {req.get('slot', '')}")
    slot_dir = str(req["dir"])
    # first, so a spawn worker that dies before publishing still leaves the
    # record clean() kills by; os-level calls, since every page the child
    # writes is a copy-on-write fault paid per instance
    me = os.getpid()
    fd = os.open(os.path.join(slot_dir, "instance.pid"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"%d %d\n" % (me, start_time(me) or 0))
    finally:
        os.close(fd)
    for name, value in (req.get("rlimits") or {}).items():
        if value:
            resource.setrlimit(_RLIMITS[name], (int(value), int(value)))
    cwd = req.get("cwd")
    if cwd:
        os.makedirs(cwd, exist_ok=True)
    else:
        cwd = slot_dir  # prepare() made it
    gid, uid = req.get("gid"), req.get("uid")
    if gid is not None:
        os.setgroups([])
        os.setgid(int(gid))
    if uid is not None:
        os.setuid(int(uid))
    os.chdir(cwd)
    warm()
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    agent.serve_socket(listener)


def warm() -> None:
    """Run one request through the agent's whole path (decode, import,
    call, capture, encode) in this process, with the results pickled as a
    lease of this kind asks for them. In the zygote this fills the caches
    every instance then shares; in a fresh instance it pays the
    copy-on-write faults on the pages that path writes before the spawn
    step's ping returns, so the instance is published warm and its first
    lease pays nothing extra."""
    buf = io.BytesIO()
    call = {"op": "call", "target": "math:factorial", "args": [20], "kwargs": {}, "results": "pickle"}
    agent.write_frame(buf, call)
    buf.seek(0)
    req = agent.read_frame(buf)
    if req is not None:
        agent.write_frame(io.BytesIO(), agent.Agent().handle(req))


def _pid_frame(pid: int) -> bytes:
    """The reply frame, formatted without an encoder: fewer pages written."""
    body = b'{"ok": true, "pid": %d}' % pid
    return agent.frame(body)


def _serve_one(conn: socket.socket) -> None:
    with conn:
        rfile = wfile = agent.SocketStream(conn)
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
        # the pid only: the spawn worker reads the start time once the
        # instance has answered, since every page this template writes
        # between forks is copied again (64 live instances share it)
        conn.sendall(_pid_frame(pid))


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
    if args.title and _setproctitle is not None:
        _setproctitle(args.title)
    for mod in filter(None, args.preload.split(",")):
        importlib.import_module(mod)
    # what every Executor task unpickles with: imported once here, not per instance
    with contextlib.suppress(ImportError):
        importlib.import_module("cloudpickle")
    warm()
    # Everything alive now is shared with every instance. Frozen, the
    # collector never walks (and so never writes to) these objects in an
    # instance, which would copy their pages into each one.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us
    raw = agent.listen_unix(args.socket)
    server = socket.socket(raw.family, raw.type, fileno=raw.detach())
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
