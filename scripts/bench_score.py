#!/usr/bin/env python
"""Benchmark of EL2N scoring, measured side by side in one run on the same model and batches.

1. throughput of mtprune's scorer over the bare teacher-forced forward pass (logits only);
2. speed-up over a naive scorer (one sentence at a time, explicit softmax − one-hot);
3. peak RSS of the real scoring loop on a corpus 10× larger, over the smaller one (subprocesses).

The model is a fairseq transformer with random weights (cost does not depend on the weights),
the corpus random token ids in fairseq's mmap format, so the benchmark needs no trained run.

    .venv/bin/python scripts/bench_score.py [--sentences 4000] [--vocab 8000] [--dim 64] [--layers 2]
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
        prefix = folder / f"train.{side}"
        builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(d))
        for _ in range(n):
            length = int(rng.integers(4, 40))
            toks = rng.integers(d.nspecial, len(d), size=length)
            builder.add_item(torch.tensor(np.append(toks, d.eos()), dtype=torch.int32))
        builder.finalize(f"{prefix}.idx")
        out.append(data_utils.load_indexed_dataset(str(prefix), d, dataset_impl="mmap"))
    return out


def timed(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def speed(args) -> dict[str, float]:
    import torch

    from mtprune.batching import length_batches
    from mtprune.el2n import reference_el2n_nll
    from mtprune.stages.score import collate, score_batch

    torch.set_num_threads(os.cpu_count() or 1)
    model, d = build(args.vocab, args.dim, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        src, tgt = make_corpus(Path(tmp), d, args.sentences)
        idx = np.arange(len(tgt))
        batches = [collate(src, tgt, b, d.pad(), d.eos())
                   for b in length_batches(idx, [np.asarray(tgt.sizes), np.asarray(src.sizes)], args.batch_tokens)]
        n_tok = int(np.asarray(tgt.sizes).sum())

        def bare() -> None:
            with torch.inference_mode():
                for b in batches:
                    model(b["src_tokens"], b["src_lengths"], b["prev"])

        def ours() -> None:
            with torch.inference_mode():
                for b in batches:
                    score_batch(model, b, d.pad(), args.chunk_tokens, "cpu", None)

        naive_n = min(args.naive_sentences, len(idx))

        def naive() -> None:
            with torch.inference_mode():
                for i in range(naive_n):
                    b = collate(src, tgt, idx[i:i + 1], d.pad(), d.eos())
                    logits, _ = model(b["src_tokens"], b["src_lengths"], b["prev"])
                    reference_el2n_nll(logits[0], b["target"][0])

        bare(), ours()  # warm-up
        t_bare = t_ours = float("inf")
        for _ in range(args.rounds):  # alternate, keep each one's best: machine noise only ever adds time
            t_bare = min(t_bare, timed(bare, reps=1))
            t_ours = min(t_ours, timed(ours, reps=1))
        naive_tok = int(np.asarray(tgt.sizes)[:naive_n].sum())
        t_naive = timed(naive, reps=1)
    return {"tokens": n_tok, "bare_tok_s": n_tok / t_bare, "ours_tok_s": n_tok / t_ours,
            "naive_tok_s": naive_tok / t_naive}


def rss_child(args) -> None:
    """Run the real scoring loop (score_dataset) on N sentences; print the peak RSS in MiB."""
    import torch

    from mtprune.stages.score import score_dataset

    torch.set_num_threads(os.cpu_count() or 1)
    model, d = build(args.vocab, args.dim, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        src, tgt = make_corpus(Path(tmp), d, args.sentences)
        score_dataset([model], src, tgt, d, np.arange(len(tgt)), args.batch_tokens, args.chunk_tokens, "cpu", None)
    print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss(args, n: int) -> float:
    cmd = [sys.executable, __file__, "--rss-child", "--sentences", str(n), "--vocab", str(args.vocab),
           "--dim", str(args.dim), "--layers", str(args.layers), "--batch-tokens", str(args.batch_tokens),
           "--chunk-tokens", str(args.chunk_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--naive-sentences", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=6000)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    print(f"model: transformer {args.layers}+{args.layers} layers, dim {args.dim}, vocab {args.vocab}; "
          f"{args.sentences} random sentences; {os.cpu_count()} cores", flush=True)
    s = speed(args)
    overhead = s["bare_tok_s"] / s["ours_tok_s"]
    speedup = s["ours_tok_s"] / s["naive_tok_s"]
    print(f"bare forward (logits only): {s['bare_tok_s']:,.0f} target tokens/s")
    print(f"mtprune scorer:             {s['ours_tok_s']:,.0f} target tokens/s  (overhead {overhead:.2f}x)")
    print(f"naive scorer (1 sentence, one-hot): {s['naive_tok_s']:,.0f} target tokens/s  (speed-up {speedup:.1f}x)")
    small, large = rss(args, args.sentences), rss(args, 10 * args.sentences)
    print(f"peak RSS: {small:.0f} MiB for {args.sentences} sentences, {large:.0f} MiB for {10 * args.sentences}")
    print(f"RESULT overhead_vs_forward={overhead:.2f}x (target <=1.10x) speedup_vs_naive={speedup:.1f}x "
          f"(target >=5x) rss_10x_corpus={large / small:.2f}x (target <=1.2x)")


if __name__ == "__main__":
    main()
