"""Paired significance tests between the sweep's models, with sacrebleu's own implementation.

What is tested: BLEU on the concatenation of the test sets, one p-value per comparison. With
several training seeds the hypotheses of all seeds are concatenated too (seed k of one model
beside seed k of the other, the references repeated), as MultEval does (Clark et al. 2011): the
test asks whether the seed-pooled systems differ beyond what resampling the test sentences
explains. It says nothing about the spread between seeds, which the report shows as ± std.
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


def paired_test(baseline: tuple[str, Sequence[str]], systems: list[tuple[str, Sequence[str]]],
                refs: Sequence[str], test_type: str = "bs", n_samples: int = 0) -> tuple[list[Comparison], str]:
    """Each of ``systems`` against ``baseline`` (all hypotheses line-aligned with ``refs``):
    sacrebleu.significance.PairedTest, ``bs`` (paired bootstrap resampling) or ``ar`` (approximate
    randomization); ``n_samples`` 0 takes sacrebleu's default. Returns the comparisons and the
    test's BLEU signature (with the test type, samples and seed)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if not systems:
        return [], ""
    test = PairedTest([baseline, *systems], {"BLEU": BLEU()}, [list(refs)], test_type=test_type,
                      n_samples=n_samples)
    signatures, scores = test()
    base = scores["BLEU"][0]
    out = [Comparison(name, baseline[0], float(r.score), float(base.score), float(r.p_value))
           for name, r in zip(scores["System"][1:], scores["BLEU"][1:], strict=True)]
    return out, str(signatures["BLEU"])
