"""Known noise injected into a real corpus, so a scorer can be measured on the user's own data.

``download.noise`` corrupts a seeded fraction of each pair's cleaned, subsampled training pairs;
the kinds (``config.NOISE_KINDS``) are those web-crawled bitext really has. The *target* is the
side the model translates into: the non-English side, or English with ``download.direction: xx-en``.
Rows are ``(n, text_l1, text_l2)`` as in the download stage; ``n`` is the sentence id's number.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from .config import OPUS_PAIRS
from .errors import UsageError

Row = tuple[int, str, str]
POOL_SIZE = 20_000  # third-language sentences kept per donor pair for `wrong_language`
SAME_LENGTH_TOLERANCE = 0.10  # `misaligned_same_length`: target length (characters) within 10 %
TRUNCATE_TO = (0.2, 0.5)  # `truncated`: keep this fraction of the target's words
TRIES = 20  # random draws before a pair is judged unfit for a kind (e.g. a corpus of duplicates)


def target_index(pair: str, direction: str) -> int:
    """1 or 2: which text of a row is the target (``pair`` names l1-l2)."""
    l1, l2 = pair.split("-")
    tgt = "en" if direction == "xx-en" else (l2 if l1 == "en" else l1)
    return 1 if tgt == l1 else 2


def third_language_index(pair: str) -> int:
    """1 or 2: the non-English text of a row of ``pair`` (a third language for every other pair)."""
    return 2 if pair.split("-")[0] == "en" else 1


def pool_of(texts: Sequence[str], seed: str) -> list[str]:
    """A seeded sample of at most POOL_SIZE sentences."""
    if len(texts) <= POOL_SIZE:
        return list(texts)
    return random.Random(seed).sample(list(texts), POOL_SIZE)


def reservoir(texts: Iterable[str], seed: str) -> list[str]:
    """A seeded uniform sample of at most POOL_SIZE non-empty lines of a stream, in O(POOL_SIZE) memory."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = 0
    for t in texts:
        t = " ".join(t.split())
        if not t:
            continue
        seen += 1
        if len(out) < POOL_SIZE:
            out.append(t)
        else:
            k = rng.randrange(seen)
            if k < POOL_SIZE:
                out[k] = t
    return out


def local_donor_pairs(root: Path, pair: str) -> list[str]:
    """Other OPUS-100 pairs present in a local copy (for `wrong_language` with a single pair)."""
    return [p for p in OPUS_PAIRS if p != pair and (root / p).is_dir()]


def no_donor_error(pair: str, source: str) -> UsageError:
    return UsageError(
        f"download.noise.kinds: wrong_language needs sentences in a third language, but download.pairs "
        f"has only {pair} and source {source} offers no other pair; add a pair to download.pairs or drop "
        f"wrong_language from download.noise.kinds")


def balanced_counts(kinds: Sequence[str], m: int, rng: random.Random) -> dict[str, int]:
    """How many of ``m`` corrupted pairs get each kind: m // len(kinds), a random few one more."""
    base, extra = divmod(m, len(kinds))
    more = set(rng.sample(list(kinds), extra))
    return {k: base + (k in more) for k in kinds}


class _Corrupter:
    def __init__(self, rows: Sequence[Row], tgt: int, pools: Sequence[list[str]], kinds: Sequence[str],
                 rng: random.Random) -> None:
        self.rows, self.tgt, self.src = rows, tgt, 3 - tgt
        self.pools = [p for p in pools if p]
        self.rng = rng
        if "misaligned_same_length" in kinds:
            by_len = sorted(range(len(rows)), key=lambda i: (len(rows[i][tgt]), i))
            self.by_len = by_len
            self.lens = [len(rows[i][tgt]) for i in by_len]

    def apply(self, kind: str, i: int) -> tuple[str, str] | None:
        """The corrupted ``(text_l1, text_l2)`` of row ``i``, or None when this kind cannot change it."""
        row = self.rows[i]
        src, tgt = row[self.src], row[self.tgt]
        new_tgt: str | None
        if kind == "swapped":
            return None if src == tgt else (row[2], row[1])
        if kind == "untranslated":
            new_tgt = None if src == tgt else src
        elif kind == "misaligned":
            new_tgt = self._other_target(i, range(len(self.rows)))
        elif kind == "misaligned_same_length":
            n = len(tgt)
            tol = max(1, round(SAME_LENGTH_TOLERANCE * n))
            lo, hi = bisect.bisect_left(self.lens, n - tol), bisect.bisect_right(self.lens, n + tol)
            new_tgt = self._other_target(i, self.by_len[lo:hi])
        elif kind == "wrong_language":
            new_tgt = None
            for _ in range(TRIES):
                t = self.rng.choice(self.rng.choice(self.pools)) if self.pools else tgt
                if t != tgt:
                    new_tgt = t
                    break
        elif kind == "truncated":
            words = tgt.split()
            if len(words) < 2:
                return None
            keep = round(len(words) * self.rng.uniform(*TRUNCATE_TO))
            new_tgt = " ".join(words[: min(len(words) - 1, max(1, keep))])
        elif kind == "repeated":
            words = tgt.split()
            start = self.rng.randrange(len(words))
            stretch = words[start: start + self.rng.randint(1, min(4, len(words) - start))]
            new_tgt = " ".join(words[:start] + stretch * self.rng.randint(3, 5))
        else:
            raise ValueError(f"unknown noise kind {kind!r}")
        if new_tgt is None or new_tgt == tgt:  # e.g. `repeated` on a target that already loops
            return None
        return (new_tgt, src) if self.tgt == 1 else (src, new_tgt)

    def _other_target(self, i: int, among: Sequence[int]) -> str | None:
        """The target of another random row of ``among`` whose source and target both differ from row i's."""
        if len(among) < 2:
            return None
        row = self.rows[i]
        for _ in range(TRIES):
            other = self.rows[among[self.rng.randrange(len(among))]]
            if other[self.tgt] != row[self.tgt] and other[self.src] != row[self.src]:
                return other[self.tgt]
        return None


def inject(rows: Sequence[Row], *, rate: float, kinds: Sequence[str], seed: str, tgt: int,
           pools: Sequence[list[str]] = (), exclude: Iterable[int] = ()) -> tuple[list[Row], dict[int, str]]:
    """Corrupt ``round(rate * len(rows))`` rows; returns the new rows and ``{n: kind}`` for the corrupted.

    Kinds are spread as evenly as possible over the corrupted rows. A row that a kind cannot change
    (``untranslated`` on a pair whose two sides are equal, ``truncated`` on a one-word target, ...)
    gets another kind still due, or stays clean, so every label marks a visible corruption. Rows
    whose ``n`` is in ``exclude`` (already labelled noise) are never chosen.
    """
    rng = random.Random(seed)
    m = round(rate * len(rows))
    if m == 0:
        return list(rows), {}
    remaining = balanced_counts(kinds, m, rng)
    excluded = set(exclude)
    corrupter = _Corrupter(rows, tgt, pools, kinds, rng)
    out = list(rows)
    labels: dict[int, str] = {}
    for i in rng.sample(range(len(rows)), len(rows)):
        due = [k for k in kinds if remaining[k] > 0]
        if not due:
            break
        if rows[i][0] in excluded:
            continue
        # a kind drawn in proportion to what is still due, then the others still due
        first = rng.choices(due, weights=[remaining[k] for k in due])[0]
        for kind in [first] + [k for k in due if k != first]:
            new = corrupter.apply(kind, i)
            if new is not None:
                out[i] = (rows[i][0], *new)
                labels[rows[i][0]] = kind
                remaining[kind] -= 1
                break
    return out, labels
