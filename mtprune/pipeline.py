"""Running stages: upstream checks, freshness, resumable in-progress state, manifests."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import Config, dump_yaml, is_speed_only, lookup, recording_reads
from .errors import UsageError
from .faults import crash_point
from .inprogress import last_failure, marker_key, record_failure, running
from .layout import STAGES, RunLayout, remember_run
from .manifest import (
    Manifest,
    atomic_write_bytes,
    atomic_write_text,
    build_manifest,
    check_outputs,
    input_changes,
    input_fingerprint,
    json_hash,
    write_manifest,
)

log = logging.getLogger("mtprune")


@dataclass
class StageResult:
    outputs: list[Path]
    stats: dict[str, Any]


@dataclass
class StageState:
    stage: str
    status: str  # fresh | restorable | stale | incomplete | failed | running | missing
    reason: str = ""
    manifest: Manifest | None = None
    progress: str = ""  # what of an unfinished stage is finished already (the end of ``reason``)

    @property
    def fresh(self) -> bool:
        return self.status == "fresh"

    @property
    def usable(self) -> bool:
        """Fresh, or fresh once the next run has put the artifacts a killed run set aside back in place."""
        return self.status in ("fresh", "restorable")


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(f"mtprune.stages.{stage}")


def _drop_speed_only(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if is_speed_only(key):
            continue
        out[k] = _drop_speed_only(v, key + ".") if isinstance(v, dict) else v
    return out


def stage_config(cfg: Config, stage: str) -> dict[str, Any]:
    """The stage's own config sections (less speed-only settings) and its external input files."""
    mod = stage_module(stage)
    section = _drop_speed_only(cfg.section(*mod.SECTIONS))
    extra = getattr(mod, "external_inputs", None)
    if extra is not None:  # hashed: an edit that keeps the size and puts the mtime back is still seen by --verify
        section["external"] = {f: input_fingerprint(Path(f)) for f in extra(cfg)}
    return section


def result_config(cfg: Config) -> dict[str, Any]:
    """Every setting that can change a result (the whole config less speed-only settings)."""
    return _drop_speed_only(cfg.to_dict())


def params_of(cfg: Config, keys: set[str] | list[str]) -> dict[str, Any]:
    """Current values of dotted keys, speed-only ones left out; a key the config no longer has maps to a marker."""
    out = {}
    for k in sorted(keys):
        if is_speed_only(k):
            continue
        try:
            out[k] = lookup(cfg, k)
        except AttributeError:
            out[k] = "<not in this config>"
    return out


def upstream_digests(stage: str, layout: RunLayout) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for up in stage_module(stage).UPSTREAM:
        m = Manifest.read(layout.manifest(up))
        out[up] = m.outputs_digest if m else None
    return out


class Freshness:
    """Computes each stage's state once per call site (upstream states are shared)."""

    def __init__(self, cfg: Config, layout: RunLayout, verify: bool = False) -> None:
        self.cfg, self.layout, self.verify = cfg, layout, verify
        self._cache: dict[str, StageState] = {}

    def __call__(self, stage: str) -> StageState:
        if stage not in self._cache:
            self._cache[stage] = self._compute(stage)
        return self._cache[stage]

    def _compute(self, stage: str) -> StageState:
        st = self._on_disk(stage)
        if st.fresh:
            return st
        own = Manifest.read(self.layout.manifest(stage)) is not None
        # a sweep runs its stages in order (export is none of them): it is at the first one not done
        busy = running(self.layout, stage, own,
                       lambda: stage in STAGES and all(self(s).usable for s in STAGES[:STAGES.index(stage)]))
        if busy:
            st = StageState(stage, "running", busy, st.manifest)
        if st.status in ("missing", "incomplete", "failed", "running"):  # what parts and units a rerun reuses
            progress = getattr(stage_module(stage), "progress", None)
            note = progress(self.cfg, self.layout) if progress is not None else ""
            if note:
                st = StageState(stage, st.status, f"{st.reason}; {note}", st.manifest, progress=note)
        return st

    def _on_disk(self, stage: str) -> StageState:
        """The stage's state from its folder, manifest and markers, whoever may be running it now."""
        layout = self.layout
        path = layout.manifest(stage)
        m = Manifest.read(path)
        if m is None:
            if path.exists():
                return StageState(stage, "stale", f"{path.name} is damaged or not a manifest; rerun to redo the stage")
            previous = previous_dir(layout, stage)
            pm = Manifest.read(previous / "manifest.json")
            if pm is not None:  # what the next run does first: put the last finished artifacts back
                st = self._judge(stage, pm, previous)
                if st.fresh:
                    return StageState(stage, "restorable", f"a killed run left the finished artifacts in "
                                      f"{previous.name}; they are fresh: the next run puts them back and redoes "
                                      "nothing", pm)
                return StageState(stage, "incomplete", f"a killed run left the finished artifacts in "
                                  f"{previous.name}; the next run puts them back, then redoes the stage ({st.reason})")
            if layout.in_progress(stage).exists():
                failed = self._failure(stage)
                if failed is None:
                    return StageState(stage, "incomplete", "started but not finished; rerun to resume")
                message, now = failed
                if now:  # a rerun as things are meets the same problem
                    return StageState(stage, "failed", f"{message} (fix that, then rerun)")
                return StageState(stage, "incomplete", "started but not finished; rerun to resume (the last run, "
                                  f"with other settings, failed: {message})")
            return StageState(stage, "missing", "not run yet")
        return self._judge(stage, m, layout.stage_dir(stage))

    def _failure(self, stage: str) -> tuple[str, bool] | None:
        """The message of the stage's last run if it failed, and whether it ran with the settings and upstream
        outputs of now (then a rerun as things are meets the same problem)."""
        failed = last_failure(self.layout, stage)
        return None if failed is None else (failed[0], failed[1] == run_key(self.cfg, stage, self.layout))

    def _judge(self, stage: str, m: Manifest, folder: Path) -> StageState:
        """The state of ``stage`` if ``folder`` (its own, or the one a killed run set aside) were in place."""
        changed = config_changes(self.cfg, stage, m)
        extra = getattr(stage_module(stage), "external_inputs", None)
        inputs = [] if extra is None or "params" not in m.data else (  # an older manifest: config_changes has it
            input_changes(m.data.get("config", {}).get("external", {}), set(extra(self.cfg)), rehash=self.verify))
        if changed or inputs:
            why = [f"config changed: {', '.join(changed)}"] if changed else []
            if inputs:
                more = f", +{len(inputs) - 4} more" if len(inputs) > 4 else ""
                why.append(f"input changed: {', '.join(inputs[:4])}{more}")
            return StageState(stage, "stale", "; ".join(why), m)
        for up in stage_module(stage).UPSTREAM:
            up_state = self(up)
            if not up_state.usable:
                return StageState(stage, "stale", f"upstream {up} is {up_state.status}", m)
            assert up_state.manifest is not None
            if m.data["inputs"].get(up) != up_state.manifest.outputs_digest:
                return StageState(stage, "stale", f"upstream {up} was rerun since", m)
        problems = check_outputs(folder, m, rehash=self.verify)
        if problems:
            return StageState(stage, "stale", "; ".join(problems[:3]), m)
        return StageState(stage, "fresh", f"finished {m.data.get('finished', '?')}", m)


def previous_dir(layout: RunLayout, stage: str) -> Path:
    """Where a stage redone from scratch keeps its last finished artifacts until the new run succeeds."""
    sd = layout.stage_dir(stage)
    return sd.with_name(sd.name + ".previous")


def config_changes(cfg: Config, stage: str, m: Manifest) -> list[str]:
    """Settings the stage read last time whose values differ now (its input files: ``manifest.input_changes``).

    Freshness rests on what the stage actually read while it ran (recorded in the manifest as
    ``params``), so a key of another section that a stage reads makes it stale too.
    """
    if "params" not in m.data:  # written before settings were recorded: compare the stage's own sections
        old = _drop_speed_only(m.data.get("config", {}))
        return [] if old == stage_config(cfg, stage) else ["see manifest (written by an older mtprune)"]
    recorded = m.data["params"]
    now = params_of(cfg, list(recorded))
    return [k for k in recorded if now.get(k, recorded[k]) != recorded[k]]


def save_resolved_config(cfg: Config, layout: RunLayout) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.resolved_config, dump_yaml(cfg))
    remember_run(layout.root)


def require_fresh_upstream(stage: str, cfg: Config, layout: RunLayout, upstream: tuple[str, ...] | None = None,
                           label: str | None = None) -> Freshness:
    """Raise UsageError naming the first upstream stage of ``stage`` that is not fresh (of ``upstream`` when given:
    a part of the stage that needs fewer; ``label`` names that part in the error)."""
    fresh = Freshness(cfg, layout)
    for up in stage_module(stage).UPSTREAM if upstream is None else upstream:
        st = fresh(up)
        if not st.fresh:
            raise UsageError(f"{label or stage}: upstream stage '{up}' is {st.status} ({st.reason}); "
                             f"run `mtprune {up}` first")
    return fresh


def run_stage(stage: str, cfg: Config, layout: RunLayout, *, overwrite: bool = False,
              **options: Any) -> Manifest:
    """Run one stage unless it is fresh. Raises UsageError when an upstream stage is not fresh.

    Nothing is touched before every check has passed (upstream, ``preflight``). A stage that is
    redone from scratch moves its last good folder aside to ``<dir>.previous``, which is put back if
    the run fails and kept if it is killed, until a later run succeeds or restores it.
    """
    mod = stage_module(stage)
    require_fresh_upstream(stage, cfg, layout)
    preflight = getattr(mod, "preflight", None)
    if preflight is not None:
        preflight(cfg, layout)
    sd = layout.stage_dir(stage)
    previous = previous_dir(layout, stage)
    if previous.exists() and Manifest.read(layout.manifest(stage)) is None:
        # a run killed after moving the last good artifacts aside: put them back, then decide afresh
        log.info("%s: restoring the last finished artifacts from %s", stage, previous)
        shutil.rmtree(sd, ignore_errors=True)
        os.replace(previous, sd)
    shutil.rmtree(previous, ignore_errors=True)
    state = Freshness(cfg, layout)(stage)
    if state.fresh and not overwrite:
        log.info("%s: fresh (%s), nothing to do; --overwrite redoes it", stage, state.reason)
        assert state.manifest is not None
        return state.manifest

    section = stage_config(cfg, stage)
    key = run_key(cfg, stage, layout)
    inputs = key["inputs"]
    keeps_units = getattr(mod, "KEEPS_UNITS", False)
    old_manifest = layout.manifest(stage).read_bytes() if layout.manifest(stage).exists() else None
    if overwrite or (not keeps_units and (state.status == "stale" or marker_key(layout, stage) != key)):
        if sd.exists():
            log.info("%s: clearing %s (%s)", stage, sd, "--overwrite" if overwrite else state.reason)
            # kept aside until the new run succeeds, so that a failure leaves the last good artifacts
            os.replace(sd, previous)
    sd.mkdir(parents=True, exist_ok=True)
    for pattern in getattr(mod, "KEPT_CACHES", ()):  # caches keyed by their own content survive a clear
        for old in sorted(previous.glob(pattern)) if previous.is_dir() else ():
            rel = old.relative_to(previous)
            if old.is_file() and not (sd / rel).exists():
                (sd / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(old, sd / rel)
    layout.manifest(stage).unlink(missing_ok=True)
    atomic_write_text(layout.in_progress(stage), json.dumps(key))

    started = time.time()
    log.info("%s: running (%s)", stage, state.reason)
    try:
        crash_point(f"{stage}:start")
        with recording_reads() as reads:
            result: StageResult = mod.run(cfg, layout, overwrite=overwrite, **options)
        manifest = build_manifest(stage, section, params_of(cfg, reads), inputs, sd, result.outputs,
                                  result.stats, started)
        crash_point(f"{stage}:before-manifest")
    except BaseException as e:
        if previous.exists():  # put the last good artifacts back as they were
            shutil.rmtree(sd, ignore_errors=True)
            os.replace(previous, sd)
        elif old_manifest is not None:
            atomic_write_bytes(layout.manifest(stage), old_manifest)
            layout.in_progress(stage).unlink(missing_ok=True)
        if isinstance(e, Exception):  # not an interruption (Ctrl-C): a rerun as things are meets it again
            record_failure(layout, stage, key, e)
        raise
    write_manifest(layout.manifest(stage), manifest)
    layout.in_progress(stage).unlink(missing_ok=True)
    shutil.rmtree(previous, ignore_errors=True)
    # written only now: the resolved config names what the finished artifacts came from
    save_resolved_config(cfg, layout)
    log.info("%s: done in %.1fs", stage, time.time() - started)
    return manifest


def run_key(cfg: Config, stage: str, layout: RunLayout) -> dict[str, Any]:
    """What a run of ``stage`` is made with (every setting that changes a result, the upstream outputs): its
    in-progress marker records it, so that a rerun resumes only work begun with the same."""
    return {"config_hash": json_hash(result_config(cfg)), "inputs": upstream_digests(stage, layout)}


@dataclass
class Step:
    """What `sweep` will do with one stage: ``run``, ``skip``, or ``maybe`` (it runs only if an upstream stage
    that runs first comes out different: its own settings and outputs are as they were)."""

    state: StageState
    action: str  # run | skip | maybe
    note: str = ""

    def line(self) -> str:
        st = self.state
        reason = st.reason
        if self.note and st.progress:  # the note says which units run and which are reused, more exactly
            reason = reason.removesuffix(f"; {st.progress}")
        return f"{self.action:<5}  {st.stage:<9} {st.status}: {reason}" + (f"; {self.note}" if self.note else "")


def plan(cfg: Config, layout: RunLayout, overwrite: bool = False, detail: bool = True) -> list[Step]:
    """What `sweep` would do with every stage, and why; with ``detail``, which units of a stage run and which
    finished ones are reused (this hashes their training data, as the real run does)."""
    fresh = Freshness(cfg, layout)
    steps: dict[str, Step] = {}
    for stage in STAGES:
        st = fresh(stage)
        ran = [steps[u].state.stage for u in stage_module(stage).UPSTREAM if steps[u].action != "skip"]
        if overwrite:
            step = Step(st, "run", "--overwrite redoes it")
        elif st.usable:
            step = Step(st, "skip")
        elif (st.status == "stale" and st.manifest is not None and st.reason.startswith("upstream ")
              and not st.reason.endswith("was rerun since")
              and not check_outputs(layout.stage_dir(stage), st.manifest)):
            step = Step(st, "maybe", f"runs only if {' or '.join(ran)} come{'s' if len(ran) == 1 else ''} out "
                                     "different (its own settings and outputs are unchanged)")
        else:
            step = Step(st, "run")
        if detail and step.action == "run" and not overwrite:
            note = getattr(stage_module(stage), "plan_note", None)
            if note is not None:
                step.note = "; ".join(x for x in (step.note, note(cfg, layout, ran)) if x)
        steps[stage] = step
    return list(steps.values())


def check_before_running(cfg: Config, layout: RunLayout, stages: list[str]) -> list[str]:
    """Every problem that would stop one of ``stages`` later (a score column no stage writes, fp16 without a
    GPU, a missing test-set file, ...), found from the config before the first stage touches anything.
    Each stage module's ``check(cfg, layout)`` raises UsageError/InputError for its problems."""
    from .errors import MtpruneError

    problems = []
    for stage in stages:
        check = getattr(stage_module(stage), "check", None)
        if check is None:
            continue
        try:
            check(cfg, layout)
        except MtpruneError as e:
            problems.append(str(e))
    return problems


def run_unit(stage: str, cfg: Config, layout: RunLayout, name: str) -> dict[str, Any]:
    """One work unit of a stage (``seed2`` of proxy, ``el2n-high-0.3`` of train), no manifest.

    A cluster runs the units as a job array; the plain stage command afterwards finds them
    done and writes the manifest.
    """
    from .fairseq_backend import cuda_available
    from .launch import run_units

    mod = stage_module(stage)
    if not hasattr(mod, "units"):
        raise UsageError(f"{stage}: has no units; run it without --unit")
    require_fresh_upstream(stage, cfg, layout)
    preflight = getattr(mod, "preflight", None)
    if preflight is not None:
        preflight(cfg, layout)
    use_cuda = cuda_available()
    units = {u.folder.name: u for u in mod.units(cfg, layout, use_cuda)}
    if name not in units:
        raise UsageError(f"{stage} --unit {name!r}: no such unit (units: {', '.join(units)})")
    return run_units([units[name]], parallel=1, use_cuda=use_cuda, gpus_per_run=cfg.launch.gpus_per_run)
