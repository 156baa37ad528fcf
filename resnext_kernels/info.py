"""`python -m resnext_kernels.info`: what this installation of resnext_kernels was built with."""

from __future__ import annotations

import platform

import torch

from . import _build_info


def cpu_isa() -> str:
    """The CPU code path the kernels' runtime dispatch selects on this machine (GCC target_clones picks
    x86-64-v4 when AVX-512 F/BW/CD/DQ/VL are present, x86-64-v3 for AVX2+FMA+BMI, else baseline)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"portable C++ ({platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = set(flags)
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "x86-64-v4 (AVX-512)"
    if {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"} <= flags:
        return "x86-64-v3 (AVX2 + FMA)"
    return "x86-64 baseline (SSE2)"


def emulator_built() -> bool:
    try:
        from . import _emu  # noqa: F401
    except ImportError:
        return False
    return True


def summary() -> dict[str, object]:
    return {
        "resnext_kernels CUDA kernels": "yes" if _build_info.WITH_CUDA else "no (CPU-only build)",
        "CUDA architectures": _build_info.CUDA_ARCH_LIST or "-",
        "nvcc": _build_info.NVCC_VERSION or "-",
        "CUDA-on-CPU emulator build": "yes" if emulator_built() else "no",
        "CPU kernel ISA path": cpu_isa(),
        "CPU threads": torch.get_num_threads(),
        "torch (built against)": _build_info.TORCH_VERSION,
        "torch (running)": torch.__version__,
        "torch CUDA": torch.version.cuda or "-",
        "CUDA device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def main() -> None:
    import resnext_kernels  # noqa: F401  (loads the operator library: fails loudly if it is broken)
    for key, value in summary().items():
        print(f"{key:30s} {value}")


if __name__ == "__main__":
    main()
