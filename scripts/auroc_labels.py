#!/usr/bin/env python
"""AUROC of score columns against a labels file that names clean pairs too, overall and per kind of noise.

    .venv/bin/python scripts/auroc_labels.py runs/real-cpu-wmt/04_score/scores.parquet \\
        --labels ../shared/data/wmt-ende-10k/labels.tsv --pair en-de --columns base_wordalign_src,base_all,combined_all

Labels: ``<0-based line>\\t<label>`` (``--pair`` turns the line into the sentence id ``<pair>/<line>``) or
``<sentence id>\\t<label>``; ``OK`` (``--clean``) marks a clean pair, any other label a kind of noise. Only the
labelled pairs are ranked: each kind against the clean ones, ``all`` every noisy pair against them. A run's own
``01_download/noise.ids`` (injected noise, clean pairs unlisted) is read with ``--unlisted-clean``. Several score
tables (e.g. before and after a change) are printed one after the other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def read_labels(path: Path, pair: str | None) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, label = line.partition("\t")
        if not label:
            raise SystemExit(f"{path}: line {n}: expected <id>\\t<label>, got {line!r}")
        out[f"{pair}/{int(key)}" if pair else key] = label.strip()
    return out


def table(scores: Path, labels: dict[str, str], clean: str, columns: list[str], unlisted_clean: bool) -> list[str]:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    df = pd.read_parquet(scores, columns=["sentence_id", *[c.lstrip("-") for c in columns]])
    df = df.drop_duplicates("sentence_id")  # both directions of a pair: the first
    label = df["sentence_id"].map(labels)
    if unlisted_clean:
        label = label.fillna(clean)
    df, label = df[label.notna()], label[label.notna()].to_numpy()
    kinds = sorted(set(label) - {clean})
    lines = [f"{scores}: {len(df)} labelled pairs, {int((label != clean).sum())} noisy "
             f"({', '.join(f'{k} {int((label == k).sum())}' for k in kinds)})",
             "| score | all | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    for c in columns:
        values = df[c.lstrip("-")].to_numpy(dtype=np.float64) * (-1 if c.startswith("-") else 1)
        values = np.nan_to_num(values, nan=np.nanmedian(values))
        cells = [roc_auc_score(label != clean, values)]
        for k in kinds:
            sel = (label == k) | (label == clean)
            cells.append(roc_auc_score(label[sel] == k, values[sel]))
        lines.append(f"| {c} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scores", type=Path, nargs="+", help="scores.parquet file(s)")
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--pair", help="labels name 0-based lines of this pair's training text")
    ap.add_argument("--clean", default="OK", help="the label of a clean pair")
    ap.add_argument("--unlisted-clean", action="store_true", help="pairs the file does not list are clean")
    ap.add_argument("--columns", default="base_wordalign_src,base_wordalign_tgt,base_all,combined,combined_all")
    a = ap.parse_args()
    labels = read_labels(a.labels, a.pair)
    for s in a.scores:
        print("\n".join(table(s, labels, a.clean, a.columns.split(","), a.unlisted_clean)) + "\n")


if __name__ == "__main__":
    main()
