"""Image generation with a diffusers pipeline (the PyTorch backend), seeded per image.

Generation from an export folder (ONNX Runtime or TensorRT) is :mod:`app.generate`: it needs the runtime."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from common.constants import DEFAULT_GUIDANCE
from common.fsutil import atomic_file

log = logging.getLogger(__name__)


def default_size(pipe: DiffusionPipeline) -> int:
    """The pixel size a pipeline was built for: UNet sample size x VAE scale factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    size: int | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair; ``torch.Generator().manual_seed(seed)`` per image, so an
    image does not depend on what else is in the batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (up to 1 turns guidance off), got {guidance}")
    size = default_size(pipe) if size is None else size
    factor = int(pipe.vae_scale_factor)
    if size <= 0 or size % factor:
        raise ValueError(f"image size {size} must be a positive multiple of this model's VAE scale factor {factor}")
    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(int(seed)),
        )
        images.append(out.images[0])
    return images


def save_images(images: Sequence[Image.Image], folder: str | Path, stem: str = "image") -> list[Path]:
    """Write PNGs atomically as ``{stem}_{i:03d}.png``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}_{i:03d}.png"
        with atomic_file(path) as f:
            image.save(f, format="PNG")
        paths.append(path)
    return paths
