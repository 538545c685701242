"""A built-in toy parallel corpus with known injected noise, for the offline demo and tests.

"English" sentences come from a small grammar; each of the four target "languages" (named after
OPUS-100's de, es, fr, it) is a deterministic word cipher with its own word order (verb-final,
adjective after noun, ...), so a tiny model learns it in minutes. A fraction of the training pairs
is corrupted in three ways a pruning method should find: misaligned targets, untranslated copies
and truncated targets. Their sentence ids and kinds are returned so the report can score them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOUNS = ("cat dog bird house tree river city car book table teacher child doctor farmer king queen "
         "garden window door road mountain village friend letter song horse apple bread boat "
         "student mother father brother sister market school forest bridge island").split()
ADJS = "big small red green old young happy sad quick slow bright dark quiet loud warm cold".split()
VERBS = ("sees likes finds takes visits paints builds reads watches follows helps calls carries "
         "loves opens buys sells writes").split()
ADVS = "today often slowly quickly again always never here there now".split()
PREPS = "near behind under over beside inside".split()
DETS = ("the", "a", "every", "this", "that")
NUMS = "one two three four five six".split()

# word-order rules per pseudo-language: (adjective after noun, verb at the end)
ORDER = {"de": (False, True), "es": (True, False), "fr": (True, False), "it": (True, True)}
SYLLABLES = ("ka ro mi tu le sa no vi da pe lo ri zu be ta go fi me ne su ga po li ve ju "
             "ma ko di re wa").split()


@dataclass(frozen=True)
class SyntheticPair:
    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    test: list[tuple[str, str]]
    noise: dict[int, str]  # train line index -> kind of noise


def _lexicon(lang: str) -> dict[str, str]:
    rng = random.Random(f"lexicon-{lang}")
    words = sorted(set(NOUNS + ADJS + VERBS + ADVS + PREPS + list(DETS) + NUMS))
    used: set[str] = set()
    lex = {}
    for w in words:
        n = 1 + (len(w) > 3) + (len(w) > 6)
        while True:
            cand = "".join(rng.choice(SYLLABLES) for _ in range(n))
            n += rng.random() < 0.2  # grow the word when short names run out
            if cand not in used:
                used.add(cand)
                lex[w] = cand
                break
    return lex


def _noun_phrase(rng: random.Random) -> list[tuple[str, str]]:
    det = rng.choice(DETS + tuple(NUMS[:2]))
    out = [("D", det)]
    if rng.random() < 0.6:
        out.append(("A", rng.choice(ADJS)))
    out.append(("N", rng.choice(NOUNS)))
    if rng.random() < 0.25:
        out += [("P", rng.choice(PREPS)), ("D", rng.choice(DETS)), ("N", rng.choice(NOUNS))]
    return out


def _sentence(rng: random.Random) -> list[tuple[str, str]]:
    words = _noun_phrase(rng) + [("V", rng.choice(VERBS))] + _noun_phrase(rng)
    if rng.random() < 0.4:
        words.append(("R", rng.choice(ADVS)))
    return words


def _render_en(words: list[tuple[str, str]]) -> str:
    return " ".join(w for _, w in words)


def _render(words: list[tuple[str, str]], lang: str, lex: dict[str, str]) -> str:
    adj_after, verb_final = ORDER[lang]
    seq = list(words)
    if adj_after:
        i = 0
        while i < len(seq) - 1:
            if seq[i][0] == "A" and seq[i + 1][0] == "N":
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
                i += 2
            else:
                i += 1
    if verb_final:
        verb = [w for w in seq if w[0] == "V"]
        seq = [w for w in seq if w[0] != "V"] + verb
    return " ".join(lex[w] for _, w in seq)


def make_pair(pair: str, n_train: int, n_valid: int, n_test: int, noise: float, seed: int) -> SyntheticPair:
    """One language pair; texts are ``(l1, l2)`` in the pair's (alphabetical) order."""
    l1, l2 = pair.split("-")
    other = l2 if l1 == "en" else l1
    lex = _lexicon(other)
    rng = random.Random(f"{seed}-{pair}")

    def one() -> tuple[str, str]:
        words = _sentence(rng)
        en, xx = _render_en(words), _render(words, other, lex)
        return (en, xx) if l1 == "en" else (xx, en)

    train = [one() for _ in range(n_train)]
    valid = [one() for _ in range(n_valid)]
    test = [one() for _ in range(n_test)]
    en_side = 0 if l1 == "en" else 1
    noisy = rng.sample(range(n_train), round(noise * n_train))
    labels: dict[int, str] = {}
    for k, i in enumerate(noisy):
        kind = ("misaligned", "untranslated", "truncated")[k % 3]
        en, xx = train[i][en_side], train[i][1 - en_side]
        if kind == "misaligned":
            j = rng.randrange(n_train)
            while j == i:
                j = rng.randrange(n_train)
            xx = train[j][1 - en_side]
        elif kind == "untranslated":
            xx = en
        else:
            toks = xx.split()
            xx = " ".join(toks[: max(1, len(toks) // 3)])
        train[i] = (en, xx) if en_side == 0 else (xx, en)
        labels[i] = kind
    return SyntheticPair(train, valid, test, labels)
