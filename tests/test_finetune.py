"""Fine-tuning: freezing, learning rates, augmentation, export, resume.

Every fit here runs one or two optimiser steps on a few real images at a
small input size (or a few SMS texts), so the whole file stays fast; the
full-size comparisons live in benchmarks/bench_finetune.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from features import Extractor, get_backbone
from pipeline._augment import ImageAugmenter
from pipeline._finetune import FineTunedClassifier, head_as_logistic_regression
from pipeline._strategy import choose_strategy, recommend

torch = pytest.importorskip("torch")

TINY = {"image_size": 32, "batch_size": 4, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def few_images(ants_bees):
    """Four ants and four bees, real JPEGs."""
    ants = sorted((ants_bees / "train" / "ants").glob("*.jpg"))[:4]
    bees = sorted((ants_bees / "train" / "bees").glob("*.jpg"))[:4]
    return [str(p) for p in ants + bees], np.array(["ants"] * 4 + ["bees"] * 4)


@pytest.fixture(scope="module")
def fitted(few_images):
    """One optimiser step of the default fine-tuning recipe."""
    X, y = few_images
    model = FineTunedClassifier(epochs=1, validation_fraction=0, **TINY)
    return model.fit(X, y)


@pytest.fixture(scope="module")
def pretrained_state():
    body = get_backbone("efficientnet_lite0").build_module()
    return {key: value.clone() for key, value in body.state_dict().items()}


def _changed(before, after, prefix: str) -> list[bool]:
    return [
        not torch.equal(before[key], after[key])
        for key in before
        if key.startswith(prefix) and before[key].is_floating_point()
    ]


def test_freezing_keeps_stem_and_first_half_of_blocks(fitted, pretrained_state):
    state = fitted.network_.body.state_dict()
    frozen_prefixes = ["net._conv_stem.", "net._bn0."] + [
        f"net._blocks.{i}." for i in range(8)
    ]
    for prefix in frozen_prefixes:
        changed = _changed(pretrained_state, state, prefix)
        assert changed and not any(changed), f"{prefix} moved although frozen"
    for i in range(8, 16):
        assert any(_changed(pretrained_state, state, f"net._blocks.{i}.")), i
    assert any(_changed(pretrained_state, state, "net._conv_head."))
    frozen = [
        p.requires_grad
        for name, p in fitted.network_.body.named_parameters()
        if name.startswith(("net._conv_stem", "net._blocks.0."))
    ]
    assert frozen and not any(frozen)


def test_batchnorm_statistics_stay_pretrained_unless_asked(
    fitted, few_images, pretrained_state
):
    def statistics(state):
        return {k: v for k, v in state.items() if k.endswith("running_mean")}

    kept = statistics(fitted.network_.body.state_dict())
    assert kept and all(
        torch.equal(value, pretrained_state[key]) for key, value in kept.items()
    )
    # The layers themselves learnt: the BatchNorm scales of the free half moved.
    assert any(
        _changed(
            pretrained_state, fitted.network_.body.state_dict(), "net._blocks.15._bn"
        )
    )

    X, y = few_images
    free = FineTunedClassifier(
        epochs=1, validation_fraction=0, freeze_batchnorm=False, **TINY
    ).fit(X, y)
    moved = statistics(free.network_.body.state_dict())
    assert any(not torch.equal(moved[k], pretrained_state[k]) for k in moved)


def test_frozen_blocks_option_sets_how_many(few_images, pretrained_state):
    X, y = few_images
    model = FineTunedClassifier(
        epochs=1, validation_fraction=0, frozen_blocks=12, **TINY
    ).fit(X, y)
    state = model.network_.body.state_dict()
    assert not any(_changed(pretrained_state, state, "net._blocks.11."))
    assert any(_changed(pretrained_state, state, "net._blocks.12."))


def test_head_and_pretrained_layers_get_their_learning_rates(fitted, few_images):
    # Images: the head at the from-scratch rate, pretrained layers 10x lower.
    assert fitted.learning_rates_ == pytest.approx({"head": 3e-3, "backbone": 3e-4})
    X, y = few_images
    model = FineTunedClassifier(
        lr=0.02, backbone_lr_factor=0.5, epochs=1, validation_fraction=0, **TINY
    ).fit(X, y)
    assert model.learning_rates_ == pytest.approx({"head": 0.02, "backbone": 0.01})


def test_scratch_frees_every_layer_at_one_rate(few_images, pretrained_state):
    X, y = few_images
    model = FineTunedClassifier(
        strategy="scratch", epochs=1, validation_fraction=0, **TINY
    ).fit(X, y)
    assert model.learning_rates_ == pytest.approx({"head": 3e-3, "backbone": 3e-3})
    assert all(p.requires_grad for p in model.network_.parameters())
    state = model.network_.body.state_dict()
    assert all(_changed(pretrained_state, state, "net._conv_stem."))
    # Running averages fast enough to follow weights that start at random.
    norms = [
        layer
        for layer in model.network_.modules()
        if isinstance(layer, torch.nn.BatchNorm2d)
    ]
    assert norms and {layer.momentum for layer in norms} == {0.1}


def test_augmentation_changes_the_input(ants_bees):
    from features import ImagePreprocessor

    paths = sorted((ants_bees / "train" / "ants").glob("*.jpg"))[:4]
    decoder = ImagePreprocessor(size=72, crop_padding=0)
    batch = torch.from_numpy(np.stack([decoder.load(p) for p in paths]))
    augment = ImageAugmenter(size=64)
    torch.manual_seed(0)
    first = augment(batch)
    second = augment(batch)
    torch.manual_seed(0)
    again = augment(batch)
    centre = torch.nn.functional.interpolate(batch, size=64, mode="bilinear")
    assert first.shape == (4, 3, 64, 64)
    assert not torch.allclose(first, centre, atol=1e-2)
    assert not torch.allclose(first, second, atol=1e-2)
    assert torch.equal(first, again)  # seeded: repeatable


def test_augmenter_rejects_bad_crop_scale():
    with pytest.raises(ValueError, match=r"crop_scale=\(0\.0, 1\.0\)"):
        ImageAugmenter(crop_scale=(0.0, 1.0))


@pytest.mark.parametrize(
    ("n", "threshold", "expected"),
    [
        (0, 1000, "bottleneck"),
        (999, 1000, "bottleneck"),
        (1000, 1000, "finetune"),
        (50, 50, "finetune"),
        (49, 50, "bottleneck"),
    ],
)
def test_threshold_picks_the_strategy(n, threshold, expected):
    assert choose_strategy(n, threshold) == expected


def test_explicit_strategy_and_recommendation_rules():
    assert choose_strategy(10, strategy="finetune") == "finetune"
    assert choose_strategy(10_000, strategy="bottleneck") == "bottleneck"
    assert recommend(5000, 0.90, 0.95) == "from_scratch"
    assert recommend(5000, 0.90, 0.90) == "from_scratch"
    assert recommend(5000, 0.95, 0.90) == "finetune"
    assert recommend(300, 0.95, 0.90) == "bottleneck"
    assert recommend(300, None, None) == "bottleneck"
    with pytest.raises(ValueError, match="strategy='fine'; expected one of auto"):
        choose_strategy(10, strategy="fine")
    with pytest.raises(ValueError, match="threshold=0"):
        choose_strategy(10, threshold=0)


def test_exported_backbone_matches_pytorch(fitted, few_images, tmp_path):
    X, _ = few_images
    backbone, report = fitted.export_backbone(tmp_path)
    assert report["max_abs_diff"] < 1e-3 and report["min_cosine"] > 0.9999
    assert (tmp_path / "backbone.onnx").is_file()
    assert (tmp_path / "backbone.json").is_file()
    assert backbone.name.startswith("efficientnet_lite0-finetuned-")
    assert backbone.preprocessor.size == 32
    assert backbone.preprocessor.crop_padding == 5  # the same crop as 32 of 224
    assert backbone.fingerprint() != get_backbone("efficientnet_lite0").fingerprint()
    features = Extractor(backbone).extract_features(X)
    through_onnx = fitted.head().predict_proba(features)
    np.testing.assert_allclose(through_onnx, fitted.predict_proba(X), atol=1e-4)
    assert list(fitted.head().classes_) == ["ants", "bees"]


def test_head_as_logistic_regression_matches_softmax():
    linear = torch.nn.Linear(5, 3)
    X = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    expected = torch.softmax(linear(torch.from_numpy(X)), 1).detach().numpy()
    model = head_as_logistic_regression(linear, np.array(["a", "b", "c"]))
    np.testing.assert_allclose(model.predict_proba(X), expected, atol=1e-6)
    binary = torch.nn.Linear(5, 2)
    expected = torch.softmax(binary(torch.from_numpy(X)), 1).detach().numpy()
    model = head_as_logistic_regression(binary, np.array(["a", "b"]))
    np.testing.assert_allclose(model.predict_proba(X), expected, atol=1e-6)


def test_resume_from_checkpoint_equals_uninterrupted_run(few_images, tmp_path):
    X, y = few_images
    params = dict(epochs=2, validation_fraction=0.25, **TINY)
    whole = FineTunedClassifier(**params).fit(X, y)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    folder = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        FineTunedClassifier(
            checkpoint_dir=folder, on_epoch_end=interrupt, **params
        ).fit(X, y)
    assert (folder / "finetune-checkpoint.pt").is_file()
    epochs_run = []
    resumed = FineTunedClassifier(
        checkpoint_dir=folder, on_epoch_end=epochs_run.append, **params
    ).fit(X, y)

    assert [r["epoch"] for r in epochs_run] == [2]  # epoch 1 came from disk
    assert [r["epoch"] for r in resumed.history_] == [1, 2]
    for a, b in zip(whole.history_, resumed.history_, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    expected = whole.network_.state_dict()
    for key, value in resumed.network_.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_of_other_parameters_is_not_resumed(few_images, tmp_path):
    X, y = few_images
    folder = tmp_path / "checkpoints"
    FineTunedClassifier(checkpoint_dir=folder, epochs=1, **TINY).fit(X, y)
    epochs_run = []
    FineTunedClassifier(
        checkpoint_dir=folder,
        epochs=1,
        lr=5e-4,
        on_epoch_end=epochs_run.append,
        **TINY,
    ).fit(X, y)
    assert [r["epoch"] for r in epochs_run] == [1]


def test_patience_stops_early_only_when_asked(few_images):
    # At lr=0 nothing learns, so no epoch after the first scores better.
    X, y = few_images
    params = dict(epochs=4, lr=0.0, validation_fraction=0.25, **TINY)
    stopped = FineTunedClassifier(patience=1, **params).fit(X, y)
    assert [r["epoch"] for r in stopped.history_] == [1, 2]
    assert stopped.best_epoch_ == 1
    full = FineTunedClassifier(**params).fit(X, y)
    assert [r["epoch"] for r in full.history_] == [1, 2, 3, 4]


def test_unreadable_training_image_is_skipped(few_images, tmp_path):
    X, y = few_images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    model = FineTunedClassifier(epochs=1, validation_fraction=0, **TINY)
    model.fit([*X, str(broken)], [*y, "ants"])
    assert [r["source"] for r in model.skipped_] == [str(broken)]
    assert "image" in model.skipped_[0]["reason"]


def test_bad_parameters_are_refused_with_the_fix(few_images):
    X, y = few_images
    with pytest.raises(ValueError, match="image_size=40; expected a multiple of 32"):
        FineTunedClassifier(image_size=40).fit(X, y)
    with pytest.raises(ValueError, match="strategy='bottleneck'; expected"):
        FineTunedClassifier(strategy="bottleneck").fit(X, y)
    with pytest.raises(ValueError, match="frozen_blocks=17; efficientnet_lite0 has 16"):
        FineTunedClassifier(frozen_blocks=17, **TINY).fit(X, y)
    with pytest.raises(ValueError, match="patience=0; expected a positive integer"):
        FineTunedClassifier(patience=0).fit(X, y)
    with pytest.raises(ValueError, match="head_init='zeros'; expected 'probe'"):
        FineTunedClassifier(head_init="zeros").fit(X, y)
    with pytest.raises(ValueError, match="single class"):
        FineTunedClassifier(**TINY).fit(X, ["ants"] * len(X))


def test_text_finetuning_predicts_and_exports(sms_file, tmp_path):
    import pandas as pd

    frame = pd.read_csv(
        sms_file, sep="\t", header=None, quoting=3, names=["label", "text"]
    )
    frame = pd.concat(
        [frame[frame.label == "spam"].head(6), frame[frame.label == "ham"].head(6)]
    )
    X, y = frame.text.tolist(), frame.label.to_numpy()
    model = FineTunedClassifier(
        "minilm_l6",
        epochs=1,
        batch_size=6,
        max_steps_per_epoch=1,
        validation_fraction=0,
    ).fit(X, y)
    frozen = [
        p.requires_grad
        for name, p in model.network_.body.named_parameters()
        if name.startswith(("bert.embeddings", "bert.encoder.layer.2."))
    ]
    assert frozen and not any(frozen)
    assert model.learning_rates_ == pytest.approx({"head": 1e-3, "backbone": 1e-4})
    assert model.predict(X).shape == (12,)
    backbone, report = model.export_backbone(tmp_path)
    assert report["max_abs_diff"] < 1e-3
    features = Extractor(backbone).extract_features(X)
    np.testing.assert_allclose(
        model.head().predict_proba(features), model.predict_proba(X), atol=1e-4
    )


def test_cli_train_finetune_writes_a_model_predict_reads(few_images, tmp_path):
    from pipeline.cli import main

    X, y = few_images
    data = tmp_path / "data"
    for path, label in zip(X, y, strict=True):
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / Path(path).name).symlink_to(path)
    model_dir, store = tmp_path / "model", tmp_path / "store.h5"
    code = main(
        ["train", str(data), "--strategy", "auto", "--threshold", "8",
         "--epochs", "1", "--image-size", "32", "--batch-size", "4",
         "--out", str(model_dir), "--store", str(store), "--json",
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    info = json.loads((model_dir / "model.json").read_text())
    assert info["training"]["strategy"] == "finetune"
    assert info["backbone"]["name"].startswith("efficientnet_lite0-finetuned-")
    assert info["training"]["export"]["max_abs_diff"] < 1e-3
    assert not (tmp_path / "model.checkpoint").exists()
    out = tmp_path / "predictions.csv"
    code = main(
        ["predict", str(model_dir), str(data), "--store", str(store),
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert len(out.read_text().splitlines()) == 1 + len(X)
