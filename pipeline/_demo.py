"""``bneck demo``: the main job on data every installation has.

scikit-learn ships 1,797 handwritten digits as 8x8 images. The demo writes
them as PNG files into class folders, splits them (stratified), extracts
bottleneck features with the default image backbone, trains and saves a
head, evaluates it on the held-out part, and sets the result beside a
logistic regression on the raw 64 pixels.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from features import Extractor, cache_dir, get_backbone

from ._evaluate import classification_scores
from ._heads import fit_head
from ._model_dir import load_model, save_model

__all__ = ["run_demo", "write_digits"]

logger = logging.getLogger(__name__)

BACKBONE = "efficientnet_lite0"


def write_digits(folder: str | os.PathLike, size: int = 32) -> tuple[list, np.ndarray]:
    """Write scikit-learn's digits as ``folder/<digit>/<index>.png``.

    Parameters
    ----------
    folder : path
    size : int, default=32
        Side of each image; the 8x8 originals are enlarged (bicubic).

    Returns
    -------
    paths : list of str
    labels : ndarray of str
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size={size}; expected at least 8 (the originals' side)")
    digits = load_digits()
    folder = Path(folder)
    paths = []
    for index, (image, label) in enumerate(
        zip(digits.images, digits.target, strict=True)
    ):
        path = folder / str(label) / f"{index:04d}.png"
        paths.append(str(path))
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * 255.0 / 16.0).astype(np.uint8)
        enlarged = Image.fromarray(pixels, mode="L").resize(
            (size, size), Image.Resampling.BICUBIC
        )
        enlarged.save(path)
    return paths, digits.target.astype(str)


def run_demo(
    workdir: str | os.PathLike | None = None,
    *,
    size: int = 32,
    test_size: float = 0.25,
    random_state: int = 0,
    per_class: int | None = None,
    echo: bool = True,
    follow: bool = True,
    epochs: int = 4,
) -> dict:
    """Train and evaluate on the digits; compare with raw pixels.

    Parameters
    ----------
    workdir : path, optional
        Where the images, the feature store and the model go; defaults to
        ``demo/`` in the bneck cache folder. A second run reuses them.
    size : int, default=32
        Side of the digit images written.
    test_size : float, default=0.25
        Held-out fraction (stratified).
    per_class : int, optional
        Use only the first ``per_class`` digits of each class (a quick run).
    echo : bool, default=True
        Print the steps and the comparison.
    follow : bool, default=True
        Run ``advise`` on the training digits and train as it recommends
        (fine-tune or from scratch), at the images' size rounded to a
        multiple of 32 and for ``epochs`` epochs: shortened for the demo.

    Returns
    -------
    dict
        ``bottleneck`` and ``raw_pixels`` scores (accuracy, macro_f1,
        seconds), split sizes, paths, and ``winner``.
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    say = print if echo else logger.info
    workdir = Path(workdir) if workdir is not None else cache_dir() / "demo"
    images = workdir / f"digits{size}"
    say(f"writing scikit-learn's 1,797 digits as {size}x{size} PNG files to {images}")
    paths, labels = write_digits(images, size)
    indices = np.arange(len(paths))
    if per_class is not None:
        indices = np.concatenate(
            [np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)]
        )
    train, test = train_test_split(
        indices,
        test_size=test_size,
        stratify=labels[indices],
        random_state=random_state,
    )

    start = time.perf_counter()
    extractor = Extractor(
        BACKBONE, workdir / "features.h5", progress=None if echo else False
    )
    say(f"extracting {BACKBONE} features of {len(indices)} images (once; cached)")
    features = np.zeros((len(paths), extractor.backbone.feature_dim), np.float32)
    features[indices] = extractor.extract_features([paths[i] for i in indices])
    extractor.store.compact()
    extract_seconds = time.perf_counter() - start

    say(f"training a linear SVM head on {len(train)} images, 5-fold CV")
    fitted = fit_head(features[train], labels[train], "svm", cv=5)
    model_dir = save_model(
        workdir / "model",
        extractor.backbone,
        fitted.estimator,
        training={"data": str(images), "n_samples": len(train), "demo": "digits"},
        cv={"folds": fitted.cv_folds, "scores": fitted.cv_scores},
        head_kind="svm",
    )
    model = load_model(model_dir, backbone=get_backbone(BACKBONE))
    frozen = classification_scores(
        labels[test], model.head.predict(features[test]), model.classes_
    )
    frozen_seconds = time.perf_counter() - start

    start = time.perf_counter()
    pixels = load_digits().data / 16.0
    baseline = LogisticRegression(max_iter=2000).fit(pixels[train], labels[train])
    raw = classification_scores(labels[test], baseline.predict(pixels[test]))
    raw_seconds = time.perf_counter() - start

    followed = {"advice": None, "trained": None}
    if follow:
        from ._advise import follow_advice

        followed = follow_advice(
            paths,
            labels,
            train,
            test,
            store=extractor.store,
            image_size=max(32, 32 * round(size / 32)),
            epochs=epochs,
            # A flipped or rotated digit can be another digit: no augmentation.
            augment=False,
            random_state=random_state,
            echo=echo,
        )

    out = {
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "backbone": BACKBONE,
        "bottleneck": {
            "accuracy": frozen["accuracy"],
            "macro_f1": frozen["macro_f1"],
            "cv_score": None if fitted.cv_score is None else round(fitted.cv_score, 4),
            "extract_seconds": round(extract_seconds, 1),
            "seconds": round(frozen_seconds, 1),
        },
        "raw_pixels": {
            "accuracy": raw["accuracy"],
            "macro_f1": raw["macro_f1"],
            "seconds": round(raw_seconds, 2),
        },
        "winner": "raw_pixels"
        if raw["accuracy"] > frozen["accuracy"]
        else "bottleneck",
        "workdir": str(workdir),
        "model_dir": str(model_dir),
        "advice": None
        if followed["advice"] is None
        else {
            key: followed["advice"][key]
            for key in (
                "recommendation",
                "bottleneck_cv_accuracy",
                "baseline_cv_accuracy",
            )
        },
        "trained": followed["trained"],
    }
    if echo:
        _print_comparison(out, images, workdir)
    return out


def _print_comparison(out: dict, images: Path, workdir: Path) -> None:
    frozen, raw = out["bottleneck"], out["raw_pixels"]
    print()
    print(f"held-out digits: {out['n_test']} (trained on {out['n_train']})")
    print(f"{'':<34} {'accuracy':>8} {'macro F1':>8} {'seconds':>8}")
    print(
        f"{'frozen ' + out['backbone'] + ' + SVM':<34} {frozen['accuracy']:>8.4f} "
        f"{frozen['macro_f1']:>8.4f} {frozen['seconds']:>8.1f}"
    )
    print(
        f"{'raw 8x8 pixels + logistic regr.':<34} {raw['accuracy']:>8.4f} "
        f"{raw['macro_f1']:>8.4f} {raw['seconds']:>8.2f}"
    )
    trained = out.get("trained")
    if trained:
        name = (
            f"{trained['strategy']} ({trained['epochs']} epochs, "
            f"{trained['image_size']} px)"
        )
        print(
            f"{name:<34} {trained['accuracy']:>8.4f} "
            f"{trained['macro_f1']:>8.4f} {trained['seconds']:>8.1f}"
        )
    if out.get("advice"):
        print(f"advise recommended: {out['advice']['recommendation']}")
    print()
    if out["winner"] == "raw_pixels":
        print(
            "Raw pixels win here. Tiny grey handwritten digits are far from the "
            "ImageNet photographs the backbone learnt from, so its frozen features "
            "describe them worse than the 64 pixels themselves. On data like this, "
            "fine-tune the network or use a backbone trained on similar data; "
            "frozen features shine on photographs (ants/bees, clothing)."
        )
        if trained:
            print(
                f"advise saw this and recommended {out['advice']['recommendation']}; "
                f"following it, the same network trained {trained['strategy']} for "
                f"only {trained['epochs']} epochs at {trained['image_size']} px "
                f"reached {trained['accuracy']:.3f} (cut short for the demo: "
                f"bneck train DATA --strategy {trained['strategy']} trains longer)."
            )
    else:
        print(
            "The frozen features beat raw pixels here: the pretrained network "
            "already describes these images well."
        )
    print()
    print("The same steps on your own folder of class subfolders:")
    print(f"  bneck train {images} --out {workdir / 'model'}")
    print(f"  bneck evaluate {workdir / 'model'} FOLDER --report report/")
    print(f"  bneck predict {workdir / 'model'} FOLDER --out predictions.csv")
