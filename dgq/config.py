"""DGQ configuration: one validated, versioned dataclass; baselines are presets of it.

Every behaviour of calibration and simulation comes from a :class:`QuantConfig` passed explicitly.
Presets (``PRESETS``) name the method and the baselines it is compared with; ablations are the same
fields set differently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from common.constants import QUANT_TARGETS

CONFIG_VERSION = 1
# Fields added after version 1 whose absence in a stored config means "off".
LEGACY_OFF = ("fold_linear", "norm_outputs", "fold_conv", "fold_groups", "branch_rule", "linear_rule")

WEIGHT_INITS = ("mse", "minmax")
WEIGHT_GRANULARITIES = ("channel", "block", "tensor")
ACT_AXES = ("auto", "channel", "pixel", "layer")
ATTN_PROBS = ("log2", "uniform", "float")
ATTN_SCALES = ("prompt", "batch", "static")

# Fold strengths by weight width (onnxruntime profile, folded Linear inputs): with 8-bit weights the
# weight columns absorb a group's whole range at no measurable cost; at 4 bits the stretched columns
# widen every output row's weight range, so half of it (in log scale) stays in the input.
FOLD_STRENGTH_8BIT = 1.0
FOLD_STRENGTH_LOWBIT = 0.5

# The onnxruntime target's speed rule (``QuantConfig.min_intensity``): a Conv2d/Linear whose
# multiply-adds per element it reads or writes (dgq.sites.intensity) fall below this stays float.
# Measured with ONNX Runtime 1.32 CPU, 1 thread (``scripts/ort_branch_kernels.py --sweep``,
# results/ort_layer_sweep.json): the target's folded unit (Q/DQ with per-step tables, QLinearConv /
# MatMulIntegerToFloat, the fold's elementwise ops) never gained on Linears of intensity 64 or less
# (0.37-0.96x), was about even on 3x3 convs of 32 channels (144: 0.65-1.18x) and gained on every
# Linear of intensity 160 (320 features: 1.06-1.54x): the elementwise work around an integer kernel
# grows with the elements, the saving with the multiply-adds (docs/export-targets.md).
ORT_MIN_INTENSITY = 150.0
# A conv run as K gathered QLinearConv branches (the onnxruntime target below W8A8) does K units'
# elementwise work (K input and K output quantizers, the branch sum) for one conv's multiply-adds. It
# broke even at about K / 2 times the folded unit's intensity (``scripts/ort_branch_kernels.py
# --sweep --sweep-branches K``, results/ort_layer_sweep_branches*.json, K = 2, 4, 8; 3x3 and 1x1
# convs): at K=4, 3x3 convs of intensity 288 ran at 0.50-1.06x float and of 576 at 0.91-1.84x, 1x1
# convs of 160 at 0.84-1.38x and of 256 at 1.17-1.44x. Hence a branched conv's threshold is
# ``min_intensity * K * BRANCH_RULE_FACTOR`` (never below ``min_intensity``; QuantConfig.branch_rule).
# One factor for 3x3 and 1x1 convs is a simplification: it keeps 1x1 convs of intensity 256 float
# at K=4, which gained in the sweep.
BRANCH_RULE_FACTOR = 0.5
# A folded Linear (MatMulIntegerToFloat: float output, no output quantizer, no gamma) does less
# elementwise work per multiply-add than the folded conv unit the threshold was set on, so Linears
# gain from a lower intensity. Swept on an AVX512-VNNI CPU (``scripts/ort_branch_kernels.py --sweep
# --sweep-linears ...``, results/ort_layer_sweep_linear_gap.json, 16-4096 tokens): intensity 64 (128
# features) ran at 0.996-1.67x float, 80 at 1.15-1.99x, 96 at 1.04-2.11x, 102-128 at 1.17-2.23x, the
# slowest at 16 tokens; the older sweep behind ORT_MIN_INTENSITY, on another CPU, lost at 64
# (0.72-0.96x) and gained at 160 (1.06-1.54x), with nothing swept between. A Linear's threshold is
# ``min_intensity * LINEAR_RULE_FACTOR`` (QuantConfig.linear_rule): 90 by default, a choice above this
# CPU's break-even (64 or less) and the older CPU's loss at 64, not a measured break-even of its own.
LINEAR_RULE_FACTOR = 0.6

# Layers the paper keeps in float (docs/method.md, section 1).
PAPER_KEEP_FLOAT = ("conv_in", "conv_out")
# The TensorRT SD demo's float layers: time embedding MLPs, resnet shortcuts, output norm/projection.
TRT_DEMO_KEEP_FLOAT = (
    "conv_in",
    "conv_out",
    "time_embedding.*",
    "*.time_emb_proj",
    "*.conv_shortcut",
    "*.proj_out",
    "conv_norm_out",
)


@dataclass(frozen=True)
class QuantConfig:
    """How one UNet is quantized.

    Bits: ``wbits`` for weights (8 or 4), ``abits`` for activations and attention (8, 6 or 4).
    ``groups`` is DGQ's K (1 = one layer-wise range per timestep). ``profile`` selects the semantics
    (docs/method.md, section 7): ``faithful`` = asymmetric per-group ranges on the chosen axis; ``tensorrt`` =
    symmetric per-group scales with group membership fixed across timesteps (one branch per group in
    the exported graph) and the widest (outlier) group kept at ``outlier_bits`` (16 = float);
    ``onnxruntime`` = what ONNX Runtime's CPU integer kernels run: asymmetric (uint8) per-step
    activation ranges, symmetric int8 weights, conv inputs in channel groups fixed across timesteps
    (folded into the weights per ``fold_conv``, else one QLinearConv branch per group) whose outputs
    are quantized too (a calibrated per-step range
    per branch, ``Recipe.outputs``; with ``norm_outputs`` after a per-output-channel scale), Linear
    inputs with ``fold_linear`` in channel groups folded into the weights, else one range per step
    (MatMulIntegerToFloat either way).
    """

    wbits: int = 8
    abits: int = 8
    groups: int = 16
    profile: str = "faithful"
    # weights
    weight_init: str = "mse"
    weight_granularity: str = "channel"
    weight_block: int = 128
    # activations
    act_axis: str = "auto"  # "auto" = the spread rule (docs/method.md, section 4)
    time_aware: bool = True  # one parameter set per timestep slot (False: one set for all steps)
    symmetric: bool = False  # forced True by the tensorrt profile
    quantize_qkv: bool = True
    outlier_bits: int | None = None  # tensorrt profile: bits of the widest group (16 = keep float)
    # onnxruntime profile: Linear inputs get channel groups whose scale and centre are folded into the
    # layer's weight columns and bias (one per-tensor Q/DQ per step on the normalized input), and conv
    # branch outputs are quantized per output channel through a scale folded into the weight rows.
    fold_linear: bool = True
    norm_outputs: bool = True
    # onnxruntime profile: conv inputs' channel groups folded into the weight columns too (scales
    # only, no centre: zero padding stays exact), so each conv is one QLinearConv instead of a branch
    # per group (False: a QLinearConv branch per group). None: folded at W8A8 only, where it cost
    # 0.5 dB for 1.1-1.4x speed; with 6-bit activations or 4-bit weights it cost 1.5-1.8 dB
    # (docs/export-targets.md).
    fold_conv: bool | None = None
    # tensorrt profile: a channel-grouped Conv/Linear input's groups, all but the outlier group,
    # folded into the weight columns (symmetric scales, no centre), so the layer is one INT8 GEMM on
    # ``x * (1 / fold scale)`` plus the outlier group's branch, instead of one GEMM per group (False).
    # None: folded with 8-bit weights, where it cost 0.7 dB; with 4-bit weights it cost 2.3 dB
    # (docs/export-targets.md).
    fold_groups: bool | None = None
    # how much of a folded group's range moves into the weight columns: the input is divided and the
    # columns multiplied by (width / widest width) ** strength (1 = every group stretched to the
    # widest's width; smaller leaves more spread in the input and less in the weights, as SmoothQuant's
    # migration strength does). None: FOLD_STRENGTH_8BIT for 8-bit weights, else FOLD_STRENGTH_LOWBIT
    # (docs/export-targets.md: measured per weight width).
    fold_strength: float | None = None
    # attention probabilities
    # the paper: log2; uniform measured better on the default model (docs/method.md, section 8)
    attn_probs: str = "uniform"
    attn_scale: str = "prompt"  # real-time max per prompt, per batch, or a static calibrated max
    bos_fp: bool = True  # cross-attention: BOS column (and BOS key row) kept in full precision
    # which layers stay float: fnmatch patterns over diffusers module names
    keep_float: tuple[str, ...] = PAPER_KEEP_FLOAT
    # and those whose multiply-adds per element read or written are below this (dgq.sites.intensity;
    # 0 = none): too small for integer kernels to gain (ORT_MIN_INTENSITY, the onnxruntime target's)
    min_intensity: float = 0.0
    # onnxruntime profile, convs as K branches (not ``folds_conv``): the rule's threshold for them is
    # min_intensity * K * BRANCH_RULE_FACTOR (``conv_min_intensity``); False: min_intensity
    branch_rule: bool = True
    # onnxruntime profile, folded Linears (``folds_linear``): the rule's threshold for them is
    # min_intensity * LINEAR_RULE_FACTOR (``linear_min_intensity``); False: min_intensity
    linear_rule: bool = True
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid QuantConfig: {msg}")

        check(self.version == CONFIG_VERSION, f"version {self.version} is not {CONFIG_VERSION}")
        check(self.wbits in (2, 3, 4, 5, 6, 7, 8), f"wbits must be in 2..8, got {self.wbits}")
        check(self.abits in (2, 3, 4, 5, 6, 7, 8), f"abits must be in 2..8, got {self.abits}")
        check(isinstance(self.groups, int) and self.groups >= 1, f"groups must be an int >= 1, got {self.groups}")
        check(self.profile in QUANT_TARGETS, f"profile must be one of {QUANT_TARGETS}, got {self.profile!r}")
        check(self.weight_init in WEIGHT_INITS, f"weight_init must be one of {WEIGHT_INITS}")
        check(
            self.weight_granularity in WEIGHT_GRANULARITIES, f"weight_granularity must be one of {WEIGHT_GRANULARITIES}"
        )
        check(self.weight_block in (32, 64, 128, 256), f"weight_block must be 32/64/128/256, got {self.weight_block}")
        check(self.act_axis in ACT_AXES, f"act_axis must be one of {ACT_AXES}, got {self.act_axis!r}")
        check(self.attn_probs in ATTN_PROBS, f"attn_probs must be one of {ATTN_PROBS}")
        check(self.attn_scale in ATTN_SCALES, f"attn_scale must be one of {ATTN_SCALES}")
        check(
            self.outlier_bits is None or self.outlier_bits in (4, 6, 8, 16),
            f"outlier_bits must be None, 4, 6, 8 or 16, got {self.outlier_bits}",
        )
        check(
            self.fold_strength is None
            or (isinstance(self.fold_strength, (int, float)) and 0.0 <= self.fold_strength <= 1.0),
            f"fold_strength must be None or in [0, 1], got {self.fold_strength!r}",
        )
        check(
            self.fold_conv is None or type(self.fold_conv) is bool,
            f"fold_conv must be None, True or False, got {self.fold_conv!r}",
        )
        check(
            self.fold_groups is None or type(self.fold_groups) is bool,
            f"fold_groups must be None, True or False, got {self.fold_groups!r}",
        )
        check(isinstance(self.keep_float, tuple), "keep_float must be a tuple of patterns")
        check(
            type(self.min_intensity) in (int, float) and 0.0 <= self.min_intensity < float("inf"),
            f"min_intensity must be a finite number >= 0, got {self.min_intensity!r}",
        )
        check(type(self.branch_rule) is bool, f"branch_rule must be True or False, got {self.branch_rule!r}")
        check(type(self.linear_rule) is bool, f"linear_rule must be True or False, got {self.linear_rule!r}")
        check(
            self.profile != "onnxruntime" or (self.outlier_bits is None and not self.symmetric),
            "the onnxruntime profile is asymmetric (uint8 activations) and has no outlier_bits",
        )
        check(
            self.profile != "onnxruntime" or self.weight_granularity != "block",
            "the onnxruntime profile needs per-channel or per-tensor weights (its integer kernels have no "
            "block-wise weights)",
        )

    @property
    def is_symmetric(self) -> bool:
        """Activations symmetric (zero point 0)."""
        return self.symmetric or self.profile == "tensorrt"

    @property
    def weights_symmetric(self) -> bool:
        """Weights symmetric: ONNX Runtime's QLinearConv wants int8 weights with zero points 0."""
        return self.is_symmetric or self.profile == "onnxruntime"

    @property
    def folds_groups(self) -> bool:
        """``tensorrt`` profile: channel groups of Conv and Linear inputs folded (``fold_groups``; by
        default with 8-bit weights)."""
        if self.profile != "tensorrt":
            return False
        return self.wbits >= 8 if self.fold_groups is None else self.fold_groups

    @property
    def folds_linear(self) -> bool:
        """Linear inputs with folded channel-group scales (``onnxruntime`` profile, ``fold_linear``;
        ``tensorrt`` profile, ``folds_groups``)."""
        if self.profile == "tensorrt":
            return self.folds_groups
        return self.profile == "onnxruntime" and self.fold_linear

    @property
    def folds_conv(self) -> bool:
        """Conv inputs with folded channel-group scales (``onnxruntime`` profile, ``fold_conv``; by
        default at 8-bit weights and activations; ``tensorrt`` profile, ``folds_groups``)."""
        if self.profile == "tensorrt":
            return self.folds_groups
        if self.profile != "onnxruntime":
            return False
        if self.fold_conv is None:
            return self.wbits >= 8 and self.abits >= 8
        return self.fold_conv

    @property
    def conv_min_intensity(self) -> float:
        """The speed rule's threshold for a Conv2d: ``min_intensity``, or where the convs run as K
        QLinearConv branches (``onnxruntime`` profile, not ``folds_conv``; ``branch_rule``) that times
        ``K * BRANCH_RULE_FACTOR``, never less (dgq.sites.layer_sites)."""
        k = self.effective_groups
        if self.branch_rule and self.profile == "onnxruntime" and not self.folds_conv and k > 1:
            return self.min_intensity * max(1.0, k * BRANCH_RULE_FACTOR)
        return self.min_intensity

    @property
    def linear_min_intensity(self) -> float:
        """The speed rule's threshold for a Linear: ``min_intensity``, or where Linears run as the
        folded unit (``onnxruntime`` profile, ``folds_linear``; ``linear_rule``) that times
        ``LINEAR_RULE_FACTOR`` (dgq.sites.layer_sites)."""
        if self.linear_rule and self.profile == "onnxruntime" and self.folds_linear:
            return self.min_intensity * LINEAR_RULE_FACTOR
        return self.min_intensity

    @property
    def fold_exponent(self) -> float:
        """The fold strength this config folds Linear inputs with (``fold_strength``, or by weight width)."""
        if self.fold_strength is not None:
            return float(self.fold_strength)
        return FOLD_STRENGTH_8BIT if self.wbits >= 8 else FOLD_STRENGTH_LOWBIT

    @property
    def normalizes_outputs(self) -> bool:
        """Conv branch outputs quantized per output channel (``onnxruntime`` profile, ``norm_outputs``;
        the per-channel scale lives in the weight rows, so per-tensor weights leave outputs plain)."""
        return self.profile == "onnxruntime" and self.norm_outputs and self.weight_granularity == "channel"

    @property
    def effective_groups(self) -> int:
        return 1 if self.act_axis == "layer" else self.groups

    def keeps_float(self, module_name: str) -> bool:
        """True when ``module_name`` matches one of ``keep_float``."""
        return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in self.keep_float)

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_float"] = list(self.keep_float)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}")
        d = dict(d)
        # Recipes written before a field existed were calibrated without it.
        if d.get("fold_linear") and "fold_strength" not in d:
            d["fold_strength"] = 1.0  # folds written before the field stretched every group fully
        for name in LEGACY_OFF:
            d.setdefault(name, False)
        d.setdefault("min_intensity", 0.0)  # every layer was quantized before the rule
        if "keep_float" in d:
            d["keep_float"] = tuple(d["keep_float"])
        return cls(**d)


def _preset(**kw: Any) -> dict[str, Any]:
    return kw


# Method and baselines: all computed by the same code, differing only in these fields.
PRESETS: dict[str, dict[str, Any]] = {
    # DGQ as this project runs it by default: the paper's grouping, time-aware ranges and BOS handling,
    # with uniform attention probabilities (measured better than log2 on the default model; docs/method.md).
    "dgq": _preset(),
    # DGQ with the paper's attention quantizer: log2 attention probabilities (the default is uniform, which
    # measured better on the default model at every bit width tried; README, compare_methods).
    "dgq-paper": _preset(attn_probs="log2"),
    # DGQ with one layer-wise range per timestep (Q-Diffusion-like, time-aware).
    "dgq-k1": _preset(groups=1),
    # Naive PTQ: per-tensor min-max weights and activations, one range for all timesteps,
    # uniform attention probabilities with a calibrated range.
    "naive": _preset(
        groups=1,
        weight_init="minmax",
        weight_granularity="tensor",
        time_aware=False,
        attn_probs="uniform",
        attn_scale="static",
        bos_fp=False,
    ),
    # TensorRT demo / ModelOpt-style INT8: per-channel min-max weights, symmetric per-tensor
    # activations with one amax over all steps, attention BMMs left to fused FP16 MHA.
    "trt-demo": _preset(
        groups=1,
        weight_init="minmax",
        symmetric=True,
        time_aware=False,
        quantize_qkv=False,
        attn_probs="float",
        bos_fp=False,
        keep_float=TRT_DEMO_KEEP_FLOAT,
    ),
}


def preset(name: str, **overrides: Any) -> QuantConfig:
    """A named preset with field overrides, e.g. ``preset("dgq", wbits=4, abits=6)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return QuantConfig(**{**PRESETS[name], **overrides})
