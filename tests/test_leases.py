"""Lease reclaim against real processes: a holder is revoked on evidence of
death only (issue 9 item 11), with a real supervisor."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

import noodle
from noodle import layout as L
from tests.conftest import wait_for, wait_full


@pytest.mark.timeout(180)
def test_zombie_holder_lease_is_reclaimed(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    # holds a lease and exits; we do not reap it: a zombie holder
    pid, slot = _forked_holder(pool_name, lambda lease: None)
    try:
        wait_for(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 30, "a zombie")
        assert L.word_pid(pool._seg.core.load(slot)) == pid
        wait_for(lambda: pool.stats()["counters"]["reclaimed_leases"] >= 1, 30, "the zombie's lease to be reclaimed")
        wait_full(pool)
    finally:
        os.waitpid(pid, 0)
    pool.close()


@pytest.mark.timeout(180)
def test_stopped_holder_keeps_its_lease(supervisor, pool_name: str) -> None:
    """Alive but not running is alive: the lease stays with it."""
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    wait_full(pool)

    def stop_then_release(lease: Any) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)
        lease.release()

    pid, slot = _forked_holder(pool_name, stop_then_release)
    try:
        word = pool._seg.core.load(slot)
        assert L.word_state(word) == L.State.LEASED and L.word_pid(word) == pid
        # several reclaim passes (every 0.25 s) go by: the word must not change
        wait_for(lambda: pool.stats()["counters"]["acquires"] >= 1 and pool._seg.heartbeat_age() < 1, 30, "a beat")
        before = pool.stats()["counters"]["reclaimed_leases"]
        for _ in range(3):
            beat = pool._seg.core.load64(L.OFF_HEARTBEAT)
            wait_for(lambda b=beat: pool._seg.core.load64(L.OFF_HEARTBEAT) > b + 300_000_000, 30, "a later tick")
        assert pool._seg.core.load(slot) == word
        assert pool.stats()["counters"]["reclaimed_leases"] == before
    finally:
        os.kill(pid, signal.SIGCONT)
        os.waitpid(pid, 0)
    wait_full(pool)
    pool.close()


def _forked_holder(pool_name: str, then: Callable[[Any], None]) -> tuple[int, int]:
    """Fork a child that leases an instance of the pool, reports the slot,
    runs ``then(lease)`` and exits (unreaped: the caller waits for it).
    Returns (child pid, slot)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            lease = noodle.attach(pool_name).get(timeout=30)
            os.write(w, lease.slot.to_bytes(4, "little"))
            then(lease)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    slot = int.from_bytes(os.read(r, 4), "little")
    os.close(r)
    return pid, slot
