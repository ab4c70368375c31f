"""The jail kind against real namespaces, overlays and cgroups (no mocks).

Each test drives the kind's steps directly with a pool name of its own and
asserts at teardown that no mount, cgroup, process, loop device or file of
any of its slots is left.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from noodle.errors import ConfigError, KindUnavailable, StepFailed
from noodle.host.cgroup import detect
from noodle.host.mounts import mountinfo
from noodle.host.proc import descendants_of
from noodle.host.proc import start_time as pid_start_time
from noodle.kinds.base import PoolInfo, SlotContext
from noodle.kinds.jail import JailKind, build_skeleton

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the jail kind needs root"
    if not shutil.which("bwrap") and not shutil.which("unshare"):
        return "neither bwrap (Debian package bubblewrap) nor unshare is installed"
    try:
        detect()
    except KindUnavailable as exc:
        return str(exc)
    return None


UNAVAILABLE = _why_unavailable()
needs_jail = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap missing: run `noodle image build jail`")


class Jails:
    """Makes kinds with unique pool names and checks they left nothing."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.made: list[tuple[JailKind, int]] = []
        self.extra_dirs: list[str] = []

    def kind(self, pool_size: int = 1, **options: Any) -> JailKind:
        name = f"t{os.getpid()}{secrets.token_hex(3)}"
        if options.get("userns"):
            # bwrap runs as the slot uid and must traverse every parent,
            # which pytest's 0700 base dir forbids.
            run_dir = tempfile.mkdtemp(prefix=f"noodle-{name}-", dir="/tmp")
            os.chmod(run_dir, 0o711)
            self.extra_dirs.append(run_dir)
        else:
            run_dir = os.path.join(self.tmp, name)
            os.makedirs(run_dir, mode=0o700)
        kind = JailKind(PoolInfo(name, pool_size, run_dir, 0, 0), options)
        kind.setup()
        self.made.append((kind, pool_size))
        return kind

    def finish(self) -> None:
        errors = []
        for kind, size in self.made:
            for slot in range(size):
                try:
                    kind.clean(kind.pool.slot(slot))
                except Exception as exc:
                    errors.append(f"clean {kind.pool.name}/{slot}: {exc}")
                errors += leftovers(kind, kind.pool.slot(slot))
            kind.teardown()
        for d in self.extra_dirs:
            shutil.rmtree(d, ignore_errors=True)
        assert not errors, errors


def leftovers(kind: JailKind, slot: SlotContext) -> list[str]:
    """Everything of the slot still on the host, as readable strings."""
    found: list[str] = []
    source = kind.mount_source(slot.slot)
    base = os.path.realpath(slot.dir) + "/"
    for point, fstype, src, _ in mountinfo():
        if src == source or (point + "/").startswith(base):
            found.append(f"mount {fstype} {src} on {point}")
    cg = kind.slot_cgroup(slot.slot)
    if cg is not None:
        found += [f"cgroup dir {p}" for p in cg.paths if os.path.exists(p)]
        marker = f"/{kind.options['cgroup_parent']}/{kind.cgroup_name(slot.slot)}\n"
        for proc in glob.glob("/proc/[0-9]*/cgroup"):
            try:
                with open(proc) as f:
                    if marker in f.read():
                        found.append(f"process {proc.split('/')[2]} in the slot's cgroup")
            except OSError:
                pass
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                if f.read().strip().startswith(kind.pool.run_dir):
                    found.append(f"loop device {backing}")
        except OSError:
            pass
    if os.path.lexists(slot.dir):
        found.append(f"slot dir {slot.dir}")
    return found


@pytest.fixture
def jails(tmp_path: Any) -> Iterator[Jails]:
    j = Jails(str(tmp_path))
    yield j
    j.finish()


def up(kind: JailKind, slot_id: int = 0) -> tuple[SlotContext, dict[str, Any]]:
    slot = kind.pool.slot(slot_id)
    kind.clean(slot)
    kind.prepare(slot)
    return slot, kind.spawn(slot)


def run(desc: dict[str, Any], source: str) -> Any:
    handle = JailKind.client_handle(desc)
    try:
        return handle.run(source, timeout=60).result
    finally:
        handle.close()


# -- this machine must really run them ---------------------------------------------


def test_jail_tests_run_here() -> None:
    """With bubblewrap installed (noodle image build jail) or in CI, the jail
    tests must not be skipped for want of a tool."""
    from noodle import images

    if not (os.environ.get("CI") or shutil.which("bwrap")):
        pytest.skip("not CI and bubblewrap not installed; run `noodle image build jail`")
    assert shutil.which("bwrap"), "noodle image build jail should have installed bubblewrap"
    assert UNAVAILABLE is None, UNAVAILABLE
    assert os.path.isdir(os.path.join(images.find("jail", "rootfs"), "rootfs")), "run `noodle image build jail`"


# -- lifecycle ------------------------------------------------------------------------


@needs_jail
@pytest.mark.timeout(120)
def test_full_cycle(jails: Jails) -> None:
    kind = jails.kind()
    slot, desc = up(kind)
    assert len(repr(desc)) < 1024
    assert {"pid", "start", "socket", "cgroup"} <= set(desc)
    assert run(desc, "1+1") == 2
    assert kind.health(desc, 5.0)
    assert JailKind.client_health(desc, 5.0)
    pids = JailKind.instance_pids(desc)
    assert desc["pid"] in pids
    kind.terminate(slot, desc)
    assert not kind.health(desc, 1.0)
    assert all(not os.path.exists(f"/proc/{p}/stat") or open(f"/proc/{p}/stat").read().split(") ")[1][0] == "Z"
               for p in pids)
    kind.clean(slot)
    assert leftovers(kind, slot) == []


@needs_jail
@pytest.mark.timeout(120)
def test_isolation(jails: Jails, tmp_path: Any) -> None:
    kind = jails.kind(pool_size=2, uid_base=210000)
    s0, d0 = up(kind, 0)
    s1, _d1 = up(kind, 1)
    host_marker = f"/tmp/noodle-marker-{kind.pool.name}"
    with open(host_marker, "w") as f:
        f.write("host secret")
    os.chmod(host_marker, 0o644)
    try:
        probe = run(
            d0,
            f"""
import os, socket
root = os.stat('/root')
(os.getuid(), os.getgid(), socket.if_nameindex(), os.path.exists({host_marker!r}),
 os.path.exists({s1.dir!r}), os.path.exists({kind.pool.run_dir!r}), (root.st_dev, root.st_ino),
 os.getpid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])
""",
        )
    finally:
        os.unlink(host_marker)
    uid, gid, ifaces, sees_marker, sees_other_slot, sees_run_dir, root_id, pid, capeff = probe
    assert (uid, gid) == (210000, 210000)
    assert ifaces == [(1, "lo")]  # no interface but loopback
    assert not sees_marker
    assert not sees_other_slot and not sees_run_dir
    host_root = os.stat("/root")
    assert tuple(root_id) != (host_root.st_dev, host_root.st_ino)
    assert pid <= 3  # own pid namespace
    assert int(capeff, 16) == 0

    # Writes land in the slot's upper layer only, never in the shared lower.
    run(d0, "open('/tmp/written-inside', 'w').write('x'); open('/home/sandbox/h', 'w').write('y')")
    upper = os.path.join(s0.dir, "upper")
    assert os.path.exists(os.path.join(upper, "tmp", "written-inside"))
    assert os.path.exists(os.path.join(upper, "home", "sandbox", "h"))
    assert not os.path.exists(os.path.join(kind._rootfs, "tmp", "written-inside"))
    assert not os.path.exists(os.path.join(s1.dir, "upper", "tmp", "written-inside"))
    assert run(_d1, "import os; os.path.exists('/tmp/written-inside')") is False
    kind.terminate(s0, d0)
    kind.clean(s0)
    assert not os.path.exists(os.path.join(upper, "tmp", "written-inside"))
    assert leftovers(kind, s0) == []


@needs_jail
@pytest.mark.timeout(120)
def test_memory_limit_kills_the_hog(jails: Jails) -> None:
    kind = jails.kind(memory_limit=96 * 1024 * 1024)
    slot, desc = up(kind)
    handle = JailKind.client_handle(desc)
    try:
        small = handle.exec(["python3", "-c", "x = b'a' * (16 << 20); print(len(x))"], timeout=60)
        assert small.returncode == 0, small
        hog = handle.exec(["python3", "-c", "x = b'a' * (400 << 20); print('survived')"], timeout=60)
    finally:
        handle.close()
    assert hog.returncode == -signal.SIGKILL, hog
    assert "survived" not in hog.stdout
    kind.terminate(slot, desc)


@needs_jail
@pytest.mark.timeout(120)
def test_pids_limit_stops_a_fork_bomb(jails: Jails) -> None:
    kind = jails.kind(pids_limit=20)
    slot, desc = up(kind)
    # Bounded: at most 200 forks, every child sleeps and is killed after.
    bomb = """
import os, signal, time
kids, refused = [], None
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        refused = exc.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.kill(k, signal.SIGKILL)
for k in kids:
    os.waitpid(k, 0)
(len(kids), refused)
"""
    forked, refused = run(desc, bomb)
    assert refused is not None  # EAGAIN from the pids controller
    assert forked < 20
    assert run(desc, "1+1") == 2  # the instance itself survives
    kind.terminate(slot, desc)


@needs_jail
@pytest.mark.timeout(120)
def test_killed_instance_is_unhealthy(jails: Jails) -> None:
    kind = jails.kind()
    slot, desc = up(kind)
    assert kind.health(desc, 5.0)
    for pid in JailKind.instance_pids(desc):
        if pid != desc["pid"]:
            os.kill(pid, signal.SIGKILL)
    assert not JailKind.client_health(desc, 2.0)
    assert not kind.health(desc, 2.0)
    kind.terminate(slot, desc)
    kind.clean(slot)
    assert leftovers(kind, slot) == []


@needs_jail
@pytest.mark.timeout(120)
def test_clean_after_crash_without_terminate(jails: Jails) -> None:
    kind = jails.kind(pool_size=2)
    slot, desc = up(kind, 1)
    # A child that escapes the agent's process group must still go.
    run(desc, "import subprocess; subprocess.Popen(['sleep', '300'], start_new_session=True); 1")
    assert len(JailKind.instance_pids(desc)) >= 4
    assert leftovers(kind, slot) != []
    # A fresh kind object, as a restarted worker would have: no descriptor.
    fresh = JailKind(kind.pool, kind.options)
    fresh.clean(slot)
    assert leftovers(kind, slot) == []
    assert not JailKind.client_health(desc, 1.0)


def _tree(root: int) -> dict[int, int]:
    """Live descendants of ``root`` (pid -> start time)."""
    from tests.conftest import descendants

    return {p: s for p in descendants(root) if (s := pid_start_time(p)) is not None}


def _alive(procs: dict[int, int]) -> list[int]:
    return [p for p, s in procs.items() if pid_start_time(p) == s]


def _wait_dead(pid: int) -> None:
    for _ in range(2000):  # SIGKILL is asynchronous: wait for the death itself
        if pid_start_time(pid) is None:
            return
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} survived SIGKILL")


_DAEMON = "import subprocess; subprocess.Popen(['sleep', '300'], start_new_session=True).pid"


def _daemons(procs: dict[int, int]) -> list[int]:
    """The processes _DAEMON started, which left the agent's session."""
    out = []
    for p in procs:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read() == b"sleep\x00300\x00" and os.getsid(p) == p:
                    out.append(p)
        except OSError:
            pass
    return out


def _backends() -> list[Any]:
    params = [pytest.param("bwrap", marks=needs_bwrap)]
    missing = [t for t in ("unshare", "chroot", "mount") if not shutil.which(t)]
    params.append(pytest.param("unshare", marks=pytest.mark.skipif(bool(missing), reason=f"missing: {missing}")))
    return params


@needs_jail
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", _backends())
def test_without_cgroup_terminate_kills_the_whole_jail(jails: Jails, backend: str) -> None:
    """cgroup = false: the launcher leads its own session and process group,
    and terminate takes the namespace's init, the agent and a daemon that
    left the agent's session along."""
    kind = jails.kind(cgroup=False, backend=backend)
    slot, desc = up(kind)
    pid = desc["pid"]
    assert "cgroup" not in desc
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    run(desc, _DAEMON)
    tree = _tree(pid)
    # the agent (below bwrap's namespace init; unshare's init is the agent) and the daemon
    assert len(tree) >= 2 and _daemons(tree), tree
    kind.terminate(slot, desc)
    assert pid_start_time(pid) is None
    assert not _alive(tree), f"processes of a terminated jail alive: {_alive(tree)}"
    assert not JailKind.client_health(desc, 1.0)
    kind.clean(slot)
    assert leftovers(kind, slot) == []


@needs_jail
@needs_bwrap
@pytest.mark.timeout(120)
def test_without_cgroup_clean_kills_the_jail_after_its_launcher_died(jails: Jails) -> None:
    """A crash: the launcher (outer bwrap) is gone, no terminate ran, and a
    restarted worker has no descriptor. Clean still finds the rest of the
    jail through the pid file's process group."""
    kind = jails.kind(cgroup=False, backend="bwrap")
    slot, desc = up(kind)
    pid = desc["pid"]
    run(desc, _DAEMON)
    tree = _tree(pid)
    assert len(tree) >= 3 and _daemons(tree), tree  # bwrap's namespace init, the agent, the daemon
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    assert _alive(tree), "the jail died with its launcher: this test proves nothing"
    JailKind(kind.pool, kind.options).clean(slot)
    assert not _alive(tree), f"processes of a cleaned jail alive: {_alive(tree)}"
    assert leftovers(kind, slot) == []


@needs_jail
@needs_bwrap
@pytest.mark.timeout(120)
def test_client_health_checks_the_launcher(jails: Jails) -> None:
    """get()'s health check runs client_health from the descriptor alone:
    with only the launcher killed, the agent still answers a ping, but the
    instance must not be handed out."""
    kind = jails.kind(cgroup=False, backend="bwrap")
    slot, desc = up(kind)
    assert JailKind.client_health(desc, 5.0)
    tree = _tree(desc["pid"])
    os.kill(desc["pid"], signal.SIGKILL)
    _wait_dead(desc["pid"])
    handle = JailKind.client_handle(desc)
    try:
        assert handle.ping(5.0), "the agent died with its launcher: this test proves nothing"
    finally:
        handle.close()
    assert not JailKind.client_health(desc, 2.0)
    assert not kind.health(desc, 2.0)
    # a descriptor without the launcher's identity is not healthy either
    assert not JailKind.client_health({"socket": desc["socket"]}, 2.0)
    assert not JailKind.client_health({**desc, "start": desc["start"] + 1}, 2.0)
    # terminate takes the rest of the jail although its launcher is gone
    kind.terminate(slot, desc)
    assert tree and not _alive(tree), f"processes of a terminated jail alive: {_alive(tree)}"
    kind.clean(slot)
    assert leftovers(kind, slot) == []


@needs_jail
@pytest.mark.timeout(120)
def test_jail_works_under_a_strict_umask(jails: Jails, tmp_path: Any) -> None:
    """The supervisor runs with umask 007; the directories prepare makes
    (the upper layer, which is the sandbox's /, and mount points) and the
    skeleton rootfs must still be usable by the slot uid."""
    old = os.umask(0o077)
    try:
        kind = jails.kind()
        slot, desc = up(kind)
        root_mode, tmp_mode = run(desc, "import os; (os.stat('/').st_mode & 0o7777, os.stat('/tmp').st_mode & 0o7777)")
        assert (root_mode, tmp_mode) == (0o755, 0o1777)
        kind.terminate(slot, desc)
        skel = str(tmp_path / "skel")
        build_skeleton(skel)
    finally:
        os.umask(old)
    modes = {rel: os.stat(os.path.join(skel, rel)).st_mode & 0o7777 for rel in ("", "etc", "etc/passwd", "tmp", "usr")}
    assert modes == {"": 0o755, "etc": 0o755, "etc/passwd": 0o644, "tmp": 0o1777, "usr": 0o755}, modes


@needs_jail
@pytest.mark.timeout(120)
def test_clean_is_idempotent_and_prepare_again(jails: Jails) -> None:
    kind = jails.kind()
    slot = kind.pool.slot(0)
    kind.clean(slot)
    kind.clean(slot)
    for _ in range(2):
        kind.prepare(slot)
        desc = kind.spawn(slot)
        assert run(desc, "2*21") == 42
        kind.terminate(slot, desc)
        kind.terminate(slot, desc)  # a second terminate is harmless
        kind.clean(slot)
        assert leftovers(kind, slot) == []


@needs_jail
@needs_bwrap
@pytest.mark.timeout(120)
def test_userns_mode(jails: Jails) -> None:
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("userns mode needs a python the slot uid can reach; install python3")
    kind = jails.kind(userns=True, python="/usr/bin/python3", uid_base=220000)
    slot, desc = up(kind)
    uid, ifaces = run(desc, "import os, socket; (os.getuid(), socket.if_nameindex())")
    assert uid == 220000
    assert ifaces == [(1, "lo")]
    # Seen from the host, even bwrap runs as the slot uid, and the sandbox's
    # user namespace maps that one uid only: nothing inside is host root.
    for pid in JailKind.instance_pids(desc):
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert uids == ["220000"] * 4
        with open(f"/proc/{pid}/uid_map") as f:
            maps = f.read().split()
        assert maps in (["0", "0", "4294967295"], ["220000", "220000", "1"])
    kind.terminate(slot, desc)


@needs_jail
@pytest.mark.timeout(120)
def test_userns_mode_from_a_private_installation(jails: Jails, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installation other users cannot search (a clone in /root, a 0700
    home): the kind compiles the agent into its run directory instead of
    refusing, with the configured interpreter (not the one running the
    kind), and the slot uid runs it from there."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("userns mode needs a python the slot uid can reach; install python3")
    import noodle.kinds.jail as jailmod

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    agent = private / "agent.py"
    shutil.copy(jailmod.AGENT_FILE, agent)
    monkeypatch.setattr(jailmod, "AGENT_FILE", str(agent))
    kind = jails.kind(userns=True, python="/usr/bin/python3", uid_base=225000)
    slot, desc = up(kind)
    assert run(desc, "import os; os.getuid()") == 225000
    compiled = os.path.join(kind.pool.run_dir, "jail-agent.pyc")
    assert os.stat(compiled).st_mode & 0o777 == 0o644
    magic = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c",
                            "import sys, importlib.util; sys.stdout.buffer.write(importlib.util.MAGIC_NUMBER)"],
                           capture_output=True, check=True).stdout  # fmt: skip
    with open(compiled, "rb") as f:
        head = f.read(16)
    # the byte code of the private copy: its header records that source's size
    assert head[:4] == magic and int.from_bytes(head[12:16], "little") == os.path.getsize(agent)
    kind.terminate(slot, desc)


@needs_jail
@pytest.mark.timeout(120)
def test_unshare_backend(jails: Jails) -> None:
    for tool in ("unshare", "chroot", "mount"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing (util-linux / coreutils / mount)")
    kind = jails.kind(backend="unshare", uid_base=230000)
    slot, desc = up(kind)
    uid, names = run(desc, "import os, socket; (os.getuid(), [n for _, n in socket.if_nameindex()])")
    assert uid == 230000
    assert names == ["lo"]
    kind.terminate(slot, desc)
    kind.clean(slot)
    assert leftovers(kind, slot) == []


@needs_jail
@pytest.mark.timeout(60)
def test_spawn_failure_leaves_nothing(jails: Jails) -> None:
    kind = jails.kind(python="/bin/false", ready_timeout=5.0)
    slot = kind.pool.slot(0)
    kind.prepare(slot)
    with pytest.raises(Exception, match=r"exited before it was ready|not ready"):
        kind.spawn(slot)
    cg = kind.slot_cgroup(0)
    assert cg is not None and cg.procs() == set()


@needs_jail
@pytest.mark.timeout(120)
def test_agent_runs_from_byte_code_compiled_on_the_host(jails: Jails) -> None:
    """The instance never compiles the agent: it runs the byte code setup
    compiled from the host's own agent file, bound read-only; and every
    process of the jail is in the slot's cgroup (the launcher joined it
    before starting the jail)."""
    import noodle.kinds.jail as jailmod

    kind = jails.kind()
    compiled = os.path.join(kind.pool.run_dir, "jail-agent.pyc")
    with open(compiled, "rb") as f:
        head = f.read(16)
    assert head[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(head[12:16], "little") == os.path.getsize(jailmod.AGENT_FILE)
    assert os.stat(compiled).st_mode & 0o777 == 0o644
    slot, desc = up(kind)
    main_file, code_file, write_error = run(desc, """
import sys, errno
main = sys.modules['__main__']
try:
    open(main.__file__, 'r+b')
    error = None
except OSError as exc:
    error = errno.errorcode[exc.errno]
(main.__file__, main.read_frame.__code__.co_filename, error)
""")  # fmt: skip
    assert (main_file, code_file) == (jailmod.INSIDE_AGENT, jailmod.INSIDE_AGENT_SOURCE)
    assert write_error in ("EROFS", "EACCES")
    cg = kind.slot_cgroup(slot.slot)
    assert cg is not None
    tree = {desc["pid"], *descendants_of(desc["pid"])}
    assert len(tree) >= 3  # bwrap, its init, the agent
    assert tree <= cg.procs(), f"outside the cgroup: {tree - cg.procs()}"
    kind.terminate(slot, desc)


@needs_jail
@pytest.mark.timeout(120)
def test_another_interpreter_compiles_the_agent_without_privileges(jails: Jails) -> None:
    """A configured interpreter other than ours compiles the agent for
    itself (byte code is per version), run as the pool's first slot uid:
    the setting may name a program someone other than root can replace,
    and before it only ever ran inside the jail. The jail then runs that
    byte code."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs a second interpreter: install python3")
    import noodle.kinds.jail as jailmod

    base = tempfile.mkdtemp(prefix="noodle-py-", dir="/tmp")  # reachable by the slot uid
    jails.extra_dirs.append(base)
    os.chmod(base, 0o755)
    os.makedirs(os.path.join(base, "bin"))
    seen = os.path.join(base, "seen")
    os.mkdir(seen)
    os.chmod(seen, 0o777)  # the unprivileged interpreter records its uid here
    wrapper = os.path.join(base, "bin", "python3")
    with open(wrapper, "w") as f:
        # inside the jail `seen` does not exist: the redirection fails, the exec goes on
        f.write(f'#!/bin/sh\nid -u > {seen}/uid 2>/dev/null\nexec /usr/bin/python3 "$@"\n')
    os.chmod(wrapper, 0o755)
    kind = jails.kind(python=wrapper, uid_base=235000)
    with open(os.path.join(seen, "uid")) as f:
        assert f.read().strip() == "235000"
    magic = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c",
                            "import sys, importlib.util; sys.stdout.buffer.write(importlib.util.MAGIC_NUMBER)"],
                           capture_output=True, check=True).stdout  # fmt: skip
    compiled = os.path.join(kind.pool.run_dir, "jail-agent.pyc")
    with open(compiled, "rb") as f:
        assert f.read(4) == magic
    assert (kind._agent_file, kind._agent_inside) == (compiled, jailmod.INSIDE_AGENT)
    slot, desc = up(kind)
    probe = "import sys, os; (sys.modules['__main__'].__file__, os.getuid())"
    assert run(desc, probe) == (jailmod.INSIDE_AGENT, 235000)
    kind.terminate(slot, desc)


def test_an_interpreter_that_cannot_compile_the_agent_gets_the_source(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No byte code (here the interpreter is not even Python): the jail is
    given the agent's source, as before byte code, and the log says why its
    instances start slower. A spawn with it fails as such a jail does
    (test_spawn_failure_leaves_nothing)."""
    if os.geteuid() != 0:
        pytest.skip("the jail kind's setup needs root")
    import noodle.kinds.jail as jailmod

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kind = JailKind(PoolInfo("tbadpy", 1, str(run_dir), 0, 0), {"python": "/bin/false", "cgroup": False})
    with caplog.at_level("WARNING", logger="noodle.kinds.jail"):
        kind.setup()
    assert "could not compile the agent" in caplog.text
    assert os.listdir(run_dir) == []  # no byte code, no half-written file
    assert (kind._agent_file, kind._agent_inside) == (jailmod.AGENT_FILE, jailmod.INSIDE_AGENT_SOURCE)
    argv, _env = kind._command(kind.pool.slot(0))
    assert jailmod.INSIDE_AGENT_SOURCE in argv and jailmod.INSIDE_AGENT not in argv


@needs_jail
@pytest.mark.timeout(60)
def test_spawn_of_an_unprepared_slot_is_refused(jails: Jails) -> None:
    kind = jails.kind()
    slot = kind.pool.slot(0)
    kind.clean(slot)
    with pytest.raises(StepFailed, match="is not prepared"):
        kind.spawn(slot)
    os.makedirs(os.path.join(slot.dir, "root"))  # the directory alone, nothing mounted on it
    with pytest.raises(StepFailed, match="is not prepared"):
        kind.spawn(slot)
    kind.clean(slot)
    assert leftovers(kind, slot) == []


def test_bad_options_name_the_key(tmp_path: Any) -> None:
    pool = PoolInfo("tbad", 1, str(tmp_path), 0, 0)
    with pytest.raises(ConfigError, match=r"kinds.jail.backend"):
        JailKind(pool, {"backend": "docker"})
    with pytest.raises(ConfigError, match=r"kinds.jail.memory_limit"):
        JailKind(pool, {"memory_limit": "1G"})
    with pytest.raises(ConfigError, match=r"kinds.jail.nope"):
        JailKind(pool, {"nope": 1})
    with pytest.raises(ConfigError, match=r"uid_base"):
        JailKind(pool, {"uid_base": 0})


def test_build_script_is_idempotent(tmp_path: Path) -> None:
    if os.geteuid() != 0 and not shutil.which("bwrap"):
        pytest.skip("build.sh installs packages as root")
    from noodle import images

    script = images.build_script("jail")
    first = subprocess.run(["sh", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert os.path.isfile(tmp_path / "rootfs" / ".noodle-rootfs")
    again = subprocess.run(["sh", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
