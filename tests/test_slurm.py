"""Cluster launching without a cluster: submitit's local executor runs the real jobs; a stand-in
`sbatch` (the one thing that cannot exist here) records what would be submitted to Slurm."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY, cli, error_lines
from mtprune.layout import STAGES, RunLayout

FAKE_SACCT = """#!/bin/bash
# stands in for Slurm's sacct: answers from a file of JobID|State|NodeList lines
echo "JobID|State|NodeList"
cat "$SACCT_STATES" 2>/dev/null || true
"""

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
    (bin_dir / "sacct").write_text(FAKE_SACCT)
    for tool in ("sbatch", "srun", "sacct"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COUNTER", str(tmp_path / "counter"))
    monkeypatch.setenv("SBATCH_LOG", str(log))
    monkeypatch.setenv("SACCT_STATES", str(tmp_path / "sacct-states"))
    return log


def sbatch_options_of(script: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --"))


def submitted_scripts(log: Path) -> list[str]:
    return [p.read_text() for p in sorted(log.glob("job*.sh"), key=lambda p: int(p.stem[3:]))]


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
    # jobs that only finish a stage (manifest, merging shards) hold no GPUs; evaluate does
    for stage in ("proxy", "score", "train"):
        array, final = by_stage[stage]
        assert "#SBATCH --gpus-per-node=4" in array[1] and "gpus-per-node" not in final[1], stage
    assert "#SBATCH --gpus-per-node=4" in by_stage["evaluate"][0][1]
    assert "#SBATCH --partition=gpu" in by_stage["report"][0][1]
    assert "#SBATCH --constraint=a100" in by_stage["train"][0][1]
    assert "#SBATCH --kill-on-invalid-dep=yes" in by_stage["evaluate"][0][1]
    assert "proxy --unit seed2" in out and "score --shard 2/3" in out and "train --unit random-0.2" in out
    assert not RunLayout(run).stage_dir("download").exists()  # submitted, not run
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(run))
    assert "queued" in out and "train --unit full" in out

    # states as Slurm's accounting reports them
    (tmp_path / "sacct-states").write_text(
        "101|COMPLETED|n1\n102|FAILED|n1\n103_0|RUNNING|n2\n103_1|CANCELLED by 1000|\n104|PENDING|\n")
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(run))
    states = {line.split()[0]: line.split()[1] for line in out.splitlines() if line[:3].strip().isdigit()}
    assert states["101"] == "done" and states["102"] == "failed" and states["104"] == "queued"
    assert states["103_0"] == "running" and states["103_1"] == "cancelled"
    assert states["105_0"] == "queued"  # not in accounting (yet) and no log: submitit has no outcome either


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
    assert f"-m mtprune {stage} -c {tmp_path / 'run' / 'slurm' / 'config-'}" in out and "--launcher local" in out
    assert "config.resolved.yaml" not in out
    assert ("#SBATCH --gpus-per-node=1" in out) == (stage in ("proxy", "score", "train", "evaluate"))
    if stage == "proxy":
        assert "#SBATCH --array=0-1%2" in out and "UNITS=(seed1 seed2)" in out  # as submitit writes it


def test_submitit_jobs_and_sbatch_scripts_ask_for_the_same_resources(fake_sbatch: Path, tmp_path: Path) -> None:
    import submitit

    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run), "--set", "launch.slurm.partition=gpu",
            "--set", "launch.slurm.account=mt", "--set", "launch.slurm.qos=high",
            "--set", "launch.slurm.gpus_per_node=4", "--set", "launch.slurm.cpus_per_task=3",
            "--set", "launch.slurm.mem_gb=20", "--set", "launch.slurm.time_min=30",
            "--set", "launch.slurm.array_parallelism=1", "--set", "launch.slurm.extra=[constraint=a100,mail-type=END]"]
    only_submitit = {"error", "open-mode", "signal", "wckey", "output"}  # submitit's own plumbing
    for stage, variants in (("proxy", [[], ["--finish"]]), ("evaluate", [[]]), ("prune", [[]])):
        before = len(submitted_scripts(fake_sbatch))
        code, out = cli(stage, *sets, "--launcher", "slurm")
        assert code == 0, out
        by_submitit = submitted_scripts(fake_sbatch)[before:]
        assert len(by_submitit) == len(variants)
        for submitted, variant in zip(by_submitit, variants, strict=True):
            code, script = cli("slurm-script", stage, *variant, *sets)
            assert code == 0, script
            theirs = {k: v for k, v in sbatch_options_of(submitted).items() if k not in only_submitit}
            ours = {k: v for k, v in sbatch_options_of(script).items() if k != "output"}
            if variant:  # the finishing job waits for the array (a hand-written chain adds this to sbatch)
                assert theirs.pop("dependency") == "afterok:101_0:101_1"
            assert theirs == ours, (stage, variant)
            assert ours["kill-on-invalid-dep"] == "yes" and ours["partition"] == "gpu" and ours["qos"] == "high"
            assert ours["account"] == "mt" and ours["cpus-per-task"] == "3" and ours["mem"] == "20G"
            assert ours["time"] == "30" and ours["constraint"] == "a100" and ours["mail-type"] == "END"
            assert ("gpus-per-node" in ours) == (stage == "evaluate" or (stage == "proxy" and not variant))
            if stage == "proxy" and not variant:
                assert ours["array"] == "0-1%1"
    # the submitted job runs exactly the command line of the script (the unit substituted)
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    seed2 = next(j for j in jobs if j["argv"][-2:] == ["--unit", "seed2"])
    fn = submitit.SlurmJob(seed2["folder"], seed2["job_id"]).submission().function
    code, script = cli("slurm-script", "proxy", *sets)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    expected = srun.replace('"${UNITS[$SLURM_ARRAY_TASK_ID]}"', "seed2")
    assert "srun " + shlex.join(fn.command) == expected
    assert fn.command[:4] == [sys.executable, "-m", "mtprune", "proxy"]


def test_jobs_read_a_config_snapshot_of_their_submission(fake_sbatch: Path, tmp_path: Path) -> None:
    import submitit

    run = tmp_path / "run"
    common = ["-c", str(TINY), "--run-dir", str(run)]
    code, out = cli("sweep", *common, "--launcher", "slurm", "--set", "prune.sparsities=[0.2]")
    assert code == 0, out
    first = json.loads((run / "slurm" / "jobs.json").read_text())
    configs = {j["argv"][j["argv"].index("-c") + 1] for j in first}
    assert len(configs) == 1
    snapshot = Path(configs.pop())
    assert snapshot.parent == (run / "slurm").resolve()
    assert yaml.safe_load(snapshot.read_text())["prune"]["sparsities"] == [0.2]
    text = snapshot.read_text()
    # the run's resolved config names what finished artifacts came from: submitting does not touch it
    assert not RunLayout(run).resolved_config.exists()

    # a later submission (or script) with other settings does not change what the queued jobs read
    code, out = cli("sweep", *common, "--launcher", "slurm", "--set", "prune.sparsities=[0.4]")
    assert code == 0, out
    code, script = cli("slurm-script", "prune", *common, "--set", "prune.sparsities=[0.3]")
    assert code == 0, script
    assert snapshot.read_text() == text
    assert len(list((run / "slurm").glob("config-*.yaml"))) == 3
    job = submitit.SlurmJob(first[-1]["folder"], first[-1]["job_id"])
    assert job.submission().function.argv[:3] == ("report", "-c", str(snapshot))


def test_slurm_module_does_not_import_the_cli() -> None:
    import ast

    import mtprune.slurm

    tree = ast.parse(Path(mtprune.slurm.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and (m == "cli" or m.endswith(".cli"))}, "import circle with mtprune.cli"


def test_a_failed_submitit_local_job_is_one_line_and_shows_as_failed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run)]
    code, out = cli("prepare", *sets, "--launcher", "submitit-local")  # download has not run
    assert code == 1, out
    lines = error_lines(out)
    assert len(lines) == 1 and "prepare: job" in lines[0], out
    assert "`mtprune prepare` exited with 2" in lines[0] and "upstream stage 'download' is missing" in lines[0]
    code, out = cli("status", *sets)
    assert [line.split()[1] for line in out.splitlines() if "prepare" in line and "jobs" not in line][-1] == "failed"


@pytest.mark.slow
def test_sweep_through_submitit_local_jobs_respects_order_and_redoes_a_killed_unit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # the tiny sweep made smaller still (one seed, two short retraining runs): every job still runs
    small = ["proxy.seeds=[1]", "prune.strategies=[random]", "train.max_update=10", "train.warmup_updates=2",
             "launch.score_shards=2"]
    sets = ["-c", str(TINY), "--run-dir", str(run), *[a for s in small for a in ("--set", s)]]
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
