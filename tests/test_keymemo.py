"""Remembered content keys: reused while a file is unchanged, never after."""

from __future__ import annotations

import logging
import os

import pytest

import features._keymemo as keymemo
from features import Extractor, FeatureStore, content_key
from features._keymemo import KeyMemo, forget_in_process


class Counting:
    """``content_key`` of images, counting the files it reads."""

    def __init__(self):
        self.calls = 0

    def __call__(self, item):
        self.calls += 1
        return content_key(item, "image")


@pytest.fixture(autouse=True)
def fresh_process_memory():
    forget_in_process()
    yield
    forget_in_process()


@pytest.fixture(scope="module")
def photos(ants_bees):
    return [str(path) for path in sorted((ants_bees / "val" / "ants").glob("*.jpg"))]


def test_unchanged_files_are_not_read_again_in_this_or_another_process(
    photos, tmp_path
):
    first = Counting()
    keys = KeyMemo(tmp_path / "s.h5.keys").keys(photos, first, threads=2)
    assert first.calls == len(photos) == 70
    assert keys == [content_key(path, "image") for path in photos]

    again = Counting()
    assert KeyMemo(tmp_path / "s.h5.keys").keys(photos, again) == keys
    assert again.calls == 0

    forget_in_process()  # as a new process would start
    fresh = Counting()
    assert KeyMemo(tmp_path / "s.h5.keys").keys(photos, fresh) == keys
    assert fresh.calls == 0


def test_a_rewritten_file_is_hashed_again_even_with_its_old_mtime(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(keymemo, "SETTLE_SECONDS", -1.0)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"first content")
    memo = KeyMemo(tmp_path / "s.h5.keys")
    before = memo.keys([str(path)], Counting())
    old = os.stat(path)
    path.write_bytes(b"other content")  # same size
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # mtime put back

    counting = Counting()
    after = memo.keys([str(path)], counting)
    assert counting.calls == 1
    assert after != before and after == [content_key(str(path), "image")]


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path):
    path = tmp_path / "new.jpg"
    path.write_bytes(b"just written")
    memo = KeyMemo(tmp_path / "s.h5.keys")
    memo.keys([str(path)], Counting())
    counting = Counting()
    memo.keys([str(path)], counting)
    assert counting.calls == 1


def test_unreadable_inputs_and_bytes_are_computed_every_time(tmp_path):
    memo = KeyMemo(tmp_path / "s.h5.keys")

    def one(item):
        try:
            return content_key(item, "image")
        except Exception as exc:  # noqa: BLE001 - the error is the result
            return exc

    missing = str(tmp_path / "missing.jpg")
    out = memo.keys([missing, b"raw bytes"], one)
    assert isinstance(out[0], Exception) and "file not found" in str(out[0])
    assert out[1] == content_key(b"raw bytes", "image")


def test_a_damaged_memo_file_only_costs_hashing(photos, tmp_path, caplog):
    damaged = tmp_path / "s.h5.keys"
    damaged.write_bytes(b"this is not an SQLite database" * 10)
    counting = Counting()
    with caplog.at_level(logging.WARNING, logger="features._keymemo"):
        keys = KeyMemo(damaged).keys(photos[:5], counting)
    assert keys == [content_key(path, "image") for path in photos[:5]]
    assert counting.calls == 5
    assert "hashing every file instead" in caplog.text


def test_warm_extraction_of_real_photos_uses_the_memo(photos, tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    cold = Extractor("efficientnet_lite0", store, progress=False).extract(photos)
    assert cold.summary.computed == 70
    assert (tmp_path / "s.h5.keys").is_file()

    forget_in_process()
    reads = []
    original = keymemo.KeyMemo.keys

    def counted(self, items, compute, threads=1):
        def wrapped(item):
            reads.append(item)
            return compute(item)

        return original(self, items, wrapped, threads)

    monkeypatch.setattr(keymemo.KeyMemo, "keys", counted)
    warm = Extractor("efficientnet_lite0", FeatureStore(store), progress=False)
    result = warm.extract(photos)
    assert result.keys == cold.keys
    assert result.summary.computed == 0 and result.summary.cached == 70
    assert reads == []
