"""``fashion-outliers``: the default model with Stable-Diffusion-like activation outliers planted.

Real SD UNets carry a few activation channels 10-100x larger than the rest at the input of the
feed-forward down-projection (after GEGLU) and of the attention output projection; those channels
are why DGQ exists. The default model, trained small, has milder ones. This stress model plants
them by a function-preserving rescaling: for a chosen channel ``c`` of a site, the producer's output
row ``c`` (weight and bias) is multiplied by a power of two ``f`` and the consumer's input column
``c`` is divided by ``f``. Scaling by a power of two is exact in floating point, so the float UNet
computes bit for bit what the default model computes; only the activations a quantizer sees change.

Sites, in every transformer block:
- ``ff.net.2`` input: rows of the GEGLU projection's hidden half (``ff.net.0.proj``);
- ``attn1.to_out.0`` and ``attn2.to_out.0`` input (the heads' outputs): rows of ``to_v``, since
  the attention output is a probability-weighted sum of values.

Caveat for reading results: a method that divides these inputs by per-channel scales and folds the
scales into the consumer's weights undoes the planting exactly on this model, which real outliers
do not allow for free (their consumer weights then carry the range).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from dgq.zoo.default_model import build_fashion

# Outlier magnitudes planted, cycled over the sites (powers of two: exact in float).
FACTORS = (16.0, 32.0, 64.0)
CHANNELS_PER_SITE = 2
SEED = 0


@dataclass(frozen=True)
class PlantedSite:
    consumer: str  # the Linear whose input carries the outliers
    producer: str  # the Linear whose output rows were scaled
    channels: tuple[int, ...]
    factor: float


def _scale_rows(linear: torch.nn.Linear, rows: list[int], f: float) -> None:
    linear.weight.data[rows] *= f
    if linear.bias is not None:
        linear.bias.data[rows] *= f


def plant_outliers(
    unet: torch.nn.Module,
    factors: Iterable[float] = FACTORS,
    channels_per_site: int = CHANNELS_PER_SITE,
    seed: int = SEED,
) -> list[PlantedSite]:
    """Plant outlier channels into ``unet`` in place (module docstring); returns what was planted.

    Each site gets ``channels_per_site`` channels (drawn with ``seed``) and the next factor of
    ``factors``; factors must be powers of two so that the UNet's function stays bit-identical."""
    factors = [float(f) for f in factors]
    for f in factors:
        if f <= 0 or torch.log2(torch.tensor(f)).item() % 1:
            raise ValueError(f"outlier factors must be positive powers of two (exact in float); got {f}")
    g = torch.Generator().manual_seed(seed)
    planted: list[PlantedSite] = []
    blocks = [(n, m) for n, m in unet.named_modules() if hasattr(m, "ff") and hasattr(m, "attn1")]
    for name, block in blocks:
        pairs = [("ff.net.0.proj", "ff.net.2", block.ff.net[0].proj, block.ff.net[2])]
        for attn in ("attn1", "attn2"):
            a = getattr(block, attn, None)
            if a is not None:
                pairs.append((f"{attn}.to_v", f"{attn}.to_out.0", a.to_v, a.to_out[0]))
        for producer_name, consumer_name, producer, consumer in pairs:
            f = factors[len(planted) % len(factors)]
            channels = torch.randperm(consumer.in_features, generator=g)[:channels_per_site].sort().values.tolist()
            _scale_rows(producer, channels, f)  # GEGLU: the hidden half is the first in_features rows
            consumer.weight.data[:, channels] /= f
            planted.append(PlantedSite(f"{name}.{consumer_name}", f"{name}.{producer_name}", tuple(channels), f))
    if not planted:
        raise ValueError("this UNet has no transformer blocks to plant outliers into")
    return planted


def build_fashion_outliers(seed: int = 0, components: Iterable[str] | None = None) -> StableDiffusionPipeline:
    """The default model with outliers planted into its UNet (``seed`` ignored: trained weights)."""
    pipe = build_fashion(seed=seed, components=components)
    if pipe.unet is not None:
        plant_outliers(pipe.unet)
    return pipe
