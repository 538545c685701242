"""Stage 7: beam search on each pair's test split (and extra test sets); BLEU and chrF with sacrebleu."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import length_batches
from ..config import Config
from ..errors import InputError
from ..layout import RunLayout
from ..manifest import atomic_write_text, stat_key
from ..pipeline import Manifest, StageResult
from .prepare import read_lines, tag, tasks
from .train import models

SECTIONS = ("evaluate",)
UPSTREAM = ("prepare", "train")
log = logging.getLogger("mtprune")


def external_inputs(cfg: Config) -> dict[str, Any]:
    out = {}
    for t in cfg.evaluate.extra_test_sets:
        for f in (t.src, t.ref):
            out[f] = stat_key(Path(f))
    return out


def test_sets(cfg: Config, layout: RunLayout) -> list[dict[str, Any]]:
    """Every evaluation set: the test split of each pair and direction, then the extra ones."""
    out = []
    single = cfg.download.direction != "both"
    for pair, s, t in tasks(cfg.download.pairs, cfg.download.direction):
        out.append({"name": pair if single else f"{pair}:{s}-{t}", "pair": pair, "src_lang": s, "tgt_lang": t,
                    "src": read_lines(layout.split_file(pair, "test", s)),
                    "ref": read_lines(layout.split_file(pair, "test", t))})
    for x in cfg.evaluate.extra_test_sets:
        for f in (x.src, x.ref):
            if not Path(f).is_file():
                raise InputError(f"evaluate.extra_test_sets ({x.name}): {f}: file not found")
        src, ref = read_lines(Path(x.src)), read_lines(Path(x.ref))
        if len(src) != len(ref):
            raise InputError(f"{x.src}: has {len(src)} lines but {x.ref} has {len(ref)}")
        out.append({"name": f"{x.name}:{x.src_lang}-{x.tgt_lang}", "pair": f"{x.name}", "src_lang": x.src_lang,
                    "tgt_lang": x.tgt_lang, "src": src, "ref": ref})
    return out


def translate(model: Any, task: Any, sp: Any, sources: list[str], tgt_lang: str, cfg: Config,
              device: str, desc: str) -> list[str]:
    import torch
    from fairseq.sequence_generator import SequenceGenerator
    from tqdm import tqdm

    d = task.source_dictionary
    encoded = [f"{tag(tgt_lang)} " + " ".join(p) for p in sp.encode(sources, out_type=str)]
    tokens = [d.encode_line(line, add_if_not_exist=False, append_eos=True).long() for line in encoded]
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=cfg.evaluate.beam,
                            len_penalty=cfg.evaluate.lenpen, max_len_a=1.5, max_len_b=10)
    sizes = np.array([len(t) for t in tokens], dtype=np.int64)
    batches = length_batches(np.arange(len(tokens)), [sizes], cfg.evaluate.max_tokens)
    out: list[str] = [""] * len(tokens)
    pad = d.pad()
    with torch.inference_mode(), tqdm(total=len(tokens), desc=desc, unit="sent", leave=False, disable=None) as bar:
        for batch in batches:
            ids = batch.tolist()
            longest = max(len(tokens[i]) for i in ids)
            src = torch.full((len(ids), longest), pad, dtype=torch.long)
            for k, i in enumerate(ids):
                src[k, longest - len(tokens[i]):] = tokens[i]
            lengths = torch.tensor([len(tokens[i]) for i in ids])
            sample = {"net_input": {"src_tokens": src.to(device), "src_lengths": lengths.to(device)}}
            hypos = gen.generate([model], sample)
            for k, i in enumerate(ids):
                pieces = task.target_dictionary.string(hypos[k][0]["tokens"].int().cpu())
                out[i] = sp.decode(pieces.split())
            bar.update(len(ids))
    return out


def score_hyps(hyps: list[str], refs: list[str], tgt_lang: str) -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    bleu = BLEU(trg_lang=tgt_lang)
    chrf = CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "sentences": len(hyps)}


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    import sentencepiece as spm
    import torch

    from ..fairseq_backend import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sp = spm.SentencePieceProcessor(model_file=str(layout.spm_model))
    sets = test_sets(cfg, layout)
    prune_stats = (Manifest.read(layout.manifest("prune")) or Manifest({})).stats.get("runs", {})
    prepare_stats = (Manifest.read(layout.manifest("prepare")) or Manifest({})).stats
    outputs: list[Path] = []
    for name, strategy, sparsity, _bin in models(cfg, layout):
        ckpt = layout.train_dir(name) / f"checkpoint_{cfg.evaluate.checkpoint}.pt"
        model, task = load_model(ckpt, layout.data_bin, device)
        folder = layout.eval_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {}
        for ts in sets:
            hyps = translate(model, task, sp, ts["src"], ts["tgt_lang"], cfg, device, f"{name} {ts['name']}")
            hyp_file = folder / f"{ts['name'].replace(':', '.')}.hyp"
            atomic_write_text(hyp_file, "".join(h + "\n" for h in hyps))
            outputs.append(hyp_file)
            results[ts["name"]] = {"pair": ts["pair"], "direction": f"{ts['src_lang']}-{ts['tgt_lang']}",
                                   **score_hyps(hyps, ts["ref"], ts["tgt_lang"])}
            log.info("evaluate: %s on %s: BLEU %.2f chrF %.2f", name, ts["name"], results[ts["name"]]["bleu"],
                     results[ts["name"]]["chrf"])
        n_train = (prepare_stats.get("train_pairs") if strategy == "full" else prune_stats.get(name, {}).get("kept"))
        if strategy == "full":
            per_pair: dict[str, int] = {}
            for task_name, v in prepare_stats.get("tasks", {}).items():
                pair = task_name.split(":")[0]
                per_pair[pair] = per_pair.get(pair, 0) + v["train"]
        else:
            per_pair = {p: v["kept"] for p, v in prune_stats.get(name, {}).get("per_pair", {}).items()}
        metrics = {"name": name, "strategy": strategy, "sparsity": sparsity, "checkpoint": str(ckpt.name),
                   "n_train": n_train, "n_train_per_pair": per_pair,
                   "results": results}
        atomic_write_text(layout.metrics(name), json.dumps(metrics, indent=2) + "\n")
        outputs.append(layout.metrics(name))
        del model
    return StageResult(outputs, {"models": len(models(cfg, layout)), "test_sets": [s["name"] for s in sets]})
