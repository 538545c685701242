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

from .config import Config, dump_yaml
from .errors import UsageError
from .faults import crash_point
from .layout import STAGES, RunLayout
from .manifest import (
    Manifest,
    atomic_write_bytes,
    atomic_write_text,
    build_manifest,
    check_outputs,
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
    status: str  # fresh | stale | incomplete | missing
    reason: str = ""
    manifest: Manifest | None = None

    @property
    def fresh(self) -> bool:
        return self.status == "fresh"


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(f"mtprune.stages.{stage}")


def stage_config(cfg: Config, stage: str) -> dict[str, Any]:
    mod = stage_module(stage)
    section = cfg.section(*mod.SECTIONS)
    extra = getattr(mod, "external_inputs", None)
    if extra is not None:
        section["external"] = extra(cfg)
    return section


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
        layout = self.layout
        m = Manifest.read(layout.manifest(stage))
        if m is None:
            if layout.in_progress(stage).exists():
                return StageState(stage, "incomplete", "started but not finished; rerun to resume")
            return StageState(stage, "missing", "not run yet")
        if m.data.get("config_hash") != json_hash(stage_config(self.cfg, stage)):
            changed = _changed_keys(m.data.get("config", {}), stage_config(self.cfg, stage))
            return StageState(stage, "stale", f"config changed: {', '.join(changed) or 'see manifest'}", m)
        for up, digest in upstream_digests(stage, layout).items():
            up_state = self(up)
            if not up_state.fresh:
                return StageState(stage, "stale", f"upstream {up} is {up_state.status}", m)
            if m.data["inputs"].get(up) != digest:
                return StageState(stage, "stale", f"upstream {up} was rerun since", m)
        problems = check_outputs(layout.stage_dir(stage), m, rehash=self.verify)
        if problems:
            return StageState(stage, "stale", "; ".join(problems[:3]), m)
        return StageState(stage, "fresh", f"finished {m.data.get('finished', '?')}", m)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_changed_keys(a, b, f"{prefix}{k}."))
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def save_resolved_config(cfg: Config, layout: RunLayout) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.resolved_config, dump_yaml(cfg))


def require_fresh_upstream(stage: str, cfg: Config, layout: RunLayout) -> Freshness:
    """Raise UsageError naming the first upstream stage of ``stage`` that is not fresh."""
    fresh = Freshness(cfg, layout)
    for up in stage_module(stage).UPSTREAM:
        st = fresh(up)
        if not st.fresh:
            raise UsageError(f"{stage}: upstream stage '{up}' is {st.status} ({st.reason}); "
                             f"run `mtprune {up}` first")
    return fresh


def run_stage(stage: str, cfg: Config, layout: RunLayout, *, overwrite: bool = False,
              **options: Any) -> Manifest:
    """Run one stage unless it is fresh. Raises UsageError when an upstream stage is not fresh."""
    mod = stage_module(stage)
    fresh = require_fresh_upstream(stage, cfg, layout)
    state = fresh(stage)
    if state.fresh and not overwrite:
        log.info("%s: fresh (%s), nothing to do; --overwrite redoes it", stage, state.reason)
        assert state.manifest is not None
        return state.manifest

    section = stage_config(cfg, stage)
    inputs = upstream_digests(stage, layout)
    key = {"config_hash": json_hash(section), "inputs": inputs}
    sd = layout.stage_dir(stage)
    keeps_units = getattr(mod, "KEEPS_UNITS", False)
    previous = sd.with_name(sd.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)  # left by a run that was killed: that run is redone now
    old_manifest = layout.manifest(stage).read_bytes() if layout.manifest(stage).exists() else None
    if overwrite or (not keeps_units and (state.status == "stale" or _in_progress_key(layout, stage) != key)):
        if sd.exists():
            log.info("%s: clearing %s (%s)", stage, sd, "--overwrite" if overwrite else state.reason)
            # kept aside until the new run succeeds, so that a failure leaves the last good artifacts
            os.replace(sd, previous)
    sd.mkdir(parents=True, exist_ok=True)
    layout.manifest(stage).unlink(missing_ok=True)
    atomic_write_text(layout.in_progress(stage), json.dumps(key))
    save_resolved_config(cfg, layout)

    started = time.time()
    log.info("%s: running (%s)", stage, state.reason)
    try:
        crash_point(f"{stage}:start")
        result: StageResult = mod.run(cfg, layout, overwrite=overwrite, **options)
        manifest = build_manifest(stage, section, inputs, sd, result.outputs, result.stats, started)
        crash_point(f"{stage}:before-manifest")
    except BaseException:
        if previous.exists():  # put the last good artifacts back as they were
            shutil.rmtree(sd, ignore_errors=True)
            os.replace(previous, sd)
        elif old_manifest is not None:
            atomic_write_bytes(layout.manifest(stage), old_manifest)
            layout.in_progress(stage).unlink(missing_ok=True)
        raise
    write_manifest(layout.manifest(stage), manifest)
    layout.in_progress(stage).unlink(missing_ok=True)
    shutil.rmtree(previous, ignore_errors=True)
    log.info("%s: done in %.1fs", stage, time.time() - started)
    return manifest


def _in_progress_key(layout: RunLayout, stage: str) -> Any:
    try:
        return json.loads(layout.in_progress(stage).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def plan(cfg: Config, layout: RunLayout) -> list[StageState]:
    """What `sweep` would do: every stage's state, with downstream of a non-fresh stage stale."""
    fresh = Freshness(cfg, layout)
    return [fresh(s) for s in STAGES]


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
    use_cuda = cuda_available()
    units = {u.folder.name: u for u in mod.units(cfg, layout, use_cuda)}
    if name not in units:
        raise UsageError(f"{stage} --unit {name!r}: no such unit (units: {', '.join(units)})")
    return run_units([units[name]], parallel=1, use_cuda=use_cuda)
