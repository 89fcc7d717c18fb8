"""Training loops of the default model: an AutoencoderKL on images, then a UNet on cached latents.

Both loops are seeded and resumable: a checkpoint holds the weights, the EMA weights (UNet), the
optimizer, the step, the training time spent and the state of the one torch generator that draws
every batch and every noise tensor, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm

from common.fsutil import atomic_file
from dgq.zoo import fashion_data

log = logging.getLogger(__name__)

# Stable Diffusion's noise schedule; the inference scheduler of the pipeline uses the same betas.
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),  # three blocks: 64x64 images <-> 16x16x4 latents
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    act_fn="silu",
    sample_size=64,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 128),  # 3.4M parameters: ~1 s per batch of 64 on 2 cores
    layers_per_block=1,
    cross_attention_dim=384,  # all-MiniLM-L6-v2 hidden size
    attention_head_dim=4,  # diffusers' legacy name: the number of heads
    norm_num_groups=8,
)


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 1500
    minutes: float | None = None  # stop early, gracefully, once this much training time is spent
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-5  # on the per-element mean KL; the reconstruction term is L1 + MSE per pixel
    seed: int = 0
    checkpoint_minutes: float = 5.0


@dataclass(frozen=True)
class UNetTrainConfig:
    steps: int = 4000
    minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at `steps`
    warmup_steps: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # share of empty captions, for classifier-free guidance
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 5.0


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Clock:
    """Training time across resumes, and when the next checkpoint is due."""

    def __init__(self, spent_s: float, checkpoint_minutes: float):
        self.start = time.monotonic() - spent_s
        self.every = checkpoint_minutes * 60.0
        self.last_ckpt = time.monotonic()

    @property
    def spent_s(self) -> float:
        return time.monotonic() - self.start

    def checkpoint_due(self) -> bool:
        if time.monotonic() - self.last_ckpt >= self.every:
            self.last_ckpt = time.monotonic()
            return True
        return False


def _save(path: Path, state: dict) -> None:
    # Written atomically, so a run killed mid-write never leaves a truncated checkpoint. Only tensors,
    # numbers, strings and containers of them: loads use weights_only=True, which refuses anything a
    # pickle could run.
    with atomic_file(path) as f:
        torch.save(state, f)


# --------------------------------------------------------------------------------------------- VAE


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator):
    """(total, reconstruction, kl) for images ``x`` float32 (B, 3, 64, 64) in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return rec + kl_weight * kl, rec, kl


def train_vae(
    images: np.ndarray,
    cfg: VAETrainConfig,
    ckpt_path: Path,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[AutoencoderKL, dict]:
    """Train the AutoencoderKL on ``images`` uint8 (N, 28, 28). Returns the model and final figures."""
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, spent = 0, 0.0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        step, spent = state["step"], state["spent_s"]
        log.info("resumed VAE from %s at step %d (%.1f min spent)", ckpt_path, step, spent / 60)

    def checkpoint():
        _save(
            ckpt_path,
            dict(
                model=vae.state_dict(),
                opt=opt.state_dict(),
                generator=gen.get_state(),
                step=step,
                spent_s=clock.spent_s,
                config=asdict(cfg),
            ),
        )

    clock = _Clock(spent, cfg.checkpoint_minutes)
    vae.train()
    ema_loss = None
    bar = tqdm(total=cfg.steps, initial=step, desc="VAE", dynamic_ncols=True)
    while step < cfg.steps and (cfg.minutes is None or clock.spent_s < cfg.minutes * 60):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = fashion_data.to_model_images(images[idx.numpy()])
        loss, rec, kl = vae_loss(vae, x, cfg.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = rec.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * rec.item()
        bar.update(1)
        bar.set_postfix(rec=f"{ema_loss:.4f}", kl=f"{kl.item():.2f}")
        if on_log is not None and step % 50 == 0:
            on_log(dict(step=step, rec=ema_loss, kl=kl.item(), minutes=clock.spent_s / 60))
        if clock.checkpoint_due():
            checkpoint()
    bar.close()
    checkpoint()
    vae.eval()
    return vae, dict(steps=step, minutes=clock.spent_s / 60, rec_loss=ema_loss)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 200) -> float:
    """Mean per-image PSNR (dB, images in [0, 1]) of decode(posterior mean) against the input."""
    psnrs = []
    for i in tqdm(range(0, len(images), batch_size), desc="VAE PSNR", dynamic_ncols=True):
        x = fashion_data.to_model_images(images[i : i + batch_size])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)
        psnrs.append(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))
    return torch.cat(psnrs).mean().item()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 200):
    """Posterior mean and std of every image, float32 (N, 4, 16, 16) each (unscaled latents)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", dynamic_ncols=True):
        dist = vae.encode(fashion_data.to_model_images(images[i : i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int = 0) -> float:
    """1 / std of sampled latents, as Stable Diffusion's ``scaling_factor`` was chosen."""
    gen = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return 1.0 / z.std().item()


# -------------------------------------------------------------------------------------------- UNet


class EMA:
    """Exponential moving average of a model's parameters, with the usual short warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p, 1.0 - decay)


def train_unet(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: np.ndarray,
    caption_embeds: torch.Tensor,
    caption_index: torch.Tensor,
    scaling_factor: float,
    cfg: UNetTrainConfig,
    ckpt_path: Path,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[UNet2DConditionModel, dict]:
    """Train the UNet with epsilon prediction on cached latents; returns the EMA model and figures.

    ``latent_mean``/``latent_std``: float32 (N, 4, 16, 16), unscaled posterior of each image;
    ``labels``: int64 (N,); ``caption_embeds``: float32 (C, 16, 384), the pipeline's text embedding
    of every caption, row 0 the empty caption; ``caption_index``: int64 (10, T), the rows holding the
    T phrasings of each class.
    """
    if caption_embeds.ndim != 3 or caption_embeds.shape[-1] != UNET_CONFIG["cross_attention_dim"]:
        raise ValueError(f"caption_embeds must be (C, L, 384), got {tuple(caption_embeds.shape)}")
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_sched = DDPMScheduler(**SD_BETAS)
    labels_t = torch.as_tensor(labels)
    step, spent = 0, 0.0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        unet.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        step, spent = state["step"], state["spent_s"]
        log.info("resumed UNet from %s at step %d (%.1f min spent)", ckpt_path, step, spent / 60)

    def checkpoint():
        _save(
            ckpt_path,
            dict(
                model=unet.state_dict(),
                ema=ema.model.state_dict(),
                opt=opt.state_dict(),
                generator=gen.get_state(),
                step=step,
                spent_s=clock.spent_s,
                scaling_factor=scaling_factor,
                config=asdict(cfg),
            ),
        )
        log.info("checkpoint at step %d -> %s", step, ckpt_path)

    clock = _Clock(spent, cfg.checkpoint_minutes)
    unet.train()
    ema_loss = None
    bar = tqdm(total=cfg.steps, initial=step, desc="UNet", dynamic_ncols=True)
    while step < cfg.steps and (cfg.minutes is None or clock.spent_s < cfg.minutes * 60):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        idx = torch.randint(len(labels_t), (cfg.batch_size,), generator=gen)
        mean, std = latent_mean[idx], latent_std[idx]
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling_factor
        template = torch.randint(caption_index.shape[1], (cfg.batch_size,), generator=gen)
        rows = caption_index[labels_t[idx], template]
        rows = torch.where(torch.rand(cfg.batch_size, generator=gen) < cfg.p_uncond, 0, rows)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, caption_embeds[rows]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(unet, step)
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if on_log is not None and step % 50 == 0:
            on_log(dict(step=step, loss=ema_loss, minutes=clock.spent_s / 60))
        if clock.checkpoint_due():
            checkpoint()
    bar.close()
    checkpoint()
    return ema.model, dict(steps=step, minutes=clock.spent_s / 60, loss=ema_loss)


def load_unet_checkpoint(ckpt_path: Path, use_ema: bool = True) -> tuple[UNet2DConditionModel, dict]:
    """The (EMA) UNet of a checkpoint written by :func:`train_unet`, and its step/time/scaling factor."""
    state = torch.load(ckpt_path, weights_only=True)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(state["ema" if use_ema else "model"])
    return unet.eval(), {k: state[k] for k in ("step", "spent_s", "scaling_factor")}
