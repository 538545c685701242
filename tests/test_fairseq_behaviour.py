"""What mtprune relies on fairseq-train to do, checked against the real fairseq on a tiny model.

One tiny one-pair corpus is prepared once for the module; the number of updates per epoch is taken
from fairseq's own batching, so that kept update counts and save/validation intervals can be put
exactly on epoch ends, where fairseq 0.12 with --no-epoch-checkpoints names no interval checkpoint
and does not validate at a save (see ``fairseq_backend._keep_epoch_end_checkpoints`` and
``train_argv``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY, cli, error_lines
from mtprune.config import ModelConfig, load_config
from mtprune.errors import StageError, UsageError
from mtprune.fairseq_backend import (
    DICT_RECORD,
    Schedule,
    checkpoint_updates,
    cuda_available,
    load_model,
    parse_train_argv,
    train,
    train_argv,
)
from mtprune.layout import RunLayout
from mtprune.stages import proxy as proxy_stage
from mtprune.stages import train as train_stage

ONE_PAIR = ["--set", "download.pairs=[de-en]"]
TINY_MODEL = ModelConfig(encoder_layers=1, decoder_layers=1, embed_dim=32, ffn_dim=64, attention_heads=2)


def updates_per_epoch(data_bin: Path, max_tokens: int) -> int:
    """Batches (= updates on one device, update_freq 1) per epoch, from fairseq's own batching."""
    from fairseq import tasks, utils

    args = parse_train_argv(train_argv(data_bin, Path("unused"), TINY_MODEL, _schedule(1, 1, max_tokens), False))
    task = tasks.setup_task(args)
    task.load_dataset("train")
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=max_tokens,
                                  max_positions=utils.resolve_max_positions(task.max_positions(), (1024, 1024)),
                                  ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=1)
    return len(itr)


def _schedule(max_update: int, interval: int, max_tokens: int, precision: str = "fp32") -> Schedule:
    return Schedule(max_update=max_update, lr=0.002, warmup_updates=2, max_tokens=max_tokens, update_freq=1,
                    label_smoothing=0.1, precision=precision, seed=1, save_interval_updates=interval)


def epoch_ends(log: str) -> dict[int, int]:
    """epoch -> the update count it ended on, from fairseq's end-of-epoch training summary lines."""
    return {int(m.group(1)): int(m.group(2))
            for m in re.finditer(r"\| train \| epoch (\d+) \|.*?\| num_updates (\d+)", log)}


def validated_at(log: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"valid on 'valid' subset.*?\| num_updates (\d+)", log)]


def weights(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """(run dir with download + prepare done, max_tokens, updates per epoch): an even epoch >= 6 updates."""
    run = tmp_path_factory.mktemp("fairseq") / "run"
    for stage in ("download", "prepare"):
        code, out = cli(stage, "-c", str(TINY), "--run-dir", str(run), "-q", *ONE_PAIR)
        assert code == 0, out
    data_bin = RunLayout(run).data_bin
    for max_tokens in (512, 384, 256, 768):
        per_epoch = updates_per_epoch(data_bin, max_tokens)
        if per_epoch >= 6 and per_epoch % 2 == 0:
            return run, max_tokens, per_epoch
    raise AssertionError("no max_tokens gives an even epoch of at least 6 updates on the tiny corpus")


# ---- the stages: a kept update that is also an epoch end (issue 14, item 4) ----------------------

def _stage_sets(max_tokens: int, per_epoch: int) -> list[str]:
    sets = ["download.pairs=[de-en]", "proxy.seeds=[1]", f"proxy.checkpoints=[{per_epoch},{2 * per_epoch}]",
            f"proxy.max_tokens={max_tokens}", "proxy.warmup_updates=2", "prune.strategies=[random]",
            "prune.sparsities=[0.2]", f"train.max_update={4 * per_epoch}", f"train.max_tokens={max_tokens}",
            "train.warmup_updates=2"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def proxied(prepared: tuple[Path, int, int]) -> tuple[Path, list[str], int, tuple[int, str]]:
    """The prepared run with `mtprune proxy` run on it: (run, --set args, updates per epoch, (exit code, output))."""
    run, max_tokens, per_epoch = prepared
    sets = _stage_sets(max_tokens, per_epoch)
    return run, sets, per_epoch, cli("proxy", "-c", str(TINY), "--run-dir", str(run), "-q", *sets)


@pytest.fixture(scope="module")
def trained(proxied: tuple[Path, list[str], int, tuple[int, str]]) -> tuple[Path, list[str], int, tuple[int, str]]:
    """Then score, prune and `mtprune train --unit full`: (run, --set args, updates per epoch, train's result)."""
    run, sets, per_epoch, (code, out) = proxied
    assert code == 0, out
    for stage in ("score", "prune"):
        code, out = cli(stage, "-c", str(TINY), "--run-dir", str(run), "-q", *sets)
        assert code == 0, out
    return run, sets, per_epoch, cli("train", "-c", str(TINY), "--run-dir", str(run), "-q", "--unit", "full", *sets)


@pytest.mark.slow
def test_proxy_keeps_a_checkpoint_at_an_epoch_end(proxied: tuple[Path, list[str], int, tuple[int, str]]) -> None:
    run, _, per_epoch, (code, out) = proxied
    L = RunLayout(run)
    log = (L.proxy_seed_dir(1) / "train.log").read_text()
    # the case under test: both kept update counts end an epoch
    assert epoch_ends(log) == {1: per_epoch, 2: 2 * per_epoch}, log[-3000:]
    assert code == 0, out
    for u in (per_epoch, 2 * per_epoch):
        assert checkpoint_updates(L.proxy_checkpoint(1, u)) == u
    assert sorted(p.name for p in L.proxy_seed_dir(1).glob("*.pt")) == sorted(
        L.proxy_checkpoint(1, u).name for u in (per_epoch, 2 * per_epoch))


@pytest.mark.slow
def test_final_training_validates_at_every_interval_even_at_epoch_ends(
        trained: tuple[Path, list[str], int, tuple[int, str]]) -> None:
    run, _, per_epoch, (code, out) = trained
    assert code == 0, out
    folder = RunLayout(run).train_dir("full")
    log = (folder / "train.log").read_text()
    ends = epoch_ends(log)
    intervals = [per_epoch * k for k in (1, 2, 3, 4)]  # train.max_update // 4 = one epoch
    assert [ends[e] for e in (1, 2, 3, 4)] == intervals, log[-3000:]  # every interval ends an epoch
    assert validated_at(log) == intervals
    # checkpoint_best.pt holds the best of all four validations
    import torch

    best = torch.load(folder / "checkpoint_best.pt", map_location="cpu", weights_only=False)["extra_state"]
    losses = [float(m.group(1)) for m in re.finditer(r"valid on 'valid' subset \| loss ([\d.]+)", log)]
    assert best["val_loss"] == pytest.approx(min(losses), abs=1e-3)
    assert not list(folder.glob("checkpoint_*_*.pt"))  # interval checkpoints only served resumption


# ---- what training settings cannot run here: one line before anything is touched (item 2) -------

def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("stage,key,value,says", [
    ("proxy", "proxy.precision", "bf16", "TPU"),
    ("train", "train.precision", "bf16", "TPU"),
    ("proxy", "proxy.precision", "fp16", "needs a CUDA GPU"),
    ("train", "train.precision", "fp16", "needs a CUDA GPU"),
    ("proxy", "model.extra_args", "[--max-update, '5']", "--max-update is set by mtprune"),
    ("proxy", "model.extra_args", "[--no-such-flag]", "fairseq-train rejects the command line"),
])
def test_settings_that_cannot_train_here_touch_nothing(trained: tuple[Path, list[str], int, tuple[int, str]],
                                                         tmp_path: Path, stage: str, key: str, value: str,
                                                         says: str) -> None:
    if "CUDA" in says and cuda_available():
        pytest.skip("fp16 can train on this machine")
    src, sets, _, (code, out) = trained
    assert code == 0, out
    run = tmp_path / "run"
    shutil.copytree(src, run)
    folder = RunLayout(run).stage_dir(stage)
    before = _files(folder)
    code, out = cli(stage, "-c", str(TINY), "--run-dir", str(run), *sets, "--set", f"{key}={value}")
    assert code == 2, out
    assert len(error_lines(out)) == 1 and key in error_lines(out)[0] and says in error_lines(out)[0], out
    assert _files(folder) == before


# ---- the dictionary a checkpoint was trained with (item 6) -----------------------------------------

@pytest.mark.slow
def test_checkpoint_from_a_same_size_dictionary_is_refused(
        proxied: tuple[Path, list[str], int, tuple[int, str]], tmp_path: Path) -> None:
    run, _, per_epoch, (code, out) = proxied
    assert code == 0, out
    L = RunLayout(run)
    ckpt = L.proxy_checkpoint(1, per_epoch)
    assert (ckpt.parent / DICT_RECORD).read_bytes() == (L.data_bin / "dict.tgt.txt").read_bytes()
    load_model(ckpt, L.data_bin, "cpu")  # its own data-bin loads
    for kind in ("swapped", "renamed"):
        other = tmp_path / kind / "data-bin"
        shutil.copytree(L.data_bin, other)
        for name in ("dict.src.txt", "dict.tgt.txt"):
            lines = (other / name).read_text(encoding="utf-8").splitlines(keepends=True)
            if kind == "swapped":  # the same pieces, two of them trading ids
                lines[10], lines[20] = lines[20], lines[10]
            else:  # one piece replaced by another: same size
                lines[10] = "\u2581zzzzz 1\n"
            (other / name).write_text("".join(lines), encoding="utf-8")
        with pytest.raises(UsageError, match=r"checkpoint_u\d+\.pt: was trained with a different dictionary than "
                                             rf".*{kind}/data-bin \(entry 11 is"):
            load_model(ckpt, other, "cpu")


# ---- the exact fairseq command line, as fairseq itself reads it (issue 11, item 1) ----------------

@pytest.mark.parametrize("use_cuda", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_train_argv_as_fairseq_reads_it(precision: str, use_cuda: bool) -> None:
    s = _schedule(max_update=400, interval=200, max_tokens=2048, precision=precision)
    if precision == "bf16" or (precision == "fp16" and not use_cuda):
        with pytest.raises(UsageError, match="TPU" if precision == "bf16" else "needs a CUDA GPU"):
            train_argv(Path("data-bin"), Path("save"), TINY_MODEL, s, use_cuda)
        return
    argv = train_argv(Path("data-bin"), Path("save"), TINY_MODEL, s, use_cuda)
    args = parse_train_argv(argv)
    assert args.tpu is False and args.bf16 is False and args.memory_efficient_bf16 is False
    assert args.fp16 is (precision == "fp16") and args.cpu is (not use_cuda)
    assert args.fp16_scale_window is None and args.fp16_init_scale == 128  # fairseq's dynamic loss scaler
    assert (args.max_update, args.seed, args.save_dir, args.data) == (400, 1, "save", "data-bin")
    assert args.save_interval_updates == args.validate_interval_updates == 200
    assert args.keep_interval_updates == -1 and args.no_epoch_checkpoints is True
    assert args.save_interval == args.validate_interval == 1000000  # never because an epoch ended
    assert args.max_epoch == 0 and args.disable_validation is False and args.no_last_checkpoints is False
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)  # what fairseq_train_main hands to the trainer
    assert cfg.common.tpu is False and cfg.common.fp16 is (precision == "fp16") and cfg.common.bf16 is False


@pytest.mark.parametrize("config", ["configs/blog.yaml", "configs/demo.yaml", "configs/opus100-small.yaml"])
def test_shipped_configs_train_as_intended(config: str) -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / config)
    for stage, schedule, precision in ((proxy_stage, proxy_stage.schedule(cfg, 1), cfg.proxy.precision),
                                       (train_stage, train_stage.schedule(cfg), cfg.train.precision)):
        use_cuda = precision != "fp32"  # the GPU configs are meant for GPUs
        args = parse_train_argv(train_argv(Path("data-bin"), Path("save"), cfg.model, schedule, use_cuda))
        assert args.tpu is False and args.bf16 is False, (config, stage.__name__)
        assert args.fp16 is (precision == "fp16")
        assert args.save_interval_updates == args.validate_interval_updates == schedule.save_interval_updates


# ---- fairseq-train itself, through mtprune's train(), on the tiny model ----------------------------

@pytest.fixture(scope="module")
def fairseq_run(prepared: tuple[Path, int, int], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """Two epochs, saved and validated every half epoch: (data-bin, save dir, updates per epoch)."""
    run, max_tokens, per_epoch = prepared
    data_bin = RunLayout(run).data_bin
    save = tmp_path_factory.mktemp("fairseq_run") / "save"
    train(data_bin, save, TINY_MODEL, _schedule(2 * per_epoch, per_epoch // 2, max_tokens), threads=2,
          use_cuda=False, prefix="")
    return data_bin, save, per_epoch


@pytest.mark.slow
def test_checkpoint_names_validation_and_kept_intervals(fairseq_run: tuple[Path, Path, int]) -> None:
    _, save, per_epoch = fairseq_run
    half = per_epoch // 2
    log = (save / "train.log").read_text()
    assert epoch_ends(log) == {1: per_epoch, 2: 2 * per_epoch}
    # --keep-interval-updates -1 keeps every interval checkpoint, named checkpoint_<epoch>_<updates>.pt,
    # mid-epoch (fairseq) and at an epoch end (mtprune's fix) alike
    assert sorted(p.name for p in save.glob("checkpoint*.pt")) == sorted([
        f"checkpoint_1_{half}.pt", f"checkpoint_1_{per_epoch}.pt", f"checkpoint_2_{per_epoch + half}.pt",
        f"checkpoint_2_{2 * per_epoch}.pt", "checkpoint_best.pt", "checkpoint_last.pt"])
    for name, updates in ((f"checkpoint_1_{per_epoch}.pt", per_epoch), ("checkpoint_last.pt", 2 * per_epoch)):
        assert checkpoint_updates(save / name) == updates
    assert validated_at(log) == [half, per_epoch, per_epoch + half, 2 * per_epoch]
    assert (save / DICT_RECORD).is_file()


@pytest.mark.slow
def test_epoch_end_checkpoint_is_the_state_at_that_update(fairseq_run: tuple[Path, Path, int], tmp_path: Path) -> None:
    """The copy made at an epoch end holds the same weights as a run that stops right there."""
    data_bin, save, per_epoch = fairseq_run
    max_tokens = int(re.search(r"--max-tokens (\d+)", (save / "train.log").read_text()).group(1))
    stopped = tmp_path / "stopped"
    train(data_bin, stopped, TINY_MODEL, _schedule(per_epoch, per_epoch // 2, max_tokens), threads=2,
          use_cuda=False, prefix="")
    assert same_weights(save / f"checkpoint_1_{per_epoch}.pt", stopped / "checkpoint_last.pt")
    # and a mid-epoch one, written by fairseq itself, agrees with it too
    assert same_weights(save / f"checkpoint_1_{per_epoch // 2}.pt", stopped / f"checkpoint_1_{per_epoch // 2}.pt")


@pytest.mark.slow
def test_resume_from_checkpoint_last(fairseq_run: tuple[Path, Path, int], tmp_path: Path) -> None:
    data_bin, src, per_epoch = fairseq_run
    save = tmp_path / "save"
    shutil.copytree(src, save)
    max_tokens = int(re.search(r"--max-tokens (\d+)", (save / "train.log").read_text()).group(1))
    runs = (save / "train.log").read_text().count("\n$ ") + 1
    # finished: a rerun starts no fairseq-train (which would train one update past max_update)
    losses = train(data_bin, save, TINY_MODEL, _schedule(2 * per_epoch, per_epoch // 2, max_tokens), threads=2,
                   use_cuda=False, prefix="")
    assert (save / "train.log").read_text().count("\n$ ") + 1 == runs
    assert losses["train_loss_updates"] == 2 * per_epoch and losses["valid_loss_updates"] == 2 * per_epoch
    # a longer schedule resumes from checkpoint_last.pt at its update count, not from scratch
    train(data_bin, save, TINY_MODEL, _schedule(2 * per_epoch + 2, per_epoch // 2, max_tokens), threads=2,
          use_cuda=False, prefix="")
    log = (save / "train.log").read_text().split("\n$ ")[-1]
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 3 @ {2 * per_epoch} updates\)", log), log
    assert checkpoint_updates(save / "checkpoint_last.pt") == 2 * per_epoch + 2


@pytest.mark.slow
def test_a_truncated_checkpoint_last_resumes_from_the_newest_whole_interval_checkpoint(
        fairseq_run: tuple[Path, Path, int], tmp_path: Path) -> None:
    data_bin, src, per_epoch = fairseq_run
    save = tmp_path / "save"
    shutil.copytree(src, save)
    max_tokens = int(re.search(r"--max-tokens (\d+)", (save / "train.log").read_text()).group(1))
    last = save / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed while fairseq copied it
    newest = save / f"checkpoint_2_{2 * per_epoch}.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # and the newest interval checkpoint damaged too
    train(data_bin, save, TINY_MODEL, _schedule(2 * per_epoch + 2, per_epoch // 2, max_tokens), threads=2,
          use_cuda=False, prefix="")
    log = (save / "train.log").read_text().split("\n$ ")[-1]
    resumed = per_epoch + per_epoch // 2  # the newest whole one
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ {resumed} updates\)", log), log
    assert checkpoint_updates(last) == 2 * per_epoch + 2
    # nothing readable at all: the one-line error that names the file
    for p in save.glob("checkpoint_*.pt"):
        p.write_bytes(b"damaged")
    with pytest.raises(StageError, match="checkpoint_last.pt: corrupt or unreadable checkpoint"):
        train(data_bin, save, TINY_MODEL, _schedule(2 * per_epoch + 4, per_epoch // 2, max_tokens), threads=2,
              use_cuda=False, prefix="")
