"""The microvm kind against real QEMU guests (no mocks).

TCG boots take seconds here, so one module-scoped template (setup(): a cold
boot, a saved snapshot) serves every test; each test then gets a pool of
its own name whose run_dir holds hard links to that template, and drives
clean/prepare/spawn (a restore)/terminate directly. At teardown every test
asserts that no QEMU of its pool is left. If the guest images are missing,
the fixture runs noodle/images/microvm/build.sh first (the documented command).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from noodle.errors import ConfigError, InstanceError, KindUnavailable
from noodle.host.proc import ProcessIdentity, is_alive, start_time
from noodle.kinds import _qemu, load_kind
from noodle.kinds.base import PoolInfo
from noodle.kinds.microvm import DEFAULT_IMAGE_DIR, MicrovmHandle, MicrovmKind, guest_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_SH = os.path.join(REPO, "noodle", "images", "microvm", "build.sh")
VM_TIMEOUT = 600


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "building the guest image needs root (apt-get)"
    if not os.path.exists(os.path.join(DEFAULT_IMAGE_DIR, "vmlinux")) or not os.path.exists(
        os.path.join(DEFAULT_IMAGE_DIR, "initramfs.cpio.gz")
    ):
        proc = subprocess.run(["bash", BUILD_SH, DEFAULT_IMAGE_DIR], capture_output=True, text=True, timeout=1200,
                              check=False)
        if proc.returncode != 0:
            return f"noodle image build microvm failed: {proc.stderr[-1500:]}"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 missing (Debian package qemu-system-x86)"
    return None


def qemu_of_pool(pool: str) -> list[int]:
    """Live QEMUs whose -name belongs to this pool (any slot or template)."""
    prefix = f"guest={guest_name(pool, '')}"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _qemu.cmdline(int(entry))
        if argv and "qemu-system" in argv[0] and any(a.startswith(prefix) for a in argv):
            if is_alive(int(entry)):
                found.append(int(entry))
    return found


def assert_no_qemu(pool: str, wait: float = 10.0) -> None:
    deadline = time.monotonic() + wait
    while (left := qemu_of_pool(pool)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # do not let one test's leak break the next
        ProcessIdentity(pid, start_time(pid)).kill()
    assert not left, f"QEMU processes of pool {pool} left behind: {left}"


@dataclass
class Template:
    kind: MicrovmKind
    pool: PoolInfo
    setup_error: str | None


@pytest.fixture(scope="module")
def template() -> Iterator[Template]:
    reason = _why_unavailable()
    name = f"mvt{os.getpid()}{secrets.token_hex(2)}"
    run_dir = tempfile.mkdtemp(prefix="nmv", dir="/tmp")
    pool = PoolInfo(name, 4, run_dir, os.getuid(), os.getgid())
    kind = MicrovmKind(pool, {})
    error = reason
    if reason is None:
        try:
            kind.setup()
        except KindUnavailable as exc:
            error = str(exc)
    try:
        yield Template(kind, pool, error)
    finally:
        kind.teardown()
        assert not os.path.exists(kind.template_dir), "teardown left the template"
        shutil.rmtree(run_dir, ignore_errors=True)
        assert_no_qemu(name)


@dataclass
class Pool:
    kind: MicrovmKind
    info: PoolInfo


@pytest.fixture
def vmpool(template: Template) -> Iterator[Pool]:
    """A pool of this test's own name sharing the module's template (hard
    links), with a kind that did not run setup(): like a worker that reads
    the template back from the run_dir."""
    if template.setup_error is not None:
        pytest.skip(f"QEMU cannot run here: {template.setup_error}")
    name = f"mv{os.getpid()}{secrets.token_hex(3)}"
    run_dir = tempfile.mkdtemp(prefix="nmv", dir="/tmp")
    os.makedirs(os.path.join(run_dir, "microvm"))
    for fname in ("template.state", "template.ram", "template.json"):
        os.link(os.path.join(template.kind.template_dir, fname), os.path.join(run_dir, "microvm", fname))
    info = PoolInfo(name, 4, run_dir, os.getuid(), os.getgid())
    kind = MicrovmKind(info, {})
    try:
        yield Pool(kind, info)
    finally:
        for slot in range(info.pool_size):
            kind.clean(info.slot(slot))
        kind.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
        assert_no_qemu(name)


def _spawn(pool: Pool, slot: int) -> dict[str, Any]:
    ctx = pool.info.slot(slot)
    pool.kind.clean(ctx)
    pool.kind.prepare(ctx)
    return pool.kind.spawn(ctx)


# -- no VM needed ----------------------------------------------------------------------


def test_registered_under_its_name() -> None:
    assert load_kind("microvm") is MicrovmKind


def test_options_are_validated(tmp_path: Any) -> None:
    info = PoolInfo("optcheck", 1, str(tmp_path), 0, 0)
    with pytest.raises(ConfigError, match="accel"):
        MicrovmKind(info, {"accel": "xen"})
    with pytest.raises(ConfigError, match="unknown option"):
        MicrovmKind(info, {"vcpus": 2})
    with pytest.raises(ConfigError, match="memory_mb"):
        MicrovmKind(info, {"memory_mb": "lots"})
    with pytest.raises(ConfigError, match="warmup"):
        MicrovmKind(info, {"warmup": [1, 2]})


def test_long_run_dirs_get_short_socket_dirs() -> None:
    from noodle.kinds.microvm import _socket_dir

    short = "/tmp/x/slots/0"
    assert _socket_dir(short) == short
    long = "/tmp/" + "d" * 120 + "/slots/0"
    got = _socket_dir(long)
    assert got == _socket_dir(long) != _socket_dir(long + "1")
    assert len(os.path.join(got, "agent.sock")) <= _qemu.MAX_SOCKET_PATH


def test_missing_kernel_is_kind_unavailable(tmp_path: Any) -> None:
    info = PoolInfo(f"nok{secrets.token_hex(2)}", 1, str(tmp_path), 0, 0)
    kind = MicrovmKind(info, {"kernel": str(tmp_path / "no-such-vmlinux")})
    with pytest.raises(KindUnavailable, match=r"noodle image build microvm"):
        kind.setup()
    kind.teardown()
    assert_no_qemu(info.name, wait=0)


# -- with real guests ----------------------------------------------------------------------


@pytest.mark.timeout(VM_TIMEOUT)
def test_qemu_runs_on_this_machine(template: Template) -> None:
    """The other VM tests skip when QEMU cannot run; on this machine it
    can, so this one fails instead of letting them skip silently."""
    if os.environ.get("NOODLE_ALLOW_NO_QEMU") == "1" and template.setup_error:
        pytest.skip(template.setup_error)
    assert template.setup_error is None, template.setup_error
    assert template.kind.mode in ("kvm", "tcg")
    with open(template.kind.meta_path) as f:
        meta = json.load(f)
    assert meta["mode"] == template.kind.mode
    assert os.path.getsize(template.kind.state_path) > 0
    assert os.path.getsize(template.kind.ram_path) == template.kind.options["memory_mb"] << 20
    # setup() probes KVM for real; this host's /dev/kvm is a PVM one that
    # stock kernels cannot use, so TCG is the expected outcome here.
    assert not template.kind.helper_pids(), "the template VM must not outlive setup()"


@pytest.mark.timeout(VM_TIMEOUT)
def test_lifecycle_on_the_setup_kind(template: Template) -> None:
    """setup's own kind (state inherited, as forked workers get it):
    prepare, spawn (restore), exec, health, terminate, clean."""
    if template.setup_error is not None:
        pytest.skip(template.setup_error)
    kind, info = template.kind, template.pool
    ctx = info.slot(3)
    kind.clean(ctx)
    kind.prepare(ctx)
    desc = kind.spawn(ctx)
    try:
        msgpack = pytest.importorskip("msgpack")
        assert len(msgpack.packb(desc)) < 1024
        assert set(desc) >= {"pid", "start", "agent", "qmp", "mode"}
        assert desc["mode"] == kind.mode
        assert start_time(desc["pid"]) == desc["start"]
        assert guest_name(info.name, 3) in " ".join(_qemu.cmdline(desc["pid"]))
        handle = MicrovmKind.client_handle(desc)
        assert isinstance(handle, MicrovmHandle)
        res = handle.exec(["echo", "hi"])
        assert (res.returncode, res.stdout, res.stderr) == (0, "hi\n", "")
        with pytest.raises(InstanceError, match="no Python"):
            handle.run("1+1")
        handle.close()
        assert kind.health(desc, 10.0)
        assert MicrovmKind.client_health(desc, 10.0)
        assert MicrovmKind.instance_pids(desc) == [desc["pid"]]
    finally:
        kind.terminate(ctx, desc)
    assert not ProcessIdentity(desc["pid"], desc["start"]).alive()
    assert not kind.health(desc, 2.0)
    kind.clean(ctx)
    assert not os.path.exists(ctx.dir)
    assert_no_qemu(info.name, wait=0)


@pytest.mark.timeout(VM_TIMEOUT)
def test_spawn_exec_health_terminate_clean(vmpool: Pool) -> None:
    desc = _spawn(vmpool, 0)
    ctx = vmpool.info.slot(0)
    pid = desc["pid"]
    # Not our child: double-forked, in a session of its own.
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ppid, sid = int(fields[1]), int(fields[3])
    assert ppid != os.getpid()
    assert sid != os.getsid(0)
    handle = MicrovmKind.client_handle(desc)
    res = handle.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
    res = handle.exec(["cat"], timeout=None)
    assert res.returncode == 0
    with pytest.raises(InstanceError, match="FileNotFoundError"):
        handle.exec(["/no/such/program"])
    with pytest.raises(InstanceError, match="TimeoutExpired"):
        handle.exec(["sleep", "30"], timeout=1.0)
    # The agent is still in sync after all of that.
    assert handle.exec(["echo", "still here"]).stdout == "still here\n"
    handle.close()
    # A new connection (a second client) resynchronises the stream.
    again = MicrovmKind.client_handle(desc)
    assert again.ping(10.0)
    assert again.exec(["printf", "%s", "ünïcode ✓"]).stdout == "ünïcode ✓"
    again.close()
    assert vmpool.kind.health(desc, 10.0)
    vmpool.kind.terminate(ctx, desc)
    assert not ProcessIdentity(pid, desc["start"]).alive()
    vmpool.kind.terminate(ctx, desc)  # idempotent on a gone instance
    vmpool.kind.clean(ctx)
    assert not os.path.exists(ctx.dir)


@pytest.mark.timeout(VM_TIMEOUT)
def test_restored_guests_get_own_entropy_and_identity(vmpool: Pool) -> None:
    probe = [
        "sh",
        "-c",
        "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        " hostname; cat /run/noodle/slot /run/noodle/pool",
    ]
    outs = []
    for slot in (1, 2):
        desc = _spawn(vmpool, slot)
        lines = MicrovmKind.client_handle(desc).exec(probe).stdout.splitlines()
        outs.append(lines)
        _uuid, rnd, host, slot_id, pool = lines
        assert host.endswith(f"-{slot}") and vmpool.info.name.lower() in host
        assert slot_id == str(slot)
        assert pool == vmpool.info.name
        assert len(rnd) == 64
    assert outs[0][0] != outs[1][0], "two guests restored from one snapshot share their RNG state"
    assert outs[0][1] != outs[1][1], "two guests restored from one snapshot share their RNG state"
    assert outs[0][2] != outs[1][2]


@pytest.mark.timeout(VM_TIMEOUT)
def test_guest_has_only_loopback(vmpool: Pool) -> None:
    desc = _spawn(vmpool, 0)
    handle = MicrovmKind.client_handle(desc)
    assert handle.exec(["ls", "/sys/class/net"]).stdout.split() == ["lo"]
    assert "127.0.0.1" in handle.exec(["ip", "-4", "addr", "show", "lo"]).stdout


@pytest.mark.timeout(VM_TIMEOUT)
def test_killed_qemu_is_unhealthy(vmpool: Pool) -> None:
    desc = _spawn(vmpool, 1)
    assert vmpool.kind.health(desc, 10.0)
    os.kill(desc["pid"], signal.SIGKILL)
    assert ProcessIdentity(desc["pid"], desc["start"]).wait_gone(10.0)
    assert not vmpool.kind.health(desc, 2.0)
    assert not MicrovmKind.client_health(desc, 2.0)
    ctx = vmpool.info.slot(1)
    vmpool.kind.terminate(ctx, desc)
    vmpool.kind.clean(ctx)
    assert not os.path.exists(ctx.dir)


@pytest.mark.timeout(VM_TIMEOUT)
def test_terminate_never_kills_a_reused_pid(vmpool: Pool) -> None:
    desc = _spawn(vmpool, 2)
    ctx = vmpool.info.slot(2)
    stale = dict(desc, start=desc["start"] - 1)  # the recorded process "ended", the pid was reused
    vmpool.kind.terminate(ctx, stale)
    assert ProcessIdentity(desc["pid"], desc["start"]).alive()
    assert vmpool.kind.health(desc, 10.0)
    vmpool.kind.terminate(ctx, desc)
    assert not ProcessIdentity(desc["pid"], desc["start"]).alive()


@pytest.mark.timeout(VM_TIMEOUT)
def test_clean_after_crash_without_descriptor(vmpool: Pool) -> None:
    """A worker died after spawn: no descriptor, no terminate. clean finds
    the QEMU by its pidfile, or by /proc when even the pidfile is missing,
    and leaves no process, socket or file."""
    descs = {slot: _spawn(vmpool, slot) for slot in (0, 3)}
    os.unlink(os.path.join(vmpool.info.slot(3).dir, "qemu.pid"))
    for slot, desc in descs.items():
        ctx = vmpool.info.slot(slot)
        assert os.path.exists(desc["agent"]) and os.path.exists(desc["qmp"])
        vmpool.kind.clean(ctx)
        assert not ProcessIdentity(desc["pid"], desc["start"]).alive()
        assert not os.path.exists(desc["agent"]) and not os.path.exists(desc["qmp"])
        assert not os.path.exists(ctx.dir)
        assert guest_name(vmpool.info.name, slot) not in " ".join(
            " ".join(_qemu.cmdline(p)) for p in qemu_of_pool(vmpool.info.name)
        )
    assert_no_qemu(vmpool.info.name, wait=0)
    # clean of a slot that never existed is fine, and idempotent.
    vmpool.kind.clean(vmpool.info.slot(1))
    vmpool.kind.clean(vmpool.info.slot(1))


@pytest.mark.timeout(VM_TIMEOUT)
def test_names_do_not_collide_across_pools(vmpool: Pool, template: Template) -> None:
    """Slot 0 of two pools at once: separate QEMUs, sockets and cleans."""
    mine = _spawn(vmpool, 0)
    other_ctx = template.pool.slot(0)
    template.kind.clean(other_ctx)
    template.kind.prepare(other_ctx)
    other = template.kind.spawn(other_ctx)
    try:
        assert mine["agent"] != other["agent"] and mine["pid"] != other["pid"]
        vmpool.kind.clean(vmpool.info.slot(0))
        assert not ProcessIdentity(mine["pid"], mine["start"]).alive()
        assert ProcessIdentity(other["pid"], other["start"]).alive()
        assert MicrovmKind.client_handle(other).exec(["cat", "/run/noodle/pool"]).stdout.strip() == template.pool.name
    finally:
        template.kind.clean(other_ctx)
    assert not ProcessIdentity(other["pid"], other["start"]).alive()
