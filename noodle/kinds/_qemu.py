"""QEMU plumbing for the microvm kind: the command line, finding a guest's
QEMU, a small QMP client and the agent handle of a guest (launching and
killing go through ``noodle.host``).

Kept free of pool logic so the benchmark and the tests can boot a VM the
same way the kind does.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import secrets
import shlex
import socket
import time
from dataclasses import dataclass
from typing import Any

from noodle.agent import MAX_FRAME
from noodle.errors import InstanceGone, InstanceTimeout, StepFailed
from noodle.handle import AgentHandle
from noodle.host.proc import is_alive

AGENT_PORT = "noodle.agent"
# sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class VmConfig:
    """Everything that shapes the guest. A snapshot restores only into a
    QEMU started with the same machine, devices, memory and kernel, so one
    VmConfig serves the template and all its restored instances."""

    qemu: str
    kernel: str
    initrd: str
    accel: str  # "kvm" or "tcg"
    memory_mb: int = 128
    cpus: int = 1
    tsc_khz: int = 0
    append: str = ""

    def kernel_cmdline(self) -> str:
        # cryptomgr.notests: the crypto self-tests were half a second of a
        # TCG boot. init_on_free: freed pages are zero, and zero pages cost
        # nothing in the saved state (63 -> 53 MB here).
        parts = [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "rdinit=/init",
            "mitigations=off",
            "cryptomgr.notests",
            "init_on_free=1",
        ]
        if self.tsc_khz > 0:
            # Without it about one boot in ten hung here calibrating the TSC under TCG.
            parts.append(f"tsc_early_khz={self.tsc_khz}")
        if self.append:
            parts.append(self.append)
        return " ".join(parts)


def qemu_argv(
    cfg: VmConfig,
    name: str,
    agent_sock: str,
    qmp_sock: str,
    console: str | None,
    ram_file: str | None = None,
    ram_shared: bool = False,
    incoming: bool = False,
) -> list[str]:
    """The QEMU command line. ``name`` goes into ``-name guest=...`` and is
    how clean() recognises a slot's QEMU in /proc after a crash.

    ``ram_file``: guest RAM is a mapping of this file. The template maps it
    shared, so when it stops its RAM *is* the file and the migration stream
    (with x-ignore-shared) carries only device state, some kilobytes.
    Restored instances map the same file private: copy-on-write, pages
    shared through the page cache until a guest writes them. ``incoming``
    starts QEMU with ``-incoming defer`` (see :meth:`Qmp.restore`)."""
    accel = "kvm" if cfg.accel == "kvm" else "tcg,thread=single"
    cpu = "host" if cfg.accel == "kvm" else "max"
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on"
    argv = [cfg.qemu, "-name", f"guest={_opt(name)}"]
    if ram_file is not None:
        share = "on" if ram_shared else "off"
        argv += ["-object", f"memory-backend-file,id=ram,size={cfg.memory_mb}M,mem-path={_opt(ram_file)},share={share}"]
        machine += ",memory-backend=ram"
    argv += [
        "-M", machine,
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(cfg.cpus),
        "-m", f"{cfg.memory_mb}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", cfg.kernel,
        "-initrd", cfg.initrd,
        "-append", cfg.kernel_cmdline(),
        "-serial", f"file:{console}" if console else "null",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={_opt(agent_sock)},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-chardev", f"socket,id=qmp,path={_opt(qmp_sock)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def _opt(value: str) -> str:
    # A comma separates QEMU option properties; a literal one is doubled.
    return value.replace(",", ",,")


MIGRATE_CAPS = [{"capability": "x-ignore-shared", "state": True}]


# -- processes -----------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_our_qemu(pid: int, guest_name: str) -> bool:
    argv = cmdline(pid)
    if not argv or "qemu-system" not in os.path.basename(argv[0]):
        return False
    return any(a == "-name" and b == f"guest={guest_name}" for a, b in itertools.pairwise(argv))


def find_qemu(guest_name: str) -> list[int]:
    """Every live QEMU started with ``-name guest=<guest_name>``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_our_qemu(int(entry), guest_name):
            found.append(int(entry))
    return found


# -- QMP -------------------------------------------------------------------------


class QmpError(StepFailed):
    """QEMU answered a QMP command with an error, or the monitor went away."""


class Qmp:
    """A minimal synchronous QMP client (JSON lines over a Unix socket)."""

    def __init__(self, path: str, timeout: float = 10.0, pid: int | None = None) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        sock = connect_unix(path, deadline, pid)
        self._sock = sock
        self._rfile = sock.makefile("rb")
        greeting = self._read(deadline)
        if "QMP" not in greeting:
            self.close()
            raise QmpError(f"{path}: not a QMP greeting: {greeting!r}")
        self.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))

    def _read(self, deadline: float) -> dict[str, Any]:
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            line = self._rfile.readline()
        except TimeoutError:
            raise QmpError(f"{self.path}: QMP did not answer in time") from None
        except OSError as exc:
            raise QmpError(f"{self.path}: QMP connection broke: {exc}") from None
        if not line:
            raise QmpError(f"{self.path}: QEMU closed the monitor")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError(f"{self.path}: unexpected QMP message {msg!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"{self.path}: QMP connection broke: {exc}") from None
        while True:
            msg = self._read(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            if "return" in msg:
                return msg["return"]

    def wait_status(self, wanted: tuple[str, ...], timeout: float) -> str:
        """Poll query-status until the VM reaches one of ``wanted`` (e.g.
        paused once an incoming migration finished); returns it."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            status = self.execute("query-status", timeout=max(0.1, deadline - time.monotonic()))
            if status.get("status") in wanted:
                return str(status["status"])
            if status.get("status") in ("guest-panicked", "shutdown", "internal-error", "io-error"):
                raise QmpError(f"VM is {status.get('status')}, expected {wanted}")
            if time.monotonic() > deadline:
                raise QmpError(f"VM still {status.get('status')!r} after {timeout} s, expected {wanted}")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def save(self, state_path: str, timeout: float) -> None:
        """Stop the VM and write its device state to ``state_path`` (RAM
        stays in the shared RAM file, see :func:`qemu_argv`)."""
        deadline = time.monotonic() + timeout
        self.execute("stop")
        self.execute("migrate-set-capabilities", {"capabilities": MIGRATE_CAPS})
        # QEMU 7.2 has no file: migration URI; exec: writes through a pipe.
        self.execute("migrate", {"uri": "exec:cat > " + shlex.quote(state_path)})
        delay = 0.002
        while True:
            status = self.execute("query-migrate")
            if status.get("status") == "completed":
                return
            if status.get("status") in ("failed", "cancelled"):
                raise QmpError(f"saving the VM state failed: {status.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise QmpError("saving the VM state timed out")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def restore(self, state_path: str, timeout: float) -> None:
        """Load a state saved by :meth:`save` into a QEMU started with
        ``incoming=True`` and run it. The source was stopped before saving,
        so the loaded VM comes up paused and is continued here."""
        deadline = time.monotonic() + timeout
        self.execute("migrate-set-capabilities", {"capabilities": MIGRATE_CAPS})
        self.execute("migrate-incoming", {"uri": "exec:cat " + shlex.quote(state_path)})
        if self.wait_status(("paused", "running"), max(0.1, deadline - time.monotonic())) == "paused":
            self.execute("cont")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._rfile.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_unix(path: str, deadline: float, pid: int | None = None) -> socket.socket:
    """Connect, retrying while QEMU has not created the socket yet; give up
    early if ``pid`` (the QEMU) died meanwhile."""
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise StepFailed(f"cannot connect to {path}: {exc}") from None
        if pid is not None and not is_alive(pid):
            raise StepFailed(f"QEMU (pid {pid}) exited before opening {path}")
        if time.monotonic() > deadline:
            raise StepFailed(f"{path} did not appear in time")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# -- the agent over virtio-serial -------------------------------------------------


def sync_agent(sock: socket.socket, deadline: float, first_wait: float = 0.2) -> dict[str, Any]:
    """Ping with a fresh nonce and read frames until its echo comes back.

    A virtio-serial port is one stream shared by successive host clients:
    a reply meant for an earlier client (one that timed out) can still be
    in flight, and a restored guest drops input that arrived before the
    restore completed. Skipping frames until our nonce's echo fixes both;
    the ping is resent, with a growing wait, when no echo comes."""
    wait = first_wait
    buf = bytearray()
    while True:
        nonce = secrets.token_hex(8)
        body = json.dumps({"op": "ping", "nonce": nonce}).encode()
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.sendall(len(body).to_bytes(4, "big") + body)
        except OSError as exc:
            raise InstanceGone(f"agent connection broke: {exc}") from None
        until = min(deadline, time.monotonic() + wait)
        while True:
            reply = _take_frame(buf)
            if reply is not None:
                # Only the latest ping counts: replies come in request order,
                # so once it is answered no older reply is still on its way.
                if reply.get("nonce") == nonce and reply.get("ok"):
                    if buf:
                        raise InstanceGone("agent sent frames nobody asked for")
                    return reply
                continue
            left = until - time.monotonic()
            if left <= 0:
                break
            # Plain recv, not a makefile(): a buffered reader is unusable
            # after one timeout, and timing out here is expected.
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError as exc:
                raise InstanceGone(f"agent connection broke: {exc}") from None
            if not chunk:
                raise InstanceGone("agent connection closed")
            buf += chunk
        if time.monotonic() >= deadline:
            raise InstanceTimeout("the guest agent did not answer")
        wait = min(wait * 2, 2.0)


def _take_frame(buf: bytearray) -> dict[str, Any] | None:
    """Remove and decode one whole frame from the front of ``buf``."""
    if len(buf) < 4:
        return None
    size = int.from_bytes(buf[:4], "big")
    if size > MAX_FRAME:
        raise InstanceGone(f"agent sent a frame of {size} bytes")
    if len(buf) < 4 + size:
        return None
    body = bytes(buf[4 : 4 + size])
    del buf[: 4 + size]
    try:
        msg = json.loads(body)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


class MicrovmHandle(AgentHandle):
    """``lease.instance`` of a microvm: an AgentHandle that synchronises the
    virtio-serial stream (see :func:`sync_agent`) on every new connection.
    The guest agent is the C one: ``exec`` and ``ping`` work; ``run`` and
    ``call`` answer with an InstanceError because the guest has no Python."""

    def _connect(self, timeout: float) -> socket.socket:
        fresh = self._sock is None
        sock = super()._connect(timeout)
        if fresh:
            try:
                sync_agent(sock, time.monotonic() + timeout)
            except BaseException:
                self._drop()
                raise
        return sock
