"""Stage 8: the sweep's table and plots, score stability, and how well scores find known noise."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import InputError
from ..layout import RunLayout
from ..manifest import atomic_write_bytes, atomic_write_text
from ..pipeline import StageResult
from .prepare import read_lines
from .score import checkpoints, spearman
from .train import models

SECTIONS = ("report",)
UPSTREAM = ("download", "score", "evaluate")
log = logging.getLogger("mtprune")
CSV_COLUMNS = ("strategy", "sparsity", "pair", "bleu", "chrf", "n_train")


def external_inputs(cfg: Config) -> dict[str, Any]:
    f = cfg.report.noise_ids
    if f is None:
        return {}
    p = Path(f)
    return {f: f"{p.stat().st_size}:{int(p.stat().st_mtime)}" if p.is_file() else "missing"}


def results_rows(cfg: Config, layout: RunLayout) -> list[dict[str, Any]]:
    rows = []
    for name, *_ in models(cfg, layout):
        m = json.loads(layout.metrics(name).read_text())
        per = m["results"]
        opus = {k: v for k, v in per.items() if ":" not in k or v["pair"] in cfg.download.pairs}
        for key, r in per.items():
            rows.append({"strategy": m["strategy"], "sparsity": m["sparsity"], "pair": key, "bleu": r["bleu"],
                         "chrf": r["chrf"], "n_train": m["n_train_per_pair"].get(r["pair"], "")})
        if opus:
            rows.append({"strategy": m["strategy"], "sparsity": m["sparsity"], "pair": "all",
                         "bleu": round(float(np.mean([r["bleu"] for r in opus.values()])), 2),
                         "chrf": round(float(np.mean([r["chrf"] for r in opus.values()])), 2),
                         "n_train": m["n_train"]})
    return rows


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random noisy pair scores higher than a random clean one (ties count half)."""
    import pandas as pd

    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank().to_numpy()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def precision_at(scores: np.ndarray, labels: np.ndarray, fraction: float) -> float:
    k = int(round(fraction * len(scores)))
    if k == 0:
        return float("nan")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(labels[top].mean())


def noise_labels(cfg: Config, layout: RunLayout) -> tuple[set[str], str] | None:
    if cfg.report.noise_ids is not None:
        path = Path(cfg.report.noise_ids)
        if not path.is_file():
            raise InputError(f"report.noise_ids: {path}: file not found")
        return {ln.split("\t")[0].strip() for ln in read_lines(path) if ln.strip()}, str(path)
    if layout.noise_ids.is_file():
        return {ln.split("\t")[0] for ln in read_lines(layout.noise_ids) if ln}, "synthetic corpus labels"
    return None


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.2f}"
    return str(x)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot_bleu(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({r["pair"] for r in rows if r["pair"] != "all"}) + ["all"]
    strategies = sorted({r["strategy"] for r in rows if r["strategy"] != "full"})
    cols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, pair in zip(axes.flat, pairs, strict=False):
        full = [r["bleu"] for r in rows if r["pair"] == pair and r["strategy"] == "full"]
        for st in strategies:
            pts = sorted((r["sparsity"], r["bleu"]) for r in rows if r["pair"] == pair and r["strategy"] == st)
            if full:
                pts = [(0.0, full[0])] + [p for p in pts if p[0] > 0]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=st)
        if full:
            ax.axhline(full[0], color="grey", lw=0.8, ls="--")
        ax.set_title("average over pairs" if pair == "all" else pair)
        ax.set_xlabel("fraction of training pairs pruned")
        ax.set_ylabel("BLEU")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plot_hist(df: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(float(df["el2n"].min()), float(df["el2n"].max()) + 1e-9, 50)
    for pair, g in df.groupby("pair"):
        ax.hist(g["el2n"], bins=bins, histtype="step", label=pair, density=True)
    ax.set_xlabel("EL2N (mean over target tokens, checkpoints and seeds)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _examples(cfg: Config, layout: RunLayout, df: Any) -> str:
    from ..sources import langs

    out = ["# Highest- and lowest-EL2N training pairs\n"]
    n = cfg.report.n_examples
    for pair, g in df.groupby("pair"):
        l1, l2 = langs(pair)
        line_of = {sid: k for k, sid in enumerate(read_lines(layout.download_ids(pair)))}
        a, b = read_lines(layout.split_file(pair, "train", l1)), read_lines(layout.split_file(pair, "train", l2))
        g = g.sort_values(["el2n", "sentence_id"], ascending=[False, True])
        for title, part in (("highest", g.head(n)), ("lowest", g.tail(n).iloc[::-1])):
            out.append(f"\n## {pair}: {title} EL2N\n")
            rows = []
            for r in part.itertuples():
                k = line_of[r.sentence_id]
                rows.append([r.sentence_id, f"{r.el2n:.3f}", a[k].replace("|", "\\|"), b[k].replace("|", "\\|")])
            out.append(_md_table(["sentence id", "EL2N", l1, l2], rows))
    return "".join(out)


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    import pandas as pd

    rows = results_rows(cfg, layout)
    out = layout.stage_dir("report")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(layout.report_file("results.csv"), buf.getvalue())

    df = pd.read_parquet(layout.scores)
    ckpts = checkpoints(cfg, layout)
    md = ["# mtprune sweep results\n", f"\nRun directory: `{layout.root}`\n\n## BLEU / chrF on the test sets\n\n"]
    md.append(_md_table(list(CSV_COLUMNS), [[r[c] for c in CSV_COLUMNS] for r in rows]))

    # stability of the scores
    tags = [c.tag for c in ckpts]
    md.append("\n## How stable is EL2N?\n\nSpearman rank correlation of per-pair EL2N between proxy checkpoints "
              "(seed s, update u):\n\n")
    mat = [[t] + [spearman(df[f"el2n@{t}"].to_numpy(), df[f"el2n@{u}"].to_numpy()) for u in tags] for t in tags]
    md.append(_md_table(["checkpoint"] + tags, mat))
    md.append("\nSpearman correlation of each score with the target length (tokens):\n\n")
    score_cols = ["el2n", "nll"] + [f"el2n@{t}" for t in tags]
    length = df["n_tokens"].to_numpy()
    md.append(_md_table(["score", "spearman vs length", "mean", "p5", "p50", "p95"],
                        [[c, spearman(df[c].to_numpy(), length), float(df[c].mean()),
                          *[float(np.percentile(df[c], q)) for q in (5, 50, 95)]] for c in score_cols]))
    stats: dict[str, Any] = {"rows": len(rows)}

    labels = noise_labels(cfg, layout)
    if labels is not None:
        bad, source = labels
        y = df["sentence_id"].isin(bad).to_numpy()
        stats["noise_pairs"] = int(y.sum())
        fractions = [s for s in cfg.prune.sparsities if s > 0]
        md.append(f"\n## Finding known noise ({int(y.sum())} of {len(y)} pairs labelled, from {source})\n\n"
                  "AUROC of each score (higher score = more likely noise; 0.5 is chance) and precision "
                  "among the highest-scoring pairs at each pruned fraction:\n\n")
        cands = {c: df[c].to_numpy() for c in score_cols}
        cands["target length (baseline)"] = length.astype(float)
        table, noise_stats = [], {}
        for c, v in cands.items():
            a = auroc(v, y)
            precs = [precision_at(v, y, f) for f in fractions]
            table.append([c, a, *precs])
            noise_stats[c] = {"auroc": a, "precision": dict(zip(map(str, fractions), precs, strict=True))}
        table.append(["random (expected)", 0.5, *[float(y.mean())] * len(fractions)])
        md.append(_md_table(["score", "AUROC"] + [f"precision@{f:g}" for f in fractions], table))
        stats["noise"] = noise_stats
    atomic_write_text(layout.report_file("results.md"), "".join(md))
    _plot_bleu(rows, layout.report_file("bleu_vs_sparsity.png"))
    _plot_hist(df, layout.report_file("el2n_hist.png"))
    atomic_write_text(layout.report_file("examples.md"), _examples(cfg, layout, df))
    names = ("results.csv", "results.md", "bleu_vs_sparsity.png", "el2n_hist.png", "examples.md")
    log.info("report: wrote %s", ", ".join(str(out / n) for n in names))
    return StageResult([layout.report_file(n) for n in names], stats)
