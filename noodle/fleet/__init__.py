"""A fleet of pools behind NATS JetStream: many hosts, one job queue.

Each host runs ``noodle serve`` next to its supervisor; callers use
:class:`Executor` (``concurrent.futures``) or :class:`AsyncExecutor`
(asyncio), or ``noodle submit``. Needs the ``fleet`` extra (nats-py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from noodle.fleet.client import JobFailed
    from noodle.fleet.executor import AsyncExecutor, Executor

__all__ = ["AsyncExecutor", "Executor", "JobFailed"]


def __getattr__(name: str) -> Any:
    # lazily, so `noodle` works without nats-py installed
    if name in ("Executor", "AsyncExecutor"):
        from noodle.fleet import executor

        return getattr(executor, name)
    if name == "JobFailed":
        from noodle.fleet.client import JobFailed

        return JobFailed
    raise AttributeError(f"module 'noodle.fleet' has no attribute {name!r}")
