"""Jail kind: spawn-to-ready and cold start versus a warm instance.

For each of N rounds on one slot: prepare, spawn (until the agent answers
ping), time run("1+1") through a fresh handle (the warm path: what a lease
holder pays once the pool has the instance ready), terminate, clean. The
cold path is the sum a caller would pay without a pool: prepare + spawn +
first result + terminate + clean.

    PYTHONPATH=. python3 benchmarks/bench_kind_jail.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from noodle.kinds.base import PoolInfo
from noodle.kinds.jail import JailKind

HERE = os.path.dirname(os.path.abspath(__file__))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(xs, 50) * 1e3, "p90_ms": pct(xs, 90) * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


def bench(options: dict[str, object], rounds: int) -> dict[str, dict[str, float]]:
    run_dir = tempfile.mkdtemp(prefix="noodle-bench-")
    kind = JailKind(PoolInfo(f"bj{os.getpid()}", 1, run_dir, 0, 0), options)
    kind.setup()
    slot = kind.pool.slot(0)
    t: dict[str, list[float]] = {k: [] for k in ("prepare", "spawn", "prepare_spawn", "first_result", "terminate",
                                                "clean", "cold", "warm")}
    try:
        kind.clean(slot)
        for _ in range(rounds):
            a = time.perf_counter()
            kind.prepare(slot)
            b = time.perf_counter()
            desc = kind.spawn(slot)
            c = time.perf_counter()
            handle = JailKind.client_handle(desc)
            assert handle.run("1+1").result == 2
            d = time.perf_counter()
            handle.close()
            kind.terminate(slot, desc)
            e = time.perf_counter()
            kind.clean(slot)
            f = time.perf_counter()
            t["prepare"].append(b - a)
            t["spawn"].append(c - b)
            t["prepare_spawn"].append(c - a)
            t["first_result"].append(d - c)
            t["terminate"].append(e - d)
            t["clean"].append(f - e)
            t["cold"].append(f - a)
            t["warm"].append(d - c)
    finally:
        kind.clean(slot)
        kind.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {k: summary(v) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    results: dict[str, object] = {"rounds": args.rounds, "cpus": os.cpu_count()}
    variants = {"bwrap": {}, "bwrap_debian_python": {"python": "/usr/bin/python3"}, "unshare": {"backend": "unshare"}}
    for name, opts in variants.items():
        if name.startswith("bwrap") and not shutil.which("bwrap"):
            continue
        if "python" in opts and not os.path.exists(str(opts["python"])):
            continue
        res = bench(dict(opts), args.rounds)
        results[name] = res
        print(f"\njail ({name}), {args.rounds} rounds, ms")
        print(f"{'step':<16}{'p50':>9}{'p90':>9}")
        for step, s in res.items():
            print(f"{step:<16}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}")
        ratio = res["cold"]["p50_ms"] / res["warm"]["p50_ms"]
        res["cold_over_warm_p50"] = {"ratio": ratio}  # type: ignore[dict-item]
        print(f"cold start (prepare+spawn+first result+terminate+clean) / warm acquire-to-result, p50: {ratio:.0f}x")
    results["notes"] = (
        "spawn excludes prepare (overlay mount + cgroup); prepare_spawn includes it. warm = handle creation to "
        "the result of run('1+1') on an already spawned instance; cold = the whole single-use cycle per job."
    )
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "kind_jail.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
