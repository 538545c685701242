"""evaluate.extra_test_sets: a set the models cannot translate is refused before anything runs."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY, cli, error_lines, sentence


def _files(folder: Path, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    src, ref = folder / f"test.{src_lang}", folder / f"test.{tgt_lang}"
    src.write_text("\n".join(sentence(i, "en") for i in range(5)) + "\n")
    ref.write_text("\n".join(sentence(i, "de") for i in range(5)) + "\n")
    return src, ref


def test_a_target_language_no_model_translates_into_is_refused_before_the_first_stage(tmp_path: Path) -> None:
    """The tiny config trains en -> de, es, fr, it: a model has no <2pt> tag, so a Portuguese set used to be
    decoded into some other language and its BLEU reported without a word; English is no target either."""
    run = tmp_path / "run"
    de_src, de_ref = _files(tmp_path, "en", "de")
    pt_src, pt_ref = _files(tmp_path, "en", "pt")
    sets = (f"evaluate.extra_test_sets=[{{name: ok, src_lang: en, tgt_lang: de, src: {de_src}, ref: {de_ref}}}, "
            f"{{name: flores, src_lang: en, tgt_lang: pt, src: {pt_src}, ref: {pt_ref}}}]")
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", sets, "--dry-run")
    assert code == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: evaluate.extra_test_sets[1] (flores, en-pt): the models translate into de, es, fr, it "
                      "only (download.pairs, download.direction en-xx), not pt"], out
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", sets)
    assert code == 2 and len(error_lines(out)) == 1 and "extra_test_sets[1] (flores, en-pt)" in out, out
    assert not (run / "01_download").exists()  # refused before the first stage
    into_en = sets.replace("src_lang: en, tgt_lang: pt", "src_lang: pt, tgt_lang: en")
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", into_en, "--dry-run")
    assert code == 2 and "(flores, pt-en): the models translate into de, es, fr, it only" in out, out
    # with both directions trained, English is a target the models know
    code, out = cli("sweep", "-c", str(TINY), "--run-dir", str(run), "--set", into_en.replace("pt-en", "de-en"),
                    "--set", "download.direction=both", "--set", "download.pairs=[de-en]", "--dry-run")
    assert code == 0 and "error" not in out, out
