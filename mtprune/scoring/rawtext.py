"""The downloaded text of the score table's rows, read from ``01_download`` by line without holding it in memory.

The ``base_*`` columns need each training pair's raw source and target. A 4M-pair corpus is ~0.5 GB of text on
disk and several GB as Python strings, so the text files are memory-mapped, each line found through an array of
line offsets (8 bytes a line), and a row's sentence id is looked up in a sorted byte-string array of the pair's
``train.ids`` (no dict of Python strings). ``RowText.pairs(rows)`` streams (source, target) for any rows in any
order; what a caller keeps of them is its own affair.

The download writes every sentence on one ``\\n``-terminated line with its whitespace folded (no ``\\r``,
no tab), so a line here is exactly what ``textio.read_lines`` gives.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..textio import text_lines

_BLOCK = 1 << 24  # bytes scanned at once for newlines
_ID_CHUNK = 200_000  # sentence ids turned into bytes at once


def line_starts(buf: Any) -> np.ndarray:
    """Offsets of every line's first byte in ``buf``, plus one past the last line's newline (int64, lines + 1).
    A last line without a newline counts as a line."""
    n = len(buf)
    view = np.frombuffer(buf, dtype=np.uint8) if n else np.zeros(0, np.uint8)
    ends = [np.flatnonzero(view[lo:lo + _BLOCK] == 10) + lo for lo in range(0, n, _BLOCK)]
    nl = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if n and (len(nl) == 0 or nl[-1] != n - 1):
        nl = np.append(nl, n)  # an unterminated last line: as if it had its newline
    return np.concatenate([[0], nl + 1]).astype(np.int64)


class TextFile:
    """One text file, memory-mapped; ``line(i)`` is line i without its newline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115  # closed by close()
        size = path.stat().st_size
        self._mm: Any = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self.starts = line_starts(self._mm)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def line(self, i: int) -> str:
        return self._mm[self.starts[i]:self.starts[i + 1] - 1].decode("utf-8")

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        self._f.close()


class PairText:
    """One pair's training text: both sides and the sorted sentence ids of its lines."""

    def __init__(self, layout: Any, pair: str) -> None:
        self.ids_path = layout.download_ids(pair)
        ids = np.array([s.encode("utf-8") for s in text_lines(self.ids_path)], dtype=bytes)
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]
        self.sides = {lang: TextFile(layout.split_file(pair, "train", lang)) for lang in pair.split("-")}
        for side in self.sides.values():
            if len(side) != len(ids):
                raise UsageError(f"{side.path}: {len(side)} lines but {self.ids_path} has {len(ids)} ids; "
                                 "the download is incomplete: run `mtprune download --overwrite`")

    def lines_of(self, sids: list[str]) -> np.ndarray:
        """The line of each sentence id; a UsageError naming the first id the download lacks."""
        want = np.array([s.encode("utf-8") for s in sids], dtype=bytes)
        at = np.searchsorted(self.sorted_ids, want)
        at_ok = np.minimum(at, len(self.sorted_ids) - 1)
        found = (at < len(self.sorted_ids)) & (self.sorted_ids[at_ok] == want) if len(self.sorted_ids) else \
            np.zeros(len(want), bool)
        if not found.all():
            missing = sids[int(np.flatnonzero(~found)[0])]
            raise UsageError(f"{self.ids_path}: has no sentence {missing!r} of the score table; "
                             "the download changed since scoring")
        return self.order[at_ok]

    def close(self) -> None:
        for side in self.sides.values():
            side.close()


class RowText:
    """(source, target) of each row of a score table, from the download; rows given by ``pair``, ``direction``
    (``src-tgt``) and ``sentence_id`` columns (pyarrow arrays or sequences). Use as a context manager."""

    def __init__(self, layout: Any, pair: Any, direction: Any, sentence_id: Any) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        pair, direction, sentence_id = (_chunked(c) for c in (pair, direction, sentence_id))
        self.n = len(pair)
        self._pairs: dict[str, PairText] = {}
        self._samples: dict[str, list[tuple[str, str]]] = {}  # direction_sample's, by direction
        pair_codes, pair_names = _codes(pair)
        dir_codes, dir_names = _codes(direction)
        self.direction_codes, self.direction_names = dir_codes, dir_names
        self._pair_of = pair_codes
        self._pair_names = pair_names
        self._line = np.empty(self.n, dtype=np.int64)
        try:
            for k, name in enumerate(pair_names):
                p = self._pairs[name] = PairText(layout, name)
                rows = np.flatnonzero(pair_codes == k)
                for lo in range(0, len(rows), _ID_CHUNK):
                    part = rows[lo:lo + _ID_CHUNK]
                    sids = pc.take(sentence_id, pa.array(part)).to_pylist()
                    self._line[part] = p.lines_of(sids)
            # per direction code: (pair's source side, target side) looked up per row below
            self._side_of: dict[tuple[int, int], tuple[TextFile, TextFile]] = {}
            for k, name in enumerate(pair_names):
                for d, dname in enumerate(dir_names):
                    s, t = dname.split("-")
                    sides = self._pairs[name].sides
                    if s in sides and t in sides:
                        self._side_of[(k, d)] = (sides[s], sides[t])
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self.n

    def pairs(self, rows: np.ndarray | range) -> Iterator[tuple[str, str]]:
        """(source, target) of each of ``rows``, in that order."""
        for r in rows:
            src, tgt = self._side_of[(int(self._pair_of[r]), int(self.direction_codes[r]))]
            line = int(self._line[r])
            yield src.line(line), tgt.line(line)

    def direction_sample(self, direction: str) -> list[tuple[str, str]]:
        """(source, target) of the lines ``wordalign.sample_rows(n)`` of the download's training text of the pair that
        ``direction`` translates (n lines): the same whichever rows this table holds. Read once per direction:
        the baselines' cache key, every slice's key and the word-alignment fit all ask for it."""
        if direction not in self._samples:
            from .wordalign import sample_rows

            d = self.direction_names.index(direction)
            src, tgt = next(sides for (_, dd), sides in sorted(self._side_of.items()) if dd == d)
            self._samples[direction] = [(src.line(int(i)), tgt.line(int(i))) for i in sample_rows(len(src))]
        return self._samples[direction]

    def close(self) -> None:
        for p in self._pairs.values():
            p.close()

    def __enter__(self) -> RowText:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunked(column: Any) -> Any:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return column
    return pa.chunked_array([column if isinstance(column, pa.Array) else pa.array(column)])


def _codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """Integer codes per row and the distinct values they index, without a Python string per row."""
    enc = column.dictionary_encode().combine_chunks()
    names = enc.dictionary.to_pylist()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, names


class ListText:
    """``RowText``'s interface over two lists already in memory (tests, small tables)."""

    def __init__(self, src: list[str], tgt: list[str]) -> None:
        if len(src) != len(tgt):
            raise ValueError("source and target lists differ in length")
        self.src, self.tgt, self.n = src, tgt, len(src)

    def __len__(self) -> int:
        return self.n

    def pairs(self, rows: np.ndarray | range) -> Iterator[tuple[str, str]]:
        for r in rows:
            yield self.src[r], self.tgt[r]
