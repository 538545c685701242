"""Kill each stage (SIGKILL) at several points, rerun it, and compare with an uninterrupted run.

Kill points are named in the code (``mtprune/faults.py``); training is also killed from outside,
mid-run, to check that it resumes from its last checkpoint instead of starting over.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, cli
from mtprune.layout import STAGES, RunLayout

pytestmark = pytest.mark.slow

# stage -> kill points: early, mid, and during the final write (temp file written, not yet renamed)
KILL_POINTS = {
    "download": ["download:start", "download:after:en-es", "write:manifest.json"],
    "prepare": ["prepare:after-spm", "prepare:before-binarize", "write:manifest.json"],
    "proxy": ["unit-done:proxy seed2", "proxy:before-manifest"],
    "score": ["score:start", "write:scores.parquet", "write:manifest.json"],
    "prune": ["prune:after:el2n-high-0.2", "write:manifest.json"],
    "train": ["unit-done:train random-0.2", "train:before-manifest"],
    "evaluate": ["write:metrics.json", "evaluate:before-manifest"],
    "report": ["write:results.csv", "write:manifest.json"],
}


def mtprune(run: Path, *args: str, crash_at: str | None = None, cfg: Path = TINY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MTPRUNE_CRASH_AT"}
    if crash_at:
        env["MTPRUNE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "mtprune", *args, "-c", str(cfg), "--run-dir", str(run), "-q"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def without(run: Path, src: Path, stage: str) -> Path:
    """A copy of a finished run with `stage` and everything after it removed."""
    shutil.copytree(src, run)
    for s in STAGES[STAGES.index(stage):]:
        shutil.rmtree(RunLayout(run).stage_dir(s), ignore_errors=True)
    return run


def same_files(a: Path, b: Path, pattern: str) -> list[str]:
    fa = sorted(p.relative_to(a) for p in a.glob(pattern) if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.glob(pattern) if p.is_file())
    assert fa == fb, (fa, fb)
    return [str(f) for f in fa if (a / f).read_bytes() != (b / f).read_bytes()]


COMPARE = {  # outputs that must be byte-identical to the uninterrupted run's
    "download": ["01_download/*/*"],
    "prepare": ["02_prepare/train.ids", "02_prepare/spm.model", "02_prepare/data-bin/*.bin", "02_prepare/data-bin/*.idx"],
    "proxy": [],  # compared below: the models' EL2N and NLL per pair, or `score`'s table where the rerun trained
    "score": ["04_score/scores.parquet"],
    "prune": ["05_prune/*/kept.ids", "05_prune/*/data-bin/*.bin", "05_prune/*/data-bin/*.idx"],
    "train": [],
    "evaluate": ["07_evaluate/*/*.hyp"],
    "report": ["08_report/results.csv"],
}


# settings (a --set each) of a stage's killed run, its status and its rerun. train: the two pruned corpora
# the reference pruned, trained at once (not the unpruned one too: a second round of training), so the kill
# at random-0.2's end may find el2n-high-0.2 mid-run
SETS = {"train": ["train.include_full=false"]}

# score's kill points after the scoring pass start from the pass it finished (the one shard of one), as the
# killed run would have left it itself, so they only merge before the kill (scoring every pair again first gives
# the same files, slowly); after score:start the rerun scores every pair, compared byte for byte below. The base_*
# columns (off in tiny.yaml) are killed and rerun by test_a_killed_score_stage_with_baselines_reruns_to_the_same_bytes
AFTER_THE_PASS = {"score": {"write:scores.parquet", "write:manifest.json"}}


def trainer_runs(run: Path) -> dict[str, tuple[int, int]]:
    """The fairseq-train runs started in each proxy folder: every one appends its command line to train.log (a
    folder staged beside the unit and swapped in brings a train.log of its own)."""
    return {p.parent.name: (p.stat().st_ino, sum(line.startswith("$ ") for line in p.read_text().splitlines()))
            for p in RunLayout(run).stage_dir("proxy").glob("*/train.log")}


def same_proxy_scores(run: Path, ref: Path, ckpts: list[Path]) -> None:
    """Each proxy checkpoint of ``run`` scores every training pair as the reference's does: EL2N and NLL, the
    scoring pass's forward, to the tolerance of the score comparison below. (Weights alone would not do: a
    weight no output depends on, such as a key bias under the softmax, drifts with the thread count.)"""
    from mtprune.fairseq_backend import load_model, load_train_pairs
    from mtprune.scoring.forward import score_dataset

    data_bin = RunLayout(ref).data_bin
    src, tgt, d = load_train_pairs(data_bin)
    got = [score_dataset([load_model(root / ck, data_bin, "cpu")[0] for ck in ckpts], src, tgt, d,
                         np.arange(len(tgt)), batch_tokens=6000, chunk_tokens=128, device="cpu", dtype=None)
           for root in (run, ref)]
    for name in ("el2n", "nll"):
        np.testing.assert_allclose(got[0][name], got[1][name], rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_rerun(stage: str, tiny_swept: tuple[Path, str], tmp_path: Path) -> None:
    ref, _ = tiny_swept
    tried = 0
    sets = [a for s in SETS.get(stage, []) for a in ("--set", s)]
    for point in KILL_POINTS[stage]:
        run = without(tmp_path / point.replace(":", "_").replace(" ", "_"), ref, stage)
        if stage == "score":
            shards = RunLayout(ref).score_shard(0, 1).parent
            if point in AFTER_THE_PASS[stage]:
                shutil.copytree(shards, run / shards.relative_to(ref))
        killed = mtprune(run, stage, *sets, crash_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        tried += 1
        L = RunLayout(run)
        assert not L.manifest(stage).exists(), point  # nothing that looks finished
        status = cli("status", "-c", str(TINY), "--run-dir", str(run), *sets)[1]  # in-process: no start-up
        assert f"{stage:<9} incomplete" in status or f"{stage:<9} missing" in status, status
        before = trainer_runs(run)
        done = mtprune(run, stage, *sets)
        assert done.returncode == 0, (point, done.stderr[-2000:])
        assert L.manifest(stage).exists()
        for pattern in COMPARE[stage]:
            assert same_files(run, ref, pattern) == [], (point, pattern)
        retrained = trainer_runs(run) != before
        if point == "proxy:before-manifest":
            assert not retrained, "every seed had finished before the kill, yet the rerun trained again"
        if stage == "proxy" and not retrained:  # the models the killed run trained are kept (a seed whose trainer
            # had saved its last update is finished by the rerun without training) and are the reference's:
            # compared through the scoring pass's forward alone (score's gradients, prototypes and baselines
            # take a minute and tell nothing more about the models)
            ckpts = sorted(p.relative_to(run) for p in L.stage_dir("proxy").glob("seed*/checkpoint_u*.pt"))
            assert ckpts == sorted(p.relative_to(ref) for p in RunLayout(ref).stage_dir("proxy").glob(
                "seed*/checkpoint_u*.pt")), ckpts
            same_proxy_scores(run, ref, ckpts)
        elif stage == "proxy":  # retrained on another thread count: compared through the scores they give
            shutil.rmtree(L.stage_dir("score"), ignore_errors=True)
            scored = mtprune(run, "score")
            assert scored.returncode == 0, scored.stderr[-2000:]
            import pandas as pd

            a = pd.read_parquet(L.scores)
            b = pd.read_parquet(RunLayout(ref).scores)
            # rank combinations (percentile ranks, their maximum or Fisher's sum): a score moved within the
            # tolerance may swap two neighbours, so they are compared by rank, a few places apart at most
            ranks = [c for c in ("combined", "el2n_worst", "combined_all", "base_all") if c in b.columns]
            pd.testing.assert_frame_equal(a.drop(columns=ranks), b.drop(columns=ranks), check_exact=False,
                                          rtol=1e-3, atol=1e-4)
            for c in ranks:
                np.testing.assert_allclose(a[c].rank(pct=True), b[c].rank(pct=True), atol=6 / len(a), err_msg=c)
    assert tried == len(KILL_POINTS[stage]) >= 2


def test_a_killed_score_stage_with_baselines_reruns_to_the_same_bytes(tiny_swept: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    """With the base_* columns on (word alignment, language id and the other filters computed from scratch in every
    run: no cache carried over), a score stage killed before, during and after computing them reruns to the
    scores.parquet of an uninterrupted run, byte for byte."""
    ref, _ = tiny_swept
    on = ("--set", "score.baselines=true")
    clean = without(tmp_path / "clean", ref, "score")
    done = mtprune(clean, "score", *on)
    assert done.returncode == 0, done.stderr[-2000:]
    want = RunLayout(clean).scores.read_bytes()
    assert b"base_wordalign_src" in want
    for point in ("score:start", "write:scores.parquet"):
        run = without(tmp_path / point.replace(":", "_"), ref, "score")
        killed = mtprune(run, "score", *on, crash_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        # killed before the columns were computed, or after (their cache kept and used by the rerun)
        assert RunLayout(run).baseline_cache.exists() == (point != "score:start"), point
        done = mtprune(run, "score", *on)
        assert done.returncode == 0, (point, done.stderr[-2000:])
        assert RunLayout(run).scores.read_bytes() == want, point


def _kill_when(run_args: list[str], pattern: str, run: Path, env: dict[str, str]) -> None:
    """Start a command, SIGKILL its whole process group once a file matching `pattern` exists."""
    p = subprocess.Popen([sys.executable, "-m", "mtprune", *run_args], cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if list(run.glob(pattern)):
            time.sleep(0.2)  # let checkpoint_last.pt be written next to it
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"


# killed at a checkpoint with dozens of updates still to go (a few seconds at least), resumed to the end
@pytest.mark.parametrize("stage,sets,pattern", [
    ("proxy", ["proxy.seeds=[1]", "proxy.checkpoints=[10,60]"], "03_proxy/seed1/checkpoint_*_10.pt"),
    # the two pruned corpora the reference pruned (no prune first), saved every 20 updates
    ("train", ["train.max_update=80", "train.include_full=false"], "06_train/random-0.2/checkpoint_*_40.pt"),
])
def test_training_killed_mid_run_resumes(stage: str, sets: list[str], pattern: str, tiny_swept: tuple[Path, str],
                                         tmp_path: Path) -> None:
    ref, _ = tiny_swept
    run = without(tmp_path / "run", ref, stage)
    overrides = [a for s in sets for a in ("--set", s)]
    args = [stage, "-c", str(TINY), "--run-dir", str(run), *overrides]
    _kill_when(args, pattern, run, dict(os.environ))
    folder = next(run.glob(pattern)).parent
    assert (folder / "checkpoint_last.pt").exists()
    done = mtprune(run, stage, *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (folder / "train.log").read_text()
    assert "Loaded checkpoint" in log and "@ 0 updates" not in log.split("Loaded checkpoint")[-1].splitlines()[0]
    assert RunLayout(run).manifest(stage).exists()


def test_killing_mtprune_alone_kills_its_trainer_and_a_stray_trainer_is_stopped(tiny_swept: tuple[Path, str],
                                                                                tmp_path: Path) -> None:
    """kill -9 of the mtprune process alone (not its process group): its fairseq-train dies with it, so no
    orphan goes on writing into the unit folder; the rerun resumes there. A trainer that outlived a killed run
    anyway (started before this was in place) is stopped before the unit runs again."""
    from mtprune.children import WRITES_INTO, writers_into

    ref, _ = tiny_swept
    run = without(tmp_path / "run", ref, "proxy")
    sets = ["--set", "proxy.seeds=[1]", "--set", "proxy.checkpoints=[10,60]"]
    folder = RunLayout(run).proxy_seed_dir(1)
    p = subprocess.Popen([sys.executable, "-m", "mtprune", "proxy", "-c", str(TINY), "--run-dir", str(run), *sets],
                         cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not list(folder.glob("checkpoint_*_10.pt")):
            time.sleep(0.05)
        trainers = writers_into(folder)
        assert p.poll() is None and trainers, "the run ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)  # the parent only
        p.wait()
        deadline = time.time() + 20
        while time.time() < deadline and writers_into(folder):
            time.sleep(0.1)
        assert writers_into(folder) == [], "fairseq-train outlived the mtprune that started it"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # a stray writer of the same unit folder (as an mtprune of an earlier version would leave) is stopped first
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env={**os.environ, WRITES_INTO: str(folder.resolve())})
    try:
        done = mtprune(run, "proxy", *sets)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "left by a killed run still write into" in done.stderr, done.stderr[-2000:]
        assert stray.poll() is not None, "the stray writer was not stopped"
    finally:
        stray.kill()
        stray.wait()
    log = (folder / "train.log").read_text()
    assert "Loaded checkpoint" in log and "@ 0 updates" not in log.split("Loaded checkpoint")[-1].splitlines()[0]


def test_a_child_dies_with_its_parent_only_on_the_parents_host() -> None:
    """MTPRUNE_PARENT_PID names host and pid: a child whose parent is already gone exits at once; a task of a
    multi-node job on another node (the name of the first node) goes on."""
    import socket

    from mtprune.children import PARENT_PID

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = "from mtprune.children import die_with_parent; die_with_parent(); print('alive')"
    for parent, alive in ((f"{socket.gethostname()}:{gone.pid}", False), (f"other-node:{gone.pid}", True),
                          (f"{socket.gethostname()}:{os.getpid()}", True)):
        p = subprocess.run([sys.executable, "-c", code], env={**os.environ, PARENT_PID: parent}, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert (p.stdout.strip() == "alive") == alive and (p.returncode == 0) == alive, (parent, p)


def test_ctrl_c_stops_the_running_trainers_and_starts_no_waiting_unit(tiny_swept: tuple[Path, str],
                                                                       tmp_path: Path) -> None:
    """SIGINT to the mtprune process alone (as a terminal's Ctrl-C reaches it when its children ignore it, or `kill
    -INT`): it says so and exits with 130 at once; its running trainers die with it and the seed still waiting for a
    slot never starts. It used to wait for every unit, running or waiting, to train to the end. The rerun resumes."""
    from mtprune.children import writers_into

    ref, _ = tiny_swept
    run = without(tmp_path / "run", ref, "proxy")
    sets = ["--set", "proxy.seeds=[1,2,3]", "--set", "proxy.parallel=2", "--set", "proxy.checkpoints=[10,60]"]
    layout = RunLayout(run)
    p = subprocess.Popen([sys.executable, "-m", "mtprune", "proxy", "-c", str(TINY), "--run-dir", str(run), *sets],
                         cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not list(run.glob("03_proxy/seed*/checkpoint_*_10.pt")):
            time.sleep(0.05)
        assert p.poll() is None and writers_into(layout.proxy_seed_dir(1)) + writers_into(layout.proxy_seed_dir(2)), \
            "the run ended before it could be interrupted"
        os.kill(p.pid, signal.SIGINT)  # the parent only
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, err[-2000:]
        assert "mtprune proxy: interrupted; rerun the same command to continue" in err
        deadline = time.time() + 20
        while time.time() < deadline and any(writers_into(layout.proxy_seed_dir(s)) for s in (1, 2, 3)):
            time.sleep(0.1)
        assert not any(writers_into(layout.proxy_seed_dir(s)) for s in (1, 2, 3)), "a trainer outlived Ctrl-C"
        assert not (layout.proxy_seed_dir(3) / "train.log").exists(), "a waiting seed started after Ctrl-C"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    done = mtprune(run, "proxy", *sets)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(layout.proxy_checkpoint(s, 60).exists() for s in (1, 2, 3))
