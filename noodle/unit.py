"""systemd units printed by ``noodle unit``.

``noodle unit`` prints the supervisor's template unit ``noodle@.service``
(one instance per pool, ``systemctl enable --now noodle@POOL``), hardened for
the ``process`` kind; ``noodle unit --kind K`` prints the drop-in that gives
back what a sandbox kind needs. Other modules add units of their own with
:func:`register` (``noodle unit NAME``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitOptions:
    user: str = ""
    group: str = ""
    kind: str = ""


@dataclass(frozen=True)
class Unit:
    name: str  # the file name to install it as
    render: Callable[[UnitOptions], str]
    dropin: Callable[[UnitOptions], str] | None = None


UNITS: dict[str, Unit] = {}


def register(key: str, unit: Unit) -> None:
    UNITS[key] = unit


def noodle_command() -> list[str]:
    """argv of the installed ``noodle`` command, by real path: the running
    console script, else the one beside this interpreter (a venv), else the
    one on PATH, else this interpreter with ``-m noodle``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "noodle" and os.path.isfile(argv0):
        return [os.path.realpath(argv0)]
    beside = os.path.join(os.path.dirname(sys.executable), "noodle")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [os.path.realpath(beside)]
    found = shutil.which("noodle")
    if found:
        return [os.path.realpath(found)]
    # the venv's interpreter is a symlink to the system one: keep its own path
    return [os.path.abspath(sys.executable), "-m", "noodle"]


def exec_line(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _under_home(paths: list[str]) -> bool:
    return any(p.startswith(("/home/", "/root/", "/run/user/")) for p in paths)


def supervisor_unit(opts: UnitOptions) -> str:
    cmd = noodle_command()
    exec_start = exec_line([*cmd, "run", "--name", "%i", "--config", "/etc/noodle/%i.toml"])
    root = opts.user in ("", "root", "0")
    user_lines = "".join(f"{k}={v}\n" for k, v in (("User", opts.user), ("Group", opts.group)) if v)
    # the interpreter and its packages may live in a home directory (a venv, pipx)
    home = "read-only" if _under_home([*cmd, os.path.realpath(sys.executable), sys.prefix]) else "yes"
    caps = _ROOT_CAPS if root else ""
    # a service user cannot use privileged calls anyway; root needs setuid/chown for kinds.process.uid
    deny = "" if root else "SystemCallFilter=~@privileged\n"
    return _SUPERVISOR.format(exec_start=exec_start, user_lines=user_lines, protect_home=home, caps=caps,
                              deny=deny)  # fmt: skip


# What the process kind needs as root: instances may run under another uid
# (kinds.process.uid), and their run directories are chowned to it.
_ROOT_CAPS = "CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_KILL CAP_SETUID CAP_SETGID"

_SUPERVISOR = """\
# pool-noodle supervisor, one unit instance per pool:
#   noodle unit > /etc/systemd/system/noodle@.service
#   mkdir -p /etc/noodle && $EDITOR /etc/noodle/POOL.toml      # pool_size = 8 ...
#   noodle unit --kind jail > /etc/systemd/system/noodle@POOL.service.d/kind.conf   # sandbox kinds only
#   systemctl daemon-reload && systemctl enable --now noodle@POOL
# Hardened for the process kind (which isolates nothing: do not run untrusted
# code in it). Never add PrivateIPC=yes or PrivateDevices=yes: they give the
# service its own POSIX message queues and /dev/shm, so executors could no
# longer reach the pool. ProtectProc=invisible would hide executors of other
# users, whose leases the supervisor would then reclaim as dead.
[Unit]
Description=pool-noodle warm instance pool %i
Documentation=https://pypi.org/project/pool-noodle/
After=local-fs.target
# a crash loop stops after 5 starts in 60 s
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
# READY=1 once the workers run, STATUS= with the fill, STOPPING=1 on stop
Type=notify
NotifyAccess=main
ExecStart={exec_start}
{user_lines}# SIGTERM to the supervisor only: it drains leases, stops its workers and
# instances itself; whatever is left after TimeoutStopSec gets SIGKILL
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=120
# the supervisor pings at half this period from its main loop
WatchdogSec=30
Restart=on-failure
RestartSec=2
# exit 2 is a usage or configuration error: retrying will not fix it
RestartPreventExitStatus=2
# everything instances and workers create is owner/group-only
UMask=0007
# the run directory (sockets, per-slot directories) is /run/noodle/POOL
RuntimeDirectory=noodle
RuntimeDirectoryPreserve=yes
# sandbox kinds create per-slot cgroups (cgroup v2: below the service's own)
Delegate=yes

NoNewPrivileges=yes
CapabilityBoundingSet={caps}
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
{deny}SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def supervisor_dropin(opts: UnitOptions) -> str:
    kind = opts.kind or "process"
    body = _DROPINS.get(kind)
    if body is None:
        return (f"# kind {kind!r} has no drop-in here: start from the jail one (`noodle unit --kind jail`)\n"
                "# and give back what its tools need\n")  # fmt: skip
    return f"# noodle@POOL.service for the {kind} kind:\n#   {_INSTALL_HINT.format(kind=kind)}\n" + body


_INSTALL_HINT = (
    "mkdir -p /etc/systemd/system/noodle@POOL.service.d && noodle unit --kind {kind} "
    "> /etc/systemd/system/noodle@POOL.service.d/{kind}.conf"
)

# What every sandbox kind gives back: namespaces, mounts, its cgroups, and
# the capabilities a sandbox runtime started as root uses to build one.
_SANDBOX = """\
[Service]
# sandbox runtimes create namespaces, mount, pivot_root and install their own seccomp filters
RestrictNamespaces=no
SystemCallFilter=
SystemCallErrorNumber=
# the kinds create per-slot memory/pids cgroups
ProtectControlGroups=no
# proc mounted inside a user namespace must see an unmasked /proc (the kernel refuses otherwise)
ProtectKernelTunables=no
ProtectKernelLogs=no
# loopback set up inside each network namespace
RestrictAddressFamilies=AF_NETLINK
"""

# bubblewrap or unshare as root: namespaces and mounts, chroot, dropping
# its own capabilities, bringing up lo in the new network namespace
_JAIL_CAPS = "CAP_SYS_ADMIN CAP_SYS_CHROOT CAP_SETPCAP CAP_NET_ADMIN"

_DROPINS = {
    "process": "# nothing to add: the unit is hardened for this kind\n",
    "jail": _SANDBOX + f"CapabilityBoundingSet={_JAIL_CAPS}\n",
    "command": _SANDBOX
    + "# what the example bubblewrap scripts need; scripts of your own may need more\n"
    + f"CapabilityBoundingSet={_JAIL_CAPS}\n",
    "oci": _SANDBOX
    + "# runc, crun, runsc as root (the containers get no capabilities); crun makes /dev nodes\n"
    + f"CapabilityBoundingSet={_JAIL_CAPS} CAP_MKNOD\n"
    + "# the runtimes' state (--root) lives in /run/runc, /run/crun, /run/runsc, read-only otherwise\n"
    + "RuntimeDirectory=runc crun runsc\n",
    "microvm": """\
[Service]
# QEMU uses KVM when it works (TCG otherwise)
DeviceAllow=/dev/kvm rw
""",
}


register("pool", Unit("noodle@.service", supervisor_unit, supervisor_dropin))
