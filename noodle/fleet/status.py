"""The fleet view: every serve's last entry in the JetStream KV bucket.

Each ``noodle serve`` puts its host's state counts, counters and job rate
under ``<host>.<pool>`` every ``status_interval``; an entry older than
``stale_after`` belongs to a host that stopped writing (dead, cut off, or
its serve stopped) and is shown as stale.
"""

from __future__ import annotations

import json
import time
from typing import Any

from noodle.fleet import wire
from noodle.fleet.config import FleetConfig


async def read(cfg: FleetConfig) -> list[dict[str, Any]]:
    """One dict per host entry, with ``age_s`` and ``stale`` added."""
    nc = await wire.connect(cfg, "noodle-status")
    try:
        js = nc.jetstream(timeout=5.0)
        kv = await wire.fleet_bucket(js, cfg, create=False)
        if kv is None:
            return []
        try:
            keys = await kv.keys()
        except Exception:  # noqa: BLE001 - nats-py raises NoKeysError for an empty bucket
            return []
        out = []
        now = time.time()
        for key in sorted(keys):
            try:
                entry = await kv.get(key)
                value = json.loads(entry.value or b"{}")
            except Exception:  # noqa: BLE001, S112 - deleted meanwhile, or not ours
                continue
            if not isinstance(value, dict):
                continue
            age = now - float(value.get("ts", 0))
            value["key"] = key
            value["age_s"] = round(age, 2)
            value["stale"] = age > cfg.stale_after and value.get("state") != "stopped"
            out.append(value)
        return out
    finally:
        await nc.close()


def format_hosts(hosts: list[dict[str, Any]]) -> str:
    if not hosts:
        return "no hosts have reported (is any `noodle serve` running against this server?)"
    lines = [f"{'host.pool':24s} {'state':9s} {'classes':14s} {'ready':>5s} {'leased':>6s} {'size':>4s} "
             f"{'running':>7s} {'done':>6s} {'jobs/s':>7s} {'retried':>7s} {'dead':>4s}  age"]  # fmt: skip
    for h in hosts:
        states = h.get("states") or {}
        state = "STALE" if h.get("stale") else str(h.get("state", "?"))
        lines.append(
            f"{h['key']:24s} {state:9s} {','.join(h.get('classes', [])):14s} {states.get('ready', 0):>5} "
            f"{states.get('leased', 0):>6} {h.get('pool_size', 0):>4} {h.get('running', 0):>7} {h.get('done', 0):>6} "
            f"{h.get('jobs_per_s', 0):>7} {h.get('retried', 0):>7} {h.get('dead', 0):>4}  {h['age_s']:.1f} s"
            + ("  (no update: host or serve down?)" if h.get("stale") else "")
        )
    return "\n".join(lines)
