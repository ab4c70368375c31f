"""A per-slot cgroup with memory and pids limits.

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
from noodle.kinds._mounts import mountinfo

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
    mounts = [(point, fstype, opts) for point, fstype, _, opts in mountinfo()]
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
                seen.setdefault(pid, pid_start_time(pid))
            if not pids:
                # A task leaves the cgroup early in exit(); wait for the
                # rest of its death too, so that "terminated" means gone.
                pids = {pid for pid, start in seen.items() if same_process(pid, start)}
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


def pid_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of stat),
    or None when it is gone or a zombie. Pairs with the pid so that a
    reused pid is never signalled."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    if not rest or rest[0] == b"Z":
        return None
    return int(rest[19])


def same_process(pid: int, start: int | None) -> bool:
    return pid > 0 and start is not None and pid_start_time(pid) == start


def _scan_procs() -> dict[int, tuple[int, int, int | None]]:
    """Every process on the host: pid -> (ppid, pgid, start time or None
    for a zombie)."""
    out: dict[int, tuple[int, int, int | None]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) < 20:
            continue
        start = None if rest[0] in (b"Z", b"X") else int(rest[19])
        out[int(name)] = (int(rest[1]), int(rest[2]), start)
    return out


def kill_process_tree(pid: int, start: int | None, grace: float = 0.0, timeout: float = 10.0) -> None:
    """Kill the instance ``pid`` started at ``start`` with everything it
    runs, and wait until all of it is gone (a zombie counts as gone: the
    subreaper collects it).

    "Everything" is the process group ``pid`` leads (the launchers call
    setsid in the process they exec) and every descendant of a process
    already found, so that children which left the group (setsid) go too
    while they are still below the instance. The group is killed even when
    its leader has already died, unless ``pid`` now names another live
    process: a pid cannot be reused while a group of that id has members,
    so a dead leader's group holds only the instance's stragglers.

    With ``grace`` > 0, SIGTERM first and SIGKILL after ``grace`` seconds
    (stragglers get SIGKILL as soon as the leader is gone); StepFailed when
    something survives SIGKILL for ``timeout`` seconds.
    """
    if pid <= 0:
        return
    current = pid_start_time(pid)
    if current is not None and current != start:
        return  # pid reused by another process (or start unknown): not ours
    tracked: dict[int, int] = {pid: current} if current is not None else {}

    def live() -> dict[int, int]:
        procs = _scan_procs()
        leader = procs.get(pid)
        if leader is None or leader[2] is None or leader[2] == start:  # the pid is not reused
            for p, (_ppid, pgid, s) in procs.items():
                if pgid == pid and s is not None:
                    tracked.setdefault(p, s)
        grown = True
        while grown:  # descendants of anything tracked and still the same process
            grown = False
            for p, (ppid, _pgid, s) in procs.items():
                if s is None or p in tracked or ppid not in tracked:
                    continue
                parent = procs.get(ppid)
                if parent is not None and parent[2] == tracked[ppid]:
                    tracked[p] = s
                    grown = True
        return {p: s for p, s in tracked.items() if (info := procs.get(p)) is not None and info[2] == s}

    def signal_all(procs: dict[int, int], sig: int) -> None:
        leader = pid_start_time(pid)
        if leader is None or leader == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        for p, s in procs.items():
            if pid_start_time(p) == s:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)

    phases = ([(signal.SIGTERM, grace)] if grace > 0 else []) + [(signal.SIGKILL, timeout)]
    procs = live()
    for sig, wait in phases:
        if not procs:
            return
        signal_all(procs, sig)
        deadline = time.monotonic() + wait
        delay = 0.0005
        while True:
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
            procs = live()
            if not procs:
                return
            if time.monotonic() > deadline:
                break
            if sig == signal.SIGKILL or pid not in procs:
                # new children forked meanwhile; after the leader, stragglers go at once
                signal_all(procs, signal.SIGKILL)
    raise StepFailed(f"processes {sorted(procs)} of instance {pid} survived SIGKILL for {timeout} s")
