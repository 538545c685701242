"""results.md's comparisons between the sweep's systems: the paired significance tests (each pruned model
against ``random`` at its sparsity and against ``full``, and the length-matched strategy against
``random-length``) and what each pruned corpus dropped (how many pairs, how long, how much labelled noise).
Apart from ``report.py`` so that each stays one screenful of concerns; ``report.run`` puts them in results.md."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..layout import RunLayout, run_name
from ..scoring.finding import md_table
from ..textio import read_lines
from .train import seed_models


def significance(cfg: Config, layout: RunLayout) -> tuple[str, dict[str, Any]]:
    """results.md's section of paired tests (each pruned model against random at its sparsity and
    against full), and its stats; see mtprune/significance.py for what exactly is tested."""
    from ..significance import paired_test
    from .evaluate import hyp_path, opus_test_sets

    test = cfg.report.paired_test
    if test == "none":
        return "", {}
    sets = opus_test_sets(cfg, layout)
    seeds = list(cfg.train.seeds)
    refs = [r for _ in seeds for ts in sets for r in ts["ref"]]
    langs = [ts["tgt_lang"] for _ in seeds for ts in sets for _r in ts["ref"]]
    pooled: dict[str, list[str]] = {}
    corpus: dict[str, tuple[str, float]] = {}
    shuffled_of: dict[str, str] = {}  # a model trained in another order -> the same corpus trained shuffled
    for m in seed_models(cfg, layout):
        hyps = [h for ts in sets for h in read_lines(hyp_path(layout, m.run, ts["name"]))]
        pooled.setdefault(m.name, []).extend(hyps)
        corpus[m.name] = (m.strategy, m.sparsity)
        if m.order != "shuffled":
            shuffled_of[m.name] = m.pruned_as[0]
    samples = cfg.report.paired_samples
    vs: dict[str, dict[str, Any]] = {"random": {}, "full": {}, "random-length": {}, "shuffled": {}}
    signature = ""
    for sp in sorted({sp for st, sp in corpus.values() if st == "random"}):
        base = run_name("random", sp)
        others = [(n, pooled[n]) for n, (st, s) in corpus.items() if s == sp and st not in ("random", "full")]
        found, sig = paired_test((base, pooled[base]), others, refs, test, samples, langs)
        vs["random"].update({c.system: c for c in found})
        signature = sig or signature
    # the length control: the strategy random-length is matched to, against random-length at each sparsity
    matched = cfg.prune.length_match
    for sp in sorted({sp for st, sp in corpus.values() if st == "random-length"}):
        base, other = run_name("random-length", sp), run_name(matched, sp)
        if other in pooled:
            found, sig = paired_test((base, pooled[base]), [(other, pooled[other])], refs, test, samples, langs)
            vs["random-length"].update({c.system: c for c in found})
            signature = sig or signature
    if "full" in corpus:
        others = [(n, h) for n, h in pooled.items() if n != "full"]
        found, sig = paired_test(("full", pooled["full"]), others, refs, test, samples, langs)
        vs["full"].update({c.system: c for c in found})
        signature = sig or signature
    # an order against the same corpus in fairseq's own shuffled order: what the order itself does
    for base in dict.fromkeys(shuffled_of.values()):
        ordered = [(n, pooled[n]) for n, b in shuffled_of.items() if b == base]
        if base in pooled:
            found, sig = paired_test((base, pooled[base]), ordered, refs, test, samples, langs)
            vs["shuffled"].update({c.system: c for c in found})
            signature = sig or signature
    if not vs["random"] and not vs["full"] and not vs["shuffled"]:
        return "", {}
    what = "paired bootstrap resampling" if test == "bs" else "approximate randomization"
    seeds_text = (f"the hypotheses of seeds {', '.join(map(str, seeds))} concatenated as well (seed k beside seed k), "
                  "so each p-value tests the seed-pooled systems against resampling of the test sentences; the "
                  "spread between seeds (± above) is not part of it" if len(seeds) > 1 else "one seed")
    md = [f"\n## Paired significance (sacrebleu {what})\n\nBLEU on the concatenated test sets "
          f"({', '.join(ts['name'] for ts in sets)}: {len(refs) // len(seeds)} sentences), {seeds_text}. "
          f"p: two-sided p-value of the difference from `random` at the same sparsity and from `full`"
          + (f"; and `{matched}` against `random-length` (random pairs with its target-length distribution, "
             "`prune.length_match`): what its choice of pairs adds beyond their length" if vs["random-length"] else "")
          + ("; and a model trained in another order (`train.order`) against the same corpus trained `shuffled`: "
             "what the order itself does" if vs["shuffled"] else "")
          + f". Δ: the difference of the pooled BLEU; `1 (identical)`: the same hypotheses as the baseline, "
          f"not tested. Signature: `{signature}`.\n\n"]
    body = []
    against = [("random", vs["random"]), ("full", vs["full"])] + (
        [("random-length", vs["random-length"])] if vs["random-length"] else []) + (
        [("shuffled", vs["shuffled"])] if vs["shuffled"] else [])
    for name, (st, sp) in corpus.items():
        if st == "full":
            continue
        found = [v.get(name) for _, v in against]
        first = next((c for c in found if c), None)
        row: list[Any] = [st, sp, first.bleu if first else float("nan")]
        for c in found:
            row += [f"{c.bleu - c.baseline_bleu:+.2f}" if c else "–", _p_text(c)]
        body.append(row)
    md.append(md_table(["strategy", "sparsity", "BLEU (pooled)"] +
                       [h for b, _ in against for h in (f"Δ vs {b}", f"p vs {b}")], body))
    stats = {"test": test, "signature": signature, "seeds": seeds,
             "p_vs_random": {n: c.p_value for n, c in vs["random"].items()},
             "p_vs_full": {n: c.p_value for n, c in vs["full"].items()},
             "p_vs_random_length": {n: c.p_value for n, c in vs["random-length"].items()},
             "p_vs_shuffled": {n: c.p_value for n, c in vs["shuffled"].items()}}
    return "".join(md), stats


def _p_text(c: Any) -> str:
    """A comparison's p cell: a copy of its baseline says so rather than show a p-value of a test not run."""
    if c is None:
        return "–"
    return "1 (identical)" if c.identical else f"{c.p_value:.4f}"


def dropped_section(cfg: Config, layout: RunLayout, df: Any,
                    labels: tuple[dict[str, str], str] | None) -> tuple[str, dict[str, Any]]:
    """results.md's "What each corpus dropped": per pruned corpus, how many pairs it dropped, their mean target
    length against the whole corpus's, and with noise labels the labelled share of the dropped pairs and of the
    pairs kept (a strategy may gain BLEU by dropping noise, or by dropping long pairs; this tells which)."""
    from .prune import fraction_dropped
    from .prune import runs as pruned_runs

    length = df["n_tokens"].to_numpy(dtype=float)
    keys = df["sentence_id"].astype(str)
    both = keys + "\t" + df["direction"].astype(str)
    noisy = df["sentence_id"].isin(labels[0].keys()).to_numpy() if labels is not None else None
    rows, stats = [], {}
    for name, st, sp in pruned_runs(cfg):
        path = layout.kept_ids(name)
        if not path.is_file():
            continue
        kept_lines = read_lines(path)
        kept = (both if any("\t" in ln for ln in kept_lines[:1]) else keys).isin(set(kept_lines)).to_numpy()
        sparsity = fraction_dropped(layout, name) if sp is None else sp
        entry = {"dropped": int((~kept).sum()), "dropped_mean_tokens": float(length[~kept].mean()) if (~kept).any()
                 else float("nan"), "kept_mean_tokens": float(length[kept].mean())}
        row = [st, sparsity, entry["dropped"], entry["dropped_mean_tokens"], entry["kept_mean_tokens"]]
        if noisy is not None:
            entry["noise_share_dropped"] = float(noisy[~kept].mean()) if (~kept).any() else float("nan")
            entry["noise_share_kept"] = float(noisy[kept].mean())
            row += [entry["noise_share_dropped"], entry["noise_share_kept"]]
        rows.append(row)
        stats[name] = entry
    if not rows:
        return "", {}
    head = ["strategy", "sparsity", "pairs dropped", "dropped: mean target tokens", "kept: mean target tokens"]
    text = (f"\n## What each corpus dropped\n\nTarget length in SentencePiece tokens (with the end of sentence); "
            f"the whole corpus: {length.mean():.2f} on average.")
    if noisy is not None:
        head += ["labelled noise among the dropped", "labelled noise among the kept"]
        text += (f" Labelled noise ({labels[1]}): {noisy.mean():.3f} of the corpus; a strategy that finds it "
                 "drops a larger share and keeps a smaller one.")
    return text + "\n\n" + md_table(head, rows), stats
