"""Stage 3: short proxy runs, one per seed, keeping checkpoints at the listed update counts."""

from __future__ import annotations

import logging
import math
import os
from functools import reduce
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import StageError, UsageError
from ..fairseq_backend import (
    SRC,
    TGT,
    Schedule,
    batch_record,
    check_training,
    checkpoint_updates,
    cuda_available,
    data_inputs,
    interval_checkpoint,
    logged_losses,
    train,
    update_freq_for,
    world_size,
)
from ..launch import (
    Unit,
    all_units_done,
    finished_units,
    note_kept_units,
    run_units,
    unit_settings,
    units_note,
)
from ..layout import RunLayout
from ..manifest import file_sha256
from ..pipeline import StageResult

SECTIONS = ("model", "proxy")
UPSTREAM = ("prepare",)
KEEPS_UNITS = True  # finished seeds survive a change that does not concern them
log = logging.getLogger("mtprune")


def schedule(cfg: Config, seed: int, use_cuda: bool = False) -> Schedule:
    p = cfg.proxy
    update_freq = update_freq_for(p.tokens_per_update, p.update_freq, p.max_tokens, world_size(use_cuda))
    return Schedule(max_update=max(p.checkpoints), lr=p.lr, warmup_updates=p.warmup_updates,
                    max_tokens=p.max_tokens, update_freq=update_freq, label_smoothing=p.label_smoothing,
                    precision=p.precision, seed=seed,
                    save_interval_updates=reduce(math.gcd, p.checkpoints), wandb_project=cfg.launch.wandb_project)


def preflight(cfg: Config, layout: RunLayout) -> None:
    """Raise UsageError for settings that cannot train here, before any seed folder is touched."""
    if cfg.proxy.dual and not (layout.data_bin_reverse / f"train.{SRC}-{TGT}.{TGT}.bin").is_file():
        # a prepare finished before proxy.dual existed did not record it, so it is not stale by itself
        raise UsageError(f"proxy.dual: {layout.data_bin_reverse} is missing; "
                         "run `mtprune prepare --overwrite --set proxy.dual=true` first")
    check(cfg, layout)


def check(cfg: Config, layout: RunLayout) -> None:
    """Settings that cannot train on this machine (fp16 without a GPU, ...), from the config alone: also
    before a sweep's first stage. A GPU-less job that only writes the manifest of seeds trained elsewhere is
    not refused: the units (whose keys hash the training data) are looked at only when the settings would be."""
    use_cuda = cuda_available()
    try:
        check_training("proxy", cfg.proxy.precision, cfg.model, use_cuda)
    except UsageError:
        if not all_units_done(lambda: units(cfg, layout, use_cuda)):
            raise


def plan_note(cfg: Config, layout: RunLayout, upstream_runs: list[str]) -> str:
    """For `sweep --dry-run`: which seeds train and which finished ones are reused."""
    return units_note(layout.stage_dir("proxy"), unit_names(cfg),
                      lambda: units(cfg, layout, cuda_available()), upstream_runs)


def _holds(path: Path, updates: int) -> bool:
    """Whether ``path`` is a readable checkpoint saved at ``updates``."""
    try:
        return checkpoint_updates(path) == updates
    except StageError:
        return False


def _checkpoint_name(updates: int) -> str:
    return RunLayout(Path()).proxy_checkpoint(0, updates).name


def _train_work(cfg: Config, data_bin: Path, seed: int, name: str, use_cuda: bool):
    """Train one proxy run on ``data_bin`` into the folder given to the work (its own or a staging one)."""

    def work(folder: Path, threads: int) -> dict[str, Any]:
        s = schedule(cfg, seed, use_cuda)
        kept = {u: folder / _checkpoint_name(u) for u in cfg.proxy.checkpoints}
        if not (folder / "checkpoint_last.pt").exists() and all(_holds(p, u) for u, p in kept.items()):
            # stopped after its checkpoints were kept and the others removed, before done.json: finished
            log.info("[proxy %s] every kept checkpoint is there: training had finished", name)
            return {**logged_losses(folder), **batch_record(s, use_cuda)}
        losses = train(data_bin, folder, cfg.model, s, threads, use_cuda, prefix=f"[proxy {name}] ")
        missing = []
        for u, path in kept.items():
            found = interval_checkpoint(folder, u)
            if found is None and not path.exists():
                missing.append(u)
            elif found is not None:
                os.replace(found, path)
        if missing:
            raise StageError(f"proxy {name}: no checkpoint was saved at update(s) {missing} "
                             f"(see {folder / 'train.log'})")
        # intermediate checkpoints only served resumption
        for f in folder.glob("checkpoint*.pt"):
            if f not in kept.values():
                f.unlink()
        return {**losses, **batch_record(s, use_cuda)}

    return work


def unit_names(cfg: Config) -> list[str]:
    """The units' folder names, from the config alone (a cluster's array tasks)."""
    names = [f"seed{s}" for s in cfg.proxy.seeds]
    return names + ([f"reverse-{n}" for n in names] if cfg.proxy.dual else [])


def _settings(cfg: Config) -> dict[str, Any]:
    # proxy.dual selects units rather than changing one: a forward seed stays done when it is switched
    return unit_settings(cfg, "model", "proxy", exclude=("proxy.seeds", "proxy.dual"))


def progress(cfg: Config, layout: RunLayout) -> str:
    """For `status` while proxy is not finished: the seeds whose runs finished with the current settings (their
    training data is not hashed here; the next run checks it before reusing them)."""
    settings = _settings(cfg)
    expected = {name: {**settings, "seed": int(name.rpartition("seed")[2])} for name in unit_names(cfg)}
    done = finished_units(layout.stage_dir("proxy"), expected, unchecked=("data",))
    if not done:
        return ""
    shown = ", ".join(done[:6]) + (", ..." if len(done) > 6 else "")
    return f"{len(done)} of {len(expected)} proxy run(s) finished ({shown})"


def units(cfg: Config, layout: RunLayout, use_cuda: bool) -> list[Unit]:
    """One work unit per seed (``seed<k>``), and with proxy.dual one per seed on the reversed pairs
    (``reverse-seed<k>``, same schedule); a cluster runs them as one job array."""
    settings = _settings(cfg)
    runs = [("", layout.data_bin, layout.proxy_seed_dir)]
    if cfg.proxy.dual:
        runs.append(("reverse-", layout.data_bin_reverse, layout.proxy_reverse_seed_dir))
    out = []
    for prefix, data_bin, seed_dir in runs:
        data_key = file_sha256(data_bin / f"train.{SRC}-{TGT}.{TGT}.bin")
        for seed in cfg.proxy.seeds:
            name = f"{prefix}seed{seed}"
            outputs = [_checkpoint_name(u) for u in cfg.proxy.checkpoints]
            out.append(Unit(f"proxy {name}", seed_dir(seed), {**settings, "seed": seed, "data": data_key},
                            _train_work(cfg, data_bin, seed, name, use_cuda), outputs, layout.lock,
                            inputs=data_inputs(data_bin, valid=False)))  # kept checkpoints: fixed updates
    return out


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    use_cuda = cuda_available()
    todo = units(cfg, layout, use_cuda)
    results = run_units(todo, cfg.proxy.parallel, use_cuda, cfg.launch.gpus_per_run)
    note_kept_units("proxy", layout.stage_dir("proxy"), {u.folder.name for u in todo})
    outputs: list[Path] = [layout.proxy_checkpoint(s, u) for s in cfg.proxy.seeds for u in cfg.proxy.checkpoints]
    if cfg.proxy.dual:
        outputs += [layout.proxy_reverse_checkpoint(s, u) for s in cfg.proxy.seeds for u in cfg.proxy.checkpoints]
    return StageResult(outputs, {"losses": results, "device": "cuda" if use_cuda else "cpu"})
