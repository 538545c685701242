"""Shared helpers: tiny corpora in OPUS-100's layouts, CLI runners, a tiny trained run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from filelock import FileLock

from mtprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def cli(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stdout + stderr)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def download(run: Path, *sets: str) -> tuple[int, str]:
    """`mtprune download` into ``run`` with each of ``sets`` as a --set override."""
    args = ["download", "--run-dir", str(run), "-q"]
    for s in sets:
        args += ["--set", s]
    return cli(*args)


def read(p: Path) -> list[str]:
    return p.read_text(encoding="utf-8").splitlines()


def cli_subprocess(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtprune", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if "error:" in ln or "failed:" in ln]


def sentence(i: int, lang: str) -> str:
    words = {"en": "the cat sees a dog near house river tree".split(),
             "de": "die katze sieht einen hund nahe haus fluss baum".split(),
             "es": "el gato ve un perro cerca casa rio arbol".split(),
             "fr": "le chat voit un chien pres maison riviere arbre".split(),
             "it": "il gatto vede un cane vicino casa fiume albero".split()}[lang]
    return " ".join(words[(i * (k + 3)) % len(words)] for k in range(3 + i % 5)) + f" {i}"


def write_release(root: Path, pair: str, n_train: int = 60, n_eval: int = 10) -> Path:
    """A corpus in OPUS-100's release layout: <root>/<pair>/opus.<pair>-<split>.<lang>."""
    d = root / pair
    d.mkdir(parents=True, exist_ok=True)
    a, b = pair.split("-")
    offsets = {"train": 0, "dev": 10_000, "test": 20_000}
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        for lang in (a, b):
            lines = [sentence(offsets[split] + i, lang) for i in range(n)]
            (d / f"opus.{pair}-{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_parquet(root: Path, pair: str, n_train: int = 60, n_eval: int = 10) -> Path:
    """The hub's parquet layout: <root>/<pair>/<split>-00000-of-00001.parquet, column `translation`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / pair
    d.mkdir(parents=True, exist_ok=True)
    a, b = pair.split("-")
    offsets = {"train": 0, "validation": 10_000, "test": 20_000}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = [{"translation": {a: sentence(offsets[split] + i, a), b: sentence(offsets[split] + i, b)}}
                for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), d / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture
def local_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "opus"
    for pair in ("de-en", "en-fr"):
        write_release(root, pair)
    return root


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test session: under pytest-xdist the workers share it (the
    first one builds it under a file lock, the others wait and reuse it), so a session fixture costs once."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    failed = folder.with_name(f"{folder.name}.failed")
    with FileLock(f"{folder}.lock"):
        if failed.exists():  # as pytest does for a failed fixture: the error again, not a second attempt
            pytest.fail(f"shared fixture {name!r} failed to build in another worker: {failed.read_text()[-2000:]}")
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic run taken through `score` with real fairseq (about half a minute). Shared: copy it
    (``tiny_copy``) before changing anything in it."""

    def build(folder: Path) -> None:
        for stage in ("download", "prepare", "proxy", "score"):
            code, out = cli(stage, "-c", str(TINY), "--run-dir", str(folder / "run"), "-q")
            assert code == 0, out

    return built_once(tmp_path_factory, "tiny", build) / "run"


@pytest.fixture(scope="session")
def tiny_swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The whole tiny sweep, run once through the real command line: (run directory, stdout). Shared."""

    def build(folder: Path) -> None:
        p = cli_subprocess("sweep", "-c", str(TINY), "--run-dir", str(folder / "run"))
        assert p.returncode == 0, p.stderr[-3000:]
        (folder / "stdout").write_text(p.stdout)
        (folder / "stderr").write_text(p.stderr)

    folder = built_once(tmp_path_factory, "sweep", build)
    return folder / "run", (folder / "stdout").read_text()


@pytest.fixture
def tiny_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run that a test may change."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, symlinks=True)
    return dst


os.environ.setdefault("TQDM_DISABLE", "1")
# the last run used (`status` without -c) is remembered here, not in the home directory of whoever runs the suite
os.environ.setdefault("MTPRUNE_STATE_DIR", tempfile.mkdtemp(prefix="mtprune-test-state-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``, as scripts/test.sh runs it) the tests that share a
    module-scoped fixture go to one worker, so that fixture is still built once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info and any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def clear_score_but_baselines(layout) -> None:  # noqa: ANN001 (a RunLayout)
    """Remove 04_score but for its cache of the base_* columns, when there is one (off in tiny.yaml): they
    depend on the training text alone (the cache is keyed by the rows, in order, with their text), are
    computed after the merge, and take longer than the tiny scoring pass itself."""
    cache = layout.baseline_cache.read_bytes() if layout.baseline_cache.is_file() else None
    shutil.rmtree(layout.stage_dir("score"))
    if cache is not None:
        layout.baseline_cache.parent.mkdir(parents=True)
        layout.baseline_cache.write_bytes(cache)
