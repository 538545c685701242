"""What mtprune prints while fairseq is loaded in the same process."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_loading_fairseq_in_process_does_not_turn_on_debug_output(tmp_path) -> None:
    # one of the model modules fairseq's registry imports calls logging.basicConfig(level=DEBUG); scoring and
    # evaluation load fairseq in-process, after which every library's DEBUG lines (filelock's, at each unit
    # lock) went to stderr
    code = f"""
import logging
from filelock import FileLock
from mtprune.cli import _setup_logging
_setup_logging(0, False)
import fairseq.models  # noqa
with FileLock({str(tmp_path / "x.lock")!r}):
    pass
logging.getLogger("mtprune").info("progress line")
logging.getLogger("somelib").warning("a library's warning")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "progress line" in p.stderr and "somelib: a library's warning" in p.stderr
    assert "DEBUG" not in p.stderr and "filelock" not in p.stderr, p.stderr[-2000:]
