"""noodle.fleet.Executor keeps noodle.Executor's contract, through NATS."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import pickle
from pathlib import Path
from typing import Any

import pytest

from noodle.errors import InstanceTimeout, UnsafeResult
from tests.fleet.conftest import Host, NatsServer, wait_serving


class Boom(ValueError):
    pass


class Hostile:
    """Unpickling this would run code on the caller: touch a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path(self.path).touch, ())


def test_contract(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet import Executor

    host: Host = fleet(pool_size=3)
    wait_serving(host)
    base = 10

    def closure(x: int) -> tuple[int, set[int], bytes]:
        import os

        return (x + base, {x, base}, os.getpid().to_bytes(4, "big"))

    def fails() -> None:
        print("about to fail")
        raise Boom("no luck")

    calls = []
    with Executor(nats_server.url) as ex:
        fut = ex.submit(closure, 1)
        fut.add_done_callback(lambda f: calls.append(f.result()[0]))
        assert fut.result(60)[:2] == (11, {1, 10})  # types kept: tuple, set, bytes
        assert list(ex.map(lambda x: x * x, range(8), timeout=120)) == [x * x for x in range(8)]
        pids = {f.result()[2] for f in cf.as_completed([ex.submit(closure, i) for i in range(6)], timeout=120)}
        assert len(pids) == 6  # every task in its own fresh instance
        with pytest.raises(Boom) as err:
            ex.submit(fails).result(60)
        assert "no luck" in str(err.value) and "fails" in str(err.value.__cause__)
        assert calls == [11]
    with pytest.raises(RuntimeError):
        ex.submit(closure, 1)


def test_timeout_ends_the_task(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet import Executor

    host: Host = fleet(pool_size=2)
    wait_serving(host)

    def sleepy() -> None:
        import time

        time.sleep(60)

    with Executor(nats_server.url, timeout=1.0) as ex:
        with pytest.raises(InstanceTimeout):
            ex.submit(sleepy).result(120)
        assert ex.submit(abs, -3).result(60) == 3


def test_results_are_decoded_by_the_safe_rules(nats_server: NatsServer, fleet: Any, tmp_path: Path) -> None:
    from noodle.fleet import Executor

    host: Host = fleet(pool_size=2)
    wait_serving(host)
    marker = tmp_path / "ran-on-the-caller"

    def hostile() -> Hostile:
        return Hostile(str(marker))

    with Executor(nats_server.url) as ex:
        with pytest.raises(Exception) as err:
            ex.submit(hostile).result(60)
    assert "Hostile" in str(err.value)
    assert not marker.exists()


def test_a_forged_pickled_result_is_never_opened(tmp_path: Path) -> None:
    from noodle.agent import PICKLED, RESULT_MAGIC
    from noodle.fleet import payload
    from noodle.fleet.wire import STATUS_OK

    marker = tmp_path / "ran"
    record = {"ok": True, "value": Hostile(str(marker)), "stdout": "", "stderr": ""}
    forged = RESULT_MAGIC + PICKLED + pickle.dumps(record)
    with pytest.raises(UnsafeResult):
        payload.decode(payload.FORMAT_CALL, STATUS_OK, forged)
    assert not marker.exists()


def test_asyncio_form(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet import AsyncExecutor

    host: Host = fleet(pool_size=2)
    wait_serving(host)

    async def main() -> list[int]:
        async with AsyncExecutor(nats_server.url) as ex:
            futs = [await ex.submit(pow, 2, i) for i in range(5)]
            first = await ex.run(divmod, 7, 2)
            assert first == (3, 1)
            results = list(await asyncio.gather(*futs))
            left = await ex.submit(pow, 3, 2)
        assert left.result() == 9  # leaving the block waited for it
        return results

    assert asyncio.run(main()) == [1, 2, 4, 8, 16]


def test_no_server_is_a_clear_error() -> None:
    from noodle.fleet import Executor
    from noodle.fleet.wire import Unreachable
    from tests.fleet.conftest import free_port

    with pytest.raises(Unreachable, match="within"):
        Executor(f"nats://127.0.0.1:{free_port()}")
