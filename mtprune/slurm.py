"""Running stages as cluster jobs through submitit: job arrays for independent units, dependencies
between stages, and plain sbatch scripts for users who submit by hand.

Every job only calls the ``mtprune`` command line on the run's resolved config, so a job does
exactly what the same command typed in a shell would do, and a rerun skips what is finished:
``mtprune proxy --unit seed2`` trains one proxy seed, ``mtprune score --shard 3/8`` scores one
slice, and the plain ``mtprune proxy`` / ``mtprune score`` that follows writes the stage's manifest.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .errors import StageError, UsageError
from .layout import STAGES, RunLayout
from .manifest import atomic_write_text

log = logging.getLogger("mtprune")
GPU_STAGES = ("proxy", "score", "train", "evaluate")


def run_cli(argv: list[str]) -> str:
    """The function every job runs: the mtprune command line, in the job's own process."""
    from .cli import main

    try:
        main.main(argv, prog_name="mtprune", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"mtprune {' '.join(argv)} exited with {e.code}") from None
    return "ok"


def unit_names(cfg: Config, stage: str) -> list[str]:
    """Array tasks of a stage, from the config alone (upstream outputs may not exist yet)."""
    if stage == "proxy":
        return [f"seed{s}" for s in cfg.proxy.seeds]
    if stage == "train":
        from .stages.train import models

        return [name for name, *_ in models(cfg, RunLayout(cfg.run_dir))]
    if stage == "score":
        n = shard_count(cfg)
        return [f"{i}/{n}" for i in range(n)]
    return []


def shard_count(cfg: Config) -> int:
    return cfg.launch.score_shards or cfg.launch.slurm.array_parallelism


def unit_argv(stage: str, unit: str) -> list[str]:
    return ["--shard", unit] if stage == "score" else ["--unit", unit]


def _executor(cfg: Config, layout: RunLayout, stage: str, kind: str) -> tuple[Any, dict[str, str]]:
    """(submitit executor, the sbatch options a dependency is added to)."""
    import submitit

    folder = layout.root / "slurm" / stage
    s = cfg.launch.slurm
    if kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=s.time_min)
        return ex, {}
    if shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm needs Slurm's sbatch on PATH; on a machine without Slurm use "
                         "--launcher local, or `mtprune slurm-script STAGE` to write scripts to submit elsewhere")
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: dict[str, Any] = {
        "name": f"mtprune-{stage}", "timeout_min": s.time_min, "nodes": 1, "tasks_per_node": 1,
        "cpus_per_task": s.cpus_per_task, "mem_gb": s.mem_gb, "slurm_array_parallelism": s.array_parallelism}
    if stage in GPU_STAGES and s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.partition:
        params["slurm_partition"] = s.partition
    extra = dict(e.split("=", 1) for e in s.extra)
    if s.account:
        extra["account"] = s.account
    if s.qos:
        extra["qos"] = s.qos
    extra["kill-on-invalid-dep"] = "yes"  # a failed upstream job cancels its dependants
    params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex, extra


@dataclass
class Submitted:
    stage: str
    argv: list[str]
    job_id: str
    folder: str


def _submit(executor: tuple[Any, dict[str, str]], argvs: list[list[str]], after: list[str], kind: str,
            stage: str) -> tuple[list[Submitted], list[Any]]:
    ex, extra = executor
    if kind == "slurm":
        deps = {"dependency": "afterok:" + ":".join(after)} if after else {}
        ex.update_parameters(slurm_additional_parameters={**extra, **deps})
    jobs = ex.map_array(run_cli, argvs) if len(argvs) > 1 else [ex.submit(run_cli, argvs[0])]
    return [Submitted(stage, a, str(j.job_id), str(ex.folder)) for a, j in zip(argvs, jobs, strict=True)], jobs


def submit(cfg: Config, layout: RunLayout, kind: str, stages: tuple[str, ...] = STAGES) -> list[Submitted]:
    """Submit every stage of ``stages`` from the first one that is not fresh, each depending on the one before.

    On Slurm the whole chain is queued at once and this returns; with submitit's local executor
    (no dependencies there) each stage's jobs are awaited before the next stage is submitted.
    """
    from .pipeline import Freshness, save_resolved_config

    save_resolved_config(cfg, layout)
    config_file = str(layout.resolved_config.resolve())
    fresh = Freshness(cfg, layout)
    submitted: list[Submitted] = []
    after: list[str] = []
    started = False
    for stage in stages:
        if not started and fresh(stage).fresh:
            continue
        started = True  # everything downstream of a stage that runs is resubmitted (it may be skipped)
        # --launcher local: the job does the work itself instead of submitting more jobs
        base = [stage, "-c", config_file, "--launcher", "local"]
        ex = _executor(cfg, layout, stage, kind)
        units = unit_names(cfg, stage)
        if units:
            recs, jobs = _submit(ex, [base + unit_argv(stage, u) for u in units], after, kind, stage)
            submitted += recs
            if kind == "submitit-local":
                _wait(jobs, stage)
            after = [r.job_id for r in recs]
        recs, jobs = _submit(ex, [base], after, kind, stage)
        submitted += recs
        if kind == "submitit-local":
            _wait(jobs, stage)
        after = [r.job_id for r in recs]
        log.info("%s: submitted job(s) %s", stage, ", ".join(r.job_id for r in submitted if r.stage == stage))
    record = layout.root / "slurm" / "jobs.json"
    old = json.loads(record.read_text()) if record.exists() else []
    atomic_write_text(record, json.dumps(old + [r.__dict__ for r in submitted], indent=1))
    return submitted


def _wait(jobs: list[Any], stage: str) -> None:
    for j in jobs:
        try:
            j.result()
        except Exception as e:  # submitit wraps the job's own error
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise StageError(f"{stage}: job {j.job_id} failed: {last[:300]} (logs: {j.paths.stderr})") from None


def job_states(layout: RunLayout) -> list[tuple[str, str, str, str]]:
    """(stage, job id, state, command) of every recorded job, read from submitit's job folders."""
    import pickle

    record = layout.root / "slurm" / "jobs.json"
    if not record.exists():
        return []
    out = []
    for r in json.loads(record.read_text()):
        folder = Path(r["folder"])
        jid = r["job_id"]
        results = list(folder.glob(f"{jid}_*result.pkl")) + list(folder.glob(f"{jid}_result.pkl"))
        if results:
            try:
                with open(results[0], "rb") as f:
                    state = "done" if pickle.load(f)[0] == "success" else "failed"
            except Exception:  # a half-written result file
                state = "unknown"
        elif list(folder.glob(f"{jid}_*log.out")) or list(folder.glob(f"{jid}_log.out")):
            state = "running"
        else:
            state = "queued"
        out.append((r["stage"], jid, state, " ".join(r["argv"][:1] + r["argv"][5:])))
    return out


# ---- plain sbatch scripts ----------------------------------------------------------------------

def sbatch_script(cfg: Config, layout: RunLayout, stage: str, config_file: str) -> str:
    """A self-contained sbatch script for one stage (a job array where the stage has units)."""
    if stage not in STAGES:
        raise UsageError(f"slurm-script: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    s = cfg.launch.slurm
    units = unit_names(cfg, stage)
    lines = ["#!/bin/bash", f"#SBATCH --job-name=mtprune-{stage}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}", f"#SBATCH --mem={s.mem_gb}G",
             f"#SBATCH --time={s.time_min}", f"#SBATCH --output={layout.root}/slurm/{stage}/%A_%a.out"]
    if stage in GPU_STAGES and s.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH --{e.split('=', 1)[0]}={e.split('=', 1)[1]}" for e in s.extra]
    if units:
        lines.append(f"#SBATCH --array=0-{len(units) - 1}%{s.array_parallelism}")
    lines += ["", "set -euo pipefail", f"mkdir -p {shlex.quote(str(layout.root / 'slurm' / stage))}",
              f"CONFIG={shlex.quote(config_file)}"]
    cmd = f"mtprune {stage} -c \"$CONFIG\" --launcher local"
    if units:
        quoted = " ".join(shlex.quote(u) for u in units)
        flag = "--shard" if stage == "score" else "--unit"
        lines += [f"UNITS=({quoted})", f"srun {cmd} {flag} \"${{UNITS[$SLURM_ARRAY_TASK_ID]}}\"",
                  f"# when every array task has finished, `{cmd}` (no {flag}) writes the stage's manifest"]
    else:
        lines.append(f"srun {cmd}")
    return "\n".join(lines) + "\n"


def wait_note(submitted: list[Submitted]) -> str:
    last = submitted[-1].job_id if submitted else "-"
    return (f"submitted {len(submitted)} job(s); the sweep ends with job {last}. "
            f"`mtprune status` shows where it stands ({time.strftime('%H:%M:%S')})")
