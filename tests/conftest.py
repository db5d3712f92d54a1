"""Shared fixtures: the real data sets and a per-session bneck cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ANTS_BEES = DATA / "hymenoptera_data"
CLOTHING = DATA / "clothing_dataset_small"
SMS = DATA / "sms_spam_collection" / "SMSSpamCollection"


@pytest.fixture(scope="session", autouse=True)
def bneck_cache(tmp_path_factory):
    """One export cache for the whole run, so each backbone exports once.

    ``BNECK_TEST_CACHE`` points it at a folder kept between runs.
    """
    root = os.environ.get("BNECK_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    previous = os.environ.get("BNECK_CACHE_DIR")
    os.environ["BNECK_CACHE_DIR"] = root
    yield Path(root)
    if previous is None:
        os.environ.pop("BNECK_CACHE_DIR", None)
    else:
        os.environ["BNECK_CACHE_DIR"] = previous


def require_data(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"the shared data set {path} is missing; see ../shared/data")
    return path


@pytest.fixture(scope="session")
def ants_bees() -> Path:
    return require_data(ANTS_BEES)


@pytest.fixture(scope="session")
def clothing() -> Path:
    return require_data(CLOTHING)


@pytest.fixture(scope="session")
def sms_file() -> Path:
    return require_data(SMS)


@pytest.fixture(scope="session")
def sms_dataset(sms_file):
    """All 5,574 SMS messages, parsed once."""
    from features import load_dataset

    return load_dataset(sms_file, columns=["label", "text"])


@pytest.fixture(scope="session")
def sms_sample(sms_dataset) -> list[str]:
    """600 SMS messages standing for the whole collection.

    The 40 longest messages (for truncation and padding), every copy of the
    15 most repeated ones (for shared rows), and a stratified random rest.
    """
    import numpy as np

    texts = sms_dataset.items
    labels = np.asarray(sms_dataset.labels)
    longest = sorted(range(len(texts)), key=lambda i: len(texts[i]))[-40:]
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    repeated = set(sorted(counts, key=counts.get, reverse=True)[:15])
    chosen = set(longest) | {i for i, text in enumerate(texts) if text in repeated}
    rng = np.random.default_rng(0)
    rest = 600 - len(chosen)
    for label in ("ham", "spam"):
        pool = [i for i in np.flatnonzero(labels == label) if i not in chosen]
        share = round(rest * np.mean(labels == label))
        chosen.update(int(i) for i in rng.choice(pool, share, replace=False))
    return [texts[i] for i in sorted(chosen)][:600]


@pytest.fixture(scope="session")
def sms_sample_extracted(sms_sample, tmp_path_factory):
    """The SMS sample extracted once with ``minilm_l6`` into an HDF5 store."""
    from features import Extractor

    store = tmp_path_factory.mktemp("sms") / "sms.h5"
    extractor = Extractor("minilm_l6", store, progress=False)
    result = extractor.extract(sms_sample)
    return extractor, result


@pytest.fixture(scope="session")
def ants_bees_train(ants_bees):
    """The 245 ants/bees training images as a Dataset."""
    from features import load_dataset

    return load_dataset(ants_bees / "train")


@pytest.fixture(scope="session")
def ants_bees_train_extracted(ants_bees_train, tmp_path_factory):
    """The ants/bees training images extracted once, single-process."""
    from features import Extractor

    store = tmp_path_factory.mktemp("ants_bees") / "train.h5"
    extractor = Extractor("efficientnet_lite0", store, progress=False)
    result = extractor.extract(ants_bees_train.items, ants_bees_train.sources)
    return extractor, result
