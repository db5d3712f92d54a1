"""``bneck extract`` and ``bneck backbones`` end to end, on the real data."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from features import get_backbone
from pipeline.cli import main

SUMMARY_KEYS = {"items", "computed", "cached", "failed", "seconds"}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def train_run(ants_bees, tmp_path_factory):
    """``bneck extract`` over the whole ants/bees training folder, once."""
    store = tmp_path_factory.mktemp("cli") / "s.h5"
    argv = [
        "extract",
        str(ants_bees / "train"),
        "--backbone",
        "efficientnet_lite0",
        "--store",
        str(store),
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return argv, store, code, stdout.getvalue()


def test_extract_train_folder_stores_one_row_per_image(train_run, ants_bees):
    _, store, code, out = train_run

    assert code == 0
    match = re.fullmatch(
        r"245 items: 245 computed, 0 cached, 0 failed in [\d.]+ s "
        r"\([\d.]+ items/s\); store (.+)\n",
        out,
    )
    assert match and match.group(1) == str(store)
    files = sorted(path for path in (ants_bees / "train").rglob("*") if path.is_file())
    assert len(files) == 245  # 244 photos and imageNotFound.gif, which decodes
    fingerprint = get_backbone("efficientnet_lite0").fingerprint()
    with h5py.File(store, "r") as handle:
        assert list(handle) == [fingerprint]
        group = handle[fingerprint]
        keys = [key.decode() for key in group["keys"][()]]
        features = group["features"][()]
        assert group.attrs["backbone"] == "efficientnet_lite0"
        assert group.attrs["feature_dim"] == 1280
        assert group.attrs["computed"] == 245
        assert len(group["failures"]) == 0
    assert features.shape == (245, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert (np.abs(features).sum(axis=1) > 0).all()
    assert sorted(keys) == sorted(sha256_file(path) for path in files)
    assert list(Path(f"{store}.shards").glob("*.h5")) == []  # compacted


def test_extract_again_computes_nothing(train_run, capsys):
    argv, _, _, _ = train_run

    code = main([*argv, "--json"])

    out, _ = capsys.readouterr()
    summary = json.loads(out)
    assert code == 0
    assert out.count("\n") == 1
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["items"], summary["computed"], summary["cached"]) == (245, 0, 245)
    assert summary["failed"] == 0
    assert summary["backbone"] == "efficientnet_lite0"


def test_console_script_runs_the_same_command(train_run):
    argv, _, _, _ = train_run
    script = Path(sys.executable).with_name("bneck")
    assert script.is_file(), "the bneck console script is not installed"

    done = subprocess.run(
        [str(script), *argv, "--json", "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["items"], summary["computed"], summary["cached"]) == (245, 0, 245)
    assert "Traceback" not in done.stderr


def test_extract_headerless_sms_table_with_repeats(sms_dataset, tmp_path, capsys):
    repeated = "Sorry, I'll call later"
    rows = [
        (label, text)
        for position, (label, text) in enumerate(
            zip(sms_dataset.labels, sms_dataset.items, strict=True)
        )
        if position < 100 or text == repeated
    ]
    table = tmp_path / "sms.tsv"
    table.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    store = tmp_path / "sms.h5"
    distinct = len({text for _, text in rows})
    assert distinct < len(rows) - 25

    code = main(
        ["extract", str(table), "--columns", "label,text", "--store", str(store)]
        + ["--json"]
    )

    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["backbone"] == "minilm_l6"  # the default for text
    assert summary["items"] == len(rows)
    assert summary["computed"] == distinct
    assert summary["cached"] == len(rows) - distinct
    with h5py.File(store, "r") as handle:
        features = handle[summary["fingerprint"]]["features"]
        assert features.shape == (distinct, 384)


def test_backbones_lists_modality_size_and_weights(capsys):
    assert main(["backbones"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "modality", "dim", "weights"]
    rows = {line.split()[0]: line.split()[1:4] for line in lines[1:]}
    assert rows["efficientnet_lite0"] == ["image", "1280", "installed"]
    assert rows["minilm_l6"] == ["text", "384", "installed"]


def test_backbones_json(capsys):
    assert main(["backbones", "--json"]) == 0

    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["efficientnet_lite0"]["modality"] == "image"
    assert rows["efficientnet_lite0"]["feature_dim"] == 1280
    assert rows["efficientnet_lite0"]["installed"] is True
    assert rows["minilm_l6"]["modality"] == "text"
    assert rows["minilm_l6"]["feature_dim"] == 384
    assert rows["minilm_l6"]["installed"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backbone", "nope"], "unknown backbone 'nope'; available: "),
        (["--backbone", "minilm_l6"], "backbone 'minilm_l6' takes text inputs but"),
    ],
)
def test_extract_user_errors_are_one_line(ants_bees, tmp_path, capsys, extra, message):
    data = ants_bees / "val" / "ants"

    code = main(["extract", str(data), "--store", str(tmp_path / "s.h5"), *extra])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith(f"bneck extract: error: {message}")
    assert err.count("\n") == 1


def test_extract_refuses_a_foreign_store(ants_bees, tmp_path, capsys):
    foreign = tmp_path / "weights.h5"
    with h5py.File(foreign, "w") as handle:
        handle["w"] = np.zeros(3)

    code = main(["extract", str(ants_bees / "val" / "ants"), "--store", str(foreign)])

    err = capsys.readouterr().err
    assert code == 2
    assert "bneck extract: error: " in err
    assert "not a bneck feature store" in err
    assert err.count("\n") == 1


def test_extract_missing_data_is_one_line(tmp_path, capsys):
    code = main(["extract", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s")])

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"bneck extract: error: no such file or folder: {tmp_path}/nowhere\n"
