"""The fleet's sub-commands, registered into ``noodle``'s parser.

``noodle serve``, ``noodle submit``, ``noodle status --nats URL`` and
``noodle unit --serve``. A parser sets ``fleet_cmd`` on the namespace when a
fleet command (or a fleet flag of a shared command) was given; ``noodle``
runs that instead of its own handler. Nothing here imports nats-py until a
fleet command runs, so ``noodle`` works without the ``fleet`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_STARVED, EXIT_REMOTE = 0, 1, 4, 6


class _FleetFlag(argparse.Action):
    """Stores its value and routes the command to a fleet handler."""

    def __init__(self, *args: Any, handler: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: str | Sequence[Any] | None,
                 option_string: str | None = None) -> None:  # fmt: skip
        setattr(ns, self.dest, True if self.nargs == 0 else values)
        ns.fleet_cmd = self.handler


def _nats_flags(p: argparse.ArgumentParser, handler: Any = None) -> None:
    kw: dict[str, Any] = {"action": _FleetFlag, "handler": handler} if handler else {}
    p.add_argument("--nats", metavar="URL", help="NATS server URL(s), comma-separated (no credentials: use the"
                   " fleet config file or NOODLE_NATS_* variables)", **kw)  # fmt: skip
    p.add_argument("--fleet-config", metavar="FILE", help="fleet TOML file (servers, classes, credentials)")


SERVE_HELP = "take jobs from NATS JetStream into this host's pool (one per host and pool)"
SUBMIT_HELP = "run Python source on the fleet and print its output"


def register(sub: Any) -> None:
    """Add the fleet's commands and flags to ``noodle``'s sub-parsers."""
    _configure_serve(sub.add_parser("serve", help=SERVE_HELP))
    _configure_submit(sub.add_parser("submit", help=SUBMIT_HELP))
    if "status" in sub.choices:
        _nats_flags(sub.choices["status"], handler=cmd_status)
    if "unit" in sub.choices:
        _serve_flag(sub.choices["unit"])


def register_commands(cli: Any) -> None:
    """The same through a command registry (``cli.register(cli.Command(name,
    help, configure, run))``, ``cli.command(name)``): adds serve and submit,
    and wraps status and unit with their fleet flags."""
    Command = cli.Command
    cli.register(Command("serve", SERVE_HELP, _configure_serve, _dispatch(None)))
    cli.register(Command("submit", SUBMIT_HELP, _configure_submit, _dispatch(None)))
    for name, extra in (("status", lambda p: _nats_flags(p, handler=cmd_status)), ("unit", _serve_flag)):
        base = cli.command(name)

        def configure(p: argparse.ArgumentParser, base: Any = base, extra: Any = extra) -> None:
            base.configure(p)
            extra(p)

        cli.register(Command(name, base.help, configure, _dispatch(base.run)))
    units = importlib.import_module("noodle.unit")
    if hasattr(units, "register") and hasattr(units, "Unit"):
        units.register("serve", units.Unit("noodle-serve@.service", lambda opts: _serve_unit_text()))


def _dispatch(fallback: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        handler = getattr(args, "fleet_cmd", None) or fallback
        return int(handler(args))

    return run


def _serve_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve", nargs=0, action=_FleetFlag, handler=cmd_unit,
                   help="print noodle-serve@.service (the fleet member) instead")  # fmt: skip


def _configure_serve(s: argparse.ArgumentParser) -> None:
    s.add_argument("--name", required=True, help="the local pool to run jobs in")
    s.add_argument("--config", dest="fleet_config", metavar="FILE",
                   help="fleet TOML file (servers, classes, credentials, ack_wait, max_deliver, ...)")  # fmt: skip
    s.add_argument("--nats", metavar="URL", help="NATS server URL(s), comma-separated (overrides the file)")
    s.add_argument("--classes", help="comma-separated pool classes this host serves (default: 'default')")
    s.add_argument("--host", help="this host's name in the fleet view (default: the host name)")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(fleet_cmd=cmd_serve)


def _configure_submit(sm: argparse.ArgumentParser) -> None:
    sm.add_argument("source", help="Python source; '-' reads standard input")
    _nats_flags(sm)
    sm.add_argument("--class", dest="pool_class", help="pool class (default: the first configured, 'default')")
    sm.add_argument("--job-id", help="your own job id: submitting it again runs it once")
    sm.add_argument("--run-timeout", type=float, default=None, help="seconds the code may run")
    sm.add_argument("--wait", type=float, default=None, help="seconds to wait for the result (default: for ever)")
    sm.set_defaults(fleet_cmd=cmd_submit)


def _cfg(args: argparse.Namespace, **overrides: Any) -> Any:
    from noodle.fleet import config

    return config.load(getattr(args, "fleet_config", None), getattr(args, "nats", None), **overrides)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    # stopped while still starting (nothing fetched yet): a clean exit; the
    # serve's own handlers take over once it runs
    signal.signal(signal.SIGTERM, _exit_quietly)
    from noodle import log as logmod
    from noodle.fleet import serve

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    cfg = _cfg(args, classes=classes, host=args.host)
    logmod.setup(args.log_level)
    return serve.run(args.name, cfg)


def cmd_submit(args: argparse.Namespace) -> int:
    from noodle.errors import InstanceError
    from noodle.fleet.client import JobFailed
    from noodle.fleet.executor import Executor

    source = sys.stdin.read() if args.source == "-" else args.source
    cfg = _cfg(args)
    ex = Executor(list(cfg.servers), pool_class=args.pool_class, timeout=args.run_timeout,
                  config=getattr(args, "fleet_config", None))  # fmt: skip
    try:
        fut = ex.submit_source(source, job_id=args.job_id)
        try:
            res = fut.result(args.wait)
        except TimeoutError:
            print(f"noodle: no result within {args.wait} s (the job stays queued)", file=sys.stderr)
            return EXIT_STARVED
        except InstanceError as exc:
            sys.stderr.write(exc.remote_traceback or f"{exc}\n")
            return EXIT_REMOTE
        except JobFailed as exc:
            print(f"noodle: {exc}", file=sys.stderr)
            return EXIT_ERROR
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        if res.result is not None:
            print(res.result)
        return EXIT_OK
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def cmd_status(args: argparse.Namespace) -> int:
    from noodle.fleet import status

    cfg = _cfg(args)
    while True:
        hosts = asyncio.run(status.read(cfg))
        if getattr(args, "json", False):
            print(json.dumps(hosts, sort_keys=True))
        else:
            if getattr(args, "watch", None):
                sys.stdout.write("\x1b[H\x1b[2J")
            print(status.format_hosts(hosts))
        sys.stdout.flush()
        if not getattr(args, "watch", None):
            return EXIT_OK
        time.sleep(args.watch)


def _serve_unit_text() -> str:
    import shutil

    from noodle.fleet.unit import serve_unit

    return serve_unit(shutil.which("noodle") or "/usr/local/bin/noodle")


def cmd_unit(args: argparse.Namespace) -> int:
    sys.stdout.write(_serve_unit_text())
    return EXIT_OK


def _self_register() -> None:
    # with a command registry in noodle.cli, importing this module (listed
    # among its command modules) registers the fleet's commands
    cli = sys.modules.get("noodle.cli")
    if cli is not None and hasattr(cli, "Command") and hasattr(cli, "command"):
        register_commands(cli)


_self_register()
