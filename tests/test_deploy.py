"""bneck export: one ONNX graph from preprocessed input to label and probabilities."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from features import Extractor, ImagePreprocessor
from pipeline import (
    DeploymentMismatchError,
    export_model,
    fit_head,
    load_model,
    save_model,
)
from pipeline.cli import main


@pytest.fixture(scope="module")
def image_models(ants_bees_train, ants_bees_train_extracted, tmp_path_factory):
    """An svm and a logreg model on all of ants/bees train."""
    extractor, result = ants_bees_train_extracted
    features = extractor.features([key for key in result.keys if key])
    labels = np.asarray(ants_bees_train.labels)[result.ok]
    root = tmp_path_factory.mktemp("deploy")
    folders = {}
    for head in ("svm", "logreg"):
        fitted = fit_head(features, labels, head, cv=0)
        folders[head] = save_model(root / head, extractor.backbone, fitted.estimator)
    return folders, extractor.store.path


def _run_graph(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["label", "probabilities"], inputs)


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_exported_graph_matches_bneck_predict_on_val(
    image_models, ants_bees, tmp_path, head
):
    folders, store = image_models
    graph = tmp_path / "model.onnx"
    code = main(["export", str(folders[head]), "--out", str(graph), "--json"])
    assert code == 0
    predictions = tmp_path / "predictions.csv"
    code = main(
        ["predict", str(folders[head]), str(ants_bees / "val"), "--store",
         str(store), "--out", str(predictions), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    with open(predictions, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 153

    preprocessor = ImagePreprocessor()
    labels, proba = [], []
    for start in range(0, len(rows), 32):
        batch = [preprocessor.load(row["source"]) for row in rows[start : start + 32]]
        got = _run_graph(graph, preprocessor.collate(batch))
        labels.extend(got[0])
        proba.append(got[1])
    proba = np.concatenate(proba)

    assert list(labels) == [row["predicted"] for row in rows]
    expected = np.array([[float(row["p_ants"]), float(row["p_bees"])] for row in rows])
    # The CSV rounds to 6 decimals.
    np.testing.assert_allclose(proba, expected, atol=1e-4)


def test_graph_says_its_classes_and_preprocessing(image_models, tmp_path):
    folders, _ = image_models
    out = export_model(folders["logreg"], tmp_path / "m.onnx", keep_features=True)
    assert out["inputs"] == ["pixels"]
    assert out["outputs"] == ["label", "probabilities", "features"]
    assert out["labels_equal"] and out["max_proba_diff"] < 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    meta = {entry.key: entry.value for entry in graph.metadata_props}
    assert json.loads(meta["bneck.classes"]) == ["ants", "bees"]
    preprocessing = json.loads(meta["bneck.preprocessing"])
    assert preprocessing["size"] == 224 and preprocessing["mean"] == [127.0] * 3
    model = load_model(folders["logreg"])
    assert meta["bneck.backbone_fingerprint"] == model.info["backbone"]["fingerprint"]
    inputs = model.backbone.preprocessor.sample_inputs(batch_size=2, seed=5)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (features,) = session.run(["features"], inputs)
    np.testing.assert_allclose(features, model.backbone.run(inputs), atol=1e-5)


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_text_model_exports_with_its_tokenizer_outside(sms_dataset, tmp_path, head):
    from tokenizers import Tokenizer

    texts = sms_dataset.items[:60]
    labels = np.asarray(sms_dataset.labels[:60])
    extractor = Extractor("minilm_l6")
    features = extractor.extract_features(texts)
    fitted = fit_head(features, labels, head, cv=0, modality="text")
    folder = save_model(tmp_path / "sms", extractor.backbone, fitted.estimator)
    out = export_model(folder, tmp_path / "sms.onnx")
    assert out["inputs"] == ["input_ids", "attention_mask"]

    # What a deployment does without bneck: tokenize, pad to the batch, run.
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(out["preprocessing"]["max_length"])
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    inputs = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
    }
    labels_out, proba = _run_graph(tmp_path / "sms.onnx", inputs)
    model = load_model(folder)
    np.testing.assert_allclose(proba, model.predict_proba(texts), atol=1e-4)
    assert list(labels_out) == list(model.predict(texts))


def test_finetuned_model_exports(ants_bees, tmp_path):
    pytest.importorskip("torch")
    from pipeline import FineTunedClassifier, save_finetuned

    paths = sorted((ants_bees / "train" / "ants").glob("*.jpg"))[:4]
    paths += sorted((ants_bees / "train" / "bees").glob("*.jpg"))[:4]
    X, y = [str(p) for p in paths], np.array(["ants"] * 4 + ["bees"] * 4)
    model = FineTunedClassifier(
        epochs=1,
        validation_fraction=0,
        image_size=64,
        batch_size=4,
        max_steps_per_epoch=1,
    ).fit(X, y)
    folder, _ = save_finetuned(model, tmp_path / "ft")
    out = export_model(folder, tmp_path / "ft.onnx")
    assert out["preprocessing"]["size"] == 64
    loaded = load_model(folder)
    preprocessor = loaded.backbone.preprocessor
    inputs = preprocessor.collate([preprocessor.load(path) for path in X])
    labels, proba = _run_graph(tmp_path / "ft.onnx", inputs)
    np.testing.assert_allclose(proba, loaded.predict_proba(X), atol=1e-4)
    assert list(labels) == list(loaded.predict(X))


def test_mismatch_is_refused_and_nothing_written(image_models, tmp_path, monkeypatch):
    import pipeline._deploy as deploy

    folders, _ = image_models
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)
    with pytest.raises(DeploymentMismatchError, match="it was not written"):
        export_model(folders["svm"], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_export_of_a_folder_without_model_is_one_line(tmp_path, capsys):
    code = main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"bneck export: error: no model folder at {tmp_path / 'none'}"
    )
