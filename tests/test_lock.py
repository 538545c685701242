"""Run and unit locks against real second processes: a lock held by another process refuses the
command with the holder named, an empty lock file is not a dead holder, a stale lock is taken over
by exactly one process, and `--unit` jobs run beside each other but never beside a plain command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cli
from mtprune.layout import RunLayout
from mtprune.lock import RunLock, check_free, holder_file

# holds a lock (RunLock, or a bare filelock that has not written who it is) until its stdin closes
HOLD = """
import sys
from pathlib import Path
if sys.argv[2] == "--bare":
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    sys.stdin.read()
else:
    from mtprune.lock import RunLock
    with RunLock(Path(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()
"""

# waits for a common start time, then tries to take the lock and keeps it a while
RACE = """
import sys, time
from pathlib import Path
from mtprune.lock import RunLock, RunLocked
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    with RunLock(Path(sys.argv[1]), "racer"):
        print("won", flush=True)
        time.sleep(2)
except RunLocked as e:
    print("refused:", e, flush=True)
"""

# takes and releases the lock again and again until the end time, checking that nobody else is inside
STRESS = """
import os, sys, time
from pathlib import Path
from mtprune.lock import RunLock, RunLocked
lock, end = Path(sys.argv[1]), float(sys.argv[2])
inside = lock.with_name("inside")
taken = overlaps = 0
while time.time() < end:
    try:
        with RunLock(lock, "stress"):
            taken += 1
            try:
                fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                overlaps += 1
                continue
            time.sleep(0.002)
            os.close(fd)
            os.unlink(inside)
    except RunLocked:
        pass
print(taken, overlaps)
"""


class Holder:
    """Another process holding the lock at ``path`` for ``command`` (``--bare``: not saying who it is)."""

    def __init__(self, path: Path, command: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), command], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _download(run: Path) -> tuple[int, str]:
    return cli("download", "--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
               "--set", "download.pairs=[de-en]", "--run-dir", str(run))


def test_a_second_command_is_refused_naming_the_holder_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with Holder(RunLayout(run).lock, "proxy") as h:
        code, out = _download(run)
    assert code == 1, out
    assert (f"error: run directory {run} is in use by `mtprune proxy` (pid {h.proc.pid} on "
            f"{socket.gethostname()}); wait for it to finish") in out
    assert not RunLayout(run).stage_dir("download").exists()
    assert _download(run)[0] == 0  # released when the holder ended


def test_an_empty_lock_file_of_a_live_holder_is_not_taken_over(tmp_path: Path) -> None:
    # a holder that has just created the lock file and not yet said who it is
    run = tmp_path / "run"
    lock = RunLayout(run).lock
    with Holder(lock, "--bare"):
        assert lock.read_bytes() == b""
        code, out = _download(run)
        assert code == 1 and f"run directory {run} is in use by another process" in out, out
        assert lock.exists() and not RunLayout(run).stage_dir("download").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_by_exactly_one_process(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    h = Holder(lock, "proxy")
    h.proc.kill()  # SIGKILL: its .holder file stays behind, naming a dead process
    h.proc.wait()
    assert holder_file(lock).exists()
    start = time.time() + 3
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(lock), str(start)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(5)]
    outs = [r.communicate(timeout=120)[0] for r in racers]
    assert sum(o.startswith("won") for o in outs) == 1, outs
    assert sum("is in use by `mtprune racer`" in o for o in outs) == 4, outs


def test_processes_contending_for_the_lock_never_hold_it_together(tmp_path: Path) -> None:
    end = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", STRESS, str(tmp_path / ".lock"), str(end)], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE) for _ in range(3)]
    counts = [tuple(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert sum(taken for taken, _ in counts) >= 10, counts
    assert all(overlaps == 0 for _, overlaps in counts), counts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny run through prepare (no training): enough for `proxy --unit` to start."""
    run = tmp_path_factory.mktemp("lock") / "run"
    args = ["-c", str(TINY), "--run-dir", str(run), "--set", "proxy.checkpoints=[2,400]", "--set",
            "proxy.warmup_updates=1"]
    for stage in ("download", "prepare"):
        code, out = cli(stage, *args, "-q")
        assert code == 0, out
    return run, args


@pytest.mark.slow
def test_unit_jobs_refuse_to_start_beside_a_plain_stage_command(prepared: tuple[Path, list[str]]) -> None:
    run, args = prepared
    args = [*args, "--set", "proxy.checkpoints=[2,4]"]  # short, should it start training after all
    L = RunLayout(run)
    for holder in ("proxy", "sweep"):
        with Holder(L.lock, holder) as h:
            code, out = cli("proxy", "--unit", "seed2", *args)
            assert code == 1, out
            assert f"run directory {run} is in use by `mtprune {holder}` (pid {h.proc.pid} on" in out
            code, out = cli("proxy", *args)
            assert code == 1 and f"is in use by `mtprune {holder}`" in out
    assert not L.proxy_seed_dir(2).exists()  # no fairseq-train started beside the holder


@pytest.mark.slow
def test_unit_jobs_run_side_by_side_but_never_beside_a_plain_command(prepared: tuple[Path, list[str]]) -> None:
    run, args = prepared
    L = RunLayout(run)
    unit_lock = L.stage_dir("proxy") / ".lock-seed1"
    job = subprocess.Popen([sys.executable, "-m", "mtprune", "proxy", "--unit", "seed1", *args, "-q"], cwd=ROOT,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not holder_file(unit_lock).exists():
            assert job.poll() is None and time.time() < deadline, "the --unit job did not start"
            time.sleep(0.05)
        check_free(L.lock)  # the job does not hold the run lock: other array tasks may run beside it
        code, out = cli("proxy", *args)
        assert code == 1, out
        assert f"03_proxy/seed1 is in use by `mtprune proxy --unit seed1` (pid {job.pid} on" in out
        code, out = cli("sweep", *args)
        assert code == 1 and "03_proxy/seed1 is in use by `mtprune proxy --unit seed1`" in out
        code, out = cli("proxy", "--unit", "seed1", *args)
        assert code == 1 and f"proxy seed1 is in use by `mtprune proxy --unit seed1` (pid {job.pid} on" in out
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    with RunLock(unit_lock, "test"):  # the killed job's lock went with it
        pass


def _states(out: str) -> dict[str, str]:
    """status's lines by stage: ``{"download": "running    `mtprune ...` ..."}``."""
    return {ln.split()[0]: ln.strip().split(None, 1)[1] for ln in out.splitlines()
            if ln.startswith("  ") and len(ln.split()) > 1}


def test_status_and_dry_run_name_the_process_running_a_stage(tmp_path: Path) -> None:
    """While another process runs a stage (it holds the run lock, the stage's in-progress marker is there),
    `status` and `sweep --dry-run` say it is running and name the holder as its lock records it, instead of
    "rerun to resume"; a lock held for another stage's command says nothing about this one, and once the
    holder has gone the stage is incomplete again."""
    run = tmp_path / "run"
    L = RunLayout(run)
    args = ["--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
            "--set", "download.pairs=[de-en]", "--run-dir", str(run)]
    env = {**os.environ, "MTPRUNE_CRASH_AT": "download:start"}  # a real marker: a download killed after it began
    p = subprocess.run([sys.executable, "-m", "mtprune", "download", *args], env=env, cwd=ROOT, capture_output=True)
    assert p.returncode == -signal.SIGKILL and L.in_progress("download").exists(), p.stderr
    host = socket.gethostname()
    for command in ("download", "sweep"):
        with Holder(L.lock, command) as h:
            holder = f"`mtprune {command}` (pid {h.proc.pid} on {host}) is running it; wait for it to finish"
            code, out = cli("status", *args)
            assert code == 0 and _states(out)["download"] == f"running    {holder}", out
            assert _states(out)["prepare"] == "missing    not run yet", out
            code, out = cli("sweep", "--dry-run", *args)
            assert code == 0 and f"run    download  running: {holder}\n" in out, out
    with Holder(L.lock, "report"):
        code, out = cli("status", *args)
        assert _states(out)["download"] == "incomplete started but not finished; rerun to resume", out
    code, out = cli("status", *args)
    assert _states(out)["download"] == "incomplete started but not finished; rerun to resume", out


def test_status_names_the_jobs_running_units_of_a_stage(tmp_path: Path) -> None:
    """`--unit` / `--shard` jobs hold their units' locks, not the run lock: `status` names each one running."""
    run = tmp_path / "run"
    L = RunLayout(run)
    args = ["--set", "download.source=synthetic", "--run-dir", str(run)]
    host = socket.gethostname()
    with Holder(L.stage_dir("proxy") / ".lock-seed2", "proxy --unit seed2") as a, \
            Holder(L.stage_dir("score") / ".lock-0-of-2", "score --shard 0/2") as b:
        code, out = cli("status", *args)
        states = _states(out)
        assert states["proxy"] == (f"running    `mtprune proxy --unit seed2` (pid {a.proc.pid} on {host}) is running "
                                   "seed2; wait for it to finish"), out
        assert states["score"].startswith(f"running    `mtprune score --shard 0/2` (pid {b.proc.pid} on {host}) is "
                                          "running 0-of-2;"), out
    code, out = cli("status", *args)
    assert _states(out)["proxy"] == "missing    not run yet", out
