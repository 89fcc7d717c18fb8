"""The yardstick: one evaluation of a candidate pipeline against its float reference.

Both pipelines get the same prompts, per-image seeds, step count and guidance. Measured:

(a) noise-prediction fidelity per UNet call (one per scheduler step; PNDM makes one extra): the
    candidate UNet on the reference trajectory's recorded inputs ("same_inputs"), and the reference
    UNet on the candidate's own trajectory ("candidate_trajectory"); SQNR (energies pooled over all
    samples of the step, including both classifier-free-guidance halves), mean cosine, MSE;
(b) paired image fidelity: PSNR and SSIM of each candidate image against the reference image of the
    same prompt and seed, on images in [0, 1] (data range 1);
(c) FID of each against real images (when given) and of the candidate against the reference;
(d) judge accuracy against the prompted labels, and the label-flip rate between the reference and
    candidate images of the same prompt and seed.

A candidate is any object with the diffusers pipeline call signature whose ``.unet`` is an
``nn.Module`` (for (a)); the candidate may be the reference object itself.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.constants import DEFAULT_GUIDANCE
from dgq import distributed
from dgq.eval import metrics
from dgq.eval.capture import UNetCall, record_unet_calls, replay

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class YardstickConfig:
    """How to sample and what to measure. Every (prompt, seed) pair is one image."""

    seeds: tuple[int, ...] = (0,)
    steps: int = 25
    guidance: float = DEFAULT_GUIDANCE
    size: int | None = None  # pixels; None: the pipeline's default
    batch_size: int = 8
    noise_fidelity: bool = True
    fid: bool = True
    judge: bool = True
    progress: bool = True

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")


@dataclass
class Samples:
    """The evaluated images, in sample order (prompt-major, then seed)."""

    prompts: list[str]
    labels: list[int | None]
    seeds: list[int]
    reference: torch.Tensor  # float32 (N, 3, H, W) in [-1, 1]
    candidate: torch.Tensor


@dataclass
class YardstickResult:
    results: dict[str, Any]
    samples: Samples = field(repr=False)


class _StepStats:
    """Per-UNet-call metrics of every row (CFG halves included), pooled over batches."""

    def __init__(self):
        self.timesteps: list[float] = []
        self.rows: list[dict[str, list[torch.Tensor]]] = []  # per call index: metric -> per-batch tensors

    def add(self, calls: list[UNetCall], outputs: list[torch.Tensor], reference_is_recorded: bool) -> None:
        if self.rows and len(calls) != len(self.rows):
            raise RuntimeError(f"{len(calls)} UNet calls in this batch, {len(self.rows)} in the previous ones")
        if not self.rows:
            self.timesteps = [c.timestep for c in calls]
            self.rows = [{"signal": [], "error": [], "cosine": [], "mse": []} for _ in calls]
        for row, call, out in zip(self.rows, calls, outputs, strict=True):
            ref, test = (call.output, out) if reference_is_recorded else (out, call.output)
            signal, error = metrics.energies(ref, test, per_sample=True)
            row["signal"].append(signal)
            row["error"].append(error)
            row["cosine"].append(metrics.cosine(ref, test, per_sample=True))
            row["mse"].append(metrics.mse(ref, test, per_sample=True))

    def extend(self, other: _StepStats) -> None:
        """Append ``other``'s batches after this one's (the batches of another process, in order)."""
        if not other.rows:
            return
        if self.rows and len(other.rows) != len(self.rows):
            raise RuntimeError(f"{len(other.rows)} UNet calls per batch there, {len(self.rows)} here")
        if not self.rows:
            self.timesteps = list(other.timesteps)
            self.rows = [{k: [] for k in row} for row in other.rows]
        for row, theirs in zip(self.rows, other.rows, strict=True):
            for k, v in theirs.items():
                row[k].extend(v)

    def summary(self) -> dict[str, Any]:
        cat = [{k: torch.cat(v) for k, v in row.items()} for row in self.rows]
        signal = torch.stack([r["signal"].sum() for r in cat])
        error = torch.stack([r["error"].sum() for r in cat])
        per_step = metrics.energy_ratio_db(signal, error)
        return {
            "timesteps": self.timesteps,
            "sqnr_db": per_step.tolist(),
            "cosine": [float(r["cosine"].mean()) for r in cat],
            "mse": [float(r["mse"].mean()) for r in cat],
            "sqnr_db_pooled": metrics.energy_ratio_db(float(signal.sum()), float(error.sum())),
            "sqnr_db_worst_step": float(per_step.min()),
        }


def _to_images(images: Any) -> torch.Tensor:
    """A pipeline's ``.images`` (tensor ``(N, 3, H, W)``, numpy ``(N, H, W, 3)`` or PIL list, all in
    [0, 1] / uint8) as ``float32 (N, 3, H, W)`` in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    elif isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"))) for im in images]).permute(0, 3, 1, 2)
        x = x.float() / 255
    else:
        raise TypeError(f"cannot read pipeline images of type {type(images).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected pipeline images (N, 3, H, W), got {tuple(x.shape)}")
    return x.clamp(0, 1) * 2 - 1


def _pipe_device(pipe: Any) -> torch.device:
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, torch.nn.Module):
        return next(unet.parameters()).device
    return torch.device("cpu")


def _call(pipe: Any, prompts: list[str], seeds: list[int], config: YardstickConfig) -> torch.Tensor:
    kwargs = dict(height=config.size, width=config.size) if config.size else {}
    out = pipe(
        prompts,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],  # one per image: batch-independent
        output_type="pt",
        **kwargs,
    )
    return _to_images(out.images)


def generate_images(
    pipe: Any, prompts: Sequence[str], config: YardstickConfig
) -> tuple[torch.Tensor, list[str], list[int]]:
    """Images ``float32 (N, 3, H, W)`` in [-1, 1] for every (prompt, seed) pair, prompt-major, with
    the per-sample prompts and seeds; no recording (for evaluating one pipeline alone)."""
    pairs = [(p, s) for p in prompts for s in config.seeds]
    images = []
    starts = range(0, len(pairs), config.batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not config.progress):
        chunk = pairs[start : start + config.batch_size]
        images.append(_call(pipe, [p for p, _ in chunk], [s for _, s in chunk], config))
    return torch.cat(images), [p for p, _ in pairs], [s for _, s in pairs]


def _warn_on_scheduler_mismatch(reference: Any, candidate: Any) -> None:
    a, b = getattr(reference, "scheduler", None), getattr(candidate, "scheduler", None)
    if a is None or b is None or a is b:
        return
    if type(a) is not type(b) or dict(a.config) != dict(b.config):
        log.warning(
            "reference and candidate schedulers differ (%s vs %s); numbers mix scheduler and model effects",
            type(a).__name__,
            type(b).__name__,
        )


def sample_pairs(
    reference: Any, candidate: Any, prompts: Sequence[str], config: YardstickConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None, list[str], list[int]] | None:
    """Generate every (prompt, seed) image with both pipelines; with ``config.noise_fidelity``, also
    the per-step noise-prediction metrics. Returns (reference images, candidate images, noise
    metrics or None, per-sample prompts, per-sample seeds)."""
    if config.noise_fidelity:
        for name, pipe in (("reference", reference), ("candidate", candidate)):
            if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
                raise TypeError(
                    f"noise fidelity needs the {name} pipeline's .unet to be an nn.Module; "
                    "wrap other backends in one or set noise_fidelity=False"
                )
    pairs = [(p, s) for p in prompts for s in config.seeds]
    ref_dev, cand_dev = _pipe_device(reference), _pipe_device(candidate)
    starts = list(range(0, len(pairs), config.batch_size))
    # Several processes (dgq.distributed): each samples its share of the batches; rank 0 then holds all
    # of them in batch order, so the numbers are a single process's (the other ranks return None).
    shard = distributed.current()
    mine = shard.take(list(range(len(starts))), f"batches of {config.batch_size} samples")
    done = []
    for b in tqdm(mine, desc="yardstick", unit="batch", disable=not (config.progress and shard.is_main)):
        chunk = pairs[starts[b] : starts[b] + config.batch_size]
        bp, bs = [p for p, _ in chunk], [s for _, s in chunk]
        same, traj = _StepStats(), _StepStats()
        if not config.noise_fidelity:
            done.append((b, _call(reference, bp, bs, config), _call(candidate, bp, bs, config), same, traj))
            continue
        with record_unet_calls(reference.unet) as ref_calls:
            ref_image = _call(reference, bp, bs, config)
        same.add(ref_calls, [replay(candidate.unet, c, cand_dev) for c in ref_calls], reference_is_recorded=True)
        del ref_calls
        with record_unet_calls(candidate.unet) as cand_calls:
            cand_image = _call(candidate, bp, bs, config)
        traj.add(cand_calls, [replay(reference.unet, c, ref_dev) for c in cand_calls], reference_is_recorded=False)
        del cand_calls
        done.append((b, ref_image, cand_image, same, traj))
    parts = distributed.gather_object(done)  # on rank 0 only: the images of the whole evaluation
    if parts is None:
        return None
    done = sorted((item for part in parts for item in part), key=lambda item: item[0])
    same, traj = _StepStats(), _StepStats()
    for _, _, _, s, t in done:
        same.extend(s)
        traj.extend(t)
    noise = {"same_inputs": same.summary(), "candidate_trajectory": traj.summary()} if config.noise_fidelity else None
    ref_images = torch.cat([r for _, r, _, _, _ in done])
    cand_images = torch.cat([c for _, _, c, _, _ in done])
    return ref_images, cand_images, noise, [p for p, _ in pairs], [s for _, s in pairs]


def _fid_section(ref: torch.Tensor, cand: torch.Tensor, real: torch.Tensor | None, progress: bool) -> dict[str, Any]:
    from dgq.eval.fid import fid_from_features, inception_features, load_inception

    if len(ref) < 2:
        raise ValueError("FID needs at least 2 images per set; add prompts or seeds, or turn FID off")
    model = load_inception()
    f_ref = inception_features(ref, model, progress=progress)
    # Identical images have identical features (a self-check, or a lossless backend): skip the work.
    f_cand = f_ref if torch.equal(ref, cand) else inception_features(cand, model, progress=progress)
    out: dict[str, Any] = {"num_generated": len(ref), "candidate_vs_reference": fid_from_features(f_cand, f_ref)}
    if real is not None:
        f_real = inception_features(real, model, progress=progress)
        out.update(
            num_real=len(real),
            reference_vs_real=fid_from_features(f_ref, f_real),
            candidate_vs_real=fid_from_features(f_cand, f_real),
        )
    return out


def _judge_section(
    ref: torch.Tensor, cand: torch.Tensor, labels: list[int | None]
) -> tuple[dict[str, Any], list, list]:
    from dgq.eval.judge import classify, load_card, load_judge

    judge = load_judge()
    ref_pred, _ = classify(ref, judge)
    cand_pred, _ = classify(cand, judge)
    known = torch.tensor([lab is not None for lab in labels])
    target = torch.tensor([-1 if lab is None else lab for lab in labels])
    n = int(known.sum())
    out = {
        "judge_test_accuracy": load_card().test_accuracy,
        "num_labelled": n,
        "reference_accuracy": float((ref_pred == target)[known].float().mean()) if n else None,
        "candidate_accuracy": float((cand_pred == target)[known].float().mean()) if n else None,
        "flip_rate": float((ref_pred != cand_pred).float().mean()),
    }
    return out, ref_pred.tolist(), cand_pred.tolist()


def evaluate(
    reference: Any,
    candidate: Any,
    prompts: Sequence[tuple[str, int | None]],
    config: YardstickConfig = YardstickConfig(),
    real_images: torch.Tensor | None = None,
) -> YardstickResult | None:
    """Evaluate ``candidate`` against ``reference`` on ``prompts`` (``(prompt, label or None)``).

    ``real_images``: ``float (M, 3, H, W)`` in [-1, 1] for FID against real data (optional).
    Results are deterministic for deterministic pipelines (same seeds, same numbers). Under several
    processes (``torchrun`` / ``accelerate launch``) the sampling is shared and rank 0 scores and
    returns the result, with the numbers of a single process; the other ranks return None.
    """
    if not prompts:
        raise ValueError("no prompts")
    _warn_on_scheduler_mismatch(reference, candidate)
    texts = [p for p, _ in prompts]
    sampled = sample_pairs(reference, candidate, texts, config)
    if sampled is None:  # not rank 0 of several processes
        return None
    ref, cand, noise, sample_prompts, sample_seeds = sampled
    sample_labels = [lab for _, lab in prompts for _ in config.seeds]
    psnr = metrics.psnr(ref, cand, data_range=2.0, per_sample=True)
    # SSIM depends on absolute levels: score it on [0, 1] images like every published SSIM.
    ssim = metrics.ssim((ref + 1) / 2, (cand + 1) / 2, data_range=1.0, per_sample=True)
    results: dict[str, Any] = {
        "config": asdict(config) | {"num_prompts": len(prompts), "num_samples": len(ref)},
        "noise": noise,
        "image": {
            "psnr_db": metrics.psnr(ref, cand, data_range=2.0),
            "psnr_db_per_sample": metrics.summarize(psnr),
            "ssim": metrics.summarize(ssim),
        },
        "fid": _fid_section(ref, cand, real_images, config.progress) if config.fid else None,
    }
    ref_pred = cand_pred = [None] * len(ref)
    if config.judge:
        results["judge"], ref_pred, cand_pred = _judge_section(ref, cand, sample_labels)
    else:
        results["judge"] = None
    results["samples"] = [
        {
            "prompt": p,
            "label": lab,
            "seed": s,
            "psnr_db": float(a),
            "ssim": float(b),
            "reference_judge": r,
            "candidate_judge": c,
        }
        for p, lab, s, a, b, r, c in zip(
            sample_prompts, sample_labels, sample_seeds, psnr, ssim, ref_pred, cand_pred, strict=True
        )
    ]
    return YardstickResult(results, Samples(sample_prompts, sample_labels, sample_seeds, ref, cand))


def format_table(results: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`evaluate`'s results."""

    def f(x: Any, fmt: str = ".2f") -> str:
        if x is None:
            return "-"
        return "inf" if isinstance(x, float) and math.isinf(x) else format(x, fmt)

    rows = [("samples", str(results["config"]["num_samples"]))]
    noise = results.get("noise")
    if noise:
        for key, name in (("same_inputs", "same inputs"), ("candidate_trajectory", "cand. trajectory")):
            n = noise[key]
            value = f"{f(n['sqnr_db_pooled'])} (worst step {f(n['sqnr_db_worst_step'])})"
            rows.append((f"noise SQNR dB, {name}", value))
        rows.append(("noise cosine, same inputs (min step)", f(min(noise["same_inputs"]["cosine"]), ".5f")))
    img = results["image"]
    rows.append(("image PSNR dB (pooled / median)", f"{f(img['psnr_db'])} / {f(img['psnr_db_per_sample']['median'])}"))
    rows.append(("image SSIM (mean / min)", f"{f(img['ssim']['mean'], '.4f')} / {f(img['ssim']['min'], '.4f')}"))
    fid = results.get("fid")
    if fid:
        rows.append(("FID candidate vs reference", f(fid["candidate_vs_reference"])))
        if "reference_vs_real" in fid:
            value = f"{f(fid['reference_vs_real'])} / {f(fid['candidate_vs_real'])}"
            rows.append(("FID vs real (reference / candidate)", value))
    judge = results.get("judge")
    if judge:
        rows.append(
            (
                "judge accuracy (reference / candidate)",
                f"{f(judge['reference_accuracy'], '.3f')} / {f(judge['candidate_accuracy'], '.3f')}",
            )
        )
        rows.append(("label flip rate", f(judge["flip_rate"], ".3f")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_jsonable(value: Any) -> Any:
    """``results`` with non-finite floats as the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _short_name(names: Sequence[str], label: int | None) -> str:
    if label is None:
        return "?"
    return names[label] if 0 <= label < len(names) else str(label)


def write_report(result: YardstickResult, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write ``results.json``, ``summary.txt``, ``sqnr_per_step.png`` (with noise metrics) and
    ``pairs.png`` (reference over candidate images) to ``out_dir``; returns their paths."""
    from common.fsutil import atomic_file
    from dgq.eval.plots import plot_pairs, plot_sqnr_per_step

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "summary": out_dir / "summary.txt"}
    with atomic_file(paths["json"], "w") as f:
        json.dump(to_jsonable(result.results), f, indent=2, allow_nan=False)
        f.write("\n")
    with atomic_file(paths["summary"], "w") as f:
        f.write(format_table(result.results) + "\n")
    if result.results.get("noise"):
        paths["sqnr_plot"] = plot_sqnr_per_step(result.results["noise"], out_dir / "sqnr_per_step.png", title)
    names = _class_names()
    captions = []
    for sample in result.results["samples"]:
        line = f"s{sample['seed']} {_short_name(names, sample['label'])}"
        if sample["reference_judge"] is not None:
            ref, cand = sample["reference_judge"], sample["candidate_judge"]
            line += f"\n{_short_name(names, ref)}" + ("" if ref == cand else f" -> {_short_name(names, cand)}")
        captions.append(line)
    paths["pairs"] = plot_pairs(result.samples.reference, result.samples.candidate, captions, out_dir / "pairs.png")
    return paths


def _class_names() -> tuple[str, ...]:
    from dgq.eval.judge import load_card

    try:
        return load_card().config.class_names
    except FileNotFoundError:
        return ()
