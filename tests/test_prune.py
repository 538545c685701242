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


def test_exactly_round_sparsity_times_n() -> None:
    for s in (0.0, 0.1, 0.25, 0.33, 0.5, 0.75, 0.99):
        assert len(dropped("el2n-high", s)) == round(s * 10)
        assert len(dropped("random", s)) == round(s * 10)


def test_per_pair_scope_drops_the_same_fraction_from_each_pair() -> None:
    got = dropped("el2n-high", 0.4, scope="per-pair")
    assert got == ["de-en/0", "de-en/1", "en-fr/0", "en-fr/2"]


def test_random_is_seeded_and_nested() -> None:
    assert dropped("random", 0.3, seed=5) == dropped("random", 0.3, seed=5)
    assert dropped("random", 0.5, seed=5) != dropped("random", 0.5, seed=6)
    assert set(dropped("random", 0.2, seed=5)) <= set(dropped("random", 0.5, seed=5))


def test_unknown_score_column_names_the_available_ones() -> None:
    with pytest.raises(UsageError, match="needs a score column 'bleu'.*el2n"):
        dropped("bleu-high", 0.1)


def test_no_nan_scores_allowed() -> None:
    df = table()
    df.loc[3, "el2n"] = np.nan
    with pytest.raises(UsageError, match="missing values"):
        drop_mask(df, "el2n-high", 0.1, "global", 1)
