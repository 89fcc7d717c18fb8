"""DGQ: Distribution-aware Group Quantization for Stable Diffusion UNets (ICLR 2025)."""

__version__ = "0.1.0"
