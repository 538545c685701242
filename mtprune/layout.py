"""RunLayout: the one place that names every directory and file of a run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STAGES = ("download", "prepare", "proxy", "score", "prune", "train", "evaluate", "report")
STAGE_DIRS = {name: f"{i + 1:02d}_{name}" for i, name in enumerate(STAGES)}
# stages run only on request, never by sweep: export copies corpora out of the run for other toolkits
EXTRA_STAGES = ("export",)
STAGE_DIRS.update({name: f"{len(STAGES) + i + 1:02d}_{name}" for i, name in enumerate(EXTRA_STAGES)})


def run_name(strategy: str, sparsity: float | None) -> str:
    """Folder name of one pruned corpus / model: ``el2n-high-0.3``; ``full`` for the baseline, the strategy
    alone for one whose fraction the data decides (``opusfilter``: sparsity None)."""
    return strategy if strategy == "full" or sparsity is None else f"{strategy}-{sparsity:g}"


def seed_run_name(name: str, seed: int) -> str:
    """Folder name of one model of ``train.seeds`` (06_train, 07_evaluate): ``el2n-high-0.3-seed2``.
    Seed 1 keeps the plain name, so a finished single-seed sweep grows more seeds by training only those."""
    return name if seed == 1 else f"{name}-seed{seed}"


def state_dir() -> Path:
    """Where mtprune remembers the last run used (``MTPRUNE_STATE_DIR``, else ``$XDG_STATE_HOME/mtprune``,
    else ``~/.local/state/mtprune``)."""
    if os.environ.get("MTPRUNE_STATE_DIR"):
        return Path(os.environ["MTPRUNE_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mtprune"


def remember_run(root: Path) -> None:
    """Record ``root`` as the last run used, for `status`, `report` and `config` without ``-c`` (best effort)."""
    try:
        d = state_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".last-run.{os.getpid()}"
        tmp.write_text(str(Path(root).resolve()) + "\n", encoding="utf-8")
        os.replace(tmp, d / "last-run")
    except OSError:  # a read-only home: nothing to remember, nothing breaks
        pass


def last_run() -> Path | None:
    """The run directory recorded by ``remember_run``, if it still holds a resolved config."""
    try:
        root = Path((state_dir() / "last-run").read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return None
    return root if (root / "config.resolved.yaml").is_file() else None


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # run level
    @property
    def resolved_config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def manifest(self, stage: str) -> Path:
        return self.stage_dir(stage) / "manifest.json"

    def in_progress(self, stage: str) -> Path:
        return self.stage_dir(stage) / ".in-progress.json"

    # 01_download
    def pair_dir(self, pair: str) -> Path:
        return self.stage_dir("download") / pair

    def split_file(self, pair: str, split: str, lang: str) -> Path:
        return self.pair_dir(pair) / f"{split}.{lang}"

    def download_ids(self, pair: str) -> Path:
        return self.pair_dir(pair) / "train.ids"

    @property
    def noise_ids(self) -> Path:
        """Labelled corrupted pairs, one `<sentence id> TAB <kind>` line each (synthetic corpus or download.noise)."""
        return self.stage_dir("download") / "noise.ids"

    @property
    def domain_ids(self) -> Path:
        """With a training pool of parts one of which is ``in_domain``: every training pair, `<sentence id> TAB
        IN_DOMAIN` or `general`, what the domain columns are judged on (04_score/domain.md)."""
        return self.stage_dir("download") / "domain.ids"

    # 02_prepare
    @property
    def spm_model(self) -> Path:
        return self.stage_dir("prepare") / "spm.model"

    @property
    def spm_dir(self) -> Path:
        return self.stage_dir("prepare") / "spm"

    @property
    def data_bin(self) -> Path:
        return self.stage_dir("prepare") / "data-bin"

    @property
    def data_bin_reverse(self) -> Path:
        """With proxy.dual: row i of data_bin with source and target swapped, same dictionary."""
        return self.stage_dir("prepare") / "data-bin-reverse"

    @property
    def spm_reverse_dir(self) -> Path:
        return self.stage_dir("prepare") / "spm-reverse"

    @property
    def prepare_ids(self) -> Path:
        return self.stage_dir("prepare") / "train.ids"

    @property
    def prepare_tasks(self) -> Path:
        """One line per fairseq train index: ``<pair>\\t<src>-<tgt>`` (direction of the example)."""
        return self.stage_dir("prepare") / "train.tasks"

    @property
    def prepare_shards(self) -> Path:
        """Parts of the training data binarized on their own (``prepare --shard I/N``) and the SentencePiece model
        they share, until the plain ``mtprune prepare`` assembles data-bin from them."""
        return self.stage_dir("prepare") / "shards"

    def prepare_part(self, i: int, count: int) -> Path:
        """The prefix of part I of N's files (``part-0002-of-0008.src.bin``, ``.json`` written last)."""
        return self.prepare_shards / f"part-{i:04d}-of-{count:04d}"

    @property
    def test_index(self) -> Path:
        return self.stage_dir("prepare") / "test.tsv"

    # 03_proxy
    def proxy_seed_dir(self, seed: int) -> Path:
        return self.stage_dir("proxy") / f"seed{seed}"

    def proxy_checkpoint(self, seed: int, updates: int) -> Path:
        return self.proxy_seed_dir(seed) / f"checkpoint_u{updates}.pt"

    def proxy_reverse_seed_dir(self, seed: int) -> Path:
        """With proxy.dual: the proxy run of the same seed on data_bin_reverse."""
        return self.stage_dir("proxy") / f"reverse-seed{seed}"

    def proxy_reverse_checkpoint(self, seed: int, updates: int) -> Path:
        return self.proxy_reverse_seed_dir(seed) / f"checkpoint_u{updates}.pt"

    # 04_score
    @property
    def scores(self) -> Path:
        return self.stage_dir("score") / "scores.parquet"

    @property
    def token_scores(self) -> Path:
        return self.stage_dir("score") / "tokens.parquet"

    @property
    def score_domain(self) -> Path:
        """domain.md: how well each domain column tells the download's in-domain part from the rest (score.py)."""
        return self.stage_dir("score") / "domain.md"

    @property
    def score_noise(self) -> tuple[Path, Path]:
        """noise.md and noise.csv: how well each score finds the download's labelled noise (score.py)."""
        return self.stage_dir("score") / "noise.md", self.stage_dir("score") / "noise.csv"

    @property
    def baseline_cache(self) -> Path:
        """The base_* columns, computed once per training text and kept across reruns (scoring/baselines.py)."""
        return self.stage_dir("score") / "shards" / "baselines.parquet"

    @property
    def grad_sketch(self) -> Path:
        """float32 (rows of scores.parquet, 256): each pair's output-layer gradient sketch (score.py)."""
        return self.stage_dir("score") / "grad_sketch.npy"

    def score_shard(self, index: int, count: int) -> Path:
        return self.stage_dir("score") / "shards" / f"shard-{index:04d}-of-{count:04d}.parquet"

    # 05_prune
    def prune_dir(self, name: str) -> Path:
        return self.stage_dir("prune") / name

    def kept_ids(self, name: str) -> Path:
        return self.prune_dir(name) / "kept.ids"

    def pruned_data_bin(self, name: str) -> Path:
        return self.prune_dir(name) / "data-bin"

    # 06_train
    def train_dir(self, name: str) -> Path:
        return self.stage_dir("train") / name

    # 07_evaluate
    def eval_dir(self, name: str) -> Path:
        return self.stage_dir("evaluate") / name

    def metrics(self, name: str) -> Path:
        return self.eval_dir(name) / "metrics.json"

    # 08_report
    def report_file(self, name: str) -> Path:
        return self.stage_dir("report") / name

    # 09_export
    def export_dir(self, name: str) -> Path:
        return self.stage_dir("export") / name

    def export_file(self, name: str, pair: str, lang: str) -> Path:
        """Untokenized kept training text of one pair and side of the pruned corpus ``name``."""
        return self.export_dir(name) / pair / f"train.{lang}"

    def export_ids(self, name: str, pair: str) -> Path:
        return self.export_dir(name) / pair / "train.ids"

    def export_hf(self, name: str, pair: str, split: str) -> Path:
        """One split (train, validation, test) of the pruned corpus ``name`` as a Hugging Face dataset file."""
        return self.export_dir(name) / pair / "hf" / f"{split}.parquet"

    @property
    def export_scores(self) -> Path:
        return self.stage_dir("export") / "scores.tsv"
