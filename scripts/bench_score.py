#!/usr/bin/env python
"""Benchmark of the scoring pass, measured side by side in one run on the same model and batches.

1. EL2N-only pass (el2n, nll, el2n_max, el2n_eos) against the all-scores pass (plus grand, tracin,
   the gradient sketch and the pooled encoder states for proto), the dev-gradient pass and proto's
   k-means, and both against the bare teacher-forced forward pass (logits only);
2. the FLOP rate the all-scores pass achieves (counted with torch's FlopCounterMode) against a plain
   torch matmul of the projection's shape on this machine;
3. precision: per-pair EL2N and NLL with the body under bf16 / fp16 autocast (the projection and the
   reductions in float32, as score.py runs them) against fp32, and fp32 against float64: max abs error
   and Spearman; beside it, what a bf16 vocabulary projection would cost;
4. speed-up over a naive scorer (one sentence at a time, explicit softmax − one-hot);
5. peak RSS of the real all-scores loop on a corpus 10× larger, over the smaller one (subprocesses).

Times are CPU seconds per thread (``clock``), the best of ``--rounds`` alternating runs.

By default the model is a fairseq transformer with random weights (cost does not depend on the
weights) and the corpus random token ids in fairseq's mmap format, so the benchmark needs no trained
run; precision figures want a trained model: ``--checkpoint`` with ``--data-bin`` scores its train
split (and takes its valid split as the dev set) instead.

    .venv/bin/python scripts/bench_score.py [--sentences 1000] [--vocab V] [--dim D] [--layers L]
    .venv/bin/python scripts/bench_score.py --checkpoint RUN/03_proxy/seed1/checkpoint_u20.pt --data-bin RUN/02_prepare/data-bin

Vocabulary, dimension, depth, batch and chunk sizes default to the default config's (``mtprune.config``),
so the figures describe what ``mtprune score`` runs unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(vocab: int, dim: int, layers: int):
    import torch
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, base_architecture

    from mtprune.fairseq_backend import quiet_fairseq

    quiet_fairseq()
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    args = argparse.Namespace(encoder_layers=layers, decoder_layers=layers, encoder_embed_dim=dim,
                              decoder_embed_dim=dim, encoder_ffn_embed_dim=4 * dim, decoder_ffn_embed_dim=4 * dim,
                              encoder_attention_heads=4, decoder_attention_heads=4, share_all_embeddings=True,
                              dropout=0.0, max_source_positions=1024, max_target_positions=1024)
    base_architecture(args)

    class Task:
        source_dictionary = target_dictionary = d

    torch.manual_seed(0)
    model = TransformerModel.build_model(args, Task()).eval()
    return model, d


def make_corpus(folder: Path, d, n: int, seed: int = 0):
    import torch
    from fairseq.data import data_utils, indexed_dataset

    rng = np.random.default_rng(seed)
    out = []
    for side in ("src", "tgt"):
        prefix = folder / f"{seed}.{side}"
        builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(d))
        for _ in range(n):
            length = int(rng.integers(4, 40))
            toks = rng.integers(d.nspecial, len(d), size=length)
            builder.add_item(torch.tensor(np.append(toks, d.eos()), dtype=torch.int32))
        builder.finalize(f"{prefix}.idx")
        out.append(data_utils.load_indexed_dataset(str(prefix), d, dataset_impl="mmap"))
    return out


def setup(args, tmp: Path):
    """(model, dictionary, (train src, tgt), (dev src, tgt), what) from a checkpoint or random weights."""
    if args.checkpoint:
        from mtprune.fairseq_backend import load_model, load_train_pairs

        model = load_model(Path(args.checkpoint), Path(args.data_bin), "cpu")[0]
        src, tgt, d = load_train_pairs(Path(args.data_bin))
        vsrc, vtgt, _ = load_train_pairs(Path(args.data_bin), "valid")
        return model, d, (src, tgt), (vsrc, vtgt), f"checkpoint {args.checkpoint}"
    model, d = build(args.vocab, args.dim, args.layers)
    return (model, d, make_corpus(tmp, d, args.sentences), make_corpus(tmp, d, args.dev_sentences, seed=1),
            f"transformer {args.layers}+{args.layers} layers, dim {args.dim}, vocab {args.vocab}, random weights")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def clock() -> float:
    """Seconds of CPU time of this process (all its threads), divided by the threads torch uses: on a
    machine shared with other jobs, wall time measures the neighbours as much as the code."""
    import torch

    return time.process_time() / torch.get_num_threads()


def speed(args, model, d, train, dev) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtprune.batching import length_batches
    from mtprune.el2n import reference_el2n_nll, sketch_projections
    from mtprune.scoring.forward import collate, dev_gradient, output_layer, score_batch
    from mtprune.scoring.proto import proto_distances

    src, tgt = train
    n = min(args.sentences, len(tgt))
    idx = np.arange(n)
    batches = [collate(src, tgt, b, d.pad(), d.eos())
               for b in length_batches(idx, [np.asarray(tgt.sizes), np.asarray(src.sizes)], args.batch_tokens)]
    n_tok = int(np.asarray(tgt.sizes)[:n].sum())
    plain = output_layer(model)
    with torch.inference_mode():
        bare_warm = batches[0]
        model(bare_warm["src_tokens"], bare_warm["src_lengths"], bare_warm["prev"])  # first calls pay for set-up
        for _ in range(2):  # the second: a later checkpoint's dev pass finds its kernels ready
            t = clock()
            g = dev_gradient(model, dev[0], dev[1], d, args.batch_tokens, args.chunk_tokens, "cpu", None)
            t_dev = clock() - t
    full = output_layer(model, dev_grad=g, sketch=sketch_projections(plain.vocab, plain.weight.shape[1]))
    pooled: list = []

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b["src_tokens"], b["src_lengths"], b["prev"])

    def el2n_only() -> None:
        with torch.inference_mode():
            for b in batches:
                score_batch(model, b, d.pad(), args.chunk_tokens, "cpu", None, plain)

    def all_scores() -> None:
        pooled.clear()
        with torch.inference_mode():
            for b in batches:
                pooled.append(score_batch(model, b, d.pad(), args.chunk_tokens, "cpu", None, full, True)["pooled"])

    naive_n = min(args.naive_sentences, n)

    def naive() -> None:
        with torch.inference_mode():
            for i in range(naive_n):
                b = collate(src, tgt, idx[i:i + 1], d.pad(), d.eos())
                logits, _ = model(b["src_tokens"], b["src_lengths"], b["prev"])
                reference_el2n_nll(logits[0], b["target"][0])

    bare(), el2n_only(), all_scores()  # warm-up
    best = {"bare": float("inf"), "el2n": float("inf"), "all": float("inf")}
    for _ in range(args.rounds):  # alternate, keep each one's best: machine noise only ever adds time
        for name, fn in (("bare", bare), ("el2n", el2n_only), ("all", all_scores)):
            t = clock()
            fn()
            best[name] = min(best[name], clock() - t)
    x = torch.cat(pooled).numpy()[:, None, :]
    t = clock()
    proto_distances(x, np.zeros(len(x), dtype=np.int64), 16)
    t_proto = clock() - t
    with FlopCounterMode(display=False) as fc:
        all_scores()
    flops = fc.get_total_flops()
    # the same shapes as a plain matmul: a chunk's states times the (D, V) projection
    rows = max(1, args.chunk_tokens)
    a = torch.randn(rows, full.weight.shape[1])
    w = full.weight.T.contiguous()
    reps = max(1, n_tok // rows)
    with torch.inference_mode():
        a @ w
        t = clock()
        for _ in range(reps):
            a @ w
        t_mm = clock() - t
    mm_rate = 2 * rows * w.shape[0] * w.shape[1] * reps / t_mm
    t = clock()
    naive()
    t_naive = clock() - t
    naive_tok = int(np.asarray(tgt.sizes)[:naive_n].sum())
    return {"tokens": n_tok, "bare": best["bare"], "el2n": best["el2n"], "all": best["all"], "dev": t_dev,
            "dev_tokens": int(np.asarray(dev[1].sizes).sum()), "proto": t_proto, "flops": flops,
            "mm_rate": mm_rate, "naive_tok_s": naive_tok / t_naive}


def precision(args, model, d, train) -> dict[str, dict[str, float]]:
    """Per-pair EL2N / NLL under bf16 and fp16 autocast and in fp32, against fp32 and float64."""
    import copy

    import torch

    from mtprune.el2n import OutputLayer, pair_scores
    from mtprune.scoring.forward import score_dataset

    src, tgt = train
    idx = np.arange(min(args.precision_sentences, len(tgt)))

    def run(m, dtype) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            r = score_dataset([m], src, tgt, d, idx, args.batch_tokens, args.chunk_tokens, "cpu", dtype)
        return {k: r[k][:, 0] for k in ("el2n", "nll")}

    ref32 = run(model, None)
    out = {"fp32 vs float64": _compare(ref32, run(copy.deepcopy(model).double(), None))}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out[f"{name} body vs fp32"] = _compare(run(model, dt), ref32)
    # what the old design cost: the vocabulary projection itself in bf16 (states and weights rounded)
    import mtprune.el2n as el2n
    import mtprune.scoring.forward as score

    layer_of, pair_scores_of = score.output_layer, el2n.pair_scores
    try:
        score.output_layer = lambda m, **kw: OutputLayer(m.decoder.output_projection.weight.bfloat16().float(), **kw)
        el2n.pair_scores = lambda feats, *a, **kw: pair_scores(feats.bfloat16().float(), *a, **kw)
        out["bf16 body + bf16 projection vs fp32"] = _compare(run(model, torch.bfloat16), ref32)
    finally:
        score.output_layer, el2n.pair_scores = layer_of, pair_scores_of
    return out


def _compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    return {"el2n_abs": float(np.abs(got["el2n"] - ref["el2n"]).max()),
            "el2n_spearman": spearman(got["el2n"], ref["el2n"]),
            "nll_abs": float(np.abs(got["nll"] - ref["nll"]).max()),
            "nll_rel": float((np.abs(got["nll"] - ref["nll"]) / np.abs(ref["nll"])).max()),
            "nll_spearman": spearman(got["nll"], ref["nll"])}


def rss_child(args) -> None:
    """Run the real all-scores loop (score_dataset, memory-mapped outputs) on N sentences; print peak RSS in MiB."""
    import torch

    from mtprune.el2n import SKETCH_K, sketch_projections
    from mtprune.scoring.forward import output_layer, score_dataset
    from mtprune.scoring.stored import open_npy

    torch.set_num_threads(os.cpu_count() or 1)
    model, d = build(args.vocab, args.dim, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        src, tgt = make_corpus(Path(tmp), d, args.sentences)
        plain = output_layer(model)
        g = torch.randn(plain.weight.shape, dtype=torch.float64)
        layer = output_layer(model, dev_grad=g, sketch=sketch_projections(plain.vocab, plain.weight.shape[1]))
        sketch = open_npy(Path(tmp) / "sketch.npy", (len(tgt), SKETCH_K * SKETCH_K))
        pooled = open_npy(Path(tmp) / "pooled.npy", (len(tgt), 1, args.dim))
        score_dataset([model], src, tgt, d, np.arange(len(tgt)), args.batch_tokens, args.chunk_tokens, "cpu", None,
                      layers=[layer], full=True, sketch_out=sketch, pooled_out=pooled)
    print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss(args, n: int) -> float:
    cmd = [sys.executable, __file__, "--rss-child", "--sentences", str(n), "--vocab", str(args.vocab),
           "--dim", str(args.dim), "--layers", str(args.layers), "--batch-tokens", str(args.batch_tokens),
           "--chunk-tokens", str(args.chunk_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--dev-sentences", type=int, default=100)
    ap.add_argument("--precision-sentences", type=int, default=300)
    ap.add_argument("--naive-sentences", type=int, default=100)
    from mtprune.config import ModelConfig, PrepareConfig, ScoreConfig

    model_cfg, score_cfg = ModelConfig(), ScoreConfig()  # defaults: the model and settings `mtprune score` runs
    if model_cfg.encoder_layers != model_cfg.decoder_layers:
        raise SystemExit("bench_score.py builds equal encoder and decoder depths; the default config does not")
    ap.add_argument("--vocab", type=int, default=PrepareConfig().vocab_size)
    ap.add_argument("--dim", type=int, default=model_cfg.embed_dim)
    ap.add_argument("--layers", type=int, default=model_cfg.encoder_layers)
    ap.add_argument("--batch-tokens", type=int, default=score_cfg.batch_tokens)
    ap.add_argument("--chunk-tokens", type=int, help="target tokens per projection chunk (default: what "
                    "score.chunk_tokens' default gives for --vocab on CPU)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkpoint", help="a trained proxy checkpoint (with --data-bin) instead of random weights")
    ap.add_argument("--data-bin")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    if bool(args.checkpoint) != bool(args.data_bin):
        ap.error("--checkpoint and --data-bin go together")
    if args.chunk_tokens is None:
        from mtprune.el2n import chunk_size

        args.chunk_tokens = chunk_size(score_cfg.chunk_tokens, args.vocab, "cpu")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, d, train, dev, what = setup(args, Path(tmp))
        n = min(args.sentences, len(train[1]))
        print(f"model: {what}; {n} sentences; dev set {len(dev[1])} pairs; chunks of {args.chunk_tokens} target tokens; "
              f"{os.cpu_count()} cores; torch {torch.__version__}",
              flush=True)
        s = speed(args, model, d, train, dev)
        p = precision(args, model, d, train)
    tok = s["tokens"]
    print(f"bare forward (logits only):  {tok / s['bare']:>10,.0f} target tokens/s")
    print(f"EL2N-only pass:              {tok / s['el2n']:>10,.0f} target tokens/s  ({s['el2n'] / s['bare']:.2f}x forward)")
    print(f"all-scores pass:             {tok / s['all']:>10,.0f} target tokens/s  ({s['all'] / s['el2n']:.2f}x EL2N-only, "
          f"{s['all'] / s['bare']:.2f}x forward)")
    print(f"  + dev gradient (once per checkpoint, {s['dev_tokens']} dev tokens): {s['dev']:.2f}s; "
          f"proto k-means on {n} pairs: {s['proto']:.2f}s")
    total = (s["all"] + s["dev"] + s["proto"]) / s["el2n"]
    print(f"  all scores with dev pass and k-means: {total:.2f}x EL2N-only")
    rate = s["flops"] / s["all"]
    print(f"all-scores pass FLOP rate: {rate / 1e9:.1f} GFLOP/s counted; plain matmul of the projection's shape "
          f"{s['mm_rate'] / 1e9:.1f} GFLOP/s ({rate / s['mm_rate']:.0%} of it)")
    print(f"naive scorer (1 sentence, one-hot): {s['naive_tok_s']:,.0f} target tokens/s "
          f"(EL2N-only pass is {tok / s['el2n'] / s['naive_tok_s']:.1f}x faster)")
    print("precision, per-pair scores (max abs error, Spearman):")
    for name, f in p.items():
        print(f"  {name:38s} el2n {f['el2n_abs']:.1e} / {f['el2n_spearman']:.5f}   "
              f"nll {f['nll_abs']:.1e} (rel {f['nll_rel']:.1e}) / {f['nll_spearman']:.5f}")
    ratio = ""
    if not args.no_rss and not args.checkpoint:
        small, large = rss(args, args.sentences), rss(args, 10 * args.sentences)
        print(f"peak RSS (all scores): {small:.0f} MiB for {args.sentences} sentences, {large:.0f} MiB for {10 * args.sentences}")
        ratio = f" rss_10x_corpus={large / small:.2f}x (target <=1.2x)"
    bf = p["bf16 body vs fp32"]
    print(f"RESULT all_vs_forward={s['all'] / s['bare']:.2f}x (target <=2x) "
          f"all_vs_el2n={s['all'] / s['el2n']:.2f}x (with dev+proto {total:.2f}x; target <=1.5x) "
          f"flop_rate={rate / s['mm_rate']:.0%} of matmul bf16_el2n_abs={bf['el2n_abs']:.1e} "
          f"bf16_spearman=el2n {bf['el2n_spearman']:.4f}/nll {bf['nll_spearman']:.4f} (targets <=1e-3, >=0.999){ratio}")


if __name__ == "__main__":
    main()
