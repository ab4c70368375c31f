"""Command kind: spawn-to-ready of the shipped example scripts, cold start
versus a warm instance (see bench_kind_jail.py for the definitions).

    PYTHONPATH=. python3 benchmarks/bench_kind_command.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

import _util as U

from noodle.kinds.base import PoolInfo
from noodle.kinds.command import CommandKind

EX = os.path.join(U.ROOT, "examples", "command")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def bench(options: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    run_dir = tempfile.mkdtemp(prefix="noodle-bench-")
    kind = CommandKind(PoolInfo(f"bc{os.getpid()}", 1, run_dir, 0, 0), {**options, "env": {"PYTHON": PY}})
    slot = kind.pool.slot(0)
    t: dict[str, list[float]] = {k: [] for k in ("prepare", "spawn", "warm", "terminate", "clean", "cold")}

    def first_result(handle: Any) -> None:
        assert handle is not None and handle.run("1+1").result == 2

    try:
        kind.clean(slot)
        for _ in range(rounds):
            step = U.kind_cycle(kind, slot, first_result, close_in_first_result=False)
            step["warm"] = step.pop("first_result")
            step["cold"] = sum(step.values())
            for k, v in step.items():
                t[k].append(v)
    finally:
        kind.clean(slot)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {k: U.summary_ms(v) for k, v in t.items()}


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
        U.print_tables([U.table(f"command ({name}), {args.rounds} rounds, ms", ["step", "p50", "p90"],
                                [[step, s["p50_ms"], s["p90_ms"]] for step, s in res.items()],
                                f"cold / warm p50: {ratio:.0f}x")])  # fmt: skip
    results["notes"] = "spawn excludes prepare; warm = handle creation to run('1+1') result on a spawned instance."
    U.write_json("kind_command.json", results)


if __name__ == "__main__":
    main()
