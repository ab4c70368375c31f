"""Pool configuration: a TOML file (``--config``) overridden by flags.

TOML uses the flag names with underscores at top level (``pool_size = 8``)
and the kind's own options in ``[kinds.<kind>]``. Unknown keys and bad
values raise ConfigError naming the key.
"""

from __future__ import annotations

import grp
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from noodle.errors import ConfigError
from noodle.layout import DEFAULT_DESCRIPTOR, MAX_DESCRIPTOR, MAX_POOL_SIZE
from noodle.queues import STAGES
from noodle.segment import validate_name
from noodle.suggest import did_you_mean


@dataclass(frozen=True)
class Config:
    name: str = "default"
    pool_size: int = 8
    kind: str = "process"
    workers: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 1))
    max_concurrency: int = 0  # 0: no bound beyond the worker count
    check_health: bool = False
    health_on_get: bool = False
    get_timeout: float = 5.0
    drain_timeout: float = 10.0
    abandon_cooldown: float = 60.0
    step_timeout: float = 60.0
    worker_timeout: float = 15.0
    max_failures: int = 5
    refill_nice: int = 10  # autogroup nice of the pool's session: refill yields to jobs (noodle.host.sched)
    descriptor_size: int = DEFAULT_DESCRIPTOR
    run_dir: str = ""
    group: str = ""
    log_level: str = "INFO"
    log_format: str = "text"  # text, or json: one object per line
    metrics: str = ""  # HOST:PORT to serve Prometheus /metrics from the supervisor
    image_dir: str = ""  # where `noodle image build` put the sandbox images (default: images.DEFAULT_ROOT)
    kinds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def kind_options(self) -> Mapping[str, Any]:
        return self.kinds.get(self.kind, {})

    @property
    def gid(self) -> int | None:
        if not self.group:
            return None
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            if self.group.isdigit():
                return int(self.group)
            raise ConfigError(f"group: no such group {self.group!r}") from None

    @property
    def mode(self) -> int:
        """Owner-only by default; the configured group may read and write."""
        return 0o660 if self.group else 0o600

    def resolved_run_dir(self) -> str:
        if self.run_dir:
            return os.path.join(self.run_dir, self.name)
        return os.path.join(default_run_root(), self.name)


def default_run_root() -> str:
    # systemd's RuntimeDirectory= (a colon-separated list): the unit's /run/noodle
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return runtime
    if os.geteuid() == 0:
        return "/run/noodle"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/noodle-{os.getuid()}"
    return os.path.join(base, "noodle")


_NUMBER = (int, float)
LOG_FORMATS = ("text", "json")


def _check(key: str, value: Any) -> Any:
    """Type- and range-check one top-level value; returns it normalised."""

    def want(cond: bool, what: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {what}, got {value!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, _NUMBER) and not isinstance(v, bool)

    if key == "name":
        want(isinstance(value, str), "expected a string")
        validate_name(value)
    elif key == "pool_size":
        want(is_int(value) and 1 <= value <= MAX_POOL_SIZE, f"expected an integer in 1..{MAX_POOL_SIZE}")
    elif key in ("kind", "run_dir", "group", "log_level", "log_format", "metrics", "image_dir"):
        want(isinstance(value, str), "expected a string")
        if key == "log_format":
            want(value in LOG_FORMATS, f"expected one of {', '.join(LOG_FORMATS)}")
        if key == "metrics" and value:
            from noodle.metrics import parse_address

            parse_address(value)
        if key == "image_dir" and value:
            want(os.path.isabs(value), "expected an absolute path")
        if key == "kind":
            want(bool(value), "expected a kind name")
        if key == "log_level":
            want(value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "expected DEBUG, INFO, WARNING or ERROR")
    elif key == "workers":
        if is_int(value):
            want(1 <= value <= 64, "expected 1..64 workers per stage")
            return dict.fromkeys(STAGES, value)
        want(isinstance(value, Mapping), "expected an integer or a table of stage = count")
        out = dict.fromkeys(STAGES, 1)
        for stage, n in value.items():
            if stage not in STAGES:
                raise ConfigError(f"workers.{stage}: unknown stage (stages: {', '.join(STAGES)})")
            if not (is_int(n) and 1 <= n <= 64):
                raise ConfigError(f"workers.{stage}: expected 1..64, got {n!r}")
            out[stage] = n
        return out
    elif key == "max_concurrency":
        want(is_int(value) and 0 <= value <= 1024, "expected an integer in 0..1024 (0 = unbounded)")
    elif key in ("check_health", "health_on_get"):
        want(isinstance(value, bool), "expected true or false")
    elif key in ("get_timeout", "drain_timeout", "abandon_cooldown", "step_timeout", "worker_timeout"):
        want(is_num(value) and 0 <= value <= 86400, "expected seconds in 0..86400")
        if key in ("step_timeout", "worker_timeout"):
            want(value > 0, "expected a positive number of seconds")
        return float(value)
    elif key == "max_failures":
        want(is_int(value) and 1 <= value <= 100, "expected an integer in 1..100")
    elif key == "refill_nice":
        want(is_int(value) and 0 <= value <= 19, "expected a nice value in 0..19 (0: refill competes with jobs)")
    elif key == "descriptor_size":
        want(is_int(value) and 64 <= value <= MAX_DESCRIPTOR, f"expected bytes in 64..{MAX_DESCRIPTOR}")
    elif key == "kinds":
        want(isinstance(value, Mapping), "expected a table of [kinds.<kind>] tables")
        for kname, opts in value.items():
            if not isinstance(opts, Mapping):
                raise ConfigError(f"kinds.{kname}: expected a table, got {opts!r}")
        return {k: dict(v) for k, v in value.items()}
    return value


_KEYS = {f.name for f in fields(Config)}
check_value = _check  # the flags of `noodle run` are checked by the same rules


def from_mapping(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """Apply ``data`` over ``base``; every key is checked."""
    updates: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise ConfigError(f"{key}: unknown setting{did_you_mean(key, _KEYS)} (known: {', '.join(sorted(_KEYS))})")
        updates[key] = _check(key, value)
    cfg = replace(base or Config(), **updates)
    return cfg


def load_file(path: str) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc}") from None


def load(path: str | None, overrides: Mapping[str, Any]) -> Config:
    """The file (if any), then flag overrides (None means not given)."""
    cfg = from_mapping(load_file(path)) if path else Config()
    return from_mapping({k: v for k, v in overrides.items() if v is not None}, cfg)


def validate_kind(cfg: Config) -> None:
    """Resolve the selected kind and check every ``[kinds.*]`` table, selected
    or not, so a mistake in a table waiting to be used is found now
    (raises UnknownKind/ConfigError)."""
    from noodle.errors import UnknownKind
    from noodle.kinds import available_kinds, load_kind

    load_kind(cfg.kind)
    for name, options in cfg.kinds.items():
        try:
            kind_cls = load_kind(name)
        except UnknownKind as exc:
            raise ConfigError(f"kinds.{name}: {exc}{did_you_mean(name, available_kinds())}") from None
        kind_cls.validate_options(options)
