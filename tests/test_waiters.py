"""Blocked acquire: futex sleep in the segment, woken in arrival order."""

from __future__ import annotations

import os
import select
import time

import pytest

from noodle import layout as L
from noodle.segment import Segment
from tests.test_segment import make_ready


def _waiter(name: str, index: int, wfd: int, timeout_ns: int) -> None:
    seg = Segment.attach(name)
    status, _slot, _gen = seg.core.acquire(timeout_ns)
    os.write(wfd, bytes([index, status]))
    os._exit(0)


def _start_waiters(seg: Segment, name: str, n: int, timeout_ns: int) -> tuple[list[int], int]:
    r, w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _waiter(name, i, w, timeout_ns)
        pids.append(pid)
        # wait until this one is queued before starting the next: arrival order
        deadline = time.monotonic() + 10
        while True:
            _head, _tail, tickets, turn = seg.core.queue_info()
            if (tickets - turn) & 0xFFFFFFFF == i + 1 and seg.core.head_waiter()[2]:
                break
            assert time.monotonic() < deadline, "waiter never queued"
            time.sleep(0.001)
    os.close(w)
    return pids, r


def _read(r: int, timeout: float = 10.0) -> tuple[int, int]:
    ready, _, _ = select.select([r], [], [], timeout)
    assert ready, "no waiter woke"
    data = os.read(r, 2)
    return data[0], data[1]


@pytest.mark.timeout(60)
def test_waiters_are_served_in_arrival_order(pool_name: str) -> None:
    seg = Segment.create(pool_name, 8, "process")
    try:
        pids, r = _start_waiters(seg, pool_name, 5, 30_000_000_000)
        # a newcomer does not overtake the queue, even with a slot ready
        make_ready(seg, 0)
        first = _read(r)
        assert first == (0, L.Status.OK)
        assert seg.core.acquire(0)[0] == L.Status.EMPTY
        order = [first[0]]
        for slot in range(1, 5):
            make_ready(seg, slot)
            idx, status = _read(r)
            assert status == L.Status.OK
            order.append(idx)
        assert order == [0, 1, 2, 3, 4]
        assert seg.counters()["wakeups"] >= 4
        for pid in pids:
            os.waitpid(pid, 0)
        assert seg.core.head_waiter() is None
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.timeout(60)
def test_shutdown_wakes_every_waiter(pool_name: str) -> None:
    seg = Segment.create(pool_name, 4, "process")
    try:
        pids, r = _start_waiters(seg, pool_name, 6, 60_000_000_000)
        seg.core.shutdown()
        woke = sorted(_read(r) for _ in range(6))
        assert woke == [(i, L.Status.SHUTDOWN) for i in range(6)]
        for pid in pids:
            os.waitpid(pid, 0)
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.timeout(60)
def test_timed_out_waiter_does_not_block_the_line(pool_name: str) -> None:
    """The head waiter times out; the one behind it still gets the next slot."""
    seg = Segment.create(pool_name, 4, "process")
    try:
        r1, w1 = os.pipe()
        pid1 = os.fork()
        if pid1 == 0:
            _waiter(pool_name, 0, w1, 200_000_000)  # gives up after 0.2 s
        deadline = time.monotonic() + 10
        while seg.core.head_waiter() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        r2, w2 = os.pipe()
        pid2 = os.fork()
        if pid2 == 0:
            _waiter(pool_name, 1, w2, 30_000_000_000)
        os.close(w1)
        os.close(w2)
        assert _read(r1) == (0, L.Status.EMPTY)  # timed out
        make_ready(seg, 0)
        assert _read(r2) == (1, L.Status.OK)
        os.waitpid(pid1, 0)
        os.waitpid(pid2, 0)
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.timeout(60)
def test_dead_head_waiter_is_skipped(pool_name: str) -> None:
    """A waiter SIGKILLed while queued holds the turn until the sweep passes it on."""
    import signal

    seg = Segment.create(pool_name, 4, "process")
    try:
        pids, r = _start_waiters(seg, pool_name, 2, 30_000_000_000)
        os.kill(pids[0], signal.SIGKILL)
        os.waitpid(pids[0], 0)
        ticket, pid, registered, _start = seg.core.head_waiter()
        assert pid == pids[0] and registered
        assert seg.core.skip_waiter(ticket)
        make_ready(seg, 0)
        assert _read(r) == (1, L.Status.OK)
        os.waitpid(pids[1], 0)
    finally:
        seg.close()
        seg.unlink()
