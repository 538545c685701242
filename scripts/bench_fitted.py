"""How ``base_fitted``'s cost grows with the corpus: the regression fitted on synthetic noise (scoring/fitted.py), at
two or more corpus sizes of bench_scale's synthetic corpus.

Per size: download and prepare, the ``base_*`` columns of every pair (`mtprune score --baselines 0/1`, what
bench_baselines.py measures), then, in a process of its own, what the score stage's merge adds for ``base_fitted``:
``fitted.log_odds`` over those columns and the download's text (it writes nothing: the corrupted pairs are aligned
by the word-alignment models the columns were scored with). Its wall and CPU seconds, peak RSS, seconds per 100k
pairs. The last line:

    RESULT per_pair_ratio=<largest size's s per pair / smallest's> peak_rss_gb=<y>

The fit's own work is bounded (``fitted.SAMPLE`` corrupted pairs and ``FIT_ROWS`` rows a direction); what grows is
the percentiles and the regression's pass over every row.

    .venv/bin/python scripts/bench_fitted.py --pairs 100000,1000000

Run it alone on the machine: a second job on the same cores changes every time it reports.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_baselines import baselines_of, sizes_and_workdir  # noqa: E402
from bench_scale import ROOT, measure  # noqa: E402

FIT = """
import sys, time
import pyarrow.parquet as pq
import pyarrow.compute as pc
from pathlib import Path
from mtprune.layout import RunLayout
from mtprune.scoring import baselines, fitted
from mtprune.scoring.rawtext import RowText
run = Path(sys.argv[1])
layout = RunLayout(run)
t = pq.read_table(run / "04_score" / "shards" / "baselines-0000-of-0001.parquet")
sid = t.column("sentence_id")
pair = pc.list_element(pc.split_pattern(sid, "/"), 0)
base = {c: t.column(c).to_numpy() for c in baselines.COLUMNS}
t0 = time.time()
with RowText(layout, pair, t.column("direction"), sid) as text:
    odds = fitted.log_odds(text, text.direction_codes, text.direction_names, base, layout.baseline_cache.parent)
print(f"fitted {len(odds)} rows in {time.time() - t0:.1f} s")
"""


def main() -> None:
    sizes, work = sizes_and_workdir(__doc__.split("\n\n")[0], "/tmp/mtprune-bench-fitted")
    rows = {}
    for n in sizes:
        run_dir, log, _ = baselines_of(work, n)
        r = measure([sys.executable, "-c", FIT, str(run_dir)], log, cwd=ROOT)
        if r["code"] != 0:
            raise SystemExit(f"bench_fitted: fitting base_fitted exited with {r['code']}; see {log}")
        rows[n] = r
        print(f"{n:>9,} pairs: {r['wall']:7.1f} s wall {r['cpu']:7.1f} s CPU {r['rss'] / 2**30:5.2f} GB RSS "
              f"{r['wall'] / n * 1e5:6.2f} s per 100k", flush=True)
        shutil.rmtree(run_dir / "02_prepare" / "data-bin", ignore_errors=True)
    lo, hi = sizes[0], sizes[-1]
    ratio = (rows[hi]["wall"] / hi) / (rows[lo]["wall"] / lo)
    print(f"RESULT per_pair_ratio={ratio:.2f} peak_rss_gb={max(r['rss'] for r in rows.values()) / 2**30:.2f}")


if __name__ == "__main__":
    main()
