"""A pruned corpus as a Hugging Face dataset, in OPUS-100's own hub schema (``mtprune export --format hf``).

Per pair, ``09_export/<run>/<pair>/hf/{train,validation,test}.parquet``: one ``translation`` column
(``{<l1>: text, <l2>: text}``, the ``datasets.Translation`` feature of ``Helsinki-NLP/opus-100``), then
``sentence_id`` and every score column of ``04_score/scores.parquet`` (null in validation and test, which are not
scored). The files carry ``datasets``' feature metadata, so

    datasets.load_dataset("parquet", data_files={"train": ".../hf/train.parquet", ...})

gives back the same features. The train split holds the kept pairs in download order, the lines of the text export;
a sentence scored in both directions (``download.direction: both``) is one row, with the scores of the first
direction it was kept in.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..layout import RunLayout
from ..manifest import temp_path
from ..sources import langs
from ..textio import text_lines
from .prune import IDENTIFIERS

BATCH = 10_000
SPLITS = (("train", "train"), ("validation", "valid"), ("test", "test"))  # hub name, 01_download's name


def kept_scores(layout: RunLayout, kept: dict[str, list[str]]) -> tuple[list[str], dict[str, int], Any]:
    """(score columns, sentence id -> row, the kept rows' score table) of the sentences in ``kept``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = pq.read_schema(layout.scores).names
    columns = [c for c in names if c not in IDENTIFIERS]
    table = pq.read_table(layout.scores, columns=["sentence_id", *[c for c in ("direction",) if c in names],
                                                  *columns])
    table = table.filter(pc.is_in(table.column("sentence_id"), value_set=pa.array(list(kept), pa.string())))
    ids = table.column("sentence_id").to_pylist()
    dirs = table.column("direction").to_pylist() if "direction" in names else [None] * len(ids)
    row: dict[str, int] = {}
    for r, (sid, d) in enumerate(zip(ids, dirs, strict=True)):
        wanted = kept[sid]
        best = row.get(sid)
        # the first direction the sentence was kept in (kept.ids lists them when there are two)
        if best is None or (wanted and d in wanted and (dirs[best] not in wanted
                                                        or wanted.index(d) < wanted.index(dirs[best]))):
            row[sid] = r
    return columns, row, table


def write_pair(cfg: Config, layout: RunLayout, name: str, pair: str, kept: dict[str, list[str]],
               columns: list[str], row: dict[str, int], table: Any) -> dict[str, int]:
    """The three splits of one pair; returns the rows of each."""
    import datasets
    import pyarrow.parquet as pq

    l1, l2 = langs(pair)
    features = datasets.Features({"translation": datasets.Translation(languages=[l1, l2]),
                                  "sentence_id": datasets.Value("string"),
                                  **{c: datasets.Value("float64") for c in columns}})
    schema = features.arrow_schema
    counts = {}
    for hub, split in SPLITS:
        path = layout.export_hf(name, pair, hub)
        texts = zip(text_lines(layout.split_file(pair, split, l1)), text_lines(layout.split_file(pair, split, l2)),
                    strict=True)
        scored = split == "train"
        rows = (((sid, a, b) for sid, (a, b) in zip(text_lines(layout.download_ids(pair)), texts, strict=True))
                if scored else ((None, a, b) for a, b in texts))
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(temp_path(path), schema)
        n = 0
        try:
            batch: list[tuple[str | None, str, str]] = []
            for sid, a, b in rows:
                if sid is not None and sid not in kept:
                    continue
                batch.append((sid, a, b))
                n += 1
                if len(batch) == BATCH:
                    writer.write_table(_batch(schema, batch, (l1, l2), columns, row if scored else None, table))
                    batch = []
            if batch or n == 0:
                writer.write_table(_batch(schema, batch, (l1, l2), columns, row if scored else None, table))
            writer.close()
            temp_path(path).replace(path)
        finally:
            temp_path(path).unlink(missing_ok=True)
        counts[hub] = n
    return counts


def _batch(schema: Any, batch: list[tuple[str | None, str, str]], sides: tuple[str, str], columns: list[str],
           row: dict[str, int] | None, table: Any) -> Any:
    """Rows of one split as a table of ``schema``: the scores taken from ``table`` (None: an unscored split)."""
    import pyarrow as pa

    l1, l2 = sides
    cols = {"translation": pa.array([{l1: a, l2: b} for _, a, b in batch], schema.field("translation").type),
            "sentence_id": pa.array([s for s, _, _ in batch], pa.string())}
    at = pa.array([row[s] for s, _, _ in batch] if row is not None else [], pa.int64())
    for c in columns:
        cols[c] = table.column(c).take(at).cast(pa.float64()) if row is not None else pa.nulls(len(batch), pa.float64())
    return pa.table(cols, schema=schema)


def export_corpus(cfg: Config, layout: RunLayout, name: str, kept: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    columns, row, table = kept_scores(layout, kept)
    return {pair: write_pair(cfg, layout, name, pair, kept, columns, row, table) for pair in cfg.download.pairs}
