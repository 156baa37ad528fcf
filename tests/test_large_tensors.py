"""Tensors past 2^31 elements: every kernel indexes with 64-bit offsets, so an input whose far end lies beyond
2^31 elements (and 2^32 bytes) is read correctly, never through a wrapped 32-bit offset.

The input is 1 x 64 x 5806 x 5806 bfloat16 (2^31 + 9.9M elements, 4 GiB) in channels_last, so no
kernel needs a converted copy of it. A depthwise 3x3 conv with stride 15 (the largest stride whose input tile
still fits the CUDA kernel's shared memory) keeps the output at 9.6M elements, few enough for the emulator to
run every CUDA thread; the 3x3 windows the kernels read are gathered into a smaller image, on which PyTorch's
conv (stride 3) gives the reference. The windows of the last output rows lie past element 2^31 of the input.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import cuda_plan, rel_err

import resnext_kernels as rk
from resnext_kernels import emulator

SIZE, STRIDE, CHANNELS = 5806, 15, 64
NEEDED_GIB = 10  # the 4 GiB input, the reference's gathers and the rest of the test process


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


pytestmark = pytest.mark.skipif(_mem_available_gib() < NEEDED_GIB,
                                reason=f"needs {NEEDED_GIB} GiB of available memory for a 4 GiB input")


@pytest.fixture(scope="module")
def huge_input():
    x = torch.empty(1, CHANNELS, SIZE, SIZE, dtype=torch.bfloat16, memory_format=torch.channels_last).zero_()
    assert x.numel() > 2**31
    gen = torch.Generator().manual_seed(0)
    # Random values only where some 3x3 window reads (rows and columns i * STRIDE - 1 .. i * STRIDE + 1).
    lines = _window_lines().clamp(0, SIZE - 1).unique()
    values = torch.randn(CHANNELS, len(lines), len(lines), generator=gen).to(torch.bfloat16)
    x[0, :, lines.view(-1, 1), lines.view(1, -1)] = values
    return x


def _out_size() -> int:
    return (SIZE + 2 - 3) // STRIDE + 1


def _window_lines() -> torch.Tensor:
    """Input rows (and columns) read by the 3x3 windows, in window order; -1 and SIZE are padding."""
    return torch.tensor([i * STRIDE + d for i in range(_out_size()) for d in (-1, 0, 1)])


def _reference(x, weight, scale, shift):
    """The 3x3 windows of a stride-STRIDE, padding-1 conv gathered into a (3*9) x (3*9) image; a stride-3 conv
    of it is the same convolution."""
    idx = _window_lines()
    valid = (idx >= 0) & (idx < SIZE)
    clamped = idx.clamp(0, SIZE - 1)
    small = x[0, :, clamped.view(-1, 1), clamped.view(1, -1)].unsqueeze(0).float()
    small = small * valid.view(1, 1, -1, 1) * valid.view(1, 1, 1, -1)
    y = F.conv2d(small, weight.float(), None, 3, 0, 1, CHANNELS).double()
    return F.relu(y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


def _weights():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(CHANNELS, 1, 3, 3, generator=gen).to(torch.bfloat16)
    scale = torch.rand(CHANNELS, generator=gen) + 0.5
    shift = torch.randn(CHANNELS, generator=gen) * 0.1
    return weight, scale, shift


def _check(out, x, weight, scale, shift):
    ref = _reference(x, weight, scale, shift)
    assert out.shape == ref.shape == (1, CHANNELS, _out_size(), _out_size())
    assert ref[..., -1, :].abs().max() > 0  # the windows past element 2^31 hold data
    assert ((_out_size() - 1) * STRIDE - 1) * SIZE * CHANNELS > 2**31  # (row offset of the last windows)
    assert rel_err(out, ref) <= 2e-2  # bfloat16 output rounding


def test_cpu_kernel_reads_past_2_31_elements(huge_input):
    weight, scale, shift = _weights()
    assert rk.explain(huge_input, weight, stride=STRIDE, padding=1, groups=CHANNELS).path == "cpu"
    out = torch.ops.resnext_kernels.conv_bn_relu_infer(huge_input, weight, scale, shift, [STRIDE] * 2, [1, 1],
                                                       [1, 1], CHANNELS, True)
    _check(out, huge_input, weight, scale, shift)


@pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")
def test_emulated_cuda_kernel_reads_past_2_31_elements(huge_input):
    weight, scale, shift = _weights()
    assert cuda_plan(huge_input, weight, STRIDE, 1, 1, CHANNELS)[0] == "cuda_direct"
    out = torch.ops.resnext_kernels_emu.conv_bn_relu_infer(huge_input, weight, scale, shift, [STRIDE] * 2, [1, 1],
                                                           [1, 1], CHANNELS, True)
    _check(out, huge_input, weight, scale, shift)
