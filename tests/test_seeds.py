"""Training seeds as units, evaluation that reuses finished work, and the epochs budget, on the tiny run
(real fairseq, four updates per model)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cli
from mtprune.layout import RunLayout

# random at 0.2 only, two seeds, four updates, one model at a time (so a kill lands between two models)
SETS = ["prune.strategies=[random]", "train.include_full=false", "train.max_update=4", "train.warmup_updates=1",
        "train.seeds=[1,2]", "train.parallel=1"]


def args(run: Path, *more: str) -> list[str]:
    return ["-c", str(TINY), "--run-dir", str(run), *[a for s in [*SETS, *more] for a in ("--set", s)]]


def evaluate_stats(run: Path) -> dict:
    return json.loads(RunLayout(run).manifest("evaluate").read_text())["stats"]


@pytest.fixture(scope="module")
def resumed(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], str]:
    """A two-seed sweep killed after its second model finished training but before it was recorded,
    then rerun: (run, seed-1 checkpoint bytes before the rerun, the rerun's output)."""
    run = tmp_path_factory.mktemp("seeds") / "run"
    shutil.copytree(tiny_run, run)
    env = {**os.environ, "MTPRUNE_CRASH_AT": "unit-done:train random-0.2-seed2"}
    killed = subprocess.run([sys.executable, "-m", "mtprune", "sweep", *args(run), "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    L = RunLayout(run)
    assert (L.train_dir("random-0.2") / "done.json").is_file()
    assert not (L.train_dir("random-0.2-seed2") / "done.json").exists()
    before = {p.name: p.read_bytes() for p in L.train_dir("random-0.2").glob("checkpoint_*.pt")}
    code, out = cli("sweep", *args(run))
    assert code == 0, out
    return run, before, out


@pytest.mark.slow
def test_a_killed_two_seed_sweep_resumes_only_the_missing_model(resumed: tuple[Path, dict[str, bytes], str]) -> None:
    run, before, out = resumed
    L = RunLayout(run)
    assert "train random-0.2: already done, skipping" in out
    assert "running 1 unit(s)" in out
    assert "[train random-0.2-seed2] fairseq-train already reached update 4" in out  # resumed, not retrained
    assert {p.name: p.read_bytes() for p in L.train_dir("random-0.2").glob("checkpoint_*.pt")} == before
    for name in ("random-0.2", "random-0.2-seed2"):
        done = json.loads((L.train_dir(name) / "done.json").read_text())
        assert done["key"]["train"]["seed"] == (2 if name.endswith("seed2") else 1)
    # the two seeds are different models
    assert (L.train_dir("random-0.2") / "checkpoint_last.pt").read_bytes() != \
        (L.train_dir("random-0.2-seed2") / "checkpoint_last.pt").read_bytes()
    with open(L.report_file("results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {(r["strategy"], r["seed"], r["pair"]) for r in rows} == {
        ("random", s, p) for s in ("1", "2") for p in ("de-en", "en-es", "en-fr", "en-it", "all")}
    md = L.report_file("results.md").read_text()
    assert "## BLEU on the test sets (mean ± std over seeds 1, 2)" in md
    assert "Training budget: **updates** — every model trained 4 updates" in md
    mean_all = sum(float(r["bleu"]) for r in rows if r["pair"] == "all") / 2
    assert re.search(rf"\| random \| 0\.20 \| 960 \| .* \| {mean_all:.2f} ± \d+\.\d\d \|", md), md
    code, out = cli("status", *args(run))
    assert all(ln.split()[1] == "fresh" for ln in out.splitlines() if ln.startswith("  ")), out


@pytest.mark.slow
def test_a_new_strategy_costs_only_its_own_runs_and_unchanged_models_are_not_decoded_again(
        resumed: tuple[Path, dict[str, bytes], str], tmp_path: Path) -> None:
    src, _, _ = resumed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    L = RunLayout(run)
    assert evaluate_stats(run)["n_reused"] == 0  # the first evaluate decoded everything
    hyps = {p: p.read_bytes() for p in L.stage_dir("evaluate").glob("*/*.hyp")}
    more = ["prune.strategies=[el2n-high,random]"]
    code, out = cli("sweep", *args(run, *more))
    assert code == 0, out
    assert "train random-0.2: already done, skipping" in out and "train random-0.2-seed2: already done" in out
    assert "running 2 unit(s)" in out  # el2n-high-0.2 for seeds 1 and 2
    stats = evaluate_stats(run)
    assert sorted(stats["decoded"]) == ["el2n-high-0.2", "el2n-high-0.2-seed2"]
    assert sorted(stats["reused"]) == ["random-0.2", "random-0.2-seed2"] and stats["n_reused"] == 8
    assert "evaluate: random-0.2-seed2: checkpoint unchanged, reused the hypotheses of 4 test set(s)" in out
    assert all(p.read_bytes() == b for p, b in hyps.items())
    md = L.report_file("results.md").read_text()
    # p: a value, or "1 (identical)" where four updates left el2n-high decoding exactly what random does
    assert re.search(r"\| el2n-high \| 0\.20 \| [\d.]+ \| [+-]\d+\.\d\d \| ([01]\.\d{4}|1 \(identical\)) \| – \| – \|",
                     md), md

    # an extra test set is decoded (alone), scored, tabled and plotted
    extra = (f"evaluate.extra_test_sets=[{{name: extra, src_lang: en, tgt_lang: de, "
             f"src: {L.split_file('de-en', 'test', 'en')}, ref: {L.split_file('de-en', 'test', 'de')}}}]")
    code, out = cli("sweep", *args(run, *more, extra))
    assert code == 0, out
    stats = evaluate_stats(run)
    assert stats["n_decoded"] == 4 and stats["n_reused"] == 16, stats  # only the extra set, once per model
    with open(L.report_file("results.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["pair"] == "extra:en-de"]
    de_en = json.loads(L.metrics("random-0.2-seed2").read_text())["results"]
    assert len(rows) == 4 and de_en["extra:en-de"]["bleu"] == de_en["de-en"]["bleu"]  # the same sentences
    assert "| strategy | sparsity | n_train | de-en | en-es | en-fr | en-it | extra:en-de | all |" in \
        L.report_file("results.md").read_text()


def epoch_ends(log: str) -> dict[int, int]:
    """epoch -> the update count it ended on, from fairseq's end-of-epoch training summary lines."""
    return {int(m.group(1)): int(m.group(2))
            for m in re.finditer(r"\| train \| epoch (\d+) \|.*?\| num_updates (\d+)", log)}


@pytest.mark.slow
def test_the_epochs_budget_trains_exact_passes_over_each_corpus(tiny_run: Path, tmp_path: Path) -> None:
    from mtprune.config import load_config
    from mtprune.stages.train import updates_per_epoch

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    sets = ["train.seeds=[1]", "train.budget=epochs", "train.max_epoch=2"]
    for stage in ("prune", "train"):
        code, out = cli(stage, *args(run, *sets))
        assert code == 0, out
    L = RunLayout(run)
    stats = json.loads(L.manifest("train").read_text())["stats"]
    n = stats["max_update"]["random-0.2"]
    assert stats["budget"] == "epochs" and n % 2 == 0
    # fairseq's own log: the first pass ended (the data ran out) at n/2 updates, the second at n, where training stopped
    assert epoch_ends((L.train_dir("random-0.2") / "train.log").read_text()) == {1: n // 2, 2: n}
    cfg = load_config(TINY, [*SETS, *sets], str(run))
    assert updates_per_epoch(L.data_bin, cfg, use_cuda=False) > n // 2  # the full corpus needs more per pass


def test_seeds_name_the_units_and_the_older_train_seed_is_read_as_one_seed(tmp_path: Path) -> None:
    from mtprune.config import load_config
    from mtprune.slurm import unit_names

    cfg = load_config(TINY, ["train.seeds=[1,3]", "prune.strategies=[random]"], str(tmp_path / "run"))
    assert unit_names(cfg, "train") == ["full", "full-seed3", "random-0.2", "random-0.2-seed3"]
    assert load_config(TINY, ["train.seed=4"]).train.seeds == (4,)
    code, out = cli("train", "-c", str(TINY), "--run-dir", str(tmp_path / "run"), "--set", "train.seed=2",
                    "--set", "train.seeds=[1]")
    assert code == 2 and "train: give train.seeds only (train.seed is the older single-seed form)" in out, out
    code, out = cli("train", "-c", str(TINY), "--run-dir", str(tmp_path / "run"), "--set", "train.budget=epochs")
    assert code == 2 and "train.max_epoch: needed with train.budget: epochs" in out, out


def test_the_report_tests_the_length_matched_strategy_against_random_length_and_says_what_each_corpus_dropped(
        tiny_copy: Path) -> None:
    sets = ["prune.strategies=[el2n-high,random-length,random]", "prune.sparsities=[0.3]", "train.max_update=4",
            "train.include_full=false"]
    args = [a for s in sets for a in ("--set", s)]
    for stage in ("prune", "train", "evaluate", "report"):
        code, out = cli(stage, "-c", str(TINY), "--run-dir", str(tiny_copy), "-q", *args)
        assert code == 0, out
    L = RunLayout(tiny_copy)
    md = L.report_file("results.md").read_text()
    assert "| p vs random-length |" in md
    stats = json.loads(L.manifest("report").read_text())["stats"]
    assert set(stats["significance"]["p_vs_random_length"]) == {"el2n-high-0.3"}
    dropped = stats["dropped"]
    assert set(dropped) == {"el2n-high-0.3", "random-length-0.3", "random-0.3"}
    # random-length drops exactly el2n-high's target lengths, so their mean too
    assert dropped["random-length-0.3"]["dropped_mean_tokens"] == pytest.approx(dropped["el2n-high-0.3"]["dropped_mean_tokens"])
    assert dropped["el2n-high-0.3"]["dropped"] == dropped["random-0.3"]["dropped"] > 0
    assert "## What each corpus dropped" in md
