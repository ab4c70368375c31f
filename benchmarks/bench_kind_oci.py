"""Benchmark of the ``oci`` kind per runtime (runc, crun, runsc).

What a warm pool saves: for each runtime it measures

* spawn-to-ready: ``spawn()`` = ``run --detach`` + the agent answering a ping;
* cold per job: what a job pays without a pool, prepare (config.json) +
  spawn + first result (``run("1+1")``) + terminate (kill + delete);
* warm acquire-to-first-result: a container already spawned and idle, the
  job connects and gets its first result (and the same with the optional
  health ping that ``get()`` may run first).

Each sample uses a fresh container (instances are single-use). As in the
pool, the steps run in a worker process whose parent is a child subreaper
that reaps every orphan at once (the supervisor's job): runsc's delete waits
until its sandbox's processes are reaped, and pid 1 here reaps lazily.
Writes benchmarks/results/kind_oci.json and prints a table.

Usage: PYTHONPATH=. python3 benchmarks/bench_kind_oci.py [--samples N] [--runtimes runc,crun]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import _util as U

from noodle.kinds.base import PoolInfo
from noodle.kinds.oci import RUNTIMES, OciKind, leftovers

RESULTS = os.path.join(U.RESULTS, "kind_oci.json")


def run_as_worker(fn: Any) -> int:
    """Run ``fn`` in a forked worker while this process, a subreaper like
    the supervisor, reaps the worker and every orphan it leaves."""
    U.become_subreaper()
    worker = os.fork()
    if worker == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    while True:
        pid, status = os.wait()
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            break
    U.reap_orphans()  # orphans of the last steps, if any
    return code


def first_result(handle: Any) -> None:
    assert handle.run("1+1").result == 2


def warm_sample(kind: OciKind, slot: Any, health: bool) -> float:
    """A container already up and idle when the job comes: connect (after
    the agent ping get() may run, if ``health``) to first result, seconds."""
    kind.prepare(slot)
    desc = kind.spawn(slot)
    time.sleep(0.05)  # let it settle, as it would waiting in the ring
    w0 = time.perf_counter()
    if health:
        assert OciKind.client_health(desc, 5.0)
    handle = OciKind.client_handle(desc)
    first_result(handle)
    w1 = time.perf_counter()
    handle.close()
    kind.terminate(slot, desc)
    kind.clean(slot)
    return w1 - w0


def bench_runtime(runtime: str, samples: int) -> dict[str, Any]:
    run_dir = tempfile.mkdtemp(prefix="noodle-bench-", dir="/tmp")
    name = "b" + uuid.uuid4().hex[:8]
    pool = PoolInfo(name, 1, run_dir, os.getuid(), os.getgid())
    kind = OciKind(pool, {"runtime": runtime})
    kind.setup()
    slot = pool.slot(0)
    t: dict[str, list[float]] = {
        k: [] for k in ("prepare", "spawn", "first_result_cold", "terminate", "clean", "cold", "warm", "warm_health")
    }
    try:
        kind.clean(slot)
        # One untimed cycle: page cache, runtime binaries, Python's imports.
        kind.prepare(slot)
        kind.terminate(slot, kind.spawn(slot))
        kind.clean(slot)
        for _ in range(samples):
            # Cold: everything a job without a pool waits for.
            step = U.kind_cycle(kind, slot, first_result)
            step["first_result_cold"] = step.pop("first_result")
            step["cold"] = step["prepare"] + step["spawn"] + step["first_result_cold"] + step["terminate"]
            for k, v in step.items():
                t[k].append(v)
            t["warm"].append(warm_sample(kind, slot, health=False))
            # Warm with the optional health ping get() may run first.
            t["warm_health"].append(warm_sample(kind, slot, health=True))
    finally:
        with contextlib.suppress(Exception):
            kind.clean(slot)
        left = leftovers(name, 0, runtime)
        shutil.rmtree(run_dir, ignore_errors=True)
    if left:
        raise RuntimeError(f"{runtime}: left behind {left}")
    out: dict[str, Any] = {k: U.summary_ms(v, ("p50", "p90", "mean", "n"), 3) for k, v in t.items()}
    out["cold_over_warm_p50"] = round(out["cold"]["p50_ms"] / out["warm"]["p50_ms"], 1)
    out["cold_over_warm_health_p50"] = round(out["cold"]["p50_ms"] / out["warm_health"]["p50_ms"], 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    return run_as_worker(lambda: bench(args))


def bench(args: argparse.Namespace) -> int:
    started = time.time()
    results: dict[str, Any] = {}
    for rt in args.runtimes.split(","):
        if shutil.which(rt) is None:
            results[rt] = {"skipped": f"{rt} not installed (run images/oci/build.sh)"}
            continue
        print(f"[{rt}] {args.samples} samples ...", file=sys.stderr, flush=True)
        results[rt] = bench_runtime(rt, args.samples)

    cols = [
        ("spawn", "spawn-to-ready"),
        ("cold", "cold/job"),
        ("warm", "warm 1st result"),
        ("warm_health", "warm+health"),
        ("terminate", "terminate"),
        ("clean", "clean"),
    ]
    rows = []
    for rt, r in results.items():
        if "skipped" in r:
            rows.append([rt, f"skipped: {r['skipped']}"] + [""] * len(cols))
            continue
        rows.append([rt] + [f"{U.fmt(r[k]['p50_ms'])} / {U.fmt(r[k]['p90_ms'])}" for k, _ in cols]
                    + [f"{r['cold_over_warm_p50']:.0f}x"])  # fmt: skip
    U.print_tables([U.table("oci kind, ms (p50 / p90)", ["runtime", *(label for _, label in cols), "cold/warm"],
                            rows)])  # fmt: skip

    doc = {
        "benchmark": "kind_oci",
        "host": U.host_info(),
        "samples": args.samples,
        "seconds": round(time.time() - started, 1),
        "notes": (
            "cold = prepare + spawn + first result + terminate (kill+delete); warm = connect + first result "
            "on an idle, already-spawned container; warm_health adds the agent ping get() may run; "
            "clean is the slot recycle after terminate, paid off the request path."
        ),
        "runtimes": results,
    }
    out = U.write_json(args.out, doc)
    print(f"wrote {out} in {doc['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
