from pathlib import Path

import pytest

from conftest import ROOT, cli, error_lines
from mtprune.config import OPUS100_LANGS, Config, load_config
from mtprune.errors import ConfigError


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/**/*.yaml")) + sorted(ROOT.glob("tests/configs/**/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_configs_folder_has_the_three_documented_configs() -> None:
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"demo.yaml", "opus100-small.yaml", "blog.yaml"} <= names


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.download.source == "hub"
    assert cfg.download.pairs == ("de-en", "en-es", "en-fr", "en-it")
    assert cfg.proxy.warmup_updates < min(cfg.proxy.checkpoints)


def test_set_values_are_read_as_yaml() -> None:
    cfg = load_config(None, ["prune.sparsities=[0.1,0.3]", "download.pairs=[de-en]", "proxy.seeds=[7]",
                             "download.max_train_per_pair=null", "score.dump_tokens=true"])
    assert cfg.prune.sparsities == (0.1, 0.3)
    assert cfg.download.pairs == ("de-en",)
    assert cfg.proxy.seeds == (7,)
    assert cfg.download.max_train_per_pair is None
    assert cfg.score.dump_tokens is True


def problems(path: Path | None = None, overrides: list[str] | None = None) -> set[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides or [])
    return set(e.value.problems)


PRUNE_KEYS = "known: first_share, length_match, scope, seed, sparsities, strategies"


def test_every_problem_is_listed_with_its_dotted_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("download:\n  pairz: [de-en]\nproxy:\n  seeds: one\nprune:\n  sparsities: [0.2, 1.5]\n"
                 "train:\n  max_update: -5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert set(e.value.problems) == {
        "download.pairz: unknown key (known: cache_dir, direction, files, max_chars, max_test_per_pair, max_train_per_pair, "
        "max_valid_per_pair, max_words, noise, pairs, seed, source, synthetic_noise, synthetic_train_per_pair)",
        "proxy.seeds: expected a list, got 'one'",
        "prune.sparsities: 1.5 is outside [0, 1)",
        "train.max_update: must be >= 1, got -5",
    }
    assert str(e.value).startswith(f"{f}: ")


def test_range_problems_are_reported_beside_an_unknown_key_of_the_same_section() -> None:
    # an unknown key used to hide every range problem of the config
    assert problems(None, ["prune.sparsity=0.2", "prune.sparsities=[1.5]", "train.max_update=-5",
                           "proxy.checkpoints=[50]", "proxy.warmup=1"]) == {
        f"prune.sparsity: unknown key ({PRUNE_KEYS})",
        "prune.sparsities: 1.5 is outside [0, 1)",
        "train.max_update: must be >= 1, got -5",
        "proxy.warmup_updates: 200 is not before the first kept checkpoint (50); "
        "scores taken inside warm-up barely beat sentence length",
        "proxy.warmup: unknown key (known: checkpoints, dual, label_smoothing, lr, max_tokens, parallel, precision, "
        "seeds, tokens_per_update, update_freq, warmup_updates)",
    }


def test_range_problems_are_all_reported() -> None:
    assert problems(None, ["prune.sparsities=[0.2,0.2,1.0]", "prune.strategies=[el2n-sideways]",
                           "download.pairs=[xx-en]"]) == {
        "prune.sparsities: 1.0 is outside [0, 1)",
        "prune.sparsities: duplicate sparsities",
        "prune.strategies: unknown strategy 'el2n-sideways' (random, random-length, group, opusfilter, <score>-high / <score>-low or <score>-high+<score>-high)",
        "download.pairs: unknown pair 'xx-en': OPUS-100 pairs English with one of its 99 languages, named in "
        f"alphabetical order (de-en, en-nl; {', '.join(OPUS100_LANGS)})",
    }


def test_types_are_strict_and_every_wrong_type_is_named() -> None:
    assert problems(None, ["train.max_update=many", "train.seed=1.0", "train.lr=true", "proxy.max_tokens='2048'",
                           "score.dump_tokens=1", "download.pairs=de-en", "report=[1]", "run_dir=[a]"]) == {
        "train.max_update: expected an integer, got 'many'",
        "train.seed: expected an integer, got 1.0",
        "train.lr: expected a number, got True",
        "proxy.max_tokens: expected an integer, got '2048'",
        "score.dump_tokens: expected true or false, got 1",
        "download.pairs: expected a list, got 'de-en'",
        "report: expected a mapping, got [1]",
        "run_dir: expected a string, got ['a']",
    }
    cfg = load_config(None, ["train.lr=1", "prune.sparsities=[0, 0.5]"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an integer is a number
    assert cfg.prune.sparsities == (0.0, 0.5) and all(isinstance(s, float) for s in cfg.prune.sparsities)


def test_train_seed_beside_train_seeds_hides_no_other_problem() -> None:
    """Both forms of the seed are one problem; the seeds list's own (and the section's others) are listed too.
    proxy has no `seed`: there it is an unknown key, reported beside the duplicate already."""
    both = "train: give train.seeds only (train.seed is the older single-seed form)"
    assert problems(None, ["train.seeds=[1,1]", "train.seed=3"]) == {both, "train.seeds: duplicate seeds"}
    assert problems(None, ["train.seeds=[1,x]", "train.seed=3", "train.lr=-1", "train.budget=epochs"]) == {
        both, "train.seeds[1]: expected an integer, got 'x'", "train.lr: must be > 0, got -1.0",
        "train.max_epoch: needed with train.budget: epochs (the number of passes over each corpus)"}
    assert problems(None, ["train.seeds=[1,2]", "train.seed=3"]) == {both}
    assert load_config(None, ["train.seed=3"]).train.seeds == (3,)
    assert problems(None, ["proxy.seeds=[1,1]", "proxy.seed=3"]) == {
        "proxy.seeds: duplicate seeds",
        "proxy.seed: unknown key (known: checkpoints, dual, label_smoothing, lr, max_tokens, parallel, precision, "
        "seeds, tokens_per_update, update_freq, warmup_updates)"}


def test_bad_entries_of_a_list_are_named_by_position() -> None:
    assert problems(None, ["evaluate.extra_test_sets=[5, {name: f, src_lang: de, foo: 1}, "
                           "{name: g, src_lang: xx, tgt_lang: en, src: a, ref: b}]",
                           "prune.sparsities=[0.1, x]", "launch.slurm.extra=[constraint=a100, oops]"]) == {
        "evaluate.extra_test_sets[0]: expected a mapping, got 5",
        "evaluate.extra_test_sets[1].tgt_lang: missing (required)",
        "evaluate.extra_test_sets[1].src: missing (required)",
        "evaluate.extra_test_sets[1].ref: missing (required)",
        "evaluate.extra_test_sets[1].foo: unknown key (known: name, ref, src, src_lang, tgt_lang)",
        f"evaluate.extra_test_sets[2].src_lang: unknown language 'xx' (known: {', '.join(sorted({'en', *OPUS100_LANGS}))})",
        "prune.sparsities[1]: expected a number, got 'x'",
        "launch.slurm.extra[1]: 'oops' is not key=value",
    }


def test_cli_bad_test_set_is_one_config_line_and_exit_2(tmp_path: Path) -> None:
    # was `TypeError: TestSet.__init__()` and exit 1
    code, out = cli("status", "--set", "evaluate.extra_test_sets=[5]", "--run-dir", str(tmp_path / "r"))
    assert code == 2, out
    assert error_lines(out) == [out.strip()]
    assert "evaluate.extra_test_sets[0]: expected a mapping, got 5" in out
    assert "Traceback" not in out and "TypeError" not in out


def test_relations_between_settings_are_checked_against_defaults_too() -> None:
    assert problems(None, ["model.embed_dim=66", "proxy.checkpoints=[50]"]) == {
        "model.attention_heads: 4 does not divide model.embed_dim (66)",
        "proxy.warmup_updates: 200 is not before the first kept checkpoint (50); "
        "scores taken inside warm-up barely beat sentence length",
    }
    # a relation is not judged against a value that is itself wrong
    assert problems(None, ["model.embed_dim=many"]) == {"model.embed_dim: expected an integer, got 'many'"}


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("prune:\ntrain: {}\n")
    cfg = load_config(f)
    assert cfg.prune.sparsities == (0.1, 0.3, 0.5) and cfg.train.max_update == 1500


def test_sections_are_frozen_and_replace_checks_like_load() -> None:
    cfg = load_config(None)
    with pytest.raises(ValueError):
        cfg.train.max_update = 3  # type: ignore[misc]
    new = cfg.replace(launch=cfg.launch.replace(launcher="slurm"))
    assert new.launch.launcher == "slurm" and cfg.launch.launcher == "local"
    assert new.prune is cfg.prune
    with pytest.raises(ConfigError, match=r"train\.max_update: must be >= 1, got 0"):
        cfg.train.replace(max_update=0)
    with pytest.raises(ConfigError, match=r"launch\.launcher: must be local, slurm or submitit-local"):
        cfg.launch.replace(launcher="pbs")


def test_warmup_must_end_before_first_kept_checkpoint() -> None:
    with pytest.raises(ConfigError, match="proxy.warmup_updates"):
        load_config(None, ["proxy.checkpoints=[100,200]", "proxy.warmup_updates=400"])


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("download:\n  pairs: [de-en\nprune: {}\n")
    code, out = cli("status", "-c", str(f))
    assert code == 2
    assert len(error_lines(out)) == 1
    assert "broken.yaml" in out and "line" in out


def test_cli_config_typo_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, out = cli("download", "--set", "downlod.pairs=[de-en]", "--run-dir", str(tmp_path / "r"))
    assert code == 2
    assert error_lines(out) == [out.strip()]
    assert "downlod: unknown key" in out
    assert not (tmp_path / "r").exists()


def test_wrong_type_exit_2(tmp_path: Path) -> None:
    code, out = cli("status", "--set", "proxy.max_tokens=lots", "--run-dir", str(tmp_path))
    assert code == 2
    assert "proxy.max_tokens: expected an integer" in out


def test_help_is_instant_and_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    code = ("import sys, mtprune.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(mtprune.cli.main, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'fairseq', 'datasets', 'sentencepiece') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bad_set_value_is_blamed_on_set_not_on_the_config_file(tmp_path: Path) -> None:
    from conftest import cli

    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  lr: -1\n")
    code, out = cli("train", "-c", str(cfg), "--set", "train.max_update=many", "--run-dir", str(tmp_path / "r"))
    assert code == 2, out
    assert out.strip().endswith(f"error: {cfg}: train.lr: must be > 0, got -1.0; "
                                "--set train.max_update: expected an integer, got 'many'"), out
    code, out = cli("train", "--set", "train.seeds=[1,x]", "--run-dir", str(tmp_path / "r"))
    assert out.strip().endswith("error: --set train.seeds[1]: expected an integer, got 'x'"), out


def test_status_report_and_config_without_c_read_the_runs_own_config(tmp_path: Path, monkeypatch) -> None:
    """Without -c: the config of the run in --run-dir, else ./runs/default, else the last run used; status says
    which config it read. `mtprune config` prints the resolved config, defaults included."""
    from conftest import cli
    from mtprune.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTPRUNE_STATE_DIR", str(tmp_path / "state"))  # no last run yet
    code, out = cli("status")
    assert code == 0 and "config: built-in defaults" in out and "run directory: runs/default" in out, out
    run = tmp_path / "elsewhere" / "run"
    sets = ["--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
            "--set", "download.pairs=[de-en]"]
    code, out = cli("download", *sets, "--run-dir", str(run), "-q")
    assert code == 0, out
    resolved = run / "config.resolved.yaml"
    for args in (["--run-dir", str(run)], []):  # named, then remembered as the last run used
        code, out = cli("status", *args)
        assert code == 0 and f"config: {resolved}" in out and f"run directory: {run}" in out, out
        assert out.splitlines()[3].split()[:2] == ["download", "fresh"], out
    code, out = cli("config", "-q")
    assert code == 0 and out.startswith("# mtprune ") and str(resolved) in out.splitlines()[0], out
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert load_config(printed) == load_config(resolved)
    code, out = cli("config", "-c", str(printed), "--set", "train.lr=0.0005")
    assert "lr: 0.0005" in out and "max_update: 1500" in out, out  # defaults are printed too


def test_chunk_tokens_is_auto_or_a_positive_count_and_auto_scales_with_the_vocabulary() -> None:
    from mtprune.el2n import chunk_size

    assert load_config().score.chunk_tokens == "auto"
    assert load_config(overrides=["score.chunk_tokens=64"]).score.chunk_tokens == 64
    for bad in ("0", "big"):
        with pytest.raises(ConfigError, match="score.chunk_tokens"):
            load_config(overrides=[f"score.chunk_tokens={bad}"])
    assert chunk_size(64, 1000, "cpu") == 64
    assert chunk_size("auto", 1000, "cpu") == 2097 and chunk_size("auto", 8000, "cpu") == 262
    assert chunk_size("auto", 32000, "cuda") == 4194
    assert chunk_size("auto", 10_000_000, "cpu") == 1  # never zero tokens


def test_a_run_remembered_from_another_directory_is_read_where_it_was_run(tmp_path: Path, monkeypatch) -> None:
    """A run made with a relative run_dir (and relative data files), then looked at without -c from another
    directory: status finds its stages where they are, and nothing is created in the current directory."""
    from conftest import cli

    monkeypatch.setenv("MTPRUNE_STATE_DIR", str(tmp_path / "state"))
    work, other = tmp_path / "w", tmp_path / "other"
    (work / "data").mkdir(parents=True)
    other.mkdir()
    for split, n in (("train", 60), ("valid", 5), ("test", 5)):
        (work / "data" / f"{split}.en").write_text("".join(f"hello number {i}\n" for i in range(n)))
        (work / "data" / f"{split}.de").write_text("".join(f"hallo nummer {i}\n" for i in range(n)))
    files = "{en-de: {" + ", ".join(f"{s}: [data/{s}.en, data/{s}.de]" for s in ("train", "valid", "test")) + "}}"
    monkeypatch.chdir(work)
    code, out = cli("download", "--set", "run_dir=rl", "--set", "download.source=files",
                    "--set", "download.pairs=[en-de]", "--set", f"download.files={files}", "-q")
    assert code == 0, out
    monkeypatch.chdir(other)
    code, out = cli("status")
    assert code == 0, out
    assert [ln.split()[:2] for ln in out.splitlines() if ln.strip().startswith("download")] == [["download", "fresh"]], out
    code, out = cli("report")
    assert code == 2 and "is missing (not run yet)" in out, out  # as for a run in the current directory
    assert not (other / "rl").exists() and list(other.iterdir()) == []


def test_config_problems_name_the_real_key_and_where_it_was_given(tmp_path: Path) -> None:
    """A value that fits no member of a union names the key, not pydantic's member steps; a --set key under an
    unknown section is blamed on --set, not on the file; the command is named as typed (slurm-script)."""
    from conftest import cli

    code, out = cli("config", "--set", "score.chunk_tokens=1.5")
    assert code == 2 and out.strip().endswith(
        "error: --set score.chunk_tokens: expected an integer or a string, got 1.5"), out
    assert ".int" not in out and ".str" not in out
    f = tmp_path / "f.yaml"
    f.write_text("train:\n  lr: 0.001\n")
    code, out = cli("config", "-c", str(f), "--set", "nosuch.key=1")
    assert code == 2 and "error: --set nosuch: unknown key" in out and str(f) not in out, out
    code, out = cli("slurm-script", "prepare", "--set", "train.lr=fast", "--run-dir", str(tmp_path / "r"))
    assert code == 2 and out.strip().startswith("mtprune slurm-script: error: --set train.lr"), out


def test_yaml_keys_given_twice_are_refused_and_exponents_are_numbers(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 0.001\nprune:\n  seed: 2\ntrain:\n  max_update: 5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 5: 'train' is given twice in the same mapping \(first on "
                                          r"line 1\)"):
        load_config(f)
    f.write_text("train:\n  lr: 0.001\n  lr: 0.002\n")
    with pytest.raises(ConfigError, match="line 3: 'lr' is given twice"):
        load_config(f)
    f.write_text("train:\n  lr: 1e-3\n")
    assert load_config(f).train.lr == 0.001
    assert load_config(overrides=["train.lr=5E-4"]).train.lr == 0.0005
    assert load_config(overrides=["prune.seed=7"]).prune.seed == 7  # integers stay integers


def test_an_empty_resolved_config_is_damaged_not_the_defaults(tmp_path: Path) -> None:
    from conftest import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text("")
    code, out = cli("status", "--run-dir", str(run))
    assert code == 2 and "config.resolved.yaml: is empty: the run's record of its config is damaged" in out, out
    blank = tmp_path / "mine.yaml"
    blank.write_text("")
    assert load_config(blank) == load_config()  # a blank config of one's own is the defaults
