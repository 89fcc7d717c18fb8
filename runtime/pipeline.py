"""Text-to-image sampling over three runners: tokenizer -> text encoder -> denoise loop -> VAE decoder.

The loop is diffusers' ``StableDiffusionPipeline.__call__`` with the networks swapped for runners:
prompts padded to the tokenizer's ``model_max_length`` (longer ones truncated, with a warning that
says how many tokens were dropped), classifier-free guidance as one batch ``[uncond, cond]`` when
``guidance > 1``, latents ``randn * scheduler.init_noise_sigma`` drawn on CPU by
``torch.Generator().manual_seed(seed)`` exactly as diffusers' ``randn_tensor`` draws them for a CPU
generator, ``scale_model_input``, guidance, ``scheduler.step``. The same seed, prompt and settings
therefore give the PyTorch pipeline's image up to the backends' numerics (tests/runtime measures it).

Quantized exports whose manifest has timestep ``slots`` get one more UNet input, ``step_index``
(int64 scalar), the slot of the call's timestep: any step count and scheduler run, and a timestep that
was not calibrated uses the slot of the nearest calibrated one (:mod:`common.timesteps`, which warns
once for a timestep far outside the calibrated range). ``from_export(..., scheduler=...)`` samples
with another scheduler than the export's.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from common.constants import DEFAULT_GUIDANCE
from common.timesteps import SlotTable
from export.iospec import FeedError, NetworkSpec, read_specs
from export.manifest import ManifestError, read_manifest
from runtime.runners import (
    BackendUnavailable,
    DeviceMemoryPool,
    OnnxRuntimeRunner,
    Runner,
    TensorRTRunner,
    default_ort_providers,
    tensorrt_available,
    tensorrt_module_name,
    to_torch,
)

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
STEP_INDEX = "step_index"
UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]
XL_UNET_INPUTS = ["text_embeds", "time_ids"]
XL_TEXT_INPUTS = ["input_ids", "input_ids_2"]


@dataclass
class StageTimings:
    """Wall-clock seconds per stage of one call (device work included: runners return synchronized)."""

    text_encoder_s: float = 0.0
    unet_step_s: list[float] = field(default_factory=list)
    vae_decoder_s: float = 0.0
    total_s: float = 0.0

    @property
    def unet_median_s(self) -> float:
        return statistics.median(self.unet_step_s) if self.unet_step_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_encoder_s": self.text_encoder_s,
            "unet_step_s": list(self.unet_step_s),
            "unet_median_s": self.unet_median_s,
            "unet_total_s": sum(self.unet_step_s),
            "vae_decoder_s": self.vae_decoder_s,
            "total_s": self.total_s,
        }

    def summary(self) -> str:
        return (
            f"text encoder {self.text_encoder_s * 1e3:.1f} ms, UNet {self.unet_median_s * 1e3:.1f} ms/step "
            f"(median of {len(self.unet_step_s)}), VAE decoder {self.vae_decoder_s * 1e3:.1f} ms, "
            f"total {self.total_s:.2f} s"
        )


@dataclass
class Text2ImageOutput:
    """``images``: uint8 (N, H, W, 3), as diffusers' ``output_type="pil"`` rounds them; ``timings``; ``backend``."""

    images: np.ndarray
    timings: StageTimings
    backend: str

    def pil(self) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(a) for a in self.images]


def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class Text2ImagePipeline:
    """Stable Diffusion sampling with runners for the text encoder, UNet and VAE decoder.

    ``tokenizer``: a transformers tokenizer (the export's ``tokenizer/``); ``scheduler``: a diffusers
    scheduler (``scheduler/``); ``manifest``: the export's manifest (its ``slots`` decide whether
    the UNet takes ``step_index``). ``backend`` is a label reported with the timings.
    """

    def __init__(
        self,
        text_encoder: Runner,
        unet: Runner,
        vae_decoder: Runner,
        tokenizer: Any,
        scheduler: Any,
        manifest: Mapping[str, Any] | None = None,
        backend: str | None = None,
        tokenizer_2: Any = None,
    ):
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        self.tokenizer, self.scheduler, self.tokenizer_2 = tokenizer, scheduler, tokenizer_2
        self.manifest = dict(manifest) if manifest is not None else None
        self.backend = backend or type(unet).__name__
        self._check_contracts()

    # --- construction ----------------------------------------------------------------------------
    def _check_contracts(self) -> None:
        te, unet, vae = self.text_encoder.spec, self.unet.spec, self.vae_decoder.spec
        self.max_tokens = int(te.inputs[0].shape[1])
        if int(self.tokenizer.model_max_length) != self.max_tokens:
            raise ValueError(
                f"the tokenizer pads to {self.tokenizer.model_max_length} tokens but the text encoder "
                f"takes {self.max_tokens}; use the tokenizer saved with the export"
            )
        self.sample_name = unet.input_names[0]
        names = unet.input_names
        # SDXL: the UNet also takes the pooled text embedding and the six size conditioning values, and
        # the text encoder graph runs both towers (export.float_export.TextEncodersXLForExport).
        self.xl = "text_embeds" in names
        first = UNET_INPUTS + XL_UNET_INPUTS if self.xl else UNET_INPUTS
        if names[: len(first)] != first or set(names[len(first) :]) - {STEP_INDEX}:
            raise ValueError(
                f"UNet inputs {names} are not {', '.join(UNET_INPUTS)}[, {', '.join(XL_UNET_INPUTS)}][, step_index]"
            )
        want_te = XL_TEXT_INPUTS if self.xl else XL_TEXT_INPUTS[:1]
        if te.input_names != want_te or len(te.outputs) != len(want_te):
            raise ValueError(
                f"the text encoder takes {te.input_names} and gives {te.output_names}, but this "
                f"{'SDXL' if self.xl else 'SD'} UNet needs one that takes {want_te} and gives "
                f"{'prompt and pooled embeddings' if self.xl else 'the hidden states'}; export the pipeline's "
                "text encoder(s) together with its UNet"
            )
        if self.xl:
            if self.tokenizer_2 is None:
                raise ValueError("an SDXL export needs its second tokenizer (tokenizer_2/); re-export with assets")
            if int(self.tokenizer_2.model_max_length) != self.max_tokens:
                raise ValueError(
                    f"the second tokenizer pads to {self.tokenizer_2.model_max_length} tokens but the text encoder "
                    f"takes {self.max_tokens}; use the tokenizers saved with the export"
                )
        self.force_zeros = bool(te.metadata.get("force_zeros_for_empty_prompt", False))
        slots = (self.manifest or {}).get("slots")
        takes_step = STEP_INDEX in names
        if takes_step and slots is None:
            raise ValueError("the UNet takes step_index but no manifest with timestep slots was given")
        if slots is not None and not takes_step:
            raise ValueError(f"the manifest has {len(slots)} timestep slots but the UNet graph has no step_index input")
        self.takes_step_index = takes_step
        # step_index of a timestep: its slot, or the nearest calibrated timestep's (common.timesteps).
        self.slot_table = SlotTable(slots, "this export") if slots is not None else None
        self.vae_scale_factor = int(vae.metadata.get("vae_scale_factor", 8))

    @classmethod
    def from_export(
        cls,
        folder: str | os.PathLike,
        backend: str = "auto",
        *,
        providers: list[str] | None = None,
        optimization: str = "all",
        threads: int | None = None,
        cuda_graph: bool = False,
        verify: bool = True,
        engine_dir: str | os.PathLike | None = None,
        scheduler: Callable[[Any], Any] | None = None,
    ) -> Text2ImagePipeline:
        """Build a pipeline from an export folder (graphs, ``iospec.json``, ``tokenizer/``, ``scheduler/``,
        ``manifest.json``; TensorRT engines as ``<component>.engine`` beside the graphs).

        ``backend``: ``"tensorrt"`` (every engine present, CUDA and a TensorRT module importable),
        ``"onnxruntime"`` (``providers``, default CUDA EP when available else CPU; ``optimization``
        ``"all"``/``"off"``; ``threads``), or ``"auto"``: TensorRT when it could run, else ONNX Runtime.
        ``engine_dir``: where the engines are (default ``folder``); an engine's ``.engine.json`` (written
        by :mod:`runtime.build`) must name this export's graph and a TensorRT and GPU this process has.
        When it does not (engines built elsewhere, e.g. TensorRT-RTX engines copied to a Jetson),
        ``"tensorrt"`` raises and ``"auto"`` warns and falls back to ONNX Runtime.
        ``cuda_graph``: run the UNet engine through CUDA graphs (:class:`~runtime.runners.TensorRTRunner`).
        The choice is logged and kept in ``.backend``. ``verify`` checks every file's hash against the
        manifest (raises :class:`~export.manifest.ManifestError` for an edited folder). ``scheduler``: a
        function of the export's scheduler that returns the one to sample with (e.g.
        ``lambda s: EulerDiscreteScheduler.from_config(s.config)``, which keeps the model's betas).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        folder = Path(folder)
        manifest = read_manifest(folder, verify=verify)
        missing = [c for c in COMPONENTS if c not in manifest.get("components", [])]
        if missing:
            raise ManifestError(
                f"{folder} has no {missing} (its manifest lists {manifest.get('components')}); "
                "text-to-image needs all three networks"
            )
        specs = read_specs(folder)
        spec_slots = specs["unet"].metadata.get("slots")
        if spec_slots is not None and spec_slots != manifest["slots"]:
            # Two records of the same table (the graph's step_index selects from the recipe's slots in
            # this order): a manifest whose slots were edited would feed every step another's parameters.
            raise ManifestError(
                f"{folder}: the manifest's timestep slots differ from those the UNet graph was exported with "
                "(iospec.json); the folder was edited, re-export"
            )
        tokenizer, saved_scheduler = load_assets(folder)
        tokenizer_2 = load_tokenizer(folder / "tokenizer_2") if (folder / "tokenizer_2").is_dir() else None
        if scheduler is not None:
            saved_scheduler = scheduler(saved_scheduler)
        engine_dir = Path(engine_dir) if engine_dir is not None else folder
        engines = {c: engine_dir / f"{c}.engine" for c in COMPONENTS}
        chosen, reason = _choose_backend(backend, engines)
        if chosen == "tensorrt":
            try:
                modules = {c: _check_engine(engines[c], manifest, folder) for c in COMPONENTS}
            except ValueError as err:  # EngineCompatibilityError, EngineBuildError, ManifestError
                if backend == "tensorrt":
                    raise
                chosen, reason = "onnxruntime", f"engines present but not loadable here: {err}"
                log.warning("backend auto: falling back to ONNX Runtime; %s", reason)
        if chosen == "tensorrt":
            pool = DeviceMemoryPool()  # one scratch buffer for the three engines (they run in turn)
            runners = {
                c: TensorRTRunner(
                    engines[c], specs[c], cuda_graph=cuda_graph and c == "unet", module=modules[c], memory_pool=pool
                )
                for c in COMPONENTS
            }
            label = f"tensorrt ({modules['unet'] or tensorrt_module_name()})"
        else:
            runners = {
                c: OnnxRuntimeRunner(
                    folder / f"{c}.onnx", specs[c], providers=providers, optimization=optimization, threads=threads
                )
                for c in COMPONENTS
            }
            label = f"onnxruntime ({(providers or default_ort_providers())[0]}, optimization {optimization})"
        log.info("backend: %s (%s)", label, reason)
        pipe = cls(
            runners["text_encoder"],
            runners["unet"],
            runners["vae_decoder"],
            tokenizer,
            saved_scheduler,
            manifest=manifest,
            backend=label,
            tokenizer_2=tokenizer_2,
        )
        pipe.backend_reason = reason
        return pipe

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def runners(self) -> tuple[Runner, Runner, Runner]:
        return self.text_encoder, self.unet, self.vae_decoder

    def activate(self) -> Self:
        for r in self.runners:
            r.activate()
        return self

    def deactivate(self) -> None:
        for r in self.runners:
            r.deactivate()

    def __enter__(self) -> Self:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # --- stages ----------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], tokenizer: Any = None) -> np.ndarray:
        """int32 ids (N, max_tokens), padded to the tokenizer's ``model_max_length`` (``tokenizer``:
        default the first); longer prompts are truncated (keeping the end token, as diffusers does) with
        a warning per prompt."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="np"
        ).input_ids
        if tokenizer is not self.tokenizer:
            return ids.astype(np.int32)  # the first tokenizer's pass already warned about these prompts
        full = tokenizer(list(prompts), padding=False, truncation=False).input_ids
        for prompt, tokens in zip(prompts, full, strict=True):
            if len(tokens) > self.max_tokens:
                dropped = len(tokens) - self.max_tokens
                removed = tokenizer.decode(tokens[self.max_tokens - 1 : -1])
                log.warning(
                    "prompt truncated: %d token(s) dropped (the text encoder takes %d): %r; dropped text: %r",
                    dropped,
                    self.max_tokens,
                    prompt[:60],
                    removed,
                )
        return ids.astype(np.int32)

    def _cast(self, runner: Runner, name: str, value: torch.Tensor) -> torch.Tensor:
        return value.to(getattr(torch, runner.spec.input(name).dtype))

    def _check_shapes(self, images: int, cfg: bool, latent_hw: tuple[int, int], channels: int) -> None:
        """Refuse a request outside any network's profile before spending time on it."""
        batch = images * (2 if cfg else 1)
        feeds = {
            self.text_encoder: {
                n: _Shape((batch, self.max_tokens), "int32") for n in self.text_encoder.spec.input_names
            },
            self.unet: {
                t.name: _Shape(self._unet_shape(t, batch, latent_hw, channels), t.dtype) for t in self.unet.spec.inputs
            },
            self.vae_decoder: {
                self.vae_decoder.spec.input_names[0]: _Shape(
                    (images, channels, *latent_hw), self.vae_decoder.spec.inputs[0].dtype
                )
            },
        }
        for runner, feed in feeds.items():
            runner.spec.check_feed(feed)

    def _unet_shape(self, t: Any, batch: int, latent_hw: tuple[int, int], channels: int) -> tuple[int, ...]:
        if t.name == "sample":
            return (batch, channels, *latent_hw)
        if t.name == "encoder_hidden_states":
            return (batch, self.max_tokens, int(t.shape[2]))
        if t.name in XL_UNET_INPUTS:
            return (batch, int(t.shape[1]))
        return ()

    def latent_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]:
        """Latent (h, w) for an image size in pixels (default: the UNet profile's opt size)."""
        shape = self.unet.spec.input("sample").shape
        if size is None:
            return tuple(d if isinstance(d, int) else self.unet.spec.dims[d].opt for d in shape[2:])
        h, w = (size, size) if isinstance(size, int) else size
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ValueError(f"image size {(h, w)} must be a multiple of the VAE scale factor {f}")
        return h // f, w // f

    # --- sampling --------------------------------------------------------------------------------
    def __call__(
        self,
        prompts: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        steps: int = 25,
        guidance: float = DEFAULT_GUIDANCE,
        negative_prompt: str | Sequence[str] | None = None,
        size: int | tuple[int, int] | None = None,
    ) -> Text2ImageOutput:
        """Generate one image per prompt.

        ``negative_prompt``: None is diffusers' default, the empty prompt, except for an SDXL export whose
        pipeline sets ``force_zeros_for_empty_prompt``: zero negative embeddings, as diffusers uses.

        ``seed``: one int seeds one CPU generator for the whole batch (diffusers with one
        ``generator``); a list gives each image its own generator (diffusers with a list of
        generators; the image then does not depend on the rest of the batch). ``size``: pixels
        (int or (h, w)). Returns uint8 images (N, H, W, 3) and per-stage timings.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n = len(prompts)
        zero_negatives = negative_prompt is None and self.force_zeros
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != n:
            raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
        if isinstance(seed, (int, np.integer)):
            generator: Any = torch.Generator().manual_seed(int(seed))
        else:
            if len(seed) != n:
                raise ValueError(f"{len(seed)} seeds for {n} prompts; give one seed or one per prompt")
            generator = [torch.Generator().manual_seed(int(s)) for s in seed]
        cfg = guidance > 1.0
        latent_hw = self.latent_size(size)
        channels = int(self.unet.spec.input("sample").shape[1])
        self._check_shapes(n, cfg, latent_hw, channels)
        self.activate()
        timings = StageTimings()
        start = time.perf_counter()

        # Text encoder: [uncond, cond] in one batch, as diffusers concatenates them (zeros for uncond
        # when the SDXL pipeline says so: then only the prompts are encoded).
        texts = negatives + prompts if cfg and not zero_negatives else prompts
        names = self.text_encoder.spec.input_names
        feed = {names[0]: self.tokenize(texts)}
        if self.xl:
            feed[names[1]] = self.tokenize(texts, self.tokenizer_2)
        t0 = time.perf_counter()
        out = self.text_encoder.infer(feed)
        timings.text_encoder_s = time.perf_counter() - t0
        encoded = [to_torch(out[name]) for name in self.text_encoder.spec.output_names]
        if cfg and zero_negatives:
            encoded = [torch.cat([torch.zeros_like(e), e]) for e in encoded]
        embeds = encoded[0]

        device = torch.device(self.unet.device)
        scheduler = self.scheduler
        if _accepts(scheduler.set_timesteps, "device"):
            scheduler.set_timesteps(steps, device=device)
        else:
            scheduler.set_timesteps(steps)
        latents = _randn((n, channels, *latent_hw), generator).to(device) * scheduler.init_noise_sigma
        step_kwargs = {}
        if _accepts(scheduler.step, "eta"):
            step_kwargs["eta"] = 0.0
        if _accepts(scheduler.step, "generator"):
            step_kwargs["generator"] = generator
        embeds = self._cast(self.unet, "encoder_hidden_states", embeds.to(device))
        added = {}
        if self.xl:
            # diffusers' _get_add_time_ids with its defaults: original size = target size = the image's
            # (height, width) in pixels, crop top-left (0, 0); the same row for uncond and cond.
            h, w = (d * self.vae_scale_factor for d in latent_hw)
            rows = len(embeds)
            added = {
                "text_embeds": self._cast(self.unet, "text_embeds", encoded[1].to(device)),
                "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(rows, 1).to(device),
            }
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            feed = {
                "sample": self._cast(self.unet, "sample", model_input),
                "timestep": torch.tensor(float(t), dtype=torch.float32),
                "encoder_hidden_states": embeds,
                **added,
            }
            if self.takes_step_index:
                feed[STEP_INDEX] = torch.tensor(self.slot_table.index(float(t)), dtype=torch.int64)
            t0 = time.perf_counter()
            noise_pred = to_torch(self.unet.infer(feed)[self.unet.spec.output_names[0]])
            timings.unet_step_s.append(time.perf_counter() - t0)
            noise_pred = noise_pred.to(device, torch.float32)
            if cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

        vae_in = self.vae_decoder.spec.input_names[0]
        t0 = time.perf_counter()
        out = self.vae_decoder.infer({vae_in: self._cast(self.vae_decoder, vae_in, latents)})
        timings.vae_decoder_s = time.perf_counter() - t0
        images = to_torch(out[self.vae_decoder.spec.output_names[0]]).float().cpu()
        timings.total_s = time.perf_counter() - start
        return Text2ImageOutput(to_uint8(images), timings, self.backend)

    @property
    def max_images_per_call(self) -> int:
        """The largest batch every profile allows with classifier-free guidance on."""

        def most(spec: NetworkSpec) -> int:
            return spec.dims["batch"].max if "batch" in spec.dims else 1

        return max(1, min(most(self.text_encoder.spec) // 2, most(self.unet.spec) // 2, most(self.vae_decoder.spec)))


@dataclass(frozen=True)
class _Shape:
    """Stands in for an array in ``NetworkSpec.check_feed`` (it reads only ``shape`` and ``dtype``)."""

    shape: tuple[int, ...]
    dtype: str


def _randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """diffusers' ``randn_tensor`` for CPU generators: one draw of ``shape``, or one (1, ...) draw per generator."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (N, 3, H, W) in about [-1, 1] -> uint8 (N, H, W, 3), rounded as diffusers' image "
    "processor does."""
    pixels = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (pixels * 255).round().astype(np.uint8)


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A tokenizer saved with an export (transformers ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_assets(folder: str | os.PathLike) -> tuple[Any, Any]:
    """The export's tokenizer (transformers ``AutoTokenizer``) and scheduler (its diffusers class)."""
    folder = Path(folder)
    import diffusers
    from transformers import AutoTokenizer

    for sub in ("tokenizer", "scheduler"):
        if not (folder / sub).is_dir():
            raise ManifestError(f"{folder} has no {sub}/ (exported without assets?); re-export with assets")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    config_path = folder / "scheduler" / "scheduler_config.json"
    class_name = json.loads(config_path.read_text()).get("_class_name")
    scheduler_cls = getattr(diffusers, str(class_name), None)
    if scheduler_cls is None or not issubclass(scheduler_cls, diffusers.SchedulerMixin):
        raise ManifestError(
            f"{config_path}: {class_name!r} is not a diffusers scheduler in diffusers {diffusers.__version__}"
        )
    return tokenizer, scheduler_cls.from_pretrained(str(folder / "scheduler"))


def _check_engine(engine: Path, manifest: Mapping[str, Any], folder: Path) -> str | None:
    """Refuse an engine built from another graph or for another TensorRT/GPU; returns its TensorRT module.

    Engines without the builder's ``.engine.json`` are accepted with a warning (nothing to compare).
    """
    from runtime.build import check_engine_loadable

    meta_path = Path(f"{engine}.json")
    if not meta_path.is_file():
        log.warning(
            "%s has no %s; cannot check it was built from this export (build with scripts/build_engine.py)",
            engine.name,
            meta_path.name,
        )
        return None
    meta = json.loads(meta_path.read_text())
    onnx_name = f"{meta.get('component', engine.stem)}.onnx"
    want = manifest["files"].get(onnx_name, {}).get("sha256")
    if meta.get("export", {}).get("onnx_sha256") != want:
        raise ManifestError(
            f"{engine} was built from another {onnx_name} than the one in {folder}; rebuild the engines"
        )
    return check_engine_loadable(meta)


def _choose_backend(backend: str, engines: Mapping[str, Path]) -> tuple[str, str]:
    """(``"tensorrt"`` | ``"onnxruntime"``, why)."""
    present = [c for c, p in engines.items() if p.is_file()]
    missing = [p.name for c, p in engines.items() if c not in present]
    if backend == "tensorrt":
        if missing:
            raise FileNotFoundError(
                f"--backend tensorrt: no engine file(s) {missing} in {next(iter(engines.values())).parent} "
                "(build them first)"
            )
        if tensorrt_module_name() is None:
            raise BackendUnavailable("backend tensorrt: neither tensorrt nor tensorrt_rtx is installed")
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend tensorrt: TensorRT engines need a CUDA GPU, and torch sees none")
        return "tensorrt", "requested"
    if backend == "onnxruntime":
        return "onnxruntime", "requested"
    if missing:
        return "onnxruntime", ("no TensorRT engines" if not present else f"engines incomplete, missing {missing}")
    if not tensorrt_available():
        return "onnxruntime", "engines present but no CUDA GPU or TensorRT module here"
    return "tensorrt", "engines present and CUDA + TensorRT available"


__all__ = [
    "BackendUnavailable",
    "FeedError",
    "StageTimings",
    "Text2ImageOutput",
    "Text2ImagePipeline",
    "load_assets",
    "to_uint8",
]
