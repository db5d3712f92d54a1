"""Export to ONNX: parity with PyTorch, refusal of a mismatch, the cache."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from features import (
    ExportMismatchError,
    ImagePreprocessor,
    cache_dir,
    get_backbone,
    torch_backbone,
)
from features._backbones import _EfficientNetFeatures, _MiniLMFeatures
from features._export import export_onnx, verify_onnx


@pytest.fixture(scope="module")
def lite0():
    """The embedded EfficientNet-Lite0: backbone and its PyTorch module."""
    return get_backbone("efficientnet_lite0"), _EfficientNetFeatures()()


@pytest.fixture(scope="module")
def photos(ants_bees, lite0):
    """Six real photos, preprocessed as the backbone does."""
    backbone, _ = lite0
    paths = [
        *sorted((ants_bees / "val" / "ants").iterdir())[:3],
        *sorted((ants_bees / "val" / "bees").iterdir())[:3],
    ]
    return np.stack([backbone.preprocessor.load(path) for path in paths])


def test_efficientnet_export_matches_pytorch_on_real_photos(lite0, photos):
    backbone, module = lite0

    report = verify_onnx(module, backbone.onnx_path(), {"pixels": photos})

    assert report["max_abs_diff"] < 1e-4
    assert report["min_cosine"] > 0.99999
    saved = json.loads(backbone.onnx_path().with_suffix(".json").read_text())
    assert saved["backbone"] == "efficientnet_lite0"
    assert saved["max_abs_diff"] < 1e-4 and saved["min_cosine"] > 0.99999


def test_minilm_export_matches_pytorch_on_real_messages(sms_sample):
    backbone = get_backbone("minilm_l6")
    module = _MiniLMFeatures()()
    # Short and long messages in one batch, the longest truncated at 256.
    texts = ["Ok...", *sms_sample[200:205], " ".join(sms_sample[-40:])]
    inputs = backbone.preprocessor.collate(texts)
    assert inputs["input_ids"].shape == (7, 256)

    report = verify_onnx(module, backbone.onnx_path(), inputs)

    assert report["max_abs_diff"] < 1e-5
    assert report["min_cosine"] > 0.99999
    saved = json.loads(backbone.onnx_path().with_suffix(".json").read_text())
    assert saved["backbone"] == "minilm_l6"
    assert saved["max_abs_diff"] < 1e-5 and saved["min_cosine"] > 0.99999


def test_efficientnet_graph_has_a_dynamic_batch_axis(lite0, photos):
    backbone, _ = lite0
    graph = onnx.load(str(backbone.onnx_path())).graph

    (pixels,) = graph.input
    dims = pixels.type.tensor_type.shape.dim
    assert pixels.name == "pixels"
    assert [dim.dim_param or dim.dim_value for dim in dims] == ["batch", 3, 224, 224]
    (features,) = graph.output
    dims = features.type.tensor_type.shape.dim
    assert features.name == "features"
    assert [dim.dim_param or dim.dim_value for dim in dims] == ["batch", 1280]

    one = backbone.run({"pixels": photos[2:3]})
    six = backbone.run({"pixels": photos})
    assert one.shape == (1, 1280) and six.shape == (6, 1280)
    np.testing.assert_allclose(one[0], six[2], atol=1e-5)


def test_verify_refuses_a_graph_that_disagrees_with_its_module(lite0, photos):
    backbone, module = lite0
    retouched = copy.deepcopy(module)
    with torch.no_grad():
        retouched.net._conv_head.weight.mul_(1.05)

    with pytest.raises(ExportMismatchError) as caught:
        verify_onnx(retouched, backbone.onnx_path(), {"pixels": photos[:2]})

    message = str(caught.value)
    assert "does not match PyTorch: max abs diff" in message
    assert "(tolerance 0.001)" in message
    assert "the graph was refused" in message
    assert str(backbone.onnx_path()) in message


def small_net(seed: int, outputs: int = 8):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, outputs, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()


def test_verify_refuses_outputs_of_another_shape(tmp_path):
    preprocessor = ImagePreprocessor(size=32)
    path = export_onnx(
        small_net(0),
        preprocessor.sample_inputs(2),
        tmp_path / "small.onnx",
        {"pixels": {0: "batch"}},
    )
    sample = preprocessor.sample_inputs(3, seed=1)

    assert verify_onnx(small_net(0), path, sample)["max_abs_diff"] < 1e-5
    with pytest.raises(ExportMismatchError, match="min cosine"):
        verify_onnx(small_net(1), path, sample)
    with pytest.raises(ExportMismatchError, match="shapes differ: PyTorch \\(3, 4\\)"):
        verify_onnx(small_net(0, outputs=4), path, sample)


class NoisyFeatures(torch.nn.Module):
    """Not deterministic in eval mode: its export can never be verified."""

    def forward(self, pixels):
        pooled = pixels.mean(dim=(2, 3))
        return torch.rand_like(pooled)


def test_refused_export_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BNECK_CACHE_DIR", str(tmp_path))
    backbone = torch_backbone("noisy", NoisyFeatures(), ImagePreprocessor(size=32))

    with pytest.raises(ExportMismatchError, match="deterministic in eval mode"):
        backbone.onnx_path()

    assert list((tmp_path / "onnx").iterdir()) == []


def test_export_happens_once_per_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("BNECK_CACHE_DIR", str(tmp_path))
    preprocessor = ImagePreprocessor(size=32)
    backbone = torch_backbone("small", small_net(0), preprocessor)

    path = backbone.onnx_path()
    stamp = path.stat().st_mtime_ns

    assert path == tmp_path / "onnx" / f"small-{backbone.fingerprint()[:16]}.onnx"
    again = torch_backbone("small", small_net(0), preprocessor)
    assert again.onnx_path() == path
    assert path.stat().st_mtime_ns == stamp
    other = torch_backbone("small", small_net(1), preprocessor)
    assert other.onnx_path() != path
    assert sorted(p.suffix for p in (tmp_path / "onnx").iterdir()) == [
        ".json",
        ".json",
        ".onnx",
        ".onnx",
    ]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BNECK_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"

    monkeypatch.delenv("BNECK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bneck"
