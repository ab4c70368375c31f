"""pool-noodle: a warm pool of single-use instances on one Linux host.

Executors import this package::

    import noodle
    pool = noodle.attach("demo")
    with pool.get(timeout=5.0) as lease:
        print(lease.instance.run("1 + 1").result)

Names are resolved lazily so that stdlib-only modules such as
``noodle.agent`` import inside sandboxes without the C extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from noodle.errors import (
    BadPayload,
    ConfigError,
    DescriptorTooLarge,
    InstanceError,
    InstanceGone,
    InstanceTimeout,
    KindUnavailable,
    KindUnsupported,
    LayoutMismatch,
    LeaseReleased,
    NoodleError,
    PermissionDenied,
    PoolClosed,
    PoolCorrupt,
    PoolExists,
    PoolNotFound,
    PoolShuttingDown,
    PoolStarved,
    SlotOutOfRange,
    StepFailed,
    UnknownKind,
    UnsafeResult,
)

if TYPE_CHECKING:
    from noodle.client import Lease, Pool, attach
    from noodle.executor import Executor

__version__ = "0.1.0"

__all__ = [
    "BadPayload",
    "ConfigError",
    "DescriptorTooLarge",
    "Executor",
    "InstanceError",
    "InstanceGone",
    "InstanceTimeout",
    "KindUnavailable",
    "KindUnsupported",
    "LayoutMismatch",
    "Lease",
    "LeaseReleased",
    "NoodleError",
    "PermissionDenied",
    "Pool",
    "PoolClosed",
    "PoolCorrupt",
    "PoolExists",
    "PoolNotFound",
    "PoolShuttingDown",
    "PoolStarved",
    "SlotOutOfRange",
    "StepFailed",
    "UnknownKind",
    "UnsafeResult",
    "attach",
]


def __getattr__(name: str) -> Any:
    if name in ("attach", "Pool", "Lease"):
        from noodle import client

        return getattr(client, name)
    if name == "Executor":
        from noodle.executor import Executor

        return Executor
    raise AttributeError(f"module 'noodle' has no attribute {name!r}")
