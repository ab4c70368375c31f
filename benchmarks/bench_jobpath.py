"""The job path a loaded executor sees, per kind, side by side with starting
the same thing per job (issue 10, targets 2-5).

process kind (a real ``noodle run`` supervisor in its own session, as
systemd starts it, default options plus ``--health-on-get``, as the
issue's "defaults" mean; each measurement is repeated on a second pool
with ``--refill-nice 0``, so the refill's lower CPU share is compared
side by side with none):

* job: ``get()`` + ``call("math:factorial", 20)`` + ``release()`` back to
  back from a full pool of 64, so the pool refills behind the jobs (p50, p99);
  against a small parent (``python -I -S``, nothing imported) forking a
  child per job that computes the same and writes it to a pipe; the same
  job with nothing refilling behind it (leases held until the end of a
  round); and the floor under both, one Unix-socket round trip to a
  process that slept 1 ms meanwhile (a job with the health check makes
  two: the ping, then the call);
* sustained: 4 client processes share the pool and run 3x its size in
  jobs, so most jobs need a fresh instance; against 4 small parents forking
  per job and 4 clients starting a ``multiprocessing`` forkserver process
  per job (jobs/s, wall time of the slowest client);
* lifecycle: a 1-slot pool's cycle (release until ``get()`` returns the slot
  again) against the kind's four steps called directly (bench_pool.py's
  method), so cycle - steps is the pool's own overhead.

jail and oci with crun: spawn-to-ready (the kind's spawn step, called
directly), the cold cycle per job (prepare + spawn + first result +
terminate + clean), and a pool of 2 run back to back with one client
(get + ``run("1+1")`` + release) until 5x its size: p50/p99 of the job path
while refilling and jobs/s against one cold cycle per job.

    python benchmarks/bench_jobpath.py [--quick] [--only process,jail,oci-crun]

Writes benchmarks/results/jobpath.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import Any

import _util as U

EXPECT = math.factorial(20)
PREFIX = f"benchj{os.getpid()}"
CLIENTS = 4

# A small parent: isolated, no site, nothing imported beyond what the
# interpreter loads anyway (math is built in); one fork per job.
FORK_PARENT = r"""
import math, os, sys, time
n, start = int(sys.argv[1]), int(sys.argv[2])
while time.monotonic_ns() < start:
    time.sleep(0.0005)
lat = []
t0 = time.monotonic_ns()
for _ in range(n):
    a = time.monotonic_ns()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, str(math.factorial(20)).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    if int(out) != 2432902008176640000:
        raise SystemExit("bad result")
    lat.append(time.monotonic_ns() - a)
print(repr((t0, time.monotonic_ns(), lat)))
"""


# ---- clients, each its own process, started together -------------------------------


def _wait_start(start: int) -> None:
    while time.monotonic_ns() < start:
        time.sleep(0.0005)


def _fs_job(conn: Any) -> None:
    conn.send(math.factorial(20))
    conn.close()


def client_forkserver(n: int, start: int) -> tuple[int, int, list[int]]:
    ctx = mp.get_context("forkserver")

    def job() -> None:
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_fs_job, args=(w,))
        p.start()
        w.close()
        v = r.recv()
        r.close()
        p.join()
        if v != EXPECT:
            raise RuntimeError(f"forkserver job returned {v!r}")

    job()  # starts the fork server, untimed
    _wait_start(start)
    lat = []
    t0 = time.monotonic_ns()
    for _ in range(n):
        a = time.monotonic_ns()
        job()
        lat.append(time.monotonic_ns() - a)
    return t0, time.monotonic_ns(), lat


def client_pool(name: str, n: int, start: int) -> tuple[int, int, list[int]]:
    import noodle

    pool = noodle.attach(name)
    _wait_start(start)
    lat = []
    t0 = time.monotonic_ns()
    for _ in range(n):
        a = time.monotonic_ns()
        with pool.get(timeout=60) as lease:
            if lease.instance.call("math:factorial", 20) != EXPECT:
                raise RuntimeError("bad result")
        lat.append(time.monotonic_ns() - a)
    pool.close()
    return t0, time.monotonic_ns(), lat


def run_clients(argvs: list[list[str]], lead_s: float = 2.0) -> dict[str, Any]:
    """Start every argv (each gets the common start time as its last
    argument), collect (t0, t1, latencies) from each one's stdout."""
    start = time.monotonic_ns() + int(lead_s * 1e9)
    env = dict(os.environ)
    env["PYTHONPATH"] = U.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([*a, str(start)], stdout=subprocess.PIPE, env=env, cwd=U.HERE) for a in argvs]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"client {p.args!r} exited {p.returncode}")
        outs.append(ast.literal_eval(out.decode().strip().splitlines()[-1]))
    late = max(o[0] for o in outs) - start
    wall = max(o[1] for o in outs) - min(o[0] for o in outs)
    lat = [x for o in outs for x in o[2]]
    return {"jobs": len(lat), "wall_s": round(wall / 1e9, 3), "jobs_per_s": round(len(lat) / (wall / 1e9), 1),
            "latency_ms": U.summary(lat, 1e-6, 3), "latest_start_ms": round(late / 1e6, 1)}  # fmt: skip


def fork_parents(clients: int, per: int) -> dict[str, Any]:
    return run_clients([[sys.executable, "-I", "-S", "-c", FORK_PARENT, str(per)] for _ in range(clients)], 1.0)


def socket_round_trips(n: int, idle_s: float = 0.001) -> dict[str, Any]:
    """The floor under a job's two requests: one byte there and back over
    a Unix socket to a process that slept ``idle_s`` meanwhile, as an
    instance waits between a lease's steps (wake-up latency included)."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        while b.recv(1):
            b.send(b"x")
        os._exit(0)
    b.close()
    lat = []
    try:
        for _ in range(n):
            time.sleep(idle_s)
            t0 = time.monotonic_ns()
            a.send(b"x")
            a.recv(1)
            lat.append(time.monotonic_ns() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return {"n": n, "idle_s": idle_s, "latency_ms": U.summary(lat, 1e-6, 3)}


def me(*args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--client", *args]


# ---- process kind -------------------------------------------------------------------


def measure_pool(name: str, size: int, rounds: int, per_sustained: int, extra: list[str],
                 held: bool) -> dict[str, Any]:  # fmt: skip
    """One job at a time while the pool refills (``pool_1``), optionally with
    nothing refilling (``pool_1_held``), then sustained load from CLIENTS
    processes (``pool_4``), on a pool of ``size`` with ``--health-on-get``."""
    import bench_pool as BP

    import noodle
    from noodle.segment import Segment

    out: dict[str, Any] = {}
    runner = U.PoolProcess(name, size, run_dir=f"/tmp/nj{name}", extra=["--health-on-get", *extra])
    try:
        runner.start()
        pool = noodle.attach(name)
        seg = Segment.attach(name)
        try:
            lat: list[int] = []
            parts: list[tuple[int, int, int]] = []
            c0 = seg.counters()
            for _ in range(rounds):
                runner.wait_full(pool, 300)
                t, p = BP.pool_jobs(pool, size)
                lat += t
                parts += p
            out["pool_1"] = {
                "jobs": len(lat),
                "latency_ms": U.summary(lat, 1e-6, 3),
                "get_ms": U.summary([x[0] for x in parts], 1e-6, 3),
                "call_ms": U.summary([x[1] for x in parts], 1e-6, 3),
                "release_ms": U.summary([x[2] for x in parts], 1e-6, 3),
                "counters": BP.counter_delta(c0, seg.counters()),
            }
            if held:
                kept: list[int] = []
                for _ in range(rounds):
                    runner.wait_full(pool, 300)
                    kept += BP.pool_jobs_held(pool, size)[0]
                out["pool_1_held"] = {"jobs": len(kept), "latency_ms": U.summary(kept, 1e-6, 3)}
            runner.wait_full(pool, 300)
            print(f"  pool, {CLIENTS} clients x {per_sustained} jobs (sustained) ...", flush=True)
            c0 = seg.counters()
            out["pool_4"] = run_clients([me("pool", name, str(per_sustained)) for _ in range(CLIENTS)], 2.0)
            out["pool_4"]["counters"] = BP.counter_delta(c0, seg.counters())
        finally:
            seg.close()
            pool.close()
    finally:
        out["stop"] = runner.stop()
    return out


def bench_process(q: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import bench_pool as BP

    size = 64
    rounds = 2 if q else 4
    per_sustained = 3 * size // CLIENTS
    fs_per = 8 if q else 25
    out: dict[str, Any] = {"pool_size": size}
    print("  small parent forking per job, 1 and 4 parents ...", flush=True)
    out["fork_1"] = fork_parents(1, size * rounds)
    out["fork_4"] = fork_parents(CLIENTS, per_sustained)
    print(f"  multiprocessing forkserver, {CLIENTS} clients x {fs_per} ...", flush=True)
    out["forkserver_4"] = run_clients([me("forkserver", str(fs_per)) for _ in range(CLIENTS)], 3.0)

    print(f"  pool of {size} (defaults: health on get; refill_nice 10) ...", flush=True)
    out.update(measure_pool(PREFIX, size, rounds, per_sustained, [], held=True))
    print(f"  pool of {size}, refill_nice 0 (the refill competes with the jobs) ...", flush=True)
    out["nice0"] = measure_pool(f"{PREFIX}z", size, rounds, per_sustained, ["--refill-nice", "0"], held=False)

    cycles = 12 if q else 40
    print(f"  lifecycle: 1-slot pool, {cycles} cycles interleaved with direct kind steps ...", flush=True)
    plain, direct, stages, trace, out["stop_cycle"] = BP.lifecycle_cycles(
        f"{PREFIX}c", f"/tmp/njc{os.getpid()}", cycles, 4, 5 if q else 15
    )
    plain_s = U.summary(plain, 1e-6, 3)
    out["cycle"] = {"plain_ms": plain_s, "plain_mean_ms": round(sum(plain) / len(plain) / 1e6, 3),
                    "direct": direct, "stages_us": stages, "traced": trace,
                    "overhead_p50_ms": round(plain_s["p50"] - direct["sum_ms"]["p50"], 3),
                    "overhead_mean_ms": round(sum(plain) / len(plain) / 1e6 - direct["sum_mean_ms"], 3)}  # fmt: skip

    out["socket_rt"] = socket_round_trips(size * rounds)
    f1, p1, ph = out["fork_1"]["latency_ms"], out["pool_1"]["latency_ms"], out["pool_1_held"]["latency_ms"]
    rt = out["socket_rt"]["latency_ms"]
    z1, z4 = out["nice0"]["pool_1"]["latency_ms"], out["nice0"]["pool_4"]
    rows = [
        ["job, 1 client: pool get+call+release (refilling behind)", p1["p50"], p1["p99"], None,
         U.ratio(p1["p50"], f1["p50"], 2)],
        ["job, 1 client: the same with refill_nice 0 (the refill competes with the job)", z1["p50"], z1["p99"], None,
         U.ratio(z1["p50"], f1["p50"], 2)],
        ["job, 1 client: pool get+call, nothing refilling (leases held to the end)", ph["p50"], ph["p99"], None,
         U.ratio(ph["p50"], f1["p50"], 2)],
        ["floor: one Unix-socket round trip to a process idle for 1 ms (a job makes two)", rt["p50"], rt["p99"],
         None, U.ratio(rt["p50"], f1["p50"], 2)],
        ["job, 1 client: small parent forks a child per job", f1["p50"], f1["p99"], None, 1.0],
        [f"sustained, {CLIENTS} clients: pool", out["pool_4"]["latency_ms"]["p50"],
         out["pool_4"]["latency_ms"]["p99"], out["pool_4"]["jobs_per_s"], None],
        [f"sustained, {CLIENTS} clients: pool, refill_nice 0", z4["latency_ms"]["p50"], z4["latency_ms"]["p99"],
         z4["jobs_per_s"], None],
        [f"sustained, {CLIENTS} clients: small parents forking per job", out["fork_4"]["latency_ms"]["p50"],
         out["fork_4"]["latency_ms"]["p99"], out["fork_4"]["jobs_per_s"], None],
        [f"sustained, {CLIENTS} clients: multiprocessing forkserver per job",
         out["forkserver_4"]["latency_ms"]["p50"], out["forkserver_4"]["latency_ms"]["p99"],
         out["forkserver_4"]["jobs_per_s"], None],
    ]  # fmt: skip
    pj = out["pool_4"]["jobs_per_s"]
    summary = {
        "job_p50_ms": p1["p50"], "job_p99_ms": p1["p99"], "job_p50_over_fork": U.ratio(p1["p50"], f1["p50"], 2),
        "job_no_refill_p50_ms": ph["p50"], "socket_round_trip_p50_ms": rt["p50"],
        "job_refill_nice0_p50_ms": z1["p50"], "job_refill_nice0_p99_ms": z1["p99"],
        "sustained_refill_nice0_jobs_per_s": z4["jobs_per_s"],
        "sustained_jobs_per_s": pj,
        "sustained_over_forkserver": U.ratio(pj, out["forkserver_4"]["jobs_per_s"], 2),
        "sustained_over_fork_parents": U.ratio(pj, out["fork_4"]["jobs_per_s"], 2),
        "cycle_overhead_p50_ms": out["cycle"]["overhead_p50_ms"],
        "cycle_overhead_mean_ms": out["cycle"]["overhead_mean_ms"],
    }  # fmt: skip
    out["summary"] = summary
    crow = [[s, direct["steps_ms"][s]["p50"], trace["phase_mean_ms"].get(f"{s} step"),
             trace["phase_mean_ms"].get(f"{s} queued")] for s in ("terminate", "clean", "prepare", "spawn")]
    crow.append(["sum of the kind's steps (direct) / pool cycle p50", direct["sum_ms"]["p50"], plain_s["p50"], None])
    crow.append(["pool overhead per cycle (p50 - p50; mean - mean)", out["cycle"]["overhead_p50_ms"],
                 out["cycle"]["overhead_mean_ms"], None])  # fmt: skip
    tables = [
        U.table("process kind: job path and sustained throughput (ms, jobs/s)",
                ["variant", "p50 ms", "p99 ms", "jobs/s", "p50 / fork per job"], rows,
                f"pool of {size}, default options (refill_nice 10) + --health-on-get; sustained = {CLIENTS} client "
                f"processes x {per_sustained} jobs (3x the pool); "
                f"pool/forkserver {summary['sustained_over_forkserver']}x, "
                f"pool/fork parents {summary['sustained_over_fork_parents']}x"),
        U.table("process kind: lifecycle cycle of one slot (ms)",
                ["step", "direct p50", "in pool, traced mean step", "in pool, traced mean dispatch"], crow),
    ]  # fmt: skip
    return out, tables


# ---- sandbox kinds ----------------------------------------------------------------------


def bench_sandbox(case_id: str, q: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from noodle.kinds import load_kind
    from noodle.kinds.base import PoolInfo
    from tests.conftest import Supervisor, assert_nothing_left, wait_full
    from tests.kinds.test_pool_kinds import CASES, unavailable

    case = next(c for c in CASES if c.id == case_id)
    why = unavailable(case)
    if why:
        return {"skipped": why}, []
    n_cold = 8 if q else 25
    size = 2
    n_jobs = size * (4 if q else 10)

    def first(handle: Any) -> None:
        assert handle.run("1+1", timeout=60).result == 2

    print(f"  {case_id}: {n_cold} cold cycles ...", flush=True)
    options = tomllib.loads(case.config or "").get("kinds", {}).get(case.kind, {})
    run_dir = tempfile.mkdtemp(prefix="njk", dir="/tmp")
    kind = load_kind(case.kind)(PoolInfo(f"{PREFIX}{case_id[:4]}", 1, run_dir, os.getuid(), os.getgid()), options)
    kind.setup()
    slot = kind.pool.slot(0)
    steps: dict[str, list[float]] = {k: [] for k in U.KIND_STEPS}
    cycle: list[float] = []
    try:
        kind.clean(slot)
        U.kind_cycle(kind, slot, first)  # warm-up
        for _ in range(n_cold):
            st = U.kind_cycle(kind, slot, first)
            U.reap_orphans()
            for k, v in st.items():
                steps[k].append(v)
            cycle.append(sum(st.values()))
    finally:
        with contextlib.suppress(Exception):
            kind.clean(slot)
        kind.teardown()
        U.reap_orphans()
        shutil.rmtree(run_dir, ignore_errors=True)
    out: dict[str, Any] = {"steps_ms": {k: U.summary(v, 1e3, 2) for k, v in steps.items()},
                           "cold_cycle_ms": U.summary(cycle, 1e3, 2),
                           "cold_jobs_per_s": round(len(cycle) / sum(cycle), 1)}  # fmt: skip

    print(f"  {case_id}: pool of {size}, {n_jobs} jobs back to back ...", flush=True)
    name = f"{PREFIX}{case_id.replace('-', '')[:6]}"
    root = tempfile.mkdtemp(prefix="nj", dir="/tmp")
    sup = Supervisor(name, root, ["--kind", case.kind, "--pool-size", str(size), *case.args], case.config,
                     os.path.join(root, "supervisor.log"))  # fmt: skip
    lat: list[float] = []
    try:
        pool = sup.attach(timeout=case.start_timeout)
        try:
            wait_full(pool, case.start_timeout)
            with pool.get(timeout=case.op_timeout) as lease:  # this client's first connection, untimed
                first(lease.instance)
            wait_full(pool, case.op_timeout)
            t0 = time.perf_counter()
            for _ in range(n_jobs):
                a = time.perf_counter()
                with pool.get(timeout=case.op_timeout) as lease:
                    first(lease.instance)
                lat.append(time.perf_counter() - a)
            wall = time.perf_counter() - t0
        finally:
            pool.close()
    finally:
        code = sup.stop(timeout=120)
        assert_nothing_left(name)
        shutil.rmtree(root, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"supervisor of {case_id} exited {code}")
    out["pool_jobs"] = {"jobs": n_jobs, "latency_ms": U.summary(lat, 1e3, 2), "jobs_per_s": round(n_jobs / wall, 1),
                        "first_size_ms": U.summary(lat[:size], 1e3, 2)}  # fmt: skip
    out["sustained_over_cold"] = U.ratio(out["pool_jobs"]["jobs_per_s"], out["cold_jobs_per_s"], 2)
    sp = out["steps_ms"]["spawn"]
    pj = out["pool_jobs"]
    row = [case_id, sp["p50"], sp["p90"], out["cold_cycle_ms"]["p50"], out["cold_jobs_per_s"],
           pj["latency_ms"]["p50"], pj["latency_ms"]["p99"], pj["jobs_per_s"], out["sustained_over_cold"]]  # fmt: skip
    return out, [row]


# ---- main ------------------------------------------------------------------------------


def client_main(argv: list[str]) -> int:
    what = argv[0]
    if what == "forkserver":
        res = client_forkserver(int(argv[1]), int(argv[2]))
    elif what == "pool":
        res = client_pool(argv[1], int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"unknown client {what!r}")
    print(repr(res), flush=True)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="process,jail,oci-crun")
    ap.add_argument("--out", default="jobpath.json")
    args = ap.parse_args()
    wanted = args.only.split(",")
    t_start = time.monotonic()
    info = U.machine_info()
    print(f"bench_jobpath: nproc {info['nproc']}, load {info['loadavg']}{' (quick)' if args.quick else ''}",
          flush=True)  # fmt: skip
    doc: dict[str, Any] = {}
    tables: list[dict[str, Any]] = []
    if "process" in wanted:
        doc["process"], t = bench_process(args.quick)
        tables += t
    rows = []
    for cid in (c for c in wanted if c != "process"):
        doc[cid], r = bench_sandbox(cid, args.quick)
        rows += r
    if rows:
        tables.append(U.table(
            "sandbox kinds: spawn-to-ready, cold per job, and the pool's job path while refilling (ms, jobs/s)",
            ["kind", "spawn p50", "spawn p90", "cold cycle p50", "cold jobs/s", "pool job p50", "pool job p99",
             "pool jobs/s", "pool / cold jobs/s"], rows,
            "spawn = the kind's spawn step called directly (until the agent answers); cold = prepare + spawn + "
            "run('1+1') + terminate + clean per job, one at a time; pool = a pool of 2, one client running get + "
            "run('1+1') + release back to back for 10x the pool (refill-bound)."))  # fmt: skip
    doc = {**U.doc_head("jobpath", info, t_start, args.quick, __doc__), **doc, "tables": tables}
    U.publish(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
