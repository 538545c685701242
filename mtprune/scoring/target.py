"""The target set of ``score.target`` (the text the user will translate): read and checked, framed as the proxy reads
training rows, and what the proxy becomes when fine-tuned on it (``domain.py`` makes the domain columns of it)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import InputError
from ..layout import RunLayout
from ..sources import langs
from ..textio import text_lines

# ---- the target text ------------------------------------------------------------------------------

def _clean(line: str) -> str:
    return " ".join(line.split())  # as the download folds whitespace


def target_files(cfg: Config, layout: RunLayout) -> dict[str, tuple[Path | None, Path | None]]:
    """Per pair of the run, its target text as (file of l1, file of l2), None for a side not given."""
    t = cfg.score.target
    pairs = cfg.download.pairs
    if t.split is not None:
        return {p: (layout.split_file(p, t.split, langs(p)[0]), layout.split_file(p, t.split, langs(p)[1]))
                for p in pairs}
    check_files(cfg)
    missing = [p for p in pairs if p not in t.files]
    if missing:
        raise InputError(f"score.target.files: no target text for pair {missing[0]} (give [file of "
                         f"{langs(missing[0])[0]}, file of {langs(missing[0])[1]}], null for a side you lack)")
    return {p: tuple(None if f is None else Path(f).expanduser() for f in t.files[p]) for p in pairs}  # type: ignore[misc]


def check_files(cfg: Config) -> None:
    """InputError for a target file that is not there or a pair that is not the run's, from the config alone
    (before a sweep's first stage; the text itself is read when the score stage starts)."""
    t = cfg.score.target
    extra = [p for p in t.files if p not in cfg.download.pairs]
    if extra:
        raise InputError(f"score.target.files: {extra[0]!r} is not a pair of this run (download.pairs: "
                         f"{', '.join(cfg.download.pairs)})")
    for pair, files in t.files.items():
        for k, f in enumerate(files):
            if f is not None and not Path(f).expanduser().is_file():
                what = "not a file" if Path(f).expanduser().exists() else "file not found"
                raise InputError(f"score.target.files.{pair}[{k}]: {f}: {what}")


def external_inputs(cfg: Config) -> list[str]:
    """The target files given by name (the score stage fingerprints them)."""
    return [f for p in cfg.download.pairs for f in cfg.score.target.files.get(p, ()) if f is not None]


def target_text(cfg: Config, layout: RunLayout) -> dict[str, dict[str, list[str] | None]]:
    """Per pair, language -> the target sentences (whitespace folded; None for a side not given). With both sides
    the files must be line-aligned; empty lines are dropped (of a pair: when either side is empty)."""
    out: dict[str, dict[str, list[str] | None]] = {}
    for pair, files in target_files(cfg, layout).items():
        sides: list[list[str] | None] = []
        for k, f in enumerate(files):
            if f is None:
                sides.append(None)
                continue
            where = (f"score.target.split {cfg.score.target.split}" if cfg.score.target.split
                     else f"score.target.files.{pair}[{k}]")
            if not f.is_file():
                raise InputError(f"{where}: {f}: {'not a file' if f.exists() else 'file not found'}")
            try:
                sides.append([_clean(x) for x in text_lines(f)])
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: {f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        a, b = sides
        if a is not None and b is not None:
            if len(a) != len(b):
                raise InputError(f"score.target.files.{pair}: the two files have {len(a)} and {len(b)} lines; "
                                 "they must be line-aligned")
            keep = [i for i in range(len(a)) if a[i] and b[i]]
            a, b = [a[i] for i in keep], [b[i] for i in keep]
        else:
            a = None if a is None else [x for x in a if x]
            b = None if b is None else [x for x in b if x]
        l1, l2 = langs(pair)
        for lang, side, k in ((l1, a, 0), (l2, b, 1)):
            if side is not None and not side:
                raise InputError(f"score.target: no {lang} sentences in the target text of {pair} "
                                 f"({files[k]} has no non-empty line)")
        out[pair] = {l1: a, l2: b}
    return out


def both_sides(text: dict[str, dict[str, list[str] | None]]) -> bool:
    """Whether every pair's target text has both sides (what the proxy columns need)."""
    return all(all(v is not None for v in sides.values()) for sides in text.values())


def digest(text: dict[str, dict[str, list[str] | None]]) -> str:
    h = hashlib.sha256()
    for pair in sorted(text):
        for lang in sorted(text[pair]):
            lines = text[pair][lang]
            h.update(f"{pair}:{lang}:{'-' if lines is None else len(lines)}\n".encode())
            for line in lines or ():
                h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


# ---- the target pairs as the proxy reads them --------------------------------------------------------

class Sequences:
    """In-memory token sequences with ``sizes``, indexable like fairseq's datasets (what ``collate`` reads)."""

    def __init__(self, seqs: list[np.ndarray]) -> None:
        import torch

        self.seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
        self.sizes = np.array([len(s) for s in seqs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> Any:
        return self.seqs[i]


def encode_target(cfg: Config, layout: RunLayout, text: dict[str, dict[str, list[str] | None]], eos: int
                  ) -> tuple[Sequences, Sequences, list[str]]:
    """The target pairs of every translation direction of the run, framed as prepare frames training rows (the
    target language's tag first on the source, an end of sentence on each side, pairs over ``prepare.max_tokens``
    pieces dropped): (sources, targets, direction of each row as ``<src>-<tgt>``)."""
    import sentencepiece as spm

    from ..databin import Vocabulary, tasks

    sp = spm.SentencePieceProcessor(model_file=str(layout.spm_model))
    vocab = Vocabulary.load(layout.spm_model)
    srcs: list[np.ndarray] = []
    tgts: list[np.ndarray] = []
    dirs: list[str] = []
    for pair, s, t in tasks(cfg.download.pairs, cfg.download.direction):
        frame = vocab.frame(cfg, s, t)
        a, b = text[pair][s], text[pair][t]
        assert a is not None and b is not None
        for x, y in zip(sp.encode(a, out_type=int), sp.encode(b, out_type=int), strict=True):
            if len(x) + 1 > frame.limit or len(y) > frame.limit:
                continue
            srcs.append(np.concatenate([[frame.tag], vocab.lut[np.asarray(x, dtype=np.int64)], [eos]]))
            tgts.append(np.concatenate([vocab.lut[np.asarray(y, dtype=np.int64)], [eos]]))
            dirs.append(f"{s}-{t}")
    if not srcs:
        raise InputError(f"score.target: every target pair is longer than prepare.max_tokens "
                         f"({cfg.prepare.max_tokens} pieces)")
    return Sequences(srcs), Sequences(tgts), dirs


# ---- fine-tuning -------------------------------------------------------------------------------------

def finetune(model: Any, src: Any, tgt: Any, dictionary: Any, updates: int, lr: float, max_tokens: int,
             seed: int) -> Any:
    """A copy of ``model`` trained on the pairs (src, tgt) for ``updates`` Adam updates (betas 0.9/0.98, gradient
    norm clipped at 1, token-mean cross-entropy, dropout on), batches of ``max_tokens`` padded tokens in a seeded
    order, epoch after epoch; returned in eval mode. The same inputs and seed give the same weights."""
    import copy

    import torch

    from ..batching import length_batches
    from .forward import collate

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tuned = copy.deepcopy(model).train()
    opt = torch.optim.Adam(tuned.parameters(), lr=lr, betas=(0.9, 0.98))
    pad, eos = dictionary.pad(), dictionary.eos()
    batches = length_batches(np.arange(len(tgt)), [tgt.sizes, src.sizes], max_tokens)
    device = next(tuned.parameters()).device
    done = 0
    with torch.enable_grad():
        while done < updates:
            for k in rng.permutation(len(batches)):
                b = collate(src, tgt, batches[k], pad, eos)
                logits, _ = tuned(b["src_tokens"].to(device), b["src_lengths"].to(device), b["prev"].to(device))
                target = b["target"].to(device)
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         target.reshape(-1), ignore_index=pad, reduction="sum")
                loss = loss / target.ne(pad).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
                opt.step()
                done += 1
                if done == updates:
                    break
    return tuned.eval()
