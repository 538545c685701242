"""Post-pass score columns (mtprune/scoring/derived.py) and group-effect selection (mtprune/scoring/group.py):
hand-worked tables, real lingua models, brute force. No fairseq training."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtprune.config import load_config
from mtprune.errors import ConfigError, UsageError
from mtprune.layout import RunLayout
from mtprune.scoring import baselines, derived
from mtprune.scoring.group import group_norm, group_select

# ---- length debiasing ---------------------------------------------------------------------------


def test_length_bins_merge_short_lengths_until_a_bin_is_full() -> None:
    # lengths 3 (x2), 4 (x1), 5 (x3), 7 (x1) with bins of at least 3 rows:
    # {3, 4} fills the first bin, {5} the second, and 7 alone is short, so it joins {5}
    n_tokens = np.array([5, 3, 7, 4, 5, 3, 5])
    assert derived.length_bins(n_tokens, 3).tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert derived.length_bins(n_tokens, 100).tolist() == [0] * 7  # fewer rows than a bin: one bin
    assert derived.length_bins(n_tokens, 1).tolist() == [2, 0, 3, 1, 2, 0, 2]  # each length its own bin


def test_debias_subtracts_the_median_of_the_length_bin() -> None:
    n_tokens = np.array([5, 3, 7, 4, 5, 3, 5])
    values = np.array([0.9, 0.2, 0.5, 0.4, 0.6, 0.3, 0.7])
    # bin 0 (rows 1, 3, 5): 0.2, 0.4, 0.3 -> median 0.3; bin 1 (rows 0, 2, 4, 6): 0.9, 0.5, 0.6, 0.7 -> 0.65
    want = [0.9 - 0.65, 0.2 - 0.3, 0.5 - 0.65, 0.4 - 0.3, 0.6 - 0.65, 0.3 - 0.3, 0.7 - 0.65]
    np.testing.assert_allclose(derived.debias(values, n_tokens, 3), want)


def test_debiased_columns_per_checkpoint_then_averaged() -> None:
    df = pd.DataFrame({"n_tokens": [2, 2, 2, 9, 9, 9],
                       "el2n": [0.0] * 6,  # the per-checkpoint columns are what gets debiased
                       "el2n@s1u10": [1.0, 2.0, 6.0, 5.0, 5.0, 8.0],
                       "el2n@s2u10": [3.0, 3.0, 0.0, 1.0, 4.0, 4.0],
                       "el2n_max@s1u10": [9.0] * 6})
    out = derived.debiased_columns(df, "el2n", 3)
    assert sorted(out) == ["el2n_debiased", "el2n_debiased@s1u10", "el2n_debiased@s2u10"]
    np.testing.assert_allclose(out["el2n_debiased@s1u10"], [-1, 0, 4, 0, 0, 3])  # medians 2 and 5
    np.testing.assert_allclose(out["el2n_debiased@s2u10"], [0, 0, -3, -3, 0, 0])  # medians 3 and 4
    np.testing.assert_allclose(out["el2n_debiased"], [-0.5, 0, 0.5, -1.5, 0, 1.5])
    # without per-checkpoint columns the family's own column is debiased
    only = derived.debiased_columns(df[["n_tokens", "el2n@s1u10"]].rename(columns={"el2n@s1u10": "el2n"}), "el2n", 3)
    np.testing.assert_allclose(only["el2n_debiased"], [-1, 0, 4, 0, 0, 3])


# ---- combined rank ------------------------------------------------------------------------------

def test_combined_rank_max_and_mean_against_hand_computed_ranks() -> None:
    df = pd.DataFrame({"nll": [4.0, 1.0, 3.0, 2.0], "el2n_eos": [0.1, 0.9, 0.5, 0.5], "tracin": [1.0, 2.0, 3.0, 4.0]})
    # percentile ranks: nll 4/4, 1/4, 3/4, 2/4; el2n_eos 1/4, 4/4, 2.5/4, 2.5/4 (tie averaged);
    # -tracin (low tracin is bad) 4/4, 3/4, 2/4, 1/4
    got_max = derived.combined(df, ["nll", "el2n_eos", "-tracin"], "max")
    np.testing.assert_allclose(got_max, [1.0, 1.0, 0.75, 0.625])
    got_mean = derived.combined(df, ["nll", "el2n_eos", "-tracin"], "mean")
    np.testing.assert_allclose(got_mean, [(4 + 1 + 4) / 12, (1 + 4 + 3) / 12, (3 + 2.5 + 2) / 12, (2 + 2.5 + 1) / 12])
    np.testing.assert_allclose(derived.combined(df, ["nll"], "max"), [1.0, 0.25, 0.75, 0.5])


def test_combined_refuses_baselines_and_names_missing_columns() -> None:
    df = pd.DataFrame({"index": [0, 1], "sentence_id": ["a/0", "a/1"], "nll": [1.0, 2.0], "base_langid": [0.0, 1.0]})
    with pytest.raises(UsageError, match="score.combine: 'base_langid' is a baseline column"):
        derived.combined(df, ["nll", "base_langid"])
    with pytest.raises(UsageError, match=r"score.combine: no score column 'el2n_eos' .*\(it has: nll, base_langid\)"):
        derived.combined(df, ["nll", "el2n_eos"])
    with pytest.raises(ConfigError, match=r"score.combine: '-base_len_ratio' is a baseline column"):
        load_config(None, ["score.combine=[nll,-base_len_ratio]"])
    with pytest.raises(ConfigError, match="score.combine_how: must be max or mean"):
        load_config(None, ["score.combine_how=median"])
    assert load_config(None, ["score.combine=[nll,-tracin]"]).score.combine == ("nll", "-tracin")


# ---- the table on real files --------------------------------------------------------------------

def fake_run(root: Path) -> tuple[RunLayout, pd.DataFrame]:
    """01_download of a two-direction de-en run (three pairs, one a copy, one wrong language) and a score
    table whose rows are out of download order."""
    layout = RunLayout(root)
    d = layout.pair_dir("de-en")
    d.mkdir(parents=True)
    de = ["Ich habe gestern meinen Schlüssel im Büro vergessen.", "Wir gehen morgen ins Kino.",
          "Ieri ho dimenticato le chiavi in ufficio."]
    en = ["I forgot my keys at the office yesterday.", "Wir gehen morgen ins Kino.",
          "I forgot my keys at the office yesterday."]
    (d / "train.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    (d / "train.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (d / "train.ids").write_text("de-en/4\nde-en/7\nde-en/9\n", encoding="utf-8")
    df = pd.DataFrame({"index": [0, 1, 2, 3], "sentence_id": ["de-en/9", "de-en/4", "de-en/7", "de-en/4"],
                       "pair": ["de-en"] * 4, "direction": ["en-de", "en-de", "en-de", "de-en"],
                       "n_tokens": [12, 11, 6, 10], "el2n": [0.5, 0.4, 0.3, 0.2], "nll": [3.0, 2.0, 1.0, 4.0],
                       "el2n@s1u10": [0.5, 0.4, 0.3, 0.2], "nll@s1u10": [3.0, 2.0, 1.0, 4.0],
                       "el2n_eos": [0.9, 0.1, 0.2, 0.3], "el2n_max": [0.6, 0.9, 0.35, 0.25]})
    return layout, df


def test_add_columns_on_raw_text_and_again_on_its_own_output(tmp_path: Path) -> None:
    layout, df = fake_run(tmp_path)
    cfg = load_config(None, [])
    seconds: dict[str, float] = {}
    out = derived.add_columns(df, cfg, layout, seconds)
    assert {"el2n_debiased", "el2n_debiased@s1u10", "nll_debiased", "nll_debiased@s1u10", "combined",
            "base_all", "base_fitted", "combined_all", *baselines.COLUMNS} <= set(out.columns)
    assert set(seconds) >= {"base_langid", "base_wordalign", "combined", "el2n_debiased"}
    # row 0 (de-en/9): an Italian target where German is expected
    assert out["base_langid_tgt"][0] == 1.0 and out["base_langid_tgt"][1] < 0.2
    # row 2 (de-en/7): the target is a copy of the source
    assert out["base_similarity"][2] == 1.0 and out["base_similarity"][1] < 0.5
    # row 3 is de-en/4 the other way round: German source, English target (scored with its own direction)
    assert out["base_langid_src"][3] < 0.2 and out["base_langid_tgt"][3] < 0.2
    np.testing.assert_allclose(out["base_lengthratio_char"][[1, 3]], 52 / 41)
    # combined_all: Fisher's sum over the combine columns and the baselines; base_all over the baselines alone
    both = derived.tail_ranks(out, (*cfg.score.combine, *derived.BASE_ALL))
    np.testing.assert_allclose(out["combined_all"], derived.fisher(both))
    np.testing.assert_allclose(out["base_all"], derived.fisher(derived.tail_ranks(out, derived.BASE_ALL)))
    # base_fitted: four rows are too few to fit on (fitted.MIN_ROWS), so it ranks the pairs as base_all does
    np.testing.assert_array_equal(out["base_fitted"].rank(), out["base_all"].rank())
    # four rows make one length bin: el2n median 0.35, nll median 2.5
    np.testing.assert_allclose(out["el2n_debiased"], [0.15, 0.05, -0.05, -0.15])
    assert cfg.score.combine == ("nll_debiased", "el2n_debiased", "el2n_eos", "el2n_max")  # the default
    np.testing.assert_allclose(out["combined"], derived.combined(out, ["nll", "el2n_eos", "el2n_debiased", "el2n_max"]))
    # el2n_worst by hand: percentile ranks of el2n_debiased [4,3,2,1]/4, el2n_eos [4,1,2,3]/4,
    # el2n_max [3,4,2,1]/4; the largest of each row
    np.testing.assert_allclose(out["el2n_worst"], [1.0, 1.0, 0.5, 0.75])
    # the table read back from parquet: derived columns are replaced, not duplicated, same values
    path = tmp_path / "scores.parquet"
    out.to_parquet(path)
    again = derived.add_columns(pd.read_parquet(path), load_config(None, ["score.combine_how=mean"]), layout)
    assert list(again.columns) == list(out.columns)
    for c in baselines.COLUMNS:  # word alignment included: reused from 04_score/shards/baselines.parquet
        np.testing.assert_array_equal(again[c], out[c])
    np.testing.assert_allclose(again["combined"], derived.combined(out, ["nll", "el2n_eos", "el2n_debiased", "el2n_max"],
                                                                   "mean"))
    # baselines off: no base_* columns, and no raw text is read
    off = derived.add_columns(df, load_config(None, ["score.baselines=false", "score.combine=[]"]), RunLayout(tmp_path / "x"))
    assert not [c for c in off.columns if c.startswith("base_") or c == "combined"]


def test_add_columns_says_when_the_download_no_longer_has_a_scored_sentence(tmp_path: Path) -> None:
    layout, df = fake_run(tmp_path)
    df.loc[2, "sentence_id"] = "de-en/8"
    with pytest.raises(UsageError, match="has no sentence 'de-en/8' of the score table"):
        derived.add_columns(df, load_config(None, []), layout)


# ---- group-effect selection ---------------------------------------------------------------------

def test_group_selection_matches_brute_force_on_small_cases() -> None:
    for t in range(20):
        x = np.random.default_rng(t).normal(size=(10, 8)).astype(np.float32)
        best = min(group_norm(x, np.array(c)) for c in itertools.combinations(range(10), 3))
        got = group_select(x, 3, seed=1)
        assert len(got) == 3 and len(set(got.tolist())) == 3
        assert group_norm(x, got) == pytest.approx(best, rel=1e-5, abs=1e-6), t


def test_group_selection_finds_cancelling_pairs_and_beats_random_sets() -> None:
    rng = np.random.default_rng(0)
    planted = rng.normal(size=(40, 32))
    x = np.vstack([planted, -planted, rng.normal(size=(520, 32)) + 0.2]).astype(np.float32)  # rows s and -s
    x = x[rng.permutation(len(x))]
    got = group_select(x, 80, seed=3)
    assert len(got) == 80
    random_norms = [group_norm(x, rng.choice(len(x), 80, replace=False)) for _ in range(50)]
    # the planted optimum is 0 (all 40 cancelling pairs); a local search ends near it: below one row's norm
    assert group_norm(x, got) < 0.1 * min(random_norms)
    assert group_norm(x, got) < np.median(np.linalg.norm(x, axis=1))
    np.testing.assert_array_equal(got, group_select(x, 80, seed=3))  # seeded: same input, same set


def test_group_selection_at_scale_uses_the_pool_and_stays_far_below_random() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(6000, 64)) * rng.lognormal(0, 0.5, size=(6000, 1))).astype(np.float32)
    got = group_select(x, 2400, seed=1)  # n > pool: the pooled greedy and sampled swaps
    assert len(np.unique(got)) == 2400
    assert group_norm(x, got) < 0.05 * group_norm(x, rng.choice(6000, 2400, replace=False))
    assert group_select(x, 0, seed=1).tolist() == [] and len(group_select(x, 6000, seed=1)) == 6000


def test_group_selection_on_the_stored_float16_sketch_reads_it_by_blocks(tmp_path, monkeypatch) -> None:
    """The score stage stores the sketch in float16; selection reads the memory map a block of rows at a time
    (no float32 copy of the whole sketch) and picks the set it picks from the same values in float32."""
    from mtprune.scoring import group

    rng = np.random.default_rng(2)
    x16 = (rng.normal(size=(6000, 64)) * rng.lognormal(0, 0.5, size=(6000, 1))).astype(np.float16)
    np.save(tmp_path / "sketch.npy", x16)
    stored = np.load(tmp_path / "sketch.npy", mmap_mode="r")
    monkeypatch.setattr(group, "_BLOCK_ROWS", 1000)  # six blocks
    got = group_select(stored, 2400, seed=1)
    assert len(np.unique(got)) == 2400
    np.testing.assert_array_equal(got, group_select(x16.astype(np.float32), 2400, seed=1))
    assert group_norm(stored, got) < 0.05 * group_norm(x16, rng.choice(6000, 2400, replace=False))


def test_langid_scores_are_the_same_in_every_process() -> None:
    """lingua's confidences vary in the last bits from one process to the next; the column must not."""
    import subprocess
    import sys

    code = ("from mtprune.scoring.baselines import langid_badness, langid_filter; import sys; import numpy as np; "
            "texts = ['Das ist ein kleines Haus.', 'This is not German at all.', 'Questa è una frase.', "
            "'Ich weiß nicht, was ich sagen soll.'] * 50; "
            "f, sides = langid_filter('de', 'en', ['de', 'en']); "
            "sys.stdout.write(np.hstack(langid_badness(f, sides, [(t, t) for t in texts])).tobytes().hex())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(runs) == 1


def test_group_selection_by_parts_above_chunk_rows(tmp_path, monkeypatch) -> None:
    """Above ``chunk_rows`` rows the selection is made in seeded random parts, then exchanged across them: exactly
    k rows, seeded, through a row view of the stored memory map as from the array, and still far below random."""
    from mtprune.scoring import group

    rng = np.random.default_rng(5)
    x16 = (rng.normal(size=(6000, 64)) * rng.lognormal(0, 0.5, size=(6000, 1))).astype(np.float16)
    np.save(tmp_path / "sketch.npy", x16)
    stored = np.load(tmp_path / "sketch.npy", mmap_mode="r")
    monkeypatch.setattr(group, "_BLOCK_ROWS", 700)  # blocked sums and products over several blocks
    got = group_select(x16, 2400, seed=1, chunk_rows=1000)  # six parts of 1,000 rows
    assert len(np.unique(got)) == 2400
    whole = group_select(x16, 2400, seed=1)  # one part: the selection of every earlier version
    assert not np.array_equal(got, whole)  # the by-parts path ran
    random = [group_norm(x16, rng.choice(6000, 2400, replace=False)) for _ in range(20)]
    assert group_norm(x16, got) < 0.05 * min(random)
    assert group_norm(x16, got) < 4 * max(group_norm(x16, whole), float(np.median(np.linalg.norm(x16.astype(float), axis=1))))
    # the same rows through a view of a view of the memory map (shuffled, then put back in order): the same pairs
    order = rng.permutation(6000)
    view = group.RowView(group.RowView(stored, order), np.argsort(order))
    np.testing.assert_array_equal(got, group_select(view, 2400, seed=1, chunk_rows=1000, workers=1))
    np.testing.assert_array_equal(got, group_select(x16, 2400, seed=1, chunk_rows=1000))  # seeded
    assert not np.array_equal(got, group_select(x16, 2400, seed=2, chunk_rows=1000))
    assert group_select(x16, 0, seed=1, chunk_rows=1000).tolist() == []
    assert len(group_select(x16, 6000, seed=1, chunk_rows=1000)) == 6000


def test_group_parts_selected_in_worker_processes_give_the_same_set(tmp_path) -> None:
    """With a memory-mapped sketch the parts go to worker processes that reopen the file; the set is the one
    this process picks alone."""
    from mtprune.scoring import group

    rng = np.random.default_rng(6)
    np.save(tmp_path / "sketch.npy", (rng.normal(size=(3000, 32)) * rng.lognormal(0, 0.5, (3000, 1))).astype(np.float16))
    stored = np.load(tmp_path / "sketch.npy", mmap_mode="r")
    order = rng.permutation(3000)  # the prune stage's view: the table's row order over the file's
    alone = group_select(group.RowView(stored, order), 900, seed=4, chunk_rows=500, workers=1)
    assert group._memmap_source(group.RowView(stored, order)) is not None
    np.testing.assert_array_equal(alone, group_select(group.RowView(stored, order), 900, seed=4, chunk_rows=500,
                                                      workers=2))
