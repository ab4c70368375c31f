"""Small unit tests of the supervisor's decisions. The segment is real;
only forking is replaced, so each decision is checked in isolation. Every
behaviour here also has a real-process test (test_faults, tests/chaos)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from noodle import config as cfgmod
from noodle import layout as L
from noodle.errors import ConfigError
from noodle.segment import Segment
from noodle.supervisor import Supervisor, WorkerSlot
from workers import WORKER_BOOT_ERROR
from workers.stage import FIELDS_PER_WORKER


@pytest.fixture
def sup(pool_name: str, run_root: str):
    cfg = cfgmod.from_mapping({"name": pool_name, "pool_size": 4, "run_dir": run_root, "max_failures": 2})
    s = Supervisor(cfg)
    s.seg = Segment.create(pool_name, 4, "process")
    s.table = [0] * (FIELDS_PER_WORKER * 4)
    s.slots = [WorkerSlot(stage, 0, i) for i, stage in enumerate(("clean", "prepare", "spawn", "terminate"))]
    yield s
    s.seg.close()
    s.seg.unlink()


def own(seg: Segment, slot: int, state: L.State, gen: int, pid: int) -> None:
    seg.core.store64(seg.geometry.slot_off(slot), L.make_word(state, gen, pid))


def test_worker_exit_code_3_halts_instead_of_restarting(sup: Supervisor) -> None:
    w = sup.slots[2]
    sup.worker_exited(w, 4242, WORKER_BOOT_ERROR)
    assert sup.fatal and sup.draining
    assert sup.hard_deadline <= time.monotonic()
    forked = []
    sup.fork_worker = forked.append  # type: ignore[method-assign]
    sup.top_up_workers()
    assert forked == []  # no crash loop
    assert sup.seg.counters()["worker_restarts"] == 0


def test_dead_spawn_worker_slot_goes_to_clean_with_backoff(sup: Supervisor) -> None:
    own(sup.seg, 1, L.State.SPAWN, 5, 4242)
    own(sup.seg, 2, L.State.TERMINATE, 6, 4242)
    own(sup.seg, 3, L.State.SPAWN, 7, 999)  # another worker's: untouched
    before = time.monotonic_ns()
    sup.worker_exited(sup.slots[2], 4242, -9)
    w1, w2, w3 = (sup.seg.core.load(s) for s in (1, 2, 3))
    assert (L.word_state(w1), L.word_gen(w1), L.word_pid(w1)) == (L.State.CLEAN, 5, 0)
    assert sup.seg.record(1).failures == 1 and sup.seg.record(1).retry_at_ns >= before + 100_000_000
    assert (L.word_state(w2), L.word_pid(w2)) == (L.State.TERMINATE, 0)  # terminate stays terminate
    assert L.word_pid(w3) == 999
    assert sup.seg.counters()["worker_restarts"] == 1


def test_slot_whose_worker_keeps_dying_is_abandoned(sup: Supervisor) -> None:
    sup.seg.set_failures(1, 2)
    own(sup.seg, 1, L.State.PREPARE, 3, 4242)
    sup.worker_exited(sup.slots[1], 4242, -9)
    assert L.word_state(sup.seg.core.load(1)) == L.State.ABANDONED
    assert sup.seg.counters()["abandoned"] == 1


def test_permit_held_by_a_dead_worker_is_returned(sup: Supervisor) -> None:
    released = []

    class Permits:
        def release(self) -> None:
            released.append(1)

    sup.permits = Permits()
    sup.table[1 * FIELDS_PER_WORKER + 2] = 1  # HOLDS_PERMIT of the prepare worker
    sup.worker_exited(sup.slots[1], 4242, -9)
    assert released == [1]


def test_crash_looping_workers_are_restarted_slowly(sup: Supervisor) -> None:
    forked: list[WorkerSlot] = []
    sup.fork_worker = forked.append  # type: ignore[method-assign]
    sup.restart_times = [time.monotonic()] * 100
    sup.top_up_workers()
    sup.top_up_workers()
    assert len(forked) == 4  # one per worker slot, not one per pass


def test_backlog_feed_honours_backoff_and_queued_marks(sup: Supervisor) -> None:
    sent: list[tuple[str, int]] = []

    class Q:
        def __init__(self, stage: str) -> None:
            self.stage = stage

    import noodle.supervisor as supmod

    sup.queues = {s: Q(s) for s in ("clean", "prepare", "spawn", "terminate")}
    orig = supmod.queues.send_nowait
    supmod.queues.send_nowait = lambda q, slot, gen: sent.append((q.stage, slot)) or True  # type: ignore[assignment]
    try:
        now = time.monotonic_ns()
        sup.seg.set_retry_at(0, now + 10**10)  # backing off
        sup.seg.set_queued(1, now + 1)  # already queued
        sup.feed_backlogs()
    finally:
        supmod.queues.send_nowait = orig  # type: ignore[assignment]
    assert sorted(sent) == [("clean", 2), ("clean", 3)]


def test_config_flags_override_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('name = "a"\npool_size = 3\nworkers = {spawn = 4}\n[kinds.process]\npreload = ["json"]\n')
    cfg = cfgmod.load(str(f), {"pool_size": 9, "name": None})
    assert (cfg.name, cfg.pool_size) == ("a", 9)
    assert cfg.workers == {"clean": 1, "prepare": 1, "spawn": 4, "terminate": 1}
    assert cfg.kind_options == {"preload": ["json"]}
    with pytest.raises(ConfigError, match="--config: no such file"):
        cfgmod.load(str(tmp_path / "missing.toml"), {})
    assert os.path.basename(cfgmod.from_mapping({"name": "x"}).resolved_run_dir()) == "x"
