"""The command line as an operator meets it: help, validation, pipes,
exit statuses, $NOODLE_POOL, JSON logs, config mistakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for, wait_full

pytestmark = pytest.mark.timeout(120)


def noodle(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "noodle", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env, input=stdin)  # fmt: skip


def test_version() -> None:
    res = noodle("--version")
    assert res.returncode == 0 and res.stdout.startswith("noodle (pool-noodle) ")


def test_help_names_defaults_kinds_and_the_environment() -> None:
    res = noodle("run", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for want in ("(default: 8)", "(default: 60.0)", "process", "jail", "oci", "microvm", "command", "$NOODLE_POOL",
                 "--metrics", "--log-format"):  # fmt: skip
        assert want in text, want
    for cmd in ("status", "get", "exec", "demo", "unit", "image"):
        res = noodle(cmd, "--help")
        assert res.returncode == 0, cmd
        assert "default" in res.stdout, cmd


@pytest.mark.parametrize("argv", [
    ["status", "--watch", "-1"], ["status", "--watch", "0"], ["status", "--watch", "nan"],
    ["exec", "--run-timeout", "-1", "1"], ["exec", "--timeout", "inf", "1"], ["get", "--hold", "-2"],
    ["get", "--timeout", "x"], ["run", "--pool-size", "0"], ["run", "--pool-size", "1.5"],
    ["run", "--workers", "65"], ["run", "--step-timeout", "0"], ["run", "--drain-timeout", "-1"],
    ["run", "--descriptor-size", "1"], ["run", "--max-concurrency", "-1"], ["run", "--max-failures", "0"],
    ["run", "--metrics", "localhost"], ["demo", "--pool-size", "0"], ["run", "--log-format", "xml"],
])  # fmt: skip
def test_bad_numbers_are_usage_errors(argv: list[str]) -> None:
    res = noodle(*argv)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "error" in res.stderr


def test_misspelt_keys_get_suggestions_and_every_kind_table_is_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "pool.toml"
    for text, want in (
        ('pool_sise = 3\n', "did you mean 'pool_size'"),
        ('[kinds.jail]\nmemory_limt = 5\n', "did you mean 'memory_limit'"),
        ('[kinds.jial]\n', "did you mean 'jail'"),
        ('kind = "process"\n[kinds.jail]\npids_limit = "many"\n', "kinds.jail.pids_limit"),
        ('kind = "process"\n[kinds.oci]\nruntime = 3\n', "kinds.oci.runtime"),
    ):
        cfg.write_text(text)
        res = noodle("run", "--config", str(cfg))
        assert res.returncode == 2 and want in res.stderr, (text, res.stderr)


def test_status_watch_pipe_head_exec_exit_and_noodle_pool(supervisor, pool_name: str) -> None:
    sup = supervisor("--pool-size", "2")
    pool = sup.attach()
    wait_full(pool)
    env = dict(os.environ, NOODLE_POOL=pool_name)

    # not a terminal: no screen escapes, a timestamp and rates on each refresh
    proc = subprocess.Popen([sys.executable, "-m", "noodle", "status", "--watch", "0.05"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = [proc.stdout.readline() for _ in range(40)]  # type: ignore[union-attr]
    # the reader goes away, as `| head` does: no traceback
    proc.stdout.close()  # type: ignore[union-attr]
    code = proc.wait(30)
    err = proc.stderr.read()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    text = "".join(lines)
    assert "\x1b" not in text and " UTC (every 0.05 s)" in text and "rates/s:" in text
    assert code == 141 and err == "", err

    res = subprocess.run(f"{sys.executable} -m noodle status | head -2", shell=True, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and res.stderr == "" and len(res.stdout.splitlines()) == 2

    res = noodle("status", env=env)
    assert res.returncode == 0 and "latency ms" in res.stdout and " us " not in res.stdout
    snap = json.loads(noodle("status", "--json", env=env).stdout)
    assert all(isinstance(p["count"], int) for p in snap["latency_us"].values())
    assert " max " in res.stdout and "max in" not in res.stdout  # the real maximum, not a bucket range

    for src, code, out in (("import sys; print('hi'); sys.exit(3)", 3, ""), ("import sys; sys.exit()", 0, ""),
                           ("raise SystemExit('boom')", 1, "boom"), ("import sys; sys.exit(256 + 7)", 7, ""),
                           ("1/0", 6, "ZeroDivisionError")):  # fmt: skip
        res = noodle("exec", src, env=env)
        assert res.returncode == code and out in res.stderr, (src, res.returncode, res.stderr)
    pool.close()


def test_run_reads_noodle_pool_and_logs_json(pool_name: str, run_root: str, tmp_path: Path) -> None:
    """$NOODLE_POOL names the pool `noodle run` starts; --log-format json
    writes one object per line (with the journal's priority prefix under
    the journal), carrying slot, generation and step from the workers."""
    env = dict(os.environ, NOODLE_POOL=pool_name, JOURNAL_STREAM="8:1", PYTHONPATH=str(REPO))
    log = tmp_path / "sup.log"
    cfg = tmp_path / "pool.toml"
    cfg.write_text('kind = "tests.kindlib:MisbehavingKind"\npool_size = 2\nmax_failures = 1\n'
                   'abandon_cooldown = 3600.0\n[kinds."tests.kindlib:MisbehavingKind"]\nfail_always = "spawn"\n'
                   'fail_always_slots = [1]\n')  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "noodle", "run", "--run-dir", run_root, "--config", str(cfg),
                                 "--log-format", "json"], cwd=REPO, env=env, stderr=f)  # fmt: skip
    try:
        import noodle as nd

        pool = wait_for(lambda: _attach(nd, pool_name, proc), 30, "the pool named by $NOODLE_POOL")
        wait_for(lambda: pool.stats()["states"]["abandoned"] == 1, 60, "slot 1 abandoned")
        pool.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    lines = [ln for ln in log.read_text().splitlines() if ln]
    assert lines
    objs = []
    for ln in lines:
        assert ln[0] == "<" and ln[2] == ">", ln
        objs.append(json.loads(ln[3:]))
    assert all(o["pool"] == pool_name for o in objs)
    failed = [o for o in objs if "spawn always fails" in o["message"]]
    assert failed and all(o["slot"] == 1 and o["step"] == "spawn" and isinstance(o["generation"], int)
                          for o in failed)  # fmt: skip


def _attach(nd, name: str, proc: subprocess.Popen[bytes]):  # type: ignore[no-untyped-def]
    if proc.poll() is not None:
        raise AssertionError(f"supervisor exited with {proc.returncode}")
    try:
        return nd.attach(name)
    except nd.PoolNotFound:
        return None


def test_prometheus_text_for_a_missing_pool_and_unknown_unit_kind() -> None:
    res = noodle("status", "--prometheus", "--name", "no-pool-by-this-name")
    assert res.returncode == 3 and 'noodle_up{pool="no-pool-by-this-name"} 0.0' in res.stdout
    res = noodle("unit", "--kind", "jial")
    assert res.returncode == 2 and "did you mean 'jail'" in res.stderr
