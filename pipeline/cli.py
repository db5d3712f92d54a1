"""The ``bneck`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

import numpy as np

from features import (
    ClusterError,
    ExportMismatchError,
    Extractor,
    InputError,
    StoreError,
    UnknownBackboneError,
    cache_dir,
    dask_client,
    extract_distributed,
    get_backbone,
    list_backbones,
    load_dataset,
)

from ._deploy import DeploymentMismatchError
from ._validation import (
    EXIT_SKIPPED,
    interrupts_in_finalizers,
    report_skipped,
    skipped_list_path,
)

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = {"image": "efficientnet_lite0", "text": "minilm_l6"}

#: Errors that are the user's to fix: one line, no traceback.
USER_ERRORS = (
    ClusterError,
    DeploymentMismatchError,
    ExportMismatchError,
    FileNotFoundError,
    ImportError,
    InputError,
    KeyError,
    PermissionError,
    StoreError,
    UnknownBackboneError,
    ValueError,
)

_COMMANDS: dict[str, Callable] = {}


def command(name: str):
    def register(function):
        _COMMANDS[name] = function
        return function

    return register


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        help="a folder of class subfolders, or a table (CSV, TSV, Parquet)",
    )
    parser.add_argument("--path-column", default="path")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument(
        "--columns",
        type=lambda value: value.split(","),
        help="column names of a table without a header, e.g. label,text",
    )


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone",
        help="backbone name (default: efficientnet_lite0 for images, "
        "minilm_l6 for text); see `bneck backbones`",
    )
    parser.add_argument(
        "--store",
        help="HDF5 feature store (default: features.h5 in the bneck cache)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, help="ONNX Runtime threads (default: all cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--commit-every",
        type=int,
        default=256,
        help="rows per committed shard: at most this many are lost to a kill",
    )
    parser.add_argument(
        "--on-error",
        choices=("skip", "raise"),
        default="skip",
        help="skip unusable inputs and list them (default), or stop at the first",
    )
    parser.add_argument(
        "--allow-skipped",
        action="store_true",
        help=f"exit 0 even if inputs were skipped (default: exit {EXIT_SKIPPED})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bneck",
        description="Classify small data sets with frozen pretrained networks.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("backbones", help="list the available backbones")
    sub.add_argument("--json", action="store_true")

    sub = commands.add_parser(
        "extract", help="compute bottleneck features into the store"
    )
    add_data_arguments(sub)
    add_extraction_arguments(sub)
    sub.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: quantize the backbone (images: calibrated on a sample of "
        "DATA) into its own store namespace; faster, features within cosine "
        "~0.99 of fp32 (see benchmarks/README.md)",
    )
    sub.add_argument(
        "--calibration",
        metavar="DATA",
        help="with --precision int8: calibrate on these images instead of DATA; "
        "give the same DATA (e.g. the training folder) when extracting each "
        "split, so all splits share one INT8 backbone",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON summary")
    cluster = sub.add_mutually_exclusive_group()
    cluster.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on the Dask cluster of this scheduler, e.g. tcp://host:8786; "
        "the workers must read the inputs at the same paths (needs bneck[dask])",
    )
    cluster.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run on a local Dask cluster of N worker processes (needs bneck[dask])",
    )
    add_model_parsers(commands)
    add_strategy_arguments(commands)
    return parser


def add_strategy_arguments(commands) -> None:
    """``bneck advise`` and the strategy options of ``bneck train``."""
    from ._strategy import DEFAULT_THRESHOLD, STRATEGIES

    sub = commands.add_parser(
        "advise", help="recommend bottleneck, fine-tuning or from-scratch training"
    )
    add_data_arguments(sub)
    add_extraction_arguments(sub)
    sub.add_argument("--val", help="validation DATA, checked for shared inputs")
    sub.add_argument("--cv", type=int, default=5, help="cross-validation folds")
    sub.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD)
    sub.add_argument("--json", action="store_true", help="print one JSON object")

    train = commands.choices["train"]
    train.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="auto: bottleneck below --threshold labelled samples, finetune from it",
    )
    train.add_argument(
        "--threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        help=f"samples from which auto fine-tunes (default {DEFAULT_THRESHOLD})",
    )
    train.add_argument(
        "--epochs", type=int, help="fine-tuning epochs (default: 20 images, 10 texts)"
    )
    train.add_argument(
        "--image-size", type=int, help="fine-tuning input side, a multiple of 32"
    )
    train.add_argument(
        "--frozen-blocks", type=int, help="blocks kept frozen (default: half)"
    )
    train.add_argument(
        "--lr",
        type=float,
        help="learning rate of the new head; pretrained layers learn 10x lower "
        "(default: 3e-3 images, 1e-3 texts)",
    )


def default_store_path():
    return cache_dir() / "features.h5"


def make_extractor(args, modality: str, calibration=None) -> Extractor:
    backbone = get_backbone(args.backbone or DEFAULT_BACKBONE[modality])
    if backbone.modality != modality:
        raise ValueError(
            f"backbone {backbone.name!r} takes {backbone.modality} inputs but the "
            f"data holds {modality}s; choose a {modality} backbone"
        )
    if getattr(args, "precision", "fp32") == "int8":
        backbone = backbone.quantized(calibration)
    return Extractor(
        backbone,
        store=args.store or default_store_path(),
        batch_size=args.batch_size,
        num_threads=args.threads,
        commit_every=args.commit_every,
        on_error=args.on_error,
        progress=False if args.no_progress else None,
    )


def read_data(args):
    dataset = load_dataset(
        args.data,
        path_column=args.path_column,
        text_column=args.text_column,
        label_column=args.label_column,
        columns=args.columns,
    )
    if getattr(args, "on_error", "skip") == "raise" and dataset.skipped:
        first = dataset.skipped[0]
        raise InputError(
            f"{first['source']}: {first['reason']} ({len(dataset.skipped)} entries "
            "unusable; --on-error skip lists them and goes on)"
        )
    return dataset


@command("backbones")
def run_backbones(args) -> int:
    rows = [get_backbone(name).describe() for name in list_backbones()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<20} {'modality':<8} {'dim':>5}  {'weights':<10} description")
    for row in rows:
        installed = "installed" if row["installed"] else "missing"
        print(
            f"{row['name']:<20} {row['modality']:<8} {row['feature_dim']:>5}  "
            f"{installed:<10} {row['description']}"
        )
    return 0


@command("extract")
def run_extract(args) -> int:
    dataset = read_data(args)
    calibration = dataset.items
    if args.precision == "int8" and args.calibration:
        calibration = load_dataset(args.calibration).items
    extractor = make_extractor(args, dataset.modality, calibration)
    if args.scheduler is not None or args.workers is not None:
        with dask_client(args.scheduler, workers=args.workers) as client:
            result = extract_distributed(
                extractor, dataset.items, client, dataset.sources
            )
    else:
        result = extractor.extract(dataset.items, dataset.sources)
    extractor.store.compact()
    summary = result.summary
    summary.failures = dataset.skipped + summary.failures
    summary.failed = len(summary.failures)
    summary.items += len(dataset.skipped)
    out = {
        **summary.as_dict(),
        "backbone": extractor.backbone.name,
        "fingerprint": extractor.fingerprint,
        "store": str(extractor.store.path),
    }
    if summary.failures:
        out["skipped_list"] = str(skipped_list_path(extractor.store.path))
    if args.json:
        print(json.dumps(out))
    else:
        print_summary(out)
    return report_skipped(
        "extract",
        summary.failures,
        extractor.store.path,
        allow_skipped=args.allow_skipped,
    )


def print_summary(out: dict) -> None:
    print(
        f"{out['items']} items: {out['computed']} computed, {out['cached']} "
        f"cached, {out['failed']} failed in {out['seconds']:.1f} s "
        f"({out['items_per_second']:.1f} items/s); store {out['store']}"
    )
    for failure in out["failures"][:20]:
        print(f"  failed: {failure['source']}: {failure['reason']}")
    if len(out["failures"]) > 20:
        print(f"  ... and {len(out['failures']) - 20} more (see --json)")


# ------------------------------------------------------------ train, predict,
# evaluate, demo: heads on bottleneck features and the MODEL_DIR they write.


def add_model_parsers(commands) -> None:
    from ._heads import HEADS

    sub = commands.add_parser(
        "train", help="fit a classifier head on bottleneck features"
    )
    add_data_arguments(sub)
    add_extraction_arguments(sub)
    sub.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder")
    sub.add_argument("--classifier", choices=HEADS, default="svm")
    sub.add_argument(
        "--cv",
        type=int,
        help="cross-validation folds (0: none; default 5 for a head on bottleneck "
        "features, none when fine-tuning: each fold is a training)",
    )
    sub.add_argument(
        "--search", action="store_true", help="choose C by a cross-validated search"
    )
    sub.add_argument(
        "--class-weight",
        choices=("none", "balanced"),
        default="none",
        help="balanced: weight classes inversely to their frequency",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON summary")

    for name, text in [
        ("predict", "predict labels of DATA with a trained model"),
        ("evaluate", "score a trained model on labelled DATA"),
    ]:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("model_dir", metavar="MODEL_DIR")
        add_data_arguments(sub)
        add_extraction_arguments(sub)
        sub.add_argument("--json", action="store_true", help="print a JSON summary")
    commands.choices["predict"].add_argument(
        "--out", required=True, help="CSV file: one row per input"
    )
    commands.choices["evaluate"].add_argument(
        "--report", metavar="DIR", help="write scores, plots and tables into DIR"
    )

    sub = commands.add_parser(
        "export",
        help="write MODEL_DIR as one ONNX graph: preprocessed input to label",
    )
    sub.add_argument("model_dir", metavar="MODEL_DIR")
    sub.add_argument("--out", required=True, help="the .onnx file to write")
    sub.add_argument(
        "--keep-features",
        action="store_true",
        help="also output the bottleneck vector as 'features'",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON summary")

    sub = commands.add_parser(
        "demo", help="train and evaluate on scikit-learn's bundled digits"
    )
    sub.add_argument(
        "--workdir", help="folder for the images, store and model (default: cache)"
    )
    sub.add_argument("--size", type=int, default=32, help="side of the digit images")
    sub.add_argument("--json", action="store_true", help="print a JSON summary")


def model_extractor(args, backbone) -> Extractor:
    """An extractor of a trained model's backbone with the CLI's settings."""
    return Extractor(
        backbone,
        store=args.store or default_store_path(),
        batch_size=args.batch_size,
        num_threads=args.threads,
        commit_every=args.commit_every,
        on_error=args.on_error,
        progress=False if args.no_progress else None,
    )


def extract_usable(extractor, dataset):
    """Extract DATA; return its usable rows' features, their mask, failures."""
    result = extractor.extract(dataset.items, dataset.sources)
    extractor.store.compact()
    keys = [key for key in result.keys if key is not None]
    features = extractor.features(keys)
    failures = dataset.skipped + result.summary.failures
    return features, result.ok, result.summary, failures


@command("advise")
def run_advise(args) -> int:
    from ._advise import advise_command

    return advise_command(args)


@command("train")
def run_train(args) -> int:
    from ._heads import fit_head
    from ._model_dir import save_model
    from ._strategy import choose_strategy
    from ._validation import check_training_labels

    dataset = read_data(args)
    labels = [None] * len(dataset) if dataset.labels is None else dataset.labels
    check_training_labels(list(labels), args.cv)
    strategy = choose_strategy(len(dataset), args.threshold, args.strategy)
    if strategy != "bottleneck":
        from ._finetune import train_command

        return train_command(args, dataset, strategy)
    args.cv = 5 if args.cv is None else args.cv
    extractor = make_extractor(args, dataset.modality)
    features, ok, summary, failures = extract_usable(extractor, dataset)
    labels = dataset.labels[ok]
    check_training_labels(list(labels), args.cv)
    class_weight = None if args.class_weight == "none" else args.class_weight
    fitted = fit_head(
        features,
        labels,
        args.classifier,
        cv=args.cv,
        search=args.search,
        class_weight=class_weight,
        modality=dataset.modality,
    )
    classes, counts = np.unique(labels, return_counts=True)
    training = {
        "data": str(args.data),
        "modality": dataset.modality,
        "n_samples": int(len(labels)),
        "class_counts": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        "skipped": len(failures),
    }
    cv = {
        "folds": fitted.cv_folds,
        "metric": "accuracy",
        "scores": [round(score, 4) for score in fitted.cv_scores],
        "mean": None if fitted.cv_score is None else round(fitted.cv_score, 4),
        "std": round(float(np.std(fitted.cv_scores)), 4) if fitted.cv_scores else None,
    }
    save_model(
        args.out,
        extractor.backbone,
        fitted.estimator,
        training=training,
        cv=cv,
        search=fitted.search,
        head_kind=args.classifier,
        best_params=fitted.best_params,
    )
    out = {
        "n_samples": training["n_samples"],
        "classes": [str(c) for c in classes],
        "class_counts": training["class_counts"],
        "computed": summary.computed,
        "cached": summary.cached,
        "cv_score": cv["mean"],
        "cv_scores": cv["scores"],
        "cv_folds": cv["folds"],
        "classifier": args.classifier,
        "best_params": fitted.best_params,
        "search": fitted.search,
        "backbone": extractor.backbone.name,
        "fingerprint": extractor.fingerprint,
        "model_dir": str(args.out),
        "extract_seconds": round(summary.seconds, 3),
        "fit_seconds": round(fitted.seconds, 3),
        "failed": len(failures),
        "failures": failures,
    }
    if args.json:
        print(json.dumps(out))
    else:
        score = (
            ""
            if out["cv_score"] is None
            else (
                f"; {cv['folds']}-fold CV accuracy {cv['mean']:.4f} +- {cv['std']:.4f}"
            )
        )
        chosen = f" (search chose C={fitted.best_params['C']:g})" if args.search else ""
        print(
            f"trained {args.classifier} on {out['n_samples']} samples of "
            f"{len(classes)} classes with {out['backbone']} ({summary.computed} "
            f"computed, {summary.cached} from the store){chosen}{score}; "
            f"model {args.out}"
        )
    return report_skipped("train", failures, args.out, allow_skipped=args.allow_skipped)


def load_for(args):
    """The model of MODEL_DIR, DATA, and its usable features."""
    from ._model_dir import load_model

    model = load_model(args.model_dir, backbone=args.backbone)
    dataset = read_data(args)
    if dataset.modality != model.backbone.modality:
        raise ValueError(
            f"the model in {args.model_dir} takes {model.backbone.modality} inputs "
            f"but {args.data} holds {dataset.modality}s"
        )
    extractor = model_extractor(args, model.backbone)
    features, ok, summary, failures = extract_usable(extractor, dataset)
    return model, dataset, features, ok, failures


@command("predict")
def run_predict(args) -> int:
    import csv

    model, dataset, features, ok, failures = load_for(args)
    classes = [str(label) for label in model.classes_]
    proba = model.head.predict_proba(features) if len(features) else np.empty((0, 0))
    predicted = model.head.predict(features) if len(features) else []
    reasons = {failure["source"]: failure["reason"] for failure in failures}
    rows = iter(zip(predicted, proba, strict=True))
    with open(args.out, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["source", "predicted", *[f"p_{c}" for c in classes], "error"])
        for source, usable in zip(dataset.sources, ok, strict=True):
            if usable:
                label, row = next(rows)
                writer.writerow([source, label, *[f"{p:.6f}" for p in row], ""])
            else:
                writer.writerow([source, "", *[""] * len(classes), reasons[source]])
        for skipped in dataset.skipped:
            writer.writerow(
                [skipped["source"], "", *[""] * len(classes), skipped["reason"]]
            )
    labels, counts = np.unique(np.asarray(predicted, dtype=str), return_counts=True)
    out = {
        "predicted": int(ok.sum()),
        "counts": {str(c): int(n) for c, n in zip(labels, counts, strict=True)},
        "out": str(args.out),
        "failed": len(failures),
        "failures": failures,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"predicted {out['predicted']} inputs "
            + ", ".join(f"{c}: {n}" for c, n in out["counts"].items())
            + f"; wrote {args.out}"
        )
    return report_skipped(
        "predict", failures, args.out, allow_skipped=args.allow_skipped
    )


@command("evaluate")
def run_evaluate(args) -> int:
    from ._evaluate import classification_scores, format_scores, write_report

    model, dataset, features, ok, failures = load_for(args)
    if dataset.labels is None or any(label is None for label in dataset.labels):
        raise ValueError(
            f"{args.data} has no labels to evaluate against; use bneck predict"
        )
    if not ok.any():
        raise InputError(f"no usable inputs in {args.data}")
    scores = classification_scores(
        dataset.labels[ok], model.head.predict(features), model.classes_
    )
    out = {**scores, "failed": len(failures), "failures": failures}
    if args.report:
        files = write_report(scores, args.report, model.info.get("search"))
        out["report"] = [str(path) for path in files]
    if args.json:
        print(json.dumps(out))
    else:
        print(format_scores(scores))
        if args.report:
            print(f"\nreport: {args.report}")
    return report_skipped(
        "evaluate",
        failures,
        args.report or args.model_dir,
        allow_skipped=args.allow_skipped,
    )


@command("export")
def run_export(args) -> int:
    from ._deploy import export_model

    out = export_model(args.model_dir, args.out, keep_features=args.keep_features)
    if args.json:
        print(json.dumps(out))
        return 0
    inputs, outputs = ", ".join(out["inputs"]), ", ".join(out["outputs"])
    print(
        f"wrote {out['out']} ({out['bytes'] / 1e6:.1f} MB): inputs {inputs} -> "
        f"outputs {outputs}; classes {out['classes']}; matches the model within "
        f"{out['max_proba_diff']:.1e} on sample inputs"
    )
    if out["preprocessing"]["kind"] == "text":
        print("tokenize texts with tokenizer.json from MODEL_DIR before the graph")
    else:
        print("preprocess images as model metadata 'bneck.preprocessing' says")
    return 0


@command("demo")
def run_demo(args) -> int:
    from ._demo import run_demo as demo

    out = demo(workdir=args.workdir, size=args.size, echo=not args.json)
    if args.json:
        print(json.dumps(out))
    return 0


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="bneck: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bneck`` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        with interrupts_in_finalizers():
            return _COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"bneck {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"bneck {args.command}: interrupted; rows committed so far are kept, "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
