"""The export folder's manifest: what was exported, from what, and the hashes that bind it together.

An export folder holds the ONNX graphs (``unet.onnx``, ``text_encoder.onnx``, ``vae_decoder.onnx``,
with ``<name>.onnx.data`` beside a graph past 2 GB), ``iospec.json``, ``tokenizer/`` and
``scheduler/`` (the pipeline's own, saved with ``save_pretrained`` so a runtime loads them without
the model), the recipe (``recipe.safetensors``) for quantized targets, and ``manifest.json``:

```
{"format": "dgq-export", "version": 1,
 "target": "float" | "faithful" | "tensorrt" | "onnxruntime",
 "components": ["unet", ...],
 "files": {"unet.onnx": {"sha256": ..., "bytes": ...}, ...},   # every file but manifest.json
 "slots": [999.0, 959.0, ...] | null,   # timestep value of each step_index the UNet graph takes
 "steps": 25 | null, "guidance": 5.0 | null,   # the calibration's sampler settings
 "model": {"class", "config_hash", "weights_hash"} | null,   # the UNet's identity
 "recipe": {"file": "recipe.safetensors", "sha256": ..., "config": {...}} | null,
 "versions": {"onnx": ..., "torch": ..., ...}}
```

When ``slots`` is not null the quantized UNet graph has an extra int64 scalar input ``step_index``:
the index in ``slots`` of the call's timestep (the recipe's per-step parameters are looked up by it
inside the graph). :func:`step_index` maps a timestep value to it.

Stdlib only: a runtime on a device reads and verifies manifests without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.constants import TARGETS
from common.errors import DGQError

MANIFEST = "manifest.json"
FORMAT = "dgq-export"
VERSION = 1


class ManifestError(DGQError, ValueError):
    """A missing, unreadable, edited or incompatible export folder."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, exclude: Iterable[str] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "bytes"}}`` of every file under ``folder``, sorted."""
    skip = set(exclude)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_manifest(folder: str | os.PathLike, fields: Mapping[str, Any]) -> Path:
    """Hash every file in ``folder`` and write ``manifest.json`` with ``fields`` (target, components, ...)."""
    folder = Path(folder)
    target = fields.get("target")
    if target not in TARGETS:
        raise ManifestError(f"target {target!r} is not one of {list(TARGETS)}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "slots": None,
        "steps": None,
        "guidance": None,
        "model": None,
        "recipe": None,
        **dict(fields),
        "files": file_entries(folder),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """Read ``folder/manifest.json``; ``verify`` also checks every listed file's size and hash."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"export folder {folder} does not exist (run scripts/export_onnx.py first)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST}; it is not a dgq export folder (run scripts/export_onnx.py)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"{path}: manifest version {manifest.get('version')} is not supported (this dgq reads {VERSION}); re-export"
        )
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Raise :class:`ManifestError` naming the first file that is missing or differs from the manifest."""
    folder = Path(folder)
    for rel, entry in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise ManifestError(f"{folder}: {rel} is listed in the manifest but missing; re-export")
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            raise ManifestError(f"{folder}: {rel} does not match its manifest hash (edited or half-copied); re-export")


def step_index(manifest: Mapping[str, Any], timestep: float) -> int | None:
    """The ``step_index`` input for a timestep value, or None when the graph takes none."""
    slots = manifest.get("slots")
    if slots is None:
        return None
    t = float(timestep)
    for i, s in enumerate(slots):
        if abs(float(s) - t) <= 1e-4 * max(1.0, abs(float(s))):
            return i
    raise ManifestError(
        f"timestep {t:g} was not calibrated; this export has step slots for {[round(float(s), 3) for s in slots]} "
        f"(generate with the scheduler and the {len(slots)} steps it was calibrated with)"
    )
