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
from mtprune.slurm import short_command

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
                    "--set", "launch.gpus_per_run=2",
                    "--set", "launch.score_shards=3", "--set", "launch.slurm.extra=[constraint=a100]",
                    "--set", "launch.prepare_shards=1")  # prepare's array: test_prepare_is_a_cpu_array...
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
    # each job holds the GPUs it uses: a proxy seed / retraining run launch.gpus_per_run, a score shard one,
    # evaluate the node's; the jobs that only finish a stage (manifest, merging shards) and CPU stages none
    gpus = {stage: [sbatch_options_of(text).get("gpus-per-node") for _, text in jobs] for stage, jobs in by_stage.items()}
    assert gpus == {"download": [None], "prepare": [None], "proxy": ["2", None], "score": ["1", None],
                    "prune": [None], "train": ["2", None], "evaluate": ["4"], "report": [None]}
    for _, text in scripts.items():  # all on one node, one task (fairseq-train spawns a process per GPU itself)
        assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --partition=gpu" in by_stage["report"][0][1]
    assert "#SBATCH --constraint=a100" in by_stage["train"][0][1]
    assert "#SBATCH --kill-on-invalid-dep=yes" in by_stage["evaluate"][0][1]
    assert "proxy --unit seed2" in out and "score --shard 2/3" in out and "train --unit random-0.2" in out
    assert not RunLayout(run).stage_dir("download").exists()  # submitted, not run
    code, out = cli("status", "-c", str(TINY), "--run-dir", str(run))
    assert "queued" in out and "train --unit full" in out
    # with score.target the score merge computes the domain columns (a fine-tuning, a pass over the corpus): one GPU
    sets = ["-c", str(TINY), "--run-dir", str(tmp_path / "domain"), "--set", "launch.slurm.gpus_per_node=4",
            "--set", "launch.score_shards=3"]
    for target, gpus in (([], None), (["--set", "score.target.split=valid"], "1")):
        code, script = cli("slurm-script", "score", "--finish", *sets, *target)
        assert code == 0, script
        assert sbatch_options_of(script).get("gpus-per-node") == gpus, target

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
    # the first of prepare's array jobs (launch.prepare_shards: one part per array slot)
    assert "`mtprune prepare --shard 0/8` exited with 2" in lines[0] and "upstream stage 'download'" in lines[0]
    code, out = cli("status", *sets)
    assert [line.split()[1] for line in out.splitlines() if "prepare" in line and "jobs" not in line][-1] == "failed"


MULTI_NODE = ["--set", "launch.slurm.nodes=2", "--set", "launch.slurm.gpus_per_node=4", "--set", "launch.gpus_per_run=4"]


def command_line(script: str) -> str:
    """The line of a submitted (submitit) or written (slurm-script) script that runs the job's python."""
    return next(line for line in script.splitlines() if "-m submitit" in line or " -m mtprune " in line)


def test_multi_node_runs_hold_every_node_and_start_mtprune_once(fake_sbatch: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run), *MULTI_NODE, "--set", "launch.score_shards=2",
            "--set", "launch.prepare_shards=1"]
    code, out = cli("sweep", *sets, "--launcher", "slurm")
    assert code == 0, out
    by_stage: dict[str, list[str]] = {}
    for text in submitted_scripts(fake_sbatch):
        by_stage.setdefault(next(s for s in STAGES if f"--job-name=mtprune-{s}" in text), []).append(text)
    resources = {stage: [tuple(sbatch_options_of(t).get(k) for k in ("nodes", "ntasks-per-node", "gpus-per-node"))
                         for t in texts] for stage, texts in by_stage.items()}
    run_job, finish = ("2", "4", "4"), ("1", "1", None)  # a run: 2 nodes x 4 tasks, one per GPU
    assert resources == {"download": [finish], "prepare": [finish], "proxy": [run_job, finish],
                         "score": [("1", "1", "1"), finish], "prune": [finish], "train": [run_job, finish],
                         "evaluate": [("1", "1", "4")], "report": [finish]}
    # the multi-node job runs its python once (no srun around it: mtprune starts fairseq-train's srun itself)
    for stage in ("proxy", "train"):
        assert not command_line(by_stage[stage][0]).startswith("srun"), stage
        assert command_line(by_stage[stage][1]).startswith("srun --unbuffered"), stage
    assert command_line(by_stage["score"][0]).startswith("srun --unbuffered")

    # the hand-submitted script: the same resources and the same single start
    code, script = cli("slurm-script", "train", *sets)
    assert code == 0, script
    opts = sbatch_options_of(script)
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == run_job
    submitted = {k: v for k, v in sbatch_options_of(by_stage["train"][0]).items()
                 if k not in {"error", "open-mode", "signal", "wckey", "output", "dependency"}}
    assert submitted == {k: v for k, v in opts.items() if k != "output"}
    assert command_line(script).startswith(f"{sys.executable} -m mtprune train ")
    code, script = cli("slurm-script", "train", "--finish", *sets)
    assert command_line(script).startswith("srun ") and "gpus-per-node" not in sbatch_options_of(script)
    script_file = tmp_path / "train.sbatch"
    script_file.write_text(script)
    assert subprocess.run(["bash", "-n", str(script_file)]).returncode == 0


@pytest.mark.parametrize(("sets", "launcher", "key"), [
    (["launch.slurm.nodes=2"], "local", "launch.slurm.nodes"),
    (["launch.slurm.nodes=2"], "submitit-local", "launch.slurm.nodes"),
    (["launch.slurm.nodes=2", "launch.slurm.gpus_per_node=0"], "slurm", "launch.slurm.nodes"),
    (["launch.gpus_per_run=8", "launch.slurm.gpus_per_node=4"], "slurm", "launch.gpus_per_run"),
])
def test_multi_node_settings_that_cannot_work_are_one_line(sets: list[str], launcher: str, key: str,
                                                             fake_sbatch: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # not inside a Slurm job
    run = tmp_path / "run"
    common = ["-c", str(TINY), "--run-dir", str(run), *[a for x in sets for a in ("--set", x)]]
    for command in (["proxy"], ["sweep"]):
        code, out = cli(*command, *common, "--launcher", launcher)
        assert code == 2 and len(out.strip().splitlines()) == 1 and key in out, (command, out)
    assert not submitted_scripts(fake_sbatch) and not list(run.glob("*"))  # refused before anything was touched
    if launcher == "slurm":
        code, out = cli("slurm-script", "proxy", *common)
        assert code == 2 and len(out.strip().splitlines()) == 1 and key in out, out
    # the CPU stages and the jobs that finish a stage do not train: they are not refused
    code, out = cli("slurm-script", "prune", *common)
    assert code == 0, out
    code, out = cli("slurm-script", "proxy", "--finish", *common)
    assert code == 0, out


FAKE_SCONTROL = """#!/bin/bash
# stands in for `scontrol show hostnames LIST`, which fairseq's Slurm init calls
echo "$*" >> "$SCONTROL_LOG"
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a17\\ngpu-a18\\n'
"""


@pytest.mark.parametrize(("tasks_per_node", "gpus_visible"), [(2, 2), (1, 1)])
def test_fairseq_finds_rank_world_and_device_of_each_task_from_the_slurm_environment(
        tasks_per_node: int, gpus_visible: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The srun line mtprune builds in a 2-node job, and what fairseq's own Slurm init (infer_init_method)
    derives from the environment srun gives each task. No GPU here: the GPU count and the device choice
    are stood in for."""
    import torch
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as dist_utils

    from mtprune.config import ModelConfig
    from mtprune.fairseq_backend import Schedule, launch_argv, parse_train_argv, train_argv, world_size

    job = {"SLURM_JOB_ID": "73105", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "6",
           "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_JOB_NODELIST": "gpu-a[17-18]"}
    for k, v in job.items():
        monkeypatch.setenv(k, v)
    s = Schedule(max_update=10, lr=1e-3, warmup_updates=2, max_tokens=1024, update_freq=1, label_smoothing=0.1,
                 precision="fp16", seed=1, save_interval_updates=5)
    argv = launch_argv(train_argv(tmp_path / "data-bin", tmp_path / "save", ModelConfig(), s, use_cuda=True))
    world = 2 * tasks_per_node
    assert world_size(use_cuda=True) == world  # what update_freq and done.json are computed with
    start = argv.index(sys.executable)
    assert argv[:start] == ["srun", "--nodes=2", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=6",
                            "--export=ALL,OMP_NUM_THREADS=6,MKL_NUM_THREADS=6", "--kill-on-bad-exit=1"]
    assert argv[start:start + 3] == [sys.executable, "-m", "mtprune.fairseq_backend"]
    port = int(argv[argv.index("--distributed-port") + 1])
    assert 1024 < port < 65536 and argv[argv.index("--distributed-world-size") + 1] == str(world)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(tmp_path / "scontrol.log"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_visible)
    devices: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    derived = []
    for rank in range(2 * tasks_per_node):  # the environment srun gives each task of the step
        node, local = divmod(rank, tasks_per_node)
        task_env = {"SLURM_STEP_NODELIST": "gpu-a[17-18]", "SLURM_NODEID": str(node), "SLURM_PROCID": str(rank),
                    "SLURM_LOCALID": str(local), "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": str(world)}
        for k, v in task_env.items():
            monkeypatch.setenv(k, v)
        cfg = convert_namespace_to_omegaconf(parse_train_argv(argv[start:])).distributed_training
        dist_utils.infer_init_method(cfg)
        derived.append((cfg.distributed_init_method, cfg.distributed_rank, cfg.distributed_world_size,
                        cfg.device_id, cfg.distributed_no_spawn))
    init = f"tcp://gpu-a17:{port}"  # the first node of the step, the port every task was given
    if tasks_per_node > 1:  # one process per task: rank = SLURM_PROCID, GPU = SLURM_LOCALID
        assert derived == [(init, r, world, r % 2, True) for r in range(world)]
        assert devices == [1, 1]  # fairseq picks the task's GPU itself (device 0 is the default)
    else:  # one task per node: fairseq spawns one process per visible GPU, ranks from SLURM_NODEID
        assert derived == [(init, n, world, 0, False) for n in range(2)]
    assert (tmp_path / "scontrol.log").read_text().splitlines()[0] == "show hostnames gpu-a[17-18]"


def test_outside_a_multi_node_job_fairseq_train_starts_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtprune.fairseq_backend import launch_argv, slurm_span

    argv = [sys.executable, "-m", "mtprune.fairseq_backend", "data-bin"]
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    assert launch_argv(argv) == argv
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")  # a one-node job: fairseq-train spawns per GPU itself
    assert launch_argv(argv) == argv
    span = slurm_span({"SLURM_JOB_ID": "9_3", "SLURM_NNODES": "3", "SLURM_TASKS_PER_NODE": "8(x3)"})
    assert span is not None and (span.nodes, span.tasks_per_node, span.world) == (3, 8, 24)


@pytest.mark.slow
def test_two_fairseq_processes_train_one_model_over_gloo_on_cpu(tiny_run: Path, tmp_path: Path) -> None:
    """What each srun task of a 2-node job runs, for real on CPU: two processes of the fairseq-train
    command line mtprune builds, meeting at the address fairseq's Slurm init would derive (on CPU its
    Slurm init cannot run: it picks devices by CUDA index). pytorch's DDP takes no CPU device id, so
    fairseq's own legacy_ddp all-reduces the gradients here."""
    import socket

    from mtprune.config import ModelConfig
    from mtprune.fairseq_backend import Schedule, SlurmSpan, slurm_train_argv, subprocess_env, train_argv

    model = ModelConfig(**yaml.safe_load(TINY.read_text())["model"])
    s = Schedule(max_update=6, lr=1e-3, warmup_updates=2, max_tokens=512, update_freq=1, label_smoothing=0.1,
                 precision="fp32", seed=1, save_interval_updates=3)
    save = tmp_path / "save"
    argv = slurm_train_argv(train_argv(RunLayout(tiny_run).data_bin, save, model, s, use_cuda=False),
                            SlurmSpan(nodes=2, tasks_per_node=1, job_id=1))
    task_argv = argv[argv.index(sys.executable):]  # what srun starts on every task
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = ["--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    procs = [subprocess.Popen([*task_argv, *init, "--distributed-rank", str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=subprocess_env(1)) for rank in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "training on 2 devices" in outs[0] and "initialized host" in outs[1]
    # the logged words per batch add both processes' batches: more than one process can hold (max_tokens)
    epoch = next(line for line in outs[0].splitlines() if "| train | epoch 001" in line)
    assert float(epoch.split("| wpb ")[1].split()[0]) > s.max_tokens, epoch
    assert "Saving checkpoint" not in outs[1]  # only rank 0 writes
    assert {p.name for p in save.glob("*.pt")} >= {"checkpoint_1_3.pt", "checkpoint_1_6.pt", "checkpoint_last.pt"}


@pytest.mark.slow
def test_sweep_through_submitit_local_jobs_respects_order_and_redoes_a_killed_unit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # the tiny sweep made smaller still (one language pair, one proxy seed of 4 updates, no baseline columns,
    # two retraining runs of 4 updates, 10 test sentences): every kind of job still runs, each in a process of its own
    small = ["download.pairs=[de-en]", "download.max_test_per_pair=10", "proxy.seeds=[1]", "proxy.checkpoints=[2,4]",
             "proxy.warmup_updates=1", "score.baselines=false", "prune.strategies=[random]", "train.max_update=4",
             "train.warmup_updates=1", "launch.score_shards=2", "launch.prepare_shards=2"]
    sets = ["-c", str(TINY), "--run-dir", str(run), *[a for s in small for a in ("--set", s)]]
    code, out = cli("sweep", *sets, "--launcher", "submitit-local")
    assert code == 0, out
    L = RunLayout(run)
    manifests = [json.loads(L.manifest(s).read_text()) for s in STAGES]
    for before, after in zip(manifests, manifests[1:], strict=False):
        assert after["started"] >= before["finished"], (before["stage"], after["stage"])
    assert manifests[STAGES.index("score")]["stats"]["shards"] == 2
    assert manifests[STAGES.index("prepare")]["stats"]["parts"] == 2  # binarized by two jobs, assembled by a third
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    assert len({j["folder"] for j in jobs}) == len(STAGES)  # real submitit job folders, one per stage
    code, out = cli("status", *sets)
    assert out.count(" done ") == len(jobs)

    # a unit killed before it finished: its folder lost done.json, the stage has no manifest; resubmitting
    # the stage redoes that unit only (the jobs of the other stages were checked above)
    (L.train_dir("random-0.2") / "done.json").unlink()
    L.manifest("train").unlink()
    code, out = cli("train", *sets, "--launcher", "submitit-local")
    assert code == 0, out
    import submitit

    again = json.loads((run / "slurm" / "jobs.json").read_text())[len(jobs):]
    logs = {short_command(j["argv"]): submitit.LocalJob(j["folder"], j["job_id"]).paths.stderr.read_text()
            for j in again}
    assert set(logs) == {"train --unit full", "train --unit random-0.2", "train"}
    assert "running 1 unit" in logs["train --unit random-0.2"]
    assert "train full: already done, skipping" in logs["train --unit full"]
    assert "unit(s)" not in logs["train --unit full"] and "unit(s)" not in logs["train"]  # "running 1 unit(s)"
    assert json.loads(L.manifest("train").read_text())["stage"] == "train"
    assert (L.train_dir("random-0.2") / "done.json").is_file()
    shutil.rmtree(run / "slurm")


@pytest.mark.parametrize("parent,expected", [("3,5", "3,5"), ("GPU-1a,GPU-2b", "GPU-1a,GPU-2b")])
def test_submitit_local_jobs_see_the_gpus_this_process_sees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             parent: str, expected: str) -> None:
    import submitit

    from mtprune import gpus
    from mtprune.slurm import local_gpu_parameters

    monkeypatch.setattr(gpus, "device_count", lambda: 2)  # the one thing a CPU machine cannot have
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    ex = submitit.LocalExecutor(folder=str(tmp_path / "jobs"))
    ex.update_parameters(timeout_min=2, **local_gpu_parameters())
    job = ex.submit(os.getenv, "CUDA_VISIBLE_DEVICES", "<unset>")  # a real submitit-local job: what it is given
    assert job.result() == expected
    monkeypatch.setattr(gpus, "device_count", lambda: 0)
    assert local_gpu_parameters() == {}  # no GPU: submitit's default (none) stands


def assert_array_script_as_submitted(script: str, submitted: dict[str, str], command: str, flag: str) -> None:
    """A `slurm-script` array asks for what the submitted array did (submitit's own options and the dependency
    aside), runs ``mtprune <command> ... <flag> <its task's unit>``, and is valid bash."""
    mine = {k: v for k, v in sbatch_options_of(script).items() if k != "output"}
    theirs = {k: v for k, v in submitted.items() if k not in {"error", "open-mode", "signal", "wckey", "output",
                                                               "dependency"}}
    assert mine == theirs
    assert f"{command} -c" in script and f'{flag} "${{UNITS[$SLURM_ARRAY_TASK_ID]}}"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_the_base_columns_are_a_cpu_array_after_prepare_that_the_score_merge_waits_for(fake_sbatch: Path,
                                                                                      tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run), "--set", "launch.slurm.gpus_per_node=1",
            "--set", "launch.score_shards=2", "--set", "score.baselines=true"]
    code, out = cli("sweep", *sets, "--launcher", "slurm")
    assert code == 0, out
    scripts = {int(p.stem[3:]): p.read_text() for p in fake_sbatch.glob("job*.sh")}
    names = {n: sbatch_options_of(t)["job-name"] for n, t in scripts.items()}
    by_name = {v: k for k, v in sorted(names.items(), reverse=True)}  # the first job of each name
    base = by_name["mtprune-score-baselines"]
    prepare = max(n for n, v in names.items() if v == "mtprune-prepare")  # the job that finishes prepare
    opts = sbatch_options_of(scripts[base])
    # after prepare, not after the proxy training: the two run side by side; no GPU
    assert opts["dependency"] == f"afterok:{prepare}" and "gpus-per-node" not in opts
    assert opts["array"] == "0-1%2"
    score_jobs = sorted(n for n, v in names.items() if v == "mtprune-score")
    array, finish = score_jobs
    assert sbatch_options_of(scripts[array])["gpus-per-node"] == "1"
    # the job that merges the score stage waits for both arrays
    assert sbatch_options_of(scripts[finish])["dependency"] == f"afterok:{array}_0:{array}_1:{base}_0:{base}_1"
    assert "score --baselines 1/2" in out and "score --shard 1/2" in out
    # the script a user submits by hand asks for the same
    code, script = cli("slurm-script", "score", "--baselines", *sets)
    assert code == 0, script
    assert_array_script_as_submitted(script, opts, "score", "--baselines")
    code, out = cli("slurm-script", "proxy", "--baselines", *sets)
    assert code == 2 and "--baselines is the score stage's CPU array" in out


def test_prepare_is_a_cpu_array_of_parts_and_a_job_that_assembles_them(fake_sbatch: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run), "--set", "launch.slurm.gpus_per_node=2",
            "--set", "launch.prepare_shards=3"]
    code, out = cli("sweep", *sets, "--launcher", "slurm")
    assert code == 0, out
    scripts = {int(p.stem[3:]): p.read_text() for p in fake_sbatch.glob("job*.sh")}
    names = {n: sbatch_options_of(t)["job-name"] for n, t in scripts.items()}
    download = min(n for n, v in names.items() if v == "mtprune-download")
    array, finish = sorted(n for n, v in names.items() if v == "mtprune-prepare")
    opts = sbatch_options_of(scripts[array])
    assert opts["array"] == "0-2%3" and opts["dependency"] == f"afterok:{download}" and "gpus-per-node" not in opts
    assert sbatch_options_of(scripts[finish])["dependency"] == f"afterok:{array}_0:{array}_1:{array}_2"
    proxy = min(n for n, v in names.items() if v == "mtprune-proxy")
    assert sbatch_options_of(scripts[proxy])["dependency"] == f"afterok:{finish}"
    assert "prepare --shard 2/3" in out
    # the script a user submits by hand: the same array, and the finishing job's
    code, script = cli("slurm-script", "prepare", *sets)
    assert code == 0, script
    assert_array_script_as_submitted(script, opts, "prepare", "--shard")
    code, script = cli("slurm-script", "prepare", "--finish", *sets)
    assert code == 0 and "--shard" not in script and "--array" not in script
    # one part: no array, one prepare job as before
    code, script = cli("slurm-script", "prepare", *sets[:-2], "--set", "launch.prepare_shards=1")
    assert code == 0 and "--array" not in script and "--shard" not in script
