"""The HDF5 feature store: layout, reading back, compaction and refusals."""

from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np
import pytest

from features import FeatureStore, MemoryStore, StoreError

META = {"backbone": "test", "feature_dim": 5, "dtype": "float32"}


def make_keys(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def make_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 5)).astype(np.float32)


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "features.h5")


def test_store_get_in_any_order_with_repeats(store):
    keys, rows = make_keys(12), make_rows(12)
    store.put("fp", keys[:5], rows[:5], META)
    store.put("fp", keys[5:], rows[5:], META)

    order = [11, 0, 7, 7, 3, 11, 5, 0]
    got = store.get("fp", [keys[i] for i in order])

    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rows[order])
    assert store.get("fp", []).shape == (0, 5)


def test_store_missing_keeps_order_and_drops_repeats(store):
    keys = make_keys(6)
    store.put("fp", keys[:3], make_rows(3), META)

    wanted = [keys[5], keys[1], keys[4], keys[5], keys[3]]
    assert store.missing("fp", wanted) == [keys[5], keys[4], keys[3]]
    assert store.missing("other", keys[:2]) == keys[:2]


def test_store_get_unknown_key_says_to_extract(store):
    keys = make_keys(2)
    store.put("fp", keys[:1], make_rows(1), META)

    with pytest.raises(KeyError, match="1 of 2 keys have no features.*extract them"):
        store.get("fp", keys)


def test_store_files_have_the_documented_layout(store):
    keys, rows = make_keys(3), make_rows(3)
    shard = store.put("fp" * 32, keys, rows, META)

    with h5py.File(shard, "r") as handle:
        assert handle.attrs["bneck_kind"] == "bneck-feature-store"
        assert handle.attrs["bneck_format"] == 1
        group = handle["fp" * 32]
        assert group["keys"].dtype == np.dtype("S64")
        assert [key.decode() for key in group["keys"][()]] == keys
        assert group["features"].dtype == np.float32
        np.testing.assert_array_equal(group["features"][()], rows)
        assert group.attrs["backbone"] == "test"
        assert group.attrs["computed"] == 3


def test_store_leftover_temporary_shard_is_ignored(store):
    keys, rows = make_keys(4), make_rows(4)
    store.put("fp", keys, rows, META)
    # What a writer killed mid-commit leaves: a truncated file under a
    # temporary name. Readers must not even open it.
    real = next(store.shard_dir.glob("*.h5")).read_bytes()
    leftover = store.shard_dir / ".tmp-killed1.h5"
    leftover.write_bytes(real[: len(real) // 3])

    reader = FeatureStore(store.path)
    assert reader.fingerprints() == ["fp"]
    assert reader.info()["shards"] == 1
    assert reader.info()["fp"]["rows"] == 4
    np.testing.assert_array_equal(reader.get("fp", keys[::-1]), rows[::-1])


def test_store_compact_keeps_rows_bit_identical(store):
    keys, rows = make_keys(30), make_rows(30)
    for start in range(0, 30, 10):
        part = slice(start, start + 10)
        store.put("fp", keys[part], rows[part], META)
    store.put("other", make_keys(2, "o"), make_rows(2, 1), {**META, "backbone": "o"})
    before = store.get("fp", keys)
    info_before = store.info()
    assert info_before["shards"] == 4

    store.compact()

    info_after = store.info()
    assert info_after["shards"] == 0
    assert list(store.shard_dir.glob("*.h5")) == []
    assert store.path.is_file()
    after = FeatureStore(store.path).get("fp", keys)
    assert after.tobytes() == before.tobytes() == rows.tobytes()
    for fingerprint in ("fp", "other"):
        for field in ("rows", "computed", "backbone", "feature_dim"):
            assert info_after[fingerprint][field] == info_before[fingerprint][field]
    assert info_after["fp"]["computed"] == 30

    # Rows committed after a compaction add to the count.
    store.put("fp", make_keys(3, "new"), make_rows(3, 2), META)
    store.compact()
    assert store.info()["fp"]["computed"] == 33
    assert store.info()["fp"]["rows"] == 33


def test_store_keeps_namespaces_apart(store):
    keys = make_keys(3)
    store.put("fp-a", keys, make_rows(3, 0), {**META, "backbone": "a"})
    store.put("fp-b", keys, make_rows(3, 1), {**META, "backbone": "b"})

    assert store.fingerprints() == ["fp-a", "fp-b"]
    assert store.metadata("fp-a")["backbone"] == "a"
    assert store.metadata("fp-b")["backbone"] == "b"
    assert not np.array_equal(store.get("fp-a", keys), store.get("fp-b", keys))


def test_store_refuses_rows_of_another_size(store):
    store.put("fp", make_keys(1), make_rows(1), META)

    with pytest.raises(StoreError, match="holds 5-d features, got 7-d"):
        store.put("fp", make_keys(1, "x"), np.zeros((1, 7), np.float32), META)


def test_store_failure_is_forgotten_once_a_row_exists(store):
    keys = make_keys(2)
    failure = {"key": keys[0], "source": "a.jpg", "reason": "cannot decode image"}
    store.put("fp", keys[1:], make_rows(1), META, failures=[failure])
    assert store.failures("fp") == {keys[0]: failure}

    store.put("fp", keys[:1], make_rows(1), META)
    assert store.failures("fp") == {}


def test_store_refuses_a_foreign_hdf5_file(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.arange(4)
    before = path.read_bytes()

    with pytest.raises(StoreError, match="not a bneck feature store"):
        FeatureStore(path)
    assert path.read_bytes() == before


def test_store_refuses_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("just text\n")

    with pytest.raises(StoreError, match="not an HDF5 file bneck can read"):
        FeatureStore(path)
    assert path.read_text() == "just text\n"


def test_store_refuses_a_newer_format(store):
    store.put("fp", make_keys(1), make_rows(1), META)
    store.compact()
    with h5py.File(store.path, "r+") as handle:
        handle.attrs["bneck_format"] = 2

    with pytest.raises(StoreError, match="store format 2, newer than .* reads \\(1\\)"):
        FeatureStore(store.path)


def test_memory_store_has_the_same_interface(store):
    memory = MemoryStore()
    keys, rows = make_keys(4), make_rows(4)
    for target in (memory, store):
        with target.writing():
            target.put("fp", keys, rows, META)
        target.compact()
        assert target.missing("fp", keys[::-1] + make_keys(1, "z")) == make_keys(1, "z")
        np.testing.assert_array_equal(target.get("fp", keys[::-1]), rows[::-1])
        assert target.info()["fp"]["rows"] == 4
        assert target.info()["fp"]["computed"] == 4


def test_reader_indexes_again_after_another_process_compacted(store):
    keys, rows = make_keys(20), make_rows(20)
    store.put("fp", keys[:10], rows[:10], META)
    store.put("fp", keys[10:], rows[10:], META)
    reader = FeatureStore(store.path)
    assert reader.keys("fp") == set(keys)  # indexed: two shards

    store.compact()  # the shards the reader indexed are gone

    assert reader.get("fp", keys).tobytes() == rows.tobytes()


def test_vanished_file_with_hdf5s_generic_error_is_indexed_again(store, monkeypatch):
    # A compaction in another process deletes a shard between the reader's
    # listing and its open, and HDF5 reports it as a plain OSError ("can't
    # retrieve stat info for file"), not FileNotFoundError.
    keys, rows = make_keys(6), make_rows(6)
    store.put("fp", keys[:3], rows[:3], META)
    store.put("fp", keys[3:], rows[3:], META)
    reader = FeatureStore(store.path)
    real_open, raced = h5py.File, []

    def hdf5_open(path, *args, **kwargs):
        if not raced and ".shards" in str(path):
            raced.append(path)
            store.compact()
        if not os.path.exists(path):
            raise OSError(
                "Unable to synchronously open file (can't retrieve stat info for file)"
            )
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", hdf5_open)
    assert reader.get("fp", keys).tobytes() == rows.tobytes()
    assert raced
