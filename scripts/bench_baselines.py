"""How the ``base_*`` columns' cost grows with the corpus: `mtprune score --baselines 0/1` (every training pair, the
work a cluster's baselines array splits) on bench_scale's synthetic corpus at two or more sizes.

Per size: wall and CPU seconds, peak RSS of the process tree, bytes per pair of what it keeps (the columns'
parquet and the word-alignment models in 04_score/shards), seconds per 100k pairs, and the seconds of each filter
from the stage's log line. The last line:

    RESULT per_pair_ratio=<largest size's s per pair / smallest's> peak_rss_gb=<y> bytes_per_pair=<z>

    .venv/bin/python scripts/bench_baselines.py --pairs 100000,1000000

Run it alone on the machine: a second job on the same cores changes every time it reports.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import config, folder_bytes, run_stage  # noqa: E402


def sizes_and_workdir(description: str, workdir: str) -> tuple[list[int], Path]:
    """The ``--pairs`` sizes (ascending) and a fresh ``--workdir`` of a benchmark over the synthetic corpus."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--pairs", default="100000,1000000", help="corpus sizes (training pairs in all), comma-separated")
    ap.add_argument("--workdir", default=workdir, help="run directories go here (removed first)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return sorted(int(x) for x in args.pairs.split(",")), work


def baselines_of(work: Path, n: int) -> tuple[Path, Path, dict]:
    """Download and prepare ``n`` synthetic pairs under ``work``, then their ``base_*`` columns as one slice
    (`score --baselines 0/1`): the run folder, its log and the slice's measurement (``bench_scale.run_stage``)."""
    cfg_path = work / f"bench-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(n), sort_keys=False))
    run_dir, log = work / f"run-{n}", work / f"log-{n}.txt"
    for stage in ("download", "prepare"):
        run_stage(stage, cfg_path, run_dir, log)
    return run_dir, log, run_stage("score", cfg_path, run_dir, log, ("--baselines", "0/1"))


def main() -> None:
    sizes, work = sizes_and_workdir(__doc__.split("\n\n")[0], "/tmp/mtprune-bench-baselines")
    rows = {}
    for n in sizes:
        run_dir, log, r = baselines_of(work, n)
        r["bytes"] = folder_bytes(run_dir / "04_score" / "shards")
        line = [ln for ln in log.read_text().splitlines() if "baselines shard" in ln][-1]
        r["filters"] = dict(re.findall(r"(base_\w+) ([0-9.]+)s", line))
        rows[n] = r
        print(f"{n:>9,} pairs: {r['wall']:7.1f} s wall {r['cpu']:7.1f} s CPU {r['rss'] / 2**30:5.2f} GB RSS "
              f"{r['bytes'] / n:6.1f} bytes a pair {r['wall'] / n * 1e5:6.2f} s per 100k  "
              + " ".join(f"{k[5:]} {v}s" for k, v in r["filters"].items()), flush=True)
        shutil.rmtree(run_dir / "02_prepare" / "data-bin", ignore_errors=True)
    lo, hi = sizes[0], sizes[-1]
    ratio = (rows[hi]["wall"] / hi) / (rows[lo]["wall"] / lo)
    print(f"RESULT per_pair_ratio={ratio:.2f} peak_rss_gb={max(r['rss'] for r in rows.values()) / 2**30:.2f} "
          f"bytes_per_pair={rows[hi]['bytes'] / hi:.0f}")


if __name__ == "__main__":
    main()
