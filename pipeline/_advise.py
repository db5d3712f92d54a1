"""``bneck advise``: which strategy suits a data set, with the evidence.

The report counts samples and classes, finds duplicate inputs by content
(and inputs of a validation set that also appear in the training set), and
compares two cross-validated linear models: one on the backbone's frozen
bottleneck features, one on the raw inputs (small downsampled pixels for
images, TF-IDF for texts). :func:`pipeline._strategy.recommend` turns those
numbers into ``bottleneck``, ``finetune`` or ``from_scratch``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features import (
    Dataset,
    Extractor,
    FeatureStore,
    InputError,
    MemoryStore,
    content_key,
    get_backbone,
    load_dataset,
)
from features._keymemo import KeyMemo
from features._preprocess import _to_rgb, read_input_bytes

from ._heads import make_head
from ._strategy import DEFAULT_THRESHOLD, recommend

__all__ = ["advise", "format_advice", "raw_pixels"]

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = {"image": "efficientnet_lite0", "text": "minilm_l6"}

#: Side of the downsampled images of the raw-pixel baseline.
BASELINE_SIDE = 16

FROM_SCRATCH_WARNING = (
    "pretrained features do no better than a linear model on the raw inputs: "
    "the domain looks far from the pretraining data. Train from scratch "
    "(bneck train --strategy scratch) or find a backbone pretrained on this "
    "kind of data."
)


def advise(
    dataset: Dataset | str | os.PathLike,
    *,
    val: Dataset | str | os.PathLike | None = None,
    backbone: str | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    cv: int = 5,
    store: FeatureStore | MemoryStore | str | os.PathLike | None = None,
    random_state: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Recommend a training strategy for a labelled data set, with evidence.

    Parameters
    ----------
    dataset : Dataset or path
        The labelled training data (a folder of class folders or a table).
    val : Dataset or path, optional
        A validation set, checked for inputs it shares with ``dataset``.
    backbone : str, optional
        Defaults to ``efficientnet_lite0`` for images, ``minilm_l6`` for texts.
    threshold : int, default=1000
        Samples from which fine-tuning is recommended over a linear head.
    cv : int, default=5
        Stratified folds of both cross-validated accuracies (fewer when the
        smallest class is smaller).
    store : FeatureStore, MemoryStore or path, optional
        Where bottleneck features are cached; defaults to the bneck cache's
        ``features.h5``.

    Returns
    -------
    report : dict
        ``n_samples``, ``n_classes``, ``class_counts``, ``imbalance_ratio``,
        ``duplicates``, ``leakage`` (None without ``val``),
        ``bottleneck_cv_accuracy``, ``baseline_cv_accuracy`` (and their
        ``_std``), ``cv_folds``, ``baseline``, ``backbone``,
        ``recommendation``, ``reasons``, ``warning`` and ``seconds``.

    Examples
    --------
    >>> from features import Dataset, MemoryStore
    >>> texts = ["win cash now", "free prize, call", "claim your reward",
    ...          "lunch at noon?", "see you later", "call me tonight"]
    >>> data = Dataset(texts, np.array(["spam"] * 3 + ["ham"] * 3, dtype=object),
    ...                texts, "text")
    >>> report = advise(data, cv=3, store=MemoryStore())
    >>> report["n_samples"], report["recommendation"] in ("bottleneck",
    ...                                                    "from_scratch")
    (6, True)
    """
    start = time.perf_counter()
    dataset = _as_dataset(dataset)
    if not dataset.labelled:
        raise ValueError(
            "advise needs labels: give a folder of class subfolders or a table "
            "with a label column"
        )
    name = backbone or DEFAULT_BACKBONE[dataset.modality]
    model = get_backbone(name)
    if model.modality != dataset.modality:
        raise ValueError(
            f"backbone {name!r} takes {model.modality} inputs but the data holds "
            f"{dataset.modality}s; choose a {dataset.modality} backbone"
        )
    labels = np.asarray(dataset.labels).astype(str)
    keys = _keys(dataset)
    report: dict[str, Any] = {
        "n_samples": len(dataset),
        "modality": dataset.modality,
        "backbone": model.name,
        "threshold": threshold,
        **_class_report(labels),
        "duplicates": _duplicates(keys, labels, dataset.sources),
        "leakage": None,
        "skipped": [*dataset.skipped],
    }
    if val is not None:
        report["leakage"] = _leakage(keys, _as_dataset(val))

    folds = _folds(labels, cv)
    report["cv_folds"] = folds
    bottleneck, failed = _bottleneck_scores(
        dataset, labels, model, store, folds, random_state, progress
    )
    report["skipped"] += failed
    baseline, description = _baseline_scores(dataset, labels, folds, random_state)
    report["baseline"] = description
    for key, scores in (("bottleneck", bottleneck), ("baseline", baseline)):
        report[f"{key}_cv_accuracy"] = _mean(scores)
        report[f"{key}_cv_std"] = float(np.std(scores)) if scores else None
        report[f"{key}_cv_scores"] = [round(score, 4) for score in scores]

    report["recommendation"] = recommend(
        report["n_samples"],
        report["bottleneck_cv_accuracy"],
        report["baseline_cv_accuracy"],
        threshold,
    )
    report["reasons"] = _reasons(report)
    report["warning"] = (
        FROM_SCRATCH_WARNING if report["recommendation"] == "from_scratch" else None
    )
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _as_dataset(data: Dataset | str | os.PathLike) -> Dataset:
    if isinstance(data, Dataset):
        return data
    return load_dataset(data)


def _keys(dataset: Dataset) -> list[str | None]:
    def one(item):
        try:
            return content_key(item, dataset.modality)
        except InputError:
            return None

    if dataset.modality == "text":
        return [one(item) for item in dataset.items]
    # Through the key memo, so the extraction that follows reads no file again.
    return KeyMemo().keys(dataset.items, one, min(4, os.cpu_count() or 1))


def _class_report(labels: np.ndarray) -> dict[str, Any]:
    counts = Counter(labels.tolist())
    ordered = dict(sorted(counts.items(), key=lambda pair: (-pair[1], pair[0])))
    smallest = min(counts.values()) if counts else 0
    return {
        "n_classes": len(counts),
        "class_counts": ordered,
        "imbalance_ratio": round(max(counts.values()) / smallest, 2)
        if smallest
        else None,
    }


def _duplicates(keys, labels, sources) -> dict[str, Any]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        if key is not None:
            groups[key].append(index)
    repeated = [members for members in groups.values() if len(members) > 1]
    conflicting = [m for m in repeated if len({labels[i] for i in m}) > 1]
    return {
        "groups": len(repeated),
        "extra_copies": sum(len(members) - 1 for members in repeated),
        "conflicting_labels": len(conflicting),
        "examples": [
            [f"{sources[i]} ({labels[i]})" for i in members]
            for members in (conflicting + repeated)[:5]
        ],
    }


def _leakage(train_keys, val: Dataset) -> dict[str, Any]:
    known = {key for key in train_keys if key is not None}
    val_keys = _keys(val)
    shared = [i for i, key in enumerate(val_keys) if key is not None and key in known]
    return {
        "n_val": len(val),
        "shared": len(shared),
        "examples": [val.sources[i] for i in shared[:5]],
    }


def _folds(labels: np.ndarray, cv: int) -> int:
    smallest = min(Counter(labels.tolist()).values())
    folds = min(cv, smallest)
    if len(set(labels.tolist())) < 2:
        raise ValueError("advise needs at least two classes")
    if folds < 2:
        raise ValueError(
            f"the smallest class has {smallest} sample(s); cross-validation "
            "needs at least 2 per class"
        )
    return folds


def _bottleneck_scores(dataset, labels, model, store, folds, seed, progress):
    if store is None:
        from ._estimators import default_store

        store = default_store()
    extractor = Extractor(model, store, progress=progress)
    result = extractor.extract(dataset.items, dataset.sources)
    failed = result.summary.failures
    ok = result.ok
    features = extractor.features([key for key in result.keys if key is not None])
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    head = make_head("logreg", modality=dataset.modality)
    scores = cross_val_score(head, features, labels[ok], cv=splitter)
    return [float(score) for score in scores], failed


def _baseline_scores(dataset, labels, folds, seed) -> tuple[list[float], str]:
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    if dataset.modality == "text":
        from sklearn.feature_extraction.text import TfidfVectorizer

        model = make_pipeline(
            TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1),
            LogisticRegression(C=10.0, max_iter=2000),
        )
        X: Any = np.asarray(dataset.items, dtype=object)
        y = labels
        description = "TF-IDF of words and word pairs + logistic regression"
    else:
        pixels = raw_pixels(dataset.items)
        ok = ~np.isnan(pixels).any(axis=1)
        X, y = pixels[ok], labels[ok]
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.01, max_iter=2000)
        )
        description = (
            f"{BASELINE_SIDE}x{BASELINE_SIDE} colour pixels + logistic regression"
        )
    scores = cross_val_score(model, X, y, cv=splitter)
    return [float(score) for score in scores], description


def raw_pixels(items, side: int = BASELINE_SIDE) -> np.ndarray:
    """Images shrunk to ``side`` x ``side`` RGB, flattened, scaled to [0, 1].

    The shorter side is centre-cropped to a square first. Rows of images
    that cannot be read are NaN.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (40, 30), "white").save(buffer, format="PNG")
    >>> raw_pixels([buffer.getvalue()], side=4).shape
    (1, 48)
    """
    from PIL import Image, ImageOps

    def one(item):
        try:
            image = Image.open(_bytes_io(read_input_bytes(item)))
            image.draft("RGB", (4 * side, 4 * side))
            image = _to_rgb(ImageOps.exif_transpose(image))
            image = ImageOps.fit(image, (side, side), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.float32).reshape(-1) / 255.0
        except Exception as exc:  # noqa: BLE001 - unreadable images become NaN
            logger.info("baseline skips %s: %s", str(item)[:80], exc)
            return np.full(side * side * 3, np.nan, np.float32)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(one, items))
    return np.stack(rows) if rows else np.empty((0, side * side * 3), np.float32)


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


def _mean(scores: list[float]) -> float | None:
    return float(np.mean(scores)) if scores else None


def _reasons(report: dict) -> list[str]:
    n, threshold = report["n_samples"], report["threshold"]
    bottleneck = report["bottleneck_cv_accuracy"]
    baseline = report["baseline_cv_accuracy"]
    gap = 100 * (bottleneck - baseline)
    reasons = []
    if report["recommendation"] == "from_scratch":
        reasons.append(
            f"bottleneck features score {bottleneck:.3f}, no better than the raw "
            f"baseline's {baseline:.3f} ({gap:+.1f} points)"
        )
    else:
        reasons.append(
            f"bottleneck features beat the raw baseline by {gap:.1f} points "
            f"({bottleneck:.3f} vs {baseline:.3f})"
        )
        side = ">=" if n >= threshold else "<"
        reasons.append(f"{n:,} labelled samples {side} the threshold of {threshold:,}")
    if report["imbalance_ratio"] and report["imbalance_ratio"] >= 3:
        reasons.append(
            f"classes are imbalanced ({report['imbalance_ratio']:.1f}x): consider "
            "class weights (--class-weight balanced) and per-class metrics"
        )
    return reasons


_NEXT_STEP = {
    "bottleneck": "bneck train DATA --strategy bottleneck",
    "finetune": "bneck train DATA --strategy finetune",
    "from_scratch": "bneck train DATA --strategy scratch",
}


def format_advice(report: dict, data: str = "DATA") -> str:
    """The report as a few lines a person can act on."""
    lines = [
        f"{data}: {report['n_samples']:,} {report['modality']} samples in "
        f"{report['n_classes']} classes"
    ]
    counts = ", ".join(f"{k} {v}" for k, v in report["class_counts"].items())
    lines.append(f"  per class: {counts}")
    lines.append(
        f"  imbalance: {report['imbalance_ratio']}x (largest / smallest class)"
    )
    duplicates = report["duplicates"]
    if duplicates["groups"]:
        lines.append(
            f"  duplicates: {duplicates['extra_copies']} inputs repeat another's "
            f"content ({duplicates['groups']} groups, "
            f"{duplicates['conflicting_labels']} with conflicting labels); e.g. "
            + " = ".join(duplicates["examples"][0])
        )
    else:
        lines.append("  duplicates: none (by content hash)")
    leakage = report["leakage"]
    if leakage is not None:
        if leakage["shared"]:
            lines.append(
                f"  leakage: {leakage['shared']} of {leakage['n_val']} validation "
                f"inputs also appear in the training data, e.g. "
                f"{leakage['examples'][0]}"
            )
        else:
            lines.append(
                f"  leakage: none of {leakage['n_val']} validation inputs appears "
                "in the training data"
            )
    if report["skipped"]:
        lines.append(f"  skipped: {len(report['skipped'])} unreadable inputs")
    folds = report["cv_folds"]
    lines.append(
        f"  {folds}-fold CV accuracy, bottleneck {report['backbone']} + logistic "
        f"regression: {_score(report, 'bottleneck')}"
    )
    lines.append(
        f"  {folds}-fold CV accuracy, raw baseline ({report['baseline']}): "
        f"{_score(report, 'baseline')}"
    )
    lines.append(f"recommendation: {report['recommendation']}")
    for reason in report["reasons"]:
        lines.append(f"  - {reason}")
    if report["warning"]:
        lines.append(f"warning: {report['warning']}")
    lines.append(f"next: {_NEXT_STEP[report['recommendation']].replace('DATA', data)}")
    return "\n".join(lines)


def _score(report: dict, key: str) -> str:
    mean, std = report[f"{key}_cv_accuracy"], report[f"{key}_cv_std"]
    return f"{mean:.3f} ± {std:.3f}"


def advise_command(args) -> int:
    """``bneck advise DATA [--val DATA] [--json]``."""
    import json

    def read(path):
        return load_dataset(
            path,
            path_column=args.path_column,
            text_column=args.text_column,
            label_column=args.label_column,
            columns=args.columns,
        )

    report = advise(
        read(args.data),
        val=read(args.val) if args.val else None,
        backbone=args.backbone,
        threshold=args.threshold,
        cv=args.cv,
        store=args.store,
        progress=False if args.no_progress else None,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_advice(report, str(args.data)))
    return 0


def follow_advice(
    paths: list,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    store: FeatureStore | MemoryStore | str | os.PathLike | None = None,
    image_size: int = 32,
    epochs: int = 4,
    augment: bool = True,
    threshold: int = DEFAULT_THRESHOLD,
    random_state: int = 0,
    echo: bool = True,
) -> dict[str, Any]:
    """Run :func:`advise` on a training split, then train as it recommends.

    For ``finetune`` or ``from_scratch`` the network is trained on the
    training split and scored on the test split; for ``bottleneck`` nothing
    more is trained (the caller has that result already).

    Returns
    -------
    dict
        ``advice`` (the report), ``trained`` (``strategy``, ``accuracy``,
        ``seconds``, ``epochs``, ``image_size``; None for ``bottleneck``).
    """
    from ._finetune import FineTunedClassifier

    say = print if echo else logger.info
    labels = np.asarray(labels).astype(str)
    data = Dataset(
        [paths[i] for i in train],
        labels[train].astype(object),
        [str(paths[i]) for i in train],
        "image",
    )
    say(f"advise: cross-validating frozen features and raw pixels, {len(train)} images")
    report = advise(
        data, store=store, threshold=threshold, random_state=random_state,
        progress=False,
    )  # fmt: skip
    for line in format_advice(report, "the training digits").splitlines():
        say(f"  {line}")
    out: dict[str, Any] = {"advice": report, "trained": None}
    if report["recommendation"] == "bottleneck":
        return out
    strategy = "finetune" if report["recommendation"] == "finetune" else "scratch"
    say(
        f"following it: {strategy} at {image_size}x{image_size} px for {epochs} "
        f"epochs{'' if augment else ', no augmentation'} (shortened for the demo)"
    )
    start = time.perf_counter()
    model = FineTunedClassifier(
        strategy=strategy,
        image_size=image_size,
        epochs=epochs,
        augment=augment,
        random_state=random_state,
        progress=None if echo else False,
    )
    model.fit(data.items, labels[train])
    from sklearn.metrics import accuracy_score, f1_score

    predicted = model.predict([paths[i] for i in test])
    out["trained"] = {
        "strategy": strategy,
        "accuracy": round(float(accuracy_score(labels[test], predicted)), 4),
        "macro_f1": round(float(f1_score(labels[test], predicted, average="macro")), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "epochs": len(model.history_),
        "image_size": image_size,
    }
    return out
