"""How the scoring pass's per-pair arrays are kept on disk: the gradient sketch and the pooled encoder states
(``04_score/shards/*.sketch.npy``, ``*.pooled.npy``, the merged ``grad_sketch.npy``), written through memory
maps so that the corpus's size stays on disk, in float16, the pooled states of wide models projected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def open_npy(path: Path, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """A .npy file of ``shape`` open for writing (a memory map, so corpus size stays on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if 0 in shape:  # numpy cannot map an empty file
        with open(path, "wb") as f:
            np.save(f, np.zeros(shape, dtype=dtype))
        return np.zeros(shape, dtype=dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


# The gradient sketch is stored in float16 (512 bytes a pair): its entries are of the order of a pair's output-layer
# gradient norm over 16, far inside float16's range, and ``group`` sums them in float64.
SKETCH_DTYPE = np.float16

# The pooled encoder states kept for ``proto`` are stored in float16 and, for a model wider than this, projected
# onto the leading right singular vectors of the checkpoint's pooled states over the valid split (the same
# basis in every shard): 128 bytes a pair and checkpoint whatever the model's width (a 512-dim model's float32
# states took 2 KB). On 12,000 Tatoeba en-es pairs (128-dim proxy, 4 checkpoints) the proto column from 64 such
# dimensions ranks the pairs as the full states do to Spearman 0.97, what two k-means seeds on the full states
# agree to; a seeded Gaussian projection to 64 dimensions reached only 0.70.
POOLED_DIMS = 64


def pooled_basis(states: Any) -> Any:
    """The (D, POOLED_DIMS) float32 basis the pooled states are projected on, from ``states`` (n, D), the
    checkpoint's pooled states of the valid split: their leading right singular vectors (not centred: k-means
    sees cosines, which the mean direction dominates), zero columns where n < POOLED_DIMS. None where
    D <= POOLED_DIMS: the states are kept whole."""
    import torch

    dim = states.shape[1]
    if dim <= POOLED_DIMS:
        return None
    _, _, vt = torch.linalg.svd(states.double().cpu(), full_matrices=False)
    basis = torch.zeros(dim, POOLED_DIMS, dtype=torch.float32)
    k = min(POOLED_DIMS, vt.shape[0])
    basis[:, :k] = vt[:k].T.float()
    return basis


def flush_npy(a: np.ndarray) -> None:
    getattr(a, "flush", lambda: None)()
