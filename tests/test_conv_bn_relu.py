"""The fused grouped conv + BN + ReLU op (inference form) on CPU, against float64 references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import (RESNEXT50_STAGES, assert_close_to_reference, assert_dtype_tolerance, random_bn,
                       reference_conv_affine_relu, reference_conv_bn_relu, rel_err, vector_cpu)
from torch import nn

import resnext_kernels as rk
from resnext_kernels import ops

# (N, C_in, C_out, H, W, groups, kernel, stride, padding, dilation)
EDGE_CASES = [
    (1, 32, 32, 7, 9, 32, 3, 1, 1, 1),     # depthwise, odd H/W
    (2, 64, 64, 8, 8, 32, 3, 2, 1, 1),     # ResNeXt groups, stride 2
    (2, 16, 24, 9, 7, 1, 3, 1, 0, 1),      # dense, padding 0, C_out != C_in
    (1, 24, 24, 11, 10, 3, 3, 1, 2, 2),    # dilation 2
    (1, 64, 128, 6, 5, 1, 3, 2, 1, 1),     # dense, wide output (broadcast path, several blocks)
    (2, 128, 128, 5, 5, 2, 3, 1, 1, 1),    # 64 channels per group
    (3, 64, 64, 9, 7, 2, 3, 2, 1, 1),      # 32 per group, stride 2: broadcast path, a band over three images
    (1, 12, 12, 5, 5, 6, 1, 1, 0, 1),      # 1x1 kernel
    (1, 8, 8, 1, 1, 2, 3, 1, 1, 1),        # 1x1 spatial
    (1, 10, 20, 6, 7, 5, 3, 2, 0, 1),      # stride 2, padding 0, odd channel counts
    (1, 16, 16, 9, 9, 4, 5, 1, 2, 1),      # 5x5 kernel
    (3, 48, 48, 4, 6, 16, 3, (1, 2), (1, 0), (2, 1)),  # asymmetric stride/padding/dilation
    (0, 32, 32, 8, 8, 32, 3, 1, 1, 1),     # empty batch
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _make(case, dtype, channels_last, generator=None):
    n, cin, cout, h, w, groups, k, stride, padding, dilation = case
    x = torch.randn(n, cin, h, w, generator=generator).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(cout, cin // groups, k, k, generator=generator) / (cin // groups * k * k) ** 0.5).to(dtype)
    return x, wt, random_bn(cout, generator=generator), (_pair(stride), _pair(padding), _pair(dilation), groups)


def _bf16_bound(x, wt, bn, conv_args, ref):
    """PyTorch's own bfloat16 error on the same problem (the bar a bf16 kernel is held to)."""
    stride, padding, dilation, groups = conv_args
    mean, var, gamma, beta = bn
    own = F.relu(F.batch_norm(F.conv2d(x, wt, None, stride, padding, dilation, groups),
                              mean.bfloat16(), var.bfloat16(), gamma.bfloat16(), beta.bfloat16(), False, 0.0, 1e-5))
    return rel_err(own, ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "x".join(map(str, c)).replace(" ", ""))
def test_matches_reference(case, dtype, channels_last):
    x, wt, bn, (stride, padding, dilation, groups) = _make(case, dtype, channels_last)
    mean, var, gamma, beta = bn
    x_before, w_before, bn_before = x.clone(), wt.clone(), [t.clone() for t in bn]
    assert rk.explain(x, wt, stride=stride, padding=padding, dilation=dilation, groups=groups).path == "cpu"

    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, stride, padding, dilation, groups)

    assert out.shape == ref.shape and out.dtype == dtype
    expected_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)
    low = 2 * _bf16_bound(x, wt, bn, (stride, padding, dilation, groups), ref) + 1e-3 if dtype == torch.bfloat16 else 0
    assert_dtype_tolerance(rel_err(out, ref), dtype, low)
    # inputs and BN buffers are never modified
    assert torch.equal(x, x_before) and torch.equal(wt, w_before)
    assert all(torch.equal(a, b) for a, b in zip(bn, bn_before))


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 8, 15, 16, 17, 32, 64])
def test_channels_per_group(channels):
    groups = 4
    case = (2, channels * groups, channels * groups, 6, 5, groups, 3, 1, 1, 1)
    x, wt, (mean, var, gamma, beta), (stride, padding, dilation, g) = _make(case, torch.float64, True)
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, stride=stride, padding=padding, dilation=dilation,
                          groups=g)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, stride, padding, dilation, g)
    assert rel_err(out, ref) <= 1e-12


# Shapes of the lanes path (groups of 2, 4 or 8 channels in and out, channel count a multiple of the
# vector width, 3-wide kernel): (N, C, H, W, channels per group, kernel height, stride, padding, dilation).
# Widths are chosen so that a row ends in a partial pixel block.
LANE_CASES = [
    (2, 64, 9, 11, 4, 3, 1, 1, 1),
    (1, 128, 7, 13, 8, 5, 1, (2, 1), 1),  # 5x3 kernel: 8 channels per group with a 3x3 kernel go to Winograd
    (2, 32, 8, 9, 2, 3, 2, 1, 1),
    (1, 64, 10, 7, 8, 3, 2, 0, 1),
    (1, 32, 9, 12, 4, 3, 1, 2, 2),
    (2, 48, 6, 5, 8, 3, (2, 1), (0, 1), (1, 2)),
    (1, 32, 8, 8, 4, 1, 1, (0, 1), 1),  # 1x3 kernel
    (1, 16, 3, 3, 4, 3, 1, 1, 1),       # every column is an edge column
]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LANE_CASES, ids=lambda c: "x".join(map(str, c)).replace(" ", ""))
def test_lanes_path_shapes(case, dtype, relu):
    n, ch, h, w_, c, kh, stride, padding, dilation = case
    x = torch.randn(n, ch, h, w_).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(ch, c, kh, 3) / (c * kh * 3) ** 0.5).to(dtype)
    scale, shift = torch.rand(ch) + 0.5, torch.randn(ch)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out = torch.ops.resnext_kernels.conv_bn_relu_infer(x, wt, scale, shift, stride, padding, dilation, ch // c, relu)
    ref = reference_conv_affine_relu(x, wt, scale, shift, stride, padding, dilation, ch // c, relu)
    assert out.shape == ref.shape and out.dtype == dtype
    if not relu:
        assert (ref < 0).any()
    if dtype == torch.bfloat16:
        # PyTorch's own bfloat16 error on the problem (with the affine applied in bfloat16 too) is the bar.
        own = F.conv2d(x, wt, None, stride, padding, dilation, ch // c) * scale.bfloat16().view(1, -1, 1, 1)
        own = own + shift.bfloat16().view(1, -1, 1, 1)
        assert rel_err(out, ref) <= 2 * rel_err(F.relu(own) if relu else own, ref) + 1e-3
    else:
        assert rel_err(out, ref) <= 1e-5


# (N, C, H, W, channels per group, padding): the Winograd path (3x3, stride 1, dilation 1, 8-64 channels per group).
WINOGRAD_CASES = [
    (2, 64, 9, 11, 8, 1),   # two groups of 8 per 16-lane transform; 30 tiles: two blocks
    (1, 24, 5, 7, 8, 1),    # an odd number of groups of 8: 8-lane transform
    (1, 64, 7, 7, 16, 1),   # odd output size: the last tile row and column are half outside
    (2, 96, 6, 5, 32, 0),   # no padding
    (1, 64, 6, 9, 64, 2),   # dense, padding 2: tiles of zeros at the edges
    (1, 320, 5, 4, 64, 1),  # 1.25 MB of transformed weights: group-major work order
    (1, 16, 30, 29, 16, 1), # 225 tiles: blocks of 23 and a shorter last one
    (3, 32, 1, 1, 16, 1),   # a single pixel
    # F(4x4, 3x3) (>= 8 tiles of 4x4; the cases above with fewer stay on F(2x2)):
    (2, 96, 10, 13, 32, 0), # no padding, 8x11 outputs: a partial last tile column
    (3, 64, 9, 6, 64, 2),   # dense, padding 2: tiles of zeros at the edges, a partial last tile row
    (2, 256, 7, 7, 32, 1),  # 8 tiles (the threshold), 1.2 MB of F(4x4) weights: group-major order
    (1, 40, 21, 26, 8, 1),  # an odd number of groups of 8; 7 tiles per tile row through the column ring
    (2, 48, 13, 9, 16, 1),  # 16 channels per group, 2 blocks of 6 tiles and a shorter last one per image
    # groups of 8 paired in 16-lane GEMMs (AVX-512, an even group count), both work orders and tile sizes:
    (1, 32, 6, 6, 8, 1),    # F(2x2), image-major
    (1, 2064, 3, 3, 8, 1),  # F(2x2), 1.06 MB of transformed weights: group-major
    (1, 928, 9, 9, 8, 1),   # F(4x4), 1.07 MB: group-major
]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_winograd_path_shapes(case, dtype, relu):
    n, ch, h, w_, c, padding = case
    x = torch.randn(n, ch, h, w_).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(ch, c, 3, 3) / (c * 9) ** 0.5).to(dtype)
    scale, shift = torch.rand(ch) + 0.5, torch.randn(ch)
    args = ((1, 1), (padding, padding), (1, 1), ch // c)
    if vector_cpu():  # F(4x4, 3x3) from 8 tiles of 4x4 on
        tiles = n * -(-(h + 2 * padding - 2) // 4) * -(-(w_ + 2 * padding - 2) // 4)
        tile = 4 if tiles >= 8 else 2
        assert rk.explain(x, wt, padding=padding, groups=ch // c).kernel == f"winograd_f{tile}x{tile}"
    out = torch.ops.resnext_kernels.conv_bn_relu_infer(x, wt, scale, shift, *args, relu)
    ref = reference_conv_affine_relu(x, wt, scale, shift, *args, relu)
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.bfloat16:
        own = F.conv2d(x, wt, None, *args) * scale.bfloat16().view(1, -1, 1, 1) + shift.bfloat16().view(1, -1, 1, 1)
        assert rel_err(out, ref) <= 2 * rel_err(F.relu(own) if relu else own, ref) + 1e-3
    else:
        # The same bound as the direct paths: F(2x2, 3x3)'s transforms add a few float32 rounding steps, F(4x4, 3x3)'s
        # a few times direct summation's error (1-2e-6 at these sizes).
        assert rel_err(out, ref) <= 1e-5
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


# (N, C, H, W, channels per group, padding, stride): Winograd cases (both tiles, paired groups, both work orders)
# and the broadcast path's (stride 2, 16 and 32 channels per group), whose weight packing also reads strides.
STRIDED_WEIGHT_CASES = [WINOGRAD_CASES[i] + (1,) for i in (0, 5, 8, 9, 10, 11, 13, 14)] + [
    (2, 64, 9, 11, 16, 1, 2),
    (1, 96, 10, 7, 32, 1, 2),
]


@pytest.mark.parametrize("weight_layout", ["channels_last", "strided"])
@pytest.mark.parametrize("case", STRIDED_WEIGHT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_kernels_read_the_weight_through_its_strides(case, weight_layout):
    """The weight packing gathers the kernels through the weight's strides (no copy): a channels_last weight and a
    strided view (every other output channel of a larger tensor, kernel rows and columns swapped) give the contiguous
    weight's result."""
    n, ch, h, w_, c, padding, stride = case
    x = torch.randn(n, ch, h, w_).contiguous(memory_format=torch.channels_last)
    if weight_layout == "channels_last":
        wt = (torch.randn(ch, c, 3, 3) / (c * 9) ** 0.5).contiguous(memory_format=torch.channels_last)
    else:
        wt = (torch.randn(2 * ch, c, 3, 3) / (c * 9) ** 0.5)[::2].transpose(2, 3)
    assert not wt.is_contiguous()
    scale, shift = torch.rand(ch) + 0.5, torch.randn(ch)
    args = ((stride, stride), (padding, padding), (1, 1), ch // c)
    out = torch.ops.resnext_kernels.conv_bn_relu_infer(x, wt, scale, shift, *args, True)
    ref = reference_conv_affine_relu(x, wt.contiguous(), scale, shift, *args, True)
    assert rel_err(out, ref) <= 1e-5


def test_winograd_tile_follows_the_tile_count():
    """F(4x4, 3x3) runs from 8 tiles of 4x4 on (the batch counts), F(2x2, 3x3) below."""
    wt = torch.randn(64, 16, 3, 3)
    for n, size, f4 in ((1, 7, False), (2, 7, True), (1, 14, True), (7, 3, False), (8, 3, True)):
        x = torch.randn(n, 64, size, size)
        expected = 4 if f4 else 2
        if vector_cpu():
            assert rk.explain(x, wt, padding=1, groups=4).kernel == f"winograd_f{expected}x{expected}"


def test_winograd_is_not_taken_outside_its_shapes():
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    for kwargs in (dict(stride=2), dict(dilation=2, padding=2), dict(groups=16)):  # 4 channels per group: lanes
        wt = torch.randn(64, 64 // kwargs.get("groups", 4), 3, 3)
        kwargs.setdefault("groups", 4)
        assert not rk.explain(x, wt, **kwargs).kernel.startswith("winograd")
    double = rk.explain(x.double(), torch.randn(64, 16, 3, 3, dtype=torch.float64), groups=4)
    assert double.kernel == "generic"


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels,size", RESNEXT50_STAGES)
def test_resnext50_stage_shapes(channels, size, stride):
    x = torch.randn(1, channels, size, size).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(channels, channels // 32, 3, 3) / (channels // 32 * 9) ** 0.5
    mean, var, gamma, beta = random_bn(channels)
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, stride=stride, padding=1, groups=32)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, stride, 1, 1, 32)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "affine"])
def test_lanes_path_streams_large_outputs(relu):
    """Outputs of 4 MB and more leave the lanes kernel through non-temporal stores on AVX-512
    (kStreamOutputBytes); every element must still land, in both epilogues, and the input stay as it was."""
    x = torch.randn(3, 128, 56, 56).contiguous(memory_format=torch.channels_last)  # 4.8 MB of output
    x_before = x.clone()
    wt = torch.randn(128, 4, 3, 3) / 6
    scale, shift = torch.rand(128) + 0.5, torch.randn(128)
    args = ((1, 1), (1, 1), (1, 1), 32)
    out = torch.ops.resnext_kernels.conv_bn_relu_infer(x, wt, scale, shift, *args, relu)
    ref = reference_conv_affine_relu(x, wt, scale, shift, *args, relu)
    assert out.numel() * 4 >= 4 << 20 and torch.equal(x, x_before)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_without_relu_and_without_affine():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    wt = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    mean, var, _, _ = random_bn(8, dtype=torch.float64)
    out = rk.conv_bn_relu(x, wt, mean, var, None, None, groups=2, relu=False)
    ref = reference_conv_bn_relu(x, wt, mean, var, None, None, 1e-5, 1, 1, 1, 2, relu=False)
    assert (ref < 0).any() and rel_err(out, ref) <= 1e-12


def test_non_contiguous_input():
    base = torch.randn(2, 16, 12, 14, dtype=torch.float64)
    x = base[:, ::2, 1::2, ::2]  # strided view
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    wt = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    mean, var, gamma, beta = random_bn(8, dtype=torch.float64)
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, groups=4)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, 1, 1, 1, 4)
    assert rel_err(out, ref) <= 1e-12


def test_raw_op_contract():
    x = torch.randn(2, 12, 7, 6)
    wt = torch.randn(6, 4, 3, 3)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    out = torch.ops.resnext_kernels.conv_bn_relu_infer(x, wt, scale, shift, [2, 1], [1, 0], [1, 2], 3, False)
    ref = reference_conv_affine_relu(x, wt, scale, shift, (2, 1), (1, 0), (1, 2), 3, relu=False)
    assert rel_err(out, ref) <= 1e-5


def test_fold_batch_norm():
    mean, var, gamma, beta = random_bn(5, dtype=torch.float64)
    scale, shift = ops.fold_batch_norm(mean, var, gamma, beta, 1e-3, torch.float64)
    y = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    expected = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-3)
    torch.testing.assert_close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), expected)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------

def _sequential(cin, cout, stride, groups, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def _randomize_bn(bn):
    with torch.no_grad():
        mean, var, gamma, beta = random_bn(bn.num_features)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_module_state_dict_and_eval_output(channels_last):
    ref = _sequential(128, 128, 1, 32)
    _randomize_bn(ref[1])
    ref.eval()
    ours = rk.nn.FusedGroupedConvBNReLU(128, 128, stride=1, groups=32).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 128, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert ours.explain(x).path == "cpu"
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    # and back: our state dict loads into the torch.nn sequence
    ref2 = _sequential(128, 128, 1, 32)
    ref2.load_state_dict(ours.state_dict(), strict=True)


def test_module_from_modules_shares_tensors():
    seq = _sequential(16, 16, 2, 4, dilation=2)
    _randomize_bn(seq[1])
    seq.eval()
    ours = rk.nn.FusedGroupedConvBNReLU.from_modules(seq[0], seq[1])
    assert ours.conv.weight is seq[0].weight
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), seq(x), rtol=1e-4, atol=1e-5)


def test_module_training_mode_matches_torch_nn():
    """Training mode (batch statistics) runs the fused training kernels and updates running stats like
    BatchNorm2d (test_training.py covers the training form in depth)."""
    for momentum in (0.1, None):
        ref = _sequential(32, 32, 1, 8)
        ref[1].momentum = momentum
        ours = rk.nn.FusedGroupedConvBNReLU(32, 32, groups=8, momentum=momentum)
        ours.load_state_dict(ref.state_dict())
        for step in range(3):
            x = torch.randn(4 + step, 32, 6, 6)
            assert ours.explain(x).path == "cpu"
            torch.testing.assert_close(ours(x), ref(x))
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_module_eval_mode_with_grad_runs_fused_kernel_with_backward():
    """Fine-tuning with BatchNorm in eval mode: the fused inference kernel runs, and its backward gives the
    gradients of the PyTorch sequence for input, conv weight and BN affine parameters."""
    ours = rk.nn.FusedGroupedConvBNReLU(8, 8, groups=2).eval()
    _randomize_bn(ours.bn)
    ref = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    decision = ours.explain(x)
    assert decision.path == "cpu" and "autograd" in decision.reason
    grad = torch.randn(2, 8, 5, 5)
    ours(x).backward(grad)
    ref(x_ref).backward(grad)
    assert rel_err(x.grad, x_ref.grad.double()) < 1e-5
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        assert rel_err(p_ours.grad, p_ref.grad.double()) < 1e-5, name
    assert torch.equal(ours.bn.running_mean, ref[1].running_mean)  # eval: statistics untouched


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (2, 1, 1, 2), (1, 0, 1, 4), (1, 2, 2, 4), (2, 1, 2, 2)])
def test_eval_form_gradcheck(stride, padding, dilation, groups, relu):
    """torch.autograd.gradcheck of the inference form for every differentiable input (input, conv weight,
    BN weight and bias through the folded scale/shift)."""
    gen = torch.Generator().manual_seed(groups * 10 + stride)
    x = torch.randn(2, 4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    mean, var = torch.randn(4, dtype=torch.float64) * 0.1, torch.rand(4, dtype=torch.float64) + 0.5
    assert rk.explain(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups).path == "cpu"

    def f(x, w, gamma, beta):
        return rk.conv_bn_relu(x, w, mean, var, gamma, beta, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, relu=relu)

    assert torch.autograd.gradcheck(f, (x, w, gamma, beta))


def test_module_torch_compile_fullgraph():
    ours = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=32).eval()
    _randomize_bn(ours.bn)
    x = torch.randn(2, 64, 10, 10).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(compiled(x), expected)


def test_autocast_cpu_bfloat16():
    """Under CPU autocast the fused layer computes in bfloat16: its output against float64 within a small multiple
    of PyTorch's own Conv2d -> BatchNorm2d -> ReLU error under the same autocast."""
    ref = _sequential(32, 32, 1, 8)
    _randomize_bn(ref[1])
    ref.eval()
    ours = rk.nn.FusedGroupedConvBNReLU(32, 32, groups=8).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours.explain(x).path == "cpu"
            out, own = ours(x), ref(x)
    assert out.dtype == own.dtype == torch.bfloat16
    assert_close_to_reference(out, expected, own, "autocast output")


def test_fp16_on_cpu_falls_back_with_reason():
    x = torch.randn(1, 8, 5, 5).half()
    wt = torch.randn(8, 2, 3, 3).half()
    mean, var, gamma, beta = (t.half() for t in random_bn(8))
    decision = rk.explain(x, wt, groups=4)
    assert decision.path == "aten" and "float16" in decision.reason
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, groups=4)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, 1, 1, 1, 4)
    assert out.dtype == torch.float16 and rel_err(out, ref) < 5e-3


def test_force_reference_context_and_env(monkeypatch):
    x = torch.randn(1, 8, 5, 5)
    wt = torch.randn(8, 2, 3, 3)
    mean, var, gamma, beta = random_bn(8)
    fused = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, groups=4)
    with rk.force_reference():
        decision = rk.explain(x, wt, groups=4)
        assert decision.path == "aten" and "force_reference" in decision.reason
        forced = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, groups=4)
    assert rk.explain(x, wt, groups=4).path == "cpu"
    torch.testing.assert_close(fused, forced, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv(ops.FORCE_ATEN_ENV, "1")
    assert "environment" in rk.explain(x, wt, groups=4).reason


def test_meta_device_runs_reference_shapes():
    x = torch.empty(2, 8, 7, 7, device="meta")
    wt = torch.empty(8, 2, 3, 3, device="meta")
    mean, var, gamma, beta = (torch.empty(8, device="meta") for _ in range(4))
    assert rk.explain(x, wt, groups=4, stride=2).path == "aten"
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, groups=4, stride=2)
    assert out.shape == (2, 8, 4, 4)


# --------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel (shapes and strides), autograd registration, torch.compile consistency
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    ((2, 16, 7, 6), (16, 4, 3, 3), [1, 1], [1, 1], [1, 1], 4, True, torch.contiguous_format),
    ((2, 16, 7, 6), (16, 4, 3, 3), [2, 2], [0, 0], [1, 1], 4, False, torch.channels_last),
    ((1, 8, 9, 9), (8, 1, 3, 3), [1, 2], [2, 1], [2, 1], 8, True, torch.channels_last),
    ((0, 8, 5, 5), (8, 8, 1, 1), [1, 1], [0, 0], [1, 1], 1, True, torch.contiguous_format),
    ((1, 4, 1, 1), (4, 2, 3, 3), [1, 1], [1, 1], [1, 1], 2, True, torch.channels_last),
])
def test_opcheck(case):
    xs, ws, stride, padding, dilation, groups, relu, fmt = case
    x = torch.randn(xs).contiguous(memory_format=fmt)
    wt = torch.randn(ws)
    scale, shift = torch.rand(ws[0]) + 0.5, torch.randn(ws[0])
    torch.library.opcheck(torch.ops.resnext_kernels.conv_bn_relu_infer,
                          (x, wt, scale, shift, stride, padding, dilation, groups, relu))
    # with inputs that require grad: the autograd registration (the eval-form backward) is exercised too
    grad_args = [t.clone().requires_grad_() for t in (x, wt, scale, shift)]
    torch.library.opcheck(torch.ops.resnext_kernels.conv_bn_relu_infer,
                          (*grad_args, stride, padding, dilation, groups, relu))


# --------------------------------------------------------------------------------------------------
# Bad input: clear Python exceptions naming the argument (and nothing modified)
# --------------------------------------------------------------------------------------------------

def _good_args():
    x = torch.randn(2, 8, 6, 6)
    wt = torch.randn(8, 2, 3, 3)
    mean, var, gamma, beta = random_bn(8)
    return dict(input=x, weight=wt, running_mean=mean, running_var=var, bn_weight=gamma, bn_bias=beta), 4


BAD_INPUTS = [
    ("input", lambda a: a.update(input=torch.randn(8, 6, 6)), ValueError, "input must be 4-D"),
    ("weight", lambda a: a.update(weight=torch.randn(8, 2, 3)), ValueError, "weight must be 4-D"),
    ("weight", lambda a: a.update(weight=torch.randn(8, 3, 3, 3)), ValueError, "weight.shape[1]"),
    ("dtype", lambda a: a.update(weight=a["weight"].double()), TypeError, "weight dtype"),
    ("integer", lambda a: a.update(input=a["input"].int(), weight=a["weight"].int()), TypeError, "floating-point"),
    ("running_mean", lambda a: a.update(running_mean=torch.randn(7)), ValueError, "running_mean must be 1-D"),
    ("bn_weight", lambda a: a.update(bn_weight=torch.randn(8, 1)), ValueError, "bn_weight must be 1-D"),
    ("running_var", lambda a: a.update(running_var=None), ValueError, "both be tensors"),
    ("bn_bias", lambda a: a.update(bn_bias=[0.0] * 8), TypeError, "bn_bias must be a torch.Tensor"),
    ("stride", lambda a: a.update(stride=0), ValueError, "stride must be >= 1"),
    ("padding", lambda a: a.update(padding=-1), ValueError, "padding must be >= 0"),
    ("dilation", lambda a: a.update(dilation=(1, 0)), ValueError, "dilation must be >= 1"),
    ("stride-type", lambda a: a.update(stride=1.5), TypeError, "stride must be an int"),
    ("groups", lambda a: a.update(groups=3), ValueError, "divisible by groups"),
    ("groups-zero", lambda a: a.update(groups=0), ValueError, "groups must be a positive int"),
    ("eps", lambda a: a.update(eps=0.0), ValueError, "eps must be a positive"),
    ("too-small", lambda a: a.update(input=torch.randn(2, 8, 1, 1), padding=0), ValueError, "smaller than"),
    ("device", lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight is on meta"),
    # Regression: running statistics that require grad were accepted (updated silently in training; in eval
    # the output required grad through the folded scale and shift). PyTorch's batch_norm refuses them.
    ("running-mean-requires-grad", lambda a: a.update(running_mean=a["running_mean"].clone().requires_grad_()),
     ValueError, "running_mean must not require grad"),
    ("running-var-requires-grad-training",
     lambda a: a.update(running_var=a["running_var"].clone().requires_grad_(), training=True),
     ValueError, "running_var must not require grad"),
]


@pytest.mark.parametrize("name,mutate,exc,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, mutate, exc, message):
    args, groups = _good_args()
    snapshot = {k: v.clone() for k, v in args.items()}
    call = dict(args, groups=groups)
    mutate(call)
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")):
        rk.conv_bn_relu(**call)
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.parametrize("training", [False, True])
def test_overlapping_and_aliased_inputs(training):
    """An input with internal overlap (stride-0 expand) and a weight that is a view of the input's storage:
    correct results, inputs untouched."""
    base = torch.randn(1, 8, 1, 7)
    x = base.expand(3, 8, 6, 7)  # every row of every image is the same memory
    storage = torch.randn(8 * 2 * 9 + 3)
    wt = storage[3:].view(8, 2, 3, 3)  # weight aliases a buffer shared with other data
    mean, var, gamma, beta = random_bn(8)
    snapshot = [t.clone() for t in (base, storage, mean, var, gamma, beta)]
    rm, rv = mean.clone(), var.clone()
    out = rk.conv_bn_relu(x, wt, rm, rv, gamma, beta, training=training, groups=4)
    y = F.conv2d(x.contiguous().double(), wt.double(), None, 1, 1, 1, 4)
    ref = F.relu(F.batch_norm(y, mean.double().clone(), var.double().clone(), gamma.double(), beta.double(), training,
                              0.1, 1e-5))
    assert rel_err(out, ref) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip((base, storage, mean, var, gamma, beta), snapshot))


def test_raw_op_rejects_bad_arguments():
    x, wt = torch.randn(1, 8, 5, 5), torch.randn(8, 2, 3, 3)
    scale, shift = torch.ones(8), torch.zeros(8)
    op = torch.ops.resnext_kernels.conv_bn_relu_infer
    with pytest.raises(RuntimeError, match="divisible by groups"):
        op(x, wt, scale, shift, [1, 1], [1, 1], [1, 1], 3, True)
    with pytest.raises(RuntimeError, match="scale and shift must be float32"):
        op(x, wt, scale.double(), shift.double(), [1, 1], [1, 1], [1, 1], 4, True)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        op(x, wt, scale, shift, [0, 1], [1, 1], [1, 1], 4, True)
    with pytest.raises(RuntimeError, match="dtype must be float32, float64 or bfloat16"):
        op(x.half(), wt.half(), scale, shift, [1, 1], [1, 1], [1, 1], 4, True)


def test_module_deepcopy_and_repr():
    m = rk.nn.FusedGroupedConvBNReLU(8, 8, groups=2, relu=False)
    assert "relu=False" in repr(m)
    m2 = copy.deepcopy(m)
    assert m2.conv.weight is not m.conv.weight and torch.equal(m2.conv.weight, m.conv.weight)


@pytest.mark.parametrize("channels", [1, 8])
@pytest.mark.parametrize("input_cl,weight_cl", [(False, False), (True, False), (False, True), (True, True)])
def test_output_memory_format_follows_f_conv2d(channels, input_cl, weight_cl):
    """Output layout by F.conv2d's rule (input or weight channels_last), for the inference and training ops."""
    x = torch.randn(2, channels, 5, 5)
    wt = torch.randn(8, channels, 3, 3)
    if input_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if weight_cl:
        wt = wt.contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, wt, padding=1)
    mean, var, gamma, beta = random_bn(8)
    for training in (False, True):
        out = rk.conv_bn_relu(x, wt, mean.clone(), var.clone(), gamma, beta, training=training)
        assert out.stride() == expected.stride(), (training, out.stride(), expected.stride())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_nan_and_inf_propagate_like_pytorch(dtype, training):
    """NaN/Inf in the input reach the output where PyTorch's sequence puts them (relu(NaN) is NaN)."""
    x = torch.randn(2, 32, 6, 6, dtype=dtype)
    x[0, 3, 2, 2] = float("nan")
    x[1, 7, 4, 1] = float("inf")
    wt = torch.randn(32, 4, 3, 3, dtype=dtype)
    mean, var, gamma, beta = (t.to(dtype) for t in random_bn(32))
    out = rk.conv_bn_relu(x, wt, mean.clone(), var.clone(), gamma, beta, groups=8, training=training)
    with rk.force_reference():
        ref = rk.conv_bn_relu(x, wt, mean.clone(), var.clone(), gamma, beta, groups=8, training=training)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out.isnan().any()
