"""Sandbox kinds through the pool versus a cold start per job.

For every kind (jail, command with the bubblewrap and plain example scripts,
microvm in TCG, oci with runc, crun and runsc, whichever can run here):

* warm: a real ``noodle run`` supervisor with a pool of 2; with the pool
  full, time ``pool.get()`` + the first result from the instance
  (``run("1+1")``, or ``exec(["echo", "hi"])`` in the microvm guest, which
  has no Python), then release and wait until the pool is full again
  (untimed; reported separately as ``refill``);
* cold: the same kind, same options, in this process, one slot: time
  prepare + spawn + first result + terminate + clean, what a job pays
  without a pool (``cold_to_result`` stops at the first result).

Ratios are cold / warm at p50 and p90. JSON goes to
benchmarks/results/kinds_pool.json and a table is printed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_kinds_pool.py [--kinds jail,oci-runc] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import _util as U  # puts the checkout on sys.path, for tests/

from noodle.kinds import load_kind
from noodle.kinds.base import PoolInfo
from tests.conftest import Supervisor, assert_nothing_left, wait_full
from tests.kinds.test_pool_kinds import CASES, KindCase, unavailable

# samples per kind: (warm, cold); microvm and runsc are slow, so few
SAMPLES = {"microvm": (6, 3), "oci-runsc": (10, 4)}
DEFAULT_SAMPLES = (30, 12)
STATS = ("n", "p50", "p90", "mean")


def first_result(case: KindCase, handle: Any) -> None:
    if case.python:
        assert handle.run("1+1", timeout=60).result == 2
    else:
        res = handle.exec(["echo", "hi"], timeout=60)
        assert res.returncode == 0 and res.stdout == "hi\n", res


def bench_warm(case: KindCase, n: int) -> dict[str, Any]:
    name = f"bp{os.getpid()}{case.id.replace('-', '')[:8]}"
    run_root = tempfile.mkdtemp(prefix="nb", dir="/tmp")
    sup = Supervisor(name, run_root, ["--kind", case.kind, "--pool-size", "2", *case.args], case.config,
                     Path(run_root) / "supervisor.log")  # fmt: skip
    acquire: list[float] = []
    get_only: list[float] = []
    refill: list[float] = []
    t_start = time.perf_counter()
    try:
        pool = sup.attach(timeout=case.start_timeout)
        try:
            wait_full(pool, case.start_timeout)
            startup = time.perf_counter() - t_start
            # one untimed round: the first connection of this client process
            with pool.get(timeout=case.op_timeout) as lease:
                first_result(case, lease.instance)
            wait_full(pool, case.op_timeout)
            for _ in range(n):
                t0 = time.perf_counter()
                lease = pool.get(timeout=case.op_timeout)
                t1 = time.perf_counter()
                first_result(case, lease.instance)
                t2 = time.perf_counter()
                lease.release()
                wait_full(pool, case.op_timeout)
                t3 = time.perf_counter()
                get_only.append(t1 - t0)
                acquire.append(t2 - t0)
                refill.append(t3 - t2)
            stats = pool.stats()
        finally:
            pool.close()
    finally:
        code = sup.stop(timeout=120)
        assert_nothing_left(name)
        shutil.rmtree(run_root, ignore_errors=True)
    assert code == 0, f"supervisor exited {code}"
    return {
        "acquire_to_result": U.summary_ms(acquire, STATS),
        "get": U.summary_ms(get_only, STATS),
        "refill": U.summary_ms(refill, STATS),
        "startup_s": startup,
        "pool_latency_us": stats.get("latency_us"),
    }


def bench_cold(case: KindCase, n: int) -> dict[str, Any]:
    options = tomllib.loads(case.config or "").get("kinds", {}).get(case.kind, {})
    run_dir = tempfile.mkdtemp(prefix="nc", dir="/tmp")
    kind_cls = load_kind(case.kind)
    kind = kind_cls(PoolInfo(f"bc{os.getpid()}{case.id.replace('-', '')[:8]}", 1, run_dir, os.getuid(), os.getgid()),
                    options)  # fmt: skip
    t0 = time.perf_counter()
    kind.setup()  # once, not per job (microvm: the template boot)
    setup_s = time.perf_counter() - t0
    slot = kind.pool.slot(0)
    cycle: list[float] = []
    to_result: list[float] = []
    steps: dict[str, list[float]] = {k: [] for k in U.KIND_STEPS}
    try:
        kind.clean(slot)
        for _ in range(n):
            step = U.kind_cycle(kind, slot, lambda handle: first_result(case, handle))
            U.reap_orphans()
            for key, v in step.items():
                steps[key].append(v)
            to_result.append(step["prepare"] + step["spawn"] + step["first_result"])
            cycle.append(sum(step.values()))
    finally:
        with contextlib.suppress(Exception):
            kind.clean(slot)
        kind.teardown()
        U.reap_orphans()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "cycle": U.summary_ms(cycle, STATS),
        "to_result": U.summary_ms(to_result, STATS),
        "steps": {k: U.summary_ms(v, STATS) for k, v in steps.items()},
        "setup_s": setup_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", help="comma-separated case ids (default: all that can run here)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the sample counts")
    ap.add_argument("--subreaper", action="store_true", help="make this process the subreaper of cold instances")
    args = ap.parse_args()
    if args.subreaper:
        # off by default: then this process must reap the orphaned sandboxes
        # itself, between steps, and runsc's delete waits ~5 s for a zombie
        with contextlib.suppress(OSError, AttributeError):
            U.become_subreaper()
    wanted = set(args.kinds.split(",")) if args.kinds else None
    results: dict[str, Any] = {"cpus": os.cpu_count(), "pool_size": 2, "subreaper": args.subreaper, "kinds": {},
                               "skipped": {}}
    t_all = time.perf_counter()
    for case in CASES:
        if wanted is not None and case.id not in wanted:
            continue
        why = unavailable(case)
        if why:
            results["skipped"][case.id] = why
            print(f"{case.id}: skipped ({why})", flush=True)
            continue
        n_warm, n_cold = SAMPLES.get(case.id, DEFAULT_SAMPLES)
        n_warm, n_cold = max(2, round(n_warm * args.scale)), max(2, round(n_cold * args.scale))
        t0 = time.perf_counter()
        warm = bench_warm(case, n_warm)
        cold = bench_cold(case, n_cold)
        w50, w90 = warm["acquire_to_result"]["p50_ms"], warm["acquire_to_result"]["p90_ms"]
        results["kinds"][case.id] = {
            "warm": warm,
            "cold": cold,
            "ratio_cycle_over_warm": {"p50": cold["cycle"]["p50_ms"] / w50, "p90": cold["cycle"]["p90_ms"] / w90},
            "ratio_to_result_over_warm": {
                "p50": cold["to_result"]["p50_ms"] / w50,
                "p90": cold["to_result"]["p90_ms"] / w90,
            },
            "seconds": time.perf_counter() - t0,
        }
        print(f"{case.id}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    results["total_seconds"] = time.perf_counter() - t_all
    results["notes"] = (
        "warm = pool.get() on a full pool + the first result (run('1+1'); microvm: exec echo) through a real "
        "supervisor; get = pool.get() alone; refill = release until the pool is full again (untimed for warm). "
        "cold = in-process prepare+spawn+first result+terminate+clean of the same kind and options, one slot; "
        "to_result = prepare+spawn+first result. kind.setup() (microvm: template boot) is excluded from cold. "
        "microvm runs QEMU in TCG (no usable KVM here)."
    )
    U.write_json("kinds_pool.json", results)

    def pair(s: dict[str, float]) -> str:
        return f"{U.fmt(s['p50_ms'])} / {U.fmt(s['p90_ms'])}"

    rows = [[cid, pair(r["warm"]["acquire_to_result"]), pair(r["warm"]["get"]), pair(r["cold"]["to_result"]),
             pair(r["cold"]["cycle"]), f"{r['ratio_cycle_over_warm']['p50']:.0f}x", pair(r["warm"]["refill"])]
            for cid, r in results["kinds"].items()]  # fmt: skip
    rows += [[cid, f"skipped: {why}", "", "", "", "", ""] for cid, why in results["skipped"].items()]
    U.print_tables([U.table(f"pool of 2, {os.cpu_count()} cpus, ms (p50 / p90)",
                            ["kind", "warm get+result", "get", "cold to result", "cold cycle", "cycle/warm p50",
                             "refill"], rows)])  # fmt: skip
    print(f"total {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
