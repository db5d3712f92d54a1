"""Progress bars for long work: shown on a terminal or when asked, else off."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def progress_bar(total: int, description: str, unit: str, progress: bool | None):
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    show = progress if progress is not None else sys.stderr.isatty()
    # tqdm.auto warns in a notebook without ipywidgets even for a bar that
    # stays hidden: import it only for a bar that shows.
    if show:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, desc=description, unit=unit, disable=not show)
