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
import ctypes
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from noodle.kinds.base import PoolInfo
from noodle.kinds.oci import RUNTIMES, OciKind, leftovers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kind_oci.json")
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def run_as_worker(fn: Any) -> int:
    """Run ``fn`` in a forked worker while this process, a subreaper like
    the supervisor, reaps the worker and every orphan it leaves."""
    become_subreaper()
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
    # Orphans of the last steps, if any.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    return code


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def stats(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": round(pct(ms, 0.5), 3),
        "p90_ms": round(pct(ms, 0.9), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }


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
            t0 = time.perf_counter()
            kind.prepare(slot)
            t1 = time.perf_counter()
            desc = kind.spawn(slot)
            t2 = time.perf_counter()
            handle = OciKind.client_handle(desc)
            assert handle.run("1+1").result == 2
            handle.close()
            t3 = time.perf_counter()
            kind.terminate(slot, desc)
            t4 = time.perf_counter()
            kind.clean(slot)
            t5 = time.perf_counter()
            t["prepare"].append(t1 - t0)
            t["spawn"].append(t2 - t1)
            t["first_result_cold"].append(t3 - t2)
            t["terminate"].append(t4 - t3)
            t["clean"].append(t5 - t4)
            t["cold"].append(t4 - t0)

            # Warm: the container is already up and idle when the job comes.
            kind.prepare(slot)
            desc = kind.spawn(slot)
            time.sleep(0.05)  # let it settle, as it would waiting in the ring
            w0 = time.perf_counter()
            handle = OciKind.client_handle(desc)
            assert handle.run("1+1").result == 2
            w1 = time.perf_counter()
            handle.close()
            t["warm"].append(w1 - w0)
            kind.terminate(slot, desc)
            kind.clean(slot)

            # Warm with the optional health ping get() may run first.
            kind.prepare(slot)
            desc = kind.spawn(slot)
            time.sleep(0.05)
            w0 = time.perf_counter()
            assert OciKind.client_health(desc, 5.0)
            handle = OciKind.client_handle(desc)
            assert handle.run("1+1").result == 2
            w1 = time.perf_counter()
            handle.close()
            t["warm_health"].append(w1 - w0)
            kind.terminate(slot, desc)
            kind.clean(slot)
    finally:
        with contextlib.suppress(Exception):
            kind.clean(slot)
        left = leftovers(name, 0, runtime)
        shutil.rmtree(run_dir, ignore_errors=True)
    if left:
        raise RuntimeError(f"{runtime}: left behind {left}")
    out = {k: stats(v) for k, v in t.items()}
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
    head = f"{'runtime':8}" + "".join(f"{label:>22}" for _, label in cols) + f"{'cold/warm':>11}"
    print(head)
    print(f"{'':8}" + "".join(f"{'p50 / p90 ms':>22}" for _ in cols))
    for rt, r in results.items():
        if "skipped" in r:
            print(f"{rt:8}  skipped: {r['skipped']}")
            continue
        cells = "".join(f"{r[k]['p50_ms']:>12.1f} / {r[k]['p90_ms']:<7.1f}" for k, _ in cols)
        print(f"{rt:8}{cells}{r['cold_over_warm_p50']:>10.0f}x")

    doc = {
        "benchmark": "kind_oci",
        "host": {"machine": platform.machine(), "kernel": platform.release(), "cpus": os.cpu_count()},
        "samples": args.samples,
        "seconds": round(time.time() - started, 1),
        "notes": (
            "cold = prepare + spawn + first result + terminate (kill+delete); warm = connect + first result "
            "on an idle, already-spawned container; warm_health adds the agent ping get() may run; "
            "clean is the slot recycle after terminate, paid off the request path."
        ),
        "runtimes": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} in {doc['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
