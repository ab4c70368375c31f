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
from noodle import lifecycle, queues
from noodle import log as logmod
from noodle.config import Config
from noodle.kinds import Kind, SlotContext
from noodle.segment import Segment
from noodle.workers import WORKER_BOOT_ERROR

log = logging.getLogger("noodle.worker")

PR_SET_PDEATHSIG = 1


class StepTimeout(Exception):
    """The step ran past step_timeout (raised from SIGALRM)."""


@dataclass
class WorkerSpec:
    """What a worker inherits from the supervisor across fork."""

    stage: str
    seat: int  # its row in the worker table
    number: int  # per-stage number, for the process title
    cfg: Config
    seg: Segment
    kind: Kind
    table: L.WorkerTable
    permits: Any  # multiprocess BoundedSemaphore, or None without a concurrency limit
    supervisor_pid: int


class Worker:
    """One stage worker process: takes tasks from its stage's queue, claims
    the slot by CAS, runs the kind's step and moves the slot on by the rules
    of ``noodle.lifecycle``. It holds no state of its own that matters: a
    SIGKILL at any instruction leaves the slot to the supervisor."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.seg = spec.seg
        self.core = spec.seg.core
        self.kind = spec.kind
        self.stage = lifecycle.BY_NAME[spec.stage]
        self.policy = lifecycle.Policy(spec.cfg.max_failures, spec.cfg.abandon_cooldown)
        self.pid = os.getpid()
        self.stopping = False
        self.queue = queues.open_queue(spec.cfg.name, spec.stage)
        # open_queue's descriptors are non-blocking (senders must never
        # wait); on one, receive(timeout) returns EAGAIN at once and this
        # loop would spin a CPU while idle, starving the steps and the jobs
        self.queue.block = True
        self.senders = {s: queues.open_queue(spec.cfg.name, s) for s in lifecycle.STAGE_NAMES}

    def beat(self) -> None:
        self.spec.table.set_beat(self.spec.seat, time.monotonic_ns())

    def _step_started(self, ns: int) -> None:
        self.spec.table.set_step_started(self.spec.seat, ns)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        while not self.stopping:
            self.beat()
            if os.getppid() != self.spec.supervisor_pid:
                log.error("supervisor %d is gone; %s worker exits", self.spec.supervisor_pid, self.stage.name)
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
            log.warning("%s queue: dropped a bad message: %s", self.stage.name, exc)
            return
        if self.seg.shutting_down and self.stage.refills:
            return  # no refilling during shutdown; the supervisor cleans these
        rec = self.seg.record(slot)
        if rec.retry_at_ns and time.monotonic_ns() < rec.retry_at_ns:
            self.seg.count("stale_messages")  # early duplicate: the backoff stands
            return
        idle = L.make_word(self.stage.state, gen, 0)
        mine = L.make_word(self.stage.state, gen, self.pid)
        if not self.core.cas(slot, idle, mine):
            self.seg.count("stale_messages")
            return
        if rec.queued_ns:
            self.seg.observe("dispatch", time.monotonic_ns() - rec.queued_ns)
        self._step_started(time.monotonic_ns())
        try:
            with logmod.context(slot=slot, generation=gen, step=self.spec.stage):  # fields of --log-format json
                self.with_permit(lambda: self.step(slot, gen, mine))
        finally:
            self._step_started(0)

    def with_permit(self, fn: Callable[[], None]) -> None:
        permits = self.spec.permits
        if permits is None:
            fn()
            return
        while not permits.acquire(timeout=1.0):
            self.beat()
            self._step_started(time.monotonic_ns())  # waiting is not running
        self.spec.table.set_holds_permit(self.spec.seat, True)
        try:
            fn()
        finally:
            self.spec.table.set_holds_permit(self.spec.seat, False)
            permits.release()

    def step(self, slot: int, gen: int, mine: int) -> None:
        where = self.kind.pool.slot(slot)
        stage = self.stage
        t0 = time.monotonic_ns()
        descriptor: dict[str, Any] = {}
        try:
            with step_deadline(self.spec.cfg.step_timeout):
                if stage.state == L.State.CLEAN:
                    self.kind.clean(where)
                elif stage.state == L.State.PREPARE:
                    self.kind.prepare(where)
                elif stage.state == L.State.SPAWN:
                    descriptor = self.kind.spawn(where)
                else:
                    self.kind.terminate(where, self.seg.descriptor(slot))
        except BaseException as exc:  # a kind may raise anything, SystemExit too
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.seg.observe(stage.name, time.monotonic_ns() - t0)
            self.fail(slot, gen, mine, exc)
            return
        self.seg.observe(stage.name, time.monotonic_ns() - t0)
        self.seg.count(stage.done_counter)
        if stage.next_stage is None:
            self.publish(slot, gen, mine, descriptor)
            return
        # during shutdown a cleaned slot stops at `prepare, owner 0`
        dispatch = None if self.seg.shutting_down and stage.state == L.State.CLEAN else stage.next_stage
        self.move(slot, mine, L.make_word(stage.next_state, gen, 0), dispatch)

    def publish(self, slot: int, gen: int, mine: int, descriptor: dict[str, Any]) -> None:
        where = self.kind.pool.slot(slot)
        try:
            packed = msgpack.packb(descriptor)
        except (TypeError, ValueError) as exc:
            self.discard(where, descriptor)
            self.fail(slot, gen, mine, ValueError(f"descriptor is not msgpack-able: {exc}"))
            return
        if len(packed) > self.seg.geometry.descriptor_cap:
            self.discard(where, descriptor)
            self.fail(slot, gen, mine, ValueError(
                f"descriptor of {len(packed)} bytes exceeds descriptor_size {self.seg.geometry.descriptor_cap}"))
            return
        if self.seg.shutting_down:
            self.discard(where, descriptor)
            self.move(slot, mine, L.make_word(L.State.CLEAN, gen, 0), "clean")
            return
        self.seg.set_failures(slot, 0)
        self.seg.set_retry_at(slot, 0)
        self.seg.set_spawned(slot, time.monotonic_ns())
        status = self.seg.publish(slot, mine, packed)
        if status == L.Status.STALE:
            # the supervisor took the slot back (it thought us stuck): the
            # instance we made belongs to no slot now, so it must not live
            self.discard(where, descriptor)
            self.seg.count("stale_messages")
        elif status == L.Status.FULL:
            log.warning("ready ring full publishing slot %d; the supervisor's audit re-queues it", slot)

    def discard(self, where: SlotContext, descriptor: dict[str, Any]) -> None:
        try:
            with step_deadline(self.spec.cfg.step_timeout):
                self.kind.terminate(where, descriptor)
        except Exception as exc:  # noqa: BLE001 - clean sweeps what terminate missed
            log.warning("slot %d: terminating an unpublished instance failed: %s", where.slot, exc)

    def move(self, slot: int, mine: int, new: int, dispatch: str | None) -> None:
        if not self.core.cas(slot, mine, new):
            self.seg.count("stale_messages")  # taken back by the supervisor meanwhile
            return
        if dispatch is None:
            return
        if not queues.dispatch(self.senders[dispatch], slot, L.word_gen(new), self.seg.set_queued):
            self.seg.count("queue_full")

    def fail(self, slot: int, gen: int, mine: int, exc: BaseException) -> None:
        stage = self.stage
        self.seg.count(stage.failure_counter)
        rec = self.seg.record(slot)
        out = lifecycle.after_failure(stage, rec.failures, self.policy, self.seg.shutting_down)
        msg = f"{type(exc).__name__}: {exc}"
        if out.abandoned:
            log.error("slot %d: %s failed %d times, abandoned for %.0f s: %s",
                      slot, stage.name, out.failures, self.policy.abandon_cooldown, msg)  # fmt: skip
        elif out.dispatch is not None:
            log.warning("slot %d: %s failed, cleaning anyway: %s", slot, stage.name, msg)
        else:
            log.warning("slot %d: %s failed (%d/%d), retrying clean in %.1f s: %s",
                        slot, stage.name, out.failures, self.policy.max_failures, out.retry_in or 0.0, msg)  # fmt: skip
        self.seg.set_failures(slot, out.failures, stage.step)
        if out.retry_in is not None:
            self.seg.set_retry_at(slot, time.monotonic_ns() + int(out.retry_in * 1e9))
        new = L.make_word(out.state, gen, 0)
        if out.abandoned:
            if self.core.cas(slot, mine, new):
                self.seg.count("abandoned")
            return
        # without a dispatch the supervisor sends it when the backoff is over
        self.move(slot, mine, new, out.dispatch)


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


def worker_main(spec: WorkerSpec) -> None:
    """Entry point in the forked worker process."""
    setproctitle(f"noodle {spec.stage}-worker {spec.cfg.name} {spec.number}")
    # Die at once with the supervisor. Finishing the step would write into a
    # segment its successor is about to sweep and replace, and could leave an
    # instance recorded nowhere; cut short, the slot's own leftovers (pidfile,
    # cgroup, slot dir) are what the successor's clean removes.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec.supervisor_pid:
        os._exit(1)  # it died before the prctl took effect
    # Ctrl-C reaches the whole process group; the supervisor decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    holder: list[Worker] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        if holder:
            holder[0].stopping = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        worker = Worker(spec)
    except Exception as exc:  # noqa: BLE001 - any boot failure halts the pool, with its cause
        log.critical("%s worker failed to boot: %s", spec.stage, exc)
        os._exit(WORKER_BOOT_ERROR)
    holder.append(worker)
    code = worker.run()
    os._exit(code)
