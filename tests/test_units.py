"""Work units (proxy seeds, retraining runs) on a tiny real run: a missing or damaged output is
redone instead of accepted, finished work survives a killed run with other settings, and settings
that change only speed leave finished units done."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, built_once, cli
from mtprune import config
from mtprune.layout import RunLayout

pytestmark = pytest.mark.slow

# one proxy seed and one retrained model, four updates each; no baseline columns (no strategy here reads them)
SETS = ["proxy.seeds=[1]", "proxy.checkpoints=[2,4]", "proxy.warmup_updates=1", "score.baselines=false",
        "prune.strategies=[random]", "train.include_full=false", "train.max_update=4", "train.warmup_updates=1"]


def args(run: Path, *more: str) -> list[str]:
    return ["-c", str(TINY), "--run-dir", str(run), *[a for s in [*SETS, *more] for a in ("--set", s)]]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small run taken through train, once per test session (pytest-xdist's workers share it): copy it
    (``run``) before changing anything in it."""

    def build(folder: Path) -> None:
        for stage in ("download", "prepare", "proxy", "score", "prune", "train"):
            code, out = cli(stage, *args(folder / "run"), "-q")
            assert code == 0, out

    return built_once(tmp_path_factory, "units", build) / "run"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def whole_checkpoint(path: Path) -> None:
    import torch

    assert "model" in torch.load(path, map_location="cpu", weights_only=False)


def stage_status(run: Path, stage: str) -> str:
    code, out = cli("status", *args(run))
    return next(ln.split()[1] for ln in out.splitlines() if ln.strip().startswith(stage + " "))


def test_a_truncated_proxy_checkpoint_is_redone_not_accepted(run: Path) -> None:
    ckpt = RunLayout(run).proxy_checkpoint(1, 2)
    with open(ckpt, "r+b") as f:
        f.truncate(1000)
    code, out = cli("proxy", *args(run))
    assert code == 0, out
    assert "proxy seed1: checkpoint_u2.pt is damaged" in out and "redoing it" in out
    assert "already done" not in out
    whole_checkpoint(ckpt)
    assert stage_status(run, "proxy") == "fresh"


def test_a_proxy_stopped_after_keeping_its_checkpoints_is_not_trained_again(run: Path) -> None:
    """Killed after the kept checkpoints were named and the others removed, before done.json."""
    folder = RunLayout(run).proxy_checkpoint(1, 2).parent
    (folder / "done.json").unlink()
    RunLayout(run).manifest("proxy").unlink()  # the stage had not finished either
    kept = files(folder)
    runs = (folder / "train.log").read_text().count("\n$ ")
    code, out = cli("proxy", *args(run))
    assert code == 0, out
    assert "every kept checkpoint is there" in out
    assert (folder / "train.log").read_text().count("\n$ ") == runs  # no fairseq-train started
    assert {n: b for n, b in files(folder).items() if n.endswith(".pt")} == {n: b for n, b in kept.items() if n.endswith(".pt")}
    assert stage_status(run, "proxy") == "fresh"


def test_a_deleted_final_checkpoint_is_redone_not_a_traceback(run: Path) -> None:
    best = RunLayout(run).train_dir("random-0.2") / "checkpoint_best.pt"
    best.unlink()
    code, out = cli("train", *args(run))
    assert code == 0, out
    assert "train random-0.2: checkpoint_best.pt is missing, redoing it" in out
    whole_checkpoint(best)
    assert stage_status(run, "train") == "fresh"


def test_a_run_killed_after_a_settings_change_leaves_the_finished_unit_in_place(run: Path) -> None:
    L = RunLayout(run)
    seed = L.proxy_seed_dir(1)
    before = files(seed)
    env = {**os.environ, "MTPRUNE_CRASH_AT": "unit-done:proxy seed1"}
    killed = subprocess.run([sys.executable, "-m", "mtprune", "proxy", *args(run, "proxy.lr=0.003"), "-q"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert files(seed) == before  # the last good model was not touched
    assert (L.stage_dir("proxy") / ".seed1.next" / "checkpoint_u4.pt").exists()  # the new one ran beside it

    # the old settings: still done, nothing retrained
    code, out = cli("proxy", *args(run))
    assert code == 0 and "proxy seed1: already done, skipping" in out and "running 1 unit" not in out, out
    assert files(seed) == before and stage_status(run, "proxy") == "fresh"

    # the new settings: the staged run finishes and only then replaces the old one
    code, out = cli("proxy", *args(run, "proxy.lr=0.003"))
    assert code == 0, out
    assert json.loads((seed / "done.json").read_text())["key"]["proxy"]["lr"] == 0.003
    assert sorted(p.name for p in L.stage_dir("proxy").iterdir() if p.is_dir()) == ["seed1"]
    whole_checkpoint(L.proxy_checkpoint(1, 4))


def test_speed_only_settings_leave_finished_units_done(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = cli("proxy", "--unit", "seed1", *args(run, "proxy.parallel=1"))
    assert code == 0 and "proxy seed1: already done, skipping" in out, out
    code, out = cli("train", "--unit", "random-0.2", *args(run, "train.parallel=1"))
    assert code == 0 and "train random-0.2: already done, skipping" in out, out
    # unit keys leave out whatever the one declared list of speed-only settings holds
    from mtprune.config import load_config
    from mtprune.stages import proxy, train

    monkeypatch.setattr(config, "SPEED_ONLY", (*config.SPEED_ONLY, "proxy.lr", "train.lr"))
    for stage in (proxy, train):
        a, b = (stage.units(load_config(TINY, [*SETS, *more], str(run)), RunLayout(run), False)
                for more in ([], ["proxy.lr=0.003", "train.lr=0.003"]))
        assert [u.key for u in a] == [u.key for u in b]
        assert [u.key for u in a] != [u.key for u in stage.units(
            load_config(TINY, [*SETS, "proxy.label_smoothing=0.2", "train.label_smoothing=0.2"], str(run)),
            RunLayout(run), False)]


def test_a_gpu_less_finishing_job_is_not_refused_for_fp16_when_every_unit_is_done(run: Path) -> None:
    # stand in for seeds trained in fp16 on GPUs: their done.json carries the fp16 key
    from mtprune.config import load_config
    from mtprune.stages import proxy

    fp16 = ["proxy.precision=fp16"]
    cfg = load_config(str(TINY), [*SETS, *fp16], str(run))
    for u in proxy.units(cfg, RunLayout(run), use_cuda=False):
        for name in ("done.json", "unit.json"):
            p = u.folder / name
            data = json.loads(p.read_text())
            if name == "done.json":
                data["key"] = u.key
            else:
                data = u.key
            p.write_text(json.dumps(data, sort_keys=True))
    code, out = cli("proxy", *args(run, *fp16))  # the job that only writes the manifest, here on a CPU
    assert code == 0 and "already done" in out, out
    code, out = cli("status", *args(run, *fp16))
    assert " proxy     fresh" in out, out
    # with a seed left to train, the same settings are refused before anything is touched
    shutil.rmtree(RunLayout(run).proxy_seed_dir(1))
    code, out = cli("proxy", *args(run, *fp16))
    assert code == 2 and "proxy.precision" in out, out


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 1  # the low byte of the last token id (end of sentence): another id within the vocabulary
    path.write_bytes(bytes(data))


def test_a_unit_trained_on_another_source_side_or_validation_set_trains_again(
        run: Path, caplog: pytest.LogCaptureFixture) -> None:
    # unit keys hold the target side's digest; the source side (a local copy edited on that side only) and the
    # validation set (it picks checkpoint_best) are recorded beside the key
    from mtprune.config import load_config
    from mtprune.launch import DONE, run_units, unit_state
    from mtprune.stages import proxy, train

    L = RunLayout(run)
    cfg = load_config(TINY, SETS, str(run))

    def finished() -> dict[str, bool]:
        return {u.name: unit_state(u, u.folder)[0] is not None
                for u in [*proxy.units(cfg, L, False), *train.units(cfg, L, False)]}

    assert finished() == {"proxy seed1": True, "train random-0.2": True}
    (model,) = train.seed_models(cfg, L)
    _flip_last_byte(model.data_bin / "valid.src-tgt.tgt.bin")  # the final model's copy of the validation set
    assert finished() == {"proxy seed1": True, "train random-0.2": False}
    _flip_last_byte(L.data_bin / "train.src-tgt.src.bin")
    assert finished() == {"proxy seed1": False, "train random-0.2": False}
    # work finished by an mtprune that recorded no input digests is judged by its key alone, as it was then
    (u,) = proxy.units(cfg, L, False)
    done = json.loads((u.folder / DONE).read_text())
    (u.folder / DONE).write_text(json.dumps({k: v for k, v in done.items() if k != "inputs"}))
    assert finished()["proxy seed1"]
    (u.folder / DONE).write_text(json.dumps(done))
    # run as the stage runs it (the stage itself first refuses: prepare's outputs changed behind its back)
    before = L.proxy_checkpoint(1, 4).read_bytes()
    with caplog.at_level(logging.INFO, logger="mtprune"):
        run_units(proxy.units(cfg, L, False), 1, False)
    assert "proxy seed1: finished on other training or validation data (train.src-tgt.src.bin changed)" in caplog.text
    assert finished()["proxy seed1"] and L.proxy_checkpoint(1, 4).read_bytes() != before


def test_a_shorter_list_of_seeds_keeps_finished_units_and_a_longer_one_reuses_them(run: Path) -> None:
    """proxy.seeds or train.seeds shrinking (then a plain command) must not delete the finished seed 2: its
    folder stays, the manifest lists only the configured units, and listing it again trains nothing."""
    L = RunLayout(run)
    for stage, more, seed2 in (("proxy", "proxy.seeds=[1,2]", L.proxy_seed_dir(2)),
                               ("train", "train.seeds=[1,2]", L.train_dir("random-0.2-seed2"))):
        code, out = cli(stage, *args(run, more))
        assert code == 0 and "running 1 unit" in out, out
        before = files(seed2)

        code, out = cli(stage, *args(run))  # the plain command, with the config's one seed
        assert code == 0 and "kept 1 folder(s) this config does not list" in out, out
        assert files(seed2) == before
        recorded = json.loads(L.manifest(stage).read_text())["outputs"]
        assert not any("seed2" in k for k in recorded), recorded
        assert stage_status(run, stage) == "fresh"

        code, out = cli(stage, *args(run, more))  # listed again: reused, nothing trains
        assert code == 0 and "unit(s), " not in out and out.count("already done, skipping") == 2, out
        assert files(seed2) == before
        assert cli(stage, *args(run))[0] == 0  # back to the config's seeds, for the next stage


def _state(out: str, stage: str) -> str:
    return next(ln.split(None, 1)[1] for ln in out.splitlines() if ln.startswith(f"  {stage} "))


def test_status_counts_the_finished_parts_and_units_of_an_unfinished_stage(tmp_path: Path) -> None:
    """Parts finished by `prepare --shard` jobs and proxy seeds finished by `--unit` jobs are what the next plain
    command reuses: status says how many there are while the stage is not finished; seeds finished with other
    settings do not count. The dry run says it once (its own note lists the units for proxy)."""
    run = tmp_path / "run"
    a = args(run, "proxy.seeds=[1,2]")
    for cmd in (["download"], ["prepare", "--shard", "0/2"]):
        code, out = cli(*cmd, *a, "-q")
        assert code == 0, out
    code, out = cli("status", *a)
    assert _state(out, "prepare") == "missing    not run yet; 1 of 2 part(s) finished (`prepare --shard`)", out
    code, out = cli("sweep", "--dry-run", *a)
    assert "run    prepare   missing: not run yet; 1 of 2 part(s) finished (`prepare --shard`)\n" in out, out
    for cmd in (["prepare", "--shard", "1/2"], ["prepare"], ["proxy", "--unit", "seed2"]):
        code, out = cli(*cmd, *a, "-q")
        assert code == 0, out
    code, out = cli("status", *a)
    assert _state(out, "prepare").startswith("fresh"), out
    assert _state(out, "proxy") == "missing    not run yet; 1 of 2 proxy run(s) finished (seed2)", out
    code, out = cli("sweep", "--dry-run", *a)
    assert ("run    proxy     missing: not run yet; 1 of 2 unit(s) run (seed1); 1 finished, reused\n") in out, out
    code, out = cli("status", *args(run, "proxy.seeds=[1,2]", "proxy.lr=0.001"))
    assert _state(out, "proxy") == "missing    not run yet", out
