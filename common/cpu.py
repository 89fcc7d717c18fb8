"""What the CPU offers that decides ONNX Runtime's integer kernels (and so every CPU speed figure)."""

from __future__ import annotations

from pathlib import Path

# x86 feature flags behind ONNX Runtime's u8 x s8 kernel choice (AVX2, AVX512, VNNI, AMX).
KERNEL_FLAGS = ("avx512_vnni", "avx_vnni", "amx", "avx2", "avx512f")


def cpu_flags() -> list[str]:
    """The ``KERNEL_FLAGS`` this machine's CPU reports (Linux ``/proc/cpuinfo``), sorted; [] where
    that file is not there (other systems, ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(KERNEL_FLAGS))
