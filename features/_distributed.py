"""Extraction on a Dask cluster: the workers compute, the client writes.

The client hashes every input and asks the store which rows are missing;
only those items travel, split into partitions. Each worker process builds
its ONNX Runtime session once (the per-process cache of
:meth:`Backbone.session`) and reuses it for every partition it runs, with
intra-op threads set to its share of the host's cores. A partition comes
back as ``(keys, features, failures)`` and the client commits it at once as
its own shard, so a client that dies loses only the partitions in flight.
HDF5 has a single writer: workers never open the store.

A worker that dies takes its partitions with it; the scheduler runs them
again elsewhere, and the client commits each key once per run, so the store
ends with exactly one row per distinct input.

Inputs are read twice: by the client, to hash them, and by a worker, to
compute them. Paths must therefore name the same file on the client and on
every worker (a shared filesystem). A worker that cannot read an input, or
reads different bytes than the client hashed, reports it as a failure with
the reason; such failures belong to the worker's view of the files, not to
the content, so unlike undecodable images they are not recorded in the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._extract import (
    ExtractionResult,
    ExtractionSummary,
    Extractor,
    _name,
)
from ._preprocess import InputError, read_input_bytes

__all__ = ["ClusterError", "DistributedResult", "dask_client", "extract_distributed"]

logger = logging.getLogger(__name__)

#: Inputs per task when the caller does not choose.
PARTITION_SIZE = 64
#: Prefix of the Dask keys of extraction tasks.
TASK_PREFIX = "bneck-extract"


class ClusterError(RuntimeError):
    """Partitions failed on the cluster even after retries."""


@dataclass
class DistributedResult(ExtractionResult):
    """An :class:`ExtractionResult` with one timing record per partition.

    Each record of ``partitions`` holds ``index``, ``items``, ``rows``
    (committed), ``failed``, ``worker``, ``pid``, ``threads`` (intra-op),
    ``new_session`` (whether the task built the worker's session),
    ``compute_seconds`` (inside the task, on the worker), ``commit_seconds``
    (writing the shard, on the client) and ``arrived`` (seconds since the
    start of the run).
    """

    partitions: list[dict] = field(default_factory=list)


def import_distributed():
    """Import ``dask.distributed``, or say how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            "extraction on a Dask cluster needs dask.distributed; install it "
            "with: pip install 'bneck[dask]'"
        ) from exc
    return distributed


@contextmanager
def dask_client(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    timeout: float = 10.0,
) -> Iterator:
    """A Dask client of a running cluster, or of a local one started here.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler, e.g. ``"tcp://10.0.0.5:8786"``.
    workers : int, optional
        Instead, start a local cluster of this many worker processes with one
        thread each; it is closed on exit.
    timeout : float, default=10
        Seconds to wait for the scheduler to answer.

    Yields
    ------
    distributed.Client
    """
    distributed = import_distributed()
    if (scheduler is None) == (workers is None):
        raise ValueError("give either a scheduler address or a number of workers")
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({exc}); check "
                "that it runs and that this machine can reach it"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; expected a positive int")
    # The scheduler of a local cluster runs in this process and logs its
    # routine (workers joining, closing) at INFO: keep that out of our output.
    cluster_logger = logging.getLogger("distributed")
    level = cluster_logger.level
    cluster_logger.setLevel(max(level, logging.WARNING))
    try:
        with distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: never clash with another
            silence_logs=logging.ERROR,
        ) as cluster:
            with distributed.Client(cluster) as client:
                yield client
    finally:
        cluster_logger.setLevel(level)


def extract_distributed(
    extractor: Extractor,
    items: Sequence[Any],
    client,
    sources: Sequence[str] | None = None,
    *,
    partition_size: int = PARTITION_SIZE,
    retries: int = 2,
) -> DistributedResult:
    """Like :meth:`Extractor.extract`, with the network run on a Dask cluster.

    Parameters
    ----------
    extractor : Extractor
        Backbone, store, batch size, ``num_threads`` (intra-op threads per
        worker task; by default the worker's share of its host's cores) and
        ``on_error``.
    items : sequence
        File paths (or bytes) for images, strings for text. Relative paths
        are made absolute on the client; every worker must be able to read
        the same path.
    client : distributed.Client
        A client of the cluster that runs the partitions.
    sources : sequence of str, optional
        How to name each input in failure reports; defaults to the item.
    partition_size : int, default=64
        Inputs per task, and rows per committed shard.
    retries : int, default=2
        Times a task that raised is run again (a task on a worker that died
        is rerun by the scheduler regardless).

    Returns
    -------
    DistributedResult
        Keys (None where an input failed), the summary, and per-partition
        timings.

    Raises
    ------
    ClusterError
        When partitions still fail after retries; the others are committed,
        so running again computes only what is missing.
    """
    import_distributed()
    if partition_size < 1:
        raise ValueError(f"partition_size={partition_size!r}; expected a positive int")
    start = time.perf_counter()
    sources = list(sources) if sources is not None else [_name(i) for i in items]
    if extractor.backbone.modality == "image":
        items = [_absolute(item) for item in items]
    summary = ExtractionSummary(items=len(items))
    keys = extractor._keys(items, sources, summary)
    fingerprint = extractor.fingerprint
    store = extractor.store

    known_failures = store.failures(fingerprint)
    with store.writing():
        todo = store.missing(fingerprint, (key for key in keys if key))
        todo = [key for key in todo if key not in known_failures]
        first: dict[str, tuple[Any, str]] = {}
        for key, item, source in zip(keys, items, sources, strict=True):
            if key is not None and key not in first:
                first[key] = (item, source)
        work = [(key, *first[key]) for key in todo]
        work = extractor._ordered(work)  # texts by token count, for padding
        partitions = [
            work[at : at + partition_size] for at in range(0, len(work), partition_size)
        ]
        run = _Run(extractor, client, retries, start)
        reports, new_failures = run.execute(partitions)

    failed = {**known_failures, **{r["key"]: r for r in new_failures}}
    for position, key in enumerate(keys):
        if key in known_failures:
            # Recorded by an earlier run: skipped again, or raised.
            extractor._fail(sources[position], known_failures[key]["reason"])
        if key in failed:
            summary.failures.append(
                {"source": sources[position], "reason": failed[key]["reason"]}
            )
            keys[position] = None
    summary.computed = sum(report["rows"] for report in reports)
    summary.failed = len(summary.failures)
    summary.cached = summary.items - summary.failed - summary.computed
    summary.seconds = time.perf_counter() - start
    return DistributedResult(keys=keys, summary=summary, partitions=reports)


class _Run:
    """Submit partitions, commit each as it arrives, keep a bounded window."""

    def __init__(self, extractor: Extractor, client, retries: int, start: float):
        self.extractor = extractor
        self.client = client
        self.retries = retries
        self.start = start
        self.token = uuid.uuid4().hex[:8]
        self.written: set[str] = set()
        self.meta = extractor._metadata()

    def execute(self, partitions: list[list]) -> tuple[list[dict], list[dict]]:
        if not partitions:
            return [], []
        distributed = import_distributed()
        backbone = self.extractor.backbone
        backbone.onnx_path()  # export once here rather than on every worker
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise ClusterError(
                "the Dask cluster has no workers; start some, or use --workers N"
            )
        host_slots = _slots_per_host(workers)
        # NOTE: the backbone travels inside every task rather than scattered
        # once: scattered data dies with the workers holding it, and then every
        # pending partition fails. Registered and ONNX backbones pickle to under
        # a kilobyte; a torch_backbone carries its module, so for a large user
        # module prefer onnx_backbone on a shared filesystem.
        window = max(2, 2 * sum(info["nthreads"] for info in workers.values()))

        queue = iter(enumerate(partitions))
        futures = distributed.as_completed()
        by_future = {}
        for index, partition in _take(queue, window):
            by_future[self._submit(backbone, index, partition, host_slots)] = index
        futures.update(by_future)

        reports: list[dict] = []
        failures: list[dict] = []
        errors: list[str] = []
        bar = self.extractor._bar(sum(len(p) for p in partitions))
        try:
            for future in futures:
                index = by_future.pop(future)
                try:
                    out = future.result()
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(f"partition {index}: {type(exc).__name__}: {exc}")
                    logger.warning("partition %d failed: %s", index, errors[-1])
                else:
                    report, failed = self._commit(index, out)
                    reports.append(report)
                    failures.extend(failed)
                    if failed and self.extractor.on_error == "raise":
                        first = failed[0]
                        raise InputError(f"{first['source']}: {first['reason']}")
                finally:
                    future.release()
                bar.update(len(partitions[index]))
                for following, partition in _take(queue, 1):
                    future = self._submit(backbone, following, partition, host_slots)
                    by_future[future] = following
                    futures.add(future)
        except BaseException:
            # Rows committed so far stay; what is still running is abandoned.
            self.client.cancel(list(by_future))
            raise
        finally:
            bar.close()
        if errors:
            raise ClusterError(
                f"{len(errors)} of {len(partitions)} partitions failed on the "
                f"cluster (first: {errors[0]}); the other partitions are "
                "committed, run again to compute what is missing"
            )
        return sorted(reports, key=lambda report: report["index"]), failures

    def _submit(self, backbone, index: int, partition: list, host_slots: dict):
        return self.client.submit(
            _extract_partition,
            backbone,
            partition,
            batch_size=self.extractor.batch_size,
            host_slots=host_slots,
            num_threads=self.extractor.num_threads,
            key=f"{TASK_PREFIX}-{self.token}-{index}",
            retries=self.retries,
        )

    def _commit(self, index: int, out: dict) -> tuple[dict, list[dict]]:
        """Write one partition as its own shard, each key once per run."""
        arrived = time.perf_counter() - self.start
        begin = time.perf_counter()
        keep = [row for row, key in enumerate(out["keys"]) if key not in self.written]
        keys = [out["keys"][row] for row in keep]
        rows = out["features"][keep]
        persist = [
            {name: record[name] for name in ("key", "source", "reason")}
            for record in out["failures"]
            if record["persist"]
        ]
        store = self.extractor.store
        store.put(self.extractor.fingerprint, keys, rows, self.meta, persist)
        self.written.update(keys)
        report = {
            "index": index,
            "items": len(out["keys"]) + len(out["failures"]),
            "rows": len(keys),
            "failed": len(out["failures"]),
            "worker": out["worker"],
            "pid": out["pid"],
            "threads": out["threads"],
            "new_session": out["new_session"],
            "compute_seconds": out["seconds"],
            "commit_seconds": time.perf_counter() - begin,
            "arrived": arrived,
        }
        failed = [
            {name: record[name] for name in ("key", "source", "reason")}
            for record in out["failures"]
        ]
        for record in failed:
            logger.warning("skipped %s: %s", record["source"], record["reason"])
        return report, failed


def _take(iterator, count: int):
    for _ in range(count):
        try:
            yield next(iterator)
        except StopIteration:
            return


def _absolute(item: Any) -> Any:
    if isinstance(item, (str, os.PathLike)):
        return os.path.abspath(os.fspath(item))
    return item


def _slots_per_host(workers: dict) -> dict[str, int]:
    """Task slots (worker threads, summed over workers) on each host."""
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info["host"]] = slots.get(info["host"], 0) + int(info["nthreads"])
    return slots


def _extract_partition(
    backbone,
    work: list[tuple[str, Any, str]],
    *,
    batch_size: int,
    host_slots: dict[str, int],
    num_threads: int | None,
) -> dict:
    """Run on a worker: features of one partition, with the process's session.

    Intra-op threads default to the host's cores (``dask.system.CPU_COUNT``,
    which honours CPU affinity and cgroup quotas) over the task slots of all
    workers on that host, so workers sharing a machine do not oversubscribe
    it. A worker that joined after the run started counts only its own slots.
    """
    from dask.system import CPU_COUNT
    from distributed import get_worker

    from ._backbones import _SESSIONS

    begin = time.perf_counter()
    worker = get_worker()
    slots = host_slots.get(worker.ip, worker.state.nthreads)
    threads = num_threads or max(1, CPU_COUNT // max(1, slots))
    path = str(backbone.onnx_path())
    new_session = (path, threads) not in _SESSIONS
    backbone.session(threads)

    keys: list[str] = []
    rows: list[np.ndarray] = []
    failures: list[dict] = []
    load = _Loader(backbone, worker.address)
    batches = [work[at : at + batch_size] for at in range(0, len(work), batch_size)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        ahead = [pool.submit(load, entry) for entry in batches[0]] if batches else []
        for number, batch in enumerate(batches):
            loaded = [future.result() for future in ahead]
            following = batches[number + 1] if number + 1 < len(batches) else []
            ahead = [pool.submit(load, entry) for entry in following]
            good = []
            for (key, _, source), value in zip(batch, loaded, strict=True):
                if isinstance(value, _Failure):
                    failures.append(
                        {
                            "key": key,
                            "source": source,
                            "reason": value.reason,
                            "persist": value.persist,
                        }
                    )
                else:
                    good.append((key, value))
            if good:
                inputs = backbone.preprocessor.collate([value for _, value in good])
                out = backbone.run(inputs, threads)
                keys.extend(key for key, _ in good)
                rows.append(np.asarray(out, dtype=np.float32))
    features = (
        np.concatenate(rows)
        if rows
        else np.empty((0, backbone.feature_dim), dtype=np.float32)
    )
    return {
        "keys": keys,
        "features": features,
        "failures": failures,
        "worker": worker.address,
        "pid": os.getpid(),
        "threads": threads,
        "new_session": new_session,
        "seconds": time.perf_counter() - begin,
    }


@dataclass
class _Failure:
    reason: str
    persist: bool


class _Loader:
    """Read and decode one input on a worker, checking it is what was hashed."""

    def __init__(self, backbone, address: str):
        self.preprocessor = backbone.preprocessor
        self.modality = backbone.modality
        self.address = address

    def __call__(self, entry: tuple[str, Any, str]):
        key, item, _ = entry
        if self.modality == "image":
            try:
                data = read_input_bytes(item)
            except InputError as exc:
                return _Failure(
                    f"worker {self.address} cannot read the input ({exc}); inputs "
                    "must be on a filesystem every worker can read",
                    persist=False,
                )
            if hashlib.sha256(data).hexdigest() != key:
                return _Failure(
                    f"worker {self.address} reads different bytes at this path "
                    "than the client hashed; the file changed, or the workers "
                    "see another filesystem",
                    persist=False,
                )
            item = data
        try:
            return self.preprocessor.load(item)
        except InputError as exc:
            return _Failure(str(exc), persist=True)
        except Exception as exc:  # noqa: BLE001 - any decoder bug is a skip
            return _Failure(f"{type(exc).__name__}: {exc}", persist=True)
