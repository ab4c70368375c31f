"""Is the process that holds a lease, or the head of the waiter line, dead?

The supervisor takes a lease back, or passes a waiter's turn on, from
these decisions. Taking a live holder's lease hands its instance to the
next client while the first still uses it, so a lease is revoked only on
evidence of death: no process has the pid, the pid is a zombie, or it now
belongs to a process that started at another time. Not being able to see
the holder (``/proc`` mounted with hidepid, a holder in another pid
namespace, an unreadable start time) is not evidence.

A waiter is different: holding the turn blocks every other client, so a
head waiter that is alive but does not run (stopped, traced, a frozen
cgroup) loses its turn once it has held it for ``TURN_HOLD_S`` while ids sat
in the ring; it takes a new ticket when it runs again.
"""

from __future__ import annotations

import os
import time

from noodle import layout as L
from noodle.host.proc import read_stat
from noodle.segment import Segment

ALIVE = "alive"
DEAD = "dead"
UNKNOWN = "unknown"

LEASE_RECORD_GRACE = 2.0  # seconds a lease may show no holder start time
TURN_HOLD_S = 0.5  # how long a head waiter may hold the turn while ids are ready
UNREGISTERED_GRACE_S = 1.0  # a ticket taken but its owner word not yet written


def probe(pid: int, start: int = 0, start_mask: int = (1 << 64) - 1) -> str:
    """DEAD, ALIVE or UNKNOWN for ``pid``, which started at ``start`` (0:
    not known; compared under ``start_mask``)."""
    if pid <= 0:
        return UNKNOWN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return DEAD
    except PermissionError:
        pass  # exists, owned by someone else
    stat = read_stat(pid)
    if stat is None:
        # it existed a moment ago: it may have exited since (look again) or
        # we may not be allowed to see it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return DEAD
        except PermissionError:
            pass
        return UNKNOWN
    actual = stat.start
    if stat.dead:
        return DEAD
    if start and actual and (actual & start_mask) != (start & start_mask):
        return DEAD  # the pid was reused
    return ALIVE


def read_holder(seg: Segment, slot: int) -> tuple[int, int]:
    """(owner_gen, owner_start) of a slot, read in the order that pairs them
    consistently: the holder writes start, then gen (release), so gen is
    loaded first; a start read after a matching gen is that holder's."""
    off = seg.geometry.slot_off(slot)
    gen32 = seg.core.load64(off + L.R_OWNER_GEN) & 0xFFFFFFFF  # R_OWNER_GEN is 8-aligned: gen | failures << 32
    start = seg.core.load64(off + L.R_OWNER_START)
    return gen32, start


def lease_holder_dead(
    seg: Segment, slot: int, word: int, seen: dict[int, tuple[int, int, float]], now: float | None = None
) -> bool:
    """True when the lease ``word`` of ``slot`` should be revoked.

    ``seen`` is the caller's memory across passes (slot -> (word, start,
    first seen)) for a lease whose holder record is not written yet: that
    is either the instant after the holder's CAS or a damaged word naming
    some live process; a record that stays unwritten past the grace is
    damage."""
    now = time.monotonic() if now is None else now
    pid, gen = L.word_pid(word), L.word_gen(word)
    gen32, start = read_holder(seg, slot)
    expected = start if gen32 == (gen & 0xFFFFFFFF) else 0
    verdict = probe(pid, expected)
    if verdict == DEAD:
        return True
    if verdict == UNKNOWN or expected:
        seen.pop(slot, None)
        return False
    stat = read_stat(pid)
    actual = stat.start if stat else 0
    first = seen.get(slot)
    if first is None or first[0] != word:
        seen[slot] = (word, actual, now)
        return False
    # a pid that started after we first saw the lease cannot be its holder
    return not (first[1] == actual and now - first[2] < LEASE_RECORD_GRACE)


class TurnWatch:
    """Decides when the supervisor passes the head waiter's turn on."""

    def __init__(self) -> None:
        self._ticket: int | None = None
        self._since = 0.0
        self._ready_since: float | None = None

    def check(self, seg: Segment, now: float | None = None) -> tuple[int, int, str] | None:
        """(ticket, pid, why) to skip, or None."""
        now = time.monotonic() if now is None else now
        head = seg.core.head_waiter()
        if head is None:
            self._ticket = None
            return None
        ticket, pid, registered, start32 = head
        if ticket != self._ticket:
            self._ticket, self._since, self._ready_since = ticket, now, None
        if registered and pid:
            if probe(pid, start32, 0xFFFFFFFF) == DEAD:
                return ticket, pid, "is gone"
        elif now - self._since < UNREGISTERED_GRACE_S:
            return None  # a live waiter between taking its ticket and writing its pid
        else:
            return ticket, pid, "never registered"
        h, t, _tickets, _turn = seg.core.queue_info()
        if (t - h) <= 0:
            self._ready_since = None
            return None
        if self._ready_since is None:
            self._ready_since = now
            return None
        if now - self._ready_since >= TURN_HOLD_S:
            return ticket, pid, f"held the turn {now - self._ready_since:.1f} s with instances ready (stopped?)"
        return None
