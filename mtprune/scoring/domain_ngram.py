"""``base_domain_xent``: Moore & Lewis (2010) cross-entropy difference, bilingual (Axelrod et al. 2011), with
OpusFilter's ``CrossEntropyDifferenceFilter`` and VariKN n-gram language models.

For each language of the pair that has target text, two character n-gram models are trained with
``opusfilter.lm.train`` (VariKN's Kneser-Ney growing; OpusFilter's defaults but for ``norder``): an in-domain one
on the target sentences and a general one on ``sample`` evenly spaced rows of the pool (``np.linspace(0, n - 1,
sample).round()``, unique: the first and the last row always; every row when the pool has no more than ``sample``).
A row's value is the sum over those languages of H_in - H_general, each H the cross-entropy of the sentence in bits
per token under that model. **Low = like the target text, high = unlike it.**

Tokens are OpusFilter's ``LMTokenizer`` as its docs set it up for these filters (``train_ngram`` trains "a
character-based varigram language model"; ``segmentation: {type: char}``, word boundary ``wb: <w>``), so
``"Ein Mann"`` is ``<s> <w> E i n <w> M a n n <w> </s>``. Characters need no word vocabulary: a few hundred target
lines hold most of a pool's characters but few of its words (word models, ``type: none``, give AUROC 0.968 in the
test setting of ``tests/test_domain_ngram.py``, characters 0.994). ``order`` is VariKN's ``norder``, as given.
Character models are usually grown to orders 5 to 20 (OpusFilter's example sets no limit), but a target text of a
few hundred lines leaves the higher orders sparse: in the test setting orders 2 and 3 separate best (AUROC 0.994),
order 4 gives 0.988, 5 gives 0.978, and OpusFilter's defaults with no limit 0.92, so the config's default 3 is a
good one.

Where this differs from the filter called with its defaults, and why. ``_Filter`` is a subclass that replaces only
the per-sentence cross-entropy (``_get_ce``); the models, the tokenizer and the loop of ``score()`` are OpusFilter's:

- **Bits per token** (OpusFilter's ``token_perplexity``), as Moore & Lewis's per-word H is for words: with ``wb``
  set the filter divides by VariKN's *word* count, so one long word (or a string with no space) multiplies the
  difference. With OpusFilter's other defaults, per word gives AUROC 0.959 in the test setting, per token 0.992.
- **init_hist as meant.** ``opusfilter.lm.get_lm`` calls ``set_init_hist(2)`` and then ``init_variables()``, which
  resets it to 0, and ``score()`` calls ``init_variables()`` after every sentence: the filter scores ``<s>`` itself
  by its unigram probability (~10 bits a sentence, different in the two models: a bias by length). The history is
  set again before each sentence here, so ``<s>`` and the first ``<w>`` are context only.
- **Unknown characters count** (``include_unks: true``; OpusFilter drops them by default): a character the target
  text lacks (``?`` among image captions) is charged the in-domain model's ``<UNK>`` probability rather than left
  out of H_in, which favoured rows full of such characters (AUROC 0.994 against 0.993).
- VariKN's "Unknown token" warning (one stderr line per unknown token; ``init_variables()`` re-arms it) is switched
  off before each sentence, and what the trainer and the model reader print on file descriptor 2 is captured (and
  logged only when they fail). The symbol files ``get_lm`` writes with ``tempfile.mkstemp`` and never removes are
  removed once the models are read.

A sentence with no word (empty or whitespace) gets ``WORST`` on that side (1e6: the most unlike the target); a row
blank on both sides, 2e6. VariKN draws nothing at random (the library imports no random function; two runs write
byte-identical ARPA files and give identical scores), and values are rounded to ``DECIMALS``, since VariKN's float32
sums may differ in the last bits between builds and instruction sets.

Cost: linear in the pool. Memory: the pool's strings (the caller's), the float64 result, the sampled row numbers;
the sample's text is streamed to a file; VariKN adds about 100 MiB whatever the data (matrices sized for a 64,000
word vocabulary). Scoring is ~47 µs per row and side; training on 100,000 sampled rows ~3 s per side. Measured with
one core (``taskset -c 0``) of a 2-core machine with a training job running beside, pool = Tatoeba de-en + Multi30K
train lines repeated, target = Multi30K val (1,014 lines a side), both sides, ``order=3``, ``sample=100_000``
(the config's default), from the repository root::

    taskset -c 0 .venv/bin/python - 200000 <<'PY'
    import sys, tempfile, time
    from pathlib import Path
    from mtprune.scoring.domain_ngram import base_domain_xent
    D, n = Path("../shared/data"), int(sys.argv[1])
    rd = lambda p: p.read_text(encoding="utf-8").splitlines()
    base = {l: rd(D / f"tatoeba-opus100-layout/de-en/opus.de-en-train.{l}") + rd(D / f"multi30k-ende/train.{l}")
            for l in ("de", "en")}
    pool = {l: [f"{b[i % len(b)]} {i // len(b)}" for i in range(n)] for l, b in base.items()}
    target = {l: rd(D / f"multi30k-ende/val.{l}") for l in ("de", "en")}
    t = time.process_time()
    base_domain_xent(pool, target, 100_000, 3, Path(tempfile.mkdtemp()))
    print(n, time.process_time() - t)
    PY

    20,000 rows: 3.0 s CPU (peak RSS +109 MiB); 200,000 rows: 24.9 s CPU (+144 MiB);
    200,000 rows with sample=1,000: 18.7 s (nearly all of it scoring).

The models are written into ``workdir`` as ``<lang>.target.arpa`` and ``<lang>.general.arpa`` (under a temp name,
renamed when complete; the tokenized training text is a temp file there, removed after).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError

log = logging.getLogger("mtprune")

VERSION = 1  # part of the caller's cache key: bump when the column's definition changes
WORST = 1e6  # a side with no word: the most unlike the target (baselines.RATIO_CAP)
DECIMALS = 6
INIT_HIST = 2  # tokens after a sentence start that are context only: <s> and the first <w> (OpusFilter's default)
# the tokenizer and perplexity parameters of every model (OpusFilter's lm_params keys)
LM_PARAMS: dict[str, Any] = {"segmentation": {"type": "char"}, "wb": "<w>", "mb": "", "include_unks": True,
                             "arpa": True}
_PATCH_LOCK = threading.Lock()
TRAIN_PARAMS: dict[str, Any] = {"dscale": 0.001, "cutoffs": "0 0 1", "arpa": True}  # OpusFilter's defaults


def sample_rows(n: int, sample: int) -> np.ndarray:
    """The pool rows the general models are trained on: ``sample`` evenly spaced ones, all when ``n <= sample``."""
    if n <= sample:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, sample).round().astype(np.int64))


def blank(sentence: str) -> bool:
    return not sentence.strip()  # LMTokenizer splits on str.split()'s whitespace: no word at all


def base_domain_xent(pool: dict[str, list[str]], target: dict[str, list[str] | None], sample: int, order: int,
                     workdir: Path) -> np.ndarray:
    """pool: language code -> the training pool's sentences on that side (same length for both languages, row i of
    each is pair i). target: language code -> in-domain sentences of that language, or None for a side the user lacks
    (at least one side is given). Returns float64 (n,) with, for each pool row, the sum over the sides that have
    target text of H_in(side) - H_general(side): the per-token cross-entropy under an n-gram LM trained on the target
    sentences of that language minus that under one trained on `sample` evenly spaced rows of the pool
    (all rows when the pool has fewer). Low = like the target text; HIGH = UNLIKE the target (that orientation is
    the contract). `workdir` is a folder the function may write its LMs into (create it; leave only finished files)."""
    sides = [lang for lang, lines in target.items() if lines is not None]
    if not sides:
        raise ValueError("base_domain_xent: target has no side with text (every side is None)")
    unknown = [lang for lang in target if lang not in pool]
    if unknown:
        raise ValueError(f"base_domain_xent: target language {unknown[0]!r} is not a side of the pool "
                         f"({', '.join(pool)})")
    lengths = {len(v) for v in pool.values()}
    if len(lengths) > 1:
        raise ValueError(f"base_domain_xent: pool sides differ in length: "
                         f"{ {k: len(v) for k, v in pool.items()} }")
    for lang in sides:
        if not any(not blank(s) for s in target[lang]):  # type: ignore[union-attr]
            raise InputError(f"score.target: no {lang} sentences in the target text")
    if sample < 1 or order < 1:
        raise ValueError(f"base_domain_xent: sample and order must be positive, got sample={sample}, order={order}")
    try:
        import varikn  # noqa: F401  (opusfilter.lm imports it only when a model is trained or read)
    except ImportError as e:
        raise UsageError("score.target: base_domain_xent needs VariKN's Python module: pip install varikn "
                         f"({e})") from None

    n = lengths.pop() if lengths else 0
    out = np.zeros(n, dtype=np.float64)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if n == 0:
        return out
    rows = sample_rows(n, sample)
    for lang in sides:
        sents = pool[lang]
        id_lm = _train(workdir / f"{lang}.target.arpa", target[lang], order)  # type: ignore[arg-type]
        nd_lm = _train(workdir / f"{lang}.general.arpa", (sents[i] for i in rows.tolist()), order)
        out += _score_side(sents, id_lm, nd_lm)
    return np.round(out, DECIMALS)


# ---- OpusFilter / VariKN ---------------------------------------------------------------------------

def _filter_class() -> type:
    from opusfilter.lm import CrossEntropyDifferenceFilter, token_perplexity

    class _Filter(CrossEntropyDifferenceFilter):
        """OpusFilter's filter with bits per token and a working ``init_hist`` (see the module docstring)."""

        @staticmethod
        def _get_ce(sent: str, model: Any, tokenizer: Any) -> float:
            model.set_init_hist(INIT_HIST)  # undone by the init_variables() after every sentence
            model.set_unk_warn(False)
            _, entropy, _ = token_perplexity(model, tokenizer.tokenize(_safe(sent)))
            return entropy

    return _Filter


def _score_side(sents: list[str], id_lm: Path, nd_lm: Path) -> np.ndarray:
    """H_in - H_general of every sentence of one language; ``WORST`` for a blank one."""
    with _quiet_stderr("reading the n-gram models"), _temp_token_files_removed():
        filt = _filter_class()(id_lm_params=[{**LM_PARAMS, "filename": str(id_lm)}],
                               nd_lm_params=[{**LM_PARAMS, "filename": str(nd_lm)}], score_for_empty=None)
    values = np.full(len(sents), WORST, dtype=np.float64)
    rows = (i for i, s in enumerate(sents) if not blank(s))  # lazy, both: no per-row list is held
    scored = filt.score([s] for s in sents if not blank(s))
    for i, score in zip(rows, scored, strict=True):
        v = float(score[0])
        values[i] = round(v, DECIMALS) if math.isfinite(v) else WORST
    return values


def _train(path: Path, lines: Iterable[str], order: int) -> Path:
    """A VariKN model of ``lines`` at ``path`` (ARPA), through ``opusfilter.lm.train`` as its ``train_ngram``
    step does: every line tokenized by ``LMTokenizer``, one sentence a line."""
    from opusfilter import lm

    tokenizer = lm.LMTokenizer(**LM_PARAMS)
    fd, seg = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".seg.tmp", dir=path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace", newline="\n") as f:
            for line in lines:
                f.write(" ".join(tokenizer.tokenize(_safe(line))) + "\n")
        with _quiet_stderr(f"training {path.name}"):
            lm.train(seg, str(tmp), norder=order, **TRAIN_PARAMS)
        os.replace(tmp, path)
    finally:
        Path(seg).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


def _safe(line: str) -> str:
    """VariKN takes C strings: SWIG refuses a NUL and a lone surrogate (not UTF-8): replace them."""
    if "\x00" in line:
        line = line.replace("\x00", "\ufffd")
    if not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = line.encode("utf-8", "replace").decode("utf-8")
    return line


@contextlib.contextmanager
def _quiet_stderr(what: str) -> Iterator[None]:
    """VariKN's C++ code prints its progress to file descriptor 2: capture it; log its tail if ``what`` fails."""
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except Exception:
            os.dup2(saved, 2)
            capture.seek(0)
            tail = capture.read().decode("utf-8", "replace").strip().splitlines()[-20:]
            log.error("base_domain_xent: VariKN failed %s:\n%s", what, "\n".join(tail))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _temp_token_files_removed() -> Iterator[None]:
    """``opusfilter.lm.get_lm`` writes the ``wb``/``mb``/``ccs`` symbols to ``tempfile.mkstemp()`` files for VariKN
    to read and never removes them: remove the ones made here once the models are read."""
    from opusfilter import lm

    with _PATCH_LOCK:  # one patch at a time, so that every call puts back the real function
        original = getattr(lm, "_temptokenfile", None)  # a private helper of opusfilter 3.3.1
        if original is None:
            yield
            return
        me, made = threading.get_ident(), []

        def tracked(item: str) -> str:
            name = original(item)
            if threading.get_ident() == me:
                made.append(name)
            return name

        lm._temptokenfile = tracked
        try:
            yield
        finally:
            lm._temptokenfile = original
            for name in made:
                with contextlib.suppress(OSError):
                    os.unlink(name)
