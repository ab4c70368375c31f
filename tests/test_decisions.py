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
from noodle import lifecycle
from noodle.errors import ConfigError
from noodle.housekeeping import SlotHousekeeping
from noodle.seats import WorkerSeat, WorkerSeats
from noodle.segment import Segment
from noodle.shutdown import EXIT_ERROR, Halt, Shutdown
from noodle.systemd import Notifier
from noodle.workers import WORKER_BOOT_ERROR


class Seats:
    """Real seats, shutdown and housekeeping on a real segment; nothing forked."""

    def __init__(self, pool_name: str, run_root: str) -> None:
        cfg = cfgmod.from_mapping({"name": pool_name, "pool_size": 4, "run_dir": run_root, "max_failures": 2})
        self.seg = Segment.create(pool_name, 4, "process")
        self.shutdown = Shutdown(cfg, Notifier())
        self.workers = WorkerSeats(cfg, self.seg, kind=None, shutdown=self.shutdown)  # type: ignore[arg-type]
        self.queues: dict[str, object] = {}
        self.chores = SlotHousekeeping(cfg, self.seg, self.queues, self.workers, self.shutdown)  # type: ignore[arg-type]

    def seat(self, stage: str) -> WorkerSeat:
        return next(s for s in self.workers.seats if s.stage == stage)

    def occupy(self, stage: str, pid: int) -> WorkerSeat:
        seat = self.seat(stage)
        seat.pid = pid
        self.workers.by_pid[pid] = seat
        return seat


@pytest.fixture
def sup(pool_name: str, run_root: str):
    s = Seats(pool_name, run_root)
    yield s
    s.seg.close()
    s.seg.unlink()


def own(seg: Segment, slot: int, state: L.State, gen: int, pid: int) -> None:
    seg.core.store64(seg.geometry.slot_off(slot), L.make_word(state, gen, pid))


def test_worker_exit_code_3_halts_instead_of_restarting(sup: Seats) -> None:
    sup.workers.exited(sup.occupy("spawn", 4242), WORKER_BOOT_ERROR)
    assert sup.shutdown.draining and sup.shutdown.exit_code == EXIT_ERROR
    forked: list[WorkerSeat] = []
    sup.workers.fork = forked.append  # type: ignore[method-assign]
    sup.workers.top_up()
    assert forked == []  # no crash loop
    assert sup.seg.counters()["worker_restarts"] == 0
    with pytest.raises(Halt) as halt:
        sup.shutdown.drain(sup.seg)  # the hard deadline is now
    assert halt.value.code == EXIT_ERROR


def test_dead_spawn_worker_slot_goes_to_clean_with_backoff(sup: Seats) -> None:
    own(sup.seg, 1, L.State.SPAWN, 5, 4242)
    own(sup.seg, 2, L.State.TERMINATE, 6, 4242)
    own(sup.seg, 3, L.State.SPAWN, 7, 999)  # another worker's: untouched
    before = time.monotonic_ns()
    sup.workers.exited(sup.occupy("spawn", 4242), -9)
    w1, w2, w3 = (sup.seg.core.load(s) for s in (1, 2, 3))
    assert (L.word_state(w1), L.word_gen(w1), L.word_pid(w1)) == (L.State.CLEAN, 5, 0)
    assert sup.seg.record(1).failures == 1 and sup.seg.record(1).retry_at_ns >= before + 100_000_000
    assert (L.word_state(w2), L.word_pid(w2)) == (L.State.TERMINATE, 0)  # terminate stays terminate
    assert L.word_pid(w3) == 999
    assert sup.seg.counters()["worker_restarts"] == 1


def test_slot_whose_worker_keeps_dying_is_abandoned(sup: Seats) -> None:
    sup.seg.set_failures(1, 2)
    own(sup.seg, 1, L.State.PREPARE, 3, 4242)
    sup.workers.exited(sup.occupy("prepare", 4242), -9)
    assert L.word_state(sup.seg.core.load(1)) == L.State.ABANDONED
    assert sup.seg.counters()["abandoned"] == 1


def test_worker_leaving_during_the_drain_is_no_failure(sup: Seats) -> None:
    sup.shutdown.begin(sup.seg)
    sup.workers.exited(sup.occupy("clean", 4242), 0)
    assert sup.seg.counters()["worker_restarts"] == 0
    sup.workers.exited(sup.occupy("clean", 4243), -9)  # a crash still is one
    assert sup.seg.counters()["worker_restarts"] == 1


def test_permit_held_by_a_dead_worker_is_returned(sup: Seats) -> None:
    released = []

    class Permits:
        def release(self) -> None:
            released.append(1)

    sup.workers.permits = Permits()
    seat = sup.occupy("prepare", 4242)
    sup.workers.table.set_holds_permit(seat.index, True)
    sup.workers.exited(seat, -9)
    assert released == [1]
    assert not sup.workers.table.holds_permit(seat.index)


def test_crash_looping_workers_are_restarted_slowly(sup: Seats) -> None:
    forked: list[WorkerSeat] = []
    sup.workers.fork = forked.append  # type: ignore[method-assign]
    sup.workers.restart_times = [time.monotonic()] * 100
    sup.workers.top_up()
    sup.workers.top_up()
    assert len(forked) == 4  # one per worker seat, not one per pass


def test_backlog_feed_honours_backoff_and_queued_marks(sup: Seats, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, int]] = []

    class Q:
        def __init__(self, stage: str) -> None:
            self.stage = stage

    from noodle import queues

    sup.queues.update({s: Q(s) for s in lifecycle.STAGE_NAMES})
    monkeypatch.setattr(queues, "send_nowait", lambda q, slot, gen: sent.append((q.stage, slot)) or True)
    now = time.monotonic_ns()
    sup.seg.set_retry_at(0, now + 10**10)  # backing off
    sup.seg.set_queued(1, now + 1)  # already queued
    sup.chores.feed_backlogs()
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
