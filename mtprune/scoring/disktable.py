"""A score table kept on disk and read a column at a time: the merge of the scoring shards at any corpus size.

The merge reads a few columns of every pair (pair, direction, the scores a derived column needs), computes the
post-pass columns and writes ``scores.parquet``. Held whole in memory, the table of a 4M-pair corpus with a few
checkpoints' columns is several GB (plus its string columns); ``DiskTable`` keeps the shards' parquet files as
they are, reads a column when asked (one column of 4M pairs: 32 MB), keeps only the appended columns in memory,
and writes the result row group by row group. It offers the pieces of ``pyarrow.Table``'s interface that the
merge's steps use (``column_names``, ``schema``, ``num_rows``, ``column``, ``append_column``, ``drop_columns``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..faults import crash_point
from ..manifest import temp_path

ROW_GROUP = 100_000


class DiskTable:
    """The rows of one or more parquet files with the same columns, in file order, plus appended columns."""

    def __init__(self, paths: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.paths = list(paths)
        files = [pq.ParquetFile(p) for p in self.paths]
        # a shard without rows may type its string columns as null: it adds nothing, and is not read
        self._files = [f for f in files if f.metadata.num_rows] or files[:1]
        schema = self._files[0].schema_arrow
        for p, f in zip(self.paths, files, strict=True):
            if f.schema_arrow.names != schema.names:
                raise UsageError(f"{p}: its columns differ from {self.paths[0]}'s; delete 04_score/shards and "
                                 "score again")
        self._stored = list(schema.names)
        self._types = {f.name: f.type for f in schema}
        self._extra: dict[str, Any] = {}
        self.num_rows = sum(f.metadata.num_rows for f in self._files)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def column_names(self) -> list[str]:
        return self._stored + list(self._extra)

    @property
    def schema(self) -> Any:
        import pyarrow as pa

        return pa.schema([pa.field(n, self._types[n]) for n in self._stored]
                         + [pa.field(n, v.type) for n, v in self._extra.items()])

    def column(self, name: str) -> Any:
        """One column of every row (a pyarrow ChunkedArray), read from the files now."""
        import pyarrow as pa

        if name in self._extra:
            return pa.chunked_array([self._extra[name]])
        if name not in self._stored:
            raise KeyError(name)
        return pa.chunked_array([c for f in self._files for c in f.read(columns=[name]).column(0).chunks],
                                type=self._types[name])

    def append_column(self, name: str, values: Any) -> DiskTable:
        import pyarrow as pa

        if name in self.column_names:
            raise ValueError(f"column {name!r} already in the table")
        arr = values if isinstance(values, pa.Array) else pa.array(values)
        if len(arr) != self.num_rows:
            raise ValueError(f"column {name!r} has {len(arr)} rows, the table {self.num_rows}")
        self._extra[name] = arr
        return self

    def drop_columns(self, names: list[str]) -> DiskTable:
        for n in names:
            if n in self._extra:
                del self._extra[n]
            else:
                self._stored.remove(n)
        return self

    def write(self, path: Path) -> None:
        """Every column into one parquet file at ``path`` (atomically), ``ROW_GROUP`` rows at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.schema
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            with pq.ParquetWriter(tmp, schema) as w:
                start = 0
                for f in self._files:
                    for batch in f.iter_batches(batch_size=ROW_GROUP, columns=self._stored):
                        n = batch.num_rows
                        cols = [batch.column(i) for i in range(batch.num_columns)]
                        cols += [v.slice(start, n) for v in self._extra.values()]
                        w.write_table(pa.Table.from_arrays(cols, schema=schema))
                        start += n
            crash_point(f"write:{path.name}")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def to_pandas(self, columns: list[str] | None = None) -> Any:
        """The table, or ``columns`` of it, in pandas (one Python string per distinct value of a string column)."""
        import pandas as pd

        return pd.DataFrame({n: self.column(n).to_pandas() for n in (self.column_names if columns is None else columns)})
