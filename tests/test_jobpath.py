"""The job path of the process kind and the agent's start-up, with real
supervisors, zygotes, instances and interpreters: the health check on get
hands its connection to the lease, instances come from a frozen, warmed
template, and the agent starts with only what every request needs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from noodle import agent
from noodle.handle import AgentHandle
from tests.conftest import pool_processes, wait_full

pytestmark = pytest.mark.timeout(120)

AGENT_DIR = os.path.dirname(os.path.abspath(agent.__file__))


def test_health_on_get_hands_its_connection_to_the_lease(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--health-on-get")
    pool = sup.attach()
    wait_full(pool)
    for _ in range(3):
        with pool.get(timeout=10) as lease:
            handle = lease.instance
            assert isinstance(handle, AgentHandle)
            kept = handle._sock
            assert kept is not None, "the health check's connection was not kept for the lease"
            assert handle.call("os:getpid") == lease.descriptor["pid"]
            assert handle.run("6 * 7").result == 42
            assert handle._sock is kept, "the lease reconnected instead of using the checked connection"
        assert handle._sock is None  # released: closed with the lease
    assert pool.stats()["counters"]["unhealthy_on_get"] == 0
    pool.close()


def test_without_health_the_lease_connects_on_first_use(supervisor) -> None:
    sup = supervisor("--pool-size", "1", "--no-health-on-get")
    pool = sup.attach()
    wait_full(pool)
    with pool.get(timeout=10) as lease:
        handle = lease.instance
        assert handle._sock is None
        assert handle.call("math:factorial", 20) == 2432902008176640000
        assert handle._sock is not None
    pool.close()


def test_checked_handle_of_a_dead_socket_is_none(tmp_path) -> None:
    assert AgentHandle.checked(str(tmp_path / "nobody.sock"), 0.5) is None


def test_instances_come_from_a_frozen_warmed_template(supervisor) -> None:
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    wait_full(pool)
    with pool.get(timeout=10) as lease:
        inst = lease.instance
        # the zygote froze its heap before forking: the instance inherits it
        assert inst.run("import gc; gc.get_freeze_count()").result > 0
        # the warm-up ran in the template: what the call path imports is there
        assert inst.run("import sys; 'math' in sys.modules and 'contextlib' in sys.modules").result is True
        assert inst.call("math:factorial", 5) == 120
    pool.close()


def test_a_published_instance_leads_its_own_session_and_records_its_identity(supervisor) -> None:
    """Instances warm inside the pool's session (one scheduling group for
    all refill work) and leave it before they serve: a published one leads
    its own session and process group, and the spawn step's recorded
    identity is the one its pidfile holds."""
    from noodle.host.launch import read_pidfile
    from noodle.host.proc import start_time

    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    (zygote,) = [pid for pid, title in pool_processes(sup.name) if "zygote" in title.split()]
    for _ in range(3):
        with pool.get(timeout=10) as lease:
            pid = lease.descriptor["pid"]
            assert os.getsid(pid) == pid and os.getpgid(pid) == pid
            assert os.getsid(zygote) != pid  # it left the zygote's session
            assert lease.descriptor["start"] == start_time(pid)
            recorded = read_pidfile(os.path.join(lease.descriptor["dir"], "instance.pid"))
            assert recorded is not None and (recorded.pid, recorded.start) == (pid, lease.descriptor["start"])
            assert lease.instance.call("os:getpid") == pid
    pool.close()


def test_an_instance_killed_before_it_leads_a_group_is_killed_alone() -> None:
    """terminate and clean of an instance still warming: it is not yet the
    leader of a group, so the group signal finds nothing and the process
    itself must go (not a five-second wait and a failed step)."""
    from noodle.host.proc import start_time
    from noodle.kinds.process import _kill_group

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = start_time(child.pid)
        assert start is not None and os.getpgid(child.pid) != child.pid
        _kill_group(child.pid, start, timeout=10)
        assert child.wait(10) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_agent_starts_without_what_only_some_requests_need(tmp_path) -> None:
    """Spawn-to-ready of the sandbox kinds is the agent's start-up: importing
    it must not pull in ast, subprocess, traceback, typing, argparse, nor the
    json and socket packages (re and enum come with them)."""
    probe = (
        f"import sys; sys.path.insert(0, {AGENT_DIR!r}); import agent; "
        "print(sorted(m for m in ('ast', 'subprocess', 'traceback', 'typing', 'argparse', 'importlib.util', 'json',"
        " 'socket', 're', 'enum')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@contextlib.contextmanager
def launched_agent(tmp_path: Any) -> Iterator[tuple[str, int]]:
    """The agent started as the sandbox launchers start it (isolated, no
    site, a ready fd): (socket path, pid) once it reported ready."""
    sock = str(tmp_path / "a.sock")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.join(AGENT_DIR, "agent.py"), "--socket", sock, "--ready-fd", str(w)],
        pass_fds=(w,),
    )
    os.close(w)
    try:
        assert os.read(r, 1) == b"R"
        yield sock, proc.pid
    finally:
        os.close(r)
        proc.kill()
        proc.wait()


def test_agent_started_as_the_launchers_do_serves_every_op(tmp_path) -> None:
    with launched_agent(tmp_path) as (sock, _pid):
        handle = AgentHandle(sock, timeout=30)
        assert handle.ping()
        assert handle.run("x = 2\nx * 21").result == 42
        assert handle.call("os.path:join", "a", "b") == "a/b"
        res = handle.exec(["sh", "-c", "echo hi"], timeout=20)
        assert (res.returncode, res.stdout) == (0, "hi\n")
        with pytest.raises(Exception, match="ZeroDivisionError"):
            handle.run("1 / 0")
        handle.close()


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--socket", "/s"], {"--socket": "/s"}),
        (["--socket", "/s", "--ready-fd", "3"], {"--socket": "/s", "--ready-fd": "3"}),
        (["--stdio"], {"--stdio": ""}),
        (["--socket"], None),
        (["--socket", "/s", "--stdio"], None),
        (["--ready-fd", "x", "--socket", "/s"], None),
        (["--ready-fd", "3"], None),
        (["--help"], None),
        ([], None),
    ],
)
def test_agent_quick_argv(argv: list[str], expect: dict[str, str] | None) -> None:
    assert agent._quick_args(argv) == expect


def test_agent_bad_argv_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", os.path.join(AGENT_DIR, "agent.py"), "--ready-fd", "3"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 2 and "--socket" in out.stderr


def _queue_fds(pid: int) -> dict[str, list[int]]:
    """mqueue name -> flags of each descriptor ``pid`` holds on it."""
    out: dict[str, list[int]] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if target.startswith("/noodle."):
            out.setdefault(target.split(" ")[0], []).append(int(info["flags"].strip(), 8))
    return out


def test_idle_workers_wait_in_the_kernel_instead_of_spinning(supervisor, pool_name: str) -> None:
    """Each stage worker receives on a blocking descriptor of its own queue:
    on a non-blocking one mq_timedreceive returns EAGAIN at once and the
    worker's loop spins a CPU while it has nothing to do."""
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    workers = [(pid, title) for pid, title in pool_processes(pool_name) if "-worker" in title]
    assert len(workers) >= 4
    for pid, title in workers:
        stage = title.split()[1].removesuffix("-worker")
        fds = _queue_fds(pid)
        own = fds.get(f"/noodle.{pool_name}.{stage}", [])
        assert any(not flags & os.O_NONBLOCK for flags in own), f"{title}: {fds}"
    pool.close()


def test_instances_fork_from_a_template_without_the_noodle_package(supervisor) -> None:
    """The zygote loads only the agent: the client, asyncio and the C core
    stay out of the memory every fork copies, and noodle/kinds is not on
    the instances' sys.path (its modules would shadow theirs)."""
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    wait_full(pool)
    with pool.get(timeout=10) as lease:
        mods = lease.instance.run("import sys; sorted(m for m in sys.modules if m.split('.')[0] in "
                                  "('noodle', 'asyncio', 'msgpack'))").result  # fmt: skip
        assert mods == []
        path = lease.instance.run("import sys; sys.path").result
        assert not any(p.rstrip("/").endswith("noodle/kinds") for p in path), path
        assert lease.instance.call("os:getpid") == lease.descriptor["pid"]
    pool.close()


def test_checked_handle_refuses_an_agent_reporting_another_pid(tmp_path) -> None:
    with launched_agent(tmp_path) as (sock, pid):
        assert AgentHandle.checked(sock, 10, pid=pid + 100000) is None
        good = AgentHandle.checked(sock, 10, pid=pid)
        assert good is not None and good.call("os:getpid") == pid
        good.close()


VALUES = [
    {"op": "ping"},
    {"ok": True, "result": 2432902008176640000, "stdout": "héllo \u2603\n\"q\"\\", "stderr": ""},
    {"a": [1, 2.5, -0.0, 1e300, None, False, {"b": []}], "": {}},
    {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")},
    {"big": 10**40, "neg": -(10**20), "s": "\x00\x1f\ud800"},
]


@pytest.mark.parametrize("value", VALUES)
def test_agent_codec_matches_json(value: dict) -> None:
    """The agent frames JSON with _json's C core (the json package's imports
    would double its start-up); text and values must be json's."""
    import json

    text = agent._dumps(value)
    assert text == json.dumps(value)
    assert repr(agent._loads(text)) == repr(json.loads(text))
    assert agent._dumps({"x": object}, repr) == json.dumps({"x": object}, default=repr)


@pytest.mark.parametrize("bad", ["", "   ", "{", '{"a": 1} x', "[1,]", '{"a": tru}', "'a'", '"\\x"', "{}{}"])
def test_agent_codec_rejects_what_json_rejects(bad: str) -> None:
    import json

    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        agent._loads(bad)


def test_agent_codec_refuses_unencodable_and_circular_values() -> None:
    loop: list[object] = []
    loop.append(loop)
    for value in ({"x": object()}, {"x": loop}):
        with pytest.raises((TypeError, ValueError)):
            agent._dumps(value)
    # a failed encode leaves nothing behind for the next one
    assert agent._dumps({"y": [1]}) == '{"y": [1]}'


def test_socket_stream_reads_frames_split_and_joined() -> None:
    import socket

    a, b = socket.socketpair()
    with a, b:
        s = agent.SocketStream(b)
        frames = [{"n": i, "pad": "x" * (i * 40000)} for i in range(4)]
        blob = b"".join(
            agent._LEN.pack(len(body)) + body for body in (agent._dumps(f).encode() for f in frames)
        )
        import threading

        t = threading.Thread(target=lambda: (a.sendall(blob), a.shutdown(socket.SHUT_WR)))
        t.start()
        got = []
        while (msg := agent.read_frame(s)) is not None:
            got.append(msg)
        t.join()
        assert got == frames


def test_dispatch_stamps_before_sending_and_clears_when_full(pool_name: str) -> None:
    """A task's 'queued' stamp is written before its send (stamped after,
    it could land on the slot's next stage, whose own send had failed, and
    hide that stage's missing task from the supervisor for 30 s), and is
    cleared when the queue is full. Real queue, one message deep."""
    import posix_ipc

    from noodle import queues

    name = queues.queue_name(pool_name, "clean")
    q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o600, max_messages=1,
                               max_message_size=queues.MAX_MSG_SIZE)  # fmt: skip
    q.block = False
    stamps: list[tuple[int, int, int]] = []

    def set_queued(slot: int, ns: int) -> None:
        stamps.append((slot, ns, q.current_messages))

    try:
        assert queues.dispatch(q, 3, 7, set_queued) is True
        assert len(stamps) == 1 and stamps[0][0] == 3 and stamps[0][1] > 0
        assert stamps[0][2] == 0, "stamped after the send"
        assert queues.dispatch(q, 4, 1, set_queued) is False  # full
        assert stamps[1][:2] != (4, 0) and stamps[2][:2] == (4, 0)
        raw, _ = q.receive(timeout=0)
        assert queues.decode(raw, 8) == (3, 7)
    finally:
        q.close()
        posix_ipc.unlink_message_queue(name)


def test_a_churned_pool_refills_without_waiting_for_resends(supervisor) -> None:
    """Leases released as fast as they come: every slot comes back through
    its four stages with the queues often full, and the pool is full again
    without any task waiting for the supervisor's lost-task resend."""
    sup = supervisor("--pool-size", "16")
    pool = sup.attach()
    wait_full(pool)
    for _ in range(120):
        pool.get(timeout=60, health=False).release()
    snap = wait_full(pool, 25.0)  # a lost task would come back only after RESEND_AFTER (30 s)
    assert snap["counters"]["spawns"] >= 16 + 120
    pool.close()
