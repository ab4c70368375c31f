"""Benchmark of ``noodle.Executor``: one task per fresh instance, against
the single-use-per-task executors of the standard library and pebble.

A task is ``factorial(20)`` submitted and waited for (``submit(...).result()``);
latency is submit-to-result per task, jobs/s is tasks / wall time. In the
same run, each with 1 caller (tasks one after the other) and 4 callers
(4 threads submitting to one executor with 4 workers):

* ``noodle.Executor`` on a warm pool of the ``process`` kind: "warm" runs as
  many tasks as the pool holds, so each finds a ready instance; "sustained"
  runs 3x that, so past the warm instances the rate is the pool's refill rate;
* ``concurrent.futures.ProcessPoolExecutor(max_tasks_per_child=1)`` (a new
  worker process per task; Python 3.11 then uses the spawn start method);
* pebble's ``ProcessPool(max_tasks=1)`` (a new forked worker per task).

Ratios are the alternative's time per task divided by the Executor's (p50),
and the Executor's jobs/s divided by the alternative's.

    python benchmarks/bench_executor.py [--quick] [--pool-size N] [--kind jail]

Writes benchmarks/results/executor.json (executor-<kind>.json for another
kind; the alternatives are then skipped) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import _util as U

import noodle

EXPECT = math.factorial(20)


def job(n: int = 20) -> int:
    return math.factorial(n)


def run_callers(submit: Callable[[], Any], callers: int, per: int) -> dict[str, Any]:
    """``callers`` threads, each submitting ``per`` tasks one after the other."""
    lat: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(callers + 1)

    def caller() -> None:
        mine = []
        barrier.wait()
        try:
            for _ in range(per):
                t0 = time.perf_counter()
                fut = submit()
                assert fut.result(300) == EXPECT
                mine.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"lat": lat, "wall": wall}


def row(label: str, r: dict[str, Any]) -> dict[str, Any]:
    s = U.summary(r["lat"], 1e3, 2, ("n", "p50", "p90", "p99"))
    return {"label": label, "jobs_s": round(len(r["lat"]) / r["wall"], 1), **s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pool-size", type=int, default=32)
    ap.add_argument("--kind", default="process", help="the pool's kind (process, jail, oci)")
    args = ap.parse_args()
    size = args.pool_size
    callers = 4
    n_ppe, n_pebble = (6, 12) if args.quick else (16, 40)
    t_start = time.monotonic()
    info = U.machine_info()
    rows: dict[str, dict[str, Any]] = {}

    if args.kind != "process":
        n_ppe = n_pebble = 0
    print(f"ProcessPoolExecutor(max_tasks_per_child=1): {n_ppe} + {callers}x{n_ppe // callers} ...", flush=True)
    if n_ppe:
        with cf.ProcessPoolExecutor(max_workers=1, max_tasks_per_child=1) as ppe:
            rows["ppe_1"] = row("ProcessPoolExecutor(max_tasks_per_child=1), 1 caller",
                                run_callers(lambda: ppe.submit(job), 1, n_ppe))  # fmt: skip
        with cf.ProcessPoolExecutor(max_workers=callers, max_tasks_per_child=1) as ppe:
            rows["ppe_4"] = row(f"ProcessPoolExecutor(max_tasks_per_child=1), {callers} callers",
                                run_callers(lambda: ppe.submit(job), callers, n_ppe // callers))  # fmt: skip

    try:
        import pebble
    except ImportError:
        pebble = None
        print("pebble is not installed (pip install pebble): skipped")
    if pebble is not None and n_pebble:
        print(f"pebble ProcessPool(max_tasks=1): {n_pebble} + {callers}x{n_pebble // callers} ...", flush=True)
        with pebble.ProcessPool(max_workers=1, max_tasks=1) as pp:
            rows["pebble_1"] = row("pebble ProcessPool(max_tasks=1), 1 caller",
                                   run_callers(lambda: pp.schedule(job), 1, n_pebble))  # fmt: skip
        with pebble.ProcessPool(max_workers=callers, max_tasks=1) as pp:
            rows["pebble_4"] = row(f"pebble ProcessPool(max_tasks=1), {callers} callers",
                                   run_callers(lambda: pp.schedule(job), callers, n_pebble // callers))  # fmt: skip

    name = f"benchx{os.getpid()}"
    runner = U.PoolProcess(name, size, run_dir=f"/tmp/nbx{os.getpid()}", extra=["--kind", args.kind])
    stop_info: dict[str, Any] = {}
    try:
        print(f"starting pool {name} ({size} {args.kind} instances) ...", flush=True)
        runner.start()
        pool = noodle.attach(name)
        try:
            for phase, n in (("warm", size), ("sustained", 3 * size)):
                runner.wait_full(pool, 300)
                for c in (1, callers):
                    runner.wait_full(pool, 300)
                    print(f"noodle.Executor, {c} caller(s), {phase}: {c}x{n // c} tasks ...", flush=True)
                    with noodle.Executor(pool, max_workers=c) as ex:
                        r = run_callers(lambda ex=ex: ex.submit(job), c, n // c)
                    rows[f"noodle_{c}_{phase}"] = row(f"noodle.Executor ({args.kind}), {c} caller(s), {phase}", r)
                runner.wait_full(pool, 300)
                lat = []
                for _ in range(n if phase == "warm" else 0):
                    t0 = time.perf_counter()
                    with pool.get(timeout=300) as lease:
                        assert lease.instance.call("math:factorial", 20) == EXPECT
                    lat.append(time.perf_counter() - t0)
                if lat:
                    rows["lease_call"] = row(f"plain lease + call ({args.kind}), 1 caller, warm",
                                             {"lat": lat, "wall": sum(lat)})  # fmt: skip
        finally:
            pool.close()
    finally:
        stop_info = runner.stop()

    def vs(alt: str, ours: str) -> tuple[float | None, float | None]:
        if alt not in rows or ours not in rows:
            return None, None
        return U.ratio(rows[alt]["p50"], rows[ours]["p50"]), U.ratio(rows[ours]["jobs_s"], rows[alt]["jobs_s"])

    cols = ["variant", "jobs/s", "p50 ms", "p90 ms", "p99 ms", "n"]
    table_rows = [[r["label"], r["jobs_s"], r["p50"], r["p90"], r["p99"], r["n"]] for r in rows.values()]
    ratio_rows = []
    for c in ("1", "4"):
        for alt, alt_label in (("ppe", "ProcessPoolExecutor(max_tasks_per_child=1)"), ("pebble", "pebble max_tasks=1")):
            for phase in ("warm", "sustained"):
                p50, jobs = vs(f"{alt}_{c}", f"noodle_{c}_{phase}")
                ratio_rows.append([f"{c} caller(s), {phase}", alt_label, p50, jobs])
    doc = U.doc_head("executor", info, t_start, args.quick, "submit(factorial, 20).result() per task")
    doc["pool_size"] = size
    doc["kind"] = args.kind
    doc["stop"] = stop_info
    doc["rows"] = rows
    doc["tables"] = [
        U.table("noodle.Executor vs single-use-per-task executors (per task)", cols, table_rows),
        U.table(
            "noodle.Executor is faster by",
            ["callers, phase", "against", "p50 ratio", "jobs/s ratio"],
            ratio_rows,
            "target: >= 20x ProcessPoolExecutor(max_tasks_per_child=1) per task",
        ),
    ]
    U.publish("executor.json" if args.kind == "process" else f"executor-{args.kind}.json", doc)


if __name__ == "__main__":
    main()
