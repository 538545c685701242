"""Is there enough proxy for the sparsity chosen? The drop set of each proxy seed and checkpoint against the averaged one.

EL2N is averaged over seeds and checkpoints because one training run's scores vary (in MT, where the label space is
the vocabulary, by much). The rank correlations in results.md say how much; what a user prunes by is a drop set. So
for each ``prune.sparsities`` value, the pairs ``el2n-high`` drops by one seed's EL2N (the mean over that seed's
checkpoints), and by one checkpoint's, are set against the pairs it drops by the averaged EL2N (``prune``'s own
selection, its scope and tie-breaking): their Jaccard overlap. When a seed's overlap is under ``THRESHOLD`` at a
sparsity, another seed would move the drop set noticeably: the report and ``status`` say so.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ..config import Config
from ..layout import RunLayout
from ..scoring.finding import md_table

THRESHOLD = 0.8  # a seed's drop set sharing less than this (Jaccard) with the averaged one: more seeds advised
log = logging.getLogger("mtprune")


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def drop_set_stability(cfg: Config, df: Any, at: Any, tags: list[str]) -> tuple[str, dict[str, Any]]:
    """results.md's section and the manifest's summary (``min_seed_jaccard`` per sparsity, None with one seed)."""
    from .prune import drop_mask

    sparsities = [s for s in cfg.prune.sparsities if s > 0]
    ids = df[["sentence_id", "pair"] + (["direction"] if "direction" in df else [])]

    def dropped(values: np.ndarray, s: float) -> np.ndarray:
        return drop_mask(ids.assign(el2n=values), "el2n-high", s, cfg.prune.scope, cfg.prune.seed)

    averaged = {s: dropped(df["el2n"].to_numpy(), s) for s in sparsities}
    seeds = sorted({t.split("u")[0] for t in tags}, key=lambda x: int(x[1:]))
    rows, by_seed = [], {}
    for seed in seeds:
        own = [t for t in tags if t.split("u")[0] == seed]
        mean = np.mean([at[f"el2n@{t}"] for t in own], axis=0)
        by_seed[seed] = [jaccard(dropped(mean, s), averaged[s]) for s in sparsities]
        rows.append([f"seed {seed[1:]} (mean of its {len(own)} checkpoints)", *by_seed[seed]])
    for t in tags:
        rows.append([f"checkpoint {t}", *[jaccard(dropped(at[f"el2n@{t}"], s), averaged[s]) for s in sparsities]])
    many = len(seeds) > 1
    summary = {"threshold": THRESHOLD, "min_seed_jaccard": {
        f"{s:g}": (round(min(v[k] for v in by_seed.values()), 4) if many else None) for k, s in enumerate(sparsities)}}
    md = ["\n## How stable is the drop set?\n\nJaccard overlap of the pairs `el2n-high` drops at each sparsity by one "
          "proxy seed's EL2N (or one checkpoint's) with the pairs it drops by the EL2N averaged over all of them "
          f"(1: the same pairs). A seed under {THRESHOLD} means another seed would move the drop set noticeably: "
          "run more proxy seeds (`proxy.seeds`) for that sparsity.\n\n"]
    md.append(md_table(["drop set of", *[f"Jaccard @{s:g}" for s in sparsities]], rows) if sparsities else "")
    for s, v in summary["min_seed_jaccard"].items():
        if v is not None and v < THRESHOLD:
            log.warning("report: at sparsity %s a single proxy seed's drop set shares only %.2f (Jaccard) with the "
                        "averaged one: more proxy seeds would steady it (results.md, 'How stable is the drop set?')",
                        s, v)
    if not many:
        md.append("\nOne proxy seed: how much the drop set moves with the seed is not measured.\n")
    return "".join(md), summary


def status_warning(layout: RunLayout) -> str | None:
    """For `mtprune status`: the report's drop-set stability when a seed's is under the threshold, else None."""
    try:
        stats = json.loads(layout.manifest("report").read_text()).get("stats", {})
    except (OSError, ValueError):
        return None
    low = {s: v for s, v in (stats.get("drop_set_stability", {}).get("min_seed_jaccard") or {}).items()
           if v is not None and v < THRESHOLD}
    if not low:
        return None
    shown = ", ".join(f"{v:.2f} at {s}" for s, v in low.items())
    return (f"a single proxy seed's el2n-high drop set overlaps the averaged one by {shown} (Jaccard, under "
            f"{THRESHOLD}): more proxy seeds would steady it (08_report/results.md)")
