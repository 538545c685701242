import os
from pathlib import Path

import pytest

from conftest import SHARED_DATA, cli, download, error_lines, read, write_parquet, write_release
from mtprune.layout import RunLayout


def test_release_layout(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{local_corpus}", "download.pairs=[de-en,en-fr]")
    assert code == 0, out
    L = RunLayout(run)
    assert len(read(L.split_file("de-en", "train", "de"))) == 60
    assert read(L.download_ids("de-en"))[:3] == ["de-en/0", "de-en/1", "de-en/2"]
    assert read(L.split_file("en-fr", "valid", "fr")) == read(local_corpus / "en-fr" / "opus.en-fr-dev.fr")
    assert L.manifest("download").is_file()


def test_parquet_layout_gives_the_same_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_release(tmp_path / "rel", "en-it")
    write_parquet(tmp_path / "pq", "en-it")
    assert download(a, f"download.source=local:{tmp_path / 'rel'}", "download.pairs=[en-it]")[0] == 0
    assert download(b, f"download.source=local:{tmp_path / 'pq'}", "download.pairs=[en-it]")[0] == 0
    for split in ("train", "valid", "test"):
        for lang in ("en", "it"):
            assert read(RunLayout(a).split_file("en-it", split, lang)) == read(RunLayout(b).split_file("en-it", split, lang))


def test_sentence_ids_count_raw_lines_before_cleaning_and_subsampling(tmp_path: Path) -> None:
    root = tmp_path / "opus"
    write_release(root, "de-en", n_train=50)
    de = root / "de-en" / "opus.de-en-train.de"
    lines = read(de)
    lines[3] = "   "          # empty side -> dropped
    lines[7] = "x " * 300      # too long -> dropped
    test_de = read(root / "de-en" / "opus.de-en-test.de")[0]
    test_en = read(root / "de-en" / "opus.de-en-test.en")[0]
    lines[9] = test_de         # also in the test set -> dropped
    en = read(root / "de-en" / "opus.de-en-train.en")
    en[9] = test_en
    de.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "de-en" / "opus.de-en-train.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", "download.pairs=[de-en]", "download.max_words=100")
    assert code == 0, out
    L = RunLayout(run)
    ids = read(L.download_ids("de-en"))
    assert "de-en/3" not in ids and "de-en/7" not in ids and "de-en/9" not in ids
    assert len(ids) == 47
    raw_de = read(de)
    kept_de = read(L.split_file("de-en", "train", "de"))
    for sid, text in zip(ids, kept_de, strict=True):
        assert raw_de[int(sid.split("/")[1])].strip() == text
    import json

    stats = json.loads(L.manifest("download").read_text())["stats"]["pairs"]["de-en"]["train"]
    assert stats["empty_side"] == 1 and stats["too_long"] == 1 and stats["in_test_set"] == 1


def test_subsample_is_seeded_and_keeps_source_order(tmp_path: Path, local_corpus: Path) -> None:
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run = tmp_path / name
        code, out = download(run, f"download.source=local:{local_corpus}", "download.pairs=[de-en]",
                             "download.max_train_per_pair=20", f"download.seed={seed}")
        assert code == 0, out
        outs.append(read(RunLayout(run).download_ids("de-en")))
    assert outs[0] == outs[1] != outs[2]
    assert len(outs[0]) == 20
    nums = [int(s.split("/")[1]) for s in outs[0]]
    assert nums == sorted(nums)


def test_crlf_and_missing_final_newline_are_read(tmp_path: Path) -> None:
    root = tmp_path / "opus"
    write_release(root, "de-en", n_train=12)
    for lang in ("de", "en"):
        p = root / "de-en" / f"opus.de-en-train.{lang}"
        p.write_bytes(p.read_text().rstrip("\n").replace("\n", "\r\n").encode())
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", "download.pairs=[de-en]")
    assert code == 0, out
    lines = read(RunLayout(run).split_file("de-en", "train", "de"))
    assert len(lines) == 12 and not any("\r" in ln for ln in lines)


def test_direction_both_is_accepted(tmp_path: Path, local_corpus: Path) -> None:
    code, out = download(tmp_path / "r", f"download.source=local:{local_corpus}", "download.pairs=[de-en]",
                         "download.direction=both")
    assert code == 0, out


@pytest.mark.skipif(not (SHARED_DATA / "opus100-real-sample").is_dir(), reason="shared data not present")
def test_real_opus100_lines(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{SHARED_DATA / 'opus100-real-sample'}")
    assert code == 0, out
    L = RunLayout(run)
    for pair in ("de-en", "en-es", "en-fr", "en-it"):
        a, b = pair.split("-")
        n = len(read(L.download_ids(pair)))
        assert 1 <= n <= 2
        assert len(read(L.split_file(pair, "train", a))) == n == len(read(L.split_file(pair, "train", b)))
        raw = read(SHARED_DATA / "opus100-real-sample" / pair / f"opus.{pair}-train.{a}")
        for sid, line in zip(read(L.download_ids(pair)), read(L.split_file(pair, "train", a)), strict=True):
            assert " ".join(raw[int(sid.split("/")[1])].split()) == line


def test_hub_source_reads_the_hub_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cannot be reached here: stand in for `datasets.load_dataset` with the hub's row format."""
    import datasets

    from conftest import sentence

    calls = []

    def fake_load(name: str, config: str, split: str, cache_dir: str | None = None):
        calls.append((name, config, split))
        a, b = config.split("-")
        off = {"train": 0, "validation": 100, "test": 200}[split]
        return datasets.Dataset.from_list([{"translation": {a: sentence(off + i, a), b: sentence(off + i, b)}}
                                           for i in range(15)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    code, out = download(tmp_path / "r", "download.source=hub", "download.pairs=[en-es]")
    assert code == 0, out
    assert ("Helsinki-NLP/opus-100", "en-es", "train") in calls
    assert ("Helsinki-NLP/opus-100", "en-es", "validation") in calls
    assert len(read(RunLayout(tmp_path / "r").download_ids("en-es"))) >= 1


def test_unreachable_hub_is_one_line_naming_local_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Helsinki-NLP/opus-100' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, out = download(tmp_path / "r", "download.pairs=[de-en]")
    assert code == 1
    assert len(error_lines(out)) == 1
    assert "download.source=local:DIR" in out
    assert not RunLayout(tmp_path / "r").manifest("download").exists()


def test_a_hub_that_refuses_connections_is_one_line_without_retry_warnings(tmp_path: Path) -> None:
    """The real datasets / huggingface_hub against a port that refuses connections (not offline mode: that is
    another path). huggingface_hub retries five times, warning each time through two handlers; only mtprune's
    line may reach the user. Its backoff sleeps (about 23 s) are skipped in the child: what is printed does not
    depend on them."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    closed = socket.socket()  # bound, never listening: a connection is refused, and no one else gets the port
    closed.bind(("127.0.0.1", 0))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    child = ("import time, types, huggingface_hub.utils._http as h; "
             "h.time = types.SimpleNamespace(sleep=lambda s: None, time=time.time, monotonic=time.monotonic); "
             "from mtprune.cli import main; main(prog_name='mtprune')")
    run = tmp_path / "run"
    try:
        p = subprocess.run([sys.executable, "-c", child, "download", "--run-dir", str(run), "-q",
                            "--set", "download.source=hub", "--set", "download.pairs=[de-en]"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    finally:
        closed.close()
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("mtprune download: error: cannot load Helsinki-NLP/opus-100 (de-en, test) from the "
                               "Hugging Face hub: Couldn't reach"), p.stderr
    assert "download.source=local:DIR" in lines[0] and p.stdout == ""
    assert not RunLayout(run).manifest("download").exists()


def test_what_the_hub_libraries_log_is_shown_after_a_load_that_succeeds(monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    import datasets

    from conftest import sentence
    from mtprune.errors import StageError
    from mtprune.sources import read_hub

    def load(name: str, config: str, split: str, cache_dir: str | None = None, fail: bool = False):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        warnings.warn("a warning of datasets", UserWarning, stacklevel=1)
        if fail:
            raise ConnectionError("Couldn't reach 'Helsinki-NLP/opus-100' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_list([{"translation": {"de": sentence(i, "de"), "en": sentence(i, "en")}}
                                           for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.warns(UserWarning, match="a warning of datasets"):
        assert len(list(read_hub("de-en", "test"))) == 3
    assert [r.getMessage() for r in caplog.records] == ["Retrying in 1s [Retry 1/5]."]
    caplog.clear()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: load(*a, **k, fail=True))
    with warnings.catch_warnings(record=True) as seen, pytest.raises(StageError, match="Couldn't reach"):
        warnings.simplefilter("always")
        list(read_hub("de-en", "test"))
    assert caplog.records == [] and seen == []
    assert logging.getLogger("huggingface_hub").propagate  # put back as it was


# ---- bad input: exit 2, one line naming the file (and line), no manifest -----------------------

def _bad(tmp_path: Path, root: Path, pairs: str = "[de-en]") -> str:
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", f"download.pairs={pairs}")
    assert code == 2, out
    assert len(error_lines(out)) == 1, out
    assert not RunLayout(run).manifest("download").exists()
    return out


def test_mismatched_line_counts(tmp_path: Path) -> None:
    root = write_release(tmp_path / "opus", "de-en", n_train=10)
    p = root / "de-en" / "opus.de-en-train.en"
    p.write_text(p.read_text() + "one more line\n")
    out = _bad(tmp_path, root)
    assert "opus.de-en-train.de: has 10 lines but" in out and "has 11" in out


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    root = write_release(tmp_path / "opus", "de-en", n_train=10)
    p = root / "de-en" / "opus.de-en-train.de"
    lines = p.read_bytes().split(b"\n")
    lines[4] = b"caf\xe9 au lait"
    p.write_bytes(b"\n".join(lines))
    out = _bad(tmp_path, root)
    assert "opus.de-en-train.de: line 5: invalid UTF-8" in out


def test_missing_split(tmp_path: Path) -> None:
    root = write_release(tmp_path / "opus", "de-en")
    (root / "de-en" / "opus.de-en-dev.en").unlink()
    out = _bad(tmp_path, root)
    assert "opus.de-en-dev.en: file not found" in out


def test_missing_pair_folder(tmp_path: Path) -> None:
    root = write_release(tmp_path / "opus", "de-en")
    out = _bad(tmp_path, root, "[de-en,en-fr]")
    assert "en-fr: pair folder not found" in out


def test_unknown_pair(tmp_path: Path, local_corpus: Path) -> None:
    out = _bad(tmp_path, local_corpus, "[en-xx]")
    assert "unknown pair 'en-xx': OPUS-100 pairs English with one of its 99 languages" in out
    out = _bad(tmp_path, local_corpus, "[de-fr]")
    assert "'de-fr' is in OPUS-100 as a test set only (no training data)" in out
    out = _bad(tmp_path, local_corpus, "[nl-en]")
    assert "unknown pair 'nl-en': OPUS-100 names it en-nl" in out


def test_any_opus100_pair_is_read(tmp_path: Path) -> None:
    """Not only the four default pairs: a local copy with en-nl and af-en (stand-in text: what matters
    is the pairs' names and the release layout)."""
    from mtprune.config import OPUS100_PAIRS

    assert len(OPUS100_PAIRS) == 99 and {"de-en", "en-nl", "af-en", "en-zh"} <= set(OPUS100_PAIRS)
    root = tmp_path / "opus"
    for old, new, lang, new_lang in (("en-fr", "en-nl", "fr", "nl"), ("de-en", "af-en", "de", "af")):
        write_release(root, old)
        (root / new).mkdir()
        for f in (root / old).iterdir():
            suffix = new_lang if f.suffix == f".{lang}" else f.suffix[1:]
            f.rename(root / new / f"{f.stem.replace(old, new)}.{suffix}")
    run = tmp_path / "run"
    code, out = download(run, f"download.source=local:{root}", "download.pairs=[en-nl,af-en]")
    assert code == 0, out
    L = RunLayout(run)
    assert read(L.download_ids("en-nl"))[0] == "en-nl/0" and len(read(L.split_file("af-en", "train", "af"))) == 60


# ---- the hub: cache_dir, offline mode, a pair the hub lacks (the hub call itself is stood in for) ----

def test_hub_cache_dir_is_passed_and_does_not_make_the_download_stale(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from conftest import sentence

    caches = set()

    def fake_load(name: str, config: str, split: str, cache_dir: str | None = None):
        caches.add(cache_dir)
        a, b = config.split("-")
        off = {"train": 0, "validation": 100, "test": 200}[split]
        return datasets.Dataset.from_list([{"translation": {a: sentence(off + i, a), b: sentence(off + i, b)}}
                                           for i in range(15)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    run = tmp_path / "r"
    code, out = download(run, "download.pairs=[en-es]", f"download.cache_dir={tmp_path / 'hf'}")
    assert code == 0, out
    assert caches == {str(tmp_path / "hf")}
    code, out = cli("status", "--run-dir", str(run), "--set", "download.pairs=[en-es]",
                    "--set", f"download.cache_dir={tmp_path / 'elsewhere'}")
    assert "download  fresh" in out, out


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_and_not_cached_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """datasets' real answer: with HF_DATASETS_OFFLINE=1 and an empty cache it raises ConnectionError."""
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Helsinki-NLP/opus-100' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    code, out = download(tmp_path / "r", "download.pairs=[en-nl]", f"download.cache_dir={tmp_path / 'hf'}")
    assert code == 1, out
    assert len(error_lines(out)) == 1, out
    assert "offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set) and not cached in " + str(tmp_path / "hf") in out
    assert not RunLayout(tmp_path / "r").manifest("download").exists()


def test_a_pair_the_hub_lacks_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_config(name: str, config: str, split: str, cache_dir: str | None = None):
        # datasets' own wording (builder.py) when a dataset has no such config
        raise ValueError(f"BuilderConfig '{config}' not found. Available: ['af-en', 'am-en']")

    monkeypatch.setattr(datasets, "load_dataset", no_config)
    code, out = download(tmp_path / "r", "download.pairs=[en-nl]")
    assert code == 2, out
    assert len(error_lines(out)) == 1, out
    assert "download.pairs: Helsinki-NLP/opus-100 on the Hugging Face hub has no 'en-nl'" in out


def test_empty_after_cleaning(tmp_path: Path) -> None:
    root = write_release(tmp_path / "opus", "de-en", n_train=5)
    (root / "de-en" / "opus.de-en-train.de").write_text("\n" * 5)
    out = _bad(tmp_path, root)
    assert "no training pairs left after cleaning" in out


def test_prepare_before_download(tmp_path: Path) -> None:
    code, out = cli("prepare", "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert "run `mtprune download` first" in out
    assert len(error_lines(out)) == 1


@pytest.mark.parametrize("source", ["local", "hub"])
def test_wrong_language_noise_without_a_third_language(tmp_path: Path, source: str) -> None:
    """One pair, and the source has no other pair to take a third language from (the hub is never read)."""
    root = write_release(tmp_path / "opus", "de-en", n_train=20)
    run = tmp_path / "run"
    src = f"local:{root}" if source == "local" else "hub"
    code, out = download(run, f"download.source={src}", "download.pairs=[de-en]", "download.noise.rate=0.1")
    assert code == 2, out
    assert len(error_lines(out)) == 1, out
    assert "download.noise.kinds: wrong_language needs sentences in a third language" in out
    assert not RunLayout(run).manifest("download").exists()
    if source == "local":  # without wrong_language the same download is fine
        code, out = download(run, f"download.source={src}", "download.pairs=[de-en]", "download.noise.rate=0.1",
                             "download.noise.kinds=[truncated]")
        assert code == 0, out


def test_a_local_copy_under_home_is_an_input_of_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtprune.config import load_config
    from mtprune.stages.download import external_inputs

    monkeypatch.setenv("HOME", str(tmp_path))
    write_release(tmp_path / "opus", "de-en")
    cfg = load_config(None, ["download.source=local:~/opus", "download.pairs=[de-en]"])
    files = external_inputs(cfg)  # editing the copy makes download stale, as for an absolute path
    assert str(tmp_path / "opus" / "de-en" / "opus.de-en-train.de") in files and len(files) == 6


def _hub_parquet(root: Path, n_train: int) -> Path:
    """OPUS-100's hub parquet layout for en-es, ``n_train`` training rows of varied lengths (row groups of
    100k rows, as large as the hub's files use), 300 valid and test rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "en-es"
    d.mkdir(parents=True)
    for split, n, off in (("train", n_train, 0), ("validation", 300, 10**8), ("test", 300, 2 * 10**8)):
        en = pa.array([f"sentence {off + i} of {'many ' * (i % 9)}words" for i in range(n)])
        es = pa.array([f"frase {off + i} de {'muchas ' * (i % 7)}palabras" for i in range(n)])
        table = pa.table({"translation": pa.StructArray.from_arrays([en, es], names=["en", "es"])})
        pq.write_table(table, d / f"{split}-00000-of-00001.parquet", row_group_size=100_000)
    return root


def _download_peak_mib(root: Path, run: Path) -> tuple[float, str]:
    """`mtprune download` of 5,000 pairs drawn from the local copy, in a child; its peak RSS in MiB."""
    import subprocess
    import sys

    from conftest import ROOT

    # VmHWM, the peak of this process's own memory: getrusage's ru_maxrss would start from the parent's peak,
    # which an exec does not reset
    child = ("import atexit; from mtprune.cli import main; "
             "atexit.register(lambda: print('peak', [l.split()[1] for l in open('/proc/self/status') "
             "if l.startswith('VmHWM')][0])); "
             "main(prog_name='mtprune')")
    p = subprocess.run([sys.executable, "-c", child, "download", "--run-dir", str(run), "-q",
                        "--set", f"download.source=local:{root}", "--set", "download.pairs=[en-es]",
                        "--set", "download.max_train_per_pair=5000"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split("peak")[-1]) / 1024, p.stdout


@pytest.mark.slow
def test_a_million_row_pair_is_downloaded_in_bounded_memory(tmp_path: Path) -> None:
    """The training split streams from the Arrow batches to disk and is drawn from there: a million rows
    (~90 MB of text) cost no more memory than ten thousand. Held as Python tuples of strings they took
    ~300 MB more."""
    small, _ = _download_peak_mib(_hub_parquet(tmp_path / "small", 10_000), tmp_path / "r-small")
    big, _ = _download_peak_mib(_hub_parquet(tmp_path / "big", 1_000_000), tmp_path / "r-big")
    assert big - small < 60, (small, big)
    layout = RunLayout(tmp_path / "r-big")
    ids = read(layout.download_ids("en-es"))
    assert len(ids) == 5000 and len(read(layout.split_file("en-es", "train", "es"))) == 5000
    n = [int(s.split("/")[1]) for s in ids]
    assert n == sorted(n) and n[-1] > 900_000  # drawn over the whole split, in source order
    assert read(layout.split_file("en-es", "train", "en"))[7] == f"sentence {n[7]} of {'many ' * (n[7] % 9)}words"


@pytest.mark.parametrize("var", ["HF_HOME", "HF_DATASETS_CACHE"])
def test_offline_message_names_the_cache_folder_the_environment_chose(tmp_path: Path, var: str) -> None:
    """With HF_HOME or HF_DATASETS_CACHE moving datasets' cache, the offline message names that folder, where
    datasets really looked, not ~/.cache. The real datasets library in a child (it reads them when imported)."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")}
    env.update({var: str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    p = subprocess.run([sys.executable, "-m", "mtprune", "download", "--run-dir", str(tmp_path / "run"), "-q",
                        "--set", "download.source=hub", "--set", "download.pairs=[de-en]"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    folder = tmp_path / "hf" / "datasets" if var == "HF_HOME" else tmp_path / "hf"
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"and not cached in {folder};" in p.stderr and "~/.cache" not in p.stderr, p.stderr
