"""Fine-tuned against frozen bottleneck features, with the time each takes.

Two comparisons, each on a fixed split:

* clothing (``clothing_dataset_small``): EfficientNet-Lite0, train on
  ``train/`` (1,000 images), score on ``val/`` (341 images);
* SMS spam: MiniLM-L6, stratified 80/20 split with ``random_state=0``;
  accuracy and the F1 score of ``spam``.

The frozen result is a linear head (logistic regression and the default SVM,
both as ``bneck train`` fits them) on the backbone's bottleneck features;
the fine-tuned result is :class:`pipeline.FineTunedClassifier` with its
defaults unless ``--epochs`` says otherwise. Times are wall-clock on the
machine it runs on, feature extraction included for the frozen result.

Usage::

    python benchmarks/bench_finetune.py --out results.json
    python benchmarks/bench_finetune.py --only sms --epochs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def frozen(backbone, train, val, store) -> dict:
    """Linear heads on frozen bottleneck features: val scores and seconds."""
    from features import get_backbone
    from pipeline._estimators import BottleneckFeatures
    from pipeline._heads import make_head

    modality = get_backbone(backbone).modality
    start = time.perf_counter()
    features = BottleneckFeatures(backbone, store=store, progress=False)
    X_train = features.transform(train[0])
    X_val = features.transform(val[0])
    extract_seconds = time.perf_counter() - start
    out = {"extract_seconds": round(extract_seconds, 1)}
    for head in ("logreg", "svm"):
        start = time.perf_counter()
        model = make_head(head, probability=False, modality=modality)
        predicted = model.fit(X_train, train[1]).predict(X_val)
        out[head] = scores(val[1], predicted) | {
            "head_seconds": round(time.perf_counter() - start, 1)
        }
    return out


def finetuned(backbone, train, val, epochs, checkpoint_dir, **params) -> dict:
    """Fine-tune on train, score on val, export and check the exported model."""
    from features import Extractor
    from pipeline._finetune import FineTunedClassifier

    model = FineTunedClassifier(
        backbone,
        epochs=epochs,
        checkpoint_dir=checkpoint_dir,
        progress=sys.stderr.isatty(),
        **params,
    )
    start = time.perf_counter()
    model.fit(*train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = model.predict(val[0])
    predict_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        exported, report = model.export_backbone(folder)
        features = Extractor(exported).extract_features(val[0])
        through_onnx = model.head().predict(features)
    return scores(val[1], predicted) | {
        "fit_seconds": round(fit_seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "epochs_run": len(model.history_),
        "best_epoch": model.best_epoch_,
        "history": [
            {
                key: record[key]
                for key in ("epoch", "train_loss", "val_accuracy", "seconds")
            }
            | {"samples_per_second": round(record["samples_per_second"], 1)}
            for record in model.history_
        ],
        "onnx_max_abs_diff": report["max_abs_diff"],
        "onnx_accuracy": float(accuracy_score(val[1], through_onnx)),
    }


def scores(truth, predicted) -> dict:
    out = {"accuracy": round(float(accuracy_score(truth, predicted)), 4)}
    if "spam" in set(truth):
        out["spam_f1"] = round(float(f1_score(truth, predicted, pos_label="spam")), 4)
    return out


def clothing_split():
    from features import load_dataset

    train = load_dataset(DATA / "clothing_dataset_small" / "train")
    val = load_dataset(DATA / "clothing_dataset_small" / "val")
    return (train.items, train.labels), (val.items, val.labels)


def sms_split():
    from features import load_dataset

    data = load_dataset(
        DATA / "sms_spam_collection" / "SMSSpamCollection", columns=["label", "text"]
    )
    items = np.asarray(data.items, dtype=object)
    train_x, val_x, train_y, val_y = train_test_split(
        items, data.labels, test_size=0.2, stratify=data.labels, random_state=0
    )
    return (list(train_x), train_y), (list(val_x), val_y)


def run(name: str, args, work: Path) -> dict:
    if name == "clothing":
        backbone, (train, val) = "efficientnet_lite0", clothing_split()
        epochs = args.epochs  # None: the classifier's default for images
    else:
        backbone, (train, val) = "minilm_l6", sms_split()
        epochs = args.epochs or 3
    params = {}
    if args.image_size and backbone == "efficientnet_lite0":
        params["image_size"] = args.image_size
    if args.frozen_blocks is not None:
        params["frozen_blocks"] = args.frozen_blocks
    if args.max_steps:
        params["max_steps_per_epoch"] = args.max_steps
    params["random_state"] = args.seed
    if args.limit:
        train, val = subset(train, args.limit), subset(val, args.limit)
    print(f"{name}: {len(train[0])} train, {len(val[0])} val", flush=True)
    result = {"backbone": backbone, "n_train": len(train[0]), "n_val": len(val[0])}
    result["frozen"] = frozen(backbone, train, val, store=work / "store.h5")
    print(f"{name} frozen: {json.dumps(result['frozen'])}", flush=True)
    result["finetuned"] = finetuned(
        backbone, train, val, epochs, work / f"checkpoint-{name}", **params
    )
    print(f"{name} fine-tuned: {json.dumps(result['finetuned'])}", flush=True)
    best_frozen = max(result["frozen"][h]["accuracy"] for h in ("logreg", "svm"))
    result["gain_points"] = round(
        100 * (result["finetuned"]["accuracy"] - best_frozen), 2
    )
    return result


def subset(split, n: int):
    """A random ``n`` of a split (the same for every run)."""
    chosen = np.random.default_rng(0).permutation(len(split[0]))[:n]
    return [split[0][i] for i in chosen], np.asarray(split[1])[chosen]


def table(results: dict) -> str:
    """The comparison as a Markdown table."""
    lines = [
        "| data | model | accuracy | spam F1 | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for name, result in results.items():
        frozen = result["frozen"]
        for head in ("logreg", "svm"):
            row = frozen[head]
            seconds = frozen["extract_seconds"] + row["head_seconds"]
            spam = f"{row['spam_f1']:.4f}" if "spam_f1" in row else ""
            lines.append(
                f"| {name} | frozen + {head} | {row['accuracy']:.4f} | {spam} | "
                f"{seconds:.1f} |"
            )
        row = result["finetuned"]
        spam = f"{row['spam_f1']:.4f}" if "spam_f1" in row else ""
        lines.append(
            f"| {name} | fine-tuned ({row['epochs_run']} epochs, best "
            f"{row['best_epoch']}) | {row['accuracy']:.4f} | {spam} | "
            f"{row['fit_seconds']:.1f} |"
        )
    lines.append("")
    for name, result in results.items():
        lines.append(
            f"- {name}: fine-tuned minus the best frozen head: "
            f"{result['gain_points']} points"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("clothing", "sms"), action="append")
    parser.add_argument(
        "--epochs", type=int, help="default: the classifier's (20) clothing, 3 sms"
    )
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--frozen-blocks", type=int, help="default: half")
    parser.add_argument("--max-steps", type=int, help="steps per epoch (trials)")
    parser.add_argument("--limit", type=int, help="first N of each split (trials)")
    parser.add_argument(
        "--seed", type=int, default=0, help="fine-tuning's random_state (default 0)"
    )
    parser.add_argument("--work", help="folder for the store and checkpoints")
    parser.add_argument(
        "--out", help="write the results as JSON here (and the table as .md)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    results = {}
    for name in args.only or ("clothing", "sms"):
        results[name] = run(name, args, work)
    text = table(results)
    print()
    print(text)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"meta": meta, **results}, indent=2))
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
