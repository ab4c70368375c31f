"""Detect and repair a corrupted segment while the pool runs.

Anything with write access to the segment can scribble on it (a buggy
client, a stray write). The slot table is the truth and every ring entry
is checked against it before use, which is what makes repair safe with
clients live: a rebuilt ring can at worst drop an id (re-queued by the
audit) or duplicate one (skipped as stale). Checks, once a second:

* the immutable header (magic .. checksum) is rewritten from the
  supervisor's own copy if it differs;
* the shutdown flag and phase are rewritten from the supervisor's state;
* a waiter window wider than the wait cells means the ticket words are
  garbage: every waiter is woken and re-queues;
* a state word with no valid state, a descriptor length past its area,
  or timestamps in the future are reset (the slot goes to clean);
* ring cells that fit no valid state (a free cell between head and tail,
  a full cell past tail, a span outside the ring), twice in a row with head
  and tail unchanged, mean a corrupt ring: it is rebuilt and ready slots
  re-queued. The C core never walks a corrupt ring (it reports it and
  returns), so head and tail do stand still.
"""

from __future__ import annotations

import logging
import struct
import time

from noodle import layout as L
from noodle.segment import Segment

log = logging.getLogger("noodle.integrity")
FUTURE_SLACK_NS = 1_000_000_000


class IntegrityChecker:
    def __init__(self, seg: Segment, max_backoff_s: float) -> None:
        self.seg = seg
        self.header_bytes = seg.header.pack()
        self.max_backoff_ns = int(max_backoff_s * 1e9)
        self._ring_suspect: tuple[int, int, int] | None = None

    def check(self, draining: bool, phase: L.Phase) -> list[str]:
        """Run every check; returns what was repaired (empty when sound)."""
        repairs: list[str] = []
        seg = self.seg
        mm = seg._mm
        n = len(self.header_bytes)
        if bytes(mm[:n]) != self.header_bytes:
            mm[:n] = self.header_bytes
            repairs.append("header rewritten")
        flags = seg.flags()
        want = L.FLAG_SHUTDOWN if draining else 0
        if flags != want or seg.phase() != phase:
            if draining:
                seg.core.shutdown()
            seg.core.store64(L.OFF_FLAGS, want | (int(phase) << 32))
            repairs.append("flags rewritten")
        _head, _tail, tickets, turn = seg.core.queue_info()
        if (tickets - turn) & 0xFFFFFFFF > seg.header.wait_cells:
            seg.core.reset_waiters()
            repairs.append("waiter queue reset")
        repairs += self._check_slots()
        repairs += self._check_ring()
        for r in repairs:
            log.error("segment corruption repaired: %s", r)
        return repairs

    def _check_slots(self) -> list[str]:
        seg = self.seg
        repairs = []
        for slot, word in enumerate(seg.states()):
            off = seg.geometry.slot_off(slot)
            rec = seg.record(slot)
            # read the clock after the record: workers stamp slots as we scan,
            # and a stamp newer than an older "now" is not corruption
            now = time.monotonic_ns() + FUTURE_SLACK_NS
            horizon = now + self.max_backoff_ns + 10_000_000_000
            if L.word_state(word) not in L.State._value2member_map_:
                if seg.core.cas(slot, word, L.make_word(L.State.CLEAN, L.word_gen(word), 0)):
                    repairs.append(f"slot {slot}: invalid state word {word:#x} reset to clean")
            (dlen,) = struct.unpack_from("<I", seg._mm, off + L.R_DESC_LEN)
            if dlen > seg.geometry.descriptor_cap:
                struct.pack_into("<I", seg._mm, off + L.R_DESC_LEN, 0)
                repairs.append(f"slot {slot}: descriptor length {dlen} cleared")
            if rec.retry_at_ns > horizon:
                seg.set_retry_at(slot, 0)
                repairs.append(f"slot {slot}: retry time in the far future cleared")
            for field, value in ((L.R_ENTERED, rec.entered_ns), (L.R_QUEUED, rec.queued_ns)):
                if value > now:
                    seg.core.store64(off + field, now if field == L.R_ENTERED else 0)
                    repairs.append(f"slot {slot}: timestamp in the future cleared")
        return repairs

    def _check_ring(self) -> list[str]:
        seg = self.seg
        head, tail, bad = seg.core.ring_anomalies()
        if not bad:
            self._ring_suspect = None
            return []
        if self._ring_suspect != (head, tail, bad):
            self._ring_suspect = (head, tail, bad)  # maybe operations in flight: look again
            return []
        self._ring_suspect = None
        # positions continue past the old head and tail: a peer's delayed CAS
        # on an old index then fails instead of landing in the new ring
        seg.core.rebuild_ring()
        requeued = 0
        for slot, word in enumerate(seg.states()):
            if L.word_state(word) == L.State.READY and seg.core.push(slot) == L.Status.OK:
                requeued += 1
        return [f"ring rebuilt ({bad} bad cells), {requeued} ready slots re-queued"]
