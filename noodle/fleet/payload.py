"""How a job's payload is encoded, run in an instance, and its result decoded.

Two formats, named in the job's ``Noodle-Format`` header:

* ``source/1``: Python source (what ``noodle submit`` sends); runs like
  ``noodle exec``; the result carries the value of a trailing expression and
  the captured output.
* ``call/1``: a callable with its arguments, in the task format of
  ``noodle.Executor`` (``noodle.codec``); the result is decoded by the same
  safe rules as there.

``run`` happens on the host, ``decode`` in the caller. A failure to reach the
instance (it died, the connection broke) is not a result: ``run`` raises
``InstanceGone`` and the serve retries the job elsewhere.
"""

from __future__ import annotations

import json
from typing import Any

from noodle.errors import InstanceError, InstanceTimeout, NoodleError
from noodle.fleet.wire import STATUS_OK, STATUS_RAISED
from noodle.handle import RunResult

FORMAT_SOURCE = "source/1"
FORMAT_CALL = "call/1"
FORMATS = (FORMAT_SOURCE, FORMAT_CALL)


class BadJob(NoodleError, ValueError):
    """A job's payload cannot be decoded or names an unknown format: running
    it again cannot help, so it is dead-lettered at once."""


class ResultUndecodable(NoodleError):
    """A result could not be decoded by the safe rules (the message says why)."""


def encode_source(source: str) -> tuple[str, bytes]:
    return FORMAT_SOURCE, source.encode()


def encode_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], trust: bool) -> tuple[str, bytes]:
    """``trust`` asks the instance to pickle its result (decoded only by a
    caller that trusts it, as ``noodle.Executor(trust_results=True)``)."""
    from noodle import codec

    return FORMAT_CALL, codec.encode_task(fn, args, kwargs, pickle_results=trust)


def run(instance: Any, fmt: str, data: bytes, timeout: float) -> tuple[str, bytes]:
    """Run one job in a leased instance; returns (status, result bytes)."""
    if fmt == FORMAT_SOURCE:
        return _run_source(instance, data, timeout)
    if fmt == FORMAT_CALL:
        return _run_call(instance, data, timeout)
    raise BadJob(f"unknown job format {fmt!r} (known: {', '.join(FORMATS)})")


def _run_source(instance: Any, data: bytes, timeout: float) -> tuple[str, bytes]:
    try:
        source = data.decode()
    except UnicodeDecodeError as exc:
        raise BadJob(f"source is not UTF-8: {exc}") from None
    if instance is None or not hasattr(instance, "run"):
        raise BadJob("this host's pool runs no Python; a source job needs a kind with run()")
    try:
        res = instance.run(source, timeout=timeout)
    except InstanceError as exc:
        err = {"type": exc.remote_type, "message": str(exc), "traceback": exc.remote_traceback}
        return STATUS_RAISED, json.dumps(err).encode()
    except InstanceTimeout as exc:
        err = {"type": "TimeoutError", "message": str(exc), "traceback": ""}
        return STATUS_RAISED, json.dumps(err).encode()
    out = {"result": res.result, "stdout": res.stdout, "stderr": res.stderr}
    return STATUS_OK, json.dumps(out, default=repr).encode()


def _run_call(instance: Any, data: bytes, timeout: float) -> tuple[str, bytes]:
    if instance is None or not hasattr(instance, "task"):
        raise BadJob("this host's pool runs no Python; a call job needs a kind whose instance runs the agent")
    try:
        return STATUS_OK, bytes(instance.task(data, timeout))
    except InstanceTimeout as exc:
        return STATUS_RAISED, f"the task ran longer than {timeout} s: {exc}".encode()


def decode(fmt: str, status: str, data: bytes, trust: bool = False) -> Any:
    """The job's value, or its exception raised (by the safe rules of
    ``noodle.codec``: a pickled result only with ``trust``)."""
    if fmt == FORMAT_CALL:
        from noodle import codec

        if status == STATUS_RAISED:
            raise TimeoutError(data.decode(errors="replace"))
        if status != STATUS_OK:
            raise ResultUndecodable(f"unknown result status {status!r}")
        return codec.decode_result(data, trust=trust)
    if fmt == FORMAT_SOURCE:
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ResultUndecodable(f"source result is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ResultUndecodable("source result is not a JSON object")
        if status == STATUS_OK:
            return RunResult(obj.get("result"), str(obj.get("stdout", "")), str(obj.get("stderr", "")))
        if status == STATUS_RAISED:
            if obj.get("type") == "TimeoutError":
                raise TimeoutError(str(obj.get("message", "")))
            raise InstanceError(str(obj.get("message", "")), remote_type=str(obj.get("type", "")),
                                remote_traceback=str(obj.get("traceback", "")))  # fmt: skip
        raise ResultUndecodable(f"unknown result status {status!r}")
    raise ResultUndecodable(f"unknown job format {fmt!r}")
