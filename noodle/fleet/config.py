"""Fleet settings and NATS credentials.

Settings come from a TOML file (top-level keys, the names below) and a few
flags; credentials come only from that file or from the environment, never
from the command line, where every user of the host can read them in
``/proc/*/cmdline``::

    servers = ["nats://nats1:4222", "nats://nats2:4222"]
    classes = ["default", "gpu"]      # the pool classes this host serves
    user = "fleet"                    # or token = "...", or nkey_seed = "/etc/noodle/fleet.nk"
    password = "..."

Environment: ``NOODLE_NATS_URL``, ``NOODLE_NATS_USER``, ``NOODLE_NATS_PASSWORD``,
``NOODLE_NATS_TOKEN``, ``NOODLE_NATS_NKEY_SEED`` (a seed file's path) and
``NOODLE_FLEET_CONFIG`` (the file, for clients that take no ``--config``).
A file that holds a secret must not be readable by other users.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit

from noodle.errors import ConfigError

# subject tokens and KV keys: no dots, wildcards or spaces inside a token
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STREAM_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
SECRET_KEYS = ("password", "token")


@dataclass(frozen=True)
class FleetConfig:
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    classes: tuple[str, ...] = ("default",)
    host: str = ""  # the fleet view's key for this host; default: the host name
    stream: str = "NOODLE_JOBS"
    results_stream: str = "NOODLE_RESULTS"
    dead_stream: str = "NOODLE_DEAD"
    bucket: str = "noodle_fleet"
    ack_wait: float = 30.0  # a job not acked (nor in-progress-acked) this long goes to another host
    max_deliver: int = 5
    duplicate_window: float = 120.0  # a job id seen again within this is dropped by the stream
    results_max_age: float = 3600.0
    max_batch: int = 64  # jobs fetched at once, at most (and never more than ready instances)
    status_interval: float = 1.0
    stale_after: float = 5.0
    job_timeout: float = 300.0  # a job without its own timeout may run this long
    user: str = ""
    password: str = ""
    token: str = ""
    nkey_seed: str = ""  # path of an nkey seed file

    @property
    def host_key(self) -> str:
        return self.host or socket.gethostname().split(".")[0]

    def secret(self) -> bool:
        return any(getattr(self, k) for k in SECRET_KEYS)

    def connect_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password
        if self.token:
            opts["token"] = self.token
        if self.nkey_seed:
            opts["nkeys_seed"] = self.nkey_seed
        return opts


_KEYS = {f.name for f in fields(FleetConfig)}
_FLOATS = ("ack_wait", "duplicate_window", "results_max_age", "status_interval", "stale_after", "job_timeout")
_INTS = {"max_deliver": (1, 1000), "max_batch": (1, 4096)}
_STRS = ("host", "user", "password", "token", "nkey_seed")
_ENV = {"NOODLE_NATS_USER": "user", "NOODLE_NATS_PASSWORD": "password", "NOODLE_NATS_TOKEN": "token",
        "NOODLE_NATS_NKEY_SEED": "nkey_seed"}  # fmt: skip


def check_url(url: str, where: str = "--nats") -> str:
    """A server URL; refused if it carries credentials (they belong in the
    config file or the environment)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in ("nats", "tls", "ws", "wss"):
        raise ConfigError(f"{where}: expected nats://HOST:PORT, got {url!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ConfigError(f"{where}: credentials do not go in the URL (visible to every user in the process list);"
                          " put user/password, token or nkey_seed in the fleet config file or NOODLE_NATS_*")
    if not parts.hostname:
        raise ConfigError(f"{where}: no host in {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _check(key: str, value: Any) -> Any:
    def want(cond: bool, what: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {what}, got {value!r}")

    if key == "servers":
        if isinstance(value, str):
            value = [value]
        want(isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value),
             "expected a server URL or a list of them")  # fmt: skip
        return tuple(check_url(v, key) for v in value)
    if key == "classes":
        want(isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value),
             "expected a non-empty list of class names")  # fmt: skip
        for v in value:
            if not TOKEN_RE.match(v):
                raise ConfigError(f"classes: {v!r} is not a class name (letters, digits, '_' and '-', 1..64)")
        return tuple(dict.fromkeys(value))
    if key in ("stream", "results_stream", "dead_stream", "bucket"):
        want(isinstance(value, str) and bool(_STREAM_RE.match(value)), "expected a name of [A-Za-z0-9_-], 1..32")
    elif key in _FLOATS:
        want(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 86400 * 30,
             "expected a positive number of seconds")  # fmt: skip
        return float(value)
    elif key in _INTS:
        lo, hi = _INTS[key]
        want(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
             f"expected an integer in {lo}..{hi}")  # fmt: skip
    elif key in _STRS:
        want(isinstance(value, str), "expected a string")
        if key == "host" and value:
            want(bool(TOKEN_RE.match(value)), "expected a name of [A-Za-z0-9_-], 1..64")
    return value


def from_mapping(data: Mapping[str, Any], base: FleetConfig | None = None, where: str = "") -> FleetConfig:
    updates: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise ConfigError(f"{where}{key}: unknown setting (known: {', '.join(sorted(_KEYS))})")
        updates[key] = _check(key, value)
    cfg = replace(base or FleetConfig(), **updates)
    if cfg.token and cfg.user:
        raise ConfigError(f"{where}give either user/password or token, not both")
    if cfg.password and not cfg.user:
        raise ConfigError(f"{where}password without user")
    return cfg


def load_file(path: str) -> FleetConfig:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"fleet config: no such file {path!r}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"fleet config {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"fleet config {path}: cannot read: {exc}") from None
    cfg = from_mapping(data, where=f"{path}: ")
    if cfg.secret() and mode & stat.S_IROTH:
        raise ConfigError(f"{path} holds a password or token but every user can read it; chmod o-r {path}")
    return cfg


def load(path: str | None = None, servers: str | None = None, **overrides: Any) -> FleetConfig:
    """The file (``path``, else ``$NOODLE_FLEET_CONFIG``), then credentials
    from the environment, then the server URL and other flags."""
    path = path or os.environ.get("NOODLE_FLEET_CONFIG") or None
    cfg = load_file(path) if path else FleetConfig()
    env = {key: os.environ[var] for var, key in _ENV.items() if os.environ.get(var)}
    if env.get("token"):
        cfg = replace(cfg, user="", password="")
    if env.get("user"):
        cfg = replace(cfg, token="")
    cfg = from_mapping(env, cfg, where="environment: ")
    url = servers or os.environ.get("NOODLE_NATS_URL")
    if url:
        cfg = replace(cfg, servers=tuple(check_url(u.strip()) for u in url.split(",") if u.strip()))
    return from_mapping({k: v for k, v in overrides.items() if v is not None}, cfg)
