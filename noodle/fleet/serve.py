"""``noodle serve``: take jobs from NATS JetStream into this host's pool.

One serve runs next to each host's supervisor. Per pool class it binds the
class's shared durable pull consumer and fetches **no more jobs than the
pool has ready instances** (minus jobs already fetched and not yet started):
warm capacity is the flow control, so a busy host takes nothing it cannot
start at once and the rest of the stream stays for other hosts.

A job's life here: fetch -> lease a fresh instance -> run (in-progress acks
every third of the ack wait) -> release the instance -> publish the result
to the results stream (stored once per job id) and to the caller's reply
subject -> ack. A host that dies before the ack leaves the job to be
redelivered after the ack wait; the next host first looks the job id up in
the results stream, so a job whose result already exists is answered, not
run again. A job that cannot run (its instance died) is retried up to
``max_deliver`` times, then dead-lettered with the reason, and the caller
gets a failure instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from noodle.client import Lease, Pool
from noodle.errors import InstanceGone, NoodleError, PoolNotFound, PoolShuttingDown, PoolStarved
from noodle.fleet import payload, wire
from noodle.fleet.config import FleetConfig
from noodle.fleet.puller import Puller
from noodle.systemd import Notifier

log = logging.getLogger("noodle.fleet.serve")

FETCH_WAIT = 1.0  # seconds one pull request waits for jobs
CAPACITY_POLL = 0.005  # seconds between looks at the ready count when the pool is full


@dataclass
class Job:
    id: str
    pool_class: str
    reply: str
    fmt: str
    timeout: float
    data: bytes
    deliveries: int


class Counters:
    def __init__(self) -> None:
        self.done = 0  # results published
        self.raised = 0  # of which the job raised
        self.answered = 0  # redelivered jobs answered from the results stream, not run again
        self.retried = 0  # naked for another try (instance died)
        self.dead = 0  # dead-lettered
        self.lease_waits = 0  # a fetched job found no ready instance at once
        self.min_headroom: int | None = None  # min(ready - fetched-not-started) seen


class Serve:
    def __init__(self, pool_name: str, cfg: FleetConfig) -> None:
        self.pool_name = pool_name
        self.cfg = cfg
        self.key = f"{cfg.host_key}.{pool_name}"
        self.counters = Counters()
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._unstarted = 0  # fetched, no instance yet
        self._reserved = 0  # budget held by pull requests in flight
        self._running = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._pool: Pool | None = None
        self._js: JetStreamContext | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._notifier = Notifier()

    # -- set-up -------------------------------------------------------------------

    async def _attach(self) -> Pool:
        from noodle.client import attach

        while True:
            try:
                return attach(self.pool_name)
            except PoolNotFound as exc:
                log.warning("%s; waiting for it", exc)
            try:
                await asyncio.wait_for(self._stop.wait(), 1.0)
            except TimeoutError:
                continue
            raise PoolNotFound(f"stopped before pool {self.pool_name!r} appeared")

    def request_stop(self, code: int = 0) -> None:
        if not self._stop.is_set():
            self._exit_code = code
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._pool = pool = await self._attach()
        self._threads = ThreadPoolExecutor(max_workers=pool.pool_size + 1, thread_name_prefix="noodle-job")
        # wait for the server as long as it takes, but not past a stop
        connecting = asyncio.create_task(wire.connect(self.cfg, f"noodle-serve {self.key}", wait=None))
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            self._threads.shutdown(wait=True)
            pool.close()
            return self._exit_code
        nc = connecting.result()
        self._js = js = nc.jetstream(timeout=5.0)
        try:
            await wire.ensure_streams(js, self.cfg)
            subs = {}
            for cls in self.cfg.classes:
                await wire.ensure_consumer(js, self.cfg, cls)
                subs[cls] = Puller(nc, self.cfg.stream, wire.consumer_name(cls))
                await subs[cls].start()
            await nc.subscribe(f"{wire.MAX_DELIVERIES_ADVISORY}.{self.cfg.stream}.*", queue="noodle-dead-letter",
                               cb=self._on_max_deliveries)  # fmt: skip
            kv = await wire.fleet_bucket(js, self.cfg, create=True)
            log.info("serving pool %s for classes %s from %s", self.pool_name, ", ".join(self.cfg.classes),
                     ", ".join(self.cfg.servers))  # fmt: skip
            self._notifier.ready(f"serving {self.pool_name} for {', '.join(self.cfg.classes)}")
            loops = [asyncio.create_task(self._fetch_loop(cls, sub)) for cls, sub in subs.items()]
            status = asyncio.create_task(self._status_loop(kv))
            await self._stop.wait()
            log.info("stopping: no more fetches; waiting for %d running jobs", len(self._jobs))
            # a pull in flight is let finish (the server ends it within
            # FETCH_WAIT): jobs delivered to it are run, not left to time out
            _, late = await asyncio.wait(loops, timeout=FETCH_WAIT + 10.0)
            for t in late:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if self._jobs:
                await asyncio.gather(*self._jobs, return_exceptions=True)
            status.cancel()
            await asyncio.gather(status, return_exceptions=True)
            if kv is not None:
                with contextlib.suppress(Exception):
                    await kv.put(self.key, self._status_value(stopped=True))
        finally:
            with contextlib.suppress(Exception):
                await nc.flush(2)  # acks and results out before closing
            with contextlib.suppress(Exception):
                await nc.close()
            self._threads.shutdown(wait=True)
            pool.close()
        return self._exit_code

    # -- flow control ---------------------------------------------------------------

    def _ready(self) -> int:
        assert self._pool is not None
        snap = self._pool.stats()
        if snap["shutting_down"]:
            log.warning("pool %s is shutting down; stopping", self.pool_name)
            self.request_stop(0)
            return 0
        # a slot turns ready a moment before its id is in the ring, where
        # get() finds it: count only what both say is there
        return min(int(snap["states"]["ready"]), int(snap["ring_length"]))

    async def _reserve(self) -> int:
        """Wait until the pool has a ready instance no fetched job has
        claimed; reserve this class's share of them for one pull request."""
        shares = len(self.cfg.classes)
        while not self._stop.is_set():
            headroom = self._ready() - self._unstarted - self._reserved
            if headroom > 0:
                n = min(self.cfg.max_batch, max(1, headroom // shares))
                self._reserved += n
                return n
            await asyncio.sleep(CAPACITY_POLL)
        return 0  # stopping

    async def _fetch_loop(self, cls: str, puller: Puller) -> None:
        while not self._stop.is_set():
            n = await self._reserve()
            if n == 0:
                return
            msgs: list[Msg] = []
            try:
                msgs = await puller.pull(n, FETCH_WAIT)
            except (nats.errors.Error, OSError) as exc:
                log.debug("pull on %s: %s", cls, exc)
                await asyncio.sleep(0.2)
            finally:
                self._reserved -= n
            self._unstarted += len(msgs)
            self._note_headroom()
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg, cls))
                self._jobs.add(task)
                task.add_done_callback(self._jobs.discard)

    def _note_headroom(self) -> None:
        # negative would mean a job fetched with no instance to start it on
        headroom = self._ready() - self._unstarted
        if self.counters.min_headroom is None or headroom < self.counters.min_headroom:
            self.counters.min_headroom = headroom

    # -- one job --------------------------------------------------------------------

    def _parse(self, msg: Msg, cls: str) -> Job:
        h = msg.headers or {}
        job_id = wire.header(h, wire.H_ID)
        wire.check_job_id(job_id)
        fmt = wire.header(h, wire.H_FORMAT)
        if fmt not in payload.FORMATS:
            raise payload.BadJob(f"unknown job format {fmt!r}")
        try:
            timeout = float(wire.header(h, wire.H_TIMEOUT) or self.cfg.job_timeout)
        except ValueError:
            raise payload.BadJob(f"bad {wire.H_TIMEOUT} header {wire.header(h, wire.H_TIMEOUT)!r}") from None
        if not 0 < timeout <= 86400:
            raise payload.BadJob(f"timeout {timeout} out of range")
        reply = wire.header(h, wire.H_REPLY)
        if reply and not wire.reply_subject(reply):
            raise payload.BadJob(f"reply subject {reply[:80]!r} is not an inbox (_INBOX.<token>...)")
        return Job(job_id, cls, reply, fmt, timeout, msg.data, _deliveries(msg))

    async def _handle(self, msg: Msg, cls: str) -> None:
        started = False
        try:
            try:
                job = self._parse(msg, cls)
            except (ValueError, payload.BadJob) as exc:
                await self._dead_letter_msg(msg, cls, f"bad job: {exc}")
                with contextlib.suppress(Exception):
                    await msg.term()
                return
            if await self._answer_from_results(job):
                with contextlib.suppress(Exception):
                    await msg.ack()
                return
            lease = await self._lease(msg)
            if lease is None:
                return  # pool going away: the job was handed back
            self._unstarted -= 1
            started = True
            await self._run(msg, job, lease)
        except Exception:
            log.exception("job handling failed; the job will be redelivered")
        finally:
            if not started:
                self._unstarted -= 1

    async def _lease(self, msg: Msg) -> Lease | None:
        assert self._pool is not None
        waited = False
        last_progress = time.monotonic()
        while True:
            try:
                return self._pool.get(timeout=0)
            except PoolStarved:
                if not waited:
                    # someone else on this host took the instance we counted
                    self.counters.lease_waits += 1
                    waited = True
            except (PoolShuttingDown, PoolNotFound) as exc:
                log.warning("cannot lease: %s; handing the job back", exc)
                self.request_stop(0 if isinstance(exc, PoolShuttingDown) else 3)
                with contextlib.suppress(Exception):
                    await msg.nak()
                return None
            if time.monotonic() - last_progress > self.cfg.ack_wait / 3:
                last_progress = time.monotonic()
                with contextlib.suppress(Exception):
                    await msg.in_progress()
            await asyncio.sleep(CAPACITY_POLL)

    async def _run(self, msg: Msg, job: Job, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        keepalive = asyncio.create_task(self._keep_alive(msg))
        self._running += 1
        failure = ""
        try:
            status, data = await loop.run_in_executor(self._threads, _run_in_instance, lease, job)
        except payload.BadJob as exc:
            failure, bad = f"bad job: {exc}", True
        except (InstanceGone, NoodleError, OSError) as exc:
            failure, bad = f"instance failed: {type(exc).__name__}: {exc}", False
        finally:
            self._running -= 1
            keepalive.cancel()
            with contextlib.suppress(Exception):
                lease.release()
        if failure:
            await self._failed(msg, job, failure, final=bad or job.deliveries >= self.cfg.max_deliver)
            return
        await self._publish_result(job, status, data)
        self.counters.done += 1
        self.counters.raised += status == wire.STATUS_RAISED
        with contextlib.suppress(Exception):
            await msg.ack()  # lost: redelivered after ack wait and answered from the results stream

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.cfg.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _failed(self, msg: Msg, job: Job, reason: str, final: bool) -> None:
        if not final:
            self.counters.retried += 1
            log.warning("job %s try %d/%d: %s; retrying", job.id, job.deliveries, self.cfg.max_deliver, reason)
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(5.0, 0.2 * job.deliveries))
            return
        await self._dead_letter(job.id, job.pool_class, job.reply, job.fmt, msg.data, reason, job.deliveries)
        with contextlib.suppress(Exception):
            await msg.term()

    # -- results ----------------------------------------------------------------------

    def _result_headers(self, job_id: str, fmt: str, status: str) -> dict[str, str]:
        return {wire.H_ID: job_id, wire.H_JOB: job_id, wire.H_STATUS: status, wire.H_FORMAT: fmt,
                wire.H_HOST: self.key}  # fmt: skip

    async def _publish_result(self, job: Job, status: str, data: bytes) -> None:
        """Store the result (retrying through a server restart), then tell
        the caller; only then may the job be acked."""
        headers = self._result_headers(job.id, job.fmt, status)
        await self._js_publish(wire.result_subject(job.id), data, headers)
        if job.reply:
            await self._reply(job.reply, data, headers)

    async def _js_publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        assert self._js is not None
        delay = 0.1
        while True:
            try:
                await self._js.publish(subject, data, headers=dict(headers))
                return
            except Exception as exc:  # noqa: BLE001 - any transport error: retry, the msg id dedupes
                log.warning("publishing %s failed (%s); retrying", subject, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _reply(self, reply: str, data: bytes, headers: dict[str, str]) -> None:
        assert self._js is not None
        try:
            await self._js._nc.publish(reply, data, headers=dict(headers))
        except Exception as exc:  # noqa: BLE001 - the caller also reads the results stream
            log.debug("reply to %s failed: %s", reply, exc)

    async def _answer_from_results(self, job: Job) -> bool:
        """True if this job id already has a stored result (its host died
        after publishing, before acking): send that again, do not run."""
        assert self._js is not None
        try:
            prior = await self._js.get_last_msg(self.cfg.results_stream, wire.result_subject(job.id))
        except NotFoundError:
            return False
        if job.reply and prior.data is not None:
            headers = {k: v for k, v in (prior.headers or {}).items() if k.startswith(("Noodle-", "Nats-Msg-Id"))}
            await self._reply(job.reply, prior.data, headers)
        self.counters.answered += 1
        log.info("job %s already has a result; answered without running it again", job.id)
        return True

    async def _dead_letter(self, job_id: str, cls: str, reply: str, fmt: str, data: bytes, reason: str,
                           deliveries: int) -> None:  # fmt: skip
        headers = {wire.H_ID: f"dead-{job_id}", wire.H_JOB: job_id, wire.H_REASON: reason[:1000],
                   wire.H_DELIVERIES: str(deliveries), wire.H_FORMAT: fmt, wire.H_HOST: self.key}  # fmt: skip
        if reply:
            headers[wire.H_REPLY] = reply
        await self._js_publish(wire.dead_subject(cls), data, headers)
        self.counters.dead += 1
        log.error("job %s dead-lettered after %d tries: %s", job_id, deliveries, reason)
        fail = self._result_headers(job_id, fmt, wire.STATUS_FAILED)
        await self._js_publish(wire.result_subject(job_id), reason.encode(), fail)
        if reply:
            await self._reply(reply, reason.encode(), fail)

    async def _dead_letter_msg(self, msg: Msg, cls: str, reason: str) -> None:
        h = msg.headers or {}
        job_id = wire.header(h, wire.H_ID)
        if not wire.JOB_ID_RE.match(job_id):
            job_id = f"seq{msg.metadata.sequence.stream}"
        reply = wire.reply_subject(wire.header(h, wire.H_REPLY))
        await self._dead_letter(job_id, cls, reply, wire.header(h, wire.H_FORMAT), msg.data, reason, _deliveries(msg))

    async def _on_max_deliveries(self, adv: Msg) -> None:
        """A job's last try ended without an answer (its host died each
        time): dead-letter it from the stream, which still holds it."""
        assert self._js is not None
        try:
            info = json.loads(adv.data)
            consumer, seq = str(info["consumer"]), int(info["stream_seq"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed max-deliveries advisory")
            return
        classes = {wire.consumer_name(c): c for c in self.cfg.classes}
        if consumer not in classes:
            return
        try:
            raw = await self._js.get_msg(self.cfg.stream, seq)
        except NotFoundError:
            return  # already acked, terminated or dead-lettered
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read job at seq %d for dead-lettering: %s", seq, exc)
            return
        h = raw.headers or {}
        job_id = wire.header(h, wire.H_ID) or f"seq{seq}"
        if not wire.JOB_ID_RE.match(job_id):
            job_id = f"seq{seq}"
        reason = f"no answer after {info.get('deliveries', self.cfg.max_deliver)} tries (hosts died or stalled)"
        reply = wire.reply_subject(wire.header(h, wire.H_REPLY))
        await self._dead_letter(job_id, classes[consumer], reply, wire.header(h, wire.H_FORMAT),
                                raw.data or b"", reason, int(info.get("deliveries", 0)))  # fmt: skip
        with contextlib.suppress(Exception):
            await self._js._jsm.delete_msg(self.cfg.stream, seq)

    # -- fleet view ---------------------------------------------------------------------

    def _status_value(self, stopped: bool = False, rate: float = 0.0) -> bytes:
        assert self._pool is not None
        try:
            snap = self._pool.stats()
            states, size = snap["states"], snap["pool_size"]
        except NoodleError:
            states, size = {}, 0
        c = self.counters
        value: dict[str, Any] = {
            "host": self.cfg.host_key, "pool": self.pool_name, "pid": os.getpid(), "classes": list(self.cfg.classes),
            "ts": time.time(), "state": "stopped" if stopped else ("stopping" if self._stop.is_set() else "serving"),
            "pool_size": size, "states": states, "running": self._running, "fetched_unstarted": self._unstarted,
            "done": c.done, "raised": c.raised, "answered": c.answered, "retried": c.retried, "dead": c.dead,
            "lease_waits": c.lease_waits, "min_headroom": c.min_headroom, "jobs_per_s": round(rate, 2),
        }  # fmt: skip
        return json.dumps(value, sort_keys=True).encode()

    async def _status_loop(self, kv: KeyValue | None) -> None:
        last_done, last_t = 0, time.monotonic()
        while True:
            now = time.monotonic()
            rate = (self.counters.done - last_done) / max(1e-3, now - last_t)
            last_done, last_t = self.counters.done, now
            if kv is not None:
                try:
                    await kv.put(self.key, self._status_value(rate=rate))
                except Exception as exc:  # noqa: BLE001 - the view is best effort; jobs go on
                    log.debug("fleet view update failed: %s", exc)
            self._notifier.status(f"{self.counters.done} done, {self._running} running")
            self._check_pool()
            await asyncio.sleep(self.cfg.status_interval)

    def _check_pool(self) -> None:
        assert self._pool is not None
        try:
            age = self._pool.stats()["heartbeat_age_s"]
        except NoodleError:
            age = 1e9
        if age > 5.0:
            try:
                from noodle.client import attach

                attach(self.pool_name).close()
            except PoolNotFound as exc:
                log.error("%s; stopping", exc)
                self.request_stop(3)


def _run_in_instance(lease: Lease, job: Job) -> tuple[str, bytes]:
    return payload.run(lease.instance, job.fmt, job.data, job.timeout)


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream delivery
        return 1


def run(pool_name: str, cfg: FleetConfig) -> int:
    from setproctitle import setproctitle

    setproctitle(f"noodle serve {pool_name}")
    return asyncio.run(Serve(pool_name, cfg).run())
