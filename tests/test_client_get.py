"""Pool.get(): the ready case runs in C (noodle._shm.PoolBase.get), every
other case in Pool._get_slow. These tests pin the boundary between the two:
argument handling, which cases leave the C path, and that no path leaks a
leased slot. Real segment and queues owned by this process (nothing refills)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import weakref
from collections.abc import Iterator

import posix_ipc
import pytest

import noodle
from noodle import layout as L
from noodle import queues
from noodle._shm import LeaseBase, plain_lease
from noodle.client import Lease, Pool
from noodle.segment import Segment, segment_name
from tests.test_segment import make_ready


@pytest.fixture
def bare(bare_pool: Segment) -> Segment:
    return bare_pool


@pytest.fixture
def pool(bare: Segment, pool_name: str) -> Iterator[Pool]:
    p = noodle.attach(pool_name)
    yield p
    p.close()


def _leased(seg: Segment) -> list[int]:
    return [i for i, w in enumerate(seg.states()) if L.word_state(w) == L.State.LEASED]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((0,), {}), ((), {"timeout": 0}), ((0, False), {}), ((0,), {"health": False}),
     ((), {"health": None, "timeout": 0}), ((None,), {"health": 0})],
)  # fmt: skip
def test_every_argument_form_takes_a_ready_slot(bare: Segment, pool: Pool, args: tuple, kwargs: dict) -> None:
    gen = make_ready(bare, 2, {"x": 1})
    lease = pool.get(*args, **kwargs)
    assert type(lease) is Lease
    assert (lease.slot, lease.generation, lease.released) == (2, gen, False)
    assert lease._pool is pool and lease._owner_pid == os.getpid()
    assert lease.descriptor == {"x": 1}
    assert _leased(bare) == [2]
    assert lease.release()
    assert not lease.release()
    assert L.word_state(bare.core.load(2)) == L.State.TERMINATE


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [((0, False, 1), {}, "at most 2 positional"), ((), {"bogus": 1}, "unexpected keyword argument 'bogus'"),
     ((0,), {"timeout": 0}, "multiple values for argument 'timeout'"),
     ((0, None), {"health": False}, "multiple values for argument 'health'")],
)  # fmt: skip
def test_bad_arguments_raise_and_take_nothing(bare: Segment, pool: Pool, args: tuple, kwargs: dict,
                                              message: str) -> None:  # fmt: skip
    make_ready(bare, 0)
    with pytest.raises(TypeError, match=message):
        pool.get(*args, **kwargs)
    assert _leased(bare) == []
    assert bare.core.ring_ids() == [0]


def test_health_whose_truth_raises_takes_nothing(bare: Segment, pool: Pool) -> None:
    class Bad:
        def __bool__(self) -> bool:
            raise RuntimeError("no truth")

    make_ready(bare, 1)
    with pytest.raises(RuntimeError, match="no truth"):
        pool.get(timeout=0, health=Bad())  # type: ignore[arg-type]
    assert _leased(bare) == []


def test_empty_ring_goes_to_the_slow_path_and_starves(bare: Segment, pool: Pool) -> None:
    with pytest.raises(noodle.PoolStarved):
        pool.get(timeout=0)
    with pytest.raises(noodle.PoolStarved):
        pool.get(0.01)
    assert bare.counters()["acquire_waits"] == 1  # only the call with a timeout queued


def test_closed_handle_raises_even_with_a_slot_ready(bare: Segment, pool_name: str) -> None:
    p = noodle.attach(pool_name)
    make_ready(bare, 3)
    p.close()
    for kwargs in ({"timeout": 0}, {"timeout": 0, "health": True}, {}):
        with pytest.raises(noodle.PoolClosed):
            p.get(**kwargs)
    assert _leased(bare) == [] and bare.core.ring_ids() == [3]


def test_core_closed_under_an_open_handle_raises_pool_closed(bare: Segment, pool_name: str) -> None:
    p = noodle.attach(pool_name)
    make_ready(bare, 0)
    p._seg.close()  # what close() does second, as if another thread were between the two
    try:
        with pytest.raises(noodle.PoolClosed):
            p.get(timeout=0)
        assert _leased(bare) == []
    finally:
        p.close()


def test_shutdown_flag_refuses_a_ready_slot(bare: Segment, pool: Pool) -> None:
    make_ready(bare, 0)
    bare.core.shutdown()
    with pytest.raises(noodle.PoolShuttingDown):
        pool.get(timeout=0)
    assert _leased(bare) == []


def test_stale_heartbeat_of_a_live_supervisor_still_leases(bare: Segment, pool: Pool) -> None:
    make_ready(bare, 0)
    bare.core.store64(L.OFF_HEARTBEAT, 0)  # silent supervisor: get() checks it in /proc (it is this process)
    with pool.get(timeout=0) as lease:
        assert lease.slot == 0


def test_stale_heartbeat_of_a_dead_supervisor_raises_pool_not_found(pool_name: str) -> None:
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "supervisor": creates the pool, publishes a slot, dies without unlinking
        try:
            seg = Segment.create(pool_name, 2, "process")
            seg.heartbeat()
            queues.create_all(pool_name)
            make_ready(seg, 0)
            os.write(w, b"1")
            os.read(r2, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"1"
        p = noodle.attach(pool_name)
        os.write(w2, b"1")
        assert os.waitpid(pid, 0)[1] == 0
        try:
            p._seg.core.store64(L.OFF_HEARTBEAT, 0)
            with pytest.raises(noodle.PoolNotFound, match="supervisor"):
                p.get(timeout=0)
            assert _leased(p._seg) == []
            assert p._seg.core.ring_ids() == [0]
        finally:
            p.close()
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)
        queues.unlink_all(pool_name)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(segment_name(pool_name))


def test_pool_handle_is_collected_and_weakly_referenced(bare: Segment, pool_name: str) -> None:
    p = noodle.attach(pool_name)
    make_ready(bare, 0)
    lease = p.get(timeout=0)
    ref = weakref.ref(p)
    assert lease.release()
    p.close()
    del p
    gc.collect()
    assert ref() is not None  # the lease holds its pool
    del lease
    gc.collect()
    assert ref() is None


def test_lease_refcounts_are_balanced(bare: Segment, pool: Pool) -> None:
    before = sys.getrefcount(pool)
    for slot in range(4):
        make_ready(bare, slot)
        lease = pool.get(timeout=0)
        assert sys.getrefcount(pool) == before + 1
        assert lease.release()
        del lease
    assert sys.getrefcount(pool) == before


def test_lease_class_is_plain_and_complete() -> None:
    assert (Lease.__module__, Lease.__qualname__, Lease.__name__) == ("noodle.client", "Lease", "Lease")
    assert issubclass(Lease, LeaseBase) and Lease.__doc__ and "context manager" in Lease.__doc__
    for name in ("release", "descriptor", "instance", "released", "__enter__", "__exit__", "__aenter__",
                 "__aexit__", "__repr__", "_dropped"):  # fmt: skip
        assert name in Lease.__dict__, name
    lease = Lease.__new__(Lease)
    assert not gc.is_tracked(lease)  # nothing refers back to a lease: no cycle to collect


@pytest.mark.parametrize("body", ["fields", "dict", "indirect", "not_a_lease"])
def test_plain_lease_refuses_classes_it_cannot_rebuild(body: str) -> None:
    if body == "fields":
        cls: type = type("X", (LeaseBase,), {"__slots__": ("extra",)})
    elif body == "dict":
        cls = type("X", (LeaseBase,), {})
    elif body == "indirect":
        cls = type("X", (Lease,), {"__slots__": ()})
    else:
        cls = type("X", (), {"__slots__": ()})
    with pytest.raises(TypeError, match="plain_lease"):
        plain_lease(cls)


def test_dropped_leases_of_lease_and_of_a_subclass_are_released_once(bare: Segment, pool: Pool) -> None:
    class Sub(Lease):  # a user's subclass: GC-tracked again, torn down by Python then by Lease
        __slots__ = ()

    for slot, cls in ((0, Lease), (1, Sub)):
        make_ready(bare, slot)
        lease = bare.core.lease(cls, pool, 0, 0)
        assert type(lease) is cls and lease.slot == slot
        with pytest.warns(ResourceWarning, match="never released"):
            del lease
            gc.collect()
        assert L.word_state(bare.core.load(slot)) == L.State.TERMINATE
    assert bare.counters()["releases"] == 2 and bare.counters()["stale_releases"] == 0
