"""The sweep's results as numbers: the mean and spread over training seeds per strategy, sparsity and test
set, and the test sets a table or plot shows (the report's tables and ``plots.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, float, str], tuple[float, float, int]]:
    """(strategy, sparsity, pair) -> (mean, std, seeds) of ``metric`` over the seeds."""
    groups: dict[tuple[str, float, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["sparsity"], r["pair"]), []).append(float(r[metric]))
    return {k: (*mean_std(v), len(v)) for k, v in groups.items()}


def pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def result_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns and the plot's panels: every test set (OPUS pairs, then extra sets), then ``all``."""
    return [p for p in dict.fromkeys(r["pair"] for r in rows) if p != "all"] + ["all"]
