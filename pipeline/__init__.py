"""scikit-learn estimators, model directories and the CLI on top of features."""

from ._advise import advise, format_advice
from ._augment import ImageAugmenter
from ._deploy import DeploymentMismatchError, export_model
from ._estimators import BottleneckFeatures
from ._finetune import FineTunedClassifier, cross_validate_finetune, save_finetuned
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
from ._strategy import STRATEGIES, choose_strategy, recommend

__all__: list[str] = [
    "HEADS",
    "STRATEGIES",
    "BottleneckFeatures",
    "BottleneckModel",
    "DeploymentMismatchError",
    "FingerprintMismatchError",
    "FineTunedClassifier",
    "FittedHead",
    "ImageAugmenter",
    "ModelDirError",
    "advise",
    "choose_strategy",
    "cross_validate_finetune",
    "default_grid",
    "export_model",
    "fit_head",
    "format_advice",
    "make_classifier",
    "load_model",
    "make_head",
    "recommend",
    "save_finetuned",
    "save_model",
]
