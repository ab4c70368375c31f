"""The fleet end to end with real nats-server, supervisors and serves."""

from __future__ import annotations

from typing import Any

from tests.fleet.conftest import Host, NatsServer, wait_serving


def test_source_job_runs_in_a_fresh_instance(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet import Executor

    host: Host = fleet(pool_size=2)
    wait_serving(host)
    with Executor(nats_server.url) as ex:
        futs = [ex.submit_source(f"import os\nprint('hi {i}')\n({i} * 7, os.getpid())") for i in range(6)]
        results = [f.result(60) for f in futs]
    assert [r.result[0] for r in results] == [i * 7 for i in range(6)]
    assert [r.stdout for r in results] == [f"hi {i}\n" for i in range(6)]
    assert len({r.result[1] for r in results}) == 6  # every job in its own instance
