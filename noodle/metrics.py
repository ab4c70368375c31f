"""Prometheus metrics read from a pool's shared memory.

One custom collector turns the segment's state words, counters and log2
histograms into metric families at scrape time: nothing is copied or
updated on the hot path, and the same collector serves ``noodle run
--metrics HOST:PORT`` (an HTTP server thread in the supervisor process) and
``noodle status --prometheus`` (the text printed once, for the node
exporter's textfile collector).

The segment's histograms count samples by the bit length of their
nanoseconds, so bucket ``b`` holds durations below ``2**b`` ns. Each
becomes a Prometheus bucket ``le = 2**b / 1e9`` seconds; the boundaries are
fixed (``2**8`` ns to ``2**40`` ns, about 256 ns to 18 minutes) so that
``histogram_quantile`` and ``rate`` work across scrapes and restarts. The
segment keeps no running sum, so ``_sum`` is estimated from the bucket
midpoints (within a factor of 1.5 of the truth per sample, exact for the
count).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from noodle.errors import ConfigError, NoodleError
from noodle.segment import Segment

STEPS = ("clean", "prepare", "spawn", "terminate")
FIRST_BUCKET, LAST_BUCKET = 8, 40
_LE = [repr((1 << b) / 1e9) for b in range(FIRST_BUCKET, LAST_BUCKET + 1)]

# counters with a metric of their own; every other counter goes to noodle_events_total{event}
_OWN_COUNTERS = {
    "acquires": ("noodle_leases", "Instances handed out by get()."),
    "releases": ("noodle_releases", "Leases released by their holders."),
    "abandoned": ("noodle_abandoned", "Times a slot was abandoned after max_failures failed steps."),
    "reclaimed_leases": ("noodle_reclaimed_leases", "Leases reclaimed from holders that died."),
}
_STEP_COUNTERS = {f"{s}s" for s in STEPS} | {f"{s}_failures" for s in STEPS}


def parse_address(value: str, what: str = "metrics") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every address) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT with a port in 1..65535, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{what}: write an IPv6 address in brackets, e.g. [::1]:9464, got {value!r}")
    return host or "0.0.0.0", int(port)  # noqa: S104 - ":PORT" asks for every address, as in Go


def _buckets(hist: Sequence[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and the estimated sum (seconds)."""
    out: list[tuple[str, float]] = []
    acc = 0
    for b in range(FIRST_BUCKET):
        acc += hist[b]
    for i, b in enumerate(range(FIRST_BUCKET, LAST_BUCKET + 1)):
        acc += hist[b]
        out.append((_LE[i], float(acc)))
    out.append(("+Inf", float(sum(hist))))
    # bucket b >= 1 holds [2**(b-1), 2**b) ns: count each sample at 1.5 * 2**(b-1)
    est_ns = sum(n * 3 * (1 << b) / 4 for b, n in enumerate(hist) if b)
    return out, est_ns / 1e9


class SegmentCollector(Collector):
    """Reads pool ``pool``'s segment at every scrape. A missing pool is not
    an error: ``noodle_up`` is 0 and nothing else is reported, so a scrape
    during a restart succeeds."""

    def __init__(self, pool: str, segment: Segment | None = None) -> None:
        self.pool = pool
        self._segment = segment
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            seg, own = self._open()
            try:
                yield from self._families(seg)
            finally:
                if own and seg is not None:
                    seg.close()

    def _open(self) -> tuple[Segment | None, bool]:
        if self._segment is not None and not self._segment.closed:
            return self._segment, False
        try:
            return Segment.attach(self.pool), True
        except NoodleError:
            return None, False

    def _families(self, seg: Segment | None) -> Iterator[Metric]:
        p = [self.pool]
        up = GaugeMetricFamily("noodle_up", "1 when the pool's shared memory is there to read.", labels=["pool"])
        up.add_metric(p, 1.0 if seg is not None else 0.0)
        yield up
        if seg is None:
            return
        snap = seg.snapshot()
        hists = seg.histograms()
        counters = snap["counters"]

        info = GaugeMetricFamily("noodle_pool_info", "The pool's kind and supervisor pid.",
                                 labels=["pool", "kind", "supervisor_pid"])  # fmt: skip
        info.add_metric([*p, str(snap["kind"]), str(snap["supervisor_pid"])], 1.0)
        yield info
        yield _gauge("noodle_pool_size", "Slots in the pool.", p, snap["pool_size"])
        slots = GaugeMetricFamily("noodle_slots", "Slots per lifecycle state; the states sum to noodle_pool_size.",
                                  labels=["pool", "state"])  # fmt: skip
        for state, n in snap["states"].items():
            slots.add_metric([*p, state], float(n))
        yield slots
        yield _gauge("noodle_ready_ring_length", "Ready slot ids queued in the ring.", p, snap["ring_length"])
        yield _gauge("noodle_waiters", "Clients blocked in get().", p, snap["waiters"])
        yield _gauge("noodle_heartbeat_age_seconds", "Seconds since the supervisor's last heartbeat.", p,
                     snap["heartbeat_age_s"])  # fmt: skip
        yield _gauge("noodle_shutting_down", "1 while the pool drains.", p, 1.0 if snap["shutting_down"] else 0.0)

        for key, (name, doc) in _OWN_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=["pool"])
            c.add_metric(p, float(counters[key]))
            yield c
        steps = CounterMetricFamily("noodle_steps", "Lifecycle steps run.", labels=["pool", "step"])
        fails = CounterMetricFamily("noodle_step_failures", "Lifecycle steps that failed.", labels=["pool", "step"])
        for s in STEPS:
            steps.add_metric([*p, s], float(counters[f"{s}s"]))
            fails.add_metric([*p, s], float(counters[f"{s}_failures"]))
        yield steps
        yield fails
        events = CounterMetricFamily("noodle_events", "Every other counter the segment keeps, by name.",
                                     labels=["pool", "event"])  # fmt: skip
        for key, v in counters.items():
            if key not in _OWN_COUNTERS and key not in _STEP_COUNTERS:
                events.add_metric([*p, key], float(v))
        yield events

        step_h = HistogramMetricFamily("noodle_step_seconds", "Duration of lifecycle steps (sum estimated).",
                                       labels=["pool", "step"])  # fmt: skip
        for s in STEPS:
            buckets, total = _buckets(hists[s])
            step_h.add_metric([*p, s], buckets, total)
        yield step_h
        for hname, metric, doc in (
            ("wait", "noodle_get_wait_seconds", "Time get() blocked before an instance was ready (sum estimated)."),
            ("acquire", "noodle_get_seconds", "Time of get()'s non-blocking acquire (sum estimated)."),
            ("dispatch", "noodle_dispatch_seconds", "From a task being queued to a worker claiming it."),
            ("health", "noodle_health_check_seconds", "Health checks before hand-out (sum estimated)."),
        ):
            h = HistogramMetricFamily(metric, doc, labels=["pool"])
            buckets, total = _buckets(hists[hname])
            h.add_metric(p, buckets, total)
            yield h


def _gauge(name: str, doc: str, labels: list[str], value: Any) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["pool"])
    g.add_metric(labels, float(value))
    return g


def registry_for(pool: str, segment: Segment | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SegmentCollector(pool, segment))
    return reg


def exposition(pool: str, segment: Segment | None = None) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry_for(pool, segment)).decode()


class MetricsServer:
    """``/metrics`` over HTTP from daemon threads: a scrape reads shared
    memory only, so it never waits on, or blocks, the supervisor loop."""

    def __init__(self, pool: str, address: str) -> None:
        from prometheus_client import start_http_server

        host, port = parse_address(address)
        try:
            self._server, self._thread = start_http_server(port, host, registry_for(pool))
        except OSError as exc:
            raise ConfigError(f"metrics: cannot listen on {address}: {exc.strerror or exc}") from None
        self.address = self._server.server_address[:2]
        # Workers, and the instances a zygote forks, must not inherit the
        # listening socket: close their copy (the server thread is not forked).
        os.register_at_fork(after_in_child=self._close_in_child)
        self._closed = False

    def _close_in_child(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._server.socket.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._server.shutdown()
            self._server.server_close()
        self._thread.join(timeout=5)

