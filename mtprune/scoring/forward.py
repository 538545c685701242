"""The scoring pass: per-pair scores from every proxy checkpoint, in one pass over the data.

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
- ``forget``: forgetting events (Toneva et al. 2019) per target token: how often the token goes from
  predicted (the target among the largest logits) to not between a proxy run's consecutive checkpoints;
  a token no checkpoint predicts counts as many events as the run has checkpoints (never learnt ranks
  above every forgotten token). Mean over the pair's tokens, averaged over the runs (seeds); with the
  default two checkpoints per run it separates never learnt, forgotten once and kept. More
  ``proxy.checkpoints`` give it a finer scale.
- ``04_score/grad_sketch.npy``: float16 (rows of scores.parquet, 256), row i = mean over checkpoints
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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import length_batches
from ..config import Config
from ..cpus import usable_cpus
from ..errors import UsageError
from ..layout import RunLayout
from ..textio import read_lines
from .baselines import COLUMNS as BASELINE_COLUMNS
from .stored import POOLED_DIMS, SKETCH_DTYPE, flush_npy, open_npy, pooled_basis

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
        out["pooled"] = _pooled(enc)
    return out


def _pooled(enc: dict[str, Any]) -> Any:
    """(B, D) float32: the encoder output mean-pooled over each row's real source tokens."""
    x = enc["encoder_out"][0].float().transpose(0, 1)  # (B, S, D)
    keep = (~enc["encoder_padding_mask"][0]).float().unsqueeze(-1) if enc["encoder_padding_mask"] else None
    return x.mean(1) if keep is None else (x * keep).sum(1) / keep.sum(1).clamp(min=1)


def dev_gradient(model: Any, src_ds: Any, tgt_ds: Any, dictionary: Any, batch_tokens: int, chunk_tokens: int | str,
                 device: str, dtype: Any, pooled: list[Any] | None = None) -> Any:
    """Σ over every pair of a split (the valid split) of the output layer's gradient, float64 (V, D[+1]).
    With ``pooled`` (a list), the batches' pooled encoder states (B, D) are appended to it. ``chunk_tokens``
    as ``score.chunk_tokens`` (``auto`` or a count)."""
    import torch

    from ..el2n import chunk_size, output_gradient

    chunk_tokens = chunk_size(chunk_tokens, len(dictionary), device)
    pad, eos = dictionary.pad(), dictionary.eos()
    layer = output_layer(model)
    grad = torch.zeros(layer.weight.shape, dtype=torch.float64, device=device)
    idx = np.arange(len(tgt_ds))
    with torch.inference_mode():
        for b in length_batches(idx, [np.asarray(tgt_ds.sizes), np.asarray(src_ds.sizes)], batch_tokens):
            batch = collate(src_ds, tgt_ds, b, pad, eos)
            feats, enc = _forward(model, batch, device, dtype)
            target = batch["target"].to(device)
            grad += output_gradient(feats, target, target.ne(pad), layer, chunk_tokens)
            if pooled is not None:
                pooled.append(_pooled(enc))
    return grad


PER_PAIR = ("el2n", "nll", "el2n_max", "el2n_eos")


GRADIENT = ("grand", "tracin_dot")


def score_dataset(models: list[Any], src_ds: Any, tgt_ds: Any, dictionary: Any, indices: np.ndarray,
                  batch_tokens: int, chunk_tokens: int | str, device: str, dtype: Any, dump_tokens: bool = False,
                  desc: str = "score", *, layers: list[Any] | None = None, full: bool = False,
                  sketch_out: np.ndarray | None = None, pooled_out: np.ndarray | None = None,
                  runs: list[list[int]] | None = None, pooled_proj: list[Any] | None = None) -> dict[str, Any]:
    """The scoring loop: one pass over length-bucketed batches, every model on each batch.

    Returns per-pair (len(indices), len(models)) float64 arrays aligned with ``indices``: ``el2n``,
    ``nll``, ``el2n_max``, ``el2n_eos`` and, with ``full``, ``grand`` and ``tracin_dot`` (⟨G_pair,
    G_dev⟩, when ``layers`` carry a dev gradient). With ``full``, ``sketch_out`` (len(indices), k²)
    receives the mean over models of each pair's gradient sketch and ``pooled_out``
    (len(indices), len(models), D) the mean-pooled encoder states, times model k's ``pooled_proj[k]`` (D, P)
    when those are given (both may be memory maps, of any float type). With
    ``runs`` (the model positions of each proxy run, in update order), ``forget`` (len(indices),): the
    pairs' forgetting (``el2n.forgetting``) averaged over the runs. ``chunk_tokens`` as ``score.chunk_tokens``.
    """
    import torch
    from tqdm import tqdm

    from ..el2n import chunk_size, forgetting

    chunk_tokens = chunk_size(chunk_tokens, len(dictionary), device)
    pad, eos = dictionary.pad(), dictionary.eos()
    layers = [output_layer(m) for m in models] if layers is None else layers
    forget = np.zeros(len(indices), dtype=np.float64) if runs else None
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
            correct = []
            for k, (model, layer) in enumerate(zip(models, layers, strict=True)):
                out = score_batch(model, batch, pad, chunk_tokens, device, dtype, layer, full)
                correct.append(out["tok_correct"])
                for name in names:
                    if name in out:
                        arrays[name][rows, k] = out[name].cpu().numpy()
                if full and sketch_out is not None and "sketch" in out:
                    sketch = out["sketch"] if sketch is None else sketch + out["sketch"]
                if full and pooled_out is not None:
                    p = out["pooled"] if pooled_proj is None else out["pooled"] @ pooled_proj[k]
                    pooled_out[rows, k] = p.cpu().numpy()
                if dump_tokens:
                    both = torch.stack([out["tok_el2n"], out["tok_nll"]]).double().cpu()
                    tok_sum = both if tok_sum is None else tok_sum + both
            if sketch is not None:
                sketch_out[rows] = (sketch / len(models)).float().cpu().numpy()
            if tok_sum is not None:
                _collect_tokens(tokens, batch, b, tok_sum / len(models), pad, dictionary)
            if forget is not None:
                mask = batch["target"].ne(pad).to(correct[0].device)
                forget[rows] = sum(forgetting([correct[k] for k in run], mask).cpu().numpy() for run in runs) / len(runs)
            bar.update(len(b))
    extra = {} if forget is None else {"forget": forget}
    return {**arrays, **extra, "n_tokens": np.asarray(tgt_ds.sizes)[indices].astype(np.int64),
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
    layers, bases = [], []
    for m in models:  # one pass over valid per checkpoint: the dev gradient tracin dots with, the pooled basis
        states: list[Any] = []
        g = dev_gradient(m, vsrc, vtgt, dictionary, cfg.score.batch_tokens, cfg.score.chunk_tokens, device, dtype,
                         pooled=states)
        bases.append(pooled_basis(torch.cat(states)) if states else None)
        base = output_layer(m)
        r_v, r_d = sketch_projections(base.vocab, base.weight.shape[1])
        layers.append(output_layer(m, dev_grad=g, sketch=(r_v.to(device), r_d.to(device))))
    dev_seconds = time.time() - t0
    dim = int(models[0].encoder.embed_tokens.embedding_dim) if models else 0
    projected = dim > POOLED_DIMS and all(b is not None for b in bases)
    sketch = open_npy(sketch_path, (len(indices), SKETCH_K * SKETCH_K), SKETCH_DTYPE)
    pooled = open_npy(pooled_path, (len(indices), len(models), POOLED_DIMS if projected else dim), np.float16)
    res = score_dataset(models, src_ds, tgt_ds, dictionary, indices, cfg.score.batch_tokens,
                        cfg.score.chunk_tokens, device, dtype, cfg.score.dump_tokens, desc,
                        layers=layers, full=True, sketch_out=sketch, pooled_out=pooled, runs=proxy_runs(ckpts),
                        pooled_proj=[b.to(device) for b in bases] if projected else None)
    flush_npy(sketch)
    flush_npy(pooled)
    del sketch, pooled
    lrs = [proxy_lr(cfg.proxy.lr, cfg.proxy.warmup_updates, c.updates) for c in ckpts]
    res["tracin"] = res.pop("tracin_dot") * np.asarray(lrs)[None, :] / max(len(vtgt), 1)
    return {**res, "checkpoints": ckpts, "device": device, "dev_seconds": dev_seconds, "n_dev": len(vtgt)}


def proxy_runs(ckpts: list[Checkpoint]) -> list[list[int]]:
    """The positions in ``ckpts`` of each proxy run's (seed's) checkpoints, in update order."""
    seeds = sorted({c.seed for c in ckpts})
    return [sorted((k for k, c in enumerate(ckpts) if c.seed == s), key=lambda k: ckpts[k].updates) for s in seeds]


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


def row_columns(layout: RunLayout, indices: np.ndarray) -> dict[str, Any]:
    """What names the training examples ``indices`` (pyarrow arrays): ``index``, ``sentence_id``, ``pair``,
    ``direction``, from the prepare stage's ``train.ids`` and ``train.tasks``."""
    import pyarrow as pa

    ids = read_lines(layout.prepare_ids)
    sentence_id = pa.array([ids[i] for i in indices], pa.string())
    del ids
    lines = read_lines(layout.prepare_tasks)
    tasks = [lines[i].split("\t") for i in indices]  # only the rows asked for: a shard's, not the corpus's
    del lines
    return {
        "index": pa.array(indices.astype(np.int64)),
        "sentence_id": sentence_id,
        "pair": pa.array([t[0] for t in tasks], pa.string()),
        "direction": pa.array([t[1] for t in tasks], pa.string()),
    }


def score_table(cfg: Config, layout: RunLayout, indices: np.ndarray, res: dict[str, Any]) -> Any:
    """Every column but ``proto`` (which needs all rows of a language pair, see ``with_proto``)."""
    import pyarrow as pa

    ckpts = res["checkpoints"]
    n_seeds = max(len({c.seed for c in ckpts}), 1)
    cols: dict[str, Any] = {
        **row_columns(layout, indices),
        "n_tokens": pa.array(res["n_tokens"]),
        "el2n": pa.array(res["el2n"].mean(axis=1)),
        "el2n_std": pa.array(res["el2n"].std(axis=1)),
    }
    for name in MEAN_SCORES[1:]:
        cols[name] = pa.array(res[name].mean(axis=1))
    # TracIn sums over the checkpoints of a run; the runs (seeds) are averaged
    cols["tracin"] = pa.array(res["tracin"].sum(axis=1) / n_seeds)
    cols["forget"] = pa.array(res["forget"])
    for name in MEAN_SCORES + ("tracin",):
        for k, c in enumerate(ckpts):
            cols[f"{name}@{c.tag}"] = pa.array(res[name][:, k])
    return pa.table(cols)


def score_columns(cfg: Config) -> list[str]:
    """Every numeric column ``scores.parquet`` will have with these settings (``tests/test_score.py`` holds it
    to the real table), so that a strategy or combine entry naming a column no stage writes is refused
    before the first stage runs, not after hours of proxy training."""
    tags = [f"s{s}u{u}" for s in cfg.proxy.seeds for u in cfg.proxy.checkpoints]
    families = [*MEAN_SCORES, "tracin", "proto"]
    if cfg.proxy.dual:
        families += ["nll_reverse", "dual_xent"]
    families += [f"{f}_debiased" for f in ("el2n", "nll")]
    out = ["n_tokens", "el2n_std", "el2n_worst", "forget"]
    for f in families:
        out += [f, *(f"{f}@{t}" for t in tags)]
    if cfg.score.baselines:
        out += [*BASELINE_COLUMNS, "base_all", "base_fitted"]
    if cfg.score.combine:
        out.append("combined")
        if cfg.score.baselines:
            out.append("combined_all")
    return out + list(cfg.score.target.columns())  # domain.py's, with score.target
