"""Checks that stop a run early with a message that says what to do.

Two kinds of trouble are handled here. A training set that cannot work
(one class, fewer samples than cross-validation folds, a class too small to
appear in every fold) is refused before any fitting, with the fix in the
message. Inputs that were skipped (unreadable files, missing labels, empty
texts) are listed in a CSV file, and the command exits with
:data:`EXIT_SKIPPED` unless the user accepted them with ``--allow-skipped``.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "EXIT_SKIPPED",
    "TrainingDataError",
    "check_training_labels",
    "interrupts_in_finalizers",
    "report_skipped",
    "skipped_list_path",
    "write_skipped",
]

#: Exit code of a command that finished but skipped some inputs.
EXIT_SKIPPED = 3


class TrainingDataError(ValueError):
    """A training set no classifier can be fitted and scored on."""


def check_training_labels(labels: Sequence | np.ndarray, cv: int | None = 5) -> None:
    """Refuse labels that cannot train a classifier or fill ``cv`` folds.

    Parameters
    ----------
    labels : sequence
        One label per training sample; None marks a sample without one.
    cv : int or None, default=5
        Number of stratified cross-validation folds the run will use; None or
        a value below 2 skips the fold checks.

    Raises
    ------
    TrainingDataError
        With a one-line message naming the problem and the fix.

    Examples
    --------
    >>> check_training_labels(["ant", "bee"] * 5, cv=5)
    >>> check_training_labels(["ant"] * 10, cv=5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline._validation.TrainingDataError: the training data holds a single ...
    """
    labels = list(labels)
    if not labels:
        raise TrainingDataError(
            "the training data holds no usable samples; check the path and the "
            "list of skipped inputs"
        )
    unlabelled = sum(label is None for label in labels)
    if unlabelled:
        raise TrainingDataError(
            f"{unlabelled} of {len(labels)} training samples have no label; put "
            "images in one subfolder per class, or give a label column"
        )
    counts = Counter(labels)
    if len(counts) < 2:
        ((label, count),) = counts.items()
        raise TrainingDataError(
            f"the training data holds a single class ({label!r}, {count} samples); "
            "a classifier needs at least two: add samples of another class (one "
            "subfolder per class, or another value in the label column)"
        )
    if cv is None or cv < 2:
        return
    if len(labels) < cv:
        raise TrainingDataError(
            f"{len(labels)} training samples are fewer than the {cv} "
            f"cross-validation folds; pass --cv {max(2, len(labels))} or less, or "
            "add samples"
        )
    small = sorted(
        ((count, str(label)) for label, count in counts.items() if count < cv)
    )
    if small:
        count, label = small[0]
        fix = f"pass --cv {count} or less, " if count >= 2 else ""
        others = f" (and {len(small) - 1} more classes)" if len(small) > 1 else ""
        raise TrainingDataError(
            f"class {label!r} has {count} sample{'s' if count != 1 else ''}"
            f"{others}, fewer than the {cv} cross-validation folds, so stratified "
            f"folds cannot all hold it; {fix}add samples of it, or remove the class"
        )


def skipped_list_path(next_to: str | os.PathLike) -> Path:
    """Where the list of skipped inputs goes: beside the store or MODEL_DIR."""
    next_to = Path(next_to)
    return next_to.with_name(next_to.name + ".skipped.csv")


def write_skipped(failures: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write ``source,reason`` rows of skipped inputs to a CSV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["source", "reason"])
        for failure in failures:
            writer.writerow([failure["source"], failure["reason"]])
    return path


def report_skipped(
    command: str,
    failures: Sequence[dict],
    next_to: str | os.PathLike,
    *,
    allow_skipped: bool = False,
) -> int:
    """List skipped inputs in a CSV and return the command's exit code.

    Parameters
    ----------
    command : str
        The ``bneck`` sub-command, for the message.
    failures : sequence of dict
        ``{"source": ..., "reason": ...}`` for each skipped input.
    next_to : path
        The store file or MODEL_DIR; the list is written beside it as
        ``<name>.skipped.csv``. A list left by an earlier run is removed
        when nothing was skipped.
    allow_skipped : bool, default=False
        Accept skipped inputs: exit 0 and only say where the list is.

    Returns
    -------
    int
        0, or :data:`EXIT_SKIPPED` when inputs were skipped and not allowed.
    """
    path = skipped_list_path(next_to)
    if not failures:
        path.unlink(missing_ok=True)
        return 0
    write_skipped(failures, path)
    noun = "input was" if len(failures) == 1 else "inputs were"
    if allow_skipped:
        print(
            f"bneck {command}: {len(failures)} {noun} skipped; list: {path}",
            file=sys.stderr,
        )
        return 0
    print(
        f"bneck {command}: {len(failures)} {noun} skipped; list: {path} (also "
        "under 'failures' in --json); pass --allow-skipped to accept this",
        file=sys.stderr,
    )
    return EXIT_SKIPPED


@contextmanager
def interrupts_in_finalizers():
    """Turn a Ctrl-C that lands in a finalizer into a clean interruption.

    Python cannot raise an exception out of a garbage-collection callback or
    a ``__del__``: a KeyboardInterrupt that arrives while one runs is printed
    as an "Exception ignored" traceback and the run goes on. Inside this
    block such an interrupt is recorded silently instead, and raised again as
    a KeyboardInterrupt when the block ends, so the command still stops with
    its one-line message.
    """
    caught = []
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            caught.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
    if caught:
        raise KeyboardInterrupt
