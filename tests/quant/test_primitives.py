"""Quantizer primitives: bit-exact against naive references and ONNX Runtime; log2; range searches."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dgq.eval.metrics import sqnr_db
from dgq.quant import (
    affine_params_from_range,
    dequantize_affine,
    fake_log2_quantize,
    fake_quantize_affine,
    integer_range,
    log2_dequantize,
    log2_quantize,
    minmax_range,
    mse_search_range,
    quant_range,
    quantize_affine,
    symmetric_scale_from_absmax,
)
from tests.tolerances import (
    CONSTANT_GROUP_RTOL,
    OUTLIER_GROUPED_MIN_SQNR_DB,
    OUTLIER_PER_TENSOR_MAX_SQNR_DB,
    PRIMITIVE_EXACT_ATOL,
)

ONNX_TYPES = {  # (bits, signed) -> ONNX element type
    (8, False): TensorProto.UINT8,
    (8, True): TensorProto.INT8,
    (4, False): TensorProto.UINT4,
    (4, True): TensorProto.INT4,
}


# ------------------------------------------------------------------ references


def naive_param_index(idx: tuple[int, ...], axis, group_index, block_size) -> tuple[int, ...]:
    """Which entry of the scale tensor element ``idx`` of x uses."""
    if axis is None:
        return ()
    if block_size is not None:
        return tuple(i // block_size if d == axis else i for d, i in enumerate(idx))
    c = idx[axis]
    return (int(group_index[c]),) if group_index is not None else (c,)


def naive_fake_quantize(x, scale, zero, qmin, qmax, axis=None, group_index=None, block_size=None):
    """Element by element in numpy float32 scalars: q = clamp(round_half_even(x / s) + z)."""
    x, scale, zero = x.numpy(), np.asarray(scale, np.float32), np.asarray(zero, np.float32)
    q = np.empty_like(x)
    y = np.empty_like(x)
    for idx in itertools.product(*map(range, x.shape)):
        p = naive_param_index(idx, axis, group_index, block_size)
        s, z = np.float32(scale[p]), float(zero[p])
        v = round(float(np.float32(x[idx]) / s)) + z  # Python round(): half to even
        q[idx] = min(max(v, qmin), qmax)
        y[idx] = np.float32(q[idx] - z) * s
    return torch.from_numpy(q), torch.from_numpy(y)


def ort_qdq(x, scale, zero, bits, signed, axis=None, block_size=None):
    """ONNX Runtime QuantizeLinear -> DequantizeLinear (opset 21, optimizations off): (q or None, y)."""
    qtype = ONNX_TYPES[(bits, signed)]
    attrs = {} if axis is None else {"axis": axis}
    if block_size is not None:
        attrs["block_size"] = block_size
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(zero, np.float32).astype(np.int64)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))]
    if bits == 8:  # numpy has no 4-bit dtype: for INT4/UINT4 only y comes back (it determines q)
        outputs.append(helper.make_tensor_value_info("q", qtype, list(x.shape)))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        outputs,
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.flatten().tolist()),
            helper.make_tensor("z", qtype, zero.shape, zero.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    res = sess.run(None, {"x": x.numpy()})
    y = torch.from_numpy(res[0])
    return (torch.from_numpy(res[1].astype(np.float32)) if bits == 8 else None), y


def special_values(shape, scale: float, seed: int) -> torch.Tensor:
    """Random values plus zeros, exact .5 ties (scale is a power of two), outliers and saturation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 40 * scale
    flat = x.view(-1)
    n = flat.numel()
    flat[: n // 8] = 0.0
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5]) * scale
    flat[n // 8 : n // 8 + 8] = ties
    flat[-3:] = torch.tensor([1e4, -1e4, 3e5]) * scale
    return x


def assert_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = float((a - b).abs().max())
    assert diff <= PRIMITIVE_EXACT_ATOL, f"max abs diff {diff} > {PRIMITIVE_EXACT_ATOL}"


# ------------------------------------------------------------------ uniform affine


@pytest.mark.parametrize("signed", [False, True])
def test_per_tensor_matches_naive_and_onnxruntime(signed):
    scale = 0.25
    x = special_values((4, 6, 5), scale, seed=0)
    qmin, qmax = quant_range(8, signed)
    zero = 0 if signed else 100
    q = quantize_affine(x, torch.tensor(scale), zero, qmin, qmax)
    y = fake_quantize_affine(x, torch.tensor(scale), zero, qmin, qmax)
    q_ref, y_ref = naive_fake_quantize(x, scale, zero, qmin, qmax)
    q_ort, y_ort = ort_qdq(x, scale, zero, 8, signed)
    assert_exact(q, q_ref)
    assert_exact(q, q_ort)
    assert_exact(y, y_ref)
    assert_exact(y, y_ort)
    assert_exact(dequantize_affine(q.to(torch.uint8 if not signed else torch.int8), scale, zero), y)
    # ties at .5 round half to even; 1e4 x scale saturates
    n = x.numel() // 8
    tie_q = q.view(-1)[n : n + 8] - zero
    assert tie_q.tolist() == ([0, 2, 2, 0, -2, -2, 126, -128] if signed else [0, 2, 2, 0, -2, -2, 126, -100])
    assert q.max() == qmax and q.min() == qmin


@pytest.mark.parametrize("signed", [False, True])
def test_per_axis_matches_naive_and_onnxruntime(signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, generator=g) * 3
    x[:, 2] = 0.0
    x[0, 4, 0, 0] = 1e4
    scale = torch.rand(5, generator=g) * 0.05 + 0.001  # not powers of two
    qmin, qmax = quant_range(8, signed)
    zero = torch.zeros(5) if signed else torch.randint(0, 256, (5,), generator=g).float()
    q = quantize_affine(x, scale, zero, qmin, qmax, axis=1)
    y = fake_quantize_affine(x, scale, zero, qmin, qmax, axis=1)
    q_ref, y_ref = naive_fake_quantize(x, scale, zero, qmin, qmax, axis=1)
    q_ort, y_ort = ort_qdq(x, scale, zero, 8, signed, axis=1)
    assert_exact(q, q_ref)
    assert_exact(q, q_ort)
    assert_exact(y, y_ref)
    assert_exact(y, y_ort)
    assert_exact(dequantize_affine(q, scale, zero, axis=1), y)


@pytest.mark.parametrize("signed,block,cols", [(True, 64, 100), (False, 32, 64), (True, 128, 130)])
def test_blockwise_int4_matches_naive_and_onnxruntime(signed, block, cols):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, cols, generator=g)
    w[1, :block] = 0.0  # a block of zeros
    w[2, 5] = 500.0  # saturates
    qmin, qmax = quant_range(4, signed)
    rmin, rmax = minmax_range(w, axis=1, block_size=block)
    assert rmin.shape == (3, math.ceil(cols / block))
    if signed:
        scale, zero = symmetric_scale_from_absmax(torch.maximum(-rmin, rmax), 4), torch.zeros_like(rmin)
    else:
        scale, zero = affine_params_from_range(rmin, rmax, 4, include_zero=True)
    scale[2] = scale[2] / 50  # make the outlier block saturate
    y = fake_quantize_affine(w, scale, zero, qmin, qmax, axis=1, block_size=block)
    _, y_ref = naive_fake_quantize(w, scale, zero, qmin, qmax, axis=1, block_size=block)
    _, y_ort = ort_qdq(w, scale, zero, 4, signed, axis=1, block_size=block)
    assert_exact(y, y_ref)
    assert_exact(y, y_ort)
    q = quantize_affine(w, scale, zero, qmin, qmax, axis=1, block_size=block)
    assert q.max() == qmax


def test_per_group_matches_naive_and_expanded_per_axis_onnxruntime():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 6, generator=g)
    x[:, 3] = 1.25  # a constant channel that is also a single-element group
    x[:, 5] *= 100.0  # an outlier channel in its own group
    group_index = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    rmin, rmax = minmax_range(x, axis=1)
    gmin = torch.stack([rmin[group_index == k].min() for k in range(4)])
    gmax = torch.stack([rmax[group_index == k].max() for k in range(4)])
    scale, zero = affine_params_from_range(gmin, gmax, 8, include_zero=True)
    y = fake_quantize_affine(x, scale, zero, 0, 255, axis=1, group_index=group_index)
    _, y_ref = naive_fake_quantize(x, scale, zero, 0, 255, axis=1, group_index=group_index)
    _, y_ort = ort_qdq(x, scale[group_index], zero[group_index], 8, False, axis=1)
    assert_exact(y, y_ref)
    assert_exact(y, y_ort)


def test_constant_group_uses_scale_floor_and_reconstructs():
    x = torch.full((3, 4), 5.0)
    scale, zero = affine_params_from_range(torch.tensor(5.0), torch.tensor(5.0), 8)
    assert float(scale) == float(np.float32(1e-8))
    assert float(zero) == round(float(np.float32(-5.0) / np.float32(scale)))  # float32 arithmetic
    q = quantize_affine(x, scale, zero, 0, 255)
    q_ref, y_ref = naive_fake_quantize(x, scale, zero, 0, 255)
    assert_exact(q, q_ref)
    assert torch.equal(q, torch.zeros_like(x))
    y = fake_quantize_affine(x, scale, zero, 0, 255)
    assert_exact(y, y_ref)
    torch.testing.assert_close(y, x, rtol=CONSTANT_GROUP_RTOL, atol=0.0)
    # a constant zero group: zero point is +0.0 and zeros come back exactly
    s0, z0 = affine_params_from_range(torch.zeros(2), torch.zeros(2), 8)
    assert z0.tolist() == [0.0, 0.0] and not torch.signbit(z0).any()
    assert torch.equal(fake_quantize_affine(torch.zeros(2, 2), s0, z0, 0, 255, axis=0), torch.zeros(2, 2))


def test_division_not_reciprocal_near_ties_matches_onnxruntime():
    """x / s and x * (1/s) round differently near .5; ONNX divides."""
    g = torch.Generator().manual_seed(4)
    s = torch.tensor(0.0123457)
    k = torch.randint(-100, 100, (20000,), generator=g).float()
    x = torch.nextafter((k + 0.5) * s, torch.randint(-1, 2, (20000,), generator=g).float() * 1e9)
    q = quantize_affine(x, s, 0, -128, 127)
    q_ort, _ = ort_qdq(x, s, 0, 8, True)
    assert_exact(q, q_ort)
    assert not torch.equal(q, torch.clamp(torch.round(x * (1 / s)), -128, 127))


def test_affine_params_formula_and_include_zero():
    scale, zero = affine_params_from_range(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 6.0]), 8)
    assert torch.equal(scale, torch.tensor([4.0, 4.0]) / 255)
    assert torch.equal(zero, torch.round(torch.tensor([1.0, -2.0]) / scale))
    s2, z2 = affine_params_from_range(torch.tensor(2.0), torch.tensor(6.0), 8, include_zero=True)
    assert float(s2) == pytest.approx(6.0 / 255) and float(z2) == 0.0
    qmin, qmax = quant_range(8, signed=False)
    for lo, hi in [(-3.0, 0.5), (-1e-9, 1e-9), (0.0, 7.0), (-7.0, 0.0)]:
        _, z = affine_params_from_range(torch.tensor(lo), torch.tensor(hi), 8, include_zero=True)
        assert qmin <= float(z) <= qmax


def test_container_grids_are_the_8_bit_quantizer_grids():
    # The Q/DQ export saturates to the container type's grid; for 8-bit containers it is the 8-bit quantizer grid.
    assert integer_range(torch.uint8) == quant_range(8, signed=False) == (0, 255)
    assert integer_range(torch.int8) == quant_range(8, signed=True) == (-128, 127)
    assert integer_range(torch.int16) == (-(2**15), 2**15 - 1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        integer_range(torch.float32)


def test_symmetric_scale_grid():
    assert quant_range(8, signed=True) == (-128, 127) and quant_range(4, signed=True) == (-8, 7)
    scale = symmetric_scale_from_absmax(torch.tensor([127.0, 0.0]), 8)
    assert scale.tolist() == [1.0, pytest.approx(1e-8)]
    x = torch.tensor([127.0, -127.0, -128.4, -200.0, 0.5])
    q = quantize_affine(x, scale[0], 0, *quant_range(8, signed=True))
    assert q.tolist() == [127, -127, -128, -128, 0]


@pytest.mark.parametrize(
    "call",
    [
        lambda: quantize_affine(torch.tensor([1.0, float("nan")]), 0.1, 0, 0, 255),
        lambda: quantize_affine(torch.tensor([1.0, float("inf")]), 0.1, 0, 0, 255),
        lambda: fake_quantize_affine(torch.ones(3), torch.tensor(0.0), 0, 0, 255),
        lambda: fake_quantize_affine(torch.ones(3), torch.tensor(-1.0), 0, 0, 255),
        lambda: quantize_affine(torch.ones(2, 3), torch.ones(2), 0, 0, 255, axis=1),
        lambda: quantize_affine(torch.ones(2, 3), torch.ones(3), torch.zeros(2), 0, 255, axis=1),
        lambda: quantize_affine(torch.ones(2, 3), torch.ones(3), 0.5, 0, 255, axis=1),
        lambda: quantize_affine(torch.ones(2, 3), torch.ones(2), 0, 0, 255),
        lambda: quantize_affine(torch.ones(2, 3), torch.ones(2, 1), 0, 0, 255, axis=1, block_size=2),
        lambda: quantize_affine(
            torch.ones(2, 3), torch.ones(2), 0, 0, 255, axis=1, group_index=torch.tensor([0, 1, 2])
        ),
        lambda: quantize_affine(torch.ones(2, 3), torch.ones(2), 0, 0, 255, axis=5),
        lambda: quantize_affine(torch.ones(3, dtype=torch.int32), 1.0, 0, 0, 255),
        lambda: affine_params_from_range(torch.tensor(float("nan")), torch.tensor(1.0), 8),
        lambda: affine_params_from_range(torch.tensor(2.0), torch.tensor(1.0), 8),
        lambda: affine_params_from_range(0.0, 1.0, 9),
        lambda: affine_params_from_range(0.0, 1.0, 1),
        lambda: symmetric_scale_from_absmax(-1.0, 8),
        lambda: minmax_range(torch.tensor([float("nan")])),
        lambda: mse_search_range(torch.tensor([1.0, float("nan")]), 8),
        lambda: mse_search_range(torch.ones(4), 8, steps=200),
        lambda: log2_quantize(torch.tensor([0.5, float("nan")]), 1.0, 8),
        lambda: log2_quantize(torch.tensor([-0.1]), 1.0, 8),
        lambda: log2_quantize(torch.tensor([0.1]), 0.0, 8),
    ],
)
def test_bad_input_raises_clear_error(call):
    with pytest.raises(ValueError):
        call()


def test_nan_error_message_names_the_problem():
    with pytest.raises(ValueError, match=r"finite.*1 NaN"):
        fake_quantize_affine(torch.tensor([0.0, float("nan"), 2.0]), 0.1, 0, 0, 255)


def test_fake_quantize_keeps_dtype_and_computes_in_float32():
    x = torch.randn(64, generator=torch.Generator().manual_seed(5)).half()
    y = fake_quantize_affine(x, 0.05, 128, 0, 255)
    assert y.dtype == torch.float16
    assert torch.equal(y, fake_quantize_affine(x.float(), 0.05, 128, 0, 255).half())


# ------------------------------------------------------------------ log2


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_log2_levels_match_naive(bits):
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(2, 4, 16, generator=g) * 3, dim=-1)
    probs[0, 0, :3] = 0.0
    scale = probs.amax()
    q = log2_quantize(probs, scale, bits)
    last = 2**bits - 1
    s = float(scale)
    for v, level in zip(probs.flatten().tolist(), q.flatten().tolist(), strict=True):
        ref = last if v == 0.0 else min(max(round(-math.log2(v / s)), 0), last)
        assert level == ref
    y = fake_log2_quantize(probs, scale, bits)
    assert_exact(y, log2_dequantize(q, scale))
    assert_exact(y, scale * torch.exp2(-q))


def test_log2_edges():
    s = torch.tensor(0.75)
    x = torch.tensor([0.0, 0.75, 1.0, 0.375, 0.1875, 1e-30])
    assert log2_quantize(x, s, 6).tolist() == [63, 0, 0, 1, 2, 63]
    assert log2_quantize(x, s, 4).tolist() == [15, 0, 0, 1, 2, 15]
    y = fake_log2_quantize(x, s, 4)
    assert y[1] == 0.75 and y[2] == 0.75 and y[3] == 0.375 and y[0] == 0.75 * 2.0**-15


def test_log2_per_prompt_scale_broadcasts():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(2, 3, 5, 7, generator=g), dim=-1)
    scale = probs.amax(dim=(1, 2, 3), keepdim=True)  # one real-time max per batch item
    q = log2_quantize(probs, scale, 8)
    assert q.shape == probs.shape
    assert torch.equal(q[1], log2_quantize(probs[1], scale[1], 8))


# ------------------------------------------------------------------ range searches


def lp_loss(x, rmin, rmax, bits, axis, symmetric, p=2.4):
    if symmetric:
        scale, zero = symmetric_scale_from_absmax(rmax, bits), torch.zeros_like(rmax)
    else:
        scale, zero = affine_params_from_range(rmin, rmax, bits, include_zero=True)
    y = fake_quantize_affine(x, scale, zero, *quant_range(bits, symmetric), axis=axis)
    err = (y - x).abs().double().pow(p)
    return err.mean() if axis is None else err.movedim(axis, 0).flatten(1).mean(1)


def test_minmax_range_shapes():
    x = torch.arange(24.0).reshape(2, 3, 4) - 5
    lo, hi = minmax_range(x)
    assert (lo.shape, float(lo), float(hi)) == ((), -5.0, 18.0)
    lo, hi = minmax_range(x, axis=1)
    assert lo.tolist() == [-5.0, -1.0, 3.0] and hi.tolist() == [10.0, 14.0, 18.0]
    lo, hi = minmax_range(x, axis=-1, block_size=3)
    assert lo.shape == (2, 3, 2) and lo[0, 0].tolist() == [-5.0, -2.0] and hi[0, 0].tolist() == [-3.0, -2.0]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_search_never_worse_than_minmax(symmetric, bits):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(6, 400, generator=g) * torch.linspace(0.1, 3, 6)[:, None]
    for axis in (None, 0):
        lo, hi = mse_search_range(w, bits, axis=axis, symmetric=symmetric)
        lo0, hi0 = minmax_range(w, axis=axis)
        if symmetric:
            hi0 = torch.maximum(-lo0, hi0)
            lo0 = -hi0
        searched, baseline = lp_loss(w, lo, hi, bits, axis, symmetric), lp_loss(w, lo0, hi0, bits, axis, symmetric)
        assert bool((searched <= baseline).all())
    if bits == 4:  # at 4 bits clipping a Gaussian's tails pays off in every row
        assert bool((searched < baseline).all())


def test_mse_search_per_channel_equals_per_tensor_on_each_channel():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 8, generator=g)
    lo, hi = mse_search_range(x, 4, axis=1)
    for c in range(5):
        lo_c, hi_c = mse_search_range(x[:, c], 4)
        assert float(lo[c]) == float(lo_c) and float(hi[c]) == float(hi_c)


def test_mse_search_blockwise_partial_block_equals_search_on_the_block():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(2, 40, generator=g)
    lo, hi = mse_search_range(w, 4, axis=1, block_size=16, symmetric=True)
    assert lo.shape == (2, 3)
    lo_last, hi_last = mse_search_range(w[1, 32:], 4, symmetric=True)  # the partial block, 8 values
    assert float(lo[1, 2]) == float(lo_last) and float(hi[1, 2]) == float(hi_last)


# ------------------------------------------------------------------ outlier injection


def test_outlier_channels_in_their_own_group_keep_sqnr():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 64, 32, generator=g)  # (B, N, C)
    outliers = torch.tensor([3, 17, 29])
    x[..., outliers] *= 100.0
    regular = torch.ones(32, dtype=torch.bool)
    regular[outliers] = False

    lo, hi = minmax_range(x)
    scale, zero = affine_params_from_range(lo, hi, 8, include_zero=True)
    per_tensor = fake_quantize_affine(x, scale, zero, 0, 255)

    group_index = (~regular).long()  # group 0: regular channels, group 1: outliers
    rmin, rmax = minmax_range(x, axis=-1)
    gmin = torch.stack([rmin[regular].min(), rmin[~regular].min()])
    gmax = torch.stack([rmax[regular].max(), rmax[~regular].max()])
    scale, zero = affine_params_from_range(gmin, gmax, 8)
    grouped = fake_quantize_affine(x, scale, zero, 0, 255, axis=-1, group_index=group_index)

    assert sqnr_db(x[..., regular], grouped[..., regular]) > OUTLIER_GROUPED_MIN_SQNR_DB
    assert sqnr_db(x, grouped) > OUTLIER_GROUPED_MIN_SQNR_DB
    assert sqnr_db(x[..., regular], per_tensor[..., regular]) < OUTLIER_PER_TENSOR_MAX_SQNR_DB
