"""Stage 9 (on request, not part of sweep): pruned corpora as plain text, and every score as TSV.

For training elsewhere (Marian, OpenNMT, Hugging Face): ``09_export/<run>/<pair>/train.<lang>`` holds
the kept training pairs of a pruned corpus, untokenized, exactly as ``01_download`` wrote them (the
text the pipeline trained on), in download order; ``train.ids`` beside them gives each line's sentence
id. ``09_export/scores.tsv`` has one row per scored pair: ``sentence_id``, ``pair`` (and ``direction``
with ``download.direction: both``), then every score column of ``04_score/scores.parquet``, for people
who pick their own threshold; when noise labels are known (``01_download/noise.ids``, or ``report.noise_ids``,
which wins), a last column ``noise`` with each pair's labelled kind (empty: not labelled). With
``export.format: hf`` (``--format hf``) each pair of a pruned corpus is also a Hugging Face dataset in OPUS-100's hub
schema, with its scores, in ``09_export/<run>/<pair>/hf/`` (``export_hf.py``).
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import open_atomic
from ..pipeline import StageResult
from ..sources import langs
from ..textio import text_lines
from .prune import IDENTIFIERS
from .prune import runs as pruned_runs
from .report import check as check_labels
from .report import external_inputs as report_inputs
from .report import noise_labels

SECTIONS = ("export",)
UPSTREAM = ("download", "score", "prune")
log = logging.getLogger("mtprune")


def chosen_runs(cfg: Config) -> list[str]:
    """Names of the pruned corpora to export: export.runs, or every one the prune stage made."""
    known = [name for name, _, _ in pruned_runs(cfg)]
    wanted = list(cfg.export.runs) or known
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise UsageError(f"export.runs: no pruned corpus {', '.join(map(repr, unknown))} "
                         f"(pruned corpora: {', '.join(known)})")
    return wanted


def external_inputs(cfg: Config) -> list[str]:
    """report.noise_ids, when set: its labels become scores.tsv's ``noise`` column."""
    return report_inputs(cfg)


def preflight(cfg: Config, layout: RunLayout) -> None:
    chosen_runs(cfg)
    check_labels(cfg, layout)


def _kept(path: Path) -> dict[str, list[str]]:
    """Sentence id -> the directions it was kept in (empty list: one direction, not recorded)."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in text_lines(path):
        sid, _, direction = line.partition("\t")
        if direction:
            out[sid].append(direction)
        else:
            out.setdefault(sid, [])
    return out


def export_corpus(cfg: Config, layout: RunLayout, name: str, kept: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Write one pruned corpus's kept pairs (``_kept`` of its kept.ids) per pair and side; returns the line counts
    per pair."""
    counts: dict[str, dict[str, int]] = {}
    for pair in cfg.download.pairs:
        l1, l2 = langs(pair)
        rows = zip(text_lines(layout.download_ids(pair)), text_lines(layout.split_file(pair, "train", l1)),
                   text_lines(layout.split_file(pair, "train", l2)), strict=True)
        n = 0
        with ExitStack() as stack:
            f1, f2, fid = (stack.enter_context(open_atomic(p)) for p in (
                layout.export_file(name, pair, l1), layout.export_file(name, pair, l2), layout.export_ids(name, pair)))
            for sid, a, b in rows:
                if sid in kept:
                    f1.write(a + "\n")
                    f2.write(b + "\n")
                    fid.write(sid + ("\t" + ",".join(kept[sid]) if kept[sid] else "") + "\n")
                    n += 1
        counts[pair] = {"pairs": n}
    total = sum(c["pairs"] for c in counts.values())
    log.info("export: %s: %d kept pairs (%s)", name, total, ", ".join(f"{p} {c['pairs']}" for p, c in counts.items()))
    return counts


def export_scores(layout: RunLayout, labels: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """scores.parquet as TSV, streamed batch by batch, with a last column ``noise`` (the labelled kind, empty
    when clean) when ``labels`` (sentence id -> kind) are given; returns (rows, columns)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(layout.scores)
    names = pf.schema_arrow.names
    columns = ["sentence_id", "pair"] + [c for c in ("direction",) if c in names and _both(pf)]
    columns += [c for c in names if c not in IDENTIFIERS]
    rows = 0
    with open_atomic(layout.export_scores) as f:
        f.write("\t".join(columns + (["noise"] if labels is not None else [])) + "\n")
        for batch in pf.iter_batches(columns=columns, batch_size=50_000):
            df = batch.to_pandas()
            if labels is not None:
                df["noise"] = df["sentence_id"].map(labels).astype(object).fillna("")
            df.to_csv(f, sep="\t", header=False, index=False, lineterminator="\n")
            rows += len(df)
    return rows, columns + (["noise"] if labels is not None else [])


def _both(pf: Any) -> bool:
    """Whether some sentence is scored in two directions (download.direction: both)."""
    t = pf.read(columns=["sentence_id"])
    return t.num_rows != len(set(t.column(0).to_pylist()))


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    names = chosen_runs(cfg)
    labels = noise_labels(cfg, layout)  # before anything is written: a missing report.noise_ids is one line
    sd = layout.stage_dir("export")
    for d in sd.iterdir():  # corpora of an earlier export that are no longer asked for
        if d.is_dir() and d.name not in names:
            shutil.rmtree(d)
    stats: dict[str, Any] = {"runs": {}}
    outputs: list[Path] = []
    for name in names:
        kept = _kept(layout.kept_ids(name))
        stats["runs"][name] = export_corpus(cfg, layout, name, kept)
        if cfg.export.format == "hf":
            from .export_hf import export_corpus as export_hf

            hf = export_hf(cfg, layout, name, kept)
            for pair, rows in hf.items():
                stats["runs"][name][pair]["hf"] = rows
        outputs.append(layout.export_dir(name))
        crash_point(f"export:after:{name}")
    rows, columns = export_scores(layout, None if labels is None else labels[0])
    outputs.append(layout.export_scores)
    stats["scores"] = {"rows": rows, "columns": columns}
    return StageResult(outputs, stats)
