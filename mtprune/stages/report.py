"""Stage 8: the sweep's table and plots, score stability, how well scores find known noise, and report.html.

The noise table and its measures are in ``scoring/finding.py``, the plots in ``plots.py`` and ``curves.py``."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..curves import plot_curves
from ..errors import InputError
from ..layout import RunLayout
from ..manifest import atomic_write_text
from ..pipeline import Manifest, StageResult
from ..plots import plot_bleu, plot_hist
from ..results import pm, result_columns, summarize
from ..scoring.finding import (
    labelled_only,
    md_table,
    noise_finding,
    oriented_scores,
    read_noise_ids,
)
from ..scoring.forward import checkpoints
from ..scoring.stats import spearman
from ..textio import text_lines
from .proxy import unit_names
from .report_compare import dropped_section, significance
from .report_html import write_page
from .report_stability import drop_set_stability
from .train import seed_models

SECTIONS = ("report",)
UPSTREAM = ("download", "score", "evaluate")
log = logging.getLogger("mtprune")
# strategy: the corpus's strategy, with "+<order>" for a model trained in another order than shuffled (train.order)
CSV_COLUMNS = ("strategy", "sparsity", "seed", "pair", "bleu", "chrf", "n_train", "order")


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
        head = {"strategy": m["strategy"], "sparsity": m["sparsity"], "seed": model.seed,
                "order": m.get("order", "shuffled")}
        for key, r in per.items():
            rows.append({**head, "pair": key, "bleu": r["bleu"], "chrf": r["chrf"],
                         "n_train": m["n_train_per_pair"].get(r["pair"], "")})
        if opus:
            rows.append({**head, "pair": "all",
                         "bleu": round(float(np.mean([r["bleu"] for r in opus.values()])), 2),
                         "chrf": round(float(np.mean([r["chrf"] for r in opus.values()])), 2),
                         "n_train": m["n_train"]})
    return rows


def _summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    pairs = result_columns(rows)
    stats = summarize(rows, metric)
    n_train = {(r["strategy"], r["sparsity"]): r["n_train"] for r in rows if r["pair"] == "all"}
    body = []
    for st, sp in dict.fromkeys((r["strategy"], r["sparsity"]) for r in rows):
        body.append([st, sp, n_train.get((st, sp), "")] +
                    [pm(*stats[(st, sp, p)]) if (st, sp, p) in stats else "" for p in pairs])
    return md_table(["strategy", "sparsity", "n_train", *pairs], body)


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


def preflight(cfg: Config, layout: RunLayout) -> None:
    check(cfg, layout)


def check(cfg: Config, layout: RunLayout) -> None:
    """A labels file that is not there or that holds no label, from the config alone: also before a sweep's first
    stage."""
    if cfg.report.noise_ids is not None:
        _check_labels_file(Path(cfg.report.noise_ids), warn=False, key=_label_key(cfg))


# a line of a labels file: a sentence id (`<pair>/<n>`, no spaces; in a one-pair run also the bare line number
# `<n>`), then a TAB and the kind (`OK`: a clean pair), or nothing
_SENTENCE_ID = re.compile(r"[^\s/]+/\d+")
_LABEL_LINE = "`<sentence id>` TAB `<kind>` or a bare `<sentence id>`"


def _label_key(cfg: Config) -> Any:
    """The sentence id a labels file's first field names: itself, or in a one-pair run a bare 0-based line number
    of that pair's training text (``<n>`` -> ``<pair>/<n>``); None for a field that is neither."""
    single = cfg.download.pairs[0] if len(cfg.download.pairs) == 1 else None

    def key(field: str) -> str | None:
        if _SENTENCE_ID.fullmatch(field):
            return field
        if single is not None and field.isdigit():
            return f"{single}/{int(field)}"
        return None

    return key


def _check_labels_file(path: Path, warn: bool, key: Any = None) -> None:
    """Refuse a labels file none of whose lines is a label (a space where the TAB belongs makes the whole line an
    id that matches no pair, and the report said 0 pairs labelled); with ``warn``, count the lines that are not."""
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "file not found"
        raise InputError(f"report.noise_ids: {path}: {what}")
    good, bad, first = 0, 0, (0, "")
    try:
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            field = line.partition("\t")[0].strip()  # as read_noise_ids splits it
            if (key(field) if key is not None else _SENTENCE_ID.fullmatch(field)) is not None:
                good += 1
            else:
                bad += 1
                first = first if first[0] else (n, line[:80])
    except UnicodeDecodeError:
        raise InputError(f"report.noise_ids: {path}: not UTF-8 text") from None
    if bad and not good:
        raise InputError(f"report.noise_ids: {path}: no line is {_LABEL_LINE} (e.g. 'de-en/17\\tmisaligned'); "
                         f"line {first[0]} is {first[1]!r}")
    if bad and warn:
        log.warning("report.noise_ids: %s: %d of %d line(s) are not %s, ignored; the first is line %d: %r", path, bad,
                    good + bad, _LABEL_LINE, first[0], first[1])


def noise_labels(cfg: Config, layout: RunLayout) -> tuple[dict[str, str], str] | None:
    """Sentence id -> kind of noise, and where the labels came from; None when none are known."""
    if cfg.report.noise_ids is not None:
        path = Path(cfg.report.noise_ids)
        _check_labels_file(path, warn=True, key=_label_key(cfg))
        # the lines the warning said are ignored are: their first field names no sentence
        return read_noise_ids(path, _label_key(cfg)), str(path)
    if layout.noise_ids.is_file():
        return read_noise_ids(layout.noise_ids), "01_download/noise.ids"
    return None


class CheckpointColumns:
    """The per-checkpoint columns of scores.parquet (``<score>@s<seed>u<update>``), read one at a time when
    asked for: the report keeps the per-pair columns in memory, not one more column per score and checkpoint
    (at 4M pairs, 3 seeds and 2 checkpoints, some 150 columns of 32 MB)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = path, names

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> np.ndarray:
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=[name]).column(0).to_numpy()


def _between_seeds(columns: CheckpointColumns, column: str) -> float:
    """Mean Spearman between the seeds' per-seed scores (each the mean over that seed's checkpoints, missing
    values skipped)."""
    import re

    per_seed: dict[str, list[str]] = {}
    for c in columns.names:
        m = re.fullmatch(re.escape(column) + r"@s(\d+)u\d+", c)
        if m:
            per_seed.setdefault(m.group(1), []).append(c)
    seeds = sorted(per_seed)
    if len(seeds) < 2:
        return float("nan")
    means = {}
    for s in seeds:  # the checkpoints' columns summed one at a time, as a row mean over them would
        total, count = None, None
        for c in per_seed[s]:
            v = np.asarray(columns[c], dtype=np.float64)
            ok = ~np.isnan(v)
            total = np.where(ok, v, 0.0) if total is None else total + np.where(ok, v, 0.0)
            count = ok.astype(np.int64) if count is None else count + ok
        with np.errstate(invalid="ignore", divide="ignore"):
            means[s] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(np.mean([spearman(means[a], means[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]))


IN_PASS = ("el2n", "el2n_std", "el2n_max", "el2n_eos", "nll", "grand", "tracin", "proto", "forget")


def _score_seconds(stats: dict[str, Any], column: str) -> str:
    """How long a column took, from the score manifest: the pass is shared by every in-pass score."""
    derived = stats.get("derived_seconds", {})
    if column in derived:
        return f"{derived[column]:.1f}"
    if column in IN_PASS and "seconds" in stats:
        extra = {"tracin": stats.get("dev_gradient_seconds"), "proto": stats.get("proto_seconds")}.get(column)
        return f"{stats['seconds']:.0f} (shared pass)" + (f" + {extra:.1f}" if extra else "")
    return ""


def scores_section(df: Any, at: CheckpointColumns, score_stats: dict[str, Any]) -> str:
    """Every score column: Spearman with target length, rank agreement between seeds, seconds, spread."""
    length = df["n_tokens"].to_numpy()
    rows = []
    for name, v in oriented_scores(df).items():
        col = name.lstrip("-")
        ok = v[~np.isnan(v)]
        if not len(ok):
            continue
        rows.append([name, spearman(v, length), _between_seeds(at, col), _score_seconds(score_stats, col),
                     float(ok.mean()), *[float(np.percentile(ok, q)) for q in (5, 50, 95)]])
    return ("\n## Every score\n\nHigher = more suspicious (`-tracin`: TracIn negated). Spearman with the target "
            "length in tokens; Spearman between the seeds' scores (each seed's mean over its checkpoints, "
            "averaged over pairs of seeds); seconds from `04_score/manifest.json` (the in-pass scores share "
            "one pass over the corpus).\n\n"
            + md_table(["score", "spearman vs length", "between seeds", "seconds", "mean", "p5", "p50", "p95"], rows))


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
    md.append(md_table(["score"] + kinds, [[c] + [at.loc[(c, k), "auroc"] for k in kinds] for c in scores]))
    md.append("\nPrecision among the highest-scoring pairs at each pruned fraction (per kind, with recall, "
              "in `noise.csv`):\n\n")
    rows = [[c] + [at.loc[(c, "all"), f"precision@{s:g}"] for s in sparsities] for c in scores]
    rows.append(["random (expected)"] + [n_noisy / n_all if n_all else float("nan")] * len(sparsities))
    md.append(md_table(["score"] + [f"precision@{s:g}" for s in sparsities], rows))
    return "".join(md)


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


def _examples(cfg: Config, layout: RunLayout, df: Any, labels: tuple[dict[str, str], str] | None = None) -> str:
    """examples.md: the highest- and lowest-EL2N training pairs of each language pair; with noise labels, a
    ``noise`` column gives each pair's labelled kind (empty: not labelled)."""
    from ..sources import langs

    out = ["# Highest- and lowest-EL2N training pairs\n"]
    if labels is not None:
        out.append(f"\n`noise`: the kind of noise the pair is labelled with in {labels[1]} (empty: not labelled).\n")
    from ..scoring.rawtext import PairText

    n = cfg.report.n_examples
    for pair, g in df[["pair", "sentence_id", "el2n"]].groupby("pair"):
        l1, l2 = langs(pair)
        g = g.sort_values(["el2n", "sentence_id"], ascending=[False, True])
        text = PairText(layout, pair)  # the download's lines memory-mapped: only the examples' lines are read
        try:
            for title, part in (("highest", g.head(n)), ("lowest", g.tail(n).iloc[::-1])):
                out.append(f"\n## {pair}: {title} EL2N\n")
                rows = []
                for r, k in zip(part.itertuples(), text.lines_of(part["sentence_id"].tolist()), strict=True):
                    a, b = text.sides[l1].line(int(k)), text.sides[l2].line(int(k))
                    row = [r.sentence_id, f"{r.el2n:.3f}", a.replace("|", "\\|"), b.replace("|", "\\|")]
                    rows.append(row + ([labels[0].get(r.sentence_id, "")] if labels is not None else []))
                out.append(md_table(["sentence id", "EL2N", l1, l2] + (["noise"] if labels is not None else []), rows))
        finally:
            text.close()
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

    import pyarrow.parquet as pq

    names = pq.read_schema(layout.scores).names
    df = pd.read_parquet(layout.scores, columns=[c for c in names if "@" not in c])
    at = CheckpointColumns(layout.scores, [c for c in names if "@" in c])
    ckpts = checkpoints(cfg, layout)
    seeds = list(cfg.train.seeds)
    over = f" (mean ± std over seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else f" (seed {seeds[0]})"
    md = ["# mtprune sweep results\n", f"\nRun directory: `{layout.root}`\n\n", budget_text(cfg, layout),
          f"\n## BLEU on the test sets{over}\n\n`all`: the mean over the OPUS pairs; one row per seed in "
          "`results.csv`.\n\n", _summary_table(rows, "bleu"), f"\n## chrF on the test sets{over}\n\n",
          _summary_table(rows, "chrf")]
    sig_md, sig_stats = significance(cfg, layout)
    md.append(sig_md)
    labels = noise_labels(cfg, layout)
    drop_md, drop_stats = dropped_section(cfg, layout, df, labels)
    md.append(drop_md)

    # stability of the scores
    tags = [c.tag for c in ckpts]
    md.append("\n## How stable is EL2N?\n\nSpearman rank correlation of per-pair EL2N between proxy checkpoints "
              "(seed s, update u):\n\n")
    # each checkpoint's column read and ranked once (the ranks spearman would compute for every pair of them)
    ranks = {t: pd.Series(at[f"el2n@{t}"]).rank() for t in tags}
    mat = [[t] + [float(ranks[t].corr(ranks[u])) if len(df) >= 3 else float("nan") for u in tags] for t in tags]
    del ranks
    md.append(md_table(["checkpoint"] + tags, mat))
    md.append("\nSpearman correlation of each score with the target length (tokens):\n\n")
    length = df["n_tokens"].to_numpy()
    lines = []
    for c in ["el2n", "nll"] + [f"el2n@{t}" for t in tags]:
        v = pd.Series(df[c] if c in df else at[c])
        lines.append([c, spearman(v.to_numpy(), length), float(v.mean()),
                      *[float(np.percentile(v, q)) for q in (5, 50, 95)]])
    md.append(md_table(["score", "spearman vs length", "mean", "p5", "p50", "p95"], lines))
    stability_md, stability = drop_set_stability(cfg, df, at, tags)  # report_stability.py
    md.append(stability_md)
    score_manifest = Manifest.read(layout.manifest("score"))
    md.append(scores_section(df, at, score_manifest.stats if score_manifest else {}))
    stats: dict[str, Any] = {"rows": len(rows), "budget": cfg.train.budget}
    if sig_stats:
        stats["significance"] = sig_stats
    stats["dropped"] = drop_stats
    stats["drop_set_stability"] = stability

    names = ["results.csv", "results.md", "bleu_vs_sparsity.png", "el2n_hist.png", "examples.md", "report.html"]
    table = None
    if labels is not None:
        known, source = labels
        fractions = [s for s in cfg.prune.sparsities if s > 0]
        table = noise_finding(df, known, fractions, cfg.prune.scope)
        n_noisy = int(df["sentence_id"].isin(known.keys()).sum())
        stats["noise_pairs"] = n_noisy
        n_judged = len(labelled_only(df, known))  # every pair, or the labelled sample when clean pairs are named
        md.append(_noise_section(table, fractions, n_noisy, n_judged, source))
        atomic_write_text(layout.report_file("noise.csv"), table.to_csv(index=False, lineterminator="\n"))
        names.append("noise.csv")
        stats["noise"] = _noise_stats(table, fractions)
    atomic_write_text(layout.report_file("results.md"), "".join(md))
    averaged = [c for c in result_columns(rows) if c != "all" and c.split(":")[0] in cfg.download.pairs]
    plot_bleu(rows, averaged, layout.report_file("bleu_vs_sparsity.png"))  # the OPUS sets, as in results_rows' all
    cuts = el2n_cuts(df, list(cfg.prune.strategies), list(cfg.prune.sparsities), cfg.prune.scope, cfg.prune.seed)
    plot_hist(df, labels, cuts, layout.report_file("el2n_hist.png"))
    units = {"proxy": set(unit_names(cfg)), "train": {layout.train_dir(m.run).name for m in seed_models(cfg, layout)}}
    names.append(plot_curves(layout, units))  # training_curves.png: proxy and final training loss (mtprune/curves.py)
    atomic_write_text(layout.report_file("examples.md"), _examples(cfg, layout, df, labels))
    write_page(cfg, layout, rows, df, labels, table, layout.report_file("report.html"))  # report_html.py
    log.info("report: wrote %s", ", ".join(str(out / n) for n in names))
    return StageResult([layout.report_file(n) for n in names], stats)
