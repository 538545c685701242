"""Length-bucketed batches, shared by scoring (score) and beam search (evaluate)."""

from __future__ import annotations

import numpy as np


def length_batches(indices: np.ndarray, sizes: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """Split ``indices`` into batches of similar length, each within ``max_tokens`` padded tokens.

    ``sizes`` are per-example lengths indexed by example id (e.g. ``[tgt_sizes, src_sizes]``): the
    examples are sorted by the first, then the next (stable, so equal lengths keep their order), and
    a batch's padded size is its longest example (all ``sizes`` added up) times its number of
    examples. An example longer than ``max_tokens`` on its own still gets a batch of one.
    """
    indices = np.asarray(indices, dtype=np.int64)
    keys = [np.asarray(s)[indices] for s in sizes]
    order = indices[np.lexsort(keys[::-1])] if len(indices) else indices
    total = np.sum([np.asarray(s)[order] for s in sizes], axis=0, dtype=np.int64) if len(order) else order
    batches, start, longest = [], 0, 0
    for i, length in enumerate(total.tolist()):
        longest = max(longest, length)
        if i > start and longest * (i - start + 1) > max_tokens:
            batches.append(order[start:i])
            start, longest = i, length
    if len(order) > start:
        batches.append(order[start:])
    return batches
