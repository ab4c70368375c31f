"""Slot housekeeping: the supervisor's periodic repairs of the slot table.

Each chore finds slots that nobody would move on otherwise and moves them:
leases whose holder died, abandoned slots whose cool-down is over, ready
slots a killed client dropped outside the ring, a queued waiter that died,
slots owned by a pid that is no worker in a step, a scribbled segment, and
idle slots whose task is not in any queue (a full queue, an expired backoff,
a reclaimed lease, a restart).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from noodle import holders, lifecycle, queues
from noodle import layout as L
from noodle.config import Config
from noodle.every import Every
from noodle.integrity import IntegrityChecker
from noodle.seats import WorkerSeats
from noodle.segment import Segment
from noodle.shutdown import Shutdown

log = logging.getLogger("noodle.supervisor")

SENDER_GRACE_NS = 20_000_000  # a worker or client between its CAS and its send
RESEND_AFTER_NS = 30_000_000_000  # a dispatched task unclaimed this long was lost


class SlotHousekeeping:
    """The chores, each rate-limited; the supervisor loop calls them in order."""

    def __init__(self, cfg: Config, seg: Segment, queues: dict[str, Any], seats: WorkerSeats,
                 shutdown: Shutdown) -> None:  # fmt: skip
        self.cfg = cfg
        self.seg = seg
        self.queues = queues
        self.seats = seats
        self.shutdown = shutdown
        self.every = Every()
        policy = lifecycle.Policy(cfg.max_failures, cfg.abandon_cooldown)
        self.integrity = IntegrityChecker(seg, policy.longest_wait())
        self._missing_ready: dict[int, int] = {}
        self._idle_owned: dict[int, int] = {}
        self._turn_watch = holders.TurnWatch()
        self._lease_starts: dict[int, tuple[int, int, float]] = {}  # slot -> (word, start, first seen)

    @property
    def draining(self) -> bool:
        return self.shutdown.draining

    def free_foreign_owners(self) -> None:
        """A stage state owned by a pid that is none of our workers (a
        damaged word, or a death we missed) would wait for ever: free it.
        So would one owned by a live worker that is not in a step (a damaged
        generation made the worker's final CAS fail); that one is freed when
        seen twice, since a worker claims a slot just before its step starts.
        Ready and abandoned slots have no owner at all."""
        if not self.every("owners", 1.0):
            return
        idle_owned: dict[int, int] = {}
        for slot, word in enumerate(self.seg.states()):
            st, pid = L.word_state(word), L.word_pid(word)
            if pid == 0 or st == L.State.LEASED:
                continue
            in_step = self.seats.in_step(pid)
            if in_step is not None:
                if in_step:
                    continue  # in its step: kill_stuck watches it
                if self._idle_owned.get(slot) != word:
                    idle_owned[slot] = word
                    continue
            if lifecycle.stage_of(st) is not None or st in (L.State.READY, L.State.ABANDONED):
                if self.seg.core.cas(slot, word, L.make_word(st, L.word_gen(word), 0)):
                    self.seg.count("corruption_repairs")
                    log.error("slot %d: owner pid %d is not a worker in a step; freed (%s)",
                              slot, pid, L.describe_word(word))  # fmt: skip
        self._idle_owned = idle_owned

    def check_integrity(self) -> None:
        if self.every("integrity", 1.0):
            phase = L.Phase.DRAINING if self.draining else L.Phase.RUNNING
            if self.integrity.check(self.draining, phase):
                self.seg.count("corruption_repairs")

    def reclaim_dead_leases(self) -> None:
        """A lease whose holder is dead (on evidence: see noodle.holders) goes to terminate."""
        if not self.every("reclaim", 0.25):
            return
        for slot, word in enumerate(self.seg.states()):
            if L.word_state(word) != L.State.LEASED or not holders.lease_holder_dead(
                self.seg, slot, word, self._lease_starts
            ):
                continue
            if self.seg.core.cas(slot, word, L.make_word(L.State.TERMINATE, L.word_gen(word), 0)):
                self.seg.count("reclaimed_leases")
                log.warning("slot %d: holder pid %d is gone; reclaiming its instance", slot, L.word_pid(word))
            self._lease_starts.pop(slot, None)

    def retry_abandoned(self) -> None:
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
        """Pass the turn on from a queued waiter that died or stopped (noodle.holders.TurnWatch)."""
        if not self.every("waiters", 0.25):
            return
        skip = self._turn_watch.check(self.seg)
        if skip is not None and self.seg.core.skip_waiter(skip[0]):
            self.seg.count("waiters_skipped")
            log.warning("waiter ticket %d (pid %d) %s; passing its turn on", *skip)

    def feed_backlogs(self) -> None:
        """Send tasks for idle slots whose task is not in a queue: a full
        queue, a backoff that expired, a reclaimed lease, a restart."""
        now = time.monotonic_ns()
        full: set[str] = set()
        for slot, word in enumerate(self.seg.states()):
            stage = lifecycle.stage_of(L.word_state(word))
            if L.word_pid(word) != 0 or stage is None:
                continue
            if stage.name in full or (self.draining and stage.refills):
                continue
            rec = self.seg.record(slot)
            if rec.retry_at_ns > now:
                continue  # backing off
            if rec.queued_ns >= rec.entered_ns:
                if now - rec.queued_ns < RESEND_AFTER_NS:
                    continue  # its task is in the queue
            elif now - rec.entered_ns < SENDER_GRACE_NS and not rec.retry_at_ns:
                continue  # whoever moved it is about to send
            if not queues.dispatch(self.queues[stage.name], slot, L.word_gen(word), self.seg.set_queued):
                full.add(stage.name)
