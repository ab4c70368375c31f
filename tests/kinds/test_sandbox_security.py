"""Sandboxed code cannot reach the supervisor's segment or queues, the host
network, other slots' directories, or keep a process alive past terminate.

Every probe runs as code inside an instance leased from a real pool (a
real `noodle run`, its workers, the jail or oci kind); the host side opens
the things the sandbox must not reach and first checks that they are
reachable from the host, so a failure inside means isolation, not a typo.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import wait_for, wait_full
from tests.kinds.test_pool_kinds import (
    JAIL,
    JAIL_NO_CGROUP,
    OCI,
    KindCase,
    alive_of,
    assert_no_leftovers,
    case_params,
    instance_pids,
    proc_start,
    ready_descriptor,
    sandbox_processes,
)

CASES = [JAIL, *OCI.values()]
DAEMON_CASES = [JAIL, *OCI.values()]


def inside(lease: Any, source: str, timeout: float = 60.0) -> Any:
    """Run ``source`` in the leased instance; its trailing expression,
    JSON-encoded inside, is the answer."""
    reply = lease.instance.run(source, timeout=timeout)
    return json.loads(reply.result)


def start_pool(case: KindCase, supervisor: Callable[..., Any]) -> tuple[Any, Any]:
    sup = case.start(supervisor)
    pool = sup.attach(timeout=case.start_timeout)
    wait_full(pool, case.start_timeout)
    return sup, pool


def stop_pool(sup: Any, pool: Any) -> None:
    pool.close()
    assert sup.stop(timeout=120) == 0, sup.logtext()
    assert_no_leftovers(sup.name, sup.run_root)


def host_paths(run_dir: str) -> list[str]:
    """Everything of the pool's private directory on the host: the lock,
    every slot's dir, root, upper layer, sockets."""
    out = [os.path.dirname(run_dir), run_dir]
    for dirpath, dirs, files in os.walk(run_dir):
        out += [os.path.join(dirpath, name) for name in dirs + files]
        # not into overlay layers or a container's rootfs: host /usr lives there
        dirs[:] = [d for d in dirs if d not in ("root", "rootfs", "upper", "work", "agent")]
    return sorted(set(out))


# The sandbox side of the isolation probe. Every attempt records the error it
# got; anything that succeeds is a breach.
PROBE = r"""
import ctypes, json, os, socket
pool, paths, other_socks = POOL, PATHS, OTHER_SOCKS
reached = []
def attempt(what, fn):
    try:
        fn()
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    reached.append(what)
    return "REACHED"
errors = {}
errors["shm"] = attempt("open /dev/shm segment", lambda: os.close(os.open(f"/dev/shm/noodle.{pool}", os.O_RDWR)))
libc = ctypes.CDLL(None, use_errno=True)
def shm_open():
    fd = libc.shm_open(f"/noodle.{pool}".encode(), os.O_RDWR, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    os.close(fd)
errors["shm_open"] = attempt("shm_open segment", shm_open)
for stage in ("clean", "prepare", "spawn", "terminate"):
    errors[f"mq file {stage}"] = attempt(f"open /dev/mqueue/noodle.{pool}.{stage}",
        lambda: os.close(os.open(f"/dev/mqueue/noodle.{pool}.{stage}", os.O_RDONLY)))
    def mq_open():
        mqd = libc.mq_open(f"/noodle.{pool}.{stage}".encode(), os.O_RDWR)
        if mqd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        libc.mq_close(mqd)
    errors[f"mq_open {stage}"] = attempt(f"mq_open /noodle.{pool}.{stage}", mq_open)
for p in paths:
    errors[p] = attempt(f"stat {p}", lambda: os.stat(p))
for p in other_socks:
    def conn():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        try:
            s.connect(p)
        finally:
            s.close()
    errors["connect " + p] = attempt(f"connect {p}", conn)
seen = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
host_procs = [c for c in seen if "noodle supervisor" in c or "-worker " in c]
json.dumps({"reached": reached, "errors": errors, "host_procs": host_procs, "nprocs": len(seen)})
"""


@pytest.mark.parametrize("case", case_params(CASES, timeout=300))
def test_cannot_reach_segment_queues_or_other_slots(case: KindCase, supervisor: Callable[..., Any]) -> None:
    sup, pool = start_pool(case, supervisor)
    try:
        run_dir = os.path.join(sup.run_root, sup.name)
        lease = pool.get(timeout=case.op_timeout)
        other = ready_descriptor(pool, 1 - lease.slot)
        paths = [*host_paths(run_dir), f"/dev/shm/noodle.{pool.name}"]
        other_socks = [str(other[k]) for k in ("socket", "agent") if isinstance(other.get(k), str)]
        # host-side controls: the segment, queues, other slot's socket and the
        # run dir are all there and reachable from outside the sandbox
        assert os.path.exists(f"/dev/shm/noodle.{pool.name}")
        assert {f"noodle.{pool.name}.{s}" for s in ("clean", "prepare", "spawn", "terminate")} <= set(
            os.listdir("/dev/mqueue")
        )
        assert any(f"/slots/{1 - lease.slot}" in p for p in paths), paths
        for p in other_socks:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(p)
        src = (PROBE.replace("POOL", repr(pool.name)).replace("PATHS", repr(paths))
               .replace("OTHER_SOCKS", repr(other_socks)))  # fmt: skip
        out = inside(lease, src)
        assert out["reached"] == [], out
        assert out["host_procs"] == [] and out["nprocs"] >= 1, out
        lease.release()
    finally:
        stop_pool(sup, pool)


NET_PROBE = r"""
import json, socket
names = sorted(n for _, n in socket.if_nameindex())
results = {}
for addr in ADDRS:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.settimeout(3)
    try:
        s.connect((addr, PORT))
        results[addr] = "CONNECTED"
    except OSError as exc:
        results[addr] = f"{type(exc).__name__}: {exc}"
    finally:
        s.close()
json.dumps({"ifaces": names, "connect": results})
"""


def host_addresses() -> list[str]:
    """The host's IPv4 addresses (loopback first)."""
    addrs = ["127.0.0.1"]
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return addrs
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            a = parts[parts.index("inet") + 1].split("/")[0]
            if a not in addrs:
                addrs.append(a)
    return addrs


@pytest.fixture
def host_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP listener on every host address; accepted connections are
    counted (none must come from a sandbox)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    accepted: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(peer[0])
            conn.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        t.join(5)
        srv.close()


@pytest.mark.parametrize("case", case_params(CASES, timeout=300))
def test_only_loopback_and_no_host_tcp(
    case: KindCase, supervisor: Callable[..., Any], host_listener: tuple[int, list[str]]
) -> None:
    port, accepted = host_listener
    addrs = host_addresses()
    for a in addrs:  # control: the host reaches its own listener on every address
        socket.create_connection((a, port), timeout=3).close()
    wait_for(lambda: len(accepted) >= len(addrs), 10, "the host's control connections")
    before = len(accepted)
    sup, pool = start_pool(case, supervisor)
    try:
        lease = pool.get(timeout=case.op_timeout)
        out = inside(lease, NET_PROBE.replace("ADDRS", repr(addrs)).replace("PORT", str(port)))
        assert out["ifaces"] == ["lo"], out
        assert "CONNECTED" not in out["connect"].values(), out
        assert len(accepted) == before, f"the listener accepted sandbox connections: {accepted[before:]}"
        lease.release()
    finally:
        stop_pool(sup, pool)


# Double fork + setsid, the child of the child execs Python that ignores
# TERM/HUP and sleeps for ever; the marker is in its argv and environment.
DAEMON = r"""
import json, os, sys
marker = MARKER
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        code = (
            "import signal, time\n"
            "for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n"
            "    time.sleep(1)\n"
        )
        os.execve(sys.executable, [sys.executable, "-c", code, marker], {"NOODLE_TEST_MARKER": marker})
    finally:
        os._exit(127)
os.close(w)
os.waitpid(pid, 0)
inner = int(os.read(r, 32) or b"0")
os.close(r)
alive = os.path.exists(f"/proc/{inner}")
json.dumps({"pid": inner, "alive": alive, "sid": os.getsid(inner) if alive else None, "agent_sid": os.getsid(0)})
"""


def marked_processes(marker: str) -> dict[int, int]:
    """Host processes carrying the marker in their command line or environment."""
    found = {}
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        start = proc_start(pid)
        if start is not None and (needle in cmd or needle in env):
            found[pid] = start
    return found


def instance_host_processes(cid: str, bundle: str) -> dict[int, int]:
    """Host processes of one container: its id or bundle in their command
    line, or its id in their cgroup."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/cgroup") as f:
                cg = f.read()
        except OSError:
            continue
        start = proc_start(pid)
        hit = bundle in cmd or f"{cid} " in cmd + " " or any(
            line.rstrip("/").endswith("/" + cid) for line in cg.splitlines()
        )
        if start is not None and hit:
            found[pid] = start
    return found


@pytest.mark.parametrize("case", case_params([*DAEMON_CASES, JAIL_NO_CGROUP], timeout=300))
def test_daemonized_process_dies_with_the_instance(case: KindCase, supervisor: Callable[..., Any]) -> None:
    sup, pool = start_pool(case, supervisor)
    marker = f"noodle-daemon-{secrets.token_hex(8)}"
    try:
        lease = pool.get(timeout=case.op_timeout)
        pids = instance_pids(pool, lease.descriptor)
        out = inside(lease, DAEMON.replace("MARKER", repr(marker)))
        assert out["alive"] and out["sid"] not in (None, out["agent_sid"]), out  # detached: a session of its own
        if case.runtime == "runsc":
            # gVisor's guest processes are not host processes: the daemon
            # lives inside this sandbox's sentry, which must go as a whole
            daemons: dict[int, int] = {}
            sandbox = instance_host_processes(str(lease.descriptor["id"]), str(lease.descriptor["bundle"]))
            assert sandbox, "no host process of the runsc sandbox found"
        else:
            daemons = wait_for(lambda: marked_processes(marker), 10, "the daemon to show on the host")
            if case is not JAIL_NO_CGROUP:  # without a cgroup only the pid namespace holds it
                host_side = {p for p, _ in sandbox_processes(sup.name, sup.run_root)}
                assert set(daemons) <= host_side, ("the daemon is outside the instance's cgroup", daemons)
            sandbox = {}
        assert lease.release() is True
        everything = {**pids, **daemons, **sandbox}
        wait_for(lambda: not alive_of(everything) and not marked_processes(marker), 30,
                 f"the instance and its daemon {sorted(everything)} to die")  # fmt: skip
        wait_full(pool, case.op_timeout)
    finally:
        for p in marked_processes(marker):  # a leaked daemon must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        stop_pool(sup, pool)




@pytest.mark.parametrize("case", case_params([JAIL_NO_CGROUP], timeout=300))
def test_jail_without_cgroup_terminate_kills_the_sandbox(case: KindCase, supervisor: Callable[..., Any]) -> None:
    """Without a cgroup, the process group and the pid namespace are what
    terminate has: lease, note the launcher's descendants (the pid
    namespace's init, the agent), release; once terminate and clean have
    run for the slot, they must be gone."""
    sup, pool = start_pool(case, supervisor)
    survivors: list[int] = []
    try:
        lease = pool.get(timeout=case.op_timeout)
        launcher = int(lease.descriptor["pid"])
        tree = {p: s for p in _descendants(launcher) if (s := proc_start(p)) is not None}
        assert len(tree) >= 2, tree  # the namespace's init and the agent
        assert lease.release() is True
        wait_for(lambda: proc_start(launcher) is None, 30, "the launcher to be terminated")
        wait_full(pool, case.op_timeout)  # terminate and clean have run for that slot
        time.sleep(0.5)
        survivors = alive_of(tree)
        assert not survivors, f"processes of a terminated jail still alive: {survivors}"
    finally:
        for p in survivors:  # the bug's leftovers must not break the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        stop_pool(sup, pool)


def _descendants(root: int) -> list[int]:
    from tests.conftest import descendants

    return descendants(root)
