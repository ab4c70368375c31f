"""The agent's start-up as the sandbox launchers run it, with a real
interpreter: the background warm-up after ready neither imports threading
on the way to the first connection nor leaves the interpreter switching
threads at its short warm-up interval."""

from __future__ import annotations

import sys

import pytest

from noodle.handle import AgentHandle
from tests.conftest import wait_for
from tests.test_jobpath import launched_agent

pytestmark = pytest.mark.timeout(120)


def test_warm_up_runs_on_a_bare_thread_and_restores_the_switch_interval(tmp_path) -> None:
    default = sys.getswitchinterval()  # the interpreter's default: nothing here changes it
    with launched_agent(tmp_path) as (sock, _pid):
        handle = AgentHandle(sock, timeout=30)
        try:
            assert handle.ping()
            probe = "import sys; ('pickle' in sys.modules, 'threading' in sys.modules, sys.getswitchinterval())"
            # the warm-up imports pickle without any request asking for it,
            # then puts the default interval back
            state = wait_for(lambda: (s := handle.run(probe).result)[0] and s[2] == default and s, 60, "the warm-up")
            assert state == (True, False, default)
        finally:
            handle.close()
