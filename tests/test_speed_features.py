"""The speed features change nothing users can see: draft decoding and
length-sorted text batches give the same features as the plain way."""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from features import Extractor, ImagePreprocessor, get_backbone

#: Draft decoding followed by the exact resize stays this close to decoding
#: at full size, in normalised units ((pixel - 127) / 128, so 0.15 is about 19
#: of 255 grey levels, at an edge); measured: max 0.07 on the data below and
#: 0.102 over 40 other photos (benchmarks/README.md), mean at most 0.004.
DRAFT_MAX_ABS = 0.15
DRAFT_MEAN_ABS = 0.01


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def large_photos(ants_bees) -> list[bytes]:
    """Real photos: the two originals over 1,400 px, and 1600x1200 re-encodings."""
    paths = sorted((ants_bees / "train").glob("*/*.jpg"))
    native = [p for p in paths if min(Image.open(p).size) >= 1400]
    assert native, "expected large originals in the ants/bees set"
    upscaled = [
        _jpeg(Image.open(p).convert("RGB").resize((1600, 1200), Image.BICUBIC))
        for p in paths[::60]
    ]
    return [p.read_bytes() for p in native] + upscaled


def test_draft_decoding_matches_full_decoding_within_tolerance(large_photos):
    draft = ImagePreprocessor()
    exact = replace(draft, draft=False)

    for data in large_photos:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (2 * draft.size, 2 * draft.size))
        assert image.size[0] < Image.open(io.BytesIO(data)).size[0]  # it did reduce
        difference = np.abs(draft.load(data) - exact.load(data))
        assert difference.max() <= DRAFT_MAX_ABS
        assert difference.mean() <= DRAFT_MEAN_ABS


def test_draft_decoding_features_match(large_photos):
    backbone = get_backbone("efficientnet_lite0")
    exact = replace(backbone.preprocessor, draft=False)

    fast = backbone.run(
        backbone.preprocessor.collate(
            [backbone.preprocessor.load(d) for d in large_photos[:4]]
        )
    )
    slow = backbone.run(exact.collate([exact.load(d) for d in large_photos[:4]]))

    cosine = (fast * slow).sum(1) / np.linalg.norm(fast, axis=1)
    cosine /= np.linalg.norm(slow, axis=1)
    assert cosine.min() > 0.995


def test_draft_leaves_small_images_untouched(ants_bees):
    draft = ImagePreprocessor()
    exact = replace(draft, draft=False)
    path = next(p for p in sorted((ants_bees / "val").glob("*/*.jpg")))
    assert max(Image.open(path).size) < 4 * draft.size

    np.testing.assert_array_equal(draft.load(path), exact.load(path))


def test_draft_does_not_enter_the_fingerprint():
    assert ImagePreprocessor().config() == ImagePreprocessor(draft=False).config()


@pytest.fixture(scope="module")
def sms_texts(sms_file) -> list[str]:
    lines = sms_file.read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[1] for line in lines if "\t" in line]


def test_length_sorted_batches_come_back_in_input_order(sms_texts):
    backbone = get_backbone("minilm_l6")
    rng = random.Random(0)
    texts = rng.sample(sms_texts, 40)
    texts += [texts[3], texts[0]]  # repeats map to the same rows
    extractor = Extractor(backbone, batch_size=8, progress=False)
    work = [(str(i), text, str(i)) for i, text in enumerate(texts)]
    order = [key for key, _, _ in extractor._ordered(work)]
    assert order != sorted(order, key=int)  # the batches really were reordered

    result = extractor.extract(texts)
    features = extractor.features(result.keys)

    one_by_one = np.concatenate(
        [backbone.run(backbone.preprocessor.collate([text])) for text in texts]
    )
    np.testing.assert_allclose(features, one_by_one, atol=1e-4)
    assert result.keys[-2] == result.keys[3] and result.keys[-1] == result.keys[0]


def test_length_sorted_batches_keep_padding_within_20_percent(sms_texts):
    backbone = get_backbone("minilm_l6")
    texts = list(dict.fromkeys(sms_texts))
    length = dict(zip(texts, backbone.preprocessor.token_counts(texts), strict=True))
    work = [(None, text, None) for text in texts]
    extractor = Extractor(backbone, batch_size=32)
    ordered = [text for _, text, _ in extractor._ordered(work)]

    def padded_over_real(order, batch=32):
        chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
        padded = sum(len(c) * max(length[t] for t in c) for c in chunks)
        return padded / sum(length.values())

    assert sorted(ordered) == sorted(texts)
    assert padded_over_real(ordered) <= 1.2
    assert padded_over_real(texts) > 1.5  # what sorting saves
