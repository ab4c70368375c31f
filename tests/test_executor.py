"""noodle.Executor against a real pool of the process kind: the contract of
``concurrent.futures`` (after CPython's test_concurrent_futures: submit,
map order and timeout, shutdown with cancel_futures, exceptions, done
callbacks, as_completed, wait), one fresh instance per task, per-task
timeouts that end the instance, functions of ``__main__`` by value, and a
caller SIGKILLed in the middle of a map leaving nothing behind."""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import decimal
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import noodle
from noodle.host.proc import is_alive
from tests.conftest import REPO, running_pool, wait_for, wait_full

pytestmark = pytest.mark.timeout(240)

# functions and classes of this module travel by value: instances need not
# import the test suite
cloudpickle.register_pickle_by_value(sys.modules[__name__])

POOL_SIZE = 4


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One process-kind pool for the module's contract tests; at the end it
    is stopped and checked for leftovers like every test pool."""
    with running_pool(f"t{os.getpid()}xexec", POOL_SIZE, tmp_path_factory.mktemp("x")) as p:
        yield p


@pytest.fixture
def ex(pool: Any) -> Iterator[noodle.Executor]:
    with noodle.Executor(pool) as e:
        yield e
    # every lease came back: the pool refills completely
    wait_full(pool)


class CustomError(Exception):
    pass


def raise_custom(msg: str) -> None:
    print("about to fail")
    raise CustomError(msg, 42)


def mark_env() -> tuple[bool, int]:
    """True if an earlier task already ran in this instance."""
    seen = "NOODLE_TEST_SEEN" in os.environ
    os.environ["NOODLE_TEST_SEEN"] = "1"
    return seen, os.getpid()


# -- submit ---------------------------------------------------------------------------


def test_submit_returns_values_of_their_own_types(ex: noodle.Executor) -> None:
    assert ex.submit(pow, 2, 8).result(60) == 256
    assert ex.submit(pow, 2, exp=3).result(60) == 8
    assert ex.submit(dict, a=1, b=[2]).result(60) == {"a": 1, "b": [2]}
    value = {"set": {1, 2}, "bytes": b"\x00", "when": datetime.datetime(2026, 1, 1), "t": (1, 2.5)}
    assert ex.submit(lambda: value).result(60) == value


def test_closures_and_lambdas_travel_by_value(ex: noodle.Executor) -> None:
    k = 7

    def times_k(x: int) -> int:
        return x * k

    assert ex.submit(times_k, 6).result(60) == 42
    assert ex.submit(lambda: [k] * 2).result(60) == [7, 7]


def test_every_task_runs_in_its_own_fresh_instance(ex: noodle.Executor, pool: Any) -> None:
    futures = [ex.submit(mark_env) for _ in range(2 * POOL_SIZE)]
    results = [f.result(120) for f in futures]
    assert all(not seen for seen, _ in results), "a task saw an earlier task's state"
    pids = [pid for _, pid in results]
    assert len(set(pids)) == len(pids), f"instances were reused: {pids}"
    assert os.getpid() not in pids
    wait_full(pool)
    wait_for(lambda: not any(is_alive(p) for p in pids), 30, "used instances to be destroyed")


def test_submit_after_shutdown_raises(pool: Any) -> None:
    e = noodle.Executor(pool)
    e.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(pow, 2, 2)
    e.shutdown()  # idempotent


def test_unpicklable_task_fails_its_future(ex: noodle.Executor) -> None:
    lock = threading.Lock()
    fut = ex.submit(id, lock)
    with pytest.raises(TypeError, match="cannot pickle"):
        fut.result(10)


def test_max_workers_bounds_concurrency(pool: Any, tmp_path: Path) -> None:
    def overlap(d: str) -> int:
        mine = os.path.join(d, str(os.getpid()))
        open(mine, "w").close()
        time.sleep(0.3)
        n = len(os.listdir(d))
        os.unlink(mine)
        return n

    with noodle.Executor(pool, max_workers=2) as e:
        seen = list(e.map(overlap, [str(tmp_path)] * 6))
    assert max(seen) <= 2
    assert e._max_workers == 2
    with noodle.Executor(pool) as e:
        assert e._max_workers == POOL_SIZE  # the default
    with pytest.raises(ValueError, match="max_workers"):
        noodle.Executor(pool, max_workers=0)


# -- map --------------------------------------------------------------------------------


def test_map_keeps_order(ex: noodle.Executor) -> None:
    def slow_square(x: int) -> int:
        time.sleep(0.05 * (5 - x % 5))  # later items finish first
        return x * x

    assert list(ex.map(slow_square, range(10))) == [x * x for x in range(10)]
    assert list(ex.map(pow, range(5), range(5))) == [pow(x, x) for x in range(5)]
    assert list(ex.map(pow, [], [])) == []


def test_map_timeout(ex: noodle.Executor) -> None:
    results = []
    with pytest.raises(TimeoutError):
        for r in ex.map(time.sleep, [0, 0, 6], timeout=3):
            results.append(r)
    assert results == [None, None]


# -- shutdown -----------------------------------------------------------------------------


def test_shutdown_waits_for_running_tasks(pool: Any) -> None:
    e = noodle.Executor(pool, max_workers=2)
    futures = [e.submit(time.sleep, 0.3) for _ in range(4)]
    e.shutdown(wait=True)
    assert all(f.done() and f.result() is None for f in futures)
    wait_full(pool)


def test_shutdown_cancel_futures(pool: Any, tmp_path: Path) -> None:
    started = tmp_path / "started"

    def first() -> str:
        open(started, "w").close()
        time.sleep(1.0)
        return "done"

    e = noodle.Executor(pool, max_workers=1)
    running = e.submit(first)
    pending = [e.submit(pow, 2, i) for i in range(5)]
    wait_for(started.exists, 60, "the first task to start")
    e.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "done"
    assert all(f.cancelled() for f in pending)
    wait_full(pool)


def test_shutdown_without_wait_then_finishes(pool: Any) -> None:
    e = noodle.Executor(pool, max_workers=2)
    futures = [e.submit(time.sleep, 0.2) for _ in range(3)]
    e.shutdown(wait=False)
    cf.wait(futures, timeout=60)
    assert all(f.done() and f.exception() is None for f in futures)
    wait_full(pool)


def test_executor_by_name_closes_its_pool_handle(pool: Any) -> None:
    with noodle.Executor(pool.name) as e:
        assert e.submit(abs, -3).result(60) == 3
        own = e.pool
    assert own is not pool and own.closed


# -- exceptions ---------------------------------------------------------------------------


def test_exception_keeps_its_type_and_remote_traceback(ex: noodle.Executor) -> None:
    with pytest.raises(ZeroDivisionError) as info:
        ex.submit(lambda: 1 / 0).result(60)
    from noodle.codec import RemoteTraceback

    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "ZeroDivisionError" in str(cause) and "<lambda>" in str(cause)


def test_custom_exception_rebuilt_with_args_output_and_no_agent_frames(ex: noodle.Executor) -> None:
    from noodle.codec import RemoteTraceback

    fut = ex.submit(raise_custom, "boom")
    exc = fut.exception(60)
    assert type(exc) is CustomError
    assert exc.args == ("boom", 42)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_custom" in cause.traceback
    assert "agent.py" not in cause.traceback and "codec.py" not in cause.traceback
    assert cause.stdout == "about to fail\n"


def test_system_exit_in_a_task_is_its_future_s_exception(ex: noodle.Executor) -> None:
    with pytest.raises(SystemExit):
        ex.submit(sys.exit, 3).result(60)
    assert ex.submit(abs, -1).result(60) == 1  # the executor goes on


def test_untrusted_results_on_the_process_kind_are_plain(pool: Any) -> None:
    with noodle.Executor(pool, trust_results=False) as e:
        assert not e.trust_results
        assert e.submit(lambda: {"a": (1, {2})}).result(60) == {"a": (1, {2})}
        with pytest.raises(noodle.UnsafeResult, match=r"decimal\.Decimal, not plain data"):
            e.submit(decimal.Decimal, "1.5").result(60)
    with noodle.Executor(pool) as e:
        assert e.trust_results  # the process kind's default
        assert e.submit(decimal.Decimal, "1.5").result(60) == decimal.Decimal("1.5")
        with pytest.raises(TypeError, match="could not be pickled"):
            e.submit(threading.Event).result(60)


# -- per-task timeout -----------------------------------------------------------------------


def test_task_timeout_terminates_its_instance(pool: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def hang(path: str) -> None:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)

    with noodle.Executor(pool, timeout=1.0) as e:
        fut = e.submit(hang, str(pidfile))
        with pytest.raises(noodle.InstanceTimeout, match="terminated"):
            fut.result(60)
        assert isinstance(fut.exception(), TimeoutError)
        assert e.submit(abs, -2).result(60) == 2
    pid = int(pidfile.read_text())
    wait_for(lambda: not is_alive(pid), 30, "the timed-out instance to be killed")
    wait_full(pool)


# -- futures plumbing -----------------------------------------------------------------------


def test_done_callbacks(ex: noodle.Executor) -> None:
    called = threading.Event()
    seen: list[Any] = []

    def cb(f: cf.Future[Any]) -> None:
        seen.append(f.result())
        called.set()

    fut = ex.submit(pow, 3, 3)
    fut.add_done_callback(cb)
    assert called.wait(60)
    late: list[Any] = []
    fut.add_done_callback(lambda f: late.append(f.result()))  # already done: runs at once
    assert seen == [27] and late == [27]


def test_as_completed_and_wait(ex: noodle.Executor) -> None:
    futures = [ex.submit(time.sleep, d) for d in (0.6, 0.0, 0.3)]
    finished = list(cf.as_completed(futures, timeout=120))
    assert set(finished) == set(futures)
    assert finished[-1] is futures[0]

    slow = ex.submit(time.sleep, 1.0)
    quick = ex.submit(abs, -1)
    done, not_done = cf.wait([slow, quick], timeout=120, return_when=cf.FIRST_COMPLETED)
    assert quick in done
    failing = ex.submit(lambda: 1 / 0)
    done, _ = cf.wait([slow, failing], timeout=120, return_when=cf.FIRST_EXCEPTION)
    assert failing in done
    done, not_done = cf.wait([slow, quick, failing], timeout=120, return_when=cf.ALL_COMPLETED)
    assert not not_done


def test_cancel_before_start(pool: Any, tmp_path: Path) -> None:
    started = tmp_path / "go"

    def block() -> None:
        open(started, "w").close()
        time.sleep(0.5)

    with noodle.Executor(pool, max_workers=1) as e:
        e.submit(block)
        queued = e.submit(abs, -1)
        wait_for(started.exists, 60, "the first task to start")
        assert queued.cancel()
        assert queued.cancelled()


# -- __main__ and a killed caller -------------------------------------------------------------


def _script(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    path = tmp_path / "caller.py"
    path.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_main_module_functions_classes_and_exceptions(pool: Any, tmp_path: Path) -> None:
    proc = _script(
        tmp_path,
        f"""
        import noodle

        class Oops(Exception):
            pass

        def double(x):
            return 2 * x

        def fail():
            raise Oops("from main")

        if __name__ == "__main__":
            base = 10
            with noodle.Executor({pool.name!r}) as ex:
                print(list(ex.map(double, [1, 2])), ex.submit(lambda: base + 1).result())
                try:
                    ex.submit(fail).result()
                except Oops as e:
                    print("caught", type(e).__name__, e.args)
        """,
    )
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["[2, 4] 11", "caught Oops ('from main',)"]
    wait_full(pool)


def test_caller_killed_in_the_middle_of_a_map_leaks_nothing(pool: Any, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _script(
        tmp_path,
        f"""
        import os, time
        import noodle

        def work(i):
            open(os.path.join({str(marks)!r}, str(os.getpid())), "w").close()
            time.sleep(60)
            return i

        with noodle.Executor({pool.name!r}, max_workers=3) as ex:
            for r in ex.map(work, range(12)):
                print(r)
        """,
    )
    wait_for(lambda: len(os.listdir(marks)) == 3, 120, "three tasks to be running")
    assert pool.stats()["states"]["leased"] == 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    task_pids = [int(p) for p in os.listdir(marks)]
    # the supervisor reclaims the dead caller's leases and destroys their instances
    snap = wait_full(pool, 60)
    assert snap["states"]["leased"] == 0
    wait_for(lambda: not any(is_alive(p) for p in task_pids), 30, "the killed caller's instances to die")
    assert len(os.listdir(marks)) == 3  # nothing else of the map ran


# -- kinds without Python -----------------------------------------------------------------------


class _FakePool:
    """Only what the constructor's kind check reads (a decision test)."""

    name = "fake"
    pool_size = 2
    _kind = None

    def __init__(self, kind: str) -> None:
        self.kind_name = kind
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("kind", ["microvm", "command", "somepkg.mod:Kind"])
def test_kinds_without_python_are_refused_at_construction(kind: str) -> None:
    with pytest.raises(noodle.KindUnsupported, match=f"kind {kind!r}.*do not run Python.*jail, oci, process"):
        noodle.Executor(_FakePool(kind))  # type: ignore[arg-type]


def test_a_real_command_pool_is_refused(supervisor: Any) -> None:
    examples = os.path.join(str(REPO), "examples", "command")
    config = f"""
[kinds.command]
spawn_mode = "process"
spawn = "exec {examples}/plain-spawn.sh"
timeout = 20.0
env = {{ PYTHON = "/usr/bin/python3" }}
"""
    sup = supervisor("--kind", "command", "--pool-size", "1", config=config)
    p = sup.attach()
    try:
        with pytest.raises(noodle.KindUnsupported, match="'command'"):
            noodle.Executor(p)
        with pytest.raises(noodle.KindUnsupported):
            noodle.Executor(p.name)  # attached by name, and closed again
    finally:
        p.close()


# -- run/call through the same codec ---------------------------------------------------------


def test_run_and_call_keep_types_output_and_cap(pool: Any) -> None:
    with pool.get(timeout=60) as lease:
        inst = lease.instance
        assert inst.run("{1, 2}").result == {1, 2}
        assert inst.run("b'x', (1,)").result == (b"x", (1,))
        assert inst.call("datetime:date", 2026, 11, 30) == datetime.date(2026, 11, 30)
        out = inst.run("print('y' * 20_000_000)", timeout=120).stdout
        assert out.startswith("y" * 1000) and len(out) < 2_000_000
        assert out.rstrip().endswith("more characters dropped]")
        with pytest.raises(noodle.InstanceError, match="KeyError") as info:
            inst.run("import sys; print('to out'); print('to err', file=sys.stderr); {}['k']")
        err = info.value
        assert (err.stdout, err.stderr, err.remote_type) == ("to out\n", "to err\n", "KeyError")
        assert "agent.py" not in err.remote_traceback and "<noodle>" in err.remote_traceback
    wait_full(pool)
