"""Helpers shared by the functional op, its dispatch, fake kernels and the bottleneck: dtypes, output shapes and memory
formats, autocast, BatchNorm folding."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in, and of scale/shift and the batch statistics: float64 for float64 inputs,
    float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def out_pixels(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int]) -> int:
    """Output pixels per image (OH * OW) of a convolution with checked arguments."""
    oh = conv_out_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return oh * ow


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def conv_output_memory_format(*tensors: Tensor) -> torch.memory_format:
    """F.conv2d's rule (csrc/common/conv_checks.h): channels_last if the input or a weight suggests it."""
    if any(suggest_memory_format(t) == torch.channels_last for t in tensors):
        return torch.channels_last
    return torch.contiguous_format


def autocast_tensors(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Casts like autocast casts F.conv2d (a lower-precision op): each floating-point, non-double tensor on
    the autocast device (that of the first tensor) goes to the autocast dtype; others (float64, integer,
    other devices) are left for the argument checks to judge."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device
                 else t for t in tensors)


def fold_batch_norm(running_mean: Tensor, running_var: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                    eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with ``bn(y) == y * scale + shift`` in inference form, in ``dtype``."""
    inv_std = torch.rsqrt(running_var.to(dtype) + eps)
    scale = inv_std if bn_weight is None else bn_weight.to(dtype) * inv_std
    shift = -running_mean.to(dtype) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    return scale.contiguous(), shift.contiguous()
