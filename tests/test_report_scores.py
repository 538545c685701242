"""The report's per-score section: orientation of low-is-bad scores, agreement between seeds, seconds."""

import numpy as np
import pandas as pd

from mtprune.scoring.finding import noise_finding, oriented_scores
from mtprune.scoring.stats import spearman
from mtprune.stages.report import scores_section


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 200
    base = rng.normal(size=n)
    df = pd.DataFrame({"index": np.arange(n), "sentence_id": [f"de-en/{i}" for i in range(n)],
                       "pair": "de-en", "n_tokens": rng.integers(3, 30, n)})
    df["el2n@s1u10"], df["el2n@s1u20"] = base + rng.normal(0, .1, n), base + rng.normal(0, .1, n)
    df["el2n@s2u10"], df["el2n@s2u20"] = base + rng.normal(0, .1, n), base + rng.normal(0, .1, n)
    df["el2n"] = df[[c for c in df if c.startswith("el2n@")]].mean(axis=1)
    df["tracin"] = -base  # helpful pairs high: the bad side is low
    df["combined"] = base
    return df


def test_tracin_is_ranked_negated_everywhere() -> None:
    df = _table()
    scores = oriented_scores(df)
    assert "tracin" not in scores and np.array_equal(scores["-tracin"], base_of(df))
    labels = {s: "misaligned" for s in df.sort_values("combined").sentence_id[-20:]}  # the 20 highest are noise
    auc = noise_finding(df, labels, [0.1]).set_index(["score", "kind"])["auroc"]
    assert auc[("-tracin", "all")] == auc[("combined", "all")] == 1.0


def base_of(df: pd.DataFrame) -> np.ndarray:
    return df["combined"].to_numpy(dtype=float)


def test_every_score_has_its_row_with_seed_agreement_and_seconds(tmp_path) -> None:
    from mtprune.stages.report import CheckpointColumns

    df = _table()
    df.loc[7, "el2n@s2u10"] = np.nan  # a missing value is skipped in its seed's mean, as a row mean skips it
    df.to_parquet(tmp_path / "scores.parquet")
    at = CheckpointColumns(tmp_path / "scores.parquet", [c for c in df if "@" in c])
    per_pair = df[[c for c in df if "@" not in c]]  # what the report holds in memory
    md = scores_section(per_pair, at, {"seconds": 12.0, "proto_seconds": 1.5, "derived_seconds": {"combined": 0.25}})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"el2n", "-tracin", "combined"}
    s1 = df[["el2n@s1u10", "el2n@s1u20"]].mean(axis=1).to_numpy()
    s2 = df[["el2n@s2u10", "el2n@s2u20"]].mean(axis=1).to_numpy()
    assert rows["el2n"][1] == f"{spearman(s1, s2):.2f}"
    assert rows["el2n"][2] == "12 (shared pass)" and rows["combined"][2] == "0.2"
    assert rows["combined"][1] == "–"  # no per-checkpoint columns: nothing to compare
