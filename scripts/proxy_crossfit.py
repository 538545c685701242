"""Would a proxy that never saw a pair, trained on trusted pairs, find natural noise? A measurement, not a stage.

On a finished run (download, prepare, proxy, score with the ``base_*`` columns), the training pairs are split into
two folds (a seeded permutation). For each fold, a proxy with the run's model and proxy schedule is trained on the
other fold, less its ``--drop`` share of the pairs ``base_all`` ranks worst (the trusted pairs), and scores the
fold: every pair is scored by a model that did not train on it. Each pair is scored twice, with its source and with
an empty one (the language tag and end of sentence): ``nll / nll_empty`` says how little the source helps predict
the target. Prints AUROC against a labels file (``<0-based line> TAB <label>``, ``OK`` clean) of the new columns,
of the run's own ``nll`` and ``el2n`` scored the same way by its in-sample proxy, and of ``base_all`` and
``base_fitted``, each alone and Fisher-combined with ``base_fitted``.

    .venv/bin/python scripts/proxy_crossfit.py runs/real-cpu-wmt -c configs/real-cpu-wmt.yaml \\
        --labels ../shared/data/wmt-ende-10k/labels.tsv --drop 0.25 --workdir /tmp/crossfit25

Two proxies of the run's schedule (1,000 updates each) and four scoring passes: about 15 min on 2 CPU cores for
10,000 pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class EmptySource:
    """A source dataset whose every sentence is its first token (the language tag) and end of sentence."""

    def __init__(self, ds):
        self.ds, self.sizes = ds, np.full(len(ds), 2)

    def __getitem__(self, i):
        import torch

        x = self.ds[i]
        return torch.stack([x[0], x[-1]])

    def __len__(self):
        return len(self.ds)


def score(models, src, tgt, d, idx):
    from mtprune.scoring.forward import score_dataset

    out = {}
    for name, sds in (("real", src), ("empty", EmptySource(src))):
        r = score_dataset(models, sds, tgt, d, idx, 6000, "auto", "cpu", None, desc=name)
        out[f"nll_{name}"], out[f"el2n_{name}"] = r["nll"].mean(1), r["el2n"].mean(1)
    return out


def main() -> None:
    import pandas as pd
    import pyarrow.parquet as pq
    import torch
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    from mtprune.config import load_config
    from mtprune.fairseq_backend import interval_checkpoint, load_model, load_train_pairs, train
    from mtprune.layout import RunLayout
    from mtprune.scoring.derived import fisher
    from mtprune.stages.proxy import schedule
    from mtprune.stages.prune import write_subset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--drop", type=float, default=0.25, help="share of pairs base_all ranks worst left out of training")
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config, [])
    layout = RunLayout(args.run)
    src, tgt, d = load_train_pairs(layout.data_bin)
    n = len(src)
    table = pq.read_table(layout.scores).to_pandas().drop_duplicates("sentence_id")
    base = np.zeros(n)
    base[table["index"].to_numpy()] = table["base_all"].to_numpy()
    fold = np.random.default_rng(7).permutation(n) % 2
    trusted = rankdata(base) / n <= 1 - args.drop
    updates = list(cfg.proxy.checkpoints)
    cross: dict[str, np.ndarray] = {}
    for f in (0, 1):
        keep = np.flatnonzero((fold != f) & trusted)
        data = args.workdir / f"bin{f}"
        if not data.exists():
            write_subset(layout.data_bin, data, keep)
        save = args.workdir / f"proxy{f}"
        if not (save / "done").exists():
            train(data, save, cfg.model, schedule(cfg, seed=f + 1), 2, False, prefix=f"[fold {f}] ")
            (save / "done").write_text("ok")
        models = [load_model(interval_checkpoint(save, u), layout.data_bin, "cpu")[0] for u in updates]
        idx = np.flatnonzero(fold == f)
        for k, v in score(models, src, tgt, d, idx).items():
            cross.setdefault(k, np.zeros(n))[idx] = v
    own_models = [load_model(c, layout.data_bin, "cpu")[0]
                  for c in sorted((layout.stage_dir("proxy")).glob("seed*/checkpoint_u*.pt"))]
    own = score(own_models, src, tgt, d, np.arange(n))

    labels = pd.read_csv(args.labels, sep="\t", header=None, names=["line", "label"])
    at = pd.Series(table["index"].to_numpy(), index=table["sentence_id"])
    pair = table["pair"].iloc[0]
    rows = at.loc[[f"{pair}/{line}" for line in labels["line"]]].to_numpy()
    y = (labels["label"] != "OK").to_numpy()
    kinds = sorted(set(labels["label"]) - {"OK"})
    fitted = np.zeros(n)
    fitted[table["index"].to_numpy()] = table["base_fitted"].to_numpy()
    columns = {"in-sample nll": own["nll_real"], "in-sample el2n": own["el2n_real"],
               "in-sample nll / nll_empty": own["nll_real"] / own["nll_empty"],
               "cross-fitted nll": cross["nll_real"], "cross-fitted el2n": cross["el2n_real"],
               "cross-fitted nll / nll_empty": cross["nll_real"] / cross["nll_empty"],
               "base_all": base, "base_fitted": fitted}
    print(f"| column (drop {args.drop}) | all | {' | '.join(kinds)} | with base_fitted (Fisher) |")
    print("|---|---|" + "---|" * len(kinds) + "---|")
    for name, v in columns.items():
        both = fisher(np.vstack([rankdata(fitted) / n, rankdata(v) / n]))
        cells = [roc_auc_score(y, v[rows])]
        for k in kinds:
            s = (labels["label"] == "OK").to_numpy() | (labels["label"] == k).to_numpy()
            cells.append(roc_auc_score(y[s], v[rows][s]))
        cells.append(roc_auc_score(y, both[rows]))
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
