"""How `group` selection's cost grows with the corpus: time, memory and quality at sizes 10x apart.

`group` (mtprune/scoring/group.py) picks the k pairs whose summed gradient sketch has the smallest norm. Up to
``CHUNK_ROWS`` pairs it runs one pooled greedy plus swaps over all rows, whose rounds each scan every row (cost
~ n^2); above, it selects by parts of ``CHUNK_ROWS`` rows and exchanges across them (cost ~ n). This benchmark
stores a float16 sketch (the score stage's format) as a memory-mapped .npy, and times, each in a fresh process:

- ``parts``: the selection as the prune stage runs it, at every ``--rows`` size;
- ``whole``: one part whatever the size (what every size cost before the parts), at the ``--whole-rows`` sizes.

Per run: wall seconds, seconds per 100k rows, peak anonymous memory of the process (sampled every 0.05 s; the
memory-mapped sketch's file pages are not counted, the OS can drop them; with ``--workers`` above 1, the
workers' memory is not counted either), and the norm of the chosen set's
summed sketch against a random set's of the same size. Last line:

    RESULT parts_per_row_ratio=<x> whole_per_row_ratio=<y> parts_vs_random_norm=<z> peak_anon_gb=<g>

(ratios: seconds per row at the largest size over the smallest; 1.0 = linear).

    .venv/bin/python scripts/bench_group.py                               # 40k, 400k, 4M rows x 256
    .venv/bin/python scripts/bench_group.py --rows 20000,200000 --whole-rows 20000,200000
    .venv/bin/python scripts/bench_group.py --sketch runs/<run>/04_score/grad_sketch.npy --rows 50000,500000

Run it alone on the machine (it is single-threaded by design; a second job changes its times).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, threading, time
import numpy as np
from mtprune.scoring.group import group_norm, group_select

path, k, seed, chunk, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
x = np.load(path, mmap_mode="r")
t = time.perf_counter()
got = group_select(x, k, seed, workers=workers, **({} if chunk <= 0 else {"chunk_rows": chunk}))
seconds = time.perf_counter() - t
done.set()
rng = np.random.default_rng(seed)
rand = float(np.median([group_norm(x, np.sort(rng.choice(len(x), k, replace=False))) for _ in range(3)]))
print(json.dumps({"seconds": seconds, "peak_anon": peak[0], "norm": group_norm(x, got), "random_norm": rand,
                  "k": int(len(got))}))
"""


def make_sketch(path: Path, rows: int, dim: int, source: Path | None, seed: int) -> None:
    """A float16 sketch of ``rows`` rows: a seeded random sample of the rows of ``source``, kept in file order (the
    first rows of a corpus are one language pair: the selection's cost depends on the mix, which a sample keeps),
    or Gaussian rows of log-normal scale; written block by block (no full-size array in memory)."""
    if source is not None:
        src = np.load(source, mmap_mode="r")
        if len(src) < rows:
            sys.exit(f"bench_group: {source} has {len(src)} rows, fewer than {rows}")
        take = np.sort(np.random.default_rng(seed).choice(len(src), rows, replace=False))
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, src.shape[1]))
        for a in range(0, rows, 100_000):
            out[a:a + 100_000] = src[take[a:a + 100_000]]
    else:
        rng = np.random.default_rng(seed)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
        for a in range(0, rows, 100_000):
            b = min(rows, a + 100_000)
            out[a:b] = rng.normal(size=(b - a, dim)) * rng.lognormal(0, 0.5, size=(b - a, 1))
    out.flush()
    del out


def run(path: Path, k: int, seed: int, chunk: int, workers: int) -> dict:
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), str(k), str(seed), str(chunk), str(workers)], cwd=root,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"bench_group: the selection failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="40000,400000,4000000", help="sketch rows for the by-parts selection")
    ap.add_argument("--whole-rows", default="40000,400000",
                    help="sketch rows for the one-part selection (its cost grows with the square; keep them small)")
    ap.add_argument("--dim", type=int, default=256, help="sketch width (the score stage's is 256)")
    ap.add_argument("--sparsity", type=float, default=0.2, help="fraction of the rows to choose")
    ap.add_argument("--sketch", type=Path, help="take a seeded sample of the rows of this .npy sketch instead of Gaussian rows")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes the parts are selected in (1: the cost per row of one CPU; the prune stage "
                         "uses every usable CPU)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the sketches are written (default: a temp dir)")
    args = ap.parse_args()
    parts = sorted(int(x) for x in args.rows.split(",") if x)
    whole = sorted(int(x) for x in args.whole_rows.split(",") if x)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in sorted(set(parts) | set(whole)):
            path = Path(tmp) / f"sketch-{n}.npy"
            make_sketch(path, n, args.dim, args.sketch, args.seed)
            k = round(args.sparsity * n)
            for mode, sizes, chunk in (("whole", whole, n), ("parts", parts, 0)):
                if n not in sizes:
                    continue
                r = results[(mode, n)] = run(path, k, args.seed, chunk, args.workers)
                print(f"{mode:<5} {n:>10,} rows x {args.dim}  k={k:,}  {r['seconds']:8.1f} s  "
                      f"{r['seconds'] / n * 1e5:7.2f} s per 100k  {r['peak_anon'] / 2**30:5.2f} GB anon  "
                      f"norm {r['norm']:.1f} (random {r['random_norm']:.1f})", flush=True)
            path.unlink()

    def ratio(mode: str, sizes: list[int]) -> float:
        if len(sizes) < 2:
            return float("nan")
        a, b = results[(mode, sizes[0])], results[(mode, sizes[-1])]
        return (b["seconds"] / sizes[-1]) / (a["seconds"] / sizes[0])

    big = results[("parts", parts[-1])] if parts else None
    peak = max(r["peak_anon"] for r in results.values())
    quality = big["norm"] / big["random_norm"] if big else float("nan")
    print(f"RESULT parts_per_row_ratio={ratio('parts', parts):.2f} whole_per_row_ratio={ratio('whole', whole):.2f} "
          f"parts_vs_random_norm={quality:.2g} peak_anon_gb={peak / 2**30:.2f}")


if __name__ == "__main__":
    main()
