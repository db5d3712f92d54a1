"""Extraction on a local Dask cluster against one process, with partition timings.

Run from the repository root (needs ``bneck[dask]``)::

    python benchmarks/bench_dask.py                      # ants/bees, 1 and 2 workers
    python benchmarks/bench_dask.py --workers 1,2 --partition-size 32

Rows
----
1 process      ``Extractor.extract`` into a new store; its ONNX Runtime session
               (all cores) is built before timing.
dask N         ``extract_distributed`` on a ``LocalCluster`` of N worker
               processes with one thread each, into a new store; the cluster
               is started and every worker's session built before timing.

For each Dask run the report gives, per partition, the compute seconds inside
the task on the worker and the commit seconds on the client (writing the
partition as its own HDF5 shard), and the client's hashing rate. From these
it estimates how throughput grows with workers and at how many workers the
client (hashing, then committing) becomes the bottleneck. A second, synthetic
measurement commits many partitions of random rows to one store, to show how
commit time grows with the number of shards a run leaves behind.

The table goes to stdout and ``benchmarks/results/dask-<backbone>.md``; all
figures, with ``uptime`` before and after, to ``dask-<backbone>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ANTS_BEES = DATA / "hymenoptera_data"
SMS = DATA / "sms_spam_collection" / "SMSSpamCollection"
RESULTS = ROOT / "benchmarks" / "results"


def uptime() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def workload(backbone: str) -> list:
    """All ants/bees JPEGs (train + val), or the first 2,000 SMS messages."""
    if backbone == "minilm_l6":
        import pandas as pd

        table = pd.read_csv(SMS, sep="\t", header=None, quoting=3)
        return table[1].tolist()[:2000]
    return [
        str(path)
        for part in ("train", "val")
        for path in sorted((ANTS_BEES / part).glob("*/*"))
        if path.suffix.lower() in (".jpg", ".jpeg")
    ]


def stats(values: list[float]) -> dict:
    if not values:
        return {}
    array = np.asarray(values, dtype=float)
    return {
        "median": round(float(np.median(array)), 4),
        "p10": round(float(np.percentile(array, 10)), 4),
        "p90": round(float(np.percentile(array, 90)), 4),
        "max": round(float(array.max()), 4),
    }


# ---------------------------------------------------------------- runs


def single_process(backbone_name: str, items: list, folder: Path) -> dict:
    from features import Extractor

    extractor = Extractor(backbone_name, folder / "one.h5", progress=False)
    extractor.backbone.session(extractor.num_threads)
    start = time.perf_counter()
    result = extractor.extract(items)
    seconds = time.perf_counter() - start
    return {
        "name": "1 process",
        "items": len(items),
        "computed": result.summary.computed,
        "seconds": round(seconds, 3),
        "items_per_second": round(len(items) / seconds, 2),
    }


def _warm(backbone, threads: int) -> int:
    """On a worker: build its session now, as its first partition would."""
    backbone.session(threads)
    return os.getpid()


def dask_run(
    backbone_name: str, items: list, folder: Path, workers: int, partition_size: int
) -> dict:
    from dask.system import CPU_COUNT

    from features import Extractor, dask_client, extract_distributed
    from features._extract import ExtractionSummary

    extractor = Extractor(backbone_name, folder / f"dask{workers}.h5", progress=False)
    with dask_client(workers=workers) as client:
        client.wait_for_workers(workers)
        threads = max(1, CPU_COUNT // workers)
        client.run(_warm, extractor.backbone, threads)

        hash_start = time.perf_counter()
        extractor._keys(items, [str(i) for i in items], ExtractionSummary())
        hash_seconds = time.perf_counter() - hash_start

        start = time.perf_counter()
        result = extract_distributed(
            extractor, items, client, partition_size=partition_size
        )
        seconds = time.perf_counter() - start
    parts = result.partitions
    compute = [p["compute_seconds"] for p in parts]
    commit = [p["commit_seconds"] for p in parts]
    worker_rates = [p["rows"] / p["compute_seconds"] for p in parts if p["rows"]]
    commit_rates = [p["rows"] / p["commit_seconds"] for p in parts if p["rows"]]
    return {
        "name": f"dask {workers}",
        "workers": workers,
        "intra_op_threads": sorted({p["threads"] for p in parts}),
        "partition_size": partition_size,
        "partitions": len(parts),
        "items": len(items),
        "computed": result.summary.computed,
        "seconds": round(seconds, 3),
        "items_per_second": round(len(items) / seconds, 2),
        "client_hash_items_per_second": round(len(items) / hash_seconds, 1),
        "compute_seconds": stats(compute),
        "commit_seconds": stats(commit),
        "worker_items_per_second": stats(worker_rates),
        "commit_items_per_second": stats(commit_rates),
        "client_busy_fraction": round(sum(commit) / seconds, 4),
        "per_partition": [
            {
                key: round(value, 4) if isinstance(value, float) else value
                for key, value in p.items()
            }
            for p in parts
        ],
    }


def commit_growth(dim: int, rows: int, shards: int, folder: Path) -> dict:
    """Commit time of ``rows``-row partitions as a store fills with shards."""
    from features import FeatureStore

    store = FeatureStore(folder / "commits.h5")
    rng = np.random.default_rng(0)
    meta = {"backbone": "synthetic", "feature_dim": dim, "dtype": "float32"}
    times = []
    with store.writing():
        for number in range(shards):
            keys = [f"{number:032x}{row:032x}" for row in range(rows)]
            features = rng.standard_normal((rows, dim), dtype=np.float32)
            start = time.perf_counter()
            store.put("synthetic", keys, features, meta)
            times.append(time.perf_counter() - start)
    marks = sorted({0, shards // 4, shards // 2, 3 * shards // 4, shards - 1})
    window = max(1, shards // 20)
    at = {}
    for mark in marks:
        chunk = times[max(0, mark - window // 2) : mark + window // 2 + 1]
        at[str(mark)] = round(float(np.median(chunk)), 4)
    return {
        "rows_per_shard": rows,
        "feature_dim": dim,
        "shards": shards,
        "median_commit_seconds_at_shard": at,
        "items_per_second_at_shard": {
            mark: round(rows / seconds, 1) for mark, seconds in at.items()
        },
    }


# ---------------------------------------------------------------- estimate


def estimate(runs: list[dict], growth: dict) -> dict:
    """Throughput against workers, and where the client becomes the limit.

    Workers are independent: a cluster of N single-core workers computes about
    N times the rate of one (the per-partition compute rate measured with one
    core per worker). The client does two things per item, serially: it
    hashes the input (reading the file) and commits the row. Its capacity is
    the smaller of the two rates; past ``capacity / per_worker_rate`` workers
    adding workers no longer helps.
    """
    one_core = [r for r in runs if r.get("intra_op_threads") == [1]]
    base = one_core[-1] if one_core else runs[-1]
    per_worker = base["worker_items_per_second"]["median"]
    commit_rate = base["commit_items_per_second"]["median"]
    hash_rate = base["client_hash_items_per_second"]
    late_commit = min(growth["items_per_second_at_shard"].values())
    client = min(commit_rate, hash_rate)
    return {
        "per_worker_items_per_second": round(per_worker, 2),
        "client_commit_items_per_second": round(commit_rate, 1),
        "client_commit_items_per_second_late": late_commit,
        "client_hash_items_per_second": hash_rate,
        "client_capacity_items_per_second": round(client, 1),
        "workers_until_client_bound": int(client // per_worker),
        "workers_until_client_bound_late": int(
            min(late_commit, hash_rate) // per_worker
        ),
        "predicted_items_per_second": {
            str(n): round(min(n * per_worker, client), 1)
            for n in (1, 2, 4, 8, 16, 32, 64, 128)
        },
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Dask extraction: {report['backbone']}",
        "",
        f"{report['items']} items; {report['machine']}",
        "",
        f"- load before: `{report['uptime_before']}`",
        f"- load after: `{report['uptime_after']}`",
        "",
        "| run | partitions | s | items/s | worker items/s (median) | "
        "compute s/partition (median, p90) | commit s/partition (median, p90) | "
        "commit items/s (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        if "workers" not in run:
            lines.append(
                f"| {run['name']} | - | {run['seconds']} | {run['items_per_second']} "
                "| - | - | - | - |"
            )
            continue
        compute, commit = run["compute_seconds"], run["commit_seconds"]
        lines.append(
            f"| {run['name']} ({run['intra_op_threads']} intra-op) | "
            f"{run['partitions']} x {run['partition_size']} | {run['seconds']} | "
            f"{run['items_per_second']:.1f} | "
            f"{run['worker_items_per_second']['median']:.1f} | "
            f"{compute['median']:.2f}, {compute['p90']:.2f} | "
            f"{commit['median']:.3f}, {commit['p90']:.3f} | "
            f"{run['commit_items_per_second']['median']:.0f} |"
        )
    growth = report["commit_growth"]
    est = report["estimate"]
    lines += [
        "",
        f"Commit of {growth['rows_per_shard']}-row shards as the store fills "
        "(shard number: items/s): "
        + ", ".join(
            f"{k}: {v}" for k, v in growth["items_per_second_at_shard"].items()
        ),
        "",
        "## Estimate",
        "",
        f"- one worker (one core): {est['per_worker_items_per_second']} items/s",
        f"- client hashing: {est['client_hash_items_per_second']} items/s; "
        f"commit: {est['client_commit_items_per_second']} items/s "
        f"({est['client_commit_items_per_second_late']} items/s once "
        f"{growth['shards']} shards exist)",
        f"- the client bounds throughput past about "
        f"{est['workers_until_client_bound']} single-core workers "
        f"({est['workers_until_client_bound_late']} late in a long run)",
        "- predicted items/s by workers: "
        + ", ".join(f"{k}: {v}" for k, v in est["predicted_items_per_second"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2")
    parser.add_argument("--partition-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="use only the first N items")
    parser.add_argument("--commit-shards", type=int, default=1000)
    args = parser.parse_args(argv)

    items = workload(args.backbone)[: args.limit]
    report = {
        "backbone": args.backbone,
        "items": len(items),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "uptime_before": uptime(),
        "runs": [],
    }
    from features import get_backbone

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        get_backbone(args.backbone).onnx_path()  # export outside the timings
        report["runs"].append(single_process(args.backbone, items, folder))
        print(report["runs"][-1], flush=True)
        for workers in (int(n) for n in args.workers.split(",")):
            run = dask_run(args.backbone, items, folder, workers, args.partition_size)
            report["runs"].append(run)
            print({k: v for k, v in run.items() if k != "per_partition"}, flush=True)
        dim = get_backbone(args.backbone).feature_dim
        report["commit_growth"] = commit_growth(
            dim, args.partition_size, args.commit_shards, folder
        )
    report["uptime_after"] = uptime()
    report["estimate"] = estimate(
        [r for r in report["runs"] if "workers" in r], report["commit_growth"]
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"dask-{args.backbone}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
