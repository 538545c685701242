"""Stage 2: one joint SentencePiece model, target-language tags, fairseq-binarized data.

All pairs and directions go into one data-bin (fairseq "languages" src/tgt); each source line
starts with a tag naming the target language (``<2de>``), so one model serves every pair.
``train.ids`` maps fairseq's train index i (line i) to its sentence id; ``train.tasks`` gives the
pair and direction of the same example.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..config import Config
from ..cpus import usable_cpus
from ..fairseq_backend import SRC, TGT, preprocess, write_dictionary
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import atomic_write_bytes, count_lines, open_atomic, temp_path
from ..pipeline import StageResult
from ..sources import langs
from ..textio import text_lines

SECTIONS = ("prepare",)
UPSTREAM = ("download",)
log = logging.getLogger("mtprune")


def tag(lang: str) -> str:
    return f"<2{lang}>"


def tasks(pairs: tuple[str, ...] | list[str], direction: str) -> list[tuple[str, str, str]]:
    """(pair, source language, target language) for every translation direction of the run."""
    out = []
    for pair in pairs:
        a, b = langs(pair)
        other = b if a == "en" else a
        if direction in ("en-xx", "both"):
            out.append((pair, "en", other))
        if direction in ("xx-en", "both"):
            out.append((pair, other, "en"))
    return out


# ---- SentencePiece encoding in worker processes -------------------------------------------------

_sp: Any = None


def _init_worker(model_path: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode_pairs(chunk: list[tuple[str, str]]) -> list[tuple[list[str], list[str]]]:
    a = _sp.encode([x for x, _ in chunk], out_type=str)
    b = _sp.encode([y for _, y in chunk], out_type=str)
    return list(zip(a, b, strict=True))


def _chunked(items: Iterable[Any], size: int = 2000) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class Encoder:
    """Encodes text with the SentencePiece model on ``workers`` processes, streaming, in order."""

    def __init__(self, model_path: Path, workers: int) -> None:
        self.model_path, self.workers = str(model_path), workers

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self.pool = get_context("spawn").Pool(self.workers, _init_worker, (self.model_path,))
        else:
            _init_worker(self.model_path)
            self.pool = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.terminate()

    def encode_pairs(self, pairs: Iterable[tuple[str, str]], total: int,
                     desc: str) -> Iterator[tuple[list[str], list[str]]]:
        from tqdm import tqdm

        mapper = self.pool.imap if self.pool is not None else map
        with tqdm(total=total, desc=desc, unit="pair", leave=False, disable=None) as bar:
            for chunk in mapper(_encode_pairs, _chunked(pairs)):
                yield from chunk
                bar.update(len(chunk))


def train_spm(cfg: Config, layout: RunLayout, all_tasks: list[tuple[str, str, str]]) -> None:
    """Joint SentencePiece model over a seeded sample of every pair's training text (both sides).

    Trained from memory into memory, so the model file holds no paths and two runs of the same
    config write the same bytes.
    """
    import sentencepiece as spm

    p = cfg.prepare
    rng = random.Random(cfg.download.seed)
    sentences: list[str] = []  # a uniform reservoir sample: memory stays at spm_sample sentences
    seen = 0
    for pair in cfg.download.pairs:
        for lang in langs(pair):
            for line in text_lines(layout.split_file(pair, "train", lang)):
                seen += 1
                if len(sentences) < p.spm_sample:
                    sentences.append(line)
                elif (j := rng.randrange(seen)) < p.spm_sample:
                    sentences[j] = line
    # every language's tag, source sides' too (the reversed pairs of proxy.dual are tagged with their
    # source language), whatever proxy.dual says: switching it on must not change the dictionary and
    # with it every forward model's data
    tags = sorted({tag(x) for _, s, t in all_tasks for x in (s, t)})
    log.info("prepare: training SentencePiece (%s, vocab %d) on %d sentences", p.model_type, p.vocab_size,
             len(sentences))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=p.vocab_size, model_type=p.model_type,
        character_coverage=p.character_coverage, user_defined_symbols=tags, hard_vocab_limit=False,
        num_threads=SPM_THREADS, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    atomic_write_bytes(layout.spm_model, model.getvalue())


# SentencePiece's EM sums over one chunk of sentences per thread, so its piece scores (the model's bytes)
# depend on the thread count: fixed, not prepare.workers, so that every machine trains the same model
SPM_THREADS = 16


def _workers(cfg: Config) -> int:
    return cfg.prepare.workers or usable_cpus()



def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    import sentencepiece as spm

    all_tasks = tasks(cfg.download.pairs, cfg.download.direction)
    sd = layout.stage_dir("prepare")
    train_spm(cfg, layout, all_tasks)
    crash_point("prepare:after-spm")
    sp = spm.SentencePieceProcessor(model_file=str(layout.spm_model))
    vocab = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    layout.spm_dir.mkdir(parents=True, exist_ok=True)
    dict_path = sd / "dict.txt"
    write_dictionary(vocab, dict_path)

    stats: dict[str, Any] = {"vocab_size": len(vocab), "tasks": {}}
    limit = cfg.prepare.max_tokens
    n_train = n_target_tokens = 0
    with Encoder(layout.spm_model, _workers(cfg)) as enc, ExitStack() as files:
        out = {name: files.enter_context(open_atomic(path)) for name, path in (
            ("train.src", layout.spm_dir / f"train.{SRC}"), ("train.tgt", layout.spm_dir / f"train.{TGT}"),
            ("valid.src", layout.spm_dir / f"valid.{SRC}"), ("valid.tgt", layout.spm_dir / f"valid.{TGT}"),
            ("ids", layout.prepare_ids), ("tasks", layout.prepare_tasks))}
        rev = layout.spm_reverse_dir
        if dual := cfg.proxy.dual:  # row i reversed: same ids and tasks files, source and target swapped
            rev.mkdir(parents=True, exist_ok=True)
            out.update({f"reverse {name}": files.enter_context(open_atomic(rev / name)) for name in (
                f"train.{SRC}", f"train.{TGT}", f"valid.{SRC}", f"valid.{TGT}")})
        for pair, s, t in all_tasks:
            name = f"{pair}:{s}-{t}"
            kept = dropped = 0
            ids = text_lines(layout.download_ids(pair))
            pairs = zip(text_lines(layout.split_file(pair, "train", s)),
                        text_lines(layout.split_file(pair, "train", t)), strict=True)
            total = count_lines(layout.download_ids(pair))
            for sid, (a, b) in zip(ids, enc.encode_pairs(pairs, total, f"encode {name}"), strict=True):
                if len(a) + 1 > limit or len(b) > limit:
                    dropped += 1
                    continue
                out["train.src"].write(f"{tag(t)} {' '.join(a)}\n")
                out["train.tgt"].write(" ".join(b) + "\n")
                out["ids"].write(sid + "\n")
                out["tasks"].write(f"{pair}\t{s}-{t}\n")
                if dual:
                    out[f"reverse train.{SRC}"].write(f"{tag(s)} {' '.join(b)}\n")
                    out[f"reverse train.{TGT}"].write(" ".join(a) + "\n")
                kept += 1
                n_target_tokens += len(b) + 1
            valid = zip(text_lines(layout.split_file(pair, "valid", s)),
                        text_lines(layout.split_file(pair, "valid", t)), strict=True)
            for a, b in enc.encode_pairs(valid, 0, f"encode {name} valid"):
                if len(a) + 1 <= limit and len(b) <= limit:
                    out["valid.src"].write(f"{tag(t)} {' '.join(a)}\n")
                    out["valid.tgt"].write(" ".join(b) + "\n")
                    if dual:
                        out[f"reverse valid.{SRC}"].write(f"{tag(s)} {' '.join(b)}\n")
                        out[f"reverse valid.{TGT}"].write(" ".join(a) + "\n")
            n_train += kept
            stats["tasks"][name] = {"train": kept, "dropped_too_many_tokens": dropped}
            log.log(logging.INFO if dropped else logging.DEBUG, "prepare: %s: %d training pairs encoded (%d over %d "
                    "pieces dropped)", name, kept, dropped, limit)
    log.info("prepare: %d training pairs encoded in %d task(s) (%d over %d pieces dropped)", n_train,
             len(stats["tasks"]), sum(t["dropped_too_many_tokens"] for t in stats["tasks"].values()), limit)
    stats["train_pairs"] = n_train
    stats["train_target_tokens"] = n_target_tokens

    tmp_bin = temp_path(layout.data_bin)
    for d in (tmp_bin, layout.data_bin):
        shutil.rmtree(d, ignore_errors=True)
    crash_point("prepare:before-binarize")
    preprocess(layout.spm_dir / "train", layout.spm_dir / "valid", tmp_bin, dict_path, _workers(cfg),
               sd / "preprocess.log")
    (tmp_bin / "preprocess.log").unlink(missing_ok=True)  # holds paths; our own copy is 02_prepare/preprocess.log
    os.replace(tmp_bin, layout.data_bin)
    outputs = [layout.spm_model, dict_path, layout.spm_dir, layout.data_bin, layout.prepare_ids, layout.prepare_tasks]
    shutil.rmtree(layout.data_bin_reverse, ignore_errors=True)
    if dual:
        tmp_bin = temp_path(layout.data_bin_reverse)
        shutil.rmtree(tmp_bin, ignore_errors=True)
        preprocess(rev / "train", rev / "valid", tmp_bin, dict_path, _workers(cfg), sd / "preprocess-reverse.log")
        (tmp_bin / "preprocess.log").unlink(missing_ok=True)
        os.replace(tmp_bin, layout.data_bin_reverse)
        outputs += [rev, layout.data_bin_reverse]
    else:
        shutil.rmtree(rev, ignore_errors=True)
    return StageResult(outputs, stats)
