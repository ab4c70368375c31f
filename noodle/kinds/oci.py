"""The ``oci`` instance kind: one OCI container per slot, run by runc, crun
or runsc (gVisor), with the agent inside.

Host layout of a slot (``slot.dir/oci`` is the bundle)::

    <run_dir>/slots/<n>/oci/config.json     written by prepare
    <run_dir>/slots/<n>/oci/agent/agent.py  copied by prepare, bound read-only at /noodle
    <run_dir>/slots/<n>/oci/sock/           bound read-write at /run/noodle; the agent's socket
    <run_dir>/slots/<n>/oci/console.log     the container's stdout/stderr and the runtime's errors
    <run_dir>/slots/<n>/oci/instance.json   pid, start time and cgroups, for clean after a crash

The container id is ``noodle-<pool>-<slot>``, so ``clean`` finds a crashed
slot's container, cgroups and state with no descriptor at all. Runtimes
detach (``run --detach``): the container is never a child of the worker.

Runtime quirks handled here (measured on the target host, see DESIGN.md):

* crun 1.8 refuses hybrid cgroups. Every crun command runs in a private
  mount namespace in which the empty v2 mount ``/sys/fs/cgroup/unified`` is
  detached, so crun falls back to v1, where memory and pids work.
* ``runsc delete --force`` on a running sandbox takes seconds: kill first,
  wait for the sandbox to exit, then delete.
* gVisor cannot chmod a host Unix socket from inside the sandbox, and the
  agent does; under runsc a small bootstrap binds the socket and hands it
  to the agent's own server loop. The host sets the socket's mode.
* Under runsc the pids cgroup counts the sandbox's host threads (the Go
  runtime, the gofer, one ptrace stub per guest process), not guest
  processes, so its limit is ``pids_max + runsc_pids_overhead``; a guest
  that exhausts it (or its memory) kills the whole sandbox, which health
  then reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from noodle.errors import ConfigError, KindUnavailable, StepFailed
from noodle.handle import AgentHandle
from noodle.kinds._oci_spec import AGENT_DIR, SOCKET_DIR, SOCKET_NAME, SpecParams, build_spec
from noodle.kinds.base import Kind, PoolInfo, SlotContext

log = logging.getLogger("noodle.kinds.oci")

RUNTIMES = ("runc", "crun", "runsc")
# Debian package that ships each runtime (runsc comes from the gVisor source).
PACKAGES = {"runc": "runc", "crun": "crun", "runsc": "runsc"}
# Where each runtime keeps container state unless --root says otherwise.
DEFAULT_ROOTS = {"runc": "/run/runc", "crun": "/run/crun", "runsc": "/var/run/runsc"}

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ROOTFS = os.path.join(_REPO, "images", "build", "oci", "rootfs")
IMAGE_MARKER = "etc/noodle-image"
_UNIFIED = "/sys/fs/cgroup/unified"
_SUN_PATH_MAX = 107
_ID_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")

# Under runsc the agent cannot chmod its socket (see the module docstring),
# so this binds it and runs the agent's server loop directly.
_RUNSC_BOOT = (
    "import socket, sys\n"
    f"sys.path.insert(0, {AGENT_DIR!r})\n"
    "import agent\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.bind(sys.argv[1])\n"
    "s.listen(8)\n"
    "agent.serve_socket(s)\n"
)


def container_id(pool: str, slot: int) -> str:
    """``noodle-<pool>-<slot>``; a pool name runtimes would reject is hashed,
    so the id stays a pure function of (pool, slot)."""
    name = pool if _ID_SAFE.match(pool) and len(pool) <= 40 else hashlib.sha1(pool.encode()).hexdigest()[:16]  # noqa: S324
    return f"noodle-{name}-{slot}"


# -- small host helpers --------------------------------------------------------


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, start time in clock ticks since boot), zombies included."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0], int(fields[19])


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie pid, else None."""
    st = _proc_stat(pid)
    if st is None or st[0] in (b"Z", b"X"):
        return None
    return st[1]


def _same_process(pid: object, start: object) -> list[int]:
    """[pid] if that pid still exists, even as a zombie, and started at
    ``start``; a zombie must still be handed to _wait_gone to be reaped."""
    if not isinstance(pid, int) or pid <= 0:
        return []
    st = _proc_stat(pid)
    if st is None or (isinstance(start, int) and st[1] != start):
        return []
    return [pid]


def pid_matches(pid: int, start: int | None) -> bool:
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive (a zombie counts as gone). When
    this process is their subreaper, reap them: runsc's delete waits for the
    sandbox pid to vanish, which a zombie never does until reaped."""
    deadline = time.monotonic() + timeout
    while True:
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, os.WNOHANG)
        if all(proc_start_time(p) is None for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _read_mounts_now() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, opts = [*right.split(), "", ""][:3]
            out.append((_unescape(left.split()[4]), fstype, opts))
    return out


@functools.cache
def _mounts() -> tuple[tuple[str, str, str], ...]:
    """Read once per process: cgroup hierarchies do not move under a worker."""
    return tuple(_read_mounts_now())


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def cgroup_hybrid() -> bool:
    """v1 controllers plus a v2 mount at /sys/fs/cgroup/unified: the layout
    crun 1.8 refuses."""
    types = {mp: fstype for mp, fstype, _o in _mounts()}
    return types.get(_UNIFIED) == "cgroup2" and types.get("/sys/fs/cgroup") != "cgroup2"


def cgroup_roots() -> list[str]:
    """Mount points of every cgroup hierarchy (v1 and v2)."""
    return [mp for mp, fstype, _o in _mounts() if fstype in ("cgroup", "cgroup2")]


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
    for mp, fstype, opts in _mounts():
        if fstype == "cgroup2" and v2 is not None:
            out[mp] = v2
        elif fstype == "cgroup":
            names = {o for o in opts.split(",") if (o not in ("rw", "ro") and "=" not in o) or o.startswith("name=")}
            for ctrl_set, cpath in by_ctrls.items():
                if ctrl_set and ctrl_set <= names:
                    out[mp] = cpath
    return out


def limits_available() -> str | None:
    """None when memory and pids limits can be enforced, else why not."""
    types = {mp: fstype for mp, fstype, _o in _mounts()}
    if types.get("/sys/fs/cgroup") == "cgroup2":
        try:
            with open("/sys/fs/cgroup/cgroup.controllers") as f:
                have = set(f.read().split())
        except OSError as exc:
            return f"cannot read cgroup v2 controllers: {exc}"
        missing = {"memory", "pids"} - have
        return f"cgroup v2 lacks controllers {sorted(missing)}" if missing else None
    for ctrl in ("memory", "pids"):
        if not os.path.exists(f"/sys/fs/cgroup/{ctrl}/cgroup.procs"):
            return f"no cgroup v1 {ctrl} hierarchy at /sys/fs/cgroup/{ctrl}"
    return None


def _cgroup_text(pid: int | str) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read()
    except OSError:
        return ""


def candidate_cgroup_dirs(cid: str, recorded: list[str]) -> list[str]:
    """Where a container ``cid`` may have cgroups: at each hierarchy's root
    (crun), under this process's own cgroup (runc and runsc nest a relative
    path there), and wherever spawn saw them (a worker in another cgroup)."""
    found: set[str] = {os.path.join(root, cid) for root in cgroup_roots()}
    for mp, path in hierarchy_paths(_cgroup_text("self")).items():
        found.add(os.path.join(mp, path.lstrip("/"), cid))
    found.update(recorded)
    return sorted(p for p in found if os.path.isdir(p))


def _cgroup_procs(path: str) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split())
    return pids


def _rmdir_tree(path: str) -> None:
    """rmdir a cgroup and its children, deepest first (cgroupfs has no rm -r)."""
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _crun_private_mountns() -> None:
    """preexec_fn for crun on hybrid hosts: a private mount namespace without
    the v2 mount, so crun sees pure v1. Only async-signal-safe libc calls on
    symbols resolved before the fork."""
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0:
        os._exit(125)
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        os._exit(125)
    libc.umount2(_UNIFIED.encode(), _MNT_DETACH)


def _umount_under(path: str) -> None:
    """Detach anything mounted at or under ``path`` in this namespace (a
    runtime that died half-way through setting up a bundle)."""
    prefix = path.rstrip("/") + "/"
    points = [mp for mp, _t, _o in _read_mounts_now() if mp == path or mp.startswith(prefix)]
    libc = _libc()
    for mp in sorted(points, key=len, reverse=True):
        if libc.umount2(mp.encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise StepFailed(f"umount {mp}: {os.strerror(err)}")


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# -- the kind --------------------------------------------------------------------


class OciKind(Kind):
    """An OCI bundle per slot, run by ``runtime`` (runc, crun or runsc)."""

    name: ClassVar[str] = "oci"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {
        "runtime": (str, "runc"),
        "runtime_path": (str, None),  # default: the runtime's name on PATH
        "runtime_root": (str, None),  # state directory; default: the runtime's own
        "rootfs": (str, None),  # default: images/build/oci/rootfs of this checkout
        "host_usr": (str, "/usr"),  # bound read-only over /usr: the Python the agent runs on
        "python": (str, "/usr/bin/python3"),  # path inside the container
        "memory_mb": (int, 256),
        "pids_max": (int, 64),
        "tmpfs_mb": (int, 64),
        "uid": (int, 65534),
        "gid": (int, 65534),
        "cgroups": (bool, True),  # False: no limits (warned at setup)
        "ready_timeout": ((int, float), 15.0),
        "runtime_timeout": ((int, float), 30.0),  # one runtime command
        "runsc_platform": (str, "ptrace"),
        "runsc_pids_overhead": (int, 256),
    }

    def __init__(self, pool: PoolInfo, options: Mapping[str, Any]) -> None:
        super().__init__(pool, options)
        self.runtime: str = self.options["runtime"]
        self.rootfs: str = os.path.abspath(self.options["rootfs"] or DEFAULT_ROOTFS)
        self.state_root: str = self.options["runtime_root"] or DEFAULT_ROOTS[self.runtime]

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().validate_options(options)
        if out["runtime"] not in RUNTIMES:
            raise ConfigError(f"kinds.oci.runtime: expected one of {', '.join(RUNTIMES)}, got {out['runtime']!r}")
        for key in ("memory_mb", "pids_max", "tmpfs_mb"):
            if out[key] < 1:
                raise ConfigError(f"kinds.oci.{key}: must be at least 1, got {out[key]}")
        for key in ("ready_timeout", "runtime_timeout"):
            if out[key] <= 0:
                raise ConfigError(f"kinds.oci.{key}: must be positive, got {out[key]}")
        if out["runsc_platform"] not in ("ptrace", "kvm", "systrap"):
            raise ConfigError(
                f"kinds.oci.runsc_platform: expected ptrace, kvm or systrap, got {out['runsc_platform']!r}"
            )
        if not out["python"].startswith("/usr/"):
            raise ConfigError(
                f"kinds.oci.python: must be under /usr (host_usr is mounted there), got {out['python']!r}"
            )
        return out

    # -- paths ------------------------------------------------------------------

    def cid(self, slot: SlotContext) -> str:
        return container_id(slot.pool, slot.slot)

    @staticmethod
    def bundle(slot: SlotContext) -> str:
        return os.path.join(slot.dir, "oci")

    @classmethod
    def socket_path(cls, slot: SlotContext) -> str:
        return os.path.join(cls.bundle(slot), "sock", SOCKET_NAME)

    def state_paths(self, cid: str) -> list[str]:
        """The runtime's state entries for ``cid`` that exist now."""
        if self.runtime == "runsc":
            return glob.glob(os.path.join(glob.escape(self.state_root), glob.escape(cid) + "_sandbox:*"))
        path = os.path.join(self.state_root, cid)
        return [path] if os.path.lexists(path) else []

    @property
    def binary(self) -> str:
        return self.options["runtime_path"] or shutil.which(self.runtime) or self.runtime

    def _cgroups_on(self) -> bool:
        return bool(self.options["cgroups"]) and limits_available() is None

    # -- running the runtime ----------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        argv = [self.binary]
        if self.options["runtime_root"]:
            argv.append(f"--root={self.state_root}")
        if self.runtime == "runsc":
            argv += [
                f"--platform={self.options['runsc_platform']}",
                "--network=none",  # loopback only, inside the sentry's own stack
                "--host-uds=create",  # lets the agent's socket appear on the host
            ]
            if not self._cgroups_on():
                argv.append("--ignore-cgroups")
        return [*argv, *args]

    def _run(self, *args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        preexec = None
        if self.runtime == "crun" and cgroup_hybrid():
            _libc()  # load before the fork: the child only calls into it
            preexec = _crun_private_mountns
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        try:
            proc = subprocess.run(
                self._argv(*args),
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=float(self.options["runtime_timeout"]),
                check=False,
                preexec_fn=preexec,  # workers are single-threaded; see _crun_private_mountns
                **kw,
            )
        except subprocess.TimeoutExpired as exc:
            raise StepFailed(f"{self.runtime} {args[0]} timed out after {exc.timeout} s") from None
        except OSError as exc:
            raise StepFailed(f"cannot run {self.binary}: {exc}") from None
        if check and proc.returncode != 0:
            out = ((proc.stderr or "") + (proc.stdout or "")).strip()
            raise StepFailed(f"{self.runtime} {' '.join(args)} exited {proc.returncode}: {out[-1500:]}")
        return proc

    # -- supervisor side --------------------------------------------------------

    def setup(self) -> None:
        pkg = PACKAGES[self.runtime]
        binary = self.options["runtime_path"] or shutil.which(self.runtime)
        if not binary or not os.access(binary, os.X_OK):
            raise KindUnavailable(
                f"oci: runtime {self.runtime!r} not found; install the Debian package {pkg!r} "
                f"(apt-get install {pkg}, or run images/oci/build.sh)"
            )
        try:
            proc = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KindUnavailable(f"oci: {binary} does not run ({exc}); reinstall the Debian package {pkg!r}") from None
        if proc.returncode != 0:
            raise KindUnavailable(
                f"oci: {binary} --version exited {proc.returncode}: {proc.stderr.strip()[:300]}; "
                f"reinstall the Debian package {pkg!r}"
            )
        if os.geteuid() != 0:
            raise KindUnavailable("oci: the runtimes need root (rootless containers are not supported by this kind)")
        if not os.path.isfile(os.path.join(self.rootfs, IMAGE_MARKER)):
            raise KindUnavailable(f"oci: no root filesystem at {self.rootfs}; run images/oci/build.sh")
        python = os.path.join(self.options["host_usr"], os.path.relpath(self.options["python"], "/usr"))
        if not os.access(python, os.X_OK):
            raise KindUnavailable(f"oci: {python} (the agent's Python) is missing; install the Debian package python3")
        why = limits_available()
        if not self.options["cgroups"]:
            log.warning("oci: cgroups disabled by configuration: memory and pids limits are NOT enforced")
        elif why is not None:
            log.warning("oci: %s: memory and pids limits are NOT enforced, containers run without cgroups", why)
        os.makedirs(self.state_root, mode=0o700, exist_ok=True)

    # -- worker side --------------------------------------------------------------

    def prepare(self, slot: SlotContext) -> None:
        bundle = self.bundle(slot)
        sock_path = self.socket_path(slot)
        if len(sock_path.encode()) > _SUN_PATH_MAX:
            raise StepFailed(f"socket path {sock_path!r} exceeds {_SUN_PATH_MAX} bytes; use a shorter run_dir")
        os.makedirs(slot.dir, mode=0o700, exist_ok=True)
        os.makedirs(bundle, mode=0o700, exist_ok=True)
        agent_dir = os.path.join(bundle, "agent")
        os.makedirs(agent_dir, mode=0o755, exist_ok=True)
        os.chmod(agent_dir, 0o755)  # noqa: S103 - the container's uid reads the agent
        from noodle import agent as agent_module

        agent_src = agent_module.__file__
        assert agent_src is not None
        shutil.copyfile(agent_src, os.path.join(agent_dir, "agent.py"))
        os.chmod(os.path.join(agent_dir, "agent.py"), 0o644)
        from noodle.codec import stage_instance_library

        stage_instance_library(agent_dir)  # what tasks need to unpickle (cloudpickle)

        sock_dir = os.path.dirname(sock_path)
        os.makedirs(sock_dir, exist_ok=True)
        # The agent runs as `uid` and must create its socket here; clients of
        # the pool's group need search permission to connect.
        os.chown(sock_dir, self.options["uid"], self.pool.gid)
        os.chmod(sock_dir, 0o750)  # noqa: S103 - group: the pool's clients
        for stale in (sock_path, os.path.join(bundle, "pid"), os.path.join(bundle, "instance.json")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)

        cgroups = self._cgroups_on()
        pids = self.options["pids_max"]
        if self.runtime == "runsc":
            pids += self.options["runsc_pids_overhead"]
        spec = build_spec(
            SpecParams(
                rootfs=self.rootfs,
                host_usr=self.options["host_usr"],
                agent_dir=agent_dir,
                socket_dir=sock_dir,
                python=self.options["python"],
                uid=self.options["uid"],
                gid=self.options["gid"],
                memory_bytes=self.options["memory_mb"] << 20,
                pids_max=pids,
                tmpfs_bytes=self.options["tmpfs_mb"] << 20,
                # Relative: runc and runsc nest it under the worker's cgroup.
                cgroups_path=self.cid(slot) if cgroups else None,
                runsc=self.runtime == "runsc",
            )
        )
        if self.runtime == "runsc":
            sock_inside = f"{SOCKET_DIR}/{SOCKET_NAME}"
            spec["process"]["args"] = [self.options["python"], "-I", "-B", "-c", _RUNSC_BOOT, sock_inside]
        tmp = os.path.join(bundle, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(spec, f, indent=1)
        os.replace(tmp, os.path.join(bundle, "config.json"))

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        bundle = self.bundle(slot)
        cid = self.cid(slot)
        sock_path = self.socket_path(slot)
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise StepFailed(f"slot {slot.slot} has no bundle at {bundle}; prepare did not run")
        if self.state_paths(cid):
            raise StepFailed(f"container {cid} already exists; clean did not run")
        console = os.path.join(bundle, "console.log")
        pid_file = os.path.join(bundle, "pid")
        # The container inherits the runtime's stdio: a file, never a pipe we
        # would wait on, and nothing tied to the worker.
        with open(console, "ab") as out:
            argv = ("run", "--detach", f"--pid-file={pid_file}", f"--bundle={bundle}", cid)
            proc = self._run(*argv, check=False, stdout=out, stderr=out)
        if proc.returncode != 0:
            raise StepFailed(f"{self.runtime} run {cid} exited {proc.returncode}: {_tail(console)}")
        try:
            with open(pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError) as exc:
            raise StepFailed(f"{self.runtime} run left no pid file ({exc}): {_tail(console)}") from None
        start = proc_start_time(pid)
        if start is None:
            raise StepFailed(f"container {cid} exited at once: {_tail(console)}")
        cgroups = [
            os.path.join(mp, path.lstrip("/"))
            for mp, path in hierarchy_paths(_cgroup_text(pid)).items()
            if path.rstrip("/").endswith("/" + cid)
        ]
        with open(os.path.join(bundle, "instance.json"), "w") as f:
            json.dump({"id": cid, "runtime": self.runtime, "pid": pid, "start": start, "cgroups": cgroups}, f)

        self._wait_ready(cid, pid, start, sock_path, console)
        # gVisor creates the socket 0755; set what the pool's clients need.
        os.chown(sock_path, -1, self.pool.gid)
        os.chmod(sock_path, 0o660)
        return {
            "id": cid,
            "runtime": self.runtime,
            "pid": pid,
            "start": start,
            "socket": sock_path,
            "bundle": bundle,
        }

    def _wait_ready(self, cid: str, pid: int, start: int, sock_path: str, console: str) -> None:
        deadline = time.monotonic() + float(self.options["ready_timeout"])
        delay = 0.001
        while True:
            budget = max(0.05, min(1.0, deadline - time.monotonic()))
            if os.path.exists(sock_path) and AgentHandle.probe(sock_path, budget):
                return
            if not pid_matches(pid, start):
                raise StepFailed(f"container {cid} died before its agent was ready: {_tail(console)}")
            if time.monotonic() >= deadline:
                raise StepFailed(
                    f"agent in {cid} not ready after {self.options['ready_timeout']} s: {_tail(console)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.005)  # the agent's readiness is the spawn latency

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        cid = str(descriptor.get("id") or self.cid(slot))
        self._stop(cid, _same_process(descriptor.get("pid"), descriptor.get("start")))
        if self.state_paths(cid):
            raise StepFailed(f"{self.runtime} left state for {cid}: {self.state_paths(cid)}")

    def _stop(self, cid: str, pids: list[int]) -> None:
        """kill, wait for the init to go, then delete: runsc's delete of a
        live sandbox is slow, and a delete racing the kill can fail."""
        if not self.state_paths(cid):
            return
        self._run("kill", cid, "KILL", check=False)
        if pids and not _wait_gone(pids, 10.0):
            log.warning("oci: %s still alive 10 s after kill", cid)
        proc = self._run("delete", "--force", cid, check=False)
        if proc.returncode != 0 and self.state_paths(cid):
            err = proc.stderr.strip()[-800:]
            raise StepFailed(f"{self.runtime} delete --force {cid} exited {proc.returncode}: {err}")

    def clean(self, slot: SlotContext) -> None:
        """Remove whatever a previous life of the slot left: container, state,
        processes, cgroups, mounts, bundle. Needs no descriptor."""
        cid = self.cid(slot)
        bundle = self.bundle(slot)
        recorded: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError), open(os.path.join(bundle, "instance.json")) as f:
            recorded = json.load(f)
        rstart = recorded.get("start")
        pids = _same_process(recorded.get("pid"), rstart) if isinstance(rstart, int) else []

        self._stop(cid, pids)

        # Whatever the runtime missed (a crash between create and start, a
        # runtime killed mid-command, cgroups=false): kill by cgroup and by
        # the recorded pid, then remove the cgroups.
        dirs = candidate_cgroup_dirs(cid, [str(p) for p in recorded.get("cgroups", []) if str(p).endswith(cid)])
        stray = {p for d in dirs for p in _cgroup_procs(d)} | set(pids)
        for p in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if stray and not _wait_gone(sorted(stray), 10.0):
            raise StepFailed(f"processes of {cid} survive SIGKILL: {sorted(stray)}")
        for d in dirs:
            deadline = time.monotonic() + 5.0
            while os.path.isdir(d):
                try:
                    _rmdir_tree(d)
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise StepFailed(f"cannot remove cgroup {d}: {exc}") from None
                    time.sleep(0.01)

        leftover = self.state_paths(cid)
        if leftover:
            # The runtime could not delete it (its processes are gone now):
            # a second delete usually can; else remove the state by hand.
            self._run("delete", "--force", cid, check=False)
            for path in self.state_paths(cid):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        _umount_under(bundle)
        if os.path.lexists(bundle):
            shutil.rmtree(bundle)
        if self.state_paths(cid):
            raise StepFailed(f"state of {cid} survives clean: {self.state_paths(cid)}")

    def health(self, descriptor: Mapping[str, Any], timeout: float) -> bool:
        return self.client_health(descriptor, timeout)

    # -- client side ----------------------------------------------------------------

    @classmethod
    def client_handle(cls, descriptor: Mapping[str, Any]) -> AgentHandle:
        return AgentHandle(str(descriptor["socket"]))

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        pid, start = descriptor.get("pid"), descriptor.get("start")
        if not isinstance(pid, int) or not pid_matches(pid, start if isinstance(start, int) else None):
            return False
        return AgentHandle.probe(str(descriptor.get("socket", "")), timeout)


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
    found += [f"mount {mp}" for mp, _t, _o in _read_mounts_now() if f"/{cid}/" in mp + "/"]
    return found


def _find_cgroups(cid: str) -> list[str]:
    out = []
    for root in cgroup_roots():
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


__all__ = ["OciKind", "container_id", "leftovers"]
