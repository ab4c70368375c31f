"""One sandbox kind on its own: spawn-to-ready, and a cold start per job
against a warm instance.

For each variant of a kind (a runtime, a backend, an option) and each of N
rounds on one slot, in a worker process whose parent reaps orphans as the
supervisor does (a child subreaper):

* cold per job, what a job pays without a pool: prepare + spawn (until the
  instance answers) + first result through a fresh client handle +
  terminate + clean;
* warm: an instance already spawned and idle for 50 ms (as in the ready
  ring); the job builds the handle and gets its first result, and the same
  after the health check ``get()`` may run first.

The microvm kind also measures a VM booted from its kernel (what a job
would pay without snapshots). Writes benchmarks/results/kind_<kind>.json.

    PYTHONPATH=. python3 benchmarks/bench_kind.py [KIND ...] [--rounds N] [--variants a,b]
    KIND: jail, command, oci, microvm (default: all; a variant whose tools
    are missing is skipped with the reason)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _util as U

from noodle.host.launch import launch_detached
from noodle.kinds import load_kind
from noodle.kinds.base import Kind, PoolInfo

EX = os.path.join(U.ROOT, "examples", "command")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def agent_result(handle: Any) -> None:
    assert handle is not None and handle.run("1+1").result == 2


def guest_result(handle: Any) -> None:
    assert handle.exec(["echo", "hi"]).stdout == "hi\n"


@dataclass
class Variant:
    name: str
    options: dict[str, Any]
    needs: list[str] = field(default_factory=list)  # executables (any one) or absolute paths (all)
    notes: str = ""


@dataclass
class KindBench:
    first_result: Callable[[Any], None]
    variants: list[Variant]
    rounds: int
    extra: Callable[[Kind, int], dict[str, Any]] | None = None  # kind-specific measures after the variants


def microvm_cold_boot(kind: Kind, rounds: int) -> dict[str, Any]:
    """Boot a VM from its kernel, first exec result, quit: without snapshots."""
    from noodle.kinds import _qemu
    from noodle.kinds.microvm import MicrovmHandle, guest_name

    cfg = kind.vm  # type: ignore[attr-defined]
    first, total = [], []
    work = tempfile.mkdtemp(prefix="nbmc", dir="/tmp")
    try:
        for i in range(max(1, rounds // 3)):
            d = os.path.join(work, f"cold{i}")
            os.makedirs(d)
            agent, qmp = os.path.join(d, "agent.sock"), os.path.join(d, "qmp.sock")
            t0 = time.perf_counter()
            argv = _qemu.qemu_argv(cfg, guest_name(kind.pool.name, f"cold{i}"), agent, qmp, None)
            proc = launch_detached(argv, os.path.join(d, "qemu.log"))
            try:
                with _qemu.Qmp(qmp, timeout=120, pid=proc.pid) as mon:
                    handle = MicrovmHandle(agent, timeout=120)
                    while not handle.ping(30):
                        time.sleep(0.05)
                    guest_result(handle)
                    first.append(time.perf_counter() - t0)
                    handle.close()
                    try:
                        mon.execute("quit")
                    except _qemu.QmpError:
                        pass  # QEMU may close the monitor before answering
                proc.wait_gone(30, reap=True)
                total.append(time.perf_counter() - t0)
            finally:
                proc.kill()
                U.reap_orphans()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"cold_boot_to_first_result": U.summary_ms(first), "cold_boot_job_total": U.summary_ms(total)}


KINDS: dict[str, KindBench] = {
    "jail": KindBench(agent_result, [
        Variant("bwrap", {}, ["bwrap"]),
        Variant("bwrap_debian_python", {"python": "/usr/bin/python3"}, ["bwrap", "/usr/bin/python3"]),
        Variant("unshare", {"backend": "unshare"}, ["unshare"]),
    ], rounds=40),
    "command": KindBench(agent_result, [
        Variant("plain_process_mode", {"spawn_mode": "process", "spawn": f"exec {EX}/plain-spawn.sh",
                                       "env": {"PYTHON": PY}}),
        Variant("bwrap_oneshot", {"spawn": f"{EX}/bwrap-spawn.sh", "terminate": f"{EX}/bwrap-terminate.sh {{pid}}",
                                  "clean": f"{EX}/bwrap-clean.sh {{dir}}", "env": {"PYTHON": PY}}, ["bwrap"]),
    ], rounds=25),
    "oci": KindBench(agent_result, [
        Variant(rt, {"runtime": rt}, [rt, os.path.join(U.ROOT, "images/build/oci/rootfs")])
        for rt in ("runc", "crun", "runsc")
    ], rounds=12),
    "microvm": KindBench(guest_result, [
        Variant("restore", {}, ["qemu-system-x86_64"]),
        Variant("restore_no_warmup_exec", {"warmup": []}, ["qemu-system-x86_64"],
                "spawn without the warm-up exec: what that exec moves off the lease"),
    ], rounds=15, extra=microvm_cold_boot),
}  # fmt: skip


def missing(v: Variant) -> str | None:
    tools = [n for n in v.needs if not n.startswith("/")]
    if tools and not any(shutil.which(t) for t in tools):
        return f"none of {', '.join(tools)} is installed (make deps)"
    for path in (n for n in v.needs if n.startswith("/")):
        if not os.path.exists(path):
            return f"{path} is missing"
    return None


def warm_sample(kind: Kind, slot: Any, first_result: Callable[[Any], None], health: bool) -> float:
    """A spawned instance, idle as in the ring; handle to first result, seconds."""
    kind.prepare(slot)
    desc = kind.spawn(slot)
    time.sleep(0.05)
    t0 = time.perf_counter()
    if health:
        assert type(kind).client_health(desc, 5.0)
    handle = type(kind).client_handle(desc)
    first_result(handle)
    took = time.perf_counter() - t0
    if hasattr(handle, "close"):
        handle.close()
    kind.terminate(slot, desc)
    kind.clean(slot)
    return took


def bench_variant(kind_name: str, spec: KindBench, v: Variant, rounds: int) -> tuple[dict[str, Any], Kind]:
    run_dir = tempfile.mkdtemp(prefix="nbk", dir="/tmp")
    info = PoolInfo("b" + uuid.uuid4().hex[:8], 1, run_dir, os.getuid(), os.getgid())
    kind = load_kind(kind_name)(info, v.options)
    kind.setup()
    slot = info.slot(0)
    t: dict[str, list[float]] = {k: [] for k in (*U.KIND_STEPS, "cold", "warm", "warm_health")}
    try:
        kind.clean(slot)
        U.kind_cycle(kind, slot, spec.first_result)  # untimed: page cache, binaries, imports
        for _ in range(rounds):
            step = U.kind_cycle(kind, slot, spec.first_result)
            step["cold"] = sum(step[k] for k in U.KIND_STEPS)
            for k, val in step.items():
                t[k].append(val)
            t["warm"].append(warm_sample(kind, slot, spec.first_result, health=False))
            t["warm_health"].append(warm_sample(kind, slot, spec.first_result, health=True))
            U.reap_orphans()
    finally:
        kind.clean(slot)
        if spec.extra is None:
            kind.teardown()
            shutil.rmtree(run_dir, ignore_errors=True)
    out: dict[str, Any] = {k: U.summary_ms(val) for k, val in t.items()}
    out["cold_over_warm_p50"] = U.ratio(out["cold"]["p50_ms"], out["warm"]["p50_ms"])
    if v.notes:
        out["notes"] = v.notes
    return out, kind


def bench(kind_name: str, rounds: int, only: list[str] | None) -> int:
    spec = KINDS[kind_name]
    results: dict[str, Any] = {}
    rows = []
    for v in spec.variants:
        if only and v.name not in only:
            continue
        why = missing(v)
        if why:
            results[v.name] = {"skipped": why}
            rows.append([v.name, f"skipped: {why}", "", "", "", ""])
            continue
        print(f"[{kind_name} {v.name}] {rounds} rounds ...", file=sys.stderr, flush=True)
        res, kind = bench_variant(kind_name, spec, v, rounds)
        if spec.extra is not None:
            try:
                res.update(spec.extra(kind, rounds))
            finally:
                kind.teardown()
                shutil.rmtree(kind.pool.run_dir, ignore_errors=True)
        results[v.name] = res
        cells = [f"{U.fmt(res[k]['p50_ms'])} / {U.fmt(res[k]['p90_ms'])}"
                 for k in ("spawn", "cold", "warm", "warm_health")]
        rows.append([v.name, *cells, f"{res['cold_over_warm_p50']}x"])
    U.print_tables([U.table(f"{kind_name} kind, {rounds} rounds, ms (p50 / p90)",
                            ["variant", "spawn-to-ready", "cold/job", "warm 1st result", "warm+health", "cold/warm"],
                            rows)])  # fmt: skip
    doc = {
        "benchmark": f"kind_{kind_name}",
        "host": U.host_info(),
        "rounds": rounds,
        "notes": "cold = prepare + spawn + first result + terminate + clean; warm = handle creation to first "
        "result on an idle, already spawned instance; warm_health adds the health check get() may run.",
        "variants": results,
    }
    U.write_json(f"kind_{kind_name}.json", doc)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {', '.join(KINDS)} (default: all)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per variant (default: the kind's)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the kinds' variants")
    args = ap.parse_args()
    only = [v for v in args.variants.split(",") if v] or None
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kind(s) {', '.join(sorted(unknown))}")
    code = 0
    for kind in args.kinds or list(KINDS):
        rounds = args.rounds or KINDS[kind].rounds
        code = code or U.run_as_worker(lambda kind=kind, rounds=rounds: bench(kind, rounds, only))
    return code


if __name__ == "__main__":
    sys.exit(main())
