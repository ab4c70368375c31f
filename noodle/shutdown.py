"""Stopping a pool: draining it, and the exception that ends the loop.

SIGTERM/SIGINT begin a drain: new ``get()`` fail at once, ready instances
are terminated, leases get ``drain_timeout`` to come back, everything is
cleaned; a second signal revokes leases at once. The loop ends when every
slot is settled (or ``hard_deadline`` passes) by raising :class:`Halt`,
which carries the process's exit code.
"""

from __future__ import annotations

import logging
import time

from noodle import layout as L
from noodle import lifecycle
from noodle.config import Config
from noodle.segment import Segment
from noodle.systemd import Notifier

log = logging.getLogger("noodle.supervisor")

EXIT_OK = 0
EXIT_ERROR = 1
LAST_STEP_GRACE = 5.0  # seconds past a step's timeout before shutdown gives up on it


class Halt(Exception):
    """Stop the supervisor loop now and exit with ``code``."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(reason or f"exit {code}")
        self.code = code
        self.reason = reason


class Shutdown:
    """The drain of one pool: whether it began, its deadlines, the exit code
    it will end with."""

    def __init__(self, cfg: Config, notifier: Notifier) -> None:
        self.cfg = cfg
        self.notifier = notifier
        self.draining = False
        self.exit_code = EXIT_OK
        self.drain_deadline = 0.0  # leases still out then are revoked
        self.hard_deadline = 0.0  # slots still unsettled then are left to teardown

    def begin(self, seg: Segment) -> None:
        if self.draining:
            return
        cfg = self.cfg
        log.info("stopping pool %r: draining (leases have %.1f s to come back)", cfg.name, cfg.drain_timeout)
        self.draining = True
        now = time.monotonic()
        self.drain_deadline = now + cfg.drain_timeout
        self.hard_deadline = self.drain_deadline + cfg.step_timeout + LAST_STEP_GRACE
        seg.set_phase(L.Phase.DRAINING)
        seg.core.shutdown()
        self.notifier.stopping()
        for slot, word in enumerate(seg.states()):
            to = lifecycle.at_shutdown(L.word_state(word), L.word_pid(word))
            if to is None:
                continue
            if L.word_state(word) == L.State.ABANDONED:
                seg.set_retry_at(slot, 0)  # one last clean attempt
            seg.core.cas(slot, word, L.make_word(to, L.word_gen(word), 0))

    def hurry(self) -> None:
        """A second stop signal: revoke leases now."""
        now = time.monotonic()
        self.drain_deadline = min(self.drain_deadline, now)
        self.hard_deadline = min(self.hard_deadline, now + self.cfg.step_timeout + LAST_STEP_GRACE)

    def fail(self, seg: Segment, reason: str) -> None:
        """Stop at once with an error exit (a worker could not boot)."""
        self.exit_code = EXIT_ERROR
        self.begin(seg)
        self.hard_deadline = time.monotonic()
        log.critical("%s; stopping the pool instead of restarting it", reason)

    def drain(self, seg: Segment) -> None:
        """Move every slot toward ``prepare, owner 0`` (cleaned, not refilled);
        Halt when all are there or the hard deadline passed."""
        now = time.monotonic()
        leases_due = now >= self.drain_deadline
        settled = True
        for slot, word in enumerate(seg.states()):
            st, gen = L.word_state(word), L.word_gen(word)
            move = lifecycle.while_draining(st, L.word_pid(word), leases_due)
            settled = settled and move.settled
            if move.to is None or not seg.core.cas(slot, word, L.make_word(move.to, gen, 0)):
                continue
            if st == L.State.LEASED:
                seg.count("reclaimed_leases")
                log.warning("slot %d: lease not returned within drain_timeout; terminating it", slot)
        if settled:
            raise Halt(self.exit_code, "drained")
        if now >= self.hard_deadline:
            left = {k: v for k, v in seg.snapshot()["states"].items() if v}
            log.error("shutdown deadline passed with slots unfinished: %s", left)
            raise Halt(self.exit_code, "shutdown deadline passed")
