"""Freshness rests on the settings each stage read: other sections' keys count, speed-only ones never do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, cli, write_release
from mtprune.layout import RunLayout

SYN = ["--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
       "--set", "prepare.vocab_size=120", "--set", "prepare.spm_sample=500"]


def _states(out: str) -> dict[str, str]:
    states = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in ("download", "prepare", "proxy", "score", "prune", "train",
                                            "evaluate", "report"):
            states[parts[0]] = parts[1] + (" " + parts[2] if len(parts) > 2 else "")
    return states


@pytest.mark.slow
def test_a_setting_of_another_section_that_a_stage_reads_makes_it_stale(tmp_path: Path) -> None:
    run = tmp_path / "r"
    for stage in ("download", "prepare"):
        code, out = cli(stage, *SYN, "--run-dir", str(run), "-q")
        assert code == 0, out
    params = json.loads((run / "02_prepare" / "manifest.json").read_text())["params"]
    assert params["download.direction"] == "en-xx"  # recorded because prepare read it
    code, out = cli("status", *SYN, "--set", "download.direction=xx-en", "--run-dir", str(run))
    states = _states(out)
    assert states["prepare"].startswith("stale config changed: download.direction"), out
    code, out = cli("prepare", *SYN, "--set", "download.direction=xx-en", "--run-dir", str(run))
    # redone (every output replaced; the folder is not cleared, since it keeps `prepare --shard` parts)
    assert code == 0 and "prepare: running (config changed: download.direction)" in out, out
    code, out = cli("status", *SYN, "--set", "download.direction=xx-en", "--run-dir", str(run))
    assert _states(out)["prepare"].startswith("fresh"), out
    tasks = (run / "02_prepare" / "train.tasks").read_text().splitlines()
    assert tasks and all(t.split("\t")[1].endswith("-en") for t in tasks)


@pytest.mark.slow
def test_speed_only_settings_never_make_finished_stages_stale(tiny_copy: Path) -> None:
    base = ["-c", str(TINY), "--run-dir", str(tiny_copy)]
    speed = ["--set", "score.batch_tokens=777", "--set", "score.chunk_tokens=7", "--set", "score.device=cpu",
             "--set", "proxy.parallel=1", "--set", "train.parallel=1", "--set", "prepare.workers=1",
             "--set", "evaluate.max_tokens=999", "--set", "launch.score_shards=3"]
    code, out = cli("status", *base, *speed)
    states = _states(out)
    for stage in ("download", "prepare", "proxy", "score"):
        assert states[stage].startswith("fresh"), out
    code, out = cli("score", *base, *speed)
    assert code == 0 and "nothing to do" in out, out
    # a setting that changes results still does
    code, out = cli("status", *base, "--set", "proxy.lr=0.003")
    states = _states(out)
    assert states["proxy"].startswith("stale config changed: proxy.lr"), out
    assert states["score"].startswith("stale"), out


def test_a_damaged_manifest_is_stale_not_a_crash(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert cli("download", *SYN, "--run-dir", str(run), "-q")[0] == 0
    for damage in ("{}", "[1, 2]", '{"outputs": {"a": 1}, "inputs": {}, "outputs_digest": "x"}', "not json"):
        (run / "01_download" / "manifest.json").write_text(damage)
        code, out = cli("status", *SYN, "--run-dir", str(run))
        assert code == 0 and "Traceback" not in out, out
        assert _states(out)["download"].startswith("stale manifest.json is damaged"), out
    code, out = cli("download", *SYN, "--run-dir", str(run))
    assert code == 0, out
    code, out = cli("status", *SYN, "--run-dir", str(run))
    assert _states(out)["download"].startswith("fresh"), out


def _download_subprocess(run: Path, *sets: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if crash:
        env["MTPRUNE_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "mtprune", "download", *SYN, *sets, "--run-dir", str(run), "-q"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_run_killed_after_a_config_change_keeps_the_last_finished_artifacts(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert _download_subprocess(run).returncode == 0
    good = (run / "01_download" / "de-en" / "train.de").read_text()
    p = _download_subprocess(run, "--set", "download.seed=7", crash="download:start")
    assert p.returncode == -9
    assert (run / "01_download.previous" / "de-en" / "train.de").read_text() == good
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["download"]["seed"] == 1
    # going back to the old settings finds the finished artifacts again, without redoing them
    code, out = cli("download", *SYN, "--run-dir", str(run))
    assert code == 0 and "restoring" in out and "nothing to do" in out, out
    assert (run / "01_download" / "de-en" / "train.de").read_text() == good
    assert not (run / "01_download.previous").exists()
    # and the new settings still run to the end
    code, out = cli("download", *SYN, "--set", "download.seed=7", "--run-dir", str(run))
    assert code == 0, out
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["download"]["seed"] == 7


def test_a_failed_run_leaves_the_resolved_config_of_the_finished_artifacts(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert cli("download", *SYN, "--run-dir", str(run), "-q")[0] == 0
    code, out = cli("download", *SYN, "--set", f"download.source=local:{tmp_path / 'nowhere'}", "--run-dir", str(run))
    assert code == 2, out
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["download"]["source"] == "synthetic"
    assert (run / "01_download" / "manifest.json").is_file()


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path: Path, where: str) -> None:
    if where == "file":
        (tmp_path / "f").write_text("x")
        run = tmp_path / "f" / "run"
        want = "is a file, not a directory"
    else:
        run = Path("/proc/mtprune-no-such/run")
        want = "cannot be created"
    code, out = cli("download", *SYN, "--run-dir", str(run))
    assert code == 2 and want in out and "Traceback" not in out, out


@pytest.mark.slow
def test_a_changed_test_split_makes_evaluate_stale_and_reaches_the_metrics(tiny_swept, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_swept[0], run, symlinks=True)
    args = ["-c", str(TINY), "--run-dir", str(run), "--set", "download.max_test_per_pair=25"]
    for stage in ("download", "prepare"):  # prepare does not read the test split: same outputs as before
        code, out = cli(stage, *args, "-q")
        assert code == 0, out
    states = _states(cli("status", *args)[1])
    assert all(states[s].startswith("fresh") for s in ("prepare", "proxy", "score", "prune", "train")), states
    assert states["evaluate"].startswith("stale upstream download was rerun since"), states
    code, out = cli("evaluate", *args, "-q")
    assert code == 0, out
    metrics = json.loads((run / "07_evaluate" / "full" / "metrics.json").read_text())
    assert {r["sentences"] for r in metrics["results"].values()} == {25}


def test_an_input_file_edited_with_its_size_and_mtime_put_back_is_seen_by_verify(tmp_path: Path) -> None:
    """A plain-text source edited in place with the same size, its mtime restored (`touch -r`): a plain status
    trusts size and mtime as for outputs, `status --verify` rehashes the inputs and says which one changed;
    an edit that leaves the mtime moved is stale without --verify, a file only touched is not."""
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            p = src / f"{split}.{lang}"
            p.write_text("".join(f"{lang} {split} sentence number {i}\n" for i in range(40)), encoding="utf-8")
            files[(split, lang)] = p
    sets = ["--set", "download.source=files", "--set", "download.pairs=[de-en]"]
    for split in ("train", "valid", "test"):
        sets += ["--set", f"download.files.de-en.{split}=[{files[(split, 'de')]},{files[(split, 'en')]}]"]
    run = tmp_path / "run"
    code, out = cli("download", *sets, "--run-dir", str(run), "-q")
    assert code == 0, out
    recorded = json.loads((run / "01_download" / "manifest.json").read_text())["config"]["external"]
    assert recorded[str(files[("train", "de")])]["sha256"]  # hashed, not only size and mtime

    p = files[("train", "en")]
    st = p.stat()
    text = p.read_text(encoding="utf-8")
    p.write_text(text.replace("sentence number 7\n", "sentence number 9\n", 1), encoding="utf-8")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` puts it back
    assert p.stat().st_size == st.st_size
    code, out = cli("status", *sets, "--run-dir", str(run))
    assert _states(out)["download"].startswith("fresh"), out  # size and mtime are the cache key
    code, out = cli("status", "--verify", *sets, "--run-dir", str(run))
    assert code == 1 and _states(out)["download"] == f"stale input changed: {p} (edited)", out

    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # within the same second
    code, out = cli("status", *sets, "--run-dir", str(run))
    assert _states(out)["download"].startswith("stale"), out
    p.write_text(text, encoding="utf-8")  # content back as it was: only touched now
    code, out = cli("status", "--verify", *sets, "--run-dir", str(run))
    assert code == 0 and _states(out)["download"].startswith("fresh"), out


def test_status_of_a_run_directory_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for cmd in (["status"], ["sweep", "--dry-run"]):
        code, out = cli(*cmd, *SYN, "--run-dir", str(tmp_path / "f" / "x"))
        assert code == 2 and out.strip().endswith(f"{tmp_path / 'f'} is a file, not a directory"), out
        assert len(out.strip().splitlines()) == 1, out


def _plain_text_source(tmp_path: Path) -> tuple[dict[tuple[str, str], Path], list[str]]:
    """A de-en pair from plain-text files (source: files): the files, and the --set options naming them."""
    src = tmp_path / "src"
    src.mkdir()
    files, sets = {}, ["--set", "download.source=files", "--set", "download.pairs=[de-en]"]
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            files[(split, lang)] = src / f"{split}.{lang}"
            files[(split, lang)].write_text("".join(f"{lang} {split} {i}\n" for i in range(30)), encoding="utf-8")
        sets += ["--set", f"download.files.de-en.{split}=[{files[(split, 'de')]},{files[(split, 'en')]}]"]
    return files, sets


def test_status_names_the_input_file_that_was_edited_or_deleted(tmp_path: Path) -> None:
    """An input edited or deleted is not "config changed": status says which file, and how."""
    files, sets = _plain_text_source(tmp_path)
    run = ["--run-dir", str(tmp_path / "run")]
    code, out = cli("download", *sets, *run, "-q")
    assert code == 0, out
    edited, gone = files[("train", "de")], files[("test", "en")]
    edited.write_text(edited.read_text(encoding="utf-8") + "de train extra\n", encoding="utf-8")
    gone.unlink()
    code, out = cli("status", *sets, *run)
    assert _states(out)["download"] == f"stale input changed: {gone} (missing), {edited} (edited)", out
    code, out = cli("sweep", "--dry-run", *sets, *run)
    assert f"run    download  stale: input changed: {gone} (missing), {edited} (edited)" in out, out

    # a local copy: a file deleted from the pair's folder, another added to it
    local = tmp_path / "opus"
    write_release(local, "de-en")
    copy = ["--set", f"download.source=local:{local}", "--set", "download.pairs=[de-en]"]
    run = ["--run-dir", str(tmp_path / "run-local")]
    code, out = cli("download", *copy, *run, "-q")
    assert code == 0, out
    (local / "de-en" / "opus.de-en-dev.en").unlink()
    (local / "de-en" / "README").write_text("notes\n")
    code, out = cli("status", *copy, *run)
    assert _states(out)["download"] == (f"stale input changed: {local / 'de-en' / 'README'} (new), "
                                        f"{local / 'de-en' / 'opus.de-en-dev.en'} (missing)"), out


def test_status_says_why_a_run_failed_until_the_stage_succeeds(tmp_path: Path) -> None:
    """A download that failed (a local copy that is not there, a hub that cannot be reached) is not "rerun to
    resume": status shows the failure's one line while the settings are those it failed with, and forgets it
    once the stage succeeds. Failing again beside finished artifacts leaves their folder as it was."""
    run = tmp_path / "run"
    ok = [*SYN, "--set", "download.pairs=[de-en]", "--run-dir", str(run)]
    nowhere = tmp_path / "nowhere"
    bad = [*ok, "--set", f"download.source=local:{nowhere}"]
    code, out = cli("download", *bad, "-q")
    assert code == 2 and f"{nowhere}: local source folder not found" in out, out
    failed = f"{nowhere}: local source folder not found"
    code, out = cli("status", *bad)
    assert _states(out)["download"] == f"failed {failed} (fix that, then rerun)", out
    code, out = cli("sweep", "--dry-run", *bad)
    assert f"run    download  failed: {failed} (fix that, then rerun)" in out, out
    code, out = cli("status", *ok)  # other settings than the failed run's: the rerun may well work
    assert _states(out)["download"] == ("incomplete started but not finished; rerun to resume (the last run, with "
                                        f"other settings, failed: {failed})"), out

    # the real datasets library, offline with an empty cache: the hub cannot be reached
    hub = [*ok, "--set", "download.source=hub"]
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_CACHE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "mtprune", "download", *hub, "-q"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stderr
    code, out = cli("status", *hub)
    state = _states(out)["download"]
    assert state.startswith("failed cannot load Helsinki-NLP/opus-100 (de-en, test): offline") and \
        state.endswith("(fix that, then rerun)"), out

    code, out = cli("download", *ok, "-q")
    assert code == 0, out
    assert not RunLayout(run).in_progress("download").exists()
    code, out = cli("status", *ok)
    assert _states(out)["download"].startswith("fresh"), out
    code, out = cli("status", *bad)
    assert _states(out)["download"] == "stale config changed: download.source", out

    code, out = cli("download", *bad, "-q")  # fails again: the finished download is put back as it was
    assert code == 2, out
    assert not RunLayout(run).in_progress("download").exists()
    code, out = cli("status", *ok)
    assert _states(out)["download"].startswith("fresh"), out
