"""Byte layout of a pool segment (POSIX shared memory ``/noodle.<pool>``).

All integers are little-endian; every region starts on a 64-byte boundary.
The C core (``noodle/_shm.c``) hard-codes the header word offsets below;
change both together and bump ``LAYOUT_VERSION``.

Header (512 bytes)::

    offset size  field              notes
    ------ ----  -----------------  ----------------------------------------
         0    8  magic              b"NOODLSHM"
         8    4  layout_version     LAYOUT_VERSION
        12    4  header_size        512
        16    4  pool_size          1 .. MAX_POOL_SIZE
        20    4  ring_capacity      power of two >= 2 * pool_size
        24    4  slot_size          64 + descriptor_capacity rounded to 64
        28    4  descriptor_cap     bytes of msgpack per slot
        32    4  wait_cells         queued-waiter cells
        36    4  n_counters         N_COUNTERS
        40    4  n_histograms       N_HISTOGRAMS
        44    4  creator_pid        the supervisor that created it
        48    8  creator_start      its start time (clock ticks since boot)
        56    8  total_size         bytes of the whole segment
        64    8  created_ns         CLOCK_REALTIME at creation
        72   64  pool_name          UTF-8, NUL padded
       136   32  kind_name          UTF-8, NUL padded
       168    4  header_crc         zlib.crc32 of bytes 0..167
       256    8  heartbeat_ns       CLOCK_MONOTONIC, written by the supervisor
       264    4  flags              bit 0 shutdown (C reads it on every acquire)
       268    4  phase              PHASE_* (starting, running, draining)
       272    4  get_timeout_ms     clients' default get() timeout
       276    4  policy             bit 0: health check on get()
       320    8  ring_tail          own cache line: producers
       384    8  ring_head          own cache line: consumers
       448    4  tickets            next waiter ticket
       452    4  turn               ticket allowed to pop now
       456    4  overflow_waiters   waiters sleeping for a free wait cell
       460    4  overflow_seq       futex word, bumped whenever a wait cell frees

Wait cells (wait_cells x 16 bytes) at 512::

         0    8  owner              ticket << 32 | pid  (pid 0 = cancelled)
         8    4  wake               futex word, bumped to wake this waiter
        12    4  start              low 32 bits of the waiter's start time
                                    (written before owner)

Ready ring (ring_capacity x 8 bytes)::

         0    8  cell               seq (40 bits) << 24 | slot id (24 bits)

Slot table (pool_size x slot_size bytes)::

         0    8  state word         gen (38 bits) << 26 | pid (22) << 4 | state (4)
         8    8  owner_start        lease holder's start time (clock ticks)
        16    4  owner_gen          low 32 bits of the generation it belongs to
                                    (written after owner_start: read it first)
        20    4  failures           consecutive failed steps
        24    8  entered_ns         CLOCK_MONOTONIC when the state was entered
        32    8  queued_ns          when a task for it was last queued (by anyone)
        40    8  retry_at_ns        do not dispatch before this (backoff)
        48    4  descriptor_len     bytes used in the descriptor area
        52    4  last_failed_step   STEP_* code of the last failure, 0 if none
        56    8  spawned_ns         when the instance was published
        64    -  descriptor         msgpack, descriptor_cap bytes

Counters (n_counters x 8 bytes) and histograms (n_histograms x 64 x 8
bytes) end the segment. In a histogram, word b < 63 counts the samples
whose nanoseconds have bit length b (63 and over are counted in 62: that is
146 years); word 63 (``HIST_MAX``) holds the largest sample seen, in
nanoseconds, raised by compare-and-swap, so ``status`` shows a real maximum.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

MAGIC = b"NOODLSHM"
LAYOUT_VERSION = 3
HEADER_SIZE = 512
MAX_POOL_SIZE = 65536
MAX_DESCRIPTOR = 64 * 1024
DEFAULT_DESCRIPTOR = 1024
DEFAULT_WAIT_CELLS = 256
HIST_BUCKETS = 64
HIST_MAX = HIST_BUCKETS - 1  # the word of a histogram that holds its maximum, not a count

# header struct: the immutable, checksummed part
HEADER_STRUCT = struct.Struct("<8sIIIIIIIIIIQQQ64s32s")
CRC_OFFSET = HEADER_STRUCT.size  # 168
OFF_HEARTBEAT = 256
OFF_FLAGS = 264
OFF_PHASE = 268
OFF_POLICY = 272  # get_timeout_ms (low 32 bits), policy flags (high 32 bits)
FLAG_SHUTDOWN = 1
POLICY_HEALTH_ON_GET = 1

# slot record field offsets
R_STATE = 0
R_OWNER_START = 8
R_OWNER_GEN = 16
R_FAILURES = 20
R_ENTERED = 24
R_QUEUED = 32
R_RETRY_AT = 40
R_DESC_LEN = 48
R_LAST_FAILED = 52
R_SPAWNED = 56
R_DESCRIPTOR = 64

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


class Status(enum.IntEnum):
    """Status codes returned by the C core."""

    OK = 0
    EMPTY = 1
    SHUTDOWN = 2
    STALE = 3
    NOT_OWNER = 4
    RANGE = 5
    FULL = 6
    TOO_BIG = 7
    CLOSED = 8
    CORRUPT = 9
    HEARTBEAT = 10


class State(enum.IntEnum):
    CLEAN = 1
    PREPARE = 2
    SPAWN = 3
    READY = 4
    LEASED = 5
    TERMINATE = 6
    ABANDONED = 7


class Phase(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    DRAINING = 2


class Step(enum.IntEnum):
    NONE = 0
    CLEAN = 1
    PREPARE = 2
    SPAWN = 3
    TERMINATE = 4
    HEALTH = 5


STATE_NAMES = [s.name.lower() for s in State]

# Counters: the first block is updated by the C core (same order as its enum).
COUNTERS = [
    "acquires",
    "acquire_waits",
    "wait_timeouts",
    "releases",
    "stale_releases",
    "forged_releases",
    "publishes",
    "ring_full",
    "stale_ring_entries",
    "corrupt_ring_entries",
    "wakeups",
    "shutdown_refusals",
    # updated from Python
    "cleans",
    "clean_failures",
    "prepares",
    "prepare_failures",
    "spawns",
    "spawn_failures",
    "terminates",
    "terminate_failures",
    "abandoned",
    "abandon_retries",
    "reclaimed_leases",
    "unhealthy_on_get",
    "stale_messages",
    "bad_messages",
    "worker_restarts",
    "workers_killed_stuck",
    "ring_repushes",
    "waiters_skipped",
    "queue_full",
    "corruption_repairs",
]
N_COUNTERS = 64
C = {name: i for i, name in enumerate(COUNTERS)}

# dispatch: from a task being queued to a worker claiming it
HISTOGRAMS = ["acquire", "wait", "clean", "prepare", "spawn", "terminate", "health", "dispatch"]
N_HISTOGRAMS = 16
H = {name: i for i, name in enumerate(HISTOGRAMS)}

def valid_wait_cells(n: int) -> bool:
    """A power of two in 1..65536: ticket numbers are 32-bit and wrap, and
    ticket % wait_cells stays continuous across the wrap only for a divisor
    of 2**32."""
    return isinstance(n, int) and 1 <= n <= 65536 and n & (n - 1) == 0


# ---- state word -------------------------------------------------------------


def make_word(state: int, gen: int, pid: int) -> int:
    return ((gen & ((1 << 38) - 1)) << 26) | ((pid & 0x3FFFFF) << 4) | (state & 0xF)


def word_state(w: int) -> int:
    return w & 0xF


def word_pid(w: int) -> int:
    return (w >> 4) & 0x3FFFFF


def word_gen(w: int) -> int:
    return w >> 26


def describe_word(w: int) -> str:
    st = word_state(w)
    name = State(st).name.lower() if st in State._value2member_map_ else f"invalid({st})"
    return f"{name} gen={word_gen(w)} pid={word_pid(w)}"


# ---- geometry ----------------------------------------------------------------


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


def ring_capacity_for(pool_size: int) -> int:
    # twice the pool: room for the few duplicate ids a crashed consumer's
    # repair can leave behind without ever refusing a publish
    cap = 8
    while cap < 2 * pool_size:
        cap *= 2
    return cap


@dataclass(frozen=True)
class Geometry:
    """Sizes and region offsets, all derived from the header's sizes."""

    pool_size: int
    ring_capacity: int
    descriptor_cap: int
    wait_cells: int
    n_counters: int = N_COUNTERS
    n_histograms: int = N_HISTOGRAMS

    @property
    def slot_size(self) -> int:
        return R_DESCRIPTOR + _align(self.descriptor_cap)

    @property
    def cells_off(self) -> int:
        return HEADER_SIZE

    @property
    def ring_off(self) -> int:
        return _align(self.cells_off + 16 * self.wait_cells)

    @property
    def slots_off(self) -> int:
        return _align(self.ring_off + 8 * self.ring_capacity)

    @property
    def counters_off(self) -> int:
        return _align(self.slots_off + self.slot_size * self.pool_size)

    @property
    def hist_off(self) -> int:
        return _align(self.counters_off + 8 * self.n_counters)

    @property
    def total_size(self) -> int:
        return _align(self.hist_off + 8 * HIST_BUCKETS * self.n_histograms, 4096)

    def slot_off(self, slot: int) -> int:
        return self.slots_off + slot * self.slot_size

    def core_args(self) -> tuple[int, ...]:
        return (
            self.pool_size,
            self.ring_capacity,
            self.slot_size,
            self.descriptor_cap,
            self.wait_cells,
            self.cells_off,
            self.ring_off,
            self.slots_off,
            self.counters_off,
            self.n_counters,
            self.hist_off,
            self.n_histograms,
        )


@dataclass(frozen=True)
class Header:
    magic: bytes
    version: int
    header_size: int
    pool_size: int
    ring_capacity: int
    slot_size: int
    descriptor_cap: int
    wait_cells: int
    n_counters: int
    n_histograms: int
    creator_pid: int
    creator_start: int
    total_size: int
    created_ns: int
    pool_name: str
    kind: str

    def pack(self) -> bytes:
        body = HEADER_STRUCT.pack(
            self.magic,
            self.version,
            self.header_size,
            self.pool_size,
            self.ring_capacity,
            self.slot_size,
            self.descriptor_cap,
            self.wait_cells,
            self.n_counters,
            self.n_histograms,
            self.creator_pid,
            self.creator_start,
            self.total_size,
            self.created_ns,
            self.pool_name.encode(),
            self.kind.encode(),
        )
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes) -> tuple[Header, bool]:
        """Decode the header; the bool says whether its checksum matched."""
        fields = HEADER_STRUCT.unpack_from(raw, 0)
        (crc,) = struct.unpack_from("<I", raw, CRC_OFFSET)
        ok = zlib.crc32(raw[:CRC_OFFSET]) == crc
        name = fields[14].rstrip(b"\0").decode("utf-8", "replace")
        kind = fields[15].rstrip(b"\0").decode("utf-8", "replace")
        f = fields
        header = cls(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13], name, kind)
        return header, ok

    def geometry(self) -> Geometry:
        return Geometry(self.pool_size, self.ring_capacity, self.descriptor_cap, self.wait_cells,
                        self.n_counters, self.n_histograms)


# -- the worker table -----------------------------------------------------------


class WorkerTable:
    """Words each stage worker shares with its supervisor, one row per worker
    seat: heartbeat, when its current step started (0: not in a step), and
    whether it holds a concurrency permit. Allocated before the workers are
    forked (a multiprocess ``RawArray('Q')``); a word is written by one side
    at a time, so no lock is needed."""

    _BEAT, _STEP_STARTED, _HOLDS_PERMIT = 0, 1, 2
    _FIELDS = 3

    def __init__(self, words: Any) -> None:
        self.words = words

    @classmethod
    def allocate(cls, mp_context: Any, seats: int) -> WorkerTable:
        return cls(mp_context.RawArray("Q", cls._FIELDS * seats))

    def beat(self, seat: int) -> int:
        """monotonic ns of the worker's last heartbeat; 0 before its first."""
        return int(self.words[seat * self._FIELDS + self._BEAT])

    def set_beat(self, seat: int, ns: int) -> None:
        self.words[seat * self._FIELDS + self._BEAT] = ns

    def step_started(self, seat: int) -> int:
        """monotonic ns when its current step began; 0 when between steps."""
        return int(self.words[seat * self._FIELDS + self._STEP_STARTED])

    def set_step_started(self, seat: int, ns: int) -> None:
        self.words[seat * self._FIELDS + self._STEP_STARTED] = ns

    def holds_permit(self, seat: int) -> bool:
        return bool(self.words[seat * self._FIELDS + self._HOLDS_PERMIT])

    def set_holds_permit(self, seat: int, held: bool) -> None:
        self.words[seat * self._FIELDS + self._HOLDS_PERMIT] = int(held)

    def clear(self, seat: int) -> None:
        for f in range(self._FIELDS):
            self.words[seat * self._FIELDS + f] = 0
