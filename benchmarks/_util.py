"""Shared helpers of the benchmarks: statistics, machine info, markdown,
JSON results, and clean-up of every pool, segment, queue and process a
benchmark starts (by pid, never by name)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

if ROOT not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, ROOT)


# ---- statistics ------------------------------------------------------------------


def pct(sorted_xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_xs:
        return float("nan")
    k = min(len(sorted_xs) - 1, max(0, round(p / 100.0 * (len(sorted_xs) - 1))))
    return float(sorted_xs[k])


def summary(xs: Iterable[float], scale: float = 1.0, digits: int | None = 3,
            stats: Sequence[str] = ("n", "min", "p50", "p90", "p99", "mean"), suffix: str = "",
            median: bool = False) -> dict[str, float]:  # fmt: skip
    """Statistics of xs (each multiplied by scale), in the order of ``stats``:
    ``n``, ``min``, ``max``, ``mean`` or a nearest-rank percentile ``pNN``
    (``p50`` is the interpolated median instead when ``median``). Every key
    but ``n`` gets ``suffix``; values are rounded to ``digits`` unless None."""
    s = sorted(x * scale for x in xs)
    if not s:
        return {"n": 0}

    def rnd(v: float) -> float:
        return v if digits is None else round(v, digits)

    out: dict[str, float] = {}
    for st in stats:
        if st == "n":
            out["n"] = len(s)
            continue
        if st == "min":
            v = s[0]
        elif st == "max":
            v = s[-1]
        elif st == "mean":
            v = sum(s) / len(s)
        elif st == "p50" and median:
            v = statistics.median(s)
        elif st.startswith("p"):
            v = pct(s, float(st[1:]))
        else:
            raise ValueError(f"unknown statistic {st!r}")
        out[st + suffix] = rnd(v)
    return out


def summary_ms(xs: Iterable[float], stats: Sequence[str] = ("p50", "p90", "mean"), digits: int | None = None,
               median: bool = False) -> dict[str, float]:  # fmt: skip
    """Seconds in, milliseconds out, keyed ``p50_ms``, ``p90_ms``, ... (the kind benchmarks' format)."""
    return summary(xs, 1e3, digits, stats, "_ms", median)


def ratio(a: float, b: float, digits: int = 1) -> float | None:
    if not b or b != b or a != a:
        return None
    return round(a / b, digits)


# ---- machine ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": model,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def host_info() -> dict[str, Any]:
    """The short host description of the kind benchmarks' results."""
    return {"machine": platform.machine(), "kernel": platform.release(), "cpus": os.cpu_count()}


# ---- output ------------------------------------------------------------------------


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "-"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(out)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> dict[str, Any]:
    """A table as stored in the results JSON (report.py renders these)."""
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "note": note}


def print_tables(tables: Sequence[dict[str, Any]]) -> None:
    for t in tables:
        print(f"\n### {t['title']}\n")
        print(md_table(t["columns"], t["rows"]))
        if t.get("note"):
            print(f"\n{t['note']}")
    sys.stdout.flush()


def write_json(name: str, doc: dict[str, Any]) -> str:
    """Write doc to benchmarks/results/<name> (or to ``name`` itself when it
    has a directory part), atomically, with a trailing newline."""
    path = name if os.path.dirname(name) else os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def doc_head(benchmark: str, info: dict[str, Any], t_start: float, quick: bool, method: str | None) -> dict[str, Any]:
    """The first keys of a tables-style results file (core.json, pool.json)."""
    return {
        "benchmark": benchmark,
        "machine": info,
        "loadavg_end": loadavg(),
        "seconds": round(time.monotonic() - t_start, 1),
        "quick": quick,
        "method": method,
    }


def publish(name: str, doc: dict[str, Any]) -> str:
    """Write a tables-style results file, print its tables and where it went."""
    path = write_json(name, doc)
    print_tables(doc["tables"])
    print(f"\nwrote {path} in {doc['seconds']} s (load {doc['machine']['loadavg']} -> {doc['loadavg_end']})")
    return path


# ---- clean-up ------------------------------------------------------------------------


def ipc_leftovers(pool: str) -> list[str]:
    """Segment and queue files still present for pool ``pool``."""
    out = []
    for d in ("/dev/shm", "/dev/mqueue"):
        with contextlib.suppress(OSError):
            for n in os.listdir(d):
                if n == f"noodle.{pool}" or n.startswith(f"noodle.{pool}."):
                    out.append(os.path.join(d, n))
    return out


def unlink_ipc(pool: str) -> list[str]:
    """Remove what is left of pool ``pool``'s segment and queues; returns what was removed."""
    import posix_ipc

    removed = []
    for path in ipc_leftovers(pool):
        name = "/" + os.path.basename(path)
        with contextlib.suppress(posix_ipc.ExistentialError):
            if path.startswith("/dev/shm"):
                posix_ipc.unlink_shared_memory(name)
            else:
                posix_ipc.unlink_message_queue(name)
            removed.append(path)
    return removed


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make this process the subreaper of its orphaned descendants, as the
    supervisor is (raises OSError if the kernel refuses)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def run_as_worker(fn: Callable[[], int]) -> int:
    """Run ``fn`` in a forked worker while this process, a subreaper like
    the supervisor, reaps the worker and every orphan it leaves (runsc's
    delete waits until its sandbox's processes are reaped)."""
    become_subreaper()
    worker = os.fork()
    if worker == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    while True:
        pid, status = os.wait()
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            break
    reap_orphans()
    return code


def reap_orphans() -> None:
    """Collect every child that has already exited, without blocking."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _start_time(pid: int) -> int:
    from noodle.host.proc import start_time

    return start_time(pid) or 0


def kill_pids(pids: Iterable[tuple[int, int]]) -> list[int]:
    """SIGKILL every (pid, start time) that is still that process."""
    from noodle.host.proc import ProcessIdentity

    killed = []
    for pid, st in pids:
        if ProcessIdentity(pid, st).signal(signal.SIGKILL):
            killed.append(pid)
    return killed


def child_result(conn: Any, timeout: float, what: str) -> Any:
    """The next message from a child we started, on pipe end ``conn``;
    raises if none comes within ``timeout`` s or it is ``{"error": ...}``."""
    if not conn.poll(timeout):
        raise RuntimeError(f"{what} timed out")
    res = conn.recv()
    if isinstance(res, dict) and "error" in res:
        raise RuntimeError(f"{what} failed:\n{res['error']}")
    return res


def stop_processes(procs: Iterable[Any], grace: float = 2.0) -> None:
    """Terminate multiprocessing Processes we started (by pid), then kill."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)


# ---- one single-use cycle of a sandbox kind -----------------------------------------

KIND_STEPS = ("prepare", "spawn", "first_result", "terminate", "clean")


def kind_cycle(kind: Any, slot: Any, first_result: Callable[[Any], object],
               close_in_first_result: bool = True) -> dict[str, float]:  # fmt: skip
    """prepare, spawn, first result through a fresh client handle, terminate
    and clean ``slot`` of ``kind`` (in this process); seconds per step, keyed
    by KIND_STEPS. Closing the handle is timed with first_result, or with
    terminate when not ``close_in_first_result``."""

    def close(handle: Any) -> None:
        if hasattr(handle, "close"):
            handle.close()

    a = time.perf_counter()
    kind.prepare(slot)
    b = time.perf_counter()
    desc = kind.spawn(slot)
    c = time.perf_counter()
    handle = type(kind).client_handle(desc)
    try:
        first_result(handle)
    finally:
        if close_in_first_result:
            close(handle)
    d = time.perf_counter()
    if not close_in_first_result:
        close(handle)
    kind.terminate(slot, desc)
    e = time.perf_counter()
    kind.clean(slot)
    f = time.perf_counter()
    return dict(zip(KIND_STEPS, (b - a, c - b, d - c, e - d, f - e), strict=True))


# ---- a pool run by `noodle run` -------------------------------------------------------


class PoolProcess:
    """``python -m noodle run`` in a child; stop() sends SIGTERM to its pid,
    waits, and kills every descendant it recorded if anything is left."""

    def __init__(self, name: str, pool_size: int, workers: int | None = None, run_dir: str = "",
                 extra: Sequence[str] = ()) -> None:  # fmt: skip
        self.name = name
        self.pool_size = pool_size
        self.run_dir = run_dir or f"/tmp/nb{os.getpid()}"
        self.cmd = [sys.executable, "-m", "noodle", "run", "--name", name, "--pool-size", str(pool_size),
                    "--run-dir", self.run_dir, "--log-level", "WARNING", *extra]  # fmt: skip
        if workers:
            self.cmd += ["--workers", str(workers)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join("/tmp", f"noodle-bench-{name}.log")
        self._known: dict[int, int] = {}
        self.fill_seconds = float("nan")

    def start(self, timeout: float = 120.0) -> None:
        from noodle.errors import PoolNotFound

        leftover = ipc_leftovers(self.name)
        if leftover:
            raise RuntimeError(f"pool {self.name!r} already has {leftover}")
        os.makedirs(self.run_dir, exist_ok=True)
        log = open(self.log_path, "wb")  # handed to the child
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     start_new_session=True)  # its own session, as under systemd
        log.close()
        import noodle

        pool = None
        try:
            while pool is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"noodle run exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    pool = noodle.attach(self.name)
                except PoolNotFound:
                    if time.monotonic() - t0 > timeout:
                        raise
                    time.sleep(0.02)
            self.wait_full(pool, timeout - (time.monotonic() - t0))
            self.fill_seconds = time.monotonic() - t0
        finally:
            if pool is not None:
                pool.close()
        self.remember()

    def wait_full(self, pool: Any, timeout: float) -> float:
        t0 = time.monotonic()
        while pool.stats()["states"]["ready"] < self.pool_size:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"pool {self.name} not full after {timeout:.0f} s: {pool.stats()['states']}")
            self.remember()
            time.sleep(0.002)
        return time.monotonic() - t0

    def remember(self) -> None:
        """Record the supervisor's descendants (with start times) for clean-up."""
        from noodle.host.proc import descendants_of

        if self.proc is None:
            return
        for pid in descendants_of(self.proc.pid):
            if pid not in self._known:
                st = _start_time(pid)
                if st:
                    self._known[pid] = st

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proc is not None:
            self.remember()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                out["exit_code"] = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out["exit_code"] = self.proc.wait()
                out["killed_supervisor"] = True
            stray = kill_pids(self._known.items())
            if stray:
                out["killed_strays"] = stray
            self.proc = None
        removed = unlink_ipc(self.name)
        if removed:
            out["removed_ipc"] = removed
        # keep what the supervisor complained about in the results, drop the file
        with contextlib.suppress(OSError):
            with open(self.log_path, errors="replace") as f:
                bad = [ln.rstrip() for ln in f if " ERROR " in ln or " CRITICAL " in ln]
            if bad:
                out["log_errors"] = bad[:20]
                out["log_error_count"] = len(bad)
            os.unlink(self.log_path)
        import shutil

        shutil.rmtree(self.run_dir, ignore_errors=True)
        return out

    def __enter__(self) -> PoolProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
