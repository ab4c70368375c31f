"""A kind from another package, found through the ``noodle.kinds``
entry-point group, runs through a real pool: examples/kind/sleeper.py
installed as a distribution of its own (a .dist-info on PYTHONPATH)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from noodle.host.proc import ProcessIdentity
from tests.conftest import REPO, attach_started, wait_for, wait_full


def install_plugin(site: Path) -> None:
    shutil.copy(REPO / "examples" / "kind" / "sleeper.py", site / "sleeper.py")
    info = site / "noodle_sleeper-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: noodle-sleeper\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[noodle.kinds]\nsleeper = sleeper:SleeperKind\n")


def test_plugin_kind_runs_through_a_real_pool(pool_name: str, run_root: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{site}")
    kinds = subprocess.run([sys.executable, "-m", "noodle", "kinds"], env=env, cwd=REPO,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert "sleeper" in kinds.stdout
    log = tmp_path / "sup.log"
    cmd = [sys.executable, "-m", "noodle", "run", "--name", pool_name, "--run-dir", run_root, "--kind", "sleeper",
           "--pool-size", "2"]  # fmt: skip
    with open(log, "ab") as out:
        sup = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        pool = attach_started(pool_name, sup, log)
        wait_full(pool, 60)
        with pool.get(timeout=10) as lease:
            desc = lease.descriptor
            proc = ProcessIdentity(desc["pid"], desc["start"])
            assert proc.alive() and "noodle" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        wait_for(lambda: not proc.alive(), 30, "the released instance to be destroyed")
        wait_full(pool, 60)
        pool.close()
    finally:
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(120)
    assert code == 0, log.read_text()
