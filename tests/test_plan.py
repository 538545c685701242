"""`mtprune slurm-script` without a stage: the sweep's plan on Slurm (mtprune/plan.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from conftest import ROOT, cli, error_lines
from mtprune.plan import REFERENCE

BLOG = ROOT / "configs" / "blog.yaml"


def rows(out: str) -> dict[str, list[str]]:
    """stage -> [jobs, GPUs, CPUs, hours, basis] from the plan's table."""
    table = {}
    for line in out.splitlines():
        m = re.match(r"^(download|prepare|proxy|score-baselines|score|prune|train|evaluate|report)\s{2,}(.+)$", line)
        if m:
            table[m.group(1)] = [m.group(1), *re.split(r"\s{2,}", m.group(2), maxsplit=4)]
    return {k: v[1:] for k, v in table.items()}


def test_the_blog_plan_from_given_throughputs_worked_out_by_hand(tmp_path: Path) -> None:
    code, out = cli("slurm-script", "-c", str(BLOG), "--run-dir", str(tmp_path / "run"), "--train-tps", "50000",
                    "--score-tps", "100000", "--tokens-per-pair", "20")
    assert code == 0, out
    assert "corpus: 4,000,000 training pairs (OPUS-100: at most 1,000,000 a pair)" in out
    t = rows(out)
    assert list(t) == ["download", "prepare", "proxy", "score-baselines", "score", "prune", "train", "evaluate",
                       "report"]
    # proxy: 3 seeds (one wave of 8 array slots), 4,000 updates of 8,192 tokens x update_freq 2 on 1 GPU
    assert t["proxy"][:4] == ["array of 3 + 1 to finish", "1", "8", f"{4000 * 16384 / 50000 / 3600:.2f}"]
    # train: 4 strategies x 4 sparsities + the full corpus = 17 runs, three waves of 8, 40,000 updates each
    assert t["train"][:4] == ["array of 17 + 1 to finish", "1", "8", f"{3 * 40000 * 16384 / 50000 / 3600:.2f}"]
    # the base_* columns: a CPU array of 8 slices beside the proxy training, one wave, not in the total
    base_task = REFERENCE["baselines"] * 40 / 8 / 3600
    assert t["score-baselines"][:4] == ["array of 8", "0", "8", f"{base_task:.2f}"]
    assert "runs beside proxy" in t["score-baselines"][4]
    assert "score-baselines runs beside the chain, not counted" in out
    # score: 4M pairs x 20 tokens x 6 checkpoints over 8 shards, one wave, then the merge's CPU work less the
    # base_* columns the array computed
    merge = (REFERENCE["score"] - REFERENCE["baselines"]) * 40 / 3600
    assert t["score"][:3] == ["array of 8 + 1 to finish", "1", "8"]
    assert t["score"][3] == f"{4e6 * 20 * 6 / 8 / 1e5 / 3600 + merge:.2f}"
    assert "0.48G target tokens" in t["score"][4]
    # prepare: the parts' encoding and binarizing over an array of 8, the rest (SentencePiece, the assembly) once
    parts, rest = REFERENCE["prepare_parts"] * 40 / 3600, (REFERENCE["prepare"] - REFERENCE["prepare_parts"]) * 40 / 3600
    assert t["prepare"][:4] == ["array of 8 + 1 to finish", "0", "8", f"{parts / 8 + rest:.2f}"]
    for stage in ("download", "prune", "report"):
        assert t[stage][:4] == ["1", "0", "8", f"{REFERENCE[stage] * 40 / 3600:.2f}"], stage
    assert t["evaluate"][3] == "?" and "not estimated: evaluate" in out


def test_without_throughputs_the_gpu_stages_say_so_instead_of_guessing(tmp_path: Path) -> None:
    code, out = cli("slurm-script", "-c", str(BLOG), "--run-dir", str(tmp_path / "run"), "--pairs", "40000000",
                    "--set", "launch.slurm.time_min=30")
    assert code == 0, out
    t = rows(out)
    assert "corpus: 40,000,000 training pairs (--pairs)" in out
    assert "training: no measured throughput" in out and "scoring: no measured throughput" in out
    assert t["proxy"][3] == t["train"][3] == t["score"][3] == "?"
    assert "not estimated: proxy, score, train, evaluate" in out
    # at 40M pairs a CPU stage outgrows a half-hour job, and the plan says which
    assert re.search(r"jobs longer than launch.slurm.time_min \(30 min\): .*report \(", out)


def test_plan_options_and_finish_need_the_right_form(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    code, out = cli("slurm-script", "-c", str(BLOG), "--run-dir", run, "--finish")
    assert code == 2 and error_lines(out) == ["mtprune slurm-script: error: --finish needs a STAGE (proxy, score "
                                              "or train)"], out
    code, out = cli("slurm-script", "prune", "-c", str(BLOG), "--run-dir", run, "--pairs", "10")
    assert code == 2 and "--pairs: only for the plan (no STAGE)" in out
    code, out = cli("slurm-script", "-c", str(BLOG), "--run-dir", run, "--train-tps", "0")
    assert code == 2 and "--train-tps" in out


def test_the_plan_of_a_run_uses_what_it_measured(tiny_run: Path, tmp_path: Path) -> None:
    """On a run that has trained proxies and scored: the corpus its download counted, the tokens its prepare
    counted, fairseq's own wps from the proxy logs, the score shards' throughput."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    code, out = cli("slurm-script", "--run-dir", str(run))
    assert code == 0, out
    assert re.search(r"corpus: [\d,]+ training pairs \(counted by this run's download\)", out)
    assert re.search(r"target tokens per pair: [\d.]+ \(this run's prepare\)", out)
    assert re.search(r"training: [\d,]+ target tokens/s per run \(fairseq's wps in this run's proxy logs, on cpu\)",
                     out), out
    assert re.search(r"scoring: [\d,]+ target tokens/s per shard \(this run's score shards, on cpu\)", out), out
    t = rows(out)
    assert t["proxy"][3] != "?" and t["score"][3] != "?" and t["train"][3] != "?"
