"""Credentials: user/password, token and nkey, from the fleet config file
(the serve) or the environment (the caller); never from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nkeys
import pytest

from noodle.errors import ConfigError
from noodle.fleet import config
from tests.conftest import REPO
from tests.fleet.conftest import Host, NatsServer, fleet_toml, wait_serving

SEED = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
PUBLIC = nkeys.from_seed(bytearray(SEED)).public_key.decode()

MODES = {
    "user": ('authorization { user: "fleet", password: "s3cret-pw" }',
             {"user": "fleet", "password": "s3cret-pw"},
             {"NOODLE_NATS_USER": "fleet", "NOODLE_NATS_PASSWORD": "s3cret-pw"},
             {"NOODLE_NATS_USER": "fleet", "NOODLE_NATS_PASSWORD": "wrong"}),
    "token": ('authorization { token: "t0ken-abc" }', {"token": "t0ken-abc"},
              {"NOODLE_NATS_TOKEN": "t0ken-abc"}, {"NOODLE_NATS_TOKEN": "nope"}),
    "nkey": (f'authorization {{ users: [ {{ nkey: "{PUBLIC}" }} ] }}', {"nkey_seed": "SEEDFILE"},
             {"NOODLE_NATS_NKEY_SEED": "SEEDFILE"}, {}),
}  # fmt: skip


@pytest.mark.parametrize("nats_server", [m[0] for m in MODES.values()], ids=list(MODES), indirect=True)
def test_credentials(nats_server: NatsServer, fleet: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from noodle.fleet import Executor
    from noodle.fleet.wire import Unreachable

    mode = next(k for k, m in MODES.items() if m[0] in nats_server.conf.read_text())
    _, file_creds, env_creds, wrong_env = MODES[mode]
    seed = tmp_path / "user.nk"
    seed.write_bytes(SEED)
    seed.chmod(0o600)

    def fill(d: dict[str, str]) -> dict[str, str]:
        return {k: (str(seed) if v == "SEEDFILE" else v) for k, v in d.items()}

    host: Host = fleet(pool_size=2, **fill(file_creds))  # the serve reads them from its config file
    wait_serving(host)
    for k, v in fill(env_creds).items():
        monkeypatch.setenv(k, v)  # the caller from its environment
    with Executor(nats_server.url) as ex:
        assert ex.submit(pow, 3, 3).result(60) == 27
    for k in env_creds:
        monkeypatch.delenv(k)
    with pytest.raises(Unreachable):
        Executor(nats_server.url)  # no credentials
    if wrong_env:
        for k, v in wrong_env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(Unreachable):
            Executor(nats_server.url)


def test_credentials_never_on_the_command_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "noodle", "submit", "--nats", "nats://fleet:pw@127.0.0.1:4222", "1"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert "credentials do not go in the URL" in out.stderr
    with pytest.raises(ConfigError, match="credentials"):
        config.load(None, "nats://u@127.0.0.1:1")


def test_a_readable_secret_file_is_refused(tmp_path: Path) -> None:
    cfg = fleet_toml(tmp_path / "f.toml", user="fleet", password="pw")
    assert config.load(str(cfg)).user == "fleet"  # 0600: fine
    cfg.chmod(0o644)
    with pytest.raises(ConfigError, match="every user can read"):
        config.load(str(cfg))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = [('classes = ["a.b"]', "classes"), ("ack_wait = -1", "ack_wait"), ("max_deliver = 0", "max_deliver"),
             ("bogus = 1", "bogus"), ('servers = "http://x"', "servers"), ('token = "t"\nuser = "u"', "token")]
    for body, key in cases:
        p = tmp_path / "c.toml"
        p.write_text(body)
        p.chmod(0o600)
        with pytest.raises(ConfigError, match=key):
            config.load(str(p))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = fleet_toml(tmp_path / "c.toml", user="a", password="b", servers=["nats://10.0.0.1:4222"])
    monkeypatch.setenv("NOODLE_NATS_TOKEN", "tok")
    monkeypatch.setenv("NOODLE_NATS_URL", "nats://127.0.0.1:5,nats://127.0.0.1:6")
    cfg = config.load(str(p))
    assert (cfg.user, cfg.password, cfg.token) == ("", "", "tok")
    assert cfg.servers == ("nats://127.0.0.1:5", "nats://127.0.0.1:6")
    assert cfg.connect_options() == {"token": "tok"}
