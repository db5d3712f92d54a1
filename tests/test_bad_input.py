"""A corpus of bad and unusual inputs, generated here, and what each gets.

Readable images of any mode and format must decode to the same pixels as
their plain RGB original; everything else is skipped with its file and
reason recorded (in the store, the run summary, ``--json`` and a CSV list),
or stops the run with a one-line error under ``--on-error raise``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features import (
    Extractor,
    FeatureStore,
    ImagePreprocessor,
    InputError,
    get_backbone,
    load_dataset,
)
from pipeline._validation import (
    EXIT_SKIPPED,
    TrainingDataError,
    check_training_labels,
)
from pipeline.cli import main

PRE = ImagePreprocessor()

# --------------------------------------------------------------- the corpus


def _pattern(width: int = 64, height: int = 48) -> np.ndarray:
    """An RGB gradient with a bright block, so misplaced pixels show."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1
    ).astype(np.uint8)
    rgb[5:15, 40:55] = (250, 250, 20)
    return rgb


def _four_colours(width: int = 64, height: int = 48) -> np.ndarray:
    """Four flat quadrants: exact in a palette (GIF, palette PNG)."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2, : width // 2] = (200, 30, 30)
    rgb[: height // 2, width // 2 :] = (30, 200, 30)
    rgb[height // 2 :, : width // 2] = (30, 30, 200)
    rgb[height // 2 :, width // 2 :] = (240, 240, 240)
    return rgb


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _expected(rgb: np.ndarray) -> np.ndarray:
    """What a plain RGB image of these pixels preprocesses to."""
    return PRE.load(_encode(Image.fromarray(rgb, "RGB"), "PNG"))


def _bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG header claiming 900 M pixels, over twice Pillow's limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _photo_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    return _encode(Image.fromarray(noise, "RGB"), "JPEG", quality=90)


def _exif_rotated() -> tuple[bytes, np.ndarray]:
    """A 60x40 JPEG stored sideways with EXIF orientation 6, and its pixels."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:] = (20, 40, 220)
    rgb[2:12, 2:12] = (240, 10, 10)  # marks the stored top-left corner
    rgb[14:26, 30:42] = (10, 240, 10)  # off-centre, inside the centre crop
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encode(Image.fromarray(rgb, "RGB"), "JPEG", quality=95, exif=exif)
    return data, rgb


# (file name, bytes) of each image case, and what each must get: "decoded",
# or a fragment of the skip reason.
IMAGE_CASES = {
    "zero_byte.jpg": "empty file (0 bytes)",
    "truncated.jpg": "image file is truncated",
    "text_named.jpg": "not an image Pillow can identify",
    "corrupt_header.png": "not an image Pillow can identify",
    "bomb.png": "decompression bomb refused",
    "format.gif": "decoded",
    "format.png": "decoded",
    "format.webp": "decoded",
    "format.bmp": "decoded",
    "format.tiff": "decoded",
    "cmyk.jpg": "decoded",
    "sixteen_bit.png": "decoded",
    "palette.png": "decoded",
    "grayscale.png": "decoded",
    "rgba_transparent.png": "decoded",
    "exif_rotated.jpg": "decoded",
    "one_pixel.png": "decoded",
    "broken_symlink.jpg": "broken symlink",
}


def _write_images(folder: Path) -> dict[str, np.ndarray | None]:
    """Write the image corpus; return the expected array of each decoded case."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern, quads = _pattern(), _four_colours()
    photo = _photo_jpeg()
    corrupt = bytearray(_encode(Image.fromarray(pattern), "PNG"))
    corrupt[12:20] = b"\xff" * 8  # IHDR chunk name and width destroyed
    gradient16 = (np.arange(48 * 64, dtype=np.uint32) * 21).astype(np.uint16)
    gradient16 = gradient16.reshape(48, 64)
    grey8 = (gradient16.astype(np.float64) * 255 / 65535).round().astype(np.uint8)
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)
    rgba[:, 32:] = (0, 0, 255, 0)
    composited = np.zeros((48, 64, 3), np.uint8)
    composited[:, :32] = (255, 0, 0)
    composited[:, 32:] = (255, 255, 255)
    exif_jpeg, _ = _exif_rotated()

    files = {
        "zero_byte.jpg": b"",
        "truncated.jpg": photo[: len(photo) // 2],
        "text_named.jpg": b"this is a text file, not a JPEG\n",
        "corrupt_header.png": bytes(corrupt),
        "bomb.png": _bomb_png(),
        "format.gif": _encode(Image.fromarray(quads), "GIF"),
        "format.png": _encode(Image.fromarray(pattern), "PNG"),
        "format.webp": _encode(Image.fromarray(pattern), "WEBP", lossless=True),
        "format.bmp": _encode(Image.fromarray(pattern), "BMP"),
        "format.tiff": _encode(Image.fromarray(pattern), "TIFF"),
        "cmyk.jpg": _encode(
            Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95
        ),
        "sixteen_bit.png": _encode(Image.fromarray(gradient16), "PNG"),
        "palette.png": _encode(
            Image.fromarray(quads).convert("P", palette=Image.Palette.ADAPTIVE),
            "PNG",
        ),
        "grayscale.png": _encode(Image.fromarray(grey8, "L"), "PNG"),
        "rgba_transparent.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "exif_rotated.jpg": exif_jpeg,
        "one_pixel.png": _encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "broken_symlink.jpg").symlink_to(folder / "no_such_target.jpg")

    red = np.zeros((48, 64, 3), np.uint8)
    red[:] = (255, 0, 0)
    return {
        "format.gif": _expected(quads),
        "format.png": _expected(pattern),
        "format.webp": _expected(pattern),
        "format.bmp": _expected(pattern),
        "format.tiff": _expected(pattern),
        "cmyk.jpg": _expected(red),
        "sixteen_bit.png": _expected(np.repeat(grey8[..., None], 3, axis=-1)),
        "palette.png": _expected(quads),
        "grayscale.png": _expected(np.repeat(grey8[..., None], 3, axis=-1)),
        "rgba_transparent.png": _expected(composited),
        "one_pixel.png": np.broadcast_to(
            ((np.float32([200, 100, 50]) - 127) / 128)[:, None, None], (3, 224, 224)
        ),
    }


@pytest.fixture(scope="module")
def image_corpus(tmp_path_factory):
    """Two class folders holding the image cases, and expected arrays."""
    root = tmp_path_factory.mktemp("bad_images")
    expected = _write_images(root / "odd")
    # A second class of plain images, so the folder is a usable data set.
    plain = root / "plain"
    plain.mkdir()
    for shade in range(3):
        colour = (60 * shade, 90, 200 - 50 * shade)
        Image.new("RGB", (40, 30), colour).save(plain / f"plain{shade}.png")
    return root, expected


# ----------------------------------------------------- decoding, one by one

# Lossless formats must give the very same array; lossy JPEG within a few
# grey levels (the threshold is in normalised units, 1/128 per level).
LOSSY_TOLERANCE = {"cmyk.jpg": 6 / 128}


@pytest.mark.parametrize(
    "name", [name for name, what in IMAGE_CASES.items() if what == "decoded"]
)
def test_readable_image_decodes_to_its_rgb_pixels(image_corpus, name):
    root, expected = image_corpus
    array = PRE.load(root / "odd" / name)
    assert array.shape == (3, 224, 224)
    assert array.dtype == np.float32
    if name == "exif_rotated.jpg":
        return  # checked on its own below
    tolerance = LOSSY_TOLERANCE.get(name, 1e-6)
    np.testing.assert_allclose(array, expected[name], rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "name", [name for name, what in IMAGE_CASES.items() if what != "decoded"]
)
def test_unusable_image_raises_input_error_with_reason(image_corpus, name):
    root, _ = image_corpus
    with pytest.raises(InputError, match=re.escape(IMAGE_CASES[name])):
        PRE.load(root / "odd" / name).shape  # noqa: B018


def test_exif_orientation_is_applied(image_corpus):
    root, _ = image_corpus
    data, stored = _exif_rotated()
    upright = PRE._decode(data, "exif_rotated.jpg")

    # Stored 60 wide x 40 high; orientation 6 displays it 40 wide x 60 high,
    # with the stored top-left corner at the top right.
    assert upright.size == (40, 60)
    pixels = np.asarray(upright).astype(int)
    assert tuple(pixels[6, 40 - 7]) == pytest.approx((240, 10, 10), abs=40)
    assert tuple(pixels[6, 6]) == pytest.approx((20, 40, 220), abs=40)

    # The whole preprocessed array equals that of the same pixels turned by
    # hand, and differs from the unturned one.
    plain = Image.open(io.BytesIO(data)).convert("RGB")  # EXIF not applied
    turned = plain.transpose(Image.Transpose.ROTATE_270)
    by_hand = PRE.load(_encode(turned, "PNG"))
    unturned = PRE.load(_encode(plain, "PNG"))
    array = PRE.load(root / "odd" / "exif_rotated.jpg")
    np.testing.assert_array_equal(array, by_hand)
    assert np.abs(array - unturned).max() > 0.5


def test_decompression_bomb_limit_is_pillows(tmp_path, monkeypatch):
    """An ordinary image over a lowered limit is refused, not decoded."""
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300), "white").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 2x = 20,000 < 90,000
    with pytest.raises(InputError, match="decompression bomb refused"):
        PRE.load(path)


def test_shipped_placeholder_gif_is_handled(ants_bees):
    """``imageNotFound.gif`` of the ants/bees archive decodes like any GIF."""
    array = PRE.load(ants_bees / "train" / "ants" / "imageNotFound.gif")
    assert array.shape == (3, 224, 224)
    assert np.isfinite(array).all()


NOBODY = 65534


def test_unreadable_file_is_skipped_with_permission_reason(request):
    folder = Path(tempfile.mkdtemp(prefix="bneck-locked-"))  # in /tmp, 0o700
    folder.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    path = folder / "secret.png"
    Image.new("RGB", (8, 8), "red").save(path)
    path.chmod(0o000)
    if os.geteuid() != 0:
        with pytest.raises(InputError, match="permission denied"):
            PRE.load(path)
        return
    # As root, permissions do not apply: read it from a forked child that
    # has dropped to an unprivileged user (no exec: the interpreter may sit
    # where that user cannot reach).
    assert _load_as(NOBODY, path) == f"permission denied: {path}"
    path.chmod(0o644)  # the control: readable, the same user decodes it
    assert _load_as(NOBODY, path) == "loaded without error"


def _load_as(uid: int, path: Path) -> str:
    """The InputError message of loading ``path`` as user ``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        message = "loaded without error"
        try:
            os.setgid(uid)
            os.setuid(uid)
            PRE.load(path)
        except InputError as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        message = stream.read().decode()
    os.waitpid(pid, 0)
    return message


# ------------------------------------------------------ the CLI on a corpus


def _extract(args, capsys) -> tuple[int, dict | None, str]:
    code = main(["extract", *args, "--no-progress", "--threads", "1"])
    captured = capsys.readouterr()
    out = json.loads(captured.out) if "--json" in args and captured.out else None
    return code, out, captured.err


def test_cli_skips_and_lists_bad_images(image_corpus, tmp_path, capsys):
    root, _ = image_corpus
    store = tmp_path / "f.h5"
    code, out, err = _extract([str(root), "--store", str(store), "--json"], capsys)

    skipped = {
        name: reason for name, reason in IMAGE_CASES.items() if reason != "decoded"
    }
    assert code == EXIT_SKIPPED
    failures = {Path(f["source"]).name: f["reason"] for f in out["failures"]}
    assert set(failures) == set(skipped)
    for name, fragment in skipped.items():
        assert fragment in failures[name], (name, failures[name])
    assert out["failed"] == len(skipped)
    assert out["computed"] == len(IMAGE_CASES) - len(skipped) + 3
    assert "Traceback" not in err
    assert f"{len(skipped)} inputs were skipped" in err
    assert "--allow-skipped" in err

    # The CSV list beside the store holds the same failures.
    listed = Path(out["skipped_list"])
    assert listed == store.with_name("f.h5.skipped.csv")
    with open(listed, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert {Path(row["source"]).name: row["reason"] for row in rows} == failures

    # The store's failure table keeps those that had content to key on
    # (a broken symlink has none).
    fingerprint = out["fingerprint"]
    recorded = FeatureStore(store).failures(fingerprint)
    assert {Path(r["source"]).name for r in recorded.values()} == set(skipped) - {
        "broken_symlink.jpg"
    }
    assert FeatureStore(store).info()[fingerprint]["failures"] == len(recorded)

    # A second run reuses every row and still reports every skip.
    code, again, err = _extract(
        [str(root), "--store", str(store), "--json", "--allow-skipped"], capsys
    )
    assert code == 0
    assert again["computed"] == 0
    assert {Path(f["source"]).name for f in again["failures"]} == set(skipped)
    assert "skipped; list:" in err


def test_cli_on_error_raise_stops_with_one_line(image_corpus, tmp_path, capsys):
    root, _ = image_corpus
    for store in (tmp_path / "fresh.h5", tmp_path / "fresh.h5"):  # new, then known
        code, _, err = _extract(
            [str(root), "--store", str(store), "--on-error", "raise"], capsys
        )
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("bneck extract: error: ")
        assert any(name in lines[0] for name in IMAGE_CASES), lines[0]
        # Let the second pass meet failures recorded by a skipping run.
        _extract([str(root), "--store", str(store), "--allow-skipped"], capsys)


def test_cli_clean_data_exits_zero_and_removes_old_list(image_corpus, tmp_path, capsys):
    root, _ = image_corpus
    store = tmp_path / "f.h5"
    listed = store.with_name("f.h5.skipped.csv")
    listed.write_text("source,reason\nold,old\n")
    code, out, err = _extract([str(root / "plain"), "--store", str(store)], capsys)
    assert code == 0
    assert not listed.exists()
    assert "skipped" not in err


# ------------------------------------------------------------------ texts

LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 2_000


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_texts")
    for label, texts in {
        "ham": ["see you at six", "thanks for the lift"],
        "spam": ["win a free prize now", "claim your reward today"],
    }.items():
        (root / label).mkdir()
        for number, text in enumerate(texts):
            (root / label / f"{number}.txt").write_text(text, encoding="utf-8")
    (root / "ham" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "ham" / "empty.txt").write_text("", encoding="utf-8")
    (root / "ham" / "blank.txt").write_text("  \n\t", encoding="utf-8")
    (root / "spam" / "long.txt").write_text(LONG_TEXT, encoding="utf-8")
    return root


TEXT_CASES = {
    "latin1.txt": "not UTF-8 text",
    "empty.txt": "empty text: nothing to embed",
    "blank.txt": "empty text: nothing to embed",
    "long.txt": "decoded",
}


def test_cli_text_corpus(text_corpus, tmp_path, capsys):
    store = tmp_path / "t.h5"
    code, out, err = _extract(
        [str(text_corpus), "--store", str(store), "--json"], capsys
    )
    assert code == EXIT_SKIPPED
    failures = {Path(f["source"]).name: f["reason"] for f in out["failures"]}
    expected = {n: r for n, r in TEXT_CASES.items() if r != "decoded"}
    assert set(failures) == set(expected)
    for name, fragment in expected.items():
        assert fragment in failures[name]
    assert out["computed"] == 5  # four short texts and the long one
    assert "Traceback" not in err


def test_long_text_is_truncated_to_max_length():
    backbone = get_backbone("minilm_l6")
    tokens = backbone.preprocessor.collate([LONG_TEXT])
    assert tokens["input_ids"].shape == (1, backbone.preprocessor.max_length)
    extractor = Extractor(backbone, num_threads=1)
    rows = extractor.extract_features(
        [LONG_TEXT, LONG_TEXT + " but a different ending", "a short text"]
    )
    # Only the first max_length tokens count: the endings are cut off.
    np.testing.assert_allclose(rows[0], rows[1], rtol=0, atol=1e-6)
    assert np.abs(rows[0] - rows[2]).max() > 0.01


def test_empty_text_is_a_recorded_skip_in_the_api():
    extractor = Extractor("minilm_l6", num_threads=1)
    result = extractor.extract(["", "a real text", "   "], ["e1", "ok", "e2"])
    assert result.keys[1] is not None and result.keys[0] is None
    assert [f["source"] for f in result.summary.failures] == ["e1", "e2"]
    assert {f["reason"] for f in result.summary.failures} == {
        "empty text: nothing to embed"
    }
    with pytest.raises(InputError, match="empty text"):
        Extractor("minilm_l6", on_error="raise").extract([""])


# ------------------------------------------------------------------ tables


def test_table_with_missing_labels_and_paths(image_corpus, tmp_path, capsys):
    root, _ = image_corpus
    plain = sorted((root / "plain").iterdir())
    table = tmp_path / "table.csv"
    table.write_text(
        "path,label\n"
        f"{plain[0]},a\n"
        f"{plain[1]},\n"  # missing label
        ",b\n"  # missing path
        f"{tmp_path / 'gone.png'},b\n"  # path to nothing
        f"{plain[2]},b\n"
    )
    dataset = load_dataset(table)
    assert [s["reason"] for s in dataset.skipped] == ["missing label", "missing path"]
    assert [s["source"] for s in dataset.skipped] == ["table.csv:3", "table.csv:4"]

    store = tmp_path / "f.h5"
    code, out, err = _extract([str(table), "--store", str(store), "--json"], capsys)
    assert code == EXIT_SKIPPED
    reasons = [f["reason"] for f in out["failures"]]
    assert reasons[:2] == ["missing label", "missing path"]
    assert reasons[2].startswith("file not found: ")
    assert out["items"] == 5 and out["computed"] == 2

    code, _, err = _extract(
        [str(table), "--store", str(store), "--on-error", "raise"], capsys
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "bneck extract: error: table.csv:3: missing label (2 entries unusable; "
        "--on-error skip lists them and goes on)"
    ]


# -------------------------------------------------------- training refusals


@pytest.mark.parametrize(
    "labels, cv, message",
    [
        (["ant"] * 12, 5, r"a single class \('ant', 12 samples\).*another class"),
        (["ant", "bee", "ant"], 5, r"3 training samples are fewer than the 5 .*--cv 3"),
        (
            ["ant"] * 10 + ["bee"],
            5,
            r"class 'bee' has 1 sample, fewer than the 5 .*add samples of it",
        ),
        (
            ["ant"] * 10 + ["bee"] * 3,
            5,
            r"class 'bee' has 3 samples, .*pass --cv 3 or less",
        ),
        (["ant", None, "bee"], 2, r"1 of 3 training samples have no label"),
        ([], 5, r"no usable samples"),
    ],
)
def test_training_refuses_what_cannot_work(labels, cv, message):
    with pytest.raises(TrainingDataError, match=message):
        check_training_labels(labels, cv=cv)


def test_training_accepts_small_but_workable_sets():
    check_training_labels(["ant", "bee"] * 5, cv=5)
    check_training_labels(["ant", "bee", "bee"], cv=None)  # no cross-validation


@pytest.mark.parametrize(
    "classes, message",
    [
        ({"ham": 6}, "a single class ('ham', 6 samples)"),
        ({"ham": 6, "spam": 1}, "class 'spam' has 1 sample, fewer than the 5"),
    ],
)
def test_cli_train_refuses_with_one_line(tmp_path, capsys, classes, message):
    for label, count in classes.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for number in range(count):
            path = tmp_path / "data" / label / f"{number}.txt"
            path.write_text(f"{label} message number {number}", encoding="utf-8")
    code = main(
        ["train", str(tmp_path / "data"), "--out", str(tmp_path / "model")]
        + ["--store", str(tmp_path / "f.h5"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("bneck train: error: "), err
    assert message in err[0]
    assert not (tmp_path / "model").exists()
