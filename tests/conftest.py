"""Shared fixtures: a unique pool name per test, real supervisors, and a
teardown that fails the test if any process, segment or queue of its pool
is left behind."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def pool_processes(name: str) -> list[tuple[int, str]]:
    """Processes whose title names this pool: supervisor, workers, zygote,
    instances (every process we start is titled 'noodle <role> <pool> ...')."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        words = raw.replace(b"\0", b" ").decode(errors="replace").split()
        if state != "Z" and "noodle" in words and name in words:
            out.append((int(entry), " ".join(words)))
    return out


def process_parents(include_zombies: bool = True) -> dict[int, list[int]]:
    """ppid -> child pids, one pass over /proc (for process-tree checks)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if include_zombies or fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """Every process below ``root``, zombies included."""
    children = process_parents()
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pool_names_left(name: str) -> list[str]:
    left = []
    if os.path.exists(f"/dev/shm/noodle.{name}"):
        left.append(f"/dev/shm/noodle.{name}")
    if os.path.isdir("/dev/mqueue"):
        left += [f"/dev/mqueue/{q}" for q in os.listdir("/dev/mqueue") if q.startswith(f"noodle.{name}.")]
    return left


def zombies_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def assert_nothing_left(name: str, wait: float = 10.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        procs, names = pool_processes(name), pool_names_left(name)
        if not procs and not names:
            return
        if time.monotonic() > deadline:
            for pid, _ in procs:  # do not let one test's leak break the next
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise AssertionError(f"pool {name!r} left behind: processes {procs}, names {names}")
        time.sleep(0.05)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the chaos suite's long soak (many more rounds)")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def pool_name(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t{os.getpid()}x{next(_counter)}"
    yield name
    assert_nothing_left(name)


@pytest.fixture
def run_root() -> Iterator[str]:
    # short: Unix socket paths must stay under 108 bytes
    d = tempfile.mkdtemp(prefix="nt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Supervisor:
    """A real `noodle run` in a child process."""

    def __init__(self, name: str, run_root: str, args: list[str], config: str | None, log_path: Path,
                 own_session: bool = False) -> None:  # fmt: skip
        self.name = name
        self.run_root = run_root
        self.log_path = log_path
        cmd = [sys.executable, "-m", "noodle", "run", "--name", name, "--run-dir", run_root, *args]
        if config:
            cfg = Path(run_root) / "pool.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        self.log = open(log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
                                     start_new_session=own_session)  # own_session: as systemd starts a service

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logtext(self) -> str:
        return self.log_path.read_text(errors="replace")

    def attach(self, timeout: float = 30.0) -> Any:
        import noodle

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.logtext()}")
            try:
                return noodle.attach(self.name)
            except noodle.PoolNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"supervisor did not stop within {timeout} s:\n{self.logtext()}") from None
        finally:
            self.log.close()
        return code


@pytest.fixture
def bare_pool(pool_name: str) -> Iterator[Any]:
    """A segment and queues owned by this process, as a supervisor makes
    them, so `noodle.attach` works without workers (nothing is refilled)."""
    from noodle import queues
    from noodle.segment import Segment

    seg = Segment.create(pool_name, 4, "process")
    seg.heartbeat()
    qs = queues.create_all(pool_name)
    yield seg
    for q in qs.values():
        q.close()
    queues.unlink_all(pool_name)
    seg.close()
    seg.unlink()


@contextlib.contextmanager
def running_pool(name: str, pool_size: int, log_dir: Path) -> Iterator[Any]:
    """A real pool for a module's tests, attached and full; afterwards the
    supervisor must stop with 0 and nothing of the pool (its run directory
    included) may be left."""
    run_dir = tempfile.mkdtemp(prefix="nm", dir="/tmp")  # short: socket paths stay under 108 bytes
    sup = Supervisor(name, run_dir, ["--pool-size", str(pool_size)], None, log_dir / "supervisor.log")
    try:
        pool = sup.attach()
        wait_full(pool)
        yield pool
        pool.close()
        assert sup.stop() == 0, sup.logtext()
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        assert_nothing_left(name)


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def attach_started(name: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> Any:
    """Attach to pool ``name`` once the supervisor ``proc`` (logging to
    ``log_path``) has created it; fails at once if that supervisor exits."""
    import noodle

    def attempt() -> Any:
        if proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            return noodle.attach(name)
        except noodle.PoolNotFound:
            return None

    return wait_for(attempt, timeout, f"pool {name} to start")


def wait_full(pool: Any, timeout: float = 30.0) -> dict[str, Any]:
    return wait_for(lambda: (s := pool.stats())["states"]["ready"] == pool.pool_size and s, timeout,
                    f"pool {pool.name} to be full")  # fmt: skip


@pytest.fixture
def clients(pool_name: str, tmp_path: Path) -> Iterator[Any]:
    """Chaos client processes for this test's pool; killed at teardown."""
    from tests.chaos.test_chaos import Clients

    c = Clients(pool_name, tmp_path)
    yield c
    c.kill_all()


@pytest.fixture
def supervisor(pool_name: str, run_root: str, tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    """Factory: start a supervisor for this test's pool; stopped (exit 0
    asserted) at teardown, before the leak check of `pool_name`."""
    started: list[Supervisor] = []

    def start(*args: str, config: str | None = None, name: str | None = None, own_session: bool = False) -> Supervisor:
        log_path = tmp_path / f"supervisor{len(started)}.log"
        sup = Supervisor(name or pool_name, run_root, list(args), config, log_path, own_session)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        if sup.proc.poll() is None:
            code = sup.stop()
            assert code == 0, f"supervisor exited with {code}:\n{sup.logtext()}"
        else:
            sup.log.close()
