"""``base_fitted``: the filters' columns weighted by a classifier fitted without labels, on synthetic noise.

``base_all`` weights every filter alike (Fisher's sum of their tail probabilities). Natural noise needs other
weights: on ``wmt-ende-10k/labels.tsv`` a classifier fitted on the labels finds more than that sum (cross-validated
AUROC 0.94 against 0.93), most of all on partial translations. Labels are what a user lacks, so the weights are
fitted the way bicleaner fits its classifier, on noise made from the corpus itself. Per translation direction:

1. ``SAMPLE`` rows, evenly spaced, are corrupted, each by one of ``KINDS`` in turn: the target of the next pair of
   the sample (a neighbouring segment), the target of a random pair, one side cut to 30-70 % of its words, one
   side with the next pair's sentence of that side appended, one side copied over the other.
2. Every ``FEATURES`` column is computed on the corrupted pairs, word alignment with the models fitted on the
   corpus (``baselines.training_pairs``).
3. Each value becomes its percentile among the direction's rows (a missing value: 0, no evidence), and a logistic
   regression (class-balanced, ``C``) tells the rows (label 0, noisy as they are) from the corrupted copies (1).
4. ``base_fitted`` combines two tail ranks as ``base_all`` combines its columns (``score.combine_all_how``): the
   regression's log-odds and ``base_all``. The regression alone learns only what the synthetic kinds show (it
   gives wrong-language targets and mismatched numerals little weight: no synthetic kind has them); ``base_all``
   keeps the filters' own evidence for those.

Everything is seeded by the direction's name: the same text gives the same column. The cost does not grow with the
corpus beyond the percentiles and one pass of the regression over the rows (``SAMPLE`` corrupted pairs at most).
Chosen on ``wmt-ende-10k/labels.tsv``; the numbers are in docs/scores.md.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mtprune")

VERSION = 1  # bump when the corruption, the features or the fit change
KINDS = ("neighbour", "random", "truncated", "appended", "copied")
FEATURES = ("base_wordalign_src", "base_wordalign_tgt", "base_langid_src", "base_langid_tgt", "base_similarity",
            "base_lengthratio_char", "base_lengthratio_word", "base_terminalpunct", "base_numerals",
            "base_repetition", "base_opusfilter")
SAMPLE = 20_000  # corrupted pairs per direction at most
FIT_ROWS = 200_000  # the direction's own rows in the fit at most (evenly spaced)
MIN_ROWS = 50  # fewer rows in a direction: no fit, the column is base_all's ranking there
C = 0.1
CUT = (0.3, 0.7)
ROWS_AT_ONCE = 1_000_000  # rows whose features are held at once when the fitted model scores them


def _cut(sentence: str, share: float) -> str:
    """The first ``share`` of a sentence's words (of its characters when it has one word)."""
    ws = sentence.split()
    if len(ws) >= 2:
        return " ".join(ws[:max(1, int(round(len(ws) * share)))])
    return sentence[:max(1, int(len(sentence) * share))]


def corrupt(pairs: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """One corrupted copy of each of ``pairs`` (in order, ``KINDS`` in turn); the same ``pairs`` and ``seed`` give the
    same copies."""
    rng = np.random.default_rng(seed)
    n = len(pairs)
    out = []
    for j, (s, t) in enumerate(pairs):
        kind = KINDS[j % len(KINDS)]
        near = pairs[(j + 1) % n]
        side = int(rng.integers(2))
        if kind == "neighbour":
            out.append((s, near[1]))
        elif kind == "random":
            out.append((s, pairs[int(rng.integers(n))][1]))
        elif kind == "truncated":
            share = float(rng.uniform(*CUT))
            out.append((s, _cut(t, share)) if side else (_cut(s, share), t))
        elif kind == "appended":
            out.append((s, f"{t} {near[1]}") if side else (f"{s} {near[0]}", t))
        else:
            out.append((s, s) if side else (t, t))
    return out


def _sorted(reference: np.ndarray) -> np.ndarray:
    return np.sort(reference[~np.isnan(reference)])


def _percentiles_in(ref: np.ndarray, values: np.ndarray) -> np.ndarray:
    if not len(ref):
        return np.zeros(len(values))
    v = np.nan_to_num(values, nan=-np.inf)
    p = (np.searchsorted(ref, v, "left") + np.searchsorted(ref, v, "right")) / (2.0 * len(ref))
    return np.where(np.isnan(values), 0.0, p)


def percentiles(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each value's mid-percentile among the non-missing ``reference`` values (ties halved); a missing value: 0."""
    return _percentiles_in(_sorted(reference), values)


def _features(ref: dict[str, np.ndarray], columns: dict[str, np.ndarray], rows: np.ndarray | slice) -> np.ndarray:
    """``FEATURES`` of ``rows`` of ``columns`` as percentiles among ``ref`` (each column's sorted reference values)."""
    return np.column_stack([_percentiles_in(ref[c], columns[c][rows]) for c in FEATURES])


def direction_seed(direction: str) -> int:
    return zlib.crc32(f"mtprune-fitted-{VERSION}-{direction}".encode())


def log_odds(text: Any, direction_codes: np.ndarray, direction_names: list[str], base: dict[str, np.ndarray],
             workdir: Path, seconds: dict[str, float] | None = None) -> np.ndarray:
    """The regression's log-odds of every row of ``text`` (``rawtext.RowText`` or ``ListText``, row i translating in
    direction ``direction_names[direction_codes[i]]``; ``base``: its ``base_*`` columns), fitted per direction; NaN in
    a direction with fewer than ``MIN_ROWS`` rows. ``workdir``: where ``baselines`` keeps the word-alignment models
    (``workdir/wordalign``; fitted there when missing)."""
    import time

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from . import baselines
    from .rawtext import ListText
    from .wordalign import sample_rows

    out = np.full(len(text), np.nan)
    codes = np.asarray(direction_codes)
    for d, direction in enumerate(direction_names):
        rows = np.flatnonzero(codes == d)
        if len(rows) < MIN_ROWS:
            continue
        t0 = time.time()
        sample = rows[sample_rows(len(rows), SAMPLE)]
        fake = corrupt(list(text.pairs(sample)), direction_seed(direction))
        # word alignment by the models the base_* columns were scored with (fitted on the corpus, cached in workdir)
        train = {direction: baselines.training_pairs(text, rows, direction)}
        fake_cols = baselines.compute_rows(ListText([p[0] for p in fake], [p[1] for p in fake]),
                                           np.zeros(len(fake), np.int64), [direction], workdir, None, train)
        reference = {c: _sorted(base[c][rows]) for c in FEATURES}  # sorted once, used by every _features call
        fit_rows = rows[sample_rows(len(rows), FIT_ROWS)]
        x = np.vstack([_features(reference, base, fit_rows), _features(reference, fake_cols, slice(None))])
        y = np.r_[np.zeros(len(fit_rows)), np.ones(len(fake))]
        model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        for lo in range(0, len(rows), ROWS_AT_ONCE):
            part = rows[lo:lo + ROWS_AT_ONCE]
            out[part] = model.decision_function(_features(reference, base, part))
        if seconds is not None:
            seconds[f"base_fitted {direction}"] = round(time.time() - t0, 3)
        log.info("score: base_fitted %s: fitted on %d rows against %d corrupted copies (weights %s)", direction,
                 len(fit_rows), len(fake), ", ".join(f"{c.removeprefix('base_')} {w:+.2f}"
                                                     for c, w in zip(FEATURES, model.coef_[0], strict=True)))
    return np.round(out, 9)
