"""Figures of a yardstick run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def _finite_or_nan(values: Sequence[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def plot_sqnr_per_step(noise: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """SQNR (dB) of the candidate's noise prediction at every UNet call, in sampling order, for the
    reference trajectory's inputs and for the candidate's own trajectory."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    notes = []
    for key, label, style in (
        ("same_inputs", "same inputs (reference trajectory)", "o-"),
        ("candidate_trajectory", "candidate's own trajectory", "s--"),
    ):
        values = noise[key]["sqnr_db"]
        if all(math.isinf(v) for v in values):
            notes.append(f"{label}: identical at every step (inf dB)")
            continue
        ax.plot(range(len(values)), _finite_or_nan(values), style, ms=3, label=label)
    timesteps = noise["same_inputs"]["timesteps"]
    ticks = list(range(0, len(timesteps), max(1, len(timesteps) // 8)))
    ax.set_xticks(ticks, [f"{k}\nt={timesteps[k]:.0f}" for k in ticks], fontsize=8)
    ax.set_xlabel("UNet call (sampling order) and timestep")
    ax.set_ylabel("noise-prediction SQNR (dB)")
    ax.grid(alpha=0.3)
    if notes:
        ax.text(0.5, 0.5, "\n".join(notes), transform=ax.transAxes, ha="center", va="center")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title(title or "candidate vs reference UNet per step", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _show(ax, image: torch.Tensor) -> None:
    ax.imshow(((image.permute(1, 2, 0).float() + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_pairs(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    max_images: int = 16,
    columns: int = 8,
    row_names: tuple[str, str] = ("reference", "candidate"),
) -> Path:
    """Reference images over candidate images of the same prompt and seed.

    ``reference``/``candidate``: ``float (N, 3, H, W)`` in [-1, 1]; ``captions``: one short line per
    image pair (e.g. seed and judge labels), shown above the reference image.
    """
    n = min(len(reference), max_images)
    columns = min(columns, n)
    pair_rows = math.ceil(n / columns)
    fig, axes = plt.subplots(2 * pair_rows, columns, figsize=(1.5 * columns, 3.2 * pair_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, columns)
        top, bottom = axes[2 * r][c], axes[2 * r + 1][c]
        for ax, image in ((top, reference[i]), (bottom, candidate[i])):
            ax.axis("on")
            _show(ax, image)
        top.set_title(captions[i], fontsize=7)
        if c == 0:
            top.set_ylabel(row_names[0], fontsize=8)
            bottom.set_ylabel(row_names[1], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path, columns: int = 8) -> Path:
    """A plain grid of ``float (N, 3, H, W)`` images in [-1, 1] with one caption each."""
    n = len(images)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes[i // columns][i % columns]
        ax.axis("on")
        _show(ax, images[i])
        ax.set_title(captions[i], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
