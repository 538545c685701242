"""The scoring room: the pass over the training pairs (``forward``), its shards (``shards``), and the columns
computed after the merge (``derived``, ``proto``, ``dual``), the ``group`` selection on the gradient sketch and
summary statistics (``stats``). Engines: they import config and the bottom floor, never a stage (see
docs/architecture.md)."""
