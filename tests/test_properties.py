"""Property-based tests: random shapes, groups, strides, paddings, dilations, dtypes and layouts against
float64 references, forward and backward, for the CPU kernels, the CUDA kernels run by the emulator and the
whole-block op. RESNEXT_KERNELS_FUZZ_EXAMPLES sets the example count of the CPU properties (the emulated and
block properties run a fifth of it each: the emulator executes every CUDA thread on the CPU).

Per CI run (default 250): 250 + 250 CPU cases, 50 + 50 emulated CUDA cases, 50 block cases. The CPU properties
draw from shape families aimed at each CPU path (1-64 channels per group, images to 20x20, float32 and bfloat16
besides float64), record the path the planner chose per example (hypothesis events, and a per-path summary at the
end of the run), and test_fuzz_reached_every_cpu_path asserts at least 20 examples per path.
A failing example that hypothesis finds is added as a regression case (``@example``, or a case of
test_inference_edge_examples for the family properties)."""

import copy
import functools
import itertools
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from reference import FUZZ_PATHS, assert_close_to_reference, cuda_plan, reference_conv_bn_relu, reference_train, rel_err

import resnext_kernels as rk
from resnext_kernels import emulator

EXAMPLES = int(os.environ.get("RESNEXT_KERNELS_FUZZ_EXAMPLES", "250"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL_SETTINGS = settings(SETTINGS, max_examples=max(10, EXAMPLES // 5))


@st.composite
def small_conv_problems(draw):
    """Small random problems (at most 6 channels per group, 9x9): the emulated CUDA properties, where every CUDA
    thread runs on the CPU."""
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


# Shape families of the CPU properties, each aimed at one CPU path on a vector CPU (the path is the planner's
# choice, recorded per example; the families only make every path common): (channels per group in, out) and the
# geometry each needs. Channel counts are multiples of 8 and 16, images up to 20x20, N from 1.
CPU_FAMILIES = ("winograd", "winograd_small", "lanes", "lanes_dgrad", "broadcast", "expand", "generic", "pointwise",
                "any")


@st.composite
def cpu_conv_problems(draw, family):
    k, stride, dilation, padding = 3, (1, 1), (1, 1), (1, 1)
    n = draw(st.integers(1, 3))
    if family in ("winograd", "winograd_small"):  # 8-64 per group, 3x3 stride 1: F(4x4) from 8 tiles, else F(2x2)
        cin = cout = draw(st.sampled_from([8, 16, 32, 64]))
        groups = draw(st.sampled_from([g for g in (1, 2, 3, 4, 8, 16) if g * cin <= 128]))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        if family == "winograd_small":
            n = 1
    elif family == "lanes":  # 2, 4 or 8 per group in and out, a 3-wide kernel, 16k channels
        cin = cout = draw(st.sampled_from([2, 4, 8]))
        groups = draw(st.sampled_from([g for g in (4, 8, 16, 32) if g * cin % 16 == 0 and g * cin <= 128]))
        # the data gradient's lanes need stride 1
        stride = draw(st.sampled_from([(1, 1), (1, 1), (1, 1), (2, 2), (1, 2)]))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    elif family == "lanes_dgrad":  # lanes at stride 1 with at most 4 inputs per group: the data gradient's lanes too
        cin = cout = draw(st.sampled_from([2, 4]))
        groups = draw(st.sampled_from([g for g in (4, 8, 16, 32) if g * cin % 16 == 0]))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    elif family == "broadcast":  # 16k outputs per group
        cin, cout = draw(st.sampled_from([8, 16, 32, 64])), draw(st.sampled_from([16, 32, 48, 64]))
        groups = draw(st.sampled_from([g for g in (1, 2) if g * max(cin, cout) <= 128]))
        k = draw(st.sampled_from([1, 3]))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    elif family == "expand":  # fewer than 16 outputs per group, a 16k-wide output
        cin, cout = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (4, 8), (8, 4), (1, 4)]))
        groups = draw(st.sampled_from([g for g in (16, 32, 64) if g * cout % 16 == 0 and g * max(cin, cout) <= 128]))
        k = draw(st.sampled_from([1, 3]))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    elif family == "generic":  # output widths no vector block divides
        cin, cout = draw(st.sampled_from([(3, 3), (6, 6), (5, 7), (12, 12), (24, 24)]))
        groups = draw(st.sampled_from([1, 2, 4]))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    elif family == "pointwise":  # dense 1x1 with at least 64 KB of float32 weights
        cin, cout = draw(st.sampled_from([(128, 128), (64, 256), (256, 64)]))
        groups, k, padding = 1, 1, (0, 0)
        stride = (draw(st.integers(1, 2)),) * 2
    else:  # anything: 1-64 per group, odd group counts, strides, dilations
        groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
        cin = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32, 64]))
        cout = draw(st.sampled_from([1, 2, 4, 6, 8, 16, 32, 64]))
        assume(groups * max(cin, cout) <= 128)
        k = draw(st.sampled_from([1, 3]))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    # "winograd" images give at least 9 tiles of 4x4 (F(4x4)), "winograd_small" at most 4 (F(2x2))
    low, top = {"winograd": (12, 20), "winograd_small": (1, 8)}.get(family, (1, 20))
    h = draw(st.integers(max(low, dilation[0] * (k - 1) + 1 - 2 * padding[0]), top))
    w = draw(st.integers(max(low, dilation[1] * (k - 1) + 1 - 2 * padding[1]), top))
    layout = draw(st.sampled_from(["nchw", "channels_last", "strided"]))
    relu = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(n=n, cin=cin * groups, cout=cout * groups, h=h, w=w, k=k, stride=stride, padding=padding,
                dilation=dilation, groups=groups, layout=layout, relu=relu, seed=seed, family=family)


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


def _example(**overrides):
    base = dict(n=1, cin=4, cout=4, h=5, w=5, k=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2,
                layout="channels_last", relu=True, seed=0)
    return {**base, **overrides}


# Each family is its own property (a fixed share of the examples, so every path gets its count). float64 proves the
# math on the portable path and is drawn in the families without a vector path of their own; float32 and bfloat16
# reach the vector kernels.
FAMILY_SETTINGS = settings(SETTINGS, max_examples=max(4, EXAMPLES // len(CPU_FAMILIES)))


def _family_dtype(data, family):
    vector_only = family not in ("generic", "any")
    return data.draw(st.sampled_from([torch.float32, torch.bfloat16] if vector_only else
                                     [torch.float64, torch.float32, torch.bfloat16]), label="dtype")


def _record(form, decision, dtype, *grads):
    """Counts the CPU path (and gradient sources) an example ran, for hypothesis' statistics and the per-run
    summary (conftest.py); test_fuzz_reached_every_cpu_path asserts the counts."""
    FUZZ_PATHS[form][decision.kernel] += 1
    event(f"path {decision.kernel}")
    event(f"dtype {str(dtype).replace('torch.', '')}")
    for source in grads:
        FUZZ_PATHS[form][source] += 1
        event(f"gradient {source}")


@pytest.mark.parametrize("family", CPU_FAMILIES)
@FAMILY_SETTINGS
@given(data=st.data())
def test_inference_matches_reference(family, data):
    p = data.draw(cpu_conv_problems(family), label="problem")
    _check_inference(p, _family_dtype(data, family))


@pytest.mark.parametrize("p,dtype", [
    (_example(n=0), torch.float32),  # empty batch
    (_example(h=1, w=1, k=1, padding=(0, 0)), torch.float64),  # one pixel, pointwise
    (_example(layout="strided", stride=(2, 1), dilation=(2, 2), padding=(2, 0), w=9), torch.bfloat16),
])
def test_inference_edge_examples(p, dtype):
    _check_inference(p, dtype, record=False)


def _check_inference(p, dtype, record=True):
    x, wt, (mean, var, gamma, beta) = _tensors(p, dtype)
    kwargs = _conv_kwargs(p)
    decision = rk.explain(x, wt, **kwargs)
    assert decision.path == "cpu", decision
    if record:
        _record("inference", decision, dtype)
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, relu=p["relu"], **kwargs)
    conv = (p["stride"], p["padding"], p["dilation"], p["groups"])
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, *conv, relu=p["relu"])
    own = None
    if dtype == torch.bfloat16:  # PyTorch's own: conv2d, batch_norm and relu in bfloat16
        own = F.batch_norm(F.conv2d(x, wt, None, *conv), *(t.to(dtype) for t in (mean, var, gamma, beta)), False,
                           0.0, 1e-5)
        own = F.relu(own) if p["relu"] else own
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close_to_reference(out, ref, own, f"output ({decision.kernel})")


@pytest.mark.parametrize("family", CPU_FAMILIES)
@FAMILY_SETTINGS
@given(data=st.data())
def test_training_forward_backward_match_reference(family, data):
    """Output, batch statistics (through the running statistics) and every gradient of the training form against
    float64 autograd. bfloat16 runs without the ReLU: a rounding that flips one ReLU mask moves a gradient by
    ~10% of its scale in PyTorch's own bfloat16 too, which would hide a 3% bug (the float32 examples cover the
    ReLU's backward on the same kernels)."""
    # At least 4 values per channel: with 2 the BN backward projects every gradient to exactly 0 (what is left is
    # rounding, with no scale to be relative to); 1 raises (tested in test_training.py).
    p = data.draw(cpu_conv_problems(family), label="problem")
    assume(_values_per_channel(p) >= 4)
    dtype = _family_dtype(data, family)
    # torch.use_deterministic_algorithms: the project's weight-gradient kernels for every shape (without it, ATen's
    # for most), drawn 2 in 3 so that each of them gets its 20 examples.
    deterministic = data.draw(st.sampled_from([False, True, True]), label="deterministic")
    x, wt, (mean, var, gamma, beta) = _tensors(p, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var, gamma, beta = (t.to(acc) for t in (mean, var, gamma, beta))
    relu = p["relu"] and dtype != torch.bfloat16
    kwargs = _conv_kwargs(p)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        decision = rk.explain(x, wt, training=True, **kwargs)
        assert decision.path == "cpu", decision
        _record("training", decision, dtype, decision.data_grad, decision.weight_grad)
        leaves = [t.clone().requires_grad_() for t in (x, wt, gamma, beta)]
        rm, rv = mean.clone(), var.clone()
        out = rk.conv_bn_relu(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], training=True, relu=relu, **kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 1)).to(dtype)
        out.backward(grad)
    finally:
        torch.use_deterministic_algorithms(before)
    conv = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"], relu=relu)
    ref = reference_train(x, wt, gamma, beta, grad, **conv)
    own = (None, None, None, [None] * 4)
    if dtype != torch.float64:  # PyTorch's own error in this dtype (float32: see reference.tolerance)
        own = reference_train(x, wt, gamma.to(dtype), beta.to(dtype), grad, **conv, dtype=dtype)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref[0], own[0], f"output ({decision.kernel})")
    m = out.numel() // out.shape[1]
    for name, got, start, stat, own_stat in (("running_mean", rm, mean, ref[1], own[1]),
                                              ("running_var", rv, var, ref[2] * m / (m - 1),
                                               None if own[2] is None else own[2] * m / (m - 1))):
        want = 0.9 * start.double() + 0.1 * stat
        assert_close_to_reference(got, want, None if own_stat is None else 0.9 * start.double() + 0.1 * own_stat,
                                  f"{name} ({decision.kernel})", dtype)
    sources = f"{decision.kernel}, {decision.data_grad}, {decision.weight_grad}"
    fp32_own = functools.lru_cache(lambda: reference_train(x, wt, gamma, beta, grad, **conv, dtype=torch.float32)[3])
    for i, (name, leaf, want, torch_own) in enumerate(zip(("input", "weight", "bn_weight", "bn_bias"), leaves, ref[3],
                                                          own[3])):
        if name == "weight" and wt[0].numel() == 1:
            # One weight per output channel: BN's scale invariance (sum of w * dL/dw over a channel's weights is 0)
            # makes the exact gradient 0, so there is no scale to be relative to; what is left is rounding.
            continue
        assert_close_to_reference(leaf.grad, want, torch_own, f"{name} gradient ({sources})", dtype,
                                  fp32_own=lambda i=i: fp32_own()[i])


# One problem per family that the planner gives that family's path on this CPU (the paths the fuzz must reach here).
FAMILY_PROBE = {"winograd": _example(cin=64, cout=64, groups=4, h=16, w=16, n=2),
                "winograd_small": _example(cin=64, cout=64, groups=4, h=6, w=6),
                "lanes": _example(cin=32, cout=32, groups=8, h=9, w=9, n=2),
                "lanes_dgrad": _example(cin=32, cout=32, groups=16, h=9, w=9, n=2),
                "broadcast": _example(cin=32, cout=32, groups=1, stride=(2, 2), h=9, w=9, n=2),
                "expand": _example(cin=32, cout=32, groups=32, h=9, w=9, n=2),
                "generic": _example(cin=24, cout=24, groups=2, stride=(2, 2), h=9, w=9, n=2),
                "pointwise": _example(cin=128, cout=128, groups=1, k=1, padding=(0, 0), n=2)}


def test_fuzz_reached_every_cpu_path():
    """Every CPU path this CPU has got at least 20 examples (per 250) in each CPU property of this run: the paths
    that the planner gives one probe problem per family (and in training, the gradient sources it gives them with
    torch.use_deterministic_algorithms off and on), as the fuzz's events are the planner's decisions too."""
    forms = [form for form in ("inference", "training") if sum(FUZZ_PATHS[form].values()) >= EXAMPLES * 0.9]
    if not forms:
        pytest.skip("the CPU properties did not run in this session (deselected)")
    need = max(1, 20 * EXAMPLES // 250)
    for form in forms:
        paths = set()
        for probe, deterministic in itertools.product(FAMILY_PROBE.values(), (False, True)):
            x, wt, _ = _tensors(probe, torch.float32)
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                d = rk.explain(x, wt, training=form == "training", **_conv_kwargs(probe))
            finally:
                torch.use_deterministic_algorithms(before)
            paths |= {d.kernel, d.data_grad, d.weight_grad} if form == "training" else {d.kernel}
        short = {path: FUZZ_PATHS[form][path] for path in paths if FUZZ_PATHS[form][path] < need}
        assert not short, f"{form}: paths with fewer than {need} examples: {short} (all: {dict(FUZZ_PATHS[form])})"


def _emulated_or_skip(x, wt, p):
    if not emulator.available():
        assert not os.environ.get("CI"), "CI must run the emulated CUDA kernels: resnext_kernels._emu is missing"
        pytest.skip("resnext_kernels._emu (emulated CUDA) not built")
    assume(cuda_plan(x, wt, p["stride"], p["padding"], p["dilation"], p["groups"])[0] == "cuda_direct")
    return torch.ops.resnext_kernels_emu


def _op_args(p):
    return [list(p["stride"]), list(p["padding"]), list(p["dilation"]), p["groups"], p["relu"]]


@SMALL_SETTINGS
@given(p=small_conv_problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
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


def _values_per_channel(p):
    oh = (p["h"] + 2 * p["padding"][0] - p["dilation"][0] * (p["k"] - 1) - 1) // p["stride"][0] + 1
    ow = (p["w"] + 2 * p["padding"][1] - p["dilation"][1] * (p["k"] - 1) - 1) // p["stride"][1] + 1
    return p["n"] * oh * ow


@SMALL_SETTINGS
@given(p=small_conv_problems())
def test_emulated_cuda_training_forward_backward_match_reference(p):
    assume(_values_per_channel(p) > 1)
    x, wt, (_, _, gamma, beta) = _tensors(p, torch.float64)
    E = _emulated_or_skip(x, wt, p)
    args = [1e-5, *_op_args(p)]
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    with emulator.schedule("reverse", 0):
        out, conv_out, mean, var = E.conv_bn_relu_train(x, wt, gamma, beta, *args)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grads = E.conv_bn_relu_train_backward(grad, x, wt, conv_out, mean, var, gamma, beta, *args,
                                              [True, True, True])
    ref, ref_mean, ref_var, ref_grads = reference_train(x, wt, gamma, beta, grad, p["stride"], p["padding"],
                                                        p["dilation"], p["groups"], p["relu"])
    assert rel_err(out, ref) <= 1e-10
    assert rel_err(mean, ref_mean) <= 1e-12
    assert rel_err(var, ref_var) <= 1e-12
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

    from resnext_kernels import _build_info
    if getattr(_build_info, "SANITIZED", False):
        # ASan holds freed blocks in a quarantine of up to 256 MB before reuse, so resident memory grows with every
        # allocation until it fills; the regular build's run of this test is the leak check.
        pytest.skip("AddressSanitizer's quarantine grows resident memory by design")
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
