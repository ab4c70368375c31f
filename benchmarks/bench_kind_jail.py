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
import os
import shutil
import tempfile
from typing import Any

import _util as U

from noodle.kinds.base import PoolInfo
from noodle.kinds.jail import JailKind


def bench(options: dict[str, object], rounds: int) -> dict[str, dict[str, float]]:
    run_dir = tempfile.mkdtemp(prefix="noodle-bench-")
    kind = JailKind(PoolInfo(f"bj{os.getpid()}", 1, run_dir, 0, 0), options)
    kind.setup()
    slot = kind.pool.slot(0)
    t: dict[str, list[float]] = {k: [] for k in ("prepare", "spawn", "prepare_spawn", "first_result", "terminate",
                                                "clean", "cold", "warm")}

    def first_result(handle: Any) -> None:
        assert handle.run("1+1").result == 2

    try:
        kind.clean(slot)
        for _ in range(rounds):
            step = U.kind_cycle(kind, slot, first_result, close_in_first_result=False)
            step["prepare_spawn"] = step["prepare"] + step["spawn"]
            step["cold"] = sum(step[k] for k in U.KIND_STEPS)
            step["warm"] = step["first_result"]
            for k, v in step.items():
                t[k].append(v)
    finally:
        kind.clean(slot)
        kind.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {k: U.summary_ms(v) for k, v in t.items()}


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
        ratio = res["cold"]["p50_ms"] / res["warm"]["p50_ms"]
        res["cold_over_warm_p50"] = {"ratio": ratio}  # type: ignore[dict-item]
        U.print_tables([U.table(f"jail ({name}), {args.rounds} rounds, ms", ["step", "p50", "p90"],
                                [[step, s["p50_ms"], s["p90_ms"]] for step, s in res.items() if "p50_ms" in s],
                                "cold start (prepare+spawn+first result+terminate+clean) / warm acquire-to-result, "
                                f"p50: {ratio:.0f}x")])  # fmt: skip
    results["notes"] = (
        "spawn excludes prepare (overlay mount + cgroup); prepare_spawn includes it. warm = handle creation to "
        "the result of run('1+1') on an already spawned instance; cold = the whole single-use cycle per job."
    )
    U.write_json("kind_jail.json", results)


if __name__ == "__main__":
    main()
