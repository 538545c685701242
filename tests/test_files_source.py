"""download.source: files — a user's own plain-text (or gzip) parallel corpus, here an en-nl pair that
is none of the four defaults: cleaning, sentence ids, bad input, and a whole tiny sweep + export."""

import gzip
import json
from pathlib import Path

import pytest

from conftest import TINY, cli, cli_subprocess, download, error_lines, read
from mtprune.config import load_config
from mtprune.curves import read_curves
from mtprune.errors import ConfigError
from mtprune.layout import RunLayout

WORDS = {"en": "the cat sees a dog near house river tree".split(),
         "nl": "de kat ziet een hond bij huis rivier boom".split()}


def sentence(i: int, lang: str) -> str:
    w = WORDS[lang]
    return " ".join(w[(i * (k + 3)) % len(w)] for k in range(3 + i % 5)) + f" {i}"


def write_corpus(root: Path, n_train: int = 300, n_eval: int = 40, gz_train: bool = True) -> dict[str, list[str]]:
    """en-nl files with a few lines that cleaning must fold or drop; returns download.files' entry."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for split, n, off in (("train", n_train, 0), ("valid", n_eval, 10_000), ("test", n_eval, 20_000)):
        files[split] = []
        for lang in ("en", "nl"):
            lines = [sentence(off + i, lang) for i in range(n)]
            if split == "train":
                lines[3] = "  " + lines[3].replace(" ", "\t ") + "  "  # whitespace that cleaning folds
                if lang == "nl":
                    lines[5] = ""  # an empty side: the pair is dropped, its line number is skipped
            text = "\n".join(lines) + "\n"
            path = root / f"{split}.{lang}" if not (gz_train and split == "train") else root / f"{split}.{lang}.gz"
            if path.suffix == ".gz":
                with gzip.open(path, "wt", encoding="utf-8") as f:
                    f.write(text)
            else:
                path.write_text(text, encoding="utf-8")
            files[split].append(str(path))
    return files


def files_sets(files: dict[str, list[str]]) -> list[str]:
    return ["download.source=files", "download.pairs=[en-nl]", f"download.files={json.dumps({'en-nl': files})}"]


def raw_lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f]


def test_plain_and_gzip_files_are_cleaned_with_ids_by_line(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", n_train=30, n_eval=8)
    run = tmp_path / "run"
    code, out = download(run, *files_sets(files))
    assert code == 0, out
    L = RunLayout(run)
    ids = read(L.download_ids("en-nl"))
    assert "en-nl/5" not in ids and len(ids) == 29 and ids[:2] == ["en-nl/0", "en-nl/1"]
    raw_en, raw_nl = raw_lines(files["train"][0]), raw_lines(files["train"][1])
    for sid, en, nl in zip(ids, read(L.split_file("en-nl", "train", "en")), read(L.split_file("en-nl", "train", "nl")),
                           strict=True):
        n = int(sid.split("/")[1])
        assert (en, nl) == (" ".join(raw_en[n].split()), " ".join(raw_nl[n].split()))
    assert read(L.split_file("en-nl", "test", "nl")) == raw_lines(files["test"][1])
    # editing one of the user's files makes the download stale, naming the file
    Path(files["valid"][1]).write_text("een\n" * 8, encoding="utf-8")
    code, out = cli("status", "--run-dir", str(run), *[a for s in files_sets(files) for a in ("--set", s)])
    assert "download  stale" in out and files["valid"][1] in out, out


def test_missing_file_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", n_train=20, n_eval=5)
    Path(files["valid"][1]).unlink()
    run = tmp_path / "run"
    code, out = download(run, *files_sets(files))
    assert code == 2, out
    assert error_lines(out) == [f"mtprune download: error: download.files.en-nl.valid[1]: {files['valid'][1]}: "
                                "file not found"]
    assert not RunLayout(run).stage_dir("download").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_sentence(tmp_path: Path) -> None:
    """A UTF-8 BOM at the start of a file (plain or gzip, either side) is dropped like a line's \\r; one
    elsewhere in the file is text and stays."""
    from mtprune.sources import read_files

    files = write_corpus(tmp_path / "corpus", n_train=20, n_eval=5)
    plain = list(read_files(files["train"]))
    for side in (0, 1):
        marked = tmp_path / f"bom{side}" / Path(files["train"][side]).name
        marked.parent.mkdir()
        with gzip.open(marked, "wb") as f:
            f.write("\ufeff".encode() + gzip.decompress(Path(files["train"][side]).read_bytes()))
        pair = list(files["train"])
        pair[side] = str(marked)
        assert list(read_files(pair)) == plain
    for side in (0, 1):  # plain text, and a BOM on both sides
        test = [Path(f) for f in files["test"]]
        marked = tmp_path / f"plain{side}"
        marked.mkdir()
        both = [marked / t.name for t in test]
        for t, m in zip(test, both, strict=True):
            m.write_bytes(b"\xef\xbb\xbf" + t.read_bytes() + "\ufeffinside\n".encode())
        rows = list(read_files([str(b) for b in both]))
        assert rows[:-1] == list(read_files(files["test"])) and rows[0][0][0] != "\ufeff"
        assert rows[-1] == ("\ufeffinside", "\ufeffinside")


def test_one_file_for_both_sides_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", n_train=20, n_eval=5, gz_train=False)
    same = {**files, "valid": [files["valid"][0], files["valid"][0]]}
    run = tmp_path / "run"
    code, out = download(run, *files_sets(same))
    assert code == 2, out
    assert error_lines(out) == [f"mtprune download: error: download.files.en-nl.valid: {files['valid'][0]} is given "
                                "for both sides; give the en file, then the nl file"]
    assert not RunLayout(run).stage_dir("download").exists()
    # the same file under two names (a link, a relative path) is the same file
    link = tmp_path / "corpus" / "train-link.nl"
    link.symlink_to(files["train"][0])
    code, out = download(run, *files_sets({**files, "train": [files["train"][0], str(link)]}))
    assert code == 2, out
    assert error_lines(out) == [f"mtprune download: error: download.files.en-nl.train: {files['train'][0]} and "
                                f"{link} are the same file; give the en file, then the nl file"]
    assert not RunLayout(run).stage_dir("download").exists()


def test_line_count_mismatch_names_the_file(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", n_train=20, n_eval=5, gz_train=False)
    with open(files["train"][1], "a", encoding="utf-8") as f:
        f.write("een extra regel\n")
    run = tmp_path / "run"
    code, out = download(run, *files_sets(files))
    assert code == 2, out
    assert len(error_lines(out)) == 1, out
    assert f"{files['train'][0]}: has 20 lines but {files['train'][1]} has 21" in out
    assert not RunLayout(run).manifest("download").exists()


def test_damaged_gzip_names_the_file(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", n_train=20, n_eval=5)
    bad = Path(files["train"][1])
    bad.write_bytes(bad.read_bytes()[:-12])  # cut short: gzip's end-of-stream marker is gone
    code, out = download(tmp_path / "run", *files_sets(files))
    assert code == 2, out
    assert len(error_lines(out)) == 1, out
    assert f"{bad}: not a readable gzip file" in out


def test_files_config_problems_are_listed_together() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["download.source=files", "download.pairs=[en-nl, de-fr]",
                           "download.files={en-nl: {train: [a.en], valid: [b.en, b.nl], test: [c.en, c.nl]}, "
                           "en-pt: {train: [a, b], valid: [a, b], test: [a, b]}}"])
    assert set(e.value.problems) == {
        "download.pairs: 'de-fr' has no English side: mtprune trains English-centric directions "
        "(download.direction)",
        "download.files.en-nl.train: needs two files, one per side of the pair, got 1",
    }
    with pytest.raises(ConfigError) as e:
        load_config(None, ["download.source=files", "download.pairs=[en-nl]",
                           "download.files={en-pt: {train: [a, b], valid: [a, b], test: [a, b]}}"])
    assert set(e.value.problems) == {
        "download.files: no files for pair en-nl (download.source is files)",
        "download.files: files for 'en-pt', which is not in download.pairs (en-nl)",
    }


@pytest.mark.slow
def test_sweep_on_a_new_pair_from_plain_files_then_export(tmp_path: Path) -> None:
    """Done-when of issue 13: an en-nl corpus from plain files through every stage, then `mtprune export`;
    every exported line is checked against the user's raw file by sentence id; the report draws the
    training curves from fairseq's logs and TensorBoard event files sit beside every run."""
    files = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    sets = [*files_sets(files), "proxy.seeds=[1]", "prune.strategies=[el2n-high]"]
    args = [a for s in sets for a in ("--set", s)]
    p = cli_subprocess("sweep", "-c", str(TINY), "--run-dir", str(run), "-q", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    L = RunLayout(run)
    results = read(L.report_file("results.csv"))
    assert any(",en-nl," in r for r in results) and any(",all," in r for r in results)

    code, out = cli("export", "-c", str(TINY), "--run-dir", str(run), "-q", *args)
    assert code == 0, out
    raw = {lang: raw_lines(f) for lang, f in zip(("en", "nl"), files["train"], strict=True)}
    ids = read(L.export_ids("el2n-high-0.2", "en-nl"))
    assert set(ids) == set(read(L.kept_ids("el2n-high-0.2")))
    assert len(ids) == round(0.8 * len(read(L.download_ids("en-nl"))))
    for lang in ("en", "nl"):
        for sid, line in zip(ids, read(L.export_file("el2n-high-0.2", "en-nl", lang)), strict=True):
            assert line == " ".join(raw[lang][int(sid.split("/")[1])].split()), (sid, lang)

    assert L.report_file("training_curves.png").stat().st_size > 10_000
    assert "training_curves.png" in json.loads(L.manifest("report").read_text())["outputs"]
    for folder in (L.proxy_seed_dir(1), L.train_dir("full"), L.train_dir("el2n-high-0.2")):
        curves = read_curves(folder / "train.log")
        assert (curves["train"] or curves["epoch"]) and curves["valid"], folder
        assert all(0 < loss < 20 for _, loss in curves["train"] + curves["epoch"] + curves["valid"])
        assert list((folder / "tb").rglob("events.out.tfevents.*")), folder


# ---- training logs: TensorBoard always, Weights & Biases only when asked (fairseq's own flags) ----

def test_fairseq_reads_the_tensorboard_dir_and_wandb_only_when_set() -> None:
    from mtprune.config import is_speed_only
    from mtprune.fairseq_backend import parse_train_argv, train_argv
    from mtprune.stages import proxy as proxy_stage
    from mtprune.stages import train as train_stage

    for wandb in (None, "my-project"):
        sets = [] if wandb is None else [f"launch.wandb_project={wandb}"]
        cfg = load_config(TINY, sets)
        for schedule in (proxy_stage.schedule(cfg, 1), train_stage.schedule(cfg)):
            args = parse_train_argv(train_argv(Path("data-bin"), Path("save"), cfg.model, schedule, False))
            assert args.tensorboard_logdir == "save/tb"
            assert args.wandb_project == wandb
    assert is_speed_only("launch.wandb_project") and is_speed_only("download.cache_dir")
