"""Preprocessing: turn one raw input into what a backbone's graph takes.

A preprocessor has two steps. ``load`` runs once per item, in a pool of decode
threads (Pillow releases the GIL while it decodes and resizes), and returns
the item's array or its text. ``collate`` runs in the extraction thread and
turns a list of loaded items into the graph's named inputs for one batch.
Preprocessors are plain picklable objects: they travel to joblib and Dask
workers with the backbone.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ImagePreprocessor",
    "InputError",
    "TextPreprocessor",
    "read_input_bytes",
]

_RESAMPLING = {"bicubic": 3, "bilinear": 2, "lanczos": 1, "nearest": 0}


class InputError(ValueError):
    """An input that cannot be read or decoded; the message says why."""


def read_input_bytes(item: str | os.PathLike | bytes) -> bytes:
    """Return the bytes of a file input, with a one-line reason on failure."""
    if isinstance(item, bytes):
        return item
    path = Path(item)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(f"broken symlink: {path}") from None
        raise InputError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"is a directory, not a file: {path}") from None
    except PermissionError:
        raise InputError(f"permission denied: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ImagePreprocessor:
    """Decode an image file and turn it into a normalised CHW float32 array.

    The image is decoded with Pillow, turned upright by its EXIF orientation,
    converted to RGB from any mode, centre-cropped to the fraction
    ``size / (size + crop_padding)`` of its shorter side, resized to
    ``size`` x ``size`` and normalised as ``(pixel - mean) / std`` on the
    0-255 scale.

    Parameters
    ----------
    size : int, default=224
        Side of the square the network takes.
    crop_padding : int, default=32
        Margin of the centre crop; 0 resizes the shorter side without a crop.
    mean, std : tuple of float
        Per-channel normalisation, in RGB order, on the 0-255 scale.
    resample : {"bicubic", "bilinear", "lanczos", "nearest"}, default="bicubic"
        Resampling filter of the resize.
    draft : bool, default=True
        Let the JPEG decoder downscale by a power of two while it decodes,
        never below twice the size the crop needs, before the exact resize.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (300, 200), "red").save(buffer, format="PNG")
    >>> ImagePreprocessor().load(buffer.getvalue()).shape
    (3, 224, 224)
    """

    size: int = 224
    crop_padding: int = 32
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    resample: str = "bicubic"
    draft: bool = True
    input_name: str = "pixels"

    modality = "image"

    def config(self) -> dict[str, Any]:
        """The settings that decide the output, for fingerprints."""
        settings = asdict(self)
        settings.pop("draft")  # decoding speed only, within tolerance
        return {"kind": "image", **settings}

    def sample_inputs(self, batch_size: int = 2, seed: int = 0) -> dict:
        """Random inputs of the graph's shape, for export and verification."""
        rng = np.random.default_rng(seed)
        shape = (batch_size, 3, self.size, self.size)
        return {self.input_name: rng.standard_normal(shape).astype(np.float32)}

    def load(self, item: str | os.PathLike | bytes) -> np.ndarray:
        """Read and decode one image into a (3, size, size) float32 array."""
        data = read_input_bytes(item)
        image = self._decode(data, item)
        return self._to_array(image)

    def collate(self, loaded: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Stack loaded images into the batch the graph takes."""
        return {self.input_name: np.stack(loaded)}

    def _decode(self, data: bytes, item: Any):
        from PIL import Image, ImageOps, UnidentifiedImageError

        if not data:
            raise InputError("empty file (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data))
            if self.draft and image.format == "JPEG":
                side = 2 * self.size
                image.draft("RGB", (side, side))
            image = ImageOps.exif_transpose(image)
            image.load()
        except UnidentifiedImageError:
            raise InputError("not an image Pillow can identify") from None
        except Image.DecompressionBombError as exc:
            raise InputError(f"decompression bomb refused: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"cannot decode image: {exc}") from None
        return _to_rgb(image)

    def _to_array(self, image) -> np.ndarray:
        width, height = image.size
        side = min(width, height) * self.size / (self.size + self.crop_padding)
        left, top = (width - side) / 2, (height - side) / 2
        image = image.resize(
            (self.size, self.size),
            _RESAMPLING[self.resample],
            box=(left, top, left + side, top + side),
        )
        pixels = np.asarray(image, dtype=np.float32)
        pixels = (pixels - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _to_rgb(image):
    """Convert any Pillow mode to RGB, compositing transparency on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels * 255.0 / peak).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class TextPreprocessor:
    """Tokenize texts with a Hugging Face fast tokenizer, padded per batch.

    Parameters
    ----------
    tokenizer_file : str
        Path of a ``tokenizer.json``.
    max_length : int, default=256
        Texts are truncated to this many tokens, special tokens included.
    input_names : tuple of str
        Names of the token ids and attention mask inputs of the graph.

    Examples
    --------
    >>> from features import get_backbone
    >>> tokens = get_backbone("minilm_l6").preprocessor.collate(["a", "a b c"])
    >>> tokens["input_ids"].shape
    (2, 5)
    """

    tokenizer_file: str
    max_length: int = 256
    input_names: tuple[str, str] = ("input_ids", "attention_mask")
    tokenizer_sha256: str = field(default="", compare=False)

    modality = "text"

    def config(self) -> dict[str, Any]:
        """The settings that decide the output, for fingerprints."""
        return {
            "kind": "text",
            "max_length": self.max_length,
            "input_names": list(self.input_names),
            "tokenizer": self.tokenizer_sha256 or _sha256_file(self.tokenizer_file),
        }

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(self.tokenizer_file)
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.no_padding()
        return tokenizer

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("tokenizer", None)  # rebuilt lazily in each process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def sample_inputs(self, batch_size: int = 2, seed: int = 0) -> dict:
        """Token inputs of two different lengths, for export and verification."""
        texts = ["A short one.", "A longer sentence to check padding and masks."]
        return self.collate((texts * batch_size)[:batch_size])

    def load(self, item: str) -> str:
        """Check one text; texts need no decoding.

        An empty or blank text is refused: it would embed to the vector of
        the special tokens alone, the same for every empty input, and a head
        would label it by its class priors only. Tables already treat a blank
        cell as missing; this makes ``.txt`` files and API calls agree.
        """
        if not isinstance(item, str):
            raise InputError(f"expected a text (str), got {type(item).__name__}")
        if not item.strip():
            raise InputError("empty text: nothing to embed")
        return item

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text after truncation, for batching by length."""
        return [len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts)]

    def collate(self, loaded: list[str]) -> dict[str, np.ndarray]:
        """Tokenize a batch and pad it to its longest member."""
        encodings = self.tokenizer.encode_batch(loaded)
        length = max(len(encoding.ids) for encoding in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        ids_name, mask_name = self.input_names
        return {ids_name: ids, mask_name: mask}


def _sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_json(config: dict) -> str:
    """Canonical JSON of a configuration, for hashing."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))
