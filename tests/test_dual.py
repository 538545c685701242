"""proxy.dual: the reversed data-bin, reverse proxy runs, and dual conditional cross-entropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, cli, error_lines, read
from mtprune import slurm
from mtprune.config import load_config
from mtprune.el2n import reference_el2n_nll
from mtprune.fairseq_backend import load_model, load_train_pairs
from mtprune.layout import RunLayout
from mtprune.scoring.dual import dual_xent
from mtprune.stages import proxy

# one pair, one seed, a handful of updates: the forward and the reverse run train side by side
SETS = ["download.pairs=[de-en]", "download.synthetic_train_per_pair=120", "proxy.dual=true",
        "proxy.seeds=[1]", "proxy.checkpoints=[3,6]", "proxy.warmup_updates=2", "proxy.max_tokens=512", "prepare.workers=1",
        "prune.strategies=[dual_xent-high]", "prune.sparsities=[0.25]"]


def _args(run: Path, *extra: str) -> list[str]:
    out = ["-c", str(TINY), "--run-dir", str(run), "-q"]
    for s in [*SETS, *extra]:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dual") / "run"
    for stage in ("download", "prepare"):
        code, out = cli(stage, *_args(run))
        assert code == 0, out
    return run


@pytest.fixture(scope="module")
def dual_run(prepared: Path) -> Path:
    """The prepared run through proxy and score, scored in two shards and merged."""
    code, out = cli("proxy", *_args(prepared))
    assert code == 0, out
    for i in range(2):
        code, out = cli("score", *_args(prepared), "--shard", f"{i}/2")
        assert code == 0, out
    code, out = cli("score", *_args(prepared))
    assert code == 0, out
    return prepared


def _decoder(data_bin: Path, spm_model: Path):
    """i -> ([tag, source text], target text) of example i of a data-bin."""
    import sentencepiece as spm

    src, tgt, d = load_train_pairs(data_bin)
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))

    def decoded(i: int) -> tuple[list[str], str]:
        s_pieces = d.string(src[i]).split()
        return [s_pieces[0], sp.decode(s_pieces[1:])], sp.decode(d.string(tgt[i]).split())

    return decoded


def test_reverse_bin_row_i_is_pair_i_swapped_with_the_source_language_tag(prepared: Path) -> None:
    L = RunLayout(prepared)
    assert (L.data_bin_reverse / "dict.tgt.txt").read_bytes() == (L.data_bin / "dict.tgt.txt").read_bytes()
    fwd_src, fwd_tgt, d = load_train_pairs(L.data_bin)
    rev_src, rev_tgt, _ = load_train_pairs(L.data_bin_reverse)
    assert len(rev_src) == len(fwd_src) == len(read(L.prepare_ids)) > 100
    assert d.index("<2en>") != d.unk()  # the reverse direction's tag is one symbol, not <unk>
    ids, tasks = read(L.prepare_ids), read(L.prepare_tasks)
    raw = {lang: read(L.split_file("de-en", "train", lang)) for lang in ("en", "de")}
    line_of = {sid: k for k, sid in enumerate(read(L.download_ids("de-en")))}
    forward, reverse = _decoder(L.data_bin, L.spm_model), _decoder(L.data_bin_reverse, L.spm_model)
    for i in range(len(ids)):
        assert tasks[i] == "de-en\ten-de"
        k = line_of[ids[i]]
        assert forward(i) == (["<2de>", raw["en"][k]], raw["de"][k])
        assert reverse(i) == (["<2en>", raw["de"][k]], raw["en"][k]), i
        # token for token: the reverse target is the forward source without its tag
        assert torch.equal(rev_tgt[i][:-1], fwd_src[i][1:-1]) and torch.equal(rev_src[i][1:], fwd_tgt[i])
    rev_valid = load_train_pairs(L.data_bin_reverse, "valid")[0]
    assert len(rev_valid) == len(load_train_pairs(L.data_bin, "valid")[0]) > 0


def test_without_dual_prepare_writes_no_reverse_bin_and_forward_units_ignore_the_switch(prepared: Path,
                                                                                    tiny_run: Path,
                                                                                    tmp_path: Path) -> None:
    L = RunLayout(tiny_run)  # tiny.yaml: proxy.dual is off
    assert not L.data_bin_reverse.exists() and not L.spm_reverse_dir.exists()
    assert not list(L.stage_dir("proxy").glob("reverse-*"))
    assert "dual_xent" not in pd.read_parquet(L.scores).columns
    # prepared with proxy.dual off, the forward data is byte for byte the dual run's (the reverse tag is
    # reserved either way), so switching dual on or off leaves every forward model's data as it was
    off = tmp_path / "off"
    for stage in ("download", "prepare"):
        code, out = cli(stage, *_args(off, "proxy.dual=false"))
        assert code == 0, out
    assert not RunLayout(off).data_bin_reverse.exists()
    for name in ("dict.src.txt", "dict.tgt.txt", "train.src-tgt.src.bin", "train.src-tgt.tgt.bin", "valid.src-tgt.tgt.bin"):
        assert (RunLayout(off).data_bin / name).read_bytes() == (RunLayout(prepared).data_bin / name).read_bytes(), name
    assert RunLayout(off).spm_model.read_bytes() == RunLayout(prepared).spm_model.read_bytes()
    # a forward seed's unit key is the same whether proxy.dual is on or off (finished seeds stay done)
    on, off = (load_config(TINY, [*SETS, f"proxy.dual={v}"], run_dir=str(prepared)) for v in ("true", "false"))
    units_on = {u.folder.name: u.key for u in proxy.units(on, RunLayout(prepared), False)}
    units_off = {u.folder.name: u.key for u in proxy.units(off, RunLayout(prepared), False)}
    assert sorted(units_on) == ["reverse-seed1", "seed1"] and sorted(units_off) == ["seed1"]
    assert units_on["seed1"] == units_off["seed1"]
    assert slurm.unit_names(on, "proxy") == list(units_on)  # a cluster's array tasks: the reverse runs too
    assert "dual" not in units_off["seed1"]["proxy"]


@pytest.mark.slow
def test_dual_columns_from_both_directions_and_prune_on_them(dual_run: Path) -> None:
    L = RunLayout(dual_run)
    df = pd.read_parquet(L.scores).sort_values("index")
    assert df["index"].tolist() == list(range(len(read(L.prepare_ids))))  # both shards merged
    tags = ["s1u3", "s1u6"]
    for t in tags:
        assert {f"nll_reverse@{t}", f"dual_xent@{t}"} <= set(df.columns)
    from mtprune.config import load_config
    from mtprune.scoring.forward import score_columns

    numeric = {c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])} - {"index"}
    assert set(score_columns(load_config(TINY, [*SETS, "proxy.dual=true"], run_dir=str(dual_run)))) == numeric
    h_f = df[[f"nll@{t}" for t in tags]].to_numpy(np.float64)
    h_r = df[[f"nll_reverse@{t}" for t in tags]].to_numpy(np.float64)
    want = np.mean([abs(h_f[:, k] - h_r[:, k]) + (h_f[:, k] + h_r[:, k]) / 2 for k in range(2)], axis=0)
    np.testing.assert_allclose(df["dual_xent"], want, rtol=1e-12)
    np.testing.assert_allclose(df["nll_reverse"], h_r.mean(axis=1), rtol=1e-12)
    assert not np.allclose(h_f, h_r)  # two different models, not the forward scores twice
    np.testing.assert_allclose(dual_xent(np.array([1.0, 3.0]), np.array([3.0, 3.0])), [4.0, 3.0])

    # the reverse scores against a float64 reference on fairseq's own batches of the reverse bin
    model, task = load_model(L.proxy_reverse_checkpoint(1, 6), L.data_bin_reverse, "cpu")
    task.load_dataset("train")
    ds = task.dataset("train")
    idx = np.random.default_rng(0).permutation(len(ds))[:30]
    sample = ds.collater([ds[int(i)] for i in idx])
    with torch.inference_mode():
        logits, _ = model(**sample["net_input"])
    got = df.set_index("index")["nll_reverse@s1u6"]
    for row, i in enumerate(sample["id"].tolist()):
        mask = sample["target"][row].ne(task.target_dictionary.pad())
        ref = float(reference_el2n_nll(logits[row][mask], sample["target"][row][mask])[1].mean())
        assert abs(got[i] - ref) <= 1e-5 * ref, i

    code, out = cli("prune", *_args(dual_run))
    assert code == 0, out
    kept = set(read(L.kept_ids("dual_xent-high-0.25")))
    worst = set(df.nlargest(int(round(0.25 * len(df))), "dual_xent")["sentence_id"])
    assert kept and not kept & worst and len(kept) == len(df) - len(worst)



def test_dual_on_a_run_prepared_before_the_setting_existed_is_one_line_asking_for_prepare(tiny_copy: Path) -> None:
    import json

    L = RunLayout(tiny_copy)
    m = json.loads(L.manifest("prepare").read_text())
    del m["params"]["proxy.dual"]  # as a prepare finished before proxy.dual existed recorded its reads
    L.manifest("prepare").write_text(json.dumps(m))
    code, out = cli("proxy", "-c", str(TINY), "--run-dir", str(tiny_copy), "--set", "proxy.dual=true")
    assert code == 2 and len(error_lines(out)) == 1 and "Traceback" not in out, out
    assert "data-bin-reverse is missing" in out and "mtprune prepare --overwrite" in out
    assert not list(L.stage_dir("proxy").glob("reverse-*"))  # refused before any unit was touched
