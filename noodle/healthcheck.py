"""``check_health``: one full lifecycle on a scratch slot before start.

clean -> prepare -> spawn -> health -> terminate -> clean, each bounded by
``step_timeout``. Any failure or timeout refuses the start, naming the
step, so a broken kind is found before a pool full of it is.
The scratch slot id is ``pool_size`` (one past the last real slot), so its
directory and names never collide with a real slot's.
"""

from __future__ import annotations

import time
from typing import Any

from noodle.errors import NoodleError
from noodle.kinds import Kind
from noodle.workers.stage import step_deadline


class HealthCheckFailed(NoodleError):
    """Raised when the start-up lifecycle check fails; names the step."""


def run_cycle(kind: Kind, scratch_slot: int, step_timeout: float) -> dict[str, float]:
    """Run the cycle; returns seconds per step. Raises HealthCheckFailed."""
    ctx = kind.pool.slot(scratch_slot)
    timings: dict[str, float] = {}
    descriptor: dict[str, Any] = {}

    def step(name: str, fn: Any) -> Any:
        t0 = time.monotonic()
        try:
            with step_deadline(step_timeout):
                result = fn()
        except Exception as exc:
            raise HealthCheckFailed(f"check_health: step {name!r} failed: {type(exc).__name__}: {exc}") from exc
        timings[name] = time.monotonic() - t0
        return result

    try:
        step("clean", lambda: kind.clean(ctx))
        step("prepare", lambda: kind.prepare(ctx))
        descriptor = step("spawn", lambda: kind.spawn(ctx))

        def health() -> None:
            if not kind.health(descriptor, step_timeout):
                raise RuntimeError("the fresh instance reported unhealthy")

        step("health", health)
        step("terminate", lambda: kind.terminate(ctx, descriptor))
        step("clean (after)", lambda: kind.clean(ctx))
    except HealthCheckFailed:
        # leave nothing behind even when refusing to start
        try:
            if descriptor:
                kind.terminate(ctx, descriptor)
            kind.clean(ctx)
        except Exception:  # noqa: BLE001 - best effort; the original error is what matters
            pass
        raise
    return timings
