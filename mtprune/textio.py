"""Reading the plain-text files the stages write (one sentence, id or hypothesis per line, UTF-8)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def read_lines(path: Path) -> list[str]:
    """Every line of a UTF-8 text file, without its newline."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, streamed, without their newline."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")
