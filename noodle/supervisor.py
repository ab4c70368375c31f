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
        |          leased->terminate + a task

The loop (``Supervisor.loop``) reads top to bottom like gunicorn's arbiter.
Its concerns live in their own modules: ``seats`` (forking, collecting,
replacing and stopping workers), ``housekeeping`` (the periodic repairs of
the slot table), ``shutdown`` (draining, and ``Halt``, which ends the loop
with an exit code). Signal handlers only record the signal number.
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
from types import FrameType
from typing import Any

from setproctitle import setproctitle

from noodle import layout as L
from noodle import queues
from noodle.config import Config
from noodle.errors import NoodleError
from noodle.every import Every
from noodle.healthcheck import run_cycle
from noodle.host import sched
from noodle.host.proc import descendants_of
from noodle.housekeeping import SlotHousekeeping
from noodle.kinds import Kind, PoolInfo, load_kind
from noodle.recovery import PoolLock, recover_stale
from noodle.seats import WorkerSeats
from noodle.segment import Segment
from noodle.shutdown import EXIT_ERROR, EXIT_OK, Halt, Shutdown
from noodle.systemd import Notifier
from noodle.workers.stage import step_deadline

log = logging.getLogger("noodle.supervisor")

PR_SET_CHILD_SUBREAPER = 36
TICK = 0.05  # seconds between loop passes when no signal arrives

__all__ = ["EXIT_ERROR", "EXIT_OK", "Supervisor", "run"]


class Supervisor:
    """One pool's supervisor process: creates the pool's names, forks its
    workers, runs the loop until a stop signal has drained the pool, and
    removes every name it created. ``start`` then ``loop`` (or ``run``)."""

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
        self.shutdown = Shutdown(cfg, self.notifier)
        self.seg: Segment | None = None
        self.queues: dict[str, Any] = {}
        self._workers: WorkerSeats | None = None
        self._housekeeping: SlotHousekeeping | None = None
        self.signals: list[int] = []
        self._wake_r, self._wake_w = -1, -1
        self.every = Every()

    @property
    def workers(self) -> WorkerSeats:
        assert self._workers is not None, "start() first"
        return self._workers

    @property
    def housekeeping(self) -> SlotHousekeeping:
        assert self._housekeeping is not None, "start() first"
        return self._housekeeping

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
        # the whole session's share: workers, the zygote and warming instances
        try:
            why_not = sched.set_session_nice(cfg.refill_nice)
        except sched.RefillNiceError as exc:
            why_not = str(exc)
        if why_not is None:
            log.info("refill runs at autogroup nice %d: it yields the CPU to jobs", cfg.refill_nice)
        elif cfg.refill_nice:
            log.info("refill_nice %d not applied: %s", cfg.refill_nice, why_not)
        self.kind.setup()
        stopped = recover_stale(cfg.name, self.kind, cfg.pool_size)
        if stopped:
            log.warning("stopped %d instances left by a dead supervisor", stopped)
        if cfg.check_health:
            timings = run_cycle(self.kind, cfg.pool_size, cfg.step_timeout)
            log.info("check_health passed: %s", ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))
        seg = Segment.create(cfg.name, cfg.pool_size, cfg.kind, cfg.descriptor_size, mode=cfg.mode, gid=cfg.gid,
                             get_timeout=cfg.get_timeout, health_on_get=cfg.health_on_get)  # fmt: skip
        self.seg = seg
        seg.heartbeat()
        self.queues = queues.create_all(cfg.name, mode=cfg.mode, gid=cfg.gid)
        self._workers = WorkerSeats(cfg, seg, self.kind, self.shutdown)
        self._housekeeping = SlotHousekeeping(cfg, seg, self.queues, self._workers, self.shutdown)
        self._workers.top_up()
        seg.set_phase(L.Phase.RUNNING)
        self.notifier.ready(self.status_line())
        log.info("pool %r: %d %s slots, %d workers, run dir %s",
                 cfg.name, cfg.pool_size, cfg.kind, len(self._workers.seats), self.run_dir)  # fmt: skip

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    # == the loop ===================================================================

    def run(self) -> int:
        """Start, loop until halted, stop the workers, remove every name; the exit code."""
        try:
            self.start()
        except NoodleError as exc:
            log.error("%s", exc)
            self.teardown()
            return EXIT_ERROR
        code = EXIT_ERROR
        try:
            self.loop()
        except Halt as halt:
            code = halt.code
        except Exception:
            log.exception("supervisor loop failed; shutting down")
        finally:
            self.stop_workers()
            self.teardown()
        return code

    def loop(self) -> None:
        """One pass per signal or tick, until ``Halt`` (raised by the drain)."""
        workers, chores, shutdown = self.workers, self.housekeeping, self.shutdown
        while True:
            self.sleep()
            self.handle_signals()
            workers.reap()
            workers.kill_stuck()
            chores.free_foreign_owners()
            workers.top_up()
            chores.check_integrity()
            chores.reclaim_dead_leases()
            if shutdown.draining:
                shutdown.drain(self.segment)
            else:
                chores.retry_abandoned()
                chores.audit_ring()
                chores.sweep_waiters()
            chores.feed_backlogs()
            self.kind.maintain()
            self.report()

    @property
    def segment(self) -> Segment:
        assert self.seg is not None, "start() first"
        return self.seg

    def sleep(self) -> None:
        if self.signals:
            return
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._wake_r], [], [], TICK)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass

    # -- signals ---------------------------------------------------------------------

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            name = signal.Signals(sig).name.lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        if self.shutdown.draining:
            log.warning("second stop signal: revoking leases now")
            self.shutdown.hurry()
            return
        self.begin_shutdown()

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        self.begin_shutdown()
        self.handle_sigterm()

    def handle_sighup(self) -> None:
        log.info("SIGHUP ignored: restart the service to change its configuration")

    def handle_sigchld(self) -> None:
        pass  # the workers' reap() runs on every pass

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
            self.notifier.status(("stopping: " if self.shutdown.draining else "") + self.status_line())
        if self.progress is not None and self.every("progress", 0.2):
            self.progress(self.seg.snapshot())

    # == shutdown ====================================================================

    def begin_shutdown(self) -> None:
        if self.seg is not None:
            self.shutdown.begin(self.seg)

    def stop_workers(self) -> None:
        if self._workers is not None:
            self._workers.stop()

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
                # anything not cleaned by a worker is stopped and cleaned here,
                # each step bounded like a worker's
                try:
                    with step_deadline(self.cfg.step_timeout):
                        if st in (L.State.READY, L.State.LEASED, L.State.TERMINATE, L.State.SPAWN):
                            desc = seg.descriptor(slot)
                            if desc:
                                self.kind.terminate(self.info.slot(slot), desc)
                        self.kind.clean(self.info.slot(slot))
                except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                    log.error("slot %d: final clean failed: %s", slot, exc)
        with contextlib.suppress(Exception), step_deadline(self.cfg.step_timeout):
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
