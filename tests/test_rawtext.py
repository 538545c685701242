"""Reading the score table's raw text by line from memory-mapped download files (mtprune/scoring/rawtext.py), the
base_* columns computed in chunks from it, and the pyarrow path of the derived columns: the same values as the
whole-list and pandas paths they replace at scale."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_baselines import toy_corpus
from test_derived import fake_run

from mtprune.config import load_config
from mtprune.errors import UsageError
from mtprune.layout import RunLayout
from mtprune.scoring import baselines, derived, rawtext
from mtprune.textio import read_lines


@pytest.mark.parametrize("block", [1 << 24, 3])
def test_line_starts_of_terminated_unterminated_empty_and_blank_lines(monkeypatch, block: int) -> None:
    monkeypatch.setattr(rawtext, "_BLOCK", block)  # newlines found across block edges too
    assert rawtext.line_starts(b"a\nbb\n").tolist() == [0, 2, 5]
    assert rawtext.line_starts(b"a\nbb").tolist() == [0, 2, 5]  # a last line without its newline
    assert rawtext.line_starts(b"").tolist() == [0]
    assert rawtext.line_starts(b"\n\nxyz\n").tolist() == [0, 1, 2, 6]


def test_text_file_lines_are_read_lines_lines(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    lines = ["Grüße aus Köln", "", "naïve café – “quoted”", "日本語の文", "last"]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    f = rawtext.TextFile(p)
    try:
        assert len(f) == len(read_lines(p)) and [f.line(i) for i in range(len(f))] == read_lines(p)
    finally:
        f.close()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    f = rawtext.TextFile(empty)
    assert len(f) == 0
    f.close()


def two_pair_run(root: Path) -> tuple[RunLayout, dict[str, list]]:
    """A download of two pairs, and score-table columns whose rows are out of line order, both directions."""
    layout = RunLayout(root)
    text = {"de-en": (["eins", "zwei", "drei", "vier"], ["one", "two", "three", "four"]),
            "en-it": (["red", "green", "blue"], ["rosso", "verde", "blu"])}
    for pair, (a, b) in text.items():
        d = layout.pair_dir(pair)
        d.mkdir(parents=True)
        la, lb = pair.split("-")
        (d / f"train.{la}").write_text("\n".join(a) + "\n", encoding="utf-8")
        (d / f"train.{lb}").write_text("\n".join(b) + "\n", encoding="utf-8")
        # ids that do not sort in line order
        (d / "train.ids").write_text("".join(f"{pair}/{k}\n" for k in (30, 4, 100, 7)[:len(a)]), encoding="utf-8")
    cols = {"pair": ["en-it", "de-en", "de-en", "en-it", "de-en", "de-en"],
            "direction": ["it-en", "de-en", "en-de", "en-it", "de-en", "en-de"],
            "sentence_id": ["en-it/100", "de-en/7", "de-en/30", "en-it/30", "de-en/4", "de-en/7"]}
    return layout, cols


def test_row_text_gives_each_rows_source_and_target_in_any_row_order(tmp_path: Path) -> None:
    layout, cols = two_pair_run(tmp_path)
    want = [("blu", "blue"), ("vier", "four"), ("one", "eins"), ("red", "rosso"), ("zwei", "two"), ("four", "vier")]
    for given in (cols, {k: pa.chunked_array([pa.array(v[:2]), pa.array(v[2:])]) for k, v in cols.items()}):
        with rawtext.RowText(layout, given["pair"], given["direction"], given["sentence_id"]) as text:
            assert len(text) == 6
            assert list(text.pairs(range(6))) == want
            assert list(text.pairs(np.array([5, 0, 5]))) == [want[5], want[0], want[5]]
            assert [text.direction_names[c] for c in text.direction_codes] == cols["direction"]


def test_row_text_names_a_sentence_the_download_lacks_and_a_short_text_file(tmp_path: Path) -> None:
    layout, cols = two_pair_run(tmp_path)
    cols["sentence_id"][3] = "en-it/8"
    with pytest.raises(UsageError, match="en-it/train.ids: has no sentence 'en-it/8' of the score table"):
        rawtext.RowText(layout, cols["pair"], cols["direction"], cols["sentence_id"])
    layout, cols = two_pair_run(tmp_path / "b")
    (layout.pair_dir("de-en") / "train.en").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"train.en: 2 lines but .*train.ids has 4 ids"):
        rawtext.RowText(layout, cols["pair"], cols["direction"], cols["sentence_id"])


def test_baselines_in_chunks_equal_the_whole_corpus_at_once(tmp_path: Path, monkeypatch) -> None:
    src, tgt, _ = toy_corpus(120, 10)
    src[5], tgt[9] = "Das ist ein Haus.", ""  # language id and an empty side among them
    dirs = ["en-de"] * 60 + ["de-en"] * 60
    whole = baselines.compute(src, tgt, dirs, tmp_path)
    monkeypatch.setattr(baselines, "CHUNK", 7)
    chunked = baselines.compute(src, tgt, dirs, tmp_path)
    for c in baselines.COLUMNS:
        np.testing.assert_array_equal(chunked[c], whole[c], err_msg=c)
        assert np.isfinite(chunked[c]).all(), c


def test_the_streamed_cache_key_is_the_key_of_the_rows_text(monkeypatch) -> None:
    """The key hashes what each direction's word-alignment models are fitted on, then every row's id, direction and
    text in row order."""
    from mtprune.scoring import wordalign

    src, tgt, _ = toy_corpus(50, 5)
    ids, dirs = [f"x/{i}" for i in range(50)], ["en-de", "de-en"] * 25
    h = hashlib.sha256(f"mtprune-baselines-{baselines.VERSION}\n".encode())
    for d in ("de-en", "en-de"):
        rows = [i for i in range(50) if dirs[i] == d]
        h.update(f"wordalign {wordalign.sample_digest([(src[i], tgt[i]) for i in rows])}\n".encode())
    for row in zip(ids, dirs, src, tgt, strict=True):
        h.update("\t".join(row).encode("utf-8") + b"\n")
    monkeypatch.setattr(baselines, "CHUNK", 8)
    assert baselines.text_key(ids, dirs, src, tgt) == h.hexdigest()
    tgt[49] += " v1x"
    assert baselines.text_key(ids, dirs, src, tgt) != h.hexdigest()


def test_derived_columns_on_a_pyarrow_table_equal_the_pandas_path(tmp_path: Path) -> None:
    layout, df = fake_run(tmp_path)
    cfg = load_config(None, [])
    out = derived.add_columns(df, cfg, layout)  # computes the baselines and caches them
    table = derived.add_columns_table(pa.Table.from_pandas(df, preserve_index=False), cfg, layout)
    assert table.column_names == list(out.columns)
    for c in out.columns:
        if c not in ("sentence_id", "pair", "direction"):
            np.testing.assert_array_equal(table.column(c).to_numpy(), out[c].to_numpy(), err_msg=c)
    again = derived.add_columns_table(table, cfg, layout)  # run on its own output: replaced, not duplicated
    assert again.column_names == table.column_names


def test_a_disk_table_reads_columns_across_files_and_writes_them_with_the_appended_ones(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    import pyarrow.parquet as pq

    from mtprune.scoring.disktable import DiskTable

    parts = [pa.table({"index": np.arange(lo, hi), "pair": ["de-en"] * (hi - lo), "el2n": np.linspace(0, 1, hi - lo)})
             for lo, hi in ((0, 5), (5, 12), (12, 12))]  # the last shard has no rows
    paths = []
    for k, t in enumerate(parts):
        paths.append(tmp_path / f"shard-{k}.parquet")
        pq.write_table(t, paths[-1])
    whole = pa.concat_tables(parts[:2])  # the empty shard types its strings as null: concat_tables refuses it
    table = DiskTable(paths)
    assert table.num_rows == 12 and table.column_names == ["index", "pair", "el2n"]
    assert table.column("el2n").to_pylist() == whole.column("el2n").to_pylist()
    table = table.append_column("combined", pa.array(np.arange(12) * 0.5)).drop_columns(["pair"])
    assert table.column_names == ["index", "el2n", "combined"] and table.column("combined").to_pylist()[-1] == 5.5
    with pytest.raises(ValueError, match="has 3 rows, the table 12"):
        table.append_column("short", [1, 2, 3])
    monkeypatch.setattr("mtprune.scoring.disktable.ROW_GROUP", 4)  # rows of the appended column cut per batch
    out = tmp_path / "scores.parquet"
    table.write(out)
    back = pq.read_table(out)
    assert back.column_names == ["index", "el2n", "combined"]
    assert back.column("index").to_pylist() == list(range(12))
    assert back.column("combined").to_pylist() == (np.arange(12) * 0.5).tolist()
    assert back.column("el2n").to_pylist() == whole.column("el2n").to_pylist()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    pq.write_table(pa.table({"index": [1]}), tmp_path / "other.parquet")
    with pytest.raises(UsageError, match="its columns differ"):
        DiskTable([paths[0], tmp_path / "other.parquet"])
