"""A grid search over the full pipeline against one extraction, in one process.

On the ants/bees training photos, in this order:

1. one cold extraction into a new store (what ``bneck extract`` costs);
2. into another new store, ``GridSearchCV(make_classifier(...), grid, cv=5)``
   over the default six values of C, for each head, with ``n_jobs`` 1 and 2:
   its whole time, the network's rows included, and the rows the network
   computed (the store's own count).

The search reads every feature through the store, so it should cost one
extraction plus the heads' own time; the ratio says how close it comes.

Run from the repository root::

    python benchmarks/bench_search.py
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data" / "train"
RESULTS = ROOT / "benchmarks" / "results"


def load():
    from features import load_dataset

    dataset = load_dataset(DATA)
    return dataset.items, dataset.labels


def one_extraction(items, store) -> dict:
    from features import Extractor

    extractor = Extractor("efficientnet_lite0", store, progress=False)
    extractor.backbone.session()  # session loading is not extraction
    start = time.perf_counter()
    result = extractor.extract(items)
    extractor.features([key for key in result.keys if key])
    return {
        "seconds": time.perf_counter() - start,
        "computed": result.summary.computed,
    }


def search(items, labels, store, head: str, n_jobs: int) -> dict:
    from sklearn.model_selection import GridSearchCV

    from features import FeatureStore, get_backbone
    from pipeline import default_grid, make_classifier

    extra = {"probability": False} if head == "svm" else {}
    model = make_classifier("efficientnet_lite0", head, store=store, **extra)
    grid = default_grid(model)
    get_backbone("efficientnet_lite0").session()
    start = time.perf_counter()
    searcher = GridSearchCV(model, grid, cv=5, n_jobs=n_jobs).fit(items, labels)
    seconds = time.perf_counter() - start
    fingerprint = get_backbone("efficientnet_lite0").fingerprint()
    info = FeatureStore(store).info()[fingerprint]
    (values,) = grid.values()
    return {
        "head": head,
        "n_jobs": n_jobs,
        "candidates": len(values),
        "fits": len(values) * 5 + 1,
        "seconds": seconds,
        "computed": info["computed"],
        "rows": info["rows"],
        "best_params": {k: float(v) for k, v in searcher.best_params_.items()},
        "best_score": float(searcher.best_score_),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)

    from features import content_key

    items, labels = load()
    distinct = len({content_key(item, "image") for item in items})
    with tempfile.TemporaryDirectory(prefix="bneck-bench-search-") as work:
        work = Path(work)
        extraction = one_extraction(items, work / "one.h5")
        rows = []
        for head in ("svm", "logreg"):
            for n_jobs in (1, 2):
                store = work / f"{head}-{n_jobs}.h5"
                row = search(items, labels, store, head, n_jobs)
                row["x_one_extraction"] = row["seconds"] / extraction["seconds"]
                rows.append(row)
                print(json.dumps(row), flush=True)

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"### Grid search vs one extraction: ants/bees train, {len(items)} images",
        "",
        f"{platform.machine()}, Python {platform.python_version()}; load `{uptime}`",
        "",
        f"One cold extraction: {extraction['seconds']:.2f} s "
        f"({extraction['computed']} rows computed).",
        "",
        "| head | n_jobs | candidates x folds + refit | s | x one extraction "
        "| rows computed | best C | CV accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        (best,) = row["best_params"].values()
        lines.append(
            f"| {row['head']} | {row['n_jobs']} | {row['candidates']} x 5 + 1 | "
            f"{row['seconds']:.2f} | {row['x_one_extraction']:.2f} | "
            f"{row['computed']} of {distinct} distinct | {best:g} | "
            f"{row['best_score']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.md").write_text(text)
    payload = {"extraction": extraction, "searches": rows, "distinct": distinct}
    (out / "search.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
