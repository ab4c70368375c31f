"""The wheel and sdist as a new user gets them: a wheel installed into a
fresh venv outside the checkout runs `noodle --version`, `noodle kinds`,
finds its image build scripts, and runs a jail pool. The jail image is
not rebuilt here: the pool reads an already built one through
$NOODLE_IMAGE_DIR (the checkout's images/build, or the data directory)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_nothing_left

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert res.returncode == 0, f"{argv}: {res.stdout}\n{res.stderr}"
    return res  # type: ignore[no-any-return]


def image_root() -> str:
    for root in (os.environ.get("NOODLE_IMAGE_DIR", ""), "/var/lib/noodle/images", str(REPO / "images" / "build")):
        if root and os.path.isfile(os.path.join(root, "jail", "rootfs", ".noodle-rootfs")):
            return root
    pytest.fail("no built jail image: run `noodle image build jail` (as root)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO))
    return out


def test_sdist_is_complete(tmp_path: Path) -> None:
    run(sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path), cwd=REPO)
    (sdist,) = tmp_path.glob("pool[-_]noodle-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for want in ("LICENSE", "Makefile", "README.md", "pyproject.toml", "scripts/install-deps.sh",
                 "tests/conftest.py", "tests/kindlib.py", "tests/kinds/test_jail.py", "tests/chaos/test_chaos.py",
                 "noodle/images/jail/build.sh", "noodle/images/microvm/agent.c", "noodle/images/oci/build.sh",
                 "examples/command/bwrap.toml", "examples/grafana-dashboard.json", "noodle/_shm.c"):  # fmt: skip
        assert want in names, want
    assert not any(n.startswith("images/build") for n in names)


def test_wheel_in_a_fresh_venv_runs_a_jail_pool(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("pool_noodle-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    py, noodle = str(venv / "bin" / "python"), str(venv / "bin" / "noodle")
    run(py, "-m", "pip", "install", "-q", str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOODLE_POOL")}
    env["NOODLE_IMAGE_DIR"] = image_root()
    cwd = str(tmp_path)  # not the checkout: nothing may come from it

    assert run(noodle, "--version", cwd=cwd, env=env).stdout.startswith("noodle (pool-noodle) ")
    kinds = set(run(noodle, "kinds", cwd=cwd, env=env).stdout.split())
    assert {"process", "jail", "oci", "microvm", "command"} <= kinds
    where = run(py, "-c", "import noodle, noodle.images as i; print(noodle.__file__); print(i.build_script('jail'))",
                cwd=cwd, env=env).stdout.split()  # fmt: skip
    assert str(venv) in where[0] and os.path.isfile(where[1]), where
    assert not where[0].startswith(str(REPO))
    unit = run(noodle, "unit", cwd=cwd, env=env).stdout
    assert f"ExecStart={os.path.realpath(noodle)} run" in unit

    name = f"t{os.getpid()}wheel"
    run_root = Path(cwd) / "r"
    run_root.mkdir()
    log = tmp_path / "sup.log"
    with open(log, "wb") as f:
        sup = subprocess.Popen([noodle, "run", "--name", name, "--kind", "jail", "--pool-size", "2", "--run-dir",
                                str(run_root)], cwd=cwd, env=env, stdout=f, stderr=f)  # fmt: skip
    try:
        probe = ("import noodle, time\n"
                 f"deadline = time.monotonic() + 120\n"
                 "while True:\n"
                 "    try:\n"
                 f"        p = noodle.attach({name!r}); break\n"
                 "    except noodle.PoolNotFound:\n"
                 "        assert time.monotonic() < deadline; time.sleep(0.05)\n"
                 "with p.get(timeout=120) as lease:\n"
                 "    print(lease.instance.run('import os; os.getuid()').result, lease.descriptor.get('pid'))\n"
                 "p.close()\n")  # fmt: skip
        out = run(py, "-c", probe, cwd=cwd, env=env).stdout.split()
        assert int(out[0]) >= 200000  # the jail's per-slot uid
        res = subprocess.run([noodle, "status", "--name", name], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert res.returncode == 0 and "(jail)" in res.stdout, res.stderr
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            code = sup.wait(120)
        except subprocess.TimeoutExpired:
            sup.kill()
            code = sup.wait()
    assert code == 0, log.read_text()
    assert_nothing_left(name)
    time.sleep(0)
    shutil.rmtree(run_root, ignore_errors=True)
