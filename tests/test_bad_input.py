"""The bad-input catalogue of the README: each row gives one clear line, the right exit code,
nothing half-written, and leaves the previous good artifacts untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cli, error_lines, write_release
from mtprune.layout import RunLayout


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A corpus on disk and a run whose download already succeeded from it."""
    src = tmp_path / "opus"
    write_release(src, "de-en", n_train=30)
    run = tmp_path / "run"
    sets = ["--set", f"download.source=local:{src}", "--set", "download.pairs=[de-en]", "--run-dir", str(run)]
    code, out = cli("download", *sets, "-q")
    assert code == 0, out
    return src, run, sets


def _lines(p: Path) -> list[bytes]:
    return p.read_bytes().split(b"\n")


def non_utf8(src: Path) -> None:
    f = src / "de-en" / "opus.de-en-train.de"
    lines = _lines(f)
    lines[2] = b"gr\xfc\xdf gott"
    f.write_bytes(b"\n".join(lines))


def mismatched(src: Path) -> None:
    f = src / "de-en" / "opus.de-en-train.en"
    f.write_bytes(f.read_bytes() + b"an extra line\n")


def missing_split(src: Path) -> None:
    (src / "de-en" / "opus.de-en-test.de").unlink()


def all_empty(src: Path) -> None:
    (src / "de-en" / "opus.de-en-train.en").write_bytes(b"\n" * 30)


# (id, change to the source corpus or None, extra CLI args, exit code, text the one error line must hold)
FAILING: list[tuple[str, Callable[[Path], None] | None, list[str], int, str]] = [
    ("non-utf8", non_utf8, [], 2, "opus.de-en-train.de: line 3: invalid UTF-8"),
    ("mismatched-lines", mismatched, [], 2, "opus.de-en-train.de: has 30 lines but"),
    ("missing-split", missing_split, [], 2, "opus.de-en-test.de: file not found"),
    ("empty-after-cleaning", all_empty, [], 2, "no training pairs left after cleaning"),
    ("unknown-pair", None, ["--set", "download.pairs=[en-xx]"], 2, "download.pairs: unknown pair 'en-xx'"),
    ("sparsity-out-of-range", None, ["--set", "prune.sparsities=[0.2,1.0]"], 2, "1.0 is outside [0, 1)"),
    ("duplicate-sparsities", None, ["--set", "prune.sparsities=[0.2,0.2]"], 2, "prune.sparsities: duplicate"),
    ("unknown-strategy", None, ["--set", "prune.strategies=[el2n-middle]"], 2, "unknown strategy 'el2n-middle'"),
    ("unknown-key", None, ["--set", "prune.sparsity=[0.2]"], 2, "prune.sparsity: unknown key"),
    ("wrong-type", None, ["--set", "train.max_update=many"], 2, "train.max_update: expected an integer"),
]


@pytest.mark.parametrize("name,change,args,code,text", FAILING, ids=[r[0] for r in FAILING])
def test_failing_input(name: str, change: Callable[[Path], None] | None, args: list[str], code: int, text: str,
                       good: tuple[Path, Path, list[str]]) -> None:
    src, run, sets = good
    before = tree_digest(RunLayout(run).stage_dir("download"))
    if change is not None:
        change(src)
    got, out = cli("download", *sets, *args)
    assert got == code, out
    errors = error_lines(out)
    assert len(errors) == 1 and text in errors[0], out
    assert tree_digest(RunLayout(run).stage_dir("download")) == before  # last good artifacts untouched
    assert not list(run.rglob("*.tmp")) and not list(run.glob("*.previous"))


def crlf(src: Path) -> None:
    for lang in ("de", "en"):
        f = src / "de-en" / f"opus.de-en-train.{lang}"
        f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))


def no_final_newline(src: Path) -> None:
    for lang in ("de", "en"):
        f = src / "de-en" / f"opus.de-en-train.{lang}"
        f.write_bytes(f.read_bytes().rstrip(b"\n"))


def empty_lines(src: Path) -> None:
    f = src / "de-en" / "opus.de-en-train.de"
    lines = _lines(f)
    lines[4] = lines[9] = b""
    f.write_bytes(b"\n".join(lines))


def megabyte_line(src: Path) -> None:
    f = src / "de-en" / "opus.de-en-train.en"
    lines = _lines(f)
    lines[5] = b"word " * 200_000
    f.write_bytes(b"\n".join(lines))


ACCEPTED = [("crlf", crlf, 30, None), ("no-final-newline", no_final_newline, 30, None),
            ("empty-lines", empty_lines, 28, "empty_side"), ("1mb-line", megabyte_line, 29, "too_long")]


@pytest.mark.parametrize("name,change,kept,counter", ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_accepted_input(name: str, change: Callable[[Path], None], kept: int, counter: str | None,
                        good: tuple[Path, Path, list[str]]) -> None:
    import json

    src, run, sets = good
    change(src)
    code, out = cli("download", *sets, "-q")
    assert code == 0, out
    L = RunLayout(run)
    text = L.split_file("de-en", "train", "de").read_bytes()
    assert text.count(b"\n") == kept and b"\r" not in text
    if counter:
        stats = json.loads(L.manifest("download").read_text())["stats"]["pairs"]["de-en"]["train"]
        assert stats[counter] == 30 - kept


def test_missing_upstream_stage(tmp_path: Path) -> None:
    code, out = cli("score", "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert error_lines(out) == [out.strip()] and "run `mtprune prepare` first" in out


def test_read_only_run_directory(good: tuple[Path, Path, list[str]]) -> None:
    _, run, sets = good
    before = tree_digest(run)
    cmd = [sys.executable, "-m", "mtprune", "prepare", *sets]
    if os.geteuid() == 0:  # root ignores permission bits unless it drops CAP_DAC_OVERRIDE
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    os.chmod(run, 0o555)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        os.chmod(run, 0o755)
    assert p.returncode == 2, p.stderr
    assert error_lines(p.stderr) == [p.stderr.strip()] and "is not writable" in p.stderr
    assert tree_digest(run) == before


def test_corrupt_checkpoint(tiny_copy: Path) -> None:
    L = RunLayout(tiny_copy)
    before = L.scores.read_bytes()
    ck = L.proxy_checkpoint(1, 20)
    st = ck.stat()
    ck.write_bytes(b"\0" * st.st_size)
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only a rehash or a load can tell
    code, out = cli("score", "-c", str(TINY), "--run-dir", str(tiny_copy), "--overwrite")
    assert code == 2, out
    assert len(error_lines(out)) == 1 and "checkpoint_u20.pt: corrupt or unreadable checkpoint" in out
    assert L.scores.read_bytes() == before and L.manifest("score").exists()


def test_truncated_parquet(tiny_copy: Path) -> None:
    L = RunLayout(tiny_copy)
    data = L.scores.read_bytes()
    L.scores.write_bytes(data[: len(data) // 2])
    code, out = cli("prune", "-c", str(TINY), "--run-dir", str(tiny_copy))
    assert code == 2, out
    assert len(error_lines(out)) == 1 and "upstream stage 'score' is stale" in out and "scores.parquet" in out
    assert not L.manifest("prune").exists()


def test_truncated_parquet_source(tmp_path: Path) -> None:
    from conftest import write_parquet

    src = write_parquet(tmp_path / "pq", "de-en")
    f = next((src / "de-en").glob("train-*.parquet"))
    f.write_bytes(f.read_bytes()[:100])
    code, out = cli("download", "--set", f"download.source=local:{src}", "--set", "download.pairs=[de-en]",
                    "--run-dir", str(tmp_path / "run"))
    assert code == 2, out
    assert len(error_lines(out)) == 1 and "not a readable parquet file" in out


def test_a_target_language_without_its_bleu_tokenizer_is_refused_before_anything_runs(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("MeCab") is not None:
        pytest.skip("MeCab is installed here: sacrebleu can tokenize Japanese")
    run = tmp_path / "run"
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", "download.source=hub",
                    "--set", "download.pairs=[en-ja]")
    assert code == 2, out
    assert error_lines(out) == ["mtprune sweep: error: BLEU for target language 'ja' needs a tokenizer sacrebleu "
                                "cannot load here (RuntimeError); install it with: pip install 'sacrebleu[ja]'"]
    assert not any(run.iterdir())  # no stage started


@pytest.mark.parametrize("rows, shown", [
    ([{"translation": {"de": "Hallo.", "en": "Hello."}}, {"translation": None}], "None"),
    ([{"translation": {"de": "Hallo.", "fr": "Bonjour."}}], "lacks 'de' or 'en'"),
])
def test_a_translation_entry_without_both_languages_is_one_line(tmp_path: Path, rows: list, shown: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import write_parquet

    src = write_parquet(tmp_path / "pq", "de-en")
    f = next((src / "de-en").glob("train-*.parquet"))
    pq.write_table(pa.Table.from_pylist(rows), f)
    run = tmp_path / "run"
    code, out = cli("download", "--set", f"download.source=local:{src}", "--set", "download.pairs=[de-en]",
                    "--run-dir", str(run))
    assert code == 2, out
    assert len(error_lines(out)) == 1 and f"{f}: a translation entry lacks" in out and shown in out, out
    assert not list(run.rglob("train.*")) and not list(run.rglob("*.tmp"))


def test_a_missing_text_in_a_translation_entry_is_an_empty_side(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import write_parquet

    src = write_parquet(tmp_path / "pq", "de-en")
    f = next((src / "de-en").glob("train-*.parquet"))
    rows = [{"translation": {"de": "Hallo.", "en": "Hello."}}, {"translation": {"de": "Ja."}},
            {"translation": {"de": "Nein.", "en": None}}]
    pq.write_table(pa.Table.from_pylist(rows), f)
    run = tmp_path / "run"
    code, out = cli("download", "--set", f"download.source=local:{src}", "--set", "download.pairs=[de-en]",
                    "--run-dir", str(run))
    assert code == 0, out
    assert "train 1 (read 3, empty 2," in out
    assert (RunLayout(run).split_file("de-en", "train", "en")).read_text() == "Hello.\n"


def test_a_dry_run_with_an_unknown_order_by_is_one_line(tiny_swept: tuple[Path, str]) -> None:
    """The dry run plans the train units (which read the ordering column) before the checks: an order_by naming no
    column, or one the table does not hold, is still one line naming train.order_by, not parquet's schema."""
    run, _ = tiny_swept
    for bad in ("nosuch", "-sentence_id"):
        code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--dry-run",
                        "--set", "train.order=[easy-first]", "--set", f"train.order_by={bad}")
        assert code == 2, out
        assert error_lines(out)[-1].startswith("mtprune sweep: error: train.order_by:"), out
        assert "ArrowInvalid" not in out and "__fragment_index" not in out and "Traceback" not in out, out


def test_every_prune_strategy_is_checked_before_any_is_pruned(tiny_copy: Path) -> None:
    """A typo among valid strategies: refused before el2n-high is pruned, naming close columns and every column the
    score stage writes (not only those read), without telling the user to rescore; a typo in
    prune.length_match names that key; an identifier column is no score; a per-checkpoint column is one."""
    L = RunLayout(tiny_copy)
    run = ["prune", "-c", str(TINY), "--run-dir", str(tiny_copy)]
    code, out = cli(*run, "--set", "prune.strategies=[el2n-high,el2m-high]")
    line = error_lines(out)[-1]
    assert code == 2 and line.startswith("mtprune prune: error: prune.strategies: 'el2m-high'"), out
    assert "did you mean el2n or el2n_max?" in line and "el2n_eos" in line and "tracin" in line, line
    assert "--overwrite" not in line and "older mtprune" not in line, line
    assert not L.kept_ids("el2n-high-0.2").exists()  # nothing pruned
    code, out = cli(*run, "--set", "prune.strategies=[el2n-high,index-high]")
    assert code == 2 and "prune.strategies: 'index-high' ranks by 'index', which is no score column" in out, out
    code, out = cli(*run, "--set", "prune.strategies=[el2n-high,random-length]", "--set", "prune.length_match=el2m-high")
    assert code == 2 and error_lines(out)[-1].startswith("mtprune prune: error: prune.length_match: 'el2m-high'"), out
    code, out = cli(*run, "--set", "prune.strategies=[el2n@s1u20-high]", "-q")
    assert code == 0, out
    assert L.kept_ids("el2n@s1u20-high-0.2").is_file()
