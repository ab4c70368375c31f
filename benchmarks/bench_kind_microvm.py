"""Benchmark of the ``microvm`` kind: snapshot restore versus cold boot.

* setup: one template cold boot + saving its state (once per pool);
* restore spawn-to-ready: ``clean + prepare + spawn()`` = QEMU mapping the
  template RAM file copy-on-write, ``migrate-incoming`` of the device state,
  ``cont``, fresh entropy/identity through the agent and the warm-up exec
  (what a pool slot pays, off the job's path); also ``spawn()`` alone
  without the warm-up exec;
* cold boot per job (what a job pays without a pool): boot a VM from the
  kernel, first ``exec(["echo", "hi"])`` result, quit and wait it is gone;
* restore per job: the same with a restore instead of a boot;
* warm acquire-to-first-result: a restored, idle VM; the job builds the
  handle (connect + stream sync) and gets ``exec(["echo", "hi"])`` back;
  also without the warm-up exec in spawn, to show what it moves off the
  lease.

Every sample uses a fresh VM (instances are single-use). The process makes
itself a child subreaper as the supervisor is. Writes
benchmarks/results/kind_microvm.json and prints a table.

Usage: PYTHONPATH=. python3 benchmarks/bench_kind_microvm.py [--samples N] [--cold N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import _util as U

from noodle.kinds import _qemu
from noodle.kinds.base import PoolInfo
from noodle.kinds.microvm import MicrovmHandle, MicrovmKind, guest_name

RESULTS = os.path.join(U.RESULTS, "kind_microvm.json")


def summary(xs: list[float]) -> dict[str, Any]:
    return U.summary_ms(xs, ("n", "p50", "p90", "min", "max"), 2, median=True)


def first_result(desc: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    handle = MicrovmKind.client_handle(desc)
    res = handle.exec(["echo", "hi"])
    dt = time.perf_counter() - t0
    handle.close()
    assert res.stdout == "hi\n", res
    return dt


def cold_boot_job(kind: MicrovmKind, work: str, i: int) -> tuple[float, float]:
    """Boot + first result + quit; returns (to first result, whole job)."""
    cfg = kind.vm
    assert cfg is not None
    d = os.path.join(work, f"cold{i}")
    os.makedirs(d)
    agent, qmp = os.path.join(d, "agent.sock"), os.path.join(d, "qmp.sock")
    t0 = time.perf_counter()
    argv = _qemu.qemu_argv(cfg, guest_name(kind.pool.name, f"cold{i}"), agent, qmp, None)
    pid = _qemu.launch_detached(argv, os.path.join(d, "qemu.log"))
    started = _qemu.start_time(pid)
    try:
        with _qemu.Qmp(qmp, timeout=120, pid=pid) as mon:
            handle = MicrovmHandle(agent, timeout=120)
            while not handle.ping(30):
                time.sleep(0.05)
            res = handle.exec(["echo", "hi"])
            t_first = time.perf_counter() - t0
            handle.close()
            assert res.stdout == "hi\n", res
            try:
                mon.execute("quit")
            except _qemu.QmpError:
                pass  # QEMU may close the monitor before answering
        _qemu.wait_gone(pid, started, 30)
        return t_first, time.perf_counter() - t0
    finally:
        _qemu.kill_and_wait(pid, started)
        U.reap_orphans()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--cold", type=int, default=5)
    args = ap.parse_args()
    U.become_subreaper()
    name = f"bmv{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="nbmv", dir="/tmp")
    info = PoolInfo(name, 4, work, os.getuid(), os.getgid())
    kind = MicrovmKind(info, {})
    t0 = time.perf_counter()
    kind.setup()
    setup_s = time.perf_counter() - t0
    with open(kind.meta_path) as f:
        template_boot_s = float(json.load(f)["boot_seconds"])
    results: dict[str, Any] = {}
    try:
        spawn, restore_job_first, restore_job = [], [], []
        for i in range(args.samples):
            ctx = info.slot(i % 4)
            t0 = time.perf_counter()
            kind.clean(ctx)
            kind.prepare(ctx)
            desc = kind.spawn(ctx)
            spawn.append(time.perf_counter() - t0)
            first_result(desc)
            restore_job_first.append(time.perf_counter() - t0)
            kind.terminate(ctx, desc)
            restore_job.append(time.perf_counter() - t0)
            kind.clean(ctx)
            U.reap_orphans()
        results["restore_spawn_to_ready"] = summary(spawn)
        results["restore_job_to_first_result"] = summary(restore_job_first)
        results["restore_job_total"] = summary(restore_job)

        cold_first, cold_total = [], []
        for i in range(args.cold):
            a, b = cold_boot_job(kind, work, i)
            cold_first.append(a)
            cold_total.append(b)
        results["cold_boot_to_first_result"] = summary(cold_first)
        results["cold_boot_job_total"] = summary(cold_total)

        for label, warm_kind in (("warm", kind), ("warm_no_warmup_exec", None)):
            if warm_kind is None:
                # Same template (a kind that did not run setup reads it back).
                warm_kind = MicrovmKind(info, {"warmup": []})
            acquire, spawned = [], []
            for i in range(args.samples):
                ctx = info.slot(i % 4)
                warm_kind.clean(ctx)
                warm_kind.prepare(ctx)
                t0 = time.perf_counter()
                desc = warm_kind.spawn(ctx)
                spawned.append(time.perf_counter() - t0)
                time.sleep(0.05)  # idle in the ready ring, as a pooled VM is
                acquire.append(first_result(desc))
                warm_kind.terminate(ctx, desc)
                warm_kind.clean(ctx)
                U.reap_orphans()
            results[f"{label}_acquire_to_first_result"] = summary(acquire)
            if warm_kind is not kind:
                # spawn() without the warm-up exec: restore + init only.
                results["restore_spawn_without_warmup"] = summary(spawned)
    finally:
        for slot in range(4):
            kind.clean(info.slot(slot))
        kind.teardown()
        U.reap_orphans()
        shutil.rmtree(work, ignore_errors=True)

    p50 = {k: v["p50_ms"] for k, v in results.items()}

    def ratio(a: str, b: str) -> float | None:
        return U.ratio(p50[a], p50[b])

    ratios = {
        "cold_boot_first_result_over_restore_spawn": ratio("cold_boot_to_first_result", "restore_spawn_to_ready"),
        "cold_job_total_over_restore_job_total": ratio("cold_boot_job_total", "restore_job_total"),
        "cold_boot_first_result_over_warm_acquire": ratio("cold_boot_to_first_result", "warm_acquire_to_first_result"),
        "restore_job_first_result_over_warm_acquire": ratio(
            "restore_job_to_first_result", "warm_acquire_to_first_result"
        ),
        "no_warmup_over_warmup_acquire": ratio(
            "warm_no_warmup_exec_acquire_to_first_result", "warm_acquire_to_first_result"
        ),
    }
    out = {
        "kind": "microvm",
        "mode": kind.mode,
        "host": U.host_info(),
        "memory_mb": kind.options["memory_mb"],
        "setup_seconds": round(setup_s, 3),
        "template_boot_seconds": round(template_boot_s, 3),
        "results": results,
        "ratios_p50": ratios,
    }
    path = U.write_json(RESULTS, out)
    print(f"microvm kind, mode {kind.mode}, setup {setup_s:.2f} s (template boot {template_boot_s:.2f} s)")
    U.print_tables([
        U.table("microvm kind, ms", ["measure", "n", "p50", "p90"],
                [[k, v["n"], v["p50_ms"], v["p90_ms"]] for k, v in results.items()]),
        U.table("microvm kind, p50 ratios", ["ratio", "x"], [[k, v] for k, v in ratios.items()]),
    ])  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
