"""bneck train / predict / evaluate / demo end to end on real data."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from pipeline import load_model
from pipeline._demo import run_demo
from pipeline.cli import main


def run_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def trained(workdir, ants_bees):
    """ants/bees train -> an svm model (fresh store) and a searched logreg."""
    store = workdir / "features.h5"
    common = ["--store", str(store), "--no-progress", "--json"]
    outputs = {}
    for name, extra in [("svm", []), ("logreg", ["--search"])]:
        argv = ["train", str(ants_bees / "train"), "--out", str(workdir / name)]
        argv += ["--classifier", name, *common, *extra]
        code = main(argv)
        outputs[name] = (code, argv)
    return outputs


def test_train_reports_and_writes_model(trained, workdir, ants_bees, capsys):
    assert trained["svm"][0] == 0 and trained["logreg"][0] == 0
    # Train again into the same folder: features now all come from the store.
    code, out = run_json(capsys, trained["svm"][1])
    assert code == 0
    assert out["n_samples"] == 245
    assert out["classes"] == ["ants", "bees"]
    assert out["computed"] == 0 and out["cached"] == 245
    assert out["cv_folds"] == 5 and len(out["cv_scores"]) == 5
    assert 0.9 < out["cv_score"] <= 1.0
    assert out["failed"] == 0 and out["failures"] == []
    model = load_model(workdir / "svm")
    assert model.info["training"]["class_counts"] == {"ants": 124, "bees": 121}
    assert model.info["cv"]["mean"] == out["cv_score"]


def test_search_records_every_candidate(workdir):
    info = load_model(workdir / "logreg").info
    assert [row["C"] for row in info["search"]] == [0.01, 0.1, 1, 10, 100, 1000]
    assert info["head"]["params"]["C"] in {row["C"] for row in info["search"]}


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_evaluate_on_val(workdir, ants_bees, capsys, head):
    report = workdir / f"report-{head}"
    argv = ["evaluate", str(workdir / head), str(ants_bees / "val")]
    argv += ["--store", str(workdir / "features.h5"), "--report", str(report)]
    code, out = run_json(capsys, [*argv, "--json", "--no-progress"])
    assert code == 0
    assert out["n_samples"] == 153
    assert out["accuracy"] >= 0.9
    assert 0 < out["balanced_accuracy"] <= 1 and 0 < out["macro_f1"] <= 1
    assert set(out["per_class"]) == {"ants", "bees"}
    assert sum(row["support"] for row in out["per_class"].values()) == 153
    assert set(out["per_class"]["ants"]) == {"precision", "recall", "f1", "support"}
    matrix = np.array(out["confusion_matrix"]["matrix"])
    assert matrix.sum() == 153
    assert np.trace(matrix) / 153 == pytest.approx(out["accuracy"], abs=1e-4)
    files = {path.name for path in report.iterdir()}
    assert {"confusion_matrix.png", "per_class.csv", "scores.json"} <= files
    assert ("cv_scores.png" in files) == (head == "logreg")  # after --search only
    assert (report / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_prints_a_table(workdir, ants_bees, capsys):
    argv = ["evaluate", str(workdir / "svm"), str(ants_bees / "val")]
    assert main([*argv, "--store", str(workdir / "features.h5")]) == 0
    text = capsys.readouterr().out
    assert "153 samples: accuracy" in text and "confusion matrix" in text


def test_predict_writes_one_row_per_input(workdir, ants_bees, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(ants_bees / "val" / "bees", folder / "bees")
    (folder / "bees" / "broken.jpg").write_bytes(b"not a jpeg")
    out_csv = tmp_path / "predictions.csv"
    argv = ["predict", str(workdir / "svm"), str(folder), "--out", str(out_csv)]
    argv += ["--store", str(workdir / "features.h5"), "--no-progress"]
    code, out = run_json(capsys, [*argv, "--json"])
    assert code == 3  # an input was skipped, and not accepted
    with open(out_csv, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 84 == out["predicted"] + out["failed"]
    assert list(rows[0]) == ["source", "predicted", "p_ants", "p_bees", "error"]
    broken = [row for row in rows if row["source"].endswith("broken.jpg")]
    assert broken[0]["predicted"] == "" and "not an image" in broken[0]["error"]
    good = [row for row in rows if not row["error"]]
    for row in good:
        assert float(row["p_ants"]) + float(row["p_bees"]) == pytest.approx(1, 1e-4)
    assert sum(row["predicted"] == "bees" for row in good) / len(good) > 0.85
    assert main([*argv, "--allow-skipped"]) == 0


def test_user_errors_are_one_line(workdir, ants_bees, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(workdir / "svm", broken)
    (broken / "head.skops").write_bytes(b"tampered")
    code = main(["evaluate", str(broken), str(ants_bees / "val")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"bneck evaluate: error: {broken / 'head.skops'} does not match its "
        "checksum in manifest.json: the file was altered or damaged; restore it "
        "or retrain"
    ]
    code = main(["train", str(ants_bees / "val" / "ants"), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bneck train: error: ")
    assert "have no label" in err[0]


def test_demo_runs_on_a_fresh_folder(tmp_path):
    out = run_demo(tmp_path, per_class=16, echo=False)
    assert out["n_train"] + out["n_test"] == 160
    assert 0.5 < out["bottleneck"]["accuracy"] <= 1
    assert 0.5 < out["raw_pixels"]["accuracy"] <= 1
    assert out["winner"] in {"bottleneck", "raw_pixels"}
    assert len(list((tmp_path / "digits32").rglob("*.png"))) == 1797
    assert load_model(out["model_dir"]).backbone.name == "efficientnet_lite0"
    # The demo follows advise: on digits, far from ImageNet, it trains anew.
    advice = out["advice"]
    assert advice["recommendation"] in {"bottleneck", "finetune", "from_scratch"}
    assert 0 < advice["bottleneck_cv_accuracy"] <= 1
    assert 0 < advice["baseline_cv_accuracy"] <= 1
    if advice["recommendation"] == "bottleneck":
        assert out["trained"] is None
    else:
        # 120 digits and 4 epochs are too few to score well; the full demo
        # (1,347 digits) reaches about 0.96 from scratch.
        expected = {"finetune": "finetune", "from_scratch": "scratch"}
        assert out["trained"]["strategy"] == expected[advice["recommendation"]]
        assert out["trained"]["epochs"] >= 1
        assert 0 <= out["trained"]["accuracy"] <= 1
