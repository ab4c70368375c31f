"""The in-instance agent: executes work sent by a lease holder.

Stdlib only, on purpose: the same file runs in a warm ``process`` instance,
inside a jail or container with a read-only Python bind-mounted, or as
``python3 agent.py --socket PATH`` anywhere. The wire format is a frame per
message::

    +----------------+----------------------------+
    | u32 big-endian | UTF-8 JSON object          |
    | payload length | (at most MAX_FRAME bytes)  |
    +----------------+----------------------------+

Requests carry ``op``: ``ping``, ``run`` (Python source; the value of a
trailing expression is the result), ``call`` (``"pkg.mod:func"`` with args
and kwargs) and ``exec`` (an argv, returning exit code and output). Each
reply has ``ok``; a failure carries ``error: {type, message, traceback}``.
The instance is single-use, so state kept between calls of one lease (the
``run`` namespace) is fine: the whole process is destroyed on release.
"""

from __future__ import annotations

import _socket
import os
import struct
import sys

# Start-up is the sandbox kinds' spawn-to-ready time, so only what every
# request needs is imported here: ast, subprocess, traceback, io and
# contextlib load on the first request that uses them (the process kind's
# zygote warms them before forking), and typing never loads at run time.
# The json and socket packages are not imported either: through re and
# enum they cost about as much as the interpreter's own start, while their
# C cores (_json, _socket) do the work (see _dumps, _loads, SocketStream).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Stream(Protocol):
        """What frames are read from and written to: a binary file or a SocketStream."""

        def read(self, n: int, /) -> bytes: ...
        def write(self, data: bytes, /) -> int: ...
        def flush(self) -> None: ...

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame was truncated, oversized or not a JSON object."""


def read_frame(rfile: Stream) -> dict[str, Any] | None:
    """Read one frame; None on a clean end of stream."""
    head = _read_exact(rfile, _LEN.size, allow_eof=True)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    body = _read_exact(rfile, size, allow_eof=False)
    assert body is not None
    try:
        msg = _loads(body.decode())
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a JSON object")
    return msg


def write_frame(wfile: Stream, msg: dict[str, Any]) -> None:
    body = _dumps(msg, repr).encode()
    wfile.write(_LEN.pack(len(body)) + body)
    wfile.flush()


def _read_exact(rfile: Stream, n: int, allow_eof: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = rfile.read(n - len(buf))
        if not chunk:
            if allow_eof and not buf:
                return None
            raise ProtocolError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any, default: Any = _not_json) -> str:
    """``json.dumps(value, default=default)``: the same encoder, the same text."""
    try:
        import _json
    except ImportError:  # not CPython: the json package, slower to import
        import json

        return json.dumps(value, default=default)
    # a fresh encoder per call, as json does: its circular-reference marks
    # are left behind when an encode fails half-way
    enc = _json.make_encoder({}, default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return "".join(enc(value, 0))


class _DecoderOptions:
    """What _json's scanner reads from a json.JSONDecoder: the defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_WS = " \t\n\r"


def _loads(text: str) -> Any:
    """``json.loads(text)``; ValueError for anything that is not one JSON value."""
    try:
        import _json
    except ImportError:
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WS))
    try:
        value, end = _json.make_scanner(_DecoderOptions)(text, start)  # type: ignore[arg-type]
    except StopIteration as exc:
        raise ValueError(f"expecting a value at {exc.value}") from None
    if text[end:].strip(_WS):
        raise ValueError(f"extra data at {end}")
    return value


def _jsonable(value: Any) -> Any:
    try:
        _dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _error(exc: BaseException) -> dict[str, Any]:
    import traceback

    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _failure(type_name: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type_name, "message": message, "traceback": ""}}


class Agent:
    """Executes requests; one namespace per instance."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__noodle__"}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "run":
            return self._captured(lambda: self._run(str(req.get("source", ""))))
        if op == "call":
            return self._captured(lambda: self._call(req))
        if op == "exec":
            return self._exec(req)
        return _failure("ProtocolError", f"unknown op {op!r}")

    def _captured(self, fn: Any) -> dict[str, Any]:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                result = fn()
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            return {"ok": False, "stdout": out.getvalue(), "stderr": err.getvalue(), "error": _error(exc)}
        return {"ok": True, "stdout": out.getvalue(), "stderr": err.getvalue(), "result": _jsonable(result)}

    def _run(self, source: str) -> Any:
        import ast

        tree = ast.parse(source, "<noodle>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        exec(compile(tree, "<noodle>", "exec"), self.namespace)  # noqa: S102 - running code is the point
        if last is not None:
            return eval(compile(last, "<noodle>", "eval"), self.namespace)  # noqa: S307
        return None

    def _call(self, req: dict[str, Any]) -> Any:
        target = str(req.get("target", ""))
        mod_name, _, attr = target.partition(":")
        if not mod_name or not attr:
            raise ValueError(f"call target must look like 'pkg.mod:func', got {target!r}")
        __import__(mod_name)
        obj: Any = sys.modules[mod_name]
        for part in attr.split("."):
            obj = getattr(obj, part)
        args = req.get("args") or []
        kwargs = req.get("kwargs") or {}
        return obj(*args, **kwargs)

    def _exec(self, req: dict[str, Any]) -> dict[str, Any]:
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return _failure("ValueError", "argv must be a non-empty list of strings")
        timeout = req.get("timeout")
        import subprocess

        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"ok": False, "error": _error(exc)}
        return {
            "ok": True,
            "returncode": proc.returncode,
            "stdout": proc.stdout.decode(errors="replace"),
            "stderr": proc.stderr.decode(errors="replace"),
        }


def serve_stream(rfile: Stream, wfile: Stream, agent: Agent | None = None) -> None:
    """Serve requests until the peer closes the stream."""
    agent = agent or Agent()
    while True:
        try:
            req = read_frame(rfile)
        except ProtocolError as exc:
            try:
                write_frame(wfile, _failure("ProtocolError", str(exc)))
            except OSError:
                pass
            return
        if req is None:
            return
        write_frame(wfile, agent.handle(req))


class SocketStream:
    """The file interface of read_frame/write_frame straight on a socket:
    one sendall per frame, reads through a small buffer (a frame's length
    and body usually arrive in one recv), no makefile objects."""

    __slots__ = ("_buf", "sock")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def read(self, n: int) -> bytes:
        buf = self._buf
        if not buf:
            buf = self.sock.recv(max(n, 65536))
            if len(buf) <= n:
                return buf
        self._buf = buf[n:]
        return buf[:n]

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


def serve_socket(listener: _socket.socket) -> None:
    """Serve one connection at a time until killed: the instance is single-use,
    but a lease holder may reconnect (a health check, then the work)."""
    agent = Agent()
    while True:
        fd, _ = listener._accept()  # type: ignore[attr-defined]  # socket.socket.accept's core
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
        stream = SocketStream(conn)
        try:
            serve_stream(stream, stream, agent)
        except OSError:
            pass
        finally:
            conn.close()


def listen_unix(path: str) -> _socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.bind(path)
    # gVisor refuses chmod on a socket; the host side sets the mode then
    try:
        os.chmod(path, 0o660)
    except OSError:
        pass
    sock.listen(8)
    return sock


def _quick_args(argv: list[str]) -> dict[str, str] | None:
    """The launchers' own argv (``--socket P [--ready-fd N]`` or
    ``--stdio``) without argparse, which would add milliseconds to every
    sandbox start; None for anything else, which argparse then explains."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        key = argv[i]
        if key == "--stdio" and key not in out:
            out[key] = ""
            i += 1
        elif key in ("--socket", "--ready-fd") and key not in out and i + 1 < len(argv):
            out[key] = argv[i + 1]
            i += 2
        else:
            return None
    if "--ready-fd" in out and not out["--ready-fd"].isdigit():
        return None
    return out if ("--stdio" in out) != ("--socket" in out) else None


def main(argv: list[str] | None = None) -> int:
    args = _quick_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        import argparse

        parser = argparse.ArgumentParser(description="pool-noodle in-instance agent")
        parser.add_argument("--socket", help="Unix socket path to listen on")
        parser.add_argument("--stdio", action="store_true", help="serve one stream on stdin/stdout")
        parser.add_argument("--ready-fd", type=int, help="write one byte to this fd once listening")
        parsed = parser.parse_args(argv)
        if not parsed.socket and not parsed.stdio:
            parser.error("--socket or --stdio is required")
        parser.error("give either --socket (with an optional --ready-fd) or --stdio")
    if "--stdio" in args:
        serve_stream(sys.stdin.buffer, sys.stdout.buffer)
        return 0
    listener = listen_unix(args["--socket"])
    if "--ready-fd" in args:
        ready_fd = int(args["--ready-fd"])
        os.write(ready_fd, b"R")
        os.close(ready_fd)
    serve_socket(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
