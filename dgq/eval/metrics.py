"""Fidelity metrics as pure tensor functions: SQNR, cosine, MSE, PSNR, SSIM; and the first of a sequence of
per-layer SQNRs to fall below a threshold.

Every function takes a reference and a test tensor of the same shape and computes in float64.
``per_sample=False`` (the default) returns one Python float for the whole tensor;
``per_sample=True`` treats dim 0 as the sample axis and returns a float64 tensor of shape ``(N,)``.
How a metric is aggregated over samples is part of its definition and stated in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(
    ref: torch.Tensor, test: torch.Tensor, per_sample: bool, min_ndim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ref, torch.Tensor) or not isinstance(test, torch.Tensor):
        raise TypeError(f"expected two tensors, got {type(ref).__name__} and {type(test).__name__}")
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    if not (ref.is_floating_point() and test.is_floating_point()):
        raise TypeError(f"expected floating-point tensors, got {ref.dtype} and {test.dtype}")
    need = max(min_ndim, 2 if per_sample else 1)
    if ref.ndim < need:
        raise ValueError(f"expected at least {need} dims (per_sample={per_sample}), got shape {tuple(ref.shape)}")
    if ref.numel() == 0:
        raise ValueError("empty tensors")
    ref, test = ref.detach().double(), test.detach().double()
    if per_sample:
        return ref.flatten(1), test.flatten(1)
    return ref.reshape(1, -1), test.reshape(1, -1)


def _out(values: torch.Tensor, per_sample: bool) -> torch.Tensor | float:
    return values.cpu() if per_sample else float(values[0])


def _ratio_db(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """10*log10(num/den) with den == 0 mapped to +inf (identical tensors), 0/0 to +inf too."""
    db = 10.0 * torch.log10(num / den)
    return torch.where(den == 0, torch.full_like(db, math.inf), db)


def energies(ref: torch.Tensor, test: torch.Tensor, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and error energies ``(sum(ref^2), sum((ref - test)^2))`` as float64 tensors of shape
    ``(N,)`` (per sample) or ``(1,)``: what SQNR is made of, for pooling over several batches."""
    r, t = _pair(ref, test, per_sample)
    return r.square().sum(1).cpu(), (r - t).square().sum(1).cpu()


def energy_ratio_db(signal: torch.Tensor | float, error: torch.Tensor | float) -> torch.Tensor | float:
    """SQNR in dB from energies: ``10*log10(signal / error)``, ``+inf`` where ``error == 0``."""
    db = _ratio_db(torch.as_tensor(signal, dtype=torch.float64), torch.as_tensor(error, dtype=torch.float64))
    return db if isinstance(signal, torch.Tensor) or isinstance(error, torch.Tensor) else float(db)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor, per_sample: bool = False) -> torch.Tensor | float:
    """Signal-to-quantization-noise ratio ``10*log10(sum(ref^2) / sum((ref - test)^2))`` in dB.

    Any shape. Aggregated: energies pooled over the whole tensor (not a mean of per-sample dB).
    ``+inf`` when ``test == ref`` exactly.
    """
    return _out(energy_ratio_db(*energies(ref, test, per_sample)), per_sample)


class HasSQNR(Protocol):
    sqnr_db: float


T = TypeVar("T", bound=HasSQNR)


def first_divergence(layers: Iterable[T], threshold_db: float) -> T | None:
    """The first item (in the given order: execution order for per-layer results) whose ``sqnr_db`` is
    below ``threshold_db``, or None. ``-inf`` (an all-zero reference with an error) counts as below;
    ``+inf`` (identical) and NaN do not."""
    return next((layer for layer in layers if layer.sqnr_db < threshold_db), None)


def cosine(ref: torch.Tensor, test: torch.Tensor, per_sample: bool = False) -> torch.Tensor | float:
    """Cosine similarity of the flattened tensors (per sample: of each flattened sample).

    Any shape. Two all-zero vectors count as similarity 1; one all-zero vector gives 0.
    """
    r, t = _pair(ref, test, per_sample)
    nr, nt = r.norm(dim=1), t.norm(dim=1)
    cos = (r * t).sum(1) / (nr * nt).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where((nr == 0) & (nt == 0), torch.ones_like(cos), cos)
    return _out(cos.clamp(-1.0, 1.0), per_sample)


def mse(ref: torch.Tensor, test: torch.Tensor, per_sample: bool = False) -> torch.Tensor | float:
    """Mean squared error. Any shape; aggregated over every element (equals the mean over samples)."""
    r, t = _pair(ref, test, per_sample)
    return _out((r - t).square().mean(1), per_sample)


def psnr(
    ref_img: torch.Tensor, test_img: torch.Tensor, data_range: float, per_sample: bool = False
) -> torch.Tensor | float:
    """Peak signal-to-noise ratio ``10*log10(data_range^2 / MSE)`` in dB.

    Images ``(N, C, H, W)``, any float dtype, values spanning ``data_range`` (1.0 for [0, 1],
    2.0 for [-1, 1]). Aggregated: from the MSE pooled over all images, so it is ``+inf`` only
    when every image is identical (a mean of per-image dB would be ``+inf`` if any one is).
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    r, t = _pair(ref_img, test_img, per_sample, min_ndim=4)
    if ref_img.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(ref_img.shape)}")
    err = (r - t).square().mean(1)
    return _out(_ratio_db(torch.full_like(err, float(data_range) ** 2), err), per_sample)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 2-D Gaussian window ``float64 (size, size)``, the product of two 1-D ones."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    ref_img: torch.Tensor, test_img: torch.Tensor, data_range: float = 1.0, per_sample: bool = False
) -> torch.Tensor | float:
    """Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5.

    Images ``(N, C, H, W)`` with ``H, W >= 11``. Local statistics use population (co)variances
    and only windows that fit inside the image ("valid"), so the value matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=0)`` per image. Each channel
    is scored on its own; an image's SSIM is the mean of its map over channels and pixels.
    Aggregated: the mean over images. 1.0 for identical images. Not shift-invariant (the luminance
    term uses absolute means): pass [0, 1] images with ``data_range=1`` to get the usual values.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if ref_img.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(ref_img.shape)}")
    _pair(ref_img, test_img, per_sample=True)  # validates shapes and dtypes
    n, c, h, w = ref_img.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    x = ref_img.detach().double().reshape(n * c, 1, h, w)
    y = test_img.detach().double().reshape(n * c, 1, h, w)
    win = gaussian_window().to(x.device)[None, None]
    # One conv over the five stacked statistics instead of five convs.
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), win)
    mx, my, mxx, myy, mxy = stats.split(n * c)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per_image = smap.reshape(n, -1).mean(1)
    return per_image.cpu() if per_sample else float(per_image.mean())


def summarize(values: torch.Tensor) -> dict[str, float]:
    """``{"mean", "median", "min", "max"}`` of per-sample values (inf allowed; the median of an
    even count is the lower middle value, so it is always one of the samples)."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        raise ValueError("no values to summarize")
    return {
        "mean": float(v.mean()),
        "median": float(v.median()),
        "min": float(v.min()),
        "max": float(v.max()),
    }
