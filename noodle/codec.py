"""Task and result payloads: what goes into an instance and what comes out.

The two directions have different trust:

* **Into an instance** the caller is the trusted party: a *task* is the
  function and its arguments pickled with cloudpickle, so lambdas, closures
  and functions of ``__main__`` travel by value. The instance unpickles it.
* **Out of an instance** nothing is trusted when the kind isolates (``jail``,
  ``oci``, ``microvm``): code in there may be hostile and may forge every
  byte it sends. A *result* is therefore decoded as plain data by default,
  with a decoder that builds only None, bool, int, float, complex, str,
  bytes, list, tuple, dict, set, frozenset and ``datetime`` values (datetime,
  date, time with a fixed offset, timedelta) and never imports, calls or
  unpickles anything. Pickled results are decoded only when the caller says
  it trusts the instance (``trust=True``); the ``process`` kind, which
  isolates nothing, shares the caller's trust and uses pickle by default.

Payloads (bytes; the agent carries them base64-encoded in its JSON frames)::

    task:    b"NTK1" | mode | cloudpickle((fn, args, kwargs))
             mode b"S": return plain data; b"P": return a pickle
    result:  b"NRS1" | encoding | record
             encoding b"S": the plain encoding below; b"P": a pickle
    record:  {"ok": bool, "value": any (when ok), "error": {...} (when not),
              "stdout": str, "stderr": str}
             error = {"module", "name" (qualified), "args" (plain),
                      "message", "traceback" (agent frames cut)}
             a pickled record also carries "exception": the exception itself

The plain encoding is a tag byte per value; lengths and counts are u32
big-endian: ``N`` None, ``T``/``F`` bools, ``i`` len + two's-complement
big-endian int, ``f`` IEEE double, ``c`` two doubles, ``s`` len + UTF-8
(surrogates passed), ``b`` len + bytes, ``l``/``t``/``e``/``z`` count +
items (list, tuple, set, frozenset), ``d`` count + key, value pairs, and
for ``datetime`` values len + ASCII integers separated by spaces: ``a``
"Y M D" (date), ``m`` "h m s us fold [offset]" (time), ``D`` "Y M D h m s
us fold [offset]" (datetime), ``r`` "days seconds us" (timedelta), where
offset is the UTC offset as "days seconds us" (a zone is sent as its
offset at that moment). Nesting is limited to ``MAX_DEPTH``.

Output printed by the task is captured up to ``OUTPUT_CAP`` characters per
stream inside the instance (a marker line says how much was dropped), and a
result payload is at most ``RESULT_CAP`` bytes.

Functions, all pure (no pool needed), kept stable for other transports::

    encode_task(fn, args, kwargs, pickle_results=False) -> bytes   caller
    run_task(payload) -> bytes                         inside the instance (never raises)
    AgentHandle.task(payload, timeout) -> bytes        the same, through an instance's agent
    decode_result(payload, trust=False) -> value       caller; raises the task's exception
    decode_outcome(payload, trust=False) -> Outcome    caller; value or error, and the output
    dumps_plain(value) -> bytes / loads_plain(data)    the plain encoding alone

A task's exception is rebuilt with its own class when that class is a
builtin exception or already imported in the caller (looked up in
``sys.modules``, never imported); from plain data it is made without
running its ``__init__``. Otherwise, and for exceptions that are not
``Exception`` subclasses (SystemExit, KeyboardInterrupt: an untrusted
instance must not be able to stop the caller), it arrives as
``InstanceError``. Either
way the remote traceback is attached as ``__cause__`` (a ``RemoteTraceback``),
with the output printed before the exception.
"""

from __future__ import annotations

import builtins
import datetime
import os
import pickle
import shutil
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from noodle.agent import (
    MAX_DEPTH,
    OUTPUT_CAP,
    PICKLED,
    PLAIN,
    RESULT_CAP,
    RESULT_MAGIC,
    TASK_MAGIC,
    NotPlain,
    dumps_plain,
    run_task,
)
from noodle.errors import BadPayload, InstanceError, UnsafeResult

__all__ = [
    "MAX_DEPTH",
    "OUTPUT_CAP",
    "RESULT_CAP",
    "NotPlain",
    "Outcome",
    "RemoteTraceback",
    "decode_outcome",
    "decode_result",
    "dumps_plain",
    "encode_task",
    "instance_library",
    "loads_plain",
    "run_task",
    "stage_instance_library",
]

_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_C128 = struct.Struct(">dd")
_SEQ = {ord("l"): list, ord("t"): tuple, ord("e"): set, ord("z"): frozenset}


# -- the caller: tasks in --------------------------------------------------------------


def encode_task(
    fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *, pickle_results: bool = False
) -> bytes:
    """A task payload for ``fn(*args, **kwargs)``. ``pickle_results`` asks
    the instance to pickle its result (decode it with ``trust=True`` only)."""
    import cloudpickle  # type: ignore[import-untyped]  # the caller's side only; the instance needs it just for by-value functions

    if not callable(fn):
        raise TypeError(f"a task needs a callable, got {type(fn).__name__}")
    try:
        body: bytes = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"cannot pickle the task {fn!r:.80}: {type(exc).__name__}: {exc}") from exc
    return TASK_MAGIC + (PICKLED if pickle_results else PLAIN) + body


# -- the caller: results out -------------------------------------------------------------


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of an exception raised inside an instance:
    the remote traceback, and the output printed before it."""

    def __init__(self, traceback: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(traceback)
        self.traceback = traceback
        self.stdout = stdout
        self.stderr = stderr

    def __str__(self) -> str:
        text = f'\n"""\n{self.traceback.rstrip()}\n"""'
        for name, out in (("stdout", self.stdout), ("stderr", self.stderr)):
            if out:
                text += f"\n{name} before the exception:\n{out.rstrip()[-2000:]}"
        return text


@dataclass
class Outcome:
    """A decoded result payload."""

    ok: bool
    value: Any = None
    error: dict[str, Any] = field(default_factory=dict)  # the plain description
    exception: BaseException | None = None  # ready to raise (when not ok)
    stdout: str = ""
    stderr: str = ""


def decode_result(payload: bytes, *, trust: bool = False) -> Any:
    """The task's value, or raise its exception (rebuilt, traceback attached)."""
    outcome = decode_outcome(payload, trust=trust)
    if not outcome.ok:
        assert outcome.exception is not None
        raise outcome.exception
    return outcome.value


def decode_outcome(payload: bytes, *, trust: bool = False) -> Outcome:
    """Decode a result payload. Without ``trust`` a pickle is refused with
    UnsafeResult, never opened; malformed bytes raise BadPayload."""
    data = bytes(payload)
    if not data.startswith(RESULT_MAGIC) or len(data) < len(RESULT_MAGIC) + 1:
        raise BadPayload(f"not a result payload (starts {data[:8]!r})")
    encoding, body = data[len(RESULT_MAGIC) : len(RESULT_MAGIC) + 1], data[len(RESULT_MAGIC) + 1 :]
    if encoding == PICKLED:
        if not trust:
            raise UnsafeResult(
                "the instance sent a pickled result and it was not opened: unpickling runs whatever code"
                " the pickle names, and this caller does not trust the instance (results from isolating"
                " kinds are plain data; pass trust_results=True only for instances you trust)"
            )
        record = pickle.loads(body)  # noqa: S301 - the caller said it trusts this instance
    elif encoding == PLAIN:
        record = loads_plain(body)
    else:
        raise BadPayload(f"unknown result encoding {encoding!r}")
    return _outcome(record, trust)


def _outcome(record: Any, trust: bool) -> Outcome:
    if not isinstance(record, dict) or not isinstance(record.get("ok"), bool):
        raise BadPayload("result record is not a dict with a boolean 'ok'")
    stdout, stderr = record.get("stdout", ""), record.get("stderr", "")
    if not isinstance(stdout, str) or not isinstance(stderr, str):
        raise BadPayload("result record's stdout/stderr are not text")
    if record["ok"]:
        return Outcome(True, record.get("value"), stdout=stdout, stderr=stderr)
    error = record.get("error")
    if not isinstance(error, dict):
        raise BadPayload("failed result record has no error description")
    error = {k: error.get(k) for k in ("module", "name", "args", "message", "traceback")}
    for key in ("module", "name", "message", "traceback"):
        if not isinstance(error[key], str):
            error[key] = str(error[key] or "")
    if not isinstance(error["args"], list):
        error["args"] = [error["message"]]
    exc = record.get("exception") if trust else None
    if not isinstance(exc, BaseException):
        exc = _rebuild(error, stdout, stderr)
    exc.__cause__ = RemoteTraceback(error["traceback"], stdout, stderr)
    return Outcome(False, error=error, exception=exc, stdout=stdout, stderr=stderr)


def _rebuild(error: dict[str, Any], stdout: str, stderr: str) -> BaseException:
    """The exception of its own class if the caller knows that class, made
    from the plain args without running any of its Python code (no
    ``__init__``; a class with its own ``__new__`` is not rebuilt); else
    InstanceError."""
    cls = _known_exception(error["module"], error["name"])
    if cls is not None and not issubclass(cls, Exception):
        cls = None  # SystemExit, KeyboardInterrupt, ...: a sandbox must not stop the caller with them
    if cls is not None and not any("__new__" in vars(k) for k in cls.__mro__ if k.__module__ != "builtins"):
        try:
            exc = cls.__new__(cls, *error["args"])
            exc.args = tuple(error["args"])
            return exc
        except Exception:  # noqa: BLE001 - any failure means: not rebuildable, fall through
            pass
    qual = error["name"] if error["module"] == "builtins" else f"{error['module']}.{error['name']}"
    return InstanceError(
        f"{qual}: {error['message']}",
        remote_type=error["name"],
        remote_traceback=error["traceback"],
        stdout=stdout,
        stderr=stderr,
    )


def _known_exception(module: str, qualname: str) -> type[BaseException] | None:
    """Look the class up in modules already imported, through module and
    class dicts only (no import, no ``__getattr__`` hook runs)."""
    mod = builtins if module == "builtins" else sys.modules.get(module)
    if mod is None:
        return None
    obj: Any = mod
    for part in qualname.split("."):
        try:
            obj = vars(obj).get(part)
        except TypeError:
            return None
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


# -- the plain decoder -------------------------------------------------------------------


def loads_plain(data: bytes) -> Any:
    """Decode ``dumps_plain`` output. Builds only plain values; anything
    malformed (unknown tag, bad length, trailing bytes, unhashable key,
    nesting past MAX_DEPTH) raises BadPayload."""
    buf = memoryview(bytes(data))
    try:
        value, pos = _get(buf, 0, 0)
    except (IndexError, struct.error, UnicodeDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise BadPayload(f"malformed plain payload: {type(exc).__name__}: {exc}") from None
    if pos != len(buf):
        raise BadPayload(f"malformed plain payload: {len(buf) - pos} trailing bytes")
    return value


def _get(buf: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    tag = buf[pos]
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x69:  # i
        raw, pos = _bytes(buf, pos)
        return int.from_bytes(raw, "big", signed=True), pos
    if tag == 0x66:  # f
        return _F64.unpack_from(buf, pos)[0], pos + _F64.size
    if tag == 0x63:  # c
        re_, im = _C128.unpack_from(buf, pos)
        return complex(re_, im), pos + _C128.size
    if tag == 0x73:  # s
        raw, pos = _bytes(buf, pos)
        return raw.decode("utf-8", "surrogatepass"), pos
    if tag == 0x62:  # b
        return _bytes(buf, pos)
    if tag in _SEQ:
        count, pos = _count(buf, pos)
        items = []
        for _ in range(count):
            item, pos = _get(buf, pos, depth + 1)
            items.append(item)
        return _SEQ[tag](items), pos
    if tag == 0x64:  # d
        count, pos = _count(buf, pos)
        out: dict[Any, Any] = {}
        for _ in range(count):
            key, pos = _get(buf, pos, depth + 1)
            out[key], pos = _get(buf, pos, depth + 1)
        return out, pos
    if tag in (0x44, 0x61, 0x6D, 0x72):  # D a m r
        raw, pos = _bytes(buf, pos)
        return _datetime(tag, [int(x) for x in raw.decode("ascii").split()]), pos
    raise ValueError(f"unknown tag {tag:#x} at byte {pos - 1}")


def _datetime(tag: int, f: list[int]) -> Any:
    """Build a datetime value from its integer fields (see the module docstring)."""
    if tag == 0x61:  # a
        (year, month, day) = f
        return datetime.date(year, month, day)
    if tag == 0x72:  # r
        (days, seconds, micros) = f
        return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
    head, rest = (f[:3], f[3:]) if tag == 0x44 else ([], f)
    if len(rest) not in (5, 8):
        raise ValueError(f"datetime fields {f!r}")
    hour, minute, second, micro, fold = rest[:5]
    tz = None
    if len(rest) == 8:
        tz = datetime.timezone(datetime.timedelta(days=rest[5], seconds=rest[6], microseconds=rest[7]))
    if tag == 0x44:
        (year, month, day) = head
        return datetime.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz, fold=fold)
    return datetime.time(hour, minute, second, micro, tzinfo=tz, fold=fold)


def _count(buf: memoryview, pos: int) -> tuple[int, int]:
    (n,) = _U32.unpack_from(buf, pos)
    pos += _U32.size
    if n > len(buf) - pos:  # every item takes at least one byte: refuse before allocating
        raise ValueError(f"count {n} exceeds the {len(buf) - pos} bytes left")
    return n, pos


def _bytes(buf: memoryview, pos: int) -> tuple[bytes, int]:
    (n,) = _U32.unpack_from(buf, pos)
    pos += _U32.size
    if n > len(buf) - pos:
        raise ValueError(f"length {n} exceeds the {len(buf) - pos} bytes left")
    return bytes(buf[pos : pos + n]), pos + n


# -- what instances need besides the agent ------------------------------------------------


def instance_library() -> list[tuple[str, str]]:
    """(host path, name) of what a sandbox stages next to ``agent.py``,
    read-only, for tasks to unpickle: the cloudpickle package (a task's
    function pickled by value refers to it). Empty if not installed."""
    try:
        import cloudpickle
    except ImportError:
        return []
    path = cloudpickle.__file__
    assert path is not None
    return [(os.path.dirname(os.path.abspath(path)), "cloudpickle")]


def stage_instance_library(dest_dir: str) -> None:
    """Copy ``instance_library()`` into ``dest_dir`` (world-readable, with
    its byte-code caches: sandboxes do not write them), for kinds that stage
    files instead of binding them."""
    for host, name in instance_library():
        target = os.path.join(dest_dir, name)
        if os.path.isdir(host):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(host, target)
            for root, _dirs, files in os.walk(target):
                os.chmod(root, 0o755)  # noqa: S103 - read by the sandbox's unprivileged uid
                for f in files:
                    os.chmod(os.path.join(root, f), 0o644)
        else:
            shutil.copyfile(host, target)
            os.chmod(target, 0o644)
