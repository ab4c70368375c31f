"""A minimal pool-noodle kind: each instance is one shell process that
sleeps until it is terminated. Everything a kind must do is here: a clean
that works whatever a crash left, bounded steps, a descriptor for clients,
and process identity through ``noodle.host`` (never a bare pid).

Register it in your package's metadata::

    [project.entry-points."noodle.kinds"]
    sleeper = "sleeper:SleeperKind"

and run ``noodle run --kind sleeper``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any, ClassVar

from noodle.host.launch import launch_detached, read_pidfile, write_pidfile
from noodle.host.proc import ProcessIdentity
from noodle.kinds import Kind, SlotContext


class SleeperKind(Kind):
    name: ClassVar[str] = "sleeper"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {"nap": (int, 1000)}

    def clean(self, slot: SlotContext) -> None:
        # the pidfile is the way back to an instance after a crash
        recorded = read_pidfile(os.path.join(slot.dir, "pid"))
        if recorded is not None:
            recorded.kill_tree()
        shutil.rmtree(slot.dir, ignore_errors=True)

    def prepare(self, slot: SlotContext) -> None:
        os.makedirs(slot.dir, mode=0o700, exist_ok=True)

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        # argv carries "noodle <pool> <slot>" so that ps shows whose it is
        script = f"while :; do sleep {int(self.options['nap'])}; done"
        argv = ["/bin/sh", "-c", script, "noodle", slot.pool, str(slot.slot)]
        proc = launch_detached(argv, os.path.join(slot.dir, "log"))
        write_pidfile(os.path.join(slot.dir, "pid"), proc)
        return {"pid": proc.pid, "start": proc.start}

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        proc = ProcessIdentity.from_record(descriptor.get("pid"), descriptor.get("start"))
        if proc is not None:
            proc.kill_tree()

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        proc = ProcessIdentity.from_record(descriptor.get("pid"), descriptor.get("start"))
        return proc is not None and proc.alive()
