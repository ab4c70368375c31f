"""The lifecycle rules of a slot, in one place and free of processes.

One table says, for each of the four stages, which slot state it works on,
which kind step it runs, where a success moves the slot and which queue is
fed next, and what it counts. Pure functions say what follows a failure
(backoff, abandoning), what follows a worker's death, and what shutdown and
draining do to each state. Workers, the supervisor and the integrity check
call these; none of them spells a rule out again.

    clean -> prepare -> spawn -> (ready -> leased) -> terminate -> clean ...

* A failed clean, prepare or spawn goes to clean with a backoff of
  ``BACKOFF_UNIT * n**2`` seconds (n failures in a row); past
  ``max_failures`` the slot is abandoned for ``abandon_cooldown`` and then
  retried, instead of draining the pool for ever. A failed clean during
  shutdown is abandoned at once (nobody would retry it).
* A failed terminate still goes to clean, at once: clean kills by cgroup,
  process group or pidfile whatever terminate missed.
* A worker that dies in its step counts as a failure of that step, except
  in terminate, which stays terminate (the descriptor is still there).
* Backoff is a time the supervisor honours before feeding the slot again,
  never a sleeping worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from noodle import layout as L

BACKOFF_UNIT = 0.1  # seconds; the n-th failure in a row waits BACKOFF_UNIT * n**2


@dataclass(frozen=True)
class Stage:
    """One row of the lifecycle table."""

    name: str
    state: L.State  # the slot state this stage's workers claim
    step: L.Step  # the kind step it runs (recorded with a failure)
    next_state: L.State  # where a success moves the slot (owner 0)
    next_stage: str | None  # whose queue gets the slot next; None: the ready ring
    done_counter: str
    refills: bool  # part of refilling: not run while the pool shuts down

    @property
    def failure_counter(self) -> str:
        return f"{self.name}_failures"


STAGES: tuple[Stage, ...] = (
    Stage("clean", L.State.CLEAN, L.Step.CLEAN, L.State.PREPARE, "prepare", "cleans", refills=False),
    Stage("prepare", L.State.PREPARE, L.Step.PREPARE, L.State.SPAWN, "spawn", "prepares", refills=True),
    Stage("spawn", L.State.SPAWN, L.Step.SPAWN, L.State.READY, None, "spawns", refills=True),
    Stage("terminate", L.State.TERMINATE, L.Step.TERMINATE, L.State.CLEAN, "clean", "terminates", refills=False),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
BY_STATE: dict[int, Stage] = {int(s.state): s for s in STAGES}


def stage_of(state: int) -> Stage | None:
    """The stage that works on slots in ``state`` (None: ready, leased, abandoned)."""
    return BY_STATE.get(int(state))


@dataclass(frozen=True)
class Policy:
    """The tunable part of the rules (from the pool's configuration)."""

    max_failures: int
    abandon_cooldown: float  # seconds

    def backoff(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` in a row."""
        return BACKOFF_UNIT * failures * failures

    def longest_wait(self) -> float:
        """The longest a slot may legitimately wait for a retry: a retry time
        further away than this is damage (the integrity check's horizon)."""
        return max(self.abandon_cooldown, self.backoff(self.max_failures))


@dataclass(frozen=True)
class Outcome:
    """Where a slot goes after a failure, and what is recorded."""

    state: L.State
    failures: int  # the slot's failure count from now on
    retry_in: float | None  # seconds until it may be fed again; None: leave retry_at alone
    dispatch: str | None  # send it to this stage's queue now (else the supervisor feeds it)

    @property
    def abandoned(self) -> bool:
        return self.state == L.State.ABANDONED


def after_failure(stage: Stage, failures: int, policy: Policy, shutting_down: bool) -> Outcome:
    """A step of ``stage`` failed on a slot that had ``failures`` in a row."""
    if stage.state == L.State.TERMINATE:
        return Outcome(L.State.CLEAN, failures, None, "clean")
    n = failures + 1
    if n > policy.max_failures or (shutting_down and stage.state == L.State.CLEAN):
        return Outcome(L.State.ABANDONED, n, policy.abandon_cooldown, None)
    return Outcome(L.State.CLEAN, n, policy.backoff(n), None)


def after_worker_death(stage: Stage, failures: int, policy: Policy) -> Outcome:
    """The worker running ``stage`` on a slot died: terminate stays
    terminate (its descriptor is still there); anything else counts as a
    failure, since a half-made instance or directory must be cleaned."""
    if stage.state == L.State.TERMINATE:
        return Outcome(L.State.TERMINATE, failures, None, None)
    return after_failure(stage, failures, policy, shutting_down=False)


def at_shutdown(state: int, owner: int) -> L.State | None:
    """When draining begins: unclaimed refills and abandoned slots go to clean
    (one last attempt) so that every instance is destroyed; None: unchanged."""
    if state in (L.State.PREPARE, L.State.SPAWN) and owner == 0:
        return L.State.CLEAN
    if state == L.State.ABANDONED:
        return L.State.CLEAN
    return None


@dataclass(frozen=True)
class DrainMove:
    to: L.State | None  # move the slot here (owner 0); None: leave it
    settled: bool  # nothing more will happen to this slot


def while_draining(state: int, owner: int, leases_due: bool) -> DrainMove:
    """What draining does to one slot. Slots end at ``prepare, owner 0``
    (cleaned, not refilled) or abandoned; ready instances are terminated,
    leases once ``leases_due`` (the drain timeout passed)."""
    if state == L.State.READY:
        return DrainMove(L.State.TERMINATE, False)
    if state == L.State.SPAWN and owner == 0:
        return DrainMove(L.State.CLEAN, False)
    if state == L.State.LEASED:
        return DrainMove(L.State.TERMINATE if leases_due else None, False)
    settled = (state == L.State.PREPARE and owner == 0) or state == L.State.ABANDONED
    return DrainMove(None, settled)
