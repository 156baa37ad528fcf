"""Python mirror of the CUDA kernel's coverage rule (conv_bn_relu_fwd_plan in
csrc/cuda/kernels/conv_bn_relu_fwd.cuh): which arguments the kernel takes, and why not. tests check it
against the C++ rule through the emulated build."""

from __future__ import annotations

import torch

TILE = 8
CHANNELS_PER_BLOCK = 32
MAX_SHARED_BYTES = 48 * 1024


def unsupported_reason(input: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                       padding: tuple[int, int], dilation: tuple[int, int]) -> str | None:
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    acc_bytes = 8 if input.dtype == torch.float64 else 4
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    in_tile_h = (TILE - 1) * stride[0] + (kh - 1) * dilation[0] + 1
    in_tile_w = (TILE - 1) * stride[1] + (kw - 1) * dilation[1] + 1
    if n * (-(-oh // TILE)) * (-(-ow // TILE)) > 2**31 - 1:
        return "more than 2^31 - 1 output tiles (a grid.x limit of the CUDA kernel)"
    if -(-c_out // CHANNELS_PER_BLOCK) > 65535:
        return "more than 65535 chunks of 32 output channels (a grid.y limit)"
    if (in_tile_h * in_tile_w + CHANNELS_PER_BLOCK * kh * kw) * acc_bytes > MAX_SHARED_BYTES:
        return "the dilated kernel and stride need more than 48 KiB of shared memory for one input channel"
    return None
