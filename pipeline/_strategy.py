"""Which training strategy suits a data set: rules on size and evidence.

Three ways to train a classifier on a small labelled set:

``bottleneck``
    Frozen pretrained features and a linear head. Cheap, hard to overfit,
    the right default when labelled samples are few.
``finetune``
    Retrain the upper layers of the pretrained network with a new head and
    augmented inputs. Worth its cost once there are enough samples.
``scratch``
    The same architecture from random weights, all layers free: for a domain
    so far from the pretraining data that pretrained features do not help.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_THRESHOLD",
    "RECOMMENDATIONS",
    "STRATEGIES",
    "choose_strategy",
    "recommend",
]

#: Labelled samples from which ``auto`` fine-tunes instead of training a head.
DEFAULT_THRESHOLD = 1000

#: What ``bneck train --strategy`` accepts.
STRATEGIES = ("auto", "bottleneck", "finetune", "scratch")

#: What ``bneck advise`` may recommend.
RECOMMENDATIONS = ("bottleneck", "finetune", "from_scratch")


def choose_strategy(
    n_samples: int, threshold: int = DEFAULT_THRESHOLD, strategy: str = "auto"
) -> str:
    """The strategy to train with: ``strategy`` itself, or by size for ``auto``.

    Parameters
    ----------
    n_samples : int
        Number of labelled training samples.
    threshold : int, default=1000
        ``auto`` fine-tunes from this many samples on, and trains a head on
        frozen bottleneck features below it.
    strategy : {"auto", "bottleneck", "finetune", "scratch"}, default="auto"

    Returns
    -------
    str
        One of ``"bottleneck"``, ``"finetune"`` or ``"scratch"``.

    Examples
    --------
    >>> choose_strategy(244)
    'bottleneck'
    >>> choose_strategy(1000)
    'finetune'
    >>> choose_strategy(5000, strategy="scratch")
    'scratch'
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy={strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    _check_counts(n_samples, threshold)
    if strategy != "auto":
        return strategy
    return "finetune" if n_samples >= threshold else "bottleneck"


def recommend(
    n_samples: int,
    bottleneck_accuracy: float | None,
    baseline_accuracy: float | None,
    threshold: int = DEFAULT_THRESHOLD,
    margin: float = 0.0,
) -> str:
    """Recommend a strategy from the size and the cross-validated evidence.

    Pretrained features that do no better than a linear model on the raw
    inputs (downsampled pixels, TF-IDF) suggest a domain far from the
    pretraining data: then ``from_scratch``. Otherwise the size decides, as
    in :func:`choose_strategy`.

    Parameters
    ----------
    n_samples : int
    bottleneck_accuracy, baseline_accuracy : float or None
        Cross-validated accuracies of a linear head on bottleneck features
        and of a linear model on raw inputs; None when not measured, which
        leaves the size alone to decide.
    threshold : int, default=1000
    margin : float, default=0.0
        How much better than the baseline the bottleneck features must be
        to count as helping.

    Returns
    -------
    str
        ``"bottleneck"``, ``"finetune"`` or ``"from_scratch"``.

    Examples
    --------
    >>> recommend(244, 0.94, 0.63)
    'bottleneck'
    >>> recommend(1797, 0.90, 0.96)
    'from_scratch'
    """
    _check_counts(n_samples, threshold)
    if bottleneck_accuracy is not None and baseline_accuracy is not None:
        if bottleneck_accuracy <= baseline_accuracy + margin:
            return "from_scratch"
    return choose_strategy(n_samples, threshold)


def _check_counts(n_samples: int, threshold: int) -> None:
    if n_samples < 0:
        raise ValueError(f"n_samples={n_samples!r}; expected a count >= 0")
    if threshold < 1:
        raise ValueError(f"threshold={threshold!r}; expected a positive integer")
