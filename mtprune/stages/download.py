"""Stage 1: fetch the pairs (OPUS-100 from the hub or a local copy, plain text files, or the synthetic
corpus), clean and subsample."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import noise as noise_mod
from ..config import OPUS_PAIRS, Config, TrainPart
from ..errors import InputError
from ..faults import crash_point
from ..layout import RunLayout
from ..manifest import write_lines
from ..pipeline import StageResult
from ..sources import SPLITS, langs, read_files, read_hub, read_local
from ..synthetic import make_pair
from ..textio import read_lines, text_lines

SECTIONS = ("download",)
UPSTREAM: tuple[str, ...] = ()
SYNTHETIC_EVAL_SIZE = 500  # valid and test pairs generated per synthetic pair
log = logging.getLogger("mtprune")


def local_root(source: str) -> Path:
    """The folder of a ``local:DIR`` source, ``~`` expanded."""
    return Path(source.removeprefix("local:")).expanduser()


def external_inputs(cfg: Config) -> list[str]:
    """The source files on disk (plain-text files, a local copy's files), which ``pipeline`` fingerprints
    with their sha256, so that editing the copy on disk makes the stage stale."""
    src = cfg.download.source
    if src == "files":
        return [str(f) for f in _listed_files(cfg) if f.is_file()]
    if not src.startswith("local:"):
        return []
    root = local_root(src)
    out = []
    for pair in cfg.download.pairs + tuple(_outside_donors(cfg)):
        d = root / pair
        if d.is_dir():
            out += [str(f) for f in sorted(d.iterdir())]
    return out


def _listed_files(cfg: Config) -> list[Path]:
    """Every file of download.files for the configured pairs (source: files)."""
    files = cfg.download.files
    return [Path(f).expanduser() for pair in cfg.download.pairs if pair in files
            for split in SPLITS for given in files[pair].split_files(split) for f in given]


def preflight(cfg: Config, layout: RunLayout) -> None:
    """With source: files, a missing file, or one file given for both sides of a split, is named before
    anything is written."""
    if cfg.download.source != "files":
        return
    files = cfg.download.files
    for pair in cfg.download.pairs:
        for split in SPLITS:
            lists = files[pair].split_files(split)
            for part, given in enumerate(lists):
                parts = split == "train" and isinstance(files[pair].train[0], TrainPart)
                key = f"download.files.{pair}.{split}" + (f"[{part}].files" if parts else "")
                for i, f in enumerate(given):
                    if not Path(f).expanduser().is_file():
                        what = "not a file" if Path(f).expanduser().exists() else "file not found"
                        raise InputError(f"{key}[{i}]: {f}: {what}")
                a, b = given
                if os.path.samefile(Path(a).expanduser(), Path(b).expanduser()):  # also through a link or ./
                    what = f"{a} is given for both sides" if a == b else f"{a} and {b} are the same file"
                    l1, l2 = langs(pair)
                    raise InputError(f"{key}: {what}; give the {l1} file, then the {l2} file")


def _split_reader(cfg: Config, pair: str, bounds: list[tuple[int, int, bool]] | None = None
                  ) -> tuple[Callable[[str], Iterable[tuple[str, str]]], dict[int, str]]:
    """A function split -> rows, and the known noise labels (train line -> kind; synthetic only); ``bounds``
    receives the training pool's parts (``_read_parts``)."""
    src = cfg.download.source
    if src == "hub":
        cache_dir = cfg.download.cache_dir
        return (lambda split: read_hub(pair, split, cache_dir)), {}
    if src == "files":
        files = cfg.download.files[pair]
        return (lambda split: _read_parts(cfg, pair, files.train_parts(), bounds) if split == "train"
                else read_files(getattr(files, split))), {}
    if src.startswith("local:"):
        root = local_root(src)
        return (lambda split: read_local(root, pair, split)), {}
    d = cfg.download
    data = make_pair(pair, d.synthetic_train_per_pair, SYNTHETIC_EVAL_SIZE, SYNTHETIC_EVAL_SIZE,
                     d.synthetic_noise, d.seed)
    return (lambda split: getattr(data, split)), data.noise


def _read_parts(cfg: Config, pair: str, parts: tuple[TrainPart, ...],
                bounds: list[tuple[int, int, bool]] | None = None) -> Iterator[tuple[str, str]]:
    """A training pool of parts, one after the other: a part with ``max_pairs`` gives a seeded draw of that many
    of its pairs (in file order). ``bounds`` receives each part's (first row, end row, in_domain) as it is read."""
    start = 0
    for k, part in enumerate(parts):
        rows: Iterable[tuple[str, str]] = read_files(part.files)
        if part.max_pairs is not None:
            whole = list(rows)
            rows = _subsample(whole, part.max_pairs, f"{cfg.download.seed}-{pair}-part{k}")
        n = 0
        for row in rows:
            n += 1
            yield row
        if bounds is not None:
            bounds.append((start, start + n, part.in_domain))
        start += n


def _in_part(n: int, bounds: list[tuple[int, int, bool]]) -> bool:
    """Whether row ``n`` of a training pool was read from an ``in_domain`` part."""
    return any(start <= n < end and inside for start, end, inside in bounds)


def _cleaned(rows: Iterable[tuple[str, str]], cfg: Config, counts: Counter,
             block: tuple[set[str], set[str]] | None = None) -> Iterator[tuple[int, str, str]]:
    """``(n, text_l1, text_l2)`` of the rows kept, streamed; ``counts`` tallies what was read and dropped."""
    d = cfg.download
    counts["kept"] = 0
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
            counts["kept"] += 1
            yield n, a, b


def _subsample(rows: list, limit: int | None, seed: str) -> list:
    if limit is None or len(rows) <= limit:
        return rows
    return [rows[i] for i in _sample(len(rows), limit, seed)]


def _sample(total: int, limit: int, seed: str) -> list[int]:
    """The positions kept when ``limit`` of ``total`` rows are drawn, in order."""
    return sorted(random.Random(seed).sample(range(total), limit))


def _write_train(layout: RunLayout, pair: str, rows: Iterable[tuple[int, str, str]], limit: int | None,
                 seed: str) -> int:
    """Write the cleaned training rows (ids and both sides), at most ``limit`` of them drawn with ``seed``,
    without holding them in memory: every row goes to temp files first, then the draw is copied out of them
    (the same rows as drawing from a list). Returns the number written."""
    l1, l2 = langs(pair)
    finals = (layout.download_ids(pair), layout.split_file(pair, "train", l1), layout.split_file(pair, "train", l2))
    temps = [p.with_name(f".{p.name}.all.{os.getpid()}.tmp") for p in finals]
    try:
        total = 0
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(t, "w", encoding="utf-8", newline="\n")) for t in temps]
            for n, a, b in rows:
                for f, text in zip(files, (f"{pair}/{n}", a, b), strict=True):
                    f.write(text + "\n")
                total += 1
        keep = None if limit is None or total <= limit else _sample(total, limit, seed)
        for tmp, final in zip(temps, finals, strict=True):
            if keep is None:
                os.replace(tmp, final)
            else:
                write_lines(final, _picked(text_lines(tmp), keep))
        return total if keep is None else len(keep)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)


def _picked(lines: Iterable[str], keep: list[int]) -> Iterator[str]:
    """The lines at the (sorted) positions ``keep``."""
    want = iter(keep)
    nxt = next(want, None)
    for i, line in enumerate(lines):
        if i == nxt:
            yield line
            nxt = next(want, None)
            if nxt is None:
                return


def _wants_wrong_language(cfg: Config) -> bool:
    n = cfg.download.noise
    return n.rate > 0 and "wrong_language" in n.kinds


def _outside_donors(cfg: Config) -> list[str]:
    """With one pair and `wrong_language` noise: the other pairs of the source that give a third language."""
    d = cfg.download
    if len(d.pairs) != 1 or not _wants_wrong_language(cfg):
        return []
    if d.source == "synthetic":
        return [p for p in OPUS_PAIRS if p != d.pairs[0]]
    if d.source.startswith("local:"):
        return noise_mod.local_donor_pairs(local_root(d.source), d.pairs[0])
    return []


def _outside_pools(cfg: Config) -> list[list[str]]:
    """Third-language sentences for a single-pair download, from the source's other pairs (raw train split)."""
    d = cfg.download
    donors = _outside_donors(cfg)
    if not donors:
        raise noise_mod.no_donor_error(d.pairs[0], d.source)
    pools = []
    for donor in donors:
        side = noise_mod.third_language_index(donor) - 1
        reader, noisy = _split_reader(cfg, donor)  # the synthetic corpus's own noise is no third language
        log.info("download: third-language sentences for wrong_language noise from %s", donor)
        texts = (r[side] for n, r in enumerate(reader("train")) if n not in noisy)
        pools.append(noise_mod.reservoir(texts, f"{d.noise.seed}-{donor}-pool"))
    return pools


def _add_noise(cfg: Config, layout: RunLayout, pools: dict[str, list[str]], outside: list[list[str]],
               labelled: dict[str, dict[int, str]]) -> dict[str, dict[str, int]]:
    """Corrupt the written train split of each pair in place; adds the new labels to ``labelled``."""
    d, nz = cfg.download, cfg.download.noise
    counts: dict[str, dict[str, int]] = {}
    for pair in d.pairs:
        l1, l2 = langs(pair)
        ids = read_lines(layout.download_ids(pair))
        rows = [(int(sid.rsplit("/", 1)[1]), a, b) for sid, a, b in
                zip(ids, read_lines(layout.split_file(pair, "train", l1)),
                    read_lines(layout.split_file(pair, "train", l2)), strict=True)]
        donors = [pool for p, pool in pools.items() if p != pair] + outside
        rows, labels = noise_mod.inject(rows, rate=nz.rate, kinds=nz.kinds, seed=f"{nz.seed}-{pair}-noise",
                                        tgt=noise_mod.target_index(pair, d.direction), pools=donors,
                                        exclude=labelled[pair])
        for side, lang in ((1, l1), (2, l2)):
            write_lines(layout.split_file(pair, "train", lang), (r[side] for r in rows))
        labelled[pair].update(labels)
        counts[pair] = {k: sum(v == k for v in labels.values()) for k in nz.kinds}
        wanted = round(nz.rate * len(rows))
        if len(labels) < wanted:
            log.warning("download: %s: only %d of %d pairs could be corrupted with kinds %s",
                        pair, len(labels), wanted, ", ".join(nz.kinds))
        log.info("download: %s: noise injected into %d of %d training pairs (%s)", pair, len(labels), len(rows),
                 ", ".join(f"{k} {n}" for k, n in counts[pair].items()))
    return counts


def run(cfg: Config, layout: RunLayout, **_: Any) -> StageResult:
    d = cfg.download
    stats: dict[str, Any] = {"source": d.source, "pairs": {}}
    outputs: list[Path] = []
    add_noise = d.noise.rate > 0
    # wrong_language needs a third language: the download's other pairs, or the source's (checked first)
    outside = _outside_pools(cfg) if _wants_wrong_language(cfg) and len(d.pairs) == 1 else []
    pools: dict[str, list[str]] = {}
    domain_rows: dict[str, list[tuple[str, bool]]] = {}  # training pools of parts, one in_domain
    labelled: dict[str, dict[int, str]] = {}
    for pair in d.pairs:
        l1, l2 = langs(pair)
        bounds: list[tuple[int, int, bool]] = []
        reader, noise = _split_reader(cfg, pair, bounds)
        # the hub can take minutes: say what is being fetched; a copy on disk is read in seconds
        log.log(logging.INFO if d.source == "hub" else logging.DEBUG, "download: %s from %s", pair, d.source)
        per_split: dict[str, Any] = {}
        test_counts: Counter = Counter()
        test = list(_cleaned(reader("test"), cfg, test_counts))
        if not test:
            raise InputError(f"download: {pair}: the test split is empty after cleaning ({dict(test_counts)})")
        valid_counts: Counter = Counter()
        valid = list(_cleaned(reader("valid"), cfg, valid_counts))
        if not valid:
            raise InputError(f"download: {pair}: the valid split is empty after cleaning ({dict(valid_counts)})")
        block = ({a for _, a, _ in test}, {b for _, _, b in test})
        valid = _subsample(valid, d.max_valid_per_pair, f"{d.seed}-{pair}-valid")
        test = _subsample(test, d.max_test_per_pair, f"{d.seed}-{pair}-test")
        layout.pair_dir(pair).mkdir(parents=True, exist_ok=True)
        for split, rows, counts in (("valid", valid, valid_counts), ("test", test, test_counts)):
            for side, lang in ((1, l1), (2, l2)):
                path = layout.split_file(pair, split, lang)
                write_lines(path, (r[side] for r in rows))
                outputs.append(path)
            per_split[split] = {**dict(counts), "written": len(rows)}
        # the training split can be millions of rows: streamed to disk, never held as Python strings
        train_counts: Counter = Counter()
        n_train = _write_train(layout, pair, _cleaned(reader("train"), cfg, train_counts, block),
                               d.max_train_per_pair, f"{d.seed}-{pair}-train")
        if not n_train:
            raise InputError(f"download: {pair}: no training pairs left after cleaning ({dict(train_counts)})")
        per_split["train"] = {**dict(train_counts), "written": n_train}
        outputs += [layout.split_file(pair, "train", l1), layout.split_file(pair, "train", l2),
                    layout.download_ids(pair)]
        if any(inside for _, _, inside in bounds):
            domain_rows[pair] = [(sid, _in_part(int(sid.rsplit("/", 1)[1]), bounds))
                                 for sid in text_lines(layout.download_ids(pair))]
        train_ids = [int(sid.rsplit("/", 1)[1]) for sid in text_lines(layout.download_ids(pair))] if noise else []
        labelled[pair] = {n: noise[n] for n in train_ids if n in noise}
        if _wants_wrong_language(cfg) and len(d.pairs) > 1:
            side = noise_mod.third_language_index(pair)
            texts = text_lines(layout.split_file(pair, "train", (l1, l2)[side - 1]))
            ids = text_lines(layout.download_ids(pair))
            pools[pair] = noise_mod.pool_of([t for sid, t in zip(ids, texts, strict=True)
                                             if int(sid.rsplit("/", 1)[1]) not in labelled[pair]],
                                            f"{d.noise.seed}-{pair}-pool")
        stats["pairs"][pair] = {split: per_split[split] for split in SPLITS}
        crash_point(f"download:after:{pair}")
        log.info("download: %s (%s): train %d (read %d, empty %d, too long %d, in test %d), valid %d, test %d",
                 pair, d.source, n_train, train_counts["read"], train_counts["empty_side"], train_counts["too_long"],
                 train_counts["in_test_set"], len(valid), len(test))
    if add_noise:
        per_pair = _add_noise(cfg, layout, pools, outside, labelled)
        stats["noise"] = {"rate": d.noise.rate, "seed": d.noise.seed, "pairs": per_pair,
                          "kinds": {k: sum(c[k] for c in per_pair.values()) for k in d.noise.kinds}}
    if domain_rows:  # which training pairs are of the target domain: what the domain columns are judged on
        write_lines(layout.domain_ids, (f"{sid}\t{'IN_DOMAIN' if inside else 'general'}"
                                        for rows in domain_rows.values() for sid, inside in rows))
        outputs.append(layout.domain_ids)
        stats["in_domain_pairs"] = sum(inside for rows in domain_rows.values() for _, inside in rows)
    else:
        layout.domain_ids.unlink(missing_ok=True)
    if d.source == "synthetic" or add_noise:
        write_lines(layout.noise_ids, (f"{pair}/{n}\t{kind}" for pair in d.pairs
                                       for n, kind in sorted(labelled[pair].items())))
        outputs.append(layout.noise_ids)
        stats["noise_pairs"] = sum(len(v) for v in labelled.values())
    return StageResult(outputs, stats)
