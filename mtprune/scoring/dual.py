"""Dual conditional cross-entropy (Junczys-Dowmunt 2018, "Dual conditional cross-entropy filtering
of noisy parallel corpora") from the proxy runs of both directions.

With ``proxy.dual`` each seed is also trained on ``02_prepare/data-bin-reverse`` (row i = row i of
``data-bin`` with source and target swapped, same dictionary), so the reverse scores join the
forward ones by fairseq index. For a pair, with H_f the forward model's token-mean NLL of the target
given the source and H_r the reverse model's of the source given the target (same seed, same update
count),

    dual_xent = |H_f - H_r| + (H_f + H_r) / 2

(how much the two directions disagree plus how unlikely both find the pair; the paper takes exp(-x)
of this, a monotone map that ranking does not need). Higher = worse: a pair both models find unlikely, or one that only one
direction explains (an untranslated copy, a truncated target), scores high. Columns:
``nll_reverse`` and ``dual_xent`` (means over checkpoints and seeds) and one ``nll_reverse@s<k>u<u>``
and ``dual_xent@s<k>u<u>`` per checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..config import Config
from ..errors import UsageError
from ..layout import RunLayout
from .forward import checkpoints, pick_device, score_dataset

log = logging.getLogger("mtprune")


def dual_xent(h_forward: np.ndarray, h_reverse: np.ndarray) -> np.ndarray:
    """|H_f - H_r| + (H_f + H_r) / 2, elementwise, in float64."""
    f = np.asarray(h_forward, dtype=np.float64)
    r = np.asarray(h_reverse, dtype=np.float64)
    return np.abs(f - r) + 0.5 * (f + r)


def reverse_nll(cfg: Config, layout: RunLayout, indices: np.ndarray) -> np.ndarray:
    """(len(indices), checkpoints) token-mean NLL of the reverse proxies on the reversed pairs, in the
    order of ``score.checkpoints`` (seed-major, then update count)."""
    from ..fairseq_backend import load_model, load_train_pairs  # torch: not for `mtprune --help`

    device, dtype = pick_device(cfg)
    rbin = layout.data_bin_reverse
    if not rbin.is_dir():
        raise UsageError(f"proxy.dual: {rbin} is missing; run `mtprune prepare --overwrite` first")
    src_ds, tgt_ds, dictionary = load_train_pairs(rbin)
    n_forward = len(load_train_pairs(layout.data_bin)[1])
    if len(tgt_ds) != n_forward:
        raise UsageError(f"proxy.dual: {rbin} has {len(tgt_ds)} pairs, {layout.data_bin} {n_forward}; "
                         "run `mtprune prepare --overwrite` again")
    paths = [layout.proxy_reverse_checkpoint(c.seed, c.updates) for c in checkpoints(cfg, layout)]
    for p in paths:
        if not p.is_file():
            raise UsageError(f"proxy.dual: {p} is missing; run `mtprune proxy` with proxy.dual: true")
    models = [load_model(p, rbin, device)[0] for p in paths]
    res = score_dataset(models, src_ds, tgt_ds, dictionary, indices, cfg.score.batch_tokens,
                        cfg.score.chunk_tokens, device, dtype, desc="score reverse")
    return np.asarray(res["nll"], dtype=np.float64)


def add_columns(cfg: Config, layout: RunLayout, table: Any) -> Any:
    """``table`` (rows of fairseq indices with ``nll@<tag>`` columns) plus the dual columns when
    ``proxy.dual`` is on; unchanged otherwise."""
    import pyarrow as pa


    if not cfg.proxy.dual:
        return table
    t0 = time.time()
    ckpts = checkpoints(cfg, layout)
    indices = table.column("index").to_numpy().astype(np.int64)
    h_r = reverse_nll(cfg, layout, indices)
    h_f = np.column_stack([table.column(f"nll@{c.tag}").to_numpy() for c in ckpts]).astype(np.float64)
    per = dual_xent(h_f, h_r)
    cols = {"nll_reverse": h_r.mean(axis=1), "dual_xent": per.mean(axis=1)}
    cols.update({f"nll_reverse@{c.tag}": h_r[:, k] for k, c in enumerate(ckpts)})
    cols.update({f"dual_xent@{c.tag}": per[:, k] for k, c in enumerate(ckpts)})
    for name, values in cols.items():
        table = table.append_column(name, pa.array(values))
    log.info("score: dual_xent from %d reverse checkpoint(s) in %.1fs", len(ckpts), time.time() - t0)
    return table
