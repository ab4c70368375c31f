"""A chaos client: acquire, use, release in a loop until SIGTERM, then
write what it counted as JSON. Run as ``python -m tests.chaos.client POOL OUT``.
It re-attaches when its pool's supervisor is replaced."""

from __future__ import annotations

import json
import random
import signal
import sys
import time

import noodle


def main() -> int:
    name, out = sys.argv[1], sys.argv[2]
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)  # the handler is in place: SIGTERM now means "finish up"
    counts = {"gets": 0, "releases": 0, "starved": 0, "shutting_down": 0, "reattached": 0, "wrong_result": 0,
              "instance_errors": 0, "other_errors": [], "waits_ms": []}  # fmt: skip
    pool = None
    rng = random.Random()
    while not stop:
        if pool is None:
            try:
                pool = noodle.attach(name)
            except noodle.NoodleError:
                time.sleep(0.05)
                continue
        t0 = time.perf_counter()
        try:
            lease = pool.get(timeout=2.0)
        except noodle.PoolStarved:
            counts["starved"] += 1
            continue
        except (noodle.PoolNotFound, noodle.PoolShuttingDown, noodle.PoolCorrupt):
            counts["reattached"] += 1
            pool.close()
            pool = None
            continue
        counts["gets"] += 1
        counts["waits_ms"].append((time.perf_counter() - t0) * 1000)
        try:
            x = rng.randrange(1000)
            if lease.instance.run(f"{x} + 1", timeout=10).result != x + 1:
                counts["wrong_result"] += 1
            time.sleep(rng.uniform(0, 0.01))
        except (noodle.InstanceGone, noodle.InstanceTimeout, noodle.InstanceError):
            counts["instance_errors"] += 1  # reclaimed under us (supervisor restart)
        except Exception as exc:
            counts["other_errors"].append(repr(exc))
        finally:
            try:
                if lease.release():
                    counts["releases"] += 1
            except noodle.NoodleError as exc:
                counts["other_errors"].append(repr(exc))
    with open(out, "w") as f:
        json.dump(counts, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
