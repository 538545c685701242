"""Readers for OPUS-100 (the Hugging Face hub, local copies in the release or hub-parquet layout) and
for plain parallel text files (``download.source: files``, optionally gzip-compressed).

Every reader yields, per split, ``(text_l1, text_l2)`` tuples in the order of the source, with
``l1, l2 = pair.split("-")`` (OPUS-100 names pairs alphabetically: ``de-en``, ``en-es``, ...).
The position in the train split is the ``<n>`` of a sentence id.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, StageError, UsageError

SPLITS = ("train", "valid", "test")
RELEASE_SPLIT = {"train": "train", "valid": "dev", "test": "test"}
HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
HUB_DATASET = "Helsinki-NLP/opus-100"
BOM = "\ufeff"

Pairs = Iterator[tuple[str, str]]


def langs(pair: str) -> tuple[str, str]:
    a, b = pair.split("-")
    return a, b


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: line {lineno}: invalid UTF-8 (byte {e.start})") from None


def _open_binary(path: Path):  # noqa: ANN202 - a binary file object
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_parallel_text(path_a: Path, path_b: Path) -> Pairs:
    """Two line-aligned text files (``.gz``: gzip), streamed; a count mismatch, bad UTF-8 or a damaged
    gzip file names file and line. Line ends and a UTF-8 byte-order mark at the start of a file are
    not part of the text."""
    for p in (path_a, path_b):
        if not p.is_file():
            raise InputError(f"{p}: file not found")
    try:
        yield from _aligned(path_a, path_b)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        bad = path_a if path_a.name.endswith(".gz") else path_b
        if path_a.name.endswith(".gz") and path_b.name.endswith(".gz"):
            bad = _damaged(path_a, path_b)
        raise InputError(f"{bad}: not a readable gzip file ({e or type(e).__name__})") from None


def _damaged(*paths: Path) -> Path:
    for p in paths:
        try:
            with gzip.open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        except (gzip.BadGzipFile, EOFError, zlib.error):
            return p
    return paths[0]


def _aligned(path_a: Path, path_b: Path) -> Pairs:
    with _open_binary(path_a) as fa, _open_binary(path_b) as fb:
        for i, (ra, rb) in enumerate(itertools.zip_longest(fa, fb), start=1):
            if ra is None or rb is None:
                short, long_ = (path_a, path_b) if ra is None else (path_b, path_a)
                n_short = i - 1
                n_long = n_short + 1 + sum(1 for _ in (fb if ra is None else fa))
                raise InputError(f"{short}: has {n_short} lines but {long_} has {n_long}; "
                                 f"the two sides must be line-aligned (first unmatched line {i})")
            a, b = _decode(ra, path_a, i).rstrip("\r\n"), _decode(rb, path_b, i).rstrip("\r\n")
            if i == 1:  # a byte-order mark (Windows editors write one) is no part of the first sentence
                a, b = a.removeprefix(BOM), b.removeprefix(BOM)
            yield a, b


def detect_layout(root: Path, pair: str) -> str:
    d = root / pair
    if not root.is_dir():
        raise InputError(f"{root}: local source folder not found")
    if not d.is_dir():
        raise InputError(f"{d}: pair folder not found (expected {root}/<pair>/ for each pair)")
    if any(d.glob(f"opus.{pair}-*")):
        return "release"
    if any(d.glob("*.parquet")):
        return "parquet"
    raise InputError(f"{d}: neither opus.{pair}-<split>.<lang> files nor <split>-*.parquet files found")


def read_local(root: Path, pair: str, split: str) -> Pairs:
    layout = detect_layout(root, pair)
    l1, l2 = langs(pair)
    if layout == "release":
        name = RELEASE_SPLIT[split]
        return read_parallel_text(root / pair / f"opus.{pair}-{name}.{l1}", root / pair / f"opus.{pair}-{name}.{l2}")
    files = sorted((root / pair).glob(f"{HUB_SPLIT[split]}-*.parquet"))
    if not files:
        raise InputError(f"{root / pair}: no {HUB_SPLIT[split]}-*.parquet file for split {split}")
    return _read_parquet(files, pair)


def _read_parquet(files: list[Path], pair: str) -> Pairs:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{f}: not a readable parquet file ({e})") from None
        if "translation" not in pf.schema_arrow.names:
            raise InputError(f"{f}: no 'translation' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["translation"], batch_size=BATCH_ROWS):
            yield from translation_pairs(batch.column(0), pair, str(f))


# Rows converted to Python strings at a time: the Arrow batches of a parquet file or of a hub dataset are read
# this many rows at a time, so that a pair of a million rows never stands in memory as Python objects.
BATCH_ROWS = 10_000


def translation_pairs(column, pair: str, where: str) -> Pairs:  # noqa: ANN001 - a pyarrow (Chunked)Array
    """The ``(text_l1, text_l2)`` of an Arrow ``translation`` column (a struct with one string field per
    language, OPUS-100's format on the hub and in its parquet files), one batch converted at a time. A row
    without the struct or a language field missing from it is an error naming ``where``; a null text is ""."""
    import pyarrow as pa

    l1, l2 = langs(pair)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for col in chunks:
        names = [col.type.field(i).name for i in range(col.type.num_fields)] if pa.types.is_struct(col.type) else []
        if l1 not in names or l2 not in names or col.null_count:
            first = next((r for r in col.to_pylist() if not isinstance(r, dict) or l1 not in r or l2 not in r), None)
            raise InputError(f"{where}: a translation entry lacks {l1!r} or {l2!r}: {first!r}")
        for a, b in zip(col.field(l1).to_pylist(), col.field(l2).to_pylist(), strict=True):
            yield a or "", b or ""


def read_files(files: tuple[str, ...] | list[str]) -> Pairs:
    """One split of a pair from ``download.files``: ``[file of l1, file of l2]``, plain or ``.gz``."""
    a, b = (Path(f).expanduser() for f in files)
    return read_parallel_text(a, b)


def hub_offline() -> bool:
    """Whether datasets / huggingface_hub are told not to reach the network (their own variables)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def read_hub(pair: str, split: str, cache_dir: str | None = None) -> Pairs:
    """OPUS-100 from the hub (``datasets``, cached under ``cache_dir``); a hub that cannot be reached,
    an offline machine without the pair in its cache and a pair the hub does not have are each one line."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a hard dependency
        raise StageError(f"the 'datasets' package is needed for download.source=hub ({e})") from None
    cache = str(Path(cache_dir).expanduser()) if cache_dir else None
    try:
        with _held_back_library_logs():
            ds = datasets.load_dataset(HUB_DATASET, pair, split=HUB_SPLIT[split], cache_dir=cache)
    except Exception as e:  # datasets raises many kinds for "offline"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _no_such_config(e, pair):
            raise UsageError(f"download.pairs: {HUB_DATASET} on the Hugging Face hub has no {pair!r} "
                             f"({first[:200]})") from None
        if hub_offline():
            # the folder datasets itself looked in: HF_DATASETS_CACHE, HF_HOME or XDG_CACHE_HOME move it
            where = cache or str(datasets.config.HF_DATASETS_CACHE)
            raise StageError(
                f"cannot load {HUB_DATASET} ({pair}, {HUB_SPLIT[split]}): offline (HF_DATASETS_OFFLINE / "
                f"HF_HUB_OFFLINE is set) and not cached in {where}; download it where the hub is reachable, "
                f"point download.cache_dir at that cache, or use --set download.source=local:DIR") from None
        raise StageError(
            f"cannot load {HUB_DATASET} ({pair}, {HUB_SPLIT[split]}) from the Hugging Face hub: {first[:200]}. "
            f"For a copy on disk use --set download.source=local:DIR") from None
    # Arrow batches straight from the memory-mapped cache: a Python dict per row is much slower
    for batch in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from translation_pairs(batch.column("translation"), pair, f"{HUB_DATASET} ({pair}, {HUB_SPLIT[split]})")


# Loggers of the libraries behind load_dataset. huggingface_hub and datasets print through a handler of their
# own *and* propagate to the root logger, so each of their lines came twice.
LIBRARY_LOGGERS = ("huggingface_hub", "datasets", "fsspec", "filelock", "urllib3", "httpx", "httpx2", "httpcore")


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _held_back_library_logs() -> Iterator[None]:
    """Hold back what the hub libraries log and warn while the block runs: shown afterwards, through their
    own handlers, if the block succeeds; dropped if it raises, because the caller's one line then says what
    went wrong. An unreachable hub otherwise prints a dozen retry warnings (``Retrying in 8s [Retry 4/5]``,
    each twice) before that line. With ``-vv`` (mtprune logging at DEBUG) nothing is held back."""
    if logging.getLogger("mtprune").isEnabledFor(logging.DEBUG):
        yield
        return
    held = _Held()
    saved = {}
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers[:] = [held]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as warned:
            yield
    finally:
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)  # a handler a library added meanwhile (on first import) stays
            lg.handlers[:] = handlers + [h for h in lg.handlers if h is not held and h not in handlers]
            lg.propagate = propagate
    for record in held.records:  # only reached on success
        logging.getLogger(record.name).handle(record)
    for w in warned:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _no_such_config(e: Exception, pair: str) -> bool:
    """datasets' way of saying the dataset has no such config (``BuilderConfig 'xx' not found``)."""
    text = str(e)
    return isinstance(e, ValueError) and pair in text and "not found" in text.lower()
