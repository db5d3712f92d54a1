"""Frozen feature extraction: ONNX backbones and the HDF5 feature store.

This package knows nothing of classifiers; :mod:`pipeline` builds on it.
"""

from ._backbones import (
    Backbone,
    UnknownBackboneError,
    get_backbone,
    list_backbones,
    onnx_backbone,
    register_backbone,
    torch_backbone,
)
from ._data import Dataset, load_dataset
from ._distributed import (
    ClusterError,
    DistributedResult,
    dask_client,
    extract_distributed,
)
from ._export import ExportMismatchError, cache_dir
from ._extract import ExtractionResult, ExtractionSummary, Extractor, content_key
from ._preprocess import ImagePreprocessor, InputError, TextPreprocessor
from ._store import FeatureStore, MemoryStore, StoreBusyError, StoreError

__all__ = [
    "Backbone",
    "ClusterError",
    "Dataset",
    "DistributedResult",
    "ExportMismatchError",
    "ExtractionResult",
    "ExtractionSummary",
    "Extractor",
    "FeatureStore",
    "ImagePreprocessor",
    "InputError",
    "MemoryStore",
    "StoreBusyError",
    "StoreError",
    "TextPreprocessor",
    "UnknownBackboneError",
    "cache_dir",
    "content_key",
    "dask_client",
    "extract_distributed",
    "get_backbone",
    "list_backbones",
    "load_dataset",
    "onnx_backbone",
    "register_backbone",
    "torch_backbone",
]
