"""How well the scores find labelled noise: AUROC and precision per kind of noise, the noise table the score
stage writes (``04_score/noise.md``) and the report's, and the rule both share with prune for how many pairs a
sparsity drops; plus the markdown table both print."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..textio import read_lines
from .stats import spearman


def n_dropped(sparsity: float, n: int) -> int:
    """How many of a group of ``n`` pairs a sparsity drops (whatever the strategy)."""
    return int(round(sparsity * n))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random noisy pair scores higher than a random clean one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def precision_at(scores: np.ndarray, labels: np.ndarray, fraction: float) -> float:
    k = int(round(fraction * len(scores)))
    if k == 0:
        return float("nan")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(labels[top].mean())


UNKNOWN_KIND = "noise"  # the kind of a label given without one (a one-column report.noise_ids file)
CLEAN_LABELS = ("OK", "CLEAN", "IN_DOMAIN")  # a pair a reader found clean (case-insensitive)


class Labels(dict):
    """Sentence id -> kind of noise, and in ``clean`` the ids a labels file names as clean (``OK``). A file that names
    clean pairs labels a sample: every figure is then taken on the labelled pairs only, not on the whole corpus with
    the unlabelled pairs counted as clean."""

    def __init__(self, noise: dict[str, str] | None = None, clean: frozenset[str] | set[str] = frozenset()) -> None:
        super().__init__(noise or {})
        self.clean = frozenset(clean)


def read_noise_ids(path: Path, key: Any = None) -> Labels:
    """``<sentence id>[TAB <kind>]`` lines: sentence id -> kind of noise (``OK`` marks a clean pair); ``key`` turns
    the text before the TAB into the sentence id (None: the line is skipped)."""
    noise, clean = {}, set()
    for ln in read_lines(path):
        if ln.strip():
            sid, _, kind = ln.partition("\t")
            sid = sid.strip() if key is None else key(sid.strip())
            if sid is None:
                continue
            if kind.strip().upper() in CLEAN_LABELS:
                clean.add(sid)
            else:
                noise[sid] = kind.strip() or UNKNOWN_KIND
    return Labels(noise, clean)


def labelled_only(df: Any, labels: dict[str, str]) -> Any:
    """The rows the noise figures are taken on: every row, or only the labelled ones when the labels name clean
    pairs too."""
    clean = getattr(labels, "clean", frozenset())
    if not clean:
        return df
    return df[df["sentence_id"].isin(set(labels) | clean).to_numpy()].reset_index(drop=True)


def per_pair_scores(df: Any) -> list[str]:
    """Every per-pair score of scores.parquet: numeric, not an id or count, not a per-checkpoint column."""
    import pandas as pd

    return [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
            and "@" not in c and c != "index" and not c.startswith("n_")]


# score columns whose bad side is low: the report ranks them negated, named "-<column>"
LOW_IS_BAD = ("tracin",)


def oriented_scores(df: Any) -> dict[str, np.ndarray]:
    """Every score column with higher = more suspicious (``tracin`` as ``-tracin``)."""
    out = {}
    for c in per_pair_scores(df):
        v = df[c].to_numpy(dtype=float)
        out[f"-{c}" if c in LOW_IS_BAD else c] = -v if c in LOW_IS_BAD else v
    return out


def expected_hits(v: np.ndarray, pos: np.ndarray, ranked: np.ndarray, n_top: int) -> float:
    """Labelled pairs among the ``n_top`` highest scores, pairs tied at the cut taken at random (expected)."""
    if n_top == 0:
        return 0.0
    cut = ranked[n_top - 1]
    above, tied = v > cut, v == cut
    return float(pos[above].sum() + (n_top - above.sum()) * pos[tied].mean())


def noise_finding(df: Any, labels: dict[str, str], sparsities: list[float], scope: str = "global") -> Any:
    """One row per (score, kind): how well each score finds the labelled pairs.

    Higher score = more suspicious; ``-length`` (shorter target first) is the baseline. Kind ``all``
    takes every labelled pair; a kind's AUROC sets its pairs against all clean pairs. ``precision@s``
    is the share of what pruning at sparsity s drops (the top-s fraction of all pairs, or of each
    pair's rows under ``scope`` per-pair, as ``prune.scope`` does) that is of that kind (the kinds'
    precisions add up to ``all``'s), ``recall@s`` the share of the kind's pairs in it; pairs tied at
    the cut count by their expected share, so a constant score gets the base rate.
    """
    import pandas as pd

    df = labelled_only(df, labels)
    groups = ([np.arange(len(df))] if scope == "global"
              else [np.flatnonzero(df["pair"].to_numpy() == p) for p in sorted(df["pair"].unique())])
    kind = df["sentence_id"].map(labels).astype(object).fillna("").to_numpy()  # object: all-NaN when nothing matches
    clean = kind == ""
    kinds = ["all"] + sorted(set(kind[~clean]) - {UNKNOWN_KIND})
    cands = oriented_scores(df)
    cands["-length"] = -df["n_tokens"].to_numpy(dtype=float)
    rows = []
    for name, v in cands.items():
        if np.isnan(v).any():  # a pair without a score is the least suspicious
            v = np.where(np.isnan(v), np.nanmin(v) - 1 if (~np.isnan(v)).any() else 0.0, v)
        ranked = [np.sort(v[g])[::-1] for g in groups]
        for k in kinds:
            pos = ~clean if k == "all" else kind == k
            keep = pos | clean
            row: dict[str, Any] = {"score": name, "kind": k, "n_noisy": int(pos.sum()), "n_clean": int(clean.sum()),
                                   "auroc": auroc(v[keep], pos[keep])}
            for s in sparsities:
                tops = [n_dropped(s, len(g)) for g in groups]
                n_top = sum(tops)
                hits = sum(expected_hits(v[g], pos[g], r, t) for g, r, t in zip(groups, ranked, tops, strict=True))
                row[f"precision@{s:g}"] = hits / n_top if n_top else float("nan")
                row[f"recall@{s:g}"] = hits / pos.sum() if pos.any() else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


SIDE_BY_SIDE = ("combined", "base_all", "base_fitted", "combined_all")  # noise.md shows these first, together


def labelled_noise_table(df: Any, labels: dict[str, str], source: str) -> tuple[str, Any, dict[str, Any]]:
    """What ``mtprune score`` writes when the download labelled its noise: every score column ranked by
    AUROC, one column per kind, the precision among the highest-scoring pairs at the labelled fraction
    (global ranking; the report gives precision at each prune sparsity), the worst kind and the
    Spearman with the target length. Depends on nothing but the scores and the labels, so that it
    stays true whatever the prune settings. Returns markdown, the long table and a summary."""
    df = labelled_only(df, labels)
    n_all = len(df)
    n_noisy = int(df["sentence_id"].isin(labels.keys()).sum())
    rate = n_noisy / n_all if n_all else 0.0
    table = noise_finding(df, labels, [rate])
    table = table.rename(columns={f"precision@{rate:g}": "precision@labelled",
                                  f"recall@{rate:g}": "recall@labelled"})
    at = table.set_index(["score", "kind"])
    kinds = [k for k in dict.fromkeys(table["kind"]) if k != "all"]
    length = df["n_tokens"].to_numpy(dtype=float)
    cands = oriented_scores(df)
    cands["-length"] = -length
    rows = []
    for name in dict.fromkeys(table["score"]):
        by_kind = [float(at.loc[(name, k), "auroc"]) for k in kinds]
        worst = int(np.nanargmin(by_kind)) if by_kind and not all(math.isnan(x) for x in by_kind) else None
        rows.append([name, float(at.loc[(name, "all"), "auroc"]), *by_kind,
                     float(at.loc[(name, "all"), "precision@labelled"]),
                     "–" if worst is None else f"{kinds[worst]} ({by_kind[worst]:.2f})", spearman(cands[name], length)])
    rows.sort(key=lambda r: -1.0 if math.isnan(r[1]) else -r[1])
    header = ["score", "all", *kinds, "precision@labelled", "worst kind (AUROC)", "spearman vs length"]
    sides = [r for name in SIDE_BY_SIDE for r in rows if r[0] == name]
    side_md = ""
    if len(sides) > 1:
        side_md = ("## Proxy, baselines, both\n\n`combined`: the proxy's scores alone (`score.combine`); `base_all`: "
                   "OpusFilter's filters alone (`base_*`), no model; `base_fitted`: the filters weighted by a "
                   "classifier fitted on synthetic noise, with `base_all`; `combined_all`: proxy and filters "
                   "(`score.combine_all_how`: Fisher's sum of -log tail shares by default).\n\n" + md_table(header, sides) + "\n## Every score\n\n")
    sample = (f" as noise, the other {n_all - n_noisy} as clean: every figure is on these {n_all} labelled pairs"
              if getattr(labels, "clean", None) else "")
    md = (f"# Finding the labelled noise\n\n{n_noisy} of {n_all} pairs labelled{sample} ({source}). AUROC of each score "
          "(higher = more suspicious; `-length`: shorter target first; 0.5 is chance), for all labelled pairs "
          "and for each kind against the clean pairs; the share of noise among the "
          f"{rate:.1%} highest-scoring pairs (random: {rate:.2f}); the kind the score finds worst, with its AUROC; "
          "Spearman with the target length. Per kind precision and recall in `noise.csv`.\n\n"
          + side_md + md_table(header, rows))
    summary = {"labelled": n_noisy, "auroc": {r[0]: None if math.isnan(r[1]) else round(r[1], 4) for r in rows}}
    return md, table, summary


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.2f}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
