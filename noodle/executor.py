"""``noodle.Executor``: a ``concurrent.futures.Executor`` where every task
runs in its own fresh instance of a pool.

::

    with noodle.Executor("fn") as ex:            # a pool name, or an attached Pool
        ex.submit(pow, 2, 10).result()           # 1024
        list(ex.map(lambda x: x * x, range(4)))  # [0, 1, 4, 9]

Each task takes one lease, sends the task (function and arguments pickled
with cloudpickle, by value where needed) to the instance's agent, decodes
the result and releases the lease, so the pool destroys that instance: no
state leaks from one task to the next. ``max_workers`` (default: the pool's
size) bounds the tasks running at once; each has a thread here that mostly
sleeps on the instance's socket.

Results from isolating kinds (``jail``, ``oci``) are decoded as plain data
only (``noodle.codec``); anything else fails with UnsafeResult unless
``trust_results=True``. The ``process`` kind isolates nothing and shares the
caller's trust, so its results are pickled by default. A task's exception is
re-raised with its own type where it can be rebuilt, the remote traceback
attached as ``__cause__``. ``timeout`` is per task: past it the task's
future fails with InstanceTimeout and its instance is terminated.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from noodle import codec
from noodle.client import Pool, attach
from noodle.errors import InstanceTimeout, KindUnsupported, NoodleError

T = TypeVar("T")

# kinds whose instances run the Python agent (and so can run a task)
PYTHON_KINDS = frozenset({"process", "jail", "oci"})
# a task without a timeout waits for its instance this long (a socket
# timeout must be finite); in practice: for ever
_NO_LIMIT = 365 * 24 * 3600.0


class _WorkItem:
    __slots__ = ("future", "payload", "timeout")

    def __init__(self, future: concurrent.futures.Future[Any], payload: bytes, timeout: float | None) -> None:
        self.future = future
        self.payload = payload
        self.timeout = timeout


class Executor(concurrent.futures.Executor):
    """Run callables, each in its own fresh instance of ``pool``.

    ``pool``: a pool name (attached here and closed at shutdown) or an
    attached ``noodle.Pool`` (left open). ``max_workers``: tasks at once,
    default the pool size. ``timeout``: seconds per task, None for no limit.
    ``trust_results``: decode pickled results (default: only for the
    ``process`` kind). ``get_timeout``: how long a task waits for a ready
    instance before failing with PoolStarved (None: as long as it takes).
    """

    def __init__(
        self,
        pool: str | Pool,
        *,
        max_workers: int | None = None,
        timeout: float | None = None,
        trust_results: bool | None = None,
        get_timeout: float | None = None,
    ) -> None:
        self._own_pool = isinstance(pool, str)
        self._pool = attach(pool) if isinstance(pool, str) else pool
        try:
            # a kind derived from a Python kind (same name) runs Python too
            kind = getattr(getattr(self._pool, "_kind", None), "name", "") or self._pool.kind_name
            if kind not in PYTHON_KINDS:
                raise KindUnsupported(
                    f"pool {self._pool.name!r} is of kind {self._pool.kind_name!r}, whose instances do not run Python;"
                    f" noodle.Executor needs one of: {', '.join(sorted(PYTHON_KINDS))}"
                )
            if max_workers is None:
                max_workers = self._pool.pool_size
            if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
                raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
            if timeout is not None and not timeout > 0:
                raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        except BaseException:
            if self._own_pool:
                self._pool.close()
            raise
        self._max_workers = max_workers
        self._timeout = timeout
        self._get_timeout = get_timeout
        self._trust = kind == "process" if trust_results is None else bool(trust_results)
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: set[threading.Thread] = set()
        self._live_threads = 0
        self._lock = threading.Lock()
        self._shutdown = False
        self._ids = itertools.count()

    @property
    def pool(self) -> Pool:
        return self._pool

    @property
    def trust_results(self) -> bool:
        return self._trust

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a fresh instance."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            # pickled now, outside the lock: later changes to the arguments do not travel
            payload = codec.encode_task(fn, args, kwargs, pickle_results=self._trust)
        except TypeError as exc:
            future.set_exception(exc)
            return future
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put(_WorkItem(future, payload, self._timeout))
            self._adjust_threads()
            return future

    def _adjust_threads(self) -> None:
        if self._idle.acquire(blocking=False):
            return  # an idle worker will take it
        if len(self._threads) < self._max_workers:
            t = threading.Thread(
                target=self._work, name=f"noodle-executor-{self._pool.name}-{next(self._ids)}", daemon=True
            )
            t.start()
            self._threads.add(t)
            self._live_threads += 1

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                self._run(item)
                del item
                self._idle.release()
        finally:
            with self._lock:
                self._live_threads -= 1
                last = self._live_threads == 0 and self._shutdown
            if last and self._own_pool:
                self._pool.close()

    def _run(self, item: _WorkItem) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            lease = self._pool.get(timeout=self._get_timeout)
        except BaseException as exc:  # noqa: BLE001 - the future carries whatever went wrong
            item.future.set_exception(exc)
            return
        error: BaseException | None = None
        value: Any = None
        try:
            limit = _NO_LIMIT if item.timeout is None else item.timeout
            try:
                payload = lease.instance.task(item.payload, timeout=limit)
            except InstanceTimeout:
                raise InstanceTimeout(
                    f"the task did not finish within its timeout of {item.timeout} s; its instance was terminated"
                ) from None
            value = codec.decode_result(payload, trust=self._trust)
        except BaseException as exc:  # noqa: BLE001 - the task's own exception, or the pool's
            error = exc
        finally:
            # single use: releasing terminates the instance (and ends a task
            # that ran past its timeout); before the future completes, so a
            # caller that sees the result may close the pool at once
            with contextlib.suppress(NoodleError):
                lease.release()
            del lease
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(value)
        del error, value

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            if cancel_futures:
                sentinels = 0
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        sentinels += 1
                    else:
                        item.future.cancel()
                for _ in range(sentinels):
                    self._queue.put(None)
            if first:
                for _ in self._threads:
                    self._queue.put(None)
            threads = list(self._threads)
            no_threads = self._live_threads == 0
        if first and no_threads and self._own_pool:
            self._pool.close()
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()
