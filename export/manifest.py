"""The export folder's manifest: what was exported, from what, and the hashes that bind it together.

An export folder holds the ONNX graphs (``unet.onnx``, ``text_encoder.onnx``, ``vae_decoder.onnx``,
with ``<name>.onnx.data`` beside a graph past 2 GB), ``iospec.json``, ``tokenizer/`` and
``scheduler/`` (the pipeline's own, saved with ``save_pretrained`` so a runtime loads them without
the model), the recipe (``recipe.safetensors``) for quantized targets, and ``manifest.json``:

```
{"format": "dgq-export", "version": 2,
 "digest": sha256 of the canonical JSON of every other field,
 "target": "float" | "faithful" | "tensorrt" | "onnxruntime",
 "components": ["unet", ...],
 "files": {"unet.onnx": {"sha256": ..., "bytes": ...}, ...},   # every file but manifest.json
 "slots": [999.0, 959.0, ...] | null,   # timestep value of each step_index the UNet graph takes
 "steps": 25 | null, "guidance": 5.0 | null,   # the calibration's sampler settings
 "model": {"class", "config_hash", "weights_hash"} | null,   # the UNet's identity
 "recipe": {"file": "recipe.safetensors", "sha256": ..., "config": {...}} | null,
 "versions": {"onnx": ..., "torch": ..., ...},
 "fused_attention": true}   # optional: the UNet's attention is ONNX Runtime's contrib
                            # MultiHeadAttention (runs in ONNX Runtime only; TensorRT cannot build it)
```

When ``slots`` is not null the quantized UNet graph has an extra int64 scalar input ``step_index``:
the index in ``slots`` of the call's timestep (the recipe's per-step parameters are looked up by it
inside the graph). :func:`step_index` maps a timestep value to it.

The manifest verifies itself: ``digest`` covers its canonical content (sorted keys, no whitespace), and
every field is checked against its schema (types, enums, hash formats, the recipe entry against the
file list), so an edited, truncated or hand-made manifest is refused with the field it got wrong.
With ``verify``, every listed file is hashed and any other file in the folder is refused, except the
engine files :mod:`runtime.build` writes beside the graphs and the project's own temporaries.

Stdlib only: a runtime on a device reads and verifies manifests without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.constants import TARGETS
from common.errors import DGQError
from common.fsutil import is_temporary
from common.timesteps import nearest_slot

MANIFEST = "manifest.json"
FORMAT = "dgq-export"
VERSION = 2
COMPONENTS = ("unet", "text_encoder", "vae_decoder")
# What runtime.build writes beside each component's graph; the only files a verified folder may hold
# besides those its manifest lists.
ENGINE_SUFFIXES = (".engine", ".engine.json", ".engine.report.json")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUIRED = {"format", "version", "digest", "target", "components", "files"}
_OPTIONAL = {"slots", "steps", "guidance", "model", "recipe", "versions", "fused_attention"}


class ManifestError(DGQError, ValueError):
    """A missing, unreadable, edited or incompatible export folder."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def engine_files(components: Iterable[str]) -> set[str]:
    """The names of the engine files a build may add for ``components``."""
    return {f"{c}{suffix}" for c in components for suffix in ENGINE_SUFFIXES}


def _folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (links included), skipping the project's temporaries."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        out += [Path(root) / f for f in sorted(files) if not is_temporary(f)]
    return out


def file_entries(folder: Path, exclude: Iterable[str] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "bytes"}}`` of every file under ``folder``, sorted."""
    skip = set(exclude)
    out = {}
    for p in _folder_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel not in skip:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return dict(sorted(out.items()))


def canonical_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of every field but ``digest``."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: str | os.PathLike, fields: Mapping[str, Any]) -> Path:
    """Hash every file in ``folder`` and write ``manifest.json`` with ``fields`` (target, components, ...).

    The manifest is validated as a reader would validate it, so a writer cannot produce a folder its
    readers refuse."""
    folder = Path(folder)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "slots": None,
        "steps": None,
        "guidance": None,
        "model": None,
        "recipe": None,
        **{k: v for k, v in fields.items() if k not in ("format", "version", "digest", "files")},
        "files": file_entries(folder),
    }
    manifest["digest"] = canonical_digest(manifest)
    path = folder / MANIFEST
    validate(manifest, path)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(manifest: Any, path: Path) -> None:
    """Raise :class:`ManifestError` naming the first field of ``manifest`` that breaks its schema or
    the digest (see the module docstring)."""

    def bad(field: str, why: str) -> ManifestError:
        return ManifestError(f"{path}: field {field!r} {why}; the manifest was edited or damaged, re-export")

    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object; it is not a dgq export manifest")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if not _is_int(manifest.get("version")) or manifest["version"] != VERSION:
        raise ManifestError(
            f"{path}: manifest version {manifest.get('version')!r} is not supported (this dgq reads {VERSION}); "
            "re-export"
        )
    missing = sorted(_REQUIRED - set(manifest))
    if missing:
        raise bad(missing[0], "is missing")
    unknown = sorted(set(manifest) - _REQUIRED - _OPTIONAL)
    if unknown:
        raise bad(unknown[0], "is not a manifest field")
    digest = manifest["digest"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise bad("digest", "is not a sha256 hex digest")
    try:
        want = canonical_digest(manifest)
    except ValueError as err:  # NaN or infinity somewhere
        raise bad("digest", f"cannot be checked ({err})") from err
    if want != digest:
        raise ManifestError(f"{path}: the manifest's content does not match its digest (edited or damaged); re-export")
    if manifest["target"] not in TARGETS:
        raise bad("target", f"is {manifest['target']!r}, not one of {list(TARGETS)}")
    comps = manifest["components"]
    if not isinstance(comps, list) or not comps or len(set(map(str, comps))) != len(comps):
        raise bad("components", "is not a non-empty list of distinct names")
    if any(c not in COMPONENTS for c in comps):
        raise bad("components", f"names {comps}, not a subset of {list(COMPONENTS)}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise bad("files", "is not a non-empty object")
    for rel, entry in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or any(is_temporary(p) for p in parts):
            raise bad("files", f"lists {rel!r}, which is not a path inside the folder")
        if rel == MANIFEST:
            raise bad("files", "lists the manifest itself")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"sha256", "bytes"}
            or not isinstance(entry["sha256"], str)
            or not _SHA256.fullmatch(entry["sha256"])
            or not _is_int(entry["bytes"])
            or entry["bytes"] < 0
        ):
            raise bad("files", f"entry {rel!r} is not {{'sha256': <hex digest>, 'bytes': <int>}}")
    for c in comps:
        if f"{c}.onnx" not in files:
            raise bad("files", f"does not list {c}.onnx of component {c!r}")
    if not isinstance(manifest.get("fused_attention", False), bool):
        raise bad("fused_attention", "is not true or false")
    slots = manifest.get("slots")
    if slots is not None and (not isinstance(slots, list) or not slots or not all(map(_is_number, slots))):
        raise bad("slots", "is neither null nor a non-empty list of timestep values")
    steps = manifest.get("steps")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise bad("steps", f"is {steps!r}, neither null nor an int >= 1")
    guidance = manifest.get("guidance")
    if guidance is not None and (not _is_number(guidance) or guidance < 0):
        raise bad("guidance", f"is {guidance!r}, neither null nor a number >= 0")
    model = manifest.get("model")
    if model is not None and (
        not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("class", "config_hash"))
    ):
        raise bad("model", "is neither null nor a model identity {class, config_hash, weights_hash}")
    recipe = manifest.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, dict) or not isinstance(recipe.get("file"), str):
            raise bad("recipe", "is neither null nor {file, sha256, config}")
        entry = files.get(recipe["file"])
        if entry is None or entry["sha256"] != recipe.get("sha256"):
            raise bad("recipe", f"names {recipe['file']!r}, which the file list does not hold with that sha256")
    versions = manifest.get("versions")
    if versions is not None and not isinstance(versions, dict):
        raise bad("versions", "is not an object")


def read_manifest(folder: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """Read and validate ``folder/manifest.json`` (schema and digest, always: it is cheap); ``verify``
    also checks every listed file's size and hash and refuses unlisted files (:func:`verify_files`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"export folder {folder} does not exist (run scripts/export_onnx.py first)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST}; it is not a dgq export folder (run scripts/export_onnx.py)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    validate(manifest, path)
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Raise :class:`ManifestError` naming the first file that is missing, differs from the manifest,
    or is in the folder without being listed (engine files of the listed components excepted)."""
    folder = Path(folder)
    files = manifest["files"]
    for rel, entry in files.items():
        p = folder / rel
        if not p.is_file():
            raise ManifestError(f"{folder}: {rel} is listed in the manifest but missing; re-export")
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            raise ManifestError(f"{folder}: {rel} does not match its manifest hash (edited or half-copied); re-export")
    allowed = set(files) | {MANIFEST} | engine_files(manifest["components"])
    for p in _folder_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel not in allowed:
            raise ManifestError(
                f"{folder}: {rel} is not listed in the manifest (an export folder holds only what it lists and "
                "its engines); remove it or re-export"
            )


def is_export_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder this project wrote as an export: a valid manifest, and nothing in
    it that the manifest does not list (``--overwrite`` may replace it; hashes are not read)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        manifest = read_manifest(path)
    except ManifestError:
        return False
    allowed = set(manifest["files"]) | {MANIFEST} | engine_files(manifest["components"])
    return all(p.relative_to(path).as_posix() in allowed for p in _folder_files(path))


def step_index(manifest: Mapping[str, Any], timestep: float) -> int | None:
    """The ``step_index`` input for a timestep value, or None when the graph takes none: the slot of the
    timestep, or of the nearest calibrated one (:func:`common.timesteps.nearest_slot`)."""
    slots = manifest.get("slots")
    if slots is None:
        return None
    return nearest_slot([float(s) for s in slots], timestep)
