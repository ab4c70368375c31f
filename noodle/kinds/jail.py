"""The ``jail`` kind: the agent in Linux namespaces on a copy-on-write root.

Per slot, in the style of Firecracker's jailer:

* root: overlayfs with the read-only ``rootfs`` as lower layer and
  ``<slot>/upper`` + ``<slot>/work`` as the writable layer, mounted on
  ``<slot>/root`` by prepare under the source name ``noodle-<pool>-<slot>``;
  the host's ``/usr`` and Python are bind-mounted read-only on top of it;
* namespaces: pid, mount, net (loopback only unless ``network``), ipc, uts,
  cgroup, and a user namespace when ``userns`` is set;
* identity: uid ``uid_base + slot`` (gid the same unless ``gid_base``), no
  capabilities, no_new_privs;
* limits: cgroup ``<parent>/<pool>.<slot>`` with ``memory_limit`` bytes and
  ``pids_limit`` tasks (see ``noodle.host.cgroup``);
* the agent listens on ``/run/noodle/agent.sock`` inside, which is
  ``<slot>/sock/agent.sock`` on the host. It runs from byte code that setup
  compiles once (``<run_dir>/jail-agent.pyc``, bound read-only), so that no
  instance spends its start compiling it (see ``agent_byte_code``).

Every name a leftover can be found by (cgroup, mount source, slot dir)
carries the pool name and the slot id, so ``clean`` needs no descriptor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import marshal
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from noodle import images
from noodle.errors import ConfigError, KindUnavailable, StepFailed
from noodle.handle import AgentHandle
from noodle.host.cgroup import Layout, SlotCgroup, detect
from noodle.host.launch import PASSED_FD, launch_detached, log_tail, read_exact, read_pidfile, write_pidfile
from noodle.host.mounts import mount, mounts_under, unmount_all
from noodle.host.proc import ProcessIdentity
from noodle.kinds.base import AgentKind, PoolInfo, SlotContext

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_FILE = os.path.join(_PKG, "agent.py")
INSIDE_SOCKET = "/run/noodle/agent.sock"
# `python agent.pyc` skips compiling the agent's source, a quarter of an
# instance's start; its frames name the source path. The source itself is
# bound instead when no byte code could be made.
INSIDE_AGENT = "/opt/noodle/agent.pyc"
INSIDE_AGENT_SOURCE = "/opt/noodle/agent.py"
INSIDE_PYTHON = "/opt/python"
# The ready pipe's fd number in the sandbox
_READY_FD = PASSED_FD
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SUN_PATH_MAX = 107

log = logging.getLogger("noodle.kinds.jail")


class JailKind(AgentKind):
    name = "jail"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {
        # Lower directory of the overlay root; `noodle image build jail` makes the
        # default. None: that build, else a skeleton made in setup().
        "rootfs": (str, None),
        # Interpreter that runs the agent; its prefix is bind-mounted read-only.
        "python": (str, None),
        "backend": (str, "auto"),  # auto | bwrap | unshare
        "memory_limit": (int, 256 * 1024 * 1024),
        "pids_limit": (int, 64),
        "cgroup": (bool, True),
        "cgroup_parent": (str, "noodle"),
        "uid_base": (int, 200000),
        "gid_base": (int, None),
        "userns": (bool, False),
        "network": (bool, False),
        "hostname": (str, "noodle"),
        "ro_binds": (list, []),
        "env": (dict, {}),
        "ready_timeout": ((int, float), 10.0),
        "kill_timeout": ((int, float), 10.0),
    }

    def __init__(self, pool: PoolInfo, options: Mapping[str, Any]) -> None:
        super().__init__(pool, options)
        o = self.options
        if o["backend"] not in ("auto", "bwrap", "unshare"):
            raise ConfigError(f"kinds.jail.backend: expected auto, bwrap or unshare, got {o['backend']!r}")
        for key in ("memory_limit", "pids_limit"):
            if o[key] is not None and o[key] < 0:
                raise ConfigError(f"kinds.jail.{key}: must be >= 0 (0 = no limit), got {o[key]}")
        if o["uid_base"] < 1 or (o["gid_base"] is not None and o["gid_base"] < 1):
            raise ConfigError("kinds.jail.uid_base/gid_base: must be >= 1 (the jail never runs as root)")
        if not _SAFE_NAME.match(o["cgroup_parent"]):
            raise ConfigError(f"kinds.jail.cgroup_parent: must match {_SAFE_NAME.pattern}, got {o['cgroup_parent']!r}")
        if not _SAFE_NAME.match(pool.name):
            raise ConfigError(f"pool name {pool.name!r}: the jail kind needs it to match {_SAFE_NAME.pattern}")
        for path in o["ro_binds"]:
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ConfigError(f"kinds.jail.ro_binds: expected absolute paths, got {path!r}")
        for k, v in o["env"].items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(f"kinds.jail.env: expected string keys and values, got {k!r}={v!r}")
        self._layout: Layout | None = None
        self._backend = ""
        self._tools: dict[str, str] = {}
        self._rootfs = ""
        self._own_rootfs = False
        self._python_prefix: str | None = None
        self._python_inside = ""
        self._agent_file = AGENT_FILE
        self._agent_inside = INSIDE_AGENT_SOURCE
        self._library = _library_binds()

    # -- names -----------------------------------------------------------------

    def cgroup_name(self, slot: int) -> str:
        return f"{self.pool.name}.{slot}"

    def mount_source(self, slot: int) -> str:
        return f"noodle-{self.pool.name}-{slot}"

    def uid(self, slot: int) -> int:
        return int(self.options["uid_base"]) + slot

    def gid(self, slot: int) -> int:
        base = self.options["gid_base"]
        return (int(base) if base is not None else int(self.options["uid_base"])) + slot

    def socket_path(self, slot: SlotContext) -> str:
        return os.path.join(slot.dir, "sock", "agent.sock")

    def slot_cgroup(self, slot: int) -> SlotCgroup | None:
        if not self.options["cgroup"]:
            return None
        if self._layout is None:
            self._layout = detect()
        return SlotCgroup(self._layout, self.options["cgroup_parent"], self.cgroup_name(slot))

    # -- supervisor side -------------------------------------------------------

    def setup(self) -> None:
        o = self.options
        if os.geteuid() != 0:
            raise KindUnavailable("the jail kind mounts overlays and creates cgroups: run the supervisor as root")
        self._backend = self._pick_backend()
        if not shutil.which("setpriv"):
            raise KindUnavailable("setpriv not found: install the Debian package util-linux")
        # found once, not on every spawn's path
        self._tools = {tool: shutil.which(tool) or tool for tool in ("setpriv", "bwrap", "unshare")}
        self._python_prefix, self._python_inside = _python_paths(o["python"])
        if not os.path.isfile(AGENT_FILE):
            raise KindUnavailable(f"the agent file {AGENT_FILE} is missing: reinstall pool-noodle")
        # In the run directory, which this kind controls: readable by the
        # slot uid (userns mode binds it as that uid) whatever the
        # installation's permissions.
        pyc = os.path.join(self.pool.run_dir, "jail-agent.pyc")
        compiled = agent_byte_code(_python_host(o["python"]), AGENT_FILE, pyc, self.uid(0), self.gid(0))
        if compiled is not None:
            self._agent_file, self._agent_inside = compiled, INSIDE_AGENT
        elif o["userns"]:
            copied = _copy_readable(AGENT_FILE, os.path.join(self.pool.run_dir, "jail-agent.py"))
            self._agent_file, self._agent_inside = copied, INSIDE_AGENT_SOURCE
        else:
            self._agent_file, self._agent_inside = AGENT_FILE, INSIDE_AGENT_SOURCE
        if o["rootfs"] is not None:
            self._rootfs = os.path.abspath(o["rootfs"])
            if not os.path.isdir(self._rootfs):
                raise ConfigError(f"kinds.jail.rootfs: {self._rootfs} is not a directory (`noodle image build jail`)")
        elif os.path.isdir(built := os.path.join(images.find("jail", "rootfs"), "rootfs")):
            self._rootfs = built
        else:
            self._rootfs = os.path.join(self.pool.run_dir, "jail-rootfs")
            build_skeleton(self._rootfs)
            self._own_rootfs = True
        for label, path in (("rootfs", self._rootfs), ("run_dir", self.pool.run_dir)):
            if any(c in path for c in ",:\\\n"):
                raise ConfigError(f"{label} {path!r}: overlayfs options cannot carry ',', ':' or '\\\\' in paths")
        sock = self.socket_path(self.pool.slot(max(self.pool.pool_size - 1, 0)))
        if len(sock.encode()) > _SUN_PATH_MAX:
            raise ConfigError(
                f"run_dir {self.pool.run_dir!r} is too long: the socket path {sock!r} exceeds {_SUN_PATH_MAX} bytes"
            )
        if o["cgroup"]:
            self._layout = detect()
        if o["userns"]:
            # bwrap then runs as the slot's uid and resolves every source
            # path itself (an fd passed in is resolved back to its path).
            # The agent (its byte code, or a copy) and the library are in
            # the run directory, which this kind controls, so the
            # installation (a checkout in /root, a 0700 home) need not be
            # searchable by other users.
            self._library = _staged_library_binds(os.path.join(self.pool.run_dir, "jail-lib"))
            paths = [self.pool.run_dir, self._agent_file, *o["ro_binds"]]
            if self._python_prefix is not None:
                paths.append(self._python_prefix)
            for path in paths:
                blocked = _blocked_for_others(path)
                if blocked is not None:
                    raise ConfigError(
                        f"kinds.jail.userns: {blocked} (on the way to {path}) is not searchable by other users, "
                        "so the slot uid cannot reach it; chmod o+x it, or use python = \"/usr/bin/python3\""
                    )

    def teardown(self) -> None:
        if self._own_rootfs:
            shutil.rmtree(self._rootfs, ignore_errors=True)

    def _pick_backend(self) -> str:
        want = self.options["backend"]
        if want in ("auto", "bwrap") and shutil.which("bwrap"):
            return "bwrap"
        if want == "bwrap":
            raise KindUnavailable("bwrap not found: install the Debian package bubblewrap (noodle image build jail)")
        for tool, package in (("unshare", "util-linux"), ("mount", "mount"), ("chroot", "coreutils")):
            if not shutil.which(tool):
                raise KindUnavailable(f"{tool} not found: install the Debian package {package} (or bubblewrap)")
        if self.options["userns"]:
            raise KindUnavailable("userns = true needs bubblewrap: install the Debian package bubblewrap")
        return "unshare"

    def _ensure_setup(self) -> None:
        # Workers may be forked before or after setup(); they redo the cheap part.
        if not self._backend:
            self.setup()

    # -- worker side -----------------------------------------------------------

    def clean(self, slot: SlotContext) -> None:
        """Remove every trace of the slot, whether or not terminate ran."""
        timeout = float(self.options["kill_timeout"])
        cg = self.slot_cgroup(slot.slot)
        if cg is not None:
            cg.kill_all(timeout)
        # the way back to a jail started without a cgroup, after a crash: its
        # group's stragglers go even when the launcher is dead, never
        # anything of a pid reused since
        recorded = read_pidfile(os.path.join(slot.dir, "pid"))
        if recorded is not None:
            recorded.kill_tree(timeout=timeout)
        unmount_all(slot.dir, self.mount_source(slot.slot))
        if cg is not None:
            cg.remove(timeout)
        if os.path.lexists(slot.dir):
            shutil.rmtree(slot.dir)
        if os.path.lexists(slot.dir):
            raise StepFailed(f"slot dir {slot.dir} survived removal")

    def prepare(self, slot: SlotContext) -> None:
        self._ensure_setup()
        d = slot.dir
        # Clients in the pool's group must reach the socket; in userns mode
        # bwrap, running as the slot uid, must too.
        mode = 0o711 if self.options["userns"] else 0o710
        os.makedirs(os.path.dirname(d), exist_ok=True)
        os.chmod(os.path.dirname(d), mode | 0o040)
        os.makedirs(d, exist_ok=True)
        os.chown(d, 0, self.pool.gid)
        os.chmod(d, mode)
        for sub in ("upper", "work", "root"):
            # explicit modes: the supervisor's umask (007) must not make the
            # sandbox's / (the upper dir's mode) unsearchable for the slot uid
            _makedirs(os.path.join(d, sub), 0o755)
        sock = os.path.join(d, "sock")
        os.makedirs(sock, exist_ok=True)
        # setgid: the agent's socket inherits the pool's group, so clients in
        # that group can connect although the agent runs as its own uid.
        os.chown(sock, self.uid(slot.slot), self.pool.gid)
        os.chmod(sock, 0o2770)  # noqa: S103 - group is the pool's, see above
        root = os.path.join(d, "root")
        if not mounts_under(root):
            upper, work = os.path.join(d, "upper"), os.path.join(d, "work")
            mount(
                self.mount_source(slot.slot),
                root,
                "overlay",
                f"lowerdir={self._rootfs},upperdir={upper},workdir={work}",
            )
        self._mount_points(root)
        cg = self.slot_cgroup(slot.slot)
        if cg is not None:
            o = self.options
            cg.create(o["memory_limit"] or None, o["pids_limit"] or None)

    def _mount_points(self, root: str) -> None:
        """Make every bind target exist in the slot's root (in its upper
        layer): bwrap run as the slot uid (userns) may not create them."""
        dirs = ["run/noodle", "opt/python", "proc", "dev", "tmp", "home/sandbox"]
        dirs += [inside for _host, inside in _library_binds()]
        files = [self._agent_inside]
        for path in self.options["ro_binds"]:
            (dirs if os.path.isdir(path) else files).append(path)
        for d in dirs:
            _makedirs(os.path.join(root, d.lstrip("/")), 0o755)
        for f in files:
            target = os.path.join(root, f.lstrip("/"))
            _makedirs(os.path.dirname(target), 0o755)
            if not os.path.exists(target):
                with open(target, "ab"):
                    pass
                os.chmod(target, 0o644)

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        self._ensure_setup()
        root = os.path.join(slot.dir, "root")
        # a stat, where reading the mount table grows with the pool
        if not os.path.ismount(root):
            raise StepFailed(f"slot {slot.slot} is not prepared: nothing is mounted on {root}")
        cg = self.slot_cgroup(slot.slot)
        sock = self.socket_path(slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        log_path = os.path.join(slot.dir, "log")
        argv, env = self._command(slot)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = launch_detached(argv, log_path, env=env, pass_fd=ready_w,
                                   in_child=cg.join_self if cg is not None else None)  # fmt: skip
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        pid, start = proc.pid, proc.start
        write_pidfile(os.path.join(slot.dir, "pid"), proc)
        try:
            _wait_ready(ready_r, float(self.options["ready_timeout"]), log_path)
            handle = AgentHandle(sock, timeout=float(self.options["ready_timeout"]))
            try:
                if not handle.ping():
                    raise StepFailed(f"the agent on {sock} reported ready but does not answer ping")
            finally:
                handle.close()
        except BaseException:
            self._stop(pid, start, cg)
            raise
        finally:
            os.close(ready_r)
        desc: dict[str, Any] = {"pid": pid, "start": start, "socket": sock, "uid": self.uid(slot.slot)}
        if cg is not None:
            desc["cgroup"] = list(cg.paths)
        return desc

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        pid = descriptor.get("pid")
        start = descriptor.get("start")
        paths = descriptor.get("cgroup")
        cg = SlotCgroup.from_paths(list(paths)) if isinstance(paths, list) and paths else self.slot_cgroup(slot.slot)
        self._stop(pid if isinstance(pid, int) else 0, start if isinstance(start, int) else None, cg)

    def _stop(self, pid: int, start: int | None, cg: SlotCgroup | None) -> None:
        """Kill the cgroup, then the launcher's process group (it is a session
        leader) and its descendants (the pid namespace's init, the agent,
        anything that left the group below them), even when the launcher is
        dead: without a cgroup this is what stops the jail."""
        timeout = float(self.options["kill_timeout"])
        if cg is not None:
            cg.kill_all(timeout)
        ProcessIdentity(pid, start).kill_tree(timeout=timeout)

    # -- client side -------------------------------------------------------------

    @classmethod
    def instance_pids(cls, descriptor: Mapping[str, Any]) -> list[int]:
        paths = descriptor.get("cgroup")
        if isinstance(paths, list) and paths:
            pids = SlotCgroup.from_paths([str(p) for p in paths]).procs()
            if pids:
                return sorted(pids)
        return super().instance_pids(descriptor)

    # -- the sandbox command -------------------------------------------------------

    def _command(self, slot: SlotContext) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the launcher."""
        o = self.options
        uid, gid = self.uid(slot.slot), self.gid(slot.slot)
        inner_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/home/sandbox",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }
        if self._python_prefix is not None:
            inner_env["LD_LIBRARY_PATH"] = INSIDE_PYTHON + "/lib"
        inner_env.update(o["env"])
        agent = [self._python_inside, "-S", self._agent_inside, "--socket", INSIDE_SOCKET, "--ready-fd", str(_READY_FD)]
        drop = [
            self._tools["setpriv"],
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
        ]
        root = os.path.join(slot.dir, "root")
        sock = os.path.join(slot.dir, "sock")
        if self._backend == "bwrap":
            return self._bwrap(slot, drop, agent, inner_env, root, sock)
        return self._unshare(slot, drop, agent, inner_env, root, sock)

    def _bwrap(
        self,
        slot: SlotContext,
        drop: list[str],
        agent: list[str],
        inner_env: dict[str, str],
        root: str,
        sock: str,
    ) -> tuple[list[str], dict[str, str]]:
        o = self.options
        bwrap = self._tools["bwrap"]
        argv = [bwrap, "--bind", root, "/"]
        for d in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = "/" + d
            if os.path.isdir(host) and not os.path.islink(host) and os.path.isdir(os.path.join(root, d)):
                argv += ["--ro-bind", host, host]
        if self._python_prefix is not None:
            argv += ["--ro-bind", self._python_prefix, INSIDE_PYTHON]
        argv += ["--ro-bind", self._agent_file, self._agent_inside]
        for host, inside in self._library:
            argv += ["--ro-bind", host, inside]
        for path in o["ro_binds"]:
            argv += ["--ro-bind", path, path]
        argv += ["--bind", sock, "/run/noodle"]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not o["network"]:
            argv += ["--unshare-net"]
        argv += ["--hostname", o["hostname"], "--chdir", "/home/sandbox", "--clearenv"]
        for k, v in inner_env.items():
            argv += ["--setenv", k, v]
        if o["userns"]:
            # bwrap itself runs as the slot's uid: the user namespace maps
            # only that uid, so nothing inside is root on the host.
            argv += ["--unshare-user", "--disable-userns", "--"]
            return drop + argv + agent, {}
        return [*argv, "--", *drop, *agent], {}

    def _unshare(
        self,
        slot: SlotContext,
        drop: list[str],
        agent: list[str],
        inner_env: dict[str, str],
        root: str,
        sock: str,
    ) -> tuple[list[str], dict[str, str]]:
        o = self.options
        binds: list[str] = []
        for d in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = "/" + d
            if os.path.isdir(host) and not os.path.islink(host) and os.path.isdir(os.path.join(root, d)):
                binds += [host, host]
        if self._python_prefix is not None:
            binds += [self._python_prefix, INSIDE_PYTHON]
        binds += [self._agent_file, self._agent_inside]
        for host, inside in self._library:
            binds += [host, inside]
        for path in o["ro_binds"]:
            binds += [path, path]
        flags = ["--pid", "--fork", "--mount", "--ipc", "--uts", "--cgroup", "--propagation", "private"]
        if not o["network"]:
            flags.append("--net")
        unshare = self._tools["unshare"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "R": root, "S": sock, "H": o["hostname"]}
        script = _UNSHARE_SCRIPT
        argv = [unshare, *flags, "--", "/bin/sh", "-c", script, "noodle-jail", str(len(binds) // 2), *binds]
        argv += ["env", "-i", *(f"{k}={v}" for k, v in inner_env.items()), *drop, *agent]
        return argv, env


# Runs as root inside the new namespaces, then chroots and drops to the slot
# uid. Arguments: N, then N (host, inside) pairs to bind read-only, then the
# command. /dev gets only the harmless nodes, as bwrap's --dev does.
_UNSHARE_SCRIPT = r"""
set -eu
n=$1; shift
while [ "$n" -gt 0 ]; do
    if [ -d "$1" ]; then mkdir -p "$R$2"; elif [ ! -e "$R$2" ]; then mkdir -p "${R}$(dirname "$2")"; : > "$R$2"; fi
    mount --bind "$1" "$R$2"
    mount -o remount,bind,ro "$R$2"
    shift 2; n=$((n - 1))
done
mount --bind "$S" "$R/run/noodle"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t tmpfs -o nosuid,mode=0755,size=64k tmpfs "$R/dev"
for d in null zero full random urandom tty; do
    : > "$R/dev/$d"
    mount --bind "/dev/$d" "$R/dev/$d"
done
ln -s /proc/self/fd "$R/dev/fd"
mkdir -p "$R/dev/shm" && mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/dev/shm"
hostname "$H" 2>/dev/null || echo "$H" > /proc/sys/kernel/hostname
if command -v ip >/dev/null 2>&1; then ip link set lo up; fi
cd "$R"
exec chroot "$R" /bin/sh -c 'cd /home/sandbox && exec "$@"' sh "$@"
"""


def _library_binds() -> list[tuple[str, str]]:
    """(host, inside) read-only binds next to the agent: what tasks need to
    unpickle (cloudpickle), from the host's installation."""
    from noodle.codec import instance_library

    return [(host, os.path.join(os.path.dirname(INSIDE_AGENT), name)) for host, name in instance_library()]


def _staged_library_binds(dest: str) -> list[tuple[str, str]]:
    """``_library_binds`` from copies in ``dest``, a directory this kind
    controls: in userns mode bwrap runs as the slot's uid, which need not be
    able to search the host's installation (a venv under /root)."""
    from noodle.codec import stage_instance_library

    os.makedirs(dest, mode=0o755, exist_ok=True)
    os.chmod(dest, 0o755)  # noqa: S103 - searched by the slot's unprivileged uid
    stage_instance_library(dest)
    return [(os.path.join(dest, os.path.basename(inside)), inside) for _host, inside in _library_binds()]


def _python_host(python: str | None) -> str:
    """The interpreter that runs the agent, as a real path on the host."""
    if python is None:
        return os.path.realpath(sys.executable)
    found = shutil.which(python)
    if found is None:
        raise ConfigError(f"kinds.jail.python: {python!r} not found")
    return os.path.realpath(found)


def _python_paths(python: str | None) -> tuple[str | None, str]:
    """(host prefix to bind at /opt/python or None, interpreter path inside)."""
    exe = _python_host(python)
    prefix = os.path.realpath(sys.base_prefix) if python is None else os.path.dirname(os.path.dirname(exe))
    if not os.access(exe, os.X_OK):
        raise KindUnavailable(f"python {exe} is not executable: install the Debian package python3")
    if exe.startswith("/usr/"):
        return None, exe  # /usr is bound read-only anyway
    rel = os.path.relpath(exe, prefix)
    if rel.startswith(".."):
        raise ConfigError(f"kinds.jail.python: {exe} is not inside its prefix {prefix}")
    return prefix, os.path.join(INSIDE_PYTHON, rel)


def _blocked_for_others(path: str) -> str | None:
    """The first directory on the way to ``path`` that others cannot search."""
    cur = os.path.abspath(path)
    if not os.path.isdir(cur):
        cur = os.path.dirname(cur)
    while True:
        if not os.stat(cur).st_mode & 0o001:
            return cur
        if cur == "/":
            return None
        cur = os.path.dirname(cur)


def build_skeleton(dest: str) -> None:
    """The minimal lower layer, as `noodle image build jail` makes it, for hosts
    where that script was not run: mount points and a small /etc."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("usr", "etc", "tmp", "var/tmp", "proc", "dev", "sys", "run/noodle", "opt/python", "opt/noodle",
              "home/sandbox", "root"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + d
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(tmp, d))
        elif os.path.isdir(host):
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n",
        "etc/group": "root:x:0:\nsandbox:x:1000:\n",
        "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
        "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        "etc/resolv.conf": "",
    }
    for rel, text in files.items():
        with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
            f.write(text)
    # Explicit modes, whatever the umask (the supervisor's is 007): a root
    # filesystem must be readable by the slot uid. os.walk lists symlinks
    # to directories but does not enter them, and they are never chmodded.
    for dirpath, _dirs, names in os.walk(tmp):
        os.chmod(dirpath, 0o755)  # noqa: S103 - see above
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644)
    for d, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700), ("home/sandbox", 0o777)):
        os.chmod(os.path.join(tmp, d), mode)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def _makedirs(path: str, mode: int) -> None:
    """os.makedirs, with ``mode`` set on every directory it creates whatever
    the process umask; existing ones (a lower layer's /tmp) keep theirs."""
    missing = []
    cur = os.path.abspath(path)
    while not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    os.makedirs(path, exist_ok=True)
    for d in missing:
        os.chmod(d, mode)


# -- process plumbing ------------------------------------------------------------


def _wait_ready(ready_r: int, timeout: float, log_path: str) -> None:
    data = read_exact(ready_r, 1, timeout)
    if data == b"R":
        return
    if data:
        raise StepFailed(f"unexpected ready byte {data!r}; log tail: {log_tail(log_path)}")
    ready, _, _ = select.select([ready_r], [], [], 0)
    why = "exited before it was ready" if ready else f"was not ready within {timeout} s"
    raise StepFailed(f"the jail {why}: log tail: {log_tail(log_path) or '(empty)'}")


# Run by an interpreter other than ours: the source on stdin, the .pyc on
# stdout (a header as importlib writes it, then the marshalled code).
_COMPILE = (
    "import sys, marshal, importlib.util as u; s = sys.stdin.buffer.read(); "
    "c = compile(s, sys.argv[1], 'exec', dont_inherit=True); "
    "sys.stdout.buffer.write(u.MAGIC_NUMBER + bytes(4) + int(sys.argv[2]).to_bytes(4, 'little') "
    "+ (len(s) & 0xFFFFFFFF).to_bytes(4, 'little') + marshal.dumps(c))"
)
_COMPILE_TIMEOUT_S = 120.0


def agent_byte_code(python: str, src: str, dest: str, uid: int, gid: int) -> str | None:
    """Compile the agent ``src`` to ``dest`` (0644, replaced atomically) for
    the interpreter ``python`` that will run it, since byte code is specific
    to an interpreter's version; None, with a warning, when that fails (the
    jail then runs the source, compiling it at every start).

    Our own interpreter compiles in this process. Another one runs on the
    host for that, so it runs as ``uid``/``gid`` without privileges, as it
    does in the jail: the setting may name an interpreter that someone
    other than root can replace. The byte code is made from the host's own
    agent file and runs only in the jails, never on the host."""
    with open(src, "rb") as f:
        source = f.read()
    mtime = int(os.stat(src).st_mtime) & 0xFFFFFFFF
    if python == os.path.realpath(sys.executable):
        try:
            code = compile(source, INSIDE_AGENT_SOURCE, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            log.warning("jail: cannot compile the agent %s (%s); instances compile it at every start", src, exc)
            return None
        head = importlib.util.MAGIC_NUMBER + bytes(4) + mtime.to_bytes(4, "little")
        data = head + (len(source) & 0xFFFFFFFF).to_bytes(4, "little") + marshal.dumps(code)
    else:
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        argv = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
                "--bounding-set=-all", "--inh-caps=-all", python, "-I", "-S", "-c", _COMPILE,
                INSIDE_AGENT_SOURCE, str(mtime)]  # fmt: skip
        try:
            done = subprocess.run(argv, input=source, capture_output=True, cwd="/", env={"PATH": "/usr/bin:/bin"},
                                  timeout=_COMPILE_TIMEOUT_S, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("jail: %s could not compile the agent (%s); instances compile it at every start", python, exc)
            return None
        data = done.stdout
        if done.returncode != 0 or len(data) <= _PYC_HEADER:
            why = done.stderr.decode(errors="replace").strip()[-400:] or f"exit status {done.returncode}"
            log.warning("jail: %s could not compile the agent (%s); instances compile it at every start", python, why)
            return None
    return _write_readable(dest, data)


_PYC_HEADER = 16


def _copy_readable(src: str, dest: str) -> str:
    """Copy ``src`` to ``dest`` as ``_write_readable`` writes."""
    with open(src, "rb") as f:
        return _write_readable(dest, f.read())


def _write_readable(dest: str, data: bytes) -> str:
    """Write ``dest`` readable by everyone (0644), replacing it atomically
    so a sandbox starting meanwhile binds a whole file."""
    tmp = f"{dest}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), 0o644)  # explicit: the supervisor's umask is 007
    os.replace(tmp, dest)
    return dest
