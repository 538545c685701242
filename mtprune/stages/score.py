"""Stage 4: per-pair scores from every proxy checkpoint, averaged over checkpoints and seeds.

One pass over length-bucketed batches runs every proxy checkpoint on each batch (while they fit in
memory) and projects the decoder states to the vocabulary chunk by chunk (whole sentences per chunk,
see ``el2n.py``). From the same logits and probabilities, per pair and checkpoint:

- ``el2n`` / ``nll``: token means; ``el2n_max``: the largest token EL2N; ``el2n_eos``: EL2N of the
  end-of-sentence token (the last target token; a truncated target shows there).
- ``grand``: GraNd on the output layer, ‖∂ Σ_t CE_t / ∂W‖_F for the output projection W (V × D; the
  shared embedding matrix in its projection use only; the bias too when there is one), exact, from
  token Gram matrices. Not normalised by length: the literature's per-example gradient norm, so it
  grows with the number of target tokens (Spearman ≈ 0.9 with ``n_tokens`` on the tiny test run).
- ``tracin``: TracIn on the output layer, Σ_checkpoints lr_c · ⟨G_pair, G_dev⟩ / n_dev with G_dev the
  summed output-layer gradient over every pair of the data-bin's valid split (one pass over valid per
  checkpoint, before train) and lr_c the learning rate fairseq's inverse_sqrt schedule held at that
  checkpoint (``proxy_lr``). Per checkpoint ``tracin@s<k>u<u>`` = lr_c ⟨G_pair, G_dev⟩ / n_dev; the
  column sums a seed's checkpoints and averages the seeds. High = the pair's gradient points with the
  dev set's (helpful), so bad pairs are ``tracin-low``.
- ``proto``: prototype distance (Sorscher et al. 2022): the encoder output mean-pooled over the real
  source tokens, k-means per language pair and direction (``score.proto_clusters``, scikit-learn,
  fixed seed) on the L2-normalised states, cosine distance to the nearest centroid; per checkpoint,
  then averaged. Computed after the pass (after the merge with shards).
- ``04_score/grad_sketch.npy``: float32 (rows of scores.parquet, 256), row i = mean over checkpoints
  of vec(R_Vᵀ G_i R_D) with seeded Gaussian R_V (V × 16) / 4, R_D (D × 16) / 4, so that
  ⟨sketch_i, sketch_j⟩ ≈ ⟨G_i, G_j⟩_F (Johnson–Lindenstrauss); for the ``group`` prune strategy.

Every score but proto has a ``<name>@s<seed>u<updates>`` column per checkpoint. On the default bench
model (``scripts/bench_score.py``: dim 64, vocab 8000, where the projection outweighs the body) the
all-scores pass costs about 2× the EL2N-only one, tracin's extra V × D product per token being most
of it; with a body as heavy as the projection (transformer-base, 32k vocabulary) that is ≤ 1.4×.

On a GPU with ``score.precision`` bf16 (or fp16) the model body runs under autocast; the decoder
states are cast to float32 and the vocabulary projection and every reduction run in float32 with
autocast off, and nothing syncs host and device per chunk. Measured with ``scripts/bench_score.py``
on a trained tiny proxy (CPU autocast, 1,200 pairs), per pair against fp32: bf16 body EL2N max abs
error 2.7e-5, NLL 2.3e-3 nats (4.7e-4 relative), Spearman 0.99999 for both; fp16 body 2.7e-6 and
2.9e-4; fp32 against float64 1.1e-7 and 3.8e-7. ``tests/test_el2n.py`` checks the bf16 figures
against float64 on a real checkpoint. So ``auto`` is fp16 on a GPU: bf16 misses the 1e-3-nat bound on NLL.
fp16's range is the risk (65504 at most): a batch whose states overflow is scored again in float32.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import length_batches
from ..config import Config
from ..cpus import usable_cpus
from ..dual import add_columns as add_dual_columns
from ..errors import UsageError
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import atomic_write_text, json_hash, temp_path
from ..pipeline import StageResult, stage_config, upstream_digests

SECTIONS = ("model", "proxy", "score")
UPSTREAM = ("prepare", "proxy")
KEEPS_UNITS = True  # shards in 04_score/shards carry their own key
log = logging.getLogger("mtprune")


@dataclass(frozen=True)
class Checkpoint:
    seed: int
    updates: int
    path: Path

    @property
    def tag(self) -> str:
        return f"s{self.seed}u{self.updates}"


def checkpoints(cfg: Config, layout: RunLayout) -> list[Checkpoint]:
    return [Checkpoint(s, u, layout.proxy_checkpoint(s, u)) for s in cfg.proxy.seeds for u in cfg.proxy.checkpoints]


def pick_device(cfg: Config) -> tuple[str, Any]:
    import torch

    device = cfg.score.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("score.device: cuda requested but no GPU is visible")
    prec = cfg.score.precision
    if prec == "auto":
        # fp16 body: within 1e-3 of fp32 on NLL where bf16 is not (figures above); an overflow is redone in fp32
        prec = "fp16" if device == "cuda" else "fp32"
    if prec != "fp32" and device == "cpu":
        raise UsageError(f"score.precision: {prec} needs a GPU; use fp32 (or auto) on CPU")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
    return device, dtype


def collate(src_ds: Any, tgt_ds: Any, batch: np.ndarray, pad: int, eos: int) -> dict[str, Any]:
    """fairseq's layout: source left-padded, target right-padded, decoder input = EOS + target[:-1]."""
    import torch

    srcs = [src_ds[int(i)] for i in batch]
    tgts = [tgt_ds[int(i)] for i in batch]
    b, s_len, t_len = len(batch), max(len(s) for s in srcs), max(len(t) for t in tgts)
    src_tokens = torch.full((b, s_len), pad, dtype=torch.long)
    target = torch.full((b, t_len), pad, dtype=torch.long)
    prev = torch.full((b, t_len), pad, dtype=torch.long)
    for k, (s, t) in enumerate(zip(srcs, tgts, strict=True)):
        src_tokens[k, s_len - len(s):] = s
        target[k, :len(t)] = t
        prev[k, 0] = eos
        prev[k, 1:len(t)] = t[:-1]
    src_lengths = torch.tensor([len(s) for s in srcs], dtype=torch.long)
    return {"src_tokens": src_tokens, "src_lengths": src_lengths, "prev": prev, "target": target}


def proxy_lr(lr: float, warmup_updates: int, updates: int, warmup_init_lr: float = 1e-7) -> float:
    """The learning rate fairseq's ``inverse_sqrt`` schedule holds after ``updates`` updates (what the
    optimizer state of ``checkpoint_u<updates>.pt`` records): linear warm-up from ``warmup_init_lr``,
    then ``lr * sqrt(warmup / updates)`` (``fairseq/optim/lr_scheduler/inverse_square_root_schedule.py``)."""
    if warmup_updates <= 0:
        return lr
    if updates < warmup_updates:
        return warmup_init_lr + updates * (lr - warmup_init_lr) / warmup_updates
    return lr * warmup_updates ** 0.5 * updates ** -0.5


def output_layer(model: Any, **kw: Any) -> Any:
    """The model's vocabulary projection as ``el2n.OutputLayer`` (refuses an adaptive softmax)."""
    from ..el2n import OutputLayer

    proj = getattr(model.decoder, "output_projection", None)
    if proj is None or getattr(model.decoder, "adaptive_softmax", None) is not None:
        raise UsageError("score: the proxy decoder has no plain output projection (adaptive softmax is not supported)")
    return OutputLayer.of(proj, **kw)


def _forward(model: Any, batch: dict[str, Any], device: str, dtype: Any) -> tuple[Any, Any]:
    """(decoder features (B, T, D), encoder output) with the body under autocast when ``dtype`` is set."""
    import torch

    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        enc = model.encoder(batch["src_tokens"].to(device), src_lengths=batch["src_lengths"].to(device))
        feats, _ = model.decoder(batch["prev"].to(device), encoder_out=enc, features_only=True)
    # fp16 holds at most 65504: a body whose activations overflow it gives inf/NaN states; that batch is run
    # again in float32 (one check per batch, not per chunk)
    if dtype is torch.float16 and not bool(torch.isfinite(feats).all()):
        global _fp16_overflows
        _fp16_overflows += 1
        if _fp16_overflows == 1:
            log.warning("score: the model's activations overflow fp16 in some batches; those are scored in fp32 "
                        "(score.precision: bf16 or fp32 avoids the retry)")
        return _forward(model, batch, device, None)
    return feats, enc


_fp16_overflows = 0  # batches scored again in float32 because fp16 overflowed (see _forward)


def score_batch(model: Any, batch: dict[str, Any], pad: int, chunk_tokens: int, device: str, dtype: Any,
                layer: Any = None, full: bool = False) -> dict[str, Any]:
    """Per-pair scores of one batch (``el2n.pair_scores``), per-token EL2N and NLL of its real tokens
    in row-major order (``tok_el2n``, ``tok_nll``) and, with ``full``, the gradient scores and the
    mean-pooled encoder output over the real source tokens (``pooled``, (B, D) float32).

    The body runs under autocast when ``dtype`` is set; the vocabulary projection and every reduction
    in float32 (``pair_scores`` casts the features and switches autocast off)."""
    from ..el2n import pair_scores

    layer = output_layer(model) if layer is None else layer
    feats, enc = _forward(model, batch, device, dtype)
    target = batch["target"].to(device)
    mask = target.ne(pad)
    out = pair_scores(feats, target, mask, layer, chunk_tokens, gradient_scores=full)
    out["tok_el2n"], out["tok_nll"] = out["tok_el2n"][mask], out["tok_nll"][mask]
    if full:
        x = enc["encoder_out"][0].float().transpose(0, 1)  # (B, S, D)
        keep = (~enc["encoder_padding_mask"][0]).float().unsqueeze(-1) if enc["encoder_padding_mask"] else None
        out["pooled"] = x.mean(1) if keep is None else (x * keep).sum(1) / keep.sum(1).clamp(min=1)
    return out


def dev_gradient(model: Any, src_ds: Any, tgt_ds: Any, dictionary: Any, batch_tokens: int, chunk_tokens: int,
                 device: str, dtype: Any) -> Any:
    """Σ over every pair of a split (the valid split) of the output layer's gradient, float64 (V, D[+1])."""
    import torch

    from ..el2n import output_gradient

    pad, eos = dictionary.pad(), dictionary.eos()
    layer = output_layer(model)
    grad = torch.zeros(layer.weight.shape, dtype=torch.float64, device=device)
    idx = np.arange(len(tgt_ds))
    with torch.inference_mode():
        for b in length_batches(idx, [np.asarray(tgt_ds.sizes), np.asarray(src_ds.sizes)], batch_tokens):
            batch = collate(src_ds, tgt_ds, b, pad, eos)
            feats, _ = _forward(model, batch, device, dtype)
            target = batch["target"].to(device)
            grad += output_gradient(feats, target, target.ne(pad), layer, chunk_tokens)
    return grad


PER_PAIR = ("el2n", "nll", "el2n_max", "el2n_eos")
GRADIENT = ("grand", "tracin_dot")


def score_dataset(models: list[Any], src_ds: Any, tgt_ds: Any, dictionary: Any, indices: np.ndarray,
                  batch_tokens: int, chunk_tokens: int, device: str, dtype: Any, dump_tokens: bool = False,
                  desc: str = "score", *, layers: list[Any] | None = None, full: bool = False,
                  sketch_out: np.ndarray | None = None, pooled_out: np.ndarray | None = None) -> dict[str, Any]:
    """The scoring loop: one pass over length-bucketed batches, every model on each batch.

    Returns per-pair (len(indices), len(models)) float64 arrays aligned with ``indices``: ``el2n``,
    ``nll``, ``el2n_max``, ``el2n_eos`` and, with ``full``, ``grand`` and ``tracin_dot`` (⟨G_pair,
    G_dev⟩, when ``layers`` carry a dev gradient). With ``full``, ``sketch_out`` (len(indices), k²)
    receives the mean over models of each pair's gradient sketch and ``pooled_out``
    (len(indices), len(models), D) the mean-pooled encoder states (both may be memory maps).
    """
    import torch
    from tqdm import tqdm

    pad, eos = dictionary.pad(), dictionary.eos()
    layers = [output_layer(m) for m in models] if layers is None else layers
    pos = np.empty(int(indices.max()) + 1 if len(indices) else 0, dtype=np.int64)
    pos[indices] = np.arange(len(indices))
    names = PER_PAIR + (GRADIENT if full else ())
    arrays = {k: np.zeros((len(indices), len(models)), dtype=np.float64) for k in names}
    if sketch_out is not None:
        sketch_out[:] = 0
    tokens: list[dict[str, Any]] = []
    batches = length_batches(indices, [np.asarray(tgt_ds.sizes), np.asarray(src_ds.sizes)], batch_tokens)
    t0 = time.time()
    with torch.inference_mode(), tqdm(total=len(indices), desc=desc, unit="sent", disable=None) as bar:
        for b in batches:
            batch = collate(src_ds, tgt_ds, b, pad, eos)
            rows = pos[b]
            tok_sum = sketch = None
            for k, (model, layer) in enumerate(zip(models, layers, strict=True)):
                out = score_batch(model, batch, pad, chunk_tokens, device, dtype, layer, full)
                for name in names:
                    if name in out:
                        arrays[name][rows, k] = out[name].cpu().numpy()
                if full and sketch_out is not None and "sketch" in out:
                    sketch = out["sketch"] if sketch is None else sketch + out["sketch"]
                if full and pooled_out is not None:
                    pooled_out[rows, k] = out["pooled"].cpu().numpy()
                if dump_tokens:
                    both = torch.stack([out["tok_el2n"], out["tok_nll"]]).double().cpu()
                    tok_sum = both if tok_sum is None else tok_sum + both
            if sketch is not None:
                sketch_out[rows] = (sketch / len(models)).float().cpu().numpy()
            if tok_sum is not None:
                _collect_tokens(tokens, batch, b, tok_sum / len(models), pad, dictionary)
            bar.update(len(b))
    return {**arrays, "n_tokens": np.asarray(tgt_ds.sizes)[indices].astype(np.int64),
            "tokens": tokens, "seconds": time.time() - t0}


def score_indices(cfg: Config, layout: RunLayout, indices: np.ndarray, desc: str, sketch_path: Path,
                  pooled_path: Path) -> dict[str, Any]:
    """Score the given fairseq train indices with every proxy checkpoint of the run, gradient scores,
    sketch (written to ``sketch_path``) and pooled encoder states (``pooled_path``) included."""
    import torch

    from ..el2n import SKETCH_K, sketch_projections
    from ..fairseq_backend import load_model, load_train_pairs

    torch.set_num_threads(usable_cpus())
    device, dtype = pick_device(cfg)
    src_ds, tgt_ds, dictionary = load_train_pairs(layout.data_bin)
    ckpts = checkpoints(cfg, layout)
    models = [load_model(c.path, layout.data_bin, device)[0] for c in ckpts]
    for c, m in zip(ckpts, models, strict=True):
        vocab = m.decoder.embed_tokens.num_embeddings
        if vocab != len(dictionary):
            raise UsageError(f"{c.path}: dictionary size {vocab} does not match {layout.data_bin} ({len(dictionary)})")
    vsrc, vtgt, _ = load_train_pairs(layout.data_bin, "valid")
    t0 = time.time()
    layers = []
    for m in models:  # one pass over valid per checkpoint: the dev gradient tracin dots with
        g = dev_gradient(m, vsrc, vtgt, dictionary, cfg.score.batch_tokens, cfg.score.chunk_tokens, device, dtype)
        base = output_layer(m)
        r_v, r_d = sketch_projections(base.vocab, base.weight.shape[1])
        layers.append(output_layer(m, dev_grad=g, sketch=(r_v.to(device), r_d.to(device))))
    dev_seconds = time.time() - t0
    dim = int(models[0].encoder.embed_tokens.embedding_dim) if models else 0
    sketch = _open_npy(sketch_path, (len(indices), SKETCH_K * SKETCH_K))
    pooled = _open_npy(pooled_path, (len(indices), len(models), dim))
    res = score_dataset(models, src_ds, tgt_ds, dictionary, indices, cfg.score.batch_tokens,
                        cfg.score.chunk_tokens, device, dtype, cfg.score.dump_tokens, desc,
                        layers=layers, full=True, sketch_out=sketch, pooled_out=pooled)
    _flush(sketch)
    _flush(pooled)
    del sketch, pooled
    lrs = [proxy_lr(cfg.proxy.lr, cfg.proxy.warmup_updates, c.updates) for c in ckpts]
    res["tracin"] = res.pop("tracin_dot") * np.asarray(lrs)[None, :] / max(len(vtgt), 1)
    return {**res, "checkpoints": ckpts, "device": device, "dev_seconds": dev_seconds, "n_dev": len(vtgt)}


def _open_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 .npy file of ``shape`` open for writing (a memory map, so corpus size stays on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if 0 in shape:  # numpy cannot map an empty file
        with open(path, "wb") as f:
            np.save(f, np.zeros(shape, dtype=np.float32))
        return np.zeros(shape, dtype=np.float32)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _flush(a: np.ndarray) -> None:
    getattr(a, "flush", lambda: None)()


def _collect_tokens(out: list[dict[str, Any]], batch: dict[str, Any], b: np.ndarray, values: Any, pad: int,
                    dictionary: Any) -> None:
    mask = batch["target"].ne(pad)
    k = 0
    for row, idx in enumerate(b):
        toks = batch["target"][row][mask[row]].tolist()
        for p, t in enumerate(toks):
            out.append({"index": int(idx), "position": p, "token": dictionary[t],
                        "el2n": float(values[0, k]), "nll": float(values[1, k])})
            k += 1


# averaged over checkpoints and seeds like el2n, one `<name>@s<seed>u<updates>` column per checkpoint
MEAN_SCORES = ("el2n", "nll", "el2n_max", "el2n_eos", "grand")


def _table(cfg: Config, layout: RunLayout, indices: np.ndarray, res: dict[str, Any]) -> Any:
    """Every column but ``proto`` (which needs all rows of a language pair, see ``_with_proto``)."""
    import pyarrow as pa

    from .prepare import read_lines

    ids = read_lines(layout.prepare_ids)
    tasks = [ln.split("\t") for ln in read_lines(layout.prepare_tasks)]
    ckpts = res["checkpoints"]
    n_seeds = max(len({c.seed for c in ckpts}), 1)
    cols: dict[str, Any] = {
        "index": pa.array(indices.astype(np.int64)),
        "sentence_id": pa.array([ids[i] for i in indices]),
        "pair": pa.array([tasks[i][0] for i in indices]),
        "direction": pa.array([tasks[i][1] for i in indices]),
        "n_tokens": pa.array(res["n_tokens"]),
        "el2n": pa.array(res["el2n"].mean(axis=1)),
        "el2n_std": pa.array(res["el2n"].std(axis=1)),
    }
    for name in MEAN_SCORES[1:]:
        cols[name] = pa.array(res[name].mean(axis=1))
    # TracIn sums over the checkpoints of a run; the runs (seeds) are averaged
    cols["tracin"] = pa.array(res["tracin"].sum(axis=1) / n_seeds)
    for name in MEAN_SCORES + ("tracin",):
        for k, c in enumerate(ckpts):
            cols[f"{name}@{c.tag}"] = pa.array(res[name][:, k])
    return pa.table(cols)


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


def _with_proto(table: Any, pooled: np.ndarray, ckpts: list[Checkpoint], clusters: int) -> Any:
    import pyarrow as pa

    groups = np.asarray([f"{p}\t{d}" for p, d in zip(table.column("pair").to_pylist(),
                                                      table.column("direction").to_pylist(), strict=True)])
    dist = proto_distances(pooled, groups, clusters)
    table = table.append_column("proto", pa.array(dist.mean(axis=1)))
    for k, c in enumerate(ckpts):
        table = table.append_column(f"proto@{c.tag}", pa.array(dist[:, k]))
    return table


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp, row_group_size=100_000)
        crash_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# read only when the finished pass is merged into scores.parquet: changing one re-merges, it does not rescore
MERGE_ONLY = ("combine", "combine_how", "baselines", "proto_clusters")


def _shard_key(cfg: Config, layout: RunLayout) -> str:
    conf = stage_config(cfg, "score")
    conf["score"] = {k: v for k, v in conf["score"].items() if k not in MERGE_ONLY}
    return json_hash({"config": conf, "inputs": upstream_digests("score", layout)})


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_indices(n: int, i: int, count: int) -> np.ndarray:
    return np.arange(n * i // count, n * (i + 1) // count)


# what a killed pass leaves (``temp_path`` names: ``.<name>.<pid>.tmp``; ``atomic_write_text``'s are random):
# in shards/ a shard's files (``.shard-0002-of-0004.sketch.npy.<pid>.tmp``, multi-GB on a real corpus), in
# 04_score/ the merge's (``.grad_sketch.npy.<pid>.tmp``, ``.pooled.<pid>.tmp``); never a lock's .holder temp
_SHARD_TEMP = re.compile(r"\.shard-(\d+)-of-(\d+)\..+\.tmp")
_MERGE_TEMP = re.compile(r"\.(?!\.?lock-)[^/]+\.\d+\.tmp")
_SHARD_LOCK = re.compile(r"\.lock-\s*(\d+)\s*-of-\s*(\d+)\s*")


def _writer_gone(lock: Path) -> bool:
    """Whether nobody but this process holds ``lock`` (files written under it then belong to a dead writer).

    The lock, not the pid in a temp file's name, is the test: a ``score --shard`` job on another host of a
    cluster writes into the same shared folder under its own lock, and its pid means nothing here."""
    from ..lock import RunLocked, check_free, holding

    if holding(lock) is not None or not lock.exists():  # a holder would have created the file
        return True
    try:
        check_free(lock)
    except RunLocked:
        return False
    return True


def remove_stale_temps(layout: RunLayout, shard: tuple[int, int] | None = None) -> int:
    """Delete the temp files that killed scoring passes left in 04_score and whose writer is gone; returns the
    bytes freed.

    A shard's temp files go when that shard's lock (``04_score/.lock-<i>-of-<n>``) is free or held by this
    process, the merge's when the run lock is; a shard scored right now by another process keeps its own.
    With ``shard`` (i, N), only that shard's files are looked at."""
    from ..lock import UNIT_LOCK_PREFIX, unit_lock_path

    folder = layout.stage_dir("score")
    shard_locks: dict[tuple[int, int], list[Path]] = {}
    for p in folder.glob(UNIT_LOCK_PREFIX + "*-of-*"):  # also a lock taken as `--shard 00/4`
        if m := _SHARD_LOCK.fullmatch(p.name):
            shard_locks.setdefault((int(m.group(1)), int(m.group(2))), []).append(p)
    stale: list[Path] = []
    for p in sorted(layout.score_shard(0, 1).parent.glob(".shard-*.tmp")):
        m = _SHARD_TEMP.fullmatch(p.name)
        key = (int(m.group(1)), int(m.group(2))) if m else None
        if key is None or (shard is not None and key != shard):
            continue
        locks = shard_locks.get(key, []) + [unit_lock_path(folder / f"{key[0]}-of-{key[1]}")]
        if all(_writer_gone(lock) for lock in locks):
            stale.append(p)
    if shard is None and folder.is_dir() and _writer_gone(layout.lock):
        stale += sorted(p for p in folder.glob(".*.tmp") if _MERGE_TEMP.fullmatch(p.name) and p.is_file())
    freed = 0
    for p in stale:
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:  # removed by another cleaner meanwhile
            continue
        freed += size
    if stale:
        log.info("score: removed %d temp file(s) left by an interrupted scoring pass, %d bytes (%.1f MB)",
                 len(stale), freed, freed / 1e6)
    return freed


def run_shard(cfg: Config, layout: RunLayout, shard: str) -> Path:
    """Score slice I of N into 04_score/shards/ (no manifest: `mtprune score` merges the shards)."""
    from ..fairseq_backend import load_train_pairs
    from ..pipeline import require_fresh_upstream

    i, count = parse_shard(shard)
    require_fresh_upstream("score", cfg, layout)
    remove_stale_temps(layout, (i, count))  # this shard's files from a killed earlier attempt
    n = len(load_train_pairs(layout.data_bin)[1])
    indices = shard_indices(n, i, count)
    path = layout.score_shard(i, count)
    sketch, pooled = _shard_sketch(path), _shard_pooled(path)
    tmp_sketch, tmp_pooled = temp_path(sketch), temp_path(pooled)
    try:
        res = score_indices(cfg, layout, indices, f"score shard {i}/{count}", tmp_sketch, tmp_pooled)
        os.replace(tmp_sketch, sketch)
        os.replace(tmp_pooled, pooled)
    finally:
        tmp_sketch.unlink(missing_ok=True)
        tmp_pooled.unlink(missing_ok=True)
    _write_parquet(add_dual_columns(cfg, layout, _table(cfg, layout, indices, res)), path)
    if cfg.score.dump_tokens:  # before the key file: a shard counts as finished only once that is written
        import pyarrow as pa

        _write_parquet(pa.Table.from_pylist(res["tokens"]), _shard_tokens(path))
    n_tok = float(res["n_tokens"].sum())
    atomic_write_text(path.with_suffix(".json"), json.dumps({
        "key": _shard_key(cfg, layout), "rows": len(indices), "seconds": res["seconds"], "device": str(res["device"]),
        "target_tokens": n_tok, "dev_seconds": res["dev_seconds"], "dev_pairs": res["n_dev"]}))
    log.info("score: shard %d/%d: %d pairs in %.1fs -> %s", i, count, len(indices), res["seconds"], path)
    return path


def _shard_sketch(shard: Path) -> Path:
    return shard.with_suffix(".sketch.npy")


def _shard_tokens(shard: Path) -> Path:
    """Per-token values of a shard (score.dump_tokens), without sentence ids: those are added at the merge."""
    return shard.with_suffix(".tokens.parquet")


def _with_sentence_ids(tok: Any, table: Any) -> Any:
    """The per-token table with each token's ``sentence_id``, looked up by training index in the score table."""
    import pyarrow as pa

    ids = dict(zip(table.column("index").to_pylist(), table.column("sentence_id").to_pylist(), strict=True))
    return tok.append_column("sentence_id", pa.array([ids[i] for i in tok.column("index").to_pylist()]))


def _shard_pooled(shard: Path) -> Path:
    """(rows, checkpoints, D) float32 mean-pooled encoder states: `proto` is computed at the merge."""
    return shard.with_suffix(".pooled.npy")


def _concat_npy(parts: list[Path], out: Path) -> None:
    """Concatenate .npy files along rows into ``out`` without holding them all in memory."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    rows = sum(a.shape[0] for a in arrays)
    dst = _open_npy(out, (rows,) + arrays[0].shape[1:])
    start = 0
    for a in arrays:
        dst[start:start + a.shape[0]] = a
        start += a.shape[0]
    _flush(dst)


def _finished_shards(cfg: Config, layout: RunLayout) -> list[Path] | None:
    """A complete set of shards (one per slice of some count N) finished with the current settings, or None.
    Sets of other counts or older settings lying beside it are ignored."""
    folder = layout.stage_dir("score") / "shards"
    counts = sorted({int(m.group(1)) for f in folder.glob("shard-*-of-*.parquet")
                     if (m := re.fullmatch(r"shard-\d+-of-(\d+)\.parquet", f.name))})
    key = _shard_key(cfg, layout)
    for count in counts:
        wanted = [layout.score_shard(i, count) for i in range(count)]
        if all(shard_key_matches(w, key) for w in wanted):
            return wanted
    return None


def _pass_stats(shards: list[Path], n_ckpts: int) -> dict[str, Any]:
    """The scoring pass's figures summed over its shards (each shard's seconds are its own process's)."""
    recs = [json.loads(s.with_suffix(".json").read_text()) for s in shards]
    out: dict[str, Any] = {"shards": len(shards)}
    if all("seconds" in r for r in recs):  # shards written before these were recorded lack them
        secs = max(sum(r["seconds"] for r in recs), 1e-9)
        rows = sum(r["rows"] for r in recs)
        out.update(seconds=round(secs, 2), device=", ".join(dict.fromkeys(r["device"] for r in recs)),
                   checkpoints_scored=n_ckpts, sentences_per_second=round(rows / secs, 1),
                   target_tokens_per_second=round(sum(r["target_tokens"] for r in recs) * n_ckpts / secs, 1),
                   dev_gradient_seconds=round(sum(r["dev_seconds"] for r in recs), 2), dev_pairs=recs[0]["dev_pairs"])
    return out


def shard_key_matches(shard: Path, key: str) -> bool:
    """Whether ``shard`` was finished (its key file written last, the shard still there) with the settings of ``key``."""
    if not shard.is_file():
        return False
    try:
        return json.loads(shard.with_suffix(".json").read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    if len(a) < 3:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


NOT_SCORES = ("index", "sentence_id", "pair", "direction", "n_tokens", "el2n_std")


def diagnostics(df: Any, ckpts: list[Checkpoint]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_score": {}}
    score_cols = [c for c in df.columns if c not in NOT_SCORES and np.issubdtype(df[c].dtype, np.number)]
    for col in score_cols:
        v = df[col].to_numpy()
        out["per_score"][col] = {
            "mean": float(v.mean()), "p5": float(np.percentile(v, 5)), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "spearman_vs_length": spearman(v, df["n_tokens"].to_numpy())}
    seeds = sorted({c.seed for c in ckpts})
    per_seed = {s: df[[f"el2n@{c.tag}" for c in ckpts if c.seed == s]].mean(axis=1).to_numpy() for s in seeds}
    out["el2n_spearman_between_seeds"] = {
        f"s{a}~s{b}": spearman(per_seed[a], per_seed[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]}
    return out


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ckpts = checkpoints(cfg, layout)
    remove_stale_temps(layout)  # what killed passes left, shards being scored by other processes excepted
    shards = _finished_shards(cfg, layout)
    stats: dict[str, Any] = {}
    if shards is None:  # more than one GPU: one `score --shard` process per GPU, merged below
        from ..launch import score_on_gpus

        shards = score_on_gpus(cfg, layout)
    if shards is None:  # one device: the whole pass as the one shard of one, kept so that a change of a
        shards = [run_shard(cfg, layout, "0/1")]  # merge-only setting (score.combine, ...) only re-merges
    else:
        log.info("score: merging %d finished shard%s", len(shards), "s" if len(shards) > 1 else "")
    tmp_sketch, tmp_pooled = temp_path(layout.grad_sketch), layout.stage_dir("score") / f".pooled.{os.getpid()}.tmp"
    try:
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        if cfg.score.dump_tokens:
            tok = pa.concat_tables([pq.read_table(_shard_tokens(s)) for s in shards])
            _write_parquet(_with_sentence_ids(tok, table), layout.token_scores)
        stats.update(_pass_stats(shards, len(ckpts)))
        _concat_npy([_shard_sketch(s) for s in shards], tmp_sketch)
        _concat_npy([_shard_pooled(s) for s in shards], tmp_pooled)
        t0 = time.time()
        table = _with_proto(table, np.load(tmp_pooled, mmap_mode="r"), ckpts, cfg.score.proto_clusters)
        stats["proto_seconds"] = round(time.time() - t0, 2)
        if np.load(tmp_sketch, mmap_mode="r").shape[0] != table.num_rows:
            raise UsageError("score: gradient sketches do not match the scored rows; delete 04_score/shards and score again")
        os.replace(tmp_sketch, layout.grad_sketch)
    finally:
        tmp_sketch.unlink(missing_ok=True)
        tmp_pooled.unlink(missing_ok=True)
    n_rows = table.num_rows
    if len(set(table.column("index").to_pylist())) != n_rows:
        raise UsageError("score: shards overlap; delete 04_score/shards and score again")
    from ..derived import add_columns_table  # last, after the merge: combined may rank any column above

    table = add_columns_table(table, cfg, layout, stats.setdefault("derived_seconds", {}))
    _write_parquet(table, layout.scores)
    stats["rows"] = n_rows
    stats["checkpoints"] = [c.tag for c in ckpts]
    df = table.to_pandas()
    stats.update(diagnostics(df, ckpts))
    e = stats["per_score"]["el2n"]
    log.info("score: %d pairs; el2n mean %.3f (p5 %.3f, p50 %.3f, p95 %.3f); spearman with length %.2f; "
             "between seeds %s", n_rows, e["mean"], e["p5"], e["p50"], e["p95"], e["spearman_vs_length"],
             ", ".join(f"{k} {v:.2f}" for k, v in stats["el2n_spearman_between_seeds"].items()) or "n/a")
    outputs = [layout.scores, layout.grad_sketch] + ([layout.token_scores] if cfg.score.dump_tokens else [])
    outputs += _noise_files(df, layout, stats)
    return StageResult(outputs, stats)


def _noise_files(df: Any, layout: RunLayout, stats: dict[str, Any]) -> list[Path]:
    """With labelled noise from the download (``download.noise`` or the synthetic corpus), how well each
    score finds it: ``04_score/noise.md`` and ``noise.csv``, so a scorer is judged without training any final
    model. Without labels, files of an earlier labelled run are removed."""
    from .report import labelled_noise_table, read_noise_ids

    md_path, csv_path = layout.score_noise
    if not layout.noise_ids.is_file():
        md_path.unlink(missing_ok=True)
        csv_path.unlink(missing_ok=True)
        return []
    labels = read_noise_ids(layout.noise_ids)
    md, long, summary = labelled_noise_table(df, labels, "01_download/noise.ids")
    atomic_write_text(md_path, md)
    atomic_write_text(csv_path, long.to_csv(index=False, lineterminator="\n"))
    stats["noise"] = summary
    best = [f"{k} {v:.2f}" for k, v in summary["auroc"].items() if v is not None][:4]
    base = summary["auroc"].get("-length")
    log.info("score: finding the %d labelled pairs, best AUROC: %s; -length %s (table: %s)", summary["labelled"],
             ", ".join(best) or "n/a", "n/a" if base is None else f"{base:.2f}", md_path)
    return [md_path, csv_path]


# ---- what the stage will write, from the config alone ---------------------------------------------

def score_columns(cfg: Config) -> list[str]:
    """Every numeric column ``scores.parquet`` will have with these settings (``tests/test_score.py`` holds it
    to the real table), so that a strategy or combine entry naming a column no stage writes is refused
    before the first stage runs, not after hours of proxy training."""
    tags = [f"s{s}u{u}" for s in cfg.proxy.seeds for u in cfg.proxy.checkpoints]
    families = [*MEAN_SCORES, "tracin", "proto"]
    if cfg.proxy.dual:
        families += ["nll_reverse", "dual_xent"]
    families += [f"{f}_debiased" for f in ("el2n", "nll")]
    out = ["n_tokens", "el2n_std", "el2n_worst"]
    for f in families:
        out += [f, *(f"{f}@{t}" for t in tags)]
    if cfg.score.baselines:
        out += ["base_len_ratio", "base_copy", "base_langid"]
    if cfg.score.combine:
        out.append("combined")
    return out


def check(cfg: Config, layout: RunLayout) -> None:
    """Problems the stage would meet, from the config alone (also before a sweep's first stage): a device or
    precision this machine lacks, a ``score.combine`` entry naming a column the stage does not write."""
    pick_device(cfg)
    known = [c for c in score_columns(cfg) if c != "combined"]
    missing = [e for e in cfg.score.combine if e.lstrip("-") not in known]
    if missing:
        raise UsageError(f"score.combine: no score column {missing[0].lstrip('-')!r} (the score stage writes: "
                         f"{', '.join(c for c in known if '@' not in c)} and one <name>@s<seed>u<updates> per "
                         "checkpoint)")


def plan_note(cfg: Config, layout: RunLayout, upstream_runs: list[str]) -> str:
    """For `sweep --dry-run`: whether the scoring pass is kept and only the merge runs."""
    if not upstream_runs and _finished_shards(cfg, layout) is not None:
        return "the scoring pass in 04_score/shards is kept: only the merge runs"
    return ""
