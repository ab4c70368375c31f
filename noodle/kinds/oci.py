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

Runtime quirks handled here (measured on a Debian 12 host with crun 1.8):

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
import errno
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
from collections.abc import Mapping
from typing import Any, ClassVar

from noodle import images
from noodle.errors import ConfigError, KindUnavailable, StepFailed
from noodle.handle import AgentHandle
from noodle.host import cgroup
from noodle.host.launch import log_tail
from noodle.host.mounts import private_namespace_without, unmount_all
from noodle.host.proc import ProcessIdentity, start_time, wait_gone
from noodle.kinds._oci_spec import AGENT_DIR, SOCKET_DIR, SOCKET_NAME, SpecParams, build_spec
from noodle.kinds.base import AgentKind, PoolInfo, SlotContext

log = logging.getLogger("noodle.kinds.oci")

RUNTIMES = ("runc", "crun", "runsc")
# Debian package that ships each runtime (runsc comes from the gVisor source).
PACKAGES = {"runc": "runc", "crun": "crun", "runsc": "runsc"}
# Where each runtime keeps container state unless --root says otherwise.
DEFAULT_ROOTS = {"runc": "/run/runc", "crun": "/run/crun", "runsc": "/var/run/runsc"}

IMAGE_MARKER = "etc/noodle-image"
# where the rootfs is found as this module is imported; each pool looks again
DEFAULT_ROOTFS = os.path.join(images.find("oci", "rootfs/" + IMAGE_MARKER), "rootfs")
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


def candidate_cgroup_dirs(cid: str, recorded: list[str]) -> list[str]:
    """Where a container ``cid`` may have cgroups: at each hierarchy's root
    (crun), under this process's own cgroup (runc and runsc nest a relative
    path there), and wherever spawn saw them (a worker in another cgroup)."""
    found: set[str] = {os.path.join(root, cid) for root in cgroup.roots()}
    for mp, path in cgroup.hierarchy_paths(cgroup.membership("self")).items():
        found.add(os.path.join(mp, path.lstrip("/"), cid))
    found.update(recorded)
    return sorted(p for p in found if os.path.isdir(p))


def _crun_private_mountns() -> None:
    """preexec_fn for crun on hybrid hosts: a private mount namespace without
    the v2 mount, so crun sees pure v1."""
    private_namespace_without(cgroup.UNIFIED)


def _tail(path: str) -> str:
    return log_tail(path, 2000)


def _recorded(pid: object, start: object) -> list[ProcessIdentity]:
    proc = ProcessIdentity.from_record(pid, start)
    return [proc] if proc is not None else []


# -- the kind --------------------------------------------------------------------


class OciKind(AgentKind):
    """An OCI bundle per slot, run by ``runtime`` (runc, crun or runsc)."""

    name: ClassVar[str] = "oci"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {
        "runtime": (str, "runc"),
        "runtime_path": (str, None),  # default: the runtime's name on PATH
        "runtime_root": (str, None),  # state directory; default: the runtime's own
        "rootfs": (str, None),  # default: rootfs of `noodle image build oci`
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
        # realpath: the runtimes refuse a rootfs reached through a symlink
        self.rootfs: str = os.path.realpath(
            self.options["rootfs"] or os.path.join(images.find("oci", "rootfs/" + IMAGE_MARKER), "rootfs")
        )
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
        return bool(self.options["cgroups"]) and cgroup.limits_available() is None

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
        if self.runtime == "crun" and cgroup.hybrid():
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
                f"(apt-get install {pkg}, or run `noodle image build oci`)"
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
            raise KindUnavailable(f"oci: no root filesystem at {self.rootfs}; run `noodle image build oci` (as root)")
        python = os.path.join(self.options["host_usr"], os.path.relpath(self.options["python"], "/usr"))
        if not os.access(python, os.X_OK):
            raise KindUnavailable(f"oci: {python} (the agent's Python) is missing; install the Debian package python3")
        why = cgroup.limits_available()
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
        start = start_time(pid)
        if start is None:
            raise StepFailed(f"container {cid} exited at once: {_tail(console)}")
        cgroups = [
            os.path.join(mp, path.lstrip("/"))
            for mp, path in cgroup.hierarchy_paths(cgroup.membership(pid)).items()
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
            if not ProcessIdentity(pid, start).alive():
                raise StepFailed(f"container {cid} died before its agent was ready: {_tail(console)}")
            if time.monotonic() >= deadline:
                raise StepFailed(
                    f"agent in {cid} not ready after {self.options['ready_timeout']} s: {_tail(console)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.005)  # the agent's readiness is the spawn latency

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        cid = str(descriptor.get("id") or self.cid(slot))
        self._stop(cid, _recorded(descriptor.get("pid"), descriptor.get("start")))
        if self.state_paths(cid):
            raise StepFailed(f"{self.runtime} left state for {cid}: {self.state_paths(cid)}")

    def _stop(self, cid: str, procs: list[ProcessIdentity]) -> None:
        """kill, wait for the init to go, then delete: runsc's delete of a
        live sandbox is slow, and a delete racing the kill can fail."""
        if not self.state_paths(cid):
            return
        self._run("kill", cid, "KILL", check=False)
        # reap too: runsc's delete waits for the sandbox pid to vanish, which
        # a zombie never does, and we are its subreaper's child at worst
        if procs and not wait_gone(procs, 10.0, reap=True):
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
        procs = _recorded(recorded.get("pid"), recorded.get("start"))

        self._stop(cid, procs)

        # Whatever the runtime missed (a crash between create and start, a
        # runtime killed mid-command, cgroups=false): kill by cgroup and by
        # the recorded pid, then remove the cgroups.
        dirs = candidate_cgroup_dirs(cid, [str(p) for p in recorded.get("cgroups", []) if str(p).endswith(cid)])
        stray = {p for d in dirs for p in cgroup.procs_below(d)}
        for p in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)  # in the container's cgroup: no reused pid can be there
        stray_procs = [q for p in stray if (q := ProcessIdentity.of(p)) is not None]
        for q in procs:
            q.signal(signal.SIGKILL)
        if (stray_procs or procs) and not wait_gone([*stray_procs, *procs], 10.0, reap=True):
            raise StepFailed(f"processes of {cid} survive SIGKILL: {sorted(stray | {q.pid for q in procs})}")
        for d in dirs:
            deadline = time.monotonic() + 5.0
            while os.path.isdir(d):
                try:
                    cgroup.rmdir_tree(d)
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
        unmount_all(bundle)
        if os.path.lexists(bundle):
            shutil.rmtree(bundle)
        if self.state_paths(cid):
            raise StepFailed(f"state of {cid} survives clean: {self.state_paths(cid)}")


__all__ = ["OciKind", "container_id"]
