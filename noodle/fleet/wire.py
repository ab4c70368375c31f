"""What travels over NATS: subjects, headers, and the streams that hold them.

A job is one message on ``noodle.jobs.<class>`` in the work-queue stream
``NOODLE_JOBS``; its id is its ``Nats-Msg-Id`` (the stream drops a second
copy within the duplicate window). Its result goes to the job's reply
subject and to ``noodle.results.<id>`` in ``NOODLE_RESULTS`` (one message
kept per id, and the same ``Nats-Msg-Id`` so a result published twice is
stored once). A job that cannot run after ``max_deliver`` tries goes to
``noodle.dead.<class>`` in ``NOODLE_DEAD`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from noodle.errors import NoodleError
from noodle.fleet.config import FleetConfig

log = logging.getLogger("noodle.fleet")

JOBS_PREFIX = "noodle.jobs"
RESULTS_PREFIX = "noodle.results"
DEAD_PREFIX = "noodle.dead"

H_ID = "Nats-Msg-Id"
H_REPLY = "Noodle-Reply"  # where the caller listens (a stored message keeps no reply-to)
H_FORMAT = "Noodle-Format"  # how the payload is encoded (see noodle.fleet.payload)
H_TIMEOUT = "Noodle-Timeout"  # seconds the job may run
H_STATUS = "Noodle-Status"  # of a result: ok | raised | timeout | failed (could not run: dead-lettered)
H_JOB = "Noodle-Job"
H_HOST = "Noodle-Host"
H_REASON = "Noodle-Reason"
H_DELIVERIES = "Noodle-Deliveries"

STATUS_OK, STATUS_RAISED, STATUS_TIMEOUT, STATUS_FAILED = "ok", "raised", "timeout", "failed"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def job_subject(pool_class: str) -> str:
    return f"{JOBS_PREFIX}.{pool_class}"


def result_subject(job_id: str) -> str:
    return f"{RESULTS_PREFIX}.{job_id}"


def dead_subject(pool_class: str) -> str:
    return f"{DEAD_PREFIX}.{pool_class}"


def consumer_name(pool_class: str) -> str:
    """One durable per class, shared by every host serving it: a work-queue
    stream allows one consumer per subject, and sharing it is what spreads
    the jobs."""
    return f"noodle-{pool_class}"


# a reply subject is chosen by whoever published the job: only a plain inbox
# is answered, so a job cannot make a host publish into the JetStream API
# ($JS.API...) or onto another job's subjects
REPLY_RE = re.compile(r"^_INBOX\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def reply_subject(value: str) -> str:
    """The job's reply subject if it is a plain inbox, else ''."""
    return value if len(value) <= 256 and REPLY_RE.match(value) else ""


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise ValueError(f"job id must be 1..128 of [A-Za-z0-9_-] (a subject token), got {job_id!r}")
    return job_id


class Unreachable(NoodleError, ConnectionError):
    """Raised when no NATS server of the configured list answered in time
    (or the credentials were refused)."""


async def connect(cfg: FleetConfig, name: str, on_reconnect: Callable[[], Awaitable[None]] | None = None,
                  wait: float | None = 15.0) -> NATS:  # fmt: skip
    """Connect with the configured credentials; once connected, reconnect for
    ever (a server restart must not end a serve or lose a caller's futures).
    The first connection is given ``wait`` seconds (None: for ever)."""

    async def error_cb(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    async def disconnected_cb() -> None:
        if not nc.is_closed:
            log.warning("nats: disconnected; reconnecting")

    async def reconnected_cb() -> None:
        log.info("nats: reconnected")
        if on_reconnect is not None:
            await on_reconnect()

    nc = NATS()
    attempt = nc.connect(
        servers=list(cfg.servers),
        name=name,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,  # type: ignore[arg-type]  # seconds: annotated int, slept as a float
        connect_timeout=5,
        **cfg.connect_options(),
    )
    try:
        await asyncio.wait_for(attempt, wait)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await nc.close()
        raise Unreachable(f"no NATS server of {', '.join(cfg.servers)} accepted a connection within {wait} s") from None
    except nats.errors.Error as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise Unreachable(f"cannot connect to {', '.join(cfg.servers)}: {type(exc).__name__}: {exc}") from None
    return nc


async def _add_or_update_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # exists with other settings (e.g. a longer ack wait from an older host)
        log.info("stream %s exists (%s); updating it", config.name, exc.description)
        await js.update_stream(config)


async def ensure_streams(js: JetStreamContext, cfg: FleetConfig) -> None:
    """Create the three streams if missing (idempotent: every serve and
    client may call it)."""
    await _add_or_update_stream(js, api.StreamConfig(
        name=cfg.stream, subjects=[f"{JOBS_PREFIX}.>"], retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE, duplicate_window=cfg.duplicate_window,
    ))  # fmt: skip
    await _add_or_update_stream(js, api.StreamConfig(
        name=cfg.results_stream, subjects=[f"{RESULTS_PREFIX}.>"], retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE, max_msgs_per_subject=1, max_age=cfg.results_max_age,
        duplicate_window=min(cfg.duplicate_window, cfg.results_max_age),
    ))  # fmt: skip
    await _add_or_update_stream(js, api.StreamConfig(
        name=cfg.dead_stream, subjects=[f"{DEAD_PREFIX}.>"], retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE, duplicate_window=cfg.duplicate_window,
    ))  # fmt: skip


async def ensure_consumer(js: JetStreamContext, cfg: FleetConfig, pool_class: str) -> None:
    config = api.ConsumerConfig(
        durable_name=consumer_name(pool_class),
        filter_subject=job_subject(pool_class),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=cfg.ack_wait,
        max_deliver=cfg.max_deliver,
        max_waiting=512,
    )
    try:
        await js.add_consumer(cfg.stream, config)
    except BadRequestError as exc:
        log.info("consumer %s exists (%s); updating it", config.durable_name, exc.description)
        await js.add_consumer(cfg.stream, config)


async def fleet_bucket(js: JetStreamContext, cfg: FleetConfig, create: bool) -> KeyValue | None:
    try:
        return await js.key_value(cfg.bucket)
    except (NotFoundError, nats.js.errors.BucketNotFoundError):
        if not create:
            return None
    with contextlib.suppress(BadRequestError):
        # an entry outlives its host by this long, then the view forgets it
        return await js.create_key_value(bucket=cfg.bucket, history=1, ttl=max(60.0, 20 * cfg.stale_after))
    return await js.key_value(cfg.bucket)


def header(msg_headers: dict[str, Any] | None, name: str, default: str = "") -> str:
    if not msg_headers:
        return default
    value = msg_headers.get(name, default)
    return value if isinstance(value, str) else default
