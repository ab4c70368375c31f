"""noodle submit / status --nats / unit --serve, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import REPO, wait_for
from tests.fleet.conftest import Host, NatsServer, wait_serving


def noodle(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "noodle", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          input=stdin, timeout=240)  # fmt: skip


def test_unit_serve() -> None:
    out = noodle("unit", "--serve")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "BindsTo=noodle@%i.service" in text and "After=noodle@%i.service" in text
    assert " serve --name %i --config /etc/noodle/%i.fleet.toml" in text
    assert "Type=notify" in text and "[Install]" in text
    assert "password" not in text.split("[Service]")[1].split("ExecStart")[1].split("\n")[0]
    plain = noodle("unit")
    assert plain.returncode == 0 and "noodle run --name %i" in plain.stdout  # the pool's unit is unchanged


def test_submit_and_fleet_status(nats_server: NatsServer, fleet: Any) -> None:
    a: Host = fleet(pool_size=2)
    b: Host = fleet(pool_size=2)
    wait_serving(a)
    wait_serving(b)
    out = noodle("submit", "--nats", nats_server.url, "print('hello'); 6 * 7")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\n42\n"
    out = noodle("submit", "--nats", nats_server.url, "-", stdin="raise KeyError('k')\n")
    assert out.returncode == 6 and "KeyError" in out.stderr

    def hosts() -> dict[str, Any]:
        res = noodle("status", "--nats", nats_server.url, "--json")
        assert res.returncode == 0, res.stderr
        return {h["key"]: h for h in json.loads(res.stdout)}

    ka, kb = f"{a.name}.{a.name}", f"{b.name}.{b.name}"
    # each host rewrites its entry every second: its count of done jobs can lag the jobs by one write
    view = wait_for(lambda: (v := hosts()) and len(v) == 2 and v[ka]["done"] + v[kb]["done"] == 2 and v, 60,
                    "both hosts in the fleet view, with both jobs counted")  # fmt: skip
    assert not view[ka]["stale"] and view[ka]["state"] == "serving" and view[ka]["pool_size"] == 2
    text = noodle("status", "--nats", nats_server.url)
    assert a.name in text.stdout and "serving" in text.stdout

    b.kill_serve()  # stops writing its entry: marked stale once older than stale_after
    view = wait_for(lambda: (v := hosts())[kb]["stale"] and v, 60, "the dead serve's entry to go stale")
    assert not view[ka]["stale"]
    assert "STALE" in noodle("status", "--nats", nats_server.url).stdout
