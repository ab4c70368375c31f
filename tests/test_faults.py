"""Faults with real processes: failing and hanging steps, killed clients,
killed workers, a killed supervisor, bad configuration and bad messages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import posix_ipc
import pytest

import noodle
from noodle.host.proc import is_alive
from tests.conftest import REPO, assert_nothing_left, pool_processes, wait_for, wait_full, zombies_of

pytestmark = pytest.mark.timeout(240)
MK = "tests.kindlib:MisbehavingKind"


def kind_config(**options: object) -> str:
    lines = [f'kind = "{MK}"', f'[kinds."{MK}"]']
    for k, v in options.items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
    return "\n".join(lines).replace("[]", "[]") + "\n"


def instance_pids(pool: noodle.Pool) -> dict[int, int]:
    out = {}
    for slot in range(pool.pool_size):
        raw = pool._seg.descriptor_bytes(slot)
        if raw:
            out[slot] = msgpack.unpackb(raw)["pid"]
    return out


def test_clean_failing_three_times_recovers(supervisor) -> None:
    sup = supervisor("--pool-size", "2", config=kind_config(fail_clean_times=3))
    pool = sup.attach()
    snap = wait_full(pool, timeout=60)
    assert snap["counters"]["clean_failures"] == 6  # 3 per slot, then success
    assert snap["states"]["abandoned"] == 0
    pool.close()


def test_always_failing_slot_is_abandoned_then_retried_after_cooldown(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--abandon-cooldown", "1.5",
                     config=kind_config(fail_always="prepare", fail_always_slots=[1]))
    pool = sup.attach()
    snap = wait_for(lambda: (s := pool.stats())["states"]["abandoned"] == 1 and s, 60, "slot 1 to be abandoned")
    assert snap["states"]["ready"] == 1  # the healthy slot is not held up
    assert snap["counters"]["prepare_failures"] == 6  # 5 retries with backoff, then abandoned
    rec = pool._seg.record(1)
    assert rec.failures == 6
    wait_for(lambda: pool.stats()["counters"]["abandon_retries"] >= 1, 30, "the cool-down retry")
    wait_for(lambda: pool.stats()["states"]["abandoned"] == 1, 60, "slot 1 to be abandoned again")
    with pool.get(timeout=5) as lease:
        assert lease.slot == 0
    pool.close()


def test_sigkill_of_a_lease_holder_is_reclaimed(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    code = (f"import noodle, os, time\np = noodle.attach({pool_name!r})\nl = p.get()\n"
            "print(l.slot, l.descriptor['pid'], flush=True)\ntime.sleep(600)\n")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    _slot, inst = map(int, child.stdout.readline().split())
    assert pool.stats()["states"]["leased"] == 1
    child.kill()
    child.wait()
    snap = wait_full(pool)
    assert snap["counters"]["reclaimed_leases"] == 1
    wait_for(lambda: not is_alive(inst), 10, "the held instance to be destroyed")
    pool.close()


@pytest.mark.parametrize("stage", ["clean", "prepare", "spawn", "terminate"])
def test_sigkill_of_a_worker_mid_step(supervisor, run_root: str, stage: str, pool_name: str) -> None:
    """The worker kills itself inside its step: the supervisor replaces it,
    puts the slot back, and the pool ends full with no stray process."""
    flag = Path(run_root) / f"kill-{stage}"
    sup = supervisor("--pool-size", "2", config=kind_config(kill_self_step=stage, kill_self_once_file=str(flag)))
    pool = sup.attach()
    wait_full(pool)
    flag.write_text("once")
    with pool.get():  # a release drives the slot through terminate, clean, prepare, spawn
        pass
    wait_for(lambda: not flag.exists(), 30, f"the {stage} step to be hit")
    snap = wait_full(pool, timeout=60)
    assert snap["counters"]["worker_restarts"] == 1
    assert sum(snap["states"].values()) == 2
    # the instances alive are exactly those of the ready slots
    alive = {p for p in instance_pids(pool).values() if is_alive(p)}
    titles = [t for _, t in pool_processes(pool_name) if "instance" in t]
    assert len(alive) == 2 and len(titles) == 2, titles
    assert not zombies_of(sup.pid)
    pool.close()


def test_stuck_step_is_killed_and_replaced(supervisor, run_root: str) -> None:
    flag = Path(run_root) / "hang"
    sup = supervisor("--pool-size", "2", "--step-timeout", "1", "--worker-timeout", "3",
                     config=kind_config(hang_step="spawn", hang_seconds=3600, hang_once_file=str(flag)))
    pool = sup.attach()
    wait_full(pool)
    flag.write_text("once")
    with pool.get():
        pass
    snap = wait_full(pool, timeout=60)
    assert snap["counters"]["spawn_failures"] + snap["counters"]["workers_killed_stuck"] >= 1
    pool.close()


def test_sigstopped_worker_is_killed_and_replaced(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2", "--worker-timeout", "2")
    pool = sup.attach()
    wait_full(pool)
    [(pid, _)] = [(p, t) for p, t in pool_processes(pool_name) if "spawn-worker" in t]
    os.kill(pid, signal.SIGSTOP)
    with pool.get():
        pass
    wait_for(lambda: pool.stats()["counters"]["workers_killed_stuck"] == 1, 30, "the stopped worker to be killed")
    wait_full(pool, timeout=60)
    pool.close()


def test_supervisor_sigkill_then_restart_recovers(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "3")
    pool = sup.attach()
    wait_full(pool)
    lease = pool.get()
    old = set(instance_pids(pool).values())
    assert len(old) == 3
    os.kill(sup.pid, signal.SIGKILL)
    sup.proc.wait()
    with pytest.raises(noodle.PoolNotFound, match=r"supervisor .* is gone"):
        wait_for(lambda: pool.get(timeout=0) and False, 10, "the old handle to notice")
    pool.close()
    # the segment and the instances outlive it ...
    assert os.path.exists(f"/dev/shm/noodle.{pool_name}")
    assert any(is_alive(p) for p in old)
    # ... until the next supervisor of that name cleans them up
    sup2 = supervisor("--pool-size", "3")
    pool2 = sup2.attach()
    wait_full(pool2)
    wait_for(lambda: not any(is_alive(p) for p in old), 10, "old instances to be stopped")
    assert "dead supervisor" in sup2.logtext()
    assert lease.released is False
    pool2.close()


def test_second_supervisor_is_refused(supervisor) -> None:
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    wait_full(pool)
    second = supervisor("--pool-size", "1")
    assert second.proc.wait(30) == 1
    assert "already has a live supervisor" in second.logtext()
    with pool.get(timeout=5):  # the first is untouched
        pass
    pool.close()


def test_garbage_in_every_queue_is_dropped(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    junk = [b"", b"\xff\xfe", msgpack.packb("hello"), msgpack.packb([1, 999, 0]), msgpack.packb([2, 0, 0]),
            msgpack.packb([1, -1, 0]), msgpack.packb({"a": 1}), msgpack.packb([1, 0, 0]), b"x" * 64]
    sent = 0
    for stage in ("clean", "prepare", "spawn", "terminate"):
        q = posix_ipc.MessageQueue(f"/noodle.{pool_name}.{stage}")
        for j in junk:
            try:
                q.send(j, timeout=1)
                sent += 1
            except posix_ipc.BusyError:
                pass
        q.close()
    snap = wait_for(lambda: (s := pool.stats())["counters"]["bad_messages"] + s["counters"]["stale_messages"] >= sent
                    and s, 30, "the junk to be consumed")  # fmt: skip
    assert snap["counters"]["bad_messages"] >= 4 * 7
    with pytest.raises(ValueError, match="too long"):  # oversized messages are refused outright
        q = posix_ipc.MessageQueue(f"/noodle.{pool_name}.clean")
        try:
            q.send(b"x" * 65)
        finally:
            q.close()
    assert sup.proc.poll() is None
    for _ in range(4):
        with pool.get(timeout=10) as lease:
            assert lease.instance.run("1").result == 1
    pool.close()


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "noodle", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    "toml, match",
    [
        ("pool_size = 0\n", "pool_size"),
        ("pool_size = 'eight'\n", "pool_size"),
        ("colour = 'blue'\n", "colour: unknown setting"),
        ("kind = 'nope'\n", "unknown kind 'nope'"),
        ("get_timeout = -1\n", "get_timeout"),
        ("workers = {spawn = 0}\n", "workers.spawn"),
        ("workers = {painters = 2}\n", "workers.painters"),
        ("[kinds.process]\npreload = 'json'\n", "kinds.process.preload"),
        ("[kinds.process]\nwhatever = 1\n", "kinds.process.whatever"),
        ("pool_size = \n", "not valid TOML"),
        ("check_health = 'yes'\n", "check_health"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path: Path, pool_name: str, toml: str, match: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    res = _run_cli("run", "--name", pool_name, "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert match in res.stderr


def test_check_health_refuses_to_start_naming_the_step(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--check-health", config=kind_config(fail_always="spawn"))
    assert sup.proc.wait(60) == 1
    assert "check_health: step 'spawn' failed" in sup.logtext()


def test_max_concurrency_bounds_steps_running_at_once(supervisor, run_root: str) -> None:
    """8 workers but max_concurrency 2: never more than 2 steps at once,
    while without the bound the same workers overlap more."""
    seen = {}
    for limit in (2, 0):
        d = Path(run_root) / f"overlap{limit}"
        d.mkdir()
        sup = supervisor("--pool-size", "6", "--workers", "2", "--max-concurrency", str(limit),
                         config=kind_config(overlap_dir=str(d), step_delay=0.1),
                         name=f"{Path(run_root).name}c{limit}")  # fmt: skip
        pool = sup.attach()
        wait_full(pool, timeout=120)
        for _ in range(2):  # churn so all four stages run together
            leases = [pool.get(timeout=30) for _ in range(6)]
            for lease in leases:
                lease.release()
            wait_full(pool, timeout=120)
        seen[limit] = max(int(p.read_text()) for p in d.glob("max-*"))
        pool.close()
        assert sup.stop() == 0
        assert_nothing_left(sup.name)
    assert seen[2] <= 2
    assert seen[0] > 2


def test_check_health_passes_for_a_good_kind(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--check-health")
    pool = sup.attach()
    wait_full(pool)
    assert "check_health passed" in sup.logtext()
    pool.close()
