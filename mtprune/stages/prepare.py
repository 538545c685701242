"""Stage 2: one joint SentencePiece model, target-language tags, fairseq-binarized data.

All pairs and directions go into one data-bin (fairseq "languages" src/tgt); each source line
starts with a tag naming the target language (``<2de>``), so one model serves every pair.
``train.ids`` maps fairseq's train index i (line i) to its sentence id; ``train.tasks`` gives the
pair and direction of the same example.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..cpus import usable_cpus
from ..databin import Encoder, Vocabulary, concat, tag, tasks, write_index
from ..errors import UsageError
from ..fairseq_backend import SRC, TGT, write_dictionary
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import atomic_write_bytes, atomic_write_text, count_lines, json_hash, temp_path
from ..pipeline import StageResult, require_fresh_upstream, stage_config, upstream_digests
from ..scoring.shards import parse_shard, shard_counts, stored_key
from ..sources import langs
from ..textio import text_lines

SECTIONS = ("prepare",)
UPSTREAM = ("download",)
KEEPS_UNITS = True  # parts binarized by `prepare --shard` jobs (02_prepare/shards) carry their own key
log = logging.getLogger("mtprune")



def train_spm(cfg: Config, layout: RunLayout, all_tasks: list[tuple[str, str, str]], path: Path) -> None:
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
    atomic_write_bytes(path, model.getvalue())


# SentencePiece's EM sums over one chunk of sentences per thread, so its piece scores (the model's bytes)
# depend on the thread count: fixed, not prepare.workers, so that every machine trains the same model
SPM_THREADS = 16


def _workers(cfg: Config) -> int:
    return cfg.prepare.workers or usable_cpus()


def part_key(cfg: Config, layout: RunLayout) -> str:
    """What a binarized part (and the SentencePiece model it was encoded with) is finished with: every setting the
    stage reads that changes its bytes, and the download it read."""
    d = cfg.download
    return json_hash({"config": stage_config(cfg, "prepare"), "dual": cfg.proxy.dual,
                      "download": [list(d.pairs), d.direction, d.seed], "inputs": upstream_digests("prepare", layout)})


def shared_spm(cfg: Config, layout: RunLayout, key: str) -> Path:
    """The SentencePiece model every part is encoded with, trained once per ``key``: the first process to get
    here trains it, the others (parts run as jobs side by side) wait for it and reuse it."""
    from filelock import FileLock, Timeout

    folder = layout.prepare_shards
    folder.mkdir(parents=True, exist_ok=True)
    model, stamp = folder / "spm.model", folder / "spm.json"
    lock = FileLock(str(folder / ".spm.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another part is training it
        log.info("prepare: waiting for another job to train the SentencePiece model")
        lock.acquire()
    try:
        if model.exists() and stored_key(stamp) == key:
            log.info("prepare: reusing the SentencePiece model of %s", model)
            return model
        stamp.unlink(missing_ok=True)
        train_spm(cfg, layout, tasks(cfg.download.pairs, cfg.download.direction), model)
        crash_point("prepare:after-spm")
        atomic_write_text(stamp, json.dumps({"key": key}))
        return model
    finally:
        lock.release()


STREAMS = ("src", "tgt")
REVERSE_STREAMS = ("rsrc", "rtgt")


def part_files(prefix: Path, dual: bool) -> dict[str, Path]:
    """A part's files by name; ``json`` is written last and marks the part finished."""
    names = [f"{k}.bin" for k in STREAMS + (REVERSE_STREAMS if dual else ())] + ["sizes.npy", "ids", "tasks", "json"]
    return {n: prefix.with_name(f"{prefix.name}.{n}") for n in names}


def binarize_part(cfg: Config, layout: RunLayout, model: Path, vocab: Vocabulary, key: str, i: int, count: int,
                  workers: int) -> dict[str, Any]:
    """Encode and binarize slice I of N of the training rows (every task's download lines, task after task) into
    ``02_prepare/shards/part-I-of-N.*``; returns its record (what its ``.json`` holds)."""
    all_tasks = tasks(cfg.download.pairs, cfg.download.direction)
    sizes_per_task = [count_lines(layout.download_ids(pair)) for pair, _, _ in all_tasks]
    n = sum(sizes_per_task)
    lo, hi = n * i // count, n * (i + 1) // count
    files = part_files(layout.prepare_part(i, count), cfg.proxy.dual)
    tmp = {k: temp_path(p) for k, p in files.items()}
    record: dict[str, Any] = {"key": key, "rows": [lo, hi], "tasks": {}}
    sizes: dict[str, list[np.ndarray]] = {"src": [], "tgt": []}
    try:
        with ExitStack() as stack:
            bins = {k[:-4]: stack.enter_context(open(tmp[k], "wb")) for k in tmp if k.endswith(".bin")}
            ids_out = stack.enter_context(open(tmp["ids"], "w", encoding="utf-8", newline="\n"))
            tasks_out = stack.enter_context(open(tmp["tasks"], "w", encoding="utf-8", newline="\n"))
            enc = stack.enter_context(Encoder(model, workers))
            offset = 0
            for (pair, s, t), size in zip(all_tasks, sizes_per_task, strict=True):
                start, stop = max(lo - offset, 0), min(hi - offset, size)
                offset += size
                if start >= stop:
                    continue
                name = f"{pair}:{s}-{t}"
                pairs = itertools.islice(zip(text_lines(layout.split_file(pair, "train", s)),
                                             text_lines(layout.split_file(pair, "train", t)), strict=True), start, stop)
                sids = itertools.islice(text_lines(layout.download_ids(pair)), start, stop)  # read here, in step
                kept = dropped = 0
                frame = vocab.frame(cfg, s, t)
                for chunk in enc.encode_rows(pairs, frame, stop - start, f"encode {name}"):
                    chunk_ids = list(itertools.islice(sids, len(chunk.keep)))
                    for k, f in bins.items():
                        f.write(chunk.ids[k].tobytes())
                    sizes["src"].append(chunk.sizes["src"])
                    sizes["tgt"].append(chunk.sizes["tgt"])
                    line = f"{pair}\t{s}-{t}\n"
                    for sid, ok in zip(chunk_ids, chunk.keep.tolist(), strict=True):
                        if ok:
                            ids_out.write(sid + "\n")
                            tasks_out.write(line)
                    kept += int(chunk.keep.sum())
                    dropped += len(chunk.keep) - int(chunk.keep.sum())
                    crash_point("prepare:part-encoding")  # the pool's workers still encode the next chunks
                record["tasks"][name] = {"train": kept, "dropped_too_many_tokens": dropped}
        with open(tmp["sizes.npy"], "wb") as f:
            np.save(f, np.stack([np.concatenate(sizes[k]) if sizes[k] else np.zeros(0, np.int32) for k in STREAMS]))
        crash_point("prepare:part-before-json")
        files["json"].unlink(missing_ok=True)  # no finished mark over a mix of old and new files
        for k, p in files.items():
            if k != "json":
                os.replace(tmp[k], p)
        atomic_write_text(files["json"], json.dumps(record))
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return record


def finished_parts(layout: RunLayout, key: str) -> tuple[int, dict[int, dict[str, Any]]] | None:
    """The part count N with the most parts finished under ``key``, and those parts' records; None if none is."""
    best: tuple[int, dict[int, dict[str, Any]]] | None = None
    for count in shard_counts(layout.prepare_shards, "part", ".json"):
        done = {}
        for i in range(count):
            path = part_files(layout.prepare_part(i, count), False)["json"]
            try:
                rec = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if rec.get("key") == key:
                done[i] = rec
        if done and (best is None or len(done) / count > len(best[1]) / best[0]):
            best = (count, done)
    return best


def progress(cfg: Config, layout: RunLayout) -> str:
    """For `status` while prepare is not finished: how many parts `prepare --shard` jobs have binarized with the
    current settings (the next `mtprune prepare` assembles them and does only the missing ones)."""
    found = finished_parts(layout, part_key(cfg, layout))
    if found is None:
        return ""
    count, done = found
    return f"{len(done)} of {count} part(s) finished (`prepare --shard`)"


def run_part(cfg: Config, layout: RunLayout, shard: str) -> Path:
    """``prepare --shard I/N``: part I of N of the training data binarized into 02_prepare/shards/ (no manifest:
    the plain `mtprune prepare` assembles data-bin from the parts)."""
    i, count = parse_shard(shard)
    require_fresh_upstream("prepare", cfg, layout, label="prepare --shard")
    key = part_key(cfg, layout)
    prefix = layout.prepare_part(i, count)
    if stored_key(part_files(prefix, False)["json"]) == key:  # a job run again: the part is finished
        log.info("prepare: part %d/%d: already binarized, skipping", i, count)
        return prefix
    for p in layout.prepare_shards.glob(f".{prefix.name}.*.tmp"):  # a killed attempt's (this unit's lock is ours)
        p.unlink(missing_ok=True)
    model = shared_spm(cfg, layout, key)
    started = time.time()
    rec = binarize_part(cfg, layout, model, Vocabulary.load(model), key, i, count, _workers(cfg))
    log.info("prepare: part %d/%d: %d rows in %.1fs -> %s", i, count, rec["rows"][1] - rec["rows"][0],
             time.time() - started, prefix.parent)
    return prefix


def _encode_valid(cfg: Config, layout: RunLayout, enc: Encoder, vocab: Vocabulary, out: Path) -> None:
    """The valid split of every task, binarized like the training rows, into ``out`` (a data-bin folder)."""
    streams = STREAMS + (REVERSE_STREAMS if cfg.proxy.dual else ())
    ids: dict[str, list[np.ndarray]] = {k: [] for k in streams}
    sizes: dict[str, list[np.ndarray]] = {k: [] for k in streams}
    for pair, s, t in tasks(cfg.download.pairs, cfg.download.direction):
        valid = zip(text_lines(layout.split_file(pair, "valid", s)),
                    text_lines(layout.split_file(pair, "valid", t)), strict=True)
        for rows in enc.encode_rows(valid, vocab.frame(cfg, s, t), 0, f"encode {pair}:{s}-{t} valid"):
            for k in streams:
                ids[k].append(rows.ids[k])
                sizes[k].append(rows.sizes[k])
    for k in streams:
        folder, side = _destination(out, k)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = folder / f"valid.{SRC}-{TGT}.{side}"
        np.concatenate(ids[k] or [np.zeros(0, vocab.dtype)]).astype(vocab.dtype).tofile(f"{prefix}.bin")
        write_index(Path(f"{prefix}.idx"), np.concatenate(sizes[k] or [np.zeros(0, np.int32)]), vocab.dtype)


def _destination(out: Path, stream: str) -> tuple[Path, str]:
    """(data-bin folder, fairseq side) a stream goes to: rsrc/rtgt are data-bin-reverse's src/tgt."""
    if stream in REVERSE_STREAMS:
        return out.with_name(out.name + "-reverse"), stream[1:]
    return out, stream


def _assemble(cfg: Config, count: int, records: dict[int, dict[str, Any]], layout: RunLayout, dict_path: Path,
              out: Path, dtype: np.dtype) -> dict[str, Any]:
    """data-bin's training split (and data-bin-reverse's) from parts 0..N-1, into ``out``; train.ids and
    train.tasks into their temp names (``temp_path``); returns the summed stats."""
    parts = [part_files(layout.prepare_part(i, count), cfg.proxy.dual) for i in range(count)]
    sizes = [np.load(p["sizes.npy"]) for p in parts]
    src = np.concatenate([s[0] for s in sizes])
    tgt = np.concatenate([s[1] for s in sizes])
    lengths = {"src": src, "tgt": tgt, "rsrc": tgt + 1, "rtgt": src - 1}
    for k in STREAMS + (REVERSE_STREAMS if cfg.proxy.dual else ()):
        folder, side = _destination(out, k)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = folder / f"train.{SRC}-{TGT}.{side}"
        concat([p[f"{k}.bin"] for p in parts], Path(f"{prefix}.bin"))
        write_index(Path(f"{prefix}.idx"), lengths[k], dtype)
        for name in (f"dict.{SRC}.txt", f"dict.{TGT}.txt"):
            shutil.copyfile(dict_path, folder / name)
    for name, dest in (("ids", layout.prepare_ids), ("tasks", layout.prepare_tasks)):
        concat([p[name] for p in parts], temp_path(dest))
    stats: dict[str, Any] = {"tasks": {}, "parts": count}
    for i in range(count):
        for name, t in records[i]["tasks"].items():
            acc = stats["tasks"].setdefault(name, {"train": 0, "dropped_too_many_tokens": 0})
            for field in acc:
                acc[field] += t[field]
    stats["train_pairs"] = len(tgt)
    stats["train_target_tokens"] = int(tgt.sum())
    return stats


def check_every_direction_kept(cfg: Config, stats: dict[str, Any]) -> None:
    """Refuse a direction left with no training pair: fairseq cannot load an empty training split (the proxy died
    in its dataset code), and a pair the models never see would be reported all the same. ``run`` calls it
    before anything of the stage is put in place, so nothing looks finished."""
    empty, too_long = [], False
    for pair, s, t in tasks(cfg.download.pairs, cfg.download.direction):
        got = stats["tasks"].get(f"{pair}:{s}-{t}", {"train": 0, "dropped_too_many_tokens": 0})
        if got["train"] == 0:
            dropped = got["dropped_too_many_tokens"]
            too_long = too_long or dropped > 0
            empty.append(f"{pair} ({s}-{t}): " + (f"all {dropped} over prepare.max_tokens="
                                                  f"{cfg.prepare.max_tokens} pieces on a side" if dropped
                                                  else "the download has no training line"))
    if empty:
        raise UsageError("0 training pairs encoded for " + "; ".join(empty)
                         + ("; raise prepare.max_tokens" if too_long else ""))


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    sd = layout.stage_dir("prepare")
    key = part_key(cfg, layout)
    shards = layout.prepare_shards
    for p in shards.glob(".part-*.tmp") if shards.is_dir() else ():  # killed parts' (no part job runs now)
        p.unlink(missing_ok=True)
    model = shared_spm(cfg, layout, key)
    vocab = Vocabulary.load(model)
    found = finished_parts(layout, key)
    count, records = found if found is not None else (1, {})
    if records:
        log.info("prepare: %d of %d part(s) binarized already (`prepare --shard`)", len(records), count)
    for i in range(count):  # what jobs did not do, done here
        if i not in records:
            records[i] = binarize_part(cfg, layout, model, vocab, key, i, count, _workers(cfg))
    tmp_bin = temp_path(layout.data_bin)
    tmp_rev = tmp_bin.with_name(tmp_bin.name + "-reverse")
    for d in (tmp_bin, tmp_rev):
        shutil.rmtree(d, ignore_errors=True)
    tmp_dict = temp_path(sd / "dict.txt")
    write_dictionary(vocab.pieces, tmp_dict)
    try:
        crash_point("prepare:before-binarize")
        stats = _assemble(cfg, count, records, layout, tmp_dict, tmp_bin, vocab.dtype)
        check_every_direction_kept(cfg, stats)
        with Encoder(model, 1) as enc:
            _encode_valid(cfg, layout, enc, vocab, tmp_bin)
        stats["vocab_size"] = len(vocab.pieces)
        for name, t in stats["tasks"].items():
            log.log(logging.INFO if t["dropped_too_many_tokens"] else logging.DEBUG, "prepare: %s: %d training pairs "
                    "encoded (%d over %d pieces dropped)", name, t["train"], t["dropped_too_many_tokens"],
                    cfg.prepare.max_tokens)
        log.info("prepare: %d training pairs encoded in %d task(s) (%d over %d pieces dropped)", stats["train_pairs"],
                 len(stats["tasks"]), sum(t["dropped_too_many_tokens"] for t in stats["tasks"].values()),
                 cfg.prepare.max_tokens)
        # everything is written: put it in place
        shutil.copyfile(model, temp_path(layout.spm_model))
        os.replace(temp_path(layout.spm_model), layout.spm_model)
        os.replace(tmp_dict, sd / "dict.txt")
        for dest in (layout.prepare_ids, layout.prepare_tasks):
            os.replace(temp_path(dest), dest)
        for final, tmp in ((layout.data_bin, tmp_bin), (layout.data_bin_reverse, tmp_rev)):
            shutil.rmtree(final, ignore_errors=True)
            if tmp.exists():
                os.replace(tmp, final)
    finally:
        for p in (tmp_dict, temp_path(layout.prepare_ids), temp_path(layout.prepare_tasks)):
            p.unlink(missing_ok=True)
        for d in (tmp_bin, tmp_rev):
            shutil.rmtree(d, ignore_errors=True)
    # the parts are in data-bin now (and older sets are of no use): only the SentencePiece model stays
    for p in shards.iterdir():
        if p.name.startswith("part-") and p.is_file():
            p.unlink()
    for old in (layout.spm_dir, layout.spm_reverse_dir, sd / "preprocess.log", sd / "preprocess-reverse.log"):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    outputs = [layout.spm_model, sd / "dict.txt", layout.data_bin, layout.prepare_ids, layout.prepare_tasks]
    if cfg.proxy.dual:
        outputs.append(layout.data_bin_reverse)
    return StageResult(outputs, stats)
