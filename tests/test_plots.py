"""The report's plots and examples say what they draw: training curves from interval points (epoch means apart)
with every validation, final models grouped by strategy; the BLEU plot names its grey band and draws one panel
for one pair; the EL2N histogram marks labelled noise and the prune cut-offs; examples.md carries the noise kind.
Checked on the figures' data (artists by gid), not on pixels; fast, no training."""

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY
from mtprune.config import load_config
from mtprune.curves import curves_figure, read_curves
from mtprune.layout import RunLayout
from mtprune.plots import bleu_figure, hist_figure
from mtprune.stages.report import _examples, el2n_cuts

matplotlib.use("Agg")

_HEAD = "2026-12-03 15:26:47 | INFO | "


def _inner(epoch: int, updates: int, loss: float) -> str:
    return (f"{_HEAD}train_inner | epoch {epoch:03d}:      4 / 23 loss={loss}, nll_loss={loss - 0.1:.3f}, "
            f"ppl=229.2, wps=12964.5, ups=19.73, wpb=656.9, bsz=51.9, num_updates={updates}, lr=0.0006, gnorm=0.581, "
            "clip=2, train_wall=2, wall=5\n")


def _epoch(epoch: int, updates: int, loss: float) -> str:
    return (f"{_HEAD}train | epoch {epoch:03d} | loss {loss} | nll_loss {loss - 0.1:.3f} | ppl 323.02 | "
            f"wps 14669.9 | ups 22.17 | wpb 660.6 | bsz 52.2 | num_updates {updates} | lr 0.0009 | gnorm 0.712 | "
            "clip 4.3 | train_wall 1 | wall 4\n")


def _valid(epoch: int, updates: int, loss: float) -> str:
    return (f"{_HEAD}valid | epoch {epoch:03d} | valid on 'valid' subset | loss {loss} | nll_loss {loss - 0.2:.3f} "
            f"| ppl 127.73 | wps 37554.1 | wpb 514.8 | bsz 40 | num_updates {updates} | best_loss {loss}\n")


def _log(path: Path, updates: int = 150, interval: int = 50, save: int = 37, epoch_len: int = 23,
         offset: float = 0.0) -> Path:
    """A fairseq simple-format train.log as mtprune's runs write it: interval means falling with the updates,
    an epoch mean at every epoch end (above the interval points: it includes the epoch's first updates),
    a validation at every save interval and at the last update."""
    lines = [f"{_HEAD}fairseq_cli.train | begin training epoch 1\n"]
    for u in range(1, updates + 1):
        epoch = (u - 1) // epoch_len + 1
        if u % interval == 0:
            lines.append(_inner(epoch, u, round(8 - u / 100 + offset, 3)))
        if u % save == 0 or u == updates:
            lines.append(_valid(epoch, u, round(7.5 - u / 120 + offset, 3)))
        if u % epoch_len == 0 or u == updates:
            lines.append(_epoch(epoch, u, round(8.5 - u / 110 + offset, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_read_curves_keeps_epoch_means_apart_and_every_validation(tmp_path: Path) -> None:
    log = _log(tmp_path / "train.log")
    with open(log, "a", encoding="utf-8") as f:  # a resumed run appends: the later line for an update wins
        f.write(_inner(7, 150, 6.0))
    c = read_curves(log)
    assert [u for u, _ in c["train"]] == [50, 100, 150]  # train_inner only: no epoch mean among them
    assert c["train"][-1] == (150, 6.0)
    assert [u for u, _ in c["epoch"]] == [23, 46, 69, 92, 115, 138, 150]
    assert [u for u, _ in c["valid"]] == [37, 74, 111, 148, 150]  # every save interval and the last update
    assert all(a[1] > b[1] for a, b in zip(c["train"], c["train"][1:], strict=False))  # no false spike


def _runs(root: Path, names: list[str], **kw: int) -> RunLayout:
    layout = RunLayout(root)
    for i, name in enumerate(names):
        _log(layout.train_dir(name) / "train.log", offset=i / 50, **kw)
    for seed in (1, 2):
        _log(layout.proxy_seed_dir(seed) / "train.log", updates=120, save=60)
    return layout


def _lines(ax: object) -> dict[str, object]:
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}  # type: ignore[attr-defined]


def test_final_models_are_coloured_by_strategy_shaded_by_sparsity_and_styled_by_seed(tmp_path: Path) -> None:
    from matplotlib.colors import rgb_to_hsv, to_rgb

    names = ["el2n-high-0.2", "el2n-high-0.2-seed2", "el2n-high-0.4", "el2n-high-0.4-seed2", "full", "full-seed2",
             "random-0.2", "random-0.2-seed2", "random-0.4", "random-0.4-seed2"]
    fig = curves_figure(_runs(tmp_path / "run", names))
    proxy, train, valid = fig.axes[:3]
    assert set(_lines(proxy)) == {"seed1:train", "seed1:valid", "seed2:train", "seed2:valid"}
    t, v = _lines(train), _lines(valid)
    assert set(t) == {f"{n}:train" for n in names} and set(v) == {f"{n}:valid" for n in names}
    assert [int(x) for x in v["full:valid"].get_xdata()] == [37, 74, 111, 148, 150]
    assert [int(x) for x in t["full:train"].get_xdata()] == [50, 100, 150]  # interval points only

    color = {n: to_rgb(t[f"{n}:train"].get_color()) for n in names}
    style = {n: t[f"{n}:train"].get_linestyle() for n in names}
    for n in names:  # the validation line of a run looks like its training line
        assert to_rgb(v[f"{n}:valid"].get_color()) == color[n] and v[f"{n}:valid"].get_linestyle() == style[n]
    for corpus in ("full", "el2n-high-0.2", "el2n-high-0.4", "random-0.2", "random-0.4"):
        assert color[corpus] == color[f"{corpus}-seed2"]  # seeds share the colour ...
        assert style[corpus] == "-" and style[f"{corpus}-seed2"] == "--"  # ... and differ in line style
    hue = {n: rgb_to_hsv(color[n])[0] for n in names}
    assert abs(hue["el2n-high-0.2"] - hue["el2n-high-0.4"]) < 0.05  # one colour family per strategy
    assert abs(hue["random-0.2"] - hue["random-0.4"]) < 0.05
    assert abs(hue["el2n-high-0.2"] - hue["random-0.2"]) > 0.1
    assert sum(color["el2n-high-0.4"]) < sum(color["el2n-high-0.2"])  # darker: more pruned
    assert color["full"] == (0.0, 0.0, 0.0)
    legend = [x.get_text() for x in valid.get_legend().get_texts()]
    assert legend == ["full", "el2n-high 0.2", "el2n-high 0.4", "random 0.2", "random 0.4", "seed 1", "seed 2"]


def test_validation_bleu_gets_a_fourth_panel_and_orders_parse_as_strategies_of_their_own(tmp_path: Path) -> None:
    from mtprune.curves import parse_run_name

    assert parse_run_name("full+competence-seed2") == ("full+competence", 0.0, 2)
    assert parse_run_name("el2n-high-0.2+self-paced") == ("el2n-high+self-paced", 0.2, 1)
    names = ["full", "full+competence"]
    layout = _runs(tmp_path / "run", names)
    assert len(curves_figure(layout).axes) == 3  # no BLEU logged: no BLEU panel
    for i, name in enumerate(names):
        log = layout.train_dir(name) / "train.log"
        lines = [ln.replace("| best_loss", f"| bleu {10 + i + u / 30:.2f} | best_loss") if "valid on" in ln else ln
                 for u, ln in enumerate(log.read_text().splitlines(keepends=True))]
        log.write_text("".join(lines))
    fig = curves_figure(layout)
    bleu = _lines(fig.axes[3])
    assert set(bleu) == {"full:bleu", "full+competence:bleu"}
    assert [int(x) for x in bleu["full:bleu"].get_xdata()] == [37, 74, 111, 148, 150]
    legend = [x.get_text() for x in fig.axes[3].get_legend().get_texts()]
    assert legend == ["full", "full+competence"]


def test_runs_shorter_than_the_log_interval_draw_epoch_means_for_the_whole_panel(tmp_path: Path) -> None:
    fig = curves_figure(_runs(tmp_path / "run", ["full", "random-0.2"], updates=20, save=5, epoch_len=6))
    t = _lines(fig.axes[1])
    assert set(t) == {"full:epoch", "random-0.2:epoch"}  # never a mix of interval and epoch means
    assert [int(x) for x in t["full:epoch"].get_xdata()] == [6, 12, 18, 20]
    assert "epoch means" in fig.axes[1].get_title()


def _rows(pairs: list[str], seeds: int) -> list[dict]:
    rows = []
    for st, sp in (("full", 0.0), ("el2n-high", 0.2), ("random", 0.2)):
        for seed in range(1, seeds + 1):
            for p in [*pairs, "all"]:
                rows.append({"strategy": st, "sparsity": sp, "seed": seed, "pair": p, "bleu": 20 + seed + sp,
                             "chrf": 40.0, "n_train": 100})
    return rows


def test_bleu_plot_names_its_band_and_draws_one_panel_for_one_pair() -> None:
    fig = bleu_figure(_rows(["de-en"], 2), ["de-en"])
    shown = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in shown] == ["de-en"]  # no "average" panel repeating it
    legend = [x.get_text() for x in fig.legends[0].get_texts()]
    assert "full ± std over 2 seeds" in legend  # the grey band
    assert any(x.startswith("full (unpruned") for x in legend)  # the dashed line
    assert any(p.get_gid() == "de-en:full-band" for p in shown[0].patches)

    fig = bleu_figure(_rows(["de-en", "en-fr"], 1), ["de-en", "en-fr"])
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["de-en", "en-fr", "mean over the 2 OPUS test sets"]
    legend = [x.get_text() for x in fig.legends[0].get_texts()]
    assert not any("std" in x for x in legend)  # one seed: no band, no error bars to explain


def _scores(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    pairs = ["de-en"] * (n // 2) + ["en-fr"] * (n // 2)
    ids = [f"{p}/{i}" for p, i in zip(pairs, list(range(n // 2)) * 2, strict=True)]
    return pd.DataFrame({"sentence_id": ids, "pair": pairs, "index": np.arange(n),
                         "n_tokens": rng.integers(3, 30, n), "el2n": rng.random(n)})


def test_el2n_hist_marks_labelled_noise_and_the_cut_offs() -> None:
    df = _scores()
    labels = {sid: ("misaligned" if i % 2 else "truncated") for i, sid in enumerate(df["sentence_id"][::10])}
    cuts = el2n_cuts(df, ["el2n-high", "random"], [0.0, 0.1, 0.3], "global", 1)
    top = np.sort(df["el2n"].to_numpy())[::-1]
    assert cuts == [("el2n-high", 0.1, None, top[19]), ("el2n-high", 0.3, None, top[59])]  # 20 and 60 of 200 dropped
    fig = hist_figure(df, (labels, "01_download/noise.ids"), cuts)
    per_pair, noise = fig.axes
    for ax in (per_pair, noise):
        assert {ln.get_gid(): ln.get_xdata()[0] for ln in ax.get_lines()} == \
            {"cut:el2n-high:0.1:all": top[19], "cut:el2n-high:0.3:all": top[59]}
    assert {p.get_gid() for p in noise.patches} == {"clean", "noise:misaligned", "noise:truncated"}
    legend = [x.get_text() for x in noise.get_legend().get_texts()]
    assert legend[0] == "clean (180)" and {"misaligned (10)", "truncated (10)"} <= set(legend)
    assert f"el2n-high 0.1: drops EL2N ≥ {top[19]:.3f}" in [x.get_text() for x in per_pair.get_legend().get_texts()]

    cuts = el2n_cuts(df, ["el2n-high"], [0.1], "per-pair", 1)  # one cut-off per pair, drawn in its colour
    for pair in ("de-en", "en-fr"):
        v = np.sort(df.loc[df["pair"] == pair, "el2n"].to_numpy())[::-1]
        assert (("el2n-high", 0.1, pair, v[9])) in cuts
    fig = hist_figure(df, None, cuts)
    assert len(fig.axes) == 1  # no labels: no noise panel
    assert {ln.get_gid() for ln in fig.axes[0].get_lines()} == {"cut:el2n-high:0.1:de-en", "cut:el2n-high:0.1:en-fr"}


def _download(root: Path, n: int = 30) -> RunLayout:
    layout = RunLayout(root)
    layout.pair_dir("de-en").mkdir(parents=True)
    layout.download_ids("de-en").write_text("".join(f"de-en/{i}\n" for i in range(n)))
    layout.split_file("de-en", "train", "de").write_text("".join(f"satz {i}\n" for i in range(n)))
    layout.split_file("de-en", "train", "en").write_text("".join(f"sentence {i}\n" for i in range(n)))
    return layout


def _md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in ln.split("|")[1:-1]] for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]


@pytest.mark.parametrize("labelled", [True, False])
def test_examples_carry_the_noise_kind_when_labels_are_known(tmp_path: Path, labelled: bool) -> None:
    layout = _download(tmp_path / "run")
    df = pd.DataFrame({"sentence_id": [f"de-en/{i}" for i in range(30)], "pair": "de-en",
                       "el2n": np.linspace(0, 1, 30)})
    labels = ({"de-en/29": "untranslated", "de-en/0": "truncated"}, "01_download/noise.ids") if labelled else None
    rows = _md_rows(_examples(load_config(TINY, ["report.n_examples=3"]), layout, df, labels))
    if not labelled:
        assert rows[0] == ["sentence id", "EL2N", "de", "en"] and all(len(r) == 4 for r in rows)
        return
    assert rows[0] == ["sentence id", "EL2N", "de", "en", "noise"]
    kind = {r[0]: r[4] for r in rows if r[0] != "sentence id"}
    assert kind == {"de-en/29": "untranslated", "de-en/28": "", "de-en/27": "", "de-en/0": "truncated",
                    "de-en/1": "", "de-en/2": ""}


@pytest.mark.slow
def test_the_tiny_sweeps_report_labels_its_examples_and_keeps_epoch_means_apart(tiny_swept: tuple[Path, str]) -> None:
    run, _ = tiny_swept
    layout = RunLayout(run)
    noise = dict(ln.split("\t") for ln in layout.noise_ids.read_text().splitlines())
    rows = _md_rows(layout.report_file("examples.md").read_text())
    assert rows[0][-1] == "noise"
    body = [r for r in rows if r[0] != "sentence id"]
    assert body and all(r[-1] == noise.get(r[0], "") for r in body)
    assert any(r[-1] for r in body)  # the synthetic corpus's untranslated pairs top the EL2N ranking
    for log in layout.stage_dir("train").glob("*/train.log"):  # 20 updates: under fairseq's log interval
        c = read_curves(log)
        assert not c["train"] and c["epoch"] and c["valid"]
