"""Training curves from fairseq's own logs: the loss of every proxy and final training run.

fairseq-train writes each run's log to ``train.log`` beside its checkpoints (``03_proxy/seed<k>/``,
``06_train/<run>/``), and TensorBoard event files to ``tb/`` there. The report reads the text log, which
every run has whatever is installed: ``train_inner`` lines (every ``--log-interval`` updates), ``train``
lines (epoch averages) and ``valid`` lines (at every save interval), each with ``num_updates``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from .layout import RunLayout
from .manifest import atomic_write_bytes

CURVES_PNG = "training_curves.png"
_KIND = re.compile(r"\| (train_inner|train|valid) \|")
_LOSS = re.compile(r"(?<![\w])loss[= ](-?[\d.]+(?:e-?\d+)?)")
_UPDATES = re.compile(r"num_updates[= ](\d+)")

Curve = list[tuple[int, float]]  # (updates, loss), by updates


def read_curves(log: Path) -> dict[str, Curve]:
    """``{"train": [...], "valid": [...]}`` from one fairseq train.log (a resumed run appends to it;
    a later line for the same update wins). Training loss: ``train_inner`` points, and the epoch
    averages at updates that have none."""
    inner: dict[int, float] = {}
    epoch: dict[int, float] = {}
    valid: dict[int, float] = {}
    if log.is_file():
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                kind, loss, upd = _KIND.search(line), _LOSS.search(line), _UPDATES.search(line)
                if kind and loss and upd:
                    {"train_inner": inner, "train": epoch, "valid": valid}[kind.group(1)][int(upd.group(1))] = \
                        float(loss.group(1))
    train = {**epoch, **inner}
    return {"train": sorted(train.items()), "valid": sorted(valid.items())}


def run_logs(layout: RunLayout, units: dict[str, set[str]] | None = None) -> dict[str, list[tuple[str, Path]]]:
    """(label, train.log) of every proxy run and every final model, each group sorted by name; with
    ``units`` (stage -> folder names), only those: folders a shorter list left behind are kept on disk, not plotted."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for stage in ("proxy", "train"):
        d = layout.stage_dir(stage)
        logs = sorted((p.parent.name, p) for p in d.glob("*/train.log")) if d.is_dir() else []
        out[stage] = [x for x in logs if units is None or x[0] in units.get(stage, set())]
    return out


def plot_curves(layout: RunLayout, units: dict[str, set[str]] | None = None) -> str:
    """Write ``08_report/training_curves.png``: training (solid) and validation (dashed) loss against
    updates, proxy runs on the left, final models on the right; returns the file's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = run_logs(layout, units)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    titles = {"proxy": "proxy runs (03_proxy)", "train": "final models (06_train)"}
    for ax, (stage, logs) in zip(axes, groups.items(), strict=True):
        cmap = plt.get_cmap("tab20" if len(logs) > 10 else "tab10")
        for i, (label, log) in enumerate(logs):
            c = read_curves(log)
            color = cmap(i % cmap.N)
            if c["train"]:
                ax.plot(*zip(*c["train"], strict=True), color=color, lw=1.2, marker=".", ms=3, label=label)
            if c["valid"]:
                ax.plot(*zip(*c["valid"], strict=True), color=color, lw=0.9, ls="--", marker="x", ms=3,
                        label=None if c["train"] else label)
        ax.set_title(titles[stage])
        ax.set_xlabel("updates")
        ax.set_ylabel("loss (label-smoothed cross-entropy, base 2)")
        ax.grid(alpha=0.3)
        if logs:
            ax.legend(fontsize=7, ncol=1 + len(logs) // 12, title="solid: train, dashed: valid",
                      title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "no training logs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(layout.report_file(CURVES_PNG), buf.getvalue())
    return CURVES_PNG
