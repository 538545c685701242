"""Stage 6: the final models, for each pruned corpus and the unpruned baseline (``full``), once per seed.

``train.budget`` says what is held equal across corpora: ``updates`` trains every corpus for
``train.max_update`` updates (equal compute, so a pruned corpus is seen more often); ``epochs``
trains every corpus for ``train.max_epoch`` passes. For ``epochs`` the update count of a corpus is
``max_epoch`` times its updates per epoch, counted with fairseq-train's own batch iterator on that
corpus (same batching, GPU count and update_freq), so training stops exactly at the end of the last
pass and checkpoints, validation and the learning-rate schedule stay update-based as for ``updates``.

``train.order`` other than ``shuffled`` presents each corpus in the order of a score column
(``mtprune/curriculum.py``): the unit folder gets ``order.npy``, one hardness per training pair of its
corpus, and the model's key holds the order's settings and a hash of those values.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..fairseq_backend import (
    Schedule,
    batch_record,
    check_training,
    cuda_available,
    data_inputs,
    train,
    update_freq_for,
    world_size,
)
from ..launch import Unit, all_units_done, note_kept_units, run_units, unit_settings, units_note
from ..layout import RunLayout, seed_run_name
from ..manifest import file_sha256
from ..pipeline import StageResult
from ..textio import read_lines
from .prune import fraction_dropped
from .prune import runs as pruned_runs

SECTIONS = ("model", "train")
UPSTREAM = ("prepare", "prune")
KEEPS_UNITS = True  # a model whose corpus and settings did not change is not retrained
log = logging.getLogger("mtprune")


@dataclass(frozen=True)
class Model:
    """One model to train: a corpus (``corpus``: ``full``, ``el2n-high-0.3``), a training order and a seed.

    ``name`` and ``strategy`` are the system's in the report: the corpus's own for ``shuffled``, with
    ``+<order>`` for another order (``full+competence``, ``el2n-high+competence``); ``run`` names its folders."""

    run: str
    name: str
    strategy: str
    sparsity: float | None  # None: opusfilter before prune has run (its fraction comes from the data)
    seed: int
    data_bin: Path
    corpus: str = ""  # prune's name of the corpus ("full" for the unpruned one); "" = name
    order: str = "shuffled"
    corpus_strategy: str = ""  # the strategy that made the corpus; "" = strategy

    @property
    def pruned_as(self) -> tuple[str, str]:
        """(the corpus's name, the strategy that made it), as the prune stage knows them."""
        return self.corpus or self.name, self.corpus_strategy or self.strategy


def models(cfg: Config, layout: RunLayout) -> list[tuple[str, str, float | None, Path]]:
    """(name, strategy, sparsity, data-bin) of every corpus to train on; a corpus whose fraction the data
    decides (``opusfilter``) has the fraction the prune stage dropped, None before it ran."""
    out: list[tuple[str, str, float | None, Path]] = [("full", "full", 0.0, layout.data_bin)] if cfg.train.include_full else []
    return out + [(n, st, fraction_dropped(layout, n) if sp is None else sp, layout.pruned_data_bin(n))
                  for n, st, sp in pruned_runs(cfg)]


def seed_models(cfg: Config, layout: RunLayout) -> list[Model]:
    """Every model: each corpus of ``models`` once per ``train.order`` and ``train.seeds``, corpus after corpus; the
    orders other than shuffled only for the corpora of ``train.order_corpora`` when it names any."""
    out = []
    for n, st, sp, b in models(cfg, layout):
        for order in cfg.train.order:
            if order != "shuffled" and cfg.train.order_corpora and n not in cfg.train.order_corpora:
                continue
            name, strategy = (n, st) if order == "shuffled" else (f"{n}+{order}", f"{st}+{order}")
            out += [Model(seed_run_name(name, s), name, strategy, sp, s, b, n, order, st) for s in cfg.train.seeds]
    return out


def updates_per_epoch(data_bin: Path, cfg: Config, use_cuda: bool) -> int:
    """Updates fairseq-train makes in one pass over ``data_bin`` with the train settings: its own
    task, batch iterator and update grouping, as in fairseq_cli.train (no model is built)."""
    from fairseq import tasks, utils
    from fairseq.data import iterators
    from fairseq.models.transformer import DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS

    from ..fairseq_backend import parse_train_argv, train_argv

    s = schedule(cfg, seed=cfg.train.seeds[0], max_update=1, use_cuda=use_cuda)
    args = parse_train_argv(train_argv(data_bin, Path("unused"), cfg.model, s, use_cuda))
    task = tasks.setup_task(args)
    task.load_dataset(args.train_subset, epoch=1, combine=True)
    # what the model's build_model fills in when the architecture leaves them unset
    model_positions = (getattr(args, "max_source_positions", None) or DEFAULT_MAX_SOURCE_POSITIONS,
                       getattr(args, "max_target_positions", None) or DEFAULT_MAX_TARGET_POSITIONS)
    world = world_size(use_cuda)  # the GPUs this run's fairseq-train trains on (its group, launch.run_units)
    itr = task.get_batch_iterator(
        dataset=task.dataset(args.train_subset), max_tokens=args.max_tokens, max_sentences=args.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model_positions, args.max_tokens),
        ignore_invalid_inputs=True, required_batch_size_multiple=args.required_batch_size_multiple,
        seed=args.seed, num_shards=world, shard_id=0, epoch=1, disable_iterator_cache=True,
        skip_remainder_batch=args.skip_remainder_batch, grouped_shuffling=args.grouped_shuffling)
    grouped = iterators.GroupedIterator(itr.next_epoch_itr(shuffle=True), args.update_freq[0],
                                        skip_remainder_batch=args.skip_remainder_batch)
    return len(grouped)


def max_updates(cfg: Config, m: Model, use_cuda: bool) -> int:
    """Updates to train ``m`` for under ``train.budget``."""
    t = cfg.train
    if t.budget == "updates":
        return t.max_update
    assert t.max_epoch is not None  # the config requires it with budget: epochs
    return t.max_epoch * updates_per_epoch(m.data_bin, cfg, use_cuda)


def schedule(cfg: Config, seed: int | None = None, max_update: int | None = None, use_cuda: bool = False,
             order: str = "shuffled", order_file: Path | None = None) -> Schedule:
    """fairseq-train's schedule for one model (by default: the first seed, ``train.max_update``, shuffled); an
    ordered one reads its hardness from ``order_file``."""
    t = cfg.train
    seed = t.seeds[0] if seed is None else seed
    max_update = t.max_update if max_update is None else max_update
    update_freq = update_freq_for(t.tokens_per_update, t.update_freq, t.max_tokens, world_size(use_cuda))
    return Schedule(max_update=max_update, lr=t.lr, warmup_updates=t.warmup_updates, max_tokens=t.max_tokens,
                    update_freq=update_freq, label_smoothing=t.label_smoothing, precision=t.precision,
                    seed=seed, save_interval_updates=max(1, max_update // 4), wandb_project=cfg.launch.wandb_project,
                    order=order, order_file=None if order_file is None else str(order_file),
                    competence_c0=t.competence_c0, competence_updates=competence_updates(cfg, max_update),
                    domain_phases=t.domain_phases, domain_final_share=t.domain_final_share, domain_updates=max_update,
                    rescore_every=t.rescore_every, rescore_by=t.rescore_by, rescore_sample=t.rescore_sample or 0,
                    valid_bleu=t.valid_bleu)


def competence_updates(cfg: Config, max_update: int) -> int:
    """The update at which competence reaches the whole corpus: train.competence_updates, else half the run."""
    return cfg.train.competence_updates or max(1, max_update // 2)


class OrderData:
    """Per model, the hardness (``curriculum.difficulty`` of ``train.order_by``) of each training pair of its
    corpus, in the corpus's data-bin order; the scores are read once for all models."""

    def __init__(self, cfg: Config, layout: RunLayout) -> None:
        self.cfg, self.layout = cfg, layout
        self._by_key: dict[str, int] | None = None
        self._hardness: Any = None

    def _load(self) -> None:
        import pandas as pd
        import pyarrow.parquet as pq

        from ..curriculum import difficulty

        check_order_by(self.cfg)  # also met first here: a dry run plans the units before the checks run
        col = self.cfg.train.order_by.lstrip("-")
        if col not in pq.read_schema(self.layout.scores).names:
            raise UsageError(f"train.order_by: {self.layout.scores} has no column {col!r} (scored by an older "
                             "mtprune? `mtprune score --overwrite` scores again with today's columns)")
        df = pd.read_parquet(self.layout.scores, columns=["index", "sentence_id", "direction", col])
        df = df.sort_values("index", kind="stable").reset_index(drop=True)
        self._hardness = difficulty(df[col].to_numpy(), self.cfg.train.order_by)
        self._ids = df["sentence_id"].tolist()
        self._dirs = df["direction"].tolist()

    def hardness(self, m: Model) -> Any:
        """None while the corpus or the scores are not there yet (a plan before prune ran)."""
        corpus, strategy = m.pruned_as
        if not self.layout.scores.is_file() or (strategy != "full" and not self.layout.kept_ids(corpus).is_file()):
            return None
        if self._hardness is None:
            self._load()
        if strategy == "full":
            return self._hardness
        lines = read_lines(self.layout.kept_ids(corpus))
        if self._by_key is None:
            both = any("\t" in ln for ln in lines[:1])
            keys = [f"{i}\t{d}" for i, d in zip(self._ids, self._dirs, strict=True)] if both else self._ids
            self._by_key = {k: r for r, k in enumerate(keys)}
        return self._hardness[[self._by_key[ln] for ln in lines]]

    def digest(self, m: Model) -> str | None:
        import numpy as np

        h = self.hardness(m)
        return None if h is None else hashlib.sha256(np.ascontiguousarray(h, dtype=np.float64).tobytes()).hexdigest()


def preflight(cfg: Config, layout: RunLayout) -> None:
    """Raise UsageError for settings that cannot train here, before any model folder is touched."""
    check(cfg, layout)


def check(cfg: Config, layout: RunLayout) -> None:
    """Settings that cannot train on this machine, from the config alone: also before a sweep's first stage.
    A GPU-less job that only writes the manifest of models trained elsewhere is not refused: the units (whose
    keys hash the training data) are looked at only when the settings would be."""
    use_cuda = cuda_available()
    if set(cfg.train.order) != {"shuffled"}:
        check_order_by(cfg)
    try:
        check_training("train", cfg.train.precision, cfg.model, use_cuda)
    except UsageError:
        if not all_units_done(lambda: units(cfg, layout, use_cuda)):
            raise


def check_order_by(cfg: Config) -> None:
    """UsageError when ``train.order_by`` names no numeric column the score stage writes with these settings."""
    from ..scoring.forward import score_columns

    if cfg.train.order_by.lstrip("-") not in score_columns(cfg):
        known = [c for c in score_columns(cfg) if "@" not in c]
        raise UsageError(f"train.order_by: {cfg.train.order_by!r} names no score column the score stage writes "
                         f"with these settings (it writes: {', '.join(known)}, and one <score>@s<seed>u<updates> "
                         "per proxy checkpoint)")


def plan_note(cfg: Config, layout: RunLayout, upstream_runs: list[str]) -> str:
    """For `sweep --dry-run`: which models train and which finished ones are reused."""
    return units_note(layout.stage_dir("train"), [layout.train_dir(m.run).name for m in seed_models(cfg, layout)],
                      lambda: units(cfg, layout, cuda_available()), upstream_runs)


ORDER_SETTINGS = ("order", "order_by", "competence_c0", "competence_updates", "rescore_every", "rescore_by",
                  "rescore_sample", "domain_phases", "domain_final_share")


def used_order_settings(order: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The train.order settings a model trained in ``order`` depends on, with its own order (none: shuffled)."""
    if order == "shuffled":
        return {}
    names = ["order_by"]
    if order in ("competence", "self-paced"):
        names += ["competence_c0", "competence_updates"]
    if order == "self-paced":
        names += ["rescore_every", "rescore_by", "rescore_sample"]
    if order == "general-to-domain":
        names += ["domain_phases", "domain_final_share"]
    return {"order": order, **{k: settings[k] for k in names if settings.get(k) is not None}}


def units(cfg: Config, layout: RunLayout, use_cuda: bool) -> list[Unit]:
    """One work unit per model and seed (``full``, ``el2n-high-0.3-seed2``, ...); a cluster runs them as one
    job array. The key holds ``train.seed`` as a single-seed key did, so finished seed-1 models stay done."""
    unused = "train.max_epoch" if cfg.train.budget == "updates" else "train.max_update"
    # train.order_corpora selects which models train (seed_models), like train.seeds: no model's setting
    settings = unit_settings(cfg, "model", "train",
                             exclude=("train.include_full", "train.seeds", "train.order_corpora", unused))
    settings["train"].pop("seed", None)
    if cfg.train.budget == "updates":  # the key of a model trained before train.budget existed
        settings["train"].pop("budget", None)
        settings["train"].pop("max_epoch", None)
    order_settings = {k: settings["train"].pop(k, None) for k in ORDER_SETTINGS}  # a shuffled model's key has none
    orders = OrderData(cfg, layout)
    out = []
    for m in seed_models(cfg, layout):
        def work(folder: Path, threads: int, m: Model = m) -> dict[str, Any]:
            import numpy as np

            n = max_updates(cfg, m, use_cuda)
            order_file = None
            if m.order != "shuffled":
                order_file = folder / "order.npy"
                tmp = folder / ".order.npy.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, orders.hardness(m))
                tmp.replace(order_file)
            s = schedule(cfg, m.seed, n, use_cuda, m.order, order_file)
            result = train(m.data_bin, folder, cfg.model, s, threads, use_cuda, prefix=f"[train {m.run}] ")
            for f in folder.glob("checkpoint_*_*.pt"):  # interval checkpoints only served resumption
                f.unlink()
            extra = {} if m.order == "shuffled" else {"order": m.order, "order_by": cfg.train.order_by}
            if m.order in ("competence", "self-paced"):
                extra["competence_updates"] = s.competence_updates
            if m.order == "general-to-domain":
                extra.update(domain_phases=s.domain_phases, domain_final_share=s.domain_final_share,
                             domain_updates=s.domain_updates)
            if m.order == "self-paced":  # what rescoring cost, from fairseq-train's log
                spent = [float(x) for x in re.findall(r"self-paced: rescored \d+ pairs .* in ([\d.]+)s",
                                                       (folder / "train.log").read_text(encoding="utf-8"))]
                extra.update(rescorings=len(spent), rescore_seconds=round(sum(spent), 1))
                log.info("[train %s] self-paced: %d rescorings, %.1fs in all", m.run, len(spent), sum(spent))
            return {**result, "max_update": n, **batch_record(s, use_cuda), **extra}

        key = {**settings, "train": {**settings["train"], "seed": m.seed, **used_order_settings(m.order, order_settings)},
               "data": file_sha256(m.data_bin / "train.src-tgt.tgt.bin")}
        if m.order != "shuffled":
            key["order_data"] = orders.digest(m)
        out.append(Unit(f"train {m.run}", layout.train_dir(m.run), key, work,
                        ["checkpoint_best.pt", "checkpoint_last.pt"], layout.lock,
                        inputs=data_inputs(m.data_bin, valid=True)))
    return out


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    use_cuda = cuda_available()
    results = run_units(units(cfg, layout, use_cuda), cfg.train.parallel, use_cuda, cfg.launch.gpus_per_run)
    note_kept_units("train", layout.stage_dir("train"), {layout.train_dir(m.run).name for m in seed_models(cfg, layout)})
    outputs = []
    for m in seed_models(cfg, layout):
        outputs += [layout.train_dir(m.run) / "checkpoint_best.pt", layout.train_dir(m.run) / "checkpoint_last.pt"]
    updates = {name.partition(" ")[2]: r.get("max_update") for name, r in results.items()}
    return StageResult(outputs, {"losses": results, "device": "cuda" if use_cuda else "cpu",
                                 "budget": cfg.train.budget, "seeds": list(cfg.train.seeds), "max_update": updates})
