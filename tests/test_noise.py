"""download.noise: injected noise joins back to the corrupted lines; the report scores each kind."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA, TINY, cli, download, error_lines, read, write_release
from mtprune.config import NOISE_KINDS, OPUS_PAIRS
from mtprune.layout import RunLayout
from mtprune.scoring.finding import labelled_noise_table, noise_finding
from mtprune.stages.report import noise_labels
from mtprune.synthetic import make_pair

TATOEBA = SHARED_DATA / "tatoeba-opus100-layout"


def fold(s: str) -> str:
    return " ".join(s.split())


def raw_release(root: Path, pair: str, split: str = "train") -> list[tuple[str, str]]:
    a, b = pair.split("-")
    name = {"train": "train", "valid": "dev", "test": "test"}[split]
    return list(zip(map(fold, read(root / pair / f"opus.{pair}-{name}.{a}")),
                    map(fold, read(root / pair / f"opus.{pair}-{name}.{b}")), strict=True))


def xx(pair: str, row: tuple[str, str]) -> str:
    """The non-English text of a row."""
    return row[1] if pair.startswith("en-") else row[0]


def is_repetition(new: list[str], old: list[str]) -> bool:
    """new = old[:start] + old[start:start+k] * r for some stretch of old repeated r >= 3 times."""
    for start in range(len(old)):
        for k in range(1, len(old) - start + 1):
            stretch = old[start:start + k]
            r, rest = divmod(len(new) - start, k)
            if r >= 3 and not rest and new == old[:start] + stretch * r:
                return True
    return False


def check_corruption(kind: str, clean: tuple[str, str], got: tuple[str, str], t: int,
                     targets: set[str], third: set[str]) -> None:
    """Does ``got`` show the corruption ``kind`` of ``clean``? ``t``: index of the target side."""
    s = 1 - t
    if kind == "swapped":
        assert got == (clean[1], clean[0]) and clean[0] != clean[1]
        return
    assert got[s] == clean[s], (kind, clean, got)  # the source side is untouched
    new, old = got[t], clean[t]
    assert new != old, (kind, clean, got)
    if kind == "untranslated":
        assert new == clean[s]
    elif kind in ("misaligned", "misaligned_same_length"):
        assert new in targets
        if kind == "misaligned_same_length":
            assert abs(len(new) - len(old)) <= max(1, round(0.1 * len(old))), (old, new)
    elif kind == "wrong_language":
        assert new in third and new not in targets, new
    elif kind == "truncated":
        nw, ow = new.split(), old.split()
        assert 1 <= len(nw) < len(ow) and nw == ow[:len(nw)]
        assert len(nw) <= max(1, math.ceil(0.5 * len(ow))), (old, new)
    elif kind == "repeated":
        assert is_repetition(new.split(), old.split()), (old, new)
    else:
        raise AssertionError(f"unexpected kind {kind}")


def check_run(run: Path, raw: dict[str, list[tuple[str, str]]], third: dict[str, set[str]],
              direction: str = "en-xx", preexisting: dict[str, str] | None = None) -> dict[str, str]:
    """Every labelled pair shows its corruption, every other pair is its clean source line."""
    L = RunLayout(run)
    lines = read(L.noise_ids)
    assert all(len(ln.split("\t")) == 2 for ln in lines)
    labels = dict(ln.split("\t") for ln in lines)
    assert len(labels) == len(lines)
    preexisting = preexisting or {}
    for pair, rows in raw.items():
        a, b = pair.split("-")
        t = 0 if (direction == "xx-en") == (a == "en") else 1
        targets = {r[t] for r in rows}
        ids = read(L.download_ids(pair))
        got_rows = list(zip(read(L.split_file(pair, "train", a)), read(L.split_file(pair, "train", b)), strict=True))
        assert len(got_rows) == len(ids)
        for sid, got in zip(ids, got_rows, strict=True):
            clean = rows[int(sid.split("/")[1])]
            kind = labels.get(sid)
            if kind is None or sid in preexisting:
                assert got == clean, (sid, got, clean)
            else:
                check_corruption(kind, clean, got, t, targets, third[pair])
    return labels


def third_languages(raw: dict[str, list[tuple[str, str]]]) -> dict[str, set[str]]:
    return {p: {xx(q, r) for q, rows in raw.items() if q != p for r in rows} for p in raw}


def test_every_label_joins_back_to_its_corrupted_line(tmp_path: Path) -> None:
    root = tmp_path / "opus"
    for pair in ("de-en", "en-fr"):
        write_release(root, pair, n_train=280)
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", "download.pairs=[de-en,en-fr]",
                         "download.noise.rate=0.25")
    assert code == 0, out
    raw = {p: raw_release(root, p) for p in ("de-en", "en-fr")}
    labels = check_run(run, raw, third_languages(raw))
    per_pair = Counter(sid.split("/")[0] for sid in labels)
    assert per_pair == {"de-en": 70, "en-fr": 70}  # round(0.25 * 280) each
    for pair in ("de-en", "en-fr"):
        kinds = Counter(k for sid, k in labels.items() if sid.startswith(pair))
        assert set(kinds) == set(NOISE_KINDS)
        assert max(kinds.values()) - min(kinds.values()) <= 1  # 70 = 7 x 10
    stats = json.loads(RunLayout(run).manifest("download").read_text())["stats"]
    assert stats["noise_pairs"] == 140
    assert stats["noise"]["kinds"] == dict(Counter(labels.values()))
    assert stats["noise"]["pairs"]["de-en"]["truncated"] == 10
    # valid and test are the clean source lines
    L = RunLayout(run)
    for pair in ("de-en", "en-fr"):
        a, b = pair.split("-")
        for split in ("valid", "test"):
            got = list(zip(read(L.split_file(pair, split, a)), read(L.split_file(pair, split, b)), strict=True))
            assert got == raw_release(root, pair, split)


def test_same_seed_same_files_other_seed_other_noise(tmp_path: Path, local_corpus: Path) -> None:
    sets = [f"download.source=local:{local_corpus}", "download.pairs=[de-en,en-fr]", "download.noise.rate=0.3",
            "download.max_train_per_pair=50"]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, out = download(tmp_path / name, *sets, f"download.noise.seed={seed}")
        assert code == 0, out
        d = RunLayout(tmp_path / name).stage_dir("download")
        runs[name] = {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                      if p.is_file() and p.name != "manifest.json"}
    assert runs["a"] == runs["b"]
    assert "noise.ids" in runs["a"] and "de-en/train.de" in runs["a"]
    assert runs["a"]["noise.ids"] != runs["c"]["noise.ids"]
    assert runs["a"]["de-en/train.de"] != runs["c"]["de-en/train.de"]
    for f in ("de-en/train.ids", "de-en/valid.de", "de-en/test.en", "en-fr/valid.fr"):
        assert runs["a"][f] == runs["c"][f]  # the noise seed moves only the noise


def test_kinds_rate_and_target_side_follow_the_config(tmp_path: Path) -> None:
    root = write_release(tmp_path / "opus", "de-en", n_train=200)
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", "download.pairs=[de-en]",
                         "download.noise.rate=0.15", "download.noise.kinds=[truncated,untranslated,repeated]",
                         "download.direction=xx-en")
    assert code == 0, out
    raw = {"de-en": raw_release(root, "de-en")}
    labels = check_run(run, raw, {"de-en": set()}, direction="xx-en")  # target = the English side
    assert sorted(Counter(labels.values()).values()) == [10, 10, 10]
    L = RunLayout(run)
    en = dict(zip(read(L.download_ids("de-en")), read(L.split_file("de-en", "train", "en")), strict=True))
    truncated = [sid for sid, k in labels.items() if k == "truncated"]
    assert all(len(en[sid].split()) < len(raw["de-en"][int(sid.split("/")[1])][1].split()) for sid in truncated)


def test_rate_zero_writes_no_labels_for_a_real_source(tmp_path: Path, local_corpus: Path) -> None:
    code, out = download(tmp_path / "r", f"download.source=local:{local_corpus}", "download.pairs=[de-en]")
    assert code == 0, out
    assert not RunLayout(tmp_path / "r").noise_ids.exists()


def test_single_pair_takes_the_third_language_from_the_local_copys_other_pairs(tmp_path: Path) -> None:
    root = tmp_path / "opus"
    write_release(root, "de-en", n_train=100)
    write_release(root, "en-it", n_train=100)
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", "download.pairs=[de-en]",
                         "download.noise.rate=0.2", "download.noise.kinds=[wrong_language]")
    assert code == 0, out
    it_lines = {fold(s) for s in read(root / "en-it" / "opus.en-it-train.it")}
    labels = check_run(run, {"de-en": raw_release(root, "de-en")}, {"de-en": it_lines})
    assert Counter(labels.values()) == {"wrong_language": 20}
    # the donor files are inputs of the stage: editing them makes download stale
    p = root / "en-it" / "opus.en-it-train.it"
    p.write_text(p.read_text() + "", encoding="utf-8")
    from mtprune.config import load_config
    from mtprune.stages.download import external_inputs

    cfg = load_config(None, [f"download.source=local:{root}", "download.pairs=[de-en]", "download.noise.rate=0.2",
                             "download.noise.kinds=[wrong_language]"])
    assert str(p) in external_inputs(cfg)


def test_synthetic_corpus_keeps_its_own_labels_and_takes_injected_noise(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = download(run, "download.source=synthetic", "download.pairs=[en-fr]",
                         "download.synthetic_train_per_pair=210", "download.max_valid_per_pair=20",
                         "download.max_test_per_pair=20", "download.noise.rate=0.2")
    assert code == 0, out
    data = make_pair("en-fr", 210, 500, 500, 0.1, 1)
    own = {f"en-fr/{n}": k for n, k in data.noise.items()}
    assert len(own) == 21
    # third language: the other synthetic pairs' non-English side, without their own noisy lines
    third = set()
    for q in OPUS_PAIRS:
        if q != "en-fr":
            other = make_pair(q, 210, 500, 500, 0.1, 1)
            third |= {xx(q, r) for n, r in enumerate(other.train) if n not in other.noise}
    labels = check_run(run, {"en-fr": data.train}, {"en-fr": third}, preexisting=own)
    assert {sid: labels[sid] for sid in own} == own  # the corpus's own labels, with their kinds
    injected = Counter(k for sid, k in labels.items() if sid not in own)
    assert sum(injected.values()) == 42 and set(injected) == set(NOISE_KINDS)


def test_noise_settings_make_download_stale(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    sets = [f"download.source=local:{local_corpus}", "download.pairs=[de-en]"]

    def download_status(*more: str) -> str:
        args = ["status", "--run-dir", str(run)]
        for s in sets + list(more):
            args += ["--set", s]
        _, out = cli(*args)
        return next(ln for ln in out.splitlines() if ln.split()[:1] == ["download"])

    assert download(run, *sets)[0] == 0
    assert download_status().split()[1] == "fresh"
    assert download_status("download.noise.kinds=[truncated]").split()[1] == "fresh"  # rate 0: nothing injected
    line = download_status("download.noise.rate=0.1")
    assert "stale" in line and "download.noise.rate" in line, line
    sets += ["download.noise.rate=0.1", "download.noise.kinds=[truncated]"]
    assert download(run, *sets)[0] == 0
    assert download_status().split()[1] == "fresh"
    for key, value in (("kinds", "[truncated,swapped]"), ("seed", "7")):
        line = download_status(f"download.noise.{key}={value}")
        assert "stale" in line and f"download.noise.{key}" in line, line


@pytest.mark.skipif(not TATOEBA.is_dir(), reason="shared Tatoeba data not present")
def test_real_tatoeba_corpus(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{TATOEBA}", "download.max_train_per_pair=350",
                         "download.max_valid_per_pair=20", "download.noise.rate=0.2")
    assert code == 0, out
    raw = {p: raw_release(TATOEBA, p) for p in OPUS_PAIRS}
    labels = check_run(run, raw, third_languages(raw))
    assert Counter(sid.split("/")[0] for sid in labels) == {p: 70 for p in OPUS_PAIRS}
    assert Counter(labels.values()) == {k: 40 for k in NOISE_KINDS}


# ---- the report: how well each score finds each kind -----------------------------------------------

def hand_made_scores() -> tuple[pd.DataFrame, dict[str, str]]:
    ids = [f"de-en/{i}" for i in range(10)]
    labels = {"de-en/6": "truncated", "de-en/7": "truncated", "de-en/8": "misaligned", "de-en/9": "misaligned"}
    df = pd.DataFrame({
        "index": range(10), "sentence_id": ids, "pair": "de-en", "direction": "en-de",
        "n_tokens": [10, 10, 10, 10, 10, 10, 2, 3, 10, 10],
        "el2n": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.8, 0.35, 0.05],
        "nll": [1.0] * 10,
        "el2n@s1u10": np.linspace(0, 1, 10),
        "dual_xent": [0.0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
    })
    return df, labels


def test_report_auroc_per_kind_on_a_hand_made_table() -> None:
    df, labels = hand_made_scores()
    t = noise_finding(df, labels, [0.2, 0.5]).set_index(["score", "kind"])
    assert list(dict.fromkeys(t.index.get_level_values(0))) == ["el2n", "nll", "dual_xent", "-length"]
    # el2n: both truncated above every clean pair; misaligned 0.35 beats 3 of 6 clean, 0.05 none
    assert t.loc[("el2n", "truncated"), "auroc"] == 1.0
    assert t.loc[("el2n", "misaligned"), "auroc"] == pytest.approx(3 / 12)
    assert t.loc[("el2n", "all"), "auroc"] == pytest.approx(15 / 24)
    assert t.loc[("nll", "all"), "auroc"] == 0.5 and t.loc[("dual_xent", "misaligned"), "auroc"] == 1.0
    # -length: short targets first; misaligned targets tie with clean ones
    assert t.loc[("-length", "truncated"), "auroc"] == 1.0
    assert t.loc[("-length", "misaligned"), "auroc"] == 0.5
    assert t.loc[("-length", "all"), "auroc"] == pytest.approx(18 / 24)
    # the top 20 % by el2n are the two truncated pairs; the top 50 % hold 2 labelled of 5
    assert t.loc[("el2n", "all"), "precision@0.2"] == 1.0
    assert t.loc[("el2n", "truncated"), "precision@0.2"] == 1.0 and t.loc[("el2n", "truncated"), "recall@0.2"] == 1.0
    assert t.loc[("el2n", "misaligned"), "recall@0.5"] == 0.0
    assert t.loc[("el2n", "all"), "precision@0.5"] == pytest.approx(0.4)
    # ties at the cut count as a random draw among the tied pairs: a constant score gets the base rate
    assert t.loc[("nll", "all"), "precision@0.2"] == pytest.approx(0.4)
    assert t.loc[("-length", "all"), "precision@0.5"] == pytest.approx((2 + 3 * 2 / 8) / 5)
    assert t.loc[("-length", "misaligned"), "recall@0.5"] == pytest.approx(3 * 2 / 8 / 2)
    assert t.loc[("el2n", "all"), "n_noisy"] == 4 and t.loc[("el2n", "misaligned"), "n_clean"] == 6


def test_score_stage_table_ranks_scores_by_auroc_with_precision_at_the_labelled_fraction() -> None:
    df, labels = hand_made_scores()
    md, long, summary = labelled_noise_table(df, labels, "01_download/noise.ids")
    assert list(summary["auroc"]) == ["dual_xent", "-length", "el2n", "nll"]  # best first
    assert summary["labelled"] == 4 and summary["auroc"]["el2n"] == pytest.approx(15 / 24, abs=1e-4)
    assert ("| score | all | misaligned | truncated | precision@labelled | worst kind (AUROC) | spearman vs length |"
            in md)
    # 4 of 10 labelled: el2n's top 4 are 0.9, 0.8 (truncated), 0.6, 0.5 (clean); worst kind misaligned 3/12
    assert "| el2n | 0.62 | 0.25 | 1.00 | 0.50 | misaligned (0.25) |" in md
    assert "| dual_xent | 1.00 | 1.00 | 1.00 | 1.00 | misaligned (1.00) |" in md
    assert "## Proxy, baselines, both" not in md  # none of combined, base_all, combined_all in this table
    both = df.assign(combined=df["dual_xent"], base_all=df["el2n"])
    md2 = labelled_noise_table(both, labels, "01_download/noise.ids")[0]
    head, rest = md2.split("## Every score")
    assert "## Proxy, baselines, both" in head and "| combined | 1.00 |" in head and "| base_all | 0.62 |" in head
    assert "| combined | 1.00 |" in rest and "| base_all | 0.62 |" in rest
    t = long.set_index(["score", "kind"])
    assert t.loc[("el2n", "truncated"), "recall@labelled"] == 1.0


@pytest.mark.slow
def test_score_writes_the_noise_table_and_drops_it_without_labels(tiny_copy: Path) -> None:
    from mtprune.scoring.disktable import DiskTable
    from mtprune.stages.score import _noise_files

    L = RunLayout(tiny_copy)
    md_path, csv_path = L.score_noise
    md = md_path.read_text()
    assert "| score | all |" in md and "| -length |" in md and "| el2n |" in md
    m = json.loads(L.manifest("score").read_text())
    assert any(Path(k).name == "noise.md" for k in m["outputs"]), m["outputs"]
    assert m["stats"]["noise"]["labelled"] == len(L.noise_ids.read_text().splitlines())
    L.noise_ids.unlink()
    assert _noise_files(DiskTable([L.scores]), L, {}) == []
    assert not md_path.exists() and not csv_path.exists()


def test_per_pair_scope_precision_is_of_what_per_pair_pruning_drops() -> None:
    # pair A's scores all exceed pair B's; the labelled pairs are B's two highest
    df = pd.DataFrame({"sentence_id": [f"de-en/{i}" for i in range(4)] + [f"en-fr/{i}" for i in range(4)],
                       "pair": ["de-en"] * 4 + ["en-fr"] * 4, "n_tokens": [5] * 8,
                       "el2n": [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]})
    labels = {"en-fr/0": "misaligned", "en-fr/1": "misaligned"}
    glob = noise_finding(df, labels, [0.5]).set_index(["score", "kind"])
    per = noise_finding(df, labels, [0.5], "per-pair").set_index(["score", "kind"])
    assert glob.loc[("el2n", "all"), "precision@0.5"] == 0.0  # the global top half is all of de-en
    # per pair, the top half of each: de-en/0, de-en/1, en-fr/0, en-fr/1 (as prune drops them)
    assert per.loc[("el2n", "all"), "precision@0.5"] == 0.5 and per.loc[("el2n", "all"), "recall@0.5"] == 1.0
    assert per.loc[("el2n", "all"), "auroc"] == glob.loc[("el2n", "all"), "auroc"]  # AUROC does not depend on scope
    from mtprune.stages.prune import drop_mask

    dropped = drop_mask(df, "el2n-high", 0.5, "per-pair", 1)
    assert df["sentence_id"][dropped].map(labels).notna().mean() == per.loc[("el2n", "all"), "precision@0.5"]


def test_report_reads_two_and_one_column_labels(tmp_path: Path) -> None:
    from mtprune.config import load_config

    L = RunLayout(tmp_path / "run")
    L.stage_dir("download").mkdir(parents=True)
    L.noise_ids.write_text("de-en/6\ttruncated\nde-en/8\tmisaligned\n")
    labels, source = noise_labels(load_config(None, []), L)
    assert labels == {"de-en/6": "truncated", "de-en/8": "misaligned"} and source == "01_download/noise.ids"
    ids = tmp_path / "bad.ids"
    ids.write_text("de-en/6\nde-en/9\n")
    labels, _ = noise_labels(load_config(None, [f"report.noise_ids={ids}"]), L)
    df, _ = hand_made_scores()
    t = noise_finding(df, labels, [0.2])
    assert set(t["kind"]) == {"all"}  # no kinds known: overall only
    assert t.set_index("score").loc["el2n", "auroc"] == pytest.approx((8 + 0) / 16)


def test_a_labels_file_none_of_whose_lines_parse_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Space- instead of tab-separated labels: every "id" was `de-en/6 truncated`, none matched, and the report
    said "0 of 1200 pairs labelled" with exit 0."""
    from mtprune.config import load_config
    from mtprune.errors import InputError

    labels = tmp_path / "labels.txt"
    labels.write_text("de-en/6 truncated\nde-en/8 misaligned\n\n")
    run = tmp_path / "run"
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", f"report.noise_ids={labels}", "--dry-run")
    assert code == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: report.noise_ids: {labels}: no line is `<sentence id>` TAB `<kind>` or a bare "
                      "`<sentence id>` (e.g. 'de-en/17\\tmisaligned'); line 1 is 'de-en/6 truncated'"], out
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", f"report.noise_ids={labels}")
    assert code == 2 and len(error_lines(out)) == 1 and str(labels) in out, out
    assert not (run / "01_download").exists()  # refused before the first stage
    L = RunLayout(run)
    with pytest.raises(InputError, match="no line is"):
        noise_labels(load_config(None, [f"report.noise_ids={labels}"]), L)


def test_labels_lines_that_do_not_parse_are_counted_in_a_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from mtprune.config import load_config

    labels = tmp_path / "labels.txt"
    labels.write_text("de-en/6\ttruncated\nde-en/7\n\nde-en/8 misaligned\nen-fr/2\tmisaligned\nen-fr 3\n")
    cfg = load_config(None, [f"report.noise_ids={labels}"])
    with caplog.at_level("WARNING", logger="mtprune"):
        found, source = noise_labels(cfg, RunLayout(tmp_path / "run"))
    assert found == {"de-en/6": "truncated", "de-en/7": "noise", "en-fr/2": "misaligned"} and source == str(labels)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"report.noise_ids: {labels}: 2 of 5 line(s) are not `<sentence id>` TAB `<kind>` or a bare "
                      "`<sentence id>`, ignored; the first is line 4: 'de-en/8 misaligned'"], warned


@pytest.mark.slow
def test_report_writes_the_per_kind_table(tiny_swept: tuple[Path, str]) -> None:
    run, _ = tiny_swept
    L = RunLayout(run)
    md = L.report_file("results.md").read_text()
    assert "| score | all | misaligned | truncated | untranslated |" in md
    assert "| -length |" in md and "| el2n |" in md
    table = pd.read_csv(L.report_file("noise.csv"))
    assert {"score", "kind", "auroc", "precision@0.2", "recall@0.2"} <= set(table.columns)
    assert set(table["kind"]) == {"all", "misaligned", "truncated", "untranslated"}
    assert {"el2n", "nll", "el2n_std", "-length"} <= set(table["score"])
    assert not any("@" in s for s in table["score"])
    outputs = json.loads(L.manifest("report").read_text())["outputs"]
    assert any(Path(k).name == "noise.csv" for k in outputs), outputs


def test_labels_that_name_clean_pairs_measure_the_labelled_sample_only(tmp_path: Path) -> None:
    """A labels file naming clean pairs (OK) is a labelled sample: AUROC and precision are taken on its pairs, not on
    the whole corpus with every unlabelled pair counted as clean; a bare line number names a pair of a one-pair
    run; lines that name no sentence are left out."""
    from mtprune.config import load_config
    from mtprune.scoring.finding import Labels, read_noise_ids

    df = pd.DataFrame({"sentence_id": [f"en-de/{i}" for i in range(6)], "pair": "en-de",
                       "n_tokens": [5, 6, 7, 8, 9, 10], "el2n": [0.9, 0.8, 0.2, 0.1, 0.95, 0.99]})
    noise = {"en-de/0": "MISALIGNED", "en-de/1": "PARTIAL"}
    whole = noise_finding(df, noise, [0.5]).set_index(["score", "kind"])
    assert whole.loc[("el2n", "all"), "auroc"] == pytest.approx(0.5)  # rows 4 and 5 score highest, taken as clean
    sample = noise_finding(df, Labels(noise, {"en-de/2", "en-de/3"}), [0.5]).set_index(["score", "kind"])
    assert sample.loc[("el2n", "all"), "auroc"] == 1.0 and sample.loc[("el2n", "all"), "n_clean"] == 2
    assert sample.loc[("el2n", "all"), "precision@0.5"] == 1.0  # the top half of the 4 labelled pairs
    md, _, summary = labelled_noise_table(df, Labels(noise, {"en-de/2", "en-de/3"}), "labels.tsv")
    assert "2 of 4 pairs labelled as noise, the other 2 as clean" in md and summary["auroc"]["el2n"] == 1.0

    f = tmp_path / "labels.tsv"
    f.write_text("0\tMISALIGNED\n1\tok\n7\tPARTIAL\nnot a line\n")
    one = load_config(None, ["download.pairs=[en-de]", "download.source=files", f"report.noise_ids={f}",
                             "download.files={en-de: {train: [a, b], valid: [a, b], test: [a, b]}}"])
    from mtprune.stages.report import _label_key

    labels = read_noise_ids(f, _label_key(one))
    assert dict(labels) == {"en-de/0": "MISALIGNED", "en-de/7": "PARTIAL"} and labels.clean == {"en-de/1"}
    two = load_config(None, ["download.pairs=[de-en,en-es]"])
    assert read_noise_ids(f, _label_key(two)) == {}  # line numbers name no sentence when there are two pairs


@pytest.mark.slow
def test_the_report_measures_a_labelled_sample_with_clean_pairs(tiny_swept: tuple[Path, str], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_swept[0], run)
    L = RunLayout(run)
    ids = read(L.prepare_ids)[:40]
    f = tmp_path / "labels.tsv"
    f.write_text("".join(f"{s}\t{'MISALIGNED' if i % 4 == 0 else 'OK'}\n" for i, s in enumerate(ids)))
    code, out = cli("report", "-c", str(TINY), "--run-dir", str(run), "--set", f"report.noise_ids={f}", "-q")
    assert code == 0, out
    md = L.report_file("results.md").read_text()
    assert f"## Finding known noise (10 of 40 pairs labelled, from {f})" in md
    noise = pd.read_csv(L.report_file("noise.csv")).set_index(["score", "kind"])
    assert noise.loc[("el2n", "all"), "n_clean"] == 30 and noise.loc[("el2n", "all"), "n_noisy"] == 10


@pytest.mark.slow
def test_the_report_says_how_stable_each_seeds_and_checkpoints_drop_set_is(tiny_swept: tuple[Path, str],
                                                                           tmp_path: Path) -> None:
    """results.md: the Jaccard of the pairs el2n-high drops by each seed's and each checkpoint's EL2N with the pairs
    it drops by the averaged EL2N, as prune selects them; status warns when a seed's is under the threshold."""
    import shutil

    from mtprune.stages.prune import drop_mask
    from mtprune.stages.report_stability import THRESHOLD

    run = tmp_path / "run"
    shutil.copytree(tiny_swept[0], run)
    L = RunLayout(run)
    md = L.report_file("results.md").read_text()
    section = md.split("## How stable is the drop set?")[1].split("\n## ")[0]
    rows = {ln.split(" | ")[0].strip("| "): float(ln.split(" | ")[1].strip(" |"))
            for ln in section.splitlines() if ln.startswith("| seed") or ln.startswith("| checkpoint")}
    assert set(rows) == {"seed 1 (mean of its 2 checkpoints)", "seed 2 (mean of its 2 checkpoints)",
                         "checkpoint s1u10", "checkpoint s1u20", "checkpoint s2u10", "checkpoint s2u20"}
    df = pd.read_parquet(L.scores)
    ids = df[["sentence_id", "pair"]]
    avg = drop_mask(ids.assign(el2n=df["el2n"]), "el2n-high", 0.2, "global", 1)
    one = drop_mask(ids.assign(el2n=df["el2n@s1u20"]), "el2n-high", 0.2, "global", 1)
    assert avg.sum() == one.sum() == round(0.2 * len(df))
    assert rows["checkpoint s1u20"] == pytest.approx((avg & one).sum() / (avg | one).sum(), abs=0.005)
    stats = json.loads(L.manifest("report").read_text())["stats"]["drop_set_stability"]
    low = stats["min_seed_jaccard"]["0.2"]
    assert low == pytest.approx(min(rows["seed 1 (mean of its 2 checkpoints)"],
                                    rows["seed 2 (mean of its 2 checkpoints)"]), abs=0.005)
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(run))
    assert code == 0 and (f"overlaps the averaged one by {low:.2f} at 0.2" in out) == (low < THRESHOLD), out
