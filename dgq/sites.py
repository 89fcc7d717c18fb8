"""Where a UNet gets quantized: named sites derived from the module tree and a config.

Keys are diffusers module names plus a role: ``{conv or linear}.input`` for the input of a quantized
Conv2d/Linear, ``{attention}.q|k|v`` for the attention operands, ``{attention}.probs`` for the softmax
output. Weights are keyed by the layer name alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention

from dgq.config import QuantConfig

CONV, LINEAR, QKV = "conv", "linear", "qkv"


@dataclass(frozen=True)
class LayerSite:
    name: str  # module name in the UNet
    kind: str  # CONV or LINEAR

    @property
    def input_key(self) -> str:
        return f"{self.name}.input"


@dataclass(frozen=True)
class AttentionSite:
    name: str
    is_cross: bool

    def key(self, role: str) -> str:
        return f"{self.name}.{role}"


def intensity(module: torch.nn.Conv2d | torch.nn.Linear) -> float:
    """Multiply-adds per element a Conv2d or Linear reads or writes (input plus output elements),
    independent of batch, tokens and image size: ``in * out / (in + out)`` for a Linear,
    ``(in / groups) * out * kh * kw / (in * sh * sw + out)`` for a conv (per output pixel, whose
    input is ``sh * sw`` pixels). The work an integer kernel saves grows with the multiply-adds; the
    quantizers and scale ops around it grow with the elements."""
    if type(module) is torch.nn.Linear:
        i, o = module.in_features, module.out_features
        return i * o / (i + o)
    if type(module) is torch.nn.Conv2d:
        i, o = module.in_channels, module.out_channels
        kh, kw = module.kernel_size
        sh, sw = module.stride
        return (i // module.groups) * o * kh * kw / (i * sh * sw + o)
    raise TypeError(f"intensity is defined for Conv2d and Linear, not {type(module).__name__}")


def layer_sites(unet: torch.nn.Module, config: QuantConfig) -> list[LayerSite]:
    """Every Conv2d/Linear of ``unet`` not matched by ``config.keep_float`` and of
    :func:`intensity` at least the speed rule's threshold (``config.conv_min_intensity`` for a conv,
    higher where convs run as branches; ``config.linear_min_intensity`` for a Linear, lower where
    Linears run folded), in module order."""
    sites = []
    for name, module in unet.named_modules():
        if type(module) not in (torch.nn.Conv2d, torch.nn.Linear) or config.keeps_float(name):
            continue
        least = config.conv_min_intensity if type(module) is torch.nn.Conv2d else config.linear_min_intensity
        if intensity(module) < least:
            continue
        sites.append(LayerSite(name, CONV if type(module) is torch.nn.Conv2d else LINEAR))
    return sites


def attention_sites(unet: torch.nn.Module, config: QuantConfig) -> list[AttentionSite]:
    """Every diffusers ``Attention`` block whose operands the config quantizes."""
    if not config.quantize_qkv and config.attn_probs == "float":
        return []
    return [
        AttentionSite(name, bool(module.is_cross_attention))
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and not config.keeps_float(name)
    ]


def set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replace the child at dotted ``name`` (the sanctioned module-swap seam)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
