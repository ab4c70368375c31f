"""`noodle unit`: the generated units pass `systemd-analyze verify` without a
warning, and `systemd-analyze security --offline=true` rates the process
kind's unit at most 5.0. systemd is not running here: both commands read
the unit files only (scripts/install-deps.sh installs systemd-analyze)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import noodle
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(120)
KINDS = ("process", "jail", "oci", "microvm", "command")


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: run scripts/install-deps.sh (Debian package systemd)")
    return path


def noodle_unit(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "noodle", "unit", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def install(tmp: Path, unit: str, kind: str | None = None) -> Path:
    """A unit directory: noodle@.service and the kind's drop-in."""
    d = tmp / "units"
    d.mkdir(exist_ok=True)
    (d / "noodle@.service").write_text(unit)
    if kind is not None:
        (d / "noodle@.service.d").mkdir(exist_ok=True)
        (d / "noodle@.service.d" / f"{kind}.conf").write_text(noodle_unit("--kind", kind))
    return d


def verify(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:", SYSTEMD_LOG_LEVEL="notice")
    return subprocess.run([analyze(), "verify", "noodle@pool.service"], cwd=unit_dir, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def exposure(tmp: Path, unit_dir: Path) -> float:
    """`security --offline=true` with the drop-ins applied: an image root
    holding the unit under /etc/systemd/system."""
    root = tmp / "root"
    etc = root / "etc" / "systemd" / "system"
    shutil.copytree(unit_dir, etc, dirs_exist_ok=True)
    res = subprocess.run([analyze(), "security", "--offline=true", f"--root={root}", "noodle@pool.service"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    m = re.search(r"Overall exposure level for noodle@pool\.service: (\d+\.\d)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


def test_unit_contents() -> None:
    unit = noodle_unit("--user", "noodle", "--group", "noodle")
    unit_sec, _, service = unit.partition("[Service]")
    assert "StartLimitIntervalSec=60" in unit_sec and "StartLimitBurst=5" in unit_sec
    assert "StartLimit" not in service
    for line in ("Type=notify", "KillMode=mixed", "NotifyAccess=main", "RestartPreventExitStatus=2", "UMask=0007",
                 "User=noodle", "Group=noodle", "WatchdogSec=", "Delegate=yes"):  # fmt: skip
        assert f"\n{line}" in service, line
    exec_start = re.search(r"^ExecStart=(\S+) ", unit, re.M)
    assert exec_start and os.path.isabs(exec_start.group(1)) and os.access(exec_start.group(1), os.X_OK)
    assert exec_start.group(1) == os.path.realpath(exec_start.group(1))
    assert "PrivateIPC" in unit and "PrivateDevices" in unit
    assert not re.search(r"^Private(IPC|Devices)=yes", unit, re.M)
    assert "User=" not in noodle_unit()


@pytest.mark.parametrize("user", [None, "noodle"])
def test_verify_and_security_of_the_process_unit(tmp_path: Path, user: str | None) -> None:
    unit = noodle_unit(*(["--user", user, "--group", "noodle"] if user else []))
    d = install(tmp_path, unit, "process")
    res = verify(d)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr + res.stdout
    score = exposure(tmp_path, d)
    print(f"process kind, user {user or 'root'}: exposure {score}")
    assert score <= 5.0


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "process"])
def test_verify_and_security_with_each_drop_in(tmp_path: Path, kind: str) -> None:
    d = install(tmp_path, noodle_unit(), kind)
    dropin = (d / "noodle@.service.d" / f"{kind}.conf").read_text()
    assert "[Service]" in dropin
    res = verify(d)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr + res.stdout
    score = exposure(tmp_path, d)
    print(f"{kind} kind: exposure {score}")
    assert 0 < score < 10


def test_verify_catches_a_bad_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    d = install(tmp_path, noodle_unit().replace("UMask=0007", "UMaks=0007"))
    res = verify(d)
    assert "UMaks" in res.stderr


def test_supervisor_warns_when_the_process_kind_runs_as_root(supervisor) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs the supervisor as root (the project's tests run as root)")
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    pool.close()
    assert sup.stop() == 0
    assert "process kind isolates nothing" in sup.logtext()


def bounding_set(kind: str) -> str:
    """The unit's and the kind's drop-in's CapabilityBoundingSet, as setpriv's --bounding-set."""
    caps: set[str] = set()
    for text in (noodle_unit(), noodle_unit("--kind", kind)):
        for m in re.finditer(r"^CapabilityBoundingSet=(.*)$", text, re.M):
            caps |= {c.lower().removeprefix("cap_") for c in m.group(1).split()}
    return ",".join(["-all", *(f"+{c}" for c in sorted(caps))])


@pytest.mark.parametrize(("kind", "config"), [
    ("process", ""), ("jail", ""), ("oci", '[kinds.oci]\nruntime = "runc"\n'),
    ("oci", '[kinds.oci]\nruntime = "crun"\n'), ("oci", '[kinds.oci]\nruntime = "runsc"\n'), ("microvm", ""),
])  # fmt: skip
@pytest.mark.timeout(300)
def test_kinds_run_with_exactly_the_units_capabilities(pool_name: str, tmp_path: Path, kind: str,
                                                        config: str) -> None:  # fmt: skip
    """What systemd would impose on capabilities, imposed by setpriv: the
    unit's bounding set plus the kind's drop-in, and no_new_privs. (The
    system-call filter and the mount protections need systemd itself, which
    does not run here.)"""
    if os.geteuid() != 0:
        pytest.fail("the sandbox kinds need root (the project's tests run as root)")
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv missing: install util-linux"
    cfg = tmp_path / "pool.toml"
    cfg.write_text(f'kind = "{kind}"\npool_size = 1\n{config}')
    log = tmp_path / "sup.log"
    run_root = tmp_path / "r"
    run_root.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as f:
        proc = subprocess.Popen([setpriv, f"--bounding-set={bounding_set(kind)}", "--no-new-privs", sys.executable,
                                 "-m", "noodle", "run", "--name", pool_name, "--run-dir", str(run_root), "--config",
                                 str(cfg)], cwd=REPO, env=env, stdout=f, stderr=f)  # fmt: skip
    try:

        def attach() -> object:
            if proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {proc.returncode}:\n{log.read_text()}")
            try:
                return noodle.attach(pool_name)
            except noodle.PoolNotFound:
                return None

        pool = wait_for(attach, 60, "the pool")
        with pool.get(timeout=200) as lease:
            if kind == "microvm":  # a busybox guest: no Python
                assert lease.instance.exec(["/bin/echo", "ok"]).stdout.strip() == "ok"
            else:
                assert lease.instance.run("1 + 1").result == 2
        pool.close()
    finally:
        proc.terminate()
        code = proc.wait(60)
    assert code == 0, log.read_text()
