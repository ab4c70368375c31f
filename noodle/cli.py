"""The ``noodle`` command.

Exit codes (stable, for scripts)::

    0  ok
    1  error (the message says what)
    2  usage or configuration error
    3  no such pool (no live supervisor under that name)
    4  starved: no instance became ready within the timeout
    5  the pool is shutting down
    6  the code run by ``noodle exec`` raised (its traceback is on stderr)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from noodle import config as cfgmod
from noodle.errors import (
    ConfigError,
    InstanceError,
    NoodleError,
    PoolNotFound,
    PoolShuttingDown,
    PoolStarved,
)
from noodle.fleet import cli as fleet_cli

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_POOL, EXIT_STARVED, EXIT_SHUTTING_DOWN, EXIT_REMOTE = 0, 1, 2, 3, 4, 5, 6


def _default_name() -> str:
    return os.environ.get("NOODLE_POOL", "default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noodle", description="A warm pool of single-use instances.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pool's supervisor in the foreground")
    add_run_flags(run)

    st = sub.add_parser("status", help="state counts, counters and latencies, read from shared memory")
    st.add_argument("--name", default=_default_name())
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS", help="refresh until Ctrl-C")

    g = sub.add_parser("get", help="take a lease, print its descriptor as JSON, release it")
    g.add_argument("--name", default=_default_name())
    g.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: the pool's get_timeout)")
    g.add_argument("--hold", type=float, default=0.0, help="seconds to hold the lease before releasing it")

    ex = sub.add_parser("exec", help="run Python source in a warm instance and print its output")
    ex.add_argument("source", help="Python source; '-' reads standard input")
    ex.add_argument("--name", default=_default_name())
    ex.add_argument("--timeout", type=float, default=None, help="seconds to wait for an instance")
    ex.add_argument("--run-timeout", type=float, default=30.0, help="seconds the code may run")

    d = sub.add_parser("demo", help="start a pool, use it, show its status, stop it (what `make run` does)")
    d.add_argument("--name", default="demo")
    d.add_argument("--pool-size", type=int, default=8)
    d.add_argument("--kind", default="process")

    sub.add_parser("kinds", help="list the registered instance kinds")
    sub.add_parser("unit", help="print the systemd unit file (noodle@.service) to install")
    fleet_cli.register(sub)  # serve, submit, status --nats, unit --serve
    return p


def add_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--config", help="TOML file; flags override it")
    run.add_argument("--name", help="pool name (default: 'default')")
    run.add_argument("--pool-size", type=int)
    run.add_argument("--kind")
    run.add_argument("--workers", type=int, help="workers per stage")
    run.add_argument("--max-concurrency", type=int, help="lifecycle steps running at once (0: one per worker)")
    run.add_argument("--check-health", action="store_const", const=True, default=None,
                     help="run one full lifecycle on a scratch slot before starting; refuse to start if it fails")
    hg = run.add_mutually_exclusive_group()
    hg.add_argument("--health-on-get", dest="health_on_get", action="store_const", const=True, default=None)
    hg.add_argument("--no-health-on-get", dest="health_on_get", action="store_const", const=False)
    run.add_argument("--get-timeout", type=float, help="clients' default get() timeout, seconds")
    run.add_argument("--drain-timeout", type=float, help="seconds leases get to come back at shutdown")
    run.add_argument("--abandon-cooldown", type=float, help="seconds before an abandoned slot is retried")
    run.add_argument("--step-timeout", type=float, help="seconds one lifecycle step may take")
    run.add_argument("--worker-timeout", type=float, help="seconds without a worker heartbeat before it is killed")
    run.add_argument("--descriptor-size", type=int, help="bytes of descriptor per slot")
    run.add_argument("--run-dir", help="parent of the pool's private directory")
    run.add_argument("--group", help="group whose members may attach (default: owner only)")
    run.add_argument("--log-level")


_RUN_KEYS = ("name", "pool_size", "kind", "workers", "max_concurrency", "check_health", "health_on_get",
             "get_timeout", "drain_timeout", "abandon_cooldown", "step_timeout", "worker_timeout",
             "descriptor_size", "run_dir", "group", "log_level")  # fmt: skip


def load_run_config(args: argparse.Namespace) -> cfgmod.Config:
    cfg = cfgmod.load(args.config, {k: getattr(args, k) for k in _RUN_KEYS})
    cfgmod.validate_kind(cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from noodle import log as logmod
    from noodle import supervisor

    cfg = load_run_config(args)
    logmod.setup(cfg.log_level)
    progress: Callable[[dict[str, Any]], None] | None = None
    if sys.stderr.isatty():
        def progress(snap: dict[str, Any]) -> None:
            s = snap["states"]
            sys.stderr.write(f"\r[{cfg.name}] ready {s['ready']}/{snap['pool_size']}  leased {s['leased']}  "
                             f"warming {s['clean'] + s['prepare'] + s['spawn'] + s['terminate']}  "
                             f"abandoned {s['abandoned']}   ")  # fmt: skip
            sys.stderr.flush()
    return supervisor.run(cfg, progress)


def format_status(snap: dict[str, Any]) -> str:
    lines = [
        f"pool {snap['pool']} ({snap['kind']}), supervisor pid {snap['supervisor_pid']}, {snap['phase']}"
        f"{', SHUTTING DOWN' if snap['shutting_down'] else ''}, heartbeat {snap['heartbeat_age_s']:.2f} s ago",
        "states:   " + "  ".join(f"{k} {v}" for k, v in snap["states"].items()) + f"   (pool_size {snap['pool_size']})",
        f"ring:     {snap['ring_length']} queued, {snap['waiters']} waiting",
        "counters: " + "  ".join(f"{k} {v}" for k, v in snap["counters"].items() if v),
    ]
    for name, p in snap["latency_us"].items():
        lines.append(f"latency {name:9s} n={int(p['count'])}  p50 <={p.get('p50')} us  p90 <={p.get('p90')} us"
                     f"  p99 <={p.get('p99')} us  max <={p.get('max')} us")  # fmt: skip
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from noodle.client import attach

    with attach(args.name) as pool:
        while True:
            snap = pool.stats()
            if args.json:
                print(json.dumps(snap, sort_keys=True))
            else:
                if args.watch:
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(format_status(snap))
            sys.stdout.flush()
            if not args.watch:
                return EXIT_OK
            time.sleep(args.watch)


def cmd_get(args: argparse.Namespace) -> int:
    from noodle.client import attach

    with attach(args.name) as pool:
        kwargs: dict[str, Any] = {} if args.timeout is None else {"timeout": args.timeout}
        with pool.get(**kwargs) as lease:
            print(json.dumps({"slot": lease.slot, "generation": lease.generation, "descriptor": lease.descriptor},
                             default=repr))  # fmt: skip
            sys.stdout.flush()
            if args.hold:
                time.sleep(args.hold)
    return EXIT_OK


def cmd_exec(args: argparse.Namespace) -> int:
    from noodle.client import attach

    source = sys.stdin.read() if args.source == "-" else args.source
    with attach(args.name) as pool:
        kwargs: dict[str, Any] = {} if args.timeout is None else {"timeout": args.timeout}
        with pool.get(**kwargs) as lease:
            inst = lease.instance
            if inst is None or not hasattr(inst, "run"):
                print(f"kind {pool.kind_name!r} runs no Python; use its handle's exec()", file=sys.stderr)
                return EXIT_ERROR
            try:
                res = inst.run(source, timeout=args.run_timeout)
            except InstanceError as exc:
                sys.stderr.write(exc.remote_traceback or f"{exc}\n")
                return EXIT_REMOTE
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            if res.result is not None:
                print(res.result)
    return EXIT_OK


def cmd_kinds(args: argparse.Namespace) -> int:
    from noodle.kinds import available_kinds

    for name in available_kinds():
        print(name)
    return EXIT_OK


def cmd_unit(args: argparse.Namespace) -> int:
    from pathlib import Path

    sys.stdout.write((Path(__file__).parent / "noodle@.service").read_text())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a pool in a child process, show it working, stop it."""
    from noodle.client import attach

    cmd = [sys.executable, "-m", "noodle", "run", "--name", args.name, "--pool-size", str(args.pool_size),
           "--kind", args.kind]  # fmt: skip
    print(f"$ noodle run --name {args.name} --pool-size {args.pool_size} --kind {args.kind} &", flush=True)
    sup = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        pool = None
        deadline = time.monotonic() + 60
        while pool is None:
            if sup.poll() is not None:
                print(f"the supervisor exited with {sup.returncode}", file=sys.stderr)
                return EXIT_ERROR
            try:
                pool = attach(args.name)
            except PoolNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        t0 = time.monotonic()
        while pool.stats()["states"]["ready"] < args.pool_size:
            if time.monotonic() - t0 > 60:
                print("the pool did not fill within 60 s", file=sys.stderr)
                return EXIT_ERROR
            time.sleep(0.01)
        took = time.monotonic() - t0
        print(f"pool {args.name!r} full: {args.pool_size} warm instances in {took:.2f} s\n", flush=True)
        for src in ("print(1 + 1)", "import os; os.getpid()", "sum(i * i for i in range(10**5))",
                    "open('/etc/hostname').read().strip()"):  # fmt: skip
            t = time.perf_counter()
            with pool.get(timeout=10) as lease:
                got = time.perf_counter() - t
                res = lease.instance.run(src)
                took = time.perf_counter() - t
            out = (res.stdout.strip() or repr(res.result))
            print(f"$ noodle exec {src!r}\n{out}\n  (slot {lease.slot}, lease in {got * 1e6:.0f} us,"
                  f" result in {took * 1e3:.2f} ms)", flush=True)  # fmt: skip
        time.sleep(0.5)
        print("\n$ noodle status")
        print(format_status(pool.stats()), flush=True)
        pool.close()
        return EXIT_OK
    finally:
        print(f"\nstopping the supervisor (pid {sup.pid}) with SIGTERM ...", flush=True)
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
        try:
            code = sup.wait(60)
        except subprocess.TimeoutExpired:
            sup.kill()
            code = sup.wait()
        print(f"supervisor exited with {code}; segment and queues removed.")
        print("To keep a pool running: `noodle run --name demo` in one terminal, then"
              " `noodle exec --name demo 'print(42)'` and `noodle status --name demo` in another.")


COMMANDS = {"run": cmd_run, "status": cmd_status, "get": cmd_get, "exec": cmd_exec, "demo": cmd_demo,
            "kinds": cmd_kinds, "unit": cmd_unit}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return (getattr(args, "fleet_cmd", None) or COMMANDS[args.command])(args)
    except ConfigError as exc:
        print(f"noodle: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PoolNotFound as exc:
        print(f"noodle: {exc}", file=sys.stderr)
        return EXIT_NO_POOL
    except PoolStarved as exc:
        print(f"noodle: {exc}", file=sys.stderr)
        return EXIT_STARVED
    except PoolShuttingDown as exc:
        print(f"noodle: {exc}", file=sys.stderr)
        return EXIT_SHUTTING_DOWN
    except NoodleError as exc:
        print(f"noodle: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
