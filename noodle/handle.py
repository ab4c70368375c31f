"""Client side of the agent protocol (see ``noodle.agent`` for the frames).

``AgentHandle`` is what ``lease.instance`` is for every kind whose instance
runs the agent: ``run(source)``, ``call("pkg.mod:func", ...)``,
``exec(argv)`` and ``ping()``, each with a timeout.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from noodle.agent import ProtocolError, SocketStream, read_frame, write_frame
from noodle.errors import InstanceError, InstanceGone, InstanceTimeout


@dataclass(frozen=True)
class RunResult:
    """What ``run`` and ``call`` return: the value and the captured output."""

    result: Any
    stdout: str
    stderr: str


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


class AgentHandle:
    """A connection to one instance's agent over a Unix socket."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._io: SocketStream | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<AgentHandle {self.socket_path}>"

    def _connect(self, timeout: float) -> socket.socket:
        if self._closed:
            raise InstanceGone("the lease was released; its instance is gone")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.socket_path)
            except TimeoutError:
                sock.close()
                raise InstanceTimeout(f"connecting to {self.socket_path} timed out") from None
            except OSError as exc:
                sock.close()
                raise InstanceGone(f"cannot reach instance at {self.socket_path}: {exc}") from None
            self._sock = sock
        return self._sock

    def request(self, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its reply; the connection is dropped
        after a timeout or error so a late reply is never read as the next."""
        limit = self.timeout if timeout is None else timeout
        sock = self._connect(limit)
        conn = self._io
        if conn is None or conn.sock is not sock:
            conn = self._io = SocketStream(sock)
        try:
            sock.settimeout(limit)
            write_frame(conn, req)
            reply = read_frame(conn)
        except TimeoutError:
            self._drop()
            raise InstanceTimeout(f"instance did not answer {req.get('op')!r} within {limit} s") from None
        except (OSError, ProtocolError) as exc:
            self._drop()
            raise InstanceGone(f"instance connection broke: {exc}") from None
        if reply is None:
            self._drop()
            raise InstanceGone("instance closed the connection")
        return reply

    def _checked(self, reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise InstanceError(
                f"{err.get('type', 'Error')}: {err.get('message', '')}",
                remote_type=str(err.get("type", "")),
                remote_traceback=str(err.get("traceback", "")),
            )
        return reply

    @classmethod
    def checked(cls, socket_path: str, timeout: float, pid: int | None = None) -> AgentHandle | None:
        """A handle whose connection just answered a ping (from ``pid``, if
        given, as the agent reports it), kept open for the lease's calls:
        the health check on get and the first call share one connect.
        None, closed, if the agent did not answer so."""
        handle = cls(socket_path)
        try:
            reply = handle.request({"op": "ping"}, timeout)
        except (InstanceGone, InstanceTimeout):
            reply = {}
        if reply.get("ok") and (pid is None or reply.get("pid") == pid):
            return handle
        handle.close()
        return None

    @classmethod
    def probe(cls, socket_path: str, timeout: float) -> bool:
        """One ping on a fresh connection, always closed: agents serve one
        connection at a time, so a kept-open one would block the holder."""
        handle = cls(socket_path, timeout=timeout)
        try:
            return handle.ping(timeout)
        finally:
            handle.close()

    def ping(self, timeout: float | None = None) -> bool:
        try:
            return bool(self.request({"op": "ping"}, timeout).get("ok"))
        except (InstanceGone, InstanceTimeout):
            return False

    def run(self, source: str, timeout: float | None = None) -> RunResult:
        """Execute Python source; the value of a trailing expression is returned."""
        reply = self._checked(self.request({"op": "run", "source": source}, timeout))
        return RunResult(reply.get("result"), str(reply.get("stdout", "")), str(reply.get("stderr", "")))

    def call(self, target: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``"pkg.mod:func"`` inside the instance and return its value."""
        req = {"op": "call", "target": target, "args": list(args), "kwargs": kwargs}
        return self._checked(self.request(req, timeout)).get("result")

    def exec(self, argv: list[str], timeout: float | None = None) -> ExecResult:
        """Run a program inside the instance; returns exit code and output."""
        req: dict[str, Any] = {"op": "exec", "argv": list(argv)}
        if timeout is not None:
            req["timeout"] = timeout
        reply = self._checked(self.request(req, None if timeout is None else timeout + 5.0))
        return ExecResult(int(reply["returncode"]), str(reply["stdout"]), str(reply["stderr"]))

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self._io = None

    def close(self) -> None:
        self._drop()
        self._closed = True

