"""The default kind: warm Python interpreter processes.

An instance is a process forked from the pool's zygote (``zygote.py``),
which has already imported the ``preload`` modules, so a spawn costs a
fork, not an interpreter start. It serves the agent protocol on
``<slot dir>/instance.sock``; ``lease.instance`` is an AgentHandle with
``run(source)``, ``call("pkg.mod:func", ...)`` and ``exec(argv)``.

It isolates nothing beyond a process group, optional uid/gid and resource
limits: code that calls setsid() can outlive terminate. Use ``jail`` or
``oci`` for untrusted code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from noodle import agent
from noodle.errors import KindUnavailable, StepFailed
from noodle.handle import AgentHandle
from noodle.host.launch import read_pidfile
from noodle.host.proc import ProcessIdentity, start_time
from noodle.kinds.base import AgentKind, PoolInfo, SlotContext


class ProcessKind(AgentKind):
    name = "process"
    TRUST_RESULTS = True  # isolates nothing: results are pickled, like the caller's own
    OPTIONS = {
        "preload": (list, []),
        "uid": (int, None),
        "gid": (int, None),
        "rlimit_as": (int, None),
        "rlimit_nproc": (int, None),
        "rlimit_cpu": (int, None),
        "cwd": (str, None),  # template with {slot}, {dir}, {pool}
        "spawn_timeout": ((int, float), 10.0),
    }

    def __init__(self, pool: PoolInfo, options: Mapping[str, Any]) -> None:
        super().__init__(pool, options)
        for mod in self.options["preload"]:
            if not isinstance(mod, str):
                from noodle.errors import ConfigError

                raise ConfigError(f"kinds.process.preload: expected module names, got {mod!r}")
        self.zygote_socket = os.path.join(pool.run_dir, "zygote.sock")
        self._zygote: subprocess.Popen[bytes] | None = None

    # -- supervisor side ----------------------------------------------------

    def setup(self) -> None:
        slots = os.path.join(self.pool.run_dir, "slots")
        os.makedirs(slots, exist_ok=True)
        # the pool's group (executors) may traverse to instance sockets; nobody else
        os.chown(slots, -1, self.pool.gid)
        os.chmod(slots, 0o750)  # noqa: S103 - group is the pool's executors, by design
        self._start_zygote()

    def _start_zygote(self) -> None:
        # by path, not `-m noodle.kinds.zygote`: -m would import the whole
        # noodle package into the template every instance is forked from
        cmd = [
            sys.executable, "-c", _ZYGOTE_BOOT, os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote.py"),
            "--socket", self.zygote_socket,
            "--preload", ",".join(self.options["preload"]),
            "--title", f"noodle zygote {self.pool.name}",
            "--parent", str(os.getpid()),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.stdout.close()
        if line.strip() != b"ready":
            proc.kill()
            proc.wait()
            raise KindUnavailable(
                f"the process kind's zygote did not start (preload {self.options['preload']!r} may not import);"
                " see the error above"
            )
        self._zygote = proc

    def maintain(self) -> None:
        if self._zygote is not None and self._zygote.poll() is not None:
            self._zygote = None
            with contextlib.suppress(KindUnavailable):
                self._start_zygote()

    def teardown(self) -> None:
        if self._zygote is not None:
            self._zygote.terminate()
            try:
                self._zygote.wait(5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()
            self._zygote = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.zygote_socket)

    def helper_pids(self) -> set[int]:
        return {self._zygote.pid} if self._zygote is not None else set()

    # -- worker side ----------------------------------------------------------

    def clean(self, slot: SlotContext) -> None:
        _kill_recorded(slot)
        shutil.rmtree(slot.dir, ignore_errors=True)
        if os.path.exists(slot.dir):
            raise StepFailed(f"could not remove {slot.dir}")

    def prepare(self, slot: SlotContext) -> None:
        os.makedirs(slot.dir, mode=0o750, exist_ok=True)
        uid = self.options["uid"]
        os.chown(slot.dir, -1 if uid is None else uid, self.pool.gid)
        os.chmod(slot.dir, 0o750)  # noqa: S103 - group is the pool's executors, by design

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        # one instance per slot, even if a damaged slot table skipped its clean
        _kill_recorded(slot)
        sock_path = os.path.join(slot.dir, "instance.sock")
        o = self.options
        cwd = o["cwd"].format(slot=slot.slot, dir=slot.dir, pool=slot.pool) if o["cwd"] else None
        req = {
            "op": "fork", "pool": slot.pool, "slot": slot.slot, "dir": slot.dir, "socket": sock_path, "cwd": cwd,
            "uid": o["uid"], "gid": o["gid"], "sock_gid": self.pool.gid,
            "rlimits": {"as": o["rlimit_as"], "nproc": o["rlimit_nproc"], "cpu": o["rlimit_cpu"]},
        }  # fmt: skip
        timeout = float(o["spawn_timeout"])
        reply = _zygote_request(self.zygote_socket, req, timeout)
        pid = reply.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise StepFailed(f"zygote answered without a pid: {reply!r}")
        # Its start time is read here, once the agent on the slot's socket
        # has answered as that pid: the process is alive and ours, so the
        # identity recorded is the instance's, not a reused pid's.
        answered = AgentHandle.checked(sock_path, timeout, pid)
        start = start_time(pid) if answered is not None else None
        if answered is not None:
            answered.close()
        if start is None:
            _kill_recorded(slot)
            raise StepFailed(f"instance pid {pid} did not answer its first ping within {timeout} s, or exited")
        return {"pid": pid, "start": start, "socket": sock_path, "dir": slot.dir}

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        pid, start = descriptor.get("pid"), descriptor.get("start")
        if isinstance(pid, int) and isinstance(start, int):
            _kill_group(pid, start)

    # -- client side ------------------------------------------------------------

    @classmethod
    def client_health_handle(cls, descriptor: Mapping[str, Any], timeout: float) -> tuple[bool, Any]:
        # The agent answering on the slot's socket with the recorded pid is
        # the instance itself (a reused pid cannot answer there), so the two
        # /proc reads of the identity check are not needed on this path.
        pid = descriptor.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return False, None
        handle = AgentHandle.checked(str(descriptor.get("socket", "")), timeout, pid, trust_results=cls.TRUST_RESULTS)
        return handle is not None, handle


# Runs zygote.py as __main__ with sys.path as `-m` would leave it (the
# working directory first, not noodle/kinds, whose modules would shadow
# the instances' own).
_ZYGOTE_BOOT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def _kill_recorded(slot: SlotContext) -> None:
    """Kill the instance the slot's pidfile records, if it still runs."""
    recorded = read_pidfile(os.path.join(slot.dir, "instance.pid"))
    if recorded is not None and recorded.start:
        _kill_group(recorded.pid, recorded.start)


def _zygote_request(path: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            stream = agent.SocketStream(sock)
            agent.write_frame(stream, req)
            reply = agent.read_frame(stream)
    except (OSError, agent.ProtocolError) as exc:
        raise StepFailed(f"zygote at {path} unreachable: {exc}") from None
    if not reply or not reply.get("ok"):
        raise StepFailed(f"zygote refused to fork: {reply!r}")
    return reply


def _kill_group(pid: int, start: int, timeout: float = 5.0) -> None:
    """SIGKILL the instance's process group and wait until the leader is
    gone. The leader's start time guards against a reused pid; while any
    member of the group lives the kernel does not hand its id out again."""
    leader = ProcessIdentity(pid, start)
    # alone when it does not lead a group yet (killed while still warming)
    if not leader.signal(signal.SIGKILL, group=True) and not leader.signal(signal.SIGKILL) and start_time(pid) is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # stragglers of a dead leader
    if not leader.wait_gone(timeout):
        raise StepFailed(f"instance pid {pid} survived SIGKILL for {timeout} s")
