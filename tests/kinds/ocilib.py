"""What an oci slot leaves on the host, for tests and benchmarks that check
nothing leaks (the kind itself never needs this)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from noodle.host import cgroup
from noodle.host.mounts import mountinfo
from noodle.kinds.oci import DEFAULT_ROOTS, container_id


def leftovers(pool: str, slot: int, runtime: str, state_root: str | None = None) -> list[str]:
    """Everything of a slot's container still on the host: state entries,
    cgroup directories, live processes whose cgroup names it. For tests and
    leak checks; empty means clean."""
    cid = container_id(pool, slot)
    root = state_root or DEFAULT_ROOTS[runtime]
    found: list[str] = []
    if runtime == "runsc":
        found += glob.glob(os.path.join(glob.escape(root), glob.escape(cid) + "_sandbox:*"))
    elif os.path.lexists(os.path.join(root, cid)):
        found.append(os.path.join(root, cid))
    found += _find_cgroups(cid)
    found += [f"pid {p}" for p in _pids_in_cgroup_named(cid)]
    found += [f"mount {mp}" for mp, _t, _s, _o in mountinfo() if f"/{cid}/" in mp + "/"]
    return found


def _find_cgroups(cid: str) -> list[str]:
    out = []
    for root in cgroup.roots():
        for dirpath, dirs, _files in _walk_limited(root, 6):
            if cid in dirs:
                out.append(os.path.join(dirpath, cid))
    return out


def _walk_limited(root: str, depth: int) -> Iterator[tuple[str, list[str], list[str]]]:
    base = root.rstrip("/").count("/")
    for dirpath, dirs, files in os.walk(root):
        yield dirpath, dirs, files
        if dirpath.count("/") - base >= depth:
            dirs[:] = []


def _pids_in_cgroup_named(cid: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                text = f.read()
        except OSError:
            continue
        if any(line.rstrip("/").endswith("/" + cid) for line in text.splitlines()):
            out.append(int(entry))
    return out
