import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtprune.errors import UsageError
from mtprune.stages.prune import drop_mask


def table() -> pd.DataFrame:
    # de-en/0..4 and en-fr/0..4 with hand-picked scores; de-en/1 and de-en/3 tie on el2n
    return pd.DataFrame({
        "index": range(10),
        "sentence_id": [f"de-en/{i}" for i in range(5)] + [f"en-fr/{i}" for i in range(5)],
        "pair": ["de-en"] * 5 + ["en-fr"] * 5,
        "direction": ["en-de"] * 5 + ["en-fr"] * 5,
        "el2n": [0.9, 0.5, 0.1, 0.5, 0.3, 0.8, 0.2, 0.95, 0.4, 0.6],
        "nll": [1.0, 9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.5],
    })


def dropped(strategy: str, sparsity: float, scope: str = "global", seed: int = 1) -> list[str]:
    df = table()
    return sorted(df["sentence_id"][drop_mask(df, strategy, sparsity, scope, seed)])


def test_high_drops_the_highest_scores() -> None:
    assert dropped("el2n-high", 0.3) == ["de-en/0", "en-fr/0", "en-fr/2"]  # 0.95, 0.9, 0.8


def test_low_drops_the_lowest_scores() -> None:
    assert dropped("el2n-low", 0.2) == ["de-en/2", "en-fr/1"]  # 0.1, 0.2


def test_any_score_column_works() -> None:
    assert dropped("nll-high", 0.1) == ["de-en/1"]
    assert dropped("nll-low", 0.1) == ["en-fr/4"]


def test_ties_are_broken_by_sentence_id() -> None:
    # ranks (high): 0.95 en-fr/2, 0.9 de-en/0, 0.8 en-fr/0, 0.6 en-fr/4, then the tie 0.5: de-en/1 before de-en/3
    assert dropped("el2n-high", 0.5) == ["de-en/0", "de-en/1", "en-fr/0", "en-fr/2", "en-fr/4"]
    df = table()
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    got = sorted(shuffled["sentence_id"][drop_mask(shuffled, "el2n-high", 0.5, "global", 1)])
    assert got == ["de-en/0", "de-en/1", "en-fr/0", "en-fr/2", "en-fr/4"]


def kept(strategy: str, sparsity: float, scope: str = "global", seed: int = 1) -> list[str]:
    df = table()
    return sorted(df["sentence_id"][~drop_mask(df, strategy, sparsity, scope, seed)])


# sparsity -> pairs dropped out of the 10, worked out by hand (nearest whole pair)
COUNTS = {0.0: 0, 0.04: 0, 0.06: 1, 0.1: 1, 0.2: 2, 0.33: 3, 0.36: 4, 0.49: 5, 0.5: 5, 0.64: 6, 0.66: 7, 0.9: 9}


def test_dropped_counts_worked_out_by_hand() -> None:
    for s, n in COUNTS.items():
        assert len(dropped("el2n-high", s)) == n, s
        assert len(dropped("el2n-low", s)) == n, s
        assert len(dropped("random", s)) == n, s


def test_kept_ids_worked_out_by_hand() -> None:
    # high, by score: en-fr/2 .95, de-en/0 .9, en-fr/0 .8, en-fr/4 .6, de-en/1 .5, de-en/3 .5, en-fr/3 .4, ...
    assert kept("el2n-high", 0.4) == ["de-en/1", "de-en/2", "de-en/3", "de-en/4", "en-fr/1", "en-fr/3"]
    # the tie at .5 is split: de-en/1 goes before de-en/3, on either side
    assert kept("el2n-high", 0.5) == ["de-en/2", "de-en/3", "de-en/4", "en-fr/1", "en-fr/3"]
    assert kept("el2n-low", 0.5) == ["de-en/0", "de-en/3", "en-fr/0", "en-fr/2", "en-fr/4"]
    assert kept("el2n-low", 0.3) == ["de-en/0", "de-en/1", "de-en/3", "en-fr/0", "en-fr/2", "en-fr/3", "en-fr/4"]
    assert kept("nll-high", 0.2) == ["de-en/0", "de-en/2", "de-en/3", "de-en/4", "en-fr/0", "en-fr/1",
                                     "en-fr/2", "en-fr/4"]  # drops 9.0 de-en/1 and 8.0 en-fr/3
    assert kept("el2n-high", 0.0) == sorted(table()["sentence_id"])


def test_per_pair_scope_drops_the_same_fraction_from_each_pair() -> None:
    # two of each pair's five: de-en .9 and (tie .5) de-en/1; en-fr .95 and .8
    assert dropped("el2n-high", 0.4, scope="per-pair") == ["de-en/0", "de-en/1", "en-fr/0", "en-fr/2"]
    # three of five: de-en takes its whole tie at .5
    assert dropped("el2n-high", 0.6, scope="per-pair") == ["de-en/0", "de-en/1", "de-en/3",
                                                           "en-fr/0", "en-fr/2", "en-fr/4"]
    assert dropped("el2n-low", 0.2, scope="per-pair") == ["de-en/2", "en-fr/1"]
    assert kept("el2n-low", 0.4, scope="per-pair") == ["de-en/0", "de-en/1", "de-en/3", "en-fr/0", "en-fr/2",
                                                       "en-fr/4"]
    # the same sparsity globally takes three of en-fr's five and one of de-en's
    assert dropped("el2n-high", 0.4) == ["de-en/0", "en-fr/0", "en-fr/2", "en-fr/4"]
    for s, n in ((0.2, 1), (0.4, 2), (0.6, 3), (0.8, 4)):
        got = dropped("random", s, scope="per-pair", seed=7)
        assert [g.split("/")[0] for g in got] == ["de-en"] * n + ["en-fr"] * n


def test_random_is_seeded_and_nested() -> None:
    assert dropped("random", 0.3, seed=5) == dropped("random", 0.3, seed=5)
    assert dropped("random", 0.5, seed=5) != dropped("random", 0.5, seed=6)
    assert set(dropped("random", 0.2, seed=5)) <= set(dropped("random", 0.5, seed=5))


def test_random_per_pair_stays_nested_when_a_small_pair_drops_nothing() -> None:
    # de-en has 3 pairs (none dropped at 0.1, one at 0.2); en-fr 1,000
    n_small, n_big = 3, 1000
    df = pd.DataFrame({"sentence_id": [f"de-en/{i}" for i in range(n_small)] + [f"en-fr/{i}" for i in range(n_big)],
                       "pair": ["de-en"] * n_small + ["en-fr"] * n_big})
    low, high = (drop_mask(df, "random", s, "per-pair", 3) for s in (0.1, 0.2))
    assert low[:n_small].sum() == 0 and high[:n_small].sum() == 1 and low.sum() == 100 and high.sum() == 201
    assert not (low & ~high).any()  # every pair dropped at 0.1 is dropped at 0.2


def test_the_id_order_is_the_sentence_ids_order_computed_column_wise() -> None:
    # numbers compare as numbers (de-en/9 before de-en/10), pair names and directions as strings
    from mtprune.stages.prune import _id_order_key

    rng = np.random.default_rng(4)
    pair = rng.choice(["en-es", "de-en", "en-it", "en-fr"], 3000)
    num = rng.integers(0, 5000, 3000)
    direction = np.where(rng.random(3000) < 0.5, "en-xx", "xx-en")
    df = pd.DataFrame({"sentence_id": [f"{p}/{n}" for p, n in zip(pair, num, strict=True)], "direction": direction})
    got = np.lexsort(_id_order_key(df)[::-1])
    want = sorted(range(3000), key=lambda r: (pair[r], int(num[r]), direction[r]))
    assert got.tolist() == want
    df.loc[17, "sentence_id"] = "de-en-17"
    with pytest.raises(UsageError, match="'de-en-17' is not <pair>/<number>"):
        _id_order_key(df)


def test_an_unknown_score_column_is_no_score_column() -> None:
    with pytest.raises(UsageError, match="'bleu-high' ranks by 'bleu', which is no score column"):
        dropped("bleu-high", 0.1)


def test_no_nan_scores_allowed() -> None:
    df = table()
    df.loc[3, "el2n"] = np.nan
    with pytest.raises(UsageError, match="missing values"):
        drop_mask(df, "el2n-high", 0.1, "global", 1)


# ---- group-effect selection and the derived columns -----------------------------------------------

def planted_sketch() -> np.ndarray:
    # rows of table(): de-en/1 and en-fr/3 cancel exactly, de-en/4 and en-fr/0 nearly; the rest are large
    rng = np.random.default_rng(0)
    s = rng.normal(size=(10, 16)) * 3
    s[3] = -s[1] + 0.0  # de-en/3 = -de-en/1
    s[8] = -s[4] + 0.01  # en-fr/3 ~ -de-en/4
    return s.astype(np.float32)


def test_group_drops_the_set_whose_gradients_cancel_whatever_the_row_order() -> None:
    df, sketch = table(), planted_sketch()
    assert sorted(df["sentence_id"][drop_mask(df, "group", 0.2, "global", 1, sketch)]) == ["de-en/1", "de-en/3"]
    assert sorted(df["sentence_id"][drop_mask(df, "group", 0.4, "global", 1, sketch)]) == [
        "de-en/1", "de-en/3", "de-en/4", "en-fr/3"]
    order = np.random.default_rng(5).permutation(10)
    shuffled = df.iloc[order].reset_index(drop=True)
    got = drop_mask(shuffled, "group", 0.4, "global", 1, sketch[order])
    assert sorted(shuffled["sentence_id"][got]) == ["de-en/1", "de-en/3", "de-en/4", "en-fr/3"]
    # per pair: de-en's cancelling pair; en-fr's two rows with the smallest sum, by brute force
    per = sorted(df["sentence_id"][drop_mask(df, "group", 0.4, "per-pair", 1, sketch)])
    fr = min(((a, b) for a in range(5, 10) for b in range(a + 1, 10)),
             key=lambda ab: np.linalg.norm(sketch[list(ab)].astype(np.float64).sum(axis=0)))
    assert per == ["de-en/1", "de-en/3"] + [f"en-fr/{i - 5}" for i in fr]
    with pytest.raises(UsageError, match="group needs the gradient sketch"):
        drop_mask(df, "group", 0.2, "global", 1)


def test_group_needs_a_sketch_that_matches_the_score_table(tmp_path) -> None:
    from mtprune.config import load_config
    from mtprune.layout import RunLayout
    from mtprune.stages.prune import load_sketch, preflight

    layout = RunLayout(tmp_path)
    layout.scores.parent.mkdir(parents=True)
    table().to_parquet(layout.scores)
    cfg = load_config(None, ["prune.strategies=[group,el2n-high]", "prune.sparsities=[0.2]"], str(tmp_path))
    with pytest.raises(UsageError, match=r"group needs .*grad_sketch.npy, which `mtprune score` writes"):
        preflight(cfg, layout)
    np.save(layout.grad_sketch, np.zeros((7, 4), dtype=np.float32))
    with pytest.raises(UsageError, match=r"grad_sketch.npy: has shape \(7, 4\) but scores.parquet has 10 rows"):
        preflight(cfg, layout)
    np.save(layout.grad_sketch, planted_sketch())
    preflight(cfg, layout)
    assert load_sketch(layout, 10).shape == (10, 16)
    preflight(load_config(None, ["prune.strategies=[el2n-high]"], str(tmp_path / "elsewhere")), layout)


def test_derived_columns_and_group_are_accepted_strategies() -> None:
    from mtprune.config import load_config

    names = ["group", "combined-high", "base_langid_tgt-high", "el2n_debiased-high", "base_lengthratio_char-high",
             "base_similarity-high", "nll_debiased-low", "combined_all-high", "base_wordalign_tgt-high"]
    assert load_config(None, [f"prune.strategies=[{','.join(names)}]"]).prune.strategies == tuple(names)
    df = table().assign(combined=[0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.05],
                        base_langid_tgt=[0.0] * 9 + [0.99], el2n_debiased=table()["el2n"] - 0.5)
    assert sorted(df["sentence_id"][drop_mask(df, "combined-high", 0.2, "global", 1)]) == ["de-en/1", "en-fr/3"]
    assert sorted(df["sentence_id"][drop_mask(df, "base_langid_tgt-high", 0.1, "global", 1)]) == ["en-fr/4"]
    assert sorted(df["sentence_id"][drop_mask(df, "el2n_debiased-high", 0.1, "global", 1)]) == ["en-fr/2"]


@pytest.mark.slow
def test_score_writes_the_derived_columns_and_prune_runs_group_and_them(tiny_copy) -> None:
    from conftest import TINY, cli, read
    from mtprune.config import load_config
    from mtprune.layout import RunLayout
    from mtprune.scoring import baselines, derived
    from mtprune.scoring.forward import score_columns
    from mtprune.scoring.group import group_select

    layout = RunLayout(tiny_copy)
    on = ["--set", "score.baselines=true"]  # off in the tiny config: a re-merge adds them to the kept pass
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "-q", *on)
    assert code == 0, out
    scores = pd.read_parquet(layout.scores)
    numeric = {c for c in scores.columns if pd.api.types.is_numeric_dtype(scores[c])} - {"index"}
    assert set(score_columns(load_config(TINY, ["score.baselines=true"], str(tiny_copy)))) == numeric
    for col in ("el2n_debiased", "nll_debiased", "combined", "combined_all", "base_all", *baselines.COLUMNS):
        assert col in scores and not scores[col].isna().any(), col
    assert [c for c in scores if c.startswith("el2n_debiased@")] == [f"el2n_debiased@s{s}u{u}" for s in (1, 2)
                                                                    for u in (10, 20)]
    cfg = load_config(TINY, ["score.baselines=true"], str(tiny_copy))
    again = derived.add_columns(scores, cfg, layout)  # recomputed from the table read back: the same
    pd.testing.assert_frame_equal(again[scores.columns], scores)

    strategies = "[group,combined-high,base_wordalign_tgt-high,combined_all-high,el2n_debiased-high,random-length]"
    code, out = cli("prune", "-c", str(TINY), "--run-dir", str(tiny_copy), "-q", "--set", f"prune.strategies={strategies}",
                    *on)
    assert code == 0, out
    n = len(scores)
    for name in ("group-0.2", "combined-high-0.2", "base_wordalign_tgt-high-0.2", "combined_all-high-0.2",
                 "el2n_debiased-high-0.2", "random-length-0.2"):
        assert len(read(layout.kept_ids(name))) == n - round(0.2 * n), name
    # random-length drops el2n-high's target lengths (the default prune.length_match)
    dropped_len = {name: sorted(scores.set_index("sentence_id")["n_tokens"].drop(read(layout.kept_ids(name))))
                   for name in ("random-length-0.2",)}
    ref = scores["n_tokens"][drop_mask(scores, "el2n-high", 0.2, "global", 1)]
    assert dropped_len["random-length-0.2"] == sorted(ref)
    run_stats = json.loads(layout.manifest("prune").read_text())["stats"]["runs"]["random-length-0.2"]
    assert run_stats["length_match"] == "el2n-high" and 0 <= run_stats["overlap_with_length_match"] < round(0.2 * n)
    # group: the dropped set is the selection on the sketch, in sentence-id order
    order = scores.sort_values("sentence_id", key=lambda s: s.map(lambda x: (x.rsplit("/", 1)[0], int(x.rsplit("/", 1)[1]))))
    rows = order.index.to_numpy()
    dropped = set(scores["sentence_id"][rows[group_select(np.load(layout.grad_sketch)[rows], round(0.2 * n), 1)]])
    assert set(scores["sentence_id"]) - set(read(layout.kept_ids("group-0.2"))) == dropped


def lengths_table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Pairs of 3..30 target tokens whose el2n grows with length (plus noise), as a weak proxy's does."""
    rng = np.random.default_rng(seed)
    n_tokens = rng.integers(3, 31, n)
    return pd.DataFrame({"index": range(n), "sentence_id": [f"de-en/{i}" for i in range(n)], "pair": "de-en",
                         "direction": "en-de", "n_tokens": n_tokens,
                         "el2n": n_tokens / 30 + rng.normal(0, 0.2, n), "nll": rng.random(n)})


@pytest.mark.parametrize("scope", ["global", "per-pair"])
def test_random_length_drops_the_lengths_the_matched_strategy_drops_but_other_pairs(scope: str) -> None:
    df = lengths_table()
    for sparsity in (0.1, 0.3):
        ref = drop_mask(df, "el2n-high", sparsity, scope, 1)
        got = drop_mask(df, "random-length", sparsity, scope, 1, length_match="el2n-high")
        assert got.sum() == ref.sum()
        # the same number of pairs of every target length
        assert (df["n_tokens"][got].value_counts().sort_index() == df["n_tokens"][ref].value_counts().sort_index()).all()
        assert df["n_tokens"][got].mean() > df["n_tokens"].mean() + 2  # el2n-high's length bias is kept
        assert (got & ~ref).sum() > 0.3 * got.sum()  # but within a length, which pairs is left to chance
        # seeded and independent of the table's row order
        again = drop_mask(df.iloc[::-1].reset_index(drop=True), "random-length", sparsity, scope, 1)
        assert sorted(df["sentence_id"][got]) == sorted(df["sentence_id"].iloc[::-1].reset_index(drop=True)[again])
        other = drop_mask(df, "random-length", sparsity, scope, 2)
        assert sorted(df["sentence_id"][got]) != sorted(df["sentence_id"][other])
    low = drop_mask(df, "random-length", 0.3, scope, 1, length_match="el2n-low")
    assert df["n_tokens"][low].mean() < df["n_tokens"].mean() - 2


def _random_length_one_row_at_a_time(df: pd.DataFrame, reference: np.ndarray, scope: str, seed: int) -> np.ndarray:
    # the draw written plainly (the version before it was vectorised): bins keyed by (pair, length) as strings,
    # rows appended in sentence-id order, the bins drawn in sorted key order
    pair = df["pair"].astype(str) if scope == "per-pair" else pd.Series(["0"] * len(df))
    ids = sorted(range(len(df)), key=lambda r: (df["sentence_id"][r].rsplit("/", 1)[0],
                                                int(df["sentence_id"][r].rsplit("/", 1)[1]), df["direction"][r]))
    bins: dict[tuple[str, str], list[int]] = {}
    for r in ids:
        bins.setdefault((pair[r], str(df["n_tokens"][r])), []).append(r)
    rng, mask = np.random.default_rng(seed), np.zeros(len(df), dtype=bool)
    for key in sorted(bins):
        rows = np.array(bins[key])
        k = int(reference[rows].sum())
        if k:
            mask[rows[rng.permutation(len(rows))[:k]]] = True
    return mask


@pytest.mark.parametrize("scope", ["global", "per-pair"])
def test_random_length_draws_the_pairs_it_drew_before_it_was_vectorised(scope: str) -> None:
    from mtprune.stages.prune import length_matched_mask

    a, b = lengths_table(400, seed=1), lengths_table(300, seed=2)
    b["sentence_id"], b["pair"], b["direction"] = [f"en-fr/{i}" for i in range(300)], "en-fr", "en-fr"
    b["n_tokens"] = b["n_tokens"] * 4  # lengths of two and three digits: "100" sorts before "12" as a string
    df = pd.concat([b, a]).sample(frac=1.0, random_state=5).reset_index(drop=True)
    ref = drop_mask(df, "el2n-high", 0.3, scope, 1)
    for seed in (1, 7):
        assert (length_matched_mask(df, ref, scope, seed) == _random_length_one_row_at_a_time(df, ref, scope, seed)).all()


def test_random_length_needs_a_score_strategy_to_match() -> None:
    from mtprune.config import load_config
    from mtprune.errors import ConfigError
    from mtprune.layout import RunLayout
    from mtprune.stages.prune import check

    with pytest.raises(ConfigError, match="prune.length_match: 'random' is not a <score>-high / <score>-low"):
        load_config(None, ["prune.length_match=random"])
    cfg = load_config(None, ["prune.strategies=[random-length]", "prune.length_match=foo-high"])
    with pytest.raises(UsageError, match=r"^prune.length_match: 'foo-high' ranks by 'foo', which is no score column"):
        check(cfg, RunLayout(Path("unused")))
    check(load_config(None, ["prune.strategies=[random-length,base_wordalign_tgt-high,combined_all-high]"]),
          RunLayout(Path("unused")))


def test_opusfilter_drops_what_the_filters_reject_in_one_corpus_whatever_the_sparsities() -> None:
    from mtprune.config import load_config
    from mtprune.stages.prune import runs

    df = table().assign(base_opusfilter=[0, 2, 0, 0, 1, 0, 0, 0, 0, 3])
    assert sorted(df["sentence_id"][drop_mask(df, "opusfilter", 0.5, "global", 1)]) == ["de-en/1", "de-en/4", "en-fr/4"]
    cfg = load_config(None, ["prune.strategies=[opusfilter,random]", "prune.sparsities=[0.1,0.3]"])
    assert runs(cfg) == [("opusfilter", "opusfilter", None), ("random-0.1", "random", 0.1), ("random-0.3", "random", 0.3)]
    with pytest.raises(UsageError, match="opusfilter needs the base_opusfilter column"):
        drop_mask(table(), "opusfilter", 0.1, "global", 1)


# ---- two-column strategies: <first>-high+<second>-high --------------------------------------------

def two(strategy: str, sparsity: float, first_share: float, scope: str = "global", df: pd.DataFrame | None = None
        ) -> list[str]:
    df = table() if df is None else df
    return sorted(df["sentence_id"][drop_mask(df, strategy, sparsity, scope, 1, first_share=first_share)])


def test_two_columns_drop_the_first_columns_share_then_the_seconds_pick_of_the_rest() -> None:
    # el2n (high): en-fr/2 .95, de-en/0 .9, en-fr/0 .8, ...; nll (high): de-en/1 9, en-fr/3 8, en-fr/2 7, en-fr/1 6
    # 0.4 of 10: el2n drops 0.2 of 10 (en-fr/2, de-en/0), then nll the two highest of the rest
    assert two("el2n-high+nll-high", 0.4, 0.2) == ["de-en/0", "de-en/1", "en-fr/2", "en-fr/3"]
    assert two("el2n-high+nll-high", 0.4, 0.2) not in (dropped("el2n-high", 0.4), dropped("nll-high", 0.4))
    # below the first share the first column drops it all; a first share of 0 leaves it all to the second
    assert two("el2n-high+nll-high", 0.1, 0.2) == dropped("el2n-high", 0.1) == ["en-fr/2"]
    assert two("el2n-high+nll-high", 0.4, 0.0) == dropped("nll-high", 0.4)
    # either half -low; the second column's tie at el2n .5 goes by sentence id (de-en/1 before de-en/3)
    assert two("nll-low+el2n-high", 0.3, 0.1) == ["de-en/0", "en-fr/2", "en-fr/4"]  # nll .5, then el2n .95, .9
    assert two("nll-low+el2n-high", 0.5, 0.1) == ["de-en/0", "de-en/1", "en-fr/0", "en-fr/2", "en-fr/4"]
    shuffled = table().sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert two("nll-low+el2n-high", 0.5, 0.1, df=shuffled) == two("nll-low+el2n-high", 0.5, 0.1)


def test_two_columns_per_pair_take_both_steps_in_each_pair() -> None:
    # 0.6 of each pair's five = 3, the first 0.2 of five = 1: de-en el2n .9 then nll 9, 4; en-fr el2n .95 then 8, 6
    assert two("el2n-high+nll-high", 0.6, 0.2, "per-pair") == ["de-en/0", "de-en/1", "de-en/4",
                                                                "en-fr/1", "en-fr/2", "en-fr/3"]
    # globally: el2n's two (en-fr/2, de-en/0), then nll's four highest of the rest
    assert two("el2n-high+nll-high", 0.6, 0.2) == ["de-en/0", "de-en/1", "en-fr/0", "en-fr/1", "en-fr/2", "en-fr/3"]


def test_two_columns_drop_prunes_count_and_nest_across_sparsities() -> None:
    df = lengths_table(400, seed=3)
    last = np.zeros(len(df), dtype=bool)
    for s in (0.05, 0.1, 0.3, 0.5, 0.75):
        got = drop_mask(df, "nll-high+el2n-low", s, "global", 1, first_share=0.1)
        assert got.sum() == round(s * 400), s
        first = drop_mask(df, "nll-high", min(0.1, s), "global", 1)
        assert not (first & ~got).any(), s  # the first column's share is dropped whole
        assert not (last & ~got).any(), s  # a larger sparsity drops a superset
        last = got


def test_a_typo_in_either_half_names_the_strategy_and_the_column() -> None:
    from mtprune.config import load_config
    from mtprune.layout import RunLayout
    from mtprune.stages.prune import check, ranked_columns

    cfg = load_config(None, ["prune.strategies=[el2n-high+nll-low,random]"])
    assert ranked_columns(cfg) == [("prune.strategies", "el2n-high+nll-low", "el2n"),
                                   ("prune.strategies", "el2n-high+nll-low", "nll")]
    check(cfg, RunLayout(Path("unused")))
    for strategy, column in (("el2n-high+nlll-high", "nlll"), ("el2nn-high+nll-high", "el2nn")):
        cfg = load_config(None, [f"prune.strategies=[{strategy}]"])
        with pytest.raises(UsageError) as e:
            check(cfg, RunLayout(Path("unused")))
        msg = str(e.value)
        assert msg.startswith(f"prune.strategies: {strategy!r} ranks by {column!r}, which is no score column: "
                              f"did you mean {column[:-1]}"), msg
        assert "\n" not in msg
    with pytest.raises(UsageError, match="'el2n-high\\+bleu-high' ranks by 'bleu', which is no score column"):
        dropped("el2n-high+bleu-high", 0.1)


def test_two_column_names_parse_in_the_reports_run_names() -> None:
    from mtprune.curves import parse_run_name

    assert parse_run_name("base_all-high+domain_combined-high-0.75") == ("base_all-high+domain_combined-high", 0.75, 1)
    assert parse_run_name("a-high+b-low-0.5+competence-seed2") == ("a-high+b-low+competence", 0.5, 2)
    assert parse_run_name("el2n-high-0.2+self-paced") == ("el2n-high+self-paced", 0.2, 1)
    assert parse_run_name("full+general-to-domain") == ("full+general-to-domain", 0.0, 1)


@pytest.mark.slow
def test_prune_writes_a_two_column_corpus(tiny_copy) -> None:
    from conftest import TINY, cli, read
    from mtprune.layout import RunLayout

    layout = RunLayout(tiny_copy)
    args = ["-c", str(TINY), "--run-dir", str(tiny_copy), "-q"]
    code, out = cli("prune", *args, "--set", "prune.strategies=[el2n-high+nlll-low]")
    assert code == 2 and "'el2n-high+nlll-low' ranks by 'nlll', which is no score column" in out, out
    code, out = cli("prune", *args, "--set", "prune.strategies=[el2n-high+nll-low]", "--set",
                    "prune.sparsities=[0.5]", "--set", "prune.first_share=0.1")
    assert code == 0, out
    scores = pd.read_parquet(layout.scores)
    n = len(scores)
    want = set(scores["sentence_id"][~drop_mask(scores, "el2n-high+nll-low", 0.5, "global", 1, first_share=0.1)])
    assert set(read(layout.kept_ids("el2n-high+nll-low-0.5"))) == want and len(want) == n - round(0.5 * n)
    stats = json.loads(layout.manifest("prune").read_text())["stats"]["runs"]["el2n-high+nll-low-0.5"]
    assert stats["strategy"] == "el2n-high+nll-low" and stats["first_dropped"] == round(0.1 * n)
    assert (layout.pruned_data_bin("el2n-high+nll-low-0.5") / "train.src-tgt.tgt.bin").is_file()
