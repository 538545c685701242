"""Stage 3: short proxy runs, one per seed, keeping checkpoints at the listed update counts."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import StageError, UsageError
from ..fairseq_backend import Schedule, check_training, cuda_available, interval_checkpoint, train
from ..launch import Unit, run_units, unit_settings, unit_state
from ..layout import RunLayout
from ..manifest import file_sha256
from ..pipeline import StageResult

SECTIONS = ("model", "proxy")
UPSTREAM = ("prepare",)
KEEPS_UNITS = True  # finished seeds survive a change that does not concern them
log = logging.getLogger("mtprune")


def schedule(cfg: Config, seed: int) -> Schedule:
    p = cfg.proxy
    return Schedule(max_update=max(p.checkpoints), lr=p.lr, warmup_updates=p.warmup_updates,
                    max_tokens=p.max_tokens, update_freq=p.update_freq, label_smoothing=p.label_smoothing,
                    precision=p.precision, seed=seed,
                    save_interval_updates=reduce(math.gcd, p.checkpoints))


def preflight(cfg: Config, layout: RunLayout) -> None:
    """Raise UsageError for settings that cannot train here, before any seed folder is touched."""
    use_cuda = cuda_available()
    try:
        check_training("proxy", cfg.proxy.precision, cfg.model, use_cuda)
    except UsageError:
        # a GPU-less job that only writes the manifest must not be refused: look at the units (which
        # hashes the training data) only when the settings would be refused
        if not all(unit_state(u, u.folder)[0] is not None for u in units(cfg, layout, use_cuda)):
            raise


def _seed_work(cfg: Config, layout: RunLayout, seed: int, use_cuda: bool):
    def work(threads: int) -> dict[str, Any]:
        folder = layout.proxy_seed_dir(seed)
        losses = train(layout.data_bin, folder, cfg.model, schedule(cfg, seed), threads, use_cuda,
                       prefix=f"[proxy seed{seed}] ")
        missing = []
        for u in cfg.proxy.checkpoints:
            found = interval_checkpoint(folder, u)
            if found is None and not layout.proxy_checkpoint(seed, u).exists():
                missing.append(u)
            elif found is not None:
                os.replace(found, layout.proxy_checkpoint(seed, u))
        if missing:
            raise StageError(f"proxy seed {seed}: no checkpoint was saved at update(s) {missing} "
                             f"(see {folder / 'train.log'})")
        # intermediate checkpoints only served resumption
        for f in folder.glob("checkpoint*.pt"):
            if f.name not in {layout.proxy_checkpoint(seed, u).name for u in cfg.proxy.checkpoints}:
                f.unlink()
        return losses

    return work


def units(cfg: Config, layout: RunLayout, use_cuda: bool) -> list[Unit]:
    """One work unit per seed (``seed<k>``); a cluster runs them as one job array."""
    data_key = file_sha256(layout.data_bin / "train.src-tgt.tgt.bin")
    settings = unit_settings(cfg, "model", "proxy", exclude=("proxy.seeds",))
    out = []
    for seed in cfg.proxy.seeds:
        def work(folder: Path, threads: int, seed: int = seed) -> dict[str, Any]:
            return _seed_work(cfg, _SeedIn(layout.root, folder), seed, use_cuda)(threads)

        outputs = [layout.proxy_checkpoint(seed, u).name for u in cfg.proxy.checkpoints]
        out.append(Unit(f"proxy seed{seed}", layout.proxy_seed_dir(seed), {**settings, "seed": seed, "data": data_key},
                        work, outputs, layout.lock))
    return out


@dataclass(frozen=True)
class _SeedIn(RunLayout):
    """The run layout with the seed's folder elsewhere: a unit may run in a staging folder."""

    seed_dir: Path = Path()

    def proxy_seed_dir(self, seed: int) -> Path:
        return self.seed_dir


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    use_cuda = cuda_available()
    results = run_units(units(cfg, layout, use_cuda), cfg.proxy.parallel, use_cuda)
    wanted = {layout.proxy_seed_dir(s).name for s in cfg.proxy.seeds}
    for d in layout.stage_dir("proxy").glob("seed*"):
        if d.name not in wanted:
            shutil.rmtree(d)
    outputs: list[Path] = [layout.proxy_checkpoint(s, u) for s in cfg.proxy.seeds for u in cfg.proxy.checkpoints]
    return StageResult(outputs, {"losses": results, "device": "cuda" if use_cuda else "cpu"})
