"""Image generation from an export folder through :mod:`runtime` (ONNX Runtime or TensorRT), seeded per
image as :func:`dgq.generate.generate` seeds the PyTorch pipeline."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from common.constants import DEFAULT_GUIDANCE
from common.fsutil import atomic_file
from runtime.pipeline import Text2ImagePipeline

log = logging.getLogger(__name__)


def generate_from_export(
    folder: str | Path,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    size: int | None = None,
    backend: str = "auto",
    scheduler: str | None = None,
) -> tuple[list[Image.Image], dict]:
    """One image per (prompt, seed) pair from an export folder (``runtime.Text2ImagePipeline``), seeded
    as :func:`dgq.generate.generate` is, so a float export gives the PyTorch pipeline's images. Returns the images
    and a timings document: the backend that ran and per-call stage timings. ``scheduler``: a sampler
    name (:mod:`dgq.schedulers`) to use instead of the export's."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    from dgq.schedulers import swap

    sampler = None if scheduler is None else (lambda saved: swap(saved, scheduler))
    pipe = Text2ImagePipeline.from_export(folder, backend=backend, scheduler=sampler)
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
        "scheduler": type(pipe.scheduler).__name__,
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
