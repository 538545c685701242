"""Typed, frozen configuration: YAML file + dotted ``--set key=value`` overrides.

Every problem (unknown key, wrong type, value out of range) is collected and reported at once,
each with its dotted key, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

OPUS_PAIRS = ("de-en", "en-es", "en-fr", "en-it")
_STRATEGY = re.compile(r"^(random|[A-Za-z0-9_]+-(high|low))$")

# Settings that change how fast work runs, never what it produces: no stage or work unit is stale
# because one of them changed (a GPU user would lose hours to a batch-size tweak). Dotted keys; a key
# ending in ".*" covers a whole section.
SPEED_ONLY = (
    "run_dir",
    "prepare.workers",
    "proxy.parallel",
    "score.device",
    "score.batch_tokens",
    "score.chunk_tokens",
    "train.parallel",
    "evaluate.max_tokens",
    "launch.*",
)


def is_speed_only(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in SPEED_ONLY)


# ---- recording which settings a stage reads -----------------------------------------------------
# A stage's freshness is judged on exactly the settings it read while it ran (minus SPEED_ONLY), so a
# stage that reads another stage's key (prepare reads download.direction) is stale when that key
# changes, without anyone keeping a list. Every thread of the process records into the same set:
# work units run on a thread pool.

_reads: set[str] | None = None
_reads_lock = threading.Lock()


@contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Collect the dotted keys of every setting read from any config object inside the block."""
    global _reads
    with _reads_lock:
        if _reads is not None:
            raise RuntimeError("recording_reads() does not nest")
        _reads = set()
    try:
        yield _reads
    finally:
        with _reads_lock:
            _reads = None


class _Recorded:
    """Base of every config section: leaf reads are recorded while ``recording_reads`` is active."""

    _path = ""  # dotted path of this section inside Config, set by Config.__post_init__

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        reads = _reads
        if reads is not None and not name.startswith("_") and name in type(self).__dataclass_fields__:
            if not isinstance(value, _Recorded):
                path = object.__getattribute__(self, "_path")
                reads.add(f"{path}.{name}" if path else name)
        return value


def _set_paths(section: Any, path: str) -> None:
    object.__setattr__(section, "_path", path)
    for f in dataclasses.fields(section):
        child = object.__getattribute__(section, f.name)
        if isinstance(child, _Recorded):
            _set_paths(child, f"{path}.{f.name}" if path else f.name)


def lookup(cfg: Any, key: str) -> Any:
    """The plain value of a dotted key (``download.direction``) without recording the read."""
    node = cfg
    for part in key.split("."):
        node = object.__getattribute__(node, part)
    return to_plain(node)


# Corruptions that download.noise can inject into a real corpus (labels go to 01_download/noise.ids)
NOISE_KINDS = (
    "misaligned",              # target of another, random pair
    "misaligned_same_length",  # target of another pair of about the same length (length filters miss it)
    "untranslated",            # target = source (a copy)
    "wrong_language",          # target in a third language
    "truncated",               # target cut short
    "repeated",                # a stretch of the target repeated, as in looping MT output
    "swapped",                 # source and target sides exchanged
)


@dataclass(frozen=True)
class NoiseConfig(_Recorded):
    rate: float = 0.0  # fraction of training pairs corrupted after cleaning; 0: none
    kinds: tuple[str, ...] = NOISE_KINDS  # drawn uniformly for each corrupted pair
    seed: int = 1

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.rate < 1 or math.isnan(self.rate):
            out.append(f"download.noise.rate: {self.rate} is outside [0, 1)")
        if not self.kinds:
            out.append("download.noise.kinds: needs at least one kind")
        for k in self.kinds:
            if k not in NOISE_KINDS:
                out.append(f"download.noise.kinds: unknown kind {k!r} (known: {', '.join(NOISE_KINDS)})")
        if len(set(self.kinds)) != len(self.kinds):
            out.append("download.noise.kinds: duplicate kinds")
        return out


@dataclass(frozen=True)
class DownloadConfig(_Recorded):
    source: str = "hub"  # hub | local:DIR | synthetic
    pairs: tuple[str, ...] = OPUS_PAIRS
    direction: str = "en-xx"  # en-xx | xx-en | both
    max_train_per_pair: int | None = None
    max_valid_per_pair: int | None = 500
    max_test_per_pair: int | None = None
    max_words: int = 128  # whitespace tokens per side; longer pairs are dropped
    max_chars: int = 1000
    seed: int = 1
    synthetic_train_per_pair: int = 3000
    synthetic_noise: float = 0.1
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def problems(self) -> list[str]:
        out = self.noise.problems()
        if not (self.source in ("hub", "synthetic") or (self.source.startswith("local:") and len(self.source) > 6)):
            out.append(f"download.source: must be hub, synthetic or local:DIR, got {self.source!r}")
        if not self.pairs:
            out.append("download.pairs: needs at least one pair")
        for p in self.pairs:
            if p not in OPUS_PAIRS:
                out.append(f"download.pairs: unknown pair {p!r} (known: {', '.join(OPUS_PAIRS)})")
        if len(set(self.pairs)) != len(self.pairs):
            out.append("download.pairs: duplicate pairs")
        if self.direction not in ("en-xx", "xx-en", "both"):
            out.append(f"download.direction: must be en-xx, xx-en or both, got {self.direction!r}")
        for k in ("max_train_per_pair", "max_valid_per_pair", "max_test_per_pair"):
            v = getattr(self, k)
            if v is not None and v < 1:
                out.append(f"download.{k}: must be >= 1 or null, got {v}")
        if self.max_words < 1 or self.max_chars < 1:
            out.append("download.max_words/max_chars: must be >= 1")
        if self.synthetic_train_per_pair < 10:
            out.append("download.synthetic_train_per_pair: must be >= 10")
        if not 0 <= self.synthetic_noise < 1:
            out.append(f"download.synthetic_noise: must be in [0, 1), got {self.synthetic_noise}")
        return out


@dataclass(frozen=True)
class PrepareConfig(_Recorded):
    vocab_size: int = 8000
    spm_sample: int = 300_000  # sentences sampled from all pairs and both sides to train SentencePiece
    character_coverage: float = 1.0
    model_type: str = "unigram"
    max_tokens: int = 256  # pairs longer than this in SentencePiece pieces (either side) are dropped
    workers: int = 0  # 0: all cores

    def problems(self) -> list[str]:
        out = []
        if self.vocab_size < 50:
            out.append(f"prepare.vocab_size: must be >= 50, got {self.vocab_size}")
        if self.spm_sample < 100:
            out.append("prepare.spm_sample: must be >= 100")
        if not 0.9 <= self.character_coverage <= 1.0:
            out.append("prepare.character_coverage: must be in [0.9, 1]")
        if self.model_type not in ("unigram", "bpe"):
            out.append(f"prepare.model_type: must be unigram or bpe, got {self.model_type!r}")
        if self.max_tokens < 4:
            out.append("prepare.max_tokens: must be >= 4")
        if self.workers < 0:
            out.append("prepare.workers: must be >= 0")
        return out


@dataclass(frozen=True)
class ModelConfig(_Recorded):
    """Architecture shared by proxy and final models."""

    arch: str = "transformer"
    encoder_layers: int = 2
    decoder_layers: int = 2
    embed_dim: int = 64
    ffn_dim: int = 256
    attention_heads: int = 4
    dropout: float = 0.1
    share_all_embeddings: bool = True
    extra_args: tuple[str, ...] = ()  # passed to fairseq-train verbatim

    def problems(self) -> list[str]:
        out = []
        for k in ("encoder_layers", "decoder_layers", "embed_dim", "ffn_dim", "attention_heads"):
            if getattr(self, k) < 1:
                out.append(f"model.{k}: must be >= 1")
        if self.attention_heads >= 1 and self.embed_dim % self.attention_heads:
            out.append("model.embed_dim: must be divisible by model.attention_heads")
        if not 0 <= self.dropout < 1:
            out.append("model.dropout: must be in [0, 1)")
        return out


def _schedule_problems(section: str, s: Any) -> list[str]:
    out = []
    if s.lr <= 0:
        out.append(f"{section}.lr: must be > 0")
    if s.warmup_updates < 0:
        out.append(f"{section}.warmup_updates: must be >= 0")
    if s.max_tokens < 16:
        out.append(f"{section}.max_tokens: must be >= 16")
    if s.update_freq < 1:
        out.append(f"{section}.update_freq: must be >= 1")
    if not 0 <= s.label_smoothing < 1:
        out.append(f"{section}.label_smoothing: must be in [0, 1)")
    if s.precision not in ("fp32", "fp16", "bf16"):
        out.append(f"{section}.precision: must be fp32, fp16 or bf16, got {s.precision!r}")
    if s.parallel < 0:
        out.append(f"{section}.parallel: must be >= 0")
    return out


@dataclass(frozen=True)
class ProxyConfig(_Recorded):
    seeds: tuple[int, ...] = (1, 2, 3)
    checkpoints: tuple[int, ...] = (200, 400)  # update counts whose checkpoints are kept and scored
    lr: float = 0.002
    warmup_updates: int = 80
    max_tokens: int = 2048
    update_freq: int = 1
    label_smoothing: float = 0.1
    precision: str = "fp32"
    parallel: int = 0  # proxy runs at once on this machine; 0: one per 2 cores (at least 1)

    def problems(self) -> list[str]:
        out = _schedule_problems("proxy", self)
        if not self.seeds:
            out.append("proxy.seeds: needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            out.append("proxy.seeds: duplicate seeds")
        if not self.checkpoints:
            out.append("proxy.checkpoints: needs at least one update count")
        if any(c < 1 for c in self.checkpoints):
            out.append("proxy.checkpoints: update counts must be >= 1")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            out.append("proxy.checkpoints: duplicate update counts")
        if self.checkpoints and self.warmup_updates >= min(self.checkpoints):
            out.append(
                f"proxy.warmup_updates: {self.warmup_updates} is not before the first kept checkpoint "
                f"({min(self.checkpoints)}); scores taken inside warm-up barely beat sentence length"
            )
        return out


@dataclass(frozen=True)
class ScoreConfig(_Recorded):
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | fp16 | bf16
    batch_tokens: int = 6000  # source+target tokens per forward batch
    # target tokens whose vocabulary-wide softmax is held at once: small enough to stay in CPU cache
    # (measured with scripts/bench_score.py: 128 beats 1024 by ~1.7x on CPU); raise it on GPUs
    chunk_tokens: int = 128
    dump_tokens: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(f"score.device: must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            out.append(f"score.precision: must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.batch_tokens < 16:
            out.append("score.batch_tokens: must be >= 16")
        if self.chunk_tokens < 1:
            out.append("score.chunk_tokens: must be >= 1")
        return out


@dataclass(frozen=True)
class PruneConfig(_Recorded):
    sparsities: tuple[float, ...] = (0.1, 0.3, 0.5)
    strategies: tuple[str, ...] = ("el2n-high", "random")
    scope: str = "global"  # global | per-pair
    seed: int = 1

    def problems(self) -> list[str]:
        out = []
        if not self.sparsities:
            out.append("prune.sparsities: needs at least one sparsity")
        for s in self.sparsities:
            if not (0 <= s < 1) or math.isnan(s):
                out.append(f"prune.sparsities: {s} is outside [0, 1)")
        if len(set(self.sparsities)) != len(self.sparsities):
            out.append("prune.sparsities: duplicate sparsities")
        if not self.strategies:
            out.append("prune.strategies: needs at least one strategy")
        for s in self.strategies:
            if not _STRATEGY.match(s) or s == "full":
                out.append(f"prune.strategies: unknown strategy {s!r} (random or <score>-high / <score>-low)")
        if len(set(self.strategies)) != len(self.strategies):
            out.append("prune.strategies: duplicate strategies")
        if self.scope not in ("global", "per-pair"):
            out.append(f"prune.scope: must be global or per-pair, got {self.scope!r}")
        return out


@dataclass(frozen=True)
class TrainConfig(_Recorded):
    max_update: int = 1500
    lr: float = 0.002
    warmup_updates: int = 200
    max_tokens: int = 2048
    update_freq: int = 1
    label_smoothing: float = 0.1
    precision: str = "fp32"
    seed: int = 1
    include_full: bool = True  # also train on the unpruned corpus (strategy "full")
    parallel: int = 0

    def problems(self) -> list[str]:
        out = _schedule_problems("train", self)
        if self.max_update < 1:
            out.append("train.max_update: must be >= 1")
        return out


@dataclass(frozen=True)
class TestSet:
    """An extra test set from plain text files, e.g. FLORES devtest (one sentence per line)."""

    name: str
    src_lang: str
    tgt_lang: str
    src: str
    ref: str


@dataclass(frozen=True)
class EvaluateConfig(_Recorded):
    beam: int = 4
    lenpen: float = 1.0
    max_tokens: int = 6000
    checkpoint: str = "best"  # best | last
    extra_test_sets: tuple[TestSet, ...] = ()

    def problems(self) -> list[str]:
        out = []
        if self.beam < 1:
            out.append("evaluate.beam: must be >= 1")
        if self.max_tokens < 16:
            out.append("evaluate.max_tokens: must be >= 16")
        if self.checkpoint not in ("best", "last"):
            out.append(f"evaluate.checkpoint: must be best or last, got {self.checkpoint!r}")
        langs = {lang for p in OPUS_PAIRS for lang in p.split("-")}
        for i, t in enumerate(self.extra_test_sets):
            if t is None:
                continue
            for k in ("src_lang", "tgt_lang"):
                if getattr(t, k) not in langs:
                    out.append(f"evaluate.extra_test_sets[{i}].{k}: unknown language {getattr(t, k)!r}")
        return out


@dataclass(frozen=True)
class ReportConfig(_Recorded):
    noise_ids: str | None = None  # file of sentence ids labelled as bad, one per line
    n_examples: int = 10

    def problems(self) -> list[str]:
        return [] if self.n_examples >= 0 else ["report.n_examples: must be >= 0"]


@dataclass(frozen=True)
class SlurmConfig(_Recorded):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 1  # for the GPU stages (proxy, score, train, evaluate); the others get none
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 720
    array_parallelism: int = 8  # array tasks running at once
    extra: tuple[str, ...] = ()  # more sbatch options as "key=value", e.g. "constraint=a100"

    def problems(self) -> list[str]:
        out = []
        for k in ("gpus_per_node", "cpus_per_task", "mem_gb", "time_min", "array_parallelism"):
            if getattr(self, k) < (0 if k == "gpus_per_node" else 1):
                out.append(f"launch.slurm.{k}: must be >= {0 if k == 'gpus_per_node' else 1}")
        for e in self.extra:
            if "=" not in e:
                out.append(f"launch.slurm.extra: {e!r} is not key=value")
        return out


@dataclass(frozen=True)
class LaunchConfig(_Recorded):
    # local: in this process; slurm: job arrays through submitit; submitit-local: the same jobs as
    # subprocesses of this machine (submitit's local executor), stage after stage
    launcher: str = "local"
    score_shards: int = 0  # 0: one shard per array task that runs at once (slurm.array_parallelism)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def problems(self) -> list[str]:
        out = self.slurm.problems()
        if self.launcher not in ("local", "slurm", "submitit-local"):
            out.append(f"launch.launcher: must be local, slurm or submitit-local, got {self.launcher!r}")
        if self.score_shards < 0:
            out.append("launch.score_shards: must be >= 0")
        return out


@dataclass(frozen=True)
class Config(_Recorded):
    run_dir: str = "runs/default"
    download: DownloadConfig = field(default_factory=DownloadConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        _set_paths(self, "")

    def problems(self) -> list[str]:
        out: list[str] = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "problems"):
                out.extend(v.problems())
        return out

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def section(self, *names: str) -> dict[str, Any]:
        return {n: to_plain(getattr(self, n)) for n in names}


def to_plain(obj: Any) -> Any:
    """Dataclasses and tuples to plain dicts and lists (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(x) for x in obj]
    return obj


# ---- building a Config from plain data, collecting every problem -------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key, problems)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            problems.append(f"{key}: expected a list, got {value!r}")
            return ()
        return tuple(_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a bug in this module, not user input


def _build(cls: Any, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key, problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields of nested entries such as TestSet
        problems.append(f"{prefix}: {e}")
        return None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected dotted.key=value"], "--set")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {text!r}: empty key"], "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value is not valid YAML ({str(e).splitlines()[0]})"], "--set") from None
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                run_dir: str | None = None) -> Config:
    """Read YAML (if given), apply ``--set`` overrides and ``--run-dir``, validate everything."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError([f"file not found: {p}"], source)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"invalid YAML{where}: {getattr(e, 'problem', e)}"], source) from None
        except UnicodeDecodeError:
            raise ConfigError(["not UTF-8 text"], source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["top level must be a mapping of sections"], source)
        data = loaded
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    if run_dir is not None:
        data["run_dir"] = run_dir
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems = cfg.problems()
    if problems:
        raise ConfigError(problems, source)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
