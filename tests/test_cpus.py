import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtprune.cpus import usable_cpus
from mtprune.launch import plan_parallel


def test_slurm_allocation_narrows_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cpus() == 1
    assert plan_parallel(n_units=4, parallel=0, use_cuda=False) == (1, 1)
    monkeypatch.delenv("SLURM_JOB_ID")  # a leftover variable outside a job does not count
    assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to narrow the affinity to 1")
def test_affinity_mask_is_what_counts_not_the_node() -> None:
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from mtprune.cpus import usable_cpus; from mtprune.launch import plan_parallel; "
            "print(usable_cpus(), os.cpu_count(), plan_parallel(3, 0, False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "1" and int(out[1]) >= 2 and out[2:] == ["(1,", "1)"]


def test_tokens_per_update_sizes_an_update_whatever_the_gpus() -> None:
    from mtprune.config import load_config
    from mtprune.errors import ConfigError
    from mtprune.fairseq_backend import parse_train_argv, train_argv, update_freq_for
    from mtprune.launch import unit_settings
    from mtprune.stages import proxy as proxy_stage

    # 32k target tokens per update from 4096 per GPU: 8 batches on 1 GPU, 1 on 8 GPUs, 2 on 3 GPUs (rounded up)
    assert [update_freq_for(32768, 1, 4096, w) for w in (1, 8, 3)] == [8, 1, 3]
    assert update_freq_for(None, 4, 4096, 8) == 4  # unset: update_freq as given
    cfg = load_config(None, ["proxy.tokens_per_update=8192", "proxy.max_tokens=2048"])
    args = parse_train_argv(train_argv(Path("bin"), Path("save"), cfg.model, proxy_stage.schedule(cfg, 1), False))
    assert args.update_freq == [4] and args.max_tokens == 2048
    with pytest.raises(ConfigError, match="set proxy.tokens_per_update or proxy.update_freq, not both"):
        load_config(None, ["proxy.tokens_per_update=8192", "proxy.update_freq=2"])
    # left unset, the setting is not in a unit's key: seeds trained before it existed stay done
    plain = unit_settings(load_config(None), "model", "proxy")
    assert "tokens_per_update" not in plain["proxy"] and "max_tokens" in plain["proxy"]
    assert unit_settings(cfg, "model", "proxy")["proxy"]["tokens_per_update"] == 8192
