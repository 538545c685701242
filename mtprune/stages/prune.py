"""Stage 5: drop a fraction of the training pairs per strategy and sparsity, binarize the rest.

``<score>-high`` drops the highest values of a score column, ``<score>-low`` the lowest, ``random``
a seeded random subset (nested: a larger sparsity drops a superset). Ties are broken by sentence id.
``opusfilter`` drops exactly the pairs that OpusFilter's filters reject at their default thresholds
(``base_opusfilter > 0``): one corpus whatever the sparsities, its fraction recorded in the manifest and used
as its sparsity downstream. ``random-length`` is a seeded random subset with the same number of pairs of each
target length as ``prune.length_match`` (a ``<score>-high/low`` strategy) drops at that sparsity: the control
that tells a score's choice of pairs from its length effect.
``<a>-high+<b>-high`` (either half ``-low`` too) drops in two steps: at sparsity s, the first column drops
``min(prune.first_share, s)`` of the pairs, then the second column drops, among the pairs left, as many more as
reach s (``base_all-high+domain_combined-high``: the noisiest pairs first, then the least in-domain); both with
the tie-break and the scope of a one-column strategy.
``group`` drops the set whose summed output-layer gradient sketch (``04_score/grad_sketch.npy``) has
the smallest norm, the set whose removal changes the summed gradient least (``mtprune/scoring/group.py``).
The kept pairs are copied token for token out of the full data-bin, so every pruned corpus shares
the full corpus's SentencePiece model and fairseq dictionary.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import UsageError
from ..faults import crash_point
from ..layout import RunLayout, run_name
from ..manifest import Manifest, temp_path, write_lines
from ..pipeline import StageResult
from ..scoring.finding import n_dropped

SECTIONS = ("prune",)
UPSTREAM = ("prepare", "score")
log = logging.getLogger("mtprune")


def _ranked_codes(values: Any) -> np.ndarray:
    """Integer codes of a string column that sort as its strings do (code point order), from its dictionary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(values, type=pa.large_string())
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    words = encoded.dictionary.to_pylist()
    rank = np.empty(len(words), dtype=np.int64)
    rank[sorted(range(len(words)), key=words.__getitem__)] = np.arange(len(words))
    return rank[encoded.indices.to_numpy(zero_copy_only=False)]


def _id_order_key(df: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort keys that put the rows of a score table in sentence-id order (``<pair>/<n>``: the pair's name, then
    the number), then by direction; integer arrays, computed column-wise (no Python string per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(df["sentence_id"], type=pa.large_string())
    if isinstance(ids, pa.ChunkedArray):  # a column already held by Arrow (pandas' arrow-backed strings)
        ids = ids.combine_chunks()
    parts = pc.extract_regex(ids, r"^(?P<pair>.*)/(?P<n>[+-]?[0-9]+)$")
    if parts.null_count:
        bad = ids.filter(pc.is_null(parts))[0].as_py()
        raise UsageError(f"prune: sentence id {bad!r} is not <pair>/<number>; download again (mtprune download "
                         "--overwrite)")
    pairs = _ranked_codes(parts.field("pair"))
    nums = pc.cast(parts.field("n"), pa.int64()).to_numpy()
    dirs = _ranked_codes(df["direction"]) if "direction" in df else np.zeros(len(df), dtype=np.int64)
    return pairs, nums, dirs


def check_something_left(cfg: Config, pairs: Any) -> None:
    """Refuse a sparsity that would leave a pruned corpus, or one pair of it under per-pair scope,
    empty: fairseq-train would only fail later on the empty data-bin."""
    counts = Counter(pairs.tolist()) if cfg.prune.scope == "per-pair" else {"": len(pairs)}
    for _, strategy, sparsity in runs(cfg):  # every strategy drops as many; the first one is named
        if sparsity is None:  # opusfilter: its own fraction, checked when its mask is known
            continue
        for pair, n in sorted(counts.items()):
            if n_dropped(sparsity, n) >= n:
                of = f" of {pair} (prune.scope: per-pair)" if pair else ""
                raise UsageError(f"prune.sparsities: {sparsity} with strategy {strategy} would leave 0 of the "
                                 f"{n} training pairs{of}; use a smaller sparsity")


# columns of scores.parquet that are not scores (index: fairseq's row); export and export_hf read it too
IDENTIFIERS = ("sentence_id", "pair", "direction", "index")


def score_halves(strategy: str) -> list[tuple[str, str]]:
    """(score column, ``high`` or ``low``) of each column a score strategy ranks by, in the order it drops by them:
    one for ``el2n-high``, two for ``base_all-high+domain_combined-high``; none for random, group and the like."""
    if strategy in ("random", "random-length", "group", "opusfilter", "full"):
        return []
    out = []
    for half in strategy.split("+"):
        column, _, side = half.rpartition("-")
        if not column or side not in ("high", "low"):
            return []
        out.append((column, side))
    return out


def ranked_columns(cfg: Config) -> list[tuple[str, str, str]]:
    """(setting, what it names, score column) of every column the strategies rank by: ``prune.strategies`` entries
    (both columns of a two-column strategy), and ``prune.length_match`` when random-length is among them."""
    out = []
    for strategy in cfg.prune.strategies:
        if strategy == "opusfilter":
            out.append(("prune.strategies", strategy, "base_opusfilter"))
        elif strategy == "random-length":
            out.append(("prune.length_match", cfg.prune.length_match, cfg.prune.length_match.rsplit("-", 1)[0]))
        else:
            out += [("prune.strategies", strategy, column) for column, _ in score_halves(strategy)]
    return out


def _not_written(setting: str, name: str, column: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(column, known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    shown = [c for c in known if "@" not in c]
    return (f"{setting}: {name!r} ranks by {column!r}, which is no score column: {hint}the score stage writes "
            f"{', '.join(shown)}, and one <score>@s<seed>u<updates> per proxy checkpoint")


def check(cfg: Config, layout: RunLayout) -> None:
    """A strategy naming a column the score stage does not write, from the config alone: also before a sweep's
    first stage, not after the proxy runs have trained, and before `mtprune prune` prunes by any strategy."""
    from ..scoring.forward import score_columns

    known = score_columns(cfg)
    for setting, name, column in ranked_columns(cfg):
        if column not in known:
            raise UsageError(_not_written(setting, name, column, known))


def preflight(cfg: Config, layout: RunLayout) -> None:
    import pandas as pd

    check(cfg, layout)
    read_columns(cfg, layout.scores)
    pairs = pd.read_parquet(layout.scores, columns=["pair"])["pair"]
    check_something_left(cfg, pairs)
    if "group" in cfg.prune.strategies:
        load_sketch(layout, len(pairs))


def load_sketch(layout: RunLayout, n_rows: int) -> np.ndarray:
    """The gradient sketch, row-aligned with scores.parquet (memory-mapped)."""
    path = layout.grad_sketch
    if not path.is_file():
        raise UsageError(f"prune.strategies: group needs {path}, which `mtprune score` writes; "
                         "score again with this version of mtprune (mtprune score --overwrite)")
    try:
        sketch = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise UsageError(f"{path}: not a readable .npy file ({e})") from None
    if sketch.ndim != 2 or sketch.shape[0] != n_rows:
        raise UsageError(f"{path}: has shape {tuple(sketch.shape)} but scores.parquet has {n_rows} rows; "
                         "score again (mtprune score --overwrite)")
    return sketch


def length_matched_mask(df: Any, reference: np.ndarray, scope: str, seed: int) -> np.ndarray:
    """A random subset with as many pairs of each target length (``n_tokens``; and of each language pair under
    per-pair scope) as the ``reference`` mask drops."""
    n = len(df)
    lengths = df["n_tokens"].to_numpy().astype(np.int64)
    # pair codes in the order of the pairs' names (one code under global scope)
    pair_codes = _ranked_codes(df["pair"]) if scope == "per-pair" else np.zeros(n, dtype=np.int64)
    pairs_ids, nums, dirs = _id_order_key(df)
    order = np.lexsort((dirs, nums, pairs_ids))  # rows in sentence-id order: the draw ignores the table's order
    # one bin per (pair, length); rows grouped by bin, in sentence-id order within it
    low = int(lengths.min()) if n else 0
    key = pair_codes * (int(lengths.max()) - low + 1 if n else 1) + (lengths - low)
    grouped = order[np.argsort(key[order], kind="stable")]
    _, starts = np.unique(key[grouped], return_index=True)
    bounds = list(zip(starts.tolist(), [*starts[1:].tolist(), n], strict=True))
    # the bins drawn in the order of (pair name, length written as a string): the order every earlier version
    # drew them in, so that a seed picks the same pairs
    bounds.sort(key=lambda b: (int(pair_codes[grouped[b[0]]]), str(int(lengths[grouped[b[0]]]))))
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    for a, b in bounds:
        rows = grouped[a:b]
        k = int(reference[rows].sum())
        if k:
            mask[rows[rng.permutation(len(rows))[:k]]] = True
    return mask


def drop_mask(df: Any, strategy: str, sparsity: float, scope: str, seed: int,
              sketch: Any = None, length_match: str = "el2n-high", first_share: float = 0.1) -> np.ndarray:
    """Boolean mask over the rows of a score table: True where the pair is dropped. ``group`` needs
    ``sketch``, the gradient sketch row-aligned with ``df``; ``random-length`` matches the target lengths
    that ``length_match`` drops at the same sparsity; a two-column strategy's first column drops
    ``min(first_share, sparsity)`` (``prune.first_share``)."""
    if strategy == "random-length":
        reference = drop_mask(df, length_match, sparsity, scope, seed, sketch)
        return length_matched_mask(df, reference, scope, seed)
    if strategy == "opusfilter":
        if "base_opusfilter" not in df.columns:
            raise UsageError("prune.strategies: opusfilter needs the base_opusfilter column (score.baselines: true); "
                             "score again (mtprune score --overwrite)")
        return df["base_opusfilter"].to_numpy(dtype=np.float64) > 0
    n = len(df)
    groups = [np.arange(n)] if scope == "global" else [np.flatnonzero(df["pair"].to_numpy() == p)
                                                      for p in sorted(df["pair"].unique())]
    pairs, nums, dirs = _id_order_key(df)
    if strategy == "group" and sketch is None:
        raise UsageError("prune.strategies: group needs the gradient sketch 04_score/grad_sketch.npy")
    halves = []  # (values, side) of each column ranked by, in the order they drop
    if strategy not in ("random", "group"):
        ranked = score_halves(strategy)
        if not ranked:
            raise UsageError(f"prune.strategies: {strategy!r} is no strategy")
        for column, side in ranked:
            if column not in df.columns or column in IDENTIFIERS:  # (the stage checks every strategy before this)
                raise UsageError(f"prune.strategies: {strategy!r} ranks by {column!r}, which is no score column")
            values = df[column].to_numpy(dtype=np.float64)
            if np.isnan(values).any():
                raise UsageError(f"prune: score column {column!r} has missing values "
                                 f"({int(np.isnan(values).sum())} of {n} rows)")
            halves.append((values, side))

    def by_score(rows: np.ndarray, values: np.ndarray, side: str) -> np.ndarray:
        """``rows`` from the first to drop to the last: by score, ties by sentence id (pair, n, direction)."""
        primary = -values[rows] if side == "high" else values[rows]
        # np.lexsort sorts by the last key first
        return rows[np.lexsort((dirs[rows], nums[rows], pairs[rows], primary))]

    mask = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    for g in groups:
        k = n_dropped(sparsity, len(g))
        # drawn even where nothing is dropped, so every sparsity sees the same permutation of every
        # group and a larger sparsity drops a superset (per-pair scope with a pair too small for k > 0)
        perm = rng.permutation(len(g)) if strategy == "random" else None
        if k == 0:
            continue
        if perm is not None:
            order = g[perm]
        elif strategy == "group":
            # rows in sentence-id order, so that the set does not depend on the table's row order
            g = g[np.lexsort((dirs[g], nums[g], pairs[g]))]
            from ..scoring.group import RowView, group_select

            order = g[group_select(RowView(sketch, g), k, seed, progress=f"group {sparsity:g}")]
        elif len(halves) == 2:
            # the first column's share of the group, then the second column's pick of the rest up to k
            first = by_score(g, *halves[0])[:n_dropped(min(first_share, sparsity), len(g))]
            mask[first] = True
            rest = g[~mask[g]]
            mask[by_score(rest, *halves[1])[:k - len(first)]] = True
            continue
        else:
            order = by_score(g, *halves[0])
        mask[order[:k]] = True
    return mask


def read_columns(cfg: Config, scores: Path) -> list[str]:
    """The columns of ``scores.parquet`` that the prune stage reads: the identifiers, target lengths and the
    columns its strategies rank by, not the whole table (at millions of rows, most of its columns are per-checkpoint
    scores no strategy reads). A strategy naming a column the table lacks is refused with the table's columns."""
    import pyarrow.parquet as pq

    from ..scoring.forward import score_columns

    have = pq.read_schema(scores).names
    want = ["sentence_id", "pair", "direction", "index", "n_tokens"]
    for setting, name, column in ranked_columns(cfg):
        if column in IDENTIFIERS:
            raise UsageError(_not_written(setting, name, column, score_columns(cfg)))
        if column not in have and name != "opusfilter":
            raise UsageError(f"{setting}: {name!r} ranks by {column!r}, which {scores} lacks: it was scored by an "
                             "older mtprune or with other settings (`mtprune score --overwrite` scores again)")
        want.append(column)
    return [c for c in dict.fromkeys(want) if c in have]


def write_subset(full_bin: Path, out_bin: Path, keep: np.ndarray) -> None:
    """Copy the kept examples (fairseq indices) of the train split into a new data-bin."""
    from fairseq.data import indexed_dataset

    from ..fairseq_backend import SRC, TGT, load_train_pairs

    src, tgt, d = load_train_pairs(full_bin)
    tmp = temp_path(out_bin)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for lang, ds in ((SRC, src), (TGT, tgt)):
        prefix = tmp / f"train.{SRC}-{TGT}.{lang}"
        builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(d))
        for i in keep:
            builder.add_item(ds[int(i)])
        builder.finalize(f"{prefix}.idx")
    for f in full_bin.iterdir():  # dictionaries and the validation split are shared with the full corpus
        if not f.name.startswith("train.") and f.suffix != ".log":
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out_bin, ignore_errors=True)
    os.replace(tmp, out_bin)


def runs(cfg: Config) -> list[tuple[str, str, float | None]]:
    """(name, strategy, sparsity) of every pruned corpus; sparsity None for ``opusfilter``, whose one corpus
    drops what the filters reject (``fraction_dropped`` gives it once pruned)."""
    return [(run_name(st, None), st, None) if st == "opusfilter" else (run_name(st, sp), st, sp)
            for st in cfg.prune.strategies for sp in (cfg.prune.sparsities[:1] if st == "opusfilter"
                                                      else cfg.prune.sparsities)]


def fraction_dropped(layout: RunLayout, name: str) -> float | None:
    """The fraction a finished prune stage dropped for corpus ``name``, as its manifest records it (None before
    it ran)."""
    m = Manifest.read(layout.manifest("prune"))
    return None if m is None else m.stats.get("runs", {}).get(name, {}).get("sparsity")


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    import pandas as pd

    from ..fairseq_backend import quiet_fairseq

    quiet_fairseq()
    df = pd.read_parquet(layout.scores, columns=read_columns(cfg, layout.scores))
    sketch = load_sketch(layout, len(df)) if "group" in cfg.prune.strategies else None
    order = np.argsort(df["index"].to_numpy(), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    if sketch is not None:  # row-aligned with df again, read from the memory map as selection needs the rows
        from ..scoring.group import RowView

        sketch = RowView(sketch, order)
    check_something_left(cfg, df["pair"])  # before anything is written (also run as preflight)
    both = cfg.download.direction == "both" or df["direction"].nunique() > df["pair"].nunique()
    outputs: list[Path] = []
    stats: dict[str, Any] = {"total": len(df), "runs": {}}
    for name, strategy, sparsity in runs(cfg):
        t0 = time.time()
        if strategy == "random-length":  # its reference mask, kept for the overlap recorded below
            ref = drop_mask(df, cfg.prune.length_match, sparsity, cfg.prune.scope, cfg.prune.seed, sketch)
            mask = length_matched_mask(df, ref, cfg.prune.scope, cfg.prune.seed)
        else:
            mask = drop_mask(df, strategy, sparsity, cfg.prune.scope, cfg.prune.seed, sketch,
                             first_share=cfg.prune.first_share)
        kept = df[~mask]
        if not len(kept):
            raise UsageError(f"prune: {name} would leave none of the {len(df)} training pairs")
        folder = layout.prune_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        lines = (kept["sentence_id"] + "\t" + kept["direction"]) if both else kept["sentence_id"]
        write_lines(layout.kept_ids(name), lines)
        write_subset(layout.data_bin, layout.pruned_data_bin(name), kept["index"].to_numpy())
        n_dropped_of = df["pair"][mask].value_counts()
        per_pair = {p: {"kept": int(c), "dropped": int(n_dropped_of.get(p, 0))}
                    for p, c in sorted(kept["pair"].value_counts().items())}
        stats["runs"][name] = {"strategy": strategy,
                               "sparsity": round(float(mask.mean()), 4) if sparsity is None else sparsity,
                               "kept": int(len(kept)),
                               "dropped": int(mask.sum()), "per_pair": per_pair,
                               "select_seconds": round(time.time() - t0, 2)}
        if "+" in strategy:  # how many the first column dropped: its step alone
            stats["runs"][name]["first_dropped"] = int(drop_mask(
                df, strategy.split("+")[0], min(cfg.prune.first_share, sparsity), cfg.prune.scope,
                cfg.prune.seed).sum())
        if strategy == "random-length":
            stats["runs"][name].update(length_match=cfg.prune.length_match,
                                       overlap_with_length_match=int((mask & ref).sum()))
        if sketch is not None and strategy == "group":
            from ..scoring.group import group_norm

            stats["runs"][name]["dropped_sketch_norm"] = group_norm(sketch, np.flatnonzero(mask))
        log.info("prune: %s: kept %d, dropped %d", name, len(kept), int(mask.sum()))
        outputs += [layout.kept_ids(name), layout.pruned_data_bin(name)]
        crash_point(f"prune:after:{name}")
    return StageResult(outputs, stats)
