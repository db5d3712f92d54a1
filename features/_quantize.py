"""INT8 variants of backbones, built with ONNX Runtime's quantization tools.

Two recipes, chosen by modality:

- images: static quantization in QDQ format, unsigned 8-bit activations and
  signed 8-bit per-channel weights. Activation ranges come from a calibration
  sample of the user's own inputs, so the fingerprint of the quantized
  backbone hashes that sample.
- text: dynamic quantization, signed 8-bit per-channel weights; activation
  ranges are computed per batch at run time, so no calibration is needed.

Dynamic quantization of a convolutional network runs slower than FP32 and
damages its features, and per-tensor weights damage MiniLM's; both recipes
are therefore fixed rather than offered as options.

The quantized graph is written once into ``cache_dir()/onnx`` under a name
derived from its fingerprint, atomically, and reused afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._backbones import Backbone
from ._export import cache_dir
from ._preprocess import InputError, config_json, read_input_bytes

__all__ = ["QuantizationConfig", "default_quantization", "quantize_backbone"]

logger = logging.getLogger(__name__)

#: Bumped whenever the quantization recipe changes, so fingerprints change.
QUANTIZE_VERSION = "1"


@dataclass(frozen=True)
class QuantizationConfig:
    """How a backbone is quantized; every field enters the fingerprint.

    Parameters
    ----------
    method : {"static", "dynamic"}
        Static quantization calibrates activation ranges on sample inputs;
        dynamic quantization computes them per batch at run time.
    per_channel : bool, default=True
        One weight scale per output channel instead of one per tensor.
    calibration_size : int, default=64
        Inputs drawn from the user's data to calibrate a static recipe.
    calibration_batch : int, default=8
        Inputs per calibration batch.
    """

    method: str
    per_channel: bool = True
    calibration_size: int = 64
    calibration_batch: int = 8

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["version"] = QUANTIZE_VERSION
        if self.method == "static":
            out.update(format="QDQ", activations="uint8", weights="int8")
            out.update(calibrate="minmax")
        else:
            out.update(weights="int8")
            out.pop("calibration_size")
            out.pop("calibration_batch")
        return out


def default_quantization(modality: str) -> QuantizationConfig:
    """The recipe bneck uses for a modality: static for images, dynamic for text.

    Examples
    --------
    >>> default_quantization("text").method
    'dynamic'
    """
    if modality == "image":
        return QuantizationConfig(method="static")
    if modality == "text":
        return QuantizationConfig(method="dynamic")
    raise ValueError(f"modality={modality!r}; expected 'image' or 'text'")


def quantize_backbone(
    backbone: Backbone,
    calibration_items: Sequence[Any] | None = None,
    config: QuantizationConfig | None = None,
) -> Backbone:
    """Return the INT8 variant of ``backbone``, quantizing it on first use.

    Parameters
    ----------
    backbone : Backbone
        The FP32 backbone.
    calibration_items : sequence, optional
        The user's inputs (paths or bytes for images); a fixed, order-free
        sample of ``config.calibration_size`` of them calibrates a static
        recipe. Ignored by the dynamic (text) recipe.
    config : QuantizationConfig, optional
        Defaults to :func:`default_quantization` of the backbone's modality.

    Returns
    -------
    Backbone
        Same preprocessing; its graph is the quantized one in the cache and
        its fingerprint hashes the FP32 fingerprint, the recipe and the
        calibration sample.

    Notes
    -----
    Features are only comparable under one fingerprint: calibrate an image
    backbone once (e.g. on the training images) and extract every split with
    that same backbone object. Calibrating separately on each split gives
    each split its own INT8 graph.
    """
    config = config or default_quantization(backbone.modality)
    if config.method not in ("static", "dynamic"):
        raise ValueError(f"method={config.method!r}; expected 'static' or 'dynamic'")
    sample: list[Any] = []
    sample_digest = ""
    if config.method == "static":
        if not calibration_items:
            raise ValueError(
                f"static INT8 quantization of {backbone.name!r} needs calibration "
                "inputs from your data; pass calibration_items (a few dozen of "
                "the images you will extract)"
            )
        sample, sample_digest = _calibration_sample(
            backbone, calibration_items, config.calibration_size
        )
    payload = config_json(
        {
            "fp32": backbone.fingerprint(),
            "quantization": config.as_dict(),
            "calibration": sample_digest,
        }
    )
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()
    name = f"{backbone.name}-int8"
    path = cache_dir() / "onnx" / f"{name}-{fingerprint[:16]}.onnx"
    if path.is_file():
        logger.info("using quantized graph %s", path)
    else:
        _quantize(backbone, config, sample, path)
    return replace(
        backbone,
        name=name,
        onnx_file=str(path),
        description=f"{backbone.description} (INT8, {config.method})",
        _fingerprint=fingerprint,
    )


# ---------------------------------------------------------------- steps


def _import_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as exc:  # pragma: no cover - ships with onnxruntime
        raise ImportError(
            "INT8 backbones need onnxruntime's quantization tools: "
            "pip install 'onnxruntime>=1.18'"
        ) from exc
    return quantization


def _calibration_sample(
    backbone: Backbone, items: Sequence[Any], size: int
) -> tuple[list[Any], str]:
    """Evenly spaced inputs in a fixed order, and a hash of their content.

    The order sorts paths by name (bytes by their hash), so the sample does
    not depend on the order the user lists the inputs in. Unreadable inputs
    are passed over.
    """

    def order(item):
        if isinstance(item, bytes):
            return hashlib.sha256(item).hexdigest()
        return str(item)

    ranked = sorted(items, key=order)
    picks = np.unique(np.linspace(0, len(ranked) - 1, min(size, len(ranked))))
    sample, keys = [], []
    for position in picks.round().astype(int):
        item = ranked[position]
        try:
            data = read_input_bytes(item)
            backbone.preprocessor.load(data)
        except InputError as exc:
            logger.info("calibration skips %s: %s", order(item), exc)
            continue
        sample.append(data)
        keys.append(hashlib.sha256(data).hexdigest())
    if not sample:
        raise ValueError(
            f"none of the {len(picks)} calibration inputs could be read; pass "
            "inputs the backbone can decode"
        )
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    return sample, digest


def _reader(backbone: Backbone, sample: list[Any], batch: int):
    quantization = _import_quantization()

    class SampleReader(quantization.CalibrationDataReader):
        """Feeds preprocessed batches of the calibration sample."""

        def __init__(self):
            self.batches = self._batches()

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            preprocessor = backbone.preprocessor
            for start in range(0, len(sample), batch):
                loaded = [preprocessor.load(x) for x in sample[start : start + batch]]
                yield preprocessor.collate(loaded)

        def get_next(self):
            return next(self.batches, None)

        def rewind(self):
            self.batches = self._batches()

    return SampleReader()


def _quantize(
    backbone: Backbone, config: QuantizationConfig, sample: list, path: Path
) -> None:
    quantization = _import_quantization()
    source = backbone.onnx_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("quantizing %s to INT8 (%s), once", backbone.name, config.method)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        # Shape inference and graph fusions first, as ONNX Runtime advises:
        # quantizing unfused operators loses accuracy and speed.
        # Symbolic shape inference stops at the attention reshapes of the text
        # graphs; ONNX's own shape inference and the fusions still run.
        quantization.quant_pre_process(
            str(source), str(prepared), skip_symbolic_shape=backbone.modality == "text"
        )
        output = Path(work) / "quantized.onnx"
        if config.method == "static":
            quantization.quantize_static(
                str(prepared),
                str(output),
                _reader(backbone, sample, config.calibration_batch),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
            )
        else:
            quantization.quantize_dynamic(
                str(prepared),
                str(output),
                per_channel=config.per_channel,
                weight_type=quantization.QuantType.QInt8,
            )
        os.chmod(output, 0o644)
        os.replace(output, path)
    logger.info("wrote %s", path)
