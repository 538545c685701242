import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, clear_score_but_baselines, cli, error_lines
from mtprune.config import load_config
from mtprune.el2n import reference_el2n_nll
from mtprune.errors import UsageError
from mtprune.fairseq_backend import load_model, load_train_pairs
from mtprune.layout import RunLayout
from mtprune.scoring.forward import collate, score_batch, score_dataset
from mtprune.textio import read_lines


def cfg_for(run: Path, *sets: str):
    return load_config(TINY, list(sets), run_dir=str(run))


def test_one_row_per_training_pair_with_the_contract_columns(tiny_run: Path) -> None:
    L = RunLayout(tiny_run)
    df = pd.read_parquet(L.scores)
    ids = read_lines(L.prepare_ids)
    assert len(df) == len(ids) == df["sentence_id"].nunique()
    assert sorted(df["sentence_id"]) == sorted(ids)
    for col in ("sentence_id", "pair", "n_tokens", "el2n", "el2n_std", "nll",
                "el2n@s1u10", "el2n@s1u20", "el2n@s2u10", "el2n@s2u20", "nll@s1u10", "nll@s2u20"):
        assert col in df.columns, col
    per_ckpt = df[[c for c in df.columns if c.startswith("el2n@")]].to_numpy()
    np.testing.assert_allclose(df["el2n"], per_ckpt.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(df["el2n_std"], per_ckpt.std(axis=1), rtol=1e-9, atol=1e-12)
    assert ((df["el2n"] >= 0) & (df["el2n"] <= 2 ** 0.5)).all()
    assert (df["n_tokens"] >= 2).all()  # at least one piece plus EOS


def test_the_columns_the_config_promises_are_the_columns_written(tiny_run: Path) -> None:
    """score_columns(cfg) decides up front whether a strategy or combine entry names a real column: it must be
    the table's numeric columns, exactly (a new score added to the pass without it fails here)."""
    from mtprune.scoring.forward import score_columns

    df = pd.read_parquet(RunLayout(tiny_run).scores)
    numeric = {c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])} - {"index"}
    assert set(score_columns(cfg_for(tiny_run))) == numeric
    assert "combined" not in score_columns(cfg_for(tiny_run, "score.combine=[]"))
    off = score_columns(cfg_for(tiny_run, "score.baselines=false"))
    assert not [c for c in off if c.startswith("base_")] and "combined_all" not in off


def test_ids_join_back_to_the_raw_text(tiny_run: Path) -> None:
    L = RunLayout(tiny_run)
    df = pd.read_parquet(L.scores)
    src, tgt, d = load_train_pairs(L.data_bin)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(L.spm_model))
    for row in df.sample(20, random_state=0).itertuples():
        pair = row.pair
        a, b = pair.split("-")
        tgt_lang = b if a == "en" else a
        line = read_lines(L.download_ids(pair)).index(row.sentence_id)
        raw = read_lines(L.split_file(pair, "train", tgt_lang))[line]
        assert sp.decode(d.string(tgt[row.index]).split()) == raw
        assert row.n_tokens == len(tgt[row.index])


def _model_and_data(run: Path):
    L = RunLayout(run)
    model, _ = load_model(L.proxy_checkpoint(1, 20), L.data_bin, "cpu")
    src, tgt, d = load_train_pairs(L.data_bin)
    return model, src, tgt, d


def _fairseq_batch(run: Path, idx: np.ndarray) -> tuple[object, dict]:
    """The proxy model and the batch fairseq's own training builds: the task's dataset and its collater."""
    L = RunLayout(run)
    model, task = load_model(L.proxy_checkpoint(1, 20), L.data_bin, "cpu")
    task.load_dataset("train")
    ds = task.dataset("train")
    return model, ds.collater([ds[int(i)] for i in idx])


def test_batches_are_laid_out_as_fairseqs_collater_lays_them_out(tiny_run: Path) -> None:
    _, src, tgt, d = _model_and_data(tiny_run)
    idx = np.arange(40)
    _, sample = _fairseq_batch(tiny_run, idx)
    ours = collate(src, tgt, idx, d.pad(), d.eos())
    rows = sample["id"].numpy()  # fairseq reorders a batch by source length
    assert torch.equal(ours["src_tokens"][rows], sample["net_input"]["src_tokens"])
    assert torch.equal(ours["src_lengths"][rows], sample["net_input"]["src_lengths"])
    assert torch.equal(ours["prev"][rows], sample["net_input"]["prev_output_tokens"])
    assert torch.equal(ours["target"][rows], sample["target"])


def test_scores_equal_a_float64_reference_on_fairseqs_own_batches(tiny_run: Path) -> None:
    _, src, tgt, d = _model_and_data(tiny_run)
    idx = np.random.default_rng(0).permutation(len(tgt))[:60]
    model, sample = _fairseq_batch(tiny_run, idx)
    with torch.inference_mode():
        logits, _ = model(**sample["net_input"])
        # the whole scoring loop: our batching (several batches at 300 tokens), collate, chunks of 13 tokens
        res = score_dataset([model], src, tgt, d, idx, batch_tokens=300, chunk_tokens=13, device="cpu", dtype=None)
    got = dict(zip(idx.tolist(), zip(res["el2n"][:, 0], res["nll"][:, 0], strict=True), strict=True))
    for row, i in enumerate(sample["id"].tolist()):
        mask = sample["target"][row].ne(d.pad())
        e, n = reference_el2n_nll(logits[row][mask], sample["target"][row][mask])
        assert abs(got[i][0] - float(e.mean())) <= 1e-5 * float(e.mean()), i
        assert abs(got[i][1] - float(n.mean())) <= 1e-5 * float(n.mean()), i


def test_forget_column_counts_what_fairseqs_own_forward_predicts_at_each_checkpoint(tiny_run: Path) -> None:
    """``forget`` from the table equals forgetting counted by hand from each proxy checkpoint's argmax."""
    L = RunLayout(tiny_run)
    df = pd.read_parquet(L.scores).set_index("index")
    idx = np.random.default_rng(1).permutation(len(df))[:50]
    task_ds = None
    right = {}  # (seed, updates) -> {pair index: [bool per target token]}
    for seed in (1, 2):
        for updates in (10, 20):
            model, task = load_model(L.proxy_checkpoint(seed, updates), L.data_bin, "cpu")
            if task_ds is None:
                task.load_dataset("train")
                task_ds = task.dataset("train")
            sample = task_ds.collater([task_ds[int(i)] for i in idx])
            with torch.inference_mode():
                logits, _ = model(**sample["net_input"])
            pad = task.target_dictionary.pad()
            right[seed, updates] = {
                int(i): (logits[row].argmax(-1) == sample["target"][row])[sample["target"][row].ne(pad)].tolist()
                for row, i in enumerate(sample["id"].tolist())}
    for i in idx.tolist():
        per_seed = []
        for seed in (1, 2):
            a, b = right[seed, 10][i], right[seed, 20][i]
            events = [2 if not (x or y) else int(x and not y) for x, y in zip(a, b, strict=True)]
            per_seed.append(sum(events) / len(events))
        assert abs(df.loc[i, "forget"] - sum(per_seed) / 2) < 1e-9, i
    assert 0 < df["forget"].mean() < 2  # the tiny proxies get some tokens right and miss others


def test_a_pair_scores_the_same_alone_and_inside_a_padded_batch(tiny_run: Path) -> None:
    model, src, tgt, d = _model_and_data(tiny_run)
    lengths = np.asarray(tgt.sizes)
    short = int(np.argmin(lengths))
    idx = np.array([short] + list(np.argsort(-lengths)[:15]))  # the short pair padded by the longest ones
    with torch.inference_mode():
        alone = score_batch(model, collate(src, tgt, idx[:1], d.pad(), d.eos()), d.pad(), 1024, "cpu", None)
        batched = score_batch(model, collate(src, tgt, idx, d.pad(), d.eos()), d.pad(), 1024, "cpu", None)
    for name in ("el2n", "nll", "el2n_max", "el2n_eos"):
        assert abs(float(alone[name][0]) - float(batched[name][0])) <= 1e-5 * float(alone[name][0]), name


def test_shards_merge_into_the_same_table(tiny_copy: Path) -> None:
    L = RunLayout(tiny_copy)
    full = pd.read_parquet(L.scores)
    full_sketch = np.load(L.grad_sketch)
    clear_score_but_baselines(L)
    for i in range(3):
        code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "--shard", f"{i}/3", "-q")
        assert code == 0, out
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy))
    assert code == 0, out
    assert "merging 3 finished shards" in out
    merged = pd.read_parquet(L.scores)
    assert merged["index"].tolist() == full["index"].tolist()
    # other batch compositions change float32 sums in the last digits only (proto's k-means included);
    # a rank combination moves by a rank or two where two pairs' scores tie to that precision, and so does
    # the rank of Fisher's sum over such ranks (base_all, combined_all), whose value may move far more
    ranked = [c for c in full.columns if c in ("combined", "el2n_worst")]
    fisher = [c for c in full.columns if c in ("base_all", "combined_all")]
    # proto's states are kept in float16: a last-digit difference can round to the neighbouring half (2^-11)
    proto = [c for c in full.columns if c.startswith("proto")]
    rest = ranked + fisher + proto
    pd.testing.assert_frame_equal(merged.drop(columns=rest), full.drop(columns=rest),
                                  check_exact=False, rtol=1e-5, atol=1e-6)
    for c in proto:
        assert (merged[c] - full[c]).abs().max() <= 1e-4, c
    for c in ranked:
        assert (merged[c] - full[c]).abs().max() <= 2 / len(full), c
    for c in fisher:
        assert (merged[c].rank(pct=True) - full[c].rank(pct=True)).abs().max() <= 4 / len(full), c
    # the gradient sketch: each shard's slice, concatenated in row order
    assert np.load(L.grad_sketch).dtype == np.float16
    np.testing.assert_allclose(np.load(L.grad_sketch).astype(np.float32), full_sketch.astype(np.float32),
                               rtol=2e-3, atol=1e-4 * np.abs(full_sketch).max())
    # per-token values: each shard keeps its own, the merge joins them (a merge with them on raised NameError)
    tokens = ["--set", "score.dump_tokens=true"]
    for i in range(2):
        assert cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "--shard", f"{i}/2", *tokens, "-q")[0] == 0
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), *tokens)
    assert code == 0 and "merging 2 finished shards" in out, out
    tok = pd.read_parquet(L.token_scores)
    assert len(tok) == int(merged["n_tokens"].sum())
    means = tok.groupby("sentence_id")["el2n"].mean()
    np.testing.assert_allclose(means[merged["sentence_id"]].to_numpy(), merged["el2n"].to_numpy(), rtol=1e-5)


def test_a_merge_only_setting_re_merges_the_kept_pass_without_scoring_again(tiny_copy: Path) -> None:
    L = RunLayout(tiny_copy)
    before = pd.read_parquet(L.scores)
    seconds = json.loads(L.manifest("score").read_text())["stats"]["seconds"]
    # a stale set of another shard count beside the pass: ignored, not a reason to score again
    stale = L.score_shard(0, 2)
    shutil.copy(L.score_shard(0, 1), stale)
    stale.with_suffix(".json").write_text(json.dumps({"key": "older settings", "rows": 1}))
    change = ["--set", "score.combine_how=mean", "--set", "score.proto_clusters=3"]
    assert "score     stale" in cli("status", "-c", str(TINY), "--run-dir", str(tiny_copy), *change)[1]
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), *change)
    assert code == 0, out
    assert "merging 1 finished shard" in out and "shard 0/1" not in out  # no scoring pass
    after = pd.read_parquet(L.scores)
    assert json.loads(L.manifest("score").read_text())["stats"]["seconds"] == seconds  # the pass's own time
    same = [c for c in before.columns if c not in ("combined", "proto") and not c.startswith("proto@")]
    pd.testing.assert_frame_equal(after[same], before[same])
    assert not np.allclose(after["combined"], before["combined"])  # rank mean, not rank max
    # a setting the pass reads does score again
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), *change, "--set", "score.dump_tokens=true")
    assert code == 0 and "shard 0/1" in out, out


def test_bad_shard_spec(tiny_run: Path) -> None:
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_run), "--shard", "3/3")
    assert code == 2 and "expected I/N" in out


def test_dump_tokens_writes_per_token_values(tiny_copy: Path) -> None:
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "--set", "score.dump_tokens=true", "-q")
    assert code == 0, out
    L = RunLayout(tiny_copy)
    tok = pd.read_parquet(L.token_scores)
    scores = pd.read_parquet(L.scores)
    assert len(tok) == int(scores["n_tokens"].sum())
    means = tok.groupby("sentence_id")["el2n"].mean()
    np.testing.assert_allclose(means[scores["sentence_id"]].to_numpy(), scores["el2n"].to_numpy(), rtol=1e-5)


def test_a_checkpoint_changed_after_proxy_makes_score_refuse_in_one_line(tiny_copy: Path) -> None:
    # a truncated file changes size, so score stops at the upstream check and never loads it; a corrupt
    # checkpoint of unchanged size and mtime, which score does load, is test_bad_input's test_corrupt_checkpoint
    L = RunLayout(tiny_copy)
    shutil.rmtree(L.stage_dir("score"))
    ck = L.proxy_checkpoint(2, 10)
    ck.write_bytes(ck.read_bytes()[:1000])
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy))
    assert code == 2, out
    assert len(error_lines(out)) == 1
    assert "upstream stage 'proxy' is stale" in error_lines(out)[0]
    assert not L.scores.exists() and not L.manifest("score").exists()


def test_corrupt_checkpoint_file_is_named(tiny_copy: Path, tmp_path: Path) -> None:
    L = RunLayout(tiny_copy)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(L.proxy_checkpoint(1, 10).read_bytes()[:2000])
    with pytest.raises(UsageError, match="bad.pt: corrupt or unreadable checkpoint"):
        load_model(bad, L.data_bin, "cpu")


def test_checkpoint_with_another_dictionary_is_refused(tiny_copy: Path, tmp_path: Path) -> None:
    L = RunLayout(tiny_copy)
    bigger, same_size = tmp_path / "bigger", tmp_path / "same-size"
    for other in (bigger, same_size):
        shutil.copytree(L.data_bin, other)
    for name in ("dict.src.txt", "dict.tgt.txt"):
        with open(bigger / name, "a") as f:
            f.write("".join(f"extra{i} 1\n" for i in range(20)))
        lines = (same_size / name).read_text().splitlines(keepends=True)
        lines[10], lines[11] = lines[11], lines[10]  # two pieces trade ids: the same size, another dictionary
        (same_size / name).write_text("".join(lines))
    for other in (bigger, same_size):
        with pytest.raises(UsageError, match="different dictionary"):
            load_model(L.proxy_checkpoint(1, 10), other, "cpu")


def test_score_without_proxy_checkpoints(tmp_path: Path, tiny_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(RunLayout(run).stage_dir("proxy"))
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(run))
    assert code == 2
    assert "upstream stage 'proxy' is missing" in out and "mtprune proxy" in out


def test_checkpoint_list_naming_an_unsaved_update_count(tiny_copy: Path) -> None:
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "--set", "proxy.checkpoints=[10,30]")
    assert code == 2
    assert "upstream stage 'proxy' is stale" in out and "proxy.checkpoints" in out


def test_a_failed_parquet_write_leaves_no_temp_file(tmp_path: Path) -> None:
    import pyarrow as pa

    from mtprune.scoring.shards import write_parquet

    target = tmp_path / "scores.parquet"
    target.mkdir()  # the temp file is written in full, then renaming it over a directory fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_parquet(pa.table({"el2n": [0.5, 0.7]}), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    write_parquet(pa.table({"el2n": [0.5, 0.7]}), tmp_path / "ok.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.parquet", "scores.parquet"]


# ---- temp files of a killed pass (multi-GB .npy on a real corpus) are removed, unless still being written ----

HOLD = """
import sys
from pathlib import Path
from mtprune.lock import RunLock
locks = [RunLock(Path(p), "score --shard 1/2") for p in sys.argv[1:]]
for lock in locks:
    lock.__enter__()
print("held", flush=True)
sys.stdin.read()
"""


def test_temp_files_of_a_killed_pass_go_unless_their_writer_holds_its_lock(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Whose temp file it is, is told by the lock its writer holds, not by the pid in its name: a `score --shard`
    job on another host of a cluster writes into the same shared folder, and its pid means nothing here."""
    import logging
    import subprocess
    import sys

    from conftest import ROOT
    from mtprune.scoring.shards import remove_stale_temps

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # the pid of a writer that was killed
    L = RunLayout(tmp_path / "run")
    score, shards = L.stage_dir("score"), L.score_shard(0, 2).parent
    shards.mkdir(parents=True)

    def plant(folder: Path, name: str, size: int) -> Path:
        (folder / name).write_bytes(b"\0" * size)
        return folder / name

    dead = [plant(shards, f".shard-0000-of-0002.sketch.npy.{gone.pid}.tmp", 1000),
            plant(shards, f".shard-0000-of-0002.pooled.npy.{gone.pid}.tmp", 300),
            plant(shards, f".shard-0000-of-0002.parquet.{gone.pid}.tmp", 20)]
    finished = [plant(shards, "shard-0000-of-0002.parquet", 50), plant(score, "grad_sketch.npy", 50),
                plant(score, "..lock-1-of-2.holder.12345678.tmp", 5)]  # a lock's own temp: never touched
    merge = [plant(score, f".grad_sketch.npy.{gone.pid}.tmp", 4000), plant(score, f".pooled.{gone.pid}.tmp", 700)]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(score / ".lock-1-of-2"), str(L.lock)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        alive = [plant(shards, f".shard-0001-of-0002.sketch.npy.{holder.pid}.tmp", 900),
                 plant(shards, f".shard-0001-of-0002.pooled.npy.{gone.pid}.tmp", 900)]  # an earlier attempt's
        with caplog.at_level(logging.INFO, logger="mtprune"):
            assert remove_stale_temps(L, (1, 2)) == 0  # `--shard 1/2` itself runs elsewhere: not ours
            assert remove_stale_temps(L) == 1320  # shard 0/2's; shard 1/2 is written now, the run lock is held
        assert not any(p.exists() for p in dead) and all(p.exists() for p in alive + finished + merge)
        assert [r.getMessage() for r in caplog.records] == [
            "score: removed 3 temp file(s) left by an interrupted scoring pass, 1320 bytes (0.0 MB)"]
    finally:
        holder.stdin.close()
        holder.wait()
    assert remove_stale_temps(L, (0, 2)) == 0  # with a shard given, the merge's files stay
    assert remove_stale_temps(L) == 1800 + 4700  # the holder has gone: its files and the merge's
    assert not any(p.exists() for p in alive + merge) and all(p.exists() for p in finished)
    assert remove_stale_temps(L) == 0


def test_score_and_score_shard_clear_stale_temp_files_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mtprune score` clears every shard's leftovers it may (before looking for finished shards), `--shard i/N`
    its own shard's, once the upstream check has passed."""
    from mtprune.stages import score as score_stage

    class Stop(Exception):
        pass

    calls = []

    def cleanup(layout: RunLayout, shard: tuple[int, int] | None = None) -> int:
        calls.append(shard)
        raise Stop

    monkeypatch.setattr(score_stage, "remove_stale_temps", cleanup)
    monkeypatch.setattr(score_stage, "finished_shards", lambda *a: pytest.fail("looked for shards before cleaning"))
    cfg = cfg_for(tmp_path / "run")
    with pytest.raises(Stop):
        score_stage.run(cfg, RunLayout(tmp_path / "run"))
    with pytest.raises(UsageError):  # nothing is touched before the upstream check
        score_stage.run_shard(cfg, RunLayout(tmp_path / "run"), "1/4")
    monkeypatch.setattr(score_stage, "require_fresh_upstream", lambda *a: None)
    with pytest.raises(Stop):
        score_stage.run_shard(cfg, RunLayout(tmp_path / "run"), "1/4")
    assert calls == [None, (1, 4)]


def test_noise_labels_that_label_no_scored_pair_give_an_empty_table_not_a_crash(tiny_copy: Path) -> None:
    """A download's noise.ids that labels nothing (empty, or ids the scores do not have): the noise table says
    0 labelled pairs and no AUROC, and the stage finishes."""
    from mtprune.scoring.disktable import DiskTable
    from mtprune.stages.score import _noise_files

    L = RunLayout(tiny_copy)
    df = pd.read_parquet(L.scores)
    for content in ("", "de-en/99999\tmisaligned\n"):
        L.noise_ids.write_text(content)
        stats: dict = {}
        assert _noise_files(DiskTable([L.scores]), L, stats) == list(L.score_noise)
        assert stats["noise"]["labelled"] == 0 and set(stats["noise"]["auroc"].values()) == {None}
        assert f"0 of {len(df)} pairs labelled" in L.score_noise[0].read_text()


def test_the_merged_sketch_of_one_shard_shares_its_disk(tiny_run: Path) -> None:
    """One shard of one: grad_sketch.npy is a hard link to the shard's sketch, not a second copy (1 KB a pair)."""
    L = RunLayout(tiny_run)
    shard = L.score_shard(0, 1).with_suffix(".sketch.npy")
    assert L.grad_sketch.stat().st_ino == shard.stat().st_ino
    assert np.load(L.grad_sketch).shape[0] == len(pd.read_parquet(L.scores))


def test_the_base_columns_leftovers_go_once_no_baselines_job_holds_its_lock(tmp_path: Path) -> None:
    """A killed `score --baselines I/N` job (or merge computing the base_* columns) leaves its temp table, a
    word-alignment model's temp file (or, in runs from before, eflomal's temp folder) in 04_score/shards/: removed by
    `mtprune score`, but not while a baselines job runs."""
    import subprocess
    import sys

    from conftest import ROOT
    from mtprune.scoring.shards import remove_stale_temps

    L = RunLayout(tmp_path / "run")
    score, shards = L.stage_dir("score"), L.score_shard(0, 1).parent
    shards.mkdir(parents=True)
    table = shards / ".baselines-0001-of-0002.parquet.4242.tmp"
    table.write_bytes(b"\0" * 100)
    eflomal = shards / ".wordalign.abc123"
    (eflomal / "sub").mkdir(parents=True)
    (eflomal / "src").write_bytes(b"\0" * 30)
    (eflomal / "sub" / "priors").write_bytes(b"\0" * 7)
    model = shards / "wordalign" / ".en-de.npz.4242.tmp"
    model.parent.mkdir()
    model.write_bytes(b"\0" * 5)
    kept = [shards / "baselines-0000-of-0002.parquet", shards / "baselines.parquet", shards / "wordalign" / "en-de.npz"]
    for p in kept:
        p.write_bytes(b"\0" * 10)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(score / ".lock-baselines-1-of-2")], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_temps(L) == 0
        assert table.exists() and eflomal.is_dir() and model.exists()
    finally:
        holder.stdin.close()
        holder.wait()
    assert remove_stale_temps(L) == 142
    assert not table.exists() and not eflomal.exists() and not model.exists() and all(p.exists() for p in kept)


def test_kmeans_finding_fewer_clusters_than_asked_is_one_log_line(tiny_copy: Path) -> None:
    """Repeated sentences share one encoder state, so k-means finds fewer distinct clusters than score.proto_clusters
    and scikit-learn warns (ConvergenceWarning) once per language pair and model, two lines each with its own
    source line: on the terminal that is one log line saying what happened."""
    from conftest import cli_subprocess
    from mtprune.scoring.shards import shard_pooled

    pooled = shard_pooled(RunLayout(tiny_copy).score_shard(0, 1))
    states = np.load(pooled)
    states[:] = states[0]  # every sentence's encoder state alike: a corpus of one repeated line, as k-means sees it
    np.save(pooled, states)
    p = cli_subprocess("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "--set", "score.proto_clusters=8")
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr and "sklearn" not in p.stderr, p.stderr
    said = [ln for ln in p.stderr.splitlines() if "k-means" in ln]
    assert len(said) == 1, p.stderr
    # 4 language pairs x 4 checkpoints (2 seeds x 2), each fit finding 1 cluster
    assert "score: proto: 16 k-means fit(s) found fewer distinct clusters than score.proto_clusters (8)" in said[0]
