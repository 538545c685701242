"""Score columns computed after the scoring pass, from the score table and the raw text.

Added to ``04_score/scores.parquet`` by ``add_columns`` (last, after the proxy and dual columns, and
after shards are merged), all with higher = worse:

- ``el2n_debiased`` / ``nll_debiased``: the score minus the median score of pairs with the same target
  length in tokens (``n_tokens``), per checkpoint column (``el2n_debiased@s<seed>u<updates>`` kept),
  then averaged over checkpoints like ``el2n``. EL2N and NLL of a weak proxy mostly measure length;
  this keeps what a pair has beyond its length. Lengths with fewer than ``MIN_BIN`` pairs are merged
  with their longer neighbours until a bin has ``MIN_BIN`` pairs (a short last bin joins the one before),
  so a median is never taken over a handful of pairs.
- ``el2n_worst``: the EL2N aggregations side by side, as percentile ranks, and their maximum: a pair
  is as suspect as the worst of its length-debiased token mean (``el2n_debiased``), its end-of-sentence
  token (``el2n_eos``: a truncated target) and its hardest token (``el2n_max``). Fixed, label-free,
  EL2N only (no NLL), so it answers "what does EL2N alone find"; ``combined`` is the configurable one.
- ``combined``: a label-free rank combination of proxy columns (``score.combine``, ``-name`` for a
  column whose bad side is low, e.g. ``-tracin``): each column's percentile rank (ties averaged), then
  the maximum (``score.combine_how: max``, a pair is as bad as its worst rank) or the mean. Baseline
  columns (``base_*``) never enter it.
- baselines that need no proxy (``score.baselines``), named ``base_*``:
  ``base_len_ratio`` = |log((chars_src + 1) / (chars_tgt + 1))| on the raw text (OpusFilter's length
  ratio); ``base_langid`` = 1 - lingua's confidence that the target is in its expected language, among
  the run's languages and ``EXTRA_LANGS`` (low-accuracy mode: on 10k Tatoeba targets 3.6 s + 1 s to
  load against 12.4 s + 15 s, 95 MB instead of 600 MB, for AUROC 0.9955 against 0.9991 at telling a
  target in another of the run's languages; Latin is left out, which took short English for Latin);
  ``base_copy`` = Jaccard overlap of the lowercased character trigrams of source and target (1 for an
  untranslated copy; it finds copies only: on Tatoeba a misaligned pair overlaps *less* than a
  translation, which shares names, numbers and cognates).

Length bins are global (all directions together), as in the calibration of issue 10.

``add_columns`` also works on a table read back from an existing ``scores.parquet``: derived columns
already there are replaced.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..config import combine_problem
from ..errors import UsageError
from ..textio import read_lines

log = logging.getLogger("mtprune")

MIN_BIN = 50
DEBIASED = ("el2n", "nll")
EL2N_WORST = ("el2n_debiased", "el2n_eos", "el2n_max")
# besides the run's own languages, so that a target in another common language is recognised as such
EXTRA_LANGS = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "nb", "pl", "cs", "ro", "hu", "fi", "tr",
               "ru", "el", "ca", "eo", "zh", "ja", "ar")


def is_derived(column: str) -> bool:
    """Columns ``add_columns`` writes (and replaces when run again)."""
    base = column.split("@", 1)[0]
    return base in {f"{f}_debiased" for f in DEBIASED} | {"combined", "el2n_worst"} or column.startswith("base_")


# ---- length debiasing ---------------------------------------------------------------------------

def length_bins(n_tokens: np.ndarray, min_count: int = MIN_BIN) -> np.ndarray:
    """Bin number per row: equal lengths share a bin; neighbouring lengths are merged, shortest first,
    until a bin holds ``min_count`` rows; a last bin left short joins the one before it."""
    lengths, inverse, counts = np.unique(np.asarray(n_tokens), return_inverse=True, return_counts=True)
    bin_of = np.empty(len(lengths), dtype=np.int64)
    b = filled = 0
    for i, c in enumerate(counts):
        bin_of[i] = b
        filled += c
        if filled >= min_count:
            b, filled = b + 1, 0
    if filled and b > 0:  # the longest lengths did not fill a bin of their own
        bin_of[bin_of == b] = b - 1
    return bin_of[inverse.ravel()]


def debias(values: np.ndarray, n_tokens: np.ndarray, min_count: int = MIN_BIN) -> np.ndarray:
    """``values`` minus the median of ``values`` over the rows of the same length bin."""
    import pandas as pd

    v = pd.Series(np.asarray(values, dtype=np.float64))
    return (v - v.groupby(length_bins(n_tokens, min_count)).transform("median")).to_numpy()


def debiased_columns(df: Any, family: str, min_count: int = MIN_BIN) -> dict[str, np.ndarray]:
    """``<family>_debiased@<ckpt>`` per checkpoint column and their mean ``<family>_debiased``
    (the family's own column alone when the table has no per-checkpoint columns)."""
    per = [c for c in df.columns if c.startswith(f"{family}@")]
    out = {f"{family}_debiased@{c.split('@', 1)[1]}": debias(df[c].to_numpy(), df["n_tokens"].to_numpy(), min_count)
           for c in per}
    if out:
        out[f"{family}_debiased"] = np.mean(list(out.values()), axis=0)
    else:
        out[f"{family}_debiased"] = debias(df[family].to_numpy(), df["n_tokens"].to_numpy(), min_count)
    return out


# ---- combined rank -----------------------------------------------------------------------------

def combined(df: Any, columns: tuple[str, ...] | list[str], how: str = "max") -> np.ndarray:
    """Percentile ranks (ties averaged; ``-name`` ranks the negated column) combined by max or mean."""
    import pandas as pd

    for entry in columns:
        problem = combine_problem(entry)
        if problem:
            raise UsageError(f"score.combine: {problem}")
    known = [c for c in df.columns if c not in ("index", "sentence_id", "pair", "direction")]
    ranks = []
    for entry in columns:
        name = entry.lstrip("-")
        if name not in df.columns:
            raise UsageError(f"score.combine: no score column {name!r} in the score table (it has: "
                             f"{', '.join(known)})")
        v = df[name].to_numpy(dtype=np.float64)
        if np.isnan(v).any():
            raise UsageError(f"score.combine: score column {name!r} has missing values")
        ranks.append(pd.Series(-v if entry.startswith("-") else v).rank(method="average", pct=True).to_numpy())
    if how not in ("max", "mean"):
        raise UsageError(f"score.combine_how: must be max or mean, got {how!r}")
    stacked = np.vstack(ranks)
    return stacked.max(axis=0) if how == "max" else stacked.mean(axis=0)


# ---- baselines on the raw text ------------------------------------------------------------------

def len_ratio(src: list[str], tgt: list[str]) -> np.ndarray:
    """|log((chars_src + 1) / (chars_tgt + 1))|."""
    a = np.array([len(s) for s in src], dtype=np.float64)
    b = np.array([len(t) for t in tgt], dtype=np.float64)
    return np.abs(np.log((a + 1) / (b + 1)))


def _trigrams(text: str) -> set[str]:
    t = " ".join(text.lower().split())
    return {t[i:i + 3] for i in range(max(len(t) - 2, 1))}


def copy_overlap(src: list[str], tgt: list[str]) -> np.ndarray:
    """Jaccard overlap of lowercased character trigrams: 1 for a copy, near 0 for a translation."""
    out = np.empty(len(src), dtype=np.float64)
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        a, b = _trigrams(s), _trigrams(t)
        out[i] = len(a & b) / len(a | b) if a | b else 1.0
    return out


def _lingua_language(code: str) -> Any:
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
    except (ValueError, AttributeError):
        return None


def langid_badness(texts: list[str], expected: list[str], run_langs: tuple[str, ...] | list[str] = ()) -> np.ndarray:
    """1 - lingua's confidence that each text is in its expected language (ISO 639-1 code); NaN where
    lingua does not know the expected language."""
    from lingua import LanguageDetectorBuilder

    known = {c: _lingua_language(c) for c in sorted({*EXTRA_LANGS, *run_langs, *expected})}
    langs = sorted({lang for lang in known.values() if lang is not None}, key=str)
    detector = LanguageDetectorBuilder.from_languages(*langs).with_low_accuracy_mode().build()
    out = np.full(len(texts), np.nan)
    codes = np.array(expected)
    for code in sorted(set(expected)):
        if known[code] is None:
            log.warning("score: base_langid: lingua cannot identify %r; its rows get no base_langid", code)
            continue
        rows = np.flatnonzero(codes == code)
        conf = detector.compute_language_confidence_in_parallel([texts[i] for i in rows], known[code])
        out[rows] = 1.0 - np.asarray(conf, dtype=np.float64)
    # lingua's confidences differ between processes in the last bits (its sums run in a varying order:
    # 3e-15 measured); rounded to 1e-6 a rerun writes the same scores.parquet, bit for bit
    return np.round(out, 6)


def raw_text(df: Any, layout: Any) -> tuple[list[str], list[str], list[str]]:
    """Source text, target text and target language of every row, from ``01_download``."""
    src: list[str] = [""] * len(df)
    tgt: list[str] = [""] * len(df)
    tgt_lang: list[str] = [""] * len(df)
    pairs = df["pair"].to_numpy()
    dirs = df["direction"].to_numpy()
    sids = df["sentence_id"].to_numpy()
    for pair in sorted(set(pairs.tolist())):
        line_of = {sid: i for i, sid in enumerate(read_lines(layout.download_ids(pair)))}
        text = {lang: read_lines(layout.split_file(pair, "train", lang)) for lang in pair.split("-")}
        for r in np.flatnonzero(pairs == pair):
            s, t = dirs[r].split("-")
            try:
                line = line_of[sids[r]]
            except KeyError:
                raise UsageError(f"{layout.download_ids(pair)}: has no sentence {sids[r]!r} of the score table; "
                                 "the download changed since scoring") from None
            src[r], tgt[r], tgt_lang[r] = text[s][line], text[t][line], t
    return src, tgt, tgt_lang


# ---- the table ----------------------------------------------------------------------------------

def add_columns(df: Any, cfg: Any, layout: Any, seconds: dict[str, float] | None = None) -> Any:
    """``df`` with the derived columns (re)computed; ``seconds`` receives how long each took."""
    seconds = {} if seconds is None else seconds
    df = df.drop(columns=[c for c in df.columns if is_derived(c)])
    new: dict[str, Any] = {}
    for family in DEBIASED:
        t0 = time.time()
        if family in df.columns:
            new.update(debiased_columns(df, family))
        seconds[f"{family}_debiased"] = round(time.time() - t0, 3)
    if cfg.score.baselines and len(df):
        t0 = time.time()
        src, tgt, tgt_lang = raw_text(df, layout)
        seconds["base_read_text"] = round(time.time() - t0, 3)
        for name, fn in (("base_len_ratio", len_ratio), ("base_copy", copy_overlap)):
            t0 = time.time()
            new[name] = fn(src, tgt)
            seconds[name] = round(time.time() - t0, 3)
        t0 = time.time()
        run_langs = sorted({lang for p in set(df["pair"]) for lang in p.split("-")})
        new["base_langid"] = langid_badness(tgt, tgt_lang, run_langs)
        seconds["base_langid"] = round(time.time() - t0, 3)
    df = df.assign(**new)
    if all(c in df.columns for c in EL2N_WORST) and len(df):
        t0 = time.time()
        df = df.assign(el2n_worst=combined(df, EL2N_WORST, "max"))
        seconds["el2n_worst"] = round(time.time() - t0, 3)
    if cfg.score.combine:
        t0 = time.time()
        df = df.assign(combined=combined(df, cfg.score.combine, cfg.score.combine_how))
        seconds["combined"] = round(time.time() - t0, 3)
    log.info("score: derived columns in %.1fs (%s)", sum(seconds.values()),
             ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return df


def add_columns_table(table: Any, cfg: Any, layout: Any, seconds: dict[str, float] | None = None) -> Any:
    """``add_columns`` on a pyarrow table (the score stage's)."""
    import pyarrow as pa

    return pa.Table.from_pandas(add_columns(table.to_pandas(), cfg, layout, seconds), preserve_index=False)
