"""Process identity helpers: a pid alone is not an identity (pids are
reused), a (pid, start time) pair is."""

from __future__ import annotations

import contextlib
import os
import signal


def start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0
    # comm may hold spaces and parentheses: fields resume after the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return 0


def state_of(pid: int) -> str:
    """One-letter /proc state ('R', 'S', 'Z', ...), '' if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    rest = raw[raw.rfind(b")") + 2 :].split()
    return rest[0].decode() if rest else ""


def is_alive(pid: int, start: int = 0) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, started at ``start``."""
    if pid <= 0:
        return False
    st = start_time(pid)
    if st == 0 or (start and st != start):
        return False
    return state_of(pid) not in ("Z", "X", "")


def kill_verified(pid: int, start: int, sig: int = signal.SIGKILL, group: bool = False) -> bool:
    """Signal ``pid`` (or its process group) only if it is still the process
    that started at ``start``; False when it is already gone."""
    if pid <= 0 or start_time(pid) != start:
        return False
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


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
