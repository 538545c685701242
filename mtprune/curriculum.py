"""Training order (``train.order``): which training pairs fairseq-train sees at which update.

``shuffled`` is fairseq's own batching (length-bucketed batches in a new random order every epoch). The
other orders rank the corpus by a score column (``train.order_by``; higher = harder, ``-name`` for a
column whose hard side is low) and replace fairseq's batch list with one of their own, inside
fairseq-train's own iterator (a task registered from ``mtprune_user_dir`` with ``--user-dir``):

- ``easy-first`` / ``hard-first``: every epoch presents the corpus from the easiest (hardest) pair to the
  hardest (easiest), in batches of consecutive ranks built by fairseq's ``batch_by_size``.
- ``competence`` (Platanios et al. 2019): the batch for update t is drawn at random from the easiest
  ``c(t)`` share of the corpus, ``c(t) = min(1, sqrt(t (1 − c0²) / T + c0²))``; from update T on it is the
  whole corpus. An epoch is as many batches as fairseq's own batching makes of the corpus.
- ``general-to-domain`` (Zhang et al. 2019, gradual fine-tuning): the run's ``T`` updates are split into
  ``domain_phases`` equal stretches; phase 0 draws its batches from the whole corpus, phase k from the share
  ``s_k = final_share ** (k / (phases − 1))`` of the corpus ranked most in-domain (lowest ``order_by``: a
  column such as ``domain_combined`` whose high values are unlike the target domain), down to
  ``domain_final_share`` in the last phase. Batches are drawn at random from the open share as
  ``competence`` draws them; an epoch is as many batches as fairseq's own batching makes of the corpus.
- ``self-paced``: competence's window over the ranking of the model being trained. Every ``rescore_every``
  updates (an "epoch" of this task is that many updates) the model scores the training pairs (EL2N or
  NLL, with mtprune's scoring pass; a random sample of them when asked) and the next updates draw from
  the easiest share of that ranking; before the first rescoring, the order file's ranking. The ranking
  is kept in the save directory until the next one, so a resumed run uses the one its epoch started
  with, and each rescoring's time goes to the log (``self-paced: rescored``).

Each epoch's batches depend only on the order file, the seed and the epoch, so a run resumed from a
checkpoint (fairseq's iterator skips the batches the epoch had already served) sees the batches the
uninterrupted run would have seen.
"""

# no `from __future__ import annotations`: fairseq reads the task config's field types as types, not strings
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import ORDERS
from .fairseq_backend import ORDERED_TASK as TASK


def competence(update: int, c0: float, updates: int) -> float:
    """Platanios et al.'s square-root competence: the share of the corpus (easiest first) open at ``update``."""
    if update >= updates:  # also no schedule at all (updates 0): the whole corpus
        return 1.0
    return min(1.0, math.sqrt(update * (1 - c0 * c0) / updates + c0 * c0))


def domain_phase(update: int, phases: int, updates: int) -> int:
    """The phase (0 .. ``phases`` − 1) of ``update`` in general-to-domain: ``updates`` split into ``phases`` equal
    stretches (phase ``update * phases // updates``); from ``updates`` on, the last phase. No schedule at all
    (updates 0): phase 0, the whole corpus."""
    if updates <= 0:
        return 0
    return min(phases - 1, update * phases // updates)


def domain_share(update: int, phases: int, final_share: float, updates: int) -> float:
    """The share of the corpus (most in-domain first) open at ``update`` in general-to-domain:
    ``final_share ** (k / (phases − 1))`` in phase k, 1 in phase 0, ``final_share`` in the last."""
    return final_share ** (domain_phase(update, phases, updates) / (phases - 1))


def share_size(share: float, n: int) -> int:
    """Pairs in the first ``share`` of ``n`` ranked pairs: rounded up (float noise aside: 0.3 of 10 is 3), at
    least one."""
    return max(1, min(n, math.ceil(round(share * n, 9))))


def difficulty(values: np.ndarray, column: str) -> np.ndarray:
    """Higher = harder, float64: ``values`` of ``column`` as they are, negated for ``-name``. Missing values
    (NaN) count as the hardest."""
    v = np.asarray(values, dtype=np.float64)
    v = -v if column.startswith("-") else v
    return np.where(np.isnan(v), np.inf, v)


def easiest_first(hardness: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
    """``indices`` (default: all) from the easiest to the hardest; ties in index order."""
    idx = np.arange(len(hardness)) if indices is None else np.asarray(indices)
    return idx[np.argsort(hardness[idx], kind="stable")]


def window_batches(ranked: np.ndarray, num_tokens: np.ndarray, n_batches: int, first_batch: int,
                   batches_per_update: int, pool: Callable[[int], int], max_tokens: int | None,
                   max_sentences: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """``n_batches`` batches drawn in turn; batch b (``first_batch + b`` counted over the whole run) belongs to
    update ``u = (first_batch + b) // batches_per_update`` and holds distinct pairs drawn uniformly from the first
    ``pool(u)`` of ``ranked`` (indices easiest first), as many as fit fairseq's rule (pairs × longest
    ≤ max_tokens, at most max_sentences)."""
    n = len(ranked)
    cap_sent = max_sentences or n
    smallest = max(int(num_tokens[ranked].min()), 1) if n else 1
    draws = min(cap_sent, (max_tokens // smallest) if max_tokens else cap_sent) + 1
    out = []
    for b in range(n_batches):
        size = pool((first_batch + b) // batches_per_update)
        pick = rng.integers(0, size, size=min(draws, 4 * size))
        _, first = np.unique(pick, return_index=True)
        cand = ranked[pick[np.sort(first)]]  # distinct, in drawing order
        count = np.arange(1, len(cand) + 1)
        fits = count <= cap_sent
        if max_tokens:
            fits &= count * np.maximum.accumulate(num_tokens[cand]) <= max_tokens
        k = max(1, int(np.argmin(fits)) if not fits.all() else len(cand))
        out.append(cand[:k].astype(np.int64))
    return out


def competence_batches(ranked: np.ndarray, num_tokens: np.ndarray, n_batches: int, first_batch: int,
                       batches_per_update: int, c0: float, updates: int, max_tokens: int | None,
                       max_sentences: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """``window_batches`` from the easiest ``competence`` share of ``ranked`` at each update."""
    n = len(ranked)
    return window_batches(ranked, num_tokens, n_batches, first_batch, batches_per_update,
                          lambda u: max(1, min(n, math.ceil(competence(u, c0, updates) * n))),
                          max_tokens, max_sentences, rng)


def domain_batches(ranked: np.ndarray, num_tokens: np.ndarray, n_batches: int, first_batch: int,
                   batches_per_update: int, phases: int, final_share: float, updates: int,
                   max_tokens: int | None, max_sentences: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """``window_batches`` from the most in-domain ``domain_share`` of ``ranked`` (indices, lowest ``order_by``
    first) at each update: general-to-domain's batches."""
    n = len(ranked)
    return window_batches(ranked, num_tokens, n_batches, first_batch, batches_per_update,
                          lambda u: share_size(domain_share(u, phases, final_share, updates), n),
                          max_tokens, max_sentences, rng)


def rescore(model: Any, dataset: Any, dictionary: Any, indices: np.ndarray, metric: str,
            batch_tokens: int = 6000, chunk_tokens: int | str = "auto") -> np.ndarray:
    """``metric`` (``el2n`` or ``nll``) of the model as it is now for each of ``indices`` of a fairseq
    LanguagePairDataset, with mtprune's scoring pass in eval mode (the model's mode is restored)."""
    from .scoring.forward import score_dataset

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device.type
        res = score_dataset([model], dataset.src, dataset.tgt, dictionary, np.asarray(indices, dtype=np.int64),
                            batch_tokens, chunk_tokens, device, None, desc="self-paced")
    finally:
        model.train(was_training)
    return res[metric][:, 0]


def register() -> None:
    """Register the ``mtprune_ordered`` fairseq task (a translation task with train.order); idempotent."""
    from dataclasses import dataclass, field

    from fairseq.data import iterators
    from fairseq.tasks import TASK_REGISTRY, register_task
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    if TASK in TASK_REGISTRY:
        return

    @dataclass
    class OrderedTranslationConfig(TranslationConfig):
        train_order: str = field(default="shuffled", metadata={"help": "one of " + ", ".join(ORDERS)})
        order_file: str = field(default="", metadata={"help": ".npy: one hardness per training pair, higher = harder"})
        competence_c0: float = field(default=0.01, metadata={"help": "competence at update 0"})
        competence_updates: int = field(default=0, metadata={"help": "update at which competence reaches 1"})
        domain_phases: int = field(default=4, metadata={"help": "general-to-domain: equal stretches of the updates"})
        domain_final_share: float = field(default=0.3, metadata={
            "help": "general-to-domain: share of the corpus (most in-domain) open in the last phase"})
        domain_updates: int = field(default=0, metadata={"help": "general-to-domain: the updates the phases split"})
        batches_per_update: int = field(default=1, metadata={"help": "update_freq x GPUs"})
        record_batches: str = field(default="", metadata={"help": "append 'update<TAB>ids' per training batch"})
        rescore_every: int = field(default=0, metadata={"help": "self-paced: updates between rescorings"})
        rescore_by: str = field(default="el2n", metadata={"help": "self-paced: el2n or nll of the model"})
        rescore_sample: int = field(default=0, metadata={"help": "self-paced: pairs scored each time (0: all)"})
        order_state_dir: str = field(default="", metadata={"help": "self-paced: where the current ranking is kept"})

    @register_task(TASK, dataclass=OrderedTranslationConfig)
    class OrderedTranslationTask(TranslationTask):
        def build_model(self, cfg: Any, from_checkpoint: bool = False) -> Any:
            model = super().build_model(cfg, from_checkpoint)
            self._trained_model = model  # self-paced scores the training pairs with it (same parameters)
            return model

        def _self_paced_ranking(self, dataset: Any, valid: np.ndarray, epoch: int, seed: int) -> np.ndarray:
            """``valid`` (or the epoch's sample of it) from the easiest to the hardest for the model as it was
            when ``epoch`` began; epoch 1: by the order file."""
            import logging
            import os
            import time

            log = logging.getLogger("mtprune.curriculum")
            state = Path(self.cfg.order_state_dir or ".")
            path = state / f"self-paced-epoch{epoch}.npy"
            pool = valid
            if self.cfg.rescore_sample and self.cfg.rescore_sample < len(valid):
                pool = np.sort(np.random.default_rng([seed, epoch, 1]).choice(valid, self.cfg.rescore_sample,
                                                                              replace=False))
            if epoch == 1:
                return easiest_first(self._hardness(dataset), pool)
            if path.is_file():  # a resumed run: the ranking its epoch started with
                hard = np.load(path)
            else:
                t0 = time.time()
                hard = np.full(len(dataset), np.inf)
                hard[pool] = rescore(self._trained_model, dataset, self.tgt_dict, pool, self.cfg.rescore_by)
                state.mkdir(parents=True, exist_ok=True)
                tmp = state / f".{path.name}.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, hard)
                os.replace(tmp, path)
                for old in state.glob("self-paced-epoch*.npy"):
                    if old != path:
                        old.unlink()
                log.info("self-paced: rescored %d pairs by %s at update %d in %.1fs", len(pool),
                         self.cfg.rescore_by, (epoch - 1) * self.cfg.rescore_every, time.time() - t0)
            return easiest_first(hard, pool)

        def _hardness(self, dataset: Any) -> np.ndarray:
            h = np.load(self.cfg.order_file, mmap_mode="r")
            if len(h) != len(dataset):
                raise ValueError(f"{self.cfg.order_file}: {len(h)} values for {len(dataset)} training pairs")
            return np.asarray(h, dtype=np.float64)

        def get_batch_iterator(self, dataset: Any, max_tokens: int | None = None, max_sentences: int | None = None,
                               max_positions: Any = None, ignore_invalid_inputs: bool = False,
                               required_batch_size_multiple: int = 1, seed: int = 1, num_shards: int = 1,
                               shard_id: int = 0, num_workers: int = 0, epoch: int = 1, data_buffer_size: int = 0,
                               disable_iterator_cache: bool = False, skip_remainder_batch: bool = False,
                               grouped_shuffling: bool = False, update_epoch_batch_itr: bool = False) -> Any:
            kw = dict(max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
                      ignore_invalid_inputs=ignore_invalid_inputs,
                      required_batch_size_multiple=required_batch_size_multiple, seed=seed, num_shards=num_shards,
                      shard_id=shard_id, num_workers=num_workers, epoch=epoch, data_buffer_size=data_buffer_size,
                      disable_iterator_cache=disable_iterator_cache, skip_remainder_batch=skip_remainder_batch,
                      grouped_shuffling=grouped_shuffling, update_epoch_batch_itr=update_epoch_batch_itr)
            if self.cfg.train_order == "shuffled" or dataset is not self.datasets.get("train"):
                return super().get_batch_iterator(dataset, **kw)
            if self.cfg.train_order not in ORDERS:
                raise ValueError(f"--train-order {self.cfg.train_order!r}: one of {', '.join(ORDERS)}")
            dataset.set_epoch(epoch)
            valid = np.arange(len(dataset))
            if max_positions is not None:
                valid = self.filter_indices_by_size(valid, dataset, max_positions, ignore_invalid_inputs)
            ranked = easiest_first(self._hardness(dataset), valid)
            if self.cfg.train_order == "hard-first":
                ranked = ranked[::-1].copy()

            def by_rank(order: np.ndarray) -> list[np.ndarray]:
                return dataset.batch_by_size(order, max_tokens=max_tokens, max_sentences=max_sentences,
                                             required_batch_size_multiple=required_batch_size_multiple)

            cfg = self.cfg
            tokens = dataset.num_tokens_vec(np.arange(len(dataset)))
            if self.cfg.train_order in ("easy-first", "hard-first"):
                sampler: Any = by_rank(ranked)
            elif self.cfg.train_order == "self-paced":
                if cfg.rescore_every < 1:
                    raise ValueError("--train-order self-paced needs --rescore-every >= 1")
                per_epoch = cfg.rescore_every * cfg.batches_per_update

                def sampler(ds: Any, ep: int) -> list[np.ndarray]:
                    order = self._self_paced_ranking(ds, valid, ep, seed)
                    return competence_batches(order, tokens, per_epoch, (ep - 1) * per_epoch,
                                              cfg.batches_per_update, cfg.competence_c0, cfg.competence_updates,
                                              max_tokens, max_sentences, np.random.default_rng([seed, ep]))
            elif self.cfg.train_order == "general-to-domain":
                if cfg.domain_phases < 2 or not 0 < cfg.domain_final_share <= 1:
                    raise ValueError("--train-order general-to-domain needs --domain-phases >= 2 and "
                                     "--domain-final-share in (0, 1]")
                n_batches = len(by_rank(valid[np.argsort(dataset.num_tokens_vec(valid), kind="stable")]))

                def sampler(ds: Any, ep: int) -> list[np.ndarray]:
                    rng = np.random.default_rng([seed, ep])
                    return domain_batches(ranked, tokens, n_batches, (ep - 1) * n_batches, cfg.batches_per_update,
                                          cfg.domain_phases, cfg.domain_final_share, cfg.domain_updates,
                                          max_tokens, max_sentences, rng)
            else:
                # an epoch: as many batches as fairseq's length-bucketed batching makes of the corpus
                n_batches = len(by_rank(valid[np.argsort(dataset.num_tokens_vec(valid), kind="stable")]))

                def sampler(ds: Any, ep: int) -> list[np.ndarray]:
                    rng = np.random.default_rng([seed, ep])
                    return competence_batches(ranked, tokens, n_batches, (ep - 1) * n_batches,
                                              cfg.batches_per_update, cfg.competence_c0, cfg.competence_updates,
                                              max_tokens, max_sentences, rng)

            return iterators.EpochBatchIterator(
                dataset=dataset, collate_fn=dataset.collater, batch_sampler=sampler, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                buffer_size=data_buffer_size, disable_shuffling=True, skip_remainder_batch=skip_remainder_batch,
                grouped_shuffling=False, reuse_dataloader=False)

        def train_step(self, sample: Any, model: Any, criterion: Any, optimizer: Any, update_num: int,
                       ignore_grad: bool = False) -> Any:
            if self.cfg.record_batches and not ignore_grad and sample:
                import torch.distributed as dist

                rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
                path = self.cfg.record_batches + (f".rank{rank}" if rank else "")
                with open(path, "a", encoding="utf-8") as f:
                    f.write(f"{update_num}\t{' '.join(map(str, sample['id'].tolist()))}\n")
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
