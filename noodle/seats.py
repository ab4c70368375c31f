"""The supervisor's worker seats: forking, collecting and replacing stage
workers, and stopping them at shutdown.

A seat is one place for a worker of one stage (``workers = {spawn = 2}``
makes two spawn seats); its row in the worker table carries the worker's
heartbeat and step start. Each worker is tracked through its own process
handle (its exit code), never by a pid found in a system-wide wait:
``multiprocess`` collects finished children of its own whenever it starts
a new one, so a worker may be gone before any ``waitid`` sees it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import Any

import multiprocess

from noodle import layout as L
from noodle import lifecycle
from noodle.config import Config
from noodle.every import Every
from noodle.kinds import Kind
from noodle.segment import Segment
from noodle.shutdown import Shutdown
from noodle.workers import WORKER_BOOT_ERROR
from noodle.workers.stage import WorkerSpec, worker_main

log = logging.getLogger("noodle.supervisor")

STEP_GRACE = 2.0  # seconds past step_timeout before a worker in a step is killed
RESTART_WINDOW = 10.0  # seconds of restarts looked at to tell a crash loop


@dataclass
class WorkerSeat:
    """One worker place: its stage, its row in the worker table, and the
    worker now in it (``proc`` is its multiprocess handle; pid 0: empty)."""

    stage: str
    number: int  # per stage, for logs and the process title
    index: int  # row in the worker table
    proc: Any = None
    pid: int = 0
    started: float = 0.0  # monotonic seconds of the fork


class WorkerSeats:
    """Forks a worker into every empty seat, collects the ones that exit,
    puts back the slots a dead worker held, kills stuck ones, and stops them
    all at shutdown within a bound."""

    def __init__(self, cfg: Config, seg: Segment, kind: Kind, shutdown: Shutdown) -> None:
        self.cfg = cfg
        self.seg = seg
        self.kind = kind
        self.shutdown = shutdown
        self.policy = lifecycle.Policy(cfg.max_failures, cfg.abandon_cooldown)
        self.mp = multiprocess.get_context("fork")
        self.seats: list[WorkerSeat] = []
        for stage in lifecycle.STAGE_NAMES:
            for number in range(cfg.workers[stage]):
                self.seats.append(WorkerSeat(stage, number, len(self.seats)))
        self.table = L.WorkerTable.allocate(self.mp, len(self.seats))
        limit = cfg.max_concurrency
        self.permits: Any = self.mp.BoundedSemaphore(limit) if limit and limit < len(self.seats) else None
        self.by_pid: dict[int, WorkerSeat] = {}
        self.restart_times: list[float] = []
        self.stopping = False  # set once stop() began: nothing is replaced any more
        self.every = Every()

    # -- forking ------------------------------------------------------------------

    def top_up(self) -> None:
        """Fork a worker into every empty seat (slowly when they keep dying)."""
        if self.stopping or self.shutdown.exit_code:
            return
        now = time.monotonic()
        self.restart_times = [t for t in self.restart_times if now - t < RESTART_WINDOW]
        crash_looping = len(self.restart_times) > 4 * max(1, len(self.seats))
        for seat in self.seats:
            if seat.pid:
                continue
            if crash_looping and not self.every(f"restart-{seat.index}", 1.0):
                continue  # workers keep dying: slow restarts down, don't spin
            self.fork(seat)

    def fork(self, seat: WorkerSeat) -> None:
        spec = WorkerSpec(seat.stage, seat.index, seat.number, self.cfg, self.seg, self.kind, self.table,
                          self.permits, os.getpid())  # fmt: skip
        proc = self.mp.Process(target=worker_main, args=(spec,), name=f"{seat.stage}-worker-{seat.number}")
        proc.start()
        seat.proc, seat.pid, seat.started = proc, proc.pid, time.monotonic()
        self.by_pid[proc.pid] = seat

    # -- collecting ------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: workers through their own handles, then
        anything else (instances, kind helpers, orphans adopted as subreaper)."""
        for seat in self.seats:
            if seat.proc is not None and (code := _exit_code(seat.proc)) is not None:
                self.exited(seat, code)
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            exited = self.by_pid.get(info.si_pid)
            if exited is None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.si_pid, 0)
                continue
            # it exited after the pass above: its handle collects it now
            code = _exit_code(exited.proc) if exited.proc is not None else None
            if code is None:
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(info.si_pid, 0)
                    code = os.waitstatus_to_exitcode(status)
            self.exited(exited, code if code is not None else -1)

    def exited(self, seat: WorkerSeat, code: int) -> None:
        """The worker in ``seat`` is gone: free the seat and its permit, put
        its slots back, decide whether this is a failure."""
        pid = seat.pid
        self.by_pid.pop(pid, None)
        if self.table.holds_permit(seat.index) and self.permits is not None:
            self.permits.release()  # it died holding a permit
        self.table.clear(seat.index)
        seat.pid, seat.proc = 0, None
        if code == WORKER_BOOT_ERROR:
            self.shutdown.fail(self.seg, f"{seat.stage} worker {seat.number} failed to boot")
            return
        if self.stopping:
            pass  # we asked it to go
        elif code == 0 and self.shutdown.draining:
            # a stop signal sent to the whole process group reached it too
            log.info("%s worker %d (pid %d) left as the pool stops; replacing it to finish the drain",
                     seat.stage, seat.number, pid)  # fmt: skip
        else:
            log.warning("%s worker %d (pid %d) exited with %d; replacing it", seat.stage, seat.number, pid, code)
            self.seg.count("worker_restarts")
            self.restart_times.append(time.monotonic())
        self.put_back_slots_of(pid)
        # a task it had taken from the queue but not claimed died with it
        for slot, word in enumerate(self.seg.states()):
            stage = lifecycle.stage_of(L.word_state(word))
            if L.word_pid(word) == 0 and stage is not None and stage.name == seat.stage:
                self.seg.set_queued(slot, 0)

    def put_back_slots_of(self, pid: int) -> None:
        """Slots a dead worker held go where ``lifecycle.after_worker_death``
        says, owner 0, so that the supervisor feeds them again."""
        seg = self.seg
        for slot, word in enumerate(seg.states()):
            stage = lifecycle.stage_of(L.word_state(word))
            if L.word_pid(word) != pid or stage is None:
                continue
            gen, failures = L.word_gen(word), seg.record(slot).failures
            out = lifecycle.after_worker_death(stage, failures, self.policy)
            if out.failures != failures:
                seg.set_failures(slot, out.failures, stage.step)
            if out.retry_in is not None:
                seg.set_retry_at(slot, time.monotonic_ns() + int(out.retry_in * 1e9))
            if seg.core.cas(slot, word, L.make_word(out.state, gen, 0)) and out.abandoned:
                seg.count("abandoned")
                log.error("slot %d abandoned: its %s worker died %d times", slot, stage.name, out.failures)

    def kill_stuck(self) -> None:
        """A step past step_timeout, or no heartbeat for worker_timeout (a
        stopped or wedged worker): SIGKILL it; reap() puts its slots back."""
        now = time.monotonic_ns()
        for seat in self.seats:
            if not seat.pid:
                continue
            beat, step = self.table.beat(seat.index), self.table.step_started(seat.index)
            why = ""
            if step and now - step > (self.cfg.step_timeout + STEP_GRACE) * 1e9:
                why = f"its step ran {(now - step) / 1e9:.1f} s (step_timeout {self.cfg.step_timeout} s)"
            elif beat and now - beat > self.cfg.worker_timeout * 1e9:
                why = f"no heartbeat for {(now - beat) / 1e9:.1f} s"
            elif not beat and time.monotonic() - seat.started > self.cfg.worker_timeout:
                why = "it never started its loop"
            if why:
                log.error("killing %s worker %d (pid %d): %s", seat.stage, seat.number, seat.pid, why)
                self.seg.count("workers_killed_stuck")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(seat.pid, signal.SIGKILL)
                self.table.set_beat(seat.index, 0)
                self.table.set_step_started(seat.index, 0)
                seat.started = time.monotonic()

    def in_step(self, pid: int) -> bool | None:
        """Whether worker ``pid`` is in a step; None when it is none of ours."""
        seat = self.by_pid.get(pid)
        return None if seat is None else bool(self.table.step_started(seat.index))

    # -- stopping ----------------------------------------------------------------------

    def stop(self, grace: float = 5.0, kill_wait: float = 5.0) -> None:
        """SIGTERM every worker, SIGKILL what is left after ``grace``, and wait
        at most ``kill_wait`` more: a worker that outlives SIGKILL (stuck in
        the kernel) is reported and left, never waited for without end."""
        self.stopping = True
        self.reap()  # never signal the pid of a worker already gone
        for seat in self.seats:
            if seat.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(seat.pid, signal.SIGTERM)
        if self._wait_empty(grace):
            return
        for seat in self.seats:
            if seat.pid:
                log.warning("%s worker %d did not stop within %.0f s; killing it", seat.stage, seat.number, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(seat.pid, signal.SIGKILL)
        if self._wait_empty(kill_wait):
            return
        for seat in self.seats:
            if seat.pid:
                log.error("%s worker %d (pid %d) survives SIGKILL; giving up on it", seat.stage, seat.number, seat.pid)

    def _wait_empty(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while any(seat.pid for seat in self.seats):
            self.reap()
            if time.monotonic() >= deadline:
                return not any(seat.pid for seat in self.seats)
            time.sleep(0.01)
        return True


def _exit_code(proc: Any) -> int | None:
    """The worker's exit code, None while it runs. Its sentinel (a pipe end
    only the worker holds) reads EOF once it has exited, even when its exit
    status was collected by someone else: then the code is unknown, -1."""
    code = proc.exitcode
    if code is None:
        ready, _, _ = select.select([proc.sentinel], [], [], 0)
        if not ready:
            return None
        # it closes the sentinel a moment before its status can be collected
        proc.join(1.0)
        code = proc.exitcode
    return -1 if code is None else int(code)
