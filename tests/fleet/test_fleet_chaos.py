"""Chaos through the fleet: three hosts (each its own supervisor and serve),
jobs in flight, then a serve SIGKILLed, a whole host SIGKILLed, or the NATS
server restarted. Every future must complete with the right result, each job
id resolved once and its result stored once, and nothing left of any host."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.fleet.conftest import Host, NatsServer, stored_results, wait_serving

JOBS = 30
# each job notes its index and the pool (host) running it when it starts
JOB = ("import time\nwho = open('/proc/self/cmdline').read().replace(chr(0), ' ').split()\n"
       "open({runs!r}, 'a').write('{i} ' + who[who.index('instance') + 1] + ' \\n')\ntime.sleep(2.0)\n{i} * {i}")


def run_through(nats_server: NatsServer, hosts: list[Host], fault: Callable[[], None], runs: Path) -> int:
    """Returns how many times jobs ran (more than JOBS: some were re-run)."""
    from noodle.fleet import Executor

    for h in hosts:
        wait_serving(h)
    with Executor(nats_server.url) as ex:
        futs = [ex.submit_source(JOB.format(runs=str(runs), i=i)) for i in range(JOBS)]
        wait_for(lambda: sum(f.done() for f in futs) >= 4, 120, "the first results")
        fault()
        results = [f.result(300).result for f in futs]
        stats = ex.stats
    assert results == [i * i for i in range(JOBS)]
    assert stats["delivered"] == JOBS and stats["pending"] == 0, stats  # each job id resolved exactly once
    assert stored_results(nats_server.url) == JOBS  # and its result stored once
    ran = [line.split()[0] for line in runs.read_text().splitlines()]
    assert set(ran) == {str(i) for i in range(JOBS)}
    return len(ran)


def busy(host: Host, runs: Path) -> None:
    """Wait until one more job starts on ``host`` (it then runs for 2 s)."""

    def started() -> int:
        return runs.read_text().count(f" {host.name} ") if runs.exists() else 0

    before = started()
    wait_for(lambda: started() > before, 120, f"a job to start on {host.name}")


def test_serve_sigkilled_mid_jobs(nats_server: NatsServer, fleet: Any, tmp_path: Path) -> None:
    hosts = [fleet(pool_size=3) for _ in range(3)]

    def fault() -> None:
        busy(hosts[0], tmp_path / "runs")
        hosts[0].kill_serve()
        time.sleep(1.0)
        hosts[0].start_serve()  # as systemd's Restart=on-failure would

    # the jobs it had leased instances for ran again elsewhere after the ack wait
    assert run_through(nats_server, hosts, fault, tmp_path / "runs") > JOBS
    wait_serving(hosts[0])


def test_whole_host_sigkilled_mid_jobs(nats_server: NatsServer, fleet: Any, tmp_path: Path) -> None:
    hosts = [fleet(pool_size=3) for _ in range(3)]

    def fault() -> None:
        busy(hosts[1], tmp_path / "runs")
        hosts[1].kill_host()

    assert run_through(nats_server, hosts, fault, tmp_path / "runs") > JOBS
    hosts[1].restart_host()  # its successor sweeps the dead supervisor's instances
    wait_serving(hosts[1])


def test_nats_server_restarted_mid_run(nats_server: NatsServer, fleet: Any, tmp_path: Path) -> None:
    hosts = [fleet(pool_size=3) for _ in range(3)]
    run_through(nats_server, hosts, lambda: nats_server.restart(down_for=1.0), tmp_path / "runs")
    for h in hosts:
        assert h.serve is not None and h.serve.poll() is None, h.serve_log_text()
        assert "disconnected" in h.serve_log_text()


def test_a_job_whose_hosts_all_die_is_dead_lettered(nats_server: NatsServer, fleet: Any, tmp_path: Path) -> None:
    """max_deliver = 2 and the host running the job is killed both times:
    the server's max-deliveries advisory makes a surviving serve
    dead-letter it, and the caller's future fails instead of hanging."""
    from noodle.fleet import Executor, JobFailed
    from tests.fleet.conftest import dead_letters, instance_pool

    hosts = {h.name: h for h in (fleet(pool_size=2, max_deliver=2) for _ in range(3))}
    for h in hosts.values():
        wait_serving(h)
    marker = tmp_path / "ran-on"
    src = f"open({str(marker)!r}, 'a').write(open('/proc/self/cmdline').read() + '\\n')\nimport time\ntime.sleep(600)"
    with Executor(nats_server.url) as ex:
        fut = ex.submit_source(src, job_id="doomed")
        for n in (1, 2):
            line = wait_for(lambda n=n: marker.exists() and len(lines := marker.read_text().splitlines()) >= n
                            and lines[n - 1], 120, f"try {n} to start")  # fmt: skip
            victim = hosts[instance_pool(line)]
            victim.kill_serve()
        try:
            fut.result(120)
            raise AssertionError("the job cannot have succeeded")
        except JobFailed as exc:
            assert "no answer after 2 tries" in exc.reason
    dead = dead_letters(nats_server.url)
    assert [h["Noodle-Job"] for _, h, _ in dead] == ["doomed"]
