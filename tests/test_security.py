"""Who may touch a pool: file modes, other users, the pool's group, and
releases of someone else's lease. Real uids via setuid in forked children."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import noodle
from noodle import layout as L
from noodle.segment import Segment
from tests.conftest import wait_full

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root (CI and this machine run as root)"),
]
NOBODY = 65534
GROUP = 43210  # a gid nobody else uses; no /etc/group entry is needed to hold it


def as_user(uid: int, groups: list[int], fn) -> int:
    """Run fn() in a child as uid with exactly these groups; its int result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 250
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(groups[0] if groups else uid)
            os.setuid(uid)
            code = fn()
        except BaseException as exc:
            os.write(w, repr(exc).encode()[:500])
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 500).decode()
    os.close(r)
    code = os.waitstatus_to_exitcode(status)
    assert code != 250, msg
    return code


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_everything_is_owner_only_by_default(supervisor, pool_name: str, run_root: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    run_dir = Path(run_root) / pool_name
    assert mode(f"/dev/shm/noodle.{pool_name}") == 0o600
    for stage in ("clean", "prepare", "spawn", "terminate"):
        assert mode(f"/dev/mqueue/noodle.{pool_name}.{stage}") == 0o600
    assert mode(run_dir) == 0o700
    assert mode(run_dir / "supervisor.lock") == 0o600
    for path in run_dir.rglob("*"):  # slot dirs, sockets, pidfiles: nothing for "other"
        assert mode(path) & 0o007 == 0, f"{path} is accessible to other users: {oct(mode(path))}"
    pool.close()


def test_another_user_cannot_attach(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "1")
    pool = sup.attach()
    wait_full(pool)

    def try_attach() -> int:
        try:
            noodle.attach(pool_name)
        except noodle.PermissionDenied:
            return 0
        return 1

    assert as_user(NOBODY, [], try_attach) == 0
    pool.close()


def test_the_pools_group_may_attach_use_and_release(supervisor, pool_name: str, run_root: str) -> None:
    os.chmod(run_root, 0o711)  # the test's private tmp dir; /run/noodle is like this in production
    sup = supervisor("--pool-size", "1", "--group", str(GROUP))
    pool = sup.attach()
    wait_full(pool)
    assert mode(f"/dev/shm/noodle.{pool_name}") == 0o660
    assert os.stat(f"/dev/shm/noodle.{pool_name}").st_gid == GROUP
    assert mode(f"/dev/mqueue/noodle.{pool_name}.terminate") == 0o660
    assert mode(Path(run_root) / pool_name) == 0o750

    def use() -> int:
        p = noodle.attach(pool_name)
        with p.get(timeout=10) as lease:
            ok = lease.instance.run("40 + 2").result == 42
        p.close()
        return 0 if ok else 1

    assert as_user(NOBODY, [GROUP], use) == 0
    # and a user outside the group still cannot
    assert as_user(NOBODY, [], lambda: 0 if _refused(pool_name) else 1) == 0
    wait_full(pool)
    pool.close()


def _refused(name: str) -> bool:
    try:
        noodle.attach(name)
    except noodle.PermissionDenied:
        return True
    return False


def test_a_forged_release_of_anothers_lease_is_refused(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    lease = pool.get()

    def forge() -> int:
        seg = Segment.attach(pool_name)
        return int(seg.core.release(lease.slot, lease.generation))

    # same uid, another process: the state word names the holder's pid
    pid = os.fork()
    if pid == 0:
        os._exit(forge())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == L.Status.NOT_OWNER
    assert pool.stats()["counters"]["forged_releases"] == 1
    assert lease.instance.run("1").result == 1  # still ours
    assert lease.release() is True
    pool.close()
