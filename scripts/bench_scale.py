"""How each stage's cost grows with the corpus: the whole pipeline at several corpus sizes, stage by stage.

Every stage runs as its own `python -m mtprune <stage>` process on the synthetic corpus (four language pairs,
``--pairs`` training pairs in all), with a tiny model and fixed update counts, so that what grows with the
corpus is the data work, not the model's. Per stage and size: wall time, CPU seconds (the process and every
child it waited for), peak RSS of the whole process tree (sampled from /proc every 0.1 s), bytes the stage
left in its folder, and seconds per 100k pairs. The last line:

    RESULT worst_per_pair_ratio=<x> worst_stage=<name> peak_rss_gb=<y> score_disk_bytes_per_pair=<z>

``worst_per_pair_ratio``: over the stages, the largest ratio of wall seconds per pair at the largest size to
that at the smallest (1.0: cost grows linearly with the corpus; the model-bound stages, proxy and train, fall
below 1 since their updates are fixed). ``peak_rss_gb``: the largest tree RSS of any stage at any size.
``score_disk_bytes_per_pair``: 04_score's bytes per training pair at the largest size.

    .venv/bin/python scripts/bench_scale.py --pairs 20000,200000
    .venv/bin/python scripts/bench_scale.py --pairs 50000,1000000 --workdir /scratch/bench
    .venv/bin/python scripts/bench_scale.py --pairs 20000,200000 --target   # with the domain columns

Run it alone on the machine: a second job on the same cores changes every time it reports. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "proxy", "score", "prune", "train", "evaluate", "report", "export")
PAIRS = ("de-en", "en-es", "en-fr", "en-it")
PAGE = os.sysconf("SC_PAGE_SIZE")


def config(pairs: int, target: bool = False) -> dict:
    """The benchmark's config: the corpus grows, the model and its updates do not. With ``target``, the domain
    columns too (``score.target.split: valid``, pruned by ``domain_combined-high``)."""
    out = {
        "download": {"source": "synthetic", "pairs": list(PAIRS), "synthetic_train_per_pair": pairs // len(PAIRS),
                     "max_valid_per_pair": 100, "max_test_per_pair": 50},
        "prepare": {"vocab_size": 1000},
        "model": {"encoder_layers": 1, "decoder_layers": 1, "embed_dim": 32, "ffn_dim": 64, "attention_heads": 2},
        "proxy": {"seeds": [1], "checkpoints": [20], "warmup_updates": 5, "max_tokens": 2048},
        "prune": {"sparsities": [0.2], "strategies": ["el2n-high"]},
        "train": {"include_full": False, "max_update": 20, "warmup_updates": 5, "max_tokens": 2048},
        "evaluate": {"beam": 1},
    }
    if target:
        out["score"] = {"target": {"split": "valid"}}
        out["prune"]["strategies"] = ["el2n-high", "domain_combined-high"]
    return out


def tree_rss(root_pid: int) -> int:
    """Resident bytes of ``root_pid`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid = int(d.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * PAGE
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def folder_bytes(path: Path) -> int:
    """Bytes on disk under ``path``, a file with several links (the merged sketch of one shard) counted once."""
    seen: dict[tuple[int, int], int] = {}
    for f in path.rglob("*") if path.is_dir() else []:
        if f.is_file():
            st = f.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def run_stage(stage: str, cfg_path: Path, run_dir: Path, log: Path, extra: tuple[str, ...] = ()) -> dict:
    r = measure([sys.executable, "-m", "mtprune", stage, "-c", str(cfg_path), "--run-dir", str(run_dir), *extra], log)
    if r["code"] != 0:
        raise SystemExit(f"bench_scale: `mtprune {stage}` exited with {r['code']}; see {log}")
    return r


def measure(argv: list[str], log: Path, cwd: Path = ROOT) -> dict:
    """Run ``argv`` (output appended to ``log``): its wall and CPU seconds (with its children), the peak RSS of its
    process tree, its exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as out:
        p = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        peak = [0]

        def sample() -> None:
            while p.poll() is None:
                peak[0] = max(peak[0], tree_rss(p.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = p.wait()
        sampler.join()
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "rss": peak[0], "code": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="20000,200000", help="corpus sizes (training pairs in all), comma-separated")
    ap.add_argument("--workdir", default="/tmp/mtprune-bench-scale", help="run directories go here (removed first)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--target", action="store_true",
                    help="also the domain columns (score.target: the valid split), pruned by domain_combined-high")
    args = ap.parse_args()
    sizes = sorted(int(x) for x in args.pairs.split(","))
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[int, dict[str, dict]] = {}
    for n in sizes:
        cfg_path = work / f"bench-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(n, args.target), sort_keys=False))
        run_dir = work / f"run-{n}"
        results[n] = {}
        for stage in STAGES:
            r = run_stage(stage, cfg_path, run_dir, work / f"log-{n}.txt")
            folder = next(run_dir.glob(f"[0-9][0-9]_{stage}"), None)
            r["bytes"] = folder_bytes(folder) if folder else 0
            results[n][stage] = r
            print(f"{n:>9,} pairs  {stage:<9} {r['wall']:8.1f} s wall {r['cpu']:8.1f} s CPU "
                  f"{r['rss'] / 2**30:6.2f} GB RSS {r['bytes'] / 2**20:9.1f} MB", flush=True)
        if not args.keep and n != sizes[-1]:
            shutil.rmtree(run_dir, ignore_errors=True)

    print()
    head = ["stage"] + [f"{n:,} pairs: s / CPU-s / GB / MB / s per 100k" for n in sizes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for stage in STAGES:
        cells = [f"{r['wall']:.1f} / {r['cpu']:.1f} / {r['rss'] / 2**30:.2f} / {r['bytes'] / 2**20:.1f} / "
                 f"{r['wall'] / n * 1e5:.1f}" for n in sizes for r in [results[n][stage]]]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    small, large = sizes[0], sizes[-1]
    ratios = {s: (results[large][s]["wall"] / large) / (results[small][s]["wall"] / small) for s in STAGES}
    worst = max(ratios, key=ratios.get)
    peak = max(r["rss"] for per in results.values() for r in per.values())
    disk = results[large]["score"]["bytes"] / large
    print()
    print("per-pair cost ratio, largest over smallest size: "
          + ", ".join(f"{s} {ratios[s]:.2f}" for s in STAGES))
    print(f"RESULT worst_per_pair_ratio={ratios[worst]:.2f} worst_stage={worst} peak_rss_gb={peak / 2**30:.2f} "
          f"score_disk_bytes_per_pair={disk:.0f}")
    if not args.keep:
        shutil.rmtree(work / f"run-{large}", ignore_errors=True)


if __name__ == "__main__":
    main()
