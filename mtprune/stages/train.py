"""Stage 6: the final model for each pruned corpus and for the unpruned baseline (``full``)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..fairseq_backend import Schedule, check_training, cuda_available, train
from ..launch import Unit, run_units, unit_settings, unit_state
from ..layout import RunLayout
from ..manifest import file_sha256
from ..pipeline import StageResult
from .prune import runs as pruned_runs

SECTIONS = ("model", "train")
UPSTREAM = ("prepare", "prune")
KEEPS_UNITS = True  # a model whose corpus and settings did not change is not retrained
log = logging.getLogger("mtprune")


def models(cfg: Config, layout: RunLayout) -> list[tuple[str, str, float, Path]]:
    """(name, strategy, sparsity, data-bin) of every model to train."""
    out = [("full", "full", 0.0, layout.data_bin)] if cfg.train.include_full else []
    return out + [(n, st, sp, layout.pruned_data_bin(n)) for n, st, sp in pruned_runs(cfg)]


def schedule(cfg: Config) -> Schedule:
    t = cfg.train
    return Schedule(max_update=t.max_update, lr=t.lr, warmup_updates=t.warmup_updates, max_tokens=t.max_tokens,
                    update_freq=t.update_freq, label_smoothing=t.label_smoothing, precision=t.precision,
                    seed=t.seed, save_interval_updates=max(1, t.max_update // 4))


def preflight(cfg: Config, layout: RunLayout) -> None:
    """Raise UsageError for settings that cannot train here, before any model folder is touched."""
    use_cuda = cuda_available()
    try:
        check_training("train", cfg.train.precision, cfg.model, use_cuda)
    except UsageError:
        # a GPU-less job that only writes the manifest must not be refused: look at the units (which
        # hashes the training data) only when the settings would be refused
        if not all(unit_state(u, u.folder)[0] is not None for u in units(cfg, layout, use_cuda)):
            raise


def _work(cfg: Config, name: str, data_bin: Path, folder: Path, use_cuda: bool):
    def work(threads: int) -> dict[str, Any]:
        losses = train(data_bin, folder, cfg.model, schedule(cfg), threads, use_cuda, prefix=f"[train {name}] ")
        for f in folder.glob("checkpoint_*_*.pt"):  # interval checkpoints only served resumption
            f.unlink()
        return losses

    return work


def units(cfg: Config, layout: RunLayout, use_cuda: bool) -> list[Unit]:
    """One work unit per model (``full``, ``el2n-high-0.3``, ...); a cluster runs them as one job array."""
    settings = unit_settings(cfg, "model", "train", exclude=("train.include_full",))
    out = []
    for name, _st, _sp, data_bin in models(cfg, layout):
        def work(folder: Path, threads: int, name: str = name, data_bin: Path = data_bin) -> dict[str, Any]:
            return _work(cfg, name, data_bin, folder, use_cuda)(threads)

        key = {**settings, "data": file_sha256(data_bin / "train.src-tgt.tgt.bin")}
        out.append(Unit(f"train {name}", layout.train_dir(name), key, work,
                        ["checkpoint_best.pt", "checkpoint_last.pt"], layout.lock))
    return out


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    use_cuda = cuda_available()
    results = run_units(units(cfg, layout, use_cuda), cfg.train.parallel, use_cuda)
    wanted = {layout.train_dir(n).name for n, *_ in models(cfg, layout)}
    for d in layout.stage_dir("train").iterdir():
        if d.is_dir() and d.name not in wanted:
            shutil.rmtree(d)
    outputs = []
    for name, *_ in models(cfg, layout):
        outputs += [layout.train_dir(name) / "checkpoint_best.pt", layout.train_dir(name) / "checkpoint_last.pt"]
    return StageResult(outputs, {"losses": results, "device": "cuda" if use_cuda else "cpu"})
