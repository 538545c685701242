"""Stage 4: per-pair scores from every proxy checkpoint, averaged over checkpoints and seeds; write 04_score/.

The scoring room is ``mtprune/scoring/``: the pass (``forward.py``, which documents every score), its shards
(``shards.py``), the columns computed after the merge (``derived.py``, ``proto.py``, ``dual.py``). This stage
runs the pass as the one shard of one (or merges the shards scored by hand or on several GPUs), adds the
post-pass columns and writes ``scores.parquet``, the gradient sketch and, with labelled noise, the noise table.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import UsageError
from ..layout import RunLayout
from ..manifest import atomic_write_text, count_lines, temp_path
from ..pipeline import StageResult, require_fresh_upstream, stage_config, upstream_digests
from ..scoring import domain, target
from ..scoring.derived import add_columns_table
from ..scoring.disktable import DiskTable
from ..scoring.dual import add_columns as add_dual_columns
from ..scoring.finding import labelled_noise_table, read_noise_ids
from ..scoring.forward import checkpoints, pick_device, score_columns, score_indices, score_table
from ..scoring.proto import with_proto
from ..scoring.shards import (
    concat_npy,
    finished_shards,
    parse_shard,
    pass_stats,
    remove_stale_temps,
    score_on_gpus,
    shard_indices,
    shard_key,
    shard_pooled,
    shard_sketch,
    shard_tokens,
    with_sentence_ids,
    write_parquet,
)
from ..scoring.stats import diagnostics

SECTIONS = ("model", "proxy", "score")


UPSTREAM = ("prepare", "proxy")


KEEPS_UNITS = True  # shards in 04_score/shards carry their own key
# the base_* columns (whole, or per slice from `score --baselines I/N`) and the word-alignment models, keyed by the
# text they were computed from: --overwrite and a changed config keep them (computing them again gives the same bytes,
# in minutes at millions of pairs); the domain columns, keyed by the pass, the target text and score.target
KEPT_CACHES = ("shards/baselines.parquet", "shards/baselines-*-of-*.parquet", "shards/wordalign/*.npz",
               "shards/wordalign/*.json", "shards/domain.parquet", "shards/domain.json")


log = logging.getLogger("mtprune")


def external_inputs(cfg: Config) -> list[str]:
    """score.target's files (fingerprinted: an edited target file redoes the domain columns, not the pass)."""
    return target.external_inputs(cfg)


def current_shard_key(cfg: Config, layout: RunLayout) -> str:
    """The key shards scored now are finished with (``scoring.shards.shard_key`` of this stage's settings)."""
    return shard_key(stage_config(cfg, "score"), upstream_digests("score", layout))


def run_shard(cfg: Config, layout: RunLayout, shard: str) -> Path:
    """Score slice I of N into 04_score/shards/ (no manifest: `mtprune score` merges the shards)."""
    from ..fairseq_backend import load_train_pairs  # torch: not for `mtprune --help`

    i, count = parse_shard(shard)
    require_fresh_upstream("score", cfg, layout)
    remove_stale_temps(layout, (i, count))  # this shard's files from a killed earlier attempt
    n = len(load_train_pairs(layout.data_bin)[1])
    indices = shard_indices(n, i, count)
    path = layout.score_shard(i, count)
    sketch, pooled = shard_sketch(path), shard_pooled(path)
    tmp_sketch, tmp_pooled = temp_path(sketch), temp_path(pooled)
    try:
        res = score_indices(cfg, layout, indices, f"score shard {i}/{count}", tmp_sketch, tmp_pooled)
        os.replace(tmp_sketch, sketch)
        os.replace(tmp_pooled, pooled)
    finally:
        tmp_sketch.unlink(missing_ok=True)
        tmp_pooled.unlink(missing_ok=True)
    write_parquet(add_dual_columns(cfg, layout, score_table(cfg, layout, indices, res)), path)
    if cfg.score.dump_tokens:  # before the key file: a shard counts as finished only once that is written
        import pyarrow as pa

        write_parquet(pa.Table.from_pylist(res["tokens"]), shard_tokens(path))
    n_tok = float(res["n_tokens"].sum())
    atomic_write_text(path.with_suffix(".json"), json.dumps({
        "key": current_shard_key(cfg, layout), "rows": len(indices), "seconds": res["seconds"], "device": str(res["device"]),
        "target_tokens": n_tok, "dev_seconds": res["dev_seconds"], "dev_pairs": res["n_dev"]}))
    log.info("score: shard %d/%d: %d pairs in %.1fs -> %s", i, count, len(indices), res["seconds"], path)
    return path


def require_baselines(cfg: Config, what: str) -> None:
    """UsageError for a baselines slice (``what``: the command) when the config computes no ``base_*`` columns."""
    if not cfg.score.baselines:
        raise UsageError(f"{what}: score.baselines is false in this config: there are no base_* columns to compute")


def run_baselines_shard(cfg: Config, layout: RunLayout, shard: str) -> Path:
    """The ``base_*`` columns of slice I of N of the training pairs into ``04_score/shards/baselines-I-of-N.parquet``:
    CPU work that needs the prepare stage only (no proxy model), run as a job array of its own beside the proxy
    and score jobs on a cluster; `mtprune score` then assembles the columns from the shards instead of computing
    them in its one merge process. Every slice scores with the same word-alignment models, fitted on the pair's whole
    training text (the first slice to need one fits it; the others wait for it and read it)."""
    from ..scoring import baselines
    from ..scoring.forward import row_columns
    from ..scoring.rawtext import RowText

    require_baselines(cfg, "score --baselines")
    i, count = parse_shard(shard, "--baselines")
    require_fresh_upstream("score", cfg, layout, upstream=("prepare",), label="score --baselines")
    t0 = time.time()
    n = count_lines(layout.prepare_ids)
    cols = row_columns(layout, shard_indices(n, i, count))
    path = baselines.shard_file(layout.baseline_cache.parent, i, count)
    seconds: dict[str, float] = {}
    with RowText(layout, cols["pair"], cols["direction"], cols["sentence_id"]) as text:
        baselines.cached_rows(path, cols["sentence_id"], text, text.direction_codes, text.direction_names,
                              path.parent, seconds)
    log.info("score: baselines shard %d/%d: %d pairs in %.1fs -> %s (%s)", i, count, len(cols["index"]),
             time.time() - t0, path, ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) or "reused")
    return path


def _with_proto(table: Any, pooled: np.ndarray, ckpts: list[Any], clusters: int) -> Any:
    """The ``proto`` columns, scikit-learn's ConvergenceWarning turned into one log line: k-means finds fewer
    distinct clusters than asked when sentences repeat (one encoder state for all copies), once per language pair
    and model, and each printed a two-line warning with sklearn's source line on the terminal."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        table = with_proto(table, pooled, ckpts, clusters)
    fewer = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:  # any other warning is shown as it would have been
        if w not in fewer:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if fewer:
        log.info("score: proto: %d k-means fit(s) found fewer distinct clusters than score.proto_clusters (%d), "
                 "as repeated sentences share one encoder state; the distances are to the clusters found (%s)",
                 len(fewer), clusters, str(fewer[0].message).split(". ")[0])
    return table


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ckpts = checkpoints(cfg, layout)
    remove_stale_temps(layout)  # what killed passes left, shards being scored by other processes excepted
    key = current_shard_key(cfg, layout)
    shards = finished_shards(layout, key)
    stats: dict[str, Any] = {}
    if shards is None:  # more than one GPU: one `score --shard` process per GPU, merged below
        shards = score_on_gpus(cfg, layout, key)
    if shards is None:  # one device: the whole pass as the one shard of one, kept so that a change of a
        shards = [run_shard(cfg, layout, "0/1")]  # merge-only setting (score.combine, ...) only re-merges
    else:
        log.info("score: merging %d finished shard%s", len(shards), "s" if len(shards) > 1 else "")
    tmp_sketch, tmp_pooled = temp_path(layout.grad_sketch), layout.stage_dir("score") / f".pooled.{os.getpid()}.tmp"
    try:
        table = DiskTable(shards)  # read a column at a time: the merge's memory does not hold every column
        if cfg.score.dump_tokens:
            tok = pa.concat_tables([pq.read_table(shard_tokens(s)) for s in shards])
            write_parquet(with_sentence_ids(tok, table), layout.token_scores)
        stats.update(pass_stats(shards, len(ckpts)))
        concat_npy([shard_sketch(s) for s in shards], tmp_sketch)
        concat_npy([shard_pooled(s) for s in shards], tmp_pooled)
        t0 = time.time()
        table = _with_proto(table, np.load(tmp_pooled, mmap_mode="r"), ckpts, cfg.score.proto_clusters)
        stats["proto_seconds"] = round(time.time() - t0, 2)
        if np.load(tmp_sketch, mmap_mode="r").shape[0] != table.num_rows:
            raise UsageError("score: gradient sketches do not match the scored rows; delete 04_score/shards and score again")
        if cfg.score.target.enabled:  # from the finished pass's pooled states and sketch (domain.py)
            seconds = stats.setdefault("domain_seconds", {})
            t0 = time.time()
            domain_cols = domain.columns(cfg, layout, table, np.load(tmp_pooled, mmap_mode="r"),
                                         np.load(tmp_sketch, mmap_mode="r"), ckpts, key, seconds)
            log.info("score: domain columns in %.1fs (%s)", time.time() - t0,
                     ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) or "kept")
        os.replace(tmp_sketch, layout.grad_sketch)
    finally:
        tmp_sketch.unlink(missing_ok=True)
        tmp_pooled.unlink(missing_ok=True)
    n_rows = table.num_rows
    if np.unique(table.column("index").to_numpy()).size != n_rows:
        raise UsageError("score: shards overlap; delete 04_score/shards and score again")
    # last, after the merge: combined may rank any column above
    table = add_columns_table(table, cfg, layout, stats.setdefault("derived_seconds", {}))
    if cfg.score.target.enabled:
        for name in domain.COLUMNS:
            if name in domain_cols:
                table = table.append_column(name, pa.array(domain_cols[name]))
    table.write(layout.scores)
    table = DiskTable([layout.scores])
    stats["rows"] = n_rows
    stats["checkpoints"] = [c.tag for c in ckpts]
    stats.update(diagnostics(table, ckpts))
    e = stats["per_score"]["el2n"]
    log.info("score: %d pairs; el2n mean %.3f (p5 %.3f, p50 %.3f, p95 %.3f); spearman with length %.2f; "
             "between seeds %s", n_rows, e["mean"], e["p5"], e["p50"], e["p95"], e["spearman_vs_length"],
             ", ".join(f"{k} {v:.2f}" for k, v in stats["el2n_spearman_between_seeds"].items()) or "n/a")
    outputs = [layout.scores, layout.grad_sketch] + ([layout.token_scores] if cfg.score.dump_tokens else [])
    outputs += _noise_files(table, layout, stats)
    outputs += _domain_files(table, layout, stats)
    return StageResult(outputs, stats)


def _noise_files(table: Any, layout: RunLayout, stats: dict[str, Any]) -> list[Path]:
    """With labelled noise from the download (``download.noise`` or the synthetic corpus), how well each
    score finds it: ``04_score/noise.md`` and ``noise.csv``, so a scorer is judged without training any final
    model. Without labels, files of an earlier labelled run are removed."""
    md_path, csv_path = layout.score_noise
    if not layout.noise_ids.is_file():
        md_path.unlink(missing_ok=True)
        csv_path.unlink(missing_ok=True)
        return []
    labels = read_noise_ids(layout.noise_ids)
    per_pair = [c for c in table.column_names if "@" not in c]  # what the noise table reads: no per-checkpoint columns
    md, long, summary = labelled_noise_table(table.to_pandas(per_pair), labels, "01_download/noise.ids")
    atomic_write_text(md_path, md)
    atomic_write_text(csv_path, long.to_csv(index=False, lineterminator="\n"))
    stats["noise"] = summary
    best = [f"{k} {v:.2f}" for k, v in summary["auroc"].items() if v is not None][:4]
    base = summary["auroc"].get("-length")
    log.info("score: finding the %d labelled pairs, best AUROC: %s; -length %s (table: %s)", summary["labelled"],
             ", ".join(best) or "n/a", "n/a" if base is None else f"{base:.2f}", md_path)
    return [md_path, csv_path]


def _domain_files(table: Any, layout: RunLayout, stats: dict[str, Any]) -> list[Path]:
    """With a training pool whose in-domain part the download marked (``01_download/domain.ids``) and domain columns:
    ``04_score/domain.md``, how well each column tells the in-domain pairs from the others. Removed otherwise."""
    path = layout.score_domain
    have = [c for c in domain.COLUMNS if c in table.column_names]
    if not layout.domain_ids.is_file() or not have:
        path.unlink(missing_ok=True)
        return []
    labels = read_noise_ids(layout.domain_ids)
    md, summary = domain.finding_table(table.to_pandas(["sentence_id", "n_tokens", *have, *[
        c for c in ("el2n", "combined_all", "base_all") if c in table.column_names]]), labels)
    atomic_write_text(path, md)
    stats["domain"] = summary
    log.info("score: telling the %d in-domain pairs apart, AUROC: %s (table: %s)", summary["in_domain"],
             ", ".join(f"{k} {v:.3f}" for k, v in summary["auroc"].items()), path)
    return [path]


def preflight(cfg: Config, layout: RunLayout) -> None:
    """Bad target text (score.target) is named before the scoring pass, not after it."""
    if cfg.score.target.enabled:
        target.target_text(cfg, layout)


def check(cfg: Config, layout: RunLayout) -> None:
    """Problems the stage would meet, from the config alone (also before a sweep's first stage): a device or
    precision this machine lacks, a ``score.combine`` entry naming a column the stage does not write."""
    pick_device(cfg)
    target.check_files(cfg)
    known = [c for c in score_columns(cfg) if c != "combined"]
    missing = [e for e in cfg.score.combine if e.lstrip("-") not in known]
    if missing:
        raise UsageError(f"score.combine: no score column {missing[0].lstrip('-')!r} (the score stage writes: "
                         f"{', '.join(c for c in known if '@' not in c)} and one <name>@s<seed>u<updates> per "
                         "checkpoint)")


def plan_note(cfg: Config, layout: RunLayout, upstream_runs: list[str]) -> str:
    """For `sweep --dry-run`: whether the scoring pass is kept and only the merge runs."""
    if not upstream_runs and finished_shards(layout, current_shard_key(cfg, layout)) is not None:
        return "the scoring pass in 04_score/shards is kept: only the merge runs"
    return ""
