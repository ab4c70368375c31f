"""The ``command`` kind: every lifecycle step is a shell command template.

Many sandboxes (Firecracker, a site's own container scripts) are driven
through shell scripts; this kind keeps that escape hatch for any sandbox
the other kinds do not cover.

Templates are run with ``/bin/sh -c`` (option ``shell``) and may name the
fields ``{slot}``, ``{dir}``, ``{pool}`` and ``{run_dir}``; health and
terminate may also name any descriptor field (``{pid}``, ``{socket}``...).
Every substituted value is shell-quoted, so write ``{dir}``, not
``"{dir}"``; ``{{`` is a literal brace. Each step also gets the same
values in its environment (``NOODLE_SLOT``, ``NOODLE_DIR``, ``NOODLE_POOL``,
``NOODLE_RUN_DIR``, ``NOODLE_AGENT`` = the agent file, and for health and
terminate ``NOODLE_DESCRIPTOR`` as JSON), which is easier in scripts.

Every step runs with its working directory set to ``base_dir``: by default
the directory ``noodle run`` was started in, and a relative ``base_dir`` is
resolved against that directory too. So a relative script path in a
template means the same thing in every step (never the slot dir, which is
``{dir}`` / ``$NOODLE_DIR``); under systemd, whose working directory is
``/``, set an absolute ``base_dir`` or use absolute paths.

``spawn_mode``:

* ``"oneshot"``: spawn prints the descriptor, a JSON object, on stdout
  (the last line that parses is used) and exits 0. Whatever it starts must
  not keep stdout open (redirect it), or the step waits for its timeout.
* ``"process"``: the spawn command keeps running as the instance, as the
  leader of its own session and process group, with stdout and stderr
  appended to ``{dir}/spawn.log``; it is ready when it writes a line equal
  to ``ready_line`` or a JSON object line (merged into the descriptor, e.g.
  ``{"socket": "..."}``). The descriptor gets its ``pid`` and start time;
  terminate without a template kills its process group and every
  descendant still below it (TERM, then KILL after ``kill_grace``;
  stragglers even when the shell itself already exited), and clean does
  the same through ``{dir}/spawn.pid`` when no descriptor survived a
  crash. A child that leaves the process group (setsid, setpgid) and whose
  parent exits before terminate escapes this: put the instance in a pid
  namespace (bwrap) or use the jail kind if it may.

A step that exits non-zero or outlives its timeout (``timeout``, or
``spawn_timeout`` for spawn) raises StepFailed with the tail of its stderr;
on a timeout the step's whole process group is killed. A health template
reports through its exit status (0 = healthy) and never raises.

The client handle (``lease.instance``): an ``AgentHandle`` when the
descriptor has ``"socket"``; else an ``ExecHandle`` when it has
``"exec_prefix"`` (an argv list such as ``["nsenter", "-t", "123", "-a"]``
that runs a program inside the instance when the argv is appended); else
None, and the holder works with the descriptor (``lease.descriptor``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from noodle.errors import ConfigError, StepFailed
from noodle.handle import AgentHandle, ExecResult
from noodle.host.launch import launch_detached, log_tail, read_pidfile, write_pidfile
from noodle.host.proc import ProcessIdentity, start_time
from noodle.kinds.base import Kind, PoolInfo, SlotContext

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_FILE = os.path.join(_PKG, "agent.py")
_STEPS = ("clean", "prepare", "spawn", "health", "terminate")
_SLOT_FIELDS = frozenset({"slot", "dir", "pool", "run_dir"})
_TAIL = 600


class ExecHandle:
    """``exec(argv)`` for instances reachable through a command prefix."""

    def __init__(self, prefix: list[str], timeout: float = 30.0) -> None:
        self.prefix = list(prefix)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<ExecHandle {shlex.join(self.prefix)}>"

    def exec(self, argv: list[str], timeout: float | None = None) -> ExecResult:
        proc = subprocess.run(
            [*self.prefix, *argv],
            capture_output=True,
            timeout=self.timeout if timeout is None else timeout,
            check=False,
        )
        return ExecResult(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    def close(self) -> None:
        """Nothing is held open between calls."""


class CommandKind(Kind):
    name = "command"
    OPTIONS: ClassVar[Mapping[str, tuple[type | tuple[type, ...], Any]]] = {
        "clean": (str, None),
        "prepare": (str, None),
        "spawn": (str, None),
        "health": (str, None),
        "terminate": (str, None),
        "spawn_mode": (str, "oneshot"),  # oneshot | process
        "ready_line": (str, "ready"),
        "shell": (str, "/bin/sh"),
        "timeout": ((int, float), 30.0),
        "spawn_timeout": ((int, float), None),
        "kill_grace": ((int, float), 2.0),
        "env": (dict, {}),
        "descriptor_max": (int, 1024),
        "remove_dir": (bool, True),
        # The working directory of every step, so relative paths in the
        # templates resolve against it; relative itself: against the
        # directory ``noodle run`` was started in (the default).
        "base_dir": (str, None),
    }

    def __init__(self, pool: PoolInfo, options: Mapping[str, Any]) -> None:
        super().__init__(pool, options)
        o = self.options
        if not o["spawn"]:
            raise ConfigError("kinds.command.spawn: required (the command that starts an instance)")
        if o["spawn_mode"] not in ("oneshot", "process"):
            raise ConfigError(f"kinds.command.spawn_mode: expected oneshot or process, got {o['spawn_mode']!r}")
        for step in _STEPS:
            template = o[step]
            if template is None:
                continue
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as exc:
                raise ConfigError(f"kinds.command.{step}: bad template: {exc}") from None
            for f in names:
                if not f.isidentifier():
                    raise ConfigError(f"kinds.command.{step}: field {{{f}}} must be a plain name")
                if step not in ("health", "terminate") and f not in _SLOT_FIELDS:
                    known = ", ".join(sorted(_SLOT_FIELDS))
                    raise ConfigError(f"kinds.command.{step}: unknown field {{{f}}} (known: {known})")
        for k, v in o["env"].items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(f"kinds.command.env: expected string keys and values, got {k!r}={v!r}")
        try:
            self.base_dir = os.path.abspath(os.path.expanduser(o["base_dir"] or "."))
        except OSError as exc:  # the working directory was removed
            raise ConfigError(f"kinds.command.base_dir: cannot resolve {o['base_dir'] or '.'!r}: {exc}") from None
        if not os.path.isdir(self.base_dir):
            raise ConfigError(f"kinds.command.base_dir: {self.base_dir} is not a directory")

    # -- running steps -----------------------------------------------------------

    def _fields(self, slot: SlotContext, descriptor: Mapping[str, Any] | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = dict(descriptor or {})
        fields.update(slot=slot.slot, dir=slot.dir, pool=slot.pool, run_dir=slot.run_dir)
        return fields

    def _render(self, step: str, fields: Mapping[str, Any]) -> str:
        template = str(self.options[step])
        quoted = {k: shlex.quote(v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()}
        try:
            return template.format_map(quoted)
        except KeyError as exc:
            raise StepFailed(f"{step}: the template names {exc}, which the descriptor lacks") from None

    def _env(self, slot: SlotContext, descriptor: Mapping[str, Any] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.options["env"])
        env.update(
            NOODLE_SLOT=str(slot.slot),
            NOODLE_DIR=slot.dir,
            NOODLE_POOL=slot.pool,
            NOODLE_RUN_DIR=slot.run_dir,
            NOODLE_AGENT=AGENT_FILE,
        )
        if descriptor is not None:
            env["NOODLE_DESCRIPTOR"] = json.dumps(dict(descriptor))
        return env

    def _run(
        self, step: str, slot: SlotContext, descriptor: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one step to completion; StepFailed on non-zero exit or timeout."""
        cmd = self._render(step, self._fields(slot, descriptor))
        limit = float(self.options["timeout"] if timeout is None else timeout)
        proc = subprocess.Popen(
            [self.options["shell"], "-c", cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(slot, descriptor),
            start_new_session=True,  # so a timeout kills the step's children too
            cwd=self.base_dir,
        )
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=2.0)
            except subprocess.TimeoutExpired:
                # Something outside the group still holds the pipes.
                proc.kill()
                proc.wait()
                out, err = b"", b""
            raise StepFailed(f"{step} timed out after {limit} s: {cmd}; stderr: {_tail(err)}") from None
        if proc.returncode != 0:
            raise StepFailed(f"{step} exited with {proc.returncode}: {cmd}; stderr: {_tail(err)}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # -- worker side -------------------------------------------------------------

    def clean(self, slot: SlotContext) -> None:
        recorded = read_pidfile(os.path.join(slot.dir, "spawn.pid"))
        if recorded is not None:
            recorded.kill_tree(grace=float(self.options["kill_grace"]))
        if self.options["clean"]:
            self._run("clean", slot)
        if self.options["remove_dir"] and os.path.lexists(slot.dir):
            shutil.rmtree(slot.dir)

    def prepare(self, slot: SlotContext) -> None:
        os.makedirs(slot.dir, mode=0o750, exist_ok=True)
        if self.options["prepare"]:
            self._run("prepare", slot)

    def spawn(self, slot: SlotContext) -> dict[str, Any]:
        os.makedirs(slot.dir, mode=0o750, exist_ok=True)
        limit = float(self.options["spawn_timeout"] or self.options["timeout"])
        if self.options["spawn_mode"] == "oneshot":
            desc = self._spawn_oneshot(slot, limit)
        else:
            desc = self._spawn_process(slot, limit)
        # health() gets only the descriptor; the slot lets it fill {slot}/{dir}.
        desc.setdefault("slot", slot.slot)
        pid = desc.get("pid")
        if isinstance(pid, int) and pid > 0 and "start" not in desc:
            desc["start"] = start_time(pid)
        size = len(json.dumps(desc))
        if size > int(self.options["descriptor_max"]):
            raise StepFailed(f"spawn: descriptor of {size} bytes exceeds descriptor_max: {json.dumps(desc)[:200]}")
        return desc

    def _spawn_oneshot(self, slot: SlotContext, limit: float) -> dict[str, Any]:
        done = self._run("spawn", slot, timeout=limit)
        for line in reversed(done.stdout.decode(errors="replace").splitlines()):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
        raise StepFailed(f"spawn printed no JSON object on stdout: {_tail(done.stdout)}")

    def _spawn_process(self, slot: SlotContext, limit: float) -> dict[str, Any]:
        cmd = self._render("spawn", self._fields(slot))
        log_path = os.path.join(slot.dir, "spawn.log")
        proc = launch_detached([self.options["shell"], "-c", cmd], log_path, env=self._env(slot), cwd=self.base_dir,
                               truncate_log=True, log_mode=0o640)  # fmt: skip
        pid, start = proc.pid, proc.start
        write_pidfile(os.path.join(slot.dir, "spawn.pid"), proc)
        desc: dict[str, Any] = {"pid": pid, "start": start}
        ready_line = str(self.options["ready_line"])
        deadline = time.monotonic() + limit
        delay = 0.0005
        seen = 0
        with open(log_path, "rb") as log:
            buf = b""
            while True:
                chunk = log.read()
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    seen += 1
                    text = line.decode(errors="replace").strip()
                    if text == ready_line:
                        return desc
                    if text.startswith("{"):
                        with contextlib.suppress(ValueError):
                            obj = json.loads(text)
                            if isinstance(obj, dict):
                                desc.update(obj)
                                desc["pid"], desc["start"] = pid, start
                                return desc
                if not chunk:
                    if not proc.alive():
                        raise StepFailed(f"spawn exited before it was ready: {cmd}; output: {_log(log_path)}")
                    if time.monotonic() > deadline:
                        proc.kill_tree(grace=float(self.options["kill_grace"]))
                        raise StepFailed(
                            f"spawn printed no ready line within {limit} s: {cmd}; output: {_log(log_path)}"
                        )
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)

    def terminate(self, slot: SlotContext, descriptor: Mapping[str, Any]) -> None:
        if self.options["terminate"]:
            self._run("terminate", slot, descriptor)
            return
        # TERM the group the spawn leads and its descendants, KILL them after
        # kill_grace; stragglers go even when the leader already died
        proc = ProcessIdentity.from_record(descriptor.get("pid"), descriptor.get("start"))
        if proc is not None:
            proc.kill_tree(grace=float(self.options["kill_grace"]))

    def health(self, descriptor: Mapping[str, Any], timeout: float) -> bool:
        if not self.options["health"]:
            return self.client_health(descriptor, timeout)
        raw = descriptor.get("slot")
        slot = self.pool.slot(raw if isinstance(raw, int) else -1)
        try:
            self._run("health", slot, descriptor, timeout=timeout)
        except StepFailed:
            return False
        return True

    # -- client side -------------------------------------------------------------

    @classmethod
    def client_handle(cls, descriptor: Mapping[str, Any]) -> AgentHandle | ExecHandle | None:
        if isinstance(descriptor.get("socket"), str):
            return AgentHandle(str(descriptor["socket"]))
        prefix = descriptor.get("exec_prefix")
        if isinstance(prefix, list) and prefix and all(isinstance(a, str) for a in prefix):
            return ExecHandle(prefix)
        return None

    @classmethod
    def client_health(cls, descriptor: Mapping[str, Any], timeout: float) -> bool:
        pid, start = descriptor.get("pid"), descriptor.get("start")
        if isinstance(pid, int) and isinstance(start, int) and not ProcessIdentity(pid, start).alive():
            return False
        if isinstance(descriptor.get("socket"), str):
            return AgentHandle.probe(str(descriptor["socket"]), timeout)
        return True


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return ("..." + text[-_TAIL:]) if len(text) > _TAIL else (text or "(empty)")


def _log(path: str) -> str:
    return log_tail(path, _TAIL) or "(no output)"
