"""Running stages as cluster jobs through submitit: job arrays for independent units, dependencies
between stages, and plain sbatch scripts for users who submit by hand.

Why one long module: submitting through submitit and printing an sbatch script must give the same command
line and options; they share one builder here, with the job records `status` reads.

Every job runs the ``mtprune`` command line in a process of its own, exactly as a user would type
it, so a job does what the same command typed in a shell would do, and a rerun skips what is
finished: ``mtprune proxy --unit seed2`` trains one proxy seed, ``mtprune score --shard 3/8`` scores
one slice, and the plain ``mtprune proxy`` / ``mtprune score`` that follows writes the stage's manifest.

Jobs read a config snapshot that belongs to the submission (``<run>/slurm/config-<sha>.yaml``,
named by its content and never rewritten), not ``<run>/config.resolved.yaml``: that one names what
the finished artifacts came from and changes whenever a local run finishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .errors import StageError, UsageError
from .layout import STAGES, RunLayout
from .manifest import atomic_write_text

log = logging.getLogger("mtprune")
UNIT_STAGES = ("prepare", "proxy", "score", "train")  # stages whose units run as a job array


# ---- paths of the launch records (all under <run>/slurm/) ----------------------------------------

def slurm_dir(layout: RunLayout) -> Path:
    return layout.root / "slurm"


def job_folder(layout: RunLayout, stage: str) -> Path:
    """submitit's folder for one stage's jobs (scripts, pickles, logs)."""
    return slurm_dir(layout) / stage


def jobs_record(layout: RunLayout) -> Path:
    return slurm_dir(layout) / "jobs.json"


def config_snapshot(cfg: Config, layout: RunLayout) -> Path:
    """Write the config a submission's jobs read, named by the hash of its content.

    A snapshot is never rewritten (the same config maps to the same file), so neither a later
    submission with other settings nor a local run that fails can change what queued jobs read.
    """
    import yaml

    tree = cfg.to_dict()
    # a job runs its stage itself: the same settings give the same snapshot, submitted or scripted
    tree["launch"]["launcher"] = "local"
    text = yaml.safe_dump(tree, sort_keys=False)
    path = slurm_dir(layout) / f"config-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path.resolve()


# ---- what a job runs ---------------------------------------------------------------------------

def unit_names(cfg: Config, stage: str) -> list[str]:
    """Array tasks of a stage, from the config alone (upstream outputs may not exist yet)."""
    if stage == "proxy":
        from .stages.proxy import unit_names as proxy_units

        return proxy_units(cfg)  # seed<k>, and reverse-seed<k> with proxy.dual
    if stage == "train":
        from .stages.train import seed_models

        return [m.run for m in seed_models(cfg, RunLayout(cfg.run_dir))]
    if stage == "score":
        n = shard_count(cfg)
        return [f"{i}/{n}" for i in range(n)]
    if stage == "prepare":
        n = prepare_part_count(cfg)
        return [f"{i}/{n}" for i in range(n)] if n > 1 else []
    return []


def shard_count(cfg: Config) -> int:
    return cfg.launch.score_shards or cfg.launch.slurm.array_parallelism


def prepare_part_count(cfg: Config) -> int:
    """Parts of prepare's CPU array (``prepare --shard I/N``): 1 means one prepare job and no array."""
    return cfg.launch.prepare_shards or cfg.launch.slurm.array_parallelism


# the score stage's second job array: `score --baselines I/N`, the base_* columns of a slice, on CPUs; it needs
# the prepare stage only, so it runs beside the proxy training, and the job finishing the score stage waits for it
BASELINES = "score-baselines"


def baseline_units(cfg: Config) -> list[str]:
    """The ``score --baselines I/N`` array tasks (one slice per score shard), none when ``score.baselines`` is off."""
    if not cfg.score.baselines:
        return []
    n = shard_count(cfg)
    return [f"{i}/{n}" for i in range(n)]


def unit_argv(stage: str, unit: str) -> list[str]:
    if stage == BASELINES:
        return ["--baselines", unit]
    return ["--shard", unit] if stage in ("prepare", "score") else ["--unit", unit]


def job_argv(stage: str, config_file: Path, layout: RunLayout, unit: str | None = None) -> list[str]:
    """The mtprune arguments of one job. ``--launcher local``: the job does the work itself
    instead of submitting more jobs."""
    command = "score" if stage == BASELINES else stage
    argv = [command, "-c", str(config_file), "--run-dir", str(layout.root.resolve()), "--launcher", "local"]
    return argv + (unit_argv(stage, unit) if unit is not None else [])


def job_command(argv: list[str]) -> list[str]:
    """The command line a job runs: this Python's ``mtprune``, as typed in a shell."""
    return [sys.executable, "-m", "mtprune", *argv]


def short_command(argv: list[str]) -> str:
    """``proxy --unit seed2`` for a job's argv: without the config, run directory and launcher."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-c", "--config", "--run-dir", "--launcher"):
            skip = True
        else:
            out.append(a)
    return " ".join(out)


@dataclass(frozen=True)
class MtpruneJob:
    """The callable every submitit job runs: ``python -m mtprune <argv>`` in a process of its own.

    Like submitit's ``CommandFunction``, but streaming the command's output to the job's log as
    it comes (a training run writes for hours; CommandFunction holds all of it in memory and
    decodes it in 64 KiB pieces, which fails on a UTF-8 character cut in two) and keeping only the
    last lines for the error of a failed job.
    """

    argv: tuple[str, ...]
    cwd: str = field(default_factory=os.getcwd)

    @property
    def command(self) -> list[str]:
        return job_command(list(self.argv))

    def __call__(self) -> str:
        print(f"running: {shlex.join(self.command)}", flush=True)
        tail: deque[str] = deque(maxlen=20)
        with subprocess.Popen(self.command, cwd=self.cwd, stderr=subprocess.PIPE) as proc:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", errors="replace")
                sys.stderr.write(line)
                sys.stderr.flush()
                if line.strip():
                    tail.append(line.strip())
        if proc.returncode:
            last = tail[-1] if tail else "no error output"
            raise RuntimeError(f"`mtprune {short_command(list(self.argv))}` exited with {proc.returncode}: {last}")
        return "ok"


# ---- resources: the one source for submitit jobs and sbatch scripts ----------------------------

@dataclass(frozen=True)
class Resources:
    """What one job holds: ``nodes`` x ``tasks_per_node`` tasks, ``gpus_per_node`` GPUs on each node."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0

    @property
    def multi_node(self) -> bool:
        """The job's one mtprune process starts fairseq-train on every task itself, through srun
        (fairseq_backend.slurm_train_argv); the job's command is not started through srun."""
        return self.nodes > 1


def run_gpus(cfg: Config) -> int:
    """GPUs a proxy seed or retraining run trains on per node: ``launch.gpus_per_run``, none on a cluster
    without GPUs (``launch.slurm.gpus_per_node: 0``)."""
    s, per_run = cfg.launch.slurm, cfg.launch.gpus_per_run
    if s.nodes > 1 and not s.gpus_per_node:
        raise UsageError(f"launch.slurm.nodes: training across {s.nodes} nodes needs GPUs (fairseq starts one "
                         "process per GPU), but launch.slurm.gpus_per_node is 0; set it or launch.slurm.nodes=1")
    if not s.gpus_per_node:
        return 0
    if per_run > s.gpus_per_node:
        raise UsageError(f"launch.gpus_per_run: {per_run} GPUs per run, but a job may hold "
                         f"launch.slurm.gpus_per_node={s.gpus_per_node} per node")
    return per_run


def job_resources(cfg: Config, stage: str, unit: bool) -> Resources:
    """The resources of one job: a score shard scores on one GPU; a proxy seed or retraining run trains on
    ``launch.gpus_per_run`` GPUs, on each of ``launch.slurm.nodes`` nodes (one task per GPU when there
    are several nodes: fairseq's Slurm init reads its rank from the task); evaluate decodes on
    ``launch.slurm.gpus_per_node``; the CPU stages and the jobs that only finish a stage (merge shards,
    write the manifest) hold none, but the score merge with ``score.target`` (the domain columns) holds one. A single-node job is one task whatever its GPUs: fairseq-train
    spawns one process per GPU itself there."""
    s = cfg.launch.slurm
    if not unit and stage == "score" and cfg.score.target.enabled:
        # the merge computes the domain columns: a fine-tuning per proxy seed and a pass over the corpus, on one GPU
        return Resources(gpus_per_node=min(1, s.gpus_per_node))
    if not unit or stage in (BASELINES, "prepare"):
        return Resources(gpus_per_node=s.gpus_per_node if stage == "evaluate" else 0)
    if stage == "score":
        return Resources(gpus_per_node=min(1, s.gpus_per_node))
    gpus = run_gpus(cfg)
    if s.nodes > 1:
        return Resources(nodes=s.nodes, tasks_per_node=gpus, gpus_per_node=gpus)
    return Resources(gpus_per_node=gpus)


def check_launch(cfg: Config, stages: tuple[str, ...]) -> None:
    """UsageError, before anything is touched, for GPU and node settings that training in ``stages``
    cannot honour: ``launch.slurm.nodes`` > 1 without Slurm (a job of a multi-node submission runs
    ``--launcher local`` inside its allocation, which is fine) or through submitit's local executor;
    on Slurm, more GPUs per run than a job may hold, or several nodes without GPUs."""
    if not set(stages) & {"proxy", "train"}:
        return
    s, launcher = cfg.launch.slurm, cfg.launch.launcher
    if s.nodes > 1 and (launcher == "submitit-local" or (launcher == "local" and "SLURM_JOB_ID" not in os.environ)):
        raise UsageError(f"launch.slurm.nodes: {s.nodes} nodes need Slurm (--launcher slurm, or the scripts of "
                         f"`mtprune slurm-script`); --launcher {launcher} trains on this machine only, "
                         "so set launch.slurm.nodes=1 here")
    if launcher == "slurm":
        run_gpus(cfg)


def sbatch_options(cfg: Config, stage: str, *, unit: bool) -> dict[str, str]:
    """sbatch long options (without ``--``) of one stage's jobs (``unit``: a job array task), from
    ``launch.slurm`` and ``job_resources``.

    Both the submitit jobs and ``slurm-script`` take their resources from here, so they cannot
    drift apart; ``launch.slurm.extra`` comes last and wins.
    """
    s = cfg.launch.slurm
    r = job_resources(cfg, stage, unit)
    opts = {"job-name": f"mtprune-{stage}", "nodes": str(r.nodes), "ntasks-per-node": str(r.tasks_per_node),
            "cpus-per-task": str(s.cpus_per_task), "mem": f"{s.mem_gb}G", "time": str(s.time_min)}
    if r.gpus_per_node:
        opts["gpus-per-node"] = str(r.gpus_per_node)
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
        if value:
            opts[key] = value
    opts["kill-on-invalid-dep"] = "yes"  # a failed upstream job cancels its dependants
    for e in s.extra:
        key, value = e.split("=", 1)
        opts[key.strip().lstrip("-").replace("_", "-")] = value.strip()
    return opts


def through_srun(cfg: Config, stage: str, unit: bool) -> bool:
    """Whether the job's command starts through srun (submitit's default): not in a multi-node job,
    whose mtprune process runs once, in the batch script, and starts srun for fairseq-train itself
    (a step around the command would hold the GPUs that fairseq-train's step needs)."""
    return not job_resources(cfg, stage, unit).multi_node


def array_option(n_tasks: int, parallelism: int) -> str:
    """``--array`` as submitit writes it for ``map_array``."""
    return f"0-{n_tasks - 1}%{min(n_tasks, parallelism)}"


def sbatch_line(key: str, value: str) -> str:
    return f"#SBATCH --{key}={shlex.quote(value)}"  # quoted as submitit quotes it


# ---- submitting --------------------------------------------------------------------------------

def local_gpu_parameters() -> dict[str, Any]:
    """submitit's LocalExecutor gives its jobs ``CUDA_VISIBLE_DEVICES`` of ``gpus_per_node`` GPUs, none
    by default: without these, every submitit-local job would train on CPU. Its jobs see the GPUs this
    process sees (and share them out among their units as a local run does)."""
    from . import gpus

    vis = gpus.visible()
    if not vis:
        return {}
    if all(v.isdigit() for v in vis):
        return {"gpus_per_node": len(vis), "visible_gpus": tuple(int(v) for v in vis)}
    # GPU UUIDs (CUDA_VISIBLE_DEVICES=GPU-...): submitit takes integers only, so set them in the job's shell
    return {"setup": [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(vis))}"]}


def _executor(cfg: Config, layout: RunLayout, stage: str, kind: str) -> Any:
    import submitit

    folder = job_folder(layout, stage)
    s = cfg.launch.slurm
    if kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=s.time_min, **local_gpu_parameters())
        return ex
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    ex.update_parameters(timeout_min=s.time_min, slurm_array_parallelism=s.array_parallelism)
    return ex


@dataclass
class Submitted:
    stage: str
    argv: list[str]
    job_id: str
    folder: str
    launcher: str = "slurm"


def _submit(cfg: Config, ex: Any, kind: str, stage: str, argvs: list[list[str]], after: list[str],
            unit: bool) -> tuple[list[Submitted], list[Any]]:
    if kind == "slurm":
        # every sbatch option comes from sbatch_options (submitit's own names are the same with '_')
        opts = sbatch_options(cfg, stage, unit=unit)
        if after:
            opts["dependency"] = "afterok:" + ":".join(after)
        ex.update_parameters(slurm_additional_parameters={k.replace("-", "_"): v for k, v in opts.items()},
                             slurm_use_srun=through_srun(cfg, stage, unit))
    with ex.batch():  # several jobs: one job array
        jobs = [ex.submit(MtpruneJob(tuple(a))) for a in argvs]
    return [Submitted(stage, a, str(j.job_id), str(ex.folder), kind) for a, j in zip(argvs, jobs, strict=True)], jobs


def submit(cfg: Config, layout: RunLayout, kind: str, stages: tuple[str, ...] = STAGES) -> list[Submitted]:
    """Submit every stage of ``stages`` from the first one that is not fresh, each depending on the one before.

    On Slurm the whole chain is queued at once and this returns; with submitit's local executor
    (no dependencies there) each stage's jobs are awaited before the next stage is submitted.
    """
    from .pipeline import Freshness

    if kind == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm needs Slurm's sbatch on PATH; on a machine without Slurm use "
                         "--launcher local, or `mtprune slurm-script STAGE` to write scripts to submit elsewhere")
    check_launch(cfg, stages)
    fresh = Freshness(cfg, layout)
    todo = list(stages)
    while todo and fresh(todo[0]).fresh:
        todo.pop(0)
    if not todo:
        return []
    # everything downstream of a stage that runs is resubmitted (its job skips it if it is fresh then)
    config_file = config_snapshot(cfg, layout)
    log.info("jobs read the config snapshot %s", config_file)
    submitted: list[Submitted] = []
    after: list[str] = []
    finished_by: dict[str, list[str]] = {}  # stage -> the job ids that finish it in this submission
    for stage in todo:
        units = unit_names(cfg, stage)
        # (job kind, argvs, array?, depends on): a stage's array after the stage before, its finishing job after
        # the array; the score stage's baseline slices after prepare only, and its finishing job after them too
        groups: list[tuple[str, list[list[str]], bool, list[str]]] = []
        if units:
            groups.append((stage, [job_argv(stage, config_file, layout, u) for u in units], True, after))
        if stage == "score" and (base := baseline_units(cfg)):
            groups.append((BASELINES, [job_argv(BASELINES, config_file, layout, u) for u in base], True,
                           finished_by.get("prepare", [])))
        arrays: list[str] = []  # the finishing job waits for every array of the stage, or for the stage before
        ids: list[str] = []
        for kind_name, argvs, unit, deps in groups + [(stage, [job_argv(stage, config_file, layout)], False, [])]:
            ex = _executor(cfg, layout, kind_name, kind)
            recs, jobs = _submit(cfg, ex, kind, kind_name, argvs, deps if unit else arrays or after, unit)
            submitted += recs
            _record(layout, recs)
            if kind == "submitit-local":
                _wait(jobs, kind_name)
            ids += [r.job_id for r in recs]
            if unit:
                arrays += [r.job_id for r in recs]
            else:
                after = finished_by[stage] = [r.job_id for r in recs]
        log.info("%s: submitted job(s) %s", stage, ", ".join(ids))
    return submitted


def _record(layout: RunLayout, recs: list[Submitted]) -> None:
    record = jobs_record(layout)
    old = json.loads(record.read_text()) if record.exists() else []
    atomic_write_text(record, json.dumps(old + [r.__dict__ for r in recs], indent=1))


def _wait(jobs: list[Any], stage: str) -> None:
    """Wait for every job (none is left running when this returns), then raise the first failure."""
    failure: StageError | None = None
    for j in jobs:
        try:
            j.result()
        except Exception as e:  # submitit wraps the job's own error (MtpruneJob's) in its traceback
            lines = str(e).strip().splitlines() or [type(e).__name__]
            ours = [ln.removeprefix("RuntimeError: ") for ln in lines if ln.startswith("RuntimeError: `mtprune ")]
            reason = ours[-1] if ours else lines[0]
            failure = failure or StageError(f"{stage}: job {j.job_id} failed: {reason[:300]} (logs: {j.paths.stderr})")
    if failure is not None:
        raise failure


# ---- job states --------------------------------------------------------------------------------

SLURM_STATES = {"PENDING": "queued", "REQUEUED": "queued", "CONFIGURING": "queued", "RESIZING": "queued",
                "SUSPENDED": "queued", "RUNNING": "running", "COMPLETING": "running", "COMPLETED": "done",
                "FAILED": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "oom",
                "TIMEOUT": "timeout", "DEADLINE": "timeout", "PREEMPTED": "preempted", "CANCELLED": "cancelled"}


def _state(job: Any, slurm_state: str | None) -> str:
    if slurm_state and slurm_state.split()[0].upper() in SLURM_STATES:  # "CANCELLED by 1234"
        return SLURM_STATES[slurm_state.split()[0].upper()]
    # Slurm cannot tell (a local job, no sacct, a job gone from accounting): submitit's own outcome
    if job.paths.result_pickle.exists():
        return "done" if job.exception() is None else "failed"
    return "started" if job.paths.stdout.exists() else "queued"


def job_states(layout: RunLayout) -> list[tuple[str, str, str, str]]:
    """(stage, job id, state, command) of every recorded job, as Slurm (sacct) or submitit reports it."""
    record = jobs_record(layout)
    if not record.exists():
        return []
    import submitit

    records = json.loads(record.read_text())
    jobs = [(submitit.LocalJob if r.get("launcher") == "submitit-local" else submitit.SlurmJob)(
        folder=r["folder"], job_id=r["job_id"]) for r in records]
    slurm_jobs = [j for j in jobs if isinstance(j, submitit.SlurmJob)]
    ask_slurm = bool(slurm_jobs) and shutil.which("sacct") is not None
    if ask_slurm:
        slurm_jobs[0].get_info(mode="force")  # one sacct call answers for every job registered above
    out = []
    for r, j in zip(records, jobs, strict=True):
        asked = ask_slurm and isinstance(j, submitit.SlurmJob)
        slurm_state = j.get_info(mode="cache").get("State") if asked else None
        out.append((r["stage"], r["job_id"], _state(j, slurm_state), short_command(r["argv"])))
    return out


# ---- plain sbatch scripts ----------------------------------------------------------------------

def sbatch_script(cfg: Config, layout: RunLayout, stage: str, config_file: Path, *, finish: bool = False,
                  baselines: bool = False) -> str:
    """A self-contained sbatch script for one stage: the same command line and sbatch options as
    the job submitit would submit (a job array where the stage has units; ``finish``: the job
    after the array, which merges the units and writes the manifest; ``baselines``: the score stage's
    CPU array of ``score --baselines I/N``)."""
    if stage not in STAGES:
        raise UsageError(f"slurm-script: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    if baselines:
        if stage != "score" or finish:
            raise UsageError("slurm-script: --baselines is the score stage's CPU array: `slurm-script score "
                             "--baselines`, without --finish")
        from .stages.score import require_baselines

        require_baselines(cfg, "slurm-script score --baselines")
        stage = BASELINES
    units = [] if finish else (baseline_units(cfg) if baselines else unit_names(cfg, stage))
    if finish and stage not in UNIT_STAGES:
        raise UsageError(f"slurm-script {stage}: --finish is for the stages with a job array "
                         f"({', '.join(UNIT_STAGES)}); `slurm-script {stage}` is the whole stage")
    folder = job_folder(layout, stage).resolve()
    opts = sbatch_options(cfg, stage, unit=bool(units))
    srun = "srun " if through_srun(cfg, stage, bool(units)) else ""
    if units:
        opts["array"] = array_option(len(units), cfg.launch.slurm.array_parallelism)
    opts["output"] = f"{folder}/%A_%a.out" if units else f"{folder}/%j.out"
    lines = ["#!/bin/bash"] + [sbatch_line(k, v) for k, v in opts.items()]
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}  # relative paths in the config"]
    if units:
        quoted = " ".join(shlex.quote(u) for u in units)
        flag = unit_argv(stage, "")[0]
        cmd = shlex.join(job_command(job_argv(stage, config_file, layout)))
        if not srun:
            lines.append(f"# one mtprune process; it starts fairseq-train on all {opts['nodes']} nodes x "
                         f"{opts['ntasks-per-node']} tasks through srun")
        lines += [f"UNITS=({quoted})", f"{srun}{cmd} {flag} \"${{UNITS[$SLURM_ARRAY_TASK_ID]}}\""]
        if stage == BASELINES:
            lines.append("# needs the prepare stage only (submit it beside the proxy array); `mtprune slurm-script "
                         "score --finish` waits for this array and the score array")
        else:
            lines.append(f"# when every array task has finished, `mtprune slurm-script {stage} --finish` is the job "
                         "that writes the stage's manifest")
            if stage == "score" and cfg.score.baselines:
                lines.append("# the base_* columns: `mtprune slurm-script score --baselines`, a CPU array the "
                             "finishing job waits for too (without it, that job computes them itself)")
    else:
        lines.append(f"{srun}{shlex.join(job_command(job_argv(stage, config_file, layout)))}")
    return "\n".join(lines) + "\n"
