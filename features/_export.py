"""Export a PyTorch backbone to ONNX once, and verify it before use."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = ["ExportMismatchError", "cache_dir", "export_onnx", "verify_onnx"]

logger = logging.getLogger(__name__)

OUTPUT_NAME = "features"
OPSET = 17


class ExportMismatchError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch module's outputs."""


def cache_dir() -> Path:
    """Where exported graphs live: ``$BNECK_CACHE_DIR`` or ``~/.cache/bneck``."""
    root = os.environ.get("BNECK_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bneck"


def import_torch():
    """Import torch, or say how to install it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs PyTorch; install it with: pip install 'torch>=2.4'"
        ) from exc
    return torch


def export_onnx(
    module,
    sample_inputs: dict[str, np.ndarray],
    path: str | os.PathLike,
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """Export ``module`` to ``path`` atomically, with the given dynamic axes.

    The graph is written under a temporary name and renamed into place, so a
    reader never sees half a file and two processes exporting the same
    backbone at once both end with a complete graph.
    """
    torch = import_torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(sample_inputs)
    args = tuple(torch.from_numpy(sample_inputs[name]) for name in names)
    axes = {**dynamic_axes, OUTPUT_NAME: {0: "batch"}}

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        module.eval()
        with torch.inference_mode(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo, which
            # has no stable dynamic-axes story for every module users bring.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Two notes the exporter prints for the embedded backbones: a
            # constant-folding pass skipped on strided slices, and a caution
            # about negative indices. Every graph is checked against PyTorch
            # on sample inputs after export (verify_onnx), which is where a
            # wrong result would show.
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
            warnings.filterwarnings(
                "ignore", "Exporting aten::index operator of advanced indexing"
            )
            torch.onnx.export(
                module,
                args,
                tmp,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("exported %s", path)
    return path


def verify_onnx(
    module,
    path: str | os.PathLike,
    sample_inputs: dict[str, np.ndarray],
    *,
    atol: float = 1e-3,
    min_cosine: float = 0.9999,
) -> dict[str, float]:
    """Compare the ONNX graph with the PyTorch module on ``sample_inputs``.

    Returns
    -------
    report : dict
        ``max_abs_diff`` and ``min_cosine`` over the sample rows.

    Raises
    ------
    ExportMismatchError
        If the largest absolute difference exceeds ``atol`` or a row's cosine
        similarity falls below ``min_cosine``.
    """
    import onnxruntime as ort

    torch = import_torch()
    module.eval()
    with torch.inference_mode():
        tensors = [torch.from_numpy(value) for value in sample_inputs.values()]
        expected = module(*tensors).float().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run([OUTPUT_NAME], sample_inputs)[0]

    report = compare_features(expected, actual)
    if report["max_abs_diff"] > atol or report["min_cosine"] < min_cosine:
        raise ExportMismatchError(
            f"the ONNX export {path} does not match PyTorch: max abs diff "
            f"{report['max_abs_diff']:.3g} (tolerance {atol:g}), min cosine "
            f"{report['min_cosine']:.6f} (needs {min_cosine}); the graph was "
            "refused. Check that the module is deterministic in eval mode and "
            "that its operators export to ONNX."
        )
    return report


def compare_features(expected: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Max absolute difference and min row-wise cosine of two feature arrays."""
    if expected.shape != actual.shape:
        raise ExportMismatchError(
            f"output shapes differ: PyTorch {expected.shape}, ONNX {actual.shape}"
        )
    expected = expected.reshape(len(expected), -1).astype(np.float64)
    actual = actual.reshape(len(actual), -1).astype(np.float64)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    cosine = (expected * actual).sum(axis=1) / np.maximum(norms, 1e-30)
    return {
        "max_abs_diff": float(np.abs(expected - actual).max()),
        "min_cosine": float(cosine.min()),
    }


def write_report(path: Path, report: dict) -> None:
    """Write the verification report beside the graph."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    os.replace(tmp, path.with_suffix(".json"))
