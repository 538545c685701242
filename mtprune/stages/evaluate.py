"""Stage 7: beam search on each pair's test split (and extra test sets); BLEU and chrF with sacrebleu."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import gpus
from ..batching import length_batches
from ..config import Config
from ..cpus import usable_cpus
from ..errors import InputError, UsageError
from ..launch import note_kept_units
from ..layout import RunLayout
from ..manifest import atomic_write_text, file_sha256
from ..pipeline import Manifest, StageResult
from ..textio import read_lines
from .prepare import tag, tasks
from .train import seed_models

SECTIONS = ("evaluate",)
UPSTREAM = ("download", "prepare", "train")  # download: the test split is read from it
KEEPS_UNITS = True  # hypotheses decoded from an unchanged checkpoint with the same settings are reused
log = logging.getLogger("mtprune")


def external_inputs(cfg: Config) -> list[str]:
    """Files read from outside the run directory (fingerprinted in the manifest by ``pipeline``)."""
    return [f for t in cfg.evaluate.extra_test_sets for f in (t.src, t.ref)]


def target_languages(cfg: Config) -> list[str]:
    """Every language a model is scored in: each direction's target, then the extra test sets'."""
    langs = [t for _, _, t in tasks(cfg.download.pairs, cfg.download.direction)]
    return list(dict.fromkeys(langs + [x.tgt_lang for x in cfg.evaluate.extra_test_sets]))


def check_bleu_tokenizers(langs: list[str]) -> None:
    """Refuse, before anything trains, a target language whose BLEU tokenizer sacrebleu cannot load
    here (ja and ko need MeCab, installed with ``sacrebleu[ja]`` / ``sacrebleu[ko]``)."""
    from sacrebleu.metrics import BLEU

    for lang in langs:
        try:
            BLEU(trg_lang=lang)
        except (ImportError, RuntimeError) as e:
            raise UsageError(f"BLEU for target language {lang!r} needs a tokenizer sacrebleu cannot load here "
                             f"({type(e).__name__}); install it with: pip install 'sacrebleu[{lang}]'") from None


def preflight(cfg: Config, layout: RunLayout) -> None:
    check(cfg, layout)


def check(cfg: Config, layout: RunLayout) -> None:
    """Extra test sets' target languages, BLEU tokenizers and extra test-set files, from the config alone: also
    before a sweep's first stage."""
    trained = list(dict.fromkeys(t for _, _, t in tasks(cfg.download.pairs, cfg.download.direction)))
    for i, x in enumerate(cfg.evaluate.extra_test_sets):
        # a model only learns to translate into the targets of its training directions (their <2xx> tag starts
        # every source it saw): any other target decodes into something else, and its BLEU would be reported
        if x.tgt_lang not in trained:
            raise UsageError(f"evaluate.extra_test_sets[{i}] ({x.name}, {x.src_lang}-{x.tgt_lang}): the models "
                             f"translate into {', '.join(trained)} only (download.pairs, download.direction "
                             f"{cfg.download.direction}), not {x.tgt_lang}")
    check_bleu_tokenizers(target_languages(cfg))
    for x in cfg.evaluate.extra_test_sets:
        for f in (x.src, x.ref):
            _check_file(x.name, f)


def _check_file(name: str, f: str) -> None:
    p = Path(f)
    if not p.is_file():
        what = "a directory, not a file" if p.is_dir() else "not a file" if p.exists() else "file not found"
        raise InputError(f"evaluate.extra_test_sets ({name}): {f}: {what}")


def opus_test_sets(cfg: Config, layout: RunLayout) -> list[dict[str, Any]]:
    """The test split of each pair and direction (``name``, ``pair``, ``src_lang``, ``tgt_lang``, ``src``, ``ref``)."""
    out = []
    single = cfg.download.direction != "both"
    for pair, s, t in tasks(cfg.download.pairs, cfg.download.direction):
        out.append({"name": pair if single else f"{pair}:{s}-{t}", "pair": pair, "src_lang": s, "tgt_lang": t,
                    "src": read_lines(layout.split_file(pair, "test", s)),
                    "ref": read_lines(layout.split_file(pair, "test", t))})
    return out


def test_sets(cfg: Config, layout: RunLayout) -> list[dict[str, Any]]:
    """Every evaluation set: the test split of each pair and direction, then the extra ones."""
    out = opus_test_sets(cfg, layout)
    for x in cfg.evaluate.extra_test_sets:
        for f in (x.src, x.ref):
            _check_file(x.name, f)
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


DECODED = "decoded.json"  # per model folder: test set -> what its hypotheses were decoded from


def checkpoint_sha256(ckpt: Path) -> str:
    """sha256 of a final checkpoint: the one train recorded in done.json while size and mtime still match."""
    try:
        rec = json.loads((ckpt.parent / "done.json").read_text())["outputs"][ckpt.name]
        st = ckpt.stat()
        if rec["bytes"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return file_sha256(ckpt)


def decode_key(cfg: Config, ckpt_sha: str, spm_sha: str, ts: dict[str, Any]) -> dict[str, Any]:
    """Everything a test set's hypotheses depend on: the model, the SentencePiece model, the source
    sentences, the target language and the beam search settings (evaluate.max_tokens only batches)."""
    src = hashlib.sha256("\n".join(ts["src"]).encode()).hexdigest()
    return {"checkpoint_sha256": ckpt_sha, "spm_sha256": spm_sha, "src_sha256": src, "tgt_lang": ts["tgt_lang"],
            "beam": cfg.evaluate.beam, "lenpen": cfg.evaluate.lenpen}


def _reusable(folder: Path, name: str, key: dict[str, Any], hyp_file: Path) -> bool:
    try:
        rec = json.loads((folder / DECODED).read_text())[name]
        return bool(rec["key"] == key and hyp_file.is_file() and file_sha256(hyp_file) == rec["hyp_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _n_train(strategy: str, name: str, prepare_stats: dict[str, Any],
             prune_stats: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    if strategy == "full":
        per_pair: dict[str, int] = {}
        for task_name, v in prepare_stats.get("tasks", {}).items():
            pair = task_name.split(":")[0]
            per_pair[pair] = per_pair.get(pair, 0) + v["train"]
        return prepare_stats.get("train_pairs"), per_pair
    run = prune_stats.get(name, {})
    return run.get("kept"), {p: v["kept"] for p, v in run.get("per_pair", {}).items()}


def hyp_path(layout: RunLayout, run: str, test_set: str) -> Path:
    return layout.eval_dir(run) / f"{test_set.replace(':', '.')}.hyp"


def devices() -> list[str]:
    """The devices models are decoded on: every visible GPU (``cuda:0`` .. ``cuda:N-1``), else the CPU."""
    n = len(gpus.visible())
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def _evaluate_model(cfg: Config, layout: RunLayout, m: Any, sets: list[dict[str, Any]], sp: Any, spm_sha: str,
                    prepare_stats: dict[str, Any], prune_stats: dict[str, Any],
                    device: str) -> tuple[list[Path], list[str], list[str]]:
    """Decode (or reuse) and score every test set with one model on ``device``; write its metrics.json.
    Returns (outputs, test sets decoded, test sets reused)."""
    from ..fairseq_backend import load_model

    ckpt = layout.train_dir(m.run) / f"checkpoint_{cfg.evaluate.checkpoint}.pt"
    if not ckpt.is_file():
        raise UsageError(f"{ckpt}: checkpoint not found")
    ckpt_sha = checkpoint_sha256(ckpt)
    folder = layout.eval_dir(m.run)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        record = json.loads((folder / DECODED).read_text())
        record = record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        record = {}
    current = {hyp_path(layout, m.run, ts["name"]) for ts in sets}
    for f in folder.glob("*.hyp"):  # test sets no longer evaluated
        if f not in current:
            f.unlink()
    model = task = None
    results: dict[str, Any] = {}
    outputs: list[Path] = []
    decoded: list[str] = []
    reused: list[str] = []
    for ts in sets:
        hyp_file = hyp_path(layout, m.run, ts["name"])
        key = decode_key(cfg, ckpt_sha, spm_sha, ts)
        if _reusable(folder, ts["name"], key, hyp_file):
            hyps = read_lines(hyp_file)
            reused.append(ts["name"])
        else:
            if model is None:
                model, task = load_model(ckpt, layout.data_bin, device)
            hyps = translate(model, task, sp, ts["src"], ts["tgt_lang"], cfg, device, f"{m.run} {ts['name']}")
            atomic_write_text(hyp_file, "".join(h + "\n" for h in hyps))
            record[ts["name"]] = {"key": key, "hyp_sha256": file_sha256(hyp_file)}
            atomic_write_text(folder / DECODED, json.dumps(record, indent=2, sort_keys=True) + "\n")
            decoded.append(ts["name"])
        outputs.append(hyp_file)
        results[ts["name"]] = {"pair": ts["pair"], "direction": f"{ts['src_lang']}-{ts['tgt_lang']}",
                               **score_hyps(hyps, ts["ref"], ts["tgt_lang"])}
    log.info("evaluate: %s: BLEU %s (chrF %s)", m.run,
             ", ".join(f"{k} {v['bleu']:.2f}" for k, v in results.items()),
             ", ".join(f"{v['chrf']:.1f}" for v in results.values()))
    if reused:
        log.info("evaluate: %s: checkpoint unchanged, reused the hypotheses of %d test set(s) (%s)", m.run,
                 len(reused), ", ".join(reused))
    corpus, corpus_strategy = m.pruned_as
    n_train, per_pair = _n_train(corpus_strategy, corpus, prepare_stats, prune_stats)
    metrics = {"name": m.name, "run": m.run, "strategy": m.strategy, "order": m.order, "sparsity": m.sparsity,
               "seed": m.seed,
               "checkpoint": str(ckpt.name), "checkpoint_sha256": ckpt_sha,
               "n_train": n_train, "n_train_per_pair": per_pair, "results": results}
    atomic_write_text(layout.metrics(m.run), json.dumps(metrics, indent=2) + "\n")
    outputs += [layout.metrics(m.run), folder / DECODED]
    return outputs, decoded, reused


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    """Decode every test set with every model, except those whose hypotheses were already decoded
    from the same checkpoint (sha256) with the same settings; score all of them with sacrebleu.

    With several GPUs the models are spread over them: one worker thread per GPU takes the next model
    and decodes it on its own device (``cuda:i``); each model's files are written as with one GPU."""
    import sentencepiece as spm
    import torch

    torch.set_num_threads(usable_cpus())
    sp = spm.SentencePieceProcessor(model_file=str(layout.spm_model))
    spm_sha = file_sha256(layout.spm_model)
    sets = test_sets(cfg, layout)
    prune_stats = (Manifest.read(layout.manifest("prune")) or Manifest({})).stats.get("runs", {})
    prepare_stats = (Manifest.read(layout.manifest("prepare")) or Manifest({})).stats
    wanted = seed_models(cfg, layout)
    # hypotheses of models no longer in the sweep are kept: listed again, their checkpoint reuses them
    note_kept_units("evaluate", layout.stage_dir("evaluate"), {layout.eval_dir(m.run).name for m in wanted})
    free: queue.Queue[str] = queue.Queue()
    on = devices()
    for dev in on:
        free.put(dev)
    ran_on: dict[str, str] = {}

    def one(m: Any) -> tuple[list[Path], list[str], list[str]]:
        device = free.get()
        try:
            ran_on[m.run] = device
            with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
                return _evaluate_model(cfg, layout, m, sets, sp, spm_sha, prepare_stats, prune_stats, device)
        finally:
            free.put(device)

    if len(on) > 1:
        log.info("evaluate: %d model(s) spread over %s", len(wanted), ", ".join(on))
    pool = ThreadPoolExecutor(max_workers=len(on))
    try:
        done = list(pool.map(one, wanted))  # in the models' order, however the devices finish
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, start no further model
    outputs: list[Path] = []
    decoded: dict[str, list[str]] = {}
    reused: dict[str, list[str]] = {}
    for m, (outs, dec, reu) in zip(wanted, done, strict=True):
        outputs += outs
        if dec:
            decoded[m.run] = dec
        if reu:
            reused[m.run] = reu
    n_dec, n_reused = sum(map(len, decoded.values())), sum(map(len, reused.values()))
    log.info("evaluate: decoded %d test set(s), reused %d decoded before", n_dec, n_reused)
    stats = {"models": len(wanted), "test_sets": [s["name"] for s in sets],
             "decoded": decoded, "reused": reused, "n_decoded": n_dec, "n_reused": n_reused}
    if len(on) > 1:
        stats["devices"] = {m.run: ran_on[m.run] for m in wanted}
    return StageResult(outputs, stats)
