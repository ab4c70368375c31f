"""The ``noodle`` command.

Exit codes (stable, for scripts)::

    0  ok
    1  error (the message says what)
    2  usage or configuration error
    3  no such pool (no live supervisor under that name)
    4  starved: no instance became ready within the timeout
    5  the pool is shutting down
    6  the code run by ``noodle exec`` raised (its traceback is on stderr)
  141  standard output was closed early (``noodle status | head -2``)

``noodle exec`` exits with the status the code passed to ``sys.exit``.
Sub-commands live in a registry: another module adds its own with
:func:`register` and is listed in ``COMMAND_MODULES`` (or in the
``noodle.commands`` entry-point group of another package).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
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

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_POOL, EXIT_STARVED, EXIT_SHUTTING_DOWN, EXIT_REMOTE = 0, 1, 2, 3, 4, 5, 6
EXIT_PIPE = 128 + signal.SIGPIPE
ENV_POOL = "NOODLE_POOL"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS: dict[str, Command] = {}
# modules that register commands of their own when imported
COMMAND_MODULES: list[str] = ["noodle.images.command", "noodle.fleet.cli"]


def register(cmd: Command) -> None:
    """Add a sub-command, or replace one: to add flags to an existing command,
    register a Command whose configure and run wrap those of ``command(name)``."""
    _COMMANDS[cmd.name] = cmd


def command(name: str) -> Command:
    return _COMMANDS[name]


def _load_command_modules() -> None:
    from importlib.metadata import entry_points

    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group="noodle.commands"):
        ep.load()()


# -- argument types: a bad number is a usage error (exit 2), never a traceback ----


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


def seconds(positive: bool = False, most: float = 86400.0) -> Callable[[str], float]:
    def parse(text: str) -> float:
        v = _number(text)
        if v < 0 or (positive and v == 0) or v > most:
            raise argparse.ArgumentTypeError(f"expected seconds in {'(0' if positive else '[0'}, {most:g}], got {text}")
        return v

    parse.__name__ = "seconds"
    return parse


def _config_flag(key: str, conv: Callable[[str], Any]) -> Callable[[str], Any]:
    """A `noodle run` flag checked by the same rules as its TOML key."""

    def parse(text: str) -> Any:
        try:
            value = conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if conv is int else 'a number'}: {text!r}") from None
        try:
            cfgmod.check_value(key, value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
        return value

    parse.__name__ = key
    return parse


def _default_name() -> str:
    return os.environ.get(ENV_POOL) or "default"


def add_name(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--name", default=default if default is not None else _default_name(),
                   help=f"pool name (default: ${ENV_POOL}, else 'default'; now {_default_name()!r})")  # fmt: skip


# -- noodle run ------------------------------------------------------------------

_DEFAULTS = {f.name: f.default for f in fields(cfgmod.Config) if not callable(f.default)}


def _d(key: str) -> str:
    v = _DEFAULTS.get(key)
    return f"(default: {v!r})" if isinstance(v, str) else f"(default: {v})"


def add_run_flags(run: argparse.ArgumentParser) -> None:
    from noodle.kinds import available_kinds

    run.add_argument("--config", metavar="FILE", help="TOML file with the same keys; flags override it")
    run.add_argument("--name", help=f"pool name (default: ${ENV_POOL}, else the file's name, else 'default')")
    run.add_argument("--pool-size", type=_config_flag("pool_size", int), metavar="N",
                     help=f"instances kept warm {_d('pool_size')}")  # fmt: skip
    run.add_argument("--kind", help=f"instance kind: {', '.join(available_kinds())}, or pkg.module:Class "
                                    f"{_d('kind')}")  # fmt: skip
    run.add_argument("--workers", type=_config_flag("workers", int), metavar="N",
                     help="workers per stage, 1..64 (default: 1)")  # fmt: skip
    run.add_argument("--max-concurrency", type=_config_flag("max_concurrency", int), metavar="N",
                     help=f"lifecycle steps running at once, 0: one per worker {_d('max_concurrency')}")  # fmt: skip
    run.add_argument("--max-failures", type=_config_flag("max_failures", int), metavar="N",
                     help=f"failed steps in a row before a slot is abandoned {_d('max_failures')}")  # fmt: skip
    run.add_argument("--refill-nice", type=_config_flag("refill_nice", int), metavar="N",
                     help="nice value, 0..19, of the pool's session, so refilling yields the CPU to jobs; applies when"
                          f" the supervisor leads its session, as under systemd {_d('refill_nice')}")  # fmt: skip
    run.add_argument("--check-health", action="store_const", const=True, default=None,
                     help="run one full lifecycle on a scratch slot before starting; refuse to start if it fails"
                          " (default: off)")  # fmt: skip
    hg = run.add_mutually_exclusive_group()
    hg.add_argument("--health-on-get", dest="health_on_get", action="store_const", const=True, default=None,
                    help="clients health-check an instance before handing it out (default: off)")  # fmt: skip
    hg.add_argument("--no-health-on-get", dest="health_on_get", action="store_const", const=False,
                    help="clients hand instances out unchecked")  # fmt: skip
    for key, text in (("get_timeout", "clients' default get() timeout"),
                      ("drain_timeout", "time leases get to come back at shutdown"),
                      ("abandon_cooldown", "wait before an abandoned slot is retried"),
                      ("step_timeout", "time one clean/prepare/spawn/terminate step may take"),
                      ("worker_timeout", "worker heartbeat silence before it is killed")):  # fmt: skip
        run.add_argument("--" + key.replace("_", "-"), type=_config_flag(key, float), metavar="SECONDS",
                         help=f"{text}, seconds {_d(key)}")  # fmt: skip
    run.add_argument("--descriptor-size", type=_config_flag("descriptor_size", int), metavar="BYTES",
                     help=f"bytes of descriptor per slot {_d('descriptor_size')}")  # fmt: skip
    run.add_argument("--run-dir", metavar="DIR", help="parent of the pool's private directory (default: "
                     "$RUNTIME_DIRECTORY under systemd, /run/noodle as root, else $XDG_RUNTIME_DIR/noodle)")
    run.add_argument("--group", help="group whose members may attach (default: the owner only)")
    run.add_argument("--image-dir", metavar="DIR", help="where `noodle image build` put the sandbox images "
                     "(default: $NOODLE_IMAGE_DIR, else /var/lib/noodle/images)")  # fmt: skip
    run.add_argument("--metrics", metavar="HOST:PORT", type=_config_flag("metrics", str),
                     help="serve Prometheus /metrics here, e.g. 127.0.0.1:9464 (default: off)")  # fmt: skip
    run.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                     help=f"{_d('log_level')}")  # fmt: skip
    run.add_argument("--log-format", choices=cfgmod.LOG_FORMATS, help=f"json: one object per line {_d('log_format')}")


_RUN_KEYS = ("name", "pool_size", "kind", "workers", "max_concurrency", "max_failures", "refill_nice", "check_health",
             "health_on_get", "get_timeout", "drain_timeout", "abandon_cooldown", "step_timeout",
             "worker_timeout", "descriptor_size", "run_dir", "group", "image_dir", "metrics", "log_level",
             "log_format")  # fmt: skip


def load_run_config(args: argparse.Namespace) -> cfgmod.Config:
    overrides = {k: getattr(args, k, None) for k in _RUN_KEYS}
    if overrides["name"] is None and os.environ.get(ENV_POOL):
        overrides["name"] = os.environ[ENV_POOL]
    cfg = cfgmod.load(args.config, overrides)
    cfgmod.validate_kind(cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from noodle import log as logmod
    from noodle import supervisor

    cfg = load_run_config(args)
    logmod.setup(cfg.log_level, cfg.log_format, cfg.name)
    if cfg.image_dir:
        os.environ["NOODLE_IMAGE_DIR"] = cfg.image_dir  # read by the kinds, in the workers too
    if cfg.kind == "process" and os.geteuid() == 0 and "uid" not in cfg.kind_options:
        logging.getLogger("noodle").warning(
            "the process kind isolates nothing and its instances run as root here: run the pool as a service"
            " user (noodle unit --user U), set kinds.process.uid, or use a sandbox kind for untrusted code"
        )
    server = None
    if cfg.metrics:
        from noodle.metrics import MetricsServer

        server = MetricsServer(cfg.name, cfg.metrics)
        logging.getLogger("noodle").info("metrics on http://%s:%d/metrics", *server.address)
    progress: Callable[[dict[str, Any]], None] | None = None
    if sys.stderr.isatty() and cfg.log_format == "text":
        def progress(snap: dict[str, Any]) -> None:
            s = snap["states"]
            sys.stderr.write(f"\r[{cfg.name}] ready {s['ready']}/{snap['pool_size']}  leased {s['leased']}  "
                             f"warming {s['clean'] + s['prepare'] + s['spawn'] + s['terminate']}  "
                             f"abandoned {s['abandoned']}   ")  # fmt: skip
            sys.stderr.flush()
    try:
        return supervisor.run(cfg, progress)
    finally:
        if server is not None:
            server.close()


# -- noodle status -----------------------------------------------------------------

_RATE_COUNTERS = ("acquires", "releases", "spawns", "spawn_failures", "clean_failures", "abandoned")


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000.0
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_status(snap: dict[str, Any], rates: dict[str, float] | None = None) -> str:
    lines = [
        f"pool {snap['pool']} ({snap['kind']}), supervisor pid {snap['supervisor_pid']}, {snap['phase']}"
        f"{', SHUTTING DOWN' if snap['shutting_down'] else ''}, heartbeat {snap['heartbeat_age_s']:.2f} s ago",
        "states:   " + "  ".join(f"{k} {v}" for k, v in snap["states"].items()) + f"   (pool_size {snap['pool_size']})",
        f"ring:     {snap['ring_length']} queued, {snap['waiters']} waiting",
        "counters: " + "  ".join(f"{k} {v}" for k, v in snap["counters"].items() if v),
    ]
    if rates is not None:
        lines.append("rates/s:  " + "  ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    if snap["latency_us"]:
        # percentiles are upper bounds of log2 buckets; the maximum is the real one
        lines.append("latency ms (percentiles: upper bounds of log2 buckets; max: exact)")
    for name, p in snap["latency_us"].items():
        lines.append(f"  {name:9s} n={int(p['count'])}  p50 {_ms(p.get('p50'))}  p90 {_ms(p.get('p90'))}"
                     f"  p99 {_ms(p.get('p99'))}  max {_ms(p.get('max'))}")  # fmt: skip
    return "\n".join(lines)


def _json_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    lat = {name: {**p, "count": int(p["count"])} for name, p in snap["latency_us"].items()}
    return {**snap, "latency_us": lat}


def cmd_status(args: argparse.Namespace) -> int:
    from noodle.client import attach

    tty = sys.stdout.isatty()
    if args.prometheus:
        # printed whether or not the pool runs (noodle_up 0), so a textfile
        # collector's file says so; the exit code says it too
        from noodle.metrics import exposition
        from noodle.segment import Segment

        try:
            seg: Segment | None = Segment.attach(args.name)
        except PoolNotFound:
            seg = None
        try:
            sys.stdout.write(exposition(args.name, seg))
        finally:
            if seg is not None:
                seg.close()
        return EXIT_OK if seg is not None else EXIT_NO_POOL
    with attach(args.name) as pool:
        prev: tuple[float, dict[str, int]] | None = None
        while True:
            now = time.time()
            snap = pool.stats()
            rates = None
            if prev is not None:
                dt = max(now - prev[0], 1e-9)
                rates = {k: (snap["counters"][k] - prev[1][k]) / dt for k in _RATE_COUNTERS}
            prev = (now, dict(snap["counters"]))
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + " UTC"
            if args.json:
                out = _json_snapshot(snap)
                if args.watch:
                    out["time"] = round(now, 3)
                    out["rates"] = rates or {}
                print(json.dumps(out, sort_keys=True))
            elif args.watch:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")
                elif rates is not None:
                    print()  # a blank line between refreshes
                print(f"{stamp} (every {args.watch:g} s)")
                print(format_status(snap, rates))
            else:
                print(format_status(snap))
            sys.stdout.flush()
            if not args.watch:
                return EXIT_OK
            time.sleep(args.watch)


# -- noodle get / exec ---------------------------------------------------------------


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


def exit_status(message: str) -> tuple[int, str]:
    """What ``sys.exit(arg)`` inside the instance means here, as Python does
    it: None -> 0, an integer -> itself (mod 256), anything else -> printed, 1."""
    text = message.strip()
    if text in ("", "None"):
        return 0, ""
    try:
        return int(text) & 0xFF, ""
    except ValueError:
        return 1, text + "\n"


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
                sys.stdout.write(str(getattr(exc, "stdout", "") or ""))
                sys.stderr.write(str(getattr(exc, "stderr", "") or ""))
                if exc.remote_type == "SystemExit":
                    code, text = exit_status(str(exc).partition(": ")[2])
                    sys.stderr.write(text)
                    return code
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
    from noodle.unit import UNITS, UnitOptions

    unit = UNITS[args.unit]
    if args.kind:
        from noodle.kinds import available_kinds
        from noodle.suggest import did_you_mean

        if args.kind not in available_kinds():
            raise ConfigError(f"--kind: unknown kind {args.kind!r}{did_you_mean(args.kind, available_kinds())};"
                              f" registered kinds: {', '.join(available_kinds())}")  # fmt: skip
    opts = UnitOptions(user=args.user or "", group=args.group or "", kind=args.kind or "")
    if args.kind:
        if unit.dropin is None:
            raise ConfigError(f"--kind: the {args.unit} unit has no per-kind drop-ins")
        sys.stdout.write(unit.dropin(opts))
    else:
        sys.stdout.write(unit.render(opts))
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


# -- the parser ------------------------------------------------------------------------


def _configure_status(st: argparse.ArgumentParser) -> None:
    add_name(st)
    out = st.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object (per refresh with --watch)")
    out.add_argument("--prometheus", action="store_true",
                     help="the Prometheus text format, once (for the node exporter's textfile collector)")  # fmt: skip
    st.add_argument("--watch", nargs="?", const=1.0, type=seconds(positive=True), metavar="SECONDS",
                    help="refresh until Ctrl-C, with rates (default: once; SECONDS defaults to 1)")  # fmt: skip


def _configure_get(g: argparse.ArgumentParser) -> None:
    add_name(g)
    g.add_argument("--timeout", type=seconds(), default=None, metavar="SECONDS",
                   help="seconds to wait for an instance (default: the pool's get_timeout)")  # fmt: skip
    g.add_argument("--hold", type=seconds(), default=0.0, metavar="SECONDS",
                   help="seconds to hold the lease before releasing it (default: 0)")  # fmt: skip


def _configure_exec(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("source", help="Python source; '-' reads standard input")
    add_name(ex)
    ex.add_argument("--timeout", type=seconds(), default=None, metavar="SECONDS",
                    help="seconds to wait for an instance (default: the pool's get_timeout)")  # fmt: skip
    ex.add_argument("--run-timeout", type=seconds(positive=True), default=30.0, metavar="SECONDS",
                    help="seconds the code may run (default: 30)")  # fmt: skip


def _configure_demo(d: argparse.ArgumentParser) -> None:
    from noodle.kinds import available_kinds

    add_name(d, os.environ.get(ENV_POOL) or "demo")
    d.add_argument("--pool-size", type=_config_flag("pool_size", int), default=8, metavar="N",
                   help="instances kept warm (default: 8)")  # fmt: skip
    d.add_argument("--kind", default="process", help=f"one of {', '.join(available_kinds())} (default: process)")


def _configure_unit(u: argparse.ArgumentParser) -> None:
    from noodle.kinds import available_kinds
    from noodle.unit import UNITS

    u.add_argument("unit", nargs="?", default="pool", choices=sorted(UNITS),
                   help="which unit (default: pool, the supervisor's noodle@.service)")  # fmt: skip
    u.add_argument("--user", help="User= to run as (default: root; the process kind should not run as root)")
    u.add_argument("--group", help="Group= to run as (default: the user's group)")
    u.add_argument("--kind", help=f"print the drop-in a kind needs instead: {', '.join(available_kinds())}")


register(Command("run", "run a pool's supervisor in the foreground (systemd runs this)", add_run_flags, cmd_run))
register(Command("status", "state counts, counters and latencies, read from shared memory", _configure_status,
                 cmd_status))  # fmt: skip
register(Command("get", "take a lease, print its descriptor as JSON, release it", _configure_get, cmd_get))
register(Command("exec", "run Python source in a warm instance and print its output", _configure_exec, cmd_exec))
register(Command("demo", "start a pool, use it, show its status, stop it (what `make run` does)", _configure_demo,
                 cmd_demo))  # fmt: skip
register(Command("kinds", "list the registered instance kinds", lambda p: None, cmd_kinds))
register(Command("unit", "print a systemd unit (or a kind's drop-in) to install", _configure_unit, cmd_unit))


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("pool-noodle")
    except PackageNotFoundError:
        from noodle import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    p = argparse.ArgumentParser(
        prog="noodle",
        description="A warm pool of single-use instances on one Linux host.",
        epilog=f"Every command that names a pool reads ${ENV_POOL} when --name is not given. "
        "Exit codes: 0 ok, 1 error, 2 usage/config, 3 no such pool, 4 starved, 5 shutting down, "
        "6 the code run by exec raised (exec passes sys.exit statuses through).",
    )
    p.add_argument("--version", action="version", version=f"noodle (pool-noodle) {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in _COMMANDS.values():
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command].run(args)
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
    except BrokenPipeError:
        # the reader went away (`| head`): say nothing, and keep the
        # interpreter's final flush from raising again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:
        return 130
