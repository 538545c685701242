"""Scoring shards: slice I of N of the training pairs scored on its own (one GPU, one job), its files and key,
the merge's helpers, the clean-up of what a killed pass left, and the fan-out of one shard process per GPU.

A shard is finished when ``04_score/shards/shard-<i>-of-<n>.json`` holds its key (written last); ``mtprune score``
merges a complete set of finished shards of one count, whatever count that is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .. import gpus
from ..children import child_env
from ..config import Config, lookup
from ..errors import StageError, UsageError
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import atomic_write_text, json_hash, temp_path
from .stored import flush_npy, open_npy

log = logging.getLogger("mtprune")


# read only when the finished pass is merged into scores.parquet: changing one re-merges, it does not rescore
# (score.target: the domain columns, computed at the merge from the finished pass and cached on their own key)
MERGE_ONLY = ("combine", "combine_how", "combine_all_how", "baselines", "proto_clusters", "target")


def shard_key(stage_config: dict[str, Any], inputs: dict[str, str | None]) -> str:
    """The key a shard is finished with: the score stage's settings (``pipeline.stage_config``) less the merge-only
    ones, and its upstream digests. A changed merge-only setting re-merges the kept pass instead of scoring again."""
    conf = {k: v for k, v in stage_config.items() if k != "external"}  # the score stage's: score.target's files
    conf["score"] = {k: v for k, v in conf["score"].items() if k not in MERGE_ONLY}
    return json_hash({"config": conf, "inputs": inputs})


def parse_shard(text: str, option: str = "--shard") -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"{option} {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
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
    process, the merge's when the run lock is; a shard scored right now by another process keeps its own. The
    ``base_*`` columns' leftovers in shards/ (their temp table, a word-alignment model's temp file) go with the merge's when no
    ``score --baselines`` job holds its lock either. With ``shard`` (i, N), only that shard's files are looked at."""
    from ..lock import HOLDER_SUFFIX, UNIT_LOCK_PREFIX, unit_lock_path

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
        # the base_* columns' (a merge's or a `score --baselines I/N` job's): their temp table and a model's temp file,
        # once no baselines job holds its lock either (a temp file does not say whose it is)
        if all(_writer_gone(lock) for lock in folder.glob(UNIT_LOCK_PREFIX + "baselines-*")
               if not lock.name.endswith(HOLDER_SUFFIX)):
            shards = layout.score_shard(0, 1).parent
            stale += sorted(p for p in shards.glob(".baselines*.tmp") if p.is_file())
            stale += sorted(p for p in shards.glob(".wordalign.*") if p.is_dir())  # eflomal's, in runs before VERSION 2
            stale += sorted(p for p in (shards / "wordalign").glob(".*.tmp") if p.is_file())  # a killed model fit
    freed = 0
    for p in stale:
        try:
            if p.is_dir():
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                shutil.rmtree(p)
            else:
                size = p.stat().st_size
                p.unlink()
        except FileNotFoundError:  # removed by another cleaner meanwhile
            continue
        freed += size
    if stale:
        log.info("score: removed %d temp file(s) left by an interrupted scoring pass, %d bytes (%.1f MB)",
                 len(stale), freed, freed / 1e6)
    return freed


def shard_sketch(shard: Path) -> Path:
    return shard.with_suffix(".sketch.npy")


def shard_tokens(shard: Path) -> Path:
    """Per-token values of a shard (score.dump_tokens), without sentence ids: those are added at the merge."""
    return shard.with_suffix(".tokens.parquet")


def with_sentence_ids(tok: Any, table: Any) -> Any:
    """The per-token table with each token's ``sentence_id``, looked up by training index in the score table."""
    import pyarrow as pa

    ids = dict(zip(table.column("index").to_pylist(), table.column("sentence_id").to_pylist(), strict=True))
    return tok.append_column("sentence_id", pa.array([ids[i] for i in tok.column("index").to_pylist()]))


def shard_pooled(shard: Path) -> Path:
    """(rows, checkpoints, P) float16 mean-pooled encoder states, projected (``stored.POOLED_DIMS``): `proto` is
    computed at the merge."""
    return shard.with_suffix(".pooled.npy")


def concat_npy(parts: list[Path], out: Path) -> None:
    """Concatenate .npy files along rows into ``out`` without holding them all in memory. One part is linked,
    not copied: the merged gradient sketch of a pass scored as the one shard of one shares the shard's disk
    (both are written once and only read after; a shard scored again is a new file)."""
    if len(parts) == 1:
        out.unlink(missing_ok=True)
        try:
            os.link(parts[0], out)
            return
        except OSError:  # a file system without hard links: copy
            pass
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    rows = sum(a.shape[0] for a in arrays)
    dst = open_npy(out, (rows,) + arrays[0].shape[1:], arrays[0].dtype)
    start = 0
    for a in arrays:
        dst[start:start + a.shape[0]] = a
        start += a.shape[0]
    flush_npy(dst)


def shard_counts(folder: Path, stem: str, suffix: str = ".parquet") -> list[int]:
    """The counts N of the ``<stem>-I-of-N<suffix>`` files in ``folder``, ascending (a set may be incomplete)."""
    return sorted({int(m.group(1)) for f in folder.glob(f"{stem}-*-of-*{suffix}")
                   if (m := re.fullmatch(rf"{re.escape(stem)}-\d+-of-(\d+){re.escape(suffix)}", f.name))})


def finished_shards(layout: RunLayout, key: str) -> list[Path] | None:
    """A complete set of shards (one per slice of some count N) finished with the settings of ``key``, or None.
    Sets of other counts or older settings lying beside it are ignored."""
    folder = layout.stage_dir("score") / "shards"
    for count in shard_counts(folder, "shard"):
        wanted = [layout.score_shard(i, count) for i in range(count)]
        if all(shard_key_matches(w, key) for w in wanted):
            return wanted
    return None


def pass_stats(shards: list[Path], n_ckpts: int) -> dict[str, Any]:
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


def stored_key(path: Path) -> str | None:
    """The ``key`` a JSON key file holds; None when the file is missing or holds none."""
    try:
        return json.loads(path.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_key_matches(shard: Path, key: str) -> bool:
    """Whether ``shard`` was finished (its key file written last, the shard still there) with the settings of ``key``."""
    return shard.is_file() and stored_key(shard.with_suffix(".json")) == key


def write_parquet(table: Any, path: Path) -> None:
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


# ---- one shard process per GPU --------------------------------------------------------------------

# Set by a stage command for the `mtprune score --shard` processes it starts: its own pid, as the holder
# of the run lock that they would otherwise refuse to run beside (cli.py checks it is their parent).
PARENT_HOLDS_RUN_LOCK = "MTPRUNE_PARENT_HOLDS_RUN_LOCK"


@dataclass(frozen=True)
class ShardJob:
    index: int
    count: int
    argv: list[str]
    env: dict[str, str]
    log: Path  # the process's output
    parquet: Path  # what it writes (04_score/shards/shard-<i>-of-<n>.parquet)


def score_shard_jobs(cfg: Config, layout: RunLayout, gpu_ids: list[str]) -> list[ShardJob]:
    """One `python -m mtprune score --shard i/N` per GPU, with ``CUDA_VISIBLE_DEVICES`` its GPU, on a
    snapshot of ``cfg`` (so the shards' key is the one this process checks) and the same run directory."""
    count = len(gpu_ids)
    folder = layout.score_shard(0, count).parent
    folder.mkdir(parents=True, exist_ok=True)
    # a plain copy that records no reads: the score stage must not depend on settings it does not use
    tree = {name: lookup(cfg, name) for name in type(cfg).__pydantic_fields__}
    tree["launch"]["launcher"] = "local"  # each shard runs itself, here
    snapshot = folder / f"config-{count}gpus.yaml"
    atomic_write_text(snapshot, yaml.safe_dump(tree, sort_keys=False))
    jobs = []
    for i, gpu in enumerate(gpu_ids):
        env = child_env(dict(os.environ))  # it dies with this process (cli.py)
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env[PARENT_HOLDS_RUN_LOCK] = str(os.getpid())
        argv = [sys.executable, "-m", "mtprune", "score", "-c", str(snapshot), "--run-dir", str(layout.root),
                "--shard", f"{i}/{count}"]
        parquet = layout.score_shard(i, count)
        jobs.append(ShardJob(i, count, argv, env, parquet.with_suffix(".log"), parquet))
    return jobs


def score_on_gpus(cfg: Config, layout: RunLayout, key: str) -> list[Path] | None:
    """With more than one visible GPU: score one shard per GPU at once and return the shards to merge
    (``stages/score.py`` merges them as it merges shards scored by hand); None where one process scores
    everything (CPU, one GPU, ``score.device: cpu``).

    A shard that a previous run finished with the same key is kept. When a shard fails the others are
    still waited for (they are kept for the next run), then a StageError names the shard and its log."""
    gpu_ids = gpus.visible()
    if len(gpu_ids) < 2 or cfg.score.device == "cpu":
        return None
    jobs = score_shard_jobs(cfg, layout, gpu_ids)
    todo = [j for j in jobs if not _shard_done(j, key)]
    for j in jobs:
        if j not in todo:
            log.info("score: shard %d/%d already scored, keeping it", j.index, j.count)
    if todo:
        log.info("score: %d shard(s) at once, one process per GPU (logs: %s)", len(todo), todo[0].log.parent)
    procs: list[tuple[ShardJob, subprocess.Popen[bytes], Any]] = []
    try:
        for j in todo:
            j.log.unlink(missing_ok=True)
            logf = open(j.log, "w", encoding="utf-8")  # noqa: SIM115  # closed below
            logf.write(f"$ CUDA_VISIBLE_DEVICES={j.env['CUDA_VISIBLE_DEVICES']} {' '.join(j.argv)}\n")
            logf.flush()
            procs.append((j, subprocess.Popen(j.argv, env=j.env, stdout=logf, stderr=subprocess.STDOUT), logf))
        failed = []
        for j, p, logf in procs:
            if p.wait() != 0:
                failed.append((j, p.returncode))
            logf.close()
    except BaseException:
        for _, p, logf in procs:
            if p.poll() is None:
                p.terminate()
            p.wait()
            logf.close()
        raise
    if failed:
        j, code = failed[0]
        lines = [ln.strip() for ln in j.log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        tail = lines[-1][:300] if len(lines) > 1 else "no output"
        more = f" ({len(failed) - 1} more shard(s) failed)" if len(failed) > 1 else ""
        raise StageError(f"score shard {j.index}/{j.count} (CUDA_VISIBLE_DEVICES={j.env['CUDA_VISIBLE_DEVICES']}) "
                         f"exited with {code}: {tail}{more} (full log: {j.log}); rerun to redo the failed shard(s)")
    return [j.parquet for j in jobs]


def _shard_done(j: ShardJob, key: str) -> bool:
    return shard_key_matches(j.parquet, key)
