"""What a sweep will cost on a cluster, before anything is submitted: `mtprune slurm-script -c cfg.yaml`.

One row per stage: the jobs `--launcher slurm` submits for it (a job array where the stage has units, and the
job that finishes the stage), the GPUs and CPUs each job holds, the shard count of the score stage, and an
estimate of its hours. The estimates multiply what the config asks for by throughputs that were measured:

- the CPU stages (download, prepare, the score stage's merge and derived columns, prune, report, export): seconds
  per 100,000 pairs measured by ``scripts/bench_scale.py`` at 4,000,000 pairs on the project's 2-core reference
  machine (``REFERENCE`` below, with the command and date), times the corpus size;
- the GPU stages: training at the target tokens per second that this run's own proxy logs report (fairseq's
  ``wps``) or ``--train-tps``; scoring at the target tokens per second of this run's finished score shards or
  ``--score-tps``. Without a measured throughput a GPU stage shows the work (target tokens) and no hours:
  the honest answer before anything has run on the cluster's GPUs.

The corpus size is ``--pairs`` when given, else what this run's download stage counted, else OPUS-100's training
split (at most 1,000,000 pairs a language pair, capped by ``download.max_train_per_pair``) or the synthetic
corpus's size. Target tokens for scoring come from this run's prepare manifest or ``--tokens-per-pair``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .config import Config
from .layout import STAGES, RunLayout
from .manifest import Manifest

# Seconds per 100,000 training pairs of the CPU work of each stage, measured on the 2-core reference machine by
# `.venv/bin/python scripts/bench_scale.py --pairs 50000,1000000,4000000 --workdir /tmp/bench --keep`
# (2026-12-05, the 4,000,000-pair run; synthetic text, SentencePiece vocabulary 1,000). ``score`` is the
# stage's work after the scoring pass: merging the shards, the derived and base_* columns (OpusFilter's filters,
# eflomal, lingua), diagnostics; the pass itself is GPU work, estimated from tokens.
REFERENCE_SOURCE = "scripts/bench_scale.py at 4M pairs, 2-core CPU machine, 2026-12-05"
REFERENCE: dict[str, float] = {
    "download": 1.50,  # 60.0 s
    # 45.7 s (SentencePiece on 300,000 sentences, then encoding and binarizing from its ids), timed after prepare
    # stopped calling fairseq-preprocess (668.5 s before): `mtprune prepare` alone on the same 4M-pair download
    "prepare": 1.14,
    # of which encoding and binarizing, what a `prepare --shard I/N` array splits: parts of 999,997 pairs of that
    # corpus took 5.2 and 4.7 s (`mtprune prepare --shard 3/4`, `--shard 0/4`)
    "prepare_parts": 0.50,
    # 2,577.4 s for the stage, less the scoring pass's 489.9 s (tiny model, on the CPU), with eflomal's word alignment
    # (44.10 of its 52.19 s per 100k); its base_* columns replaced by mtprune's own word alignment's (29.07, below)
    "score": 37.16,
    # the base_* columns (OpusFilter's filters, lingua, word alignment), the work a `score --baselines I/N` array
    # takes off the finishing job: `scripts/bench_baselines.py --pairs 100000,1000000` (2026-12-07), 290.7 s for
    # 1,000,000 pairs of the same synthetic corpus in one `score --baselines 0/1` (32.3 s at 100,000)
    "baselines": 29.07,
    "prune": 1.28,  # 51.1 s, one el2n-high corpus
    "report": 5.35,  # 213.9 s
}

# OPUS-100 caps each language pair's training split at 1,000,000 pairs; en-de, en-es, en-fr and en-it reach it
OPUS100_TRAIN_CAP = 1_000_000
# fairseq's training lines, every --log-interval updates (train_inner) and at an epoch's end (train)
_WPS = re.compile(r"\| (?:train_inner|train) \|.*?\bwps[= ]([\d.]+)")


@dataclass
class Row:
    stage: str
    jobs: str
    gpus: int  # per job
    cpus: int  # per job
    hours: float | None  # wall hours of the stage with the array's parallelism; None: no measured throughput
    basis: str
    task_hours: float | None = None  # hours of its longest job (an array task), against launch.slurm.time_min
    beside: bool = False  # runs beside the stages before it (not on the chain of stages): not in the total


def corpus_pairs(cfg: Config, layout: RunLayout) -> tuple[int, str]:
    """Training pairs, and where the number comes from."""
    m = Manifest.read(layout.manifest("download"))
    if m is not None and m.stats.get("pairs"):
        n = sum(int(v.get("train", {}).get("written", 0)) for v in m.stats["pairs"].values())
        return n, "counted by this run's download"
    d = cfg.download
    if d.source == "synthetic":
        return d.synthetic_train_per_pair * len(d.pairs), "the synthetic corpus's size"
    per = OPUS100_TRAIN_CAP if d.max_train_per_pair is None else min(OPUS100_TRAIN_CAP, d.max_train_per_pair)
    return per * len(d.pairs), f"OPUS-100: at most {per:,} a pair"


def tokens_per_pair(layout: RunLayout) -> float | None:
    m = Manifest.read(layout.manifest("prepare"))
    if m is None or not m.stats.get("train_pairs"):
        return None
    return m.stats["train_target_tokens"] / m.stats["train_pairs"]


def measured_train_tps(layout: RunLayout) -> tuple[float, str] | None:
    """Median target tokens per second over the training lines of this run's proxy logs (fairseq's wps: all the
    run's GPUs together) and the device the proxy stage recorded; None before any proxy unit has logged."""
    values = []
    for log in sorted(layout.stage_dir("proxy").glob("*/train.log")):
        values += [float(x) for x in _WPS.findall(log.read_text(encoding="utf-8", errors="replace"))]
    if not values:
        return None
    values.sort()
    m = Manifest.read(layout.manifest("proxy"))
    return values[len(values) // 2], str(m.stats.get("device", "?")) if m is not None else "?"


def measured_score_tps(layout: RunLayout, n_ckpt: int) -> tuple[float, str] | None:
    """Target tokens per second of one checkpoint's pass over this run's finished score shards (a shard's record
    holds its pass's seconds over all ``n_ckpt`` checkpoints, and its target tokens), None before any shard has
    finished."""
    tokens = seconds = 0.0
    devices = set()
    for rec in sorted(layout.stage_dir("score").glob("shards/shard-*-of-*.json")):
        try:
            r = json.loads(rec.read_text(encoding="utf-8"))
            tokens += float(r["target_tokens"]) * n_ckpt
            seconds += float(r["seconds"])
            devices.add(str(r.get("device", "?")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return (tokens / seconds, ", ".join(sorted(devices))) if seconds > 0 else None


def plan(cfg: Config, layout: RunLayout, *, pairs: int | None = None, train_tps: float | None = None,
         score_tps: float | None = None, tokens: float | None = None) -> tuple[list[Row], list[str]]:
    """The rows of the plan and the lines said above them (corpus, throughputs and where they come from)."""
    from .slurm import BASELINES, baseline_units, job_resources, shard_count, unit_names

    s = cfg.launch.slurm
    n, n_source = (pairs, "--pairs") if pairs is not None else corpus_pairs(cfg, layout)
    tok, tok_source = (tokens, "--tokens-per-pair") if tokens is not None else (tokens_per_pair(layout),
                                                                                  "this run's prepare")
    n_ckpt = len(cfg.proxy.seeds) * len(cfg.proxy.checkpoints)
    t_tps, t_source = train_tps, "--train-tps"
    if train_tps is None and (got := measured_train_tps(layout)) is not None:
        t_tps, t_source = got[0], f"fairseq's wps in this run's proxy logs, on {got[1]}"
    s_tps, s_source = score_tps, "--score-tps"
    if score_tps is None and (got := measured_score_tps(layout, n_ckpt)) is not None:
        s_tps, s_source = got[0], f"this run's score shards, on {got[1]}"
    gpus_run = job_resources(cfg, "proxy", True).gpus_per_node * job_resources(cfg, "proxy", True).nodes
    said = [f"corpus: {n:,} training pairs ({n_source})",
            f"target tokens per pair: {tok:.1f} ({tok_source})" if tok else
            "target tokens per pair: unknown until prepare has run (or give --tokens-per-pair)",
            f"training: {t_tps:,.0f} target tokens/s per run ({t_source})" if t_tps else
            "training: no measured throughput (this run's proxy logs, or --train-tps)",
            f"scoring: {s_tps:,.0f} target tokens/s per shard ({s_source})" if s_tps else
            "scoring: no measured throughput (this run's score shards, or --score-tps)",
            f"CPU stages: {REFERENCE_SOURCE}" if REFERENCE else "CPU stages: no reference figures"]

    def cpu_hours(stage: str) -> float | None:
        return REFERENCE[stage] * n / 1e5 / 3600 if stage in REFERENCE else None

    def waves(tasks: int) -> int:
        return math.ceil(tasks / max(1, min(tasks, s.array_parallelism)))

    def training(stage: str, updates: int, section: Any, units: list[str]) -> Row:
        # tokens_per_update when set (update_freq then follows the GPUs), else --max-tokens per GPU x update_freq
        per_update = section.tokens_per_update or section.max_tokens * section.update_freq * max(1, gpus_run)
        basis = f"{updates:,} updates x up to {per_update:,} target tokens a task"
        task = updates * per_update / t_tps / 3600 if t_tps else None
        if task is not None:
            basis += f", {waves(len(units))} wave(s) of the array"
        return Row(stage, f"array of {len(units)} + 1 to finish", gpus_run, s.cpus_per_task,
                   None if task is None else task * waves(len(units)), basis, task)

    rows: list[Row] = []
    for stage in STAGES:
        units = unit_names(cfg, stage)
        if stage == "proxy":
            rows.append(training(stage, max(cfg.proxy.checkpoints), cfg.proxy, units))
        elif stage == "train":
            rows.append(training(stage, cfg.train.max_update, cfg.train, units))
        elif stage == "score":
            shards = shard_count(cfg)
            basis = f"{shards} shards x {n_ckpt} checkpoint passes"
            hours = task = None
            if tok:
                work = n * tok * n_ckpt
                basis += f" over {work / 1e9:.2f}G target tokens"
                if s_tps:
                    task = work / shards / s_tps / 3600
                    hours = waves(shards) * task
            base = baseline_units(cfg)
            base_hours = REFERENCE["baselines"] * n / 1e5 / 3600  # the base_* columns' share of the CPU work
            if base:  # the base_* columns in an array of their own, beside proxy training
                b_task = base_hours / len(base)
                rows.append(Row(BASELINES, f"array of {len(base)}", 0, s.cpus_per_task, waves(len(base)) * b_task,
                                f"{REFERENCE['baselines']:.1f} s per 100k pairs over {len(base)} slices; needs "
                                "prepare only, runs beside proxy", b_task, beside=True))
            merge = cpu_hours("score")
            if merge is not None:
                if base:
                    merge -= base_hours
                what = "merge and derived columns" + (" (base_* from the baselines array)" if base else "")
                basis += f"; then {what}: {merge:.2f} h in the finishing job"
                hours = None if hours is None else hours + merge
                task = merge if task is None else max(task, merge)
            rows.append(Row(stage, f"array of {shards} + 1 to finish", job_resources(cfg, stage, True).gpus_per_node,
                            s.cpus_per_task,
                            hours, basis, task))
        elif stage == "prepare" and units:
            # the SentencePiece model and the assembly in one job each; encoding and binarizing in the array
            parts = REFERENCE["prepare_parts"] * n / 1e5 / 3600
            rest = cpu_hours("prepare") - parts
            task = parts / len(units) + rest
            rows.append(Row(stage, f"array of {len(units)} + 1 to finish", 0, s.cpus_per_task,
                            waves(len(units)) * parts / len(units) + rest,
                            f"{REFERENCE['prepare']:.1f} s per 100k pairs in one process, of which "
                            f"{REFERENCE['prepare_parts']:.1f} split over {len(units)} parts", task))
        elif stage == "evaluate":
            rows.append(Row(stage, "1", job_resources(cfg, stage, False).gpus_per_node, s.cpus_per_task, None,
                            "beam search over the test sets, once per model; not estimated"))
        else:
            h = cpu_hours(stage)
            rows.append(Row(stage, "1", 0, s.cpus_per_task, h,
                            f"{REFERENCE[stage]:.1f} s per 100k pairs" if h is not None else "not measured", h))
    return rows, said


def render(cfg: Config, layout: RunLayout, rows: list[Row], said: list[str]) -> str:
    s = cfg.launch.slurm
    out = [f"# mtprune plan for {layout.root} on Slurm: each stage's jobs, what a job holds, estimated hours",
           *[f"#   {line}" for line in said],
           f"#   array tasks at once: {s.array_parallelism}; a job's time limit: {s.time_min} min "
           "(launch.slurm.time_min)", ""]
    head = ("stage", "jobs", "GPUs/job", "CPUs/job", "hours", "basis")
    table = [head] + [(r.stage, r.jobs, str(r.gpus), str(r.cpus), "?" if r.hours is None else f"{r.hours:.2f}",
                       r.basis) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
    for t in table:
        out.append("  ".join(c.ljust(w) for c, w in zip(t[:-1], widths, strict=True)) + "  " + t[-1])
    known = [r.hours for r in rows if r.hours is not None and not r.beside]
    total = sum(known)
    unknown = [r.stage for r in rows if r.hours is None]
    beside = [r.stage for r in rows if r.beside]
    out.append("")
    out.append(f"total of the estimated stages: {total:.1f} h" + (f"; not estimated: {', '.join(unknown)}"
                                                                 if unknown else "")
               + (f"; {', '.join(beside)} runs beside the chain, not counted" if beside else ""))
    long = [f"{r.stage} ({r.task_hours:.1f} h)" for r in rows if r.task_hours is not None
            and r.task_hours * 60 > s.time_min]
    if long:
        out.append(f"jobs longer than launch.slurm.time_min ({s.time_min} min): {', '.join(long)}; raise it, or "
                   "for score, launch.score_shards")
    out.append("print a stage's sbatch script: mtprune slurm-script <stage> -c <config>")
    return "\n".join(out) + "\n"
