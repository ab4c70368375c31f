"""The pool service end to end: a real supervisor, real workers, real
instance processes, a real client."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import noodle
from noodle.host.proc import is_alive
from tests.conftest import pool_processes, wait_for, wait_full

pytestmark = pytest.mark.timeout(180)


def test_basic_lifecycle(supervisor) -> None:
    """The basic lifecycle: get three, drop them, the pool refills,
    shutdown makes get fail."""
    sup = supervisor("--pool-size", "4")
    pool = sup.attach()
    wait_full(pool)
    leases = [pool.get(timeout=10) for _ in range(3)]
    assert len({lease.slot for lease in leases}) == 3
    for lease in leases:
        assert lease.instance.run("1 + 1").result == 2
    assert pool.stats()["states"]["leased"] == 3
    pids = [lease.descriptor["pid"] for lease in leases]
    for lease in leases:
        lease.release()
    snap = wait_full(pool)
    assert sum(snap["states"].values()) == 4
    # the released instances were destroyed, not reused
    wait_for(lambda: not any(is_alive(p) for p in pids), 10, "released instances to die")
    assert snap["counters"]["releases"] == 3 and snap["counters"]["terminates"] >= 3
    sup.proc.send_signal(signal.SIGTERM)
    with pytest.raises(noodle.PoolShuttingDown):
        wait_for(lambda: pool.get(timeout=0) and False, 10, "get to fail")
    assert sup.stop() == 0
    pool.close()


def test_every_slot_refilled_with_a_new_generation(supervisor) -> None:
    sup = supervisor("--pool-size", "3")
    pool = sup.attach()
    wait_full(pool)
    seen: dict[int, int] = {}
    for _ in range(12):
        with pool.get(timeout=10) as lease:
            assert lease.generation > seen.get(lease.slot, 0)
            seen[lease.slot] = lease.generation
            assert lease.instance.call("os:getpid") == lease.descriptor["pid"]
    assert set(seen) == {0, 1, 2}
    snap = wait_full(pool)
    assert snap["counters"]["spawns"] >= 3 + 12
    pool.close()


def test_release_is_idempotent_and_context_manager_releases(supervisor) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    with pool.get() as lease:
        pass
    assert lease.released
    assert lease.release() is False
    with pytest.raises(noodle.LeaseReleased):
        lease.instance
    with pytest.raises(ArithmeticError):  # any exception in the block still releases
        with pool.get() as lease2:
            raise ArithmeticError("boom")
    assert lease2.released
    pool.close()


def test_starved_get_then_success_once_published(supervisor) -> None:
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    wait_full(pool)
    held = pool.get(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(noodle.PoolStarved):
        pool.get(timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    held.release()
    lease = pool.get(timeout=30)  # waits on the futex until the refill publishes
    assert lease.slot == 0 and lease.generation > held.generation
    lease.release()
    assert pool.stats()["counters"]["acquire_waits"] >= 2
    pool.close()


def test_unhealthy_instance_on_get_is_replaced(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--health-on-get")
    pool = sup.attach()
    wait_full(pool)
    # kill the instance behind one ready slot without telling the pool
    with pool.get() as probe:
        victim_slot = probe.slot
    wait_full(pool)
    import msgpack

    victim = msgpack.unpackb(pool._seg.descriptor_bytes(victim_slot))
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: not is_alive(victim["pid"]), 10, "the instance to die")
    got = [pool.get(timeout=10) for _ in range(2)]
    for lease in got:
        assert lease.instance.run("'alive'").result == "alive"
        lease.release()
    assert pool.stats()["counters"]["unhealthy_on_get"] >= 1
    wait_full(pool)
    pool.close()


def test_aget_does_not_block_the_loop(supervisor) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)

    async def main() -> list[int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        a = await pool.aget(timeout=5)
        b = await pool.aget(timeout=5)
        # the third waits for a refill while the loop keeps ticking
        before = ticks
        c_task = asyncio.create_task(pool.aget(timeout=30))
        await asyncio.sleep(0.2)
        a.release()
        c = await c_task
        assert ticks > before
        t.cancel()
        slots = [a.slot, b.slot, c.slot]
        b.release()
        c.release()
        return slots

    slots = asyncio.run(main())
    assert sorted(slots[:2]) == [0, 1]
    pool.close()


def test_status_counts_always_sum_to_pool_size_under_churn(supervisor) -> None:
    sup = supervisor("--pool-size", "4", "--workers", "2")
    pool = sup.attach()
    wait_full(pool)
    for _ in range(40):
        with pool.get(timeout=10):
            s = pool.stats()
            assert sum(s["states"].values()) == 4
    pool.close()


def test_processes_are_named(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    titles = [t for _, t in pool_processes(pool_name)]
    for role in ("supervisor", "clean-worker", "prepare-worker", "spawn-worker", "terminate-worker", "zygote",
                 "instance"):
        assert any(f"noodle {role} {pool_name}" in t for t in titles), (role, titles)
    pool.close()


def test_graceful_shutdown_revokes_unreturned_leases(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2", "--drain-timeout", "0.5")
    pool = sup.attach()
    wait_full(pool)
    lease = pool.get()
    pid = lease.descriptor["pid"]
    t0 = time.monotonic()
    assert sup.stop() == 0
    assert time.monotonic() - t0 >= 0.5  # it waited for the lease
    assert not is_alive(pid)
    assert lease.release() is False  # too late: reclaimed, and the pool is gone
    pool.close()


def test_shutdown_waits_for_a_lease_returned_in_time(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--drain-timeout", "30")
    pool = sup.attach()
    wait_full(pool)
    lease = pool.get()
    sup.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: pool.stats()["shutting_down"], 10, "shutdown to begin")
    assert lease.instance.run("6 * 7").result == 42  # still usable while draining
    assert lease.release() is True
    assert sup.stop(timeout=30) == 0
    pool.close()
