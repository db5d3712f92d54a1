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
