"""Held-out scores of ``bneck train`` + ``bneck evaluate``, as a user runs them.

For each data set and head, with the defaults and with ``--search``:
``bneck train TRAIN --strategy bottleneck --classifier HEAD`` (clothing's
1,000 images would otherwise be fine-tuned) then ``bneck evaluate MODEL VAL``,
through the CLI's own ``main``. ants/bees and clothing use their ``train/``
and ``val/`` folders; the SMS collection a stratified 80/20 split with
``random_state=0``, written as two CSV tables. One feature store serves all.

Run from the repository root::

    python benchmarks/bench_heldout.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def sms_tables(folder: Path) -> tuple[list[str], list[Path]]:
    """The SMS split as two CSV tables (label, text), read by bneck's loader."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    from features import load_dataset

    data = load_dataset(
        DATA / "sms_spam_collection" / "SMSSpamCollection", columns=["label", "text"]
    )
    frame = pd.DataFrame({"label": data.labels, "text": data.items})
    train, val = train_test_split(
        frame, test_size=0.2, stratify=frame.label, random_state=0
    )
    paths = []
    for name, part in [("train", train), ("val", val)]:
        path = folder / f"sms-{name}.csv"
        part.to_csv(path, index=False)
        paths.append(path)
    return ["--text-column", "text"], paths


def run_cli(argv: list[str]) -> dict:
    from pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"bneck {' '.join(argv)} exited {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bneck-bench-heldout-") as work:
        work = Path(work)
        store = str(work / "features.h5")
        sets = [
            ("ants/bees", [], DATA / "hymenoptera_data" / "train",
             DATA / "hymenoptera_data" / "val", None),
            ("clothing", [], DATA / "clothing_dataset_small" / "train",
             DATA / "clothing_dataset_small" / "val", None),
        ]  # fmt: skip
        extra, (sms_train, sms_val) = sms_tables(work)
        sets.append(("sms", extra, sms_train, sms_val, "spam"))
        for name, extra, train, val, positive in sets:
            for head in ("svm", "logreg"):
                for search in (False, True):
                    model = work / f"{name.replace('/', '-')}-{head}-{search}"
                    common = [*extra, "--store", store, "--no-progress", "--json"]
                    start = time.perf_counter()
                    trained = run_cli(
                        ["train", str(train), "--out", str(model),
                         "--strategy", "bottleneck", "--classifier", head, *common,
                         *(["--search"] if search else [])]
                    )  # fmt: skip
                    seconds = time.perf_counter() - start
                    scores = run_cli(["evaluate", str(model), str(val), *common])
                    info = json.loads((model / "model.json").read_text())
                    row = {
                        "data": name,
                        "head": head,
                        "search": search,
                        "C": info["head"]["params"].get("C"),
                        "n_train": trained["n_samples"],
                        "n_val": scores["n_samples"],
                        "cv_score": trained["cv_score"],
                        "accuracy": scores["accuracy"],
                        "balanced_accuracy": scores["balanced_accuracy"],
                        "macro_f1": scores["macro_f1"],
                        "positive_f1": (
                            scores["per_class"][positive]["f1"] if positive else None
                        ),
                        "train_seconds": round(seconds, 1),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    lines = [
        "### bneck train + evaluate on held-out data",
        "",
        "| data | head | C | train | val | CV acc | val acc | balanced acc "
        "| macro F1 | spam F1 | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        chosen = f"{row['C']:g} (search)" if row["search"] else "default"
        positive = "" if row["positive_f1"] is None else f"{row['positive_f1']:.4f}"
        lines.append(
            f"| {row['data']} | {row['head']} | {chosen} | {row['n_train']} | "
            f"{row['n_val']} | {row['cv_score']:.4f} | {row['accuracy']:.4f} | "
            f"{row['balanced_accuracy']:.4f} | {row['macro_f1']:.4f} | {positive} | "
            f"{row['train_seconds']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.md").write_text(text)
    (out / "heldout.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
