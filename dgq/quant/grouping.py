"""DGQ grouping search (docs/method.md, section 4), one function per step of the paper.

Step 1  ``axis_minmax`` / ``AxisStats``: min and max of every element of the two candidate axes
        (channel, pixel/token), streamed over calibration batches.
Step 2  ``axis_spread`` / ``choose_axis``: group along the axis whose elements spread more.
Step 3  ``kmeans_groups``: K-means++ on the 2-D points ``(amin_i, amax_i)``, fixed seed.
Step 4  ``group_ranges`` and ``GroupingResult.affine_params``: one range per group, parameters
        from ``primitives.affine_params_from_range`` (the one place that formula lives).
``search_groups`` runs steps 2-4 on the statistics of one (quantizer, timestep slot).

Layouts (``LAYOUTS``), the input of a quantizer and what its two axes are:

* ``"linear"``: ``(B, N, C)``; channel = ``C`` (last dim), pixel = token ``N`` (dim 1). A 2-D
  ``(B, C)`` input (time-embedding MLPs) has no pixel axis and keeps one layer-wise range.
* ``"conv"``: ``(B, C, H, W)``; channel = ``C``, pixel = the ``H*W`` positions, flattened row-major
  (``h * W + w``). **The project uses this view**: both axes are axes of the conv's input, so a
  per-channel or per-pixel group scale is a Q/DQ (or divide-quantize-multiply) on that input in the
  exported graph.
* ``"conv_unfold"``: the reference code's view: the input unfolded with the conv's geometry to
  ``(B, C*kh*kw, L)``; channel = the ``C*kh*kw`` rows (in ``torch.nn.functional.unfold`` order,
  ``c`` major), pixel = the ``L`` output positions. Zero padding enters the statistics. One input
  element feeds several rows and positions, so these groups cannot be expressed as a Q/DQ on the
  conv input; use it to reproduce the reference's statistics. For a 1x1 conv with stride 1 and no
  padding it coincides with ``"conv"``.
* ``"attention"``: q/k/v ``(B, heads, N, d)``; channel = head dim ``d`` (shared by all heads),
  pixel = token ``N``. The 3-D ``(B*heads, N, d)`` form is the ``"linear"`` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from dgq.quant.layout import CHANNEL, LAYER, PIXEL, axis_dim, quant_view
from dgq.quant.primitives import affine_params_from_range

LAYOUTS = ("linear", "conv", "conv_unfold", "attention")
_NDIM = {"linear": (2, 3), "conv": (4,), "conv_unfold": (4,), "attention": (4,)}

# K-means settings (step 3): k-means++ seeding, 10 restarts (scikit-learn's classic default and what
# "auto" meant before 1.4), Lloyd iterations, one OpenMP thread so the result does not depend on the
# machine's thread count.
KMEANS_N_INIT = 10
KMEANS_MAX_ITER = 300


# --------------------------------------------------------------------------- step 1


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a Conv2d, for the ``"conv_unfold"`` layout (zero padding only)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> ConvGeometry:
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(
                f"conv_unfold needs numeric zero padding, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        return cls(_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation))


def _channel_last_3d(x: Tensor, layout: str, conv: ConvGeometry | None) -> Tensor:
    """``x`` as ``(B', pixels, channels)`` (a view where possible)."""
    if layout in ("linear", "conv"):
        v = quant_view(x, layout, PIXEL)
        return (
            v.transpose(axis_dim(layout, PIXEL, v.ndim), axis_dim(layout, CHANNEL, v.ndim)) if layout == "conv" else v
        )
    if layout == "conv_unfold":
        if conv is None:
            raise ValueError('layout "conv_unfold" needs the conv geometry (conv=ConvGeometry(...))')
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        return cols.transpose(1, 2)
    return x.flatten(0, 1)  # attention: (B*heads, N, d)


def axis_minmax(x: Tensor, layout: str, conv: ConvGeometry | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-element min and max along each candidate axis of one batch (step 1).

    Args:
        x: floating tensor in ``layout`` (module docstring); finite.
        conv: the conv geometry, only for ``"conv_unfold"``.
    Returns:
        ``{"channel": (amin, amax), "pixel": (amin, amax)}``, float32 1-D tensors of the axis length,
        each reduced over every other dim including the batch. ``"pixel"`` is absent for 2-D input.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor")
    if x.ndim not in _NDIM[layout]:
        raise ValueError(
            f"layout {layout!r} takes a tensor with {' or '.join(map(str, _NDIM[layout]))} dims, "
            f"got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (it has NaN or Inf)")
    x = x.detach().to(torch.float32)
    if x.ndim == 2:
        return {CHANNEL: (x.amin(0), x.amax(0))}
    t = _channel_last_3d(x, layout, conv)
    return {CHANNEL: (t.amin((0, 1)), t.amax((0, 1))), PIXEL: (t.amin((0, 2)), t.amax((0, 2)))}


@dataclass
class AxisStats:
    """Running per-element min/max of one quantizer's input along both candidate axes (step 1).

    Memory is ``O(C + N)``: four float32 vectors. ``pixel_*`` is None for inputs with fewer than 3
    dims. ``samples`` counts batch items seen. Pixel statistics bind to absolute positions, so every
    batch must have the same pixel count (one resolution per calibration).
    """

    layout: str
    ndim: int
    channel_amin: Tensor
    channel_amax: Tensor
    pixel_amin: Tensor | None
    pixel_amax: Tensor | None
    samples: int
    conv: ConvGeometry | None = None

    @classmethod
    def from_batch(cls, x: Tensor, layout: str, conv: ConvGeometry | None = None) -> AxisStats:
        stats = axis_minmax(x, layout, conv)
        pix = stats.get(PIXEL, (None, None))
        return cls(layout, x.ndim, *stats[CHANNEL], *pix, samples=x.shape[0], conv=conv)

    @property
    def has_pixel_axis(self) -> bool:
        return self.pixel_amin is not None

    def axis(self, name: str) -> tuple[Tensor, Tensor]:
        """``(amin, amax)`` of the ``"channel"`` or ``"pixel"`` axis."""
        if name == CHANNEL:
            return self.channel_amin, self.channel_amax
        if name == PIXEL and self.has_pixel_axis:
            return self.pixel_amin, self.pixel_amax
        raise ValueError(f"no axis {name!r} in statistics of a {self.ndim}-D {self.layout!r} input")

    def layer_range(self) -> tuple[float, float]:
        """The layer-wise (per-tensor) min and max."""
        return float(self.channel_amin.min()), float(self.channel_amax.max())

    def merge(self, other: AxisStats) -> AxisStats:
        """Statistics of both streams together; raises if they describe different inputs."""
        mine = (self.layout, self.ndim, self.conv, self.channel_amin.numel(), _numel(self.pixel_amin))
        theirs = (other.layout, other.ndim, other.conv, other.channel_amin.numel(), _numel(other.pixel_amin))
        if mine != theirs:
            raise ValueError(
                f"cannot merge statistics of different inputs (layout, ndim, conv, channels, "
                f"pixels): {mine} vs {theirs}; pixel groups need one resolution"
            )
        dev = self.channel_amin.device
        lo = lambda a, b: None if a is None else torch.minimum(a, b.to(dev))  # noqa: E731
        hi = lambda a, b: None if a is None else torch.maximum(a, b.to(dev))  # noqa: E731
        return AxisStats(
            self.layout,
            self.ndim,
            lo(self.channel_amin, other.channel_amin),
            hi(self.channel_amax, other.channel_amax),
            lo(self.pixel_amin, other.pixel_amin),
            hi(self.pixel_amax, other.pixel_amax),
            self.samples + other.samples,
            self.conv,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the four vectors held."""
        held = (self.channel_amin, self.channel_amax, self.pixel_amin, self.pixel_amax)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def update(self, x: Tensor) -> AxisStats:
        """Fold one more batch in place (a streaming observer); returns self."""
        merged = self.merge(AxisStats.from_batch(x, self.layout, self.conv))
        for f in fields(self):
            setattr(self, f.name, getattr(merged, f.name))
        return self


def axis_lengths(shape: tuple[int, ...], layout: str) -> tuple[int, int | None]:
    """``(channels, pixels)`` that :class:`AxisStats` keeps for an input of ``shape`` in ``layout``
    (``"linear"`` or ``"conv"``; pixels None for a 2-D input), without the data."""
    if len(shape) == 2:
        return int(shape[1]), None
    if layout == "conv":
        return int(shape[1]), math.prod(int(d) for d in shape[2:])
    return int(shape[-1]), int(shape[1])


def _numel(t: Tensor | None) -> int | None:
    return None if t is None else t.numel()


# --------------------------------------------------------------------------- step 2


def axis_spread(amin: Tensor, amax: Tensor) -> float:
    """``D = (max_i amax_i - min_i amax_i) + (max_i amin_i - min_i amin_i)`` (float64 arithmetic)."""
    _check_points(amin, amax)
    amin, amax = amin.double(), amax.double()
    return float((amax.max() - amax.min()) + (amin.max() - amin.min()))


def choose_axis(stats: AxisStats) -> str:
    """The axis with the larger spread ``D``; ties go to ``"channel"``. Needs a pixel axis (>= 3-D input)."""
    if not stats.has_pixel_axis:
        raise ValueError(f"a {stats.ndim}-D input has no pixel axis; it keeps one layer-wise range")
    d_channel, d_pixel = axis_spread(*stats.axis(CHANNEL)), axis_spread(*stats.axis(PIXEL))
    return PIXEL if d_pixel > d_channel else CHANNEL


# --------------------------------------------------------------------------- step 3


def _check_points(amin: Tensor, amax: Tensor) -> None:
    if amin.ndim != 1 or amin.shape != amax.shape or amin.numel() == 0:
        raise ValueError(
            f"amin and amax must be non-empty 1-D tensors of one length, got "
            f"{tuple(amin.shape)} and {tuple(amax.shape)}"
        )
    if not (bool(torch.isfinite(amin).all()) and bool(torch.isfinite(amax).all())):
        raise ValueError("amin and amax must be finite")
    if not bool((amin <= amax).all()):
        raise ValueError("amin must be <= amax for every element")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def kmeans_groups(amin: Tensor, amax: Tensor, k: int, seed: int = 0, n_init: int = KMEANS_N_INIT) -> Tensor:
    """K-means on the points ``(amin_i, amax_i)`` (raw values) -> int64 ``group_index`` of shape ``(n,)``.

    scikit-learn ``KMeans(init="k-means++", n_init=n_init, random_state=seed)``, run on one thread.
    Duplicate points are merged and weighted by their count (the same objective, and no warning
    about fewer distinct clusters). With at most ``k`` distinct points every distinct point is its own
    group, so the number of groups ``K = group_index.max() + 1`` can be below ``k``.

    Group ids are ``0..K-1``, sorted by range width ``max_k - min_k``, then ``max_k``, ``min_k`` and the
    first member's index: the same data gives the same ids, and the widest ("outlier") group is last.
    """
    # Imported here: scikit-learn takes about a second to import and only the calibration search needs it.
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    _check_points(amin, amax)
    _check_k(k)
    points = torch.stack([amin, amax], dim=1).detach().cpu().double()
    unique, inverse, counts = torch.unique(points, dim=0, return_inverse=True, return_counts=True)
    if unique.shape[0] <= k:
        labels = torch.arange(unique.shape[0])
    else:
        km = KMeans(
            n_clusters=k,
            init="k-means++",
            n_init=n_init,
            max_iter=KMEANS_MAX_ITER,
            random_state=seed,
            algorithm="lloyd",
        )
        with threadpool_limits(limits=1, user_api="openmp"):
            km.fit(unique.numpy(), sample_weight=counts.double().numpy())
        labels = torch.from_numpy(km.labels_).long()
    return _sorted_labels(points, labels[inverse])


def _sorted_labels(points: Tensor, labels: Tensor) -> Tensor:
    """Relabel to ``0..K-1`` in the order of ``kmeans_groups``'s docstring."""
    keys = []
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().flatten()
        lo, hi = float(points[members, 0].min()), float(points[members, 1].max())
        keys.append((hi - lo, hi, lo, int(members[0]), label))
    new_id = torch.empty(max(k[-1] for k in keys) + 1, dtype=torch.long)
    for rank, key in enumerate(sorted(keys)):
        new_id[key[-1]] = rank
    return new_id[labels]


# --------------------------------------------------------------------------- step 4


def group_ranges(amin: Tensor, amax: Tensor, group_index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-group ``min_k = min amin_i``, ``max_k = max amax_i`` over members -> float32 ``(k,)`` each.

    ``group_index``: int64 ``(n,)`` with values in ``[0, k)``; every group must have a member.
    """
    _check_points(amin, amax)
    _check_k(k)
    if group_index.dtype != torch.int64 or group_index.shape != amin.shape:
        raise ValueError(f"group_index must be int64 of shape {tuple(amin.shape)}")
    if int(group_index.min()) < 0 or int(group_index.max()) >= k:
        raise ValueError(f"group_index values must lie in [0, {k})")
    empty = (torch.bincount(group_index.cpu(), minlength=k) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"groups {empty} have no members")
    idx = group_index.to(amin.device)
    gmin = torch.full((k,), math.inf, device=amin.device).scatter_reduce(0, idx, amin.float(), "amin")
    gmax = torch.full((k,), -math.inf, device=amin.device).scatter_reduce(0, idx, amax.float(), "amax")
    return gmin, gmax


@dataclass(frozen=True)
class GroupingResult:
    """Outcome of the search for one (quantizer, timestep slot): a small artifact to save and replay.

    ``axis``: ``"channel"`` or ``"pixel"`` (grouped along that axis of the layout), or ``"layer"`` (one
    range for the whole tensor: K = 1, or an input with fewer than 3 dims). ``group_index``: int64
    ``(n,)`` mapping each element of the axis to its group (``(1,)`` zeros for ``"layer"``).
    ``group_min``/``group_max``: float32 ``(K,)``. ``spread``: ``D`` of each candidate axis.

    To apply it with the primitives, pass ``group_index`` and the per-group parameters along the axis's
    dim: ``"linear"`` channel ``-1`` / pixel ``1``; ``"attention"`` channel ``-1`` / pixel ``2``;
    ``"conv"`` channel ``1``, pixel ``2`` of ``x.flatten(2)``.
    """

    axis: str
    group_index: Tensor
    group_min: Tensor
    group_max: Tensor
    spread: dict[str, float]

    @property
    def k(self) -> int:
        return self.group_min.numel()

    def group_sizes(self) -> Tensor:
        return torch.bincount(self.group_index.cpu(), minlength=self.k)

    def affine_params(self, bits: int, include_zero: bool | None = None) -> tuple[Tensor, Tensor]:
        """Per-group ``(scale, zero_point)``, float32 ``(K,)``, via ``affine_params_from_range``.

        ``include_zero=None`` follows the method (docs/method.md, section 4): the layer-wise range is
        widened to contain 0, group ranges are used as they are.
        """
        if include_zero is None:
            include_zero = self.axis == LAYER
        return affine_params_from_range(self.group_min, self.group_max, bits, include_zero=include_zero)


def search_groups(stats: AxisStats, k: int, seed: int = 0) -> GroupingResult:
    """Steps 2-4 on one quantizer's statistics: spread rule, K-means, per-group ranges.

    ``k = 1`` gives the layer-wise baseline; so does an input with fewer than 3 dims, whatever ``k``.
    Otherwise the result has ``K <= k`` groups along the chosen axis (fewer when the axis has fewer
    than ``k`` distinct ``(amin, amax)`` points).
    """
    _check_k(k)
    spread = {CHANNEL: axis_spread(*stats.axis(CHANNEL))}
    if stats.has_pixel_axis:
        spread[PIXEL] = axis_spread(*stats.axis(PIXEL))
    if k == 1 or not stats.has_pixel_axis:
        lo, hi = stats.channel_amin.min(), stats.channel_amax.max()
        return GroupingResult(
            LAYER, torch.zeros(1, dtype=torch.long), lo.reshape(1).float(), hi.reshape(1).float(), spread
        )
    axis = choose_axis(stats)
    amin, amax = stats.axis(axis)
    group_index = kmeans_groups(amin, amax, k, seed)
    gmin, gmax = group_ranges(amin, amax, group_index, int(group_index.max()) + 1)
    return GroupingResult(axis, group_index, gmin, gmax, spread)
