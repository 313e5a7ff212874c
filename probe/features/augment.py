"""Augmented views of training images: what a view is, and how one is drawn.

A view is the image after a random rotation, a random resized crop, a random horizontal flip
and a colour jitter, drawn from a generator seeded by (the image's relative path, the view's
index, the seed), so the same view comes out of every run, resumed or repeated, and view v of
K = 4 is view v of K = 16. The policy sets the ranges (`POLICIES`, documented in docs/augmentation.md).
Pillow and NumPy only; the backbone then reads a view like any image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .. import data
from ..errors import ProbeError

MAX_VIEWS = 256  # per image: K views multiply the training images' backbone work by K


@dataclass(frozen=True)
class Policy:
    """The ranges one view is drawn from."""

    scale: tuple[float, float]  # area of the crop, as a fraction of the (rotated) image
    ratio: tuple[float, float]  # aspect ratio (width / height) of the crop
    rotation: float  # degrees, drawn uniformly in [-rotation, rotation]
    flip: float  # probability of a horizontal flip
    brightness: float  # factors drawn uniformly in [1 - x, 1 + x]
    contrast: float
    saturation: float


POLICIES: dict[str, Policy] = {
    "light": Policy((0.80, 1.0), (0.9, 1.0 / 0.9), 5.0, 0.5, 0.1, 0.1, 0.1),
    "default": Policy((0.50, 1.0), (0.75, 1.0 / 0.75), 10.0, 0.5, 0.2, 0.2, 0.2),
    "strong": Policy((0.25, 1.0), (0.75, 1.0 / 0.75), 20.0, 0.5, 0.4, 0.4, 0.4),
}
DEFAULT_POLICY = "default"


@dataclass(frozen=True)
class ViewSettings:
    """How many views of each training image, drawn with which policy and seed. `count` 0:
    no views (a cache without views is written as before)."""

    count: int = 0
    policy: str = DEFAULT_POLICY
    seed: int = 0

    @classmethod
    def create(cls, count: int = 0, policy: str = DEFAULT_POLICY, seed: int = 0) -> "ViewSettings":
        """Validated settings (`--augment`, `--augment-policy`, `--seed`)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_VIEWS:
            raise ProbeError(f"expected augment (views per training image) to be an integer "
                             f"from 0 to {MAX_VIEWS}. Received: augment={count!r}")
        if policy not in POLICIES:
            raise ProbeError(f"expected augment_policy to be one of {', '.join(POLICIES)}. "
                             f"Received: augment_policy={policy!r}")
        if count == 0:  # no views: the policy and seed mean nothing
            return cls()
        return cls(count, policy, seed)

    @property
    def identity(self) -> dict:
        """What makes view v of an image the same view: the policy and the seed (not the
        count: view v is the same whatever the count)."""
        return {"policy": self.policy, "ranges": asdict(POLICIES[self.policy]), "seed": self.seed}

    def to_attrs(self) -> dict:
        """The cache attributes of the views (none without views)."""
        if not self.count:
            return {}
        return {"views": self.count, "views_policy": self.policy, "views_seed": self.seed}

    @classmethod
    def from_attrs(cls, attrs) -> "ViewSettings":
        if not attrs.get("views"):
            return cls()
        return cls(int(attrs["views"]), str(attrs["views_policy"]), int(attrs["views_seed"]))


def view_seed(path: str, view: int, seed: int) -> int:
    """The generator seed of view `view` of the image at relative path `path`."""
    text = json.dumps([os.fsencode(path).hex(), int(view), int(seed)])
    return int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:8], "little")


def load_view(path: str | os.PathLike, relative: str, size: int, view: int,
              settings: ViewSettings) -> np.ndarray:
    """View `view` of the image file `path` as RGB uint8 pixels (size, size, 3).

    Decoded (as for clean features, squashed to a square) at twice the input size so that a
    crop keeps detail, then transformed by `augment`. Raises `data.BadImage` like
    `data.load_image`."""
    pixels = data.load_image(path, 2 * size)
    rng = np.random.default_rng(view_seed(relative, view, settings.seed))
    return augment(pixels, size, POLICIES[settings.policy], rng)


def augment(pixels: np.ndarray, size: int, policy: Policy, rng: np.random.Generator) -> np.ndarray:
    """One random view of square RGB uint8 `pixels`, resized to (size, size, 3).

    Order: rotation (then only the largest square without corners the rotation left empty
    is used, so no fill colour appears), random resized crop inside it, horizontal flip,
    colour jitter (brightness, contrast, saturation, in a random order as torchvision
    does)."""
    from PIL import Image, ImageEnhance

    image = Image.fromarray(pixels)
    angle = float(rng.uniform(-policy.rotation, policy.rotation))
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    inner = _inscribed_side(image.width, angle)
    offset = (image.width - inner) / 2
    box = _crop_box(inner, policy, rng)
    box = (box[0] + offset, box[1] + offset, box[2] + offset, box[3] + offset)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if rng.uniform() < policy.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    enhancers = [(ImageEnhance.Brightness, policy.brightness),
                 (ImageEnhance.Contrast, policy.contrast),
                 (ImageEnhance.Color, policy.saturation)]
    factors = [float(rng.uniform(1 - amount, 1 + amount)) for _, amount in enhancers]
    for index in rng.permutation(len(enhancers)):
        image = enhancers[index][0](image).enhance(factors[index])
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _inscribed_side(side: int, angle: float) -> float:
    """Side of the largest axis-aligned square inside a square of `side` rotated by `angle`."""
    radians = math.radians(abs(angle))
    return side / (math.cos(radians) + math.sin(radians))


def _crop_box(side: float, policy: Policy, rng: np.random.Generator) -> tuple[float, ...]:
    """(left, top, right, bottom) of a crop of the policy's area and aspect ranges inside a
    square of `side` (the ratio is drawn on a log scale, as torchvision does)."""
    area = side * side * float(rng.uniform(*policy.scale))
    ratio = math.exp(float(rng.uniform(math.log(policy.ratio[0]), math.log(policy.ratio[1]))))
    width = min(side, math.sqrt(area * ratio))
    height = min(side, math.sqrt(area / ratio))
    left = float(rng.uniform(0, side - width))
    top = float(rng.uniform(0, side - height))
    return (left, top, left + width, top + height)
