"""On-device runtime: engines and ONNX Runtime sessions behind one runner interface, the
engine builder, and the sampler loop.

Imports only onnx/onnxruntime/tensorrt, numpy/torch tensors, a diffusers scheduler, ``common`` and
``export.iospec``/``export.manifest`` (never ``dgq``, directly or through ``export``, nor diffusers models),
so it runs on a Jetson without the calibration stack.

- :mod:`runtime.runners`: ``Runner`` (activate / infer / deactivate, a context manager) with the
  backends ``OnnxRuntimeRunner``, ``TorchRunner`` and ``TensorRTRunner`` (tensorrt or tensorrt_rtx,
  imported only on activation).
- :mod:`runtime.pipeline`: ``Text2ImagePipeline`` (tokenizer -> text encoder -> scheduler loop -> VAE
  decoder, per-stage timings) and ``Text2ImagePipeline.from_export(folder, backend=...)``.
"""
