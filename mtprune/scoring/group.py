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

3. Above ``chunk_rows`` pairs (``CHUNK_ROWS``), the rounds of step 1 would each scan every row, so their cost
   grows with the square of the corpus. The rows are then dealt into seeded random parts of at most
   ``chunk_rows``, each part gives its share of ``k`` by steps 1-2, and one pass of step 2 over all rows
   exchanges pairs between the parts' choices. Cost is linear in the corpus; the parts' summed sketches each
   come out near one row's norm, so the union's stays orders of magnitude below a random set's. The parts are
   independent: with the sketch memory-mapped (as the prune stage reads it) they are selected in worker
   processes, one per usable CPU, with the same result as in one. At or below ``chunk_rows`` pairs (every run
   so far) the selection is exactly steps 1-2.

Same input and seed -> same set. BLAS runs on one thread (the products are small; threads only
contend). Measured on a busy 2-core machine, 50,000 x 256 float32 Gaussian rows of varying scale,
k = 20,000 (sparsity 0.4): greedy 10 s, with swaps and restarts 13 s in all; the dropped set's summed
sketch has norm 15 (about one row's norm, 16) against 2,950 for random sets of the same size. On
10 rows, k = 3 it matched brute force on 100 of 100 random cases.
"""

from __future__ import annotations

from typing import Any

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


# pairs above which the selection is made by parts (module docstring, step 3)
CHUNK_ROWS = 100_000


class RowView:
    """Rows ``rows`` of a matrix (a memory map of the sketch), gathered only when indexed: the prune stage's view
    of the sketch in its table's row order, without a copy of the whole sketch."""

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        if isinstance(base, RowView):
            base, rows = base.base, base.rows[rows]
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *base.shape[1:])
        self.dtype = base.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool:
                index = np.flatnonzero(index)
        return np.asarray(self.base[self.rows[index]])


def _matvec(x: Any, v: np.ndarray) -> np.ndarray:
    """``x @ v`` in float32 (float64 result), by blocks of rows when ``x`` is not a float32 array."""
    v = v.astype(np.float32)
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
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


def _row_sum(x: Any, chosen: np.ndarray) -> np.ndarray:
    """``sum_{i in chosen} x_i`` in float64 (``chosen``: a mask or indices), by blocks of rows."""
    chosen = np.asarray(chosen)
    if chosen.dtype == bool:
        chosen = np.flatnonzero(chosen)
    if len(chosen) <= _BLOCK_ROWS:
        return np.asarray(x[chosen]).astype(np.float64).sum(axis=0)
    out = np.zeros(x.shape[1], dtype=np.float64)
    for a in range(0, len(chosen), _BLOCK_ROWS):
        out += np.asarray(x[chosen[a:a + _BLOCK_ROWS]]).astype(np.float64).sum(axis=0)
    return out


def group_norm(sketch: Any, chosen: np.ndarray) -> float:
    """``||sum_{i in chosen} s_i||`` in float64."""
    return float(np.linalg.norm(_row_sum(sketch, chosen)))


def group_select(sketch: Any, k: int, seed: int, *, chunk_rows: int = CHUNK_ROWS, workers: int | None = None,
                 pool: int = 2048, block: int = 256, swap_candidates: int = 256, swap_rounds: int = 60,
                 patience: int = 6, restarts: int = 8, perturb: int = 3, progress: str | None = None) -> np.ndarray:
    """Sorted indices of ``k`` rows of ``sketch`` (n x D: an array, a memory map or a ``RowView``) whose sum has
    (close to) the smallest norm; above ``chunk_rows`` rows, by parts (module docstring), the parts selected in
    ``workers`` processes (default: the usable CPUs; 1 in this process) when the sketch is a memory map. The
    set does not depend on ``workers``. ``progress``: a bar over the parts with this label."""
    from threadpoolctl import threadpool_limits  # scikit-learn brings it

    kw = dict(pool=pool, block=block, swap_candidates=swap_candidates, swap_rounds=swap_rounds, patience=patience,
              restarts=restarts, perturb=perturb)
    # many small matrix products: BLAS threads only contend (7x slower on a busy 2-core machine)
    with threadpool_limits(1):
        if len(sketch) <= chunk_rows:
            x = sketch[np.arange(len(sketch))] if isinstance(sketch, RowView) else sketch
            return _select(x, k, seed, **kw)
        return _select_by_parts(sketch, k, seed, chunk_rows, workers, progress, **kw)


def _memmap_source(sketch: Any) -> tuple[str, np.ndarray] | None:
    """(file, rows of the file) when ``sketch`` is a .npy memory map or a view of one: what a worker process
    reopens instead of receiving the rows pickled."""
    base, rows = (sketch.base, sketch.rows) if isinstance(sketch, RowView) else (sketch, np.arange(len(sketch)))
    name = getattr(base, "filename", None)
    if not isinstance(base, np.memmap) or name is None or not str(name).endswith(".npy"):
        return None
    return str(name), rows


def _select_part(job: tuple[Any, np.ndarray, int, list[int], dict[str, Any]]) -> np.ndarray:
    """One part's selection (positions into ``rows``), in this process or a worker: ``source`` is an array or a
    .npy file to memory-map."""
    from threadpoolctl import threadpool_limits

    source, rows, k, seed, kw = job
    base = np.load(source, mmap_mode="r") if isinstance(source, str) else source
    with threadpool_limits(1):
        return _select(np.asarray(base[rows]), k, seed, **kw)


def _select_by_parts(sketch: Any, k: int, seed: int, chunk_rows: int, workers: int | None, progress: str | None,
                     **kw: Any) -> np.ndarray:
    """Step 3 of the module docstring: seeded random parts of at most ``chunk_rows`` rows, each choosing its
    share of ``k`` (largest remainders), then exchanges between the parts' choices over every row."""
    from tqdm import tqdm

    from ..cpus import usable_cpus

    n = len(sketch)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    m = -(-n // chunk_rows)
    rng = np.random.default_rng([seed, n])
    part = np.empty(n, dtype=np.int64)
    part[rng.permutation(n)] = np.arange(n) % m
    sizes = np.bincount(part, minlength=m)
    quota = k * sizes / n
    ks = np.floor(quota).astype(np.int64)
    ks[np.argsort(-(quota - ks), kind="stable")[:k - int(ks.sum())]] += 1
    chosen = np.zeros(n, dtype=bool)
    positions = [np.flatnonzero(part == i) for i in range(m)]
    source = _memmap_source(sketch)
    workers = min(m, usable_cpus() if workers is None else max(1, workers)) if source is not None else 1
    with tqdm(total=m, desc=progress, unit="part", disable=None if progress else True, leave=False) as bar:
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            name, file_rows = source
            jobs = [(name, file_rows[pos], int(ks[i]), [seed, i], kw) for i, pos in enumerate(positions)]
            # spawned, not forked: the prune stage's process has imported torch and fairseq, with their threads
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                for pos, picked in zip(positions, ex.map(_select_part, jobs), strict=True):
                    chosen[pos[picked]] = True
                    bar.update()
        else:
            for i, pos in enumerate(positions):
                chosen[pos[_select_part((sketch, pos, int(ks[i]), [seed, i], kw))]] = True
                bar.update()
    sq = _sq_norms(sketch)
    swap = {key: kw[key] for key in ("swap_candidates", "swap_rounds", "patience")}
    chosen = _improve(sketch, sq, chosen, rng, tol=1e-9 * float(sq.mean()), **swap)
    return np.flatnonzero(chosen)


def _select(sketch: np.ndarray, k: int, seed: int | list[int], *, pool: int, block: int, swap_candidates: int,
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
    c = _row_sum(x, chosen)  # exact, whatever rounding earlier steps accumulated
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
        xi, xj = np.asarray(x[out_i]).astype(np.float64), np.asarray(x[in_j]).astype(np.float64)
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
            c = _row_sum(x, chosen)
            d = _matvec(x, c)
            idle = 0
        else:
            idle += 1
            if idle >= patience or (len(out_i) == k and len(in_j) == n - k):
                break  # candidates covered every pair: a local optimum
    return chosen
