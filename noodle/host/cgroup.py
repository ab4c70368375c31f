"""cgroups: finding the hierarchies, and a per-slot cgroup with memory and
pids limits.

cgroup v2 is used where its hierarchy offers the ``memory`` and ``pids``
controllers; otherwise the v1 ``memory`` and ``pids`` hierarchies (hybrid
hosts such as this one mount an empty v2 at ``/sys/fs/cgroup/unified``).
A slot's cgroup is ``<root>/<parent>/<pool>.<slot>`` in each hierarchy:
flat, so that no per-pool directory exists that a concurrent clean of a
sibling slot could remove under a prepare, and named after pool and slot,
so that clean finds it after a crash without any descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass

from noodle.errors import KindUnavailable, StepFailed
from noodle.host.mounts import mount_table
from noodle.host.proc import ProcessIdentity, start_time

_CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Layout:
    """Where the hierarchies are: one v2 root, or one v1 root per controller."""

    version: int
    roots: tuple[str, ...]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(value)


def detect() -> Layout:
    """The hierarchy to use on this host; KindUnavailable when neither works."""
    mounts = [(point, fstype, opts) for point, fstype, _, opts in mount_table()]
    for point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        with contextlib.suppress(OSError):
            ctrls = _read(os.path.join(point, "cgroup.controllers")).split()
            if all(c in ctrls for c in _CONTROLLERS):
                return Layout(2, (point,))
    v1: dict[str, str] = {}
    for point, fstype, opts in mounts:
        if fstype != "cgroup":
            continue
        for c in opts.split(","):
            if c in _CONTROLLERS and c not in v1:
                v1[c] = point
    if all(c in v1 for c in _CONTROLLERS):
        return Layout(1, tuple(v1[c] for c in _CONTROLLERS))
    raise KindUnavailable(
        "no cgroup hierarchy with the memory and pids controllers is mounted "
        "(need cgroup v2 with both enabled, or v1 memory and pids); set cgroup = false to run without limits"
    )


class SlotCgroup:
    """One slot's cgroup, in every hierarchy of ``layout``."""

    def __init__(self, layout: Layout, parent: str, name: str) -> None:
        self.layout = layout
        self.parent = parent
        self.name = name
        self.paths: tuple[str, ...] = tuple(os.path.join(r, parent, name) for r in layout.roots)

    @classmethod
    def from_paths(cls, paths: list[str]) -> SlotCgroup:
        """Rebuild from the paths a descriptor carries (client side, no detect)."""
        roots = tuple(os.path.dirname(os.path.dirname(p)) for p in paths)
        parent = os.path.basename(os.path.dirname(paths[0])) if paths else ""
        name = os.path.basename(paths[0]) if paths else ""
        version = 2 if len(paths) == 1 else 1
        return cls(Layout(version, roots), parent, name)

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self.paths)

    def create(self, memory_limit: int | None, pids_limit: int | None) -> None:
        """Make the cgroup (again, if a crash left it) and set its limits."""
        for root, path in zip(self.layout.roots, self.paths, strict=True):
            parent = os.path.join(root, self.parent)
            os.makedirs(parent, exist_ok=True)
            if self.layout.version == 2:
                # v2 only hands a controller to children whose parents all enabled it.
                for d in (root, parent):
                    enabled = _read(os.path.join(d, "cgroup.subtree_control")).split()
                    want = [c for c in _CONTROLLERS if c not in enabled]
                    if want:
                        _write(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in want))
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
        self._limits(memory_limit, pids_limit)

    def _limits(self, memory_limit: int | None, pids_limit: int | None) -> None:
        mem = str(memory_limit) if memory_limit else None
        pids = str(pids_limit) if pids_limit else "max"
        if self.layout.version == 2:
            path = self.paths[0]
            _write(os.path.join(path, "memory.max"), mem or "max")
            with contextlib.suppress(FileNotFoundError):  # no swap accounting configured
                _write(os.path.join(path, "memory.swap.max"), "0" if mem else "max")
            _write(os.path.join(path, "pids.max"), pids)
            return
        mem_path, pids_path = self.paths
        # v1 wants memsw >= limit at every moment: raise memsw first when
        # lifting, lower the plain limit first when tightening.
        unlimited = "-1"
        memsw = os.path.join(mem_path, "memory.memsw.limit_in_bytes")
        has_memsw = os.path.exists(memsw)
        if mem is None:
            if has_memsw:
                _write(memsw, unlimited)
            _write(os.path.join(mem_path, "memory.limit_in_bytes"), unlimited)
        else:
            if has_memsw:
                with contextlib.suppress(OSError):
                    _write(memsw, unlimited)
            _write(os.path.join(mem_path, "memory.limit_in_bytes"), mem)
            if has_memsw:
                _write(memsw, mem)  # no escape into swap
        _write(os.path.join(pids_path, "pids.max"), pids)

    def join_self(self) -> None:
        """Move the calling process in; run in a child between fork and exec,
        so that nothing the instance starts is ever outside the cgroup."""
        for path in self.paths:
            _write(os.path.join(path, "cgroup.procs"), "0")

    def procs(self) -> set[int]:
        """Pids in the cgroup (every hierarchy; empty when it is gone)."""
        out: set[int] = set()
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in _read(os.path.join(path, "cgroup.procs")).split():
                    out.add(int(line))
        return out

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL everything inside and wait until it is empty. Repeated
        rounds catch children forked between reading the list and the kill;
        they converge because a killed process forks no more."""
        deadline = time.monotonic() + timeout
        if self.layout.version == 2:
            with contextlib.suppress(FileNotFoundError, OSError):
                _write(os.path.join(self.paths[0], "cgroup.kill"), "1")
        delay = 0.0005
        seen: dict[int, int | None] = {}
        while True:
            pids = self.procs()
            for pid in pids:
                seen.setdefault(pid, start_time(pid))
            if not pids:
                # A task leaves the cgroup early in exit(); wait for the
                # rest of its death too, so that "terminated" means gone.
                pids = {pid for pid, start in seen.items() if ProcessIdentity(pid, start).alive()}
                if not pids:
                    return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise StepFailed(f"cgroup {self.name}: processes {sorted(pids)} survived SIGKILL for {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left and rmdir the cgroup in every hierarchy."""
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for path in self.paths:
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY: the last task has exited but is not yet uncharged.
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise StepFailed(f"cannot remove cgroup {path}: {exc}") from None
                    time.sleep(0.002)


# -- discovery for tools that place cgroups themselves (OCI runtimes) ------------

UNIFIED = "/sys/fs/cgroup/unified"


def roots() -> list[str]:
    """Mount points of every cgroup hierarchy (v1 and v2)."""
    return [mp for mp, fstype, _s, _o in mount_table() if fstype in ("cgroup", "cgroup2")]


def hybrid() -> bool:
    """v1 controllers plus a v2 mount at /sys/fs/cgroup/unified (crun 1.8
    refuses this layout)."""
    types = {mp: fstype for mp, fstype, _s, _o in mount_table()}
    return types.get(UNIFIED) == "cgroup2" and types.get("/sys/fs/cgroup") != "cgroup2"


def limits_available() -> str | None:
    """None when memory and pids limits can be enforced here, else why not."""
    try:
        detect()
    except KindUnavailable as exc:
        return str(exc)
    return None


def membership(pid: int | str) -> str:
    """The text of /proc/<pid>/cgroup ('' when gone); ``pid`` may be "self"."""
    try:
        return _read(f"/proc/{pid}/cgroup")
    except OSError:
        return ""


def hierarchy_paths(cgroup_text: str) -> dict[str, str]:
    """Map each hierarchy's mount point to the path a /proc/<pid>/cgroup
    text names in it. v1 hierarchies are matched by their controllers (the
    mount's super options), not by the mount point's name."""
    by_ctrls: dict[frozenset[str], str] = {}
    v2 = None
    for line in cgroup_text.splitlines():
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and ctrls == "":
            v2 = path
        else:
            by_ctrls[frozenset(ctrls.split(","))] = path
    out: dict[str, str] = {}
    for mp, fstype, _s, opts in mount_table():
        if fstype == "cgroup2" and v2 is not None:
            out[mp] = v2
        elif fstype == "cgroup":
            names = {o for o in opts.split(",") if (o not in ("rw", "ro") and "=" not in o) or o.startswith("name=")}
            for ctrl_set, cpath in by_ctrls.items():
                if ctrl_set and ctrl_set <= names:
                    out[mp] = cpath
    return out


def procs_below(path: str) -> list[int]:
    """Pids in the cgroup at ``path`` and every cgroup below it."""
    pids: list[int] = []
    for dirpath, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.extend(int(x) for x in _read(os.path.join(dirpath, "cgroup.procs")).split())
    return pids


def rmdir_tree(path: str) -> None:
    """rmdir a cgroup and its children, deepest first (cgroupfs has no rm -r)."""
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)
