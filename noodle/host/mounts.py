"""mount(2)/umount2(2) without a subprocess, and finding mounts by place.

A ``mount`` binary costs about a millisecond per call; a slot is prepared
and cleaned for every single-use instance, so the syscalls are called
directly through libc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

from noodle.errors import StepFailed

MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def mount(source: str, target: str, fstype: str, options: str, flags: int = 0) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise StepFailed(f"mount {fstype} {source} on {target} ({options}): {os.strerror(err)}")


def umount(target: str, detach: bool = False) -> None:
    rc = _libc.umount2(target.encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode()
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and i + 3 < len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def mountinfo(path: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """(mount point, fs type, source, super options) for each mount, in mount order."""
    out: list[tuple[str, str, str, str]] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            out.append((_unescape(fields[4]), rfields[0], _unescape(rfields[1]), rfields[2]))
    return out


@functools.cache
def mount_table() -> tuple[tuple[str, str, str, str], ...]:
    """``mountinfo()`` read once per process, for what does not move under
    a running pool (the cgroup hierarchies)."""
    return tuple(mountinfo())


def private_namespace_without(path: str) -> None:
    """In a forked child before exec: enter a private mount namespace and
    detach ``path`` there. Only async-signal-safe libc calls on symbols
    resolved at import (a crun on a hybrid cgroup host needs this)."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        os._exit(125)
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        os._exit(125)
    _libc.umount2(path.encode(), MNT_DETACH)


def mounts_under(directory: str, source: str | None = None) -> list[str]:
    """Mount points at or below ``directory`` (or whose source is ``source``),
    deepest and latest first, the order they must be unmounted in."""
    base = os.path.realpath(directory).rstrip("/") + "/"
    found = [
        point
        for point, _, src, _ in mountinfo()
        if (point + "/").startswith(base) or (source is not None and src == source)
    ]
    found.reverse()
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def unmount_all(directory: str, source: str | None = None) -> None:
    """Unmount everything at or below ``directory``; a mount still busy
    (a process of a dying sandbox holding it) is detached lazily so that
    it disappears from the tree at once and is freed when released."""
    for _ in range(8):
        points = mounts_under(directory, source)
        if not points:
            return
        for point in points:
            try:
                umount(point)
            except OSError:
                try:
                    umount(point, detach=True)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # already gone
                        raise StepFailed(f"cannot unmount {point}: {exc}") from None
    left = mounts_under(directory, source)
    if left:
        raise StepFailed(f"mounts remain after unmounting: {left}")
