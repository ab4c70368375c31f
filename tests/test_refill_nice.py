"""The refill yields the CPU to jobs: a supervisor that leads its session
(as systemd starts it) sets its session's autogroup nice value, which its
workers, zygote and warming instances share, while every published
instance serves a lease from an autogroup of its own at nice 0. A
supervisor that shares its caller's session leaves that session alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from noodle.host import sched
from tests.conftest import pool_processes, wait_full

pytestmark = pytest.mark.timeout(120)


def _autogroups_on() -> bool:
    try:
        return Path(sched.AUTOGROUP_SWITCH).read_text().strip() == "1"
    except OSError:
        return False


def _autogroup(pid: int) -> str:
    """The autogroup's name, "/autogroup-N"."""
    return Path(f"/proc/{pid}/autogroup").read_text().split()[0]


def test_a_session_leading_supervisor_lowers_its_refill_and_not_its_leases(supervisor) -> None:
    sup = supervisor("--pool-size", "2", "--refill-nice", "7", own_session=True)
    pool = sup.attach()
    wait_full(pool)
    if not _autogroups_on():
        assert "refill_nice 7 not applied: autogroups are off" in sup.logtext()
        pool.close()
        return
    assert "refill runs at autogroup nice 7" in sup.logtext()
    assert sched.session_nice(sup.pid) == 7
    refill = [pid for pid, title in pool_processes(sup.name) if "instance" not in title.split()]
    assert len(refill) >= 5, refill  # the supervisor, four stage workers, the zygote
    for pid in refill:
        assert _autogroup(pid) == _autogroup(sup.pid)
        assert sched.session_nice(pid) == 7
    for _ in range(2):
        with pool.get(timeout=10) as lease:
            pid = lease.descriptor["pid"]
            assert _autogroup(pid) != _autogroup(sup.pid)
            assert sched.session_nice(pid) == 0
            assert os.getpriority(os.PRIO_PROCESS, pid) == 0  # its own nice value is untouched
            assert lease.instance.call("math:factorial", 5) == 120
    pool.close()


def test_a_supervisor_in_its_callers_session_leaves_it_alone(supervisor) -> None:
    mine = sched.session_nice(os.getpid())
    sup = supervisor("--pool-size", "1", "--refill-nice", "7")
    pool = sup.attach()
    wait_full(pool)
    assert "refill_nice 7 not applied: the supervisor does not lead its session" in sup.logtext()
    assert sched.session_nice(os.getpid()) == mine
    assert sched.session_nice(sup.pid) == mine
    pool.close()


def test_refill_nice_zero_leaves_the_session_at_zero(supervisor) -> None:
    sup = supervisor("--pool-size", "1", "--refill-nice", "0", own_session=True)
    pool = sup.attach()
    wait_full(pool)
    if _autogroups_on():
        assert sched.session_nice(sup.pid) == 0
    assert "refill runs at autogroup nice" not in sup.logtext()
    pool.close()


def test_session_nice_reads_the_autogroup_line(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "autogroup").write_text("/autogroup-1234 nice 9\n")
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "autogroup").write_text("garbage\n")
    assert sched.session_nice(42, proc=str(tmp_path)) == 9
    assert sched.session_nice(43, proc=str(tmp_path)) is None
    assert sched.session_nice(44, proc=str(tmp_path)) is None
    assert sched.set_session_nice(0) == "refill_nice is 0"
