"""The tensor-core weight gradient (csrc/cuda/kernels/conv_wgrad_tc.cuh) under the CUDA-on-CPU emulator: every
group size, stride 1 and 2, 3x3 and 1x1, padding 0 to 2, odd and small images, N=1 and more, one chunk (the kernel
writes the weight gradient) and several (partials added by the finalize kernel), against float64 autograd; bitwise
determinism across schedules; the training backward taking its weight gradient from it; the counters (the design
targets at ResNeXt-50 stages 1 and 3); and the SASS nvcc makes of it."""

import os

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err

from resnext_kernels import emulator
from resnext_kernels.emulator import __main__ as profile_cli

if not emulator.available() and os.environ.get("CI"):
    raise ImportError("resnext_kernels._emu (the emulated CUDA build) is missing; CI requires it")
pytestmark = pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")

E = torch.ops.resnext_kernels_emu if emulator.available() else None
HALF = [torch.float16, torch.bfloat16]
KERNEL, FINALIZE = "conv_wgrad_tc_kernel", "conv_wgrad_tc_finalize_kernel"

CASES = [  # (N, C, H, W, groups, kernel, stride, padding, channels_last, block width (0: the plan's), chunks)
    (3, 64, 24, 24, 16, 3, 1, 1, True, 0, 5),    # groups of 4 (a quarter of each 16x16 block), several sub-tiles a chunk
    (2, 64, 26, 25, 8, 3, 1, 1, False, 0, 2),    # groups of 8, NCHW, tile columns past the image
    (4, 64, 24, 24, 4, 3, 1, 1, True, 0, 2),     # groups of 16
    (1, 64, 9, 11, 4, 3, 1, 1, True, 0, 1),      # N=1, odd sizes, one chunk: the kernel writes the weight gradient
    (3, 128, 7, 7, 8, 3, 1, 1, True, 0, 1),      # three images in one sub-tile (room for four)
    (2, 64, 21, 19, 2, 3, 2, 1, True, 0, 1),     # groups of 32: 2x2 narrow blocks a group; stride 2 (column planes)
    (2, 64, 21, 19, 2, 3, 2, 1, True, 32, 1),    # the same in wide blocks (one a group)
    (4, 64, 34, 34, 2, 3, 1, 1, True, 32, 2),    # wide blocks, two chunks
    (1, 64, 33, 71, 16, 3, 2, 1, True, 0, 5),    # stride 2, wide images: sub-tile rows cut to fit the shared memory
    (1, 128, 11, 13, 2, 3, 2, 2, False, 0, 1),   # two groups of 64 (4x4 narrow blocks each), padding 2
    (1, 128, 11, 13, 2, 3, 2, 2, False, 32, 1),  # the same in wide blocks (2x2 a group)
    (2, 128, 10, 9, 32, 3, 1, 0, True, 0, 1),    # padding 0
    (4, 64, 20, 20, 1, 1, 1, 0, True, 0, 3),     # 1x1
    (4, 64, 20, 20, 1, 1, 1, 0, True, 32, 3),    # 1x1 in wide blocks
    (2, 128, 9, 8, 16, 1, 2, 0, True, 0, 1),     # 1x1 at stride 2: odd input rows and columns never read
]


def _case_id(case):
    n, c, h, w, groups, k, stride, pad, cl, width, _ = case
    return (f"n{n}-c{c}-{h}x{w}-g{groups}-k{k}-s{stride}-p{pad}-{'nhwc' if cl else 'nchw'}"
            + ("-wide" if width == 32 else ""))


def _inputs(case, dtype, seed=0):
    """x, grad_y (the convolution output's shape), a weight of the right shape and the conv arguments (with the
    block width)."""
    n, c, h, w, groups, k, stride, pad, cl, width, _ = case
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=fmt)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    grad_y = torch.randn(n, c, oh, ow, generator=gen).to(dtype).contiguous(memory_format=fmt)
    return x, grad_y, torch.empty(c, c // groups, k, k, dtype=dtype), ([stride] * 2, [pad] * 2, [1, 1], groups, width)


def _autograd_weight_grad(x, grad_y, shape, conv, dtype):
    """PyTorch's weight gradient of conv2d in `dtype` (float64: the reference)."""
    w = torch.zeros(shape, dtype=dtype, requires_grad=True)
    F.conv2d(x.to(dtype), w, None, *conv[:4]).backward(grad_y.to(dtype))
    return w.grad


def _kernels(records):
    return [r.kernel.split("<")[0].replace("rk::cuda_kernels::", "") for r in records]


def _weight_grad(x, grad_y, wt, conv):
    out = []
    records = emulator.profile(lambda: out.append(E.conv_weight_grad_tc(grad_y, x, wt, *conv)))
    return out[0], records


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_weight_gradient_matches_float64(case, dtype):
    x, grad_y, wt, conv = _inputs(case, dtype)
    dw, records = _weight_grad(x, grad_y, wt, conv)
    width, chunks = case[-2:]
    assert _kernels(records) == ([KERNEL, FINALIZE] if chunks > 1 else [KERNEL])
    assert records[0].grid[1] == chunks and records[0].kernel.endswith(", true>" if width == 32 else ", false>")
    ref = _autograd_weight_grad(x, grad_y, wt.shape, conv, torch.float64)
    own = _autograd_weight_grad(x, grad_y, wt.shape, conv, dtype)
    assert dw.dtype == dtype and dw.shape == wt.shape and dw.is_contiguous()
    assert rel_err(dw, ref) <= 2 * rel_err(own, ref) + 2 * torch.finfo(dtype).eps
    # The counters: tensor cores, no bank conflict at all (the layouts are conflict-free by construction), every
    # global read a 16-byte cp.async.
    main = records[0]
    assert main.mma_m16n8k16_f16 + main.mma_m16n8k16_bf16 == main.mma > 0
    assert main.smem_conflict_wavefronts == 0
    assert main.gld_requests == 0 and main.cp_async_requests > 0
    assert main.gld_efficiency == 1.0 and main.gst_efficiency == 1.0
    if chunks > 1:
        assert set(records[1].gld_requests_by_width) == {16}


def test_plan_choices_at_resnext_layers():
    """(block width, blocks, chunks) at N=32 (no kernel runs): narrow blocks and chunks up to 128 CTAs for groups of
    4-16 channels; groups of 32 at ResNeXt-50 stage 4 stay narrow (wide blocks: 32 CTAs), ResNeXt-101 stage 4 (groups
    of 64) takes wide ones (128 CTAs either way), its stride-2 stage 3 narrow ones (wide: 4 chunks of partials)."""
    expected = {"x50.stage1": [16, 8, 16], "x50.stage3": [16, 32, 4], "x50.stage4": [16, 128, 1],
                "x101.stage4": [32, 128, 1], "x101.stage3.s2": [16, 128, 1]}
    for name, c, hw, stride in profile_cli.shapes():
        if name in expected:
            x = torch.empty(32, c, hw, hw, dtype=torch.float16, device="meta")
            w = torch.empty(c, c // 32, 3, 3, dtype=torch.float16, device="meta")
            assert E.conv_weight_grad_tc_plan(x, w, [stride] * 2, [1, 1], [1, 1], 32)[:3] == expected[name], name


def test_bitwise_identical_across_schedules_and_runs():
    x, grad_y, wt, conv = _inputs(CASES[0], torch.float16, seed=3)
    results = []
    for order, seed in emulator.SCHEDULES + [emulator.SCHEDULES[0]]:
        with emulator.schedule(order, seed):
            results.append(E.conv_weight_grad_tc(grad_y, x, wt, *conv))
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_misaligned_views_are_copied():
    """cp.async needs 16-byte aligned rows: tensors at an odd storage offset take a copy and give the same bits."""
    x, grad_y, wt, conv = _inputs(CASES[3], torch.bfloat16, seed=4)
    ref = E.conv_weight_grad_tc(grad_y, x, wt, *conv)

    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = flat[1:].as_strided(t.shape, t.stride())
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    assert torch.equal(E.conv_weight_grad_tc(shifted(grad_y), shifted(x), wt, *conv), ref)


def test_uncovered_problems_are_refused():
    x = torch.randn(1, 48, 6, 6).half()
    with pytest.raises(RuntimeError, match="multiples of 64"):
        E.conv_weight_grad_tc(torch.randn(1, 48, 6, 6).half(), x, torch.empty(48, 4, 3, 3).half(), [1, 1], [1, 1],
                              [1, 1], 12)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        E.conv_weight_grad_tc(torch.randn(1, 64, 6, 6), torch.randn(1, 64, 6, 6), torch.empty(64, 4, 3, 3), [1, 1],
                              [1, 1], [1, 1], 16)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_training_backward_takes_the_tensor_core_weight_gradient(dtype, deterministic):
    """The CUDA training backward's weight gradient comes from the tensor-core kernel wherever it covers the problem,
    with or without torch.use_deterministic_algorithms (the CUDA-core kernel never runs), bitwise the same in both
    modes, and within PyTorch's own same-precision error of the float64 training step."""
    n, c, h, w, groups = 2, 128, 12, 10, 32
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c, c // groups, 3, 3, generator=gen) / 6).to(dtype)
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.2
    args = (1e-5, [1, 1], [1, 1], [1, 1], groups, True)
    out, y, mean, var = E.conv_bn_relu_train(x, wt, gamma, beta, *args)
    grad = torch.randn(out.shape, generator=gen).to(dtype)

    def backward():
        result = []
        records = emulator.profile(lambda: result.append(E.conv_bn_relu_train_backward(
            grad, x, wt, y, mean, var, gamma, beta, *args, [False, True, False])[1]))
        return result[0], _kernels(records)

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        dw, kernels = backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert KERNEL in kernels and "weight_grad_partial_kernel" not in kernels
    assert dw.dtype == dtype and dw.shape == wt.shape
    torch.use_deterministic_algorithms(not deterministic)
    try:
        assert torch.equal(backward()[0], dw)
    finally:
        torch.use_deterministic_algorithms(before)
    d = torch.float64
    leaves = [t.detach().to(d).requires_grad_() for t in (x, wt, gamma, beta)]
    ref = F.relu(F.batch_norm(F.conv2d(leaves[0], leaves[1], None, *args[1:5]), None, None, leaves[2], leaves[3],
                              True, 0.0, 1e-5))
    ref.backward(grad.to(d))
    own = [t.detach().clone().requires_grad_() for t in (x, wt)]
    F.relu(F.batch_norm(F.conv2d(own[0], own[1], None, *args[1:5]), None, None, gamma, beta, True, 0.0,
                        1e-5)).backward(grad)
    assert rel_err(dw, leaves[1].grad) <= 1.5 * rel_err(own[1].grad, leaves[1].grad) + 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("shape,batch", [("stage1", 8), ("stage3", 32)])
def test_counters_meet_the_design_targets(shape, batch):
    """ResNeXt-50 stage 1 (N=8: already 128 CTAs) and stage 3 (N=32, its chunking depends on the batch), float16, run
    at that batch: partial sums and the weight gradient stored once in full sectors, x and grad_y read from DRAM
    once, loads 16-byte and sector-efficient, no bank conflicts, and a predicted H100 time within 1.3x of the
    compulsory traffic (x + grad_y + dW at DRAM bandwidth; the tensor cores are not the bound here)."""
    name, c, hw, stride = next(s for s in profile_cli.shapes() if s[0] == f"x50.{shape}")
    records = profile_cli._run_weight_grad(batch, c, hw, stride, torch.float16)
    assert _kernels(records) == [KERNEL, FINALIZE]
    main, fin = records
    e, dw_numel = 2, c * (c // 32) * 9
    chunks = main.grid[1]
    assert main.grid[0] * chunks >= 128  # the GPU's SMs busy
    assert main.gst_bytes == main.gst_distinct_bytes == chunks * dw_numel * 4
    assert fin.gst_bytes == fin.gst_distinct_bytes == dw_numel * e
    assert main.gst_efficiency == fin.gst_efficiency == 1.0
    assert main.gld_requests == 0 and main.gld_efficiency >= 0.9 and set(fin.gld_requests_by_width) == {16}
    assert main.mma > 0 and main.smem_conflict_wavefronts <= 0.05 * main.smem_wavefronts
    out = hw // stride
    x_bytes, gy_bytes = batch * c * hw * hw * e, batch * c * out * out * e
    assert main.dram_read_bytes_min <= 1.02 * (x_bytes + gy_bytes)
    predicted = sum(r.predict_us("h100") for r in records)
    compulsory = (x_bytes + gy_bytes + dw_numel * e) / (emulator.gpu_model.GPUS["h100"].dram_gbs * 1e3)
    assert predicted <= 1.3 * compulsory


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_has_tensor_core_instructions_and_no_spills(arch):
    """nvcc builds every variant (tests/emu/wgrad_tc_kernels.cu): 0 spill bytes in ptxas's report; the main kernel's
    SASS has HMMA, LDGSTS and LDSM, and no kernel touches local memory."""
    import subprocess
    import tempfile

    from test_emulator_profile import ROOT, sass_tools

    from resnext_kernels.emulator import ptxas
    nvcc, check_sass = sass_tools()
    src = os.path.join(ROOT, "tests", "emu", "wgrad_tc_kernels.cu")
    cubin = os.path.join(tempfile.mkdtemp(), f"wgrad_tc_{arch}.cubin")
    build = subprocess.run([nvcc, "-std=c++20", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-I",
                            os.path.join(ROOT, "csrc"), src, "-o", cubin], check=True, capture_output=True, text=True)
    report = ptxas.parse(build.stdout + build.stderr)
    assert sum("conv_wgrad_tc" in name for name, _ in report) == 10 and all(k[1] == arch for k in report)
    assert all(info["spill_stores"] == info["spill_loads"] == 0 for info in report.values()), report
    assert check_sass.main([cubin, "--quiet", "--require", r"conv_wgrad_tc_kernel=HMMA,LDGSTS,LDSM",
                            "--forbid", r"conv_wgrad_tc=LDL,STL"]) == 0
