"""Starting an instance process detached from the worker that starts it.

A worker may die (or be killed as stuck) at any moment, and it must not take
its instances with it, nor be their parent: the worker forks a short-lived
middle process, which starts the launched one and exits, so that it is
reparented to the nearest subreaper (the pool supervisor), which reaps it.
It leads a new session and process group, so that its pid is also the id
of the group that ``ProcessIdentity.kill_tree`` kills. Its stdout and
stderr go to a log file whose tail explains a failed start; the pid and its
start time go to a pidfile, the way back to it after a crash.

The middle process starts it with ``posix_spawn`` (a vfork and exec in the
C library), not a second fork: forking copies the page tables of a whole
Python process, which is most of a launch's cost on the host side.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence

from noodle.errors import StepFailed
from noodle.host.proc import ProcessIdentity, start_time

#: with ``pass_fd``, the launched process finds that descriptor here
PASSED_FD = 3
_HIGH_FD = 64  # where descriptors are parked while 0-3 are placed
_PID_BYTES = 8
_DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def launch_detached(
    argv: Sequence[str],
    log_path: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pass_fd: int = -1,
    in_child: Callable[[], None] | None = None,
    truncate_log: bool = False,
    log_mode: int = 0o600,
) -> ProcessIdentity:
    """Start ``argv`` detached (see the module docstring) and return it.

    stdin is /dev/null, stdout and stderr append to ``log_path``, ``pass_fd``
    (if any) becomes descriptor 3 and every other descriptor of the worker
    is closed. ``in_child`` runs in the middle process before it starts the
    launched one, which inherits what it did (joining a cgroup, so that
    nothing the instance starts is ever outside it): only async-signal-safe
    work. ``env`` None keeps ours; an empty one gets only a default PATH."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate_log else os.O_APPEND)
    log_fd = os.open(log_path, flags, log_mode)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    full_env = dict(os.environ) if env is None else (dict(env) or {"PATH": _DEFAULT_PATH})
    try:
        middle = os.fork()
        if middle == 0:  # pragma: no cover - runs in the forked child
            _middle(list(argv), full_env, cwd, log_fd, pid_w, pass_fd, in_child)
        os.close(pid_w)
        pid_w = -1
        while True:
            try:
                os.waitpid(middle, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
        # the middle process writes the pid once the exec succeeded, nothing
        # when it failed (the cause is then in the log)
        data = read_exact(pid_r, _PID_BYTES, 5.0)
    finally:
        os.close(pid_r)
        if pid_w >= 0:
            os.close(pid_w)
        os.close(log_fd)
    if len(data) != _PID_BYTES:
        raise StepFailed(f"could not start {argv[0]}: {log_tail(log_path) or 'no pid reported'}")
    pid = int.from_bytes(data, "little")
    return ProcessIdentity(pid, start_time(pid))


def _middle(
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    log_fd: int,
    pid_w: int,
    pass_fd: int,
    in_child: Callable[[], None] | None,
) -> None:  # pragma: no cover - runs in the forked child
    try:
        if cwd is not None:
            os.chdir(cwd)
        if in_child is not None:
            in_child()
        # park what we keep above the targets, so that no dup2 overwrites
        # one not placed yet: 0 null, 1+2 log, 3 the passed descriptor,
        # which the launched process inherits; the pid pipe is ours only
        pid_w = fcntl.fcntl(pid_w, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
        log_hi = fcntl.fcntl(log_fd, fcntl.F_DUPFD, _HIGH_FD)
        passed_hi = fcntl.fcntl(pass_fd, fcntl.F_DUPFD, _HIGH_FD) if pass_fd >= 0 else -1
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_hi, 1)
        os.dup2(log_hi, 2)
        last = 2
        if passed_hi >= 0:
            os.dup2(passed_hi, PASSED_FD)
            last = PASSED_FD
        # nothing of the worker (queues, segments, sockets) leaks inside
        os.closerange(last + 1, pid_w)
        os.closerange(pid_w + 1, 65536)
        log_fd = 2
        # the launched process inherits this mask: a clean one
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # setsid in the launched process: its pid is then the id of its
        # session and process group
        pid = os.posix_spawn(argv[0], argv, env, setsid=True)
        os.write(pid_w, pid.to_bytes(_PID_BYTES, "little"))
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return into the worker
        with contextlib.suppress(BaseException):
            os.write(log_fd, f"noodle launcher: cannot run {argv[0]}: {exc!r}\n".encode())
    os._exit(127)


def read_exact(fd: int, n: int, timeout: float) -> bytes:
    """Up to ``n`` bytes from ``fd``: fewer at EOF or after ``timeout``."""
    deadline = time.monotonic() + timeout
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def log_tail(path: str, limit: int = 800) -> str:
    """The last ``limit`` bytes of a log, stripped; '' when it is missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def write_pidfile(path: str, proc: ProcessIdentity) -> None:
    """``<pid> <start>``, replaced atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{proc.pid} {proc.start or 0}\n")
    os.replace(tmp, path)


def read_pidfile(path: str) -> ProcessIdentity | None:
    """What ``write_pidfile`` wrote; None when missing or unreadable. A
    recorded start of 0 (unknown) is kept: it matches no live process."""
    try:
        with open(path, encoding="ascii") as f:
            pid_s, start_s = f.read().split()[:2]
        pid, start = int(pid_s), int(start_s)
    except (OSError, ValueError):
        return None
    return ProcessIdentity(pid, start or None) if pid > 0 else None
