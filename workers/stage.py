"""The loop of one stage worker.

    receive [1, slot, gen] -> CAS (stage, gen, 0) -> (stage, gen, me)
        -> run the kind's step (bounded by step_timeout)
        -> success: CAS to the next state, send the next stage's task
        -> failure: record it, CAS to clean (or abandoned) with a backoff
                    time the supervisor honours; never sleep here

A task whose CAS fails is stale (the slot moved on, or another worker has
it) and is dropped. Shared state lives only in the slot table, so a worker
can be SIGKILLed at any instruction: the supervisor sees the slot owned by
a dead pid and puts it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import msgpack
import posix_ipc
from setproctitle import setproctitle

from noodle import layout as L
from noodle import queues
from noodle.config import Config
from noodle.kinds import Kind
from noodle.segment import Segment

log = logging.getLogger("noodle.worker")

STAGE_STATE = {
    "clean": L.State.CLEAN,
    "prepare": L.State.PREPARE,
    "spawn": L.State.SPAWN,
    "terminate": L.State.TERMINATE,
}
STAGE_STEP = {"clean": L.Step.CLEAN, "prepare": L.Step.PREPARE, "spawn": L.Step.SPAWN, "terminate": L.Step.TERMINATE}
DONE_COUNTER = {"clean": "cleans", "prepare": "prepares", "spawn": "spawns", "terminate": "terminates"}
PR_SET_PDEATHSIG = 1

# Worker table fields, per worker: [heartbeat_ns, step_started_ns, holds_permit]
BEAT, STEP_STARTED, HOLDS_PERMIT = 0, 1, 2
FIELDS_PER_WORKER = 3


class StepTimeout(Exception):
    """The step ran past step_timeout (raised from SIGALRM)."""


@dataclass
class WorkerContext:
    """What a worker inherits from the supervisor across fork."""

    stage: str
    index: int  # position in the worker table
    number: int  # per-stage number, for the process title
    cfg: Config
    seg: Segment
    kind: Kind
    table: Any  # multiprocess RawArray('Q'), FIELDS_PER_WORKER per worker
    permits: Any  # multiprocess Semaphore or None
    supervisor_pid: int


class Worker:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.seg = ctx.seg
        self.core = ctx.seg.core
        self.kind = ctx.kind
        self.stage = ctx.stage
        self.state = STAGE_STATE[ctx.stage]
        self.pid = os.getpid()
        self.stopping = False
        self.queue = queues.open_queue(ctx.cfg.name, ctx.stage)
        # open_queue's descriptors are non-blocking (senders must never
        # wait); on one, receive(timeout) returns EAGAIN at once and this
        # loop would spin a CPU while idle, starving the steps and the jobs
        self.queue.block = True
        self.senders = {s: queues.open_queue(ctx.cfg.name, s) for s in queues.STAGES}
        self._base = ctx.index * FIELDS_PER_WORKER

    # -- worker table -----------------------------------------------------------

    def _set(self, field: int, value: int) -> None:
        self.ctx.table[self._base + field] = value

    def beat(self) -> None:
        self._set(BEAT, time.monotonic_ns())

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        while not self.stopping:
            self.beat()
            if os.getppid() != self.ctx.supervisor_pid:
                log.error("supervisor %d is gone; %s worker exits", self.ctx.supervisor_pid, self.stage)
                return 1
            try:
                raw, _prio = self.queue.receive(timeout=1.0)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                continue
            self.handle(raw)
        return 0

    def handle(self, raw: bytes) -> None:
        try:
            slot, gen = queues.decode(raw, self.seg.pool_size)
        except queues.BadMessage as exc:
            self.seg.count("bad_messages")
            log.warning("%s queue: dropped a bad message: %s", self.stage, exc)
            return
        if self.seg.shutting_down and self.stage in ("prepare", "spawn"):
            return  # no refilling during shutdown; the supervisor cleans these
        rec = self.seg.record(slot)
        if rec.retry_at_ns and time.monotonic_ns() < rec.retry_at_ns:
            self.seg.count("stale_messages")  # early duplicate: the backoff stands
            return
        idle = L.make_word(self.state, gen, 0)
        mine = L.make_word(self.state, gen, self.pid)
        if not self.core.cas(slot, idle, mine):
            self.seg.count("stale_messages")
            return
        if rec.queued_ns:
            self.seg.observe("dispatch", time.monotonic_ns() - rec.queued_ns)
        self._set(STEP_STARTED, time.monotonic_ns())
        try:
            self.with_permit(lambda: self.step(slot, gen, mine))
        finally:
            self._set(STEP_STARTED, 0)

    def with_permit(self, fn: Callable[[], None]) -> None:
        permits = self.ctx.permits
        if permits is None:
            fn()
            return
        while not permits.acquire(timeout=1.0):
            self.beat()
            self._set(STEP_STARTED, time.monotonic_ns())  # waiting is not running
        self._set(HOLDS_PERMIT, 1)
        try:
            fn()
        finally:
            self._set(HOLDS_PERMIT, 0)
            permits.release()

    def step(self, slot: int, gen: int, mine: int) -> None:
        ctx = self.kind.pool.slot(slot)
        t0 = time.monotonic_ns()
        descriptor: dict[str, Any] = {}
        try:
            with step_deadline(self.ctx.cfg.step_timeout):
                if self.stage == "clean":
                    self.kind.clean(ctx)
                elif self.stage == "prepare":
                    self.kind.prepare(ctx)
                elif self.stage == "spawn":
                    descriptor = self.kind.spawn(ctx)
                else:
                    self.kind.terminate(ctx, self.seg.descriptor(slot))
        except BaseException as exc:  # a kind may raise anything, SystemExit too
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.seg.observe(self.stage, time.monotonic_ns() - t0)
            self.fail(slot, gen, mine, exc)
            return
        self.seg.observe(self.stage, time.monotonic_ns() - t0)
        self.seg.count(DONE_COUNTER[self.stage])
        if self.stage == "spawn":
            self.publish(slot, gen, mine, descriptor)
        elif self.stage == "clean":
            # during shutdown `prepare, owner 0` means "cleaned, stop here"
            self.move(slot, mine, L.make_word(L.State.PREPARE, gen, 0), None if self.seg.shutting_down else "prepare")
        elif self.stage == "prepare":
            self.move(slot, mine, L.make_word(L.State.SPAWN, gen, 0), "spawn")
        else:
            self.move(slot, mine, L.make_word(L.State.CLEAN, gen, 0), "clean")

    def publish(self, slot: int, gen: int, mine: int, descriptor: dict[str, Any]) -> None:
        ctx = self.kind.pool.slot(slot)
        try:
            packed = msgpack.packb(descriptor)
        except (TypeError, ValueError) as exc:
            self.discard(ctx, descriptor)
            self.fail(slot, gen, mine, ValueError(f"descriptor is not msgpack-able: {exc}"))
            return
        if len(packed) > self.seg.geometry.descriptor_cap:
            self.discard(ctx, descriptor)
            self.fail(slot, gen, mine, ValueError(
                f"descriptor of {len(packed)} bytes exceeds descriptor_size {self.seg.geometry.descriptor_cap}"))
            return
        if self.seg.shutting_down:
            self.discard(ctx, descriptor)
            self.move(slot, mine, L.make_word(L.State.CLEAN, gen, 0), "clean")
            return
        self.seg.set_failures(slot, 0)
        self.seg.set_retry_at(slot, 0)
        self.seg.set_spawned(slot, time.monotonic_ns())
        status = self.seg.publish(slot, mine, packed)
        if status == L.Status.STALE:
            # the supervisor took the slot back (it thought us stuck): the
            # instance we made belongs to no slot now, so it must not live
            self.discard(ctx, descriptor)
            self.seg.count("stale_messages")
        elif status == L.Status.FULL:
            log.warning("ready ring full publishing slot %d; the supervisor's audit re-queues it", slot)

    def discard(self, ctx: Any, descriptor: dict[str, Any]) -> None:
        try:
            with step_deadline(self.ctx.cfg.step_timeout):
                self.kind.terminate(ctx, descriptor)
        except Exception as exc:  # noqa: BLE001 - clean sweeps what terminate missed
            log.warning("slot %d: terminating an unpublished instance failed: %s", ctx.slot, exc)

    def move(self, slot: int, mine: int, new: int, dispatch: str | None) -> None:
        if not self.core.cas(slot, mine, new):
            self.seg.count("stale_messages")  # taken back by the supervisor meanwhile
            return
        if dispatch is None:
            return
        if not queues.dispatch(self.senders[dispatch], slot, L.word_gen(new), self.seg.set_queued):
            self.seg.count("queue_full")

    def fail(self, slot: int, gen: int, mine: int, exc: BaseException) -> None:
        cfg = self.ctx.cfg
        self.seg.count(f"{self.stage}_failures")
        rec = self.seg.record(slot)
        n = rec.failures + 1
        step = STAGE_STEP[self.stage]
        msg = f"{type(exc).__name__}: {exc}"
        now = time.monotonic_ns()
        if self.stage == "terminate":
            # clean must remove whatever a failed terminate left behind
            log.warning("slot %d: terminate failed, cleaning anyway: %s", slot, msg)
            self.seg.set_failures(slot, rec.failures, step)
            self.move(slot, mine, L.make_word(L.State.CLEAN, gen, 0), "clean")
            return
        if n > cfg.max_failures or (self.seg.shutting_down and self.stage == "clean"):
            log.error("slot %d: %s failed %d times, abandoned for %.0f s: %s",
                      slot, self.stage, n, cfg.abandon_cooldown, msg)  # fmt: skip
            self.seg.set_failures(slot, n, step)
            self.seg.set_retry_at(slot, now + int(cfg.abandon_cooldown * 1e9))
            if self.core.cas(slot, mine, L.make_word(L.State.ABANDONED, gen, 0)):
                self.seg.count("abandoned")
            return
        delay = 0.1 * n * n
        log.warning("slot %d: %s failed (%d/%d), retrying clean in %.1f s: %s",
                    slot, self.stage, n, cfg.max_failures, delay, msg)  # fmt: skip
        self.seg.set_failures(slot, n, step)
        self.seg.set_retry_at(slot, now + int(delay * 1e9))
        # no dispatch: the supervisor sends it when the backoff is over
        self.move(slot, mine, L.make_word(L.State.CLEAN, gen, 0), None)


@contextlib.contextmanager
def step_deadline(seconds: float) -> Any:
    """Raise StepTimeout in this process if the block outlives ``seconds``.
    The supervisor also kills workers whose step runs past it (a step stuck
    in C code, or a stopped worker); this is the polite first line."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise StepTimeout(f"step exceeded step_timeout of {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def worker_main(ctx: WorkerContext) -> None:
    """Entry point in the forked worker process."""
    from workers import WORKER_BOOT_ERROR

    setproctitle(f"noodle {ctx.stage}-worker {ctx.cfg.name} {ctx.number}")
    # Die at once with the supervisor. Finishing the step would write into a
    # segment its successor is about to sweep and replace, and could leave an
    # instance recorded nowhere; cut short, the slot's own leftovers (pidfile,
    # cgroup, slot dir) are what the successor's clean removes.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != ctx.supervisor_pid:
        os._exit(1)  # it died before the prctl took effect
    # Ctrl-C reaches the whole process group; the supervisor decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    holder: list[Worker] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        if holder:
            holder[0].stopping = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        worker = Worker(ctx)
    except Exception as exc:  # noqa: BLE001 - any boot failure halts the pool, with its cause
        log.critical("%s worker failed to boot: %s", ctx.stage, exc)
        os._exit(WORKER_BOOT_ERROR)
    holder.append(worker)
    code = worker.run()
    os._exit(code)
