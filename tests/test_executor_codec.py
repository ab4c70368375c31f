"""The task and result codec (noodle.codec, its encoding half in
noodle.agent): plain data round-trips with its types, anything else is
refused with a message naming it, malformed or pickled payloads are refused
without being opened, exceptions are rebuilt without running their code,
output is capped inside the instance, agent frames are cut."""

from __future__ import annotations

import base64
import datetime
import math
import os
import pickle
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noodle import agent, codec
from noodle.errors import BadPayload, InstanceError, UnsafeResult

# -- plain data ---------------------------------------------------------------------------

_DAY, _US = datetime.timedelta(days=1), datetime.timedelta(microseconds=1)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.datetimes(timezones=st.builds(datetime.timezone, st.timedeltas(-_DAY + _US, _DAY - _US)))
    | st.dates()
    | st.times()
    | st.timedeltas()
)
_hashable = st.recursive(
    _scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=8
)
_plain = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_hashable, inner, max_size=4)
        | st.sets(_hashable, max_size=4)
        | st.frozensets(_hashable, max_size=4)
    ),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, datetime.datetime) and a.tzinfo is not None:
        # a zone becomes its fixed offset (aware times in a DST fold never
        # compare equal across zones, so compare wall time and offset)
        return a.replace(tzinfo=None) == b.replace(tzinfo=None) and a.utcoffset() == b.utcoffset()
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(_plain)
def test_plain_values_round_trip_with_their_types(value: Any) -> None:
    assert _same(codec.loads_plain(codec.dumps_plain(value)), value)


def test_a_zone_becomes_its_fixed_offset() -> None:
    import zoneinfo

    when = datetime.datetime(2026, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Oslo"))
    out = codec.loads_plain(codec.dumps_plain(when))
    assert out == when and out.tzinfo == datetime.timezone(datetime.timedelta(hours=2))


def test_special_floats_and_surrogates() -> None:
    for v in (math.inf, -math.inf, -0.0, "\udcff", 2**4000, -(2**4000)):
        out = codec.loads_plain(codec.dumps_plain(v))
        assert out == v and type(out) is type(v)
    assert math.isnan(codec.loads_plain(codec.dumps_plain(math.nan)))


class Sub(int):
    pass


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (object(), "builtins.object"),
        ([1, {"k": Sub(1)}], "Sub"),
        (bytearray(b"x"), "builtins.bytearray"),
        (datetime.time(1, tzinfo=datetime.UTC).replace(tzinfo=None), None),
    ],
)
def test_non_plain_values_are_refused_by_name(value: Any, named: str | None) -> None:
    if named is None:
        codec.dumps_plain(value)  # a naive time is plain
        return
    with pytest.raises(codec.NotPlain, match=named):
        codec.dumps_plain(value)


def test_cycles_and_depth_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(codec.NotPlain, match="deeper than"):
        codec.dumps_plain(loop)
    deep: Any = None
    for _ in range(codec.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(codec.NotPlain):
        codec.dumps_plain(deep)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"X",
        b"s\x00\x00\x00\x10abc",  # length past the end
        b"l\xff\xff\xff\xff",  # a count that would allocate 4 G items
        b"NN",  # trailing bytes
        b"d\x00\x00\x00\x01l\x00\x00\x00\x00N",  # an unhashable key
        b"e\x00\x00\x00\x01l\x00\x00\x00\x00",  # an unhashable set item
        b"D\x00\x00\x00\x03bad",
        b"D\x00\x00\x00\x051 2 3",  # too few fields
        b"a\x00\x00\x00\x0a2026 13 40",  # out of range
        b"l\x00\x00\x00\x01" * (codec.MAX_DEPTH + 2) + b"N",
    ],
)
def test_malformed_plain_payloads_raise_bad_payload(data: bytes) -> None:
    with pytest.raises(BadPayload):
        codec.loads_plain(data)


# -- results --------------------------------------------------------------------------------


FIRED: list[str] = []


def trip(what: str) -> None:
    FIRED.append(what)


class Tripwire:
    """Unpickling this calls ``trip``: the test of never opening."""

    def __reduce__(self) -> Any:
        return (trip, ("unpickled",))


def test_pickled_results_are_refused_unopened_without_trust() -> None:
    payload = agent.RESULT_MAGIC + agent.PICKLED + pickle.dumps({"ok": True, "value": Tripwire()})
    with pytest.raises(UnsafeResult, match="not opened: unpickling runs"):
        codec.decode_result(payload)
    assert FIRED == []
    codec.decode_result(payload, trust=True)
    assert FIRED == ["unpickled"]  # the control: trust does open it
    FIRED.clear()


@pytest.mark.parametrize(
    "payload",
    [b"", b"NRS1", b"XXXX" + agent.PLAIN + b"N", agent.RESULT_MAGIC + b"Q", agent.RESULT_MAGIC + agent.PLAIN + b"N"],
)
def test_malformed_result_payloads(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        codec.decode_outcome(payload)


def _outcome(fn: Any, pickled: bool = False) -> codec.Outcome:
    return codec.decode_outcome(agent.run_captured(fn, pickled), trust=pickled)


def test_values_and_output() -> None:
    def f() -> Any:
        print("out")
        print("err", file=sys.stderr)
        return {"a": {1, 2}}

    o = _outcome(f)
    assert o.ok and o.value == {"a": {1, 2}} and o.stdout == "out\n" and o.stderr == "err\n"


def test_output_is_capped_inside_with_a_marker() -> None:
    o = _outcome(lambda: print("x" * (agent.OUTPUT_CAP + 1000)))
    assert len(o.stdout) < agent.OUTPUT_CAP + 200
    assert o.stdout.startswith("x" * 100)
    assert "output truncated inside the instance: 1001 more characters dropped" in o.stdout


def test_oversized_results_become_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "RESULT_CAP", 1000)
    o = _outcome(lambda: b"x" * 5000)
    assert not o.ok and "RESULT_CAP" in o.error["message"] and isinstance(o.exception, ValueError)


class LocalError(Exception):
    inits: list[Any] = []

    def __init__(self, *args: Any) -> None:
        LocalError.inits.append(args)  # must not run when rebuilt from plain data
        super().__init__(*args)


class WithNew(Exception):
    def __new__(cls, *args: Any) -> WithNew:
        raise AssertionError("a class's own __new__ must not run on rebuild")


def test_exceptions_rebuilt_by_name_without_running_their_code() -> None:
    def fail() -> None:
        print("before")
        raise LocalError("a", 1)

    payload = agent.run_captured(fail, False)  # "inside the instance": raising runs __init__
    LocalError.inits.clear()
    exc = codec.decode_outcome(payload).exception
    assert type(exc) is LocalError and exc.args == ("a", 1)
    assert LocalError.inits == []
    cause = exc.__cause__
    assert isinstance(cause, codec.RemoteTraceback)
    assert cause.stdout == "before\n" and "in fail" in cause.traceback
    assert "run_captured" not in cause.traceback  # agent frames cut
    assert "before" in str(cause)


def test_unknown_or_unsafe_exception_classes_become_instance_error() -> None:
    # WithNew() itself would raise in __new__: build the description by hand
    error = {"module": __name__, "name": "WithNew", "args": [], "message": "m", "traceback": "tb"}
    record = {"ok": False, "error": error, "stdout": "o", "stderr": "e"}
    exc = codec.decode_outcome(agent.RESULT_MAGIC + agent.PLAIN + codec.dumps_plain(record)).exception
    assert type(exc) is InstanceError and exc.stdout == "o" and exc.stderr == "e" and exc.remote_traceback == "tb"
    error.update(module="no.such.module", name="Gone")
    exc = codec.decode_outcome(agent.RESULT_MAGIC + agent.PLAIN + codec.dumps_plain(record)).exception
    assert type(exc) is InstanceError and "no.such.module.Gone: m" in str(exc)
    error.update(module="os", name="system")  # not an exception class: never called
    exc = codec.decode_outcome(agent.RESULT_MAGIC + agent.PLAIN + codec.dumps_plain(record)).exception
    assert type(exc) is InstanceError
    assert "no.such.module" not in sys.modules  # lookups never import


def test_builtin_types_and_system_exit() -> None:
    exc = _outcome(lambda: open("/nonexistent/x")).exception
    assert type(exc) is FileNotFoundError and exc.errno == 2
    # from an untrusted instance, SystemExit or KeyboardInterrupt must not stop the caller
    exc = _outcome(lambda: sys.exit(4)).exception
    assert type(exc) is InstanceError and exc.remote_type == "SystemExit"
    exc = _outcome(lambda: sys.exit(4), pickled=True).exception
    assert type(exc) is SystemExit and exc.args == (4,)  # trusted: as raised


def test_non_plain_exception_args_fall_back_to_the_message() -> None:
    def fail() -> None:
        raise ValueError(object())

    exc = _outcome(fail).exception
    assert type(exc) is ValueError and exc.args[0].startswith("<object object")


def test_tasks_round_trip_through_run_task() -> None:
    k = 3
    payload = codec.encode_task(lambda x, y=0: x * k + y, (4,), {"y": 1})
    assert codec.decode_result(codec.run_task(payload)) == 13
    with pytest.raises(TypeError, match="callable"):
        codec.encode_task(3)  # type: ignore[arg-type]
    bad = codec.decode_outcome(codec.run_task(b"garbage"))
    assert not bad.ok and "not a task payload" in bad.error["message"]


def test_agent_run_and_call_keep_types() -> None:
    a = agent.Agent()

    def value(req: dict[str, Any], trust: bool = False) -> Any:
        reply = a.handle(req)
        return codec.decode_result(base64.b64decode(reply["payload"]), trust=trust)

    assert value({"op": "run", "source": "{1, 2}, b'x', 1.5"}) == ({1, 2}, b"x", 1.5)
    assert value({"op": "call", "target": "datetime:date", "args": [2026, 1, 2]}) == datetime.date(2026, 1, 2)
    with pytest.raises(UnsafeResult, match=r"decimal\.Decimal"):
        value({"op": "run", "source": "import decimal; decimal.Decimal(1)"})
    import decimal

    got = value({"op": "run", "source": "decimal.Decimal(1)", "results": "pickle"}, trust=True)
    assert got == decimal.Decimal(1)
    reply = a.handle({"op": "exec", "argv": [sys.executable, "-c", f"print('y' * {agent.OUTPUT_CAP + 10})"]})
    assert reply["stdout"].endswith("11 more characters dropped]\n")


def test_instance_library_names_cloudpickle() -> None:
    import cloudpickle

    lib = {name: host for host, name in codec.instance_library()}
    assert lib["cloudpickle"] == os.path.dirname(cloudpickle.__file__)
