"""Bad input of every kind: a segment scribbled on while the pool runs,
undecodable descriptors, signals during start-up and shutdown, every
config field wrong in turn, and fuzzed queue messages."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import posix_ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import noodle
from noodle import layout as L
from noodle import queues
from tests.chaos.test_chaos import Clients, settle_and_check
from tests.conftest import REPO, wait_for, wait_full

pytestmark = pytest.mark.timeout(300)


def scribble(pool_name: str, regions: list[tuple[int, int]], rng: random.Random, n: int) -> None:
    """Write n random bytes at random offsets inside the given regions,
    through a separate mapping, as a buggy or hostile co-tenant would."""
    shm = posix_ipc.SharedMemory(f"/noodle.{pool_name}")
    mm = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    for _ in range(n):
        start, end = rng.choice(regions)
        off = rng.randrange(start, end)
        mm[off] = rng.randrange(256)
    mm.close()


@pytest.mark.parametrize("region", ["header", "ring", "slots", "everything"])
def test_corrupt_segment_while_running(supervisor, pool_name: str, clients: Clients, region: str) -> None:
    sup = supervisor("--pool-size", "4")
    pool = sup.attach()
    wait_full(pool)
    g = pool._seg.geometry
    regions = {
        "header": [(0, L.HEADER_SIZE)],
        "ring": [(g.ring_off, g.ring_off + 8 * g.ring_capacity)],
        "slots": [(g.slots_off, g.slots_off + g.slot_size * g.pool_size)],
    }
    regions["everything"] = regions["header"] + regions["ring"] + regions["slots"]
    # one damage per region that must be repaired, then random bytes on top
    known = {
        "header": [(0, b"XX")],  # the magic
        "ring": [(g.ring_off, b"\xff" * 8)],  # a cell no valid state explains
        "slots": [(g.slot_off(1), b"\x0f")],  # state nibble 15: no such state
    }
    known["everything"] = known["header"] + known["ring"] + known["slots"]
    rng = random.Random(region)
    clients.start(3)
    shm = posix_ipc.SharedMemory(f"/noodle.{pool_name}")
    mm = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    for off, data in known[region]:
        mm[off : off + len(data)] = data
    mm.close()
    for _ in range(10):
        scribble(pool_name, regions[region], rng, 40)
        time.sleep(0.15)
    time.sleep(1.5)
    clients.stop()  # asserts every client exited 0: exceptions at worst, never a crash
    assert sup.proc.poll() is None, sup.logtext()
    # the supervisor repaired what it found and the pool is whole again
    wait_for(lambda: pool.stats()["counters"]["corruption_repairs"] > 0, 30, "a repair")
    settle_and_check(pool, sup.pid, pool_name, timeout=120)
    for _ in range(4):
        with pool.get(timeout=10) as lease:
            assert lease.instance.run("2 * 21").result == 42
    pool.close()


def test_descriptor_that_is_not_msgpack(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    seg = pool._seg
    off = seg.geometry.slot_off(0)
    seg._mm[off + L.R_DESCRIPTOR : off + L.R_DESCRIPTOR + 4] = b"\xc1\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    seg._mm[off + L.R_DESC_LEN : off + L.R_DESC_LEN + 4] = (4).to_bytes(4, "little")
    leases = [pool.get(timeout=30) for _ in range(2)]  # slot 0 is skipped and replaced, never handed out broken
    for lease in leases:
        assert lease.instance.run("1").result == 1
        lease.release()
    assert pool.stats()["counters"]["unhealthy_on_get"] >= 1
    wait_full(pool)
    pool.close()


def _spawn_supervisor(name: str, run_root: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "noodle", "run", "--name", name, "--run-dir", run_root, "--pool-size", "3"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_signal_during_startup(pool_name: str, run_root: str, tmp_path: Path, delay: float) -> None:
    proc = _spawn_supervisor(pool_name, run_root, tmp_path / "sup.log")
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    # before Python installs handlers SIGTERM kills it outright; after, it shuts down cleanly
    assert code in (0, -signal.SIGTERM), (tmp_path / "sup.log").read_text()
    if code == -signal.SIGTERM:
        # killed before it owned anything, or mid-start: the next start cleans up
        sup = _spawn_supervisor(pool_name, run_root, tmp_path / "sup2.log")
        wait_for(lambda: os.path.exists(f"/dev/shm/noodle.{pool_name}"), 30, "restart")
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0


def test_repeated_signals_during_shutdown(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "3", "--drain-timeout", "30")
    pool = sup.attach()
    wait_full(pool)
    lease = pool.get()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        sup.proc.send_signal(sig)
        time.sleep(0.02)
    assert sup.stop(timeout=60) == 0  # the second signal revoked the lease instead of waiting 30 s
    assert lease.release() is False
    pool.close()


# every top-level field, each given a value of the wrong type or range
WRONG = {
    "name": "'../x'", "pool_size": "0", "kind": "''", "workers": "0", "max_concurrency": "-1",
    "check_health": "'yes'", "health_on_get": "1", "get_timeout": "'soon'", "drain_timeout": "-5",
    "abandon_cooldown": "[]", "step_timeout": "0", "worker_timeout": "0", "max_failures": "0",
    "descriptor_size": "10", "run_dir": "7", "group": "3", "log_level": "'LOUD'", "kinds": "7",
    "log_format": "'xml'", "metrics": "'9464'", "image_dir": "'relative/dir'", "refill_nice": "20",
}


def test_every_field_is_covered() -> None:
    from dataclasses import fields

    from noodle.config import Config

    assert set(WRONG) == {f.name for f in fields(Config)}


@pytest.mark.parametrize("key", sorted(WRONG))
def test_config_field_wrong(key: str, tmp_path: Path, pool_name: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"{key} = {WRONG[key]}\n")
    res = subprocess.run([sys.executable, "-m", "noodle", "run", "--name", pool_name, "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert key in res.stderr


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_message_decoding(raw: bytes) -> None:
    try:
        slot, gen = queues.decode(raw, 16)
    except queues.BadMessage:
        return
    assert 0 <= slot < 16 and gen >= 0


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5) | st.binary(max_size=5),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=8,
    )
)
def test_fuzz_structured_messages(obj: object) -> None:
    raw = msgpack.packb(obj)
    try:
        slot, gen = queues.decode(raw, 16)
    except queues.BadMessage:
        return
    assert obj == [1, slot, gen]


def test_attach_to_a_pool_that_does_not_exist() -> None:
    with pytest.raises(noodle.PoolNotFound, match="noodle run --name"):
        noodle.attach("nobody-runs-this-pool")
    with pytest.raises(noodle.ConfigError):
        noodle.attach("bad/name")
