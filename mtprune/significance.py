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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    system: str
    baseline: str
    bleu: float  # corpus BLEU of the pooled hypotheses
    baseline_bleu: float
    p_value: float


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
    test = PairedTest(tested, {"BLEU": bleu}, [refs], test_type=test_type, n_samples=n_samples)
    signatures, scores = test()
    base = scores["BLEU"][0]
    out = [Comparison(name, baseline[0], float(r.score), float(base.score), float(r.p_value))
           for name, r in zip(scores["System"][1:], scores["BLEU"][1:], strict=True)]
    return out, str(signatures["BLEU"])
