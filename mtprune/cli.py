"""The ``mtprune`` command: one thin command per stage, plus ``sweep`` and ``status``.

Heavy libraries (torch, fairseq, datasets) are imported inside the stages, so ``--help`` is instant.

Why one long module: it is the whole command line -- every command's options, help and exit codes, and the
one template the stage commands are made from -- which a user meets as one thing (``mtprune --help``).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import Config, load_config
from .errors import MtpruneError, UsageError
from .layout import EXTRA_STAGES, STAGES, RunLayout, last_run

log = logging.getLogger("mtprune")

STAGE_HELP = {
    "download": "Fetch OPUS-100 pairs (hub, local:DIR or synthetic), clean, subsample; write 01_download/.",
    "prepare": "Train the joint SentencePiece model, tag sources, binarize with fairseq; write 02_prepare/.",
    "proxy": "Train one short proxy model per seed, keeping the checkpoints listed in proxy.checkpoints.",
    "score": ("Score every training pair with the proxy checkpoints: EL2N (token mean, max, end of sentence, "
              "length-debiased), NLL, GraNd, TracIn, prototype distance, a combined rank and free base_* baselines, "
              "averaged over checkpoints and seeds; write 04_score/. With noise labelled by the download, "
              "04_score/noise.md ranks every score by AUROC per kind of noise beside -length."),
    "prune": "Drop a fraction of the training pairs per strategy and sparsity; binarize what is kept.",
    "train": "Train the final model on each pruned corpus and on the full one (strategy 'full').",
    "evaluate": "Translate each pair's test split with beam search; BLEU and chrF with sacrebleu.",
    "report": "Results table, BLEU-vs-sparsity plot, score histograms, stability and example pairs.",
}


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose and not quiet:  # fairseq's own lines on the terminal too, not only in each unit's train.log
        from .fairseq_backend import SHOW_FAIRSEQ

        os.environ[SHOW_FAIRSEQ] = "1"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mtprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # other libraries' warnings still reach stderr; and with a handler in place, logging.basicConfig is a no-op:
    # fairseq's model registry imports a module that calls basicConfig(level=DEBUG), which flooded our output
    # with filelock's DEBUG lines once fairseq was loaded in-process
    other = logging.StreamHandler(sys.stderr)
    other.setFormatter(logging.Formatter("%(asctime)s | %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().handlers[:] = [other]
    logging.getLogger().setLevel(logging.WARNING)


def _fail(label: str, err: MtpruneError) -> None:
    click.echo(f"mtprune {label}: error: {err}", err=True)
    sys.exit(err.exit_code)


def _exit_now(code: int) -> None:
    """Exit without joining threads: a unit's thread waits on its fairseq-train until that ends, and Python's exit
    would wait for it (training on, the command hanging after Ctrl-C). The trainers die with this process
    (children.die_with_parent); what a stage leaves is what a killed one leaves, which a rerun resumes."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def guarded(label: str, fn: Callable[[], Any], verbose: int = 0) -> Any:
    """Run ``fn``; turn known errors into one line and an exit code, never a traceback."""
    try:
        return fn()
    except MtpruneError as e:
        _fail(label, e)
    except KeyboardInterrupt:
        click.echo(f"mtprune {label}: interrupted; rerun the same command to continue", err=True)
        _exit_now(130)
    except BrokenPipeError:  # `mtprune status | head`: the reader has what it wanted
        sys.stderr.close()
        os._exit(0)
    except PermissionError as e:
        _fail(label, UsageError(f"permission denied: {e.filename or e}"))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            _fail(label, MtpruneError(f"no space left on device writing {e.filename or ''}"))
        if verbose:
            traceback.print_exc()
        where = f" ({e.filename})" if e.filename else ""
        _fail(label, MtpruneError(f"{e.strerror or type(e).__name__}{where}"))
    except Exception as e:  # a bug or an unforeseen failure: one line, traceback with -v
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with -v for the traceback)"
        click.echo(f"mtprune {label}: failed: {type(e).__name__}: {str(e).strip()[:500]}{hint}", err=True)
        sys.exit(1)


def check_existing_run_dir(root: Path) -> None:
    """For commands that only read a run directory (status, a dry run): one line when a file stands in its path."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"run directory {root}: {probe} is a file, not a directory")


def check_run_dir(root: Path) -> None:
    """Create the run directory, or say in one line why it cannot be (a file in the way, no permission)."""
    check_existing_run_dir(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"run directory {root} cannot be created ({e.strerror}: {e.filename})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"run directory {root} is not writable (Permission denied: {root})")


def find_run_config(run_dir: str | None) -> Path | None:
    """For commands that look at a finished run (status, report, config) given no ``-c``: the resolved config
    of the run in ``--run-dir``, else of the default run directory, else of the last run used."""
    candidates = [Path(run_dir)] if run_dir is not None else [Path(load_config().run_dir)]
    if run_dir is None:
        last = last_run()
        candidates += [last] if last is not None else []
    for root in candidates:
        if RunLayout(root).resolved_config.is_file():
            return RunLayout(root).resolved_config
    return None


def where_it_ran(label: str, cfg: Any, root: Path, with_run_dir: Callable[[str], Any]) -> Any:
    """A run found without ``-c`` (``find_run_config``) in ``root`` whose config names its ``run_dir`` relative to
    the directory it was run in: work from that directory (its other relative paths, the data files, are relative
    to it too), or, where ``root`` does not end in ``run_dir``, take ``root`` as the run directory."""
    root = root.resolve()
    if Path(cfg.run_dir).resolve() == root:
        return cfg
    parts = Path(cfg.run_dir).parts
    if not Path(cfg.run_dir).is_absolute() and root.parts[-len(parts):] == parts:
        origin = root.parents[len(parts) - 1]
        log.info("%s: the run in %s was run from %s: its relative paths are read from there", label, root, origin)
        os.chdir(origin)
        return cfg
    return guarded(label, lambda: with_run_dir(str(root)))


def config_options(f: Callable[..., Any], writes: bool = True, finds_run: bool = False) -> Callable[..., Any]:
    """The options every command shares. ``finds_run``: without ``-c``, read the config of the run in
    ``--run-dir``, the default run directory or the last run used (``find_run_config``), and say which."""

    @click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                  help="YAML config file (see configs/). Without it, built-in defaults"
                       + (", or the config of the run in --run-dir, ./runs/default or the last run used "
                          "(its config.resolved.yaml)." if finds_run else "."))
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value; VALUE is YAML: --set prune.sparsities=[0.1,0.3]. Repeatable.")
    @click.option("--run-dir", default=None, type=click.Path(file_okay=False),
                  help="Run directory, relative to the current one [default: run_dir of the config; "
                       "runs/default without one].")
    @click.option("-v", "--verbose", count=True,
                  help="-v: fairseq's output on the terminal too (always in each unit's train.log) and tracebacks of "
                       "failures; -vv: debug logging.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @functools.wraps(f)
    def wrapper(config_path: str | None, overrides: tuple[str, ...], run_dir: str | None, verbose: int,
                quiet: bool, **kw: Any) -> Any:
        _setup_logging(verbose, quiet)
        label = f.__name__.rstrip("_").replace("_", "-")  # the command as typed: slurm-script
        found = None
        if finds_run and config_path is None:
            found = find_run_config(run_dir)
            if found is not None:
                log.info("%s: no -c given: reading the config of the run in %s (%s)", label, found.parent, found.name)
                config_path = str(found)
        cfg = guarded(label, lambda: load_config(config_path, overrides, run_dir))
        if finds_run and found is not None and run_dir is None:
            cfg = where_it_ran(label, cfg, found.parent, lambda root: load_config(config_path, overrides, root))
        kw_config = {"config_path": config_path} if "config_path" in inspect.signature(f).parameters else {}
        layout = RunLayout(cfg.run_dir)
        if writes and not kw.get("dry_run"):
            guarded(label, lambda: check_run_dir(layout.root))
        return f(cfg=cfg, layout=layout, verbose=verbose, **kw_config, **kw)

    return wrapper


# one line each in `mtprune --help`, in the order a run goes through them
SHORT_HELP = {
    "download": "1. fetch and clean the parallel data (OPUS-100 hub, local copy, your files, synthetic)",
    "prepare": "2. SentencePiece model and fairseq binarized data",
    "proxy": "3. short proxy trainings, one per seed",
    "score": "4. score every training pair (EL2N, NLL, ... ) with the proxy checkpoints",
    "prune": "5. drop a fraction of the pairs per strategy and sparsity",
    "train": "6. train a model on each pruned corpus and on the full one",
    "evaluate": "7. BLEU and chrF of every model on the test sets",
    "report": "8. results table, plots, noise found, example pairs",
    "sweep": "all stages in order, skipping fresh ones (--dry-run: what would run)",
    "status": "where a run stands: each stage fresh, stale (why), incomplete or missing",
    "config": "print the resolved config, defaults included",
    "export": "pruned corpora as plain text and every score as TSV, for other toolkits",
    "slurm-script": "a plain sbatch script for one stage; without one, the sweep's plan and hours",
}


class PipelineOrder(click.Group):
    """Commands listed in ``SHORT_HELP``'s order (the pipeline's), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: list(SHORT_HELP).index(n) if n in SHORT_HELP else len(SHORT_HELP))


@click.group(cls=PipelineOrder,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "show_default": True})
@click.version_option(__version__, prog_name="mtprune")
def main() -> None:
    """Prune machine-translation training data by EL2N and measure what it costs in BLEU.

    Stages run in order, each writing to its own folder of the run directory:
    download -> prepare -> proxy -> score -> prune -> train -> evaluate -> report.
    `mtprune sweep` runs them all, skipping fresh ones; `mtprune status` shows where a run stands.

    Example: mtprune sweep -c configs/demo.yaml
    """


LAUNCHER_OPTION = click.option(
    "--launcher", type=click.Choice(["local", "slurm", "submitit-local"]), default=None,
    help="local: run here (default); slurm: submit job arrays through submitit and return; "
         "submitit-local: the same jobs as local subprocesses. Overrides launch.launcher.")


def _with_launcher(cfg: Config, launcher: str | None) -> Config:
    if launcher is None:
        return cfg
    return cfg.replace(launch=cfg.launch.replace(launcher=launcher))


def _submit_and_report(cfg: Config, layout: RunLayout, stages: tuple[str, ...]) -> None:
    from .slurm import short_command, submit

    jobs = submit(cfg, layout, cfg.launch.launcher, stages)
    if not jobs:
        click.echo("nothing to submit: every stage is fresh")
    for j in jobs:
        click.echo(f"{j.job_id}\t{j.stage}\t{short_command(j.argv)}")


def _stage_command(stage: str) -> None:
    from .lock import RunLock, check_free, check_no_units_running, unit_lock_path
    from .pipeline import run_stage

    extra: list[Callable[..., Any]] = [LAUNCHER_OPTION]
    if stage == "score":
        extra.append(click.option("--shard", default=None, metavar="I/N",
                                  help="Score only slice I of N (0-based) into 04_score/shards/; "
                                       "`mtprune score` without --shard merges the finished shards."))
        extra.append(click.option("--baselines", "baselines_shard", default=None, metavar="I/N",
                                  help="Compute only the base_* columns (OpusFilter's filters, no model) of slice I "
                                       "of N into 04_score/shards/: CPU work that needs prepare alone; "
                                       "`mtprune score` then assembles the columns from the finished slices."))
    if stage == "prepare":
        extra.append(click.option("--shard", default=None, metavar="I/N",
                                  help="Encode and binarize only part I of N (0-based) of the training pairs into "
                                       "02_prepare/shards/, as a job array task does; `mtprune prepare` without "
                                       "--shard assembles data-bin from the finished parts (and does any missing)."))
    if stage in ("proxy", "train"):
        extra.append(click.option("--unit", default=None, metavar="NAME",
                                  help="Run one unit only (proxy: seed<k>; train: full, el2n-high-0.3, ...), "
                                       "as a job array task does; the plain command then writes the manifest."))

    def command(cfg: Config, layout: RunLayout, verbose: int, overwrite: bool, launcher: str | None,
                **opts: Any) -> None:
        cfg = _with_launcher(cfg, launcher)

        def go() -> None:
            from .slurm import check_launch

            check_launch(cfg, (stage,))  # launch.slurm.nodes > 1 needs Slurm
            if cfg.launch.launcher != "local":
                _submit_and_report(cfg, layout, (stage,))
                return
            if opts.get("unit"):
                from .pipeline import run_unit

                # a job-array task runs beside the others: it holds its unit's lock, not the run lock,
                # and refuses to start while a plain stage command or sweep holds that (launch.run_units)
                run_unit(stage, cfg, layout, opts["unit"])
            elif opts.get("shard") and opts.get("baselines_shard"):
                raise UsageError("--shard and --baselines: one slice at a time (a score job or a baselines job)")
            elif opts.get("baselines_shard"):
                from .scoring.shards import parse_shard
                from .stages.score import run_baselines_shard

                i, count = parse_shard(opts["baselines_shard"], "--baselines")
                lock = unit_lock_path(layout.stage_dir(stage) / f"baselines-{i}-of-{count}")
                with RunLock(lock, f"score --baselines {i}/{count}", subject=f"baselines shard {i}/{count}"):
                    check_free(layout.lock)
                    run_baselines_shard(cfg, layout, f"{i}/{count}")
            elif opts.get("shard") and stage == "prepare":
                from .scoring.shards import parse_shard
                from .stages.prepare import run_part

                i, count = parse_shard(opts["shard"])
                lock = unit_lock_path(layout.stage_dir(stage) / f"part-{i}-of-{count}")
                with RunLock(lock, f"prepare --shard {i}/{count}", subject=f"prepare part {i}/{count}"):
                    check_free(layout.lock)
                    run_part(cfg, layout, f"{i}/{count}")
            elif opts.get("shard"):
                from .scoring.shards import parse_shard
                from .stages.score import run_shard

                shard = opts["shard"]
                i, count = parse_shard(shard)  # `--shard 00/4` and `--shard 0/4` take the same lock
                lock = unit_lock_path(layout.stage_dir(stage) / f"{i}-of-{count}")
                with RunLock(lock, f"score --shard {shard}", subject=f"score shard {shard}"):
                    from .scoring.shards import PARENT_HOLDS_RUN_LOCK

                    if os.environ.get(PARENT_HOLDS_RUN_LOCK) != str(os.getppid()):  # not started by `mtprune score`
                        check_free(layout.lock)
                    else:  # one of `mtprune score`'s shard processes: it must not outlive it
                        from .children import die_with_parent

                        die_with_parent()
                    run_shard(cfg, layout, shard)
            else:
                with RunLock(layout.lock, stage):
                    check_no_units_running(layout.stage_dir(stage))
                    run_stage(stage, cfg, layout, overwrite=overwrite)

        guarded(stage, go, verbose)

    command.__name__ = stage
    command.__doc__ = STAGE_HELP[stage]
    cmd: Callable[..., Any] = command
    for opt in extra:
        cmd = opt(cmd)
    cmd = click.option("--overwrite", is_flag=True, help="Redo the stage even if it is fresh.")(cmd)
    cmd = config_options(cmd, finds_run=stage == "report")
    main.command(name=stage, help=STAGE_HELP[stage], short_help=SHORT_HELP[stage])(cmd)


for _stage in STAGES:
    _stage_command(_stage)


@main.command(short_help=SHORT_HELP["export"])
@click.option("--run", "runs", multiple=True, metavar="NAME",
              help="A pruned corpus to export (el2n-high-0.2, ...); repeatable. Default: export.runs, or every one.")
@click.option("--format", "fmt", type=click.Choice(["text", "hf"]), default=None,
              help="text: plain files; hf: also a Hugging Face dataset per pair (OPUS-100's hub schema, with the "
                   "scores) in <run>/<pair>/hf/, for datasets.load_dataset('parquet', ...). Default: export.format.")
@click.option("--overwrite", is_flag=True, help="Redo the export even if it is fresh.")
@config_options
def export(cfg: Config, layout: RunLayout, verbose: int, overwrite: bool, runs: tuple[str, ...],
           fmt: str | None) -> None:
    """Write pruned corpora as plain text for other toolkits, and every score as TSV; write 09_export/.

    09_export/<run>/<pair>/train.<lang> holds the kept pairs, untokenized, with their sentence ids in
    train.ids; 09_export/scores.tsv has sentence_id, pair and every score column. With --format hf, also
    09_export/<run>/<pair>/hf/{train,validation,test}.parquet. Not part of sweep.
    """
    from .lock import RunLock
    from .pipeline import run_stage

    def go() -> None:
        chosen = cfg.replace(export=cfg.export.replace(runs=runs)) if runs else cfg
        if fmt is not None:
            chosen = chosen.replace(export=chosen.export.replace(format=fmt))
        with RunLock(layout.lock, "export"):
            run_stage("export", chosen, layout, overwrite=overwrite)
        click.echo(str(layout.stage_dir("export")))

    guarded("export", go, verbose)


@main.command(short_help=SHORT_HELP["sweep"])
@click.option("--dry-run", is_flag=True,
              help="Run nothing; one line per stage: run, skip, or maybe (runs only if an upstream stage comes out "
                   "different), why, and which units train; then an error: line for every problem that would stop "
                   "the sweep (exit 2).")
@click.option("--overwrite", is_flag=True, help="Redo every stage, even fresh ones.")
@LAUNCHER_OPTION
@config_options
def sweep(cfg: Config, layout: RunLayout, verbose: int, dry_run: bool, overwrite: bool,
          launcher: str | None) -> None:
    """Run every stage in order, skipping fresh ones; print the results table at the end.

    Every problem a later stage would meet that the config already shows (a strategy on a score column no stage
    writes, fp16 without a GPU, a missing test-set file) stops the sweep before its first stage.

    With --launcher slurm every stage that is not fresh is submitted at once, each depending on
    the one before (independent units as job arrays), and the job ids are printed.
    """
    from .lock import RunLock, check_no_units_running
    from .pipeline import check_before_running, plan, run_stage

    cfg = _with_launcher(cfg, launcher)

    def go() -> None:
        from .slurm import check_launch

        check_launch(cfg, STAGES)  # launch.slurm.nodes > 1 needs Slurm
        if dry_run:
            check_existing_run_dir(layout.root)
        steps = plan(cfg, layout, overwrite, detail=dry_run)
        # every check a later stage's preflight makes, before the first stage touches anything (not after
        # hours of training): a strategy on a column no stage writes, fp16 without a GPU, a missing test set
        problems = check_before_running(cfg, layout, [s.state.stage for s in steps if s.action != "skip"])
        if dry_run:
            for step in steps:
                click.echo(step.line())
            for p in problems:
                click.echo(f"error: {p}")
            if problems:
                raise UsageError(f"{len(problems)} problem(s) listed above would stop this sweep; nothing was run")
            return
        if problems:
            raise UsageError("; ".join(problems))
        if cfg.launch.launcher != "local":
            _submit_and_report(cfg, layout, STAGES)
            if cfg.launch.launcher == "slurm":
                return
        else:
            with RunLock(layout.lock, "sweep"):
                for stage in STAGES:
                    check_no_units_running(layout.stage_dir(stage))
                for stage in STAGES:
                    run_stage(stage, cfg, layout, overwrite=overwrite)
        table = layout.report_file("results.md")
        if table.exists():
            click.echo(headline(table.read_text(encoding="utf-8")))
            click.echo(f"the whole report: {table} (plots, noise found, example pairs: {table.parent}/)")

    guarded("sweep", go, verbose)


def headline(results_md: str, sections: tuple[str, ...] = ("## BLEU on", "## Paired significance")) -> str:
    """The sections of results.md a sweep prints at its end: the BLEU table and the paired tests."""
    out, keep = [], False
    for line in results_md.splitlines():
        if line.startswith("## "):
            keep = line.startswith(sections)
        if keep:
            out.append(line)
    return "\n".join(out).rstrip() + "\n"


@main.command(short_help=SHORT_HELP["status"])
@click.option("--verify", is_flag=True, help="Rehash every recorded artifact (slower) to catch changed files.")
@functools.partial(config_options, writes=False, finds_run=True)
def status(cfg: Config, layout: RunLayout, verbose: int, verify: bool, config_path: str | None) -> None:
    """Show each stage as fresh, stale (and why), restorable, running, failed, incomplete or missing.

    restorable: a run killed while redoing the stage left its last finished artifacts in <stage>.previous, and
    they are fresh: the next run puts them back and redoes nothing. running: another process holds the stage
    (named). failed: its last run stopped on an error, shown; fix that, then rerun."""
    from .pipeline import Freshness

    def go() -> None:
        check_existing_run_dir(layout.root)
        fresh = Freshness(cfg, layout, verify=verify)
        click.echo(f"run directory: {layout.root}")
        click.echo(f"config: {config_path or 'built-in defaults (give -c FILE for another run)'}")
        bad = False
        # stages outside sweep (export) are listed once they have been run
        for stage in STAGES + tuple(s for s in EXTRA_STAGES if layout.stage_dir(s).exists()):
            st = fresh(stage)
            bad |= st.status == "stale" and verify
            click.echo(f"  {stage:<9} {st.status:<10} {st.reason}")
        from .stages.report_stability import status_warning

        if (warning := status_warning(layout)) is not None:
            click.echo(f"warning: {warning}")
        from .slurm import job_states

        jobs = job_states(layout)
        if jobs:
            click.echo("jobs:")
            for _stage, jid, state, cmd in jobs:
                click.echo(f"  {jid:<14} {state:<8} {cmd}")
        if bad:
            sys.exit(1)

    guarded("status", go, verbose)


@main.command(name="config", short_help=SHORT_HELP["config"])
@functools.partial(config_options, writes=False, finds_run=True)
def config_(cfg: Config, layout: RunLayout, verbose: int, config_path: str | None) -> None:
    """Print the resolved config as YAML: the file given with -c (or the run's own config), every --set, and
    every default. Redirect it to a file to start a config of your own: mtprune config > my.yaml"""
    from .config import dump_yaml

    click.echo(f"# mtprune {__version__}: {config_path or 'built-in defaults'}"
               + "".join(f" --set {o}" for o in click.get_current_context().params.get("overrides", ())))
    click.echo(dump_yaml(cfg), nl=False)


@main.command(name="slurm-script", short_help=SHORT_HELP["slurm-script"])
@click.argument("stage", type=click.Choice(list(STAGES)), required=False)
@click.option("--finish", is_flag=True,
              help="For proxy, score and train: the job to run after the array, which merges the units "
                   "and writes the stage's manifest (no GPUs).")
@click.option("--baselines", is_flag=True,
              help="For score: the CPU job array that computes the base_* columns slice by slice (`score "
                   "--baselines I/N`, no GPUs, after prepare); the score stage's finishing job waits for it.")
@click.option("--pairs", type=click.IntRange(min=1), default=None,
              help="Without STAGE: plan for this many training pairs (default: what this run's download counted, "
                   "else OPUS-100's size for download.pairs).")
@click.option("--train-tps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Without STAGE: target tokens per second a training run makes on the cluster (default: "
                   "measured from this run's proxy logs, when there are any).")
@click.option("--score-tps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Without STAGE: target tokens per second a score shard's GPU scores one checkpoint at "
                   "(default: measured from this run's finished score shards, when there are any).")
@click.option("--tokens-per-pair", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Without STAGE: SentencePiece target tokens per training pair (default: this run's "
                   "prepare manifest).")
@functools.partial(config_options, finds_run=True)
def slurm_script(cfg: Config, layout: RunLayout, verbose: int, stage: str | None, finish: bool, baselines: bool,
                 pairs: int | None,
                 train_tps: float | None, score_tps: float | None, tokens_per_pair: float | None) -> None:
    """Print a plain sbatch script for one stage (a job array where the stage has units); without STAGE, the
    plan of the whole sweep on Slurm.

    For users who submit by hand: `mtprune slurm-script proxy -c cfg.yaml > proxy.sbatch`, then
    `mtprune slurm-script proxy --finish ...` for the job that depends on the array (the score stage has a
    second, CPU-only array, `slurm-script score --baselines`, which needs prepare alone). The script runs
    the same command line, with the same sbatch options, as `--launcher slurm` would submit, on a
    snapshot of the config saved under <run>/slurm/ (named by its hash, never rewritten).

    The plan (`mtprune slurm-script -c cfg.yaml`) lists every stage's jobs, the GPUs and CPUs each holds,
    the score stage's shards, and estimated hours: CPU stages from throughputs measured at 4M pairs on a
    2-core machine, GPU stages from the throughputs this run measured (its proxy logs, its score shards) or
    --train-tps / --score-tps; a stage without a measured throughput says so instead of guessing.
    """
    from .slurm import BASELINES, config_snapshot, job_folder, sbatch_script

    def go() -> None:
        if stage is None:
            if finish or baselines:
                raise UsageError(f"{'--finish' if finish else '--baselines'} needs a STAGE "
                                 f"({'proxy, score or train' if finish else 'score'})")
            from .plan import plan, render

            rows, said = plan(cfg, layout, pairs=pairs, train_tps=train_tps, score_tps=score_tps,
                              tokens=tokens_per_pair)
            click.echo(render(cfg, layout, rows, said), nl=False)
            return
        plan_only = [o for o, v in (("--pairs", pairs), ("--train-tps", train_tps), ("--score-tps", score_tps),
                                    ("--tokens-per-pair", tokens_per_pair)) if v is not None]
        if plan_only:
            raise UsageError(f"{', '.join(plan_only)}: only for the plan (no STAGE)")
        text = sbatch_script(cfg, layout, stage, config_snapshot(cfg, layout), finish=finish, baselines=baselines)
        # Slurm opens --output before the job starts
        job_folder(layout, BASELINES if baselines else stage).mkdir(parents=True, exist_ok=True)
        click.echo(text, nl=False)

    guarded("slurm-script", go, verbose)
