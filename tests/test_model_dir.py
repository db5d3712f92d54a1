"""MODEL_DIR: save, load anywhere, verify checksums, refuse another backbone."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from features import Extractor, get_backbone
from pipeline import (
    FingerprintMismatchError,
    ModelDirError,
    fit_head,
    load_model,
    save_model,
)

TEXTS = [
    "WINNER! claim your free prize now, call 0800",
    "free entry in a weekly competition, text WIN",
    "you have won a cash award, reply to claim",
    "urgent: your mobile number won 2000 pounds",
    "congratulations, free ringtone, send STOP to end",
    "are we still on for lunch tomorrow?",
    "I'll be home late, keep some dinner for me",
    "can you pick up milk on the way back",
    "happy birthday! see you at the party",
    "the meeting moved to 3pm, room 2",
]
LABELS = np.array(["spam"] * 5 + ["ham"] * 5)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A small text model saved once; tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("model") / "spam"
    extractor = Extractor("minilm_l6")
    features = extractor.extract_features(TEXTS)
    fitted = fit_head(features, LABELS, "logreg", cv=2)
    save_model(
        folder,
        extractor.backbone,
        fitted.estimator,
        training={"n_samples": len(TEXTS)},
        cv={"folds": 2, "scores": fitted.cv_scores},
    )
    return folder, fitted.estimator.predict_proba(features)


@pytest.fixture
def model_copy(text_model, tmp_path):
    folder = tmp_path / "copied"
    shutil.copytree(text_model[0], folder)
    return folder


def _resign(folder, name):
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_layout_and_content(text_model):
    folder, _ = text_model
    names = {path.name for path in folder.iterdir()}
    assert names == {
        "manifest.json",
        "model.json",
        "head.skops",
        "backbone.onnx",
        "tokenizer.json",
    }
    info = json.loads((folder / "model.json").read_text())
    assert info["backbone"]["name"] == "minilm_l6"
    assert info["backbone"]["fingerprint"] == get_backbone("minilm_l6").fingerprint()
    assert info["classes"] == ["ham", "spam"]
    assert {"scikit-learn", "skops", "onnxruntime", "python"} <= set(info["versions"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}


def test_loads_from_a_moved_folder_and_predicts(model_copy, text_model):
    model = load_model(model_copy)
    # Rebuilt from the copied graph and tokenizer, not from the registry.
    assert model.backbone.onnx_file.startswith(str(model_copy.resolve()))
    assert model.backbone.fingerprint() == get_backbone("minilm_l6").fingerprint()
    np.testing.assert_allclose(model.predict_proba(TEXTS), text_model[1], atol=1e-5)
    assert list(model.predict(["claim your free prize", "lunch at noon?"])) == [
        "spam",
        "ham",
    ]
    assert list(model.pipeline().predict(TEXTS[:2])) == ["spam", "spam"]


def test_refuses_an_altered_file(model_copy):
    head = model_copy / "head.skops"
    head.write_bytes(head.read_bytes() + b"\0")
    with pytest.raises(ModelDirError, match="head.skops does not match its checksum"):
        load_model(model_copy)


def test_refuses_a_missing_file_and_a_foreign_folder(model_copy, tmp_path):
    (model_copy / "backbone.onnx").unlink()
    with pytest.raises(ModelDirError, match="incomplete: backbone.onnx is missing"):
        load_model(model_copy)
    with pytest.raises(ModelDirError, match="manifest.json is missing"):
        load_model(tmp_path)


def test_refuses_another_network_even_with_a_consistent_manifest(model_copy):
    # Swap in another graph and re-sign the manifest: the checksums hold, but
    # the network is not the one the head was trained on.
    other = get_backbone("efficientnet_lite0").onnx_path()
    shutil.copyfile(other, model_copy / "backbone.onnx")
    _resign(model_copy, "backbone.onnx")
    with pytest.raises(FingerprintMismatchError, match="not the .* of the network"):
        load_model(model_copy)


def test_refuses_a_backbone_with_another_fingerprint(model_copy):
    with pytest.raises(FingerprintMismatchError, match="has fingerprint .* trained"):
        load_model(model_copy, backbone="efficientnet_lite0")
    model = load_model(model_copy, backbone="minilm_l6")
    assert model.backbone.onnx_file is None  # the registered, exported one


def test_refuses_untrusted_types_in_the_head(model_copy):
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    sio.dump(FunctionTransformer(print), model_copy / "head.skops")
    _resign(model_copy, "head.skops")
    with pytest.raises(ModelDirError, match="types bneck does not trust"):
        load_model(model_copy)


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path, text_model):
    (tmp_path / "notes.txt").write_text("mine")
    model = load_model(text_model[0])
    with pytest.raises(ValueError, match="non-empty folder that holds no bneck model"):
        save_model(tmp_path, model.backbone, model.head)
