"""The ``base_*`` columns: OpusFilter's filters, used as a library, on the raw text of every training pair.

They need no proxy model, so they are what a researcher already runs to clean a corpus; mtprune writes
them beside its proxy scores so that both are judged on the same labels and can be pruned by. Every column
is oriented higher = worse and named after the filter it comes from (OpusFilter 3.3, ``opusfilter.filters``,
``opusfilter.lid``, ``opusfilter.word_alignment``; default settings unless said):

| column | filter | value |
|---|---|---|
| ``base_lengthratio_char`` | ``LengthRatioFilter(unit="char")`` | longer side / shorter side, in characters |
| ``base_lengthratio_word`` | ``LengthRatioFilter(unit="word")`` | the same in words |
| ``base_langid_src``, ``base_langid_tgt`` | ``LinguaFilter`` (low-accuracy mode) | 1 - lingua's confidence in the expected language; 1 when another language wins |
| ``base_similarity`` | ``SimilarityFilter(lowercase=True)`` | normalised Levenshtein similarity of the two sides (1: a copy) |
| ``base_terminalpunct`` | ``TerminalPunctuationFilter`` | log(1 + mismatch of sentence-final punctuation) |
| ``base_numerals`` | ``NonZeroNumeralsFilter`` | 1 - similarity of the non-zero digits of the two sides |
| ``base_repetition`` | ``RepetitionFilter`` | how often a stretch of 3+ characters repeats itself in a row |
| ``base_wordalign_src``, ``base_wordalign_tgt`` | (``WordAlignFilter``'s role) | mean negative log-probability per word of one side given the other, under a fast_align-style lexical model (``scoring/wordalign.py``) |
| ``base_opusfilter`` | all of the above but word alignment | how many of them reject the pair at OpusFilter's default thresholds |

``base_opusfilter > 0`` is what the ``opusfilter`` prune strategy drops: the pairs a user running these filters
with their defaults would remove. Word alignment is left out of it: its default thresholds (0) presume priors
learnt from clean data, and with priors learnt from the corpus itself they reject most of it (83 % of 12,000
Tatoeba en-es pairs).

Language id is restricted to the run's languages and ``EXTRA_LANGS`` (lingua names the most likely of those;
among all 75 of its languages short sentences are often taken for a rarer neighbour). Word alignment is not
OpusFilter's (eflomal samples from ``/dev/urandom`` and aligns a corpus jointly, so its scores change from run to run
and with the rows that share a job) but ``scoring/wordalign.py``'s: lexical models fitted by EM on the language pair's
training text, each pair scored on its own. Every column is a deterministic function of the text: the same in a
rerun, in a slice of ``score --baselines I/N``, after ``--overwrite``. The computed columns are still kept
(``04_score/shards/baselines.parquet``, keyed by the text; the word-alignment models in ``shards/wordalign/``) to save
their time on a rerun.

Rows are scored per translation direction (``direction`` column: ``src-tgt``), so a run with both directions
scores each sentence pair once each way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mtprune")

VERSION = 2  # bump when a column's definition changes: cached baselines are then recomputed (2: scoring/wordalign.py)
COLUMNS = ("base_lengthratio_char", "base_lengthratio_word", "base_langid_src", "base_langid_tgt", "base_similarity",
           "base_terminalpunct", "base_numerals", "base_repetition", "base_wordalign_src", "base_wordalign_tgt",
           "base_opusfilter")
# besides the run's own languages, so that a target in another common language is recognised as such
EXTRA_LANGS = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "nb", "pl", "cs", "ro", "hu", "fi", "tr",
               "ru", "el", "ca", "eo", "zh", "ja", "ar")
RATIO_CAP = 1e6  # LengthRatioFilter gives inf for an empty side; parquet, ranks and plots want a number
CHUNK = 50_000  # rows whose text is held at once by the per-pair filters


def _quiet_opusfilter() -> None:
    # LinguaFilter and the tokenizers log at INFO/WARNING for every instance; the stage logs its own summary
    for name in ("opusfilter", "mosestokenizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lingua_codes(codes: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """The ISO 639-1 codes among ``codes`` that lingua can identify."""
    from lingua import IsoCode639_1

    return sorted(c for c in set(codes) if hasattr(IsoCode639_1, c.upper()))


def langid_filter(src: str, tgt: str, run_langs: list[str]) -> tuple[Any, tuple[bool, bool]]:
    """OpusFilter's LinguaFilter for a direction (None when lingua knows neither language), and which of the two
    sides it can judge."""
    from opusfilter.lid import LinguaFilter

    known = lingua_codes({*EXTRA_LANGS, *run_langs, src, tgt})
    sides = (src in known, tgt in known)
    if not all(sides):
        missing = [c for c in (src, tgt) if c not in known]
        log.warning("score: base_langid: lingua cannot identify %s; those rows get no base_langid value",
                    ", ".join(missing))
    if not any(sides):
        return None, sides
    return LinguaFilter(languages=[src if sides[0] else "en", tgt if sides[1] else "en"], langid_languages=known,
                        lingua_mode="low"), sides


def langid_badness(f: Any, sides: tuple[bool, bool], pairs: list[tuple[str, str]]) -> tuple[np.ndarray, ...]:
    """(1 - confidence in the expected language of each source, the same for the target) from ``langid_filter``'s
    filter; NaN for a side lingua cannot judge."""
    out = [np.full(len(pairs), np.nan), np.full(len(pairs), np.nan)]
    if f is None or not pairs:
        return tuple(out)
    conf = np.array(list(f.score(pairs)), dtype=np.float64)
    for side in (0, 1):
        if sides[side]:
            # lingua's sums run in a varying order between processes (last bits differ): rounded to 1e-6
            out[side] = np.round(1.0 - conf[:, side], 6)
    return tuple(out)


def langid_rejects(bad_src: np.ndarray, bad_tgt: np.ndarray) -> np.ndarray:
    """LinguaFilter's default decision (thresholds 0: a side is rejected when another language wins), from
    the two ``base_langid_*`` columns; a side lingua cannot identify is not rejected."""
    return (np.nan_to_num(bad_src) >= 1.0) | (np.nan_to_num(bad_tgt) >= 1.0)


def wordalign(text: Any, rows: np.ndarray, src: str, tgt: str, workdir: Path,
              train: list[tuple[str, str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The word-alignment scores of each of ``rows`` of ``text`` (source->target, target->source): each pair scored on
    its own by lexical models fitted on ``train`` (by default ``training_pairs``; ``scoring/wordalign.py``), kept in
    ``workdir/wordalign``. NaN for every row when fewer than two distinct non-empty pairs are there to learn from."""
    from . import wordalign as wa

    nan = np.full(len(rows), np.nan)
    train = training_pairs(text, rows, f"{src}-{tgt}") if train is None else train
    if not _two_distinct(train):
        return nan, nan.copy()
    digest = wa.sample_digest(train)
    folder = workdir / "wordalign"
    forward = wa.cached_model(folder, f"{src}-{tgt}", train, digest)
    backward = wa.cached_model(folder, f"{tgt}-{src}", [(b, a) for a, b in train], digest)
    fwd, bwd = np.empty(len(rows)), np.empty(len(rows))
    for lo in range(0, len(rows), CHUNK):
        pairs = list(text.pairs(rows[lo:lo + CHUNK]))
        fwd[lo:lo + CHUNK] = forward.scores(pairs)
        bwd[lo:lo + CHUNK] = backward.scores([(b, a) for a, b in pairs])
    return fwd, bwd


def training_pairs(text: Any, rows: np.ndarray, direction: str) -> list[tuple[str, str]]:
    """What the word-alignment models of ``direction`` are fitted on: the language pair's whole training text when
    ``text`` reads it from the download (``RowText.direction_sample``), so that a slice of the rows gets the same
    models as the whole table; else the given rows themselves (``ListText``). At most ``wordalign.TRAIN_MAX`` pairs,
    evenly spaced."""
    from .wordalign import sample_rows

    whole = getattr(text, "direction_sample", None)
    if whole is not None:
        return whole(direction)
    rows = np.asarray(rows)
    return list(text.pairs(rows[sample_rows(len(rows))]))


def _two_distinct(pairs: Any) -> bool:
    """Whether at least two different pairs with both sides non-empty are among ``pairs`` (stops at the second)."""
    first = None
    for p in pairs:
        if p[0].strip() and p[1].strip():
            if first is None:
                first = p
            elif p != first:
                return True
    return False


def _simple() -> dict[str, tuple[Any, Any]]:
    """column -> (filter, its score turned into higher = worse)."""
    from opusfilter import filters as F

    return {
        "base_lengthratio_char": (F.LengthRatioFilter(unit="char"), lambda s: min(float(s), RATIO_CAP)),
        "base_lengthratio_word": (F.LengthRatioFilter(unit="word"), lambda s: min(float(s), RATIO_CAP)),
        "base_similarity": (F.SimilarityFilter(unit="char", lowercase=True), lambda s: float(s[0])),
        "base_terminalpunct": (F.TerminalPunctuationFilter(), lambda s: -float(s)),
        "base_numerals": (F.NonZeroNumeralsFilter(), lambda s: 1.0 - float(s[0])),
        "base_repetition": (F.RepetitionFilter(), lambda s: float(s)),
    }


def compute(src_text: list[str], tgt_text: list[str], directions: list[str], workdir: Path,
            seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Every ``base_*`` column for rows of (source, target, ``direction`` "src-tgt") held in lists."""
    from .rawtext import ListText

    names = sorted(set(directions))
    codes = np.array([names.index(d) for d in directions], dtype=np.int64)
    return compute_rows(ListText(src_text, tgt_text), codes, names, workdir, seconds)


def compute_rows(text: Any, direction_codes: np.ndarray, direction_names: list[str], workdir: Path,
                 seconds: dict[str, float] | None = None,
                 train: dict[str, list[tuple[str, str]]] | None = None) -> dict[str, np.ndarray]:
    """Every ``base_*`` column for the rows of ``text`` (``rawtext.RowText`` or ``ListText``), row i translating in
    direction ``direction_names[direction_codes[i]]``; ``seconds`` receives the wall time per filter. ``train``: the
    pairs each direction's word-alignment models are fitted on, when not the text's own (``training_pairs``).

    The text is read ``CHUNK`` rows at a time for the per-pair filters, and to the word-alignment models: memory does not
    grow with the corpus beyond the columns themselves (and the models, fitted on at most ``wordalign.TRAIN_MAX`` pairs)."""
    _quiet_opusfilter()
    seconds = {} if seconds is None else seconds
    n = len(text)
    out = {c: np.full(n, np.nan) for c in COLUMNS}
    dirs = np.asarray(direction_codes)
    present = sorted({direction_names[int(c)] for c in np.unique(dirs)})
    run_langs = sorted({lang for d in present for lang in d.split("-")})
    for direction in present:
        s, t = direction.split("-")
        rows = np.flatnonzero(dirs == direction_names.index(direction))
        simple = _simple()
        lid, lid_sides = langid_filter(s, t, run_langs)
        rejects = np.zeros(len(rows))
        for lo in range(0, len(rows), CHUNK):
            part = rows[lo:lo + CHUNK]
            pairs = list(text.pairs(part))
            for name, (filt, orient) in simple.items():
                t0 = time.time()
                raw = list(filt.score(pairs))
                out[name][part] = [orient(x) for x in raw]
                rejects[lo:lo + CHUNK] += [not filt.accept(x) for x in raw]
                seconds[name] = round(seconds.get(name, 0.0) + time.time() - t0, 3)
            t0 = time.time()
            out["base_langid_src"][part], out["base_langid_tgt"][part] = langid_badness(lid, lid_sides, pairs)
            rejects[lo:lo + CHUNK] += langid_rejects(out["base_langid_src"][part], out["base_langid_tgt"][part])
            seconds["base_langid"] = round(seconds.get("base_langid", 0.0) + time.time() - t0, 3)
        out["base_opusfilter"][rows] = rejects
        t0 = time.time()
        out["base_wordalign_src"][rows], out["base_wordalign_tgt"][rows] = wordalign(
            text, rows, s, t, workdir, None if train is None else train[direction])
        seconds["base_wordalign"] = round(seconds.get("base_wordalign", 0.0) + time.time() - t0, 3)
    return out


def text_key(sentence_ids: list[str], directions: list[str], src_text: list[str], tgt_text: list[str]) -> str:
    """What the cached columns were computed from: the rows, in order, with their text (and VERSION)."""
    from .rawtext import ListText

    names = sorted(set(directions))
    codes = np.array([names.index(d) for d in directions], dtype=np.int64)
    return rows_key(sentence_ids, ListText(src_text, tgt_text), codes, names)


def rows_key(sentence_ids: Any, text: Any, direction_codes: np.ndarray, direction_names: list[str]) -> str:
    """``text_key`` streamed over the rows of ``text``, ``CHUNK`` rows at a time (``sentence_ids``: a sequence or a
    pyarrow array)."""
    from .rawtext import _chunked
    from .wordalign import sample_digest

    h = hashlib.sha256(f"mtprune-baselines-{VERSION}\n".encode())
    ids, n = _chunked(sentence_ids), len(text)
    if len(ids) != n or len(direction_codes) != n:
        raise ValueError("sentence ids, directions and text differ in length")
    codes = np.asarray(direction_codes)
    for code in np.unique(codes):  # what the word-alignment models are fitted on (the pair's text, for a slice too)
        rows = np.flatnonzero(codes == code)
        h.update(f"wordalign {sample_digest(training_pairs(text, rows, direction_names[int(code)]))}\n".encode())
    for lo in range(0, n, CHUNK):
        part = range(lo, min(n, lo + CHUNK))
        for sid, code, (a, b) in zip(ids.slice(lo, CHUNK).to_pylist(), direction_codes[lo:lo + CHUNK],
                                     text.pairs(part), strict=True):
            h.update(f"{sid}\t{direction_names[code]}\t{a}\t{b}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def cached(path: Path, sentence_ids: list[str], directions: list[str], src_text: list[str], tgt_text: list[str],
           workdir: Path, seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """``cached_rows`` for rows held in lists."""
    from .rawtext import ListText

    names = sorted(set(directions))
    codes = np.array([names.index(d) for d in directions], dtype=np.int64)
    return cached_rows(path, sentence_ids, ListText(src_text, tgt_text), codes, names, workdir, seconds)


def cached_rows(path: Path, sentence_ids: Any, text: Any, direction_codes: np.ndarray, direction_names: list[str],
                workdir: Path, seconds: dict[str, float] | None = None,
                index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``compute_rows``'s columns, read from ``path`` when it holds them for exactly these rows and text, else
    (given the rows' training ``index``) assembled from the baseline shards beside ``path`` (``from_shards``), else
    computed and written to ``path`` (atomically) for the next run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..manifest import temp_path

    key = None  # a pass over every row's text: taken only when a cache file is there to compare with, or to write
    if path.is_file():
        key = rows_key(sentence_ids, text, direction_codes, direction_names)
        try:  # the key from the file's metadata first: the columns are read only when they are the ones wanted
            if _stored_key(path) == key:
                table = pq.read_table(path, columns=list(COLUMNS))
                if table.num_rows == len(text):
                    log.info("score: baseline columns reused from %s", path)
                    return {c: table.column(c).to_numpy() for c in COLUMNS}
        except (OSError, ValueError, pa.ArrowException) as e:
            log.warning("score: %s unreadable (%s); computing the baselines again", path, e)
    if index is not None and path.parent.is_dir():
        t0 = time.time()
        cols = from_shards(path.parent, index, sentence_ids, text, direction_codes, direction_names)
        if seconds is not None:
            seconds["base_from_shards"] = round(time.time() - t0, 3)
        if cols is not None:
            return cols
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = compute_rows(text, direction_codes, direction_names, path.parent, seconds)
    if key is None:
        key = rows_key(sentence_ids, text, direction_codes, direction_names)
    directions = pa.array(direction_names, pa.string()).take(pa.array(np.asarray(direction_codes)))
    table = pa.table({"sentence_id": sentence_ids, "direction": directions, **cols})
    table = table.replace_schema_metadata({"mtprune": json.dumps({"key": key, "version": VERSION})})
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return cols


# ---- baseline shards: the columns of slice I of N, computed by a CPU job of their own -------------------

def shard_file(folder: Path, index: int, count: int) -> Path:
    """Where ``mtprune score --baselines I/N`` writes the ``base_*`` columns of slice I of N."""
    return folder / f"baselines-{index:04d}-of-{count:04d}.parquet"


class _Rows:
    """The rows ``rows`` of a ``RowText`` (or ``ListText``), numbered from 0: what one shard's key is taken over."""

    def __init__(self, text: Any, rows: np.ndarray) -> None:
        self.text, self.rows = text, rows

    def __len__(self) -> int:
        return len(self.rows)

    def pairs(self, part: np.ndarray | range) -> Any:
        return self.text.pairs(self.rows[np.asarray(part, dtype=np.int64)])

    @property
    def direction_sample(self) -> Any:
        """The whole text's (``training_pairs``): a slice's models are the whole table's."""
        return getattr(self.text, "direction_sample", None)


def _stored_key(path: Path) -> str | None:
    """The key a cache file of the ``base_*`` columns was written with; None when it lacks a column. Raises what
    pyarrow raises for an unreadable file."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if not set(COLUMNS) <= set(schema.names):
        return None
    return json.loads((schema.metadata or {}).get(b"mtprune", b"{}")).get("key")


def from_shards(folder: Path, index: np.ndarray, sentence_ids: Any, text: Any, direction_codes: np.ndarray,
                direction_names: list[str]) -> dict[str, np.ndarray] | None:
    """Every ``base_*`` column of the score table's rows, assembled from a complete set of baseline shards in
    ``folder`` (one ``baselines-I-of-N.parquet`` per slice of some count N) each holding its slice's columns for
    exactly the text these rows have now; None when no set is complete and current.

    ``index`` is each row's fairseq training index (the score table's ``index`` column): slice I of N is the rows
    whose index is in ``shards.shard_indices(n, I, N)``, as in the shard job. A set whose text changed (a new
    download) or that misses a slice is passed over, and the columns are computed in the merge as without shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .rawtext import _chunked
    from .shards import shard_counts, shard_indices

    n = len(text)
    index = np.asarray(index, dtype=np.int64)
    if n == 0 or len(index) != n or index.min() < 0 or index.max() >= n:
        return None
    pos = np.full(n, -1, dtype=np.int64)
    pos[index] = np.arange(n)
    if (pos < 0).any():
        return None  # the table is not every training index once
    ids = _chunked(sentence_ids)
    for count in shard_counts(folder, "baselines"):
        files = [shard_file(folder, i, count) for i in range(count)]
        if not all(f.is_file() for f in files):
            continue
        out = {c: np.full(n, np.nan) for c in COLUMNS}
        for i, f in enumerate(files):
            rows = pos[shard_indices(n, i, count)]
            key = rows_key(ids.take(pa.array(rows)), _Rows(text, rows), direction_codes[rows], direction_names)
            try:
                stored = _stored_key(f)
            except (OSError, ValueError, pa.ArrowException):
                stored = None
            if stored != key:
                log.info("score: baseline shards of %d: %s was computed from other text; not used", count, f.name)
                break
            table = pq.read_table(f, columns=list(COLUMNS))
            if table.num_rows != len(rows):
                break
            for c in COLUMNS:
                out[c][rows] = table.column(c).to_numpy()
        else:
            log.info("score: baseline columns assembled from %d shard%s in %s", count, "s" if count > 1 else "",
                     folder)
            return out
    return None
