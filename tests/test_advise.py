"""``advise``: counts, duplicates, leakage, evidence and the recommendation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from features import Dataset, MemoryStore
from pipeline._advise import FROM_SCRATCH_WARNING, advise, format_advice
from pipeline._strategy import recommend

KEYS = {
    "n_samples",
    "recommendation",
    "bottleneck_cv_accuracy",
    "baseline_cv_accuracy",
    "class_counts",
    "imbalance_ratio",
    "duplicates",
    "leakage",
    "reasons",
    "warning",
}


@pytest.fixture(scope="module")
def ants_bees_report(ants_bees):
    return advise(ants_bees / "train", val=ants_bees / "val")


@pytest.fixture
def small_folder(ants_bees, tmp_path):
    """Four images a class, one copied within a class and one across classes,
    and a validation folder holding a copy of a training image."""
    root = tmp_path / "train"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for path in sorted((ants_bees / "train" / label).glob("*.jpg"))[:4]:
            shutil.copy(path, root / label / path.name)
    first_ant = sorted((root / "ants").iterdir())[0]
    shutil.copy(first_ant, root / "ants" / "copy.jpg")
    shutil.copy(first_ant, root / "bees" / "mislabelled.jpg")
    val = tmp_path / "val" / "ants"
    val.mkdir(parents=True)
    shutil.copy(sorted((root / "bees").iterdir())[0], val / "leaked.jpg")
    shutil.copy(
        sorted((ants_bees / "val" / "ants").glob("*.jpg"))[0], val / "fresh.jpg"
    )
    return root, tmp_path / "val"


def test_advise_on_ants_bees_recommends_the_bottleneck(ants_bees_report):
    report = ants_bees_report
    assert KEYS <= set(report)
    assert report["n_samples"] == 245
    assert report["class_counts"] == {"ants": 124, "bees": 121}
    assert report["recommendation"] == "bottleneck"  # 245 < 1000, features help
    assert report["bottleneck_cv_accuracy"] > 0.9
    assert report["bottleneck_cv_accuracy"] > report["baseline_cv_accuracy"] + 0.1
    assert report["leakage"] == {"n_val": 153, "shared": 0, "examples": []}
    assert report["warning"] is None
    assert report["cv_folds"] == 5 and len(report["bottleneck_cv_scores"]) == 5


def test_advise_report_reads_as_text(ants_bees_report):
    text = format_advice(ants_bees_report, "hymenoptera_data/train")
    assert "245 image samples in 2 classes" in text
    assert "recommendation: bottleneck" in text
    assert "raw baseline (16x16 colour pixels + logistic regression)" in text
    assert "next: bneck train hymenoptera_data/train --strategy bottleneck" in text


def test_advise_finds_duplicates_and_leakage(small_folder):
    train, val = small_folder
    report = advise(train, val=val, store=MemoryStore(), cv=2)
    duplicates = report["duplicates"]
    assert duplicates["groups"] == 1
    assert duplicates["extra_copies"] == 2
    assert duplicates["conflicting_labels"] == 1
    assert any("mislabelled.jpg (bees)" in entry for entry in duplicates["examples"][0])
    assert report["leakage"]["shared"] == 1
    assert report["leakage"]["examples"][0].endswith("leaked.jpg")
    text = format_advice(report, "train")
    assert "1 with conflicting labels" in text
    assert "leakage: 1 of 2 validation inputs" in text


def test_advise_on_texts_uses_tfidf_and_follows_the_rule(sms_file):
    import pandas as pd

    frame = pd.read_csv(
        sms_file, sep="\t", header=None, quoting=3, names=["label", "text"]
    )
    frame = pd.concat(
        [frame[frame.label == "spam"].head(40), frame[frame.label == "ham"].head(80)]
    )
    data = Dataset(
        frame.text.tolist(),
        frame.label.to_numpy(dtype=object),
        [f"sms:{i}" for i in range(len(frame))],
        "text",
    )
    report = advise(data, store=MemoryStore(), threshold=100)
    assert report["baseline"].startswith("TF-IDF")
    assert report["imbalance_ratio"] == 2.0
    assert 0.5 < report["baseline_cv_accuracy"] <= 1.0
    assert report["recommendation"] == recommend(
        120, report["bottleneck_cv_accuracy"], report["baseline_cv_accuracy"], 100
    )
    assert report["recommendation"] in ("finetune", "from_scratch")


def test_from_scratch_advice_carries_the_warning(ants_bees_report):
    report = dict(ants_bees_report)
    report.update(
        recommendation="from_scratch",
        warning=FROM_SCRATCH_WARNING,
        bottleneck_cv_accuracy=0.6,
        baseline_cv_accuracy=0.7,
    )
    text = format_advice(report, "data")
    assert "warning: pretrained features do no better" in text
    assert "next: bneck train data --strategy scratch" in text


def test_advise_refuses_unlabelled_or_tiny_data():
    unlabelled = Dataset(["a", "b"], None, ["a", "b"], "text")
    with pytest.raises(ValueError, match="advise needs labels"):
        advise(unlabelled, store=MemoryStore())
    tiny = Dataset(
        ["a b", "c d", "e f"],
        np.array(["x", "x", "y"], dtype=object),
        ["1"] * 3,
        "text",
    )
    with pytest.raises(ValueError, match="smallest class has 1 sample"):
        advise(tiny, store=MemoryStore())


def test_cli_advise_json(small_folder, capsys):
    from pipeline.cli import main

    train, val = small_folder
    code = main(["advise", str(train), "--val", str(val), "--cv", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert KEYS <= set(report)
    assert report["n_samples"] == 10
    assert report["recommendation"] in ("bottleneck", "from_scratch")
