"""Prepare writes fairseq's binarized data from SentencePiece's ids itself (mtprune/databin.py): the bytes must be
fairseq-preprocess's, and a data-bin assembled from parts binarized as separate jobs must be the one-process one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import cli
from mtprune.fairseq_backend import SRC, TGT, load_train_pairs, preprocess
from mtprune.layout import RunLayout
from mtprune.stages.prepare import tag, tasks
from mtprune.textio import read_lines


def _sets(corpus: Path, run: Path, *more: str, quiet: bool = True) -> list[str]:
    out = ["--run-dir", str(run)] + (["-q"] if quiet else [])
    for s in (f"download.source=local:{corpus}", "download.pairs=[de-en,en-fr]", "download.direction=both",
              "prepare.vocab_size=200", "prepare.max_tokens=13", "prepare.character_coverage=0.98", *more):
        out += ["--set", s]
    return out


def _fairseq_preprocess(L: RunLayout, pairs: list[str], limit: int, folder: Path, dual: bool) -> None:
    """What prepare did before it wrote the bytes itself: pieces as text, tagged and filtered the same way, then
    the real fairseq-preprocess, forward and (``dual``) reversed."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(L.spm_model))
    text: dict[str, dict[str, list[str]]] = {"fwd": {}, "rev": {}}
    for split in ("train", "valid"):
        lines = {k: {"src": [], "tgt": []} for k in text}
        for pair, s, t in tasks(pairs, "both"):
            for a, b in zip(sp.encode(read_lines(L.split_file(pair, split, s)), out_type=str),
                            sp.encode(read_lines(L.split_file(pair, split, t)), out_type=str), strict=True):
                if len(a) + 1 > limit or len(b) > limit:
                    continue
                lines["fwd"]["src"].append(f"{tag(t)} {' '.join(a)}")
                lines["fwd"]["tgt"].append(" ".join(b))
                lines["rev"]["src"].append(f"{tag(s)} {' '.join(b)}")
                lines["rev"]["tgt"].append(" ".join(a))
        for k in text:
            (folder / k).mkdir(parents=True, exist_ok=True)
            for side, name in (("src", SRC), ("tgt", TGT)):
                (folder / k / f"{split}.{name}").write_text("".join(x + "\n" for x in lines[k][side]), encoding="utf-8")
    for k in ("fwd", "rev") if dual else ("fwd",):
        preprocess(folder / k / "train", folder / k / "valid", folder / f"{k}-bin", L.stage_dir("prepare") / "dict.txt",
                   2, folder / f"{k}.log")


def _same_files(ours: Path, theirs: Path) -> list[str]:
    names = sorted(p.name for p in theirs.iterdir() if p.suffix in (".bin", ".idx", ".txt"))
    assert len(names) == 10, names  # train and valid, src and tgt, .bin and .idx; two dictionaries
    assert sorted(p.name for p in ours.iterdir()) == names
    return [n for n in names if (ours / n).read_bytes() != (theirs / n).read_bytes()]


def test_prepare_writes_the_bytes_fairseq_preprocess_writes(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    sets = _sets(local_corpus, run, "proxy.dual=true")
    assert cli("download", *sets)[0] == 0
    code, out = cli("prepare", *sets)
    assert code == 0, out
    L = RunLayout(run)
    stats = json.loads(L.manifest("prepare").read_text())["stats"]
    dropped = sum(t["dropped_too_many_tokens"] for t in stats["tasks"].values())
    assert 0 < dropped < 240 and stats["train_pairs"] == 240 - dropped  # the length limit is exercised
    src, tgt, d = load_train_pairs(L.data_bin)
    assert any(d.unk() in x.tolist() for x in tgt)  # and an unknown piece
    _fairseq_preprocess(L, ["de-en", "en-fr"], 13, tmp_path / "fairseq", dual=True)
    assert _same_files(L.data_bin, tmp_path / "fairseq" / "fwd-bin") == []
    assert _same_files(L.data_bin_reverse, tmp_path / "fairseq" / "rev-bin") == []
    assert len(read_lines(L.prepare_ids)) == len(read_lines(L.prepare_tasks)) == len(src) == stats["train_pairs"]
    # nothing of the parts is left once data-bin holds them; the SentencePiece model they share stays
    assert sorted(p.name for p in L.prepare_shards.iterdir() if not p.name.startswith(".")) == ["spm.json",
                                                                                              "spm.model"]


def test_parts_binarized_as_jobs_assemble_into_the_one_process_data_bin(tmp_path: Path, local_corpus: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run in (whole, parts):
        assert cli("download", *_sets(local_corpus, run))[0] == 0
    assert cli("prepare", *_sets(local_corpus, whole))[0] == 0
    # parts 0 and 2 of 3 as jobs; part 1 of 3 is left to the merge; a part of another setting lies beside them
    for shard in ("0/3", "2/3"):
        code, out = cli("prepare", *_sets(local_corpus, parts), "--shard", shard)
        assert code == 0, out
    code, out = cli("prepare", *_sets(local_corpus, parts, quiet=False), "--shard", "0/3")  # a job run again
    assert code == 0 and "part 0/3: already binarized, skipping" in out, out
    assert cli("prepare", *_sets(local_corpus, parts, "prepare.max_tokens=9"), "--shard", "0/2")[0] == 0
    L = RunLayout(parts)
    assert not L.data_bin.exists() and not L.manifest("prepare").exists()
    killed = L.prepare_shards / ".part-0001-of-0003.src.bin.999999.tmp"
    killed.write_bytes(b"left by a killed job")
    code, out = cli("prepare", *_sets(local_corpus, parts, quiet=False))
    assert code == 0, out
    assert "2 of 3 part(s) binarized already" in out
    W = RunLayout(whole)
    for name in sorted(p.name for p in W.data_bin.iterdir()):
        assert (L.data_bin / name).read_bytes() == (W.data_bin / name).read_bytes(), name
    for a, b in ((L.prepare_ids, W.prepare_ids), (L.prepare_tasks, W.prepare_tasks), (L.spm_model, W.spm_model),
                 (L.stage_dir("prepare") / "dict.txt", W.stage_dir("prepare") / "dict.txt")):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert json.loads(L.manifest("prepare").read_text())["stats"]["tasks"] == \
        json.loads(W.manifest("prepare").read_text())["stats"]["tasks"]
    assert not killed.exists() and not list(L.prepare_shards.glob("part-*"))
    # fairseq reads it: lengths from the index, the ids from the .bin
    src, _, _ = load_train_pairs(L.data_bin)
    assert np.array_equal(src.sizes, np.array([len(src[i]) for i in range(len(src))]))


def test_a_part_refuses_what_cannot_work(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    code, out = cli("prepare", *_sets(local_corpus, run), "--shard", "0/2")
    assert code != 0 and "upstream stage 'download'" in out and "prepare --shard" in out
    assert cli("download", *_sets(local_corpus, run))[0] == 0
    code, out = cli("prepare", *_sets(local_corpus, run), "--shard", "2/2")
    assert code != 0 and "expected I/N with 0 <= I < N" in out
    assert not RunLayout(run).prepare_shards.exists() or not list(RunLayout(run).prepare_shards.glob("part-*"))
