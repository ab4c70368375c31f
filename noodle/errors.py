"""Exceptions raised by pool-noodle.

Each exception says when it is raised. A resource the caller closed
(`PoolClosed`, `LeaseReleased`) is kept distinct from one that broke
(`PoolCorrupt`, `InstanceGone`), so callers can tell their own mistakes
from the pool's faults.
"""

from __future__ import annotations


class NoodleError(Exception):
    """Base class of every error this package raises on purpose."""


# -- configuration -----------------------------------------------------------


class ConfigError(NoodleError, ValueError):
    """Raised when a config file, flag or kind option is missing, unknown or
    out of range. The message names the offending key."""


class UnknownKind(ConfigError):
    """Raised when no instance kind of the given name is registered in the
    ``noodle.kinds`` entry-point group."""


class KindUnavailable(NoodleError):
    """Raised by a kind's ``setup()`` when the tool it drives is missing or
    cannot run on this host; the message names the package to install."""


# -- the pool segment --------------------------------------------------------


class PoolNotFound(NoodleError):
    """Raised by ``attach()`` when no pool of that name exists, or its
    supervisor is gone. Start one with ``noodle run --name NAME``."""


class PoolExists(NoodleError):
    """Raised when a supervisor starts for a pool whose supervisor is alive."""


class LayoutMismatch(NoodleError):
    """Raised by ``attach()`` when the segment was written by a different
    layout version of pool-noodle. Upgrade client and supervisor together."""


class PoolCorrupt(NoodleError):
    """Raised when a segment is truncated, foreign or fails its checksum, or
    when a value read from it is out of bounds. Nothing was changed."""


class PoolClosed(NoodleError):
    """Raised when a ``Pool`` handle is used after ``close()``: the caller
    closed it, the pool itself may be fine."""


class PermissionDenied(NoodleError):
    """Raised when this process may not open the pool's segment or queues
    (it is neither the owner nor in the pool's group)."""


# -- acquiring ---------------------------------------------------------------


class PoolStarved(NoodleError):
    """Raised by ``get()`` when no instance became ready before the timeout."""


class PoolShuttingDown(NoodleError):
    """Raised by ``get()`` at once (and to blocked waiters) after the
    supervisor began a graceful shutdown."""


class SlotOutOfRange(NoodleError, IndexError):
    """Raised when a slot id is not in ``0 .. pool_size - 1``."""


class DescriptorTooLarge(NoodleError, ValueError):
    """Raised when a kind's descriptor does not fit the slot's descriptor
    area; raise ``descriptor_size`` in the config."""


# -- leases and instances ----------------------------------------------------


class LeaseReleased(NoodleError):
    """Raised when a lease's instance is used after the lease was released
    (by the holder, or reclaimed by the supervisor)."""


class InstanceError(NoodleError):
    """Raised when code run inside an instance raised; carries the remote
    exception's type name, its traceback text (the agent's own frames cut)
    and what the code printed before it (``stdout``, ``stderr``)."""

    def __init__(
        self, message: str, remote_type: str = "", remote_traceback: str = "", stdout: str = "", stderr: str = ""
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.stdout = stdout
        self.stderr = stderr


class UnsafeResult(NoodleError, TypeError):
    """Raised when an instance's result is not plain data (None, bool, int,
    float, str, bytes, list, tuple, dict, set, datetime and nestings) and
    the caller does not trust the instance: a pickle from an isolating kind
    is never opened, because unpickling runs code the sender chooses. The
    message names the type; ``trust_results=True`` opts in to pickles."""


class BadPayload(NoodleError, ValueError):
    """Raised when a task or result payload is malformed: wrong magic,
    unknown tag, a length past the end, trailing bytes, too deep."""


class KindUnsupported(NoodleError, TypeError):
    """Raised when an API needs something the pool's kind does not offer,
    e.g. ``noodle.Executor`` on a kind whose instances do not run Python."""


class InstanceTimeout(NoodleError, TimeoutError):
    """Raised when an instance did not answer within the call's timeout."""


class InstanceGone(NoodleError):
    """Raised when an instance's process or socket vanished: it crashed, was
    killed, or was terminated by the pool."""


class StepFailed(NoodleError):
    """Raised by a kind's lifecycle step (clean, prepare, spawn, terminate)
    when it failed; the worker records it and the slot is retried."""
