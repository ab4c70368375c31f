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
and kwargs), ``task`` (a task payload from ``noodle.codec.encode_task``) and
``exec`` (an argv, returning exit code and output). Each reply has ``ok``; a
request the agent could not serve carries ``error: {type, message,
traceback}``. ``run``, ``call`` and ``task`` answer ``{"ok": true,
"payload": base64}``: a result payload (``noodle.codec`` documents it) that
holds the value or the exception and the captured output, encoded as plain
data, or pickled when the request says ``"results": "pickle"`` (the caller
trusts this instance). The encoding half of the codec lives here because
this file must run alone inside sandboxes; ``noodle.codec`` decodes.

Output of ``run``, ``call``, ``task`` and ``exec`` is kept up to
``OUTPUT_CAP`` characters per stream; the rest is dropped inside the
instance and a marker line says how much. A result payload larger than
``RESULT_CAP`` bytes is replaced by an error.

The instance is single-use, so state kept between calls of one lease (the
``run`` namespace) is fine: the whole process is destroyed on release.
"""

from __future__ import annotations

import _socket
import io  # loaded by the interpreter's own start-up anyway (sys.stdout)
import os
import struct
import sys

# Start-up is the sandbox kinds' spawn-to-ready time, so only what every
# request needs is imported here: ast, subprocess, traceback, pickle and
# base64 load on the first request that uses them (the process kind's
# zygote warms them before forking), and typing never loads at run time.
# The json and socket packages are not imported either: through re and
# enum they cost about as much as the interpreter's own start, while their
# C cores (_json, _socket) do the work (see _dumps, _loads, SocketStream).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    class Stream(Protocol):
        """What frames are read from and written to: a binary file or a SocketStream."""

        def read(self, n: int, /) -> bytes: ...
        def write(self, data: bytes, /) -> int: ...
        def flush(self) -> None: ...

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")
# frames of modules that set this are cut from the front of remote tracebacks
__noodle_internal__ = True

OUTPUT_CAP = 1 << 20  # characters kept per stream (stdout, stderr) of one request
RESULT_CAP = 32 << 20  # bytes of one encoded result payload (base64 must fit MAX_FRAME)
TASK_MAGIC = b"NTK1"
RESULT_MAGIC = b"NRS1"
PLAIN = b"S"  # plain-data encoding: decodable without running any code
PICKLED = b"P"  # pickle: only for a caller that trusts the instance
MAX_DEPTH = 200
_SEQ_TAGS: dict[type, bytes] = {list: b"l", tuple: b"t", set: b"e", frozenset: b"z"}
_DATETIME_TAGS = {"datetime": b"D", "date": b"a", "time": b"m", "timedelta": b"r"}
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_C128 = struct.Struct(">dd")


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
    wfile.write(frame(_dumps(msg, repr).encode()))
    wfile.flush()


def frame(body: bytes) -> bytes:
    """A JSON body with its length prefix: one frame on the wire."""
    return _LEN.pack(len(body)) + body


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


class NotPlain(TypeError):
    """A value is not plain data (see ``dumps_plain``)."""


def dumps_plain(value: Any) -> bytes:
    """Encode plain data: None, bool, int, float, complex, str, bytes, list,
    tuple, dict, set, frozenset, datetime.datetime/date/time/timedelta and
    nestings of these (exact types only: a subclass may carry code). Anything
    else raises NotPlain naming the type and where it sits."""
    out: list[bytes] = []
    _put(value, out, 0, "result")
    return b"".join(out)


def _put(v: Any, out: list[bytes], depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise NotPlain(f"{where}: nested deeper than {MAX_DEPTH} levels (or cyclic)")
    t = type(v)
    if v is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if v else b"F")
    elif t is int:
        out.append(b"i")
        _put_bytes(v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True), out)
    elif t is float:
        out.append(b"f" + _F64.pack(v))
    elif t is complex:
        out.append(b"c" + _C128.pack(v.real, v.imag))
    elif t is str:
        out.append(b"s")
        _put_bytes(v.encode("utf-8", "surrogatepass"), out)
    elif t is bytes:
        out.append(b"b")
        _put_bytes(v, out)
    elif t is list or t is tuple or t is set or t is frozenset:
        out.append(_SEQ_TAGS[t] + _U32.pack(len(v)))
        for i, item in enumerate(v):
            _put(item, out, depth + 1, f"{where}[{i}]" if t in (list, tuple) else f"{where} item")
    elif t is dict:
        out.append(b"d" + _U32.pack(len(v)))
        for key, item in v.items():
            _put(key, out, depth + 1, f"{where} key")
            _put(item, out, depth + 1, f"{where}[{key!r:.40}]")
    elif t.__module__ == "datetime":
        _put_datetime(v, out, where)
    else:
        raise NotPlain(f"{where} is a {t.__module__}.{t.__qualname__}, not plain data")


def _put_datetime(v: Any, out: list[bytes], where: str) -> None:
    import datetime  # only when a result holds one: the agent's start-up stays lean

    t = type(v)
    if t is datetime.date:
        fields = [v.year, v.month, v.day]
    elif t is datetime.datetime or t is datetime.time:
        fields = [v.year, v.month, v.day] if t is datetime.datetime else []
        fields += [v.hour, v.minute, v.second, v.microsecond, v.fold]
        if v.tzinfo is not None:
            offset = v.utcoffset()
            if offset is None:
                raise NotPlain(f"{where}: a {t.__name__} with tzinfo {v.tzinfo!r} has no fixed offset")
            fields += [offset.days, offset.seconds, offset.microseconds]
    elif t is datetime.timedelta:
        fields = [v.days, v.seconds, v.microseconds]
    else:
        raise NotPlain(f"{where} is a {t.__module__}.{t.__qualname__}, not plain data")
    out.append(_DATETIME_TAGS[t.__name__])
    _put_bytes(" ".join(map(str, fields)).encode(), out)


def _put_bytes(b: bytes, out: list[bytes]) -> None:
    out.append(_U32.pack(len(b)))
    out.append(b)


class _CappedText(io.TextIOBase):
    """A text stream keeping the first ``cap`` characters and counting the rest."""

    def __init__(self, cap: int) -> None:
        self._parts: list[str] = []
        self._room = cap
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        s = str(s)
        if self._room > 0:
            kept = s[: self._room]
            self._parts.append(kept)
            self._room -= len(kept)
            self.dropped += len(s) - len(kept)
        else:
            self.dropped += len(s)
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self.dropped:
            text += f"\n[noodle: output truncated inside the instance: {self.dropped} more characters dropped]\n"
        return text


def _truncated(data: bytes, cap: int) -> str:
    text = data.decode(errors="replace")
    if len(text) <= cap:
        return text
    return text[:cap] + f"\n[noodle: output truncated inside the instance: {len(text) - cap} more characters dropped]\n"


def remote_traceback(exc: BaseException) -> str:
    """The exception's traceback without the agent's and codec's own frames."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__noodle_internal__"):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def describe_error(exc: BaseException) -> dict[str, Any]:
    """What crosses for an exception in plain form: its class by name, plain
    args (or its message), message and traceback text."""
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        message = f"<unprintable {cls.__qualname__}>"
    args: list[Any] = list(exc.args)
    try:
        dumps_plain(args)
    except (NotPlain, RecursionError):
        args = [message]
    return {
        "module": cls.__module__,
        "name": cls.__qualname__,
        "args": args,
        "message": message,
        "traceback": remote_traceback(exc),
    }


def _unsafe_error(detail: str) -> dict[str, Any]:
    message = (
        f"{detail}; an instance returns only None, bool, int, float, complex, str, bytes, list, tuple,"
        " dict, set, frozenset, datetime values and nestings of these, unless the caller trusts it"
        " (trust_results=True, which unpickles)"
    )
    return {"module": "noodle.errors", "name": "UnsafeResult", "args": [message], "message": message, "traceback": ""}


def encode_outcome(ok: bool, value: Any, exc: BaseException | None, stdout: str, stderr: str, pickled: bool) -> bytes:
    """A result payload: RESULT_MAGIC, the encoding byte, then the record
    ``{ok, value | error, stdout, stderr}`` (pickled: plus ``exception``)."""
    record: dict[str, Any] = {"ok": ok, "stdout": stdout, "stderr": stderr}
    if ok:
        record["value"] = value
    else:
        assert exc is not None
        record["error"] = describe_error(exc)
    if pickled:
        if exc is not None:
            record["exception"] = exc
        body = _pickle_record(record)
        tag = PICKLED
    else:
        try:
            body = dumps_plain(record)
        except (NotPlain, RecursionError) as e:
            detail = str(e).replace("result['value']", "the result", 1)
            record = {"ok": False, "error": _unsafe_error(detail), "stdout": stdout, "stderr": stderr}
            body = dumps_plain(record)
        tag = PLAIN
    if len(body) > RESULT_CAP:
        detail = f"the result payload is {len(body)} bytes, over the agent's RESULT_CAP of {RESULT_CAP}"
        error = {"module": "builtins", "name": "ValueError", "args": [detail], "message": detail, "traceback": ""}
        return RESULT_MAGIC + PLAIN + dumps_plain({"ok": False, "error": error, "stdout": stdout, "stderr": stderr})
    return RESULT_MAGIC + tag + body


def _pickle_record(record: dict[str, Any]) -> bytes:
    import pickle

    try:
        return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - any object may refuse pickling, in any way
        if "exception" in record:
            record.pop("exception")  # its class or args do not pickle: the plain description stays
            return _pickle_record(record)
        detail = f"the result could not be pickled: {type(e).__name__}: {e}"
        error = {"module": "builtins", "name": "TypeError", "args": [detail], "message": detail, "traceback": ""}
        return pickle.dumps({**record, "ok": False, "value": None, "error": error})


def run_captured(fn: Callable[[], Any], pickled: bool, output_cap: int = OUTPUT_CAP) -> bytes:
    """Call ``fn`` with its output captured; the outcome as a result payload.
    Never raises: whatever ``fn`` raises is the payload's error."""
    out, err = _CappedText(output_cap), _CappedText(output_cap)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err  # what contextlib.redirect_* do, without importing it
    try:
        value = fn()
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        sys.stdout, sys.stderr = saved
        return encode_outcome(False, None, exc, out.getvalue(), err.getvalue(), pickled)
    sys.stdout, sys.stderr = saved
    return encode_outcome(True, value, None, out.getvalue(), err.getvalue(), pickled)


def run_task(payload: bytes, output_cap: int = OUTPUT_CAP) -> bytes:
    """Run a task payload (TASK_MAGIC, the result mode byte, pickled
    ``(fn, args, kwargs)``) and return its result payload. Never raises."""
    pickled = payload[len(TASK_MAGIC) : len(TASK_MAGIC) + 1] == PICKLED

    def call() -> Any:
        import pickle

        if not payload.startswith(TASK_MAGIC) or payload[len(TASK_MAGIC) : len(TASK_MAGIC) + 1] not in (PLAIN, PICKLED):
            raise ValueError("not a task payload (bad magic or result mode)")
        fn, args, kwargs = pickle.loads(payload[len(TASK_MAGIC) + 1 :])  # noqa: S301 - the caller is trusted in here
        return fn(*args, **kwargs)

    return run_captured(call, pickled, output_cap)


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": remote_traceback(exc),
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
        import base64

        if op in ("run", "call"):
            pickled = req.get("results") == "pickle"
            if op == "run":
                payload = run_captured(lambda: self._run(str(req.get("source", ""))), pickled)
            else:
                payload = run_captured(lambda: self._call(req), pickled)
            return {"ok": True, "payload": base64.b64encode(payload).decode()}
        if op == "task":
            try:
                task = base64.b64decode(str(req.get("payload", "")), validate=True)
            except ValueError as exc:
                return _failure("ProtocolError", f"task payload is not base64: {exc}")
            return {"ok": True, "payload": base64.b64encode(run_task(task)).decode()}
        if op == "exec":
            return self._exec(req)
        return _failure("ProtocolError", f"unknown op {op!r}")

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
            "stdout": _truncated(proc.stdout, OUTPUT_CAP),
            "stderr": _truncated(proc.stderr, OUTPUT_CAP),
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


def _warm_up() -> None:
    """Import what tasks unpickle with (cloudpickle, staged next to this
    file in sandboxes) in the background once ready: the instance sits warm
    in the pool meanwhile, off every task's path, and a task that comes
    sooner waits on the import lock instead of importing a second time.

    The thread is started with _thread, not threading, whose import would
    delay the first connection (the spawn step's ping) by milliseconds. And
    while it imports it hands the GIL over at a short interval, so that the
    main thread, woken by that ping, answers it at once rather than after a
    whole default switch interval (5 ms) behind every import."""
    import _thread

    def imports() -> None:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(_WARM_UP_SWITCH_S)
        try:
            import base64  # noqa: F401
            import pickle  # noqa: F401

            import cloudpickle  # type: ignore[import-untyped]  # noqa: F401
        except Exception:  # noqa: BLE001 - a task that needs it reports the failure itself
            pass
        finally:
            sys.setswitchinterval(interval)

    _thread.start_new_thread(imports, ())


_WARM_UP_SWITCH_S = 0.0002


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
    # run as a script (in sandboxes, often with -I): modules staged next to
    # this file (cloudpickle, for tasks) must import
    here = os.path.dirname(os.path.abspath(__file__))
    if not __package__ and here not in sys.path:
        sys.path.append(here)
    if "--stdio" in args:
        serve_stream(sys.stdin.buffer, sys.stdout.buffer)
        return 0
    listener = listen_unix(args["--socket"])
    if "--ready-fd" in args:
        ready_fd = int(args["--ready-fd"])
        os.write(ready_fd, b"R")
        os.close(ready_fd)
    _warm_up()
    serve_socket(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
