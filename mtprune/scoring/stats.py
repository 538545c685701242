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


def diagnostics(table: Any, ckpts: list[Checkpoint]) -> dict[str, Any]:
    """Per score column of a pyarrow score table: mean, percentiles and Spearman with the target length; and the
    Spearman of el2n between seeds. Reads one column at a time."""
    import pyarrow as pa

    out: dict[str, Any] = {"per_score": {}}
    length = table.column("n_tokens").to_numpy()
    for field in table.schema:
        if field.name in NOT_SCORES or not (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            continue
        v = table.column(field.name).to_numpy()
        out["per_score"][field.name] = {
            "mean": float(v.mean()), "p5": float(np.percentile(v, 5)), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "spearman_vs_length": spearman(v, length)}
    seeds = sorted({c.seed for c in ckpts})
    per_seed = {s: np.mean([table.column(f"el2n@{c.tag}").to_numpy() for c in ckpts if c.seed == s], axis=0)
                for s in seeds}
    out["el2n_spearman_between_seeds"] = {
        f"s{a}~s{b}": spearman(per_seed[a], per_seed[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]}
    return out
