"""The refill's share of the CPU: the autogroup nice value of the pool's session.

With ``kernel.sched_autogroup_enabled`` (the default on desktop and server
kernels alike) the scheduler shares the CPU between *sessions* first, then
between the processes of each. A pool's refill work (supervisor, workers,
and for the ``process`` kind its zygote and the instances still warming,
which leave the session only once ready) is one session; each instance that serves a lease, and the
executor calling it, are others. Raising the nice value of the pool's
autogroup makes the refill yield to the jobs when they compete for a core,
without touching the nice value, and so the priority, any instance
inherits. It applies only to processes in the root CPU cgroup (autogroups
are not used inside a cgroup with its own CPU share, e.g. a container),
and only when the supervisor leads its session: otherwise the autogroup
is its caller's (a shell, a test runner) and not the pool's to change.
"""

from __future__ import annotations

import errno
import os
import time

AUTOGROUP_SWITCH = "/proc/sys/kernel/sched_autogroup_enabled"


class RefillNiceError(OSError):
    """Writing ``/proc/self/autogroup`` failed (raised by set_session_nice)."""


def set_session_nice(nice: int) -> str | None:
    """Set this session's autogroup nice value to ``nice`` (0..19).

    Returns why nothing was changed (a sentence for the log), or None when
    the value is set. Raises RefillNiceError when the kernel refuses the
    write for another reason than its rate limit."""
    if nice == 0:
        return "refill_nice is 0"
    if os.getsid(0) != os.getpid():
        return "the supervisor does not lead its session (it shares its caller's autogroup)"
    try:
        with open(AUTOGROUP_SWITCH) as f:
            if f.read().strip() != "1":
                return "autogroups are off (kernel.sched_autogroup_enabled = 0)"
    except OSError:
        return "this kernel has no autogroups"
    # Without CAP_SYS_ADMIN the kernel takes one such write per 100 ms,
    # host-wide, and answers EAGAIN to the rest.
    for _ in range(10):
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
            return None
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                what = f"setting the pool's autogroup nice to {nice}: {exc.strerror}"
                raise RefillNiceError(exc.errno, what) from None
        time.sleep(0.11)
    return "the kernel's rate limit on autogroup changes held for a second"


def session_nice(pid: int, proc: str = "/proc") -> int | None:
    """The autogroup nice value of ``pid``'s session ("/autogroup-N nice K"),
    None where there is none to read."""
    try:
        with open(os.path.join(proc, str(pid), "autogroup")) as f:
            words = f.read().split()
    except OSError:
        return None
    try:
        return int(words[words.index("nice") + 1])
    except (ValueError, IndexError):
        return None
