"""Stage 4: per-pair EL2N and NLL, averaged over target tokens, checkpoints and seeds.

One pass over length-bucketed batches runs every proxy checkpoint on each batch (while they fit
in memory), projects only non-padding decoder states to the vocabulary, chunk by chunk, and
reduces each chunk to two numbers per token at once (see ``el2n.py``).

On a GPU with ``score.precision`` bf16 (or fp16) the model runs under autocast, the vocabulary
projection included, and the EL2N/NLL reduction in float32. Against a float64 model and reference
the error stays within 1e-3 (absolute) per token and 2e-4 per pair for EL2N, 1 % per token and
0.2 % per pair (relative) for NLL; ``tests/test_el2n.py`` checks this under CPU bf16 autocast.
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
        prec = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
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


def score_batch(model: Any, batch: dict[str, Any], pad: int, chunk_tokens: int, device: str,
                dtype: Any) -> tuple[Any, Any, Any, Any]:
    """Per-sentence mean EL2N and NLL, and per-token values with their (row, position)."""
    import torch

    from ..el2n import chunked_token_scores, segment_mean

    src = batch["src_tokens"].to(device)
    target = batch["target"].to(device)
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        enc = model.encoder(src, src_lengths=batch["src_lengths"].to(device))
        feats, _ = model.decoder(batch["prev"].to(device), encoder_out=enc, features_only=True)
        mask = target.ne(pad)
        el2n, nll = chunked_token_scores(feats[mask], target[mask], model.decoder.output_layer, chunk_tokens)
    rows = mask.nonzero()[:, 0]
    n = target.shape[0]
    return segment_mean(el2n, rows, n), segment_mean(nll, rows, n), el2n, nll


def score_dataset(models: list[Any], src_ds: Any, tgt_ds: Any, dictionary: Any, indices: np.ndarray,
                  batch_tokens: int, chunk_tokens: int, device: str, dtype: Any, dump_tokens: bool = False,
                  desc: str = "score") -> dict[str, Any]:
    """The scoring loop: one pass over length-bucketed batches, every model on each batch.

    Returns per-pair (len(indices), len(models)) arrays of mean EL2N and NLL aligned with ``indices``.
    """
    import torch
    from tqdm import tqdm

    pad, eos = dictionary.pad(), dictionary.eos()
    pos = np.empty(int(indices.max()) + 1 if len(indices) else 0, dtype=np.int64)
    pos[indices] = np.arange(len(indices))
    el2n = np.zeros((len(indices), len(models)), dtype=np.float64)
    nll = np.zeros_like(el2n)
    tokens: list[dict[str, Any]] = []
    batches = length_batches(indices, [np.asarray(tgt_ds.sizes), np.asarray(src_ds.sizes)], batch_tokens)
    t0 = time.time()
    with torch.inference_mode(), tqdm(total=len(indices), desc=desc, unit="sent", disable=None) as bar:
        for b in batches:
            batch = collate(src_ds, tgt_ds, b, pad, eos)
            rows = pos[b]
            tok_sum = None
            for k, model in enumerate(models):
                s_el2n, s_nll, t_el2n, t_nll = score_batch(model, batch, pad, chunk_tokens, device, dtype)
                el2n[rows, k] = s_el2n.cpu().numpy()
                nll[rows, k] = s_nll.cpu().numpy()
                if dump_tokens:
                    both = torch.stack([t_el2n, t_nll]).double().cpu()
                    tok_sum = both if tok_sum is None else tok_sum + both
            if tok_sum is not None:
                _collect_tokens(tokens, batch, b, tok_sum / len(models), pad, dictionary)
            bar.update(len(b))
    return {"el2n": el2n, "nll": nll, "n_tokens": np.asarray(tgt_ds.sizes)[indices].astype(np.int64),
            "tokens": tokens, "seconds": time.time() - t0}


def score_indices(cfg: Config, layout: RunLayout, indices: np.ndarray, desc: str) -> dict[str, Any]:
    """Score the given fairseq train indices with every proxy checkpoint of the run."""
    import torch

    from ..fairseq_backend import load_model, load_train_pairs

    torch.set_num_threads(os.cpu_count() or 1)
    device, dtype = pick_device(cfg)
    src_ds, tgt_ds, dictionary = load_train_pairs(layout.data_bin)
    ckpts = checkpoints(cfg, layout)
    models = [load_model(c.path, layout.data_bin, device)[0] for c in ckpts]
    for c, m in zip(ckpts, models, strict=True):
        vocab = m.decoder.embed_tokens.num_embeddings
        if vocab != len(dictionary):
            raise UsageError(f"{c.path}: dictionary size {vocab} does not match {layout.data_bin} ({len(dictionary)})")
    res = score_dataset(models, src_ds, tgt_ds, dictionary, indices, cfg.score.batch_tokens,
                        cfg.score.chunk_tokens, device, dtype, cfg.score.dump_tokens, desc)
    return {**res, "checkpoints": ckpts, "device": device}


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


def _table(cfg: Config, layout: RunLayout, indices: np.ndarray, res: dict[str, Any]) -> Any:
    import pyarrow as pa

    from .prepare import read_lines

    ids = read_lines(layout.prepare_ids)
    tasks = [ln.split("\t") for ln in read_lines(layout.prepare_tasks)]
    cols: dict[str, Any] = {
        "index": pa.array(indices.astype(np.int64)),
        "sentence_id": pa.array([ids[i] for i in indices]),
        "pair": pa.array([tasks[i][0] for i in indices]),
        "direction": pa.array([tasks[i][1] for i in indices]),
        "n_tokens": pa.array(res["n_tokens"]),
        "el2n": pa.array(res["el2n"].mean(axis=1)),
        "el2n_std": pa.array(res["el2n"].std(axis=1)),
        "nll": pa.array(res["nll"].mean(axis=1)),
    }
    for k, c in enumerate(res["checkpoints"]):
        cols[f"el2n@{c.tag}"] = pa.array(res["el2n"][:, k])
    for k, c in enumerate(res["checkpoints"]):
        cols[f"nll@{c.tag}"] = pa.array(res["nll"][:, k])
    return pa.table(cols)


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


def _shard_key(cfg: Config, layout: RunLayout) -> str:
    return json_hash({"config": stage_config(cfg, "score"), "inputs": upstream_digests("score", layout)})


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_indices(n: int, i: int, count: int) -> np.ndarray:
    return np.arange(n * i // count, n * (i + 1) // count)


def run_shard(cfg: Config, layout: RunLayout, shard: str) -> Path:
    """Score slice I of N into 04_score/shards/ (no manifest: `mtprune score` merges the shards)."""
    from ..fairseq_backend import load_train_pairs
    from ..pipeline import require_fresh_upstream

    i, count = parse_shard(shard)
    require_fresh_upstream("score", cfg, layout)
    n = len(load_train_pairs(layout.data_bin)[1])
    indices = shard_indices(n, i, count)
    res = score_indices(cfg, layout, indices, f"score shard {i}/{count}")
    path = layout.score_shard(i, count)
    _write_parquet(_table(cfg, layout, indices, res), path)
    atomic_write_text(path.with_suffix(".json"), json.dumps({"key": _shard_key(cfg, layout), "rows": len(indices)}))
    log.info("score: shard %d/%d: %d pairs in %.1fs -> %s", i, count, len(indices), res["seconds"], path)
    return path


def _finished_shards(cfg: Config, layout: RunLayout) -> list[Path] | None:
    folder = layout.stage_dir("score") / "shards"
    files = sorted(folder.glob("shard-*-of-*.parquet"))
    if not files:
        return None
    count = int(files[0].stem.split("-of-")[1])
    key = _shard_key(cfg, layout)
    wanted = [layout.score_shard(i, count) for i in range(count)]
    for w in wanted:
        try:
            if json.loads(w.with_suffix(".json").read_text())["key"] != key:
                return None
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
    return wanted


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    if len(a) < 3:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def diagnostics(table: Any, ckpts: list[Checkpoint]) -> dict[str, Any]:
    df = table.to_pandas()
    out: dict[str, Any] = {"per_score": {}}
    score_cols = ["el2n", "nll"] + [f"el2n@{c.tag}" for c in ckpts] + [f"nll@{c.tag}" for c in ckpts]
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

    from ..fairseq_backend import load_train_pairs

    ckpts = checkpoints(cfg, layout)
    shards = _finished_shards(cfg, layout)
    stats: dict[str, Any] = {}
    if shards is not None:
        log.info("score: merging %d finished shards", len(shards))
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        stats["merged_shards"] = len(shards)
    else:
        n = len(load_train_pairs(layout.data_bin)[1])
        indices = np.arange(n)
        res = score_indices(cfg, layout, indices, "score")
        table = _table(cfg, layout, indices, res)
        secs = max(res["seconds"], 1e-9)
        stats.update(seconds=round(res["seconds"], 2), device=res["device"], checkpoints_scored=len(ckpts),
                     sentences_per_second=round(n / secs, 1),
                     target_tokens_per_second=round(float(res["n_tokens"].sum()) * len(ckpts) / secs, 1))
        if cfg.score.dump_tokens:
            ids = table.column("sentence_id").to_pylist()
            tok = pa.Table.from_pylist(res["tokens"])
            tok = tok.append_column("sentence_id", pa.array([ids[i] for i in tok.column("index").to_pylist()]))
            _write_parquet(tok, layout.token_scores)
    n_rows = table.num_rows
    if len(set(table.column("index").to_pylist())) != n_rows:
        raise UsageError("score: shards overlap; delete 04_score/shards and score again")
    _write_parquet(table, layout.scores)
    stats["rows"] = n_rows
    stats["checkpoints"] = [c.tag for c in ckpts]
    stats.update(diagnostics(table, ckpts))
    e = stats["per_score"]["el2n"]
    log.info("score: %d pairs; el2n mean %.3f (p5 %.3f, p50 %.3f, p95 %.3f); spearman with length %.2f; "
             "between seeds %s", n_rows, e["mean"], e["p5"], e["p50"], e["p95"], e["spearman_vs_length"],
             ", ".join(f"{k} {v:.2f}" for k, v in stats["el2n_spearman_between_seeds"].items()) or "n/a")
    outputs = [layout.scores] + ([layout.token_scores] if cfg.score.dump_tokens and shards is None else [])
    return StageResult(outputs, stats)
