"""Property-based tests: random shapes, groups, strides, paddings, dilations, dtypes and layouts against
float64 references, forward and backward, for the CPU kernels, the CUDA kernels run by the emulator and the
whole-block op. RESNEXT_KERNELS_FUZZ_EXAMPLES sets the example count of the CPU properties (the emulated and
block properties run a fifth of it each: the emulator executes every CUDA thread on the CPU).

Per CI run (default 250): 250 + 250 CPU cases, 50 + 50 emulated CUDA cases, 50 block cases.
A failing example that hypothesis finds is added with ``@example`` to its property, so it stays a
regression case after the fix.
"""

import copy
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from reference import cuda_plan, rel_err

import resnext_kernels as rk
from resnext_kernels import emulator

EXAMPLES = int(os.environ.get("RESNEXT_KERNELS_FUZZ_EXAMPLES", "250"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL_SETTINGS = settings(SETTINGS, max_examples=max(10, EXAMPLES // 5))


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    cin = groups * draw(st.integers(1, 6))
    cout = groups * draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 3]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dilation[0] * (k - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (k - 1) + 1 - 2 * padding[1]), 9))
    n = draw(st.integers(0, 3))
    layout = draw(st.sampled_from(["nchw", "channels_last", "strided"]))
    relu = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(n=n, cin=cin, cout=cout, h=h, w=w, k=k, stride=stride, padding=padding, dilation=dilation,
                groups=groups, layout=layout, relu=relu, seed=seed)


def _tensors(p, dtype):
    gen = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["n"], p["cin"] * 2, p["h"], p["w"], generator=gen, dtype=torch.float64)
    x = x[:, ::2] if p["layout"] == "strided" else x[:, : p["cin"]]
    if p["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(p["cout"], p["cin"] // p["groups"], p["k"], p["k"], generator=gen, dtype=torch.float64)
    bn = [torch.randn(p["cout"], generator=gen, dtype=torch.float64) * 0.3,
          torch.rand(p["cout"], generator=gen, dtype=torch.float64) + 0.5,
          torch.rand(p["cout"], generator=gen, dtype=torch.float64) + 0.5,
          torch.randn(p["cout"], generator=gen, dtype=torch.float64) * 0.2]
    return x.to(dtype), wt.to(dtype), bn


def _conv_kwargs(p):
    return dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: output rounding 2^-8


def _example(**overrides):
    base = dict(n=1, cin=4, cout=4, h=5, w=5, k=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2,
                layout="channels_last", relu=True, seed=0)
    return {**base, **overrides}


@SETTINGS
@given(p=conv_problems(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
@example(p=_example(n=0), dtype=torch.float32)  # empty batch
@example(p=_example(h=1, w=1, k=1, padding=(0, 0)), dtype=torch.float64)  # one pixel, pointwise
@example(p=_example(layout="strided", stride=(2, 1), dilation=(2, 2), padding=(2, 0), w=9), dtype=torch.bfloat16)
def test_inference_matches_reference(p, dtype):
    x, wt, (mean, var, gamma, beta) = _tensors(p, dtype)
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, relu=p["relu"], **_conv_kwargs(p))
    y = F.conv2d(x.double(), wt.double(), None, p["stride"], p["padding"], p["dilation"], p["groups"])
    ref = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5)
    ref = F.relu(ref) if p["relu"] else ref
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) <= TOLERANCE[dtype]


@SETTINGS
@given(p=conv_problems())
def test_training_forward_backward_match_reference(p):
    if p["n"] * ((p["h"] + 2 * p["padding"][0] - p["dilation"][0] * (p["k"] - 1) - 1) // p["stride"][0] + 1) * \
            ((p["w"] + 2 * p["padding"][1] - p["dilation"][1] * (p["k"] - 1) - 1) // p["stride"][1] + 1) <= 1:
        return  # one value per channel: both paths raise (tested in test_training.py)
    x, wt, (mean, var, gamma, beta) = _tensors(p, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, wt, gamma, beta)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, wt, gamma, beta)]
    rm, rv = mean.clone(), var.clone()
    rm2, rv2 = mean.clone(), var.clone()
    out = rk.conv_bn_relu(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], training=True, relu=p["relu"],
                          **_conv_kwargs(p))
    y = F.conv2d(ref_leaves[0], ref_leaves[1], None, p["stride"], p["padding"], p["dilation"], p["groups"])
    ref = F.batch_norm(y, rm2, rv2, ref_leaves[2], ref_leaves[3], True, 0.1, 1e-5)
    ref = F.relu(ref) if p["relu"] else ref
    assert rel_err(out, ref) <= 1e-10
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) <= 1e-8
    assert rel_err(rm, rm2) <= 1e-12 and rel_err(rv, rv2) <= 1e-12


def _reference_train(p, x, wt, gamma, beta, grad):
    """float64 conv -> batch-statistics BN -> ReLU?, its output and the gradients of (x, wt, gamma, beta)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, wt, gamma, beta)]
    y = F.conv2d(leaves[0], leaves[1], None, p["stride"], p["padding"], p["dilation"], p["groups"])
    out = F.batch_norm(y, None, None, leaves[2], leaves[3], True, 0.0, 1e-5)
    out = F.relu(out) if p["relu"] else out
    out.backward(grad.double())
    return out.detach(), y.detach(), [t.grad for t in leaves]


def _emulated_or_skip(x, wt, p):
    if not emulator.available():
        assert not os.environ.get("CI"), "CI must run the emulated CUDA kernels: resnext_kernels._emu is missing"
        pytest.skip("resnext_kernels._emu (emulated CUDA) not built")
    assume(cuda_plan(x, wt, p["stride"], p["padding"], p["dilation"], p["groups"])[0] == "cuda_direct")
    return torch.ops.resnext_kernels_emu


def _op_args(p):
    return [list(p["stride"]), list(p["padding"]), list(p["dilation"]), p["groups"], p["relu"]]


@SMALL_SETTINGS
@given(p=conv_problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_emulated_cuda_inference_matches_reference(p, dtype):
    x, wt, (mean, var, gamma, beta) = _tensors(p, dtype)
    E = _emulated_or_skip(x, wt, p)
    scale, shift = rk.ops.fold_batch_norm(mean, var, gamma, beta, 1e-5, rk._common.accumulation_dtype(dtype))
    with emulator.schedule("random", p["seed"] % 1000):
        out = E.conv_bn_relu_infer(x, wt, scale, shift, *_op_args(p))
    y = F.conv2d(x.double(), wt.double(), None, p["stride"], p["padding"], p["dilation"], p["groups"])
    ref = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5)
    ref = F.relu(ref) if p["relu"] else ref
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)


def _more_than_one_value_per_channel(p):
    oh = (p["h"] + 2 * p["padding"][0] - p["dilation"][0] * (p["k"] - 1) - 1) // p["stride"][0] + 1
    ow = (p["w"] + 2 * p["padding"][1] - p["dilation"][1] * (p["k"] - 1) - 1) // p["stride"][1] + 1
    return p["n"] * oh * ow > 1


@SMALL_SETTINGS
@given(p=conv_problems())
def test_emulated_cuda_training_forward_backward_match_reference(p):
    assume(_more_than_one_value_per_channel(p))
    x, wt, (_, _, gamma, beta) = _tensors(p, torch.float64)
    E = _emulated_or_skip(x, wt, p)
    args = [1e-5, *_op_args(p)]
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    with emulator.schedule("reverse", 0):
        out, conv_out, mean, var = E.conv_bn_relu_train(x, wt, gamma, beta, *args)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grads = E.conv_bn_relu_train_backward(grad, x, wt, conv_out, mean, var, gamma, beta, *args,
                                              [True, True, True])
    ref, y, ref_grads = _reference_train(p, x, wt, gamma, beta, grad)
    assert rel_err(out, ref) <= 1e-10
    assert rel_err(mean, y.mean((0, 2, 3))) <= 1e-12
    assert rel_err(var, y.var((0, 2, 3), unbiased=False)) <= 1e-12
    for name, a, b in zip(("input", "weight", "bn_weight", "bn_bias"), grads, ref_grads):
        assert rel_err(a, b) <= 1e-8, name


@st.composite
def bottleneck_problems(draw):
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    planes = draw(st.sampled_from([4, 8, 16]))
    width_per_group = draw(st.sampled_from([1, 2, 4]))  # int(planes * base_width / 64)
    base_width = 64 * width_per_group // planes
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2)) if stride == 1 else 1
    expansion_in = draw(st.sampled_from([1, 2, 4]))
    inplanes = planes * expansion_in
    projection = stride != 1 or inplanes != planes * 4 or draw(st.booleans())
    size = draw(st.integers(1, 9))
    n = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["nchw", "channels_last", "strided"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(groups=groups, base_width=base_width, planes=planes, stride=stride, dilation=dilation,
                inplanes=inplanes, projection=projection, size=size, n=n, layout=layout, dtype=dtype, seed=seed)


@SMALL_SETTINGS
@given(p=bottleneck_problems())
def test_whole_block_op_matches_torchvision_bottleneck(p):
    from torchvision.models.resnet import Bottleneck
    torch.manual_seed(p["seed"])
    down = None
    if p["projection"]:
        down = torch.nn.Sequential(torch.nn.Conv2d(p["inplanes"], p["planes"] * 4, 1, p["stride"], bias=False),
                                   torch.nn.BatchNorm2d(p["planes"] * 4))
    ref = Bottleneck(p["inplanes"], p["planes"], p["stride"], down, p["groups"], p["base_width"], p["dilation"])
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    ref = ref.eval().double()
    ours = rk.nn.FusedResNeXtBlock(p["inplanes"], p["planes"], p["stride"], copy.deepcopy(down), p["groups"],
                                   p["base_width"], p["dilation"]).eval().double()
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(p["dtype"])
    x = torch.randn(p["n"], p["inplanes"] * 2, p["size"], p["size"], dtype=torch.float64)
    x = x[:, ::2] if p["layout"] == "strided" else x[:, : p["inplanes"]]
    if p["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(p["dtype"])
    before = x.clone()
    with torch.no_grad():
        assert ours.explain(x).path == "block"
        out = ours(x)
        want = ref(x.double())
    assert out.shape == want.shape and out.dtype == p["dtype"]
    assert rel_err(out, want) <= (1e-12 if p["dtype"] == torch.float64 else 1e-5)
    assert torch.equal(x, before)


def test_concurrent_calls_match_sequential():
    """Four Python threads calling the ops at once (kernels release the GIL) give sequential results."""
    gen = torch.Generator().manual_seed(0)
    problems = []
    for i in range(8):
        x = torch.randn(2, 32, 9 + i, 7, generator=gen).contiguous(memory_format=torch.channels_last)
        w = torch.randn(32, 32 // (2 ** (i % 4)), 3, 3, generator=gen)
        problems.append((x, w, 2 ** (i % 4)))
    scale, shift = torch.rand(32) + 0.5, torch.randn(32)

    def run(x, w, groups):
        inf = torch.ops.resnext_kernels.conv_bn_relu_infer(x, w, scale, shift, [1, 1], [1, 1], [1, 1], groups, True)
        train = torch.ops.resnext_kernels.conv_bn_relu_train(x, w, scale, shift, 1e-5, [1, 1], [1, 1], [1, 1],
                                                             groups, True)
        return [inf, *train]

    expected = [run(*p) for p in problems]
    results = [None] * len(problems)
    errors = []

    def worker(idx):
        try:
            for _ in range(3):
                for j in range(idx, len(problems), 4):
                    results[j] = run(*problems[j])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("threads", [2, 4])
def test_results_independent_of_thread_count(threads):
    """Bitwise the same output with several threads as with one (the reference is single-threaded, so a result
    that depends on how the pixels are split between threads shows)."""
    x = torch.randn(3, 64, 11, 13).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 2, 3, 3)
    scale, shift = torch.rand(64) + 0.5, torch.randn(64)
    args = (x, w, scale, shift, [1, 1], [1, 1], [1, 1], 32, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = torch.ops.resnext_kernels.conv_bn_relu_infer(*args)
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        out = torch.ops.resnext_kernels.conv_bn_relu_infer(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, reference)


def _resident_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    pytest.skip("no /proc/self/status: resident memory not readable here")


def test_no_memory_growth_over_1000_calls():
    """Forward+backward calls do not leak: resident memory grows by less than a quarter of one activation per call
    over each of three windows of 500 calls after warm-up, so leaking any tensor the step makes (the smallest is
    one activation) fails. A leak grows it in every window; the smallest growth is asserted, so that memory
    another thread of the test process takes meanwhile (an earlier test's compile workers, allocator arenas)
    does not fail the test. (This process alone grows by under 0.1 MB over 5000 calls.)"""
    import gc

    model = rk.nn.FusedGroupedConvBNReLU(32, 32, groups=8)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    activation_kib = x.numel() * x.element_size() / 1024

    def step():
        model(x).sum().backward()

    for _ in range(50):
        step()
    growths = []
    for _ in range(3):
        gc.collect()
        before = _resident_kib()
        for _ in range(500):
            step()
        gc.collect()
        growths.append(_resident_kib() - before)
    bound = 500 * activation_kib / 4
    assert min(growths) < bound, f"resident memory grew by {growths} KiB over windows of 500 calls (bound {bound})"
