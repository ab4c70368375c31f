"""Instance kinds: the built-in ones listed here, and any other package's
found by name in the ``noodle.kinds`` entry-point group (see README,
"Writing a kind"), or named directly as ``pkg.module:Class``."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from noodle.errors import UnknownKind
from noodle.kinds.base import AgentKind, Kind, PoolInfo, SlotContext

__all__ = ["BUILTIN_KINDS", "AgentKind", "Kind", "PoolInfo", "SlotContext", "available_kinds", "load_kind"]

# The one list of built-in kinds. They are not entry points, so a source
# checkout on sys.path (no installed metadata) knows them too.
BUILTIN_KINDS = {
    "process": "noodle.kinds.process:ProcessKind",
    "jail": "noodle.kinds.jail:JailKind",
    "oci": "noodle.kinds.oci:OciKind",
    "microvm": "noodle.kinds.microvm:MicrovmKind",
    "command": "noodle.kinds.command:CommandKind",
}


def _targets() -> dict[str, str]:
    found = dict(BUILTIN_KINDS)
    for ep in entry_points(group="noodle.kinds"):
        found[ep.name] = ep.value
    return found


def available_kinds() -> list[str]:
    return sorted(_targets())


def load_kind(name: str) -> type[Kind]:
    """The kind class registered under ``name``."""
    targets = _targets()
    if ":" in name and name not in targets:
        # "pkg.module:Class" names a kind that is not registered (tests, plugins in development)
        targets[name] = name
    if name not in targets:
        raise UnknownKind(f"unknown kind {name!r}; registered kinds: {', '.join(sorted(targets))}")
    module_name, _, attr = targets[name].partition(":")
    import importlib

    obj: Any
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownKind(f"kind {name!r} is registered as {targets[name]} but cannot be imported: {exc}") from None
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Kind)):
        raise UnknownKind(f"kind {name!r} ({targets[name]}) is not a noodle.kinds.Kind subclass")
    return obj
