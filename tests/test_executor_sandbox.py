"""noodle.Executor on the isolating kinds (jail; oci with runc), through a
real pool: tasks by value, a fresh sandbox per task, plain-data results,
exceptions rebuilt by name, timeouts - and the security property: a result
from a sandbox is never unpickled unless the caller opts in.

The security test returns, from inside a jail, a pickle that would run code
on the host when opened (it creates a marker file). By default nothing runs
and the error says why; as a control, the same task with
``trust_results=True`` does run it, which shows the payload is real."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import noodle
from tests.conftest import wait_full
from tests.kinds.test_pool_kinds import JAIL, OCI, KindCase, case_params

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(400)


def _oci_runc() -> KindCase:
    from noodle.kinds.oci import DEFAULT_ROOTFS

    # the rootfs must be a real path (runc refuses a symlinked one, as in a worktree)
    config = f'[kinds.oci]\nruntime = "runc"\nrootfs = "{os.path.realpath(DEFAULT_ROOTFS)}"\n'
    base = OCI["runc"]
    return KindCase(base.id, base.kind, config, base.args, runtime="runc")


SANDBOXES = case_params([JAIL, _oci_runc()])


class SandboxError(Exception):
    pass


def first_time_here() -> bool:
    """True when no earlier task ran in this sandbox (its /tmp is fresh)."""
    mark = "/tmp/noodle-executor-seen"
    seen = os.path.exists(mark)
    open(mark, "w").close()
    return not seen


def fail_with_output() -> None:
    print("inside, before failing")
    raise SandboxError("no", 7)


def hostile_result(marker: str) -> None:
    """Hostile code in the sandbox: make the agent answer with a pickle that
    runs code (creating ``marker``) wherever it is opened."""
    import pickle

    class Evil:
        def __reduce__(self) -> Any:
            return (exec, (f"open({marker!r}, 'w').close()",))

    agent = next(m for m in list(sys.modules.values()) if hasattr(m, "encode_outcome") and hasattr(m, "PICKLED"))
    record = {"ok": True, "value": Evil(), "stdout": "", "stderr": ""}
    forged = agent.RESULT_MAGIC + agent.PICKLED + pickle.dumps(record)
    agent.encode_outcome = lambda *args, **kwargs: forged


def evil_value(marker: str) -> Any:
    class Evil:
        def __reduce__(self) -> Any:
            return (exec, (f"open({marker!r}, 'w').close()",))

    return Evil()


def start(case: KindCase, supervisor: Any) -> Any:
    sup = case.start(supervisor)
    pool = sup.attach(timeout=case.start_timeout)
    wait_full(pool, case.start_timeout)
    return pool


@pytest.mark.parametrize("case", SANDBOXES)
def test_executor_in_sandboxes(case: KindCase, supervisor: Any) -> None:
    pool = start(case, supervisor)
    try:
        k = 5
        with noodle.Executor(pool) as ex:
            assert not ex.trust_results  # isolating kinds: plain data by default
            assert list(ex.map(lambda x: x * k, range(4))) == [0, 5, 10, 15]
            assert ex.submit(lambda: ({1, 2}, b"\xff", (3.5, None))).result(120) == ({1, 2}, b"\xff", (3.5, None))
            assert all(f.result(120) for f in [ex.submit(first_time_here) for _ in range(4)])
            exc = ex.submit(fail_with_output).exception(120)
            assert type(exc) is SandboxError and exc.args == ("no", 7)
            assert exc.__cause__ is not None and exc.__cause__.stdout == "inside, before failing\n"
            with pytest.raises(ZeroDivisionError):
                ex.submit(lambda: 1 / 0).result(120)
        with noodle.Executor(pool, timeout=1.0) as ex:
            with pytest.raises(noodle.InstanceTimeout):
                ex.submit(time.sleep, 60).result(120)
        wait_full(pool, case.op_timeout)
    finally:
        pool.close()


@pytest.mark.parametrize("case", case_params([JAIL]))
def test_a_pickle_from_a_jail_is_never_opened(case: KindCase, supervisor: Any, tmp_path: Path) -> None:
    pool = start(case, supervisor)
    marker = tmp_path / "code-ran-on-the-host"
    try:
        with noodle.Executor(pool) as ex:
            # an honest agent refuses to send a non-plain value
            with pytest.raises(noodle.UnsafeResult, match="Evil, not plain data"):
                ex.submit(evil_value, str(marker)).result(120)
            # a subverted agent sends the pickle anyway: the caller does not open it
            with pytest.raises(noodle.UnsafeResult, match="pickled result and it was not opened: unpickling runs"):
                ex.submit(hostile_result, str(marker)).result(120)
        assert not marker.exists(), "code from inside the jail ran on the host"
        # control: a caller that opts in does run it, so the payload above was real
        with noodle.Executor(pool, trust_results=True) as ex:
            ex.submit(hostile_result, str(marker)).result(120)
        assert marker.exists()
        wait_full(pool, case.op_timeout)
    finally:
        pool.close()
