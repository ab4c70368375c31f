"""The caller's side of the fleet, on one asyncio loop.

A job is published to ``noodle.jobs.<class>`` with its id as ``Nats-Msg-Id``
(a publish retried through a server restart is stored once). Its result
arrives on this client's inbox; a result that missed the inbox (the
connection was down when it was sent, or the job id had been submitted
before by someone else) is read from the results stream: at once after a
reconnect or a duplicate publish, and otherwise for jobs pending a while,
with a growing interval. Each job id resolves its futures exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from noodle.errors import NoodleError
from noodle.fleet import payload, wire
from noodle.fleet.config import TOKEN_RE, FleetConfig

log = logging.getLogger("noodle.fleet.client")

Resolver = Callable[[bool, Any], None]  # (ok, value or exception)
SWEEP_FIRST = 2.0  # seconds a job waits on the inbox alone before the results stream is read too
SWEEP_MAX = 30.0


class JobFailed(NoodleError):
    """Raised for a job the fleet could not run: after ``max_deliver`` tries
    (its instance or host died each time) or because it was malformed. The
    job is in the dead-letter stream with this reason."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


@dataclass
class _Pending:
    fmt: str
    resolvers: list[Resolver] = field(default_factory=list)
    next_sweep: float = 0.0
    interval: float = SWEEP_FIRST


class FleetClient:
    """Submits jobs and resolves their results; every method runs on the loop
    that ``start`` ran on."""

    def __init__(self, cfg: FleetConfig, pool_class: str | None = None, trust_results: bool = False) -> None:
        self.cfg = cfg
        self.pool_class = pool_class or cfg.classes[0]
        if not TOKEN_RE.match(self.pool_class):
            raise ValueError(f"pool_class {self.pool_class!r} is not a class name ([A-Za-z0-9_-], 1..64)")
        self.trust_results = trust_results
        self._pending: dict[str, _Pending] = {}
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._sweeper: asyncio.Task[None] | None = None
        self.delivered = 0  # results handed to futures (each job id once)
        self.duplicates = 0  # results that arrived for a job already resolved

    async def start(self) -> None:
        self._nc = await wire.connect(self.cfg, "noodle-client", on_reconnect=self._on_reconnect)
        self._js = self._nc.jetstream(timeout=5.0)
        await wire.ensure_streams(self._js, self.cfg)
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(self._inbox, cb=self._on_result)
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(2)  # acks and results out before closing
            with contextlib.suppress(Exception):
                await self._nc.close()
        exc = RuntimeError("the fleet client was closed before this job's result arrived")
        for pending in self._pending.values():
            for resolve in pending.resolvers:
                resolve(False, exc)
        self._pending.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, fmt: str, data: bytes, resolve: Resolver, *, job_id: str | None = None,
                     timeout: float | None = None) -> str:  # fmt: skip
        """Publish one job (retrying until the stream has it) and register
        ``resolve`` for its result. Returns the job id."""
        assert self._js is not None
        job_id = wire.check_job_id(job_id) if job_id is not None else uuid.uuid4().hex
        pending = self._pending.get(job_id)
        if pending is not None:
            pending.resolvers.append(resolve)  # the same job id again: one run, one result, both futures
            return job_id
        self._pending[job_id] = _Pending(fmt, [resolve], time.monotonic() + SWEEP_FIRST)
        headers = {wire.H_ID: job_id, wire.H_REPLY: self._inbox, wire.H_FORMAT: fmt}
        if timeout is not None:
            headers[wire.H_TIMEOUT] = repr(float(timeout))
        delay = 0.1
        while True:
            try:
                ack = await self._js.publish(wire.job_subject(self.pool_class), data, headers=dict(headers))
                break
            except Exception as exc:
                if self._nc is None or self._nc.is_closed:
                    self._resolve(job_id, wire.STATUS_FAILED, b"the connection was closed")
                    raise
                log.warning("submitting job %s failed (%s); retrying", job_id, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        if ack.duplicate:
            # submitted before (by us, before a restart, or by someone else):
            # the stream dropped this copy, and the result may not come to us
            await self._lookup(job_id)
        return job_id

    # -- results ----------------------------------------------------------------------------

    async def _on_result(self, msg: Msg) -> None:
        h = msg.headers or {}
        self._resolve(wire.header(h, wire.H_JOB), wire.header(h, wire.H_STATUS), msg.data)

    def _resolve(self, job_id: str, status: str, data: bytes) -> None:
        pending = self._pending.pop(job_id, None)
        if pending is None:
            self.duplicates += 1
            return
        self.delivered += 1
        try:
            if status == wire.STATUS_FAILED:
                raise JobFailed(job_id, data.decode(errors="replace"))
            value: Any = payload.decode(pending.fmt, status, data, trust=self.trust_results)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - the job's own exception goes to its future
            value, ok = exc, False
        for resolve in pending.resolvers:
            resolve(ok, value)

    async def _lookup(self, job_id: str) -> None:
        assert self._js is not None
        try:
            raw = await self._js.get_last_msg(self.cfg.results_stream, wire.result_subject(job_id))
        except NotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - server away: the next sweep tries again
            log.debug("looking up job %s: %s", job_id, exc)
            return
        self._resolve(job_id, wire.header(raw.headers, wire.H_STATUS), raw.data or b"")

    async def _on_reconnect(self) -> None:
        for job_id in list(self._pending):
            await self._lookup(job_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for job_id, pending in list(self._pending.items()):
                if pending.next_sweep <= now:
                    pending.interval = min(SWEEP_MAX, pending.interval * 2)
                    pending.next_sweep = now + pending.interval
                    await self._lookup(job_id)
