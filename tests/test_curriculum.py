"""train.order: the batches fairseq-train itself draws (recorded by the mtprune_ordered task's train_step),
competence's window, resumption and the unit key."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from mtprune.config import load_config
from mtprune.curriculum import (
    competence,
    competence_batches,
    difficulty,
    domain_batches,
    domain_phase,
    domain_share,
    easiest_first,
    share_size,
)
from mtprune.fairseq_backend import Schedule, load_train_pairs, parse_train_argv, train, train_argv
from mtprune.layout import RunLayout


def test_competence_follows_the_square_root_schedule() -> None:
    assert competence(0, 0.01, 100) == pytest.approx(0.01)
    assert competence(100, 0.01, 100) == 1.0 == competence(500, 0.01, 100)
    assert competence(25, 0.1, 100) == pytest.approx(math.sqrt(25 * 0.99 / 100 + 0.01))
    assert competence(7, 0.3, 0) == 1.0  # no schedule: the whole corpus from the start


def test_difficulty_negates_a_minus_column_and_ranks_missing_values_hardest() -> None:
    h = difficulty(np.array([0.2, np.nan, -1.0]), "-tracin")
    assert list(easiest_first(h)) == [0, 2, 1]
    assert list(easiest_first(difficulty(np.array([3.0, 1.0, 1.0]), "el2n"))) == [1, 2, 0]


def test_competence_batches_stay_in_the_open_window_and_fit_fairseqs_token_rule() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    ranked = rng.permutation(n)
    tokens = rng.integers(3, 30, size=n)
    batches = competence_batches(ranked, tokens, n_batches=60, first_batch=0, batches_per_update=2, c0=0.05,
                                 updates=20, max_tokens=200, max_sentences=None, rng=np.random.default_rng(1))
    rank = np.empty(n, dtype=np.int64)
    rank[ranked] = np.arange(n)
    widest = []
    for b, batch in enumerate(batches):
        c = competence(b // 2, 0.05, 20)
        assert rank[batch].max() < math.ceil(c * n), b
        assert len(set(batch.tolist())) == len(batch)
        assert len(batch) * tokens[batch].max() <= 200
        widest.append(rank[batch].max())
    assert widest[0] < 0.05 * n < max(widest[-10:])  # the window opens up to the whole corpus


def test_general_to_domain_splits_the_updates_into_phases_of_shrinking_geometric_shares() -> None:
    # 12 updates in 4 phases: 0-2 the whole corpus, 3-5, 6-8, then 9-11 on the final share
    assert [domain_phase(u, 4, 12) for u in range(14)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 5
    assert [domain_phase(u, 4, 10) for u in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # 2.5 updates each
    shares = [domain_share(u, 4, 0.3, 12) for u in (0, 2, 3, 6, 9, 11, 40)]
    assert shares[:2] == [1.0, 1.0] and shares[-3:] == [0.3, 0.3, 0.3]
    assert shares[2] == pytest.approx(0.3 ** (1 / 3)) and shares[3] == pytest.approx(0.3 ** (2 / 3))
    assert [domain_share(u, 2, 0.5, 10) for u in (0, 4, 5, 9)] == [1.0, 1.0, 0.5, 0.5]  # two phases: all, then half
    assert domain_share(7, 4, 0.3, 0) == 1.0  # no schedule: the whole corpus
    assert (share_size(0.3, 10), share_size(0.3, 300), share_size(0.001, 10), share_size(1.0, 7)) == (3, 90, 1, 7)


def test_general_to_domain_batches_come_from_the_phases_most_in_domain_share() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    ranked = rng.permutation(n)  # most in-domain (lowest order_by) first
    tokens = rng.integers(3, 30, size=n)

    def draw(first_batch: int, n_batches: int) -> list[np.ndarray]:
        return domain_batches(ranked, tokens, n_batches=n_batches, first_batch=first_batch, batches_per_update=2,
                              phases=4, final_share=0.2, updates=40, max_tokens=200, max_sentences=None,
                              rng=np.random.default_rng([1, first_batch]))

    batches = draw(0, 80)
    rank = np.empty(n, dtype=np.int64)
    rank[ranked] = np.arange(n)
    widest = {k: 0 for k in range(4)}
    for b, batch in enumerate(batches):
        u = b // 2
        k = u * 4 // 40
        assert rank[batch].max() < share_size(0.2 ** (k / 3), n), b
        assert len(set(batch.tolist())) == len(batch) and len(batch) * tokens[batch].max() <= 200
        widest[k] = max(widest[k], rank[batch].max())
    assert widest[0] > 0.9 * n  # phase 0: the whole corpus
    assert share_size(0.2 ** (1 / 3), n) * 0.8 < widest[1] and widest[3] < 0.2 * n <= widest[2]
    # seeded: the same rng gives the same batches, and so does a second call for a later stretch of the run
    assert all((a == b).all() for a, b in zip(batches, draw(0, 80), strict=True))
    assert all((a == b).all() for a, b in zip(draw(50, 10), draw(50, 10), strict=True))


def _train(data_bin: Path, save_dir: Path, order: str, hardness: np.ndarray | None, max_update: int,
           c0: float = 0.01, t: int = 0, rescore_every: int = 0, save_every: int = 3,
           rescore_sample: int = 0, phases: int = 4, final_share: float = 0.3,
           domain_updates: int = 0) -> list[tuple[int, list[int]]]:
    cfg = load_config(TINY, [])
    order_file = None
    if hardness is not None:
        order_file = str(save_dir.parent / f"{save_dir.name}.order.npy")
        np.save(order_file, hardness)
    record = save_dir.parent / f"{save_dir.name}.batches.tsv"
    s = Schedule(max_update=max_update, lr=0.002, warmup_updates=2, max_tokens=256, update_freq=1,
                 label_smoothing=0.1, precision="fp32", seed=1, save_interval_updates=save_every, order=order,
                 order_file=order_file, competence_c0=c0, competence_updates=t, record_batches=str(record),
                 rescore_every=rescore_every, rescore_sample=rescore_sample, domain_phases=phases,
                 domain_final_share=final_share, domain_updates=domain_updates)
    train(data_bin, save_dir, cfg.model, s, threads=1, use_cuda=False, prefix="")
    out = []
    for line in record.read_text().splitlines():
        u, ids = line.split("\t")
        out.append((int(u), [int(i) for i in ids.split()]))
    return out


def test_easy_first_trains_on_the_lowest_scored_pairs_first_and_hard_first_on_the_highest(
        tiny_run: Path, tmp_path: Path) -> None:
    L = RunLayout(tiny_run)
    _, tgt, _ = load_train_pairs(L.data_bin)
    n = len(tgt)
    hardness = np.random.default_rng(3).permutation(n).astype(np.float64)  # rank r has hardness r
    for order, first_ranks in (("easy-first", range(0, 60)), ("hard-first", range(n - 60, n))):
        seen = _train(L.data_bin, tmp_path / order, order, hardness, max_update=3)
        assert [u for u, _ in seen] == [0, 1, 2]
        first = seen[0][1]
        assert set(hardness[first].astype(int)) <= set(first_ranks), order  # fairseq's actual first batch
        # consecutive batches go on along the ranking
        means = [hardness[ids].mean() for _, ids in seen]
        assert means == (sorted(means) if order == "easy-first" else sorted(means, reverse=True)), order


def test_competence_opens_the_window_as_the_schedule_says_on_fairseqs_batches(tiny_run: Path,
                                                                              tmp_path: Path) -> None:
    L = RunLayout(tiny_run)
    _, tgt, _ = load_train_pairs(L.data_bin)
    n = len(tgt)
    hardness = np.random.default_rng(4).permutation(n).astype(np.float64)
    seen = _train(L.data_bin, tmp_path / "c", "competence", hardness, max_update=12, c0=0.1, t=10)
    assert [u for u, _ in seen] == list(range(12))
    for u, ids in seen:
        assert hardness[ids].max() < math.ceil(competence(u, 0.1, 10) * n), u
    assert hardness[seen[0][1]].max() < 0.1 * n < max(hardness[ids].max() for _, ids in seen[-3:])


def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(tiny_run: Path, tmp_path: Path) -> None:
    L = RunLayout(tiny_run)
    _, tgt, _ = load_train_pairs(L.data_bin)
    hardness = np.random.default_rng(5).permutation(len(tgt)).astype(np.float64)
    for order in ("competence", "easy-first"):
        straight = dict(_train(L.data_bin, tmp_path / f"{order}-a", order, hardness, max_update=12, c0=0.2, t=8))
        _train(L.data_bin, tmp_path / f"{order}-b", order, hardness, max_update=6, c0=0.2, t=8)  # stops at 6
        resumed = dict(_train(L.data_bin, tmp_path / f"{order}-b", order, hardness, max_update=12, c0=0.2, t=8))
        assert sorted(resumed) == list(range(12))
        assert resumed == straight, order


def test_general_to_domain_narrows_fairseqs_batches_phase_by_phase_and_resumes_alike(tiny_run: Path,
                                                                                     tmp_path: Path) -> None:
    L = RunLayout(tiny_run)
    _, tgt, _ = load_train_pairs(L.data_bin)
    n = len(tgt)
    hardness = np.random.default_rng(8).permutation(n).astype(np.float64)  # rank r: r-th most in-domain
    straight = dict(_train(L.data_bin, tmp_path / "a", "general-to-domain", hardness, max_update=12,
                           phases=4, final_share=0.25))
    assert sorted(straight) == list(range(12))
    for u, ids in straight.items():  # 3 updates a phase: shares 1, 0.63, 0.40, 0.25
        assert hardness[ids].max() < share_size(0.25 ** ((u // 3) / 3), n), u
    assert max(hardness[straight[u]].max() for u in range(3)) >= 0.63 * n  # phase 0 draws from the whole corpus
    # a 12-update run stopped at update 5, mid-phase, and resumed: the batches of the uninterrupted run
    _train(L.data_bin, tmp_path / "b", "general-to-domain", hardness, max_update=5, phases=4, final_share=0.25,
           domain_updates=12)
    resumed = dict(_train(L.data_bin, tmp_path / "b", "general-to-domain", hardness, max_update=12, phases=4,
                          final_share=0.25))
    assert resumed == straight


def test_fairseqs_own_parser_reads_the_ordered_task_and_its_settings(tmp_path: Path) -> None:
    cfg = load_config(TINY, [])
    s = Schedule(max_update=40, lr=0.002, warmup_updates=2, max_tokens=256, update_freq=2, label_smoothing=0.1,
                 precision="fp32", seed=1, save_interval_updates=10, order="competence",
                 order_file=str(tmp_path / "o.npy"), competence_c0=0.05, competence_updates=30)
    args = parse_train_argv(train_argv(tmp_path, tmp_path / "ckpt", cfg.model, s, use_cuda=False))
    assert args.task == "mtprune_ordered"
    assert (args.train_order, args.order_file, args.competence_c0, args.competence_updates,
            args.batches_per_update) == ("competence", str(tmp_path / "o.npy"), 0.05, 30, 2)
    plain = parse_train_argv(train_argv(tmp_path, tmp_path / "ckpt", cfg.model,
                                        Schedule(**{**s.__dict__, "order": "shuffled", "order_file": None}),
                                        use_cuda=False))
    assert plain.task == "translation"  # shuffled is fairseq's own task, as before train.order existed
    g2d = parse_train_argv(train_argv(tmp_path, tmp_path / "ckpt", cfg.model,
                                      Schedule(**{**s.__dict__, "order": "general-to-domain", "domain_phases": 5,
                                                  "domain_final_share": 0.25}), use_cuda=False))
    assert (g2d.task, g2d.train_order, g2d.order_file, g2d.domain_phases, g2d.domain_final_share, g2d.domain_updates,
            g2d.batches_per_update) == ("mtprune_ordered", "general-to-domain", str(tmp_path / "o.npy"), 5, 0.25, 40, 2)
    def domain_updates(sched: Schedule) -> int:
        return parse_train_argv(train_argv(tmp_path, tmp_path / "ckpt", cfg.model, sched, use_cuda=False)).domain_updates

    assert domain_updates(s) == 0  # competence: no phases
    # a run asked to stop early keeps the phases of the whole run when told its length
    assert domain_updates(Schedule(**{**s.__dict__, "order": "general-to-domain", "max_update": 10,
                                      "domain_updates": 40})) == 40


def test_order_corpora_plans_the_other_orders_for_those_corpora_only(tmp_path: Path) -> None:
    from mtprune.stages.train import schedule, seed_models, used_order_settings

    sets = ["prune.strategies=[random,el2n-high]", "train.order=[shuffled,competence]", "train.seeds=[1,2]"]
    cfg = load_config(TINY, [*sets, "train.order_corpora=[full]"])
    planned = [(m.run, m.order) for m in seed_models(cfg, RunLayout(tmp_path))]
    assert planned == [("full", "shuffled"), ("full-seed2", "shuffled"), ("full+competence", "competence"),
                       ("full+competence-seed2", "competence"), ("random-0.2", "shuffled"),
                       ("random-0.2-seed2", "shuffled"), ("el2n-high-0.2", "shuffled"),
                       ("el2n-high-0.2-seed2", "shuffled")]
    every = [m.run for m in seed_models(load_config(TINY, sets), RunLayout(tmp_path))]
    assert len(every) == 12 and "random-0.2+competence-seed2" in every
    cfg = load_config(TINY, [*sets, "train.order_corpora=[random-0.2]"])
    assert [m.run for m in seed_models(cfg, RunLayout(tmp_path)) if m.order == "competence"] == [
        "random-0.2+competence", "random-0.2+competence-seed2"]
    # general-to-domain's settings reach fairseq through the schedule, and its key holds them (not competence's)
    cfg = load_config(TINY, ["train.order=general-to-domain", "train.domain_phases=3", "train.domain_final_share=0.5"])
    s = schedule(cfg, order="general-to-domain", order_file=tmp_path / "o.npy")
    assert (s.domain_phases, s.domain_final_share, s.domain_updates, s.max_update) == (3, 0.5, 20, 20)
    settings = {"order_by": "domain_combined", "competence_c0": 0.01, "domain_phases": 3, "domain_final_share": 0.5}
    assert used_order_settings("general-to-domain", settings) == {
        "order": "general-to-domain", "order_by": "domain_combined", "domain_phases": 3, "domain_final_share": 0.5}
    assert "domain_phases" not in used_order_settings("competence", settings)


def test_each_order_is_a_model_of_its_own_with_the_order_in_its_key_and_its_report_rows(tiny_copy: Path) -> None:
    import pandas as pd

    from conftest import cli
    from mtprune.stages.train import units

    sets = ["prune.strategies=[random]", "train.max_update=4"]
    args = [a for s in sets for a in ("--set", s)]
    code, out = cli("prune", "-c", str(TINY), "--run-dir", str(tiny_copy), "-q", *args)
    assert code == 0, out
    L = RunLayout(tiny_copy)

    def keys(*more: str) -> dict[str, dict]:
        cfg = load_config(TINY, [*sets, *more], run_dir=str(tiny_copy))
        return {u.name: u.key for u in units(cfg, L, use_cuda=False)}

    shuffled = keys()
    assert set(shuffled) == {"train full", "train random-0.2"}
    assert all("order_data" not in k and "order" not in k["train"] for k in shuffled.values())  # keys as before
    both = keys("train.order=[shuffled,easy-first]")
    assert set(both) == {"train full", "train random-0.2", "train full+easy-first", "train random-0.2+easy-first"}
    assert {n: both[n] for n in shuffled} == shuffled  # another order leaves the shuffled models' keys alone
    easy = keys("train.order=easy-first")
    assert easy == {n: k for n, k in both.items() if "+" in n}
    assert keys("train.order=easy-first", "train.competence_c0=0.5") == easy  # not a setting of easy-first
    assert all(keys("train.order=easy-first", "train.order_by=nll")[n] != easy[n] for n in easy)
    comp = keys("train.order=competence")
    assert set(comp) == {"train full+competence", "train random-0.2+competence"}
    assert keys("train.order=competence", "train.competence_c0=0.5") != comp
    # the general-to-domain settings and order_corpora leave the other models' keys alone
    assert keys("train.domain_phases=3", "train.domain_final_share=0.5", "train.order_corpora=[full]") == shuffled
    assert keys("train.order=competence", "train.domain_phases=3") == comp
    g2d = keys("train.order=general-to-domain")
    assert set(g2d) == {"train full+general-to-domain", "train random-0.2+general-to-domain"}
    assert g2d["train full+general-to-domain"]["train"]["domain_phases"] == 4
    assert keys("train.order=general-to-domain", "train.domain_final_share=0.5") != g2d
    assert keys("train.order=general-to-domain", "train.competence_c0=0.5") == g2d
    assert set(keys("train.order=[shuffled,general-to-domain]", "train.order_corpora=[full]")) == {
        "train full", "train random-0.2", "train full+general-to-domain"}

    both_args = [*args, "--set", "train.order=[shuffled,easy-first]"]
    for stage in ("train", "evaluate", "report"):  # ordered checkpoints name mtprune_ordered: evaluate loads them
        code, out = cli(stage, "-c", str(TINY), "--run-dir", str(tiny_copy), *both_args)
        assert code == 0, out
    scores = pd.read_parquet(L.scores).sort_values("index")
    el2n = dict(zip(scores["sentence_id"], scores["el2n"], strict=True))
    np.testing.assert_array_equal(np.load(L.train_dir("full+easy-first") / "order.npy"), scores["el2n"].to_numpy())
    kept = [el2n[i] for i in (L.kept_ids("random-0.2")).read_text().split()]
    np.testing.assert_array_equal(np.load(L.train_dir("random-0.2+easy-first") / "order.npy"), kept)
    assert not (L.train_dir("full") / "order.npy").exists()
    results = pd.read_csv(L.report_file("results.csv"))
    got = results[results["pair"] == "all"].set_index("strategy")
    assert got.loc["full+easy-first", "order"] == "easy-first" and got.loc["random", "order"] == "shuffled"
    assert got.loc["random+easy-first", "sparsity"] == 0.2
    assert got.loc["random+easy-first", "n_train"] == got.loc["random", "n_train"]
    # the paired tests put each order against its own corpus trained shuffled
    sig = json.loads(L.manifest("report").read_text())["stats"]["significance"]
    assert set(sig["p_vs_shuffled"]) == {"full+easy-first", "random-0.2+easy-first"}
    assert "p vs shuffled" in L.report_file("results.md").read_text()

    mtimes = {d: (L.train_dir(d) / "checkpoint_last.pt").stat().st_mtime_ns for d in ("full", "full+easy-first")}
    code, out = cli("train", "-c", str(TINY), "--run-dir", str(tiny_copy), *both_args, "--set", "train.order_by=nll")
    assert code == 0 and "train full: already done" in out and "train full+easy-first: already done" not in out, out
    assert (L.train_dir("full") / "checkpoint_last.pt").stat().st_mtime_ns == mtimes["full"]
    assert (L.train_dir("full+easy-first") / "checkpoint_last.pt").stat().st_mtime_ns != mtimes["full+easy-first"]


def test_an_order_by_column_the_score_stage_does_not_write_is_refused_before_training(tiny_copy: Path) -> None:
    from conftest import cli

    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(tiny_copy), "--dry-run",
                    "--set", "train.order=competence", "--set", "train.order_by=-bleu")
    assert code == 2 and "train.order_by: '-bleu' names no score column" in out, out


def test_self_paced_draws_from_the_easiest_pairs_by_the_trained_models_own_el2n(tiny_run: Path,
                                                                               tmp_path: Path) -> None:
    from mtprune.curriculum import rescore
    from mtprune.fairseq_backend import load_model

    L = RunLayout(tiny_run)
    _, tgt, _ = load_train_pairs(L.data_bin)
    n = len(tgt)
    hardness = np.random.default_rng(6).permutation(n).astype(np.float64)  # the proxy's order: update 0-3 only
    run = tmp_path / "sp"
    seen = dict(_train(L.data_bin, run, "self-paced", hardness, max_update=12, c0=0.3, t=8, rescore_every=4,
                       save_every=4))
    assert sorted(seen) == list(range(12))
    for u in range(4):
        assert hardness[seen[u]].max() < math.ceil(competence(u, 0.3, 8) * n), u
    log = (run / "train.log").read_text()
    assert f"self-paced: rescored {n} pairs by el2n at update 4" in log
    assert f"self-paced: rescored {n} pairs by el2n at update 8" in log
    assert sorted(p.name for p in run.glob("self-paced-epoch*.npy")) == ["self-paced-epoch3.npy"]  # the latest
    ranking = np.load(run / "self-paced-epoch3.npy")
    model, task = load_model(next(run.glob("checkpoint_*_8.pt")), L.data_bin, "cpu")  # the model at update 8
    task.load_dataset("train")
    ds = task.dataset("train")
    np.testing.assert_allclose(ranking, rescore(model, ds, task.target_dictionary, np.arange(n), "el2n"), rtol=1e-5)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(ranking, kind="stable")] = np.arange(n)
    for u in range(8, 12):  # drawn from the easiest share by the model's own EL2N at update 8
        assert rank[seen[u]].max() < math.ceil(competence(u, 0.3, 8) * n), u
    # a run stopped at update 6, mid-period, resumes with the ranking its period began with
    _train(L.data_bin, tmp_path / "sp2", "self-paced", hardness, max_update=6, c0=0.3, t=8, rescore_every=4,
           save_every=4)
    resumed = dict(_train(L.data_bin, tmp_path / "sp2", "self-paced", hardness, max_update=12, c0=0.3, t=8,
                          rescore_every=4, save_every=4))
    assert resumed == seen


def test_valid_bleu_is_logged_at_every_validation_and_leaves_the_trained_weights_alone(tiny_run: Path,
                                                                                      tmp_path: Path) -> None:
    import torch

    from mtprune.curves import read_curves

    cfg = load_config(TINY, [])
    L = RunLayout(tiny_run)
    last = {}
    for bleu in (False, True):
        s = Schedule(max_update=6, lr=0.002, warmup_updates=2, max_tokens=256, update_freq=1, label_smoothing=0.1,
                     precision="fp32", seed=1, save_interval_updates=3, valid_bleu=bleu)
        train(L.data_bin, tmp_path / str(bleu), cfg.model, s, threads=1, use_cuda=False, prefix="")
        last[bleu] = torch.load(tmp_path / str(bleu) / "checkpoint_last.pt", map_location="cpu",
                                weights_only=False)["model"]
    assert last[True].keys() == last[False].keys()
    for k in last[True]:
        assert torch.equal(last[True][k], last[False][k]), k
    curves = read_curves(tmp_path / "True" / "train.log")  # fairseq's own log lines, as the report reads them
    assert [u for u, _ in curves["bleu"]] == [3, 6] and all(0 <= b <= 100 for _, b in curves["bleu"])
    assert read_curves(tmp_path / "False" / "train.log")["bleu"] == []


def test_self_paced_on_a_sample_scores_and_draws_from_that_sample_only(tiny_run: Path, tmp_path: Path) -> None:
    L = RunLayout(tiny_run)
    _, tgt, _ = load_train_pairs(L.data_bin)
    hardness = np.random.default_rng(7).permutation(len(tgt)).astype(np.float64)
    run = tmp_path / "sample"
    seen = dict(_train(L.data_bin, run, "self-paced", hardness, max_update=8, c0=1.0, t=1, rescore_every=4,
                       save_every=4, rescore_sample=150))
    assert "self-paced: rescored 150 pairs by el2n at update 4" in (run / "train.log").read_text()
    ranking = np.load(run / "self-paced-epoch2.npy")
    sample = set(np.flatnonzero(np.isfinite(ranking)).tolist())
    assert len(sample) == 150
    assert all(set(seen[u]) <= sample for u in range(4, 8))  # competence 1: the whole sample, nothing else
    assert not all(set(seen[u]) <= sample for u in range(4))
