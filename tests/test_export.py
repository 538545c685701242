"""`mtprune export`: pruned corpora as plain text (checked line by line against the download by id) and
scores.tsv; fresh/stale like every stage. Runs on a copy of the tiny run (no training here: prune only)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, cli, error_lines, read
from mtprune.layout import RunLayout


def _export(run: Path, *args: str) -> tuple[int, str]:
    return cli("export", "-c", str(TINY), "--run-dir", str(run), *args)


@pytest.fixture
def pruned(tiny_copy: Path) -> Path:
    code, out = cli("prune", "-c", str(TINY), "--run-dir", str(tiny_copy), "-q")
    assert code == 0, out
    return tiny_copy


@pytest.mark.slow
def test_export_writes_the_kept_pairs_as_downloaded_and_every_score(pruned: Path) -> None:
    L = RunLayout(pruned)
    code, out = _export(pruned, "--run", "el2n-high-0.2", "-q")
    assert code == 0, out
    pairs = json.loads(L.manifest("download").read_text())["config"]["download"]["pairs"]
    kept = set(read(L.kept_ids("el2n-high-0.2")))
    raw: dict[str, tuple[str, str]] = {}  # sentence id -> the downloaded (untokenized) text of both sides
    for pair in pairs:
        a, b = pair.split("-")
        raw.update(zip(read(L.download_ids(pair)), zip(read(L.split_file(pair, "train", a)),
                                                        read(L.split_file(pair, "train", b)), strict=True), strict=True))
    exported = set()
    for pair in pairs:
        a, b = pair.split("-")
        ids = read(L.export_ids("el2n-high-0.2", pair))
        side_a, side_b = read(L.export_file("el2n-high-0.2", pair, a)), read(L.export_file("el2n-high-0.2", pair, b))
        assert len(ids) == len(side_a) == len(side_b) > 0
        for sid, x, y in zip(ids, side_a, side_b, strict=True):
            assert sid.startswith(pair + "/")
            assert raw[sid] == (x, y), sid
        assert "▁" not in "".join(side_a + side_b)  # untokenized: no SentencePiece pieces
        exported |= set(ids)
    assert exported == kept
    assert not L.export_dir("random-0.2").exists()  # only the run asked for

    m = json.loads(L.manifest("export").read_text())
    assert m["params"]["export.runs"] == ["el2n-high-0.2"]
    assert m["outputs"][f"el2n-high-0.2/{pairs[0]}/train.{pairs[0].split('-')[0]}"]["lines"] == \
        len(read(L.export_ids("el2n-high-0.2", pairs[0])))
    scores = pd.read_parquet(L.scores)
    tsv = pd.read_csv(L.export_scores, sep="\t")
    assert list(tsv.columns[:2]) == ["sentence_id", "pair"]
    assert {"el2n", "nll", "el2n_std", "n_tokens"} <= set(tsv.columns)
    assert any(c.startswith("el2n@s") for c in tsv.columns) and "index" not in tsv.columns
    merged = tsv.merge(scores, on="sentence_id", suffixes=("", "_pq"))
    assert len(merged) == len(scores) == len(tsv) == m["outputs"]["scores.tsv"]["lines"] - 1
    assert (merged["pair"] == merged["pair_pq"]).all()
    assert (merged["el2n"] - merged["el2n_pq"]).abs().max() < 1e-6
    noise = dict(ln.split("\t") for ln in read(L.noise_ids))  # the synthetic corpus labels its noise
    assert tsv.columns[-1] == "noise" and tsv.columns[3] == "el2n"  # last: the README's `$4` is still el2n
    assert tsv["noise"].fillna("").tolist() == [noise.get(s, "") for s in tsv["sentence_id"]]
    assert set(noise.values()) <= set(tsv["noise"].dropna())

    code, out = _export(pruned, "--run", "el2n-high-0.2")
    assert code == 0 and "export: fresh" in out, out
    code, out = _export(pruned)  # every pruned corpus now: the selection changed, so the stage is redone
    assert code == 0 and "export.runs" in out, out
    assert L.export_file("random-0.2", pairs[0], pairs[0].split("-")[0]).is_file()
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(pruned))
    assert "export    fresh" in out, out


@pytest.mark.slow
def test_export_of_an_unknown_run_is_one_line_and_writes_nothing(pruned: Path) -> None:
    code, out = _export(pruned, "--run", "el2n-high-0.9")
    assert code == 2, out
    assert len(error_lines(out)) == 1
    assert "no pruned corpus 'el2n-high-0.9' (pruned corpora: el2n-high-0.2, random-0.2)" in out
    assert not RunLayout(pruned).stage_dir("export").exists()


def test_export_before_prune_names_the_stage_to_run(tmp_path: Path) -> None:
    code, out = _export(tmp_path / "run")
    assert code == 2, out
    assert "run `mtprune download` first" in out and len(error_lines(out)) == 1


@pytest.mark.parametrize("labelled", [True, False])
def test_scores_tsv_carries_the_noise_kind_when_labels_are_known(tmp_path: Path, labelled: bool) -> None:
    from mtprune.stages.export import export_scores

    L = RunLayout(tmp_path / "run")
    L.scores.parent.mkdir(parents=True)
    ids = [f"de-en/{i}" for i in range(5)]
    pd.DataFrame({"sentence_id": ids, "pair": "de-en", "index": range(5), "n_tokens": [3, 4, 5, 6, 7],
                  "el2n": [0.1, 0.2, 0.3, 0.4, 0.5]}).to_parquet(L.scores)
    L.stage_dir("export").mkdir()
    labels = {"de-en/1": "misaligned", "de-en/4": "untranslated", "en-fr/9": "truncated"} if labelled else None
    rows, columns = export_scores(L, labels)
    lines = [ln.split("\t") for ln in read(L.export_scores)]
    assert rows == 5 and lines[0] == columns
    if labelled:
        assert columns == ["sentence_id", "pair", "n_tokens", "el2n", "noise"]
        assert [ln[-1] for ln in lines[1:]] == ["", "misaligned", "", "", "untranslated"]
    else:
        assert columns == ["sentence_id", "pair", "n_tokens", "el2n"]


@pytest.mark.slow
def test_an_hf_export_loads_with_datasets_and_matches_the_text_export_row_for_row(pruned: Path) -> None:
    """`--format hf`: per pair, train/validation/test in OPUS-100's hub schema (a Translation feature), each kept
    pair with its sentence id and scores, loaded back by `datasets` exactly as the text export lists them."""
    import datasets

    code, out = cli("export", "-c", str(TINY), "--run-dir", str(pruned), "--format", "hf", "-q")
    assert code == 0, out
    L = RunLayout(pruned)
    scores = pd.read_parquet(L.scores).set_index("sentence_id")
    for name in ("el2n-high-0.2", "random-0.2"):
        for pair in ("de-en", "en-es"):
            l1, l2 = pair.split("-")
            files = {s: str(L.export_hf(name, pair, s)) for s in ("train", "validation", "test")}
            d = datasets.load_dataset("parquet", data_files=files)
            train = d["train"]
            assert train.features["translation"] == datasets.Translation(languages=[l1, l2])
            assert train["sentence_id"] == read(L.export_ids(name, pair))
            rows = train["translation"]
            assert [r[l1] for r in rows] == read(L.export_file(name, pair, l1))
            assert [r[l2] for r in rows] == read(L.export_file(name, pair, l2))
            assert train["el2n"] == scores.loc[train["sentence_id"], "el2n"].tolist()
            test = d["test"]
            assert [r[l2] for r in test["translation"]] == read(L.split_file(pair, "test", l2))
            assert set(test["el2n"]) == {None} and len(d["validation"]) == len(read(L.split_file(pair, "valid", l1)))
