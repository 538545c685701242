"""Typed, frozen configuration: YAML file + dotted ``--set key=value`` overrides.

Why one long module: it is the reference of every setting -- each section's fields, defaults, comments and
validators read top to bottom in one place, the way a user reads a config file; split by section, a rule that
spans sections (an update's size, speed-only keys, the seed forms) would live apart from the fields it checks.

The sections are pydantic v2 models: strict types (no ``"5"`` for an integer, no ``true`` for a
number), unknown keys forbidden, frozen. pydantic checks every field even when others fail, so every
problem -- unknown key, wrong type, value out of range, a bad entry deep in a list -- is collected and
reported at once, each with its dotted key (``evaluate.extra_test_sets[0].src``) in mtprune's own
wording, so a user fixes a config in one pass.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigError

OPUS_PAIRS = ("de-en", "en-es", "en-fr", "en-it")  # the default pairs (and the synthetic corpus's)
# OPUS-100 (Zhang et al. 2020): English paired with each of these 99 languages; the hub's configs and
# the release's folders name a pair with its two codes in alphabetical order (de-en, en-nl)
OPUS100_LANGS = tuple(
    "af am an ar as az be bg bn br bs ca cs cy da de dz el eo es et eu fa fi fr fy ga gd gl gu ha he hi hr "
    "hu hy id ig is it ja ka kk km kn ko ku ky li lt lv mg mk ml mn mr ms mt my nb ne nl nn no oc or pa pl "
    "ps pt ro ru rw se sh si sk sl sq sr sv ta te tg th tk tr tt ug uk ur uz vi wa xh yi yo zh zu".split())
OPUS100_PAIRS = tuple("-".join(sorted(("en", x))) for x in OPUS100_LANGS)
# pairs among ar, de, fr, nl, ru, zh: OPUS-100 has them as test sets only (no training data)
OPUS100_TEST_ONLY = tuple(f"{a}-{b}" for i, a in enumerate(("ar", "de", "fr", "nl", "ru", "zh"))
                          for b in ("ar", "de", "fr", "nl", "ru", "zh")[i + 1:])
_LANGS = tuple(sorted({"en", *OPUS100_LANGS}))
_SCORE = r"[A-Za-z0-9_@]+-(high|low)"  # <score column>-high / -low (a per-checkpoint column el2n@s1u500 too)
# <score>-high / -low, or two of them joined by "+": the first drops prune.first_share, the second the rest
_STRATEGY = re.compile(rf"^(random|random-length|group|opusfilter|{_SCORE}|{_SCORE}\+{_SCORE})$")
_SCORE_STRATEGY = re.compile(rf"^{_SCORE}$")
ORDERS = ("shuffled", "easy-first", "hard-first", "competence", "self-paced",  # train.order (curriculum.py)
          "general-to-domain")

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
    "train.valid_bleu",  # monitoring: the trained weights are the same with and without it (tests/test_curriculum.py)
    "evaluate.max_tokens",
    "download.cache_dir",
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


# ---- value checks: each names what is wrong; the dotted key comes from where pydantic found it ----

def _fail(problems: list[str]) -> NoReturn:
    raise PydanticCustomError("mtprune", "invalid value", {"problems": problems})


def _adding(problem: PydanticCustomError, err: ValidationError, data: Any) -> ValidationError:
    """``err`` with ``problem`` of the section being validated (its own location) listed first: how a
    wrap validator reports its own finding beside every one of the fields' instead of hiding them."""
    lines: list[InitErrorDetails] = [InitErrorDetails(type=problem, loc=(), input=data)]
    for e in err.errors(include_url=False):
        kind = PydanticCustomError("mtprune", "invalid value", e["ctx"]) if e["type"] == "mtprune" else e["type"]
        line = InitErrorDetails(type=kind, loc=e["loc"], input=e["input"])
        if "ctx" in e and e["type"] != "mtprune":
            line["ctx"] = e["ctx"]
        lines.append(line)
    return ValidationError.from_exception_data(err.title, lines)


def _check(problems_of: Callable[[Any], str | list[str] | None]) -> AfterValidator:
    """A pydantic after-validator from a function that returns the value's problems (none: valid)."""

    def validate(value: Any) -> Any:
        found = problems_of(value)
        if found:
            _fail([found] if isinstance(found, str) else found)
        return value

    return AfterValidator(validate)


def _at_least(lo: float, or_null: bool = False) -> AfterValidator:
    tail = " or null" if or_null else ""
    return _check(lambda v: None if v is None or v >= lo else f"must be >= {lo}{tail}, got {v}")


def _above(lo: float) -> AfterValidator:
    return _check(lambda v: None if v > lo else f"must be > {lo}, got {v}")


def _fraction() -> AfterValidator:
    return _check(lambda v: None if 0 <= v < 1 else f"{v} is outside [0, 1)")  # NaN fails too


def _one_of(*choices: str) -> AfterValidator:
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return _check(lambda v: None if v in choices else f"must be {words}, got {v!r}")


def _entries(noun: str, plural: str = "", known: Callable[[Any], bool] | None = None,
             hint: str = "") -> AfterValidator:
    """A list that needs at least one entry, no duplicates and (with ``known``) only known entries."""

    def problems(v: tuple[Any, ...]) -> list[str]:
        out = [] if v else [f"needs at least one {noun}"]
        if known is not None:
            out += [f"unknown {noun} {x!r} ({hint})" for x in v if not known(x)]
        if len(set(v)) != len(v):
            out.append(f"duplicate {plural or noun + 's'}")
        return out

    return _check(problems)


Int = StrictInt
Float = StrictFloat  # an integer is accepted and becomes a float
Str = StrictStr
Bool = StrictBool
Fraction = Annotated[Float, _fraction()]
Positive = Annotated[Int, _at_least(1)]
Precision = Annotated[Str, _one_of("fp32", "fp16", "bf16")]
Parallel = Annotated[Int, _at_least(0)]
Lr = Annotated[Float, _above(0)]
BatchTokens = Annotated[Int, _at_least(16)]
LabelSmoothing = Annotated[Float, _check(lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v}")]


class _Recorded(BaseModel):
    """Base of every config section: frozen, strict, no unknown keys; leaf reads are recorded while
    ``recording_reads`` is active."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), defer_build=True)
    _path: str = PrivateAttr(default="")  # dotted path of this section inside Config, set by Config

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        reads = _reads
        if (reads is not None and not name.startswith("_") and name in type(self).__pydantic_fields__
                and not isinstance(value, _Recorded)):
            path = object.__getattribute__(self, "__pydantic_private__")["_path"]
            reads.add(f"{path}.{name}" if path else name)
        return value

    @model_validator(mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data  # `prune:` with nothing under it in YAML

    def replace(self, **changes: Any) -> Any:
        """A copy with some settings changed, checked like a loaded config (ConfigError if invalid)."""
        data = {n: object.__getattribute__(self, n) for n in type(self).__pydantic_fields__}
        data.update(changes)
        try:
            new = type(self).model_validate(data)
        except ValidationError as e:
            path = object.__getattribute__(self, "__pydantic_private__")["_path"]
            raise ConfigError(_messages(e, type(self), path)) from None
        _set_paths(new, object.__getattribute__(self, "__pydantic_private__")["_path"])
        return new


def _set_paths(section: _Recorded, path: str) -> None:
    object.__getattribute__(section, "__pydantic_private__")["_path"] = path
    for name in type(section).__pydantic_fields__:
        child = object.__getattribute__(section, name)
        if isinstance(child, _Recorded):
            _set_paths(child, f"{path}.{name}" if path else name)


def lookup(cfg: Any, key: str) -> Any:
    """The plain value of a dotted key (``download.direction``) without recording the read."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).__pydantic_fields__:
            raise AttributeError(f"no setting {key!r}")
        node = object.__getattribute__(node, part)
    return _plain(node, object.__getattribute__)


def to_plain(obj: Any) -> Any:
    """Config sections and tuples to plain dicts and lists (YAML/JSON friendly); records the reads."""
    return _plain(obj, getattr)


def _plain(obj: Any, get: Callable[[Any, str], Any]) -> Any:
    if isinstance(obj, BaseModel):
        return {n: _plain(get(obj, n), get) for n in type(obj).__pydantic_fields__}
    if isinstance(obj, tuple | list):
        return [_plain(x, get) for x in obj]
    if isinstance(obj, dict):  # download.files
        return {k: _plain(v, get) for k, v in obj.items()}
    return obj


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


class NoiseConfig(_Recorded):
    rate: Fraction = 0.0  # fraction of training pairs corrupted after cleaning; 0: none
    # drawn uniformly for each corrupted pair
    kinds: Annotated[tuple[Str, ...], _entries("kind", known=NOISE_KINDS.__contains__,
                                               hint="known: " + ", ".join(NOISE_KINDS))] = NOISE_KINDS
    seed: Int = 1


def _source_problem(v: str) -> str | None:
    if v in ("hub", "synthetic", "files") or (v.startswith("local:") and len(v) > 6):
        return None
    return f"must be hub, synthetic, files or local:DIR, got {v!r}"


_LANG_CODE = re.compile(r"^[a-z]{2,3}$")


def _pair_problem(pair: str, source: str) -> str | None:
    """Why ``pair`` cannot be read from ``source`` (None: it can)."""
    if source == "synthetic":
        return None if pair in OPUS_PAIRS else (f"unknown pair {pair!r}: the synthetic corpus has "
                                                f"{', '.join(OPUS_PAIRS)}")
    if source == "files":
        a, _, b = pair.partition("-")
        if not (_LANG_CODE.match(a) and _LANG_CODE.match(b)) or a == b:
            return f"{pair!r} is not <lang>-<lang> (two different lowercase codes, e.g. en-nl)"
        if "en" not in (a, b):
            return f"{pair!r} has no English side: mtprune trains English-centric directions (download.direction)"
        return None
    if pair in OPUS100_PAIRS:
        return None
    if pair in OPUS100_TEST_ONLY:
        return (f"{pair!r} is in OPUS-100 as a test set only (no training data); its training pairs all "
                f"include English")
    a, _, b = pair.partition("-")
    if f"{b}-{a}" in OPUS100_PAIRS:
        return f"unknown pair {pair!r}: OPUS-100 names it {b}-{a} (languages in alphabetical order)"
    return (f"unknown pair {pair!r}: OPUS-100 pairs English with one of its 99 languages, named in "
            f"alphabetical order (de-en, en-nl; {', '.join(OPUS100_LANGS)})")


def _file_pair_problem(v: tuple[str, ...]) -> str | None:
    return None if len(v) == 2 else f"needs two files, one per side of the pair, got {len(v)}"


FilePair = Annotated[tuple[Str, ...], _check(_file_pair_problem)]


class TrainPart(BaseModel):
    """One part of a pair's training pool (``download.files.<pair>.train`` as a list): its two files, at most
    ``max_pairs`` of its pairs (a seeded draw, ``download.seed``), and whether it is text of the target domain
    (``in_domain``: the download then writes ``01_download/domain.ids``, what the domain columns are judged on)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    files: FilePair
    max_pairs: Annotated[Int | None, _at_least(1, or_null=True)] = None
    in_domain: Bool = False


TrainParts = Annotated[tuple[TrainPart, ...], _check(lambda v: None if v else "needs at least one part")]


def _train_form(v: Any) -> str:
    """Which form ``download.files.<pair>.train`` takes: a list of parts (mappings) or the two files."""
    items = v if isinstance(v, list | tuple) else ()
    return "parts" if items and all(isinstance(x, dict | TrainPart) for x in items) else "files"


class PairFiles(BaseModel):
    """Plain-text files of one pair (download.source: files): ``[file of l1, file of l2]`` per split, the
    languages in the order the pair names them; ``.gz`` files are read compressed. ``train`` may instead be a
    list of parts (``TrainPart``), read one after the other into one pool."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    train: Annotated[Annotated[FilePair, Tag("files")] | Annotated[TrainParts, Tag("parts")],
                     Discriminator(_train_form)]
    valid: FilePair
    test: FilePair

    def train_parts(self) -> tuple[TrainPart, ...]:
        """The training pool's parts (one for a plain ``[file, file]``)."""
        if self.train and isinstance(self.train[0], TrainPart):
            return self.train  # type: ignore[return-value]
        return (TrainPart(files=self.train),)

    def split_files(self, split: str) -> list[tuple[str, ...]]:
        """The ``[file of l1, file of l2]`` lists of a split (several for a training pool of parts)."""
        if split == "train":
            return [p.files for p in self.train_parts()]
        return [getattr(self, split)]


class DownloadConfig(_Recorded):
    source: Annotated[Str, _check(_source_problem)] = "hub"  # hub | local:DIR | synthetic | files
    pairs: Annotated[tuple[Str, ...], _entries("pair")] = Field(OPUS_PAIRS, validate_default=True)
    # with source: files, the files of every pair: {en-nl: {train: [EN, NL], valid: [...], test: [...]}}
    files: dict[Str, PairFiles] = Field(default_factory=dict, validate_default=True)
    cache_dir: Str | None = None  # where the hub's datasets are cached (default: datasets' own, ~/.cache)
    direction: Annotated[Str, _one_of("en-xx", "xx-en", "both")] = "en-xx"
    max_train_per_pair: Annotated[Int | None, _at_least(1, or_null=True)] = None
    max_valid_per_pair: Annotated[Int | None, _at_least(1, or_null=True)] = 500
    max_test_per_pair: Annotated[Int | None, _at_least(1, or_null=True)] = None
    max_words: Positive = 128  # whitespace tokens per side; longer pairs are dropped
    max_chars: Positive = 1000
    seed: Int = 1
    synthetic_train_per_pair: Annotated[Int, _at_least(10)] = 3000
    synthetic_noise: Fraction = 0.1
    noise: NoiseConfig = Field(default_factory=NoiseConfig)

    @field_validator("pairs")
    @classmethod
    def _pairs_of_the_source(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        source = info.data.get("source")  # absent when source itself is invalid
        if source is not None:
            problems = [p for p in (_pair_problem(x, source) for x in v) if p]
            if problems:
                _fail(problems)
        return v

    @field_validator("files")
    @classmethod
    def _files_of_the_pairs(cls, v: dict[str, PairFiles], info: ValidationInfo) -> dict[str, PairFiles]:
        pairs = info.data.get("pairs")
        if info.data.get("source") == "files" and pairs is not None:
            problems = [f"no files for pair {p} (download.source is files)" for p in pairs if p not in v]
            problems += [f"files for {p!r}, which is not in download.pairs ({', '.join(pairs)})"
                         for p in v if p not in pairs]
            if problems:
                _fail(problems)
        return v


class PrepareConfig(_Recorded):
    vocab_size: Annotated[Int, _at_least(50)] = 8000
    # sentences sampled from all pairs and both sides to train SentencePiece
    spm_sample: Annotated[Int, _at_least(100)] = 300_000
    character_coverage: Annotated[Float, _check(lambda v: None if 0.9 <= v <= 1 else
                                                f"must be in [0.9, 1], got {v}")] = 1.0
    model_type: Annotated[Str, _one_of("unigram", "bpe")] = "unigram"
    # pairs longer than this in SentencePiece pieces (either side) are dropped
    max_tokens: Annotated[Int, _at_least(4)] = 256
    workers: Parallel = 0  # 0: all cores


class ModelConfig(_Recorded):
    """Architecture shared by proxy and final models."""

    arch: Str = "transformer"
    encoder_layers: Positive = 2
    decoder_layers: Positive = 2
    embed_dim: Positive = 128
    ffn_dim: Positive = 512
    attention_heads: Positive = Field(4, validate_default=True)  # checked against embed_dim
    dropout: LabelSmoothing = 0.1
    share_all_embeddings: Bool = True
    extra_args: tuple[Str, ...] = ()  # passed to fairseq-train verbatim

    @field_validator("attention_heads")
    @classmethod
    def _heads_divide_embed_dim(cls, v: int, info: ValidationInfo) -> int:
        dim = info.data.get("embed_dim")  # absent when embed_dim itself is invalid
        if dim is not None and dim % v:
            _fail([f"{v} does not divide model.embed_dim ({dim})"])
        return v


def _checkpoint_problems(v: tuple[int, ...]) -> list[str]:
    out = [] if v else ["needs at least one update count"]
    if any(c < 1 for c in v):
        out.append("update counts must be >= 1")
    if len(set(v)) != len(v):
        out.append("duplicate update counts")
    return out


def _tokens_or_update_freq(section: str) -> Any:
    """The validator of ``<section>.tokens_per_update``: it and update_freq are two ways to size an update."""

    def check(cls: type, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("update_freq", 1) != 1:
            _fail([f"set {section}.tokens_per_update or {section}.update_freq, not both "
                   "(update_freq is derived from tokens_per_update)"])
        return v

    return field_validator("tokens_per_update")(classmethod(check))


class ProxyConfig(_Recorded):
    seeds: Annotated[tuple[Int, ...], _entries("seed")] = (1, 2)
    # update counts whose checkpoints are kept and scored
    checkpoints: Annotated[tuple[Int, ...], _check(_checkpoint_problems)] = (500, 1000)
    lr: Lr = 0.002
    warmup_updates: Parallel = Field(200, validate_default=True)  # checked against checkpoints
    max_tokens: BatchTokens = 2048
    update_freq: Positive = 1
    # target tokens per optimizer step in all (null: max_tokens x GPUs x update_freq); when set, update_freq is
    # derived from the GPUs present, so an update means the same data on any machine
    tokens_per_update: Annotated[Int | None, _at_least(16, or_null=True)] = Field(None, validate_default=True)
    label_smoothing: LabelSmoothing = 0.1
    precision: Precision = "fp32"
    parallel: Parallel = 0  # proxy runs at once on this machine; 0: one per 2 cores (at least 1)
    # also train each seed on the reversed pairs (02_prepare/data-bin-reverse) for dual_xent: twice the training
    dual: Bool = False

    @field_validator("warmup_updates")
    @classmethod
    def _warmup_ends_before_first_checkpoint(cls, v: int, info: ValidationInfo) -> int:
        kept = info.data.get("checkpoints")  # absent when checkpoints itself is invalid
        if kept and v >= min(kept):
            _fail([f"{v} is not before the first kept checkpoint ({min(kept)}); "
                   "scores taken inside warm-up barely beat sentence length"])
        return v

    _one_way_to_size_an_update = _tokens_or_update_freq("proxy")


_COMBINE_ENTRY = re.compile(r"^-?[A-Za-z0-9_@]+$")


def _chunk_problem(v: int | str) -> str | None:
    if v == "auto" or (isinstance(v, int) and v >= 1):
        return None
    return f"must be a positive number of tokens or auto, got {v!r}"


def combine_problem(entry: str) -> str | None:
    """Why ``entry`` cannot be a ``score.combine`` entry (None: it can); ``scoring/derived.py`` applies the same
    rules to the score table."""
    if not _COMBINE_ENTRY.match(entry):
        return f"{entry!r} is not a score column name (optionally with a leading '-')"
    name = entry.lstrip("-")
    if name.startswith("base_"):
        return (f"{entry!r} is a baseline column: base_* columns need no proxy and stay out of the "
                "combined score")
    if name in ("combined", "combined_all"):
        return f"{name!r} is made from the combined columns; it cannot be one of them"
    return None


def _combine_problems(v: tuple[str, ...]) -> list[str]:
    out = [p for p in map(combine_problem, v) if p]
    return out + (["duplicate columns"] if len(set(v)) != len(v) else [])


# the domain columns (scoring/domain.py), all higher = unlike the target set; the proxy's need target pairs
PROXY_DOMAIN_COLUMNS = ("domain_xent_diff", "domain_grad", "domain_sim")
DOMAIN_COLUMNS = (*PROXY_DOMAIN_COLUMNS, "base_domain_xent", "domain_combined")
SidePath = Str | None


class TargetConfig(_Recorded):
    """The text the user will translate (``score.target``): with files or a split, the score stage adds the domain
    columns (``domain_xent_diff``, ``domain_grad``, ``domain_sim``, ``base_domain_xent``, ``domain_combined``)."""

    # {pair: [file of the pair's first language, file of its second]}, one sentence a line; either side may be
    # null (then only the n-gram column base_domain_xent, from the side given, is computed)
    files: dict[Str, Annotated[tuple[SidePath, ...], _check(
        lambda v: None if len(v) == 2 and any(x is not None for x in v) else
        f"needs two entries, one file per side of the pair (null for a side you lack, not both), got {list(v)}")]
                ] = Field(default_factory=dict)
    # or the run's own valid split as the target set
    split: Annotated[Str | None, _check(lambda v: None if v in (None, "valid") else
                                        f"must be valid or null, got {v!r}")] = Field(None, validate_default=True)
    # domain_xent_diff: each seed's last proxy checkpoint fine-tuned on the target set for this many updates
    # (Adam at lr, batches of proxy.max_tokens target tokens, seeded), then cross-entropy in-domain minus general
    updates: Positive = 300
    lr: Lr = 0.005
    # base_domain_xent: n-gram order of the in-domain and general language models (VariKN, through OpusFilter) and
    # how many training pairs (evenly spaced) the general ones are trained on
    ngram_order: Annotated[Int, _at_least(2)] = 3
    ngram_sample: Annotated[Int, _at_least(100)] = 100_000

    @field_validator("split")
    @classmethod
    def _files_or_split(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("files"):
            _fail(["give score.target.files or score.target.split, not both"])
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.files) or self.split is not None

    def columns(self) -> tuple[str, ...]:
        """The columns these settings add to the score table (``scoring/domain.py``): none without a target set, the
        n-gram ones only when a side is given as null (the proxy's need pairs)."""
        if not self.enabled:
            return ()
        one_sided = any(None in sides for sides in self.files.values())
        return tuple(c for c in DOMAIN_COLUMNS if not (one_sided and c in PROXY_DOMAIN_COLUMNS))


class ScoreConfig(_Recorded):
    device: Annotated[Str, _one_of("auto", "cpu", "cuda")] = "auto"
    # auto (fp16 on cuda: NLL within 1e-3 of fp32, bf16 is not; fp32 on cpu) | fp32 | fp16 | bf16
    precision: Annotated[Str, _one_of("auto", "fp32", "fp16", "bf16")] = "auto"
    batch_tokens: BatchTokens = 6000  # source+target tokens per forward batch
    # target tokens whose vocabulary-wide softmax is held at once, or auto: 2M logits (chunk x vocabulary)
    # on CPU, where they stay in cache, 128M on a GPU (el2n.py chunk_size, scripts/bench_score.py)
    chunk_tokens: Annotated[Int | Str, _check(_chunk_problem)] = "auto"
    dump_tokens: Bool = False
    proto_clusters: Positive = 16  # k-means clusters per language pair and direction for the `proto` score
    # post-pass columns (mtprune/scoring/derived.py): `combined` ranks these columns (-name: low is bad) and takes
    # the max (a pair is as bad as its worst rank) or the mean; [] for none. base_* baselines: on/off
    combine: Annotated[tuple[Str, ...], _check(_combine_problems)] = ("nll_debiased", "el2n_debiased", "el2n_eos",
                                                                      "el2n_max")
    combine_how: Annotated[Str, _one_of("max", "mean")] = "max"
    # base_all and combined_all: fisher (sum of -log tail probabilities over the columns) or max (of the ranks)
    combine_all_how: Annotated[Str, _one_of("fisher", "max")] = "fisher"
    # base_* columns from OpusFilter's filters (length ratios, language id, similarity, punctuation, numerals,
    # repetition, word alignment), their rank max base_all and combined_all (with the combine columns)
    baselines: Bool = True
    # in-domain text: the domain_* columns (mtprune/scoring/domain.py), high = unlike it
    target: TargetConfig = Field(default_factory=lambda: TargetConfig())


def _sparsity_problems(v: tuple[float, ...]) -> list[str]:
    out = [] if v else ["needs at least one sparsity"]
    out += [f"{s} is outside [0, 1)" for s in v if not 0 <= s < 1]  # NaN is outside too
    if len(set(v)) != len(v):
        out.append("duplicate sparsities")
    return out


class PruneConfig(_Recorded):
    sparsities: Annotated[tuple[Float, ...], _check(_sparsity_problems)] = (0.1, 0.3, 0.5)
    strategies: Annotated[tuple[Str, ...], _entries(
        "strategy", "strategies", known=lambda s: bool(_STRATEGY.match(s)) and s != "full",
        hint="random, random-length, group, opusfilter, <score>-high / <score>-low or <score>-high+<score>-high")] = ("el2n-high", "random")
    scope: Annotated[Str, _one_of("global", "per-pair")] = "global"
    seed: Int = 1
    # a two-column strategy <first>+<second> (e.g. base_all-high+domain_combined-high: noise first, then domain):
    # the first column drops this share of the corpus, the second the rest of the sparsity
    first_share: Fraction = 0.1
    # random-length: a random subset that drops as many pairs of each target length as this strategy drops
    # at the same sparsity, so that its BLEU separates the strategy's choice of pairs from its length effect
    length_match: Annotated[Str, _check(lambda v: [] if _SCORE_STRATEGY.match(v) else [
        f"{v!r} is not a <score>-high / <score>-low strategy"])] = "el2n-high"


class TrainConfig(_Recorded):
    # updates: every corpus trains max_update updates (equal compute); epochs: every corpus trains
    # max_epoch passes (updates per pass counted with fairseq's own batching of that corpus)
    budget: Annotated[Str, _one_of("updates", "epochs")] = "updates"
    max_update: Positive = 1500
    max_epoch: Annotated[Int | None, _at_least(1, or_null=True)] = Field(None, validate_default=True)
    lr: Lr = 0.002
    warmup_updates: Parallel = 200
    max_tokens: BatchTokens = 2048
    update_freq: Positive = 1
    # target tokens per optimizer step in all (null: max_tokens x GPUs x update_freq); when set, update_freq is
    # derived from the GPUs present, so an update means the same data on any machine
    tokens_per_update: Annotated[Int | None, _at_least(16, or_null=True)] = Field(None, validate_default=True)
    label_smoothing: LabelSmoothing = 0.1
    precision: Precision = "fp32"
    seeds: Annotated[tuple[Int, ...], _entries("seed")] = (1,)  # every model is trained once per seed
    seed: Int | None = None  # before train.seeds: `seed: k` is read as `seeds: [k]`
    include_full: Bool = True  # also train on the unpruned corpus (strategy "full")
    parallel: Parallel = 0
    # the order(s) fairseq-train presents the pairs in (mtprune/curriculum.py), one name or a list (every corpus
    # is trained once per order and seed): shuffled (fairseq's own batches), easy-first / hard-first (every epoch
    # from the easiest / hardest pair on), competence (batches drawn from the easiest competence(t) share,
    # Platanios et al. 2019), self-paced (competence over the trained model's own ranking); ranked by order_by, a
    # score column, higher = harder (-name: low = harder)
    order: Annotated[tuple[Str, ...], _entries("order", known=lambda v: v in ORDERS,
                                               hint="known: " + ", ".join(ORDERS))] = ("shuffled",)
    order_by: Str = "el2n"
    # the corpora the orders other than shuffled train (names as prune writes them: full, random-0.5, ...); empty:
    # every corpus
    order_corpora: Annotated[tuple[Str, ...], _check(lambda v: "duplicate corpora" if len(set(v)) != len(v)
                                                      else None)] = ()
    competence_c0: Annotated[Float, _check(lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}")] = 0.01
    # general-to-domain (Zhang et al. 2019): domain_phases equal stretches of the updates, the first over the whole
    # corpus, each later one over a smaller share of the pairs order_by ranks most in-domain (lowest), down to
    # domain_final_share in the last (shares shrink geometrically); order_by: domain_combined, say
    domain_phases: Annotated[Int, _at_least(2)] = 4
    domain_final_share: Annotated[Float, _check(lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}")] = 0.3
    # the update at which competence reaches the whole corpus (null: half of each model's updates)
    competence_updates: Annotated[Int | None, _at_least(1, or_null=True)] = None
    # self-paced: competence's window over the trained model's own ranking, by rescore_by (el2n or nll), scored
    # every rescore_every updates on all training pairs or a random sample of rescore_sample of them (null: all)
    rescore_every: Positive = 200
    rescore_by: Annotated[Str, _one_of("el2n", "nll")] = "el2n"
    rescore_sample: Annotated[Int | None, _at_least(1, or_null=True)] = None
    # also log BLEU on the validation set (greedy, SentencePiece removed, sacrebleu 13a) at every validation: the
    # report draws it against updates (does an order reach a BLEU sooner?); the weights trained do not change
    valid_bleu: Bool = False

    @model_validator(mode="wrap")
    @classmethod
    def _seed_becomes_seeds(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        if not (isinstance(data, dict) and isinstance(data.get("seed"), int) and not isinstance(data["seed"], bool)):
            return handler(data)
        rest = {k: v for k, v in data.items() if k != "seed"}
        if "seeds" not in data:
            import logging

            logging.getLogger("mtprune").warning("train.seed: %d is read as train.seeds: [%d] (train.seed is "
                                                 "the older single-seed form)", data["seed"], data["seed"])
            return handler({**rest, "seeds": [data["seed"]]})
        both = PydanticCustomError("mtprune", "invalid value",
                                   {"problems": ["give train.seeds only (train.seed is the older single-seed form)"]})
        try:
            handler(rest)  # the section's other problems (train.seeds: duplicate seeds, ...) are listed too
        except ValidationError as e:
            raise _adding(both, e, data) from None
        raise both

    @field_validator("max_epoch")
    @classmethod
    def _epochs_budget_needs_max_epoch(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None and info.data.get("budget") == "epochs":
            _fail(["needed with train.budget: epochs (the number of passes over each corpus)"])
        return v

    _one_way_to_size_an_update = _tokens_or_update_freq("train")

    @field_validator("order", mode="before")
    @classmethod
    def _one_order_is_a_list_of_one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("order")
    @classmethod
    def _an_order_counts_updates(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        ordered = [o for o in v if o != "shuffled"]
        if ordered and info.data.get("budget") == "epochs":
            _fail([f"{ordered[0]} needs train.budget: updates (a curriculum's schedule is counted in updates)"])
        return v


Lang = Annotated[Str, _check(lambda v: None if v in _LANGS else
                             f"unknown language {v!r} (known: {', '.join(_LANGS)})")]


class TestSet(BaseModel):
    """An extra test set from plain text files, e.g. FLORES devtest (one sentence per line)."""

    __test__ = False  # not a pytest test class
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: Str
    src_lang: Lang
    tgt_lang: Lang
    src: Str
    ref: Str


class EvaluateConfig(_Recorded):
    beam: Positive = 4
    lenpen: Float = 1.0
    max_tokens: BatchTokens = 6000
    checkpoint: Annotated[Str, _one_of("best", "last")] = "best"
    extra_test_sets: tuple[TestSet, ...] = ()


class ReportConfig(_Recorded):
    # labels file: `<sentence id> TAB <kind>` a line (a bare 0-based line number for the id in a one-pair run);
    # kind OK marks a clean pair, and with any the noise is measured on the labelled pairs only
    noise_ids: Str | None = None
    n_examples: Parallel = 10
    # sacrebleu's paired test of BLEU, each pruned model against random and full: bs (paired bootstrap
    # resampling), ar (approximate randomization; ~3x slower) or none; samples 0: sacrebleu's default
    paired_test: Annotated[Str, _one_of("bs", "ar", "none")] = "bs"
    paired_samples: Parallel = 0


class ExportConfig(_Recorded):
    # pruned corpora to export (el2n-high-0.2, ...; `mtprune export --run NAME`); empty: every one
    runs: Annotated[tuple[Str, ...], _check(lambda v: "duplicate runs" if len(set(v)) != len(v) else None)] = ()
    # text: plain line-aligned files (Marian, OpenNMT, fairseq); hf: also a Hugging Face dataset per pair in
    # OPUS-100's hub schema (`mtprune export --format hf`)
    format: Annotated[Str, _one_of("text", "hf")] = "text"


class SlurmConfig(_Recorded):
    partition: Str | None = None
    account: Str | None = None
    qos: Str | None = None
    # GPUs a job may hold per node: evaluate holds them all, a score shard 1, a proxy seed or retraining
    # run launch.gpus_per_run; the CPU stages and the jobs that finish a stage none
    gpus_per_node: Parallel = 1
    # nodes each proxy seed and retraining run trains across (launch.gpus_per_run GPUs on each, one fairseq
    # process per GPU started through srun); more than 1 needs --launcher slurm and GPUs
    nodes: Positive = 1
    cpus_per_task: Positive = 8
    mem_gb: Positive = 64
    time_min: Positive = 720
    array_parallelism: Positive = 8  # array tasks running at once
    # more sbatch options as "key=value", e.g. "constraint=a100"
    extra: tuple[Annotated[Str, _check(lambda e: None if "=" in e else f"{e!r} is not key=value")], ...] = ()


class LaunchConfig(_Recorded):
    # local: in this process; slurm: job arrays through submitit; submitit-local: the same jobs as
    # subprocesses of this machine (submitit's local executor), stage after stage
    launcher: Annotated[Str, _one_of("local", "slurm", "submitit-local")] = "local"
    # 0: one shard per array task that runs at once (slurm.array_parallelism)
    score_shards: Parallel = 0
    # parts prepare's training rows are encoded and binarized in as a CPU job array under Slurm (`prepare --shard
    # I/N`); 0: one per array task that runs at once (slurm.array_parallelism); 1: one prepare job, no array
    prepare_shards: Parallel = 0
    # a Weights & Biases project that proxy and final training log to (fairseq's --wandb-project; needs
    # `pip install wandb`); null: none. TensorBoard logs are always written (<unit folder>/tb)
    wandb_project: Str | None = None
    # GPUs each proxy seed and retraining run trains on: 1 spreads the runs one per GPU (the model fits one GPU);
    # more trains each run data-parallel over that many (DDP). On CPU: ignored
    gpus_per_run: Positive = 1
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class Config(_Recorded):
    run_dir: Str = "runs/default"
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    def model_post_init(self, context: Any, /) -> None:
        _set_paths(self, "")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def section(self, *names: str) -> dict[str, Any]:
        return {n: to_plain(getattr(self, n)) for n in names}


# ---- pydantic's errors in mtprune's words ------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
    "model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
}


# the tags of download.files.<pair>.train's two forms, which pydantic puts in an error's location after "train"
_UNION_TAGS = {("train", "files"), ("train", "parts")}


def _key(prefix: str, loc: tuple[Any, ...]) -> str:
    key = prefix
    for before, part in zip((None, *loc[:-1]), loc, strict=True):
        if (before, part) in _UNION_TAGS:
            continue
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "config"


def _section_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model class found at ``loc`` (list positions skipped) below ``root``."""
    cls = root
    for part in loc:  # a dict's key (download.files.<pair>) or a union's tag is no field: skipped
        if isinstance(part, str) and part in cls.__pydantic_fields__:
            cls = _model_in(cls.__pydantic_fields__[part].annotation)
    return cls


def _model_in(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in getattr(tp, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# pydantic names the member of a union a value failed as a step of its location (score.chunk_tokens.int): not a key
_UNION_MEMBER = re.compile(r"^(int|str|float|bool|none|list\[.*|tuple\[.*|dict\[.*|function-.*|constrained-.*|lax-.*|"
                           r"json-or-python\[.*|nullable\[.*|union\[.*|tagged-union\[.*)$")


def _merged_unions(errors: list[Any]) -> list[Any]:
    """pydantic's errors with union members taken out of their locations, and a value that fits no member of a
    union (one type error per member) made one error whose message names every member."""
    out: list[Any] = []
    by_loc: dict[tuple[Any, ...], Any] = {}
    for e in errors:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_MEMBER.match(p)))
        if loc != tuple(e["loc"]) and e["type"] in _EXPECTED and loc in by_loc:
            by_loc[loc]["expected"].append(_EXPECTED[e["type"]])
            continue
        e = {**e, "loc": loc, "expected": [_EXPECTED[e["type"]]] if e["type"] in _EXPECTED else []}
        if e["expected"]:
            by_loc[loc] = e
        out.append(e)
    return out


def _messages(err: ValidationError, root: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for e in _merged_unions(err.errors(include_url=False)):
        key = _key(prefix, e["loc"])
        kind = e["type"]
        if kind == "mtprune":
            out += [f"{key}: {p}" for p in e["ctx"]["problems"]]
        elif kind == "extra_forbidden":
            known = sorted(_section_at(root, e["loc"][:-1]).__pydantic_fields__)
            out.append(f"{key}: unknown key (known: {', '.join(known)})")
        elif kind in _EXPECTED:
            out.append(f"{key}: expected {' or '.join(dict.fromkeys(e['expected']))}, got {e['input']!r}")
        elif kind == "missing":
            out.append(f"{key}: missing (required)")
        else:
            out.append(f"{key}: {e['msg']}")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected dotted.key=value"], "--set")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {text!r}: empty key"], "--set")
    try:
        value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value is not valid YAML ({str(e).splitlines()[0]})"], "--set") from None
    return key.split("."), value


class DuplicateKey(yaml.YAMLError):
    pass


class ConfigLoader(yaml.SafeLoader):
    """YAML as a config wants it: a key given twice in one mapping is an error (PyYAML keeps the last silently),
    and ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``; YAML 1.2 and every user reads it as a number)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise DuplicateKey(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in the same "
                                   f"mapping (first on line {seen[key]}); PyYAML would keep the last silently")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


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
            text = p.read_text(encoding="utf-8")
            loaded = yaml.load(text, Loader=ConfigLoader)
        except DuplicateKey as e:
            raise ConfigError([str(e)], source) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"invalid YAML{where}: {getattr(e, 'problem', e)}"], source) from None
        except UnicodeDecodeError:
            raise ConfigError(["not UTF-8 text"], source) from None
        if loaded is None and p.name == "config.resolved.yaml":  # a run's record of its config: never blank
            raise ConfigError(["is empty: the run's record of its config is damaged; give the config the run was "
                               "made with (-c)"], source)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["top level must be a mapping of sections"], source)
        data = loaded
    overridden = []
    for text in overrides:
        keys, value = parse_override(text)
        overridden.append(".".join(keys))
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    if run_dir is not None:
        data["run_dir"] = run_dir
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_messages(e, Config), source, tuple(overridden)) from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
