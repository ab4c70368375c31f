"""Unit tests of the pool segment: create/attach, validation, acquire,
release, publish, snapshot. Real POSIX shared memory throughout."""

from __future__ import annotations

import os
import struct
import time

import msgpack
import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import noodle
from noodle import layout as L
from noodle.host.proc import read_stat
from noodle.segment import Segment, segment_name
from tests.segmentlib import segment_from_bytes


@pytest.fixture
def seg(pool_name: str):
    s = Segment.create(pool_name, 4, "process")
    yield s
    s.close()
    s.unlink()


def make_ready(seg: Segment, slot: int, desc: dict | None = None) -> int:
    """Drive a slot to ready the way a spawn worker does."""
    w = seg.core.load(slot)
    mine = L.make_word(L.State.SPAWN, L.word_gen(w), os.getpid())
    assert seg.core.cas(slot, w, mine)
    assert seg.publish(slot, mine, msgpack.packb(desc or {"slot": slot})) == L.Status.OK
    return L.word_gen(mine) + 1


def test_create_attach_and_layout_fields(seg: Segment, pool_name: str) -> None:
    other = Segment.attach(pool_name)
    try:
        h = other.header
        assert (h.pool_size, h.kind, h.pool_name, h.creator_pid) == (4, "process", pool_name, os.getpid())
        assert h.ring_capacity == 8 and h.ring_capacity & (h.ring_capacity - 1) == 0
        assert not other.owner
        with pytest.raises(PermissionError):
            other.unlink()
        snap = other.snapshot()
        assert snap["states"] == {"clean": 4, "prepare": 0, "spawn": 0, "ready": 0, "leased": 0, "terminate": 0,
                                  "abandoned": 0}
    finally:
        other.close()


def test_segment_is_owner_only_by_default(seg: Segment, pool_name: str) -> None:
    mode = os.stat(f"/dev/shm{segment_name(pool_name)}").st_mode & 0o777
    assert mode == 0o600


def test_attach_missing_pool() -> None:
    with pytest.raises(noodle.PoolNotFound, match="noodle run --name"):
        Segment.attach("no-such-pool-here")


@pytest.mark.parametrize("size", [0, -1, L.MAX_POOL_SIZE + 1])
def test_bad_pool_size(size: int, pool_name: str) -> None:
    with pytest.raises(noodle.ConfigError, match="pool_size"):
        Segment.create(pool_name, size, "process")


def test_bad_name() -> None:
    with pytest.raises(noodle.ConfigError, match="pool name"):
        Segment.create("../etc", 1, "process")


def _raw_segment(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREX, mode=0o600, size=max(len(data), 1))
    os.pwrite(shm.fd, data, 0)
    shm.close_fd()


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda b: b[:100], noodle.PoolCorrupt, "truncated"),
        (lambda b: b"GARBAGE!" + b[8:], noodle.PoolCorrupt, "not a pool-noodle segment"),
        (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], noodle.LayoutMismatch, "layout version 99"),
        (lambda b: b[:16] + struct.pack("<I", 5) + b[20:], noodle.PoolCorrupt, "checksum"),
        (lambda b: b[: len(b) // 2], noodle.PoolCorrupt, "inconsistent header"),
    ],
)
def test_attach_refuses_bad_segments(pool_name: str, mutate, exc, match) -> None:
    good = Segment.create(pool_name, 4, "process")
    data = bytes(good._mm)
    good.close()
    good.unlink()
    _raw_segment(pool_name, mutate(bytearray(data)))
    try:
        with pytest.raises(exc, match=match):
            Segment.attach(pool_name)
    finally:
        posix_ipc.unlink_shared_memory(segment_name(pool_name))


def test_crafted_header_with_valid_crc_but_lying_sizes(pool_name: str) -> None:
    """A header whose checksum is right but whose sizes point past the
    mapping must be refused before C ever dereferences it."""
    good = Segment.create(pool_name, 4, "process")
    raw = bytearray(good._mm[: L.HEADER_SIZE])
    good.close()
    good.unlink()
    h, _ = L.Header.unpack(bytes(raw))
    from dataclasses import replace

    liar = replace(h, pool_size=60000, ring_capacity=L.ring_capacity_for(60000))
    raw[: L.CRC_OFFSET + 4] = liar.pack()
    with pytest.raises(noodle.PoolCorrupt, match="inconsistent"):
        segment_from_bytes("fuzz", bytes(raw) + bytes(8192))


_VALID = None


def _valid_bytes() -> bytes:
    global _VALID
    if _VALID is None:
        s = Segment.create("fuzzseed", 4, "process")
        _VALID = bytes(s._mm)
        s.close()
        s.unlink()
    return _VALID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096))
def test_fuzz_attach_random_bytes(data: bytes) -> None:
    """Random bytes never crash attach: a NoodleError or a valid segment."""
    try:
        s = segment_from_bytes("fuzz", data)
    except noodle.NoodleError:
        return
    s.snapshot()
    s.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), min_size=1, max_size=32))
def test_fuzz_attach_mutated_valid_segment(flips) -> None:
    """Byte flips anywhere in a real segment: attach refuses or the segment
    works; every operation stays in bounds (states, ring, descriptors)."""
    data = bytearray(_valid_bytes())
    for off, val in flips:
        data[off % len(data)] = val
    try:
        s = segment_from_bytes("fuzz", bytes(data))
    except noodle.NoodleError:
        return
    try:
        s.snapshot()
        s.core.ring_ids()
        for slot in range(s.pool_size):
            try:
                s.descriptor_bytes(slot)
            except noodle.PoolCorrupt:
                pass
        st_, slot, _gen = s.core.acquire(0)
        assert st_ in (L.Status.OK, L.Status.EMPTY, L.Status.SHUTDOWN)
        if st_ == L.Status.OK:
            assert 0 <= slot < s.pool_size
    finally:
        s.close()


def test_acquire_release_and_stale_release(seg: Segment) -> None:
    gen = make_ready(seg, 2, {"x": 1})
    status, slot, g = seg.core.acquire(0)
    assert (status, slot, g) == (L.Status.OK, 2, gen)
    w = seg.core.load(2)
    assert (L.word_state(w), L.word_pid(w), L.word_gen(w)) == (L.State.LEASED, os.getpid(), gen)
    assert msgpack.unpackb(seg.descriptor_bytes(2)) == {"x": 1}
    assert seg.core.release(2, gen) == L.Status.OK
    assert L.word_state(seg.core.load(2)) == L.State.TERMINATE
    before = seg.counters()["stale_releases"]
    assert seg.core.release(2, gen) == L.Status.STALE  # a repeat
    assert seg.core.release(2, gen + 7) == L.Status.STALE  # a wrong generation
    assert seg.counters()["stale_releases"] == before + 2
    assert seg.core.release(99, gen) == L.Status.RANGE


def test_release_of_anothers_lease_is_refused(seg: Segment, pool_name: str) -> None:
    gen = make_ready(seg, 1)
    assert seg.core.acquire(0)[:2] == (L.Status.OK, 1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        other = Segment.attach(pool_name)
        os.write(w, bytes([other.core.release(1, gen)]))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1)[0] == L.Status.NOT_OWNER
    assert L.word_state(seg.core.load(1)) == L.State.LEASED  # untouched
    assert seg.counters()["forged_releases"] == 1


def test_acquire_empty_and_timeout(seg: Segment) -> None:
    assert seg.core.acquire(0)[0] == L.Status.EMPTY
    assert seg.core.acquire(20_000_000)[0] == L.Status.EMPTY
    assert seg.counters()["wait_timeouts"] == 1


def test_publish_requires_the_spawn_owner_word(seg: Segment) -> None:
    w = seg.core.load(0)
    assert seg.publish(0, w, b"") == L.Status.STALE  # state is clean, not spawn
    mine = L.make_word(L.State.SPAWN, 0, os.getpid())
    assert seg.core.cas(0, w, mine)
    with pytest.raises(noodle.DescriptorTooLarge):
        seg.publish(0, mine, b"x" * (seg.geometry.descriptor_cap + 1))
    assert seg.publish(0, L.make_word(L.State.SPAWN, 0, os.getpid() + 1), b"") == L.Status.STALE
    assert seg.publish(0, mine, b"") == L.Status.OK
    assert L.word_gen(seg.core.load(0)) == 1  # generation grows on every spawn


def test_slot_out_of_range(seg: Segment) -> None:
    with pytest.raises(noodle.SlotOutOfRange):
        seg.record(4)
    with pytest.raises(IndexError):
        seg.core.load(-1)
    with pytest.raises(IndexError):
        seg.core.cas(4, 0, 0)


def test_stale_ring_entry_is_skipped(seg: Segment) -> None:
    gen = make_ready(seg, 3)
    assert seg.core.push(3) == L.Status.OK  # a duplicate id
    assert seg.core.acquire(0) == (L.Status.OK, 3, gen)
    assert seg.core.acquire(0)[0] == L.Status.EMPTY  # the duplicate is dropped
    assert seg.counters()["stale_ring_entries"] == 1


def test_snapshot_sums_to_pool_size(seg: Segment) -> None:
    make_ready(seg, 0)
    make_ready(seg, 1)
    seg.core.acquire(0)
    snap = seg.snapshot()
    assert sum(snap["states"].values()) == 4
    assert snap["states"]["leased"] == 1 and snap["states"]["ready"] == 1 and snap["states"]["clean"] == 2
    assert snap["latency_us"]["acquire"]["count"] == 1
    assert snap["ring_length"] == 1


def test_histograms_keep_the_real_maximum(seg: Segment) -> None:
    """Percentiles come from log2 buckets; the maximum is the sample itself,
    raised by CAS beside the buckets, even for a sample past the top bucket."""
    for ns in (1_500, 3_000_000, 2_999_999, 700):
        seg.observe("spawn", ns)
    lat = seg.snapshot()["latency_us"]["spawn"]
    assert lat["count"] == 4 and lat["max"] == 3000.0  # us, exact: not the bucket bound 4194.304
    assert seg.histogram_max()["spawn"] == 3_000_000 and len(seg.histograms()["spawn"]) == L.HIST_MAX
    seg.observe("spawn", (1 << 64) - 1)
    assert seg.histograms()["spawn"][L.HIST_MAX - 1] == 1 and seg.histogram_max()["spawn"] == (1 << 64) - 1


def test_shutdown_refuses_get(seg: Segment) -> None:
    make_ready(seg, 0)
    seg.core.shutdown()
    assert seg.core.acquire(0)[0] == L.Status.SHUTDOWN
    assert seg.shutting_down


# ---- lease holders (issue 9 items 10-11) --------------------------------------------------

from noodle import holders  # noqa: E402


def _lease_in_child(seg: Segment, pool_name: str) -> tuple[int, int, int]:
    """A child leases slot 0 and exits without being reaped: (pid, slot, gen)."""
    make_ready(seg, 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child = Segment.attach(pool_name)
        st, slot, gen = child.core.acquire(0)
        os.write(w, struct.pack("<iiQ", st, slot, gen))
        os._exit(0)
    st, slot, gen = struct.unpack("<iiQ", os.read(r, 16))
    os.close(r)
    os.close(w)
    assert st == L.Status.OK
    return pid, slot, gen


def test_zombie_holder_counts_as_dead(seg: Segment, pool_name: str) -> None:
    pid, slot, _gen = _lease_in_child(seg, pool_name)
    try:
        deadline = time.monotonic() + 30
        while (stat := read_stat(pid)) is not None and not stat.dead:
            assert time.monotonic() < deadline
        word = seg.core.load(slot)
        assert L.word_state(word) == L.State.LEASED and L.word_pid(word) == pid
        assert holders.lease_holder_dead(seg, slot, word, {})
    finally:
        os.waitpid(pid, 0)


def test_live_holder_that_cannot_be_seen_is_not_revoked(seg: Segment, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ready(seg, 1)
    st, slot, _gen = seg.core.acquire(0)
    assert st == L.Status.OK
    word = seg.core.load(slot)
    assert not holders.lease_holder_dead(seg, slot, word, {})
    # /proc hidden (hidepid) or unreadable: no evidence of death
    monkeypatch.setattr(holders, "read_stat", lambda pid: None)
    seen: dict[int, tuple[int, int, float]] = {}
    assert not any(holders.lease_holder_dead(seg, slot, word, seen, now=t) for t in (0.0, 10.0, 100.0))


class _TornCore:
    """A core whose holder record a new holder rewrites (start, then gen: the
    writer's order) right after the reader's first load."""

    def __init__(self, seg: Segment, slot: int, new_start: int, new_gen: int) -> None:
        self.core = seg.core
        off = seg.geometry.slot_off(slot)
        self.start_off, self.gen_off = off + L.R_OWNER_START, off + L.R_OWNER_GEN
        self.pending = [(self.start_off, new_start), (self.gen_off, new_gen)]

    def load64(self, off: int) -> int:
        value = self.core.load64(off)
        while self.pending:  # the writer's two stores land after the reader's first load
            o, v = self.pending.pop(0)
            self.core.store64(o, v if o == self.start_off else (self.core.load64(o) & ~0xFFFFFFFF) | v)
        return value

    def __getattr__(self, name: str):
        return getattr(self.core, name)


def test_holder_record_is_read_gen_first(seg: Segment) -> None:
    """The new holder's CAS has landed (word: new gen, our pid) while its
    record still names the previous holder; it writes start, then gen. A
    reader that loads start before gen can pair the old start with the new
    gen and revoke a live lease."""
    make_ready(seg, 2)
    st, slot, gen = seg.core.acquire(0)
    assert st == L.Status.OK
    word = seg.core.load(slot)
    me = holders.read_stat(os.getpid())
    assert me is not None
    off = seg.geometry.slot_off(slot)
    seg.core.store64(off + L.R_OWNER_START, me.start + 12345)  # a previous holder's start time...
    seg.core.store64(off + L.R_OWNER_GEN, (seg.core.load64(off + L.R_OWNER_GEN) & ~0xFFFFFFFF) | (gen - 1))  # ...gen
    real = seg.core
    seg.core = _TornCore(seg, slot, me.start, gen & 0xFFFFFFFF)  # type: ignore[assignment]
    try:
        assert not holders.lease_holder_dead(seg, slot, word, {})
    finally:
        seg.core = real
