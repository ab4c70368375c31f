"""Command kind: spawn-to-ready of the shipped example scripts, cold start
versus a warm instance (see bench_kind_jail.py for the definitions).

    PYTHONPATH=. python3 benchmarks/bench_kind_command.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from noodle.kinds.base import PoolInfo
from noodle.kinds.command import CommandKind

HERE = os.path.dirname(os.path.abspath(__file__))
EX = os.path.join(os.path.dirname(HERE), "examples", "command")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(xs, 50) * 1e3, "p90_ms": pct(xs, 90) * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


def bench(options: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    run_dir = tempfile.mkdtemp(prefix="noodle-bench-")
    kind = CommandKind(PoolInfo(f"bc{os.getpid()}", 1, run_dir, 0, 0), {**options, "env": {"PYTHON": PY}})
    slot = kind.pool.slot(0)
    t: dict[str, list[float]] = {k: [] for k in ("prepare", "spawn", "warm", "terminate", "clean", "cold")}
    try:
        kind.clean(slot)
        for _ in range(rounds):
            a = time.perf_counter()
            kind.prepare(slot)
            b = time.perf_counter()
            desc = kind.spawn(slot)
            c = time.perf_counter()
            handle = CommandKind.client_handle(desc)
            assert handle is not None and handle.run("1+1").result == 2  # type: ignore[union-attr]
            d = time.perf_counter()
            handle.close()
            kind.terminate(slot, desc)
            e = time.perf_counter()
            kind.clean(slot)
            f = time.perf_counter()
            for k, v in (("prepare", b - a), ("spawn", c - b), ("warm", d - c), ("terminate", e - d),
                         ("clean", f - e), ("cold", f - a)):
                t[k].append(v)
    finally:
        kind.clean(slot)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {k: summary(v) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    results: dict[str, Any] = {"rounds": args.rounds, "python": PY}
    variants: dict[str, dict[str, Any]] = {
        "plain_process_mode": {"spawn_mode": "process", "spawn": f"exec {EX}/plain-spawn.sh"},
    }
    if shutil.which("bwrap"):
        variants["bwrap_oneshot"] = {
            "spawn": f"{EX}/bwrap-spawn.sh",
            "terminate": f"{EX}/bwrap-terminate.sh {{pid}}",
            "clean": f"{EX}/bwrap-clean.sh {{dir}}",
        }
    for name, opts in variants.items():
        res = bench(opts, args.rounds)
        ratio = res["cold"]["p50_ms"] / res["warm"]["p50_ms"]
        results[name] = {**res, "cold_over_warm_p50": ratio}
        print(f"\ncommand ({name}), {args.rounds} rounds, ms")
        print(f"{'step':<12}{'p50':>9}{'p90':>9}")
        for step, s in res.items():
            print(f"{step:<12}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}")
        print(f"cold / warm p50: {ratio:.0f}x")
    results["notes"] = "spawn excludes prepare; warm = handle creation to run('1+1') result on a spawned instance."
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "kind_command.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
