"""score.target: the domain columns (mtprune/scoring/domain.py) on tiny runs and on real text of two domains, the
training pool of parts that marks its in-domain part (download.files.<pair>.train as a list), and bad target input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import SHARED_DATA, TINY, cli, error_lines, read
from mtprune.layout import RunLayout

# the tiny runs' target set: their valid split, a short fine-tuning (the default 300 updates cost seconds each time)
TARGET = ("score.target.split=valid", "score.target.updates=40")
DOMAIN = ("domain_xent_diff", "domain_grad", "domain_sim", "base_domain_xent", "domain_combined")


def score(run: Path, *sets: str, config: Path = TINY) -> tuple[int, str]:
    """`mtprune score` with each of ``sets`` as a --set override (``--overwrite`` passed as the flag)."""
    args = ["score", "-c", str(config), "--run-dir", str(run)]
    for s in sets:
        args += [s] if s.startswith("--") or "=" not in s else ["--set", s]
    return cli(*args)


def shard_json(run: Path) -> str:
    return (run / "04_score" / "shards" / "shard-0000-of-0001.json").read_text()


def test_target_split_adds_every_domain_column_and_a_changed_target_redoes_only_them(tiny_copy: Path) -> None:
    before = shard_json(tiny_copy)
    code, out = score(tiny_copy, *TARGET)
    assert code == 0, out
    table = pq.read_table(RunLayout(tiny_copy).scores)
    for c in DOMAIN:
        v = table.column(c).to_numpy()
        assert np.isfinite(v).all(), c
        assert v.std() > 0, c
    first = {c: table.column(c).to_numpy() for c in DOMAIN}
    el2n = table.column("el2n").to_numpy()
    assert shard_json(tiny_copy) == before  # the pass was kept: score.target is merge-only
    # the same settings again: the cached columns are read back
    code, out = score(tiny_copy, *TARGET, "--overwrite")
    assert code == 0, out
    assert "domain columns kept" in out
    before = shard_json(tiny_copy)  # --overwrite scores the pass again (same bytes), the domain cache is kept
    # fewer fine-tuning updates: domain_xent_diff changes, the pass and the other columns do not
    code, out = score(tiny_copy, *TARGET, "score.target.updates=20", "score.target.lr=0.002")
    assert code == 0, out
    assert "domain columns kept" not in out
    table = pq.read_table(RunLayout(tiny_copy).scores)
    assert not np.array_equal(table.column("domain_xent_diff").to_numpy(), first["domain_xent_diff"])
    for c in ("domain_grad", "domain_sim", "base_domain_xent"):
        assert np.array_equal(table.column(c).to_numpy(), first[c]), c
    assert np.array_equal(table.column("el2n").to_numpy(), el2n)
    assert shard_json(tiny_copy) == before


def test_domain_columns_are_the_same_bytes_when_computed_again(tiny_copy: Path) -> None:
    code, out = score(tiny_copy, *TARGET)
    assert code == 0, out
    first = pq.read_table(RunLayout(tiny_copy).scores).select(list(DOMAIN))
    for f in (tiny_copy / "04_score" / "shards").glob("domain*"):
        f.unlink() if f.is_file() else None
    code, out = score(tiny_copy, *TARGET, "--overwrite")
    assert code == 0, out
    assert "domain columns kept" not in out
    assert pq.read_table(RunLayout(tiny_copy).scores).select(list(DOMAIN)).equals(first)


def _target_files(tmp_path: Path, run: Path, n: int | None = None) -> tuple[Path, Path]:
    """The tiny run's valid split copied out as a user's target files (first ``n`` lines)."""
    out = []
    for lang in ("en", "de"):
        lines = read(run / "01_download" / "de-en" / f"valid.{lang}")[:n]
        p = tmp_path / f"target.{lang}"
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append(p)
    return out[0], out[1]


def _one_pair_tiny(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["download"]["pairs"] = ["de-en"]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def one_pair_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic de-en run through `score` (no target): (run, config)."""
    folder = tmp_path_factory.mktemp("domain-one")
    config = _one_pair_tiny(folder)
    for stage in ("download", "prepare", "proxy", "score"):
        code, out = cli(stage, "-c", str(config), "--run-dir", str(folder / "run"), "-q")
        assert code == 0, out
    return folder / "run", config


def test_target_files_with_one_side_give_the_ngram_column_only(one_pair_run: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    run, config = one_pair_run
    _, de = _target_files(tmp_path, run)
    code, out = score(run, "score.target.files={de-en: [" + str(de) + ", null]}", "--overwrite", config=config)
    assert code == 0, out
    table = pq.read_table(RunLayout(run).scores)
    assert {"base_domain_xent", "domain_combined"} <= set(table.column_names)
    assert not {"domain_xent_diff", "domain_grad", "domain_sim"} & set(table.column_names)
    assert np.isfinite(table.column("domain_combined").to_numpy()).all()
    # and a prune strategy naming a proxy domain column is refused before anything is pruned
    code, out = cli("prune", "-c", str(config), "--run-dir", str(run),
                    "--set", "score.target.files={de-en: [" + str(de) + ", null]}",
                    "--set", "prune.strategies=[domain_sim-high]")
    assert code != 0
    assert "domain_sim" in " ".join(error_lines(out))


@pytest.mark.parametrize("setting, expected", [
    ("score.target.files={en-fr: [a, b]}", "'en-fr' is not a pair of this run"),
    ("score.target.files={de-en: [/no/such/file, null]}", "score.target.files.de-en[0]: /no/such/file: file not found"),
    ("score.target.files={de-en: [null, null]}", "not both"),
])
def test_bad_target_settings_get_one_line(one_pair_run: tuple[Path, Path], setting: str, expected: str) -> None:
    run, config = one_pair_run
    before = (RunLayout(run).scores).read_bytes()
    code, out = score(run, setting, "--overwrite", config=config)
    assert code != 0
    lines = error_lines(out)
    assert len(lines) == 1 and expected in lines[0], out
    assert RunLayout(run).scores.read_bytes() == before  # nothing half-written


def test_target_files_that_are_not_line_aligned_or_empty_are_refused(one_pair_run: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    run, config = one_pair_run
    de, en = tmp_path / "t.de", tmp_path / "t.en"
    de.write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    en.write_text("one\ntwo\n", encoding="utf-8")
    code, out = score(run, f"score.target.files={{de-en: [{de}, {en}]}}", "--overwrite", config=config)
    assert code != 0 and "3 and 2 lines" in " ".join(error_lines(out)), out
    (tmp_path / "empty.de").write_text("\n\n", encoding="utf-8")
    code, out = score(run, f"score.target.files={{de-en: [{tmp_path / 'empty.de'}, null]}}", "--overwrite",
                      config=config)
    assert code != 0 and "no de sentences in the target text" in " ".join(error_lines(out)), out


# ---- real text of two domains ---------------------------------------------------------------------------

TATOEBA = SHARED_DATA / "tatoeba-opus100-layout" / "de-en"
MULTI30K = SHARED_DATA / "multi30k-ende"


def _two_domain_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["download"] = {
        "source": "files", "pairs": ["de-en"], "direction": "en-xx", "max_valid_per_pair": 300, "max_test_per_pair": 50,
        "files": {"de-en": {
            "train": [{"files": [str(TATOEBA / "opus.de-en-train.de"), str(TATOEBA / "opus.de-en-train.en")],
                       "max_pairs": 1200},
                      {"files": [str(MULTI30K / "train.de"), str(MULTI30K / "train.en")], "max_pairs": 400,
                       "in_domain": True}],
            "valid": [str(MULTI30K / "val.de"), str(MULTI30K / "val.en")],
            "test": [str(MULTI30K / "test.de"), str(MULTI30K / "test.en")]}}}
    cfg["prepare"]["vocab_size"] = 1000
    cfg["proxy"].update(checkpoints=[80, 160], warmup_updates=40)
    cfg["score"]["target"] = {"split": "valid", "updates": 50}
    path = tmp_path / "two-domains.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.skipif(not (TATOEBA.is_dir() and MULTI30K.is_dir()), reason="../shared/data (Tatoeba, Multi30K) absent")
def test_domain_columns_tell_captions_from_conversation_on_real_text(tmp_path: Path) -> None:
    config = _two_domain_config(tmp_path)
    run = tmp_path / "run"
    for stage in ("download", "prepare", "proxy", "score"):
        code, out = cli(stage, "-c", str(config), "--run-dir", str(run), "-q")
        assert code == 0, out
    layout = RunLayout(run)
    labels = dict(line.split("\t") for line in read(layout.domain_ids))
    assert len(labels) == 1600 and sum(v == "IN_DOMAIN" for v in labels.values()) == 400
    assert all(labels[f"de-en/{n}"] == ("IN_DOMAIN" if n >= 1200 else "general") for n in range(1600))
    summary = json.loads(layout.manifest("score").read_text())["stats"]["domain"]
    assert summary["in_domain"] == 400
    auroc = summary["auroc"]
    assert auroc["domain_combined"] >= 0.9, auroc
    assert auroc["base_domain_xent"] >= 0.9, auroc
    for c in ("domain_xent_diff", "domain_grad", "domain_sim"):
        assert auroc[c] > 0.6, auroc
    assert "Telling the target domain apart" in layout.score_domain.read_text()


# ---- a training pool of parts ----------------------------------------------------------------------------

def _parts_corpus(root: Path) -> dict[str, object]:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("general", 30), ("captions", 20), ("dev", 5), ("test", 5)):
        for lang in ("de", "en"):
            (root / f"{name}.{lang}").write_text("".join(f"{name} {lang} {i}\n" for i in range(n)), encoding="utf-8")
    return {"de-en": {"train": [{"files": [str(root / "general.de"), str(root / "general.en")]},
                                {"files": [str(root / "captions.de"), str(root / "captions.en")], "max_pairs": 8,
                                 "in_domain": True}],
                      "valid": [str(root / "dev.de"), str(root / "dev.en")],
                      "test": [str(root / "test.de"), str(root / "test.en")]}}


def _download_parts(run: Path, files: dict[str, object], *extra: str) -> tuple[int, str]:
    flow = yaml.safe_dump(files, default_flow_style=True, width=10_000).strip()
    return cli("download", "--run-dir", str(run), "-q", "--set", "download.source=files", "--set",
               "download.pairs=[de-en]", "--set", f"download.files={flow}", *extra)


def test_a_training_pool_of_parts_draws_its_parts_and_marks_the_in_domain_one(tmp_path: Path) -> None:
    files = _parts_corpus(tmp_path / "corpus")
    code, out = _download_parts(tmp_path / "run", files)
    assert code == 0, out
    layout = RunLayout(tmp_path / "run")
    en = read(layout.split_file("de-en", "train", "en"))
    ids = read(layout.download_ids("de-en"))
    assert len(en) == 38 and ids == [f"de-en/{n}" for n in range(38)]  # sentence ids run over the parts
    assert en[:30] == [f"general en {i}" for i in range(30)]
    drawn = [int(x.rsplit(" ", 1)[1]) for x in en[30:]]
    assert all(x.startswith("captions en ") for x in en[30:]) and drawn == sorted(drawn) and len(set(drawn)) == 8
    labels = [line.split("\t") for line in read(layout.domain_ids)]
    assert labels == [[f"de-en/{n}", "general" if n < 30 else "IN_DOMAIN"] for n in range(38)]
    # the same draw again; another download.seed draws other captions
    code, out = _download_parts(tmp_path / "again", files)
    assert read(RunLayout(tmp_path / "again").split_file("de-en", "train", "en")) == en
    code, out = _download_parts(tmp_path / "seed2", files, "--set", "download.seed=2")
    assert code == 0, out
    assert read(RunLayout(tmp_path / "seed2").split_file("de-en", "train", "en"))[30:] != en[30:]
    # without an in_domain part there is no domain.ids (and an earlier one is removed)
    files["de-en"]["train"][1]["in_domain"] = False  # type: ignore[index]
    code, out = _download_parts(tmp_path / "run", files)
    assert code == 0, out
    assert not layout.domain_ids.exists()


def test_bad_parts_get_one_line_naming_the_part(tmp_path: Path) -> None:
    files = _parts_corpus(tmp_path / "corpus")
    files["de-en"]["train"][1]["files"][0] = str(tmp_path / "nope.de")  # type: ignore[index]
    code, out = _download_parts(tmp_path / "run", files)
    assert code != 0
    assert error_lines(out) == [f"mtprune download: error: download.files.de-en.train[1].files[0]: "
                                f"{tmp_path / 'nope.de'}: file not found"]
    assert not (tmp_path / "run" / "01_download" / "de-en").exists()
    files = _parts_corpus(tmp_path / "corpus")
    files["de-en"]["train"][0] = {"file": ["a", "b"]}  # type: ignore[index]
    code, out = _download_parts(tmp_path / "run", files)
    assert code != 0
    assert "download.files.de-en.train[0].file: unknown key (known: files, in_domain, max_pairs)" in out


def test_domain_columns_from_score_shards_equal_the_one_pass(tiny_copy: Path, tiny_run: Path) -> None:
    """Scored as 2 `score --shard` jobs and merged, the domain columns are the one-process pass's."""
    code, out = score(tiny_copy, *TARGET)
    assert code == 0, out
    whole = pq.read_table(RunLayout(tiny_copy).scores).select(list(DOMAIN))
    for f in (tiny_copy / "04_score" / "shards").iterdir():
        f.unlink() if f.is_file() else None
    RunLayout(tiny_copy).manifest("score").unlink()
    for i in range(2):
        code, out = score(tiny_copy, *TARGET, "--shard", f"{i}/2")
        assert code == 0, out
    code, out = score(tiny_copy, *TARGET)
    assert code == 0, out
    assert "merging 2 finished shards" in out
    merged = pq.read_table(RunLayout(tiny_copy).scores).select(list(DOMAIN)).to_pandas()
    whole = whole.to_pandas()
    # other batch compositions change the pass's float32 sums in the last digits (test_score.py's shard test); the
    # pooled states are float16, so domain_sim may move by a float16 step; domain_combined by a rank or two
    for c in ("domain_xent_diff", "domain_grad", "base_domain_xent"):
        assert np.allclose(merged[c], whole[c], rtol=1e-5, atol=1e-5), c
    assert (merged["domain_sim"] - whole["domain_sim"]).abs().max() <= 1e-3
    assert (merged["domain_combined"] - whole["domain_combined"]).abs().max() <= 4 / len(whole)


def test_baseline_slices_and_the_domain_columns_go_together(tiny_copy: Path) -> None:
    """`score --baselines I/N` jobs (the base_* columns on CPUs) beside score.target: the merge reads their columns
    and adds the domain columns; base_domain_xent stays out of the baselines' slices and of base_all."""
    sets = (*TARGET, "score.baselines=true")
    for i in range(2):
        code, out = score(tiny_copy, *sets, "--baselines", f"{i}/2")
        assert code == 0, out
    code, out = score(tiny_copy, *sets)
    assert code == 0, out
    assert "base_from_shards" in out, out  # the merge assembled the slices' columns
    table = pq.read_table(RunLayout(tiny_copy).scores)
    assert {"base_all", "base_wordalign_src", *DOMAIN} <= set(table.column_names)
    slices = [pq.read_table(p) for p in sorted((tiny_copy / "04_score" / "shards").glob("baselines-*-of-0002.parquet"))]
    assert slices and all("base_domain_xent" not in t.column_names for t in slices)
