import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli
from mtprune.lock import RunLock, RunLocked, holder_file


def _download(run: Path, *extra: str) -> tuple[int, str]:
    return cli("download", "--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
               "--run-dir", str(run), *extra)


def test_manifest_records_config_outputs_and_versions(tmp_path: Path) -> None:
    assert _download(tmp_path / "r", "-q")[0] == 0
    m = json.loads((tmp_path / "r" / "01_download" / "manifest.json").read_text())
    assert m["stage"] == "download"
    assert m["config"]["download"]["source"] == "synthetic"
    assert m["outputs"]["de-en/train.ids"]["lines"] == 50
    assert len(m["outputs"]["de-en/train.de"]["sha256"]) == 64
    assert {"python", "torch", "sacrebleu"} <= set(m["versions"])
    assert m["host"] and m["started"] and m["finished"]
    assert (tmp_path / "r" / "config.resolved.yaml").is_file()


def test_changed_output_makes_the_stage_stale_and_overwrite_redoes_it(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert _download(run, "-q")[0] == 0
    f = run / "01_download" / "en-fr" / "train.fr"
    f.write_text(f.read_text() + "extra\n")
    code, out = cli("status", "--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
                    "--run-dir", str(run))
    assert "download  stale" in out and "en-fr/train.fr changed size" in out
    code, out = _download(run)
    assert code == 0 and "clearing" in out
    code, out = _download(run, "--overwrite")
    assert code == 0 and "--overwrite" in out


def test_same_size_edits_are_caught_by_status_and_verify(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert _download(run, "-q")[0] == 0
    f = run / "01_download" / "de-en" / "train.de"
    before = f.stat()
    data = bytearray(f.read_bytes())
    data[0] = ord("X") if data[0] != ord("X") else ord("Y")
    f.write_bytes(bytes(data))
    sets = ["--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50", "--run-dir", str(run)]
    code, out = cli("status", *sets)  # the mtime moved: the file is rehashed
    assert "download  stale" in out and "de-en/train.de changed since it was written" in out
    # an edit that also puts the old mtime back is only found by rehashing everything
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, out = cli("status", *sets)
    assert "download  fresh" in out
    code, out = cli("status", "--verify", *sets)
    assert code == 1 and "de-en/train.de changed since it was written" in out


def test_a_touched_but_unchanged_output_stays_fresh(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert _download(run, "-q")[0] == 0
    os.utime(run / "01_download" / "de-en" / "train.de")
    code, out = cli("status", "--set", "download.source=synthetic", "--set", "download.synthetic_train_per_pair=50",
                    "--run-dir", str(run))
    assert "download  fresh" in out


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with RunLock(lock, "proxy"):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            with RunLock(lock, "score"):
                pass
        code, out = _download(tmp_path)
        assert code == 1 and "is in use by `mtprune proxy`" in out
    assert not holder_file(lock).exists()
    with RunLock(lock, "score"):  # released: free again
        pass


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "train"}))
    with RunLock(lock, "download") as held:
        assert held.held
        assert json.loads(holder_file(lock).read_text())["pid"] == os.getpid()
