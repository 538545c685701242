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
| ``base_wordalign_src``, ``base_wordalign_tgt`` | ``WordAlignFilter`` | eflomal's alignment score in each direction (lower: better aligned) |
| ``base_opusfilter`` | all of the above but word alignment | how many of them reject the pair at OpusFilter's default thresholds |

``base_opusfilter > 0`` is what the ``opusfilter`` prune strategy drops: the pairs a user running these filters
with their defaults would remove. Word alignment is left out of it: its default thresholds (0) presume priors
learnt from clean data, and with priors learnt from the corpus itself they reject most of it (83 % of 12,000
Tatoeba en-es pairs).

Language id is restricted to the run's languages and ``EXTRA_LANGS`` (lingua names the most likely of those;
among all 75 of its languages short sentences are often taken for a rarer neighbour). Word alignment uses
priors that eflomal learns, unsupervised, from the very pairs it then scores (OpusFilter's ``make_priors``),
per translation direction, both sides Moses-tokenised. eflomal seeds its sampler from ``/dev/urandom`` and
has no seed option: the ``base_wordalign_*`` columns are the only ones a fresh computation does not reproduce
bit for bit, so they are computed once per corpus and kept (``04_score/shards/baselines.parquet``, keyed by
the text itself): a rerun of the score stage reuses them.

Rows are scored per translation direction (``direction`` column: ``src-tgt``), so a run with both directions
scores each sentence pair once each way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mtprune")

VERSION = 1  # bump when a column's definition changes: cached baselines are then recomputed
COLUMNS = ("base_lengthratio_char", "base_lengthratio_word", "base_langid_src", "base_langid_tgt", "base_similarity",
           "base_terminalpunct", "base_numerals", "base_repetition", "base_wordalign_src", "base_wordalign_tgt",
           "base_opusfilter")
# besides the run's own languages, so that a target in another common language is recognised as such
EXTRA_LANGS = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "nb", "pl", "cs", "ro", "hu", "fi", "tr",
               "ru", "el", "ca", "eo", "zh", "ja", "ar")
RATIO_CAP = 1e6  # LengthRatioFilter gives inf for an empty side; parquet, ranks and plots want a number


def _quiet_opusfilter() -> None:
    # LinguaFilter and the tokenizers log at INFO/WARNING for every instance; the stage logs its own summary
    for name in ("opusfilter", "eflomal", "mosestokenizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lingua_codes(codes: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """The ISO 639-1 codes among ``codes`` that lingua can identify."""
    from lingua import IsoCode639_1

    return sorted(c for c in set(codes) if hasattr(IsoCode639_1, c.upper()))


def langid_badness(pairs: list[tuple[str, str]], src: str, tgt: str, run_langs: list[str]) -> tuple[np.ndarray, ...]:
    """(1 - confidence in ``src`` of each source, the same for the target); NaN for a language lingua lacks."""
    from opusfilter.lid import LinguaFilter

    known = lingua_codes({*EXTRA_LANGS, *run_langs, src, tgt})
    out = [np.full(len(pairs), np.nan), np.full(len(pairs), np.nan)]
    if src not in known or tgt not in known:
        missing = [c for c in (src, tgt) if c not in known]
        log.warning("score: base_langid: lingua cannot identify %s; those rows get no base_langid value",
                    ", ".join(missing))
    if not pairs or (src not in known and tgt not in known):
        return tuple(out)
    f = LinguaFilter(languages=[src if src in known else "en", tgt if tgt in known else "en"],
                     langid_languages=known, lingua_mode="low")
    conf = np.array(list(f.score(pairs)), dtype=np.float64)
    for side, code in enumerate((src, tgt)):
        if code in known:
            # lingua's sums run in a varying order between processes (last bits differ): rounded to 1e-6
            out[side] = np.round(1.0 - conf[:, side], 6)
    return tuple(out)


def langid_rejects(bad_src: np.ndarray, bad_tgt: np.ndarray) -> np.ndarray:
    """LinguaFilter's default decision (thresholds 0: a side is rejected when another language wins), from
    the two ``base_langid_*`` columns; a side lingua cannot identify is not rejected."""
    return (np.nan_to_num(bad_src) >= 1.0) | (np.nan_to_num(bad_tgt) >= 1.0)


def wordalign(pairs: list[tuple[str, str]], src: str, tgt: str, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """eflomal's scores of each pair (source->target, target->source) with priors learnt from ``pairs``."""
    from opusfilter.word_alignment import WordAlignFilter, make_priors

    nan = np.full(len(pairs), np.nan)
    if len({p for p in pairs if p[0].strip() and p[1].strip()}) < 2:
        return nan, nan.copy()  # eflomal needs a corpus to learn from
    toks = (("moses", src), ("moses", tgt))
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".wordalign.") as tmp:
        s_file, t_file, priors = Path(tmp, "src"), Path(tmp, "tgt"), Path(tmp, "priors")
        s_file.write_text("".join(" ".join(p[0].split()) + "\n" for p in pairs), encoding="utf-8")
        t_file.write_text("".join(" ".join(p[1].split()) + "\n" for p in pairs), encoding="utf-8")
        make_priors(str(s_file), str(t_file), str(priors), src_tokenizer=toks[0], tgt_tokenizer=toks[1])
        f = WordAlignFilter(priors=str(priors), src_tokenizer=toks[0], tgt_tokenizer=toks[1])
        scores = np.array(list(f.score(pairs)), dtype=np.float64).reshape(len(pairs), 2)
    scores = finite(scores)
    return scores[:, 0], scores[:, 1]


def finite(scores: np.ndarray) -> np.ndarray:
    """eflomal gives an infinite score to a pair it cannot align at all; the ranks, the noise table's AUROC and
    the plots need numbers: +-inf becomes +-RATIO_CAP (still the worst / best value of the column)."""
    return np.where(np.isinf(scores), np.sign(scores) * RATIO_CAP, scores)


def _simple(pairs: list[tuple[str, str]]) -> dict[str, tuple[Any, Any]]:
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
    """Every ``base_*`` column for rows of (source, target, ``direction`` "src-tgt"); ``seconds`` receives the
    CPU/wall time per filter."""
    _quiet_opusfilter()
    seconds = {} if seconds is None else seconds
    n = len(src_text)
    out = {c: np.full(n, np.nan) for c in COLUMNS}
    dirs = np.asarray(directions)
    run_langs = sorted({lang for d in set(directions) for lang in d.split("-")})
    for direction in sorted(set(directions)):
        s, t = direction.split("-")
        rows = np.flatnonzero(dirs == direction)
        pairs = [(src_text[i], tgt_text[i]) for i in rows]
        rejects = np.zeros(len(rows))
        for name, (filt, orient) in _simple(pairs).items():
            t0 = time.time()
            raw = list(filt.score(pairs))
            out[name][rows] = [orient(x) for x in raw]
            rejects += [not filt.accept(x) for x in raw]
            seconds[name] = round(seconds.get(name, 0.0) + time.time() - t0, 3)
        t0 = time.time()
        out["base_langid_src"][rows], out["base_langid_tgt"][rows] = langid_badness(pairs, s, t, run_langs)
        rejects += langid_rejects(out["base_langid_src"][rows], out["base_langid_tgt"][rows])
        out["base_opusfilter"][rows] = rejects
        seconds["base_langid"] = round(seconds.get("base_langid", 0.0) + time.time() - t0, 3)
        t0 = time.time()
        out["base_wordalign_src"][rows], out["base_wordalign_tgt"][rows] = wordalign(pairs, s, t, workdir)
        seconds["base_wordalign"] = round(seconds.get("base_wordalign", 0.0) + time.time() - t0, 3)
    return out


def text_key(sentence_ids: list[str], directions: list[str], src_text: list[str], tgt_text: list[str]) -> str:
    """What the cached columns were computed from: the rows, in order, with their text (and VERSION)."""
    h = hashlib.sha256(f"mtprune-baselines-{VERSION}\n".encode())
    for row in zip(sentence_ids, directions, src_text, tgt_text, strict=True):
        h.update("\t".join(row).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def cached(path: Path, sentence_ids: list[str], directions: list[str], src_text: list[str], tgt_text: list[str],
           workdir: Path, seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """``compute``'s columns, read from ``path`` when it holds them for exactly these rows and text, else
    computed and written there (atomically) for the next run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..manifest import temp_path

    key = text_key(sentence_ids, directions, src_text, tgt_text)
    if path.is_file():
        try:  # the key from the file's metadata first: the columns are read only when they are the ones wanted
            schema = pq.read_schema(path)
            meta = json.loads((schema.metadata or {}).get(b"mtprune", b"{}"))
            if meta.get("key") == key and set(COLUMNS) <= set(schema.names):
                table = pq.read_table(path, columns=list(COLUMNS))
                if table.num_rows == len(sentence_ids):
                    log.info("score: baseline columns reused from %s", path)
                    return {c: table.column(c).to_numpy() for c in COLUMNS}
        except (OSError, ValueError, pa.ArrowException) as e:
            log.warning("score: %s unreadable (%s); computing the baselines again", path, e)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = compute(src_text, tgt_text, directions, path.parent, seconds)
    table = pa.table({"sentence_id": sentence_ids, "direction": directions, **cols})
    table = table.replace_schema_metadata({"mtprune": json.dumps({"key": key, "version": VERSION})})
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return cols
