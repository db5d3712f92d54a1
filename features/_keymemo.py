"""Content keys of files, remembered by each file's identity and status.

Once every row is in the store, a repeated extraction (a rerun, each fit of
a grid search) spends nearly all its time reading and hashing the files
again to learn their keys. A file whose device, inode, size, modification
time and status-change time are all unchanged holds the same bytes, so its
key can be reused, as version control systems do for their work trees. The
status-change time (``st_ctime_ns``) cannot be set back by a user: touching,
writing, renaming over or changing the permissions of a file all move it.

Keys are remembered in this process and, beside a store ``features.h5``,
in the SQLite file ``features.h5.keys``. A file modified within
:data:`SETTLE_SECONDS` of its hashing is not remembered: on file systems
with coarse timestamps a second change in the same tick would look like
none. The memo is an optimisation only: if its file cannot be opened or
written, keys are computed as if it were absent.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["KeyMemo"]

logger = logging.getLogger(__name__)

#: A file changed less than this long before it was hashed is not remembered.
SETTLE_SECONDS = 2.0
#: Entries kept in a process before the oldest half is dropped.
MAX_IN_MEMORY = 500_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_keys (
    path TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    key TEXT NOT NULL
)
"""

_MEMORY: dict[str, tuple[str, str]] = {}
_MEMORY_LOCK = threading.Lock()


def _status(path: str) -> str | None:
    """The file's identity and times as one string, or None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _settled(status: str, now_ns: int) -> bool:
    mtime, ctime = (int(part) for part in status.split(":")[3:])
    return max(mtime, ctime) < now_ns - SETTLE_SECONDS * 1e9


class KeyMemo:
    """Remembered content keys of files, checked against each file's status.

    Parameters
    ----------
    path : path-like, optional
        The SQLite file that keeps keys between processes; None keeps them
        in this process only.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._broken = False

    def __repr__(self) -> str:
        return f"KeyMemo({None if self.path is None else str(self.path)!r})"

    def keys(
        self,
        items: Sequence[Any],
        compute: Callable[[Any], Any],
        threads: int = 1,
    ) -> list[Any]:
        """``compute(item)`` for each item, reusing remembered keys of files.

        ``compute`` returns a key or an exception instance for an input that
        cannot be read; only keys are remembered. Items that are not paths
        (bytes) are always computed.
        """
        out: list[Any] = [None] * len(items)
        paths: dict[int, tuple[str, str]] = {}
        for position, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                path = os.path.abspath(os.fspath(item))
                status = _status(path)
                if status is not None:
                    paths[position] = (path, status)
        known = self._recall({path for path, _ in paths.values()})
        todo = []
        for position in range(len(items)):
            if position in paths:
                path, status = paths[position]
                if known.get(path, (None, None))[0] == status:
                    out[position] = known[path][1]
                    continue
            todo.append(position)

        now_ns = time.time_ns()
        computed = []
        if todo:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                computed = list(pool.map(compute, [items[i] for i in todo]))
        learnt = {}
        for position, value in zip(todo, computed, strict=True):
            out[position] = value
            if position in paths and isinstance(value, str):
                path, status = paths[position]
                if _settled(status, now_ns):
                    learnt[path] = (status, value)
        self._remember(learnt)
        return out

    # ----------------------------------------------------------- storage

    def _recall(self, paths: set[str]) -> dict[str, tuple[str, str]]:
        with _MEMORY_LOCK:
            found = {path: _MEMORY[path] for path in paths if path in _MEMORY}
        missing = sorted(paths - set(found))
        if missing and self.path is not None and self.path.exists():
            rows = self._query(missing)
            with _MEMORY_LOCK:
                _MEMORY.update(rows)
            found.update(rows)
        return found

    def _query(self, paths: list[str]) -> dict[str, tuple[str, str]]:
        rows: dict[str, tuple[str, str]] = {}
        try:
            with self._connect() as db:
                for start in range(0, len(paths), 500):
                    chunk = paths[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    query = (
                        "SELECT path, status, key FROM file_keys "
                        f"WHERE path IN ({marks})"
                    )
                    for path, status, key in db.execute(query, chunk):
                        rows[path] = (status, key)
        except sqlite3.Error as exc:
            self._give_up(exc)
        return rows

    def _remember(self, learnt: dict[str, tuple[str, str]]) -> None:
        if not learnt:
            return
        with _MEMORY_LOCK:
            if len(_MEMORY) + len(learnt) > MAX_IN_MEMORY:
                for path in list(_MEMORY)[: len(_MEMORY) // 2]:
                    del _MEMORY[path]
            _MEMORY.update(learnt)
        if self.path is None or self._broken:
            return
        try:
            with self._connect() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO file_keys VALUES (?, ?, ?)",
                    [(path, status, key) for path, (status, key) in learnt.items()],
                )
        except sqlite3.Error as exc:
            self._give_up(exc)

    def _connect(self) -> _Closing:
        if self._broken:
            raise sqlite3.OperationalError("the key memo is off for this process")
        db = sqlite3.connect(self.path, timeout=30)
        db.execute(_SCHEMA)
        return _Closing(db)

    def _give_up(self, exc: Exception) -> None:
        if not self._broken:
            logger.warning(
                "cannot use the key memo %s (%s); hashing every file instead",
                self.path,
                exc,
            )
        self._broken = True


class _Closing:
    """A connection that commits (or rolls back) and closes on leaving."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.db.commit()
            else:
                self.db.rollback()
        finally:
            self.db.close()


def forget_in_process() -> None:
    """Drop the keys remembered in this process (the SQLite file stays)."""
    with _MEMORY_LOCK:
        _MEMORY.clear()
