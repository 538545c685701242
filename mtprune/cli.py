"""The ``mtprune`` command: one thin command per stage, plus ``sweep`` and ``status``.

Heavy libraries (torch, fairseq, datasets) are imported inside the stages, so ``--help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import Config, load_config
from .errors import MtpruneError, UsageError
from .layout import STAGES, RunLayout

log = logging.getLogger("mtprune")

STAGE_HELP = {
    "download": "Fetch OPUS-100 pairs (hub, local:DIR or synthetic), clean, subsample; write 01_download/.",
    "prepare": "Train the joint SentencePiece model, tag sources, binarize with fairseq; write 02_prepare/.",
    "proxy": "Train one short proxy model per seed, keeping the checkpoints listed in proxy.checkpoints.",
    "score": "Score every training pair: token-level EL2N and NLL averaged over checkpoints and seeds.",
    "prune": "Drop a fraction of the training pairs per strategy and sparsity; binarize what is kept.",
    "train": "Train the final model on each pruned corpus and on the full one (strategy 'full').",
    "evaluate": "Translate each pair's test split with beam search; BLEU and chrF with sacrebleu.",
    "report": "Results table, BLEU-vs-sparsity plot, score histograms, stability and example pairs.",
}


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mtprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _fail(label: str, err: MtpruneError) -> None:
    click.echo(f"mtprune {label}: error: {err}", err=True)
    sys.exit(err.exit_code)


def guarded(label: str, fn: Callable[[], Any], verbose: int = 0) -> Any:
    """Run ``fn``; turn known errors into one line and an exit code, never a traceback."""
    try:
        return fn()
    except MtpruneError as e:
        _fail(label, e)
    except KeyboardInterrupt:
        click.echo(f"mtprune {label}: interrupted; rerun the same command to continue", err=True)
        sys.exit(130)
    except PermissionError as e:
        _fail(label, UsageError(f"permission denied: {e.filename or e}"))
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            _fail(label, MtpruneError(f"no space left on device writing {e.filename or ''}"))
        raise
    except Exception as e:  # a bug or an unforeseen failure: one line, traceback with -v
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with -v for the traceback)"
        click.echo(f"mtprune {label}: failed: {type(e).__name__}: {str(e).strip()[:500]}{hint}", err=True)
        sys.exit(1)


def config_options(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                  help="YAML config file (see configs/). Without it, built-in defaults.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value; VALUE is YAML: --set prune.sparsities=[0.1,0.3]. Repeatable.")
    @click.option("--run-dir", default=None, type=click.Path(file_okay=False),
                  help="Run directory (overrides run_dir in the config).")
    @click.option("-v", "--verbose", count=True, help="More logging; -v also shows tracebacks of failures.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @functools.wraps(f)
    def wrapper(config_path: str | None, overrides: tuple[str, ...], run_dir: str | None, verbose: int,
                quiet: bool, **kw: Any) -> Any:
        _setup_logging(verbose, quiet)
        label = f.__name__.rstrip("_")
        cfg = guarded(label, lambda: load_config(config_path, overrides, run_dir))
        return f(cfg=cfg, layout=RunLayout(cfg.run_dir), verbose=verbose, **kw)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mtprune")
def main() -> None:
    """Prune machine-translation training data by EL2N and measure what it costs in BLEU.

    Stages run in order, each writing to its own folder of the run directory:
    download -> prepare -> proxy -> score -> prune -> train -> evaluate -> report.
    `mtprune sweep` runs them all, skipping fresh ones; `mtprune status` shows where a run stands.

    Example: mtprune sweep -c configs/demo.yaml
    """


def _stage_command(stage: str) -> None:
    from .lock import RunLock
    from .pipeline import run_stage

    extra: list[Callable[..., Any]] = []
    if stage == "score":
        extra.append(click.option("--shard", default=None, metavar="I/N",
                                  help="Score only slice I of N (0-based) into 04_score/shards/; "
                                       "`mtprune score` without --shard merges the finished shards."))

    def command(cfg: Config, layout: RunLayout, verbose: int, overwrite: bool, **opts: Any) -> None:
        def go() -> None:
            with RunLock(layout.lock, stage):
                if stage == "score" and opts.get("shard"):
                    from .stages.score import run_shard

                    run_shard(cfg, layout, opts["shard"])
                    return
                run_stage(stage, cfg, layout, overwrite=overwrite)

        guarded(stage, go, verbose)

    command.__name__ = stage
    command.__doc__ = STAGE_HELP[stage]
    cmd: Callable[..., Any] = command
    for opt in extra:
        cmd = opt(cmd)
    cmd = click.option("--overwrite", is_flag=True, help="Redo the stage even if it is fresh.")(cmd)
    cmd = config_options(cmd)
    main.command(name=stage, help=STAGE_HELP[stage])(cmd)


for _stage in STAGES:
    _stage_command(_stage)


@main.command()
@click.option("--dry-run", is_flag=True, help="List what would run and why, run nothing.")
@click.option("--overwrite", is_flag=True, help="Redo every stage, even fresh ones.")
@config_options
def sweep(cfg: Config, layout: RunLayout, verbose: int, dry_run: bool, overwrite: bool) -> None:
    """Run every stage in order, skipping fresh ones; print the results table at the end."""
    from .lock import RunLock
    from .pipeline import plan, run_stage

    def go() -> None:
        if dry_run:
            for st in plan(cfg, layout):
                action = "skip" if st.fresh and not overwrite else "run "
                click.echo(f"{action}  {st.stage:<9} {st.status}: {st.reason}")
            return
        with RunLock(layout.lock, "sweep"):
            for stage in STAGES:
                run_stage(stage, cfg, layout, overwrite=overwrite)
        table = layout.report_file("results.md")
        if table.exists():
            click.echo(table.read_text(encoding="utf-8"))

    guarded("sweep", go, verbose)


@main.command()
@click.option("--verify", is_flag=True, help="Rehash every recorded artifact (slower) to catch changed files.")
@config_options
def status(cfg: Config, layout: RunLayout, verbose: int, verify: bool) -> None:
    """Show each stage as fresh, stale (and why), incomplete or missing."""
    from .pipeline import Freshness

    def go() -> None:
        fresh = Freshness(cfg, layout, verify=verify)
        click.echo(f"run directory: {layout.root}")
        bad = False
        for stage in STAGES:
            st = fresh(stage)
            bad |= st.status == "stale" and verify
            click.echo(f"  {stage:<9} {st.status:<10} {st.reason}")
        if bad:
            sys.exit(1)

    guarded("status", go, verbose)
