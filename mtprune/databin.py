"""fairseq's binarized format (``--dataset-impl mmap``), written from SentencePiece's ids with numpy.

fairseq-preprocess reads SentencePiece's pieces back as text, splits each line on whitespace and looks every
token up in a Python dict, one sentence at a time: at 4M pairs that was 590 of prepare's 668 seconds. Prepare
already holds the ids, so it maps them to the dictionary's with one array lookup and writes the same bytes
(tests/test_databin.py compares them with fairseq-preprocess's own output and reads them back with fairseq).

The format, as ``fairseq.data.indexed_dataset.MMapIndexedDataset`` reads it: ``<prefix>.bin`` holds every
sentence's ids back to back; ``<prefix>.idx`` holds a header (magic, version 1, the ids' dtype code, the count),
then every sentence's length as int32 and its byte offset in the .bin as int64.
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .children import die_with
from .config import Config
from .sources import langs

MAGIC = b"MMIDIDX\x00\x00"
_CODES = {np.dtype(np.uint16): 8, np.dtype(np.uint32): 9, np.dtype(np.int64): 5}


def id_dtype(vocab_size: int) -> np.dtype:
    """The dtype fairseq-preprocess stores ids of a dictionary of ``vocab_size`` symbols in."""
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32) if vocab_size < 4294967295 else np.dtype(np.int64)


def write_index(path: Path, sizes: np.ndarray, dtype: np.dtype) -> None:
    """``<prefix>.idx`` for sentences of ``sizes`` ids each, stored as ``dtype``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", _CODES[dtype]) + struct.pack("<Q", len(sizes)))
        f.write(sizes.astype(np.int32).tobytes())
        f.write(pointers.tobytes())


def framed(ids: np.ndarray, lengths: np.ndarray, eos: int, first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sentences given as one flat id array and their lengths, each with ``eos`` appended and ``first`` (a tag)
    put before it when given: the flat result and the new lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    extra = 1 + (first is not None)
    out_len = lengths + extra
    ends = np.cumsum(out_len)
    starts = ends - out_len
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    # token j of sentence k goes to starts[k] + (first is not None) + j
    shift = np.repeat(starts + (first is not None) - (np.cumsum(lengths) - lengths), lengths)
    out[np.arange(len(ids)) + shift] = ids
    out[ends - 1] = eos
    if first is not None:
        out[starts] = first
    return out, out_len


def concat(parts: Iterable[Path], out: Path) -> None:
    """Concatenate files byte for byte (a single one is linked where the file system allows)."""
    parts = list(parts)
    out.unlink(missing_ok=True)
    if len(parts) == 1:
        try:
            out.hardlink_to(parts[0])
            return
        except OSError:
            pass
    with open(out, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)


# ---- SentencePiece encoding in worker processes, straight to fairseq's ids ------------------------

# fairseq's Dictionary puts these first; every other SentencePiece piece follows in SentencePiece's order
# (fairseq_backend.write_dictionary writes them so)
FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
EOS = FAIRSEQ_SPECIALS["</s>"]


def pieces(sp: Any) -> list[str]:
    """A SentencePiece model's pieces, by id."""
    return [sp.id_to_piece(k) for k in range(sp.get_piece_size())]


def fairseq_ids(vocab: list[str]) -> np.ndarray:
    """SentencePiece id -> fairseq dictionary id, for the dictionary ``write_dictionary`` makes of the pieces
    ``vocab``."""
    lut = np.empty(len(vocab), dtype=np.int64)
    following = len(FAIRSEQ_SPECIALS)
    for k, piece in enumerate(vocab):
        if piece in FAIRSEQ_SPECIALS:
            lut[k] = FAIRSEQ_SPECIALS[piece]
        else:
            lut[k] = following
            following += 1
    return lut


@dataclass(frozen=True)
class Frame:
    """How a chunk's sentences become rows: the source gets ``tag`` (the target language's tag id) first and
    every side an end of sentence; pairs with more than ``limit`` pieces on a side are dropped; with ``dual``,
    the reversed row too (source ``reverse_tag`` + target, target = source)."""

    tag: int
    reverse_tag: int
    limit: int
    dtype: str
    dual: bool


@dataclass
class Rows:
    """One chunk of encoded pairs: which were kept, and the kept rows' ids (flat, in the stored dtype) and lengths
    per stream (src, tgt and, with proxy.dual, rsrc and rtgt)."""

    keep: np.ndarray
    ids: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]


_sp: Any = None
_lut: Any = None


def _init_worker(model_path: str, parent: int | None = None) -> None:
    global _sp, _lut
    import sentencepiece as spm

    if parent is not None:  # a pool worker: killed with the prepare that started it, not left to write a
        die_with(parent)  # BrokenPipeError traceback into its log when its results have nowhere to go

    _sp = spm.SentencePieceProcessor(model_file=model_path)
    _lut = fairseq_ids(pieces(_sp))


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return _lut[flat], lengths


def _encode_rows(job: tuple[list[tuple[str, str]], Frame]) -> Rows:
    chunk, f = job
    a, la = _flat(_sp.encode([x for x, _ in chunk], out_type=int))
    b, lb = _flat(_sp.encode([y for _, y in chunk], out_type=int))
    keep = (la + 1 <= f.limit) & (lb <= f.limit)
    a, b = a[np.repeat(keep, la)], b[np.repeat(keep, lb)]
    la, lb = la[keep], lb[keep]
    streams = {"src": framed(a, la, EOS, f.tag), "tgt": framed(b, lb, EOS)}
    if f.dual:
        streams.update(rsrc=framed(b, lb, EOS, f.reverse_tag), rtgt=framed(a, la, EOS))
    return Rows(keep, {k: ids.astype(f.dtype) for k, (ids, _) in streams.items()},
                {k: n.astype(np.int32) for k, (_, n) in streams.items()})


def _chunked(items: Iterable[Any], size: int = 2000) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if this process has none yet) without its leak warning.

    The pool's semaphores are registered with the tracker, a process of its own that outlives a killed prepare
    to remove them; it then printed "There appear to be N leaked semaphore objects to clean up" into the job's
    log, though that clean-up is its whole purpose. Its warning filters come from the environment it starts
    with, so the one that hides this warning is set for that moment only."""
    from multiprocessing import resource_tracker

    hide, old = "ignore:resource_tracker:UserWarning", os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = f"{old},{hide}" if old else hide
    try:
        resource_tracker.ensure_running()
    finally:
        if old is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = old


class Encoder:
    """Encodes text with the SentencePiece model on ``workers`` processes, streaming, in order."""

    def __init__(self, model_path: Path, workers: int) -> None:
        self.model_path, self.workers = str(model_path), workers

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            _start_quiet_resource_tracker()
            self.pool = get_context("spawn").Pool(self.workers, _init_worker, (self.model_path, os.getpid()))
        else:
            _init_worker(self.model_path)
            self.pool = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.terminate()

    def encode_rows(self, pairs: Iterable[tuple[str, str]], frame: Frame, total: int, desc: str) -> Iterator[Rows]:
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit="pair", leave=False, disable=None) as bar:
            for rows in self._map((c, frame) for c in _chunked(pairs)):
                yield rows
                bar.update(len(rows.keep))

    def _map(self, jobs: Iterator[tuple[list[tuple[str, str]], Frame]]) -> Iterator[Rows]:
        """Results in order, with a few chunks per worker in flight (Pool.imap would read the whole input ahead
        into its queue: all of a 40M-pair corpus's text in memory)."""
        if self.pool is None:
            yield from map(_encode_rows, jobs)
            return
        pending: deque[Any] = deque()
        for job in jobs:
            pending.append(self.pool.apply_async(_encode_rows, (job,)))
            if len(pending) >= 3 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- the run's directions and vocabulary (prepare binarizes with them; the score stage's target set too) ----

def tag(lang: str) -> str:
    return f"<2{lang}>"


def tasks(pairs: tuple[str, ...] | list[str], direction: str) -> list[tuple[str, str, str]]:
    """(pair, source language, target language) for every translation direction of the run."""
    out = []
    for pair in pairs:
        a, b = langs(pair)
        other = b if a == "en" else a
        if direction in ("en-xx", "both"):
            out.append((pair, "en", other))
        if direction in ("xx-en", "both"):
            out.append((pair, other, "en"))
    return out


@dataclass(frozen=True)
class Vocabulary:
    """The SentencePiece model's pieces and their fairseq dictionary ids, read once per process."""

    pieces: list[str]
    lut: np.ndarray

    @classmethod
    def load(cls, model: Path) -> Vocabulary:
        import sentencepiece as spm

        vocab = pieces(spm.SentencePieceProcessor(model_file=str(model)))
        return cls(vocab, fairseq_ids(vocab))

    @property
    def dtype(self) -> np.dtype:
        """What fairseq stores ids of this dictionary as."""
        return id_dtype(int(self.lut.max()) + 1)

    def frame(self, cfg: Config, s: str, t: str) -> Frame:
        """How the rows of direction ``s``-``t`` are framed (tags, length limit, stored dtype)."""
        def tag_id(lang: str) -> int:
            return int(self.lut[self.pieces.index(tag(lang))])

        return Frame(tag=tag_id(t), reverse_tag=tag_id(s), limit=cfg.prepare.max_tokens, dtype=self.dtype.str,
                     dual=cfg.proxy.dual)
