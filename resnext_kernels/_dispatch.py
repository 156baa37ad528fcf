"""The dispatch decision of the fused op: which path a call takes ("cpu", "cuda" or "aten") and why.

Which kernel runs, with which parameters, and where the training backward takes its gradients from is the C++
planners' answer (torch.ops.resnext_kernels._plan_conv for CPU, csrc/cpu/conv_plan.h; _plan_cuda_conv for CUDA,
csrc/cuda/cuda_plan.h): the kernels dispatch on the same plans, so explain() names what runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from . import _build_info, _cpu_backend
from ._common import out_pixels, suggest_memory_format

FORCE_ATEN_ENV = "RESNEXT_KERNELS_FORCE_ATEN"
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_force = threading.local()
_emulate = threading.local()


class CpuConfig(NamedTuple):
    """The CPU as the kernels see it (csrc/cpu/isa.h): the ISA they run (``"avx512"``, ``"avx2"`` or
    ``"baseline"``, capped by ``RESNEXT_KERNELS_CPU_ISA``), the best the CPU has, its vendor, whether it multiplies
    bfloat16 natively, and whether the oneDNN routes are on (``RESNEXT_KERNELS_CPU_ATEN_ROUTES``)."""

    isa: str
    supported_isa: str
    vendor: str
    native_bf16: bool
    aten_routes: bool


@functools.lru_cache(maxsize=None)
def cpu_config() -> CpuConfig:
    return CpuConfig(*torch.ops.resnext_kernels._cpu_config())


cpu_config()  # at import: an unknown RESNEXT_KERNELS_CPU_* value is an error now, not at the first call


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which implementation a call runs (``"cpu"``, ``"cuda"`` or ``"aten"``) and why.

    For the fused paths, :func:`explain` also names the kernel (``kernel``, e.g. ``"winograd_f4x4"``; the profiler
    shows its scope ``resnext_kernels::<kernel>``), its parameters, and where the convolution's gradients come from
    when autograd records the call (``data_grad``, ``weight_grad``, e.g. ``"dgrad_lanes"``, ``"wgrad_aten"``).
    ``backend`` is the run-time choice for the problem: ``"ours"`` (the kernel named), the library path measured
    faster (CUDA: ``"cudnn"``, cuDNN and ATen's BatchNorm, scope ``resnext_kernels::cudnn``; CPU: ``"aten"``, ATen's
    conv2d (oneDNN) + batch_norm + relu, scope ``resnext_kernels::aten``), or None before the first call times them
    (``RESNEXT_KERNELS_CUDA_BACKEND`` / ``RESNEXT_KERNELS_CPU_BACKEND`` force one).
    """

    path: str
    reason: str
    kernel: str | None = None
    params: Mapping[str, int] = dataclasses.field(default_factory=dict, hash=False)
    data_grad: str | None = None
    weight_grad: str | None = None
    backend: str | None = None

    @property
    def fused(self) -> bool:
        return self.path != "aten"


@contextlib.contextmanager
def _thread_flag(flag: threading.local, enabled: bool) -> Iterator[None]:
    """Sets ``flag.enabled`` in this thread for the block, then restores it."""
    previous = getattr(flag, "enabled", False)
    flag.enabled = enabled
    try:
        yield
    finally:
        flag.enabled = previous


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Within the block (in this thread), every fused op runs the ATen reference sequence instead."""
    with _thread_flag(_force, enabled):
        yield


def reference_forced() -> str | None:
    if getattr(_force, "enabled", False):
        return "forced by resnext_kernels.ops.force_reference()"
    if os.environ.get(FORCE_ATEN_ENV, "0") not in ("", "0"):
        return f"forced by the environment variable {FORCE_ATEN_ENV}"
    return None


@contextlib.contextmanager
def emulate_cuda(enabled: bool = True) -> Iterator[None]:
    """Within the block (in this thread), fused ops on CPU tensors run the CUDA path under the CUDA-on-CPU emulator
    (``torch.ops.resnext_kernels_emu``): the CUDA planner's decision, the CUDA host launchers and kernels, their
    autograd formulas. See resnext_kernels.emulator.cuda_on_cpu."""
    with _thread_flag(_emulate, enabled):
        yield


def emulating(input: Tensor) -> bool:
    """Whether a call on ``input`` runs the emulated CUDA path (emulate_cuda() is on and the tensor is on the CPU)."""
    return getattr(_emulate, "enabled", False) and input.device.type == "cpu"


def op_namespace(input: Tensor):
    """The op library a call on ``input`` runs: torch.ops.resnext_kernels, or the emulated CUDA one."""
    if emulating(input):
        from . import emulator  # noqa: F401  (registers torch.ops.resnext_kernels_emu, its fakes and autograd)
        return torch.ops.resnext_kernels_emu
    return torch.ops.resnext_kernels


class _Plan(NamedTuple):
    """A planner op's answer (torch.ops.resnext_kernels._plan_conv / _plan_cuda_conv)."""

    path: str
    reason: str
    params: tuple[tuple[str, int], ...]
    data_grad: str
    weight_grad: str
    grads_reason: str


@functools.lru_cache(maxsize=4096)
def _plan_cached(device: str, input_size: tuple[int, ...], weight_size: tuple[int, ...], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int, dtype: torch.dtype, training: bool,
                 deterministic: bool, allow_tf32: bool) -> _Plan:
    """The planner's answer; deterministic and allow_tf32 are part of the key because the plans read them."""
    args = (list(input_size), list(weight_size), list(stride), list(padding), list(dilation), groups, dtype)
    if device == "cpu":
        r = torch.ops.resnext_kernels._plan_conv(*args, "training" if training else "inference")
    else:
        r = torch.ops.resnext_kernels._plan_cuda_conv(*args, training)
    return _Plan(r[0], r[1], tuple(zip(r[2], r[3])), r[4], r[5], r[6])


@torch.compiler.assume_constant_result
def plan(device: str, input_size: tuple[int, ...], weight_size: tuple[int, ...], stride: tuple[int, int],
          padding: tuple[int, int], dilation: tuple[int, int], groups: int, dtype: torch.dtype,
          training: bool) -> _Plan:
    """The C++ planner's plan (cached per arguments); under torch.compile a constant of the trace."""
    return _plan_cached(device, input_size, weight_size, stride, padding, dilation, groups, dtype, training,
                        torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32)


def _plan_sizes(input: Tensor, weight: Tensor, exact: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The sizes to plan with. Under torch.compile the weight's are specialized (a layer's weight does not change
    shape), and the input's too where ``exact``; otherwise the batch and image sizes are left unknown (-1), which
    the CUDA planner treats as the smallest valid ones: its size-dependent limits (2^31 output tiles) are beyond any
    GPU's memory, and the launcher still checks them."""
    if not torch.compiler.is_compiling():
        return tuple(input.shape), tuple(weight.shape)
    from torch.fx.experimental.symbolic_shapes import guard_scalar
    weight_size = tuple(guard_scalar(s) for s in weight.shape)
    if exact:
        return tuple(guard_scalar(s) for s in input.shape), weight_size
    return (-1, guard_scalar(input.shape[1]), -1, -1), weight_size


def _device_plan(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, training: bool, exact: bool) -> _Plan:
    input_size, weight_size = _plan_sizes(input, weight, exact)
    device = "cuda" if emulating(input) else input.device.type
    return plan(device, input_size, weight_size, stride, padding, dilation, groups, input.dtype, training)


def decide(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int, training: bool, requires_grad: bool | None, detail: bool,
            relu: bool = True) -> Decision:
    """resnext_kernels.ops.explain for checked arguments; without ``detail`` only the path and the reason's first part (what the
    op itself needs: on CPU no planner call, on CUDA the planner's coverage rule)."""
    forced = reference_forced()
    if forced:
        return Decision("aten", forced)
    device = "cuda" if emulating(input) else input.device.type
    conv_plan = None
    if device == "cpu":
        if input.dtype not in CPU_DTYPES:
            return Decision("aten", f"the CPU kernels cover float32, float64 and bfloat16, not {input.dtype}")
    elif device == "cuda":
        if not _build_info.WITH_CUDA and not emulating(input):
            return Decision("aten", "resnext_kernels was built without CUDA kernels "
                                    "(see `python -m resnext_kernels.info`)")
        if input.dtype not in CUDA_DTYPES:
            return Decision("aten", f"the CUDA kernels cover float16, bfloat16, float32 and float64, "
                                    f"not {input.dtype}")
        conv_plan = _device_plan(input, weight, stride, padding, dilation, groups, training, exact=detail)
        if conv_plan.path == "aten":
            return Decision("aten", f"the CUDA kernel does not cover this convolution: {conv_plan.reason}")
    else:
        return Decision("aten", f"no fused kernel for device type {device!r}")
    if training:
        pixels = input.shape[0] * out_pixels(input, weight, stride, padding, dilation)
        if pixels <= 1:
            return Decision("aten", f"batch statistics need more than 1 value per channel, got {pixels}; "
                                    "PyTorch's batch_norm handles (and reports) it")
        reason = "fused kernels, training form (batch statistics, fused BN+ReLU backward)"
    else:
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        reason = "fused kernel, inference form (BN folded into the conv epilogue)"
        if requires_grad:
            reason += (" with autograd: backward through the ReLU mask and the folded BN scale, conv gradients from "
                       "ATen")
    if not detail:
        return Decision(device, reason)
    conv_plan = conv_plan or _device_plan(input, weight, stride, padding, dilation, groups, training, exact=True)
    reason += f"; {conv_plan.path}: {conv_plan.reason}"
    if training:
        data_grad, weight_grad = conv_plan.data_grad, conv_plan.weight_grad
        reason += f"; {conv_plan.grads_reason}"
    elif requires_grad:
        data_grad, weight_grad = "dgrad_aten", "wgrad_aten"  # _infer_backward
    else:
        data_grad = weight_grad = None
    backend = None
    if device == "cuda":
        backend, choice = cuda_backend(input, weight, stride, padding, dilation, groups, training)
        reason += f"; run-time choice against cuDNN: {choice}"
    else:
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        choice = _cpu_backend.lookup(_cpu_backend.problem_key(training, input, weight, stride, padding, dilation,
                                                              groups, relu, requires_grad))
        backend = choice.backend
        reason += f"; run-time choice against ATen: {choice.reason}"
    return Decision(device, reason, conv_plan.path, dict(conv_plan.params), data_grad, weight_grad, backend)


def cuda_backend(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, training: bool, relu: bool = True,
                 ops=None) -> tuple[str | None, str]:
    """The run-time choice of a CUDA problem (csrc/cuda/backend_choice.h): ("ours" | "cudnn" | None, why). ``ops``:
    the op namespace that holds the choices (by default op_namespace(input))."""
    ops = ops or op_namespace(input)
    channels_last = suggest_memory_format(input) == torch.channels_last  # as the op's key takes it
    device = input.device.index if input.device.index is not None else -1
    backend, _, _, why = ops._cuda_backend(1 if training else 0, device, list(input.shape), list(weight.shape),
                                           list(stride), list(padding), list(dilation), groups, input.dtype,
                                           channels_last, relu)
    return backend or None, why
