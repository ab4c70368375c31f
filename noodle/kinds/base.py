"""The instance-kind interface.

A kind is a spec the pool drives. Lifecycle steps run in stage-worker
processes (never in the client); the descriptor a spawn returns is a small
msgpack-able dict that crosses to the client through the slot table, and
the client builds its handle from it with the class methods, without the
kind's options (the client never sees the supervisor's config).

Order for one slot, forever::

    clean -> prepare -> spawn -> (ready, leased) -> terminate -> clean ...

Rules every kind must keep:

* ``clean(slot)`` is idempotent and must succeed whatever state a crash left
  the slot in: it removes leftovers and kills stray processes (by cgroup or
  process group), even when ``terminate`` never ran.
* ``terminate(slot, descriptor)`` stops the instance; ``clean`` follows it
  whether it succeeded or not.
* A step signals failure by raising (``StepFailed`` or anything else); the
  worker records the error and the slot is retried with backoff.
* Steps must be bounded; the supervisor kills a worker whose step outlives
  ``step_timeout``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from noodle.errors import ConfigError
from noodle.handle import AgentHandle
from noodle.host.proc import ProcessIdentity
from noodle.suggest import did_you_mean


@dataclass(frozen=True)
class SlotContext:
    """Where one slot lives on the host."""

    pool: str
    slot: int
    run_dir: str  # the pool's private directory (mode 0700 / group)

    @property
    def dir(self) -> str:
        return os.path.join(self.run_dir, "slots", str(self.slot))


@dataclass(frozen=True)
class PoolInfo:
    """What a kind may know about the pool it serves."""

    name: str
    pool_size: int
    run_dir: str
    uid: int
    gid: int

    def slot(self, slot: int) -> SlotContext:
        return SlotContext(self.name, slot, self.run_dir)


class Kind:
    """Base class of instance kinds. Subclasses set ``name`` and ``OPTIONS``
    (option name -> (type, default)) and override the steps."""

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {}

    def __init__(self, pool: PoolInfo, options: Mapping[str, Any]) -> None:
        self.pool = pool
        self.options = self.validate_options(options)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``[kinds.<name>]`` options; unknown keys and wrong types are
        ConfigErrors that name the key."""
        out: dict[str, Any] = {}
        for key in options:
            if key not in cls.OPTIONS:
                known = ", ".join(sorted(cls.OPTIONS)) or "none"
                hint = did_you_mean(key, cls.OPTIONS)
                raise ConfigError(f"kinds.{cls.name}.{key}: unknown option{hint} (known: {known})")
        for key, (typ, default) in cls.OPTIONS.items():
            value = options.get(key, default)
            if value is not None and not isinstance(value, typ):
                raise ConfigError(
                    f"kinds.{cls.name}.{key}: expected {_type_name(typ)}, got {type(value).__name__} {value!r}"
                )
            if isinstance(value, bool) and typ in (int, float, (int, float)):
                raise ConfigError(f"kinds.{cls.name}.{key}: expected a number, got a boolean")
            out[key] = value
        return out

    # -- supervisor side ----------------------------------------------------

    def setup(self) -> None:
        """Once in the supervisor before workers start: check tools exist
        (raise KindUnavailable naming the package), build templates."""

    def maintain(self) -> None:
        """Called from the supervisor loop each tick: restart helpers
        (a zygote, a template VM) that died."""

    def teardown(self) -> None:
        """Once in the supervisor at shutdown, after every slot is clean."""

    def helper_pids(self) -> set[int]:
        """Long-lived processes the kind runs itself (not instances), so
        the supervisor's reaper and leak checks know them."""
        return set()

    # -- worker side ----------------------------------------------------------

    def clean(self, slot: SlotContext) -> None:
        raise NotImplementedError

    def prepare(self, slot: SlotContext) -> None:
        raise NotImplementedError

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        raise NotImplementedError

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def health(self, descriptor: Mapping[str, Any], timeout: float) -> bool:
        return self.client_health(descriptor, timeout)

    # -- client side (no options, no setup) --------------------------------

    @classmethod
    def client_handle(cls, descriptor: Mapping[str, Any]) -> Any:
        """What ``lease.instance`` is."""
        return None

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        """A cheap liveness check run by ``get()`` when health_on_get is set."""
        return True

    @classmethod
    def client_health_handle(cls, descriptor: Mapping[str, Any], timeout: float) -> tuple[bool, Any]:
        """``client_health`` for kinds whose check opens the connection the
        lease then keeps for its calls: (healthy, that handle or None). The
        default keeps nothing and the lease builds its handle when asked."""
        return cls.client_health(descriptor, timeout), None

    @classmethod
    def instance_pids(cls, descriptor: Mapping[str, Any]) -> list[int]:
        """Host pids of the instance, for leak checks and crash recovery."""
        pid = descriptor.get("pid")
        return [pid] if isinstance(pid, int) and pid > 0 else []


class AgentKind(Kind):
    """Base of kinds whose instances run noodle's agent behind a Unix socket.
    Their descriptor names the ``socket`` and the ``pid`` + ``start`` of the
    process that holds the instance (so a reused pid does not count)."""

    # Whether results from the instance may be unpickled: only for a kind that
    # isolates nothing and so shares the caller's trust. Out of a sandbox come
    # plain data only (noodle.codec).
    TRUST_RESULTS: ClassVar[bool] = False

    @classmethod
    def client_handle(cls, descriptor: Mapping[str, Any]) -> AgentHandle:
        return AgentHandle(str(descriptor["socket"]), trust_results=cls.TRUST_RESULTS)

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        """The instance's process is still the one spawn started and its agent
        answers: an agent whose holder died is not handed out."""
        proc = ProcessIdentity.from_record(descriptor.get("pid"), descriptor.get("start"))
        if proc is None or not proc.alive():
            return False
        return AgentHandle.probe(str(descriptor.get("socket", "")), timeout)

    @classmethod
    def client_health_handle(cls, descriptor: Mapping[str, Any], timeout: float) -> tuple[bool, Any]:
        """``client_health``, keeping the pinged connection open as the
        lease's handle: the check on get and the first call share one
        connect (agents serve one connection at a time)."""
        proc = ProcessIdentity.from_record(descriptor.get("pid"), descriptor.get("start"))
        if proc is None or not proc.alive():
            return False, None
        handle = AgentHandle.checked(str(descriptor.get("socket", "")), timeout, trust_results=cls.TRUST_RESULTS)
        return handle is not None, handle


def _type_name(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__
