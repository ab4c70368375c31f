"""The wheel and sdist as a new user gets them: a wheel installed into a
fresh venv outside the checkout runs `noodle --version` and `noodle kinds`,
builds the jail and oci images with its own `noodle image build` into a
fresh image directory (the Debian packages are already installed on a
test host, so the scripts only build the trees), and runs a jail pool and
an oci pool from them. The microvm image (a kernel download) is not built
here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_nothing_left

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert res.returncode == 0, f"{argv}: {res.stdout}\n{res.stderr}"
    return res  # type: ignore[no-any-return]


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
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOODLE_POOL", "NOODLE_IMAGE_DIR")}
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

    images = tmp_path / "images"
    run(noodle, "image", "build", "jail", "oci", "--dir", str(images), cwd=cwd, env=env)
    assert (images / "jail" / "rootfs" / ".noodle-rootfs").is_file()
    assert (images / "oci" / "rootfs" / "etc" / "noodle-image").is_file()
    assert run(noodle, "image", "path", "oci", "--dir", str(images), cwd=cwd, env=env).stdout.strip() == str(
        images / "oci"
    )
    for kind, extra in (("jail", []), ("oci", [])):
        one_pool(noodle, py, kind, extra, images, tmp_path, cwd, env)


def one_pool(noodle: str, py: str, kind: str, extra: list[str], images: Path, tmp_path: Path, cwd: str,
             env: dict[str, str]) -> None:  # fmt: skip
    name = f"t{os.getpid()}w{kind}"
    run_root = tmp_path / f"r{kind}"
    run_root.mkdir()
    log = tmp_path / f"{kind}.log"
    with open(log, "wb") as f:
        sup = subprocess.Popen([noodle, "run", "--name", name, "--kind", kind, "--pool-size", "2", "--run-dir",
                                str(run_root), "--image-dir", str(images), *extra], cwd=cwd, env=env, stdout=f,
                               stderr=f)  # fmt: skip
    try:
        probe = ("import noodle, time\n"
                 "deadline = time.monotonic() + 120\n"
                 "while True:\n"
                 "    try:\n"
                 f"        p = noodle.attach({name!r}); break\n"
                 "    except noodle.PoolNotFound:\n"
                 "        assert time.monotonic() < deadline; time.sleep(0.05)\n"
                 "with p.get(timeout=120) as lease:\n"
                 "    print(lease.instance.run('import os; os.getuid()').result)\n"
                 "    print(lease.instance.run('open(\"/etc/passwd\").read().count(chr(10))').result)\n"
                 "p.close()\n")  # fmt: skip
        out = run(py, "-c", probe, cwd=cwd, env=env).stdout.split()
        # the instance sees the image's tiny /etc/passwd, not the host's
        assert int(out[1]) <= 3, out
        if kind == "jail":
            assert int(out[0]) >= 200000  # the jail's per-slot uid
        res = subprocess.run([noodle, "status", "--name", name], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert res.returncode == 0 and f"({kind})" in res.stdout, res.stderr
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            code = sup.wait(120)
        except subprocess.TimeoutExpired:
            sup.kill()
            code = sup.wait()
    assert code == 0, log.read_text()
    assert_nothing_left(name)
    shutil.rmtree(run_root, ignore_errors=True)
