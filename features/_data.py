"""Data sets as users have them: class folders, or a table of paths or texts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "IMAGE_SUFFIXES", "load_dataset"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .png .gif .bmp .tif .tiff .webp .ppm .pgm .jfif".split()
)
TEXT_SUFFIXES = frozenset({".txt"})
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".parquet": None}


@dataclass
class Dataset:
    """Inputs, their labels and how to name them in reports.

    Attributes
    ----------
    items : list
        Image paths (str) or texts.
    labels : numpy.ndarray of object or None
        One label per item; None entries for unlabelled items.
    sources : list of str
        A readable name per item: its path, or ``table.csv:row``.
    modality : {"image", "text"}
    skipped : list of dict
        Entries that could not become items, with ``source`` and ``reason``.
    """

    items: list
    labels: np.ndarray | None
    sources: list[str]
    modality: str
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labelled(self) -> bool:
        return self.labels is not None and all(
            label is not None for label in self.labels
        )

    def subset(self, mask) -> Dataset:
        """The items where ``mask`` is true."""
        mask = np.asarray(mask, dtype=bool)
        return Dataset(
            items=[item for item, keep in zip(self.items, mask, strict=True) if keep],
            labels=None if self.labels is None else self.labels[mask],
            sources=[
                source for source, keep in zip(self.sources, mask, strict=True) if keep
            ],
            modality=self.modality,
            skipped=list(self.skipped),
        )


def load_dataset(
    data: str | os.PathLike,
    *,
    path_column: str = "path",
    text_column: str = "text",
    label_column: str = "label",
    columns: list[str] | None = None,
) -> Dataset:
    """Read a data set from a folder or a table file.

    Parameters
    ----------
    data : path
        A folder with one subfolder per class (images, or ``.txt`` files
        holding one text each; files at the top level have no label), or a
        table (CSV, TSV, Parquet) with a path or text column and an optional
        label column. Relative paths in a table resolve against its folder.
    path_column, text_column, label_column : str
        Column names in a table.
    columns : list of str, optional
        For a table without a header row: the names of its columns.
    """
    data = Path(data)
    if data.is_dir():
        return _load_folder(data)
    if data.is_file():
        return _load_table(data, path_column, text_column, label_column, columns)
    raise FileNotFoundError(f"no such file or folder: {data}")


def _load_folder(root: Path) -> Dataset:
    files: list[tuple[Path, str | None]] = []
    ignored = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            for path in sorted(entry.rglob("*")):
                if not path.name.startswith(".") and not path.is_dir():
                    files.append((path, entry.name))
        else:
            files.append((entry, None))
    images = [(p, lab) for p, lab in files if p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [(p, lab) for p, lab in files if p.suffix.lower() in TEXT_SUFFIXES]
    if not images and not texts:
        raise ValueError(
            f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no "
            ".txt files; pass a folder of class subfolders or a table file"
        )
    chosen = images if len(images) >= len(texts) else texts
    ignored = len(files) - len(chosen)
    if ignored:
        logger.info("ignored %d files in %s that are not inputs", ignored, root)
    labels = [label for _, label in chosen]
    has_labels = any(label is not None for label in labels)
    if images is chosen:
        return Dataset(
            items=[str(path) for path, _ in chosen],
            labels=np.array(labels, dtype=object) if has_labels else None,
            sources=[str(path) for path, _ in chosen],
            modality="image",
        )
    return _read_text_files(chosen, has_labels)


def _read_text_files(chosen, has_labels: bool) -> Dataset:
    items, labels, sources, skipped = [], [], [], []
    for path, label in chosen:
        try:
            items.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            skipped.append({"source": str(path), "reason": f"not UTF-8 text: {exc}"})
            continue
        except OSError as exc:
            skipped.append({"source": str(path), "reason": f"cannot read: {exc}"})
            continue
        labels.append(label)
        sources.append(str(path))
    return Dataset(
        items=items,
        labels=np.array(labels, dtype=object) if has_labels else None,
        sources=sources,
        modality="text",
        skipped=skipped,
    )


def _load_table(path, path_column, text_column, label_column, columns) -> Dataset:
    import pandas as pd

    frame = _read_table(path, columns)
    if path_column in frame.columns:
        modality, column = "image", path_column
    elif text_column in frame.columns:
        modality, column = "text", text_column
    else:
        raise ValueError(
            f"{path} has columns {list(frame.columns)} but neither a path column "
            f"{path_column!r} nor a text column {text_column!r}; name yours with "
            "--path-column or --text-column (or --columns for a table without a "
            "header)"
        )
    items, labels, sources, skipped = [], [], [], []
    has_labels = label_column in frame.columns
    for row, (value, label) in enumerate(
        zip(
            frame[column],
            frame[label_column] if has_labels else [None] * len(frame),
            strict=True,
        )
    ):
        source = f"{path.name}:{row + 2 if columns is None else row + 1}"
        if pd.isna(value) or (isinstance(value, str) and not value.strip()):
            skipped.append({"source": source, "reason": f"missing {column}"})
            continue
        if has_labels and pd.isna(label):
            skipped.append({"source": source, "reason": f"missing {label_column}"})
            continue
        if modality == "image":
            value = str(path.parent / str(value))
            source = value
        items.append(value if modality == "image" else str(value))
        labels.append(None if not has_labels else _label(label))
        sources.append(source)
    if (
        modality == "image"
        and items
        and all(Path(item).suffix.lower() in TEXT_SUFFIXES for item in items)
    ):
        return _text_paths(items, labels, has_labels, skipped)
    return Dataset(
        items=items,
        labels=np.array(labels, dtype=object) if has_labels else None,
        sources=sources,
        modality=modality,
        skipped=skipped,
    )


def _text_paths(items, labels, has_labels, skipped) -> Dataset:
    dataset = _read_text_files(
        [(Path(item), label) for item, label in zip(items, labels, strict=True)],
        has_labels,
    )
    dataset.skipped = skipped + dataset.skipped
    return dataset


def _label(value):
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_table(path: Path, columns):
    import pandas as pd

    suffix = path.suffix.lower()
    header = "infer" if columns is None else None
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        if columns:
            frame.columns = columns
        return frame
    sep = TABLE_SUFFIXES.get(suffix)
    if sep is None:
        with open(path, encoding="utf-8", errors="replace") as stream:
            first = stream.readline()
        sep = "\t" if "\t" in first else ","
    # Quoting off for tab-separated files: texts such as SMS messages carry
    # stray quote characters that would otherwise merge rows.
    quoting = 3 if sep == "\t" else 0
    try:
        return pd.read_csv(
            path,
            sep=sep,
            header=header,
            names=columns,
            quoting=quoting,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8",
        )
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ValueError(f"cannot parse the table {path}: {exc}") from None
