"""The README's main job, end to end on the built-in default model.

Steps that exist so far: build the pipeline, save it as a diffusers folder, reload it through the
ordinary ``from_pretrained`` path, and generate an image on CPU. Later stages (calibrate, export,
engine build) are added here as they land.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.constants import DEFAULT_GUIDANCE
from common.fsutil import atomic_dir, atomic_file
from dgq import zoo
from dgq.generate import generate, save_images

log = logging.getLogger(__name__)


def run_quickstart(
    out: str | Path, model: str | None = None, prompt: str = "a photo of a dress", steps: int = 25, seed: int = 0
) -> dict[str, str]:
    """Run the main job into ``out`` (replaced if an earlier quickstart wrote it; any other existing path
    is refused). Returns ``{what: path}``."""
    out = Path(out)
    name = model or zoo.DEFAULT_MODEL
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=True, owned=is_quickstart_output, what="quickstart folder") as tmp:
        log.info("building %s", name)
        pipe = zoo.load_pipeline(name)
        log.info("saving the pipeline with save_pretrained")
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        log.info("reloading it with from_pretrained")
        pipe = zoo.load_pipeline(str(tmp / "model"))
        pipe.set_progress_bar_config(disable=True)
        log.info("generating %r, %d steps, seed %d", prompt, steps, seed)
        images = generate(pipe, [prompt], [seed], steps=steps, guidance=DEFAULT_GUIDANCE)
        save_images(images, tmp / "images", stem="float")
        summary = {"model": name, "prompt": prompt, "steps": steps, "seed": seed, "seconds": time.perf_counter() - t0}
        with atomic_file(tmp / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    return {
        "pipeline folder": str(out / "model"),
        "image": str(out / "images" / "float_000.png"),
        "summary": str(out / "summary.json"),
    }


QUICKSTART_ENTRIES = {"model", "images", "summary.json"}


def is_quickstart_output(path: str | Path) -> bool:
    """True for a folder :func:`run_quickstart` wrote: its summary, and nothing but its three entries."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or {p.name for p in path.iterdir()} - QUICKSTART_ENTRIES:
        return False
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"model", "prompt", "steps", "seed"} <= set(summary)
