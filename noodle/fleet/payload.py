"""How a job's payload is encoded, run in an instance, and its result decoded.

Two formats, named in the job's ``Noodle-Format`` header:

* ``source/1``: Python source (what ``noodle submit`` sends); runs like
  ``noodle exec``; the result carries the value of a trailing expression and
  the captured output, in the codec's plain encoding (never a pickle).
* ``call/1``: a callable with its arguments, in the task format of
  ``noodle.Executor`` (``noodle.codec``); the result is decoded by the same
  safe rules as there.

``run`` happens on the host, ``decode`` in the caller. A failure to reach the
instance (it died, the connection broke) is not a result: ``run`` raises
``InstanceGone`` and the serve retries the job elsewhere.
"""

from __future__ import annotations

from typing import Any

from noodle import codec
from noodle.errors import BadPayload, InstanceError, InstanceTimeout, NoodleError
from noodle.fleet.wire import STATUS_OK, STATUS_RAISED, STATUS_TIMEOUT
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
    return FORMAT_CALL, codec.encode_task(fn, args, kwargs, pickle_results=trust)


def run(instance: Any, fmt: str, data: bytes, timeout: float) -> tuple[str, bytes]:
    """Run one job in a leased instance; returns (status, result bytes)."""
    if fmt == FORMAT_SOURCE:
        return _run_source(instance, data, timeout)
    if fmt == FORMAT_CALL:
        return _run_call(instance, data, timeout)
    raise BadJob(f"unknown job format {fmt!r} (known: {', '.join(FORMATS)})")


def _timed_out(timeout: float) -> bytes:
    return f"the job did not finish within its timeout of {timeout} s; its instance was terminated".encode()


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
        err = {"type": exc.remote_type, "message": str(exc), "traceback": exc.remote_traceback,
               "stdout": exc.stdout, "stderr": exc.stderr}  # fmt: skip
        return STATUS_RAISED, codec.dumps_plain(err)
    except InstanceTimeout:
        return STATUS_TIMEOUT, _timed_out(timeout)
    value = res.result
    try:
        body = codec.dumps_plain({"result": value, "stdout": res.stdout, "stderr": res.stderr})
    except codec.NotPlain:
        body = codec.dumps_plain({"result": repr(value), "stdout": res.stdout, "stderr": res.stderr})
    return STATUS_OK, body


def _run_call(instance: Any, data: bytes, timeout: float) -> tuple[str, bytes]:
    if instance is None or not hasattr(instance, "task"):
        raise BadJob("this host's pool runs no Python; a call job needs a kind whose instance runs the agent")
    try:
        return STATUS_OK, bytes(instance.task(data, timeout))
    except InstanceTimeout:
        return STATUS_TIMEOUT, _timed_out(timeout)


def decode(fmt: str, status: str, data: bytes, trust: bool = False) -> Any:
    """The job's value, or its exception raised (by the safe rules of
    ``noodle.codec``: a pickled result only with ``trust``)."""
    if status == STATUS_TIMEOUT:
        raise InstanceTimeout(data.decode(errors="replace"))
    if fmt == FORMAT_CALL:
        if status != STATUS_OK:
            raise ResultUndecodable(f"unknown result status {status!r}")
        return codec.decode_result(data, trust=trust)
    if fmt == FORMAT_SOURCE:
        try:
            obj = codec.loads_plain(data)
        except BadPayload as exc:
            raise ResultUndecodable(f"source result: {exc}") from None
        if not isinstance(obj, dict):
            raise ResultUndecodable("source result is not a mapping")
        out, err = str(obj.get("stdout", "")), str(obj.get("stderr", ""))
        if status == STATUS_OK:
            return RunResult(obj.get("result"), out, err)
        if status == STATUS_RAISED:
            raise InstanceError(str(obj.get("message", "")), remote_type=str(obj.get("type", "")),
                                remote_traceback=str(obj.get("traceback", "")), stdout=out, stderr=err)  # fmt: skip
        raise ResultUndecodable(f"unknown result status {status!r}")
    raise ResultUndecodable(f"unknown job format {fmt!r}")
