"""Cluster launching without a cluster: submitit's local executor runs the real jobs; a stand-in
`sbatch` (the one thing that cannot exist here) records what would be submitted to Slurm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY, cli
from mtprune.layout import STAGES, RunLayout

FAKE_SBATCH = """#!/bin/bash
# stands in for Slurm's sbatch: remembers the script, answers like sbatch does
n=$(( $(cat "$SBATCH_COUNTER" 2>/dev/null || echo 100) + 1 ))
echo "$n" > "$SBATCH_COUNTER"
cp "$1" "$SBATCH_LOG/job$n.sh"
echo "Submitted batch job $n"
"""


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch-log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 0\n")  # submitit looks for it before submitting
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COUNTER", str(tmp_path / "counter"))
    monkeypatch.setenv("SBATCH_LOG", str(log))
    return log


def test_slurm_sweep_submits_the_whole_chain_with_dependencies(fake_sbatch: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--launcher", "slurm",
                    "--set", "launch.slurm.partition=gpu", "--set", "launch.slurm.gpus_per_node=4",
                    "--set", "launch.score_shards=3", "--set", "launch.slurm.extra=[constraint=a100]")
    assert code == 0, out
    scripts = {int(p.stem[3:]): p.read_text() for p in fake_sbatch.glob("job*.sh")}
    # download, prepare, proxy array + finalize, score array + merge, prune, train array + finalize, evaluate, report
    assert len(scripts) == 11
    by_stage = {}
    for n, text in sorted(scripts.items()):
        stage = next(s for s in STAGES if f"--job-name=mtprune-{s}" in text)
        by_stage.setdefault(stage, []).append((n, text))
    assert "--dependency" not in by_stage["download"][0][1]
    assert "#SBATCH --dependency=afterok:101" in by_stage["prepare"][0][1]
    proxy_array, proxy_final = by_stage["proxy"]
    assert "#SBATCH --array=0-1%2" in proxy_array[1] and "#SBATCH --dependency=afterok:102" in proxy_array[1]
    assert f"#SBATCH --dependency=afterok:{proxy_array[0]}_0:{proxy_array[0]}_1" in proxy_final[1]
    assert "#SBATCH --array=0-2%3" in by_stage["score"][0][1]
    assert "#SBATCH --gpus-per-node=4" in proxy_array[1] and "gpus-per-node" not in by_stage["prune"][0][1]
    assert "#SBATCH --partition=gpu" in by_stage["report"][0][1]
    assert "#SBATCH --constraint=a100" in by_stage["train"][0][1]
    assert "#SBATCH --kill-on-invalid-dep=yes" in by_stage["evaluate"][0][1]
    assert "proxy --unit seed2" in out and "score --shard 2/3" in out and "train --unit random-0.2" in out
    assert not RunLayout(run).stage_dir("download").exists()  # submitted, not run
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(run))
    assert "queued" in out and "train --unit full" in out


def test_slurm_without_sbatch_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    code, out = cli("proxy", "-c", str(TINY), "--run-dir", str(tmp_path / "run"), "--launcher", "slurm")
    assert code == 2 and "needs Slurm's sbatch on PATH" in out and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_scripts_are_valid_bash_with_the_configured_resources(stage: str, tmp_path: Path) -> None:
    code, out = cli("slurm-script", stage, "-c", str(TINY), "--run-dir", str(tmp_path / "run"),
                    "--set", "launch.slurm.partition=big", "--set", "launch.slurm.account=mt",
                    "--set", "launch.slurm.mem_gb=200", "--set", "launch.slurm.time_min=90")
    assert code == 0, out
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for line in ("#SBATCH --partition=big", "#SBATCH --account=mt", "#SBATCH --mem=200G", "#SBATCH --time=90"):
        assert line in out
    assert f"mtprune {stage} -c" in out and "--launcher local" in out
    assert ("#SBATCH --gpus-per-node=1" in out) == (stage in ("proxy", "score", "train", "evaluate"))
    if stage == "proxy":
        assert "#SBATCH --array=0-1%8" in out and "UNITS=(seed1 seed2)" in out


@pytest.mark.slow
def test_sweep_through_submitit_local_jobs_respects_order_and_redoes_a_killed_unit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run), "--set", "launch.score_shards=2"]
    code, out = cli("sweep", *sets, "--launcher", "submitit-local")
    assert code == 0, out
    L = RunLayout(run)
    manifests = [json.loads(L.manifest(s).read_text()) for s in STAGES]
    for before, after in zip(manifests, manifests[1:], strict=False):
        assert after["started"] >= before["finished"], (before["stage"], after["stage"])
    assert manifests[STAGES.index("score")]["stats"]["merged_shards"] == 2
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    assert len({j["folder"] for j in jobs}) == len(STAGES)  # real submitit job folders, one per stage
    code, out = cli("status", *sets)
    assert out.count(" done ") == len(jobs)

    # a unit killed before it finished: its folder lost done.json, the stage has no manifest
    (L.train_dir("random-0.2") / "done.json").unlink()
    for s in ("train", "evaluate", "report"):
        L.manifest(s).unlink()
    code, out = cli("sweep", *sets, "--launcher", "submitit-local")
    assert code == 0, out
    logs = {p.name: p.read_text() for p in (run / "slurm" / "train").glob("*_log.err")}
    redone = [t for t in logs.values() if "train random-0.2" in t and "running 1 unit" in t]
    skipped = [t for t in logs.values() if "train full: already done, skipping" in t]
    assert redone and skipped
    assert all(json.loads(L.manifest(s).read_text()) for s in STAGES)
    shutil.rmtree(run / "slurm")
