"""The four stage queues of a pool: POSIX message queues carrying msgpack.

A message only dispatches; the slot table is the truth. A message is
``[1, slot, gen]`` (format version, slot id, generation): a worker claims
the slot by CAS from ``(stage, gen, owner 0)`` and drops the message as
stale when that fails. Queues hold at most 10 messages on this kind of
host (``/proc/sys/fs/mqueue/msg_max``), so senders never block: a full
queue leaves the slot in its state and the supervisor feeds it later.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import posix_ipc

from noodle.errors import PermissionDenied, PoolNotFound
from noodle.lifecycle import STAGE_NAMES

STAGES = STAGE_NAMES  # one queue per lifecycle stage

MSG_VERSION = 1
MAX_MSG_SIZE = 64  # a message is ~10 bytes; the kernel refuses larger ones


def queue_name(pool: str, stage: str) -> str:
    return f"/noodle.{pool}.{stage}"


def system_max_messages() -> int:
    try:
        with open("/proc/sys/fs/mqueue/msg_max") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return 10


class BadMessage(ValueError):
    """A queue held bytes that are not a valid task message."""


def encode(slot: int, gen: int) -> bytes:
    return msgpack.packb([MSG_VERSION, slot, gen])  # type: ignore[no-any-return]


def decode(raw: bytes, pool_size: int) -> tuple[int, int]:
    """Decode and bounds-check a message; BadMessage on anything else."""
    if len(raw) > MAX_MSG_SIZE:
        raise BadMessage(f"message of {len(raw)} bytes is larger than {MAX_MSG_SIZE}")
    try:
        msg: Any = msgpack.unpackb(raw, strict_map_key=True, max_bin_len=0, max_str_len=0,
                                   max_array_len=8, max_map_len=0, max_ext_len=0)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise BadMessage(f"not msgpack: {exc}") from None
    if not (isinstance(msg, list) and len(msg) == 3 and all(type(x) is int for x in msg)):
        raise BadMessage(f"not a [version, slot, gen] triple: {msg!r:.80}")
    version, slot, gen = msg
    if version != MSG_VERSION:
        raise BadMessage(f"message format version {version}, expected {MSG_VERSION}")
    if not 0 <= slot < pool_size:
        raise BadMessage(f"slot {slot} out of range 0..{pool_size - 1}")
    if not 0 <= gen < 1 << 38:
        raise BadMessage(f"generation {gen} out of range")
    return slot, gen


def create_all(pool: str, mode: int = 0o600, gid: int | None = None) -> dict[str, posix_ipc.MessageQueue]:
    """Create the four queues (supervisor only), replacing stale ones."""
    out: dict[str, posix_ipc.MessageQueue] = {}
    for stage in STAGES:
        name = queue_name(pool, stage)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_message_queue(name)
        q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=mode,
                                   max_messages=system_max_messages(), max_message_size=MAX_MSG_SIZE)  # fmt: skip
        # umask may have narrowed the mode, and executors need the group bits
        os.fchmod(q.mqd, mode)
        if gid is not None:
            os.fchown(q.mqd, -1, gid)
        q.block = False
        out[stage] = q
    return out


def open_queue(pool: str, stage: str) -> posix_ipc.MessageQueue:
    try:
        q = posix_ipc.MessageQueue(queue_name(pool, stage))
    except posix_ipc.ExistentialError:
        raise PoolNotFound(f"pool {pool!r} has no {stage} queue; is its supervisor running?") from None
    except posix_ipc.PermissionsError:
        raise PermissionDenied(f"may not open the {stage} queue of pool {pool!r}") from None
    q.block = False
    return q


def send_nowait(q: posix_ipc.MessageQueue, slot: int, gen: int) -> bool:
    """True when sent; False when the queue is full (the supervisor feeds it)."""
    try:
        q.send(encode(slot, gen), timeout=0)
    except posix_ipc.BusyError:
        return False
    return True


def dispatch(q: posix_ipc.MessageQueue, slot: int, gen: int, set_queued: Callable[[int, int], None]) -> bool:
    """Send the task of a slot that just entered a stage, stamping it queued
    (``set_queued(slot, ns)``) *before* the send and clearing the stamp if
    the queue is full. Stamped after the send, the stamp could land when the
    next stage's worker has already moved the slot on and failed its own
    send: the slot would then look queued while no task exists, and wait
    for the supervisor's 30 s resend."""
    set_queued(slot, time.monotonic_ns())
    if send_nowait(q, slot, gen):
        return True
    set_queued(slot, 0)
    return False


def unlink_all(pool: str) -> None:
    for stage in STAGES:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_message_queue(queue_name(pool, stage))
