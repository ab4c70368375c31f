"""systemd integration (sd_notify, journal priorities) and the `noodle` command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for, wait_full

pytestmark = pytest.mark.timeout(120)


def noodle_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "noodle", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def test_sd_notify_ready_status_watchdog_stopping(pool_name: str, run_root: str, tmp_path: Path) -> None:
    """A real AF_UNIX datagram socket stands in for systemd's."""
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=addr, WATCHDOG_USEC="400000", JOURNAL_STREAM="8:1234")
    log = tmp_path / "sup.log"
    proc = subprocess.Popen([sys.executable, "-m", "noodle", "run", "--name", pool_name, "--run-dir", run_root,
                             "--pool-size", "2"], cwd=REPO, env=env, stderr=open(log, "wb"))  # fmt: skip
    seen: list[str] = []

    def drain() -> None:
        while True:
            try:
                seen.append(sock.recv(4096).decode())
            except TimeoutError:
                return

    try:
        wait_for(lambda: drain() or any("READY=1" in m for m in seen), 30, "READY=1")
        wait_for(lambda: drain() or any("STATUS=ready 2/2" in m for m in seen), 30, "a full STATUS")
        wait_for(lambda: drain() or sum("WATCHDOG=1" in m for m in seen) >= 3, 30, "watchdog pings")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        drain()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert any(m.startswith("STOPPING=1") for m in seen)
    ready = next(m for m in seen if "READY=1" in m)
    assert f"MAINPID={proc.pid}" in ready
    # under the journal, every log line carries a syslog priority prefix
    lines = [ln for ln in log.read_text().splitlines() if ln]
    assert lines and all(ln[:3] in ("<6>", "<4>", "<3>", "<2>", "<7>") for ln in lines), lines[:5]


def test_unit_is_generated_and_sane() -> None:
    res = noodle_cli("unit")
    assert res.returncode == 0, res.stderr
    for line in ("Type=notify", "KillMode=mixed", "NotifyAccess=main", "WatchdogSec=", "ExecStart="):
        assert line in res.stdout
    # more in tests/test_unit.py (systemd-analyze verify and security)


def test_cli_run_status_get_exec(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    res = noodle_cli("status", "--name", pool_name, "--json")
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    assert snap["pool_size"] == 2 and sum(snap["states"].values()) == 2
    assert set(snap["states"]) == {"clean", "prepare", "spawn", "ready", "leased", "terminate", "abandoned"}
    assert "counters" in snap
    res = noodle_cli("status", "--name", pool_name)
    assert res.returncode == 0 and "ready 2" in res.stdout
    res = noodle_cli("get", "--name", pool_name)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["slot"] in (0, 1) and got["descriptor"]["socket"].endswith("instance.sock")
    res = noodle_cli("exec", "--name", pool_name, "print(1+1)")
    assert (res.returncode, res.stdout) == (0, "2\n"), res.stderr
    res = noodle_cli("exec", "--name", pool_name, "1/0")
    assert res.returncode == 6 and "ZeroDivisionError" in res.stderr
    pool.close()


def test_cli_exit_codes(supervisor, pool_name: str) -> None:
    res = noodle_cli("status", "--name", "no-pool-by-this-name")
    assert res.returncode == 3 and "no pool named" in res.stderr
    assert noodle_cli("exec", "--name", "no-pool-by-this-name", "1").returncode == 3
    assert noodle_cli("frobnicate").returncode == 2
    assert noodle_cli("run", "--pool-size", "many").returncode == 2
    sup = supervisor("--pool-size", "1", "--drain-timeout", "30")
    pool = sup.attach()
    wait_full(pool)
    held = pool.get()
    res = noodle_cli("get", "--name", pool_name, "--timeout", "0.2")
    assert res.returncode == 4 and "within 0.2 s" in res.stderr
    sup.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: pool.stats()["shutting_down"], 10, "shutdown")
    res = noodle_cli("get", "--name", pool_name, "--timeout", "5")
    assert res.returncode == 5 and "shutting down" in res.stderr
    held.release()
    pool.close()


def test_kinds_lists_the_builtins() -> None:
    res = noodle_cli("kinds")
    assert res.returncode == 0
    assert {"process", "jail", "oci", "microvm", "command"} <= set(res.stdout.split())


def test_demo_runs_a_pool_and_stops_it(pool_name: str) -> None:
    res = noodle_cli("demo", "--name", pool_name, "--pool-size", "3", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "full: 3 warm instances" in res.stdout and "supervisor exited with 0" in res.stdout
