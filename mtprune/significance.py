"""Paired significance tests between the sweep's models, with sacrebleu's own implementation.

What is tested: BLEU on the concatenation of the test sets, one p-value per comparison. With
several training seeds the hypotheses of all seeds are concatenated too (seed k of one model
beside seed k of the other, the references repeated), as MultEval does (Clark et al. 2011): the
test asks whether the seed-pooled systems differ beyond what resampling the test sentences
explains. It says nothing about the spread between seeds, which the report shows as ± std.

BLEU is tokenized as the BLEU table tokenizes it: by target language (sacrebleu's ``trg_lang``: zh,
ja-mecab, ko-mecab, else 13a). When the pooled test sets need different tokenizers, every line is
tokenized with its own set's tokenizer first and the test scores the result with ``tokenize='none'``,
which gives each line the n-grams its own tokenizer would.

Two systems that cannot be told apart are not called different: a system byte-identical to its baseline is
not tested at all (p = 1, marked ``identical``), and a resample whose difference ties the observed one counts
as being as extreme as it (sacrebleu counts only those strictly beyond, so a difference of exactly 0 in every
resample, as when one sentence differs in words no reference has, got the floor p = 1/(n+1)).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("mtprune")


@dataclass(frozen=True)
class Comparison:
    system: str
    baseline: str
    bleu: float  # corpus BLEU of the pooled hypotheses
    baseline_bleu: float
    p_value: float
    identical: bool = False  # the same hypotheses as the baseline: not tested, p = 1


def bleu_for(tgt_langs: Sequence[str], systems: list[tuple[str, Sequence[str]]],
             refs: Sequence[str]) -> tuple[object, list[tuple[str, list[str]]], list[str]]:
    """(BLEU metric, systems, refs) to test with: one tokenizer when every line's target language
    (``tgt_langs``, line-aligned with ``refs``) takes the same one, else each line pre-tokenized by
    its own language's tokenizer and a BLEU that only splits on spaces."""
    from sacrebleu.metrics import BLEU

    if len(tgt_langs) != len(refs):
        raise ValueError(f"{len(tgt_langs)} target languages for {len(refs)} references")
    by_lang = {lang: BLEU(trg_lang=lang) for lang in dict.fromkeys(tgt_langs)}
    if len({b.tokenizer.signature() for b in by_lang.values()}) <= 1:
        lang = next(iter(by_lang), "")
        return BLEU(trg_lang=lang), [(n, list(h)) for n, h in systems], list(refs)

    def tok(lines: Sequence[str]) -> list[str]:
        return [by_lang[lang].tokenizer(line.rstrip()) for lang, line in zip(tgt_langs, lines, strict=True)]

    return BLEU(tokenize="none", force=True), [(n, tok(h)) for n, h in systems], tok(refs)


def paired_test(baseline: tuple[str, Sequence[str]], systems: list[tuple[str, Sequence[str]]],
                refs: Sequence[str], test_type: str = "bs", n_samples: int = 0,
                tgt_langs: Sequence[str] | None = None) -> tuple[list[Comparison], str]:
    """Each of ``systems`` against ``baseline`` (all hypotheses line-aligned with ``refs``):
    sacrebleu.significance.PairedTest, ``bs`` (paired bootstrap resampling) or ``ar`` (approximate
    randomization); ``n_samples`` 0 takes sacrebleu's default. ``tgt_langs``: each reference line's
    target language, for the tokenizer (none: 13a). Returns the comparisons and the test's BLEU
    signature (with the test type, samples and seed)."""
    from sacrebleu.significance import PairedTest

    if not systems:
        return [], ""
    bleu, tested, refs = bleu_for(tgt_langs if tgt_langs is not None else [""] * len(refs), [baseline, *systems], refs)
    same = {name for name, hyps in systems if list(hyps) == list(baseline[1])}
    # the baseline alone (every system a copy of it) still gives its BLEU and the test's signature
    test = PairedTest([tested[0]] + [s for s in tested[1:] if s[0] not in same], {"BLEU": bleu}, [refs],
                      test_type=test_type, n_samples=n_samples)
    with _ties_counted():
        signatures, scores = test()
    base = scores["BLEU"][0]
    found = dict(zip(scores["System"][1:], scores["BLEU"][1:], strict=True))
    out = [Comparison(name, baseline[0], float(base.score), float(base.score), 1.0, identical=True) if name in same
           else Comparison(name, baseline[0], float(found[name].score), float(base.score), float(found[name].p_value))
           for name, _ in systems]
    return out, str(signatures["BLEU"])


@contextmanager
def _ties_counted() -> Iterator[None]:
    """Inside the block, sacrebleu's paired tests count a resample whose difference ties the observed one as at
    least as extreme (its ``_compute_p_value`` counts only ``>``); everything else (the resamples, their seed,
    the signature) stays its own. PairedTest runs in this process (or in processes forked inside the block), so
    the swap reaches it."""
    import numpy as np
    import sacrebleu.significance as sb

    strict = getattr(sb, "_compute_p_value", None)
    if strict is None:  # a sacrebleu that computes p elsewhere: its own counting, with a warning that says so
        log.warning("significance: this sacrebleu has no _compute_p_value; ties are counted as it counts them")
        yield
        return

    def with_ties(stats: np.ndarray, real_difference: float) -> float:
        return (int(np.sum(stats >= real_difference)) + 1) / (len(stats) + 1)

    sb._compute_p_value = with_ties
    try:
        yield
    finally:
        sb._compute_p_value = strict
