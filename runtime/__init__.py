"""On-device runtime (issue 6): engines and ONNX Runtime sessions behind one runner interface, the
engine builder, and the sampler loop.

Imports only onnx/onnxruntime/tensorrt, numpy/torch tensors, a diffusers scheduler and ``export.iospec``
(never ``dgq`` internals or diffusers models), so it runs on a Jetson without the calibration stack.
Nothing is implemented here yet.
"""
