"""The yardstick: how close a candidate pipeline (quantized, simulated, other backend) comes to its
float reference, and how good either is against real data.

Modules: ``metrics`` (SQNR, cosine, MSE, PSNR, SSIM), ``fid`` (offline TF-FID Inception-v3),
``judge`` (a Fashion-MNIST classifier for text-image alignment), ``capture`` (UNet call capture
and replay), ``yardstick`` (the one evaluation entry), ``data`` (default prompts, real images),
``plots``, ``cli`` (``dgq eval``).
Import the modules directly; this package imports nothing heavy.
"""
