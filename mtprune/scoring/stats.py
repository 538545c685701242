"""Summary statistics of the score table: rank correlation, and the per-score diagnostics a manifest records."""

from __future__ import annotations

from typing import Any

import numpy as np

from .forward import Checkpoint


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    if len(a) < 3:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


NOT_SCORES = ("index", "sentence_id", "pair", "direction", "n_tokens", "el2n_std")


def diagnostics(df: Any, ckpts: list[Checkpoint]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_score": {}}
    score_cols = [c for c in df.columns if c not in NOT_SCORES and np.issubdtype(df[c].dtype, np.number)]
    for col in score_cols:
        v = df[col].to_numpy()
        out["per_score"][col] = {
            "mean": float(v.mean()), "p5": float(np.percentile(v, 5)), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "spearman_vs_length": spearman(v, df["n_tokens"].to_numpy())}
    seeds = sorted({c.seed for c in ckpts})
    per_seed = {s: df[[f"el2n@{c.tag}" for c in ckpts if c.seed == s]].mean(axis=1).to_numpy() for s in seeds}
    out["el2n_spearman_between_seeds"] = {
        f"s{a}~s{b}": spearman(per_seed[a], per_seed[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]}
    return out
