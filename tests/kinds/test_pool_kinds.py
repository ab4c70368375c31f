"""The sandbox kinds through the real pool: ``noodle run`` in a child
process, its stage workers, shared memory, queues and leases, a client that
attaches, leases, runs work inside and releases (no mocks, no direct calls
to the kinds' steps).

Parametrised over jail, command (the examples/command bubblewrap and plain
process scripts), microvm (QEMU, TCG here) and oci (runc, crun, runsc).
A kind whose tool cannot run on the host is skipped with the reason; on this
machine jail, command and microvm must run (test_sandbox_kinds_run_here).

Besides the fixtures' checks (processes titled with the pool, segment,
queues), every shutdown is checked for mounts, cgroups and sandbox processes
(bwrap, containers, QEMU) of the pool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from noodle.errors import KindUnavailable
from noodle.kinds import load_kind
from tests.conftest import REPO, wait_for, wait_full

EXAMPLES = os.path.join(str(REPO), "examples", "command")
PY = "/usr/bin/python3"
CGROUP_ROOTS = ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")


# -- the cases ---------------------------------------------------------------------


@dataclass(frozen=True)
class KindCase:
    id: str
    kind: str
    config: str | None = None
    args: tuple[str, ...] = ()
    python: bool = True  # the instance runs the Python agent (run/call), else exec only
    start_timeout: float = 60.0  # attach + first fill (microvm boots its template first)
    op_timeout: float = 30.0  # one get / refill
    runtime: str = ""  # oci only
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, supervisor: Callable[..., Any], *more: str) -> Any:
        return supervisor("--kind", self.kind, "--pool-size", "2", *self.args, *more, config=self.config)


def _command_bwrap_config() -> str:
    return f"""
[kinds.command]
spawn_mode = "oneshot"
spawn = "{EXAMPLES}/bwrap-spawn.sh"
health = "{EXAMPLES}/health.sh {{socket}}"
terminate = "{EXAMPLES}/bwrap-terminate.sh {{pid}}"
clean = "{EXAMPLES}/bwrap-clean.sh {{dir}}"
timeout = 20.0
env = {{ PYTHON = "{PY}" }}
"""


def _command_plain_config() -> str:
    return f"""
[kinds.command]
spawn_mode = "process"
spawn = "exec {EXAMPLES}/plain-spawn.sh"
timeout = 20.0
env = {{ PYTHON = "{PY}" }}
"""


def _oci_config(runtime: str) -> str:
    return f'[kinds.oci]\nruntime = "{runtime}"\n'


JAIL = KindCase("jail", "jail", "[kinds.jail]\nmemory_limit = 268435456\npids_limit = 64\n")
JAIL_NO_CGROUP = KindCase("jail-nocgroup", "jail", "[kinds.jail]\ncgroup = false\n")
COMMAND_BWRAP = KindCase("command-bwrap", "command", _command_bwrap_config())
COMMAND_PLAIN = KindCase("command-plain", "command", _command_plain_config())
MICROVM = KindCase(
    "microvm",
    "microvm",
    '[kinds.microvm]\naccel = "tcg"\n',  # this host's /dev/kvm is a PVM one: skip the KVM probe
    ("--step-timeout", "180", "--worker-timeout", "120"),
    python=False,
    start_timeout=300.0,
    op_timeout=120.0,
)
OCI = {
    rt: KindCase(f"oci-{rt}", "oci", _oci_config(rt), ("--step-timeout", "90"), runtime=rt, op_timeout=60.0)
    for rt in ("runc", "crun", "runsc")
}
CASES = [JAIL, COMMAND_BWRAP, COMMAND_PLAIN, MICROVM, *OCI.values()]
MUST_RUN_HERE = [JAIL, COMMAND_BWRAP, COMMAND_PLAIN, MICROVM]


def unavailable(case: KindCase) -> str | None:
    """Why the case's tool cannot run on this host, or None. Only a real
    absence (not a failure of the kind) is a reason."""
    if case.kind in ("jail", "oci") and os.geteuid() != 0:
        return f"the {case.kind} kind needs root"
    if case.kind == "jail":
        if not shutil.which("bwrap") and not shutil.which("unshare"):
            return "neither bwrap (Debian package bubblewrap) nor unshare (util-linux) is installed"
        if not shutil.which("setpriv"):
            return "setpriv missing (Debian package util-linux)"
        from noodle.host.cgroup import detect

        try:
            detect()
        except KindUnavailable as exc:
            return str(exc)
    elif case.kind == "command":
        if not os.path.exists(PY):
            return f"{PY} missing (Debian package python3)"
        if case.id == "command-bwrap" and not shutil.which("bwrap"):
            return "bwrap missing (Debian package bubblewrap)"
    elif case.kind == "microvm":
        from noodle.kinds.microvm import DEFAULT_IMAGE_DIR

        if not shutil.which("qemu-system-x86_64"):
            return "qemu-system-x86_64 missing (Debian package qemu-system-x86)"
        for f in ("vmlinux", "initramfs.cpio.gz"):
            if not os.path.isfile(os.path.join(DEFAULT_IMAGE_DIR, f)):
                return f"{DEFAULT_IMAGE_DIR}/{f} missing: run noodle image build microvm"
    elif case.kind == "oci":
        try:
            from noodle.kinds.oci import DEFAULT_ROOTFS, IMAGE_MARKER
        except ImportError as exc:  # pragma: no cover - only while the kind is being written
            return f"oci kind not finished: {exc}"
        if not shutil.which(case.runtime):
            return f"{case.runtime} not installed (Debian package {case.runtime})"
        if not os.path.isfile(os.path.join(DEFAULT_ROOTFS, IMAGE_MARKER)):
            return f"no OCI rootfs at {DEFAULT_ROOTFS}: run noodle image build oci"
    return None


def case_params(cases: list[KindCase], timeout: float = 400) -> list[Any]:
    """pytest params with a skip mark naming the missing tool, and a generous
    per-case timeout (QEMU in TCG gets more)."""
    out = []
    for case in cases:
        why = unavailable(case)
        marks: list[Any] = [pytest.mark.timeout(timeout * 2 if case.kind == "microvm" else timeout)]
        if why:
            marks.append(pytest.mark.skip(reason=why))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# -- host-side inspection -----------------------------------------------------------


def _word(pool: str) -> re.Pattern[str]:
    # "t12x1" must not match "t12x10"
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(pool)}(?![A-Za-z0-9])")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def proc_start(pid: int) -> int | None:
    """Start time of a live, non-zombie pid."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    rest = raw.rsplit(b")", 1)[1].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def sandbox_processes(pool: str, run_dir: str) -> list[tuple[int, str]]:
    """Live processes that belong to the pool's sandboxes (and anything else
    of the pool): their command line names the pool's run dir or the pool
    (QEMU's guest=noodle.<pool>.<slot>, bwrap's binds, runsc's bundle), their
    cgroup names the pool (jail <pool>.<slot>, oci noodle-<pool>-<slot>) or
    their environment carries NOODLE_POOL=<pool> (command steps)."""
    word = _word(pool)
    me = os.getpid()
    env_mark = f"NOODLE_POOL={pool}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        cmd = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        cg = _read(f"/proc/{pid}/cgroup").decode(errors="replace")
        hit = (run_dir in cmd or word.search(cmd) or word.search(cg)
               or env_mark in _read(f"/proc/{pid}/environ"))  # fmt: skip
        if hit and proc_start(pid) is not None:
            found.append((pid, cmd[:160] or f"[{_read(f'/proc/{pid}/comm').decode().strip()}]"))
    return found


def pool_mounts(pool: str, run_dir: str) -> list[str]:
    word = _word(pool)
    out = []
    real = os.path.realpath(run_dir)
    for line in _read("/proc/self/mountinfo").decode(errors="replace").splitlines():
        parts = line.split()
        point = parts[4].replace("\\040", " ")
        source = parts[parts.index("-") + 2] if "-" in parts else ""
        if point.startswith((run_dir + "/", real + "/")) or point in (run_dir, real) or word.search(source):
            out.append(f"{source} on {point}")
    return out


def pool_cgroups(pool: str) -> list[str]:
    """cgroup directories named after the pool in any hierarchy (jail:
    noodle/<pool>.<slot>; oci: .../noodle-<pool>-<slot>, nested under the
    worker's cgroup)."""
    word = _word(pool)
    out = []
    for root in CGROUP_ROOTS:
        if not os.path.isdir(root):
            continue
        base = root.count("/")
        for dirpath, dirs, _files in os.walk(root):
            for d in dirs:
                if word.search(d):
                    out.append(os.path.join(dirpath, d))
            if dirpath.count("/") - base >= 6:
                dirs[:] = []
    return out


def leftovers(pool: str, run_dir: str) -> list[str]:
    found = [f"process {pid}: {cmd}" for pid, cmd in sandbox_processes(pool, run_dir)]
    found += [f"mount {m}" for m in pool_mounts(pool, run_dir)]
    found += [f"cgroup {c}" for c in pool_cgroups(pool)]
    if os.path.exists(f"/dev/shm/noodle.{pool}"):
        found.append(f"segment /dev/shm/noodle.{pool}")
    if os.path.isdir("/dev/mqueue"):
        found += [f"queue {q}" for q in os.listdir("/dev/mqueue") if q.startswith(f"noodle.{pool}.")]
    return found


def assert_no_leftovers(pool: str, run_dir: str, wait: float = 15.0) -> None:
    deadline = time.monotonic() + wait
    while (left := leftovers(pool, run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        for item in left:  # do not let one test's leak break the next
            if item.startswith("process "):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(item.split()[1].rstrip(":")), signal.SIGKILL)
    assert not left, f"pool {pool} left behind after shutdown: {left}"


def instance_pids(pool: Any, descriptor: dict[str, Any]) -> dict[int, int]:
    """Host pids of one instance (pid -> start time, so a reused pid never
    counts): the kind's own view plus the descriptor's pid fields."""
    kind = load_kind(pool.kind_name)
    pids = set(kind.instance_pids(descriptor))
    for key in ("pid", "agent_pid"):
        if isinstance(descriptor.get(key), int):
            pids.add(descriptor[key])
    out = {}
    for pid in pids:
        start = proc_start(pid)
        if start is not None:
            out[pid] = start
    return out


def alive_of(pids: dict[int, int]) -> list[int]:
    return [pid for pid, start in pids.items() if proc_start(pid) == start]


def ready_descriptor(pool: Any, slot: int) -> dict[str, Any]:
    return dict(msgpack.unpackb(pool._seg.descriptor_bytes(slot), strict_map_key=False))


def do_work(case: KindCase, lease: Any, timeout: float = 60.0) -> None:
    inst = lease.instance
    if case.python:
        assert inst.run("1+1", timeout=timeout).result == 2
    else:
        res = inst.exec(["echo", "hi"], timeout=timeout)
        assert (res.returncode, res.stdout) == (0, "hi\n"), res


def kill_instance(pool: Any, descriptor: dict[str, Any]) -> None:
    """SIGKILL the whole instance behind the pool's back."""
    pids = instance_pids(pool, descriptor)
    assert pids, f"no live process for {descriptor}"
    pid = descriptor.get("pid")
    if isinstance(pid, int):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # a session leader's group: bwrap and what it runs
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    wait_for(lambda: not alive_of(pids), 30, f"instance {sorted(pids)} to die")


# -- this machine must really run them ------------------------------------------------


def test_sandbox_kinds_run_here() -> None:
    """jail, command (bubblewrap and plain) and microvm have their tools on
    this machine, so their cases below must not skip."""
    reasons = {case.id: unavailable(case) for case in MUST_RUN_HERE}
    assert reasons == dict.fromkeys(reasons), reasons


# -- lease, work, release, refill --------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CASES))
def test_lease_run_release_refill(case: KindCase, supervisor: Callable[..., Any]) -> None:
    sup = case.start(supervisor)
    pool = sup.attach(timeout=case.start_timeout)
    try:
        snap = wait_full(pool, case.start_timeout)
        assert sum(snap["states"].values()) == 2
        lease = pool.get(timeout=case.op_timeout)
        slot, gen = lease.slot, lease.generation
        assert pool.stats()["states"]["leased"] == 1
        do_work(case, lease)
        pids = instance_pids(pool, lease.descriptor)
        assert pids, f"the leased instance has no live process: {lease.descriptor}"
        assert lease.release() is True
        assert lease.release() is False
        # destroyed, not reused
        wait_for(lambda: not alive_of(pids), case.op_timeout, f"released instance {sorted(pids)} to die")
        snap = wait_full(pool, case.op_timeout)
        assert snap["counters"]["releases"] >= 1 and snap["counters"]["terminates"] >= 1
        # a fresh instance on that slot: a new generation, new processes
        leases = [pool.get(timeout=case.op_timeout) for _ in range(2)]
        again = next(x for x in leases if x.slot == slot)
        assert again.generation > gen
        new_pids = instance_pids(pool, again.descriptor)
        assert new_pids and not set(new_pids.items()) & set(pids.items())
        for x in leases:
            do_work(case, x)
            x.release()
        wait_full(pool, case.op_timeout)
    finally:
        pool.close()
    assert sup.stop(timeout=120) == 0
    assert_no_leftovers(sup.name, sup.run_root)


# -- health on get ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CASES))
def test_health_on_get_replaces_a_killed_instance(case: KindCase, supervisor: Callable[..., Any]) -> None:
    sup = case.start(supervisor, "--health-on-get")
    pool = sup.attach(timeout=case.start_timeout)
    try:
        wait_full(pool, case.start_timeout)
        victim = ready_descriptor(pool, 0)
        kill_instance(pool, victim)
        kind = load_kind(pool.kind_name)
        assert not kind.client_health(victim, 2.0)
        got = [pool.get(timeout=case.op_timeout) for _ in range(2)]
        for lease in got:
            assert lease.descriptor != victim
            do_work(case, lease)
        assert pool.stats()["counters"]["unhealthy_on_get"] >= 1
        for lease in got:
            lease.release()
        snap = wait_full(pool, case.op_timeout)
        assert sum(snap["states"].values()) == 2
    finally:
        pool.close()
    assert sup.stop(timeout=120) == 0
    assert_no_leftovers(sup.name, sup.run_root)


# -- shutdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CASES))
def test_sigterm_shutdown_leaves_nothing(case: KindCase, supervisor: Callable[..., Any]) -> None:
    """One instance ready, one leased and never returned: SIGTERM stops both,
    and nothing of the pool is left on the host."""
    sup = case.start(supervisor, "--drain-timeout", "1")
    pool = sup.attach(timeout=case.start_timeout)
    try:
        wait_full(pool, case.start_timeout)
        held = pool.get(timeout=case.op_timeout)
        other = 1 - held.slot
        pids = instance_pids(pool, held.descriptor)
        pids.update(instance_pids(pool, ready_descriptor(pool, other)))
        # the detector sees the running sandboxes (else its empty answer below proves nothing)
        running = sandbox_processes(sup.name, sup.run_root)
        assert {p for p, _ in running} >= set(alive_of(pids)), (running, pids)
        if case.kind == "jail":
            assert len(pool_cgroups(sup.name)) >= 2 and pool_mounts(sup.name, sup.run_root)
        do_work(case, held)
        code = sup.stop(timeout=120)
        assert code == 0, sup.logtext()
        assert held.release() is False  # revoked at shutdown
    finally:
        pool.close()
    assert not alive_of(pids), f"instances alive after shutdown: {alive_of(pids)}"
    assert_no_leftovers(sup.name, sup.run_root)
    if case.kind == "microvm":
        assert not os.path.exists(os.path.join(sup.run_root, sup.name, "microvm")), "template left behind"


PROCESS = KindCase("process", "process")
STOP_DRAIN = 1.0
# A hang detector, not a speed bound: the drain (STOP_DRAIN), the revoked
# leases' terminate and clean steps (each bounded by step_timeout, 90 s for
# oci) and the workers' stop (SIGTERM, 5 s, SIGKILL, 5 s) all have their own
# bounds; a stop that outlives their sum is stuck.
STOP_BOUND = STOP_DRAIN + 90 + 10 + 60


@pytest.mark.parametrize("case", case_params([PROCESS, *CASES], timeout=900))
def test_repeated_stop_of_a_loaded_pool_is_bounded(
    case: KindCase, supervisor: Callable[..., Any], soak: bool
) -> None:
    """Start, load (a lease never given back while a client churns through
    get / work / release), SIGTERM, again: every stop ends with exit 0 within
    the bound its own timeouts make and leaves nothing of the pool behind; a
    stop that hung once (a worker whose exit was collected elsewhere) would
    hang here. Rounds: 2, 10 with --soak; the stop times are printed."""
    import threading

    import noodle

    times = []
    for _round in range(10 if soak else 2):
        sup = case.start(supervisor, "--drain-timeout", str(STOP_DRAIN))
        pool = sup.attach(timeout=case.start_timeout)
        done = threading.Event()
        served = [0]

        def churn(pool: Any = pool, done: threading.Event = done, served: list[int] = served) -> None:
            while not done.is_set():
                try:
                    with pool.get(timeout=1.0) as lease:
                        do_work(case, lease)
                        served[0] += 1
                except (noodle.PoolShuttingDown, noodle.PoolNotFound, noodle.PoolClosed):
                    return
                except noodle.NoodleError:
                    continue  # starved for a moment, or an instance revoked under us

        try:
            wait_full(pool, case.start_timeout)
            held = pool.get(timeout=case.op_timeout)
            do_work(case, held)
            worker = threading.Thread(target=churn, daemon=True)
            worker.start()
            wait_for(lambda served=served: served[0] >= 2, case.op_timeout * 2, "the churning client to be served")
            t0 = time.monotonic()
            code = sup.stop(timeout=STOP_BOUND)
            times.append(time.monotonic() - t0)
            assert code == 0, sup.logtext()
            done.set()
            worker.join(60)
            assert not worker.is_alive(), "a client stayed blocked after the pool stopped"
            assert held.release() is False  # revoked by the drain
        finally:
            done.set()
            pool.close()
        assert_no_leftovers(sup.name, sup.run_root)
    print(f"STOP {case.id}: {len(times)} loaded stops, seconds " + " ".join(f"{t:.2f}" for t in times))


# -- the shipped example config ---------------------------------------------------------------

EXAMPLE_CONFIGS = ("bwrap.toml", "plain.toml")


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_example_configs_are_loadable(name: str) -> None:
    """Each shipped example is one pool's config for ``noodle run --config``:
    the loader accepts it and the command kind accepts its options."""
    from noodle import config as cfgmod
    from noodle.kinds.command import CommandKind

    cfg = cfgmod.load(os.path.join(EXAMPLES, name), {})
    cfgmod.validate_kind(cfg)
    assert cfg.kind == "command" and cfg.kind_options["spawn"], cfg
    # the scripts the templates name exist, relative to the repository root
    for step in ("clean", "spawn", "health", "terminate"):
        template = cfg.kind_options.get(step)
        if template:
            script = next(w for w in template.split() if w.endswith(".sh"))
            assert os.path.isfile(os.path.join(str(REPO), script)), (step, script)
    assert CommandKind.validate_options(cfg.kind_options)["base_dir"] is None  # cwd-relative by default
    assert not os.path.exists(os.path.join(EXAMPLES, "pool.toml")), "the old multi-pool file is back"


@pytest.mark.parametrize("case", case_params([COMMAND_BWRAP], timeout=120))
def test_example_relative_templates_fill_the_pool(case: KindCase, supervisor: Callable[..., Any]) -> None:
    """examples/command/bwrap.toml as it ships (its relative script paths),
    with the supervisor started from the repository root as its comment
    says: the pool fills, and a lease works inside the sandbox."""
    with open(os.path.join(EXAMPLES, "bwrap.toml"), encoding="utf-8") as f:
        text = f.read()
    sup = supervisor("--kind", "command", "--pool-size", "2", config=text)
    pool = sup.attach(timeout=30)
    try:
        wait_for(lambda: pool.stats()["states"]["ready"] == 2 or "not found" in sup.logtext(), 30,
                 "the pool to fill or a step to fail")  # fmt: skip
        assert pool.stats()["states"]["ready"] == 2, sup.logtext()[-800:]
        with pool.get(timeout=case.op_timeout) as lease:
            assert lease.instance.run("1+1").result == 2
    finally:
        pool.close()


# -- process-mode terminate must take the spawn command's children along ----------------------


@pytest.mark.parametrize("case", case_params([COMMAND_PLAIN], timeout=120))
def test_command_process_mode_terminate_kills_the_spawned_children(
    case: KindCase, supervisor: Callable[..., Any]
) -> None:
    """Reproduction through the pool: a process-mode spawn that starts a
    child and waits (no TERM trap, unlike plain-spawn.sh). The docstring
    promises terminate 'kills its process group'."""
    marker = f"noodle-child-{os.getpid()}-{time.monotonic_ns()}"
    # the child is a shell sleeping for ever, with the marker as its $0
    config = f"[kinds.command]\nspawn_mode = \"process\"\nspawn = \"sh -c 'sleep 1000' {marker} & echo ready; wait\"\n"
    sup = supervisor("--kind", "command", "--pool-size", "2", config=config)
    pool = sup.attach(timeout=30)
    children: dict[int, int] = {}
    try:
        wait_full(pool, 30)
        lease = pool.get(timeout=10)
        pid = int(lease.descriptor["pid"])
        children = wait_for(lambda: {p: s for p, s in _with_marker(marker).items() if _ppid(p) == pid}, 10,
                            "the spawn command's child")  # fmt: skip
        assert lease.release() is True
        wait_for(lambda: proc_start(pid) is None, 30, "the instance's shell to be terminated")
        wait_full(pool, 30)
        time.sleep(0.5)
        assert not alive_of(children), f"children of a terminated instance survive: {alive_of(children)}"
    finally:
        for p in list(children) + list(_with_marker(marker)):  # never leave the bug's leftovers
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        pool.close()


def _with_marker(marker: str) -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and marker.encode() in _read(f"/proc/{entry}/cmdline"):
            start = proc_start(int(entry))
            if start is not None:
                out[int(entry)] = start
    return out


def _ppid(pid: int) -> int:
    raw = _read(f"/proc/{pid}/stat")
    return int(raw.rsplit(b")", 1)[1].split()[1]) if raw else 0
