"""The supervisor: owns one pool's segment and queues, runs its workers.

Data flow (processes and where each piece of state lives)::

    supervisor --fork--> clean / prepare / spawn / terminate workers
        |                    ^ take [1, slot, gen] from /noodle.<pool>.<stage>
        |                    | run the kind's step, CAS the slot onward,
        |                    | send the next stage's task (never blocking)
        | feeds the queues from the slot table when a send found one full,
        | honours backoff, reclaims leases of dead clients, re-queues
        | ready slots a killed client dropped, passes a dead waiter's turn
        v
    segment /noodle.<pool>: header | waiters | ready ring | slots | counters
        ^ clients: get() = pop + CAS ready->leased, release() = CAS
        |          leased->terminate + a terminate task

The loop reads top to bottom like gunicorn's arbiter: sleep until a signal
or the tick, handle recorded signals, reap children, kill stuck workers,
top up workers, reclaim, audit, feed backlogs, report. Signal handlers only
record the signal number.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import multiprocess
from setproctitle import setproctitle

from noodle import layout as L
from noodle import queues
from noodle.config import Config
from noodle.errors import NoodleError
from noodle.healthcheck import run_cycle
from noodle.integrity import IntegrityChecker
from noodle.kinds import Kind, PoolInfo, load_kind
from noodle.procs import descendants_of, is_alive, start_time
from noodle.recovery import PoolLock, recover_stale
from noodle.segment import Segment
from noodle.systemd import Notifier
from workers import WORKER_BOOT_ERROR
from workers.stage import BEAT, FIELDS_PER_WORKER, HOLDS_PERMIT, STEP_STARTED, WorkerContext, worker_main

log = logging.getLogger("noodle.supervisor")

PR_SET_CHILD_SUBREAPER = 36
TICK = 0.05  # seconds between loop passes when no signal arrives
SENDER_GRACE_NS = 20_000_000  # a worker or client between its CAS and its send
RESEND_AFTER_NS = 30_000_000_000  # a dispatched task unclaimed this long was lost
LEASE_RECORD_GRACE = 2.0  # seconds a lease may show no holder start time
STAGE_OF = {L.State.CLEAN: "clean", L.State.PREPARE: "prepare", L.State.SPAWN: "spawn", L.State.TERMINATE: "terminate"}

EXIT_OK = 0
EXIT_ERROR = 1


@dataclass
class WorkerSlot:
    stage: str
    number: int
    index: int
    proc: Any = None
    pid: int = 0
    started: float = 0.0


class Supervisor:
    def __init__(self, cfg: Config, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.run_dir = cfg.resolved_run_dir()
        self.kind_cls = load_kind(cfg.kind)
        gid = cfg.gid if cfg.gid is not None else os.getgid()
        self.info = PoolInfo(cfg.name, cfg.pool_size, self.run_dir, os.getuid(), gid)
        self.kind: Kind = self.kind_cls(self.info, cfg.kind_options)
        self.lock = PoolLock(self.run_dir, cfg.name)
        self.notifier = Notifier()
        self.seg: Segment | None = None
        self.queues: dict[str, Any] = {}
        self.mp = multiprocess.get_context("fork")
        self.table: Any = None
        self.permits: Any = None
        self.workers: dict[int, WorkerSlot] = {}  # pid -> worker
        self.slots: list[WorkerSlot] = []
        self.signals: list[int] = []
        self._wake_r, self._wake_w = -1, -1
        self.draining = False
        self.done = False
        self.fatal = ""
        self.drain_deadline = 0.0
        self.hard_deadline = 0.0
        self.restart_times: list[float] = []
        self._last: dict[str, float] = {}
        self._missing_ready: dict[int, int] = {}
        self._idle_owned: dict[int, int] = {}
        self._stuck_waiter: tuple[int, float] | None = None
        self._lease_starts: dict[int, tuple[int, int, float]] = {}  # slot -> (word, start, first seen)

    # == start ====================================================================

    def start(self) -> None:
        cfg = self.cfg
        setproctitle(f"noodle supervisor {cfg.name}")
        # nothing the pool, its workers or its instances create is for "other"
        os.umask(0o007)
        self._install_signals()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        os.chmod(self.run_dir, 0o750 if cfg.group else 0o700)
        if cfg.gid is not None:
            os.chown(self.run_dir, -1, cfg.gid)
        self.lock.acquire()
        self.kind.setup()
        stopped = recover_stale(cfg.name, self.kind, cfg.pool_size)
        if stopped:
            log.warning("stopped %d instances left by a dead supervisor", stopped)
        if cfg.check_health:
            timings = run_cycle(self.kind, cfg.pool_size, cfg.step_timeout)
            log.info("check_health passed: %s", ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))
        self.seg = Segment.create(cfg.name, cfg.pool_size, cfg.kind, cfg.descriptor_size, mode=cfg.mode, gid=cfg.gid,
                                  get_timeout=cfg.get_timeout, health_on_get=cfg.health_on_get)  # fmt: skip
        self.seg.heartbeat()
        self.integrity = IntegrityChecker(self.seg, max(cfg.abandon_cooldown, 0.1 * cfg.max_failures**2))
        self.queues = queues.create_all(cfg.name, mode=cfg.mode, gid=cfg.gid)
        n_workers = sum(cfg.workers.values())
        self.table = self.mp.RawArray("Q", FIELDS_PER_WORKER * n_workers)
        limit = cfg.max_concurrency
        if limit and limit < n_workers:
            self.permits = self.mp.BoundedSemaphore(limit)
        index = 0
        for stage in queues.STAGES:
            for number in range(cfg.workers[stage]):
                self.slots.append(WorkerSlot(stage, number, index))
                index += 1
        self.top_up_workers()
        self.seg.set_phase(L.Phase.RUNNING)
        self.notifier.ready(self.status_line())
        log.info("pool %r: %d %s slots, %d workers, run dir %s",
                 cfg.name, cfg.pool_size, cfg.kind, n_workers, self.run_dir)  # fmt: skip

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    # == the loop ===================================================================

    def run(self) -> int:
        try:
            self.start()
        except NoodleError as exc:
            log.error("%s", exc)
            self.fatal = str(exc)
            self.teardown()
            return EXIT_ERROR
        try:
            while not self.done:
                self.sleep()
                self.handle_signals()
                self.reap()
                self.murder_stuck_workers()
                self.free_foreign_owners()
                self.top_up_workers()
                self.check_integrity()
                self.reclaim_dead_leases()
                if self.draining:
                    self.drain()
                else:
                    self.retry_abandoned()
                    self.audit_ring()
                    self.sweep_waiters()
                self.feed_backlogs()
                self.kind.maintain()
                self.report()
        except Exception:
            log.exception("supervisor loop failed; shutting down")
            self.fatal = "internal error"
        finally:
            self.stop_workers()
            self.teardown()
        return EXIT_ERROR if self.fatal else EXIT_OK

    def sleep(self) -> None:
        if self.signals:
            return
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._wake_r], [], [], TICK)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass

    def every(self, name: str, seconds: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(name, 0.0) >= seconds:
            self._last[name] = now
            return True
        return False

    # -- signals ---------------------------------------------------------------------

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            name = signal.Signals(sig).name.lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        if self.draining:
            log.warning("second stop signal: revoking leases now")
            self.drain_deadline = min(self.drain_deadline, time.monotonic())
            self.hard_deadline = min(self.hard_deadline, time.monotonic() + self.cfg.step_timeout + 5)
            return
        self.begin_shutdown()

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        self.begin_shutdown()
        self.handle_sigterm()

    def handle_sighup(self) -> None:
        log.info("SIGHUP ignored: restart the service to change its configuration")

    def handle_sigchld(self) -> None:
        pass  # reap() runs on every pass

    # -- children --------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            w = self.workers.pop(pid, None)
            if w is None:
                # an instance, a kind helper or an orphan we adopted as subreaper
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                continue
            w.proc.join(0)
            code = w.proc.exitcode
            if code is None:
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(pid, 0)
                    code = os.waitstatus_to_exitcode(status)
            self.worker_exited(w, pid, code if code is not None else -1)

    def worker_exited(self, w: WorkerSlot, pid: int, code: int) -> None:
        assert self.seg is not None
        base = w.index * FIELDS_PER_WORKER
        if self.table[base + HOLDS_PERMIT] and self.permits is not None:
            self.permits.release()  # it died holding a permit
        for f in range(FIELDS_PER_WORKER):
            self.table[base + f] = 0
        w.pid, w.proc = 0, None
        if code == WORKER_BOOT_ERROR:
            log.critical("%s worker %d failed to boot; stopping the pool instead of restarting it", w.stage, w.number)
            self.fatal = "a worker failed to boot"
            self.begin_shutdown()
            self.hard_deadline = time.monotonic()
            return
        if not self.done:
            log.warning("%s worker %d (pid %d) exited with %d; replacing it", w.stage, w.number, pid, code)
            self.seg.count("worker_restarts")
            self.restart_times.append(time.monotonic())
        self.put_back_slots_of(pid)
        # a task it had taken from the queue but not claimed died with it
        for slot, word in enumerate(self.seg.states()):
            if L.word_pid(word) == 0 and STAGE_OF.get(L.word_state(word)) == w.stage:  # type: ignore[call-overload]
                self.seg.set_queued(slot, 0)

    def put_back_slots_of(self, pid: int) -> None:
        """Slots a dead worker held go back: terminate to terminate (its
        descriptor is still there), anything else to clean, counted as a
        failure (a spawn or prepare may have left parts that clean removes)."""
        assert self.seg is not None
        for slot, word in enumerate(self.seg.states()):
            if L.word_pid(word) != pid or L.word_state(word) not in STAGE_OF:
                continue
            st, gen = L.word_state(word), L.word_gen(word)
            if st == L.State.TERMINATE:
                self.seg.core.cas(slot, word, L.make_word(L.State.TERMINATE, gen, 0))
                continue
            rec = self.seg.record(slot)
            n = rec.failures + 1
            now = time.monotonic_ns()
            self.seg.set_failures(slot, n, L.Step(min(int(st), 3)))
            if n > self.cfg.max_failures:
                self.seg.set_retry_at(slot, now + int(self.cfg.abandon_cooldown * 1e9))
                if self.seg.core.cas(slot, word, L.make_word(L.State.ABANDONED, gen, 0)):
                    self.seg.count("abandoned")
                    log.error("slot %d abandoned: its %s worker died %d times", slot, STAGE_OF[L.State(st)], n)
            else:
                self.seg.set_retry_at(slot, now + int(0.1 * n * n * 1e9))
                self.seg.core.cas(slot, word, L.make_word(L.State.CLEAN, gen, 0))

    def murder_stuck_workers(self) -> None:
        """A step past step_timeout, or no heartbeat for worker_timeout (a
        stopped or wedged worker): SIGKILL it; reap() puts its slot back."""
        assert self.seg is not None
        now = time.monotonic_ns()
        for w in self.slots:
            if not w.pid:
                continue
            base = w.index * FIELDS_PER_WORKER
            beat, step = self.table[base + BEAT], self.table[base + STEP_STARTED]
            why = ""
            if step and now - step > (self.cfg.step_timeout + 2.0) * 1e9:
                why = f"its step ran {(now - step) / 1e9:.1f} s (step_timeout {self.cfg.step_timeout} s)"
            elif beat and now - beat > self.cfg.worker_timeout * 1e9:
                why = f"no heartbeat for {(now - beat) / 1e9:.1f} s"
            elif not beat and time.monotonic() - w.started > self.cfg.worker_timeout:
                why = "it never started its loop"
            if why:
                log.error("killing %s worker %d (pid %d): %s", w.stage, w.number, w.pid, why)
                self.seg.count("workers_killed_stuck")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                self.table[base + BEAT] = 0
                self.table[base + STEP_STARTED] = 0
                w.started = time.monotonic()

    def free_foreign_owners(self) -> None:
        """A stage state owned by a pid that is none of our workers (a
        damaged word, or a death we missed) would wait for ever: free it.
        So would one owned by a live worker that is not in a step (a damaged
        generation made the worker's final CAS fail); that one is freed when
        seen twice, since a worker claims a slot just before its step starts.
        Ready and abandoned slots have no owner at all."""
        assert self.seg is not None
        if not self.every("owners", 1.0):
            return
        idle_owned: dict[int, int] = {}
        for slot, word in enumerate(self.seg.states()):
            st, pid = L.word_state(word), L.word_pid(word)
            if pid == 0 or st == L.State.LEASED:
                continue
            w = self.workers.get(pid)
            if w is not None:
                if self.table[w.index * FIELDS_PER_WORKER + STEP_STARTED]:
                    continue  # in its step: murder_stuck_workers watches it
                if self._idle_owned.get(slot) != word:
                    idle_owned[slot] = word
                    continue
            if st in STAGE_OF or st in (L.State.READY, L.State.ABANDONED):
                if self.seg.core.cas(slot, word, L.make_word(st, L.word_gen(word), 0)):
                    self.seg.count("corruption_repairs")
                    log.error("slot %d: owner pid %d is not a worker in a step; freed (%s)",
                              slot, pid, L.describe_word(word))  # fmt: skip
        self._idle_owned = idle_owned

    def top_up_workers(self) -> None:
        if self.done or self.fatal:
            return
        now = time.monotonic()
        self.restart_times = [t for t in self.restart_times if now - t < 10]
        crash_looping = len(self.restart_times) > 4 * max(1, len(self.slots))
        for w in self.slots:
            if w.pid:
                continue
            if crash_looping and not self.every(f"restart-{w.index}", 1.0):
                continue  # workers keep dying: slow restarts down, don't spin
            self.fork_worker(w)

    def fork_worker(self, w: WorkerSlot) -> None:
        assert self.seg is not None
        ctx = WorkerContext(w.stage, w.index, w.number, self.cfg, self.seg, self.kind, self.table, self.permits,
                            os.getpid())  # fmt: skip
        proc = self.mp.Process(target=worker_main, args=(ctx,), name=f"{w.stage}-worker-{w.number}")
        proc.start()
        w.proc, w.pid, w.started = proc, proc.pid, time.monotonic()
        self.workers[proc.pid] = w

    # -- slot housekeeping ----------------------------------------------------------------

    def check_integrity(self) -> None:
        assert self.seg is not None
        if self.every("integrity", 1.0):
            phase = L.Phase.DRAINING if self.draining else L.Phase.RUNNING
            if self.integrity.check(self.draining, phase):
                self.seg.count("corruption_repairs")

    def reclaim_dead_leases(self) -> None:
        """A lease whose holder died (or whose pid now belongs to another
        process) goes to terminate."""
        assert self.seg is not None
        if not self.every("reclaim", 0.25):
            return
        for slot, word in enumerate(self.seg.states()):
            if L.word_state(word) != L.State.LEASED:
                continue
            pid, gen = L.word_pid(word), L.word_gen(word)
            rec = self.seg.record(slot)
            expected = rec.owner_start if rec.owner_gen == (gen & 0xFFFFFFFF) else 0
            actual = start_time(pid)
            alive = actual != 0 and (expected == 0 or actual == expected)
            if alive and expected == 0:
                # The holder writes its start time right after its CAS, so
                # this is either that instant or a damaged word naming some
                # live process. A pid that started after we first saw the
                # lease cannot be its holder; a record that stays unwritten
                # is damage.
                seen = self._lease_starts.get(slot)
                if seen is None or seen[0] != word:
                    self._lease_starts[slot] = (word, actual, time.monotonic())
                else:
                    alive = seen[1] == actual and time.monotonic() - seen[2] < LEASE_RECORD_GRACE
            if alive:
                continue
            if self.seg.core.cas(slot, word, L.make_word(L.State.TERMINATE, gen, 0)):
                self.seg.count("reclaimed_leases")
                log.warning("slot %d: holder pid %d is gone; reclaiming its instance", slot, pid)
            self._lease_starts.pop(slot, None)

    def retry_abandoned(self) -> None:
        assert self.seg is not None
        if not self.every("abandoned", 0.5):
            return
        now = time.monotonic_ns()
        for slot, word in enumerate(self.seg.states()):
            if L.word_state(word) != L.State.ABANDONED or self.seg.record(slot).retry_at_ns > now:
                continue
            self.seg.set_failures(slot, 0)
            self.seg.set_retry_at(slot, 0)
            if self.seg.core.cas(slot, word, L.make_word(L.State.CLEAN, L.word_gen(word), 0)):
                self.seg.count("abandon_retries")
                log.info("slot %d: cool-down over, retrying it", slot)

    def audit_ring(self) -> None:
        """A client killed between popping an id and leasing it leaves a
        ready slot outside the ring; re-queue it once seen twice."""
        assert self.seg is not None
        if not self.every("audit", 1.0):
            return
        in_ring = set(self.seg.core.ring_ids())
        missing: dict[int, int] = {}
        for slot, word in enumerate(self.seg.states()):
            if L.word_state(word) == L.State.READY and slot not in in_ring:
                if self._missing_ready.get(slot) == word:
                    if self.seg.core.load(slot) == word and self.seg.core.push(slot) == L.Status.OK:
                        self.seg.count("ring_repushes")
                        log.warning("slot %d was ready but not queued (a client died mid-get); re-queued", slot)
                else:
                    missing[slot] = word
        self._missing_ready = missing

    def sweep_waiters(self) -> None:
        """Pass the turn on from a queued waiter that died."""
        assert self.seg is not None
        if not self.every("waiters", 0.25):
            return
        head = self.seg.core.head_waiter()
        if head is None:
            self._stuck_waiter = None
            return
        ticket, pid, registered = head
        if registered and pid and is_alive(pid):
            self._stuck_waiter = None
            return
        if not registered:
            # it may be a live waiter between taking the ticket and writing
            # its pid: give it a second before presuming it dead
            if self._stuck_waiter is None or self._stuck_waiter[0] != ticket:
                self._stuck_waiter = (ticket, time.monotonic())
                return
            if time.monotonic() - self._stuck_waiter[1] < 1.0:
                return
        if self.seg.core.skip_waiter(ticket):
            self.seg.count("waiters_skipped")
            log.warning("waiter ticket %d (pid %d) is gone; passing its turn on", ticket, pid)
        self._stuck_waiter = None

    def feed_backlogs(self) -> None:
        """Send tasks for idle slots whose task is not in a queue: a full
        queue, a backoff that expired, a reclaimed lease, a restart."""
        assert self.seg is not None
        now = time.monotonic_ns()
        full: set[str] = set()
        for slot, word in enumerate(self.seg.states()):
            st = L.word_state(word)
            if L.word_pid(word) != 0 or st not in STAGE_OF:
                continue
            stage = STAGE_OF[L.State(st)]
            if stage in full or (self.draining and stage in ("prepare", "spawn")):
                continue
            rec = self.seg.record(slot)
            if rec.retry_at_ns > now:
                continue  # backing off
            if rec.queued_ns >= rec.entered_ns:
                if now - rec.queued_ns < RESEND_AFTER_NS:
                    continue  # its task is in the queue
            elif now - rec.entered_ns < SENDER_GRACE_NS and not rec.retry_at_ns:
                continue  # whoever moved it is about to send
            if not queues.dispatch(self.queues[stage], slot, L.word_gen(word), self.seg.set_queued):
                full.add(stage)

    # -- reporting ---------------------------------------------------------------------------

    def status_line(self) -> str:
        assert self.seg is not None
        s = self.seg.snapshot()["states"]
        return f"ready {s['ready']}/{self.cfg.pool_size}, leased {s['leased']}, " + ", ".join(
            f"{k} {v}" for k, v in s.items() if k not in ("ready", "leased") and v
        )

    def report(self) -> None:
        assert self.seg is not None
        self.seg.heartbeat()
        self.notifier.watchdog()
        if self.every("status", 1.0):
            self.notifier.status(("stopping: " if self.draining else "") + self.status_line())
        if self.progress is not None and self.every("progress", 0.2):
            self.progress(self.seg.snapshot())

    # == shutdown ====================================================================

    def begin_shutdown(self) -> None:
        if self.draining or self.seg is None:
            return
        log.info("stopping pool %r: draining (leases have %.1f s to come back)", self.cfg.name, self.cfg.drain_timeout)
        self.draining = True
        now = time.monotonic()
        self.drain_deadline = now + self.cfg.drain_timeout
        self.hard_deadline = self.drain_deadline + self.cfg.step_timeout + 5
        self.seg.set_phase(L.Phase.DRAINING)
        self.seg.core.shutdown()
        self.notifier.stopping()
        for slot, word in enumerate(self.seg.states()):
            st = L.word_state(word)
            if st in (L.State.PREPARE, L.State.SPAWN) and L.word_pid(word) == 0:
                self.seg.core.cas(slot, word, L.make_word(L.State.CLEAN, L.word_gen(word), 0))
            elif st == L.State.ABANDONED:
                self.seg.set_retry_at(slot, 0)  # one last clean attempt
                self.seg.core.cas(slot, word, L.make_word(L.State.CLEAN, L.word_gen(word), 0))

    def drain(self) -> None:
        """Move every slot toward `prepare, owner 0` (cleaned, not refilled)."""
        assert self.seg is not None
        now = time.monotonic()
        done = True
        for slot, word in enumerate(self.seg.states()):
            st, pid, gen = L.word_state(word), L.word_pid(word), L.word_gen(word)
            if st == L.State.READY:
                self.seg.core.cas(slot, word, L.make_word(L.State.TERMINATE, gen, 0))
                done = False
            elif st == L.State.SPAWN and pid == 0:
                self.seg.core.cas(slot, word, L.make_word(L.State.CLEAN, gen, 0))
                done = False
            elif st == L.State.LEASED:
                if now >= self.drain_deadline and self.seg.core.cas(slot, word, L.make_word(L.State.TERMINATE, gen, 0)):
                    self.seg.count("reclaimed_leases")
                    log.warning("slot %d: lease not returned within drain_timeout; terminating it", slot)
                done = False
            elif not ((st == L.State.PREPARE and pid == 0) or st == L.State.ABANDONED):
                done = False
        if done:
            self.done = True
        elif now >= self.hard_deadline:
            log.error("shutdown deadline passed with slots unfinished: %s", self.status_line())
            self.done = True

    def stop_workers(self, grace: float = 5.0) -> None:
        """SIGTERM, a grace period, SIGKILL, final reap."""
        self.done = True
        for w in self.slots:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(w.pid for w in self.slots) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for w in self.slots:
            if w.pid:
                log.warning("%s worker %d did not stop within %.0f s; killing it", w.stage, w.number, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
        while any(w.pid for w in self.slots):
            self.reap()
            time.sleep(0.01)

    def teardown(self) -> None:
        """Finish what workers did not, stop the kind, remove every name."""
        if self.lock.fd < 0:
            self._close_wakeup()
            return  # we never owned this pool's names: touch nothing
        seg = self.seg
        if seg is not None:
            for slot, word in enumerate(seg.states()):
                st = L.word_state(word)
                if st == L.State.PREPARE and L.word_pid(word) == 0:
                    continue
                # anything not cleaned by a worker is stopped and cleaned here
                try:
                    if st in (L.State.READY, L.State.LEASED, L.State.TERMINATE, L.State.SPAWN):
                        desc = seg.descriptor(slot)
                        if desc:
                            self.kind.terminate(self.info.slot(slot), desc)
                    self.kind.clean(self.info.slot(slot))
                except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                    log.error("slot %d: final clean failed: %s", slot, exc)
        with contextlib.suppress(Exception):
            self.kind.teardown()
        # instances that escaped their group were reparented to us (subreaper)
        for pid in descendants_of(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while descendants_of(os.getpid()) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.005)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        for q in self.queues.values():
            with contextlib.suppress(Exception):
                q.close()
        if seg is not None:
            seg.unlink()
            seg.close()
            self.seg = None
            queues.unlink_all(self.cfg.name)
        with contextlib.suppress(OSError):
            shutil.rmtree(os.path.join(self.run_dir, "slots"))
        self.lock.release()
        with contextlib.suppress(OSError):
            os.rmdir(self.run_dir)
        self._close_wakeup()
        log.info("pool %r stopped", self.cfg.name)

    def _close_wakeup(self) -> None:
        # stopped: a late stop signal (systemd's, an impatient operator's) must
        # not kill the interpreter while it exits, which would turn 0 into -15
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


def run(cfg: Config, progress: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run a supervisor in this process until it is stopped; the exit code."""
    try:
        sup = Supervisor(cfg, progress)
    except NoodleError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    code = sup.run()
    sys.stderr.flush()
    return code
