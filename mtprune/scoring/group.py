"""Group-effect selection (Yang et al. 2023, "Dataset pruning: reducing training data by examining
generalization influence"), on the output-layer gradient sketch of ``04_score/grad_sketch.npy``.

Dropping a set S of pairs changes the summed training gradient by ``sum_{i in S} g_i``. The pairs whose
removal matters least *as a group* are the k whose summed sketch ``c = sum_{i in S} s_i`` has the
smallest norm -- a set of pairs that cancel each other out, not k individually small ones.

Finding the best S is a subset-selection problem; two steps give a good S fast:

1. Greedy: add the pair that minimises ``||c + s_i||^2 - ||c||^2 = 2<c, s_i> + ||s_i||^2``. The inner
   products ``d = X c`` with all rows are one matrix-vector product; to avoid one per pick, every round
   takes the ``pool`` best candidates by that gain, picks ``block`` of them one by one exactly (updating
   the pool's inner products with the pool's own rows) and then refreshes ``d`` for every row. With
   ``n <= pool`` this is the exact greedy.
2. Swap improvement: each round takes ``swap_candidates`` chosen pairs (the half whose removal shrinks
   ``c`` most, the other half at random, seeded) and as many unchosen ones (likewise), evaluates every
   exchange ``||c - s_i + s_j||^2`` at once from their Gram matrix, applies the best improving ones in
   turn (exactly, with the Gram updates), and stops after ``patience`` rounds without a gain or
   ``swap_rounds`` rounds. When the candidates cover all pairs this is exact best-improvement local
   search, run to a local optimum.

Same input and seed -> same set. BLAS runs on one thread (the products are small; threads only
contend). Measured on a busy 2-core machine, 50,000 x 256 float32 Gaussian rows of varying scale,
k = 20,000 (sparsity 0.4): greedy 10 s, with swaps and restarts 13 s in all; the dropped set's summed
sketch has norm 15 (about one row's norm, 16) against 2,950 for random sets of the same size. On
10 rows, k = 3 it matched brute force on 100 of 100 random cases.
"""

from __future__ import annotations

import numpy as np


def _pick(values: np.ndarray, among: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` entries of ``among`` with the smallest ``values`` (ties: lower index), sorted by index."""
    if m >= len(among):
        return among
    part = np.argpartition(values[among], m - 1)[:m]
    return np.sort(among[part])


# rows converted to float32 at a time when the sketch is stored narrower (float16): the sketch of a corpus of
# millions of pairs stays in its memory map instead of a float32 copy twice its size
_BLOCK_ROWS = 65_536


def _matvec(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``x @ v`` in float32 (float64 result), by blocks of rows when ``x`` is not float32."""
    v = v.astype(np.float32)
    if x.dtype == np.float32:
        return (x @ v).astype(np.float64)
    out = np.empty(x.shape[0], dtype=np.float64)
    for a in range(0, x.shape[0], _BLOCK_ROWS):
        out[a:a + _BLOCK_ROWS] = np.asarray(x[a:a + _BLOCK_ROWS], dtype=np.float32) @ v
    return out


def _sq_norms(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.float64)
    for a in range(0, x.shape[0], _BLOCK_ROWS):
        b = np.asarray(x[a:a + _BLOCK_ROWS], dtype=np.float32)
        out[a:a + _BLOCK_ROWS] = np.einsum("ij,ij->i", b, b, dtype=np.float64)
    return out


def group_norm(sketch: np.ndarray, chosen: np.ndarray) -> float:
    """``||sum_{i in chosen} s_i||`` in float64."""
    return float(np.linalg.norm(sketch[chosen].astype(np.float64).sum(axis=0)))


def group_select(sketch: np.ndarray, k: int, seed: int, *, pool: int = 2048, block: int = 256,
                 swap_candidates: int = 256, swap_rounds: int = 60, patience: int = 6, restarts: int = 8,
                 perturb: int = 3) -> np.ndarray:
    kw = dict(pool=pool, block=block, swap_candidates=swap_candidates, swap_rounds=swap_rounds, patience=patience,
              restarts=restarts, perturb=perturb)
    """Sorted indices of ``k`` rows of ``sketch`` (n x D) whose sum has (close to) the smallest norm."""
    try:  # many small matrix products: BLAS threads only contend (7x slower on a busy 2-core machine)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return _select(sketch, k, seed, **kw)
    with threadpool_limits(1):
        return _select(sketch, k, seed, **kw)


def _select(sketch: np.ndarray, k: int, seed: int, *, pool: int, block: int, swap_candidates: int,
            swap_rounds: int, patience: int, restarts: int, perturb: int) -> np.ndarray:
    x = sketch if sketch.dtype == np.float16 else np.ascontiguousarray(sketch, dtype=np.float32)
    n = x.shape[0]
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    sq = _sq_norms(x)
    chosen = np.zeros(n, dtype=bool)
    c = np.zeros(x.shape[1], dtype=np.float64)
    d = np.zeros(n, dtype=np.float64)  # <c, s_i> for every row
    count = 0
    while count < k:
        gain = 2 * d + sq
        gain[chosen] = np.inf
        cand = _pick(gain, np.flatnonzero(~chosen), pool)
        xp = x[cand].astype(np.float64)
        dp = d[cand].copy()
        free = np.ones(len(cand), dtype=bool)
        for _ in range(min(block, k - count)):
            g = np.where(free, 2 * dp + sq[cand], np.inf)
            j = int(np.argmin(g))
            free[j] = False
            dp += xp @ xp[j]
        chosen[cand[~free]] = True
        count += int((~free).sum())
        c += xp[~free].sum(axis=0)
        d = _matvec(x, c)
    rng = np.random.default_rng(seed)
    tol = 1e-9 * float(sq.mean())
    swap = dict(swap_candidates=swap_candidates, swap_rounds=swap_rounds, patience=patience, tol=tol)
    chosen = _improve(x, sq, chosen, rng, **swap)
    best, best_norm = chosen, group_norm(x, chosen)
    for _ in range(restarts):  # iterated local search: shake the best set, improve it again
        shaken = best.copy()
        m = max(1, min(k, n - k, perturb))
        shaken[rng.choice(np.flatnonzero(best), m, replace=False)] = False
        shaken[rng.choice(np.flatnonzero(~best), m, replace=False)] = True
        shaken = _improve(x, sq, shaken, rng, **swap)
        norm = group_norm(x, shaken)
        if norm < best_norm - 1e-12:
            best, best_norm = shaken, norm
    return np.flatnonzero(best)


def _improve(x: np.ndarray, sq: np.ndarray, chosen: np.ndarray, rng: np.random.Generator, *,
             swap_candidates: int, swap_rounds: int, patience: int, tol: float,
             swaps_per_round: int = 16) -> np.ndarray:
    """Best-improvement exchanges among seeded candidate sets (see the module docstring)."""
    chosen = chosen.copy()
    n, k = len(chosen), int(chosen.sum())
    c = x[chosen].astype(np.float64).sum(axis=0)  # exact, whatever rounding earlier steps accumulated
    d = _matvec(x, c)
    idle = 0
    for _ in range(swap_rounds):
        improved = False
        groups = []
        for side, value in ((True, sq - 2 * d), (False, sq + 2 * d)):  # removal gain, addition gain
            members = np.flatnonzero(chosen == side)
            if len(members) <= swap_candidates:
                groups.append(members)
                continue
            best = _pick(value, members, swap_candidates // 2)
            rest = np.setdiff1d(members, best, assume_unique=True)
            groups.append(np.sort(np.concatenate([best, rng.choice(rest, swap_candidates - len(best),
                                                                   replace=False)])))
        out_i, in_j = groups  # currently chosen (swap out) / not chosen (swap in)
        xi, xj = x[out_i].astype(np.float64), x[in_j].astype(np.float64)
        gii, gjj, gij = xi @ xi.T, xj @ xj.T, xi @ xj.T
        di, dj = xi @ c, xj @ c
        avail_i = np.ones(len(out_i), dtype=bool)
        avail_j = np.ones(len(in_j), dtype=bool)
        for _ in range(min(len(out_i), len(in_j), swaps_per_round)):
            # ||c - s_i + s_j||^2 - ||c||^2
            delta = (sq[out_i] - 2 * di)[:, None] + (sq[in_j] + 2 * dj)[None, :] - 2 * gij
            delta[~avail_i, :] = np.inf
            delta[:, ~avail_j] = np.inf
            flat = int(np.argmin(delta))
            a, b = divmod(flat, len(in_j))
            if not delta[a, b] < -tol:
                break
            chosen[out_i[a]], chosen[in_j[b]] = False, True
            avail_i[a], avail_j[b] = False, False
            c += xj[b] - xi[a]
            di += gij[:, b] - gii[:, a]
            dj += gjj[:, b] - gij[a, :]
            improved = True
        if improved:
            c = x[chosen].astype(np.float64).sum(axis=0)
            d = _matvec(x, c)
            idle = 0
        else:
            idle += 1
            if idle >= patience or (len(out_i) == k and len(in_j) == n - k):
                break  # candidates covered every pair: a local optimum
    return chosen
