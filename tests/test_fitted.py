"""base_fitted (scoring/fitted.py): the synthetic noise it is fitted on, and what it finds on real text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import SHARED_DATA
from mtprune.scoring import baselines, derived, fitted
from mtprune.scoring.rawtext import ListText

TATOEBA = SHARED_DATA / "tatoeba-opus100-layout"


def test_corrupt_makes_each_kind_in_turn_and_is_seeded() -> None:
    pairs = [(f"source sentence number {k} here .", f"Zielsatz Nummer {k} hier und dort .") for k in range(12)]
    out = fitted.corrupt(pairs, seed=5)
    assert out == fitted.corrupt(pairs, seed=5) and len(out) == len(pairs)
    kinds = [fitted.KINDS[j % len(fitted.KINDS)] for j in range(len(pairs))]
    for j, ((s, t), (cs, ct), kind) in enumerate(zip(pairs, out, kinds, strict=True)):
        if kind == "neighbour":
            assert (cs, ct) == (s, pairs[j + 1][1])
        elif kind == "random":
            assert cs == s and ct in [p[1] for p in pairs]
        elif kind == "truncated":  # one side cut to 30-70 % of its words, the other kept
            cut, kept = (ct, (cs, s)) if cs == s else (cs, (ct, t))
            assert kept[0] == kept[1] and 0.3 * 7 - 1 <= len(cut.split()) <= 0.7 * 8 + 1
            assert cut.split() == (t if cut is ct else s).split()[:len(cut.split())]
        elif kind == "appended":
            assert (cs, ct) in ((s, f"{t} {pairs[j + 1][1]}"), (f"{s} {pairs[j + 1][0]}", t))
        else:
            assert kind == "copied" and cs == ct and cs in (s, t)


def test_percentiles_halve_ties_and_give_missing_values_no_evidence() -> None:
    ref = np.array([1.0, 2.0, 2.0, 3.0, np.nan])
    got = fitted.percentiles(ref, np.array([0.5, 2.0, 3.0, 9.0, np.nan]))
    np.testing.assert_allclose(got, [0.0, 0.5, 0.875, 1.0, 0.0])
    np.testing.assert_allclose(fitted.percentiles(np.array([np.nan]), np.array([1.0])), [0.0])


def _lines(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def noisy_pool() -> tuple[list[str], list[str], np.ndarray]:
    """2,400 Tatoeba en-de pairs, 240 of them made bad in ways the fit never makes: a target of about the same
    length from another pair, an Italian target, a target that loops on a stretch of its words."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    n = 2400
    en = _lines(TATOEBA / "de-en" / "opus.de-en-train.en", n)
    de = _lines(TATOEBA / "de-en" / "opus.de-en-train.de", n)
    it = _lines(TATOEBA / "en-it" / "opus.en-it-train.it", 200)
    rng = np.random.default_rng(3)
    bad = np.zeros(n, dtype=np.int64)
    by_length = np.argsort([len(t) for t in de], kind="stable")
    for k, i in enumerate(rng.choice(n, 240, replace=False)):
        if k % 3 == 0:
            at = int(np.flatnonzero(by_length == i)[0])
            de[i] = de[by_length[at + 1 if at + 1 < n else at - 1]]
        elif k % 3 == 1:
            de[i] = it[k // 3]
        else:
            ws = de[i].split()
            de[i] = " ".join(ws[:1] * 5 + ws[1:])
        bad[i] = 1 + k % 3
    return en, de, bad


def _base_fitted(en: list[str], de: list[str], workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    base = baselines.compute(en, de, ["en-de"] * len(en), workdir)
    odds = fitted.log_odds(ListText(en, de), np.zeros(len(en), np.int64), ["en-de"], base, workdir)
    base_all = derived.combine_ranks(derived.tail_ranks(base, derived.BASE_ALL), "fisher")
    return derived.base_fitted(odds, base_all, "fisher"), base_all


def test_base_fitted_finds_noise_it_was_not_fitted_on(noisy_pool, tmp_path: Path) -> None:
    en, de, bad = noisy_pool
    both, base_all = _base_fitted(en, de, tmp_path / "a")
    assert np.isfinite(both).all()
    for kind in (1, 2, 3):
        rows = (bad == 0) | (bad == kind)
        assert roc_auc_score(bad[rows] > 0, both[rows]) >= 0.85, kind
    assert roc_auc_score(bad > 0, both) >= roc_auc_score(bad > 0, base_all) - 0.02
    # the same text gives the same column, its models fitted afresh in another folder
    again, _ = _base_fitted(en, de, tmp_path / "b")
    np.testing.assert_array_equal(both, again)
    # the corrupted pairs are aligned by the models the base_* columns were scored with: no model of their own
    assert sorted(p.name for p in (tmp_path / "a" / "wordalign").glob("*.npz")) == ["de-en.npz", "en-de.npz"]


def test_a_direction_too_small_to_fit_ranks_as_base_all(tmp_path: Path) -> None:
    en = [f"number {k} is here ." for k in range(fitted.MIN_ROWS - 1)]
    de = [f"Nummer {k} ist hier ." for k in range(fitted.MIN_ROWS - 1)]
    base = {c: np.arange(len(en), dtype=np.float64) for c in baselines.COLUMNS}
    odds = fitted.log_odds(ListText(en, de), np.zeros(len(en), np.int64), ["en-de"], base, tmp_path)
    assert np.isnan(odds).all() and not (tmp_path / "wordalign").exists()
