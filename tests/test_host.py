"""The host layer with real processes: what "the same process" means, and
the detached launcher."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from noodle.errors import StepFailed
from noodle.host.launch import launch_detached, log_tail, read_pidfile, write_pidfile
from noodle.host.proc import ProcessIdentity, read_stat, start_time, wait_gone
from tests.conftest import wait_for


def test_identity_needs_the_same_start_time() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        me = ProcessIdentity.of(child.pid)
        assert me is not None and me.alive()
        assert me.start == start_time(child.pid)
        assert not ProcessIdentity(child.pid, me.start + 1).alive()  # a reused pid is another process
        assert not ProcessIdentity(child.pid, None).alive()  # a missing start time never matches
        assert not ProcessIdentity(child.pid, 0).alive()
        assert not ProcessIdentity(child.pid, me.start + 1).signal(signal.SIGKILL)
        assert child.poll() is None  # the wrong identity signalled nothing
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("pid, start", [(True, 5), (5, True), ("5", 5), (5, "5"), (0, 5), (5, 0), (-1, 5), (5, None)])
def test_untrusted_records_are_refused(pid: object, start: object) -> None:
    assert ProcessIdentity.from_record(pid, start) is None


def test_a_zombie_counts_as_gone() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        st = wait_for(lambda: (s := read_stat(pid)) is not None and s.state == "Z" and s, 10, "the child to exit")
        assert start_time(pid) is None
        assert not ProcessIdentity(pid, st.start).alive()
        assert wait_gone([ProcessIdentity(pid, st.start)], 0.0)
    finally:
        os.waitpid(pid, 0)


def test_launch_detached_with_pidfile_log_and_kill_tree(tmp_path: Path) -> None:
    log = tmp_path / "log"
    # the shell leaves a child in another session: kill_tree still finds it below the instance
    proc = launch_detached(["/bin/sh", "-c", "echo started; setsid sleep 60 & exec sleep 60"], str(log))
    try:
        assert proc.alive() and read_stat(proc.pid) is not None
        stat = read_stat(proc.pid)
        assert stat is not None and stat.ppid != os.getpid() and stat.pgid == proc.pid  # not our child; leads a group
        write_pidfile(str(tmp_path / "pid"), proc)
        assert read_pidfile(str(tmp_path / "pid")) == proc
        wait_for(lambda: "started" in log_tail(str(log)), 10, "the log")
        wait_for(lambda: [p for p, s in _scan_children(proc.pid)], 10, "the straggler to start")
        stragglers = [ProcessIdentity(p, s) for p, s in _scan_children(proc.pid)]
    finally:
        proc.kill_tree(timeout=10)
    assert not proc.alive()
    assert not any(p.alive() for p in stragglers)


def test_launch_failure_names_its_cause(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with pytest.raises(StepFailed, match="no-such-binary"):
        launch_detached(["/nonexistent/no-such-binary"], str(log))
    assert "no-such-binary" in log_tail(str(log))
    assert read_pidfile(str(tmp_path / "missing")) is None


def test_launched_process_gets_only_its_descriptors_and_what_in_child_did(tmp_path: Path) -> None:
    """Descriptors 0-3 and nothing else of ours (an inheritable one
    included), its own session, the cwd asked for, and the state in_child
    set up (here a umask; a cgroup in the jail kind) inherited."""
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)
    r, w = os.pipe2(os.O_CLOEXEC)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def in_child() -> None:
        os.umask(0o027)

    try:
        proc = launch_detached(["/bin/sh", "-c", "echo up >&3; exec sleep 60"], str(tmp_path / "log"),
                               env={}, cwd=str(cwd), pass_fd=w, in_child=in_child)  # fmt: skip
    finally:
        os.close(w)
        os.close(leak)
    try:
        assert os.read(r, 16) == b"up\n"  # the passed descriptor is its 3
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds == [0, 1, 2, 3]
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == os.devnull
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(cwd)
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Umask"].strip() == "0027"
        assert os.getsid(proc.pid) == proc.pid and os.getpgid(proc.pid) == proc.pid
        stat = read_stat(proc.pid)
        assert stat is not None and stat.ppid != os.getpid()
    finally:
        os.close(r)
        proc.kill_tree(timeout=10)
    assert not proc.alive()


def _scan_children(pid: int) -> list[tuple[int, int]]:
    from noodle.host.proc import scan

    return [(p, st.start) for p, st in scan().items() if st.ppid == pid and not st.dead]


def test_wait_gone_times_out_on_a_live_process() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        me = ProcessIdentity.of(child.pid)
        assert me is not None and not me.wait_gone(0.05)
        assert me.kill(timeout=10)  # a zombie (we have not reaped it yet) counts as gone
    finally:
        child.kill()
        child.wait()
