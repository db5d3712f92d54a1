"""A scikit-learn transformer from raw inputs to cached bottleneck features."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from features import (
    Backbone,
    Extractor,
    FeatureStore,
    InputError,
    MemoryStore,
    cache_dir,
    get_backbone,
)

__all__ = ["BottleneckFeatures", "as_items", "default_store"]

logger = logging.getLogger(__name__)

# Per-process caches. A Backbone hashes its weights once to fingerprint them
# and a FeatureStore keeps an index of its files: both are worth keeping
# between the many clones a grid search makes. Neither holds an ONNX Runtime
# session (``Backbone.session`` keeps those per process), so the estimator
# pickles small and a worker process builds its own session on first use.
_BACKBONES: dict[str, Backbone] = {}
_STORES: dict[str, FeatureStore] = {}
_CACHE_LOCK = threading.Lock()


def default_store() -> FeatureStore:
    """The feature store used when none is given: ``features.h5`` in the cache.

    It is the same file ``bneck extract`` fills by default, under
    ``$BNECK_CACHE_DIR`` or ``~/.cache/bneck``.
    """
    return _store(cache_dir() / "features.h5")


def _store(path: str | os.PathLike) -> FeatureStore:
    key = os.path.abspath(os.fspath(path))
    with _CACHE_LOCK:
        if key not in _STORES:
            _STORES[key] = FeatureStore(key)
        return _STORES[key]


def _backbone(backbone: str | Backbone) -> Backbone:
    if isinstance(backbone, Backbone):
        return backbone
    with _CACHE_LOCK:
        if backbone not in _BACKBONES:
            _BACKBONES[backbone] = get_backbone(backbone)
        return _BACKBONES[backbone]


def as_items(X: Any, modality: str, owner: str = "BottleneckFeatures") -> list:
    """Turn a column of inputs into a list: paths (or bytes) or texts.

    Accepts a list or tuple, a 1-d array, a pandas Series, a one-column
    DataFrame or a one-column 2-d array.
    """
    if isinstance(X, (str, bytes, os.PathLike)):
        raise InputError(
            f"{owner} takes a sequence of inputs, got a single "
            f"{type(X).__name__}; wrap it in a list"
        )
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise InputError(
                f"{owner} takes one column of inputs, got a DataFrame with "
                f"{X.shape[1]} columns {list(X.columns)[:5]}; select one"
            )
        X = X.iloc[:, 0]
    if hasattr(X, "to_numpy"):
        X = X.to_numpy(dtype=object)
    if isinstance(X, np.ndarray):
        if X.ndim == 2 and X.shape[1] == 1:
            X = X[:, 0]
        if X.ndim != 1:
            raise InputError(
                f"{owner} takes one column of inputs, got an array of shape {X.shape}"
            )
    items = list(X)
    wanted = (str,) if modality == "text" else (str, os.PathLike, bytes)
    for item in items:
        if not isinstance(item, wanted):
            what = "texts (str)" if modality == "text" else "image paths or bytes"
            raise InputError(
                f"{owner} takes {what}, got a {type(item).__name__} ({item!r:.40}); "
                "pass raw inputs, not numbers"
            )
    return items


class BottleneckFeatures(TransformerMixin, BaseEstimator):
    """Bottleneck features of raw inputs, through the feature store.

    A frozen pretrained network turns each image path or text into a vector.
    Each distinct input (by content) goes through the network once: its row
    is cached in a :class:`~features.FeatureStore`, so the many fits of a
    cross-validated grid search read it back instead of recomputing it, in
    this process and in joblib workers alike.

    Nothing is learnt: :meth:`fit` only checks its arguments, and the
    estimator tags say that ``transform`` needs no fit.

    Parameters
    ----------
    backbone : str or Backbone, default="efficientnet_lite0"
        Name of a registered backbone (see ``bneck backbones``) or a
        :class:`~features.Backbone`.
    store : str, path-like, FeatureStore, MemoryStore or None, default=None
        Where rows are cached. None uses the default on-disk store,
        ``features.h5`` in the bneck cache folder, which ``bneck extract``
        fills too. A :class:`~features.MemoryStore` keeps rows in this object
        only: they are neither shared with worker processes (``n_jobs>1``)
        nor with clones, so a grid search recomputes them.
    batch_size : int, default=32
        Inputs per network call.
    num_threads : int or None, default=None
        ONNX Runtime threads; None uses all cores.
    progress : bool, default=False
        Show a progress bar while extracting.

    Attributes
    ----------
    This transformer sets no fitted attributes.

    Examples
    --------
    >>> from pipeline import BottleneckFeatures
    >>> from features import MemoryStore
    >>> features = BottleneckFeatures("minilm_l6", store=MemoryStore())
    >>> features.fit_transform(["free prize, call now", "see you at 6"]).shape
    (2, 384)
    >>> features.get_feature_names_out()[:2].tolist()
    ['minilm_l6_0', 'minilm_l6_1']
    """

    def __init__(
        self,
        backbone: str | Backbone = "efficientnet_lite0",
        store: str | os.PathLike | FeatureStore | MemoryStore | None = None,
        *,
        batch_size: int = 32,
        num_threads: int | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.store = store
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.progress = progress

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.one_d_array = True
        tags.input_tags.two_d_array = True  # a one-column table of inputs
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []  # always float32
        return tags

    def fit(self, X: Any = None, y: Any = None) -> BottleneckFeatures:
        """Check the arguments; nothing is learnt from the data.

        Parameters
        ----------
        X : sequence of paths or texts, optional
            Checked for type only.
        y : ignored

        Returns
        -------
        self : BottleneckFeatures
        """
        backbone = self._check_params()
        if X is not None:
            as_items(X, backbone.modality, self._owner())
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Bottleneck features of each input, computing only missing rows.

        Parameters
        ----------
        X : list, 1-d array, pandas Series or one-column DataFrame
            Image paths (or bytes) for an image backbone, texts for a text
            backbone.

        Returns
        -------
        features : ndarray of shape (n_samples, feature_dim), float32

        Raises
        ------
        InputError
            When any input cannot be read. A transformer cannot drop rows,
            so remove those inputs first (``bneck train`` does, and reports
            them); the rows of the other inputs are kept in the store.
        """
        backbone = self._check_params()
        items = as_items(X, backbone.modality, self._owner())
        extractor = self.extractor()
        result = extractor.extract(items)
        summary = result.summary
        if summary.failed:
            first = summary.failures[0]
            error = InputError(
                f"{summary.failed} of {summary.items} inputs could not be used "
                f"(first: {first['source']}: {first['reason']}); remove them "
                "before calling fit or transform"
            )
            error.failures = summary.failures
            raise error
        logger.info(
            "%s: %d inputs, %d computed, %d from the store",
            backbone.name,
            summary.items,
            summary.computed,
            summary.cached,
        )
        return extractor.features(result.keys)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names ``<backbone>_<i>`` of the output columns.

        Returns
        -------
        names : ndarray of str objects, shape (feature_dim,)
        """
        backbone = self._check_params()
        return np.array(
            [f"{backbone.name}_{i}" for i in range(backbone.feature_dim)],
            dtype=object,
        )

    def extractor(self) -> Extractor:
        """The :class:`~features.Extractor` this transformer reads through."""
        return Extractor(
            self._check_params(),
            self._resolve_store(),
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            on_error="skip",
            progress=self.progress,
        )

    def _resolve_store(self) -> FeatureStore | MemoryStore:
        if self.store is None:
            return default_store()
        if isinstance(self.store, (FeatureStore, MemoryStore)):
            return self.store
        if isinstance(self.store, (str, os.PathLike)):
            return _store(self.store)
        raise TypeError(
            f"store={self.store!r}; expected None, a path, a FeatureStore or a "
            "MemoryStore"
        )

    def _check_params(self) -> Backbone:
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(
                f"batch_size={self.batch_size!r}; expected a positive integer"
            )
        return _backbone(self.backbone)

    def _owner(self) -> str:
        name = getattr(self.backbone, "name", self.backbone)
        return f"BottleneckFeatures(backbone={name!r})"
