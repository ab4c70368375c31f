"""Prometheus metrics: scraped over HTTP from a real supervisor, parsed with
prometheus-client's own parser; and `noodle status --prometheus`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from noodle import layout as L
from noodle import metrics
from noodle.errors import ConfigError
from tests.conftest import REPO, descendants, wait_for, wait_full

pytestmark = pytest.mark.timeout(120)

STATES = {"clean", "prepare", "spawn", "ready", "leased", "terminate", "abandoned"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen_inode(port: int) -> str:
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1].endswith(f":{port:04X}") and cols[3] == "0A":  # LISTEN
                return cols[9]
    raise AssertionError(f"nothing listens on port {port}")


def sockets_holders(inode: str, pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    out.append(pid)
                    break
            except OSError:
                pass
    return sorted(out)


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    fam = fams[name]
    for s in fam.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{name}{suffix} {labels}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_layout_names_the_collector_reads() -> None:
    for h in (*metrics.STEPS, "wait", "acquire", "dispatch", "health"):
        assert h in L.H
    for c in (*metrics._OWN_COUNTERS, *metrics._STEP_COUNTERS):
        assert c in L.C


def test_buckets_from_log2_histogram() -> None:
    hist = [0] * L.HIST_BUCKETS
    hist[3] = 2  # 4..7 ns: below the first exported bound, folded into it
    hist[20] = 5  # ~0.5-1 ms
    hist[63] = 1  # beyond the last bound: only in +Inf
    buckets, total = metrics._buckets(hist)
    assert buckets[0] == (repr(256 / 1e9), 2.0)
    le = dict(buckets)
    assert le[repr((1 << 20) / 1e9)] == 7.0 and le[repr((1 << 19) / 1e9)] == 2.0
    assert le[repr((1 << 40) / 1e9)] == 7.0 and buckets[-1] == ("+Inf", 8.0)
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    assert total == pytest.approx((2 * 6 + 5 * 0.75 * (1 << 20) + 0.75 * (1 << 63)) / 1e9)


@pytest.mark.parametrize("bad", ["9464", "host:", "h:0", "h:70000", "::1:9464", "[nope]:1"])
def test_bad_addresses_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="metrics"):
        metrics.parse_address(bad)


def test_addresses() -> None:
    assert metrics.parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_address("[::1]:9464") == ("::1", 9464)
    assert metrics.parse_address(":9464") == ("0.0.0.0", 9464)


def test_scrape_over_http_and_status_prometheus(supervisor, pool_name: str) -> None:
    port = free_port()
    sup = supervisor("--pool-size", "3", "--metrics", f"127.0.0.1:{port}")
    pool = sup.attach()
    wait_full(pool)
    for _ in range(4):
        with pool.get(timeout=10) as lease:
            lease.instance.run("1")
    held = pool.get(timeout=10)
    wait_for(lambda: pool.stats()["counters"]["spawns"] >= 7, 60, "the released slots to be warmed again")

    fams = parse(scrape(port))
    assert sample(fams, "noodle_up", pool=pool_name) == 1
    # only the supervisor holds the listening socket: not its workers, not the instances forked from the zygote
    holders = sockets_holders(listen_inode(port), [sup.pid, *descendants(sup.pid)])
    assert holders == [sup.pid]
    states = {s.labels["state"]: s.value for s in fams["noodle_slots"].samples}
    assert set(states) == STATES and sum(states.values()) == 3
    assert states["leased"] >= 1
    assert sample(fams, "noodle_pool_size", pool=pool_name) == 3
    assert sample(fams, "noodle_leases", "_total", pool=pool_name) >= 5
    assert sample(fams, "noodle_releases", "_total", pool=pool_name) >= 4
    assert fams["noodle_leases"].type == "counter"
    for step in metrics.STEPS:
        assert sample(fams, "noodle_step_failures", "_total", pool=pool_name, step=step) == 0
    assert sample(fams, "noodle_abandoned", "_total", pool=pool_name) == 0
    assert sample(fams, "noodle_reclaimed_leases", "_total", pool=pool_name) == 0
    assert fams["noodle_step_seconds"].type == "histogram"
    spawns = sample(fams, "noodle_step_seconds", "_count", pool=pool_name, step="spawn")
    assert spawns >= 7  # 3 to fill + one per release
    assert sample(fams, "noodle_step_seconds", "_bucket", pool=pool_name, step="spawn", le="+Inf") == spawns
    assert sample(fams, "noodle_step_seconds", "_sum", pool=pool_name, step="spawn") > 0
    assert fams["noodle_get_wait_seconds"].type == "histogram"
    sample(fams, "noodle_get_wait_seconds", "_count", pool=pool_name)

    # the same text, once, from the command line
    res = subprocess.run([sys.executable, "-m", "noodle", "status", "--name", pool_name, "--prometheus"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    once = parse(res.stdout)
    assert set(once) == set(fams)
    assert sample(once, "noodle_leases", "_total", pool=pool_name) >= 5
    held.release()
    pool.close()
    assert sup.stop() == 0
    # the server went away with the supervisor
    with pytest.raises(OSError):
        scrape(port)


def test_missing_pool_is_up_0() -> None:
    fams = parse(metrics.exposition("no-such-pool-i12"))
    assert sample(fams, "noodle_up", pool="no-such-pool-i12") == 0
    assert set(fams) == {"noodle_up"}


def test_port_in_use_is_a_config_error(pool_name: str, run_root: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "noodle", "run", "--name", pool_name, "--run-dir", run_root,
                              "--metrics", f"127.0.0.1:{port}"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert res.returncode == 2 and "cannot listen" in res.stderr, res.stderr
