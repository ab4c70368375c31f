"""The ``microvm`` kind: one QEMU ``-M microvm`` guest per instance, restored
from a snapshot of a booted template.

Cold-booting the guest takes seconds under TCG (this host's /dev/kvm is a
PVM one that stock guest kernels cannot use), restoring a saved state about
a tenth of that. So ``setup()`` boots one template VM whose RAM is a shared
mapping of ``template.ram`` in the pool's run_dir, waits for its agent,
stops it and saves its device state with QMP ``migrate`` (x-ignore-shared:
the RAM is already in the file) and quits it. Every ``spawn`` starts a QEMU
that maps ``template.ram`` privately (copy-on-write: unmodified guest pages
are shared by all instances through the page cache) and loads the device
state with ``migrate-incoming``, then gives
the guest its own entropy, hostname, slot id and clock through the agent
(all restored guests start with the same RNG state) and runs one warm-up
command so that TCG's translation cache is hot before the lease.

Guest: the Debian cloud kernel (uncompressed vmlinux, PVH entry) and a
busybox initramfs with a static C agent on a virtio-serial port, both
built by ``noodle image build microvm``. The host reaches the agent through a
QEMU socket chardev; the handle is :class:`MicrovmHandle` (``exec`` and
``ping``; the guest has no Python, so ``run``/``call`` raise InstanceError).

Every QEMU runs as ``-name guest=noodle.<pool>.<slot>`` in its own session,
not as a child of the worker, with a pidfile ``<slot dir>/qemu.pid`` holding
pid and start time: ``clean`` finds it from that file or from /proc after a
crash, and nothing kills a pid that was reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

from noodle import images
from noodle.errors import ConfigError, InstanceError, InstanceGone, InstanceTimeout, KindUnavailable, StepFailed
from noodle.host.launch import launch_detached, log_tail, read_pidfile, write_pidfile
from noodle.host.proc import ProcessIdentity, is_alive
from noodle.kinds import _qemu
from noodle.kinds._qemu import MicrovmHandle, Qmp, VmConfig
from noodle.kinds.base import Kind, PoolInfo, SlotContext

log = logging.getLogger(__name__)

# where the images are found as this module is imported; each pool looks again
DEFAULT_IMAGE_DIR = images.find("microvm", "vmlinux")
_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

__all__ = ["MicrovmHandle", "MicrovmKind", "guest_name"]


def _safe_pool(pool: str) -> str:
    # The name goes into a QEMU option (commas are syntax there) and a
    # hostname; an odd pool name is replaced by a stable digest.
    if _SAFE.match(pool):
        return pool
    return "h" + hashlib.sha256(pool.encode()).hexdigest()[:16]


def guest_name(pool: str, slot: int | str) -> str:
    """The ``-name guest=`` of a pool's QEMU for a slot (or "template")."""
    return f"noodle.{_safe_pool(pool)}.{slot}"


def _host_tsc_khz() -> int:
    """The host TSC rate; TCG guests read the host TSC, so this is theirs."""
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


def _socket_dir(path: str) -> str:
    """``path`` if sockets fit in it (sun_path is 108 bytes), else a short
    directory under /tmp derived from it."""
    if len(os.path.join(path, "agent.sock")) <= _qemu.MAX_SOCKET_PATH:
        return path
    return os.path.join("/tmp", "noodle-mvm-" + hashlib.sha256(path.encode()).hexdigest()[:20])


class MicrovmKind(Kind):
    """QEMU microvm instances restored from a template snapshot."""

    name: ClassVar[str] = "microvm"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {
        "image_dir": (str, None),  # holds vmlinux and initramfs.cpio.gz (build.sh output)
        "kernel": (str, None),
        "initrd": (str, None),
        "qemu": (str, "qemu-system-x86_64"),
        "accel": (str, "auto"),  # auto (KVM if a KVM guest really boots, else TCG), kvm, tcg
        "memory_mb": (int, 128),
        "cpus": (int, 1),
        "append": (str, ""),  # extra kernel command line
        "tsc_khz": (int, None),  # None: the host's
        "boot_timeout": ((int, float), 90.0),
        "kvm_probe_timeout": ((int, float), 15.0),
        "restore_timeout": ((int, float), 30.0),
        "warmup": (list, ["true"]),  # argv run in each restored guest before it is ready; [] for none
    }

    def __init__(self, pool: PoolInfo, options: Mapping[str, Any]) -> None:
        super().__init__(pool, options)
        opts = self.options
        if opts["accel"] not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"kinds.microvm.accel: expected auto, kvm or tcg, got {opts['accel']!r}")
        if opts["memory_mb"] < 32 or opts["cpus"] < 1:
            raise ConfigError("kinds.microvm: memory_mb must be >= 32 and cpus >= 1")
        if not all(isinstance(a, str) for a in opts["warmup"]):
            raise ConfigError("kinds.microvm.warmup: expected a list of strings (an argv)")
        image_dir = opts["image_dir"] or os.environ.get("NOODLE_MICROVM_IMAGES") or images.find("microvm", "vmlinux")
        self.kernel = opts["kernel"] or os.path.join(image_dir, "vmlinux")
        self.initrd = opts["initrd"] or os.path.join(image_dir, "initramfs.cpio.gz")
        self.template_dir = os.path.join(pool.run_dir, "microvm")
        self.state_path = os.path.join(self.template_dir, "template.state")
        self.ram_path = os.path.join(self.template_dir, "template.ram")
        self.meta_path = os.path.join(self.template_dir, "template.json")
        self.mode: str | None = None
        self.vm: VmConfig | None = None
        self._template_pid: int | None = None

    # -- supervisor side ----------------------------------------------------------

    def _config(self, accel: str) -> VmConfig:
        qemu = shutil.which(self.options["qemu"])
        if qemu is None:
            raise KindUnavailable(
                f"{self.options['qemu']} not found: install the Debian package qemu-system-x86 "
                "(`noodle image build microvm` does)"
            )
        for path, what in ((self.kernel, "kernel"), (self.initrd, "initramfs")):
            if not os.path.isfile(path):
                raise KindUnavailable(f"microvm {what} {path} missing: run `noodle image build microvm` (as root)")
        tsc = self.options["tsc_khz"]
        return VmConfig(
            qemu=qemu,
            kernel=self.kernel,
            initrd=self.initrd,
            accel=accel,
            memory_mb=self.options["memory_mb"],
            cpus=self.options["cpus"],
            tsc_khz=_host_tsc_khz() if tsc is None else tsc,
            append=self.options["append"],
        )

    def setup(self) -> None:
        os.makedirs(self.template_dir, mode=0o700, exist_ok=True)
        self._kill_template()
        accel = self.options["accel"]
        tcg = self._config("tcg")  # raises KindUnavailable early
        if accel in ("auto", "kvm"):
            reason = self._kvm_unusable_reason()
            if reason is None:
                try:
                    self._build_template(self._config("kvm"), float(self.options["kvm_probe_timeout"]))
                except StepFailed as exc:
                    reason = f"a KVM guest did not boot: {exc}"
            if reason is None:
                log.info("microvm pool %s: KVM works, instances run with -accel kvm", self.pool.name)
                return
            if accel == "kvm":
                raise KindUnavailable(f"microvm accel=kvm requested but {reason}")
            log.warning("microvm pool %s: %s; running QEMU in TCG (software emulation)", self.pool.name, reason)
        self._build_template(tcg, float(self.options["boot_timeout"]))
        log.info("microvm pool %s: TCG mode, template snapshot at %s", self.pool.name, self.state_path)

    @staticmethod
    def _kvm_unusable_reason() -> str | None:
        if not os.path.exists("/dev/kvm"):
            return "/dev/kvm does not exist"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "/dev/kvm is not accessible"
        return None

    def _build_template(self, cfg: VmConfig, timeout: float) -> None:
        """Boot the template VM, wait for its agent, save its state, quit it.
        On KVM this boot is also the proof that KVM works."""
        sdir = _socket_dir(self.template_dir)
        os.makedirs(sdir, mode=0o700, exist_ok=True)
        agent_sock, qmp_sock = os.path.join(sdir, "agent.sock"), os.path.join(sdir, "qmp.sock")
        # Unlink, never rewrite: restored instances map the old RAM file
        # privately and must keep seeing the contents they were restored from.
        for path in (agent_sock, qmp_sock, self.state_path, self.ram_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        console = os.path.join(self.template_dir, f"console-{cfg.accel}.log")
        qemu_log = os.path.join(self.template_dir, f"qemu-{cfg.accel}.log")
        for path in (console, qemu_log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        argv = _qemu.qemu_argv(
            cfg, guest_name(self.pool.name, "template"), agent_sock, qmp_sock, console, self.ram_path, ram_shared=True
        )
        t0 = time.monotonic()
        deadline = t0 + timeout
        proc = launch_detached(argv, qemu_log)
        pid = proc.pid
        self._template_pid = pid
        try:
            with Qmp(qmp_sock, timeout=max(1.0, deadline - time.monotonic()), pid=pid) as qmp:
                handle = MicrovmHandle(agent_sock)
                try:
                    while not handle.ping(min(5.0, max(0.1, deadline - time.monotonic()))):
                        if not proc.alive():
                            raise StepFailed("QEMU exited during boot")
                        if time.monotonic() > deadline:
                            raise StepFailed(f"the template's agent did not answer within {timeout} s")
                        time.sleep(0.05)
                    booted = time.monotonic() - t0
                finally:
                    # Disconnect before saving: restored guests then start
                    # with the port closed and wait for their own client.
                    handle.close()
                tmp = self.state_path + ".tmp"
                qmp.save(tmp, timeout=60.0)
                os.replace(tmp, self.state_path)
                with contextlib.suppress(_qemu.QmpError):
                    qmp.execute("quit")
        except BaseException as exc:
            proc.kill()
            self._template_pid = None
            if isinstance(exc, (StepFailed, InstanceGone, InstanceTimeout)):
                raise StepFailed(f"{exc}{_qemu_log(qemu_log)}") from None
            raise
        proc.kill(timeout=5.0)
        self._template_pid = None
        self.mode, self.vm = cfg.accel, cfg
        with open(self.meta_path + ".tmp", "w") as f:
            json.dump({"mode": cfg.accel, "vm": asdict(cfg), "boot_seconds": booted}, f)
        os.replace(self.meta_path + ".tmp", self.meta_path)
        log.info(
            "microvm pool %s: template booted in %.2f s (%s), state %d bytes",
            self.pool.name,
            booted,
            cfg.accel,
            os.path.getsize(self.state_path),
        )

    def maintain(self) -> None:
        # The template VM only lives during setup; what must survive is its
        # saved state. Rebuild it if something removed it.
        if self.vm is not None and not (os.path.exists(self.state_path) and os.path.exists(self.ram_path)):
            log.warning("microvm pool %s: template state vanished, rebuilding it", self.pool.name)
            self._build_template(self.vm, float(self.options["boot_timeout"]))

    def teardown(self) -> None:
        self._kill_template()
        sdir = _socket_dir(self.template_dir)
        if sdir != self.template_dir:
            shutil.rmtree(sdir, ignore_errors=True)
        shutil.rmtree(self.template_dir, ignore_errors=True)

    def _kill_template(self) -> None:
        for pid in _qemu.find_qemu(guest_name(self.pool.name, "template")):
            if (proc := ProcessIdentity.of(pid)) is not None:
                proc.kill()

    def helper_pids(self) -> set[int]:
        pid = self._template_pid
        return {pid} if pid is not None and is_alive(pid) else set()

    # -- worker side ----------------------------------------------------------------

    def _template(self) -> VmConfig:
        """The template's VmConfig: inherited from setup() through fork, or
        read back from template.json by a process that did not run it."""
        if self.vm is None:
            try:
                with open(self.meta_path) as f:
                    meta = json.load(f)
                self.vm = VmConfig(**meta["vm"])
                self.mode = str(meta["mode"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StepFailed(f"no microvm template for pool {self.pool.name} (setup not run?): {exc}") from None
        if not os.path.exists(self.state_path) or not os.path.exists(self.ram_path):
            raise StepFailed(f"microvm template {self.state_path} or {self.ram_path} is missing")
        return self.vm

    def _paths(self, slot: SlotContext) -> dict[str, str]:
        sdir = _socket_dir(slot.dir)
        return {
            "sock_dir": sdir,
            "agent": os.path.join(sdir, "agent.sock"),
            "qmp": os.path.join(sdir, "qmp.sock"),
            "pidfile": os.path.join(slot.dir, "qemu.pid"),
            "log": os.path.join(slot.dir, "qemu.log"),
            "console": os.path.join(slot.dir, "console.log"),
        }

    def clean(self, slot: SlotContext) -> None:
        name = guest_name(slot.pool, slot.slot)
        paths = self._paths(slot)
        recorded = read_pidfile(paths["pidfile"])
        victims: dict[int, ProcessIdentity] = {}
        if recorded is not None and recorded.alive() and _qemu.is_our_qemu(recorded.pid, name):
            victims[recorded.pid] = recorded
        # A crash between launch and pidfile leaves no record: /proc knows.
        for pid in _qemu.find_qemu(name):
            if pid not in victims and (proc := ProcessIdentity.of(pid)) is not None:
                victims[pid] = proc
        stuck = [pid for pid, proc in victims.items() if not proc.kill()]
        if stuck:
            raise StepFailed(f"QEMU pid(s) {stuck} of {name} survived SIGKILL")
        if paths["sock_dir"] != slot.dir:
            shutil.rmtree(paths["sock_dir"], ignore_errors=True)
        shutil.rmtree(slot.dir, ignore_errors=True)
        if os.path.exists(slot.dir):
            raise StepFailed(f"could not remove {slot.dir}")

    def prepare(self, slot: SlotContext) -> None:
        self._template()
        paths = self._paths(slot)
        os.makedirs(slot.dir, mode=0o700, exist_ok=True)
        os.makedirs(paths["sock_dir"], mode=0o700, exist_ok=True)
        for key in ("agent", "qmp", "pidfile"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths[key])

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        cfg = self._template()
        paths = self._paths(slot)
        name = guest_name(slot.pool, slot.slot)
        argv = _qemu.qemu_argv(
            cfg, name, paths["agent"], paths["qmp"], paths["console"], self.ram_path, ram_shared=False, incoming=True
        )
        timeout = float(self.options["restore_timeout"])
        deadline = time.monotonic() + timeout
        proc = launch_detached(argv, paths["log"])
        pid, started = proc.pid, proc.start
        write_pidfile(paths["pidfile"], proc)
        try:
            with Qmp(paths["qmp"], timeout=timeout, pid=pid) as qmp:
                # Nothing may be sent to the agent before this returns: a
                # restoring guest drops serial input.
                qmp.restore(self.state_path, max(0.1, deadline - time.monotonic()))
            handle = MicrovmHandle(paths["agent"])
            try:
                reply = handle.request(
                    {
                        "op": "init",
                        "seed": secrets.token_hex(64),
                        "hostname": _hostname(slot),
                        "pool": slot.pool,
                        "slot": slot.slot,
                        "time": time.time(),
                    },
                    max(0.5, deadline - time.monotonic()),
                )
                if not reply.get("ok"):
                    raise StepFailed(f"guest init failed: {reply.get('error')}")
                warmup = list(self.options["warmup"])
                if warmup:
                    # The restored QEMU's translation cache is empty; paying
                    # for the first fork/exec here keeps it off the lease.
                    handle.exec(warmup, timeout=max(0.5, deadline - time.monotonic()))
            finally:
                handle.close()
        except BaseException as exc:
            proc.kill()
            if isinstance(exc, (StepFailed, InstanceError, InstanceGone, InstanceTimeout, OSError)):
                raise StepFailed(f"restoring {name} failed: {exc}{_qemu_log(paths['log'])}") from None
            raise
        return {
            "pid": pid,
            "start": started,
            "agent": paths["agent"],
            "qmp": paths["qmp"],
            "mode": cfg.accel,
            "slot": slot.slot,
        }

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        pid = descriptor.get("pid")
        started = descriptor.get("start")
        if not isinstance(pid, int) or pid <= 0:
            raise StepFailed(f"descriptor has no pid: {dict(descriptor)!r}")
        proc = ProcessIdentity(pid, started if isinstance(started, int) else None)
        if not proc.alive():
            return
        if not _qemu.is_our_qemu(pid, guest_name(slot.pool, slot.slot)):
            raise StepFailed(f"pid {pid} is not the QEMU of slot {slot.slot}; leaving it to clean")
        # A single-use guest has nothing worth a graceful shutdown.
        if not proc.kill():
            raise StepFailed(f"QEMU pid {pid} survived SIGKILL")

    # -- client side --------------------------------------------------------------------

    @classmethod
    def client_handle(cls, descriptor: Mapping[str, Any]) -> MicrovmHandle:
        return MicrovmHandle(str(descriptor["agent"]))

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        proc = ProcessIdentity.from_record(descriptor.get("pid"), descriptor.get("start"))
        if proc is None or not proc.alive():
            return False
        return MicrovmHandle.probe(str(descriptor["agent"]), timeout)


def _hostname(slot: SlotContext) -> str:
    pool = re.sub(r"[^a-z0-9-]", "-", _safe_pool(slot.pool).lower()).strip("-") or "pool"
    suffix = f"-{slot.slot}"
    return "noodle-" + pool[: 63 - len("noodle-") - len(suffix)] + suffix


def _qemu_log(path: str) -> str:
    text = log_tail(path, 600)
    return f" (QEMU log: {text})" if text else ""
