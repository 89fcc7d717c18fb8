"""Fashion-MNIST as the default model sees it: 64x64 RGB images in [-1, 1] and template captions.

The images come from the Debian package ``dataset-fashion-mnist``; nothing is downloaded.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Label order of the dataset, in words a caption can use.
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# {a} is the indefinite article of the class name, {c} the name.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {c}",
    "{a} {c}",
    "a picture of {a} {c} on a black background",
    "an image of {a} {c}",
    "a black and white photo of {a} {c}",
    "a grayscale picture of {a} {c}",
    "a product photo of {a} {c}",
    "a small {c}",
)

IMAGE_SIZE = 64  # model resolution
_ITEM_SIZE = 56  # the 28x28 item is upsampled 2x and centred on a black 64x64 canvas

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path, header_ints: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=4 * header_ints)


def load_fashion_mnist(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)`` of ``split`` ("train": 60k, "test": 10k)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root)
    image_file, label_file = (root / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing; install the data with "
                "`apt-get install dataset-fashion-mnist` or pass root= to the folder holding the idx files"
            )
    images = _read_idx(image_file, 4).reshape(-1, 28, 28)
    labels = _read_idx(label_file, 2).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels in {root}")
    return images.copy(), labels


def to_model_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 (N, 28, 28)`` -> ``float32 (N, 3, 64, 64)`` in [-1, 1], the model's image format.

    Bilinear 2x upsampling to 56x56, zero (black) padding to 64x64, gray replicated to RGB.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {x.dtype} {tuple(x.shape)}")
    x = x.float().div_(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(_ITEM_SIZE, _ITEM_SIZE), mode="bilinear", align_corners=False)
    pad = (IMAGE_SIZE - _ITEM_SIZE) // 2
    x = F.pad(x, (pad, pad, pad, pad), value=0.0)
    return x.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).expand(-1, 3, -1, -1).contiguous()


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def all_captions(label: int) -> list[str]:
    """Every template phrasing of class ``label``, in template order."""
    name = CLASS_NAMES[label]
    return [t.format(a=_article(name), c=name) for t in CAPTION_TEMPLATES]


def caption(label: int, rng: np.random.Generator) -> str:
    """A random template phrasing of class ``label`` (0..9)."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in 0..{len(CLASS_NAMES) - 1}, got {label}")
    return all_captions(label)[int(rng.integers(len(CAPTION_TEMPLATES)))]


def eval_prompts() -> list[tuple[str, int]]:
    """Fixed evaluation prompts: two phrasings per class, as ``(prompt, label)``."""
    return [(all_captions(label)[t], label) for t in (0, 2) for label in range(len(CLASS_NAMES))]
