"""The export manifest verifies itself: its digest, its schema, every file it lists, and nothing unlisted."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from common.fsutil import TMP_PREFIX
from export.manifest import MANIFEST, ManifestError, canonical_digest, is_export_folder, read_manifest, write_manifest
from tests.tolerances import FUZZ_CASES

SLOTS = [999.0, 666.0, 333.0, 1.0]


@pytest.fixture
def folder(tmp_path):
    """A small export folder: stand-in graphs, iospec, recipe and tokenizer, a quantized target with slots."""
    f = tmp_path / "export"
    (f / "tokenizer").mkdir(parents=True)
    for name, data in {
        "unet.onnx": b"unet graph",
        "text_encoder.onnx": b"text encoder graph",
        "vae_decoder.onnx": b"vae decoder graph",
        "iospec.json": b"{}",
        "recipe.safetensors": b"recipe",
        "tokenizer/vocab.json": b"{}",
    }.items():
        (f / name).write_bytes(data)
    write_manifest(
        f,
        {
            "target": "faithful",
            "components": ["unet", "text_encoder", "vae_decoder"],
            "slots": SLOTS,
            "steps": 4,
            "guidance": 5.0,
            "recipe": {"file": "recipe.safetensors", "sha256": _sha(b"recipe"), "config": {"wbits": 8}},
        },
    )
    return f


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _edit(folder, change, rehash: bool):
    """Edit manifest.json with ``change(manifest)``; ``rehash`` recomputes its digest as a careful forger would."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    if rehash:
        manifest["digest"] = canonical_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def test_written_manifest_verifies_and_carries_its_digest(folder):
    manifest = read_manifest(folder, verify=True)
    assert manifest["digest"] == canonical_digest(manifest) and len(manifest["digest"]) == 64
    assert sorted(manifest["files"]) == [
        "iospec.json",
        "recipe.safetensors",
        "text_encoder.onnx",
        "tokenizer/vocab.json",
        "unet.onnx",
        "vae_decoder.onnx",
    ]
    assert is_export_folder(folder)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.__setitem__("slots", m["slots"][::-1]),  # reversed slots: other parameters at every step
        lambda m: m["files"].pop("vae_decoder.onnx"),  # an entry removed: that file's check would be off
        lambda m: m.__setitem__("steps", 5),
    ],
    ids=["reversed-slots", "dropped-file-entry", "steps"],
)
def test_an_edited_manifest_does_not_match_its_digest(folder, change):
    _edit(folder, change, rehash=False)
    with pytest.raises(ManifestError, match="does not match its digest"):
        read_manifest(folder)  # refused even without verify: the digest costs nothing


def test_a_missing_field_is_named_not_a_traceback(folder):
    _edit(folder, lambda m: m.pop("files"), rehash=False)
    with pytest.raises(ManifestError, match=r"field 'files' is missing"):
        read_manifest(folder, verify=True)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.__setitem__("target", "trt"), "target"),
        (lambda m: m.__setitem__("components", ["unet", "vae"]), "components"),
        (lambda m: m["files"]["unet.onnx"].__setitem__("sha256", "xyz"), "files"),
        (lambda m: m["files"]["unet.onnx"].__setitem__("bytes", "10"), "files"),
        (lambda m: m["files"].__setitem__("../outside", m["files"]["unet.onnx"]), "files"),
        (lambda m: m["files"].pop("unet.onnx"), "files"),  # a component without its graph
        (lambda m: m.__setitem__("slots", "999"), "slots"),
        (lambda m: m.__setitem__("steps", 0), "steps"),
        (lambda m: m.__setitem__("guidance", -1), "guidance"),
        (lambda m: m["recipe"].__setitem__("sha256", "ab" * 32), "recipe"),
        (lambda m: m.__setitem__("extra", 1), "extra"),
        (lambda m: m.__setitem__("fused_attention", "yes"), "fused_attention"),
        (lambda m: m.__setitem__("version", True), None),  # True == 1 in Python, not a version
    ],
    ids=[
        "target",
        "components",
        "sha",
        "bytes",
        "escape",
        "no-graph",
        "slots",
        "steps",
        "guidance",
        "recipe",
        "unknown",
        "fused-attention",
        "bool-version",
    ],
)
def test_a_rehashed_manifest_is_still_checked_field_by_field(folder, change, field):
    _edit(folder, change, rehash=True)
    with pytest.raises(ManifestError, match=rf"field '{field}'" if field else "version True is not supported"):
        read_manifest(folder)


def test_unlisted_files_are_refused_but_engines_and_temporaries_pass(folder):
    _edit(folder, lambda m: m["files"].pop("tokenizer/vocab.json"), rehash=True)  # the file stays, unlisted
    with pytest.raises(ManifestError, match=r"tokenizer/vocab\.json is not listed in the manifest"):
        read_manifest(folder, verify=True)
    assert not is_export_folder(folder)  # --overwrite would not replace it either
    write_manifest(folder, read_manifest(folder))  # listed again
    for name in ("unet.engine", "unet.engine.json", "unet.engine.report.json", f"{TMP_PREFIX}unet.engine.lock"):
        (folder / name).write_bytes(b"")
    (folder / f"{TMP_PREFIX}unet.engine.abcd1234").mkdir()
    read_manifest(folder, verify=True)
    assert is_export_folder(folder)
    (folder / "tokenizer" / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match=r"tokenizer/notes\.txt is not listed"):
        read_manifest(folder, verify=True)
    assert not is_export_folder(folder)


def test_random_byte_and_bit_flips_are_refused_or_harmless(folder, tmp_path):
    """Each single-byte or single-bit change of manifest.json: a ManifestError or the same manifest."""
    original = read_manifest(folder, verify=True)
    data = (folder / MANIFEST).read_bytes()
    rng = random.Random(0)
    outcomes = {"refused": 0, "identical": 0}
    for case in range(FUZZ_CASES):
        edited = bytearray(data)
        i = rng.randrange(len(edited))
        if case % 2:
            edited[i] ^= 1 << rng.randrange(8)
        else:
            edited[i] = rng.choice([b for b in range(256) if b != edited[i]])
        (folder / MANIFEST).write_bytes(bytes(edited))
        try:
            got = read_manifest(folder, verify=True)
        except ManifestError:
            outcomes["refused"] += 1
            continue
        assert got == original, f"case {case}: byte {i} changed the manifest silently"
        outcomes["identical"] += 1
    assert sum(outcomes.values()) == FUZZ_CASES and outcomes["refused"] > FUZZ_CASES // 2, outcomes


def test_copy_without_a_file_is_refused(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer/vocab\.json is listed in the manifest but missing"):
        read_manifest(copy, verify=True)
