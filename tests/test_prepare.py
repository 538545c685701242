from pathlib import Path

import pytest

from conftest import SHARED_DATA, TINY, cli, error_lines
from mtprune.fairseq_backend import load_train_pairs
from mtprune.layout import RunLayout
from mtprune.textio import read_lines


def _decode_example(L: RunLayout, i: int) -> tuple[str, str]:
    import sentencepiece as spm

    src, tgt, d = load_train_pairs(L.data_bin)
    sp = spm.SentencePieceProcessor(model_file=str(L.spm_model))
    s_pieces = d.string(src[i]).split()
    t_pieces = d.string(tgt[i]).split()
    return s_pieces[0] + " " + sp.decode(s_pieces[1:]), sp.decode(t_pieces)


def _check_mapping(L: RunLayout, pairs: list[str]) -> int:
    """Every fairseq train example decodes to the raw pair its sentence id names."""
    ids = read_lines(L.prepare_ids)
    tasks = [t.split("\t") for t in read_lines(L.prepare_tasks)]
    raw = {}
    for pair in pairs:
        a, b = pair.split("-")
        line_of = {sid: k for k, sid in enumerate(read_lines(L.download_ids(pair)))}
        raw[pair] = (line_of, {a: read_lines(L.split_file(pair, "train", a)), b: read_lines(L.split_file(pair, "train", b))})
    src, _, _ = load_train_pairs(L.data_bin)
    assert len(ids) == len(src) == len(tasks)
    step = max(1, len(ids) // 200)
    for i in range(0, len(ids), step):
        pair, direction = tasks[i]
        s, t = direction.split("-")
        line_of, text = raw[pair]
        k = line_of[ids[i]]
        got_src, got_tgt = _decode_example(L, i)
        assert got_src == f"<2{t}> {text[s][k]}", (i, ids[i])
        assert got_tgt == text[t][k], (i, ids[i])
    return len(ids)


def test_prepare_maps_every_fairseq_index_to_its_sentence(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    sets = ["--set", f"download.source=local:{local_corpus}", "--set", "download.pairs=[de-en,en-fr]",
            "--set", "prepare.vocab_size=200", "--run-dir", str(run), "-q"]
    assert cli("download", *sets)[0] == 0
    code, out = cli("prepare", *sets)
    assert code == 0, out
    L = RunLayout(run)
    assert _check_mapping(L, ["de-en", "en-fr"]) == 120
    assert (L.data_bin / "dict.src.txt").read_text() == (L.data_bin / "dict.tgt.txt").read_text()
    assert "<2de> 1" in (L.data_bin / "dict.src.txt").read_text()


def test_direction_both_tags_each_direction(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    sets = ["--set", f"download.source=local:{local_corpus}", "--set", "download.pairs=[de-en]",
            "--set", "download.direction=both", "--set", "prepare.vocab_size=200", "--run-dir", str(run), "-q"]
    assert cli("download", *sets)[0] == 0
    assert cli("prepare", *sets)[0] == 0
    L = RunLayout(run)
    assert {t for t in read_lines(L.prepare_tasks)} == {"de-en\ten-de", "de-en\tde-en"}
    assert _check_mapping(L, ["de-en"]) == 120


def test_rerun_is_a_no_op_and_a_config_change_makes_it_stale(tmp_path: Path, local_corpus: Path) -> None:
    run = tmp_path / "run"
    sets = ["--set", f"download.source=local:{local_corpus}", "--set", "download.pairs=[de-en]",
            "--set", "prepare.vocab_size=200", "--run-dir", str(run)]
    assert cli("download", *sets, "-q")[0] == 0
    assert cli("prepare", *sets, "-q")[0] == 0
    before = RunLayout(run).manifest("prepare").read_text()
    code, out = cli("prepare", *sets)
    assert code == 0 and "fresh" in out and "nothing to do" in out
    assert RunLayout(run).manifest("prepare").read_text() == before
    code, out = cli("status", *sets[:-2], "--set", "prepare.vocab_size=150", "--run-dir", str(run))
    assert "prepare   stale" in out and "prepare.vocab_size" in out
    assert "proxy     missing" in out


def test_the_sentencepiece_model_does_not_depend_on_prepare_workers(tmp_path: Path) -> None:
    """prepare.workers only changes speed: another core count must write the same model and data."""
    models = []
    for workers in (1, 3):
        run = tmp_path / f"w{workers}"
        sets = ["--set", "download.source=synthetic", "--set", "download.pairs=[de-en]",
                "--set", "download.synthetic_train_per_pair=600", "--set", "prepare.vocab_size=300",
                "--set", f"prepare.workers={workers}", "--run-dir", str(run), "-q"]
        assert cli("download", *sets)[0] == 0
        code, out = cli("prepare", *sets)
        assert code == 0, out
        L = RunLayout(run)
        models.append((L.spm_model.read_bytes(), (L.data_bin / "train.src-tgt.tgt.bin").read_bytes()))
    assert models[0] == models[1]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "tatoeba-opus100-layout").is_dir(), reason="shared data not present")
def test_download_and_prepare_on_tatoeba_in_opus_layout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["--set", f"download.source=local:{SHARED_DATA / 'tatoeba-opus100-layout'}",
            "--set", "download.max_train_per_pair=1500", "--set", "download.max_valid_per_pair=100",
            "--set", "prepare.vocab_size=2000", "--run-dir", str(run), "-q"]
    code, out = cli("download", *sets)
    assert code == 0, out
    code, out = cli("prepare", *sets)
    assert code == 0, out
    assert _check_mapping(RunLayout(run), ["de-en", "en-es", "en-fr", "en-it"]) == 6000


def test_a_pair_with_no_training_pair_left_stops_prepare_with_one_line(tmp_path: Path) -> None:
    """prepare.max_tokens below every sentence: prepare used to finish (exit 0) with empty training data, and the
    proxy died in fairseq (AttributeError ... _bin_buffer_mmap). Now it stops, naming the pairs and the setting."""
    run = tmp_path / "run"
    sets = ["-c", str(TINY), "--run-dir", str(run), "-q", "--set", "download.pairs=[de-en,en-fr]"]
    assert cli("download", *sets)[0] == 0
    code, out = cli("prepare", *sets, "--set", "prepare.max_tokens=4")
    assert code == 2, out
    assert len(error_lines(out)) == 1 and len(out.strip().splitlines()) == 1, out
    line = error_lines(out)[0]
    assert line.startswith("mtprune prepare: error: ") and "de-en (en-de)" in line and "en-fr (en-fr)" in line, line
    assert "0 training pairs" in line and "prepare.max_tokens=4" in line, line
    L = RunLayout(run)
    assert not L.manifest("prepare").exists() and not L.data_bin.exists() and not L.prepare_ids.exists()
    assert not L.spm_model.exists()
    # the same run with room for the sentences goes on as usual
    code, out = cli("prepare", *sets)
    assert code == 0 and L.manifest("prepare").exists(), out


def test_a_prepare_part_killed_while_its_pool_encodes_leaves_a_clean_log(tmp_path: Path) -> None:
    """A `prepare --shard` job killed while its encoding workers are busy (a cluster's time limit, `scancel`): its
    log holds nothing after the kill, not the workers' BrokenPipeError tracebacks nor the resource tracker's
    "leaked semaphore objects" warning. The pipe is read to its end, so every process that shared it (the
    workers, the tracker) has gone by the time the run returns."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    run = tmp_path / "run"
    # 4 pairs x 4,000 rows: part 0 of 2 is 4 chunks, so chunks are still in the workers when the first is written
    sets = ["-c", str(TINY), "--run-dir", str(run), "-q", "--set", "download.synthetic_train_per_pair=4000",
            "--set", "prepare.workers=2"]
    code, out = cli("download", *sets)
    assert code == 0, out
    env = {**os.environ, "MTPRUNE_CRASH_AT": "prepare:part-encoding"}
    p = subprocess.run([sys.executable, "-m", "mtprune", "prepare", "--shard", "0/2", *sets], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == -9, p.stderr
    assert p.stderr == "" and p.stdout == "", p.stderr
    assert not RunLayout(run).prepare_part(0, 2).with_name("part-0000-of-0002.json").exists()
