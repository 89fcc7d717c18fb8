"""Name -> pipeline resolution: zoo names, local diffusers folders, and hub ids."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from diffusers import DiffusionPipeline
from safetensors import SafetensorError

from common.errors import DGQError
from common.fsutil import atomic_dir
from dgq.zoo import builders
from dgq.zoo.default_model import build_fashion
from dgq.zoo.outliers import build_fashion_outliers

log = logging.getLogger(__name__)


class ModelLoadError(DGQError, RuntimeError):
    """A model spec that names no zoo entry, no existing folder, and no reachable hub id, or a model
    folder that cannot be loaded (damaged weights, an invalid ``model_index.json``)."""


# The file ``dgq zoo save`` adds to the diffusers folder it writes: what was saved and every file of it,
# so ``--overwrite`` recognises a folder it wrote (and nothing the user added to it). diffusers ignores it.
SAVED_MARKER = "dgq-zoo.json"
SAVED_FORMAT = "dgq-zoo-model"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[..., DiffusionPipeline]  # build(seed=..., components=...) -> pipeline
    trained: bool = False  # True when the entry ships weights (seed is ignored)


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> None:
    if entry.name in ZOO:
        raise ValueError(f"zoo entry {entry.name!r} is already registered")
    ZOO[entry.name] = entry


register(ZooEntry("tiny", "SD v1-shaped pipeline, random weights, 1.5M-param UNet; for tests", builders.build_tiny))
register(
    ZooEntry(
        "tiny-xl",
        "SDXL-shaped pipeline (two text towers, text_time embedding, depth-2 transformer), random weights; for tests",
        builders.build_tiny_xl,
    )
)
register(ZooEntry("sd15", "Stable Diffusion v1.5 architecture, random weights (UNet 860M)", builders.build_sd15))
register(
    ZooEntry(
        "sd21", "Stable Diffusion v2.1 architecture, random weights (UNet 866M, v-prediction)", builders.build_sd21
    )
)
register(ZooEntry("sdxl", "SDXL base 1.0 architecture, random weights (UNet 2.6B)", builders.build_sdxl))
register(
    ZooEntry(
        "fashion",
        "SD architecture trained on Fashion-MNIST, 64x64, MiniLM text encoder (UNet 3.4M)",
        build_fashion,
        trained=True,
    )
)

register(
    ZooEntry(
        "fashion-outliers",
        "the default model with SD-like activation outlier channels planted (16-64x, FFN and attention "
        "output inputs); float output bit-identical to fashion",
        build_fashion_outliers,
        trained=True,
    )
)

# The model the README's main command uses when --model is not given.
DEFAULT_MODEL = "fashion"


def names() -> list[str]:
    return list(ZOO)


def build_pipeline(name: str, seed: int = 0, components: Iterable[str] | None = None) -> DiffusionPipeline:
    """Build a zoo pipeline by name. ``components`` limits which networks get instantiated."""
    if name not in ZOO:
        raise ModelLoadError(f"no zoo model named {name!r}; the zoo has {names()}")
    return ZOO[name].build(seed=seed, components=components)


def _is_hub_id(spec: str) -> bool:
    """``org/name`` with no leading ``.``, ``/`` or ``~``: the only specs worth asking a hub for."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))


def load_pipeline(spec: str | None = None, seed: int = 0, **from_pretrained_kwargs) -> DiffusionPipeline:
    """Resolve ``spec`` to a diffusers pipeline.

    ``spec`` is a zoo name (``tiny``, ``sd15``, ...; None means :data:`DEFAULT_MODEL`), a local
    folder written by ``save_pretrained``, or a hub id (``org/name``). Hub ids only resolve from the
    local Hugging Face cache or a reachable hub; both failures raise :class:`ModelLoadError`.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    if spec in ZOO:
        return build_pipeline(spec, seed=seed)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} exists but is not a diffusers pipeline folder (no model_index.json); "
                "save one with pipeline.save_pretrained(folder)"
            )
        log.info("loading pipeline from folder %s", path)
        try:
            return DiffusionPipeline.from_pretrained(path, **from_pretrained_kwargs)
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as err:
            # Damaged files surface as whatever the reader of each one raises: OSError (invalid JSON,
            # truncated weights, a missing component), a safetensors error, a ValueError (weights of
            # another shape), a TypeError (a model_index.json that is not an object).
            cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"{path} is a diffusers folder that cannot be loaded (damaged or incomplete: {cause}); "
                "save it again (dgq zoo save, or pipeline.save_pretrained)"
            ) from err
    if not _is_hub_id(spec):
        raise ModelLoadError(f"model folder {spec!r} does not exist (zoo names: {names()})")
    log.info("loading pipeline %s from the Hugging Face hub or its local cache", spec)
    try:
        return DiffusionPipeline.from_pretrained(spec, **from_pretrained_kwargs)
    except (OSError, ValueError, ConnectionError) as err:
        raise ModelLoadError(
            f"could not load {spec!r}: it is not a zoo name ({names()}), not an existing folder, and the "
            f"hub did not provide it (no network, or not in the local cache). Cause: {err}"
        ) from err


def save_model(pipe: DiffusionPipeline, out: str | os.PathLike, name: str, seed: int, overwrite: bool = False) -> Path:
    """Write ``pipe`` as a diffusers folder (``save_pretrained``) atomically, with the marker that lets
    ``overwrite`` recognise it later (:func:`is_saved_model`)."""
    with atomic_dir(out, overwrite, is_saved_model, "model folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        marker = {"format": SAVED_FORMAT, "name": name, "seed": seed, "files": files}
        (tmp / SAVED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(out)


def is_saved_model(path: str | os.PathLike) -> bool:
    """True for a folder :func:`save_model` wrote, holding nothing but what its marker lists."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        marker = json.loads((path / SAVED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if (
        not isinstance(marker, dict)
        or marker.get("format") != SAVED_FORMAT
        or not isinstance(marker.get("files"), list)
    ):
        return False
    listed = set(marker["files"]) | {SAVED_MARKER}
    return all(p.relative_to(path).as_posix() in listed for p in path.rglob("*") if not p.is_dir())
