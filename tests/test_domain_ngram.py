"""base_domain_xent (scoring/domain_ngram.py) on real text: OpusFilter's CrossEntropyDifferenceFilter with VariKN
character n-gram models must tell Multi30K image captions (the target's domain) from Tatoeba sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import SHARED_DATA
from mtprune.errors import InputError
from mtprune.scoring.domain_ngram import WORST, base_domain_xent, sample_rows

TATOEBA = SHARED_DATA / "tatoeba-opus100-layout" / "de-en"
MULTI30K = SHARED_DATA / "multi30k-ende"
N_TATOEBA, N_MULTI30K, N_TARGET = 2000, 500, 300
SAMPLE, ORDER = 1000, 3


def head(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, list[str]], dict[str, list[str]], np.ndarray]:
    """pool: 2,000 Tatoeba de-en training pairs then 500 Multi30K training captions; target: 300 Multi30K valid
    captions; labels: 1 = Tatoeba (out of the target's domain)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    pool = {lang: head(TATOEBA / f"opus.de-en-train.{lang}", N_TATOEBA) + head(MULTI30K / f"train.{lang}", N_MULTI30K)
            for lang in ("de", "en")}
    target = {lang: head(MULTI30K / f"val.{lang}", N_TARGET) for lang in ("de", "en")}
    return pool, target, np.array([1] * N_TATOEBA + [0] * N_MULTI30K)


@pytest.fixture(scope="module")
def both_sides(data, tmp_path_factory) -> tuple[np.ndarray, Path]:
    pool, target, _ = data
    workdir = tmp_path_factory.mktemp("xent") / "lm"
    return base_domain_xent(pool, target, SAMPLE, ORDER, workdir), workdir


def test_high_means_unlike_the_target(data, both_sides) -> None:
    _, _, tatoeba = data
    values, _ = both_sides
    assert values.dtype == np.float64 and values.shape == tatoeba.shape and np.isfinite(values).all()
    auroc = roc_auc_score(tatoeba, values)
    assert auroc >= 0.97, auroc  # 0.994 measured (opusfilter 3.3.1, varikn 1.2.1)
    assert np.median(values[tatoeba == 1]) > np.median(values[tatoeba == 0])


def test_same_bytes_in_another_workdir(data, both_sides, tmp_path: Path) -> None:
    pool, target, _ = data
    values, workdir = both_sides
    again = base_domain_xent(pool, target, SAMPLE, ORDER, tmp_path / "elsewhere")
    assert again.tobytes() == values.tobytes()
    assert np.array_equal(values, np.round(values, 6))
    # only the finished models are left: no training text, no temp names
    names = sorted(p.name for p in workdir.iterdir())
    assert names == ["de.general.arpa", "de.target.arpa", "en.general.arpa", "en.target.arpa"]
    for name in names:
        assert (workdir / name).read_bytes() == (tmp_path / "elsewhere" / name).read_bytes()


def test_one_side_of_target_text(data, tmp_path: Path) -> None:
    pool, target, tatoeba = data
    values = base_domain_xent(pool, {"de": None, "en": target["en"]}, SAMPLE, ORDER, tmp_path)
    assert values.dtype == np.float64 and values.shape == tatoeba.shape and np.isfinite(values).all()
    assert roc_auc_score(tatoeba, values) >= 0.95  # 0.988 measured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en.general.arpa", "en.target.arpa"]


def test_empty_target_side_is_an_input_error(data, tmp_path: Path) -> None:
    pool, target, _ = data
    with pytest.raises(InputError, match=r"^score\.target: no de sentences in the target text$"):
        base_domain_xent(pool, {"de": [], "en": target["en"]}, SAMPLE, ORDER, tmp_path)
    with pytest.raises(InputError, match="no en sentences"):  # blank lines are no sentences either
        base_domain_xent(pool, {"de": target["de"], "en": ["", "  "]}, SAMPLE, ORDER, tmp_path)


def test_empty_sentence_is_the_least_like_the_target(data, tmp_path: Path) -> None:
    pool, target, _ = data
    pool = {lang: list(lines) for lang, lines in pool.items()}
    pool["de"][3] = ""  # one side empty
    pool["de"][N_TATOEBA + 7] = pool["en"][N_TATOEBA + 7] = " "  # a caption with both sides blank
    values = base_domain_xent(pool, target, SAMPLE, ORDER, tmp_path)
    assert np.isfinite(values).all()
    assert values[N_TATOEBA + 7] == 2 * WORST  # the worst value on each side
    assert WORST < values[3] < 2 * WORST
    others = np.delete(values, [3, N_TATOEBA + 7])
    assert values[3] > others.max()


def test_evenly_spaced_sample() -> None:
    assert sample_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    rows = sample_rows(10_001, 5)
    assert rows.tolist() == [0, 2500, 5000, 7500, 10_000]
