"""``noodle.fleet.Executor``: ``noodle.Executor``'s contract, over NATS.

Each task becomes one job on ``noodle.jobs.<pool_class>``; whichever host
has a ready instance of that class runs it in a fresh instance and the
result comes back decoded by the same safe rules as ``noodle.Executor``
(plain data unless ``trust_results=True``; the task's exception re-raised
with its remote traceback; past ``timeout`` InstanceTimeout). The caller
cannot know which kind of pool a host runs, so unlike ``noodle.Executor``
pickled results are never the default. The connection lives on a private
loop thread; ``AsyncExecutor`` is the same on the caller's own loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from noodle.fleet import config as fconfig
from noodle.fleet import payload
from noodle.fleet.client import FleetClient
from noodle.fleet.config import FleetConfig

T = TypeVar("T")


def _config(servers: str | list[str] | None, config: str | None) -> FleetConfig:
    joined = ",".join(servers) if isinstance(servers, list) else servers
    return fconfig.load(config, joined)


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive or None, got {timeout!r}")
    return timeout


def _future_resolver(fut: cf.Future[Any]) -> Callable[[bool, Any], None]:
    def resolve(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    return resolve


class Executor(cf.Executor):
    """Run callables on the fleet: ``submit``, ``map``, ``shutdown``, a
    context manager. ``timeout`` bounds how long each task may run (the host
    ends it by destroying its instance); waiting for a result is bounded
    only by what you pass to ``result()`` or ``map``."""

    def __init__(
        self,
        servers: str | list[str] | None = None,
        *,
        pool_class: str | None = None,
        timeout: float | None = None,
        trust_results: bool = False,
        config: str | None = None,
    ) -> None:
        self.timeout = _check_timeout(timeout)
        self.trust_results = trust_results
        self._client = FleetClient(_config(servers, config), pool_class, trust_results)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="noodle-fleet", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._futures: set[cf.Future[Any]] = set()
        self._shutdown = False
        try:
            asyncio.run_coroutine_threadsafe(self._client.start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise

    @property
    def pool_class(self) -> str:
        return self._client.pool_class

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        fmt, data = payload.encode_call(fn, args, kwargs, self.trust_results)
        return self._submit(fmt, data, None)

    def submit_with_id(self, job_id: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """``submit`` with your own job id: a job id submitted again within
        the stream's duplicate window runs once, and every future for it gets
        the one result (how a caller that crashed and retried stays safe)."""
        fmt, data = payload.encode_call(fn, args, kwargs, self.trust_results)
        return self._submit(fmt, data, job_id)

    def submit_source(self, source: str, *, job_id: str | None = None) -> cf.Future[Any]:
        """Run Python source (as ``noodle submit``); the future's value has
        ``result`` (a trailing expression's value), ``stdout`` and ``stderr``."""
        fmt, data = payload.encode_source(source)
        return self._submit(fmt, data, job_id)

    def _submit(self, fmt: str, data: bytes, job_id: str | None) -> cf.Future[Any]:
        fut: cf.Future[Any] = cf.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._futures.add(fut)
        fut.add_done_callback(self._forget)

        async def publish() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # cancelled before it left
            try:
                await self._client.submit(fmt, data, _future_resolver(fut), job_id=job_id, timeout=self.timeout)
            except BaseException as exc:  # noqa: BLE001 - the caller sees it on the future
                if not fut.done():
                    fut.set_exception(exc)

        asyncio.run_coroutine_threadsafe(publish(), self._loop)
        return fut

    def _forget(self, fut: cf.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown and not self._thread.is_alive():
                return
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for fut in futures:
                fut.cancel()  # only those not yet published can be cancelled
        if wait:
            self._finish(futures)
        else:
            threading.Thread(target=self._finish, args=(futures,), daemon=True).start()

    def _finish(self, futures: list[cf.Future[Any]]) -> None:
        cf.wait(futures)
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    @property
    def stats(self) -> dict[str, int]:
        """Results handed to futures, and results that came again for a job
        already resolved (ignored)."""
        return {"delivered": self._client.delivered, "duplicates": self._client.duplicates,
                "pending": self._client.pending}  # fmt: skip


class AsyncExecutor:
    """The asyncio form: ``async with AsyncExecutor(...) as ex: value = await ex.run(fn, ...)``.
    ``submit`` publishes and returns an ``asyncio.Future`` of the result."""

    def __init__(
        self,
        servers: str | list[str] | None = None,
        *,
        pool_class: str | None = None,
        timeout: float | None = None,
        trust_results: bool = False,
        config: str | None = None,
    ) -> None:
        self.timeout = _check_timeout(timeout)
        self.trust_results = trust_results
        self._client = FleetClient(_config(servers, config), pool_class, trust_results)
        self._started = False
        self._futures: set[asyncio.Future[Any]] = set()

    async def start(self) -> AsyncExecutor:
        if not self._started:
            await self._client.start()
            self._started = True
        return self

    async def __aenter__(self) -> AsyncExecutor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        fmt, data = payload.encode_call(fn, args, kwargs, self.trust_results)
        return await self._submit(fmt, data, None)

    async def submit_with_id(
        self, job_id: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> asyncio.Future[T]:
        fmt, data = payload.encode_call(fn, args, kwargs, self.trust_results)
        return await self._submit(fmt, data, job_id)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await (await self.submit(fn, *args, **kwargs))

    async def _submit(self, fmt: str, data: bytes, job_id: str | None) -> asyncio.Future[Any]:
        await self.start()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def resolve(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        await self._client.submit(fmt, data, resolve, job_id=job_id, timeout=self.timeout)
        return fut

    async def aclose(self, wait: bool = True) -> None:
        """With ``wait``, first wait for every job submitted here (as
        ``shutdown(wait=True)``); without, pending futures fail and their
        results stay in the results stream."""
        if wait and self._futures:
            await asyncio.gather(*list(self._futures), return_exceptions=True)
        if self._started:
            await self._client.close()
            self._started = False
