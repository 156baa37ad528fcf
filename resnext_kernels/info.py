"""`python -m resnext_kernels.info`: what this installation of resnext_kernels was built with."""

from __future__ import annotations

import torch

from . import _build_info, ops


_ISA_NAMES = {"avx512": "x86-64-v4 (AVX-512)", "avx2": "x86-64-v3 (AVX2 + FMA)", "baseline": "portable C++"}


def cpu_isa() -> str:
    """The CPU code path the kernels run on this machine (the detector of csrc/cpu/isa.h), and the cap
    RESNEXT_KERNELS_CPU_ISA puts on it."""
    config = ops.cpu_config()
    isa = _ISA_NAMES[config.isa]
    if config.isa != config.supported_isa:
        isa += f", capped by RESNEXT_KERNELS_CPU_ISA (the CPU has {_ISA_NAMES[config.supported_isa]})"
    return isa


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
        "CPU vendor": ops.cpu_config().vendor,
        "CPU native bfloat16": "yes" if ops.cpu_config().native_bf16 else "no",
        "CPU oneDNN routes": "on" if ops.cpu_config().aten_routes else "off (RESNEXT_KERNELS_CPU_ATEN_ROUTES)",
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
