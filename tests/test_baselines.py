"""The base_* columns: OpusFilter's filters run for real on known pairs, word alignment on a corpus built so that
the misaligned pairs are known (the same values every time, and for any slice of the rows), the cache of computed
columns, and base_all / combined_all."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA, TINY, cli, error_lines, read
from mtprune.config import load_config
from mtprune.scoring import baselines, derived

GOOD = ("I forgot my keys at the office yesterday.", "Ich habe gestern meinen Schlüssel im Büro vergessen.")
PAIRS = [
    GOOD,
    ("We are going to the cinema tomorrow.", "We are going to the cinema tomorrow."),  # untranslated copy
    ("We are going to the cinema tomorrow.", "Ieri ho dimenticato le chiavi in ufficio."),  # Italian target
    ("The train leaves at 7:45 from platform 3.", "Der Zug fährt um 9:12 von Gleis 5 ab."),  # other numbers
    ("Where is the station?", "Wo ist der Bahnhof? Wo ist der Bahnhof? Wo ist der Bahnhof?"),  # looping target
    ("Wir gehen morgen ins Kino.", "We are going to the cinema tomorrow."),  # sides swapped
    ("He said that he would come to the meeting on Monday morning.", "Er sagte."),  # truncated
]


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    seconds: dict[str, float] = {}
    out = baselines.compute([p[0] for p in PAIRS], [p[1] for p in PAIRS], ["en-de"] * len(PAIRS),
                            tmp_path_factory.mktemp("wa"), seconds)
    assert set(seconds) >= {"base_langid", "base_wordalign", "base_similarity"}
    return out


def test_every_column_is_written_and_higher_is_worse(known: dict[str, np.ndarray]) -> None:
    assert set(known) == set(baselines.COLUMNS)
    good = {c: v[0] for c, v in known.items()}
    assert known["base_similarity"][1] == 1.0 > good["base_similarity"]  # the copy
    assert known["base_langid_tgt"][2] == 1.0 and good["base_langid_tgt"] < 0.2  # Italian where German is due
    assert known["base_langid_tgt"][1] == 1.0  # the copy is English where German is due
    assert known["base_numerals"][3] > 0.5 and good["base_numerals"] == 0.0
    assert known["base_repetition"][4] >= 2 > good["base_repetition"]
    assert known["base_terminalpunct"][4] > 0 == good["base_terminalpunct"]
    assert known["base_langid_src"][5] == 1.0 and known["base_langid_tgt"][5] == 1.0  # swapped: both sides wrong
    assert good["base_langid_src"] < 0.2
    ratio = len(PAIRS[6][0]) / len(PAIRS[6][1])
    np.testing.assert_allclose(known["base_lengthratio_char"][6], ratio)
    np.testing.assert_allclose(known["base_lengthratio_word"][6], 12 / 2)
    assert np.isfinite(known["base_wordalign_src"]).all() and np.isfinite(known["base_wordalign_tgt"]).all()


def test_base_opusfilter_counts_the_filters_that_reject_a_pair_at_their_defaults(known: dict[str, np.ndarray]) -> None:
    n = known["base_opusfilter"]
    assert n[0] == 0  # the good pair passes every filter (word alignment is not one of them)
    assert n[1] >= 2  # the copy: similarity >= 0.9 and a target in the wrong language
    assert n[2] >= 1 and n[5] >= 1  # a wrong-language target; swapped sides
    assert n[6] >= 1  # 12 words against 2: word length ratio >= 3


def test_a_language_lingua_lacks_gives_missing_values_not_an_error(tmp_path: Path) -> None:
    out = baselines.compute(["abc def"], ["ghi jkl"], ["en-xx"], tmp_path)
    assert np.isnan(out["base_langid_tgt"][0]) and not np.isnan(out["base_langid_src"][0])
    assert np.isnan(out["base_wordalign_src"][0])  # one pair is no corpus to learn alignments from


def toy_corpus(n: int = 400, n_bad: int = 40, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """Sentences over a made-up 60-word lexicon whose 'translation' maps each word to its own counterpart,
    in the same order; `n_bad` targets belong to another sentence (misaligned)."""
    rng = random.Random(seed)
    src_words = [f"w{i}" for i in range(60)]
    tgt_of = {w: f"v{i}x" for i, w in enumerate(src_words)}
    src = [" ".join(rng.choice(src_words) for _ in range(rng.randint(5, 9))) for _ in range(n)]
    tgt = [" ".join(tgt_of[w] for w in s.split()) for s in src]
    bad = np.zeros(n, dtype=bool)
    for i in rng.sample(range(n), n_bad):
        j = (i + n // 2) % n
        tgt[i] = " ".join(tgt_of[w] for w in src[j].split())
        bad[i] = True
    return src, tgt, bad


def auroc(scores: np.ndarray, bad: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(bad, scores))


def test_word_alignment_learnt_from_the_corpus_finds_its_misaligned_pairs(tmp_path: Path) -> None:
    src, tgt, bad = toy_corpus()
    out = baselines.compute(src, tgt, ["en-de"] * len(src), tmp_path)
    assert auroc(out["base_wordalign_src"], bad) > 0.95
    assert auroc(out["base_wordalign_tgt"], bad) > 0.95
    names = sorted(p.name for p in (tmp_path / "wordalign").iterdir())
    assert [n for n in names if not n.startswith(".")] == ["de-en.json", "de-en.npz", "en-de.json", "en-de.npz"]
    assert not [n for n in names if n.endswith(".tmp")]  # the two models kept, no temp file left


def test_word_alignment_gives_the_same_bytes_every_time_and_for_any_slice_of_the_rows(tmp_path: Path) -> None:
    src, tgt, _ = toy_corpus(300, 30)
    dirs = ["en-de"] * len(src)
    first = baselines.compute(src, tgt, dirs, tmp_path / "a")
    again = baselines.compute(src, tgt, dirs, tmp_path / "b")  # fitted again from scratch
    for c in ("base_wordalign_src", "base_wordalign_tgt"):
        assert first[c].tobytes() == again[c].tobytes()
    from mtprune.scoring import wordalign

    model = wordalign.fit(list(zip(src, tgt, strict=True)))
    whole = model.scores(zip(src, tgt, strict=True))
    parts = np.concatenate([model.scores(zip(src[:7], tgt[:7], strict=True)),
                            model.scores(zip(src[7:], tgt[7:], strict=True))])
    assert whole.tobytes() == parts.tobytes()  # a pair's score does not depend on the pairs scored beside it
    assert whole.tobytes() == first["base_wordalign_src"].tobytes()
    loaded = wordalign.Model.load(tmp_path / "a" / "wordalign" / "en-de.npz")
    assert loaded.scores(zip(src, tgt, strict=True)).tobytes() == whole.tobytes()


def test_a_pair_with_an_empty_side_gets_the_worst_alignment_score_and_unknown_words_the_floor(tmp_path: Path) -> None:
    from mtprune.scoring import wordalign

    src, tgt, _ = toy_corpus(200, 0)
    model = wordalign.fit(list(zip(src, tgt, strict=True)))
    got = model.scores([(src[0], tgt[0]), ("", tgt[0]), (src[0], ""), ("zzz qqq", "yyy")])
    assert got[1] == got[2] == wordalign.WORST
    assert got[0] < 5 < got[3] < wordalign.WORST  # words never seen: about -log(FLOOR) = 16


def test_the_cache_is_reused_for_the_same_text_and_redone_for_other_text(tmp_path: Path, monkeypatch) -> None:
    src, tgt, _ = toy_corpus(120, 10)
    ids = [f"en-de/{i}" for i in range(len(src))]
    dirs = ["en-de"] * len(src)
    path = tmp_path / "shards" / "baselines.parquet"
    first = baselines.cached(path, ids, dirs, src, tgt, tmp_path)
    assert path.is_file()

    def no_compute(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("computed again")

    with monkeypatch.context() as m:
        m.setattr(baselines, "compute_rows", no_compute)
        again = baselines.cached(path, ids, dirs, src, tgt, tmp_path)
    for c in baselines.COLUMNS:
        np.testing.assert_array_equal(again[c], first[c])
    tgt[3] = tgt[3] + " v1x"
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="computed again"):
        m.setattr(baselines, "compute_rows", no_compute)
        baselines.cached(path, ids, dirs, src, tgt, tmp_path)
    path.write_bytes(b"not parquet")  # a damaged cache is recomputed, not a traceback
    redone = baselines.cached(path, ids, dirs, src, tgt, tmp_path)
    assert len(redone["base_similarity"]) == len(src)


def test_fisher_sums_minus_log_tail_shares_and_missing_values_add_nothing() -> None:
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [4.0, 3.0, 2.0, np.nan]})
    ranks = derived.tail_ranks(df, ["a", "b", "-a"])
    np.testing.assert_allclose(ranks, [[0.25, 0.5, 0.75, 1.0], [1.0, 2 / 3, 1 / 3, 0.0], [1.0, 0.75, 0.5, 0.25]])
    # p = 1 - rank + 1/n: the top pair of a column has p = 1/n; a missing value p = 1
    expect = -np.log([[1.0, 0.75, 0.5, 0.25], [0.25, 7 / 12, 11 / 12, 1.0], [0.25, 0.5, 0.75, 1.0]]).sum(axis=0)
    np.testing.assert_allclose(derived.fisher(ranks), expect)
    np.testing.assert_allclose(derived.combine_ranks(ranks, "max"), [1.0, 0.75, 0.75, 1.0])


def test_max_ranks_one_extreme_column_first_and_fisher_evidence_on_many() -> None:
    """The two ways of combining: pair 0 is the most extreme of 1,000 on one column and middling on seven
    others; pair 1 is at the 90th percentile of all eight. The maximum puts 0 first; Fisher's sum puts 1 first
    (8 x -log 0.1 = 18.4 against -log 0.001 + 7 x -log 0.5 = 11.7)."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({f"c{j}": rng.random(1000) for j in range(8)})
    df.loc[0, :] = 0.5
    df.loc[0, "c0"] = 10.0
    df.loc[1, :] = 0.9
    ranks = derived.tail_ranks(df, list(df.columns))
    assert np.argmax(derived.combine_ranks(ranks, "max")) == 0
    f = derived.fisher(ranks)
    assert np.argmax(f) == 1
    np.testing.assert_allclose(f[0], -np.log(1 / 1000) - np.log(1 - ranks[1:, 0] + 1 / 1000).sum())


def test_base_all_and_combined_all_follow_score_combine_all_how(tmp_path: Path) -> None:
    from test_derived import fake_run

    layout, df = fake_run(tmp_path)
    for how in ("fisher", "max"):
        cfg = load_config(None, [f"score.combine_all_how={how}"])
        out = derived.add_columns(df, cfg, layout)
        np.testing.assert_allclose(out["base_all"], derived.combine_ranks(derived.tail_ranks(out, derived.BASE_ALL), how))
        both = derived.tail_ranks(out, (*cfg.score.combine, *derived.BASE_ALL))
        np.testing.assert_allclose(out["combined_all"], derived.combine_ranks(both, how))
    assert set(derived.BASE_ALL) <= set(baselines.COLUMNS)


def test_combine_refuses_the_combined_columns() -> None:
    from mtprune.config import ConfigError

    with pytest.raises(ConfigError, match="'combined_all' is made from the combined columns"):
        load_config(None, ["score.combine=[nll,combined_all]"])


TATOEBA = SHARED_DATA / "tatoeba-opus100-layout"


@pytest.mark.slow
@pytest.mark.skipif(not TATOEBA.is_dir(), reason="shared data not present")
def test_a_sweep_prunes_by_opusfilter_random_length_and_word_alignment_on_real_text(tmp_path: Path) -> None:
    """On real text (the made-up languages of the synthetic corpus fail language id everywhere): the three
    strategies a user of OpusFilter compares against run through train, evaluate and report."""
    import json

    from mtprune.layout import RunLayout

    run = tmp_path / "run"
    sets = [f"download.source=local:{TATOEBA}", "download.pairs=[en-es]", "download.max_train_per_pair=600",
            "download.max_valid_per_pair=20", "download.max_test_per_pair=20", "download.noise.rate=0.1",
            "score.baselines=true", "proxy.seeds=[1]", "train.seeds=[1]", "train.max_update=8",
            "prune.sparsities=[0.2]",
            "prune.strategies=[opusfilter,random-length,base_wordalign_tgt-high]"]
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "-q", *[a for s in sets for a in ("--set", s)])
    assert code == 0, out
    L = RunLayout(run)
    scores = pd.read_parquet(L.scores)
    rejected = set(scores["sentence_id"][scores["base_opusfilter"] > 0])
    assert 0 < len(rejected) < len(scores) / 2
    assert set(read(L.kept_ids("opusfilter"))) == set(scores["sentence_id"]) - rejected
    results = pd.read_csv(L.report_file("results.csv"))
    got = results[results["pair"] == "all"].set_index("strategy")["sparsity"]
    assert set(got.index) == {"full", "opusfilter", "random-length", "base_wordalign_tgt-high"}
    fraction = json.loads(L.manifest("prune").read_text())["stats"]["runs"]["opusfilter"]["sparsity"]
    assert got["opusfilter"] == pytest.approx(len(rejected) / len(scores), abs=1e-4) == fraction
    assert got["random-length"] == got["base_wordalign_tgt-high"] == 0.2
    md = L.report_file("results.md").read_text()
    assert "opusfilter" in md and "random-length" in md
    # score --overwrite scores again; the base_* columns come out the same (kept, and the same bytes if recomputed)
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(run), "-q", "--overwrite",
                    *[a for s in sets for a in ("--set", s)])
    assert code == 0, out
    again = pd.read_parquet(L.scores)
    for c in ("base_wordalign_src", "base_wordalign_tgt", "base_all"):
        np.testing.assert_array_equal(again[c], scores[c])


@pytest.mark.slow
def test_baseline_slices_scored_as_jobs_of_their_own_are_what_the_merge_uses(tiny_copy: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`score --baselines I/N` writes slice I's base_* columns from the prepare stage alone (no proxy, no scoring
    pass); `mtprune score` then assembles them and runs no filter itself; --overwrite keeps the slices; a missing
    slice sends the merge back to computing every column."""
    from mtprune.layout import RunLayout
    from mtprune.scoring.rawtext import RowText
    from mtprune.textio import read_lines

    L = RunLayout(tiny_copy)
    on = ["-c", str(TINY), "--run-dir", str(tiny_copy), "--set", "score.baselines=true"]
    shutil.rmtree(L.stage_dir("score"))
    shutil.rmtree(L.stage_dir("proxy"))  # a slice needs prepare only: on a cluster it runs beside proxy training
    for i in range(2):
        code, out = cli("score", *on, "--baselines", f"{i}/2")
        assert code == 0, out
    ids = read_lines(L.prepare_ids)
    n = len(ids)
    files = [baselines.shard_file(L.baseline_cache.parent, i, 2) for i in range(2)]
    sliced = [pd.read_parquet(f) for f in files]
    assert [list(s["sentence_id"]) for s in sliced] == [ids[:n // 2], ids[n // 2:]]
    assert not L.baseline_cache.exists()

    calls = []
    real = baselines.compute_rows

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        # the training pairs' columns (a RowText); base_fitted's corrupted copies (a ListText each) are not counted
        if type(a[0]).__name__ != "ListText":
            calls.append(len(a[0]))
        return real(*a, **k)

    monkeypatch.setattr(baselines, "compute_rows", counted)
    for stage in ("proxy", "score"):
        code, out = cli(stage, *on)
        assert code == 0, out
    assert calls == [] and "baseline columns assembled from 2 shards" in out
    scores = pd.read_parquet(L.scores)
    cols = list(baselines.COLUMNS)
    for part in sliced:  # every value is its slice's
        got = scores.set_index("sentence_id").loc[part["sentence_id"], cols].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, part[cols])
    # every filter gives what one pass over all rows gives: word alignment bit for bit (its models are fitted on the
    # pair's whole training text whatever the slice), lingua's confidences to their rounding (1e-6)
    with RowText(L, scores["pair"], scores["direction"], scores["sentence_id"]) as text:
        whole = real(text, text.direction_codes, text.direction_names, tmp_path)
    for c in cols:
        if c.startswith("base_wordalign"):
            assert scores[c].to_numpy().tobytes() == whole[c].tobytes(), c
        else:
            np.testing.assert_allclose(scores[c].to_numpy(), whole[c], rtol=0, atol=2e-6, err_msg=c)

    # --overwrite moves 04_score aside and keeps the slices, like the whole-corpus cache
    code, out = cli("score", *on, "--overwrite")
    assert code == 0 and calls == [], out
    pd.testing.assert_frame_equal(pd.read_parquet(L.scores)[cols], scores[cols])
    # one slice gone: the merge computes the columns of every row itself, and keeps them as the whole cache
    files[1].unlink()
    code, out = cli("score", *on, "--overwrite")
    assert code == 0 and calls == [n], out
    assert L.baseline_cache.is_file()


def test_baseline_slices_refuse_what_cannot_work(tiny_run: Path) -> None:
    base = ["score", "-c", str(TINY), "--run-dir", str(tiny_run)]
    code, out = cli(*base, "--baselines", "0/2")  # tiny.yaml has them off
    assert code == 2 and error_lines(out) == [
        "mtprune score: error: score --baselines: score.baselines is false in this config: there are no base_* "
        "columns to compute"], out
    code, out = cli(*base, "--set", "score.baselines=true", "--baselines", "2/2")
    assert code == 2 and "--baselines '2/2': expected I/N with 0 <= I < N" in out, out
    code, out = cli(*base, "--set", "score.baselines=true", "--baselines", "0/2", "--shard", "0/2")
    assert code == 2 and "--shard and --baselines: one slice at a time" in out, out
