"""The lifecycle rules as pure functions: no processes, no segment. The
same rules run through real workers in test_faults and tests/chaos."""

from __future__ import annotations

import pytest

from noodle import layout as L
from noodle import lifecycle
from noodle.lifecycle import BY_NAME, Policy

POLICY = Policy(max_failures=3, abandon_cooldown=60.0)


def test_table_is_one_cycle() -> None:
    # following next_state from clean visits every stage once and comes back
    seen, state = [], L.State.CLEAN
    while (stage := lifecycle.stage_of(state)) is not None:
        seen.append(stage.name)
        state = stage.next_state
        if state == L.State.READY:  # a lease ends in terminate
            state = L.State.TERMINATE
        if state == L.State.CLEAN:
            break
    assert seen == ["clean", "prepare", "spawn", "terminate"]
    assert [s.name for s in lifecycle.STAGES if s.refills] == ["prepare", "spawn"]
    assert {s.failure_counter for s in lifecycle.STAGES} == {f"{n}_failures" for n in lifecycle.STAGE_NAMES}
    assert set(L.COUNTERS) >= {s.done_counter for s in lifecycle.STAGES} | {s.failure_counter for s in lifecycle.STAGES}


def test_backoff_grows_with_the_square_of_failures() -> None:
    assert [POLICY.backoff(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.4, 0.9])
    assert POLICY.longest_wait() == 60.0
    assert Policy(max_failures=100, abandon_cooldown=1.0).longest_wait() == pytest.approx(1000.0)


@pytest.mark.parametrize("stage", ["clean", "prepare", "spawn"])
def test_failure_goes_to_clean_with_backoff_then_abandons(stage: str) -> None:
    out = lifecycle.after_failure(BY_NAME[stage], 0, POLICY, shutting_down=False)
    assert (out.state, out.failures, out.dispatch) == (L.State.CLEAN, 1, None)
    assert out.retry_in == pytest.approx(0.1) and not out.abandoned
    out = lifecycle.after_failure(BY_NAME[stage], 3, POLICY, shutting_down=False)
    assert (out.state, out.failures, out.retry_in) == (L.State.ABANDONED, 4, 60.0) and out.abandoned


def test_failed_terminate_is_cleaned_at_once_without_counting() -> None:
    out = lifecycle.after_failure(BY_NAME["terminate"], 2, POLICY, shutting_down=False)
    assert (out.state, out.failures, out.retry_in, out.dispatch) == (L.State.CLEAN, 2, None, "clean")


def test_failed_clean_during_shutdown_is_abandoned() -> None:
    assert lifecycle.after_failure(BY_NAME["clean"], 0, POLICY, shutting_down=True).abandoned
    assert not lifecycle.after_failure(BY_NAME["prepare"], 0, POLICY, shutting_down=True).abandoned


def test_worker_death_keeps_terminate_and_fails_the_rest() -> None:
    out = lifecycle.after_worker_death(BY_NAME["terminate"], 1, POLICY)
    assert (out.state, out.failures, out.retry_in) == (L.State.TERMINATE, 1, None)
    out = lifecycle.after_worker_death(BY_NAME["spawn"], 1, POLICY)
    assert (out.state, out.failures) == (L.State.CLEAN, 2)


def test_shutdown_and_drain_moves() -> None:
    S = L.State
    assert lifecycle.at_shutdown(S.PREPARE, 0) == S.CLEAN
    assert lifecycle.at_shutdown(S.SPAWN, 77) is None  # a worker is in it
    assert lifecycle.at_shutdown(S.ABANDONED, 0) == S.CLEAN
    assert lifecycle.at_shutdown(S.LEASED, 77) is None
    d = lifecycle.while_draining
    assert d(S.READY, 0, False) == lifecycle.DrainMove(S.TERMINATE, False)
    assert d(S.LEASED, 77, False) == lifecycle.DrainMove(None, False)
    assert d(S.LEASED, 77, True) == lifecycle.DrainMove(S.TERMINATE, False)
    assert d(S.PREPARE, 0, False).settled and d(S.ABANDONED, 0, False).settled
    assert not d(S.PREPARE, 77, False).settled and not d(S.CLEAN, 0, False).settled
