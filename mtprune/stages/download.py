"""Stage 1: fetch OPUS-100 pairs (hub, local copy or the synthetic corpus), clean and subsample."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import InputError
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import write_lines
from ..pipeline import StageResult
from ..sources import langs, read_hub, read_local
from ..synthetic import make_pair

SECTIONS = ("download",)
UPSTREAM: tuple[str, ...] = ()
SYNTHETIC_EVAL_SIZE = 500  # valid and test pairs generated per synthetic pair
log = logging.getLogger("mtprune")


def external_inputs(cfg: Config) -> dict[str, Any]:
    """Size and mtime of local source files, so editing the copy on disk makes the stage stale."""
    src = cfg.download.source
    if not src.startswith("local:"):
        return {}
    root = Path(src[6:])
    out = {}
    for pair in cfg.download.pairs:
        d = root / pair
        if d.is_dir():
            for f in sorted(d.iterdir()):
                st = f.stat()
                out[str(f)] = f"{st.st_size}:{int(st.st_mtime)}"
    return out


def _split_reader(cfg: Config, pair: str) -> tuple[Callable[[str], Iterable[tuple[str, str]]], dict[int, str]]:
    """A function split -> rows, and the known noise labels (train line -> kind; synthetic only)."""
    src = cfg.download.source
    if src == "hub":
        return (lambda split: read_hub(pair, split)), {}
    if src.startswith("local:"):
        root = Path(src[6:]).expanduser()
        return (lambda split: read_local(root, pair, split)), {}
    d = cfg.download
    data = make_pair(pair, d.synthetic_train_per_pair, SYNTHETIC_EVAL_SIZE, SYNTHETIC_EVAL_SIZE,
                     d.synthetic_noise, d.seed)
    return (lambda split: getattr(data, split)), data.noise


def _clean(rows: Iterable[tuple[str, str]], cfg: Config, counts: Counter,
           block: tuple[set[str], set[str]] | None = None) -> list[tuple[int, str, str]]:
    d = cfg.download
    kept = []
    for n, (a, b) in enumerate(rows):
        a, b = " ".join(a.split()), " ".join(b.split())  # strip, and fold tabs/CR/runs of spaces
        counts["read"] += 1
        if not a or not b:
            counts["empty_side"] += 1
        elif len(a) > d.max_chars or len(b) > d.max_chars or max(len(a.split()), len(b.split())) > d.max_words:
            counts["too_long"] += 1
        elif block is not None and (a in block[0] or b in block[1]):
            counts["in_test_set"] += 1
        else:
            kept.append((n, a, b))
    counts["kept"] = len(kept)
    return kept


def _subsample(rows: list, limit: int | None, seed: str) -> list:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]




def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    d = cfg.download
    stats: dict[str, Any] = {"source": d.source, "pairs": {}}
    outputs: list[Path] = []
    noise_lines: list[str] = []
    for pair in d.pairs:
        l1, l2 = langs(pair)
        reader, noise = _split_reader(cfg, pair)
        log.info("download: %s from %s", pair, d.source)
        per_split: dict[str, Any] = {}
        test_counts: Counter = Counter()
        test = _clean(reader("test"), cfg, test_counts)
        valid_counts: Counter = Counter()
        valid = _clean(reader("valid"), cfg, valid_counts)
        block = ({a for _, a, _ in test}, {b for _, _, b in test})
        train_counts: Counter = Counter()
        train = _clean(reader("train"), cfg, train_counts, block)
        if not train:
            raise InputError(f"download: {pair}: no training pairs left after cleaning ({dict(train_counts)})")
        if not test:
            raise InputError(f"download: {pair}: the test split is empty after cleaning ({dict(test_counts)})")
        if not valid:
            raise InputError(f"download: {pair}: the valid split is empty after cleaning ({dict(valid_counts)})")
        train = _subsample(train, d.max_train_per_pair, f"{d.seed}-{pair}-train")
        valid = _subsample(valid, d.max_valid_per_pair, f"{d.seed}-{pair}-valid")
        test = _subsample(test, d.max_test_per_pair, f"{d.seed}-{pair}-test")
        layout.pair_dir(pair).mkdir(parents=True, exist_ok=True)
        for split, rows, counts in (("train", train, train_counts), ("valid", valid, valid_counts),
                                    ("test", test, test_counts)):
            for side, lang in ((1, l1), (2, l2)):
                path = layout.split_file(pair, split, lang)
                write_lines(path, (r[side] for r in rows))
                outputs.append(path)
            per_split[split] = {**dict(counts), "written": len(rows)}
        write_lines(layout.download_ids(pair), (f"{pair}/{n}" for n, _, _ in train))
        outputs.append(layout.download_ids(pair))
        written = {n for n, _, _ in train}
        noise_lines += [f"{pair}/{n}\t{kind}" for n, kind in sorted(noise.items()) if n in written]
        stats["pairs"][pair] = per_split
        crash_point(f"download:after:{pair}")
        log.info("download: %s: train %d (read %d, empty %d, too long %d, in test %d), valid %d, test %d",
                 pair, len(train), train_counts["read"], train_counts["empty_side"], train_counts["too_long"],
                 train_counts["in_test_set"], len(valid), len(test))
    if d.source == "synthetic":
        write_lines(layout.noise_ids, noise_lines)
        outputs.append(layout.noise_ids)
        stats["noise_pairs"] = len(noise_lines)
    return StageResult(outputs, stats)
