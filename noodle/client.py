"""What executors import: attach to a pool, take a lease, give it back.

``get()`` is one C call on the fast path (pop a ready slot id and CAS its
state word ready -> leased); when nothing is ready it sleeps on a futex in
the segment, queued in arrival order. ``release()`` CASes leased ->
terminate and posts a terminate task without blocking; if the queue is
full the supervisor finds the slot in the table and feeds it later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from noodle import layout as L
from noodle import queues
from noodle._shm import LeaseBase, PoolBase, plain_lease
from noodle.errors import (
    InstanceGone,
    LeaseReleased,
    NoodleError,
    PoolClosed,
    PoolCorrupt,
    PoolNotFound,
    PoolShuttingDown,
    PoolStarved,
    UnknownKind,
)
from noodle.host.proc import is_alive
from noodle.kinds import Kind, load_kind
from noodle.segment import Segment, decode_descriptor

log = logging.getLogger("noodle.client")

_UNSET: Any = object()
# getpid() is a syscall (glibc stopped caching it); Lease() needs it per get
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
HEARTBEAT_STALE = 2.0  # seconds
_STALE_NS = int(HEARTBEAT_STALE * 1e9)
# plain ints: IntEnum comparisons cost more than the C call on the fast path
_SHUTDOWN = int(L.Status.SHUTDOWN)
_CLOSED = int(L.Status.CLOSED)
_HEARTBEAT = int(L.Status.HEARTBEAT)
_UNTRIED = -1  # not a status: the first try was skipped (health check on, or closed); UNTRIED in _shm.c


# plain_lease: the same class, without GC tracking and with a short deallocator
# (get() allocates one per call and usually drops the previous one)
@plain_lease
class Lease(LeaseBase):
    """One instance, held until released. Use as a context manager.

    Its fields (``slot``, ``generation`` and the private ones) live in
    ``noodle._shm.LeaseBase``, filled by the C core in the same call that
    takes the slot. ``descriptor`` is decoded from its msgpack bytes on
    first use: decoding was the largest share of ``get()``."""

    __slots__ = ()
    _pool: Pool

    def __init__(self, pool: Pool, slot: int, generation: int, raw: bytes) -> None:
        self._pool = pool
        self.slot = slot
        self.generation = generation
        self._raw = raw
        self._owner_pid = _PID[0]

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease pool={self._pool.name} slot={self.slot} gen={self.generation} {state}>"

    @property
    def descriptor(self) -> dict[str, Any]:
        """The instance's descriptor as the kind published it."""
        if self._desc is None:
            try:
                self._desc = decode_descriptor(self._raw)
            except NoodleError as exc:
                raise InstanceGone(f"slot {self.slot}: {exc}") from None
        return self._desc

    @property
    def released(self) -> bool:
        return self._released

    @property
    def instance(self) -> Any:
        """The kind's client handle (e.g. an AgentHandle with run/call)."""
        if self._released:
            raise LeaseReleased(f"lease of slot {self.slot} (gen {self.generation}) was released")
        if self._instance is None:
            desc = self.descriptor
            try:
                self._instance = self._pool._handle(desc)
            except (KeyError, TypeError, ValueError) as exc:
                raise InstanceGone(f"slot {self.slot}: descriptor {desc!r:.100} is unusable: {exc}") from None
        return self._instance

    def release(self) -> bool:
        """Give the instance back for destruction. Idempotent: True only for
        the call that released it; False if already released or reclaimed."""
        if self._released:
            return False
        self._released = True
        inst = self._instance
        if inst is not None and hasattr(inst, "close"):
            with contextlib.suppress(Exception):
                inst.close()
        return self._pool._release(self.slot, self.generation)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _dropped(self) -> None:
        # Called by LeaseBase's finalizer (C) for a lease its holder dropped
        # unreleased: a bug in the caller, but it must not leak the instance
        # until the holder exits.
        warnings.warn(f"{self!r} was never released; releasing it now", ResourceWarning, stacklevel=1)
        with contextlib.suppress(Exception):
            self.release()


class Pool(PoolBase):
    """A client's handle on a running pool. Cheap; one per process is enough."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._seg = Segment.attach(name)
        try:
            self._check_live()
            self.kind_name = self._seg.header.kind
            self._kind: type[Kind] | None
            try:
                self._kind = load_kind(self.kind_name)
            except UnknownKind:
                log.warning("kind %r is not installed here: leases carry descriptors only", self.kind_name)
                self._kind = None
            self._terminate_q = queues.open_queue(name, "terminate")
            self._default_timeout, self._default_health = self._seg.policy()
            self._core_lease = self._seg.core.lease
            self._bind(self._seg.core, Lease, _STALE_NS)
        except BaseException:
            self._seg.close()
            raise

    def _check_live(self) -> None:
        h = self._seg.header
        if not is_alive(h.creator_pid, h.creator_start):
            raise PoolNotFound(
                f"pool {self.name!r} has a segment but its supervisor (pid {h.creator_pid}) is gone;"
                f" restart it with `noodle run --name {self.name}`"
            )

    @property
    def pool_size(self) -> int:
        return self._seg.pool_size

    @property
    def closed(self) -> bool:
        return self._closed

    def _live_seg(self) -> Segment:
        if self._closed:
            raise PoolClosed(f"pool handle {self.name!r} was closed")
        return self._seg

    if TYPE_CHECKING:
        # get() itself is PoolBase.get, in C: the ready case takes the slot and
        # builds the Lease without a Python frame; everything else comes to
        # _get_slow() with get()'s own arguments.
        def get(self, timeout: float | None = _UNSET, health: bool | None = None) -> Lease:
            """Lease a ready instance (docstring: noodle._shm.PoolBase.get)."""

    def _get_slow(self, r: LeaseBase | int, timeout: float | None = _UNSET, health: bool | None = None) -> Lease:
        """get() past its first try: ``r`` is that try's status (_UNTRIED if
        it was skipped). Checks, health checks and waits for its turn."""
        seg = self._seg
        if timeout is _UNSET:
            timeout = self._default_timeout
        check = self._default_health if health is None else health
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        stale = _STALE_NS
        while True:
            if r == _HEARTBEAT:
                self._check_live()  # raises PoolNotFound when the supervisor is gone
                stale = 0
            elif isinstance(r, Lease):
                lease = r
                if not (check and self._kind is not None):
                    return lease
                budget = 2.0 if deadline is None else max(0.05, min(2.0, deadline - time.monotonic()))
                t0 = time.monotonic_ns()
                try:
                    healthy, handle = self._kind.client_health_handle(lease.descriptor, budget)
                except InstanceGone:
                    healthy, handle = False, None
                seg.observe("health", time.monotonic_ns() - t0)
                if handle is not None:
                    lease._instance = handle  # the checked connection serves the lease's calls
                if healthy:
                    return lease
                seg.count("unhealthy_on_get")
                log.warning("slot %d gen %d failed its health check on get; replacing it", r.slot, r.generation)
                lease.release()
            elif r == _SHUTDOWN:
                raise PoolShuttingDown(f"pool {self.name!r} is shutting down")
            elif r == _CLOSED:
                raise PoolClosed(f"pool handle {self.name!r} was closed")
            elif r != _UNTRIED and deadline is not None and time.monotonic() >= deadline:
                if not is_alive(seg.header.creator_pid, seg.header.creator_start):
                    raise PoolNotFound(f"the supervisor of pool {self.name!r} is gone")
                raise PoolStarved(f"no instance of pool {self.name!r} became ready within {timeout} s")
            if self._closed:
                raise PoolClosed(f"pool handle {self.name!r} was closed")
            remaining = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1e9))
            try:
                r = self._core_lease(Lease, self, remaining, stale)
            except ValueError:
                # the core was closed by another thread between our check and the call
                raise PoolClosed(f"pool handle {self.name!r} was closed") from None

    async def aget(self, timeout: float | None = _UNSET, health: bool | None = None) -> Lease:
        """``get()`` for asyncio, without a thread per waiter: one waiter
        thread per Pool serves every asyncio waiter in order (``noodle.aio``).
        Cancelling it never leaks an instance. ``async with await
        pool.aget() as lease:`` releases on exit."""
        from noodle import aio

        self._live_seg()
        limit = self._default_timeout if timeout is _UNSET else timeout
        return await aio.aget(self, limit, health, self._default_health)

    def _release(self, slot: int, gen: int) -> bool:
        seg = self._live_seg()
        status = L.Status(seg.core.release(slot, gen))
        if status == L.Status.OK:
            if not queues.dispatch(self._terminate_q, slot, gen, seg.set_queued):
                seg.count("queue_full")  # the supervisor's table scan feeds it
            return True
        if status == L.Status.STALE:
            return False  # released twice, or reclaimed: counted by the core
        if status == L.Status.NOT_OWNER:
            raise LeaseReleased(f"slot {slot} gen {gen} is leased by another process; only its holder releases it")
        raise PoolCorrupt(f"release of slot {slot} returned {status.name}")

    def stats(self) -> dict[str, Any]:
        """State counts, counters and latency percentiles, as ``noodle status --json``."""
        return self._live_seg().snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._terminate_q.close()
        self._seg.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _handle(self, descriptor: Mapping[str, Any]) -> Any:
        return self._kind.client_handle(descriptor) if self._kind is not None else None


def attach(name: str) -> Pool:
    """Attach to the running pool ``name``; PoolNotFound if there is none."""
    return Pool(name)
