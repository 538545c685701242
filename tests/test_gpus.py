"""Every GPU used on one machine: GPU groups for proxy seeds and retraining runs, one score shard process
per GPU, evaluate's models spread over the GPUs. There is no GPU here: only the GPU count is replaced
(``gpus.device_count``); what each unit, child process and worker would get is checked."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY, clear_score_but_baselines, cli, error_lines
from mtprune import gpus
from mtprune.config import load_config
from mtprune.errors import UsageError
from mtprune.fairseq_backend import run_logged, world_size
from mtprune.launch import Unit, run_units
from mtprune.layout import RunLayout
from mtprune.lock import RunLock, unit_lock_path
from mtprune.pipeline import Freshness
from mtprune.scoring.shards import score_shard_jobs


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int, visible: str | None = None) -> None:
    monkeypatch.setattr(gpus, "device_count", lambda: n)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    assert gpus.visible() == ["0", "1"]
    _gpus(monkeypatch, 2, "3,5")
    assert gpus.visible() == ["3", "5"]
    _gpus(monkeypatch, 0, "3,5")
    assert gpus.visible() == []


def test_plan_groups() -> None:
    eight = [str(i) for i in range(8)]
    assert gpus.plan_groups(eight, 1) == [(g,) for g in eight]
    assert gpus.plan_groups(eight, 2) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert gpus.plan_groups(eight, 3) == [("0", "1", "2"), ("3", "4", "5")]  # 6 and 7 left idle
    assert gpus.plan_groups(eight, 8) == [tuple(eight)]
    assert gpus.plan_groups(["2", "5", "7"], 2) == [("2", "5")]
    with pytest.raises(UsageError) as e:
        gpus.plan_groups(["0", "1"], 3)
    msg = str(e.value)
    assert msg.startswith("launch.gpus_per_run: 3 GPUs per run") and "2" in msg and "\n" not in msg


def _echo_unit(root: Path, name: str, seen: dict[str, Any], barrier: threading.Barrier) -> Unit:
    """A unit whose work runs a real subprocess (as fairseq-train runs) that prints its CUDA_VISIBLE_DEVICES."""

    def work(folder: Path, threads: int) -> dict[str, Any]:
        start = time.monotonic()
        barrier.wait(timeout=60)  # a timeout here: the units did not run at the same time
        show = "import os; print('CVD=' + os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"
        lines = run_logged([sys.executable, "-c", show], folder / "train.log", threads)
        seen[name] = {"cvd": lines[-1].removeprefix("CVD="), "world": world_size(seen["use_cuda"]),
                      "start": start, "end": time.monotonic()}
        (folder / "out.txt").write_text("x")
        return {"world_size": world_size(seen["use_cuda"])}

    return Unit(f"proxy {name}", root / name, {"unit": name}, work, ["out.txt"], root / ".lock")


def _run_echo_units(root: Path, n: int, parallel_expected: int, use_cuda: bool,
                    gpus_per_run: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    seen: dict[str, Any] = {"use_cuda": use_cuda}
    barrier = threading.Barrier(parallel_expected)
    units = [_echo_unit(root, f"seed{k}", seen, barrier) for k in range(1, n + 1)]
    results = run_units(units, parallel=0, use_cuda=use_cuda, gpus_per_run=gpus_per_run)
    return seen, results


def test_units_run_one_per_gpu_each_seeing_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2, "4,6")  # the machine lets this process use physical GPUs 4 and 6
    seen, results = _run_echo_units(tmp_path / "one", 4, parallel_expected=2, use_cuda=True)
    # units start in order, two at a time (the barrier proves it), on different GPUs
    assert {seen["seed1"]["cvd"], seen["seed2"]["cvd"]} == {"4", "6"}
    assert {seen["seed3"]["cvd"], seen["seed4"]["cvd"]} == {"4", "6"}
    assert all(seen[f"seed{k}"]["world"] == 1 for k in range(1, 5))  # fairseq-train trains on 1 GPU each
    assert all(r == {"world_size": 1} for r in results.values())  # what done.json records

    # two GPUs per run: DDP over both, one run at a time
    seen, results = _run_echo_units(tmp_path / "two", 2, parallel_expected=1, use_cuda=True, gpus_per_run=2)
    assert [seen[f"seed{k}"]["cvd"] for k in (1, 2)] == ["4,6", "4,6"]
    assert seen["seed1"]["end"] <= seen["seed2"]["start"] or seen["seed2"]["end"] <= seen["seed1"]["start"]
    assert all(r == {"world_size": 2} for r in results.values())


def test_on_cpu_units_get_no_gpu_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    monkeypatch.setattr("mtprune.launch.usable_cpus", lambda: 2)  # two units at once as on 2 cores
    seen, results = _run_echo_units(tmp_path, 2, parallel_expected=2, use_cuda=False)
    assert [seen[f"seed{k}"]["cvd"] for k in (1, 2)] == ["<unset>", "<unset>"]
    assert all(r == {"world_size": 1} for r in results.values())


def test_more_gpus_per_run_than_present_is_one_line_before_any_unit_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    seen: dict[str, Any] = {"use_cuda": True}
    unit = _echo_unit(tmp_path, "seed1", seen, threading.Barrier(1))
    with pytest.raises(UsageError, match=r"^launch\.gpus_per_run: 3 GPUs per run"):
        run_units([unit], parallel=0, use_cuda=True, gpus_per_run=3)
    assert not unit.folder.exists()


@pytest.mark.slow  # tiny_run trains the proxies
def test_gpus_per_run_is_speed_only(tiny_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtprune.stages import proxy

    cfg = load_config(TINY, ["launch.gpus_per_run=4"], run_dir=str(tiny_copy))
    layout = RunLayout(tiny_copy)
    assert Freshness(cfg, layout)("proxy").fresh
    # a finished proxy seed stays done, even where 4 GPUs per run could not be given
    _gpus(monkeypatch, 2)
    units = proxy.units(cfg, layout, use_cuda=True)
    results = run_units(units, cfg.proxy.parallel, use_cuda=True, gpus_per_run=cfg.launch.gpus_per_run)
    assert set(results) == {"proxy seed1", "proxy seed2"}


def _score_files(layout: RunLayout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout.scores, layout.grad_sketch)}


@pytest.mark.slow  # tiny_run trains the proxies
def test_score_runs_one_shard_process_per_gpu(tiny_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = RunLayout(tiny_copy)
    args = ("-c", str(TINY), "--run-dir", str(tiny_copy))
    # the reference: two shards scored by hand, then merged by `mtprune score`
    clear_score_but_baselines(layout)
    for i in range(2):
        code, out = cli("score", *args, "--shard", f"{i}/2", "-q")
        assert code == 0, out
    code, out = cli("score", *args, "-q")
    assert code == 0, out
    by_hand = _score_files(layout)
    clear_score_but_baselines(layout)

    _gpus(monkeypatch, 2)
    jobs = score_shard_jobs(load_config(TINY, [], run_dir=str(tiny_copy)), layout, gpus.visible())
    assert [j.env["CUDA_VISIBLE_DEVICES"] for j in jobs] == ["0", "1"]
    assert [j.argv[3:] for j in jobs] == [["score", "-c", str(j.argv[5]), "--run-dir", str(tiny_copy),
                                           "--shard", f"{j.index}/2"] for j in jobs]
    # shard 1 cannot start (its lock is held): one line naming the shard and its log; shard 0 is kept
    with RunLock(unit_lock_path(layout.stage_dir("score") / "1-of-2"), "score --shard 1/2"):
        code, out = cli("score", *args, "-q")
    assert code == 1, out
    [line] = error_lines(out)
    assert "score shard 1/2 (CUDA_VISIBLE_DEVICES=1) exited with 1" in line and str(jobs[1].log) in line
    assert jobs[0].parquet.is_file() and not jobs[1].parquet.is_file()

    code, out = cli("score", *args)
    assert code == 0, out
    assert "shard 0/2 already scored" in out and "1 shard(s) at once" in out
    assert _score_files(layout) == by_hand
    for j in jobs:
        assert j.log.read_text().startswith(f"$ CUDA_VISIBLE_DEVICES={j.index} ")


def test_evaluate_uses_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtprune.stages import evaluate

    _gpus(monkeypatch, 2)
    assert evaluate.devices() == ["cuda:0", "cuda:1"]
    _gpus(monkeypatch, 0)
    assert evaluate.devices() == ["cpu"]


@pytest.mark.slow  # tiny_swept trains the models
def test_evaluate_spread_over_two_workers_writes_what_one_writes(
        tiny_swept: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtprune.stages import evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_swept[0], run, symlinks=True)
    layout = RunLayout(run)
    folder = layout.stage_dir("evaluate")
    one_device = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
                  if p.is_file() and p.parent != folder}  # every model's files, decoded on one device
    # two decoding workers as on two GPUs (torch here has no CUDA: both decode on the CPU); each
    # model's worker thread and time are recorded around the real work
    monkeypatch.setattr(evaluate, "devices", lambda: ["cpu", "cpu"])
    spans: list[tuple[int, float, float]] = []
    real = evaluate._evaluate_model

    def spy(*a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return real(*a, **kw)
        finally:
            spans.append((threading.get_ident(), t0, time.monotonic()))

    monkeypatch.setattr(evaluate, "_evaluate_model", spy)
    code, out = cli("evaluate", "-c", str(TINY), "--run-dir", str(run), "--overwrite", "-q")
    assert code == 0, out
    two = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.parent != folder}
    assert two == one_device
    assert len({t for t, _, _ in spans}) == 2
    assert any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in spans for b in spans)  # overlapping
    # an unchanged checkpoint is not decoded again
    models = len(spans)
    layout.manifest("evaluate").unlink()
    code, out = cli("evaluate", "-c", str(TINY), "--run-dir", str(run), "-q")
    assert code == 0, out
    stats = json.loads(layout.manifest("evaluate").read_text())["stats"]
    assert stats["n_decoded"] == 0 and stats["n_reused"] == models * len(stats["test_sets"])
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.parent != folder} == one_device


def test_a_multi_node_job_leaves_gpu_choice_to_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtprune.fairseq_backend import subprocess_env

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    with gpus.using(("1",)):
        assert subprocess_env(1)["CUDA_VISIBLE_DEVICES"] == "1"
        # srun starts fairseq-train on every node: the first node's GPU ids must not travel with it
        monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        assert "CUDA_VISIBLE_DEVICES" not in subprocess_env(1)
