"""Benchmark of the shared-memory core (issue: "the shared-memory core").

Everything below is measured in ONE run, from a client process that is not
the process which creates the segment / feeds the queue:

1. Taking one item, uncontended. The creator (this process, the feeder)
   publishes every slot of a segment (`cas` to spawn + `publish`, as a
   worker does) and then idles while the client, in *rounds*, takes them:

   * per-op rounds: for every slot ``t0; acquire(0); t1; release(slot, gen); t2``
     with ``time.perf_counter_ns`` -> acquire = t1-t0, release = t2-t1;
   * batch rounds: one timestamp pair around ``[acquire(0) for _ in range(256)]``
     and one around the release loop of those 256 -> ns per op without a
     per-op timer; the p50 over batches (a preemption spoils one batch).

   After each round the client tells the feeder, which re-publishes every
   slot (untimed) and answers "go". Nothing ever blocks: the ring always
   holds a ready slot for every acquire (checked: ``acquire_waits`` stays 0).
   ``release`` here is the core's CAS leased -> terminate only; the client
   API's ``Lease.release()`` also sends the terminate task (a POSIX mq send),
   which the "client API" row includes (Pool.get(timeout=0) + Lease.release(),
   10 per round because the terminate queue holds 10 messages; the feeder
   drains it between rounds).

   The same client loops time ``receive()`` / ``get()`` of a POSIX message
   queue (posix_ipc), a multiprocessing.Queue and a faster_fifo.Queue, each
   two ways: "kept full" -- a feeder process blocked in send/put refills it
   as the client takes (what the issue asks; on a full POSIX queue every
   receive also wakes the blocked sender), and "prefilled" -- the feeder
   fills it (10 messages for the POSIX queue: /proc/sys/fs/mqueue/msg_max)
   and idles during the timed round, exactly like the pool rows.

   The cost of ``perf_counter_ns`` itself is measured in the same client
   (back-to-back pairs); "net p50" subtracts its p50.

2. Wake-up latency of a blocked acquire: a waiter process sleeps in
   ``core.acquire(10 s)`` on an empty 1-slot segment; once /proc shows it
   asleep (and its ticket is queued) and 0.5-1.5 ms more have passed, a
   publisher process stamps CLOCK_MONOTONIC and publishes the slot; the
   waiter stamps CLOCK_MONOTONIC when acquire returns. Baseline in the same
   run with the same protocol: a bare futex (futex_wait on a shared
   anonymous mapping; the publisher stamps, add32 + futex_wake). Both
   same-core (both pinned to one CPU) and cross-core, interleaved in blocks.
   Also a hot futex ping-pong (round trip / 2, back to back).

3. Acquire cost versus pool size (8, 256, 4096 slots), same rounds harness.

    python benchmarks/bench_core.py [--quick]

Writes benchmarks/results/core.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import math
import mmap
import multiprocessing as mp
import os
import random
import statistics
import struct
import sys
import time
import traceback
from typing import Any

import _util as U
import faster_fifo
import posix_ipc

from noodle import _shm, queues
from noodle import layout as L
from noodle.host.proc import state_of
from noodle.segment import Segment

CTX = mp.get_context("fork")
PREFIX = f"benchc{os.getpid()}"
LONG_NS = 10_000_000_000
PAIR = struct.Struct("<qq")
CHUNK = 256  # ops per batch timing: short enough that a preemption spoils one batch, not the median


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("peer closed its pipe")
        buf += chunk
    return buf


def timer_overhead(n: int) -> list[int]:
    pc = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = pc()
        t1 = pc()
        out.append(t1 - t0)
    return out


def loop_overhead(k: int, reps: int) -> float:
    """ns per iteration of an empty list comprehension of length k."""
    pc = time.perf_counter_ns
    rng = range(k)
    best = math.inf
    for _ in range(reps):
        t0 = pc()
        _ = [None for _ in rng]
        best = min(best, (pc() - t0) / k)
    return best


# ---- 1. rounds harness: pool core, client API, prefilled queues ----------------------


def queue_get(kind: str, handle: Any) -> tuple[Any, Any]:
    """The blocking get of a prefilled queue (mq: a name, opened here; mpq,
    ff: the queue itself) and the queue this opened, if any, to close."""
    if kind == "mq":
        q = posix_ipc.MessageQueue(handle)
        q.block = True
        return q.receive, q
    return handle.get, None


def _rounds_client(kind: str, handle: Any, conn: Any, rounds: int, k: int, cpu: int | None) -> None:
    """Client side of the rounds harness. kind: core | api | mq | mpq | ff."""
    try:
        pin(cpu)
        pc = time.perf_counter_ns
        rng = range(k)
        first: list[int] = []  # per-op: acquire / get
        second: list[int] = []  # per-op: release (pool kinds)
        batch_first: list[float] = []
        batch_second: list[float] = []
        bad = 0
        timer = timer_overhead(20000)
        chunks = [range(min(CHUNK, k - c)) for c in range(0, k, CHUNK)]
        loop_ns = loop_overhead(min(k, CHUNK), 20)
        seg = pool = q = None
        if kind == "core":
            seg = Segment.attach(handle)
            acq, rel = seg.core.acquire, seg.core.release
        elif kind == "api":
            import noodle

            pool = noodle.attach(handle)
            get = pool.get
        else:
            get, q = queue_get(kind, handle)
        for r in range(rounds):
            conn.recv()
            a = array.array("q")
            b = array.array("q")
            if kind == "core":
                if r % 2 == 0:
                    for _ in rng:
                        t0 = pc()
                        st, s, g = acq(0)
                        t1 = pc()
                        rs = rel(s, g)
                        t2 = pc()
                        a.append(t1 - t0)
                        b.append(t2 - t1)
                        if st or rs:
                            bad += 1
                else:
                    for crng in chunks:
                        t0 = pc()
                        res = [acq(0) for _ in crng]
                        t1 = pc()
                        for _st, s, g in res:
                            rel(s, g)
                        t2 = pc()
                        bad += sum(1 for x in res if x[0])
                        batch_first.append((t1 - t0) / len(crng))
                        batch_second.append((t2 - t1) / len(crng))
            elif kind == "api":
                if r % 2 == 0:
                    for _ in rng:
                        t0 = pc()
                        lease = get(timeout=0)
                        t1 = pc()
                        lease.release()
                        t2 = pc()
                        a.append(t1 - t0)
                        b.append(t2 - t1)
                else:
                    for crng in chunks:
                        t0 = pc()
                        leases = [get(timeout=0) for _ in crng]
                        t1 = pc()
                        for lease in leases:
                            lease.release()
                        t2 = pc()
                        batch_first.append((t1 - t0) / len(crng))
                        batch_second.append((t2 - t1) / len(crng))
            else:
                if r % 2 == 0:
                    for _ in rng:
                        t0 = pc()
                        get()
                        t1 = pc()
                        a.append(t1 - t0)
                else:
                    for crng in chunks:
                        t0 = pc()
                        _ = [get() for _ in crng]
                        t1 = pc()
                        batch_first.append((t1 - t0) / len(crng))
            first.extend(a)
            second.extend(b)
            conn.send(bad)
        conn.send({"first": first, "second": second, "batch_first": batch_first, "batch_second": batch_second,
                   "bad": bad, "timer": timer, "loop_ns": loop_ns})  # fmt: skip
        if seg is not None:
            seg.close()
        if pool is not None:
            pool.close()
        if q is not None:
            q.close()
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def reready(seg: Segment, k: int, me: int) -> None:
    """Make slots 0..k-1 ready again as a spawn worker does (cas to spawn, publish)."""
    load, cas, publish = seg.core.load, seg.core.cas, seg.core.publish
    spawn = L.State.SPAWN
    for slot in range(k):
        w = load(slot)
        mine = L.make_word(spawn, L.word_gen(w), me)
        if not cas(slot, w, mine):
            raise RuntimeError(f"slot {slot}: cas from {L.describe_word(w)} failed")
        st = publish(slot, mine, b"")
        if st:
            raise RuntimeError(f"slot {slot}: publish returned {L.Status(st).name}")


def run_rounds(kind: str, k: int, samples: int, cpu: int | None, fill: Any, handle: Any) -> dict[str, Any]:
    """Drive the rounds harness: ``fill()`` runs in this (feeder) process
    before every round; the client takes k items per round."""
    warm = 2 * max(1, math.ceil(2048 / k))
    rounds = warm + 2 * max(1, math.ceil(samples / k))
    parent, child = CTX.Pipe()
    p = CTX.Process(target=_rounds_client, args=(kind, handle, child, rounds, k, cpu), daemon=True)
    p.start()
    try:
        for _ in range(rounds):
            fill()
            parent.send(1)
            msg = parent.recv()
            if isinstance(msg, dict):
                raise RuntimeError(f"{kind} client failed:\n{msg.get('error')}")
        res = parent.recv()
        if "error" in res:
            raise RuntimeError(f"{kind} client failed:\n{res['error']}")
        p.join(10)
    finally:
        U.stop_processes([p])
    skip_ops = (warm // 2) * k
    skip_batches = (warm // 2) * math.ceil(k / CHUNK)
    out = {
        "k_per_round": k,
        "rounds": rounds,
        "warmup_rounds": warm,
        "bad_status": res["bad"],
        "first": res["first"][skip_ops:],
        "second": res["second"][skip_ops:],
        "batch_first": res["batch_first"][skip_batches:],
        "batch_second": res["batch_second"][skip_batches:],
        "timer": res["timer"],
        "loop_ns": res["loop_ns"],
    }
    return out


def pool_rounds(size: int, samples: int, cpu: int | None) -> dict[str, Any]:
    name = f"{PREFIX}s{size}"
    seg = Segment.create(name, size, "process")
    try:
        me = os.getpid()
        before = seg.counters()
        res = run_rounds("core", size, samples, cpu, lambda: reready(seg, size, me), name)
        after = seg.counters()
        res["counters"] = {k: after[k] - before[k] for k in ("acquires", "acquire_waits", "releases",
                                                              "publishes", "stale_ring_entries")}  # fmt: skip
        return res
    finally:
        seg.close()
        seg.unlink()


def api_rounds(samples: int, cpu: int | None, size: int | None = None) -> dict[str, Any]:
    """Pool.get(timeout=0) + Lease.release() (includes the terminate-task send).
    With ``size``, a pool of that many slots taken whole each round (the
    terminate queue then fills after 10 releases: the rest count queue_full,
    which is how Pool.get() is measured against pool size)."""
    name = f"{PREFIX}api{size or ''}"
    k = size or queues.system_max_messages()
    seg = Segment.create(name, k, "process")
    qs = queues.create_all(name)
    try:
        me = os.getpid()
        term = qs["terminate"]

        def fill() -> None:
            seg.heartbeat()  # a stale heartbeat sends get() to /proc to check the supervisor
            with contextlib.suppress(posix_ipc.BusyError):
                while True:
                    term.receive(timeout=0)
            reready(seg, k, me)

        before = seg.counters()
        res = run_rounds("api", k, samples, cpu, fill, name)
        after = seg.counters()
        res["counters"] = {n: after[n] - before[n] for n in ("acquires", "acquire_waits", "releases", "queue_full")}
        return res
    finally:
        for q in qs.values():
            q.close()
        queues.unlink_all(name)
        seg.close()
        seg.unlink()


def mq_prefilled(samples: int, cpu: int | None) -> dict[str, Any]:
    name = f"/noodle.{PREFIX}.mqpre"
    k = queues.system_max_messages()
    q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=k, max_message_size=64)
    try:
        msg = b"x" * 16

        def fill() -> None:
            for _ in range(k):
                q.send(msg, timeout=1)

        return run_rounds("mq", k, samples, cpu, fill, name)
    finally:
        q.close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_message_queue(name)


def mpq_prefilled(samples: int, cpu: int | None) -> dict[str, Any]:
    k = 500
    q = CTX.Queue()

    def fill() -> None:
        for _ in range(k):
            q.put(1)
        # the queue's feeder thread writes into the pipe: let it finish first
        while q._buffer:  # type: ignore[attr-defined]
            time.sleep(0.0002)
        time.sleep(0.002)

    try:
        return run_rounds("mpq", k, samples, cpu, fill, q)
    finally:
        q.close()
        q.join_thread()


def ff_prefilled(samples: int, cpu: int | None) -> dict[str, Any]:
    k = 1000
    q = faster_fifo.Queue(max_size_bytes=1_000_000)

    def fill() -> None:
        for _ in range(k):
            q.put(1)

    try:
        return run_rounds("ff", k, samples, cpu, fill, q)
    finally:
        q.close()


# ---- 1b. queues kept full by a blocked feeder process -------------------------------


def _kept_full_feeder(kind: str, handle: Any, cpu: int | None) -> None:
    pin(cpu)
    if kind == "mq":
        q = posix_ipc.MessageQueue(handle)
        q.block = True
        msg = b"x" * 16
        while True:
            q.send(msg)
    while True:
        with contextlib.suppress(Exception):
            handle.put(1)


def _kept_full_client(kind: str, handle: Any, conn: Any, n_op: int, n_batch: int, bsize: int,
                      cpu: int | None) -> None:  # fmt: skip
    try:
        pin(cpu)
        pc = time.perf_counter_ns
        get, _q = queue_get(kind, handle)
        timer = timer_overhead(20000)
        for _ in range(2000):
            get()
        per = array.array("q")
        for _ in range(n_op):
            t0 = pc()
            get()
            t1 = pc()
            per.append(t1 - t0)
        rng = range(bsize)
        batch = []
        for _ in range(n_batch):
            t0 = pc()
            _ = [get() for _ in rng]
            t1 = pc()
            batch.append((t1 - t0) / bsize)
        conn.send({"first": per.tolist(), "batch_first": batch, "timer": timer})
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def kept_full(kind: str, n_op: int, n_batch: int, bsize: int, cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    mq_name = f"/noodle.{PREFIX}.mqfull"
    handle: Any
    mq = None
    if kind == "mq":
        mq = posix_ipc.MessageQueue(mq_name, posix_ipc.O_CREX, max_messages=queues.system_max_messages(),
                                    max_message_size=64)  # fmt: skip
        handle = mq_name
    elif kind == "mpq":
        handle = CTX.Queue(maxsize=1000)
    else:
        handle = faster_fifo.Queue(max_size_bytes=1_000_000)
    parent, child = CTX.Pipe()
    feeder = CTX.Process(target=_kept_full_feeder, args=(kind, handle, cpus[0]), daemon=True)
    client = CTX.Process(target=_kept_full_client, args=(kind, handle, child, n_op, n_batch, bsize, cpus[1]),
                         daemon=True)  # fmt: skip
    try:
        feeder.start()
        client.start()
        return U.child_result(parent, 120, f"{kind} kept-full client")
    finally:
        U.stop_processes([client, feeder])
        if mq is not None:
            mq.close()
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_message_queue(mq_name)
        elif kind == "mpq":
            handle.cancel_join_thread()
            handle.close()
        else:
            handle.close()


# ---- 2. wake-up latency ---------------------------------------------------------------


def _wake_waiter(mode: str, name: str, buf: Any, wfd: int, n: int, cpu: int | None) -> None:
    pin(cpu)
    mono = time.monotonic_ns
    arm = PAIR.pack(-1, -1)
    if mode == "pool":
        seg = Segment.attach(name)
        acq, rel = seg.core.acquire, seg.core.release
        for _ in range(n):
            os.write(wfd, arm)
            st, s, g = acq(LONG_NS)
            t = mono()
            if st == 0:
                rel(s, g)
            os.write(wfd, PAIR.pack(t, st))
        seg.close()
    else:
        wait = _shm.futex_wait
        for _ in range(n):
            (v,) = struct.unpack_from("<I", buf, 0)
            os.write(wfd, arm)
            r = 0
            while struct.unpack_from("<I", buf, 0)[0] == v:
                r = wait(buf, 0, v, LONG_NS)
            t = mono()
            os.write(wfd, PAIR.pack(t, r))


def _wake_publisher(mode: str, name: str, buf: Any, rfd: int, waiter: int, n: int, cpu: int | None,
                    conn: Any) -> None:  # fmt: skip
    try:
        pin(cpu)
        mono = time.monotonic_ns
        rnd = random.Random(os.getpid())
        me = os.getpid()
        lat = []
        codes = []
        seg = Segment.attach(name) if mode == "pool" else None
        for _ in range(n):
            read_exact(rfd, PAIR.size)  # the waiter is about to block
            mine = 0
            if seg is not None:
                w = seg.core.load(0)
                mine = L.make_word(L.State.SPAWN, L.word_gen(w), me)
                if not seg.core.cas(0, w, mine):
                    raise RuntimeError(f"cas from {L.describe_word(w)} failed")
            deadline = time.monotonic() + 5
            while True:
                asleep = state_of(waiter) == "S"
                if asleep and seg is not None:
                    _h, _t, tickets, turn = seg.core.queue_info()
                    asleep = tickets != turn
                if asleep:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the waiter never went to sleep")
                time.sleep(0.00005)
            time.sleep(rnd.uniform(0.0005, 0.0015))
            if seg is not None:
                t0 = mono()
                st = seg.core.publish(0, mine, b"")
                if st:
                    raise RuntimeError(f"publish returned {st}")
            else:
                t0 = mono()
                _shm.add32(buf, 0, 1)
                _shm.futex_wake(buf, 0, 1)
            t1, code = PAIR.unpack(read_exact(rfd, PAIR.size))
            lat.append(t1 - t0)
            codes.append(code)
        conn.send({"lat": lat, "codes": codes})
        if seg is not None:
            seg.close()
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def wake_block(mode: str, name: str, buf: Any, n: int, cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    rfd, wfd = os.pipe()
    parent, child = CTX.Pipe()
    waiter = CTX.Process(target=_wake_waiter, args=(mode, name, buf, wfd, n, cpus[1]), daemon=True)
    procs = [waiter]
    try:
        waiter.start()
        pub = CTX.Process(target=_wake_publisher, args=(mode, name, buf, rfd, waiter.pid, n, cpus[0], child),
                          daemon=True)  # fmt: skip
        procs.append(pub)
        pub.start()
        res = U.child_result(parent, 120, f"wake-up block ({mode}) publisher")
        waiter.join(10)
        return res
    finally:
        U.stop_processes(procs)
        os.close(rfd)
        os.close(wfd)


def _pingpong_side(buf: Any, mine: int, other: int, n: int, first: bool, cpu: int | None, conn: Any) -> None:
    pin(cpu)
    mono = time.monotonic_ns
    rd = struct.Struct("<I").unpack_from
    wait, wake, add = _shm.futex_wait, _shm.futex_wake, _shm.add32
    seen = 0  # a fresh mapping: read before the peer could have bumped it
    lat = []
    for _ in range(n):
        if first:
            t0 = mono()
            add(buf, other, 1)
            wake(buf, other, 1)
            while rd(buf, mine)[0] == seen:
                wait(buf, mine, seen, LONG_NS)
            seen = rd(buf, mine)[0]
            lat.append(mono() - t0)
        else:
            while rd(buf, mine)[0] == seen:
                wait(buf, mine, seen, LONG_NS)
            seen = rd(buf, mine)[0]
            add(buf, other, 1)
            wake(buf, other, 1)
    if conn is not None:
        conn.send(lat)


def pingpong(n: int, cpus: tuple[int | None, int | None]) -> list[int]:
    buf = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children
    parent, child = CTX.Pipe()
    b = CTX.Process(target=_pingpong_side, args=(buf, 64, 0, n, False, cpus[1], None), daemon=True)
    a = CTX.Process(target=_pingpong_side, args=(buf, 0, 64, n, True, cpus[0], child), daemon=True)
    try:
        b.start()
        a.start()
        lat: list[int] = U.child_result(parent, 60, "ping-pong")
        return lat[min(200, n // 10) :]
    finally:
        U.stop_processes([a, b])
        buf.close()


def wake_latency(n_per_block: int, blocks: int, pp_n: int) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    layouts: dict[str, tuple[int | None, int | None]] = {"same-core": (cpus[0], cpus[0])}
    if len(cpus) >= 2:
        layouts["cross-core"] = (cpus[0], cpus[1])
    name = f"{PREFIX}w"
    seg = Segment.create(name, 1, "process")
    buf = mmap.mmap(-1, 4096)
    lat: dict[str, list[int]] = {}
    bad: dict[str, int] = {}
    skip = min(10, n_per_block // 10)
    try:
        before = seg.counters()
        for _ in range(blocks):
            for lay, pair in layouts.items():
                for mode in ("pool", "futex"):
                    res = wake_block(mode, name, buf, n_per_block, pair)
                    key = f"{mode} {lay}"
                    lat.setdefault(key, []).extend(res["lat"][skip:])
                    bad[key] = bad.get(key, 0) + sum(1 for c in res["codes"] if c)
        after = seg.counters()
        counters = {k: after[k] - before[k] for k in ("acquires", "acquire_waits", "wakeups", "wait_timeouts")}
    finally:
        seg.close()
        seg.unlink()
        buf.close()
    pp = {lay: pingpong(pp_n, pair) for lay, pair in layouts.items()}
    return {"lat": lat, "bad": bad, "counters": counters, "pingpong_rtt": pp, "layouts": layouts}


# ---- main -----------------------------------------------------------------------------


GET_SIZES = (8, 256, 4096)


def get_vs_queues(samples: int, reps: int, cpu: int | None) -> dict[str, Any]:
    """Pool.get(timeout=0) through the public API (full pool, health off) at
    8, 256 and 4096 slots, side by side with a prefilled POSIX mq receive and
    multiprocessing.Queue.get, repetitions interleaved (the order rotates
    each repetition). Every row calls exactly what a user writes:
    ``pool.get(timeout=0)``, ``mq.receive()``, ``queue.get()``. Besides the
    ratio of the pooled p50s, the mq ratio of each repetition alone shows how
    much a loaded host moves it. Returns the rows and the target table."""
    raw: dict[str, list[int]] = {}
    batch: dict[str, list[float]] = {}
    timers: list[int] = []
    per_rep: list[float] = []  # net p50 ratio get256 / mq of each repetition alone
    for rep in range(reps):
        runs = [(f"get{n}", lambda n=n: api_rounds(samples // reps, cpu, n)) for n in GET_SIZES]
        runs += [("mq", lambda: mq_prefilled(samples // reps, cpu)),
                 ("mpq", lambda: mpq_prefilled(samples // reps, cpu))]  # fmt: skip
        # rotate the order: on a shared host load drifts, and no row should always run first or last
        shift = rep % len(runs)
        runs = runs[shift:] + runs[:shift]
        rep_p50: dict[str, float] = {}
        rep_timers: list[int] = []
        for key, fn in runs:
            res = fn()
            raw.setdefault(key, []).extend(res["first"])
            batch.setdefault(key, []).extend(res["batch_first"])
            timers.extend(res["timer"])
            rep_timers.extend(res["timer"])
            rep_p50[key] = U.summary(res["first"])["p50"]
        rt = U.summary(rep_timers)["p50"]
        per_rep.append((rep_p50["get256"] - rt) / (rep_p50["mq"] - rt))
    t50 = U.summary(timers)["p50"]
    st = {k: U.summary(v) for k, v in raw.items()}
    bst = {k: U.summary(v) for k, v in batch.items()}
    net = {k: round(v["p50"] - t50, 1) for k, v in st.items()}
    labels = {"mq": "posix_ipc.MessageQueue.receive, prefilled (10)",
              "mpq": "multiprocessing.Queue.get, prefilled (500)"}  # fmt: skip
    rows = [[f"Pool.get(timeout=0), {n} slots" if k.startswith("get") else labels[k], st[k]["p50"], st[k]["p99"],
             net[k], bst[k].get("p50"), st[k]["n"]]
            for k, n in [(f"get{n}", n) for n in GET_SIZES] + [("mq", 0), ("mpq", 0)]]  # fmt: skip
    t_rows = U.table(
        "Pool.get() through the public API, full pool, health off, against queue receives (ns)",
        ["operation", "per-op p50", "per-op p99", "net p50", "batch ns/op", "samples"],
        rows,
        f"net = per-op p50 minus the perf_counter_ns pair p50 ({t50} ns); batch: 256 gets (10 for the POSIX queue)"
        " timed together.",
    )  # fmt: skip
    head = "get256"
    worst = max(net[f"get{n}"] for n in GET_SIZES)
    targets = [
        ["Pool.get p50 <= 1 us (per-op, timer included, worst of 8/256/4096 slots)",
         max(st[f"get{n}"]["p50"] for n in GET_SIZES) / 1000, "<= 1 us",
         max(st[f"get{n}"]["p50"] for n in GET_SIZES) <= 1000],
        ["Pool.get / multiprocessing.Queue.get (net p50, 256 slots)", U.ratio(net[head], net["mpq"], 2), "<= 0.25",
         net[head] <= 0.25 * net["mpq"]],
        ["Pool.get / POSIX mq receive (net p50, 256 slots)", U.ratio(net[head], net["mq"], 2), "<= 0.5",
         net[head] <= 0.5 * net["mq"]],
        ["Pool.get / multiprocessing.Queue.get (batch, 256 slots)", U.ratio(bst[head]["p50"], bst["mpq"]["p50"], 2),
         "<= 0.25", bst[head]["p50"] <= 0.25 * bst["mpq"]["p50"]],
        ["Pool.get / POSIX mq receive (net p50, 256 slots), each repetition alone: median [min, max]",
         f"{statistics.median(per_rep):.2f} [{min(per_rep):.2f}, {max(per_rep):.2f}]", "<= 0.5",
         statistics.median(per_rep) <= 0.5],
        ["Pool.get / POSIX mq receive (batch, 256 slots)", U.ratio(bst[head]["p50"], bst["mq"]["p50"], 2), "<= 0.5",
         bst[head]["p50"] <= 0.5 * bst["mq"]["p50"]],
        ["Pool.get flat in pool size (net p50, worst / best of 8/256/4096)",
         U.ratio(worst, min(net[f"get{n}"] for n in GET_SIZES), 2), "<= 1.5",
         worst <= 1.5 * min(net[f"get{n}"] for n in GET_SIZES)],
    ]  # fmt: skip
    t_targets = U.table("Pool.get() targets", ["target", "measured", "goal", "met"], targets)
    return {
        "stats": st,
        "batch": bst,
        "net_p50_ns": net,
        "timer_p50_ns": t50,
        "mq_ratio_per_repetition": per_rep,
        "tables": [t_targets, t_rows],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (about 15 s)")
    ap.add_argument("--get", action="store_true", help="only Pool.get() against the queues (writes core_get.json)")
    ap.add_argument("--out", default="core.json")
    args = ap.parse_args()
    if args.get:
        t_start = time.monotonic()
        info = U.machine_info()
        print(f"bench_core --get: nproc {info['nproc']}, load {info['loadavg']}", flush=True)
        res = get_vs_queues(4000 if args.quick else 24000, 2 if args.quick else 6, None)
        U.publish("core_get.json" if args.out == "core.json" else args.out,
                  {**U.doc_head("core_get", info, t_start, args.quick, get_vs_queues.__doc__), **res})
        return 0
    q = args.quick
    samples = 4096 if q else 32768
    qsamples = 3000 if q else 20000
    t_start = time.monotonic()
    info = U.machine_info()
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu: int | None = None  # unpinned: the scheduler places client and feeder
    feeder_client = (None, None)
    print(f"bench_core: nproc {info['nproc']}, load {info['loadavg']}, python {info['python']}"
          f"{' (quick)' if q else ''}", flush=True)  # fmt: skip

    raw: dict[str, Any] = {}

    def merge(key: str, res: dict[str, Any]) -> None:
        """Repetitions are interleaved (load drifts on a shared host): pool their samples."""
        if key not in raw:
            raw[key] = res
            return
        dst = raw[key]
        for k, v in res.items():
            if isinstance(v, list):
                dst[k] = dst[k] + v
            elif k in ("bad_status", "rounds"):
                dst[k] += v
            elif k == "counters":
                dst[k] = {c: dst[k][c] + n for c, n in v.items()}

    reps = 1 if q else 3
    # -- 1 + 3: rounds (pool sizes), client API, prefilled queues, kept-full queues
    for rep in range(reps):
        print(f"  repetition {rep + 1}/{reps}: pool core 8/256/4096 slots, client API, queues prefilled and kept"
              " full ...", flush=True)  # fmt: skip
        for size in (8, 256, 4096):
            merge(f"core{size}", pool_rounds(size, samples // reps, client_cpu))
        merge("api", api_rounds(qsamples // 2 // reps, client_cpu))
        for kind, fn in (("mq", mq_prefilled), ("mpq", mpq_prefilled), ("ff", ff_prefilled)):
            merge(f"{kind}_pre", fn(qsamples // reps, client_cpu))
        for kind in ("mq", "mpq", "ff"):
            n = qsamples // reps
            merge(f"{kind}_full", kept_full(kind, n, max(8, n // CHUNK), CHUNK, feeder_client))
    # -- 2: wake-up
    print("  wake-up latency ...", flush=True)
    wake = wake_latency(60 if q else 300, 2 if q else 4, 2000 if q else 10000)

    # ---- summarise
    timer = U.summary(raw["core256"]["timer"])
    t50 = timer["p50"]

    def row_stats(r: dict[str, Any], which: str, timers: int = 1) -> dict[str, Any]:
        per = U.summary(r[which])
        bkey = "batch_" + which
        batch = U.summary(r[bkey]) if r.get(bkey) else {}
        bp50 = batch.get("p50")
        return {
            "per_op_ns": per,
            "net_p50_ns": round(per["p50"] - timers * t50, 1),
            "batch_ns_per_op": batch,
            "ops_per_s": round(1e9 / bp50) if bp50 else None,
        }

    stats: dict[str, dict[str, Any]] = {}
    for size in (8, 256, 4096):
        stats[f"core{size} acquire"] = row_stats(raw[f"core{size}"], "first")
        stats[f"core{size} release"] = row_stats(raw[f"core{size}"], "second")
        pair = [a + b for a, b in zip(raw[f"core{size}"]["first"], raw[f"core{size}"]["second"], strict=True)]
        bpair = [a + b for a, b in zip(raw[f"core{size}"]["batch_first"], raw[f"core{size}"]["batch_second"],
                                       strict=True)]  # fmt: skip
        # t2 - t0 holds two timer costs
        stats[f"core{size} acquire+release"] = row_stats({"first": pair, "batch_first": bpair}, "first", 2)
    stats["api get"] = row_stats(raw["api"], "first")
    stats["api release"] = row_stats(raw["api"], "second")
    for kind in ("mq", "mpq", "ff"):
        for how in ("pre", "full"):
            stats[f"{kind}_{how}"] = row_stats(raw[f"{kind}_{how}"], "first")

    headline = "core256"
    acq = stats[f"{headline} acquire"]
    pairst = stats[f"{headline} acquire+release"]

    labels = {
        "mq_full": "posix_ipc.MessageQueue.receive, kept full by a blocked sender",
        "mq_pre": "posix_ipc.MessageQueue.receive, prefilled (10), feeder idle",
        "mpq_full": "multiprocessing.Queue.get, kept full (maxsize 1000)",
        "mpq_pre": "multiprocessing.Queue.get, prefilled (500), feeder idle",
        "ff_full": "faster_fifo.Queue.get, kept full (1 MB)",
        "ff_pre": "faster_fifo.Queue.get, prefilled (1000), feeder idle",
    }
    rows = []

    def add_row(label: str, st: dict[str, Any], compare: bool = True) -> None:
        per, b = st["per_op_ns"], st["batch_ns_per_op"]
        rows.append([
            label, per["p50"], per["p99"], st["net_p50_ns"], b.get("p50"), st["ops_per_s"],
            U.ratio(st["net_p50_ns"], acq["net_p50_ns"]) if compare else None,
            U.ratio(b.get("p50", math.nan), acq["batch_ns_per_op"]["p50"]) if compare else None,
            U.ratio(b.get("p50", math.nan), pairst["batch_ns_per_op"]["p50"]) if compare else None,
        ])  # fmt: skip

    rows.append(["perf_counter_ns() pair (timer overhead)", timer["p50"], timer["p99"], 0.0, None, None, None, None,
                 None])  # fmt: skip
    add_row("pool core acquire(0), 256 slots", acq, compare=False)
    add_row("pool core release(slot, gen)", stats[f"{headline} release"], compare=False)
    add_row("pool core acquire + release", pairst, compare=False)
    add_row("client API Pool.get(timeout=0)", stats["api get"], compare=False)
    add_row("client API Lease.release() (+ terminate mq send)", stats["api release"], compare=False)
    for key in ("mq_full", "mq_pre", "mpq_full", "mpq_pre", "ff_full", "ff_pre"):
        add_row(labels[key], stats[key])

    t1 = U.table(
        "Taking one item from another process, uncontended (ns)",
        ["operation", "per-op p50", "per-op p99", "net p50", "batch ns/op", "ops/s (batch)",
         "net p50 ratio vs acquire", "batch ratio vs acquire", "batch ratio vs acquire+release"],
        rows,
        "per-op: one perf_counter_ns pair per op (its own cost is the first row); net = p50 - timer p50; batch: "
        "one pair around a list comprehension of 256 ops (10 for the prefilled POSIX queue, as many as it holds), "
        "p50 over the batches; ops/s = 1e9 / batch ns/op. Ratios: this row's time / the pool's (higher = the pool "
        "is faster).",
    )  # fmt: skip

    size_rows = []
    for size in (8, 256, 4096):
        a, r_, ar = (stats[f"core{size} {x}"] for x in ("acquire", "release", "acquire+release"))
        size_rows.append([size, a["per_op_ns"]["p50"], a["per_op_ns"]["p99"], a["batch_ns_per_op"]["p50"],
                          r_["per_op_ns"]["p50"], r_["batch_ns_per_op"]["p50"], ar["ops_per_s"],
                          raw[f"core{size}"]["counters"]["acquire_waits"], a["per_op_ns"]["n"]])  # fmt: skip
    t3 = U.table(
        "Acquire cost versus pool size (ns)",
        ["pool size", "acquire p50", "acquire p99", "acquire batch ns/op", "release p50", "release batch ns/op",
         "acquire+release ops/s", "acquire_waits", "samples"],
        size_rows,
    )  # fmt: skip

    wl = {k: U.summary(v, 1e-3, 2) for k, v in wake["lat"].items()}
    pp = {k: U.summary([x / 2 for x in v], 1e-3, 2) for k, v in wake["pingpong_rtt"].items()}
    wake_rows = []
    for lay in wake["layouts"]:
        p_, f_ = wl[f"pool {lay}"], wl[f"futex {lay}"]
        wake_rows.append([f"pool acquire wake-up ({lay})", p_["n"], p_["p50"], p_["p90"], p_["p99"],
                          U.ratio(p_["p50"], f_["p50"], 2)])  # fmt: skip
        wake_rows.append([f"bare futex wake-up ({lay})", f_["n"], f_["p50"], f_["p90"], f_["p99"], 1.0])
        h = pp[lay]
        wake_rows.append([f"futex ping-pong, RTT/2, hot ({lay})", h["n"], h["p50"], h["p90"], h["p99"],
                          None])  # fmt: skip
    t2 = U.table(
        "Wake-up latency of a blocked waiter (us, publish/wake stamp to return stamp)",
        ["mechanism", "n", "p50", "p90", "p99", "p50 ratio pool/futex"],
        wake_rows,
        "Waiter asleep (checked in /proc) 0.5-1.5 ms before the stamp; same-core = both processes pinned to CPU "
        f"{cpus[0]}; cross-core = publisher on CPU {cpus[0]}, waiter on CPU {cpus[-1]}. Blocks interleaved.",
    )  # fmt: skip

    # targets
    def met(x: float | None, ok: bool) -> bool | None:
        return None if x is None else ok

    targets = [
        ["uncontended acquire p50 < 0.5 us (per-op, timer included)", acq["per_op_ns"]["p50"] / 1000, "< 0.5 us",
         acq["per_op_ns"]["p50"] < 500],
        ["uncontended acquire p50 < 0.5 us (net of timer)", acq["net_p50_ns"] / 1000, "< 0.5 us",
         acq["net_p50_ns"] < 500],
    ]  # fmt: skip
    for key, goal, what in (("mq_full", 5, "POSIX mq receive, kept full"),
                            ("mq_pre", 5, "POSIX mq receive, prefilled, sender idle"),
                            ("mpq_full", 20, "multiprocessing.Queue get, kept full"),
                            ("mpq_pre", 20, "multiprocessing.Queue get, prefilled, feeder idle")):  # fmt: skip
        other = stats[key]
        for how, mine, theirs in (
            ("batch, acquire", acq["batch_ns_per_op"]["p50"], other["batch_ns_per_op"]["p50"]),
            ("batch, acquire+release", pairst["batch_ns_per_op"]["p50"], other["batch_ns_per_op"]["p50"]),
            ("per-op net p50, acquire", acq["net_p50_ns"], other["net_p50_ns"]),
        ):
            rr = U.ratio(theirs, mine)
            targets.append([f">= {goal}x faster than {what} ({how})", rr, f">= {goal}x", met(rr, (rr or 0) >= goal)])
    for lay in wake["layouts"]:
        rr = U.ratio(wl[f"pool {lay}"]["p50"], wl[f"futex {lay}"]["p50"], 2)
        targets.append([f"wake-up within 1.5x of a bare futex, p50 ({lay})", rr, "<= 1.5x",
                        met(rr, (rr or 99) <= 1.5)])  # fmt: skip
    big = stats["core4096 acquire"]["per_op_ns"]["p50"]
    grow = max(U.ratio(big, stats[f"core{n} acquire"]["per_op_ns"]["p50"], 2) or 99 for n in (8, 256))
    targets.append(["acquire does not grow with pool size (per-op p50, 4096 slots / 8 or 256 slots, worst)", grow,
                    "<= 1.5x", grow <= 1.5])  # fmt: skip
    growb = U.ratio(stats["core4096 acquire"]["batch_ns_per_op"]["p50"],
                    stats["core256 acquire"]["batch_ns_per_op"]["p50"], 2)  # fmt: skip
    targets.append(["acquire does not grow with pool size (batch ns/op, 4096 / 256 slots)", growb, "<= 1.5x",
                    met(growb, (growb or 99) <= 1.5)])  # fmt: skip
    t0 = U.table("Targets", ["target", "measured", "goal", "met"], targets)

    doc = {
        **U.doc_head("core", info, t_start, q, __doc__),
        "timer_overhead_ns": timer,
        "stats": stats,
        "wake_us": wl,
        "pingpong_half_rtt_us": pp,
        "wake_bad_codes": wake["bad"],
        "wake_counters": wake["counters"],
        "rounds": {k: {x: v[x] for x in ("k_per_round", "rounds", "warmup_rounds", "bad_status", "loop_ns",
                                         "counters") if x in v}
                   for k, v in raw.items() if "rounds" in v},
        "tables": [t0, t1, t3, t2],
    }
    U.publish(args.out, doc)
    bad = {k: v["bad_status"] for k, v in doc["rounds"].items() if v["bad_status"]}
    if bad:
        print(f"WARNING: non-OK statuses in rounds: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
