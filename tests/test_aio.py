"""asyncio against a real pool: ``aget`` without a thread per waiter (1,000
waiters on a starved pool, one thread), cancellation that leaks nothing and
leaves the loop's default executor free, arrival order, timeouts, shutdown,
``async with``, ``arun``/``acall``/``aexec``/``atask`` over asyncio
streams, and the Executor from asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import noodle
from noodle import aio, codec
from tests.conftest import Supervisor, running_pool, wait_for, wait_full

pytestmark = pytest.mark.timeout(240)
POOL_SIZE = 2


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_pool(f"t{os.getpid()}xaio", POOL_SIZE, tmp_path_factory.mktemp("a")) as p:
        yield p


def settled(pool: Any) -> None:
    """Every lease back, no waiter thread left, the pool full again."""
    wait_for(lambda: aio.waiting_threads() == 0, 30, "the waiter thread to exit")
    snap = wait_full(pool, 60)
    assert snap["states"]["leased"] == 0


async def until(pred: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"condition not reached (threads {aio.waiting_threads()})"
        await asyncio.sleep(0.01)


def test_async_with_and_async_agent_calls(pool: Any) -> None:
    async def main() -> Any:
        async with await pool.aget(timeout=30) as lease:
            inst = lease.instance
            assert (await inst.arun("print('hi'); {1, 2}")).result == {1, 2}
            assert (await inst.arun("print('hi')")).stdout == "hi\n"
            assert inst.run("3 * 3").result == 9  # blocking and async calls mix on one lease
            assert await inst.acall("math:factorial", 6) == 720
            assert (await inst.aexec(["echo", "x"])).stdout == "x\n"
            payload = await inst.atask(codec.encode_task(divmod, (7, 2), pickle_results=True))
            assert codec.decode_result(payload, trust=True) == (3, 1)
            with pytest.raises(noodle.InstanceError, match="ZeroDivisionError") as info:
                await inst.arun("print('before'); 1 / 0")
            assert info.value.stdout == "before\n"
            with pytest.raises(noodle.InstanceTimeout):
                await inst.arun("import time; time.sleep(30)", timeout=0.5)
        return lease

    lease = asyncio.run(main())
    assert lease.released
    settled(pool)


def test_thousand_waiters_one_thread_cancelled_without_leaks(pool: Any) -> None:
    held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # one default-executor thread: the old aget (a thread per waiter) wedged it
        loop.set_default_executor(cf.ThreadPoolExecutor(max_workers=1))
        before = threading.active_count()
        tasks = [asyncio.create_task(pool.aget(timeout=None)) for _ in range(1000)]
        await until(lambda: aio.waiting_threads() == 1)
        await asyncio.sleep(0.3)
        assert threading.active_count() <= before + 1
        assert not any(t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 30) == 42
        await until(lambda: aio.waiting_threads() == 0)

    asyncio.run(main())  # returning at all is part of the test
    for lease in held:
        lease.release()
    settled(pool)


def test_a_cancelled_waiter_s_lease_goes_to_the_next(pool: Any) -> None:
    held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]

    async def main() -> None:
        first = asyncio.create_task(pool.aget(timeout=60))
        second = asyncio.create_task(pool.aget(timeout=60))
        await until(lambda: aio.waiting_threads() == 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        held.pop().release()
        lease = await asyncio.wait_for(second, 60)
        assert not lease.released
        lease.release()
        # the instance that replaces it is held too, so the next waiter waits
        held.append(await pool.aget(timeout=60))
        # a lone waiter cancelled while an instance arrives: released, not leaked
        third = asyncio.create_task(pool.aget(timeout=60))
        await until(lambda: aio.waiting_threads() == 1)
        third.cancel()
        held.pop().release()
        with pytest.raises(asyncio.CancelledError):
            await third

    asyncio.run(main())
    for lease in held:
        lease.release()
    settled(pool)


def test_waiters_are_served_in_arrival_order(pool: Any) -> None:
    held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]
    order: list[int] = []

    async def waiter(i: int) -> None:
        lease = await pool.aget(timeout=120)
        order.append(i)
        lease.release()

    async def main() -> None:
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(waiter(i)))
            await asyncio.sleep(0.02)  # arrive one after the other
        for lease in held:
            lease.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

    asyncio.run(main())
    assert order == [0, 1, 2, 3, 4]
    settled(pool)


def test_aget_timeout_raises_starved(pool: Any) -> None:
    held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]

    async def main() -> None:
        with pytest.raises(noodle.PoolStarved):
            await pool.aget(timeout=0)
        with pytest.raises(noodle.PoolStarved, match=r"within 0\.3 s"):
            await pool.aget(timeout=0.3)

    try:
        asyncio.run(main())
    finally:
        for lease in held:
            lease.release()
    settled(pool)


def test_executor_from_asyncio(pool: Any) -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        with noodle.Executor(pool) as ex:
            a = await asyncio.wrap_future(ex.submit(pow, 2, 10))
            b = await loop.run_in_executor(ex, divmod, 9, 4)
            c = await asyncio.gather(*(loop.run_in_executor(ex, abs, -i) for i in range(4)))
            with pytest.raises(ZeroDivisionError):
                await asyncio.wrap_future(ex.submit(lambda: 1 / 0))
        return [a, b, c]

    assert asyncio.run(main()) == [1024, (2, 1), [0, 1, 2, 3]]
    settled(pool)


def test_shutdown_wakes_async_waiters(supervisor: Any) -> None:
    sup: Supervisor = supervisor("--pool-size", "1", "--drain-timeout", "30")
    p = sup.attach()
    wait_full(p)
    held = p.get(timeout=30)

    async def main() -> None:
        tasks = [asyncio.create_task(p.aget(timeout=None)) for _ in range(3)]
        await until(lambda: aio.waiting_threads() >= 1)
        sup.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert all(isinstance(r, noodle.PoolShuttingDown) for r in results), results

    try:
        asyncio.run(main())
    finally:
        held.release()
    assert sup.stop() == 0
    p.close()
