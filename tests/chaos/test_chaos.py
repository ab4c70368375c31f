"""Chaos: the whole service with clients churning, faults injected at
random points, and the invariants checked after every round.

Invariants (checked by `settle_and_check` after each round, and the sum at
every sample while faults land):

* the seven state counts sum to pool_size;
* within a bounded time every slot is ready again (or abandoned, counted);
* the instance processes alive are exactly one per ready slot, and the
  one each descriptor names;
* the supervisor has no zombie children;
* after shutdown no process, segment or queue of the pool is left (the
  pool_name fixture's teardown).

Rounds per fault: 3 in `make test`, 25 with `pytest --soak tests/chaos`.
Each test prints a summary line `CHAOS <fault>: ...` (run with -s to see).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

import noodle
from noodle import layout as L
from noodle.host.proc import is_alive
from tests.conftest import REPO, pool_processes, wait_for, zombies_of

pytestmark = pytest.mark.timeout(900)
MK = "tests.kindlib:MisbehavingKind"
POOL_SIZE = 3


def config(**options: Any) -> str:
    lines = [f'kind = "{MK}"', f'[kinds."{MK}"]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


class Clients:
    """Client processes in acquire/use/release loops."""

    def __init__(self, name: str, out_dir: Path) -> None:
        self.name = name
        self.out_dir = out_dir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.killed = 0
        self.totals: dict[str, Any] = {"gets": 0, "releases": 0, "starved": 0, "wrong_result": 0, "other_errors": []}

    def start(self, n: int) -> None:
        for _ in range(n):
            out = self.out_dir / f"client-{len(self.procs) + self.killed}-{random.random()}.json"
            env = dict(os.environ, PYTHONPATH=str(REPO))
            p = subprocess.Popen([sys.executable, "-m", "tests.chaos.client", self.name, str(out)], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE)  # fmt: skip
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
            p.stdout.close()
            self.procs.append((p, out))

    def kill_one(self, rng: random.Random) -> None:
        p, _out = self.procs.pop(rng.randrange(len(self.procs)))
        p.kill()
        p.wait()
        self.killed += 1
        self.start(1)

    def kill_all(self) -> None:
        """Teardown after a failure: no client may outlive its test."""
        for p, _ in self.procs:
            p.kill()
            p.wait()
        self.procs = []

    def stop(self) -> None:
        for p, _ in self.procs:
            p.send_signal(signal.SIGTERM)
        for p, out in self.procs:
            assert p.wait(60) == 0
            counts = json.loads(out.read_text())
            for k in ("gets", "releases", "starved", "wrong_result"):
                self.totals[k] += counts[k]
            self.totals["other_errors"] += counts["other_errors"]
        self.procs = []


class Sampler(threading.Thread):
    """Samples the state counts while faults land; every sample must sum."""

    def __init__(self, pool: noodle.Pool) -> None:
        super().__init__(daemon=True)
        self.pool = pool
        self.samples = 0
        self.bad: list[dict[str, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                snap = self.pool.stats()
            except noodle.NoodleError:
                return
            if sum(snap["states"].values()) != snap["pool_size"] or "invalid_states" in snap:
                self.bad.append(snap["states"])
            self.samples += 1
            time.sleep(0.005)

    def finish(self) -> None:
        self.halt.set()
        self.join()
        assert not self.bad, f"state counts did not sum to pool_size: {self.bad[:3]}"


def settle_and_check(pool: noodle.Pool, sup_pid: int, name: str, timeout: float = 90) -> dict[str, Any]:
    """Wait until every slot is ready (or abandoned), then check that the
    instances alive are exactly those of the ready slots."""
    try:
        snap = wait_for(
            lambda: (s := pool.stats())["states"]["ready"] + s["states"]["abandoned"] == pool.pool_size and s,
            timeout, "every slot to be ready again",
        )  # fmt: skip
    except AssertionError as exc:
        records = "\n".join(f"  {L.describe_word(r.word)} {r}" for r in map(pool._seg.record, range(pool.pool_size)))
        raise AssertionError(f"{exc}; now={time.monotonic_ns()}, slots:\n{records}") from None
    ready = {slot for slot in range(pool.pool_size) if L.word_state(pool._seg.core.load(slot)) == L.State.READY}
    described = {slot: msgpack.unpackb(pool._seg.descriptor_bytes(slot))["pid"] for slot in ready}
    for slot, pid in described.items():
        assert is_alive(pid), f"slot {slot} is ready but its instance pid {pid} is dead"

    def instances_match() -> bool:
        running = [t for _, t in pool_processes(name) if t.startswith(f"noodle instance {name} ")]
        return sorted(int(t.split()[-1]) for t in running) == sorted(ready)

    wait_for(instances_match, 15, "instance processes to be exactly those of the ready slots")
    assert not zombies_of(sup_pid), "the supervisor left zombies"
    return snap


def report(fault: str, rounds: int, **figures: Any) -> None:
    line = f"CHAOS {fault}: {rounds} rounds, " + ", ".join(f"{k} {v}" for k, v in figures.items())
    print(line)
    path = os.environ.get("NOODLE_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def rounds_for(soak: bool) -> int:
    return 25 if soak else 3


def test_chaos_clients_killed_holding_in_get_and_waiting(supervisor, pool_name: str, clients: Clients, soak: bool):
    """More clients than slots, so at any moment some hold a lease, some are
    inside get() and some sleep in the waiter queue; SIGKILL them at random."""
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rng = random.Random(1)
    rounds = rounds_for(soak)
    sampler = Sampler(pool)
    sampler.start()
    for _ in range(rounds):
        clients.start(6)
        for _ in range(6):
            time.sleep(rng.uniform(0.05, 0.3))
            clients.kill_one(rng)
        clients.stop()
        settle_and_check(pool, sup.pid, pool_name)
    sampler.finish()
    c = pool.stats()["counters"]
    assert c["reclaimed_leases"] + c["ring_repushes"] + c["waiters_skipped"] >= 1  # kills did land somewhere
    assert clients.totals["wrong_result"] == 0 and not clients.totals["other_errors"], clients.totals
    report("client SIGKILL", rounds, kills=clients.killed, gets=clients.totals["gets"],
           reclaimed=c["reclaimed_leases"], ring_repushes=c["ring_repushes"], waiters_skipped=c["waiters_skipped"],
           samples=sampler.samples, lost=0)  # fmt: skip
    pool.close()


def worker_in_step(pool: noodle.Pool, name: str) -> int:
    """A worker pid that owns a slot right now, i.e. is inside its step."""
    workers = {p for p, t in pool_processes(name) if "-worker " in t}
    for word in pool._seg.states():
        pid = L.word_pid(word)
        if pid in workers and L.word_state(word) in (L.State.CLEAN, L.State.PREPARE, L.State.SPAWN,
                                                      L.State.TERMINATE):  # fmt: skip
            return pid
    return 0


def test_chaos_workers_killed_mid_step(supervisor, pool_name: str, clients: Clients, soak: bool):
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.05))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rounds = rounds_for(soak)
    kills: dict[str, int] = {}
    sampler = Sampler(pool)
    sampler.start()
    for _ in range(rounds):
        clients.start(3)
        for _ in range(4):
            pid = wait_for(lambda: worker_in_step(pool, pool_name), 30, "a worker inside a step")
            title = next((t for p, t in pool_processes(pool_name) if p == pid), "?")
            os.kill(pid, signal.SIGKILL)
            stage = title.split()[1] if title != "?" else "?"
            kills[stage] = kills.get(stage, 0) + 1
            time.sleep(0.05)
        clients.stop()
        settle_and_check(pool, sup.pid, pool_name)
    sampler.finish()
    c = pool.stats()["counters"]
    assert c["worker_restarts"] >= sum(kills.values())
    assert clients.totals["wrong_result"] == 0 and not clients.totals["other_errors"], clients.totals
    report("worker SIGKILL mid-step", rounds, kills=kills, worker_restarts=c["worker_restarts"],
           gets=clients.totals["gets"], samples=sampler.samples, lost=0)  # fmt: skip
    pool.close()


def test_chaos_supervisor_killed_and_restarted(supervisor, pool_name: str, clients: Clients, soak: bool):
    rounds = rounds_for(soak)
    stray_instances = 0
    sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    for _ in range(rounds):
        clients.start(3)
        time.sleep(random.uniform(0.2, 0.6))
        old_instances = {p for p, t in pool_processes(pool_name) if t.startswith("noodle instance")}
        os.kill(sup.pid, signal.SIGKILL)
        sup.proc.wait()
        pool.close()
        sup = supervisor("--pool-size", str(POOL_SIZE), config=config(step_delay=0.01))
        pool = sup.attach()
        clients.stop()  # they re-attached to the new supervisor meanwhile
        settle_and_check(pool, sup.pid, pool_name)
        stray_instances += sum(1 for p in old_instances if is_alive(p))
    assert stray_instances == 0, "instances of a killed supervisor survived its successor's start"
    assert clients.totals["wrong_result"] == 0 and not clients.totals["other_errors"], clients.totals
    report("supervisor SIGKILL + restart", rounds, gets=clients.totals["gets"], stray_instances=0, lost=0)
    pool.close()


def test_chaos_stopped_worker_is_replaced(supervisor, pool_name: str, clients: Clients, soak: bool):
    """SIGSTOP freezes a worker (a hung step, or a hung loop): the supervisor
    notices the missing heartbeat and replaces it."""
    sup = supervisor("--pool-size", str(POOL_SIZE), "--worker-timeout", "1.5", config=config(step_delay=0.02))
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name)
    rounds = rounds_for(soak)
    rng = random.Random(3)
    for r in range(rounds):
        clients.start(2)
        workers = [p for p, t in pool_processes(pool_name) if "-worker " in t]
        os.kill(rng.choice(workers), signal.SIGSTOP)
        wait_for(lambda r=r: pool.stats()["counters"]["workers_killed_stuck"] >= r + 1, 30,
                 "the stopped worker to be killed")  # fmt: skip
        clients.stop()
        settle_and_check(pool, sup.pid, pool_name)
    report("worker SIGSTOP", rounds, killed_stuck=pool.stats()["counters"]["workers_killed_stuck"], lost=0)
    pool.close()


def test_chaos_flaky_and_hanging_steps(supervisor, pool_name: str, clients: Clients, soak: bool):
    """30% of steps fail and a few hang past step_timeout; the pool keeps
    serving and every slot comes back (abandoned ones are counted)."""
    sup = supervisor("--pool-size", str(POOL_SIZE), "--step-timeout", "1", "--abandon-cooldown", "1",
                     config=config(random_failure_rate=0.3, random_hang_rate=0.02))  # fmt: skip
    pool = sup.attach()
    settle_and_check(pool, sup.pid, pool_name, timeout=180)
    rounds = rounds_for(soak)
    sampler = Sampler(pool)
    sampler.start()
    for _ in range(rounds):
        clients.start(3)
        time.sleep(2.0)
        clients.stop()
        settle_and_check(pool, sup.pid, pool_name, timeout=180)
    sampler.finish()
    c = pool.stats()["counters"]
    failures = sum(c[f"{s}_failures"] for s in ("clean", "prepare", "spawn", "terminate"))
    assert failures > 0
    assert clients.totals["wrong_result"] == 0 and not clients.totals["other_errors"], clients.totals
    report("random step failures 30% + hangs", rounds, step_failures=failures, abandoned=c["abandoned"],
           gets=clients.totals["gets"], samples=sampler.samples, lost=0)  # fmt: skip
    pool.close()
