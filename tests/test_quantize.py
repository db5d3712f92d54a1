"""INT8 backbones: their own fingerprint, a cached graph, features close to FP32."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from features import Extractor, FeatureStore, get_backbone
from features._quantize import QuantizationConfig
from pipeline.cli import main

#: Floors on the cosine similarity of INT8 to FP32 features. Measured on the
#: full data sets (benchmarks/README.md): images mean 0.995, min 0.986;
#: texts mean 0.990, min 0.96.
IMAGE_COSINE_FLOOR = 0.97
TEXT_COSINE_FLOOR = 0.93

SMALL = QuantizationConfig(method="static", calibration_size=12, calibration_batch=6)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photos(ants_bees) -> dict[str, list[str]]:
    train = sorted(str(p) for p in (ants_bees / "train").glob("*/*.jpg"))
    val = sorted(str(p) for p in (ants_bees / "val").glob("*/*.jpg"))
    return {"train": train, "val": val[::19]}


@pytest.fixture(scope="module")
def image_int8(photos):
    return get_backbone("efficientnet_lite0").quantized(photos["train"], SMALL)


@pytest.fixture(scope="module")
def sms_texts(sms_file) -> list[str]:
    lines = sms_file.read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[1] for line in lines[:64]]


def test_int8_image_backbone_is_a_new_graph_with_its_own_fingerprint(image_int8):
    fp32 = get_backbone("efficientnet_lite0")

    assert image_int8.fingerprint() != fp32.fingerprint()
    assert image_int8.name == "efficientnet_lite0-int8"
    assert image_int8.onnx_path().is_file()
    assert image_int8.onnx_path() != fp32.onnx_path()
    assert image_int8.preprocessor == fp32.preprocessor


def test_int8_image_graph_holds_quantized_convolutions(image_int8):
    import onnx

    graph = onnx.load(str(image_int8.onnx_path())).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = {init.name: init for init in graph.initializer}
    int8_weights = [w for w in weights.values() if w.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 40  # one per convolution


def test_int8_image_features_stay_close_to_fp32(image_int8, photos):
    fp32 = get_backbone("efficientnet_lite0")

    want = Extractor(fp32).extract_features(photos["val"])
    got = Extractor(image_int8).extract_features(photos["val"])

    assert got.shape == want.shape == (len(photos["val"]), 1280)
    assert _cosine(want, got).min() > IMAGE_COSINE_FLOOR


def test_int8_calibration_sample_ignores_input_order(image_int8, photos):
    again = get_backbone("efficientnet_lite0").quantized(
        list(reversed(photos["train"])), SMALL
    )

    assert again.fingerprint() == image_int8.fingerprint()
    assert again.onnx_path() == image_int8.onnx_path()


def test_int8_fingerprint_changes_with_the_calibration_data(image_int8, photos):
    other = get_backbone("efficientnet_lite0").quantized(photos["val"], SMALL)

    assert other.fingerprint() != image_int8.fingerprint()


def test_int8_image_needs_calibration_inputs():
    with pytest.raises(ValueError, match="needs calibration inputs"):
        get_backbone("efficientnet_lite0").quantized([])


def test_int8_calibration_passes_over_unreadable_inputs(photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    config = QuantizationConfig(method="static", calibration_size=2)

    with pytest.raises(ValueError, match="none of the 1 calibration inputs"):
        get_backbone("efficientnet_lite0").quantized([str(broken)], config)


def test_int8_text_backbone_is_dynamic_and_close_to_fp32(sms_texts):
    fp32 = get_backbone("minilm_l6")
    int8 = fp32.quantized()

    want = Extractor(fp32).extract_features(sms_texts)
    got = Extractor(int8).extract_features(sms_texts)

    assert int8.fingerprint() != fp32.fingerprint()
    assert _cosine(want, got).min() > TEXT_COSINE_FLOOR
    assert _cosine(want, got).mean() > 0.98


def test_cli_extract_precision_int8_uses_its_own_namespace(sms_texts, tmp_path):
    table = tmp_path / "sms.tsv"
    table.write_text("".join(f"ham\t{text}\n" for text in sms_texts[:20]))
    store = tmp_path / "s.h5"
    common = [str(table), "--columns", "label,text", "--store", str(store)]

    assert main(["extract", *common, "--no-progress"]) == 0
    assert main(["extract", *common, "--precision", "int8", "--no-progress"]) == 0

    namespaces = FeatureStore(store).info()
    backbones = sorted(
        value["backbone"]
        for key, value in namespaces.items()
        if key != "path" and isinstance(value, dict)
    )
    assert backbones == ["minilm_l6", "minilm_l6-int8"]


def test_cli_rejects_unknown_precision(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "x.tsv", "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_cli_int8_splits_share_one_backbone_with_calibration(
    ants_bees, tmp_path, capsys
):
    for split, count in (("train", 4), ("val", 2)):
        for label in ("ants", "bees"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for path in sorted((ants_bees / split / label).glob("*.jpg"))[:count]:
                shutil.copy(path, folder / path.name)
    int8 = ["--precision", "int8", "--store", str(tmp_path / "s.h5"), "--json"]

    def fingerprint(*args: str) -> str:
        assert main(["extract", *args, *int8, "--no-progress"]) == 0
        return json.loads(capsys.readouterr().out)["fingerprint"]

    train = fingerprint(str(tmp_path / "train"))
    val = fingerprint(str(tmp_path / "val"), "--calibration", str(tmp_path / "train"))
    val_alone = fingerprint(str(tmp_path / "val"))

    assert val == train
    assert val_alone != train
