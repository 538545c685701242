"""The report's p-values are sacrebleu's own paired tests, on exactly the hypotheses the docs say
(concatenated test sets, seeds pooled); the mean ± std tables carry extra test sets. No training:
hypotheses are written as files where evaluate would put them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import TINY, sentence
from mtprune.config import load_config
from mtprune.layout import RunLayout
from mtprune.results import result_columns
from mtprune.stages import report
from mtprune.stages.evaluate import hyp_path

PAIRS = ("de-en", "en-fr")
N = 60
# (corpus, seed) -> share of reference words replaced: el2n-high is a little worse than random, full better
NOISE = {"full": 0.10, "el2n-high-0.2": 0.30, "random-0.2": 0.25}


def refs_of(pair: str) -> list[str]:
    lang = pair.replace("en", "").strip("-")
    return [sentence(1000 + i, lang) for i in range(N)]


def corrupt(lines: list[str], share: float, seed: str) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(w if rng.random() > share else "xyz" for w in ln.split()) for ln in lines]


@pytest.fixture
def swept(tmp_path: Path) -> tuple[object, RunLayout]:
    """Test sets and hypotheses of a two-seed sweep (full, el2n-high and random at 0.2) on two pairs."""
    cfg = load_config(TINY, ["train.seeds=[1,2]", f"download.pairs=[{','.join(PAIRS)}]"], str(tmp_path / "run"))
    L = RunLayout(cfg.run_dir)
    for pair in PAIRS:
        L.pair_dir(pair).mkdir(parents=True)
        other = pair.replace("en", "").strip("-")
        L.split_file(pair, "test", other).write_text("\n".join(refs_of(pair)) + "\n")
        L.split_file(pair, "test", "en").write_text("\n".join(sentence(1000 + i, "en") for i in range(N)) + "\n")
    for m in report.seed_models(cfg, L):
        for pair in PAIRS:
            f = hyp_path(L, m.run, pair)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(corrupt(refs_of(pair), NOISE[m.name], f"{m.run}-{pair}")) + "\n")
    return cfg, L


def pooled(L: RunLayout, name: str) -> list[str]:
    """Seed 1's hypotheses on de-en then en-fr, then seed 2's: what the docs say is tested."""
    out = []
    for run in (name, f"{name}-seed2"):
        for pair in PAIRS:
            out += hyp_path(L, run, pair).read_text().splitlines()
    return out


@pytest.mark.parametrize("test_type", ["bs", "ar"])
def test_p_values_are_sacrebleus_paired_test_on_the_pooled_hypotheses(swept, test_type: str) -> None:
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    cfg, L = swept
    cfg = cfg.model_copy(update={"report": cfg.report.replace(paired_test=test_type, paired_samples=300)})
    md, stats = report.significance(cfg, L)
    refs = [r for _ in (1, 2) for pair in PAIRS for r in refs_of(pair)]
    direct = PairedTest([("random-0.2", pooled(L, "random-0.2")), ("el2n-high-0.2", pooled(L, "el2n-high-0.2"))],
                        {"BLEU": BLEU()}, [refs], test_type=test_type, n_samples=300)()[1]["BLEU"][1]
    assert stats["p_vs_random"]["el2n-high-0.2"] == direct.p_value
    direct_full = PairedTest([("full", pooled(L, "full")), ("random-0.2", pooled(L, "random-0.2"))],
                             {"BLEU": BLEU()}, [refs], test_type=test_type, n_samples=300)()[1]["BLEU"][1]
    assert stats["p_vs_full"]["random-0.2"] == direct_full.p_value
    assert f"| random | 0.20 | {direct_full.score:.2f} | – | – |" in md
    assert f"| {direct_full.p_value:.4f} |" in md and f"{test_type}:300" in stats["signature"]
    assert "seeds 1, 2 concatenated" in md and "de-en, en-fr: 120 sentences" in md


def test_a_better_system_gets_a_small_p_value_and_none_turns_the_tests_off(swept) -> None:
    cfg, L = swept
    _, stats = report.significance(cfg, L)
    assert stats["p_vs_full"]["el2n-high-0.2"] < 0.01  # 10% against 30% of the words replaced
    assert report.significance(cfg.model_copy(update={"report": cfg.report.replace(paired_test="none")}), L) == ("", {})


def test_tables_show_mean_and_std_over_seeds_with_extra_test_sets_as_columns() -> None:
    rows = [{"strategy": st, "sparsity": sp, "seed": seed, "pair": pair, "bleu": b, "chrf": 2 * b, "n_train": n}
            for st, sp, n, base in (("full", 0.0, 100, 10.0), ("random", 0.2, 80, 8.0))
            for seed, delta in ((1, 0.0), (2, 1.0))
            for pair, b in (("de-en", base + delta), ("flores:en-de", base - 5 + delta), ("all", base + delta))]
    assert result_columns(rows) == ["de-en", "flores:en-de", "all"]
    table = report._summary_table(rows, "bleu")
    assert "| strategy | sparsity | n_train | de-en | flores:en-de | all |" in table
    assert "| random | 0.20 | 80 | 8.50 ± 0.71 | 3.50 ± 0.71 | 8.50 ± 0.71 |" in table
    one_seed = [r for r in rows if r["seed"] == 1]
    assert "| full | 0.00 | 100 | 10.00 | 5.00 | 10.00 |" in report._summary_table(one_seed, "bleu")


def test_what_changes_hypotheses_changes_the_decode_key() -> None:
    """Beam, length penalty, checkpoint, SentencePiece model, sources, target language: each forces a decode;
    evaluate.max_tokens (batching only) does not."""
    from mtprune.config import load_config
    from mtprune.stages.evaluate import decode_key

    ts = {"src": ["a b", "c"], "tgt_lang": "de"}
    base = decode_key(load_config(None), "ck", "spm", ts)
    assert decode_key(load_config(None, ["evaluate.max_tokens=100"]), "ck", "spm", ts) == base
    changed = [decode_key(load_config(None, ["evaluate.beam=1"]), "ck", "spm", ts),
               decode_key(load_config(None, ["evaluate.lenpen=0.5"]), "ck", "spm", ts),
               decode_key(load_config(None), "ck2", "spm", ts), decode_key(load_config(None), "ck", "spm2", ts),
               decode_key(load_config(None), "ck", "spm", {**ts, "src": ["a b", "d"]}),
               decode_key(load_config(None), "ck", "spm", {**ts, "tgt_lang": "fr"})]
    assert all(k != base for k in changed)


ZH = ["我们明天去北京看朋友。", "他每天早上喝一杯咖啡。", "这本书非常有意思。", "今天的天气很好，我们去公园吧。",
      "她在大学学习中文和历史。", "请把门关上。", "我不知道他为什么没有来。", "火车站离这里不远。"]


def _damaged(lines: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(c if rng.random() > 0.3 else "的" for c in ln) for ln in lines]


def _bleu_summed_per_line(hyps: list[str], refs: list[str], langs: list[str]) -> float:
    """Corpus BLEU from each line's n-gram statistics under its own language's tokenizer."""
    from sacrebleu.metrics import BLEU

    correct, total, sys_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for h, r, lang in zip(hyps, refs, langs, strict=True):
        s = BLEU(trg_lang=lang).corpus_score([h], [[r]])
        correct = [a + b for a, b in zip(correct, s.counts, strict=True)]
        total = [a + b for a, b in zip(total, s.totals, strict=True)]
        sys_len, ref_len = sys_len + s.sys_len, ref_len + s.ref_len
    return BLEU.compute_bleu(correct, total, sys_len, ref_len, smooth_method="exp").score


def test_paired_tests_tokenize_by_target_language_as_the_bleu_table_does() -> None:
    from sacrebleu.metrics import BLEU

    from mtprune.significance import paired_test

    refs = ZH * 3
    base, other = _damaged(refs, 1), _damaged(refs, 2)
    found, sig = paired_test(("a", base), [("b", other)], refs, "bs", 100, ["zh"] * len(refs))
    assert found[0].baseline_bleu == pytest.approx(BLEU(trg_lang="zh").corpus_score(base, [refs]).score)
    assert found[0].bleu == pytest.approx(BLEU(trg_lang="zh").corpus_score(other, [refs]).score)
    assert "tok:zh" in sig and found[0].bleu > 1.0  # 13a would see one "word" per sentence: BLEU ≈ 0
    assert BLEU().corpus_score(other, [refs]).score < 1.0
    # a German and a Chinese test set pooled: each line keeps its own tokenizer's n-grams
    de = [sentence(2000 + i, "de") for i in range(len(refs))]
    mixed_refs, langs = de + refs, ["de"] * len(de) + ["zh"] * len(refs)
    mixed_base, mixed_other = corrupt(de, 0.2, "x") + base, corrupt(de, 0.3, "y") + other
    found, _ = paired_test(("a", mixed_base), [("b", mixed_other)], mixed_refs, "bs", 100, langs)
    assert found[0].baseline_bleu == pytest.approx(_bleu_summed_per_line(mixed_base, mixed_refs, langs))
    assert found[0].bleu == pytest.approx(_bleu_summed_per_line(mixed_other, mixed_refs, langs))


@pytest.mark.parametrize("test_type", ["bs", "ar"])
def test_a_system_identical_to_its_baseline_gets_p_1_and_is_marked_identical(swept, test_type: str) -> None:
    """sacrebleu counts only resamples strictly beyond the observed difference, so a copy of the baseline got the
    floor p (0.0010 with 1,000 resamples): "significantly different" from itself."""
    cfg, L = swept
    cfg = cfg.model_copy(update={"report": cfg.report.replace(paired_test=test_type, paired_samples=300)})
    for run in ("el2n-high-0.2", "el2n-high-0.2-seed2"):  # el2n-high decoded exactly what random did
        for pair in PAIRS:
            src = hyp_path(L, run.replace("el2n-high", "random"), pair)
            hyp_path(L, run, pair).write_bytes(src.read_bytes())
    md, stats = report.significance(cfg, L)
    assert stats["p_vs_random"]["el2n-high-0.2"] == 1.0
    assert "| el2n-high | 0.20 |" in md and "| +0.00 | 1 (identical) |" in md, md
    assert stats["p_vs_full"]["el2n-high-0.2"] < 0.01  # still a real difference from full


@pytest.mark.parametrize("test_type", ["bs", "ar"])
def test_a_one_sentence_difference_that_leaves_bleu_unchanged_is_not_given_the_floor_p(test_type: str) -> None:
    from mtprune.significance import paired_test

    refs = refs_of("de-en") * 2
    base = corrupt(refs, 0.3, "base")
    k = next(i for i, ln in enumerate(base) if "xyz" in ln.split())
    other = list(base)
    other[k] = base[k].replace("xyz", "qqq", 1)  # another word no reference has: the same n-gram counts
    found, _ = paired_test(("base", base), [("other", other)], refs, test_type, 300)
    assert found[0].bleu == found[0].baseline_bleu and other != base
    assert found[0].p_value == 1.0 and not found[0].identical  # every resample ties: as extreme as observed
