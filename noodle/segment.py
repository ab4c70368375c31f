"""One pool's shared-memory segment: create, attach, validate, read.

The supervisor creates and unlinks the segment; every other process
attaches without owning it. We map it with ``mmap`` on a ``posix_ipc``
file descriptor rather than ``multiprocessing.shared_memory``, whose
resource tracker would unlink the segment when an attached client exits.

Validation happens before the C core is given the mapping: a truncated,
foreign, corrupt or other-version segment raises PoolCorrupt or
LayoutMismatch and is never touched.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import posix_ipc

from noodle import layout as L
from noodle._shm import Core
from noodle.errors import (
    ConfigError,
    DescriptorTooLarge,
    LayoutMismatch,
    PermissionDenied,
    PoolCorrupt,
    PoolExists,
    PoolNotFound,
    SlotOutOfRange,
)
from noodle.host.proc import start_time


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not L.NAME_RE.match(name):
        raise ConfigError(
            f"name: {name!r} is not a valid pool name (1-48 characters of letters, digits, '_', '.', '-',"
            " starting with a letter or digit)"
        )
    return name


def segment_name(pool: str) -> str:
    return f"/noodle.{pool}"


@dataclass(frozen=True)
class SlotRecord:
    """A racy but bounded read of one slot's fields (for status and audits)."""

    slot: int
    word: int
    owner_start: int
    owner_gen: int
    failures: int
    entered_ns: int
    queued_ns: int
    retry_at_ns: int
    last_failed_step: int
    spawned_ns: int

    @property
    def state(self) -> int:
        return L.word_state(self.word)

    @property
    def pid(self) -> int:
        return L.word_pid(self.word)

    @property
    def gen(self) -> int:
        return L.word_gen(self.word)


_REC = struct.Struct("<QQIIQQQIIQ")
_U32 = struct.Struct("<I")


class Segment:
    """A mapped pool segment. ``owner`` is True only in the supervisor."""

    def __init__(self, name: str, mm: mmap.mmap, header: L.Header, owner: bool) -> None:
        self.name = name
        self.header = header
        self.geometry = header.geometry()
        self.owner = owner
        self._mm = mm
        self.core = Core(mm, *self.geometry.core_args())
        self.pool_size = header.pool_size
        self._closed = False
        # plain ints: the client's get() path reads these on every call
        self._slots_off = self.geometry.slots_off
        self._slot_size = self.geometry.slot_size
        self._desc_cap = self.geometry.descriptor_cap

    # -- lifecycle --------------------------------------------------------------

    @classmethod
    def create(
        cls,
        pool: str,
        pool_size: int,
        kind: str,
        descriptor_cap: int = L.DEFAULT_DESCRIPTOR,
        wait_cells: int = L.DEFAULT_WAIT_CELLS,
        mode: int = 0o600,
        gid: int | None = None,
        get_timeout: float = 5.0,
        health_on_get: bool = False,
    ) -> Segment:
        validate_name(pool)
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or not 1 <= pool_size <= L.MAX_POOL_SIZE:
            raise ConfigError(f"pool_size: {pool_size!r} must be an integer in 1..{L.MAX_POOL_SIZE}")
        if not 0 < descriptor_cap <= L.MAX_DESCRIPTOR:
            raise ConfigError(f"descriptor_size: {descriptor_cap} must be in 1..{L.MAX_DESCRIPTOR}")
        if not L.valid_wait_cells(wait_cells):
            raise ConfigError(
                f"wait_cells: {wait_cells} must be a power of two in 1..65536 (tickets are 32-bit counters that"
                " wrap; only a divisor of 2**32 keeps the cells in step across the wrap)"
            )
        if len(kind.encode()) > 32:
            raise ConfigError(f"kind: {kind!r} is longer than 32 bytes")
        geo = L.Geometry(pool_size, L.ring_capacity_for(pool_size), descriptor_cap, wait_cells)
        if os.path.exists(f"/dev/shm{segment_name(pool)}"):
            raise PoolExists(f"a segment for pool {pool!r} already exists")
        # Built under a private name and linked into place when complete, so
        # an attaching client never sees a half-written header.
        building = f"{segment_name(pool)}.building-{os.getpid()}"
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(building)
        shm = posix_ipc.SharedMemory(building, posix_ipc.O_CREX, mode=mode, size=geo.total_size)
        try:
            # umask may have narrowed the mode; the group must get what was asked
            os.fchmod(shm.fd, mode)
            if gid is not None:
                os.fchown(shm.fd, -1, gid)
            mm = mmap.mmap(shm.fd, geo.total_size)
        finally:
            shm.close_fd()
        pid = os.getpid()
        header = L.Header(
            L.MAGIC, L.LAYOUT_VERSION, L.HEADER_SIZE, pool_size, geo.ring_capacity, geo.slot_size,
            descriptor_cap, wait_cells, geo.n_counters, geo.n_histograms, pid, start_time(pid) or 0,
            geo.total_size, time.time_ns(), pool, kind,
        )  # fmt: skip
        mm[: L.CRC_OFFSET + 4] = header.pack()
        seg = cls(pool, mm, header, owner=True)
        seg.core.init_ring()
        for slot in range(pool_size):
            seg.core.store64(geo.slot_off(slot) + L.R_STATE, L.make_word(L.State.CLEAN, 0, 0))
        seg.set_policy(get_timeout, health_on_get)  # before anyone can attach: clients cache it
        try:
            os.link(f"/dev/shm{building}", f"/dev/shm{segment_name(pool)}")
        except FileExistsError:
            seg.close()
            raise PoolExists(f"a segment for pool {pool!r} already exists") from None
        finally:
            posix_ipc.unlink_shared_memory(building)
        return seg

    @classmethod
    def attach(cls, pool: str) -> Segment:
        validate_name(pool)
        try:
            shm = posix_ipc.SharedMemory(segment_name(pool))
        except posix_ipc.ExistentialError:
            raise PoolNotFound(
                f"no pool named {pool!r} (no segment /dev/shm{segment_name(pool)}); start one with"
                f" `noodle run --name {pool}`"
            ) from None
        except posix_ipc.PermissionsError:
            raise PermissionDenied(
                f"may not open pool {pool!r}: run as its owner or as a member of its group"
            ) from None
        try:
            return cls._map_validated(pool, shm.fd, shm.size)
        finally:
            shm.close_fd()

    @classmethod
    def _map_validated(cls, pool: str, fd: int, size: int) -> Segment:
        if size < L.HEADER_SIZE:
            raise PoolCorrupt(f"segment of pool {pool!r} is truncated ({size} bytes); restart its supervisor")
        mm = mmap.mmap(fd, size)
        try:
            header = validate_header(bytes(mm[: L.HEADER_SIZE]), size, pool)
            return cls(pool, mm, header, owner=False)
        except BaseException:
            mm.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # calls still waiting in another thread keep the mapping until they
        # leave (they return PoolClosed); the mmap then goes with its last user
        if self.core.close():
            self._mm.close()

    def unlink(self) -> None:
        if not self.owner:
            raise PermissionError("only the supervisor that created a segment unlinks it")
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(segment_name(self.name))

    @property
    def closed(self) -> bool:
        return self._closed

    # -- header words -------------------------------------------------------------

    def heartbeat(self) -> None:
        self.core.store64(L.OFF_HEARTBEAT, time.monotonic_ns())

    def heartbeat_age(self) -> float:
        last = self.core.load64(L.OFF_HEARTBEAT)
        return (time.monotonic_ns() - last) / 1e9 if last else float("inf")

    def flags(self) -> int:
        return self.core.load64(L.OFF_FLAGS) & 0xFFFFFFFF

    def phase(self) -> L.Phase:
        raw = self.core.load64(L.OFF_FLAGS) >> 32
        return L.Phase(raw) if raw in L.Phase._value2member_map_ else L.Phase.STARTING

    def set_phase(self, phase: L.Phase) -> None:
        # flags and phase share a 64-bit word; only the owner writes phase and
        # the shutdown bit is only ever set, so read-modify-write is safe here
        word = self.core.load64(L.OFF_FLAGS)
        self.core.store64(L.OFF_FLAGS, (word & 0xFFFFFFFF) | (int(phase) << 32))

    def set_policy(self, get_timeout: float, health_on_get: bool) -> None:
        flags = L.POLICY_HEALTH_ON_GET if health_on_get else 0
        ms = min(int(get_timeout * 1000), 0xFFFFFFFF)
        self.core.store64(L.OFF_POLICY, ms | (flags << 32))

    def policy(self) -> tuple[float, bool]:
        """(default get timeout in seconds, health check on get)."""
        word = self.core.load64(L.OFF_POLICY)
        return (word & 0xFFFFFFFF) / 1000.0, bool((word >> 32) & L.POLICY_HEALTH_ON_GET)

    @property
    def shutting_down(self) -> bool:
        return bool(self.flags() & L.FLAG_SHUTDOWN)

    # -- slots ----------------------------------------------------------------------

    def _slot_base(self, slot: int) -> int:
        if not isinstance(slot, int) or not 0 <= slot < self.pool_size:
            raise SlotOutOfRange(f"slot {slot!r} is not in 0..{self.pool_size - 1}")
        return self._slots_off + slot * self._slot_size

    def record(self, slot: int) -> SlotRecord:
        off = self._slot_base(slot)
        f = _REC.unpack_from(self._mm, off)
        return SlotRecord(slot, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[8], f[9])

    def set_field(self, slot: int, field: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, self._mm, self._slot_base(slot) + field, value)

    def set_failures(self, slot: int, n: int, step: L.Step = L.Step.NONE) -> None:
        self.set_field(slot, L.R_FAILURES, "<I", n)
        self.set_field(slot, L.R_LAST_FAILED, "<I", int(step))

    def set_retry_at(self, slot: int, ns: int) -> None:
        self.core.store64(self._slot_base(slot) + L.R_RETRY_AT, ns)

    def set_queued(self, slot: int, ns: int) -> None:
        """Stamp that a task for the slot's current state is in a queue."""
        self.core.store64(self._slot_base(slot) + L.R_QUEUED, ns)

    def set_spawned(self, slot: int, ns: int) -> None:
        self.core.store64(self._slot_base(slot) + L.R_SPAWNED, ns)

    def descriptor_bytes(self, slot: int) -> bytes:
        off = self._slot_base(slot)
        (n,) = _U32.unpack_from(self._mm, off + L.R_DESC_LEN)
        if n > self._desc_cap:
            raise PoolCorrupt(f"slot {slot}: descriptor length {n} exceeds its area; the segment is corrupt")
        start = off + L.R_DESCRIPTOR
        return self._mm[start : start + n]

    def descriptor(self, slot: int) -> dict[str, Any]:
        """The slot's descriptor, or {} when it is missing or garbage: for
        steps that must go on regardless (terminate, crash recovery), where
        clean then sweeps by slot."""
        try:
            return decode_descriptor(self.descriptor_bytes(slot))
        except PoolCorrupt:
            return {}

    def publish(self, slot: int, expected_word: int, descriptor: bytes) -> L.Status:
        if len(descriptor) > self._desc_cap:
            raise DescriptorTooLarge(f"descriptor of {len(descriptor)} bytes exceeds descriptor_size {self._desc_cap}")
        return L.Status(self.core.publish(slot, expected_word, descriptor))

    def states(self) -> list[int]:
        return list(self.core.states())

    # -- counters and histograms ------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.core.count(L.C[name], n)

    def observe(self, name: str, ns: int) -> None:
        self.core.observe(L.H[name], max(0, ns))

    def counters(self) -> dict[str, int]:
        off = self.geometry.counters_off
        return {name: self.core.load64(off + 8 * i) for i, name in enumerate(L.COUNTERS)}

    def histograms(self) -> dict[str, list[int]]:
        """Per histogram, the counts of its log2 buckets (``HIST_MAX`` of them)."""
        return {name: words[: L.HIST_MAX] for name, words in self._histogram_words().items()}

    def histogram_max(self) -> dict[str, int]:
        """Per histogram, the largest sample seen (nanoseconds; 0 if none)."""
        return {name: words[L.HIST_MAX] for name, words in self._histogram_words().items()}

    def _histogram_words(self) -> dict[str, list[int]]:
        off = self.geometry.hist_off
        out: dict[str, list[int]] = {}
        for i, name in enumerate(L.HISTOGRAMS):
            base = off + 8 * L.HIST_BUCKETS * i
            out[name] = list(struct.unpack_from(f"<{L.HIST_BUCKETS}Q", self._mm, base))
        return out

    def snapshot(self) -> dict[str, Any]:
        """State counts, counters and latency percentiles, read without locks.
        The state counts come from one pass over the state words, so they
        always sum to pool_size (words that are not a valid state, which only
        corruption produces, are counted under ``invalid``)."""
        counts = dict.fromkeys(L.STATE_NAMES, 0)
        invalid = 0
        for w in self.core.states():
            st = L.word_state(w)
            if st in L.State._value2member_map_:
                counts[L.State(st).name.lower()] += 1
            else:
                invalid += 1
        head, tail, tickets, turn = self.core.queue_info()
        words = self._histogram_words()
        out: dict[str, Any] = {
            "pool": self.name,
            "kind": self.header.kind,
            "pool_size": self.pool_size,
            "supervisor_pid": self.header.creator_pid,
            "phase": self.phase().name.lower(),
            "shutting_down": self.shutting_down,
            "heartbeat_age_s": round(self.heartbeat_age(), 3),
            "states": counts,
            "ring_length": max(0, tail - head),
            "waiters": (tickets - turn) & 0xFFFFFFFF,
            "counters": self.counters(),
            "latency_us": {
                name: percentiles(w[: L.HIST_MAX], w[L.HIST_MAX]) for name, w in words.items() if sum(w[: L.HIST_MAX])
            },
        }
        if invalid:
            out["invalid_states"] = invalid
        return out


def decode_descriptor(raw: bytes) -> dict[str, Any]:
    """Decode a slot's msgpack descriptor; PoolCorrupt if it is not a map."""
    if not raw:
        return {}
    try:
        value = msgpack.unpackb(raw, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise PoolCorrupt(f"descriptor is not msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise PoolCorrupt(f"descriptor is not a map: {type(value).__name__}")
    return value


def validate_header(raw: bytes, size: int, pool: str) -> L.Header:
    """Decode and check a header; raise PoolCorrupt / LayoutMismatch with a
    message saying what to do."""
    if len(raw) < L.HEADER_SIZE or size < L.HEADER_SIZE:
        raise PoolCorrupt(f"segment of pool {pool!r} is truncated ({size} bytes); restart its supervisor")
    if raw[:8] != L.MAGIC:
        raise PoolCorrupt(
            f"/dev/shm{segment_name(pool)} is not a pool-noodle segment (bad magic {raw[:8]!r}); remove it or pick"
            " another pool name"
        )
    (version,) = struct.unpack_from("<I", raw, 8)
    if version != L.LAYOUT_VERSION:
        raise LayoutMismatch(
            f"pool {pool!r} uses segment layout version {version}, this pool-noodle speaks {L.LAYOUT_VERSION};"
            " run client and supervisor from the same release"
        )
    header, crc_ok = L.Header.unpack(raw)
    if not crc_ok:
        raise PoolCorrupt(
            f"header checksum of pool {pool!r} does not match: the segment is corrupt; restart its supervisor"
        )
    problems = []
    if header.header_size != L.HEADER_SIZE:
        problems.append(f"header_size {header.header_size}")
    if not 1 <= header.pool_size <= L.MAX_POOL_SIZE:
        problems.append(f"pool_size {header.pool_size}")
    if header.ring_capacity != L.ring_capacity_for(header.pool_size):
        problems.append(f"ring_capacity {header.ring_capacity}")
    if not 0 < header.descriptor_cap <= L.MAX_DESCRIPTOR:
        problems.append(f"descriptor_cap {header.descriptor_cap}")
    if not L.valid_wait_cells(header.wait_cells):
        problems.append(f"wait_cells {header.wait_cells}")
    if header.n_counters != L.N_COUNTERS or header.n_histograms != L.N_HISTOGRAMS:
        problems.append("counter/histogram counts")
    if not problems:
        geo = header.geometry()
        if header.slot_size != geo.slot_size:
            problems.append(f"slot_size {header.slot_size}")
        if header.total_size != geo.total_size or header.total_size > size:
            problems.append(f"total_size {header.total_size} (mapping has {size})")
    if problems:
        raise PoolCorrupt(
            f"segment of pool {pool!r} has an inconsistent header ({', '.join(problems)}); restart its supervisor"
        )
    return header


def percentiles(hist: list[int], max_ns: int = 0) -> dict[str, float]:
    """p50/p90/p99 from a log2 histogram, as the upper bound of the bucket,
    and the real maximum (``max_ns``, recorded beside the buckets), all in
    microseconds: coarse by design, cheap and lock-free."""
    total = sum(hist)
    out: dict[str, float] = {"count": float(total)}
    if not total:
        return out
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        need = q * total
        acc = 0
        for b, n in enumerate(hist):
            acc += n
            if acc >= need:
                out[label] = round((1 << b) / 1000.0, 3)
                break
    if max_ns:
        out["max"] = round(max_ns / 1000.0, 3)
    else:  # a segment scribbled on: the top bucket's bound is the best known
        out["max"] = round((1 << max(b for b, n in enumerate(hist) if n)) / 1000.0, 3)
    return out
