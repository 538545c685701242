"""The report's plots: BLEU against the fraction pruned, and the EL2N histogram with the labelled noise and the
prune cut-offs (``curves.py`` draws the training curves)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import atomic_write_bytes
from .results import result_columns, summarize


def bleu_figure(rows: list[dict[str, Any]], averaged: list[str]) -> Any:
    """BLEU against the fraction pruned, one panel per test set (extra ones too) and one for ``all``, the mean
    over the ``averaged`` test sets (left out when that is a single one: it would repeat its panel). Each
    strategy: the mean over seeds with ± std error bars, starting at ``full`` at 0; ``full`` also as a dashed
    line with a grey ± std band, both named in the legend below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pairs = [p for p in result_columns(rows) if p != "all" or len(averaged) > 1]
    strategies = sorted({r["strategy"] for r in rows if r["strategy"] != "full"})
    stats = summarize(rows, "bleu")
    n_seeds = max((n for *_, n in stats.values()), default=1)
    spread = f"± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    cols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    colors = {st: plt.get_cmap("tab10")(i % 10) for i, st in enumerate(strategies)}
    band = False
    for ax, pair in zip(axes.flat, pairs, strict=False):
        full = stats.get(("full", 0.0, pair))
        for st in strategies:
            pts = sorted((sp, *stats[(s, sp, p)][:2]) for (s, sp, p) in stats if s == st and p == pair)
            if full:
                pts = [(0.0, full[0], full[1])] + [q for q in pts if q[0] > 0]
            bars = ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[q[2] for q in pts], marker="o",
                               capsize=3, color=colors[st], label=st)
            bars.lines[0].set_gid(f"{pair}:{st}")
        if full:
            ax.axhline(full[0], color="grey", lw=0.8, ls="--", gid=f"{pair}:full")
            if full[1] > 0:
                ax.axhspan(full[0] - full[1], full[0] + full[1], color="grey", alpha=0.15, lw=0,
                           gid=f"{pair}:full-band")
                band = True
        ax.set_title(f"mean over the {len(averaged)} OPUS test sets" if pair == "all" else pair)
        ax.set_xlabel("fraction of training pairs pruned")
        ax.set_ylabel(f"BLEU (mean {spread})" if n_seeds > 1 else "BLEU")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[st], marker="o", label=f"{st} (error bars: {spread})" if n_seeds > 1
                      else st) for st in strategies]
    if any(st == "full" for st, _, _ in stats):
        handles.append(Line2D([], [], color="grey", lw=0.8, ls="--", label="full (unpruned; each line's point at 0)"))
    if band:
        handles.append(Patch(color="grey", alpha=0.15, label=f"full {spread}"))
    ncol = min(len(handles), cols)
    legend_h = 0.2 + 0.22 * math.ceil(len(handles) / ncol)  # inches below the panels
    fig.set_figheight(3.3 * nrows + legend_h)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_h / (3.3 * nrows + legend_h), 1, 1))
    return fig


def plot_bleu(rows: list[dict[str, Any]], averaged: list[str], path: Path) -> None:
    save_fig(bleu_figure(rows, averaged), path)


def save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


CUT_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))  # el2n_hist: one per sparsity


def hist_figure(df: Any, labels: tuple[dict[str, str], str] | None,
                 cuts: list[tuple[str, float, str | None, float]]) -> Any:
    """el2n_hist.png: EL2N per language pair (density; left out for a single pair with labels), and when noise
    labels are known all pairs in counts, the clean ones and each labelled kind of noise (stacked) apart; the
    prune cut-offs on every panel (per-pair cut-offs on the per-pair panel, in each pair's colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kind = None
    if labels is not None:
        kind = df["sentence_id"].map(labels[0]).astype(object).fillna("").to_numpy()
        if not (kind != "").any():
            kind = None
    per_pair = kind is None or df["pair"].nunique() > 1
    n_axes = int(per_pair) + int(kind is not None)
    fig, axes = plt.subplots(n_axes, 1, figsize=(7.5, 4.2 if n_axes == 1 else 7.2), squeeze=False, sharex=True)
    axes = list(axes[:, 0])
    el2n = df["el2n"].to_numpy(dtype=float)
    bins = np.linspace(float(el2n.min()), float(el2n.max()) + 1e-9, 50)
    pair_color: dict[str, Any] = {}
    if per_pair:
        ax = axes[0]
        for pair, g in df.groupby("pair"):
            _, _, patches = ax.hist(g["el2n"], bins=bins, histtype="step", label=f"{pair} ({len(g)})", density=True)
            pair_color[pair] = patches[0].get_edgecolor()
        ax.set_ylabel("density (per language pair)")
        ax.set_title("EL2N of every scored training pair", fontsize=9)
    if kind is not None:
        ax = axes[-1]
        clean = kind == ""
        kinds = sorted(set(kind[~clean]))
        ax.hist(el2n[clean], bins=bins, histtype="stepfilled", color="lightgrey", label=f"clean ({int(clean.sum())})",
                gid="clean")
        _, _, stacked = ax.hist([el2n[kind == k] for k in kinds], bins=bins, histtype="stepfilled", stacked=True,
                                alpha=0.8, color=[plt.get_cmap("Dark2")(i % 8) for i in range(len(kinds))],
                                label=[f"{k} ({int((kind == k).sum())})" for k in kinds])
        for k, patches in zip(kinds, stacked if len(kinds) > 1 else [stacked], strict=True):
            for patch in patches:
                patch.set_gid(f"noise:{k}")
        ax.set_ylabel("training pairs")
        pairs = "all pairs" if per_pair else f"{df['pair'].iloc[0]} ({len(df)})"
        ax.set_title(f"{pairs}: clean and labelled noise (from {labels[1]}; kinds stacked)", fontsize=9)
    sparsities = sorted({sp for _, sp, _, _ in cuts})
    cut_handles = {}
    for st, sp, pair, cut in cuts:
        ls = CUT_STYLES[sparsities.index(sp) % len(CUT_STYLES)]
        base = "black" if st == "el2n-high" else "darkred"
        one_per_pair = pair is not None and len(pair_color) > 1  # per-pair scope: on the per-pair panel, pair colours
        for a in axes[:1] if one_per_pair else axes:
            a.axvline(cut, color=pair_color[pair] if one_per_pair else base, ls=ls, lw=1.2,
                      gid=f"cut:{st}:{sp:g}:{pair or 'all'}")
        label = (f"{st} {sp:g}: cut-off per pair (prune.scope per-pair), in the pair's colour" if one_per_pair
                 else f"{st} {sp:g}: drops EL2N {'≥' if st == 'el2n-high' else '≤'} {cut:.3f}")
        cut_handles.setdefault((st, sp), Line2D([], [], color="grey" if one_per_pair else base, ls=ls, label=label))
    for a in axes:
        a.legend(handles=a.get_legend_handles_labels()[0] + (list(cut_handles.values()) if a is axes[0] else []),
                 fontsize=7)
    axes[-1].set_xlabel("EL2N (mean over target tokens, checkpoints and seeds)")
    fig.tight_layout()
    return fig


def plot_hist(df: Any, labels: tuple[dict[str, str], str] | None,
               cuts: list[tuple[str, float, str | None, float]], path: Path) -> None:
    save_fig(hist_figure(df, labels, cuts), path)
