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


# ---- issue 9 items 5-9: close, signals, stopped and reused waiters, overflow ----------------

import select as _select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from noodle.holders import TURN_HOLD_S, TurnWatch  # noqa: E402
from tests.conftest import REPO  # noqa: E402


def _script(name: str, body: str) -> subprocess.Popen[str]:
    code = f"import asyncio, os, signal, sys, threading, time\nimport noodle\nNAME = {name!r}\n{body}"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip


def _line(p: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The child's next output line; '' if none came (a hang detector, not a speed bound)."""
    assert p.stdout is not None
    ready, _, _ = _select.select([p.stdout], [], [], timeout)
    return p.stdout.readline().strip() if ready else ""


def _queued(seg: Segment, n: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        _h, _t, tickets, turn = seg.core.queue_info()
        head = seg.core.head_waiter()
        if (tickets - turn) & 0xFFFFFFFF == n and head is not None and head[2]:
            return
        assert time.monotonic() < deadline, "waiters never queued"
        time.sleep(0.005)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["get", "aget"])
def test_close_while_other_threads_wait_raises_pool_closed(bare_pool: Segment, pool_name: str, how: str) -> None:
    body = {
        "get": """
pool = noodle.attach(NAME)
out = []
def wait():
    try:
        pool.get(timeout=None)
        out.append("got")
    except noodle.PoolClosed:
        out.append("closed")
ts = [threading.Thread(target=wait) for _ in range(3)]
for t in ts: t.start()
print("ready", flush=True)
sys.stdin.readline()
pool.close()
for t in ts: t.join()
print(",".join(sorted(out)), flush=True)
""",
        "aget": """
async def main():
    pool = noodle.attach(NAME)
    tasks = [asyncio.ensure_future(pool.aget(timeout=None)) for _ in range(3)]
    await asyncio.sleep(0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    pool.close()
    res = await asyncio.gather(*tasks, return_exceptions=True)
    print(",".join(sorted("closed" if isinstance(r, noodle.PoolClosed) else repr(r) for r in res)), flush=True)
asyncio.run(main())
""",
    }[how]
    code = f"import asyncio, os, signal, sys, threading, time\nimport noodle\nNAME = {pool_name!r}\n{body}"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    try:
        assert _line(p) == "ready"
        # three threads hold three tickets; asyncio waiters share their
        # Pool's one waiter thread (noodle.aio), so they hold one
        _queued(bare_pool, 3 if how == "get" else 1)
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
        assert _line(p) == "closed,closed,closed"
        assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
        assert bare_pool.core.head_waiter() is None  # every ticket was given up
    finally:
        p.kill()
        p.wait()


@pytest.mark.timeout(120)
def test_sigint_reaches_a_get_blocked_for_ever(bare_pool: Segment, pool_name: str) -> None:
    p = _script(pool_name, """
pool = noodle.attach(NAME)
print("ready", flush=True)
try:
    pool.get(timeout=None)
    print("got", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
""")
    try:
        assert _line(p) == "ready"
        _queued(bare_pool, 1)
        p.send_signal(signal.SIGINT)
        assert _line(p) == "interrupted"
        assert p.wait(60) == 0
        assert bare_pool.core.head_waiter() is None  # the ticket was cancelled, not left to the sweep
        make_ready(bare_pool, 0)
        assert bare_pool.core.acquire(0)[0] == L.Status.OK
    finally:
        p.kill()
        p.wait()


@pytest.mark.timeout(120)
def test_signal_handler_runs_and_the_wait_resumes_in_place(bare_pool: Segment, pool_name: str) -> None:
    p = _script(pool_name, """
signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
pool = noodle.attach(NAME)
print("ready", flush=True)
lease = pool.get(timeout=120)
print("got", lease.slot, flush=True)
lease.release()
""")
    try:
        assert _line(p) == "ready"
        _queued(bare_pool, 1)
        ticket = bare_pool.core.head_waiter()[0]
        p.send_signal(signal.SIGUSR1)
        assert _line(p) == "handled"  # while still blocked in get()
        _queued(bare_pool, 1)
        assert bare_pool.core.head_waiter()[0] == ticket  # same place in line
        make_ready(bare_pool, 2)
        assert _line(p) == "got 2"
        assert p.wait(60) == 0
    finally:
        p.kill()
        p.wait()


@pytest.mark.timeout(120)
def test_stopped_head_waiter_loses_its_turn_and_requeues(pool_name: str) -> None:
    seg = Segment.create(pool_name, 4, "process")
    try:
        pids, r = _start_waiters(seg, pool_name, 2, 60_000_000_000)
        os.kill(pids[0], signal.SIGSTOP)
        make_ready(seg, 0)  # wakes the head, which cannot run
        watch = TurnWatch()
        t = time.monotonic()
        assert watch.check(seg, t) is None
        assert watch.check(seg, t + 0.1) is None  # not yet: within the bound
        skip = watch.check(seg, t + TURN_HOLD_S + 0.1)
        assert skip is not None and skip[1] == pids[0] and "stopped" in skip[2]
        assert seg.core.skip_waiter(skip[0])
        assert _read(r) == (1, L.Status.OK)  # the one behind it is served
        os.kill(pids[0], signal.SIGCONT)
        _queued(seg, 1)  # the stopped one queued again when it ran
        make_ready(seg, 1)
        assert _read(r) == (0, L.Status.OK)
        for pid in pids:
            os.waitpid(pid, 0)
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.timeout(60)
def test_dead_waiter_whose_pid_is_reused_is_skipped(pool_name: str) -> None:
    seg = Segment.create(pool_name, 4, "process")
    try:
        pids, _r = _start_waiters(seg, pool_name, 1, 60_000_000_000)
        ticket = seg.core.head_waiter()[0]
        os.kill(pids[0], signal.SIGKILL)
        os.waitpid(pids[0], 0)
        # its pid now names another live process (this one): only the start time tells them apart
        off = seg.geometry.cells_off + 16 * (ticket % seg.header.wait_cells)
        seg.core.store64(off, (ticket << 32) | os.getpid())
        skip = TurnWatch().check(seg)
        assert skip is not None and skip[0] == ticket and skip[2] == "is gone"
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.timeout(120)
def test_overflow_waiters_beyond_the_wait_cells_are_all_served(pool_name: str) -> None:
    seg = Segment.create(pool_name, 4, "process", wait_cells=1)
    try:
        r, w = os.pipe()
        pids = []
        for i in range(4):
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _waiter(pool_name, i, w, 60_000_000_000)
            pids.append(pid)
        os.close(w)
        deadline = time.monotonic() + 30
        while seg.core.load64(456) & 0xFFFFFFFF != 3:  # H_OVERFLOW: three sleep for the one cell
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for slot in range(4):
            make_ready(seg, slot)
            assert _read(r)[1] == L.Status.OK
        for pid in pids:
            os.waitpid(pid, 0)
        assert seg.core.head_waiter() is None
    finally:
        seg.close()
        seg.unlink()


def test_dropped_lease_is_released_by_its_holder_only(bare_pool: Segment, pool_name: str) -> None:
    import gc
    import warnings

    import noodle

    pool = noodle.attach(pool_name)
    try:
        make_ready(bare_pool, 0)
        lease = pool.get(timeout=0)
        slot = lease.slot
        with pytest.warns(ResourceWarning, match="never released"):
            del lease
            gc.collect()
        assert L.word_state(bare_pool.core.load(slot)) == L.State.TERMINATE
        make_ready(bare_pool, 1)
        kept = pool.get(timeout=0)
        assert kept.release()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            del kept  # released: dropping it is silent
            gc.collect()
    finally:
        pool.close()
