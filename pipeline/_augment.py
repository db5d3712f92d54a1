"""Image augmentation for fine-tuning, on batches of decoded tensors (kornia).

Images are decoded once, a little larger than the network's input, and kept
in memory; each training step then draws new random views of the batch on
the tensors themselves: a random resized crop, a horizontal flip, a small
rotation and a translation.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ImageAugmenter", "import_kornia"]


def import_kornia():
    """Import ``kornia.augmentation``, or say how to install it."""
    try:
        import kornia.augmentation
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "image augmentation for fine-tuning needs kornia; install it with: "
            "pip install 'bneck[finetune]' (or pip install 'kornia>=0.7')"
        ) from exc
    return kornia.augmentation


@dataclass
class ImageAugmenter:
    """Random views of a batch of images, for training.

    Parameters
    ----------
    size : int, default=224
        Side of the square views returned.
    crop_scale : tuple of float, default=(0.6, 1.0)
        Range of the area of the random resized crop, as a fraction of the
        input's.
    degrees : float, default=10.0
        Largest rotation, either way.
    translate : float, default=0.1
        Largest shift, as a fraction of the side.
    flip : bool, default=True
        Flip half the images left to right.

    Notes
    -----
    The batch is expected normalised (``(pixel - mean) / std``): the corners
    a rotation or a shift uncovers are filled with zeros, the mean colour.
    Randomness comes from torch's global generator: seed it with
    ``torch.manual_seed`` to repeat a run.

    Examples
    --------
    >>> import torch
    >>> augment = ImageAugmenter(size=32)
    >>> _ = torch.manual_seed(0)
    >>> augment(torch.zeros(2, 3, 40, 40)).shape
    torch.Size([2, 3, 32, 32])
    """

    size: int = 224
    crop_scale: tuple[float, float] = (0.6, 1.0)
    degrees: float = 10.0
    translate: float = 0.1
    flip: bool = True

    def __post_init__(self):
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(
                f"crop_scale={self.crop_scale!r}; expected 0 < low <= high <= 1"
            )
        self._pipeline = None

    def __call__(self, images):
        """Augment a (batch, channels, height, width) float tensor."""
        if self._pipeline is None:
            self._pipeline = self._build()
        return self._pipeline(images)

    def _build(self):
        import torch

        augmentation = import_kornia()
        steps = [
            augmentation.RandomResizedCrop(
                (self.size, self.size), scale=tuple(self.crop_scale)
            )
        ]
        if self.flip:
            steps.append(augmentation.RandomHorizontalFlip(p=0.5))
        if self.degrees or self.translate:
            steps.append(
                augmentation.RandomAffine(
                    degrees=self.degrees,
                    translate=(self.translate, self.translate),
                    p=0.75,
                )
            )
        return torch.nn.Sequential(*steps)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pipeline"] = None  # rebuilt on first use
        return state
