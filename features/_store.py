"""The feature store: bottleneck vectors in HDF5, keyed by input content.

Layout on disk, for a store named ``features.h5``::

    features.h5           compacted rows (may be absent in a new store)
    features.h5.shards/   one small HDF5 file per commit
    features.h5.lock      held while a process extracts into the store
    features.h5.keys      SQLite: the content key of each file path, reused
                          while the file is unchanged (features._keymemo)

No HDF5 file is ever modified in place. A commit writes a shard under a
temporary name, closes and fsyncs it, then renames it into ``.shards/``;
compaction writes a new main file the same way and only then deletes the
shards it absorbed. A process killed at any moment therefore leaves every
committed row readable: at worst a temporary file to ignore, or rows present
both in a shard and in the main file, which read back identical.

Every file has the same inner layout::

    /                   attrs: bneck_format, bneck_kind
    /<fingerprint>/     attrs: backbone, feature_dim, dtype, versions, created
        keys            (n,) S64, sha256 hex of each input's content
        features        (n, feature_dim) float32
        failures        (m,) JSON strings: key, source, reason
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "MemoryStore",
    "StoreBusyError",
    "StoreError",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KIND = "bneck-feature-store"
_KEY_DTYPE = "S64"


class StoreError(RuntimeError):
    """The store cannot be used: foreign file, newer format, or mismatch."""


class StoreBusyError(StoreError):
    """Another process holds the store for too long, or moved files mid-read."""


@dataclass
class _Rows:
    """Index of one namespace: which file holds each key, at which row."""

    location: dict[str, tuple[Path, int]] = field(default_factory=dict)
    failures: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    computed: int = 0


class FeatureStore:
    """Bottleneck features of any number of backbones in one HDF5 store.

    Parameters
    ----------
    path : str or path-like
        The store's main file, e.g. ``features.h5``; its shards and lock
        sit beside it.
    lock_timeout : float, default=3600
        Seconds to wait for another process that is extracting into the
        store before giving up with :class:`StoreBusyError`.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> store = FeatureStore(os.path.join(tempfile.mkdtemp(), "f.h5"))
    >>> meta = {"backbone": "x", "feature_dim": 3}
    >>> shard = store.put("fp", ["a" * 64], np.ones((1, 3), np.float32), meta)
    >>> store.get("fp", ["a" * 64]).shape
    (1, 3)
    """

    def __init__(self, path: str | os.PathLike, *, lock_timeout: float = 3600.0):
        self.path = Path(path)
        self.shard_dir = self.path.with_name(self.path.name + ".shards")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = lock_timeout
        self._file_cache: dict[tuple, dict] = {}
        self._dims: dict[str, int] = {}
        if self.path.exists():
            self._check_file(self.path)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file_cache"] = {}
        return state

    # ------------------------------------------------------------- reading

    def keys(self, fingerprint: str) -> set[str]:
        """Keys of every row stored under ``fingerprint``."""
        return set(self._index(fingerprint).location)

    def missing(self, fingerprint: str, keys: Iterable[str]) -> list[str]:
        """The keys, in order and without repeats, that have no row yet."""
        index = self._index(fingerprint)
        seen: set[str] = set()
        out = []
        for key in keys:
            if key not in index.location and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def failures(self, fingerprint: str) -> dict[str, dict]:
        """Recorded failures by key: ``{"source": ..., "reason": ...}``."""
        return dict(self._index(fingerprint).failures)

    def metadata(self, fingerprint: str) -> dict:
        """Backbone name, feature size, dtype, versions and creation time."""
        return dict(self._index(fingerprint).meta)

    def fingerprints(self) -> list[str]:
        """Namespaces present in the store."""
        return self._retrying(self._scan_fingerprints)

    def _scan_fingerprints(self) -> list[str]:
        names: set[str] = set()
        for path in self._files():
            names.update(self._read_file(path))
        return sorted(names)

    def info(self) -> dict:
        """Rows, rows ever computed, failures and shards per namespace."""
        out = {}
        for fingerprint in self.fingerprints():
            index = self._index(fingerprint)
            out[fingerprint] = {
                **index.meta,
                "rows": len(index.location),
                "computed": index.computed,
                "failures": len(index.failures),
            }
        return {"path": str(self.path), "shards": len(self._shards()), **out}

    def get(self, fingerprint: str, keys: Sequence[str]) -> np.ndarray:
        """Rows for ``keys``, in the order given (repeats allowed)."""
        return self._retrying(self._get, fingerprint, keys)

    def _no_namespace(self, fingerprint: str) -> str:
        held = [
            f"{self.metadata(other).get('backbone', '?')} ({other[:16]})"
            for other in self.fingerprints()
        ]
        return (
            f"the store {self.path} holds no features of the backbone with "
            f"fingerprint {fingerprint[:16]}; it holds "
            f"{', '.join(held) if held else 'none yet'}: another backbone (or "
            "other weights or preprocessing) wrote it; extract with this "
            "backbone first"
        )

    def _retrying(self, read, *args):
        """Run ``read`` again when a compaction moved files under it."""
        for attempt in range(5):
            try:
                return read(*args)
            except FileNotFoundError:
                # A compaction replaced the files we indexed; index again.
                time.sleep(0.05 * (attempt + 1))
        raise StoreBusyError(
            f"the store {self.path} kept changing while being read (a compaction "
            "in another process); try again"
        )

    def _get(self, fingerprint: str, keys: Sequence[str]) -> np.ndarray:
        index = self._index(fingerprint)
        absent = [key for key in keys if key not in index.location]
        if absent and not index.meta:
            raise KeyError(self._no_namespace(fingerprint))
        if absent:
            raise KeyError(
                f"{len(absent)} of {len(keys)} keys have no features under "
                f"{fingerprint[:16]} in {self.path} (first: {absent[0]}); "
                "extract them first"
            )
        dim = int(index.meta.get("feature_dim", 0))
        out = np.empty((len(keys), dim), dtype=np.float32)
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            path, row = index.location[key]
            by_file.setdefault(path, []).append((row, position))
        for path, pairs in by_file.items():
            rows = np.array([row for row, _ in pairs])
            positions = np.array([position for _, position in pairs])
            unique, inverse = np.unique(rows, return_inverse=True)
            with _open_to_read(path) as handle:
                group = handle[fingerprint]
                block = group["features"][unique]
                found = group["keys"][unique]
            wanted = np.array([keys[p] for p in positions], dtype=_KEY_DTYPE)
            if not np.array_equal(found[inverse], wanted):
                # The file was replaced since it was indexed: index again.
                raise FileNotFoundError(f"{path} changed while being read")
            out[positions] = block[inverse]
        return out

    # ------------------------------------------------------------- writing

    @contextmanager
    def writing(self):
        """Hold the store's writer lock (one extracting process at a time)."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise StoreBusyError(
                f"the store {self.path} is busy: another process has been "
                f"extracting into it for over {self.lock_timeout:g} s "
                f"(lock file {self.lock_path})"
            ) from None
        try:
            self._file_cache.clear()
            self._remove_stale_temporaries()
            yield self
        finally:
            lock.release()

    def put(
        self,
        fingerprint: str,
        keys: Sequence[str],
        features: np.ndarray,
        meta: dict,
        failures: Sequence[dict] = (),
    ) -> Path | None:
        """Commit rows (and failures) as one new shard; returns its path."""
        features = np.asarray(features, dtype=np.float32)
        if len(keys) != len(features):
            raise ValueError(f"{len(keys)} keys for {len(features)} feature rows")
        if not len(keys) and not failures:
            return None
        if features.size:
            self._check_dim(fingerprint, features.shape[1])
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        name = f"{fingerprint[:16]}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.h5"
        namespace = {fingerprint: (list(keys), features, list(failures), meta)}
        path = _write_atomically(self.shard_dir / name, namespace, computed=True)
        logger.debug("committed %d rows to %s", len(keys), path)
        return path

    def _check_dim(self, fingerprint: str, dim: int) -> None:
        known = self._dims.get(fingerprint)
        if known is None:
            # Index once per namespace, not on every commit: a long run's
            # commits would otherwise slow down with its number of shards.
            known = int(self._index(fingerprint).meta.get("feature_dim", dim))
            self._dims[fingerprint] = known
        if known != dim:
            raise StoreError(
                f"namespace {fingerprint[:16]} of {self.path} holds "
                f"{known}-d features, got {dim}-d"
            )

    def compact(self) -> None:
        """Merge all shards into the main file (under the writer lock)."""
        with self.writing():
            shards = self._shards()
            if not shards:
                return
            namespaces = {}
            for fingerprint in self.fingerprints():
                index = self._index(fingerprint)
                keys = list(index.location)
                rows = self.get(fingerprint, keys) if keys else None
                if rows is None:
                    rows = np.empty((0, int(index.meta.get("feature_dim", 0))))
                failures = [
                    {"key": key, **record} for key, record in index.failures.items()
                ]
                meta = {**index.meta, "computed": index.computed}
                namespaces[fingerprint] = (keys, rows, failures, meta)
            _write_atomically(self.path, namespaces, computed=False)
            for shard in shards:
                shard.unlink(missing_ok=True)
            self._file_cache.clear()
            logger.info("compacted %d shards into %s", len(shards), self.path)

    # ------------------------------------------------------------- internals

    def _shards(self) -> list[Path]:
        if not self.shard_dir.is_dir():
            return []
        # Names starting with "." are shards still being written (or left
        # behind by a killed process): never read them.
        return sorted(
            path
            for path in self.shard_dir.glob("*.h5")
            if not path.name.startswith(".")
        )

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written shards of killed writers (under the lock)."""
        if not self.shard_dir.is_dir():
            return
        for path in self.shard_dir.glob(".tmp-*.h5"):
            path.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted writer", path)

    def _files(self) -> list[Path]:
        main = [self.path] if self.path.exists() else []
        return main + self._shards()

    def _index(self, fingerprint: str) -> _Rows:
        return self._retrying(self._scan, fingerprint)

    def _scan(self, fingerprint: str) -> _Rows:
        index = _Rows()
        for path in self._files():
            if path.parent == self.shard_dir and not path.name.startswith(
                fingerprint[:16]
            ):
                continue
            content = self._read_file(path).get(fingerprint)
            if content is None:
                continue
            index.meta = index.meta or content["meta"]
            index.computed += content["computed"]
            for row, key in enumerate(content["keys"]):
                index.location.setdefault(key, (path, row))
            for record in content["failures"]:
                index.failures.setdefault(record["key"], record)
        for key in index.location:
            index.failures.pop(key, None)
        return index

    def _read_file(self, path: Path) -> dict:
        """Keys, failures and metadata of each namespace in one file (cached)."""
        # A listed file that vanished was absorbed by a compaction in another
        # process: FileNotFoundError makes the caller list the files again.
        stat = path.stat()
        cache_key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if cache_key not in self._file_cache:
            content = {}
            try:
                handle = _open_to_read(path)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise StoreError(f"{path} is not a readable HDF5 file: {exc}") from None
            with handle:
                _check_root(handle, path)
                for fingerprint, group in handle.items():
                    meta = {k: _plain(v) for k, v in group.attrs.items()}
                    computed = int(meta.pop("computed", 0))
                    content[fingerprint] = {
                        "keys": [key.decode() for key in group["keys"][()]],
                        "failures": [
                            json.loads(line) for line in group["failures"].asstr()[()]
                        ],
                        "meta": meta,
                        "computed": computed,
                    }
            self._file_cache[cache_key] = content
        return self._file_cache[cache_key]

    def _check_file(self, path: Path) -> None:
        import h5py

        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(
                f"{path} is not an HDF5 file bneck can read ({exc}); choose "
                "another --store path, bneck will not overwrite it"
            ) from None
        with handle:
            _check_root(handle, path)


def _open_to_read(path: Path):
    """Open an HDF5 file of the store; FileNotFoundError if it vanished.

    A compaction in another process may delete a file between the moment it
    was listed and this open. HDF5 then reports a generic OSError (such as
    "can't retrieve stat info for file"), which would read as a damaged
    file; a file that no longer exists makes the caller index again.
    """
    import h5py

    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError:
        if not path.exists():
            raise FileNotFoundError(f"{path} vanished while being opened") from None
        raise


def _check_root(handle, path: Path) -> None:
    kind = handle.attrs.get("bneck_kind")
    if kind != _KIND:
        raise StoreError(
            f"{path} is an HDF5 file but not a bneck feature store; choose "
            "another --store path, bneck will not overwrite it"
        )
    version = int(handle.attrs.get("bneck_format", 0))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written in store format {version}, newer than this "
            f"bneck reads ({FORMAT_VERSION}); upgrade bneck to read it"
        )


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_atomically(target: Path, namespaces: dict, *, computed: bool) -> Path:
    """Write an HDF5 file under a temporary name, fsync, rename into place."""
    import h5py

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".h5")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["bneck_kind"] = _KIND
            handle.attrs["bneck_format"] = FORMAT_VERSION
            for fingerprint, (keys, rows, failures, meta) in namespaces.items():
                group = handle.create_group(fingerprint)
                for name, value in meta.items():
                    group.attrs[name] = value
                if computed:
                    group.attrs["computed"] = len(keys)
                group.create_dataset(
                    "keys", data=np.array(keys, dtype=_KEY_DTYPE).reshape(-1)
                )
                group.create_dataset(
                    "features", data=np.asarray(rows, dtype=np.float32)
                )
                lines = [json.dumps(record, sort_keys=True) for record in failures]
                group.create_dataset(
                    "failures", data=np.array(lines, dtype=h5py.string_dtype())
                )
        _fsync(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MemoryStore:
    """A store that keeps rows in memory only: the "no cache" choice.

    It has the same interface as :class:`FeatureStore`, so extraction code
    never checks whether a cache is present.
    """

    def __init__(self):
        self._rows: dict[str, dict[str, np.ndarray]] = {}
        self._failures: dict[str, dict[str, dict]] = {}
        self._meta: dict[str, dict] = {}
        self._computed: dict[str, int] = {}
        self.path = None

    def __repr__(self) -> str:
        return "MemoryStore()"

    def keys(self, fingerprint: str) -> set[str]:
        return set(self._rows.get(fingerprint, {}))

    def missing(self, fingerprint: str, keys: Iterable[str]) -> list[str]:
        rows = self._rows.get(fingerprint, {})
        return list(dict.fromkeys(key for key in keys if key not in rows))

    def failures(self, fingerprint: str) -> dict[str, dict]:
        return dict(self._failures.get(fingerprint, {}))

    def metadata(self, fingerprint: str) -> dict:
        return dict(self._meta.get(fingerprint, {}))

    def fingerprints(self) -> list[str]:
        return sorted(self._rows)

    def info(self) -> dict:
        return {
            fingerprint: {
                **self._meta[fingerprint],
                "rows": len(rows),
                "computed": self._computed[fingerprint],
                "failures": len(self._failures[fingerprint]),
            }
            for fingerprint, rows in self._rows.items()
        }

    def get(self, fingerprint: str, keys: Sequence[str]) -> np.ndarray:
        rows = self._rows.get(fingerprint, {})
        absent = [key for key in keys if key not in rows]
        if absent:
            raise KeyError(f"{len(absent)} keys have no features (first: {absent[0]})")
        dim = int(self._meta[fingerprint]["feature_dim"])
        if not keys:
            return np.empty((0, dim), dtype=np.float32)
        return np.stack([rows[key] for key in keys])

    @contextmanager
    def writing(self):
        yield self

    def put(self, fingerprint, keys, features, meta, failures=()) -> None:
        rows = self._rows.setdefault(fingerprint, {})
        self._meta.setdefault(fingerprint, dict(meta))
        self._computed[fingerprint] = self._computed.get(fingerprint, 0) + len(keys)
        for key, row in zip(keys, np.asarray(features, dtype=np.float32), strict=True):
            rows[key] = row
        known = self._failures.setdefault(fingerprint, {})
        for record in failures:
            known[record["key"]] = record

    def compact(self) -> None:
        """Nothing to merge in memory."""
