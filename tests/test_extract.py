"""Extraction through the store: cache hits, content keys, namespaces, failures."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import shutil

import h5py
import numpy as np
import pytest

from features import (
    Extractor,
    FeatureStore,
    ImagePreprocessor,
    InputError,
    content_key,
    get_backbone,
)


@pytest.fixture(scope="module")
def val_photos(ants_bees) -> list[str]:
    ants = sorted((ants_bees / "val" / "ants").iterdir())[:4]
    bees = sorted((ants_bees / "val" / "bees").iterdir())[:4]
    return [str(path) for path in ants + bees]


@pytest.fixture(scope="module")
def photo_store(val_photos, tmp_path_factory):
    """Eight validation photos extracted once with efficientnet_lite0."""
    store = tmp_path_factory.mktemp("photos") / "photos.h5"
    extractor = Extractor("efficientnet_lite0", store, progress=False)
    result = extractor.extract(val_photos)
    return extractor, result


def test_image_keys_are_sha256_of_the_file_bytes(photo_store, val_photos):
    _, result = photo_store

    for path, key in zip(val_photos, result.keys, strict=True):
        with open(path, "rb") as stream:
            assert key == hashlib.sha256(stream.read()).hexdigest()
    assert result.summary.computed == 8


def test_copied_and_renamed_files_are_cache_hits(photo_store, val_photos, tmp_path):
    extractor, first = photo_store
    moved = [tmp_path / "renamed-0.jpeg", tmp_path / "sub" / "copy.jpg"]
    moved[1].parent.mkdir()
    shutil.copy(val_photos[0], moved[0])
    shutil.copy(val_photos[5], moved[1])
    same_file = val_photos[0].replace("/ants/", "/ants/../ants/")

    again = Extractor("efficientnet_lite0", extractor.store.path, progress=False)
    result = again.extract([str(moved[0]), str(moved[1]), same_file])

    assert result.summary.computed == 0
    assert result.summary.cached == 3
    assert result.keys == [first.keys[0], first.keys[5], first.keys[0]]
    stored = again.features(result.keys)
    np.testing.assert_array_equal(stored, extractor.features(result.keys))


def test_second_extraction_computes_nothing_in_any_order(photo_store, val_photos):
    extractor, first = photo_store
    shuffled = list(val_photos)
    random.Random(0).shuffle(shuffled)

    result = Extractor("efficientnet_lite0", extractor.store.path).extract(shuffled)

    assert result.summary.computed == 0
    assert result.summary.cached == 8
    assert result.summary.failed == 0
    position = {path: i for i, path in enumerate(val_photos)}
    assert result.keys == [first.keys[position[path]] for path in shuffled]


def test_rows_read_back_in_any_order_with_repeats(photo_store):
    extractor, result = photo_store
    rows = extractor.features(result.keys)
    order = [7, 0, 3, 3, 7, 1]

    picked = extractor.features([result.keys[i] for i in order])

    assert rows.shape == (8, 1280) and rows.dtype == np.float32
    np.testing.assert_array_equal(picked, rows[order])


def test_batching_and_commits_do_not_change_rows(photo_store, val_photos, tmp_path):
    extractor, result = photo_store
    small = Extractor(
        "efficientnet_lite0",
        tmp_path / "small.h5",
        batch_size=3,
        commit_every=4,
        decode_threads=1,
        progress=False,
    )

    again = small.extract(val_photos)

    assert again.keys == result.keys
    assert len(list(small.store.shard_dir.glob("*.h5"))) == 2
    np.testing.assert_allclose(
        small.features(again.keys), extractor.features(result.keys), atol=1e-5
    )


def test_changed_preprocessing_gets_its_own_namespace(photo_store, val_photos):
    extractor, result = photo_store
    backbone = get_backbone("efficientnet_lite0")
    # The same graph (no second export) fed differently resized images.
    bilinear = dataclasses.replace(
        backbone,
        preprocessor=ImagePreprocessor(resample="bilinear"),
        onnx_file=str(backbone.onnx_path()),
        _fingerprint=None,
    )
    store = extractor.store.path

    changed = Extractor(bilinear, store, progress=False).extract(val_photos[:3])

    assert bilinear.fingerprint() != backbone.fingerprint()
    assert changed.summary.computed == 3  # nothing reused across namespaces
    assert changed.keys == result.keys[:3]  # the content keys are the same
    reader = FeatureStore(store)
    assert set(reader.fingerprints()) == {
        backbone.fingerprint(),
        bilinear.fingerprint(),
    }
    assert reader.info()[bilinear.fingerprint()]["rows"] == 3
    assert reader.info()[backbone.fingerprint()]["rows"] == 8
    assert reader.metadata(bilinear.fingerprint())["backbone"] == "efficientnet_lite0"
    ours = reader.get(bilinear.fingerprint(), changed.keys)
    theirs = reader.get(backbone.fingerprint(), changed.keys)
    assert not np.array_equal(ours, theirs)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1)
    assert (cosine / np.linalg.norm(theirs, axis=1) > 0.9).all()  # same network


def test_sms_duplicates_share_one_row(sms_sample, sms_sample_extracted):
    extractor, result = sms_sample_extracted
    distinct = len(set(sms_sample))
    assert distinct < len(sms_sample) - 50  # the sample has many repeats

    assert result.summary.items == 600
    assert result.summary.computed == distinct
    assert result.summary.cached == 600 - distinct
    assert len(set(result.keys)) == distinct
    key_of = dict(zip(sms_sample, result.keys, strict=True))
    assert [key_of[text] for text in sms_sample] == result.keys
    stored = []
    for path in extractor.store.shard_dir.glob("*.h5"):
        with h5py.File(path, "r") as handle:
            group = handle[extractor.fingerprint]
            assert group["features"].shape[1:] == (384,)
            stored.extend(key.decode() for key in group["keys"][()])
    assert sorted(stored) == sorted(set(result.keys))


def test_text_rows_belong_to_their_texts(sms_sample, sms_sample_extracted):
    # Texts are sorted by length and batched before inference: each row must
    # still come back under its own text's key.
    extractor, result = sms_sample_extracted
    backbone = extractor.backbone
    picks = [0, 17, 250, 420, 599, 598]

    rows = extractor.features([result.keys[i] for i in picks])

    for row, i in zip(rows, picks, strict=True):
        alone = backbone.run(backbone.preprocessor.collate([sms_sample[i]]))[0]
        assert np.abs(row - alone).max() < 1e-5


def test_text_keys_hash_the_text(sms_sample):
    text = sms_sample[3]
    expected = hashlib.sha256(b"text\0" + text.encode()).hexdigest()

    assert content_key(text, "text") == expected
    assert content_key(text + " ", "text") != expected


def test_unreadable_inputs_are_recorded_and_not_retried(val_photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"these bytes are no JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    items = [val_photos[0], str(broken), str(tmp_path / "gone.jpg"), str(empty)]
    store = tmp_path / "f.h5"

    first = Extractor("efficientnet_lite0", store, progress=False).extract(items)
    second = Extractor("efficientnet_lite0", store, progress=False).extract(items)

    for result in (first, second):
        assert result.keys[0] is not None
        assert result.keys[1:] == [None, None, None]
        reasons = {f["source"]: f["reason"] for f in result.summary.failures}
        assert reasons == {
            str(broken): "not an image Pillow can identify",
            str(tmp_path / "gone.jpg"): f"file not found: {tmp_path / 'gone.jpg'}",
            str(empty): "empty file (0 bytes)",
        }
        assert result.summary.failed == 3
    assert first.summary.computed == 1
    assert second.summary.computed == 0
    assert second.summary.cached == 1
    fingerprint = get_backbone("efficientnet_lite0").fingerprint()
    recorded = FeatureStore(store).failures(fingerprint)
    assert {record["source"] for record in recorded.values()} == {
        str(broken),
        str(empty),
    }


def test_on_error_raise_stops_at_the_first_unreadable_input(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"these bytes are no JPEG")
    extractor = Extractor("efficientnet_lite0", on_error="raise", progress=False)

    with pytest.raises(InputError, match="broken.jpg: not an image Pillow can"):
        extractor.extract([str(broken)])


def test_image_modes_and_the_gif_placeholder_decode(ants_bees, tmp_path):
    from PIL import Image

    preprocessor = ImagePreprocessor()
    photo = Image.open(sorted((ants_bees / "val" / "bees").iterdir())[0])
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        photo.convert(mode if mode != "I;16" else "I").save(tmp_path / f"{mode}.tif")
    gif = ants_bees / "train" / "ants" / "imageNotFound.gif"

    for path in [gif, *tmp_path.glob("*.tif")]:
        pixels = preprocessor.load(path)
        assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
        assert np.isfinite(pixels).all()
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
