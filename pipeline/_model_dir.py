"""MODEL_DIR: a fitted head and its backbone, portable and checked on load.

Layout::

    model.json      what the model is: backbone (name, fingerprint,
                    preprocessing), head, classes, training data, scores,
                    library versions
    head.skops      the fitted scikit-learn head, in skops format (loading it
                    runs no code, unlike a pickle)
    backbone.onnx   the backbone's ONNX graph, copied in
    tokenizer.json  text backbones only: the tokenizer
    manifest.json   sha256 and size of every file above

Loading verifies every checksum, rebuilds the backbone from the copied graph
and preprocessing, and checks that it is the network the head was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from features import (
    Backbone,
    Extractor,
    FeatureStore,
    ImagePreprocessor,
    MemoryStore,
    TextPreprocessor,
    get_backbone,
)

from ._estimators import BottleneckFeatures, as_items

__all__ = [
    "BottleneckModel",
    "FingerprintMismatchError",
    "ModelDirError",
    "load_model",
    "save_model",
]

logger = logging.getLogger(__name__)

FORMAT = "bneck-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"
HEAD_FILE = "head.skops"
ONNX_FILE = "backbone.onnx"
TOKENIZER_FILE = "tokenizer.json"

#: Types a bneck head holds beyond skops' default trusted set. Anything else
#: in a head file is refused instead of loaded.
TRUSTED_TYPES = [
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.model_selection._split.StratifiedKFold",
]


class ModelDirError(ValueError):
    """A MODEL_DIR that is missing, incomplete, altered or of a newer format."""


class FingerprintMismatchError(ModelDirError):
    """The backbone is not the network the head was trained on."""


@dataclass
class BottleneckModel:
    """A frozen backbone and a fitted head: predicts on raw inputs.

    Build one with :func:`load_model` (or ``bneck train``).

    Attributes
    ----------
    backbone : Backbone
        The network; its fingerprint is the one the head was trained on.
    head : Pipeline
        The fitted scikit-learn head (scaling and classifier).
    info : dict
        The content of ``model.json``.
    path : Path or None
        The MODEL_DIR it was loaded from.
    """

    backbone: Backbone
    head: Pipeline
    info: dict
    path: Path | None = None

    @property
    def classes_(self) -> np.ndarray:
        return self.head.classes_

    def __repr__(self) -> str:
        return (
            f"BottleneckModel(backbone={self.backbone.name!r}, "
            f"head={self.info['head']['kind']!r}, classes={list(self.classes_)!r})"
        )

    def extractor(
        self, store: str | os.PathLike | FeatureStore | MemoryStore | None = None
    ) -> Extractor:
        """An extractor of this model's backbone; rows are kept in ``store``.

        Parameters
        ----------
        store : path, FeatureStore, MemoryStore or None
            None keeps features in memory for this call only.
        """
        return Extractor(self.backbone, store, progress=False)

    def transform(self, X: Any, store: Any = None) -> np.ndarray:
        """Bottleneck features of raw inputs (raises if any input fails)."""
        items = as_items(X, self.backbone.modality, "BottleneckModel")
        return self.extractor(store).extract_features(items)

    def predict(self, X: Any, store: Any = None) -> np.ndarray:
        """Predicted labels of image paths or texts.

        Parameters
        ----------
        X : list, 1-d array, pandas Series or one-column DataFrame
        store : path, FeatureStore, MemoryStore or None
            Where to cache features; None computes them for this call only.
        """
        return self.head.predict(self.transform(X, store))

    def predict_proba(self, X: Any, store: Any = None) -> np.ndarray:
        """Probability of each class (columns in the order of ``classes_``)."""
        return self.head.predict_proba(self.transform(X, store))

    def pipeline(self, store: Any = None) -> Pipeline:
        """The whole model as one scikit-learn pipeline on raw inputs."""
        features = BottleneckFeatures(self.backbone, store)
        return Pipeline([("features", features), *self.head.steps])


def save_model(
    path: str | os.PathLike,
    backbone: Backbone,
    head: Pipeline,
    *,
    training: dict | None = None,
    cv: dict | None = None,
    search: list[dict] | None = None,
    head_kind: str | None = None,
    best_params: dict | None = None,
) -> Path:
    """Write a MODEL_DIR, replacing an older model there.

    Parameters
    ----------
    path : path
        The folder to write; it must not exist, be empty, or hold a model.
    backbone : Backbone
        The backbone whose features the head was fitted on.
    head : Pipeline
        The fitted head.
    training, cv : dict, optional
        Summaries of the training data and cross-validation, kept as is.
    search : list of dict, optional
        Grid search results, one dict per candidate.
    head_kind : str, optional
        ``"svm"`` or ``"logreg"``; inferred from the last step by default.

    Returns
    -------
    Path
    """
    import skops.io as sio

    path = Path(path)
    _check_target(path)
    n_features = getattr(head, "n_features_in_", None)
    if n_features is not None and n_features != backbone.feature_dim:
        raise ValueError(
            f"the head takes {n_features} features but backbone "
            f"{backbone.name!r} makes {backbone.feature_dim}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        sio.dump(head, staging / HEAD_FILE)
        shutil.copyfile(backbone.onnx_path(), staging / ONNX_FILE)
        preprocessor = _preprocessor_record(backbone, staging)
        portable = _portable_backbone(
            backbone.name, preprocessor, backbone.feature_dim, staging
        )
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backbone": {
                "name": backbone.name,
                "modality": backbone.modality,
                "feature_dim": backbone.feature_dim,
                "fingerprint": backbone.fingerprint(),
                "onnx": ONNX_FILE,
                "onnx_fingerprint": portable.fingerprint(),
                "preprocessor": preprocessor,
                "description": backbone.description,
            },
            "head": {
                "kind": head_kind or head.steps[-1][0],
                "file": HEAD_FILE,
                "steps": [name for name, _ in head.steps],
                "params": best_params or {},
            },
            "classes": [_plain(label) for label in head.classes_],
            "training": training or {},
            "cv": cv or {},
            "search": search or [],
            "versions": library_versions(),
        }
        _write_json(staging / MODEL_JSON, info)
        files = sorted(p.name for p in staging.iterdir())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {name: _file_record(staging / name) for name in files},
        }
        _write_json(staging / MANIFEST, manifest)
        _replace_dir(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote model %s", path)
    return path


def load_model(
    path: str | os.PathLike, *, backbone: str | Backbone | None = None
) -> BottleneckModel:
    """Load a MODEL_DIR, verifying its files and its backbone.

    Parameters
    ----------
    path : path
        A folder written by ``bneck train`` or :func:`save_model`.
    backbone : str or Backbone, optional
        Use this backbone instead of the graph copied into the folder (for
        example the registered one, to share its ONNX Runtime session); its
        fingerprint must equal the one the head was trained on.

    Returns
    -------
    BottleneckModel

    Raises
    ------
    ModelDirError
        The folder is not a model, a file is missing or its checksum differs
        from the manifest, or the format is newer than this bneck reads.
    FingerprintMismatchError
        The backbone is not the network the head was trained on.
    """
    import skops.io as sio

    path = Path(path)
    info = _verified_info(path)
    record = info["backbone"]
    if backbone is None:
        chosen = _rebuild_backbone(path, record)
    else:
        chosen = get_backbone(backbone)
        if chosen.fingerprint() != record["fingerprint"]:
            raise FingerprintMismatchError(
                f"backbone {chosen.name!r} has fingerprint "
                f"{chosen.fingerprint()[:16]}, but the head in {path} was trained "
                f"on features of {record['name']!r} with fingerprint "
                f"{record['fingerprint'][:16]}; use that backbone or retrain"
            )
    head_file = path / info["head"]["file"]
    try:
        found = sio.get_untrusted_types(file=head_file)
    except Exception as exc:  # noqa: BLE001 - any unreadable head is refused
        raise ModelDirError(
            f"{head_file} is not a skops file ({type(exc).__name__}: {exc}); bneck "
            "loads heads only in skops format, which runs no code on load (a "
            "pickle could)"
        ) from None
    untrusted = [name for name in found if name not in TRUSTED_TYPES]
    if untrusted:
        raise ModelDirError(
            f"{head_file} holds types bneck does not trust: {', '.join(untrusted)}; "
            "it was not written by bneck train, so it is not loaded"
        )
    head = sio.load(head_file, trusted=TRUSTED_TYPES)
    n_features = getattr(head, "n_features_in_", chosen.feature_dim)
    if n_features != chosen.feature_dim:
        raise FingerprintMismatchError(
            f"the head in {path} takes {n_features} features but backbone "
            f"{chosen.name!r} makes {chosen.feature_dim}"
        )
    logger.info("loaded model %s (backbone %s)", path, chosen.name)
    return BottleneckModel(backbone=chosen, head=head, info=info, path=path)


# ----------------------------------------------------------------- helpers


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a model depends on."""
    out = {"python": platform.python_version()}
    for package in (
        "bneck",
        "scikit-learn",
        "skops",
        "onnxruntime",
        "numpy",
        "tokenizers",
        "pillow",
    ):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder for the model")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise ValueError(
            f"{path} is a non-empty folder that holds no bneck model; choose a new "
            "or empty folder, bneck will not overwrite it"
        )


def _replace_dir(staging: Path, target: Path) -> None:
    """Move the finished staging folder into place, then drop the old model."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _preprocessor_record(backbone: Backbone, folder: Path) -> dict:
    preprocessor = backbone.preprocessor
    if isinstance(preprocessor, ImagePreprocessor):
        return {"kind": "image", **asdict(preprocessor)}
    if isinstance(preprocessor, TextPreprocessor):
        shutil.copyfile(preprocessor.tokenizer_file, folder / TOKENIZER_FILE)
        return {
            "kind": "text",
            "tokenizer_file": TOKENIZER_FILE,
            "max_length": preprocessor.max_length,
            "input_names": list(preprocessor.input_names),
        }
    raise ValueError(
        f"cannot save backbone {backbone.name!r}: its preprocessor "
        f"{type(preprocessor).__name__} is not an image or text preprocessor"
    )


def _make_preprocessor(record: dict, folder: Path):
    settings = {key: value for key, value in record.items() if key != "kind"}
    if record["kind"] == "image":
        for name in ("mean", "std"):
            settings[name] = tuple(settings[name])
        return ImagePreprocessor(**settings)
    if record["kind"] == "text":
        return TextPreprocessor(
            tokenizer_file=str(folder / settings["tokenizer_file"]),
            max_length=int(settings["max_length"]),
            input_names=tuple(settings["input_names"]),
        )
    raise ModelDirError(f"unknown preprocessor kind {record['kind']!r}")


def _portable_backbone(name, record, feature_dim, folder, fingerprint=None):
    return Backbone(
        name=name,
        preprocessor=_make_preprocessor(record, folder),
        feature_dim=int(feature_dim),
        onnx_file=str((folder / ONNX_FILE).resolve()),
        description=f"{name} from {folder}",
        _fingerprint=fingerprint,
    )


def _rebuild_backbone(path: Path, record: dict) -> Backbone:
    """The backbone from the copied graph, identified by the training print."""
    rebuilt = _portable_backbone(
        record["name"], record["preprocessor"], record["feature_dim"], path
    )
    if rebuilt.fingerprint() != record["onnx_fingerprint"]:
        raise FingerprintMismatchError(
            f"the backbone in {path} (backbone.onnx with its preprocessing) has "
            f"fingerprint {rebuilt.fingerprint()[:16]}, not the "
            f"{record['onnx_fingerprint'][:16]} of the network the head was "
            f"trained on ({record['name']}); retrain, or restore the folder"
        )
    # The same graph and preprocessing computed the training features: read
    # and write the store under their fingerprint, so cached rows are shared.
    rebuilt._fingerprint = record["fingerprint"]
    return rebuilt


def _verified_info(path: Path) -> dict:
    if not path.is_dir():
        raise ModelDirError(f"no model folder at {path}")
    manifest = _read_json(path / MANIFEST, path)
    if manifest.get("format") != FORMAT:
        raise ModelDirError(f"{path} is not a bneck model folder (no bneck manifest)")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelDirError(
            f"{path} was written in model format {manifest['format_version']}, "
            f"newer than this bneck reads ({FORMAT_VERSION}); upgrade bneck"
        )
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if Path(name).name != name:
            raise ModelDirError(f"the manifest of {path} names a path outside it")
        if not file.is_file():
            raise ModelDirError(f"{path} is incomplete: {name} is missing")
        if _file_record(file)["sha256"] != expected["sha256"]:
            raise ModelDirError(
                f"{file} does not match its checksum in {MANIFEST}: the file was "
                "altered or damaged; restore it or retrain"
            )
    required = {MODEL_JSON, HEAD_FILE, ONNX_FILE}
    absent = required - set(manifest.get("files", {}))
    if absent:
        raise ModelDirError(
            f"the manifest of {path} does not cover {', '.join(sorted(absent))}"
        )
    return _read_json(path / MODEL_JSON, path)


def _read_json(file: Path, folder: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(
            f"{folder} is not a bneck model folder: {file.name} is missing"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{file} is not valid JSON: {exc}") from None


def _write_json(file: Path, content: dict) -> None:
    file.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _file_record(file: Path) -> dict:
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": file.stat().st_size}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
