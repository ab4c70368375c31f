"""Process identity: a ``(pid, start time)`` pair.

Pids are reused quickly (pid_max may be 32768), so checking or signalling a
process by pid alone can hit an unrelated one: a security boundary when the
pid came from an instance. Everything that acts on a process it did not
just fork goes through :class:`ProcessIdentity`, which only matches the
process that started at the recorded time:

* a missing start time (``None`` or ``0``) never matches;
* a zombie counts as gone (it runs nothing; its reaper collects it).

This module is the only place that parses ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

_DEAD_STATES = ("Z", "X", "x")


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/<pid>/stat`` the pool uses."""

    state: str  # one letter: R, S, D, T, Z, ...
    ppid: int
    pgid: int
    start: int  # clock ticks since boot

    @property
    def dead(self) -> bool:
        return self.state in _DEAD_STATES


def read_stat(pid: int) -> Stat | None:
    """``pid``'s stat, zombies included; None when there is no such pid."""
    if pid <= 0:
        return None
    # os-level calls, no file objects: a freshly forked instance reads its
    # own stat, and every page the read writes is a copy-on-write fault
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)  # comm is at most 64 bytes: the line fits
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm may hold spaces and parentheses: the fields resume after the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return Stat(rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[19]))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def start_time(pid: int) -> int | None:
    """Start time of a running ``pid`` (clock ticks since boot); None when it
    is gone or a zombie."""
    st = read_stat(pid)
    return None if st is None or st.dead else st.start


def state_of(pid: int) -> str:
    """One-letter state ('R', 'S', 'Z', ...), '' if gone."""
    st = read_stat(pid)
    return "" if st is None else st.state


def is_alive(pid: int, start: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie). With ``start`` this is
    ``ProcessIdentity(pid, start).alive()``: a start of 0 never matches."""
    if start is not None:
        return ProcessIdentity(pid, start).alive()
    return start_time(pid) is not None


def scan() -> dict[int, Stat]:
    """Every process on the host."""
    out: dict[int, Stat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := read_stat(int(name))) is not None:
            out[int(name)] = st
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads' children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    return out


def descendants_of(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children_of(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


@dataclass(frozen=True)
class ProcessIdentity:
    """One process: its pid and the start time it had when recorded."""

    pid: int
    start: int | None

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the process running as ``pid`` now, if any."""
        start = start_time(pid)
        return None if start is None else cls(pid, start)

    @classmethod
    def from_record(cls, pid: object, start: object) -> ProcessIdentity | None:
        """From untrusted values (a descriptor, a pidfile): None unless both
        are positive integers."""
        if type(pid) is not int or type(start) is not int or pid <= 0 or start <= 0:
            return None
        return cls(pid, start)

    def alive(self) -> bool:
        """Still running, and still the same process (not a reused pid)."""
        if not self.start:
            return False
        st = read_stat(self.pid)
        return st is not None and not st.dead and st.start == self.start

    def signal(self, sig: int = signal.SIGKILL, group: bool = False) -> bool:
        """Send ``sig`` to the process (or the group it leads) if it is still
        this one; False when it is gone or may not be signalled."""
        if not self.alive():
            return False
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def wait_gone(self, timeout: float, reap: bool = False) -> bool:
        """Wait until it is gone (a zombie counts as gone); True if it went."""
        return wait_gone([self], timeout, reap)

    def kill(self, timeout: float = 10.0) -> bool:
        """SIGKILL and wait until gone; False if it outlived ``timeout``."""
        self.signal(signal.SIGKILL)
        return self.wait_gone(timeout)

    def kill_tree(self, grace: float = 0.0, timeout: float = 10.0) -> None:
        """Kill the instance this process leads with everything it runs and
        wait until all of it is gone (a zombie counts as gone: the subreaper
        collects it).

        "Everything" is the process group it leads (launchers setsid in the
        process they exec) and every descendant of a process already found,
        so that children which left the group (setsid) go too while they are
        still below the instance. The group is killed even when its leader
        has already died, unless the pid now names another live process: a
        pid cannot be reused while a group of that id has members, so a dead
        leader's group holds only the instance's stragglers.

        With ``grace`` > 0, SIGTERM first and SIGKILL after ``grace`` seconds
        (stragglers get SIGKILL as soon as the leader is gone); StepFailed
        when something survives SIGKILL for ``timeout`` seconds.
        """
        _kill_tree(self.pid, self.start or None, grace, timeout)


def wait_gone(procs: Iterable[ProcessIdentity], timeout: float, reap: bool = False) -> bool:
    """Wait until none of ``procs`` runs (a zombie counts as gone). With
    ``reap`` (we are their parent or subreaper) zombies are collected too:
    some tools wait for a pid to vanish, which a zombie never does.

    One process is watched through a pidfd, which turns readable the moment
    it exits, so a terminate takes the kill's real time rather than a
    polling interval; several are polled with a growing sleep. The identity
    check in the loop stays the judge: a pidfd opened on a pid that was
    reused meanwhile only shortens the sleep."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    delay = 0.0005
    watch = _ExitWatch.open(procs[0].pid) if len(procs) == 1 else None
    try:
        while True:
            if reap:
                for p in procs:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(p.pid, os.WNOHANG)
            if not any(p.alive() for p in procs):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if watch is not None:
                watch.wait(min(left, 0.05))
            else:
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.02)
    finally:
        if watch is not None:
            watch.close()


class _ExitWatch:
    """A pidfd and a poller on it: readable once the process has exited."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    @classmethod
    def open(cls, pid: int) -> _ExitWatch | None:
        try:
            return cls(os.pidfd_open(pid))
        except OSError:  # gone already, or no pidfd on this kernel: poll
            return None

    def wait(self, seconds: float) -> None:
        self.poller.poll(seconds * 1000.0)

    def close(self) -> None:
        os.close(self.fd)


def _kill_tree(pid: int, start: int | None, grace: float, timeout: float) -> None:
    if pid <= 0:
        return
    current = start_time(pid)
    if current is not None and current != start:
        return  # pid reused by another process (or start unknown): not ours
    tracked: dict[int, int] = {pid: current} if current is not None else {}

    def live() -> dict[int, int]:
        procs = scan()
        leader = procs.get(pid)
        if leader is None or leader.dead or leader.start == start:  # the pid is not reused
            for p, st in procs.items():
                if st.pgid == pid and not st.dead:
                    tracked.setdefault(p, st.start)
        grown = True
        while grown:  # descendants of anything tracked and still the same process
            grown = False
            for p, st in procs.items():
                if st.dead or p in tracked or st.ppid not in tracked:
                    continue
                parent = procs.get(st.ppid)
                if parent is not None and not parent.dead and parent.start == tracked[st.ppid]:
                    tracked[p] = st.start
                    grown = True
        out: dict[int, int] = {}
        for p, s in tracked.items():
            now = procs.get(p)
            if now is not None and not now.dead and now.start == s:
                out[p] = s
        return out

    def signal_all(procs: dict[int, int], sig: int) -> None:
        leader = start_time(pid)
        if leader is None or leader == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        for p, s in procs.items():
            ProcessIdentity(p, s).signal(sig)

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
    # imported here: the process kind's zygote loads this module by its path,
    # without the noodle package (see noodle.kinds.zygote)
    from noodle.errors import StepFailed

    raise StepFailed(f"processes {sorted(procs)} of instance {pid} survived SIGKILL for {timeout} s")
