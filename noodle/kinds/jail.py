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
  ``pids_limit`` tasks (see ``_cgroup``);
* the agent listens on ``/run/noodle/agent.sock`` inside, which is
  ``<slot>/sock/agent.sock`` on the host.

Every name a leftover can be found by (cgroup, mount source, slot dir)
carries the pool name and the slot id, so ``clean`` needs no descriptor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from noodle.errors import ConfigError, KindUnavailable, StepFailed
from noodle.handle import AgentHandle
from noodle.kinds._cgroup import Layout, SlotCgroup, detect, kill_process_tree, pid_start_time, same_process
from noodle.kinds._mounts import mount, mounts_under, unmount_all
from noodle.kinds.base import Kind, PoolInfo, SlotContext

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_FILE = os.path.join(_PKG, "agent.py")
_REPO_ROOTFS = os.path.join(
    os.path.dirname(_PKG), "images", "build", "jail", "rootfs"
)
INSIDE_SOCKET = "/run/noodle/agent.sock"
INSIDE_AGENT = "/opt/noodle/agent.py"
INSIDE_PYTHON = "/opt/python"
_PID = struct.Struct("=q")
# The ready pipe's fd number in the sandbox; fds are staged above _HIGH_FD.
_READY_FD = 3
_HIGH_FD = 64
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SUN_PATH_MAX = 107


class JailKind(Kind):
    name = "jail"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {
        # Lower directory of the overlay root; images/jail/build.sh makes the
        # default. None: the repo's build, else a skeleton made in setup().
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
        self._rootfs = ""
        self._own_rootfs = False
        self._python_prefix: str | None = None
        self._python_inside = ""

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
        self._python_prefix, self._python_inside = _python_paths(o["python"])
        if not os.path.isfile(AGENT_FILE):
            raise KindUnavailable(f"the agent file {AGENT_FILE} is missing: reinstall pool-noodle")
        if o["rootfs"] is not None:
            self._rootfs = os.path.abspath(o["rootfs"])
            if not os.path.isdir(self._rootfs):
                raise ConfigError(f"kinds.jail.rootfs: {self._rootfs} is not a directory (run images/jail/build.sh)")
        elif os.path.isdir(_REPO_ROOTFS):
            self._rootfs = _REPO_ROOTFS
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
            paths = [self.pool.run_dir, AGENT_FILE, *o["ro_binds"], *(host for host, _ in _library_binds())]
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
            raise KindUnavailable("bwrap not found: install the Debian package bubblewrap (images/jail/build.sh does)")
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
        _kill_pidfile(os.path.join(slot.dir, "pid"), timeout)
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
        files = [INSIDE_AGENT]
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
        if not mounts_under(root):
            raise StepFailed(f"slot {slot.slot} is not prepared: nothing is mounted on {root}")
        cg = self.slot_cgroup(slot.slot)
        sock = self.socket_path(slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        log_path = os.path.join(slot.dir, "log")
        argv, env = self._command(slot)
        pid, ready_r = _launch(argv, env, log_path, cg)
        start = pid_start_time(pid)
        _write_pidfile(os.path.join(slot.dir, "pid"), pid, start)
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
        timeout = float(self.options["kill_timeout"])
        if cg is not None:
            cg.kill_all(timeout)
        # also when the launcher is dead: its group may still hold the rest
        _kill_group_and_wait(pid, start, timeout)

    def health(self, descriptor: Mapping[str, Any], timeout: float) -> bool:
        return self.client_health(descriptor, timeout)

    # -- client side -------------------------------------------------------------

    @classmethod
    def client_handle(cls, descriptor: Mapping[str, Any]) -> AgentHandle:
        return AgentHandle(str(descriptor["socket"]))

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        """The launcher is still the process spawn started (pid + start time
        from the descriptor, so a reused pid does not count) and the agent
        answers a ping: an agent whose launcher died is not handed out."""
        pid, start = descriptor.get("pid"), descriptor.get("start")
        if not (isinstance(pid, int) and isinstance(start, int) and same_process(pid, start)):
            return False
        return AgentHandle.probe(str(descriptor["socket"]), timeout)

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
        agent = [self._python_inside, "-S", INSIDE_AGENT, "--socket", INSIDE_SOCKET, "--ready-fd", str(_READY_FD)]
        drop = [
            shutil.which("setpriv") or "/usr/bin/setpriv",
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
        bwrap = shutil.which("bwrap") or "bwrap"
        argv = [bwrap, "--bind", root, "/"]
        for d in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = "/" + d
            if os.path.isdir(host) and not os.path.islink(host) and os.path.isdir(os.path.join(root, d)):
                argv += ["--ro-bind", host, host]
        if self._python_prefix is not None:
            argv += ["--ro-bind", self._python_prefix, INSIDE_PYTHON]
        argv += ["--ro-bind", AGENT_FILE, INSIDE_AGENT]
        for host, inside in _library_binds():
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
        binds += [AGENT_FILE, INSIDE_AGENT]
        for host, inside in _library_binds():
            binds += [host, inside]
        for path in o["ro_binds"]:
            binds += [path, path]
        flags = ["--pid", "--fork", "--mount", "--ipc", "--uts", "--cgroup", "--propagation", "private"]
        if not o["network"]:
            flags.append("--net")
        unshare = shutil.which("unshare") or "unshare"
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


def _python_paths(python: str | None) -> tuple[str | None, str]:
    """(host prefix to bind at /opt/python or None, interpreter path inside)."""
    if python is None:
        exe = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
    else:
        found = shutil.which(python)
        if found is None:
            raise ConfigError(f"kinds.jail.python: {python!r} not found")
        exe = os.path.realpath(found)
        prefix = os.path.dirname(os.path.dirname(exe))
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
    """The minimal lower layer, as images/jail/build.sh makes it, for hosts
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


def _launch(argv: list[str], env: dict[str, str], log_path: str, cg: SlotCgroup | None) -> tuple[int, int]:
    """Start ``argv`` detached (double fork, so it is never the worker's
    child: the supervisor, a subreaper, reaps it) as the leader of a new
    session and process group, inside ``cg``.
    Returns (its pid, the read end of the ready pipe)."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    full_env = env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked children
            _launcher_child(argv, full_env, log_fd, ready_w, cg)
        os.close(ready_w)
        ready_w = -1
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise StepFailed(f"launching the sandbox failed before exec: {_tail(log_path)}")
        data = _read_exact(ready_r, _PID.size, 5.0)
        if len(data) != _PID.size:
            raise StepFailed(f"launching the sandbox failed: no pid reported; {_tail(log_path)}")
        (pid,) = _PID.unpack(data)
        return int(pid), ready_r
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        if ready_w >= 0:
            os.close(ready_w)
        os.close(log_fd)


def _launcher_child(
    argv: list[str], env: dict[str, str], log_fd: int, ready_w: int, cg: SlotCgroup | None
) -> None:  # pragma: no cover - runs in the forked children
    code = 1
    try:
        if os.fork() != 0:
            os._exit(0)
        # setsid here, in the process that execs: the launcher's pid is then
        # the id of its session and process group, which _stop kills.
        os.setsid()
        code = 2
        if cg is not None:
            cg.join_self()
        os.write(ready_w, _PID.pack(os.getpid()))
        # Move the fds to keep above the targets first, so that no dup2
        # overwrites one not yet placed: 0 null, 1+2 log, 3 ready.
        log_hi = fcntl.fcntl(log_fd, fcntl.F_DUPFD, _HIGH_FD)
        ready_hi = fcntl.fcntl(ready_w, fcntl.F_DUPFD, _HIGH_FD)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_hi, 1)
        os.dup2(log_hi, 2)
        os.dup2(ready_hi, _READY_FD)
        # Nothing of the worker (queues, segments, sockets) leaks inside.
        os.closerange(_READY_FD + 1, 65536)
        os.execve(argv[0], argv, env)  # noqa: S606 - argv is built by this module
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return into the worker
        with contextlib.suppress(BaseException):
            os.write(2, f"noodle jail launcher: {exc!r}\n".encode())
    os._exit(code)


def _read_exact(fd: int, n: int, timeout: float) -> bytes:
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


def _wait_ready(ready_r: int, timeout: float, log_path: str) -> None:
    data = _read_exact(ready_r, 1, timeout)
    if data == b"R":
        return
    if data:
        raise StepFailed(f"unexpected ready byte {data!r}; {_tail(log_path)}")
    ready, _, _ = select.select([ready_r], [], [], 0)
    why = "exited before it was ready" if ready else f"was not ready within {timeout} s"
    raise StepFailed(f"the jail {why}: {_tail(log_path)}")


def _tail(path: str, limit: int = 800) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"
    return f"log tail: {text}" if text else "(log empty)"


def _write_pidfile(path: str, pid: int, start: int | None) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{pid} {start if start is not None else 0}\n")


def _kill_pidfile(path: str, timeout: float) -> None:
    """Kill the jail recorded by spawn: the way back to a jail started
    without a cgroup, after a crash. Its group's stragglers go even when the
    launcher is dead, never anything of a pid reused since."""
    try:
        with open(path, encoding="ascii") as f:
            pid_s, start_s = f.read().split()
        pid, start = int(pid_s), int(start_s)
    except (OSError, ValueError):
        return
    _kill_group_and_wait(pid, start or None, timeout)


def _kill_group_and_wait(pid: int, start: int | None, timeout: float) -> None:
    """SIGKILL the launcher's process group (it is a session leader) and its
    descendants (the pid namespace's init, the agent, anything that left the
    group below them), then wait until all are gone or zombies for the
    subreaper to collect. Without a cgroup this is what stops the jail."""
    kill_process_tree(pid, start, grace=0.0, timeout=timeout)
