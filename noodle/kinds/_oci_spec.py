"""config.json generation for the ``oci`` kind.

Kept apart from the kind so the spec can be read (and tested) as data: one
function, no I/O. Everything a slot's container may touch is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Mount points inside the container; the kind and the tests share them.
AGENT_DIR = "/noodle"
AGENT_PATH = "/noodle/agent.py"
SOCKET_DIR = "/run/noodle"
SOCKET_NAME = "agent.sock"

# Kernel surfaces a sandboxed process has no business reading or writing,
# the same list runc's and Docker's default specs mask.
_MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
_READONLY = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


@dataclass(frozen=True)
class SpecParams:
    """What differs between slots and pools; the rest is fixed policy."""

    rootfs: str
    host_usr: str  # host directory bind-mounted read-only over /usr (Python lives there)
    agent_dir: str  # host directory holding agent.py, bind-mounted read-only
    socket_dir: str  # the slot's host socket directory, the only writable bind mount
    python: str  # interpreter path inside the container
    uid: int
    gid: int
    memory_bytes: int
    pids_max: int
    tmpfs_bytes: int
    cgroups_path: str | None  # None: no cgroup (limits not enforced)
    hostname: str = "noodle"
    runsc: bool = False


def build_spec(p: SpecParams) -> dict[str, Any]:
    """The OCI runtime spec (1.0.2) for one slot's container."""
    # no site (-S): its .pth files cost milliseconds of every start, and the
    # agent needs only the standard library (as in the jail kind)
    args = [p.python, "-I", "-S", "-B", AGENT_PATH, "--socket", f"{SOCKET_DIR}/{SOCKET_NAME}"]
    nosuid_ro = ["rbind", "ro", "nosuid", "nodev"]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=16m"],
        },
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        # The rootfs is read-only; scratch space is memory-backed and bounded,
        # so nothing a job writes reaches the host's disk or outlives the slot.
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={p.tmpfs_bytes}"],
        },
        {"destination": "/usr", "type": "bind", "source": p.host_usr, "options": nosuid_ro},
        {"destination": AGENT_DIR, "type": "bind", "source": p.agent_dir, "options": nosuid_ro},
        {
            "destination": SOCKET_DIR,
            "type": "bind",
            "source": p.socket_dir,
            "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
        },
    ]
    if not p.runsc:
        # gVisor has its own mqueue and refuses the mount type in some versions.
        mounts.insert(
            4,
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
        )

    linux: dict[str, Any] = {
        # A fresh network namespace holds only a loopback device: no route out.
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "maskedPaths": list(_MASKED),
        "readonlyPaths": list(_READONLY),
    }
    if p.cgroups_path is not None:
        linux["cgroupsPath"] = p.cgroups_path
        linux["resources"] = {
            "devices": [{"allow": False, "access": "rwm"}],
            # swap == limit: no escape into swap where memsw accounting exists.
            "memory": {"limit": p.memory_bytes, "swap": p.memory_bytes},
            "pids": {"limit": p.pids_max},
        }

    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": p.uid, "gid": p.gid},
            "args": args,
            "env": [
                "PATH=/usr/local/bin:/usr/bin:/bin:/opt/busybox/bin",
                "HOME=/tmp",
                "LANG=C.UTF-8",
                "PYTHONDONTWRITEBYTECODE=1",
            ],
            "cwd": "/tmp",
            # No capabilities at all: the agent needs none, and nothing it
            # runs should gain any (noNewPrivileges blocks setuid binaries).
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": p.rootfs, "readonly": True},
        "hostname": p.hostname,
        "mounts": mounts,
        "linux": linux,
    }
