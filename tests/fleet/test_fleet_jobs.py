"""Jobs through the fleet: classes, dedupe, dead letters, flow control."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.fleet.conftest import (
    WHO,
    Host,
    NatsServer,
    dead_letters,
    instance_pool,
    js_run,
    stored_results,
    wait_serving,
)


def test_a_host_takes_only_its_classes(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet import Executor

    a: Host = fleet(pool_size=2, classes=("alpha",))
    b: Host = fleet(pool_size=2, classes=("beta", "gamma"))
    wait_serving(a)
    wait_serving(b)
    with Executor(nats_server.url, pool_class="alpha") as xa, Executor(nats_server.url, pool_class="gamma") as xg, \
            Executor(nats_server.url, pool_class="beta") as xb:  # fmt: skip
        fa = [xa.submit_source(WHO) for _ in range(4)]
        fb = [xb.submit_source(WHO) for _ in range(3)]
        fg = [xg.submit_source(WHO) for _ in range(3)]
        assert {instance_pool(f.result(60).result) for f in fa} == {a.name}
        assert {instance_pool(f.result(60).result) for f in fb + fg} == {b.name}


def test_a_job_id_submitted_twice_runs_once(nats_server: NatsServer, fleet: Any, tmp_path: Path) -> None:
    from noodle.fleet import Executor

    host: Host = fleet(pool_size=2)
    wait_serving(host)
    marker = tmp_path / "runs"
    src = f"import os\nopen({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')\n6 * 7"
    with Executor(nats_server.url) as one, Executor(nats_server.url) as two:
        f1 = one.submit_source(src, job_id="job-twice")
        f2 = two.submit_source(src, job_id="job-twice")  # another caller, same id: dropped by the stream
        f3 = one.submit_source(src, job_id="job-twice")  # same caller again: shares the first future's result
        assert [f.result(60).result for f in (f1, f2, f3)] == [42, 42, 42]
        f4 = two.submit_source(src, job_id="job-twice")  # after it finished: answered from the results stream
        assert f4.result(60).result == 42
        assert one.stats["duplicates"] == 0
    assert len(marker.read_text().splitlines()) == 1
    assert stored_results(nats_server.url) == 1


def test_a_malformed_job_is_dead_lettered_at_once(nats_server: NatsServer, fleet: Any) -> None:
    host: Host = fleet(pool_size=2)
    wait_serving(host)

    async def publish(nc: Any, js: Any) -> bytes:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await js.publish("noodle.jobs.default", b"\xff", headers={"Nats-Msg-Id": "bad-1", "Noodle-Reply": inbox,
                                                                    "Noodle-Format": "nonsense/9"})  # fmt: skip
        msg = await sub.next_msg(60)
        assert msg.headers["Noodle-Status"] == "failed"
        return bytes(msg.data)

    reason = js_run(nats_server.url, publish)
    assert b"unknown job format" in reason
    dead = dead_letters(nats_server.url)
    assert [(s, h["Noodle-Job"]) for s, h, _ in dead] == [("noodle.dead.default", "bad-1")]
    assert "unknown job format" in dead[0][1]["Noodle-Reason"]


def test_a_job_that_always_kills_its_instance_is_dead_lettered_after_max_deliver(
    nats_server: NatsServer, fleet: Any, tmp_path: Path
) -> None:
    from noodle.fleet import Executor, JobFailed

    host: Host = fleet(pool_size=2, max_deliver=3)
    wait_serving(host)
    marker = tmp_path / "tries"
    src = f"import os\nopen({str(marker)!r}, 'a').write('x\\n')\nos._exit(3)"
    with Executor(nats_server.url) as ex:
        fut = ex.submit_source(src, job_id="always-dies")
        ok = ex.submit_source("1 + 1")
        with pytest.raises(JobFailed) as err:
            fut.result(120)
        assert ok.result(60).result == 2
    assert "instance failed" in err.value.reason
    assert len(marker.read_text().splitlines()) == 3  # max_deliver tries, then no more
    dead = dead_letters(nats_server.url)
    assert len(dead) == 1
    subject, headers, data = dead[0]
    assert subject == "noodle.dead.default" and headers["Noodle-Job"] == "always-dies"
    assert headers["Noodle-Deliveries"] == "3" and "instance failed" in headers["Noodle-Reason"]
    assert data.decode() == src  # the job itself, for a post-mortem or a manual retry


def test_flow_control_never_takes_more_jobs_than_ready_instances(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet import Executor

    host: Host = fleet(pool_size=2)
    wait_serving(host)
    with Executor(nats_server.url) as ex:
        futs = [ex.submit_source(f"import time\ntime.sleep(0.3)\n{i}") for i in range(12)]
        samples = []

        async def queued(nc: Any, js: Any) -> int:
            return int((await js.stream_info("NOODLE_JOBS")).state.messages)

        while not all(f.done() for f in futs):
            samples.append(js_run(nats_server.url, queued))
        assert [f.result() .result for f in futs] == list(range(12))
    # while the pool was busy, jobs waited in the stream, not on the host
    assert max(samples) > 2
    view = wait_for(lambda: _entry(nats_server.url, host), 30, "the fleet view entry")
    assert view["done"] == 12
    assert view["min_headroom"] >= 0, view  # never a fetched job without a ready instance for it
    assert view["lease_waits"] == 0, view


def _entry(url: str, host: Host) -> dict[str, Any] | None:
    async def get(nc: Any, js: Any) -> dict[str, Any] | None:
        kv = await js.key_value("noodle_fleet")
        entry = json.loads((await kv.get(f"{host.name}.{host.name}")).value)
        return entry if entry["done"] == 12 else None

    return js_run(url, get)


def test_async_executor(nats_server: NatsServer, fleet: Any) -> None:
    from noodle.fleet.executor import AsyncExecutor

    host: Host = fleet(pool_size=2)
    wait_serving(host)

    async def main() -> list[int]:
        async with AsyncExecutor(nats_server.url) as ex:
            futs = [await ex._submit(*_source(f"{i} * 3"), None) for i in range(5)]
            return [(await f).result for f in futs]

    assert asyncio.run(main()) == [0, 3, 6, 9, 12]


def _source(src: str) -> tuple[str, bytes]:
    from noodle.fleet import payload

    return payload.encode_source(src)


def test_a_reply_subject_that_is_not_an_inbox_is_refused(nats_server: NatsServer, fleet: Any) -> None:
    """A job naming the JetStream API as its reply would make the host send
    a request there (here: delete the job stream). It is dead-lettered."""
    host: Host = fleet(pool_size=2)
    wait_serving(host)

    async def publish(nc: Any, js: Any) -> None:
        await js.publish("noodle.jobs.default", b"1 + 1", headers={
            "Nats-Msg-Id": "hostile-reply", "Noodle-Format": "source/1",
            "Noodle-Reply": "$JS.API.STREAM.DELETE.NOODLE_JOBS"})  # fmt: skip

    js_run(nats_server.url, publish)
    dead = wait_for(lambda: dead_letters(nats_server.url), 60, "the dead letter")
    assert dead[0][1]["Noodle-Job"] == "hostile-reply" and "not an inbox" in dead[0][1]["Noodle-Reason"]

    async def streams(nc: Any, js: Any) -> list[str]:
        return sorted(s.config.name for s in await js.streams_info())

    assert "NOODLE_JOBS" in js_run(nats_server.url, streams)
