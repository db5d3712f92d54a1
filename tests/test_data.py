"""Reading data sets: class folders, tables of paths, tables of texts."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from features import load_dataset


def test_load_folder_of_class_folders(ants_bees):
    dataset = load_dataset(ants_bees / "train")

    assert dataset.modality == "image"
    assert len(dataset) == 245  # 244 photos and the GIF placeholder
    assert Counter(dataset.labels) == {"ants": 124, "bees": 121}
    assert dataset.labelled
    assert str(ants_bees / "train" / "ants" / "imageNotFound.gif") in dataset.items
    assert dataset.sources == dataset.items
    assert all(Path(item).is_file() for item in dataset.items)
    assert len(load_dataset(ants_bees / "val")) == 153


def test_load_folder_with_files_at_the_top_has_no_labels(ants_bees, tmp_path):
    for path in sorted((ants_bees / "val" / "bees").iterdir())[:3]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "notes.md").write_text("not an input")

    dataset = load_dataset(tmp_path)

    assert len(dataset) == 3
    assert dataset.labels is None
    assert not dataset.labelled


def test_load_folder_of_text_files(tmp_path):
    for label, texts in {"ham": ["see you at 5", "ok"], "spam": ["WIN cash"]}.items():
        (tmp_path / label).mkdir()
        for number, text in enumerate(texts):
            (tmp_path / label / f"{number}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "spam" / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")

    dataset = load_dataset(tmp_path)

    assert dataset.modality == "text"
    assert sorted(dataset.items) == ["WIN cash", "ok", "see you at 5"]
    assert Counter(dataset.labels) == {"ham": 2, "spam": 1}
    assert len(dataset.skipped) == 1
    assert dataset.skipped[0]["source"].endswith("bad.txt")
    assert "not UTF-8" in dataset.skipped[0]["reason"]


def test_load_csv_resolves_relative_paths_against_the_table(
    ants_bees, tmp_path, monkeypatch
):
    (tmp_path / "images").mkdir()
    rows = ["path,label"]
    for label in ("ants", "bees"):
        for path in sorted((ants_bees / "val" / label).iterdir())[:2]:
            shutil.copy(path, tmp_path / "images" / path.name)
            rows.append(f"images/{path.name},{label}")
    table = tmp_path / "table.csv"
    table.write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(ants_bees)  # somewhere else entirely

    dataset = load_dataset(table)

    assert dataset.modality == "image"
    assert list(dataset.labels) == ["ants", "ants", "bees", "bees"]
    assert all(Path(item).is_file() for item in dataset.items)
    assert all(Path(item).parent == tmp_path / "images" for item in dataset.items)


def test_load_csv_with_custom_columns_and_blank_cells(tmp_path):
    table = tmp_path / "reviews.csv"
    table.write_text('message,class\n"Great, thanks",pos\n,neg\nAwful,\nFine,3\n')

    dataset = load_dataset(table, text_column="message", label_column="class")

    assert dataset.modality == "text"
    assert dataset.items == ["Great, thanks", "Fine"]
    assert list(dataset.labels) == ["pos", "3"]
    assert dataset.skipped == [
        {"source": "reviews.csv:3", "reason": "missing message"},
        {"source": "reviews.csv:4", "reason": "missing class"},
    ]


def test_load_headerless_tsv_with_columns(sms_file):
    dataset = load_dataset(sms_file, columns=["label", "text"])

    assert dataset.modality == "text"
    assert len(dataset) == 5574
    assert Counter(dataset.labels) == {"ham": 4827, "spam": 747}
    assert len(set(dataset.items)) == 5171
    assert dataset.skipped == []
    assert dataset.sources[0] == "SMSSpamCollection:1"
    # Stray quote characters stay in their own message (quoting is off).
    assert sum('"' in text for text in dataset.items) > 0


def test_load_tsv_by_suffix_keeps_quotes(tmp_path):
    table = tmp_path / "texts.tsv"
    table.write_text('text\tlabel\n"quoted start\tham\nplain\tspam\n')

    dataset = load_dataset(table)

    assert dataset.items == ['"quoted start', "plain"]
    assert list(dataset.labels) == ["ham", "spam"]


def test_load_table_without_the_named_column_says_how_to_fix(tmp_path):
    table = tmp_path / "odd.csv"
    table.write_text("file,kind\na.jpg,x\n")

    with pytest.raises(ValueError, match="neither a path column 'path' nor a text"):
        load_dataset(table)
    dataset = load_dataset(table, path_column="file", label_column="kind")
    assert dataset.items == [str(tmp_path / "a.jpg")]


def test_load_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_dataset(tmp_path / "nowhere")


def test_load_folder_without_inputs_is_a_clear_error(tmp_path):
    (tmp_path / "readme.md").write_text("nothing to classify")

    with pytest.raises(ValueError, match="holds no images"):
        load_dataset(tmp_path)
