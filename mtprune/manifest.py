"""Manifests: how each stage's artifacts were made, and whether they are still fresh.

A stage is fresh when its manifest exists, every setting it read while it ran still has the
recorded value, every upstream stage is fresh and its recorded output digest equals what this
stage consumed, and its own outputs still have their recorded sha256. Like git and DVC, the hash is
cached under the file's size and mtime: a file whose size changed is changed, a file whose mtime
changed is rehashed, and ``verify`` rehashes every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .faults import crash_point


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def open_atomic(path: Path) -> Iterator[TextIO]:
    """A text file written under a temp name and renamed into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    f = open(tmp, "w", encoding="utf-8", newline="\n")
    try:
        yield f
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Stream lines (newline added to each) into a temp file, then rename it into place."""
    with open_atomic(path) as f:
        for line in lines:
            f.write(line + "\n")


def temp_path(path: Path) -> Path:
    """A sibling temp name to write into before ``os.replace(tmp, path)``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def describe_outputs(root: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Fingerprint files (and every file under folders) relative to the stage folder."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        else:
            files.append(p)
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        st = f.stat()
        entry: dict[str, Any] = {"sha256": file_sha256(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.suffix in (".ids", ".tasks", ".tsv", ".hyp") or f.parent.name in ("spm",) or _is_text_split(f):
            entry["lines"] = count_lines(f)
        out[str(f.relative_to(root))] = entry
    return out


def input_fingerprint(path: Path) -> dict[str, Any] | str:
    """Size, mtime (ns) and sha256 of an input file from outside the run directory (a plain-text source,
    a ``local:`` copy, an extra test set); ``missing`` when there is none."""
    try:
        st = path.stat()
        if not path.is_file():
            return "missing"
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    except (FileNotFoundError, NotADirectoryError):
        return "missing"


def input_changed(path: Path, recorded: Any, rehash: bool = False) -> bool:
    """Whether the input file at ``path`` differs from its ``recorded`` fingerprint. As for outputs, the
    sha256 is cached under size and mtime: a file with its recorded size and mtime (ns) is taken as
    unchanged unless ``rehash``; otherwise its content decides (a file only touched is unchanged).

    A fingerprint written by an older mtprune (``size:mtime`` in whole seconds) is compared as it was then."""
    try:
        st = path.stat()
        present = path.is_file()
    except (FileNotFoundError, NotADirectoryError):
        present = False
    if not isinstance(recorded, dict):
        if not present:
            return recorded != "missing"
        return recorded != f"{st.st_size}:{int(st.st_mtime)}"
    if not present:
        return True
    if st.st_size != recorded.get("bytes"):
        return True
    if st.st_mtime_ns == recorded.get("mtime_ns") and not rehash:
        return False
    return file_sha256(path) != recorded.get("sha256")


def input_changes(recorded: dict[str, Any], now: set[str], rehash: bool = False) -> list[str]:
    """Input files from outside the run that changed since their ``recorded`` fingerprints were taken, ``now``
    being the files the stage reads today; each with how: ``edited``, ``missing``, ``new`` (a file a local copy
    gained) or ``no longer read``, so that `status` names the file rather than a setting."""
    out = []
    for f in sorted(set(recorded) | now):
        if f not in recorded:
            out.append(f"{f} (new)")
            continue
        changed = input_changed(Path(f), recorded[f], rehash)
        if f in now and not changed:
            continue
        if changed and not Path(f).is_file():
            out.append(f"{f} (missing)")
        else:
            out.append(f"{f} ({'edited' if f in now else 'no longer read'})")
    return out


def _is_text_split(f: Path) -> bool:
    return f.stem in ("train", "valid", "test") and len(f.suffix) in (3, 4) and f.suffix != ".bin"


@dataclass
class Manifest:
    data: dict[str, Any]

    @property
    def outputs_digest(self) -> str:
        return self.data["outputs_digest"]

    @property
    def stats(self) -> dict[str, Any]:
        return self.data.get("stats", {})

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest at ``path``; None when it is absent, unreadable or not a whole manifest."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not _well_formed(data):
            return None
        return cls(data)


def _well_formed(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    if not isinstance(data.get("outputs_digest"), str) or not isinstance(data.get("inputs"), dict):
        return False
    outputs = data.get("outputs")
    if not isinstance(outputs, dict):
        return False
    return all(isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
               for e in outputs.values())


def build_manifest(stage: str, config: dict[str, Any], params: dict[str, Any], inputs: dict[str, str | None],
                   stage_dir: Path, outputs: list[Path], stats: dict[str, Any], started: float) -> Manifest:
    """``config``: the stage's own sections, for people; ``params``: every setting it read (dotted
    key -> value, speed-only settings left out), which is what freshness compares."""
    described = describe_outputs(stage_dir, outputs)
    return Manifest({
        "stage": stage,
        "mtprune_version": __version__,
        "versions": _versions(),
        "config": config,
        "config_hash": json_hash(config),
        "params": params,
        "inputs": inputs,
        "outputs": described,
        "outputs_digest": json_hash({k: v["sha256"] for k, v in described.items()}),
        "stats": stats,
        "started": _iso(started),
        "finished": _iso(time.time()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    })


def write_manifest(path: Path, manifest: Manifest) -> None:
    atomic_write_text(path, json.dumps(manifest.data, indent=2, sort_keys=False) + "\n")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "fairseq-fixed", "sentencepiece", "sacrebleu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def check_outputs(stage_dir: Path, manifest: Manifest, rehash: bool = False) -> list[str]:
    """Problems with a stage's recorded outputs: missing, resized, or changed content.

    A file with its recorded size and mtime is taken as unchanged (the sha256 cache key, as in
    git); one whose mtime moved is rehashed; ``rehash`` rehashes every file.
    """
    problems = []
    for rel, entry in manifest.data.get("outputs", {}).items():
        p = stage_dir / rel
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{rel} is missing")
            continue
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif st.st_size != entry["bytes"]:
            problems.append(f"{rel} changed size ({st.st_size} bytes, recorded {entry['bytes']})")
        elif (rehash or st.st_mtime_ns != entry.get("mtime_ns")) and file_sha256(p) != entry["sha256"]:
            problems.append(f"{rel} changed since it was written")
    return problems
