"""The tensor-core kernels (csrc/cuda/kernels/conv_tc.cuh) under the CUDA-on-CPU emulator: every group size they
take, stride 1 and 2, 3x3 and 1x1, odd and small images (several per CTA), several channel blocks; the inference
and training forms against float64 references under every schedule; the cache of packed weights; and the counters
the design targets (docs/cuda_kernels.md)."""

import os

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err, round_to_tf32

from resnext_kernels import emulator
from resnext_kernels.emulator import __main__ as profile_cli

if not emulator.available() and os.environ.get("CI"):
    raise ImportError("resnext_kernels._emu (the emulated CUDA build) is missing; CI requires it")
pytestmark = pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")

E = torch.ops.resnext_kernels_emu if emulator.available() else None
DTYPES = [torch.float16, torch.bfloat16, torch.float32]  # float32 as TF32: PyTorch's default for convolutions


@pytest.fixture(autouse=True)
def _tf32_allowed():
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = allowed



CASES = [  # (N, C, H, W, groups, kernel, stride, padding, channels_last)
    (2, 128, 12, 12, 32, 3, 1, 1, True),    # groups of 4: two per n8 tile, block-diagonal weights
    (1, 128, 9, 11, 16, 3, 1, 1, False),    # groups of 8, odd sizes, NCHW input
    (3, 128, 7, 7, 8, 3, 1, 1, True),       # groups of 16, two 7x7 images per CTA, an odd batch
    (2, 128, 10, 6, 4, 3, 2, 1, False),     # groups of 32, stride 2 (even and odd column planes)
    (1, 64, 11, 11, 1, 3, 2, 1, True),      # one group of 64, stride 2, odd size
    (2, 128, 8, 8, 32, 1, 1, 0, True),      # 1x1
    (1, 192, 40, 36, 48, 3, 1, 1, True),    # three channel blocks, several tiles per image
    (1, 2048, 3, 3, 32, 3, 1, 1, True),     # ResNeXt-101's widest layer: 64 per group, > 48 KiB of BN staging
    (2, 128, 7, 7, 4, 3, 1, 1, True),       # groups of 32 at stride 1: two 7x7 images over a warp's 8 m16 tiles
    (1, 64, 20, 18, 2, 3, 1, 1, False),     # groups of 32, several tiles per image, a partial last m16 tile
    (3, 128, 7, 7, 2, 3, 1, 1, True),       # groups of 64 at stride 1 (64-channel warps), an odd batch
    (2, 128, 14, 14, 2, 3, 2, 1, False),    # groups of 64 at stride 2, two channel blocks
]
# Threads of the forward kernel's CTA by channels per group: the warp tiling (conv_tc_plan.h's TcWarpTile).
THREADS = {4: 128, 8: 128, 16: 64, 32: 64, 64: 64}


def _case_id(case):
    n, c, h, w, groups, k, stride, pad, cl = case
    return f"n{n}-c{c}-{h}x{w}-g{groups}-k{k}-s{stride}-{'nhwc' if cl else 'nchw'}"


def _inputs(case, dtype, seed=0):
    n, c, h, w, groups, k, stride, pad, cl = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c, c // groups, k, k, generator=gen) / (c // groups * k * k) ** 0.5).to(dtype)
    return gen, x, wt, ([stride] * 2, [pad] * 2, [1, 1], groups)


def _kernels(records):
    return [r.kernel.split("<")[0].replace("rk::cuda_kernels::", "") for r in records]


def _own_bound(dtype, x, wt, conv, ref, affine=None, relu=False):
    """Twice the error of computing at this precision (float32 math on the inputs as the tensor cores take them:
    rounded to the dtype, or to TF32 for float32; the result rounded once to the dtype) plus 4 ulp."""
    stride, pad, dil, groups = conv
    if dtype == torch.float32:
        x, wt = round_to_tf32(x).double(), round_to_tf32(wt).double()
    own = F.conv2d(x.double(), wt.double(), None, stride, pad, dil, groups)
    if affine is not None:
        own = own * affine[0].double().view(1, -1, 1, 1) + affine[1].double().view(1, -1, 1, 1)
    own = (F.relu(own) if relu else own).to(dtype)
    return 2 * rel_err(own, ref) + 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("order,seed", emulator.SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_inference_matches_float64(case, dtype, order, seed):
    gen, x, wt, conv = _inputs(case, dtype)
    c = wt.shape[0]
    scale, shift = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.2
    out = []
    with emulator.schedule(order, seed):
        records = emulator.profile(lambda: out.append(E.conv_bn_relu_infer(x, wt, scale, shift, *conv, True)))
    assert "conv_tc_fwd_kernel" in _kernels(records)
    fwd = next(r for r in records if "conv_tc_fwd_kernel" in r.kernel)
    assert fwd.block[0] == THREADS[wt.shape[1]] and fwd.smem_conflict_wavefronts == 0
    d = torch.float64
    ref = F.relu(F.conv2d(x.to(d), wt.to(d), None, *conv) * scale.to(d).view(1, -1, 1, 1) +
                 shift.to(d).view(1, -1, 1, 1))
    y = out[0]
    assert y.dtype == dtype and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if case[-1] else torch.contiguous_format)
    assert rel_err(y, ref) <= _own_bound(dtype, x, wt, conv, ref, (scale, shift), relu=True)


def _train_reference(x, wt, gamma, beta, conv, grad):
    d = torch.float64
    leaves = [t.detach().to(d).requires_grad_() for t in (x, wt, gamma, beta)]
    y = F.conv2d(leaves[0], leaves[1], None, *conv)
    out = F.relu(F.batch_norm(y, None, None, leaves[2], leaves[3], True, 0.0, 1e-5))
    out.backward(grad.to(d))
    return y.detach(), out.detach(), [t.grad for t in leaves]


def _own_training(x, wt, gamma, beta, conv, grad):
    """PyTorch's own training step in x's dtype (float32: with the convolution's inputs rounded to TF32, as cuDNN
    takes them on a GPU by default)."""
    if x.dtype == torch.float32:
        x, wt = round_to_tf32(x), round_to_tf32(wt)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wt)] + [t.detach().clone().requires_grad_()
                                                                       for t in (gamma, beta)]
    out = F.relu(F.batch_norm(F.conv2d(leaves[0], leaves[1], None, *conv), None, None, leaves[2], leaves[3], True,
                              0.0, 1e-5))
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_training_forward_and_backward_match_float64(case, dtype):
    gen, x, wt, conv = _inputs(case, dtype, seed=1)
    c = wt.shape[0]
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.2
    results = []
    with emulator.schedule("random", 5):
        records = emulator.profile(lambda: results.append(E.conv_bn_relu_train(x, wt, gamma, beta, 1e-5, *conv, True)))
    out, y, mean, var = results[0]
    assert "conv_tc_fwd_kernel" in _kernels(records) and "conv_tc_stats_finalize_kernel" in _kernels(records)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    backward = emulator.profile(lambda: results.append(E.conv_bn_relu_train_backward(
        grad, x, wt, y, mean, var, gamma, beta, 1e-5, *conv, True, [True, True, True])))
    grads = results[-1]
    # stride 1: the data gradient is the forward kernel on grad_y with each group's transposed, flipped kernel
    assert ("conv_tc_fwd_kernel" in _kernels(backward)) == (conv[0] == [1, 1])
    y_ref, out_ref, grad_refs = _train_reference(x, wt, gamma, beta, conv, grad)
    eps = 2.0 ** -10 if dtype == torch.float32 else torch.finfo(dtype).eps  # TF32's epsilon for float32
    # The convolution (its rounded output is what the statistics are taken of), and the statistics: a mean moves
    # by no more than y's largest error, a variance by twice that times y's largest deviation from the mean.
    bound = _own_bound(dtype, x, wt, conv, y_ref)
    assert rel_err(y, y_ref) <= bound
    scale = y_ref.abs().max().item()
    mean_ref, var_ref = y_ref.mean((0, 2, 3)), y_ref.var((0, 2, 3), unbiased=False)
    spread = (y_ref - mean_ref.view(1, -1, 1, 1)).abs().max().item()
    assert (mean.double() - mean_ref).abs().max().item() <= bound * scale
    assert (var.double() - var_ref).abs().max().item() <= 3 * bound * scale * spread
    # The output and the gradients: no worse than PyTorch's own same-precision step (ReLU masks flip near zero).
    own_out, own_grads = _own_training(x, wt, gamma, beta, conv, grad)
    assert rel_err(out, out_ref) <= 1.5 * rel_err(own_out, out_ref) + 4 * eps
    for name, ours, own, ref in zip(("input", "weight", "gamma", "beta"), grads, own_grads, grad_refs):
        assert rel_err(ours, ref) <= 1.5 * rel_err(own, ref) + 4 * eps, name


def test_results_identical_across_schedules():
    _, x, wt, conv = _inputs(CASES[2], torch.float16)
    gamma, beta = torch.rand(128) + 0.5, torch.randn(128)
    outs = []
    for order, seed in emulator.SCHEDULES:
        with emulator.schedule(order, seed):
            outs.append(E.conv_bn_relu_train(x, wt, gamma, beta, 1e-5, *conv, True))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_packed_weights_cached_and_invalidated():
    """Packed once per weight; an in-place change repacks; a new weight at a freed weight's address is packed."""
    _, x, wt, conv = _inputs(CASES[0], torch.float16)
    scale, shift = torch.ones(128), torch.zeros(128)

    def run(w):
        out = []
        records = emulator.profile(lambda: out.append(E.conv_bn_relu_infer(x, w, scale, shift, *conv, False)))
        ref = F.conv2d(x.double(), w.double(), None, *conv)
        assert rel_err(out[0], ref) <= _own_bound(torch.float16, x, w, conv, ref)
        return "conv_tc_pack_weight_kernel" in _kernels(records)

    run(wt)
    assert not run(wt)  # cached
    with torch.no_grad():
        wt.mul_(-2)  # a new version of the same storage
    assert run(wt)
    address = wt.data_ptr()
    del wt
    fresh = []
    for seed in range(20):  # the allocator hands the freed block to a tensor of the same size
        w = (torch.randn(128, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 0.3).half()
        if w.data_ptr() == address:
            fresh.append(w)
            break
    if fresh:
        assert run(fresh[0])


@pytest.mark.parametrize("shape", ["stage1", "stage3"])
def test_counters_meet_the_design_targets(shape):
    """ResNeXt-50 stage 1 and 3, float16, inference and the training forward, N=32 (extrapolated exactly from 2
    and 4): every output byte stored once in full sectors, loads >= 90% sector-efficient, no bank conflicts, the
    compulsory traffic within 10% of x + w + y, and a predicted H100 time within 1.3x of the layer's bounds."""
    name, c, hw, stride = next(s for s in profile_cli.shapes() if s[0] == f"x50.{shape}")
    e = 2
    for form in ("inference", "training"):
        r2, r4 = (profile_cli._run_form(form, n, c, hw, stride, torch.float16) for n in profile_cli.BASE_BATCHES)
        records = [profile_cli.extrapolate(a, b, 32) for a, b in zip(r2, r4)]
        conv = next(r for r in records if "conv_tc_fwd_kernel" in r.kernel)
        out_bytes = 32 * c * hw * hw // stride // stride * e
        stats_bytes = conv.grid[0] * c * 8 if form == "training" else 0  # a (sum, squared deviations) per tile
        assert conv.gst_bytes == conv.gst_distinct_bytes == out_bytes + stats_bytes
        assert conv.gst_efficiency == 1.0
        assert conv.gld_efficiency >= 0.9
        assert conv.smem_conflict_wavefronts <= 0.05 * conv.smem_wavefronts
        x_bytes, w_bytes = 32 * c * hw * hw * e, c * (c // 32) * 9 * e
        assert conv.dram_bytes_min <= 1.1 * (x_bytes + w_bytes + out_bytes)
        compulsory, tensor, _ = profile_cli.layer_bounds("inference", 32, c, hw, stride, torch.float16,
                                                         emulator.gpu_model.GPUS["h100"])
        assert conv.predict_us("h100") <= 1.3 * max(compulsory, tensor)
