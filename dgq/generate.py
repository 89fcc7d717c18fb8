"""Image generation, seeded per image: with a diffusers pipeline (the PyTorch backend) or with an export
folder through :mod:`runtime` (ONNX Runtime or TensorRT)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from dgq.fsutil import atomic_file

log = logging.getLogger(__name__)


def default_size(pipe: DiffusionPipeline) -> int:
    """The pixel size a pipeline was built for: UNet sample size x VAE scale factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 7.5,
    size: int | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair; ``torch.Generator().manual_seed(seed)`` per image, so an
    image does not depend on what else is in the batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size = size or default_size(pipe)
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


def generate_from_export(
    folder: str | Path,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 7.5,
    size: int | None = None,
    backend: str = "auto",
) -> tuple[list[Image.Image], dict]:
    """One image per (prompt, seed) pair from an export folder (``runtime.Text2ImagePipeline``), seeded
    as :func:`generate` is, so a float export gives the PyTorch pipeline's images. Returns the images
    and a timings document: the backend that ran and per-call stage timings."""
    from runtime.pipeline import Text2ImagePipeline

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    pipe = Text2ImagePipeline.from_export(folder, backend=backend)
    chunk = pipe.max_images_per_call
    images, calls = [], []
    with pipe:
        for i in range(0, len(prompts), chunk):
            out = pipe(
                list(prompts[i : i + chunk]), seed=list(seeds[i : i + chunk]), steps=steps, guidance=guidance, size=size
            )
            images += out.pil()
            calls.append({"images": len(out.images), **out.timings.to_dict()})
            log.info("%s: %s", pipe.backend, out.timings.summary())
    doc = {
        "backend": pipe.backend,
        "backend_reason": getattr(pipe, "backend_reason", None),
        "export": str(folder),
        "steps": steps,
        "guidance": guidance,
        "calls": calls,
    }
    return images, doc


def save_timings(doc: dict, folder: str | Path, name: str = "timings.json") -> Path:
    """Write the timings document of :func:`generate_from_export` next to the images."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode())
    return path
