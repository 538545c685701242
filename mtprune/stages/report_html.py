"""``08_report/report.html``: the sweep on one self-contained page, and a browser of the pairs each strategy dropped.

No server and no network: the plot is inlined as a PNG data URI, the pairs as JSON in a
``<script type="application/json">`` block, the script and styles in the page itself. Corpus lines are untrusted
input: the tables are escaped by ``html.escape`` and the browser's rows are set through ``textContent``; in the JSON
block every ``<``, ``>`` and ``&`` is a ``\\u`` escape, so no line can close the block or open a tag.

The page's size is bounded whatever the corpus: per pruned corpus at most ``SAMPLE`` dropped and ``SAMPLE`` kept
pairs (a seeded draw), each with a few score columns.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..layout import RunLayout
from ..manifest import atomic_write_text
from ..sources import langs
from ..textio import text_lines
from .prune import runs as pruned_runs
from .prune import score_halves

SAMPLE = 40  # dropped and kept pairs shown per pruned corpus
# the score columns shown beside each pair, where the table has them (and the column the strategy ranks by)
SHOWN = ("el2n", "nll", "combined", "base_all", "combined_all")
NOISE_ROWS = 12


def sample_rows(n_dropped: int, n_kept: int, seed: int, k: int = SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Which of a corpus's dropped and kept pairs the page shows: at most ``k`` of each, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return (np.sort(rng.permutation(n_dropped)[:k]), np.sort(rng.permutation(n_kept)[:k]))


def browser_data(cfg: Config, layout: RunLayout, df: Any, labels: dict[str, str] | None) -> dict[str, Any]:
    """The pair browser's content: per pruned corpus, its sampled dropped and kept pairs with text and scores."""
    from ..scoring.rawtext import PairText

    sid = df["sentence_id"].to_numpy()
    first = ~df["sentence_id"].duplicated().to_numpy()  # a sentence scored both ways: its first row
    corpora: list[dict[str, Any]] = []
    chosen: dict[str, list[tuple[str, int, str]]] = {}  # pair -> (sentence id, row, corpus) to read text for
    columns_of: dict[str, list[str]] = {}
    for name, strategy, _ in pruned_runs(cfg):
        path = layout.kept_ids(name)
        if not path.is_file():
            continue
        kept = {line.split("\t")[0] for line in text_lines(path)}
        member = np.fromiter((s in kept for s in sid), bool, len(sid))
        is_kept, is_dropped = member & first, ~member & first
        dropped_rows, kept_rows = np.flatnonzero(is_dropped), np.flatnonzero(is_kept)
        d, k = sample_rows(len(dropped_rows), len(kept_rows), cfg.prune.seed)
        ranked = tuple(column for column, _ in score_halves(strategy))  # both columns of a two-column strategy
        cols = [c for c in ranked + SHOWN if c in df.columns]
        columns_of[name] = list(dict.fromkeys(cols))
        corpora.append({"name": name, "strategy": strategy, "dropped": int(len(dropped_rows)),
                        "kept": int(len(kept_rows)), "columns": columns_of[name], "rows": []})
        for which, rows in (("dropped", dropped_rows[d]), ("kept", kept_rows[k])):
            for r in rows:
                chosen.setdefault(str(df["pair"].iat[r]), []).append((str(sid[r]), int(r), name + "\t" + which))
    by_name = {c["name"]: c for c in corpora}
    for pair, items in sorted(chosen.items()):
        l1, l2 = langs(pair)
        text = PairText(layout, pair)
        try:
            lines = text.lines_of([s for s, _, _ in items])
            for (s, r, where), line in zip(items, lines, strict=True):
                name, which = where.split("\t")
                scores = {c: _number(df[c].iat[r]) for c in columns_of[name]}
                by_name[name]["rows"].append({
                    "id": s, "set": which, "src": text.sides[l1].line(int(line)), "tgt": text.sides[l2].line(int(line)),
                    "label": (labels or {}).get(s, ""), **scores})
        finally:
            text.close()
    return {"corpora": corpora, "sample": SAMPLE, "labelled": labels is not None}


def _number(v: Any) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 6)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.2f}" if isinstance(v, float) else str(v))

    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
            + "</tbody></table>")


def sweep_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Per corpus (strategy, sparsity, order): BLEU and chrF of the ``all`` rows, mean ± std over seeds."""
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["pair"] == "all":
            groups.setdefault((r["strategy"], r["sparsity"], r.get("order", "shuffled")), []).append(r)
    out = []
    for (strategy, sparsity, order), g in groups.items():
        b, c = np.array([x["bleu"] for x in g], float), np.array([x["chrf"] for x in g], float)
        out.append([strategy + ("" if order == "shuffled" else f" ({order})"), sparsity, f"{b.mean():.2f} ± {b.std():.2f}",
                    f"{c.mean():.2f} ± {c.std():.2f}", len(g)])
    return out


def json_block(data: Any) -> str:
    """JSON that cannot end its <script> block or be read as markup: <, > and & as \\u escapes."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def write_page(cfg: Config, layout: RunLayout, rows: list[dict[str, Any]], df: Any,
               labels: tuple[dict[str, str], str] | None, noise: Any, path: Path) -> None:
    plot = layout.report_file("bleu_vs_sparsity.png")
    img = base64.b64encode(plot.read_bytes()).decode("ascii") if plot.is_file() else ""
    data = browser_data(cfg, layout, df, labels[0] if labels else None)
    noise_html = ""
    if noise is not None and len(noise):
        auroc = noise.pivot_table(index="score", columns="kind", values="auroc", sort=False)
        kinds = ["all"] + sorted(k for k in auroc.columns if k != "all")
        auroc = auroc[kinds].sort_values("all", ascending=False).head(NOISE_ROWS)
        noise_html = ("<h2>Which scores find the labelled noise</h2><p>AUROC against the labels in "
                      f"{html.escape(labels[1] if labels else '')}, each kind against the clean pairs (0.5: chance; "
                      f"the {NOISE_ROWS} best scores; every one in noise.csv).</p>"
                      + _table(["score", *kinds], [[s, *r] for s, r in zip(auroc.index, auroc.values.tolist(),
                                                                           strict=True)]))
    page = PAGE.format(
        title=html.escape(f"mtprune report: {layout.root}"),
        root=html.escape(str(layout.root)),
        sweep=_table(["corpus", "sparsity", "BLEU (all)", "chrF (all)", "seeds"], sweep_rows(rows)),
        plot=f'<img alt="BLEU against the fraction pruned" src="data:image/png;base64,{img}">' if img else "",
        noise=noise_html, sample=SAMPLE, data=json_block(data), script=SCRIPT)
    atomic_write_text(path, page)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; }} #pairs th {{ cursor: pointer; user-select: none; }}
#pairs td.text {{ max-width: 32em; }} tr.dropped td:first-child {{ color: #b00; }}
img {{ max-width: 720px; }} .controls > * {{ margin-right: 1em; }} #rows td:nth-child(2) {{ white-space: nowrap; }}
</style></head>
<body>
<h1>mtprune sweep</h1>
<p>Run directory: <code>{root}</code></p>
<h2>BLEU and chrF by pruned corpus</h2>
{sweep}
{plot}
{noise}
<h2>What each strategy dropped and kept</h2>
<p>A seeded sample of at most {sample} dropped and {sample} kept training pairs per pruned corpus. Click a column
to sort by it; type to search the sentences and ids.</p>
<div class="controls">
<label>Corpus <select id="corpus"></select></label>
<label>Show <select id="which"><option value="both">dropped and kept</option><option value="dropped">dropped</option>
<option value="kept">kept</option></select></label>
<label>Search <input id="search" type="search" placeholder="words or sentence id"></label>
<span id="count"></span>
</div>
<table id="pairs"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const corpusSel = document.getElementById("corpus"), whichSel = document.getElementById("which");
const search = document.getElementById("search"), head = document.getElementById("head");
const body = document.getElementById("rows"), count = document.getElementById("count");
let sortKey = null, sortDir = 1;
for (const c of DATA.corpora) {
  const o = document.createElement("option");
  o.value = c.name;
  o.textContent = `${c.name} (dropped ${c.dropped}, kept ${c.kept})`;
  corpusSel.appendChild(o);
}
function corpus() { return DATA.corpora.find(c => c.name === corpusSel.value); }
function columns(c) {
  return ["set", "id", "src", "tgt", ...c.columns, ...(DATA.labelled ? ["label"] : [])];
}
function compare(a, b) {
  const x = a[sortKey], y = b[sortKey];
  if (x === y) return 0;
  if (x === null || x === undefined) return 1;
  if (y === null || y === undefined) return -1;
  return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * sortDir;
}
function render() {
  const c = corpus();
  head.replaceChildren();
  body.replaceChildren();
  if (!c) { count.textContent = "no pruned corpus"; return; }
  for (const k of columns(c)) {
    const th = document.createElement("th");
    th.textContent = k + (k === sortKey ? (sortDir > 0 ? " \u25b2" : " \u25bc") : "");
    th.dataset.key = k;
    th.addEventListener("click", () => {
      sortDir = sortKey === k ? -sortDir : 1;
      sortKey = k;
      render();
    });
    head.appendChild(th);
  }
  const q = search.value.trim().toLowerCase(), which = whichSel.value;
  let rows = c.rows.filter(r => (which === "both" || r.set === which) &&
    (!q || [r.id, r.src, r.tgt].some(t => t.toLowerCase().includes(q))));
  if (sortKey) rows = rows.slice().sort(compare);
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.className = r.set;
    for (const k of columns(c)) {
      const td = document.createElement("td");
      const v = r[k];
      td.textContent = typeof v === "number" ? v.toFixed(3) : (v === null || v === undefined ? "" : v);
      if (k === "src" || k === "tgt") td.className = "text";
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  count.textContent = `${rows.length} of ${c.rows.length} pairs shown`;
}
corpusSel.addEventListener("change", () => { sortKey = null; render(); });
whichSel.addEventListener("change", render);
search.addEventListener("input", render);
render();
"""
