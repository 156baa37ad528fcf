"""Every CUDA kernel of the project, run through the CUDA-on-CPU emulator (the same host launcher and kernel
source a GPU runs) under several schedules, against float64 references."""

import pytest
import torch
import torch.nn.functional as F
from reference import random_bn, reference_conv_affine_relu, rel_err
from test_conv_bn_relu import EDGE_CASES, _make

import resnext_kernels as rk
from resnext_kernels import _cuda_coverage, emulator

pytestmark = pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")


def _emu_op():
    return torch.ops.resnext_kernels_emu.conv_bn_relu_infer


def _scale_shift(c, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var, gamma, beta = random_bn(c)
    return rk.ops.fold_batch_norm(mean, var, gamma, beta, 1e-5, acc)


def _bound(dtype, x, wt, scale, shift, conv_args, ref):
    """fp16/bf16: a small multiple of the error of rounding the exact result to that dtype, plus the
    inputs' own rounding as PyTorch's float32 conv of the same (rounded) inputs shows it."""
    stride, padding, dilation, groups = conv_args
    own = F.conv2d(x.float(), wt.float(), None, stride, padding, dilation, groups)
    own = F.relu(own * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
    return 2 * rel_err(own, ref) + 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("order,seed", emulator.SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "x".join(map(str, c)).replace(" ", ""))
def test_emulated_cuda_kernel_matches_reference(case, dtype, order, seed):
    channels_last = case[0] % 2 == 0  # both layouts across the cases
    x, wt, _, conv_args = _make(case, dtype, channels_last)
    stride, padding, dilation, groups = conv_args
    scale, shift = _scale_shift(wt.shape[0], dtype)
    before = (x.clone(), wt.clone(), scale.clone(), shift.clone())
    with emulator.schedule(order, seed):
        out = _emu_op()(x, wt, scale, shift, list(stride), list(padding), list(dilation), groups, True)
    ref = reference_conv_affine_relu(x, wt, scale, shift, stride, padding, dilation, groups)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    err = rel_err(out, ref)
    if dtype == torch.float64:
        assert err <= 1e-12
    elif dtype == torch.float32:
        assert err <= 1e-5
    else:
        assert err <= _bound(dtype, x, wt, scale, shift, conv_args, ref)
    assert all(torch.equal(a, b) for a, b in zip((x, wt, scale, shift), before))


@pytest.mark.parametrize("channels_per_group", [1, 3, 4, 8, 16, 33, 64])
def test_emulated_channels_per_group_and_chunk_boundaries(channels_per_group):
    groups = 3
    c = channels_per_group * groups
    x = torch.randn(1, c, 9, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c, channels_per_group, 3, 3, dtype=torch.float64)
    scale, shift = _scale_shift(c, torch.float64)
    with emulator.schedule("random", channels_per_group):
        out = _emu_op()(x, wt, scale, shift, [1, 1], [1, 1], [1, 1], groups, False)
    assert rel_err(out, reference_conv_affine_relu(x, wt, scale, shift, 1, 1, 1, groups, relu=False)) <= 1e-12


def test_emulated_results_identical_across_schedules():
    x = torch.randn(2, 64, 11, 9)
    wt = torch.randn(64, 2, 3, 3)
    scale, shift = _scale_shift(64, torch.float32)
    outs = []
    for order, seed in emulator.SCHEDULES:
        with emulator.schedule(order, seed):
            outs.append(_emu_op()(x, wt, scale, shift, [2, 2], [1, 1], [1, 1], 32, True))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("k,stride,dilation,dtype", [
    (3, 1, 1, torch.float32), (7, 2, 1, torch.float32), (7, 2, 4, torch.float32), (9, 4, 8, torch.float64),
    (15, 1, 8, torch.float32), (3, 16, 1, torch.float64),
])
def test_coverage_rule_mirror_matches_cpp(k, stride, dilation, dtype):
    """The Python dispatch's copy of the coverage rule agrees with the kernel's planner; uncovered cases are
    refused by the launcher with the same reason."""
    size = (k - 1) * dilation + 1
    x = torch.randn(1, 4, size, size, dtype=dtype)
    wt = torch.randn(4, 4, k, k, dtype=dtype)
    args = ([stride] * 2, [0, 0], [dilation] * 2, 1)
    cpp = torch.ops.resnext_kernels_emu.cuda_unsupported_reason(x, wt, *args) or None
    py = _cuda_coverage.unsupported_reason(x, wt, (stride, stride), (0, 0), (dilation, dilation))
    assert cpp == py
    if cpp is not None:
        scale, shift = _scale_shift(4, dtype)
        with pytest.raises(RuntimeError, match="not covered"):
            _emu_op()(x, wt, scale, shift, *args, True)


def test_emulated_op_opcheck():
    x = torch.randn(2, 16, 7, 6).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(16, 4, 3, 3)
    scale, shift = _scale_shift(16, torch.float32)
    torch.library.opcheck(_emu_op(), (x, wt, scale, shift, [2, 1], [1, 1], [1, 2], 4, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_emulator_counts_launches():
    before = emulator.launch_stats()
    x = torch.randn(1, 32, 8, 8)
    wt = torch.randn(32, 1, 3, 3)
    scale, shift = _scale_shift(32, torch.float32)
    _emu_op()(x, wt, scale, shift, [1, 1], [1, 1], [1, 1], 32, True)
    after = emulator.launch_stats()
    assert after["launches"] == before["launches"] + 1 and after["barriers"] > before["barriers"]


def test_emulated_nan_propagates_through_relu():
    x = torch.randn(1, 8, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    wt = torch.randn(8, 2, 3, 3)
    scale, shift = _scale_shift(8, torch.float32)
    out = _emu_op()(x, wt, scale, shift, [1, 1], [1, 1], [1, 1], 4, True)
    ref = F.relu(F.conv2d(x, wt, None, 1, 1, 1, 4) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
