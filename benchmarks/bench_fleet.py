"""Benchmark of the fleet (noodle serve + noodle.fleet.Executor over NATS
JetStream) against the local noodle.Executor, in the same run.

One nats-server (JetStream, file store in a temporary directory, loopback)
and three pools of ``--pool-size`` process-kind instances stand in for three
hosts. A job is ``abs(-i)``: what is measured is the path, not the work.

(a) Local: ``noodle.Executor`` on pool 0 (no serve running), a burst of
    ``--jobs`` jobs submitted at once (jobs/s, per-job submit-to-result
    p50/p99), and ``--seq`` jobs one at a time (the latency of one job).
(b) Fleet with 1, 2, then 3 hosts (a serve started on each in turn), the
    same burst and the same sequential jobs through ``noodle.fleet.Executor``.
    The sequential p50 minus the local one is the hop's overhead: publish
    to the stream, pull by a serve, results-stream lookup, result publish
    to the stream and to the caller, ack.
(c) Flow control: every serve reports, in the fleet view, the least
    ``ready - fetched-but-not-started`` it saw right after each fetch
    (``min_headroom``; negative would mean a job fetched with no instance
    to start it on) and how many fetched jobs had to wait for an instance
    (``lease_waits``).

On this 2-core machine the hosts share the same two cores, so more hosts
add capacity (slots) but not CPU: expect flat or falling jobs/s, not scaling.

    python benchmarks/bench_fleet.py [--quick] [--pool-size 4] [--jobs 120] [--seq 30]

Writes benchmarks/results/fleet.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from _util import ROOT, machine_info, publish, summary, table

NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Rig:
    """nats-server + N pools (+ their serves), all stopped by pid."""

    def __init__(self, root: str, hosts: int, pool_size: int) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.names = [f"bfleet{os.getpid()}h{i}" for i in range(hosts)]
        self.pool_size = pool_size
        self.procs: list[subprocess.Popen[bytes]] = []
        self.serves: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ, PYTHONPATH=ROOT)

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.root, log), "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=ROOT, env=self.env)
        self.procs.append(p)
        return p

    def start(self) -> None:
        conf = os.path.join(self.root, "nats.conf")
        with open(conf, "w") as f:
            f.write(f'listen: "127.0.0.1:{self.port}"\njetstream {{ store_dir: "{self.root}/js" }}\n')
        self._spawn([NATS, "-c", conf], "nats.log")
        wait(lambda: _connectable(self.port), 30, "nats-server")
        import noodle

        for name in self.names:
            self._spawn([sys.executable, "-m", "noodle", "run", "--name", name, "--pool-size", str(self.pool_size),
                         "--run-dir", self.root], f"{name}.sup.log")  # fmt: skip
        for name in self.names:
            pool = wait(lambda n=name: _attach(noodle, n), 60, f"pool {name}")
            wait(lambda p=pool: p.stats()["states"]["ready"] == self.pool_size, 60, f"pool {name} full")
            pool.close()

    def start_serve(self, name: str) -> None:
        cfg = os.path.join(self.root, f"{name}.fleet.toml")
        with open(cfg, "w") as f:
            f.write(f'host = "{name}"\nack_wait = 10.0\nstatus_interval = 0.5\n')
        p = self._spawn([sys.executable, "-m", "noodle", "serve", "--name", name, "--nats", self.url, "--config", cfg],
                        f"{name}.serve.log")  # fmt: skip
        self.serves[name] = p
        log = os.path.join(self.root, f"{name}.serve.log")
        wait(lambda: "serving pool" in open(log).read(), 60, f"serve {name}")

    def settle(self, n: int) -> None:
        """Wait until the first ``n`` pools are full."""
        import noodle

        for name in self.names[:n]:
            with noodle.attach(name) as pool:
                wait(lambda p=pool: p.stats()["states"]["ready"] == self.pool_size, 60, f"pool {name} full")

    def stop(self) -> None:
        for p in reversed(self.procs):  # serves, then supervisors, then the server
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _attach(noodle: Any, name: str) -> Any:
    try:
        return noodle.attach(name)
    except noodle.PoolNotFound:
        return None


def measure(ex: Any, jobs: int, seq: int, settle: Any) -> dict[str, Any]:
    """A burst of ``jobs`` submitted at once, then ``seq`` one at a time,
    each started once ``settle()`` says every pool in use is full again (so
    it measures the path, not the refill)."""
    for i in range(4):  # warm-up: connections, imports, first pull requests
        ex.submit(abs, -i).result(120)
    t0 = time.perf_counter()
    done_at: dict[int, float] = {}
    futs = []
    for i in range(jobs):
        f = ex.submit(abs, -i)
        f.add_done_callback(lambda _f, i=i: done_at.__setitem__(i, time.perf_counter()))
        futs.append((time.perf_counter(), f))
    results = [f.result(300) for _, f in futs]
    wall = time.perf_counter() - t0
    assert results == list(range(jobs)), "wrong results"
    wait(lambda: len(done_at) == jobs, 10, "done callbacks")
    burst = [done_at[i] - t for i, (t, _) in enumerate(futs)]
    one = []
    for i in range(seq):
        settle()
        t = time.perf_counter()
        assert ex.submit(abs, -i).result(120) == i
        one.append(time.perf_counter() - t)
    return {"jobs_per_s": round(jobs / wall, 1), "burst": summary(burst, 1e3, 2, ("n", "p50", "p99")),
            "one": summary(one, 1e3, 2, ("n", "p50", "p99"))}  # fmt: skip


def fleet_view(url: str) -> dict[str, dict[str, Any]]:
    import nats

    async def main() -> dict[str, dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value("noodle_fleet")
            return {k: json.loads((await kv.get(k)).value) for k in await kv.keys()}
        finally:
            await nc.close()

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=120)
    ap.add_argument("--seq", type=int, default=30)
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.seq = 40, 10
    if not os.path.exists(NATS):
        print("nats-server is not installed (make deps)", file=sys.stderr)
        return 1
    info = machine_info()
    t_start = time.monotonic()
    import noodle
    import noodle.fleet

    root = tempfile.mkdtemp(prefix="nbf", dir="/tmp")
    rig = Rig(root, 3, args.pool_size)
    rows, raw = [], {}
    try:
        rig.start()
        with noodle.Executor(rig.names[0]) as ex:
            local = measure(ex, args.jobs, args.seq, lambda: rig.settle(1))
        raw["local"] = local
        rows.append(["local noodle.Executor (1 pool)", args.pool_size, local["jobs_per_s"], local["burst"]["p50"],
                     local["burst"]["p99"], local["one"]["p50"], local["one"]["p99"], "-", "-", "-"])  # fmt: skip
        for n in (1, 2, 3):
            rig.start_serve(rig.names[n - 1])
            with noodle.fleet.Executor(rig.url) as fx:
                res = measure(fx, args.jobs, args.seq, lambda n=n: rig.settle(n))
            time.sleep(1.2)  # one more fleet-view update after the last job
            view = fleet_view(rig.url)
            hosts = [v for v in view.values() if v.get("state") == "serving"]
            res["hosts"] = hosts
            raw[f"fleet_{n}"] = res
            rows.append([f"fleet, {n} host{'s' if n > 1 else ''}", n * args.pool_size, res["jobs_per_s"],
                         res["burst"]["p50"], res["burst"]["p99"], res["one"]["p50"], res["one"]["p99"],
                         round(res["one"]["p50"] - local["one"]["p50"], 2),
                         min(int(h["min_headroom"]) for h in hosts if h.get("min_headroom") is not None),
                         sum(int(h["lease_waits"]) for h in hosts)])  # fmt: skip
    finally:
        rig.stop()
        shutil.rmtree(root, ignore_errors=True)
    cols = ["path", "slots", "jobs/s (burst)", "burst p50 ms", "burst p99 ms", "one job p50 ms", "one job p99 ms",
            "hop overhead p50 ms", "min headroom (>= 0)", "lease waits"]  # fmt: skip
    note = (f"{args.jobs} jobs `abs(-i)` submitted at once (burst: submit-to-result per job), then {args.seq} one at a"
            " time (one job). Hop overhead: fleet one-job p50 minus local. Min headroom: the least ready-minus-fetched"
            " any serve saw (negative = a job fetched without an instance for it); lease waits: fetched jobs that"
            " found no instance at once. Same machine, same run; hosts share the 2 cores.")  # fmt: skip
    doc = {
        "benchmark": "fleet", "machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - t_start, 1), "quick": args.quick, "method": None,
        "tables": [table("Fleet over NATS JetStream vs local noodle.Executor", cols, rows, note)], "raw": raw,
    }  # fmt: skip
    publish("fleet.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
