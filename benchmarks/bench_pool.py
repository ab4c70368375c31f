"""Benchmark of the pool service (issue: "the pool service"), process kind.

(a) Job per instance. A job = ``get()`` a lease, ``lease.instance.call(
    "math:factorial", 20)``, ``release()``; latency is get-to-release per
    job, jobs/s is jobs / wall time. Against, in the same run, what a job
    costs without a pool: ``concurrent.futures.ProcessPoolExecutor(
    max_tasks_per_child=1)`` (a fresh process per job; 3.11 then uses the
    spawn start method) and ``subprocess.run(["python3", "-c", ...])`` per job.
    Each with one sequential client and with 4 concurrent clients (4 client
    processes on the pool; 4 threads submitting to one 4-worker executor /
    running subprocesses).
    Two pool phases, both started from a full pool: "burst" (as many jobs
    as the pool holds, every job finds a warm instance) and "sustained" (3x
    the pool size: once the warm instances are used up the job rate is the
    refill rate; the pool's ``acquire_waits`` counter says how many gets
    found nothing ready and had to wait).
(b) Refill. Lease every instance, release them all at once, time until
    the pool is full again (wall clock, polling ``stats()`` every 2 ms):
    instances per second, and per core. Stage latencies from the deltas of
    the pool's own histograms (log2 buckets: p50 is a bucket's upper bound).
(c) The pool's own overhead per lifecycle cycle: a 1-slot pool, release the
    lease and ``get()`` again (blocks until the slot has gone terminate ->
    clean -> prepare -> spawn -> ready). Cycle wall time minus the sum of the
    kind's own steps, timed by calling ``ProcessKind.clean/prepare/spawn/
    terminate`` directly in this process (own zygote, same options). Traced
    cycles also poll the slot's state word without sleeping to split the
    cycle into per-stage dispatch delays (task queued -> worker claims) and
    step times; the polling process takes a CPU, so these are reported
    apart from the plain cycles.

    python benchmarks/bench_pool.py [--quick]

Writes benchmarks/results/pool.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import _util as U

import noodle
from noodle import layout as L
from noodle.kinds import PoolInfo
from noodle.kinds.process import ProcessKind
from noodle.segment import Segment, percentiles

CTX = mp.get_context("fork")
PREFIX = f"benchp{os.getpid()}"
# Debian's interpreter, as a job would start it (a pyenv shim on PATH would add a bash start-up)
PYTHON3 = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else (shutil.which("python3") or sys.executable)
SOURCE = "import math; print(math.factorial(20))"
EXPECT = math.factorial(20)
STAGES = ("terminate", "clean", "prepare", "spawn")
POLL_S = 0.0001  # traced cycles: poll the state word every 100 us (a busy poll would take a CPU)


# ---- (a) jobs ----------------------------------------------------------------------------


def timed_job(pool: Any) -> tuple[Any, int, int, int]:
    """get + call of one job: (lease, t0, t1 after get, t2 after call), monotonic ns."""
    mono = time.monotonic_ns
    t0 = mono()
    lease = pool.get(timeout=60)
    t1 = mono()
    r = lease.instance.call("math:factorial", 20)
    t2 = mono()
    if r != EXPECT:
        lease.release()
        raise RuntimeError(f"factorial(20) returned {r!r}")
    return lease, t0, t1, t2


def pool_jobs(pool: Any, n: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """n sequential jobs; per job total ns and (get, call, release) ns."""
    tot, parts = [], []
    for _ in range(n):
        lease, t0, t1, t2 = timed_job(pool)
        lease.release()
        t3 = time.monotonic_ns()
        tot.append(t3 - t0)
        parts.append((t1 - t0, t2 - t1, t3 - t2))
    return tot, parts


def pool_jobs_held(pool: Any, n: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """n jobs whose leases are all released only at the end, so no refill
    runs while they are timed: get + call per job (release not timed)."""
    tot, parts, leases = [], [], []
    try:
        for _ in range(n):
            lease, t0, t1, t2 = timed_job(pool)
            leases.append(lease)
            tot.append(t2 - t0)
            parts.append((t1 - t0, t2 - t1, 0))
    finally:
        for lease in leases:
            lease.release()
    return tot, parts


def _pool_client(name: str, n: int, start: Any, conn: Any) -> None:
    try:
        pool = noodle.attach(name)
        start.wait()
        t0 = time.monotonic_ns()
        tot, parts = pool_jobs(pool, n)
        conn.send({"tot": tot, "parts": parts, "t0": t0, "t1": time.monotonic_ns()})
        pool.close()
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def pool_concurrent(name: str, clients: int, per: int) -> dict[str, Any]:
    start = CTX.Event()
    pipes, procs = [], []
    try:
        for _ in range(clients):
            a, b = CTX.Pipe()
            p = CTX.Process(target=_pool_client, args=(name, per, start, b), daemon=True)
            p.start()
            pipes.append(a)
            procs.append(p)
        time.sleep(0.3)  # let every client attach
        start.set()
        res = []
        for a in pipes:
            r = U.child_result(a, 300, "a pool client")
            res.append(r)
        for p in procs:
            p.join(10)
    finally:
        U.stop_processes(procs)
    tot = [x for r in res for x in r["tot"]]
    parts = [x for r in res for x in r["parts"]]
    wall = max(r["t1"] for r in res) - min(r["t0"] for r in res)
    return {"tot": tot, "parts": parts, "wall_ns": wall}


def threaded(job: Any, clients: int, per: int) -> dict[str, Any]:
    """clients threads, each running per sequential jobs; latency per job."""
    lat: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        mine = []
        try:
            for _ in range(per):
                t0 = time.monotonic_ns()
                job()
                mine.append(time.monotonic_ns() - t0)
        except BaseException:
            errors.append(traceback.format_exc())
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.monotonic_ns()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic_ns() - t0
    if errors:
        raise RuntimeError(errors[0])
    return {"tot": lat, "wall_ns": wall}


def subprocess_job() -> None:
    out = subprocess.run([PYTHON3, "-c", SOURCE], capture_output=True, check=True, timeout=60)
    if int(out.stdout) != EXPECT:
        raise RuntimeError(f"python3 -c printed {out.stdout!r}")


def ppe_run(clients: int, per: int) -> dict[str, Any]:
    with cf.ProcessPoolExecutor(max_workers=clients, max_tasks_per_child=1) as ex:

        def job() -> None:
            if ex.submit(math.factorial, 20).result(timeout=120) != EXPECT:
                raise RuntimeError("bad result")

        return threaded(job, clients, per)


def job_summary(label: str, r: dict[str, Any], counters: dict[str, int] | None = None) -> dict[str, Any]:
    n = len(r["tot"])
    out = {
        "label": label,
        "jobs": n,
        "wall_s": round(r["wall_ns"] / 1e9, 3),
        "jobs_per_s": round(n / (r["wall_ns"] / 1e9), 1),
        "latency_ms": U.summary(r["tot"], 1e-6, 3),
    }
    if "parts" in r:
        out["get_ms"] = U.summary([p[0] for p in r["parts"]], 1e-6, 3)
        out["call_ms"] = U.summary([p[1] for p in r["parts"]], 1e-6, 3)
        out["release_ms"] = U.summary([p[2] for p in r["parts"]], 1e-6, 3)
    if counters is not None:
        out["counters"] = counters
    return out


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = ("acquires", "acquire_waits", "wait_timeouts", "wakeups", "releases", "spawns", "spawn_failures",
            "queue_full", "unhealthy_on_get")  # fmt: skip
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def hist_delta(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in STAGES:
        d = [a - b for a, b in zip(after[name], before[name], strict=True)]
        if sum(d):
            p = percentiles(d)
            # log2 buckets: bucket b holds [2^(b-1), 2^b) ns; 0.75 * 2^b is its middle
            p["approx_mean"] = round(sum(n * 0.75 * (1 << b) for b, n in enumerate(d)) / sum(d) / 1000.0, 1)
            out[name] = p
    return out


# ---- (b) refill ------------------------------------------------------------------------


def refill(pool: Any, seg: Segment, size: int) -> dict[str, Any]:
    leases = [pool.get(timeout=60) for _ in range(size)]
    time.sleep(0.2)
    h0 = seg.histograms()
    c0 = seg.counters()
    t0 = time.monotonic()
    for lease in leases:
        lease.release()
    t_rel = time.monotonic() - t0
    first = half = None
    while True:
        ready = pool.stats()["states"]["ready"]
        now = time.monotonic() - t0
        if first is None and ready >= 1:
            first = now
        if half is None and ready >= size / 2:
            half = now
        if ready >= size:
            break
        if now > 300:
            raise RuntimeError(f"pool not full again after 300 s: {pool.stats()['states']}")
        time.sleep(0.002)
    full = time.monotonic() - t0
    return {
        "instances": size,
        "release_loop_s": round(t_rel, 4),
        "first_ready_s": round(first or 0, 3),
        "half_ready_s": round(half or 0, 3),
        "full_s": round(full, 3),
        "instances_per_s": round(size / full, 1),
        "stages_us": hist_delta(h0, seg.histograms()),
        "counters": counter_delta(c0, seg.counters()),
    }


# ---- (c) lifecycle cycle ------------------------------------------------------------


def plain_cycles(pool: Any, n: int) -> list[int]:
    lease = pool.get(timeout=60)
    out = []
    try:
        for _ in range(n):
            t0 = time.monotonic_ns()
            lease.release()
            lease = pool.get(timeout=60)
            out.append(time.monotonic_ns() - t0)
    finally:
        lease.release()
    return out


def phase_name(w: int) -> str:
    st = L.word_state(w)
    name = L.State(st).name.lower() if st in L.State._value2member_map_ else f"invalid{st}"
    if st in (L.State.READY, L.State.LEASED):
        return name
    return f"{name} step" if L.word_pid(w) else f"{name} queued"


def traced_cycles(pool: Any, seg: Segment, n: int) -> dict[str, Any]:
    """Busy-poll slot 0's state word from release to ready: time in each phase."""
    mono = time.monotonic_ns
    sleep = time.sleep
    load = seg.core.load
    phases: dict[str, list[int]] = {}
    missed = 0
    totals = []
    lease = pool.get(timeout=60)
    try:
        for _ in range(n):
            t0 = mono()
            lease.release()
            last = load(0)
            t_last = t0
            seen = []
            deadline = t0 + 60_000_000_000
            spins = 0
            while L.word_state(last) != L.State.READY:
                w = load(0)
                if w != last:
                    t = mono()
                    seen.append((phase_name(last), t - t_last))
                    last, t_last = w, t
                spins += 1
                if spins & 0xFF == 0 and mono() > deadline:
                    raise RuntimeError("slot did not come back within 60 s")
                sleep(POLL_S)
            totals.append(t_last - t0)
            names = [s for s, _ in seen]
            for want in ("terminate queued", "terminate step", "clean queued", "clean step", "prepare queued",
                         "prepare step", "spawn queued", "spawn step"):  # fmt: skip
                if want not in names:
                    missed += 1
            for name, d in seen:
                phases.setdefault(name, []).append(d)
            lease = pool.get(timeout=60)
    finally:
        lease.release()
    return {
        "cycles": n,
        "total_ms": U.summary(totals, 1e-6, 3),
        "phases_ms": {k: U.summary(v, 1e-6, 3) for k, v in phases.items()},
        "phase_mean_ms": {k: round(sum(v) / len(v) / 1e6, 3) for k, v in phases.items()},
        "missed_phases": missed,
    }


class DirectKind:
    """ProcessKind steps called in this process, with its own zygote."""

    def __init__(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="nbk", dir="/tmp")
        self.kind = ProcessKind(PoolInfo(f"{PREFIX}k", 1, self.run_dir, os.getuid(), os.getgid()), {})
        self.steps: dict[str, list[int]] = {s: [] for s in ("clean", "prepare", "spawn", "terminate")}
        self.slot = self.kind.pool.slot(0)

    def setup(self) -> None:
        self.kind.setup()
        self.kind.clean(self.slot)
        self.cycles(2, record=False)  # warm-up

    def cycles(self, n: int, record: bool = True) -> None:
        mono = time.monotonic_ns
        kind, slot = self.kind, self.slot
        for _ in range(n):
            t0 = mono()
            kind.clean(slot)
            t1 = mono()
            kind.prepare(slot)
            t2 = mono()
            desc = kind.spawn(slot)
            t3 = mono()
            kind.terminate(slot, desc)
            t4 = mono()
            if record:
                for s, d in (("clean", t1 - t0), ("prepare", t2 - t1), ("spawn", t3 - t2), ("terminate", t4 - t3)):
                    self.steps[s].append(d)

    def teardown(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self.kind.clean(self.slot)
        finally:
            self.kind.teardown()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def result(self) -> dict[str, Any]:
        steps = self.steps
        n = len(steps["clean"])
        sums = [sum(v[i] for v in steps.values()) for i in range(n)]
        return {
            "cycles": n,
            "steps_ms": {k: U.summary(v, 1e-6, 3) for k, v in steps.items()},
            "step_mean_ms": {k: round(sum(v) / len(v) / 1e6, 3) for k, v in steps.items()},
            "sum_ms": U.summary(sums, 1e-6, 3),
            "sum_mean_ms": round(sum(sums) / len(sums) / 1e6, 3),
        }


# ---- main ---------------------------------------------------------------------------


def lifecycle_cycles(
    name: str, run_dir: str, cycles: int, blocks: int, traced: int
) -> tuple[list[int], dict[str, Any], dict[str, dict[str, float]], dict[str, Any], Any]:
    """One slot's lifecycle through a 1-slot pool against the kind's four
    steps called directly, interleaved in ``blocks`` so both see the same
    machine: (plain cycle ns, direct result, stage histograms, traced
    cycles, the pool's stop info)."""
    runner = U.PoolProcess(name, 1, workers=1, run_dir=run_dir)
    kind = DirectKind()
    plain: list[int] = []
    try:
        runner.start()
        kind.setup()
        pool = noodle.attach(name)
        seg = Segment.attach(name)
        try:
            h0 = seg.histograms()
            for _ in range(blocks):
                plain += plain_cycles(pool, cycles // blocks)
                kind.cycles(cycles // blocks)
            stages = hist_delta(h0, seg.histograms())
            trace = traced_cycles(pool, seg, traced)
        finally:
            seg.close()
            pool.close()
    finally:
        try:
            kind.teardown()
        finally:
            stop = runner.stop()
    return plain, kind.result(), stages, trace, stop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs and cycles (about 30 s)")
    ap.add_argument("--pool-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="workers per stage")
    ap.add_argument("--out", default="pool.json")
    args = ap.parse_args()
    q = args.quick
    size = args.pool_size or (16 if q else 64)
    base_seq = 6 if q else 30
    base_conc = 2 if q else 8  # per client
    cycles = 8 if q else 40
    traced = 5 if q else 20
    refills = 1 if q else 2
    clients = 4
    t_start = time.monotonic()
    info = U.machine_info()
    nproc = info["nproc"] or 1
    print(f"bench_pool: nproc {nproc}, load {info['loadavg']}, python {info['python']}, pool size {size}, "
          f"{args.workers} workers/stage{' (quick)' if q else ''}", flush=True)  # fmt: skip
    jobs: dict[str, dict[str, Any]] = {}

    # baselines first, with no pool running
    print(f"  ProcessPoolExecutor(max_tasks_per_child=1): {base_seq} sequential, {clients}x{base_conc} concurrent"
          " ...", flush=True)  # fmt: skip
    jobs["ppe_seq"] = job_summary("ProcessPoolExecutor(max_tasks_per_child=1), 1 client", ppe_run(1, base_seq))
    jobs["ppe_conc"] = job_summary(f"ProcessPoolExecutor(max_tasks_per_child=1), {clients} clients",
                                   ppe_run(clients, base_conc))  # fmt: skip
    print(f"  subprocess python3 -c: {base_seq} sequential, {clients}x{base_conc} concurrent ...", flush=True)
    jobs["sub_seq"] = job_summary("subprocess python3 -c, 1 client", threaded(subprocess_job, 1, base_seq))
    jobs["sub_conc"] = job_summary(f"subprocess python3 -c, {clients} clients",
                                   threaded(subprocess_job, clients, base_conc))  # fmt: skip

    refill_runs: list[dict[str, Any]] = []
    final_stats: dict[str, Any] = {}
    name = f"{PREFIX}"
    runner = U.PoolProcess(name, size, workers=args.workers, run_dir=f"/tmp/nb{os.getpid()}")
    stop_info: dict[str, Any] = {}
    try:
        print(f"  starting pool {name} ({size} slots) ...", flush=True)
        runner.start()
        initial_fill = runner.fill_seconds
        pool = noodle.attach(name)
        seg = Segment.attach(name)
        try:
            runner.wait_full(pool, 300)
            n_held = size
            print(f"  pool, 1 client, leases held (no refill while timed): {n_held} jobs ...", flush=True)
            c0 = seg.counters()
            tot, parts = pool_jobs_held(pool, n_held)
            r = {"tot": tot, "parts": parts, "wall_ns": sum(tot)}
            jobs["pool_seq_held"] = job_summary("pool, 1 client, leases held: get + call only, no refill running",
                                                r, counter_delta(c0, seg.counters()))  # fmt: skip
            for phase, n_seq in (("burst", size), ("sustained", 3 * size)):
                runner.wait_full(pool, 300)
                c0 = seg.counters()
                print(f"  pool, 1 client, {phase}: {n_seq} jobs ...", flush=True)
                t0 = time.monotonic_ns()
                tot, parts = pool_jobs(pool, n_seq)
                r = {"tot": tot, "parts": parts, "wall_ns": time.monotonic_ns() - t0}
                jobs[f"pool_seq_{phase}"] = job_summary(f"pool, 1 client, {phase}", r,
                                                        counter_delta(c0, seg.counters()))  # fmt: skip
                runner.wait_full(pool, 300)
                per = max(1, n_seq // clients)
                print(f"  pool, {clients} clients, {phase}: {clients}x{per} jobs ...", flush=True)
                c0 = seg.counters()
                r = pool_concurrent(name, clients, per)
                jobs[f"pool_conc_{phase}"] = job_summary(f"pool, {clients} clients, {phase}", r,
                                                         counter_delta(c0, seg.counters()))  # fmt: skip
            for i in range(refills):
                runner.wait_full(pool, 300)
                print(f"  refill {i + 1}/{refills}: release {size} leases at once ...", flush=True)
                refill_runs.append(refill(pool, seg, size))
            final_stats = pool.stats()  # what `noodle status --json` shows after all of the above
        finally:
            seg.close()
            pool.close()
    finally:
        stop_info["big"] = runner.stop()

    blocks = 2 if q else 4
    print(f"  1-slot pool: {cycles} plain lifecycle cycles interleaved with {cycles} direct kind cycles, "
          f"then {traced} traced ...", flush=True)  # fmt: skip
    plain, direct, cycle_stages, trace, stop_info["cycle"] = lifecycle_cycles(
        f"{PREFIX}c", f"/tmp/nc{os.getpid()}", cycles, blocks, traced
    )

    # ---- summarise
    plain_mean = sum(plain) / len(plain) / 1e6
    plain_s = U.summary(plain, 1e-6, 3)
    overhead_mean = round(plain_mean - direct["sum_mean_ms"], 3)
    overhead_p50 = round(plain_s["p50"] - direct["sum_ms"]["p50"], 3)
    rate = [r["instances_per_s"] for r in refill_runs]
    best_rate = max(rate)
    mean_rate = sum(rate) / len(rate)

    jrows = []
    order = ["pool_seq_held", "pool_seq_burst", "pool_seq_sustained", "ppe_seq", "sub_seq",
             "pool_conc_burst", "pool_conc_sustained", "ppe_conc", "sub_conc"]  # fmt: skip
    for key in order:
        j = jobs[key]
        conc = "conc" in key
        ref = jobs["pool_conc_burst" if conc else "pool_seq_burst"]
        c = j.get("counters", {})
        jrows.append([j["label"], j["jobs"], j["jobs_per_s"], j["latency_ms"]["p50"], j["latency_ms"]["p99"],
                      U.ratio(j["latency_ms"]["p50"], ref["latency_ms"]["p50"]),
                      U.ratio(ref["jobs_per_s"], j["jobs_per_s"]), c.get("acquire_waits"),
                      c.get("wait_timeouts")])  # fmt: skip
    t_jobs = U.table(
        "Job per instance: get + call('math:factorial', 20) + release (ms)",
        ["variant", "jobs", "jobs/s", "p50 ms", "p99 ms", "p50 / pool burst p50", "pool burst jobs/s / this",
         "acquire_waits", "wait_timeouts"],
        jrows,
        f"Pool of {size} process instances, {args.workers} workers per stage, {nproc} CPUs. held = get + call of "
        f"{size} jobs whose leases are released only afterwards (no refill competes for the CPUs; release not "
        f"timed); burst = {size} jobs "
        f"(the pool's size) from a full pool; sustained = {3 * size} jobs from a full pool, so most jobs wait for "
        "the refill (acquire_waits = gets that found nothing ready). Ratios compare with the pool's burst row of "
        "the same client count. Baselines: ProcessPoolExecutor uses the spawn start method (3.11 with "
        f"max_tasks_per_child); subprocess runs {PYTHON3} -c.",
    )  # fmt: skip

    prow = []
    for key in ("pool_seq_held", "pool_seq_burst", "pool_seq_sustained", "pool_conc_burst", "pool_conc_sustained"):
        j = jobs[key]
        prow.append([j["label"], j["get_ms"]["p50"], j["get_ms"]["p99"], j["call_ms"]["p50"], j["call_ms"]["p99"],
                     j["release_ms"]["p50"], j["release_ms"]["p99"]])  # fmt: skip
    t_parts = U.table("Pool job latency split (ms)",
                      ["variant", "get p50", "get p99", "call p50", "call p99", "release p50", "release p99"],
                      prow)  # fmt: skip

    rrows = []
    for i, r in enumerate(refill_runs):
        st = r["stages_us"]
        rrows.append([i + 1, r["instances"], r["first_ready_s"], r["half_ready_s"], r["full_s"],
                      r["instances_per_s"], round(r["instances_per_s"] / nproc, 1),
                      *(st.get(s, {}).get("p50") for s in STAGES),
                      *(st.get(s, {}).get("approx_mean") for s in STAGES)])  # fmt: skip
    t_refill = U.table(
        "Refill: release every lease at once, time until the pool is full again",
        ["run", "instances", "first ready s", "half s", "full s", "instances/s", "instances/s/core",
         *(f"{s} p50<= us" for s in STAGES), *(f"{s} ~mean us" for s in STAGES)],
        rrows,
        f"Initial fill at start-up (supervisor start + {size} instances): {initial_fill:.2f} s. Stage latencies "
        "are deltas of the pool's log2 histograms (p50 = upper bound of its bucket; ~mean from bucket middles).",
    )  # fmt: skip

    crow = []
    for s in ("clean", "prepare", "spawn", "terminate"):
        tp_q = trace["phase_mean_ms"].get(f"{s} queued")
        tp_s = trace["phase_mean_ms"].get(f"{s} step")
        crow.append([s, direct["step_mean_ms"][s], direct["steps_ms"][s]["p50"],
                     cycle_stages.get(s, {}).get("approx_mean", 0) / 1000 if s in cycle_stages else None,
                     tp_s, tp_q])  # fmt: skip
    crow.append(["sum of the kind's steps", direct["sum_mean_ms"], direct["sum_ms"]["p50"], None,
                 round(sum(trace["phase_mean_ms"].get(f"{s} step", 0) for s in STAGES), 3),
                 round(sum(trace["phase_mean_ms"].get(f"{s} queued", 0) for s in STAGES), 3)])  # fmt: skip
    crow.append(["pool cycle: release -> get() returns (plain)", round(plain_mean, 3), plain_s["p50"], None, None,
                 None])  # fmt: skip
    crow.append(["pool cycle (traced, polled every 100 us)", trace["total_ms"]["mean"], trace["total_ms"]["p50"],
                 None, None, None])  # fmt: skip
    crow.append(["pool overhead per cycle = plain cycle - sum of steps", overhead_mean, overhead_p50, None, None,
                 None])  # fmt: skip
    t_cycle = U.table(
        "Lifecycle cycle of one slot (ms): the kind's own steps versus the pool's cycle",
        ["", "direct mean", "direct p50", "in pool ~mean (histogram)", "in pool, traced mean step",
         "traced mean dispatch (queued -> claimed)"],
        crow,
        f"direct = ProcessKind steps called in this process ({cycles} cycles); the pool is a 1-slot pool with 1 "
        f"worker per stage ({len(plain)} plain cycles, interleaved in blocks with the direct ones; "
        f"{trace['cycles']} traced cycles polled every {POLL_S * 1e6:.0f} us, {trace['missed_phases']} phases "
        "too short to be seen were merged into the phase before). dispatch = the slot sat in its stage with no "
        "owner: task queued, worker not yet running it.",
    )  # fmt: skip

    burst = jobs["pool_seq_burst"]
    summary_rows = [
        ["pool job p50 (1 client, warm)", burst["latency_ms"]["p50"], "ms"],
        ["pool jobs/s (1 client, warm)", burst["jobs_per_s"], "jobs/s"],
        ["vs ProcessPoolExecutor(max_tasks_per_child=1): p50 latency ratio",
         U.ratio(jobs["ppe_seq"]["latency_ms"]["p50"], burst["latency_ms"]["p50"]), "x"],
        ["vs subprocess python3 -c: p50 latency ratio",
         U.ratio(jobs["sub_seq"]["latency_ms"]["p50"], burst["latency_ms"]["p50"]), "x"],
        ["sustained jobs/s, 1 client (refill-bound)", jobs["pool_seq_sustained"]["jobs_per_s"], "jobs/s"],
        ["refill, best run", best_rate, "instances/s"],
        ["refill per core, best run", round(best_rate / nproc, 1), "instances/s/core"],
        ["refill, mean of runs", round(mean_rate, 1), "instances/s"],
        ["pool overhead per lifecycle cycle (mean)", overhead_mean, "ms"],
        ["pool overhead per lifecycle cycle (p50 - p50)", overhead_p50, "ms"],
    ]  # fmt: skip
    t_sum = U.table("Summary", ["measure", "value", "unit"], summary_rows)

    doc = {
        **U.doc_head("pool", info, t_start, q, __doc__),
        "pool_size": size,
        "workers_per_stage": args.workers,
        "python3": PYTHON3,
        "jobs": jobs,
        "initial_fill_s": round(initial_fill, 3),
        "refill": refill_runs,
        "cycle": {"plain_ms": plain_s, "plain_mean_ms": round(plain_mean, 3), "stages_us": cycle_stages,
                  "traced": trace, "direct_kind_steps": direct, "overhead_mean_ms": overhead_mean,
                  "overhead_p50_ms": overhead_p50},
        "pool_stats_at_end": final_stats,
        "stop": stop_info,
        "tables": [t_sum, t_jobs, t_parts, t_refill, t_cycle],
    }
    U.publish(args.out, doc)
    for which, st in stop_info.items():
        if st.get("exit_code") != 0 or st.get("log_errors"):
            print(f"\nWARNING: supervisor of the {which} pool: exit {st.get('exit_code')}, "
                  f"{st.get('log_error_count', 0)} ERROR lines, e.g. {st.get('log_errors', [''])[0]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
