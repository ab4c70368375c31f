"""The supervisor tracks each worker through its own handle and always stops.

Real supervisors, real workers. A supervisor that hangs is caught by the
subprocess wait (a hang detector, not a speed bound: the pool needs well
under a second to stop here) and by pytest-timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, attach_started, wait_full

HANG = 120.0  # seconds after which a stop that has not ended is a hang

# Drives a real Supervisor in its own process (it makes itself a child
# subreaper and installs signal handlers, which pytest must not get).
DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from noodle import config
    from noodle.host.proc import state_of
    from noodle.supervisor import Supervisor

    name, run_dir = sys.argv[1], sys.argv[2]
    sup = Supervisor(config.from_mapping({"name": name, "pool_size": 2, "run_dir": run_dir}))
    sup.start()
    workers = sup.workers

    def kill_and_wait_zombie(pid):
        os.kill(pid, signal.SIGKILL)
        while state_of(pid) != "Z":
            time.sleep(0.005)

    a, b = workers.seats[0], workers.seats[1]
    old_b = b.pid
    kill_and_wait_zombie(old_b)
    workers.reap()
    emptied = b.pid == 0
    # a dies after the reap of this pass, before its top-up forks b again:
    # forking runs multiprocess' clean-up, which collects a's exit status
    old_a = a.pid
    kill_and_wait_zombie(old_a)
    workers.top_up()
    workers.reap()
    workers.top_up()
    replaced = a.pid not in (0, old_a) and state_of(a.pid) not in ("", "Z")
    # some other code in the supervisor collects a worker's status itself
    c = workers.seats[2]
    old_c = c.pid
    kill_and_wait_zombie(old_c)
    os.waitpid(old_c, 0)
    workers.reap()
    workers.top_up()
    seen = c.pid not in (0, old_c) and state_of(c.pid) not in ("", "Z")
    print(json.dumps({"emptied": emptied, "replaced": replaced, "seen": seen}), flush=True)
    sup.begin_shutdown()
    sup.stop_workers()
    sup.teardown()
    """
)


def test_worker_collected_by_another_fork_is_still_seen(pool_name: str, run_root: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", DRIVER, pool_name, run_root], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HANG)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0]) == {"emptied": True, "replaced": True, "seen": True}, proc.stderr


def test_group_sigterm_stops_quietly(pool_name: str, run_root: str, tmp_path: Path) -> None:
    """Ctrl-C in a terminal, `timeout` or a service manager signal the whole
    process group: workers leaving because the pool stops are no failures."""
    log = tmp_path / "sup.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "noodle", "run", "--name", pool_name, "--run-dir", run_root, "--pool-size", "4",
           "--workers", "2"]  # fmt: skip
    with open(log, "ab") as out:
        sup = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               start_new_session=True)  # fmt: skip
    try:
        pool = attach_started(pool_name, sup, log)
        wait_full(pool, 60)
        pool.close()
        os.killpg(sup.pid, signal.SIGTERM)
        code = sup.wait(HANG)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text
    # the one warning a root test run may see is the start-up advice that the
    # process kind isolates nothing; nothing about the workers' exits
    noisy = [ln for ln in text.splitlines() if ("WARNING" in ln or "ERROR" in ln) and "isolates nothing" not in ln]
    assert "exited with 0" not in text and not noisy, text
