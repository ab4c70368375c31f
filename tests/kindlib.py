"""Misbehaving kinds for tests, built on the real process kind so that
every instance is a real process. Selected with --kind tests.kindlib:Name;
behaviour is set with [kinds."tests.kindlib:Name"] options. Counters live
in files under the pool's run dir because steps run in several workers."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping
from typing import Any

from noodle.errors import StepFailed
from noodle.kinds.base import SlotContext
from noodle.kinds.process import ProcessKind


class MisbehavingKind(ProcessKind):
    OPTIONS = {
        **ProcessKind.OPTIONS,
        "fail_clean_times": (int, 0),  # per slot, the first N cleans fail
        "fail_always": (str, ""),  # this step always fails
        "fail_always_slots": (list, []),  # ... only for these slots (all when empty)
        "hang_step": (str, ""),  # this step sleeps hang_seconds ...
        "hang_seconds": ((int, float), 0.0),
        "hang_once_file": (str, ""),  # ... only while this file exists (removed when hit)
        "kill_self_step": (str, ""),  # the worker SIGKILLs itself inside this step ...
        "kill_self_once_file": (str, ""),  # ... once, when this file exists (removed first)
        "random_failure_rate": ((int, float), 0.0),
        "random_hang_rate": ((int, float), 0.0),
        "step_delay": ((int, float), 0.0),  # every step sleeps this long (so kills land inside steps)
        "overlap_dir": (str, ""),  # record the most steps seen running at once (in overlap_dir/max)
    }

    def _counter(self, slot: SlotContext, name: str) -> int:
        path = os.path.join(self.pool.run_dir, f"count-{name}-{slot.slot}")
        n = int(open(path).read()) if os.path.exists(path) else 0
        with open(path, "w") as f:
            f.write(str(n + 1))
        return n + 1

    def _misbehave(self, step: str, slot: SlotContext) -> None:
        o = self.options
        if o["overlap_dir"]:
            self._record_overlap(o["overlap_dir"], o["step_delay"])
        elif o["step_delay"]:
            time.sleep(o["step_delay"])
        if o["kill_self_step"] == step and o["kill_self_once_file"]:
            try:
                os.unlink(o["kill_self_once_file"])
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        if o["hang_step"] == step:
            flag = o["hang_once_file"]
            if not flag:
                time.sleep(o["hang_seconds"])
            else:
                try:
                    os.unlink(flag)
                except FileNotFoundError:
                    pass
                else:
                    time.sleep(o["hang_seconds"])
        if o["fail_always"] == step and (not o["fail_always_slots"] or slot.slot in o["fail_always_slots"]):
            raise StepFailed(f"{step} always fails (test kind)")
        if o["random_failure_rate"] and random.random() < o["random_failure_rate"]:
            raise StepFailed(f"{step} failed at random (test kind)")
        if o["random_hang_rate"] and random.random() < o["random_hang_rate"]:
            time.sleep(3600)

    @staticmethod
    def _record_overlap(d: str, delay: float) -> None:
        mine = os.path.join(d, f"running-{os.getpid()}")
        open(mine, "w").close()
        try:
            running = sum(1 for n in os.listdir(d) if n.startswith("running-"))
            path = os.path.join(d, f"max-{os.getpid()}")
            best = int(open(path).read()) if os.path.exists(path) else 0
            with open(path, "w") as f:
                f.write(str(max(best, running)))
            time.sleep(delay)
        finally:
            os.unlink(mine)

    def clean(self, slot: SlotContext) -> None:
        super().clean(slot)
        if self.options["fail_clean_times"] and self._counter(slot, "clean") <= self.options["fail_clean_times"]:
            raise StepFailed("clean fails (test kind)")
        self._misbehave("clean", slot)

    def prepare(self, slot: SlotContext) -> None:
        self._misbehave("prepare", slot)
        super().prepare(slot)

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        self._misbehave("spawn", slot)
        return super().spawn(slot)

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        super().terminate(slot, descriptor)
        self._misbehave("terminate", slot)
