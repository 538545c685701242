"""A stage's in-progress marker, and what `status` and the dry run read from it and from the locks: who is running
the stage now, and why its last run failed.

``<stage dir>/.in-progress.json`` is written when a run of the stage begins and holds the run's key (every setting
that changes a result, the upstream outputs: ``pipeline.run_key``), so that a rerun resumes only work begun with
the same. A run that fails adds ``failed``: its one-line message and key, since "rerun to resume" is wrong advice
for a source folder that is not there or a hub that cannot be reached. The next run of the stage writes the
marker afresh and its success removes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import MtpruneError
from .layout import RunLayout
from .lock import describe_holder, held_by, unit_holders
from .manifest import atomic_write_text


def read_marker(layout: RunLayout, stage: str) -> dict[str, Any]:
    """The stage's in-progress marker ({} when there is none, or it is damaged)."""
    try:
        data = json.loads(layout.in_progress(stage).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def marker_key(layout: RunLayout, stage: str) -> Any:
    """The key of the run that wrote the marker; None when there is none."""
    marker = read_marker(layout, stage)
    marker.pop("failed", None)
    return marker or None


def failure_line(e: BaseException) -> str:
    """A failure as one line: a user's problem as mtprune words it, anything else with its type."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if not isinstance(e, MtpruneError):
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line[:300]


def record_failure(layout: RunLayout, stage: str, key: dict[str, Any], e: BaseException) -> None:
    """Add why the run of ``key`` failed to the stage's marker. Not where the run put the last finished artifacts
    back: their folder is left byte for byte as it was, and their manifest says what they are."""
    if not layout.stage_dir(stage).is_dir() or layout.manifest(stage).exists():
        return
    marker = read_marker(layout, stage)
    marker["failed"] = {"message": failure_line(e), "key": key}
    try:
        atomic_write_text(layout.in_progress(stage), json.dumps(marker))
    except OSError:  # best effort: the failure itself is what the user must see, and has been raised
        pass


def last_failure(layout: RunLayout, stage: str) -> tuple[str, Any] | None:
    """(message, key) of the stage's last run if it failed; None otherwise."""
    failed = read_marker(layout, stage).get("failed")
    if not isinstance(failed, dict) or not failed.get("message"):
        return None
    return str(failed["message"]), failed.get("key")


def running(layout: RunLayout, stage: str, finished: bool, earlier_done: Callable[[], bool]) -> str:
    """Who is running ``stage`` now, if another process is ("" if none): the holder of the run lock when that is
    a command of this stage, or a sweep that has got to it (``earlier_done``: every stage before it is done);
    else the holders of the stage's unit locks (``--unit`` / ``--shard`` jobs).

    ``finished``: the stage has its manifest, which a run removes before anything else: no plain command runs it."""
    if not finished:
        holder = held_by(layout.lock)
        if holder is not None:
            command = str(holder.get("command") or "").split(" ")[0]
            previous = layout.stage_dir(stage).with_name(layout.stage_dir(stage).name + ".previous")
            started = layout.in_progress(stage).exists() or previous.exists()
            if command == stage or (command in ("sweep", "") and started and earlier_done()):
                return f"{describe_holder(holder)} is running it; wait for it to finish"
    units = unit_holders(layout.stage_dir(stage))
    if not units:
        return ""
    shown = "; ".join(f"{describe_holder(h)} is running {name}" for name, h in units[:3])
    more = f" (+{len(units) - 3} more)" if len(units) > 3 else ""
    return f"{shown}{more}; wait for {'it' if len(units) == 1 else 'them'} to finish"
