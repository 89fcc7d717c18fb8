"""Quantizer primitives: small pure tensor functions, one formula each (docs/method.md, section 2).

Uniform affine quantization follows ONNX ``QuantizeLinear`` / ``DequantizeLinear`` (opset 21) to the bit:

    q = saturate(round(x / scale) + zero_point)      # x / scale in float32, round half to even
    x_hat = (q - zero_point) * scale                 # float32

The division is a true float32 division (not a multiplication by 1/scale) and the rounding is
``torch.round`` (half to even), so for float32 input the results equal ONNX Runtime's bit for bit.
Inputs of any floating dtype are cast to float32 first, as ONNX Runtime does for float16 input.

Granularities (the same four for quantize, dequantize and fake-quantize):

* per tensor: ``axis=None``, ``scale`` has one element;
* per axis: ``axis=a``, ``scale`` has shape ``(C,)`` with ``C = x.shape[a]``;
* per group of indices along an axis: ``axis=a`` and ``group_index`` (int64, shape ``(C,)``, values in
  ``[0, K)``), ``scale`` has shape ``(K,)``; channel ``c`` uses ``scale[group_index[c]]``. In ONNX this
  is a per-axis Q/DQ with the expanded scale ``scale[group_index]``;
* block-wise: ``axis=a`` and ``block_size=B``, ``scale`` has ``x``'s shape except ``ceil(x.shape[a]/B)``
  on ``a``; element ``j`` along ``a`` uses block ``j // B`` (the last block may be partial), exactly
  ONNX's ``block_size`` attribute.

``zero_point`` is a Python number (broadcast) or a tensor of ``scale``'s shape; it must be integer
valued. It is not required to lie in ``[qmin, qmax]`` (a DGQ group whose range excludes 0 has a zero
point outside the grid); an ONNX export needs ``qmin <= zero_point <= qmax``, which holds whenever the
range contains 0 (``affine_params_from_range(..., include_zero=True)``).

Symmetric quantization is the affine formula with ``zero_point = 0`` on the signed grid
``[-2^(b-1), 2^(b-1)-1]`` and ``scale = amax / (2^(b-1)-1)`` (see ``symmetric_scale_from_absmax``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = tuple(range(2, 9))
SCALE_FLOOR = 1e-8  # docs/method.md, section 4: Delta = max((max - min) / (2^b - 1), 1e-8)

Number = float | int
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- validation


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an int in {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}, got {bits!r}")


def _check_finite(t: Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{name} must be finite; it has {n_nan} NaN and {n_inf} Inf of {t.numel()} elements")


def _as_float_tensor(t: Tensor | Number, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t))
    if not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise ValueError(f"{name} must be a floating or integer tensor, got dtype {t.dtype}")
    _check_finite(t, name)
    return t.to(torch.float32)


def _float_input(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    _check_finite(x, name)
    return as_dtype(x, torch.float32)


def as_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``y`` in ``dtype``; no Cast node in a trace when it already is."""
    return y if y.dtype == dtype else y.to(dtype)


def _check_scale(scale: Tensor) -> None:
    if not bool((scale > 0).all()):
        raise ValueError(f"scale must be positive everywhere; min is {float(scale.min())}")


def _check_integer_valued(t: Tensor, name: str) -> None:
    if not bool((t == torch.round(t)).all()):
        raise ValueError(f"{name} must be integer valued")


def _check_qrange(qmin: int, qmax: int) -> None:
    if not (float(qmin).is_integer() and float(qmax).is_integer() and qmin < qmax):
        raise ValueError(f"need integers qmin < qmax, got qmin={qmin!r}, qmax={qmax!r}")


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a tensor with {ndim} dims")
    return axis % ndim


# --------------------------------------------------------------------------- granularity


def _broadcast_params(
    shape: torch.Size,
    scale: Tensor | Number,
    zero_point: Tensor | Number,
    axis: int | None,
    group_index: Tensor | None,
    block_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Validate ``scale``/``zero_point`` for one granularity and expand them to broadcast against ``shape``."""
    scale = _as_float_tensor(scale, "scale")
    _check_scale(scale)
    zp_is_number = not isinstance(zero_point, Tensor)
    zero_point = _as_float_tensor(zero_point, "zero_point")
    _check_integer_valued(zero_point, "zero_point")
    if not zp_is_number and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {tuple(zero_point.shape)} != scale shape {tuple(scale.shape)}")
    zero_point = zero_point.expand_as(scale)

    if axis is None:
        if group_index is not None or block_size is not None:
            raise ValueError("group_index and block_size need an axis")
        if scale.numel() != 1:
            raise ValueError(f"per-tensor quantization (axis=None) needs one scale, got shape {tuple(scale.shape)}")
        return scale.reshape(()), zero_point.reshape(())

    ndim = len(shape)
    axis = _normalize_axis(axis, ndim)
    size = shape[axis]
    if group_index is not None and block_size is not None:
        raise ValueError("give either group_index or block_size, not both")
    if block_size is not None:
        _check_block_size(block_size)
        expected = list(shape)
        expected[axis] = math.ceil(size / block_size)
        if list(scale.shape) != expected:
            raise ValueError(
                f"block-wise scale along axis {axis} with block {block_size} must have shape "
                f"{tuple(expected)}, got {tuple(scale.shape)}"
            )
        expand = lambda t: t.repeat_interleave(block_size, dim=axis).narrow(axis, 0, size)  # noqa: E731
        return expand(scale), expand(zero_point)

    view = [1] * ndim
    view[axis] = size
    if group_index is not None:
        if not isinstance(group_index, Tensor) or group_index.dtype != torch.int64 or group_index.ndim != 1:
            raise ValueError("group_index must be a 1-D int64 tensor")
        if group_index.numel() != size:
            raise ValueError(f"group_index has {group_index.numel()} entries, axis {axis} has {size}")
        if scale.ndim != 1:
            raise ValueError(f"per-group scale must be 1-D (one per group), got shape {tuple(scale.shape)}")
        if size and (int(group_index.min()) < 0 or int(group_index.max()) >= scale.numel()):
            raise ValueError(f"group_index values must lie in [0, {scale.numel()})")
        group_index = group_index.to(scale.device)
        return scale[group_index].reshape(view), zero_point[group_index].reshape(view)

    if tuple(scale.shape) != (size,):
        raise ValueError(f"per-axis scale along axis {axis} must have shape ({size},), got {tuple(scale.shape)}")
    return scale.reshape(view), zero_point.reshape(view)


# --------------------------------------------------------------------------- the formulas


def _quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Number, qmax: Number) -> Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def _dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q - zero_point) * scale


def _affine_params(rmin: Tensor, rmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    scale = torch.clamp_min((rmax - rmin) / (2**bits - 1), SCALE_FLOOR)
    return scale, torch.round(-rmin / scale) + 0.0  # + 0.0 turns -0.0 into 0.0


def _symmetric_scale(amax: Tensor, bits: int) -> Tensor:
    return torch.clamp_min(amax / (2 ** (bits - 1) - 1), SCALE_FLOOR)


def _log2_quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    return torch.clamp(torch.round(-torch.log2(x / scale)), 0, 2**bits - 1)


def _log2_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    # 2 ** -q as Pow (ONNX has no Exp2; torch.exp2 does not export); exact for the integer levels
    return scale * torch.pow(2.0, -q)


# --------------------------------------------------------------------------- public API


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid of a ``bits``-wide type: ``[-2^(b-1), 2^(b-1)-1]`` if signed, else ``[0, 2^b-1]``."""
    _check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def integer_range(dtype: torch.dtype) -> tuple[int, int]:
    """Grid of an integer container type, what an ONNX QuantizeLinear whose zero point has that type
    saturates to: ``torch.uint8`` -> ``(0, 255)``, ``torch.int8`` -> ``(-128, 127)``, ``torch.int16`` ->
    ``(-32768, 32767)``. A narrower quantizer grid inside the container is :func:`quant_range`."""
    if dtype not in _INT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _INT_DTYPES]}, got {dtype}")
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize_affine(
    x: Tensor,
    scale: Tensor | Number,
    zero_point: Tensor | Number,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    *,
    group_index: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, exactly as ONNX QuantizeLinear.

    Args:
        x: floating tensor, any shape; computed in float32.
        scale, zero_point: float32 parameters of one granularity (module docstring).
        qmin, qmax: the integer grid, e.g. ``quant_range(8, signed=False) == (0, 255)``.
        axis, group_index, block_size: the granularity (module docstring).
    Returns:
        float32 tensor of ``x``'s shape holding integers in ``[qmin, qmax]``; ``.to(torch.uint8)`` (or
        int8, int32) is exact. Float keeps 4-bit grids and the simulator in one dtype.
    Raises:
        ValueError: NaN/Inf in ``x`` or the parameters, non-positive scale, shapes that do not match.
    """
    _check_qrange(qmin, qmax)
    x = _float_input(x)
    s, z = _broadcast_params(x.shape, scale, zero_point, axis, group_index, block_size)
    return _quantize(x, s.to(x.device), z.to(x.device), qmin, qmax)


def dequantize_affine(
    q: Tensor,
    scale: Tensor | Number,
    zero_point: Tensor | Number,
    axis: int | None = None,
    *,
    group_index: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """``x_hat = (q - zero_point) * scale`` in float32, exactly as ONNX DequantizeLinear.

    ``q`` is an integer tensor or an integer-valued float tensor (the output of ``quantize_affine``).
    Returns float32 of ``q``'s shape.
    """
    q = _as_float_tensor(q, "q")
    _check_integer_valued(q, "q")
    s, z = _broadcast_params(q.shape, scale, zero_point, axis, group_index, block_size)
    return _dequantize(q, s.to(q.device), z.to(q.device))


def fake_quantize_affine(
    x: Tensor,
    scale: Tensor | Number,
    zero_point: Tensor | Number,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    *,
    group_index: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """``dequantize_affine(quantize_affine(x, ...), ...)``: a Q/DQ pair, returned in ``x``'s dtype.

    Equal to ONNX Runtime's QuantizeLinear -> DequantizeLinear output for float32 ``x``. A zero
    point given as the number 0 is not added and subtracted (the same values, but for the sign of a
    zero: ``-0.0`` stays ``-0.0``), so a traced graph has no ``+ 0`` / ``- 0`` nodes.
    """
    _check_qrange(qmin, qmax)
    x32 = _float_input(x)
    s, z = _broadcast_params(x32.shape, scale, zero_point, axis, group_index, block_size)
    s, z = s.to(x.device), z.to(x.device)
    if not isinstance(zero_point, Tensor) and zero_point == 0:
        return as_dtype(torch.clamp(torch.round(x32 / s), qmin, qmax) * s, x.dtype)
    return as_dtype(_dequantize(_quantize(x32, s, z, qmin, qmax), s, z), x.dtype)


def affine_params_from_range(
    rmin: Tensor | Number, rmax: Tensor | Number, bits: int, include_zero: bool = False
) -> tuple[Tensor, Tensor]:
    """Asymmetric parameters of a range (docs/method.md, section 4), element-wise over any shape.

    ``scale = max((rmax - rmin) / (2^b - 1), 1e-8)``, ``zero_point = round(-rmin / scale)``, for the
    unsigned grid ``quant_range(bits, signed=False)``. With ``include_zero`` the range is first widened
    to contain 0 (``rmin = min(rmin, 0)``, ``rmax = max(rmax, 0)``): the layer-wise min-max init, and
    the condition for ``0 <= zero_point <= 2^b - 1``. Without it (DGQ groups) the zero point may lie
    outside the grid.

    Returns float32 ``(scale, zero_point)`` of the broadcast shape of ``rmin``/``rmax``; the zero
    point is integer valued.
    """
    _check_bits(bits)
    rmin, rmax = _as_float_tensor(rmin, "rmin"), _as_float_tensor(rmax, "rmax")
    if rmin.shape != rmax.shape:
        raise ValueError(f"rmin shape {tuple(rmin.shape)} != rmax shape {tuple(rmax.shape)}")
    if not bool((rmin <= rmax).all()):
        raise ValueError("rmin must be <= rmax everywhere")
    if include_zero:
        rmin, rmax = torch.clamp_max(rmin, 0.0), torch.clamp_min(rmax, 0.0)
    return _affine_params(rmin, rmax, bits)


def symmetric_scale_from_absmax(amax: Tensor | Number, bits: int) -> Tensor:
    """Symmetric scale ``max(amax / (2^(b-1) - 1), 1e-8)``, element-wise; the zero point is 0.

    Grid: ``quant_range(bits, signed=True)``, i.e. ``[-128, 127]`` for 8 bits, what an INT8 Q node
    saturates to in ONNX and TensorRT. The scale maps ``+-amax`` to ``+-127`` (TensorRT/ModelOpt's
    ``amax / 127``), so ``-128`` is reached only by values below ``-amax`` (a clipped range).
    ``amax`` (float, ``>= 0``, any shape) -> float32 scale of the same shape.
    """
    _check_bits(bits)
    amax = _as_float_tensor(amax, "amax")
    if not bool((amax >= 0).all()):
        raise ValueError("amax must be >= 0 everywhere")
    return _symmetric_scale(amax, bits)


# --------------------------------------------------------------------------- log2 quantizer


def _check_log2_args(x: Tensor, scale: Tensor | Number, bits: int) -> tuple[Tensor, Tensor]:
    _check_bits(bits)
    x = _float_input(x)
    if not bool((x >= 0).all()):
        raise ValueError("the log2 quantizer takes non-negative input (attention probabilities)")
    scale = _as_float_tensor(scale, "scale").to(x.device)
    _check_scale(scale)
    try:
        torch.broadcast_shapes(scale.shape, x.shape)
    except RuntimeError as err:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not broadcast to x shape {tuple(x.shape)}") from err
    return x, scale


def log2_quantize(x: Tensor, scale: Tensor | Number, bits: int) -> Tensor:
    """``q = clamp(round(-log2(x / scale)), 0, 2^b - 1)`` for attention probabilities.

    Args:
        x: non-negative floating tensor, any shape (computed in float32).
        scale: positive float32 broadcastable to ``x``: the real-time max the caller computed
            (a scalar for a batch-wide max, ``(B, 1, 1, 1)`` for one max per prompt).
    Returns:
        float32 integer-valued levels in ``[0, 2^b - 1]``: ``x = 0`` gives the last level ``2^b - 1``,
        ``x >= scale`` gives 0. Levels are not zeroed below the last one (docs/method.md, section 2).
    """
    x, scale = _check_log2_args(x, scale, bits)
    return _log2_quantize(x, scale, bits)


def log2_dequantize(q: Tensor, scale: Tensor | Number) -> Tensor:
    """``x_hat = scale * 2^(-q)`` in float32; ``q`` integer valued ``>= 0``, ``scale`` broadcastable."""
    q = _as_float_tensor(q, "q")
    _check_integer_valued(q, "q")
    if not bool((q >= 0).all()):
        raise ValueError("log2 levels must be >= 0")
    scale = _as_float_tensor(scale, "scale").to(q.device)
    _check_scale(scale)
    return _log2_dequantize(q, scale)


def fake_log2_quantize(x: Tensor, scale: Tensor | Number, bits: int) -> Tensor:
    """``log2_dequantize(log2_quantize(x, scale, bits), scale)`` returned in ``x``'s dtype."""
    x32, s = _check_log2_args(x, scale, bits)
    return as_dtype(_log2_dequantize(_log2_quantize(x32, s, bits), s), x.dtype)


# --------------------------------------------------------------------------- range searches


def _rows(x: Tensor, axis: int | None, block_size: int | None) -> tuple[Tensor, Tensor | None, tuple[int, ...], int]:
    """View ``x`` as ``(R, M)``: one row per quantization parameter. Returns rows, a validity mask
    (only for a partial last block), the moved shape needed by ``_unrows``, and the normalized axis."""
    if axis is None:
        if block_size is not None:
            raise ValueError("block_size needs an axis")
        return x.reshape(1, -1), None, (), -1
    axis = _normalize_axis(axis, x.ndim)
    if block_size is None:
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), None, (x.shape[axis],), axis
    _check_block_size(block_size)
    moved = x.movedim(axis, -1)
    size = moved.shape[-1]
    n_blocks = math.ceil(size / block_size)
    pad = n_blocks * block_size - size
    rows = torch.nn.functional.pad(moved, (0, pad)).reshape(-1, block_size)
    mask = None
    if pad:
        valid = torch.arange(n_blocks * block_size, device=x.device) < size
        mask = valid.reshape(n_blocks, block_size).repeat(rows.shape[0] // n_blocks, 1)
    return rows, mask, (*moved.shape[:-1], n_blocks), axis


def _unrows(values: Tensor, moved_shape: tuple[int, ...], axis: int, block_size: int | None) -> Tensor:
    if not moved_shape:
        return values.reshape(())
    if block_size is None:
        return values
    return values.reshape(moved_shape).movedim(-1, axis)


def minmax_range(x: Tensor, axis: int | None = None, *, block_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Min-max range of ``x`` (float, any shape) -> float32 ``(rmin, rmax)``.

    Shapes: ``()`` per tensor; ``(C,)`` per axis; with ``block_size`` the ONNX blocked-scale shape
    (``x``'s shape with ``ceil(C / block_size)`` on ``axis``).
    """
    x = _float_input(x)
    if x.numel() == 0:
        raise ValueError("cannot take the range of an empty tensor")
    rows, mask, moved, axis_n = _rows(x, axis, block_size)
    lo = rows if mask is None else rows.masked_fill(~mask, math.inf)
    hi = rows if mask is None else rows.masked_fill(~mask, -math.inf)
    return _unrows(lo.amin(1), moved, axis_n, block_size), _unrows(hi.amax(1), moved, axis_n, block_size)


def mse_search_range(
    x: Tensor,
    bits: int,
    axis: int | None = None,
    symmetric: bool = False,
    p: float = 2.4,
    steps: int = 80,
    shrink: float = 0.01,
    *,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Range minimizing ``mean |x_hat - x|^p`` among shrunken min-max ranges (docs/method.md, section 2).

    Candidates ``i = 0 .. steps-1`` scale the min-max range (widened to contain 0, as in BRECQ and
    Q-Diffusion, so that shrinking moves both ends toward 0) by ``1 - shrink * i``; candidate 0 is
    min-max itself, so the result is never worse than min-max in this loss. Asymmetric candidates use
    ``affine_params_from_range`` on the unsigned grid; symmetric ones ``symmetric_scale_from_absmax``
    with ``amax = max(|rmin|, |rmax|)`` on the signed grid, and return ``(-amax, amax)``. The search is
    independent per row (per tensor, per channel along ``axis``, or per block) and vectorized over
    rows; ties keep the wider range. Shapes and dtypes as ``minmax_range``.
    """
    _check_bits(bits)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (shrink > 0 and shrink * (steps - 1) < 1):
        raise ValueError(f"need shrink > 0 and shrink * (steps - 1) < 1, got shrink={shrink}, steps={steps}")
    x = _float_input(x)
    if x.numel() == 0:
        raise ValueError("cannot search the range of an empty tensor")
    rows, mask, moved, axis_n = _rows(x, axis, block_size)
    count = rows.shape[1] if mask is None else mask.sum(1)
    lo = (rows if mask is None else rows.masked_fill(~mask, math.inf)).amin(1).clamp_max(0.0)
    hi = (rows if mask is None else rows.masked_fill(~mask, -math.inf)).amax(1).clamp_min(0.0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
        qmin, qmax = quant_range(bits, signed=True)
    else:
        qmin, qmax = quant_range(bits, signed=False)

    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full_like(lo, math.inf, dtype=torch.float64)
    for i in range(steps):
        c_lo, c_hi = lo * (1.0 - shrink * i), hi * (1.0 - shrink * i)
        if symmetric:
            scale, zero = _symmetric_scale(c_hi, bits), torch.zeros_like(c_hi)
        else:
            scale, zero = _affine_params(c_lo, c_hi, bits)
        s, z = scale[:, None], zero[:, None]
        # |error|^p in float32 (a 2x saving over float64 on big UNets), accumulated in float64
        err = (_dequantize(_quantize(rows, s, z, qmin, qmax), s, z) - rows).abs().pow(p)
        if mask is not None:
            err = err.masked_fill(~mask, 0.0)
        err = err.sum(1, dtype=torch.float64) / count
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    return _unrows(best_lo, moved, axis_n, block_size), _unrows(best_hi, moved, axis_n, block_size)
