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
from typing import Any

from noodle import layout as L
from noodle import queues
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
from noodle.kinds import Kind, load_kind
from noodle.procs import is_alive
from noodle.segment import Segment, decode_descriptor

log = logging.getLogger("noodle.client")

_UNSET: Any = object()
# getpid() is a syscall (glibc stopped caching it); Lease() needs it per get
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
HEARTBEAT_STALE = 2.0  # seconds


class Lease:
    """One instance, held until released. Use as a context manager."""

    __slots__ = ("_instance", "_owner_pid", "_pool", "_released", "descriptor", "generation", "slot")

    def __init__(self, pool: Pool, slot: int, generation: int, descriptor: dict[str, Any]) -> None:
        self._pool = pool
        self.slot = slot
        self.generation = generation
        self.descriptor = descriptor
        self._instance: Any = _UNSET
        self._released = False
        self._owner_pid = _PID[0]

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease pool={self._pool.name} slot={self.slot} gen={self.generation} {state}>"

    @property
    def released(self) -> bool:
        return self._released

    @property
    def instance(self) -> Any:
        """The kind's client handle (e.g. an AgentHandle with run/call)."""
        if self._released:
            raise LeaseReleased(f"lease of slot {self.slot} (gen {self.generation}) was released")
        if self._instance is _UNSET:
            try:
                self._instance = self._pool._handle(self.descriptor)
            except (KeyError, TypeError, ValueError) as exc:
                desc = f"{self.descriptor!r:.100}"
                raise InstanceGone(f"slot {self.slot}: descriptor {desc} is unusable: {exc}") from None
        return self._instance

    def release(self) -> bool:
        """Give the instance back for destruction. Idempotent: True only for
        the call that released it; False if already released or reclaimed."""
        if self._released:
            return False
        self._released = True
        inst = self._instance
        if inst is not _UNSET and hasattr(inst, "close"):
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

    def __del__(self) -> None:
        # a dropped lease is a bug in the caller, but it must not leak the
        # instance until the holder exits; only the holder itself may release
        if not getattr(self, "_released", True) and self._owner_pid == _PID[0]:
            warnings.warn(f"{self!r} was never released; releasing it now", ResourceWarning, stacklevel=1)
            with contextlib.suppress(Exception):
                self.release()


class Pool:
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
        except BaseException:
            self._seg.close()
            raise
        self._closed = False

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

    def get(self, timeout: float | None = _UNSET, health: bool | None = None) -> Lease:
        """Lease a ready instance. Waits up to ``timeout`` seconds (the pool's
        ``get_timeout`` by default, None for ever), in arrival order.

        Raises PoolStarved on timeout and PoolShuttingDown once the pool stops.
        With ``health`` (default: the pool's ``health_on_get``) the kind's
        health check runs first; an unhealthy instance is released for
        termination and the next one is tried."""
        seg = self._live_seg()
        if timeout is _UNSET:
            timeout = self._default_timeout
        check = self._default_health if health is None else health
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if seg.heartbeat_age() > HEARTBEAT_STALE:
            # the supervisor beats every tick; silence means stopped or dead,
            # and a dead pool's segment must not hand out instances
            self._check_live()
        while True:
            remaining = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1e9))
            status, slot, gen = seg.core.acquire(remaining)
            if status == L.Status.SHUTDOWN:
                raise PoolShuttingDown(f"pool {self.name!r} is shutting down")
            if status != L.Status.OK:
                if not is_alive(seg.header.creator_pid, seg.header.creator_start):
                    raise PoolNotFound(f"the supervisor of pool {self.name!r} is gone")
                raise PoolStarved(f"no instance of pool {self.name!r} became ready within {timeout} s")
            try:
                lease = Lease(self, slot, gen, decode_descriptor(seg.descriptor_bytes(slot)))
            except NoodleError:
                self._release(slot, gen)
                seg.count("unhealthy_on_get")
                continue
            if check and self._kind is not None:
                budget = 2.0 if deadline is None else max(0.05, min(2.0, deadline - time.monotonic()))
                t0 = time.monotonic_ns()
                healthy = self._kind.client_health(lease.descriptor, budget)
                seg.observe("health", time.monotonic_ns() - t0)
                if not healthy:
                    seg.count("unhealthy_on_get")
                    log.warning("slot %d gen %d failed its health check on get; replacing it", slot, gen)
                    lease.release()
                    continue
            return lease

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
            if queues.send_nowait(self._terminate_q, slot, gen):
                seg.set_queued(slot, time.monotonic_ns())
            else:
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
