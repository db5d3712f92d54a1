"""scikit-learn estimators, model directories and the CLI on top of features."""

from ._estimators import BottleneckFeatures
from ._heads import (
    HEADS,
    FittedHead,
    default_grid,
    fit_head,
    make_classifier,
    make_head,
)
from ._model_dir import (
    BottleneckModel,
    FingerprintMismatchError,
    ModelDirError,
    load_model,
    save_model,
)

__all__: list[str] = [
    "HEADS",
    "BottleneckFeatures",
    "BottleneckModel",
    "FingerprintMismatchError",
    "FittedHead",
    "ModelDirError",
    "default_grid",
    "fit_head",
    "make_classifier",
    "load_model",
    "make_head",
    "save_model",
]
