"""Domain columns: how unlike the text the user will translate (``score.target``) each training pair is.

With ``score.target.files`` (the in-domain text of every pair, either side may be null) or ``score.target.split:
valid`` (the run's own valid split), the score stage adds, after the merge, five columns, every one oriented like the
noise columns, **higher = unlike the target set**, so that ``<column>-high`` at sparsity s keeps the (1 − s) most
in-domain pairs:

- ``domain_xent_diff``: the bilingual cross-entropy difference (Moore & Lewis 2010; Axelrod et al. 2011) with the
  proxy as the language model: each seed's last proxy checkpoint is fine-tuned on the target pairs (all directions,
  ``score.target.updates`` Adam updates at ``score.target.lr``, batches of ``proxy.max_tokens``, seeded with the
  seed), and a pair's value is its token-mean NLL under the fine-tuned model minus that under the general one
  (the ``nll@`` column of the same checkpoint), averaged over the seeds. Low = the in-domain model explains the
  pair better than the general one.
- ``domain_grad``: minus the cosine of the pair's output-layer gradient with the target set's mean gradient (what
  ``tracin`` does for the valid split, for the target set), through the gradient sketch of the scoring pass
  (``04_score/grad_sketch.npy``: a Johnson–Lindenstrauss projection to 256 numbers, the mean over checkpoints),
  so no second pass over the corpus runs. Low = a step on the pair is a step on the target set.
- ``domain_sim``: 1 − the cosine of the pair's mean-pooled encoder state with the mean of the target pairs'
  (Zhang et al. 2019's similarity, with the proxy's own representation), per checkpoint (the stored pooled states
  of the pass, projected as they are), then averaged; per translation direction (the source's language tag is in
  the state).
- ``base_domain_xent``: no proxy: OpusFilter's ``CrossEntropyDifferenceFilter`` with VariKN n-gram language models
  on the target text and on a sample of the pool, summed over the sides given (``domain_ngram.py``).
- ``domain_combined``: label-free: the mean percentile rank of ``domain_xent_diff``, ``domain_sim`` and
  ``base_domain_xent`` (the columns measure one property, how in-domain a pair looks, so no one column's extreme
  should decide, as it does for noise in ``combined_all``); ``domain_grad`` is left out (``COMBINED``).

A side given as null leaves the proxy columns out (they need pairs): ``domain_combined`` is then
``base_domain_xent``'s rank alone. Every column is computed in the merge process, from the finished pass, and kept in
``04_score/shards/domain.parquet`` under a key of the pass, the target text and the ``score.target`` settings: a
changed target file redoes these columns and nothing else of the pass.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from ..config import DOMAIN_COLUMNS, PROXY_DOMAIN_COLUMNS, Config
from ..errors import UsageError
from ..layout import RunLayout
from ..manifest import json_hash
from ..sources import langs
from ..textio import read_lines
from .target import both_sides, digest, encode_target, finetune, target_text

log = logging.getLogger("mtprune")

PROXY_COLUMNS, COLUMNS = PROXY_DOMAIN_COLUMNS, DOMAIN_COLUMNS
VERSION = 2  # of the cached columns' recipe


# ---- the columns ---------------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def minus_cosine_to_mean(rows: np.ndarray, row_dirs: np.ndarray, target: np.ndarray, target_dirs: np.ndarray,
                         one: bool = False) -> np.ndarray:
    """Per row, 1 − cos (``one``) or − cos of its vector with the mean of the unit target vectors of its direction,
    read in chunks (``rows`` may be a memory map)."""
    out = np.empty(len(rows), dtype=np.float64)
    centres = {d: _unit(_unit(target[target_dirs == d]).mean(axis=0)) for d in np.unique(target_dirs)}
    for d in np.unique(row_dirs):
        if d not in centres:
            raise UsageError(f"score.target: no target pair in direction {d}")
        where = np.flatnonzero(row_dirs == d)
        for start in range(0, len(where), 100_000):
            part = where[start:start + 100_000]
            out[part] = -(_unit(np.asarray(rows[part], dtype=np.float64)) @ centres[d])
    return out + 1.0 if one else out


def cache_key(cfg: Config, pass_key: str, text: dict[str, dict[str, list[str] | None]]) -> str:
    from .domain_ngram import VERSION as NGRAM_VERSION

    t = cfg.score.target
    return json_hash({"version": VERSION, "ngram": NGRAM_VERSION, "pass": pass_key, "text": digest(text),
                      "updates": t.updates, "lr": t.lr, "order": t.ngram_order, "sample": t.ngram_sample,
                      "max_tokens": cfg.proxy.max_tokens})


def columns(cfg: Config, layout: RunLayout, table: Any, pooled: np.ndarray, sketch: np.ndarray, ckpts: list[Any],
            pass_key: str, seconds: dict[str, float]) -> dict[str, np.ndarray]:
    """The domain columns of the merged score table (rows of fairseq indices), from its ``nll@`` columns, the
    pass's pooled states (rows, checkpoints, P) and gradient sketch (rows, k²); cached in
    ``04_score/shards/domain.parquet`` under ``cache_key``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..manifest import atomic_write_text
    from .shards import stored_key, write_parquet

    text = target_text(cfg, layout)
    key = cache_key(cfg, pass_key, text)
    cache = layout.stage_dir("score") / "shards" / "domain.parquet"
    index = table.column("index").to_numpy().astype(np.int64)
    if stored_key(cache.with_suffix(".json")) == key and cache.is_file():
        cached = pq.read_table(cache)
        if np.array_equal(cached.column("index").to_numpy(), index):
            log.info("score: domain columns kept from %s (same pass, target text and settings)", cache)
            return {c: cached.column(c).to_numpy() for c in COLUMNS if c in cached.column_names}
    out: dict[str, np.ndarray] = {}
    t0 = time.time()
    out["base_domain_xent"] = _ngram_column(cfg, layout, table, text)
    seconds["base_domain_xent"] = round(time.time() - t0, 2)
    if both_sides(text):
        out.update(_proxy_columns(cfg, layout, table, pooled, sketch, ckpts, text, index, seconds))
    else:
        log.info("score: the target text has one side only: domain_xent_diff, domain_grad and domain_sim need pairs "
                 "and are left out; domain_combined is base_domain_xent's rank")
    out["domain_combined"] = combined_rank(out)
    write_parquet(pa.table({"index": pa.array(index), **{c: pa.array(v) for c, v in out.items()}}), cache)
    atomic_write_text(cache.with_suffix(".json"), json.dumps({"key": key}))
    return out


# domain_combined's columns: domain_grad is left out (chosen on a second draw of the Tatoeba + Multi30K pool, proxy
# seeds 3 and 4: its AUROC there was 0.60, and the mean rank of the other three 0.995 with it 0.976; docs/results.md)
COMBINED = ("domain_xent_diff", "domain_sim", "base_domain_xent")


def combined_rank(cols: dict[str, np.ndarray]) -> np.ndarray:
    """The mean percentile rank (ties averaged) of the ``COMBINED`` columns present."""
    import pandas as pd

    present = [c for c in COMBINED if c in cols]
    return np.mean([pd.Series(cols[c]).rank(method="average", pct=True).to_numpy() for c in present], axis=0)


def _ngram_column(cfg: Config, layout: RunLayout, table: Any, text: dict[str, dict[str, list[str] | None]]
                  ) -> np.ndarray:
    """``base_domain_xent`` per row: computed per pair on the downloaded training text, read back by sentence id
    (both directions of a pair share their value)."""
    from .domain_ngram import base_domain_xent

    sid = np.asarray(table.column("sentence_id").to_pylist(), dtype=object)
    pairs = np.asarray(table.column("pair").to_pylist(), dtype=object)
    out = np.full(len(sid), np.nan)
    for pair in cfg.download.pairs:
        l1, l2 = langs(pair)
        ids = read_lines(layout.download_ids(pair))
        pool = {l1: read_lines(layout.split_file(pair, "train", l1)), l2: read_lines(layout.split_file(pair, "train", l2))}
        values = base_domain_xent(pool, text[pair], cfg.score.target.ngram_sample, cfg.score.target.ngram_order,
                                  layout.stage_dir("score") / "shards" / "domain-lm" / pair)
        pos = {s: i for i, s in enumerate(ids)}
        rows = np.flatnonzero(pairs == pair)
        out[rows] = values[[pos[s] for s in sid[rows]]]
    return out


def _proxy_columns(cfg: Config, layout: RunLayout, table: Any, pooled: np.ndarray, sketch: np.ndarray,
                   ckpts: list[Any], text: dict[str, dict[str, list[str] | None]], index: np.ndarray,
                   seconds: dict[str, float]) -> dict[str, np.ndarray]:
    import torch

    from ..cpus import usable_cpus
    from ..el2n import sketch_projections
    from ..fairseq_backend import load_model, load_train_pairs
    from .forward import dev_gradient, output_layer, pick_device, score_dataset
    from .stored import POOLED_DIMS, pooled_basis

    torch.set_num_threads(usable_cpus())
    device, dtype = pick_device(cfg)
    src_ds, tgt_ds, dictionary = load_train_pairs(layout.data_bin)
    t_src, t_tgt, t_dirs = encode_target(cfg, layout, text, dictionary.eos())
    t_dirs_a = np.asarray(t_dirs, dtype=object)
    row_dirs = np.asarray([f"{d}" for d in table.column("direction").to_pylist()], dtype=object)
    models = [load_model(c.path, layout.data_bin, device)[0] for c in ckpts]
    t0 = time.time()
    # the target pairs through every checkpoint: their gradient sketch and pooled states, projected as the pass's are
    dim = int(models[0].encoder.embed_tokens.embedding_dim)
    layers, bases = [], []
    vsrc, vtgt, _ = load_train_pairs(layout.data_bin, "valid")
    for m in models:
        base = output_layer(m)
        r_v, r_d = sketch_projections(base.vocab, base.weight.shape[1])
        layers.append(output_layer(m, sketch=(r_v.to(device), r_d.to(device))))
        if dim > POOLED_DIMS:
            states: list[Any] = []
            dev_gradient(m, vsrc, vtgt, dictionary, cfg.score.batch_tokens, cfg.score.chunk_tokens, device, dtype,
                         pooled=states)
            bases.append(pooled_basis(torch.cat(states)))
    projected = pooled.shape[-1] != dim
    if projected and (len(bases) != len(models) or any(b is None for b in bases)):
        raise UsageError("score: the stored pooled states are projected but no basis could be made for the target set")
    t_idx = np.arange(len(t_tgt))
    t_sketch = np.zeros((len(t_idx), sketch.shape[1]), dtype=np.float32)
    t_pooled = np.zeros((len(t_idx), len(models), pooled.shape[-1]), dtype=np.float32)
    score_dataset(models, t_src, t_tgt, dictionary, t_idx, cfg.score.batch_tokens, cfg.score.chunk_tokens, device,
                  dtype, desc="score target set", layers=layers, full=True, sketch_out=t_sketch, pooled_out=t_pooled,
                  pooled_proj=[b.to(device) for b in bases] if projected else None)
    out = {"domain_grad": minus_cosine_to_mean(sketch, row_dirs, t_sketch, t_dirs_a)}
    sims = [minus_cosine_to_mean(pooled[:, k], row_dirs, t_pooled[:, k], t_dirs_a, one=True) for k in range(len(models))]
    out["domain_sim"] = np.mean(sims, axis=0)
    seconds["domain_grad_sim"] = round(time.time() - t0, 2)
    # cross-entropy difference: each seed's last checkpoint, fine-tuned on the target pairs, against itself
    t0 = time.time()
    last = {}
    for k, c in enumerate(ckpts):
        if c.seed not in last or c.updates > ckpts[last[c.seed]].updates:
            last[c.seed] = k
    general = [models[k] for k in last.values()]
    tuned = [finetune(m, t_src, t_tgt, dictionary, cfg.score.target.updates, cfg.score.target.lr,
                      cfg.proxy.max_tokens, seed) for seed, m in zip(last, general, strict=True)]
    seconds["domain_finetune"] = round(time.time() - t0, 2)
    t0 = time.time()
    res = score_dataset(tuned, src_ds, tgt_ds, dictionary, index, cfg.score.batch_tokens, cfg.score.chunk_tokens,
                        device, dtype, desc="score in-domain")
    h_general = np.column_stack([table.column(f"nll@{ckpts[k].tag}").to_numpy() for k in last.values()])
    out["domain_xent_diff"] = (np.asarray(res["nll"], dtype=np.float64) - h_general).mean(axis=1)
    seconds["domain_xent_diff"] = round(time.time() - t0, 2)
    return out


def finding_table(df: Any, labels: Any) -> tuple[str, dict[str, Any]]:
    """Markdown: each column's AUROC at telling the pairs of the download's other parts (``general``) from the
    in-domain part (``IN_DOMAIN``), with ``-length`` and a few noise columns for scale, and the share of in-domain
    pairs among the pairs a column keeps when it keeps as many as there are in-domain pairs."""
    from .finding import auroc, md_table

    inside = df["sentence_id"].isin(labels.clean).to_numpy()
    general = df["sentence_id"].isin(labels.keys()).to_numpy()
    df, inside = df[inside | general], inside[inside | general]
    n_in = int(inside.sum())
    cands = {c: df[c].to_numpy(dtype=np.float64) for c in df.columns if c not in ("sentence_id", "n_tokens")}
    cands["-length"] = -df["n_tokens"].to_numpy(dtype=np.float64)
    rows, summary = [], {}
    for name, v in cands.items():
        a = auroc(v, ~inside)
        kept = np.argsort(v, kind="stable")[:n_in]
        rows.append([name, a, float(inside[kept].mean()) if n_in else float("nan")])  # AUROCs close to 1: 3 decimals
        if name in COLUMNS:
            summary[name] = round(a, 4)
    rows.sort(key=lambda r: -r[1] if r[1] == r[1] else 1.0)
    rows = [[name, "–" if a != a else f"{a:.3f}", share] for name, a, share in rows]
    md = (f"# Telling the target domain apart\n\n{n_in} of {len(df)} training pairs come from the pool's in-domain part "
          "(01_download/domain.ids). AUROC of each column at ranking the other pairs above them (domain columns: high "
          "= unlike the target set; 0.5 is chance; `-length`: shorter target first), and the share of in-domain pairs "
          f"among the {n_in} pairs each column ranks lowest (what `<column>-high` keeps at that size; random: "
          f"{n_in / max(len(df), 1):.2f}).\n\n"
          + md_table(["score", "AUROC", "in-domain share kept"], rows))
    return md, {"in_domain": n_in, "auroc": summary}
