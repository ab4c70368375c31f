"""Start-up chores of a supervisor: the lock, and the remains of a crash.

A supervisor that died (SIGKILL, OOM, power) leaves its segment, queues and
instances behind. The next supervisor for that name, once it holds the
lock, stops every instance the old segment records, cleans every slot and
removes the segment and queues before starting fresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

import posix_ipc

from noodle import layout as L
from noodle import queues
from noodle.errors import NoodleError, PoolExists
from noodle.kinds import Kind
from noodle.segment import Segment, segment_name

log = logging.getLogger("noodle.recovery")


class PoolLock:
    """An flock on ``<run_dir>/supervisor.lock``: held for the supervisor's
    life, released by the kernel when it dies, so a crash never leaves the
    name locked."""

    def __init__(self, run_dir: str, pool: str) -> None:
        self.path = os.path.join(run_dir, "supervisor.lock")
        self.pool = pool
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PoolExists(
                f"pool {self.pool!r} already has a live supervisor (pid {holder}, lock {self.path});"
                " stop it first or pick another --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


def recover_stale(pool: str, kind: Kind, pool_size: int) -> int:
    """Stop the instances of a dead supervisor's segment and clean its slots.
    Returns the number of instances stopped. Never raises for a corrupt
    segment: it is unlinked and every slot the new pool uses is cleaned."""
    stopped = 0
    old_size = 0
    slots_dir = os.path.join(kind.pool.run_dir, "slots")
    remains = os.path.isdir(slots_dir) and bool(os.listdir(slots_dir))
    try:
        seg = Segment.attach(pool)
    except posix_ipc.ExistentialError:
        seg = None
    except NoodleError as exc:
        if "no pool named" in str(exc):
            seg = None
        else:
            log.warning("stale segment of pool %r is unreadable (%s); cleaning every slot blind", pool, exc)
            seg = None
    if seg is not None:
        log.warning("pool %r: found the segment of a dead supervisor (pid %d); stopping its instances",
                    pool, seg.header.creator_pid)  # fmt: skip
        old_size = seg.pool_size
        for slot, word in enumerate(seg.states()):
            if L.word_state(word) in (L.State.READY, L.State.LEASED, L.State.TERMINATE, L.State.SPAWN):
                desc = seg.descriptor(slot)
                if desc:
                    try:
                        kind.terminate(kind.pool.slot(slot), desc)
                        stopped += 1
                    except Exception as exc:  # noqa: BLE001 - clean below sweeps what this misses
                        log.warning("slot %d: stopping the old instance failed: %s", slot, exc)
        seg.close()
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(segment_name(pool))
    queues.unlink_all(pool)
    if seg is None and not remains:
        return 0  # a clean start: the clean stage of every slot runs anyway
    for slot in range(max(old_size, pool_size)):
        try:
            kind.clean(kind.pool.slot(slot))
        except Exception as exc:  # noqa: BLE001 - the slot's own clean stage will retry
            log.warning("slot %d: cleaning after the crash failed: %s", slot, exc)
    return stopped
