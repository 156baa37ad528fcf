"""Every CUDA kernel of the project, run through the CUDA-on-CPU emulator (the same host launcher and kernel
source a GPU runs) under several schedules, against float64 references."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from reference import (assert_close_to_reference, assert_dtype_tolerance, cuda_plan, random_bn,
                       reference_conv_affine_relu, reference_train, rel_err, tolerance)
from test_conv_bn_relu import EDGE_CASES, _make
from test_cuda_tensor_core_wgrad import CASES as WGRAD_TC_CASES
from test_cuda_tensor_core_wgrad import _autograd_weight_grad, _case_id, _inputs
from test_models import BLOCK_CASES, _block_pair

import resnext_kernels as rk
from resnext_kernels import emulator

if not emulator.available() and os.environ.get("CI"):  # CI must run every CUDA kernel: never skip there
    raise ImportError("resnext_kernels._emu (the emulated CUDA build) is missing; CI requires it")
pytestmark = pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 here is held to 1e-5: the kernels take it exactly, not as TF32 (PyTorch's default for convolutions,
    which the tensor-core kernels follow: tests/test_cuda_tensor_core.py checks that form)."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


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
    low = _bound(dtype, x, wt, scale, shift, conv_args, ref) if dtype in (torch.float16, torch.bfloat16) else 0
    assert_dtype_tolerance(rel_err(out, ref), dtype, low)
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
def test_cuda_planner_op_matches_the_launcher(k, stride, dilation, dtype):
    """The planner op explain() asks (built into every build) gives the emulated launcher's coverage verdict;
    uncovered cases are refused by the launcher with the same reason."""
    size = (k - 1) * dilation + 1
    x = torch.randn(1, 4, size, size, dtype=dtype)
    wt = torch.randn(4, 4, k, k, dtype=dtype)
    args = ([stride] * 2, [0, 0], [dilation] * 2, 1)
    cpp = torch.ops.resnext_kernels_emu.cuda_unsupported_reason(x, wt, *args) or None
    path, reason = cuda_plan(x, wt, *args)
    assert (path, reason) == ("aten", cpp) if cpp is not None else path == "cuda_direct"
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


# --------------------------------------------------------------------------------------------------
# Training form: batch statistics, normalization, BN + ReLU backward (CUDA kernels, emulated)
# --------------------------------------------------------------------------------------------------

TRAIN_CASES = [  # (N, C_in, C_out, H, W, groups, k, stride, padding, dilation, relu, affine)
    (2, 16, 24, 9, 7, 4, 3, (2, 1), 1, 1, True, True),
    (3, 32, 32, 6, 6, 32, 3, 1, 1, 1, True, False),
    (1, 8, 8, 10, 9, 1, 3, 1, 2, 2, False, True),
    (4, 12, 300, 3, 3, 3, 1, 1, 0, 1, True, True),  # C > 256: several channel blocks; M = 36 < one row block
]


def _train_inputs(case, seed):
    """The generator (to draw more), float64 input, weight, BN weight and bias, and the op's trailing arguments."""
    n, cin, cout, h, w_, groups, k, stride, padding, dilation, relu, affine = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w_, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64)
    gamma = torch.rand(cout, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    beta = torch.randn(cout, generator=gen, dtype=torch.float64) * 0.2 if affine else None
    args = (1e-5, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), groups, relu)
    return gen, x, w, gamma, beta, args


def _train_reference(x, w, gamma, beta, case):
    _, _, _, _, _, groups, _, stride, padding, dilation, relu, _ = case
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, gamma, beta)]
    y = F.conv2d(leaves[0], leaves[1], None, stride, padding, dilation, groups)
    out = F.batch_norm(y, None, None, leaves[2], leaves[3], True, 0.0, 1e-5)
    return (F.relu(out) if relu else out), leaves


@pytest.mark.parametrize("order,seed", emulator.SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_emulated_cuda_training_forward_backward(case, dtype, order, seed):
    gen, x, w, gamma, beta, args = _train_inputs(case, seed=7)
    _, _, _, _, _, groups, _, stride, padding, dilation, relu, affine = case
    ref, leaves = _train_reference(x, w, gamma, beta, case)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(grad)
    E = torch.ops.resnext_kernels_emu
    with emulator.schedule(order, seed):
        out, y, mean, var = E.conv_bn_relu_train(x.to(dtype), w.to(dtype), gamma, beta, *args)
        grads = E.conv_bn_relu_train_backward(grad.to(dtype), x.to(dtype), w.to(dtype), y, mean, var, gamma, beta,
                                              *args, [True, True, affine])
    y_ref = F.conv2d(x, w, None, _pair(stride), _pair(padding), _pair(dilation), groups)
    ref_grads = [leaves[0].grad, leaves[1].grad] + ([leaves[2].grad, leaves[3].grad] if affine else [])
    ours = [out, mean, var, *grads[: 4 if affine else 2]]
    refs = [ref.detach(), y_ref.mean((0, 2, 3)), y_ref.var((0, 2, 3), unbiased=False), *ref_grads]
    if dtype in (torch.float64, torch.float32):
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        for name, a, b in zip(["out", "mean", "var", "grad_input", "grad_weight", "grad_gamma", "grad_beta"], ours, refs):
            assert rel_err(a, b) <= tol, name
    else:  # no worse than PyTorch's own same-precision training step (ReLU masks flip near zero)
        own_leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, gamma, beta)]
        own = F.batch_norm(F.conv2d(own_leaves[0], own_leaves[1], None, _pair(stride), _pair(padding), _pair(dilation),
                                    groups), None, None, own_leaves[2], own_leaves[3], True, 0.0, 1e-5)
        own = F.relu(own) if relu else own
        own.backward(grad.to(dtype))
        owns = [own.detach(), None, None, own_leaves[0].grad, own_leaves[1].grad] + (
            [own_leaves[2].grad, own_leaves[3].grad] if affine else [])
        eps = torch.finfo(dtype).eps
        for a, b, o in zip(ours, refs, owns):
            bound = 4 * eps if o is None else 1.5 * rel_err(o, b) + 4 * eps
            assert rel_err(a, b) <= bound


def test_emulated_training_is_deterministic_across_schedules():
    x = torch.randn(4, 64, 20, 20)
    w = torch.randn(64, 2, 3, 3)
    E = torch.ops.resnext_kernels_emu
    results = []
    for order, seed in emulator.SCHEDULES:
        with emulator.schedule(order, seed):
            out, y, mean, var = E.conv_bn_relu_train(x, w, None, None, 1e-5, [1, 1], [1, 1], [1, 1], 32, True)
            grads = E.conv_bn_relu_train_backward(torch.ones_like(out), x, w, y, mean, var, None, None, 1e-5, [1, 1],
                                                  [1, 1], [1, 1], 32, True, [False, False, True])
        results.append([out, mean, var, *grads[2:]])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


# Extra shapes for the weight-gradient kernel: several output-channel tiles per group (cpg_out 8), and
# C_in > 256 (several channel blocks per chunk), and more than one 128-pixel chunk.
WGRAD_CASES = TRAIN_CASES + [
    (2, 16, 16, 9, 8, 2, 3, 1, 1, 1, True, True),
    (2, 288, 288, 5, 4, 96, 3, 2, 1, 1, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", WGRAD_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_emulated_weight_gradient_kernel(case, dtype, deterministic_algorithms):
    """Under torch.use_deterministic_algorithms(True) the CUDA backward's weight gradient comes from the
    project's two-pass kernel: against float64 autograd (half types: within the suite's bound from PyTorch's own
    error), and for half types also within a few roundings of the library path from the same BN backward."""
    gen, x, w, gamma, beta, args = _train_inputs(case, seed=11)
    E = torch.ops.resnext_kernels_emu
    xd, wd = x.to(dtype), w.to(dtype)
    out, y, mean, var = E.conv_bn_relu_train(xd, wd, gamma, beta, *args)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)

    def grad_weight():
        return E.conv_bn_relu_train_backward(grad, xd, wd, y, mean, var, gamma, beta, *args, [False, True, False])[1]

    before = emulator.launch_stats()["launches"]
    ours = grad_weight()
    # BN backward: affine, partials, finalize, grad_y; weight gradient: partial + finalize
    assert emulator.launch_stats()["launches"] - before == 6
    assert ours.dtype == dtype and ours.shape == w.shape
    if dtype in (torch.float64, torch.float32):
        ref, leaves = _train_reference(x, w, gamma, beta, case)
        ref.backward(grad.double())
        assert rel_err(ours, leaves[1].grad) <= (1e-12 if dtype == torch.float64 else 2e-5)
    else:  # against float64 autograd within the suite's multiple of PyTorch's own same-dtype step
        conv = (args[1], args[2], args[3], args[4], args[5])
        ref = reference_train(x, w, gamma, beta, grad, *conv)[3][1]
        own = reference_train(x.to(dtype), w.to(dtype), gamma, beta, grad, *conv, dtype=dtype)[3][1]
        assert_close_to_reference(ours, ref, own, "weight gradient")
        # and within a few roundings of the library path's (ATen) from the same BN backward
        torch.use_deterministic_algorithms(False)
        before = emulator.launch_stats()["launches"]
        library = grad_weight()
        assert emulator.launch_stats()["launches"] - before == 4
        torch.use_deterministic_algorithms(True)
        assert rel_err(ours, library) <= 4 * torch.finfo(dtype).eps
    with emulator.schedule(*emulator.SCHEDULES[-1]):
        assert torch.equal(grad_weight(), ours)


@pytest.mark.parametrize("case", [WGRAD_TC_CASES[i] for i in (0, 5, 7, 10, 13, 14)], ids=_case_id)
def test_emulated_tensor_core_weight_gradient(case):
    """The tensor-core weight gradient (tested with its counters in test_cuda_tensor_core_wgrad.py) without them, so
    that the AddressSanitizer run (scripts/sanitize.sh) checks its shared and global accesses: groups of 4 with
    several chunks, groups of 32 and 64 in narrow and wide blocks, 1x1 at strides 1 and 2."""
    x, grad_y, wt, conv = _inputs(case, torch.float16)
    dw = torch.ops.resnext_kernels_emu.conv_weight_grad_tc(grad_y, x, wt, *conv)
    ref = _autograd_weight_grad(x, grad_y, wt.shape, conv, torch.float64)
    own = _autograd_weight_grad(x, grad_y, wt.shape, conv, torch.float16)
    assert rel_err(dw, ref) <= 2 * rel_err(own, ref) + 2 * torch.finfo(torch.float16).eps


def test_emulated_training_ops_opcheck():
    E = torch.ops.resnext_kernels_emu
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 2, 3, 3)
    gamma, beta = torch.rand(8) + 0.5, torch.randn(8)
    args = (1e-5, [2, 1], [1, 1], [1, 1], 4, True)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(E.conv_bn_relu_train, (x, w, gamma, beta, *args), test_utils=utils)
    out, y, mean, var = E.conv_bn_relu_train(x, w, gamma, beta, *args)
    torch.library.opcheck(E.conv_bn_relu_train_backward,
                          (torch.randn_like(out), x, w, y, mean, var, gamma, beta, *args, [True, False, True]),
                          test_utils=utils)


def _block_args(ours, x):
    layers = [(conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
              for conv, bn in ((ours.conv1, ours.bn1), (ours.conv2, ours.bn2), (ours.conv3, ours.bn3))]
    down = None
    if ours.downsample is not None:
        conv, bn = ours.downsample
        down = (conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return rk.ops.bottleneck_infer_args(x, layers, down, stride=ours.conv2.stride[0], groups=ours.conv2.groups,
                                        dilation=ours.conv2.dilation[0])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_emulated_cuda_bottleneck_matches_torchvision(case, dtype, channels_last):
    """The CUDA bottleneck_infer (cuDNN's role played by ATen on the CPU, the grouped conv by the emulated
    kernel) against torchvision's Bottleneck in float64; float16/bfloat16 within the suite's multiple of
    torchvision's own error in the same dtype (weights folded and rounded to it, intermediates in it)."""
    ref, ours = _block_pair(case, torch.float64)
    ours = ours.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, case[0], 9, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    launches = emulator.launch_stats()["launches"]
    with torch.no_grad():
        out = torch.ops.resnext_kernels_emu.bottleneck_infer(*_block_args(ours, x.to(dtype)))
        want = ref(x)
        own = copy.deepcopy(ref).to(dtype)(x.to(dtype)) if dtype in (torch.float16, torch.bfloat16) else None
    assert emulator.launch_stats()["launches"] == launches + 1  # the grouped conv ran the project's kernel
    assert out.shape == want.shape and out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert_close_to_reference(out, want, own, "block output")


def test_emulated_cuda_bottleneck_routes_uncovered_grouped_conv_to_cudnn_path():
    """A stride whose input tile exceeds the kernel's shared memory: the grouped conv takes the folded-weight
    library path (no kernel launch) and the result is still exact."""
    ref, ours = _block_pair((64, 16, 16, 4, 16, 1, True), torch.float64)
    x = torch.randn(1, 64, 34, 34, dtype=torch.float64)
    assert cuda_plan(x[:, :16], ours.conv2.weight, 16, 1, 1, ours.conv2.groups)[0] == "aten"
    launches = emulator.launch_stats()["launches"]
    with torch.no_grad():
        out = torch.ops.resnext_kernels_emu.bottleneck_infer(*_block_args(ours, x))
        want = ref(x)
    assert emulator.launch_stats()["launches"] == launches
    assert rel_err(out, want) <= 1e-12


def test_emulated_cuda_bottleneck_opcheck():
    _, ours = _block_pair(BLOCK_CASES[0], torch.float32)
    x = torch.randn(2, BLOCK_CASES[0][0], 6, 6)
    with torch.no_grad():
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _block_args(ours, x))
    torch.library.opcheck(torch.ops.resnext_kernels_emu.bottleneck_infer.default, args)


# (inplanes, planes, stride, groups, base_width, dilation, projection): 64-channel grouped convs of 4 channels a
# group, which the tensor-core kernels take in 16-bit types.
TRAINING_BLOCKS = [(128, 32, 1, 16, 8, 1, False), (64, 32, 2, 16, 8, 1, True)]


def _norm_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _training_step(block, x, grad):
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(grad)
    grads = {"input": x.grad, **{name: p.grad for name, p in block.named_parameters()}}
    return out.detach(), grads, {name: b.clone() for name, b in block.named_buffers()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRAINING_BLOCKS, ids=lambda c: "-".join(map(str, c)))
def test_emulated_block_training_step_matches_torchvision(case, dtype):
    """One training step of FusedResNeXtBlock run by the CUDA code under the emulator (emulator.cuda_on_cpu():
    the CUDA planner, launchers, kernels and autograd formulas), against torchvision's Bottleneck in float64: the
    output, every gradient and the running statistics. float16/bfloat16: no worse than torchvision's own step in the
    same dtype."""
    ref, ours = _block_pair(case, torch.float64)
    ref.train()
    ours.train().to(dtype)
    own = copy.deepcopy(ref).to(dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, case[0], 8, 8, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out_shape = (2, case[1] * 4, 8 // case[2], 8 // case[2])
    grad = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    with emulator.cuda_on_cpu():
        assert rk.ops.explain(torch.empty(2, 64, 8, 8, dtype=dtype), ours.conv2.weight, stride=case[2],
                              groups=case[3], training=True).path == "cuda"
        results = []
        # the launchers' profiler scopes (the counters are not in the AddressSanitizer build)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results.append(_training_step(ours, x.to(dtype), grad.to(dtype)))
    scopes = {e.name.split("::", 1)[1] for e in prof.events() if e.name.startswith("resnext_kernels::")}
    assert {"cuda_tc", "dgrad_cuda_tc", "wgrad_cuda_tc", "cuda_bn_backward"} <= scopes \
        if dtype != torch.float64 else {"cuda_direct", "cuda_bn_stats", "cuda_bn_backward"} <= scopes
    out, grads, buffers = results[0]
    ref_out, ref_grads, ref_buffers = _training_step(ref, x, grad)
    assert out.dtype == dtype and out.shape == ref_out.shape
    err = rel_err
    if dtype == torch.float64:
        bound = {name: 1e-12 for name in ("out", *ref_grads, *ref_buffers)}
    else:
        # A whole block's step in 16 bits flips ReLU masks and BN backward cancels: single elements of torchvision's
        # own gradients are off by 10-80% of the largest. Compared by norm there (its own: 1-2% float16, ~10%
        # bfloat16); the path matrix holds each kernel to the per-element rule.
        err = _norm_err
        own_out, own_grads, own_buffers = _training_step(own, x.to(dtype), grad.to(dtype))
        bound = {"out": tolerance(dtype, err(own_out, ref_out))}
        bound.update({k: tolerance(dtype, err(own_grads[k], ref_grads[k])) for k in ref_grads})
        bound.update({k: tolerance(dtype, err(own_buffers[k], ref_buffers[k])) for k in ref_buffers
                      if ref_buffers[k].is_floating_point()})
    assert err(out, ref_out) <= bound["out"]
    for name, want in ref_grads.items():
        assert err(grads[name], want) <= bound[name], name
    for name, want in ref_buffers.items():
        if want.is_floating_point():
            assert err(buffers[name], want) <= bound[name], name
        else:
            assert torch.equal(buffers[name], want), name  # num_batches_tracked
