"""``walstate bench``: walstate beside sqlite3, py-lmdb, RocksDB, LevelDB and raw
Python loops on this machine (``runner``), through one set of peer adapters
(``peers``), reported as tables and a plot (``report``)."""

from .runner import TARGETS, WORKLOAD_KEYS, Data, Sizes, main, python_replay

__all__ = ["TARGETS", "WORKLOAD_KEYS", "Data", "Sizes", "main", "python_replay"]
