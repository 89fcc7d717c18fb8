"""Seeded random-weight pipelines: ``tiny``, ``tiny-xl`` and the SD v1.5 / v2.1 / SDXL architectures."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dgq.zoo import configs
from dgq.zoo.clip_tokenizer import build_clip_tokenizer

# tiny: every structural feature of the SD v1 UNet (cross-attention in down, mid and up blocks, a
# plain down/up block at the bottom, skip concatenations, resnet shortcuts, GEGLU feed-forward),
# at a size where a calibrate/export/generate round trip takes seconds on a 2-core CPU.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_TEXT = dict(
    configs.CLIP_L_TEXT,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

# tiny-xl: what makes SDXL SDXL at test size: two CLIP text towers whose penultimate hidden states are
# concatenated (32 + 32 = the UNet's 64-wide cross-attention) and whose second tower's pooled,
# projected output feeds the ``text_time`` added embedding with the six size conditioning values,
# transformer depth 2 in the lower block, linear projections in the transformers, no attention in the
# top block, an Euler scheduler, and a VAE marked force_upcast.
TINY_XL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    attention_head_dim=(4, 8),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=8,
)
TINY_XL_TEXT_2 = dict(TINY_TEXT, num_hidden_layers=3)

SD_COMPONENTS = ("unet", "text_encoder", "vae")
SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _seeded(seed: int, build):
    # Each component gets its own derived seed so building a subset gives the same weights as
    # building the whole pipeline.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def check_components(components: Iterable[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The components asked for (all of ``allowed`` when None); refuses a name the model lacks."""
    if components is None:
        return allowed
    components = tuple(components)
    unknown = sorted(set(components) - set(allowed))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; this model has {list(allowed)}")
    return components


def build_sd(
    unet_cfg: dict,
    text_cfg: dict,
    vae_cfg: dict,
    scheduler,
    seed: int = 0,
    components: Iterable[str] | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with seeded random weights; absent components are ``None``."""
    wanted = check_components(components, SD_COMPONENTS)
    unet = _seeded(seed, lambda: UNet2DConditionModel(**unet_cfg)) if "unet" in wanted else None
    text = _seeded(seed + 1, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))) if "text_encoder" in wanted else None
    vae = _seeded(seed + 2, lambda: AutoencoderKL(**vae_cfg)) if "vae" in wanted else None
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=build_clip_tokenizer(text_cfg["max_position_embeddings"]),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny(seed: int = 0, components: Iterable[str] | None = None) -> StableDiffusionPipeline:
    return build_sd(TINY_UNET, TINY_TEXT, TINY_VAE, PNDMScheduler(**configs.SD15_SCHEDULER), seed, components)


def build_sd15(seed: int = 0, components: Iterable[str] | None = None) -> StableDiffusionPipeline:
    return build_sd(
        configs.SD15_UNET,
        configs.CLIP_L_TEXT,
        configs.SD_VAE,
        PNDMScheduler(**configs.SD15_SCHEDULER),
        seed,
        components,
    )


def build_sd21(seed: int = 0, components: Iterable[str] | None = None) -> StableDiffusionPipeline:
    vae = dict(configs.SD_VAE, sample_size=768)
    return build_sd(
        configs.SD21_UNET, configs.OPENCLIP_H_TEXT, vae, DDIMScheduler(**configs.SD21_SCHEDULER), seed, components
    )


def build_xl(
    unet_cfg: dict,
    text_cfg: dict,
    text_2_cfg: dict,
    vae_cfg: dict,
    seed: int = 0,
    components: Iterable[str] | None = None,
) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline with seeded random weights; absent components are ``None``."""
    wanted = check_components(components, SDXL_COMPONENTS)
    unet = _seeded(seed, lambda: UNet2DConditionModel(**unet_cfg)) if "unet" in wanted else None
    text = _seeded(seed + 1, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))) if "text_encoder" in wanted else None
    text2 = (
        _seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg)))
        if "text_encoder_2" in wanted
        else None
    )
    vae = _seeded(seed + 2, lambda: AutoencoderKL(**vae_cfg)) if "vae" in wanted else None
    tokenizer_2 = build_clip_tokenizer(text_2_cfg["max_position_embeddings"])
    tokenizer_2.pad_token = "!"  # open_clip pads with id 0, as SDXL's tokenizer_2 does
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text2,
        tokenizer=build_clip_tokenizer(text_cfg["max_position_embeddings"]),
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**configs.SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )


def build_sdxl(seed: int = 0, components: Iterable[str] | None = None) -> StableDiffusionXLPipeline:
    vae_cfg = dict(configs.SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return build_xl(configs.SDXL_UNET, configs.CLIP_L_TEXT, configs.OPENCLIP_BIGG_TEXT, vae_cfg, seed, components)


def build_tiny_xl(seed: int = 0, components: Iterable[str] | None = None) -> StableDiffusionXLPipeline:
    vae_cfg = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)
    return build_xl(TINY_XL_UNET, TINY_TEXT, TINY_XL_TEXT_2, vae_cfg, seed, components)
