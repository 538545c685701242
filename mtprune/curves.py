"""Training curves from fairseq's own logs: the loss of every proxy and final training run.

fairseq-train writes each run's log to ``train.log`` beside its checkpoints (``03_proxy/seed<k>/``,
``06_train/<run>/``), and TensorBoard event files to ``tb/`` there. The report reads the text log, which
every run has whatever is installed: ``train_inner`` lines (the mean loss over the last ``--log-interval``
updates), ``train`` lines (the mean over a whole epoch, at its last update, and over the part of the last
epoch trained) and ``valid`` lines (at every save interval and at the last update), each with ``num_updates``,
and with ``train.valid_bleu`` the validation BLEU of those lines (a fourth panel: BLEU against updates).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from .layout import RunLayout
from .manifest import atomic_write_bytes

CURVES_PNG = "training_curves.png"
_KIND = re.compile(r"\| (train_inner|train|valid) \|")
_LOSS = re.compile(r"(?<![\w])loss[= ](-?[\d.]+(?:e-?\d+)?)")
_UPDATES = re.compile(r"num_updates[= ](\d+)")
_BLEU = re.compile(r"\| bleu[= ](-?[\d.]+) ")
_SEED = re.compile(r"(.+)-seed(\d+)")

Curve = list[tuple[int, float]]  # (updates, loss), by updates
SEED_STYLES = ("-", "--", ":", "-.")  # final models: line style of train.seeds[0], [1], ...
# final models: one colour family per strategy, a darker shade for a larger sparsity
_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "YlOrBr", "PuRd", "BuGn", "Greys")


def read_curves(log: Path) -> dict[str, Curve]:
    """``{"train": [...], "epoch": [...], "valid": [...]}`` from one fairseq train.log (a resumed run appends
    to it; a later line for the same update wins). ``train``: the ``train_inner`` points only; ``epoch``: the
    epoch means, kept apart because while the loss falls an epoch's mean lies above the interval points around
    it (it includes the epoch's first updates); ``valid``: every validation."""
    found: dict[str, dict[int, float]] = {"train_inner": {}, "train": {}, "valid": {}, "bleu": {}}
    if log.is_file():
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                kind, loss, upd = _KIND.search(line), _LOSS.search(line), _UPDATES.search(line)
                if kind and loss and upd:
                    found[kind.group(1)][int(upd.group(1))] = float(loss.group(1))
                    bleu = _BLEU.search(line) if kind.group(1) == "valid" else None
                    if bleu:
                        found["bleu"][int(upd.group(1))] = float(bleu.group(1))
    return {"train": sorted(found["train_inner"].items()), "epoch": sorted(found["train"].items()),
            "valid": sorted(found["valid"].items()), "bleu": sorted(found["bleu"].items())}


def run_logs(layout: RunLayout, units: dict[str, set[str]] | None = None) -> dict[str, list[tuple[str, Path]]]:
    """(label, train.log) of every proxy run and every final model, each group sorted by name; with
    ``units`` (stage -> folder names), only those: folders a shorter list left behind are kept on disk, not plotted."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for stage in ("proxy", "train"):
        d = layout.stage_dir(stage)
        logs = sorted((p.parent.name, p) for p in d.glob("*/train.log")) if d.is_dir() else []
        out[stage] = [x for x in logs if units is None or x[0] in units.get(stage, set())]
    return out


def parse_run_name(name: str) -> tuple[str, float | None, int]:
    """(strategy, sparsity, seed) of a final model's folder, the inverse of ``layout.run_name`` and
    ``seed_run_name``: ``el2n-high-0.2-seed2`` -> ("el2n-high", 0.2, 2), ``full`` -> ("full", 0.0, 1),
    ``full+competence`` -> ("full+competence", 0.0, 1) (a model trained in another order, ``train.order``),
    ``a-high+b-high-0.5`` -> ("a-high+b-high", 0.5, 1) (a two-column strategy); a name that is none of these gives
    (name, None, 1)."""
    from .config import ORDERS

    m = _SEED.fullmatch(name)
    system, seed = (m.group(1), int(m.group(2))) if m else (name, 1)
    # the order is what follows the last "+" when it names one: a two-column strategy has a "+" of its own
    # (base_all-high+domain_combined-high-0.5+competence)
    corpus, plus, order = system.rpartition("+")
    if order not in ORDERS:
        corpus, plus, order = system, "", ""
    if corpus == "full":
        return "full" + plus + order, 0.0, seed
    strategy, _, sparsity = corpus.rpartition("-")
    try:
        return strategy + plus + order, float(sparsity), seed
    except ValueError:
        return system, None, seed


def _training_points(curves: list[dict[str, Curve]]) -> tuple[str, str]:
    """Which training points a panel draws: the interval means when every run has two or more, else the
    epoch means for all of them (a run shorter than fairseq's --log-interval has none); never a mix."""
    if all(len(c["train"]) >= 2 for c in curves):
        return "train", "mean over each log interval"
    return "epoch", "epoch means (runs too short for the log interval)"


def _final_styles(names: list[str]) -> dict[str, dict[str, Any]]:
    """Colour, shade and line style of each final model: colour family = strategy (``full`` black), shade =
    sparsity (darker = more pruned), line style = seed."""
    from matplotlib import colormaps

    parsed = {n: parse_run_name(n) for n in names}
    strategies = sorted({st for st, _, _ in parsed.values() if st != "full"})
    seeds = sorted({seed for _, _, seed in parsed.values()})
    out = {}
    for n, (st, sp, seed) in parsed.items():
        if st == "full":
            color: Any = "black"
        else:
            sps = sorted({s for t, s, _ in parsed.values() if t == st and s is not None})
            j = sps.index(sp) if sp in sps else 0
            color = colormaps[_FAMILIES[strategies.index(st) % len(_FAMILIES)]](
                0.85 if len(sps) == 1 else 0.5 + 0.45 * j / (len(sps) - 1))
        out[n] = {"color": color, "ls": SEED_STYLES[seeds.index(seed) % len(SEED_STYLES)],
                  "corpus": st if st == "full" or not sp else f"{st} {sp:g}", "seed": seed,
                  "order": (st != "full", st, -1.0 if sp is None else sp, seed)}
    return dict(sorted(out.items(), key=lambda kv: kv[1]["order"]))  # full first, then by strategy and sparsity


def curves_figure(layout: RunLayout, units: dict[str, set[str]] | None = None) -> Any:
    """The figure of ``training_curves.png``: proxy runs (training solid, validation dashed, one colour per run),
    then the final models' training loss and their validation loss, coloured by strategy, shaded by sparsity,
    one line style per seed. Every line's gid is ``<run folder>:<train|epoch|valid>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = run_logs(layout, units)
    ylabel = "loss (label-smoothed cross-entropy, base 2)"
    finals = [(label, read_curves(log)) for label, log in groups["train"]]
    with_bleu = any(c["bleu"] for _, c in finals)
    fig, axes = plt.subplots(1, 4 if with_bleu else 3, figsize=(22.5 if with_bleu else 17, 4.8))
    for ax in axes:
        ax.set_xlabel("updates")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if with_bleu:
        axes[3].set_ylabel("BLEU on the validation set (greedy)")

    ax = axes[0]
    proxies = [(label, read_curves(log)) for label, log in groups["proxy"]]
    kind, what = _training_points([c for _, c in proxies])
    cmap = plt.get_cmap("tab10")
    for i, (label, c) in enumerate(proxies):
        color = cmap(i % cmap.N)
        if c[kind]:
            ax.plot(*zip(*c[kind], strict=True), color=color, lw=1.2, marker=".", ms=4, label=label,
                    gid=f"{label}:{kind}")
        if c["valid"]:
            ax.plot(*zip(*c["valid"], strict=True), color=color, lw=0.9, ls="--", marker="x", ms=4,
                    label=None if c[kind] else label, gid=f"{label}:valid")
    ax.set_title(f"proxy runs (03_proxy)\nsolid: training, {what}\ndashed: validation", fontsize=9)
    if proxies:
        ax.legend(fontsize=7)

    kind, what = _training_points([c for _, c in finals])
    styles = _final_styles([label for label, _ in finals])
    panels = [(axes[1], kind, f"final models (06_train): training loss\n{what}"),
              (axes[2], "valid", "final models (06_train): validation loss\nat every save interval")]
    if with_bleu:
        panels.append((axes[3], "bleu", "final models (06_train): validation BLEU\nat every save interval "
                       "(train.valid_bleu)"))
    for ax, k, title in panels:
        ax.set_title(title, fontsize=9)
        for label, c in finals:
            if c[k]:
                s = styles[label]
                ax.plot(*zip(*c[k], strict=True), color=s["color"], ls=s["ls"], lw=1.2,
                        marker="x" if k in ("valid", "bleu") else ".", ms=4, gid=f"{label}:{k}")
    if finals:
        # one legend entry per corpus (all its seeds share the colour) and one per seed (its line style)
        handles = [Line2D([], [], color=s["color"], lw=2, label=s["corpus"])
                   for s in {s["corpus"]: s for s in styles.values()}.values()]
        seeds = sorted({s["seed"] for s in styles.values()})
        if len(seeds) > 1:
            handles += [Line2D([], [], color="grey", ls=SEED_STYLES[i % len(SEED_STYLES)], label=f"seed {seed}")
                        for i, seed in enumerate(seeds)]
        axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       title="colour: strategy\nshade: sparsity (darker:\nmore pruned)" +
                       ("\nline style: seed" if len(seeds) > 1 else ""), title_fontsize=7)
    for ax, logs in ((axes[0], proxies), (axes[1], finals), (axes[2], finals)):
        if not logs:
            ax.text(0.5, 0.5, "no training logs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_curves(layout: RunLayout, units: dict[str, set[str]] | None = None) -> str:
    """Write ``08_report/training_curves.png`` (``curves_figure``); returns the file's name."""
    fig = curves_figure(layout, units)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(layout.report_file(CURVES_PNG), buf.getvalue())
    return CURVES_PNG
