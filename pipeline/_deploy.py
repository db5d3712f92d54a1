"""One-file deployment: the backbone graph and the fitted head as one ONNX model.

The head (scaling and classifier) is converted with skl2onnx and joined to
the backbone's graph at its bottleneck output, so a deployment needs only
ONNX Runtime and the preprocessing step that stays outside the graph:
decoding, cropping and normalising an image, or tokenizing a text. The
settings of that step travel in the model's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from features import Backbone, ImagePreprocessor, TextPreprocessor

from ._model_dir import BottleneckModel, load_model

__all__ = ["DeploymentMismatchError", "export_model"]

logger = logging.getLogger(__name__)

#: Names of the outputs of an exported model.
LABEL, PROBABILITIES, FEATURES = "label", "probabilities", "features"
HEAD_PREFIX = "head/"
#: Largest difference in probability between the exported graph and
#: bneck's own head on the same inputs before the export is refused.
TOLERANCE = 1e-4


class DeploymentMismatchError(RuntimeError):
    """The exported graph does not reproduce the model it was made from."""


def export_model(
    model: str | os.PathLike | BottleneckModel,
    out: str | os.PathLike,
    *,
    keep_features: bool = False,
) -> dict:
    """Write a MODEL_DIR as one ONNX graph: preprocessed input to label.

    Parameters
    ----------
    model : path or BottleneckModel
        A folder written by ``bneck train`` (frozen or fine-tuned), or a
        loaded model.
    out : path
        The ``.onnx`` file to write; replaced if it exists.
    keep_features : bool, default=False
        Also return the bottleneck vector as the output ``features``.

    Returns
    -------
    dict
        ``out``, the graph's ``inputs`` and ``outputs``, the ``classes``, the
        ``preprocessing`` to apply before the graph, and the verification
        (``max_proba_diff``, ``labels_equal``) on sample inputs.

    Raises
    ------
    DeploymentMismatchError
        The joined graph gives other labels or probabilities than the model
        (by more than 1e-4) on sample inputs; nothing is written.

    Notes
    -----
    The graph takes what the backbone's preprocessing makes: for images a
    float32 ``pixels`` batch of shape (N, 3, size, size), already resized,
    cropped and normalised; for texts the int64 ``input_ids`` and
    ``attention_mask`` of the model's own tokenizer (``tokenizer.json`` in
    the MODEL_DIR), padded per batch. It returns ``label`` (N,) and
    ``probabilities`` (N, n_classes) in the order of ``classes``, which the
    model's metadata lists.
    """
    import onnx

    if not isinstance(model, BottleneckModel):
        model = load_model(model)
    out = Path(out)
    joined = _joined_graph(model, keep_features)
    preprocessing = preprocessing_record(model.backbone)
    classes = [str(label) for label in model.classes_]
    _set_metadata(joined, model, classes, preprocessing)
    serialized = joined.SerializeToString()
    verification = _verify(serialized, model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(serialized)
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%d bytes)", out, len(serialized))
    return {
        "out": str(out),
        "bytes": len(serialized),
        "inputs": [value.name for value in joined.graph.input],
        "outputs": [value.name for value in joined.graph.output],
        "classes": classes,
        "preprocessing": preprocessing,
        **verification,
    }


def preprocessing_record(backbone: Backbone) -> dict:
    """What must be done to a raw input before the exported graph sees it."""
    preprocessor = backbone.preprocessor
    if isinstance(preprocessor, ImagePreprocessor):
        return {
            "kind": "image",
            "input": preprocessor.input_name,
            "layout": "NCHW float32, RGB",
            "size": preprocessor.size,
            "crop_fraction": preprocessor.size
            / (preprocessor.size + preprocessor.crop_padding),
            "resample": preprocessor.resample,
            "mean": list(preprocessor.mean),
            "std": list(preprocessor.std),
            "scale": "(pixel - mean) / std on the 0-255 scale",
        }
    if isinstance(preprocessor, TextPreprocessor):
        return {
            "kind": "text",
            "inputs": list(preprocessor.input_names),
            "tokenizer": "tokenizer.json of the MODEL_DIR (Hugging Face tokenizers)",
            "max_length": preprocessor.max_length,
            "padding": "to the longest text of the batch; attention_mask 0 on pads",
        }
    raise ValueError(f"backbone {backbone.name!r} has no known preprocessing")


def _joined_graph(model: BottleneckModel, keep_features: bool):
    import onnx
    from onnx import compose

    backbone = onnx.load(str(model.backbone.onnx_path()))
    (bottleneck,) = [value.name for value in backbone.graph.output]
    head = _head_graph(model, _opset(backbone, ""))
    head = compose.add_prefix(head, HEAD_PREFIX)
    if head.ir_version != backbone.ir_version:
        head.ir_version = backbone.ir_version
    outputs = [f"{HEAD_PREFIX}{LABEL}", f"{HEAD_PREFIX}{PROBABILITIES}"]
    joined = compose.merge_models(
        backbone,
        head,
        io_map=[(bottleneck, f"{HEAD_PREFIX}{FEATURES}")],
        outputs=[*outputs, bottleneck] if keep_features else outputs,
    )
    renames = {f"{HEAD_PREFIX}{LABEL}": LABEL}
    renames[f"{HEAD_PREFIX}{PROBABILITIES}"] = PROBABILITIES
    renames[bottleneck] = FEATURES
    _rename_outputs(joined.graph, renames)
    order = [LABEL, PROBABILITIES, FEATURES]
    outputs = sorted(joined.graph.output, key=lambda value: order.index(value.name))
    del joined.graph.output[:]
    joined.graph.output.extend(outputs)
    return joined


def _head_graph(model: BottleneckModel, opset: int):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    head = model.head
    classifier = head.steps[-1][1]
    with warnings.catch_warnings():
        # skl2onnx reads the SVC's Platt attributes, which scikit-learn 1.9
        # marks deprecated; the values it reads are still the fitted ones.
        warnings.filterwarnings("ignore", message=".*prob[AB]_", category=FutureWarning)
        return to_onnx(
            head,
            initial_types=[
                (FEATURES, FloatTensorType([None, model.backbone.feature_dim]))
            ],
            options={id(classifier): {"zipmap": False}},
            target_opset={"": opset, "ai.onnx.ml": 3},
            final_types=None,
        )


def _opset(model, domain: str) -> int:
    for entry in model.opset_import:
        if entry.domain == domain:
            return int(entry.version)
    raise ValueError(f"the backbone graph imports no opset of domain {domain!r}")


def _rename_outputs(graph, renames: dict[str, str]) -> None:
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
        node.input[:] = [renames.get(name, name) for name in node.input]
    for value in graph.output:
        value.name = renames.get(value.name, value.name)


def _set_metadata(joined, model: BottleneckModel, classes, preprocessing) -> None:
    import onnx

    record = model.info["backbone"]
    entries = {
        "bneck.classes": json.dumps(classes),
        "bneck.preprocessing": json.dumps(preprocessing),
        "bneck.backbone": record["name"],
        "bneck.backbone_fingerprint": record["fingerprint"],
        "bneck.head": model.info["head"]["kind"],
    }
    del joined.metadata_props[:]
    onnx.helper.set_model_props(joined, entries)
    joined.producer_name = "bneck"
    joined.doc_string = (
        f"{record['name']} features and a {model.info['head']['kind']} head: "
        "preprocessed inputs to label and class probabilities"
    )


def _verify(serialized: bytes, model: BottleneckModel) -> dict:
    """Compare the joined graph with backbone + head on sample inputs."""
    import onnxruntime as ort

    inputs = model.backbone.preprocessor.sample_inputs(batch_size=4, seed=1)
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    labels, proba = session.run([LABEL, PROBABILITIES], inputs)
    features = model.backbone.run(inputs)
    expected = model.head.predict_proba(features)
    expected_labels = np.asarray(model.head.predict(features)).astype(str)
    diff = float(np.abs(proba - expected).max())
    equal = bool((np.asarray(labels).astype(str) == expected_labels).all())
    if diff > TOLERANCE or not equal:
        raise DeploymentMismatchError(
            f"the exported graph differs from the model on sample inputs (max "
            f"probability difference {diff:.2e}, labels equal: {equal}); it was "
            "not written. The head's type may convert wrongly in this skl2onnx"
        )
    return {"max_proba_diff": diff, "labels_equal": equal}
