"""Client side of the agent protocol (see ``noodle.agent`` for the frames).

``AgentHandle`` is what ``lease.instance`` is for every kind whose instance
runs the agent: ``run(source)``, ``call("pkg.mod:func", ...)``,
``exec(argv)``, ``task(payload)`` and ``ping()``, each with a timeout, and
``arun``/``acall``/``aexec``/``atask`` for asyncio (``noodle.aio``).

Results of ``run`` and ``call`` keep their types through ``noodle.codec``:
plain data from an instance the handle does not trust (``trust_results``
False, the default for isolating kinds), pickles from one it does (the
``process`` kind). A failure raises InstanceError carrying the remote
traceback and the output printed before it.
"""

from __future__ import annotations

import base64
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from noodle.agent import ProtocolError, read_frame, write_frame
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

    def __init__(self, socket_path: str, timeout: float = 30.0, trust_results: bool = False) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.trust_results = trust_results
        self._sock: socket.socket | None = None
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
        sock.settimeout(limit)
        try:
            with sock.makefile("wb") as wfile:
                write_frame(wfile, req)
            with sock.makefile("rb") as rfile:
                reply = read_frame(rfile)
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
                stdout=str(reply.get("stdout", "")),
                stderr=str(reply.get("stderr", "")),
            )
        return reply

    def _results_request(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.trust_results:
            req["results"] = "pickle"
        return req

    def _run_result(self, reply: dict[str, Any]) -> RunResult:
        """Decode a run/call reply's result payload; raise its failure."""
        from noodle import codec

        outcome = codec.decode_outcome(_payload(self._checked(reply)), trust=self.trust_results)
        if not outcome.ok:
            err = outcome.error
            qual = err["name"] if err["module"] in ("builtins", "noodle.errors") else f"{err['module']}.{err['name']}"
            raise InstanceError(
                f"{qual}: {err['message']}",
                remote_type=err["name"],
                remote_traceback=err["traceback"],
                stdout=outcome.stdout,
                stderr=outcome.stderr,
            )
        return RunResult(outcome.value, outcome.stdout, outcome.stderr)

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
        return self._run_result(self.request(self._results_request({"op": "run", "source": source}), timeout))

    def call(self, target: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``"pkg.mod:func"`` inside the instance and return its value
        (arguments travel as JSON)."""
        req = {"op": "call", "target": target, "args": list(args), "kwargs": kwargs}
        return self._run_result(self.request(self._results_request(req), timeout)).result

    def task(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Run a task payload (``noodle.codec.encode_task``) and return its
        result payload undecoded (``noodle.codec.decode_result``)."""
        req = {"op": "task", "payload": base64.b64encode(payload).decode()}
        return _payload(self._checked(self.request(req, timeout)))

    async def arun(self, source: str, timeout: float | None = None) -> RunResult:
        """``run`` over asyncio streams."""
        from noodle import aio

        req = self._results_request({"op": "run", "source": source})
        return self._run_result(await aio.request(self, req, timeout))

    async def acall(self, target: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """``call`` over asyncio streams."""
        from noodle import aio

        req = self._results_request({"op": "call", "target": target, "args": list(args), "kwargs": kwargs})
        return self._run_result(await aio.request(self, req, timeout)).result

    async def aexec(self, argv: list[str], timeout: float | None = None) -> ExecResult:
        """``exec`` over asyncio streams."""
        from noodle import aio

        req: dict[str, Any] = {"op": "exec", "argv": list(argv)}
        if timeout is not None:
            req["timeout"] = timeout
        reply = self._checked(await aio.request(self, req, None if timeout is None else timeout + 5.0))
        return ExecResult(int(reply["returncode"]), str(reply["stdout"]), str(reply["stderr"]))

    async def atask(self, payload: bytes, timeout: float | None = None) -> bytes:
        """``task`` over asyncio streams."""
        from noodle import aio

        req = {"op": "task", "payload": base64.b64encode(payload).decode()}
        return _payload(self._checked(await aio.request(self, req, timeout)))

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

    def close(self) -> None:
        self._drop()
        self._closed = True


def _payload(reply: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(str(reply["payload"]), validate=True)
    except (KeyError, ValueError) as exc:
        raise InstanceGone(f"instance sent a reply without a valid payload: {exc}") from None
