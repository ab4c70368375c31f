"""Chaos at the edges of the core: stopped waiters, scribbled ring words,
handles closed under waiting threads, SIGINT in a blocked get().

Same invariants as test_chaos.py: after every round every slot is ready
again, the instances alive are exactly those of the ready slots, the state
counts sum to pool_size at every sample, and nothing is left at teardown.
Each test prints a `CHAOS <fault>: ...` line with its counts.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

import noodle
from tests.chaos.test_chaos import POOL_SIZE, Clients, Sampler, config, report, rounds_for, settle_and_check
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(900)
H_TAIL, H_HEAD = 320, 384


def _blocked_client(name: str, body: str) -> subprocess.Popen[str]:
    code = f"import noodle, sys\npool = noodle.attach({name!r})\nprint('ready', flush=True)\n{body}"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip


def _line(p: subprocess.Popen[str], timeout: float = 60.0) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline().strip() if ready else ""


def _waiters(pool: noodle.Pool) -> int:
    _h, _t, tickets, turn = pool._seg.core.queue_info()
    return (tickets - turn) & 0xFFFFFFFF


def test_chaos_stopped_waiter(supervisor, pool_name: str, clients: Clients, soak: bool) -> None:
    """A client stopped (SIGSTOP) while queued must not stop the others; it
    queues again and is served after SIGCONT."""
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rounds = rounds_for(soak)
    sampler = Sampler(pool)
    sampler.start()
    served_while_stopped = 0
    for _ in range(rounds):
        held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]  # drain: the next get queues
        victim = _blocked_client(pool_name, "lease = pool.get(timeout=None)\nprint('got', flush=True)\n"
                                            "lease.release()\n")  # fmt: skip
        assert _line(victim) == "ready"
        wait_for(lambda: _waiters(pool) == 1, 30, "the victim to queue")
        victim.send_signal(signal.SIGSTOP)
        clients.start(3)  # queue behind the stopped head
        for lease in held:
            lease.release()
        before = pool.stats()["counters"]["acquires"]
        wait_for(lambda b=before: pool.stats()["counters"]["acquires"] >= b + 3, 60,
                 "clients behind a stopped waiter to be served")  # fmt: skip
        served_while_stopped += pool.stats()["counters"]["acquires"] - before
        victim.send_signal(signal.SIGCONT)
        assert _line(victim) == "got"
        assert victim.wait(60) == 0
        clients.stop()
        settle_and_check(pool, sup.pid, pool_name)
    sampler.finish()
    c = pool.stats()["counters"]
    assert c["waiters_skipped"] >= rounds
    assert clients.totals["wrong_result"] == 0 and not clients.totals["other_errors"], clients.totals
    report("queued waiter SIGSTOP/SIGCONT", rounds, waiters_skipped=c["waiters_skipped"],
           served_while_stopped=served_while_stopped, gets=clients.totals["gets"], samples=sampler.samples,
           lost=0)  # fmt: skip
    pool.close()


def test_chaos_ring_scribbles(supervisor, pool_name: str, clients: Clients, soak: bool) -> None:
    """Random values written into head, tail or one ring cell while clients
    run: nothing spins, the integrity check rebuilds, every slot comes back."""
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rng = random.Random(9)
    rounds = rounds_for(soak)
    sampler = Sampler(pool)
    sampler.start()
    seg = pool._seg
    hits: dict[str, int] = {}
    for _ in range(rounds):
        clients.start(4)
        for _ in range(3):
            what = rng.choice(["head", "tail", "cell"])
            hits[what] = hits.get(what, 0) + 1
            if what == "cell":
                cell = rng.randrange(seg.header.ring_capacity)
                seg.core.store64(seg.geometry.ring_off + 8 * cell, rng.getrandbits(64))
            else:
                seg.core.store64(H_HEAD if what == "head" else H_TAIL, rng.getrandbits(64))
            wait_for(lambda: seg.core.ring_anomalies()[2] == 0, 60, "the ring to be repaired")
        clients.stop()
        settle_and_check(pool, sup.pid, pool_name)
    sampler.finish()
    c = pool.stats()["counters"]
    assert c["corruption_repairs"] >= 1
    assert clients.totals["wrong_result"] == 0 and not clients.totals["other_errors"], clients.totals
    report("ring head/tail/cell scribbles", rounds, scribbles=hits, repairs=c["corruption_repairs"],
           ring_repushes=c["ring_repushes"], gets=clients.totals["gets"], samples=sampler.samples,
           lost=0)  # fmt: skip
    pool.close()


def test_chaos_close_under_waiting_threads(supervisor, pool_name: str, soak: bool) -> None:
    """Threads wait in get() and aget() on one handle; closing it wakes them
    with PoolClosed (no crash), and the pool loses nothing."""
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rounds = rounds_for(soak)
    outcomes: dict[str, int] = {}
    sampler = Sampler(pool)
    sampler.start()
    for _ in range(rounds):
        held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]
        other = noodle.attach(pool_name)
        results: list[str] = []

        def wait_get(handle: noodle.Pool = other) -> None:
            try:
                handle.get(timeout=None).release()
                results.append("got")
            except noodle.PoolClosed:
                results.append("closed")

        def wait_aget(handle: noodle.Pool = other) -> None:
            async def one() -> Any:
                return await handle.aget(timeout=None)

            try:
                asyncio.run(one()).release()
                results.append("got")
            except noodle.PoolClosed:
                results.append("closed")

        threads = [threading.Thread(target=f) for f in (wait_get, wait_get, wait_aget, wait_aget)]
        for t in threads:
            t.start()
        wait_for(lambda: _waiters(pool) == 4, 30, "four waiters to queue")
        other.close()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert results == ["closed"] * 4, results
        for r in results:
            outcomes[r] = outcomes.get(r, 0) + 1
        assert _waiters(pool) == 0
        for lease in held:
            lease.release()
        settle_and_check(pool, sup.pid, pool_name)
    sampler.finish()
    report("close under waiting get()/aget() threads", rounds, outcomes=outcomes, samples=sampler.samples, lost=0)
    pool.close()


def test_chaos_sigint_to_blocked_get(supervisor, pool_name: str, soak: bool) -> None:
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rounds = rounds_for(soak)
    interrupted = 0
    sampler = Sampler(pool)
    sampler.start()
    for _ in range(rounds):
        held = [pool.get(timeout=30) for _ in range(POOL_SIZE)]
        p = _blocked_client(pool_name, "try:\n    pool.get(timeout=None)\nexcept KeyboardInterrupt:\n"
                                       "    print('interrupted', flush=True)\n")  # fmt: skip
        assert _line(p) == "ready"
        wait_for(lambda: _waiters(pool) == 1, 30, "the client to queue")
        p.send_signal(signal.SIGINT)
        assert _line(p) == "interrupted"
        assert p.wait(60) == 0
        interrupted += 1
        assert _waiters(pool) == 0  # it gave up its place itself
        for lease in held:
            lease.release()
        settle_and_check(pool, sup.pid, pool_name)
    sampler.finish()
    assert pool.stats()["counters"]["waiters_skipped"] == 0
    report("SIGINT to a blocked get()", rounds, interrupted=interrupted, samples=sampler.samples, lost=0)
    pool.close()
