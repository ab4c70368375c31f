"""asyncio for pool clients, without a thread per waiter.

``await pool.aget(timeout)`` first tries to take a ready instance on the
loop (one C call, no wait). Otherwise it queues a ticket with the pool's
one *waiter thread*, which serves every asyncio waiter of that ``Pool`` in
arrival order, whatever loop it runs on::

    aget (loop) --ticket--> deque --head--> waiter thread: pool.get(SLICE)
                                            |  lease
    future.set_result <--call_soon_threadsafe-+

So 1,000 waiting coroutines cost one thread, and none of them uses the
loop's default executor. The thread waits in slices of ``SLICE`` seconds,
so its wait in the segment's queue is given up within one slice once no
ticket is left. A cancelled ``aget`` leaves the deque at once; a lease that
arrives for a ticket cancelled in the meantime goes to the next ticket (it
was never used), or is released if none is left: cancelling never leaks an
instance. A timeout fails the ticket with PoolStarved from the loop's own
timer. The thread exits when the deque is empty.

``request`` sends one agent request over an asyncio Unix stream: that is
what ``AgentHandle.arun``/``acall``/``aexec``/``atask`` use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import threading
import weakref
from typing import TYPE_CHECKING, Any

from noodle.agent import _LEN, MAX_FRAME, ProtocolError, read_frame, write_frame
from noodle.errors import InstanceGone, InstanceTimeout, PoolStarved

if TYPE_CHECKING:
    from noodle.client import Lease, Pool
    from noodle.handle import AgentHandle

SLICE = 0.05  # seconds the waiter thread waits in one go; bounds how long a dropped wait lingers


class _Ticket:
    __slots__ = ("future", "health", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Lease], health: bool | None) -> None:
        self.loop = loop
        self.future = future
        self.health = health


class _Waiter:
    """The asyncio waiters of one Pool, served in order by one thread."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.tickets: collections.deque[_Ticket] = collections.deque()
        self.returned: collections.deque[Lease] = collections.deque()
        self.thread: threading.Thread | None = None

    def add(self, ticket: _Ticket) -> None:
        with self.lock:
            self.tickets.append(ticket)
            self._ensure_thread()

    def remove(self, ticket: _Ticket) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self.tickets.remove(ticket)

    def give_back(self, lease: Lease) -> None:
        """A lease whose ticket was cancelled before it arrived: unused, so
        the next ticket may have it; with no ticket left it is released."""
        with self.lock:
            if any(not t.future.done() for t in self.tickets):
                self.returned.append(lease)
                self._ensure_thread()
                return
        lease.release()

    def _ensure_thread(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name=f"noodle-aget-{self.pool.name}", daemon=True)
            self.thread.start()

    def _head(self) -> _Ticket | None:
        """The first live ticket, dropping done ones; None ends the thread."""
        with self.lock:
            while self.tickets and self.tickets[0].future.done():
                self.tickets.popleft()
            if not self.tickets:
                self.thread = None
                return None
            return self.tickets[0]

    def _serve(self) -> None:
        spare: Lease | None = None
        try:
            while True:
                head = self._head()
                if head is None:
                    break
                if spare is None:
                    with self.lock:
                        spare = self.returned.popleft() if self.returned else None
                if spare is None:
                    try:
                        spare = self.pool.get(timeout=SLICE, health=head.health)
                    except PoolStarved:
                        continue
                    except BaseException as exc:  # noqa: BLE001 - shutting down, closed, gone: every waiter hears it
                        self._fail_all(exc)
                        continue
                with self.lock:
                    target = None
                    while self.tickets:
                        t = self.tickets.popleft()
                        if not t.future.done():
                            target = t
                            break
                if target is not None:
                    lease, spare = spare, None
                    try:
                        target.loop.call_soon_threadsafe(_deliver, self, target, lease)
                    except RuntimeError:  # its loop is closed
                        spare = lease
        finally:
            with self.lock:
                if self.thread is threading.current_thread():
                    self.thread = None
                leftovers: list[Lease] = []
                if self.thread is None:  # no successor to hand them to
                    leftovers = list(self.returned)
                    self.returned.clear()
            for lease in [*leftovers, *([spare] if spare is not None else [])]:
                with contextlib.suppress(Exception):
                    lease.release()

    def _fail_all(self, exc: BaseException) -> None:
        with self.lock:
            tickets = list(self.tickets)
            self.tickets.clear()
        for t in tickets:
            with contextlib.suppress(RuntimeError):
                t.loop.call_soon_threadsafe(_fail, t.future, exc)


def _deliver(waiter: _Waiter, ticket: _Ticket, lease: Lease) -> None:
    if ticket.future.done():
        waiter.give_back(lease)
    else:
        ticket.future.set_result(lease)


def _fail(future: asyncio.Future[Lease], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_waiters: weakref.WeakKeyDictionary[Pool, _Waiter] = weakref.WeakKeyDictionary()
_waiters_lock = threading.Lock()


def _waiter(pool: Pool) -> _Waiter:
    with _waiters_lock:
        w = _waiters.get(pool)
        if w is None:
            w = _waiters[pool] = _Waiter(pool)
        return w


def waiting_threads() -> int:
    """Waiter threads running now (one per Pool with queued asyncio waiters)."""
    with _waiters_lock:
        return sum(1 for w in _waiters.values() if w.thread is not None)


async def aget(pool: Pool, timeout: float | None, health: bool | None, default_health: bool) -> Lease:
    """See ``Pool.aget``. ``timeout`` None waits for ever."""
    waiter = _waiter(pool)
    check = default_health if health is None else health
    if not check and not waiter.tickets:
        # the fast path runs on the loop: one C call, no wait and no health ping
        with contextlib.suppress(PoolStarved):
            return pool.get(timeout=0, health=False)
        if timeout is not None and timeout <= 0:
            raise PoolStarved(f"no instance of pool {pool.name!r} is ready")
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Lease] = loop.create_future()
    ticket = _Ticket(loop, future, health)
    timer = None
    if timeout is not None:
        starved = PoolStarved(f"no instance of pool {pool.name!r} became ready within {timeout} s")
        timer = loop.call_later(max(0.0, timeout), _fail, future, starved)
    waiter.add(ticket)
    try:
        return await future
    except asyncio.CancelledError:
        # cancelled just after its lease arrived: the lease is unused, pass it on
        if future.done() and not future.cancelled() and future.exception() is None:
            waiter.give_back(future.result())
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if not future.done() or future.cancelled() or future.exception() is not None:
            waiter.remove(ticket)


async def request(handle: AgentHandle, req: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One request to the handle's agent over an asyncio Unix stream. The
    handle's blocking connection is dropped first: an agent serves one
    connection at a time."""
    if handle._closed:
        raise InstanceGone("the lease was released; its instance is gone")
    handle._drop()
    limit = handle.timeout if timeout is None else timeout
    buf = io.BytesIO()
    write_frame(buf, req)
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_unix_connection(handle.socket_path)
            try:
                writer.write(buf.getvalue())
                await writer.drain()
                head = await reader.readexactly(_LEN.size)
                (size,) = _LEN.unpack(head)
                if size > MAX_FRAME:
                    raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
                body = await reader.readexactly(size)
            finally:
                # closed for real before returning: the agent serves the next
                # connection (perhaps a blocking one) only after this one ends
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        reply = read_frame(io.BytesIO(head + body))
    except TimeoutError:
        raise InstanceTimeout(f"instance did not answer {req.get('op')!r} within {limit} s") from None
    except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
        raise InstanceGone(f"instance connection broke: {exc}") from None
    if reply is None:
        raise InstanceGone("instance closed the connection")
    return reply


__all__ = ["SLICE", "aget", "request", "waiting_threads"]
