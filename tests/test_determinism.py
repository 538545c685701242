"""Same config and seeds -> byte-identical data, scores, kept ids and pruned data on CPU."""

from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, TINY, cli
from mtprune.layout import RunLayout

pytestmark = pytest.mark.slow


def test_two_runs_are_byte_identical(tiny_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    for stage in ("download", "prepare", "proxy", "score", "prune"):
        code, out = cli(stage, "-c", str(TINY), "--run-dir", str(other), "-q")
        assert code == 0, out
    first = tmp_path / "first"
    import shutil

    shutil.copytree(tiny_run, first)
    assert cli("prune", "-c", str(TINY), "--run-dir", str(first), "-q")[0] == 0
    A, B = RunLayout(first), RunLayout(other)
    files = ["01_download/de-en/train.de", "01_download/en-it/train.ids", "02_prepare/spm.model",
             "02_prepare/train.ids", "02_prepare/data-bin/train.src-tgt.src.bin",
             "02_prepare/data-bin/train.src-tgt.tgt.bin",
             "05_prune/el2n-high-0.2/kept.ids", "05_prune/random-0.2/kept.ids",
             "05_prune/el2n-high-0.2/data-bin/train.src-tgt.tgt.bin"]
    for f in files:
        assert (A.root / f).read_bytes() == (B.root / f).read_bytes(), f
    import pandas as pd

    sa, sb = pd.read_parquet(A.scores), pd.read_parquet(B.scores)
    pd.testing.assert_frame_equal(sa, sb, check_exact=True)
    for seed in (1, 2):
        wa = torch.load(A.proxy_checkpoint(seed, 20), weights_only=False)["model"]
        wb = torch.load(B.proxy_checkpoint(seed, 20), weights_only=False)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


TATOEBA = SHARED_DATA / "tatoeba-opus100-layout"


@pytest.mark.skipif(not TATOEBA.is_dir(), reason="shared data not present")
def test_scores_with_baselines_are_the_same_bytes_from_scratch_and_from_baseline_slices(tmp_path: Path) -> None:
    """Real text (Tatoeba en-es and de-en), the base_* columns on: scored from scratch twice, once in one process
    and once with the base_* columns computed as two `score --baselines I/N` slices, the score tables are the same
    bytes, and so is every strategy's drop set."""
    sets = [f"download.source=local:{TATOEBA}", "download.pairs=[de-en,en-es]", "download.max_train_per_pair=400",
            "download.max_valid_per_pair=20", "download.max_test_per_pair=20", "download.noise.rate=0.1",
            "score.baselines=true", "proxy.seeds=[1]", "prune.sparsities=[0.1,0.2]",
            "prune.strategies=[combined_all-high,base_all-high,base_wordalign_src-high,base_wordalign_tgt-low,"
            "el2n-high,random,opusfilter]"]
    over = [a for s in sets for a in ("--set", s)]
    runs = [tmp_path / "whole", tmp_path / "sliced"]
    for run in runs:
        args = ["-c", str(TINY), "--run-dir", str(run), "-q", *over]
        for stage in ("download", "prepare"):
            assert cli(stage, *args)[0] == 0
        if run.name == "sliced":
            for i in range(2):
                code, out = cli("score", *args, "--baselines", f"{i}/2")
                assert code == 0, out
        for stage in ("proxy", "score", "prune"):
            code, out = cli(stage, *args)
            assert code == 0, out
    A, B = RunLayout(runs[0]), RunLayout(runs[1])
    assert not list(A.baseline_cache.parent.glob("baselines-*-of-*.parquet"))
    assert sorted(p.name for p in B.baseline_cache.parent.glob("baselines-*-of-*.parquet")) == [
        "baselines-0000-of-0002.parquet", "baselines-0001-of-0002.parquet"]
    assert A.scores.read_bytes() == B.scores.read_bytes()
    kept = sorted(p.relative_to(A.root) for p in A.stage_dir("prune").glob("*/kept.ids"))
    assert len(kept) == 13  # six ranked strategies at two sparsities, opusfilter at its own
    for f in kept:
        assert (A.root / f).read_bytes() == (B.root / f).read_bytes(), f
