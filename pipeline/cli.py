"""The ``bneck`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

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
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar"
    )
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
    return parser


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
    extractor = make_extractor(args, dataset.modality, dataset.items)
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
