"""The judge: a small CNN that names the Fashion-MNIST class a generated image shows.

It scores text-image alignment of the default model (does the image show the prompted class?) and
label flips between a float and a quantized image of the same seed. It is trained on real
Fashion-MNIST in the model's image format (``float (N, 3, 64, 64)`` in [-1, 1]) with augmentations
that mimic what samples look like: grey or uneven backgrounds, other brightness and contrast, small
shifts and scale changes, noise and blur (a pilot's judge trained on clean images scored
recognisable samples at 0.38). Each image is standardized (zero mean, unit variance) before the
network sees it, so any positive affine change of intensities leaves the prediction unchanged.

The shipped weights are ``weights/judge.safetensors`` with their config and test accuracy in
``weights/judge.json``; ``scripts/train_judge.py`` reproduces them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

WEIGHTS_DIR = Path(__file__).with_name("weights")
DEFAULT_WEIGHTS = WEIGHTS_DIR / "judge.safetensors"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class JudgeConfig:
    """Architecture of the judge: conv stages (3x3 conv + BN + ReLU per entry, then 2x2 max-pool)
    on gray images resized (area) to ``work_size``, then a linear layer on the flattened map."""

    stages: tuple[tuple[int, ...], ...] = ((16,), (32, 32), (64, 64))
    work_size: int = 32
    num_classes: int = 10
    class_names: tuple[str, ...] = ()
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ValueError(f"judge config version {self.version} is not supported (this code reads {CONFIG_VERSION})")
        if not self.stages or any(not stage or min(stage) < 1 for stage in self.stages):
            raise ValueError(f"stages must be non-empty tuples of positive channel counts, got {self.stages}")
        if self.work_size % (2 ** len(self.stages)):
            raise ValueError(f"work_size {self.work_size} must be divisible by 2^{len(self.stages)}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")


@dataclass
class JudgeCard:
    """What ships next to the weights: the config and how the weights came about."""

    config: JudgeConfig
    test_accuracy: float | None = None
    train_args: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> JudgeCard:
        raw = json.loads(text)
        cfg = raw["config"]
        stages = tuple(tuple(stage) for stage in cfg["stages"])
        cfg = JudgeConfig(**{**cfg, "stages": stages, "class_names": tuple(cfg["class_names"])})
        return cls(config=cfg, test_accuracy=raw.get("test_accuracy"), train_args=raw.get("train_args", {}))


def to_work_size(images: torch.Tensor, work_size: int) -> torch.Tensor:
    """``float (N, 3 or 1, H, W)`` -> gray ``float32 (N, 1, work_size, work_size)`` (area when shrinking)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images (N, 3 or 1, H, W), got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got {images.dtype}")
    x = images.float().mean(1, keepdim=True)
    if tuple(x.shape[2:]) != (work_size, work_size):
        x = F.interpolate(x, size=(work_size, work_size), mode="area" if x.shape[-1] > work_size else "bilinear")
    return x


def standardize(images: torch.Tensor, work_size: int) -> torch.Tensor:
    """``float (N, 3 or 1, H, W)`` -> gray ``float32 (N, 1, work_size, work_size)``, per-image z-scored."""
    x = to_work_size(images, work_size)
    mean = x.mean((1, 2, 3), keepdim=True)
    std = x.std((1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-3)


class Judge(nn.Module):
    """Input ``float (N, 3 or 1, H, W)`` in [-1, 1] (any H, W); output logits ``(N, num_classes)``."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 1
        for stage in config.stages:
            for c in stage:
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = config.work_size // 2 ** len(config.stages)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in * side * side, config.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(standardize(images, self.config.work_size)))


def save_judge(judge: Judge, card: JudgeCard, weights_path: str | Path) -> None:
    """Write ``weights_path`` (safetensors, float32) and its card next to it (same stem, ``.json``)."""
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in judge.state_dict().items() if v.is_floating_point()}
    save_file(state, str(weights_path), metadata={"format": "dgq-judge", "version": str(CONFIG_VERSION)})
    weights_path.with_suffix(".json").write_text(card.to_json())


def load_judge(weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """Load the judge (the shipped one when ``weights_path`` is None), in eval mode.

    The card (``.json`` next to the weights) gives the architecture; every tensor must match it.
    """
    weights_path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    card_path = weights_path.with_suffix(".json")
    for path in (weights_path, card_path):
        if not path.is_file():
            raise FileNotFoundError(f"judge file {path} is missing; train one with scripts/train_judge.py")
    card = JudgeCard.from_json(card_path.read_text())
    judge = Judge(card.config)
    state = load_file(str(weights_path))
    missing, unexpected = judge.load_state_dict(state, strict=False)
    # BatchNorm's num_batches_tracked counters are not stored (not needed in eval mode).
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its card: missing {missing}, unexpected {unexpected}")
    return judge.to(device).eval()


def load_card(weights_path: str | Path | None = None) -> JudgeCard:
    """The card of the shipped judge (or of ``weights_path``): config, test accuracy, training args."""
    weights_path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    return JudgeCard.from_json(weights_path.with_suffix(".json").read_text())


@torch.inference_mode()
def classify(
    images: torch.Tensor, judge: Judge | None = None, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``int64 (N,)`` and class probabilities ``float32 (N, num_classes)`` of
    ``images`` ``float (N, 3 or 1, H, W)`` in [-1, 1]. Loads the shipped judge when none is given."""
    judge = load_judge() if judge is None else judge
    if judge.training:
        raise ValueError("classify needs a judge in eval mode (call .eval())")
    if len(images) == 0:
        raise ValueError("no images")
    device = next(judge.parameters()).device
    batches = (images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size))
    probs = torch.cat([judge(batch).softmax(-1).float().cpu() for batch in batches])
    return probs.argmax(-1), probs


# ---- training-time augmentation ----------------------------------------------------------------


def classify_uint8(images, judge: Judge | None = None) -> torch.Tensor:
    """Labels ``int64 (N,)`` of uint8 images ``(N, H, W, 3)`` (an array, or a list of ``(H, W, 3)``:
    what a pipeline saves or the runtime returns)."""
    batch = torch.as_tensor(np.stack(list(images)), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0
    return classify(batch, judge)[0]


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of ``(N, 1, H, W)`` with ``sigma (N,)`` in pixels (0 = identity)."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # (N, 2 * radius + 1); sigma -> 0 gives a delta
    n, _, h, w = x.shape
    y = F.pad(x, (radius,) * 4, mode="replicate").reshape(1, n, h + 2 * radius, w + 2 * radius)
    y = F.conv2d(y, k[:, None, None, :], groups=n)
    y = F.conv2d(y, k[:, None, :, None], groups=n)
    return y.reshape(n, 1, h, w)


def augment(images: torch.Tensor, gen: torch.Generator, clean_fraction: float = 0.2) -> torch.Tensor:
    """Randomly degrade ``float (N, 3 or 1, H, W)`` images in [-1, 1] the way samples differ from
    real data; returns gray ``(N, 1, H, W)`` in [-1, 1]. ``clean_fraction`` of them stay unchanged.

    Geometry: shift up to 1/16 of the side, scale 0.88-1.12, rotation +-6 degrees. Intensity: gamma
    0.6-1.6, background lifted to a level in [0, 0.5] and foreground peak in [0.6, 1], at least 0.4
    above it (in [0, 1] units), a smooth illumination field, blur sigma up to 3% of the side (2 px at
    64), Gaussian noise up to 0.06. Works at any size; the trainer runs it at the judge's ``work_size``.
    """
    x = images.float().mean(1, keepdim=True)
    n, _, h, w = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (n,), generator=gen)

    angle = u(-6, 6) * math.pi / 180
    scale = u(0.88, 1.12)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, u(-0.125, 0.125)], 1), torch.stack([sin, cos, u(-0.125, 0.125)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    y = ((x + 1) / 2).clamp(0, 1) ** u(0.6, 1.6)[:, None, None, None]
    lifted = torch.rand(n, generator=gen) < 0.7
    bg = torch.where(lifted, u(0.0, 0.5), torch.zeros(n))
    peak = torch.maximum(u(0.6, 1.0), bg + 0.4).clamp(max=1.0)
    y = bg[:, None, None, None] + (peak - bg)[:, None, None, None] * y
    field = torch.randn(n, 1, 4, 4, generator=gen) * u(0.0, 0.08)[:, None, None, None]
    y = y + F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)
    blurred = torch.rand(n, generator=gen) < 0.4
    y = _blur(y, torch.where(blurred, u(0.005, 0.03) * h, torch.zeros(n)))
    y = y + torch.randn(y.shape, generator=gen) * u(0.0, 0.06)[:, None, None, None]
    out = y.clamp(0, 1) * 2 - 1

    clean = (torch.rand(n, generator=gen) < clean_fraction)[:, None, None, None]
    return torch.where(clean, images.float().mean(1, keepdim=True), out)
