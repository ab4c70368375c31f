"""The ``oci`` kind with real containers under runc, crun and runsc.

No mocks: every test creates containers on this host, drives the kind's
steps directly (as a worker would) and proves the isolation from inside the
container. Each test has its own pool name and run_dir, and its teardown
asserts that no container state, cgroup, process or mount of it is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from noodle.errors import ConfigError, InstanceError, InstanceGone, KindUnavailable, StepFailed
from noodle.host.proc import start_time as proc_start_time
from noodle.kinds import load_kind
from noodle.kinds.base import PoolInfo, SlotContext
from noodle.kinds.oci import (
    DEFAULT_ROOTFS,
    PACKAGES,
    RUNTIMES,
    OciKind,
    container_id,
)
from tests.kinds.ocilib import leftovers

BUILD_HINT = "run `noodle image build oci`"


def _unavailable(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here, or None. Only a real absence skips."""
    if os.geteuid() != 0:
        return "the OCI runtimes need root"
    if shutil.which(runtime) is None:
        return f"{runtime} is not installed (Debian package {PACKAGES[runtime]}; {BUILD_HINT})"
    if not os.path.isfile(os.path.join(DEFAULT_ROOTFS, "etc/noodle-image")):
        return f"no rootfs at {DEFAULT_ROOTFS} ({BUILD_HINT})"
    return None


class Env:
    """One test's pool: a unique name, a short run_dir (Unix socket paths
    are limited to 107 bytes) and every kind and slot it touched."""

    def __init__(self) -> None:
        self.name = "t" + uuid.uuid4().hex[:10]
        self.run_dir = tempfile.mkdtemp(prefix="noodle-oci-", dir="/tmp")
        self.used: list[tuple[OciKind, SlotContext]] = []

    def kind(self, runtime: str, pool_size: int = 2, **options: Any) -> OciKind:
        info = PoolInfo(self.name, pool_size, self.run_dir, os.getuid(), os.getgid())
        kind = OciKind(info, {"runtime": runtime, **options})
        kind.setup()
        return kind

    def slot(self, kind: OciKind, n: int = 0) -> SlotContext:
        slot = kind.pool.slot(n)
        self.used.append((kind, slot))
        return slot

    def leftovers(self) -> list[str]:
        found: list[str] = []
        for kind, slot in self.used:
            found += leftovers(slot.pool, slot.slot, kind.runtime)
            if os.path.exists(kind.bundle(slot)):
                found.append(f"bundle {kind.bundle(slot)}")
        found += [f"mount {mp}" for mp in _mounts_under(self.run_dir)]
        found += [f"process {pid} {cmd}" for pid, cmd in _processes_naming(self.run_dir, self.name)]
        return found


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [mp for mp in points if mp == path or mp.startswith(path + "/")]


def _processes_naming(*needles: str) -> list[tuple[int, str]]:
    """Live processes whose command line names the run_dir or the pool (the
    runsc gofer and sandbox carry the bundle path and container id)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc_start_time(int(entry)) is not None and any(n in cmd for n in needles):
            found.append((int(entry), cmd[:200]))
    return found


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        errors = []
        for kind, slot in e.used:
            try:
                kind.clean(slot)
            except Exception as exc:
                errors.append(f"clean {slot.slot}: {exc}")
        left = e.leftovers()
        shutil.rmtree(e.run_dir, ignore_errors=True)
        assert not errors, errors
        assert left == [], f"left behind: {left}"


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    rt = str(request.param)
    why = _unavailable(rt)
    if why:
        pytest.skip(why)
    return rt


def _spawn(env: Env, runtime: str, n: int = 0, **options: Any) -> tuple[OciKind, SlotContext, dict[str, Any]]:
    kind = env.kind(runtime, **options)
    slot = env.slot(kind, n)
    kind.clean(slot)
    kind.prepare(slot)
    return kind, slot, kind.spawn(slot)


def _wait_dead(kind: OciKind, desc: dict[str, Any], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not kind.health(desc, 1.0):
            return True
        time.sleep(0.05)
    return False


# -- the full cycle --------------------------------------------------------------


@pytest.mark.timeout(180)
def test_full_cycle(env: Env, runtime: str) -> None:
    kind, slot, desc = _spawn(env, runtime)
    cid = container_id(env.name, 0)
    assert desc["id"] == cid and env.name in cid
    assert desc["runtime"] == runtime
    assert len(msgpack.packb(desc)) < 1024
    assert set(desc) >= {"id", "runtime", "pid", "start", "socket", "bundle"}
    assert kind.health(desc, 5.0)
    assert OciKind.instance_pids(desc) == [desc["pid"]]

    handle = OciKind.client_handle(desc)
    try:
        assert handle.run("1+1").result == 2
        res = handle.exec(["echo", "hi"])
        assert (res.returncode, res.stdout) == (0, "hi\n")
        with pytest.raises(InstanceError):
            handle.run("raise ValueError('boom')")
    finally:
        handle.close()
    # The agent serves one connection at a time: health only after close.
    assert kind.health(desc, 5.0)

    kind.terminate(slot, desc)
    assert not kind.health(desc, 1.0)
    kind.clean(slot)
    assert env.leftovers() == []


@pytest.mark.timeout(120)
def test_container_is_not_a_child_of_the_worker(env: Env, runtime: str) -> None:
    kind, slot, desc = _spawn(env, runtime)
    with open(f"/proc/{desc['pid']}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()
    kind.terminate(slot, desc)


@pytest.mark.timeout(180)
def test_cycle_twice_in_one_slot(env: Env, runtime: str) -> None:
    kind = env.kind(runtime)
    slot = env.slot(kind)
    for _ in range(2):
        kind.clean(slot)
        kind.prepare(slot)
        desc = kind.spawn(slot)
        assert kind.health(desc, 5.0)
        kind.terminate(slot, desc)
    kind.clean(slot)


# -- isolation, proved from inside -------------------------------------------------


@pytest.mark.timeout(120)
def test_only_loopback(env: Env, runtime: str) -> None:
    kind, slot, desc = _spawn(env, runtime)
    handle = OciKind.client_handle(desc)
    try:
        names = handle.run("import socket; [n for _, n in socket.if_nameindex()]").result
        assert names == ["lo"]
        devs = handle.run("[l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]").result
        assert devs == ["lo"]
        # No route anywhere but loopback.
        err = handle.run(
            "import socket\n"
            "s = socket.socket(); s.settimeout(3)\n"
            "try:\n"
            "    s.connect(('192.0.2.1', 80)); r = 'connected'\n"
            "except OSError as e:\n"
            "    r = e.errno\n"
            "r"
        ).result
        assert err != "connected"
        # Loopback itself works.
        assert handle.run(
            "import socket\n"
            "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)\n"
            "c = socket.create_connection(l.getsockname(), timeout=3); c.close(); True"
        ).result
    finally:
        handle.close()
    kind.terminate(slot, desc)


@pytest.mark.timeout(180)
def test_host_and_other_slots_invisible(env: Env, runtime: str) -> None:
    kind = env.kind(runtime)
    slots = [env.slot(kind, 0), env.slot(kind, 1)]
    descs = []
    for s in slots:
        kind.clean(s)
        kind.prepare(s)
        descs.append(kind.spawn(s))
    secret = uuid.uuid4().hex
    h0, h1 = (OciKind.client_handle(d) for d in descs)
    try:
        h1.run(f"open('/tmp/secret', 'w').write({secret!r})")
        host_root = sorted(os.listdir("/root"))
        assert host_root, "test needs something in the host's /root"
        seen = h0.run(
            "import os\n"
            "try:\n"
            "    r = sorted(os.listdir('/root'))\n"
            "except OSError as e:\n"
            "    r = 'error %d' % e.errno\n"
            "r"
        ).result
        assert seen == [] or str(seen).startswith("error")
        for name in host_root[:20]:
            assert not h0.run(f"import os; os.path.lexists('/root/{name}')").result, name
        # Neither the pool's run_dir nor the other slot's files are reachable.
        assert not h0.run(f"import os; os.path.exists({env.run_dir!r})").result
        assert h0.run("import os; os.listdir('/run/noodle')").result == ["agent.sock"]
        assert not h0.run("import os; os.path.exists('/tmp/secret')").result
        found = h0.run(
            "import os\n"
            f"needle = {secret!r}.encode()\n"
            "hits = []\n"
            "for top in ('/tmp', '/run', '/var', '/home', '/dev/shm'):\n"
            "    for d, _, fs in os.walk(top):\n"
            "        for f in fs:\n"
            "            try:\n"
            "                if needle in open(os.path.join(d, f), 'rb').read(1 << 20):\n"
            "                    hits.append(os.path.join(d, f))\n"
            "            except OSError:\n"
            "                pass\n"
            "hits"
        ).result
        assert found == []
        # Separate pid namespaces: each agent is pid 1 and sees nothing else of the host.
        assert h0.run("import os; os.getpid()").result == 1
        pids = h0.run("import os; sorted(int(p) for p in os.listdir('/proc') if p.isdigit())").result
        assert max(pids) < 100, pids
    finally:
        h0.close()
        h1.close()
    for s, d in zip(slots, descs, strict=True):
        kind.terminate(s, d)


@pytest.mark.timeout(180)
def test_writes_stay_inside_and_die_with_the_instance(env: Env, runtime: str) -> None:
    before = sorted(os.listdir(DEFAULT_ROOTFS)), sorted(os.listdir(os.path.join(DEFAULT_ROOTFS, "tmp")))
    kind, slot, desc = _spawn(env, runtime)
    marker = "noodle-" + uuid.uuid4().hex
    handle = OciKind.client_handle(desc)
    try:
        # The rootfs and the host's /usr are read-only; /tmp is a bounded tmpfs.
        for path in ("/" + marker, "/usr/" + marker, "/etc/" + marker, "/noodle/" + marker):
            res = handle.exec(["sh", "-c", f"echo x > {path}"])
            assert res.returncode != 0, path
        res = handle.exec(["sh", "-c", f"echo data > /tmp/{marker} && cat /tmp/{marker}"])
        assert (res.returncode, res.stdout) == (0, "data\n")
    finally:
        handle.close()
    after = sorted(os.listdir(DEFAULT_ROOTFS)), sorted(os.listdir(os.path.join(DEFAULT_ROOTFS, "tmp")))
    assert before == after
    for top in (DEFAULT_ROOTFS, "/usr", "/tmp", env.run_dir):
        for _d, _dirs, files in os.walk(top):
            assert marker not in files, top
    kind.terminate(slot, desc)
    kind.clean(slot)

    # A fresh instance in the same slot starts from the pristine image.
    kind.prepare(slot)
    desc = kind.spawn(slot)
    handle = OciKind.client_handle(desc)
    try:
        assert not handle.run(f"import os; os.path.exists('/tmp/{marker}')").result
    finally:
        handle.close()
    kind.terminate(slot, desc)


@pytest.mark.timeout(180)
def test_memory_limit_kills(env: Env, runtime: str) -> None:
    kind, slot, desc = _spawn(env, runtime, memory_mb=128)
    hog = "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
    handle = OciKind.client_handle(desc)
    try:
        res = handle.exec(["python3", "-c", hog], timeout=60)
    except InstanceGone:
        # gVisor: guest memory lives in the sentry, so the OOM killer takes
        # the whole sandbox. The hog is dead either way.
        assert runtime == "runsc", "only gVisor loses the whole instance to an OOM"
        assert _wait_dead(kind, desc)
    else:
        assert res.returncode == -signal.SIGKILL, res
        assert "survived" not in res.stdout
        handle.close()
        assert kind.health(desc, 5.0), "the agent outlives the hog"
    finally:
        handle.close()
    kind.terminate(slot, desc)


@pytest.mark.timeout(240)
def test_pids_limit_stops_fork_bomb(env: Env, runtime: str) -> None:
    pids_max, attempts = 16, 300
    kind, slot, desc = _spawn(env, runtime, pids_max=pids_max, memory_mb=512)
    bomb = (
        "import os, time\n"
        "kids, err = [], None\n"
        f"for _ in range({attempts}):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        err = e.errno\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "n = len(kids)\n"
        "for k in kids:\n"
        "    os.kill(k, 9)\n"
        "    os.waitpid(k, 0)\n"
        "(n, err)"
    )
    handle = OciKind.client_handle(desc)
    try:
        forked, err = handle.run(bomb, timeout=180).result
    except InstanceGone:
        # gVisor: the pids cgroup counts the sandbox's host tasks; the
        # sentry dies when it cannot make one. The bomb is stopped with it.
        assert runtime == "runsc", "only gVisor loses the whole instance to the pids limit"
        assert _wait_dead(kind, desc)
    else:
        assert err is not None and forked < attempts
        if runtime != "runsc":
            assert forked < pids_max, forked
        handle.close()
        assert kind.health(desc, 5.0)
    finally:
        handle.close()
    kind.terminate(slot, desc)


# -- failures and recovery -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_killed_instance_is_detected(env: Env, runtime: str) -> None:
    kind, slot, desc = _spawn(env, runtime)
    assert kind.health(desc, 5.0)
    os.kill(desc["pid"], signal.SIGKILL)
    assert _wait_dead(kind, desc)
    assert not OciKind.client_health(desc, 1.0)
    kind.terminate(slot, desc)
    kind.clean(slot)
    assert env.leftovers() == []


@pytest.mark.timeout(120)
def test_crash_recovery_clean_without_terminate(env: Env, runtime: str) -> None:
    kind, slot, desc = _spawn(env, runtime)
    assert env.leftovers() != []  # there is something to recover from
    # A new kind object, as a restarted worker has: no descriptor, no state.
    fresh = OciKind(kind.pool, {"runtime": runtime})
    fresh.clean(slot)
    assert env.leftovers() == []
    assert not kind.health(desc, 1.0)
    assert not os.path.exists(kind.bundle(slot))


@pytest.mark.timeout(120)
def test_crash_recovery_bundle_already_gone(env: Env, runtime: str) -> None:
    """A crash that also lost the slot's directory (someone wiped it) still
    cleans up: the container id is enough."""
    kind, slot, desc = _spawn(env, runtime)
    shutil.rmtree(kind.bundle(slot), ignore_errors=True)
    kind.clean(slot)
    assert env.leftovers() == []
    assert proc_start_time(desc["pid"]) is None


@pytest.mark.timeout(120)
def test_crash_recovery_between_create_and_start(env: Env, runtime: str) -> None:
    """A worker that died after `create` and before `start`: the container
    exists (runsc: sandbox and gofer running), its agent never ran."""
    kind = env.kind(runtime)
    slot = env.slot(kind)
    kind.clean(slot)
    kind.prepare(slot)
    cid = container_id(env.name, 0)
    with open(os.path.join(kind.bundle(slot), "console.log"), "ab") as out:
        kind._run("create", f"--bundle={kind.bundle(slot)}", cid, stdout=out, stderr=out)
    assert kind.state_paths(cid)
    OciKind(kind.pool, {"runtime": runtime}).clean(slot)
    assert env.leftovers() == []


@pytest.mark.timeout(120)
def test_cgroups_off_runs_and_cleans(env: Env, runtime: str) -> None:
    """cgroups = false (limits not enforced, warned at setup): the runtime
    still makes its default cgroups, and clean still finds them all."""
    kind, slot, desc = _spawn(env, runtime, cgroups=False)
    handle = OciKind.client_handle(desc)
    try:
        assert handle.run("1+1").result == 2
    finally:
        handle.close()
    kind.clean(slot)
    assert env.leftovers() == []


@pytest.mark.timeout(120)
def test_clean_of_a_never_used_slot(env: Env, runtime: str) -> None:
    kind = env.kind(runtime)
    slot = env.slot(kind, 1)
    kind.clean(slot)
    kind.clean(slot)


@pytest.mark.timeout(120)
def test_spawn_fails_clearly_and_clean_recovers(env: Env, runtime: str) -> None:
    kind = env.kind(runtime, ready_timeout=20.0)
    # After setup (which would refuse it): the agent's interpreter is gone.
    kind.options["python"] = "/usr/bin/no-such-python"
    slot = env.slot(kind)
    kind.clean(slot)
    kind.prepare(slot)
    with pytest.raises(StepFailed):
        kind.spawn(slot)
    kind.clean(slot)


# -- configuration and setup -------------------------------------------------------------


def _pool(run_dir: str = "/tmp") -> PoolInfo:
    return PoolInfo("cfg", 1, run_dir, 0, 0)


def test_registered_as_oci() -> None:
    assert load_kind("oci") is OciKind


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"runtime": "docker"}, "runtime"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"pids_max": "64"}, "pids_max"),
        ({"cgroups": 1}, "cgroups"),
        ({"bogus": 1}, "bogus"),
        ({"python": "/opt/python3"}, "python"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        OciKind(_pool(), options)


@pytest.mark.parametrize("rt", RUNTIMES)
def test_missing_runtime_names_the_package(rt: str) -> None:
    kind = OciKind(_pool(), {"runtime": rt, "runtime_path": f"/nonexistent/{rt}"})
    with pytest.raises(KindUnavailable, match=f"Debian package '{PACKAGES[rt]}'"):
        kind.setup()


def test_missing_rootfs_says_how_to_build() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc not installed; " + BUILD_HINT)
    kind = OciKind(_pool(), {"runtime": "runc", "rootfs": "/nonexistent/rootfs"})
    with pytest.raises(KindUnavailable, match=re.escape("noodle image build oci")):
        kind.setup()


def test_runsc_package_is_runsc() -> None:
    # Checked with apt-cache on Debian 12: gVisor's runtime ships as `runsc`.
    assert PACKAGES == {"runc": "runc", "crun": "crun", "runsc": "runsc"}


def test_container_id_is_stable_and_safe() -> None:
    assert container_id("web", 3) == "noodle-web-3"
    odd = container_id("a/b c", 1)
    assert odd == container_id("a/b c", 1) and "/" not in odd and " " not in odd


@pytest.mark.timeout(300)
def test_all_three_runtimes_really_run_here() -> None:
    """Catches a silent skip: on this machine runc, crun and runsc must all
    run a container end to end."""
    for rt in RUNTIMES:
        why = _unavailable(rt)
        assert why is None, f"{rt} cannot run here: {why}"
    e = Env()
    try:
        for rt in RUNTIMES:
            kind = e.kind(rt)
            slot = e.slot(kind, RUNTIMES.index(rt))
            kind.clean(slot)
            kind.prepare(slot)
            desc = kind.spawn(slot)
            handle = OciKind.client_handle(desc)
            try:
                assert handle.run("1+1").result == 2, rt
            finally:
                handle.close()
            kind.terminate(slot, desc)
            kind.clean(slot)
    finally:
        for kind, slot in e.used:
            with contextlib.suppress(Exception):
                kind.clean(slot)
        left = e.leftovers()
        shutil.rmtree(e.run_dir, ignore_errors=True)
    assert left == []
