from pathlib import Path

import pytest

from conftest import ROOT, cli, error_lines
from mtprune.config import Config, load_config
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


def test_every_problem_is_listed_with_its_dotted_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("download:\n  pairz: [de-en]\nproxy:\n  seeds: one\nprune:\n  sparsities: [0.2, 1.5]\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "download.pairz: unknown key" in msg
    assert "proxy.seeds: expected a list" in msg
    assert str(f) in msg


def test_range_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["prune.sparsities=[0.2,0.2,1.0]", "prune.strategies=[el2n-sideways]",
                           "download.pairs=[xx-en]"])
    msg = str(e.value)
    assert "1.0 is outside [0, 1)" in msg
    assert "duplicate sparsities" in msg
    assert "unknown strategy 'el2n-sideways'" in msg
    assert "unknown pair 'xx-en'" in msg


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
