"""A sparsity that keeps nothing is refused by prune before anything is written (issue 14, item 10):
fairseq-train would otherwise die later on an empty data-bin."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import TINY, cli, error_lines
from mtprune.config import load_config
from mtprune.layout import RunLayout
from mtprune.stages import prune


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_a_sparsity_that_keeps_nothing_is_refused_and_the_last_prune_is_kept(tiny_copy: Path) -> None:
    run = tiny_copy
    base = ["-c", str(TINY), "--run-dir", str(run), "-q"]
    code, out = cli("prune", *base)
    assert code == 0, out
    layout = RunLayout(run)
    before = digest(layout.stage_dir("prune"))
    n = sum(1 for _ in (layout.stage_dir("prepare") / "train.ids").open())

    # global scope: 0.9999 of all pairs rounds to all of them
    code, out = cli("prune", *base, "--set", "prune.sparsities=[0.2,0.9999]")
    assert code == 2, out
    assert error_lines(out) == [out.strip()]
    assert (f"prune.sparsities: 0.9999 with strategy el2n-high would leave 0 of the {n} training pairs; "
            "use a smaller sparsity") in out

    # per-pair scope: 0.999 keeps one pair of the whole corpus but none of each language pair
    cfg = load_config(TINY, ["prune.sparsities=[0.999]"], str(run))
    prune.preflight(cfg, layout)  # globally, one pair is left: accepted
    code, out = cli("prune", *base, "--set", "prune.sparsities=[0.999]", "--set", "prune.scope=per-pair",
                    "--set", "prune.strategies=[random]")
    assert code == 2, out
    assert error_lines(out) == [out.strip()]
    assert "prune.sparsities: 0.999 with strategy random would leave 0 of the " in out
    assert "training pairs of de-en (prune.scope: per-pair); use a smaller sparsity" in out

    # nothing was written: the last good prune is untouched and still fresh
    assert digest(layout.stage_dir("prune")) == before
    assert not layout.stage_dir("prune").with_name(layout.stage_dir("prune").name + ".previous").exists()
    assert not any(layout.stage_dir("prune").glob("*-0.9999")) and not any(layout.stage_dir("prune").glob("*-0.999"))
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(run))
    assert code == 0, out
    assert any(line.split()[:2] == ["prune", "fresh"] for line in out.splitlines()), out
