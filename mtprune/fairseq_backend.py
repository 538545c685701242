"""Everything that touches fairseq: argv for its commands, subprocess runs, checkpoint loading.

Why one long module: fairseq 0.12's traps (weights-only loading, --bf16 as TPU mode, epoch-end checkpoints,
per-GPU --max-tokens) are fixed in one place, so that no other module imports fairseq or builds its argv, and
an upgrade of fairseq is reviewed in one file (docs/architecture.md).

fairseq-train and fairseq-preprocess run as subprocesses (training owns its distributed setup
on clusters, and a crash cannot take the pipeline down); scoring and generation load checkpoints
in-process. Since torch 2.6, ``torch.load`` defaults to weights-only loading, which refuses
fairseq checkpoints: subprocesses get TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and in-process loads
allow the pickled objects fairseq stores. The checkpoints are the run's own, so this is safe.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gpus
from .children import child_env, die_with_parent
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
    group = gpus.assigned()
    # a work unit's own GPUs (launch.run_units): fairseq-train sees only these; not across the nodes of a
    # multi-node job, whose tasks get their own node's GPUs from Slurm (these ids are the first node's)
    if group is not None and slurm_span() is None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
    return env


# set (to 1) by `-v`: fairseq's own output is echoed to the terminal, prefixed with its unit; otherwise it goes
# to the unit's log file only (a variable, so that the processes of cluster jobs inherit it)
SHOW_FAIRSEQ = "MTPRUNE_SHOW_FAIRSEQ"


def run_logged(argv: list[str], log_path: Path, threads: int, prefix: str = "",
               writes_into: Path | None = None, on_line: Callable[[str], None] | None = None) -> list[str]:
    """Run a command and append its output to ``log_path`` (and, with ``-v``, echo it prefixed to stderr);
    ``on_line`` sees every line (progress). The command is mtprune's own code (``children.py``): it dies with
    this process, and names ``writes_into`` as its folder."""
    echo = os.environ.get(SHOW_FAIRSEQ) == "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(argv) + "\n")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=child_env(subprocess_env(threads), writes_into), bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            lines.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line)
            if echo and _worth_echoing(line):
                with _quiet_lock:
                    sys.stderr.write(f"{prefix}{line}")
        code = proc.wait()
    if code != 0:
        tail = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        name = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else argv[0]
        name = argv[argv.index("-m") + 2] if name == "mtprune.children" else name
        raise StageError(f"{name} exited with {code}: {tail.strip()[:300]} "
                         f"(full log: {log_path})")
    return lines


_NOISE = re.compile(r"Namespace\(|tensorboardX|torchaudio|UserWarning|warnings.warn|FutureWarning|DeprecationWarning")


def _worth_echoing(line: str) -> bool:
    return not _NOISE.search(line)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size(use_cuda: bool) -> int:
    """Processes fairseq-train trains on: every GPU it sees (data parallel), one on CPU. Inside a work
    unit that sees its own GPU group only (launch.run_units): that group's size, not the node's count."""
    if not use_cuda:
        return 1
    span = slurm_span()
    if span is not None:  # fairseq-train runs on every task of a multi-node job (launch_argv)
        return span.world
    group = gpus.assigned()
    return len(group) if group is not None else max(1, gpus.device_count())


def data_inputs(data_bin: Path, valid: bool) -> dict[str, str]:
    """Digests of what a training run reads beyond its target side (which unit keys hold): the source side,
    and with ``valid`` the validation set (it picks checkpoint_best). A unit recorded with other digests
    trains again."""
    from .manifest import file_sha256

    names = [f"train.{SRC}-{TGT}.{SRC}.bin"] + ([f"valid.{SRC}-{TGT}.{x}.bin" for x in (SRC, TGT)] if valid else [])
    return {n: file_sha256(data_bin / n) for n in names}


def update_freq_for(tokens_per_update: int | None, update_freq: int, max_tokens: int, world: int) -> int:
    """Batches accumulated per optimizer step. With ``tokens_per_update`` set, as many as it takes for
    ``max_tokens`` x ``world`` x update_freq to reach it, so an update means the same amount of data on
    1 GPU, 8 GPUs or a CPU (``--max-tokens`` is per GPU); otherwise ``update_freq`` as given."""
    if tokens_per_update is None:
        return update_freq
    return max(1, -(-tokens_per_update // (max_tokens * world)))


def batch_record(s: Schedule, use_cuda: bool) -> dict[str, int]:
    """What an update meant in this run, for the manifest: world size and tokens per update at most."""
    world = world_size(use_cuda)
    return {"world_size": world, "update_freq": s.update_freq,
            "max_tokens_per_update": s.max_tokens * world * s.update_freq}


# ---- training across the nodes of a Slurm job ---------------------------------------------------
# A multi-node job (launch.slurm.nodes > 1, see slurm.job_resources) runs its mtprune unit once, in the
# batch script on the first node; that process starts fairseq-train once per task of the allocation
# through srun. Each task then finds its rank itself, with fairseq's own Slurm init
# (distributed/utils.py, _infer_slurm_init): the first host of SLURM_STEP_NODELIST (`scontrol show
# hostnames`) and --distributed-port make the rendezvous, SLURM_PROCID is the rank, SLURM_LOCALID the
# GPU; --distributed-world-size must be nodes x tasks per node or its check fails (its default is the
# node's GPU count). fairseq saves checkpoints on rank 0 only, and only the mtprune process writes
# the unit's done.json.

@dataclass(frozen=True)
class SlurmSpan:
    """The Slurm job this process runs in, when it spans several nodes."""

    nodes: int
    tasks_per_node: int
    job_id: int
    cpus_per_task: int | None = None

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def port(self) -> int:
        """The rendezvous port on the first node: fixed per job (every task must agree on it), spread
        over jobs so that two array tasks sharing a first node do not collide."""
        return 20000 + self.job_id % 30000


def _leading_int(value: str | None) -> int | None:
    m = re.match(r"\d+", value or "")  # SLURM_TASKS_PER_NODE reads "2(x2)"
    return int(m.group()) if m else None


def slurm_span(env: dict[str, str] | None = None) -> SlurmSpan | None:
    """The multi-node Slurm job this process runs in (None: not in a Slurm job, or one of one node)."""
    env = dict(os.environ) if env is None else env
    nodes = _leading_int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"))
    if not nodes or nodes < 2 or not env.get("SLURM_JOB_ID"):
        return None
    tasks = _leading_int(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")) or 1
    return SlurmSpan(nodes, tasks, _leading_int(env["SLURM_JOB_ID"]) or 0, _leading_int(env.get("SLURM_CPUS_PER_TASK")))


def slurm_train_argv(argv: list[str], span: SlurmSpan) -> list[str]:
    """``argv`` (train_argv's) started once per task of the job through srun, with what fairseq's Slurm
    init needs; a task that fails ends the others (--kill-on-bad-exit) instead of leaving them waiting.
    The job's CPUs per task are asked again (srun does not inherit sbatch's --cpus-per-task since Slurm
    22.05), and each task's torch threads are those CPUs, not the first node's count this process sees."""
    srun = ["srun", f"--nodes={span.nodes}", f"--ntasks-per-node={span.tasks_per_node}", "--kill-on-bad-exit=1"]
    if span.cpus_per_task:
        c = span.cpus_per_task
        srun[3:3] = [f"--cpus-per-task={c}", f"--export=ALL,OMP_NUM_THREADS={c},MKL_NUM_THREADS={c}"]
    return [*srun, *argv, "--distributed-world-size", str(span.world), "--distributed-port", str(span.port)]


def launch_argv(argv: list[str]) -> list[str]:
    """How to start fairseq-train here: across the job's nodes inside a multi-node Slurm job, else as is."""
    span = slurm_span()
    return argv if span is None else slurm_train_argv(argv, span)


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
    argv = [sys.executable, "-m", "mtprune.children", "fairseq_cli.preprocess", "--source-lang", SRC, "--target-lang", TGT,
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
    save_interval_updates: int  # also the validation interval
    wandb_project: str | None = None  # log to Weights & Biases (fairseq's --wandb-project); None: no
    order: str = "shuffled"  # train.order (mtprune.curriculum); anything else trains with the mtprune_ordered task
    order_file: str | None = None  # .npy, one hardness per training pair (higher = harder)
    competence_c0: float = 0.01
    competence_updates: int = 0
    domain_phases: int = 4  # general-to-domain: equal stretches of domain_updates, the last on domain_final_share
    domain_final_share: float = 0.3
    domain_updates: int = 0  # the updates general-to-domain's phases split (0: max_update)
    record_batches: str | None = None  # append "update<TAB>ids" per batch to this file (tests, audits)
    rescore_every: int = 0  # self-paced: updates between rescorings by the model being trained
    rescore_by: str = "el2n"
    rescore_sample: int = 0  # self-paced: pairs scored each time (0: all)
    valid_bleu: bool = False  # fairseq's --eval-bleu at every validation (greedy), for BLEU-vs-updates curves


# train.order other than shuffled: fairseq-train loads mtprune/curriculum.py's task from this --user-dir folder
ORDERED_TASK = "mtprune_ordered"
USER_DIR = Path(__file__).parent / "fairseq_user" / "mtprune_user_dir"


# Flags that train_argv sets and the kept checkpoints, resumption and precision depend on:
# model.extra_args must not override them (argparse keeps the last occurrence, so it would win).
MANAGED_FLAGS = frozenset({
    "--task", "--source-lang", "--target-lang", "--seed", "--max-update", "--max-epoch", "--save-dir",
    "--save-interval", "--save-interval-updates", "--keep-interval-updates", "--no-epoch-checkpoints",
    "--validate-interval", "--validate-interval-updates", "--validate-after-updates", "--disable-validation",
    "--no-save", "--no-last-checkpoints", "--restore-file", "--finetune-from-model", "--reset-optimizer",
    "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters", "--cpu", "--fp16",
    "--bf16", "--memory-efficient-fp16", "--memory-efficient-bf16", "--amp", "--tpu",
})


def precision_problem(precision: str, use_cuda: bool) -> str | None:
    """Why fairseq-train cannot train in ``precision`` here (None: it can)."""
    if precision == "bf16":
        # fairseq 0.12 parse_args_and_arch: `if args.bf16: args.tpu = True`, and the Trainer then
        # asks torch_xla for a TPU device; there is no bf16 route for GPUs
        return ("bf16 training is not possible with fairseq 0.12: its --bf16 switches on TPU mode "
                "(fairseq/options.py); use fp16 (dynamic loss scaling) or fp32")
    if precision == "fp16" and not use_cuda:
        return "fp16 training needs a CUDA GPU and none is visible here; use fp32 on CPU"
    if precision not in ("fp32", "fp16"):
        return f"must be fp32 or fp16, got {precision!r}"
    return None


def extra_args_problem(extra_args: tuple[str, ...] | list[str]) -> str | None:
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            return (f"{flag} is set by mtprune (from the proxy/train sections and the checkpoints it keeps) "
                    f"and cannot be overridden here")
    return None


def check_training(section: str, precision: str, model: ModelConfig, use_cuda: bool) -> None:
    """Raise UsageError (one line naming the key) when fairseq-train cannot run these settings here."""
    problem = precision_problem(precision, use_cuda)
    if problem:
        raise UsageError(f"{section}.precision: {problem}")
    problem = extra_args_problem(model.extra_args)
    if problem:
        raise UsageError(f"model.extra_args: {problem}")
    if model.extra_args or model.arch != "transformer":
        # only then can the argv be wrong; fairseq's own parser says so (importing it takes seconds)
        s = Schedule(max_update=1, lr=1e-3, warmup_updates=0, max_tokens=1024, update_freq=1, label_smoothing=0.0,
                     precision=precision, seed=1, save_interval_updates=1)
        argv = train_argv(Path("data-bin"), Path("save"), model, s, use_cuda)
        try:
            parse_train_argv(argv)
        except (SystemExit, ValueError, KeyError) as e:  # SystemExit: argparse's parser.error
            key = "model.extra_args" if model.extra_args else "model.arch"
            raise UsageError(f"{key}: fairseq-train rejects the command line ({e})") from None


def parse_train_argv(argv: list[str]) -> Any:
    """fairseq-train's own reading of ``argv`` (as built by train_argv): its argparse Namespace.

    An argparse error raises SystemExit carrying the error text (nothing is printed).
    """
    quiet_fairseq()
    from fairseq import options

    parser = options.get_training_parser()

    def fail(message: str) -> None:
        raise SystemExit(message)

    parser.error = fail  # type: ignore[method-assign]
    return options.parse_args_and_arch(parser, input_args=argv[3:])


def train_argv(data_bin: Path, save_dir: Path, model: ModelConfig, s: Schedule, use_cuda: bool) -> list[str]:
    problem = precision_problem(s.precision, use_cuda)
    if problem:
        raise UsageError(f"precision: {problem}")
    argv = [sys.executable, "-m", "mtprune.fairseq_backend", str(data_bin), "--task", "translation",
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
            # Save and validate on update counts only, never because an epoch ended (epochs of small
            # corpora are short). --validate-interval-updates is needed on top of the save interval:
            # fairseq validates at a save only when it is mid-epoch, so an interval update that is
            # also an epoch end would otherwise go unvalidated and checkpoint_best could miss it.
            "--save-interval", "1000000", "--validate-interval", "1000000",
            "--validate-interval-updates", str(s.save_interval_updates),
            "--log-format", "simple", "--log-interval", "50", "--num-workers", "0",
            "--skip-invalid-size-inputs-valid-test", "--required-batch-size-multiple", "1"]
    if s.order != "shuffled" or s.record_batches:
        argv[argv.index("--task") + 1] = ORDERED_TASK
        argv += ["--user-dir", str(USER_DIR), "--train-order", s.order,
                 "--batches-per-update", str(s.update_freq * world_size(use_cuda))]
        if s.order != "shuffled":
            if not s.order_file:
                raise UsageError(f"train.order {s.order}: no order file")
            argv += ["--order-file", s.order_file, "--competence-c0", str(s.competence_c0),
                     "--competence-updates", str(s.competence_updates)]
        if s.order == "general-to-domain":  # the phases split this run's updates
            argv += ["--domain-phases", str(s.domain_phases), "--domain-final-share", str(s.domain_final_share),
                     "--domain-updates", str(s.domain_updates or s.max_update)]
        if s.order == "self-paced":
            argv += ["--rescore-every", str(s.rescore_every), "--rescore-by", s.rescore_by,
                     "--rescore-sample", str(s.rescore_sample), "--order-state-dir", str(save_dir)]
        if s.record_batches:
            argv += ["--record-batches", s.record_batches]
    if s.valid_bleu:  # validation BLEU in train.log: greedy, pieces joined back (the data-bin holds SentencePiece pieces)
        argv += ["--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}',
                 "--eval-bleu-detok", "space", "--eval-bleu-remove-bpe", "sentencepiece"]
    if model.share_all_embeddings:
        argv.append("--share-all-embeddings")
    # training curves beside the checkpoints (TensorBoard event files; mtprune report reads train.log)
    argv += ["--tensorboard-logdir", str(save_dir / "tb")]
    if s.wandb_project:
        argv += ["--wandb-project", s.wandb_project]
    if not use_cuda:
        argv.append("--cpu")
    elif s.precision == "fp16":
        argv.append("--fp16")  # fp16 weights and activations, fp32 master weights, dynamic loss scaling
    return argv + list(model.extra_args)


_LOSS = re.compile(r"\|\s*loss ([\d.]+)")
_UPD = re.compile(r"num_updates[= ](\d+)")
DICT_RECORD = "dict.tgt.txt"  # beside the checkpoints: the dictionary they were trained with


def train(data_bin: Path, save_dir: Path, model: ModelConfig, schedule: Schedule, threads: int,
          use_cuda: bool, prefix: str) -> dict[str, Any]:
    """Run (or resume, from save_dir/checkpoint_last.pt) fairseq-train; returns the last losses.

    Writes ``checkpoint_<epoch>_<updates>.pt`` at every multiple of save_interval_updates (also
    when it ends an epoch, see fairseq_train_main), ``checkpoint_best.pt``, ``checkpoint_last.pt``
    and a copy of the target dictionary (for load_model to compare).
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    record_dictionary(data_bin, save_dir)
    log_path = save_dir / "train.log"
    done = _resumable_updates(save_dir, prefix)
    if done is not None and done >= schedule.max_update:
        # finished before a stop; fairseq-train would train one more update past max_update
        log.info("%sfairseq-train already reached update %d", prefix, done)
    else:
        from tqdm import tqdm  # a bar per unit on a terminal (none in a log file: disable=None)

        bar = tqdm(total=schedule.max_update, initial=done or 0, desc=prefix.strip(" []") or "train", unit="upd",
                   disable=None, leave=False, dynamic_ncols=True)

        def progress(line: str) -> None:
            m = _UPD.search(line)
            if m and int(m.group(1)) > bar.n:
                bar.update(int(m.group(1)) - bar.n)

        try:
            run_logged(launch_argv(train_argv(data_bin, save_dir, model, schedule, use_cuda)), log_path, threads,
                       prefix, writes_into=save_dir, on_line=progress)
        finally:
            bar.close()
    return _losses(log_path.read_text(encoding="utf-8").splitlines())


def logged_losses(save_dir: Path) -> dict[str, Any]:
    """The last training and validation losses in ``save_dir/train.log``, as ``train`` returns them."""
    return _losses((save_dir / "train.log").read_text(encoding="utf-8").splitlines())


def _losses(lines: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ln in lines:
        m, u = _LOSS.search(ln), _UPD.search(ln)
        if m and u:
            kind = "valid_loss" if "valid on" in ln else "train_loss"
            out[kind] = float(m.group(1))
            out[f"{kind}_updates"] = int(u.group(1))
    return out


def _resumable_updates(save_dir: Path, prefix: str) -> int | None:
    """The update count fairseq-train will resume from (None: from the start).

    fairseq writes ``checkpoint_last.pt`` in place (and as a plain copy of the interval checkpoint it
    just saved), so a kill mid-write leaves it truncated while the interval checkpoints beside it are
    whole: then the newest readable one becomes ``checkpoint_last.pt`` and training resumes there,
    instead of the whole run being lost. Only with no readable checkpoint at all is it an error."""
    last = save_dir / "checkpoint_last.pt"
    try:
        return checkpoint_updates(last)
    except StageError as e:
        damaged = e
    kept = sorted(((int(m.group(1)), p) for p in save_dir.glob("checkpoint_*_*.pt")
                   if (m := re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", p.name))), reverse=True)
    for updates, path in kept:
        try:
            if checkpoint_updates(path) != updates:
                continue
        except StageError:
            continue
        tmp = last.with_name(f".{last.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, last)
        log.warning("%s%s was damaged (a run stopped while writing it?): resuming from %s, update %d",
                    prefix, last, path.name, updates)
        return updates
    raise damaged


def interval_checkpoint(save_dir: Path, updates: int) -> Path | None:
    found = sorted(save_dir.glob(f"checkpoint_*_{updates}.pt"))
    return found[-1] if found else None


def checkpoint_updates(path: Path) -> int | None:
    """The update count a fairseq checkpoint was saved at; None when there is no such file."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(state["optimizer_history"][-1]["num_updates"])
    except Exception as e:  # a damaged file: fairseq could not resume from it either
        raise StageError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                         f"delete it to train this run again from the start") from None


# ---- fairseq-train, with one fix ---------------------------------------------------------------

def fairseq_train_main() -> None:
    """fairseq-train's command line (fairseq_cli.train.cli_main) with _keep_epoch_end_checkpoints.

    train_argv runs this as ``python -m mtprune.fairseq_backend``. With several GPUs fairseq
    spawns one process per GPU and runs ``_fairseq_train_worker`` in each, so the fix is applied
    there too.
    """
    die_with_parent()  # a killed mtprune leaves no trainer writing into its unit folder
    import fairseq_cli.train  # noqa: F401  # first: it sets up fairseq's log format, as in fairseq-train
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser())
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), _fairseq_train_worker)


def _fairseq_train_worker(cfg: Any, **kwargs: Any) -> None:
    from fairseq_cli import train as fairseq_train

    die_with_parent()  # a per-GPU process dies with the fairseq-train that spawned it

    _keep_epoch_end_checkpoints()
    fairseq_train.main(cfg, **kwargs)


def _keep_epoch_end_checkpoints() -> None:
    """Make fairseq write checkpoint_<epoch>_<updates>.pt at a save-interval update that ends an epoch.

    fairseq 0.12's checkpoint_utils.save_checkpoint names the interval checkpoint only when the
    update is ``not end_of_epoch``; with --no-epoch-checkpoints it then writes only
    checkpoint_last.pt (and checkpoint_best.pt), which the next save overwrites. Which updates end
    an epoch depends on corpus size, max_tokens and GPU count, so a kept update count would be
    lost by chance. The wrapper copies checkpoint_last.pt (the state just saved) to the interval
    name. save_checkpoint keeps its running best as an attribute of the module-level function,
    which now is the wrapper, used by every caller alike.
    """
    from fairseq import checkpoint_utils

    original = checkpoint_utils.save_checkpoint
    if getattr(original, "mtprune_wrapped", False):
        return

    def save_checkpoint(cfg: Any, trainer: Any, epoch_itr: Any, val_loss: Any) -> Any:
        saved = original(cfg, trainer, epoch_itr, val_loss)
        updates = trainer.get_num_updates()
        if (epoch_itr.end_of_epoch() and cfg.save_interval_updates > 0 and updates % cfg.save_interval_updates == 0
                and not cfg.no_save and not cfg.no_last_checkpoints and trainer.should_save_checkpoint_on_current_rank):
            suffix = trainer.checkpoint_suffix
            last = Path(cfg.save_dir) / f"checkpoint_last{suffix}.pt"
            named = Path(cfg.save_dir) / f"checkpoint_{epoch_itr.epoch}_{updates}{suffix}.pt"
            tmp = named.with_name(f".{named.name}.tmp")
            shutil.copyfile(last, tmp)
            os.replace(tmp, named)
            log.info("kept %s (update %d ends epoch %d)", named, updates, epoch_itr.epoch)
        return saved

    save_checkpoint.mtprune_wrapped = True  # type: ignore[attr-defined]
    checkpoint_utils.save_checkpoint = save_checkpoint


def record_dictionary(data_bin: Path, save_dir: Path) -> None:
    """Keep a copy of the target dictionary beside the checkpoints, for load_model to compare."""
    src = data_bin / f"dict.{TGT}.txt"
    dst = save_dir / DICT_RECORD
    if not dst.is_file() or dst.read_bytes() != src.read_bytes():
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _symbols(path: Path) -> list[str]:
    """The symbols of a fairseq dictionary file in order (counts and flags do not matter to a model)."""
    return [ln.rstrip("\n").split(" ", 1)[0] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def dictionary_difference(trained: Path, data_bin: Path) -> str | None:
    """How the dictionary a checkpoint was trained with (``trained``) differs from ``data_bin``'s."""
    a, b = _symbols(trained), _symbols(data_bin / f"dict.{TGT}.txt")
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"entry {i + 1} is {x!r} in the training dictionary {trained} but {y!r} here"
    return f"{len(a)} entries in the training dictionary {trained}, {len(b)} here"


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
    from fairseq import checkpoint_utils, utils

    # a model trained with train.order names the mtprune_ordered task in its checkpoint: register it, as
    # fairseq-train did, through the --user-dir folder
    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    if not checkpoint.is_file():
        raise UsageError(f"{checkpoint}: checkpoint not found")
    trained = checkpoint.parent / DICT_RECORD
    if trained.is_file() and (data_bin / f"dict.{TGT}.txt").is_file():  # recorded by train(); a dictionary of the same size would load silently
        differs = dictionary_difference(trained, data_bin)
        if differs:
            raise UsageError(f"{checkpoint}: was trained with a different dictionary than {data_bin} ({differs})")
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


if __name__ == "__main__":  # fairseq-train, see fairseq_train_main
    # through the importable module, so that fairseq's per-GPU processes can unpickle the worker
    from mtprune.fairseq_backend import fairseq_train_main as _main

    _main()
