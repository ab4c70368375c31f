"""The command kind with real shell steps and the shipped example scripts."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from noodle.errors import ConfigError, StepFailed
from noodle.host.proc import start_time as pid_start_time
from noodle.kinds.base import PoolInfo, SlotContext
from noodle.kinds.command import CommandKind, ExecHandle

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EX = os.path.join(REPO, "examples", "command")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3") or "python3"


def alive(pid: int) -> bool:
    return pid_start_time(pid) is not None


class Kinds:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.made: list[CommandKind] = []
        self.pids: list[int] = []

    def kind(self, **options: Any) -> CommandKind:
        name = f"t{os.getpid()}{secrets.token_hex(3)}"
        run_dir = os.path.join(self.tmp, name)
        os.makedirs(run_dir)
        options.setdefault("env", {"PYTHON": PY})
        kind = CommandKind(PoolInfo(name, 2, run_dir, os.getuid(), os.getgid()), options)
        self.made.append(kind)
        return kind

    def finish(self) -> None:
        for kind in self.made:
            for slot in range(kind.pool.pool_size):
                kind.clean(kind.pool.slot(slot))
                assert not os.path.exists(kind.pool.slot(slot).dir)
        left = [p for p in self.pids if alive(p)]
        assert not left, f"processes left: {left}"


@pytest.fixture
def kinds(tmp_path: Any) -> Iterator[Kinds]:
    k = Kinds(str(tmp_path))
    yield k
    k.finish()


def cycle(kind: CommandKind, kinds: Kinds, slot_id: int = 0) -> tuple[SlotContext, dict[str, Any]]:
    slot = kind.pool.slot(slot_id)
    kind.clean(slot)
    kind.prepare(slot)
    desc = kind.spawn(slot)
    for key in ("pid", "agent_pid"):
        if isinstance(desc.get(key), int):
            kinds.pids.append(desc[key])
    return slot, desc


@pytest.mark.timeout(60)
def test_process_mode_with_the_plain_example(kinds: Kinds) -> None:
    kind = kinds.kind(spawn_mode="process", spawn=f"exec {EX}/plain-spawn.sh")
    slot, desc = cycle(kind, kinds)
    assert desc["socket"] == os.path.join(slot.dir, "agent.sock")
    assert isinstance(desc["start"], int) and desc["slot"] == 0
    handle = CommandKind.client_handle(desc)
    assert handle is not None and not isinstance(handle, ExecHandle)
    assert handle.run("1+1").result == 2
    handle.close()
    assert kind.health(desc, 5.0)
    kind.terminate(slot, desc)
    assert not alive(desc["pid"]) and not alive(desc["agent_pid"])
    assert not kind.health(desc, 1.0)
    kind.clean(slot)


@pytest.mark.timeout(60)
def test_oneshot_bwrap_example(kinds: Kinds) -> None:
    if not shutil.which("bwrap"):
        pytest.skip("bwrap missing: run `noodle image build jail`")
    kind = kinds.kind(
        spawn=f"{EX}/bwrap-spawn.sh",
        health=f"{EX}/health.sh {{socket}}",
        terminate=f"{EX}/bwrap-terminate.sh {{pid}}",
        clean=f"{EX}/bwrap-clean.sh {{dir}}",
    )
    slot, desc = cycle(kind, kinds)
    handle = CommandKind.client_handle(desc)
    assert handle is not None
    names = handle.run("import socket; [n for _, n in socket.if_nameindex()]").result
    assert names == ["lo"]
    assert handle.run("1+1").result == 2
    handle.close()
    assert kind.health(desc, 5.0)
    kind.terminate(slot, desc)
    assert not kind.health(desc, 2.0)
    kind.clean(slot)


@pytest.mark.timeout(60)
def test_clean_after_crash_kills_the_process_instance(kinds: Kinds) -> None:
    kind = kinds.kind(spawn_mode="process", spawn=f"exec {EX}/plain-spawn.sh")
    slot, desc = cycle(kind, kinds, 1)
    fresh = CommandKind(kind.pool, kind.options)  # a restarted worker, no descriptor
    fresh.clean(slot)
    assert not alive(desc["pid"]) and not alive(desc["agent_pid"])
    assert not os.path.exists(slot.dir)


@pytest.mark.timeout(60)
def test_templates_get_quoted_fields_and_env(kinds: Kinds, tmp_path: Any) -> None:
    kind = kinds.kind(
        prepare="touch {dir}/prepared-$NOODLE_SLOT",
        spawn='printf \'{{"slot_seen": %s, "pool": "%s", "dir": "%s"}}\\n\' {slot} {pool} {dir}',
        health="test -f {dir}/prepared-{slot}",
        terminate='test "$(printf %s "$NOODLE_DESCRIPTOR" | wc -c)" -gt 2 && touch {dir}/terminated',
    )
    slot, desc = cycle(kind, kinds, 1)
    assert desc == {"slot_seen": 1, "pool": kind.pool.name, "dir": slot.dir, "slot": 1}
    assert kind.health(desc, 5.0)
    kind.terminate(slot, desc)
    assert os.path.exists(os.path.join(slot.dir, "terminated"))
    assert CommandKind.client_handle(desc) is None


@pytest.mark.timeout(60)
def test_failing_step_raises_with_stderr_tail(kinds: Kinds) -> None:
    kind = kinds.kind(prepare="echo 'disk on fire' >&2; exit 3", spawn="echo '{{}}'")
    with pytest.raises(StepFailed, match=r"prepare exited with 3.*disk on fire"):
        kind.prepare(kind.pool.slot(0))


@pytest.mark.timeout(60)
def test_step_timeout_kills_the_step_group(kinds: Kinds, tmp_path: Any) -> None:
    pidfile = tmp_path / "child.pid"
    kind = kinds.kind(spawn=f"sleep 300 & echo $! > {pidfile}; wait", spawn_timeout=0.5)
    with pytest.raises(StepFailed, match=r"timed out"):
        kind.spawn(kind.pool.slot(0))
    child = int(pidfile.read_text())
    kinds.pids.append(child)


@pytest.mark.timeout(60)
def test_oneshot_without_json_fails(kinds: Kinds) -> None:
    kind = kinds.kind(spawn="echo not json")
    with pytest.raises(StepFailed, match=r"no JSON object"):
        kind.spawn(kind.pool.slot(0))


@pytest.mark.timeout(60)
def test_process_mode_ready_line_and_early_exit(kinds: Kinds) -> None:
    kind = kinds.kind(spawn_mode="process", spawn="echo booting; echo up; exec sleep 300", ready_line="up")
    slot, desc = cycle(kind, kinds)
    assert set(desc) == {"pid", "start", "slot"}
    assert kind.health(desc, 1.0)
    os.kill(desc["pid"], signal.SIGKILL)
    for _ in range(1000):  # SIGKILL is asynchronous: wait for the death itself
        if not alive(desc["pid"]):
            break
        time.sleep(0.01)
    assert not kind.health(desc, 1.0)  # a killed instance is detected
    kind.terminate(slot, desc)

    dying = kinds.kind(spawn_mode="process", spawn="echo 'no luck' >&2; exit 1")
    with pytest.raises(StepFailed, match=r"exited before it was ready.*no luck"):
        dying.spawn(dying.pool.slot(0))

    silent = kinds.kind(spawn_mode="process", spawn="exec sleep 300", spawn_timeout=0.3, kill_grace=0.5)
    s = silent.pool.slot(0)
    with pytest.raises(StepFailed, match=r"no ready line"):
        silent.spawn(s)
    with open(os.path.join(s.dir, "spawn.pid")) as f:
        kinds.pids.append(int(f.read().split()[0]))


@pytest.mark.timeout(60)
def test_exec_handle(kinds: Kinds) -> None:
    kind = kinds.kind(spawn='echo \'{{"exec_prefix": ["env", "NOODLE_IN=1"]}}\'')
    _slot, desc = cycle(kind, kinds)
    handle = CommandKind.client_handle(desc)
    assert isinstance(handle, ExecHandle)
    res = handle.exec(["sh", "-c", "echo $NOODLE_IN; exit 4"])
    assert (res.returncode, res.stdout) == (4, "1\n")


def test_config_errors_name_the_key(tmp_path: Any) -> None:
    pool = PoolInfo("tcfg", 1, str(tmp_path), 0, 0)
    with pytest.raises(ConfigError, match=r"kinds.command.spawn"):
        CommandKind(pool, {})
    with pytest.raises(ConfigError, match=r"kinds.command.prepare: unknown field"):
        CommandKind(pool, {"spawn": "true", "prepare": "echo {pid}"})
    with pytest.raises(ConfigError, match=r"kinds.command.spawn_mode"):
        CommandKind(pool, {"spawn": "true", "spawn_mode": "daemon"})
    with pytest.raises(ConfigError, match=r"kinds.command.timeout"):
        CommandKind(pool, {"spawn": "true", "timeout": "soon"})


@pytest.mark.timeout(60)
def test_descriptor_too_large(kinds: Kinds) -> None:
    kind = kinds.kind(spawn=f"{PY} -c 'import json; print(json.dumps({{{{\"x\": \"a\" * 2000}}}}))'")
    with pytest.raises(StepFailed, match=r"descriptor_max"):
        kind.spawn(kind.pool.slot(0))


# -- process groups -------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    from tests.conftest import process_parents

    return process_parents(include_zombies=False).get(pid, [])


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return 0


def _wait(pred: Any, what: str) -> Any:
    for _ in range(2000):
        value = pred()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.mark.timeout(60)
def test_process_mode_terminate_kills_the_spawned_children(kinds: Kinds) -> None:
    """The spawn command leads its own session and process group, and
    terminate (no template) takes what it started along: a child that
    ignores TERM, and one that left the group (setsid) while still below."""
    kind = kinds.kind(
        spawn_mode="process",
        spawn="trap '' TERM; sleep 300 & setsid sleep 301 & echo ready; wait",
        kill_grace=0.3,
    )
    slot, desc = cycle(kind, kinds)
    pid = desc["pid"]
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    # both children, the setsid one (once it ran setsid) out of the group
    kids = _wait(lambda: len(c := _children(pid)) == 2 and any(_sid(k) == k for k in c) and c,
                 "the spawn command's two children")  # fmt: skip
    starts = {k: pid_start_time(k) for k in kids}
    kinds.pids += kids
    kind.terminate(slot, desc)
    assert not alive(pid)
    assert [k for k, s in starts.items() if pid_start_time(k) == s] == []
    assert not kind.health(desc, 1.0)
    kind.clean(slot)


@pytest.mark.timeout(60)
def test_clean_kills_the_group_after_its_leader_died(kinds: Kinds) -> None:
    """After a crash: the instance's shell is dead (its child, reparented,
    is no longer below it) and no descriptor survived. Clean still kills
    the group through spawn.pid."""
    kind = kinds.kind(spawn_mode="process", spawn="sleep 300 & echo ready; wait")
    slot, desc = cycle(kind, kinds, 1)
    pid = desc["pid"]
    (child,) = _wait(lambda: _children(pid), "the spawn command's child")
    kinds.pids.append(child)
    start = pid_start_time(child)
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not alive(pid), "the shell to die")
    assert pid_start_time(child) == start and os.getpgid(child) == pid
    CommandKind(kind.pool, kind.options).clean(slot)
    assert pid_start_time(child) != start
    assert not os.path.exists(slot.dir)


@pytest.mark.timeout(60)
def test_terminate_leaves_a_reused_pid_alone(kinds: Kinds) -> None:
    """A descriptor whose start time does not match the live pid (reused)
    must not signal that process or its group."""
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        kind = kinds.kind(spawn_mode="process", spawn="echo ready; exec sleep 300")
        slot = kind.pool.slot(0)
        kind.terminate(slot, {"pid": victim.pid, "start": (pid_start_time(victim.pid) or 0) + 1})
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# -- working directory -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_steps_run_in_base_dir(kinds: Kinds, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths in templates resolve against base_dir: by default the
    directory the kind was made in (where `noodle run` started), a relative
    base_dir against that too; never the slot dir."""
    monkeypatch.chdir(REPO)
    default = kinds.kind(spawn_mode="process", spawn="exec examples/command/plain-spawn.sh", prepare="pwd > {dir}/pwd")
    rel = kinds.kind(
        spawn_mode="process", spawn="exec ./plain-spawn.sh", prepare="pwd > {dir}/pwd", base_dir="examples/command"
    )
    monkeypatch.chdir("/")  # the working directory at construction counts, not a later one
    for kind, want in ((default, REPO), (rel, EX)):
        assert kind.base_dir == want
        slot, desc = cycle(kind, kinds)
        with open(os.path.join(slot.dir, "pwd")) as f:
            assert f.read().strip() == want
        assert kind.health(desc, 5.0)
        kind.terminate(slot, desc)
        kind.clean(slot)
    with pytest.raises(ConfigError, match=r"kinds.command.base_dir"):
        kinds.kind(spawn="true", base_dir="/nonexistent/noodle")
