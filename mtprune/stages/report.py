"""Stage 8: the sweep's table and plots, score stability, and how well scores find known noise.

Why one long module: every section of results.md reads the same frames (the results rows, the score table,
the noise labels) in one pass; the noise table is also what the score stage writes (labelled_noise_table)."""

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
from ..curves import plot_curves
from ..errors import InputError
from ..layout import RunLayout, run_name
from ..manifest import atomic_write_bytes, atomic_write_text
from ..pipeline import Manifest, StageResult
from ..scoring.forward import checkpoints
from ..scoring.stats import spearman
from ..textio import read_lines
from .proxy import unit_names
from .train import seed_models

SECTIONS = ("report",)
UPSTREAM = ("download", "score", "evaluate")
log = logging.getLogger("mtprune")
CSV_COLUMNS = ("strategy", "sparsity", "seed", "pair", "bleu", "chrf", "n_train")


def external_inputs(cfg: Config) -> list[str]:
    """Files read from outside the run directory (fingerprinted in the manifest by ``pipeline``)."""
    return [] if cfg.report.noise_ids is None else [cfg.report.noise_ids]


def results_rows(cfg: Config, layout: RunLayout) -> list[dict[str, Any]]:
    """One row per model seed and test set, and one ``pair = all`` row per model seed (mean over the OPUS
    pairs; extra test sets have rows of their own but are not in ``all``)."""
    rows = []
    for model in seed_models(cfg, layout):
        m = json.loads(layout.metrics(model.run).read_text())
        per = m["results"]
        opus = {k: v for k, v in per.items() if ":" not in k or v["pair"] in cfg.download.pairs}
        head = {"strategy": m["strategy"], "sparsity": m["sparsity"], "seed": model.seed}
        for key, r in per.items():
            rows.append({**head, "pair": key, "bleu": r["bleu"], "chrf": r["chrf"],
                         "n_train": m["n_train_per_pair"].get(r["pair"], "")})
        if opus:
            rows.append({**head, "pair": "all",
                         "bleu": round(float(np.mean([r["bleu"] for r in opus.values()])), 2),
                         "chrf": round(float(np.mean([r["chrf"] for r in opus.values()])), 2),
                         "n_train": m["n_train"]})
    return rows


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


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def result_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns and the plot's panels: every test set (OPUS pairs, then extra sets), then ``all``."""
    return [p for p in dict.fromkeys(r["pair"] for r in rows) if p != "all"] + ["all"]


def _summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    pairs = result_columns(rows)
    stats = summarize(rows, metric)
    n_train = {(r["strategy"], r["sparsity"]): r["n_train"] for r in rows if r["pair"] == "all"}
    body = []
    for st, sp in dict.fromkeys((r["strategy"], r["sparsity"]) for r in rows):
        body.append([st, sp, n_train.get((st, sp), "")] +
                    [_pm(*stats[(st, sp, p)]) if (st, sp, p) in stats else "" for p in pairs])
    return _md_table(["strategy", "sparsity", "n_train", *pairs], body)


def budget_text(cfg: Config, layout: RunLayout) -> str:
    """What was held equal across the retrained models (train.budget), with each corpus's updates."""
    t = cfg.train
    if t.budget == "updates":
        return (f"Training budget: **updates** — every model trained {t.max_update} updates (equal compute; "
                "a pruned corpus is passed over more often).\n")
    m = Manifest.read(layout.manifest("train"))
    updates = (m.stats.get("max_update", {}) if m else {}) or {}
    per = {}
    for model in seed_models(cfg, layout):
        if updates.get(model.run) is not None:
            per.setdefault(model.name, updates[model.run])
    listed = ", ".join(f"{n} {u}" for n, u in per.items())
    return (f"Training budget: **epochs** — every model trained {t.max_epoch} passes over its own corpus "
            f"(updates: {listed}).\n")


def significance(cfg: Config, layout: RunLayout) -> tuple[str, dict[str, Any]]:
    """results.md's section of paired tests (each pruned model against random at its sparsity and
    against full), and its stats; see mtprune/significance.py for what exactly is tested."""
    from ..significance import paired_test
    from .evaluate import hyp_path, opus_test_sets

    test = cfg.report.paired_test
    if test == "none":
        return "", {}
    sets = opus_test_sets(cfg, layout)
    seeds = list(cfg.train.seeds)
    refs = [r for _ in seeds for ts in sets for r in ts["ref"]]
    langs = [ts["tgt_lang"] for _ in seeds for ts in sets for _r in ts["ref"]]
    pooled: dict[str, list[str]] = {}
    corpus: dict[str, tuple[str, float]] = {}
    for m in seed_models(cfg, layout):
        hyps = [h for ts in sets for h in read_lines(hyp_path(layout, m.run, ts["name"]))]
        pooled.setdefault(m.name, []).extend(hyps)
        corpus[m.name] = (m.strategy, m.sparsity)
    samples = cfg.report.paired_samples
    vs: dict[str, dict[str, Any]] = {"random": {}, "full": {}}
    signature = ""
    for sp in sorted({sp for st, sp in corpus.values() if st == "random"}):
        base = run_name("random", sp)
        others = [(n, pooled[n]) for n, (st, s) in corpus.items() if s == sp and st not in ("random", "full")]
        found, sig = paired_test((base, pooled[base]), others, refs, test, samples, langs)
        vs["random"].update({c.system: c for c in found})
        signature = sig or signature
    if "full" in corpus:
        others = [(n, h) for n, h in pooled.items() if n != "full"]
        found, sig = paired_test(("full", pooled["full"]), others, refs, test, samples, langs)
        vs["full"].update({c.system: c for c in found})
        signature = sig or signature
    if not vs["random"] and not vs["full"]:
        return "", {}
    what = "paired bootstrap resampling" if test == "bs" else "approximate randomization"
    seeds_text = (f"the hypotheses of seeds {', '.join(map(str, seeds))} concatenated as well (seed k beside seed k), "
                  "so each p-value tests the seed-pooled systems against resampling of the test sentences; the "
                  "spread between seeds (± above) is not part of it" if len(seeds) > 1 else "one seed")
    md = [f"\n## Paired significance (sacrebleu {what})\n\nBLEU on the concatenated test sets "
          f"({', '.join(ts['name'] for ts in sets)}: {len(refs) // len(seeds)} sentences), {seeds_text}. "
          f"p: two-sided p-value of the difference from `random` at the same sparsity and from `full`. "
          f"Signature: `{signature}`.\n\n"]
    body = []
    for name, (st, sp) in corpus.items():
        if st == "full":
            continue
        r, f = vs["random"].get(name), vs["full"].get(name)
        bleu = (r or f).bleu if (r or f) else float("nan")
        body.append([st, sp, bleu,
                     f"{r.bleu - r.baseline_bleu:+.2f}" if r else "–", f"{r.p_value:.4f}" if r else "–",
                     f"{f.bleu - f.baseline_bleu:+.2f}" if f else "–", f"{f.p_value:.4f}" if f else "–"])
    md.append(_md_table(["strategy", "sparsity", "BLEU (pooled)", "Δ vs random", "p vs random", "Δ vs full",
                         "p vs full"], body))
    stats = {"test": test, "signature": signature, "seeds": seeds,
             "p_vs_random": {n: c.p_value for n, c in vs["random"].items()},
             "p_vs_full": {n: c.p_value for n, c in vs["full"].items()}}
    return "".join(md), stats


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


def check(cfg: Config, layout: RunLayout) -> None:
    """A labels file that is not there, from the config alone: also before a sweep's first stage."""
    if cfg.report.noise_ids is not None:
        path = Path(cfg.report.noise_ids)
        if not path.is_file():
            what = "a directory, not a file" if path.is_dir() else "file not found"
            raise InputError(f"report.noise_ids: {path}: {what}")


def noise_labels(cfg: Config, layout: RunLayout) -> tuple[dict[str, str], str] | None:
    """Sentence id -> kind of noise, and where the labels came from; None when none are known."""
    if cfg.report.noise_ids is not None:
        check(cfg, layout)
        path = Path(cfg.report.noise_ids)
        source = str(path)
    elif layout.noise_ids.is_file():
        path, source = layout.noise_ids, "01_download/noise.ids"
    else:
        return None
    return read_noise_ids(path), source


def read_noise_ids(path: Path) -> dict[str, str]:
    """``<sentence id>[TAB <kind>]`` lines: sentence id -> kind of noise."""
    labels = {}
    for ln in read_lines(path):
        if ln.strip():
            sid, _, kind = ln.partition("\t")
            labels[sid.strip()] = kind.strip() or UNKNOWN_KIND
    return labels


def score_columns(df: Any) -> list[str]:
    """Every per-pair score of scores.parquet: numeric, not an id or count, not a per-checkpoint column."""
    import pandas as pd

    return [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
            and "@" not in c and c != "index" and not c.startswith("n_")]


# score columns whose bad side is low: the report ranks them negated, named "-<column>"
LOW_IS_BAD = ("tracin",)


def oriented_scores(df: Any) -> dict[str, np.ndarray]:
    """Every score column with higher = more suspicious (``tracin`` as ``-tracin``)."""
    out = {}
    for c in score_columns(df):
        v = df[c].to_numpy(dtype=float)
        out[f"-{c}" if c in LOW_IS_BAD else c] = -v if c in LOW_IS_BAD else v
    return out


def _between_seeds(df: Any, column: str) -> float:
    """Mean Spearman between the seeds' per-seed scores (each the mean over that seed's checkpoints)."""
    import re

    per_seed: dict[str, list[str]] = {}
    for c in df.columns:
        m = re.fullmatch(re.escape(column) + r"@s(\d+)u\d+", c)
        if m:
            per_seed.setdefault(m.group(1), []).append(c)
    seeds = sorted(per_seed)
    if len(seeds) < 2:
        return float("nan")
    means = {s: df[per_seed[s]].mean(axis=1).to_numpy() for s in seeds}
    return float(np.mean([spearman(means[a], means[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]))


IN_PASS = ("el2n", "el2n_std", "el2n_max", "el2n_eos", "nll", "grand", "tracin", "proto")


def _score_seconds(stats: dict[str, Any], column: str) -> str:
    """How long a column took, from the score manifest: the pass is shared by every in-pass score."""
    derived = stats.get("derived_seconds", {})
    if column in derived:
        return f"{derived[column]:.1f}"
    if column in IN_PASS and "seconds" in stats:
        extra = {"tracin": stats.get("dev_gradient_seconds"), "proto": stats.get("proto_seconds")}.get(column)
        return f"{stats['seconds']:.0f} (shared pass)" + (f" + {extra:.1f}" if extra else "")
    return ""


def scores_section(df: Any, score_stats: dict[str, Any]) -> str:
    """Every score column: Spearman with target length, rank agreement between seeds, seconds, spread."""
    length = df["n_tokens"].to_numpy()
    rows = []
    for name, v in oriented_scores(df).items():
        col = name.lstrip("-")
        ok = v[~np.isnan(v)]
        if not len(ok):
            continue
        rows.append([name, spearman(v, length), _between_seeds(df, col), _score_seconds(score_stats, col),
                     float(ok.mean()), *[float(np.percentile(ok, q)) for q in (5, 50, 95)]])
    return ("\n## Every score\n\nHigher = more suspicious (`-tracin`: TracIn negated). Spearman with the target "
            "length in tokens; Spearman between the seeds' scores (each seed's mean over its checkpoints, "
            "averaged over pairs of seeds); seconds from `04_score/manifest.json` (the in-pass scores share "
            "one pass over the corpus).\n\n"
            + _md_table(["score", "spearman vs length", "between seeds", "seconds", "mean", "p5", "p50", "p95"], rows))


def _expected_hits(v: np.ndarray, pos: np.ndarray, ranked: np.ndarray, n_top: int) -> float:
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

    from .prune import n_dropped

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
                hits = sum(_expected_hits(v[g], pos[g], r, t) for g, r, t in zip(groups, ranked, tops, strict=True))
                row[f"precision@{s:g}"] = hits / n_top if n_top else float("nan")
                row[f"recall@{s:g}"] = hits / pos.sum() if pos.any() else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def _noise_stats(table: Any, sparsities: list[float]) -> dict[str, Any]:
    def num(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    out: dict[str, Any] = {}
    for r in table.to_dict("records"):
        entry = out.setdefault(r["score"], {"auroc_by_kind": {}})
        if r["kind"] == "all":
            entry["auroc"] = num(r["auroc"])
            entry["precision"] = {f"{s:g}": num(r[f"precision@{s:g}"]) for s in sparsities}
        else:
            entry["auroc_by_kind"][r["kind"]] = num(r["auroc"])
    return out


def _noise_section(table: Any, sparsities: list[float], n_noisy: int, n_all: int, source: str) -> str:
    kinds = list(dict.fromkeys(table["kind"]))
    scores = list(dict.fromkeys(table["score"]))
    at = table.set_index(["score", "kind"])
    md = [f"\n## Finding known noise ({n_noisy} of {n_all} pairs labelled, from {source})\n\n"
          "AUROC of each score column (higher score = more likely noise; `-length`: shorter target first; "
          "0.5 is chance), for all labelled pairs and for each kind of noise against the clean pairs:\n\n"]
    md.append(_md_table(["score"] + kinds, [[c] + [at.loc[(c, k), "auroc"] for k in kinds] for c in scores]))
    md.append("\nPrecision among the highest-scoring pairs at each pruned fraction (per kind, with recall, "
              "in `noise.csv`):\n\n")
    rows = [[c] + [at.loc[(c, "all"), f"precision@{s:g}"] for s in sparsities] for c in scores]
    rows.append(["random (expected)"] + [n_noisy / n_all if n_all else float("nan")] * len(sparsities))
    md.append(_md_table(["score"] + [f"precision@{s:g}" for s in sparsities], rows))
    return "".join(md)


def labelled_noise_table(df: Any, labels: dict[str, str], source: str) -> tuple[str, Any, dict[str, Any]]:
    """What ``mtprune score`` writes when the download labelled its noise: every score column ranked by
    AUROC, one column per kind, the precision among the highest-scoring pairs at the labelled fraction
    (global ranking; the report gives precision at each prune sparsity), the worst kind and the
    Spearman with the target length. Depends on nothing but the scores and the labels, so that it
    stays true whatever the prune settings. Returns markdown, the long table and a summary."""
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
        rows.append([name, float(at.loc[(name, "all"), "auroc"]), *by_kind,
                     float(at.loc[(name, "all"), "precision@labelled"]),
                     min(by_kind) if by_kind else float("nan"), spearman(cands[name], length)])
    rows.sort(key=lambda r: -1.0 if math.isnan(r[1]) else -r[1])
    md = (f"# Finding the labelled noise\n\n{n_noisy} of {n_all} pairs labelled ({source}). AUROC of each score "
          "(higher = more suspicious; `-length`: shorter target first; 0.5 is chance), for all labelled pairs "
          "and for each kind against the clean pairs; the share of noise among the "
          f"{rate:.1%} highest-scoring pairs (random: {rate:.2f}); the worst kind; Spearman with the target "
          "length. Per kind precision and recall in `noise.csv`.\n\n"
          + _md_table(["score", "all", *kinds, "precision@labelled", "worst kind", "spearman vs length"], rows))
    summary = {"labelled": n_noisy, "auroc": {r[0]: None if math.isnan(r[1]) else round(r[1], 4) for r in rows}}
    return md, table, summary


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.2f}"
    return str(x)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _bleu_figure(rows: list[dict[str, Any]], averaged: list[str]) -> Any:
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


def _plot_bleu(rows: list[dict[str, Any]], averaged: list[str], path: Path) -> None:
    _save_fig(_bleu_figure(rows, averaged), path)


def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


CUT_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))  # el2n_hist: one per sparsity


def el2n_cuts(df: Any, strategies: list[str], sparsities: list[float], scope: str,
              seed: int) -> list[tuple[str, float, str | None, float]]:
    """(strategy, sparsity, pair or None for global scope, cut) of each ``el2n-high`` / ``el2n-low`` corpus, as
    the prune stage selects it: the lowest EL2N dropped by el2n-high (the highest by el2n-low), per pair with
    ``prune.scope: per-pair``."""
    from .prune import drop_mask

    out = []
    values = df["el2n"].to_numpy(dtype=float)
    pairs = df["pair"].to_numpy()
    for st in (s for s in strategies if s in ("el2n-high", "el2n-low")):
        for sp in (s for s in sparsities if s > 0):
            dropped = drop_mask(df, st, sp, scope, seed)
            for pair in [None] if scope == "global" else sorted(set(pairs)):
                v = values[dropped if pair is None else dropped & (pairs == pair)]
                if len(v):
                    out.append((st, sp, pair, float(v.min() if st == "el2n-high" else v.max())))
    return out


def _hist_figure(df: Any, labels: tuple[dict[str, str], str] | None,
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


def _plot_hist(df: Any, labels: tuple[dict[str, str], str] | None,
               cuts: list[tuple[str, float, str | None, float]], path: Path) -> None:
    _save_fig(_hist_figure(df, labels, cuts), path)


def _examples(cfg: Config, layout: RunLayout, df: Any, labels: tuple[dict[str, str], str] | None = None) -> str:
    """examples.md: the highest- and lowest-EL2N training pairs of each language pair; with noise labels, a
    ``noise`` column gives each pair's labelled kind (empty: not labelled)."""
    from ..sources import langs

    out = ["# Highest- and lowest-EL2N training pairs\n"]
    if labels is not None:
        out.append(f"\n`noise`: the kind of noise the pair is labelled with in {labels[1]} (empty: not labelled).\n")
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
                row = [r.sentence_id, f"{r.el2n:.3f}", a[k].replace("|", "\\|"), b[k].replace("|", "\\|")]
                rows.append(row + ([labels[0].get(r.sentence_id, "")] if labels is not None else []))
            out.append(_md_table(["sentence id", "EL2N", l1, l2] + (["noise"] if labels is not None else []), rows))
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
    seeds = list(cfg.train.seeds)
    over = f" (mean ± std over seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else f" (seed {seeds[0]})"
    md = ["# mtprune sweep results\n", f"\nRun directory: `{layout.root}`\n\n", budget_text(cfg, layout),
          f"\n## BLEU on the test sets{over}\n\n`all`: the mean over the OPUS pairs; one row per seed in "
          "`results.csv`.\n\n", _summary_table(rows, "bleu"), f"\n## chrF on the test sets{over}\n\n",
          _summary_table(rows, "chrf")]
    sig_md, sig_stats = significance(cfg, layout)
    md.append(sig_md)

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
    score_manifest = Manifest.read(layout.manifest("score"))
    md.append(scores_section(df, score_manifest.stats if score_manifest else {}))
    stats: dict[str, Any] = {"rows": len(rows), "budget": cfg.train.budget}
    if sig_stats:
        stats["significance"] = sig_stats

    names = ["results.csv", "results.md", "bleu_vs_sparsity.png", "el2n_hist.png", "examples.md"]
    labels = noise_labels(cfg, layout)
    if labels is not None:
        known, source = labels
        fractions = [s for s in cfg.prune.sparsities if s > 0]
        table = noise_finding(df, known, fractions, cfg.prune.scope)
        n_noisy = int(df["sentence_id"].isin(known.keys()).sum())
        stats["noise_pairs"] = n_noisy
        md.append(_noise_section(table, fractions, n_noisy, len(df), source))
        atomic_write_text(layout.report_file("noise.csv"), table.to_csv(index=False, lineterminator="\n"))
        names.append("noise.csv")
        stats["noise"] = _noise_stats(table, fractions)
    atomic_write_text(layout.report_file("results.md"), "".join(md))
    averaged = [c for c in result_columns(rows) if c != "all" and c.split(":")[0] in cfg.download.pairs]
    _plot_bleu(rows, averaged, layout.report_file("bleu_vs_sparsity.png"))  # the OPUS sets, as in results_rows' all
    cuts = el2n_cuts(df, list(cfg.prune.strategies), list(cfg.prune.sparsities), cfg.prune.scope, cfg.prune.seed)
    _plot_hist(df, labels, cuts, layout.report_file("el2n_hist.png"))
    units = {"proxy": set(unit_names(cfg)), "train": {layout.train_dir(m.run).name for m in seed_models(cfg, layout)}}
    names.append(plot_curves(layout, units))  # training_curves.png: proxy and final training loss (mtprune/curves.py)
    atomic_write_text(layout.report_file("examples.md"), _examples(cfg, layout, df, labels))
    log.info("report: wrote %s", ", ".join(str(out / n) for n in names))
    return StageResult([layout.report_file(n) for n in names], stats)
