"""The ``proto`` score (Sorscher et al. 2022): distance of a pair's pooled encoder state to the nearest
k-means centroid of its language pair and direction, computed after the pass (after shards are merged)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .forward import Checkpoint

EXACT_KMEANS_ROWS = 50_000


def proto_distances(pooled: np.ndarray, groups: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """Cosine distance of each row's pooled state to its nearest k-means centroid, per group and model.

    ``pooled`` (n, M, D) mean-pooled encoder states of M models, ``groups`` (n,) a label per row (the
    language pair and direction): for each group and model the L2-normalised states are clustered
    with scikit-learn (``clusters`` centroids, at most the group's size, fixed seed; ``KMeans`` up to
    ``EXACT_KMEANS_ROWS`` rows, ``MiniBatchKMeans`` beyond, whose cost does not grow with iterations
    over the whole group), and the distance is ``1 − max_c cos(x, c)``. Returns (n, M) float64.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n, n_models = pooled.shape[:2]
    out = np.zeros((n, n_models), dtype=np.float64)
    for g in sorted(set(groups.tolist())):
        rows = np.flatnonzero(groups == g)
        for k in range(n_models):
            x = np.asarray(pooled[rows, k], dtype=np.float32)
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            k_eff = min(clusters, len(rows))
            km = (KMeans(n_clusters=k_eff, random_state=seed, n_init=1) if len(rows) <= EXACT_KMEANS_ROWS else
                  MiniBatchKMeans(n_clusters=k_eff, random_state=seed, n_init=3, batch_size=4096)).fit(x)
            c = km.cluster_centers_.astype(np.float32)
            c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
            out[rows, k] = 1.0 - (x @ c.T).max(axis=1).astype(np.float64)
    return out


def with_proto(table: Any, pooled: np.ndarray, ckpts: list[Checkpoint], clusters: int) -> Any:
    import pyarrow as pa

    from .rawtext import _codes

    pair, _ = _codes(table.column("pair"))
    direction, names = _codes(table.column("direction"))
    groups = pair * max(len(names), 1) + direction  # one integer per language pair and direction
    dist = proto_distances(pooled, groups, clusters)
    table = table.append_column("proto", pa.array(dist.mean(axis=1)))
    for k, c in enumerate(ckpts):
        table = table.append_column(f"proto@{c.tag}", pa.array(dist[:, k]))
    return table
