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


def test_serve_waits_for_the_server_and_stops_cleanly_while_waiting(nats_server: NatsServer, fleet: Any) -> None:
    import signal
    import time

    nats_server.stop()
    waiting: Host = fleet(pool_size=1)
    late: Host = fleet(pool_size=1)
    time.sleep(3.0)  # both serves are up and retrying the connection
    assert waiting.serve is not None and waiting.serve.poll() is None, waiting.serve_log_text()
    waiting.serve.send_signal(signal.SIGTERM)  # a stop while no server answers is a clean exit
    assert waiting.serve.wait(60) == 0, waiting.serve_log_text()
    nats_server.start()
    wait_serving(late)  # the other one connects once the server is there
