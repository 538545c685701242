"""Everything that touches fairseq: argv for its commands, subprocess runs, checkpoint loading.

fairseq-train and fairseq-preprocess run as subprocesses (training owns its distributed setup
on clusters, and a crash cannot take the pipeline down); scoring and generation load checkpoints
in-process. Since torch 2.6, ``torch.load`` defaults to weights-only loading, which refuses
fairseq checkpoints: subprocesses get TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and in-process loads
allow the pickled objects fairseq stores. The checkpoints are the run's own, so this is safe.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import StageError, UsageError

log = logging.getLogger("mtprune")
SRC, TGT = "src", "tgt"  # fairseq "languages" of the multilingual data-bin
_quiet_lock = threading.Lock()


def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_logged(argv: list[str], log_path: Path, threads: int, prefix: str = "") -> list[str]:
    """Run a command, append its output to ``log_path`` and echo it (prefixed) to stderr."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(argv) + "\n")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=subprocess_env(threads), bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            lines.append(line.rstrip("\n"))
            if _worth_echoing(line):
                with _quiet_lock:
                    sys.stderr.write(f"{prefix}{line}")
        code = proc.wait()
    if code != 0:
        tail = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        raise StageError(f"{Path(argv[2]).name if len(argv) > 2 else argv[0]} exited with {code}: {tail.strip()[:300]} "
                         f"(full log: {log_path})")
    return lines


_NOISE = re.compile(r"Namespace\(|tensorboardX|torchaudio|UserWarning|warnings.warn|FutureWarning|DeprecationWarning")


def _worth_echoing(line: str) -> bool:
    return not _NOISE.search(line)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- preprocess ---------------------------------------------------------------------------------

def write_dictionary(spm_vocab: list[str], path: Path) -> None:
    """fairseq dictionary = the SentencePiece vocabulary (minus the specials fairseq adds itself)."""
    specials = {"<unk>", "<s>", "</s>", "<pad>"}
    with open(path, "w", encoding="utf-8") as f:
        for piece in spm_vocab:
            if piece not in specials:
                f.write(f"{piece} 1\n")


def preprocess(trainpref: Path, validpref: Path | None, destdir: Path, dict_path: Path, workers: int,
               log_path: Path) -> None:
    argv = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", SRC, "--target-lang", TGT,
            "--trainpref", str(trainpref), "--destdir", str(destdir), "--srcdict", str(dict_path),
            "--tgtdict", str(dict_path), "--workers", str(max(1, workers)), "--dataset-impl", "mmap"]
    if validpref is not None:
        argv += ["--validpref", str(validpref)]
    run_logged(argv, log_path, threads=1, prefix="[preprocess] ")


# ---- train --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    max_update: int
    lr: float
    warmup_updates: int
    max_tokens: int
    update_freq: int
    label_smoothing: float
    precision: str
    seed: int
    save_interval_updates: int


def train_argv(data_bin: Path, save_dir: Path, model: ModelConfig, s: Schedule, use_cuda: bool) -> list[str]:
    argv = [sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--task", "translation",
            "--source-lang", SRC, "--target-lang", TGT, "--arch", model.arch,
            "--encoder-layers", str(model.encoder_layers), "--decoder-layers", str(model.decoder_layers),
            "--encoder-embed-dim", str(model.embed_dim), "--decoder-embed-dim", str(model.embed_dim),
            "--encoder-ffn-embed-dim", str(model.ffn_dim), "--decoder-ffn-embed-dim", str(model.ffn_dim),
            "--encoder-attention-heads", str(model.attention_heads),
            "--decoder-attention-heads", str(model.attention_heads), "--dropout", str(model.dropout),
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
            "--lr", str(s.lr), "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(s.warmup_updates),
            "--warmup-init-lr", "1e-07",
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(s.label_smoothing),
            "--max-tokens", str(s.max_tokens), "--update-freq", str(s.update_freq),
            "--max-update", str(s.max_update), "--seed", str(s.seed),
            "--save-dir", str(save_dir), "--save-interval-updates", str(s.save_interval_updates),
            "--keep-interval-updates", "-1", "--no-epoch-checkpoints",
            # validate and save on update counts only, not at every (short) epoch end
            "--save-interval", "1000000", "--validate-interval", "1000000",
            "--log-format", "simple", "--log-interval", "50", "--num-workers", "0",
            "--skip-invalid-size-inputs-valid-test", "--required-batch-size-multiple", "1"]
    if model.share_all_embeddings:
        argv.append("--share-all-embeddings")
    if not use_cuda:
        if s.precision != "fp32":
            raise UsageError(f"precision {s.precision} needs a GPU; set it to fp32 on CPU")
        argv.append("--cpu")
    elif s.precision == "fp16":
        argv.append("--fp16")
    elif s.precision == "bf16":
        argv.append("--bf16")
    return argv + list(model.extra_args)


_LOSS = re.compile(r"\|\s*loss ([\d.]+)")
_UPD = re.compile(r"num_updates (\d+)")


def train(data_bin: Path, save_dir: Path, model: ModelConfig, schedule: Schedule, threads: int,
          use_cuda: bool, prefix: str) -> dict[str, Any]:
    """Run (or resume, from save_dir/checkpoint_last.pt) fairseq-train; returns the last losses."""
    argv = train_argv(data_bin, save_dir, model, schedule, use_cuda)
    lines = run_logged(argv, save_dir / "train.log", threads, prefix)
    out: dict[str, Any] = {}
    for ln in lines:
        m, u = _LOSS.search(ln), _UPD.search(ln)
        if m and u:
            kind = "valid_loss" if "valid on" in ln else "train_loss"
            out[kind] = float(m.group(1))
            out[f"{kind}_updates"] = int(u.group(1))
    return out


def interval_checkpoint(save_dir: Path, updates: int) -> Path | None:
    found = sorted(save_dir.glob(f"checkpoint_*_{updates}.pt"))
    return found[-1] if found else None


# ---- in-process loading -------------------------------------------------------------------------

def quiet_fairseq() -> None:
    """Allow fairseq's pickled checkpoints and keep its INFO chatter out of our progress output."""
    import warnings

    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # read by torch.load at call time
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
    warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask and attn_mask.*")


def load_model(checkpoint: Path, data_bin: Path, device: str) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, fairseq task) with the dictionary of ``data_bin``."""
    quiet_fairseq()
    from fairseq import checkpoint_utils

    if not checkpoint.is_file():
        raise UsageError(f"{checkpoint}: checkpoint not found")
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(checkpoint)], arg_overrides={"data": str(data_bin)})
    except RuntimeError as e:
        msg = str(e)
        if "size mismatch" in msg:
            raise UsageError(f"{checkpoint}: was trained with a different dictionary than {data_bin} "
                             f"({msg.splitlines()[1].strip() if len(msg.splitlines()) > 1 else msg[:200]})") from None
        raise UsageError(f"{checkpoint}: corrupt or unreadable checkpoint ({msg.splitlines()[0][:200]})") from None
    except (EOFError, OSError, ValueError, KeyError, AttributeError, ImportError) as e:
        raise UsageError(f"{checkpoint}: corrupt or unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    except Exception as e:  # unpickling raises a zoo of types on damaged files
        if type(e).__name__ in ("UnpicklingError", "PickleError"):
            raise UsageError(f"{checkpoint}: corrupt or unreadable checkpoint ({str(e)[:200]})") from None
        raise
    model = models[0].to(device).eval()
    if device == "cpu":
        model = model.float()
    return model, task


def load_dictionary(data_bin: Path) -> Any:
    quiet_fairseq()
    from fairseq.data import Dictionary

    return Dictionary.load(str(data_bin / f"dict.{TGT}.txt"))


def load_train_pairs(data_bin: Path, split: str = "train") -> tuple[Any, Any, Any]:
    """(source dataset, target dataset, dictionary) of a binarized split, indexable by example."""
    quiet_fairseq()
    from fairseq.data import data_utils

    d = load_dictionary(data_bin)
    prefix = data_bin / f"{split}.{SRC}-{TGT}."
    src = data_utils.load_indexed_dataset(str(prefix) + SRC, d, dataset_impl="mmap")
    tgt = data_utils.load_indexed_dataset(str(prefix) + TGT, d, dataset_impl="mmap")
    if src is None or tgt is None:
        raise UsageError(f"{data_bin}: no binarized {split} split")
    return src, tgt, d
