"""Fleet fixtures: a real nats-server (JetStream, file store in a temporary
directory, loopback, a free port) and hosts made of a real supervisor and a
real `noodle serve`. Teardown asserts the server and every process of every
host are gone."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Supervisor, assert_nothing_left, wait_for

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """nats-server with JetStream on 127.0.0.1; restartable on the same port
    and store (JetStream keeps its streams on disk)."""

    def __init__(self, root: Path, auth: str = "") -> None:
        self.root = root
        self.port = free_port()
        self.store = root / "js"
        self.conf = root / "nats.conf"
        self.conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{self.store}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
            f"{auth}\n"
        )
        self.log_path = root / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        log.close()
        self.pids.append(self.proc.pid)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(up, 30, "nats-server to listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 1.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def nats_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """Parametrize indirectly with an ``authorization { ... }`` block to
    start the server with credentials."""
    root = Path(os.path.join(tmp_path, "nats"))
    root.mkdir()
    srv = NatsServer(root, auth=getattr(request, "param", ""))
    srv.start()
    yield srv
    srv.stop()
    for pid in srv.pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"nats-server {pid} is still running"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def fleet_toml(path: Path, **settings: Any) -> Path:
    lines = []
    for key, value in settings.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, (list, tuple)):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


# short ack wait and few tries, so redelivery and dead-lettering happen in seconds
FAST = {"ack_wait": 2.0, "max_deliver": 3, "status_interval": 0.5, "stale_after": 2.0}


class Host:
    """One stand-in host: its own pool (supervisor) and its own serve."""

    def __init__(self, name: str, run_root: str, tmp: Path, nats: NatsServer, pool_size: int,
                 classes: tuple[str, ...], settings: dict[str, Any]) -> None:  # fmt: skip
        self.name = name
        self.tmp = tmp
        self.nats = nats
        self.pool_size = pool_size
        self.sup = Supervisor(name, run_root, ["--pool-size", str(pool_size)], None, tmp / f"{name}.sup.log")
        self.pool = self.sup.attach()
        self.cfg = fleet_toml(tmp / f"{name}.fleet.toml", classes=list(classes), host=name, **settings)
        self.serve_log = tmp / f"{name}.serve.log"
        self.serve: subprocess.Popen[bytes] | None = None
        self.serve_starts = 0
        self.start_serve()

    def start_serve(self) -> None:
        self.serve_starts += 1
        log = open(self.serve_log, "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "noodle", "serve", "--name", self.name, "--nats", self.nats.url,
               "--config", str(self.cfg), "--log-level", "INFO"]  # fmt: skip
        self.serve = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        log.close()

    def serve_log_text(self) -> str:
        return self.serve_log.read_text(errors="replace")

    def kill_serve(self) -> None:
        assert self.serve is not None
        self.serve.kill()
        self.serve.wait()

    def kill_host(self) -> None:
        """SIGKILL the serve and the supervisor (its workers and instances
        die with it: PDEATHSIG and the next start's sweep)."""
        self.pool.close()
        self.kill_serve()
        self.sup.proc.kill()
        self.sup.proc.wait()
        self.sup.log.close()

    def restart_host(self) -> None:
        """Bring a killed host back as after a reboot: a new supervisor of
        the same name (it sweeps what the dead one left), then its serve."""
        self.sup = Supervisor(self.name, self.sup.run_root, ["--pool-size", str(self.pool_size)], None,
                              self.tmp / f"{self.name}.sup2.log")  # fmt: skip
        self.pool = self.sup.attach()
        self.start_serve()

    def stop(self) -> None:
        try:
            if self.serve is not None and self.serve.poll() is None:
                self.serve.send_signal(signal.SIGTERM)
                try:
                    code = self.serve.wait(60)
                except subprocess.TimeoutExpired:
                    self.serve.kill()
                    self.serve.wait()
                    raise AssertionError(f"serve {self.name} did not stop:\n{self.serve_log_text()}") from None
                assert code == 0, f"serve {self.name} exited {code}:\n{self.serve_log_text()}"
        finally:
            if not self.pool.closed:
                self.pool.close()
            if self.sup.proc.poll() is None:
                code = self.sup.stop()
                assert code == 0, f"supervisor {self.name} exited {code}:\n{self.sup.logtext()}"


@pytest.fixture
def fleet(pool_name: str, run_root: str, tmp_path: Path, nats_server: NatsServer) -> Iterator[Callable[..., Host]]:
    """Factory of hosts on this test's nats-server; at teardown every serve
    and supervisor is stopped and nothing of any host may be left."""
    hosts: list[Host] = []

    def start(pool_size: int = 3, classes: tuple[str, ...] = ("default",), **settings: Any) -> Host:
        merged = {**FAST, **settings}
        host = Host(f"{pool_name}h{len(hosts)}", run_root, tmp_path, nats_server, pool_size, classes, merged)
        hosts.append(host)
        return host

    yield start
    errors = []
    for host in hosts:
        try:
            host.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    for host in hosts:
        try:
            assert_nothing_left(host.name)
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)


def wait_serving(host: Host, timeout: float = 60.0) -> None:
    def up() -> bool:
        exited = host.serve is not None and host.serve.poll() is not None
        return exited or host.serve_log_text().count("serving pool") >= host.serve_starts

    wait_for(up, timeout, f"serve {host.name} to start")
    assert host.serve is not None and host.serve.poll() is None, host.serve_log_text()


def js_run(url: str, fn: Callable[[Any, Any], Any], **connect: Any) -> Any:
    """Run ``await fn(nc, js)`` on a fresh connection (for inspecting streams)."""
    import asyncio

    import nats

    async def main() -> Any:
        nc = await nats.connect(url, **connect)
        try:
            return await fn(nc, nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def stored_results(url: str) -> int:
    """Results ever stored in NOODLE_RESULTS (its last sequence number)."""

    async def last_seq(nc: Any, js: Any) -> int:
        return int((await js.stream_info("NOODLE_RESULTS")).state.last_seq)

    return int(js_run(url, last_seq))


def dead_letters(url: str) -> list[tuple[str, dict[str, str], bytes]]:
    async def read(nc: Any, js: Any) -> list[tuple[str, dict[str, str], bytes]]:
        info = await js.stream_info("NOODLE_DEAD")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            raw = await js.get_msg("NOODLE_DEAD", seq)
            out.append((raw.subject, dict(raw.headers or {}), raw.data or b""))
        return out

    return list(js_run(url, read))


def instance_pool(text: str) -> str:
    """A job can tell which host ran it: its instance's process title is
    'noodle instance <pool> <slot>'."""
    words = text.replace("\0", " ").split()
    return words[words.index("instance") + 1] if "instance" in words else ""


WHO = "open('/proc/self/cmdline').read()"
