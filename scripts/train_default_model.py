"""Retrain the default ``fashion`` model (AutoencoderKL + UNet on Fashion-MNIST) and print its figures.

Stages: train the VAE, measure its reconstruction PSNR on the test set, cache the latents of the 60k
training images and the text embedding of every caption, train the UNet on them, write the weights
(UNet EMA) into ``dgq/zoo/weights/fashion`` and a sample grid into ``--out``. Checkpoints in ``--out``
make every stage resumable (``--resume``); ``--export-only`` writes weights from the latest
checkpoints of a run that is still going.

    python scripts/train_default_model.py --out outputs/fashion --vae-minutes 12 --unet-minutes 75
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from dgq.zoo import default_model, fashion_data, train

log = logging.getLogger("train_default_model")


def caption_table() -> tuple[list[str], torch.Tensor]:
    """Every caption the UNet sees: row 0 is "", then the T templates of class 0, class 1, ..."""
    captions = [""]
    index = []
    for label in range(len(fashion_data.CLASS_NAMES)):
        phrasings = fashion_data.all_captions(label)
        index.append(list(range(len(captions), len(captions) + len(phrasings))))
        captions += phrasings
    return captions, torch.tensor(index, dtype=torch.int64)


def export_weights(vae: AutoencoderKL, unet, scaling_factor: float, weights_dir: Path, unet_dtype: torch.dtype) -> None:
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(weights_dir / "vae")
    unet.to(unet_dtype).save_pretrained(weights_dir / "unet")
    unet.to(torch.float32)
    log.info("wrote weights to %s (scaling_factor %.5f, UNet in %s)", weights_dir, scaling_factor, unet_dtype)


def sample_grid(path: Path, weights_dir: Path, seeds: int, steps: int, guidance: float) -> None:
    """One row per class ("a photo of a {class}"), one column per seed."""
    pipe = default_model.build_fashion(weights_dir=weights_dir)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for label in range(len(fashion_data.CLASS_NAMES)):
        prompt = fashion_data.all_captions(label)[0]
        gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
        out = pipe(
            [prompt] * seeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=64,
            width=64,
            generator=gens,
            output_type="np",
        ).images
        rows.append(np.concatenate(list(out), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    log.info(
        "sample grid (rows: %s; %d seeds, %d steps, guidance %.1f) -> %s",
        ", ".join(fashion_data.CLASS_NAMES),
        seeds,
        steps,
        guidance,
        path,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/fashion"), help="checkpoints, caches, logs, grid")
    p.add_argument("--weights-dir", type=Path, default=default_model.WEIGHTS_DIR, help="where the final weights go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=train.VAETrainConfig.steps)
    p.add_argument("--vae-minutes", type=float, default=None, help="stop the VAE earlier after this much time")
    p.add_argument("--unet-steps", type=int, default=train.UNetTrainConfig.steps)
    p.add_argument("--unet-minutes", type=float, default=None, help="stop the UNet earlier after this much time")
    p.add_argument("--unet-lr", type=float, default=train.UNetTrainConfig.lr)
    p.add_argument("--batch-size", type=int, default=train.UNetTrainConfig.batch_size, help="UNet batch size")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--train-images", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--psnr-images", type=int, default=10000, help="test images for the VAE PSNR")
    p.add_argument("--unet-fp16", action="store_true", help="store the UNet weights in float16")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="write weights and a grid from the latest checkpoints in --out, train nothing",
    )
    p.add_argument("--grid-seeds", type=int, default=4)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    vae_ckpt, unet_ckpt = args.out / "vae.pt", args.out / "unet.pt"
    latents_path, figures_path = args.out / "latents.pt", args.out / "figures.json"
    unet_dtype = torch.float16 if args.unet_fp16 else torch.float32
    t0 = time.monotonic()

    if args.export_only:
        vae = AutoencoderKL(**train.VAE_CONFIG)
        vae.load_state_dict(torch.load(vae_ckpt, weights_only=True)["model"])
        unet, info = train.load_unet_checkpoint(unet_ckpt)
        export_weights(vae.eval(), unet, info["scaling_factor"], args.weights_dir, unet_dtype)
        log.info("exported UNet EMA of step %d (%.1f min of training)", info["step"], info["spent_s"] / 60)
        sample_grid(args.out / f"grid_step{info['step']}.png", args.weights_dir, args.grid_seeds, 25, args.guidance)
        return dict(info)

    train_images, train_labels = fashion_data.load_fashion_mnist("train")
    test_images, _ = fashion_data.load_fashion_mnist("test")
    if args.train_images is not None:
        train_images, train_labels = train_images[: args.train_images], train_labels[: args.train_images]
    figures = json.loads(figures_path.read_text()) if args.resume and figures_path.is_file() else {}

    vae_cfg = train.VAETrainConfig(
        steps=args.vae_steps, minutes=args.vae_minutes, seed=args.seed, checkpoint_minutes=args.checkpoint_minutes
    )
    vae, vae_fig = train.train_vae(
        train_images, vae_cfg, vae_ckpt, resume=args.resume, on_log=lambda d: log.debug("vae %s", d)
    )
    # A resumed run that trains no further VAE steps keeps the loss it measured before.
    vae_fig = {k: v for k, v in vae_fig.items() if v is not None}
    figures["vae"] = dict(figures.get("vae", {}), **vae_fig, params=sum(p.numel() for p in vae.parameters()))
    log.info(
        "VAE: %d steps, %.1f min, final reconstruction loss (L1+MSE) %.4f",
        figures["vae"]["steps"],
        figures["vae"]["minutes"],
        figures["vae"]["rec_loss"],
    )

    if args.resume and latents_path.is_file() and figures.get("vae", {}).get("psnr_db") is not None:
        cache = torch.load(latents_path, weights_only=True)
        log.info("reusing cached latents %s", latents_path)
    else:
        psnr = train.reconstruction_psnr(vae, test_images[: args.psnr_images])
        figures["vae"]["psnr_db"] = psnr
        figures["vae"]["psnr_images"] = min(args.psnr_images, len(test_images))
        mean, std = train.encode_latents(vae, train_images)
        cache = dict(mean=mean, std=std, scaling_factor=train.latent_scaling_factor(mean, std, args.seed))
        torch.save(cache, latents_path)
    figures["vae"]["scaling_factor"] = cache["scaling_factor"]
    log.info(
        "VAE test PSNR %.2f dB on %d images; latent scaling_factor %.5f",
        figures["vae"]["psnr_db"],
        figures["vae"]["psnr_images"],
        cache["scaling_factor"],
    )
    figures_path.write_text(json.dumps(figures, indent=2))

    captions, caption_index = caption_table()
    embeds = default_model.encode_captions(captions)
    log.info("cached %d caption embeddings %s", len(captions), tuple(embeds.shape))

    unet_cfg = train.UNetTrainConfig(
        steps=args.unet_steps,
        minutes=args.unet_minutes,
        lr=args.unet_lr,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint_minutes=args.checkpoint_minutes,
    )
    unet, unet_fig = train.train_unet(
        cache["mean"],
        cache["std"],
        train_labels,
        embeds,
        caption_index,
        cache["scaling_factor"],
        unet_cfg,
        unet_ckpt,
        resume=args.resume,
        on_log=lambda d: log.debug("unet %s", d),
    )
    figures["unet"] = dict(unet_fig, params=sum(p.numel() for p in unet.parameters()), config=vars(unet_cfg) | {})
    log.info(
        "UNet: %d steps, %.1f min, final loss %.4f (EMA of batch losses)",
        unet_fig["steps"],
        unet_fig["minutes"],
        unet_fig["loss"],
    )

    export_weights(vae, unet, cache["scaling_factor"], args.weights_dir, unet_dtype)
    sample_grid(args.out / "grid.png", args.weights_dir, args.grid_seeds, 25, args.guidance)
    figures["total_minutes"] = (time.monotonic() - t0) / 60
    figures_path.write_text(json.dumps(figures, indent=2, default=str))
    log.info("figures: %s", json.dumps(figures, default=str))
    return figures


if __name__ == "__main__":
    main()
