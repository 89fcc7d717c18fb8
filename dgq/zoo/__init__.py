"""Offline model zoo: seeded random-weight SD architectures, the trained default model, and loaders."""

from dgq.zoo.registry import (
    DEFAULT_MODEL,
    ZOO,
    ModelLoadError,
    ZooEntry,
    build_pipeline,
    is_saved_model,
    load_pipeline,
    names,
    register,
    save_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "ZOO",
    "ModelLoadError",
    "ZooEntry",
    "build_pipeline",
    "is_saved_model",
    "load_pipeline",
    "names",
    "register",
    "save_model",
]
