"""Files bneck did not write, or that changed since: refused, never run.

A MODEL_DIR is checked against its manifest before anything in it is used,
its head loads from skops with an explicit list of trusted types (a pickle,
or a head holding a function, is refused even with a matching manifest), and
a feature store written by a newer bneck, another program or another
backbone is refused with a message that says so, and left untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil

import h5py
import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from features import Extractor, FeatureStore, StoreError, get_backbone
from pipeline._model_dir import (
    FingerprintMismatchError,
    ModelDirError,
    load_model,
    save_model,
)
from pipeline.cli import main

# ---------------------------------------------------------------- MODEL_DIR


@pytest.fixture(scope="module")
def model_dir(sms_dataset, tmp_path_factory):
    """A real minilm_l6 + logistic-regression MODEL_DIR on 60 SMS texts."""
    labels = np.asarray(sms_dataset.labels)
    chosen = [
        *np.flatnonzero(labels == "ham")[:30],
        *np.flatnonzero(labels == "spam")[:30],
    ]
    texts = [sms_dataset.items[i] for i in chosen]
    backbone = get_backbone("minilm_l6")
    features = Extractor(backbone, num_threads=1).extract_features(texts)
    head = Pipeline(
        [("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=500))]
    ).fit(features, labels[chosen])
    path = tmp_path_factory.mktemp("models") / "model"
    save_model(path, backbone, head, head_kind="logreg")
    return path, texts[:4], head.predict_proba(features[:4])


def _copy(model_dir, tmp_path):
    path, _, _ = model_dir
    return shutil.copytree(path, tmp_path / "model")


def _reseal(path):
    """Recompute the manifest, as someone swapping files on purpose would."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_intact_model_dir_loads_and_predicts(model_dir):
    path, texts, expected = model_dir
    model = load_model(path)
    np.testing.assert_allclose(model.predict_proba(texts), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["head.skops", "model.json", "backbone.onnx"])
def test_one_changed_byte_is_refused(model_dir, tmp_path, name):
    path = _copy(model_dir, tmp_path)
    file = path / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=f"{re.escape(name)} does not match its"):
        load_model(path)


def test_missing_file_and_altered_manifest_are_refused(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    digest = manifest["files"]["head.skops"]["sha256"]
    manifest["files"]["head.skops"]["sha256"] = digest[::-1]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="head.skops does not match"):
        load_model(path)

    (path / "backbone.onnx").unlink()
    with pytest.raises(ModelDirError, match="incomplete: backbone.onnx is missing"):
        load_model(path)

    (path / "manifest.json").unlink()
    with pytest.raises(ModelDirError, match="manifest.json is missing"):
        load_model(path)


def test_pickled_head_is_refused_even_with_a_matching_manifest(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this would create ``marker``
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "head.skops").write_bytes(pickle.dumps(Payload()))
    _reseal(path)
    with pytest.raises(ModelDirError, match="is not a skops file .*runs no code"):
        load_model(path)
    assert not marker.exists()


def test_head_with_untrusted_types_is_refused(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    evil = Pipeline([("run", FunctionTransformer(os.system))])
    sio.dump(evil, path / "head.skops")
    _reseal(path)
    with pytest.raises(ModelDirError, match=r"types bneck does not trust: .*system"):
        load_model(path)


def test_model_dir_with_another_backbone_is_refused(model_dir):
    path, _, _ = model_dir
    with pytest.raises(FingerprintMismatchError, match="trained on features of"):
        load_model(path, backbone="efficientnet_lite0")


def test_cli_predict_on_tampered_model_is_one_line(model_dir, tmp_path, capsys):
    path = _copy(model_dir, tmp_path)
    (path / "head.skops").write_bytes(b"not what was saved")
    data = tmp_path / "texts.tsv"
    data.write_text("text\nhello there\n")
    code = main(["predict", str(path), str(data), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"bneck predict: error: {path / 'head.skops'} does not match its checksum "
        "in manifest.json: the file was altered or damaged; restore it or retrain"
    ]


# ------------------------------------------------------------ feature store


def _store_with_rows(path):
    store = FeatureStore(path)
    store.put(
        "fp",
        ["a" * 64],
        np.ones((1, 3), np.float32),
        {"backbone": "x", "feature_dim": 3},
    )
    store.compact()
    return store


def test_store_of_a_newer_format_is_refused_and_kept(tmp_path):
    path = tmp_path / "f.h5"
    _store_with_rows(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["bneck_format"] = 99
    before = path.read_bytes()
    with pytest.raises(StoreError, match="store format 99, newer than this bneck"):
        FeatureStore(path)
    assert path.read_bytes() == before


def test_foreign_and_non_hdf5_files_are_refused_and_kept(tmp_path, capsys):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["data"] = np.arange(5)
    text = tmp_path / "notes.h5"
    text.write_text("my notes, not HDF5\n")
    for path, message in [
        (foreign, "is an HDF5 file but not a bneck feature store"),
        (text, "is not an HDF5 file bneck can read"),
    ]:
        before = path.read_bytes()
        with pytest.raises(StoreError, match=message):
            FeatureStore(path)
        (tmp_path / "t.tsv").write_text("text\nhello\n")
        code = main(
            ["extract", str(tmp_path / "t.tsv"), "--store", str(path), "--no-progress"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and message in err[0]
        assert "will not overwrite it" in err[0]
        assert path.read_bytes() == before


def test_store_without_the_requested_backbone_says_so(tmp_path):
    store = _store_with_rows(tmp_path / "f.h5")
    with pytest.raises(KeyError, match=r"holds no features of the backbone .*x \(fp\)"):
        store.get("other-fingerprint", ["a" * 64])
