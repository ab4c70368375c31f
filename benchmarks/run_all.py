"""Run every benchmark, each as a subprocess, then print the report.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--timeout SECONDS]

bench_core.py, bench_pool.py and bench_jobpath.py always run (the last
skips a sandbox kind whose tool or image is missing), then every other
benchmarks/bench_*.py (the kind benchmarks), each only when the tools it
needs are installed (otherwise it is skipped with the reason). --quick
shortens every benchmark (under 30 s each for ours, a few rounds/samples
for the kind benchmarks). The exit code is non-zero when a benchmark that
ran failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import _util as U

HERE = U.HERE
ROOT = U.ROOT

# what a kind benchmark needs: (any of these executables, files that must exist), and its short-run flags
KIND_NEEDS: dict[str, dict[str, list[str]]] = {
    # each kind's variants are skipped inside when their tools are missing
    "bench_kind.py": {"any_tool": [], "files": [], "quick": ["--rounds", "3"]},
    # picks the kinds that can run here by itself
    "bench_kinds_pool.py": {"any_tool": [], "files": [], "quick": ["--scale", "0.2"]},
}  # fmt: skip
OURS = ("bench_core.py", "bench_pool.py", "bench_jobpath.py")


def missing(script: str) -> str | None:
    """Why a benchmark cannot run here, or None."""
    need = KIND_NEEDS.get(script)
    if need is None:
        return None
    tools = need["any_tool"]
    if tools and not any(shutil.which(t) for t in tools):
        return f"none of {', '.join(tools)} is installed (make deps)"
    for f in need["files"]:
        if not os.path.exists(os.path.join(ROOT, f)):
            return f"{f} is missing (make images)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorten every benchmark")
    ap.add_argument("--only", nargs="*", help="run only these scripts (e.g. bench_core.py)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 900, quick 300)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print what would run or be skipped, run nothing")
    args = ap.parse_args()
    timeout = args.timeout or (300.0 if args.quick else 900.0)
    scripts = list(OURS)
    scripts += sorted(n for n in (os.path.basename(p) for p in glob.glob(os.path.join(HERE, "bench_*.py")))
                      if n not in OURS)  # fmt: skip
    if args.only:
        scripts = [s for s in scripts if s in args.only or s.removesuffix(".py") in args.only]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    summary: list[tuple[str, str, float]] = []
    for script in scripts:
        why = missing(script)
        if why:
            print(f"== {script}: SKIPPED: {why}", flush=True)
            summary.append((script, f"skipped: {why}", 0.0))
            continue
        cmd = [sys.executable, os.path.join(HERE, script)]
        if args.quick:
            if script in OURS:
                cmd.append("--quick")
            elif script in KIND_NEEDS:
                cmd += KIND_NEEDS[script]["quick"]
            else:
                print(f"== {script}: no known short-run flags; running it in full", flush=True)
        print(f"== {script}: {' '.join(cmd[1:])}", flush=True)
        if args.dry_run:
            summary.append((script, "would run", 0.0))
            continue
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout)
            status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            # the benchmark runs in its own session: end its process group only
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            status = f"FAILED (timed out after {timeout:.0f} s)"
        except BaseException:
            os.killpg(proc.pid, 15)
            proc.wait()
            raise
        took = time.monotonic() - t0
        print(f"== {script}: {status} in {took:.1f} s", flush=True)
        summary.append((script, status, took))
    print("\n== summary")
    for script, status, took in summary:
        print(f"  {script:28s} {status}{f' ({took:.0f} s)' if took else ''}")
    if not args.no_report and not args.dry_run:
        print("\n== report (benchmarks/report.py)\n", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "report.py")], cwd=ROOT, env=env, check=False)
    return 1 if any(s.startswith("FAILED") for _, s, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
